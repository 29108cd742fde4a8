//! Model-based property test of the connection table: random sequences of insert, lookup,
//! remove, time steps and full GC against a plain `HashMap` with deadlines (no cap), which
//! must agree on every answer, on the entry count and on every backend's active count.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use fastpath::conntrack::{Binding, ConnState, ConnTable, ConntrackConfig, InsertOutcome};
use fastpath::flow::{FlowKey, Nanos, Protocol, TcpFlags};
use fastpath::service::{BackendHandle, BackendId, ServiceId};
use proptest::prelude::*;

/// Short, distinct timeouts so random time steps cross every one of them.
fn config() -> ConntrackConfig {
    ConntrackConfig {
        capacity: 4096,
        shards: 4,
        tcp_syn_sent: 12,
        tcp_established: 50,
        tcp_closing: 8,
        tcp_closed: 3,
        udp: 5,
        udp_stream: 20,
        sctp: 30,
        ..ConntrackConfig::default()
    }
}

fn keys() -> Vec<FlowKey> {
    let v4 = |n| IpAddr::V4(Ipv4Addr::new(10, 0, 0, n));
    let v6 = |n| IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, n));
    vec![
        FlowKey::new(Protocol::Tcp, v4(1), 1000, v4(100), 80),
        FlowKey::new(Protocol::Tcp, v4(1), 1001, v4(100), 80),
        FlowKey::new(Protocol::Tcp, v6(1), 1000, v6(100), 80),
        FlowKey::new(Protocol::Udp, v4(2), 53, v4(100), 53),
        FlowKey::new(Protocol::Udp, v6(2), 53, v6(100), 53),
        FlowKey::new(Protocol::Sctp, v4(3), 7, v4(100), 7),
    ]
}

#[derive(Clone, Debug)]
enum Op {
    Insert { key: usize, backend: usize, flags: Option<u8> },
    Lookup { key: usize, flags: Option<u8> },
    Remove { key: usize },
    Advance(Nanos),
    GcAll,
}

fn flags() -> impl Strategy<Value = Option<u8>> {
    prop_oneof![
        Just(None),
        Just(Some(TcpFlags::SYN)),
        Just(Some(TcpFlags::ACK)),
        Just(Some(TcpFlags::SYN | TcpFlags::ACK)),
        Just(Some(TcpFlags::FIN | TcpFlags::ACK)),
        Just(Some(TcpFlags::RST)),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..6usize, 0..3usize, flags())
            .prop_map(|(key, backend, flags)| Op::Insert { key, backend, flags }),
        4 => (0..6usize, flags()).prop_map(|(key, flags)| Op::Lookup { key, flags }),
        1 => (0..6usize).prop_map(|key| Op::Remove { key }),
        2 => (0..25 as Nanos).prop_map(Op::Advance),
        1 => Just(Op::GcAll),
    ]
}

/// The model's entry: backend index, state, absolute deadline.
type Model = HashMap<usize, (usize, ConnState, Nanos)>;

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn table_matches_model(ops in prop::collection::vec(op(), 1..120)) {
        let cfg = config();
        let table = ConnTable::new(cfg);
        let keys = keys();
        let backends: Vec<Arc<BackendHandle>> = (0..3)
            .map(|i| Arc::new(BackendHandle::new(BackendId(i), SocketAddr::from(([10, 9, 0, i as u8], 80)))))
            .collect();
        let mut model: Model = HashMap::new();
        let mut now: Nanos = 0;

        for op in ops {
            match op {
                Op::Insert { key, backend, flags } => {
                    let k = keys[key];
                    let f = flags.map(TcpFlags);
                    let binding = Binding { service: ServiceId(backend as u32), backend: Arc::clone(&backends[backend]) };
                    let got = table.insert(k, binding, f, now);
                    let live = matches!(model.get(&key), Some(&(_, _, exp)) if now < exp);
                    let state = ConnState::initial(k.proto, f);
                    model.insert(key, (backend, state, now + cfg.timeout(state)));
                    let want = if live { InsertOutcome::Replaced } else { InsertOutcome::Inserted };
                    prop_assert_eq!(got, want);
                }
                Op::Lookup { key, flags } => {
                    let k = keys[key];
                    let f = flags.map(TcpFlags);
                    let got = table.lookup(&k, f, now).map(|b| (b.backend.id.0 as usize, b.service.0 as usize));
                    let want = match model.get(&key).copied() {
                        None => None,
                        Some((_, _, exp)) if now >= exp => {
                            model.remove(&key);
                            None
                        }
                        Some((b, state, _)) => match state.on_packet(f) {
                            None => {
                                model.remove(&key);
                                None
                            }
                            Some(next) => {
                                model.insert(key, (b, next, now + cfg.timeout(next)));
                                Some((b, b))
                            }
                        },
                    };
                    prop_assert_eq!(got, want);
                }
                Op::Remove { key } => {
                    prop_assert_eq!(table.remove(&keys[key]), model.remove(&key).is_some());
                }
                Op::Advance(dt) => now += dt,
                Op::GcAll => {
                    let expired = model.values().filter(|&&(_, _, exp)| now >= exp).count();
                    model.retain(|_, &mut (_, _, exp)| now < exp);
                    prop_assert_eq!(table.gc(now, usize::MAX), expired);
                }
            }

            // Same entries (expired-but-uncollected included), same per-backend counts.
            prop_assert_eq!(table.len(), model.len());
            for (i, b) in backends.iter().enumerate() {
                let want = model.values().filter(|&&(bi, _, _)| bi == i).count();
                prop_assert_eq!(b.active() as usize, want, "backend {}", i);
            }
            // The live view agrees too: state names and remaining time.
            let mut snap: Vec<(FlowKey, &str, Nanos)> =
                table.snapshot(usize::MAX, now).into_iter().map(|s| (s.key, s.state, s.expires_in)).collect();
            let mut want: Vec<(FlowKey, &str, Nanos)> = model
                .iter()
                .filter(|(_, &(_, _, exp))| now < exp)
                .map(|(&k, &(_, st, exp))| (keys[k], st.as_str(), exp - now))
                .collect();
            let order = |a: &(FlowKey, &str, Nanos)| (a.0.src_port, a.0.src.to_string(), a.0.proto);
            snap.sort_by_key(order);
            want.sort_by_key(order);
            prop_assert_eq!(snap, want);
            let s = table.stats();
            prop_assert_eq!(s.entries, s.inserts - s.replaced - s.evictions - s.expirations() - s.removals);
        }
        drop(table);
        prop_assert!(backends.iter().all(|b| b.active() == 0));
    }
}
