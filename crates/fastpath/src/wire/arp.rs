//! ARP over Ethernet for IPv4 (RFC 826): the one shape a load balancer answers for its VIPs.

use std::net::Ipv4Addr;

use super::ethernet::{ethertype, MacAddr};
use super::{get16, get8, get_array, put16, put_bytes, WireError};

/// Ethernet/IPv4 ARP body length.
pub const PACKET_LEN: usize = 28;

pub mod op {
    pub const REQUEST: u16 = 1;
    pub const REPLY: u16 = 2;
}

mod field {
    pub const HTYPE: usize = 0;
    pub const PTYPE: usize = 2;
    pub const HLEN: usize = 4;
    pub const PLEN: usize = 5;
    pub const OPER: usize = 6;
    pub const SHA: usize = 8;
    pub const SPA: usize = 14;
    pub const THA: usize = 18;
    pub const TPA: usize = 24;
}

/// A checked Ethernet/IPv4 ARP packet. Other hardware or protocol types are
/// [`WireError::UnsupportedProtocol`] (with the hardware length as the number): nothing a
/// VIP announcer answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArpPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> ArpPacket<T> {
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        let b = buffer.as_ref();
        if b.len() < PACKET_LEN {
            return Err(WireError::Truncated);
        }
        let shape = (get16(b, field::HTYPE), get16(b, field::PTYPE), get8(b, field::HLEN));
        if shape != (1, ethertype::IPV4, 6) || get8(b, field::PLEN) != 4 {
            return Err(WireError::UnsupportedProtocol(get8(b, field::HLEN)));
        }
        Ok(ArpPacket { buffer })
    }

    pub fn operation(&self) -> u16 {
        get16(self.buffer.as_ref(), field::OPER)
    }

    pub fn sender_hw(&self) -> MacAddr {
        MacAddr(get_array(self.buffer.as_ref(), field::SHA))
    }

    pub fn sender_ip(&self) -> Ipv4Addr {
        Ipv4Addr::from(get_array::<4>(self.buffer.as_ref(), field::SPA))
    }

    pub fn target_hw(&self) -> MacAddr {
        MacAddr(get_array(self.buffer.as_ref(), field::THA))
    }

    pub fn target_ip(&self) -> Ipv4Addr {
        Ipv4Addr::from(get_array::<4>(self.buffer.as_ref(), field::TPA))
    }
}

/// What an Ethernet/IPv4 ARP packet says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArpRepr {
    pub operation: u16,
    pub sender_hw: MacAddr,
    pub sender_ip: Ipv4Addr,
    pub target_hw: MacAddr,
    pub target_ip: Ipv4Addr,
}

impl ArpRepr {
    pub fn parse<T: AsRef<[u8]>>(p: &ArpPacket<T>) -> ArpRepr {
        ArpRepr {
            operation: p.operation(),
            sender_hw: p.sender_hw(),
            sender_ip: p.sender_ip(),
            target_hw: p.target_hw(),
            target_ip: p.target_ip(),
        }
    }

    /// Writes the 28-byte packet into `buf`; `Truncated` if it is shorter.
    pub fn emit(&self, buf: &mut [u8]) -> Result<(), WireError> {
        let b = buf.get_mut(..PACKET_LEN).ok_or(WireError::Truncated)?;
        put16(b, field::HTYPE, 1);
        put16(b, field::PTYPE, ethertype::IPV4);
        put_bytes(b, field::HLEN, &[6, 4]);
        put16(b, field::OPER, self.operation);
        put_bytes(b, field::SHA, &self.sender_hw.0);
        put_bytes(b, field::SPA, &self.sender_ip.octets());
        put_bytes(b, field::THA, &self.target_hw.0);
        put_bytes(b, field::TPA, &self.target_ip.octets());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emit_parse_round_trip_and_rejects() {
        let r = ArpRepr {
            operation: op::REQUEST,
            sender_hw: MacAddr([2, 0, 0, 0, 0, 9]),
            sender_ip: Ipv4Addr::new(10, 0, 0, 9),
            target_hw: MacAddr::default(),
            target_ip: Ipv4Addr::new(10, 96, 0, 10),
        };
        let mut b = [0u8; PACKET_LEN];
        r.emit(&mut b).unwrap();
        assert_eq!(b[..8], [0, 1, 8, 0, 6, 4, 0, 1]);
        assert_eq!(ArpRepr::parse(&ArpPacket::new_checked(&b[..]).unwrap()), r);
        assert_eq!(ArpPacket::new_checked(&b[..27]), Err(WireError::Truncated));
        assert!(r.emit(&mut [0u8; 27]).is_err());
        b[1] = 6; // IEEE 802 hardware type
        assert_eq!(ArpPacket::new_checked(&b[..]), Err(WireError::UnsupportedProtocol(6)));
        b[1] = 1;
        b[5] = 16; // a protocol length that is not IPv4's
        assert!(ArpPacket::new_checked(&b[..]).is_err());
    }
}
