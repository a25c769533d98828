//! Per-experiment posterior state in contiguous arrays, and the policies that choose arms.
//!
//! Sufficient statistics per arm: a (possibly discounted) count `n`, reward sum and sum of
//! squares. For Bernoulli rewards the posterior is Beta(α + sum, β + n − sum); for Gaussian
//! rewards it is Normal–Inverse-Gamma with prior mean m₀ and strength κ₀. The prior (α, β)
//! or (m₀, κ₀) is the arm's own, or its group's pooled estimate (see `groups`).

use rand::seq::index::sample as sample_indices;
use rand::Rng;

use crate::error::CoreError;
use crate::groups;
use crate::kernel::{Isa, KernelRng};
use crate::policy::{Policy, RewardModel};
use crate::sampling;
use crate::scores::{kl_ucb_index, ScoreArrays};
use crate::special::beta_quantile;
use crate::thompson::ThompsonIndex;

/// Inverse-Gamma prior of the Gaussian model's variance (weak: one pseudo-observation).
const NIG_SHAPE0: f64 = 1.0;
const NIG_SCALE0: f64 = 1.0;
/// `auto` uses the pruned Thompson draw from this many active arms on (below it the full
/// vector draw is already a few microseconds).
const PRUNE_FROM_ARMS: usize = 2_048;

/// Which Thompson draw to use for Bernoulli rewards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThompsonPath {
    /// Pruned for large experiments once `maintain` has ordered the arms, else full.
    Auto,
    Full,
    /// Pruned always (orders the arms inline when needed).
    Pruned,
}

impl ThompsonPath {
    pub fn parse(s: &str) -> Result<Self, CoreError> {
        match s {
            "auto" | "" => Ok(ThompsonPath::Auto),
            "full" => Ok(ThompsonPath::Full),
            "pruned" => Ok(ThompsonPath::Pruned),
            other => Err(CoreError::invalid(format!(
                "unknown thompson path {other:?}; expected auto, full or pruned"
            ))),
        }
    }
}

/// `apply_rewards` updates derived arrays per reward, not once per touched arm, up to this
/// many rewards per arm in a batch (measured: faster at 1 reward per arm, 2× slower at 10).
const SINGLE_PASS_REWARDS_PER_ARM: usize = 2;
/// One arm's sufficient statistics and the prior in use (its own, or its group's pooled
/// one), together in one cache line: applying a reward touches a single line of them.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[repr(C, align(64))]
pub struct ArmStats {
    pub n: f64,
    pub sum: f64,
    pub sumsq: f64,
    /// Bernoulli: α; Gaussian: prior mean m₀.
    pub eff_a: f64,
    /// Bernoulli: β; Gaussian: prior strength κ₀.
    pub eff_b: f64,
}

/// How many rewards ahead `apply_rewards` prefetches an arm's statistics and position, and
/// its kernel constants.
const PREFETCH_FAR: usize = 16;
const PREFETCH_NEAR: usize = 8;
/// Below this many arms the touched lines stay in the L2 cache and prefetching only costs.
const PREFETCH_MIN_ARMS: usize = 32_768;

#[derive(Clone, Debug)]
pub struct Bandit {
    pub model: RewardModel,
    pub policy: Policy,
    /// Discount per observed reward (1 = stationary).
    pub discount: f64,
    /// The arm's own prior. Bernoulli: α; Gaussian: prior mean m₀.
    pub prior_a: Vec<f64>,
    /// Bernoulli: β; Gaussian: prior strength κ₀.
    pub prior_b: Vec<f64>,
    /// Group of each arm (−1: none) and the pooled prior's strength in pseudo-observations.
    pub groups: Vec<i64>,
    pub group_strength: f64,
    /// Statistics and prior in use, one cache line per arm.
    pub stats: Vec<ArmStats>,
    pub active: Vec<bool>,
    /// Bumps on every change of the posterior or the arm set.
    pub version: u64,
    /// Bumped with `version` whenever the arm set, priors or groups change (not by
    /// observations): what a posterior draw of an older version may not outlive.
    pub structure: u64,
    /// Decisions served, for decaying ε.
    pub decisions: u64,
    /// Rewards observed since creation (undiscounted), for UCB's t.
    pub observations: f64,
    pub isa: Isa,
    pub path: ThompsonPath,
    /// Largest chance that the pruned Thompson draw differs from the full one.
    pub prune_epsilon: f64,
    thompson: ThompsonIndex,
    scores: ScoreArrays,
    scores_built: bool,
    /// KL-UCB exploration budget the cached indices were computed with.
    kl_budget: f64,
    /// Active arms without any observation (UCB tries them first).
    untried: Vec<usize>,
    /// Number of active arms (kept with `active`, off the hot path).
    active_count: usize,
    /// UCB1 / KL-UCB are deterministic given the state: (version, k bits, arm) of the last
    /// top-1 answer, reused until a reward or a change moves the state.
    index_memo: Option<(u64, u32, usize)>,
    /// Share of arms the pruned draw sampled lately; `auto` falls back to the full draw
    /// when pruning does not pay (nearly equal arms).
    pruned_share: f64,
    /// Scratch marks for `apply_rewards` (all zero between calls).
    touched: Vec<u8>,
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
        if matches!(policy, Policy::KlUcb { .. }) && model != RewardModel::Bernoulli {
            return Err(CoreError::invalid(
                "kl_ucb needs binary rewards; use ucb1 or thompson for continuous rewards",
            ));
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
            groups: Vec::new(),
            group_strength: 0.0,
            stats: Vec::new(),
            active: Vec::new(),
            version: 0,
            structure: 0,
            decisions: 0,
            observations: 0.0,
            isa: Isa::detect(),
            path: ThompsonPath::Auto,
            prune_epsilon: 1e-9,
            thompson: ThompsonIndex::default(),
            scores: ScoreArrays::default(),
            scores_built: false,
            kl_budget: 0.0,
            untried: Vec::new(),
            active_count: 0,
            index_memo: None,
            pruned_share: 0.0,
            touched: Vec::new(),
        })
    }

    pub fn set_prune_epsilon(&mut self, epsilon: f64) -> Result<(), CoreError> {
        if !(epsilon > 0.0 && epsilon < 1.0) {
            return Err(CoreError::invalid(format!(
                "prune_epsilon must be in (0, 1), got {epsilon}"
            )));
        }
        self.prune_epsilon = epsilon;
        self.thompson.invalidate();
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.stats.len()
    }

    pub fn is_empty(&self) -> bool {
        self.stats.is_empty()
    }

    pub fn n_active(&self) -> usize {
        self.active_count
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

    /// Everything derived from the arm set or the priors is stale.
    fn structure_changed(&mut self) {
        self.active_count = self.active.iter().filter(|a| **a).count(); // ~µs per 100k arms
        self.refresh_group_priors();
        self.thompson.invalidate();
        self.scores_built = false;
        self.version += 1;
        self.structure += 1;
    }

    fn refresh_group_priors(&mut self) {
        for ((st, &a), &b) in self.stats.iter_mut().zip(&self.prior_a).zip(&self.prior_b) {
            st.eff_a = a;
            st.eff_b = b;
        }
        if !self.groups.is_empty() {
            groups::pool(self);
        }
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
        crate::memory::reserve_huge(&mut self.stats, k);
        self.stats.extend(
            prior_a
                .iter()
                .zip(prior_b)
                .map(|(&eff_a, &eff_b)| ArmStats {
                    eff_a,
                    eff_b,
                    ..ArmStats::default()
                }),
        );
        self.active.resize(self.active.len() + k, true);
        if !self.groups.is_empty() {
            self.groups.resize(self.len(), -1);
        }
        self.structure_changed();
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
        self.structure_changed();
        Ok(())
    }

    pub fn set_prior(&mut self, arm: usize, a: f64, b: f64) -> Result<(), CoreError> {
        self.check_arm(arm)?;
        self.check_prior(a, b)?;
        self.prior_a[arm] = a;
        self.prior_b[arm] = b;
        self.structure_changed();
        Ok(())
    }

    /// Arms sharing a group (index >= 0) start from the group's pooled estimate with
    /// `strength` pseudo-observations instead of their own prior (empirical Bayes).
    pub fn set_groups(&mut self, groups: &[i64], strength: f64) -> Result<(), CoreError> {
        if groups.len() != self.len() {
            return Err(CoreError::invalid(format!(
                "{} group ids for {} arms",
                groups.len(),
                self.len()
            )));
        }
        if !(strength.is_finite() && strength > 0.0) {
            return Err(CoreError::invalid(format!(
                "group prior strength must be a finite number > 0, got {strength}"
            )));
        }
        self.groups = if groups.iter().any(|&g| g >= 0) {
            groups.to_vec()
        } else {
            Vec::new()
        };
        self.group_strength = strength;
        self.structure_changed();
        Ok(())
    }

    /// Restores an arm's sufficient statistics (from the store, on start).
    pub fn set_stats(&mut self, arm: usize, n: f64, sum: f64, sumsq: f64) -> Result<(), CoreError> {
        self.set_stats_many(&[arm], &[n], &[sum], &[sumsq])
    }

    /// Restores many arms' statistics at once (one refresh of the derived arrays); all or
    /// nothing.
    pub fn set_stats_many(
        &mut self,
        arms: &[usize],
        n: &[f64],
        sum: &[f64],
        sumsq: &[f64],
    ) -> Result<(), CoreError> {
        if n.len() != arms.len() || sum.len() != arms.len() || sumsq.len() != arms.len() {
            return Err(CoreError::invalid("statistics arrays differ in length"));
        }
        for i in 0..arms.len() {
            self.check_arm(arms[i])?;
            let (n, sum, sumsq) = (n[i], sum[i], sumsq[i]);
            if !(n.is_finite() && sum.is_finite() && sumsq.is_finite() && n >= 0.0) {
                return Err(CoreError::invalid("statistics must be finite with n >= 0"));
            }
            if self.model == RewardModel::Bernoulli && !(sum >= 0.0 && sum <= n * (1.0 + 1e-9)) {
                return Err(CoreError::invalid(format!(
                    "Bernoulli statistics need 0 <= sum <= n, got sum={sum}, n={n}"
                )));
            }
        }
        // (arm, may its posterior have risen?). More trials with no more successes (decisions
        // counted as trials, rewards of 0) make the Beta posterior stochastically smaller, so
        // the pruned draw's bound of the arm stays safe and the arm need not be drawn as dirty:
        // under decision-only traffic at 10,000 arms every commit would otherwise mark
        // hundreds of arms dirty in every process that applies it.
        let mut changed = Vec::new();
        for (i, &arm) in arms.iter().enumerate() {
            let st = &mut self.stats[arm];
            if (st.n, st.sum, st.sumsq) != (n[i], sum[i], sumsq[i]) {
                let lower = sum[i] <= st.sum && n[i] - sum[i] >= st.n - st.sum;
                (st.n, st.sum, st.sumsq) = (n[i], sum[i], sumsq[i]);
                changed.push((arm, !lower));
            }
        }
        if changed.is_empty() {
            return Ok(());
        }
        self.version += 1;
        if !self.groups.is_empty() {
            self.structure_changed();
            return Ok(());
        }
        // Only the changed arms' derived state moves (cheap when another process's rewards
        // are merged in a few at a time).
        for (arm, may_rise) in changed {
            self.arm_changed(arm, may_rise);
        }
        self.scores_built = self.scores_built && !matches!(self.policy, Policy::KlUcb { .. });
        Ok(())
    }

    /// Restores the policy's counters (from the store): decisions served, which decays ε,
    /// and observations made, UCB's t. Kept by the server so that a restart or another
    /// process of a pool continues with the same policy state.
    pub fn set_counters(&mut self, decisions: u64, observations: f64) -> Result<(), CoreError> {
        if !(observations.is_finite() && observations >= 0.0) {
            return Err(CoreError::invalid(format!(
                "observations must be a finite number >= 0, got {observations}"
            )));
        }
        self.decisions = decisions;
        if observations != self.observations {
            self.observations = observations;
            // UCB indices and their cached propensities depend on t.
            self.version += 1;
            self.after_rewards();
        }
        Ok(())
    }

    /// Checks a batch of rewards without changing anything.
    pub fn validate_rewards(&self, arms: &[usize], values: &[f64]) -> Result<(), CoreError> {
        if arms.len() != values.len() {
            return Err(CoreError::invalid("arms and values differ in length"));
        }
        // The common case in one vectorised pass (no early exit); the loop below only runs
        // to name the first bad reward.
        let len = self.len();
        let arms_ok = arms.iter().fold(true, |ok, &arm| ok & (arm < len));
        let values_ok = if self.model == RewardModel::Bernoulli {
            values
                .iter()
                .fold(true, |ok, &v| ok & (0.0..=1.0).contains(&v))
        } else {
            values
                .iter()
                .fold(true, |ok, &v| ok & (v.abs() < f64::INFINITY))
        };
        if arms_ok && values_ok {
            return Ok(());
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
        let global = self.discount < 1.0 || !self.groups.is_empty();
        if self.discount < 1.0 {
            // Each observed reward ages every statistic by one step of the half-life.
            let f = self.discount.powi(arms.len() as i32);
            for st in &mut self.stats {
                st.n *= f;
                st.sum *= f;
                st.sumsq *= f;
            }
        }
        // Few rewards per arm: each reward's derived arrays are updated right after its
        // statistics, while the arm's cache lines are loaded (a second pass over the touched
        // arms would fetch them again, from beyond the L2 cache at 100,000 arms).
        let single_pass = !global && arms.len() <= self.len() * SINGLE_PASS_REWARDS_PER_ARM;
        let prefetch = single_pass && self.len() >= PREFETCH_MIN_ARMS;
        for (i, (&arm, &v)) in arms.iter().zip(values).enumerate() {
            if prefetch {
                // Random arms beyond the L2 cache: start the loads a few rewards ahead so
                // their latencies overlap (the statistics and position first, then the
                // kernel constants found through the position).
                if let Some(&ahead) = arms.get(i + PREFETCH_FAR) {
                    self.prefetch_stats(ahead);
                    self.thompson.prefetch_position(ahead);
                }
                if let Some(&ahead) = arms.get(i + PREFETCH_NEAR) {
                    self.thompson.prefetch_arm(ahead);
                }
            }
            let st = &mut self.stats[arm];
            st.n += 1.0;
            st.sum += v;
            st.sumsq += v * v;
            if single_pass {
                self.arm_changed(arm, v > 0.0);
            }
        }
        self.observations += arms.len() as f64;
        self.version += 1;
        if single_pass {
            self.after_rewards();
            return Ok(());
        }
        if global {
            // Every arm's posterior (discount) or prior (group pooling) moved.
            self.refresh_group_priors();
            self.thompson.invalidate();
            self.scores_built = false;
            return Ok(());
        }
        // Each touched arm once; `may_rise` if any of its rewards was positive.
        let mut mark = std::mem::take(&mut self.touched);
        mark.resize(self.len(), 0);
        let mut touched = Vec::new();
        for (&arm, &v) in arms.iter().zip(values) {
            if mark[arm] == 0 {
                touched.push(arm);
            }
            mark[arm] |= 1 | (u8::from(v > 0.0) << 1);
        }
        for &arm in &touched {
            self.arm_changed(arm, mark[arm] & 2 != 0);
            mark[arm] = 0;
        }
        self.touched = mark;
        self.after_rewards();
        Ok(())
    }

    #[inline]
    fn prefetch_stats(&self, arm: usize) {
        use crate::memory::prefetch;
        prefetch(self.stats.as_ptr().wrapping_add(arm));
    }

    /// KL-UCB's cached indices go stale when its exploration budget has grown.
    fn after_rewards(&mut self) {
        if matches!(self.policy, Policy::KlUcb { .. })
            && self.kl_budget_now() > self.kl_budget * 1.01
        {
            self.scores_built = false;
        }
    }

    /// Keeps the derived arrays of one arm current after its statistics changed.
    fn arm_changed(&mut self, arm: usize, may_rise: bool) {
        if self.uses_kernel() && self.thompson.is_built() {
            let (a, b) = self.sharpened(arm);
            self.thompson.update_arm(arm, a, b, may_rise);
        }
        if self.scores_built && self.active[arm] {
            // `untried` is pruned lazily, before its next use.
            let (base, spread) = self.score_terms(arm);
            self.scores.set(arm, base, spread);
        }
    }

    /// Posterior mean of an arm's reward (for Bernoulli rewards a probability in [0, 1]).
    #[inline]
    pub fn mean(&self, arm: usize) -> f64 {
        match self.model {
            RewardModel::Bernoulli => {
                let (a, b) = self.beta_params(arm);
                (a / (a + b)).clamp(0.0, 1.0)
            }
            RewardModel::Gaussian => {
                let st = &self.stats[arm];
                (st.eff_b * st.eff_a + st.sum) / (st.eff_b + st.n)
            }
        }
    }

    /// Beta posterior parameters (Bernoulli model).
    #[inline]
    pub fn beta_params(&self, arm: usize) -> (f64, f64) {
        let st = &self.stats[arm];
        let a = st.eff_a + st.sum;
        let b = st.eff_b + (st.n - st.sum).max(0.0);
        (a, b)
    }

    fn exploitation(&self) -> f64 {
        match self.policy {
            Policy::Thompson { exploitation } => exploitation,
            _ => 1.0,
        }
    }

    /// Beta shapes the Thompson draw samples: the posterior sharpened by `exploitation`
    /// (both shapes scaled: same mean, variance divided by about `exploitation`).
    #[inline]
    fn sharpened(&self, arm: usize) -> (f64, f64) {
        let (a, b) = self.beta_params(arm);
        let e = self.exploitation();
        (a * e, b * e)
    }

    /// NIG posterior (mean, κ, shape, scale) for the Gaussian model.
    pub fn nig_params(&self, arm: usize) -> (f64, f64, f64, f64) {
        let st = &self.stats[arm];
        let (m0, k0, n) = (st.eff_a, st.eff_b, st.n);
        let kn = k0 + n;
        let mn = (k0 * m0 + st.sum) / kn;
        let xbar = if n > 0.0 { st.sum / n } else { m0 };
        let ss = (st.sumsq - n * xbar * xbar).max(0.0);
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

    /// True when Bernoulli Thompson runs on the vector kernel.
    fn uses_kernel(&self) -> bool {
        self.model == RewardModel::Bernoulli && matches!(self.policy, Policy::Thompson { .. })
    }

    /// Orders arms for the pruned Thompson draw and refreshes stale bounds; off the hot
    /// path (the server calls it after applying a batch of rewards).
    pub fn maintain(&mut self) {
        if !self.uses_kernel() || self.path == ThompsonPath::Full {
            return;
        }
        if self.path == ThompsonPath::Auto && self.n_active() < PRUNE_FROM_ARMS {
            return;
        }
        let mut index = std::mem::take(&mut self.thompson);
        let this = &*self;
        index.maintain(|arm| this.sharpened(arm), &this.active, this.prune_epsilon);
        self.thompson = index;
        self.pruned_share = 0.0; // give pruning another chance with the new order
    }

    /// Arms the last pruned Thompson draw sampled (0 if it used the full draw).
    pub fn last_drawn(&self) -> usize {
        self.thompson.last_drawn
    }

    fn ensure_kernel(&mut self) {
        if !self.thompson.is_built() {
            let mut index = std::mem::take(&mut self.thompson);
            let this = &*self;
            index.rebuild(|arm| this.sharpened(arm), &this.active);
            self.thompson = index;
        }
    }

    fn kernel_choice(&mut self, rng: &mut KernelRng, k: usize) -> Vec<Choice> {
        self.ensure_kernel();
        let pruned = match self.path {
            ThompsonPath::Full => false,
            ThompsonPath::Pruned => {
                if !self.thompson.is_ordered() {
                    self.maintain();
                }
                true
            }
            ThompsonPath::Auto => self.thompson.is_ordered() && self.pruned_share < 0.5,
        };
        let picks = if pruned {
            let picks = self.thompson.choose_pruned(self.isa, rng, k);
            let share = self.thompson.last_drawn as f64 / self.n_active().max(1) as f64;
            self.pruned_share = 0.9 * self.pruned_share + 0.1 * share;
            picks
        } else {
            self.thompson.last_drawn = 0;
            self.thompson.choose_full(self.isa, rng, k)
        };
        picks
            .into_iter()
            .map(|(arm, value)| Choice { arm, value })
            .collect()
    }

    fn ucb_k(&self) -> f32 {
        match self.policy {
            Policy::Ucb1 { c } => (c * (2.0 * self.observations.max(1.0).ln()).sqrt()) as f32,
            _ => 0.0,
        }
    }

    fn kl_budget_now(&self) -> f64 {
        let t = self.observations.max(1.0);
        let c = match self.policy {
            Policy::KlUcb { c } => c,
            _ => 0.0,
        };
        t.ln() + c * t.ln().max(1.0).ln()
    }

    /// (base, spread) of an arm's index; see `scores`.
    fn score_terms(&self, arm: usize) -> (f32, f32) {
        let st = &self.stats[arm];
        let n = st.n;
        match self.policy {
            Policy::KlUcb { .. } => {
                let p = if n > 0.0 { st.sum / n } else { 0.0 };
                (kl_ucb_index(p, n, self.kl_budget) as f32, 0.0)
            }
            _ => (
                self.mean(arm) as f32,
                if n > 0.0 {
                    (1.0 / n.sqrt()) as f32
                } else {
                    0.0
                },
            ),
        }
    }

    fn ensure_scores(&mut self) {
        if self.scores_built {
            return;
        }
        self.kl_budget = self.kl_budget_now();
        let mut scores = ScoreArrays::with_len(self.len());
        self.untried.clear();
        for arm in 0..self.len() {
            if !self.active[arm] {
                continue;
            }
            if self.stats[arm].n <= 0.0 {
                self.untried.push(arm);
            }
            let (base, spread) = self.score_terms(arm);
            scores.set(arm, base, spread);
        }
        self.scores = scores;
        self.scores_built = true;
    }

    /// UCB1 and KL-UCB: untried arms first (uniformly), then the largest index.
    fn index_choice(&mut self, rng: &mut KernelRng, k: usize) -> Vec<Choice> {
        self.ensure_scores();
        if !self.untried.is_empty() {
            let (stats, active) = (&self.stats, &self.active);
            self.untried.retain(|&a| stats[a].n <= 0.0 && active[a]);
        }
        let kk = self.ucb_k();
        let mut out: Vec<Choice> = Vec::with_capacity(k);
        if !self.untried.is_empty() {
            let take = k.min(self.untried.len());
            for i in sample_indices(&mut rng.scalar, self.untried.len(), take) {
                out.push(Choice {
                    arm: self.untried[i],
                    value: f64::INFINITY,
                });
            }
        }
        if out.len() == k {
            return out;
        }
        if k == 1 {
            let key = (self.version, kk.to_bits());
            let arm = match self.index_memo {
                Some((v, kb, arm)) if (v, kb) == key => arm,
                _ => {
                    let arm = self.scores.argmax(self.isa, kk);
                    self.index_memo = Some((key.0, key.1, arm));
                    arm
                }
            };
            return vec![Choice {
                arm,
                value: self.scores.score(arm, kk) as f64,
            }];
        }
        let taken: Vec<usize> = out.iter().map(|c| c.arm).collect();
        let rest = self.top_k(
            k - out.len(),
            |arm, _| {
                if taken.contains(&arm) {
                    f64::NEG_INFINITY
                } else {
                    self.scores.score(arm, kk) as f64
                }
            },
            &mut rng.scalar,
        );
        out.extend(rest);
        out
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
    pub fn choose(&mut self, rng: &mut KernelRng, k: usize) -> Result<Vec<Choice>, CoreError> {
        let out = self.choose_readonly(rng, k)?;
        self.decisions += 1;
        Ok(out)
    }

    /// The choice without counting it as a decision (used by propensity estimates).
    pub fn choose_readonly(
        &mut self,
        rng: &mut KernelRng,
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
            Policy::Uniform => Ok(self.uniform_choice(&mut rng.scalar, k)),
            Policy::EpsilonGreedy { epsilon, decay } => {
                let r = &mut rng.scalar;
                if r.random::<f64>() < self.epsilon_now(epsilon, decay) {
                    Ok(self.uniform_choice(r, k))
                } else {
                    Ok(self.top_k(k, |arm, rng| self.mean(arm) + tie_break(rng), r))
                }
            }
            Policy::Greedy => Ok(self.top_k(
                k,
                |arm, rng| self.mean(arm) + tie_break(rng),
                &mut rng.scalar,
            )),
            Policy::Thompson { exploitation } => {
                if self.uses_kernel() {
                    Ok(self.kernel_choice(rng, k))
                } else {
                    Ok(self.top_k(
                        k,
                        |arm, rng| self.thompson_draw(rng, arm, exploitation),
                        &mut rng.scalar,
                    ))
                }
            }
            Policy::Ucb1 { .. } | Policy::KlUcb { .. } => Ok(self.index_choice(rng, k)),
            Policy::Softmax { temperature } => {
                // Gumbel-top-k: adding Gumbel noise and keeping the k largest samples the
                // softmax without replacement.
                Ok(self.top_k(
                    k,
                    |arm, rng| {
                        let u = sampling::uniform_open0(rng);
                        self.mean(arm) / temperature - (-u.ln()).ln()
                    },
                    &mut rng.scalar,
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
    fn top_k<R: Rng + ?Sized, F: FnMut(usize, &mut R) -> f64>(
        &self,
        k: usize,
        mut value: F,
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

    /// Whether `inclusion_probabilities` has a closed form for slates of k (else it is a
    /// Monte Carlo estimate).
    pub fn propensities_are_exact(&self, k: usize) -> bool {
        match self.policy {
            Policy::Uniform
            | Policy::EpsilonGreedy { .. }
            | Policy::Greedy
            | Policy::Ucb1 { .. }
            | Policy::KlUcb { .. } => true,
            Policy::Softmax { .. } => k == 1,
            _ => false,
        }
    }

    /// Probability that each arm is among the k chosen, for this state.
    /// Closed form where one exists; Monte Carlo with `draws` samples otherwise
    /// (standard error ≤ 0.5 / sqrt(draws)).
    pub fn inclusion_probabilities(
        &mut self,
        rng: &mut KernelRng,
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
                // The greedy slate breaks ties at random: arms tied at the k-th best mean
                // share the remaining slots.
                let active = self.active_indices();
                let mut means: Vec<f64> = active.iter().map(|&a| self.mean(a)).collect();
                means.sort_unstable_by(|x, y| y.total_cmp(x));
                let kth = means[k - 1];
                let tol = 1e-12;
                let above = active.iter().filter(|&&a| self.mean(a) > kth + tol).count();
                let tied = active
                    .iter()
                    .filter(|&&a| (self.mean(a) - kth).abs() <= tol)
                    .count();
                let tied_share = (k - above) as f64 / tied.max(1) as f64;
                for &arm in &active {
                    let m = self.mean(arm);
                    let greedy = if m > kth + tol {
                        1.0
                    } else if (m - kth).abs() <= tol {
                        tied_share
                    } else {
                        0.0
                    };
                    p[arm] = eps * uniform_share + (1.0 - eps) * greedy;
                }
            }
            Policy::Ucb1 { .. } | Policy::KlUcb { .. } => {
                self.ensure_scores();
                let (stats, active) = (&self.stats, &self.active);
                self.untried.retain(|&a| stats[a].n <= 0.0 && active[a]);
                let untried = self.untried.clone();
                if k <= untried.len() {
                    // Uniform among the untried arms.
                    for &arm in &untried {
                        p[arm] = k as f64 / untried.len() as f64;
                    }
                } else {
                    for c in self.index_choice(rng, k) {
                        p[c.arm] = 1.0;
                    }
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
        let mut rng = KernelRng::seed_from_u64(1);
        let mut b = thompson(5);
        let rates = [0.05, 0.05, 0.10, 0.05, 0.05];
        let mut best_late = 0;
        for t in 0..10_000 {
            let arm = b.choose(&mut rng, 1).unwrap()[0].arm;
            let r = if rng.scalar.random::<f64>() < rates[arm] {
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

    /// Stored statistics with more trials and no more successes (another process's decisions,
    /// rewards of 0) keep the pruned index's bounds: no arm becomes dirty, and the pruned draw
    /// still chooses like the full one. A stored success marks its arm dirty.
    #[test]
    fn stored_trials_keep_the_pruned_bounds_and_successes_mark_dirty() {
        use crate::kernel::tests::{chi2_critical, chi2_two_sample};
        let n = 600;
        let mut b = thompson(n);
        b.path = ThompsonPath::Pruned;
        let arms: Vec<usize> = (0..n).collect();
        // Rates 1%..31%, 500..2,300 trials: most arms are far below the leaders.
        let mut trials: Vec<f64> = (0..n).map(|i| 500.0 + (i % 37) as f64 * 50.0).collect();
        let mut wins: Vec<f64> = (0..n)
            .map(|i| (trials[i] * (0.01 + 0.3 * ((i % 97) as f64 / 97.0).powi(2))).round())
            .collect();
        b.set_stats_many(&arms, &trials, &wins, &wins).unwrap();
        b.maintain();
        assert_eq!(b.thompson.dirty_len(), 0);
        for t in trials.iter_mut() {
            *t += 5.0;
        }
        b.set_stats_many(&arms, &trials, &wins, &wins).unwrap();
        assert_eq!(b.thompson.dirty_len(), 0, "trials alone made arms dirty");
        // The draw with kept bounds against the full draw over the same posterior.
        let mut full = b.clone();
        full.path = ThompsonPath::Full;
        let (mut pruned_rng, mut full_rng) =
            (KernelRng::seed_from_u64(3), KernelRng::seed_from_u64(4));
        let (mut got, mut want) = (vec![0u64; n], vec![0u64; n]);
        for _ in 0..200_000 {
            got[b.choose(&mut pruned_rng, 1).unwrap()[0].arm] += 1;
            want[full.choose(&mut full_rng, 1).unwrap()[0].arm] += 1;
        }
        let (stat, df) = chi2_two_sample(&got, &want);
        assert!(
            stat < chi2_critical(df),
            "chi2 {stat:.1} > {:.1} (df {df})",
            chi2_critical(df)
        );
        assert!(
            b.last_drawn() < n / 2,
            "pruned draw sampled {} of {n} arms",
            b.last_drawn()
        );
        trials[7] += 1.0;
        wins[7] += 1.0;
        b.set_stats_many(&[7], &trials[7..8], &wins[7..8], &wins[7..8])
            .unwrap();
        assert_eq!(
            b.thompson.dirty_len(),
            1,
            "a success did not mark its arm dirty"
        );
    }

    #[test]
    fn k_distinct_arms_and_errors() {
        let mut rng = KernelRng::seed_from_u64(2);
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
        let mut rng = KernelRng::seed_from_u64(3);
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
        assert_eq!(b.stats, before.stats);
        assert_eq!(b.version, before.version);
    }

    #[test]
    fn policies_produce_valid_inclusion_probabilities() {
        let mut rng = KernelRng::seed_from_u64(4);
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
