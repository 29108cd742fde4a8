//! The concurrent shell shared by the connection and affinity tables: N `Mutex`-protected
//! [`ShardMap`]s picked by the key's keyed hash, per-shard counters, and the operations
//! whose bookkeeping is the same for both tables (insert with eviction, lookup with lazy
//! expiry, remove, bounded GC, sliced flushes).
//!
//! Workers contend only when two packets hash to the same shard at the same moment, and
//! maintenance (GC, flushes) takes one shard at a time for at most a slice of entries, so
//! it never holds up lookups elsewhere for long.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard};

use ahash::RandomState;

use crate::flow::Nanos;

use super::shard::{Removed, ShardMap, TableKey};

/// Entries GC examines per lock acquisition.
pub(crate) const GC_SLICE: usize = 64;
/// Slab slots a flush examines per lock acquisition.
pub(crate) const FLUSH_SLICE: usize = 256;

/// Counters of one table, summed over its shards.
///
/// `entries == inserts - replaced - evictions - expired_gc - expired_lazy - removals`
/// whenever no operation is in flight (shards are read one by one, without locks).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableStats {
    /// Live entries now (expired ones not yet collected included).
    pub entries: u64,
    /// The hard cap.
    pub capacity: u64,
    /// Entries created (a replacement counts as one).
    pub inserts: u64,
    /// Inserts that replaced a live entry with the same key.
    pub replaced: u64,
    /// Live entries dropped to make room (LRU).
    pub evictions: u64,
    /// Expired entries removed by `gc`.
    pub expired_gc: u64,
    /// Expired entries removed when met by a lookup or an insert.
    pub expired_lazy: u64,
    /// Entries removed on request: `remove`, flushes, `clear`, TCP port reuse.
    pub removals: u64,
}

impl TableStats {
    /// All expirations, by GC or lazily.
    pub fn expirations(&self) -> u64 {
        self.expired_gc + self.expired_lazy
    }

    /// `(name, value)` for every counter, for exporting (metrics, Python dicts).
    pub fn pairs(&self) -> [(&'static str, u64); 8] {
        [
            ("entries", self.entries),
            ("capacity", self.capacity),
            ("inserts", self.inserts),
            ("replaced", self.replaced),
            ("evictions", self.evictions),
            ("expired_gc", self.expired_gc),
            ("expired_lazy", self.expired_lazy),
            ("removals", self.removals),
        ]
    }
}

/// One shard's counters. Written only while holding the shard's lock, so a plain
/// load + store is exact and avoids a locked read-modify-write on the packet path; `stats`
/// reads them without the lock.
#[derive(Default)]
pub(crate) struct Counters {
    entries: AtomicU64,
    inserts: AtomicU64,
    replaced: AtomicU64,
    evictions: AtomicU64,
    expired_gc: AtomicU64,
    expired_lazy: AtomicU64,
    removals: AtomicU64,
}

#[inline]
fn bump(c: &AtomicU64, n: u64) {
    if n != 0 {
        c.store(c.load(Relaxed).wrapping_add(n), Relaxed);
    }
}

/// A shard, aligned to its own cache lines so neighbouring locks and counters do not
/// false-share between workers.
#[repr(align(128))]
pub(crate) struct Shard<K, V> {
    map: Mutex<ShardMap<K, V>>,
    counters: Counters,
}

/// A locked shard.
pub(crate) struct Locked<'a, K, V> {
    pub(crate) map: MutexGuard<'a, ShardMap<K, V>>,
    counters: &'a Counters,
}

impl<K, V> Shard<K, V> {
    #[inline]
    pub(crate) fn lock(&self) -> Locked<'_, K, V> {
        // A panic while holding the lock cannot leave the map half-updated in a way that
        // matters more than stopping the datapath would, so poisoning is ignored.
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        Locked { map, counters: &self.counters }
    }
}

impl<K: TableKey, V> Locked<'_, K, V> {
    #[inline]
    fn sync_len(&self) {
        self.counters.entries.store(self.map.len() as u64, Relaxed);
    }
}

/// What an insert did.
pub(crate) enum Put<K> {
    Inserted,
    Replaced,
    Evicted(K),
}

/// What a lookup's visitor decides for a live entry.
pub(crate) enum Visit<R> {
    /// Keep the entry with this new deadline (and touch it in the LRU); return `R`.
    Keep(R, Nanos),
    /// Remove the entry (counted as a removal); the lookup returns `None`.
    Remove,
}

pub(crate) struct Sharded<K, V> {
    hasher: RandomState,
    shards: Box<[Shard<K, V>]>,
    capacity: usize,
    /// Shard where the next GC call starts.
    gc_next: AtomicUsize,
}

impl<K: TableKey, V> Sharded<K, V> {
    /// `capacity` entries over `shards` shards (rounded up to a power of two, then halved
    /// until every shard holds at least one entry). The cap is split exactly: the first
    /// `capacity % n` shards hold one more.
    pub(crate) fn new(capacity: usize, shards: usize, hasher: RandomState) -> Self {
        let capacity = capacity.max(1);
        let mut n = shards.clamp(1, 1 << 16).next_power_of_two();
        while n > capacity {
            n /= 2;
        }
        let base = capacity / n;
        let extra = capacity % n;
        assert!(base < (1 << 31) - 1, "conntrack capacity too large for {n} shards");
        let shards = (0..n)
            .map(|i| Shard {
                map: Mutex::new(ShardMap::new(
                    (base + usize::from(i < extra)) as u32,
                    hasher.clone(),
                )),
                counters: Counters::default(),
            })
            .collect();
        Sharded { hasher, shards, capacity, gc_next: AtomicUsize::new(0) }
    }

    #[inline]
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    #[inline]
    pub(crate) fn shards(&self) -> &[Shard<K, V>] {
        &self.shards
    }

    /// The key's keyed hash and its shard. Bits 32.. pick the shard, bits ..32 the slot
    /// inside it, so the two choices are independent.
    #[inline]
    fn locate(&self, key: &K) -> (u64, &Shard<K, V>) {
        let h = key.hash_with(&self.hasher);
        let i = (h >> 32) as usize & (self.shards.len() - 1);
        (h, &self.shards[i])
    }

    /// Live entries (sum of the per-shard counts; no lock taken).
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.counters.entries.load(Relaxed) as usize).sum()
    }

    pub(crate) fn stats(&self) -> TableStats {
        let mut t = TableStats { capacity: self.capacity as u64, ..TableStats::default() };
        for s in self.shards.iter() {
            let c = &s.counters;
            t.entries += c.entries.load(Relaxed);
            t.inserts += c.inserts.load(Relaxed);
            t.replaced += c.replaced.load(Relaxed);
            t.evictions += c.evictions.load(Relaxed);
            t.expired_gc += c.expired_gc.load(Relaxed);
            t.expired_lazy += c.expired_lazy.load(Relaxed);
            t.removals += c.removals.load(Relaxed);
        }
        t
    }

    /// Find `key`. An expired entry is removed (its value handed to `release`) and `None`
    /// returned; a live one is passed to `visit`, which may update it in place and sets its
    /// new deadline, or asks for its removal.
    #[inline]
    pub(crate) fn lookup<R>(
        &self,
        key: &K,
        now: Nanos,
        release: impl FnOnce(V),
        visit: impl FnOnce(&mut V) -> Visit<R>,
    ) -> Option<R> {
        let (h, shard) = self.locate(key);
        let mut g = shard.lock();
        let (pos, idx) = g.map.find(h, key)?;
        let node = g.map.node_mut(idx);
        if now >= node.expires {
            let removed = g.map.remove_at(pos, idx);
            bump(&g.counters.expired_lazy, 1);
            g.sync_len();
            drop(g);
            release(removed.value);
            return None;
        }
        match visit(node.value_mut()) {
            Visit::Keep(r, expires) => {
                node.expires = expires;
                g.map.touch(idx);
                Some(r)
            }
            Visit::Remove => {
                let removed = g.map.remove_at(pos, idx);
                bump(&g.counters.removals, 1);
                g.sync_len();
                drop(g);
                release(removed.value);
                None
            }
        }
    }

    /// Look at `key`'s entry, expired or not, without touching it (no new deadline, no LRU
    /// move, no lazy expiry): `f` of its value, and its deadline.
    pub(crate) fn peek<R>(&self, key: &K, f: impl FnOnce(&V) -> R) -> Option<(R, Nanos)> {
        let (h, shard) = self.locate(key);
        let g = shard.lock();
        let (_, idx) = g.map.find(h, key)?;
        let node = g.map.node(idx);
        Some((f(node.value()), node.expires))
    }

    /// Insert or replace `key`. A full shard first drops its least recently used entry
    /// (an expiration if that entry had expired anyway, else an eviction). Every value that
    /// leaves goes to `release`; the new value was "opened" by the caller.
    pub(crate) fn insert(
        &self,
        key: K,
        value: V,
        expires: Nanos,
        now: Nanos,
        mut release: impl FnMut(V),
    ) -> Put<K> {
        let (h, shard) = self.locate(&key);
        let mut g = shard.lock();
        if let Some((_, idx)) = g.map.find(h, &key) {
            let live = now < g.map.node(idx).expires;
            let old = g.map.replace(idx, value, expires);
            bump(&g.counters.inserts, 1);
            bump(if live { &g.counters.replaced } else { &g.counters.expired_lazy }, 1);
            drop(g);
            release(old);
            return if live { Put::Replaced } else { Put::Inserted };
        }
        let mut out = Put::Inserted;
        let mut victim = None;
        if g.map.is_full() {
            if let Some(lru) = g.map.lru() {
                let e = g.map.remove_node(lru);
                if now >= e.expires {
                    bump(&g.counters.expired_lazy, 1);
                    victim = Some(e.value);
                } else {
                    bump(&g.counters.evictions, 1);
                    out = Put::Evicted(e.key);
                    victim = Some(e.value);
                }
            }
        }
        g.map.insert_new(h, key, value, expires);
        bump(&g.counters.inserts, 1);
        g.sync_len();
        drop(g);
        if let Some(v) = victim {
            release(v);
        }
        out
    }

    /// Remove `key` if present (counted as a removal, expired or not).
    pub(crate) fn remove(&self, key: &K, release: impl FnOnce(V)) -> bool {
        let (h, shard) = self.locate(key);
        let mut g = shard.lock();
        let Some((pos, idx)) = g.map.find(h, key) else { return false };
        let removed = g.map.remove_at(pos, idx);
        bump(&g.counters.removals, 1);
        g.sync_len();
        drop(g);
        release(removed.value);
        true
    }

    /// Remove every entry matching `pred`, one shard and `FLUSH_SLICE` slab slots per lock
    /// acquisition. O(entries); for control-plane events, not packets.
    pub(crate) fn remove_where(
        &self,
        mut pred: impl FnMut(&K, &V) -> bool,
        release: impl FnMut(Removed<K, V>),
    ) -> usize {
        self.remove_where_deadline(|k, v, _| pred(k, v), release)
    }

    /// [`remove_where`](Self::remove_where) whose predicate also sees the entry's deadline.
    pub(crate) fn remove_where_deadline(
        &self,
        mut pred: impl FnMut(&K, &V, Nanos) -> bool,
        mut release: impl FnMut(Removed<K, V>),
    ) -> usize {
        let mut total = 0;
        for shard in self.shards.iter() {
            let mut start = 0;
            loop {
                let mut g = shard.lock();
                if start >= g.map.slab_len() {
                    break;
                }
                let mut n = 0u64;
                start = g.map.sweep_range(
                    start,
                    FLUSH_SLICE,
                    |k, v, expires| pred(k, v, expires),
                    |e| {
                        n += 1;
                        release(e);
                    },
                );
                bump(&g.counters.removals, n);
                g.sync_len();
                total += n as usize;
            }
        }
        total
    }

    /// One bounded GC step: examine at most `budget` slab slots in total, round-robin over
    /// the shards (each keeps its own cursor), `GC_SLICE` per lock acquisition, removing
    /// the expired entries. A call visits each shard at most once. Returns entries removed.
    pub(crate) fn gc(
        &self,
        now: Nanos,
        budget: usize,
        mut release: impl FnMut(Removed<K, V>),
    ) -> usize {
        let n = self.shards.len();
        let start = self.gc_next.load(Relaxed);
        let mut left = budget;
        let mut removed = 0usize;
        let mut visited = 0;
        while left > 0 && visited < n {
            let shard = &self.shards[start.wrapping_add(visited) & (n - 1)];
            visited += 1;
            let mut todo = None;
            loop {
                let mut g = shard.lock();
                // Never more than one lap of this shard's slab per call.
                let t = *todo.get_or_insert_with(|| left.min(g.map.slab_len()));
                if t == 0 {
                    break;
                }
                let step = t.min(GC_SLICE);
                let mut r = 0u64;
                g.map.sweep(
                    step,
                    |_, _, expires| now >= expires,
                    |e| {
                        r += 1;
                        release(e);
                    },
                );
                bump(&g.counters.expired_gc, r);
                g.sync_len();
                drop(g);
                removed += r as usize;
                left -= step;
                todo = Some(t - step);
            }
        }
        self.gc_next.store(start.wrapping_add(visited), Relaxed);
        removed
    }
}
