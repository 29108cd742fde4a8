//! `StagedChange`: a batch between `Engine.stage` and `Engine.commit`, and its report.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use pyo3::prelude::*;

use super::sock;
use crate::service::{BackendId, BatchReport, PoolIds, ServiceState, Staged};

pub(super) type PoolPairs = (Vec<(u32, u32)>, Vec<(u32, u32)>);

pub(super) fn pool_pairs(s: &ServiceState) -> PoolPairs {
    let (v4, v6) = s.pool_ids();
    let pairs = |p: PoolIds| p.into_iter().map(|(id, w)| (id.0, w)).collect();
    (pairs(v4), pairs(v6))
}

/// A batch staged by `Engine.stage` (or applied by `Engine.apply`): what it does, and,
/// until `Engine.commit`, the change itself.
#[pyclass(frozen, module = "pykp._fastpath")]
pub struct StagedChange {
    report: BatchReport,
    pub(super) staged: Mutex<Option<Staged>>,
    // The accepted upserts by name, for `pool` (rendering reads them one at a time).
    accepted: HashMap<Arc<str>, usize>,
}

impl StagedChange {
    pub(super) fn new(report: BatchReport, staged: Option<Staged>) -> Self {
        let accepted =
            report.accepted.iter().enumerate().map(|(i, s)| (s.name.clone(), i)).collect();
        StagedChange { report, staged: Mutex::new(staged), accepted }
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
    /// One accepted upsert's pools (None if `name` is not one): `pools` without making
    /// them all at once.
    fn pool(&self, name: &str) -> Option<PoolPairs> {
        self.accepted.get(name).map(|&i| pool_pairs(&self.report.accepted[i]))
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
