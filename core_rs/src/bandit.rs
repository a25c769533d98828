//! Per-experiment posterior state in contiguous arrays, and the policies that choose arms.
//!
//! Sufficient statistics per arm: a (possibly discounted) count `n`, reward sum and sum of
//! squares. For Bernoulli rewards the posterior is Beta(α₀ + sum, β₀ + n − sum); for Gaussian
//! rewards it is Normal–Inverse-Gamma with prior mean m₀ and strength κ₀.

use rand::seq::index::sample as sample_indices;
use rand::Rng;

use crate::error::CoreError;
use crate::policy::{Policy, RewardModel};
use crate::sampling;
use crate::special::beta_quantile;

/// Inverse-Gamma prior of the Gaussian model's variance (weak: one pseudo-observation).
const NIG_SHAPE0: f64 = 1.0;
const NIG_SCALE0: f64 = 1.0;

#[derive(Clone, Debug)]
pub struct Bandit {
    pub model: RewardModel,
    pub policy: Policy,
    /// Discount per observed reward (1 = stationary).
    pub discount: f64,
    /// Bernoulli: α₀; Gaussian: prior mean m₀.
    pub prior_a: Vec<f64>,
    /// Bernoulli: β₀; Gaussian: prior strength κ₀.
    pub prior_b: Vec<f64>,
    pub n: Vec<f64>,
    pub sum: Vec<f64>,
    pub sumsq: Vec<f64>,
    pub active: Vec<bool>,
    /// Bumps on every change of the posterior or the arm set.
    pub version: u64,
    /// Decisions served, for decaying ε.
    pub decisions: u64,
    /// Rewards observed since creation (undiscounted), for UCB's t.
    pub observations: f64,
}

/// One chosen arm.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Choice {
    pub arm: usize,
    /// The value the policy ranked by (a Thompson draw, a UCB index, ...).
    pub value: f64,
}

impl Bandit {
    pub fn new(model: RewardModel, policy: Policy, half_life: f64) -> Result<Self, CoreError> {
        if !(half_life.is_finite() && half_life >= 0.0) {
            return Err(CoreError::invalid(format!(
                "half_life must be a finite number >= 0, got {half_life}"
            )));
        }
        let discount = if half_life > 0.0 {
            0.5f64.powf(1.0 / half_life)
        } else {
            1.0
        };
        Ok(Bandit {
            model,
            policy,
            discount,
            prior_a: Vec::new(),
            prior_b: Vec::new(),
            n: Vec::new(),
            sum: Vec::new(),
            sumsq: Vec::new(),
            active: Vec::new(),
            version: 0,
            decisions: 0,
            observations: 0.0,
        })
    }

    pub fn len(&self) -> usize {
        self.n.len()
    }

    pub fn is_empty(&self) -> bool {
        self.n.is_empty()
    }

    pub fn n_active(&self) -> usize {
        self.active.iter().filter(|a| **a).count()
    }

    fn check_prior(&self, a: f64, b: f64) -> Result<(), CoreError> {
        match self.model {
            RewardModel::Bernoulli => {
                if !(a.is_finite() && b.is_finite() && a > 0.0 && b > 0.0) {
                    return Err(CoreError::invalid(format!(
                        "a Beta prior needs alpha > 0 and beta > 0, got alpha={a}, beta={b}"
                    )));
                }
            }
            RewardModel::Gaussian => {
                if !(a.is_finite() && b.is_finite() && b > 0.0) {
                    return Err(CoreError::invalid(format!(
                        "a Gaussian prior needs a finite mean and strength > 0, got mean={a}, \
                         strength={b}"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Appends arms with their priors; all or nothing.
    pub fn add_arms(&mut self, prior_a: &[f64], prior_b: &[f64]) -> Result<(), CoreError> {
        if prior_a.len() != prior_b.len() {
            return Err(CoreError::invalid("prior arrays differ in length"));
        }
        for (a, b) in prior_a.iter().zip(prior_b) {
            self.check_prior(*a, *b)?;
        }
        let k = prior_a.len();
        self.prior_a.extend_from_slice(prior_a);
        self.prior_b.extend_from_slice(prior_b);
        self.n.resize(self.n.len() + k, 0.0);
        self.sum.resize(self.sum.len() + k, 0.0);
        self.sumsq.resize(self.sumsq.len() + k, 0.0);
        self.active.resize(self.active.len() + k, true);
        self.version += 1;
        Ok(())
    }

    fn check_arm(&self, arm: usize) -> Result<(), CoreError> {
        if arm >= self.len() {
            return Err(CoreError::invalid(format!(
                "arm index {arm} out of range (experiment has {} arms)",
                self.len()
            )));
        }
        Ok(())
    }

    pub fn set_active(&mut self, arm: usize, active: bool) -> Result<(), CoreError> {
        self.check_arm(arm)?;
        self.active[arm] = active;
        self.version += 1;
        Ok(())
    }

    pub fn set_prior(&mut self, arm: usize, a: f64, b: f64) -> Result<(), CoreError> {
        self.check_arm(arm)?;
        self.check_prior(a, b)?;
        self.prior_a[arm] = a;
        self.prior_b[arm] = b;
        self.version += 1;
        Ok(())
    }

    /// Restores an arm's sufficient statistics (from the store, on start).
    pub fn set_stats(&mut self, arm: usize, n: f64, sum: f64, sumsq: f64) -> Result<(), CoreError> {
        self.check_arm(arm)?;
        if !(n.is_finite() && sum.is_finite() && sumsq.is_finite() && n >= 0.0) {
            return Err(CoreError::invalid("statistics must be finite with n >= 0"));
        }
        if self.model == RewardModel::Bernoulli && !(sum >= 0.0 && sum <= n * (1.0 + 1e-9)) {
            return Err(CoreError::invalid(format!(
                "Bernoulli statistics need 0 <= sum <= n, got sum={sum}, n={n}"
            )));
        }
        self.n[arm] = n;
        self.sum[arm] = sum;
        self.sumsq[arm] = sumsq;
        self.version += 1;
        Ok(())
    }

    /// Checks a batch of rewards without changing anything.
    pub fn validate_rewards(&self, arms: &[usize], values: &[f64]) -> Result<(), CoreError> {
        if arms.len() != values.len() {
            return Err(CoreError::invalid("arms and values differ in length"));
        }
        for (i, (&arm, &v)) in arms.iter().zip(values).enumerate() {
            self.check_arm(arm)?;
            if !v.is_finite() {
                return Err(CoreError::invalid(format!(
                    "reward #{i} is {v}; rewards must be finite"
                )));
            }
            if self.model == RewardModel::Bernoulli && !(0.0..=1.0).contains(&v) {
                return Err(CoreError::invalid(format!(
                    "reward #{i} is {v}; binary experiments take rewards in [0, 1]"
                )));
            }
        }
        Ok(())
    }

    /// Applies a batch of rewards; all or nothing. Order within a batch does not matter
    /// (sums commute), so replay after a restart gives the same posterior.
    pub fn apply_rewards(&mut self, arms: &[usize], values: &[f64]) -> Result<(), CoreError> {
        self.validate_rewards(arms, values)?;
        if arms.is_empty() {
            return Ok(());
        }
        if self.discount < 1.0 {
            // Each observed reward ages every statistic by one step of the half-life.
            let f = self.discount.powi(arms.len() as i32);
            for x in self
                .n
                .iter_mut()
                .chain(&mut self.sum)
                .chain(&mut self.sumsq)
            {
                *x *= f;
            }
        }
        for (&arm, &v) in arms.iter().zip(values) {
            self.n[arm] += 1.0;
            self.sum[arm] += v;
            self.sumsq[arm] += v * v;
        }
        self.observations += arms.len() as f64;
        self.version += 1;
        Ok(())
    }

    /// Posterior mean of an arm's reward (for Bernoulli rewards a probability in [0, 1]).
    #[inline]
    pub fn mean(&self, arm: usize) -> f64 {
        match self.model {
            RewardModel::Bernoulli => {
                let a = self.prior_a[arm] + self.sum[arm];
                let b = self.prior_b[arm] + (self.n[arm] - self.sum[arm]).max(0.0);
                (a / (a + b)).clamp(0.0, 1.0)
            }
            RewardModel::Gaussian => {
                let k0 = self.prior_b[arm];
                (k0 * self.prior_a[arm] + self.sum[arm]) / (k0 + self.n[arm])
            }
        }
    }

    /// Beta posterior parameters (Bernoulli model).
    #[inline]
    pub fn beta_params(&self, arm: usize) -> (f64, f64) {
        let a = self.prior_a[arm] + self.sum[arm];
        let b = self.prior_b[arm] + (self.n[arm] - self.sum[arm]).max(0.0);
        (a, b)
    }

    /// NIG posterior (mean, κ, shape, scale) for the Gaussian model.
    fn nig_params(&self, arm: usize) -> (f64, f64, f64, f64) {
        let (m0, k0) = (self.prior_a[arm], self.prior_b[arm]);
        let n = self.n[arm];
        let kn = k0 + n;
        let mn = (k0 * m0 + self.sum[arm]) / kn;
        let xbar = if n > 0.0 { self.sum[arm] / n } else { m0 };
        let ss = (self.sumsq[arm] - n * xbar * xbar).max(0.0);
        let an = NIG_SHAPE0 + 0.5 * n;
        let bn = NIG_SCALE0 + 0.5 * ss + k0 * n * (xbar - m0).powi(2) / (2.0 * kn);
        (mn, kn, an, bn)
    }

    /// Central credible interval at `level` (e.g. 0.95) of the arm's mean reward.
    pub fn interval(&self, arm: usize, level: f64) -> (f64, f64) {
        let tail = 0.5 * (1.0 - level);
        match self.model {
            RewardModel::Bernoulli => {
                let (a, b) = self.beta_params(arm);
                (beta_quantile(tail, a, b), beta_quantile(1.0 - tail, a, b))
            }
            RewardModel::Gaussian => {
                // Marginal of the mean is Student-t; a normal approximation with the
                // posterior scale is close enough for a displayed interval.
                let (mn, kn, an, bn) = self.nig_params(arm);
                let sd = (bn / (an * kn)).sqrt();
                let z = 1.959_963_984_540_054 * (level / 0.95).min(1.5);
                (mn - z * sd, mn + z * sd)
            }
        }
    }

    /// One posterior draw of an arm's mean, sharpened by `exploitation`.
    #[inline]
    fn thompson_draw<R: Rng + ?Sized>(&self, rng: &mut R, arm: usize, exploitation: f64) -> f64 {
        match self.model {
            RewardModel::Bernoulli => {
                let (a, b) = self.beta_params(arm);
                sampling::beta(rng, a * exploitation, b * exploitation)
            }
            RewardModel::Gaussian => {
                let (mn, kn, an, bn) = self.nig_params(arm);
                let sigma2 = bn / sampling::gamma(rng, an);
                mn + sampling::normal(rng) * (sigma2 / (kn * exploitation)).sqrt()
            }
        }
    }

    fn epsilon_now(&self, epsilon: f64, decay: f64) -> f64 {
        if decay > 0.0 {
            epsilon * decay / (decay + self.decisions as f64)
        } else {
            epsilon
        }
    }

    fn active_indices(&self) -> Vec<usize> {
        (0..self.len()).filter(|&i| self.active[i]).collect()
    }

    /// Chooses `k` distinct active arms, best first.
    pub fn choose<R: Rng + ?Sized>(
        &mut self,
        rng: &mut R,
        k: usize,
    ) -> Result<Vec<Choice>, CoreError> {
        let out = self.choose_readonly(rng, k)?;
        self.decisions += 1;
        Ok(out)
    }

    /// The choice without counting it as a decision (used by propensity estimates).
    pub fn choose_readonly<R: Rng + ?Sized>(
        &self,
        rng: &mut R,
        k: usize,
    ) -> Result<Vec<Choice>, CoreError> {
        let n_active = self.n_active();
        if k == 0 {
            return Err(CoreError::invalid("k must be at least 1"));
        }
        if k > n_active {
            return Err(CoreError::invalid(format!(
                "k={k} is larger than the number of active arms ({n_active})"
            )));
        }
        match self.policy {
            Policy::Uniform => Ok(self.uniform_choice(rng, k)),
            Policy::EpsilonGreedy { epsilon, decay } => {
                if rng.random::<f64>() < self.epsilon_now(epsilon, decay) {
                    Ok(self.uniform_choice(rng, k))
                } else {
                    Ok(self.top_k(k, |arm, rng| self.mean(arm) + tie_break(rng), rng))
                }
            }
            Policy::Greedy => Ok(self.top_k(k, |arm, rng| self.mean(arm) + tie_break(rng), rng)),
            Policy::Thompson { exploitation } => Ok(self.top_k(
                k,
                |arm, rng| self.thompson_draw(rng, arm, exploitation),
                rng,
            )),
            Policy::Ucb1 { c } => {
                let log_t = (self.observations.max(1.0)).ln();
                Ok(self.top_k(
                    k,
                    |arm, rng| {
                        let n = self.n[arm];
                        if n <= 0.0 {
                            // Untried arms first, in random order.
                            1e300 + rng.random::<f64>() * 1e299
                        } else {
                            self.mean(arm) + c * (2.0 * log_t / n).sqrt()
                        }
                    },
                    rng,
                ))
            }
            Policy::Softmax { temperature } => {
                // Gumbel-top-k: adding Gumbel noise and keeping the k largest samples the
                // softmax without replacement.
                Ok(self.top_k(
                    k,
                    |arm, rng| {
                        let u = sampling::uniform_open0(rng);
                        self.mean(arm) / temperature - (-u.ln()).ln()
                    },
                    rng,
                ))
            }
        }
    }

    fn uniform_choice<R: Rng + ?Sized>(&self, rng: &mut R, k: usize) -> Vec<Choice> {
        let active = self.active_indices();
        sample_indices(rng, active.len(), k)
            .into_iter()
            .map(|i| Choice {
                arm: active[i],
                value: self.mean(active[i]),
            })
            .collect()
    }

    /// The k active arms with the largest `value`, best first.
    fn top_k<R: Rng + ?Sized, F: Fn(usize, &mut R) -> f64>(
        &self,
        k: usize,
        value: F,
        rng: &mut R,
    ) -> Vec<Choice> {
        if k == 1 {
            let mut best = Choice {
                arm: usize::MAX,
                value: f64::NEG_INFINITY,
            };
            for arm in 0..self.len() {
                if !self.active[arm] {
                    continue;
                }
                let v = value(arm, rng);
                if v > best.value || best.arm == usize::MAX {
                    best = Choice { arm, value: v };
                }
            }
            return vec![best];
        }
        let mut all: Vec<Choice> = (0..self.len())
            .filter(|&arm| self.active[arm])
            .map(|arm| Choice {
                arm,
                value: value(arm, rng),
            })
            .collect();
        let desc = |x: &Choice, y: &Choice| y.value.total_cmp(&x.value);
        if k < all.len() {
            all.select_nth_unstable_by(k - 1, desc);
            all.truncate(k);
        }
        all.sort_unstable_by(desc);
        all
    }

    /// Probability that each arm is among the k chosen, for this state.
    /// Closed form where one exists; Monte Carlo with `draws` samples otherwise
    /// (standard error ≤ 0.5 / sqrt(draws)).
    pub fn inclusion_probabilities<R: Rng + ?Sized>(
        &self,
        rng: &mut R,
        k: usize,
        draws: usize,
    ) -> Result<Vec<f64>, CoreError> {
        let n_active = self.n_active();
        if k == 0 || k > n_active {
            return Err(CoreError::invalid(format!(
                "k={k} must be between 1 and the number of active arms ({n_active})"
            )));
        }
        let mut p = vec![0.0; self.len()];
        let uniform_share = k as f64 / n_active as f64;
        match self.policy {
            Policy::Uniform => {
                for arm in self.active_indices() {
                    p[arm] = uniform_share;
                }
            }
            Policy::EpsilonGreedy { .. } | Policy::Greedy => {
                let eps = match self.policy {
                    Policy::EpsilonGreedy { epsilon, decay } => self.epsilon_now(epsilon, decay),
                    _ => 0.0,
                };
                let greedy = self.top_k(k, |arm, _| self.mean(arm), rng);
                for arm in self.active_indices() {
                    p[arm] = eps * uniform_share;
                }
                for c in greedy {
                    p[c.arm] += 1.0 - eps;
                }
            }
            Policy::Ucb1 { .. } => {
                for c in self.choose_readonly(rng, k)? {
                    p[c.arm] = 1.0;
                }
            }
            Policy::Softmax { temperature } if k == 1 => {
                let active = self.active_indices();
                let m = active
                    .iter()
                    .map(|&a| self.mean(a) / temperature)
                    .fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = active
                    .iter()
                    .map(|&a| (self.mean(a) / temperature - m).exp())
                    .sum();
                for &a in &active {
                    p[a] = (self.mean(a) / temperature - m).exp() / z;
                }
            }
            _ => {
                let draws = draws.max(1);
                for _ in 0..draws {
                    for c in self.choose_readonly(rng, k)? {
                        p[c.arm] += 1.0;
                    }
                }
                // Smoothed so that no active arm gets probability 0 (IPS divides by it);
                // the total stays k.
                let prior = 0.5 * uniform_share;
                for (x, &active) in p.iter_mut().zip(&self.active) {
                    if active {
                        *x = (*x + prior) / (draws as f64 + 0.5);
                    }
                }
            }
        }
        Ok(p)
    }
}

/// A tiny random amount that breaks exact ties between equal means fairly.
#[inline]
fn tie_break<R: Rng + ?Sized>(rng: &mut R) -> f64 {
    rng.random::<f64>() * 1e-12
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_xoshiro::Xoshiro256PlusPlus;

    fn thompson(n: usize) -> Bandit {
        let mut b = Bandit::new(
            RewardModel::Bernoulli,
            Policy::Thompson { exploitation: 1.0 },
            0.0,
        )
        .unwrap();
        b.add_arms(&vec![1.0; n], &vec![1.0; n]).unwrap();
        b
    }

    #[test]
    fn thompson_moves_traffic_to_the_best_arm() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(1);
        let mut b = thompson(5);
        let rates = [0.05, 0.05, 0.10, 0.05, 0.05];
        let mut best_late = 0;
        for t in 0..10_000 {
            let arm = b.choose(&mut rng, 1).unwrap()[0].arm;
            let r = if rng.random::<f64>() < rates[arm] {
                1.0
            } else {
                0.0
            };
            b.apply_rewards(&[arm], &[r]).unwrap();
            if t >= 8_000 && arm == 2 {
                best_late += 1;
            }
        }
        assert!(
            best_late > 1_000,
            "best arm got {best_late} of the last 2000"
        );
    }

    #[test]
    fn k_distinct_arms_and_errors() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(2);
        let mut b = thompson(4);
        let c = b.choose(&mut rng, 3).unwrap();
        let mut arms: Vec<usize> = c.iter().map(|c| c.arm).collect();
        arms.sort();
        arms.dedup();
        assert_eq!(arms.len(), 3);
        assert!(b.choose(&mut rng, 5).is_err());
        assert!(b.choose(&mut rng, 0).is_err());
    }

    #[test]
    fn retired_arms_are_never_chosen() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(3);
        let mut b = thompson(3);
        b.set_active(1, false).unwrap();
        for _ in 0..1000 {
            assert_ne!(b.choose(&mut rng, 1).unwrap()[0].arm, 1);
        }
    }

    #[test]
    fn invalid_rewards_change_nothing() {
        let mut b = thompson(2);
        let before = b.clone();
        assert!(b.apply_rewards(&[0, 1], &[1.0, f64::NAN]).is_err());
        assert!(b.apply_rewards(&[0, 7], &[1.0, 1.0]).is_err());
        assert!(b.apply_rewards(&[0], &[1.5]).is_err());
        assert_eq!(b.sum, before.sum);
        assert_eq!(b.n, before.n);
        assert_eq!(b.version, before.version);
    }

    #[test]
    fn policies_produce_valid_inclusion_probabilities() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(4);
        for policy in [
            Policy::Thompson { exploitation: 1.0 },
            Policy::Ucb1 { c: 1.0 },
            Policy::EpsilonGreedy {
                epsilon: 0.2,
                decay: 0.0,
            },
            Policy::Softmax { temperature: 0.1 },
            Policy::Greedy,
            Policy::Uniform,
        ] {
            let mut b = Bandit::new(RewardModel::Bernoulli, policy, 0.0).unwrap();
            b.add_arms(&[1.0; 4], &[1.0; 4]).unwrap();
            b.apply_rewards(&[0, 1, 1, 2], &[1.0, 0.0, 1.0, 0.0])
                .unwrap();
            for k in 1..=2 {
                let p = b.inclusion_probabilities(&mut rng, k, 4000).unwrap();
                let total: f64 = p.iter().sum();
                assert!(
                    (total - k as f64).abs() < 1e-6,
                    "{policy:?} k={k} total {total}"
                );
                assert!(p.iter().all(|x| (0.0..=1.0 + 1e-9).contains(x)));
            }
        }
    }
}
