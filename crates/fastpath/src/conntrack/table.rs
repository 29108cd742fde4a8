//! The connection table: a flow (its 5-tuple in the original direction) -> the service
//! and backend it was balanced to, plus enough state to expire it on time.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ahash::RandomState;

use crate::flow::{FlowKey, Nanos, Protocol, TcpFlags};
use crate::service::{BackendHandle, BackendId, ServiceId};

use super::config::ConntrackConfig;
use super::shard::TableKey;
use super::sharded::{Put, Sharded, TableStats, Visit};
use super::state::ConnState;

/// Where a flow goes: the service it hit and the backend chosen for it.
#[derive(Clone, Debug)]
pub struct Binding {
    pub service: ServiceId,
    pub backend: Arc<BackendHandle>,
}

/// What [`ConnTable::insert`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InsertOutcome {
    /// A new entry (possibly reusing the slot of an expired one).
    Inserted,
    /// The key had a live entry; it now carries the new binding.
    Replaced,
    /// The shard was full: this live flow (the shard's least recently used) was evicted.
    Evicted(FlowKey),
}

/// One entry, as shown to operators.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnSnapshot {
    pub key: FlowKey,
    pub service: ServiceId,
    pub backend_id: BackendId,
    pub backend: SocketAddr,
    /// [`ConnState::as_str`].
    pub state: &'static str,
    /// Nanoseconds until the entry expires unless a packet refreshes it.
    pub expires_in: Nanos,
}

/// The stored value. Flat (not a `Binding` plus a state) so it packs into 16 bytes.
pub(crate) struct ConnEntry {
    backend: Arc<BackendHandle>,
    service: ServiceId,
    state: ConnState,
}

#[inline]
fn ip_word(ip: &IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(*a)),
        IpAddr::V6(a) => u128::from(*a),
    }
}

impl TableKey for FlowKey {
    #[inline]
    fn hash_with(&self, hasher: &RandomState) -> u64 {
        // Three wide words instead of the derived Hash's dozen small writes. The address
        // family goes into the last word so 10.0.0.1 and ::a00:1 differ.
        let tail = (u64::from(self.src_port) << 48)
            | (u64::from(self.dst_port) << 32)
            | (u64::from(self.proto.number()) << 8)
            | u64::from(self.src.is_ipv6()) << 1
            | u64::from(self.dst.is_ipv6());
        hasher.hash_one((ip_word(&self.src), ip_word(&self.dst), tail))
    }
}

/// pykp's connection table. Every method takes `&self` and may be called from any number
/// of datapath threads; see the module docs for the design.
///
/// Per-backend active counts (`BackendHandle::active`, read by least-connections) are
/// kept exact: +1 when an entry is created, -1 whenever one leaves (replace, remove,
/// expiry, eviction, flush, port reuse, drop of the table).
pub struct ConnTable {
    cfg: ConntrackConfig,
    inner: Sharded<FlowKey, ConnEntry>,
}

impl std::fmt::Debug for ConnTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnTable").field("cfg", &self.cfg).field("stats", &self.stats()).finish()
    }
}

impl ConnEntry {
    #[cfg(test)]
    pub(crate) fn new(b: &Binding, state: ConnState) -> Self {
        ConnEntry { backend: Arc::clone(&b.backend), service: b.service, state }
    }

    #[cfg(test)]
    pub(crate) fn backend_id(&self) -> BackendId {
        self.backend.id
    }

    /// The entry left the table: the backend carries one flow less.
    #[inline]
    pub(crate) fn release(self) {
        self.backend.conn_closed();
    }
}

impl ConnTable {
    /// A table with a random hash key.
    pub fn new(cfg: ConntrackConfig) -> Self {
        Self::with_hasher(cfg, RandomState::new())
    }

    /// A table with a given hash key (`RandomState::with_seeds` makes runs reproducible).
    pub fn with_hasher(cfg: ConntrackConfig, hasher: RandomState) -> Self {
        let inner = Sharded::new(cfg.capacity, cfg.shards, hasher);
        ConnTable { cfg, inner }
    }

    pub fn config(&self) -> &ConntrackConfig {
        &self.cfg
    }

    /// The binding of `key`'s flow, for a packet with `tcp_flags` (TCP; `None` if unknown,
    /// ignored for UDP and SCTP) seen at `now`.
    ///
    /// A hit advances the flow's state, restarts its idle timeout and makes it most recently
    /// used. `None` when there is no entry, when the entry had expired (it is removed), or
    /// when the packet is an initial SYN on a flow that is closing or closed: the client
    /// reused the 5-tuple for a new connection, so the old entry is removed and the caller
    /// balances the SYN again (and inserts the new choice) instead of pinning the new
    /// connection to the old backend.
    #[inline]
    pub fn lookup(
        &self,
        key: &FlowKey,
        tcp_flags: Option<TcpFlags>,
        now: Nanos,
    ) -> Option<Binding> {
        self.lookup_with(key, tcp_flags, now, |service, backend| Binding {
            service,
            backend: Arc::clone(backend),
        })
    }

    /// [`lookup`](Self::lookup) that lends the binding to `f` (called under the shard lock;
    /// keep it short) instead of cloning the `Arc`: saves two atomic operations on a
    /// cache line every worker touching that backend shares.
    #[inline]
    pub fn lookup_with<R>(
        &self,
        key: &FlowKey,
        tcp_flags: Option<TcpFlags>,
        now: Nanos,
        f: impl FnOnce(ServiceId, &Arc<BackendHandle>) -> R,
    ) -> Option<R> {
        let cfg = &self.cfg;
        self.inner.lookup(key, now, ConnEntry::release, |e| match e.state.on_packet(tcp_flags) {
            Some(state) => {
                e.state = state;
                Visit::Keep(f(e.service, &e.backend), now.saturating_add(cfg.timeout(state)))
            }
            None => Visit::Remove,
        })
    }

    /// Record that `key`'s flow goes to `binding`, as of a packet with `tcp_flags` at `now`
    /// (the state starts as [`ConnState::initial`]). An existing entry for the key is
    /// replaced. Counts the flow on `binding.backend` (`conn_opened`).
    pub fn insert(
        &self,
        key: FlowKey,
        binding: Binding,
        tcp_flags: Option<TcpFlags>,
        now: Nanos,
    ) -> InsertOutcome {
        self.insert_in_state(key, binding, ConnState::initial(key.proto, tcp_flags), now)
    }

    fn insert_in_state(
        &self,
        key: FlowKey,
        binding: Binding,
        state: ConnState,
        now: Nanos,
    ) -> InsertOutcome {
        let expires = now.saturating_add(self.cfg.timeout(state));
        binding.backend.conn_opened();
        let entry = ConnEntry { backend: binding.backend, service: binding.service, state };
        match self.inner.insert(key, entry, expires, now, ConnEntry::release) {
            Put::Inserted => InsertOutcome::Inserted,
            Put::Replaced => InsertOutcome::Replaced,
            Put::Evicted(k) => InsertOutcome::Evicted(k),
        }
    }

    /// `key`'s entry (expired ones too: a lookup would drop them, freeing their count), its
    /// state and its deadline, without counting a packet.
    pub(crate) fn peek(&self, key: &FlowKey) -> Option<(Binding, ConnState, Nanos)> {
        let ((binding, state), expires) = self.inner.peek(key, |e| {
            (Binding { service: e.service, backend: Arc::clone(&e.backend) }, e.state)
        })?;
        Some((binding, state, expires))
    }

    /// Forget `key`'s flow; false if there was none.
    pub fn remove(&self, key: &FlowKey) -> bool {
        self.inner.remove(key, ConnEntry::release)
    }

    /// The kernel's conntrack confirmed `key`'s flow, NATed to `backend`. An entry bound to
    /// that backend becomes [`ConnState::Kernel`]: it now lives until the kernel reports the
    /// flow's end ([`remove`](Self::remove)). An entry bound elsewhere is wrong (the kernel
    /// decided that flow, e.g. while the agent was away) and is removed. Returns whether an
    /// entry was confirmed; if not, the caller may [`adopt`](Self::adopt) the flow.
    pub fn confirm(&self, key: &FlowKey, backend: SocketAddr, now: Nanos) -> bool {
        let until = now.saturating_add(self.cfg.kernel);
        self.inner
            .lookup(key, now, ConnEntry::release, |e| {
                if e.backend.addr == backend {
                    e.state = ConnState::Kernel;
                    Visit::Keep((), until)
                } else {
                    Visit::Remove
                }
            })
            .is_some()
    }

    /// Record a flow the kernel's conntrack holds but this table did not: one the kernel
    /// balanced itself, or that started before this table. Counted on its backend like
    /// any other.
    pub fn adopt(&self, key: FlowKey, binding: Binding, now: Nanos) -> InsertOutcome {
        self.insert_in_state(key, binding, ConnState::Kernel, now)
    }

    /// After a full listing of the kernel's flows (`live`): forget the confirmed flows it
    /// no longer holds (their end was lost), and unconfirmed ones that are at least `grace`
    /// old (their first packet never made a conntrack entry: dropped on the way). Younger
    /// unconfirmed entries may still be on their way to the kernel's table. Returns how
    /// many entries were removed.
    pub fn retain_kernel_flows(
        &self,
        live: &std::collections::HashSet<FlowKey>,
        grace: Nanos,
        now: Nanos,
    ) -> usize {
        let cfg = &self.cfg;
        self.inner.remove_where_deadline(
            |k, e, expires| {
                if live.contains(k) {
                    return false;
                }
                // Unconfirmed entries are never refreshed under NFQUEUE, so their age is
                // their timeout minus what is left of it.
                let left = expires.saturating_sub(now);
                e.state == ConnState::Kernel || cfg.timeout(e.state).saturating_sub(left) >= grace
            },
            |r| r.value.release(),
        )
    }

    /// Forget every flow to backend `id` (kube-proxy clears stale UDP flows this way when an
    /// endpoint goes away). O(entries), one shard slice at a time. Returns how many.
    pub fn flush_backend(&self, id: BackendId) -> usize {
        self.inner.remove_where(|_, e| e.backend.id == id, |r| r.value.release())
    }

    /// Forget the `proto` flows of `service` bound to `backend`: kube-proxy's stale-UDP
    /// cleanup when an endpoint leaves one service (it may still serve others, whose
    /// flows stay). Returns how many.
    pub fn flush_backend_proto(
        &self,
        service: ServiceId,
        backend: BackendId,
        proto: Protocol,
    ) -> usize {
        self.inner.remove_where(
            |k, e| e.backend.id == backend && e.service == service && k.proto == proto,
            |r| r.value.release(),
        )
    }

    /// Forget every flow of service `id`. Returns how many.
    pub fn flush_service(&self, id: ServiceId) -> usize {
        self.inner.remove_where(|_, e| e.service == id, |r| r.value.release())
    }

    /// Forget every flow. Returns how many.
    pub fn clear(&self) -> usize {
        self.inner.remove_where(|_, _| true, |r| r.value.release())
    }

    /// One bounded GC step: examine at most `budget` entries (slab slots) in total,
    /// round-robin over shards, and remove those expired at `now`. Returns how many were
    /// removed. Call it periodically with a budget sized to the table (e.g. capacity / 60
    /// every second sweeps everything each minute); lookups expire lazily in between.
    pub fn gc(&self, now: Nanos, budget: usize) -> usize {
        self.inner.gc(now, budget, |r| r.value.release())
    }

    /// Entries now (expired ones not yet collected included).
    pub fn len(&self) -> usize {
        self.inner.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The hard cap on entries.
    pub fn capacity(&self) -> usize {
        self.inner.capacity()
    }

    /// Up to `limit` live entries (most recently used first within each shard), locking one
    /// shard at a time.
    pub fn snapshot(&self, limit: usize, now: Nanos) -> Vec<ConnSnapshot> {
        let mut out = Vec::with_capacity(limit.min(self.len()));
        for shard in self.inner.shards() {
            if out.len() >= limit {
                break;
            }
            let g = shard.lock();
            for node in g.map.iter_mru() {
                if out.len() >= limit {
                    break;
                }
                if now >= node.expires {
                    continue;
                }
                let e = node.value();
                out.push(ConnSnapshot {
                    key: *node.key(),
                    service: e.service,
                    backend_id: e.backend.id,
                    backend: e.backend.addr,
                    state: e.state.as_str(),
                    expires_in: node.expires - now,
                });
            }
        }
        out
    }

    pub fn stats(&self) -> TableStats {
        self.inner.stats()
    }

    /// Live flows per (service, backend), locking one shard at a time.
    pub fn counts(&self, now: Nanos) -> HashMap<(ServiceId, SocketAddr), u64> {
        let mut out = HashMap::new();
        for shard in self.inner.shards() {
            let g = shard.lock();
            for node in g.map.iter_mru() {
                if now < node.expires {
                    let e = node.value();
                    *out.entry((e.service, e.backend.addr)).or_insert(0) += 1;
                }
            }
        }
        out
    }

    #[cfg(test)]
    pub(crate) fn inner_for_tests(&self) -> &Sharded<FlowKey, ConnEntry> {
        &self.inner
    }
}

impl Drop for ConnTable {
    /// Backends outlive the table (the service table holds them too): release their counts.
    fn drop(&mut self) {
        self.clear();
    }
}
