//! `NfqueueDatapath` and `queue_keeper`: the NFQUEUE datapath's threads and the process
//! that holds its queues when the reader dies or stalls.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use pyo3::prelude::*;

use super::engine::Engine;
use super::value_error;
use crate::datapath::nfqueue::KernelQueueStats;
use crate::datapath::nfqueue::{MarkLayout, NfqueueConfig, NfqueueDatapath as CoreNfqueue};
use crate::engine::Engine as CoreEngine;

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
    #[pyo3(signature = (engine, *, first_queue = 0, last_queue = 0, backend_mask = 0xffff_0000, fail_open = false, max_len = 4096, cluster_source_bit = 0))]
    fn new(
        engine: &Engine,
        first_queue: u16,
        last_queue: u16,
        backend_mask: u32,
        fail_open: bool,
        max_len: u32,
        cluster_source_bit: u32,
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
                layout: MarkLayout::new(backend_mask)
                    .and_then(|l| l.with_cluster_source_bit(cluster_source_bit))
                    .map_err(value_error)?,
                fail_open,
                max_len,
            },
            running: Mutex::new(None),
        })
    }

    /// Bind the queues in the caller's network namespace and start the threads.
    ///
    /// The lock on the running datapath is never held while the GIL is released: a thread
    /// that holds the GIL and waits for the lock (`stats()` from a metrics scrape) would
    /// otherwise deadlock with this one, which needs the GIL back to return.
    fn start(&self, py: Python<'_>) -> PyResult<()> {
        if self.running.lock().unwrap_or_else(|p| p.into_inner()).is_some() {
            return Ok(());
        }
        let (engine, config) = (self.engine.clone(), self.config);
        let started = py.detach(move || CoreNfqueue::start(engine, config))?;
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if running.is_none() {
            *running = Some(started);
        } else {
            // Another start won the race (the agent has one caller): keep the first.
            drop(running);
            let mut extra = started;
            py.detach(move || extra.stop());
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

    #[getter]
    fn fail_open(&self) -> bool {
        self.config.fail_open
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
/// (`max_len`, `fail_open`: the readers' settings) when they beat again.
#[pyfunction]
#[pyo3(signature = (sockets, parent, heartbeat = None, max_len = 4096, fail_open = false))]
pub(super) fn queue_keeper(
    py: Python<'_>,
    sockets: Vec<(i32, u16)>,
    parent: i32,
    heartbeat: Option<i32>,
    max_len: u32,
    fail_open: bool,
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
    py.detach(move || {
        crate::datapath::nfqueue::keep_queues(sockets, parent, heartbeat, max_len, fail_open)
    });
}
