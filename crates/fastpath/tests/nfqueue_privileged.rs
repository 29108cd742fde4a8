//! Privileged tests of the NFQUEUE datapath against the real kernel.
//!
//! They need root (CAP_NET_ADMIN) and `iptables` (nft or legacy backend) and run in CI as
//! root; as another user they print a notice and return. Every test runs on its own
//! thread inside a brand-new, *anonymous* network namespace (`unshare(CLONE_NEWNET)` on
//! that thread; the commands it runs inherit the thread's namespace). Nothing touches the
//! root namespace: each command first checks that the thread is not in it. The namespace
//! has no name, so nothing can be left over: the kernel frees it, with its rules, when the
//! thread and its sockets are gone, even if the test fails or the process is killed. The
//! guard's `Drop` still flushes the rules it added, for good measure.

#![cfg(target_os = "linux")]

mod common;

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fastpath::datapath::nfqueue::{
    DecisionFn, KernelQueueStats, QueueConfig, QueueVerdict, QueueWorkers,
};

use common::{in_new_netns, skip_unless_root};

const MARK: u32 = 0x10000;

/// (destination port, UDP data) of a packet the callback saw.
type Seen = (u16, Vec<u8>);

/// (destination port, UDP data) of an IPv4/UDP packet.
fn udp_of(p: &[u8]) -> Option<(u16, &[u8])> {
    if p.len() < 20 || p[0] >> 4 != 4 || p[9] != 17 {
        return None;
    }
    let ihl = usize::from(p[0] & 0x0f) * 4;
    let udp = p.get(ihl..ihl + 8)?;
    Some((u16::from_be_bytes([udp[2], udp[3]]), &p[ihl + 8..]))
}

/// Counters are published after the verdicts are sent, so a receiver can be faster.
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn recv_str(sock: &UdpSocket) -> Option<String> {
    let mut b = [0u8; 2048];
    match sock.recv(&mut b) {
        Ok(n) => Some(String::from_utf8_lossy(&b[..n]).into_owned()),
        Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => None,
        Err(e) => panic!("recv: {e}"),
    }
}

#[test]
fn accept_with_mark_and_drop() {
    if skip_unless_root("accept_with_mark_and_drop") {
        return;
    }
    in_new_netns(|ns| {
        let q = 3u16;
        ns.iptables("mangle", &format!("-A OUTPUT -p udp --dport 9999 -j NFQUEUE --queue-num {q}"));
        // After an ACCEPT verdict the packet goes on with the next hook (the rest of
        // mangle OUTPUT is skipped), so count in POSTROUTING: marked, then all.
        ns.iptables(
            "mangle",
            "-A POSTROUTING -p udp --dport 9999 -m mark --mark 0x10000/0xffff0000",
        );
        ns.iptables("mangle", "-A POSTROUTING -p udp --dport 9999");

        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let seen2 = seen.clone();
        let decide: DecisionFn = Arc::new(move |p: &[u8], _mark: u32| {
            let Some((dport, data)) = udp_of(p) else { return QueueVerdict::ACCEPT };
            seen2.lock().unwrap().push((dport, data.to_vec()));
            if data.starts_with(b"DROP") {
                QueueVerdict::DROP
            } else {
                QueueVerdict::accept_with_mark(MARK)
            }
        });
        let cfg = QueueConfig::queues(q, q);
        let mut workers = QueueWorkers::start(&cfg, decide.clone()).expect("bind queue");

        // The kernel sees our binding with the requested copy mode and range.
        let k = KernelQueueStats::read().unwrap();
        let kq = k.iter().find(|s| s.queue == q).expect("queue in /proc");
        assert_eq!((kq.copy_mode, kq.copy_range), (2, 128), "{kq:?}");

        // A second reader for the same queue is refused.
        let err = QueueWorkers::start(&cfg, decide.clone()).expect_err("queue already bound");
        assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");

        let rx = UdpSocket::bind("127.0.0.1:9999").unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.connect("127.0.0.1:9999").unwrap();

        tx.send(b"hello").unwrap();
        assert_eq!(recv_str(&rx).as_deref(), Some("hello"), "ACCEPT delivers the datagram");
        {
            let s = seen.lock().unwrap();
            assert_eq!(s.len(), 1);
            assert_eq!(s[0], (9999, b"hello".to_vec()), "the callback saw the packet");
        }

        tx.send(b"DROP me").unwrap();
        rx.set_read_timeout(Some(Duration::from_millis(400))).unwrap();
        assert_eq!(recv_str(&rx), None, "DROP: nothing arrives");
        tx.send(b"after").unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        assert_eq!(recv_str(&rx).as_deref(), Some("after"));
        assert_eq!(seen.lock().unwrap().len(), 3);

        // The mark was applied to both accepted datagrams; the dropped one never got there.
        assert_eq!(ns.counter("mangle", "POSTROUTING", "mark match 0x10000/0xffff0000", None), 2);
        assert_eq!(ns.counter("mangle", "POSTROUTING", "udp dpt:9999", Some("mark match")), 2);

        eventually("3 verdicts counted", || workers.total().verdicts == 3);
        let t = workers.total();
        assert_eq!((t.packets, t.verdicts, t.drops, t.errors, t.enobufs), (3, 3, 1, 0, 0), "{t:?}");

        // Stopping unbinds the queue; a new reader can bind it again.
        workers.stop();
        assert!(KernelQueueStats::read().unwrap().iter().all(|s| s.queue != q));
        let workers = QueueWorkers::start(&cfg, decide).expect("rebind after stop");
        tx.send(b"again").unwrap();
        assert_eq!(recv_str(&rx).as_deref(), Some("again"));
        eventually("1 packet counted", || workers.total().packets == 1);
    });
}

#[test]
fn queue_balance_spreads_over_workers() {
    if skip_unless_root("queue_balance_spreads_over_workers") {
        return;
    }
    in_new_netns(|ns| {
        // --queue-balance hashes the addresses only: send from 16 source addresses.
        ns.iptables("mangle", "-A OUTPUT -p udp --dport 9998 -j NFQUEUE --queue-balance 4:5");
        let decide: DecisionFn = Arc::new(|_: &[u8], _: u32| QueueVerdict::accept_with_mark(MARK));
        let workers = QueueWorkers::start(&QueueConfig::queues(4, 5), decide).unwrap();
        let rx = UdpSocket::bind("127.0.0.1:9998").unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        for i in 2..18u8 {
            let tx = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, i), 0)).unwrap();
            tx.send_to(b"x", "127.0.0.1:9998").unwrap();
        }
        for _ in 0..16 {
            assert!(recv_str(&rx).is_some(), "every datagram arrives");
        }
        eventually("16 packets counted", || workers.total().verdicts == 16);
        let st = workers.stats();
        assert_eq!(st.iter().map(|s| s.queue).collect::<Vec<_>>(), vec![4, 5]);
        assert_eq!(st.iter().map(|s| s.packets).sum::<u64>(), 16, "{st:?}");
        assert!(st.iter().all(|s| s.packets > 0), "both queues used: {st:?}");
    });
}

/// Bounded (about 2 s) UDP throughput through the queue with a trivial callback; prints
/// the rate. Asserts only that traffic flowed.
#[test]
fn throughput_udp_through_queue() {
    if skip_unless_root("throughput_udp_through_queue") {
        return;
    }
    in_new_netns(|ns| {
        ns.iptables("mangle", "-A OUTPUT -p udp --dport 9997 -j NFQUEUE --queue-num 7");
        let decide: DecisionFn = Arc::new(|p: &[u8], _mark: u32| {
            if p.len() >= 20 {
                QueueVerdict::accept_with_mark(MARK)
            } else {
                QueueVerdict::ACCEPT
            }
        });
        let workers = QueueWorkers::start(&QueueConfig::queues(7, 7), decide).unwrap();
        let rx = UdpSocket::bind("127.0.0.1:9997").unwrap();
        rx.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let received = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (r2, s2) = (received.clone(), stop.clone());
        // Threads spawned here inherit this thread's network namespace.
        let receiver = std::thread::spawn(move || {
            let mut b = [0u8; 64];
            while !s2.load(Ordering::Relaxed) {
                if rx.recv(&mut b).is_ok() {
                    r2.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.connect("127.0.0.1:9997").unwrap();
        let budget = Duration::from_secs(2);
        let start = Instant::now();
        let (mut sent, mut send_errors) = (0u64, 0u64);
        while start.elapsed() < budget && sent < 2_000_000 {
            for _ in 0..64 {
                match tx.send(b"0123456789abcdef") {
                    Ok(_) => sent += 1,
                    Err(_) => send_errors += 1,
                }
            }
        }
        let elapsed = start.elapsed();
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        receiver.join().unwrap();
        let t = workers.total();
        let got = received.load(Ordering::Relaxed);
        let k = KernelQueueStats::read().unwrap();
        println!(
            "nfqueue throughput: {:.0} packets/s decided ({} in {:.2} s; sent {sent}, send errors {send_errors}, \
             received {got}; batches {} => {:.1} packets/batch, sends {}, errors {}; kernel {:?})",
            t.verdicts as f64 / elapsed.as_secs_f64(),
            t.verdicts,
            elapsed.as_secs_f64(),
            t.batches,
            t.packets as f64 / t.batches.max(1) as f64,
            t.sends,
            t.errors,
            k
        );
        assert!(t.verdicts > 0 && got > 0);
        assert_eq!(t.errors, 0, "{t:?}");
    });
}
