//! Netlink framing: message headers, attributes, and the errors of a buffer that does
//! not hold what it claims. Knows nothing of NFQUEUE beyond the constants.
//!
//! ```text
//! struct nlmsghdr  { u32 len; u16 type; u16 flags; u32 seq; u32 pid; }   16 bytes
//! struct nlattr    { u16 len; u16 type; } + payload, padded to 4 bytes  (repeated)
//! ```
//!
//! Headers are in host byte order.

use core::fmt;

use super::consts::*;

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

/// What was wrong with a netlink buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseError {
    /// Fewer bytes than a fixed header needs (`what`: which header).
    Truncated {
        /// Which structure was cut.
        what: &'static str,
        /// Bytes it needs.
        needed: usize,
        /// Bytes there were.
        have: usize,
    },
    /// `nlmsg_len` shorter than the header or longer than the bytes left.
    BadMessageLength {
        /// The `nlmsg_len` read.
        len: u32,
        /// Bytes left in the buffer.
        have: usize,
    },
    /// `nla_len` shorter than the attribute header or longer than the bytes left.
    BadAttributeLength {
        /// The `nla_len` read.
        len: u16,
        /// Bytes left in the attribute area.
        have: usize,
    },
    /// An attribute's payload is too short for its type.
    AttributeTooShort {
        /// The attribute type.
        attr: u16,
        /// Payload bytes it needs.
        needed: usize,
        /// Payload bytes it had.
        have: usize,
    },
    /// A message lacks an attribute it cannot do without (e.g. `NFQA_PACKET_HDR`).
    MissingAttribute {
        /// The attribute type.
        attr: u16,
    },
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ParseError::Truncated { what, needed, have } => {
                write!(f, "truncated {what}: need {needed} bytes, have {have}")
            }
            ParseError::BadMessageLength { len, have } => {
                write!(f, "bad nlmsg_len {len} ({have} bytes left)")
            }
            ParseError::BadAttributeLength { len, have } => {
                write!(f, "bad nla_len {len} ({have} bytes left)")
            }
            ParseError::AttributeTooShort { attr, needed, have } => {
                write!(f, "attribute {attr} too short: need {needed} bytes, have {have}")
            }
            ParseError::MissingAttribute { attr } => write!(f, "missing attribute {attr}"),
        }
    }
}

impl std::error::Error for ParseError {}

// ---------------------------------------------------------------------------------------
// Little readers (safe, no alignment needed)
// ---------------------------------------------------------------------------------------

#[inline]
pub(crate) fn ne16(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}
#[inline]
pub(crate) fn ne32(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
#[inline]
pub(crate) fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
#[inline]
pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

// ---------------------------------------------------------------------------------------
// Netlink header
// ---------------------------------------------------------------------------------------

/// A decoded `struct nlmsghdr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NlHeader {
    /// `nlmsg_len`: header plus body, without the trailing alignment padding.
    pub len: u32,
    /// `nlmsg_type`.
    pub msg_type: u16,
    /// `nlmsg_flags`.
    pub flags: u16,
    /// `nlmsg_seq`.
    pub seq: u32,
    /// `nlmsg_pid`.
    pub pid: u32,
}

impl NlHeader {
    /// Decode the first 16 bytes of `buf` (no length validation against `buf`).
    pub fn parse(buf: &[u8]) -> Result<NlHeader, ParseError> {
        if buf.len() < NLMSG_HDRLEN {
            return Err(ParseError::Truncated {
                what: "nlmsghdr",
                needed: NLMSG_HDRLEN,
                have: buf.len(),
            });
        }
        Ok(NlHeader {
            len: ne32(buf, 0),
            msg_type: ne16(buf, 4),
            flags: ne16(buf, 6),
            seq: ne32(buf, 8),
            pid: ne32(buf, 12),
        })
    }
}

// ---------------------------------------------------------------------------------------
// Attributes
// ---------------------------------------------------------------------------------------

/// One netlink attribute, borrowed from the buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attr<'a> {
    /// Type with `NLA_F_NESTED` / `NLA_F_NET_BYTEORDER` masked off.
    pub kind: u16,
    /// `NLA_F_NESTED` was set.
    pub nested: bool,
    /// The payload (without header or padding).
    pub data: &'a [u8],
}

impl<'a> Attr<'a> {
    /// The payload as a big-endian u32 (extra bytes are ignored).
    pub fn be32(&self) -> Result<u32, ParseError> {
        self.need(4)?;
        Ok(be32(self.data, 0))
    }

    /// The attributes nested inside this one.
    pub fn nested_attrs(&self) -> Attrs<'a> {
        Attrs::new(self.data)
    }

    pub(crate) fn need(&self, n: usize) -> Result<(), ParseError> {
        if self.data.len() < n {
            Err(ParseError::AttributeTooShort { attr: self.kind, needed: n, have: self.data.len() })
        } else {
            Ok(())
        }
    }
}

/// Iterator over the attributes of an attribute area (`NLA_ALIGN`ed, 4 bytes).
///
/// Fewer than `NLA_HDRLEN` trailing bytes are taken as padding and ignored; an attribute
/// whose length is impossible yields one error and ends the iteration.
#[derive(Clone, Debug)]
pub struct Attrs<'a> {
    buf: &'a [u8],
}

impl<'a> Attrs<'a> {
    /// Walk the attributes in `buf`.
    pub fn new(buf: &'a [u8]) -> Attrs<'a> {
        Attrs { buf }
    }
}

impl<'a> Iterator for Attrs<'a> {
    type Item = Result<Attr<'a>, ParseError>;

    fn next(&mut self) -> Option<Self::Item> {
        let buf = self.buf;
        if buf.len() < NLA_HDRLEN {
            self.buf = &[];
            return None;
        }
        let len = ne16(buf, 0);
        let raw_type = ne16(buf, 2);
        let l = len as usize;
        if l < NLA_HDRLEN || l > buf.len() {
            self.buf = &[];
            return Some(Err(ParseError::BadAttributeLength { len, have: buf.len() }));
        }
        let next = align4(l).min(buf.len());
        self.buf = &buf[next..];
        Some(Ok(Attr {
            kind: raw_type & NLA_TYPE_MASK,
            nested: raw_type & NLA_F_NESTED != 0,
            data: &buf[NLA_HDRLEN..l],
        }))
    }
}
// ---------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------

/// Set the length of the message that starts at `start` and ends at the end of `buf`.
pub(crate) fn finish_msg(buf: &mut [u8], start: usize) {
    let len = (buf.len() - start) as u32;
    buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
}

/// Append one attribute, padded to 4 bytes.
pub(crate) fn put_attr(buf: &mut Vec<u8>, kind: u16, data: &[u8]) {
    let len = (NLA_HDRLEN + data.len()) as u16;
    buf.extend_from_slice(&len.to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(data);
    let pad = align4(data.len()) - data.len();
    buf.extend_from_slice(&[0u8; 3][..pad]);
}
