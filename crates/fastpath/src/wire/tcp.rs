//! TCP header view (RFC 9293).

use super::{get16, get32, get8, put16, sub, sub_mut, WireError};
use crate::flow::TcpFlags;

pub const HEADER_LEN: usize = 20;

mod field {
    pub const SRC_PORT: usize = 0;
    pub const DST_PORT: usize = 2;
    pub const SEQ: usize = 4;
    pub const ACK: usize = 8;
    pub const OFFSET: usize = 12;
    pub const FLAGS: usize = 13;
    pub const WINDOW: usize = 14;
    pub const CHECKSUM: usize = 16;
    pub const URGENT: usize = 18;
}

/// A checked TCP segment: the buffer is the segment (header + data, as the IP header bounds
/// it) and `20 <= header_len <= buffer.len()`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> TcpPacket<T> {
    #[inline]
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        let b = buffer.as_ref();
        if b.len() < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        let hl = usize::from(get8(b, field::OFFSET) >> 4) * 4;
        if hl < HEADER_LEN || hl > b.len() {
            return Err(WireError::BadTcpOffset);
        }
        Ok(TcpPacket { buffer })
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

    pub fn seq_number(&self) -> u32 {
        get32(self.buffer.as_ref(), field::SEQ)
    }

    pub fn ack_number(&self) -> u32 {
        get32(self.buffer.as_ref(), field::ACK)
    }

    /// Data offset in bytes (20..=60).
    pub fn header_len(&self) -> usize {
        usize::from(get8(self.buffer.as_ref(), field::OFFSET) >> 4) * 4
    }

    /// FIN..CWR: the low byte of the flags field.
    pub fn flags(&self) -> TcpFlags {
        TcpFlags(get8(self.buffer.as_ref(), field::FLAGS))
    }

    pub fn window_len(&self) -> u16 {
        get16(self.buffer.as_ref(), field::WINDOW)
    }

    pub fn checksum(&self) -> u16 {
        get16(self.buffer.as_ref(), field::CHECKSUM)
    }

    pub fn urgent_at(&self) -> u16 {
        get16(self.buffer.as_ref(), field::URGENT)
    }

    pub fn options(&self) -> &[u8] {
        sub(self.buffer.as_ref(), HEADER_LEN, self.header_len())
    }

    pub fn payload(&self) -> &[u8] {
        let b = self.buffer.as_ref();
        sub(b, self.header_len(), b.len())
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> TcpPacket<T> {
    /// Ports and checksum are set raw: the checksum also covers the IP pseudo-header, so the
    /// NAT functions in [`crate::wire`] update it incrementally instead.
    pub fn set_src_port(&mut self, port: u16) {
        put16(self.buffer.as_mut(), field::SRC_PORT, port);
    }

    pub fn set_dst_port(&mut self, port: u16) {
        put16(self.buffer.as_mut(), field::DST_PORT, port);
    }

    pub fn set_checksum(&mut self, checksum: u16) {
        put16(self.buffer.as_mut(), field::CHECKSUM, checksum);
    }

    pub fn set_flags(&mut self, flags: TcpFlags) {
        super::put_bytes(self.buffer.as_mut(), field::FLAGS, &[flags.0]);
    }

    pub fn payload_mut(&mut self) -> &mut [u8] {
        let start = self.header_len();
        let b = self.buffer.as_mut();
        let end = b.len();
        sub_mut(b, start, end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment() -> Vec<u8> {
        let mut b = vec![0u8; 28];
        b[0..2].copy_from_slice(&1234u16.to_be_bytes());
        b[2..4].copy_from_slice(&80u16.to_be_bytes());
        b[4..8].copy_from_slice(&7u32.to_be_bytes());
        b[8..12].copy_from_slice(&9u32.to_be_bytes());
        b[12] = 6 << 4; // 24-byte header: 4 bytes of options
        b[13] = TcpFlags::SYN | TcpFlags::ACK;
        b[14..16].copy_from_slice(&512u16.to_be_bytes());
        b[16..18].copy_from_slice(&0xbeefu16.to_be_bytes());
        b[20..24].copy_from_slice(&[2, 4, 5, 0xb4]); // MSS 1460
        b[24..28].copy_from_slice(b"data");
        b
    }

    #[test]
    fn fields() {
        let b = segment();
        let t = TcpPacket::new_checked(&b[..]).unwrap();
        assert_eq!((t.src_port(), t.dst_port()), (1234, 80));
        assert_eq!((t.seq_number(), t.ack_number()), (7, 9));
        assert_eq!(t.header_len(), 24);
        assert!(t.flags().syn() && t.flags().ack() && !t.flags().is_initial_syn());
        assert_eq!(t.window_len(), 512);
        assert_eq!(t.checksum(), 0xbeef);
        assert_eq!(t.urgent_at(), 0);
        assert_eq!(t.options(), &[2, 4, 5, 0xb4]);
        assert_eq!(t.payload(), b"data");
    }

    #[test]
    fn rejects() {
        let b = segment();
        for n in 0..HEADER_LEN {
            assert_eq!(TcpPacket::new_checked(&b[..n]), Err(WireError::Truncated));
        }
        assert_eq!(TcpPacket::new_checked(&b[..23]), Err(WireError::BadTcpOffset));
        assert!(TcpPacket::new_checked(&b[..24]).is_ok());
        let mut bad = b.clone();
        bad[12] = 4 << 4;
        assert_eq!(TcpPacket::new_checked(&bad[..]), Err(WireError::BadTcpOffset));
        bad[12] = 15 << 4;
        assert_eq!(TcpPacket::new_checked(&bad[..]), Err(WireError::BadTcpOffset));
    }

    #[test]
    fn setters() {
        let mut b = segment();
        let mut t = TcpPacket::new_checked(&mut b[..]).unwrap();
        t.set_src_port(1);
        t.set_dst_port(2);
        t.set_checksum(3);
        t.set_flags(TcpFlags(TcpFlags::RST));
        t.payload_mut().copy_from_slice(b"DATA");
        assert_eq!((t.src_port(), t.dst_port(), t.checksum()), (1, 2, 3));
        assert!(t.flags().rst());
        assert_eq!(t.payload(), b"DATA");
    }
}
