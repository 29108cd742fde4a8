//! The few ICMP and ICMPv6 messages a load balancer sends or answers: "fragmentation
//! needed" (RFC 792/1191), "packet too big" (RFC 4443 §3.2), and IPv6 neighbour
//! solicitation/advertisement (RFC 4861 §4.3-4.4). Writers take the quoted or target bytes
//! and return how many bytes they wrote; readers check before they look.

use std::net::Ipv6Addr;

use super::checksum::{fold, pseudo_header_sum, sum};
use super::ethernet::MacAddr;
use super::{get8, get_array, put16, put_bytes, WireError};

/// IPv4 protocol / IPv6 next header numbers.
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;

pub const ICMP_DEST_UNREACHABLE: u8 = 3;
pub const ICMP_CODE_FRAG_NEEDED: u8 = 4;
pub const ICMPV6_PACKET_TOO_BIG: u8 = 2;
pub const ICMPV6_NEIGHBOR_SOLICIT: u8 = 135;
pub const ICMPV6_NEIGHBOR_ADVERT: u8 = 136;

/// ICMP header before the quoted packet (type, code, checksum, 4 bytes of rest-of-header).
pub const HEADER_LEN: usize = 8;
/// A neighbour advertisement with one target link-layer address option.
pub const NEIGHBOR_ADVERT_LEN: usize = 32;
/// The least an IPv6 link carries (RFC 8200 §5): an ICMPv6 error must fit in it.
pub const IPV6_MIN_MTU: usize = 1280;

/// Writes ICMP "destination unreachable, fragmentation needed and DF set" (type 3 code 4)
/// with `next_hop_mtu` (RFC 1191) and the quoted bytes of the original datagram into `buf`.
pub fn emit_frag_needed(
    buf: &mut [u8],
    next_hop_mtu: u16,
    quoted: &[u8],
) -> Result<usize, WireError> {
    let len = HEADER_LEN + quoted.len();
    let b = buf.get_mut(..len).ok_or(WireError::Truncated)?;
    b[..HEADER_LEN].copy_from_slice(&[
        ICMP_DEST_UNREACHABLE,
        ICMP_CODE_FRAG_NEEDED,
        0,
        0,
        0,
        0,
        0,
        0,
    ]);
    put16(b, 6, next_hop_mtu);
    b[HEADER_LEN..].copy_from_slice(quoted);
    let c = !fold(sum(b));
    put16(b, 2, c);
    Ok(len)
}

/// The ICMPv6 checksum of `msg` (checksum field zero) between `src` and `dst`.
fn icmpv6_checksum(src: &Ipv6Addr, dst: &Ipv6Addr, msg: &[u8]) -> u16 {
    let s = pseudo_header_sum(&src.octets(), &dst.octets(), PROTO_ICMPV6, msg.len());
    !fold(s + sum(msg))
}

/// Writes ICMPv6 "packet too big" with `mtu` and the quoted original packet into `buf`;
/// `src`/`dst` are the addresses of the IPv6 header that will carry it (checksum).
pub fn emit_packet_too_big(
    buf: &mut [u8],
    src: &Ipv6Addr,
    dst: &Ipv6Addr,
    mtu: u32,
    quoted: &[u8],
) -> Result<usize, WireError> {
    let len = HEADER_LEN + quoted.len();
    let b = buf.get_mut(..len).ok_or(WireError::Truncated)?;
    b[..4].copy_from_slice(&[ICMPV6_PACKET_TOO_BIG, 0, 0, 0]);
    put_bytes(b, 4, &mtu.to_be_bytes());
    b[HEADER_LEN..].copy_from_slice(quoted);
    let c = icmpv6_checksum(src, dst, b);
    put16(b, 2, c);
    Ok(len)
}

/// The target of an ICMPv6 neighbour solicitation (`msg` is the ICMPv6 message), or `None`
/// for any other message. The checksum is not verified: a wrong one costs one extra
/// advertisement, which the soliciting host checks anyway.
pub fn neighbor_solicitation_target(msg: &[u8]) -> Option<Ipv6Addr> {
    if msg.len() < 24 || get8(msg, 0) != ICMPV6_NEIGHBOR_SOLICIT || get8(msg, 1) != 0 {
        return None;
    }
    Some(Ipv6Addr::from(get_array::<16>(msg, 8)))
}

/// Writes a solicited neighbour advertisement (solicited and override flags) for `target`
/// at `mac`, with the target link-layer address option, into `buf`.
pub fn emit_neighbor_advert(
    buf: &mut [u8],
    src: &Ipv6Addr,
    dst: &Ipv6Addr,
    target: &Ipv6Addr,
    mac: MacAddr,
) -> Result<usize, WireError> {
    let b = buf.get_mut(..NEIGHBOR_ADVERT_LEN).ok_or(WireError::Truncated)?;
    b[..8].copy_from_slice(&[ICMPV6_NEIGHBOR_ADVERT, 0, 0, 0, 0x60, 0, 0, 0]);
    put_bytes(b, 8, &target.octets());
    b[24..26].copy_from_slice(&[2, 1]); // target link-layer address, 1 x 8 bytes
    put_bytes(b, 26, &mac.0);
    let c = icmpv6_checksum(src, dst, b);
    put16(b, 2, c);
    Ok(NEIGHBOR_ADVERT_LEN)
}

/// Whether an ICMPv6 message's checksum is right (for tests and callers that want it).
pub fn icmpv6_checksum_ok(src: &Ipv6Addr, dst: &Ipv6Addr, msg: &[u8]) -> bool {
    fold(pseudo_header_sum(&src.octets(), &dst.octets(), PROTO_ICMPV6, msg.len()) + sum(msg))
        == 0xffff
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frag_needed_checksums_to_zero() {
        let quoted = [0x45u8, 0, 0, 28, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11];
        let mut b = [0u8; 64];
        let n = emit_frag_needed(&mut b, 1480, &quoted).unwrap();
        assert_eq!(n, 8 + quoted.len());
        assert_eq!(&b[..2], &[3, 4]);
        assert_eq!(u16::from_be_bytes([b[6], b[7]]), 1480);
        assert_eq!(fold(sum(&b[..n])), 0xffff, "a correct checksum sums to all ones");
        assert_eq!(emit_frag_needed(&mut b[..10], 1480, &quoted), Err(WireError::Truncated));
    }

    #[test]
    fn packet_too_big_and_neighbor_advert_checksums() {
        let (s, d): (Ipv6Addr, Ipv6Addr) =
            ("fd00::10".parse().unwrap(), "2001:db8::1".parse().unwrap());
        let mut b = [0u8; 64];
        let n = emit_packet_too_big(&mut b, &s, &d, 1440, &[0x60, 1, 2, 3]).unwrap();
        assert_eq!(n, 12);
        assert_eq!(u32::from_be_bytes([b[4], b[5], b[6], b[7]]), 1440);
        assert!(icmpv6_checksum_ok(&s, &d, &b[..n]));
        assert!(!icmpv6_checksum_ok(&d, &d, &b[..n]));

        let mac = MacAddr([2, 0, 0, 0, 0, 1]);
        let n = emit_neighbor_advert(&mut b, &s, &d, &s, mac).unwrap();
        assert_eq!((n, b[0], b[4]), (32, ICMPV6_NEIGHBOR_ADVERT, 0x60));
        assert_eq!(&b[26..32], &mac.0);
        assert!(icmpv6_checksum_ok(&s, &d, &b[..n]));
        assert_eq!(neighbor_solicitation_target(&b[..n]), None, "an advert is not a solicitation");
        b[0] = ICMPV6_NEIGHBOR_SOLICIT;
        assert_eq!(neighbor_solicitation_target(&b[..n]), Some(s));
        assert_eq!(neighbor_solicitation_target(&b[..23]), None);
        assert!(emit_neighbor_advert(&mut b[..31], &s, &d, &s, mac).is_err());
    }
}
