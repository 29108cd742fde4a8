//! Random choice, as kube-proxy's iptables mode makes it.
//!
//! kube-proxy chains `statistic --mode random --probability 1/n, 1/(n-1), ...`, which is a
//! uniform choice among n endpoints. Weighted pools pick proportionally to weight.

use super::{scale, Policy, SelectInput};
use crate::service::Backend;

#[derive(Debug)]
pub struct Random {
    /// Cumulative weights when weights differ; None for the uniform case.
    cumulative: Option<Box<[u64]>>,
}

impl Random {
    pub fn new(pool: &[Backend]) -> Self {
        let uniform = pool.windows(2).all(|w| w[0].weight == w[1].weight);
        let cumulative = (!uniform).then(|| {
            pool.iter()
                .scan(0u64, |acc, b| {
                    *acc += u64::from(b.weight);
                    Some(*acc)
                })
                .collect()
        });
        Random { cumulative }
    }
}

impl Policy for Random {
    #[inline]
    fn select(&self, pool: &[Backend], input: &SelectInput<'_>) -> Option<usize> {
        if pool.is_empty() {
            return None;
        }
        match &self.cumulative {
            None => Some(scale(input.entropy, pool.len())),
            Some(cum) => {
                let total = *cum.last()?;
                let point = scale(input.entropy, total as usize) as u64;
                // First backend whose cumulative weight exceeds the point.
                Some(cum.partition_point(|&c| c <= point).min(pool.len() - 1))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testutil::*;

    fn shares(weights: &[u32], draws: usize, seed: u64) -> Vec<u64> {
        let pool = pool(weights);
        let p = Random::new(&pool);
        let mut next = entropy_stream(seed);
        let mut counts = vec![0u64; pool.len()];
        for i in 0..draws {
            let f = flow(i as u32);
            let idx = p.select(&pool, &SelectInput { flow: &f, entropy: next(), now: 0 }).unwrap();
            counts[idx] += 1;
        }
        counts
    }

    #[test]
    fn uniform_passes_chi_square() {
        // 4 degrees of freedom; 18.47 is the 0.999 quantile.
        let counts = shares(&[1, 1, 1, 1, 1], 50_000, 7);
        let chi = chi_square(&counts, &[0.2; 5]);
        assert!(chi < 18.47, "chi2 {chi} counts {counts:?}");
    }

    #[test]
    fn weighted_is_proportional() {
        // 2 degrees of freedom; 13.82 is the 0.999 quantile.
        let counts = shares(&[1, 2, 3], 60_000, 11);
        let chi = chi_square(&counts, &[1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0]);
        assert!(chi < 13.82, "chi2 {chi} counts {counts:?}");
    }

    #[test]
    fn a_skewed_sample_fails_the_same_test() {
        // The test above can fail: a biased choice is caught by the same bound.
        let chi = chi_square(&[11_000, 10_000, 10_000, 10_000, 9_000], &[0.2; 5]);
        assert!(chi > 18.47);
    }

    #[test]
    fn successive_picks_are_independent() {
        // Uniform picks are not enough: round-robin's are too. Each pick must not depend
        // on the previous one, so all 25 transitions of 5 backends are about equally
        // frequent. Seeded: deterministic.
        let pool = pool(&[1, 1, 1, 1, 1]);
        let draws = |p: &dyn Policy| {
            let mut next = entropy_stream(3);
            (0..50_000u32)
                .map(|i| {
                    let f = flow(i);
                    p.select(&pool, &SelectInput { flow: &f, entropy: next(), now: 0 }).unwrap()
                })
                .collect::<Vec<_>>()
        };
        let chi = transition_chi_square(&draws(&Random::new(&pool)), 5);
        assert!(chi < CHI2_24_P999, "transitions chi2 {chi}");
        // The same test catches a fixed cycle, which the uniformity test above passes.
        let cycle = draws(&crate::policy::RoundRobin::new(&pool));
        assert!(transition_chi_square(&cycle, 5) > 1000.0 * CHI2_24_P999);
    }

    #[test]
    fn empty_pool_selects_nothing() {
        let f = flow(0);
        let p = Random::new(&[]);
        assert_eq!(p.select(&[], &SelectInput { flow: &f, entropy: 1, now: 0 }), None);
    }
}
