//! `AfpacketDatapath`: the AF_PACKET load balancer's worker threads on one interface.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use pyo3::prelude::*;

use super::engine::Engine;
use super::{parse_ip, value_error};
use crate::datapath::afpacket::{
    interface_info, Forwarding, LbConfig, LbWorkers, Neighbours, WorkerConfig,
};
use crate::engine::Engine as CoreEngine;
use crate::wire::MacAddr;

fn parse_mac(s: &str) -> PyResult<MacAddr> {
    s.parse().map_err(value_error)
}

/// The AF_PACKET load balancer: Rust threads reading `interface`'s frames, deciding with the
/// engine and sending each VIP packet to its backend in IP-in-IP, or to the backend's MAC
/// as it is (`forwarding="l2-dsr"`): direct server return either way.
#[pyclass(frozen, module = "pykp._fastpath")]
pub struct AfpacketDatapath {
    engine: Arc<CoreEngine>,
    interface: String,
    workers: usize,
    qdisc_bypass: bool,
    address: IpAddr,
    vips: Vec<IpAddr>,
    neighbours: Vec<(IpAddr, MacAddr)>,
    gateway_mac: Option<MacAddr>,
    forwarding: Forwarding,
    running: Mutex<Option<LbWorkers>>,
}

#[pymethods]
impl AfpacketDatapath {
    #[new]
    #[pyo3(signature = (engine, interface, address, vips, *, neighbours = HashMap::new(), gateway_mac = None, workers = 1, qdisc_bypass = true, forwarding = "ipip"))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        engine: &Engine,
        interface: String,
        address: &str,
        vips: Vec<String>,
        neighbours: HashMap<String, String>,
        gateway_mac: Option<String>,
        workers: usize,
        qdisc_bypass: bool,
        forwarding: &str,
    ) -> PyResult<Self> {
        let forwarding = match forwarding {
            "ipip" => Forwarding::IpIp,
            "l2-dsr" => Forwarding::L2Dsr,
            other => return Err(value_error(format!("forwarding {other:?}: ipip or l2-dsr"))),
        };
        if workers == 0 || workers > 256 {
            return Err(value_error("workers must be between 1 and 256"));
        }
        let neighbours = neighbours
            .iter()
            .map(|(ip, mac)| Ok((parse_ip(ip)?, parse_mac(mac)?)))
            .collect::<PyResult<Vec<_>>>()?;
        Ok(AfpacketDatapath {
            engine: engine.core.clone(),
            interface,
            workers,
            qdisc_bypass,
            address: parse_ip(address)?,
            vips: vips.iter().map(|v| parse_ip(v)).collect::<PyResult<_>>()?,
            neighbours,
            gateway_mac: gateway_mac.as_deref().map(parse_mac).transpose()?,
            forwarding,
            running: Mutex::new(None),
        })
    }

    /// Open the interface's sockets in the caller's network namespace and start the threads.
    /// The lock is not held while the GIL is released (see `NfqueueDatapath.start`).
    fn start(&self, py: Python<'_>) -> PyResult<()> {
        if self.running.lock().unwrap_or_else(|p| p.into_inner()).is_some() {
            return Ok(());
        }
        let info = interface_info(&self.interface)?;
        let mut lb = LbConfig::new(info.mac, info.mtu);
        match self.address {
            IpAddr::V4(a) => lb.ipv4 = Some(a),
            IpAddr::V6(a) => lb.ipv6 = Some(a),
        }
        lb.vips = self.vips.iter().copied().collect();
        lb.forwarding = self.forwarding;
        lb.neighbours = Neighbours::new(self.gateway_mac);
        for (ip, mac) in &self.neighbours {
            lb.neighbours.insert(*ip, *mac);
        }
        let mut cfg = WorkerConfig::new(&self.interface, self.workers);
        cfg.qdisc_bypass = self.qdisc_bypass;
        let engine = self.engine.clone();
        let started = py.detach(move || LbWorkers::start(&cfg, engine, Arc::new(lb)))?;
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if running.is_none() {
            *running = Some(started);
        } else {
            drop(running);
            let mut extra = started;
            py.detach(move || extra.stop());
        }
        Ok(())
    }

    fn stop(&self, py: Python<'_>) {
        let taken = self.running.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut w) = taken {
            py.detach(move || w.stop());
        }
    }

    #[getter]
    fn running(&self) -> bool {
        self.running.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// Every worker's counters added up (empty when not running).
    fn stats(&self) -> HashMap<String, u64> {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        running.as_ref().map(|w| w.total().into_iter().collect()).unwrap_or_default()
    }
}
