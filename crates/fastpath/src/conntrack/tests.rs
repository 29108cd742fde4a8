//! Unit tests of the connection and affinity tables (state, timeouts, LRU, expiry, GC,
//! counts, memory). The model-based property test and the threaded test live in
//! `crates/fastpath/tests/conntrack_*.rs`.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ahash::RandomState;

use super::shard::Node;
use super::table::ConnEntry;
use super::*;
use crate::flow::{FlowKey, Nanos, Protocol, TcpFlags, NANOS_PER_SEC};
use crate::service::{BackendHandle, BackendId, ServiceId};

const S: Nanos = NANOS_PER_SEC;
const SYN: Option<TcpFlags> = Some(TcpFlags(TcpFlags::SYN));
const ACK: Option<TcpFlags> = Some(TcpFlags(TcpFlags::ACK));
const FIN: Option<TcpFlags> = Some(TcpFlags(TcpFlags::FIN | TcpFlags::ACK));
const RST: Option<TcpFlags> = Some(TcpFlags(TcpFlags::RST));

fn seeds() -> RandomState {
    RandomState::with_seeds(11, 22, 33, 44)
}

fn table(capacity: usize, shards: usize) -> ConnTable {
    ConnTable::with_hasher(ConntrackConfig { capacity, shards, ..Default::default() }, seeds())
}

fn backend(id: u32) -> Arc<BackendHandle> {
    let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 1, 0, id as u8)), 8080);
    Arc::new(BackendHandle::new(BackendId(id), addr))
}

fn bind(service: u32, b: &Arc<BackendHandle>) -> Binding {
    Binding { service: ServiceId(service), backend: Arc::clone(b) }
}

fn key(proto: Protocol, client_port: u16) -> FlowKey {
    FlowKey::new(
        proto,
        IpAddr::V4(Ipv4Addr::new(192, 168, 0, 1)),
        client_port,
        IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10)),
        80,
    )
}

fn tcp(port: u16) -> FlowKey {
    key(Protocol::Tcp, port)
}

fn udp(port: u16) -> FlowKey {
    key(Protocol::Udp, port)
}

/// The entry's (state, expires_in) through the public snapshot.
fn state_of(t: &ConnTable, k: &FlowKey, now: Nanos) -> Option<(&'static str, Nanos)> {
    t.snapshot(usize::MAX, now).into_iter().find(|s| s.key == *k).map(|s| (s.state, s.expires_in))
}

/// Entries per backend id, expired-but-uncollected ones included (they still count).
fn per_backend(t: &ConnTable) -> HashMap<u32, u32> {
    let mut m = HashMap::new();
    for shard in t.inner_for_tests().shards() {
        let g = shard.lock();
        for n in g.map.iter_mru() {
            *m.entry(n.value().backend_id().0).or_insert(0) += 1;
        }
        g.map.check();
    }
    m
}

fn assert_counts(t: &ConnTable, backends: &[Arc<BackendHandle>]) {
    let m = per_backend(t);
    for b in backends {
        assert_eq!(b.active(), m.get(&b.id.0).copied().unwrap_or(0), "backend {}", b.id.0);
    }
    let s = t.stats();
    assert_eq!(
        s.entries,
        s.inserts - s.replaced - s.evictions - s.expired_gc - s.expired_lazy - s.removals,
        "{s:?}"
    );
    assert_eq!(s.entries as usize, t.len());
}

#[test]
fn memory_per_entry() {
    let conn = std::mem::size_of::<Node<FlowKey, ConnEntry>>();
    let aff = std::mem::size_of::<Node<affinity::AffinityKey, Arc<BackendHandle>>>();
    assert_eq!(CONN_NODE_BYTES, conn);
    assert!(conn <= 72, "conntrack node is {conn} bytes");
    assert!(aff <= 48, "affinity node is {aff} bytes");
    assert_eq!(std::mem::size_of::<ConnEntry>(), 16);
    // Index: 8-byte slots, 2 per entry at the default 4 096 entries per shard.
    let cfg = ConntrackConfig::default();
    let per_shard = (cfg.capacity / cfg.shards) as u32;
    let index_bytes = shard::index_slots(per_shard) * 8;
    assert_eq!(index_bytes / per_shard as usize, 16);
}

#[test]
fn tcp_handshake_to_established() {
    let t = table(64, 4);
    let b = backend(1);
    let k = tcp(40000);
    assert_eq!(t.insert(k, bind(1, &b), SYN, 0), InsertOutcome::Inserted);
    assert_eq!(state_of(&t, &k, 0), Some(("SYN_SENT", 120 * S)));
    // Retransmitted SYN: same flow, same backend.
    assert_eq!(t.lookup(&k, SYN, S).unwrap().backend.id, b.id);
    assert_eq!(state_of(&t, &k, S), Some(("SYN_SENT", 120 * S)));
    assert!(t.lookup(&k, ACK, 2 * S).is_some());
    assert_eq!(state_of(&t, &k, 2 * S), Some(("ESTABLISHED", 86_400 * S)));
    // Idle just under a day: still there, and refreshed.
    let later = 2 * S + 86_400 * S - 1;
    assert!(t.lookup(&k, ACK, later).is_some());
    assert_eq!(state_of(&t, &k, later), Some(("ESTABLISHED", 86_400 * S)));
    assert_eq!(b.active(), 1);
}

#[test]
fn tcp_syn_sent_times_out() {
    let t = table(64, 4);
    let b = backend(1);
    let k = tcp(1);
    t.insert(k, bind(1, &b), SYN, 0);
    assert!(t.lookup(&k, SYN, 120 * S - 1).is_some());
    assert!(t.lookup(&k, ACK, 2 * 120 * S - 1).is_none(), "idle for exactly 120 s");
    assert_eq!(t.stats().expired_lazy, 1);
    assert_eq!(b.active(), 0);
    assert!(t.is_empty());
}

#[test]
fn tcp_fin_and_rst_expire_fast() {
    let t = table(64, 4);
    let b = backend(1);
    let (k1, k2) = (tcp(1), tcp(2));
    t.insert(k1, bind(1, &b), SYN, 0);
    t.insert(k2, bind(1, &b), SYN, 0);
    t.lookup(&k1, ACK, S);
    t.lookup(&k2, ACK, S);
    t.lookup(&k1, FIN, 2 * S);
    t.lookup(&k2, RST, 2 * S);
    assert_eq!(state_of(&t, &k1, 2 * S), Some(("CLOSING", 120 * S)));
    assert_eq!(state_of(&t, &k2, 2 * S), Some(("CLOSED", 10 * S)));
    // Late ACKs keep the closing state (and refresh its short timeout).
    assert!(t.lookup(&k1, ACK, 3 * S).is_some());
    assert_eq!(state_of(&t, &k1, 3 * S), Some(("CLOSING", 120 * S)));
    assert!(t.lookup(&k2, ACK, 3 * S).is_some());
    assert_eq!(state_of(&t, &k2, 3 * S), Some(("CLOSED", 10 * S)));
    assert_eq!(t.gc(13 * S, 100), 1, "RST flow gone after 10 s");
    assert_eq!(t.gc(123 * S, 100), 1, "FIN flow gone after 120 s");
    assert_eq!(b.active(), 0);
    assert_eq!(t.stats().expired_gc, 2);
}

#[test]
fn syn_on_closed_flow_starts_a_new_one() {
    let t = table(64, 4);
    let (b1, b2) = (backend(1), backend(2));
    let k = tcp(7);
    for (i, close) in [FIN, RST].into_iter().enumerate() {
        let now = i as Nanos * 1000 * S;
        t.insert(k, bind(1, &b1), SYN, now);
        t.lookup(&k, ACK, now + 1);
        t.lookup(&k, close, now + 2);
        // A non-initial SYN does not reopen.
        let syn_ack = Some(TcpFlags(TcpFlags::SYN | TcpFlags::ACK));
        assert!(t.lookup(&k, syn_ack, now + 3).is_some());
        // Port reuse: the old entry goes, the caller balances again.
        assert!(t.lookup(&k, SYN, now + 4).is_none());
        assert!(t.is_empty());
        assert_eq!(b1.active(), 0);
        assert_eq!(t.insert(k, bind(1, &b2), SYN, now + 4), InsertOutcome::Inserted);
        assert_eq!(t.lookup(&k, ACK, now + 5).unwrap().backend.id, b2.id);
        t.remove(&k);
    }
    assert_eq!(t.stats().removals, 4, "two port reuses, two removes");
    assert_counts(&t, &[b1, b2]);
}

#[test]
fn midstream_pickup_and_unknown_flags() {
    let t = table(64, 4);
    let b = backend(1);
    t.insert(tcp(1), bind(1, &b), ACK, 0);
    t.insert(tcp(2), bind(1, &b), None, 0);
    t.insert(tcp(3), bind(1, &b), SYN, 0);
    assert_eq!(state_of(&t, &tcp(1), 0).unwrap().0, "ESTABLISHED");
    assert_eq!(state_of(&t, &tcp(2), 0).unwrap().0, "ESTABLISHED");
    // No flags: no transition, but the timeout restarts.
    assert!(t.lookup(&tcp(3), None, 5 * S).is_some());
    assert_eq!(state_of(&t, &tcp(3), 5 * S), Some(("SYN_SENT", 120 * S)));
}

#[test]
fn udp_single_then_stream() {
    let t = table(64, 4);
    let b = backend(1);
    let (one, two) = (udp(53), udp(54));
    t.insert(one, bind(1, &b), None, 0);
    t.insert(two, bind(1, &b), None, 0);
    assert_eq!(state_of(&t, &one, 0), Some(("UDP", 30 * S)));
    assert!(t.lookup(&two, None, 29 * S).is_some());
    assert_eq!(state_of(&t, &two, 29 * S), Some(("UDP_STREAM", 120 * S)));
    assert!(t.lookup(&one, None, 30 * S).is_none(), "a one-packet flow lives 30 s");
    assert!(t.lookup(&two, None, 29 * S + 120 * S - 1).is_some(), "a stream lives 120 s");
    assert!(t.lookup(&two, None, 2 * (29 * S + 120 * S)).is_none());
    assert_eq!(b.active(), 0);
}

#[test]
fn sctp_plain_idle_timeout() {
    let t = table(64, 4);
    let b = backend(1);
    let k = key(Protocol::Sctp, 9);
    t.insert(k, bind(1, &b), SYN, 0);
    assert_eq!(state_of(&t, &k, 0), Some(("SCTP", 210 * S)));
    assert!(t.lookup(&k, None, 200 * S).is_some());
    assert_eq!(state_of(&t, &k, 200 * S), Some(("SCTP", 210 * S)));
    assert!(t.lookup(&k, None, 410 * S).is_none());
}

#[test]
fn ipv4_and_ipv6_keys_are_distinct() {
    let t = table(64, 4);
    let (b1, b2) = (backend(1), backend(2));
    let v4 = FlowKey::new(
        Protocol::Tcp,
        IpAddr::V4(Ipv4Addr::new(0, 0, 0, 1)),
        1,
        IpAddr::V4(Ipv4Addr::new(0, 0, 0, 2)),
        2,
    );
    let v6 = FlowKey::new(
        Protocol::Tcp,
        IpAddr::V6(Ipv6Addr::from(1u128)),
        1,
        IpAddr::V6(Ipv6Addr::from(2u128)),
        2,
    );
    t.insert(v4, bind(1, &b1), SYN, 0);
    t.insert(v6, bind(1, &b2), SYN, 0);
    assert_eq!(t.len(), 2);
    assert_eq!(t.lookup(&v4, ACK, 1).unwrap().backend.id, b1.id);
    assert_eq!(t.lookup(&v6, ACK, 1).unwrap().backend.id, b2.id);
    assert!(t.lookup(&v6.reversed(), ACK, 1).is_none(), "keys are directional");
}

#[test]
fn replace_moves_the_count() {
    let t = table(64, 4);
    let (b1, b2) = (backend(1), backend(2));
    let k = udp(1);
    assert_eq!(t.insert(k, bind(1, &b1), None, 0), InsertOutcome::Inserted);
    assert_eq!(t.insert(k, bind(1, &b1), None, 1), InsertOutcome::Replaced);
    assert_eq!((b1.active(), b2.active()), (1, 0));
    assert_eq!(t.insert(k, bind(2, &b2), None, 2), InsertOutcome::Replaced);
    assert_eq!((b1.active(), b2.active()), (0, 1));
    assert_eq!(t.lookup(&k, None, 3).unwrap().service, ServiceId(2));
    // Replacing an expired entry is an insert plus a (lazy) expiration.
    assert_eq!(t.insert(k, bind(1, &b1), None, 1000 * S), InsertOutcome::Inserted);
    assert_eq!((b1.active(), b2.active()), (1, 0));
    let s = t.stats();
    assert_eq!((s.inserts, s.replaced, s.expired_lazy, s.entries), (4, 2, 1, 1));
    assert_eq!(&s.pairs()[..3], &[("entries", 1), ("capacity", 64), ("inserts", 4)]);
    assert_counts(&t, &[b1, b2]);
}

#[test]
fn lru_eviction_order_at_capacity() {
    let t = table(3, 1);
    let b = backend(1);
    let [a, b_, c, d, e] = [1, 2, 3, 4, 5].map(tcp);
    for (i, k) in [a, b_, c].iter().enumerate() {
        assert_eq!(t.insert(*k, bind(1, &b), SYN, i as Nanos), InsertOutcome::Inserted);
    }
    assert!(t.lookup(&a, ACK, 10).is_some()); // a is now most recent: b_ is the victim
    assert_eq!(t.insert(d, bind(1, &b), SYN, 11), InsertOutcome::Evicted(b_));
    assert_eq!(t.insert(e, bind(1, &b), SYN, 12), InsertOutcome::Evicted(c));
    assert_eq!(t.len(), 3);
    assert!(t.lookup(&b_, ACK, 13).is_none());
    assert!(t.lookup(&c, ACK, 13).is_none());
    assert!(t.lookup(&a, ACK, 13).is_some());
    assert_eq!(t.insert(b_, bind(1, &b), SYN, 14), InsertOutcome::Evicted(d));
    assert_eq!(b.active(), 3);
    assert_eq!(t.stats().evictions, 3);
    // Snapshot lists most recent first within the shard.
    let order: Vec<FlowKey> = t.snapshot(10, 15).into_iter().map(|s| s.key).collect();
    assert_eq!(order, vec![b_, a, e]);
    assert_counts(&t, &[b]);
}

#[test]
fn full_shard_reclaims_expired_victim_without_eviction() {
    let t = table(2, 1);
    let b = backend(1);
    t.insert(udp(1), bind(1, &b), None, 0);
    t.insert(udp(2), bind(1, &b), None, 100 * S);
    // udp(1) (the LRU) expired at 30 s: taking its slot is an expiration, not an eviction.
    assert_eq!(t.insert(udp(3), bind(1, &b), None, 101 * S), InsertOutcome::Inserted);
    let s = t.stats();
    assert_eq!((s.evictions, s.expired_lazy, s.entries), (0, 1, 2));
    assert_counts(&t, &[b]);
}

#[test]
fn capacity_is_split_exactly() {
    let t = table(10, 4);
    assert_eq!(t.capacity(), 10);
    let b = backend(1);
    for p in 0..1000 {
        t.insert(udp(p), bind(1, &b), None, 0);
        assert!(t.len() <= 10);
    }
    assert_eq!(t.len(), 10);
    assert_eq!(b.active(), 10);
    // More shards than entries: shards shrink so none has a zero cap.
    let tiny = table(3, 64);
    for p in 0..100 {
        tiny.insert(udp(p), bind(1, &b), None, 0);
    }
    assert_eq!(tiny.len(), 3);
    assert_eq!(b.active(), 13);
}

#[test]
fn gc_budget_is_bounded() {
    let t = table(1000, 4);
    let b = backend(1);
    for p in 0..100 {
        t.insert(udp(p), bind(1, &b), None, 0);
    }
    for p in 100..110 {
        t.insert(udp(p), bind(1, &b), None, 20 * S); // still live at 31 s
    }
    assert_eq!(t.gc(31 * S, 0), 0);
    let mut calls = 0;
    let mut removed = 0;
    loop {
        let before = t.stats().expired_gc;
        let r = t.gc(31 * S, 10);
        assert!(r <= 10, "budget 10 removed {r}");
        assert_eq!(t.stats().expired_gc - before, r as u64);
        removed += r;
        calls += 1;
        if removed == 100 {
            break;
        }
        assert!(calls < 100, "gc makes no progress");
    }
    // 110 slots, 10 per call: every expired entry is reached within a lap or two.
    assert!(calls <= 22, "{calls} calls");
    assert_eq!(t.len(), 10);
    assert_eq!(b.active(), 10);
    // A big budget visits each slot at most once per call.
    assert_eq!(t.gc(31 * S, usize::MAX), 0);
    assert_eq!(t.gc(1000 * S, usize::MAX), 10);
    assert_eq!(b.active(), 0);
}

#[test]
fn gc_examines_at_most_budget_slots() {
    // Internal view: count slots examined by a budget-10 call on a 1-shard table.
    let s: sharded::Sharded<FlowKey, ConnEntry> = sharded::Sharded::new(100, 1, seeds());
    let b = backend(1);
    for p in 0..50 {
        b.conn_opened();
        s.insert(udp(p), ConnEntry::new(&bind(1, &b), ConnState::Udp), 10, 0, ConnEntry::release);
    }
    let mut seen = 0;
    let removed = s.gc(5, 10, |_| seen += 1);
    assert_eq!((removed, seen), (0, 0), "nothing expired at 5");
    let removed = s.gc(10, 10, |r| r.value.release());
    assert_eq!(removed, 10, "exactly the budget when every slot is an expired entry");
    assert_eq!(s.len(), 40);
    assert_eq!(b.active(), 40);
    s.remove_where(|_, _| true, |r| r.value.release());
    assert_eq!(b.active(), 0);
}

#[test]
fn lazy_expiry_on_lookup() {
    let t = table(64, 4);
    let b = backend(1);
    t.insert(udp(1), bind(1, &b), None, 0);
    assert_eq!(t.len(), 1);
    assert!(t.snapshot(10, 30 * S).is_empty(), "snapshot hides expired entries");
    assert_eq!(t.len(), 1, "still stored until met");
    assert!(t.lookup(&udp(1), None, 30 * S).is_none());
    assert_eq!(t.len(), 0);
    assert_eq!(t.stats().expired_lazy, 1);
    assert_eq!(b.active(), 0);
}

#[test]
fn flush_backend_and_service() {
    let t = table(4096, 8);
    let bs: Vec<_> = (0..4).map(backend).collect();
    for p in 0..1000u16 {
        let b = &bs[p as usize % 4];
        t.insert(udp(p), bind(u32::from(p % 3), b), None, 0);
    }
    assert_eq!(bs[1].active(), 250);
    assert_eq!(t.flush_backend(BackendId(1)), 250);
    assert_eq!(bs[1].active(), 0);
    assert_eq!(t.flush_backend(BackendId(1)), 0);
    assert!(t.lookup(&udp(1), None, 1).is_none());
    assert!(t.lookup(&udp(2), None, 1).is_some());
    let svc0 = (0..1000u16).filter(|p| p % 3 == 0 && p % 4 != 1).count();
    assert_eq!(t.flush_service(ServiceId(0)), svc0);
    assert_eq!(t.len(), 1000 - 250 - svc0);
    assert_counts(&t, &bs);
    assert_eq!(t.stats().removals as usize, 250 + svc0);
    assert_eq!(t.clear(), 1000 - 250 - svc0);
    assert!(bs.iter().all(|b| b.active() == 0));
}

#[test]
fn flush_backend_proto_is_scoped() {
    let t = table(256, 4);
    let (b1, b2) = (backend(1), backend(2));
    for p in 0..10 {
        t.insert(udp(p), bind(1, &b1), None, 0);
        t.insert(tcp(p), bind(1, &b1), SYN, 0);
        t.insert(udp(100 + p), bind(2, &b1), None, 0); // same backend, other service
        t.insert(udp(200 + p), bind(1, &b2), None, 0); // same service, other backend
    }
    assert_eq!(t.flush_backend_proto(ServiceId(1), b1.id, Protocol::Udp), 10);
    assert_eq!(t.flush_backend_proto(ServiceId(1), b1.id, Protocol::Udp), 0);
    assert_eq!(t.len(), 30);
    assert!(t.lookup(&tcp(3), ACK, 1).is_some());
    assert!(t.lookup(&udp(103), None, 1).is_some());
    assert!(t.lookup(&udp(3), None, 1).is_none());
    assert_eq!((b1.active(), b2.active()), (20, 10));
    assert_counts(&t, &[b1, b2]);
}

#[test]
fn dropping_the_table_releases_counts() {
    let b = backend(1);
    {
        let t = table(64, 4);
        for p in 0..20 {
            t.insert(udp(p), bind(1, &b), None, 0);
        }
        assert_eq!(b.active(), 20);
    }
    assert_eq!(b.active(), 0);
    assert_eq!(Arc::strong_count(&b), 1);
}

#[test]
fn active_counts_stay_exact_under_churn() {
    // A deterministic pseudo-random mix of every way an entry can come and go.
    let t = table(200, 8);
    let bs: Vec<_> = (0..5).map(backend).collect();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut now = 0;
    for i in 0..20_000u32 {
        let r = next();
        let k = if r & 1 == 0 { tcp((r >> 8) as u16 % 600) } else { udp((r >> 8) as u16 % 600) };
        let flags = Some(TcpFlags(
            [TcpFlags::SYN, TcpFlags::ACK, TcpFlags::FIN, TcpFlags::RST][(r >> 30) as usize % 4],
        ));
        let b = &bs[(r >> 40) as usize % bs.len()];
        match (r >> 50) % 16 {
            0..=6 => {
                t.insert(k, bind((r >> 60) as u32 % 3, b), flags, now);
            }
            7..=10 => {
                t.lookup(&k, flags, now);
            }
            11 | 12 => {
                t.remove(&k);
            }
            13 => {
                t.gc(now, 37);
            }
            _ => now += (r >> 20) % (2 * S),
        }
        if i % 1000 == 0 {
            t.flush_backend(bs[(r >> 4) as usize % bs.len()].id);
            t.flush_service(ServiceId((r >> 5) as u32 % 3));
        }
        if i % 97 == 0 {
            assert_counts(&t, &bs);
        }
    }
    assert_counts(&t, &bs);
    let s = t.stats();
    assert!(s.evictions > 0 && s.expired_gc > 0 && s.expired_lazy > 0 && s.removals > 0, "{s:?}");
    t.clear();
    assert!(bs.iter().all(|b| b.active() == 0));
}

#[test]
fn lookup_with_lends_the_binding() {
    let t = table(64, 4);
    let b = backend(3);
    t.insert(tcp(1), bind(9, &b), SYN, 0);
    let strong = Arc::strong_count(&b);
    let got = t.lookup_with(&tcp(1), ACK, 1, |svc, be| (svc, be.id, be.addr));
    assert_eq!(got, Some((ServiceId(9), b.id, b.addr)));
    assert_eq!(Arc::strong_count(&b), strong, "no Arc clone");
    assert_eq!(state_of(&t, &tcp(1), 1).unwrap().0, "ESTABLISHED");
}

#[test]
fn snapshot_fields_and_limit() {
    let t = table(64, 4);
    let b = backend(4);
    for p in 0..10 {
        t.insert(tcp(p), bind(7, &b), SYN, 0);
    }
    assert_eq!(t.snapshot(3, 0).len(), 3);
    let all = t.snapshot(100, 5 * S);
    assert_eq!(all.len(), 10);
    let s = &all[0];
    assert_eq!((s.service, s.backend_id, s.backend), (ServiceId(7), b.id, b.addr));
    assert_eq!((s.state, s.expires_in), ("SYN_SENT", 115 * S));
}

#[test]
fn config_defaults() {
    let c = ConntrackConfig::default();
    assert_eq!(c.capacity, 262_144);
    assert_eq!(c.tcp_syn_sent, 120 * S);
    assert_eq!(c.tcp_established, 86_400 * S);
    assert_eq!(c.tcp_closing, 120 * S);
    assert_eq!(c.tcp_closed, 10 * S);
    assert_eq!(c.udp, 30 * S);
    assert_eq!(c.udp_stream, 120 * S);
    assert_eq!(c.sctp, 210 * S);
    assert_eq!(c.affinity_timeout, 10_800 * S);
    assert_eq!(c.timeout(ConnState::Closed), 10 * S);
}

// ---- affinity ----

fn client(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(172, 16, 0, n))
}

#[test]
fn affinity_pins_until_idle_timeout() {
    let a = AffinityTable::with_hasher(100, 4, seeds());
    let b = backend(1);
    let svc = ServiceId(1);
    let timeout = 10_800 * S;
    assert!(a.lookup(svc, client(1), timeout, 0).is_none());
    assert!(!a.insert(svc, client(1), Arc::clone(&b), timeout, 0));
    // Each use restarts the timeout: three hours apart minus 1 ns, repeatedly.
    let mut now = 0;
    for _ in 0..5 {
        now += timeout - 1;
        assert_eq!(a.lookup(svc, client(1), timeout, now).unwrap().id, b.id);
    }
    assert!(a.lookup(svc, client(2), timeout, now).is_none(), "per client");
    assert!(a.lookup(ServiceId(2), client(1), timeout, now).is_none(), "per service");
    assert!(a.lookup(svc, client(1), timeout, now + timeout).is_none(), "idle too long");
    assert!(a.is_empty());
    assert_eq!(b.active(), 0, "affinity is not a connection");
    assert_eq!(a.stats().expired_lazy, 1);
}

#[test]
fn affinity_flush_gc_and_cap() {
    let a = AffinityTable::with_hasher(8, 1, seeds());
    let (b1, b2) = (backend(1), backend(2));
    for n in 0..4 {
        a.insert(ServiceId(1), client(n), Arc::clone(&b1), 10 * S, 0);
        a.insert(ServiceId(2), client(n), Arc::clone(&b2), 100 * S, 0);
    }
    assert_eq!(a.len(), 8);
    // Full: the least recently used pin is evicted.
    assert!(a.lookup(ServiceId(1), client(0), 10 * S, 1).is_some());
    assert!(a.insert(ServiceId(3), client(9), Arc::clone(&b1), 10 * S, 2));
    assert!(a.lookup(ServiceId(2), client(0), 100 * S, 3).is_none(), "oldest pin evicted");
    assert_eq!(a.flush_backend(b2.id), 3);
    assert_eq!(a.len(), 5);
    assert_eq!(a.flush_service(ServiceId(3)), 1);
    assert_eq!(a.gc(5 * S, 100), 0);
    assert_eq!(a.gc(12 * S, 100), 4);
    assert!(a.is_empty());
    assert!(!a.remove(ServiceId(1), client(1)));
    assert_eq!(Arc::strong_count(&b1), 1, "the table let go of every handle");
}

#[test]
fn affinity_ipv6_clients() {
    let a = AffinityTable::with_hasher(100, 4, seeds());
    let b = backend(1);
    let c6 = IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1));
    let c4 = IpAddr::V4(Ipv4Addr::new(0, 0, 0, 1));
    a.insert(ServiceId(1), c6, Arc::clone(&b), S, 0);
    assert!(a.lookup(ServiceId(1), c4, S, 0).is_none());
    assert!(a.lookup(ServiceId(1), c6, S, 0).is_some());
    assert!(a.remove(ServiceId(1), c6));
    assert!(a.is_empty());
}
