//! Session affinity (Kubernetes `sessionAffinity: ClientIP`): a client IP keeps going to
//! the same backend of a service until it has been idle for the service's timeout,
//! like kube-proxy's `recent` match. Independent of the connection table: affinity
//! outlives connections, and its entries are not active connections.

use std::net::IpAddr;
use std::sync::Arc;

use ahash::RandomState;

use crate::flow::Nanos;
use crate::service::{BackendHandle, BackendId, ServiceId};

use super::config::ConntrackConfig;
use super::shard::TableKey;
use super::sharded::{Put, Sharded, TableStats, Visit};

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct AffinityKey {
    service: ServiceId,
    client: IpAddr,
}

impl TableKey for AffinityKey {
    #[inline]
    fn hash_with(&self, hasher: &RandomState) -> u64 {
        let (ip, v6) = match self.client {
            IpAddr::V4(a) => (u128::from(u32::from(a)), 0u64),
            IpAddr::V6(a) => (u128::from(a), 1u64),
        };
        hasher.hash_one((ip, (u64::from(self.service.0) << 1) | v6))
    }
}

/// `(service, client IP) -> backend`, sharded, capped (LRU) and expiring like the
/// connection table.
///
/// The deadline is `last use + timeout`, with the timeout given at that last use; if a
/// service's timeout shrinks, existing entries keep their old deadline until next used
/// (call [`flush_service`](Self::flush_service) to apply it at once). A returned backend
/// may have left the service since: the caller checks and re-balances.
pub struct AffinityTable {
    inner: Sharded<AffinityKey, Arc<BackendHandle>>,
}

impl std::fmt::Debug for AffinityTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AffinityTable").field("stats", &self.stats()).finish()
    }
}

impl AffinityTable {
    /// `cfg.affinity_capacity` entries over `cfg.shards` shards, random hash key.
    pub fn new(cfg: ConntrackConfig) -> Self {
        Self::with_hasher(cfg.affinity_capacity, cfg.shards, RandomState::new())
    }

    pub fn with_hasher(capacity: usize, shards: usize, hasher: RandomState) -> Self {
        AffinityTable { inner: Sharded::new(capacity, shards, hasher) }
    }

    /// The backend `client` is pinned to for `service`, refreshing the deadline to
    /// `now + timeout`. `None` if there is none or it expired (then it is removed).
    #[inline]
    pub fn lookup(
        &self,
        service: ServiceId,
        client: IpAddr,
        timeout: Nanos,
        now: Nanos,
    ) -> Option<Arc<BackendHandle>> {
        let key = AffinityKey { service, client };
        self.inner
            .lookup(&key, now, drop, |b| Visit::Keep(Arc::clone(b), now.saturating_add(timeout)))
    }

    /// Pin `client` to `backend` for `service` until `now + timeout` (replacing any pin).
    /// Returns true if a live entry of another client had to be evicted to make room.
    pub fn insert(
        &self,
        service: ServiceId,
        client: IpAddr,
        backend: Arc<BackendHandle>,
        timeout: Nanos,
        now: Nanos,
    ) -> bool {
        let key = AffinityKey { service, client };
        matches!(
            self.inner.insert(key, backend, now.saturating_add(timeout), now, drop),
            Put::Evicted(_)
        )
    }

    /// The backend `client` is pinned to and the time left, without refreshing the pin.
    pub(crate) fn peek(
        &self,
        service: ServiceId,
        client: IpAddr,
        now: Nanos,
    ) -> Option<(Arc<BackendHandle>, Nanos)> {
        let key = AffinityKey { service, client };
        let (backend, expires) = self.inner.peek(&key, Arc::clone)?;
        (now < expires).then(|| (backend, expires - now))
    }

    /// Unpin `client` from `service`; false if it was not pinned.
    pub fn remove(&self, service: ServiceId, client: IpAddr) -> bool {
        self.inner.remove(&AffinityKey { service, client }, drop)
    }

    /// Unpin every client from backend `id` (it went away). Returns how many.
    pub fn flush_backend(&self, id: BackendId) -> usize {
        self.inner.remove_where(|_, b| b.id == id, drop)
    }

    /// Unpin every client of service `id`. Returns how many.
    pub fn flush_service(&self, id: ServiceId) -> usize {
        self.inner.remove_where(|k, _| k.service == id, drop)
    }

    /// One bounded GC step, as [`ConnTable::gc`](super::ConnTable::gc).
    pub fn gc(&self, now: Nanos, budget: usize) -> usize {
        self.inner.gc(now, budget, drop)
    }

    pub fn len(&self) -> usize {
        self.inner.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> usize {
        self.inner.capacity()
    }

    pub fn stats(&self) -> TableStats {
        self.inner.stats()
    }
}
