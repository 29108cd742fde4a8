//! `explain(engine, ...)`: the engine's dry run for a would-be connection, as plain values.

use std::net::IpAddr;
use std::str::FromStr;

use pyo3::exceptions::PyKeyError;
use pyo3::prelude::*;

use super::engine::Engine;
use super::{now_nanos, parse_ip, parse_port, sock, value_error};
use crate::engine::Source;
use crate::explain::{ExplainError, Outcome, PolicyView, Probe, Target};
use crate::flow::{Protocol, NANOS_PER_SEC};
use crate::service::Frontend;

fn seconds(n: u64) -> f64 {
    n as f64 / NANOS_PER_SEC as f64
}

#[pyclass(frozen, get_all, module = "pykp._fastpath")]
#[derive(Clone)]
pub struct ExplainedBackend {
    ip: String,
    port: u16,
    id: u32,
    weight: u32,
    ready: bool,
    serving: bool,
    terminating: bool,
    local: bool,
    /// In the pool the policy chooses from.
    eligible: bool,
    /// Why (not): "ready", "terminating-fallback", "terminating", "not-serving",
    /// "not-ready", "weight-0", "other-family".
    reason: &'static str,
    active: u32,
    maglev_slots: Option<u32>,
}

#[pyclass(frozen, get_all, module = "pykp._fastpath")]
#[derive(Clone)]
pub struct ExplainedAffinity {
    backend: (String, u16),
    expires_in: f64,
    in_pool: bool,
}

#[pyclass(frozen, get_all, module = "pykp._fastpath")]
#[derive(Clone)]
pub struct ExplainedFlow {
    backend: (String, u16),
    state: &'static str,
    expires_in: f64,
    kept: bool,
}

#[pyclass(frozen, get_all, module = "pykp._fastpath")]
pub struct Explanation {
    service: String,
    policy: &'static str,
    hash_key: Option<&'static str>,
    affinity_timeout: Option<f64>,
    frontends: Vec<(String, u16, &'static str)>,
    frontend: Option<(String, u16, &'static str)>,
    backends: Vec<ExplainedBackend>,
    fallback: bool,
    round_robin_ticket: Option<u64>,
    round_robin_cycle: Option<usize>,
    maglev_table_size: Option<usize>,
    maglev_slot: Option<usize>,
    policy_choice: Option<(String, u16)>,
    affinity: Option<ExplainedAffinity>,
    flow: Option<ExplainedFlow>,
    backend: Option<(String, u16)>,
    decided_by: &'static str,
    note: Option<&'static str>,
    short_circuited_from: Option<String>,
}

fn frontend_tuple(f: &Frontend) -> (String, u16, &'static str) {
    (f.addr.to_string(), f.port, f.proto.as_str())
}

/// What a new connection to a service (by `service` name or `frontend`) from `client`
/// would get now, and why; changes nothing in the engine.
#[pyfunction]
#[pyo3(signature = (engine, *, service = None, frontend = None, client = None, client_port = None, now = None, from_cluster = false))]
#[allow(clippy::too_many_arguments)]
pub fn explain(
    py: Python<'_>,
    engine: &Engine,
    service: Option<String>,
    frontend: Option<(String, i64, String)>,
    client: Option<&str>,
    client_port: Option<i64>,
    now: Option<f64>,
    from_cluster: bool,
) -> PyResult<Explanation> {
    let target = match (service, frontend) {
        (Some(name), None) => Target::Name(name),
        (None, Some((ip, port, proto))) => Target::Frontend(Frontend {
            addr: parse_ip(&ip)?,
            port: parse_port(port, "frontend")?,
            proto: Protocol::from_str(&proto).map_err(value_error)?,
        }),
        _ => return Err(value_error("give a service name or a frontend, not both")),
    };
    let client: Option<IpAddr> = client.map(parse_ip).transpose()?;
    let client_port = match (client, client_port) {
        (_, None) => None,
        (Some(_), Some(p)) => Some(parse_port(p, "client")?),
        (None, Some(_)) => return Err(value_error("a client port needs a client address")),
    };
    let now = now_nanos(py, now)?;
    let source = if from_cluster { Source::Cluster } else { Source::Outside };
    let probe = Probe { target, client, client_port, source };
    let x = py.detach(|| engine.core.explain(&probe, now)).map_err(|e| match e {
        ExplainError::UnknownService(_) | ExplainError::UnknownFrontend(_) => {
            PyKeyError::new_err(e.to_string())
        }
        ExplainError::FamilyMismatch { .. } => value_error(e),
    })?;
    let (ticket, cycle) = match x.policy {
        PolicyView::RoundRobin { ticket, cycle } => (Some(ticket), Some(cycle)),
        _ => (None, None),
    };
    let (table_size, slot, hash_key) = match x.policy {
        PolicyView::Maglev { table_size, slot, hash_key } => {
            (Some(table_size), slot, Some(hash_key.as_str()))
        }
        _ => (None, None, None),
    };
    let (backend, decided_by, note) = match &x.outcome {
        Outcome::Forward { backend, by } => (Some(sock(backend.addr)), by.as_str(), None),
        Outcome::Reject => (None, "reject", None),
        Outcome::Undetermined(why) => (None, "undetermined", Some(*why)),
    };
    Ok(Explanation {
        service: x.service.name.to_string(),
        policy: x.service.policy.as_str(),
        hash_key,
        affinity_timeout: x.service.affinity_timeout.map(seconds),
        frontends: x.service.frontends.iter().map(frontend_tuple).collect(),
        frontend: x.frontend.as_ref().map(frontend_tuple),
        backends: x
            .backends
            .iter()
            .map(|b| ExplainedBackend {
                ip: b.handle.addr.ip().to_string(),
                port: b.handle.addr.port(),
                id: b.handle.id.0,
                weight: b.weight,
                ready: b.conditions.ready,
                serving: b.conditions.serving,
                terminating: b.conditions.terminating,
                local: b.local,
                eligible: b.eligibility.eligible(),
                reason: b.eligibility.as_str(),
                active: b.active,
                maglev_slots: b.maglev_slots,
            })
            .collect(),
        fallback: x.fallback,
        round_robin_ticket: ticket,
        round_robin_cycle: cycle,
        maglev_table_size: table_size,
        maglev_slot: slot,
        policy_choice: x.policy_choice.as_ref().map(|b| sock(b.addr)),
        affinity: x.affinity.as_ref().map(|a| ExplainedAffinity {
            backend: sock(a.backend.addr),
            expires_in: seconds(a.expires_in),
            in_pool: a.in_pool,
        }),
        flow: x.flow.as_ref().map(|f| ExplainedFlow {
            backend: sock(f.backend.addr),
            state: f.state.as_str(),
            expires_in: seconds(f.expires_in),
            kept: f.kept,
        }),
        backend,
        decided_by,
        note,
        short_circuited_from: x.short_circuited_from.as_deref().map(str::to_string),
    })
}
