//! Backend selection. Each policy is a pure function of (flow, service state, time) behind
//! the [`Policy`] trait; its per-service state (a round-robin cursor, a Maglev table) is
//! built when the service is written and lives in the service's snapshot.
//!
//! The pool a policy sees is already filtered (ready backends, or serving+terminating ones
//! when none is ready, with weight > 0), so policies only choose.

mod least_conn;
pub mod maglev;
mod random;
mod round_robin;

use std::fmt;

use crate::flow::{FlowKey, Nanos};
use crate::service::Backend;

pub use least_conn::LeastConn;
pub use maglev::{HashKey, Maglev, MaglevConfig};
pub use random::Random;
pub use round_robin::RoundRobin;

/// What a policy may look at besides the pool.
#[derive(Clone, Copy, Debug)]
pub struct SelectInput<'a> {
    pub flow: &'a FlowKey,
    /// 64 uniformly random bits drawn by the caller: policies hold no RNG, so a seeded
    /// caller makes them reproducible.
    pub entropy: u64,
    pub now: Nanos,
}

/// A backend selection policy over a fixed pool.
pub trait Policy {
    /// The index into `pool` of the chosen backend; None only when the pool is empty.
    fn select(&self, pool: &[Backend], input: &SelectInput<'_>) -> Option<usize>;
}

/// The policy names pykp accepts, as operators write them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PolicyKind {
    Random,
    RoundRobin,
    Maglev,
    LeastConn,
}

impl PolicyKind {
    pub const ALL: [PolicyKind; 4] =
        [PolicyKind::Random, PolicyKind::RoundRobin, PolicyKind::Maglev, PolicyKind::LeastConn];

    pub const fn as_str(self) -> &'static str {
        match self {
            PolicyKind::Random => "random",
            PolicyKind::RoundRobin => "round-robin",
            PolicyKind::Maglev => "maglev",
            PolicyKind::LeastConn => "least-conn",
        }
    }

    pub const fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for PolicyKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "random" => Ok(PolicyKind::Random),
            "round-robin" | "rr" => Ok(PolicyKind::RoundRobin),
            "maglev" | "hash" => Ok(PolicyKind::Maglev),
            "least-conn" | "lc" => Ok(PolicyKind::LeastConn),
            other => Err(format!(
                "unknown policy {other:?} (expected random, round-robin, maglev or least-conn)"
            )),
        }
    }
}

/// A service's built policy: one of the four, dispatched without a vtable.
#[derive(Debug)]
pub enum Selector {
    Random(Random),
    RoundRobin(RoundRobin),
    /// Boxed: twice the others' size, it made every pool of every policy 16 bytes larger.
    Maglev(Box<Maglev>),
    LeastConn(LeastConn),
}

impl Selector {
    /// Build the policy state for `pool`. Maglev's table costs O(M); the others O(pool).
    pub fn build(kind: PolicyKind, pool: &[Backend], maglev: &MaglevConfig, key: HashKey) -> Self {
        match kind {
            PolicyKind::Random => Selector::Random(Random::new(pool)),
            PolicyKind::RoundRobin => Selector::RoundRobin(RoundRobin::new(pool)),
            PolicyKind::Maglev => Selector::Maglev(Box::new(Maglev::new(pool, maglev, key))),
            PolicyKind::LeastConn => Selector::LeastConn(LeastConn),
        }
    }

    pub fn kind(&self) -> PolicyKind {
        match self {
            Selector::Random(_) => PolicyKind::Random,
            Selector::RoundRobin(_) => PolicyKind::RoundRobin,
            Selector::Maglev(_) => PolicyKind::Maglev,
            Selector::LeastConn(_) => PolicyKind::LeastConn,
        }
    }
}

impl Policy for Selector {
    #[inline]
    fn select(&self, pool: &[Backend], input: &SelectInput<'_>) -> Option<usize> {
        match self {
            Selector::Random(p) => p.select(pool, input),
            Selector::RoundRobin(p) => p.select(pool, input),
            Selector::Maglev(p) => p.select(pool, input),
            Selector::LeastConn(p) => p.select(pool, input),
        }
    }
}

/// Map 64 random bits onto 0..n without modulo bias worth measuring (Lemire's multiply).
#[inline]
pub(crate) fn scale(entropy: u64, n: usize) -> usize {
    ((entropy as u128 * n as u128) >> 64) as usize
}

#[cfg(test)]
pub(crate) mod testutil {
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};
    use std::sync::Arc;

    use crate::flow::{FlowKey, Protocol};
    use crate::service::{Backend, BackendHandle, BackendId};

    pub fn pool(weights: &[u32]) -> Vec<Backend> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                let addr =
                    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 244, 0, i as u8 + 1)), 8080);
                Backend::new(Arc::new(BackendHandle::new(BackendId(i as u32 + 1), addr)), w)
            })
            .collect()
    }

    pub fn flow(i: u32) -> FlowKey {
        FlowKey::new(
            Protocol::Tcp,
            IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | (i >> 8))),
            (1024 + (i & 0xff) * 97) as u16,
            IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10)),
            80,
        )
    }

    /// Pearson's chi-square statistic of `observed` against `expected` shares.
    pub fn chi_square(observed: &[u64], expected_share: &[f64]) -> f64 {
        let total: u64 = observed.iter().sum();
        observed
            .iter()
            .zip(expected_share)
            .map(|(&o, &p)| {
                let e = p * total as f64;
                (o as f64 - e).powi(2) / e
            })
            .sum()
    }

    /// Chi-square statistic of the transitions `picks[i] -> picks[i + 1]` among `n` choices
    /// against independence (every one of the n x n transitions equally likely; n^2 - 1
    /// degrees of freedom). A fixed cycle such as round-robin is uniform in its picks but
    /// uses n of the n^2 transitions only: this tells them apart.
    pub fn transition_chi_square(picks: &[usize], n: usize) -> f64 {
        let mut counts = vec![0u64; n * n];
        for w in picks.windows(2) {
            counts[w[0] * n + w[1]] += 1;
        }
        chi_square(&counts, &vec![1.0 / (n * n) as f64; n * n])
    }

    /// The 0.999 quantile of chi-square with 24 degrees of freedom (5 x 5 transitions).
    pub const CHI2_24_P999: f64 = 51.18;

    /// splitmix64 stream: the tests' seeded entropy.
    pub fn entropy_stream(seed: u64) -> impl FnMut() -> u64 {
        let mut s = seed;
        move || {
            s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
            crate::hash::mix64(s)
        }
    }
}
