//! The conntrack follower: one thread that listens to the kernel's conntrack events (new
//! and destroyed entries) and keeps the engine's connection table equal to the kernel's
//! live service flows, so per-backend active counts (least-connections, `/metrics`,
//! `pykp flows`) are the kernel's truth and a flow's end frees its count at once.
//!
//! Under NFQUEUE pykp sees only a connection's first packet; the kernel sees every one.
//! Lost events (a full socket buffer: `ENOBUFS`) are counted and repaired by listing the
//! whole table (a dump), as is every `resync_interval`.

use std::collections::HashSet;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::codec::{
    dump_request, messages, parse_message, tcp_state_is_closing, CtEventKind, CtFlow, CtMessage,
    NFNLGRP_CONNTRACK_DESTROY, NFNLGRP_CONNTRACK_NEW, NFNLGRP_CONNTRACK_UPDATE,
};
use crate::datapath::nfqueue::sys::{is_enobufs, monotonic_nanos};
use crate::datapath::nfqueue::{NfqSocket, RecvBatch};
use crate::engine::{Engine, KernelFlow};
use crate::flow::{Nanos, NANOS_PER_SEC};

/// Settings of the follower.
#[derive(Clone, Copy, Debug)]
pub struct FollowerConfig {
    /// List the whole table this often even when no event was lost.
    pub resync_interval: Duration,
    /// How old an entry the kernel never confirmed must be before a resync forgets it.
    pub grace: Nanos,
    /// Receive buffer of the event socket.
    pub rcvbuf: usize,
    /// The conntrack mark bit pykp's rules set on a service flow's first FIN or RST (0:
    /// none). Those rules also limit service flows' events to new, mark and destroy: three
    /// messages per connection instead of one per TCP state change.
    pub closing_mark: u32,
    /// After a read that emptied the socket, wait this long before the next: events
    /// arrive in batches (one wakeup per batch, not per event) at a small delay.
    pub coalesce: Duration,
}

impl Default for FollowerConfig {
    fn default() -> Self {
        FollowerConfig {
            resync_interval: Duration::from_secs(30),
            grace: 2 * NANOS_PER_SEC,
            rcvbuf: 8 << 20,
            closing_mark: 0,
            coalesce: Duration::from_millis(5),
        }
    }
}

/// What the follower saw and did.
#[derive(Debug, Default)]
pub struct FollowerCounters {
    /// NEW events received (every flow of the node, service or not).
    pub events_new: AtomicU64,
    /// UPDATE events received (TCP state changes, among others).
    pub events_update: AtomicU64,
    /// DESTROY events received.
    pub events_destroy: AtomicU64,
    /// Service flows the engine had decided, confirmed by the kernel.
    pub flows_confirmed: AtomicU64,
    /// Service flows the kernel decided (or that predate the engine), recorded.
    pub flows_adopted: AtomicU64,
    /// Service flows whose end (a FIN or RST, or the entry's destruction) freed their
    /// backend's count.
    pub flows_ended: AtomicU64,
    /// Times the kernel dropped events for a full socket buffer (each repaired by a dump).
    pub events_lost: AtomicU64,
    /// Full listings of the kernel's table.
    pub resyncs: AtomicU64,
    /// Engine entries a listing found gone from the kernel.
    pub resync_removed: AtomicU64,
    /// Messages that did not parse (counted and skipped).
    pub parse_errors: AtomicU64,
    /// Receive errors other than lost events.
    pub recv_errors: AtomicU64,
}

impl FollowerCounters {
    /// `(name, value)` of every counter, for exporting.
    pub fn pairs(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("events_new", self.events_new.load(Relaxed)),
            ("events_update", self.events_update.load(Relaxed)),
            ("events_destroy", self.events_destroy.load(Relaxed)),
            ("flows_confirmed", self.flows_confirmed.load(Relaxed)),
            ("flows_adopted", self.flows_adopted.load(Relaxed)),
            ("flows_ended", self.flows_ended.load(Relaxed)),
            ("events_lost", self.events_lost.load(Relaxed)),
            ("resyncs", self.resyncs.load(Relaxed)),
            ("resync_removed", self.resync_removed.load(Relaxed)),
            ("parse_errors", self.parse_errors.load(Relaxed)),
            ("recv_errors", self.recv_errors.load(Relaxed)),
        ]
    }
}

/// Apply one event to the engine (the sans-I/O half of the follower).
pub fn apply_event(
    engine: &Engine,
    counters: &FollowerCounters,
    flow: &CtFlow,
    closing_mark: u32,
    now: Nanos,
) {
    match flow.kind {
        CtEventKind::New => {
            counters.events_new.fetch_add(1, Relaxed);
            match engine.kernel_flow_started(&flow.original, flow.reply_source, now) {
                KernelFlow::Confirmed => counters.flows_confirmed.fetch_add(1, Relaxed),
                KernelFlow::Adopted => counters.flows_adopted.fetch_add(1, Relaxed),
                KernelFlow::Foreign => 0,
            };
        }
        CtEventKind::Update => {
            counters.events_update.fetch_add(1, Relaxed);
            // A FIN or RST ends the connection's active part: its count goes now, not when
            // the kernel drops the entry after TIME_WAIT (minutes later).
            if is_closing(flow, closing_mark) && engine.kernel_flow_ended(&flow.original) {
                counters.flows_ended.fetch_add(1, Relaxed);
            }
        }
        CtEventKind::Destroy => {
            counters.events_destroy.fetch_add(1, Relaxed);
            if engine.kernel_flow_ended(&flow.original) {
                counters.flows_ended.fetch_add(1, Relaxed);
            }
        }
    }
}

/// Whether a flow's connection is closing: a FIN or RST seen (a closing TCP state, or the
/// rules' closing mark). A closing connection no longer counts as active.
fn is_closing(flow: &CtFlow, closing_mark: u32) -> bool {
    flow.tcp_state.is_some_and(tcp_state_is_closing) || flow.mark & closing_mark != 0
}

/// Apply a full listing of the kernel's table: record what the engine lacks, forget what
/// the kernel no longer holds. Returns how many entries were forgotten.
pub fn apply_listing(
    engine: &Engine,
    counters: &FollowerCounters,
    flows: &[CtFlow],
    closing_mark: u32,
    grace: Nanos,
    now: Nanos,
) -> usize {
    let mut live = HashSet::with_capacity(flows.len());
    for f in flows.iter().filter(|f| !is_closing(f, closing_mark)) {
        live.insert(f.original);
        match engine.kernel_flow_started(&f.original, f.reply_source, now) {
            KernelFlow::Adopted => {
                counters.flows_adopted.fetch_add(1, Relaxed);
            }
            KernelFlow::Confirmed | KernelFlow::Foreign => {}
        }
    }
    let removed = engine.retain_kernel_flows(&live, grace, now);
    counters.resyncs.fetch_add(1, Relaxed);
    counters.resync_removed.fetch_add(removed as u64, Relaxed);
    removed
}

/// Every TCP, UDP and SCTP entry of the kernel's conntrack table (of the calling thread's
/// network namespace).
pub fn list_kernel_flows() -> io::Result<Vec<CtFlow>> {
    let sock = NfqSocket::open()?;
    sock.set_recv_timeout(Duration::from_secs(5))?;
    list_on(&sock, &mut vec![0u8; 1 << 16], &mut 0)
}

fn list_on(sock: &NfqSocket, buf: &mut [u8], parse_errors: &mut u64) -> io::Result<Vec<CtFlow>> {
    // A dump interrupted by a concurrent change of the table is restarted by the kernel
    // itself (NLM_F_DUMP_INTR is only a flag); entries are complete messages.
    sock.send(&dump_request(1))?;
    let mut out = Vec::new();
    loop {
        let n = sock.recv(buf)?;
        for m in messages(&buf[..n]) {
            let parsed = m.and_then(|(h, body)| parse_message(&h, body));
            match parsed {
                Ok(CtMessage::Flow(f)) => out.push(f),
                Ok(CtMessage::Done) => return Ok(out),
                Ok(CtMessage::Error(0)) => {}
                Ok(CtMessage::Error(errno)) => return Err(io::Error::from_raw_os_error(-errno)),
                Ok(CtMessage::OtherProtocol | CtMessage::Other) => {}
                Err(_) => *parse_errors += 1,
            }
        }
    }
}

/// The running follower thread.
pub struct ConntrackFollower {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    counters: Arc<FollowerCounters>,
}

impl std::fmt::Debug for ConntrackFollower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConntrackFollower").field("counters", &self.counters).finish()
    }
}

impl ConntrackFollower {
    /// Subscribe (in the calling thread's network namespace) and start the thread. Its
    /// first act is a full listing, so flows older than the engine are counted too.
    pub fn start(engine: Arc<Engine>, cfg: FollowerConfig) -> io::Result<ConntrackFollower> {
        let events = NfqSocket::open()?;
        events.join_group(NFNLGRP_CONNTRACK_NEW)?;
        events.join_group(NFNLGRP_CONNTRACK_UPDATE)?;
        events.join_group(NFNLGRP_CONNTRACK_DESTROY)?;
        events.set_rcvbuf(cfg.rcvbuf)?;
        // Wake up now and then to look at the stop flag and the resync clock.
        events.set_recv_timeout(Duration::from_millis(200))?;
        let dump = NfqSocket::open()?;
        dump.set_recv_timeout(Duration::from_secs(5))?;
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(FollowerCounters::default());
        let (s, c) = (stop.clone(), counters.clone());
        let thread = std::thread::Builder::new()
            .name("pykp-conntrack".into())
            .spawn(move || follow(&engine, &events, &dump, &cfg, &s, &c))?;
        Ok(ConntrackFollower { stop, thread: Some(thread), counters })
    }

    pub fn counters(&self) -> &FollowerCounters {
        &self.counters
    }

    pub fn running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stop the thread and wait for it (at most one receive timeout).
    pub fn stop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ConntrackFollower {
    fn drop(&mut self) {
        self.stop();
    }
}

fn follow(
    engine: &Engine,
    events: &NfqSocket,
    dump: &NfqSocket,
    cfg: &FollowerConfig,
    stop: &AtomicBool,
    counters: &FollowerCounters,
) {
    // Event messages are a few hundred bytes, one per datagram.
    let mut batch = RecvBatch::new(256, 4096);
    let mut dump_buf = vec![0u8; 1 << 16];
    let mut last_listing: Option<Instant> = None;
    let mut must_list = true;
    while !stop.load(Relaxed) {
        if must_list || last_listing.is_none_or(|t| t.elapsed() >= cfg.resync_interval) {
            let mut errors = 0;
            match list_on(dump, &mut dump_buf, &mut errors) {
                Ok(flows) => {
                    let now = monotonic_nanos();
                    apply_listing(engine, counters, &flows, cfg.closing_mark, cfg.grace, now);
                    must_list = false;
                }
                Err(_) => {
                    counters.recv_errors.fetch_add(1, Relaxed);
                }
            }
            counters.parse_errors.fetch_add(errors, Relaxed);
            last_listing = Some(Instant::now());
        }
        match events.recv_batch(&mut batch) {
            Ok(n) => {
                let now = monotonic_nanos();
                for i in 0..n {
                    let Some((datagram, _truncated)) = batch.get(i) else { continue };
                    for m in messages(datagram) {
                        match m.and_then(|(h, body)| parse_message(&h, body)) {
                            Ok(CtMessage::Flow(f)) => {
                                apply_event(engine, counters, &f, cfg.closing_mark, now)
                            }
                            Ok(_) => {}
                            Err(_) => {
                                counters.parse_errors.fetch_add(1, Relaxed);
                            }
                        }
                    }
                }
                if n < batch.capacity() {
                    std::thread::sleep(cfg.coalesce);
                }
            }
            Err(e) if is_enobufs(&e) => {
                counters.events_lost.fetch_add(1, Relaxed);
                must_list = true;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => {
                counters.recv_errors.fetch_add(1, Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{EngineConfig, Verdict};
    use crate::flow::{FlowKey, Protocol};
    use crate::policy::PolicyKind;
    use crate::service::{BackendSpec, Conditions, Frontend, ServiceSpec};

    const S: Nanos = NANOS_PER_SEC;

    fn on_event(engine: &Engine, c: &FollowerCounters, flow: &CtFlow, now: Nanos) {
        apply_event(engine, c, flow, 0, now)
    }

    fn on_listing(
        engine: &Engine,
        c: &FollowerCounters,
        flows: &[CtFlow],
        grace: Nanos,
        now: Nanos,
    ) -> usize {
        apply_listing(engine, c, flows, 0, grace, now)
    }

    fn engine_with(policy: PolicyKind, backends: &[&str]) -> Engine {
        let engine = Engine::new(EngineConfig::default()).unwrap();
        let spec = ServiceSpec {
            name: "default/web:http".into(),
            frontends: vec![Frontend {
                addr: "10.96.0.10".parse().unwrap(),
                port: 80,
                proto: Protocol::Tcp,
            }],
            backends: backends
                .iter()
                .map(|b| BackendSpec {
                    addr: b.parse().unwrap(),
                    weight: 1,
                    conditions: Conditions::READY,
                    local: false,
                })
                .collect(),
            policy: Some(policy),
            affinity_timeout: None,
            hash_key: None,
            short_circuit: None,
        };
        engine.upsert_service(&spec).unwrap();
        engine
    }

    fn key(port: u16) -> FlowKey {
        FlowKey::new(
            Protocol::Tcp,
            "10.244.0.101".parse().unwrap(),
            port,
            "10.96.0.10".parse().unwrap(),
            80,
        )
    }

    fn event(kind: CtEventKind, port: u16, backend: &str) -> CtFlow {
        CtFlow {
            kind,
            original: key(port),
            reply_source: backend.parse().unwrap(),
            timeout: None,
            mark: 0,
            tcp_state: None,
        }
    }

    fn syn(engine: &Engine, port: u16, now: Nanos) -> std::net::SocketAddr {
        match engine.decide_flow(&key(port), Some(crate::flow::TcpFlags(0x02)), now) {
            Verdict::Forward(f) => f.backend.addr,
            v => panic!("{v:?}"),
        }
    }

    fn active(engine: &Engine) -> Vec<u32> {
        let svc = engine.services().get("default/web:http").unwrap();
        svc.backends.iter().map(|b| b.handle.active()).collect()
    }

    #[test]
    fn a_flow_end_frees_its_least_conn_count_at_once() {
        let engine = engine_with(PolicyKind::LeastConn, &["10.244.0.11:80", "10.244.0.12:80"]);
        let c = FollowerCounters::default();
        let mut picked = Vec::new();
        for p in 0..10 {
            let b = syn(&engine, 40000 + p, S);
            on_event(&engine, &c, &event(CtEventKind::New, 40000 + p, &b.to_string()), S);
            picked.push(b);
        }
        assert_eq!(active(&engine), [5, 5]);
        // Every flow on .11 ends: its count drops to 0 now, not after a table timeout.
        for (p, b) in picked.iter().enumerate() {
            if b.to_string() == "10.244.0.11:80" {
                let e = event(CtEventKind::Destroy, 40000 + p as u16, &b.to_string());
                on_event(&engine, &c, &e, 2 * S);
            }
        }
        assert_eq!(active(&engine), [0, 5]);
        assert_eq!(c.flows_confirmed.load(Relaxed), 10);
        assert_eq!(c.flows_ended.load(Relaxed), 5);
        // So the next five new connections all go to .11.
        for p in 100..105 {
            assert_eq!(syn(&engine, p, 3 * S).to_string(), "10.244.0.11:80");
        }
    }

    #[test]
    fn a_fin_frees_the_count_before_the_entry_dies() {
        let engine = engine_with(PolicyKind::LeastConn, &["10.244.0.11:80"]);
        let c = FollowerCounters::default();
        let b = syn(&engine, 1, S).to_string();
        on_event(&engine, &c, &event(CtEventKind::New, 1, &b), S);
        let mut established = event(CtEventKind::Update, 1, &b);
        established.tcp_state = Some(3);
        on_event(&engine, &c, &established, S);
        assert_eq!(active(&engine), [1]);
        let mut fin = established;
        fin.tcp_state = Some(4); // FIN_WAIT
        on_event(&engine, &c, &fin, 2 * S);
        assert_eq!(active(&engine), [0]);
        // Later TIME_WAIT and DESTROY events change nothing more.
        fin.tcp_state = Some(7);
        on_event(&engine, &c, &fin, 3 * S);
        on_event(&engine, &c, &event(CtEventKind::Destroy, 1, &b), 4 * S);
        assert_eq!(c.flows_ended.load(Relaxed), 1);
        assert_eq!(c.events_update.load(Relaxed), 3);
        // A listing that still finds it in TIME_WAIT does not count it again.
        let mut listed = event(CtEventKind::Update, 1, &b);
        listed.tcp_state = Some(7);
        on_listing(&engine, &c, &[listed], 2 * S, 5 * S);
        assert_eq!(active(&engine), [0]);
    }

    #[test]
    fn the_rules_closing_mark_ends_a_flow_without_state_events() {
        let engine = engine_with(PolicyKind::LeastConn, &["10.244.0.11:80"]);
        let c = FollowerCounters::default();
        let b = syn(&engine, 1, S).to_string();
        apply_event(&engine, &c, &event(CtEventKind::New, 1, &b), 0x2000, S);
        let mut marked = event(CtEventKind::Update, 1, &b);
        marked.mark = 0x2000 | 0x0100; // other bits of the ct mark are someone else's
        apply_event(&engine, &c, &marked, 0x2000, 2 * S);
        assert_eq!(active(&engine), [0]);
        // A listing of a marked (closing) flow does not count it either.
        assert_eq!(apply_listing(&engine, &c, &[marked], 0x2000, 2 * S, 3 * S), 0);
        assert_eq!(active(&engine), [0]);
        // Without the closing mark in the config, the mark means nothing.
        let b2 = syn(&engine, 2, 4 * S).to_string();
        apply_event(&engine, &c, &event(CtEventKind::New, 2, &b2), 0, 4 * S);
        let mut other = event(CtEventKind::Update, 2, &b2);
        other.mark = 0x2000;
        apply_event(&engine, &c, &other, 0, 5 * S);
        assert_eq!(active(&engine), [1]);
    }

    #[test]
    fn confirmed_flows_outlive_the_syn_timeout_and_kernel_flows_are_adopted() {
        let engine = engine_with(PolicyKind::LeastConn, &["10.244.0.11:80", "10.244.0.12:80"]);
        let c = FollowerCounters::default();
        let b = syn(&engine, 1, S);
        on_event(&engine, &c, &event(CtEventKind::New, 1, &b.to_string()), S);
        // A flow the kernel balanced on its own (the agent was away).
        on_event(&engine, &c, &event(CtEventKind::New, 2, "10.244.0.12:80"), S);
        // A flow to no service, and one to an address the service does not have.
        let mut other = event(CtEventKind::New, 3, "10.0.0.9:80");
        other.original.dst = "192.0.2.7".parse().unwrap();
        on_event(&engine, &c, &other, S);
        on_event(&engine, &c, &event(CtEventKind::New, 4, "10.244.0.99:80"), S);
        assert_eq!(c.flows_confirmed.load(Relaxed), 1);
        assert_eq!(c.flows_adopted.load(Relaxed), 1);
        assert_eq!(engine.conntrack().len(), 2);
        // Ten minutes later (past SYN_SENT's 120 s) both are still counted.
        engine.expire(600 * S, 1 << 20);
        assert_eq!(active(&engine).iter().sum::<u32>(), 2);
        // A destroy for a flow the engine never held changes nothing.
        on_event(&engine, &c, &event(CtEventKind::Destroy, 9, "10.244.0.11:80"), S);
        assert_eq!(c.flows_ended.load(Relaxed), 0);
    }

    #[test]
    fn a_listing_repairs_lost_events() {
        let engine = engine_with(PolicyKind::RoundRobin, &["10.244.0.11:80", "10.244.0.12:80"]);
        let c = FollowerCounters::default();
        let b1 = syn(&engine, 1, S);
        on_event(&engine, &c, &event(CtEventKind::New, 1, &b1.to_string()), S);
        let b2 = syn(&engine, 2, S); // confirmed, but the event was lost
        let _b3 = syn(&engine, 3, S); // its SYN never made a kernel entry
        let b4 = syn(&engine, 4, 10 * S); // too young to judge
        assert_eq!(engine.conntrack().len(), 4);
        // The kernel now holds flow 2 (and 4); flow 1 ended and its DESTROY was lost.
        let listing = [
            event(CtEventKind::New, 2, &b2.to_string()),
            event(CtEventKind::New, 5, "10.244.0.12:80"),
        ];
        let removed = on_listing(&engine, &c, &listing, 2 * S, 11 * S);
        assert_eq!(removed, 2, "flow 1 (ended) and flow 3 (never confirmed)");
        let _ = b4;
        let keys: HashSet<u16> =
            engine.conntrack().snapshot(100, 11 * S).iter().map(|s| s.key.src_port).collect();
        assert_eq!(keys, HashSet::from([2, 4, 5]));
        assert_eq!(c.flows_adopted.load(Relaxed), 1);
        assert_eq!(c.resync_removed.load(Relaxed), 2);
    }

    #[test]
    fn a_kernel_entry_met_by_a_new_syn_is_decided_again() {
        let engine = engine_with(PolicyKind::RoundRobin, &["10.244.0.11:80", "10.244.0.12:80"]);
        let c = FollowerCounters::default();
        let b = syn(&engine, 1, S);
        on_event(&engine, &c, &event(CtEventKind::New, 1, &b.to_string()), S);
        // The kernel queued a SYN on that tuple: it holds no flow there any more.
        let again = syn(&engine, 1, 2 * S);
        assert_ne!(again, b, "round-robin moved on: a fresh decision");
        assert_eq!(active(&engine).iter().sum::<u32>(), 1);
    }
}
