//! The service table: frontends map to services, services to backends.
//!
//! Readers (the packet path) load an immutable snapshot through `arc-swap` and never wait
//! for a writer. Writers go through one `&mut`-free writer lock; an update of one service
//! rebuilds only that service (persistent maps share the rest of the table).

use std::collections::HashMap;
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
    /// On this node (for traffic policy Local, later).
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
    pub frontends: Vec<Frontend>,
    /// Every backend the writer gave, in its order.
    pub backends: Vec<Backend>,
    /// What policies choose from, per address family (NAT does not cross families, so a
    /// dual-stack service is two pools, as kube-proxy runs one proxier per family).
    pub v4: Pool,
    pub v6: Pool,
    pub policy: PolicyKind,
    pub affinity_timeout: Option<Nanos>,
}

/// Backends of one family that policies choose from: ready ones with weight > 0; when
/// there are none, serving and terminating ones (kube-proxy's terminating fallback).
/// Sorted by address.
#[derive(Debug)]
pub struct Pool {
    pub backends: Vec<Backend>,
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
    frontends: ArcSwap<FrontendMap>,
    writer: Mutex<Writer>,
    config: TableConfig,
}

struct Writer {
    services: HashMap<String, Arc<ServiceState>>,
    next_service_id: u32,
    backends: BackendRegistry,
}

impl ServiceTable {
    pub fn new(config: TableConfig) -> Result<Self, SpecError> {
        config.maglev.validate().map_err(SpecError::Config)?;
        Ok(ServiceTable {
            frontends: ArcSwap::from_pointee(FrontendMap::new()),
            writer: Mutex::new(Writer {
                services: HashMap::new(),
                next_service_id: 1,
                backends: BackendRegistry::default(),
            }),
            config,
        })
    }

    pub fn config(&self) -> &TableConfig {
        &self.config
    }

    /// The packet path's lookup: never blocks, whatever writers do.
    #[inline]
    pub fn lookup(&self, frontend: &Frontend) -> Option<Arc<ServiceState>> {
        self.frontends.load().get(frontend).cloned()
    }

    /// Add or replace a service, atomically for readers. Costs O(this service's
    /// frontends x log(services) + its backends), plus O(M) for a Maglev table.
    pub fn upsert(&self, spec: &ServiceSpec) -> Result<Arc<ServiceState>, SpecError> {
        validate(spec)?;
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let old = w.services.get(&spec.name).cloned();
        let current = self.frontends.load_full();
        for f in &spec.frontends {
            if let Some(owner) = current.get(f) {
                if owner.name.as_ref() != spec.name {
                    return Err(SpecError::FrontendTaken {
                        frontend: *f,
                        owner: owner.name.to_string(),
                    });
                }
            }
        }
        let id = match &old {
            Some(s) => s.id,
            None => {
                let id = ServiceId(w.next_service_id);
                w.next_service_id += 1;
                id
            }
        };
        let needed = w.backends.new_addresses(spec.backends.iter().map(|b| b.addr));
        if needed > w.backends.ids_left(self.config.max_backend_id) {
            return Err(SpecError::BackendIdsExhausted { needed, max: self.config.max_backend_id });
        }
        let backends: Vec<Backend> = spec
            .backends
            .iter()
            .map(|b| Backend {
                handle: w.backends.acquire(b.addr),
                weight: b.weight,
                conditions: b.conditions,
                local: b.local,
            })
            .collect();
        if let Some(old) = &old {
            for b in &old.backends {
                w.backends.release(b.handle.addr);
            }
        }
        let policy = spec.policy.unwrap_or(self.config.default_policy);
        let key = spec.hash_key.unwrap_or(self.config.default_hash_key);
        let pool = |v4: bool| {
            let backends = build_pool(backends.iter().filter(|b| b.handle.addr.is_ipv4() == v4));
            let selector = Selector::build(policy, &backends, &self.config.maglev, key);
            Pool { backends, selector }
        };
        let state = Arc::new(ServiceState {
            id,
            name: Arc::from(spec.name.as_str()),
            frontends: spec.frontends.clone(),
            v4: pool(true),
            v6: pool(false),
            backends,
            policy,
            affinity_timeout: spec.affinity_timeout,
        });
        let mut next = (*current).clone();
        if let Some(old) = &old {
            for f in &old.frontends {
                next.remove(f);
            }
        }
        for f in &state.frontends {
            next.insert(*f, state.clone());
        }
        self.frontends.store(Arc::new(next));
        w.services.insert(spec.name.clone(), state.clone());
        Ok(state)
    }

    /// Remove a service; returns it (for flushing its flows) when it existed.
    pub fn remove(&self, name: &str) -> Option<Arc<ServiceState>> {
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let old = w.services.remove(name)?;
        let mut next = (*self.frontends.load_full()).clone();
        for f in &old.frontends {
            next.remove(f);
        }
        self.frontends.store(Arc::new(next));
        for b in &old.backends {
            w.backends.release(b.handle.addr);
        }
        Some(old)
    }

    /// Every service, by name.
    pub fn services(&self) -> Vec<Arc<ServiceState>> {
        let w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = w.services.values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    pub fn get(&self, name: &str) -> Option<Arc<ServiceState>> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner()).services.get(name).cloned()
    }

    /// Every live backend id and its address (what the NFQUEUE datapath's mark map holds).
    pub fn backend_ids(&self) -> Vec<(BackendId, SocketAddr)> {
        let w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = w.backends.live.values().map(|(h, _)| (h.id, h.addr)).collect();
        v.sort();
        v
    }

    /// Service name by id (slow path: for display).
    pub fn name_of(&self, id: ServiceId) -> Option<Arc<str>> {
        let w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        w.services.values().find(|s| s.id == id).map(|s| s.name.clone())
    }

    pub fn len(&self) -> usize {
        self.writer.lock().unwrap_or_else(|p| p.into_inner()).services.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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

/// Backend handles by address, shared across services, with recycled ids.
#[derive(Default)]
struct BackendRegistry {
    live: HashMap<SocketAddr, (Arc<BackendHandle>, usize)>,
    /// Freed ids, reused oldest first so a just-freed id is not handed out again at once.
    free: std::collections::VecDeque<u32>,
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
        let recycled = self.free.iter().filter(|&&id| id <= max).count();
        recycled + max.saturating_sub(self.next_id) as usize
    }

    fn acquire(&mut self, addr: SocketAddr) -> Arc<BackendHandle> {
        if let Some((h, refs)) = self.live.get_mut(&addr) {
            *refs += 1;
            return h.clone();
        }
        // Id 0 means "no backend" in a packet mark.
        let id = self.free.pop_front().unwrap_or_else(|| {
            self.next_id += 1;
            self.next_id
        });
        let h = Arc::new(BackendHandle::new(BackendId(id), addr));
        self.live.insert(addr, (h.clone(), 1));
        h
    }

    fn release(&mut self, addr: SocketAddr) {
        if let Some((h, refs)) = self.live.get_mut(&addr) {
            *refs -= 1;
            if *refs == 0 {
                self.free.push_back(h.id.0);
                self.live.remove(&addr);
            }
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
}
