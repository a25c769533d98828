//! AVX-512 Thompson kernel: 16 Beta draws per step in f32.
//!
//! Per block of 16 arms: four xoshiro256++ steps over 8 u64 lanes (two independent streams)
//! give 4 × 16 uniforms; Box–Muller turns two of them into the two normals the Gamma draws
//! need (polynomial log, sin and cos; the quadrant comes from random sign bits); the tight
//! Marsaglia–Tsang squeeze accepts almost every lane without a log. Normals are kept scaled
//! by 108^(-1/4) and uniforms as f = 2 − u, which folds constants of the squeeze away.
//! Lanes the squeeze does not accept are finished exactly on the same proposal (in vector
//! form, or in scalar by `kernel::finish_gamma` for shapes below 1).
//! One broadcast threshold (the k-th best draw so far) keeps selection off the fast path.
//! Slates of up to 16 arms live in two registers (`VecTop`), where a draw is inserted
//! without branches; they first bound the k-th best by lane maxima. Larger slates buffer
//! their candidates and offer them in bulk to the scalar `TopK`.
#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use crate::kernel::{
    beta_from_gammas, finish_gamma, BetaArrays, KernelRng, KernelScratch, TopK, CANDIDATES, GROUP,
    INV_X_SCALE, LANES, SMALL_D, X_SCALE,
};

struct Stream {
    s0: __m512i,
    s1: __m512i,
    s2: __m512i,
    s3: __m512i,
}

impl Stream {
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load(words: &[[u64; 8]; 4]) -> Stream {
        Stream {
            s0: _mm512_loadu_si512(words[0].as_ptr() as *const _),
            s1: _mm512_loadu_si512(words[1].as_ptr() as *const _),
            s2: _mm512_loadu_si512(words[2].as_ptr() as *const _),
            s3: _mm512_loadu_si512(words[3].as_ptr() as *const _),
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn store(&self, words: &mut [[u64; 8]; 4]) {
        _mm512_storeu_si512(words[0].as_mut_ptr() as *mut _, self.s0);
        _mm512_storeu_si512(words[1].as_mut_ptr() as *mut _, self.s1);
        _mm512_storeu_si512(words[2].as_mut_ptr() as *mut _, self.s2);
        _mm512_storeu_si512(words[3].as_mut_ptr() as *mut _, self.s3);
    }

    /// One xoshiro256++ step on every lane: 8 × 64 random bits.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn next(&mut self) -> __m512i {
        let result = _mm512_add_epi64(
            _mm512_rol_epi64::<23>(_mm512_add_epi64(self.s0, self.s3)),
            self.s0,
        );
        let t = _mm512_slli_epi64::<17>(self.s1);
        self.s2 = _mm512_xor_si512(self.s2, self.s0);
        self.s3 = _mm512_xor_si512(self.s3, self.s1);
        self.s1 = _mm512_xor_si512(self.s1, self.s2);
        self.s0 = _mm512_xor_si512(self.s0, self.s3);
        self.s2 = _mm512_xor_si512(self.s2, t);
        self.s3 = _mm512_rol_epi64::<45>(self.s3);
        result
    }
}

/// 16 uniforms f in [1, 2) from the top 23 bits of each 32-bit lane: the bits become the
/// mantissa (no integer-to-float conversion).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn uniform12(bits: __m512i) -> __m512 {
    _mm512_castsi512_ps(_mm512_or_si512(
        _mm512_srli_epi32::<9>(bits),
        _mm512_set1_epi32(0x3F80_0000),
    ))
}

/// 16 uniforms u = 2 − f in (0, 1].
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn uniform01(bits: __m512i) -> __m512 {
    _mm512_sub_ps(_mm512_set1_ps(2.0), uniform12(bits))
}

/// Box–Muller radius of the scaled normals: X_SCALE · sqrt(−2 ln u).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn scaled_radius(bits: __m512i) -> __m512 {
    // The hardware square root: 3 µops, off the critical ports' way for most of its latency.
    // max(0, ·): ln u of u = 1 may come out as −0.
    _mm512_sqrt_ps(_mm512_max_ps(
        _mm512_mul_ps(
            _mm512_set1_ps(-2.0 * X_SCALE * X_SCALE),
            ln(uniform01(bits)),
        ),
        _mm512_setzero_ps(),
    ))
}

/// Natural log for x in (0, 1] (Cephes logf polynomial; relative error ~1e-7).
#[allow(clippy::excessive_precision)] // Cephes' published coefficients
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn ln(x: __m512) -> __m512 {
    let mut e = _mm512_getexp_ps(x);
    let mut m = _mm512_getmant_ps::<_MM_MANT_NORM_1_2, _MM_MANT_SIGN_SRC>(x);
    // Centre the mantissa on 1: m in [sqrt(1/2), sqrt(2)).
    let big = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(m, _mm512_set1_ps(std::f32::consts::SQRT_2));
    m = _mm512_mask_mul_ps(m, big, m, _mm512_set1_ps(0.5));
    e = _mm512_mask_add_ps(e, big, e, _mm512_set1_ps(1.0));
    let f = _mm512_sub_ps(m, _mm512_set1_ps(1.0));
    // P(f) = Σ c_i f^i by Estrin's scheme: short dependency chains.
    let c = |v: f32| _mm512_set1_ps(v);
    let f2 = _mm512_mul_ps(f, f);
    let f4 = _mm512_mul_ps(f2, f2);
    let f8 = _mm512_mul_ps(f4, f4);
    let q01 = _mm512_fmadd_ps(c(-2.499_999_4e-1), f, c(3.333_333_1e-1));
    let q23 = _mm512_fmadd_ps(c(-1.666_805_8e-1), f, c(2.000_071_5e-1));
    let q45 = _mm512_fmadd_ps(c(-1.242_014_1e-1), f, c(1.424_932_3e-1));
    let q67 = _mm512_fmadd_ps(c(-1.151_461_1e-1), f, c(1.167_699_9e-1));
    let q03 = _mm512_fmadd_ps(q23, f2, q01);
    let q47 = _mm512_fmadd_ps(q67, f2, q45);
    let p = _mm512_fmadd_ps(c(7.037_683_6e-2), f8, _mm512_fmadd_ps(q47, f4, q03));
    let f3 = _mm512_mul_ps(f2, f);
    // ln m = f − f²/2 + f³·P(f)
    let lnm = _mm512_fmadd_ps(f3, p, _mm512_fmadd_ps(f2, _mm512_set1_ps(-0.5), f));
    _mm512_fmadd_ps(e, _mm512_set1_ps(std::f32::consts::LN_2), lnm)
}

/// (cos φ, sin φ) for φ in [0, π/2] by Taylor series (absolute error < 6e-8).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn cos_sin(phi: __m512) -> (__m512, __m512) {
    let c = |v: f32| _mm512_set1_ps(v);
    let p2 = _mm512_mul_ps(phi, phi);
    let p4 = _mm512_mul_ps(p2, p2);
    let p8 = _mm512_mul_ps(p4, p4);
    let s01 = _mm512_fmadd_ps(c(-1.0 / 6.0), p2, c(1.0));
    let s23 = _mm512_fmadd_ps(c(-1.0 / 5_040.0), p2, c(1.0 / 120.0));
    let s45 = _mm512_fmadd_ps(c(-1.0 / 39_916_800.0), p2, c(1.0 / 362_880.0));
    let s = _mm512_fmadd_ps(s45, p8, _mm512_fmadd_ps(s23, p4, s01));
    let c01 = _mm512_fmadd_ps(c(-0.5), p2, c(1.0));
    let c23 = _mm512_fmadd_ps(c(-1.0 / 720.0), p2, c(1.0 / 24.0));
    let c45 = _mm512_fmadd_ps(c(-1.0 / 3_628_800.0), p2, c(1.0 / 40_320.0));
    let c46 = _mm512_fmadd_ps(c(1.0 / 479_001_600.0), p4, c45);
    let co = _mm512_fmadd_ps(c46, p8, _mm512_fmadd_ps(c23, p4, c01));
    (co, _mm512_mul_ps(s, phi))
}

/// Flips the sign of each lane whose bit 0 of `bits` is set.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn random_sign(x: __m512, bits: __m512i) -> __m512 {
    let sign = _mm512_slli_epi32::<31>(bits);
    _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(x), sign))
}

/// Squeeze acceptance of a Marsaglia–Tsang proposal, (1 − u)·108·d·min(1, t) > x⁴, in the
/// kernel's form: xs = x·X_SCALE (so xs⁴ = x⁴/108) and f = 2 − u (so 1 − u = f − 1).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn squeeze(d: __m512, t: __m512, xs: __m512, f: __m512) -> __mmask16 {
    let x2 = _mm512_mul_ps(xs, xs);
    let x4 = _mm512_mul_ps(x2, x2);
    let dm = _mm512_mul_ps(d, _mm512_min_ps(t, _mm512_set1_ps(1.0)));
    _mm512_cmp_ps_mask::<_CMP_GT_OQ>(_mm512_fmsub_ps(f, dm, dm), x4)
}

/// The full Marsaglia–Tsang test, t > 0 and ln u < x²/2 + d·(1 − v + ln v) with v = t³, on
/// the kernel's form of the proposal (xs, f) as in `squeeze`.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn full_test(d: __m512, t: __m512, xs: __m512, f: __m512) -> __mmask16 {
    let one = _mm512_set1_ps(1.0);
    let x = _mm512_mul_ps(xs, _mm512_set1_ps(INV_X_SCALE));
    let u = _mm512_sub_ps(_mm512_set1_ps(2.0), f);
    let v = _mm512_mul_ps(_mm512_mul_ps(t, t), t);
    let positive = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(t, _mm512_setzero_ps());
    // ln of a non-positive v is not used (masked by `positive`); keep it finite.
    let ln_v = ln(_mm512_max_ps(v, _mm512_set1_ps(f32::MIN_POSITIVE)));
    let rhs = _mm512_fmadd_ps(
        _mm512_mul_ps(x, x),
        _mm512_set1_ps(0.5),
        _mm512_mul_ps(d, _mm512_add_ps(_mm512_sub_ps(one, v), ln_v)),
    );
    positive & _mm512_cmp_ps_mask::<_CMP_LT_OQ>(ln(u), rhs)
}

/// A slate of at most 16 draws kept in two registers, best first (empty lanes hold −∞).
/// Inserting a draw is a few branch-free vector operations; the scalar `TopK` sift ends on
/// an unpredictable branch, and a slate of 10 over 1,000 arms inserts ~35 times.
struct VecTop {
    vals: __m512,
    pos: __m512i,
    k: usize,
}

impl VecTop {
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load(top: &TopK) -> VecTop {
        let mut vals = [f32::NEG_INFINITY; LANES];
        let mut pos = [0u32; LANES];
        for (i, &(v, p)) in top.items.iter().take(LANES).enumerate() {
            vals[i] = v;
            pos[i] = p;
        }
        VecTop {
            vals: _mm512_loadu_ps(vals.as_ptr()),
            pos: _mm512_loadu_si512(pos.as_ptr() as *const _),
            k: top.k.min(LANES),
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn store(&self, top: &mut TopK) {
        let mut vals = [0f32; LANES];
        let mut pos = [0u32; LANES];
        _mm512_storeu_ps(vals.as_mut_ptr(), self.vals);
        _mm512_storeu_si512(pos.as_mut_ptr() as *mut _, self.pos);
        top.items.clear();
        for i in (0..self.k).take_while(|&i| vals[i] > f32::NEG_INFINITY) {
            top.items.push((vals[i], pos[i]));
        }
    }

    /// Inserts the draw held in every lane of `v`; an equal draw already kept stays ahead.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn insert(&mut self, v: __m512, pos: u32) {
        // With the slate sorted, lane i becomes max(vals[i], min(vals[i − 1], v)) (lane −1
        // holding +∞): kept draws ahead of v stay, v takes the first smaller lane, the rest
        // move back one place. No mask round trip through scalar registers.
        let back = _mm512_setr_epi32(0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14);
        let prev = _mm512_mask_permutexvar_ps(_mm512_set1_ps(f32::INFINITY), !1, back, self.vals);
        let prev_pos = _mm512_permutexvar_epi32(back, self.pos);
        let stays = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(self.vals, v);
        let takes_v = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(prev, v) & !stays;
        self.vals = _mm512_max_ps(self.vals, _mm512_min_ps(prev, v));
        self.pos = _mm512_mask_blend_epi32(
            stays,
            _mm512_mask_blend_epi32(takes_v, prev_pos, _mm512_set1_epi32(pos as i32)),
            self.pos,
        );
    }

    /// Inserts lane `lane` of `values`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn insert_lane(&mut self, values: __m512, lane: usize, pos: u32) {
        self.insert(
            _mm512_permutexvar_ps(_mm512_set1_epi32(lane as i32), values),
            pos,
        );
    }

    /// The k-th best draw in every lane; −1 while fewer than k are kept (every draw enters).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn threshold(&self) -> __m512 {
        _mm512_max_ps(
            _mm512_permutexvar_ps(_mm512_set1_epi32(self.k as i32 - 1), self.vals),
            _mm512_set1_ps(-1.0),
        )
    }
}

/// Completes the Gamma draws of the `pending` lanes (shape >= 1 only): the full test on the
/// proposal the squeeze did not accept, then fresh proposals until every lane accepts.
/// Writes accepted values into `g`; returns the lanes it completed (all of `pending`).
#[allow(clippy::too_many_arguments)]
#[inline(never)]
#[cold]
#[target_feature(enable = "avx512f")]
unsafe fn finish_lanes(
    d: __m512,
    c: __m512,
    x: __m512,
    u: __m512,
    pending: __mmask16,
    g: &mut __m512,
    ra: &mut Stream,
    rb: &mut Stream,
) -> __mmask16 {
    let one = _mm512_set1_ps(1.0);
    let mut todo = pending & !full_test(d, _mm512_fmadd_ps(c, x, one), x, u);
    while todo != 0 {
        let bits1 = ra.next();
        let bits2 = rb.next();
        let bits_u = ra.next();
        let radius = scaled_radius(bits1);
        let (co, _) = cos_sin(_mm512_mul_ps(
            uniform01(bits2),
            _mm512_set1_ps(std::f32::consts::FRAC_PI_2),
        ));
        let x = random_sign(_mm512_mul_ps(radius, co), bits1);
        let u = uniform12(bits_u);
        let t = _mm512_fmadd_ps(c, x, one);
        let accept = todo & (squeeze(d, t, x, u) | full_test(d, t, x, u));
        let value = _mm512_mul_ps(d, _mm512_mul_ps(_mm512_mul_ps(t, t), t));
        *g = _mm512_mask_blend_ps(accept, *g, value);
        todo &= !accept;
    }
    // Lanes accepted by the full test on the first proposal keep the value already in `g`.
    pending
}

/// Draws positions start..end (start a multiple of LANES) and offers them to `top` as
/// `pos + offset`, except positions flagged in `skip`.
///
/// Two passes per group of 256 positions: (1) random numbers and normals, (2) acceptance and
/// selection. Each pass has short, independent iterations, so the out-of-order core overlaps
/// them instead of waiting on one long dependency chain per block.
///
/// # Safety
/// The CPU must support AVX-512F.
#[target_feature(enable = "avx512f")]
pub unsafe fn draw_range(
    arrays: &BetaArrays,
    start: usize,
    end: usize,
    rng: &mut KernelRng,
    top: &mut TopK,
    skip: Option<&[bool]>,
    offset: u32,
) {
    if top.k <= LANES {
        let mut slate = VecTop::load(top);
        if top.k == 1 {
            draw_range_with::<true, false>(arrays, start, end, rng, top, &mut slate, skip, offset);
        } else {
            draw_range_with::<true, true>(arrays, start, end, rng, top, &mut slate, skip, offset);
        }
        slate.store(top);
    } else {
        let mut unused = VecTop::load(&TopK::new(1));
        draw_range_with::<false, true>(arrays, start, end, rng, top, &mut unused, skip, offset);
    }
}

/// `draw_range` for small slates kept in registers (`SMALL`: `slate` is used, `top` is not)
/// or for large slates in `top`, whose candidates are buffered and offered in bulk. `SLATE`
/// is k > 1: the top-1 loop compiles without the slate-only code (it cost top-1 ~3%).
// Block j of a group is read from several buffers at j·LANES: an index loop is clearer.
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
#[target_feature(enable = "avx512f")]
unsafe fn draw_range_with<const SMALL: bool, const SLATE: bool>(
    arrays: &BetaArrays,
    start: usize,
    end: usize,
    rng: &mut KernelRng,
    top: &mut TopK,
    slate: &mut VecTop,
    skip: Option<&[bool]>,
    offset: u32,
) {
    let threshold_of = |top: &TopK, slate: &VecTop| {
        if SMALL {
            slate.threshold()
        } else {
            _mm512_set1_ps(top.threshold().max(-1.0))
        }
    };
    let mut r0 = Stream::load(&rng.lanes[0]);
    let mut r1 = Stream::load(&rng.lanes[1]);
    let mut threshold = threshold_of(top, slate);
    let half_pi = _mm512_set1_ps(std::f32::consts::FRAC_PI_2);
    let small = _mm512_set1_ps(SMALL_D);
    let one = _mm512_set1_ps(1.0);
    let buf = &mut *rng.scratch;
    // Small slates: a k-th best that starts empty lags behind and lets ~10·k draws through
    // to be offered. So over the first group, keep each lane's best draw instead: the k-th
    // best of the 16 lane maxima bounds the group's k-th best draw from below, and one scan
    // of the group's kept draws offers only the few above it. Later groups then start from
    // a tight threshold.
    let mut lane_maxima = SMALL && SLATE && skip.is_none();
    // Small slates, later groups: draws beating the threshold the group started with are
    // inserted after the group, not as they come. With similar arms their positions are
    // random in every call, so a branch per block would mispredict about once per
    // candidate; a bit per block costs nothing and leaves one short loop per group.
    let deferred = SMALL && SLATE && skip.is_none();
    let mut block_better = [0u16; GROUP / LANES];
    let mut blocks_hit: u32 = 0;
    let mut best_x = _mm512_setzero_ps();
    let mut best_y = one;
    let mut n_cand = 0usize;
    let flush_at = if lane_maxima {
        1
    } else {
        (2 * top.k).clamp(32, CANDIDATES - LANES)
    };
    let lane_ids = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let mut group_start = start;
    while group_start < end {
        let group_len = (end - group_start).min(GROUP);
        let blocks = group_len.div_ceil(LANES);
        // Pass 1: proposals.
        for j in 0..blocks {
            let o = j * LANES;
            let bits1 = r0.next();
            let bits2 = r1.next();
            let bits_a = r0.next();
            let bits_b = r1.next();
            // Box–Muller: two independent normals per lane.
            let radius = scaled_radius(bits1);
            let (co, si) = cos_sin(_mm512_mul_ps(uniform01(bits2), half_pi));
            _mm512_storeu_ps(
                buf.xa.as_mut_ptr().add(o),
                random_sign(_mm512_mul_ps(radius, co), bits1),
            );
            _mm512_storeu_ps(
                buf.xb.as_mut_ptr().add(o),
                random_sign(_mm512_mul_ps(radius, si), bits2),
            );
            _mm512_storeu_ps(buf.ua.as_mut_ptr().add(o), uniform12(bits_a));
            _mm512_storeu_ps(buf.ub.as_mut_ptr().add(o), uniform12(bits_b));
        }
        // Pass 2: Marsaglia–Tsang acceptance and selection.
        for j in 0..blocks {
            let o = j * LANES;
            let pos = group_start + o;
            let live: __mmask16 = if end - pos >= LANES {
                0xFFFF
            } else {
                (1u16 << (end - pos)) - 1
            };
            let blk = arrays.blocks.get_unchecked(pos / LANES);
            let da = _mm512_load_ps(blk.da.as_ptr());
            let ca = _mm512_load_ps(blk.ca.as_ptr());
            let db = _mm512_load_ps(blk.db.as_ptr());
            let cb = _mm512_load_ps(blk.cb.as_ptr());
            let xa = _mm512_loadu_ps(buf.xa.as_ptr().add(o));
            let xb = _mm512_loadu_ps(buf.xb.as_ptr().add(o));
            let ua = _mm512_loadu_ps(buf.ua.as_ptr().add(o));
            let ub = _mm512_loadu_ps(buf.ub.as_ptr().add(o));
            let ta = _mm512_fmadd_ps(ca, xa, one);
            let tb = _mm512_fmadd_ps(cb, xb, one);
            let mut ga = _mm512_mul_ps(da, _mm512_mul_ps(_mm512_mul_ps(ta, ta), ta));
            let mut gb = _mm512_mul_ps(db, _mm512_mul_ps(_mm512_mul_ps(tb, tb), tb));
            let big_a = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(da, small);
            let big_b = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(db, small);
            let mut ok_a = squeeze(da, ta, xa, ua) & big_a;
            let mut ok_b = squeeze(db, tb, xb, ub) & big_b;
            let mut fail = !(ok_a & ok_b) & live;
            if fail != 0 {
                // Rare path. Lanes the squeeze left undecided (common only for shapes near 1)
                // finish in vector form: the full test on the same proposal, then fresh
                // proposals. Only lanes with a shape below 1 are left for the scalar finish.
                let pend_a = big_a & !ok_a & live;
                if pend_a != 0 {
                    ok_a |= finish_lanes(da, ca, xa, ua, pend_a, &mut ga, &mut r0, &mut r1);
                }
                let pend_b = big_b & !ok_b & live;
                if pend_b != 0 {
                    ok_b |= finish_lanes(db, cb, xb, ub, pend_b, &mut gb, &mut r1, &mut r0);
                }
                fail = !(ok_a & ok_b) & live;
            }
            let ok = ok_a & ok_b;
            let mut better = if lane_maxima {
                // Keep both Gamma draws for the final scan and each lane's best draw;
                // lanes finished in scalar below are offered directly and kept out.
                let keep = ok & live;
                _mm512_storeu_ps(buf.gx.as_mut_ptr().add(o), _mm512_maskz_mov_ps(keep, ga));
                _mm512_storeu_ps(
                    buf.gy.as_mut_ptr().add(o),
                    _mm512_mask_mov_ps(one, keep, gb),
                );
                let up = keep
                    & _mm512_cmp_ps_mask::<_CMP_GT_OQ>(
                        _mm512_mul_ps(ga, best_y),
                        _mm512_mul_ps(best_x, gb),
                    );
                best_x = _mm512_mask_mov_ps(best_x, up, ga);
                best_y = _mm512_mask_mov_ps(best_y, up, gb);
                0
            } else {
                // X / (X + Y) > θ  ⇔  X · (1 − θ) > θ · Y: no division on the fast path.
                _mm512_cmp_ps_mask::<_CMP_GT_OQ>(
                    _mm512_mul_ps(ga, _mm512_sub_ps(one, threshold)),
                    _mm512_mul_ps(threshold, gb),
                ) & ok
                    & live
            };
            if deferred && !lane_maxima && fail == 0 {
                _mm512_storeu_ps(buf.gx.as_mut_ptr().add(o), ga);
                _mm512_storeu_ps(buf.gy.as_mut_ptr().add(o), gb);
                block_better[j] = better;
                blocks_hit |= u32::from(better != 0) << j;
                continue;
            }
            if (better | fail) == 0 {
                continue;
            }
            if SMALL && better != 0 {
                // One division for the vector, then each better lane into the slate.
                let r = _mm512_div_ps(ga, _mm512_add_ps(ga, gb));
                let mut m = better;
                if let Some(s) = skip {
                    // Skipped lanes first: the block's best may be one, and the best of
                    // the rest must still enter.
                    let mut bits = m;
                    while bits != 0 {
                        let lane = bits.trailing_zeros() as usize;
                        bits &= bits - 1;
                        if s[pos + lane] {
                            m &= !(1u16 << lane);
                        }
                    }
                }
                if !SLATE && m != 0 {
                    // Only the block's best can enter (the first block lets all 16 through).
                    let best = _mm512_set1_ps(_mm512_mask_reduce_max_ps(m, r));
                    m &= _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(r, best);
                }
                while m != 0 {
                    let lane = m.trailing_zeros() as usize;
                    m &= m - 1;
                    slate.insert_lane(r, lane, (pos + lane) as u32 + offset);
                }
                better = 0;
                if fail == 0 {
                    threshold = slate.threshold();
                    continue;
                }
            }
            if !SMALL && top.k > 1 && better != 0 {
                // Large slates: a k-th best threshold is beaten often (about k·ln(n/k) times), so
                // candidates are appended with one compress-store each and offered in bulk.
                // Compress in registers and store whole vectors (a compress straight to memory
                // is slow on Intel); the buffer has a vector of slack past `flush_at`.
                let idx =
                    _mm512_add_epi32(_mm512_set1_epi32((pos as u32 + offset) as i32), lane_ids);
                let at = n_cand;
                _mm512_storeu_ps(
                    buf.cand_x.as_mut_ptr().add(at),
                    _mm512_maskz_compress_ps(better, ga),
                );
                _mm512_storeu_ps(
                    buf.cand_y.as_mut_ptr().add(at),
                    _mm512_maskz_compress_ps(better, gb),
                );
                _mm512_storeu_si512(
                    buf.cand_pos.as_mut_ptr().add(at) as *mut _,
                    _mm512_maskz_compress_epi32(better, idx),
                );
                n_cand += better.count_ones() as usize;
                // Offer often enough that the threshold tightens quickly.
                if n_cand >= flush_at {
                    offer_candidates(top, buf, n_cand, skip, offset);
                    n_cand = 0;
                    threshold = threshold_of(top, slate);
                }
                better = 0;
                if fail == 0 {
                    continue;
                }
            }
            let mut gas = [0f32; LANES];
            let mut gbs = [0f32; LANES];
            _mm512_storeu_ps(gas.as_mut_ptr(), ga);
            _mm512_storeu_ps(gbs.as_mut_ptr(), gb);
            let mut pending = better | fail;
            while pending != 0 {
                let lane = pending.trailing_zeros() as usize;
                let bit = 1u16 << lane;
                pending &= pending - 1;
                let p = pos + lane;
                if skip.is_some_and(|s| s[p]) {
                    continue;
                }
                let (x, y) = if fail & bit != 0 {
                    let (i, s) = (o + lane, &mut rng.scalar);
                    let (da, ca, db, cb) = arrays.constants(p);
                    let x = if ok_a & bit != 0 {
                        gas[lane] as f64
                    } else {
                        finish_gamma(da, ca, buf.xa[i], buf.ua[i], s)
                    };
                    let y = if ok_b & bit != 0 {
                        gbs[lane] as f64
                    } else {
                        finish_gamma(db, cb, buf.xb[i], buf.ub[i], s)
                    };
                    (x, y)
                } else {
                    (gas[lane] as f64, gbs[lane] as f64)
                };
                let v = beta_from_gammas(x, y);
                if SMALL {
                    slate.insert(_mm512_set1_ps(v), p as u32 + offset);
                } else {
                    top.offer(v, p as u32 + offset);
                }
            }
            threshold = threshold_of(top, slate);
        }
        if blocks_hit != 0 {
            insert_hits(
                slate,
                buf,
                &block_better,
                blocks_hit,
                group_start as u32 + offset,
            );
            blocks_hit = 0;
            threshold = slate.threshold();
        }
        if lane_maxima {
            offer_above_lane_maxima(slate, buf, group_start, group_len, best_x, best_y, offset);
            threshold = slate.threshold();
            lane_maxima = false;
        }
        group_start += group_len;
    }
    if !SMALL {
        offer_candidates(top, buf, n_cand, skip, offset);
    }
    r0.store(&mut rng.lanes[0]);
    r1.store(&mut rng.lanes[1]);
}

fn offer_candidates(
    top: &mut TopK,
    cand: &KernelScratch,
    n: usize,
    skip: Option<&[bool]>,
    offset: u32,
) {
    for i in 0..n {
        let p = cand.cand_pos[i];
        if skip.is_some_and(|s| s[(p - offset) as usize]) {
            continue;
        }
        // Divide only here, per candidate, not per vector of mostly losing lanes.
        let (x, y) = (cand.cand_x[i], cand.cand_y[i]);
        top.offer(x / (x + y), p);
    }
}

/// The k-th largest lane of `v` (1 <= k <= 16), without branches: a sort's branches would
/// mispredict on every call when the order of the lanes is random. Lane i counts the lanes
/// holding at least its value; the k-th largest is the largest value counted k times or more.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn kth_largest(v: __m512, k: usize) -> f32 {
    let one = _mm512_set1_epi32(1);
    let mut count = _mm512_setzero_si512();
    let mut other = v;
    for _ in 0..LANES {
        let ge = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(other, v);
        count = _mm512_mask_add_epi32(count, ge, count, one);
        other = _mm512_castsi512_ps(_mm512_alignr_epi32::<1>(
            _mm512_castps_si512(other),
            _mm512_castps_si512(other),
        ));
    }
    let enough = _mm512_cmpge_epi32_mask(count, _mm512_set1_epi32(k as i32));
    _mm512_mask_reduce_max_ps(enough, v)
}

/// Offers the kept draws of the group at `start` (`len` positions) that reach the k-th best
/// lane maximum (or the slate's current k-th best, whichever is higher).
#[target_feature(enable = "avx512f")]
unsafe fn offer_above_lane_maxima(
    slate: &mut VecTop,
    buf: &KernelScratch,
    start: usize,
    len: usize,
    best_x: __m512,
    best_y: __m512,
    offset: u32,
) {
    let lane_best = _mm512_max_ps(
        _mm512_div_ps(best_x, _mm512_add_ps(best_x, best_y)),
        _mm512_setzero_ps(),
    );
    let kth = kth_largest(lane_best, slate.k);
    // Slightly lowered: the cross-multiplied filter below must never drop a draw whose
    // divided value reaches the bound (rounding differs by an ulp or two).
    let theta = (kth * (1.0 - 1e-5)).max(_mm512_cvtss_f32(slate.threshold()));
    let th = _mm512_set1_ps(theta.max(0.0));
    let keep_th = _mm512_sub_ps(_mm512_set1_ps(1.0), th);
    let zero = _mm512_setzero_ps();
    // First the hits of every block (no branch), then the few blocks that have any: their
    // positions are random, so a branch per block would mostly mispredict.
    let mut block_hits = [0u16; GROUP / LANES];
    let mut blocks_hit: u32 = 0;
    for (j, hits_of_block) in block_hits.iter_mut().enumerate().take(len.div_ceil(LANES)) {
        let at = j * LANES;
        let x = _mm512_loadu_ps(buf.gx.as_ptr().add(at));
        let y = _mm512_loadu_ps(buf.gy.as_ptr().add(at));
        let mut hits =
            _mm512_cmp_ps_mask::<_CMP_GE_OQ>(_mm512_mul_ps(x, keep_th), _mm512_mul_ps(th, y))
                & _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, zero);
        if len - at < LANES {
            hits &= (1u16 << (len - at)) - 1;
        }
        *hits_of_block = hits;
        blocks_hit |= u32::from(hits != 0) << j;
    }
    insert_hits(slate, buf, &block_hits, blocks_hit, start as u32 + offset);
}

/// Inserts into the slate the draws of a group (kept in `buf.gx` / `buf.gy`) flagged in
/// `hits` (a lane mask per block), visiting only the blocks set in `blocks_hit`; the group's
/// first position is offered as `first`.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn insert_hits(
    slate: &mut VecTop,
    buf: &KernelScratch,
    hits: &[u16; GROUP / LANES],
    mut blocks_hit: u32,
    first: u32,
) {
    while blocks_hit != 0 {
        let j = blocks_hit.trailing_zeros() as usize;
        blocks_hit &= blocks_hit - 1;
        let at = j * LANES;
        let x = _mm512_loadu_ps(buf.gx.as_ptr().add(at));
        let y = _mm512_loadu_ps(buf.gy.as_ptr().add(at));
        let r = _mm512_div_ps(x, _mm512_add_ps(x, y));
        let mut m = hits[j];
        while m != 0 {
            let lane = m.trailing_zeros() as usize;
            m &= m - 1;
            slate.insert_lane(r, lane, first + (at + lane) as u32);
        }
    }
}

/// Index of the largest m[i] + k·r[i] over the first `len` entries (arrays padded to LANES
/// with −∞ in `m`); the first index wins ties.
///
/// # Safety
/// The CPU must support AVX-512F; `m` and `r` hold at least `len` rounded up to LANES.
#[target_feature(enable = "avx512f")]
pub unsafe fn argmax_fma(m: &[f32], r: &[f32], k: f32, len: usize) -> usize {
    let kk = _mm512_set1_ps(k);
    let mut best = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut best_idx = _mm512_set1_epi32(0);
    let mut idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let step = _mm512_set1_epi32(LANES as i32);
    let mut pos = 0;
    while pos < len {
        let v = _mm512_fmadd_ps(
            kk,
            _mm512_loadu_ps(r.as_ptr().add(pos)),
            _mm512_loadu_ps(m.as_ptr().add(pos)),
        );
        let gt = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(v, best);
        best = _mm512_mask_blend_ps(gt, best, v);
        best_idx = _mm512_mask_blend_epi32(gt, best_idx, idx);
        idx = _mm512_add_epi32(idx, step);
        pos += LANES;
    }
    let mut values = [0f32; LANES];
    let mut indices = [0i32; LANES];
    _mm512_storeu_ps(values.as_mut_ptr(), best);
    _mm512_storeu_si512(indices.as_mut_ptr() as *mut _, best_idx);
    let mut out = (f32::NEG_INFINITY, usize::MAX);
    for lane in 0..LANES {
        let i = indices[lane] as usize;
        if values[lane] > out.0 || (values[lane] == out.0 && i < out.1) {
            out = (values[lane], i);
        }
    }
    if out.1 == usize::MAX {
        0
    } else {
        out.1
    }
}
