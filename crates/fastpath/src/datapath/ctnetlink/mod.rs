//! The kernel's conntrack as the source of truth for live service flows.
//!
//! - [`codec`]: a sans-I/O codec for ctnetlink events, dump entries and the dump request.
//! - [`follower`]: the thread that applies events (and periodic full listings) to the
//!   engine's connection table.
//!
//! Linux only. The socket is [`NfqSocket`](super::nfqueue::NfqSocket): any
//! `NETLINK_NETFILTER` socket, here joined to the conntrack groups.

pub mod codec;
pub mod follower;

pub use codec::{CtEventKind, CtFlow, CtMessage};
pub use follower::{
    apply_event, apply_listing, list_kernel_flows, ConntrackFollower, FollowerConfig,
    FollowerCounters,
};
