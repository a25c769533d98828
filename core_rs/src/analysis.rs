//! Winner analysis: which arm is best, by how much, and at what risk, by Monte Carlo from
//! the posterior of each arm's mean reward.
//!
//! Each active arm's mean is drawn `draws` times from its posterior: Beta(α, β) for
//! Bernoulli rewards; for Gaussian rewards the Normal–Inverse-Gamma posterior, σ² = bₙ / G
//! with G ~ Gamma(aₙ) and then μ ~ Normal(mₙ, σ² / κₙ). From the draws:
//!
//! * `p_best[a]`: share of draws in which arm a has the largest mean (ties have
//!   probability zero for continuous posteriors);
//! * `expected_loss[a]`: E[max_j θ_j − θ_a], the mean reward given up by choosing a;
//! * `uplift_low[a]`, `uplift_high[a]`: central credible interval (at `level`, e.g. 95%) of
//!   the relative uplift θ_a / θ_ref − 1 over a reference arm, `p_uplift[a]` = P(θ_a > θ_ref)
//!   and `p_min_uplift[a]` = P(θ_a / θ_ref − 1 ≥ min_uplift) (the stop rule's question).
//!   The reference is the `control` arm when one is given; else, per arm, the best *other*
//!   active arm by posterior mean (so for the leader it is the runner-up).
//!
//! Only active arms take part. Inactive arms get `p_best` 0 and NaN for everything else;
//! the control arm's own uplift entries are NaN as well (its uplift over itself is 0 by
//! definition). For Gaussian rewards the relative uplift is only meaningful when the
//! reference mean is clearly away from zero; `p_uplift` (a difference) is always sound.

use rand::Rng;

use crate::bandit::Bandit;
use crate::error::CoreError;
use crate::kernel::KernelRng;
use crate::policy::RewardModel;
use crate::sampling;

pub const MIN_DRAWS: usize = 100;
pub const MAX_DRAWS: usize = 1_000_000;
/// Largest number of stored draws (active arms × draws): 400 MB of f64.
pub const MAX_CELLS: usize = 50_000_000;

/// The result of `winner_analysis`, one entry per arm in arm order.
#[derive(Clone, Debug, PartialEq)]
pub struct Analysis {
    pub p_best: Vec<f64>,
    pub expected_loss: Vec<f64>,
    pub uplift_low: Vec<f64>,
    pub uplift_high: Vec<f64>,
    pub p_uplift: Vec<f64>,
    pub p_min_uplift: Vec<f64>,
    /// The control given, if any.
    pub control: Option<usize>,
    /// The reference arm each arm's uplift is measured against (None: inactive arm, or
    /// the control itself).
    pub reference: Vec<Option<usize>>,
}

/// Fills `out` with draws of the arm's posterior mean.
fn draw_means<R: Rng + ?Sized>(b: &Bandit, arm: usize, rng: &mut R, out: &mut [f64]) {
    match b.model {
        RewardModel::Bernoulli => {
            let (alpha, beta) = b.beta_params(arm);
            for x in out.iter_mut() {
                *x = sampling::beta(rng, alpha, beta);
            }
        }
        RewardModel::Gaussian => {
            let (mn, kn, an, bn) = b.nig_params(arm);
            for x in out.iter_mut() {
                let g = sampling::gamma(rng, an).max(f64::MIN_POSITIVE);
                let var = bn / g;
                *x = mn + (var / kn).sqrt() * sampling::normal(rng);
            }
        }
    }
}

/// The value at quantile q of `v` (nearest rank; reorders `v`).
fn quantile(v: &mut [f64], q: f64) -> f64 {
    let idx = ((q * (v.len() - 1) as f64).round() as usize).min(v.len() - 1);
    let (_, x, _) = v.select_nth_unstable_by(idx, |a, b| a.total_cmp(b));
    *x
}

/// What to measure the uplift against and how: the credible `level` of the interval and the
/// `min_uplift` whose probability is reported.
#[derive(Clone, Copy, Debug)]
pub struct UpliftQuery {
    pub control: Option<usize>,
    pub level: f64,
    pub min_uplift: f64,
}

impl UpliftQuery {
    pub fn against(control: Option<usize>) -> Self {
        UpliftQuery {
            control,
            level: 0.95,
            min_uplift: 0.0,
        }
    }
}

pub fn winner_analysis(
    b: &Bandit,
    rng: &mut KernelRng,
    draws: usize,
    query: UpliftQuery,
) -> Result<Analysis, CoreError> {
    let UpliftQuery {
        control,
        level,
        min_uplift,
    } = query;
    if !(level > 0.0 && level < 1.0) {
        return Err(CoreError::invalid(format!(
            "level must be in (0, 1), got {level}"
        )));
    }
    if !min_uplift.is_finite() || min_uplift <= -1.0 {
        return Err(CoreError::invalid(format!(
            "min_uplift must be a finite number above -1, got {min_uplift}"
        )));
    }
    if !(MIN_DRAWS..=MAX_DRAWS).contains(&draws) {
        return Err(CoreError::invalid(format!(
            "draws must be in {MIN_DRAWS}..={MAX_DRAWS}, got {draws}"
        )));
    }
    let n_arms = b.len();
    let active: Vec<usize> = (0..n_arms).filter(|&a| b.active[a]).collect();
    if active.len() < 2 {
        return Err(CoreError::invalid(format!(
            "winner analysis needs at least 2 active arms, got {}",
            active.len()
        )));
    }
    if let Some(c) = control {
        if c >= n_arms {
            return Err(CoreError::invalid(format!(
                "control arm {c} out of range (the experiment has {n_arms} arms)"
            )));
        }
        if !b.active[c] {
            return Err(CoreError::invalid(format!("control arm {c} is not active")));
        }
    }
    let cells = active.len().saturating_mul(draws);
    if cells > MAX_CELLS {
        return Err(CoreError::invalid(format!(
            "{} active arms x {draws} draws exceeds the limit of {MAX_CELLS} draws; use fewer draws",
            active.len()
        )));
    }
    for &a in &active {
        let ok = match b.model {
            RewardModel::Bernoulli => {
                let (x, y) = b.beta_params(a);
                x.is_finite() && y.is_finite() && x > 0.0 && y > 0.0
            }
            RewardModel::Gaussian => {
                let (mn, kn, an, bn) = b.nig_params(a);
                mn.is_finite()
                    && kn > 0.0
                    && an > 0.0
                    && bn > 0.0
                    && kn.is_finite()
                    && bn.is_finite()
            }
        };
        if !ok {
            return Err(CoreError::invalid(format!(
                "arm {a} has no proper posterior (check its prior and statistics)"
            )));
        }
    }

    // Draws of each active arm's mean, one contiguous row per active arm.
    let k = active.len();
    let mut theta = vec![0.0f64; k * draws];
    for (row, &a) in theta.chunks_exact_mut(draws).zip(&active) {
        draw_means(b, a, &mut rng.scalar, row);
    }
    // Running best value and its (active) position, per draw.
    let mut best_val = vec![f64::NEG_INFINITY; draws];
    let mut best_pos = vec![0u32; draws];
    for (i, row) in theta.chunks_exact(draws).enumerate() {
        for ((bv, bp), &x) in best_val.iter_mut().zip(best_pos.iter_mut()).zip(row) {
            if x > *bv {
                *bv = x;
                *bp = i as u32;
            }
        }
    }

    let nan = f64::NAN;
    let mut out = Analysis {
        p_best: vec![0.0; n_arms],
        expected_loss: vec![nan; n_arms],
        uplift_low: vec![nan; n_arms],
        uplift_high: vec![nan; n_arms],
        p_uplift: vec![nan; n_arms],
        p_min_uplift: vec![nan; n_arms],
        control,
        reference: vec![None; n_arms],
    };
    let mut wins = vec![0usize; k];
    for &p in &best_pos {
        wins[p as usize] += 1;
    }
    let means: Vec<f64> = active.iter().map(|&a| b.mean(a)).collect();
    let mut scratch = vec![0.0f64; draws];
    let inv = 1.0 / draws as f64;
    for (i, &a) in active.iter().enumerate() {
        let row = &theta[i * draws..(i + 1) * draws];
        out.p_best[a] = wins[i] as f64 * inv;
        out.expected_loss[a] = best_val.iter().zip(row).map(|(m, x)| m - x).sum::<f64>() * inv;

        let ref_pos = match control {
            Some(c) if c == a => continue,
            Some(c) => active.iter().position(|&x| x == c).unwrap_or(0),
            None => (0..k)
                .filter(|&j| j != i)
                .max_by(|&x, &y| means[x].total_cmp(&means[y]))
                .unwrap_or(0),
        };
        out.reference[a] = Some(active[ref_pos]);
        let ref_row = &theta[ref_pos * draws..(ref_pos + 1) * draws];
        let mut above = 0usize;
        let mut enough = 0usize;
        for ((s, &x), &r) in scratch.iter_mut().zip(row).zip(ref_row) {
            *s = x / r - 1.0;
            above += usize::from(x > r);
            enough += usize::from(*s >= min_uplift);
        }
        out.p_uplift[a] = above as f64 * inv;
        out.p_min_uplift[a] = enough as f64 * inv;
        let tail = 0.5 * (1.0 - level);
        out.uplift_low[a] = quantile(&mut scratch, tail);
        out.uplift_high[a] = quantile(&mut scratch, 1.0 - tail);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;

    fn bernoulli(params: &[(f64, f64)]) -> Bandit {
        let mut b = Bandit::new(
            RewardModel::Bernoulli,
            Policy::Thompson { exploitation: 1.0 },
            0.0,
        )
        .unwrap();
        let ones = vec![1.0; params.len()];
        b.add_arms(&ones, &ones).unwrap();
        for (arm, &(a, bb)) in params.iter().enumerate() {
            // Prior Beta(1, 1): sum = a − 1 successes of n = a + b − 2.
            b.set_stats(arm, a + bb - 2.0, a - 1.0, a - 1.0).unwrap();
        }
        b
    }

    #[test]
    fn p_best_sums_to_one() {
        let b = bernoulli(&[(30.0, 70.0), (25.0, 75.0), (35.0, 65.0), (10.0, 10.0)]);
        let mut rng = KernelRng::seed_from_u64(1);
        let r = winner_analysis(&b, &mut rng, 20_000, UpliftQuery::against(None)).unwrap();
        let s: f64 = r.p_best.iter().sum();
        assert!((s - 1.0).abs() < 1e-9, "{s}");
        assert!(r.expected_loss.iter().all(|&l| l >= 0.0));
    }

    #[test]
    fn clearly_better_arm_wins() {
        let b = bernoulli(&[(300.0, 700.0), (100.0, 900.0)]);
        let mut rng = KernelRng::seed_from_u64(2);
        let r = winner_analysis(&b, &mut rng, 20_000, UpliftQuery::against(Some(1))).unwrap();
        assert!(r.p_best[0] > 0.999, "{:?}", r.p_best);
        // True uplift 0.3 / 0.1 − 1 = 2.
        assert!(r.uplift_low[0] > 0.0 && r.uplift_low[0] < 2.0 && r.uplift_high[0] > 2.0);
        assert!(r.p_uplift[0] > 0.999);
        assert!(r.uplift_low[1].is_nan() && r.reference[1].is_none());
        assert_eq!(r.reference[0], Some(1));
        // Without a control the leader is measured against the runner-up and vice versa.
        let r = winner_analysis(&b, &mut rng, 20_000, UpliftQuery::against(None)).unwrap();
        assert_eq!(r.reference, vec![Some(1), Some(0)]);
        assert!(r.uplift_high[1] < 0.0);
        assert!(r.expected_loss[0] < 1e-3 && (r.expected_loss[1] - 0.2).abs() < 0.01);
    }

    #[test]
    fn equal_arms_share_p_best() {
        let b = bernoulli(&[(50.0, 50.0); 4]);
        let mut rng = KernelRng::seed_from_u64(3);
        let r = winner_analysis(&b, &mut rng, 50_000, UpliftQuery::against(None)).unwrap();
        for p in &r.p_best {
            assert!((p - 0.25).abs() < 0.03, "{:?}", r.p_best);
        }
    }

    #[test]
    fn inactive_arms_are_left_out() {
        let mut b = bernoulli(&[(30.0, 70.0), (90.0, 10.0), (20.0, 80.0)]);
        b.set_active(1, false).unwrap();
        let mut rng = KernelRng::seed_from_u64(4);
        let r = winner_analysis(&b, &mut rng, 10_000, UpliftQuery::against(None)).unwrap();
        assert_eq!(r.p_best[1], 0.0);
        assert!(r.expected_loss[1].is_nan() && r.uplift_low[1].is_nan());
        assert!((r.p_best[0] + r.p_best[2] - 1.0).abs() < 1e-9);
        assert!(matches!(
            winner_analysis(&b, &mut rng, 10_000, UpliftQuery::against(Some(1))),
            Err(CoreError::Invalid(_))
        ));
    }

    #[test]
    fn gaussian_works() {
        let mut b = Bandit::new(
            RewardModel::Gaussian,
            Policy::Thompson { exploitation: 1.0 },
            0.0,
        )
        .unwrap();
        b.add_arms(&[0.0, 0.0], &[1.0, 1.0]).unwrap();
        // Means 10 and 11, sd 2, 400 observations each.
        b.set_stats(0, 400.0, 4000.0, 400.0 * (100.0 + 4.0))
            .unwrap();
        b.set_stats(1, 400.0, 4400.0, 400.0 * (121.0 + 4.0))
            .unwrap();
        let mut rng = KernelRng::seed_from_u64(5);
        let r = winner_analysis(&b, &mut rng, 20_000, UpliftQuery::against(Some(0))).unwrap();
        assert!(r.p_best[1] > 0.99, "{:?}", r.p_best);
        assert!(r.uplift_low[1] < 0.1 && r.uplift_high[1] > 0.1 && r.uplift_low[1] > 0.0);
    }

    #[test]
    fn invalid_inputs_are_errors() {
        let b = bernoulli(&[(30.0, 70.0), (25.0, 75.0)]);
        let mut rng = KernelRng::seed_from_u64(6);
        for (draws, control) in [
            (99, None),
            (1_000_001, None),
            (1_000, Some(2)),
            (1_000, Some(usize::MAX)),
        ] {
            assert!(matches!(
                winner_analysis(&b, &mut rng, draws, UpliftQuery::against(control)),
                Err(CoreError::Invalid(_))
            ));
        }
        let one = bernoulli(&[(30.0, 70.0)]);
        assert!(winner_analysis(&one, &mut rng, 1_000, UpliftQuery::against(None)).is_err());
        let many = bernoulli(&vec![(2.0, 2.0); 60]);
        assert!(winner_analysis(&many, &mut rng, 1_000_000, UpliftQuery::against(None)).is_err());
    }
}
