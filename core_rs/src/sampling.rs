//! Exact samplers for the Gamma, Beta and Normal distributions.
//!
//! Gamma uses Marsaglia–Tsang with a tighter (still exact) squeeze: accept when
//! (1 − u) · 108 · d · min(1, 1 + c·x) > x⁴, which needs the log test only about
//! 3 / (108·d) of the time.

use rand::Rng;
use rand_distr::StandardNormal;

/// One standard normal draw (ziggurat).
#[inline]
pub fn normal<R: Rng + ?Sized>(rng: &mut R) -> f64 {
    rng.sample(StandardNormal)
}

/// Uniform in (0, 1]: never zero, so logs and powers stay finite.
#[inline]
pub fn uniform_open0<R: Rng + ?Sized>(rng: &mut R) -> f64 {
    1.0 - rng.random::<f64>()
}

/// Gamma(shape, 1) for shape >= 1 by Marsaglia–Tsang.
#[inline]
fn gamma_ge1<R: Rng + ?Sized>(rng: &mut R, shape: f64) -> f64 {
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = normal(rng);
        let t = 1.0 + c * x;
        if t <= 0.0 {
            continue;
        }
        let v = t * t * t;
        let u = uniform_open0(rng);
        let x2 = x * x;
        let x4 = x2 * x2;
        // Squeeze: (1-u) >= 1 - x^4/(108 d t) implies the log test below.
        if (1.0 - u) * 108.0 * d * t.min(1.0) > x4 {
            return d * v;
        }
        if u.ln() < 0.5 * x2 + d * (1.0 - v + v.ln()) {
            return d * v;
        }
    }
}

/// Gamma(shape, 1) for any shape > 0.
#[inline]
pub fn gamma<R: Rng + ?Sized>(rng: &mut R, shape: f64) -> f64 {
    if shape >= 1.0 {
        gamma_ge1(rng, shape)
    } else {
        // Boost: Gamma(a) = Gamma(a + 1) · U^(1/a).
        let g = gamma_ge1(rng, shape + 1.0);
        g * uniform_open0(rng).powf(1.0 / shape)
    }
}

/// Beta(a, b) as X / (X + Y) with X ~ Gamma(a), Y ~ Gamma(b); always in [0, 1].
#[inline]
pub fn beta<R: Rng + ?Sized>(rng: &mut R, a: f64, b: f64) -> f64 {
    let x = gamma(rng, a);
    let y = gamma(rng, b);
    let s = x + y;
    if s > 0.0 {
        (x / s).clamp(0.0, 1.0)
    } else {
        // Both underflowed (tiny shapes): decide by the ratio of the shapes.
        if rng.random::<f64>() < a / (a + b) {
            1.0
        } else {
            0.0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_xoshiro::Xoshiro256PlusPlus;

    fn moments(xs: &[f64]) -> (f64, f64) {
        let n = xs.len() as f64;
        let m = xs.iter().sum::<f64>() / n;
        let v = xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1.0);
        (m, v)
    }

    #[test]
    fn gamma_moments_match_for_small_and_large_shapes() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(7);
        for &shape in &[0.3, 1.0, 2.5, 100.0] {
            let xs: Vec<f64> = (0..200_000).map(|_| gamma(&mut rng, shape)).collect();
            let (m, v) = moments(&xs);
            assert!(
                (m - shape).abs() < 0.02 * shape.max(1.0),
                "mean {m} shape {shape}"
            );
            assert!(
                (v - shape).abs() < 0.05 * shape.max(1.0),
                "var {v} shape {shape}"
            );
        }
    }

    #[test]
    fn beta_mean_matches_and_stays_in_unit_interval() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(11);
        for &(a, b) in &[(1.0, 1.0), (2.0, 18.0), (100.0, 1000.0), (0.5, 0.5)] {
            let xs: Vec<f64> = (0..100_000).map(|_| beta(&mut rng, a, b)).collect();
            assert!(xs.iter().all(|x| (0.0..=1.0).contains(x)));
            let (m, _) = moments(&xs);
            let want = a / (a + b);
            assert!(
                (m - want).abs() < 0.01,
                "beta({a},{b}) mean {m} want {want}"
            );
        }
    }
}
