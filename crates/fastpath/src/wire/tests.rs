//! Whole-packet tests: parse, verify, truncation at every length, labels.

use std::net::IpAddr;

use super::*;

fn key(proto: Protocol, v6: bool) -> FlowKey {
    let (s, d): (IpAddr, IpAddr) = if v6 {
        ("2001:db8::1".parse().unwrap(), "fd00::a".parse().unwrap())
    } else {
        ("10.0.0.1".parse().unwrap(), "10.96.0.10".parse().unwrap())
    };
    FlowKey::new(proto, s, 40000, d, 443)
}

/// A spread of valid packets: every protocol and family, with options, extension headers,
/// payloads and trailing bytes.
fn samples() -> Vec<PacketBuilder> {
    let mut out = Vec::new();
    for proto in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp] {
        for v6 in [false, true] {
            out.push(PacketBuilder::new(key(proto, v6)));
            out.push(PacketBuilder {
                payload: b"GET / HTTP/1.1\r\n".to_vec(),
                tcp_options: vec![2, 4, 5, 0xb4, 1, 3, 3, 7],
                trailer: vec![0; 4],
                ..PacketBuilder::new(key(proto, v6))
            });
        }
        out.push(PacketBuilder {
            ipv4_options: vec![0x94, 0x04, 0, 0, 0x07, 0x07, 0x04, 0, 0, 0, 0],
            payload: vec![9; 10],
            ..PacketBuilder::new(key(proto, false))
        });
        out.push(PacketBuilder {
            ipv6_ext: vec![
                ExtHeader::HopByHop { len8: 0 },
                ExtHeader::DestOpts { len8: 1 },
                ExtHeader::Routing { segments_left: 0, len8: 2 },
                ExtHeader::Fragment { id: 77, offset: 0, more: false },
                ExtHeader::Auth { len4: 4 },
                ExtHeader::DestOpts { len8: 0 },
            ],
            payload: vec![1; 7],
            ..PacketBuilder::new(key(proto, true))
        });
    }
    out
}

#[test]
fn parse_samples() {
    for b in samples() {
        let p = b.build();
        let info = parse(&p).unwrap_or_else(|e| panic!("{b:?}: {e}"));
        assert_eq!(info.key, b.key);
        assert_eq!(info.tcp_flags, (b.key.proto == Protocol::Tcp).then_some(b.tcp_flags));
        assert_eq!(info.fragment, Fragment::NotFragment);
        assert_eq!(info.total_len, p.len() - b.trailer.len());
        assert_eq!(info.l4_offset, info.l3_len);
        let expected_l3 = match b.key.src {
            IpAddr::V4(_) => 20 + b.ipv4_options.len().div_ceil(4) * 4,
            IpAddr::V6(_) => 40 + b.ipv6_ext.iter().map(ext_len).sum::<usize>(),
        };
        assert_eq!(info.l3_len, expected_l3);
        assert_eq!(info.version == IpVersion::V6, b.key.src.is_ipv6());
        assert_eq!(verify_checksums(&p), Ok(true), "{b:?}");
        let mut filled = p.clone();
        fill_checksums(&mut filled).unwrap();
        assert_eq!(filled, p);
        fuzz_one(&p);
    }
}

fn ext_len(h: &ExtHeader) -> usize {
    match *h {
        ExtHeader::HopByHop { len8 }
        | ExtHeader::DestOpts { len8 }
        | ExtHeader::Routing { len8, .. } => (usize::from(len8) + 1) * 8,
        ExtHeader::Fragment { .. } => 8,
        ExtHeader::Auth { len4 } => (usize::from(len4) + 2) * 4,
    }
}

/// Cutting a packet anywhere before its declared end must fail with an error, never panic.
#[test]
fn truncated_at_every_length() {
    for b in samples() {
        let p = b.build();
        let end = p.len() - b.trailer.len();
        for n in 0..p.len() {
            let cut = &p[..n];
            let r = parse(cut);
            if n < end {
                assert!(r.is_err(), "{b:?} cut at {n}: {r:?}");
                assert!(verify_checksums(cut).is_err());
                let mut m = cut.to_vec();
                assert!(rewrite_dst(&mut m, b.key.src, 1).is_err());
                assert_eq!(m, cut);
            } else {
                assert_eq!(r.unwrap().key, b.key);
            }
            fuzz_one(cut);
        }
    }
}

#[test]
fn ip_level_errors() {
    assert_eq!(parse(&[]), Err(WireError::Truncated));
    assert_eq!(parse(&[0x45]), Err(WireError::Truncated));
    assert_eq!(parse(&[0x65]), Err(WireError::Truncated));
    assert_eq!(parse(&[0x55; 60]), Err(WireError::BadVersion));
    assert_eq!(parse(&[0x00; 60]), Err(WireError::BadVersion));

    let p = PacketBuilder::new(key(Protocol::Tcp, false)).build();
    let mut b = p.clone();
    b[0] = 0x43;
    assert_eq!(parse(&b), Err(WireError::BadIhl));
    let mut b = p.clone();
    b[2..4].copy_from_slice(&10u16.to_be_bytes());
    assert_eq!(parse(&b), Err(WireError::BadTotalLength));
    let mut b = p.clone();
    b[2..4].copy_from_slice(&100u16.to_be_bytes());
    assert_eq!(parse(&b), Err(WireError::Truncated));
    // A total length that ends inside the TCP header.
    let mut b = p.clone();
    b[2..4].copy_from_slice(&30u16.to_be_bytes());
    assert_eq!(parse(&b), Err(WireError::Truncated));
}

#[test]
fn l4_errors() {
    let p = PacketBuilder::new(key(Protocol::Tcp, false)).build();
    let mut b = p.clone();
    b[32] = 0x40;
    assert_eq!(parse(&b), Err(WireError::BadTcpOffset));
    b[32] = 0x60; // 24-byte header in a 20-byte segment
    assert_eq!(parse(&b), Err(WireError::BadTcpOffset));

    let p =
        PacketBuilder { payload: vec![1, 2, 3], ..PacketBuilder::new(key(Protocol::Udp, true)) }
            .build();
    let mut b = p.clone();
    b[44..46].copy_from_slice(&7u16.to_be_bytes());
    assert_eq!(parse(&b), Err(WireError::BadUdpLength));
    b[44..46].copy_from_slice(&12u16.to_be_bytes());
    assert_eq!(parse(&b), Err(WireError::BadUdpLength));
    // Shorter than the IP payload: the rest is padding, which is fine.
    b[44..46].copy_from_slice(&9u16.to_be_bytes());
    assert!(parse(&b).is_ok());
}

#[test]
fn unsupported_protocols() {
    let mut icmp = PacketBuilder::new(key(Protocol::Tcp, false)).build();
    icmp[9] = 1;
    assert_eq!(parse(&icmp), Err(WireError::UnsupportedProtocol(1)));
    // The IPv4 header is still checked (and now wrong, as protocol changed).
    assert_eq!(verify_checksums(&icmp), Ok(false));
    fill_checksums(&mut icmp).unwrap();
    assert_eq!(verify_checksums(&icmp), Ok(true));

    for nh in [58u8, 50, 59] {
        let mut b = PacketBuilder::new(key(Protocol::Udp, true)).build();
        b[6] = nh;
        assert_eq!(parse(&b), Err(WireError::UnsupportedProtocol(nh)));
        assert_eq!(verify_checksums(&b), Ok(true));
    }
}

#[test]
fn fragments() {
    // IPv4 first fragment: ports known, UDP length may exceed what is here.
    let b = PacketBuilder {
        ipv4_fragment: Some((0, true)),
        ..PacketBuilder::new(key(Protocol::Udp, false))
    };
    let mut p = b.build();
    p[24..26].copy_from_slice(&1000u16.to_be_bytes());
    let info = parse(&p).unwrap();
    assert_eq!(info.fragment, Fragment::FirstFragment { id: 0x1234 });
    assert_eq!(info.key, b.key);
    assert_eq!(verify_checksums(&p), Ok(true)); // IPv4 header only

    // IPv4 later fragment: a distinct error carrying the reassembly key.
    let b = PacketBuilder {
        ipv4_fragment: Some((3, false)),
        payload: vec![0xaa; 16],
        ..PacketBuilder::new(key(Protocol::Tcp, false))
    };
    let p = b.build();
    let expect = FragmentKey { src: b.key.src, dst: b.key.dst, proto: Protocol::Tcp, id: 0x1234 };
    assert_eq!(parse(&p), Err(WireError::NonFirstFragment(expect)));
    assert_eq!(
        parse_l3(&p).map(|l| (l.fragment, l.l3_len, l.total_len)),
        Ok((Fragment::LaterFragment { id: 0x1234 }, 20, 36))
    );
    assert_eq!(verify_checksums(&p), Ok(true));
    assert_eq!(l4_checksum(&p), Err(WireError::NonFirstFragment(expect)));

    // IPv6: hop-by-hop + destination options + fragment.
    let ext = |offset, more| {
        vec![
            ExtHeader::HopByHop { len8: 0 },
            ExtHeader::DestOpts { len8: 0 },
            ExtHeader::Fragment { id: 0xfeed, offset, more },
        ]
    };
    let b =
        PacketBuilder { ipv6_ext: ext(0, true), ..PacketBuilder::new(key(Protocol::Sctp, true)) };
    let info = parse(&b.build()).unwrap();
    assert_eq!(info.fragment, Fragment::FirstFragment { id: 0xfeed });
    assert_eq!((info.l3_len, info.key), (64, b.key));

    let b = PacketBuilder {
        ipv6_ext: ext(10, false),
        payload: vec![0; 24],
        ..PacketBuilder::new(key(Protocol::Udp, true))
    };
    let expect = FragmentKey { src: b.key.src, dst: b.key.dst, proto: Protocol::Udp, id: 0xfeed };
    assert_eq!(parse(&b.build()), Err(WireError::NonFirstFragment(expect)));
}

#[test]
fn checksum_helpers() {
    for b in samples() {
        let p = b.build();
        let info = parse(&p).unwrap();
        let at = info.l4_offset;
        let stored = match b.key.proto {
            Protocol::Tcp => u32::from(u16::from_be_bytes([p[at + 16], p[at + 17]])),
            Protocol::Udp => u32::from(u16::from_be_bytes([p[at + 6], p[at + 7]])),
            Protocol::Sctp => u32::from_le_bytes([p[at + 8], p[at + 9], p[at + 10], p[at + 11]]),
        };
        assert_eq!(l4_checksum(&p), Ok(stored));
        if info.version == IpVersion::V4 {
            assert_eq!(ipv4_header_checksum(&p[..info.l3_len]), u16::from_be_bytes([p[10], p[11]]));
        }
        // Any single flipped bit in the L4 bytes is caught.
        let mut bad = p.clone();
        bad[info.total_len - 1] ^= 0x10;
        assert_eq!(verify_checksums(&bad), Ok(false), "{b:?}");
    }
    // IPv6 UDP must carry a checksum; IPv4 may omit it.
    let v6 =
        PacketBuilder { udp_zero_checksum: true, ..PacketBuilder::new(key(Protocol::Udp, true)) }
            .build();
    assert_eq!(verify_checksums(&v6), Ok(false));
    let v4 =
        PacketBuilder { udp_zero_checksum: true, ..PacketBuilder::new(key(Protocol::Udp, false)) }
            .build();
    assert_eq!(verify_checksums(&v4), Ok(true));
}

#[test]
fn labels() {
    let fk = FragmentKey {
        src: [0, 0, 0, 0].into(),
        dst: [0, 0, 0, 0].into(),
        proto: Protocol::Udp,
        id: 1,
    };
    let all = [
        WireError::Truncated,
        WireError::BadVersion,
        WireError::BadIhl,
        WireError::BadTotalLength,
        WireError::BadExtHeader,
        WireError::ExtHeaderLoop,
        WireError::RoutingHeader,
        WireError::BadTcpOffset,
        WireError::BadUdpLength,
        WireError::UnsupportedProtocol(1),
        WireError::NonFirstFragment(fk),
        WireError::AddressFamilyMismatch,
        WireError::FragmentedSctp,
    ];
    let mut seen = std::collections::HashSet::new();
    for e in all {
        let l = e.as_str();
        assert!(l.bytes().all(|c| c.is_ascii_lowercase() || c == b'_'), "{l}");
        assert!(seen.insert(l), "duplicate label {l}");
        assert!(e.to_string().starts_with(l));
    }
    assert_eq!(WireError::UnsupportedProtocol(1).to_string(), "unsupported_protocol (1)");
}
