//! UDP header view (RFC 768).

use super::{get16, put16, sub, sub_mut, WireError};

pub const HEADER_LEN: usize = 8;

mod field {
    pub const SRC_PORT: usize = 0;
    pub const DST_PORT: usize = 2;
    pub const LENGTH: usize = 4;
    pub const CHECKSUM: usize = 6;
}

/// A checked UDP datagram; the buffer is the IP payload. Bytes past the UDP length are IP
/// padding, as the kernel trims them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> UdpPacket<T> {
    /// The whole datagram must be here: `8 <= length <= buffer.len()`.
    #[inline]
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        let p = Self::new_checked_header(buffer)?;
        if p.len() > p.buffer.as_ref().len() {
            return Err(WireError::BadUdpLength);
        }
        Ok(p)
    }

    /// Only the 8-byte header must be here (and the length at least 8): for the first fragment
    /// of a datagram, whose length counts bytes that travel in later fragments.
    #[inline]
    pub fn new_checked_header(buffer: T) -> Result<Self, WireError> {
        let b = buffer.as_ref();
        if b.len() < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        if usize::from(get16(b, field::LENGTH)) < HEADER_LEN {
            return Err(WireError::BadUdpLength);
        }
        Ok(UdpPacket { buffer })
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

    /// The UDP length field: header plus data.
    #[allow(clippy::len_without_is_empty)] // a datagram is never shorter than its header
    pub fn len(&self) -> usize {
        usize::from(get16(self.buffer.as_ref(), field::LENGTH))
    }

    /// 0 means "no checksum" (allowed over IPv4 only).
    pub fn checksum(&self) -> u16 {
        get16(self.buffer.as_ref(), field::CHECKSUM)
    }

    /// Data up to the UDP length (or the buffer end, for a first fragment).
    pub fn payload(&self) -> &[u8] {
        let b = self.buffer.as_ref();
        sub(b, HEADER_LEN, self.len().min(b.len()))
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> UdpPacket<T> {
    /// Raw field writes; the NAT functions in [`crate::wire`] keep the checksum right.
    pub fn set_src_port(&mut self, port: u16) {
        put16(self.buffer.as_mut(), field::SRC_PORT, port);
    }

    pub fn set_dst_port(&mut self, port: u16) {
        put16(self.buffer.as_mut(), field::DST_PORT, port);
    }

    pub fn set_checksum(&mut self, checksum: u16) {
        put16(self.buffer.as_mut(), field::CHECKSUM, checksum);
    }

    pub fn payload_mut(&mut self) -> &mut [u8] {
        let len = self.len();
        let b = self.buffer.as_mut();
        let end = len.min(b.len());
        sub_mut(b, HEADER_LEN, end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn datagram() -> Vec<u8> {
        let mut b = vec![0u8; 14];
        b[0..2].copy_from_slice(&53u16.to_be_bytes());
        b[2..4].copy_from_slice(&5353u16.to_be_bytes());
        b[4..6].copy_from_slice(&12u16.to_be_bytes()); // 2 bytes of IP padding follow
        b[6..8].copy_from_slice(&0x1234u16.to_be_bytes());
        b[8..12].copy_from_slice(b"abcd");
        b
    }

    #[test]
    fn fields() {
        let b = datagram();
        let u = UdpPacket::new_checked(&b[..]).unwrap();
        assert_eq!((u.src_port(), u.dst_port(), u.len(), u.checksum()), (53, 5353, 12, 0x1234));
        assert_eq!(u.payload(), b"abcd");
    }

    #[test]
    fn rejects() {
        let b = datagram();
        for n in 0..HEADER_LEN {
            assert_eq!(UdpPacket::new_checked(&b[..n]), Err(WireError::Truncated));
        }
        assert_eq!(UdpPacket::new_checked(&b[..11]), Err(WireError::BadUdpLength));
        let first_fragment = UdpPacket::new_checked_header(&b[..10]).unwrap();
        assert_eq!(first_fragment.payload(), b"ab");
        let mut bad = b.clone();
        bad[4..6].copy_from_slice(&7u16.to_be_bytes());
        assert_eq!(UdpPacket::new_checked(&bad[..]), Err(WireError::BadUdpLength));
        assert_eq!(UdpPacket::new_checked_header(&bad[..]), Err(WireError::BadUdpLength));
    }

    #[test]
    fn setters() {
        let mut b = datagram();
        let mut u = UdpPacket::new_checked(&mut b[..]).unwrap();
        u.set_src_port(1);
        u.set_dst_port(2);
        u.set_checksum(0);
        u.payload_mut().copy_from_slice(b"wxyz");
        assert_eq!((u.src_port(), u.dst_port(), u.checksum()), (1, 2, 0));
        assert_eq!(&b[8..], b"wxyz\0\0");
    }
}
