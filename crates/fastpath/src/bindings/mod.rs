//! PyO3 bindings: `pykp._fastpath`. Thin by design: argument conversion, then the core,
//! with the GIL released around the core's work. The stub is `pykp/_fastpath.pyi`.
//!
//! One file per class or group: [`values`] (what Python passes in and gets back),
//! [`engine`], [`explain`] (a dry run of a decision), [`staged`] (a batch between stage
//! and commit), [`datapath`] (NFQUEUE and its queue keeper), [`follower`] (the kernel's
//! conntrack events), [`loadgen`], [`afpacket`] (the AF_PACKET load balancer),
//! [`nft_elements`] (set elements in netlink form, for the rules' bulk loads).

mod afpacket;
mod datapath;
mod engine;
mod explain;
mod follower;
mod loadgen;
mod nft_elements;
mod staged;
mod values;

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::flow::{Nanos, NANOS_PER_SEC};
use crate::policy::PolicyKind;

use afpacket::AfpacketDatapath;
use datapath::{queue_keeper, NfqueueDatapath};
use engine::Engine;
use explain::{ExplainedAffinity, ExplainedBackend, ExplainedFlow, Explanation};
use follower::{kernel_flows, ConntrackFollower, KernelFlow};
use loadgen::loadgen_main;
use nft_elements::encode_elements;
use staged::StagedChange;
use values::{Backend, Connection, Decision, Frontend, ServiceUpdate};

pub(crate) fn value_error(msg: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(msg.to_string())
}

pub(crate) fn parse_ip(s: &str) -> PyResult<IpAddr> {
    IpAddr::from_str(s).map_err(|_| value_error(format!("{s:?} is not an IP address")))
}

pub(crate) fn parse_port(p: i64, what: &str) -> PyResult<u16> {
    u16::try_from(p)
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| value_error(format!("{what} port {p} is out of range 1..65535")))
}

pub(crate) fn parse_seconds(s: f64, what: &str) -> PyResult<Nanos> {
    if !(0.0..=1e9).contains(&s) {
        return Err(value_error(format!("{what} {s} must be a non-negative number of seconds")));
    }
    Ok((s * NANOS_PER_SEC as f64) as Nanos)
}

/// `now` in seconds, or the monotonic clock Python's `time.monotonic()` reads.
pub(crate) fn now_nanos(py: Python<'_>, now: Option<f64>) -> PyResult<Nanos> {
    match now {
        Some(s) => parse_seconds(s, "now"),
        None => {
            let t: f64 = py.import("time")?.call_method0("monotonic")?.extract()?;
            parse_seconds(t, "now")
        }
    }
}

pub(crate) fn sock(a: SocketAddr) -> (String, u16) {
    (a.ip().to_string(), a.port())
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
    m.add_class::<AfpacketDatapath>()?;
    m.add_class::<ConntrackFollower>()?;
    m.add_class::<KernelFlow>()?;
    m.add_function(wrap_pyfunction!(kernel_flows, m)?)?;
    m.add_function(wrap_pyfunction!(loadgen_main, m)?)?;
    m.add_function(wrap_pyfunction!(queue_keeper, m)?)?;
    m.add_function(wrap_pyfunction!(encode_elements, m)?)?;
    m.add_class::<Explanation>()?;
    m.add_class::<ExplainedBackend>()?;
    m.add_class::<ExplainedAffinity>()?;
    m.add_class::<ExplainedFlow>()?;
    m.add_function(wrap_pyfunction!(explain::explain, m)?)?;
    Ok(())
}
