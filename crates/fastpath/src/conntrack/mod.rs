//! pykp's own connection table and session-affinity table.
//!
//! Sans-I/O: every operation is a function of its inputs, the table and `now` (monotonic
//! [`Nanos`](crate::flow::Nanos) passed by the caller); nothing here reads a clock or
//! spawns a thread, so GC runs when the caller says so and tests control time exactly.
//!
//! Layout, and why:
//! - Sharded: `N` (a power of two) `Mutex`-protected shards picked by the key's keyed
//!   hash (ahash `RandomState`: clients choose 5-tuples, so the hash must be keyed).
//!   Workers rarely meet on a lock, and maintenance holds one shard for a bounded slice.
//! - Each shard is a slab of nodes (`u32` indices), an open-addressing index into it, and
//!   an intrusive doubly-linked LRU list through the nodes. All memory is reserved when the
//!   table is built: insert, lookup and remove never allocate, and there is no rehash.
//! - Capacity is a hard cap split across shards; a full shard evicts its own least recently
//!   used entry (LRU is per shard, which approximates a global LRU for a uniform hash).
//! - Expiry is by deadline: lazily when a lookup (or insert) meets an expired entry, and by
//!   [`ConnTable::gc`], which examines at most `budget` entries per call.
//!
//! Memory per connection entry (64-bit): a 72-byte slab node (40-byte `FlowKey`, `Arc`,
//! deadline, LRU links, service id, state; asserted in tests) plus 8-byte index slots at a
//! load between 1/3 and 2/3 (12 to 24 bytes per entry; 16 at the default 4 096 entries per
//! shard): 88 bytes at the default configuration, 22 MiB for 262 144 entries. (A std
//! `HashMap<FlowKey, u32>` index would cost 51 to 102 bytes per entry instead, and could
//! grow under churn.) The slab is reserved virtually and filled as flows arrive; the index
//! is zero pages until used. An affinity entry is a 48-byte node plus its index slots
//! (about 64 bytes).

mod affinity;
mod config;
mod shard;
mod sharded;
mod state;
mod table;

#[cfg(test)]
mod tests;

pub use affinity::AffinityTable;
pub use config::{ConntrackConfig, DEFAULT_AFFINITY_TIMEOUT};
pub use sharded::TableStats;
pub use state::ConnState;
pub use table::{Binding, ConnSnapshot, ConnTable, InsertOutcome};

/// Size of one connection-table slab node (for capacity planning and the memory test).
pub const CONN_NODE_BYTES: usize =
    std::mem::size_of::<shard::Node<crate::flow::FlowKey, table::ConnEntry>>();
