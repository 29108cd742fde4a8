//! The load balancer's threads: N workers, each with its own packet socket and receive
//! ring in one `PACKET_FANOUT` hash group (so a flow's frames always meet the same worker),
//! its own [`Forwarder`] and counters, and batched sends. The engine is shared.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::forward::{ForwardCounters, Forwarder, LbConfig, Outcome};
use super::ring::{self, VnetHeader};
use super::sys::{interface_info, InterfaceInfo, PacketSocket, RingConfig, SEND_BATCH};
use crate::datapath::nfqueue::sys::monotonic_nanos;
use crate::engine::Engine;

/// How the workers attach to the interface.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub interface: String,
    pub workers: usize,
    /// The fanout group id: unique per interface among processes that use fanout.
    pub fanout_group: u16,
    pub qdisc_bypass: bool,
    pub ring: RingConfig,
    /// Receive and send with virtio headers (`PACKET_VNET_HDR`), so GSO super-packets are
    /// forwarded whole and partial checksums left to the device: see
    /// [`Forwarder::process_vnet`]. Without it, a GSO frame larger than the MTU is answered
    /// as too big.
    pub vnet_hdr: bool,
}

impl WorkerConfig {
    pub fn new(interface: &str, workers: usize) -> Self {
        WorkerConfig {
            interface: interface.to_string(),
            workers,
            fanout_group: (std::process::id() & 0xffff) as u16,
            qdisc_bypass: true,
            ring: RingConfig::default(),
            vnet_hdr: true,
        }
    }
}

/// One worker's I/O counters (its [`ForwardCounters`] say what became of the frames).
#[derive(Debug, Default)]
pub struct IoCounters {
    pub rx_frames: AtomicU64,
    /// Frames the NIC had stripped a VLAN tag from: another network's, not forwarded.
    pub rx_vlan: AtomicU64,
    /// Frames longer than the ring's frame size, cut short: not forwarded.
    pub rx_truncated: AtomicU64,
    /// GSO super-packets received (several segments' worth in one frame, virtio header).
    pub rx_gso: AtomicU64,
    pub rx_blocks: AtomicU64,
    pub tx_frames: AtomicU64,
    pub tx_errors: AtomicU64,
    pub tx_batches: AtomicU64,
    /// From `PACKET_STATISTICS`: frames the kernel offered the ring, and those it dropped
    /// because the ring was full.
    pub ring_packets: AtomicU64,
    pub ring_drops: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    // One writer per counter (its worker): no locked read-modify-write needed.
    c.store(c.load(Ordering::Relaxed) + n, Ordering::Relaxed);
}

impl IoCounters {
    pub fn snapshot(&self) -> Vec<(String, u64)> {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        [
            ("rx_frames", &self.rx_frames),
            ("rx_vlan", &self.rx_vlan),
            ("rx_truncated", &self.rx_truncated),
            ("rx_gso", &self.rx_gso),
            ("rx_blocks", &self.rx_blocks),
            ("tx_frames", &self.tx_frames),
            ("tx_errors", &self.tx_errors),
            ("tx_batches", &self.tx_batches),
            ("ring_packets", &self.ring_packets),
            ("ring_drops", &self.ring_drops),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), get(v)))
        .collect()
    }
}

struct WorkerShared {
    io: IoCounters,
    forward: Arc<ForwardCounters>,
}

/// Running workers; dropping them stops them.
pub struct LbWorkers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    shared: Vec<Arc<WorkerShared>>,
    pub interface: InterfaceInfo,
}

impl LbWorkers {
    /// Opens the sockets in the calling thread's network namespace (they keep it), then
    /// starts one thread per socket.
    pub fn start(
        cfg: &WorkerConfig,
        engine: Arc<Engine>,
        lb: Arc<LbConfig>,
    ) -> io::Result<LbWorkers> {
        let interface = interface_info(&cfg.interface)?;
        let mut sockets = Vec::new();
        for _ in 0..cfg.workers.max(1) {
            let s = PacketSocket::open(interface.index, &cfg.ring, cfg.vnet_hdr)?;
            s.join_fanout(cfg.fanout_group)?;
            s.set_qdisc_bypass(cfg.qdisc_bypass)?;
            if lb.vips.iter().any(|v| v.is_ipv6()) {
                s.receive_all_multicast(interface.index)?;
            }
            sockets.push(s);
        }
        let stop = Arc::new(AtomicBool::new(false));
        // Room for the largest frame a worker writes: one of the MTU plus an outer header, or
        // an ICMP reply quoting up to 1,280 bytes (with virtio headers, what L2 direct routing
        // forwards stays in the ring: see `Forwarder::process_vnet_spliced`).
        let tx_len = VnetHeader::LEN + 14 + 40 + lb.mtu.max(1500);
        let vnet_hdr = cfg.vnet_hdr;
        let mut threads = Vec::new();
        let mut shared = Vec::new();
        for (i, sock) in sockets.into_iter().enumerate() {
            let fwd = Forwarder::new(engine.clone(), lb.clone());
            let s = Arc::new(WorkerShared {
                io: IoCounters::default(),
                forward: fwd.counters().clone(),
            });
            shared.push(s.clone());
            let stop = stop.clone();
            let t = std::thread::Builder::new()
                .name(format!("pykp-lb-{i}"))
                .spawn(move || run(sock, fwd, &s.io, &stop, tx_len, vnet_hdr))?;
            threads.push(t);
        }
        Ok(LbWorkers { stop, threads, shared, interface })
    }

    /// Each worker's counters, labelled (I/O, then what the forwarder made of the frames).
    pub fn stats(&self) -> Vec<Vec<(String, u64)>> {
        self.shared
            .iter()
            .map(|s| {
                let mut v = s.io.snapshot();
                v.extend(s.forward.snapshot());
                v
            })
            .collect()
    }

    /// Every worker's counters added up.
    pub fn total(&self) -> Vec<(String, u64)> {
        let mut all = self.stats().into_iter();
        let mut total = all.next().unwrap_or_default();
        for w in all {
            for (t, (_, n)) in total.iter_mut().zip(w) {
                t.1 += n;
            }
        }
        total
    }

    /// One counter of [`total`](Self::total); 0 if there is no such label.
    pub fn total_of(&self, label: &str) -> u64 {
        self.total().into_iter().find(|(k, _)| k == label).map_or(0, |(_, n)| n)
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for LbWorkers {
    fn drop(&mut self) {
        self.stop();
    }
}

const POLL: Duration = Duration::from_millis(50);
const STATS_EVERY: Duration = Duration::from_millis(200);

fn run(
    sock: PacketSocket,
    fwd: Forwarder,
    io: &IoCounters,
    stop: &AtomicBool,
    tx_len: usize,
    vnet_hdr: bool,
) {
    let mut tx: Vec<Vec<u8>> = (0..SEND_BATCH).map(|_| vec![0u8; tx_len]).collect();
    let mut lens = [0usize; SEND_BATCH];
    let mut last_stats = Instant::now();
    while !stop.load(Ordering::Acquire) {
        if let Err(e) = sock.wait(POLL) {
            eprintln!("pykp-lb: poll: {e}");
            std::thread::sleep(POLL);
        }
        while let Some(block) = sock.next_block() {
            bump(&io.rx_blocks, 1);
            let mut n = 0;
            // The received bytes each frame to send goes on with (empty: all in `tx[i]`).
            let mut bodies: [&[u8]; SEND_BATCH] = [&[]; SEND_BATCH];
            let frames = match vnet_hdr {
                true => ring::frames_with_vnet(block.bytes()),
                false => ring::frames(block.bytes()),
            };
            for f in frames {
                bump(&io.rx_frames, 1);
                if f.vlan {
                    bump(&io.rx_vlan, 1);
                    continue;
                }
                if f.data.len() < f.wire_len {
                    bump(&io.rx_truncated, 1);
                    continue;
                }
                let now = monotonic_nanos();
                let (outcome, spliced) = match vnet_hdr {
                    true => {
                        if f.vnet.is_some_and(|v| v.is_gso()) {
                            bump(&io.rx_gso, 1);
                        }
                        fwd.process_vnet_spliced(f.data, f.vnet, now, &mut tx[n])
                    }
                    false => (fwd.process_rx(f.data, f.checksum_partial, now, &mut tx[n]), None),
                };
                if let Outcome::Transmit { len, .. } = outcome {
                    (lens[n], bodies[n]) = match spliced {
                        Some(body) => {
                            (VnetHeader::LEN + 14, f.data.get(14..14 + body).unwrap_or_default())
                        }
                        None => (len, &[][..]),
                    };
                    n += 1;
                    if n == SEND_BATCH {
                        flush(&sock, &tx, &lens[..n], &bodies[..n], io);
                        n = 0;
                    }
                }
            }
            flush(&sock, &tx, &lens[..n], &bodies[..n], io);
            drop(block);
        }
        if last_stats.elapsed() >= STATS_EVERY {
            last_stats = Instant::now();
            if let Ok(st) = sock.take_statistics() {
                bump(&io.ring_packets, st.packets);
                bump(&io.ring_drops, st.drops);
            }
        }
    }
}

/// Sends frame `i` as `tx[i][..lens[i]]` followed by `bodies[i]`.
fn flush(sock: &PacketSocket, tx: &[Vec<u8>], lens: &[usize], bodies: &[&[u8]], io: &IoCounters) {
    if lens.is_empty() {
        return;
    }
    let mut frames: [(&[u8], &[u8]); SEND_BATCH] = [(&[], &[]); SEND_BATCH];
    for (i, (&len, &body)) in lens.iter().zip(bodies).enumerate() {
        frames[i] = (&tx[i][..len], body);
    }
    let (sent, failed) = sock.send_batch(&frames[..lens.len()]);
    bump(&io.tx_frames, sent as u64);
    bump(&io.tx_errors, failed as u64);
    bump(&io.tx_batches, 1);
}
