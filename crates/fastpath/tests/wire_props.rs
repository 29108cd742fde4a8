//! Property tests for `fastpath::wire`: random valid packets keep correct checksums through
//! NAT, and no input (random or mutated) panics parse, verify or rewrite.
//!
//! `fuzz_fallback` is the stable-toolchain stand-in for the cargo-fuzz target: it feeds
//! mutated valid packets to `fuzz_one` (the fuzz target's body). `FASTPATH_FUZZ_RUNS=N` sets
//! how many inputs (default 20000); `crates/fastpath/fuzz/run.sh` drives it.
//! `fuzz_fallback_frames` does the same for the AF_PACKET load balancer's frames.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use fastpath::wire::{
    build::sample_packets, fill_checksums, fuzz_one, parse, rewrite, rewrite_dst, rewrite_src,
    verify_checksums, ExtHeader, PacketBuilder, WireError,
};
use fastpath::{FlowKey, Protocol, TcpFlags};
use proptest::prelude::*;

fn arb_proto() -> impl Strategy<Value = Protocol> {
    prop_oneof![Just(Protocol::Tcp), Just(Protocol::Udp), Just(Protocol::Sctp)]
}

fn arb_ip(v6: bool) -> BoxedStrategy<IpAddr> {
    if v6 {
        any::<[u8; 16]>().prop_map(|a| IpAddr::V6(Ipv6Addr::from(a))).boxed()
    } else {
        any::<[u8; 4]>().prop_map(|a| IpAddr::V4(Ipv4Addr::from(a))).boxed()
    }
}

/// Extension headers that keep the packet whole (the fragment header is atomic), so the
/// L4 checksum can be checked from scratch.
fn arb_ext() -> impl Strategy<Value = ExtHeader> {
    prop_oneof![
        (0u8..3).prop_map(|len8| ExtHeader::HopByHop { len8 }),
        (0u8..3).prop_map(|len8| ExtHeader::DestOpts { len8 }),
        (0u8..3).prop_map(|len8| ExtHeader::Routing { segments_left: 0, len8 }),
        any::<u32>().prop_map(|id| ExtHeader::Fragment { id, offset: 0, more: false }),
        (0u8..4).prop_map(|n| ExtHeader::Auth { len4: 2 * n + 1 }),
    ]
}

/// Keeps a random chain legal: hop-by-hop only first, at most one fragment header.
fn legalize(ext: Vec<ExtHeader>) -> Vec<ExtHeader> {
    let mut seen_frag = false;
    ext.into_iter()
        .enumerate()
        .map(|(i, h)| match h {
            ExtHeader::HopByHop { len8 } if i > 0 => ExtHeader::DestOpts { len8 },
            ExtHeader::Fragment { .. } if seen_frag => ExtHeader::DestOpts { len8: 0 },
            ExtHeader::Fragment { .. } => {
                seen_frag = true;
                h
            }
            h => h,
        })
        .collect()
}

prop_compose! {
    fn arb_builder()(v6 in any::<bool>())(
        v6 in Just(v6),
        proto in arb_proto(),
        src in arb_ip(v6),
        dst in arb_ip(v6),
        ports in any::<(u16, u16)>(),
        flags in any::<u8>(),
        tcp_options in prop::collection::vec(any::<u8>(), 0..=40),
        payload in prop::collection::vec(any::<u8>(), 0..200),
        ipv4_options in prop::collection::vec(any::<u8>(), 0..=40),
        ext in prop::collection::vec(arb_ext(), 0..5),
        udp_zero in any::<bool>(),
        trailer in prop::collection::vec(any::<u8>(), 0..8),
        ttl in any::<u8>(),
    ) -> PacketBuilder {
        PacketBuilder {
            tcp_flags: TcpFlags(flags),
            tcp_options,
            payload,
            ipv4_options: if v6 { vec![] } else { ipv4_options },
            ipv6_ext: if v6 { legalize(ext) } else { vec![] },
            udp_zero_checksum: udp_zero && !v6,
            trailer,
            ttl,
            hop_limit: ttl,
            ..PacketBuilder::new(FlowKey::new(proto, src, ports.0, dst, ports.1))
        }
    }
}

/// A builder plus a new endpoint of the same family.
fn arb_builder_and_endpoint() -> impl Strategy<Value = (PacketBuilder, SocketAddr)> {
    arb_builder().prop_flat_map(|b| {
        let v6 = b.key.src.is_ipv6();
        (Just(b), arb_ip(v6), any::<u16>()).prop_map(|(b, ip, port)| (b, SocketAddr::new(ip, port)))
    })
}

/// What the rewritten packet must equal: the same bytes with checksums computed from scratch
/// (an IPv4 UDP checksum of 0 stays 0).
fn scratch(b: &PacketBuilder, p: &[u8]) -> Vec<u8> {
    let mut s = p.to_vec();
    fill_checksums(&mut s).unwrap();
    if b.udp_zero_checksum && b.key.proto == Protocol::Udp {
        let at = parse(p).unwrap().l4_offset + 6;
        s[at..at + 2].copy_from_slice(&[0, 0]);
    }
    s
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn built_packets_parse_and_verify(b in arb_builder()) {
        let p = b.build();
        let info = parse(&p).unwrap();
        prop_assert_eq!(info.key, b.key);
        prop_assert_eq!(info.total_len, p.len() - b.trailer.len());
        prop_assert_eq!(info.tcp_flags, (b.key.proto == Protocol::Tcp).then_some(b.tcp_flags));
        prop_assert_eq!(verify_checksums(&p), Ok(true));
        prop_assert_eq!(scratch(&b, &p), p);
    }

    #[test]
    fn dnat_keeps_checksums_right((b, ep) in arb_builder_and_endpoint()) {
        let mut p = b.build();
        rewrite_dst(&mut p, ep.ip(), ep.port()).unwrap();
        prop_assert_eq!(verify_checksums(&p), Ok(true));
        prop_assert_eq!(&scratch(&b, &p), &p);
        let info = parse(&p).unwrap();
        prop_assert_eq!((info.key.dst, info.key.dst_port), (ep.ip(), ep.port()));
        prop_assert_eq!((info.key.src, info.key.src_port), (b.key.src, b.key.src_port));
    }

    #[test]
    fn snat_keeps_checksums_right((b, ep) in arb_builder_and_endpoint()) {
        let mut p = b.build();
        rewrite_src(&mut p, ep.ip(), ep.port()).unwrap();
        prop_assert_eq!(verify_checksums(&p), Ok(true));
        prop_assert_eq!(&scratch(&b, &p), &p);
        let info = parse(&p).unwrap();
        prop_assert_eq!((info.key.src, info.key.src_port), (ep.ip(), ep.port()));
        prop_assert_eq!((info.key.dst, info.key.dst_port), (b.key.dst, b.key.dst_port));
    }

    #[test]
    fn snat_and_dnat_then_back((b, ep) in arb_builder_and_endpoint()) {
        let orig = b.build();
        let mut p = orig.clone();
        let back = SocketAddr::new(ep.ip(), ep.port() ^ 0x5555);
        rewrite(&mut p, Some(ep), Some(back)).unwrap();
        prop_assert_eq!(verify_checksums(&p), Ok(true));
        prop_assert_eq!(&scratch(&b, &p), &p);
        // Undoing the NAT restores the packet bit for bit.
        rewrite(
            &mut p,
            Some(SocketAddr::new(b.key.src, b.key.src_port)),
            Some(SocketAddr::new(b.key.dst, b.key.dst_port)),
        ).unwrap();
        prop_assert_eq!(p, orig);
    }

    #[test]
    fn wrong_family_is_refused(b in arb_builder(), port in any::<u16>()) {
        let mut p = b.build();
        let orig = p.clone();
        let other: IpAddr = if b.key.src.is_ipv6() { Ipv4Addr::LOCALHOST.into() } else { Ipv6Addr::LOCALHOST.into() };
        prop_assert_eq!(rewrite_dst(&mut p, other, port), Err(WireError::AddressFamilyMismatch));
        prop_assert_eq!(rewrite_src(&mut p, other, port), Err(WireError::AddressFamilyMismatch));
        prop_assert_eq!(p, orig);
    }

    #[test]
    fn truncation_is_an_error(b in arb_builder(), cut in any::<prop::sample::Index>()) {
        let p = b.build();
        let end = p.len() - b.trailer.len();
        let n = cut.index(end);
        prop_assert!(parse(&p[..n]).is_err());
        let mut t = p[..n].to_vec();
        prop_assert!(rewrite_dst(&mut t, b.key.dst, 1).is_err());
        prop_assert_eq!(&t[..], &p[..n]);
    }

    #[test]
    fn random_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..128)) {
        let _ = parse(&data);
        let _ = verify_checksums(&data);
        let mut m = data.clone();
        if rewrite_src(&mut m, Ipv4Addr::new(1, 2, 3, 4).into(), 5).is_err() {
            prop_assert_eq!(&m, &data);
        }
        fuzz_one(&data);
    }

    /// Random bytes rarely get past the version check; valid packets with a few bytes
    /// changed reach the deep paths.
    #[test]
    fn mutated_packets_never_panic(
        b in arb_builder(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let mut p = b.build();
        for (i, v) in edits {
            let at = i.index(p.len());
            p[at] = v;
        }
        fuzz_one(&p);
    }
}

/// Tiny xorshift: the fallback fuzzer must be reproducible and dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const INTERESTING: [u8; 12] = [0, 1, 5, 6, 17, 0x20, 0x40, 0x45, 0x60, 0x7f, 0x80, 0xff];

fn mutate(rng: &mut Rng, input: &mut Vec<u8>, corpus: &[Vec<u8>]) {
    for _ in 0..=rng.below(4) {
        let len = input.len();
        match rng.below(8) {
            0 if len > 0 => input[rng.below(len)] ^= 1 << rng.below(8),
            1 if len > 0 => input[rng.below(len)] = rng.next() as u8,
            2 if len > 0 => input[rng.below(len)] = INTERESTING[rng.below(INTERESTING.len())],
            3 => input.truncate(rng.below(len + 1)),
            4 => input.extend((0..rng.below(16)).map(|_| rng.next() as u8)),
            5 if len > 1 => {
                // A 16-bit field set to an edge value (lengths, offsets).
                let at = rng.below(len - 1);
                let v = [0u16, 1, 7, 8, 19, 20, 40, 0xffff][rng.below(8)];
                input[at..at + 2].copy_from_slice(&v.to_be_bytes());
            }
            6 => {
                // Splice the tail of another seed.
                let other = &corpus[rng.below(corpus.len())];
                let at = rng.below(len + 1).min(len);
                let from = rng.below(other.len());
                input.truncate(at);
                input.extend_from_slice(&other[from..]);
            }
            _ if len > 0 => {
                let at = rng.below(len);
                input.remove(at);
            }
            _ => {}
        }
    }
}

#[test]
fn fuzz_fallback() {
    let runs: usize =
        std::env::var("FASTPATH_FUZZ_RUNS").ok().and_then(|s| s.parse().ok()).unwrap_or(20_000);
    let seed: u64 =
        std::env::var("FASTPATH_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed);
    let corpus = sample_packets();
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let start = std::time::Instant::now();
    let mut parsed = 0usize;
    for _ in 0..runs {
        let mut input = corpus[rng.below(corpus.len())].clone();
        mutate(&mut rng, &mut input, &corpus);
        if parse(&input).is_ok() {
            parsed += 1;
        }
        fuzz_one(&input);
    }
    eprintln!(
        "fuzz_fallback: {runs} inputs ({parsed} parsed) in {:.2?}, seed {seed}",
        start.elapsed()
    );
}

/// The same for the AF_PACKET load balancer's frame path (`fuzz_frame`, the `frame` fuzz
/// target's body): mutated frames, ARP and neighbour solicitations included, and every IP
/// seed also as a framed packet. Same environment variables.
#[cfg(target_os = "linux")]
#[test]
fn fuzz_fallback_frames() {
    use fastpath::datapath::afpacket::{forward::testbed::sample_frames, fuzz_frame};
    let runs: usize =
        std::env::var("FASTPATH_FUZZ_RUNS").ok().and_then(|s| s.parse().ok()).unwrap_or(20_000);
    let seed: u64 =
        std::env::var("FASTPATH_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed);
    let mut corpus = sample_frames();
    corpus.extend(sample_packets());
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let start = std::time::Instant::now();
    for _ in 0..runs {
        let mut input = corpus[rng.below(corpus.len())].clone();
        mutate(&mut rng, &mut input, &corpus);
        fuzz_frame(&input);
    }
    eprintln!("fuzz_fallback_frames: {runs} inputs in {:.2?}, seed {seed}", start.elapsed());
}
