//! PyO3 bindings: `pykp._fastpath`. Thin by design: argument conversion, then the core,
//! with the GIL released around the core's work. The stub is `pykp/_fastpath.pyi`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::conntrack::ConntrackConfig;
use crate::datapath::nfqueue::KernelQueueStats;
use crate::datapath::nfqueue::{MarkLayout, NfqueueConfig, NfqueueDatapath as CoreNfqueue};
use crate::engine::{counter_snapshot, Engine as CoreEngine, EngineConfig, Verdict};
use crate::flow::{FlowKey, Nanos, Protocol, TcpFlags, NANOS_PER_SEC};
use crate::policy::{HashKey, MaglevConfig, PolicyKind};
use crate::service::{
    BackendId, BackendSpec, BatchReport, Conditions, Frontend as CoreFrontend, PoolIds,
    ServiceSpec, ServiceState, Staged, TableConfig,
};

fn value_error(msg: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(msg.to_string())
}

fn parse_ip(s: &str) -> PyResult<IpAddr> {
    IpAddr::from_str(s).map_err(|_| value_error(format!("{s:?} is not an IP address")))
}

fn parse_port(p: i64, what: &str) -> PyResult<u16> {
    u16::try_from(p)
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| value_error(format!("{what} port {p} is out of range 1..65535")))
}

fn parse_seconds(s: f64, what: &str) -> PyResult<Nanos> {
    if !(0.0..=1e9).contains(&s) {
        return Err(value_error(format!("{what} {s} must be a non-negative number of seconds")));
    }
    Ok((s * NANOS_PER_SEC as f64) as Nanos)
}

/// `now` in seconds, or the monotonic clock Python's `time.monotonic()` reads.
fn now_nanos(py: Python<'_>, now: Option<f64>) -> PyResult<Nanos> {
    match now {
        Some(s) => parse_seconds(s, "now"),
        None => {
            let t: f64 = py.import("time")?.call_method0("monotonic")?.extract()?;
            parse_seconds(t, "now")
        }
    }
}

#[pyclass(frozen, from_py_object, module = "pykp._fastpath")]
#[derive(Clone)]
pub struct Frontend {
    inner: CoreFrontend,
}

#[pymethods]
impl Frontend {
    #[new]
    #[pyo3(signature = (ip, port, protocol = "TCP"))]
    fn new(ip: &str, port: i64, protocol: &str) -> PyResult<Self> {
        Ok(Frontend {
            inner: CoreFrontend {
                addr: parse_ip(ip)?,
                port: parse_port(port, "frontend")?,
                proto: Protocol::from_str(protocol).map_err(value_error)?,
            },
        })
    }

    #[getter]
    fn ip(&self) -> String {
        self.inner.addr.to_string()
    }

    #[getter]
    fn port(&self) -> u16 {
        self.inner.port
    }

    #[getter]
    fn protocol(&self) -> &'static str {
        self.inner.proto.as_str()
    }

    fn __repr__(&self) -> String {
        format!("Frontend({:?}, {}, {:?})", self.ip(), self.inner.port, self.protocol())
    }
}

#[pyclass(frozen, from_py_object, module = "pykp._fastpath")]
#[derive(Clone)]
pub struct Backend {
    inner: BackendSpec,
}

#[pymethods]
impl Backend {
    #[new]
    #[pyo3(signature = (ip, port, weight = 1, ready = true, serving = true, terminating = false, local = false))]
    fn new(
        ip: &str,
        port: i64,
        weight: i64,
        ready: bool,
        serving: bool,
        terminating: bool,
        local: bool,
    ) -> PyResult<Self> {
        let weight = u32::try_from(weight)
            .ok()
            .filter(|&w| w <= 1_000_000)
            .ok_or_else(|| value_error(format!("weight {weight} is out of range 0..1000000")))?;
        Ok(Backend {
            inner: BackendSpec {
                addr: SocketAddr::new(parse_ip(ip)?, parse_port(port, "backend")?),
                weight,
                conditions: Conditions { ready, serving, terminating },
                local,
            },
        })
    }

    #[getter]
    fn ip(&self) -> String {
        self.inner.addr.ip().to_string()
    }
    #[getter]
    fn port(&self) -> u16 {
        self.inner.addr.port()
    }
    #[getter]
    fn weight(&self) -> u32 {
        self.inner.weight
    }
    #[getter]
    fn ready(&self) -> bool {
        self.inner.conditions.ready
    }
    #[getter]
    fn serving(&self) -> bool {
        self.inner.conditions.serving
    }
    #[getter]
    fn terminating(&self) -> bool {
        self.inner.conditions.terminating
    }
    #[getter]
    fn local(&self) -> bool {
        self.inner.local
    }

    fn __repr__(&self) -> String {
        format!("Backend({:?}, {}, weight={})", self.ip(), self.port(), self.inner.weight)
    }
}

/// One service as a batch upserts it: what `Engine.upsert_service` takes, as a value.
#[pyclass(frozen, from_py_object, module = "pykp._fastpath")]
#[derive(Clone)]
pub struct ServiceUpdate {
    spec: ServiceSpec,
    /// As given, for the getter (the spec holds nanoseconds).
    affinity_timeout: Option<f64>,
}

impl ServiceUpdate {
    fn build(
        name: String,
        frontends: Vec<Frontend>,
        backends: Vec<Backend>,
        policy: Option<&str>,
        affinity_timeout: Option<f64>,
        hash_key: Option<&str>,
    ) -> PyResult<Self> {
        let spec = ServiceSpec {
            name,
            frontends: frontends.into_iter().map(|f| f.inner).collect(),
            backends: backends.into_iter().map(|b| b.inner).collect(),
            policy: policy.map(PolicyKind::from_str).transpose().map_err(value_error)?,
            affinity_timeout: match affinity_timeout {
                Some(t) if t <= 0.0 => {
                    return Err(value_error("affinity_timeout must be positive"))
                }
                Some(t) => Some(parse_seconds(t, "affinity_timeout")?),
                None => None,
            },
            hash_key: hash_key.map(HashKey::from_str).transpose().map_err(value_error)?,
        };
        Ok(ServiceUpdate { spec, affinity_timeout })
    }
}

#[pymethods]
impl ServiceUpdate {
    #[new]
    #[pyo3(signature = (name, frontends, backends, *, policy = None, affinity_timeout = None, hash_key = None))]
    fn new(
        name: String,
        frontends: Vec<Frontend>,
        backends: Vec<Backend>,
        policy: Option<&str>,
        affinity_timeout: Option<f64>,
        hash_key: Option<&str>,
    ) -> PyResult<Self> {
        ServiceUpdate::build(name, frontends, backends, policy, affinity_timeout, hash_key)
    }

    #[getter]
    fn name(&self) -> String {
        self.spec.name.clone()
    }
    #[getter]
    fn frontends(&self) -> Vec<Frontend> {
        self.spec.frontends.iter().map(|&inner| Frontend { inner }).collect()
    }
    #[getter]
    fn backends(&self) -> Vec<Backend> {
        self.spec.backends.iter().map(|&inner| Backend { inner }).collect()
    }
    #[getter]
    fn policy(&self) -> Option<&'static str> {
        self.spec.policy.map(PolicyKind::as_str)
    }
    #[getter]
    fn affinity_timeout(&self) -> Option<f64> {
        self.affinity_timeout
    }
    #[getter]
    fn hash_key(&self) -> Option<&'static str> {
        self.spec.hash_key.map(HashKey::as_str)
    }

    fn __repr__(&self) -> String {
        format!(
            "ServiceUpdate({:?}, {} frontends, {} backends)",
            self.spec.name,
            self.spec.frontends.len(),
            self.spec.backends.len()
        )
    }
}

type PoolPairs = (Vec<(u32, u32)>, Vec<(u32, u32)>);

fn pool_pairs(s: &ServiceState) -> PoolPairs {
    let (v4, v6) = s.pool_ids();
    let pairs = |p: PoolIds| p.into_iter().map(|(id, w)| (id.0, w)).collect();
    (pairs(v4), pairs(v6))
}

/// A batch staged by `Engine.stage` (or applied by `Engine.apply`): what it does, and,
/// until `Engine.commit`, the change itself.
#[pyclass(frozen, module = "pykp._fastpath")]
pub struct StagedChange {
    report: BatchReport,
    staged: Mutex<Option<Staged>>,
}

impl StagedChange {
    fn new(report: BatchReport, staged: Option<Staged>) -> Self {
        StagedChange { report, staged: Mutex::new(staged) }
    }

    fn ids(list: &[(BackendId, SocketAddr)]) -> HashMap<u32, (String, u16)> {
        list.iter().map(|&(id, a)| (id.0, sock(a))).collect()
    }
}

#[pymethods]
impl StagedChange {
    #[getter]
    fn refused(&self) -> HashMap<String, String> {
        self.report.refused.iter().map(|(n, e)| (n.clone(), e.to_string())).collect()
    }
    #[getter]
    fn backends_added(&self) -> HashMap<u32, (String, u16)> {
        StagedChange::ids(&self.report.backends_added)
    }
    #[getter]
    fn backends_removed(&self) -> HashMap<u32, (String, u16)> {
        StagedChange::ids(&self.report.backends_removed)
    }
    #[getter]
    fn pools(&self) -> HashMap<String, PoolPairs> {
        self.report.accepted.iter().map(|s| (s.name.to_string(), pool_pairs(s))).collect()
    }
    #[getter]
    fn removed(&self) -> Vec<String> {
        self.report.removed.clone()
    }
    #[getter]
    fn committed(&self) -> bool {
        self.staged.lock().unwrap_or_else(|p| p.into_inner()).is_none()
    }

    fn __repr__(&self) -> String {
        let r = &self.report;
        format!(
            "StagedChange({} accepted, {} refused, {} removed, {} backend ids added, {} removed{})",
            r.accepted.len(),
            r.refused.len(),
            r.removed.len(),
            r.backends_added.len(),
            r.backends_removed.len(),
            if self.committed() { ", committed" } else { "" }
        )
    }
}

#[pyclass(frozen, module = "pykp._fastpath")]
pub struct Decision {
    action: &'static str,
    reason: Option<&'static str>,
    service: Option<String>,
    backend: Option<(String, u16)>,
    backend_id: Option<u32>,
    new_flow: bool,
}

#[pymethods]
impl Decision {
    #[getter]
    fn action(&self) -> &'static str {
        self.action
    }
    #[getter]
    fn reason(&self) -> Option<&'static str> {
        self.reason
    }
    #[getter]
    fn service(&self) -> Option<String> {
        self.service.clone()
    }
    #[getter]
    fn backend(&self) -> Option<(String, u16)> {
        self.backend.clone()
    }
    #[getter]
    fn backend_id(&self) -> Option<u32> {
        self.backend_id
    }
    #[getter]
    fn new_flow(&self) -> bool {
        self.new_flow
    }

    fn __repr__(&self) -> String {
        match (&self.backend, self.reason) {
            (Some((ip, port)), _) => format!("Decision(forward to {ip}:{port})"),
            (None, Some(r)) => format!("Decision({} {r})", self.action),
            (None, None) => format!("Decision({})", self.action),
        }
    }
}

#[pyclass(frozen, module = "pykp._fastpath")]
pub struct Connection {
    protocol: &'static str,
    client: (String, u16),
    frontend: (String, u16),
    backend: (String, u16),
    service: String,
    state: &'static str,
    expires_in: f64,
}

#[pymethods]
impl Connection {
    #[getter]
    fn protocol(&self) -> &'static str {
        self.protocol
    }
    #[getter]
    fn client(&self) -> (String, u16) {
        self.client.clone()
    }
    #[getter]
    fn frontend(&self) -> (String, u16) {
        self.frontend.clone()
    }
    #[getter]
    fn backend(&self) -> (String, u16) {
        self.backend.clone()
    }
    #[getter]
    fn service(&self) -> String {
        self.service.clone()
    }
    #[getter]
    fn state(&self) -> &'static str {
        self.state
    }
    #[getter]
    fn expires_in(&self) -> f64 {
        self.expires_in
    }
}

fn sock(a: SocketAddr) -> (String, u16) {
    (a.ip().to_string(), a.port())
}

#[pyclass(frozen, module = "pykp._fastpath")]
pub struct Engine {
    core: Arc<CoreEngine>,
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
        let spec =
            ServiceUpdate::build(name, frontends, backends, policy, affinity_timeout, hash_key)?
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
                            m.table().iter().map(|&i| pool.backends[usize::from(i)].handle.id.0),
                        ),
                        _ => None,
                    })
                    .flatten()
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The NFQUEUE datapath: Rust threads reading the queues and deciding with the engine.
#[pyclass(frozen, module = "pykp._fastpath")]
pub struct NfqueueDatapath {
    engine: Arc<CoreEngine>,
    config: NfqueueConfig,
    running: Mutex<Option<CoreNfqueue>>,
}

#[pymethods]
impl NfqueueDatapath {
    #[new]
    #[pyo3(signature = (engine, *, first_queue = 0, last_queue = 0, backend_mask = 0xffff_0000, fail_open = false, max_len = 4096))]
    fn new(
        engine: &Engine,
        first_queue: u16,
        last_queue: u16,
        backend_mask: u32,
        fail_open: bool,
        max_len: u32,
    ) -> PyResult<Self> {
        if first_queue > last_queue {
            return Err(value_error("first_queue must not be above last_queue"));
        }
        if max_len == 0 {
            return Err(value_error("max_len must be at least 1"));
        }
        Ok(NfqueueDatapath {
            engine: engine.core.clone(),
            config: NfqueueConfig {
                first_queue,
                last_queue,
                layout: MarkLayout::new(backend_mask).map_err(value_error)?,
                fail_open,
                max_len,
            },
            running: Mutex::new(None),
        })
    }

    /// Bind the queues in the caller's network namespace and start the threads.
    fn start(&self, py: Python<'_>) -> PyResult<()> {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if running.is_none() {
            let (engine, config) = (self.engine.clone(), self.config);
            *running = Some(py.detach(move || CoreNfqueue::start(engine, config))?);
        }
        Ok(())
    }

    /// Duplicates of the bound queue sockets as (fd, queue); the caller owns the fds.
    fn dup_sockets(&self) -> PyResult<Vec<(i32, u16)>> {
        use std::os::fd::IntoRawFd;
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let Some(dp) = running.as_ref() else {
            return Err(value_error("the datapath is not running"));
        };
        Ok(dp.dup_sockets()?.into_iter().map(|(fd, q)| (fd.into_raw_fd(), q)).collect())
    }

    /// The read end of the readers' heartbeat pipe (a byte about every 10 ms while they
    /// read); the caller owns the fd.
    fn heartbeat(&self) -> PyResult<i32> {
        use std::os::fd::IntoRawFd;
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let Some(dp) = running.as_mut() else {
            return Err(value_error("the datapath is not running"));
        };
        Ok(dp.heartbeat()?.into_raw_fd())
    }

    #[getter]
    fn max_len(&self) -> u32 {
        self.config.max_len
    }

    fn stop(&self, py: Python<'_>) {
        let taken = self.running.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut dp) = taken {
            py.detach(move || dp.stop());
        }
    }

    #[getter]
    fn running(&self) -> bool {
        self.running.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    #[getter]
    fn reject_mark(&self) -> u32 {
        self.config.layout.reject_mark()
    }

    #[getter]
    fn max_backend_id(&self) -> u32 {
        self.config.layout.max_backend_id()
    }

    fn stats(&self) -> std::collections::HashMap<String, u64> {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let mut m = std::collections::HashMap::new();
        if let Some(dp) = running.as_ref() {
            let s = dp.stats();
            for (k, v) in [
                ("packets", s.packets),
                ("verdicts", s.verdicts),
                ("dropped", s.drops),
                ("errors", s.errors),
                ("enobufs", s.enobufs),
                ("batches", s.batches),
                ("sends", s.sends),
            ] {
                m.insert(k.to_string(), v);
            }
            let v = dp.verdicts();
            for (k, c) in [
                ("forwarded", &v.forwarded),
                ("passed", &v.passed),
                ("rejected", &v.rejected),
                ("decision_drops", &v.dropped),
                ("id_overflow", &v.id_overflow),
            ] {
                m.insert(k.to_string(), c.load(Ordering::Relaxed));
            }
            m.insert("accepted".into(), s.verdicts.saturating_sub(s.drops));
        }
        // The kernel's view of our queues: packets it dropped for a full queue or a
        // failed delivery to user space.
        if let Ok(kernel) = KernelQueueStats::read() {
            let ours = |q: u16| q >= self.config.first_queue && q <= self.config.last_queue;
            let (mut full, mut user) = (0u64, 0u64);
            for k in kernel.iter().filter(|k| ours(k.queue)) {
                full += u64::from(k.queue_dropped);
                user += u64::from(k.user_dropped);
            }
            m.insert("kernel_queue_dropped".into(), full);
            m.insert("kernel_user_dropped".into(), user);
        }
        m
    }
}

/// Hold the queue sockets `sockets` ((fd, queue), owned from here on) until the pipe
/// `parent` (its read end; owned too) reaches end of file, then accept what still waits
/// and close: the queue keeper process of a reader that may be killed (SIGKILL).
///
/// With `heartbeat` (the read end of `NfqueueDatapath.heartbeat()`, owned too) it
/// also hands the queues over while the readers stop beating (stalled) and gives them back
/// (`max_len`) when they beat again.
#[pyfunction]
#[pyo3(signature = (sockets, parent, heartbeat = None, max_len = 4096))]
fn queue_keeper(
    py: Python<'_>,
    sockets: Vec<(i32, u16)>,
    parent: i32,
    heartbeat: Option<i32>,
    max_len: u32,
) {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: the caller hands these descriptors over; nothing else closes them.
    let sockets = sockets
        .into_iter()
        .map(|(fd, q)| {
            (crate::datapath::nfqueue::NfqSocket::from_fd(unsafe { OwnedFd::from_raw_fd(fd) }), q)
        })
        .collect();
    // SAFETY: as above.
    let parent = unsafe { OwnedFd::from_raw_fd(parent) };
    // SAFETY: as above.
    let heartbeat = heartbeat.map(|fd| unsafe { OwnedFd::from_raw_fd(fd) });
    py.detach(move || crate::datapath::nfqueue::keep_queues(sockets, parent, heartbeat, max_len));
}

/// `pykp-loadgen ARGS...` (`pykp bench`'s load generator) in this process, GIL released:
/// the wheel's `pykp-loadgen` command, so that a user of the wheel needs no cargo build.
#[pyfunction]
fn loadgen_main(py: Python<'_>, args: Vec<String>) {
    py.detach(|| loadgen::run(&args));
}

#[pymodule]
fn _fastpath(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("POLICIES", pyo3::types::PyTuple::new(m.py(), PolicyKind::ALL.map(|p| p.as_str()))?)?;
    m.add_class::<Frontend>()?;
    m.add_class::<Backend>()?;
    m.add_class::<ServiceUpdate>()?;
    m.add_class::<StagedChange>()?;
    m.add_class::<Decision>()?;
    m.add_class::<Connection>()?;
    m.add_class::<Engine>()?;
    m.add_class::<NfqueueDatapath>()?;
    m.add_function(wrap_pyfunction!(loadgen_main, m)?)?;
    m.add_function(wrap_pyfunction!(queue_keeper, m)?)?;
    Ok(())
}
