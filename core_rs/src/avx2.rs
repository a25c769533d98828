//! AVX2 + FMA Thompson kernel: the AVX-512 kernel's method on 8 f32 lanes per register, for
//! CPUs without AVX-512 (each 16-position block of the arrays is two halves).
//!
//! Passes over a group of up to 256 positions, each with short independent iterations that
//! the out-of-order core overlaps:
//! 1. random bits: xoshiro256++ on the kernel's two streams (8 u64 lanes each, worked as
//!    two registers of 4); the proposals' raw bits and the acceptance uniforms f = 2 − u go
//!    to the scratch buffers. A stream's state fills 8 of the 16 ymm registers, so the
//!    streams take turns instead of running inside the arithmetic passes.
//! 2. Box–Muller: two normals per lane (polynomial log, sin and cos; the quadrant from
//!    random sign bits), kept scaled by X_SCALE as in `avx512.rs`.
//! 3. Marsaglia–Tsang: both Gamma draws of every position, the squeeze, and a filter
//!    against the k-th best draw so far (X·(1 − θ) > θ·Y, no division). A block whose
//!    lanes all pass the squeeze and none the filter costs one well-predicted branch; the
//!    others are noted for the passes below.
//! 4. the squeeze's rejects, finished exactly on the same proposal (full log test, then
//!    fresh proposals), gathered 8 to a vector: with shapes near 1 a block has a reject
//!    more often than not, but rarely more than one or two.
//! 5. selection in the noted blocks: draws that pass the filter and draws with a shape
//!    below 1 (finished in scalar by `kernel::finish_gamma`) are offered to the scalar
//!    `TopK`, which checks each exactly.
#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use crate::kernel::{
    beta_from_gammas, finish_gamma, BetaArrays, ConstBlock, KernelRng, KernelScratch, TopK, GROUP,
    INV_X_SCALE, LANES, SMALL_D, X_SCALE,
};
use rand_xoshiro::Xoshiro256PlusPlus;

/// f32 lanes per register.
const HALF: usize = 8;

/// Random state of a whole kernel: `KernelRng::lanes`, two streams of 8 u64 lanes.
type Lanes = [[[u64; 8]; 4]; 2];

/// Four xoshiro256++ lanes: one half (lanes 4·`half`..) of a stream. The lane layout is
/// that of `avx512::Stream`, so either kernel continues the other's state.
struct Gen4 {
    s0: __m256i,
    s1: __m256i,
    s2: __m256i,
    s3: __m256i,
}

/// Rotate every u64 lane left by `L` (`R` = 64 − L): AVX2 has no 64-bit rotate.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn rotl<const L: i32, const R: i32>(x: __m256i) -> __m256i {
    _mm256_or_si256(_mm256_slli_epi64::<L>(x), _mm256_srli_epi64::<R>(x))
}

impl Gen4 {
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load(words: &[[u64; 8]; 4], half: usize) -> Gen4 {
        let at = |w: usize| _mm256_loadu_si256(words[w][4 * half..].as_ptr() as *const __m256i);
        Gen4 {
            s0: at(0),
            s1: at(1),
            s2: at(2),
            s3: at(3),
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn store(&self, words: &mut [[u64; 8]; 4], half: usize) {
        let at = |w: &mut [u64; 8]| w[4 * half..].as_mut_ptr() as *mut __m256i;
        _mm256_storeu_si256(at(&mut words[0]), self.s0);
        _mm256_storeu_si256(at(&mut words[1]), self.s1);
        _mm256_storeu_si256(at(&mut words[2]), self.s2);
        _mm256_storeu_si256(at(&mut words[3]), self.s3);
    }

    /// One xoshiro256++ step on every lane: 4 × 64 random bits.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn next(&mut self) -> __m256i {
        let result = _mm256_add_epi64(rotl::<23, 41>(_mm256_add_epi64(self.s0, self.s3)), self.s0);
        let t = _mm256_slli_epi64::<17>(self.s1);
        self.s2 = _mm256_xor_si256(self.s2, self.s0);
        self.s3 = _mm256_xor_si256(self.s3, self.s1);
        self.s1 = _mm256_xor_si256(self.s1, self.s2);
        self.s0 = _mm256_xor_si256(self.s0, self.s3);
        self.s2 = _mm256_xor_si256(self.s2, t);
        self.s3 = rotl::<45, 19>(self.s3);
        result
    }
}

/// 8 uniforms f in [1, 2) from the top 23 bits of each 32-bit lane: the bits become the
/// mantissa (no integer-to-float conversion).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn uniform12(bits: __m256i) -> __m256 {
    _mm256_castsi256_ps(_mm256_or_si256(
        _mm256_srli_epi32::<9>(bits),
        _mm256_set1_epi32(0x3F80_0000),
    ))
}

/// 8 uniforms u = 2 − f in (0, 1].
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn uniform01(bits: __m256i) -> __m256 {
    _mm256_sub_ps(_mm256_set1_ps(2.0), uniform12(bits))
}

/// Box–Muller radius of the scaled normals: X_SCALE · sqrt(−2 ln u).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn scaled_radius(bits: __m256i) -> __m256 {
    // max(0, ·): ln u of u = 1 may come out as −0.
    _mm256_sqrt_ps(_mm256_max_ps(
        _mm256_mul_ps(
            _mm256_set1_ps(-2.0 * X_SCALE * X_SCALE),
            ln(uniform01(bits)),
        ),
        _mm256_setzero_ps(),
    ))
}

/// Natural log of positive normal floats (Cephes logf polynomial; relative error ~1e-7).
#[allow(clippy::excessive_precision)] // Cephes' published coefficients
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn ln(x: __m256) -> __m256 {
    // x = 2^e · m with m in [sqrt(1/2), sqrt(2)), by integer operations (AVX2 has no
    // getexp/getmant): subtracting the bits of sqrt(1/2) moves the exponent boundary to
    // sqrt(1/2), so the biased exponent field of the difference is e, and removing e from
    // the exponent of x leaves m.
    let bits = _mm256_castps_si256(x);
    let off = _mm256_sub_epi32(bits, _mm256_set1_epi32(0x3F35_04F3));
    let e = _mm256_cvtepi32_ps(_mm256_srai_epi32::<23>(off));
    let m = _mm256_castsi256_ps(_mm256_sub_epi32(
        bits,
        _mm256_and_si256(off, _mm256_set1_epi32(0xFF80_0000_u32 as i32)),
    ));
    let f = _mm256_sub_ps(m, _mm256_set1_ps(1.0));
    // P(f) = Σ c_i f^i by Estrin's scheme: short dependency chains.
    let c = |v: f32| _mm256_set1_ps(v);
    let f2 = _mm256_mul_ps(f, f);
    let f4 = _mm256_mul_ps(f2, f2);
    let f8 = _mm256_mul_ps(f4, f4);
    let q01 = _mm256_fmadd_ps(c(-2.499_999_4e-1), f, c(3.333_333_1e-1));
    let q23 = _mm256_fmadd_ps(c(-1.666_805_8e-1), f, c(2.000_071_5e-1));
    let q45 = _mm256_fmadd_ps(c(-1.242_014_1e-1), f, c(1.424_932_3e-1));
    let q67 = _mm256_fmadd_ps(c(-1.151_461_1e-1), f, c(1.167_699_9e-1));
    let q03 = _mm256_fmadd_ps(q23, f2, q01);
    let q47 = _mm256_fmadd_ps(q67, f2, q45);
    let p = _mm256_fmadd_ps(c(7.037_683_6e-2), f8, _mm256_fmadd_ps(q47, f4, q03));
    let f3 = _mm256_mul_ps(f2, f);
    // ln m = f − f²/2 + f³·P(f)
    let lnm = _mm256_fmadd_ps(f3, p, _mm256_fmadd_ps(f2, _mm256_set1_ps(-0.5), f));
    _mm256_fmadd_ps(e, _mm256_set1_ps(std::f32::consts::LN_2), lnm)
}

/// (cos φ, sin φ) for φ in [0, π/2] by Taylor series (absolute error < 6e-8).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn cos_sin(phi: __m256) -> (__m256, __m256) {
    let c = |v: f32| _mm256_set1_ps(v);
    let p2 = _mm256_mul_ps(phi, phi);
    let p4 = _mm256_mul_ps(p2, p2);
    let p8 = _mm256_mul_ps(p4, p4);
    let s01 = _mm256_fmadd_ps(c(-1.0 / 6.0), p2, c(1.0));
    let s23 = _mm256_fmadd_ps(c(-1.0 / 5_040.0), p2, c(1.0 / 120.0));
    let s45 = _mm256_fmadd_ps(c(-1.0 / 39_916_800.0), p2, c(1.0 / 362_880.0));
    let s = _mm256_fmadd_ps(s45, p8, _mm256_fmadd_ps(s23, p4, s01));
    let c01 = _mm256_fmadd_ps(c(-0.5), p2, c(1.0));
    let c23 = _mm256_fmadd_ps(c(-1.0 / 720.0), p2, c(1.0 / 24.0));
    let c45 = _mm256_fmadd_ps(c(-1.0 / 3_628_800.0), p2, c(1.0 / 40_320.0));
    let c46 = _mm256_fmadd_ps(c(1.0 / 479_001_600.0), p4, c45);
    let co = _mm256_fmadd_ps(c46, p8, _mm256_fmadd_ps(c23, p4, c01));
    (co, _mm256_mul_ps(s, phi))
}

/// Flips the sign of each lane whose bit 0 of `bits` is set (bits the uniforms, which use
/// bits 9..32, leave alone).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn random_sign(x: __m256, bits: __m256i) -> __m256 {
    let sign = _mm256_slli_epi32::<31>(bits);
    _mm256_castsi256_ps(_mm256_xor_si256(_mm256_castps_si256(x), sign))
}

/// One scaled normal per lane from two random words (Box–Muller, cosine branch only).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn scaled_normal(bits1: __m256i, bits2: __m256i) -> __m256 {
    let half_pi = _mm256_set1_ps(std::f32::consts::FRAC_PI_2);
    let (co, _) = cos_sin(_mm256_mul_ps(uniform01(bits2), half_pi));
    random_sign(_mm256_mul_ps(scaled_radius(bits1), co), bits1)
}

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn gt(a: __m256, b: __m256) -> __m256 {
    _mm256_cmp_ps::<_CMP_GT_OQ>(a, b)
}

/// Squeeze acceptance of a Marsaglia–Tsang proposal, (1 − u)·108·d·min(1, t) > x⁴, in the
/// kernel's form: xs = x·X_SCALE (so xs⁴ = x⁴/108) and f = 2 − u (so 1 − u = f − 1).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn squeeze(d: __m256, t: __m256, xs: __m256, f: __m256) -> __m256 {
    let x2 = _mm256_mul_ps(xs, xs);
    let x4 = _mm256_mul_ps(x2, x2);
    let dm = _mm256_mul_ps(d, _mm256_min_ps(t, _mm256_set1_ps(1.0)));
    gt(_mm256_fmsub_ps(f, dm, dm), x4)
}

/// The full Marsaglia–Tsang test, t > 0 and ln u < x²/2 + d·(1 − v + ln v) with v = t³, on
/// the kernel's form of the proposal (xs, f) as in `squeeze`.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn full_test(d: __m256, t: __m256, xs: __m256, f: __m256) -> __m256 {
    let one = _mm256_set1_ps(1.0);
    let x = _mm256_mul_ps(xs, _mm256_set1_ps(INV_X_SCALE));
    let u = _mm256_sub_ps(_mm256_set1_ps(2.0), f);
    let v = _mm256_mul_ps(_mm256_mul_ps(t, t), t);
    let positive = gt(t, _mm256_setzero_ps());
    // ln of a non-positive v is not used (masked by `positive`); keep it finite.
    let ln_v = ln(_mm256_max_ps(v, _mm256_set1_ps(f32::MIN_POSITIVE)));
    let rhs = _mm256_fmadd_ps(
        _mm256_mul_ps(x, x),
        _mm256_set1_ps(0.5),
        _mm256_mul_ps(d, _mm256_add_ps(_mm256_sub_ps(one, v), ln_v)),
    );
    _mm256_and_ps(positive, _mm256_cmp_ps::<_CMP_LT_OQ>(ln(u), rhs))
}

/// All-ones in the lanes whose bit is set in the low 8 bits of `bits`.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn mask_of_bits(bits: u32) -> __m256 {
    let lane_bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    let set = _mm256_and_si256(_mm256_set1_epi32(bits as i32), lane_bits);
    _mm256_castsi256_ps(_mm256_cmpeq_epi32(set, lane_bits))
}

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn bits_of(mask: __m256) -> u32 {
    _mm256_movemask_ps(mask) as u32
}

/// One Gamma draw per active lane continuing Marsaglia–Tsang from proposals the squeeze
/// did not accept (shapes >= 1): the full test on the same proposal, then fresh proposals
/// until every active lane accepts.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn finish_batch(
    d: __m256,
    c: __m256,
    x: __m256,
    f: __m256,
    active: __m256,
    ra: &mut Gen4,
    rb: &mut Gen4,
) -> __m256 {
    let one = _mm256_set1_ps(1.0);
    let t = _mm256_fmadd_ps(c, x, one);
    let mut g = _mm256_mul_ps(d, _mm256_mul_ps(_mm256_mul_ps(t, t), t));
    let mut todo = _mm256_andnot_ps(full_test(d, t, x, f), active);
    while bits_of(todo) != 0 {
        let bits1 = ra.next();
        let bits2 = rb.next();
        let bits_u = ra.next();
        let x = scaled_normal(bits1, bits2);
        let f = uniform12(bits_u);
        let t = _mm256_fmadd_ps(c, x, one);
        let accept = _mm256_and_ps(
            todo,
            _mm256_or_ps(squeeze(d, t, x, f), full_test(d, t, x, f)),
        );
        let value = _mm256_mul_ps(d, _mm256_mul_ps(_mm256_mul_ps(t, t), t));
        g = _mm256_blendv_ps(g, value, accept);
        todo = _mm256_andnot_ps(accept, todo);
    }
    g
}

/// Up to 8 squeeze rejects gathered for one vector finish.
struct Batch {
    d: [f32; HALF],
    c: [f32; HALF],
    x: [f32; HALF],
    f: [f32; HALF],
    /// Index of each in the group.
    at: [usize; HALF],
    n: usize,
}

impl Batch {
    /// Finishes the gathered draws and writes them to `g` at their indices.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn flush(&mut self, g: &mut [f32; GROUP], ra: &mut Gen4, rb: &mut Gen4) {
        let value = finish_batch(
            _mm256_loadu_ps(self.d.as_ptr()),
            _mm256_loadu_ps(self.c.as_ptr()),
            _mm256_loadu_ps(self.x.as_ptr()),
            _mm256_loadu_ps(self.f.as_ptr()),
            mask_of_bits((1 << self.n) - 1),
            ra,
            rb,
        );
        let mut out = [0f32; HALF];
        _mm256_storeu_ps(out.as_mut_ptr(), value);
        for (&at, &v) in self.at.iter().zip(&out).take(self.n) {
            *g.get_unchecked_mut(at) = v;
        }
        self.n = 0;
    }
}

/// Finishes the squeeze's rejects of one Gamma draw over a group (`SECOND`: the draw of b,
/// else of a): the lanes set in `pending` (a mask per block, consumed) of the blocks set in
/// `blocks`. They are gathered 8 at a time, so one vector finish serves 8 rejects instead
/// of the one or two a block has. Writes the draws into `buf.gx` (or `buf.gy`).
#[inline(never)]
#[target_feature(enable = "avx2,fma")]
unsafe fn finish_pending<const SECOND: bool>(
    consts: &[ConstBlock],
    buf: &mut KernelScratch,
    pending: &mut [u16; GROUP / LANES],
    mut blocks: u32,
    lanes: &mut Lanes,
) {
    let (xs, fs, gs) = if SECOND {
        (&buf.xb, &buf.ub, &mut buf.gy)
    } else {
        (&buf.xa, &buf.ua, &mut buf.gx)
    };
    let mut ra = Gen4::load(&lanes[0], 0);
    let mut rb = Gen4::load(&lanes[1], 0);
    let mut batch = Batch {
        d: [0.0; HALF],
        c: [0.0; HALF],
        x: [0.0; HALF],
        f: [0.0; HALF],
        at: [0; HALF],
        n: 0,
    };
    while blocks != 0 {
        let j = blocks.trailing_zeros() as usize;
        let m = pending.get_unchecked_mut(j);
        if *m == 0 {
            blocks &= blocks - 1;
            continue;
        }
        let lane = m.trailing_zeros() as usize;
        *m &= *m - 1;
        let blk = consts.get_unchecked(j);
        let i = j * LANES + lane;
        let n = batch.n;
        (batch.d[n], batch.c[n]) = if SECOND {
            (blk.db[lane], blk.cb[lane])
        } else {
            (blk.da[lane], blk.ca[lane])
        };
        (batch.x[n], batch.f[n], batch.at[n]) = (xs[i], fs[i], i);
        batch.n += 1;
        if batch.n == HALF {
            batch.flush(gs, &mut ra, &mut rb);
        }
    }
    if batch.n > 0 {
        batch.flush(gs, &mut ra, &mut rb);
    }
    ra.store(&mut lanes[0], 0);
    rb.store(&mut lanes[1], 0);
}

/// Lanes of a block holding positions before `end`, `left` = end − the block's first.
#[inline]
fn live_bits(left: usize) -> u32 {
    if left >= LANES {
        0xFFFF
    } else {
        (1 << left) - 1
    }
}

/// Draws positions start..end (start a multiple of LANES) and offers them to `top` as
/// `pos + offset`, except positions flagged in `skip`; the same distribution as
/// `kernel::draw_range_scalar`.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn draw_range(
    arrays: &BetaArrays,
    start: usize,
    end: usize,
    rng: &mut KernelRng,
    top: &mut TopK,
    skip: Option<&[bool]>,
    offset: u32,
) {
    debug_assert!(start.is_multiple_of(LANES) && end <= arrays.len);
    let KernelRng {
        lanes,
        scalar,
        scratch,
    } = rng;
    let buf = &mut **scratch;
    let one = _mm256_set1_ps(1.0);
    let small = _mm256_set1_ps(SMALL_D);
    let mut pend_a = [0u16; GROUP / LANES];
    let mut pend_b = [0u16; GROUP / LANES];
    let mut group_start = start;
    while group_start < end {
        let group_len = (end - group_start).min(GROUP);
        let blocks = group_len.div_ceil(LANES);
        // Checked once per group: a caller passing end > arrays.len gets a panic, not UB.
        let consts = &arrays.blocks[group_start / LANES..group_start / LANES + blocks];
        random_bits(lanes, buf, blocks);
        normals(buf, blocks);
        // Pass 3: Gamma draws and squeeze, and a filter against the slate's k-th best.
        // Blocks that are not done (a squeeze reject, a shape below 1, or a draw that may
        // enter the slate) are only noted, which keeps this loop free of unpredictable
        // branches but one per block.
        let (theta, keep) = filter(top);
        let mut flagged = 0u32;
        let (mut any_a, mut any_b) = (0u32, 0u32);
        for (j, blk) in consts.iter().enumerate() {
            let o = j * LANES;
            let live = live_bits(end - (group_start + o));
            let (mut flags, mut pa, mut pb) = (0u32, 0u32, 0u32);
            for h in 0..2 {
                let (c, b) = (h * HALF, o + h * HALF);
                let da = _mm256_loadu_ps(blk.da.as_ptr().add(c));
                let ca = _mm256_loadu_ps(blk.ca.as_ptr().add(c));
                let db = _mm256_loadu_ps(blk.db.as_ptr().add(c));
                let cb = _mm256_loadu_ps(blk.cb.as_ptr().add(c));
                let xa = _mm256_loadu_ps(buf.xa.as_ptr().add(b));
                let xb = _mm256_loadu_ps(buf.xb.as_ptr().add(b));
                let ua = _mm256_loadu_ps(buf.ua.as_ptr().add(b));
                let ub = _mm256_loadu_ps(buf.ub.as_ptr().add(b));
                let ta = _mm256_fmadd_ps(ca, xa, one);
                let tb = _mm256_fmadd_ps(cb, xb, one);
                let ga = _mm256_mul_ps(da, _mm256_mul_ps(_mm256_mul_ps(ta, ta), ta));
                let gb = _mm256_mul_ps(db, _mm256_mul_ps(_mm256_mul_ps(tb, tb), tb));
                _mm256_storeu_ps(buf.gx.as_mut_ptr().add(b), ga);
                _mm256_storeu_ps(buf.gy.as_mut_ptr().add(b), gb);
                let big_a = _mm256_cmp_ps::<_CMP_GE_OQ>(da, small);
                let big_b = _mm256_cmp_ps::<_CMP_GE_OQ>(db, small);
                let sq_a = squeeze(da, ta, xa, ua);
                let sq_b = squeeze(db, tb, xb, ub);
                let ok = _mm256_and_ps(_mm256_and_ps(sq_a, sq_b), _mm256_and_ps(big_a, big_b));
                let hit = gt(_mm256_mul_ps(ga, keep), _mm256_mul_ps(theta, gb));
                flags |= (bits_of(hit) | (bits_of(ok) ^ 0xFF)) << c;
                pa |= bits_of(_mm256_andnot_ps(sq_a, big_a)) << c;
                pb |= bits_of(_mm256_andnot_ps(sq_b, big_b)) << c;
            }
            if flags & live != 0 {
                flagged |= 1 << j;
                pend_a[j] = (pa & live) as u16;
                pend_b[j] = (pb & live) as u16;
                any_a |= pa & live;
                any_b |= pb & live;
            }
        }
        // Pass 4: exact finish of the squeeze's rejects, for every one of them whether or
        // not its draw will be kept, so the random numbers drawn never depend on the slate
        // (a slate of k is then exactly the top k of the full ranking).
        if any_a != 0 {
            finish_pending::<false>(consts, buf, &mut pend_a, flagged, lanes);
        }
        if any_b != 0 {
            finish_pending::<true>(consts, buf, &mut pend_b, flagged, lanes);
        }
        // Pass 5: selection in the noted blocks, against the slate as it fills.
        if flagged != 0 {
            select(
                consts,
                buf,
                group_start,
                end,
                flagged,
                scalar,
                top,
                skip,
                offset,
            );
        }
        group_start += group_len;
    }
}

/// Offers to `top` the draws of the noted blocks of a group (`flagged`) that pass the
/// filter, and every draw with a shape below 1, which `finish_gamma` completes here in
/// scalar (the boost needs a second uniform and a power per draw).
#[allow(clippy::too_many_arguments)]
#[inline(never)]
#[target_feature(enable = "avx2,fma")]
unsafe fn select(
    consts: &[ConstBlock],
    buf: &KernelScratch,
    group_start: usize,
    end: usize,
    mut flagged: u32,
    scalar: &mut Xoshiro256PlusPlus,
    top: &mut TopK,
    skip: Option<&[bool]>,
    offset: u32,
) {
    let small = _mm256_set1_ps(SMALL_D);
    let (mut theta, mut keep) = filter(top);
    while flagged != 0 {
        let j = flagged.trailing_zeros() as usize;
        flagged &= flagged - 1;
        let o = j * LANES;
        let pos = group_start + o;
        let blk = consts.get_unchecked(j);
        let (mut hits, mut small_a, mut small_b) = (0u32, 0u32, 0u32);
        for h in 0..2 {
            let (c, b) = (h * HALF, o + h * HALF);
            let da = _mm256_loadu_ps(blk.da.as_ptr().add(c));
            let db = _mm256_loadu_ps(blk.db.as_ptr().add(c));
            let big_a = _mm256_cmp_ps::<_CMP_GE_OQ>(da, small);
            let big_b = _mm256_cmp_ps::<_CMP_GE_OQ>(db, small);
            let ga = _mm256_loadu_ps(buf.gx.as_ptr().add(b));
            let gb = _mm256_loadu_ps(buf.gy.as_ptr().add(b));
            let hit = gt(_mm256_mul_ps(ga, keep), _mm256_mul_ps(theta, gb));
            hits |= bits_of(_mm256_and_ps(hit, _mm256_and_ps(big_a, big_b))) << c;
            small_a |= (bits_of(big_a) ^ 0xFF) << c;
            small_b |= (bits_of(big_b) ^ 0xFF) << c;
        }
        let mut todo = (hits | small_a | small_b) & live_bits(end - pos);
        while todo != 0 {
            let lane = todo.trailing_zeros() as usize;
            todo &= todo - 1;
            let p = pos + lane;
            if skip.is_some_and(|s| s[p]) {
                continue;
            }
            let (bit, i) = (1u32 << lane, o + lane);
            let x = if small_a & bit != 0 {
                finish_gamma(blk.da[lane], blk.ca[lane], buf.xa[i], buf.ua[i], scalar)
            } else {
                buf.gx[i] as f64
            };
            let y = if small_b & bit != 0 {
                finish_gamma(blk.db[lane], blk.cb[lane], buf.xb[i], buf.ub[i], scalar)
            } else {
                buf.gy[i] as f64
            };
            top.offer(beta_from_gammas(x, y), p as u32 + offset);
        }
        (theta, keep) = filter(top);
    }
}

/// The selection filter (θ, 1 − θ) broadcast: a lane is a hit when X·(1 − θ) > θ·Y. θ is the
/// slate's k-th best draw lowered by 2^-18 relative, far more than the rounding of the two
/// products, so the filter passes every draw whose rounded quotient `TopK::offer` would
/// keep (it checks each hit exactly); −1 while the slate is not full lets every accepted
/// draw through (accepted Gamma draws are positive).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn filter(top: &TopK) -> (__m256, __m256) {
    let t = top.threshold();
    let theta = if t > 0.0 {
        t * (1.0 - 1.0 / 262_144.0)
    } else {
        t.max(-1.0)
    };
    (_mm256_set1_ps(theta), _mm256_set1_ps(1.0 - theta))
}

/// Pass 1: the raw bits of the proposals into `xa` (stream 0) and `xb` (stream 1), and the
/// acceptance uniforms f of both Gamma draws into `ua` and `ub`.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn random_bits(lanes: &mut Lanes, buf: &mut KernelScratch, blocks: usize) {
    let halves = [
        (buf.xa.as_mut_ptr(), buf.ua.as_mut_ptr()),
        (buf.xb.as_mut_ptr(), buf.ub.as_mut_ptr()),
    ];
    for (words, (bits, uniforms)) in lanes.iter_mut().zip(halves) {
        let mut lo = Gen4::load(words, 0);
        let mut hi = Gen4::load(words, 1);
        for j in 0..blocks {
            let o = j * LANES;
            _mm256_storeu_si256(bits.add(o) as *mut __m256i, lo.next());
            _mm256_storeu_si256(bits.add(o + HALF) as *mut __m256i, hi.next());
            _mm256_storeu_ps(uniforms.add(o), uniform12(lo.next()));
            _mm256_storeu_ps(uniforms.add(o + HALF), uniform12(hi.next()));
        }
        lo.store(words, 0);
        hi.store(words, 1);
    }
}

/// Pass 2: Box–Muller in place, two independent scaled normals per pair of random words.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn normals(buf: &mut KernelScratch, blocks: usize) {
    let half_pi = _mm256_set1_ps(std::f32::consts::FRAC_PI_2);
    for i in 0..2 * blocks {
        let o = i * HALF;
        let pa = buf.xa.as_mut_ptr().add(o);
        let pb = buf.xb.as_mut_ptr().add(o);
        let bits1 = _mm256_loadu_si256(pa as *const __m256i);
        let bits2 = _mm256_loadu_si256(pb as *const __m256i);
        let radius = scaled_radius(bits1);
        let (co, si) = cos_sin(_mm256_mul_ps(uniform01(bits2), half_pi));
        _mm256_storeu_ps(pa, random_sign(_mm256_mul_ps(radius, co), bits1));
        _mm256_storeu_ps(pb, random_sign(_mm256_mul_ps(radius, si), bits2));
    }
}

#[cfg(test)]
mod tests {
    use crate::kernel::{draw_range, BetaArrays, Isa, KernelRng, TopK, LANES};

    /// Slates of any size, small or large, are exactly the top of the full ranking of the
    /// same draws (same seed), with skipped positions and in two calls: the random numbers
    /// drawn never depend on the slate. The shapes mix the squeeze's rejects (near 1), the
    /// scalar finish (below 1) and the fast path.
    #[test]
    fn slates_are_the_top_of_the_full_ranking() {
        let Ok(isa) = Isa::checked("avx2") else {
            return;
        };
        let n = 700;
        let mut arrays = BetaArrays::with_len(n);
        for i in 0..n {
            let (a, b) = match i % 5 {
                0 => (0.5 + (i % 7) as f64 * 0.1, 3.0 + (i % 11) as f64),
                1 => (1.0 + (i % 3) as f64 * 0.2, 1.0 + (i % 4) as f64 * 0.3),
                _ => (20.0 + (i % 13) as f64, 300.0 + (i % 17) as f64 * 9.0),
            };
            arrays.set(i, a, b);
        }
        let skip: Vec<bool> = (0..n).map(|i| i % 13 == 4).collect();
        let kept = skip.iter().filter(|&&s| !s).count();
        let run = |seed: u64, k: usize, cut: usize| {
            let mut top = TopK::new(k);
            let mut rng = KernelRng::seed_from_u64(seed);
            let s = Some(skip.as_slice());
            draw_range(isa, &arrays, 0, cut, &mut rng, &mut top, s, 0);
            draw_range(isa, &arrays, cut, n, &mut rng, &mut top, s, 0);
            top
        };
        for seed in 0..100 {
            // In one call (cut = n), and in two with a cut inside a group.
            for cut in [n, 21 * LANES] {
                let all = run(seed, kept, cut);
                assert_eq!(all.items.len(), kept);
                for k in [1, 2, 7, 16, 17, 40, 300] {
                    let top = run(seed, k, cut);
                    assert_eq!(top.items, all.items[..k], "seed {seed} k {k} cut {cut}");
                }
            }
        }
    }
}
