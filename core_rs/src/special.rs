//! Special functions: log-gamma, the regularized incomplete beta function and its inverse.

/// ln Γ(x) for x > 0 (Lanczos, g = 7, n = 9; relative error ~1e-15).
pub fn ln_gamma(x: f64) -> f64 {
    const COEF: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection formula.
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut acc = COEF[0];
    let t = x + 7.5;
    for (i, c) in COEF.iter().enumerate().skip(1) {
        acc += c / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + acc.ln()
}

/// Continued fraction for the incomplete beta function (modified Lentz).
fn beta_cf(a: f64, b: f64, x: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let qab = a + b;
    let qap = a + 1.0;
    let qam = a - 1.0;
    let mut c = 1.0;
    let mut d = 1.0 - qab * x / qap;
    if d.abs() < TINY {
        d = TINY;
    }
    d = 1.0 / d;
    let mut h = d;
    for m in 1..=300 {
        let m = m as f64;
        let m2 = 2.0 * m;
        let aa = m * (b - m) * x / ((qam + m2) * (a + m2));
        d = 1.0 + aa * d;
        if d.abs() < TINY {
            d = TINY;
        }
        c = 1.0 + aa / c;
        if c.abs() < TINY {
            c = TINY;
        }
        d = 1.0 / d;
        h *= d * c;
        let aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2));
        d = 1.0 + aa * d;
        if d.abs() < TINY {
            d = TINY;
        }
        c = 1.0 + aa / c;
        if c.abs() < TINY {
            c = TINY;
        }
        d = 1.0 / d;
        let del = d * c;
        h *= del;
        if (del - 1.0).abs() < 1e-14 {
            break;
        }
    }
    h
}

/// Regularized incomplete beta I_x(a, b) = P(Beta(a, b) <= x).
pub fn beta_cdf(x: f64, a: f64, b: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let ln_front = ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln();
    let front = ln_front.exp();
    if x < (a + 1.0) / (a + b + 2.0) {
        front * beta_cf(a, b, x) / a
    } else {
        1.0 - front * beta_cf(b, a, 1.0 - x) / b
    }
}

/// ln P(Beta(a, b) <= x), accurate deep in the lower tail (no cancellation).
fn ln_lower_tail(x: f64, a: f64, b: f64) -> f64 {
    let ln_front = ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln();
    if x < (a + 1.0) / (a + b + 2.0) {
        ln_front + (beta_cf(a, b, x) / a).ln()
    } else {
        (1.0 - (ln_front.exp() * beta_cf(b, a, 1.0 - x) / b))
            .max(1e-300)
            .ln()
    }
}

/// The x with P(Beta(a, b) <= x) = q for q <= 1/2, never above the exact value by more than
/// rounding: safeguarded Newton in ln x on ln CDF (which is close to linear there), with a
/// bisection bracket so it always converges.
fn lower_quantile(q: f64, a: f64, b: f64) -> f64 {
    // Degenerate shapes (0, subnormal products, NaN) have no interior quantile; answer at
    // the edge instead of iterating on NaN (never panic).
    if !(a > 0.0 && b > 0.0 && a.is_finite() && b.is_finite() && q.is_finite()) {
        return if b > 0.0 { 0.0 } else { 1.0 };
    }
    let target = q.ln();
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    let mean = a / (a + b);
    let sd = (a * b / ((a + b).powi(2) * (a + b + 1.0))).sqrt();
    let z = (-2.0 * q.ln()).sqrt();
    let start = mean - z * sd;
    let mut x = if start.is_finite() && mean > 0.0 {
        start.max(mean * 1e-3).min(mean).max(1e-300)
    } else {
        0.5
    };
    for _ in 0..100 {
        let g = ln_lower_tail(x, a, b) - target;
        if g.abs() < 1e-12 {
            break;
        }
        if g < 0.0 {
            lo = x;
        } else {
            hi = x;
        }
        // d ln F / d ln x = x · pdf(x) / F(x)
        let ln_pdf = ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b)
            + (a - 1.0) * x.ln()
            + (b - 1.0) * (1.0 - x).ln();
        let slope = (ln_pdf + x.ln() - (g + target)).exp();
        let mut next = if slope.is_finite() && slope > 0.0 {
            x * (-g / slope).clamp(-30.0, 30.0).exp()
        } else {
            f64::NAN
        };
        if !(next > lo && next < hi) {
            next = if lo > 0.0 { 0.5 * (lo + hi) } else { 0.5 * hi };
        }
        if (next - x).abs() <= 1e-15 * x {
            x = next;
            break;
        }
        x = next;
    }
    x
}

/// Quantile of Beta(a, b): the x with P(Beta <= x) = p. Tails are solved on the side where
/// they are small, so p = 1 − 1e-14 is as accurate as p = 1e-14.
pub fn beta_quantile(p: f64, a: f64, b: f64) -> f64 {
    if p <= 0.0 {
        return 0.0;
    }
    if p >= 1.0 {
        return 1.0;
    }
    if p <= 0.5 {
        lower_quantile(p, a, b)
    } else {
        1.0 - lower_quantile(1.0 - p, b, a)
    }
}

/// A value U with P(Beta(a, b) > U) <= tail, for pruning: the exact upper quantile nudged up
/// past the solver's tolerance.
pub fn beta_upper_bound(tail: f64, a: f64, b: f64) -> f64 {
    if tail <= 0.0 {
        return 1.0;
    }
    let x = lower_quantile(tail.min(0.5), b, a);
    (1.0 - x * (1.0 - 1e-9)).min(1.0)
}

#[cfg(test)]
mod tests {

    #[test]
    fn degenerate_shapes_give_an_edge_not_a_panic() {
        for (a, b) in [
            (0.0, 0.0),
            (f64::NAN, 1.0),
            (1.0, 0.0),
            (5e-324, 5e-324),
            (f64::INFINITY, 1.0),
        ] {
            let q = beta_quantile(0.025, a, b);
            assert!((0.0..=1.0).contains(&q), "a={a} b={b} gave {q}");
            let u = beta_upper_bound(1e-9, a, b);
            assert!(!u.is_nan(), "a={a} b={b} gave {u}");
        }
    }

    use super::*;

    #[test]
    fn ln_gamma_matches_factorials() {
        let mut f = 1.0f64;
        for n in 1..20 {
            assert!((ln_gamma(n as f64) - f.ln()).abs() < 1e-10, "n={n}");
            f *= n as f64;
        }
        assert!((ln_gamma(0.5) - std::f64::consts::PI.sqrt().ln()).abs() < 1e-12);
    }

    #[test]
    fn beta_cdf_closed_forms() {
        // Beta(1, 1) is uniform; Beta(a, 1) has CDF x^a.
        for &x in &[0.1, 0.5, 0.9] {
            assert!((beta_cdf(x, 1.0, 1.0) - x).abs() < 1e-12);
            assert!((beta_cdf(x, 3.0, 1.0) - x.powi(3)).abs() < 1e-12);
        }
    }

    #[test]
    fn quantile_inverts_cdf() {
        for &(a, b) in &[(1.0, 1.0), (3.0, 97.0), (100.0, 1000.0), (0.5, 2.0)] {
            for &p in &[0.025, 0.5, 0.975, 1.0 - 1e-9] {
                let q = beta_quantile(p, a, b);
                assert!((beta_cdf(q, a, b) - p).abs() < 1e-9, "a={a} b={b} p={p}");
            }
        }
    }

    #[test]
    fn upper_bound_is_safe_deep_in_the_tail() {
        for &(a, b) in &[
            (1.0, 5000.0),
            (3.0, 97.0),
            (300.0, 9700.0),
            (0.5, 0.5),
            (50.0, 2.0),
        ] {
            for &tail in &[1e-3, 1e-9, 1e-14] {
                let u = beta_upper_bound(tail, a, b);
                // P(X > u) = I_{1-u}(b, a), computed on the small side.
                let sf = if u >= 1.0 {
                    0.0
                } else {
                    ln_lower_tail(1.0 - u, b, a).exp()
                };
                assert!(
                    sf <= tail * (1.0 + 1e-6),
                    "a={a} b={b} tail={tail}: P(X>{u})={sf}"
                );
                assert!(
                    sf >= tail * 0.99 || u >= 1.0,
                    "bound too loose: a={a} b={b} tail={tail} sf={sf}"
                );
            }
        }
    }
}
