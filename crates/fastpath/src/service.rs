//! The service table: frontends map to services, services to backends.
//!
//! Readers (the packet path) load an immutable snapshot through `arc-swap` and never wait
//! for a writer. A writer stages a batch of upserts and removals against a copy of the
//! table (persistent maps: the copy and each edit cost O(log n), the rest is shared), then
//! commits it with one snapshot swap, so readers see the whole batch or none of it.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::flow::{Nanos, Protocol};
use crate::policy::maglev::MAX_POOL;
use crate::policy::{HashKey, MaglevConfig, PolicyKind, Selector};

/// A service's id inside the table (stable for the service's life).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceId(pub u32);

/// A backend's id: one per backend address and port, stable while the backend exists in
/// any service, and reused after. The NFQUEUE datapath puts it in the packet mark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendId(pub u32);

/// A backend shared by the service table and the connection table. The connection table
/// counts the flows it carries, which least-connections reads.
#[derive(Debug)]
pub struct BackendHandle {
    pub id: BackendId,
    pub addr: SocketAddr,
    active: AtomicU32,
}

impl BackendHandle {
    pub fn new(id: BackendId, addr: SocketAddr) -> Self {
        BackendHandle { id, addr, active: AtomicU32::new(0) }
    }

    /// Flows the connection table currently binds to this backend.
    pub fn active(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }

    pub fn conn_opened(&self) {
        self.active.fetch_add(1, Ordering::Relaxed);
    }

    pub fn conn_closed(&self) {
        // Saturating: a miscount must never wrap into "4 billion connections".
        let _ = self
            .active
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| Some(n.saturating_sub(1)));
    }
}

/// Where a service is reached: a VIP or node address, a port and a protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: Protocol,
}

/// A backend as a service sees it: the shared handle plus this service's view of it.
#[derive(Clone, Debug)]
pub struct Backend {
    pub handle: Arc<BackendHandle>,
    pub weight: u32,
    pub conditions: Conditions,
    /// On this node: the control plane narrows Local traffic policies to these (and
    /// explain shows it); the engine itself does not read it.
    pub local: bool,
}

impl Backend {
    pub fn new(handle: Arc<BackendHandle>, weight: u32) -> Self {
        Backend { handle, weight, conditions: Conditions::READY, local: false }
    }
}

/// Kubernetes EndpointSlice endpoint conditions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Conditions {
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

impl Conditions {
    pub const READY: Conditions = Conditions { ready: true, serving: true, terminating: false };
}

/// A backend as a writer describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    pub addr: SocketAddr,
    /// 0 drains the backend: it keeps its flows but gets no new ones.
    pub weight: u32,
    pub conditions: Conditions,
    pub local: bool,
}

/// A service as a writer describes it.
#[derive(Clone, Debug)]
pub struct ServiceSpec {
    pub name: String,
    pub frontends: Vec<Frontend>,
    pub backends: Vec<BackendSpec>,
    /// None: the table's default policy.
    pub policy: Option<PolicyKind>,
    /// ClientIP session affinity and its timeout; None for no affinity.
    pub affinity_timeout: Option<Nanos>,
    /// Maglev's key; None: the table's default.
    pub hash_key: Option<HashKey>,
    /// kube-proxy's short-circuit of `externalTrafficPolicy: Local`: a connection from
    /// inside the cluster (a pod, the node itself: the datapath says which) is decided as
    /// this other service (the same port's cluster-wide one) instead.
    pub short_circuit: Option<String>,
}

/// Why a write was refused. The table is unchanged when a write fails.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SpecError {
    EmptyName,
    PortZero(String),
    TooManyBackends(usize),
    FrontendTaken {
        frontend: Frontend,
        owner: String,
    },
    MixedFamily(SocketAddr),
    /// The service needs `needed` new backend ids and fewer are left below `max`.
    BackendIdsExhausted {
        needed: usize,
        max: u32,
    },
    Config(String),
    /// The name is upserted more than once in one batch (the first one stands).
    Duplicate(String),
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpecError::EmptyName => f.write_str("service name is empty"),
            SpecError::PortZero(what) => write!(f, "{what} has port 0"),
            SpecError::TooManyBackends(n) => {
                write!(f, "{n} backends: at most {MAX_POOL} per service")
            }
            SpecError::FrontendTaken { frontend, owner } => write!(
                f,
                "frontend {} {} is already service {owner:?}'s",
                frontend.proto,
                SocketAddr::new(frontend.addr, frontend.port)
            ),
            SpecError::MixedFamily(a) => {
                write!(f, "backend {a} is of another address family than every frontend")
            }
            SpecError::BackendIdsExhausted { needed, max } => write!(
                f,
                "needs {needed} new backend ids and the packet mark carries ids up to {max} \
                 only (widen --mark-mask)"
            ),
            SpecError::Config(msg) => f.write_str(msg),
            SpecError::Duplicate(name) => {
                write!(f, "service {name:?} is upserted more than once in one batch")
            }
        }
    }
}

impl std::error::Error for SpecError {}

/// The state of one service that the packet path reads: immutable once published, except
/// the policy's own cursor.
#[derive(Debug)]
pub struct ServiceState {
    pub id: ServiceId,
    pub name: Arc<str>,
    // Boxed slices, not vectors: one per service, never grown after it is built.
    pub frontends: Box<[Frontend]>,
    /// Every backend the writer gave, in its order.
    pub backends: Box<[Backend]>,
    /// What policies choose from, per address family (NAT does not cross families, so a
    /// dual-stack service is two pools, as kube-proxy runs one proxier per family).
    pub v4: Pool,
    pub v6: Pool,
    pub policy: PolicyKind,
    pub affinity_timeout: Option<Nanos>,
    /// [`ServiceSpec::short_circuit`].
    pub short_circuit: Option<Arc<str>>,
}

/// Backends of one family that policies choose from: ready ones with weight > 0; when
/// there are none, serving and terminating ones (kube-proxy's terminating fallback).
/// Sorted by address.
#[derive(Debug)]
pub struct Pool {
    pub backends: Box<[Backend]>,
    pub selector: Selector,
}

impl Pool {
    /// Whether `handle` (the same backend: id and address) is in this pool.
    pub fn has(&self, handle: &BackendHandle) -> bool {
        self.backends.iter().any(|b| b.handle.id == handle.id && b.handle.addr == handle.addr)
    }
}

impl ServiceState {
    pub fn policy(&self) -> PolicyKind {
        self.policy
    }

    /// The pool for a client of `addr`'s family.
    #[inline]
    pub fn pool_for(&self, addr: IpAddr) -> &Pool {
        if addr.is_ipv4() {
            &self.v4
        } else {
            &self.v6
        }
    }

    /// Whether a backend id is still in one of the pools.
    pub fn in_pool(&self, id: BackendId) -> bool {
        self.v4.backends.iter().chain(&self.v6.backends).any(|b| b.handle.id == id)
    }
}

/// Table-wide settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableConfig {
    pub default_policy: PolicyKind,
    pub maglev: MaglevConfig,
    pub default_hash_key: HashKey,
    /// The largest backend id handed out: what the packet mark's backend field carries. A
    /// service that would need more is refused whole, so what is programmed stays whole.
    pub max_backend_id: u32,
}

impl Default for TableConfig {
    fn default() -> Self {
        TableConfig {
            default_policy: PolicyKind::Random,
            maglev: MaglevConfig::default(),
            default_hash_key: HashKey::FiveTuple,
            max_backend_id: u32::MAX - 1,
        }
    }
}

type FrontendMap = imbl::HashMap<Frontend, Arc<ServiceState>>;

/// The service table: frontends -> services -> backends.
pub struct ServiceTable {
    /// What readers load: the published frontend map.
    frontends: ArcSwap<FrontendMap>,
    writer: Mutex<Writer>,
    config: TableConfig,
    /// Tells this table's [`Staged`] changes from another's.
    table_id: u64,
}

/// The writer's side: the published version of the whole table and how many commits
/// led to it.
struct Writer {
    version: Version,
    generation: u64,
}

/// One version of the whole table. Every map is persistent, so a copy costs O(1) and an
/// edit O(log n): a staged change edits its own copy and never the published one.
#[derive(Clone)]
struct Version {
    services: imbl::HashMap<Arc<str>, Arc<ServiceState>>,
    frontends: FrontendMap,
    backends: BackendRegistry,
    next_service_id: u32,
}

/// A batch of upserts and removals, computed against one version of the table and not
/// yet visible to readers. [`ServiceTable::commit`] publishes it whole; dropping it leaves
/// the table as it was (its backend ids were reserved in its own copy only).
pub struct Staged {
    /// Upserts refused, in the batch's order, with why. A refused service's previous
    /// version is removed by the commit: it must not keep serving or holding frontends.
    pub refused: Vec<(String, SpecError)>,
    /// Backend ids that come into use: program them before committing.
    pub backends_added: Vec<(BackendId, SocketAddr)>,
    /// Backend ids that leave use once committed (reused only after the commit).
    pub backends_removed: Vec<(BackendId, SocketAddr)>,
    /// Accepted upserts as they will be published, in the batch's order.
    pub accepted: Vec<Arc<ServiceState>>,
    /// Names that no longer exist after the commit: removals that existed, and refused
    /// upserts that existed.
    pub removed: Vec<String>,
    /// Each touched service's state before (`None`: new) and after (`None`: gone), for
    /// flushing the flows the change strands. A name removed and upserted again in one
    /// batch is two entries.
    pub(crate) changes: Vec<Change>,
    next: Version,
    table_id: u64,
    generation: u64,
}

/// One service's state before a batch (`None`: new) and after it (`None`: gone).
pub(crate) type Change = (Option<Arc<ServiceState>>, Option<Arc<ServiceState>>);

/// What a batch did, kept after its commit: [`Staged`]'s reports without the table.
#[derive(Clone, Debug, Default)]
pub struct BatchReport {
    pub refused: Vec<(String, SpecError)>,
    pub backends_added: Vec<(BackendId, SocketAddr)>,
    pub backends_removed: Vec<(BackendId, SocketAddr)>,
    pub accepted: Vec<Arc<ServiceState>>,
    pub removed: Vec<String>,
}

impl Staged {
    pub fn report(&self) -> BatchReport {
        BatchReport {
            refused: self.refused.clone(),
            backends_added: self.backends_added.clone(),
            backends_removed: self.backends_removed.clone(),
            accepted: self.accepted.clone(),
            removed: self.removed.clone(),
        }
    }
}

impl fmt::Debug for Staged {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Staged")
            .field("refused", &self.refused)
            .field("backends_added", &self.backends_added)
            .field("backends_removed", &self.backends_removed)
            .field("accepted", &self.accepted.iter().map(|s| &s.name).collect::<Vec<_>>())
            .field("removed", &self.removed)
            .finish_non_exhaustive()
    }
}

/// Why a commit was refused. The table is unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommitError {
    /// Another change was committed after this one was staged: stage again.
    Stale,
    /// The change was staged on another table.
    ForeignTable,
}

impl fmt::Display for CommitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CommitError::Stale => "the table changed after this change was staged: stage it again",
            CommitError::ForeignTable => "this change was staged on another table",
        })
    }
}

impl std::error::Error for CommitError {}

/// A pool as the kernel's fallback path sees it: (backend id, weight), sorted by address.
pub type PoolIds = Vec<(BackendId, u32)>;

impl ServiceState {
    /// The v4 and v6 pools as (id, weight) pairs.
    pub fn pool_ids(&self) -> (PoolIds, PoolIds) {
        let ids = |p: &Pool| p.backends.iter().map(|b| (b.handle.id, b.weight)).collect();
        (ids(&self.v4), ids(&self.v6))
    }
}

static NEXT_TABLE_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl ServiceTable {
    pub fn new(config: TableConfig) -> Result<Self, SpecError> {
        config.maglev.validate().map_err(SpecError::Config)?;
        Ok(ServiceTable {
            frontends: ArcSwap::from_pointee(FrontendMap::new()),
            writer: Mutex::new(Writer {
                version: Version {
                    services: imbl::HashMap::new(),
                    frontends: FrontendMap::new(),
                    backends: BackendRegistry::default(),
                    next_service_id: 1,
                },
                generation: 0,
            }),
            config,
            table_id: NEXT_TABLE_ID.fetch_add(1, Ordering::Relaxed),
        })
    }

    pub fn config(&self) -> &TableConfig {
        &self.config
    }

    fn writer(&self) -> std::sync::MutexGuard<'_, Writer> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The packet path's lookup: never blocks, whatever writers do.
    #[inline]
    pub fn lookup(&self, frontend: &Frontend) -> Option<Arc<ServiceState>> {
        self.frontends.load().get(frontend).cloned()
    }

    /// Compute a batch against the current version without publishing it.
    ///
    /// Removals go first; then every upserted service lets go of its previous frontends;
    /// then upserts claim theirs in the order given, so on a conflict the earlier one (the
    /// caller puts the oldest service first) wins. Backend ids are allocated here, stable
    /// for addresses already live. Costs O(the change x log(services)) plus the upserted
    /// services' policy builds.
    pub fn stage(&self, upserts: &[ServiceSpec], removals: &[String]) -> Staged {
        let (mut next, generation) = {
            let w = self.writer();
            (w.version.clone(), w.generation)
        };
        let mut changes = Vec::new();
        // Backend releases wait for every acquisition: an address that moves from one
        // service to another keeps its id, and an id freed here is not reused before the
        // commit (the old snapshot still uses it).
        let mut released: Vec<SocketAddr> = Vec::new();

        for name in removals {
            if let Some(old) = next.services.remove(name.as_str()) {
                next.release_frontends(&old);
                released.extend(old.backends.iter().map(|b| b.handle.addr));
                changes.push((Some(old), None));
            }
        }

        let mut seen = std::collections::HashSet::new();
        let first: Vec<bool> = upserts.iter().map(|s| seen.insert(s.name.as_str())).collect();
        let previous: Vec<Option<Arc<ServiceState>>> = upserts
            .iter()
            .zip(&first)
            .map(|(spec, &first)| {
                let old = next.services.get(spec.name.as_str()).filter(|_| first).cloned();
                if let Some(old) = &old {
                    next.release_frontends(old);
                }
                old
            })
            .collect();

        let mut refused = Vec::new();
        let mut accepted = Vec::new();
        let mut backends_added = Vec::new();
        for ((spec, old), first) in upserts.iter().zip(previous).zip(first) {
            if !first {
                refused.push((spec.name.clone(), SpecError::Duplicate(spec.name.clone())));
                continue;
            }
            match self.build(&mut next, spec, old.as_deref(), &mut backends_added) {
                Ok(state) => {
                    for f in &state.frontends {
                        next.frontends.insert(*f, state.clone());
                    }
                    next.services.insert(state.name.clone(), state.clone());
                    if let Some(old) = &old {
                        released.extend(old.backends.iter().map(|b| b.handle.addr));
                    }
                    changes.push((old, Some(state.clone())));
                    accepted.push(state);
                }
                Err(e) => {
                    refused.push((spec.name.clone(), e));
                    if let Some(old) = old {
                        next.services.remove(old.name.as_ref());
                        released.extend(old.backends.iter().map(|b| b.handle.addr));
                        changes.push((Some(old), None));
                    }
                }
            }
        }

        let backends_removed =
            released.into_iter().filter_map(|a| next.backends.release(a)).collect::<Vec<_>>();
        next.backends.free_released(&backends_removed);

        let mut removed: Vec<String> = changes
            .iter()
            .filter_map(|(old, _)| old.as_ref())
            .filter(|old| !next.services.contains_key(old.name.as_ref()))
            .map(|old| old.name.to_string())
            .collect();
        removed.dedup();
        Staged {
            refused,
            backends_added,
            backends_removed,
            accepted,
            removed,
            changes,
            next,
            table_id: self.table_id,
            generation,
        }
    }

    /// One upserted service's new state, its frontends checked against `next` (they are
    /// not claimed here) and its backends' ids acquired in `next`.
    fn build(
        &self,
        next: &mut Version,
        spec: &ServiceSpec,
        old: Option<&ServiceState>,
        added: &mut Vec<(BackendId, SocketAddr)>,
    ) -> Result<Arc<ServiceState>, SpecError> {
        validate(spec)?;
        // Previous frontends were let go of: whoever holds one now is another service.
        if let Some((f, owner)) =
            spec.frontends.iter().find_map(|f| next.frontends.get(f).map(|o| (f, o)))
        {
            return Err(SpecError::FrontendTaken { frontend: *f, owner: owner.name.to_string() });
        }
        let needed = next.backends.new_addresses(spec.backends.iter().map(|b| b.addr));
        if needed > next.backends.ids_left(self.config.max_backend_id) {
            return Err(SpecError::BackendIdsExhausted { needed, max: self.config.max_backend_id });
        }
        let id = match old {
            Some(s) => s.id,
            None => {
                next.next_service_id += 1;
                ServiceId(next.next_service_id - 1)
            }
        };
        let backends: Vec<Backend> = spec
            .backends
            .iter()
            .map(|b| {
                let (handle, fresh) = next.backends.acquire(b.addr);
                if fresh {
                    added.push((handle.id, handle.addr));
                }
                Backend { handle, weight: b.weight, conditions: b.conditions, local: b.local }
            })
            .collect();
        let policy = spec.policy.unwrap_or(self.config.default_policy);
        let key = spec.hash_key.unwrap_or(self.config.default_hash_key);
        let pool = |v4: bool| {
            let backends = build_pool(backends.iter().filter(|b| b.handle.addr.is_ipv4() == v4));
            let selector = Selector::build(policy, &backends, &self.config.maglev, key);
            if let (Selector::RoundRobin(rr), Some(old)) = (&selector, old) {
                let old_pool = if v4 { &old.v4 } else { &old.v6 };
                if let Selector::RoundRobin(old_rr) = &old_pool.selector {
                    if let Some(i) = old_rr.peek(&old_pool.backends) {
                        rr.resume_at(&backends, old_pool.backends[i].handle.addr);
                    }
                }
            }
            Pool { backends: backends.into_boxed_slice(), selector }
        };
        Ok(Arc::new(ServiceState {
            id,
            name: Arc::from(spec.name.as_str()),
            frontends: spec.frontends.as_slice().into(),
            v4: pool(true),
            v6: pool(false),
            backends: backends.into_boxed_slice(),
            policy,
            affinity_timeout: spec.affinity_timeout,
            short_circuit: spec.short_circuit.as_deref().map(Arc::from),
        }))
    }

    /// Publish a staged batch with one snapshot swap: readers see all of it or none.
    /// Refused, table unchanged, when anything was committed after it was staged.
    pub fn commit(&self, staged: Staged) -> Result<(), CommitError> {
        let mut w = self.writer();
        if staged.table_id != self.table_id {
            return Err(CommitError::ForeignTable);
        }
        if staged.generation != w.generation {
            return Err(CommitError::Stale);
        }
        self.frontends.store(Arc::new(staged.next.frontends.clone()));
        w.version = staged.next;
        w.generation += 1;
        Ok(())
    }

    /// Add or replace a service, atomically for readers: a one-service batch, except that
    /// a refused write changes nothing (the previous version stays).
    pub fn upsert(&self, spec: &ServiceSpec) -> Result<Arc<ServiceState>, SpecError> {
        loop {
            let mut staged = self.stage(std::slice::from_ref(spec), &[]);
            if let Some((_, e)) = staged.refused.pop() {
                return Err(e);
            }
            let state = staged.accepted[0].clone();
            // Stale only when another writer got in between: stage again on its version.
            if self.commit(staged).is_ok() {
                return Ok(state);
            }
        }
    }

    /// Remove a service; returns it (for flushing its flows) when it existed.
    pub fn remove(&self, name: &str) -> Option<Arc<ServiceState>> {
        loop {
            let mut staged = self.stage(&[], &[name.to_string()]);
            let old = staged.changes.pop()?.0;
            if self.commit(staged).is_ok() {
                return old;
            }
        }
    }

    /// Every service, by name.
    pub fn services(&self) -> Vec<Arc<ServiceState>> {
        let mut v: Vec<_> = self.writer().version.services.values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    pub fn get(&self, name: &str) -> Option<Arc<ServiceState>> {
        self.writer().version.services.get(name).cloned()
    }

    /// Every live backend id and its address (what the NFQUEUE datapath's mark map holds).
    pub fn backend_ids(&self) -> Vec<(BackendId, SocketAddr)> {
        let w = self.writer();
        let mut v: Vec<_> = w.version.backends.live.values().map(|(h, _)| (h.id, h.addr)).collect();
        v.sort();
        v
    }

    /// Service name by id (slow path: for display).
    pub fn name_of(&self, id: ServiceId) -> Option<Arc<str>> {
        let w = self.writer();
        let name = w.version.services.values().find(|s| s.id == id).map(|s| s.name.clone());
        name
    }

    pub fn len(&self) -> usize {
        self.writer().version.services.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Version {
    /// Let go of `old`'s frontends (those still mapped to it).
    fn release_frontends(&mut self, old: &Arc<ServiceState>) {
        for f in &old.frontends {
            if self.frontends.get(f).is_some_and(|s| Arc::ptr_eq(s, old)) {
                self.frontends.remove(f);
            }
        }
    }
}

fn validate(spec: &ServiceSpec) -> Result<(), SpecError> {
    if spec.name.is_empty() {
        return Err(SpecError::EmptyName);
    }
    if let Some(f) = spec.frontends.iter().find(|f| f.port == 0) {
        return Err(SpecError::PortZero(format!("frontend {}", f.addr)));
    }
    if let Some(b) = spec.backends.iter().find(|b| b.addr.port() == 0) {
        return Err(SpecError::PortZero(format!("backend {}", b.addr.ip())));
    }
    if spec.backends.len() > MAX_POOL {
        return Err(SpecError::TooManyBackends(spec.backends.len()));
    }
    // A dual-stack service has frontends of both families; a backend must be reachable
    // from at least one of them (NAT does not translate between families).
    if !spec.frontends.is_empty() {
        if let Some(b) = spec
            .backends
            .iter()
            .find(|b| !spec.frontends.iter().any(|f| f.addr.is_ipv4() == b.addr.is_ipv4()))
        {
            return Err(SpecError::MixedFamily(b.addr));
        }
    }
    Ok(())
}

/// kube-proxy's endpoint categorisation: ready ones; if none, serving and terminating.
fn build_pool<'a>(backends: impl Iterator<Item = &'a Backend> + Clone) -> Vec<Backend> {
    let usable = |b: &&Backend| b.weight > 0;
    let mut pool: Vec<Backend> =
        backends.clone().filter(usable).filter(|b| b.conditions.ready).cloned().collect();
    if pool.is_empty() {
        pool = backends
            .filter(usable)
            .filter(|b| b.conditions.serving && b.conditions.terminating)
            .cloned()
            .collect();
    }
    pool.sort_by_key(|b| b.handle.addr);
    pool.dedup_by_key(|b| b.handle.addr);
    pool
}

/// Backend handles by address, shared across services, with recycled ids. Persistent
/// maps: a staged copy costs O(1).
#[derive(Clone, Default)]
struct BackendRegistry {
    live: imbl::HashMap<SocketAddr, (Arc<BackendHandle>, usize)>,
    /// Freed ids, reused oldest first so a just-freed id is not handed out again at once.
    /// Every id here is at most the table's `max_backend_id` (none past it is handed out).
    free: imbl::Vector<u32>,
    next_id: u32,
}

impl BackendRegistry {
    /// How many distinct addresses of `addrs` have no id yet.
    fn new_addresses(&self, addrs: impl Iterator<Item = SocketAddr>) -> usize {
        let mut fresh: Vec<SocketAddr> = addrs.filter(|a| !self.live.contains_key(a)).collect();
        fresh.sort_unstable();
        fresh.dedup();
        fresh.len()
    }

    /// Ids that can still be handed out without passing `max`.
    fn ids_left(&self, max: u32) -> usize {
        self.free.len() + max.saturating_sub(self.next_id) as usize
    }

    /// The address's handle, and whether its id is new.
    fn acquire(&mut self, addr: SocketAddr) -> (Arc<BackendHandle>, bool) {
        if let Some((h, refs)) = self.live.get_mut(&addr) {
            *refs += 1;
            return (h.clone(), false);
        }
        // Id 0 means "no backend" in a packet mark.
        let id = self.free.pop_front().unwrap_or_else(|| {
            self.next_id += 1;
            self.next_id
        });
        let h = Arc::new(BackendHandle::new(BackendId(id), addr));
        self.live.insert(addr, (h.clone(), 1));
        (h, true)
    }

    /// Drop one reference; the id and address when it was the last (the id is not free
    /// until [`BackendRegistry::free_released`]).
    fn release(&mut self, addr: SocketAddr) -> Option<(BackendId, SocketAddr)> {
        let (h, refs) = self.live.get_mut(&addr)?;
        *refs -= 1;
        if *refs > 0 {
            return None;
        }
        let id = h.id;
        self.live.remove(&addr);
        Some((id, addr))
    }

    fn free_released(&mut self, released: &[(BackendId, SocketAddr)]) {
        for (id, _) in released {
            self.free.push_back(id.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn fe(last: u8, port: u16) -> Frontend {
        Frontend { addr: IpAddr::V4(Ipv4Addr::new(10, 96, 0, last)), port, proto: Protocol::Tcp }
    }

    fn be(last: u8, c: Conditions) -> BackendSpec {
        BackendSpec {
            addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 244, 0, last)), 8080),
            weight: 1,
            conditions: c,
            local: false,
        }
    }

    fn spec(name: &str, fes: Vec<Frontend>, bes: Vec<BackendSpec>) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            frontends: fes,
            backends: bes,
            policy: None,
            affinity_timeout: None,
            hash_key: None,
            short_circuit: None,
        }
    }

    const TERMINATING: Conditions = Conditions { ready: false, serving: true, terminating: true };
    const NOT_SERVING: Conditions = Conditions { ready: false, serving: false, terminating: true };

    #[test]
    fn lookup_finds_the_service_of_each_frontend() {
        let t = ServiceTable::new(TableConfig::default()).unwrap();
        t.upsert(&spec("a", vec![fe(1, 80), fe(1, 443)], vec![be(1, Conditions::READY)])).unwrap();
        t.upsert(&spec("b", vec![fe(2, 80)], vec![])).unwrap();
        assert_eq!(t.lookup(&fe(1, 443)).unwrap().name.as_ref(), "a");
        assert_eq!(t.lookup(&fe(2, 80)).unwrap().name.as_ref(), "b");
        assert!(t.lookup(&fe(3, 80)).is_none());
        // Replacing a service drops frontends it no longer has.
        t.upsert(&spec("a", vec![fe(1, 80)], vec![])).unwrap();
        assert!(t.lookup(&fe(1, 443)).is_none());
        assert!(t.remove("a").is_some());
        assert!(t.lookup(&fe(1, 80)).is_none());
        assert!(t.remove("a").is_none());
    }

    #[test]
    fn a_service_needing_ids_past_the_mark_is_refused_whole_and_the_rest_stays() {
        let t =
            ServiceTable::new(TableConfig { max_backend_id: 3, ..TableConfig::default() }).unwrap();
        let r = Conditions::READY;
        t.upsert(&spec("a", vec![fe(1, 80)], vec![be(1, r), be(2, r)])).unwrap();
        // One id left: a service with two new addresses does not fit; one sharing a live
        // address and adding one new does.
        let refused = t.upsert(&spec("b", vec![fe(2, 80)], vec![be(3, r), be(4, r)]));
        assert_eq!(refused.unwrap_err(), SpecError::BackendIdsExhausted { needed: 2, max: 3 });
        assert!(t.lookup(&fe(2, 80)).is_none());
        t.upsert(&spec("c", vec![fe(3, 80)], vec![be(2, r), be(3, r)])).unwrap();
        assert!(t.backend_ids().iter().all(|(id, _)| (1..=3).contains(&id.0)));
        // A freed id (10.244.0.1's) is handed out again, never one past the mark.
        t.remove("a");
        t.upsert(&spec("b", vec![fe(2, 80)], vec![be(3, r), be(4, r)])).unwrap();
        let ids: Vec<u32> = t.backend_ids().iter().map(|(id, _)| id.0).collect();
        assert_eq!(ids, vec![1, 2, 3]);
    }

    #[test]
    fn terminating_backends_only_when_no_ready_one() {
        let t = ServiceTable::new(TableConfig::default()).unwrap();
        let s = t
            .upsert(&spec("a", vec![fe(1, 80)], vec![be(1, TERMINATING), be(2, Conditions::READY)]))
            .unwrap();
        assert_eq!(s.v4.backends.len(), 1);
        assert_eq!(s.v4.backends[0].handle.addr.ip(), IpAddr::V4(Ipv4Addr::new(10, 244, 0, 2)));
        let s = t
            .upsert(&spec("a", vec![fe(1, 80)], vec![be(1, TERMINATING), be(3, NOT_SERVING)]))
            .unwrap();
        assert_eq!(
            s.v4.backends.len(),
            1,
            "serving+terminating is the fallback; not-serving never"
        );
        assert_eq!(s.v4.backends[0].handle.addr.ip(), IpAddr::V4(Ipv4Addr::new(10, 244, 0, 1)));
    }

    #[test]
    fn a_frontend_belongs_to_one_service() {
        let t = ServiceTable::new(TableConfig::default()).unwrap();
        t.upsert(&spec("a", vec![fe(1, 80)], vec![])).unwrap();
        let err = t.upsert(&spec("b", vec![fe(1, 80)], vec![])).unwrap_err();
        assert!(matches!(err, SpecError::FrontendTaken { .. }));
        assert!(t.get("b").is_none(), "a refused write changes nothing");
    }

    #[test]
    fn backend_ids_are_shared_stable_and_recycled() {
        let t = ServiceTable::new(TableConfig::default()).unwrap();
        let a = t.upsert(&spec("a", vec![fe(1, 80)], vec![be(1, Conditions::READY)])).unwrap();
        let b = t.upsert(&spec("b", vec![fe(2, 80)], vec![be(1, Conditions::READY)])).unwrap();
        assert_eq!(a.backends[0].handle.id, b.backends[0].handle.id);
        assert!(Arc::ptr_eq(&a.backends[0].handle, &b.backends[0].handle));
        let a2 = t
            .upsert(&spec(
                "a",
                vec![fe(1, 80)],
                vec![be(1, Conditions::READY), be(2, Conditions::READY)],
            ))
            .unwrap();
        assert_eq!(a2.backends[0].handle.id, a.backends[0].handle.id, "stable across updates");
        t.remove("a");
        t.remove("b");
        assert!(t.backend_ids().is_empty());
        let c = t.upsert(&spec("c", vec![fe(3, 80)], vec![be(9, Conditions::READY)])).unwrap();
        assert!(c.backends[0].handle.id.0 >= 1);
    }

    #[test]
    fn bad_specs_are_refused() {
        let t = ServiceTable::new(TableConfig::default()).unwrap();
        assert_eq!(t.upsert(&spec("", vec![], vec![])).unwrap_err(), SpecError::EmptyName);
        assert!(t.upsert(&spec("a", vec![fe(1, 0)], vec![])).is_err());
        let v6 = BackendSpec { addr: "[fd00::1]:80".parse().unwrap(), ..be(1, Conditions::READY) };
        assert!(matches!(
            t.upsert(&spec("a", vec![fe(1, 80)], vec![v6])),
            Err(SpecError::MixedFamily(_))
        ));
        let bad =
            TableConfig { maglev: MaglevConfig { table_size: 100, seed: 0 }, ..Default::default() };
        assert!(ServiceTable::new(bad).is_err());
    }

    #[test]
    fn readers_keep_their_snapshot_while_a_writer_replaces_it() {
        let t = ServiceTable::new(TableConfig::default()).unwrap();
        t.upsert(&spec("a", vec![fe(1, 80)], vec![be(1, Conditions::READY)])).unwrap();
        let held = t.lookup(&fe(1, 80)).unwrap();
        t.upsert(&spec("a", vec![fe(1, 80)], vec![be(2, Conditions::READY)])).unwrap();
        assert_eq!(held.v4.backends[0].handle.addr.ip(), IpAddr::V4(Ipv4Addr::new(10, 244, 0, 1)));
        let now = t.lookup(&fe(1, 80)).unwrap();
        assert_eq!(now.v4.backends[0].handle.addr.ip(), IpAddr::V4(Ipv4Addr::new(10, 244, 0, 2)));
    }

    fn names(states: &[Arc<ServiceState>]) -> Vec<&str> {
        states.iter().map(|s| s.name.as_ref()).collect()
    }

    fn owner(t: &ServiceTable, f: Frontend) -> Option<String> {
        t.lookup(&f).map(|s| s.name.to_string())
    }

    fn id_of(t: &ServiceTable, last: u8) -> Option<BackendId> {
        let addr = be(last, Conditions::READY).addr;
        t.backend_ids().into_iter().find(|(_, a)| *a == addr).map(|(id, _)| id)
    }

    const R: Conditions = Conditions::READY;

    #[test]
    fn a_batch_swaps_a_frontend_between_two_services() {
        let t = ServiceTable::new(TableConfig::default()).unwrap();
        t.upsert(&spec("a", vec![fe(1, 80)], vec![be(1, R)])).unwrap();
        t.upsert(&spec("b", vec![fe(2, 80)], vec![be(2, R)])).unwrap();
        let (a, b) = (t.get("a").unwrap().id, t.get("b").unwrap().id);
        let staged = t.stage(
            &[
                spec("a", vec![fe(2, 80)], vec![be(1, R)]),
                spec("b", vec![fe(1, 80)], vec![be(2, R)]),
            ],
            &[],
        );
        assert!(staged.refused.is_empty(), "{:?}", staged.refused);
        assert_eq!(names(&staged.accepted), ["a", "b"]);
        assert!(staged.backends_added.is_empty() && staged.backends_removed.is_empty());
        assert_eq!(owner(&t, fe(1, 80)).as_deref(), Some("a"), "nothing visible before commit");
        t.commit(staged).unwrap();
        assert_eq!(owner(&t, fe(1, 80)).as_deref(), Some("b"));
        assert_eq!(owner(&t, fe(2, 80)).as_deref(), Some("a"));
        assert_eq!((t.get("a").unwrap().id, t.get("b").unwrap().id), (a, b), "ids are stable");
    }

    #[test]
    fn on_a_frontend_conflict_the_earlier_upsert_wins_and_others_keep_theirs() {
        let t = ServiceTable::new(TableConfig::default()).unwrap();
        t.upsert(&spec("c", vec![fe(3, 80)], vec![])).unwrap();
        let staged = t.stage(
            &[
                spec("old", vec![fe(1, 80)], vec![be(1, R)]),
                spec("new", vec![fe(2, 80), fe(1, 80)], vec![be(2, R)]),
                spec("thief", vec![fe(3, 80)], vec![]),
                spec("bad", vec![fe(4, 0)], vec![]),
            ],
            &[],
        );
        assert_eq!(names(&staged.accepted), ["old"]);
        let refused: Vec<(&str, String)> =
            staged.refused.iter().map(|(n, e)| (n.as_str(), e.to_string())).collect();
        assert_eq!(refused.len(), 3);
        assert_eq!(refused[0].0, "new");
        assert!(refused[0].1.contains("\"old\""), "{}", refused[0].1);
        assert_eq!(refused[1].0, "thief");
        assert!(refused[1].1.contains("\"c\""), "{}", refused[1].1);
        assert_eq!(refused[2].0, "bad");
        // A refused upsert acquires no backend id.
        assert_eq!(staged.backends_added.len(), 1);
        t.commit(staged).unwrap();
        assert_eq!(owner(&t, fe(1, 80)).as_deref(), Some("old"));
        assert_eq!(owner(&t, fe(2, 80)), None, "a refused service claims none of its frontends");
        assert_eq!(owner(&t, fe(3, 80)).as_deref(), Some("c"));
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn a_refused_service_loses_its_previous_version() {
        let t = ServiceTable::new(TableConfig::default()).unwrap();
        t.upsert(&spec("a", vec![fe(1, 80)], vec![be(1, R)])).unwrap();
        t.upsert(&spec("b", vec![fe(2, 80)], vec![be(2, R)])).unwrap();
        let b2 = id_of(&t, 2).unwrap();
        // b now wants a's frontend: refused, and its old version stops serving fe 2.
        let staged = t.stage(&[spec("b", vec![fe(1, 80)], vec![be(2, R)])], &[]);
        assert_eq!(staged.refused.len(), 1);
        assert!(matches!(staged.refused[0].1, SpecError::FrontendTaken { .. }));
        assert_eq!(staged.removed, ["b"]);
        assert_eq!(staged.backends_removed, [(b2, be(2, R).addr)]);
        t.commit(staged).unwrap();
        assert!(t.get("b").is_none());
        assert_eq!(owner(&t, fe(2, 80)), None);
        assert_eq!(id_of(&t, 2), None);
        // The single-service upsert keeps its old contract: refused, nothing changes.
        t.upsert(&spec("b", vec![fe(2, 80)], vec![be(2, R)])).unwrap();
        assert!(t.upsert(&spec("b", vec![fe(1, 80)], vec![])).is_err());
        assert_eq!(owner(&t, fe(2, 80)).as_deref(), Some("b"));
    }

    #[test]
    fn a_batch_reports_the_backend_ids_it_adds_and_removes() {
        let t = ServiceTable::new(TableConfig::default()).unwrap();
        t.upsert(&spec("a", vec![fe(1, 80)], vec![be(1, R), be(2, R)])).unwrap();
        t.upsert(&spec("c", vec![fe(3, 80)], vec![be(4, R)])).unwrap();
        let (id1, id2, id4) = (id_of(&t, 1).unwrap(), id_of(&t, 2).unwrap(), id_of(&t, 4).unwrap());
        // a drops .1 and adds .3; b (new) takes .1 over; c goes away with .4.
        let staged = t.stage(
            &[
                spec("a", vec![fe(1, 80)], vec![be(2, R), be(3, R)]),
                spec("b", vec![fe(2, 80)], vec![be(1, R)]),
            ],
            &["c".to_string(), "absent".to_string()],
        );
        assert!(staged.refused.is_empty());
        assert_eq!(staged.removed, ["c"]);
        assert_eq!(staged.backends_removed, [(id4, be(4, R).addr)]);
        assert_eq!(staged.backends_added.len(), 1);
        let (id3, addr3) = staged.backends_added[0];
        assert_eq!(addr3, be(3, R).addr);
        assert!(![id1, id2, id4].contains(&id3), "an id freed by the batch is not reused in it");
        let pools: Vec<_> = staged.accepted.iter().map(|s| s.pool_ids()).collect();
        assert_eq!(pools[0], (vec![(id2, 1), (id3, 1)], vec![]));
        assert_eq!(pools[1], (vec![(id1, 1)], vec![]), "a moved address keeps its id");
        t.commit(staged).unwrap();
        assert_eq!(
            t.backend_ids(),
            [(id1, be(1, R).addr), (id2, be(2, R).addr), (id3, addr3)]
                .into_iter()
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect::<Vec<_>>()
        );
        // After the commit the freed id is handed out again.
        let staged = t.stage(&[spec("d", vec![fe(4, 80)], vec![be(5, R)])], &[]);
        assert_eq!(staged.backends_added, [(id4, be(5, R).addr)]);
    }

    #[test]
    fn a_name_removed_and_upserted_in_one_batch_is_a_new_service() {
        let t = ServiceTable::new(TableConfig::default()).unwrap();
        let old = t.upsert(&spec("a", vec![fe(1, 80)], vec![be(1, R)])).unwrap();
        let staged = t.stage(
            &[spec("a", vec![fe(1, 80)], vec![be(1, R)]), spec("a", vec![fe(2, 80)], vec![])],
            &["a".to_string()],
        );
        assert!(staged.removed.is_empty(), "a exists after the commit");
        assert!(staged.backends_added.is_empty() && staged.backends_removed.is_empty());
        assert_eq!(staged.refused.len(), 1);
        assert_eq!(staged.refused[0].1, SpecError::Duplicate("a".into()));
        t.commit(staged).unwrap();
        assert_ne!(t.get("a").unwrap().id, old.id);
        assert_eq!(owner(&t, fe(2, 80)), None);
    }

    #[test]
    fn a_stale_or_foreign_staged_change_is_refused_and_changes_nothing() {
        let t = ServiceTable::new(TableConfig::default()).unwrap();
        let first = t.stage(&[spec("a", vec![fe(1, 80)], vec![be(1, R)])], &[]);
        let second = t.stage(&[spec("b", vec![fe(1, 80)], vec![be(2, R)])], &[]);
        // Both allocated the same first id, for different addresses.
        assert_eq!(first.backends_added[0].0, second.backends_added[0].0);
        t.commit(second).unwrap();
        assert_eq!(t.commit(first).unwrap_err(), CommitError::Stale);
        assert_eq!(owner(&t, fe(1, 80)).as_deref(), Some("b"));
        assert_eq!(t.backend_ids(), [(BackendId(1), be(2, R).addr)]);
        // Any write in between makes a staged change stale, a single upsert too.
        let third = t.stage(&[], &["b".to_string()]);
        t.upsert(&spec("c", vec![fe(3, 80)], vec![])).unwrap();
        assert_eq!(t.commit(third).unwrap_err(), CommitError::Stale);
        assert!(t.get("b").is_some());
        let other = ServiceTable::new(TableConfig::default()).unwrap();
        let foreign = other.stage(&[], &[]);
        assert_eq!(t.commit(foreign).unwrap_err(), CommitError::ForeignTable);
    }

    #[test]
    fn a_dropped_staged_change_leaves_the_table_as_it_was() {
        let t =
            ServiceTable::new(TableConfig { max_backend_id: 3, ..TableConfig::default() }).unwrap();
        t.upsert(&spec("a", vec![fe(1, 80)], vec![be(1, R)])).unwrap();
        let before = (t.backend_ids(), t.services().len(), owner(&t, fe(1, 80)));
        let staged = t.stage(
            &[spec("b", vec![fe(1, 80), fe(2, 80)], vec![be(2, R), be(3, R)])],
            &["a".to_string()],
        );
        assert_eq!(staged.backends_added.len(), 2);
        drop(staged);
        assert_eq!((t.backend_ids(), t.services().len(), owner(&t, fe(1, 80))), before);
        assert_eq!(owner(&t, fe(2, 80)), None);
        // Its reserved ids were never taken: the two left are still there.
        let staged = t.stage(&[spec("c", vec![fe(3, 80)], vec![be(4, R), be(5, R)])], &[]);
        assert!(staged.refused.is_empty());
        assert_eq!(staged.backends_added.iter().map(|(id, _)| id.0).collect::<Vec<_>>(), [2, 3]);
    }

    #[test]
    fn readers_see_a_whole_batch_or_none_of_it() {
        use std::sync::atomic::AtomicBool;
        let t = Arc::new(ServiceTable::new(TableConfig::default()).unwrap());
        let layout = |flip: bool| {
            let (x, y) = if flip { (fe(2, 80), fe(1, 80)) } else { (fe(1, 80), fe(2, 80)) };
            [spec("a", vec![x], vec![be(1, R)]), spec("b", vec![y], vec![be(2, R)])]
        };
        t.commit(t.stage(&layout(false), &[])).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (t, stop) = (t.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut snapshots = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let snap = t.frontends.load_full();
                    let (x, y) = (snap.get(&fe(1, 80)), snap.get(&fe(2, 80)));
                    let (x, y) = (x.expect("fe 1 absent"), y.expect("fe 2 absent"));
                    assert_ne!(x.name, y.name, "one service holds both: half a batch");
                    assert!(t.lookup(&fe(1, 80)).is_some(), "fe 1 absent");
                    snapshots += 1;
                }
                snapshots
            })
        };
        for i in 0..2000 {
            let staged = t.stage(&layout(i % 2 == 0), &[]);
            assert!(staged.refused.is_empty());
            t.commit(staged).unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        assert!(reader.join().unwrap() > 0);
    }
}
