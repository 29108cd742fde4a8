//! SCTP common header view (RFC 9260 §3.1).

use super::checksum::sctp_checksum;
use super::{get16, get32, get8, put16, put_bytes, sub, WireError};

pub const HEADER_LEN: usize = 12;

/// Chunk types a connection tracker cares about.
pub const CHUNK_INIT: u8 = 1;
pub const CHUNK_INIT_ACK: u8 = 2;
pub const CHUNK_ABORT: u8 = 6;
pub const CHUNK_SHUTDOWN_COMPLETE: u8 = 14;

mod field {
    pub const SRC_PORT: usize = 0;
    pub const DST_PORT: usize = 2;
    pub const VTAG: usize = 4;
    pub const CHECKSUM: usize = 8;
}

/// A checked SCTP packet; the buffer is the whole IP payload (the CRC32c covers all of it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SctpPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> SctpPacket<T> {
    #[inline]
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        if buffer.as_ref().len() < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        Ok(SctpPacket { buffer })
    }

    pub fn into_inner(self) -> T {
        self.buffer
    }

    pub fn src_port(&self) -> u16 {
        get16(self.buffer.as_ref(), field::SRC_PORT)
    }

    pub fn dst_port(&self) -> u16 {
        get16(self.buffer.as_ref(), field::DST_PORT)
    }

    pub fn verification_tag(&self) -> u32 {
        get32(self.buffer.as_ref(), field::VTAG)
    }

    /// The CRC32c as a number (the field holds it least-significant byte first).
    pub fn checksum(&self) -> u32 {
        u32::from_le_bytes(super::get_array::<4>(self.buffer.as_ref(), field::CHECKSUM))
    }

    /// The type of the first chunk (INIT opens an association), if any chunk is present.
    pub fn first_chunk_type(&self) -> Option<u8> {
        let b = self.buffer.as_ref();
        (b.len() > HEADER_LEN).then(|| get8(b, HEADER_LEN))
    }

    pub fn chunks(&self) -> &[u8] {
        let b = self.buffer.as_ref();
        sub(b, HEADER_LEN, b.len())
    }

    pub fn verify_checksum(&self) -> bool {
        sctp_checksum(self.buffer.as_ref()) == self.checksum()
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> SctpPacket<T> {
    pub fn set_src_port(&mut self, port: u16) {
        put16(self.buffer.as_mut(), field::SRC_PORT, port);
    }

    pub fn set_dst_port(&mut self, port: u16) {
        put16(self.buffer.as_mut(), field::DST_PORT, port);
    }

    pub fn set_verification_tag(&mut self, tag: u32) {
        put_bytes(self.buffer.as_mut(), field::VTAG, &tag.to_be_bytes());
    }

    pub fn set_checksum(&mut self, crc: u32) {
        put_bytes(self.buffer.as_mut(), field::CHECKSUM, &crc.to_le_bytes());
    }

    /// Recomputes the CRC32c over the whole packet. There is no pseudo-header, so only the
    /// SCTP bytes themselves matter.
    pub fn fill_checksum(&mut self) {
        let crc = sctp_checksum(self.buffer.as_ref());
        self.set_checksum(crc);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An INIT chunk header (type 1, flags 0, length 20) plus 16 bytes of parameters.
    fn packet() -> Vec<u8> {
        let mut b = vec![0u8; 32];
        b[0..2].copy_from_slice(&5000u16.to_be_bytes());
        b[2..4].copy_from_slice(&38412u16.to_be_bytes());
        b[4..8].copy_from_slice(&0u32.to_be_bytes());
        b[12] = CHUNK_INIT;
        b[14..16].copy_from_slice(&20u16.to_be_bytes());
        b[16..20].copy_from_slice(&0xabcd_0123u32.to_be_bytes());
        b
    }

    #[test]
    fn fields_and_crc() {
        let mut b = packet();
        let mut s = SctpPacket::new_checked(&mut b[..]).unwrap();
        assert_eq!((s.src_port(), s.dst_port(), s.verification_tag()), (5000, 38412, 0));
        assert_eq!(s.first_chunk_type(), Some(CHUNK_INIT));
        assert_eq!(s.chunks().len(), 20);
        assert!(!s.verify_checksum());
        s.fill_checksum();
        assert!(s.verify_checksum());
        // Stored least-significant byte first.
        let crc = sctp_checksum(&b);
        assert_eq!(&b[8..12], &crc.to_le_bytes());
        // The stored checksum does not feed its own computation.
        let mut c = b.clone();
        c[8..12].copy_from_slice(&[1, 2, 3, 4]);
        assert_eq!(sctp_checksum(&c), crc);
    }

    #[test]
    fn rejects_and_setters() {
        let mut b = packet();
        for n in 0..HEADER_LEN {
            assert_eq!(SctpPacket::new_checked(&b[..n]), Err(WireError::Truncated));
        }
        assert_eq!(SctpPacket::new_checked(&b[..12]).unwrap().first_chunk_type(), None);
        let mut s = SctpPacket::new_checked(&mut b[..]).unwrap();
        s.set_src_port(1);
        s.set_dst_port(2);
        s.set_verification_tag(3);
        s.set_checksum(0x0403_0201);
        assert_eq!((s.src_port(), s.dst_port(), s.verification_tag()), (1, 2, 3));
        assert_eq!(&b[8..12], &[1, 2, 3, 4]);
    }
}
