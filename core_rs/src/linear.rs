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
//! mu_b)/s_b) dt, computed by Simpson's rule from the top of the range downward on a grid fine
//! enough for the competitors present at each height, stopping once the rest is negligible
//! (see `win_probability`).

use rand::Rng;

use crate::error::CoreError;
use crate::linear_kernels::{self as kernels, avx2_available, dot, tri_block, CdfTable};
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

pub struct Linear {
    pub model: Model,
    pub mode: Mode,
    pub binary: bool,
    pub alpha: f64,
    pub ridge: f64,
    pub floor: f64,
    d: usize,
    pub arms: Vec<ArmModel>,
    pub active: Vec<bool>,
    pub version: u64,
    avx2: bool,
    // Scratch buffers of the hot path (no allocation per decision).
    mu: Vec<f64>,
    se: Vec<f64>,
    xf: Vec<f32>,
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
        if !(alpha.is_finite() && alpha >= 0.0 && alpha <= 100.0) {
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
            mu: Vec::new(),
            se: Vec::new(),
            xf: Vec::new(),
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
        8 * (d * d + 2 * d + 2) + 4 * d * padded(d)
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
        self.version += 1;
        Ok(())
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

    /// Estimate (link scale) and standard error of every arm at x into self.mu / self.se.
    fn score_all(&mut self, x: &[f64]) {
        let d = self.d;
        let n = self.arms.len();
        self.mu.resize(n, 0.0);
        self.se.resize(n, 0.0);
        let stride = padded(d);
        self.xf.clear();
        self.xf.extend(x.iter().map(|&v| v as f32));
        self.xf.resize(stride, 0.0);
        for a in 0..n {
            if !self.active[a] {
                continue;
            }
            let arm = &self.arms[a];
            let q = quad_form(&arm.packed, &self.xf, d, stride, self.avx2);
            self.mu[a] = dot(&arm.theta, x);
            self.se[a] = self.sigma(arm) * q.max(0.0).sqrt();
        }
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
        Ok((
            dot(&a.theta, x),
            self.sigma(a) * dot(x, &u).max(0.0).sqrt(),
        ))
    }

    pub fn coefficients(&self, arm: usize) -> Result<(Vec<f64>, Vec<f64>), CoreError> {
        self.check_arm(arm)?;
        let a = &self.arms[arm];
        let s = self.sigma(a);
        let se = (0..self.d)
            .map(|i| s * a.m[i * self.d + i].max(0.0).sqrt())
            .collect();
        Ok((a.theta.clone(), se))
    }

    pub fn choose<R: Rng>(&mut self, rng: &mut R, x: &[f64], k: usize) -> Result<Choice, CoreError> {
        self.check_x(x)?;
        let active: Vec<usize> = (0..self.arms.len()).filter(|&a| self.active[a]).collect();
        if k == 0 || k > active.len() {
            return Err(CoreError::invalid(format!(
                "k = {k} but the experiment has {} active arms",
                active.len()
            )));
        }
        self.score_all(x);
        let n_active = active.len() as f64;
        let random = self.floor > 0.0 && rng.random::<f64>() < self.floor;
        // The policy's scores (also drawn when the floor decides, so the random stream does
        // not depend on which branch ran).
        let mut scored: Vec<(f64, usize)> = active
            .iter()
            .map(|&a| {
                let s = match self.mode {
                    Mode::Ucb => self.mu[a] + self.alpha * self.se[a],
                    Mode::Thompson => self.mu[a] + self.se[a] * sampling::normal(rng),
                };
                (s, a)
            })
            .collect();
        let chosen: Vec<usize> = if random {
            let mut pool = active.clone();
            let mut out = Vec::with_capacity(k);
            for i in 0..k {
                let j = rng.random_range(i..pool.len());
                pool.swap(i, j);
                out.push(pool[i]);
            }
            out
        } else {
            let kth = k - 1;
            scored.select_nth_unstable_by(kth, |p, q| q.0.total_cmp(&p.0));
            let mut top: Vec<(f64, usize)> = scored[..k].to_vec();
            if self.mode == Mode::Ucb {
                // Ties at the k-th score are broken uniformly at random (the stated rule
                // behind the exact propensity).
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
        let policy_p = self.policy_propensities(rng, &active, &chosen, k)?;
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
        &self,
        rng: &mut R,
        active: &[usize],
        chosen: &[usize],
        k: usize,
    ) -> Result<Vec<f64>, CoreError> {
        match self.mode {
            Mode::Ucb => {
                let ucb = |a: usize| self.mu[a] + self.alpha * self.se[a];
                let mut scores: Vec<f64> = active.iter().map(|&a| ucb(a)).collect();
                scores.sort_by(|p, q| q.total_cmp(p));
                let threshold = scores[k - 1];
                let above = scores.iter().filter(|&&s| s > threshold).count();
                let tied = scores.iter().filter(|&&s| s == threshold).count();
                Ok(chosen
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
                    .collect())
            }
            Mode::Thompson if k == 1 => Ok(vec![win_probability(
                chosen[0], active, &self.mu, &self.se,
            )]),
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
                Ok(hits
                    .iter()
                    .map(|&h| (h as f64).max(0.5) / DRAWS as f64)
                    .collect())
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
            self.check_arm(a)?;
            self.check_x(&xs[i * d..(i + 1) * d])?;
            if !(w[i].is_finite() && w[i] >= 0.0 && wy[i].is_finite() && wyy[i].is_finite()) {
                return Err(CoreError::invalid(format!(
                    "update item {i}: weight {} must be finite and >= 0, wy {} and wyy {} finite",
                    w[i], wy[i], wyy[i]
                )));
            }
        }
        let mut u = vec![0.0; d];
        let mut touched = vec![false; self.arms.len()];
        for (i, &a) in arms.iter().enumerate() {
            let x = &xs[i * d..(i + 1) * d];
            let model = self.model;
            let arm = &mut self.arms[a];
            match model {
                Model::Ridge => {
                    if w[i] > 0.0 {
                        arm.m_times(d, x, &mut u);
                        let xu = dot(x, &u);
                        arm.rank_one(d, w[i], &u, xu);
                        arm.n += w[i];
                    }
                    for (bj, &xj) in arm.b.iter_mut().zip(x) {
                        *bj += wy[i] * xj;
                    }
                    arm.yy += wyy[i];
                    let m = &arm.m;
                    for (j, t) in arm.theta.iter_mut().enumerate() {
                        *t = dot(&m[j * d..(j + 1) * d], &arm.b);
                    }
                }
                Model::Logistic => {
                    let p = sigmoid(dot(&arm.theta, x));
                    if w[i] > 0.0 {
                        let c = w[i] * (p * (1.0 - p)).max(1e-6);
                        arm.m_times(d, x, &mut u);
                        let xu = dot(x, &u);
                        arm.rank_one(d, c, &u, xu);
                        arm.n += w[i];
                    }
                    // theta += M x (gradient of the new or changed observation).
                    let g = wy[i] - w[i] * p;
                    arm.m_times(d, x, &mut u);
                    for (t, &uj) in arm.theta.iter_mut().zip(&u) {
                        *t += g * uj;
                    }
                    arm.yy += wyy[i];
                }
            }
            touched[a] = true;
        }
        for (a, t) in touched.iter().enumerate() {
            if *t {
                self.arms[a].repack(d);
            }
        }
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
        a.repack(d);
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
        Linear {
            arms: vec![self.arms[arm].clone()],
            active: vec![true],
            mu: Vec::new(),
            se: Vec::new(),
            xf: Vec::new(),
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
            for v in [a.n, a.yy]
                .iter()
                .chain(&a.theta)
                .chain(&a.b)
                .chain(&a.m)
            {
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
            arm.repack(d);
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

fn avx2_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// x'Mx from the packed upper triangle (diagonal halved): 2 * sum_i x_i * (row_i . x).
fn quad_form(packed: &[f32], x: &[f32], d: usize, stride: usize, avx2: bool) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        if avx2 {
            // SAFETY: the CPU has AVX2 and FMA (checked at construction); slices are
            // d x stride and stride long, stride a multiple of 8.
            return unsafe { quad_form_avx2(packed, x, d, stride) };
        }
    }
    let _ = avx2;
    let mut total = 0.0f32;
    for i in 0..d {
        let start = (i / LANES) * LANES;
        let row = &packed[i * stride + start..(i + 1) * stride];
        let mut acc = [0.0f32; LANES];
        for (c, chunk) in row.chunks_exact(LANES).enumerate() {
            let xs = &x[start + c * LANES..start + (c + 1) * LANES];
            for l in 0..LANES {
                acc[l] += chunk[l] * xs[l];
            }
        }
        total += x[i] * acc.iter().sum::<f32>();
    }
    2.0 * total as f64
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quad_form_avx2(packed: &[f32], x: &[f32], d: usize, stride: usize) -> f64 {
    use std::arch::x86_64::*;
    debug_assert!(packed.len() >= d * stride && x.len() >= stride && stride % LANES == 0);
    let p = packed.as_ptr();
    let xp = x.as_ptr();
    let mut total = _mm256_setzero_ps();
    for i in 0..d {
        let start = (i / LANES) * LANES;
        let row = p.add(i * stride);
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut c = start;
        while c + 2 * LANES <= stride {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(row.add(c)), _mm256_loadu_ps(xp.add(c)), acc0);
            acc1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(row.add(c + LANES)),
                _mm256_loadu_ps(xp.add(c + LANES)),
                acc1,
            );
            c += 2 * LANES;
        }
        if c < stride {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(row.add(c)), _mm256_loadu_ps(xp.add(c)), acc0);
        }
        // Scaled by x_i and summed lane-wise: one horizontal sum per arm, not per row.
        total = _mm256_fmadd_ps(_mm256_add_ps(acc0, acc1), _mm256_set1_ps(*xp.add(i)), total);
    }
    let mut lanes = [0.0f32; LANES];
    _mm256_storeu_ps(lanes.as_mut_ptr(), total);
    2.0 * lanes.iter().map(|&v| v as f64).sum::<f64>()
}

/// Standard normal cdf by table: linear interpolation on [-9, 9] in steps of 1/128 (relative
/// error below 1e-3 even in the far lower tail, absolute below 1e-7).
struct NormalTable {
    values: Vec<f64>,
}

const TABLE_LO: f64 = -9.0;
const TABLE_STEPS: f64 = 128.0;

impl NormalTable {
    fn get() -> &'static NormalTable {
        static TABLE: std::sync::OnceLock<NormalTable> = std::sync::OnceLock::new();
        TABLE.get_or_init(|| {
            let n = (18.0 * TABLE_STEPS) as usize + 2;
            let values = (0..n)
                .map(|i| {
                    let z = TABLE_LO + i as f64 / TABLE_STEPS;
                    0.5 * libm::erfc(-z / std::f64::consts::SQRT_2)
                })
                .collect();
            NormalTable { values }
        })
    }

    #[inline(always)]
    fn cdf(&self, z: f64) -> f64 {
        let pos = (z - TABLE_LO) * TABLE_STEPS;
        if pos <= 0.0 {
            return 0.0;
        }
        let i = pos as usize;
        if i + 1 >= self.values.len() {
            return 1.0;
        }
        let f = pos - i as f64;
        self.values[i] + f * (self.values[i + 1] - self.values[i])
    }
}

/// P(arm `a`'s draw is the largest) for independent normal draws N(mu, se^2) of `active` arms.
///
/// Integrates phi(t) F(t), F(t) = prod_b Phi((mu_a + se_a t - mu_b) / se_b), over the range
/// where F is neither ~0 nor ~1 (above it the integral is 1 - Phi(hi)) by Simpson's rule with
/// a step of at most 0.2 and at most a third of the narrowest competitor's relative width, so
/// each competitor's step is resolved; arms that cannot compete anywhere are skipped.
pub fn win_probability(a: usize, active: &[usize], mu: &[f64], se: &[f64]) -> f64 {
    const REACH: f64 = 8.3;
    let table = NormalTable::get();
    let (ma, sa) = (mu[a], se[a].max(1e-300));
    let floor_a = ma - REACH * sa;
    // Competitors that can exceed a's lowest plausible draw.
    let rivals: Vec<(f64, f64)> = active
        .iter()
        .filter(|&&b| b != a && mu[b] + REACH * se[b] > floor_a)
        .map(|&b| (mu[b], se[b]))
        .collect();
    if rivals.is_empty() {
        return 1.0;
    }
    let mut lo = -REACH;
    let mut hi = -REACH;
    let mut narrow = f64::INFINITY;
    for &(mb, sb) in &rivals {
        lo = lo.max((mb - REACH * sb - ma) / sa);
        hi = hi.max((mb + REACH * sb - ma) / sa);
        narrow = narrow.min(sb / sa);
    }
    let hi = hi.min(REACH);
    if lo >= hi {
        // Below lo some rival is certainly above a; above hi every rival is below.
        return if lo >= REACH { f64::MIN_POSITIVE } else { 1.0 - table.cdf(hi) };
    }
    let step = 0.2f64.min(narrow / 3.0).max((hi - lo) / 20_000.0);
    let mut n = ((hi - lo) / step).ceil() as usize;
    n += n % 2; // Simpson needs an even number of intervals
    let h = (hi - lo) / n as f64;
    let mut f = vec![1.0f64; n + 1];
    for &(mb, sb) in &rivals {
        let inv = 1.0 / sb.max(1e-300);
        let z0 = (ma + sa * lo - mb) * inv;
        let dz = sa * h * inv;
        for (j, fj) in f.iter_mut().enumerate() {
            *fj *= table.cdf(z0 + dz * j as f64);
        }
    }
    let inv_sqrt_2pi = 1.0 / (2.0 * std::f64::consts::PI).sqrt();
    let mut sum = 0.0;
    for (j, fj) in f.iter().enumerate() {
        let t = lo + h * j as f64;
        let w = if j == 0 || j == n {
            1.0
        } else if j % 2 == 1 {
            4.0
        } else {
            2.0
        };
        sum += w * fj * (-0.5 * t * t).exp() * inv_sqrt_2pi;
    }
    let p = sum * h / 3.0 + (1.0 - table.cdf(hi));
    p.clamp(f64::MIN_POSITIVE, 1.0)
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
            let stride = padded(d);
            let mut xf: Vec<f32> = x.iter().map(|&v| v as f32).collect();
            xf.resize(stride, 0.0);
            for avx in [false, avx2_available()] {
                let q = quad_form(&lin.arms[0].packed, &xf, d, stride, avx);
                assert!((q - exact).abs() <= 1e-4 * exact.abs().max(1e-3), "d={d} {q} {exact}");
            }
        }
    }

    #[test]
    fn win_probability_matches_monte_carlo() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(11);
        let cases: [(&[f64], &[f64]); 4] = [
            (&[0.0, 0.0, 0.0], &[1.0, 1.0, 1.0]),
            (&[0.5, 0.4, 0.1, 0.45], &[0.05, 0.2, 0.01, 0.002]),
            (&[1.0, 0.0], &[0.3, 0.3]),
            (&[0.2, 0.21, 0.19, 0.5], &[0.5, 0.001, 0.3, 0.01]),
        ];
        for (mu, se) in cases {
            let active: Vec<usize> = (0..mu.len()).collect();
            let draws = 400_000;
            let mut wins = vec![0usize; mu.len()];
            for _ in 0..draws {
                let mut best = (f64::NEG_INFINITY, 0);
                for a in 0..mu.len() {
                    let v = mu[a] + se[a] * sampling::normal(&mut rng);
                    if v > best.0 {
                        best = (v, a);
                    }
                }
                wins[best.1] += 1;
            }
            let mut total = 0.0;
            for a in 0..mu.len() {
                let p = win_probability(a, &active, mu, se);
                total += p;
                let f = wins[a] as f64 / draws as f64;
                let sd = (f * (1.0 - f) / draws as f64).sqrt().max(1e-5);
                assert!((p - f).abs() < 5.0 * sd + 1e-4, "arm {a}: {p} vs {f} ({mu:?} {se:?})");
            }
            assert!((total - 1.0).abs() < 1e-3, "sum {total}");
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
            let y = if rng.random::<f64>() < sigmoid(dot(&truth, &x)) { 1.0 } else { 0.0 };
            lin.update(&[1], &x, &[1.0], &[y], &[y]).unwrap();
            xs.extend_from_slice(&x);
            ys.push(y);
        }
        let w = vec![1.0; ys.len()];
        lin.refit_logistic(0, &xs, &ys, &w, 25).unwrap();
        for arm in 0..2 {
            let (theta, se) = lin.coefficients(arm).unwrap();
            for i in 0..d {
                assert!((theta[i] - truth[i]).abs() < 0.1, "arm {arm} coef {i}: {theta:?}");
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

    #[test]
    #[ignore]
    fn time_parts() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(7);
        let d = 50;
        let mut lin = Linear::new(Model::Ridge, Mode::Ucb, true, 1.96, 1.0, 0.0).unwrap();
        lin.set_dimension(d).unwrap();
        lin.add_arms(100).unwrap();
        let x: Vec<f64> = (0..d).map(|_| sampling::normal(&mut rng)).collect();
        let t = std::time::Instant::now();
        for _ in 0..10_000 {
            lin.score_all(&x);
        }
        println!("score_all {:?}", t.elapsed() / 10_000);
        let stride = padded(d);
        let xf: Vec<f32> = x.iter().map(|&v| v as f32).chain(std::iter::repeat(0.0)).take(stride).collect();
        let t = std::time::Instant::now();
        let mut s = 0.0;
        for _ in 0..1_000_000 {
            s += quad_form(std::hint::black_box(&lin.arms[0].packed), &xf, d, stride, true);
        }
        println!("quad_form {:?} {s}", t.elapsed() / 1_000_000);
        let t = std::time::Instant::now();
        for _ in 0..10_000 {
            lin.choose(&mut rng, &x, 1).unwrap();
        }
        println!("choose {:?}", t.elapsed() / 10_000);
        let t = std::time::Instant::now();
        for _ in 0..10_000 {
            lin.update(&[3], &x, &[1.0], &[1.0], &[1.0]).unwrap();
        }
        println!("update {:?}", t.elapsed() / 10_000);
    }
}
