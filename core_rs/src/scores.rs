//! Index policies (UCB1, KL-UCB) over contiguous f32 arrays: score = base + k · spread.
//!
//! UCB1: base = mean, spread = n^(−1/2), k = c · sqrt(2 ln t), so one fused multiply-add per
//! arm. KL-UCB: base = the cached KL index, k = 0. Retired arms hold −∞ and never win.

use crate::kernel::{Isa, LANES};

#[derive(Clone, Debug, Default)]
pub struct ScoreArrays {
    pub base: Vec<f32>,
    pub spread: Vec<f32>,
    pub len: usize,
}

impl ScoreArrays {
    pub fn with_len(len: usize) -> Self {
        let padded = len.div_ceil(LANES).max(1) * LANES;
        ScoreArrays {
            base: vec![f32::NEG_INFINITY; padded],
            spread: vec![0.0; padded],
            len,
        }
    }

    #[inline]
    pub fn set(&mut self, arm: usize, base: f32, spread: f32) {
        self.base[arm] = base;
        self.spread[arm] = spread;
    }

    /// The arm with the largest base + k · spread (first wins ties).
    pub fn argmax(&self, isa: Isa, k: f32) -> usize {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                // SAFETY: Isa::Avx512 exists only after run-time detection; arrays are padded.
                unsafe { crate::avx512::argmax_fma(&self.base, &self.spread, k, self.len) }
            }
            _ => {
                let mut best = (f32::NEG_INFINITY, 0);
                for i in 0..self.len {
                    let v = k.mul_add(self.spread[i], self.base[i]);
                    if v > best.0 {
                        best = (v, i);
                    }
                }
                best.1
            }
        }
    }

    #[inline]
    pub fn score(&self, arm: usize, k: f32) -> f32 {
        k.mul_add(self.spread[arm], self.base[arm])
    }
}

/// Bernoulli KL divergence KL(p, q), with 0·ln 0 = 0.
pub fn kl_bernoulli(p: f64, q: f64) -> f64 {
    let q = q.clamp(1e-15, 1.0 - 1e-15);
    let term = |x: f64, y: f64| if x <= 0.0 { 0.0 } else { x * (x / y).ln() };
    term(p, q) + term(1.0 - p, 1.0 - q)
}

/// KL-UCB index: the largest q >= p with n · KL(p, q) <= budget (bisection to 1e-7).
pub fn kl_ucb_index(p: f64, n: f64, budget: f64) -> f64 {
    if n <= 0.0 {
        return 1.0;
    }
    let p = p.clamp(0.0, 1.0);
    let limit = budget / n;
    let (mut lo, mut hi) = (p, 1.0);
    while hi - lo > 1e-7 {
        let mid = 0.5 * (lo + hi);
        if kl_bernoulli(p, mid) > limit {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    lo
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_agrees_across_instruction_sets() {
        let n = 1003;
        let mut s = ScoreArrays::with_len(n);
        for i in 0..n {
            s.set(
                i,
                ((i * 7919) % 1000) as f32 / 1000.0,
                1.0 / ((i % 13) as f32 + 1.0),
            );
        }
        s.set(17, f32::NEG_INFINITY, 100.0);
        let scalar = s.argmax(Isa::Scalar, 0.3);
        assert_eq!(s.argmax(Isa::detect(), 0.3), scalar);
        let want = (0..n)
            .max_by(|&a, &b| s.score(a, 0.3).total_cmp(&s.score(b, 0.3)).then(b.cmp(&a)))
            .unwrap();
        assert_eq!(scalar, want);
    }

    #[test]
    fn kl_ucb_index_is_above_the_mean_and_shrinks_with_n() {
        let a = kl_ucb_index(0.3, 10.0, 5.0);
        let b = kl_ucb_index(0.3, 1000.0, 5.0);
        assert!(a > b && b > 0.3 && a <= 1.0);
        assert!(kl_bernoulli(0.3, a) * 10.0 <= 5.0 + 1e-6);
    }
}
