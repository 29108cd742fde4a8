//! The only code of the NFQUEUE datapath that makes system calls: a netfilter netlink
//! socket and a reusable batch of receive buffers for `recvmmsg(2)`.
//!
//! Everything else (message encoding and parsing, the decision, the worker's
//! bookkeeping) is pure and tested without privileges.

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// Convert a `-1` return into the thread's `errno`.
fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `value` lives for the call; the length matches its type.
    let ret = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    cvt(ret).map(drop)
}

fn getsockopt_int(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid for writes and sized for a c_int.
    let ret = unsafe {
        libc::getsockopt(fd, level, name, (&mut value as *mut libc::c_int).cast(), &mut len)
    };
    cvt(ret).map(|_| value)
}

/// An `AF_NETLINK` / `NETLINK_NETFILTER` socket bound to a kernel-assigned port id.
///
/// Created in the network namespace of the calling *thread*; it keeps that namespace
/// for its whole life. Closing it makes the kernel unbind every queue it had bound.
#[derive(Debug)]
pub struct NfqSocket {
    fd: OwnedFd,
    portid: u32,
}

impl NfqSocket {
    /// `socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_NETFILTER)` and `bind` with
    /// port id 0 (the kernel picks a unique one).
    pub fn open() -> io::Result<NfqSocket> {
        // SAFETY: plain syscall with constant arguments.
        let raw = cvt(unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_NETFILTER,
            )
        })?;
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: all-zero is a valid sockaddr_nl.
        let mut addr: libc::sockaddr_nl = unsafe { mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        let alen = mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        // SAFETY: `addr` is a valid sockaddr_nl of length `alen`.
        cvt(unsafe { libc::bind(raw, (&addr as *const libc::sockaddr_nl).cast(), alen) })?;
        let mut got: libc::sockaddr_nl = unsafe { mem::zeroed() };
        let mut glen = alen;
        // SAFETY: `got` is writable and `glen` holds its size.
        cvt(unsafe {
            libc::getsockname(raw, (&mut got as *mut libc::sockaddr_nl).cast(), &mut glen)
        })?;
        Ok(NfqSocket { fd, portid: got.nl_pid })
    }

    /// A socket from a descriptor of one (e.g. a duplicate of a bound queue socket handed
    /// to another process); its port id is the original's, unknown here (0).
    pub fn from_fd(fd: OwnedFd) -> NfqSocket {
        NfqSocket { fd, portid: 0 }
    }

    /// The port id the kernel assigned.
    pub fn portid(&self) -> u32 {
        self.portid
    }

    /// Ask for a receive buffer of `bytes`: `SO_RCVBUFFORCE` (needs `CAP_NET_ADMIN`,
    /// ignores `net.core.rmem_max`), falling back to `SO_RCVBUF`. Returns the size the
    /// kernel reports (it doubles the request for bookkeeping overhead).
    pub fn set_rcvbuf(&self, bytes: usize) -> io::Result<usize> {
        let v = bytes.min(i32::MAX as usize / 2) as libc::c_int;
        let fd = self.fd.as_raw_fd();
        if setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, v).is_err() {
            setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, v)?;
        }
        Ok(getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF)? as usize)
    }

    /// `NETLINK_NO_ENOBUFS`: when on, a full receive buffer no longer makes the next
    /// `recv` fail with `ENOBUFS` (the lost packets are still lost, and counted by the
    /// kernel in `/proc/net/netfilter/nfnetlink_queue`).
    pub fn set_no_enobufs(&self, on: bool) -> io::Result<()> {
        setsockopt_int(
            self.fd.as_raw_fd(),
            libc::SOL_NETLINK,
            libc::NETLINK_NO_ENOBUFS,
            on as libc::c_int,
        )
    }

    /// `NETLINK_ADD_MEMBERSHIP`: receive the multicast group's messages (conntrack events).
    pub fn join_group(&self, group: u32) -> io::Result<()> {
        setsockopt_int(
            self.fd.as_raw_fd(),
            libc::SOL_NETLINK,
            libc::NETLINK_ADD_MEMBERSHIP,
            group as libc::c_int,
        )
    }

    /// `NETLINK_CAP_ACK`: error messages do not echo the failed request's payload.
    pub fn set_cap_ack(&self, on: bool) -> io::Result<()> {
        setsockopt_int(
            self.fd.as_raw_fd(),
            libc::SOL_NETLINK,
            libc::NETLINK_CAP_ACK,
            on as libc::c_int,
        )
    }

    /// `SO_RCVTIMEO`: a blocking receive returns `WouldBlock` after `timeout` (zero:
    /// block forever), so a worker thread can look at its stop flag.
    pub fn set_recv_timeout(&self, timeout: Duration) -> io::Result<()> {
        let tv = libc::timeval {
            tv_sec: timeout.as_secs().min(i32::MAX as u64) as libc::time_t,
            tv_usec: timeout.subsec_micros() as libc::suseconds_t,
        };
        // SAFETY: `tv` lives for the call; the length matches its type.
        let ret = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        cvt(ret).map(drop)
    }

    /// Send `buf` (one or more complete netlink messages) to the kernel in one
    /// `send(2)`; the kernel processes the messages in order.
    pub fn send(&self, buf: &[u8]) -> io::Result<usize> {
        loop {
            // SAFETY: `buf` is valid for reads of its length.
            let n = unsafe { libc::send(self.fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), 0) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Receive one datagram into `buf`; returns its length (cut to `buf.len()` if larger).
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Receive up to `batch.capacity()` datagrams with one `recvmmsg(2)`: waits (up to
    /// the receive timeout) for the first, then takes whatever else is already queued
    /// (`MSG_WAITFORONE`). Returns how many were received; read them with
    /// [`RecvBatch::get`]. Errors: `WouldBlock` on timeout, `Interrupted`, and
    /// `ENOBUFS` (raw os error) after the socket dropped messages.
    pub fn recv_batch(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        batch.prepare();
        // SAFETY: `prepare` pointed every mmsghdr at its own slot of `batch.buf`, which
        // stays alive and unaliased for the call; the timeout pointer may be null.
        let n = unsafe {
            libc::recvmmsg(
                self.fd.as_raw_fd(),
                batch.hdrs.as_mut_ptr(),
                batch.hdrs.len() as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            batch.filled = 0;
            return Err(io::Error::last_os_error());
        }
        batch.filled = n as usize;
        Ok(n as usize)
    }
}

impl AsRawFd for NfqSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Receive buffers for [`NfqSocket::recv_batch`]: `count` slots of `slot_size` bytes in
/// one allocation, made once and reused (no allocation per receive).
pub struct RecvBatch {
    buf: Vec<u8>,
    slot: usize,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    filled: usize,
}

// SAFETY: the raw pointers inside `iovs` / `hdrs` only ever point into `self.buf` and
// are rewritten by `prepare` right before each use, so moving the batch to another
// thread cannot leave them dangling or shared.
unsafe impl Send for RecvBatch {}

impl RecvBatch {
    /// `count` slots (at least 1) of `slot_size` bytes (at least 64, rounded up to 8).
    pub fn new(count: usize, slot_size: usize) -> RecvBatch {
        let count = count.max(1);
        let slot = (slot_size.max(64) + 7) & !7;
        // SAFETY: all-zero is a valid iovec / mmsghdr (null pointers, zero lengths).
        let iov0: libc::iovec = unsafe { mem::zeroed() };
        let hdr0: libc::mmsghdr = unsafe { mem::zeroed() };
        RecvBatch {
            buf: vec![0; count * slot],
            slot,
            iovs: vec![iov0; count],
            hdrs: vec![hdr0; count],
            filled: 0,
        }
    }

    /// How many datagrams one receive can take.
    pub fn capacity(&self) -> usize {
        self.hdrs.len()
    }

    /// Bytes per slot.
    pub fn slot_size(&self) -> usize {
        self.slot
    }

    /// Datagrams filled by the last receive.
    pub fn len(&self) -> usize {
        self.filled
    }

    /// Nothing received.
    pub fn is_empty(&self) -> bool {
        self.filled == 0
    }

    /// Datagram `i` of the last receive, and whether the kernel cut it (`MSG_TRUNC`:
    /// it did not fit in a slot).
    pub fn get(&self, i: usize) -> Option<(&[u8], bool)> {
        if i >= self.filled {
            return None;
        }
        let h = &self.hdrs[i];
        let len = (h.msg_len as usize).min(self.slot);
        let start = i * self.slot;
        Some((&self.buf[start..start + len], h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0))
    }

    fn prepare(&mut self) {
        let base = self.buf.as_mut_ptr();
        for (i, (iov, hdr)) in self.iovs.iter_mut().zip(self.hdrs.iter_mut()).enumerate() {
            // SAFETY: `i * slot` is inside `buf` (it has `count * slot` bytes).
            iov.iov_base = unsafe { base.add(i * self.slot) }.cast();
            iov.iov_len = self.slot;
            hdr.msg_hdr.msg_name = std::ptr::null_mut();
            hdr.msg_hdr.msg_namelen = 0;
            hdr.msg_hdr.msg_iov = iov;
            hdr.msg_hdr.msg_iovlen = 1;
            hdr.msg_hdr.msg_control = std::ptr::null_mut();
            hdr.msg_hdr.msg_controllen = 0;
            hdr.msg_hdr.msg_flags = 0;
            hdr.msg_len = 0;
        }
    }
}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch")
            .field("slots", &self.hdrs.len())
            .field("slot_size", &self.slot)
            .field("filled", &self.filled)
            .finish()
    }
}

/// Whether an I/O error is the `ENOBUFS` a netlink socket reports after it overran.
pub fn is_enobufs(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOBUFS)
}

/// The text of `/proc/thread-self/net/netfilter/nfnetlink_queue`: the queues of the
/// calling *thread's* network namespace (`/proc/self/net` would show the main thread's).
pub fn read_proc_queue_stats() -> io::Result<String> {
    std::fs::read_to_string("/proc/thread-self/net/netfilter/nfnetlink_queue")
}

/// CLOCK_MONOTONIC in nanoseconds: the clock Python's `time.monotonic()` reads, so times
/// the datapath threads use agree with times the control plane passes in.
pub fn monotonic_nanos() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).wrapping_mul(1_000_000_000).wrapping_add(ts.tv_nsec as u64)
}
