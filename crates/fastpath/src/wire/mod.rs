//! Zero-copy, bounds-checked packet views (in the style of smoltcp's `wire`), the one-call
//! [`parse`] the datapath runs on every packet, checksum verification and in-place NAT.
//!
//! Every function here takes attacker-controlled bytes: nothing indexes without a check and
//! nothing overflows, so no input can panic (the fuzz target and property tests hold us to it).
//! Buffers start at the IP header (no link layer) and may carry trailing bytes past the length
//! the IP header declares; like the kernel, we trust the declared length and ignore the rest.
//!
//! Checksums are assumed complete (not the pseudo-header-only `CHECKSUM_PARTIAL` form an
//! offloading NIC driver may hand over).
//!
//! # Example
//!
//! A TCP SYN from 10.0.0.1:40000 to 10.96.0.10:80, read through the views, then summarised
//! by [`parse`] into what the engine decides on:
//!
//! ```
//! use std::net::Ipv4Addr;
//! use fastpath::wire::{self, Ipv4Packet, TcpPacket};
//! use fastpath::{FlowKey, Protocol};
//!
//! let bytes = [
//!     0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, 6, 0, 0, // IPv4, 40 bytes, DF, TTL 64, TCP
//!     10, 0, 0, 1, 10, 96, 0, 10, // source, destination
//!     0x9c, 0x40, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, // ports 40000 -> 80, seq 1, ack 0
//!     0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0, // 20-byte header, SYN, window
//! ];
//! let ip = Ipv4Packet::new_checked(&bytes[..]).unwrap();
//! assert_eq!((ip.src_addr(), ip.dst_addr()), (Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 96, 0, 10)));
//! assert_eq!((ip.header_len(), ip.protocol()), (20, 6));
//! let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
//! assert_eq!((tcp.src_port(), tcp.dst_port()), (40000, 80));
//! assert!(tcp.flags().syn() && !tcp.flags().ack());
//!
//! let info = wire::parse(&bytes).unwrap();
//! let key = FlowKey::new(Protocol::Tcp, [10, 0, 0, 1].into(), 40000, [10, 96, 0, 10].into(), 80);
//! assert_eq!(info.key, key);
//! assert_eq!(info.tcp_flags, Some(tcp.flags()));
//! assert_eq!(info.l4_offset, 20);
//! // Cut short, the same bytes are a typed error, never a panic.
//! assert!(wire::parse(&bytes[..30]).is_err());
//! ```

pub mod arp;
pub mod build;
pub mod checksum;
pub mod ethernet;
pub mod icmp;
pub mod ipv4;
pub mod ipv6;
mod nat;
pub mod sctp;
pub mod tcp;
pub mod udp;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::flow::{FlowKey, Protocol, TcpFlags};

pub use arp::{ArpPacket, ArpRepr};
pub use build::{ExtHeader, PacketBuilder};
pub use checksum::{
    crc32c, fill_checksums, ipv4_header_checksum, l4_checksum, sctp_checksum, tcp_udp_checksum,
    verify_checksums,
};
pub use ethernet::{EthernetFrame, MacAddr};
pub use ipv4::{Ipv4Packet, Ipv4Repr};
pub use ipv6::{Ipv6Packet, Ipv6Repr, Ipv6Upper, MAX_EXT_HEADERS};
pub use nat::{rewrite, rewrite_dst, rewrite_src};
pub use sctp::SctpPacket;
pub use tcp::TcpPacket;
pub use udp::UdpPacket;

/// Why a packet could not be parsed or rewritten. Each variant maps to a short, fixed
/// [`as_str`](WireError::as_str) label so the datapath can count drops/passes per reason
/// without formatting strings on the hot path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WireError {
    /// The buffer ends before a header does, or before the length the IP header declares.
    Truncated,
    /// The IP version nibble is neither 4 nor 6 (or not the one the view expects).
    BadVersion,
    /// IPv4 IHL below 5 words.
    BadIhl,
    /// IPv4 total length shorter than its own header.
    BadTotalLength,
    /// An IPv6 extension header breaks the rules (hop-by-hop not first, two fragment headers).
    BadExtHeader,
    /// More than [`MAX_EXT_HEADERS`] IPv6 extension headers: a chain that long is a crafted
    /// packet meant to burn cycles, so we stop walking instead of following it.
    ExtHeaderLoop,
    /// An IPv6 routing header with segments left: we are not the final destination, and the
    /// L4 pseudo-header would use an address the IPv6 header does not show.
    RoutingHeader,
    /// TCP data offset below 5 words or past the end of the segment.
    BadTcpOffset,
    /// UDP length below 8 or past the end of the IP payload.
    BadUdpLength,
    /// Not TCP, UDP or SCTP (ICMP, ESP, IPv6 no-next-header, ...): the datapath passes these.
    UnsupportedProtocol(u8),
    /// A fragment other than the first: it carries no L4 header, so it has no ports. The key
    /// lets a datapath map it to the ports it saw in the first fragment.
    NonFirstFragment(FragmentKey),
    /// A rewrite asked for an IPv4 address on an IPv6 packet or the reverse.
    AddressFamilyMismatch,
    /// A port rewrite on the first fragment of an SCTP packet: its CRC32c covers bytes in later
    /// fragments, so it cannot be recomputed here.
    FragmentedSctp,
}

impl WireError {
    /// A short snake_case reason, stable enough for a metric label.
    pub const fn as_str(&self) -> &'static str {
        match self {
            WireError::Truncated => "truncated",
            WireError::BadVersion => "bad_version",
            WireError::BadIhl => "bad_ihl",
            WireError::BadTotalLength => "bad_total_length",
            WireError::BadExtHeader => "bad_ext_header",
            WireError::ExtHeaderLoop => "ext_header_loop",
            WireError::RoutingHeader => "routing_header",
            WireError::BadTcpOffset => "bad_tcp_offset",
            WireError::BadUdpLength => "bad_udp_length",
            WireError::UnsupportedProtocol(_) => "unsupported_protocol",
            WireError::NonFirstFragment(_) => "non_first_fragment",
            WireError::AddressFamilyMismatch => "address_family_mismatch",
            WireError::FragmentedSctp => "fragmented_sctp",
        }
    }
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::UnsupportedProtocol(p) => write!(f, "unsupported_protocol ({p})"),
            WireError::NonFirstFragment(k) => {
                write!(f, "non_first_fragment ({} {} -> {} id {})", k.proto, k.src, k.dst, k.id)
            }
            other => f.write_str(other.as_str()),
        }
    }
}

impl std::error::Error for WireError {}

/// Identifies the datagram a non-first fragment belongs to (RFC 791 / RFC 8200 reassembly key).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragmentKey {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: Protocol,
    /// IPv4 identification (zero-extended) or IPv6 fragment identification.
    pub id: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IpVersion {
    V4 = 4,
    V6 = 6,
}

/// Where a packet sits in a fragmented datagram. An IPv6 "atomic fragment" (fragment header
/// with offset 0 and no more fragments, RFC 6946) is whole, so it is `NotFragment`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fragment {
    NotFragment,
    /// Offset 0 with more to come: the L4 header (and ports) are here, the L4 checksum covers
    /// the whole datagram.
    FirstFragment {
        id: u32,
    },
    /// Offset > 0: no L4 header. [`parse`] reports these as [`WireError::NonFirstFragment`];
    /// only [`parse_l3`] returns this variant.
    LaterFragment {
        id: u32,
    },
}

/// The network layer of a packet, before the transport header is looked at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L3Info {
    pub version: IpVersion,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IPv4 protocol, or the IPv6 next header after the extension headers we walk (for a
    /// later IPv6 fragment: the fragment header's next header).
    pub proto: u8,
    /// Header bytes before the transport header (IPv4 options and IPv6 extension headers
    /// included). Buffers start at the IP header, so this is also the L4 offset.
    pub l3_len: usize,
    /// Length the IP header declares (IPv6: 40 + payload length); never exceeds the buffer.
    pub total_len: usize,
    pub fragment: Fragment,
}

/// What the datapath needs from a TCP/UDP/SCTP packet, without copying it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PacketInfo {
    pub version: IpVersion,
    /// In the packet's own direction: `src` is the packet's source.
    pub key: FlowKey,
    /// `Some` exactly for TCP.
    pub tcp_flags: Option<TcpFlags>,
    /// `NotFragment` or `FirstFragment`; later fragments are an error (see [`WireError`]).
    pub fragment: Fragment,
    pub l3_len: usize,
    /// Offset of the transport header in the buffer (equal to `l3_len`; kept separate so
    /// callers say which one they mean).
    pub l4_offset: usize,
    /// Length the IP header declares; bytes past it in the buffer are not part of the packet.
    pub total_len: usize,
}

/// Parses the IP header (and IPv6 extension headers) up to the transport header. Does not look
/// at the transport header, so it also serves later fragments and unsupported protocols.
#[inline]
pub fn parse_l3(buf: &[u8]) -> Result<L3Info, WireError> {
    match buf.first().map(|b| b >> 4) {
        Some(4) => {
            let ip = Ipv4Packet::new_checked(buf)?;
            Ok(L3Info {
                version: IpVersion::V4,
                src: IpAddr::V4(ip.src_addr()),
                dst: IpAddr::V4(ip.dst_addr()),
                proto: ip.protocol(),
                l3_len: ip.header_len(),
                total_len: ip.total_len(),
                fragment: ip.fragment(),
            })
        }
        Some(6) => {
            let ip = Ipv6Packet::new_checked(buf)?;
            let upper = ip.upper_layer()?;
            Ok(L3Info {
                version: IpVersion::V6,
                src: IpAddr::V6(ip.src_addr()),
                dst: IpAddr::V6(ip.dst_addr()),
                proto: upper.proto,
                l3_len: upper.offset,
                total_len: ip.total_len(),
                fragment: upper.fragment,
            })
        }
        Some(_) => Err(WireError::BadVersion),
        None => Err(WireError::Truncated),
    }
}

/// The transport bytes of a packet `parse_l3` accepted: from the L4 offset to the declared end.
fn l4_bytes<'a>(buf: &'a [u8], l3: &L3Info) -> &'a [u8] {
    buf.get(l3.l3_len..l3.total_len).unwrap_or(&[])
}

/// Ports and flags of a TCP/UDP/SCTP header; validates it the same way for every caller
/// (parse, verify, rewrite) so they agree on which packets are well formed.
#[inline]
fn l4_header(
    proto: Protocol,
    l4: &[u8],
    first_fragment: bool,
) -> Result<(u16, u16, Option<TcpFlags>), WireError> {
    match proto {
        Protocol::Tcp => {
            let t = TcpPacket::new_checked(l4)?;
            Ok((t.src_port(), t.dst_port(), Some(t.flags())))
        }
        Protocol::Udp => {
            // A first fragment's UDP length counts bytes still in later fragments.
            let u = if first_fragment {
                UdpPacket::new_checked_header(l4)?
            } else {
                UdpPacket::new_checked(l4)?
            };
            Ok((u.src_port(), u.dst_port(), None))
        }
        Protocol::Sctp => {
            let s = SctpPacket::new_checked(l4)?;
            Ok((s.src_port(), s.dst_port(), None))
        }
    }
}

/// The per-packet parse: flow key, TCP flags, fragment state and offsets. No allocation and no
/// copies beyond the addresses themselves.
#[inline]
pub fn parse(buf: &[u8]) -> Result<PacketInfo, WireError> {
    let l3 = parse_l3(buf)?;
    let proto = Protocol::from_number(l3.proto).ok_or(WireError::UnsupportedProtocol(l3.proto))?;
    let first = match l3.fragment {
        Fragment::NotFragment => false,
        Fragment::FirstFragment { .. } => true,
        Fragment::LaterFragment { id } => {
            return Err(WireError::NonFirstFragment(FragmentKey {
                src: l3.src,
                dst: l3.dst,
                proto,
                id,
            }))
        }
    };
    let (src_port, dst_port, tcp_flags) = l4_header(proto, l4_bytes(buf, &l3), first)?;
    Ok(PacketInfo {
        version: l3.version,
        key: FlowKey { src: l3.src, dst: l3.dst, src_port, dst_port, proto },
        tcp_flags,
        fragment: l3.fragment,
        l3_len: l3.l3_len,
        l4_offset: l3.l3_len,
        total_len: l3.total_len,
    })
}

/// The body of the fuzz target, public so a stable-toolchain driver (see
/// `tests/wire_props.rs`) can run the very same checks. Besides "no panic" it asserts the
/// invariants that tie parse, verify and rewrite together; a violation panics on purpose.
pub fn fuzz_one(data: &[u8]) {
    let parsed = parse(data);
    let l3 = parse_l3(data);
    let verified = verify_checksums(data);
    if let Ok(l3) = &l3 {
        assert!(l3.l3_len <= l3.total_len && l3.total_len <= data.len());
    }
    if let Ok(info) = &parsed {
        let l3 = l3.expect("parse accepted what parse_l3 rejected");
        assert_eq!(
            (info.l3_len, info.l4_offset, info.total_len),
            (l3.l3_len, l3.l3_len, l3.total_len)
        );
        assert_eq!((info.key.src, info.key.dst, info.fragment), (l3.src, l3.dst, l3.fragment));
        assert!(!matches!(info.fragment, Fragment::LaterFragment { .. }));
        assert_eq!(info.tcp_flags.is_some(), info.key.proto == Protocol::Tcp);
        assert!(verified.is_ok());
    }

    // New endpoints drawn from the input itself, so both families and ports vary.
    let seed = data.iter().fold(0x9e37_79b9_u32, |h, &b| h.rotate_left(5) ^ u32::from(b));
    let port = (seed >> 8) as u16;
    let v4 = IpAddr::V4(Ipv4Addr::from(seed));
    let v6 = IpAddr::V6(Ipv6Addr::from(u128::from(seed) | 0xfd00 << 112));
    let (same, other) = match l3.map(|l| l.version) {
        Ok(IpVersion::V6) => (v6, v4),
        _ => (v4, v6),
    };
    // Exactly the packets parse accepts, plus later fragments, can be rewritten.
    let rewritable =
        matches!((&parsed, &l3), (Ok(_), _) | (Err(WireError::NonFirstFragment(_)), Ok(_)));

    let mut copy = data.to_vec();
    match rewrite_dst(&mut copy, same, port) {
        Ok(()) => {
            assert!(rewritable);
            match (&parsed, parse(&copy)) {
                (Ok(before), Ok(after)) => {
                    assert_eq!((after.key.dst, after.key.dst_port), (same, port));
                    assert_eq!(
                        (after.key.src, after.key.src_port),
                        (before.key.src, before.key.src_port)
                    );
                }
                (Err(WireError::NonFirstFragment(_)), Err(WireError::NonFirstFragment(k))) => {
                    assert_eq!(k.dst, same)
                }
                (before, after) => panic!("rewrite_dst changed the parse: {before:?} -> {after:?}"),
            }
            if verified == Ok(true) {
                assert_eq!(verify_checksums(&copy), Ok(true), "rewrite_dst broke a valid checksum");
            }
        }
        Err(e) => {
            assert!(!rewritable || e == WireError::FragmentedSctp, "{e:?}");
            assert_eq!(copy, data, "a failed rewrite changed the packet");
        }
    }

    if rewrite_src(&mut copy, same, port.wrapping_add(1)).is_ok() && verified == Ok(true) {
        assert_eq!(verify_checksums(&copy), Ok(true), "rewrite_src broke a valid checksum");
    }

    let before = copy.clone();
    let r =
        rewrite(&mut copy, Some(SocketAddr::new(other, port)), Some(SocketAddr::new(same, port)));
    assert!(r.is_err(), "a mixed-family rewrite must fail");
    assert_eq!(copy, before);
}

/// Reads that return 0 instead of panicking when out of range. Views only read where their
/// checked constructor proved the bytes exist, so the fallback is unreachable in practice; it
/// keeps "no input may panic" true even for a pathological `AsRef` impl.
#[inline(always)]
pub(crate) fn get8(b: &[u8], off: usize) -> u8 {
    b.get(off).copied().unwrap_or(0)
}

#[inline(always)]
pub(crate) fn get16(b: &[u8], off: usize) -> u16 {
    match b.get(off..).and_then(|s| s.get(..2)) {
        Some(&[x, y]) => u16::from_be_bytes([x, y]),
        _ => 0,
    }
}

#[inline(always)]
pub(crate) fn get32(b: &[u8], off: usize) -> u32 {
    match b.get(off..).and_then(|s| s.get(..4)) {
        Some(&[a, c, d, e]) => u32::from_be_bytes([a, c, d, e]),
        _ => 0,
    }
}

#[inline(always)]
pub(crate) fn get_array<const N: usize>(b: &[u8], off: usize) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some(s) = b.get(off..).and_then(|s| s.get(..N)) {
        out.copy_from_slice(s);
    }
    out
}

#[inline(always)]
pub(crate) fn put_bytes(b: &mut [u8], off: usize, v: &[u8]) {
    if let Some(s) = b.get_mut(off..).and_then(|s| s.get_mut(..v.len())) {
        s.copy_from_slice(v);
    }
}

#[inline(always)]
pub(crate) fn put16(b: &mut [u8], off: usize, v: u16) {
    put_bytes(b, off, &v.to_be_bytes());
}

/// `b[start..end]`, or empty when the range is not inside `b`.
#[inline(always)]
pub(crate) fn sub(b: &[u8], start: usize, end: usize) -> &[u8] {
    b.get(start..end).unwrap_or(&[])
}

#[inline(always)]
pub(crate) fn sub_mut(b: &mut [u8], start: usize, end: usize) -> &mut [u8] {
    b.get_mut(start..end).unwrap_or(&mut [])
}

#[cfg(test)]
mod tests;
