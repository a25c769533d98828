//! The Thompson hot path: one Beta draw per arm over contiguous f32 arrays, keeping the
//! k largest draws.
//!
//! Per arm the kernel stores Marsaglia–Tsang constants d = shape − 1/3 and c = 1/sqrt(9d)
//! for both Gamma draws of Beta(a, b) = X / (X + Y). Three implementations give the same
//! distribution: 16 f32 lanes with AVX-512, 8 lanes (two per block) with AVX2 + FMA, and a
//! scalar loop; the best the CPU supports is chosen at run time. Lanes the vector squeeze
//! cannot accept are finished exactly on the same proposal, and arms with a shape below 1 in
//! scalar f64, so nothing is redrawn in a value-dependent way.

use rand::Rng;
use rand::SeedableRng;
use rand_xoshiro::Xoshiro256PlusPlus;

use crate::sampling;

/// Lane count of the vector kernel; arrays are padded to a multiple of it.
pub const LANES: usize = 16;

/// Which instruction set draws the arms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    Avx2,
    Avx512,
}

impl Isa {
    /// The best instruction set this CPU supports.
    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
        }
        if has_avx2_fma() {
            return Isa::Avx2;
        }
        Isa::Scalar
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }
}

/// Whether the CPU has what the AVX2 kernel needs: AVX2 and FMA.
fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Shapes below this (d < 2/3) take the exact scalar boost path.
pub const SMALL_D: f32 = 2.0 / 3.0;

/// Sampler constants of 16 positions: Marsaglia–Tsang (d, c) of both Gamma draws. The four
/// vectors the kernel loads for a block are one aligned 256-byte record, so updating a
/// position writes four adjacent cache lines (paired by the hardware's adjacent-line
/// prefetch) instead of lines in four arrays megabytes apart.
#[derive(Clone, Copy, Debug)]
#[repr(C, align(64))]
pub struct ConstBlock {
    pub da: [f32; LANES],
    pub ca: [f32; LANES],
    pub db: [f32; LANES],
    pub cb: [f32; LANES],
}

/// Per-position sampler constants, in blocks of `LANES` positions.
#[derive(Clone, Debug, Default)]
pub struct BetaArrays {
    pub blocks: Vec<ConstBlock>,
    /// Number of real (unpadded) positions.
    pub len: usize,
}

/// The vector kernel draws its normals scaled by 108^(-1/4): then x⁴ already carries the
/// 1/108 of the squeeze test, and the stored c is scaled up by the same factor so that
/// c·x (hence t = 1 + c·x) is unchanged. Saves vector operations on the hot path.
pub const X_SCALE: f32 = 0.310_201_62;
/// 1 / X_SCALE = 108^(1/4).
pub const INV_X_SCALE: f32 = 3.223_709_8;

/// Largest shape the f32 kernels take; larger ones are drawn as this. Without it a shape
/// past f32's range (a prior of 1e300 through the core API) made d infinite, and the vector
/// kernels' rejection loop never accepted. The server's own limits on priors, counts and
/// `exploitation` keep shapes far below it; beyond it a Beta keeps the side of 1/2 its mean
/// is on (the spread is beneath f32's resolution either way), not the mean itself when
/// both shapes exceed it.
pub const MAX_KERNEL_SHAPE: f64 = 1e30;

/// (a, b) each at most MAX_KERNEL_SHAPE.
#[inline]
pub fn kernel_shapes(a: f64, b: f64) -> (f64, f64) {
    (a.min(MAX_KERNEL_SHAPE), b.min(MAX_KERNEL_SHAPE))
}

/// Marsaglia–Tsang constants (d, c / X_SCALE) of Gamma(shape); c = 1/sqrt(9d).
#[inline]
pub fn mt_constants(shape: f64) -> (f32, f32) {
    let d = (shape - 1.0 / 3.0) as f32;
    // f32 is plenty here and keeps updates cheap (no f64 square root and division).
    let c = if d > 0.0 {
        INV_X_SCALE / (9.0 * d).sqrt()
    } else {
        0.0
    };
    (d, c)
}

impl BetaArrays {
    pub fn with_len(len: usize) -> Self {
        // Padding lanes hold harmless shapes; the kernel masks them out.
        let (d, c) = mt_constants(1.0);
        let block = ConstBlock {
            da: [d; LANES],
            ca: [c; LANES],
            db: [d; LANES],
            cb: [c; LANES],
        };
        let mut blocks = Vec::new();
        crate::memory::reserve_huge(&mut blocks, len.div_ceil(LANES));
        blocks.resize(len.div_ceil(LANES), block);
        BetaArrays { blocks, len }
    }

    #[inline]
    pub fn set(&mut self, pos: usize, a: f64, b: f64) {
        let (a, b) = kernel_shapes(a, b);
        let (da, ca) = mt_constants(a);
        let (db, cb) = mt_constants(b);
        self.set_constants(pos, (da, ca, db, cb));
    }

    /// The stored constants (da, ca, db, cb) of `pos`.
    #[inline]
    pub fn constants(&self, pos: usize) -> (f32, f32, f32, f32) {
        let (blk, lane) = (&self.blocks[pos / LANES], pos % LANES);
        (blk.da[lane], blk.ca[lane], blk.db[lane], blk.cb[lane])
    }

    #[inline]
    pub fn set_constants(&mut self, pos: usize, (da, ca, db, cb): (f32, f32, f32, f32)) {
        let (blk, lane) = (&mut self.blocks[pos / LANES], pos % LANES);
        blk.da[lane] = da;
        blk.ca[lane] = ca;
        blk.db[lane] = db;
        blk.cb[lane] = cb;
    }

    /// The shapes actually sampled at `pos` (recovered from the stored constants, so the
    /// scalar and vector paths sample exactly the same distribution).
    #[inline]
    pub fn shapes(&self, pos: usize) -> (f64, f64) {
        let (da, _, db, _) = self.constants(pos);
        (da as f64 + 1.0 / 3.0, db as f64 + 1.0 / 3.0)
    }
}

/// The k largest draws seen so far, best first.
#[derive(Clone, Debug)]
pub struct TopK {
    pub k: usize,
    pub items: Vec<(f32, u32)>,
}

impl TopK {
    pub fn new(k: usize) -> Self {
        TopK {
            k,
            items: Vec::with_capacity(k + 1),
        }
    }

    /// A draw must exceed this to enter.
    #[inline]
    pub fn threshold(&self) -> f32 {
        if self.items.len() < self.k {
            f32::NEG_INFINITY
        } else {
            self.items[self.k - 1].0
        }
    }

    #[inline]
    pub fn offer(&mut self, value: f32, pos: u32) {
        if value <= self.threshold() && self.items.len() >= self.k {
            return;
        }
        // Append and sift towards the front: for the small k of slates this beats a binary
        // search plus `insert` (a memmove call per offer). Equal draws keep arrival order.
        if self.items.len() == self.k {
            self.items.pop();
        }
        // Shift the smaller items one place back (not `swap`: a swap reloads what the
        // previous step just stored, a store-forwarding stall per step).
        let mut i = self.items.len();
        self.items.push((value, pos));
        while i > 0 && self.items[i - 1].0 < value {
            self.items[i] = self.items[i - 1];
            i -= 1;
        }
        self.items[i] = (value, pos);
    }
}

/// Random state of the kernel: two independent xoshiro256++ streams of 8 u64 lanes each
/// (independent streams shorten the dependency chain), plus a scalar generator for the
/// rare lanes finished in scalar.
#[derive(Clone, Debug)]
pub struct KernelRng {
    pub lanes: [[[u64; 8]; 4]; 2],
    pub scalar: Xoshiro256PlusPlus,
    /// Scratch space of the vector kernel, allocated once: zeroing 6 KiB of stack per call
    /// cost as much as drawing a few hundred arms.
    pub scratch: Box<KernelScratch>,
}

/// Positions whose proposals the vector kernel buffers before it accepts and selects.
pub const GROUP: usize = 16 * LANES;

/// Slate candidates collected between threshold updates.
pub const CANDIDATES: usize = 256;

/// Working buffers of the vector kernel (contents are meaningless between calls).
#[derive(Clone)]
pub struct KernelScratch {
    /// Proposals of one group, both Gamma draws: scaled normals x·X_SCALE and f = 2 − u
    /// (u the acceptance uniform).
    pub xa: [f32; GROUP],
    pub xb: [f32; GROUP],
    pub ua: [f32; GROUP],
    pub ub: [f32; GROUP],
    /// Slate candidates: both Gamma draws (the Beta draw is x / (x + y)) and the position.
    pub cand_x: [f32; CANDIDATES],
    pub cand_y: [f32; CANDIDATES],
    pub cand_pos: [u32; CANDIDATES],
    /// Both Gamma draws of every position of a group (small slates).
    pub gx: [f32; GROUP],
    pub gy: [f32; GROUP],
}

impl Default for KernelScratch {
    fn default() -> Self {
        KernelScratch {
            xa: [0.0; GROUP],
            xb: [0.0; GROUP],
            ua: [0.0; GROUP],
            ub: [0.0; GROUP],
            cand_x: [0.0; CANDIDATES],
            cand_y: [0.0; CANDIDATES],
            cand_pos: [0; CANDIDATES],
            gx: [0.0; GROUP],
            gy: [1.0; GROUP],
        }
    }
}

impl std::fmt::Debug for KernelScratch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KernelScratch { .. }")
    }
}

impl KernelRng {
    pub fn seed_from_u64(seed: u64) -> Self {
        let mut seeder = Xoshiro256PlusPlus::seed_from_u64(seed);
        let mut lanes = [[[0u64; 8]; 4]; 2];
        for stream in lanes.iter_mut() {
            for word in stream.iter_mut() {
                for lane in word.iter_mut() {
                    *lane = seeder.random();
                }
            }
        }
        // An all-zero lane (which would stay zero) has probability 2^-256: not checked.
        seeder.jump();
        KernelRng {
            lanes,
            scalar: seeder,
            scratch: Box::default(),
        }
    }
}

/// One exact Gamma(d + 1/3) draw continuing Marsaglia–Tsang from a vector proposal that the
/// squeeze did not accept: the full log test on the same proposal, then fresh proposals
/// until one is accepted. The proposal comes as the vector kernel keeps it: the scaled
/// normal xs = x·X_SCALE, f = 2 − u in [1, 2), and the stored (scaled) c.
#[inline]
pub fn finish_gamma(d: f32, c: f32, xs: f32, f: f32, rng: &mut Xoshiro256PlusPlus) -> f64 {
    let shape = d as f64 + 1.0 / 3.0;
    if d < SMALL_D {
        return sampling::gamma(rng, shape);
    }
    let (d, u) = (d as f64, 2.0 - f as f64);
    let t = 1.0 + c as f64 * xs as f64;
    let x = xs as f64 / X_SCALE as f64;
    if t > 0.0 {
        let v = t * t * t;
        let accept_squeeze = (1.0 - u) * 108.0 * d * t.min(1.0) > x.powi(4);
        if accept_squeeze || u.ln() < 0.5 * x * x + d * (1.0 - v + v.ln()) {
            return d * v;
        }
    }
    sampling::gamma(rng, shape)
}

/// Beta draw from two Gamma draws; never NaN.
#[inline]
pub fn beta_from_gammas(x: f64, y: f64) -> f32 {
    let s = x + y;
    if s > 0.0 {
        (x / s) as f32
    } else {
        0.0
    }
}

/// Draws every position in start..end (start a multiple of LANES) and offers the draws to
/// `top` as `pos + offset`; positions flagged in `skip` are drawn but never offered (the
/// pruned path draws them elsewhere).
#[allow(clippy::too_many_arguments)]
pub fn draw_range(
    isa: Isa,
    arrays: &BetaArrays,
    start: usize,
    end: usize,
    rng: &mut KernelRng,
    top: &mut TopK,
    skip: Option<&[bool]>,
    offset: u32,
) {
    debug_assert!(start.is_multiple_of(LANES) && end <= arrays.len);
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            // SAFETY: Isa::Avx512 is only constructed after run-time detection of avx512f
            // (see `Isa::detect` and `Isa::checked`).
            unsafe { crate::avx512::draw_range(arrays, start, end, rng, top, skip, offset) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            // SAFETY: Isa::Avx2 is only constructed after run-time detection of avx2 and fma
            // (see `Isa::detect` and `Isa::checked`).
            unsafe { crate::avx2::draw_range(arrays, start, end, rng, top, skip, offset) }
        }
        _ => draw_range_scalar(arrays, start, end, rng, top, skip, offset),
    }
}

impl Isa {
    /// `want` if this CPU supports it, else an error message.
    pub fn checked(want: &str) -> Result<Isa, String> {
        match want {
            "auto" | "" => Ok(Isa::detect()),
            "scalar" => Ok(Isa::Scalar),
            "avx512" => {
                if Isa::detect() == Isa::Avx512 {
                    Ok(Isa::Avx512)
                } else {
                    Err("this CPU has no AVX-512F; use isa=\"auto\" or \"scalar\"".into())
                }
            }
            "avx2" => {
                if has_avx2_fma() {
                    Ok(Isa::Avx2)
                } else {
                    Err("this CPU has no AVX2 and FMA; use isa=\"auto\" or \"scalar\"".into())
                }
            }
            other => Err(format!(
                "unknown isa {other:?}; expected auto, avx512, avx2 or scalar"
            )),
        }
    }
}

/// The scalar path: the same Beta distribution, one arm at a time in f64.
pub fn draw_range_scalar(
    arrays: &BetaArrays,
    start: usize,
    end: usize,
    rng: &mut KernelRng,
    top: &mut TopK,
    skip: Option<&[bool]>,
    offset: u32,
) {
    for pos in start..end {
        let (a, b) = arrays.shapes(pos);
        let x = sampling::gamma(&mut rng.scalar, a);
        let y = sampling::gamma(&mut rng.scalar, b);
        let draw = beta_from_gammas(x, y);
        if skip.is_some_and(|s| s[pos]) {
            continue;
        }
        top.offer(draw, pos as u32 + offset);
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use rand_distr::{Beta, Distribution};

    /// Chi-square statistic of homogeneity between two count vectors over the same bins.
    pub fn chi2_two_sample(x: &[u64], y: &[u64]) -> (f64, usize) {
        let (nx, ny) = (x.iter().sum::<u64>() as f64, y.iter().sum::<u64>() as f64);
        let (kx, ky) = ((ny / nx).sqrt(), (nx / ny).sqrt());
        let mut stat = 0.0;
        let mut bins = 0;
        for (&a, &b) in x.iter().zip(y) {
            if a + b == 0 {
                continue;
            }
            bins += 1;
            let d = kx * a as f64 - ky * b as f64;
            stat += d * d / (a + b) as f64;
        }
        (stat, bins.max(1) - 1)
    }

    /// Upper 0.1% point of chi-square with `df` degrees of freedom (Wilson–Hilferty).
    pub fn chi2_critical(df: usize) -> f64 {
        let k = df as f64;
        let z = 3.090_232; // standard normal 0.999 quantile
        k * (1.0 - 2.0 / (9.0 * k) + z * (2.0 / (9.0 * k)).sqrt()).powi(3)
    }

    /// Inclusion counts in the top k of every position not skipped, over `n` kernel draws.
    fn included_kernel(
        isa: Isa,
        shapes: &[(f64, f64)],
        skip: Option<&[bool]>,
        k: usize,
        n: usize,
        seed: u64,
    ) -> Vec<u64> {
        let mut arrays = BetaArrays::with_len(shapes.len());
        for (i, &(a, b)) in shapes.iter().enumerate() {
            arrays.set(i, a, b);
        }
        let mut rng = KernelRng::seed_from_u64(seed);
        let mut counts = vec![0u64; shapes.len()];
        for _ in 0..n {
            let mut top = TopK::new(k);
            draw_range(isa, &arrays, 0, shapes.len(), &mut rng, &mut top, skip, 0);
            for item in &top.items {
                counts[item.1 as usize] += 1;
            }
        }
        counts
    }

    /// The same from independent Beta draws (rand_distr) of the positions not skipped only.
    fn included_reference(
        shapes: &[(f64, f64)],
        skip: Option<&[bool]>,
        k: usize,
        n: usize,
        seed: u64,
    ) -> Vec<u64> {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        let dists: Vec<(usize, Beta<f64>)> = shapes
            .iter()
            .enumerate()
            .filter(|&(i, _)| !skip.is_some_and(|s| s[i]))
            .map(|(i, &(a, b))| (i, Beta::new(a, b).unwrap()))
            .collect();
        let mut counts = vec![0u64; shapes.len()];
        let mut draws: Vec<(f64, usize)> = Vec::with_capacity(dists.len());
        for _ in 0..n {
            draws.clear();
            draws.extend(dists.iter().map(|(i, d)| (d.sample(&mut rng), *i)));
            draws.sort_unstable_by(|x, y| y.0.total_cmp(&x.0));
            for &(_, i) in &draws[..k] {
                counts[i] += 1;
            }
        }
        counts
    }

    /// Every kernel this CPU can run.
    pub fn isas() -> Vec<Isa> {
        ["scalar", "avx2", "avx512"]
            .iter()
            .filter_map(|name| Isa::checked(name).ok())
            .collect()
    }

    fn assert_matches_reference(shapes: &[(f64, f64)], label: &str) {
        let n = 1_000_000;
        let reference = included_reference(shapes, None, 1, n, 99);
        for isa in isas() {
            let got = included_kernel(isa, shapes, None, 1, n, 7);
            let (stat, df) = chi2_two_sample(&got, &reference);
            assert!(
                stat < chi2_critical(df),
                "{label} {isa:?}: chi2 {stat:.1} > {:.1} (df {df}); kernel {got:?} reference {reference:?}",
                chi2_critical(df)
            );
        }
    }

    /// Large shapes (a ≈ 100, b ≈ 1,000): the vector squeeze accepts almost every lane.
    #[test]
    fn winner_frequencies_match_reference_for_large_shapes() {
        let shapes: Vec<(f64, f64)> = (0..20)
            .map(|i| (95.0 + i as f64 * 0.6, 1000.0 + (i % 3) as f64 * 5.0))
            .collect();
        assert_matches_reference(&shapes, "large");
    }

    /// Small shapes (a ≈ 1–3, b ≈ 10–20): the scalar finish and the shape < 1 boost run often.
    #[test]
    fn winner_frequencies_match_reference_for_small_shapes() {
        let shapes: Vec<(f64, f64)> = (0..20)
            .map(|i| (1.0 + (i % 5) as f64 * 0.5, 10.0 + i as f64 * 0.5))
            .chain([(0.5, 3.0), (0.7, 9.0), (2.0, 0.8)])
            .collect();
        assert_matches_reference(&shapes, "small");
    }

    #[test]
    fn draws_are_probabilities_and_top_k_is_distinct() {
        let shapes: Vec<(f64, f64)> = (0..37).map(|i| (0.3 + i as f64, 2.0 + i as f64)).collect();
        let mut arrays = BetaArrays::with_len(shapes.len());
        for (i, &(a, b)) in shapes.iter().enumerate() {
            arrays.set(i, a, b);
        }
        let mut rng = KernelRng::seed_from_u64(3);
        for isa in isas() {
            for _ in 0..2000 {
                let mut top = TopK::new(5);
                draw_range(isa, &arrays, 0, shapes.len(), &mut rng, &mut top, None, 0);
                assert_eq!(top.items.len(), 5);
                let mut pos: Vec<u32> = top.items.iter().map(|t| t.1).collect();
                assert!(top.items.windows(2).all(|w| w[0].0 >= w[1].0));
                assert!(top.items.iter().all(|t| (0.0..=1.0).contains(&t.0)));
                pos.sort();
                pos.dedup();
                assert_eq!(pos.len(), 5);
                assert!(pos.iter().all(|&p| (p as usize) < shapes.len()));
            }
        }
    }

    /// A small slate (k <= 16, chosen from lane maxima) is exactly the first k of the full
    /// ranking of the same draws: same seed, same random numbers, k = every position.
    #[test]
    fn small_slates_are_the_top_of_the_full_ranking() {
        // 600 positions span three kernel groups; small shapes exercise the scalar finish.
        let shapes: Vec<(f64, f64)> = (0..600)
            .map(|i| match i % 4 {
                0 => (0.6 + (i % 7) as f64 * 0.2, 4.0 + (i % 11) as f64),
                _ => (20.0 + (i % 13) as f64, 300.0 + (i % 17) as f64 * 9.0),
            })
            .collect();
        let mut arrays = BetaArrays::with_len(shapes.len());
        for (i, &(a, b)) in shapes.iter().enumerate() {
            arrays.set(i, a, b);
        }
        for isa in isas() {
            for seed in 0..200 {
                let mut all = TopK::new(shapes.len());
                let mut rng = KernelRng::seed_from_u64(seed);
                draw_range(isa, &arrays, 0, shapes.len(), &mut rng, &mut all, None, 0);
                for k in [2, 5, 10, 16] {
                    let mut top = TopK::new(k);
                    let mut rng = KernelRng::seed_from_u64(seed);
                    draw_range(isa, &arrays, 0, shapes.len(), &mut rng, &mut top, None, 0);
                    assert_eq!(top.items, all.items[..k], "{isa:?} seed {seed} k {k}");
                    // In two calls (as the pruned draw does): the second starts from a
                    // slate already holding draws. The same numbers are drawn in order.
                    let in_two_calls = |k: usize| {
                        let mut top = TopK::new(k);
                        let mut rng = KernelRng::seed_from_u64(seed);
                        let cut = 18 * LANES;
                        draw_range(isa, &arrays, 0, cut, &mut rng, &mut top, None, 0);
                        let end = shapes.len();
                        draw_range(isa, &arrays, cut, end, &mut rng, &mut top, None, 0);
                        top
                    };
                    let (split, whole) = (in_two_calls(k), in_two_calls(shapes.len()));
                    assert_eq!(
                        split.items,
                        whole.items[..k],
                        "split: {isa:?} seed {seed} k {k}"
                    );
                }
            }
        }
    }

    /// Shapes near 1 (d near SMALL_D): the squeeze rejects a few percent of lanes, so the
    /// exact vector finish runs in most blocks.
    #[test]
    fn winner_frequencies_match_reference_for_shapes_near_one() {
        let shapes: Vec<(f64, f64)> = (0..20)
            .map(|i| (1.0 + (i % 4) as f64 * 0.1, 1.0 + (i % 5) as f64 * 0.15))
            .collect();
        assert_matches_reference(&shapes, "near one");
    }

    /// Similar means at very different scales (so the winner is spread over the arms), across
    /// three blocks with a padded tail: large shapes, shapes near 1 and shapes below 1.
    #[test]
    fn winner_frequencies_match_reference_for_mixed_shapes() {
        let scales = [0.4, 0.7, 1.0, 1.1, 1.5, 3.0, 12.0, 40.0, 150.0];
        let shapes: Vec<(f64, f64)> = (0..41)
            .map(|i| {
                let s = scales[i % scales.len()];
                let mean = 0.3 + 0.01 * (i % 7) as f64;
                (s, s * (1.0 - mean) / mean)
            })
            .collect();
        assert_matches_reference(&shapes, "mixed");
    }

    /// Each draw's probability integral transform through the exact Beta CDF is uniform:
    /// checks the whole distribution of every position, not only who wins.
    #[test]
    fn draws_follow_the_beta_distribution() {
        let shapes = [
            (0.3, 2.0),
            (0.5, 0.5),
            (0.7, 0.9),
            (0.9, 1.1),
            (1.0, 1.0),
            (1.0, 3.0),
            (1.05, 40.0),
            (1.3, 1.7),
            (2.0, 60.0),
            (3.0, 5000.0),
            (30.0, 300.0),
            (250.0, 4000.0),
            (5000.0, 4000.0),
            (0.68, 1.2),
            (7.0, 0.6),
            (1.8, 2.2),
            (60.0, 1.0),
        ];
        let mut arrays = BetaArrays::with_len(shapes.len());
        for (i, &(a, b)) in shapes.iter().enumerate() {
            arrays.set(i, a, b);
        }
        const BINS: usize = 50;
        let n = 100_000;
        for isa in isas() {
            let mut rng = KernelRng::seed_from_u64(17);
            let mut counts = vec![[0u64; BINS]; shapes.len()];
            for _ in 0..n {
                let mut all = TopK::new(shapes.len());
                draw_range(isa, &arrays, 0, shapes.len(), &mut rng, &mut all, None, 0);
                assert_eq!(all.items.len(), shapes.len());
                for &(v, pos) in &all.items {
                    let (a, b) = arrays.shapes(pos as usize);
                    let q = crate::special::beta_cdf(v as f64, a, b);
                    counts[pos as usize][((q * BINS as f64) as usize).min(BINS - 1)] += 1;
                }
            }
            let expected = n as f64 / BINS as f64;
            for (pos, c) in counts.iter().enumerate() {
                let stat: f64 = c
                    .iter()
                    .map(|&o| (o as f64 - expected).powi(2) / expected)
                    .sum();
                assert!(
                    stat < chi2_critical(BINS - 1),
                    "{isa:?} Beta{:?}: chi2 {stat:.1}; counts {c:?}",
                    shapes[pos]
                );
            }
        }
    }

    /// Only positions in start..end that are not skipped are offered, each exactly once and
    /// as pos + offset: never the padding lanes of the last block (which hold Beta(1, 1)),
    /// real positions past `end`, or skipped positions (all given the best means here).
    #[test]
    fn padding_and_skipped_positions_are_never_offered() {
        let len = 45;
        let mut arrays = BetaArrays::with_len(len);
        for i in 0..len {
            arrays.set(i, 1.0, 1000.0);
        }
        let skipped = [16, 19, 30, 31, 36];
        let mut skip = vec![false; len];
        for &p in &skipped {
            skip[p] = true;
            arrays.set(p, 1000.0, 1.0);
        }
        // Positions past `end` in the same block and in the next one.
        for p in 37..len {
            arrays.set(p, 1000.0, 1.0);
        }
        let (start, end, offset) = (16, 37, 1000u32);
        let want: Vec<u32> = (start..end)
            .filter(|&p| !skip[p])
            .map(|p| p as u32 + offset)
            .collect();
        for isa in isas() {
            let mut rng = KernelRng::seed_from_u64(5);
            for round in 0..3000 {
                // k = every candidate, then slates that exclusions would change.
                for k in [want.len(), 1, 3] {
                    let mut top = TopK::new(k);
                    let s = Some(skip.as_slice());
                    draw_range(isa, &arrays, start, end, &mut rng, &mut top, s, offset);
                    let mut got: Vec<u32> = top.items.iter().map(|t| t.1).collect();
                    got.sort();
                    if k == want.len() {
                        assert_eq!(got, want, "{isa:?} round {round}");
                    } else {
                        assert_eq!(got.len(), k, "{isa:?} round {round} k {k}");
                        assert!(got.iter().all(|p| want.contains(p)), "{isa:?} {got:?}");
                    }
                }
                // Without skip: the whole of the last (padded) block, nothing past `len`.
                let mut top = TopK::new(1);
                draw_range(isa, &arrays, 32, len, &mut rng, &mut top, None, 0);
                assert!((32..len as u32).contains(&top.items[0].1), "{isa:?}");
            }
        }
    }

    /// The pruned index draws its "dirty" arms (posterior changed since the last reorder)
    /// outside the kernel and skips them inside it. Skipping must not change the chances of
    /// the other arms: here the skipped positions have the best posteriors by far, one or two
    /// in every 8- and 16-lane block, so a kernel that lets a skipped lane stand for its block
    /// (the AVX-512 top-1 bug: the block then offered nothing) or drops a block's runner-up
    /// would choose some arms too rarely. Every kernel's top-1 and top-3 inclusion counts
    /// must match independent Beta draws of the arms not skipped.
    #[test]
    fn skipped_positions_do_not_bias_the_other_arms() {
        let len = 53; // a padded last block
        let shapes: Vec<(f64, f64)> = (0..len)
            .map(|i| {
                if i % 7 == 3 {
                    (400.0, 20.0) // skipped: mean 0.95
                } else {
                    (3.0 + (i % 5) as f64 * 2.0, 12.0 + (i % 4) as f64 * 3.0)
                }
            })
            .collect();
        let skip: Vec<bool> = (0..len).map(|i| i % 7 == 3).collect();
        let n = 400_000;
        for k in [1, 3] {
            let reference = included_reference(&shapes, Some(&skip), k, n, 97 + k as u64);
            for isa in isas() {
                let got = included_kernel(isa, &shapes, Some(&skip), k, n, 11 + k as u64);
                let offered = got.iter().sum::<u64>();
                assert_eq!(
                    offered,
                    (n * k) as u64,
                    "{isa:?} k {k}: {offered} offered in {n} draws"
                );
                assert!(
                    skip.iter().zip(&got).all(|(&s, &c)| !s || c == 0),
                    "{isa:?} k {k}: skipped offered"
                );
                let (stat, df) = chi2_two_sample(&got, &reference);
                assert!(
                    stat < chi2_critical(df),
                    "{isa:?} k {k}: chi2 {stat:.1} > {:.1} (df {df}); kernel {got:?} reference {reference:?}",
                    chi2_critical(df)
                );
            }
        }
    }

    /// Prints ns per arm of each kernel over 10,000 arms, top-1 and top-10 (not asserted):
    /// `cargo test --release -- --ignored --nocapture kernel_speed`.
    #[test]
    #[ignore]
    fn kernel_speed() {
        let n = 10_000;
        let mut seed = Xoshiro256PlusPlus::seed_from_u64(1);
        let mut u = |lo: f64, hi: f64| lo + (hi - lo) * seed.random::<f64>();
        let worlds: Vec<(&str, Vec<(f64, f64)>)> = vec![
            (
                "a 2..250, b 40..5000",
                (0..n).map(|_| (u(2.0, 250.0), u(40.0, 5000.0))).collect(),
            ),
            (
                "a, b 1..1.5",
                (0..n).map(|_| (u(1.0, 1.5), u(1.0, 1.5))).collect(),
            ),
            (
                "a 1, b 40..5000",
                (0..n).map(|_| (1.0, u(40.0, 5000.0))).collect(),
            ),
            (
                "a 0.3..1, b 1..20",
                (0..n).map(|_| (u(0.3, 1.0), u(1.0, 20.0))).collect(),
            ),
        ];
        let mut rng = KernelRng::seed_from_u64(7);
        for (name, shapes) in &worlds {
            let mut arrays = BetaArrays::with_len(n);
            for (i, &(a, b)) in shapes.iter().enumerate() {
                arrays.set(i, a, b);
            }
            for isa in isas() {
                for k in [1, 10] {
                    let reps = if isa == Isa::Scalar { 100 } else { 1000 };
                    let mut times: Vec<f64> = (0..reps)
                        .map(|_| {
                            let t = std::time::Instant::now();
                            let mut top = TopK::new(k);
                            draw_range(isa, &arrays, 0, n, &mut rng, &mut top, None, 0);
                            std::hint::black_box(&top);
                            t.elapsed().as_secs_f64()
                        })
                        .collect();
                    times.sort_by(f64::total_cmp);
                    let median = times[reps / 2];
                    println!(
                        "{name:22} {:7} top-{k:<2}: {:6.2} ns/arm, {:7.1} µs per draw",
                        isa.name(),
                        median * 1e9 / n as f64,
                        median * 1e6
                    );
                }
            }
        }
    }
}
