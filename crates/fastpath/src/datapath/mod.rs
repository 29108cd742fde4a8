//! Datapaths: how packets reach the [engine](crate::engine) and its verdicts reach the
//! kernel. Linux only.
//!
//! - [`nfqueue`]: the kernel queues a connection's first packet (NFQUEUE); the verdict's
//!   packet mark names the backend and nftables does the NAT.
//! - [`ctnetlink`]: the kernel's conntrack events, which keep the engine's table equal to
//!   the kernel's live service flows.
//!
//! A datapath owns its I/O and threads and calls the engine for each packet; the engine
//! does no I/O.

pub mod ctnetlink;
pub mod nfqueue;
