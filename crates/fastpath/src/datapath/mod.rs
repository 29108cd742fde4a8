//! Datapaths: how packets reach the [engine](crate::engine) and its verdicts reach the
//! kernel. Linux only.
//!
//! - [`nfqueue`]: the kernel queues a connection's first packet (NFQUEUE); the verdict's
//!   packet mark names the backend and nftables does the NAT.
//! - [`afpacket`]: a user-space L4 load balancer on an interface (AF_PACKET ring, IP-in-IP
//!   direct server return); pykp's own connection table carries every packet.
//! - [`ctnetlink`]: the kernel's conntrack events, which keep the engine's table equal to
//!   the kernel's live service flows.
//!
//! A datapath owns its I/O and threads and calls the engine for each packet; the engine
//! does no I/O.

pub mod afpacket;
pub mod ctnetlink;
pub mod nfqueue;
