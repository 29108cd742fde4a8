//! Privileged tests of the NFQUEUE queue keeper ([`keep_queues`], [`hand_over_queue`],
//! [`give_queue_back`]) against the real kernel: real queue sockets, real iptables rules
//! and UDP datagrams over loopback.
//!
//! Same setup as `nfqueue_privileged.rs`: they need root (CAP_NET_ADMIN) and `iptables`
//! and run in CI as root; as another user they print a notice and return. Every test runs
//! on its own thread inside a brand-new, anonymous network namespace (`unshare` on that
//! thread; the threads it spawns and the commands it runs inherit it), so nothing touches
//! the root namespace and nothing is left over: the kernel frees the namespace, with its
//! rules and queues, once the test's threads and sockets are gone, even on failure.
//!
//! The queues are configured as pykp's agent configures them (`NfqueueDatapath::start`,
//! `--fail-open`, `--queue-max-len 32`) behind a rule with `--queue-bypass`, as pykp's.

#![cfg(target_os = "linux")]

mod common;

use std::io;
use std::net::UdpSocket;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fastpath::datapath::nfqueue::codec::{messages, put_config};
use fastpath::datapath::nfqueue::worker::STALL_AFTER;
use fastpath::datapath::nfqueue::{
    keep_queues, DecisionFn, KernelQueueStats, Message, NfqSocket, QueueConfig, QueueVerdict,
    QueueWorkers,
};

use common::{in_new_netns, skip_unless_root, TestNetns};

const MARK: u32 = 0x10000;
/// How long anything that should happen may take: generous, for a loaded CI machine.
const DEADLINE: Duration = Duration::from_secs(5);

impl TestNetns {
    /// The queue rule as pykp writes it (`--queue-bypass`), and two counting rules after
    /// it: datagrams that went on with the reader's mark, and all that went on.
    fn queue_rules(&mut self, queue: u16, port: u16) {
        self.iptables(
            "mangle",
            &format!(
                "-A OUTPUT -p udp --dport {port} -j NFQUEUE --queue-num {queue} --queue-bypass"
            ),
        );
        self.iptables(
            "mangle",
            &format!("-A POSTROUTING -p udp --dport {port} -m mark --mark {MARK:#x}/0xffff0000"),
        );
        self.iptables("mangle", &format!("-A POSTROUTING -p udp --dport {port}"));
    }

    /// (marked by the reader, all) datagrams that went on past the queue.
    fn went_on(&self, port: u16) -> (u64, u64) {
        let dpt = format!("udp dpt:{port}");
        let marked = self.counter("mangle", "POSTROUTING", "mark match", None);
        (marked, self.counter("mangle", "POSTROUTING", &dpt, Some("mark match")))
    }
}

/// The queue settings of pykp's agent (`NfqueueDatapath::start` with the agent's
/// defaults: fail-open, 32 packets may wait, a 20 ms receive timeout for the heartbeat).
fn agent_config(queue: u16) -> QueueConfig {
    QueueConfig {
        copy_range: 0xffff,
        batch_size: 32,
        fail_open: true,
        max_len: 32,
        recv_timeout: Duration::from_millis(20),
        ..QueueConfig::queues(queue, queue)
    }
}

/// A socket bound to the queue of `cfg`, configured as the workers configure theirs,
/// that never reads: a reader killed right after it bound.
fn bind_reader(cfg: &QueueConfig) -> NfqSocket {
    let sock = NfqSocket::open().expect("netlink socket");
    sock.set_rcvbuf(cfg.rcvbuf_bytes).unwrap();
    sock.set_recv_timeout(DEADLINE).unwrap();
    let mut buf = Vec::new();
    put_config(&mut buf, 1, cfg.first_queue, &cfg.request(true), true);
    sock.send(&buf).unwrap();
    let mut answer = vec![0u8; 8192];
    let n = sock.recv(&mut answer).expect("answer to the bind request");
    let ack = messages(&answer[..n])
        .find_map(|m| match m {
            Ok(Message::Ack(a)) if a.seq == 1 => Some(a),
            _ => None,
        })
        .expect("an ack");
    assert!(ack.is_ok(), "bind: {ack:?}");
    sock
}

fn dup(fd: &impl AsRawFd) -> OwnedFd {
    // SAFETY: `fd` is open for the duration of the call.
    unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) }.try_clone_to_owned().expect("dup")
}

/// The keeper's pipe from its reader: (read end for `keep_queues`, write end that only
/// the "reader" holds; dropping it is the reader ending).
fn parent_pipe() -> (OwnedFd, OwnedFd) {
    let (r, w) = io::pipe().expect("pipe");
    (r.into(), w.into())
}

fn queue_stats(queue: u16) -> Option<KernelQueueStats> {
    KernelQueueStats::read().unwrap().into_iter().find(|s| s.queue == queue)
}

fn sender(port: u16) -> UdpSocket {
    let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
    tx.connect(("127.0.0.1", port)).unwrap();
    tx
}

fn receiver(port: u16) -> UdpSocket {
    let rx = UdpSocket::bind(("127.0.0.1", port)).unwrap();
    rx.set_read_timeout(Some(DEADLINE)).unwrap();
    rx
}

fn recv_str(sock: &UdpSocket) -> Option<String> {
    let mut b = [0u8; 2048];
    match sock.recv(&mut b) {
        Ok(n) => Some(String::from_utf8_lossy(&b[..n]).into_owned()),
        Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => None,
        Err(e) => panic!("recv: {e}"),
    }
}

/// The next `n` datagrams, sorted; fails if they do not all come within [`DEADLINE`].
fn recv_all(sock: &UdpSocket, n: usize) -> Vec<String> {
    let mut got: Vec<String> = (0..n)
        .map(|i| recv_str(sock).unwrap_or_else(|| panic!("only {i} of {n} datagrams arrived")))
        .collect();
    got.sort();
    got
}

fn names(prefix: &str, n: usize) -> Vec<String> {
    let mut v: Vec<String> = (0..n).map(|i| format!("{prefix}{i}")).collect();
    v.sort();
    v
}

/// Nothing arrives for `wait`.
fn assert_quiet(sock: &UdpSocket, wait: Duration, why: &str) {
    sock.set_read_timeout(Some(wait)).unwrap();
    let got = recv_str(sock);
    sock.set_read_timeout(Some(DEADLINE)).unwrap();
    assert_eq!(got, None, "{why}");
}

fn join_within(t: JoinHandle<()>, what: &str) {
    let deadline = Instant::now() + DEADLINE;
    while !t.is_finished() {
        assert!(Instant::now() < deadline, "{what} did not end");
        std::thread::sleep(Duration::from_millis(5));
    }
    t.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
}

/// UDP data of an IPv4/UDP packet.
fn udp_data(p: &[u8]) -> Option<&[u8]> {
    if p.len() < 20 || p[0] >> 4 != 4 || p[9] != 17 {
        return None;
    }
    p.get(usize::from(p[0] & 0x0f) * 4 + 8..)
}

/// A reader whose decision callback can be held up: while `stalled` it does not return
/// (its thread neither reads nor beats, as in a stopped or stuck process). It records the
/// data of every packet it is asked about and accepts with [`MARK`].
struct StallableReader {
    seen: Arc<Mutex<Vec<String>>>,
    stalled: Arc<AtomicBool>,
}

impl StallableReader {
    fn new() -> (StallableReader, DecisionFn) {
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let stalled = Arc::new(AtomicBool::new(false));
        let (s, st) = (seen.clone(), stalled.clone());
        let decide: DecisionFn = Arc::new(move |p: &[u8], _mark: u32| {
            if let Some(data) = udp_data(p) {
                s.lock().unwrap().push(String::from_utf8_lossy(data).into_owned());
            }
            while st.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(1));
            }
            QueueVerdict::accept_with_mark(MARK)
        });
        (StallableReader { seen, stalled }, decide)
    }

    fn stall(&self, on: bool) {
        self.stalled.store(on, Ordering::Release);
    }

    fn saw(&self, data: &str) -> bool {
        self.seen.lock().unwrap().iter().any(|s| s == data)
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

/// Un-stalls the reader when dropped, so that a failing test does not leave the workers'
/// threads stuck (dropping `QueueWorkers` joins them). Declare it after the workers.
struct Unstall(Arc<AtomicBool>);

impl Drop for Unstall {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Send probes until one reaches the reader: the queue holds packets for the reader
/// again. Every probe arrives either way (past the reader while the queue is handed
/// over). Returns the probes sent.
fn probe_until_read(tx: &UdpSocket, rx: &UdpSocket, reader: &StallableReader, tag: &str) -> usize {
    let deadline = Instant::now() + DEADLINE;
    for k in 0.. {
        let probe = format!("{tag}{k}");
        tx.send(probe.as_bytes()).unwrap();
        assert_eq!(recv_str(rx).as_deref(), Some(probe.as_str()), "a probe arrives");
        if reader.saw(&probe) {
            return k + 1;
        }
        assert!(Instant::now() < deadline, "the queue was not given back to the reader");
        std::thread::sleep(Duration::from_millis(10));
    }
    unreachable!()
}

/// A reader is killed (its sockets are gone but for the keeper's duplicate): what waited
/// in its queue goes on when the keeper's pipe closes, and later packets pass the queue
/// (`--queue-bypass`, the queue unbound once the keeper lets go). Nothing is dropped.
#[test]
fn keeper_lets_a_killed_readers_queue_go_on() {
    if skip_unless_root("keeper_lets_a_killed_readers_queue_go_on") {
        return;
    }
    in_new_netns(|ns| {
        let (q, port) = (21u16, 9990u16);
        ns.queue_rules(q, port);
        let rx = receiver(port);
        let tx = sender(port);

        let cfg = agent_config(q);
        let reader = bind_reader(&cfg);
        let portid = reader.portid();
        let (parent, reader_end) = parent_pipe();
        // As pykp's keeper process: the socket duplicates and the pipe's read end; no
        // heartbeat, so only the pipe decides.
        let kept = vec![(NfqSocket::from_fd(dup(&reader)), q)];
        let keeper =
            std::thread::spawn(move || keep_queues(kept, parent, None, cfg.max_len, cfg.fail_open));
        // SIGKILL: the reader's own descriptors close, it reads no more; the queue stays
        // bound through the keeper's duplicate.
        drop(reader);

        const N: usize = 20; // < max_len: they all wait, none fails open
        for i in 0..N {
            tx.send(format!("wait{i}").as_bytes()).unwrap();
        }
        assert_quiet(&rx, 3 * STALL_AFTER, "queued datagrams wait while the pipe is open");
        let k = queue_stats(q).expect("the keeper holds the queue bound");
        assert_eq!(k.portid, portid, "{k:?}");
        assert_eq!((k.waiting, k.queue_dropped, k.user_dropped), (N as u32, 0, 0), "{k:?}");
        assert!(!keeper.is_finished(), "the keeper waits for its pipe");

        // The reader's end of the pipe closes (as when the kernel closes a killed
        // process's descriptors): everything that waited goes on, undecided.
        drop(reader_end);
        assert_eq!(recv_all(&rx, N), names("wait", N), "every waiting datagram arrives");
        join_within(keeper, "the keeper");
        // The keeper's duplicate was the last socket: the kernel unbound the queue.
        assert_eq!(queue_stats(q), None, "the queue is unbound once the keeper ends");

        // No reader: --queue-bypass lets new datagrams by.
        const M: usize = 20;
        for i in 0..M {
            tx.send(format!("new{i}").as_bytes()).unwrap();
        }
        assert_eq!(recv_all(&rx, M), names("new", M), "new datagrams pass the queue");
        assert_eq!(ns.went_on(port), (0, (N + M) as u64), "none dropped, none decided");
    });
}

/// A reader that stops beating (alive but stuck) has its queue handed over after
/// [`STALL_AFTER`]: what waited goes on and new packets pass the queue (fail-open with
/// room for none); at its next beat the queue is given back and packets queue for it
/// again. While it beats the keeper leaves the queue alone, idle or busy.
#[test]
fn keeper_hands_a_stalled_readers_queue_over_and_gives_it_back() {
    if skip_unless_root("keeper_hands_a_stalled_readers_queue_over_and_gives_it_back") {
        return;
    }
    in_new_netns(|ns| {
        let (q, port) = (22u16, 9991u16);
        ns.queue_rules(q, port);
        let rx = receiver(port);
        let tx = sender(port);

        let cfg = agent_config(q);
        let (reader, decide) = StallableReader::new();
        let mut workers = QueueWorkers::start(&cfg, decide).expect("bind queue");
        let _unstall = Unstall(reader.stalled.clone());
        let portid = queue_stats(q).expect("bound").portid;
        let heartbeat = workers.heartbeat().unwrap();
        let kept: Vec<_> = workers
            .dup_sockets()
            .unwrap()
            .into_iter()
            .map(|(fd, queue)| (NfqSocket::from_fd(fd), queue))
            .collect();
        let (parent, reader_end) = parent_pipe();
        let (max_len, fail_open) = (cfg.max_len, cfg.fail_open);
        let keeper = std::thread::spawn(move || {
            keep_queues(kept, parent, Some(heartbeat), max_len, fail_open)
        });

        // Beating, idle then busy: the keeper leaves the queue to the reader, which
        // decides every datagram.
        std::thread::sleep(3 * STALL_AFTER);
        const LIVE: usize = 10;
        for i in 0..LIVE {
            let d = format!("live{i}");
            tx.send(d.as_bytes()).unwrap();
            assert_eq!(recv_str(&rx), Some(d.clone()));
            assert!(reader.saw(&d), "{d} was decided by the reader");
            std::thread::sleep(STALL_AFTER / 4);
        }

        // The reader gets stuck on the first of these: no more beats. After STALL_AFTER
        // the keeper hands the queue over: all of them go on.
        reader.stall(true);
        const STALLED: usize = 10;
        for i in 0..STALLED {
            tx.send(format!("stall{i}").as_bytes()).unwrap();
        }
        assert_eq!(recv_all(&rx, STALLED), names("stall", STALLED), "waiting datagrams go on");
        assert!(reader.saw("stall0"), "the reader was stuck on the first");

        // Handed over: new datagrams pass the stuck reader at once.
        const OVER: usize = 10;
        for i in 0..OVER {
            tx.send(format!("over{i}").as_bytes()).unwrap();
        }
        assert_eq!(recv_all(&rx, OVER), names("over", OVER), "new datagrams pass the queue");
        let k = queue_stats(q).expect("still bound");
        assert_eq!((k.portid, k.waiting, k.user_dropped), (portid, 0, 0), "{k:?}");

        // The reader comes back and beats: the keeper gives the queue back, and datagrams
        // queue for the reader again.
        reader.stall(false);
        let probes = probe_until_read(&tx, &rx, &reader, "back");
        const AFTER: usize = 10;
        for i in 0..AFTER {
            let d = format!("after{i}");
            tx.send(d.as_bytes()).unwrap();
            assert_eq!(recv_str(&rx), Some(d.clone()));
            assert!(reader.saw(&d), "{d} was decided by the reader");
        }
        let seen = reader.seen();
        assert!(!seen.iter().any(|s| s.starts_with("over")), "{seen:?}");
        // Only datagrams the reader decided while it held the queue carry its mark; those
        // handed over (the one it was stuck on too: its late verdict came to nothing) went
        // on unmarked.
        let sent = LIVE + STALLED + OVER + probes + AFTER;
        assert_eq!(ns.went_on(port), ((LIVE + 1 + AFTER) as u64, sent as u64));

        // The reader's pipe closes: the keeper hands the queue over for good and ends.
        drop(reader_end);
        join_within(keeper, "the keeper");
        tx.send(b"end").unwrap();
        assert_eq!(recv_str(&rx).as_deref(), Some("end"));
        assert!(!reader.saw("end"), "handed over when the keeper ended");
        workers.stop();
        assert_eq!(queue_stats(q), None);
        let t = workers.total();
        assert_eq!(t.drops, 0, "{t:?}");
        assert_eq!(ns.went_on(port).1, sent as u64 + 1, "nothing dropped");
    });
}

/// Giving the queue back restores the reader's own settings: a fail-closed reader
/// (`--no-fail-open`) whose queue was handed over once (which turns fail-open on) drops
/// what does not fit in its queue again, instead of letting it on undecided.
#[test]
fn giving_the_queue_back_restores_fail_closed() {
    if skip_unless_root("giving_the_queue_back_restores_fail_closed") {
        return;
    }
    in_new_netns(|ns| {
        let (q, port) = (23u16, 9992u16);
        ns.queue_rules(q, port);
        let rx = receiver(port);
        let tx = sender(port);

        const MAX_LEN: usize = 2;
        let cfg = QueueConfig { fail_open: false, max_len: MAX_LEN as u32, ..agent_config(q) };
        let (reader, decide) = StallableReader::new();
        let mut workers = QueueWorkers::start(&cfg, decide).expect("bind queue");
        let _unstall = Unstall(reader.stalled.clone());
        let heartbeat = workers.heartbeat().unwrap();
        let kept: Vec<_> = workers
            .dup_sockets()
            .unwrap()
            .into_iter()
            .map(|(fd, queue)| (NfqSocket::from_fd(fd), queue))
            .collect();
        let (parent, reader_end) = parent_pipe();
        let (max_len, fail_open) = (cfg.max_len, cfg.fail_open);
        let keeper = std::thread::spawn(move || {
            keep_queues(kept, parent, Some(heartbeat), max_len, fail_open)
        });

        // The reader gets stuck on the first of a burst: MAX_LEN of it wait (and go on at
        // the hand-over), the rest find the queue full and are dropped (fail-closed).
        const BURST: usize = 6;
        let mut dropped = 0;
        for round in ["first", "second"] {
            reader.stall(true);
            for i in 0..BURST {
                tx.send(format!("{round}{i}").as_bytes()).unwrap();
            }
            assert_eq!(recv_all(&rx, MAX_LEN), names(round, MAX_LEN), "{round}: waiting ones");
            assert_quiet(&rx, 3 * STALL_AFTER, &format!("{round}: the rest was dropped"));
            dropped += BURST - MAX_LEN;
            let k = queue_stats(q).expect("bound");
            assert_eq!(k.queue_dropped, dropped as u32, "{round}: {k:?}");
            reader.stall(false);
            probe_until_read(&tx, &rx, &reader, &format!("{round}-back"));
        }
        drop(reader_end);
        join_within(keeper, "the keeper");
        workers.stop();
    });
}

/// A non-blocking pipe, as `QueueWorkers::heartbeat` makes one: (read end, write end).
fn beat_pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) }, 0);
    // SAFETY: two fresh descriptors that nothing else owns.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

#[test]
fn keeper_hands_over_only_the_queue_whose_reader_stopped_beating() {
    if skip_unless_root("keeper_hands_over_only_the_queue_whose_reader_stopped_beating") {
        return;
    }
    in_new_netns(|ns| {
        let (beating, silent) = ((31u16, 9931u16), (32u16, 9932u16));
        let mut kept = Vec::new();
        for (queue, port) in [beating, silent] {
            ns.queue_rules(queue, port);
            kept.push((bind_reader(&agent_config(queue)), queue)); // never reads
        }
        let (rx_beating, tx_beating) = (receiver(beating.1), sender(beating.1));
        let (rx_silent, tx_silent) = (receiver(silent.1), sender(silent.1));
        // The readers' beats, written here: queue 31's reader beats, queue 32's never does.
        let (beat_read, beat_write) = beat_pipe();
        let stop = Arc::new(AtomicBool::new(false));
        let beats = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let byte = [beating.0 as u8];
                while !stop.load(Ordering::Acquire) {
                    // SAFETY: a 1-byte write from a live buffer to an open pipe.
                    unsafe { libc::write(beat_write.as_raw_fd(), byte.as_ptr().cast(), 1) };
                    std::thread::sleep(Duration::from_millis(10));
                }
                // `beat_write` drops here: the keeper reads end of file.
            })
        };
        let (parent, reader_end) = parent_pipe();
        let keeper =
            std::thread::spawn(move || keep_queues(kept, parent, Some(beat_read), 32, true));
        std::thread::sleep(3 * STALL_AFTER);

        // The silent queue is handed over: its datagrams pass at once.
        tx_silent.send(b"silent").unwrap();
        assert_eq!(recv_str(&rx_silent).as_deref(), Some("silent"));
        // The beating one is left to its reader (which never reads): its datagram waits.
        tx_beating.send(b"waits").unwrap();
        assert_quiet(&rx_beating, 3 * STALL_AFTER, "a beating reader's queue is not handed over");
        assert_eq!(queue_stats(beating.0).expect("bound").waiting, 1);

        // The beats end with the beat pipe closed (a reader stopping): the keeper neither
        // takes that for a stall nor spins on the end of file; the datagram still waits.
        stop.store(true, Ordering::Release);
        beats.join().unwrap();
        assert_quiet(&rx_beating, 3 * STALL_AFTER, "no beats after the end of file");
        assert_eq!(queue_stats(beating.0).expect("bound").waiting, 1);

        // The reader's end closes: everything is handed over, the waiting datagram goes on.
        drop(reader_end);
        join_within(keeper, "the keeper");
        assert_eq!(recv_str(&rx_beating).as_deref(), Some("waits"));
    });
}
