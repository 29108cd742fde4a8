//! The value types: what Python passes in (frontends, backends, service updates) and gets
//! back (decisions, connections).

use std::net::SocketAddr;
use std::str::FromStr;

use pyo3::prelude::*;

use super::{parse_ip, parse_port, parse_seconds, value_error};
use crate::flow::Protocol;
use crate::policy::{HashKey, PolicyKind};
use crate::service::{BackendSpec, Conditions, Frontend as CoreFrontend, ServiceSpec};

#[pyclass(frozen, from_py_object, module = "pykp._fastpath")]
#[derive(Clone)]
pub struct Frontend {
    pub(super) inner: CoreFrontend,
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
    pub(super) inner: BackendSpec,
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
    pub(super) spec: ServiceSpec,
    /// As given, for the getter (the spec holds nanoseconds).
    affinity_timeout: Option<f64>,
}

impl ServiceUpdate {
    pub(super) fn build(
        name: String,
        frontends: Vec<Frontend>,
        backends: Vec<Backend>,
        policy: Option<&str>,
        affinity_timeout: Option<f64>,
        hash_key: Option<&str>,
        short_circuit: Option<String>,
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
            short_circuit,
        };
        Ok(ServiceUpdate { spec, affinity_timeout })
    }
}

#[pymethods]
impl ServiceUpdate {
    #[new]
    #[pyo3(signature = (name, frontends, backends, *, policy = None, affinity_timeout = None, hash_key = None, short_circuit = None))]
    fn new(
        name: String,
        frontends: Vec<Frontend>,
        backends: Vec<Backend>,
        policy: Option<&str>,
        affinity_timeout: Option<f64>,
        hash_key: Option<&str>,
        short_circuit: Option<String>,
    ) -> PyResult<Self> {
        ServiceUpdate::build(
            name,
            frontends,
            backends,
            policy,
            affinity_timeout,
            hash_key,
            short_circuit,
        )
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
    #[getter]
    fn short_circuit(&self) -> Option<String> {
        self.spec.short_circuit.clone()
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

#[pyclass(frozen, module = "pykp._fastpath")]
pub struct Decision {
    pub(super) action: &'static str,
    pub(super) reason: Option<&'static str>,
    pub(super) service: Option<String>,
    pub(super) backend: Option<(String, u16)>,
    pub(super) backend_id: Option<u32>,
    pub(super) new_flow: bool,
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
    pub(super) protocol: &'static str,
    pub(super) client: (String, u16),
    pub(super) frontend: (String, u16),
    pub(super) backend: (String, u16),
    pub(super) service: String,
    pub(super) state: &'static str,
    pub(super) expires_in: f64,
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
