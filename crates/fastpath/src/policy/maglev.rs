//! Maglev consistent hashing (Eisenbud et al., NSDI 2016, section 3.4).
//!
//! Every backend gets a permutation of the table's M slots from two seeded hashes of its
//! address (offset, skip); backends take turns claiming their next free slot until the
//! table is full. The same pool and seed give the same table on every node, whatever the
//! order the pool arrives in, so every node sends a flow to the same backend; removing one
//! of N backends moves about 1/N of the flows. Weighted pools take `weight` turns a round.
//!
//! A table is built on its service's first decision, not when the service is loaded: an
//! agent loads every Service of the cluster, most of which a node never sends a new
//! connection to, and at M = 65,537 each table costs ~0.5 ms and 64-128 KiB (10,000 Maglev
//! services built eagerly took 5 s and 1.3 GB). Built or not, the table is the same.

use std::net::IpAddr;
use std::sync::OnceLock;

use super::{scale, Policy, SelectInput};
use crate::flow::FlowKey;
use crate::hash::{hash_bytes, hash_words};
use crate::service::Backend;

/// The paper's default: a prime well above 100 x the backends of a service.
pub const DEFAULT_TABLE_SIZE: u32 = 65_537;
/// Tables index pools with u16 (u8 for pools of at most [`NARROW_POOL`]).
pub const MAX_POOL: usize = u16::MAX as usize;
/// Pools up to this size get a table of bytes (filled as u16, then narrowed): half the memory.
const NARROW_POOL: usize = u8::MAX as usize;
const EMPTY: u16 = u16::MAX;
const SKIP_SALT: u64 = 0x5bd1_e995_0000_0001;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevConfig {
    /// M, a prime. Memory is M bytes per Maglev service that has had a new connection
    /// (2 x M past 255 backends).
    pub table_size: u32,
    /// The same seed on every node gives every node the same table.
    pub seed: u64,
}

impl Default for MaglevConfig {
    fn default() -> Self {
        MaglevConfig { table_size: DEFAULT_TABLE_SIZE, seed: 0 }
    }
}

impl MaglevConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.table_size < 3 || self.table_size > (1 << 24) || !is_prime(self.table_size) {
            return Err(format!(
                "maglev table size {} must be a prime between 3 and 16777216 (65537 is the default)",
                self.table_size
            ));
        }
        Ok(())
    }
}

pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while u64::from(d) * u64::from(d) <= u64::from(n) {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// Which part of a flow picks the slot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum HashKey {
    /// Protocol, both addresses and both ports: connections spread across backends.
    #[default]
    FiveTuple,
    /// Client address only: every connection of a client lands on one backend.
    SourceIp,
}

impl HashKey {
    pub const fn as_str(self) -> &'static str {
        match self {
            HashKey::FiveTuple => "5-tuple",
            HashKey::SourceIp => "source-ip",
        }
    }
}

impl std::str::FromStr for HashKey {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "5-tuple" | "five-tuple" | "5tuple" => Ok(HashKey::FiveTuple),
            "source-ip" | "src-ip" | "client-ip" => Ok(HashKey::SourceIp),
            other => Err(format!("unknown hash key {other:?} (expected 5-tuple or source-ip)")),
        }
    }
}

fn ip_words(ip: IpAddr) -> (u64, u64) {
    let v = match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    };
    ((v >> 64) as u64, v as u64)
}

/// The flow's hash under `key`; identical on every node for the same seed.
#[inline]
pub fn flow_hash(flow: &FlowKey, key: HashKey, seed: u64) -> u64 {
    let (sh, sl) = ip_words(flow.src);
    match key {
        HashKey::SourceIp => hash_words(seed, &[sh, sl]),
        HashKey::FiveTuple => {
            let (dh, dl) = ip_words(flow.dst);
            let rest = (u64::from(flow.src_port) << 32)
                | (u64::from(flow.dst_port) << 16)
                | u64::from(flow.proto.number());
            hash_words(seed, &[sh, sl, dh, dl, rest])
        }
    }
}

fn backend_name(b: &Backend) -> [u8; 18] {
    let mut name = [0u8; 18];
    match b.handle.addr.ip() {
        IpAddr::V4(a) => name[..4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => name[..16].copy_from_slice(&a.octets()),
    }
    name[16..].copy_from_slice(&b.handle.addr.port().to_be_bytes());
    name
}

#[derive(Debug)]
pub struct Maglev {
    /// Slot -> index into the pool; built on first use from the pool it was made for.
    table: OnceLock<Table>,
    size: u32,
    /// The pool is empty: no table, no slot.
    empty: bool,
    key: HashKey,
    seed: u64,
}

/// A built table: one byte per slot for pools of up to 255 backends, else two.
#[derive(Debug)]
enum Table {
    Narrow(Box<[u8]>),
    Wide(Box<[u16]>),
}

impl Table {
    #[inline]
    fn get(&self, slot: usize) -> usize {
        match self {
            Table::Narrow(t) => usize::from(t[slot]),
            Table::Wide(t) => usize::from(t[slot]),
        }
    }

    fn to_vec(&self) -> Vec<u16> {
        match self {
            Table::Narrow(t) => t.iter().map(|&i| u16::from(i)).collect(),
            Table::Wide(t) => t.to_vec(),
        }
    }
}

impl Maglev {
    /// The policy for `pool`; its table is built on the first [`Policy::select`] (or
    /// [`Maglev::table`]), from that same pool. `pool` beyond [`MAX_POOL`] is cut.
    pub fn new(pool: &[Backend], cfg: &MaglevConfig, key: HashKey) -> Self {
        Maglev {
            table: OnceLock::new(),
            size: cfg.table_size,
            empty: pool.is_empty(),
            key,
            seed: cfg.seed,
        }
    }

    /// The table as pool indices (a copy, for inspection and tests); `pool` is the pool the
    /// policy was made for. Empty for an empty pool.
    pub fn table(&self, pool: &[Backend]) -> Vec<u16> {
        self.built(pool).map(Table::to_vec).unwrap_or_default()
    }

    /// Whether the table has been built (a decision or an inspection needed it).
    pub fn is_built(&self) -> bool {
        self.table.get().is_some()
    }

    /// M, or 0 for an empty pool.
    pub fn table_size(&self) -> usize {
        if self.empty {
            0
        } else {
            self.size as usize
        }
    }

    pub(crate) fn hash_key(&self) -> HashKey {
        self.key
    }

    /// The slot a flow hashes to (None for an empty pool).
    pub(crate) fn slot_of(&self, flow: &FlowKey) -> Option<usize> {
        (!self.empty).then(|| scale(flow_hash(flow, self.key, self.seed), self.size as usize))
    }

    fn built(&self, pool: &[Backend]) -> Option<&Table> {
        if self.empty || pool.is_empty() {
            return None;
        }
        let cfg = MaglevConfig { table_size: self.size, seed: self.seed };
        Some(self.table.get_or_init(|| populate(pool, &cfg)))
    }
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The next slot of a permutation: `(pos + skip) % m` without a division (skip < m, so
/// one subtraction suffices); the division dominated the build.
#[inline]
fn next_slot(pos: u32, skip: u32, m: u32) -> u32 {
    let next = pos + skip;
    if next >= m {
        next - m
    } else {
        next
    }
}

fn populate(pool: &[Backend], cfg: &MaglevConfig) -> Table {
    let pool = &pool[..pool.len().min(MAX_POOL)];
    if pool.is_empty() {
        return Table::Wide(Box::new([]));
    }
    let m = cfg.table_size;
    // Canonical turn order (by address), so the arrival order of the pool does not matter.
    let mut order: Vec<(u16, [u8; 18])> =
        pool.iter().enumerate().map(|(i, b)| (i as u16, backend_name(b))).collect();
    order.sort_by_key(|o| o.1);
    let g = pool.iter().fold(0, |g, b| gcd(g, b.weight)).max(1);
    struct Turn {
        index: u16,
        pos: u32,
        skip: u32,
        turns: u32,
    }
    let mut turns: Vec<Turn> = order
        .iter()
        .map(|&(index, name)| Turn {
            index,
            pos: (hash_bytes(cfg.seed, &name) % u64::from(m)) as u32,
            skip: (hash_bytes(cfg.seed ^ SKIP_SALT, &name) % u64::from(m - 1)) as u32 + 1,
            turns: (pool[usize::from(index)].weight / g).max(1),
        })
        .collect();
    let mut table = vec![EMPTY; m as usize];
    let mut filled = 0u32;
    'fill: loop {
        for t in turns.iter_mut() {
            for _ in 0..t.turns {
                // Walk this backend's permutation to its next free slot.
                while table[t.pos as usize] != EMPTY {
                    t.pos = next_slot(t.pos, t.skip, m);
                }
                table[t.pos as usize] = t.index;
                t.pos = next_slot(t.pos, t.skip, m);
                filled += 1;
                if filled == m {
                    break 'fill;
                }
            }
        }
    }
    if pool.len() <= NARROW_POOL {
        Table::Narrow(table.into_iter().map(|i| i as u8).collect())
    } else {
        Table::Wide(table.into_boxed_slice())
    }
}

impl Policy for Maglev {
    #[inline]
    fn select(&self, pool: &[Backend], input: &SelectInput<'_>) -> Option<usize> {
        let table = self.built(pool)?;
        let h = flow_hash(input.flow, self.key, self.seed);
        let i = table.get(scale(h, self.size as usize));
        (i < pool.len()).then_some(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testutil::*;

    fn cfg(m: u32) -> MaglevConfig {
        MaglevConfig { table_size: m, seed: 1234 }
    }

    fn counts(table: &[u16], n: usize) -> Vec<usize> {
        let mut c = vec![0; n];
        for &i in table {
            c[i as usize] += 1;
        }
        c
    }

    #[test]
    fn table_size_must_be_prime() {
        assert!(cfg(65537).validate().is_ok());
        assert!(cfg(65536).validate().is_err());
        assert!(cfg(2).validate().is_err());
        assert!(cfg(251).validate().is_ok());
    }

    #[test]
    fn every_backend_holds_m_over_n_slots_within_one() {
        // Backends take one slot per turn, so shares differ by at most one slot.
        for n in [1, 3, 10, 100, 1000] {
            let pool = pool(&vec![1; n.min(250)]);
            let pool: Vec<_> = if n <= 250 { pool } else { big_pool(n) };
            let m = Maglev::new(&pool, &cfg(65537), HashKey::FiveTuple);
            let c = counts(&m.table(&pool), n);
            let (lo, hi) = (*c.iter().min().unwrap(), *c.iter().max().unwrap());
            assert!(hi - lo <= 1, "n={n}: {lo}..{hi}");
        }
    }

    fn big_pool(n: usize) -> Vec<Backend> {
        use crate::service::{BackendHandle, BackendId};
        use std::net::{Ipv4Addr, SocketAddr};
        use std::sync::Arc;
        (0..n)
            .map(|i| {
                let ip = Ipv4Addr::from(0x0af4_0000 + i as u32);
                let h = BackendHandle::new(BackendId(i as u32), SocketAddr::new(ip.into(), 80));
                Backend::new(Arc::new(h), 1)
            })
            .collect()
    }

    #[test]
    fn weights_scale_the_share() {
        let pool = pool(&[1, 2, 3]);
        let m = Maglev::new(&pool, &cfg(65537), HashKey::FiveTuple);
        let c = counts(&m.table(&pool), 3);
        let unit = 65537.0 / 6.0;
        for (i, w) in [1.0, 2.0, 3.0].iter().enumerate() {
            let share = c[i] as f64 / (unit * w);
            assert!((0.999..1.001).contains(&share), "{c:?}");
        }
    }

    #[test]
    fn removing_one_of_n_moves_about_one_nth() {
        let n = 10;
        let full = big_pool(n);
        let mut less = big_pool(n);
        less.remove(4);
        let a = Maglev::new(&full, &cfg(65537), HashKey::FiveTuple);
        let b = Maglev::new(&less, &cfg(65537), HashKey::FiveTuple);
        let moved = a
            .table(&full)
            .iter()
            .zip(b.table(&less).iter())
            .filter(|(&x, &y)| full[x as usize].handle.addr != less[y as usize].handle.addr)
            .count();
        let frac = moved as f64 / 65537.0;
        // 1/N must move (the removed backend's slots); Maglev adds only a little on top.
        assert!((0.1..0.13).contains(&frac), "moved {frac}");
    }

    #[test]
    fn pool_order_does_not_change_the_mapping() {
        let pool = big_pool(7);
        let mut reversed = big_pool(7);
        reversed.reverse();
        let a = Maglev::new(&pool, &cfg(251), HashKey::FiveTuple);
        let b = Maglev::new(&reversed, &cfg(251), HashKey::FiveTuple);
        for (x, y) in a.table(&pool).iter().zip(b.table(&reversed).iter()) {
            assert_eq!(pool[*x as usize].handle.addr, reversed[*y as usize].handle.addr);
        }
    }

    #[test]
    fn source_ip_key_ignores_ports() {
        let pool = big_pool(5);
        let m = Maglev::new(&pool, &cfg(65537), HashKey::SourceIp);
        let mut f = flow(1);
        let first = m.select(&pool, &SelectInput { flow: &f, entropy: 0, now: 0 });
        for port in 1000..1100 {
            f.src_port = port;
            assert_eq!(
                m.select(&pool, &SelectInput { flow: &f, entropy: port.into(), now: 0 }),
                first
            );
        }
    }

    #[test]
    fn the_table_is_built_on_the_first_decision_and_decides_the_same() {
        let pool = big_pool(5);
        let lazy = Maglev::new(&pool, &cfg(65537), HashKey::FiveTuple);
        assert!(!lazy.is_built());
        let f = flow(7);
        let chosen = lazy.select(&pool, &SelectInput { flow: &f, entropy: 0, now: 0 });
        assert!(lazy.is_built());
        let slot = lazy.slot_of(&f).unwrap();
        assert_eq!(chosen, Some(usize::from(lazy.table(&pool)[slot])));
        // An empty pool has neither table nor slot.
        let none = Maglev::new(&[], &cfg(251), HashKey::FiveTuple);
        assert_eq!(none.select(&[], &SelectInput { flow: &f, entropy: 0, now: 0 }), None);
        assert_eq!((none.table_size(), none.slot_of(&f)), (0, None));
    }

    #[test]
    fn tables_of_bytes_and_of_u16_both_hold_every_backend() {
        // 255 backends: a table of bytes; 256: a table of u16.
        for n in [255, 256] {
            let pool = big_pool(n);
            let table = Maglev::new(&pool, &cfg(65537), HashKey::FiveTuple).table(&pool);
            let c = counts(&table, n);
            let (lo, hi) = (*c.iter().min().unwrap(), *c.iter().max().unwrap());
            assert!(lo > 0 && hi - lo <= 1, "n={n}: {lo}..{hi}");
        }
    }

    #[test]
    fn seed_changes_the_table() {
        let pool = big_pool(5);
        let a = Maglev::new(&pool, &MaglevConfig { table_size: 251, seed: 1 }, HashKey::FiveTuple);
        let b = Maglev::new(&pool, &MaglevConfig { table_size: 251, seed: 2 }, HashKey::FiveTuple);
        assert_ne!(a.table(&pool), b.table(&pool));
    }
}
