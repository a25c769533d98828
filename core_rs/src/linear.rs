//! Contextual bandits: one model per arm over a feature vector (disjoint LinUCB / LinTS of
//! Li et al. 2010, Agrawal & Goyal 2013; logistic regression with a Laplace approximation,
//! Chapelle & Li 2011).
//!
//! Per arm the model keeps M = A^-1 (ridge: A = ridge*I + sum w x x') or H^-1 (logistic:
//! the Hessian of the penalised log-likelihood at theta), theta and, for ridge, b = sum w y x.
//! M changes by Sherman–Morrison rank-1 updates, O(d^2) per observation, and theta with it
//! (recursive least squares, recomputed as M b every few updates). A score needs x'theta and
//! the quadratic form x'Mx; the quadratic form is one dot product of an f32 copy of M's upper
//! triangle (d(d+1)/2 values, all arms in one contiguous buffer) with the same packing of
//! x x' built once per decision, with AVX2/FMA when the CPU has it (`linear_kernels`): ~4x
//! less memory than the f64 matrix, streamed sequentially, which is what makes 100 arms x 50
//! features a few microseconds.
//!
//! Thompson: x'theta~ for theta~ ~ N(theta, s^2 M) is N(x'theta, s^2 x'Mx), and arms are
//! independent, so one normal draw per arm is an exact draw of the whole posterior's scores.
//! Its propensity P(arm a has the largest draw) = integral phi(t) prod_b Phi((mu_a + s_a t -
//! mu_b)/s_b) dt, computed by the trapezoidal rule from the top of the range downward on a grid
//! fine enough for the competitors present at each height, stopping once the rest is
//! negligible (see `win_probability_in`).

use rand::Rng;

use crate::error::CoreError;
use crate::linear_kernels::{
    self as kernels, avx2_available, dot, theta_stride, tri_block, Aligned, CdfTable,
};
use crate::sampling;

/// Largest feature dimension (the intercept included).
pub const MAX_FEATURES: usize = 512;
/// Largest memory all arms' models may take together.
pub const MAX_MODEL_BYTES: usize = 4 << 30;
/// Ridge: updates after which theta is recomputed as M b (in between, it follows M's
/// rank-one updates, which is exact up to rounding).
const RESYNC: u32 = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Model {
    Ridge,
    Logistic,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Ucb,
    Thompson,
}

#[derive(Clone, Debug)]
pub struct ArmModel {
    /// A^-1 or H^-1, full symmetric, row-major d x d.
    pub m: Vec<f64>,
    pub theta: Vec<f64>,
    /// Ridge: sum w y x.
    pub b: Vec<f64>,
    /// Sum of weights and of w y^2 (ridge residual variance).
    pub n: f64,
    pub yy: f64,
    /// Ridge: updates since theta was last computed as M b.
    drift: u32,
}

impl ArmModel {
    fn prior(d: usize, ridge: f64) -> ArmModel {
        let mut m = vec![0.0; d * d];
        for i in 0..d {
            m[i * d + i] = 1.0 / ridge;
        }
        ArmModel {
            m,
            theta: vec![0.0; d],
            b: vec![0.0; d],
            n: 0.0,
            yy: 0.0,
            drift: 0,
        }
    }

    /// M x into `out`.
    fn m_times(&self, d: usize, x: &[f64], out: &mut [f64]) {
        for (i, o) in out.iter_mut().enumerate().take(d) {
            *o = dot(&self.m[i * d..(i + 1) * d], x);
        }
    }
}

pub fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

/// One decision: arms, reported scores, propensities.
pub struct Choice {
    pub arms: Vec<usize>,
    pub scores: Vec<f64>,
    pub propensities: Vec<f64>,
}

/// Arm index of an update item that rescales every arm by its weight (discounting).
pub const RESCALE_ITEM: usize = 0xFFFF_FFFF;

pub struct Linear {
    pub model: Model,
    pub mode: Mode,
    pub binary: bool,
    pub alpha: f64,
    pub ridge: f64,
    pub floor: f64,
    d: usize,
    /// Change only through `Linear`'s methods: they keep the scoring copies below in step.
    pub arms: Vec<ArmModel>,
    pub active: Vec<bool>,
    pub version: u64,
    avx2: bool,
    /// Every arm's f32 upper triangle of M (`tri_block(d)` floats each, arm-major).
    tri: Aligned<f32>,
    /// Copies of every arm's theta (`theta_stride(d)` each, zero padded) and score scale
    /// sigma, for the scoring pass.
    thetas: Aligned<f64>,
    sig: Vec<f64>,
    /// Direction of the next scoring pass.
    backwards: bool,
    /// Half-life discounting: statistics are stored relative to a clock base, so every
    /// estimate's variance is `inflation` = d^-(clock - base) times the stored one, capped at
    /// the prior's (an arm without recent data becomes as uncertain as a new one, no more).
    inflation: f64,
    // Scratch buffers of the hot path (no allocation per decision).
    mu: Vec<f64>,
    se: Vec<f64>,
    xp: Aligned<f32>,
    xd: Aligned<f64>,
    u: Vec<f64>,
    ids: Vec<usize>,
    scored: Vec<(f64, usize)>,
    values: Vec<f64>,
    win: WinScratch,
}

impl Linear {
    pub fn new(
        model: Model,
        mode: Mode,
        binary: bool,
        alpha: f64,
        ridge: f64,
        floor: f64,
    ) -> Result<Linear, CoreError> {
        if !(alpha.is_finite() && (0.0..=100.0).contains(&alpha)) {
            return Err(CoreError::invalid(format!(
                "alpha must be between 0 and 100, got {alpha}"
            )));
        }
        if !(ridge.is_finite() && (1e-6..=1e6).contains(&ridge)) {
            return Err(CoreError::invalid(format!(
                "ridge must be between 1e-6 and 1e6, got {ridge}"
            )));
        }
        if !(floor.is_finite() && (0.0..=1.0).contains(&floor)) {
            return Err(CoreError::invalid(format!(
                "exploration floor must be between 0 and 1, got {floor}"
            )));
        }
        if model == Model::Logistic && !binary {
            return Err(CoreError::invalid(
                "logistic models need binary rewards; use lin_ucb or lin_ts for continuous ones",
            ));
        }
        Ok(Linear {
            model,
            mode,
            binary,
            alpha,
            ridge,
            floor,
            d: 1,
            arms: Vec::new(),
            active: Vec::new(),
            version: 0,
            avx2: avx2_available(),
            tri: Aligned::default(),
            thetas: Aligned::default(),
            sig: Vec::new(),
            backwards: false,
            inflation: 1.0,
            mu: Vec::new(),
            se: Vec::new(),
            xp: Aligned::default(),
            xd: Aligned::default(),
            u: Vec::new(),
            ids: Vec::new(),
            scored: Vec::new(),
            values: Vec::new(),
            win: WinScratch::default(),
        })
    }

    pub fn d(&self) -> usize {
        self.d
    }

    pub fn isa(&self) -> &'static str {
        if self.avx2 {
            "avx2"
        } else {
            "scalar"
        }
    }

    pub fn bytes_per_arm(d: usize) -> usize {
        // m, theta, b, n, yy; the scoring copies (theta, sigma, f32 triangle).
        8 * (d * d + 2 * d + 2) + 8 * (theta_stride(d) + 1) + 4 * tri_block(d)
    }

    fn check_memory(d: usize, arms: usize) -> Result<(), CoreError> {
        let need = Linear::bytes_per_arm(d).saturating_mul(arms);
        if need > MAX_MODEL_BYTES {
            return Err(CoreError::invalid(format!(
                "{arms} arms x {d} features need {} MiB of models; at most {} MiB allowed",
                need >> 20,
                MAX_MODEL_BYTES >> 20
            )));
        }
        Ok(())
    }

    pub fn add_arms(&mut self, n: usize) -> Result<(), CoreError> {
        Linear::check_memory(self.d, self.arms.len() + n)?;
        for _ in 0..n {
            self.arms.push(ArmModel::prior(self.d, self.ridge));
            self.active.push(true);
        }
        self.resize_copies();
        for a in self.arms.len() - n..self.arms.len() {
            self.refresh(a);
        }
        self.version += 1;
        Ok(())
    }

    /// Sizes the scoring copies (tri, thetas, sig) to the arms and the dimension.
    fn resize_copies(&mut self) {
        let n = self.arms.len();
        self.tri.resize(n * tri_block(self.d));
        self.thetas.resize(n * theta_stride(self.d));
        self.sig.resize(n, 0.0);
    }

    /// Rewrites arm `a`'s scoring copies from its model.
    fn refresh(&mut self, a: usize) {
        let d = self.d;
        let block = tri_block(d);
        let arm = &self.arms[a];
        kernels::pack_upper(&arm.m, d, &mut self.tri[a * block..(a + 1) * block]);
        let stride = theta_stride(d);
        self.thetas[a * stride..a * stride + d].copy_from_slice(&arm.theta);
        self.thetas[a * stride + d..(a + 1) * stride].fill(0.0);
        self.sig[a] = self.sigma(arm);
    }

    pub fn set_active(&mut self, arm: usize, active: bool) -> Result<(), CoreError> {
        self.check_arm(arm)?;
        self.active[arm] = active;
        self.version += 1;
        Ok(())
    }

    fn check_arm(&self, arm: usize) -> Result<(), CoreError> {
        if arm >= self.arms.len() {
            return Err(CoreError::invalid(format!(
                "arm index {arm} out of range (the model has {} arms)",
                self.arms.len()
            )));
        }
        Ok(())
    }

    /// New dimension: every arm restarts from its prior.
    pub fn set_dimension(&mut self, d: usize) -> Result<(), CoreError> {
        if d == 0 || d > MAX_FEATURES {
            return Err(CoreError::invalid(format!(
                "the feature vector has {d} entries; between 1 and {MAX_FEATURES} allowed"
            )));
        }
        Linear::check_memory(d, self.arms.len())?;
        self.d = d;
        self.reset();
        Ok(())
    }

    pub fn reset(&mut self) {
        for arm in self.arms.iter_mut() {
            *arm = ArmModel::prior(self.d, self.ridge);
        }
        self.resize_copies();
        for a in 0..self.arms.len() {
            self.refresh(a);
        }
        self.version += 1;
    }

    fn check_x(&self, x: &[f64]) -> Result<(), CoreError> {
        if x.len() != self.d {
            return Err(CoreError::invalid(format!(
                "feature vector has {} entries, the model {} (the feature definition changed?)",
                x.len(),
                self.d
            )));
        }
        if let Some(v) = x.iter().find(|v| !v.is_finite()) {
            return Err(CoreError::invalid(format!(
                "feature vector holds {v}; features must be finite"
            )));
        }
        Ok(())
    }

    /// Scale of the score's standard error: sigma of the reward noise.
    fn sigma(&self, arm: &ArmModel) -> f64 {
        match self.model {
            Model::Logistic => 1.0,
            Model::Ridge if self.binary => 0.5,
            Model::Ridge => {
                // Residual variance with one pseudo-observation of variance 1 (so that a
                // fresh arm explores): (1 + yy - b'theta) / (1 + n).
                let rss = (arm.yy - dot(&arm.b, &arm.theta)).max(0.0);
                ((1.0 + rss) / (1.0 + arm.n)).sqrt()
            }
        }
    }

    /// Estimate (link scale) and standard error at x of the arms in `ids` into self.mu /
    /// self.se.
    fn score_all(&mut self, x: &[f64], ids: &[usize]) {
        let n = self.arms.len();
        let stride = theta_stride(self.d);
        self.mu.resize(n, 0.0);
        self.se.resize(n, 0.0);
        self.xp.resize(tri_block(self.d) + 8);
        kernels::pack_outer(x, &mut self.xp, self.avx2);
        self.xd.resize(stride);
        self.xd[..x.len()].copy_from_slice(x);
        self.backwards = !self.backwards;
        let inputs = kernels::ScoreInputs {
            tri: &self.tri,
            block: tri_block(self.d),
            thetas: &self.thetas,
            stride,
            x: &self.xd,
            sig: &self.sig,
            ids,
            xp: &self.xp,
            backwards: self.backwards,
        };
        kernels::score_all(&inputs, &mut self.mu, &mut self.se, self.avx2);
        if self.inflation != 1.0 {
            let grow = self.inflation.sqrt();
            let prior = (dot(x, x) / self.ridge).sqrt();
            for &a in ids {
                self.se[a] = (self.se[a] * grow).min(self.sig[a] * prior);
            }
        }
    }

    /// Sets the variance inflation of discounting (>= 1; see the field).
    pub fn set_inflation(&mut self, c: f64) -> Result<(), CoreError> {
        if !(c.is_finite() && c >= 1.0) {
            return Err(CoreError::invalid(format!(
                "variance inflation must be a finite number >= 1, got {c}"
            )));
        }
        self.inflation = c;
        Ok(())
    }

    /// Standard error with the inflation, capped at the prior's.
    fn inflated(&self, se: f64, sigma: f64, xx: f64) -> f64 {
        if self.inflation == 1.0 {
            return se;
        }
        (se * self.inflation.sqrt()).min(sigma * (xx / self.ridge).sqrt())
    }

    /// Discounting's periodic rescale: stored weights are multiplied by f (the data part of
    /// every arm's precision, b, n and yy), and the ridge prior, which decayed with the
    /// stored weights since the last rescale, is restored: A' = f (A - ridge I) + ridge I.
    fn rescale(&mut self, f: f64) -> Result<(), CoreError> {
        let d = self.d;
        let lam = self.ridge;
        for a in 0..self.arms.len() {
            let arm = &mut self.arms[a];
            let mut h = cholesky_inverse(&arm.m, d)?;
            for i in 0..d {
                for j in 0..d {
                    let prior = if i == j { lam } else { 0.0 };
                    h[i * d + j] = f * (h[i * d + j] - prior) + prior;
                }
            }
            arm.m = cholesky_inverse(&h, d)?;
            arm.b.iter_mut().for_each(|v| *v *= f);
            arm.n *= f;
            arm.yy *= f;
            if self.model == Model::Ridge {
                let m = &arm.m;
                for (j, t) in arm.theta.iter_mut().enumerate() {
                    *t = dot(&m[j * d..(j + 1) * d], &arm.b);
                }
            }
            arm.drift = 0;
            self.refresh(a);
        }
        self.version += 1;
        Ok(())
    }

    /// The reported score: a probability for binary rewards.
    fn report(&self, mu: f64) -> f64 {
        match self.model {
            Model::Logistic => sigmoid(mu),
            Model::Ridge if self.binary => mu.clamp(0.0, 1.0),
            Model::Ridge => mu,
        }
    }

    pub fn predict(&self, arm: usize, x: &[f64]) -> Result<(f64, f64), CoreError> {
        self.check_arm(arm)?;
        self.check_x(x)?;
        let a = &self.arms[arm];
        let mut u = vec![0.0; self.d];
        a.m_times(self.d, x, &mut u);
        let sigma = self.sigma(a);
        let se = self.inflated(sigma * dot(x, &u).max(0.0).sqrt(), sigma, dot(x, x));
        Ok((dot(&a.theta, x), se))
    }

    pub fn coefficients(&self, arm: usize) -> Result<(Vec<f64>, Vec<f64>), CoreError> {
        self.check_arm(arm)?;
        let a = &self.arms[arm];
        let s = self.sigma(a);
        let se = (0..self.d)
            .map(|i| self.inflated(s * a.m[i * self.d + i].max(0.0).sqrt(), s, 1.0))
            .collect();
        Ok((a.theta.clone(), se))
    }

    pub fn choose<R: Rng>(
        &mut self,
        rng: &mut R,
        x: &[f64],
        k: usize,
    ) -> Result<Choice, CoreError> {
        self.check_x(x)?;
        let mut active = std::mem::take(&mut self.ids);
        active.clear();
        active.extend((0..self.arms.len()).filter(|&a| self.active[a]));
        let mut scored = std::mem::take(&mut self.scored);
        let result = self.choose_among(rng, x, k, &active, &mut scored);
        self.ids = active;
        self.scored = scored;
        result
    }

    fn choose_among<R: Rng>(
        &mut self,
        rng: &mut R,
        x: &[f64],
        k: usize,
        active: &[usize],
        scored: &mut Vec<(f64, usize)>,
    ) -> Result<Choice, CoreError> {
        if k == 0 || k > active.len() {
            return Err(CoreError::invalid(format!(
                "k = {k} but the experiment has {} active arms",
                active.len()
            )));
        }
        self.score_all(x, active);
        let n_active = active.len() as f64;
        let random = self.floor > 0.0 && rng.random::<f64>() < self.floor;
        // The policy's scores (also drawn when the floor decides, so the random stream does
        // not depend on which branch ran).
        scored.clear();
        match self.mode {
            Mode::Ucb => scored.extend(
                active
                    .iter()
                    .map(|&a| (self.mu[a] + self.alpha * self.se[a], a)),
            ),
            Mode::Thompson => scored.extend(
                active
                    .iter()
                    .map(|&a| (self.mu[a] + self.se[a] * sampling::normal(rng), a)),
            ),
        }
        let chosen: Vec<usize> = if random {
            let mut pool = active.to_vec();
            let mut out = Vec::with_capacity(k);
            for i in 0..k {
                let j = rng.random_range(i..pool.len());
                pool.swap(i, j);
                out.push(pool[i]);
            }
            out
        } else if k == 1 {
            let mut best = scored[0];
            for &p in &scored[1..] {
                if p.0.total_cmp(&best.0).is_gt() {
                    best = p;
                }
            }
            if self.mode == Mode::Ucb {
                // Ties at the top are broken uniformly at random (the stated rule behind the
                // exact propensity).
                let tied = scored.iter().filter(|p| p.0 == best.0).count();
                if tied > 1 {
                    let j = rng.random_range(0..tied);
                    best = *scored
                        .iter()
                        .filter(|p| p.0 == best.0)
                        .nth(j)
                        .expect("j < tied");
                }
            }
            vec![best.1]
        } else {
            let kth = k - 1;
            scored.select_nth_unstable_by(kth, |p, q| q.0.total_cmp(&p.0));
            let mut top: Vec<(f64, usize)> = scored[..k].to_vec();
            if self.mode == Mode::Ucb {
                // Ties at the k-th score are broken uniformly at random.
                let threshold = top.iter().map(|p| p.0).fold(f64::INFINITY, f64::min);
                let tied: Vec<usize> = scored
                    .iter()
                    .filter(|p| p.0 == threshold)
                    .map(|p| p.1)
                    .collect();
                if tied.len() > top.iter().filter(|p| p.0 == threshold).count() {
                    let above: Vec<(f64, usize)> =
                        top.iter().filter(|p| p.0 > threshold).copied().collect();
                    let mut pool = tied;
                    let need = k - above.len();
                    for i in 0..need {
                        let j = rng.random_range(i..pool.len());
                        pool.swap(i, j);
                    }
                    top = above;
                    top.extend(pool[..need].iter().map(|&a| (threshold, a)));
                }
            }
            top.sort_by(|p, q| q.0.total_cmp(&p.0));
            top.iter().map(|p| p.1).collect()
        };
        let policy_p = self.policy_propensities(rng, active, &chosen, k);
        let uniform = k as f64 / n_active;
        let propensities = policy_p
            .iter()
            .map(|&p| (1.0 - self.floor) * p + self.floor * uniform)
            .collect();
        let scores = chosen.iter().map(|&a| self.report(self.mu[a])).collect();
        Ok(Choice {
            arms: chosen,
            scores,
            propensities,
        })
    }

    /// P(arm in the policy's slate) for each chosen arm (before the floor's mixing).
    fn policy_propensities<R: Rng>(
        &mut self,
        rng: &mut R,
        active: &[usize],
        chosen: &[usize],
        k: usize,
    ) -> Vec<f64> {
        match self.mode {
            Mode::Ucb => {
                let (mu, se, alpha) = (&self.mu, &self.se, self.alpha);
                let ucb = |a: usize| mu[a] + alpha * se[a];
                let scores = &mut self.values;
                scores.clear();
                scores.extend(active.iter().map(|&a| ucb(a)));
                let threshold = if k == 1 {
                    scores.iter().copied().fold(f64::NEG_INFINITY, f64::max)
                } else {
                    *scores
                        .select_nth_unstable_by(k - 1, |p, q| q.total_cmp(p))
                        .1
                };
                let above = scores.iter().filter(|&&s| s > threshold).count();
                let tied = scores.iter().filter(|&&s| s == threshold).count();
                chosen
                    .iter()
                    .map(|&a| {
                        let s = ucb(a);
                        if s > threshold {
                            1.0
                        } else if s == threshold {
                            (k - above) as f64 / tied as f64
                        } else {
                            0.0
                        }
                    })
                    .collect()
            }
            Mode::Thompson if k == 1 => {
                vec![win_probability_in(
                    &mut self.win,
                    chosen[0],
                    active,
                    &self.mu,
                    &self.se,
                    self.avx2,
                )]
            }
            Mode::Thompson => {
                // Slates: Monte Carlo inclusion probabilities (standard error <= 0.5/sqrt(n)).
                const DRAWS: usize = 2_000;
                let mut hits = vec![0usize; chosen.len()];
                let mut draws: Vec<(f64, usize)> = Vec::with_capacity(active.len());
                for _ in 0..DRAWS {
                    draws.clear();
                    draws.extend(
                        active
                            .iter()
                            .map(|&a| (self.mu[a] + self.se[a] * sampling::normal(rng), a)),
                    );
                    draws.select_nth_unstable_by(k - 1, |p, q| q.0.total_cmp(&p.0));
                    for (h, &c) in hits.iter_mut().zip(chosen) {
                        if draws[..k].iter().any(|p| p.1 == c) {
                            *h += 1;
                        }
                    }
                }
                // Never 0 for an arm that was chosen: at least half a draw.
                hits.iter()
                    .map(|&h| (h as f64).max(0.5) / DRAWS as f64)
                    .collect()
            }
        }
    }

    /// Applies observation items: per item A += w x x', b += wy x, n += w, yy += wyy (ridge);
    /// logistic: one Newton step of the Laplace approximation per item.
    pub fn update(
        &mut self,
        arms: &[usize],
        xs: &[f64],
        w: &[f64],
        wy: &[f64],
        wyy: &[f64],
    ) -> Result<(), CoreError> {
        let d = self.d;
        let n = arms.len();
        if xs.len() != n * d || w.len() != n || wy.len() != n || wyy.len() != n {
            return Err(CoreError::invalid(format!(
                "update of {n} items needs {} feature values ({d} each) and {n} weights, got {}, {}, {}, {}",
                n * d,
                xs.len(),
                w.len(),
                wy.len(),
                wyy.len()
            )));
        }
        for (i, &a) in arms.iter().enumerate() {
            if a == RESCALE_ITEM {
                if !(w[i] > 0.0 && w[i] <= 1.0) {
                    return Err(CoreError::invalid(format!(
                        "update item {i}: a rescale needs a factor in (0, 1], got {}",
                        w[i]
                    )));
                }
                continue;
            }
            self.check_arm(a)?;
            self.check_x(&xs[i * d..(i + 1) * d])?;
            if !(w[i].is_finite() && w[i] >= 0.0 && wy[i].is_finite() && wyy[i].is_finite()) {
                return Err(CoreError::invalid(format!(
                    "update item {i}: weight {} must be finite and >= 0, wy {} and wyy {} finite",
                    w[i], wy[i], wyy[i]
                )));
            }
        }
        let block = tri_block(d);
        let avx2 = self.avx2;
        let model = self.model;
        let mut u = std::mem::take(&mut self.u);
        u.resize(d, 0.0);
        for (i, &a) in arms.iter().enumerate() {
            if a == RESCALE_ITEM {
                self.rescale(w[i])?;
                continue;
            }
            let x = &xs[i * d..(i + 1) * d];
            let arm = &mut self.arms[a];
            let tri = &mut self.tri[a * block..(a + 1) * block];
            // u = M x; M' = M - c u u' / (1 + c x'u) (Sherman–Morrison), so M' x = u / (1 + c x'u).
            let xu = kernels::sym_times(&arm.m, x, &mut u, avx2);
            match model {
                Model::Ridge => {
                    // theta' = M' b' with b' = b + wy x: theta + u (wy - w x'theta) / (1 + w x'u).
                    let denom = 1.0 + w[i] * xu;
                    let g = (wy[i] - w[i] * dot(x, &arm.theta)) / denom;
                    if w[i] > 0.0 {
                        kernels::rank_one_pack(&mut arm.m, d, w[i] / denom, &u, tri, avx2);
                        arm.n += w[i];
                    }
                    for (bj, &xj) in arm.b.iter_mut().zip(x) {
                        *bj += wy[i] * xj;
                    }
                    arm.yy += wyy[i];
                    arm.drift += 1;
                    if arm.drift >= RESYNC {
                        arm.drift = 0;
                        let m = &arm.m;
                        for (j, t) in arm.theta.iter_mut().enumerate() {
                            *t = dot(&m[j * d..(j + 1) * d], &arm.b);
                        }
                    } else {
                        for (t, &uj) in arm.theta.iter_mut().zip(&u) {
                            *t += g * uj;
                        }
                    }
                }
                Model::Logistic => {
                    let p = sigmoid(dot(&arm.theta, x));
                    let mut shrink = 1.0;
                    if w[i] > 0.0 {
                        let c = w[i] * (p * (1.0 - p)).max(1e-6);
                        let denom = 1.0 + c * xu;
                        kernels::rank_one_pack(&mut arm.m, d, c / denom, &u, tri, avx2);
                        arm.n += w[i];
                        shrink = 1.0 / denom;
                    }
                    // theta += M' x (gradient of the new or changed observation).
                    let g = (wy[i] - w[i] * p) * shrink;
                    for (t, &uj) in arm.theta.iter_mut().zip(&u) {
                        *t += g * uj;
                    }
                    arm.yy += wyy[i];
                }
            }
            let stride = theta_stride(d);
            self.thetas[a * stride..a * stride + d].copy_from_slice(&self.arms[a].theta);
            self.sig[a] = self.sigma(&self.arms[a]);
        }
        self.u = u;
        self.version += 1;
        Ok(())
    }

    /// Refits one arm's logistic model by Newton's method (IRLS) on the given observations
    /// (rows of xs, labels in [0, 1], weights >= 0) with the L2 penalty; returns iterations.
    pub fn refit_logistic(
        &mut self,
        arm: usize,
        xs: &[f64],
        ys: &[f64],
        weights: &[f64],
        iterations: usize,
    ) -> Result<usize, CoreError> {
        if self.model != Model::Logistic {
            return Err(CoreError::invalid("refit_logistic needs a logistic model"));
        }
        self.check_arm(arm)?;
        let d = self.d;
        let n = ys.len();
        if xs.len() != n * d || weights.len() != n {
            return Err(CoreError::invalid(format!(
                "refit of {n} observations needs {} feature values and {n} weights, got {} and {}",
                n * d,
                xs.len(),
                weights.len()
            )));
        }
        for i in 0..n {
            self.check_x(&xs[i * d..(i + 1) * d])?;
            if !((0.0..=1.0).contains(&ys[i]) && weights[i].is_finite() && weights[i] >= 0.0) {
                return Err(CoreError::invalid(format!(
                    "observation {i}: label {} must be in [0, 1] and weight {} finite and >= 0",
                    ys[i], weights[i]
                )));
            }
        }
        let mut theta = vec![0.0; d];
        let mut h = vec![0.0; d * d];
        let mut g = vec![0.0; d];
        let mut used = 0;
        for it in 0..iterations.max(1) {
            used = it + 1;
            h.iter_mut().for_each(|v| *v = 0.0);
            for i in 0..d {
                h[i * d + i] = self.ridge;
                g[i] = -self.ridge * theta[i];
            }
            for r in 0..n {
                let x = &xs[r * d..(r + 1) * d];
                let p = sigmoid(dot(&theta, x));
                let c = weights[r] * (p * (1.0 - p)).max(1e-9);
                let e = weights[r] * (ys[r] - p);
                for i in 0..d {
                    g[i] += e * x[i];
                    let ci = c * x[i];
                    if ci != 0.0 {
                        let row = &mut h[i * d..(i + 1) * d];
                        for (hj, &xj) in row.iter_mut().zip(x).skip(i) {
                            *hj += ci * xj;
                        }
                    }
                }
            }
            symmetrise_upper(&mut h, d);
            let step = cholesky_solve(&h, d, &g)?;
            let mut largest: f64 = 0.0;
            for (t, s) in theta.iter_mut().zip(&step) {
                *t += s;
                largest = largest.max(s.abs());
            }
            if largest < 1e-8 {
                break;
            }
        }
        // Laplace: covariance = inverse Hessian at the optimum.
        h.iter_mut().for_each(|v| *v = 0.0);
        for i in 0..d {
            h[i * d + i] = self.ridge;
        }
        let mut total = 0.0;
        for r in 0..n {
            let x = &xs[r * d..(r + 1) * d];
            let p = sigmoid(dot(&theta, x));
            let c = weights[r] * (p * (1.0 - p)).max(1e-9);
            total += weights[r];
            for i in 0..d {
                let ci = c * x[i];
                if ci != 0.0 {
                    for j in i..d {
                        h[i * d + j] += ci * x[j];
                    }
                }
            }
        }
        symmetrise_upper(&mut h, d);
        let m = cholesky_inverse(&h, d)?;
        let a = &mut self.arms[arm];
        a.m = m;
        a.theta = theta;
        a.n = total;
        a.drift = 0;
        self.refresh(arm);
        self.version += 1;
        Ok(used)
    }

    pub fn check_refit(&self, arm: usize) -> Result<(), CoreError> {
        if self.model != Model::Logistic {
            return Err(CoreError::invalid("refit_logistic needs a logistic model"));
        }
        self.check_arm(arm)
    }

    /// A one-arm copy of `arm` (a refit runs on it outside the lock).
    pub fn detached_arm(&self, arm: usize) -> Linear {
        let block = tri_block(self.d);
        let stride = theta_stride(self.d);
        Linear {
            arms: vec![self.arms[arm].clone()],
            active: vec![true],
            tri: Aligned::from_slice(&self.tri[arm * block..(arm + 1) * block]),
            thetas: Aligned::from_slice(&self.thetas[arm * stride..(arm + 1) * stride]),
            sig: vec![self.sig[arm]],
            mu: Vec::new(),
            se: Vec::new(),
            xp: Aligned::default(),
            xd: Aligned::default(),
            u: Vec::new(),
            ids: Vec::new(),
            scored: Vec::new(),
            values: Vec::new(),
            win: WinScratch::default(),
            ..*self
        }
    }

    /// Takes arm 0 of `copy` as `arm` (refused when the features changed meanwhile).
    pub fn adopt_arm(&mut self, arm: usize, copy: &Linear) -> Result<(), CoreError> {
        self.check_arm(arm)?;
        if copy.d != self.d {
            return Err(CoreError::invalid(
                "the feature definition changed during the refit; the refit is discarded",
            ));
        }
        self.arms[arm] = copy.arms[0].clone();
        self.refresh(arm);
        self.version += 1;
        Ok(())
    }

    /// Every arm's model as bytes (little-endian f64): n, yy, theta, b, m per arm.
    pub fn state(&self) -> Vec<u8> {
        let d = self.d;
        let mut out = Vec::with_capacity(16 + self.arms.len() * 8 * (2 + 2 * d + d * d));
        out.extend_from_slice(b"BDLN");
        out.extend_from_slice(&(d as u32).to_le_bytes());
        out.extend_from_slice(&(self.arms.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.model as u32).to_le_bytes());
        for a in &self.arms {
            for v in [a.n, a.yy].iter().chain(&a.theta).chain(&a.b).chain(&a.m) {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        out
    }

    pub fn load_state(&mut self, data: &[u8]) -> Result<(), CoreError> {
        let d = self.d;
        let bad = |why: String| CoreError::invalid(format!("model state not loaded: {why}"));
        if data.len() < 16 || &data[..4] != b"BDLN" {
            return Err(bad("not a banditd model state".into()));
        }
        let word = |i: usize| u32::from_le_bytes(data[i..i + 4].try_into().unwrap()) as usize;
        let (sd, sn, sm) = (word(4), word(8), word(12));
        if sd != d || sm != self.model as usize {
            return Err(bad(format!(
                "it has {sd} features and model kind {sm}, this model {d} and {}",
                self.model as usize
            )));
        }
        let per = 2 + 2 * d + d * d;
        if sn > self.arms.len() || data.len() != 16 + sn * per * 8 {
            return Err(bad(format!(
                "{} bytes for {sn} arms of {d} features (the model has {} arms)",
                data.len(),
                self.arms.len()
            )));
        }
        let values: Vec<f64> = data[16..]
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        if values.iter().any(|v| !v.is_finite()) {
            return Err(bad("it holds a value that is not finite".into()));
        }
        for (a, chunk) in values.chunks_exact(per).enumerate() {
            let arm = &mut self.arms[a];
            arm.n = chunk[0];
            arm.yy = chunk[1];
            arm.theta.copy_from_slice(&chunk[2..2 + d]);
            arm.b.copy_from_slice(&chunk[2 + d..2 + 2 * d]);
            arm.m.copy_from_slice(&chunk[2 + 2 * d..]);
            arm.drift = 0;
            self.refresh(a);
        }
        self.version += 1;
        Ok(())
    }
}

fn symmetrise_upper(h: &mut [f64], d: usize) {
    for i in 0..d {
        for j in 0..i {
            h[i * d + j] = h[j * d + i];
        }
    }
}

/// Lower Cholesky factor of a symmetric positive definite matrix.
fn cholesky(a: &[f64], d: usize) -> Result<Vec<f64>, CoreError> {
    let mut l = vec![0.0; d * d];
    for i in 0..d {
        for j in 0..=i {
            let s = a[i * d + j] - dot(&l[i * d..i * d + j], &l[j * d..j * d + j]);
            if i == j {
                if !(s > 0.0 && s.is_finite()) {
                    return Err(CoreError::invalid(
                        "the model's precision matrix is not positive definite (numerical breakdown)",
                    ));
                }
                l[i * d + i] = s.sqrt();
            } else {
                l[i * d + j] = s / l[j * d + j];
            }
        }
    }
    Ok(l)
}

fn cholesky_solve(a: &[f64], d: usize, rhs: &[f64]) -> Result<Vec<f64>, CoreError> {
    let l = cholesky(a, d)?;
    let mut y = vec![0.0; d];
    for i in 0..d {
        y[i] = (rhs[i] - dot(&l[i * d..i * d + i], &y[..i])) / l[i * d + i];
    }
    let mut x = vec![0.0; d];
    for i in (0..d).rev() {
        let mut s = y[i];
        for j in i + 1..d {
            s -= l[j * d + i] * x[j];
        }
        x[i] = s / l[i * d + i];
    }
    Ok(x)
}

fn cholesky_inverse(a: &[f64], d: usize) -> Result<Vec<f64>, CoreError> {
    let mut inv = vec![0.0; d * d];
    let mut e = vec![0.0; d];
    for c in 0..d {
        e.iter_mut().for_each(|v| *v = 0.0);
        e[c] = 1.0;
        let col = cholesky_solve(a, d, &e)?;
        for r in 0..d {
            inv[r * d + c] = col[r];
        }
    }
    symmetrise_upper(&mut inv, d);
    Ok(inv)
}

/// Scratch of `win_probability`: the rivals as structure-of-arrays, the narrow ones and the
/// grid's refinements.
#[derive(Default)]
struct WinScratch {
    /// Rival b's centre (mu_b - mu_a) / se_a and inverse relative width se_a / se_b, padded
    /// to a multiple of 4 with rivals that never compete.
    c: Vec<f64>,
    inv_r: Vec<f64>,
    /// (where the grid must be fine, its spacing there) for rivals narrower than a.
    narrow: Vec<(f64, f64)>,
    grid: Grid,
}

/// Width (in nodes) of a refinement's tanh blend, and how many widths each side it takes.
const BLEND: f64 = 2.0;
const BLEND_REACH: f64 = 3.0;

/// A smoothly graded grid t(s), s = 0, +-1, +-2, ...: the spacing -dt/ds is
/// h(s) = h0 + sum_k delta_k S((s - s_k) / BLEND), S(u) = (1 + tanh u) / 2, each refinement
/// k a smooth step from one spacing to a finer one (delta_k < 0). t(s) is analytic, so the
/// trapezoidal rule in s, sum_j h(j) g(t(j)), keeps its geometric convergence across
/// refinements (where a sudden change of step would cost an end correction's error).
#[derive(Default)]
struct Grid {
    top: f64,
    h0: f64,
    /// (s_k, delta_k, L(-s_k / BLEND)) with L(u) = (u + ln cosh u) / 2, an antiderivative of S.
    steps: Vec<(f64, f64, f64)>,
}

/// (S(u), L(u)) with S = (1 + tanh u) / 2 and L = (u + ln cosh u) / 2 (L' = S).
#[inline]
fn blend(u: f64) -> (f64, f64) {
    let a = u.abs();
    if a > 12.0 {
        let s = if u > 0.0 { 1.0 } else { 0.0 };
        return (s, 0.5 * (u + a - std::f64::consts::LN_2));
    }
    let e = (-2.0 * a).exp();
    let th = (1.0 - e) / (1.0 + e);
    let s = 0.5 * (1.0 + if u > 0.0 { th } else { -th });
    (s, 0.5 * (u + a + e.ln_1p() - std::f64::consts::LN_2))
}

impl Grid {
    fn reset(&mut self, top: f64, h0: f64) {
        self.top = top;
        self.h0 = h0;
        self.steps.clear();
    }

    /// (t(s), h(s)).
    fn at(&self, s: f64) -> (f64, f64) {
        let mut t = self.top - self.h0 * s;
        let mut h = self.h0;
        for &(sk, dk, ck) in &self.steps {
            let (sv, lv) = blend((s - sk) / BLEND);
            t -= dk * BLEND * (lv - ck);
            h += dk * sv;
        }
        (t, h)
    }

    /// The spacing after every refinement so far.
    fn finest(&self) -> f64 {
        self.h0 + self.steps.iter().map(|p| p.1).sum::<f64>()
    }

    /// Refines the spacing to `h` so that the blend is over (to 1 - e^-6) where t reaches `at`.
    fn refine(&mut self, h: f64, at: f64) {
        let from = self.finest();
        // The blend covers about BLEND_REACH * BLEND * (from + h) of t before it is done.
        let start = at + BLEND_REACH * BLEND * (from + h);
        // Newton on t(s) = start (t falls with slope -h(s)).
        let mut s = (self.top - start) / from;
        for _ in 0..50 {
            let (t, hs) = self.at(s);
            let ds = (t - start) / hs;
            s += ds;
            if ds.abs() < 1e-9 {
                break;
            }
        }
        let sk = s + BLEND_REACH * BLEND;
        self.steps.push((sk, h - from, blend(-sk / BLEND).1));
    }
}

/// P(arm `a`'s draw is the largest) for independent normal draws N(mu, se^2) of `active` arms.
pub fn win_probability(a: usize, active: &[usize], mu: &[f64], se: &[f64]) -> f64 {
    win_probability_in(
        &mut WinScratch::default(),
        a,
        active,
        mu,
        se,
        avx2_available(),
    )
}

/// Integrates phi(t) F(t), F(t) = prod_b Phi((t - c_b) / r_b) with c_b = (mu_b - mu_a) / se_a
/// and r_b = se_b / se_a, by the trapezoidal rule on a grid (`Grid`) walked both ways from
/// where the highest rival is 4 of its widths above its mean.
///
/// The integrand is smooth and negligible at both ends of the walk, where the trapezoidal
/// rule converges geometrically: a spacing of 0.25 gives ~1e-9 for 100 similar arms
/// (Simpson's rule needs 0.1 for that); fewer rivals allow up to 0.5 (the spacing scales with
/// (ln 128 / ln n)^0.75). Rival b's factor rises from 0 to 1 on [c_b - 8.3 r_b, c_b + 7 r_b]
/// (Phi(-8.3) = 5e-17, 1 - Phi(7) = 1.3e-12): below the highest lower end (lo) F ~ 0, above
/// the highest rise (hi) F = 1. Downward, F only grows with t, so the integral below t is at
/// most F(t) Phi(t): the walk stops once that is below 1e-10 of the sum so far. Upward, F is
/// evaluated until (1 - F(t)) (1 - Phi(t)) is below 1e-10 of the sum, then phi alone until
/// it is negligible. Rivals narrower than a need a finer grid: down to 0.4 se_a one uniformly
/// finer spacing, below that a grid refined (smoothly, in levels of 1.5) to ~0.25 r_b from
/// c_b + 8 r_b down, coarsening upward by at most 1/5 of the distance. Against a fine
/// quadrature with exact Phi the relative error stays below ~1e-7 down to p = 1e-9 (ignored
/// tests `win_probability_accuracy_*`). Rivals that cannot exceed a's lowest plausible draw
/// are skipped; the rest are evaluated 4 at a time (`linear_kernels::cdf_product2`, two
/// nodes per call).
fn win_probability_in(
    s: &mut WinScratch,
    a: usize,
    active: &[usize],
    mu: &[f64],
    se: &[f64],
    avx2: bool,
) -> f64 {
    const REACH: f64 = 8.3;
    const RISE: f64 = 7.0;
    // Grid spacing (in units of se_a) for 128 similar rivals, and at most (fewer rivals).
    const STEP: f64 = 0.25;
    const MAX_STEP: f64 = 0.5;
    const STOP: f64 = 1e-10;
    // Rivals narrower than 1.5^-0.7 of a need a finer grid: a uniformly finer one down to
    // MILD, refinements below.
    const NARROW: f64 = 0.7529;
    const MILD: f64 = 0.4;
    // A narrow rival's spacing is in place from c + 8 r down, and above that the spacing
    // grows by at most 1/5 of the distance: a coarse grid (or a quick change of spacing)
    // close to a narrow rival's rise leaves errors of 1e-5 and more, as the grid's map,
    // continued into the complex plane, reaches the rise.
    const FINE_FROM: f64 = 8.0;
    const KAPPA: f64 = 5.0;
    let table = CdfTable::get();
    let (ma, sa) = (mu[a], se[a].max(1e-300));
    let inv_sa = 1.0 / sa;
    let floor_a = ma - REACH * sa;
    s.c.clear();
    s.inv_r.clear();
    s.narrow.clear();
    let mut lo = -REACH;
    let mut hi = -REACH;
    // The walk starts where the highest rival is 4 of its widths above its mean, and runs
    // both ways from there.
    let mut start = -REACH;
    for &b in active {
        // Competitors that can exceed a's lowest plausible draw.
        let competes = mu[b] + REACH * se[b] > floor_a;
        if b == a || !competes {
            continue;
        }
        // Narrower than 1e-6 of a is a step for all purposes (and keeps the grid's nodes
        // apart in floating point).
        let r = se[b] * inv_sa;
        let r = if r > 1e-6 { r } else { 1e-6 };
        let c = (mu[b] - ma) * inv_sa;
        // (Plain comparisons: f64::max's NaN handling costs more than the rest of the loop.)
        let (bottom, top, mid) = (c - REACH * r, c + RISE * r, c + 4.0 * r);
        lo = if bottom > lo { bottom } else { lo };
        hi = if top > hi { top } else { hi };
        start = if mid > start { mid } else { start };
        s.c.push(c);
        s.inv_r.push(1.0 / r);
        if r < NARROW {
            s.narrow.push((c + FINE_FROM * r, r));
        }
    }
    if s.c.is_empty() {
        return 1.0;
    }
    let hi = hi.min(REACH);
    if lo >= hi {
        // Below lo some rival is certainly above a; above hi every rival is below.
        return if lo >= REACH {
            f64::MIN_POSITIVE
        } else {
            table.cdf(-hi)
        };
    }
    // The maximum of many similar draws is sharper: the spacing shrinks with the number of
    // rivals, (ln 128 / ln n)^0.75 (up to MAX_STEP with few, 0.25 at 128; a grid refined for
    // narrow rivals starts from 0.25).
    let rivals = s.c.len() as f64;
    s.narrow.retain(|p| p.0 > lo);
    let cap = if s.narrow.is_empty() { MAX_STEP } else { STEP };
    let q = 128f64.ln() / rivals.max(2.0).ln();
    let mut base = (STEP * q.sqrt() * q.sqrt().sqrt()).min(cap);
    // Rivals at most ~2.5x narrower than a: one finer spacing for the whole grid (as fine as
    // the narrowest needs) is cheaper than refining where they rise.
    let narrowest = s.narrow.iter().map(|p| p.1).fold(1.0, f64::min);
    if !s.narrow.is_empty() && narrowest >= MILD {
        base = base.min(STEP / NARROW * narrowest);
        s.narrow.clear();
    }
    while !s.c.len().is_multiple_of(4) {
        s.c.push(-1e300);
        s.inv_r.push(1.0);
    }
    // Spacing levels base / 1.5^m; a rival of relative width r needs m >= log_1.5(1/r) - 0.3
    // (spacing at most ~0.3 r; below NARROW = 1.5^-0.7, m >= 1).
    let level = |r: f64| base * 1.5f64.powi(-(((1.0 / r).ln() / 1.5f64.ln() + 0.3).floor() as i32));
    for p in s.narrow.iter_mut() {
        p.1 = level(p.1);
    }
    let start = start.clamp(lo, hi);
    let grid = &mut s.grid;
    grid.reset(start, base);
    let mut spacing = base;
    loop {
        // Below `from` a rival needs its level, above it the spacing may grow by 1/kappa of
        // the distance: the next level is due where the first such cone falls below it.
        let due = s
            .narrow
            .iter()
            .filter(|p| p.1 < spacing * 0.999)
            .map(|p| p.0 + KAPPA * (spacing - p.1))
            .fold(f64::NEG_INFINITY, f64::max);
        if due <= lo {
            break;
        }
        spacing /= 1.5;
        grid.refine(spacing, due);
    }
    let grid = &s.grid;
    let inv_sqrt_2pi = 1.0 / (2.0 * std::f64::consts::PI).sqrt();
    let (c, inv_r) = (&s.c[..], &s.inv_r[..]);
    // F at two nodes per call (with few rivals one F alone is latency bound); a walk may
    // evaluate one node past where it stops.
    let nodes = |t0: f64, t1: f64| kernels::cdf_product2(table, [t0, t1], c, inv_r, avx2);
    let phi = |t: f64| (-0.5 * t * t).exp() * inv_sqrt_2pi;
    // An upper bound of Phi(t) given phi(t) (Mills' ratio: Phi(t) < phi(t) / -t for t < 0),
    // enough for the stopping rules and cheaper than Phi.
    let lower_tail = |t: f64, density: f64| {
        if t < -1.0 {
            density / -t
        } else {
            1.0
        }
    };
    // On a grid without refinements phi follows t = start -+ j base by two products per node:
    // phi(t -+ h) = phi(t) e^(+-t h) e^(-h^2 / 2), and e^(+-t h) changes by e^(-h^2).
    let uniform = grid.steps.is_empty();
    let (half, full) = ((-0.5 * base * base).exp(), (-base * base).exp());
    // Downward from the grid's top (start), where most of the integral lies.
    let mut above = None;
    let mut sum = 0.0;
    let mut j = 0.0;
    let (mut density, mut ratio) = (phi(start), (start * base).exp() * half);
    'down: loop {
        let (ta, ha) = grid.at(j);
        let (tb, hb) = grid.at(j + 1.0);
        let f = nodes(ta, tb);
        // p >= (1 - Phi(start)) F(start): the scale for the stopping rule.
        let above = *above.get_or_insert(table.cdf(-start) * f[0]);
        for (k, (t, h)) in [(ta, ha), (tb, hb)].into_iter().enumerate() {
            if t <= lo {
                break 'down;
            }
            if j + k as f64 > 0.0 {
                if uniform {
                    density *= ratio;
                    ratio *= full;
                } else {
                    density = phi(t);
                }
            }
            sum += h * f[k] * density;
            if f[k] * lower_tail(t, density) < STOP * (sum + above) {
                break 'down;
            }
        }
        j += 2.0;
    }
    // Upward: F until what it still lacks of 1 is negligible there ((1 - F) only shrinks
    // upward, so the rest of the integral is off by at most (1 - F(t)) (1 - Phi(t))), then
    // phi alone until it is negligible.
    let mut with_f = true;
    let mut pending: Option<f64> = None;
    let mut j = -1.0;
    let (mut density, mut ratio) = (phi(start), (-start * base).exp() * half);
    loop {
        let (t, h) = grid.at(j);
        if uniform {
            density *= ratio;
            ratio *= full;
        } else {
            density = phi(t);
        }
        let mut g = h * density;
        if with_f && t < hi {
            let f = match pending.take() {
                Some(f) => f,
                None => {
                    let f = nodes(t, grid.at(j - 1.0).0);
                    pending = Some(f[1]);
                    f[0]
                }
            };
            g *= f;
            with_f = (1.0 - f) * lower_tail(-t, density) >= STOP * (sum + g);
        }
        sum += g;
        if (t > 0.0 && g < 1e-14 * sum) || t > 40.0 {
            break;
        }
        j -= 1.0;
    }
    sum.clamp(f64::MIN_POSITIVE, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_xoshiro::Xoshiro256PlusPlus;

    fn features(rng: &mut Xoshiro256PlusPlus, d: usize) -> Vec<f64> {
        let mut x: Vec<f64> = (0..d).map(|_| sampling::normal(rng)).collect();
        x[0] = 1.0;
        x
    }

    #[test]
    fn discounting_with_a_rescale_equals_a_discounted_refit() {
        // Stored weights d^-s, then a rescale by d^t: the same model as the ridge solution on
        // weights d^(t-s) with the full prior.
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(9);
        let (d, n, disc, ridge) = (4, 120, 0.97f64, 1.5);
        let mut lin = Linear::new(Model::Ridge, Mode::Ucb, false, 1.96, ridge, 0.0).unwrap();
        lin.set_dimension(d).unwrap();
        lin.add_arms(1).unwrap();
        let mut a = vec![0.0; d * d];
        let mut b = vec![0.0; d];
        for i in 0..d {
            a[i * d + i] = ridge;
        }
        for s in 0..n {
            let x = features(&mut rng, d);
            let y = sampling::normal(&mut rng);
            let w = disc.powi(-s);
            lin.update(&[0], &x, &[w], &[w * y], &[w * y * y]).unwrap();
            let v = disc.powi(n - s);
            for i in 0..d {
                b[i] += v * y * x[i];
                for j in 0..d {
                    a[i * d + j] += v * x[i] * x[j];
                }
            }
        }
        lin.update(
            &[RESCALE_ITEM],
            &vec![0.0; d],
            &[disc.powi(n)],
            &[0.0],
            &[0.0],
        )
        .unwrap();
        let theta = cholesky_solve(&a, d, &b).unwrap();
        let inv = cholesky_inverse(&a, d).unwrap();
        let arm = &lin.arms[0];
        for i in 0..d {
            assert!(
                (arm.theta[i] - theta[i]).abs() < 1e-8,
                "{i}: {:?} {theta:?}",
                arm.theta
            );
            for j in 0..d {
                assert!((arm.m[i * d + j] - inv[i * d + j]).abs() < 1e-8);
            }
        }
        // Inflation widens the error bars, never beyond the prior's.
        let x = features(&mut rng, d);
        let (_, se1) = lin.predict(0, &x).unwrap();
        lin.set_inflation(4.0).unwrap();
        let (_, se4) = lin.predict(0, &x).unwrap();
        let sigma = lin.sigma(&lin.arms[0]);
        let prior = sigma * (dot(&x, &x) / ridge).sqrt();
        assert!((se4 - (2.0 * se1).min(prior)).abs() < 1e-12);
        lin.set_inflation(1e12).unwrap();
        assert!((lin.predict(0, &x).unwrap().1 - prior).abs() < 1e-12);
        assert!(lin.set_inflation(0.5).is_err());
    }

    #[test]
    fn rank_one_updates_equal_a_refit() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(7);
        let d = 6;
        let mut lin = Linear::new(Model::Ridge, Mode::Ucb, false, 1.96, 2.0, 0.0).unwrap();
        lin.set_dimension(d).unwrap();
        lin.add_arms(1).unwrap();
        let mut a = vec![0.0; d * d];
        let mut b = vec![0.0; d];
        for i in 0..d {
            a[i * d + i] = 2.0;
        }
        for _ in 0..200 {
            let x = features(&mut rng, d);
            let w = 0.5 + rng.random::<f64>();
            let y = sampling::normal(&mut rng);
            lin.update(&[0], &x, &[w], &[w * y], &[w * y * y]).unwrap();
            for i in 0..d {
                b[i] += w * y * x[i];
                for j in 0..d {
                    a[i * d + j] += w * x[i] * x[j];
                }
            }
        }
        let theta = cholesky_solve(&a, d, &b).unwrap();
        let inv = cholesky_inverse(&a, d).unwrap();
        let arm = &lin.arms[0];
        for i in 0..d {
            assert!((arm.theta[i] - theta[i]).abs() < 1e-9, "{i}");
            for j in 0..d {
                assert!((arm.m[i * d + j] - inv[i * d + j]).abs() < 1e-9);
            }
        }
    }

    #[test]
    fn quad_form_kernels_agree() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(3);
        for d in [1, 5, 8, 13, 50] {
            let mut lin = Linear::new(Model::Ridge, Mode::Ucb, true, 1.96, 1.0, 0.0).unwrap();
            lin.set_dimension(d).unwrap();
            lin.add_arms(1).unwrap();
            for _ in 0..30 {
                let x = features(&mut rng, d);
                lin.update(&[0], &x, &[1.0], &[1.0], &[1.0]).unwrap();
            }
            let x = features(&mut rng, d);
            let mut u = vec![0.0; d];
            lin.arms[0].m_times(d, &x, &mut u);
            let exact = dot(&x, &u);
            let block = tri_block(d);
            // The triangle the updates wrote is M's.
            let mut packed = vec![1.0f32; block];
            kernels::pack_upper(&lin.arms[0].m, d, &mut packed);
            assert_eq!(packed, lin.tri[..block]);
            for avx in [false, avx2_available()] {
                let mut xp = vec![1.0f32; block + 8];
                kernels::pack_outer(&x, &mut xp, avx);
                let q = kernels::quad_form(&lin.tri[..block], &xp[..block], avx);
                assert!(
                    (q - exact).abs() <= 1e-4 * exact.abs().max(1e-3),
                    "d={d} {q} {exact}"
                );
            }
        }
    }

    /// Monte Carlo frequencies of each arm's draw being the largest.
    fn monte_carlo_wins(
        rng: &mut Xoshiro256PlusPlus,
        mu: &[f64],
        se: &[f64],
        draws: usize,
    ) -> Vec<f64> {
        let mut wins = vec![0usize; mu.len()];
        for _ in 0..draws {
            let mut best = (f64::NEG_INFINITY, 0);
            for (a, (&m, &s)) in mu.iter().zip(se).enumerate() {
                let v = m + s * sampling::normal(rng);
                if v > best.0 {
                    best = (v, a);
                }
            }
            wins[best.1] += 1;
        }
        wins.iter().map(|&w| w as f64 / draws as f64).collect()
    }

    /// 100 arms of nearly the same mean and width, and arms whose widths differ by up to 100x.
    fn hard_cases(rng: &mut Xoshiro256PlusPlus) -> [(Vec<f64>, Vec<f64>); 2] {
        let similar_mu: Vec<f64> = (0..100)
            .map(|_| 0.3 + 0.002 * sampling::normal(rng))
            .collect();
        let similar_se: Vec<f64> = (0..100)
            .map(|_| 0.05 * (1.0 + 0.1 * rng.random::<f64>()))
            .collect();
        let mixed_se: Vec<f64> = (0..12).map(|i| 0.01f64.powf(i as f64 / 11.0)).collect();
        let mixed_mu: Vec<f64> = (0..12)
            .map(|_| 0.4 + 0.15 * sampling::normal(rng))
            .collect();
        [(similar_mu, similar_se), (mixed_mu, mixed_se)]
    }

    #[test]
    fn win_probability_matches_monte_carlo() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(11);
        let mut cases: Vec<(Vec<f64>, Vec<f64>, usize)> = vec![
            (vec![0.0, 0.0, 0.0], vec![1.0, 1.0, 1.0], 400_000),
            (
                vec![0.5, 0.4, 0.1, 0.45],
                vec![0.05, 0.2, 0.01, 0.002],
                400_000,
            ),
            (vec![1.0, 0.0], vec![0.3, 0.3], 400_000),
            (
                vec![0.2, 0.21, 0.19, 0.5],
                vec![0.5, 0.001, 0.3, 0.01],
                400_000,
            ),
        ];
        let [similar, mixed] = hard_cases(&mut rng);
        cases.push((similar.0, similar.1, 200_000));
        cases.push((mixed.0, mixed.1, 1_000_000));
        for (mu, se, draws) in cases {
            let active: Vec<usize> = (0..mu.len()).collect();
            let freq = monte_carlo_wins(&mut rng, &mu, &se, draws);
            let mut total = 0.0;
            for (a, &f) in freq.iter().enumerate() {
                let p = win_probability(a, &active, &mu, &se);
                total += p;
                let sd = (f * (1.0 - f) / draws as f64).sqrt().max(1e-5);
                assert!(
                    (p - f).abs() < 5.0 * sd + 1e-4,
                    "arm {a}: {p} vs {f} ({mu:?} {se:?})"
                );
            }
            assert!((total - 1.0).abs() < 1e-3, "sum {total}");
        }
    }

    /// Small propensities become 1/p weights: their relative error, against a fine quadrature
    /// with exact Phi (every rival's rise split into pieces), stays below 1e-6.
    #[test]
    fn win_probability_is_accurate_for_small_propensities() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(12);
        let [similar, mixed] = hard_cases(&mut rng);
        let spread_mu: Vec<f64> = similar
            .0
            .iter()
            .map(|m| m + 0.05 * sampling::normal(&mut rng))
            .collect();
        let cases = [similar.clone(), (spread_mu, similar.1), mixed];
        for (mu, se) in cases {
            let active: Vec<usize> = (0..mu.len()).collect();
            let p: Vec<f64> = (0..mu.len())
                .map(|a| win_probability(a, &active, &mu, &se))
                .collect();
            assert!(
                (p.iter().sum::<f64>() - 1.0).abs() < 1e-7,
                "sum {}",
                p.iter().sum::<f64>()
            );
            // The smallest, the largest and a few in between.
            let mut order: Vec<usize> = (0..mu.len()).collect();
            order.sort_by(|&a, &b| p[a].total_cmp(&p[b]));
            let picks: Vec<usize> = order
                .iter()
                .step_by(mu.len().div_ceil(8))
                .chain(order.last())
                .copied()
                .collect();
            for a in picks {
                let exact = win_accuracy::reference(a, &mu, &se);
                if exact > 1e-12 {
                    assert!(
                        (p[a] / exact - 1.0).abs() < 1e-6,
                        "arm {a}: {} vs {exact}",
                        p[a]
                    );
                }
            }
        }
    }

    /// The scalar fallbacks compute what the AVX2 kernels compute.
    #[test]
    fn scalar_and_vector_paths_agree() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(21);
        for (arms, d) in [(3, 1), (10, 20), (37, 50), (9, 13)] {
            let mut fast = Linear::new(Model::Ridge, Mode::Thompson, true, 1.96, 1.0, 0.0).unwrap();
            fast.set_dimension(d).unwrap();
            fast.add_arms(arms).unwrap();
            let mut slow = Linear::new(Model::Ridge, Mode::Thompson, true, 1.96, 1.0, 0.0).unwrap();
            slow.avx2 = false;
            slow.set_dimension(d).unwrap();
            slow.add_arms(arms).unwrap();
            for i in 0..20 * arms {
                let x = features(&mut rng, d);
                let y = if rng.random::<f64>() < 0.3 { 1.0 } else { 0.0 };
                fast.update(&[i % arms], &x, &[1.0], &[y], &[y]).unwrap();
                slow.update(&[i % arms], &x, &[1.0], &[y], &[y]).unwrap();
            }
            let x = features(&mut rng, d);
            let ids: Vec<usize> = (0..arms).collect();
            fast.score_all(&x, &ids);
            slow.score_all(&x, &ids);
            for a in 0..arms {
                assert!((fast.mu[a] - slow.mu[a]).abs() <= 1e-9 * (1.0 + slow.mu[a].abs()));
                assert!(
                    (fast.se[a] - slow.se[a]).abs() <= 1e-5 * slow.se[a],
                    "{arms} x {d}"
                );
                let mut scratch = WinScratch::default();
                let p = win_probability_in(&mut scratch, a, &ids, &slow.mu, &slow.se, false);
                let q =
                    win_probability_in(&mut scratch, a, &ids, &slow.mu, &slow.se, avx2_available());
                assert!((p - q).abs() <= 1e-9 * p, "{arms} x {d} arm {a}: {p} {q}");
            }
        }
    }

    #[test]
    fn logistic_refit_and_online_steps_find_the_rates() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(5);
        let d = 3;
        let truth = [-1.0, 1.5, -0.5];
        let mut lin = Linear::new(Model::Logistic, Mode::Thompson, true, 1.96, 1.0, 0.0).unwrap();
        lin.set_dimension(d).unwrap();
        lin.add_arms(2).unwrap();
        let (mut xs, mut ys) = (Vec::new(), Vec::new());
        for _ in 0..20_000 {
            let x = features(&mut rng, d);
            let y = if rng.random::<f64>() < sigmoid(dot(&truth, &x)) {
                1.0
            } else {
                0.0
            };
            lin.update(&[1], &x, &[1.0], &[y], &[y]).unwrap();
            xs.extend_from_slice(&x);
            ys.push(y);
        }
        let w = vec![1.0; ys.len()];
        lin.refit_logistic(0, &xs, &ys, &w, 25).unwrap();
        for arm in 0..2 {
            let (theta, se) = lin.coefficients(arm).unwrap();
            for i in 0..d {
                assert!(
                    (theta[i] - truth[i]).abs() < 0.1,
                    "arm {arm} coef {i}: {theta:?}"
                );
                assert!(se[i] < 0.05);
            }
        }
    }

    #[test]
    fn ucb_ties_share_the_propensity_and_the_floor_mixes() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(1);
        let mut lin = Linear::new(Model::Ridge, Mode::Ucb, true, 1.96, 1.0, 0.2).unwrap();
        lin.add_arms(4).unwrap();
        let mut counts = [0usize; 4];
        for _ in 0..40_000 {
            let c = lin.choose(&mut rng, &[1.0], 1).unwrap();
            // All four tie: (1 - 0.2) / 4 + 0.2 / 4.
            assert!((c.propensities[0] - 0.25).abs() < 1e-12);
            counts[c.arms[0]] += 1;
        }
        for c in counts {
            assert!((c as f64 / 40_000.0 - 0.25).abs() < 0.015);
        }
    }

    #[test]
    fn state_round_trips() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(2);
        let mut lin = Linear::new(Model::Ridge, Mode::Thompson, true, 1.96, 1.0, 0.0).unwrap();
        lin.set_dimension(4).unwrap();
        lin.add_arms(3).unwrap();
        for a in 0..3 {
            let x = features(&mut rng, 4);
            lin.update(&[a], &x, &[1.0], &[1.0], &[1.0]).unwrap();
        }
        let bytes = lin.state();
        let mut other = Linear::new(Model::Ridge, Mode::Thompson, true, 1.96, 1.0, 0.0).unwrap();
        other.set_dimension(4).unwrap();
        other.add_arms(3).unwrap();
        other.load_state(&bytes).unwrap();
        assert_eq!(other.state(), bytes);
        assert!(other.load_state(&bytes[..bytes.len() - 8]).is_err());
    }
}

#[cfg(test)]
mod timing {
    use super::*;
    use rand::SeedableRng;
    use rand_xoshiro::Xoshiro256PlusPlus;

    /// Best of 5 runs of `reps` calls, per call.
    fn best<F: FnMut()>(reps: u32, mut f: F) -> std::time::Duration {
        (0..5)
            .map(|_| {
                let t = std::time::Instant::now();
                for _ in 0..reps {
                    f();
                }
                t.elapsed() / reps
            })
            .min()
            .unwrap()
    }

    /// 100 arms x 50 features, each arm fitted on 20 observations.
    fn fitted(mode: Mode, rng: &mut Xoshiro256PlusPlus) -> Linear {
        let d = 50;
        let mut lin = Linear::new(Model::Ridge, mode, true, 1.96, 1.0, 0.0).unwrap();
        lin.set_dimension(d).unwrap();
        lin.add_arms(100).unwrap();
        for i in 0..2000 {
            let mut x: Vec<f64> = (0..d).map(|_| sampling::normal(rng)).collect();
            x[0] = 1.0;
            let y = if rng.random::<f64>() < 0.3 { 1.0 } else { 0.0 };
            lin.update(&[i % 100], &x, &[1.0], &[y], &[y]).unwrap();
        }
        lin
    }

    #[test]
    #[ignore]
    fn time_parts() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(7);
        let d = 50;
        let mut lin = fitted(Mode::Ucb, &mut rng);
        let mut x: Vec<f64> = (0..d).map(|_| sampling::normal(&mut rng)).collect();
        x[0] = 1.0;
        let ids: Vec<usize> = (0..100).collect();
        println!("score_all {:?}", best(5_000, || lin.score_all(&x, &ids)));
        let block = tri_block(d);
        let mut xp = vec![0.0f32; block + 8];
        kernels::pack_outer(&x, &mut xp, lin.avx2);
        let q = best(200_000, || {
            std::hint::black_box(kernels::quad_form(
                std::hint::black_box(&lin.tri[..block]),
                &xp[..block],
                lin.avx2,
            ));
        });
        println!("quad_form (one arm, in cache) {q:?}");
        let mut r = rng.clone();
        println!(
            "ucb choose {:?}",
            best(5_000, || {
                lin.choose(&mut r, &x, 1).unwrap();
            })
        );
        println!(
            "update {:?}",
            best(20_000, || {
                lin.update(&[3], &x, &[1.0], &[1.0], &[1.0]).unwrap();
            })
        );
        let mut ts = fitted(Mode::Thompson, &mut rng);
        println!(
            "thompson choose {:?}",
            best(5_000, || {
                ts.choose(&mut r, &x, 1).unwrap();
            })
        );
        ts.score_all(&x, &ids);
        let (mu, se) = (ts.mu.clone(), ts.se.clone());
        let top = (0..100).max_by(|&p, &q| mu[p].total_cmp(&mu[q])).unwrap();
        for (name, a) in [("best arm", top), ("arm 1", 1)] {
            let p = win_probability(a, &ids, &mu, &se);
            let t = best(5_000, || {
                std::hint::black_box(win_probability(a, &ids, &mu, &se));
            });
            println!("win_probability ({name}, p {p:.2e}) {t:?}");
        }
        let se2: Vec<f64> = (0..100).map(|i| 0.01f64.powf(i as f64 / 99.0)).collect();
        let mu2: Vec<f64> = (0..100)
            .map(|_| 0.4 + 0.15 * sampling::normal(&mut rng))
            .collect();
        let t = best(1_000, || {
            for a in [0, 50, 99] {
                std::hint::black_box(win_probability(a, &ids, &mu2, &se2));
            }
        });
        println!("win_probability (100 widths 0.01..1) {:?}", t / 3);
    }
}

#[cfg(test)]
mod win_accuracy {
    use super::*;
    use rand::SeedableRng;
    use rand_xoshiro::Xoshiro256PlusPlus;

    fn phi_exact(z: f64) -> f64 {
        0.5 * libm::erfc(-z / std::f64::consts::SQRT_2)
    }

    /// P(a wins) by Simpson's rule with exact Phi on intervals split at every rival's
    /// c_b + k r_b (k in -8, -4, -2, -1, 0, 1, 2, 4, 8) and every 0.05.
    pub(super) fn reference(a: usize, mu: &[f64], se: &[f64]) -> f64 {
        let (ma, sa) = (mu[a], se[a]);
        let rivals: Vec<(f64, f64)> = (0..mu.len())
            .filter(|&b| b != a)
            .map(|b| ((mu[b] - ma) / sa, se[b] / sa))
            .collect();
        let hi = 9.0f64;
        let lo = rivals
            .iter()
            .map(|&(c, r)| c - 9.0 * r)
            .fold(-9.0f64, f64::max);
        if lo >= hi {
            return 0.0;
        }
        let mut cuts = vec![lo, hi];
        let mut t = lo;
        while t < hi {
            cuts.push(t);
            t += 0.05;
        }
        for &(c, r) in &rivals {
            for k in [-8.0, -4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0, 8.0] {
                let v = c + k * r;
                if v > lo && v < hi {
                    cuts.push(v);
                }
            }
        }
        cuts.sort_by(f64::total_cmp);
        cuts.dedup();
        let f = |t: f64| {
            let mut p = (-0.5 * t * t).exp() / (2.0 * std::f64::consts::PI).sqrt();
            for &(c, r) in &rivals {
                p *= phi_exact((t - c) / r);
            }
            p
        };
        let mut total = phi_exact(-hi);
        for w in cuts.windows(2) {
            let (x0, x1) = (w[0], w[1]);
            let n = 16;
            let h = (x1 - x0) / n as f64;
            let mut s = f(x0) + f(x1);
            for j in 1..n {
                s += f(x0 + h * j as f64) * if j % 2 == 1 { 4.0 } else { 2.0 };
            }
            total += s * h / 3.0;
        }
        total
    }

    fn worst(name: &str, mu: &[f64], se: &[f64]) -> f64 {
        let active: Vec<usize> = (0..mu.len()).collect();
        let mut worst: f64 = 0.0;
        let mut sum = 0.0;
        let mut at = (0, 0.0, 0.0);
        for a in 0..mu.len() {
            let p = win_probability(a, &active, mu, se);
            let r = reference(a, mu, se);
            sum += p;
            if r > 1e-12 && (p / r - 1.0).abs() > worst {
                worst = (p / r - 1.0).abs();
                at = (a, p, r);
            }
        }
        println!("{name}: worst relative error {worst:.2e} (arm {} p {:.4e} ref {:.4e}), sum - 1 = {:.1e}", at.0, at.1, at.2, sum - 1.0);
        if worst > 1e-4 && mu.len() <= 30 {
            println!("  mu {mu:?}\n  se {se:?}");
        }
        worst
    }

    /// Relative errors by size of the propensity over random small problems (2 to 7 arms,
    /// widths up to 1000x apart).
    #[test]
    #[ignore]
    fn win_probability_accuracy_small() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(5);
        let mut errs: Vec<(f64, f64)> = Vec::new();
        for _ in 0..300 {
            let n = 2 + (rng.random::<f64>() * 6.0) as usize;
            let spread = 0.001f64.powf(rng.random::<f64>());
            let se: Vec<f64> = (0..n).map(|_| spread.powf(rng.random::<f64>())).collect();
            let mu: Vec<f64> = (0..n).map(|_| 0.5 * sampling::normal(&mut rng)).collect();
            let active: Vec<usize> = (0..n).collect();
            for a in 0..n {
                let p = win_probability(a, &active, &mu, &se);
                let r = reference(a, &mu, &se);
                if r > 1e-12 {
                    errs.push(((p / r - 1.0).abs(), r));
                }
            }
        }
        for (lo, hi) in [
            (1e-12, 1e-9),
            (1e-9, 1e-6),
            (1e-6, 1e-4),
            (1e-4, 1e-2),
            (1e-2, 1.1),
        ] {
            let sel: Vec<f64> = errs
                .iter()
                .filter(|e| e.1 >= lo && e.1 < hi)
                .map(|e| e.0)
                .collect();
            let worst = sel.iter().copied().fold(0.0, f64::max);
            println!(
                "p in [{lo:e}, {hi:e}): {} arms, worst relative error {worst:.2e}",
                sel.len()
            );
        }
    }

    #[test]
    #[ignore]
    fn win_probability_accuracy_scan() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(99);
        for trial in 0..4 {
            let n = 100;
            let mu: Vec<f64> = (0..n)
                .map(|_| 0.3 + 0.002 * sampling::normal(&mut rng))
                .collect();
            let se: Vec<f64> = (0..n)
                .map(|_| 0.05 * (1.0 + 0.1 * rng.random::<f64>()))
                .collect();
            worst(&format!("similar 100 #{trial}"), &mu, &se);
            let mu: Vec<f64> = (0..n)
                .map(|_| 0.3 + 0.05 * sampling::normal(&mut rng))
                .collect();
            worst(&format!("spread 100 #{trial}"), &mu, &se);
            let n = 30;
            let se: Vec<f64> = (0..n).map(|_| 0.01f64.powf(rng.random::<f64>())).collect();
            let mu: Vec<f64> = (0..n).map(|_| 0.5 * sampling::normal(&mut rng)).collect();
            worst(&format!("mixed 30 #{trial}"), &mu, &se);
            let n = 5;
            let se: Vec<f64> = (0..n).map(|_| 0.001f64.powf(rng.random::<f64>())).collect();
            let mu: Vec<f64> = (0..n).map(|_| 0.2 * sampling::normal(&mut rng)).collect();
            worst(&format!("mixed 5 #{trial}"), &mu, &se);
        }
    }

    /// Widths within 3x of each other (a uniformly finer grid instead of refinements).
    #[test]
    #[ignore]
    fn win_probability_accuracy_mild() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(15);
        let mut worst: f64 = 0.0;
        let mut worst_small: f64 = 0.0;
        for trial in 0..200 {
            let n = if trial % 4 == 0 {
                100
            } else {
                2 + (rng.random::<f64>() * 30.0) as usize
            };
            let se: Vec<f64> = (0..n).map(|_| 0.35f64.powf(rng.random::<f64>())).collect();
            let spread = if trial % 2 == 0 { 0.05 } else { 0.5 };
            let mu: Vec<f64> = (0..n)
                .map(|_| spread * sampling::normal(&mut rng))
                .collect();
            let active: Vec<usize> = (0..n).collect();
            let picks: Vec<usize> = if n > 10 {
                (0..n).step_by(n / 5).collect()
            } else {
                (0..n).collect()
            };
            for a in picks {
                let p = win_probability(a, &active, &mu, &se);
                let r = reference(a, &mu, &se);
                if r > 1e-9 {
                    let e = (p / r - 1.0).abs();
                    if r > 1e-4 {
                        worst = worst.max(e)
                    } else {
                        worst_small = worst_small.max(e)
                    }
                }
            }
        }
        println!("mild widths: worst relative error {worst:.2e} (p > 1e-4), {worst_small:.2e} (1e-9 < p < 1e-4)");
    }

    /// Arm a the narrowest, 2 to 13 arms (the coarsest grids).
    #[test]
    #[ignore]
    fn win_probability_accuracy_wide() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(25);
        let mut worst = [0.0f64; 4];
        for trial in 0..400 {
            let n = 2 + trial % 12;
            let se: Vec<f64> = (0..n).map(|_| 1.0 + 0.6 * rng.random::<f64>()).collect();
            let spread = [0.05, 0.3, 1.0, 3.0][trial % 4];
            let mu: Vec<f64> = (0..n)
                .map(|_| spread * sampling::normal(&mut rng))
                .collect();
            let active: Vec<usize> = (0..n).collect();
            let a = (0..n).min_by(|&p, &q| se[p].total_cmp(&se[q])).unwrap();
            {
                let p = win_probability(a, &active, &mu, &se);
                let r = reference(a, &mu, &se);
                if r > 1e-9 {
                    let e = (p / r - 1.0).abs();
                    worst[trial % 4] = worst[trial % 4].max(e);
                }
            }
        }
        println!(
            "wide (spreads 0.05, 0.3, 1, 3): {:.2e} {:.2e} {:.2e} {:.2e}",
            worst[0], worst[1], worst[2], worst[3]
        );
    }
}
