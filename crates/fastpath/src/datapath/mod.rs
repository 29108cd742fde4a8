//! Datapaths: how packets reach the [engine](crate::engine) and its verdicts reach the
//! kernel. Linux only.
//!
//! - [`nfqueue`]: the kernel queues a connection's first packet (NFQUEUE); the verdict's
//!   packet mark names the backend and nftables does the NAT.
//!
//! A datapath owns its I/O and threads and calls the engine for each packet; the engine
//! does no I/O.

pub mod nfqueue;
