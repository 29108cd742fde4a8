//! One shard's storage: a slab of nodes, an open-addressing index into the slab, and an
//! intrusive LRU list threaded through the nodes by `u32` slab indices.
//!
//! Why not `HashMap<K, Entry>`: a std map at a fixed cap either over-allocates (tombstones
//! make hashbrown grow or rehash in place, an O(n) pause under the shard lock) or duplicates
//! the key (`HashMap<K, u32>` next to a slab). Here every allocation happens in `new`: the
//! slab's `Vec` is reserved to the shard's cap (virtual memory; pages are touched as the
//! slab fills), the index is zero-initialised (so the allocator can hand out lazily mapped
//! zero pages), and insert/remove/touch never allocate. Deletion uses backward shifting, so
//! there are no tombstones and no rehash, ever.
//!
//! Index slots are `u64`: the high 32 bits are the low 32 bits of the key's keyed hash (a
//! cheap filter before touching the slab, and the home slot when shifting), the low 32 bits
//! are `slab index + 1` (0 means empty). Load factor is at most 2/3, so probes are short and
//! a miss always finds an empty slot.
//!
//! Single-threaded: the sharded wrapper puts each `ShardMap` behind its own `Mutex`.

use ahash::RandomState;

use crate::flow::Nanos;

/// A key the tables can store: equality plus a keyed 64-bit hash. Keys hash themselves
/// (instead of going through `Hash`) so a flow key is fed to ahash as three wide words
/// rather than a dozen small writes; the hash stays keyed, which matters because clients
/// choose their 5-tuples.
pub(crate) trait TableKey: Eq {
    fn hash_with(&self, hasher: &RandomState) -> u64;
}

/// "No node" in the LRU and free lists.
pub(crate) const NIL: u32 = u32::MAX;

/// A slab node. Occupied nodes are on the LRU list, vacant ones on the free list (through
/// `next`). `item` is an `Option` so vacancy costs no extra byte for the key types used here
/// (the `IpAddr` tag and the `Arc` both leave a niche).
pub(crate) struct Node<K, V> {
    prev: u32,
    next: u32,
    /// Absolute deadline: the entry is expired when `now >= expires`.
    pub(crate) expires: Nanos,
    item: Option<(K, V)>,
}

impl<K, V> Node<K, V> {
    #[inline]
    pub(crate) fn key(&self) -> &K {
        match &self.item {
            Some((k, _)) => k,
            None => unreachable!("vacant conntrack node used"),
        }
    }

    #[inline]
    pub(crate) fn value(&self) -> &V {
        match &self.item {
            Some((_, v)) => v,
            None => unreachable!("vacant conntrack node used"),
        }
    }

    #[inline]
    pub(crate) fn value_mut(&mut self) -> &mut V {
        match &mut self.item {
            Some((_, v)) => v,
            None => unreachable!("vacant conntrack node used"),
        }
    }
}

/// A removed entry, handed back so the caller can release what it holds (for example
/// `BackendHandle::conn_closed`).
pub(crate) struct Removed<K, V> {
    pub(crate) key: K,
    pub(crate) value: V,
    pub(crate) expires: Nanos,
}

pub(crate) struct ShardMap<K, V> {
    hasher: RandomState,
    index: Box<[u64]>,
    mask: usize,
    nodes: Vec<Node<K, V>>,
    /// Head of the free list of vacant nodes.
    free: u32,
    /// Most recently used.
    head: u32,
    /// Least recently used: the eviction victim.
    tail: u32,
    len: u32,
    cap: u32,
    /// Where the next GC sweep resumes (a slab index).
    gc_cursor: u32,
}

#[inline]
fn slot_hash(slot: u64) -> u32 {
    (slot >> 32) as u32
}

#[inline]
fn slot_node(slot: u64) -> u32 {
    // Only called on occupied slots, whose low half is `index + 1 >= 1`.
    (slot as u32).wrapping_sub(1)
}

#[inline]
fn make_slot(h32: u32, idx: u32) -> u64 {
    (u64::from(h32) << 32) | u64::from(idx + 1)
}

/// Index slots for `cap` entries: a power of two at least 1.5 x `cap` (load <= 2/3).
pub(crate) fn index_slots(cap: u32) -> usize {
    let cap = cap as usize;
    (cap + cap / 2 + 1).next_power_of_two().max(2)
}

impl<K: TableKey, V> ShardMap<K, V> {
    /// A shard holding at most `cap` entries (`1 <= cap < 2^31`).
    pub(crate) fn new(cap: u32, hasher: RandomState) -> Self {
        assert!((1..(1 << 31)).contains(&cap), "shard capacity {cap} out of range");
        let slots = index_slots(cap);
        ShardMap {
            hasher,
            // `vec![0; n]` goes through the zeroed allocator: untouched pages cost nothing.
            index: vec![0u64; slots].into_boxed_slice(),
            mask: slots - 1,
            nodes: Vec::with_capacity(cap as usize),
            free: NIL,
            head: NIL,
            tail: NIL,
            len: 0,
            cap,
            gc_cursor: 0,
        }
    }

    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.len as usize
    }

    #[inline]
    pub(crate) fn is_full(&self) -> bool {
        self.len >= self.cap
    }

    /// Slab slots ever used (occupied or vacant): the range GC sweeps over.
    #[inline]
    pub(crate) fn slab_len(&self) -> usize {
        self.nodes.len()
    }

    #[inline]
    fn hash32(&self, key: &K) -> u32 {
        key.hash_with(&self.hasher) as u32
    }

    /// Find `key` (whose keyed hash is `h`); returns (index slot, slab index).
    #[inline]
    pub(crate) fn find(&self, h: u64, key: &K) -> Option<(usize, u32)> {
        let h32 = h as u32;
        let mut pos = h32 as usize & self.mask;
        loop {
            let slot = self.index[pos];
            if slot == 0 {
                return None;
            }
            if slot_hash(slot) == h32 {
                let idx = slot_node(slot);
                if self.nodes[idx as usize].key() == key {
                    return Some((pos, idx));
                }
            }
            pos = (pos + 1) & self.mask;
        }
    }

    #[inline]
    pub(crate) fn node(&self, idx: u32) -> &Node<K, V> {
        &self.nodes[idx as usize]
    }

    #[inline]
    pub(crate) fn node_mut(&mut self, idx: u32) -> &mut Node<K, V> {
        &mut self.nodes[idx as usize]
    }

    /// Insert a key that is not present. The caller makes room first (`is_full` false).
    pub(crate) fn insert_new(&mut self, h: u64, key: K, value: V, expires: Nanos) -> u32 {
        debug_assert!(!self.is_full());
        let node = Node { prev: NIL, next: NIL, expires, item: Some((key, value)) };
        let idx = if self.free != NIL {
            let idx = self.free;
            self.free = self.nodes[idx as usize].next;
            self.nodes[idx as usize] = node;
            idx
        } else {
            // Within the reserved capacity: never reallocates.
            self.nodes.push(node);
            (self.nodes.len() - 1) as u32
        };
        let h32 = h as u32;
        let mut pos = h32 as usize & self.mask;
        while self.index[pos] != 0 {
            pos = (pos + 1) & self.mask;
        }
        self.index[pos] = make_slot(h32, idx);
        self.push_front(idx);
        self.len += 1;
        idx
    }

    /// Replace the value of an existing node in place (same key), making it most recent.
    pub(crate) fn replace(&mut self, idx: u32, value: V, expires: Nanos) -> V {
        let node = &mut self.nodes[idx as usize];
        node.expires = expires;
        let old = std::mem::replace(node.value_mut(), value);
        self.touch(idx);
        old
    }

    /// Remove the node `idx` found at index slot `pos` (both from `find`).
    pub(crate) fn remove_at(&mut self, pos: usize, idx: u32) -> Removed<K, V> {
        debug_assert_eq!(slot_node(self.index[pos]), idx);
        self.delete_slot(pos);
        self.unlink(idx);
        let node = &mut self.nodes[idx as usize];
        let (key, value) = node.item.take().expect("vacant conntrack node removed");
        let expires = node.expires;
        node.prev = NIL;
        node.next = self.free;
        self.free = idx;
        self.len -= 1;
        Removed { key, value, expires }
    }

    /// Remove the node `idx` (known occupied) when its index slot is not at hand.
    pub(crate) fn remove_node(&mut self, idx: u32) -> Removed<K, V> {
        let h32 = self.hash32(self.nodes[idx as usize].key());
        let mut pos = h32 as usize & self.mask;
        let want = idx + 1;
        while self.index[pos] as u32 != want {
            debug_assert!(self.index[pos] != 0, "conntrack index lost a node");
            pos = (pos + 1) & self.mask;
        }
        self.remove_at(pos, idx)
    }

    /// The least recently used node, the eviction victim.
    #[inline]
    pub(crate) fn lru(&self) -> Option<u32> {
        (self.tail != NIL).then_some(self.tail)
    }

    /// Mark `idx` most recently used.
    #[inline]
    pub(crate) fn touch(&mut self, idx: u32) {
        if self.head != idx {
            self.unlink(idx);
            self.push_front(idx);
        }
    }

    /// Examine up to `max` slab slots from the GC cursor (wrapping), removing every
    /// occupied node for which `remove(key, value, expires)` says so; each removed entry is
    /// passed to `removed`. Returns the number of slots examined.
    pub(crate) fn sweep(
        &mut self,
        max: usize,
        mut remove: impl FnMut(&K, &V, Nanos) -> bool,
        mut removed: impl FnMut(Removed<K, V>),
    ) -> usize {
        let n = self.nodes.len();
        let todo = max.min(n);
        let mut cur = self.gc_cursor as usize;
        for _ in 0..todo {
            if cur >= n {
                cur = 0;
            }
            let node = &self.nodes[cur];
            if let Some((k, v)) = &node.item {
                if remove(k, v, node.expires) {
                    removed(self.remove_node(cur as u32));
                }
            }
            cur += 1;
        }
        self.gc_cursor = cur as u32;
        todo
    }

    /// Examine slab slots `start..start + max` (clamped), removing like `sweep`. Used by
    /// flushes, which walk the whole slab once in slices. Returns the next start.
    pub(crate) fn sweep_range(
        &mut self,
        start: usize,
        max: usize,
        mut remove: impl FnMut(&K, &V, Nanos) -> bool,
        mut removed: impl FnMut(Removed<K, V>),
    ) -> usize {
        let end = start.saturating_add(max).min(self.nodes.len());
        for i in start..end {
            let node = &self.nodes[i];
            if let Some((k, v)) = &node.item {
                if remove(k, v, node.expires) {
                    removed(self.remove_node(i as u32));
                }
            }
        }
        end
    }

    /// Occupied entries in most-recently-used order.
    pub(crate) fn iter_mru(&self) -> impl Iterator<Item = &Node<K, V>> + '_ {
        let mut cur = self.head;
        std::iter::from_fn(move || {
            if cur == NIL {
                return None;
            }
            let node = &self.nodes[cur as usize];
            cur = node.next;
            Some(node)
        })
    }

    fn unlink(&mut self, idx: u32) {
        let (prev, next) = {
            let n = &self.nodes[idx as usize];
            (n.prev, n.next)
        };
        if prev != NIL {
            self.nodes[prev as usize].next = next;
        } else {
            self.head = next;
        }
        if next != NIL {
            self.nodes[next as usize].prev = prev;
        } else {
            self.tail = prev;
        }
    }

    fn push_front(&mut self, idx: u32) {
        let old = self.head;
        {
            let n = &mut self.nodes[idx as usize];
            n.prev = NIL;
            n.next = old;
        }
        if old != NIL {
            self.nodes[old as usize].prev = idx;
        } else {
            self.tail = idx;
        }
        self.head = idx;
    }

    /// Backward-shift deletion: pull later members of the probe run into the hole so that
    /// every key stays reachable from its home slot without tombstones.
    fn delete_slot(&mut self, pos: usize) {
        let mask = self.mask;
        let mut hole = pos;
        let mut j = pos;
        loop {
            j = (j + 1) & mask;
            let slot = self.index[j];
            if slot == 0 {
                break;
            }
            let home = slot_hash(slot) as usize & mask;
            // The entry at `j` may move to `hole` if `hole` lies cyclically in [home, j).
            if (j.wrapping_sub(home) & mask) >= (j.wrapping_sub(hole) & mask) {
                self.index[hole] = slot;
                hole = j;
            }
        }
        self.index[hole] = 0;
    }

    /// Check every structural invariant (tests only).
    #[cfg(test)]
    pub(crate) fn check(&self) {
        // LRU list: consistent links, covers exactly the occupied nodes.
        let mut count = 0u32;
        let mut prev = NIL;
        let mut cur = self.head;
        while cur != NIL {
            let n = &self.nodes[cur as usize];
            assert!(n.item.is_some(), "vacant node on LRU list");
            assert_eq!(n.prev, prev);
            prev = cur;
            cur = n.next;
            count += 1;
            assert!(count <= self.len, "LRU list longer than len");
        }
        assert_eq!(self.tail, prev);
        assert_eq!(count, self.len);
        let occupied = self.nodes.iter().filter(|n| n.item.is_some()).count();
        assert_eq!(occupied as u32, self.len);
        // Free list covers exactly the vacant nodes.
        let mut free = 0usize;
        let mut cur = self.free;
        while cur != NIL {
            assert!(self.nodes[cur as usize].item.is_none());
            cur = self.nodes[cur as usize].next;
            free += 1;
        }
        assert_eq!(free + occupied, self.nodes.len());
        // Index: one slot per occupied node, each findable.
        let used = self.index.iter().filter(|&&s| s != 0).count();
        assert_eq!(used as u32, self.len);
        for n in self.nodes.iter().filter(|n| n.item.is_some()) {
            let h = n.key().hash_with(&self.hasher);
            assert!(self.find(h, n.key()).is_some(), "index lost a key");
        }
        assert!(self.nodes.len() <= self.cap as usize);
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    impl TableKey for u64 {
        fn hash_with(&self, hasher: &RandomState) -> u64 {
            hasher.hash_one(self)
        }
    }

    fn map(cap: u32) -> (ShardMap<u64, u64>, RandomState) {
        let s = RandomState::with_seeds(1, 2, 3, 4);
        (ShardMap::new(cap, s.clone()), s)
    }

    #[test]
    fn insert_find_remove_with_backward_shift() {
        let (mut m, s) = map(64);
        for k in 0..64u64 {
            m.insert_new(s.hash_one(k), k, k * 10, 0);
        }
        m.check();
        assert!(m.is_full());
        for k in (0..64u64).step_by(3) {
            let (pos, idx) = m.find(s.hash_one(k), &k).unwrap();
            let r = m.remove_at(pos, idx);
            assert_eq!((r.key, r.value), (k, k * 10));
            m.check();
        }
        for k in 0..64u64 {
            let found = m.find(s.hash_one(k), &k).map(|(_, i)| *m.node(i).value());
            assert_eq!(found, (k % 3 != 0).then_some(k * 10), "key {k}");
        }
    }

    #[test]
    fn colliding_hashes_stay_findable() {
        // Force every key into the same home slot and the same 32-bit tag.
        let (mut m, _) = map(16);
        for k in 0..16u64 {
            m.insert_new(7, k, k, 0);
        }
        for k in [3u64, 0, 15, 8] {
            let (pos, idx) = m.find(7, &k).unwrap();
            m.remove_at(pos, idx);
        }
        for k in 0..16u64 {
            assert_eq!(m.find(7, &k).is_some(), ![3u64, 0, 15, 8].contains(&k));
        }
    }

    #[test]
    fn lru_order_and_slot_reuse() {
        let (mut m, s) = map(4);
        let idx: Vec<u32> = (0..4u64).map(|k| m.insert_new(s.hash_one(k), k, k, 0)).collect();
        m.touch(idx[0]);
        assert_eq!(m.lru(), Some(idx[1]));
        let r = m.remove_node(idx[1]);
        assert_eq!(r.key, 1);
        assert_eq!(m.lru(), Some(idx[2]));
        // The freed slab slot is reused: the slab never grows past the cap.
        let again = m.insert_new(s.hash_one(9u64), 9, 9, 0);
        assert_eq!(again, idx[1]);
        assert_eq!(m.slab_len(), 4);
        let order: Vec<u64> = m.iter_mru().map(|n| *n.key()).collect();
        assert_eq!(order, vec![9, 0, 3, 2]);
        m.check();
    }

    #[test]
    fn sweep_is_bounded_and_wraps() {
        let (mut m, s) = map(10);
        for k in 0..10u64 {
            m.insert_new(s.hash_one(k), k, k, k);
        }
        let mut gone = Vec::new();
        assert_eq!(m.sweep(4, |_, _, e| e < 100, |r| gone.push(r.key)), 4);
        assert_eq!(gone.len(), 4);
        assert_eq!(m.sweep(100, |_, _, e| e < 100, |r| gone.push(r.key)), 10);
        gone.sort_unstable();
        assert_eq!(gone, (0..10).collect::<Vec<_>>());
        m.check();
    }

    #[test]
    fn index_sizing() {
        assert_eq!(index_slots(1), 2);
        assert_eq!(index_slots(4096), 8192);
        assert_eq!(index_slots(5000), 8192);
        assert_eq!(index_slots(6000), 16384);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Put(u64),
        Get(u64),
        Del(u64),
        Sweep(usize, u64),
    }

    proptest! {
        /// The shard against a model: a Vec of keys in LRU order (most recent first).
        /// Few index slots and many keys, so probe runs and backward shifts are common.
        #[test]
        fn shard_matches_lru_model(ops in prop::collection::vec(
            prop_oneof![
                (0..40u64).prop_map(Op::Put),
                (0..40u64).prop_map(Op::Get),
                (0..40u64).prop_map(Op::Del),
                (0..20usize, 0..40u64).prop_map(|(n, t)| Op::Sweep(n, t)),
            ],
            1..300,
        )) {
            let (mut m, s) = map(12);
            let mut model: Vec<u64> = Vec::new();
            for op in ops {
                match op {
                    Op::Put(k) => {
                        if let Some((_, idx)) = m.find(s.hash_one(k), &k) {
                            m.replace(idx, k, k);
                            model.retain(|&x| x != k);
                        } else {
                            if m.is_full() {
                                let victim = m.remove_node(m.lru().unwrap()).key;
                                prop_assert_eq!(Some(victim), model.pop());
                            }
                            m.insert_new(s.hash_one(k), k, k, k);
                        }
                        model.insert(0, k);
                    }
                    Op::Get(k) => {
                        let hit = m.find(s.hash_one(k), &k).map(|(_, idx)| idx);
                        prop_assert_eq!(hit.is_some(), model.contains(&k));
                        if let Some(idx) = hit {
                            m.touch(idx);
                            model.retain(|&x| x != k);
                            model.insert(0, k);
                        }
                    }
                    Op::Del(k) => {
                        let hit = m.find(s.hash_one(k), &k);
                        prop_assert_eq!(hit.is_some(), model.contains(&k));
                        if let Some((pos, idx)) = hit {
                            prop_assert_eq!(m.remove_at(pos, idx).key, k);
                            model.retain(|&x| x != k);
                        }
                    }
                    Op::Sweep(n, t) => {
                        // Remove keys (= deadlines) below t among at most n slots.
                        let mut gone = Vec::new();
                        let examined = m.sweep(n, |_, _, e| e < t, |r| gone.push(r.key));
                        prop_assert!(examined <= n && gone.len() <= examined);
                        prop_assert!(gone.iter().all(|&k| k < t));
                        model.retain(|k| !gone.contains(k));
                    }
                }
                m.check();
                let order: Vec<u64> = m.iter_mru().map(|n| *n.key()).collect();
                prop_assert_eq!(&order, &model);
            }
        }
    }
}
