//! A small packet builder for tests, the fuzz driver and benchmarks: valid IPv4/IPv6
//! TCP/UDP/SCTP packets with correct checksums, plus the shapes that stress a parser (IPv4
//! options, IPv6 extension headers, fragments, trailing bytes). Not for the datapath: it
//! allocates, and oversized fields are truncated silently (`as u16`).

use std::net::IpAddr;

use super::checksum::{ipv4_header_checksum, sctp_checksum, tcp_udp_checksum};
use super::ipv6;
use crate::flow::{FlowKey, Protocol, TcpFlags};

/// An IPv6 extension header, laid down in list order. Contents are zero padding (Pad1
/// options), which is valid for hop-by-hop and destination options.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtHeader {
    /// `len8`: the Hdr Ext Len field, so the header is `(len8 + 1) * 8` bytes.
    HopByHop {
        len8: u8,
    },
    DestOpts {
        len8: u8,
    },
    Routing {
        segments_left: u8,
        len8: u8,
    },
    /// `offset` in 8-byte units (13 bits). A non-zero offset makes a later fragment: no L4
    /// header is written after it, only the payload.
    Fragment {
        id: u32,
        offset: u16,
        more: bool,
    },
    /// `len4`: the Payload Len field, so the header is `(len4 + 2) * 4` bytes.
    Auth {
        len4: u8,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PacketBuilder {
    /// Addresses pick the family (both must match); `proto` picks the transport.
    pub key: FlowKey,
    pub tcp_flags: TcpFlags,
    /// TCP option bytes, zero-padded to a multiple of 4 (at most 40).
    pub tcp_options: Vec<u8>,
    /// L4 data (SCTP: the chunk bytes).
    pub payload: Vec<u8>,
    /// IPv4 option bytes, zero-padded to a multiple of 4 (at most 40).
    pub ipv4_options: Vec<u8>,
    /// IPv4 fragment fields: `(offset in 8-byte units, more fragments)`. A non-zero offset
    /// makes a later fragment (payload only, no L4 header).
    pub ipv4_fragment: Option<(u16, bool)>,
    pub ipv4_ident: u16,
    pub ipv6_ext: Vec<ExtHeader>,
    /// Leave the UDP checksum 0 ("none"; only meaningful over IPv4).
    pub udp_zero_checksum: bool,
    pub sctp_vtag: u32,
    /// Bytes after the length the IP header declares (link-layer padding).
    pub trailer: Vec<u8>,
    /// IPv4 TTL or IPv6 hop limit.
    pub ttl: u8,
    pub hop_limit: u8,
}

impl PacketBuilder {
    /// A plain packet for `key` with an initial SYN when TCP.
    pub fn new(key: FlowKey) -> Self {
        PacketBuilder {
            key,
            tcp_flags: TcpFlags(TcpFlags::SYN),
            tcp_options: Vec::new(),
            payload: Vec::new(),
            ipv4_options: Vec::new(),
            ipv4_fragment: None,
            ipv4_ident: 0x1234,
            ipv6_ext: Vec::new(),
            udp_zero_checksum: false,
            sctp_vtag: 0x0102_0304,
            trailer: Vec::new(),
            ttl: 64,
            hop_limit: 64,
        }
    }

    fn later_fragment(&self) -> bool {
        match self.key.src {
            IpAddr::V4(_) => self.ipv4_fragment.is_some_and(|(off, _)| off != 0),
            IpAddr::V6(_) => self
                .ipv6_ext
                .iter()
                .any(|h| matches!(h, ExtHeader::Fragment { offset, .. } if *offset != 0)),
        }
    }

    /// The packet. L4 checksums cover the bytes built here, so for a first fragment they are
    /// computed as if the datagram ended with it.
    pub fn build(&self) -> Vec<u8> {
        let (src, dst) = (addr_bytes(self.key.src), addr_bytes(self.key.dst));
        let l4 = if self.later_fragment() { self.payload.clone() } else { self.l4(&src, &dst) };
        let mut out = match self.key.src {
            IpAddr::V4(_) => self.ipv4(&src, &dst, l4.len()),
            IpAddr::V6(_) => self.ipv6(&src, &dst, l4.len()),
        };
        out.extend_from_slice(&l4);
        out.extend_from_slice(&self.trailer);
        out
    }

    fn l4(&self, src: &[u8], dst: &[u8]) -> Vec<u8> {
        let k = &self.key;
        let mut l4 = Vec::new();
        l4.extend_from_slice(&k.src_port.to_be_bytes());
        l4.extend_from_slice(&k.dst_port.to_be_bytes());
        match k.proto {
            Protocol::Tcp => {
                let opts = padded(&self.tcp_options);
                l4.extend_from_slice(&0x1000_0000u32.to_be_bytes()); // seq
                l4.extend_from_slice(&0u32.to_be_bytes()); // ack
                l4.push((((20 + opts.len()) / 4) as u8) << 4);
                l4.push(self.tcp_flags.0);
                l4.extend_from_slice(&65535u16.to_be_bytes()); // window
                l4.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
                l4.extend_from_slice(&opts);
                l4.extend_from_slice(&self.payload);
                let c = tcp_udp_checksum(src, dst, Protocol::Tcp, &l4);
                l4[16..18].copy_from_slice(&c.to_be_bytes());
            }
            Protocol::Udp => {
                l4.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                l4.extend_from_slice(&[0, 0]);
                l4.extend_from_slice(&self.payload);
                if !self.udp_zero_checksum {
                    let c = tcp_udp_checksum(src, dst, Protocol::Udp, &l4);
                    l4[6..8].copy_from_slice(&c.to_be_bytes());
                }
            }
            Protocol::Sctp => {
                l4.extend_from_slice(&self.sctp_vtag.to_be_bytes());
                l4.extend_from_slice(&[0, 0, 0, 0]);
                l4.extend_from_slice(&self.payload);
                let c = sctp_checksum(&l4);
                l4[8..12].copy_from_slice(&c.to_le_bytes());
            }
        }
        l4
    }

    fn ipv4(&self, src: &[u8], dst: &[u8], l4_len: usize) -> Vec<u8> {
        let opts = padded(&self.ipv4_options);
        let hl = 20 + opts.len();
        let frag = match self.ipv4_fragment {
            None => 0x4000, // DF, as most hosts send
            Some((off, more)) => (off & 0x1fff) | if more { 0x2000 } else { 0 },
        };
        let mut h = vec![0x40 | (hl / 4) as u8, 0];
        h.extend_from_slice(&((hl + l4_len) as u16).to_be_bytes());
        h.extend_from_slice(&self.ipv4_ident.to_be_bytes());
        h.extend_from_slice(&frag.to_be_bytes());
        h.extend_from_slice(&[self.ttl, self.key.proto.number(), 0, 0]);
        h.extend_from_slice(src);
        h.extend_from_slice(dst);
        h.extend_from_slice(&opts);
        let c = ipv4_header_checksum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h
    }

    fn ipv6(&self, src: &[u8], dst: &[u8], l4_len: usize) -> Vec<u8> {
        let mut ext = Vec::new();
        let next_of = |i: usize| match self.ipv6_ext.get(i) {
            Some(ExtHeader::HopByHop { .. }) => ipv6::HOP_BY_HOP,
            Some(ExtHeader::DestOpts { .. }) => ipv6::DEST_OPTS,
            Some(ExtHeader::Routing { .. }) => ipv6::ROUTING,
            Some(ExtHeader::Fragment { .. }) => ipv6::FRAGMENT,
            Some(ExtHeader::Auth { .. }) => ipv6::AUTH,
            None => self.key.proto.number(),
        };
        for (i, h) in self.ipv6_ext.iter().enumerate() {
            let next = next_of(i + 1);
            let start = ext.len();
            match *h {
                ExtHeader::HopByHop { len8 } | ExtHeader::DestOpts { len8 } => {
                    ext.extend_from_slice(&[next, len8]);
                    ext.resize(start + (usize::from(len8) + 1) * 8, 0);
                }
                ExtHeader::Routing { segments_left, len8 } => {
                    ext.extend_from_slice(&[next, len8, 0, segments_left]);
                    ext.resize(start + (usize::from(len8) + 1) * 8, 0);
                }
                ExtHeader::Fragment { id, offset, more } => {
                    ext.extend_from_slice(&[next, 0]);
                    ext.extend_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
                    ext.extend_from_slice(&id.to_be_bytes());
                }
                ExtHeader::Auth { len4 } => {
                    ext.extend_from_slice(&[next, len4]);
                    ext.resize(start + (usize::from(len4) + 2) * 4, 0);
                }
            }
        }
        let mut h = vec![0x60, 0, 0, 0];
        h.extend_from_slice(&((ext.len() + l4_len) as u16).to_be_bytes());
        h.extend_from_slice(&[next_of(0), self.hop_limit]);
        h.extend_from_slice(src);
        h.extend_from_slice(dst);
        h.extend_from_slice(&ext);
        h
    }
}

/// Valid packets of every shape, fragments included: seeds for fuzzing and benchmarks.
pub fn sample_packets() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let v4: (IpAddr, IpAddr) = ([10, 0, 0, 1].into(), [10, 96, 0, 1].into());
    let v6: (IpAddr, IpAddr) =
        ([0x2001, 0xdb8, 0, 0, 0, 0, 0, 1].into(), [0xfd00, 0, 0, 0, 0, 0, 0, 1].into());
    for proto in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp] {
        for (src, dst) in [v4, v6] {
            let base = PacketBuilder {
                payload: b"0123456789abcdef".to_vec(),
                ..PacketBuilder::new(FlowKey::new(proto, src, 1000, dst, 80))
            };
            let mut variants = vec![
                base.clone(),
                PacketBuilder {
                    tcp_options: vec![2, 4, 5, 0xb4],
                    trailer: vec![0; 6],
                    ..base.clone()
                },
            ];
            if src.is_ipv4() {
                variants.push(PacketBuilder { ipv4_options: vec![1; 12], ..base.clone() });
                variants.push(PacketBuilder { ipv4_fragment: Some((0, true)), ..base.clone() });
                variants.push(PacketBuilder { ipv4_fragment: Some((8, false)), ..base.clone() });
                variants.push(PacketBuilder { udp_zero_checksum: true, ..base.clone() });
            } else {
                for (offset, more) in [(0, false), (0, true), (4, true)] {
                    let ipv6_ext = vec![
                        ExtHeader::HopByHop { len8: 0 },
                        ExtHeader::Routing { segments_left: 0, len8: 0 },
                        ExtHeader::Fragment { id: 7, offset, more },
                        ExtHeader::Auth { len4: 4 },
                        ExtHeader::DestOpts { len8: 1 },
                    ];
                    variants.push(PacketBuilder { ipv6_ext, ..base.clone() });
                }
            }
            out.extend(variants.iter().map(PacketBuilder::build));
        }
    }
    out
}

fn addr_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn padded(opts: &[u8]) -> Vec<u8> {
    let mut v = opts.to_vec();
    v.resize(opts.len().div_ceil(4) * 4, 0);
    v
}
