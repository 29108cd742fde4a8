//! Round-robin per service and per node, like IPVS `rr`; weighted like IPVS `wrr`.
//!
//! A shared ticket counter walks a schedule. Uniform pools need no schedule. Weighted pools
//! get IPVS wrr's interleaved order: with weights (3, 1) the order is a a a b; with (2, 2, 1)
//! it is a b c a b, by visiting backends whose weight reaches each level from the top down.

use std::sync::atomic::{AtomicU64, Ordering};

use super::{Policy, SelectInput};
use crate::service::Backend;

/// Weights above this many levels are scaled down, which keeps the schedule short
/// (levels x pool size) while keeping shares within 1/MAX_LEVELS of exact.
const MAX_LEVELS: u32 = 256;

#[derive(Debug)]
pub struct RoundRobin {
    schedule: Option<Box<[u32]>>,
    next: AtomicU64,
}

impl RoundRobin {
    pub fn new(pool: &[Backend]) -> Self {
        let uniform = pool.windows(2).all(|w| w[0].weight == w[1].weight);
        let schedule = (!uniform).then(|| wrr_schedule(pool));
        RoundRobin { schedule, next: AtomicU64::new(0) }
    }
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

fn wrr_schedule(pool: &[Backend]) -> Box<[u32]> {
    let g = pool.iter().fold(0, |g, b| gcd(g, b.weight)).max(1);
    let max = pool.iter().map(|b| b.weight / g).max().unwrap_or(1).max(1);
    let levels: Vec<u32> = pool
        .iter()
        .map(|b| {
            let w = b.weight / g;
            if max > MAX_LEVELS {
                ((u64::from(w) * u64::from(MAX_LEVELS)) / u64::from(max)).max(1) as u32
            } else {
                w
            }
        })
        .collect();
    let top = levels.iter().copied().max().unwrap_or(1);
    let mut schedule = Vec::with_capacity(levels.iter().map(|&l| l as usize).sum());
    for level in (1..=top).rev() {
        for (i, &l) in levels.iter().enumerate() {
            if l >= level {
                schedule.push(i as u32);
            }
        }
    }
    schedule.into_boxed_slice()
}

impl Policy for RoundRobin {
    #[inline]
    fn select(&self, pool: &[Backend], _input: &SelectInput<'_>) -> Option<usize> {
        if pool.is_empty() {
            return None;
        }
        Some(self.pick(self.next.fetch_add(1, Ordering::Relaxed), pool.len()))
    }
}

impl RoundRobin {
    #[inline]
    fn pick(&self, ticket: u64, pool_len: usize) -> usize {
        match &self.schedule {
            None => (ticket % pool_len as u64) as usize,
            Some(s) => s[(ticket % s.len() as u64) as usize] as usize,
        }
    }

    /// Tickets taken so far: the next connection takes this one.
    pub(crate) fn ticket(&self) -> u64 {
        self.next.load(Ordering::Relaxed)
    }

    /// Connections in one turn of the cycle (the pool, or the weighted schedule).
    pub(crate) fn cycle_len(&self, pool_len: usize) -> usize {
        self.schedule.as_ref().map_or(pool_len, |s| s.len())
    }

    /// Continue a previous version's rotation: the next pick is the first backend whose
    /// address is `addr` or comes after it (pools are sorted by address), wrapping around.
    /// Without this, every endpoint change would restart every node at the lowest address
    /// at once: under churn, a lasting skew towards it.
    pub(crate) fn resume_at(&self, pool: &[Backend], addr: std::net::SocketAddr) {
        if pool.is_empty() {
            return;
        }
        let index = pool.iter().position(|b| b.handle.addr >= addr).unwrap_or(0);
        let ticket = match &self.schedule {
            None => index,
            Some(s) => s.iter().position(|&i| i as usize == index).unwrap_or(0),
        };
        self.next.store(ticket as u64, Ordering::Relaxed);
    }

    /// What `select` would return now, without taking a ticket.
    pub(crate) fn peek(&self, pool: &[Backend]) -> Option<usize> {
        (!pool.is_empty()).then(|| self.pick(self.ticket(), pool.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testutil::*;

    fn order(weights: &[u32], n: usize) -> Vec<usize> {
        let pool = pool(weights);
        let p = RoundRobin::new(&pool);
        let f = flow(0);
        (0..n)
            .map(|_| p.select(&pool, &SelectInput { flow: &f, entropy: 0, now: 0 }).unwrap())
            .collect()
    }

    #[test]
    fn a_new_version_resumes_where_the_old_one_was() {
        let old = pool(&[1, 1, 1]);
        let rr = RoundRobin::new(&old);
        let f = flow(0);
        let input = SelectInput { flow: &f, entropy: 0, now: 0 };
        assert_eq!(rr.select(&old, &input), Some(0));
        assert_eq!(rr.select(&old, &input), Some(1));
        let next = old[rr.peek(&old).unwrap()].handle.addr;
        // One more backend (the pool's last address): the rotation goes on with the third.
        let grown = pool(&[1, 1, 1, 1]);
        let new = RoundRobin::new(&grown);
        new.resume_at(&grown, next);
        assert_eq!(new.select(&grown, &input), Some(2));
        // The next backend left: its successor by address takes its turn.
        let shrunk: Vec<_> = grown.iter().filter(|b| b.handle.addr != next).cloned().collect();
        let after = RoundRobin::new(&shrunk);
        after.resume_at(&shrunk, next);
        assert_eq!(shrunk[after.peek(&shrunk).unwrap()].handle.addr, grown[3].handle.addr);
        // Past the last address: wrap to the first.
        let wrap = RoundRobin::new(&old);
        wrap.resume_at(&old, grown[3].handle.addr);
        assert_eq!(wrap.peek(&old), Some(0));
        // Weighted: the first turn of that backend in the schedule.
        let weighted = pool(&[3, 1]);
        let w = RoundRobin::new(&weighted);
        w.resume_at(&weighted, weighted[1].handle.addr);
        assert_eq!(w.select(&weighted, &input), Some(1));
    }

    #[test]
    fn uniform_cycles_in_order() {
        assert_eq!(order(&[1, 1, 1], 7), vec![0, 1, 2, 0, 1, 2, 0]);
    }

    #[test]
    fn weighted_interleaves_like_ipvs_wrr() {
        assert_eq!(order(&[3, 1], 8), vec![0, 0, 0, 1, 0, 0, 0, 1]);
        assert_eq!(order(&[2, 2, 1], 5), vec![0, 1, 0, 1, 2]);
        // Common factors do not lengthen the cycle.
        assert_eq!(order(&[40, 20], 3), vec![0, 0, 1]);
    }

    #[test]
    fn huge_weights_stay_proportional_and_short() {
        let pool = pool(&[100_000, 50_000, 1]);
        let p = RoundRobin::new(&pool);
        let s = p.schedule.as_ref().unwrap();
        assert!(s.len() <= 3 * MAX_LEVELS as usize);
        let count = |i| s.iter().filter(|&&x| x == i).count();
        assert_eq!(count(0), 256);
        assert_eq!(count(1), 128);
        assert_eq!(count(2), 1, "a tiny weight still gets a turn");
    }
}
