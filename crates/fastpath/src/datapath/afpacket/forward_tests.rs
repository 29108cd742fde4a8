use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::testbed::{self, frame, LB_MAC, ROUTER_MAC, VIP4, VIP6};
use super::*;
use crate::flow::{FlowKey, Protocol, TcpFlags, NANOS_PER_SEC as SEC};
use crate::wire::{verify_checksums, PacketBuilder};

fn client4(port: u16) -> FlowKey {
    FlowKey::new(Protocol::Tcp, Ipv4Addr::new(198, 51, 100, 7).into(), port, VIP4.into(), 80)
}

fn client6(port: u16) -> FlowKey {
    FlowKey::new(Protocol::Tcp, "2001:db8:c::7".parse().unwrap(), port, VIP6.into(), 443)
}

fn packet(key: FlowKey, flags: u8, payload: usize) -> Vec<u8> {
    PacketBuilder {
        tcp_flags: TcpFlags(flags),
        payload: vec![0x5a; payload],
        ..PacketBuilder::new(key)
    }
    .build()
}

fn run(lb: &Forwarder, ip: &[u8]) -> (Outcome, Vec<u8>) {
    let mut out = vec![0u8; 2048];
    let o = lb.process(&frame(ip), SEC, &mut out);
    let len = match o {
        Outcome::Transmit { len, .. } => len,
        _ => 0,
    };
    out.truncate(len);
    (o, out)
}

/// The outer header's destination (the backend) and what it carries.
fn unwrap(out: &[u8]) -> (IpAddr, u8, Vec<u8>) {
    let eth = EthernetFrame::new_checked(out).unwrap();
    let l3 = wire::parse_l3(eth.payload()).unwrap();
    (l3.dst, l3.proto, eth.payload()[l3.l3_len..l3.total_len].to_vec())
}

fn backend_of(lb: &Forwarder, ip: &[u8]) -> IpAddr {
    let (o, out) = run(lb, ip);
    assert!(matches!(o, Outcome::Transmit { kind: TxKind::Forward, .. }), "{o:?}");
    unwrap(&out).0
}

#[test]
fn a_tcp_syn_to_an_ipv4_vip_goes_to_a_backend_in_ipip() {
    let lb = testbed::forwarder();
    let syn = packet(client4(40000), TcpFlags::SYN, 0);
    let (o, out) = run(&lb, &syn);
    assert_eq!(o, Outcome::Transmit { len: 14 + 20 + syn.len(), kind: TxKind::Forward });
    let eth = EthernetFrame::new_checked(&out[..]).unwrap();
    assert_eq!(
        (eth.dst_addr(), eth.src_addr(), eth.ethertype()),
        (ROUTER_MAC, LB_MAC, ethertype::IPV4)
    );
    let outer = Ipv4Packet::new_checked(eth.payload()).unwrap();
    assert!(outer.verify_checksum());
    assert_eq!(outer.src_addr(), Ipv4Addr::new(192, 0, 2, 1));
    assert!(testbed::backends4(3).contains(&IpAddr::V4(outer.dst_addr())));
    assert_eq!(
        (outer.protocol(), outer.ttl(), outer.total_len()),
        (PROTO_IPIP, 64, 20 + syn.len())
    );
    assert!(outer.dont_frag(), "the client's DF is copied out");
    assert_eq!(outer.payload(), &syn[..], "the client's packet goes untouched");
    assert_eq!(lb.counters().tx_count(TxKind::Forward), 1);
}

#[test]
fn udp_and_ipv6_are_forwarded_and_a_backend_neighbour_wins_over_the_router() {
    let mut cfg = testbed::config();
    let b6 = testbed::backends6(3);
    let b6_macs: Vec<MacAddr> = (0..3).map(|i| MacAddr([2, 0, 0, 0, 6, i])).collect();
    for (b, m) in b6.iter().zip(&b6_macs) {
        cfg.neighbours.insert(*b, *m);
    }
    let lb = Forwarder::new(testbed::engine(7), Arc::new(cfg));

    let dns =
        FlowKey::new(Protocol::Udp, Ipv4Addr::new(198, 51, 100, 7).into(), 5353, VIP4.into(), 53);
    let q = PacketBuilder { payload: b"query".to_vec(), ..PacketBuilder::new(dns) }.build();
    let (o, out) = run(&lb, &q);
    assert!(matches!(o, Outcome::Transmit { kind: TxKind::Forward, .. }));
    let (dst, proto, inner) = unwrap(&out);
    assert!(testbed::backends4(3).contains(&dst));
    assert_eq!((proto, inner), (PROTO_IPIP, q.clone()));

    let syn6 = PacketBuilder { hop_limit: 9, ..PacketBuilder::new(client6(40000)) }.build();
    let (o, out) = run(&lb, &syn6);
    assert_eq!(o, Outcome::Transmit { len: 14 + 40 + syn6.len(), kind: TxKind::Forward });
    let eth = EthernetFrame::new_checked(&out[..]).unwrap();
    assert_eq!(eth.ethertype(), ethertype::IPV6);
    let outer = Ipv6Packet::new_checked(eth.payload()).unwrap();
    let at = b6.iter().position(|b| *b == IpAddr::V6(outer.dst_addr())).expect("a v6 backend");
    assert_eq!(eth.dst_addr(), b6_macs[at], "the backend's own MAC, not the router's");
    assert_eq!(outer.src_addr(), "2001:db8::1".parse::<Ipv6Addr>().unwrap());
    assert_eq!((outer.next_header(), outer.hop_limit()), (PROTO_IPV6_IN_IP, 64));
    assert_eq!(outer.payload(), &syn6[..], "hop limit 9 inside, untouched");
}

#[test]
fn an_established_flow_keeps_its_backend_after_a_backend_is_added() {
    let engine = testbed::engine(7);
    let lb = Forwarder::new(engine.clone(), Arc::new(testbed::config()));
    let keys: Vec<FlowKey> = (0..200).map(|p| client4(10_000 + p)).collect();
    let first: Vec<IpAddr> =
        keys.iter().map(|k| backend_of(&lb, &packet(*k, TcpFlags::SYN, 0))).collect();

    let grown = testbed::service(
        "default/web:http",
        VIP4.into(),
        80,
        Protocol::Tcp,
        &testbed::backends4(4),
    );
    engine.upsert_service(&grown).unwrap();
    // A fresh load balancer with four backends would move some of these flows...
    let fresh = testbed::engine(7);
    fresh.upsert_service(&grown).unwrap();
    let fresh = Forwarder::new(fresh, Arc::new(testbed::config()));
    let moved = keys
        .iter()
        .zip(&first)
        .filter(|(k, b)| backend_of(&fresh, &packet(**k, TcpFlags::SYN, 0)) != **b)
        .count();
    assert!(moved > 10, "Maglev moves about a quarter of the flows: {moved}");
    // ...but the connection table keeps every established one where it was.
    for (k, b) in keys.iter().zip(&first) {
        assert_eq!(backend_of(&lb, &packet(*k, TcpFlags::ACK, 100)), *b);
    }
}

#[test]
fn two_load_balancers_with_the_same_seed_send_a_flow_to_the_same_backend() {
    let (a, b) = (testbed::forwarder(), testbed::forwarder());
    let other_seed = Forwarder::new(testbed::engine(8), Arc::new(testbed::config()));
    let mut seen = std::collections::HashSet::new();
    let mut differs = 0;
    for port in 0..300 {
        let syn = packet(client4(20_000 + port), TcpFlags::SYN, 0);
        let (oa, fa) = run(&a, &syn);
        let (ob, fb) = run(&b, &syn);
        assert_eq!((oa, &fa), (ob, &fb), "the same frame from either node");
        seen.insert(unwrap(&fa).0);
        differs += usize::from(backend_of(&other_seed, &syn) != unwrap(&fa).0);
    }
    assert_eq!(seen.len(), 3, "flows spread over every backend");
    assert!(differs > 50, "a different seed is a different table: {differs}");
}

#[test]
fn arp_requests_for_a_vip_are_answered_and_others_ignored() {
    let lb = testbed::forwarder();
    let asker = MacAddr([2, 0, 0, 0, 0, 0x42]);
    let request = |target: Ipv4Addr, op: u16| {
        let mut f = vec![0u8; 14 + 28];
        ethernet::emit_header(&mut f, MacAddr::BROADCAST, asker, ethertype::ARP).unwrap();
        let r = ArpRepr {
            operation: op,
            sender_hw: asker,
            sender_ip: Ipv4Addr::new(192, 0, 2, 254),
            target_hw: MacAddr::default(),
            target_ip: target,
        };
        r.emit(&mut f[14..]).unwrap();
        f
    };
    let mut out = [0u8; 128];
    let o = lb.process(&request(VIP4, arp::op::REQUEST), SEC, &mut out);
    assert_eq!(o, Outcome::Transmit { len: 60, kind: TxKind::ArpReply });
    let eth = EthernetFrame::new_checked(&out[..60]).unwrap();
    assert_eq!((eth.dst_addr(), eth.src_addr(), eth.ethertype()), (asker, LB_MAC, ethertype::ARP));
    let reply = ArpRepr::parse(&ArpPacket::new_checked(eth.payload()).unwrap());
    assert_eq!(
        reply,
        ArpRepr {
            operation: arp::op::REPLY,
            sender_hw: LB_MAC,
            sender_ip: VIP4,
            target_hw: asker,
            target_ip: Ipv4Addr::new(192, 0, 2, 254),
        }
    );
    let not_ours =
        lb.process(&request(Ipv4Addr::new(192, 0, 2, 1), arp::op::REQUEST), SEC, &mut out);
    assert_eq!(
        not_ours,
        Outcome::Ignore(IgnoreReason::NotAVip),
        "the node's own address is the kernel's"
    );
    let a_reply = lb.process(&request(VIP4, arp::op::REPLY), SEC, &mut out);
    assert_eq!(a_reply, Outcome::Ignore(IgnoreReason::NotAVip));
    let short = lb.process(&request(VIP4, arp::op::REQUEST)[..30], SEC, &mut out);
    assert_eq!(short, Outcome::Drop(DropReason::Malformed(WireError::Truncated)));
}

#[test]
fn neighbour_solicitations_for_an_ipv6_vip_are_answered() {
    let lb = testbed::forwarder();
    let asker: Ipv6Addr = "2001:db8::fe".parse().unwrap();
    let asker_mac = MacAddr([2, 0, 0, 0, 0, 0x43]);
    let solicit = |target: Ipv6Addr, hop_limit: u8| {
        let group = Ipv6Addr::from(
            u128::from(target) & 0xff_ffff | 0xff02_0000_0000_0000_0000_0001_ff00_0000,
        );
        let mut f = vec![0u8; 14 + 40 + 32];
        ethernet::emit_header(&mut f, MacAddr::ipv6_multicast(&group), asker_mac, ethertype::IPV6)
            .unwrap();
        let ip = Ipv6Repr {
            src_addr: asker,
            dst_addr: group,
            next_header: icmp::PROTO_ICMPV6,
            payload_len: 32,
            hop_limit,
            traffic_class: 0,
            flow_label: 0,
        };
        ip.emit(&mut f[14..]).unwrap();
        icmp::emit_neighbor_advert(&mut f[54..], &asker, &group, &target, asker_mac).unwrap();
        f[54] = icmp::ICMPV6_NEIGHBOR_SOLICIT; // same layout up to the option's type
        f
    };
    let mut out = [0u8; 256];
    let o = lb.process(&solicit(VIP6, 255), SEC, &mut out);
    assert_eq!(o, Outcome::Transmit { len: 14 + 40 + 32, kind: TxKind::NeighborAdvert });
    let eth = EthernetFrame::new_checked(&out[..86]).unwrap();
    assert_eq!((eth.dst_addr(), eth.src_addr()), (asker_mac, LB_MAC));
    let ip = Ipv6Packet::new_checked(eth.payload()).unwrap();
    assert_eq!((ip.src_addr(), ip.dst_addr(), ip.hop_limit()), (VIP6, asker, 255));
    let na = ip.payload();
    assert_eq!(
        (na[0], &na[8..24], &na[26..32]),
        (icmp::ICMPV6_NEIGHBOR_ADVERT, &VIP6.octets()[..], &LB_MAC.0[..])
    );
    assert!(icmp::icmpv6_checksum_ok(&VIP6, &asker, na));
    // A solicitation that crossed a router, or for another address, is not answered.
    assert_eq!(
        lb.process(&solicit(VIP6, 64), SEC, &mut out),
        Outcome::Ignore(IgnoreReason::NotAVip)
    );
    let other = solicit("2001:db8::1".parse().unwrap(), 255);
    assert_eq!(lb.process(&other, SEC, &mut out), Outcome::Ignore(IgnoreReason::NotAVip));
}

#[test]
fn too_big_once_encapsulated_answers_the_client_with_the_mtu_left() {
    let lb = testbed::forwarder();
    // 1481 bytes + 20 of outer header > 1500.
    let big = packet(client4(40001), TcpFlags::ACK, 1481 - 40);
    let (o, out) = run(&lb, &big);
    assert!(matches!(o, Outcome::Transmit { kind: TxKind::TooBig, .. }), "{o:?}");
    let eth = EthernetFrame::new_checked(&out[..]).unwrap();
    assert_eq!((eth.dst_addr(), eth.src_addr()), (ROUTER_MAC, LB_MAC), "back the way it came");
    let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
    assert!(ip.verify_checksum());
    assert_eq!(
        (ip.src_addr(), ip.dst_addr(), ip.protocol()),
        (VIP4, Ipv4Addr::new(198, 51, 100, 7), 1)
    );
    let icmp_msg = ip.payload();
    assert_eq!((icmp_msg[0], icmp_msg[1]), (3, 4));
    assert_eq!(u16::from_be_bytes([icmp_msg[6], icmp_msg[7]]), 1480);
    assert_eq!(wire::checksum::fold(wire::checksum::sum(icmp_msg)), 0xffff);
    assert_eq!(&icmp_msg[8..], &big[..576 - 28], "as much of the packet as 576 bytes hold");
    // 1480 fits exactly.
    let fits = packet(client4(40001), TcpFlags::ACK, 1480 - 40);
    assert!(matches!(run(&lb, &fits).0, Outcome::Transmit { kind: TxKind::Forward, .. }));

    // Without DF the client allows fragmentation, which we do not do: counted, dropped.
    let mut no_df = big.clone();
    no_df[6] = 0;
    wire::fill_checksums(&mut no_df).unwrap();
    assert_eq!(run(&lb, &no_df).0, Outcome::Drop(DropReason::TooBigDfClear));

    let big6 =
        PacketBuilder { payload: vec![1; 1461 - 60], ..PacketBuilder::new(client6(40002)) }.build();
    assert_eq!(big6.len(), 1461);
    let (o, out) = run(&lb, &big6);
    assert!(matches!(o, Outcome::Transmit { kind: TxKind::TooBig, .. }), "{o:?}");
    let eth = EthernetFrame::new_checked(&out[..]).unwrap();
    let ip = Ipv6Packet::new_checked(eth.payload()).unwrap();
    assert_eq!((ip.src_addr(), ip.next_header()), (VIP6, icmp::PROTO_ICMPV6));
    let msg = ip.payload();
    assert_eq!((msg[0], u32::from_be_bytes([msg[4], msg[5], msg[6], msg[7]])), (2, 1460));
    assert!(icmp::icmpv6_checksum_ok(&VIP6, &ip.dst_addr(), msg));
    assert!(eth.payload().len() <= icmp::IPV6_MIN_MTU);
    assert_eq!(lb.counters().tx_count(TxKind::TooBig), 2);
}

#[test]
fn malformed_frames_are_counted_by_reason_and_dropped() {
    let lb = testbed::forwarder();
    let syn = packet(client4(40003), TcpFlags::SYN, 0);
    let mut out = vec![0u8; 2048];
    let mut check = |f: &[u8], want: Outcome| assert_eq!(lb.process(f, SEC, &mut out), want);
    let drop = |e| Outcome::Drop(DropReason::Malformed(e));
    check(&frame(&syn)[..13], drop(WireError::Truncated));
    check(&frame(&syn[..30]), drop(WireError::Truncated));
    let mut bad = syn.clone();
    bad[0] = 0x44;
    check(&frame(&bad), drop(WireError::BadIhl));
    let mut bad = syn.clone();
    bad[32] = 0x10; // TCP data offset 4 words
    check(&frame(&bad), drop(WireError::BadTcpOffset));
    let mut bad = frame(&syn);
    bad[12..14].copy_from_slice(&ethertype::IPV6.to_be_bytes()); // IPv4 bytes claimed as IPv6
    check(&bad, drop(WireError::BadVersion));
    let c = lb.counters();
    assert_eq!(c.drop_count(DropReason::Malformed(WireError::Truncated)), 2);
    assert_eq!(c.drop_count(DropReason::Malformed(WireError::BadTcpOffset)), 1);
    let snap = c.snapshot();
    let get = |k: &str| snap.iter().find(|(n, _)| n == k).unwrap().1;
    assert_eq!((get("frames"), get("drops_bad_ihl"), get("drops_bad_version")), (5, 1, 1));
}

#[test]
fn what_is_not_ours_is_ignored_and_what_cannot_go_is_dropped() {
    let lb = testbed::forwarder();
    let syn = packet(client4(40004), TcpFlags::SYN, 0);
    let mut out = vec![0u8; 2048];

    let mut other_mac = frame(&syn);
    other_mac[..6].copy_from_slice(&[2, 0, 0, 0, 0, 9]);
    assert_eq!(lb.process(&other_mac, SEC, &mut out), Outcome::Ignore(IgnoreReason::OtherMac));
    let mut vlan = frame(&syn);
    vlan[12..14].copy_from_slice(&ethertype::VLAN.to_be_bytes());
    assert_eq!(lb.process(&vlan, SEC, &mut out), Outcome::Ignore(IgnoreReason::OtherEthertype));
    let node = FlowKey::new(
        Protocol::Tcp,
        Ipv4Addr::new(198, 51, 100, 7).into(),
        1,
        Ipv4Addr::new(192, 0, 2, 1).into(),
        22,
    );
    assert_eq!(run(&lb, &packet(node, TcpFlags::SYN, 0)).0, Outcome::Ignore(IgnoreReason::NotAVip));
    let mut ping = syn.clone();
    ping[9] = 1;
    wire::fill_checksums(&mut ping).unwrap();
    assert_eq!(run(&lb, &ping).0, Outcome::Ignore(IgnoreReason::UnsupportedProtocol));

    let later =
        PacketBuilder { ipv4_fragment: Some((8, false)), ..PacketBuilder::new(client4(40004)) }
            .build();
    assert_eq!(run(&lb, &later).0, Outcome::Drop(DropReason::Fragment));
    // A short transmit buffer is a counted drop, not a panic.
    assert_eq!(
        lb.process(&frame(&syn), SEC, &mut out[..60]),
        Outcome::Drop(DropReason::OutputTooSmall)
    );

    let engine = testbed::engine(7);
    engine
        .upsert_service(&testbed::service("default/web:http", VIP4.into(), 80, Protocol::Tcp, &[]))
        .unwrap();
    let empty = Forwarder::new(engine, Arc::new(testbed::config()));
    assert_eq!(run(&empty, &syn).0, Outcome::Drop(DropReason::NoEndpoints));

    let mut cfg = testbed::config();
    cfg.neighbours = Neighbours::new(None);
    let no_route = Forwarder::new(testbed::engine(7), Arc::new(cfg.clone()));
    assert_eq!(run(&no_route, &syn).0, Outcome::Drop(DropReason::NoNeighbour));
    cfg.neighbours = Neighbours::new(Some(ROUTER_MAC));
    cfg.ipv4 = None;
    let no_source = Forwarder::new(testbed::engine(7), Arc::new(cfg));
    assert_eq!(run(&no_source, &syn).0, Outcome::Drop(DropReason::NoSourceAddress));
}

#[test]
fn the_fuzz_seeds_reach_every_reply_and_forward_checksums_stay_valid() {
    let lb = testbed::forwarder();
    let mut kinds = std::collections::HashSet::new();
    for f in testbed::sample_frames() {
        let mut out = vec![0u8; 2048];
        if let Outcome::Transmit { len, kind } = lb.process(&f, SEC, &mut out) {
            kinds.insert(kind);
            if kind == TxKind::Forward {
                let (_, _, inner) = unwrap(&out[..len]);
                assert_eq!(verify_checksums(&inner), verify_checksums(&f[14..]));
            }
        }
        fuzz_frame(&f);
    }
    assert!(lb.counters().tx_count(TxKind::Forward) >= 10);
    assert!(kinds.contains(&TxKind::ArpReply) && kinds.contains(&TxKind::NeighborAdvert));
}

#[test]
fn a_partial_checksum_is_completed_on_the_forwarded_copy_only_when_flagged() {
    let lb = testbed::forwarder();
    let mut syn = packet(client4(40005), TcpFlags::SYN, 10);
    syn[36..38].copy_from_slice(&[0x12, 0x34]); // what CHECKSUM_PARTIAL leaves: not the sum
    assert_eq!(verify_checksums(&syn), Ok(false));
    let mut out = vec![0u8; 2048];
    for (partial, fixed) in [(false, false), (true, true)] {
        let o = lb.process_rx(&frame(&syn), partial, SEC, &mut out);
        let Outcome::Transmit { len, kind: TxKind::Forward } = o else { panic!("{o:?}") };
        let (_, _, inner) = unwrap(&out[..len]);
        assert_eq!(verify_checksums(&inner), Ok(fixed), "partial: {partial}");
    }
}

#[test]
fn ethernet_padding_is_not_forwarded() {
    let lb = testbed::forwarder();
    let ack = packet(client4(40006), TcpFlags::ACK, 0); // 40 bytes: padded to 60 on the wire
    let mut padded = frame(&ack);
    padded.resize(60, 0);
    let mut out = vec![0u8; 2048];
    let o = lb.process(&padded, SEC, &mut out);
    assert_eq!(o, Outcome::Transmit { len: 14 + 20 + 40, kind: TxKind::Forward });
    assert_eq!(unwrap(&out[..74]).2, ack);
}

#[test]
fn l2_direct_routing_changes_only_the_macs_and_needs_the_backends_own() {
    let mut cfg = testbed::config();
    cfg.forwarding = Forwarding::L2Dsr;
    let macs: Vec<(IpAddr, MacAddr)> = testbed::backends4(3)
        .into_iter()
        .zip((1..=3).map(|i| MacAddr([2, 0, 0, 0, 4, i])))
        .collect();
    for (ip, mac) in &macs {
        cfg.neighbours.insert(*ip, *mac);
    }
    let engine = testbed::engine(7);
    let lb = Forwarder::new(engine.clone(), Arc::new(cfg.clone()));
    let ipip = Forwarder::new(testbed::engine(7), Arc::new(testbed::config()));
    let mut syn = packet(client4(40007), TcpFlags::SYN, 0);
    let mut out = vec![0u8; 2048];
    let mut padded = frame(&syn);
    padded.extend_from_slice(&[0; 6]);
    let o = lb.process(&padded, SEC, &mut out);
    assert_eq!(o, Outcome::Transmit { len: 14 + syn.len(), kind: TxKind::Forward });
    let eth = EthernetFrame::new_checked(&out[..14 + syn.len()]).unwrap();
    assert_eq!((eth.src_addr(), eth.ethertype()), (LB_MAC, ethertype::IPV4));
    assert_eq!(eth.payload(), &syn[..], "the packet itself, TTL included, untouched");
    // The backend whose MAC it went to is the one Maglev picks with IP-in-IP too.
    let chosen = backend_of(&ipip, &syn);
    assert_eq!(Some(&eth.dst_addr()), macs.iter().find(|(ip, _)| *ip == chosen).map(|(_, m)| m));

    // A partial checksum is completed at the packet's own L4 header.
    syn[36..38].copy_from_slice(&[0x12, 0x34]);
    let o = lb.process_rx(&frame(&syn), true, SEC, &mut out);
    assert!(matches!(o, Outcome::Transmit { kind: TxKind::Forward, .. }));
    assert_eq!(verify_checksums(&out[14..14 + syn.len()]), Ok(true));

    // No entry of its own for the backend: the router's MAC would bring the VIP back here.
    cfg.neighbours = Neighbours::new(Some(ROUTER_MAC));
    let no_entry = Forwarder::new(engine, Arc::new(cfg));
    assert_eq!(
        run(&no_entry, &packet(client4(40007), TcpFlags::ACK, 0)).0,
        Outcome::Drop(DropReason::NoNeighbour)
    );
}

/// A load balancer by L2 direct routing with a MAC for each test backend.
fn l2_forwarder() -> Forwarder {
    let mut cfg = testbed::config();
    cfg.forwarding = Forwarding::L2Dsr;
    for (i, ip) in testbed::backends4(3).into_iter().enumerate() {
        cfg.neighbours.insert(ip, MacAddr([2, 0, 0, 0, 4, i as u8 + 1]));
    }
    Forwarder::new(testbed::engine(7), Arc::new(cfg))
}

/// What the kernel writes before a veth's GSO TCP frame: a super-packet of `gso_size`
/// segments with the checksum left partial at the TCP header.
fn gso_header(gso_size: u16) -> VnetHeader {
    VnetHeader {
        flags: VnetHeader::F_NEEDS_CSUM,
        gso_type: VnetHeader::GSO_TCPV4,
        hdr_len: 66,
        gso_size,
        csum_start: 14 + 20,
        csum_offset: 16,
    }
}

#[test]
fn l2_direct_routing_forwards_a_gso_frame_whole_with_its_virtio_header() {
    let lb = l2_forwarder();
    let data = packet(client4(40010), TcpFlags::ACK, 1448 * 40); // 40 segments' worth
    let mut out = vec![0u8; VnetHeader::LEN + 14 + 65_535];
    let o = lb.process_vnet(&frame(&data), Some(gso_header(1448)), SEC, &mut out);
    let len = VnetHeader::LEN + 14 + data.len();
    assert_eq!(o, Outcome::Transmit { len, kind: TxKind::Forward });
    // The offloads go on as they came (only the MACs changed, so the offsets hold).
    assert_eq!(VnetHeader::parse(&out), Some(gso_header(1448)));
    assert_eq!(&out[VnetHeader::LEN + 14..len], &data[..]);
    let to = &out[VnetHeader::LEN..VnetHeader::LEN + 6];
    assert!(to[..5] == [2, 0, 0, 0, 4] && (1..=3).contains(&to[5]), "not a backend's MAC: {to:?}");

    // Spliced: the same headers, and the packet left in the received frame to send after them.
    let mut head = vec![0u8; 64];
    let (o, body) = lb.process_vnet_spliced(&frame(&data), Some(gso_header(1448)), SEC, &mut head);
    assert_eq!((o, body), (Outcome::Transmit { len, kind: TxKind::Forward }, Some(data.len())));
    assert_eq!(head[..VnetHeader::LEN + 14], out[..VnetHeader::LEN + 14]);
    // What is made here is never spliced.
    let (o, body) = lb.process_vnet_spliced(&frame(&data), Some(gso_header(1600)), SEC, &mut out);
    assert!(matches!((o, body), (Outcome::Transmit { kind: TxKind::TooBig, .. }, None)), "{o:?}");

    // Segments that would not fit the MTU: the client is told, as for one big packet.
    let o = lb.process_vnet(&frame(&data), Some(gso_header(1600)), SEC, &mut out);
    assert!(matches!(o, Outcome::Transmit { kind: TxKind::TooBig, .. }), "{o:?}");
    assert_eq!(VnetHeader::parse(&out), Some(VnetHeader::default()));

    // A frame too big for the caller's buffer is counted and dropped.
    let mut small = vec![0u8; 2048];
    let o = lb.process_vnet(&frame(&data), Some(gso_header(1448)), SEC, &mut small);
    assert_eq!(o, Outcome::Drop(DropReason::OutputTooSmall));
    assert_eq!(lb.counters().drop_count(DropReason::OutputTooSmall), 1);
    assert_eq!(
        lb.process_vnet(&frame(&data), None, SEC, &mut [0u8; 4]),
        Outcome::Drop(DropReason::OutputTooSmall)
    );
}

#[test]
fn ip_in_ip_refuses_gso_frames_and_completes_partial_checksums() {
    let lb = testbed::forwarder();
    let data = packet(client4(40011), TcpFlags::ACK, 1448 * 4);
    let mut out = vec![0u8; VnetHeader::LEN + 14 + 65_535];
    let o = lb.process_vnet(&frame(&data), Some(gso_header(1448)), SEC, &mut out);
    assert_eq!(o, Outcome::Drop(DropReason::GsoTunnel));
    assert_eq!(lb.counters().drop_count(DropReason::GsoTunnel), 1);
    // IP-in-IP writes a new header before the packet: it is never spliced.
    let one = packet(client4(40012), TcpFlags::SYN, 0);
    let (o, body) = lb.process_vnet_spliced(&frame(&one), None, SEC, &mut out);
    assert!(matches!((o, body), (Outcome::Transmit { kind: TxKind::Forward, .. }, None)));

    // One segment with a partial checksum: completed here, and no offload passed on.
    let mut one = packet(client4(40011), TcpFlags::ACK, 100);
    one[36..38].copy_from_slice(&[0x12, 0x34]);
    let partial = VnetHeader { gso_type: VnetHeader::GSO_NONE, gso_size: 0, ..gso_header(0) };
    let o = lb.process_vnet(&frame(&one), Some(partial), SEC, &mut out);
    let Outcome::Transmit { len, kind: TxKind::Forward } = o else { panic!("{o:?}") };
    assert_eq!(VnetHeader::parse(&out), Some(VnetHeader::default()));
    let (_, proto, inner) = unwrap(&out[VnetHeader::LEN..len]);
    assert_eq!((proto, verify_checksums(&inner)), (PROTO_IPIP, Ok(true)));
}

#[test]
fn replies_made_here_carry_an_empty_virtio_header() {
    let lb = l2_forwarder();
    let arp = testbed::sample_frames().into_iter().find(|f| f[12..14] == [8, 6]).unwrap();
    let mut out = vec![0xffu8; 2048];
    let o = lb.process_vnet(&arp, Some(gso_header(1448)), SEC, &mut out);
    assert_eq!(o, Outcome::Transmit { len: VnetHeader::LEN + 60, kind: TxKind::ArpReply });
    assert_eq!(VnetHeader::parse(&out), Some(VnetHeader::default()));
}
