//! In-place SNAT/DNAT: address and port rewrites with checksum updates.
//!
//! TCP/UDP and IPv4 header checksums are updated incrementally (RFC 1624), which is O(1) and
//! keeps a corrupted packet exactly as corrupted (we do not launder bad checksums). SCTP's
//! CRC32c has no pseudo-header, so an address change leaves it alone; a port change recomputes
//! it over the SCTP packet, as Linux's `nf_nat_proto` does.
//!
//! Fragments: the first fragment carries the ports and the L4 checksum field, and the
//! incremental update only needs the changed fields, so it is rewritten fully. A later
//! fragment has no L4 header: only its address (and IPv4 header checksum) change and the port
//! argument is ignored; rewriting every fragment of a datagram the same way keeps the
//! reassembled L4 checksum right. The one thing we cannot do is recompute an SCTP CRC32c
//! whose bytes span fragments: a port change on a fragmented SCTP packet fails with
//! [`WireError::FragmentedSctp`].
//!
//! Every check happens before the first write, so on `Err` the buffer is untouched.

use std::net::{IpAddr, SocketAddr};

use super::checksum::{sctp_checksum, Delta};
use super::{
    get16, l4_bytes, l4_header, parse_l3, put16, put_bytes, sub, Fragment, IpVersion, WireError,
};
use crate::flow::Protocol;

/// SNAT: sets the packet's source address and port.
pub fn rewrite_src(buf: &mut [u8], addr: IpAddr, port: u16) -> Result<(), WireError> {
    rewrite(buf, Some(SocketAddr::new(addr, port)), None)
}

/// DNAT: sets the packet's destination address and port.
pub fn rewrite_dst(buf: &mut [u8], addr: IpAddr, port: u16) -> Result<(), WireError> {
    rewrite(buf, None, Some(SocketAddr::new(addr, port)))
}

/// Rewrites source and/or destination with one parse and one checksum update (for hairpin
/// SNAT+DNAT). Both addresses must be of the packet's family.
pub fn rewrite(
    buf: &mut [u8],
    src: Option<SocketAddr>,
    dst: Option<SocketAddr>,
) -> Result<(), WireError> {
    let l3 = parse_l3(buf)?;
    let (src_at, dst_at) = match l3.version {
        IpVersion::V4 => (12, 16),
        IpVersion::V6 => (8, 24),
    };
    let family_ok = |ep: &Option<SocketAddr>| match ep {
        None => true,
        Some(ep) => matches!(
            (ep.ip(), l3.version),
            (IpAddr::V4(_), IpVersion::V4) | (IpAddr::V6(_), IpVersion::V6)
        ),
    };
    if !family_ok(&src) || !family_ok(&dst) {
        return Err(WireError::AddressFamilyMismatch);
    }
    let proto = Protocol::from_number(l3.proto).ok_or(WireError::UnsupportedProtocol(l3.proto))?;
    let has_l4 = match l3.fragment {
        Fragment::NotFragment => Some(false),
        Fragment::FirstFragment { .. } => Some(true),
        Fragment::LaterFragment { .. } => None,
    };
    // Validate the L4 header exactly as `parse` does, so the two agree on what is well formed.
    let ports = match has_l4 {
        Some(first) => Some(l4_header(proto, l4_bytes(buf, &l3), first)?),
        None => None,
    };
    let port_change = match ports {
        Some((sp, dp, _)) => {
            src.is_some_and(|s| s.port() != sp) || dst.is_some_and(|d| d.port() != dp)
        }
        None => false,
    };
    if proto == Protocol::Sctp && port_change && l3.fragment != Fragment::NotFragment {
        return Err(WireError::FragmentedSctp);
    }

    let l4_at = l3.l3_len;
    let mut ip_delta = Delta::default();
    let mut l4_delta = Delta::default();
    for (ep, addr_at, port_at) in [(src, src_at, l4_at), (dst, dst_at, l4_at + 2)] {
        let Some(ep) = ep else { continue };
        let (new, len) = octets(ep.ip());
        let new = new.get(..len).unwrap_or(&[]);
        let mut old = [0u8; 16];
        for (o, b) in old.iter_mut().zip(sub(buf, addr_at, addr_at + len)) {
            *o = *b;
        }
        let old = old.get(..len).unwrap_or(&[]);
        ip_delta.change(old, new);
        l4_delta.change(old, new);
        put_bytes(buf, addr_at, new);
        if ports.is_some() {
            let old_port = get16(buf, port_at);
            l4_delta.change(&old_port.to_be_bytes(), &ep.port().to_be_bytes());
            put16(buf, port_at, ep.port());
        }
    }

    if l3.version == IpVersion::V4 {
        let c = ip_delta.apply(get16(buf, 10));
        put16(buf, 10, c);
    }
    if ports.is_none() {
        return Ok(());
    }
    match proto {
        Protocol::Tcp => {
            let c = l4_delta.apply(get16(buf, l4_at + 16));
            put16(buf, l4_at + 16, c);
        }
        Protocol::Udp => {
            // 0 means "no checksum" and stays so; a computed 0 is sent as 0xffff (RFC 768).
            let old = get16(buf, l4_at + 6);
            if old != 0 {
                let c = match l4_delta.apply(old) {
                    0 => 0xffff,
                    c => c,
                };
                put16(buf, l4_at + 6, c);
            }
        }
        Protocol::Sctp => {
            if port_change {
                let crc = sctp_checksum(l4_bytes(buf, &l3));
                put_bytes(buf, l4_at + 8, &crc.to_le_bytes());
            }
        }
    }
    Ok(())
}

/// The address bytes (first `len` of 16 used), without allocating.
fn octets(ip: IpAddr) -> ([u8; 16], usize) {
    let mut out = [0u8; 16];
    match ip {
        IpAddr::V4(a) => {
            out[..4].copy_from_slice(&a.octets());
            (out, 4)
        }
        IpAddr::V6(a) => (a.octets(), 16),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{fill_checksums, parse, verify_checksums, ExtHeader, PacketBuilder};
    use crate::FlowKey;

    fn v4(proto: Protocol) -> PacketBuilder {
        let key = FlowKey::new(
            proto,
            "10.0.0.1".parse().unwrap(),
            33000,
            "10.96.0.10".parse().unwrap(),
            80,
        );
        PacketBuilder { payload: b"some payload bytes".to_vec(), ..PacketBuilder::new(key) }
    }

    fn v6(proto: Protocol) -> PacketBuilder {
        let key = FlowKey::new(
            proto,
            "2001:db8::1".parse().unwrap(),
            33000,
            "fd00::10".parse().unwrap(),
            80,
        );
        PacketBuilder { payload: b"some payload bytes".to_vec(), ..PacketBuilder::new(key) }
    }

    /// After a rewrite the packet must equal one whose checksums were computed from scratch.
    fn assert_scratch_equal(b: &[u8]) {
        let mut scratch = b.to_vec();
        fill_checksums(&mut scratch).unwrap();
        assert_eq!(b, &scratch[..]);
        assert_eq!(verify_checksums(b), Ok(true));
    }

    #[test]
    fn dnat_snat_every_protocol_and_family() {
        for proto in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp] {
            for (builder, backend, client) in [
                (
                    v4(proto),
                    "10.244.1.7".parse::<IpAddr>().unwrap(),
                    "192.168.0.1".parse::<IpAddr>().unwrap(),
                ),
                (v6(proto), "fd00:244::7".parse().unwrap(), "2001:db8:ffff::1".parse().unwrap()),
            ] {
                let mut b = builder.build();
                rewrite_dst(&mut b, backend, 8080).unwrap();
                assert_scratch_equal(&b);
                let info = parse(&b).unwrap();
                assert_eq!((info.key.dst, info.key.dst_port), (backend, 8080));
                rewrite_src(&mut b, client, 1).unwrap();
                assert_scratch_equal(&b);
                let info = parse(&b).unwrap();
                assert_eq!((info.key.src, info.key.src_port), (client, 1));
                // Both at once equals one after the other.
                let mut both = builder.build();
                rewrite(
                    &mut both,
                    Some(SocketAddr::new(client, 1)),
                    Some(SocketAddr::new(backend, 8080)),
                )
                .unwrap();
                assert_eq!(both, b);
            }
        }
    }

    #[test]
    fn udp_zero_checksum_stays_zero() {
        let mut b = PacketBuilder { udp_zero_checksum: true, ..v4(Protocol::Udp) }.build();
        rewrite_dst(&mut b, "1.2.3.4".parse().unwrap(), 9).unwrap();
        assert_eq!(&b[26..28], &[0, 0]);
        assert_eq!(verify_checksums(&b), Ok(true));
    }

    #[test]
    fn udp_checksum_that_becomes_zero_is_ffff() {
        // Search for a destination port that makes the updated checksum compute to 0.
        let b = v4(Protocol::Udp).build();
        let found = (0..=u16::MAX).find_map(|port| {
            let mut c = b.clone();
            rewrite_dst(&mut c, "10.96.0.10".parse().unwrap(), port).unwrap();
            let mut scratch = c.clone();
            fill_checksums(&mut scratch).unwrap();
            (c[26..28] == [0xff, 0xff]).then_some((c, scratch))
        });
        let (c, scratch) = found.expect("some port makes the checksum 0");
        assert_eq!(c, scratch);
        assert_eq!(verify_checksums(&c), Ok(true));
    }

    #[test]
    fn bad_checksum_stays_bad() {
        let mut b = v4(Protocol::Tcp).build();
        b[36] ^= 0x01; // TCP checksum off by one bit
        rewrite_dst(&mut b, "10.1.1.1".parse().unwrap(), 1).unwrap();
        assert_eq!(verify_checksums(&b), Ok(false));
        b[36] ^= 0x01;
        assert_eq!(verify_checksums(&b), Ok(true));
    }

    #[test]
    fn family_mismatch_and_unsupported_leave_buffer_alone() {
        let mut b = v4(Protocol::Tcp).build();
        let orig = b.clone();
        assert_eq!(
            rewrite_dst(&mut b, "::1".parse().unwrap(), 1),
            Err(WireError::AddressFamilyMismatch)
        );
        assert_eq!(
            rewrite(&mut b, Some("1.1.1.1:1".parse().unwrap()), Some("[::1]:1".parse().unwrap())),
            Err(WireError::AddressFamilyMismatch)
        );
        b[9] = 1; // ICMP
        assert_eq!(
            rewrite_dst(&mut b, "1.1.1.1".parse().unwrap(), 1),
            Err(WireError::UnsupportedProtocol(1))
        );
        b[9] = 6;
        assert_eq!(b, orig);
        let mut t = b[..30].to_vec();
        assert_eq!(rewrite_dst(&mut t, "1.1.1.1".parse().unwrap(), 1), Err(WireError::Truncated));
        assert_eq!(t, &orig[..30]);
    }

    /// Rewriting each fragment must give what rewriting the whole datagram gives.
    #[test]
    fn ipv4_fragments() {
        for proto in [Protocol::Tcp, Protocol::Udp] {
            let whole = PacketBuilder { payload: vec![7; 64], ..v4(proto) }.build();
            let mut whole_nat = whole.clone();
            rewrite_dst(&mut whole_nat, "10.244.0.9".parse().unwrap(), 8080).unwrap();

            // First fragment: header + the first 16 bytes of data, MF set.
            let l4_len = if proto == Protocol::Tcp { 20 } else { 8 };
            let cut = 20 + l4_len + 16;
            let mut first = whole[..cut].to_vec();
            first[2..4].copy_from_slice(&(cut as u16).to_be_bytes());
            first[6] = 0x20;
            first[7] = 0;
            fill_ipv4_header(&mut first);
            assert_eq!(parse(&first).unwrap().fragment, Fragment::FirstFragment { id: 0x1234 });
            rewrite_dst(&mut first, "10.244.0.9".parse().unwrap(), 8080).unwrap();
            assert_eq!(&first[20..20 + l4_len], &whole_nat[20..20 + l4_len], "{proto}");
            assert_eq!(verify_checksums(&first), Ok(true));

            // A later fragment: only the address and the IP header checksum change.
            let mut later = whole[..20].to_vec();
            later.extend_from_slice(&whole[cut..]);
            let n = later.len() as u16;
            later[2..4].copy_from_slice(&n.to_be_bytes());
            later[6] = 0;
            later[7] = ((cut - 20) / 8) as u8;
            fill_ipv4_header(&mut later);
            let before = later.clone();
            rewrite_dst(&mut later, "10.244.0.9".parse().unwrap(), 8080).unwrap();
            assert_eq!(&later[16..20], &[10, 244, 0, 9]);
            assert_eq!(&later[20..], &before[20..]);
            assert_eq!(verify_checksums(&later), Ok(true));
        }
    }

    #[test]
    fn fragmented_sctp() {
        let mut b = PacketBuilder {
            ipv6_ext: vec![ExtHeader::Fragment { id: 5, offset: 0, more: true }],
            ..v6(Protocol::Sctp)
        }
        .build();
        let orig = b.clone();
        assert_eq!(
            rewrite_dst(&mut b, "fd00::1".parse().unwrap(), 1),
            Err(WireError::FragmentedSctp)
        );
        assert_eq!(b, orig);
        // Same port: the CRC does not cover addresses, so an address-only rewrite works.
        rewrite_dst(&mut b, "fd00::1".parse().unwrap(), 80).unwrap();
        assert_eq!(&b[48 + 8..48 + 12], &orig[48 + 8..48 + 12]);
    }

    #[test]
    fn ipv6_ext_headers() {
        let b = PacketBuilder {
            ipv6_ext: vec![
                ExtHeader::HopByHop { len8: 0 },
                ExtHeader::Routing { segments_left: 0, len8: 2 },
                ExtHeader::DestOpts { len8: 1 },
            ],
            ..v6(Protocol::Udp)
        };
        let mut p = b.build();
        rewrite(&mut p, Some("[fd00::2]:2".parse().unwrap()), Some("[fd00::3]:3".parse().unwrap()))
            .unwrap();
        assert_scratch_equal(&p);
    }

    fn fill_ipv4_header(b: &mut [u8]) {
        let hl = usize::from(b[0] & 0x0f) * 4;
        let c = crate::wire::ipv4_header_checksum(&b[..hl]);
        b[10..12].copy_from_slice(&c.to_be_bytes());
    }
}
