//! A sans-I/O codec for the kernel's conntrack messages (ctnetlink): the events a listener
//! of `NFNLGRP_CONNTRACK_NEW`/`_DESTROY` receives, the entries of a table dump, and the
//! dump request.
//!
//! ```text
//! nlmsghdr  type = NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_{NEW,DELETE}
//! nfgenmsg  { u8 family; u8 version; be16 res_id; }
//! CTA_TUPLE_ORIG  { CTA_TUPLE_IP { CTA_IP_V4_SRC | CTA_IP_V6_SRC, ..._DST },
//!                   CTA_TUPLE_PROTO { CTA_PROTO_NUM u8, CTA_PROTO_SRC_PORT be16, ..._DST_PORT } }
//! CTA_TUPLE_REPLY (same layout: after DNAT its source is the backend)
//! CTA_TIMEOUT be32 seconds, CTA_MARK be32, CTA_PROTOINFO { CTA_PROTOINFO_TCP { ..._STATE u8 } }
//! ```

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::datapath::nfqueue::consts::*;
use crate::datapath::nfqueue::netlink::{be16, finish_msg, put_attr, Attr, Attrs, NlHeader};
use crate::datapath::nfqueue::ParseError;
use crate::flow::{FlowKey, Protocol};

/// nfnetlink subsystem of conntrack.
pub const NFNL_SUBSYS_CTNETLINK: u8 = 1;
/// A new (or, outside the NEW group, updated) entry; a dump's entries use it too.
pub const IPCTNL_MSG_CT_NEW: u8 = 0;
/// `GET`: with `NLM_F_DUMP`, list the table.
pub const IPCTNL_MSG_CT_GET: u8 = 1;
/// An entry's end.
pub const IPCTNL_MSG_CT_DELETE: u8 = 2;
/// Multicast group of new entries.
pub const NFNLGRP_CONNTRACK_NEW: u32 = 1;
/// Multicast group of changed entries (a TCP state change, among others).
pub const NFNLGRP_CONNTRACK_UPDATE: u32 = 2;
/// Multicast group of ended entries.
pub const NFNLGRP_CONNTRACK_DESTROY: u32 = 3;
/// `NLM_F_ROOT | NLM_F_MATCH`.
pub const NLM_F_DUMP: u16 = 0x300;
/// Set on the event of a new entry (`NLM_F_CREATE`; with `NLM_F_EXCL`); an update has not.
pub const NLM_F_CREATE: u16 = 0x400;

const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_PROTOINFO: u16 = 4;
const CTA_TIMEOUT: u16 = 7;
const CTA_MARK: u16 = 8;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_PROTOINFO_TCP: u16 = 1;
const CTA_PROTOINFO_TCP_STATE: u16 = 1;

/// Whether the kernel reported a flow's start or its end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtEventKind {
    /// `IPCTNL_MSG_CT_NEW` with `NLM_F_CREATE`: a new entry.
    New,
    /// `IPCTNL_MSG_CT_NEW` without it: a changed entry, or an entry of a dump.
    Update,
    /// `IPCTNL_MSG_CT_DELETE`.
    Destroy,
}

/// One conntrack entry as the kernel reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtFlow {
    pub kind: CtEventKind,
    /// The original direction: client -> the address it dialled (a service frontend).
    pub original: FlowKey,
    /// Where replies come from: the backend after DNAT (the original destination without).
    pub reply_source: SocketAddr,
    /// Seconds left before the kernel times the entry out (absent in DESTROY events).
    pub timeout: Option<u32>,
    pub mark: u32,
    /// The kernel's TCP state number (`enum tcp_conntrack`; 3 = ESTABLISHED), TCP only.
    pub tcp_state: Option<u8>,
}

/// What one netlink message of a conntrack socket was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtMessage {
    /// A flow of TCP, UDP or SCTP.
    Flow(CtFlow),
    /// A flow of another protocol (ICMP, GRE, ...): nothing a service carries.
    OtherProtocol,
    /// The end of a dump.
    Done,
    /// An error (or, with 0, an acknowledgement) for a request: the negated errno.
    Error(i32),
    /// Anything else on the socket (another subsystem, an update).
    Other,
}

/// Whether a kernel TCP state is past the connection's active part: a FIN or RST was
/// seen (FIN_WAIT, CLOSE_WAIT, LAST_ACK, TIME_WAIT, CLOSE), as IPVS counts a connection
/// inactive from then on.
pub fn tcp_state_is_closing(state: u8) -> bool {
    (4..=8).contains(&state)
}

/// Kernel TCP conntrack state names, by number (`enum tcp_conntrack`).
pub fn tcp_state_name(state: u8) -> &'static str {
    match state {
        0 => "NONE",
        1 => "SYN_SENT",
        2 => "SYN_RECV",
        3 => "ESTABLISHED",
        4 => "FIN_WAIT",
        5 => "CLOSE_WAIT",
        6 => "LAST_ACK",
        7 => "TIME_WAIT",
        8 => "CLOSE",
        9 => "SYN_SENT2",
        _ => "UNKNOWN",
    }
}

/// Split a datagram into its netlink messages (header, body after the header).
pub fn messages(buf: &[u8]) -> impl Iterator<Item = Result<(NlHeader, &[u8]), ParseError>> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        if rest.len() < NLMSG_HDRLEN {
            return None;
        }
        let header = match NlHeader::parse(rest) {
            Ok(h) => h,
            Err(e) => {
                rest = &[];
                return Some(Err(e));
            }
        };
        let len = header.len as usize;
        if len < NLMSG_HDRLEN || len > rest.len() {
            let have = rest.len();
            rest = &[];
            return Some(Err(ParseError::BadMessageLength { len: header.len, have }));
        }
        let body = &rest[NLMSG_HDRLEN..len];
        rest = &rest[align4(len).min(rest.len())..];
        Some(Ok((header, body)))
    })
}

/// Decode one message of a conntrack socket.
pub fn parse_message(header: &NlHeader, body: &[u8]) -> Result<CtMessage, ParseError> {
    match header.msg_type {
        NLMSG_DONE => return Ok(CtMessage::Done),
        NLMSG_ERROR => {
            if body.len() < 4 {
                return Err(ParseError::Truncated {
                    what: "nlmsgerr",
                    needed: 4,
                    have: body.len(),
                });
            }
            return Ok(CtMessage::Error(i32::from_ne_bytes([body[0], body[1], body[2], body[3]])));
        }
        _ => {}
    }
    if (header.msg_type >> 8) as u8 != NFNL_SUBSYS_CTNETLINK {
        return Ok(CtMessage::Other);
    }
    let kind = match (header.msg_type & 0xff) as u8 {
        IPCTNL_MSG_CT_NEW if header.flags & NLM_F_CREATE != 0 => CtEventKind::New,
        IPCTNL_MSG_CT_NEW => CtEventKind::Update,
        IPCTNL_MSG_CT_DELETE => CtEventKind::Destroy,
        _ => return Ok(CtMessage::Other),
    };
    if body.len() < NFGENMSG_LEN {
        return Err(ParseError::Truncated {
            what: "nfgenmsg",
            needed: NFGENMSG_LEN,
            have: body.len(),
        });
    }
    let mut original = None;
    let mut reply = None;
    let mut timeout = None;
    let mut mark = 0;
    let mut tcp_state = None;
    for attr in Attrs::new(&body[NFGENMSG_LEN..]) {
        let attr = attr?;
        match attr.kind {
            CTA_TUPLE_ORIG => original = Some(parse_tuple(&attr)?),
            CTA_TUPLE_REPLY => reply = Some(parse_tuple(&attr)?),
            CTA_TIMEOUT => timeout = Some(attr.be32()?),
            CTA_MARK => mark = attr.be32()?,
            CTA_PROTOINFO => tcp_state = parse_tcp_state(&attr)?,
            _ => {}
        }
    }
    let original = original.ok_or(ParseError::MissingAttribute { attr: CTA_TUPLE_ORIG })?;
    let reply = reply.ok_or(ParseError::MissingAttribute { attr: CTA_TUPLE_REPLY })?;
    let (Some(original), Some(reply)) = (original, reply) else {
        return Ok(CtMessage::OtherProtocol);
    };
    Ok(CtMessage::Flow(CtFlow {
        kind,
        original,
        reply_source: SocketAddr::new(reply.src, reply.src_port),
        timeout,
        mark,
        tcp_state,
    }))
}

/// A tuple; `None` for a protocol without ports that services carry.
fn parse_tuple(attr: &Attr<'_>) -> Result<Option<FlowKey>, ParseError> {
    let (mut src, mut dst) = (None, None);
    let (mut proto, mut sport, mut dport) = (None, None, None);
    for a in attr.nested_attrs() {
        let a = a?;
        match a.kind {
            CTA_TUPLE_IP => {
                for ip in a.nested_attrs() {
                    let ip = ip?;
                    match ip.kind {
                        CTA_IP_V4_SRC => src = Some(ipv4(&ip)?),
                        CTA_IP_V4_DST => dst = Some(ipv4(&ip)?),
                        CTA_IP_V6_SRC => src = Some(ipv6(&ip)?),
                        CTA_IP_V6_DST => dst = Some(ipv6(&ip)?),
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for p in a.nested_attrs() {
                    let p = p?;
                    match p.kind {
                        CTA_PROTO_NUM => {
                            p.need(1)?;
                            proto = Some(p.data[0]);
                        }
                        CTA_PROTO_SRC_PORT => {
                            p.need(2)?;
                            sport = Some(be16(p.data, 0));
                        }
                        CTA_PROTO_DST_PORT => {
                            p.need(2)?;
                            dport = Some(be16(p.data, 0));
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    let src = src.ok_or(ParseError::MissingAttribute { attr: CTA_TUPLE_IP })?;
    let dst = dst.ok_or(ParseError::MissingAttribute { attr: CTA_TUPLE_IP })?;
    let number = proto.ok_or(ParseError::MissingAttribute { attr: CTA_TUPLE_PROTO })?;
    let Some(proto) = Protocol::from_number(number) else { return Ok(None) };
    let (Some(sport), Some(dport)) = (sport, dport) else {
        return Err(ParseError::MissingAttribute { attr: CTA_PROTO_SRC_PORT });
    };
    Ok(Some(FlowKey::new(proto, src, sport, dst, dport)))
}

fn ipv4(a: &Attr<'_>) -> Result<IpAddr, ParseError> {
    a.need(4)?;
    Ok(IpAddr::V4(Ipv4Addr::new(a.data[0], a.data[1], a.data[2], a.data[3])))
}

fn ipv6(a: &Attr<'_>) -> Result<IpAddr, ParseError> {
    a.need(16)?;
    let mut b = [0u8; 16];
    b.copy_from_slice(&a.data[..16]);
    Ok(IpAddr::V6(Ipv6Addr::from(b)))
}

fn parse_tcp_state(attr: &Attr<'_>) -> Result<Option<u8>, ParseError> {
    for a in attr.nested_attrs() {
        let a = a?;
        if a.kind != CTA_PROTOINFO_TCP {
            continue;
        }
        for t in a.nested_attrs() {
            let t = t?;
            if t.kind == CTA_PROTOINFO_TCP_STATE {
                t.need(1)?;
                return Ok(Some(t.data[0]));
            }
        }
    }
    Ok(None)
}

/// A request to list the whole table, both families.
pub fn dump_request(seq: u32) -> Vec<u8> {
    let mut buf = Vec::with_capacity(NLMSG_HDRLEN + NFGENMSG_LEN);
    let msg_type = u16::from(NFNL_SUBSYS_CTNETLINK) << 8 | u16::from(IPCTNL_MSG_CT_GET);
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.extend_from_slice(&msg_type.to_ne_bytes());
    buf.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.extend_from_slice(&[AF_UNSPEC, NFNETLINK_V0, 0, 0]);
    finish_msg(&mut buf, 0);
    buf
}

/// Encode one entry as the kernel would (for tests and fuzzing of the parser).
pub fn encode_flow(flow: &CtFlow, seq: u32) -> Vec<u8> {
    let mut buf = Vec::new();
    let (kind, flags) = match flow.kind {
        CtEventKind::New => (IPCTNL_MSG_CT_NEW, NLM_F_CREATE | 0x200),
        CtEventKind::Update => (IPCTNL_MSG_CT_NEW, 0),
        CtEventKind::Destroy => (IPCTNL_MSG_CT_DELETE, 0),
    };
    let msg_type = u16::from(NFNL_SUBSYS_CTNETLINK) << 8 | u16::from(kind);
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.extend_from_slice(&msg_type.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    let family = if flow.original.src.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    buf.extend_from_slice(&[family as u8, NFNETLINK_V0, 0, 0]);
    let reply = FlowKey::new(
        flow.original.proto,
        flow.reply_source.ip(),
        flow.reply_source.port(),
        flow.original.src,
        flow.original.src_port,
    );
    put_attr(&mut buf, CTA_TUPLE_ORIG | NLA_F_NESTED, &encode_tuple(&flow.original));
    put_attr(&mut buf, CTA_TUPLE_REPLY | NLA_F_NESTED, &encode_tuple(&reply));
    if let Some(t) = flow.timeout {
        put_attr(&mut buf, CTA_TIMEOUT, &t.to_be_bytes());
    }
    put_attr(&mut buf, CTA_MARK, &flow.mark.to_be_bytes());
    if let Some(state) = flow.tcp_state {
        let mut tcp = Vec::new();
        put_attr(&mut tcp, CTA_PROTOINFO_TCP_STATE, &[state]);
        let mut info = Vec::new();
        put_attr(&mut info, CTA_PROTOINFO_TCP | NLA_F_NESTED, &tcp);
        put_attr(&mut buf, CTA_PROTOINFO | NLA_F_NESTED, &info);
    }
    finish_msg(&mut buf, 0);
    buf
}

fn encode_tuple(key: &FlowKey) -> Vec<u8> {
    let mut ip = Vec::new();
    match (key.src, key.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            put_attr(&mut ip, CTA_IP_V4_SRC, &s.octets());
            put_attr(&mut ip, CTA_IP_V4_DST, &d.octets());
        }
        (s, d) => {
            put_attr(&mut ip, CTA_IP_V6_SRC, &v6(s).octets());
            put_attr(&mut ip, CTA_IP_V6_DST, &v6(d).octets());
        }
    }
    let mut proto = Vec::new();
    put_attr(&mut proto, CTA_PROTO_NUM, &[key.proto.number()]);
    put_attr(&mut proto, CTA_PROTO_SRC_PORT, &key.src_port.to_be_bytes());
    put_attr(&mut proto, CTA_PROTO_DST_PORT, &key.dst_port.to_be_bytes());
    let mut tuple = Vec::new();
    put_attr(&mut tuple, CTA_TUPLE_IP | NLA_F_NESTED, &ip);
    put_attr(&mut tuple, CTA_TUPLE_PROTO | NLA_F_NESTED, &proto);
    tuple
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(kind: CtEventKind) -> CtFlow {
        CtFlow {
            kind,
            original: FlowKey::new(
                Protocol::Tcp,
                "10.244.0.101".parse().unwrap(),
                40000,
                "10.96.0.10".parse().unwrap(),
                80,
            ),
            reply_source: "10.244.0.11:8080".parse().unwrap(),
            timeout: Some(120),
            mark: 0x0003_0000,
            tcp_state: Some(1),
        }
    }

    fn parse_one(buf: &[u8]) -> Result<CtMessage, ParseError> {
        let mut it = messages(buf);
        let (h, body) = it.next().unwrap()?;
        assert!(it.next().is_none());
        parse_message(&h, body)
    }

    #[test]
    fn events_round_trip_both_families() {
        for kind in [CtEventKind::New, CtEventKind::Update, CtEventKind::Destroy] {
            let f = flow(kind);
            assert_eq!(parse_one(&encode_flow(&f, 7)).unwrap(), CtMessage::Flow(f));
        }
        let mut f6 = flow(CtEventKind::New);
        f6.original = FlowKey::new(
            Protocol::Udp,
            "fd00:10:244::101".parse().unwrap(),
            5353,
            "fd00:96::10".parse().unwrap(),
            53,
        );
        f6.reply_source = "[fd00:10:244::11]:5353".parse().unwrap();
        f6.tcp_state = None;
        assert_eq!(parse_one(&encode_flow(&f6, 1)).unwrap(), CtMessage::Flow(f6));
    }

    #[test]
    fn several_messages_in_one_datagram() {
        let mut buf = encode_flow(&flow(CtEventKind::New), 1);
        buf.extend(encode_flow(&flow(CtEventKind::Destroy), 2));
        let kinds: Vec<_> = messages(&buf)
            .map(|m| {
                let (h, b) = m.unwrap();
                match parse_message(&h, b).unwrap() {
                    CtMessage::Flow(f) => f.kind,
                    other => panic!("{other:?}"),
                }
            })
            .collect();
        assert_eq!(kinds, [CtEventKind::New, CtEventKind::Destroy]);
    }

    #[test]
    fn a_dump_request_asks_for_every_family() {
        let req = dump_request(9);
        let (h, body) = messages(&req).next().unwrap().unwrap();
        assert_eq!(h.msg_type, 1 << 8 | 1);
        assert_eq!(h.flags, NLM_F_REQUEST | NLM_F_DUMP);
        assert_eq!(h.seq, 9);
        assert_eq!(body, [AF_UNSPEC, NFNETLINK_V0, 0, 0]);
    }

    #[test]
    fn done_errors_and_other_subsystems() {
        let mut done = Vec::new();
        done.extend_from_slice(&20u32.to_ne_bytes());
        done.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
        done.extend_from_slice(&[0u8; 14]);
        assert_eq!(parse_one(&done).unwrap(), CtMessage::Done);
        let mut err = Vec::new();
        err.extend_from_slice(&20u32.to_ne_bytes());
        err.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        err.extend_from_slice(&[0u8; 10]);
        err.extend_from_slice(&(-1i32).to_ne_bytes());
        assert_eq!(parse_one(&err).unwrap(), CtMessage::Error(-1));
        let mut queue = encode_flow(&flow(CtEventKind::New), 1);
        queue[5] = 3; // the queue subsystem
        assert_eq!(parse_one(&queue).unwrap(), CtMessage::Other);
    }

    #[test]
    fn icmp_flows_are_not_service_flows() {
        let mut buf = encode_flow(&flow(CtEventKind::New), 1);
        // The protocol number attribute's payload: the first 6 after the tuple IPs.
        let at = buf.windows(5).position(|w| w == [5, 0, 1, 0, 6]).unwrap();
        buf[at + 4] = 1;
        let rat = buf.windows(5).rposition(|w| w == [5, 0, 1, 0, 6]).unwrap();
        buf[rat + 4] = 1;
        assert_eq!(parse_one(&buf).unwrap(), CtMessage::OtherProtocol);
    }

    #[test]
    fn mutated_messages_never_panic() {
        // Deterministic xorshift: flip bytes of real events (both families, every kind),
        // lengths included, and parse whatever comes out.
        let mut seeds = vec![encode_flow(&flow(CtEventKind::New), 1)];
        let mut f6 = flow(CtEventKind::Destroy);
        f6.original.src = "fd00::1".parse().unwrap();
        f6.original.dst = "fd00::2".parse().unwrap();
        seeds.push(encode_flow(&f6, 2));
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for i in 0..50_000 {
            let mut buf = seeds[i % seeds.len()].clone();
            for _ in 0..1 + next() % 4 {
                let at = (next() % buf.len() as u64) as usize;
                buf[at] = next() as u8;
            }
            if next() % 4 == 0 {
                buf.truncate((next() % buf.len() as u64) as usize);
            }
            for (h, b) in messages(&buf).flatten() {
                let _ = parse_message(&h, b);
            }
        }
    }

    #[test]
    fn every_truncation_is_an_error_never_a_panic() {
        let full = encode_flow(&flow(CtEventKind::New), 1);
        for cut in 0..full.len() {
            let mut buf = full[..cut].to_vec();
            if buf.len() >= 4 {
                let len = buf.len() as u32;
                buf[..4].copy_from_slice(&len.to_ne_bytes());
            }
            for (h, b) in messages(&buf).flatten() {
                let _ = parse_message(&h, b);
            }
        }
        // A missing reply tuple is named.
        let mut f = flow(CtEventKind::New);
        f.timeout = None;
        let buf = encode_flow(&f, 1);
        let orig_len = u16::from_ne_bytes([buf[20], buf[21]]) as usize;
        let mut cut = buf[..20 + orig_len].to_vec();
        let len = cut.len() as u32;
        cut[..4].copy_from_slice(&len.to_ne_bytes());
        assert_eq!(parse_one(&cut), Err(ParseError::MissingAttribute { attr: CTA_TUPLE_REPLY }));
    }
}
