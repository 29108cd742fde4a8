//! Ethernet II frame view (IEEE 802.3 with an EtherType): what AF_PACKET hands a one-armed
//! load balancer. VLAN tags are not walked: a tagged frame reports EtherType 0x8100.

use std::fmt;

use super::{get16, get_array, put16, put_bytes, sub, sub_mut, WireError};

pub const HEADER_LEN: usize = 14;

/// EtherType values the load balancer looks at.
pub mod ethertype {
    pub const IPV4: u16 = 0x0800;
    pub const ARP: u16 = 0x0806;
    pub const VLAN: u16 = 0x8100;
    pub const IPV6: u16 = 0x86dd;
}

mod field {
    pub const DST: usize = 0;
    pub const SRC: usize = 6;
    pub const ETHERTYPE: usize = 12;
}

/// A 48-bit MAC address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);

    pub const fn is_broadcast(&self) -> bool {
        matches!(self.0, [0xff, 0xff, 0xff, 0xff, 0xff, 0xff])
    }

    /// Group bit set (broadcast included).
    pub const fn is_multicast(&self) -> bool {
        self.0[0] & 1 != 0
    }

    /// The multicast MAC an IPv6 multicast address maps to (RFC 2464 §7): 33:33 and its
    /// last 32 bits.
    pub fn ipv6_multicast(addr: &std::net::Ipv6Addr) -> MacAddr {
        let o = addr.octets();
        MacAddr([0x33, 0x33, o[12], o[13], o[14], o[15]])
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl std::str::FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut out {
            let p = parts.next().ok_or_else(|| format!("bad MAC address {s:?}"))?;
            *b = u8::from_str_radix(p, 16).map_err(|_| format!("bad MAC address {s:?}"))?;
        }
        if parts.next().is_some() {
            return Err(format!("bad MAC address {s:?}"));
        }
        Ok(MacAddr(out))
    }
}

/// A checked Ethernet frame: at least the 14-byte header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EthernetFrame<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> EthernetFrame<T> {
    #[inline]
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        if buffer.as_ref().len() < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        Ok(EthernetFrame { buffer })
    }

    pub fn into_inner(self) -> T {
        self.buffer
    }

    pub fn dst_addr(&self) -> MacAddr {
        MacAddr(get_array(self.buffer.as_ref(), field::DST))
    }

    pub fn src_addr(&self) -> MacAddr {
        MacAddr(get_array(self.buffer.as_ref(), field::SRC))
    }

    pub fn ethertype(&self) -> u16 {
        get16(self.buffer.as_ref(), field::ETHERTYPE)
    }

    /// Everything after the header (the link layer's padding included: IP knows its length).
    pub fn payload(&self) -> &[u8] {
        let b = self.buffer.as_ref();
        sub(b, HEADER_LEN, b.len())
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> EthernetFrame<T> {
    pub fn set_dst_addr(&mut self, addr: MacAddr) {
        put_bytes(self.buffer.as_mut(), field::DST, &addr.0);
    }

    pub fn set_src_addr(&mut self, addr: MacAddr) {
        put_bytes(self.buffer.as_mut(), field::SRC, &addr.0);
    }

    pub fn set_ethertype(&mut self, ethertype: u16) {
        put16(self.buffer.as_mut(), field::ETHERTYPE, ethertype);
    }

    pub fn payload_mut(&mut self) -> &mut [u8] {
        let b = self.buffer.as_mut();
        let end = b.len();
        sub_mut(b, HEADER_LEN, end)
    }
}

/// Writes an Ethernet header into `buf[..14]`; `Truncated` if `buf` is shorter.
pub fn emit_header(
    buf: &mut [u8],
    dst: MacAddr,
    src: MacAddr,
    ethertype: u16,
) -> Result<(), WireError> {
    let mut f = EthernetFrame::new_checked(buf)?;
    f.set_dst_addr(dst);
    f.set_src_addr(src);
    f.set_ethertype(ethertype);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_and_setters() {
        let mut b = [0u8; 20];
        emit_header(&mut b, MacAddr::BROADCAST, MacAddr([2, 0, 0, 0, 0, 1]), ethertype::ARP)
            .unwrap();
        let f = EthernetFrame::new_checked(&b[..]).unwrap();
        assert!(f.dst_addr().is_broadcast() && f.dst_addr().is_multicast());
        assert_eq!(f.src_addr(), "02:00:00:00:00:01".parse().unwrap());
        assert!(!f.src_addr().is_multicast());
        assert_eq!(f.ethertype(), ethertype::ARP);
        assert_eq!(f.payload().len(), 6);
        assert_eq!(EthernetFrame::new_checked(&b[..13]), Err(WireError::Truncated));
        assert!(emit_header(&mut b[..13], MacAddr::BROADCAST, MacAddr::BROADCAST, 0).is_err());
    }

    #[test]
    fn mac_text_and_multicast_mapping() {
        assert_eq!(MacAddr([0xa, 0xb, 0xc, 0, 0xff, 1]).to_string(), "0a:0b:0c:00:ff:01");
        assert!("0a:0b:0c:00:ff".parse::<MacAddr>().is_err());
        assert!("0a:0b:0c:00:ff:01:02".parse::<MacAddr>().is_err());
        assert!("0a:0b:0c:00:ff:zz".parse::<MacAddr>().is_err());
        let group: std::net::Ipv6Addr = "ff02::1:ff00:10".parse().unwrap();
        assert_eq!(MacAddr::ipv6_multicast(&group), MacAddr([0x33, 0x33, 0xff, 0, 0, 0x10]));
    }
}
