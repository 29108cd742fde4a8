//! IPv6 header view (RFC 8200) and the extension-header walk to the transport header.

use std::net::Ipv6Addr;

use super::{get16, get32, get8, get_array, put_bytes, sub, sub_mut, Fragment, WireError};

pub const HEADER_LEN: usize = 40;

/// The most extension headers we follow. Real packets carry a handful; a longer chain only
/// serves to make a receiver spend time (RFC 7112 lets us drop it).
pub const MAX_EXT_HEADERS: usize = 16;

pub const HOP_BY_HOP: u8 = 0;
pub const ROUTING: u8 = 43;
pub const FRAGMENT: u8 = 44;
pub const ESP: u8 = 50;
pub const AUTH: u8 = 51;
pub const NO_NEXT_HEADER: u8 = 59;
pub const DEST_OPTS: u8 = 60;

mod field {
    pub const VER_TC_FLOW: usize = 0;
    pub const PAYLOAD_LEN: usize = 4;
    pub const NEXT_HEADER: usize = 6;
    pub const HOP_LIMIT: usize = 7;
    pub const SRC: usize = 8;
    pub const DST: usize = 24;
}

/// A checked IPv6 packet: `40 + payload_len <= buffer.len()`. No setter changes lengths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv6Packet<T: AsRef<[u8]>> {
    buffer: T,
}

/// Where the extension-header walk stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv6Upper {
    /// The first header that is not an extension header we walk: the transport protocol,
    /// ESP (50), no-next-header (59), or for a later fragment the fragment header's next header.
    pub proto: u8,
    /// Offset of that header from the start of the IPv6 header.
    pub offset: usize,
    pub fragment: Fragment,
}

impl<T: AsRef<[u8]>> Ipv6Packet<T> {
    /// Checks the version and that the buffer holds the declared payload (trailing bytes are
    /// allowed; a payload length of 0 is taken literally, so jumbograms come out truncated).
    #[inline]
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        let b = buffer.as_ref();
        if b.len() < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        if get8(b, field::VER_TC_FLOW) >> 4 != 6 {
            return Err(WireError::BadVersion);
        }
        if HEADER_LEN + usize::from(get16(b, field::PAYLOAD_LEN)) > b.len() {
            return Err(WireError::Truncated);
        }
        Ok(Ipv6Packet { buffer })
    }

    pub fn into_inner(self) -> T {
        self.buffer
    }

    pub fn version(&self) -> u8 {
        get8(self.buffer.as_ref(), field::VER_TC_FLOW) >> 4
    }

    pub fn traffic_class(&self) -> u8 {
        (get16(self.buffer.as_ref(), field::VER_TC_FLOW) >> 4) as u8
    }

    pub fn flow_label(&self) -> u32 {
        get32(self.buffer.as_ref(), field::VER_TC_FLOW) & 0x000f_ffff
    }

    pub fn payload_len(&self) -> usize {
        usize::from(get16(self.buffer.as_ref(), field::PAYLOAD_LEN))
    }

    /// 40 + payload length: the packet as declared.
    pub fn total_len(&self) -> usize {
        HEADER_LEN + self.payload_len()
    }

    /// The header right after the fixed header (maybe an extension header).
    pub fn next_header(&self) -> u8 {
        get8(self.buffer.as_ref(), field::NEXT_HEADER)
    }

    pub fn hop_limit(&self) -> u8 {
        get8(self.buffer.as_ref(), field::HOP_LIMIT)
    }

    pub fn src_addr(&self) -> Ipv6Addr {
        Ipv6Addr::from(get_array::<16>(self.buffer.as_ref(), field::SRC))
    }

    pub fn dst_addr(&self) -> Ipv6Addr {
        Ipv6Addr::from(get_array::<16>(self.buffer.as_ref(), field::DST))
    }

    /// Extension headers and upper layer, up to the declared length.
    pub fn payload(&self) -> &[u8] {
        sub(self.buffer.as_ref(), HEADER_LEN, self.total_len())
    }

    /// Walks hop-by-hop, routing, fragment, destination-options and AH headers to the first
    /// other header. Every header must lie within the declared payload. Stops at a fragment
    /// header with a non-zero offset, since what follows is the middle of someone's payload.
    pub fn upper_layer(&self) -> Result<Ipv6Upper, WireError> {
        let b = self.buffer.as_ref();
        let end = self.total_len();
        let mut nh = self.next_header();
        let mut off = HEADER_LEN;
        let mut fragment = Fragment::NotFragment;
        let mut seen_fragment = false;
        for count in 0..=MAX_EXT_HEADERS {
            let len = match nh {
                HOP_BY_HOP | ROUTING | DEST_OPTS | FRAGMENT | AUTH if count == MAX_EXT_HEADERS => {
                    return Err(WireError::ExtHeaderLoop)
                }
                // RFC 8200 §4.1: hop-by-hop may only come first.
                HOP_BY_HOP if count > 0 => return Err(WireError::BadExtHeader),
                HOP_BY_HOP | ROUTING | DEST_OPTS => (usize::from(get8(b, off + 1)) + 1) * 8,
                AUTH => (usize::from(get8(b, off + 1)) + 2) * 4,
                FRAGMENT => 8,
                _ => return Ok(Ipv6Upper { proto: nh, offset: off, fragment }),
            };
            // `off` never exceeds `end` (<= 65575), so these additions cannot overflow.
            if off + len > end {
                return Err(WireError::Truncated);
            }
            let next = get8(b, off);
            match nh {
                ROUTING if get8(b, off + 3) != 0 => return Err(WireError::RoutingHeader),
                FRAGMENT => {
                    if seen_fragment {
                        return Err(WireError::BadExtHeader);
                    }
                    seen_fragment = true;
                    let frag = get16(b, off + 2);
                    let id = get32(b, off + 4);
                    let (offset, more) = (frag >> 3, frag & 1 != 0);
                    fragment = match (offset, more) {
                        (0, false) => Fragment::NotFragment,
                        (0, true) => Fragment::FirstFragment { id },
                        _ => {
                            return Ok(Ipv6Upper {
                                proto: next,
                                offset: off + len,
                                fragment: Fragment::LaterFragment { id },
                            })
                        }
                    };
                }
                _ => {}
            }
            nh = next;
            off += len;
        }
        Err(WireError::ExtHeaderLoop)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv6Packet<T> {
    /// Writes the address only; L4 checksums are the caller's (see [`crate::wire::rewrite_src`]).
    pub fn set_src_addr(&mut self, addr: Ipv6Addr) {
        put_bytes(self.buffer.as_mut(), field::SRC, &addr.octets());
    }

    pub fn set_dst_addr(&mut self, addr: Ipv6Addr) {
        put_bytes(self.buffer.as_mut(), field::DST, &addr.octets());
    }

    pub fn set_hop_limit(&mut self, hops: u8) {
        put_bytes(self.buffer.as_mut(), field::HOP_LIMIT, &[hops]);
    }

    pub fn payload_mut(&mut self) -> &mut [u8] {
        let end = self.total_len();
        sub_mut(self.buffer.as_mut(), HEADER_LEN, end)
    }
}

/// The fields of an IPv6 header (no extension headers) a sender chooses; see
/// [`Ipv6Repr::emit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv6Repr {
    pub src_addr: Ipv6Addr,
    pub dst_addr: Ipv6Addr,
    pub next_header: u8,
    /// Bytes after the 40-byte header.
    pub payload_len: usize,
    pub hop_limit: u8,
    pub traffic_class: u8,
    /// 20 bits; higher bits are ignored.
    pub flow_label: u32,
}

impl Ipv6Repr {
    /// Writes the 40-byte header into `buf[..40]`. `Truncated` if `buf` is shorter,
    /// `BadTotalLength` if the payload exceeds 65,535 bytes (no jumbograms); nothing is
    /// written then.
    pub fn emit(&self, buf: &mut [u8]) -> Result<(), WireError> {
        let len = u16::try_from(self.payload_len).map_err(|_| WireError::BadTotalLength)?;
        let b = buf.get_mut(..HEADER_LEN).ok_or(WireError::Truncated)?;
        let first =
            (6u32 << 28) | (u32::from(self.traffic_class) << 20) | (self.flow_label & 0xf_ffff);
        put_bytes(b, field::VER_TC_FLOW, &first.to_be_bytes());
        put_bytes(b, field::PAYLOAD_LEN, &len.to_be_bytes());
        put_bytes(b, field::NEXT_HEADER, &[self.next_header, self.hop_limit]);
        put_bytes(b, field::SRC, &self.src_addr.octets());
        put_bytes(b, field::DST, &self.dst_addr.octets());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{ExtHeader, PacketBuilder};
    use crate::{FlowKey, Protocol};

    fn key(proto: Protocol) -> FlowKey {
        FlowKey::new(proto, "2001:db8::1".parse().unwrap(), 40000, "fd00::10".parse().unwrap(), 443)
    }

    fn build(ext: Vec<ExtHeader>) -> Vec<u8> {
        PacketBuilder { ipv6_ext: ext, ..PacketBuilder::new(key(Protocol::Tcp)) }.build()
    }

    #[test]
    fn fields() {
        let b = PacketBuilder {
            hop_limit: 7,
            payload: vec![1, 2, 3],
            ..PacketBuilder::new(key(Protocol::Udp))
        }
        .build();
        let ip = Ipv6Packet::new_checked(&b[..]).unwrap();
        assert_eq!(ip.version(), 6);
        assert_eq!(ip.payload_len(), 11);
        assert_eq!(ip.total_len(), b.len());
        assert_eq!(ip.next_header(), 17);
        assert_eq!(ip.hop_limit(), 7);
        assert_eq!(ip.src_addr(), "2001:db8::1".parse::<Ipv6Addr>().unwrap());
        assert_eq!(ip.dst_addr(), "fd00::10".parse::<Ipv6Addr>().unwrap());
        assert_eq!(
            ip.upper_layer(),
            Ok(Ipv6Upper { proto: 17, offset: 40, fragment: Fragment::NotFragment })
        );
    }

    #[test]
    fn ext_header_chain() {
        let b = build(vec![
            ExtHeader::HopByHop { len8: 0 },
            ExtHeader::DestOpts { len8: 1 },
            ExtHeader::Routing { segments_left: 0, len8: 2 },
            ExtHeader::Fragment { id: 0xdead_beef, offset: 0, more: true },
            ExtHeader::Auth { len4: 4 },
            ExtHeader::DestOpts { len8: 0 },
        ]);
        let ip = Ipv6Packet::new_checked(&b[..]).unwrap();
        let up = ip.upper_layer().unwrap();
        assert_eq!(up.proto, 6);
        assert_eq!(up.offset, 40 + 8 + 16 + 24 + 8 + 24 + 8);
        assert_eq!(up.fragment, Fragment::FirstFragment { id: 0xdead_beef });
    }

    #[test]
    fn atomic_and_later_fragments() {
        let atomic = build(vec![ExtHeader::Fragment { id: 9, offset: 0, more: false }]);
        let up = Ipv6Packet::new_checked(&atomic[..]).unwrap().upper_layer().unwrap();
        assert_eq!((up.proto, up.offset, up.fragment), (6, 48, Fragment::NotFragment));

        let later = build(vec![
            ExtHeader::DestOpts { len8: 0 },
            ExtHeader::Fragment { id: 9, offset: 100, more: true },
        ]);
        let up = Ipv6Packet::new_checked(&later[..]).unwrap().upper_layer().unwrap();
        assert_eq!((up.proto, up.offset, up.fragment), (6, 56, Fragment::LaterFragment { id: 9 }));
    }

    #[test]
    fn rejects() {
        let hbh_late =
            build(vec![ExtHeader::DestOpts { len8: 0 }, ExtHeader::HopByHop { len8: 0 }]);
        assert_eq!(
            Ipv6Packet::new_checked(&hbh_late[..]).unwrap().upper_layer(),
            Err(WireError::BadExtHeader)
        );

        let two_frags = build(vec![
            ExtHeader::Fragment { id: 1, offset: 0, more: true },
            ExtHeader::Fragment { id: 1, offset: 0, more: true },
        ]);
        assert_eq!(
            Ipv6Packet::new_checked(&two_frags[..]).unwrap().upper_layer(),
            Err(WireError::BadExtHeader)
        );

        let routed = build(vec![ExtHeader::Routing { segments_left: 1, len8: 2 }]);
        assert_eq!(
            Ipv6Packet::new_checked(&routed[..]).unwrap().upper_layer(),
            Err(WireError::RoutingHeader)
        );

        let ok = build(vec![ExtHeader::DestOpts { len8: 0 }; MAX_EXT_HEADERS]);
        assert!(Ipv6Packet::new_checked(&ok[..]).unwrap().upper_layer().is_ok());
        let long = build(vec![ExtHeader::DestOpts { len8: 0 }; MAX_EXT_HEADERS + 1]);
        assert_eq!(
            Ipv6Packet::new_checked(&long[..]).unwrap().upper_layer(),
            Err(WireError::ExtHeaderLoop)
        );

        // An extension header that claims more than the payload holds.
        let mut b = build(vec![ExtHeader::DestOpts { len8: 0 }]);
        b[41] = 200;
        assert_eq!(
            Ipv6Packet::new_checked(&b[..]).unwrap().upper_layer(),
            Err(WireError::Truncated)
        );

        let mut b = build(vec![]);
        b[0] = 0x40;
        assert_eq!(Ipv6Packet::new_checked(&b[..]), Err(WireError::BadVersion));
        b[0] = 0x60;
        b[4..6].copy_from_slice(&1000u16.to_be_bytes());
        assert_eq!(Ipv6Packet::new_checked(&b[..]), Err(WireError::Truncated));
        assert_eq!(Ipv6Packet::new_checked(&b[..39]), Err(WireError::Truncated));
    }

    #[test]
    fn setters() {
        let mut b = build(vec![]);
        let mut ip = Ipv6Packet::new_checked(&mut b[..]).unwrap();
        ip.set_dst_addr(Ipv6Addr::LOCALHOST);
        ip.set_src_addr(Ipv6Addr::UNSPECIFIED);
        ip.set_hop_limit(3);
        assert_eq!(ip.dst_addr(), Ipv6Addr::LOCALHOST);
        assert_eq!(ip.src_addr(), Ipv6Addr::UNSPECIFIED);
        assert_eq!(ip.hop_limit(), 3);
        assert_eq!(ip.payload_mut().len(), 20);
    }

    #[test]
    fn repr_emits_a_header_the_view_reads_back() {
        let r = Ipv6Repr {
            src_addr: "2001:db8::1".parse().unwrap(),
            dst_addr: "2001:db8::2".parse().unwrap(),
            next_header: 41,
            payload_len: 20,
            hop_limit: 64,
            traffic_class: 0xb8,
            flow_label: 0xfff_12345,
        };
        let mut b = vec![0u8; 60];
        r.emit(&mut b).unwrap();
        let ip = Ipv6Packet::new_checked(&b[..]).unwrap();
        assert_eq!((ip.version(), ip.traffic_class(), ip.flow_label()), (6, 0xb8, 0x12345));
        assert_eq!((ip.payload_len(), ip.next_header(), ip.hop_limit()), (20, 41, 64));
        assert_eq!((ip.src_addr(), ip.dst_addr()), (r.src_addr, r.dst_addr));
        assert_eq!(r.emit(&mut [0u8; 39]), Err(WireError::Truncated));
        assert_eq!(
            Ipv6Repr { payload_len: 65_536, ..r }.emit(&mut b),
            Err(WireError::BadTotalLength)
        );
    }
}
