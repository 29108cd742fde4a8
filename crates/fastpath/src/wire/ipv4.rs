//! IPv4 header view (RFC 791), options included.

use std::net::Ipv4Addr;

use super::checksum::ipv4_header_checksum;
use super::{get16, get8, get_array, put16, put_bytes, sub, sub_mut, Fragment, WireError};

/// Minimum header length (IHL 5).
pub const HEADER_LEN: usize = 20;

mod field {
    pub const VER_IHL: usize = 0;
    pub const TOS: usize = 1;
    pub const LENGTH: usize = 2;
    pub const IDENT: usize = 4;
    pub const FLAGS_FRAG: usize = 6;
    pub const TTL: usize = 8;
    pub const PROTOCOL: usize = 9;
    pub const CHECKSUM: usize = 10;
    pub const SRC: usize = 12;
    pub const DST: usize = 16;
}

/// A checked IPv4 packet. The length fields have no setters: the constructor proves
/// `20 <= header_len <= total_len <= buffer.len()`, and that must stay true for the view's life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Ipv4Packet<T> {
    /// Checks version, IHL and total length against each other and the buffer. Following the
    /// kernel (`ip_rcv_core`), a buffer shorter than the declared total length is
    /// [`WireError::Truncated`]; a total length shorter than the header is
    /// [`WireError::BadTotalLength`]; trailing bytes past the total length are allowed.
    #[inline]
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        let b = buffer.as_ref();
        if b.len() < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        if get8(b, field::VER_IHL) >> 4 != 4 {
            return Err(WireError::BadVersion);
        }
        let hl = usize::from(get8(b, field::VER_IHL) & 0x0f) * 4;
        if hl < HEADER_LEN {
            return Err(WireError::BadIhl);
        }
        let total = usize::from(get16(b, field::LENGTH));
        if total < hl {
            return Err(WireError::BadTotalLength);
        }
        if total > b.len() {
            return Err(WireError::Truncated);
        }
        Ok(Ipv4Packet { buffer })
    }

    pub fn into_inner(self) -> T {
        self.buffer
    }

    pub fn version(&self) -> u8 {
        get8(self.buffer.as_ref(), field::VER_IHL) >> 4
    }

    /// IHL in bytes (20..=60).
    pub fn header_len(&self) -> usize {
        usize::from(get8(self.buffer.as_ref(), field::VER_IHL) & 0x0f) * 4
    }

    /// DSCP and ECN together (the old TOS byte).
    pub fn tos(&self) -> u8 {
        get8(self.buffer.as_ref(), field::TOS)
    }

    /// Declared packet length; bytes past it in the buffer are not part of the packet.
    pub fn total_len(&self) -> usize {
        usize::from(get16(self.buffer.as_ref(), field::LENGTH))
    }

    pub fn ident(&self) -> u16 {
        get16(self.buffer.as_ref(), field::IDENT)
    }

    pub fn dont_frag(&self) -> bool {
        get16(self.buffer.as_ref(), field::FLAGS_FRAG) & 0x4000 != 0
    }

    pub fn more_frags(&self) -> bool {
        get16(self.buffer.as_ref(), field::FLAGS_FRAG) & 0x2000 != 0
    }

    /// Fragment offset in bytes (the field counts 8-byte units).
    pub fn frag_offset(&self) -> usize {
        usize::from(get16(self.buffer.as_ref(), field::FLAGS_FRAG) & 0x1fff) * 8
    }

    pub fn fragment(&self) -> Fragment {
        let id = u32::from(self.ident());
        match (self.frag_offset(), self.more_frags()) {
            (0, false) => Fragment::NotFragment,
            (0, true) => Fragment::FirstFragment { id },
            _ => Fragment::LaterFragment { id },
        }
    }

    pub fn ttl(&self) -> u8 {
        get8(self.buffer.as_ref(), field::TTL)
    }

    /// IANA protocol number; see [`crate::Protocol::from_number`].
    pub fn protocol(&self) -> u8 {
        get8(self.buffer.as_ref(), field::PROTOCOL)
    }

    pub fn checksum(&self) -> u16 {
        get16(self.buffer.as_ref(), field::CHECKSUM)
    }

    pub fn src_addr(&self) -> Ipv4Addr {
        Ipv4Addr::from(get_array::<4>(self.buffer.as_ref(), field::SRC))
    }

    pub fn dst_addr(&self) -> Ipv4Addr {
        Ipv4Addr::from(get_array::<4>(self.buffer.as_ref(), field::DST))
    }

    pub fn options(&self) -> &[u8] {
        sub(self.buffer.as_ref(), HEADER_LEN, self.header_len())
    }

    /// The bytes after the header, up to the declared total length.
    pub fn payload(&self) -> &[u8] {
        sub(self.buffer.as_ref(), self.header_len(), self.total_len())
    }

    pub fn verify_checksum(&self) -> bool {
        ipv4_header_checksum(sub(self.buffer.as_ref(), 0, self.header_len())) == self.checksum()
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv4Packet<T> {
    /// Writes the address only; the header and L4 checksums are the caller's (see
    /// [`crate::wire::rewrite_src`] for the whole NAT).
    pub fn set_src_addr(&mut self, addr: Ipv4Addr) {
        put_bytes(self.buffer.as_mut(), field::SRC, &addr.octets());
    }

    pub fn set_dst_addr(&mut self, addr: Ipv4Addr) {
        put_bytes(self.buffer.as_mut(), field::DST, &addr.octets());
    }

    pub fn set_ttl(&mut self, ttl: u8) {
        put_bytes(self.buffer.as_mut(), field::TTL, &[ttl]);
    }

    pub fn set_tos(&mut self, tos: u8) {
        put_bytes(self.buffer.as_mut(), field::TOS, &[tos]);
    }

    pub fn set_ident(&mut self, ident: u16) {
        put16(self.buffer.as_mut(), field::IDENT, ident);
    }

    pub fn set_checksum(&mut self, checksum: u16) {
        put16(self.buffer.as_mut(), field::CHECKSUM, checksum);
    }

    /// Recomputes the header checksum from scratch.
    pub fn fill_checksum(&mut self) {
        let c = ipv4_header_checksum(sub(self.buffer.as_ref(), 0, self.header_len()));
        self.set_checksum(c);
    }

    pub fn payload_mut(&mut self) -> &mut [u8] {
        let (start, end) = (self.header_len(), self.total_len());
        sub_mut(self.buffer.as_mut(), start, end)
    }
}

/// The fields of an option-less IPv4 header a sender chooses; [`Ipv4Repr::emit`] writes it
/// with its checksum (an encapsulating or ICMP-answering datapath builds headers with it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Repr {
    pub src_addr: Ipv4Addr,
    pub dst_addr: Ipv4Addr,
    pub protocol: u8,
    /// Bytes after the header.
    pub payload_len: usize,
    pub ttl: u8,
    pub tos: u8,
    pub ident: u16,
    pub dont_frag: bool,
}

impl Ipv4Repr {
    /// Writes the 20-byte header into `buf[..20]`. `Truncated` if `buf` is shorter,
    /// `BadTotalLength` if the packet would exceed 65,535 bytes; nothing is written then.
    pub fn emit(&self, buf: &mut [u8]) -> Result<(), WireError> {
        let total =
            u16::try_from(HEADER_LEN + self.payload_len).map_err(|_| WireError::BadTotalLength)?;
        let b = buf.get_mut(..HEADER_LEN).ok_or(WireError::Truncated)?;
        b[field::VER_IHL] = 0x45;
        b[field::TOS] = self.tos;
        put16(b, field::LENGTH, total);
        put16(b, field::IDENT, self.ident);
        put16(b, field::FLAGS_FRAG, if self.dont_frag { 0x4000 } else { 0 });
        b[field::TTL] = self.ttl;
        b[field::PROTOCOL] = self.protocol;
        put_bytes(b, field::SRC, &self.src_addr.octets());
        put_bytes(b, field::DST, &self.dst_addr.octets());
        let c = ipv4_header_checksum(b);
        put16(b, field::CHECKSUM, c);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::PacketBuilder;
    use crate::{FlowKey, Protocol};

    fn key() -> FlowKey {
        FlowKey::new(
            Protocol::Tcp,
            "10.0.0.1".parse().unwrap(),
            1234,
            "10.96.0.10".parse().unwrap(),
            80,
        )
    }

    #[test]
    fn fields() {
        let b = PacketBuilder { payload: b"hello".to_vec(), ttl: 63, ..PacketBuilder::new(key()) }
            .build();
        let ip = Ipv4Packet::new_checked(&b[..]).unwrap();
        assert_eq!(ip.version(), 4);
        assert_eq!(ip.header_len(), 20);
        assert_eq!(ip.total_len(), b.len());
        assert_eq!(ip.ttl(), 63);
        assert_eq!(ip.protocol(), 6);
        assert_eq!(ip.src_addr(), Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(ip.dst_addr(), Ipv4Addr::new(10, 96, 0, 10));
        assert_eq!(ip.fragment(), Fragment::NotFragment);
        assert!(ip.dont_frag());
        assert!(ip.options().is_empty());
        assert_eq!(ip.payload().len(), 20 + 5);
        assert!(ip.verify_checksum());
    }

    #[test]
    fn options_and_trailer() {
        // Router alert (4 bytes) + a 3-byte NOP run padded to 8: IHL 7.
        let b = PacketBuilder {
            ipv4_options: vec![0x94, 0x04, 0x00, 0x00, 0x01, 0x01, 0x01],
            trailer: vec![0xee; 6],
            ..PacketBuilder::new(key())
        }
        .build();
        let ip = Ipv4Packet::new_checked(&b[..]).unwrap();
        assert_eq!(ip.header_len(), 28);
        assert_eq!(ip.options(), &[0x94, 0x04, 0x00, 0x00, 0x01, 0x01, 0x01, 0x00]);
        assert_eq!(ip.total_len(), b.len() - 6);
        assert_eq!(ip.payload().len(), 20);
        assert!(ip.verify_checksum());
    }

    #[test]
    fn rejects() {
        let good = PacketBuilder::new(key()).build();
        let check = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut b = good.clone();
            f(&mut b);
            Ipv4Packet::new_checked(&b[..]).err()
        };
        assert_eq!(check(&|b| b[0] = 0x65), Some(WireError::BadVersion));
        assert_eq!(check(&|b| b[0] = 0x44), Some(WireError::BadIhl));
        assert_eq!(check(&|b| b[0] = 0x4f), Some(WireError::BadTotalLength));
        assert_eq!(
            check(&|b| b[2..4].copy_from_slice(&19u16.to_be_bytes())),
            Some(WireError::BadTotalLength)
        );
        assert_eq!(
            check(&|b| b[2..4].copy_from_slice(&0xffffu16.to_be_bytes())),
            Some(WireError::Truncated)
        );
        assert_eq!(check(&|b| b.truncate(19)), Some(WireError::Truncated));
        assert_eq!(check(&|b| b.truncate(39)), Some(WireError::Truncated));
        assert_eq!(check(&|_| {}), None);
    }

    #[test]
    fn fragments_and_setters() {
        let mut b = PacketBuilder::new(key()).build();
        b[6] = 0x20; // MF, offset 0
        assert_eq!(
            Ipv4Packet::new_checked(&b[..]).unwrap().fragment(),
            Fragment::FirstFragment { id: 0x1234 }
        );
        b[6] = 0x00;
        b[7] = 0x03; // offset 24 bytes, no MF: the last fragment
        let ip = Ipv4Packet::new_checked(&b[..]).unwrap();
        assert_eq!(ip.frag_offset(), 24);
        assert_eq!(ip.fragment(), Fragment::LaterFragment { id: 0x1234 });

        let mut ip = Ipv4Packet::new_checked(&mut b[..]).unwrap();
        ip.set_dst_addr(Ipv4Addr::new(192, 168, 1, 2));
        ip.set_ttl(1);
        assert!(!ip.verify_checksum());
        ip.fill_checksum();
        assert!(ip.verify_checksum());
        assert_eq!(ip.dst_addr(), Ipv4Addr::new(192, 168, 1, 2));
        assert_eq!(ip.payload_mut().len(), 20);
    }

    #[test]
    fn repr_emits_a_valid_header() {
        let r = Ipv4Repr {
            src_addr: Ipv4Addr::new(10, 0, 0, 1),
            dst_addr: Ipv4Addr::new(10, 0, 0, 2),
            protocol: 4,
            payload_len: 40,
            ttl: 64,
            tos: 0x10,
            ident: 7,
            dont_frag: true,
        };
        let mut b = vec![0xaa; 60];
        r.emit(&mut b).unwrap();
        let ip = Ipv4Packet::new_checked(&b[..]).unwrap();
        assert!(ip.verify_checksum() && ip.dont_frag() && !ip.more_frags());
        assert_eq!(
            (ip.total_len(), ip.protocol(), ip.ttl(), ip.tos(), ip.ident()),
            (60, 4, 64, 0x10, 7)
        );
        assert_eq!((ip.src_addr(), ip.dst_addr()), (r.src_addr, r.dst_addr));
        assert_eq!(r.emit(&mut [0u8; 19]), Err(WireError::Truncated));
        let huge = Ipv4Repr { payload_len: 65_516, ..r };
        assert_eq!(huge.emit(&mut b), Err(WireError::BadTotalLength));
    }
}
