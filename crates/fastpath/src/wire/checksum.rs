//! The Internet checksum (RFC 1071) with incremental updates (RFC 1624), CRC32c for SCTP
//! (RFC 9260 appendix A), and whole-packet verify/fill built on the views.

use super::{
    l4_bytes, parse_l3, sub, Fragment, FragmentKey, IpVersion, L3Info, SctpPacket, TcpPacket,
    UdpPacket, WireError,
};
use crate::flow::Protocol;

/// Adds with end-around carry. Since 2^64 ≡ 1 (mod 0xffff), the carry folds back in exactly,
/// so the sum never overflows and never loses information, whatever the input length.
#[inline(always)]
fn add(a: u64, b: u64) -> u64 {
    let (s, carry) = a.overflowing_add(b);
    s + u64::from(carry)
}

/// The one's-complement sum of `data` as big-endian 16-bit words (odd tail zero-padded), not
/// yet folded. Summing 32-bit words is equivalent because 2^16 ≡ 1 (mod 0xffff).
pub fn sum(data: &[u8]) -> u64 {
    let mut acc = 0u64;
    let mut words = data.chunks_exact(4);
    for w in &mut words {
        acc = add(acc, u64::from(u32::from_be_bytes([w[0], w[1], w[2], w[3]])));
    }
    let mut tail = [0u8; 4];
    let rest = words.remainder();
    tail[..rest.len()].copy_from_slice(rest);
    add(acc, u64::from(u32::from_be_bytes(tail)))
}

/// Folds a sum to 16 bits. Returns 0 only for an all-zero input, else a value in 1..=0xffff.
#[inline]
pub fn fold(mut s: u64) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// The checksum to store for `data` (itself already excluding the checksum field).
pub fn internet_checksum(data: &[u8]) -> u16 {
    !fold(sum(data))
}

/// Sum of `data` without the 2-byte checksum field at the even offset `at`, so a packet's
/// checksum can be computed without first zeroing (and so copying or mutating) the field.
fn sum_skipping(data: &[u8], at: usize) -> u64 {
    add(sum(data.get(..at).unwrap_or(data)), sum(data.get(at + 2..).unwrap_or(&[])))
}

/// The IPv4 header checksum of `header` (IHL*4 bytes), ignoring the value now in the field.
pub fn ipv4_header_checksum(header: &[u8]) -> u16 {
    !fold(sum_skipping(header, 10))
}

/// Sum of the TCP/UDP pseudo-header. IPv4's (RFC 793) and IPv6's (RFC 8200 §8.1) have the same
/// one's-complement sum: addresses, protocol and upper-layer length.
pub fn pseudo_header_sum(src: &[u8], dst: &[u8], proto: u8, len: usize) -> u64 {
    let len = len as u64; // usize -> u64 never truncates on supported targets
    add(add(add(sum(src), sum(dst)), u64::from(proto)), len)
}

/// The TCP or UDP checksum to store for `segment` (the whole L4 header + data), given the raw
/// source and destination address bytes (4 or 16 each). UDP's computed 0 goes out as 0xffff,
/// since 0 means "no checksum" (RFC 768).
pub fn tcp_udp_checksum(src: &[u8], dst: &[u8], proto: Protocol, segment: &[u8]) -> u16 {
    let at = if proto == Protocol::Udp { 6 } else { 16 };
    let s =
        add(pseudo_header_sum(src, dst, proto.number(), segment.len()), sum_skipping(segment, at));
    let c = !fold(s);
    if proto == Protocol::Udp && c == 0 {
        0xffff
    } else {
        c
    }
}

/// Accumulates RFC 1624 eqn. 3 terms (~m + m') for every changed 16-bit word, so several
/// field changes fold into one checksum update.
#[derive(Clone, Copy, Debug, Default)]
pub struct Delta(u64);

impl Delta {
    /// Records the change of a field from `old` to `new` (same even length, at an even offset).
    pub fn change(&mut self, old: &[u8], new: &[u8]) {
        for (o, n) in old.chunks_exact(2).zip(new.chunks_exact(2)) {
            let o = u16::from_be_bytes([o[0], o[1]]);
            let n = u16::from_be_bytes([n[0], n[1]]);
            self.0 = add(self.0, u64::from(!o) + u64::from(n));
        }
    }

    /// HC' = ~(~HC + sum(~m + m')). A correct checksum stays correct and a wrong one stays
    /// exactly as wrong, so NAT never launders a corrupted packet.
    pub fn apply(self, check: u16) -> u16 {
        !fold(add(u64::from(!check), self.0))
    }
}

/// Castagnoli polynomial, bit-reflected.
const CRC32C_POLY: u32 = 0x82f6_3b78;

const fn crc32c_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ CRC32C_POLY } else { c >> 1 };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

static CRC32C_TABLE: [u32; 256] = crc32c_table();

/// Feeds `data` into a raw CRC32c register (no init or final inversion).
#[inline]
pub fn crc32c_update(mut reg: u32, data: &[u8]) -> u32 {
    for &b in data {
        reg = CRC32C_TABLE[((reg ^ u32::from(b)) & 0xff) as usize] ^ (reg >> 8);
    }
    reg
}

/// CRC32c (iSCSI / SCTP): `crc32c(b"123456789") == 0xe306_9283`.
pub fn crc32c(data: &[u8]) -> u32 {
    !crc32c_update(!0, data)
}

/// The SCTP checksum of a whole SCTP packet, computed with the checksum field as zero. SCTP
/// stores it least-significant byte first (what Linux's `cpu_to_le32` produces), so write it
/// with `to_le_bytes`.
pub fn sctp_checksum(packet: &[u8]) -> u32 {
    let reg = crc32c_update(!0, packet.get(..8).unwrap_or(packet));
    let reg = crc32c_update(reg, &[0; 4]);
    !crc32c_update(reg, packet.get(12..).unwrap_or(&[]))
}

/// Where the L4 checksum of a well-formed packet lives and what it should be.
enum L4Sum {
    /// TCP or UDP: offset of the 16-bit field within the buffer, value to store, value stored.
    Inet {
        at: usize,
        want: u16,
        have: u16,
        udp: bool,
    },
    Sctp {
        at: usize,
        want: u32,
        have: u32,
    },
}

/// Computes the L4 checksum from scratch over the L4 bytes in `buf`, or `None` when a
/// fragment makes that meaningless (its checksum covers other packets too) and `partial` is
/// false. Errors for a later fragment when `partial` (there is no L4 header) and for
/// protocols we do not know.
fn l4_sum(buf: &[u8], l3: &L3Info, partial: bool) -> Result<Option<L4Sum>, WireError> {
    let proto = Protocol::from_number(l3.proto).ok_or(WireError::UnsupportedProtocol(l3.proto))?;
    let first = match l3.fragment {
        Fragment::NotFragment => false,
        _ if !partial => return Ok(None),
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
    let l4 = l4_bytes(buf, l3);
    let (src, dst) = match l3.version {
        IpVersion::V4 => (sub(buf, 12, 16), sub(buf, 16, 20)),
        IpVersion::V6 => (sub(buf, 8, 24), sub(buf, 24, 40)),
    };
    Ok(Some(match proto {
        Protocol::Tcp => {
            let t = TcpPacket::new_checked(l4)?;
            L4Sum::Inet {
                at: l3.l3_len + 16,
                want: tcp_udp_checksum(src, dst, proto, l4),
                have: t.checksum(),
                udp: false,
            }
        }
        Protocol::Udp => {
            let u = if first {
                UdpPacket::new_checked_header(l4)?
            } else {
                UdpPacket::new_checked(l4)?
            };
            let segment = l4.get(..u.len()).unwrap_or(l4);
            L4Sum::Inet {
                at: l3.l3_len + 6,
                want: tcp_udp_checksum(src, dst, proto, segment),
                have: u.checksum(),
                udp: true,
            }
        }
        Protocol::Sctp => {
            let s = SctpPacket::new_checked(l4)?;
            L4Sum::Sctp { at: l3.l3_len + 8, want: sctp_checksum(l4), have: s.checksum() }
        }
    }))
}

/// Only malformed L4 headers are errors when verifying or filling: other protocols and
/// fragments just have nothing to check.
fn l4_sum_whole(buf: &[u8], l3: &L3Info) -> Result<Option<L4Sum>, WireError> {
    match l4_sum(buf, l3, false) {
        Err(WireError::UnsupportedProtocol(_)) => Ok(None),
        other => other,
    }
}

/// Whether every checksum we can check is right: the IPv4 header checksum, and the TCP/UDP
/// (with pseudo-header) or SCTP checksum of an unfragmented packet. Fragments and other
/// protocols have only their IPv4 header checked. An IPv4 UDP checksum of 0 ("none") passes;
/// over IPv6 it is mandatory (RFC 8200 §8.1), so 0 fails. `Err` for a malformed packet.
pub fn verify_checksums(buf: &[u8]) -> Result<bool, WireError> {
    let l3 = parse_l3(buf)?;
    let ip_ok = l3.version == IpVersion::V6
        || ipv4_header_checksum(sub(buf, 0, l3.l3_len)) == super::get16(buf, 10);
    let l4_ok = match l4_sum_whole(buf, &l3)? {
        None => true,
        Some(L4Sum::Inet { have: 0, udp: true, .. }) => l3.version == IpVersion::V4,
        Some(L4Sum::Inet { want, have, .. }) => want == have,
        Some(L4Sum::Sctp { want, have, .. }) => want == have,
    };
    Ok(ip_ok && l4_ok)
}

/// Computes and writes every checksum from scratch (the checks [`verify_checksums`] makes).
/// Unlike a rewrite, this overwrites an IPv4 UDP checksum of 0 with a real one.
pub fn fill_checksums(buf: &mut [u8]) -> Result<(), WireError> {
    let l3 = parse_l3(buf)?;
    if l3.version == IpVersion::V4 {
        let c = ipv4_header_checksum(sub(buf, 0, l3.l3_len));
        super::put16(buf, 10, c);
    }
    match l4_sum_whole(buf, &l3)? {
        Some(L4Sum::Inet { at, want, .. }) => super::put16(buf, at, want),
        Some(L4Sum::Sctp { at, want, .. }) => super::put_bytes(buf, at, &want.to_le_bytes()),
        None => {}
    }
    Ok(())
}

/// The L4 checksum a TCP/UDP/SCTP packet should carry, computed from scratch (TCP/UDP
/// zero-extended to u32; SCTP's CRC32c as a number, stored little-endian). For a first
/// fragment it covers only the bytes present, as if the datagram ended there.
pub fn l4_checksum(buf: &[u8]) -> Result<u32, WireError> {
    let l3 = parse_l3(buf)?;
    match l4_sum(buf, &l3, true)? {
        Some(L4Sum::Inet { want, .. }) => Ok(u32::from(want)),
        Some(L4Sum::Sctp { want, .. }) => Ok(want),
        None => Err(WireError::Truncated), // unreachable: `partial` never yields None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(b""), 0);
        // RFC 3720 B.4: 32 bytes of zeros.
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62a8_ab43);
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 §3: words 0001 f203 f4f5 f6f7 sum to ddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum(&data)), 0xddf2);
        assert_eq!(internet_checksum(&data), !0xddf2);
        // Odd length pads with a zero byte.
        assert_eq!(fold(sum(&[0x12, 0x34, 0x56])), 0x6834);
    }

    #[test]
    fn ipv4_header_example() {
        // A classic example header with checksum 0xb861.
        let h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(ipv4_header_checksum(&h), 0xb861);
    }

    #[test]
    fn incremental_matches_scratch() {
        let mut data = [0u8; 40];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(37).wrapping_add(11);
        }
        let before = internet_checksum(&data);
        let old: [u8; 4] = data[8..12].try_into().unwrap();
        let new = [0xff, 0xff, 0x00, 0x01];
        data[8..12].copy_from_slice(&new);
        let mut d = Delta::default();
        d.change(&old, &new);
        assert_eq!(d.apply(before), internet_checksum(&data));
    }

    #[test]
    fn sum_never_overflows() {
        // Carries fold back in: a long run of 0xff words sums to 0xffff (negative zero).
        assert_eq!(fold(sum(&[0xff; 4096])), 0xffff);
        assert_eq!(fold(u64::MAX), 0xffff);
        assert_eq!(fold(0), 0);
    }
}
