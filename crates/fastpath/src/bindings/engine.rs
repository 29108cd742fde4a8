//! `Engine`: the service table, the policies and the connection table.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use pyo3::prelude::*;

use super::staged::{pool_pairs, PoolPairs, StagedChange};
use super::values::{Backend, Connection, Decision, Frontend, ServiceUpdate};
use super::{now_nanos, parse_ip, parse_port, sock, value_error};
use crate::conntrack::ConntrackConfig;
use crate::engine::{counter_snapshot, Engine as CoreEngine, EngineConfig, Verdict};
use crate::flow::{FlowKey, Nanos, Protocol, TcpFlags, NANOS_PER_SEC};
use crate::policy::{HashKey, MaglevConfig, PolicyKind};
use crate::service::{ServiceSpec, TableConfig};

#[pyclass(frozen, module = "pykp._fastpath")]
pub struct Engine {
    pub(super) core: Arc<CoreEngine>,
    /// The latest time a call gave or read: what `connections()` measures expiry against,
    /// so a snapshot agrees with the times the caller has been deciding at.
    last_now: AtomicU64,
}

impl Engine {
    fn now(&self, py: Python<'_>, now: Option<f64>) -> PyResult<Nanos> {
        let t = now_nanos(py, now)?;
        self.last_now.fetch_max(t, Ordering::Relaxed);
        Ok(t)
    }

    fn decision(&self, v: Verdict) -> Decision {
        match v {
            Verdict::Forward(f) => Decision {
                action: "forward",
                reason: None,
                service: self.core.services().name_of(f.service).map(|n| n.to_string()),
                backend: Some(sock(f.backend.addr)),
                backend_id: Some(f.backend.id.0),
                new_flow: f.new_flow,
            },
            other => Decision {
                action: other.action(),
                reason: other.reason(),
                service: match other {
                    Verdict::Reject { service, .. } => {
                        self.core.services().name_of(service).map(|n| n.to_string())
                    }
                    _ => None,
                },
                backend: None,
                backend_id: None,
                new_flow: false,
            },
        }
    }
}

#[pymethods]
impl Engine {
    #[new]
    #[pyo3(signature = (*, default_policy = "random", conntrack_capacity = 262_144, maglev_table_size = 65_537, maglev_seed = 0, hash_key = "5-tuple", seed = None, max_backend_id = 4_294_967_294))]
    fn new(
        default_policy: &str,
        conntrack_capacity: usize,
        maglev_table_size: u32,
        maglev_seed: u64,
        hash_key: &str,
        seed: Option<u64>,
        max_backend_id: u32,
    ) -> PyResult<Self> {
        if max_backend_id == 0 {
            return Err(value_error("max_backend_id must be at least 1"));
        }
        let default_hash_key = HashKey::from_str(hash_key).map_err(value_error)?;
        if conntrack_capacity == 0 {
            return Err(value_error("conntrack_capacity must be at least 1"));
        }
        let config = EngineConfig {
            table: TableConfig {
                default_policy: PolicyKind::from_str(default_policy).map_err(value_error)?,
                maglev: MaglevConfig { table_size: maglev_table_size, seed: maglev_seed },
                default_hash_key,
                max_backend_id,
            },
            conntrack: ConntrackConfig {
                capacity: conntrack_capacity,
                ..ConntrackConfig::default()
            },
            seed: seed.unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0)
                    ^ u64::from(std::process::id())
            }),
        };
        Ok(Engine {
            core: Arc::new(CoreEngine::new(config).map_err(value_error)?),
            last_now: AtomicU64::new(0),
        })
    }

    #[pyo3(signature = (name, frontends, backends, *, policy = None, affinity_timeout = None, hash_key = None))]
    #[allow(clippy::too_many_arguments)]
    fn upsert_service(
        &self,
        py: Python<'_>,
        name: String,
        frontends: Vec<Frontend>,
        backends: Vec<Backend>,
        policy: Option<&str>,
        affinity_timeout: Option<f64>,
        hash_key: Option<&str>,
    ) -> PyResult<u32> {
        let spec = ServiceUpdate::build(
            name,
            frontends,
            backends,
            policy,
            affinity_timeout,
            hash_key,
            None,
        )?
        .spec;
        let state = py.detach(|| self.core.upsert_service(&spec)).map_err(value_error)?;
        Ok(state.id.0)
    }

    fn remove_service(&self, py: Python<'_>, name: &str) -> bool {
        py.detach(|| self.core.remove_service(name))
    }

    fn services(&self) -> Vec<String> {
        self.core.services().services().iter().map(|s| s.name.to_string()).collect()
    }

    /// Whether a service of this name is published (one lookup, not a list of all).
    fn holds(&self, name: &str) -> bool {
        self.core.services().get(name).is_some()
    }

    fn service_count(&self) -> usize {
        self.core.services().len()
    }

    /// Compute a batch of upserts (in priority order: the oldest service first) and
    /// removals without publishing it.
    fn stage(
        &self,
        py: Python<'_>,
        upserts: Vec<ServiceUpdate>,
        removals: Vec<String>,
    ) -> StagedChange {
        let specs: Vec<ServiceSpec> = upserts.into_iter().map(|u| u.spec).collect();
        let staged = py.detach(|| self.core.stage(&specs, &removals));
        StagedChange::new(staged.report(), Some(staged))
    }

    /// Publish a staged batch with one snapshot swap.
    fn commit(&self, py: Python<'_>, staged: &StagedChange) -> PyResult<()> {
        let taken = staged.staged.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(taken) = taken else {
            return Err(value_error("this change was already committed (or refused as stale)"));
        };
        py.detach(|| self.core.commit(taken)).map_err(value_error)
    }

    /// Stage and commit a batch.
    fn apply(
        &self,
        py: Python<'_>,
        upserts: Vec<ServiceUpdate>,
        removals: Vec<String>,
    ) -> StagedChange {
        let specs: Vec<ServiceSpec> = upserts.into_iter().map(|u| u.spec).collect();
        StagedChange::new(py.detach(|| self.core.apply(&specs, &removals)), None)
    }

    /// Each service's pools as its policy sees them (kube-proxy's eligibility: ready
    /// backends, else serving and terminating ones; weight above 0), as (id, weight)
    /// pairs per family, sorted by address: what the kernel's fallback path may pick.
    /// Only the services named in `names` when given (unknown names are left out).
    #[pyo3(signature = (names = None))]
    fn pools(&self, names: Option<Vec<String>>) -> HashMap<String, PoolPairs> {
        let table = self.core.services();
        let states = match names {
            Some(names) => names.iter().filter_map(|n| table.get(n)).collect(),
            None => table.services(),
        };
        states.iter().map(|s| (s.name.to_string(), pool_pairs(s))).collect()
    }

    fn backend_ids(&self) -> std::collections::HashMap<u32, (String, u16)> {
        self.core.services().backend_ids().into_iter().map(|(id, a)| (id.0, sock(a))).collect()
    }

    #[pyo3(signature = (src, src_port, dst, dst_port, protocol = "TCP", *, tcp_flags = 0x02, now = None))]
    #[allow(clippy::too_many_arguments)]
    fn decide(
        &self,
        py: Python<'_>,
        src: &str,
        src_port: i64,
        dst: &str,
        dst_port: i64,
        protocol: &str,
        tcp_flags: u8,
        now: Option<f64>,
    ) -> PyResult<Decision> {
        let proto = Protocol::from_str(protocol).map_err(value_error)?;
        let key = FlowKey::new(
            proto,
            parse_ip(src)?,
            parse_port(src_port, "source")?,
            parse_ip(dst)?,
            parse_port(dst_port, "destination")?,
        );
        if key.src.is_ipv4() != key.dst.is_ipv4() {
            return Err(value_error("source and destination are of different address families"));
        }
        let flags = (proto == Protocol::Tcp).then_some(TcpFlags(tcp_flags));
        let now = self.now(py, now)?;
        let v = py.detach(|| self.core.decide_flow(&key, flags, now));
        Ok(self.decision(v))
    }

    #[pyo3(signature = (packet, *, now = None))]
    fn decide_packet(&self, py: Python<'_>, packet: &[u8], now: Option<f64>) -> PyResult<Decision> {
        let now = self.now(py, now)?;
        let v = py.detach(|| self.core.decide_packet(packet, now));
        Ok(self.decision(v))
    }

    #[pyo3(signature = (*, now = None, budget = 4096))]
    fn expire(&self, py: Python<'_>, now: Option<f64>, budget: usize) -> PyResult<usize> {
        let now = self.now(py, now)?;
        Ok(py.detach(|| self.core.expire(now, budget)))
    }

    fn flush_backend(&self, py: Python<'_>, ip: &str, port: i64) -> PyResult<usize> {
        let addr = SocketAddr::new(parse_ip(ip)?, parse_port(port, "backend")?);
        Ok(py.detach(|| self.core.flush_backend(addr)))
    }

    fn counters(&self) -> std::collections::HashMap<String, u64> {
        let mut m: std::collections::HashMap<String, u64> =
            counter_snapshot(self.core.counters()).into_iter().collect();
        let stats = self.core.conntrack().stats();
        for (name, value) in stats.pairs() {
            m.insert(format!("conntrack_{name}"), value);
        }
        m.insert("conntrack_expirations".into(), stats.expirations());
        m
    }

    #[pyo3(signature = (limit = 1000, *, now = None))]
    fn connections(
        &self,
        py: Python<'_>,
        limit: usize,
        now: Option<f64>,
    ) -> PyResult<Vec<Connection>> {
        let now = match now {
            Some(_) => self.now(py, now)?,
            None => self.last_now.load(Ordering::Relaxed),
        };
        let snap = py.detach(|| self.core.conntrack().snapshot(limit, now));
        Ok(snap
            .into_iter()
            .map(|c| Connection {
                protocol: c.key.proto.as_str(),
                client: sock(SocketAddr::new(c.key.src, c.key.src_port)),
                frontend: sock(SocketAddr::new(c.key.dst, c.key.dst_port)),
                backend: sock(c.backend),
                service: self
                    .core
                    .services()
                    .name_of(c.service)
                    .map(|n| n.to_string())
                    .unwrap_or_default(),
                state: c.state,
                expires_in: c.expires_in as f64 / NANOS_PER_SEC as f64,
            })
            .collect())
    }

    #[pyo3(signature = (*, now = None))]
    fn flow_counts(
        &self,
        py: Python<'_>,
        now: Option<f64>,
    ) -> PyResult<HashMap<(String, String, u16), u64>> {
        let now = match now {
            Some(_) => self.now(py, now)?,
            None => now_nanos(py, None)?,
        };
        let counts = py.detach(|| self.core.conntrack().counts(now));
        let services = self.core.services();
        Ok(counts
            .into_iter()
            .map(|((service, backend), n)| {
                let name = services.name_of(service).map(|n| n.to_string()).unwrap_or_default();
                ((name, backend.ip().to_string(), backend.port()), n)
            })
            .collect())
    }

    fn maglev_table(&self, name: &str) -> Vec<u32> {
        self.core
            .services()
            .get(name)
            .map(|s| {
                // Both families' tables, IPv4 first (a single-stack service has one).
                [&s.v4, &s.v6]
                    .into_iter()
                    .filter_map(|pool| match &pool.selector {
                        crate::policy::Selector::Maglev(m) => Some(
                            m.table(&pool.backends)
                                .into_iter()
                                .map(|i| pool.backends[usize::from(i)].handle.id.0),
                        ),
                        _ => None,
                    })
                    .flatten()
                    .collect()
            })
            .unwrap_or_default()
    }
}
