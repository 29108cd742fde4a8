//! The NFQUEUE node datapath: the engine's verdicts as packet marks.
//!
//! Only the first packet of a connection to a frontend reaches the queue. Its verdict names
//! the chosen backend in the packet mark (`id << shift` inside `backend_mask`); nftables
//! DNATs by looking the mark up in a map and conntrack carries the rest of the flow.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::mark::MarkLayout;
use super::sys::monotonic_nanos;
use super::{QueueConfig, QueueVerdict, QueueWorkers, WorkerStats};
use crate::engine::{Engine, Source, Verdict};

/// Verdicts the datapath gave, beyond the workers' own counters.
#[derive(Debug, Default)]
pub struct VerdictCounters {
    pub forwarded: AtomicU64,
    pub passed: AtomicU64,
    pub rejected: AtomicU64,
    pub dropped: AtomicU64,
    /// Backend ids beyond the mark field: passed unmarked (then refused by the rules).
    pub id_overflow: AtomicU64,
}

/// The engine's verdict for one queued packet, as a queue verdict.
///
/// The verdict's mark keeps the packet's bits outside the backend field (other programs'
/// marks, pykp's own queue bit), since the kernel replaces the whole mark with it.
pub fn queue_verdict(
    engine: &Engine,
    layout: &MarkLayout,
    counters: &VerdictCounters,
    packet: &[u8],
    packet_mark: u32,
    now: u64,
) -> QueueVerdict {
    let keep = packet_mark & !layout.backend_mask();
    let source = if layout.from_cluster(packet_mark) { Source::Cluster } else { Source::Outside };
    match engine.decide_packet_from(packet, source, now) {
        Verdict::Forward(f) => match layout.backend_mark(f.backend.id.0) {
            Some(mark) => {
                counters.forwarded.fetch_add(1, Ordering::Relaxed);
                QueueVerdict::accept_with_mark(keep | mark)
            }
            None => {
                counters.id_overflow.fetch_add(1, Ordering::Relaxed);
                QueueVerdict::ACCEPT
            }
        },
        Verdict::Pass(_) => {
            counters.passed.fetch_add(1, Ordering::Relaxed);
            QueueVerdict::ACCEPT
        }
        Verdict::Reject { .. } => {
            counters.rejected.fetch_add(1, Ordering::Relaxed);
            QueueVerdict::accept_with_mark(keep | layout.reject_mark())
        }
        Verdict::Drop(_) => {
            counters.dropped.fetch_add(1, Ordering::Relaxed);
            QueueVerdict::DROP
        }
    }
}

/// Settings of the NFQUEUE datapath.
#[derive(Clone, Copy, Debug)]
pub struct NfqueueConfig {
    pub first_queue: u16,
    pub last_queue: u16,
    pub layout: MarkLayout,
    pub fail_open: bool,
    /// Packets that may wait for a verdict: what a stalled reader holds up. Past it (and
    /// past the socket buffer), fail-open hands packets to the kernel's fallback path.
    pub max_len: u32,
}

/// Queue reader threads feeding the engine.
pub struct NfqueueDatapath {
    workers: QueueWorkers,
    counters: Arc<VerdictCounters>,
}

impl NfqueueDatapath {
    /// Bind the queues (in the calling thread's network namespace) and start the threads.
    pub fn start(engine: Arc<Engine>, cfg: NfqueueConfig) -> io::Result<Self> {
        let counters = Arc::new(VerdictCounters::default());
        let c = counters.clone();
        let layout = cfg.layout;
        let decide = Arc::new(move |packet: &[u8], mark: u32| {
            queue_verdict(&engine, &layout, &c, packet, mark, monotonic_nanos())
        });
        let queue_cfg = QueueConfig {
            // Whole packets: `wire::parse` checks the declared length against the bytes it
            // gets, and first packets (SYNs, first datagrams) are small anyway.
            copy_range: 0xffff,
            batch_size: 32,
            fail_open: cfg.fail_open,
            max_len: cfg.max_len,
            // Wake at least this often: the heartbeat a keeper watches for stalls.
            recv_timeout: std::time::Duration::from_millis(20),
            ..QueueConfig::queues(cfg.first_queue, cfg.last_queue)
        };
        let workers = QueueWorkers::start(&queue_cfg, decide)?;
        Ok(NfqueueDatapath { workers, counters })
    }

    pub fn stats(&self) -> WorkerStats {
        self.workers.total()
    }

    /// Duplicates of the bound queue sockets, for a [`crate::datapath::nfqueue::keep_queues`] process.
    pub fn dup_sockets(&self) -> io::Result<Vec<(std::os::fd::OwnedFd, u16)>> {
        self.workers.dup_sockets()
    }

    /// The read end of the readers' heartbeat pipe, for the same process.
    pub fn heartbeat(&mut self) -> io::Result<std::os::fd::OwnedFd> {
        self.workers.heartbeat()
    }

    pub fn verdicts(&self) -> &VerdictCounters {
        &self.counters
    }

    pub fn stop(&mut self) {
        self.workers.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::EngineConfig;
    use crate::flow::{FlowKey, Protocol};
    use crate::service::{BackendSpec, Conditions, Frontend, ServiceSpec};
    use crate::wire::PacketBuilder;

    #[test]
    fn verdicts_carry_the_backend_in_the_mark() {
        let engine = Engine::new(EngineConfig::default()).unwrap();
        let vip = "10.96.0.10".parse().unwrap();
        let mut spec = ServiceSpec {
            name: "default/web:http".into(),
            frontends: vec![Frontend { addr: vip, port: 80, proto: Protocol::Tcp }],
            backends: vec![BackendSpec {
                addr: "10.244.0.11:8080".parse().unwrap(),
                weight: 1,
                conditions: Conditions::READY,
                local: false,
            }],
            policy: None,
            affinity_timeout: None,
            hash_key: None,
            short_circuit: None,
        };
        let state = engine.upsert_service(&spec).unwrap();
        let id = state.backends[0].handle.id.0;
        let layout = MarkLayout::new(0xffff_0000).unwrap();
        let c = VerdictCounters::default();
        let key = FlowKey::new(Protocol::Tcp, "10.0.0.1".parse().unwrap(), 40000, vip, 80);
        let syn = PacketBuilder::new(key).build();
        let v = queue_verdict(&engine, &layout, &c, &syn, 0, 1);
        assert_eq!(v, QueueVerdict::accept_with_mark(id << 16));
        // Bits outside the backend field (pykp's queue bit, other programs' marks) stay; a
        // stale value inside it does not.
        let s2 = PacketBuilder::new(FlowKey { src_port: 40002, ..key }).build();
        let v = queue_verdict(&engine, &layout, &c, &s2, 0x0123_6001, 1);
        assert_eq!(v, QueueVerdict::accept_with_mark(0x6001 | id << 16));
        // No endpoints: the reject mark, which the rules turn into a TCP reset.
        spec.backends.clear();
        engine.upsert_service(&spec).unwrap();
        let other = PacketBuilder::new(FlowKey { src_port: 40001, ..key }).build();
        assert_eq!(
            queue_verdict(&engine, &layout, &c, &other, 0, 2),
            QueueVerdict::accept_with_mark(0xffff_0000)
        );
        // Garbage is dropped; a packet for no service passes unmarked.
        assert_eq!(queue_verdict(&engine, &layout, &c, &[0x45, 0], 0, 3), QueueVerdict::DROP);
        let stray = PacketBuilder::new(FlowKey { dst_port: 81, ..key }).build();
        assert_eq!(queue_verdict(&engine, &layout, &c, &stray, 0, 4), QueueVerdict::ACCEPT);
        assert_eq!(c.forwarded.load(Ordering::Relaxed), 2);
        assert_eq!(c.rejected.load(Ordering::Relaxed), 1);
        assert_eq!(c.dropped.load(Ordering::Relaxed), 1);
        assert_eq!(c.passed.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_packet_from_the_cluster_takes_the_short_circuit() {
        let engine = Engine::new(EngineConfig::default()).unwrap();
        let backend = |a: &str, local: bool| BackendSpec {
            addr: a.parse().unwrap(),
            weight: 1,
            conditions: Conditions::READY,
            local,
        };
        let frontend =
            |a: &str| Frontend { addr: a.parse().unwrap(), port: 80, proto: Protocol::Tcp };
        // externalTrafficPolicy Local on a node without a local endpoint: the external
        // frontend's service has none; the cluster-wide one has the remote endpoint.
        let cluster = ServiceSpec {
            name: "default/lb:http".into(),
            frontends: vec![frontend("10.96.0.10")],
            backends: vec![backend("10.244.1.11:8080", false)],
            policy: None,
            affinity_timeout: None,
            hash_key: None,
            short_circuit: None,
        };
        let external = ServiceSpec {
            name: "default/lb:http#external".into(),
            frontends: vec![frontend("203.0.113.10")],
            backends: vec![],
            short_circuit: Some("default/lb:http".into()),
            ..cluster.clone()
        };
        engine.upsert_service(&cluster).unwrap();
        engine.upsert_service(&external).unwrap();
        let layout = MarkLayout::new(0xffff_0000).unwrap().with_cluster_source_bit(0x1000).unwrap();
        let c = VerdictCounters::default();
        let key = |port| {
            FlowKey::new(
                Protocol::Tcp,
                "10.244.0.5".parse().unwrap(),
                port,
                "203.0.113.10".parse().unwrap(),
                80,
            )
        };
        let id = engine.services().get("default/lb:http").unwrap().backends[0].handle.id.0;
        // From outside: no local endpoint, refused (the rules drop it instead).
        let outside = PacketBuilder::new(key(40000)).build();
        assert_eq!(
            queue_verdict(&engine, &layout, &c, &outside, 0x2000, 1),
            QueueVerdict::accept_with_mark(0xffff_2000)
        );
        // From a pod (the rules' cluster-source bit): every endpoint of the port.
        let inside = PacketBuilder::new(key(40001)).build();
        assert_eq!(
            queue_verdict(&engine, &layout, &c, &inside, 0x3000, 1),
            QueueVerdict::accept_with_mark(0x3000 | id << 16)
        );
        // A bit outside the mark mask, and only one.
        assert!(MarkLayout::new(0xffff_0000).unwrap().with_cluster_source_bit(0x1_0000).is_err());
        assert!(MarkLayout::new(0xffff_0000).unwrap().with_cluster_source_bit(0x3000).is_err());
        assert!(MarkLayout::new(0xffff_0000).unwrap().with_cluster_source_bit(0x4000).is_err());
    }
}
