//! The only code of the AF_PACKET datapath that makes system calls (and the only `unsafe`):
//! a packet socket bound to one interface with a TPACKET_V3 receive ring mapped into
//! memory, fanout, batched sends (`sendmmsg`), ring statistics, and the interface's index,
//! MAC and MTU.
//!
//! The ring's layout is read by the pure [`ring`](super::ring) module; here a block's bytes
//! are lent out only while the kernel has handed the block to user space.

use std::cell::Cell;
use std::io;
use std::marker::PhantomData;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::ring::{TP_STATUS_KERNEL, TP_STATUS_USER};
use crate::wire::MacAddr;

// linux/if_packet.h
const SOL_PACKET: libc::c_int = 263;
const PACKET_ADD_MEMBERSHIP: libc::c_int = 1;
const PACKET_RX_RING: libc::c_int = 5;
const PACKET_STATISTICS: libc::c_int = 6;
const PACKET_VERSION: libc::c_int = 10;
const PACKET_VNET_HDR: libc::c_int = 15;
const PACKET_FANOUT: libc::c_int = 18;
const PACKET_QDISC_BYPASS: libc::c_int = 20;
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
const TPACKET_V3: libc::c_int = 2;
const PACKET_FANOUT_HASH: libc::c_int = 0;
/// Reassemble IP fragments before hashing, so a datagram's fragments meet in one worker.
const PACKET_FANOUT_FLAG_DEFRAG: libc::c_int = 0x8000;
const PACKET_MR_ALLMULTI: libc::c_ushort = 2;
// linux/sockios.h
const SIOCGIFMTU: libc::c_ulong = 0x8921;
const SIOCGIFHWADDR: libc::c_ulong = 0x8927;
/// The most frames one `sendmmsg` call takes here.
pub const SEND_BATCH: usize = 64;

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn setsockopt<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` is a live, initialised `T` and the length is its size.
    let ret = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (value as *const T).cast(),
            mem::size_of::<T>() as libc::socklen_t,
        )
    };
    cvt(ret).map(drop)
}

/// What the load balancer needs to know about its interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InterfaceInfo {
    pub index: u32,
    pub mac: MacAddr,
    pub mtu: usize,
}

/// `struct ifreq`: the name, then a 24-byte union (we read a sockaddr or an int from it).
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: [u8; 24],
}

/// Index, MAC and MTU of `name`, in the calling thread's network namespace.
pub fn interface_info(name: &str) -> io::Result<InterfaceInfo> {
    let mut req = IfReq { name: [0; libc::IFNAMSIZ], data: [0; 24] };
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "bad interface name"));
    }
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: `req.name` is NUL-terminated (zero-filled past the name).
    let index = unsafe { libc::if_nametoindex(req.name.as_ptr().cast()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: plain syscall with constant arguments.
    let raw =
        cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `raw` is a fresh descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: both requests read the name and write at most the 24-byte union of `req`.
    cvt(unsafe { libc::ioctl(sock.as_raw_fd(), SIOCGIFHWADDR as _, &mut req) })?;
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&req.data[2..8]); // sockaddr: family, then the address
                                          // SAFETY: as above.
    cvt(unsafe { libc::ioctl(sock.as_raw_fd(), SIOCGIFMTU as _, &mut req) })?;
    let mtu = i32::from_ne_bytes([req.data[0], req.data[1], req.data[2], req.data[3]]);
    Ok(InterfaceInfo { index, mac: MacAddr(mac), mtu: usize::try_from(mtu).unwrap_or(0) })
}

/// The receive ring's geometry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingConfig {
    /// Bytes per block: a multiple of the page size (and a power of two).
    pub block_size: usize,
    pub block_count: usize,
    /// The most bytes one frame takes in a block (TPACKET_V3 packs frames; this only bounds
    /// the snap length).
    pub frame_size: usize,
    /// A block that is not full is handed over after this long: the latency floor at low
    /// rates (milliseconds, the kernel's unit).
    pub retire_ms: u32,
}

impl Default for RingConfig {
    /// 16 MB a worker: at 10 Gbit/s of GSO frames (about 40 kB each, a few to a block) the
    /// ring holds about 12 ms, a worker's time off the CPU on a busy machine. With 4 MB, a
    /// bulk TCP run on the 2-core lab saw the ring overflow and TCP retransmit.
    fn default() -> Self {
        RingConfig { block_size: 1 << 18, block_count: 64, frame_size: 1 << 11, retire_ms: 1 }
    }
}

/// Kernel counters of a receive ring since the last read (reading resets them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingStats {
    pub packets: u64,
    /// Packets the kernel dropped because the ring was full.
    pub drops: u64,
    pub freezes: u64,
}

/// An AF_PACKET socket bound to one interface, with a TPACKET_V3 receive ring. Created in
/// the calling thread's network namespace; usable from any thread afterwards.
pub struct PacketSocket {
    fd: OwnedFd,
    ring: NonNull<u8>,
    ring_len: usize,
    block_size: usize,
    block_count: usize,
    next_block: Cell<usize>,
}

// SAFETY: the mapping belongs to this socket alone and moves with it; `Cell` keeps it !Sync.
unsafe impl Send for PacketSocket {}

impl PacketSocket {
    /// A packet socket for every protocol on interface `ifindex`, with its receive ring,
    /// ignoring the frames the host itself sends (ours included). With `vnet_hdr`
    /// (`PACKET_VNET_HDR`), every frame received has a virtio header before it in the ring,
    /// and every frame sent must start with one (see `ring::VnetHeader`).
    pub fn open(ifindex: u32, ring: &RingConfig, vnet_hdr: bool) -> io::Result<PacketSocket> {
        // Protocol 0 receives nothing until bound, so no frame of another interface slips in.
        // SAFETY: plain syscall with constant arguments.
        let raw =
            cvt(unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) })?;
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        setsockopt(raw, SOL_PACKET, PACKET_VERSION, &TPACKET_V3)?;
        if vnet_hdr {
            // Before the ring: the kernel refuses it once a ring exists.
            setsockopt(raw, SOL_PACKET, PACKET_VNET_HDR, &1i32)?;
        }
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, what.to_string());
        let frames =
            ring.block_size.checked_mul(ring.block_count).ok_or_else(|| bad("ring too large"))?
                / ring.frame_size.max(1);
        let req = libc::tpacket_req3 {
            tp_block_size: u32::try_from(ring.block_size).map_err(|_| bad("block size"))?,
            tp_block_nr: u32::try_from(ring.block_count).map_err(|_| bad("block count"))?,
            tp_frame_size: u32::try_from(ring.frame_size).map_err(|_| bad("frame size"))?,
            tp_frame_nr: u32::try_from(frames).map_err(|_| bad("frame count"))?,
            tp_retire_blk_tov: ring.retire_ms,
            tp_sizeof_priv: 0,
            tp_feature_req_word: 0,
        };
        setsockopt(raw, SOL_PACKET, PACKET_RX_RING, &req)?;
        let ring_len = ring.block_size * ring.block_count;
        // SAFETY: a fresh shared mapping of the ring the kernel just allocated for `raw`.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                ring_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                raw,
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let sock = PacketSocket {
            fd,
            ring: NonNull::new(map.cast()).ok_or_else(|| bad("mmap returned null"))?,
            ring_len,
            block_size: ring.block_size,
            block_count: ring.block_count,
            next_block: Cell::new(0),
        };
        setsockopt(raw, SOL_PACKET, PACKET_IGNORE_OUTGOING, &1i32)?;
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut addr: libc::sockaddr_ll = unsafe { mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as libc::c_ushort;
        addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        addr.sll_ifindex = i32::try_from(ifindex).map_err(|_| bad("interface index"))?;
        let alen = mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: `addr` is a valid sockaddr_ll of length `alen`.
        cvt(unsafe { libc::bind(raw, (&addr as *const libc::sockaddr_ll).cast(), alen) })?;
        Ok(sock)
    }

    /// Joins fanout group `group` in hash mode: each flow's frames go to one socket of the
    /// group (fragments reassembled first so they hash with their flow).
    pub fn join_fanout(&self, group: u16) -> io::Result<()> {
        let arg =
            libc::c_int::from(group) | ((PACKET_FANOUT_HASH | PACKET_FANOUT_FLAG_DEFRAG) << 16);
        setsockopt(self.fd.as_raw_fd(), SOL_PACKET, PACKET_FANOUT, &arg)
    }

    /// Sends skip the qdisc layer (no traffic shaping, no queueing discipline cost; the
    /// host's own `tc` rules no longer see these frames).
    pub fn set_qdisc_bypass(&self, on: bool) -> io::Result<()> {
        setsockopt(self.fd.as_raw_fd(), SOL_PACKET, PACKET_QDISC_BYPASS, &libc::c_int::from(on))
    }

    /// Receive every multicast frame: neighbour solicitations for a VIP go to its
    /// solicited-node group, which the interface has not joined (the VIP is not on it).
    pub fn receive_all_multicast(&self, ifindex: u32) -> io::Result<()> {
        // SAFETY: all-zero is a valid packet_mreq.
        let mut mr: libc::packet_mreq = unsafe { mem::zeroed() };
        mr.mr_ifindex = ifindex as libc::c_int;
        mr.mr_type = PACKET_MR_ALLMULTI;
        setsockopt(self.fd.as_raw_fd(), SOL_PACKET, PACKET_ADD_MEMBERSHIP, &mr)
    }

    /// Waits until a block is ready or `timeout` passes; true when one is.
    pub fn wait(&self, timeout: Duration) -> io::Result<bool> {
        if self.block_status(self.next_block.get()) & TP_STATUS_USER != 0 {
            return Ok(true);
        }
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN | libc::POLLERR,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd.
        match unsafe { libc::poll(&mut pfd, 1, ms) } {
            n if n < 0 => {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    Ok(false)
                } else {
                    Err(e)
                }
            }
            _ => Ok(self.block_status(self.next_block.get()) & TP_STATUS_USER != 0),
        }
    }

    fn status_word(&self, block: usize) -> &AtomicU32 {
        let off = (block % self.block_count) * self.block_size + 8; // tpacket_hdr_v1.block_status
                                                                    // SAFETY: inside the mapping (blocks are at least a page), 4-byte aligned (blocks are
                                                                    // page aligned), and the kernel and we access it only atomically.
        unsafe { &*self.ring.as_ptr().add(off).cast::<AtomicU32>() }
    }

    fn block_status(&self, block: usize) -> u32 {
        self.status_word(block).load(Ordering::Acquire)
    }

    /// The next block, if the kernel has handed it over; dropping it hands it back.
    pub fn next_block(&self) -> Option<Block<'_>> {
        let i = self.next_block.get();
        if self.block_status(i) & TP_STATUS_USER == 0 {
            return None;
        }
        self.next_block.set((i + 1) % self.block_count);
        // SAFETY: inside the mapping.
        let start = unsafe { self.ring.add(i * self.block_size) };
        Some(Block {
            start,
            len: self.block_size,
            status: self.status_word(i),
            _socket: PhantomData,
        })
    }

    /// Sends each frame (Ethernet header included) on the bound interface, `SEND_BATCH` per
    /// system call. A frame is its two parts one after the other (the second may be empty:
    /// new headers, then bytes left where they were received). Returns how many went out;
    /// a frame the kernel refuses is skipped and counted in the second number.
    pub fn send_batch(&self, frames: &[(&[u8], &[u8])]) -> (usize, usize) {
        let (mut sent, mut failed) = (0, 0);
        let mut rest = frames;
        while !rest.is_empty() {
            let n = rest.len().min(SEND_BATCH);
            // SAFETY: all-zero iovec/mmsghdr are valid (null name, no control data).
            let mut iov: [[libc::iovec; 2]; SEND_BATCH] = unsafe { mem::zeroed() };
            let mut msgs: [libc::mmsghdr; SEND_BATCH] = unsafe { mem::zeroed() };
            for (i, (head, body)) in rest[..n].iter().enumerate() {
                iov[i][0] = libc::iovec {
                    iov_base: head.as_ptr() as *mut libc::c_void,
                    iov_len: head.len(),
                };
                iov[i][1] = libc::iovec {
                    iov_base: body.as_ptr() as *mut libc::c_void,
                    iov_len: body.len(),
                };
                msgs[i].msg_hdr.msg_iov = iov[i].as_mut_ptr();
                msgs[i].msg_hdr.msg_iovlen = if body.is_empty() { 1 } else { 2 };
            }
            // SAFETY: `n` initialised headers pointing at live iovecs over live frames; the
            // kernel only reads them (and writes `msg_len`).
            let r = unsafe { libc::sendmmsg(self.fd.as_raw_fd(), msgs.as_mut_ptr(), n as _, 0) };
            if r > 0 {
                sent += r as usize;
                rest = &rest[r as usize..];
            } else if r < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            } else {
                // The first frame was refused (ENOBUFS, EMSGSIZE, ...): skip it.
                failed += 1;
                rest = &rest[1..];
            }
        }
        (sent, failed)
    }

    /// The ring's counters since the last call.
    pub fn take_statistics(&self) -> io::Result<RingStats> {
        let mut st = [0u32; 3]; // struct tpacket_stats_v3
        let mut len = mem::size_of_val(&st) as libc::socklen_t;
        // SAFETY: `st` and `len` are valid for writes of `len` bytes.
        cvt(unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                SOL_PACKET,
                PACKET_STATISTICS,
                st.as_mut_ptr().cast(),
                &mut len,
            )
        })?;
        // tp_packets counts every packet, dropped ones included.
        Ok(RingStats {
            packets: u64::from(st[0]),
            drops: u64::from(st[1]),
            freezes: u64::from(st[2]),
        })
    }
}

impl AsRawFd for PacketSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Drop for PacketSocket {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `open`; no `Block` outlives `&self`.
        unsafe { libc::munmap(self.ring.as_ptr().cast(), self.ring_len) };
    }
}

/// A receive block lent by the kernel; see [`ring::frames`](super::ring::frames).
pub struct Block<'a> {
    start: NonNull<u8>,
    len: usize,
    status: &'a AtomicU32,
    _socket: PhantomData<&'a PacketSocket>,
}

impl Block<'_> {
    /// The block's bytes. Borrowed from the block, so none outlive the hand-back in `drop`.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the block lies inside the mapping and is user space's until `drop` sets
        // its status back; the kernel does not write to it meanwhile, nor do we.
        unsafe { std::slice::from_raw_parts(self.start.as_ptr(), self.len) }
    }
}

impl Drop for Block<'_> {
    fn drop(&mut self) {
        self.status.store(TP_STATUS_KERNEL, Ordering::Release);
    }
}
