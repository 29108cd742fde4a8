//! The layout of a TPACKET_V3 receive block (`linux/if_packet.h`), read from bytes: a
//! block descriptor, then packets chained by `tp_next_offset`. Pure, so the walk is tested
//! without a socket; [`sys`](super::sys) hands over a block's bytes only while user space
//! owns it.
//!
//! Every offset comes from the kernel, but the walk trusts none of them: a frame outside
//! the block ends the walk instead of panicking.

/// `struct tpacket_block_desc` + `struct tpacket_hdr_v1` offsets.
mod block {
    pub const BLOCK_STATUS: usize = 8;
    pub const NUM_PKTS: usize = 12;
    pub const OFFSET_TO_FIRST_PKT: usize = 16;
    pub const BLK_LEN: usize = 20;
}

/// `struct tpacket3_hdr` offsets.
mod pkt {
    pub const NEXT_OFFSET: usize = 0;
    pub const SNAPLEN: usize = 12;
    pub const LEN: usize = 16;
    pub const STATUS: usize = 20;
    pub const MAC: usize = 24;
    pub const HEADER_LEN: usize = 48;
}

/// `tp_status` bits.
pub const TP_STATUS_KERNEL: u32 = 0;
pub const TP_STATUS_USER: u32 = 1;
pub const TP_STATUS_COPY: u32 = 1 << 1;
pub const TP_STATUS_LOSING: u32 = 1 << 2;
/// The L4 checksum is only the pseudo-header's (a local or virtual sender offloaded it).
pub const TP_STATUS_CSUMNOTREADY: u32 = 1 << 3;
pub const TP_STATUS_VLAN_VALID: u32 = 1 << 4;

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

/// `struct virtio_net_hdr` (`linux/virtio_net.h`): what a socket with `PACKET_VNET_HDR`
/// finds before each received frame and puts before each frame it sends. It carries the
/// offloads the kernel left undone: a partial L4 checksum and GSO (a super-packet the
/// device, or the kernel, cuts into `gso_size`-byte segments). Fields in host byte order
/// (the kernel's `vio_le()`: little-endian on little-endian hosts, which is all we run on).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VnetHeader {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    /// From the start of the Ethernet header.
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHeader {
    pub const LEN: usize = 10;
    /// `flags`: the L4 checksum is only the pseudo-header's, to finish at `csum_start`.
    pub const F_NEEDS_CSUM: u8 = 1;
    pub const GSO_NONE: u8 = 0;
    pub const GSO_TCPV4: u8 = 1;
    pub const GSO_UDP: u8 = 3;
    pub const GSO_TCPV6: u8 = 4;
    pub const GSO_UDP_L4: u8 = 5;
    pub const GSO_ECN: u8 = 0x80;

    pub fn parse(b: &[u8]) -> Option<VnetHeader> {
        let b: &[u8; Self::LEN] = b.get(..Self::LEN)?.try_into().ok()?;
        let u16_at = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        Some(VnetHeader {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        })
    }

    pub fn to_bytes(self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
        b
    }

    /// A GSO super-packet: more than one segment's worth, cut up on the way out.
    pub fn is_gso(&self) -> bool {
        self.gso_type & !Self::GSO_ECN != Self::GSO_NONE
    }

    pub fn needs_checksum(&self) -> bool {
        self.flags & Self::F_NEEDS_CSUM != 0
    }
}

/// One received frame of a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RxFrame<'a> {
    /// The captured bytes, from the Ethernet header.
    pub data: &'a [u8],
    /// Length on the wire; more than `data.len()` when the frame was cut to the ring's size.
    pub wire_len: usize,
    /// The NIC stripped a VLAN tag (reported beside the frame, not in it): not ours.
    pub vlan: bool,
    /// The L4 checksum is to be completed by whoever sends the packet on (us).
    pub checksum_partial: bool,
    /// The frame's virtio header, on a ring of a socket with `PACKET_VNET_HDR` (see
    /// [`frames_with_vnet`]); `None` without, or if it lies outside the block.
    pub vnet: Option<VnetHeader>,
}

/// The status word of a block (`TP_STATUS_USER` when the kernel handed it over).
pub fn block_status(block: &[u8]) -> u32 {
    u32_at(block, block::BLOCK_STATUS).unwrap_or(TP_STATUS_KERNEL)
}

/// The frames of a block user space owns.
pub fn frames(block: &[u8]) -> Frames<'_> {
    let n = u32_at(block, block::NUM_PKTS).unwrap_or(0);
    let first = u32_at(block, block::OFFSET_TO_FIRST_PKT).unwrap_or(0) as usize;
    let len = (u32_at(block, block::BLK_LEN).unwrap_or(0) as usize).min(block.len());
    Frames { block: &block[..len], next: first, left: n, vnet: false }
}

/// [`frames`] of a socket with `PACKET_VNET_HDR`: the kernel wrote each frame's
/// [`VnetHeader`] just before its Ethernet header.
pub fn frames_with_vnet(block: &[u8]) -> Frames<'_> {
    Frames { vnet: true, ..frames(block) }
}

/// Iterator over a block's frames; see [`frames`].
pub struct Frames<'a> {
    block: &'a [u8],
    next: usize,
    left: u32,
    vnet: bool,
}

impl<'a> Iterator for Frames<'a> {
    type Item = RxFrame<'a>;

    fn next(&mut self) -> Option<RxFrame<'a>> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let frame = self.read();
        if frame.is_none() {
            self.left = 0;
        }
        frame
    }
}

impl<'a> Frames<'a> {
    fn read(&mut self) -> Option<RxFrame<'a>> {
        let at = self.next;
        let hdr = self.block.get(at..at.checked_add(pkt::HEADER_LEN)?)?;
        let mac = at + usize::from(u16_at(hdr, pkt::MAC)?);
        let snap = u32_at(hdr, pkt::SNAPLEN)? as usize;
        let data = self.block.get(mac..mac.checked_add(snap)?)?;
        // The last packet of a block has a zero offset: the walk ends there, whatever the
        // count said.
        match u32_at(hdr, pkt::NEXT_OFFSET)? {
            0 => self.left = 0,
            next => self.next = at.checked_add(next as usize)?,
        }
        let status = u32_at(hdr, pkt::STATUS)?;
        let vnet = match self.vnet {
            true => mac
                .checked_sub(VnetHeader::LEN)
                .and_then(|at| self.block.get(at..mac))
                .and_then(VnetHeader::parse),
            false => None,
        };
        Some(RxFrame {
            data,
            wire_len: u32_at(hdr, pkt::LEN)? as usize,
            vlan: status & TP_STATUS_VLAN_VALID != 0,
            checksum_partial: status & TP_STATUS_CSUMNOTREADY != 0,
            vnet,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A block as the kernel lays it out: descriptor, then packets at 16-byte alignment.
    fn block(frames: &[(&[u8], u32)]) -> Vec<u8> {
        block_at(frames, 50, None)
    }

    /// `block`, with each frame's data at `mac` from its header and `vnet` just before it.
    fn block_at(frames: &[(&[u8], u32)], mac: usize, vnet: Option<VnetHeader>) -> Vec<u8> {
        let mut b = vec![0u8; 48];
        let mut at = 48;
        let mut offsets = Vec::new();
        for (data, status) in frames {
            let mut h = vec![0u8; mac + data.len()];
            h[pkt::SNAPLEN..pkt::SNAPLEN + 4].copy_from_slice(&(data.len() as u32).to_ne_bytes());
            h[pkt::LEN..pkt::LEN + 4].copy_from_slice(&(data.len() as u32 + 4).to_ne_bytes());
            h[pkt::STATUS..pkt::STATUS + 4].copy_from_slice(&status.to_ne_bytes());
            h[pkt::MAC..pkt::MAC + 2].copy_from_slice(&(mac as u16).to_ne_bytes());
            h[mac..].copy_from_slice(data);
            if let Some(v) = vnet {
                h[mac - VnetHeader::LEN..mac].copy_from_slice(&v.to_bytes());
            }
            h.resize(h.len().div_ceil(16) * 16, 0);
            offsets.push((at, h.len()));
            at += h.len();
            b.extend_from_slice(&h);
        }
        for (i, (at, len)) in offsets.iter().enumerate() {
            let next = if i + 1 == offsets.len() { 0 } else { *len as u32 };
            b[*at..at + 4].copy_from_slice(&next.to_ne_bytes());
        }
        b[block::BLOCK_STATUS..][..4].copy_from_slice(&TP_STATUS_USER.to_ne_bytes());
        b[block::NUM_PKTS..][..4].copy_from_slice(&(frames.len() as u32).to_ne_bytes());
        b[block::OFFSET_TO_FIRST_PKT..][..4].copy_from_slice(&48u32.to_ne_bytes());
        let len = b.len() as u32;
        b[block::BLK_LEN..][..4].copy_from_slice(&len.to_ne_bytes());
        b.resize(4096, 0xee);
        b
    }

    #[test]
    fn walks_the_chain() {
        let b = block(&[
            (b"first frame", TP_STATUS_USER),
            (b"second", TP_STATUS_USER | TP_STATUS_VLAN_VALID | TP_STATUS_CSUMNOTREADY),
        ]);
        assert_eq!(block_status(&b), TP_STATUS_USER);
        let got: Vec<RxFrame> = frames(&b).collect();
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].data, got[0].wire_len, got[0].vlan), (&b"first frame"[..], 15, false));
        assert!(!got[0].checksum_partial);
        assert_eq!(
            (got[1].data, got[1].vlan, got[1].checksum_partial),
            (&b"second"[..], true, true)
        );
    }

    #[test]
    fn reads_the_virtio_header_before_each_frame() {
        let gso = VnetHeader {
            flags: VnetHeader::F_NEEDS_CSUM,
            gso_type: VnetHeader::GSO_TCPV4,
            hdr_len: 66,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
        };
        assert_eq!(VnetHeader::parse(&gso.to_bytes()), Some(gso));
        assert!(gso.is_gso() && gso.needs_checksum());
        let ecn_only = VnetHeader { gso_type: VnetHeader::GSO_ECN, ..Default::default() };
        assert!(!ecn_only.is_gso());
        let b = block_at(&[(b"frame", TP_STATUS_USER), (b"again", TP_STATUS_USER)], 64, Some(gso));
        let got: Vec<RxFrame> = frames_with_vnet(&b).collect();
        assert_eq!(got.iter().map(|f| f.vnet).collect::<Vec<_>>(), [Some(gso); 2]);
        assert_eq!(got[1].data, b"again");
        // Without the socket option there is no header to read.
        assert!(frames(&b).all(|f| f.vnet.is_none()));
    }

    #[test]
    fn a_lying_block_ends_the_walk_instead_of_panicking() {
        let mut b = block(&[(b"abc", TP_STATUS_USER), (b"def", TP_STATUS_USER)]);
        b[block::NUM_PKTS..][..4].copy_from_slice(&9u32.to_ne_bytes()); // more than there are
        assert_eq!(frames(&b).count(), 2);
        let mut c = block(&[(b"abc", TP_STATUS_USER)]);
        c[48 + pkt::SNAPLEN..][..4].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert_eq!(frames(&c).count(), 0);
        let mut d = block(&[(b"abc", TP_STATUS_USER)]);
        d[block::OFFSET_TO_FIRST_PKT..][..4].copy_from_slice(&4090u32.to_ne_bytes());
        assert_eq!(frames(&d).count(), 0);
        assert_eq!(frames(&[0u8; 10]).count(), 0);
        assert_eq!(block_status(&[0u8; 3]), TP_STATUS_KERNEL);
    }
}
