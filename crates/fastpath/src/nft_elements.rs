//! nf_tables set and map elements in their netlink form, from nft's text of them: what
//! the agent's bulk loads and changes send (`pykp/netfilter/bulk_load.py` frames them).
//!
//! Each element is one `NFTA_LIST_ELEM` attribute holding its key and, for a map, its
//! data (a value or a verdict). Keys and values are laid out as nft lays a concatenation
//! out: each field padded to 4 bytes, addresses and ports in network order, marks and
//! `numgen` values in host order. Elements come back concatenated in chunks that each fit
//! one `NFTA_SET_ELEM_LIST_ELEMENTS` attribute (its length is 16 bits).
//!
//! ```
//! use fastpath::nft_elements::{encode, ElementKind};
//!
//! let chunks = encode(ElementKind::Address, ["10.96.0.1", "10.96.0.2"], 60_000).unwrap();
//! assert_eq!(chunks.len(), 1);
//! // Per element: list element (4) > key (4) > value (4) > the address (4).
//! assert_eq!(chunks[0].len(), 2 * 16);
//! assert_eq!(&chunks[0][12..16], &[10, 96, 0, 1]);
//! ```

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

const NLA_F_NESTED: u16 = 0x8000;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
const NFT_GOTO: i32 = -4;

/// What an element's text spells, by the type of its set or map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElementKind {
    /// `ip . proto . port` (a frontend set; also a frontend map's key alone).
    Frontend,
    /// `ip . proto . port : goto chain` (a frontend's verdict).
    FrontendVerdict,
    /// `index : goto chain` (a `numgen inc` rotation's slot).
    RotationSlot,
    /// `ip . proto . port . index : backend . port` (a `numgen random` slot).
    Slot,
    /// `ip . proto . port . index`: a slot's key alone.
    SlotKey,
    /// `ip`.
    Address,
    /// `ip . ip` (a hairpin pair).
    Pair,
    /// `mark : ip . port` (a backend id's address).
    Backend,
    /// `mark`: a backend's key alone.
    Mark,
}

impl ElementKind {
    pub const ALL: [ElementKind; 9] = [
        ElementKind::Frontend,
        ElementKind::FrontendVerdict,
        ElementKind::RotationSlot,
        ElementKind::Slot,
        ElementKind::SlotKey,
        ElementKind::Address,
        ElementKind::Pair,
        ElementKind::Backend,
        ElementKind::Mark,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ElementKind::Frontend => "frontend",
            ElementKind::FrontendVerdict => "frontend-verdict",
            ElementKind::RotationSlot => "rotation-slot",
            ElementKind::Slot => "slot",
            ElementKind::SlotKey => "slot-key",
            ElementKind::Address => "address",
            ElementKind::Pair => "pair",
            ElementKind::Backend => "backend",
            ElementKind::Mark => "mark",
        }
    }
}

impl FromStr for ElementKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        ElementKind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == s)
            .ok_or_else(|| format!("no element kind {s:?}"))
    }
}

/// An element text that is not of its kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadElement {
    pub kind: ElementKind,
    pub text: String,
    pub why: &'static str,
}

impl fmt::Display for BadElement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "not a {} element ({}): {:?}", self.kind.as_str(), self.why, self.text)
    }
}

impl std::error::Error for BadElement {}

/// The elements of `texts`, encoded, concatenated in chunks of at most `max_chunk` bytes
/// (an element longer than that is a chunk of its own). Fails on the first text that is
/// not of `kind`, before anything is sent.
pub fn encode<'a>(
    kind: ElementKind,
    texts: impl IntoIterator<Item = &'a str>,
    max_chunk: usize,
) -> Result<Vec<Vec<u8>>, BadElement> {
    let mut chunks = Chunks::new(kind, max_chunk);
    for text in texts {
        chunks.push(text)?;
    }
    Ok(chunks.finish())
}

/// [`encode`] one text at a time (for texts that are not all borrowed at once).
pub struct Chunks {
    kind: ElementKind,
    max_chunk: usize,
    done: Vec<Vec<u8>>,
    chunk: Vec<u8>,
    element: Vec<u8>,
}

impl Chunks {
    pub fn new(kind: ElementKind, max_chunk: usize) -> Self {
        Chunks { kind, max_chunk, done: Vec::new(), chunk: Vec::new(), element: Vec::new() }
    }

    pub fn push(&mut self, text: &str) -> Result<(), BadElement> {
        self.element.clear();
        encode_one(self.kind, text, &mut self.element).map_err(|why| BadElement {
            kind: self.kind,
            text: text.to_owned(),
            why,
        })?;
        if !self.chunk.is_empty() && self.chunk.len() + self.element.len() > self.max_chunk {
            self.done.push(std::mem::take(&mut self.chunk));
        }
        self.chunk.extend_from_slice(&self.element);
        Ok(())
    }

    pub fn finish(mut self) -> Vec<Vec<u8>> {
        if !self.chunk.is_empty() {
            self.done.push(self.chunk);
        }
        self.done
    }
}

fn encode_one(kind: ElementKind, text: &str, out: &mut Vec<u8>) -> Result<(), &'static str> {
    let mut key = [0u8; 48];
    let mut data = [0u8; 20];
    match kind {
        ElementKind::Frontend => {
            let n = frontend(text, &mut key)?;
            element(out, &key[..n], Data::None);
        }
        ElementKind::FrontendVerdict => {
            let (k, verdict) = text.split_once(" : ").ok_or("no \" : \"")?;
            let n = frontend(k, &mut key)?;
            element(out, &key[..n], Data::Goto(goto(verdict)?));
        }
        ElementKind::RotationSlot => {
            let (index, verdict) = text.split_once(" : ").ok_or("no \" : \"")?;
            key[..4].copy_from_slice(&index.parse::<u32>().map_err(|_| "bad index")?.to_ne_bytes());
            element(out, &key[..4], Data::Goto(goto(verdict)?));
        }
        ElementKind::Slot => {
            let (k, value) = text.split_once(" : ").ok_or("no \" : \"")?;
            let n = slot_key(k, &mut key)?;
            let m = address_port(value, &mut data)?;
            element(out, &key[..n], Data::Value(&data[..m]));
        }
        ElementKind::SlotKey => {
            let n = slot_key(text, &mut key)?;
            element(out, &key[..n], Data::None);
        }
        ElementKind::Address => {
            let n = address(text, &mut key)?;
            element(out, &key[..n], Data::None);
        }
        ElementKind::Pair => {
            let (first, second) = text.split_once(" . ").ok_or("no \" . \"")?;
            let n = address(first, &mut key)?;
            let m = address(second, &mut key[n..])?;
            element(out, &key[..n + m], Data::None);
        }
        ElementKind::Backend => {
            let (mark_text, value) = text.split_once(" : ").ok_or("no \" : \"")?;
            key[..4].copy_from_slice(&mark(mark_text)?.to_ne_bytes());
            let m = address_port(value, &mut data)?;
            element(out, &key[..4], Data::Value(&data[..m]));
        }
        ElementKind::Mark => {
            key[..4].copy_from_slice(&mark(text)?.to_ne_bytes());
            element(out, &key[..4], Data::None);
        }
    }
    Ok(())
}

enum Data<'a> {
    None,
    Value(&'a [u8]),
    Goto(&'a str),
}

/// One NFTA_LIST_ELEM. Keys and values are whole 32-bit words, so nothing is padded but
/// a chain's name.
fn element(out: &mut Vec<u8>, key: &[u8], data: Data<'_>) {
    let start = out.len();
    header(out, 0, NFTA_LIST_ELEM | NLA_F_NESTED); // its length is known at the end
    header(out, 8 + key.len(), NFTA_SET_ELEM_KEY | NLA_F_NESTED);
    header(out, 4 + key.len(), NFTA_DATA_VALUE);
    out.extend_from_slice(key);
    match data {
        Data::None => {}
        Data::Value(value) => {
            header(out, 8 + value.len(), NFTA_SET_ELEM_DATA | NLA_F_NESTED);
            header(out, 4 + value.len(), NFTA_DATA_VALUE);
            out.extend_from_slice(value);
        }
        Data::Goto(chain) => {
            let chain_attr = 4 + chain.len() + 1;
            let verdict = 4 + 8 + padded(chain_attr);
            header(out, 4 + verdict, NFTA_SET_ELEM_DATA | NLA_F_NESTED);
            header(out, verdict, NFTA_DATA_VERDICT | NLA_F_NESTED);
            header(out, 8, NFTA_VERDICT_CODE);
            out.extend_from_slice(&NFT_GOTO.to_be_bytes());
            header(out, chain_attr, NFTA_VERDICT_CHAIN);
            out.extend_from_slice(chain.as_bytes());
            out.push(0);
            out.resize(out.len() + padded(chain_attr) - chain_attr, 0);
        }
    }
    let total = (out.len() - start) as u16;
    out[start..start + 2].copy_from_slice(&total.to_ne_bytes());
}

fn header(out: &mut Vec<u8>, len: usize, type_: u16) {
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&type_.to_ne_bytes());
}

fn padded(len: usize) -> usize {
    (len + 3) & !3
}

/// `goto chain`: the chain's name.
fn goto(verdict: &str) -> Result<&str, &'static str> {
    match verdict.split_once(' ') {
        Some(("goto", chain)) if !chain.is_empty() && !chain.contains(' ') => Ok(chain),
        _ => Err("not a goto verdict"),
    }
}

/// `ip . proto . port` into `out`; its length.
fn frontend(text: &str, out: &mut [u8]) -> Result<usize, &'static str> {
    let mut fields = text.split(" . ");
    let (Some(ip), Some(proto), Some(port), None) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err("not ip . proto . port");
    };
    let n = address(ip, out)?;
    out[n] = match proto {
        "tcp" => 6,
        "udp" => 17,
        "sctp" => 132,
        _ => return Err("unknown protocol"),
    };
    out[n + 1..n + 4].fill(0);
    port_into(port, &mut out[n + 4..n + 8])?;
    Ok(n + 8)
}

/// `ip . proto . port . index`: a frontend and the slot's index (host order).
fn slot_key(text: &str, out: &mut [u8]) -> Result<usize, &'static str> {
    let (front, index) = text.rsplit_once(" . ").ok_or("no slot index")?;
    let n = frontend(front, out)?;
    out[n..n + 4]
        .copy_from_slice(&index.parse::<u32>().map_err(|_| "bad slot index")?.to_ne_bytes());
    Ok(n + 4)
}

/// `ip . port`.
fn address_port(text: &str, out: &mut [u8]) -> Result<usize, &'static str> {
    let (ip, port) = text.split_once(" . ").ok_or("not ip . port")?;
    let n = address(ip, out)?;
    port_into(port, &mut out[n..n + 4])?;
    Ok(n + 4)
}

fn address(text: &str, out: &mut [u8]) -> Result<usize, &'static str> {
    match IpAddr::from_str(text).map_err(|_| "bad address")? {
        IpAddr::V4(ip) => {
            out[..4].copy_from_slice(&ip.octets());
            Ok(4)
        }
        IpAddr::V6(ip) => {
            out[..16].copy_from_slice(&ip.octets());
            Ok(16)
        }
    }
}

/// A port: two bytes in network order, padded to four.
fn port_into(text: &str, out: &mut [u8]) -> Result<(), &'static str> {
    let port: u16 = text.parse().map_err(|_| "bad port")?;
    out[..2].copy_from_slice(&port.to_be_bytes());
    out[2..4].fill(0);
    Ok(())
}

/// A mark as nft prints one (hexadecimal with 0x) or in decimal.
fn mark(text: &str) -> Result<u32, &'static str> {
    match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => text.parse(),
    }
    .map_err(|_| "bad mark")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(kind: ElementKind, text: &str) -> Vec<u8> {
        let chunks = encode(kind, [text], 60_000).unwrap();
        assert_eq!(chunks.len(), 1);
        chunks.into_iter().next().unwrap()
    }

    fn hdr(len: u16, type_: u16) -> Vec<u8> {
        [len.to_ne_bytes(), type_.to_ne_bytes()].concat()
    }

    #[test]
    fn a_frontend_is_address_protocol_and_port_each_in_a_word() {
        let expected = [
            hdr(24, NFTA_LIST_ELEM | NLA_F_NESTED),
            hdr(20, NFTA_SET_ELEM_KEY | NLA_F_NESTED),
            hdr(16, NFTA_DATA_VALUE),
            vec![10, 96, 0, 10, 17, 0, 0, 0, 0, 53, 0, 0],
        ]
        .concat();
        assert_eq!(one(ElementKind::Frontend, "10.96.0.10 . udp . 53"), expected);
    }

    #[test]
    fn a_verdict_names_its_chain_padded_to_a_word() {
        let element = one(ElementKind::FrontendVerdict, "fd00::1 . tcp . 443 : goto pick6_3");
        // A 24-byte key; "pick6_3\0" is 8 bytes: chain attribute 12, verdict 4 + 8 + 12,
        // data 4 + 24.
        let key = [&[0xfd, 0][..], &[0; 13], &[1], &[6, 0, 0, 0, 1, 0xbb, 0, 0]].concat();
        let expected = [
            hdr(4 + 32 + 28, NFTA_LIST_ELEM | NLA_F_NESTED),
            hdr(32, NFTA_SET_ELEM_KEY | NLA_F_NESTED),
            hdr(28, NFTA_DATA_VALUE),
            key,
            hdr(28, NFTA_SET_ELEM_DATA | NLA_F_NESTED),
            hdr(24, NFTA_DATA_VERDICT | NLA_F_NESTED),
            hdr(8, NFTA_VERDICT_CODE),
            (-4i32).to_be_bytes().to_vec(),
            hdr(12, NFTA_VERDICT_CHAIN),
            b"pick6_3\0".to_vec(),
        ]
        .concat();
        assert_eq!(element, expected);
        // A name of 8 characters: 9 bytes with its NUL, padded to 12.
        let padded = one(ElementKind::RotationSlot, "7 : goto rr4_1234");
        assert_eq!(padded.len(), 4 + 12 + 4 + 4 + 8 + 16);
        assert_eq!(&padded[padded.len() - 12..], b"rr4_1234\0\0\0\0");
        assert_eq!(&padded[12..16], &7u32.to_ne_bytes());
    }

    #[test]
    fn slots_and_backends_carry_an_address_and_port_value() {
        let slot = one(ElementKind::Slot, "10.96.0.10 . tcp . 80 . 2 : 10.244.1.5 . 8080");
        let key = [[10, 96, 0, 10], [6, 0, 0, 0], [0, 80, 0, 0], 2u32.to_ne_bytes()].concat();
        assert_eq!(&slot[12..28], &key[..]);
        assert_eq!(&slot[slot.len() - 8..], &[10, 244, 1, 5, 0x1f, 0x90, 0, 0]);
        let backend = one(ElementKind::Backend, "0x00030000 : 10.244.1.5 . 8080");
        assert_eq!(&backend[12..16], &0x30000u32.to_ne_bytes());
        assert_eq!(one(ElementKind::Mark, "196608")[12..16], 0x30000u32.to_ne_bytes());
        assert_eq!(
            &one(ElementKind::Pair, "10.0.0.1 . 10.0.0.1")[12..20],
            &[10, 0, 0, 1, 10, 0, 0, 1]
        );
    }

    #[test]
    fn chunks_stay_under_the_limit_and_keep_the_order() {
        let texts: Vec<String> =
            (0..1000).map(|i| format!("10.0.{}.{}", i / 256, i % 256)).collect();
        let chunks = encode(ElementKind::Address, texts.iter().map(String::as_str), 1000).unwrap();
        assert!(chunks.iter().all(|c| c.len() <= 1000));
        let all: Vec<u8> = chunks.concat();
        assert_eq!(all.len(), 1000 * 16);
        assert_eq!(&all[999 * 16 + 12..], &[10, 0, 3, 231]);
        assert!(encode(ElementKind::Address, [], 1000).unwrap().is_empty());
    }

    #[test]
    fn texts_not_of_their_kind_are_refused_by_name() {
        for (kind, text) in [
            (ElementKind::Frontend, "10.0.0.1 . tcp"),
            (ElementKind::Frontend, "10.0.0.1 . icmp . 80"),
            (ElementKind::Frontend, "10.0.0.1 . tcp . 65536"),
            (ElementKind::Frontend, "10.0.0.1 . tcp . 80 . 1"),
            (ElementKind::FrontendVerdict, "10.0.0.1 . tcp . 80 : jump x"),
            (ElementKind::FrontendVerdict, "10.0.0.1 . tcp . 80"),
            (ElementKind::Address, "010.0.0.1"),
            (ElementKind::Address, "10.0.0.256"),
            (ElementKind::Backend, "0xZZ : 10.0.0.1 . 80"),
            (ElementKind::RotationSlot, "-1 : goto rr4_2"),
            (ElementKind::Slot, "10.0.0.1 . tcp . 80 : 10.0.0.2 . 80"),
        ] {
            let error = encode(kind, [text], 60_000).unwrap_err();
            assert_eq!((error.kind, error.text.as_str()), (kind, text), "{error}");
        }
    }

    #[test]
    fn every_kind_is_named_and_found_by_its_name() {
        for kind in ElementKind::ALL {
            assert_eq!(kind.as_str().parse::<ElementKind>(), Ok(kind));
        }
        assert!("set".parse::<ElementKind>().is_err());
    }
}
