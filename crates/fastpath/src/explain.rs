//! `pykp explain`: for a service and a would-be connection, every backend with why it is or
//! is not in the pool, the policy's live state, and the backend that connection would get.
//!
//! A dry run of [`Engine::decide_flow`] for a connection's first packet, read from the live
//! tables without changing them: it reads the round-robin cursor instead of taking a ticket,
//! peeks at the entropy the next new flow will draw instead of drawing it, and looks at
//! connection and affinity entries without refreshing them. So "the next connection gets
//! X" is what the next connection gets, as long as no other new flow reaches the engine
//! first (round-robin: no other new flow of the same service and family).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use crate::conntrack::ConnState;
use crate::engine::{Engine, Source};
use crate::flow::{FlowKey, Nanos, Protocol, TcpFlags};
use crate::policy::{HashKey, Policy, SelectInput, Selector};
use crate::service::{Backend, BackendHandle, Conditions, Frontend, Pool, ServiceState};

/// What to explain: a service by name or by one of its frontends.
#[derive(Clone, Debug)]
pub enum Target {
    Name(String),
    Frontend(Frontend),
}

/// A would-be connection: the service, and as much of the client as is known.
#[derive(Clone, Debug)]
pub struct Probe {
    pub target: Target,
    pub client: Option<IpAddr>,
    /// Only with `client`.
    pub client_port: Option<u16>,
    /// Whether the client is inside the cluster (a pod, the node): a service's
    /// short-circuit then applies, as the datapath's cluster-source bit says.
    pub source: Source,
}

/// Why a backend is or is not in the pool the policy chooses from (kube-proxy's endpoint
/// categorisation, as [`ServiceState`]'s pools are built).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Eligibility {
    /// In the pool: ready.
    Ready,
    /// In the pool: serving and terminating, used because no backend is ready.
    TerminatingFallback,
    /// Out: serving and terminating, but ready backends exist.
    Terminating,
    /// Out: not serving (a terminating endpoint that no longer serves, for one).
    NotServing,
    /// Out: serving but neither ready nor terminating.
    NotReady,
    /// Out: weight 0 (drained: keeps its flows, gets no new ones).
    Drained,
    /// Out of this pool: of the other address family (NAT does not cross families).
    OtherFamily,
}

impl Eligibility {
    pub const fn as_str(self) -> &'static str {
        match self {
            Eligibility::Ready => "ready",
            Eligibility::TerminatingFallback => "terminating-fallback",
            Eligibility::Terminating => "terminating",
            Eligibility::NotServing => "not-serving",
            Eligibility::NotReady => "not-ready",
            Eligibility::Drained => "weight-0",
            Eligibility::OtherFamily => "other-family",
        }
    }

    pub const fn eligible(self) -> bool {
        matches!(self, Eligibility::Ready | Eligibility::TerminatingFallback)
    }
}

/// One backend of the service, as the writer gave it, with the live state the policy reads.
#[derive(Clone, Debug)]
pub struct BackendView {
    pub handle: Arc<BackendHandle>,
    pub weight: u32,
    pub conditions: Conditions,
    pub local: bool,
    pub eligibility: Eligibility,
    /// Flows pykp's connection table binds to it (what least-connections compares).
    pub active: u32,
    /// Slots it owns in the Maglev table (Maglev only; 0 when out of the pool).
    pub maglev_slots: Option<u32>,
}

/// The policy's live state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicyView {
    Random,
    /// The next connection takes ticket `ticket`; the pool (or weighted schedule) repeats
    /// every `cycle` tickets.
    RoundRobin {
        ticket: u64,
        cycle: usize,
    },
    /// `slot`: the flow's slot, when the probe gives what the hash key reads.
    Maglev {
        table_size: usize,
        hash_key: HashKey,
        slot: Option<usize>,
    },
    LeastConn,
}

/// What decides the probe's connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecidedBy {
    /// pykp's connection table has a live flow with this 5-tuple: its packets keep it.
    Flow,
    /// ClientIP session affinity pins the client.
    Affinity,
    /// The policy chooses.
    Policy,
}

impl DecidedBy {
    pub const fn as_str(self) -> &'static str {
        match self {
            DecidedBy::Flow => "flow",
            DecidedBy::Affinity => "affinity",
            DecidedBy::Policy => "policy",
        }
    }
}

#[derive(Clone, Debug)]
pub enum Outcome {
    Forward {
        backend: Arc<BackendHandle>,
        by: DecidedBy,
    },
    /// The pool is empty: the engine refuses the connection (as kube-proxy does).
    Reject,
    /// The decision reads what the probe left out (Maglev's hash); why.
    Undetermined(&'static str),
}

/// A client's session-affinity entry.
#[derive(Clone, Debug)]
pub struct AffinityView {
    pub backend: Arc<BackendHandle>,
    pub expires_in: Nanos,
    /// False: its backend left the pool, so the policy chooses again.
    pub in_pool: bool,
}

/// A live flow with the probe's 5-tuple.
#[derive(Clone, Debug)]
pub struct FlowView {
    pub backend: Arc<BackendHandle>,
    pub state: ConnState,
    pub expires_in: Nanos,
    /// False: a new connection on this tuple is decided afresh (the old flow is closing,
    /// or its backend left the pool).
    pub kept: bool,
}

#[derive(Clone, Debug)]
pub struct Explanation {
    pub service: Arc<ServiceState>,
    /// The service the probe addressed, when its short-circuit sent it to `service`.
    pub short_circuited_from: Option<Arc<str>>,
    /// The frontend the probe's connection goes to (None: the service has none).
    pub frontend: Option<Frontend>,
    /// Every backend, in the writer's order.
    pub backends: Vec<BackendView>,
    /// The pool is the terminating fallback (no ready backend).
    pub fallback: bool,
    pub policy: PolicyView,
    /// What the policy alone would pick now (before affinity and flows).
    pub policy_choice: Option<Arc<BackendHandle>>,
    pub affinity: Option<AffinityView>,
    pub flow: Option<FlowView>,
    pub outcome: Outcome,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExplainError {
    UnknownService(String),
    UnknownFrontend(Frontend),
    FamilyMismatch { client: IpAddr, frontend: Frontend },
}

impl fmt::Display for ExplainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExplainError::UnknownService(name) => write!(f, "no service {name:?}"),
            ExplainError::UnknownFrontend(fe) => {
                write!(
                    f,
                    "no service at {}/{}",
                    std::net::SocketAddr::new(fe.addr, fe.port),
                    fe.proto
                )
            }
            ExplainError::FamilyMismatch { client, frontend } => write!(
                f,
                "client {client} and frontend {} are of different address families",
                frontend.addr
            ),
        }
    }
}

impl std::error::Error for ExplainError {}

const UNSPECIFIED_V4: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
const UNSPECIFIED_V6: IpAddr = IpAddr::V6(Ipv6Addr::UNSPECIFIED);

impl Engine {
    /// Explain what a new connection of `probe` would get, changing nothing.
    pub fn explain(&self, probe: &Probe, now: Nanos) -> Result<Explanation, ExplainError> {
        let table = self.services();
        let (svc, frontend) = match &probe.target {
            Target::Frontend(fe) => {
                (table.lookup(fe).ok_or(ExplainError::UnknownFrontend(*fe))?, Some(*fe))
            }
            Target::Name(name) => {
                let svc =
                    table.get(name).ok_or_else(|| ExplainError::UnknownService(name.clone()))?;
                // The first frontend of the client's family (a dual-stack service has both).
                let fe = svc
                    .frontends
                    .iter()
                    .find(|f| probe.client.is_none_or(|c| c.is_ipv4() == f.addr.is_ipv4()))
                    .or(svc.frontends.first())
                    .copied();
                (svc, fe)
            }
        };
        // kube-proxy's short-circuit: from inside the cluster, the port's cluster-wide
        // service decides (as `decide_inner` does).
        let short_circuited_from = match (probe.source, svc.short_circuit.as_deref()) {
            (Source::Cluster, Some(target)) => table.get(target).map(|t| (t, svc.name.clone())),
            _ => None,
        };
        let (svc, short_circuited_from) = match short_circuited_from {
            Some((target, from)) => (target, Some(from)),
            None => (svc, None),
        };
        if let (Some(client), Some(fe)) = (probe.client, frontend) {
            if client.is_ipv4() != fe.addr.is_ipv4() {
                return Err(ExplainError::FamilyMismatch { client, frontend: fe });
            }
        }
        let v4 = match (probe.client, frontend) {
            (Some(c), _) => c.is_ipv4(),
            (None, Some(fe)) => fe.addr.is_ipv4(),
            (None, None) => !svc.v4.backends.is_empty() || svc.v6.backends.is_empty(),
        };
        let pool = if v4 { &svc.v4 } else { &svc.v6 };
        let backends = backend_views(&svc, pool, v4);
        let fallback =
            !pool.backends.is_empty() && pool.backends.iter().all(|b| !b.conditions.ready);

        // The flow the policies see. Without a client, only Maglev reads it (and is then
        // undetermined); the unspecified address stands in for the others.
        let proto = frontend.map_or(Protocol::Tcp, |f| f.proto);
        let key = FlowKey::new(
            proto,
            probe.client.unwrap_or(if v4 { UNSPECIFIED_V4 } else { UNSPECIFIED_V6 }),
            probe.client_port.unwrap_or(0),
            frontend.map_or(if v4 { UNSPECIFIED_V4 } else { UNSPECIFIED_V6 }, |f| f.addr),
            frontend.map_or(0, |f| f.port),
        );
        // A connection's first packet: a SYN for TCP, any datagram otherwise. As in
        // `decide_flow`: a SYN on a closing flow is a new connection (the old entry goes
        // first, and its count with it, as does an expired one's); so is a SYN whose
        // flow's backend left the pool; any other first packet keeps the flow.
        let flags = (proto == Protocol::Tcp).then_some(TcpFlags(TcpFlags::SYN));
        let entry = match (probe.client, probe.client_port, frontend) {
            (Some(_), Some(_), Some(_)) => self.conntrack().peek(&key),
            _ => None,
        };
        let (flow, released) = match entry {
            None => (None, None),
            Some((b, _, expires)) if now >= expires => (None, Some(b.backend)),
            Some((b, state, expires)) => {
                let next = state.on_packet(flags);
                let new_attempt = flags.is_some_and(|f| f.syn() && !f.ack());
                let stale = svc.id != b.service || !pool.has(&b.backend);
                let kept = next.is_some() && !(new_attempt && stale);
                let released = next.is_none().then(|| b.backend.clone());
                let view = FlowView { backend: b.backend, state, expires_in: expires - now, kept };
                (Some(view), released)
            }
        };

        let missing = missing_for_policy(&pool.selector, probe);
        let input = SelectInput { flow: &key, entropy: self.peek_entropy(), now };
        let policy_choice = match missing {
            Some(_) => None,
            None => dry_select(&pool.selector, &pool.backends, &input, released.as_deref())
                .map(|i| pool.backends[i].handle.clone()),
        };
        let policy = policy_view(&pool.selector, pool, &key, missing.is_none());

        let affinity = match (svc.affinity_timeout, probe.client) {
            (Some(_), Some(client)) => {
                self.affinity().peek(svc.id, client, now).map(|(backend, left)| AffinityView {
                    in_pool: svc.in_pool(backend.id),
                    backend,
                    expires_in: left,
                })
            }
            _ => None,
        };

        let outcome = if let Some(f) = flow.as_ref().filter(|f| f.kept) {
            Outcome::Forward { backend: f.backend.clone(), by: DecidedBy::Flow }
        } else if let Some(a) = affinity.as_ref().filter(|a| a.in_pool) {
            Outcome::Forward { backend: a.backend.clone(), by: DecidedBy::Affinity }
        } else if pool.backends.is_empty() {
            Outcome::Reject
        } else if let Some(why) = missing {
            Outcome::Undetermined(why)
        } else {
            match &policy_choice {
                Some(b) => Outcome::Forward { backend: b.clone(), by: DecidedBy::Policy },
                None => Outcome::Reject,
            }
        };
        Ok(Explanation {
            short_circuited_from,
            service: svc.clone(),
            frontend,
            backends,
            fallback,
            policy,
            policy_choice,
            affinity,
            flow,
            outcome,
        })
    }
}

/// What `select` would return now, leaving the policy's state as it is. Every policy but
/// round-robin is a pure function of its input; round-robin's is read without a ticket.
fn dry_select(
    selector: &Selector,
    pool: &[Backend],
    input: &SelectInput<'_>,
    released: Option<&BackendHandle>,
) -> Option<usize> {
    match selector {
        Selector::RoundRobin(p) => p.peek(pool),
        Selector::Random(p) => p.select(pool, input),
        Selector::Maglev(p) => p.select(pool, input),
        // `released`: a flow's backend whose count the packet frees before the policy runs.
        Selector::LeastConn(p) => p.select_by(pool, input, |b| {
            let freed = released.is_some_and(|r| std::ptr::eq(r, Arc::as_ptr(&b.handle)));
            b.handle.active().saturating_sub(u32::from(freed))
        }),
    }
}

/// Why the probe is not enough for the policy to decide, if it is not.
fn missing_for_policy(selector: &Selector, probe: &Probe) -> Option<&'static str> {
    let Selector::Maglev(m) = selector else { return None };
    match (m.hash_key(), probe.client, probe.client_port) {
        (_, None, _) => Some("maglev hashes the client address: give the client"),
        (HashKey::FiveTuple, Some(_), None) => {
            Some("maglev hashes the 5-tuple: give the client port too")
        }
        _ => None,
    }
}

fn policy_view(selector: &Selector, pool: &Pool, key: &FlowKey, hashable: bool) -> PolicyView {
    match selector {
        Selector::Random(_) => PolicyView::Random,
        Selector::LeastConn(_) => PolicyView::LeastConn,
        Selector::RoundRobin(p) => {
            PolicyView::RoundRobin { ticket: p.ticket(), cycle: p.cycle_len(pool.backends.len()) }
        }
        Selector::Maglev(m) => PolicyView::Maglev {
            table_size: m.table_size(),
            hash_key: m.hash_key(),
            slot: if hashable { m.slot_of(key) } else { None },
        },
    }
}

fn backend_views(svc: &ServiceState, pool: &Pool, v4: bool) -> Vec<BackendView> {
    let slots: Option<Vec<u32>> = match &pool.selector {
        Selector::Maglev(m) => {
            let mut counts = vec![0u32; pool.backends.len()];
            for i in m.table(&pool.backends) {
                if let Some(c) = counts.get_mut(usize::from(i)) {
                    *c += 1;
                }
            }
            Some(counts)
        }
        _ => None,
    };
    svc.backends
        .iter()
        .map(|b| {
            let index = pool.backends.iter().position(|p| Arc::ptr_eq(&p.handle, &b.handle));
            let c = b.conditions;
            let eligibility = match index {
                Some(_) if c.ready => Eligibility::Ready,
                Some(_) => Eligibility::TerminatingFallback,
                None if b.handle.addr.is_ipv4() != v4 => Eligibility::OtherFamily,
                None if b.weight == 0 => Eligibility::Drained,
                None if c.serving && c.terminating => Eligibility::Terminating,
                None if !c.serving => Eligibility::NotServing,
                None => Eligibility::NotReady,
            };
            BackendView {
                handle: b.handle.clone(),
                weight: b.weight,
                conditions: c,
                local: b.local,
                eligibility,
                active: b.handle.active(),
                maglev_slots: slots.as_ref().map(|s| index.map_or(0, |i| s[i])),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{counter_snapshot, EngineConfig, Verdict};
    use crate::flow::NANOS_PER_SEC as SEC;
    use crate::policy::PolicyKind;
    use crate::service::{BackendSpec, ServiceSpec};
    use std::net::SocketAddr;

    const SYN: Option<TcpFlags> = Some(TcpFlags(TcpFlags::SYN));
    const ACK: Option<TcpFlags> = Some(TcpFlags(TcpFlags::ACK));
    const FIN: Option<TcpFlags> = Some(TcpFlags(TcpFlags::FIN | TcpFlags::ACK));

    fn engine() -> Engine {
        Engine::new(EngineConfig { seed: 7, ..EngineConfig::default() }).unwrap()
    }

    fn vip() -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10))
    }

    fn fe() -> Frontend {
        Frontend { addr: vip(), port: 80, proto: Protocol::Tcp }
    }

    fn be(last: u8, weight: u32, conditions: Conditions) -> BackendSpec {
        BackendSpec {
            addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 244, 0, last)), 8080),
            weight,
            conditions,
            local: false,
        }
    }

    fn spec(policy: PolicyKind, backends: Vec<BackendSpec>) -> ServiceSpec {
        ServiceSpec {
            name: "default/web:http".into(),
            frontends: vec![fe()],
            backends,
            policy: Some(policy),
            affinity_timeout: None,
            hash_key: None,
            short_circuit: None,
        }
    }

    fn client(i: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, i))
    }

    fn probe(c: u8, port: u16) -> Probe {
        Probe {
            target: Target::Frontend(fe()),
            client: Some(client(c)),
            client_port: Some(port),
            source: Source::Outside,
        }
    }

    fn flow(c: u8, port: u16) -> FlowKey {
        FlowKey::new(Protocol::Tcp, client(c), port, vip(), 80)
    }

    fn forwarded(v: &Verdict) -> SocketAddr {
        match v {
            Verdict::Forward(f) => f.backend.addr,
            other => panic!("expected forward, got {other:?}"),
        }
    }

    fn outcome_backend(x: &Explanation) -> Option<(SocketAddr, DecidedBy)> {
        match &x.outcome {
            Outcome::Forward { backend, by } => Some((backend.addr, *by)),
            _ => None,
        }
    }

    /// Everything a decision can change: counters, both tables, the policy's cursor, the
    /// entropy, and each backend's active count.
    fn state(e: &Engine) -> String {
        let x = e.explain(
            &Probe {
                target: Target::Frontend(fe()),
                client: None,
                client_port: None,
                source: Source::Outside,
            },
            0,
        );
        format!(
            "{:?} {:?} {:?} {} {:?} {:?}",
            counter_snapshot(e.counters()),
            e.conntrack().stats(),
            e.affinity().stats(),
            e.peek_entropy(),
            x.as_ref().map(|x| x.policy.clone()).ok(),
            x.map(|x| x.backends.iter().map(|b| b.active).collect::<Vec<_>>()).ok(),
        )
    }

    fn weights_and_conditions() -> Vec<BackendSpec> {
        vec![
            be(1, 1, Conditions::READY),
            be(2, 3, Conditions::READY),
            be(3, 2, Conditions::READY),
            be(4, 1, Conditions { ready: false, serving: true, terminating: true }),
        ]
    }

    /// For every policy, with and without affinity, over flows that come and go: what
    /// explain says the next connection gets is what it gets, and explaining changes
    /// nothing (twice the same answer, the same state).
    #[test]
    fn the_dry_run_is_the_next_decision_and_changes_nothing() {
        for policy in PolicyKind::ALL {
            for affinity in [None, Some(5 * SEC)] {
                let e = engine();
                let mut s = spec(policy, weights_and_conditions());
                s.affinity_timeout = affinity;
                e.upsert_service(&s).unwrap();
                let mut rng =
                    crate::policy::testutil::entropy_stream(u64::from(policy.index() as u8));
                let mut now = SEC;
                for step in 0..400u32 {
                    now += SEC / 10;
                    let r = rng();
                    let (c, port) = ((r % 6) as u8 + 1, 1000 + (r >> 8) as u16 % 40);
                    let before = state(&e);
                    let x = e.explain(&probe(c, port), now).unwrap();
                    let again = e.explain(&probe(c, port), now).unwrap();
                    assert_eq!(state(&e), before, "{policy} step {step}: explain changed state");
                    assert_eq!(outcome_backend(&x), outcome_backend(&again));
                    let (expected, by) = outcome_backend(&x).expect("a pool of three");
                    let got = e.decide_flow(&flow(c, port), SYN, now);
                    assert_eq!(forwarded(&got), expected, "{policy} step {step} ({by:?})");
                    // The kernel's conntrack confirms some flows: met again, a confirmed
                    // flow is a new connection (and its count goes first).
                    if r >> 48 & 3 == 0 {
                        e.kernel_flow_started(&flow(c, port), expected, now);
                    }
                    // Let some flows end, so least-conn's counts and the table move.
                    if r >> 40 & 3 == 0 {
                        e.decide_flow(&flow(c, port), FIN, now);
                    }
                    if r >> 44 & 7 == 0 {
                        e.expire(now + 200 * SEC, 64);
                    }
                }
                let snap = counter_snapshot(e.counters());
                let hits = snap.iter().find(|(n, _)| n == "affinity_hits").unwrap().1;
                assert_eq!(hits > 0, affinity.is_some(), "{policy}: the affinity path ran");
            }
        }
    }

    #[test]
    fn round_robin_names_the_next_backend_in_order() {
        let e = engine();
        e.upsert_service(&spec(
            PolicyKind::RoundRobin,
            vec![
                be(1, 1, Conditions::READY),
                be(2, 1, Conditions::READY),
                be(3, 1, Conditions::READY),
            ],
        ))
        .unwrap();
        let anyone = Probe {
            target: Target::Name("default/web:http".into()),
            client: None,
            client_port: None,
            source: Source::Outside,
        };
        for i in 0..7u16 {
            let x = e.explain(&anyone, SEC).unwrap();
            assert_eq!(x.policy, PolicyView::RoundRobin { ticket: u64::from(i), cycle: 3 });
            let (next, by) = outcome_backend(&x).unwrap();
            assert_eq!(by, DecidedBy::Policy);
            assert_eq!(next, forwarded(&e.decide_flow(&flow(1, 2000 + i), SYN, SEC)));
        }
    }

    #[test]
    fn eligibility_follows_kube_proxy_and_the_terminating_fallback() {
        let e = engine();
        let terminating = Conditions { ready: false, serving: true, terminating: true };
        let gone = Conditions { ready: false, serving: false, terminating: true };
        let starting = Conditions { ready: false, serving: true, terminating: false };
        let mut v6 = be(9, 1, Conditions::READY);
        v6.addr = "[fd00::9]:8080".parse().unwrap();
        let mut s = spec(
            PolicyKind::RoundRobin,
            vec![
                be(1, 1, Conditions::READY),
                be(2, 0, Conditions::READY),
                be(3, 1, terminating),
                be(4, 1, gone),
                be(5, 1, starting),
                v6,
            ],
        );
        s.frontends.push(Frontend {
            addr: "fd00::10".parse().unwrap(),
            port: 80,
            proto: Protocol::Tcp,
        });
        e.upsert_service(&s).unwrap();
        let x = e.explain(&probe(1, 1), SEC).unwrap();
        let reasons: Vec<&str> = x.backends.iter().map(|b| b.eligibility.as_str()).collect();
        assert_eq!(
            reasons,
            ["ready", "weight-0", "terminating", "not-serving", "not-ready", "other-family"]
        );
        assert!(!x.fallback);
        // The ready one leaves: the terminating one is the pool, and gets the connection.
        s.backends.remove(0);
        e.upsert_service(&s).unwrap();
        let x = e.explain(&probe(1, 1), SEC).unwrap();
        assert!(x.fallback);
        assert_eq!(x.backends[1].eligibility, Eligibility::TerminatingFallback);
        let (next, _) = outcome_backend(&x).unwrap();
        assert_eq!(next, be(3, 1, terminating).addr);
        assert_eq!(forwarded(&e.decide_flow(&flow(1, 1), SYN, SEC)), next);
        // An IPv6 client is explained against the IPv6 pool.
        let x6 = e
            .explain(
                &Probe {
                    target: Target::Name("default/web:http".into()),
                    client: Some("fd00::1".parse().unwrap()),
                    client_port: Some(5),
                    source: Source::Outside,
                },
                SEC,
            )
            .unwrap();
        assert_eq!(x6.frontend.unwrap().addr, "fd00::10".parse::<IpAddr>().unwrap());
        assert_eq!(outcome_backend(&x6).unwrap().0, "[fd00::9]:8080".parse().unwrap());
    }

    #[test]
    fn no_eligible_backend_is_a_reject_as_the_engine_does() {
        let e = engine();
        let gone = Conditions { ready: false, serving: false, terminating: true };
        e.upsert_service(&spec(PolicyKind::Maglev, vec![be(1, 1, gone)])).unwrap();
        let x = e.explain(&probe(1, 1), SEC).unwrap();
        assert!(matches!(x.outcome, Outcome::Reject));
        assert!(matches!(e.decide_flow(&flow(1, 1), SYN, SEC), Verdict::Reject { .. }));
    }

    #[test]
    fn maglev_says_what_it_needs_and_names_the_slot_owner() {
        let e = engine();
        let backends: Vec<_> = (1..=5).map(|i| be(i, 1, Conditions::READY)).collect();
        e.upsert_service(&spec(PolicyKind::Maglev, backends)).unwrap();
        let no_port = Probe {
            target: Target::Frontend(fe()),
            client: Some(client(1)),
            client_port: None,
            source: Source::Outside,
        };
        let x = e.explain(&no_port, SEC).unwrap();
        assert!(matches!(x.outcome, Outcome::Undetermined(why) if why.contains("port")));
        // Every slot has an owner: the shares add up to the table.
        let slots: u32 = x.backends.iter().map(|b| b.maglev_slots.unwrap()).sum();
        assert_eq!(slots as usize, crate::policy::maglev::DEFAULT_TABLE_SIZE as usize);
        let x = e.explain(&probe(1, 4242), SEC).unwrap();
        let PolicyView::Maglev { slot: Some(slot), .. } = x.policy else {
            panic!("{:?}", x.policy)
        };
        let svc = e.services().get("default/web:http").unwrap();
        let Selector::Maglev(m) = &svc.v4.selector else { unreachable!() };
        let owner = svc.v4.backends[usize::from(m.table(&svc.v4.backends)[slot])].handle.addr;
        assert_eq!(outcome_backend(&x).unwrap().0, owner);
        assert_eq!(forwarded(&e.decide_flow(&flow(1, 4242), SYN, SEC)), owner);
        // Hashing the client address alone, the address is enough.
        let mut by_source =
            spec(PolicyKind::Maglev, (1..=5).map(|i| be(i, 1, Conditions::READY)).collect());
        by_source.hash_key = Some(HashKey::SourceIp);
        e.upsert_service(&by_source).unwrap();
        let (named, _) = outcome_backend(&e.explain(&no_port, SEC).unwrap()).unwrap();
        assert_eq!(forwarded(&e.decide_flow(&flow(1, 999), SYN, SEC)), named);
        let anonymous = Probe { client: None, ..no_port };
        let x = e.explain(&anonymous, SEC).unwrap();
        assert!(matches!(x.outcome, Outcome::Undetermined(why) if why.contains("client")));
    }

    #[test]
    fn a_live_flow_keeps_its_backend_and_a_closing_one_is_decided_afresh() {
        let e = engine();
        let backends: Vec<_> = (1..=3).map(|i| be(i, 1, Conditions::READY)).collect();
        e.upsert_service(&spec(PolicyKind::RoundRobin, backends)).unwrap();
        let first = forwarded(&e.decide_flow(&flow(1, 7), SYN, SEC));
        e.decide_flow(&flow(1, 7), ACK, SEC);
        let x = e.explain(&probe(1, 7), 2 * SEC).unwrap();
        let f = x.flow.as_ref().unwrap();
        assert!(f.kept && f.state == ConnState::Established);
        assert_eq!(outcome_backend(&x), Some((first, DecidedBy::Flow)));
        assert_ne!(x.policy_choice.as_ref().unwrap().addr, first, "round-robin moved on");
        // The flow closes; a SYN on the same tuple is a new connection.
        e.decide_flow(&flow(1, 7), FIN, 3 * SEC);
        let x = e.explain(&probe(1, 7), 3 * SEC).unwrap();
        assert!(!x.flow.as_ref().unwrap().kept);
        let (next, by) = outcome_backend(&x).unwrap();
        assert_eq!(by, DecidedBy::Policy);
        assert_eq!(forwarded(&e.decide_flow(&flow(1, 7), SYN, 3 * SEC)), next);
    }

    #[test]
    fn affinity_shows_its_backend_and_the_time_left() {
        let e = engine();
        let mut s =
            spec(PolicyKind::RoundRobin, (1..=3).map(|i| be(i, 1, Conditions::READY)).collect());
        s.affinity_timeout = Some(30 * SEC);
        e.upsert_service(&s).unwrap();
        let pinned = forwarded(&e.decide_flow(&flow(1, 1), SYN, SEC));
        let x = e.explain(&probe(1, 2), 11 * SEC).unwrap();
        let a = x.affinity.as_ref().unwrap();
        assert_eq!((a.backend.addr, a.expires_in, a.in_pool), (pinned, 20 * SEC, true));
        assert_eq!(outcome_backend(&x), Some((pinned, DecidedBy::Affinity)));
        // Explaining did not refresh it: past the timeout it is gone.
        assert!(e.explain(&probe(1, 2), 31 * SEC).unwrap().affinity.is_none());
    }

    #[test]
    fn unknown_services_and_mixed_families_are_errors() {
        let e = engine();
        assert!(matches!(e.explain(&probe(1, 1), SEC), Err(ExplainError::UnknownFrontend(_))));
        let by_name = Probe {
            target: Target::Name("nope".into()),
            client: None,
            client_port: None,
            source: Source::Outside,
        };
        assert_eq!(
            e.explain(&by_name, SEC).unwrap_err(),
            ExplainError::UnknownService("nope".into())
        );
        e.upsert_service(&spec(PolicyKind::Random, vec![be(1, 1, Conditions::READY)])).unwrap();
        let v6 = Probe { client: Some("fd00::1".parse().unwrap()), ..probe(1, 1) };
        assert!(matches!(e.explain(&v6, SEC), Err(ExplainError::FamilyMismatch { .. })));
    }

    #[test]
    fn a_probe_from_the_cluster_takes_the_short_circuit_as_the_engine_does() {
        let e = Engine::new(EngineConfig::default()).unwrap();
        let cluster = ServiceSpec {
            name: "default/lb:http".into(),
            frontends: vec![Frontend {
                addr: "10.96.0.10".parse().unwrap(),
                port: 80,
                proto: Protocol::Tcp,
            }],
            backends: vec![BackendSpec {
                addr: "10.244.1.11:8080".parse().unwrap(),
                weight: 1,
                conditions: Conditions::READY,
                local: false,
            }],
            policy: Some(PolicyKind::RoundRobin),
            affinity_timeout: None,
            hash_key: None,
            short_circuit: None,
        };
        let lb_ip =
            Frontend { addr: "203.0.113.10".parse().unwrap(), port: 80, proto: Protocol::Tcp };
        let external = ServiceSpec {
            name: "default/lb:http#external".into(),
            frontends: vec![lb_ip],
            backends: vec![],
            short_circuit: Some("default/lb:http".into()),
            ..cluster.clone()
        };
        e.upsert_service(&cluster).unwrap();
        e.upsert_service(&external).unwrap();
        let probe = |source| Probe {
            target: Target::Frontend(lb_ip),
            client: Some("10.244.0.5".parse().unwrap()),
            client_port: Some(40000),
            source,
        };
        let outside = e.explain(&probe(Source::Outside), SEC).unwrap();
        assert_eq!(&*outside.service.name, "default/lb:http#external");
        assert!(outside.short_circuited_from.is_none());
        let inside = e.explain(&probe(Source::Cluster), SEC).unwrap();
        assert_eq!(&*inside.service.name, "default/lb:http");
        assert_eq!(inside.short_circuited_from.as_deref(), Some("default/lb:http#external"));
        let (backend, _) = outcome_backend(&inside).unwrap();
        assert_eq!(backend, "10.244.1.11:8080".parse().unwrap());
    }
}
