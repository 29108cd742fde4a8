//! Threads that read NFQUEUE queues, ask a decision callback about every packet and
//! send the verdicts back, in batches.
//!
//! One thread per queue number of a range, to pair with the xtables rule
//! `-j NFQUEUE --queue-balance A:B` (or `--queue-num N` for a range of one). Each thread
//! owns one netlink socket bound to its queue and loops:
//! receive up to `batch_size` packets with one `recvmmsg` → call the callback for each →
//! send all their verdicts with one `send` (consecutive identical verdicts folded into
//! one `NFQNL_MSG_VERDICT_BATCH`) → publish counters. No allocation per packet: the
//! receive slots and the verdict buffer are made once and reused.
//!
//! # What the queue flags do to a connection
//!
//! - **`NFQA_CFG_F_GSO`** ([`QueueConfig::gso`], on by default): the kernel hands GSO
//!   super-packets (one skb carrying many MTU-sized segments, e.g. a big UDP send with
//!   UDP_SEGMENT or a TSO'ed TCP burst on the local-out path) over unsegmented, so it
//!   does not have to segment them, queue every segment and wait for one verdict per
//!   segment; the verdict applies to the whole skb. It also skips filling in
//!   `CHECKSUM_PARTIAL` checksums before queuing (such packets carry
//!   `NFQA_SKB_CSUMNOTREADY`; do not validate their checksums — we never modify or return
//!   the payload, so that is fine). With first-packet-only queuing (`--ctstate NEW`) it
//!   mostly matters for the first datagram of a UDP/GSO flow; a TCP SYN is never GSO.
//! - **`NFQA_CFG_F_FAIL_OPEN`** ([`QueueConfig::fail_open`], off by default here; pykp's
//!   agent turns it on): when the queue already holds `max_len` packets waiting for a
//!   verdict, or the reader's socket buffer is full, the kernel *accepts* the packet
//!   instead of dropping it. The packet then goes on undecided: no mark. With nothing
//!   behind the queue, conntrack would record such a flow **un-NATed** (a null NAT binding
//!   that stays until the entry expires); pykp's rules have a kernel path behind it (a
//!   random pick among the service's ready backends), so an undecided packet is still
//!   DNATed. Without such a path, fail-closed (drop; the client's retransmitted SYN is
//!   queued afresh) is the safer choice.
//! - **`--queue-bypass`** in the iptables rule covers the other case, no reader at all
//!   (no socket bound to the queue: pykp not started or crashed): the packet is accepted
//!   as if the rule were not there, instead of dropped.
//! - A reader that stops (or a [`keep_queues`] process, for one that was killed) hands its
//!   queue over first ([`hand_over_queue`]): packets that waited for it go on undecided
//!   instead of being dropped by the unbind.
//! - **`NFQA_CFG_F_CONNTRACK`** is turned off: the decision needs only the L3/L4
//!   headers, and conntrack attributes would cost a netlink dump per packet.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::codec::{
    self, put_config, put_verdict, put_verdict_batch, CfgCmd, CfgFlags, ConfigRequest, CopyParams,
    Message, Verdict,
};
use super::consts::{self, NFQA_CFG_F_CONNTRACK, NFQA_CFG_F_FAIL_OPEN, NFQA_CFG_F_GSO};
use super::sys::{is_enobufs, read_proc_queue_stats, NfqSocket, RecvBatch};

/// What the callback decided for one packet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct QueueVerdict {
    /// `NF_ACCEPT` (true) or `NF_DROP` (false).
    pub accept: bool,
    /// Set the skb mark (only meaningful with `accept`).
    pub mark: Option<u32>,
}

impl QueueVerdict {
    /// Accept, mark unchanged.
    pub const ACCEPT: QueueVerdict = QueueVerdict { accept: true, mark: None };
    /// Drop.
    pub const DROP: QueueVerdict = QueueVerdict { accept: false, mark: None };

    /// Accept and set the skb mark to `mark`.
    pub const fn accept_with_mark(mark: u32) -> QueueVerdict {
        QueueVerdict { accept: true, mark: Some(mark) }
    }
}

/// The decision callback: gets the packet from its network header on (at most
/// [`QueueConfig::copy_range`] bytes) and its skb mark (0 when it has none), returns the
/// verdict. Called on the worker threads. A verdict's mark replaces the whole skb mark, so
/// a callback that sets one keeps the bits that are not its own.
pub type DecisionFn = Arc<dyn Fn(&[u8], u32) -> QueueVerdict + Send + Sync>;

/// How to bind and run the queues.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueConfig {
    /// First queue number (the `A` of `--queue-balance A:B`).
    pub first_queue: u16,
    /// Last queue number, inclusive (the `B`); one thread per queue.
    pub last_queue: u16,
    /// Bytes of each packet copied to user space; the decision needs only the L3/L4
    /// headers (IPv6 with extension headers may need more than 128).
    pub copy_range: u32,
    /// Packets that may wait for a verdict (`NFQA_CFG_QUEUE_MAXLEN`; kernel default 1024).
    pub max_len: u32,
    /// `NFQA_CFG_F_FAIL_OPEN`: see the module documentation.
    pub fail_open: bool,
    /// `NFQA_CFG_F_GSO`: see the module documentation.
    pub gso: bool,
    /// Datagrams per `recvmmsg` (and at most that many verdicts per `send`).
    pub batch_size: usize,
    /// Socket receive buffer to ask for (`SO_RCVBUFFORCE`, else `SO_RCVBUF`).
    pub rcvbuf_bytes: usize,
    /// How long a receive waits before the thread looks at the stop flag again.
    pub recv_timeout: Duration,
    /// Fold consecutive identical verdicts into one `NFQNL_MSG_VERDICT_BATCH`.
    pub coalesce_verdicts: bool,
    /// Leave `NETLINK_NO_ENOBUFS` off, so socket overruns show as `ENOBUFS` and are
    /// counted in [`WorkerStats::enobufs`]. Off by default: after reporting an overrun
    /// netlink marks the socket congested and drops *every* new message until the
    /// reader has emptied its receive queue, which loses more packets under load. The
    /// kernel counts the losses either way ([`KernelQueueStats::user_dropped`]).
    pub report_enobufs: bool,
    /// How long to wait for the kernel's answer to the bind request.
    pub bind_timeout: Duration,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            first_queue: 0,
            last_queue: 0,
            copy_range: 128,
            max_len: 4096,
            fail_open: false,
            gso: true,
            batch_size: 64,
            rcvbuf_bytes: 8 << 20,
            recv_timeout: Duration::from_millis(100),
            coalesce_verdicts: true,
            report_enobufs: false,
            bind_timeout: Duration::from_secs(2),
        }
    }
}

impl QueueConfig {
    /// Queues `first..=last` with defaults otherwise.
    pub fn queues(first: u16, last: u16) -> QueueConfig {
        QueueConfig { first_queue: first, last_queue: last, ..QueueConfig::default() }
    }

    /// The bind + configure request for `queue` (command, copy mode/range, max length,
    /// and the GSO / FAIL_OPEN / CONNTRACK flags).
    pub fn request(&self, bind: bool) -> ConfigRequest {
        ConfigRequest {
            cmd: if bind { Some(CfgCmd::BIND) } else { None },
            params: Some(CopyParams::packet(self.copy_range)),
            max_len: Some(self.max_len),
            flags: Some(
                CfgFlags::default()
                    .with(NFQA_CFG_F_GSO, self.gso)
                    .with(NFQA_CFG_F_FAIL_OPEN, self.fail_open)
                    .with(NFQA_CFG_F_CONNTRACK, false),
            ),
        }
    }

    /// Receive slot size: the copy range plus room for the netlink header and every
    /// metadata attribute the kernel may add.
    pub fn slot_size(&self) -> usize {
        consts::align4(self.copy_range.min(consts::NFQNL_MAX_COPY_RANGE) as usize) + 1024
    }
}

/// Per-worker counters, written by one thread only and read by anyone.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct WorkerCounters {
    /// Packets received.
    pub packets: AtomicU64,
    /// Packets given a verdict.
    pub verdicts: AtomicU64,
    /// Of those, dropped.
    pub drops: AtomicU64,
    /// Errors: malformed or truncated messages, error acks from the kernel, failed
    /// receives or sends, callback panics.
    pub errors: AtomicU64,
    /// Receives that failed with `ENOBUFS` (the socket overran and lost packets).
    pub enobufs: AtomicU64,
    /// Non-empty receive batches.
    pub batches: AtomicU64,
    /// `send` calls carrying verdicts.
    pub sends: AtomicU64,
}

/// A snapshot of one worker's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkerStats {
    /// Queue number (meaningless in a sum).
    pub queue: u16,
    /// Packets received.
    pub packets: u64,
    /// Packets given a verdict.
    pub verdicts: u64,
    /// Of those, dropped.
    pub drops: u64,
    /// Errors (see [`WorkerCounters::errors`]).
    pub errors: u64,
    /// `ENOBUFS` receives.
    pub enobufs: u64,
    /// Non-empty receive batches.
    pub batches: u64,
    /// Verdict `send` calls.
    pub sends: u64,
}

impl WorkerStats {
    fn add(mut self, o: &WorkerStats) -> WorkerStats {
        self.packets += o.packets;
        self.verdicts += o.verdicts;
        self.drops += o.drops;
        self.errors += o.errors;
        self.enobufs += o.enobufs;
        self.batches += o.batches;
        self.sends += o.sends;
        self
    }
}

impl WorkerCounters {
    /// Read every counter.
    pub fn snapshot(&self, queue: u16) -> WorkerStats {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        WorkerStats {
            queue,
            packets: r(&self.packets),
            verdicts: r(&self.verdicts),
            drops: r(&self.drops),
            errors: r(&self.errors),
            enobufs: r(&self.enobufs),
            batches: r(&self.batches),
            sends: r(&self.sends),
        }
    }

    fn publish(&self, d: &WorkerStats) {
        for (a, v) in [
            (&self.packets, d.packets),
            (&self.verdicts, d.verdicts),
            (&self.drops, d.drops),
            (&self.errors, d.errors),
            (&self.enobufs, d.enobufs),
            (&self.batches, d.batches),
            (&self.sends, d.sends),
        ] {
            if v != 0 {
                a.fetch_add(v, Ordering::Relaxed);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Pure part: verdict batching and datagram handling (tested without a socket)
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Run {
    queue: u16,
    verdict: Verdict,
    mark: Option<u32>,
    last_id: u32,
    count: u32,
}

/// Collects the verdicts of one receive batch into one send buffer.
///
/// With coalescing, a run of consecutive packets with the same verdict and mark becomes
/// one `NFQNL_MSG_VERDICT_BATCH` for the run's last id. That is exact because a queue has
/// one reader, the kernel delivers ids in increasing order, and every packet before the
/// run already got its verdict earlier in the same buffer (the kernel handles the
/// messages of one send in order), so "every waiting id `<=` last" is the run itself.
#[derive(Debug)]
pub(crate) struct VerdictBatcher {
    coalesce: bool,
    buf: Vec<u8>,
    run: Option<Run>,
    verdicts: u64,
}

impl VerdictBatcher {
    pub(crate) fn new(coalesce: bool, capacity: usize) -> VerdictBatcher {
        VerdictBatcher {
            coalesce,
            buf: Vec::with_capacity(capacity * consts::VERDICT_MSG_MAX_LEN),
            run: None,
            verdicts: 0,
        }
    }

    pub(crate) fn push(&mut self, queue: u16, id: u32, v: QueueVerdict) {
        let (verdict, mark) =
            if v.accept { (Verdict::Accept, v.mark) } else { (Verdict::Drop, None) };
        self.verdicts += 1;
        if self.coalesce {
            if let Some(r) = &mut self.run {
                if r.queue == queue && r.verdict == verdict && r.mark == mark {
                    r.last_id = id;
                    r.count += 1;
                    return;
                }
            }
            self.flush_run();
            self.run = Some(Run { queue, verdict, mark, last_id: id, count: 1 });
        } else {
            put_verdict(&mut self.buf, queue, id, verdict, mark);
        }
    }

    fn flush_run(&mut self) {
        if let Some(r) = self.run.take() {
            if r.count == 1 {
                put_verdict(&mut self.buf, r.queue, r.last_id, r.verdict, r.mark);
            } else {
                put_verdict_batch(&mut self.buf, r.queue, r.last_id, r.verdict, r.mark);
            }
        }
    }

    /// Packets with a verdict since the last `clear`.
    pub(crate) fn verdicts(&self) -> u64 {
        self.verdicts
    }

    /// The messages to send (closes the open run).
    pub(crate) fn finish(&mut self) -> &[u8] {
        self.flush_run();
        &self.buf
    }

    pub(crate) fn clear(&mut self) {
        self.buf.clear();
        self.run = None;
        self.verdicts = 0;
    }
}

/// Handle every message of one received datagram: packets go through `decide` into
/// `out`; acks and errors are counted. Returns the ack for `await_seq` if one was seen.
pub(crate) fn handle_datagram(
    datagram: &[u8],
    truncated: bool,
    decide: &(dyn Fn(&[u8], u32) -> QueueVerdict + Send + Sync),
    fail_open: bool,
    out: &mut VerdictBatcher,
    stats: &mut WorkerStats,
    await_seq: Option<u32>,
) -> Option<codec::Ack> {
    let mut awaited = None;
    if truncated {
        stats.errors += 1;
    }
    for m in codec::messages(datagram) {
        match m {
            Ok(Message::Packet(p)) => {
                stats.packets += 1;
                let v =
                    match catch_unwind(AssertUnwindSafe(|| decide(p.payload, p.mark.unwrap_or(0))))
                    {
                        Ok(v) => v,
                        Err(_) => {
                            stats.errors += 1;
                            if fail_open {
                                QueueVerdict::ACCEPT
                            } else {
                                QueueVerdict::DROP
                            }
                        }
                    };
                if !v.accept {
                    stats.drops += 1;
                }
                out.push(p.queue, p.id, v);
            }
            Ok(Message::Ack(a)) => {
                if Some(a.seq) == await_seq && a.seq != 0 {
                    awaited = Some(a);
                } else if !a.is_ok() {
                    stats.errors += 1;
                }
            }
            Ok(_) => {}
            Err(_) => stats.errors += 1,
        }
    }
    awaited
}

// ---------------------------------------------------------------------------------------
// Kernel queue statistics (/proc/net/netfilter/nfnetlink_queue)
// ---------------------------------------------------------------------------------------

/// One line of `/proc/net/netfilter/nfnetlink_queue` (per network namespace).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelQueueStats {
    /// Queue number.
    pub queue: u16,
    /// Port id of the bound socket.
    pub portid: u32,
    /// Packets currently waiting for a verdict.
    pub waiting: u32,
    /// Copy mode (`NFQNL_COPY_*`).
    pub copy_mode: u8,
    /// Copy range.
    pub copy_range: u32,
    /// Packets dropped (or, with fail-open, accepted) because the queue was full.
    pub queue_dropped: u32,
    /// Packets lost because the netlink socket buffer was full.
    pub user_dropped: u32,
    /// Last packet id handed out.
    pub id_sequence: u32,
}

impl KernelQueueStats {
    /// Parse the whole file; malformed lines are skipped.
    pub fn parse_all(text: &str) -> Vec<KernelQueueStats> {
        text.lines().filter_map(Self::parse_line).collect()
    }

    /// Parse one line (`queue portid waiting mode range dropped user_dropped id 1`).
    pub fn parse_line(line: &str) -> Option<KernelQueueStats> {
        let mut f = line.split_whitespace();
        let mut n = || f.next()?.parse::<u32>().ok();
        Some(KernelQueueStats {
            queue: u16::try_from(n()?).ok()?,
            portid: n()?,
            waiting: n()?,
            copy_mode: u8::try_from(n()?).ok()?,
            copy_range: n()?,
            queue_dropped: n()?,
            user_dropped: n()?,
            id_sequence: n()?,
        })
    }

    /// Read the calling thread's network namespace's queues
    /// (`/proc/thread-self/net/netfilter/nfnetlink_queue`).
    pub fn read() -> io::Result<Vec<KernelQueueStats>> {
        Ok(Self::parse_all(&read_proc_queue_stats()?))
    }
}

// ---------------------------------------------------------------------------------------
// One worker (socket + buffers) and the thread pool
// ---------------------------------------------------------------------------------------

struct Worker {
    queue: u16,
    sock: NfqSocket,
    rx: RecvBatch,
    out: VerdictBatcher,
    decide: DecisionFn,
    fail_open: bool,
    counters: Arc<WorkerCounters>,
    seq: u32,
}

impl Worker {
    fn open(cfg: &QueueConfig, queue: u16, decide: DecisionFn) -> io::Result<Worker> {
        let sock = NfqSocket::open()?;
        sock.set_rcvbuf(cfg.rcvbuf_bytes)?;
        sock.set_no_enobufs(!cfg.report_enobufs)?;
        let _ = sock.set_cap_ack(true); // smaller error messages; optional
        sock.set_recv_timeout(cfg.recv_timeout)?;
        Ok(Worker::on_socket(cfg, queue, sock, decide))
    }

    /// A worker reading `sock` as it is (bound or not).
    fn on_socket(cfg: &QueueConfig, queue: u16, sock: NfqSocket, decide: DecisionFn) -> Worker {
        let batch = cfg.batch_size.max(1);
        Worker {
            queue,
            sock,
            rx: RecvBatch::new(batch, cfg.slot_size()),
            out: VerdictBatcher::new(cfg.coalesce_verdicts, batch),
            decide,
            fail_open: cfg.fail_open,
            counters: Arc::new(WorkerCounters::default()),
            seq: 0,
        }
    }

    /// Send a config request with an ack and wait for the answer, handling any packets
    /// that arrive meanwhile.
    fn configure(&mut self, req: &ConfigRequest, timeout: Duration) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1).max(1);
        let seq = self.seq;
        let mut buf = Vec::with_capacity(64);
        put_config(&mut buf, seq, self.queue, req, true);
        self.sock.send(&buf)?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(ack) = self.poll(Some(seq))? {
                return if ack.is_ok() {
                    Ok(())
                } else {
                    Err(io::Error::from_raw_os_error(ack.errno))
                };
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no answer to the NFQUEUE bind request",
                ));
            }
        }
    }

    /// One receive batch: decide, send verdicts, publish counters. Returns the ack for
    /// `await_seq` if seen. Timeouts and interrupts are `Ok(None)`.
    fn poll(&mut self, await_seq: Option<u32>) -> io::Result<Option<codec::Ack>> {
        let mut st = WorkerStats::default();
        let mut awaited = None;
        let res = match self.sock.recv_batch(&mut self.rx) {
            Ok(n) => {
                st.batches += 1;
                self.out.clear();
                for i in 0..n {
                    if let Some((d, trunc)) = self.rx.get(i) {
                        let a = handle_datagram(
                            d,
                            trunc,
                            &*self.decide,
                            self.fail_open,
                            &mut self.out,
                            &mut st,
                            await_seq,
                        );
                        awaited = awaited.or(a);
                    }
                }
                st.verdicts += self.out.verdicts();
                let bytes = self.out.finish();
                if !bytes.is_empty() {
                    st.sends += 1;
                    // A failed send leaves the batch's packets queued: the kernel holds
                    // them until the queue is unbound or handed over. Counted; the next
                    // batch goes on.
                    if self.sock.send(bytes).is_err() {
                        st.errors += 1;
                    }
                }
                Ok(awaited)
            }
            Err(e) => recv_failed(e, &mut st).map(|()| None),
        };
        self.counters.publish(&st);
        res
    }

    fn run(mut self, stop: Arc<AtomicBool>, heartbeat: Arc<AtomicI32>) {
        let mut beat = Instant::now();
        while !stop.load(Ordering::Acquire) {
            if self.poll(None).is_err() {
                // An unexpected socket error: do not spin.
                std::thread::sleep(Duration::from_millis(10));
            }
            if beat.elapsed() >= HEARTBEAT_EVERY {
                beat = Instant::now();
                let fd = heartbeat.load(Ordering::Relaxed);
                if fd >= 0 {
                    // The beat names its queue (low byte): one stalled queue among several
                    // is handed over alone.
                    let byte = beat_byte(self.queue);
                    // SAFETY: a 1-byte write to a non-blocking pipe the workers keep open;
                    // a full pipe (EAGAIN) only means the keeper has not read yet.
                    unsafe { libc::write(fd, (&byte as *const u8).cast(), 1) };
                }
            }
        }
        let mut buf = Vec::with_capacity(32);
        // What still waits for a verdict goes on undecided (to the kernel path) rather than
        // being dropped by the unbind.
        let _ = hand_over_queue(&self.sock, self.queue, &mut buf);
        buf.clear();
        put_config(
            &mut buf,
            0,
            self.queue,
            &ConfigRequest { cmd: Some(CfgCmd::UNBIND), ..Default::default() },
            false,
        );
        let _ = self.sock.send(&buf);
        // Dropping the socket unbinds too (nothing waits any more: handed over above).
    }
}

/// What a failed receive means. A timeout or an interrupt is nothing. `ENOBUFS` means the
/// socket overran and the kernel dropped packets (reported only with
/// [`QueueConfig::report_enobufs`]): counted, and reading goes on at once, since the
/// socket is fine and falling further behind would overrun it again. Anything else is
/// counted and returned: the caller backs off instead of spinning on a broken socket.
fn recv_failed(e: io::Error, st: &mut WorkerStats) -> io::Result<()> {
    if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) {
        Ok(())
    } else if is_enobufs(&e) {
        st.enobufs += 1;
        Ok(())
    } else {
        st.errors += 1;
        Err(e)
    }
}

/// How often a reader thread tells its keeper it is alive, and how long the keeper waits
/// for that before it takes the reader for stalled.
pub const HEARTBEAT_EVERY: Duration = Duration::from_millis(10);
pub const STALL_AFTER: Duration = Duration::from_millis(100);

/// The byte a queue's reader beats with: its number's low byte (queues 256 apart share it).
fn beat_byte(queue: u16) -> u8 {
    (queue & 0xff) as u8
}

fn is_retry(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock)
}

/// Undo [`hand_over_queue`] for a reader that reads again: `max_len` packets may wait, and
/// fail-open is back to the reader's own `fail_open` (the hand-over turned it on).
pub fn give_queue_back(
    sock: &NfqSocket,
    queue: u16,
    max_len: u32,
    fail_open: bool,
    buf: &mut Vec<u8>,
) -> io::Result<()> {
    buf.clear();
    let reader_settings = ConfigRequest {
        max_len: Some(max_len),
        flags: Some(CfgFlags::default().with(NFQA_CFG_F_FAIL_OPEN, fail_open)),
        ..Default::default()
    };
    put_config(buf, 0, queue, &reader_settings, false);
    sock.send(buf).map(drop)
}

/// Let go of `queue` before closing it without losing a packet: first its length becomes
/// 0 with fail-open on, so that every new packet is accepted at once instead of queued;
/// then every packet still waiting for a verdict is accepted, unmarked (one
/// `NFQNL_MSG_VERDICT_BATCH` up to the kernel's last id). They go on as if no reader had
/// been there, to the rules after the queue (pykp's kernel path), instead of the drop that
/// an unbind or the last close of the socket gives them. `sock` must be the bound socket.
pub fn hand_over_queue(sock: &NfqSocket, queue: u16, buf: &mut Vec<u8>) -> io::Result<bool> {
    buf.clear();
    let pass_all = ConfigRequest {
        max_len: Some(0),
        flags: Some(CfgFlags::default().with(NFQA_CFG_F_FAIL_OPEN, true)),
        ..Default::default()
    };
    put_config(buf, 0, queue, &pass_all, false);
    sock.send(buf)?;
    let Some(stats) = KernelQueueStats::read()?.into_iter().find(|s| s.queue == queue) else {
        return Ok(false);
    };
    if stats.waiting == 0 {
        return Ok(false);
    }
    buf.clear();
    put_verdict_batch(buf, queue, stats.id_sequence, Verdict::Accept, None);
    sock.send(buf)?;
    Ok(true)
}

/// Hold a dead reader's queues open until they are drained: given duplicates of the
/// reader's bound sockets and the read end of a pipe whose write end only the reader
/// holds, wait for that end to close (the reader stopped, or was killed: SIGKILL runs no
/// code of the reader's), then hand what still waits to the kernel path ([`hand_over_queue`], a few rounds
/// for packets queued meanwhile) and close. Without it the kernel drops those packets when
/// the killed reader's sockets close: the first packets of live connections.
///
/// With `heartbeat` (the read end of [`QueueWorkers::heartbeat`]) it also watches a reader
/// that is alive but not reading (stopped, stalled), queue by queue (each reader thread's
/// beat names its queue): after [`STALL_AFTER`] without a beat from a queue's reader
/// it hands that queue over the same way (what waits goes on, new packets fail open to the
/// kernel path) and gives them back at the next beat: `max_len` and `fail_open` again, the
/// reader's own settings ([`QueueConfig::max_len`], [`QueueConfig::fail_open`]).
pub fn keep_queues(
    sockets: Vec<(NfqSocket, u16)>,
    parent: OwnedFd,
    heartbeat: Option<OwnedFd>,
    max_len: u32,
    fail_open: bool,
) {
    let mut buf = Vec::with_capacity(64);
    let mut beats = [0u8; 256];
    let mut heartbeat = heartbeat;
    // Per queue, in `sockets` order: its last beat, and whether it is handed over.
    let mut last_beat = vec![Instant::now(); sockets.len()];
    let mut handed_over = vec![false; sockets.len()];
    loop {
        let mut fds = [
            libc::pollfd { fd: parent.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd {
                fd: heartbeat.as_ref().map_or(-1, |h| h.as_raw_fd()),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of 2 pollfds for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, 10) };
        if n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            break;
        }
        if fds[0].revents != 0 {
            // SAFETY: reads into a local buffer from a descriptor this function owns.
            let got = unsafe { libc::read(parent.as_raw_fd(), beats.as_mut_ptr().cast(), 1) };
            if got == 0 || (got < 0 && !is_retry(&io::Error::last_os_error())) {
                break; // the reader's end closed: it stopped or died
            }
        }
        let Some(h) = &heartbeat else { continue };
        let now = Instant::now();
        if fds[1].revents != 0 {
            // SAFETY: as above; the pipe is non-blocking, so this drains it.
            loop {
                let got =
                    unsafe { libc::read(h.as_raw_fd(), beats.as_mut_ptr().cast(), beats.len()) };
                if got == 0 {
                    // The beat's write end closed (the reader is stopping): no more beats
                    // to wait for; the parent pipe ends this loop. Never a busy loop on EOF.
                    heartbeat = None;
                    break;
                }
                if got < 0 {
                    break;
                }
                for &byte in &beats[..got as usize] {
                    for (i, (sock, queue)) in sockets.iter().enumerate() {
                        if beat_byte(*queue) != byte {
                            continue;
                        }
                        last_beat[i] = now;
                        if handed_over[i] {
                            let _ = give_queue_back(sock, *queue, max_len, fail_open, &mut buf);
                            handed_over[i] = false;
                        }
                    }
                }
            }
            if heartbeat.is_none() {
                continue;
            }
        }
        for (i, (sock, queue)) in sockets.iter().enumerate() {
            if !handed_over[i] && now.duration_since(last_beat[i]) >= STALL_AFTER {
                let _ = hand_over_queue(sock, *queue, &mut buf);
                handed_over[i] = true;
            }
        }
    }
    for _ in 0..4 {
        for (sock, queue) in &sockets {
            let _ = hand_over_queue(sock, *queue, &mut buf);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The running queue readers: one thread per queue number.
///
/// Dropping it stops and joins the threads (each waits at most
/// [`QueueConfig::recv_timeout`] to notice). On stop each thread hands its queue over
/// ([`hand_over_queue`]: what still waits is accepted undecided) and unbinds it; with
/// `--queue-bypass` in the rule later packets pass the queue until a reader binds again.
pub struct QueueWorkers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    counters: Vec<(u16, Arc<WorkerCounters>)>,
    /// The bound sockets (owned by the threads), for [`QueueWorkers::dup_sockets`].
    sockets: Vec<(RawFd, u16)>,
    /// The write end of the heartbeat pipe the threads beat on (-1: none yet).
    heartbeat: Arc<AtomicI32>,
    heartbeat_fd: Option<OwnedFd>,
}

impl fmt::Debug for QueueWorkers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueueWorkers").field("stats", &self.stats()).finish()
    }
}

impl QueueWorkers {
    /// Bind and configure every queue of `cfg` (on the calling thread, so the sockets
    /// live in its network namespace and errors such as `EPERM`, the queue bound by
    /// another socket, come back here), then start the threads.
    pub fn start(cfg: &QueueConfig, decide: DecisionFn) -> io::Result<QueueWorkers> {
        Self::start_with_stop(cfg, decide, Arc::new(AtomicBool::new(false)))
    }

    /// Like [`start`](Self::start), stopping when `stop` becomes true.
    pub fn start_with_stop(
        cfg: &QueueConfig,
        decide: DecisionFn,
        stop: Arc<AtomicBool>,
    ) -> io::Result<QueueWorkers> {
        if cfg.first_queue > cfg.last_queue {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "first_queue > last_queue"));
        }
        let mut workers = Vec::new();
        for q in cfg.first_queue..=cfg.last_queue {
            let mut w = Worker::open(cfg, q, decide.clone())?;
            w.configure(&cfg.request(true), cfg.bind_timeout)?;
            workers.push(w);
        }
        let mut me = QueueWorkers {
            stop: stop.clone(),
            threads: Vec::new(),
            counters: Vec::new(),
            sockets: Vec::new(),
            heartbeat: Arc::new(AtomicI32::new(-1)),
            heartbeat_fd: None,
        };
        for w in workers {
            me.counters.push((w.queue, w.counters.clone()));
            me.sockets.push((w.sock.as_raw_fd(), w.queue));
            let stop = stop.clone();
            let heartbeat = me.heartbeat.clone();
            let t = std::thread::Builder::new()
                .name(format!("pykp-nfq-{}", w.queue))
                .spawn(move || w.run(stop, heartbeat));
            match t {
                Ok(t) => me.threads.push(t),
                Err(e) => return Err(e), // `me` drops: stops the threads already started
            }
        }
        Ok(me)
    }

    /// Duplicates (close-on-exec) of the bound sockets with their queues, for a
    /// [`keep_queues`] process. Only while running: the threads own the originals.
    pub fn dup_sockets(&self) -> io::Result<Vec<(OwnedFd, u16)>> {
        if self.threads.is_empty() {
            return Err(io::Error::new(io::ErrorKind::NotConnected, "the queues are not running"));
        }
        self.sockets
            .iter()
            .map(|&(fd, queue)| {
                // SAFETY: `fd` is a socket the running threads keep open.
                let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
                if dup < 0 {
                    return Err(io::Error::last_os_error());
                }
                // SAFETY: `dup` is a fresh descriptor that nothing else owns.
                Ok((unsafe { OwnedFd::from_raw_fd(dup) }, queue))
            })
            .collect()
    }

    /// The read end of a pipe every thread writes a byte to about every
    /// [`HEARTBEAT_EVERY`] while it runs: what a [`keep_queues`] process watches. One per
    /// workers; a second call replaces the first.
    pub fn heartbeat(&mut self) -> io::Result<OwnedFd> {
        let mut ends = [0; 2];
        // SAFETY: `ends` has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both are fresh descriptors that nothing else owns.
        let (read, write) =
            unsafe { (OwnedFd::from_raw_fd(ends[0]), OwnedFd::from_raw_fd(ends[1])) };
        self.heartbeat.store(write.as_raw_fd(), Ordering::Relaxed);
        self.heartbeat_fd = Some(write); // an older one closes after the swap
        Ok(read)
    }

    /// The flag the threads watch.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Counters of every worker, in queue order.
    pub fn stats(&self) -> Vec<WorkerStats> {
        self.counters.iter().map(|(q, c)| c.snapshot(*q)).collect()
    }

    /// All workers' counters added up.
    pub fn total(&self) -> WorkerStats {
        self.stats().iter().fold(WorkerStats::default(), |a, s| a.add(s))
    }

    /// Stop and join every thread (also done on drop).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.sockets.clear();
        self.heartbeat.store(-1, Ordering::Relaxed);
        self.heartbeat_fd = None;
    }
}

impl Drop for QueueWorkers {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::nfqueue::codec::{put_packet, Packet, VerdictMsg};
    use crate::datapath::nfqueue::consts::{NF_ACCEPT, NF_DROP, NLMSG_ERROR};

    fn pkt(queue: u16, id: u32, payload: &[u8]) -> Packet<'_> {
        Packet {
            queue,
            family: 2,
            id,
            hw_protocol: 0x800,
            hook: 3,
            payload,
            mark: None,
            skb_info: 0,
            cap_len: None,
            indev: None,
            outdev: None,
            ct_info: None,
            uid: None,
            gid: None,
        }
    }

    fn verdicts(buf: &[u8]) -> Vec<VerdictMsg> {
        codec::messages(buf)
            .map(|m| match m.unwrap() {
                Message::Verdict(v) => v,
                o => panic!("{o:?}"),
            })
            .collect()
    }

    fn by_first_byte(p: &[u8], _mark: u32) -> QueueVerdict {
        match p.first() {
            Some(0) => QueueVerdict::DROP,
            Some(1) => QueueVerdict::ACCEPT,
            Some(&m) => QueueVerdict::accept_with_mark(m as u32),
            None => panic!("empty payload"),
        }
    }

    #[test]
    fn coalesces_runs_of_identical_verdicts() {
        let mut b = VerdictBatcher::new(true, 8);
        for (id, v) in [
            (10, QueueVerdict::ACCEPT),
            (11, QueueVerdict::ACCEPT),
            (12, QueueVerdict::accept_with_mark(5)),
            (13, QueueVerdict::DROP),
            (14, QueueVerdict { accept: false, mark: Some(9) }), // mark ignored on drop
            (15, QueueVerdict::accept_with_mark(5)),
            (16, QueueVerdict::accept_with_mark(5)),
            (17, QueueVerdict::accept_with_mark(5)),
        ] {
            b.push(3, id, v);
        }
        assert_eq!(b.verdicts(), 8);
        let got = verdicts(b.finish());
        let v = |batch, id, verdict, mark| VerdictMsg { queue: 3, batch, id, verdict, mark };
        assert_eq!(
            got,
            vec![
                v(true, 11, NF_ACCEPT, None),
                v(false, 12, NF_ACCEPT, Some(5)),
                v(true, 14, NF_DROP, None),
                v(true, 17, NF_ACCEPT, Some(5)),
            ]
        );
        b.clear();
        assert!(b.finish().is_empty());
        assert_eq!(b.verdicts(), 0);
    }

    #[test]
    fn without_coalescing_one_message_per_packet() {
        let mut b = VerdictBatcher::new(false, 4);
        for id in 0..4 {
            b.push(1, id, QueueVerdict::ACCEPT);
        }
        let got = verdicts(b.finish());
        assert_eq!(got.len(), 4);
        assert!(got
            .iter()
            .enumerate()
            .all(|(i, v)| !v.batch && v.id == i as u32 && v.verdict == NF_ACCEPT));
    }

    #[test]
    fn handle_datagram_decides_counts_and_catches_panics() {
        let mut d = Vec::new();
        put_packet(&mut d, &pkt(2, 1, &[1]));
        put_packet(&mut d, &pkt(2, 2, &[0]));
        put_packet(&mut d, &pkt(2, 3, &[7]));
        put_packet(&mut d, &pkt(2, 4, &[])); // the callback panics on this one
                                             // an error ack (ENOENT for a stale verdict) and the awaited ack
        for (errno, seq) in [(-2i32, 0u32), (0, 5)] {
            d.extend_from_slice(&36u32.to_ne_bytes());
            d.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
            d.extend_from_slice(&0u16.to_ne_bytes());
            d.extend_from_slice(&seq.to_ne_bytes());
            d.extend_from_slice(&0u32.to_ne_bytes());
            d.extend_from_slice(&errno.to_ne_bytes());
            d.extend_from_slice(&[0u8; 16]);
        }
        d.extend_from_slice(&[0xff; 3]); // junk: an error
        let decide: DecisionFn = Arc::new(by_first_byte);
        let mut out = VerdictBatcher::new(false, 8);
        let mut st = WorkerStats::default();
        // Silence the two expected panic messages (the hook is process-wide: restored below).
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let ack = handle_datagram(&d, false, &*decide, false, &mut out, &mut st, Some(5));
        assert_eq!(ack.map(|a| (a.seq, a.errno)), Some((5, 0)));
        assert_eq!((st.packets, st.drops, st.errors), (4, 2, 3)); // panic, ENOENT, junk
        let got = verdicts(out.finish());
        let summary: Vec<_> = got.iter().map(|v| (v.id, v.verdict, v.mark)).collect();
        assert_eq!(
            summary,
            vec![
                (1, NF_ACCEPT, None),
                (2, NF_DROP, None),
                (3, NF_ACCEPT, Some(7)),
                (4, NF_DROP, None)
            ]
        );

        // fail-open turns a panicking decision into ACCEPT; a truncated datagram counts
        let mut out = VerdictBatcher::new(true, 8);
        let mut st = WorkerStats::default();
        let mut d = Vec::new();
        put_packet(&mut d, &pkt(2, 9, &[]));
        handle_datagram(&d, true, &*decide, true, &mut out, &mut st, None);
        std::panic::set_hook(prev);
        assert_eq!((st.packets, st.drops, st.errors), (1, 0, 2));
        assert_eq!(verdicts(out.finish())[0].verdict, NF_ACCEPT);
    }

    #[test]
    fn config_request_flags() {
        let cfg = QueueConfig {
            fail_open: true,
            gso: false,
            copy_range: 200,
            ..QueueConfig::queues(4, 7)
        };
        let r = cfg.request(true);
        assert_eq!(r.cmd, Some(CfgCmd::BIND));
        assert_eq!(r.params, Some(CopyParams::packet(200)));
        let f = r.flags.unwrap();
        assert_eq!(f.mask, NFQA_CFG_F_GSO | NFQA_CFG_F_FAIL_OPEN | NFQA_CFG_F_CONNTRACK);
        assert_eq!(f.value, NFQA_CFG_F_FAIL_OPEN);
        assert!(cfg.slot_size() >= 200 + 512);
        assert!(QueueConfig::default().request(false).cmd.is_none());
    }

    #[test]
    fn proc_stats_parse() {
        let text = "    0 123456     0 2   128     0     0       17  1\n    1  -1 x\n65535      9     3 2 65531     4     5 4294967295  1\n";
        let v = KernelQueueStats::parse_all(text);
        assert_eq!(v.len(), 2);
        assert_eq!(
            v[0],
            KernelQueueStats {
                queue: 0,
                portid: 123456,
                waiting: 0,
                copy_mode: 2,
                copy_range: 128,
                queue_dropped: 0,
                user_dropped: 0,
                id_sequence: 17
            }
        );
        assert_eq!(
            (v[1].queue, v[1].waiting, v[1].queue_dropped, v[1].user_dropped, v[1].id_sequence),
            (65535, 3, 4, 5, u32::MAX)
        );
    }

    #[test]
    fn stats_snapshot_and_sum() {
        let c = WorkerCounters::default();
        c.publish(&WorkerStats { packets: 3, verdicts: 3, batches: 1, ..Default::default() });
        c.publish(&WorkerStats { packets: 2, errors: 1, ..Default::default() });
        let s = c.snapshot(4);
        assert_eq!((s.queue, s.packets, s.verdicts, s.errors, s.batches), (4, 5, 3, 1, 1));
        assert_eq!(s.add(&s).packets, 10);
    }

    #[test]
    fn an_overrun_is_counted_and_reading_goes_on() {
        let mut st = WorkerStats::default();
        let enobufs = io::Error::from_raw_os_error(libc::ENOBUFS);
        assert!(recv_failed(enobufs, &mut st).is_ok(), "an overrun does not stop the reader");
        assert_eq!((st.enobufs, st.errors), (1, 0));
        let timeout = io::Error::from_raw_os_error(libc::EAGAIN);
        assert!(recv_failed(timeout, &mut st).is_ok());
        assert_eq!((st.enobufs, st.errors), (1, 0), "a timeout is not counted");
        let broken = io::Error::from_raw_os_error(libc::EBADF);
        assert!(recv_failed(broken, &mut st).is_err(), "the reader backs off");
        assert_eq!((st.enobufs, st.errors), (1, 1));
    }

    /// A worker on one end of a datagram socket pair (a real socket: `recvmmsg` and
    /// `send` as on a netlink one), the other end returned to play the kernel.
    fn worker_on_socketpair() -> (Worker, std::os::unix::net::UnixDatagram) {
        let (ours, kernel) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let cfg = QueueConfig { batch_size: 4, ..QueueConfig::default() };
        let sock = NfqSocket::from_fd(OwnedFd::from(ours));
        (Worker::on_socket(&cfg, 7, sock, Arc::new(by_first_byte)), kernel)
    }

    #[test]
    fn a_verdict_that_cannot_be_sent_is_counted_and_the_worker_goes_on() {
        let mut buf = Vec::new();
        put_packet(&mut buf, &pkt(7, 1, &[1, 0, 0]));
        // Sent: the verdict reaches the other end.
        let (mut worker, kernel) = worker_on_socketpair();
        kernel.send(&buf).unwrap();
        assert!(worker.poll(None).unwrap().is_none());
        let mut got = [0u8; 256];
        let n = kernel.recv(&mut got).unwrap();
        assert_eq!(verdicts(&got[..n])[0].verdict, NF_ACCEPT);
        let st = worker.counters.snapshot(7);
        assert_eq!((st.packets, st.verdicts, st.sends, st.errors), (1, 1, 1, 0));
        // The send fails (our end is shut for writing): counted, and the next poll works.
        let (mut worker, kernel) = worker_on_socketpair();
        // SAFETY: shutdown(2) on a descriptor the worker owns and keeps open.
        assert_eq!(unsafe { libc::shutdown(worker.sock.as_raw_fd(), libc::SHUT_WR) }, 0);
        kernel.send(&buf).unwrap();
        assert!(worker.poll(None).unwrap().is_none(), "a failed send is not a failed poll");
        let st = worker.counters.snapshot(7);
        assert_eq!((st.packets, st.verdicts, st.sends, st.errors), (1, 1, 1, 1));
        kernel.send(&buf).unwrap();
        worker.poll(None).unwrap();
        assert_eq!(worker.counters.snapshot(7).packets, 2);
    }
}
