//! A sans-I/O codec for nfnetlink_queue messages: building and parsing NFQUEUE config,
//! packet and verdict messages on top of the [netlink framing](super::netlink).
//!
//! Nothing here does I/O or calls libc: encoders append complete netlink messages to a
//! caller-owned `Vec<u8>` (reuse it with `clear()` and steady state allocates nothing),
//! and the parser walks a receive buffer that somebody else filled, borrowing from it
//! ([`Packet::payload`] is a slice of that buffer, never a copy).
//!
//! Wire layout (all netlink headers are in host byte order, every nfnetlink_queue value
//! inside an attribute is big-endian):
//!
//! ```text
//! struct nlmsghdr  { u32 len; u16 type; u16 flags; u32 seq; u32 pid; }   16 bytes
//! struct nfgenmsg  { u8 family; u8 version; be16 res_id /* queue number */ } 4 bytes
//! struct nlattr    { u16 len; u16 type; } + payload, padded to 4 bytes  (repeated)
//! ```
//!
//! `type` of an nfnetlink message is `(NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_*`.
//! Constants are those of `linux/netlink.h`, `linux/netfilter/nfnetlink.h` and
//! `linux/netfilter/nfnetlink_queue.h`.
//!
//! The parser never panics: malformed input yields a [`ParseError`]. A malformed netlink
//! *header* ends iteration over the buffer (the next message cannot be located); a
//! malformed message *body* yields an error for that message and iteration goes on.
//!
//! # Example
//!
//! A queued packet as the kernel sends it, parsed; then its verdict (accept, with a mark
//! naming backend 1 in the upper 16 bits), built and read back:
//!
//! ```
//! use fastpath::datapath::nfqueue::codec::{messages, put_packet, put_verdict, Message, Packet, Verdict};
//! use fastpath::datapath::nfqueue::consts::NF_ACCEPT;
//!
//! let queued = Packet {
//!     queue: 3, family: 2, id: 42, hw_protocol: 0x0800, hook: 1, payload: &[0x45, 0, 0, 20],
//!     mark: None, skb_info: 0, cap_len: None, indev: None, outdev: None, ct_info: None,
//!     uid: None, gid: None,
//! };
//! let mut from_kernel = Vec::new();
//! put_packet(&mut from_kernel, &queued);
//! let Some(Ok(Message::Packet(p))) = messages(&from_kernel).next() else { panic!() };
//! assert_eq!((p.queue, p.id, p.payload), (3, 42, &[0x45, 0, 0, 20][..]));
//!
//! let mut to_kernel = Vec::new();
//! assert_eq!(put_verdict(&mut to_kernel, p.queue, p.id, Verdict::Accept, Some(1 << 16)), 40);
//! let Some(Ok(Message::Verdict(v))) = messages(&to_kernel).next() else { panic!() };
//! assert_eq!((v.queue, v.id, v.verdict, v.mark), (3, 42, NF_ACCEPT, Some(1 << 16)));
//! ```

use super::consts::*;
pub use super::netlink::ParseError;
use super::netlink::{be16, be32, finish_msg, ne16, ne32, put_attr, Attrs, NlHeader};

// ---------------------------------------------------------------------------------------
// Decoded messages
// ---------------------------------------------------------------------------------------

/// An `NFQNL_MSG_PACKET`: one queued packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet<'a> {
    /// Queue number (`nfgenmsg.res_id`).
    pub queue: u16,
    /// Protocol family (`nfgenmsg.nfgen_family`: 2 = IPv4, 10 = IPv6).
    pub family: u8,
    /// `packet_id`: the id to give a verdict for.
    pub id: u32,
    /// `hw_protocol` (ethertype, host order here: 0x0800 for IPv4).
    pub hw_protocol: u16,
    /// Netfilter hook (`NF_INET_LOCAL_OUT` = 3, ...).
    pub hook: u8,
    /// The packet from its network header on, at most the copy range; empty when absent.
    pub payload: &'a [u8],
    /// `NFQA_MARK`: the skb mark, sent when non-zero.
    pub mark: Option<u32>,
    /// `NFQA_SKB_INFO` flags (`NFQA_SKB_*`), 0 when absent.
    pub skb_info: u32,
    /// `NFQA_CAP_LEN`: full packet length, sent when the payload was cut.
    pub cap_len: Option<u32>,
    /// `NFQA_IFINDEX_INDEV`.
    pub indev: Option<u32>,
    /// `NFQA_IFINDEX_OUTDEV`.
    pub outdev: Option<u32>,
    /// `NFQA_CT_INFO` (`enum ip_conntrack_info`).
    pub ct_info: Option<u32>,
    /// `NFQA_UID`.
    pub uid: Option<u32>,
    /// `NFQA_GID`.
    pub gid: Option<u32>,
}

impl Packet<'_> {
    /// The kernel handed over a GSO super-packet (only with `NFQA_CFG_F_GSO`).
    pub fn is_gso(&self) -> bool {
        self.skb_info & NFQA_SKB_GSO != 0
    }

    /// Checksums are not filled in yet (offload); do not validate them.
    pub fn csum_not_ready(&self) -> bool {
        self.skb_info & NFQA_SKB_CSUMNOTREADY != 0
    }

    /// The payload is shorter than the packet (copy range or GSO).
    pub fn is_cut(&self) -> bool {
        matches!(self.cap_len, Some(n) if n as usize > self.payload.len())
    }
}

/// An `NFQNL_MSG_VERDICT` or `NFQNL_MSG_VERDICT_BATCH` (what we send; decoded for tests
/// and for round trips).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerdictMsg {
    /// Queue number.
    pub queue: u16,
    /// `NFQNL_MSG_VERDICT_BATCH`: applies to every queued id `<= id`.
    pub batch: bool,
    /// Packet id.
    pub id: u32,
    /// Raw verdict (`NF_ACCEPT`, `NF_DROP`, ...).
    pub verdict: u32,
    /// New skb mark.
    pub mark: Option<u32>,
}

/// `struct nfqnl_msg_config_cmd`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CfgCmd {
    /// `NFQNL_CFG_CMD_*`.
    pub command: u8,
    /// Protocol family (ignored by `BIND` / `UNBIND`).
    pub pf: u16,
}

impl CfgCmd {
    /// Bind the queue to this socket.
    pub const BIND: CfgCmd = CfgCmd { command: NFQNL_CFG_CMD_BIND, pf: 0 };
    /// Unbind the queue.
    pub const UNBIND: CfgCmd = CfgCmd { command: NFQNL_CFG_CMD_UNBIND, pf: 0 };
}

/// `struct nfqnl_msg_config_params`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopyParams {
    /// `NFQNL_COPY_*`.
    pub mode: u8,
    /// Bytes of payload to copy (0 or too large: the kernel uses `NFQNL_MAX_COPY_RANGE`).
    pub range: u32,
}

impl CopyParams {
    /// `NFQNL_COPY_PACKET` with `range` bytes.
    pub const fn packet(range: u32) -> CopyParams {
        CopyParams { mode: NFQNL_COPY_PACKET, range }
    }
}

/// `NFQA_CFG_FLAGS` + `NFQA_CFG_MASK`: set the bits of `mask` to those of `value`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CfgFlags {
    /// New values.
    pub value: u32,
    /// Which bits to change.
    pub mask: u32,
}

impl CfgFlags {
    /// Turn `flag` on or off (and include it in the mask).
    pub const fn with(self, flag: u32, on: bool) -> CfgFlags {
        CfgFlags {
            value: if on { self.value | flag } else { self.value & !flag },
            mask: self.mask | flag,
        }
    }
}

/// An `NFQNL_MSG_CONFIG` request: every part is optional; the kernel applies the command
/// first, then params, max length and flags, and checks the flags before anything.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConfigRequest {
    /// `NFQA_CFG_CMD`.
    pub cmd: Option<CfgCmd>,
    /// `NFQA_CFG_PARAMS`.
    pub params: Option<CopyParams>,
    /// `NFQA_CFG_QUEUE_MAXLEN`: packets waiting for a verdict before the queue is full.
    pub max_len: Option<u32>,
    /// `NFQA_CFG_FLAGS` + `NFQA_CFG_MASK`.
    pub flags: Option<CfgFlags>,
}

/// An `NFQNL_MSG_CONFIG` decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConfigMsg {
    /// Queue number.
    pub queue: u16,
    /// The request.
    pub req: ConfigRequest,
}

/// An `NLMSG_ERROR`: an ack when `errno == 0`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ack {
    /// Positive errno (the wire carries it negated); 0 for a plain ack.
    pub errno: i32,
    /// Sequence number of the request it answers.
    pub seq: u32,
    /// `nlmsg_type` of the request, when echoed.
    pub orig_type: Option<u16>,
}

impl Ack {
    /// Success.
    pub fn is_ok(&self) -> bool {
        self.errno == 0
    }
}

/// One decoded netlink message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Message<'a> {
    /// A queued packet.
    Packet(Packet<'a>),
    /// A verdict (normally only seen in tests).
    Verdict(VerdictMsg),
    /// A queue configuration (normally only seen in tests).
    Config(ConfigMsg),
    /// `NLMSG_ERROR`: an error or an ack.
    Ack(Ack),
    /// `NLMSG_DONE`.
    Done,
    /// Anything else (`NLMSG_NOOP`, `NLMSG_OVERRUN`, other nfnetlink messages).
    Other {
        /// `nlmsg_type`.
        msg_type: u16,
        /// `nlmsg_seq`.
        seq: u32,
        /// The body after the netlink header.
        body: &'a [u8],
    },
}

// ---------------------------------------------------------------------------------------
// Parser
// ---------------------------------------------------------------------------------------

/// Iterate over the netlink messages in one receive buffer (one datagram).
pub fn messages(buf: &[u8]) -> Messages<'_> {
    Messages { buf }
}

/// Iterator over the messages of a buffer; see [`messages`].
#[derive(Clone, Debug)]
pub struct Messages<'a> {
    buf: &'a [u8],
}

impl<'a> Iterator for Messages<'a> {
    type Item = Result<Message<'a>, ParseError>;

    fn next(&mut self) -> Option<Self::Item> {
        let buf = self.buf;
        if buf.is_empty() {
            return None;
        }
        let hdr = match NlHeader::parse(buf) {
            Ok(h) => h,
            Err(e) => {
                self.buf = &[];
                return Some(Err(e));
            }
        };
        let len = hdr.len as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            self.buf = &[];
            return Some(Err(ParseError::BadMessageLength { len: hdr.len, have: buf.len() }));
        }
        self.buf = &buf[align4(len).min(buf.len())..];
        Some(parse_body(&hdr, &buf[NLMSG_HDRLEN..len]))
    }
}

/// Parse one message whose header is `hdr` and body `body` (after the netlink header).
pub fn parse_body<'a>(hdr: &NlHeader, body: &'a [u8]) -> Result<Message<'a>, ParseError> {
    match hdr.msg_type {
        NLMSG_ERROR => {
            if body.len() < 4 {
                return Err(ParseError::Truncated {
                    what: "nlmsgerr",
                    needed: 4,
                    have: body.len(),
                });
            }
            let code = ne32(body, 0) as i32;
            let orig_type = if body.len() >= 4 + NLMSG_HDRLEN { Some(ne16(body, 8)) } else { None };
            Ok(Message::Ack(Ack { errno: code.wrapping_neg(), seq: hdr.seq, orig_type }))
        }
        NLMSG_DONE => Ok(Message::Done),
        t if (t >> 8) as u8 == NFNL_SUBSYS_QUEUE => {
            if body.len() < NFGENMSG_LEN {
                return Err(ParseError::Truncated {
                    what: "nfgenmsg",
                    needed: NFGENMSG_LEN,
                    have: body.len(),
                });
            }
            let family = body[0];
            let queue = be16(body, 2);
            let attrs = Attrs::new(&body[NFGENMSG_LEN..]);
            match (t & 0xff) as u8 {
                NFQNL_MSG_PACKET => parse_packet(queue, family, attrs).map(Message::Packet),
                NFQNL_MSG_VERDICT => parse_verdict(queue, false, attrs).map(Message::Verdict),
                NFQNL_MSG_VERDICT_BATCH => parse_verdict(queue, true, attrs).map(Message::Verdict),
                NFQNL_MSG_CONFIG => parse_config(queue, attrs).map(Message::Config),
                _ => Ok(Message::Other { msg_type: t, seq: hdr.seq, body }),
            }
        }
        t => Ok(Message::Other { msg_type: t, seq: hdr.seq, body }),
    }
}

fn parse_packet(queue: u16, family: u8, attrs: Attrs<'_>) -> Result<Packet<'_>, ParseError> {
    let mut hdr: Option<(u32, u16, u8)> = None;
    let mut p = Packet {
        queue,
        family,
        id: 0,
        hw_protocol: 0,
        hook: 0,
        payload: &[],
        mark: None,
        skb_info: 0,
        cap_len: None,
        indev: None,
        outdev: None,
        ct_info: None,
        uid: None,
        gid: None,
    };
    for a in attrs {
        let a = a?;
        match a.kind {
            NFQA_PACKET_HDR => {
                a.need(7)?;
                hdr = Some((be32(a.data, 0), be16(a.data, 4), a.data[6]));
            }
            NFQA_PAYLOAD => p.payload = a.data,
            NFQA_MARK => p.mark = Some(a.be32()?),
            NFQA_SKB_INFO => p.skb_info = a.be32()?,
            NFQA_CAP_LEN => p.cap_len = Some(a.be32()?),
            NFQA_IFINDEX_INDEV => p.indev = Some(a.be32()?),
            NFQA_IFINDEX_OUTDEV => p.outdev = Some(a.be32()?),
            NFQA_CT_INFO => p.ct_info = Some(a.be32()?),
            NFQA_UID => p.uid = Some(a.be32()?),
            NFQA_GID => p.gid = Some(a.be32()?),
            _ => {}
        }
    }
    let (id, hw_protocol, hook) =
        hdr.ok_or(ParseError::MissingAttribute { attr: NFQA_PACKET_HDR })?;
    p.id = id;
    p.hw_protocol = hw_protocol;
    p.hook = hook;
    Ok(p)
}

fn parse_verdict(queue: u16, batch: bool, attrs: Attrs<'_>) -> Result<VerdictMsg, ParseError> {
    let mut vh: Option<(u32, u32)> = None;
    let mut mark = None;
    for a in attrs {
        let a = a?;
        match a.kind {
            NFQA_VERDICT_HDR => {
                a.need(8)?;
                vh = Some((be32(a.data, 0), be32(a.data, 4)));
            }
            NFQA_MARK => mark = Some(a.be32()?),
            _ => {}
        }
    }
    let (verdict, id) = vh.ok_or(ParseError::MissingAttribute { attr: NFQA_VERDICT_HDR })?;
    Ok(VerdictMsg { queue, batch, id, verdict, mark })
}

fn parse_config(queue: u16, attrs: Attrs<'_>) -> Result<ConfigMsg, ParseError> {
    let mut req = ConfigRequest::default();
    let mut value = None;
    let mut mask = None;
    for a in attrs {
        let a = a?;
        match a.kind {
            NFQA_CFG_CMD => {
                a.need(4)?;
                req.cmd = Some(CfgCmd { command: a.data[0], pf: be16(a.data, 2) });
            }
            NFQA_CFG_PARAMS => {
                a.need(5)?;
                req.params = Some(CopyParams { range: be32(a.data, 0), mode: a.data[4] });
            }
            NFQA_CFG_QUEUE_MAXLEN => req.max_len = Some(a.be32()?),
            NFQA_CFG_FLAGS => value = Some(a.be32()?),
            NFQA_CFG_MASK => mask = Some(a.be32()?),
            _ => {}
        }
    }
    if value.is_some() || mask.is_some() {
        req.flags = Some(CfgFlags { value: value.unwrap_or(0), mask: mask.unwrap_or(0) });
    }
    Ok(ConfigMsg { queue, req })
}

// ---------------------------------------------------------------------------------------
// Encoders
// ---------------------------------------------------------------------------------------

/// What to do with a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// `NF_DROP`.
    Drop,
    /// `NF_ACCEPT`: continue with the next hook function.
    Accept,
}

impl Verdict {
    /// The `NF_*` value.
    pub const fn raw(self) -> u32 {
        match self {
            Verdict::Drop => NF_DROP,
            Verdict::Accept => NF_ACCEPT,
        }
    }
}

/// Append the netlink + nfgenmsg header of a message; returns its start (for
/// [`finish_msg`]).
fn start_msg(buf: &mut Vec<u8>, msg: u8, flags: u16, seq: u32, queue: u16) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&0u32.to_ne_bytes()); // length, filled in by finish_msg
    buf.extend_from_slice(&nfq_msg_type(msg).to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes()); // pid 0: the kernel fills in ours
    buf.extend_from_slice(&[AF_UNSPEC, NFNETLINK_V0]);
    buf.extend_from_slice(&queue.to_be_bytes());
    start
}

/// Append an `NFQNL_MSG_CONFIG` for `queue`. With `ack`, the kernel answers with an
/// `NLMSG_ERROR` carrying `seq` (errno 0 on success). Returns the bytes appended.
pub fn put_config(
    buf: &mut Vec<u8>,
    seq: u32,
    queue: u16,
    req: &ConfigRequest,
    ack: bool,
) -> usize {
    let flags = NLM_F_REQUEST | if ack { NLM_F_ACK } else { 0 };
    let start = start_msg(buf, NFQNL_MSG_CONFIG, flags, seq, queue);
    if let Some(c) = req.cmd {
        let pf = c.pf.to_be_bytes();
        put_attr(buf, NFQA_CFG_CMD, &[c.command, 0, pf[0], pf[1]]);
    }
    if let Some(p) = req.params {
        let r = p.range.to_be_bytes();
        put_attr(buf, NFQA_CFG_PARAMS, &[r[0], r[1], r[2], r[3], p.mode]);
    }
    if let Some(m) = req.max_len {
        put_attr(buf, NFQA_CFG_QUEUE_MAXLEN, &m.to_be_bytes());
    }
    if let Some(f) = req.flags {
        // The kernel rejects FLAGS without MASK (EINVAL).
        put_attr(buf, NFQA_CFG_FLAGS, &f.value.to_be_bytes());
        put_attr(buf, NFQA_CFG_MASK, &f.mask.to_be_bytes());
    }
    finish_msg(buf, start);
    buf.len() - start
}

#[inline]
fn put_verdict_msg(
    buf: &mut Vec<u8>,
    msg: u8,
    queue: u16,
    id: u32,
    verdict: u32,
    mark: Option<u32>,
) -> usize {
    // Assembled on the stack and appended at once: this runs once per packet.
    let mut m = [0u8; VERDICT_MSG_MAX_LEN];
    let len = if mark.is_some() { VERDICT_MSG_MAX_LEN } else { VERDICT_MSG_MAX_LEN - 8 };
    m[0..4].copy_from_slice(&(len as u32).to_ne_bytes());
    m[4..6].copy_from_slice(&nfq_msg_type(msg).to_ne_bytes());
    m[6..8].copy_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    // seq 8..12 and pid 12..16 stay 0
    m[16] = AF_UNSPEC;
    m[17] = NFNETLINK_V0;
    m[18..20].copy_from_slice(&queue.to_be_bytes());
    m[20..22].copy_from_slice(&((NLA_HDRLEN + 8) as u16).to_ne_bytes());
    m[22..24].copy_from_slice(&NFQA_VERDICT_HDR.to_ne_bytes());
    m[24..28].copy_from_slice(&verdict.to_be_bytes());
    m[28..32].copy_from_slice(&id.to_be_bytes());
    if let Some(mark) = mark {
        m[32..34].copy_from_slice(&((NLA_HDRLEN + 4) as u16).to_ne_bytes());
        m[34..36].copy_from_slice(&NFQA_MARK.to_ne_bytes());
        m[36..40].copy_from_slice(&mark.to_be_bytes());
    }
    buf.extend_from_slice(&m[..len]);
    len
}

/// Append an `NFQNL_MSG_VERDICT` for packet `id` of `queue`, optionally setting the skb
/// mark. No ack is asked for; the kernel still reports failures (e.g. `ENOENT` for an
/// unknown id) as `NLMSG_ERROR`. Returns the bytes appended (32, or 40 with a mark).
pub fn put_verdict(
    buf: &mut Vec<u8>,
    queue: u16,
    id: u32,
    verdict: Verdict,
    mark: Option<u32>,
) -> usize {
    put_verdict_msg(buf, NFQNL_MSG_VERDICT, queue, id, verdict.raw(), mark)
}

/// Append an `NFQNL_MSG_VERDICT_BATCH`: `verdict` (and `mark`) for every packet of
/// `queue` still waiting with an id `<= max_id` (wrap-around safe in the kernel).
pub fn put_verdict_batch(
    buf: &mut Vec<u8>,
    queue: u16,
    max_id: u32,
    verdict: Verdict,
    mark: Option<u32>,
) -> usize {
    put_verdict_msg(buf, NFQNL_MSG_VERDICT_BATCH, queue, max_id, verdict.raw(), mark)
}

/// Append a message in the kernel's `NFQNL_MSG_PACKET` format (for tests and fakes).
pub fn put_packet(buf: &mut Vec<u8>, p: &Packet<'_>) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.extend_from_slice(&nfq_msg_type(NFQNL_MSG_PACKET).to_ne_bytes());
    buf.extend_from_slice(&0u16.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.extend_from_slice(&[p.family, NFNETLINK_V0]);
    buf.extend_from_slice(&p.queue.to_be_bytes());
    let id = p.id.to_be_bytes();
    let hw = p.hw_protocol.to_be_bytes();
    put_attr(buf, NFQA_PACKET_HDR, &[id[0], id[1], id[2], id[3], hw[0], hw[1], p.hook]);
    if let Some(m) = p.mark {
        put_attr(buf, NFQA_MARK, &m.to_be_bytes());
    }
    for (kind, v) in [
        (NFQA_IFINDEX_INDEV, p.indev),
        (NFQA_IFINDEX_OUTDEV, p.outdev),
        (NFQA_CT_INFO, p.ct_info),
        (NFQA_UID, p.uid),
        (NFQA_GID, p.gid),
        (NFQA_CAP_LEN, p.cap_len),
    ] {
        if let Some(v) = v {
            put_attr(buf, kind, &v.to_be_bytes());
        }
    }
    if p.skb_info != 0 {
        put_attr(buf, NFQA_SKB_INFO, &p.skb_info.to_be_bytes());
    }
    if !p.payload.is_empty() {
        put_attr(buf, NFQA_PAYLOAD, p.payload);
    }
    finish_msg(buf, start);
    buf.len() - start
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// An nlmsghdr in host order, as the kernel writes it.
    fn nlhdr(len: u32, ty: u16, flags: u16, seq: u32, pid: u32) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&len.to_ne_bytes());
        v.extend_from_slice(&ty.to_ne_bytes());
        v.extend_from_slice(&flags.to_ne_bytes());
        v.extend_from_slice(&seq.to_ne_bytes());
        v.extend_from_slice(&pid.to_ne_bytes());
        v
    }

    fn attr(kind: u16, data: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
        v.extend_from_slice(&kind.to_ne_bytes());
        v.extend_from_slice(data);
        while v.len() % 4 != 0 {
            v.push(0);
        }
        v
    }

    /// A hand-assembled NFQNL_MSG_PACKET like the kernel sends for a UDP datagram.
    fn kernel_packet(queue: u16, id: u32, payload: &[u8], extra: &[Vec<u8>]) -> Vec<u8> {
        let mut body = vec![2u8, 0]; // AF_INET, v0
        body.extend_from_slice(&queue.to_be_bytes());
        let mut ph = id.to_be_bytes().to_vec();
        ph.extend_from_slice(&0x0800u16.to_be_bytes());
        ph.push(3); // NF_INET_LOCAL_OUT
        body.extend(attr(NFQA_PACKET_HDR, &ph));
        for e in extra {
            body.extend_from_slice(e);
        }
        body.extend(attr(NFQA_PAYLOAD, payload));
        let mut m = nlhdr((16 + body.len()) as u32, 0x0300, 0, 0, 0);
        m.extend(body);
        m
    }

    fn only(buf: &[u8]) -> Message<'_> {
        let v: Vec<_> = messages(buf).collect();
        assert_eq!(v.len(), 1, "{v:?}");
        v[0].unwrap()
    }

    #[test]
    fn constants_match_uapi() {
        assert_eq!(nfq_msg_type(NFQNL_MSG_PACKET), 0x0300);
        assert_eq!(nfq_msg_type(NFQNL_MSG_VERDICT), 0x0301);
        assert_eq!(nfq_msg_type(NFQNL_MSG_CONFIG), 0x0302);
        assert_eq!(nfq_msg_type(NFQNL_MSG_VERDICT_BATCH), 0x0303);
        assert_eq!(NFQA_PAYLOAD, 10);
        assert_eq!(NFQA_SKB_INFO, 14);
        assert_eq!(NFQA_PRIORITY, 21);
        assert_eq!(NFQNL_MAX_COPY_RANGE, 65531);
        assert_eq!(VERDICT_MSG_MAX_LEN, 40);
        assert_eq!(NLA_TYPE_MASK, 0x3fff);
    }

    #[test]
    fn parses_kernel_packet_with_big_endian_id() {
        let payload = [
            0x45u8, 0, 0, 28, 1, 2, 3, 4, 64, 17, 0, 0, 127, 0, 0, 1, 127, 0, 0, 1, 0x9c, 0x40,
            0x27, 0x0f, 0, 8, 0, 0,
        ];
        let extra = vec![
            attr(NFQA_MARK, &0x10000u32.to_be_bytes()),
            attr(NFQA_TIMESTAMP, &[0u8; 16]),
            attr(NFQA_IFINDEX_OUTDEV, &1u32.to_be_bytes()),
            attr(NFQA_SKB_INFO, &(NFQA_SKB_GSO | NFQA_SKB_CSUMNOTREADY).to_be_bytes()),
            attr(NFQA_CAP_LEN, &1500u32.to_be_bytes()),
            attr(NFQA_UID, &1000u32.to_be_bytes()),
            attr(NFQA_GID, &100u32.to_be_bytes()),
            attr(999, b"unknown attributes are skipped"),
        ];
        let buf = kernel_packet(7, 0x0102_0304, &payload, &extra);
        let Message::Packet(p) = only(&buf) else { panic!() };
        assert_eq!(p.queue, 7);
        assert_eq!(p.family, 2);
        assert_eq!(p.id, 0x0102_0304);
        assert_eq!(p.hw_protocol, 0x0800);
        assert_eq!(p.hook, 3);
        assert_eq!(p.payload, &payload);
        assert_eq!(p.mark, Some(0x10000));
        assert_eq!(p.outdev, Some(1));
        assert_eq!(p.indev, None);
        assert_eq!((p.uid, p.gid), (Some(1000), Some(100)));
        assert!(p.is_gso() && p.csum_not_ready() && p.is_cut());
        // Zero-copy: the payload points into the receive buffer.
        let start = buf.as_ptr() as usize;
        let at = p.payload.as_ptr() as usize;
        assert!(at >= start && at + p.payload.len() <= start + buf.len());
    }

    #[test]
    fn payload_with_odd_length_is_padded_and_next_message_found() {
        let mut buf = kernel_packet(0, 1, &[1, 2, 3, 4, 5], &[]);
        // nlmsg_len excludes nothing here; padding inside the message already aligned it.
        assert_eq!(buf.len() % 4, 0);
        buf.extend(kernel_packet(0, 2, &[9; 7], &[]));
        let v: Vec<_> = messages(&buf).map(|m| m.unwrap()).collect();
        assert_eq!(v.len(), 2);
        let (Message::Packet(a), Message::Packet(b)) = (v[0], v[1]) else { panic!() };
        assert_eq!((a.id, a.payload), (1, &[1u8, 2, 3, 4, 5][..]));
        assert_eq!((b.id, b.payload), (2, &[9u8; 7][..]));
    }

    #[test]
    fn nlmsg_len_without_trailing_padding() {
        // A message whose nlmsg_len is not a multiple of 4 (last attribute unpadded):
        // the next message starts at NLMSG_ALIGN(len).
        let mut body = vec![2u8, 0, 0, 5];
        body.extend(attr(NFQA_PACKET_HDR, &[0, 0, 0, 9, 8, 0, 1])); // 11 -> padded 12
        let mut pay = Vec::new();
        pay.extend_from_slice(&5u16.to_ne_bytes());
        pay.extend_from_slice(&NFQA_PAYLOAD.to_ne_bytes());
        pay.push(0xaa); // 1-byte payload, no padding
        body.extend(&pay);
        let len = 16 + body.len(); // 16 + 4 + 12 + 5 = 37
        let mut buf = nlhdr(len as u32, 0x0300, 0, 0, 0);
        buf.extend(&body);
        buf.extend([0, 0, 0]); // alignment padding between messages
        buf.extend(nlhdr(16, NLMSG_DONE, NLM_F_MULTI, 0, 0));
        let v: Vec<_> = messages(&buf).map(|m| m.unwrap()).collect();
        let Message::Packet(p) = v[0] else { panic!() };
        assert_eq!((p.queue, p.id, p.payload), (5, 9, &[0xaau8][..]));
        assert_eq!(v[1], Message::Done);
        // And the same message as the very last one of a buffer without its padding.
        let v: Vec<_> = messages(&buf[..len]).map(|m| m.unwrap()).collect();
        assert_eq!(v.len(), 1);
    }

    #[test]
    fn nested_and_flagged_attributes() {
        let mut vlan = attr(1, &0x8100u16.to_be_bytes());
        vlan.extend(attr(2, &5u16.to_be_bytes()));
        let nested = attr(NFQA_VLAN | NLA_F_NESTED, &vlan);
        let mark = attr(NFQA_MARK | NLA_F_NET_BYTEORDER, &7u32.to_be_bytes());
        let buf = kernel_packet(1, 2, &[0x45], &[nested.clone(), mark]);
        let Message::Packet(p) = only(&buf) else { panic!() };
        assert_eq!(p.mark, Some(7));
        // The nested attribute can be walked on its own.
        let a = Attrs::new(&nested).next().unwrap().unwrap();
        assert!(a.nested);
        assert_eq!(a.kind, NFQA_VLAN);
        let inner: Vec<_> = a.nested_attrs().map(|x| x.unwrap()).collect();
        assert_eq!(inner.len(), 2);
        assert_eq!(inner[1].data, &5u16.to_be_bytes());
    }

    #[test]
    fn error_ack_and_done_in_one_buffer() {
        let mut buf = Vec::new();
        // ack for seq 42, with the echoed request header
        let mut e = nlhdr(36, NLMSG_ERROR, 0, 42, 0);
        e.extend(0i32.to_ne_bytes());
        e.extend(nlhdr(28, 0x0302, NLM_F_REQUEST | NLM_F_ACK, 42, 0));
        buf.extend(&e);
        // error EBUSY for seq 43, capped (header only)
        let mut e = nlhdr(36, NLMSG_ERROR, 0x100, 43, 0);
        e.extend((-16i32).to_ne_bytes());
        e.extend(nlhdr(28, 0x0302, NLM_F_REQUEST, 43, 0));
        buf.extend(&e);
        // error with no echoed header at all
        let mut e = nlhdr(20, NLMSG_ERROR, 0, 44, 0);
        e.extend((-2i32).to_ne_bytes());
        buf.extend(&e);
        buf.extend(nlhdr(16, NLMSG_NOOP, 0, 0, 0));
        buf.extend(nlhdr(20, NLMSG_DONE, NLM_F_MULTI, 0, 0));
        buf.extend([0u8; 4]);
        let v: Vec<_> = messages(&buf).map(|m| m.unwrap()).collect();
        assert_eq!(v[0], Message::Ack(Ack { errno: 0, seq: 42, orig_type: Some(0x0302) }));
        assert!(matches!(v[0], Message::Ack(a) if a.is_ok()));
        assert_eq!(v[1], Message::Ack(Ack { errno: 16, seq: 43, orig_type: Some(0x0302) }));
        assert_eq!(v[2], Message::Ack(Ack { errno: 2, seq: 44, orig_type: None }));
        assert!(matches!(v[3], Message::Other { msg_type: NLMSG_NOOP, .. }));
        assert_eq!(v[4], Message::Done);
        assert_eq!(v.len(), 5);
    }

    #[test]
    fn malformed_inputs_are_typed_errors() {
        // short header
        let v: Vec<_> = messages(&[1, 2, 3]).collect();
        assert!(matches!(v[..], [Err(ParseError::Truncated { what: "nlmsghdr", .. })]));
        // nlmsg_len too large ends the iteration
        let buf = nlhdr(100, 0x0300, 0, 0, 0);
        let v: Vec<_> = messages(&buf).collect();
        assert!(matches!(v[..], [Err(ParseError::BadMessageLength { len: 100, have: 16 })]));
        // nlmsg_len too small
        let buf = nlhdr(8, 0x0300, 0, 0, 0);
        assert!(matches!(
            messages(&buf).next(),
            Some(Err(ParseError::BadMessageLength { len: 8, .. }))
        ));
        // packet without nfgenmsg
        let buf = nlhdr(16, 0x0300, 0, 0, 0);
        assert!(matches!(
            messages(&buf).next(),
            Some(Err(ParseError::Truncated { what: "nfgenmsg", .. }))
        ));
        // packet without NFQA_PACKET_HDR; the next message is still parsed
        let mut buf = nlhdr(20, 0x0300, 0, 0, 0);
        buf.extend([2, 0, 0, 0]);
        buf.extend(nlhdr(16, NLMSG_DONE, 0, 0, 0));
        let v: Vec<_> = messages(&buf).collect();
        assert_eq!(v[0], Err(ParseError::MissingAttribute { attr: NFQA_PACKET_HDR }));
        assert_eq!(v[1], Ok(Message::Done));
        // short packet header attribute
        let mut m = kernel_packet(0, 1, &[], &[]);
        let mut bad = nlhdr(0, 0x0300, 0, 0, 0);
        bad.extend([2, 0, 0, 0]);
        bad.extend(attr(NFQA_PACKET_HDR, &[0, 0, 0, 1]));
        let l = bad.len() as u32;
        bad[0..4].copy_from_slice(&l.to_ne_bytes());
        assert_eq!(
            messages(&bad).next(),
            Some(Err(ParseError::AttributeTooShort { attr: NFQA_PACKET_HDR, needed: 7, have: 4 }))
        );
        // an attribute length pointing past the message
        let n = m.len();
        m[20..22].copy_from_slice(&200u16.to_ne_bytes());
        assert!(matches!(
            messages(&m[..n]).next(),
            Some(Err(ParseError::BadAttributeLength { len: 200, .. }))
        ));
        // nla_len < 4
        m[20..22].copy_from_slice(&2u16.to_ne_bytes());
        assert!(matches!(
            messages(&m).next(),
            Some(Err(ParseError::BadAttributeLength { len: 2, .. }))
        ));
        // short NLMSG_ERROR
        let buf = nlhdr(18, NLMSG_ERROR, 0, 0, 0).into_iter().chain([0, 0]).collect::<Vec<_>>();
        assert!(matches!(
            messages(&buf).next(),
            Some(Err(ParseError::Truncated { what: "nlmsgerr", .. }))
        ));
        // short mark
        let buf = kernel_packet(0, 1, &[], &[attr(NFQA_MARK, &[1, 2])]);
        assert!(matches!(
            messages(&buf).next(),
            Some(Err(ParseError::AttributeTooShort { attr: NFQA_MARK, .. }))
        ));
        // Display works
        assert!(ParseError::MissingAttribute { attr: 1 }.to_string().contains("missing"));
    }

    #[test]
    fn verdict_bytes_exact() {
        let mut buf = Vec::new();
        assert_eq!(
            put_verdict(&mut buf, 0x0102, 0xdead_beef, Verdict::Accept, Some(0x0001_0000)),
            40
        );
        let mut want = nlhdr(40, 0x0301, NLM_F_REQUEST, 0, 0);
        want.extend([0, 0, 0x01, 0x02]);
        want.extend(attr(NFQA_VERDICT_HDR, &[0, 0, 0, 1, 0xde, 0xad, 0xbe, 0xef]));
        want.extend(attr(NFQA_MARK, &[0, 1, 0, 0]));
        assert_eq!(buf, want);
        buf.clear();
        assert_eq!(put_verdict_batch(&mut buf, 3, 77, Verdict::Drop, None), 32);
        let mut want = nlhdr(32, 0x0303, NLM_F_REQUEST, 0, 0);
        want.extend([0, 0, 0, 3]);
        want.extend(attr(NFQA_VERDICT_HDR, &[0, 0, 0, 0, 0, 0, 0, 77]));
        assert_eq!(buf, want);
    }

    #[test]
    fn config_bytes_exact() {
        let mut buf = Vec::new();
        let req = ConfigRequest {
            cmd: Some(CfgCmd::BIND),
            params: Some(CopyParams::packet(128)),
            max_len: Some(4096),
            flags: Some(
                CfgFlags::default()
                    .with(NFQA_CFG_F_GSO, true)
                    .with(NFQA_CFG_F_FAIL_OPEN, true)
                    .with(NFQA_CFG_F_CONNTRACK, false),
            ),
        };
        let n = put_config(&mut buf, 9, 4, &req, true);
        let mut want = nlhdr(0, 0x0302, NLM_F_REQUEST | NLM_F_ACK, 9, 0);
        want.extend([0, 0, 0, 4]);
        want.extend(attr(NFQA_CFG_CMD, &[1, 0, 0, 0]));
        want.extend(attr(NFQA_CFG_PARAMS, &[0, 0, 0, 128, 2])); // 9 bytes + 3 padding
        want.extend(attr(NFQA_CFG_QUEUE_MAXLEN, &[0, 0, 0x10, 0]));
        want.extend(attr(NFQA_CFG_FLAGS, &[0, 0, 0, 5]));
        want.extend(attr(NFQA_CFG_MASK, &[0, 0, 0, 7]));
        let l = want.len() as u32;
        want[0..4].copy_from_slice(&l.to_ne_bytes());
        assert_eq!(n, want.len());
        assert_eq!(buf, want);
        // Unbind alone.
        buf.clear();
        put_config(
            &mut buf,
            1,
            4,
            &ConfigRequest { cmd: Some(CfgCmd::UNBIND), ..Default::default() },
            false,
        );
        let mut want = nlhdr(28, 0x0302, NLM_F_REQUEST, 1, 0);
        want.extend([0, 0, 0, 4]);
        want.extend(attr(NFQA_CFG_CMD, &[2, 0, 0, 0]));
        assert_eq!(buf, want);
    }

    #[test]
    fn round_trips_in_one_buffer() {
        let mut buf = Vec::new();
        let req = ConfigRequest {
            cmd: Some(CfgCmd { command: NFQNL_CFG_CMD_BIND, pf: 2 }),
            params: Some(CopyParams::packet(0xffff)),
            max_len: None,
            flags: Some(CfgFlags::default().with(NFQA_CFG_F_GSO, false)),
        };
        put_config(&mut buf, 5, 65535, &req, true);
        put_verdict(&mut buf, 1, 10, Verdict::Accept, None);
        put_verdict(&mut buf, 1, 11, Verdict::Drop, Some(u32::MAX));
        put_verdict_batch(&mut buf, 1, 20, Verdict::Accept, Some(0x100));
        let payload: Vec<u8> = (0..=130u8).collect();
        let pk = Packet {
            queue: 9,
            family: 10,
            id: u32::MAX,
            hw_protocol: 0x86dd,
            hook: 1,
            payload: &payload,
            mark: Some(3),
            skb_info: NFQA_SKB_GSO,
            cap_len: Some(9000),
            indev: Some(4),
            outdev: None,
            ct_info: Some(2),
            uid: None,
            gid: Some(0),
        };
        put_packet(&mut buf, &pk);
        let v: Vec<_> = messages(&buf).map(|m| m.unwrap()).collect();
        assert_eq!(v[0], Message::Config(ConfigMsg { queue: 65535, req }));
        assert_eq!(
            v[1],
            Message::Verdict(VerdictMsg {
                queue: 1,
                batch: false,
                id: 10,
                verdict: NF_ACCEPT,
                mark: None
            })
        );
        assert_eq!(
            v[2],
            Message::Verdict(VerdictMsg {
                queue: 1,
                batch: false,
                id: 11,
                verdict: NF_DROP,
                mark: Some(u32::MAX)
            })
        );
        assert_eq!(
            v[3],
            Message::Verdict(VerdictMsg {
                queue: 1,
                batch: true,
                id: 20,
                verdict: NF_ACCEPT,
                mark: Some(0x100)
            })
        );
        assert_eq!(v[4], Message::Packet(pk));
        assert_eq!(v.len(), 5);
    }

    fn arb_packet_bytes() -> impl Strategy<Value = Vec<u8>> {
        (
            any::<u16>(),
            any::<u32>(),
            proptest::collection::vec(any::<u8>(), 0..200),
            proptest::option::of(any::<u32>()),
            any::<u32>(),
        )
            .prop_map(|(queue, id, payload, mark, skb_info)| {
                let p = Packet {
                    queue,
                    family: 2,
                    id,
                    hw_protocol: 0x800,
                    hook: 3,
                    payload: &payload,
                    mark,
                    skb_info,
                    cap_len: None,
                    indev: None,
                    outdev: Some(1),
                    ct_info: None,
                    uid: None,
                    gid: None,
                };
                let mut b = Vec::new();
                put_packet(&mut b, &p);
                b
            })
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut n = 0;
            for m in messages(&buf) {
                n += 1;
                if let Ok(Message::Packet(p)) = m {
                    prop_assert!(p.payload.len() <= buf.len());
                }
            }
            prop_assert!(n <= buf.len() / NLMSG_HDRLEN + 1);
            for a in Attrs::new(&buf) {
                let _ = a.map(|a| a.be32());
            }
        }

        #[test]
        fn mutated_packets_never_panic(
            mut buf in arb_packet_bytes(),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
            cut in any::<usize>(),
        ) {
            for (at, v) in flips {
                let i = at % buf.len();
                buf[i] = v;
            }
            let cut = cut % (buf.len() + 1);
            for m in messages(&buf[..cut]) {
                let _ = m;
            }
            for m in messages(&buf) {
                let _ = m;
            }
        }

        #[test]
        fn packet_round_trip(buf in arb_packet_bytes()) {
            let v: Vec<_> = messages(&buf).collect();
            prop_assert_eq!(v.len(), 1);
            let is_packet = matches!(v[0], Ok(Message::Packet(_)));
            prop_assert!(is_packet);
        }

        #[test]
        fn verdict_round_trip(queue in any::<u16>(), id in any::<u32>(), accept in any::<bool>(),
                              mark in proptest::option::of(any::<u32>()), batch in any::<bool>()) {
            let mut buf = Vec::new();
            let v = if accept { Verdict::Accept } else { Verdict::Drop };
            if batch { put_verdict_batch(&mut buf, queue, id, v, mark); } else { put_verdict(&mut buf, queue, id, v, mark); }
            let got: Vec<_> = messages(&buf).collect();
            prop_assert_eq!(got, vec![Ok(Message::Verdict(VerdictMsg { queue, batch, id, verdict: v.raw(), mark }))]);
        }
    }
}
