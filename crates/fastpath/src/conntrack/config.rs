//! Sizes and timeouts of the connection and affinity tables.
//!
//! Timeout defaults follow the Linux conntrack sysctls kube-proxy relies on, so a flow
//! lives as long in pykp's table as it would in the kernel's under kube-proxy.

use crate::flow::{Nanos, NANOS_PER_SEC};

use super::state::ConnState;

const fn secs(s: u64) -> Nanos {
    s * NANOS_PER_SEC
}

/// kube-proxy's default ClientIP affinity timeout (`timeoutSeconds`: 3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT: Nanos = secs(10_800);

/// Configuration of [`ConnTable`](super::ConnTable) and [`AffinityTable`](super::AffinityTable).
/// Every timeout is an idle timeout in nanoseconds, restarted by each packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConntrackConfig {
    /// Hard cap on connection entries. Split exactly across the shards; a full shard
    /// evicts its least recently used entry. Default 262 144 (kube-proxy's
    /// `conntrack.maxPerCore` 32 768 x 8 cores).
    pub capacity: usize,
    /// Lock shards, rounded up to a power of two (and down so every shard holds at least
    /// one entry). More shards, less contention between workers. Default 64.
    pub shards: usize,
    /// TCP after an initial SYN, before any other packet (`nf_conntrack_tcp_timeout_syn_sent`,
    /// 120 s).
    pub tcp_syn_sent: Nanos,
    /// TCP once a non-SYN packet was seen (kube-proxy sets
    /// `nf_conntrack_tcp_timeout_established` to 86 400 s).
    pub tcp_established: Nanos,
    /// TCP after a FIN (`nf_conntrack_tcp_timeout_time_wait`, 120 s).
    pub tcp_closing: Nanos,
    /// TCP after a RST (`nf_conntrack_tcp_timeout_close`, 10 s).
    pub tcp_closed: Nanos,
    /// UDP flow that has seen one packet (`nf_conntrack_udp_timeout`, 30 s).
    pub udp: Nanos,
    /// UDP flow that has seen more than one packet (`nf_conntrack_udp_timeout_stream`, 120 s).
    pub udp_stream: Nanos,
    /// SCTP, a plain idle timeout: chunks are not parsed, so this is the kernel's
    /// `nf_conntrack_sctp_timeout_established` (210 s = heartbeat interval x path retries +
    /// RTO max since Linux 6.3); a live association heartbeats every 30 s by default.
    pub sctp: Nanos,
    /// A flow the kernel's conntrack confirmed ([`ConnState::Kernel`]). Its end comes as a
    /// conntrack event; this only bounds an entry whose event was lost between two
    /// resynchronisations (kube-proxy's established timeout, 86 400 s).
    pub kernel: Nanos,
    /// Hard cap on session-affinity entries (client IP x service). Default 65 536.
    pub affinity_capacity: usize,
    /// Affinity timeout for services that do not set one (kube-proxy: 10 800 s).
    pub affinity_timeout: Nanos,
}

impl Default for ConntrackConfig {
    fn default() -> Self {
        ConntrackConfig {
            capacity: 262_144,
            shards: 64,
            tcp_syn_sent: secs(120),
            tcp_established: secs(86_400),
            tcp_closing: secs(120),
            tcp_closed: secs(10),
            udp: secs(30),
            udp_stream: secs(120),
            sctp: secs(210),
            kernel: secs(86_400),
            affinity_capacity: 65_536,
            affinity_timeout: DEFAULT_AFFINITY_TIMEOUT,
        }
    }
}

impl ConntrackConfig {
    /// The idle timeout of an entry in `state`.
    #[inline]
    pub fn timeout(&self, state: ConnState) -> Nanos {
        match state {
            ConnState::SynSent => self.tcp_syn_sent,
            ConnState::Established => self.tcp_established,
            ConnState::Closing => self.tcp_closing,
            ConnState::Closed => self.tcp_closed,
            ConnState::Udp => self.udp,
            ConnState::UdpStream => self.udp_stream,
            ConnState::Sctp => self.sctp,
            ConnState::Kernel => self.kernel,
        }
    }
}
