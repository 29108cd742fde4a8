//! The connection and affinity tables used from several threads at once: no deadlock,
//! no lost entry, and backend active counts exact once the dust settles.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;

use fastpath::conntrack::{AffinityTable, Binding, ConnTable, ConntrackConfig, InsertOutcome};
use fastpath::flow::{FlowKey, Nanos, Protocol, TcpFlags, NANOS_PER_SEC};
use fastpath::service::{BackendHandle, BackendId, ServiceId};

const THREADS: usize = 4;
const OPS: u64 = 50_000;

fn backends(n: u32) -> Vec<Arc<BackendHandle>> {
    (0..n)
        .map(|i| {
            Arc::new(BackendHandle::new(BackendId(i), SocketAddr::from(([10, 2, 0, i as u8], 80))))
        })
        .collect()
}

fn xorshift(mut x: u64) -> impl FnMut() -> u64 {
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

fn flow(n: u64) -> FlowKey {
    let proto = if n.is_multiple_of(2) { Protocol::Tcp } else { Protocol::Udp };
    let src = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | (n as u32 >> 4)));
    FlowKey::new(proto, src, 1024 + (n % 16) as u16, IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1)), 443)
}

#[test]
fn four_workers_and_a_janitor() {
    // Small enough that workers evict each other's flows all the time.
    let table = Arc::new(ConnTable::new(ConntrackConfig {
        capacity: 2048,
        shards: 16,
        ..Default::default()
    }));
    let bs = Arc::new(backends(6));
    let barrier = Arc::new(Barrier::new(THREADS + 1));
    let stop = Arc::new(AtomicBool::new(false));

    let workers: Vec<_> = (0..THREADS)
        .map(|w| {
            let (table, bs, barrier) = (Arc::clone(&table), Arc::clone(&bs), Arc::clone(&barrier));
            thread::spawn(move || {
                let mut rng = xorshift(0x1234_5678 + w as u64 * 7919);
                let mut evicted = 0u64;
                barrier.wait();
                for i in 0..OPS {
                    let r = rng();
                    let key = flow(r % 5000); // overlapping key space across workers
                    let now: Nanos = i * NANOS_PER_SEC / 100;
                    let flags = Some(TcpFlags(
                        [TcpFlags::SYN, TcpFlags::ACK, TcpFlags::FIN][(r >> 20) as usize % 3],
                    ));
                    match (r >> 32) % 10 {
                        0..=3 => {
                            if table.lookup(&key, flags, now).is_none() {
                                let b = &bs[(r >> 40) as usize % bs.len()];
                                let binding =
                                    Binding { service: ServiceId(1), backend: Arc::clone(b) };
                                if let InsertOutcome::Evicted(_) =
                                    table.insert(key, binding, flags, now)
                                {
                                    evicted += 1;
                                }
                            }
                        }
                        4..=7 => {
                            let _ = table.lookup_with(&key, flags, now, |_, b| b.id);
                        }
                        8 => {
                            table.remove(&key);
                        }
                        _ => {
                            table.gc(now, 64);
                        }
                    }
                }
                evicted
            })
        })
        .collect();

    let janitor = {
        let (table, bs, barrier, stop) =
            (Arc::clone(&table), Arc::clone(&bs), Arc::clone(&barrier), Arc::clone(&stop));
        thread::spawn(move || {
            barrier.wait();
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                table.gc(round * NANOS_PER_SEC, 256);
                if round.is_multiple_of(50) {
                    table.flush_backend(bs[(round / 50) as usize % bs.len()].id);
                    let _ = table.snapshot(100, round);
                }
                round += 1;
                thread::yield_now();
            }
        })
    };

    let evicted: u64 = workers.into_iter().map(|h| h.join().expect("worker panicked")).sum();
    stop.store(true, Ordering::Relaxed);
    janitor.join().expect("janitor panicked");

    let s = table.stats();
    assert_eq!(s.evictions, evicted, "every eviction reported to its inserter");
    assert!(s.evictions > 0, "{s:?}");
    assert_eq!(s.entries as usize, table.len());
    assert!(table.len() <= 2048);
    assert_eq!(
        s.entries,
        s.inserts - s.replaced - s.evictions - s.expirations() - s.removals,
        "{s:?}"
    );

    // Every backend's count equals the entries bound to it (expired ones still count).
    let all = table.snapshot(usize::MAX, 0);
    assert_eq!(all.len(), table.len());
    for b in bs.iter() {
        let n = all.iter().filter(|c| c.backend_id == b.id).count();
        assert_eq!(b.active() as usize, n, "backend {}", b.id.0);
    }
    assert_eq!(table.clear(), all.len());
    assert!(bs.iter().all(|b| b.active() == 0));
}

#[test]
fn affinity_from_four_threads() {
    let aff = Arc::new(AffinityTable::with_hasher(512, 8, ahash::RandomState::new()));
    let bs = Arc::new(backends(3));
    let handles: Vec<_> = (0..THREADS)
        .map(|w| {
            let (aff, bs) = (Arc::clone(&aff), Arc::clone(&bs));
            thread::spawn(move || {
                let mut rng = xorshift(99 + w as u64);
                for i in 0..OPS / 2 {
                    let r = rng();
                    let client = IpAddr::V4(Ipv4Addr::from(r as u32 % 2000));
                    let svc = ServiceId((r >> 40) as u32 % 4);
                    let now = i * 1000;
                    if aff.lookup(svc, client, 1_000_000, now).is_none() {
                        aff.insert(
                            svc,
                            client,
                            Arc::clone(&bs[(r >> 50) as usize % 3]),
                            1_000_000,
                            now,
                        );
                    }
                    if r.is_multiple_of(1000) {
                        aff.gc(now, 128);
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("affinity worker panicked");
    }
    assert!(aff.len() <= 512);
    let s = aff.stats();
    assert_eq!(s.entries, s.inserts - s.replaced - s.evictions - s.expirations() - s.removals);
    assert!(bs.iter().all(|b| b.active() == 0), "affinity never counts connections");
    assert_eq!(
        aff.flush_service(ServiceId(0))
            + aff.flush_service(ServiceId(1))
            + aff.flush_service(ServiceId(2))
            + aff.flush_service(ServiceId(3)),
        s.entries as usize
    );
    // Only our own handles remain.
    assert!(bs.iter().all(|b| Arc::strong_count(b) == 1));
}
