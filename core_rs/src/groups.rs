//! Group-level priors (empirical Bayes): arms that share a group start from the group's
//! pooled estimate instead of their own flat prior, so a sparse arm borrows strength.
//!
//! Bernoulli: the pooled rate m = (ᾱ + Σ sum) / (ᾱ + β̄ + Σ n) over the group (ᾱ, β̄: the
//! members' mean own prior), and each member's prior is Beta(m·s, (1 − m)·s) with a fixed
//! strength s. Gaussian: the pooled mean (κ̄·m̄ + Σ sum) / (κ̄ + Σ n) with strength s.
//! With s fixed, a reward of 1 raises both the pooled rate and the arm's own counts, so it
//! never lowers the arm's posterior mean (and a 0 never raises it); re-estimating s from the
//! spread between arms would break that guarantee.

use std::collections::HashMap;

use crate::bandit::Bandit;
use crate::policy::RewardModel;

#[derive(Default)]
struct Pool {
    members: f64,
    prior_a: f64,
    prior_b: f64,
    n: f64,
    sum: f64,
}

/// Overwrites `eff_a` / `eff_b` of every grouped arm with its group's pooled prior.
pub fn pool(b: &mut Bandit) {
    let mut pools: HashMap<i64, Pool> = HashMap::new();
    for arm in 0..b.len() {
        let g = b.groups[arm];
        if g < 0 {
            continue;
        }
        let p = pools.entry(g).or_default();
        p.members += 1.0;
        p.prior_a += b.prior_a[arm];
        p.prior_b += b.prior_b[arm];
        p.n += b.stats[arm].n;
        p.sum += b.stats[arm].sum;
    }
    let s = b.group_strength;
    for arm in 0..b.len() {
        let Some(p) = pools.get(&b.groups[arm]) else {
            continue;
        };
        let (a_bar, b_bar) = (p.prior_a / p.members, p.prior_b / p.members);
        match b.model {
            RewardModel::Bernoulli => {
                let m = ((a_bar + p.sum) / (a_bar + b_bar + p.n)).clamp(1e-9, 1.0 - 1e-9);
                b.stats[arm].eff_a = m * s;
                b.stats[arm].eff_b = (1.0 - m) * s;
            }
            RewardModel::Gaussian => {
                // Own prior: a = mean, b = strength.
                b.stats[arm].eff_a = (b_bar * a_bar + p.sum) / (b_bar + p.n);
                b.stats[arm].eff_b = s;
            }
        }
    }
}
