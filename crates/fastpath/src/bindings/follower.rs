//! `ConntrackFollower` and `kernel_flows`: the kernel's conntrack as the engine's source of
//! truth for live flows, and the listing behind `pykp flows`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;

use pyo3::exceptions::PyOSError;
use pyo3::prelude::*;

use super::engine::Engine;
use super::{now_nanos, parse_seconds, sock, value_error};
use crate::datapath::ctnetlink::codec::tcp_state_name;
use crate::datapath::ctnetlink::{
    list_kernel_flows, ConntrackFollower as CoreFollower, FollowerConfig,
};
use crate::engine::Engine as CoreEngine;
use crate::flow::{Protocol, NANOS_PER_SEC};
use crate::service::Frontend;

/// Follows the kernel's conntrack events (and lists its table now and then) to keep the
/// engine's connection table equal to the kernel's live service flows.
#[pyclass(frozen, module = "pykp._fastpath")]
pub struct ConntrackFollower {
    engine: std::sync::Arc<CoreEngine>,
    config: FollowerConfig,
    running: Mutex<Option<CoreFollower>>,
}

#[pymethods]
impl ConntrackFollower {
    #[new]
    #[pyo3(signature = (engine, *, resync_interval = 30.0, grace = 2.0, closing_mark = 0))]
    fn new(engine: &Engine, resync_interval: f64, grace: f64, closing_mark: u32) -> PyResult<Self> {
        if !(0.1..=86_400.0).contains(&resync_interval) {
            return Err(value_error("resync_interval must be between 0.1 and 86400 seconds"));
        }
        let grace = parse_seconds(grace, "grace")?;
        Ok(ConntrackFollower {
            engine: engine.core.clone(),
            config: FollowerConfig {
                resync_interval: std::time::Duration::from_secs_f64(resync_interval),
                grace,
                closing_mark,
                ..FollowerConfig::default()
            },
            running: Mutex::new(None),
        })
    }

    /// Subscribe in the caller's network namespace and start the thread.
    fn start(&self) -> PyResult<()> {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if running.is_some() {
            return Err(value_error("the follower is already running"));
        }
        let follower = CoreFollower::start(self.engine.clone(), self.config)
            .map_err(|e| PyOSError::new_err(format!("conntrack events: {e}")))?;
        *running = Some(follower);
        Ok(())
    }

    fn stop(&self, py: Python<'_>) {
        let taken = self.running.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut f) = taken {
            py.detach(move || f.stop());
        }
    }

    #[getter]
    fn running(&self) -> bool {
        self.running.lock().unwrap_or_else(|p| p.into_inner()).as_ref().is_some_and(|f| f.running())
    }

    fn stats(&self) -> HashMap<String, u64> {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        match running.as_ref() {
            Some(f) => f.counters().pairs().into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            None => HashMap::new(),
        }
    }
}

/// One service flow in the kernel's conntrack table (read-only attributes).
#[pyclass(frozen, get_all, module = "pykp._fastpath")]
pub struct KernelFlow {
    protocol: &'static str,
    client: (String, u16),
    frontend: (String, u16),
    backend: (String, u16),
    service: String,
    state: &'static str,
    timeout: Option<u32>,
    age: Option<f64>,
}

/// The kernel's conntrack entries (the caller's network namespace) whose original
/// destination is one of the engine's frontends, at most `limit`.
#[pyfunction]
#[pyo3(signature = (engine, limit = 1000))]
pub fn kernel_flows(py: Python<'_>, engine: &Engine, limit: usize) -> PyResult<Vec<KernelFlow>> {
    let now = now_nanos(py, None)?;
    let core = engine.core.clone();
    let flows = py
        .detach(list_kernel_flows)
        .map_err(|e| PyOSError::new_err(format!("listing the kernel's conntrack table: {e}")))?;
    let kernel_timeout = core.conntrack().config().kernel;
    // The engine's confirmed entries know when the kernel confirmed them.
    let ages: HashMap<_, f64> = py.detach(|| {
        core.conntrack()
            .snapshot(usize::MAX, now)
            .into_iter()
            .filter(|c| c.state == "KERNEL")
            .map(|c| {
                let age = kernel_timeout.saturating_sub(c.expires_in);
                (c.key, age as f64 / NANOS_PER_SEC as f64)
            })
            .collect()
    });
    let services = core.services();
    let mut out = Vec::new();
    for f in flows {
        if out.len() >= limit {
            break;
        }
        let k = f.original;
        let frontend = Frontend { addr: k.dst, port: k.dst_port, proto: k.proto };
        let Some(svc) = services.lookup(&frontend) else { continue };
        out.push(KernelFlow {
            protocol: k.proto.as_str(),
            client: sock(SocketAddr::new(k.src, k.src_port)),
            frontend: sock(SocketAddr::new(k.dst, k.dst_port)),
            backend: sock(f.reply_source),
            service: svc.name.to_string(),
            state: match (k.proto, f.tcp_state) {
                (Protocol::Tcp, Some(s)) => tcp_state_name(s),
                (p, _) => p.as_str(),
            },
            timeout: f.timeout,
            age: ages.get(&k).copied(),
        });
    }
    Ok(out)
}
