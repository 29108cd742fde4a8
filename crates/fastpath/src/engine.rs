//! The one decision entry point every datapath calls: given a packet (or its flow), say
//! what to do with it and update the tables. Pure: no I/O, no clock (`now` comes in).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::conntrack::{AffinityTable, Binding, ConnTable, ConntrackConfig};
use crate::flow::{FlowKey, Nanos, Protocol, TcpFlags};
use crate::hash::mix64;
use crate::policy::{Policy, PolicyKind, SelectInput};
use crate::service::{
    BackendHandle, BatchReport, CommitError, Frontend, ServiceId, ServiceSpec, ServiceState,
    ServiceTable, SpecError, Staged, TableConfig,
};
use crate::wire::{self, WireError};

/// What to do with a packet.
#[derive(Clone, Debug)]
pub enum Verdict {
    /// Send it to this backend (DNAT to `backend.addr`).
    Forward(Forward),
    /// Not ours: let it through untouched.
    Pass(PassReason),
    /// A service without usable endpoints: refuse it as kube-proxy does (TCP RST, ICMP
    /// port unreachable), so clients fail fast instead of hanging.
    Reject { service: ServiceId, reason: RejectReason },
    /// Malformed: count it and drop it.
    Drop(DropReason),
}

/// Where a new connection comes from, as far as its datapath can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Outside the cluster, or not known.
    Outside,
    /// A pod (the cluster CIDRs) or the node itself.
    Cluster,
}

/// What the engine made of a flow the kernel's conntrack reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFlow {
    /// The engine had decided it: its entry is now the kernel's.
    Confirmed,
    /// A flow to a service the engine had not decided (the kernel's own path, or a flow
    /// older than the engine): recorded on its backend.
    Adopted,
    /// Not a service flow (or its backend is no longer the service's).
    Foreign,
}

#[derive(Clone, Debug)]
pub struct Forward {
    pub service: ServiceId,
    pub backend: Arc<BackendHandle>,
    /// True when this packet opened the flow (a policy or affinity chose the backend).
    pub new_flow: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PassReason {
    /// No frontend matches the destination.
    NoService,
    /// Not TCP, UDP or SCTP (ICMP and friends are the kernel's business).
    UnsupportedProtocol,
    /// A non-first fragment carries no ports to decide on.
    Fragment,
    /// IPv6 with segments left in a routing header: this hop is not the destination.
    RoutingHeader,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectReason {
    NoEndpoints,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    Malformed(WireError),
}

impl PassReason {
    pub const fn as_str(self) -> &'static str {
        match self {
            PassReason::NoService => "no_service",
            PassReason::UnsupportedProtocol => "unsupported_protocol",
            PassReason::Fragment => "fragment",
            PassReason::RoutingHeader => "routing_header",
        }
    }
}

impl RejectReason {
    pub const fn as_str(self) -> &'static str {
        match self {
            RejectReason::NoEndpoints => "no_endpoints",
        }
    }
}

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Malformed(e) => e.as_str(),
        }
    }
}

impl Verdict {
    pub const fn action(&self) -> &'static str {
        match self {
            Verdict::Forward(_) => "forward",
            Verdict::Pass(_) => "pass",
            Verdict::Reject { .. } => "reject",
            Verdict::Drop(_) => "drop",
        }
    }

    pub fn reason(&self) -> Option<&'static str> {
        match self {
            Verdict::Forward(_) => None,
            Verdict::Pass(r) => Some(r.as_str()),
            Verdict::Reject { reason, .. } => Some(reason.as_str()),
            Verdict::Drop(r) => Some(r.as_str()),
        }
    }
}

/// Engine settings.
#[derive(Clone, Copy, Debug, Default)]
pub struct EngineConfig {
    pub table: TableConfig,
    pub conntrack: ConntrackConfig,
    /// Seeds the entropy policies draw from (random choice, tie breaks).
    pub seed: u64,
}

/// Labels of the wire errors that make a packet a drop (the others are passes).
pub const MALFORMED_REASONS: [&str; 9] = [
    "truncated",
    "bad_version",
    "bad_ihl",
    "bad_total_length",
    "bad_ext_header",
    "ext_header_loop",
    "bad_tcp_offset",
    "bad_udp_length",
    "other",
];

fn malformed_index(e: &WireError) -> usize {
    match e {
        WireError::Truncated => 0,
        WireError::BadVersion => 1,
        WireError::BadIhl => 2,
        WireError::BadTotalLength => 3,
        WireError::BadExtHeader => 4,
        WireError::ExtHeaderLoop => 5,
        WireError::BadTcpOffset => 6,
        WireError::BadUdpLength => 7,
        _ => 8,
    }
}

/// Decision counters, read at scrape time. Relaxed atomics: totals, not a ledger.
#[derive(Debug, Default)]
pub struct Counters {
    pub forward: AtomicU64,
    pub pass: AtomicU64,
    pub reject: AtomicU64,
    pub drop: AtomicU64,
    /// New flows by the policy that chose them, indexed by [`PolicyKind::index`].
    pub new_flows: [AtomicU64; 4],
    pub affinity_hits: AtomicU64,
    /// Drops by wire error, indexed like [`MALFORMED_REASONS`].
    pub malformed: [AtomicU64; MALFORMED_REASONS.len()],
}

/// A plain copy of every counter, labelled.
pub fn counter_snapshot(c: &Counters) -> Vec<(String, u64)> {
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let mut v = vec![
        ("decisions_forward".to_string(), get(&c.forward)),
        ("decisions_pass".to_string(), get(&c.pass)),
        ("decisions_reject".to_string(), get(&c.reject)),
        ("decisions_drop".to_string(), get(&c.drop)),
        ("affinity_hits".to_string(), get(&c.affinity_hits)),
    ];
    for k in PolicyKind::ALL {
        v.push((
            format!("new_flows_{}", k.as_str().replace('-', "_")),
            get(&c.new_flows[k.index()]),
        ));
    }
    for (reason, n) in MALFORMED_REASONS.iter().zip(&c.malformed) {
        v.push((format!("drops_{reason}"), get(n)));
    }
    v
}

/// The service table, the connection table and session affinity behind one call.
pub struct Engine {
    services: ServiceTable,
    conns: ConnTable,
    affinity: AffinityTable,
    counters: Counters,
    entropy: AtomicU64,
}

impl Engine {
    pub fn new(config: EngineConfig) -> Result<Self, SpecError> {
        Ok(Engine {
            services: ServiceTable::new(config.table)?,
            conns: ConnTable::new(config.conntrack),
            affinity: AffinityTable::new(config.conntrack),
            counters: Counters::default(),
            entropy: AtomicU64::new(mix64(config.seed)),
        })
    }

    pub fn services(&self) -> &ServiceTable {
        &self.services
    }

    pub fn conntrack(&self) -> &ConnTable {
        &self.conns
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The entropy the next new flow will draw, without drawing it (for `explain`).
    pub(crate) fn peek_entropy(&self) -> u64 {
        mix64(self.entropy.load(Ordering::Relaxed))
    }

    pub(crate) fn affinity(&self) -> &AffinityTable {
        &self.affinity
    }

    #[inline]
    fn next_entropy(&self) -> u64 {
        mix64(self.entropy.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed))
    }

    /// Decide for a raw IPv4 or IPv6 packet.
    pub fn decide_packet(&self, packet: &[u8], now: Nanos) -> Verdict {
        self.decide_packet_from(packet, Source::Outside, now)
    }

    /// [`decide_packet`](Self::decide_packet) for a packet whose datapath knows where it
    /// comes from: from inside the cluster, a service's short-circuit applies.
    pub fn decide_packet_from(&self, packet: &[u8], source: Source, now: Nanos) -> Verdict {
        let verdict = match wire::parse(packet) {
            Ok(info) => {
                let verdict = self.decide_inner(&info.key, info.tcp_flags, source, now);
                self.count(&verdict);
                return verdict;
            }
            Err(WireError::UnsupportedProtocol(_)) => {
                Verdict::Pass(PassReason::UnsupportedProtocol)
            }
            Err(WireError::NonFirstFragment(_)) => Verdict::Pass(PassReason::Fragment),
            Err(WireError::RoutingHeader) => Verdict::Pass(PassReason::RoutingHeader),
            Err(e) => {
                self.counters.malformed[malformed_index(&e)].fetch_add(1, Ordering::Relaxed);
                Verdict::Drop(DropReason::Malformed(e))
            }
        };
        self.count(&verdict);
        verdict
    }

    /// Decide for a packet known by its flow and (for TCP) its flags.
    pub fn decide_flow(&self, key: &FlowKey, tcp_flags: Option<TcpFlags>, now: Nanos) -> Verdict {
        let verdict = self.decide_inner(key, tcp_flags, Source::Outside, now);
        self.count(&verdict);
        verdict
    }

    #[inline]
    fn decide_inner(
        &self,
        key: &FlowKey,
        tcp_flags: Option<TcpFlags>,
        source: Source,
        now: Nanos,
    ) -> Verdict {
        // The flow table first: a packet of a known flow (every packet but the first under
        // AF_PACKET) needs no service lookup unless it is a bare SYN, which may start a new
        // connection on an old flow's 5-tuple.
        let existing = self.conns.lookup(key, tcp_flags, now);
        let new_attempt = tcp_flags.is_some_and(|f| f.syn() && !f.ack());
        if let (Some(b), false) = (&existing, new_attempt) {
            return Verdict::Forward(Forward {
                service: b.service,
                backend: b.backend.clone(),
                new_flow: false,
            });
        }
        let svc = self.service_for(key, source);
        if let Some(b) = existing {
            // A connection attempt (a bare SYN) whose recorded backend has left its service's
            // pool reuses an old flow's 5-tuple: a new connection, decided afresh. The NFQUEUE
            // datapath sees only first packets, so its table never learns that the old flow
            // ended, and the old backend's id may no longer be programmed. Any other packet
            // keeps its backend, as the kernel's conntrack would.
            let stale = svc
                .as_ref()
                .is_none_or(|s| s.id != b.service || !s.pool_for(key.src).has(&b.backend));
            if !stale {
                return Verdict::Forward(Forward {
                    service: b.service,
                    backend: b.backend,
                    new_flow: false,
                });
            }
        }
        let Some(svc) = svc else {
            return Verdict::Pass(PassReason::NoService);
        };
        let Some(backend) = self.choose(&svc, key, now) else {
            return Verdict::Reject { service: svc.id, reason: RejectReason::NoEndpoints };
        };
        let binding = Binding { service: svc.id, backend: backend.clone() };
        self.conns.insert(*key, binding, tcp_flags, now);
        Verdict::Forward(Forward { service: svc.id, backend, new_flow: true })
    }

    /// The service a new connection to `key`'s destination goes to, from `source`.
    fn service_for(&self, key: &FlowKey, source: Source) -> Option<Arc<ServiceState>> {
        let frontend = Frontend { addr: key.dst, port: key.dst_port, proto: key.proto };
        let svc = self.services.lookup(&frontend);
        if source == Source::Cluster {
            if let Some(target) = svc.as_ref().and_then(|s| s.short_circuit.as_deref()) {
                // A pod or the node: kube-proxy's short-circuit to every endpoint. Without
                // the target (not loaded yet), the service itself decides.
                if let Some(t) = self.services.get(target) {
                    return Some(t);
                }
            }
        }
        svc
    }

    /// A new flow's backend: the client's affinity if it still stands, else the policy's.
    fn choose(&self, svc: &ServiceState, key: &FlowKey, now: Nanos) -> Option<Arc<BackendHandle>> {
        if let Some(timeout) = svc.affinity_timeout {
            if let Some(b) = self.affinity.lookup(svc.id, key.src, timeout, now) {
                if svc.in_pool(b.id) {
                    self.counters.affinity_hits.fetch_add(1, Ordering::Relaxed);
                    return Some(b);
                }
            }
        }
        let input = SelectInput { flow: key, entropy: self.next_entropy(), now };
        let pool = svc.pool_for(key.src);
        let index = pool.selector.select(&pool.backends, &input)?;
        let backend = pool.backends[index].handle.clone();
        self.counters.new_flows[svc.policy().index()].fetch_add(1, Ordering::Relaxed);
        if let Some(timeout) = svc.affinity_timeout {
            self.affinity.insert(svc.id, key.src, backend.clone(), timeout, now);
        }
        Some(backend)
    }

    /// The kernel's conntrack confirmed `key`'s flow, NATed to `backend` (the source of its
    /// reply direction). The engine's table now holds it until [`Engine::kernel_flow_ended`],
    /// so per-backend active counts (least-connections) are the kernel's live flows.
    pub fn kernel_flow_started(
        &self,
        key: &FlowKey,
        backend: SocketAddr,
        now: Nanos,
    ) -> KernelFlow {
        if self.conns.confirm(key, backend, now) {
            return KernelFlow::Confirmed;
        }
        let frontend = Frontend { addr: key.dst, port: key.dst_port, proto: key.proto };
        let Some(svc) = self.services.lookup(&frontend) else { return KernelFlow::Foreign };
        let Some(b) = svc.backends.iter().find(|b| b.handle.addr == backend) else {
            return KernelFlow::Foreign;
        };
        let binding = Binding { service: svc.id, backend: b.handle.clone() };
        self.conns.adopt(*key, binding, now);
        KernelFlow::Adopted
    }

    /// The kernel's conntrack ended `key`'s flow (FIN, RST, timeout, flush). False if the
    /// engine did not hold it.
    pub fn kernel_flow_ended(&self, key: &FlowKey) -> bool {
        self.conns.remove(key)
    }

    /// After a full listing of the kernel's flows: see [`ConnTable::retain_kernel_flows`].
    pub fn retain_kernel_flows(&self, live: &HashSet<FlowKey>, grace: Nanos, now: Nanos) -> usize {
        self.conns.retain_kernel_flows(live, grace, now)
    }

    fn count(&self, v: &Verdict) {
        let c = match v {
            Verdict::Forward(_) => &self.counters.forward,
            Verdict::Pass(_) => &self.counters.pass,
            Verdict::Reject { .. } => &self.counters.reject,
            Verdict::Drop(_) => &self.counters.drop,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Compute a batch of upserts and removals without publishing it (see
    /// [`ServiceTable::stage`]): program `backends_added` before [`Engine::commit`].
    pub fn stage(&self, upserts: &[ServiceSpec], removals: &[String]) -> Staged {
        self.services.stage(upserts, removals)
    }

    /// Publish a staged batch at once, then forget the flows it strands: every flow and
    /// affinity of a removed service; for a replaced one, UDP flows and affinities to
    /// backends it no longer has (kube-proxy's stale-UDP cleanup: the client's next
    /// datagram picks a live backend). TCP flows are left to end on their own, as the
    /// kernel's would be.
    pub fn commit(&self, mut staged: Staged) -> Result<(), CommitError> {
        let changes = std::mem::take(&mut staged.changes);
        self.services.commit(staged)?;
        for (old, new) in changes {
            let Some(old) = old else { continue };
            match new.filter(|new| new.id == old.id) {
                Some(new) => {
                    for b in old.backends.iter().filter(|b| !new.in_pool(b.handle.id)) {
                        self.conns.flush_backend_proto(old.id, b.handle.id, Protocol::Udp);
                        self.affinity.flush_backend(b.handle.id);
                    }
                }
                None => {
                    self.conns.flush_service(old.id);
                    self.affinity.flush_service(old.id);
                }
            }
        }
        Ok(())
    }

    /// Stage and commit a batch.
    pub fn apply(&self, upserts: &[ServiceSpec], removals: &[String]) -> BatchReport {
        loop {
            let staged = self.stage(upserts, removals);
            let report = staged.report();
            // Stale only when another writer got in between: stage again on its version.
            if self.commit(staged).is_ok() {
                return report;
            }
        }
    }

    /// Add or replace a service (a one-service batch, except that a refused write changes
    /// nothing), forgetting the flows it strands as [`Engine::commit`] does.
    pub fn upsert_service(&self, spec: &ServiceSpec) -> Result<Arc<ServiceState>, SpecError> {
        loop {
            let mut staged = self.stage(std::slice::from_ref(spec), &[]);
            if let Some((_, e)) = staged.refused.pop() {
                return Err(e);
            }
            let state = staged.accepted[0].clone();
            if self.commit(staged).is_ok() {
                return Ok(state);
            }
        }
    }

    /// Remove a service and forget its flows and affinities.
    pub fn remove_service(&self, name: &str) -> bool {
        let removed = self.apply(&[], &[name.to_string()]);
        !removed.removed.is_empty()
    }

    /// Forget every flow to a backend; returns how many flows were removed.
    pub fn flush_backend(&self, addr: SocketAddr) -> usize {
        let Some((id, _)) = self.services.backend_ids().into_iter().find(|(_, a)| *a == addr)
        else {
            return 0;
        };
        self.affinity.flush_backend(id);
        self.conns.flush_backend(id)
    }

    /// One bounded step of garbage collection over both tables.
    pub fn expire(&self, now: Nanos, budget: usize) -> usize {
        self.conns.gc(now, budget) + self.affinity.gc(now, budget)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::NANOS_PER_SEC as SEC;
    use crate::policy::HashKey;
    use crate::service::{BackendSpec, Conditions};
    use crate::wire::PacketBuilder;
    use std::net::{IpAddr, Ipv4Addr};

    fn engine() -> Engine {
        Engine::new(EngineConfig { seed: 1, ..EngineConfig::default() }).unwrap()
    }

    fn vip() -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10))
    }

    fn spec(proto: Protocol, backends: &[u8], policy: PolicyKind) -> ServiceSpec {
        ServiceSpec {
            name: "default/web:http".into(),
            frontends: vec![Frontend { addr: vip(), port: 80, proto }],
            backends: backends
                .iter()
                .map(|&b| BackendSpec {
                    addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 244, 0, b)), 8080),
                    weight: 1,
                    conditions: Conditions::READY,
                    local: false,
                })
                .collect(),
            policy: Some(policy),
            affinity_timeout: None,
            hash_key: None::<HashKey>,
            short_circuit: None,
        }
    }

    fn flow(proto: Protocol, client: u8, port: u16) -> FlowKey {
        FlowKey::new(proto, IpAddr::V4(Ipv4Addr::new(10, 0, 0, client)), port, vip(), 80)
    }

    const SYN: Option<TcpFlags> = Some(TcpFlags(TcpFlags::SYN));
    const ACK: Option<TcpFlags> = Some(TcpFlags(TcpFlags::ACK));

    fn backend_of(v: &Verdict) -> SocketAddr {
        match v {
            Verdict::Forward(f) => f.backend.addr,
            other => panic!("expected forward, got {other:?}"),
        }
    }

    #[test]
    fn later_packets_follow_the_first() {
        let e = engine();
        e.upsert_service(&spec(Protocol::Tcp, &[1, 2, 3], PolicyKind::RoundRobin)).unwrap();
        let f = flow(Protocol::Tcp, 1, 40000);
        let first = e.decide_flow(&f, SYN, SEC);
        assert!(matches!(&first, Verdict::Forward(x) if x.new_flow));
        for t in 2..10 {
            let next = e.decide_flow(&f, ACK, t * SEC);
            assert!(matches!(&next, Verdict::Forward(x) if !x.new_flow));
            assert_eq!(backend_of(&next), backend_of(&first));
        }
        // Round-robin moved on for the next connection.
        let other = e.decide_flow(&flow(Protocol::Tcp, 1, 40001), SYN, SEC);
        assert_ne!(backend_of(&other), backend_of(&first));
    }

    #[test]
    fn a_new_connection_reusing_a_tuple_whose_backend_left_is_decided_afresh() {
        let e = engine();
        e.upsert_service(&spec(Protocol::Tcp, &[1, 2], PolicyKind::RoundRobin)).unwrap();
        let f = flow(Protocol::Tcp, 1, 40000);
        let old = backend_of(&e.decide_flow(&f, SYN, SEC));
        // The endpoints move to .3 only; the old flow's end was never seen (the NFQUEUE
        // datapath gets first packets only), and a new connection reuses the client port.
        e.upsert_service(&spec(Protocol::Tcp, &[3], PolicyKind::RoundRobin)).unwrap();
        let again = e.decide_flow(&f, SYN, 2 * SEC);
        assert!(matches!(&again, Verdict::Forward(x) if x.new_flow));
        assert_eq!(backend_of(&again).ip(), IpAddr::V4(Ipv4Addr::new(10, 244, 0, 3)));
        assert_ne!(backend_of(&again), old);
        // A live flow's later packets keep their backend, in the pool or not (as the
        // kernel's conntrack keeps a removed endpoint's established connections).
        let g = flow(Protocol::Tcp, 1, 40001);
        let live = backend_of(&e.decide_flow(&g, SYN, 3 * SEC));
        e.upsert_service(&spec(Protocol::Tcp, &[4], PolicyKind::RoundRobin)).unwrap();
        assert_eq!(backend_of(&e.decide_flow(&g, ACK, 4 * SEC)), live);
    }

    #[test]
    fn no_service_passes_and_no_endpoints_rejects() {
        let e = engine();
        assert!(matches!(
            e.decide_flow(&flow(Protocol::Tcp, 1, 1), SYN, SEC),
            Verdict::Pass(PassReason::NoService)
        ));
        e.upsert_service(&spec(Protocol::Tcp, &[], PolicyKind::Random)).unwrap();
        let v = e.decide_flow(&flow(Protocol::Tcp, 1, 1), SYN, SEC);
        assert!(matches!(v, Verdict::Reject { reason: RejectReason::NoEndpoints, .. }));
        // Adding an endpoint makes the same client work at once.
        e.upsert_service(&spec(Protocol::Tcp, &[7], PolicyKind::Random)).unwrap();
        assert_eq!(backend_of(&e.decide_flow(&flow(Protocol::Tcp, 1, 1), SYN, SEC)).port(), 8080);
        // The frontend is TCP: UDP to the same address and port is not this service.
        assert!(matches!(e.decide_flow(&flow(Protocol::Udp, 1, 1), None, SEC), Verdict::Pass(_)));
    }

    #[test]
    fn malformed_packets_are_counted_drops() {
        let e = engine();
        let v = e.decide_packet(&[0x45, 0, 0], SEC);
        assert!(matches!(v, Verdict::Drop(_)));
        assert_eq!(v.reason(), Some("truncated"));
        let v = e.decide_packet(&[0x75; 40], SEC);
        assert_eq!(v.reason(), Some("bad_version"));
        let snap = counter_snapshot(e.counters());
        let get = |k: &str| snap.iter().find(|(n, _)| n == k).unwrap().1;
        assert_eq!(get("decisions_drop"), 2);
        assert_eq!(get("drops_truncated"), 1);
        assert_eq!(get("drops_bad_version"), 1);
    }

    #[test]
    fn a_real_syn_packet_is_forwarded() {
        let e = engine();
        e.upsert_service(&spec(Protocol::Tcp, &[1], PolicyKind::Maglev)).unwrap();
        let pkt = PacketBuilder::new(flow(Protocol::Tcp, 1, 40000)).build();
        assert_eq!(
            backend_of(&e.decide_packet(&pkt, SEC)).ip(),
            IpAddr::V4(Ipv4Addr::new(10, 244, 0, 1))
        );
    }

    #[test]
    fn removing_a_backend_moves_its_udp_flows_but_not_tcp() {
        let e = engine();
        e.upsert_service(&spec(Protocol::Udp, &[1, 2], PolicyKind::RoundRobin)).unwrap();
        let mut tcp = spec(Protocol::Tcp, &[1, 2], PolicyKind::RoundRobin);
        tcp.name = "default/web:tcp".into();
        e.upsert_service(&tcp).unwrap();
        let u = flow(Protocol::Udp, 1, 5000);
        let t = flow(Protocol::Tcp, 1, 5000);
        let ub = backend_of(&e.decide_flow(&u, None, SEC));
        let tb = backend_of(&e.decide_flow(&t, SYN, SEC));
        let keep =
            |b: SocketAddr| if b.ip() == IpAddr::V4(Ipv4Addr::new(10, 244, 0, 1)) { 2 } else { 1 };
        e.upsert_service(&spec(Protocol::Udp, &[keep(ub)], PolicyKind::RoundRobin)).unwrap();
        let mut tcp2 = spec(Protocol::Tcp, &[keep(tb)], PolicyKind::RoundRobin);
        tcp2.name = "default/web:tcp".into();
        e.upsert_service(&tcp2).unwrap();
        assert_ne!(backend_of(&e.decide_flow(&u, None, 2 * SEC)), ub, "stale UDP flow moved");
        assert_eq!(backend_of(&e.decide_flow(&t, ACK, 2 * SEC)), tb, "TCP flow left to end");
    }

    #[test]
    fn affinity_holds_until_the_timeout() {
        let e = engine();
        let mut s = spec(Protocol::Tcp, &[1, 2, 3], PolicyKind::RoundRobin);
        s.affinity_timeout = Some(60 * SEC);
        e.upsert_service(&s).unwrap();
        let first = backend_of(&e.decide_flow(&flow(Protocol::Tcp, 9, 1000), SYN, SEC));
        for p in 1001..1010 {
            assert_eq!(backend_of(&e.decide_flow(&flow(Protocol::Tcp, 9, p), SYN, 2 * SEC)), first);
        }
        // Past the timeout with no traffic, round-robin chooses again.
        let later: Vec<_> = (2000..2003)
            .map(|p| backend_of(&e.decide_flow(&flow(Protocol::Tcp, 9, p), SYN, 200 * SEC)))
            .collect();
        assert!(later.iter().all(|b| *b == later[0]), "a new affinity binds again");
        assert_eq!(
            counter_snapshot(e.counters()).iter().find(|(n, _)| n == "affinity_hits").unwrap().1,
            11
        );
    }

    #[test]
    fn removing_a_service_forgets_its_flows() {
        let e = engine();
        e.upsert_service(&spec(Protocol::Tcp, &[1], PolicyKind::Random)).unwrap();
        let f = flow(Protocol::Tcp, 1, 1);
        e.decide_flow(&f, SYN, SEC);
        assert_eq!(e.conntrack().len(), 1);
        assert!(e.remove_service("default/web:http"));
        assert_eq!(e.conntrack().len(), 0);
        assert!(matches!(e.decide_flow(&f, ACK, SEC), Verdict::Pass(PassReason::NoService)));
    }

    #[test]
    fn a_committed_batch_forgets_the_flows_it_strands() {
        let e = engine();
        e.upsert_service(&spec(Protocol::Tcp, &[1], PolicyKind::Random)).unwrap();
        let mut udp = spec(Protocol::Udp, &[1, 2], PolicyKind::RoundRobin);
        udp.name = "default/dns:udp".into();
        e.upsert_service(&udp).unwrap();
        let (t, u) = (flow(Protocol::Tcp, 1, 1), flow(Protocol::Udp, 1, 1));
        e.decide_flow(&t, SYN, SEC);
        let ub = backend_of(&e.decide_flow(&u, None, SEC));
        let keep = if ub.ip() == IpAddr::V4(Ipv4Addr::new(10, 244, 0, 1)) { 2 } else { 1 };
        let mut udp2 = spec(Protocol::Udp, &[keep], PolicyKind::RoundRobin);
        udp2.name = udp.name.clone();
        let staged = e.stage(&[udp2], &["default/web:http".to_string()]);
        assert_eq!(e.conntrack().len(), 2, "nothing happens before the commit");
        e.commit(staged).unwrap();
        assert_eq!(e.conntrack().len(), 0, "the removed service's flow and the stale UDP flow");
        assert!(matches!(e.decide_flow(&t, ACK, SEC), Verdict::Pass(PassReason::NoService)));
        assert_ne!(backend_of(&e.decide_flow(&u, None, 2 * SEC)), ub);
        let report = e.apply(&[], &["default/dns:udp".to_string()]);
        assert_eq!(report.removed, ["default/dns:udp"]);
        assert!(e.commit(e.stage(&[], &[])).is_ok());
    }

    #[test]
    fn the_random_policy_picks_each_new_flow_independently_of_the_last() {
        // Through the engine's own entropy (seeded): successive new flows' backends are
        // not a function of the previous one (round-robin's would be).
        use crate::policy::testutil::{transition_chi_square, CHI2_24_P999};
        let e = engine();
        e.upsert_service(&spec(Protocol::Tcp, &[1, 2, 3, 4, 5], PolicyKind::Random)).unwrap();
        let picks: Vec<usize> = (0..40_000u32)
            .map(|i| {
                let f = flow(Protocol::Tcp, 1 + (i / 20_000) as u8, 1024 + (i % 20_000) as u16);
                match backend_of(&e.decide_flow(&f, SYN, SEC)).ip() {
                    IpAddr::V4(ip) => usize::from(ip.octets()[3] - 1), // 10.244.0.1..=5
                    IpAddr::V6(_) => unreachable!(),
                }
            })
            .collect();
        let chi = transition_chi_square(&picks, 5);
        assert!(chi < CHI2_24_P999, "transitions chi2 {chi}");
    }
}
