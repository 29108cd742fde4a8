//! The NFQUEUE datapath: the kernel queues the first packet of a connection (xtables
//! `-j NFQUEUE`), pykp decides, and answers ACCEPT with a packet mark naming the backend
//! (an nft `dnat ... meta mark map` rule then does the NAT and conntrack carries the rest
//! of the flow), ACCEPT unmarked, or DROP.
//!
//! - [`consts`]: the kernel's netlink and nfnetlink_queue constants.
//! - [`netlink`]: netlink framing (message headers, attributes).
//! - [`codec`]: a sans-I/O codec for nfnetlink_queue (config, packet, verdict messages).
//! - [`sys`]: the only module with system calls (the netlink socket, `recvmmsg`).
//! - [`worker`]: one thread per queue, batched receives and verdicts, counters.
//! - [`mark`]: where the backend id goes in the packet mark.
//! - [`node`]: the engine behind the queues: its verdicts as marks.
//!
//! Linux only.

pub mod codec;
pub mod consts;
pub mod mark;
pub mod netlink;
pub mod node;
pub mod sys;
pub mod worker;

pub use codec::{Message, Packet, Verdict};
pub use mark::{MarkLayout, KUBE_PROXY_BITS};
pub use netlink::ParseError;
pub use node::{queue_verdict, NfqueueConfig, NfqueueDatapath, VerdictCounters};
pub use sys::{NfqSocket, RecvBatch};
pub use worker::{
    give_queue_back, hand_over_queue, keep_queues, DecisionFn, KernelQueueStats, QueueConfig,
    QueueVerdict, QueueWorkers, WorkerCounters, WorkerStats,
};
