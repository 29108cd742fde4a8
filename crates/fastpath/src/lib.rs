//! pykp's fast path: everything that looks at packets, as pure Rust with no I/O.
//!
//! - [`wire`]: zero-copy, bounds-checked packet views and in-place NAT rewrites.
//! - [`service`]: the service table (frontends -> service -> backends), lock-free reads.
//! - [`policy`]: backend selection (random, round-robin, Maglev, least-connections).
//! - [`conntrack`]: the connection table and session affinity.
//! - [`engine`]: the one entry point every datapath calls for every packet it sees.
//! - [`explain`]: a dry run of the engine's decision, with why (`pykp explain`).
//! - [`datapath`]: how packets reach the engine (NFQUEUE today), Linux only.
//! - [`nft_elements`]: nf_tables set elements in their netlink form, from nft's text
//!   (what the agent's rules send).
//!
//! The PyO3 bindings live in `bindings` behind the `python` feature.

pub mod conntrack;
#[cfg(target_os = "linux")]
pub mod datapath;
pub mod engine;
pub mod explain;
pub mod flow;
pub mod hash;
pub mod nft_elements;
pub mod policy;
pub mod service;
pub mod wire;

#[cfg(feature = "python")]
mod bindings;

pub use flow::{FlowKey, Nanos, Protocol, TcpFlags};
