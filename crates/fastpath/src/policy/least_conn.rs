//! Least connections, like IPVS `wlc`: the backend with the fewest active flows per unit
//! of weight. Active counts come from the connection table through the backend handles.

use super::{scale, Policy, SelectInput};
use crate::service::Backend;

#[derive(Debug, Default)]
pub struct LeastConn;

impl Policy for LeastConn {
    #[inline]
    fn select(&self, pool: &[Backend], input: &SelectInput<'_>) -> Option<usize> {
        self.select_by(pool, input, |b| b.handle.active())
    }
}

impl LeastConn {
    /// `select` with the active counts `active` gives (`explain` discounts a flow the
    /// packet would end first).
    #[inline]
    pub(crate) fn select_by(
        &self,
        pool: &[Backend],
        input: &SelectInput<'_>,
        active: impl Fn(&Backend) -> u32,
    ) -> Option<usize> {
        if pool.is_empty() {
            return None;
        }
        // Start the scan at a random backend so ties do not all land on the first one.
        let start = scale(input.entropy, pool.len());
        let mut best = start;
        let mut best_load = (u64::from(active(&pool[start])), u64::from(pool[start].weight));
        for k in 1..pool.len() {
            let i = (start + k) % pool.len();
            let load = (u64::from(active(&pool[i])), u64::from(pool[i].weight));
            // a/wa < b/wb  <=>  a*wb < b*wa (weights are > 0 in a pool).
            if load.0 * best_load.1 < best_load.0 * load.1 {
                best = i;
                best_load = load;
            }
        }
        Some(best)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testutil::*;

    #[test]
    fn picks_the_least_loaded_backend() {
        let pool = pool(&[1, 1, 1]);
        for _ in 0..5 {
            pool[0].handle.conn_opened();
        }
        for _ in 0..2 {
            pool[1].handle.conn_opened();
        }
        for _ in 0..3 {
            pool[2].handle.conn_opened();
        }
        let f = flow(0);
        for e in [0, u64::MAX / 2, u64::MAX] {
            assert_eq!(
                LeastConn.select(&pool, &SelectInput { flow: &f, entropy: e, now: 0 }),
                Some(1)
            );
        }
    }

    #[test]
    fn weight_scales_the_load() {
        let pool = pool(&[1, 4]);
        for _ in 0..2 {
            pool[0].handle.conn_opened();
        }
        for _ in 0..6 {
            pool[1].handle.conn_opened();
        }
        let f = flow(0);
        // 2/1 > 6/4: the heavier backend still has room.
        assert_eq!(LeastConn.select(&pool, &SelectInput { flow: &f, entropy: 0, now: 0 }), Some(1));
    }

    #[test]
    fn balances_as_flows_open() {
        let pool = pool(&[1, 1, 1, 1]);
        let f = flow(0);
        let mut next = entropy_stream(3);
        for _ in 0..400 {
            let i = LeastConn
                .select(&pool, &SelectInput { flow: &f, entropy: next(), now: 0 })
                .unwrap();
            pool[i].handle.conn_opened();
        }
        for b in &pool {
            assert_eq!(b.handle.active(), 100);
        }
    }
}
