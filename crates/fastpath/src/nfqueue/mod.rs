//! The NFQUEUE datapath: the kernel queues the first packet of a connection (xtables
//! `-j NFQUEUE`), pykp decides, and answers ACCEPT with a packet mark naming the backend
//! (an nft `dnat ... meta mark map` rule then does the NAT and conntrack carries the rest
//! of the flow), ACCEPT unmarked, or DROP.
//!
//! - [`msg`]: a sans-I/O codec for nfnetlink_queue (config, packet, verdict messages).
//! - [`sys`]: the only module with system calls (the netlink socket, `recvmmsg`).
//! - [`worker`]: one thread per queue, batched receives and verdicts, counters.
//!
//! Linux only.

pub mod msg;
pub mod sys;
pub mod worker;

pub use msg::{Message, Packet, ParseError, Verdict};
pub use sys::{NfqSocket, RecvBatch};
pub use worker::{
    give_queue_back, hand_over_queue, keep_queues, DecisionFn, KernelQueueStats, QueueConfig,
    QueueVerdict, QueueWorkers, WorkerCounters, WorkerStats,
};
