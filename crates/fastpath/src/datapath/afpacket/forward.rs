//! The load balancer's per-frame logic, without I/O: an Ethernet frame received on the
//! load-balancer interface in, the frame to transmit (or why none) out.
//!
//! - IPv4/IPv6 TCP, UDP and SCTP to a service VIP: the [`Engine`] chooses the backend (its
//!   connection table first, then the service's policy), and the untouched client packet
//!   goes out inside an outer IP header from this node to the backend (IP-in-IP, protocol
//!   4, or IPv6-in-IP, 41), to the backend's MAC (or the router's) from a [`Neighbours`]
//!   table.
//! - Too big once encapsulated: ICMP "fragmentation needed" (IPv4 with DF) or ICMPv6
//!   "packet too big" back to the client, from the VIP, with the MTU left after the outer
//!   header, so the client's path MTU discovery shrinks its packets.
//! - ARP requests and IPv6 neighbour solicitations for a VIP: answered with this
//!   interface's MAC, so the router delivers VIP traffic here.
//! - Everything else is the kernel's (it gets its own copy of every frame): ignored.
//! - Malformed frames: dropped and counted by reason. No input panics (the fuzz driver
//!   [`fuzz_frame`] holds us to it).
//!
//! TTL: the inner packet is not touched (its checksums stay valid, and this node is where
//! the VIP lives as far as the network knows, so it is the packet's last IP hop before the
//! tunnel). The outer header gets its own TTL ([`LbConfig::outer_ttl`]), the inner DSCP/ECN
//! byte and, for an IPv4 inner packet, its DF bit (RFC 2003 §3.1).

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ahash::AHashMap;

use crate::engine::{DropReason as EngineDrop, Engine, PassReason, Verdict};
use crate::flow::{FlowKey, Nanos};
use crate::policy::maglev::flow_hash;
use crate::policy::HashKey;
use crate::wire::PacketInfo;
use crate::Protocol;

use super::ring::VnetHeader;
use crate::wire::arp::{self, ArpPacket, ArpRepr};
use crate::wire::ethernet::{self, ethertype, EthernetFrame, MacAddr};
use crate::wire::icmp;
use crate::wire::{self, Ipv4Packet, Ipv4Repr, Ipv6Packet, Ipv6Repr, WireError};

/// Outer protocol numbers: what the backend's tunnel device decapsulates.
pub const PROTO_IPIP: u8 = 4;
pub const PROTO_IPV6_IN_IP: u8 = 41;

/// Ethernet's shortest frame without the FCS: short replies are padded to it.
const MIN_FRAME: usize = 60;
/// RFC 1812 §4.3.2.3: an ICMP error quotes as much as fits in 576 bytes.
const ICMPV4_MAX: usize = 576;

/// Next-hop MACs: per address (backends on this segment), else the default (the router).
#[derive(Clone, Debug, Default)]
pub struct Neighbours {
    entries: AHashMap<IpAddr, MacAddr>,
    default: Option<MacAddr>,
}

impl Neighbours {
    pub fn new(default: Option<MacAddr>) -> Self {
        Neighbours { entries: AHashMap::new(), default }
    }

    pub fn insert(&mut self, addr: IpAddr, mac: MacAddr) {
        self.entries.insert(addr, mac);
    }

    #[inline]
    pub fn lookup(&self, addr: &IpAddr) -> Option<MacAddr> {
        self.entries.get(addr).copied().or(self.default)
    }

    /// The address's own entry, never the default.
    #[inline]
    pub fn lookup_exact(&self, addr: &IpAddr) -> Option<MacAddr> {
        self.entries.get(addr).copied()
    }
}

/// How a VIP packet reaches its backend. Both are direct server return: the backend holds
/// the VIP on loopback and answers the client itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Forwarding {
    /// IP-in-IP (IPv6 inside: protocol 41) to the backend's MAC, or the router's for a
    /// backend elsewhere: backends anywhere routable, 20 or 40 bytes of overhead.
    #[default]
    IpIp,
    /// L2 direct routing (IPVS "DR"): the frame goes out as it came but for its MACs, to
    /// the backend's own MAC, so backends must share this segment (each needs a
    /// [`Neighbours`] entry: the router would route the VIP straight back here). No
    /// encapsulation: no overhead, and no tunnel device on the backends.
    L2Dsr,
}

/// What the load balancer needs to know about its interface and network.
#[derive(Clone, Debug)]
pub struct LbConfig {
    /// The interface's MAC: frames to it are ours to look at, replies come from it.
    pub mac: MacAddr,
    /// This node's addresses: the outer source towards IPv4 / IPv6 backends.
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    /// Egress MTU (IP bytes per frame).
    pub mtu: usize,
    /// TTL / hop limit of the outer header.
    pub outer_ttl: u8,
    /// Addresses answered in ARP and neighbour discovery: the VIPs this node announces.
    pub vips: HashSet<IpAddr>,
    pub neighbours: Neighbours,
    pub forwarding: Forwarding,
}

impl LbConfig {
    pub fn new(mac: MacAddr, mtu: usize) -> Self {
        LbConfig {
            mac,
            ipv4: None,
            ipv6: None,
            mtu,
            outer_ttl: 64,
            vips: HashSet::new(),
            neighbours: Neighbours::default(),
            forwarding: Forwarding::IpIp,
        }
    }
}

/// How [`Forwarder::outcome`] treats one received frame beyond its bytes.
#[derive(Clone, Copy, Debug, Default)]
struct RxHandling {
    /// 0 for an ordinary frame, else the segment payload size of a GSO one.
    gso_size: u16,
    /// An L2-forwarded packet is left in the received frame: only the Ethernet header is
    /// written out (see [`Forwarder::process_vnet_spliced`]).
    splice: bool,
}

/// What a transmitted frame is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TxKind {
    /// An encapsulated client packet, to a backend.
    Forward,
    ArpReply,
    NeighborAdvert,
    /// ICMP fragmentation needed / ICMPv6 packet too big, to the client.
    TooBig,
}

/// Not ours: the kernel has its own copy and decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IgnoreReason {
    /// Unicast to another MAC (promiscuous mode, a flooding switch).
    OtherMac,
    /// Not IPv4, IPv6 or ARP (VLAN-tagged frames included).
    OtherEthertype,
    /// Not to a VIP: the node's own traffic, ARP for other addresses, ARP replies.
    NotAVip,
    /// To a VIP but not TCP, UDP or SCTP (ICMP echo, ...).
    UnsupportedProtocol,
}

/// Dropped: counted, never forwarded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    Malformed(WireError),
    /// A non-first fragment to a VIP: no ports to find its flow by.
    Fragment,
    /// The service has no usable backend.
    NoEndpoints,
    /// No MAC for the backend and no default next hop.
    NoNeighbour,
    /// The backend's family has no address of ours to encapsulate from.
    NoSourceAddress,
    /// Too big once encapsulated and the client allows fragmentation (IPv4, DF clear):
    /// we do not fragment.
    TooBigDfClear,
    /// The caller's transmit buffer is shorter than the frame.
    OutputTooSmall,
    /// A GSO super-packet (see [`Forwarder::process_vnet`]) to forward by IP-in-IP: the
    /// virtio header has no GSO type for a tunnel, and we do not segment.
    GsoTunnel,
}

pub const IGNORE_REASONS: [&str; 4] =
    ["other_mac", "other_ethertype", "not_a_vip", "unsupported_protocol"];

/// Labels of [`DropReason`], in counter order.
pub const DROP_REASONS: [&str; 17] = [
    "truncated",
    "bad_version",
    "bad_ihl",
    "bad_total_length",
    "bad_ext_header",
    "ext_header_loop",
    "routing_header",
    "bad_tcp_offset",
    "bad_udp_length",
    "malformed_other",
    "fragment",
    "no_endpoints",
    "no_neighbour",
    "no_source_address",
    "too_big_df_clear",
    "output_too_small",
    "gso_tunnel",
];

pub const TX_KINDS: [&str; 4] = ["forward", "arp_reply", "neighbor_advert", "too_big"];

impl TxKind {
    pub const fn index(self) -> usize {
        self as usize
    }
}

impl IgnoreReason {
    pub const fn index(self) -> usize {
        self as usize
    }
}

impl DropReason {
    pub const fn index(self) -> usize {
        match self {
            DropReason::Malformed(e) => match e {
                WireError::Truncated => 0,
                WireError::BadVersion => 1,
                WireError::BadIhl => 2,
                WireError::BadTotalLength => 3,
                WireError::BadExtHeader => 4,
                WireError::ExtHeaderLoop => 5,
                WireError::RoutingHeader => 6,
                WireError::BadTcpOffset => 7,
                WireError::BadUdpLength => 8,
                _ => 9,
            },
            DropReason::Fragment => 10,
            DropReason::NoEndpoints => 11,
            DropReason::NoNeighbour => 12,
            DropReason::NoSourceAddress => 13,
            DropReason::TooBigDfClear => 14,
            DropReason::OutputTooSmall => 15,
            DropReason::GsoTunnel => 16,
        }
    }

    pub const fn as_str(self) -> &'static str {
        DROP_REASONS[self.index()]
    }
}

/// What to do with one received frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Send `out[..len]` on the interface.
    Transmit {
        len: usize,
        kind: TxKind,
    },
    Ignore(IgnoreReason),
    Drop(DropReason),
}

/// One worker's counters. Each has one writer (the worker's [`Forwarder`]), so it adds with
/// a plain load and store (no locked read-modify-write on the per-packet path); readers on
/// other threads see totals that are at most a packet or two behind.
#[derive(Debug, Default)]
pub struct ForwardCounters {
    pub tx: [AtomicU64; TX_KINDS.len()],
    pub ignored: [AtomicU64; IGNORE_REASONS.len()],
    pub drops: [AtomicU64; DROP_REASONS.len()],
}

impl ForwardCounters {
    fn count(&self, o: &Outcome) {
        let c = match o {
            Outcome::Transmit { kind, .. } => &self.tx[kind.index()],
            Outcome::Ignore(r) => &self.ignored[r.index()],
            Outcome::Drop(r) => &self.drops[r.index()],
        };
        c.store(c.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }

    /// Every frame seen: the sum of the outcomes.
    pub fn frames(&self) -> u64 {
        let sum = |a: &[AtomicU64]| a.iter().map(|n| n.load(Ordering::Relaxed)).sum::<u64>();
        sum(&self.tx) + sum(&self.ignored) + sum(&self.drops)
    }

    pub fn drop_count(&self, r: DropReason) -> u64 {
        self.drops[r.index()].load(Ordering::Relaxed)
    }

    pub fn tx_count(&self, k: TxKind) -> u64 {
        self.tx[k.index()].load(Ordering::Relaxed)
    }

    /// Every counter, labelled (`tx_forward`, `ignored_not_a_vip`, `drops_truncated`, ...).
    pub fn snapshot(&self) -> Vec<(String, u64)> {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut v = vec![("frames".to_string(), self.frames())];
        v.extend(TX_KINDS.iter().zip(&self.tx).map(|(k, n)| (format!("tx_{k}"), get(n))));
        v.extend(
            IGNORE_REASONS.iter().zip(&self.ignored).map(|(k, n)| (format!("ignored_{k}"), get(n))),
        );
        v.extend(DROP_REASONS.iter().zip(&self.drops).map(|(k, n)| (format!("drops_{k}"), get(n))));
        v
    }
}

/// The load balancer's frame handler. One per worker thread: it is its counters' only
/// writer, so it is `Send` but deliberately not shared (`process` from two threads would
/// lose counts, nothing worse). The engine is shared.
pub struct Forwarder {
    engine: Arc<Engine>,
    config: Arc<LbConfig>,
    counters: Arc<ForwardCounters>,
}

impl Forwarder {
    pub fn new(engine: Arc<Engine>, config: Arc<LbConfig>) -> Self {
        Forwarder { engine, config, counters: Arc::default() }
    }

    pub fn counters(&self) -> &Arc<ForwardCounters> {
        &self.counters
    }

    pub fn config(&self) -> &LbConfig {
        &self.config
    }

    /// Handles one received frame, writing any frame to send into `out` (1,514 bytes plus
    /// the outer header's 20 or 40 is enough for any frame of a 1,500-byte MTU link).
    #[inline]
    pub fn process(&self, frame: &[u8], now: Nanos, out: &mut [u8]) -> Outcome {
        self.process_rx(frame, false, now, out)
    }

    /// [`process`](Self::process) for a frame whose L4 checksum is still partial (only the
    /// pseudo-header's: the kernel's `CHECKSUM_PARTIAL`, which a local or virtual sender such
    /// as a veth peer leaves for the device to finish). A forwarded copy gets its checksum
    /// completed, since no device down the tunnel will.
    #[inline]
    pub fn process_rx(
        &self,
        frame: &[u8],
        checksum_partial: bool,
        now: Nanos,
        out: &mut [u8],
    ) -> Outcome {
        let o = self.outcome(frame, RxHandling::default(), now, out);
        if let (true, Outcome::Transmit { len, kind: TxKind::Forward }) = (checksum_partial, o) {
            self.complete_checksum(out, len);
        }
        self.counters.count(&o);
        o
    }

    /// [`process`](Self::process) for a socket with `PACKET_VNET_HDR`: `rx` is the frame's
    /// virtio header (`None`: no offloads), and `out` gets the header of the frame to send,
    /// then the frame; the length in [`Outcome::Transmit`] counts both.
    ///
    /// L2 direct routing passes the offloads on untouched (only the MACs change, so the
    /// checksum offsets still hold): a GSO super-packet, which a veth or a NIC with GRO/LRO
    /// hands over whole (up to 64 kB), leaves as one, and the kernel or the device cuts it
    /// into the segments its sender meant; its largest segment must fit the MTU. IP-in-IP
    /// cannot: the virtio header has no GSO type for a tunnel, so a GSO frame is dropped
    /// and counted ([`DropReason::GsoTunnel`]: an interface with GRO and LRO off never hands
    /// one over), and a partial checksum is completed here as in
    /// [`process_rx`](Self::process_rx).
    #[inline]
    pub fn process_vnet(
        &self,
        frame: &[u8],
        rx: Option<VnetHeader>,
        now: Nanos,
        out: &mut [u8],
    ) -> Outcome {
        self.vnet(frame, rx, false, now, out).0
    }

    /// [`process_vnet`](Self::process_vnet) without copying what L2 direct routing forwards:
    /// for such a frame `out` gets only the virtio and Ethernet headers, and the second value
    /// is `Some(n)`: the frame to send is `out[..VnetHeader::LEN + 14]` followed by
    /// `frame[14..14 + n]` (the received packet, where it lies). Otherwise `None`, and
    /// `out[..len]` is the whole frame as with `process_vnet`. Saves a copy of every
    /// forwarded byte (64 kB for a GSO frame).
    #[inline]
    pub fn process_vnet_spliced(
        &self,
        frame: &[u8],
        rx: Option<VnetHeader>,
        now: Nanos,
        out: &mut [u8],
    ) -> (Outcome, Option<usize>) {
        self.vnet(frame, rx, true, now, out)
    }

    #[inline]
    fn vnet(
        &self,
        frame: &[u8],
        rx: Option<VnetHeader>,
        splice: bool,
        now: Nanos,
        out: &mut [u8],
    ) -> (Outcome, Option<usize>) {
        let rx = rx.unwrap_or_default();
        let Some((head, body)) = out.split_at_mut_checked(VnetHeader::LEN) else {
            let o = Outcome::Drop(DropReason::OutputTooSmall);
            self.counters.count(&o);
            return (o, None);
        };
        let gso_size = if rx.is_gso() { rx.gso_size.max(1) } else { 0 };
        let splice = splice && self.config.forwarding == Forwarding::L2Dsr;
        let mut spliced = None;
        let o = match self.outcome(frame, RxHandling { gso_size, splice }, now, body) {
            Outcome::Transmit { len, kind } => {
                let tx = match (kind, self.config.forwarding) {
                    (TxKind::Forward, Forwarding::L2Dsr) => {
                        if splice {
                            spliced = Some(len - ethernet::HEADER_LEN);
                        }
                        rx
                    }
                    (TxKind::Forward, Forwarding::IpIp) => {
                        if rx.needs_checksum() {
                            self.complete_checksum(body, len);
                        }
                        VnetHeader::default()
                    }
                    _ => VnetHeader::default(),
                };
                head.copy_from_slice(&tx.to_bytes());
                Outcome::Transmit { len: VnetHeader::LEN + len, kind }
            }
            o => o,
        };
        self.counters.count(&o);
        (o, spliced)
    }

    /// Finishes the client packet's partial L4 checksum in a forwarded frame `out[..len]`.
    fn complete_checksum(&self, out: &mut [u8], len: usize) {
        // The client's packet starts after the Ethernet header and any outer IP header.
        let outer = match self.config.forwarding {
            Forwarding::IpIp => {
                wire::parse_l3(wire::sub(out, ethernet::HEADER_LEN, len)).map(|l| l.l3_len)
            }
            Forwarding::L2Dsr => Ok(0),
        };
        if let Ok(at) = outer {
            let _ = wire::fill_checksums(wire::sub_mut(out, ethernet::HEADER_LEN + at, len));
        }
    }

    #[inline]
    fn outcome(&self, frame: &[u8], rx: RxHandling, now: Nanos, out: &mut [u8]) -> Outcome {
        let Ok(eth) = EthernetFrame::new_checked(frame) else {
            return Outcome::Drop(DropReason::Malformed(WireError::Truncated));
        };
        let dst = eth.dst_addr();
        let to_us = dst == self.config.mac;
        if !to_us && !dst.is_multicast() {
            return Outcome::Ignore(IgnoreReason::OtherMac);
        }
        match eth.ethertype() {
            ethertype::IPV4 | ethertype::IPV6 => self.ip(&eth, to_us, rx, now, out),
            ethertype::ARP => self.arp(&eth, out),
            _ => Outcome::Ignore(IgnoreReason::OtherEthertype),
        }
    }

    fn ip(
        &self,
        eth: &EthernetFrame<&[u8]>,
        to_us: bool,
        rx: RxHandling,
        now: Nanos,
        out: &mut [u8],
    ) -> Outcome {
        let ip = eth.payload();
        // The version nibble must be the one the EtherType promised.
        let version = if eth.ethertype() == ethertype::IPV4 { 4 } else { 6 };
        if ip.first().is_some_and(|b| b >> 4 != version) {
            return Outcome::Drop(DropReason::Malformed(WireError::BadVersion));
        }
        let info = match wire::parse(ip) {
            Ok(info) if to_us => info,
            // Multicast IP data is never a VIP's.
            Ok(_) => return Outcome::Ignore(IgnoreReason::NotAVip),
            Err(WireError::UnsupportedProtocol(icmp::PROTO_ICMPV6)) => {
                return self.neighbor_solicitation(eth, out)
            }
            Err(WireError::UnsupportedProtocol(_)) => {
                return Outcome::Ignore(self.unless_vip(ip, IgnoreReason::UnsupportedProtocol))
            }
            Err(WireError::NonFirstFragment(k)) if self.config.vips.contains(&k.dst) => {
                return Outcome::Drop(DropReason::Fragment)
            }
            Err(WireError::NonFirstFragment(_)) => return Outcome::Ignore(IgnoreReason::NotAVip),
            Err(e) => return Outcome::Drop(DropReason::Malformed(e)),
        };
        let backend = match self.engine.decide_flow(&info.key, info.tcp_flags, now) {
            Verdict::Forward(f) => f.backend.addr.ip(),
            Verdict::Pass(PassReason::NoService) => return Outcome::Ignore(IgnoreReason::NotAVip),
            Verdict::Pass(_) => return Outcome::Ignore(IgnoreReason::UnsupportedProtocol),
            Verdict::Reject { .. } => return Outcome::Drop(DropReason::NoEndpoints),
            Verdict::Drop(EngineDrop::Malformed(e)) => {
                return Outcome::Drop(DropReason::Malformed(e))
            }
        };
        let inner = wire::sub(ip, 0, info.total_len);
        match (self.config.forwarding, rx.gso_size) {
            (Forwarding::IpIp, 0) => self.encapsulate(eth, &info.key, inner, backend, out),
            (Forwarding::IpIp, _) => Outcome::Drop(DropReason::GsoTunnel),
            (Forwarding::L2Dsr, 0) => {
                self.redirect(eth, inner, inner.len(), rx.splice, backend, out)
            }
            (Forwarding::L2Dsr, size) => {
                let segment = gso_segment_len(inner, &info, size);
                self.redirect(eth, inner, segment, rx.splice, backend, out)
            }
        }
    }

    /// L2 direct routing: the client's packet in a frame to the backend's MAC. `on_wire`:
    /// the largest IP packet it is on the wire (its length, or a GSO frame's largest
    /// segment). With `splice`, only the Ethernet header is written (the packet stays in
    /// the received frame; the length returned is still the whole frame's).
    #[inline]
    fn redirect(
        &self,
        eth: &EthernetFrame<&[u8]>,
        inner: &[u8],
        on_wire: usize,
        splice: bool,
        backend: IpAddr,
        out: &mut [u8],
    ) -> Outcome {
        let Some(mac) = self.config.neighbours.lookup_exact(&backend) else {
            return Outcome::Drop(DropReason::NoNeighbour);
        };
        if on_wire > self.config.mtu {
            return self.too_big(eth, inner, 0, out);
        }
        let len = ethernet::HEADER_LEN + inner.len();
        let Some(out) = out.get_mut(..if splice { ethernet::HEADER_LEN } else { len }) else {
            return Outcome::Drop(DropReason::OutputTooSmall);
        };
        let _ = ethernet::emit_header(out, mac, self.config.mac, eth.ethertype());
        if !splice {
            out[ethernet::HEADER_LEN..].copy_from_slice(inner);
        }
        Outcome::Transmit { len, kind: TxKind::Forward }
    }

    /// `reason`, or `NotAVip` when the packet's destination is not one of ours.
    fn unless_vip(&self, ip: &[u8], reason: IgnoreReason) -> IgnoreReason {
        match wire::parse_l3(ip) {
            Ok(l3) if self.config.vips.contains(&l3.dst) => reason,
            _ => IgnoreReason::NotAVip,
        }
    }

    #[inline]
    fn encapsulate(
        &self,
        eth: &EthernetFrame<&[u8]>,
        key: &FlowKey,
        inner: &[u8],
        backend: IpAddr,
        out: &mut [u8],
    ) -> Outcome {
        let Some(mac) = self.config.neighbours.lookup(&backend) else {
            return Outcome::Drop(DropReason::NoNeighbour);
        };
        let outer_len = if backend.is_ipv4() { 20 } else { 40 };
        if outer_len + inner.len() > self.config.mtu {
            return self.too_big(eth, inner, outer_len, out);
        }
        let len = ethernet::HEADER_LEN + outer_len + inner.len();
        let Some(out) = out.get_mut(..len) else {
            return Outcome::Drop(DropReason::OutputTooSmall);
        };
        let (inner_v4, tos, df, ident) = match Ipv4Packet::new_checked(inner) {
            Ok(p) => (true, p.tos(), p.dont_frag(), if p.dont_frag() { 0 } else { p.ident() }),
            // IPv6 is never fragmented on the way: the outer IPv4 header must not be either.
            Err(_) => {
                (false, Ipv6Packet::new_checked(inner).map_or(0, |p| p.traffic_class()), true, 0)
            }
        };
        let protocol = if inner_v4 { PROTO_IPIP } else { PROTO_IPV6_IN_IP };
        let (head, body) = out.split_at_mut(ethernet::HEADER_LEN + outer_len);
        let written = match backend {
            IpAddr::V4(dst) => {
                let Some(src) = self.config.ipv4 else {
                    return Outcome::Drop(DropReason::NoSourceAddress);
                };
                let _ = ethernet::emit_header(head, mac, self.config.mac, ethertype::IPV4);
                Ipv4Repr {
                    src_addr: src,
                    dst_addr: dst,
                    protocol,
                    payload_len: inner.len(),
                    ttl: self.config.outer_ttl,
                    tos,
                    ident,
                    dont_frag: df,
                }
                .emit(&mut head[ethernet::HEADER_LEN..])
            }
            IpAddr::V6(dst) => {
                let Some(src) = self.config.ipv6 else {
                    return Outcome::Drop(DropReason::NoSourceAddress);
                };
                let _ = ethernet::emit_header(head, mac, self.config.mac, ethertype::IPV6);
                Ipv6Repr {
                    src_addr: src,
                    dst_addr: dst,
                    next_header: protocol,
                    payload_len: inner.len(),
                    hop_limit: self.config.outer_ttl,
                    traffic_class: tos,
                    // Entropy for ECMP between here and the backend: one label per flow.
                    flow_label: flow_hash(key, HashKey::FiveTuple, 0) as u32,
                }
                .emit(&mut head[ethernet::HEADER_LEN..])
            }
        };
        if let Err(e) = written {
            return Outcome::Drop(DropReason::Malformed(e));
        }
        body.copy_from_slice(inner);
        Outcome::Transmit { len, kind: TxKind::Forward }
    }

    /// The client's packet would not fit once encapsulated: tell the client the MTU it has.
    fn too_big(
        &self,
        eth: &EthernetFrame<&[u8]>,
        inner: &[u8],
        outer_len: usize,
        out: &mut [u8],
    ) -> Outcome {
        let mtu = self.config.mtu.saturating_sub(outer_len);
        let reply_to = eth.src_addr();
        if let Ok(p) = Ipv4Packet::new_checked(inner) {
            if !p.dont_frag() {
                return Outcome::Drop(DropReason::TooBigDfClear);
            }
            let quoted = wire::sub(inner, 0, inner.len().min(ICMPV4_MAX - 28));
            let len = (ethernet::HEADER_LEN + 28 + quoted.len()).max(MIN_FRAME);
            let Some(out) = out.get_mut(..len) else {
                return Outcome::Drop(DropReason::OutputTooSmall);
            };
            out.fill(0);
            let _ = ethernet::emit_header(out, reply_to, self.config.mac, ethertype::IPV4);
            let ip = &mut out[ethernet::HEADER_LEN..];
            let repr = Ipv4Repr {
                src_addr: p.dst_addr(),
                dst_addr: p.src_addr(),
                protocol: icmp::PROTO_ICMP,
                payload_len: 8 + quoted.len(),
                ttl: 64,
                tos: 0,
                ident: 0,
                dont_frag: true,
            };
            let mtu16 = u16::try_from(mtu).unwrap_or(u16::MAX);
            let ok = repr.emit(ip).is_ok()
                && icmp::emit_frag_needed(&mut ip[20..], mtu16, quoted).is_ok();
            return if ok {
                Outcome::Transmit { len, kind: TxKind::TooBig }
            } else {
                Outcome::Drop(DropReason::OutputTooSmall)
            };
        }
        let Ok(p) = Ipv6Packet::new_checked(inner) else {
            return Outcome::Drop(DropReason::Malformed(WireError::BadVersion));
        };
        let (src, dst) = (p.dst_addr(), p.src_addr());
        let quoted = wire::sub(inner, 0, inner.len().min(icmp::IPV6_MIN_MTU - 48));
        let len = ethernet::HEADER_LEN + 48 + quoted.len();
        let Some(out) = out.get_mut(..len) else {
            return Outcome::Drop(DropReason::OutputTooSmall);
        };
        let _ = ethernet::emit_header(out, reply_to, self.config.mac, ethertype::IPV6);
        let ip = &mut out[ethernet::HEADER_LEN..];
        let repr = Ipv6Repr {
            src_addr: src,
            dst_addr: dst,
            next_header: icmp::PROTO_ICMPV6,
            payload_len: 8 + quoted.len(),
            hop_limit: 64,
            traffic_class: 0,
            flow_label: 0,
        };
        let mtu32 = u32::try_from(mtu).unwrap_or(u32::MAX);
        let ok = repr.emit(ip).is_ok()
            && icmp::emit_packet_too_big(&mut ip[40..], &src, &dst, mtu32, quoted).is_ok();
        if ok {
            Outcome::Transmit { len, kind: TxKind::TooBig }
        } else {
            Outcome::Drop(DropReason::OutputTooSmall)
        }
    }

    fn arp(&self, eth: &EthernetFrame<&[u8]>, out: &mut [u8]) -> Outcome {
        let req = match ArpPacket::new_checked(eth.payload()) {
            Ok(p) => ArpRepr::parse(&p),
            Err(WireError::UnsupportedProtocol(_)) => {
                return Outcome::Ignore(IgnoreReason::OtherEthertype)
            }
            Err(e) => return Outcome::Drop(DropReason::Malformed(e)),
        };
        if req.operation != arp::op::REQUEST
            || !self.config.vips.contains(&IpAddr::V4(req.target_ip))
        {
            return Outcome::Ignore(IgnoreReason::NotAVip);
        }
        let Some(out) = out.get_mut(..MIN_FRAME) else {
            return Outcome::Drop(DropReason::OutputTooSmall);
        };
        out.fill(0);
        let _ = ethernet::emit_header(out, req.sender_hw, self.config.mac, ethertype::ARP);
        let reply = ArpRepr {
            operation: arp::op::REPLY,
            sender_hw: self.config.mac,
            sender_ip: req.target_ip,
            target_hw: req.sender_hw,
            target_ip: req.sender_ip,
        };
        let _ = reply.emit(&mut out[ethernet::HEADER_LEN..]);
        Outcome::Transmit { len: MIN_FRAME, kind: TxKind::ArpReply }
    }

    /// Answers a neighbour solicitation for a VIP. Duplicate address detection (from the
    /// unspecified address) is not answered: the VIP is never this node's to defend.
    fn neighbor_solicitation(&self, eth: &EthernetFrame<&[u8]>, out: &mut [u8]) -> Outcome {
        let ip = eth.payload();
        let Ok(l3) = wire::parse_l3(ip) else {
            return Outcome::Drop(DropReason::Malformed(WireError::Truncated));
        };
        let (IpAddr::V6(asker), Ok(p)) = (l3.src, Ipv6Packet::new_checked(ip)) else {
            return Outcome::Ignore(IgnoreReason::NotAVip);
        };
        let target = icmp::neighbor_solicitation_target(wire::sub(ip, l3.l3_len, l3.total_len));
        // RFC 4861 §7.1.1: a solicitation that crossed a router (hop limit < 255) is forged.
        let Some(target) = target.filter(|t| {
            p.hop_limit() == 255
                && !asker.is_unspecified()
                && self.config.vips.contains(&IpAddr::V6(*t))
        }) else {
            return Outcome::Ignore(IgnoreReason::NotAVip);
        };
        let len = ethernet::HEADER_LEN + 40 + icmp::NEIGHBOR_ADVERT_LEN;
        let Some(out) = out.get_mut(..len) else {
            return Outcome::Drop(DropReason::OutputTooSmall);
        };
        let _ = ethernet::emit_header(out, eth.src_addr(), self.config.mac, ethertype::IPV6);
        let ip = &mut out[ethernet::HEADER_LEN..];
        let repr = Ipv6Repr {
            src_addr: target,
            dst_addr: asker,
            next_header: icmp::PROTO_ICMPV6,
            payload_len: icmp::NEIGHBOR_ADVERT_LEN,
            hop_limit: 255,
            traffic_class: 0,
            flow_label: 0,
        };
        let _ = repr.emit(ip);
        let _ =
            icmp::emit_neighbor_advert(&mut ip[40..], &target, &asker, &target, self.config.mac);
        Outcome::Transmit { len, kind: TxKind::NeighborAdvert }
    }
}

/// The IP length of the largest segment a GSO super-packet becomes: its IP and L4 headers
/// and one `gso_size` payload (or the whole packet, if that is shorter).
fn gso_segment_len(ip: &[u8], info: &PacketInfo, gso_size: u16) -> usize {
    let l4_header = match info.key.proto {
        Protocol::Tcp => ip.get(info.l4_offset + 12).map_or(20, |b| usize::from(b >> 4) * 4),
        _ => 8,
    };
    (info.l4_offset + l4_header + usize::from(gso_size)).min(info.total_len)
}

/// The body of the fuzz targets for this path: `data` both as a whole frame and as an IP
/// packet in a frame to the load balancer's MAC (so IP-packet seeds reach the deep paths),
/// through a load balancer with a TCP, a UDP and an IPv6 service. Besides "no panic" it
/// checks that a transmitted frame is a well-formed frame of its kind; a violation panics
/// on purpose.
pub fn fuzz_frame(data: &[u8]) {
    check_frame(data);
    check_frame(&testbed::frame(data));
}

fn check_frame(data: &[u8]) {
    use std::sync::OnceLock;
    static LB: OnceLock<Forwarder> = OnceLock::new();
    let lb = LB.get_or_init(testbed::forwarder);
    let mut out = [0u8; 1600];
    let n = data.len() as u64;
    // Odd lengths also take the partial-checksum path (completed on the forwarded copy).
    // The same bytes behind a virtio header made of their own first bytes (GSO or not).
    let mut vnet_out = [0u8; 1600 + VnetHeader::LEN];
    if let Outcome::Transmit { len, .. } =
        lb.process_vnet(data, VnetHeader::parse(data), n, &mut vnet_out)
    {
        assert!((VnetHeader::LEN + ethernet::HEADER_LEN..=vnet_out.len()).contains(&len));
        // IP-in-IP passes no offload on: the header is all zero.
        assert_eq!(vnet_out[..VnetHeader::LEN], [0u8; VnetHeader::LEN]);
    }
    match lb.process_rx(data, n % 2 == 1, n, &mut out) {
        Outcome::Transmit { len, kind } => {
            let frame = EthernetFrame::new_checked(&out[..len]).expect("a short frame");
            assert_eq!(frame.src_addr(), lb.config.mac);
            match kind {
                TxKind::Forward => {
                    // The outer header parses, and what it carries is the packet we got.
                    let outer = wire::parse_l3(frame.payload()).expect("a bad outer header");
                    assert!(matches!(outer.proto, PROTO_IPIP | PROTO_IPV6_IN_IP));
                    let inner = &frame.payload()[outer.l3_len..outer.total_len];
                    assert!(wire::parse(inner).is_ok(), "forwarded an unparsable packet");
                    assert!(outer.total_len <= lb.config.mtu);
                }
                TxKind::ArpReply => {
                    let a = ArpPacket::new_checked(frame.payload()).expect("a bad ARP reply");
                    assert!(lb.config.vips.contains(&IpAddr::V4(a.sender_ip())));
                }
                TxKind::NeighborAdvert | TxKind::TooBig => {
                    assert!(wire::parse_l3(frame.payload()).is_ok(), "a bad ICMP reply");
                }
            }
        }
        Outcome::Ignore(_) | Outcome::Drop(_) => {}
    }
}

/// A small load balancer for tests, benches and the fuzz driver: MAC 02:00:00:00:00:01,
/// node addresses 192.0.2.1 and 2001:db8::1, MTU 1500, router 02:00:00:00:00:fe.
/// Services (Maglev, backends 10.244.0.1-3 and fd00:244::1-3, all on the router):
/// TCP `10.96.0.10:80`, UDP `10.96.0.10:53`, TCP `[fd00:96::10]:443`.
pub mod testbed {
    use super::*;
    use crate::engine::EngineConfig;
    use crate::policy::PolicyKind;
    use crate::service::{BackendSpec, Conditions, Frontend, ServiceSpec};
    use crate::Protocol;
    use std::net::SocketAddr;

    pub const LB_MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 1]);
    pub const ROUTER_MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 0xfe]);
    pub const VIP4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
    pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);

    /// A service `name` on `vip:port/proto` with Maglev over `backends` (same port).
    pub fn service(
        name: &str,
        vip: IpAddr,
        port: u16,
        proto: Protocol,
        backends: &[IpAddr],
    ) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            frontends: vec![Frontend { addr: vip, port, proto }],
            backends: backends
                .iter()
                .map(|&ip| BackendSpec {
                    addr: SocketAddr::new(ip, port),
                    weight: 1,
                    conditions: Conditions::READY,
                    local: false,
                })
                .collect(),
            policy: Some(PolicyKind::Maglev),
            affinity_timeout: None,
            hash_key: None,
            short_circuit: None,
        }
    }

    pub fn backends4(n: u8) -> Vec<IpAddr> {
        (1..=n).map(|i| IpAddr::V4(Ipv4Addr::new(10, 244, 0, i))).collect()
    }

    pub fn backends6(n: u16) -> Vec<IpAddr> {
        (1..=n).map(|i| IpAddr::V6(Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, i))).collect()
    }

    pub fn engine(seed: u64) -> Arc<Engine> {
        let mut cfg = EngineConfig::default();
        cfg.table.maglev.seed = seed;
        let e = Engine::new(cfg).expect("engine");
        for s in [
            service("default/web:http", VIP4.into(), 80, Protocol::Tcp, &backends4(3)),
            service("default/dns:dns", VIP4.into(), 53, Protocol::Udp, &backends4(3)),
            service("default/web6:https", VIP6.into(), 443, Protocol::Tcp, &backends6(3)),
        ] {
            e.upsert_service(&s).expect("service");
        }
        Arc::new(e)
    }

    pub fn config() -> LbConfig {
        let mut c = LbConfig::new(LB_MAC, 1500);
        c.ipv4 = Some(Ipv4Addr::new(192, 0, 2, 1));
        c.ipv6 = Some(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1));
        c.vips = [IpAddr::V4(VIP4), IpAddr::V6(VIP6)].into_iter().collect();
        c.neighbours = Neighbours::new(Some(ROUTER_MAC));
        c
    }

    pub fn forwarder() -> Forwarder {
        Forwarder::new(engine(7), Arc::new(config()))
    }

    /// Frames of every kind the load balancer answers: seeds for the fuzz drivers.
    pub fn sample_frames() -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for p in crate::wire::build::sample_packets() {
            out.push(frame(&p));
            // The same packet to the service of its family and protocol, where there is one.
            let mut to_vip = p.clone();
            let vip = match wire::parse(&p).map(|i| (i.key.dst.is_ipv4(), i.key.proto)) {
                Ok((true, Protocol::Tcp)) => Some((IpAddr::V4(VIP4), 80)),
                Ok((true, Protocol::Udp)) => Some((IpAddr::V4(VIP4), 53)),
                Ok((false, Protocol::Tcp)) => Some((IpAddr::V6(VIP6), 443)),
                _ => None,
            };
            if let Some((addr, port)) = vip {
                if wire::rewrite_dst(&mut to_vip, addr, port).is_ok() {
                    out.push(frame(&to_vip));
                }
            }
        }
        let asker = MacAddr([2, 0, 0, 0, 0, 0x42]);
        let mut arp = vec![0u8; 42];
        let _ = ethernet::emit_header(&mut arp, MacAddr::BROADCAST, asker, ethertype::ARP);
        let req = ArpRepr {
            operation: arp::op::REQUEST,
            sender_hw: asker,
            sender_ip: Ipv4Addr::new(192, 0, 2, 254),
            target_hw: MacAddr::default(),
            target_ip: VIP4,
        };
        let _ = req.emit(&mut arp[14..]);
        out.push(arp);
        let asker6 = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0xfe);
        let group = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 1, 0xff00, 0x10);
        let mut ns = vec![0u8; 14 + 40 + 32];
        let _ =
            ethernet::emit_header(&mut ns, MacAddr::ipv6_multicast(&group), asker, ethertype::IPV6);
        let ip = Ipv6Repr {
            src_addr: asker6,
            dst_addr: group,
            next_header: icmp::PROTO_ICMPV6,
            payload_len: 32,
            hop_limit: 255,
            traffic_class: 0,
            flow_label: 0,
        };
        let _ = ip.emit(&mut ns[14..]);
        let _ = icmp::emit_neighbor_advert(&mut ns[54..], &asker6, &group, &VIP6, asker);
        ns[54] = icmp::ICMPV6_NEIGHBOR_SOLICIT; // the same layout up to the option type
        out.push(ns);
        out
    }

    /// `ip` in an Ethernet frame from the router to the load balancer.
    pub fn frame(ip: &[u8]) -> Vec<u8> {
        let ethertype =
            if ip.first().is_some_and(|b| b >> 4 == 6) { ethertype::IPV6 } else { ethertype::IPV4 };
        let mut f = vec![0u8; ethernet::HEADER_LEN];
        let _ = ethernet::emit_header(&mut f, LB_MAC, ROUTER_MAC, ethertype);
        f.extend_from_slice(ip);
        f
    }
}

#[cfg(test)]
#[path = "forward_tests.rs"]
mod tests;
