//! Arithmetic kernels of the contextual models (`linear.rs`): AVX2/FMA versions selected at
//! run time, each with a scalar fallback computing the same quantity.
//!
//! * The quadratic form x'Mx of every arm is one contiguous dot product: M's upper triangle
//!   (f32, rows packed back to back, d(d+1)/2 values padded to a multiple of 16, 64-byte
//!   aligned) against the same packing of x x' with doubled off-diagonal entries, built once
//!   per decision. All arms' triangles sit in one arm-major buffer; a decision streams it
//!   four arms at a time (one load of x x' serves four FMAs) and in alternating directions
//!   (it starts with the arms the previous decision left in L2). At 100 arms x 50 features
//!   the 0.5 MB exceed L2: ~70 ns per arm, L2 bandwidth.
//! * The ridge/logistic update: u = M x (M symmetric: sum_j x_j row_j, 32 columns in
//!   registers), then the Sherman–Morrison step on the f64 matrix fused with writing the
//!   arm's f32 triangle from registers.
//! * The standard normal cdf from a table of (Phi, phi) at steps of 1/32 and a 4th-order
//!   Taylor step from the nearest node (relative error below 1e-6 down to z = -9, ~1e-12
//!   near the bulk), and the product of Phi((t - c_b) / r_b) over rivals, 4 rivals per
//!   vector with 16-byte table loads (cheaper than gathers on AMD cores).

/// Floats of one arm's packed triangle: d(d+1)/2 rounded up to 16 (64 bytes).
pub(crate) fn tri_block(d: usize) -> usize {
    (d * (d + 1) / 2).div_ceil(16) * 16
}

/// Stride of the theta copies and of the padded feature vector: d rounded up to 4 (32 bytes).
pub(crate) fn theta_stride(d: usize) -> usize {
    d.div_ceil(4) * 4
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u64; 8]);

/// Element types of `Aligned`: every bit pattern is a value, all-zero bits are 0.0.
pub(crate) trait Plain: Copy + sealed::Sealed {}
impl Plain for f32 {}
impl Plain for f64 {}
mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

/// A zero-initialised f32 or f64 buffer that starts on a 64-byte boundary (no vector load
/// of the kernels crosses a cache line).
#[derive(Clone)]
pub(crate) struct Aligned<T: Plain> {
    lines: Vec<Line>,
    len: usize,
    _t: std::marker::PhantomData<T>,
}

impl<T: Plain> Default for Aligned<T> {
    fn default() -> Self {
        Aligned {
            lines: Vec::new(),
            len: 0,
            _t: std::marker::PhantomData,
        }
    }
}

impl<T: Plain> Aligned<T> {
    pub(crate) fn from_slice(values: &[T]) -> Self {
        let mut out = Aligned::default();
        out.resize(values.len());
        out.copy_from_slice(values);
        out
    }

    /// New length; new elements are 0.0.
    pub(crate) fn resize(&mut self, len: usize) {
        let old = self.len;
        let lines = (len * std::mem::size_of::<T>()).div_ceil(64);
        self.lines.resize(lines, Line([0; 8]));
        self.len = len;
        if len > old {
            // Zero what an earlier shrink left behind in the last line.
            // SAFETY: [old, len) lies inside the lines; all-zero bits are 0.0 for f32/f64.
            unsafe {
                let p = self.lines.as_mut_ptr() as *mut T;
                std::ptr::write_bytes(p.add(old), 0, len - old);
            }
        }
    }
}

impl<T: Plain> std::ops::Deref for Aligned<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: the lines hold at least len values of T (64-byte lines, T is f32 or f64,
        // any bit pattern valid) and live as long as self.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr() as *const T, self.len) }
    }
}

impl<T: Plain> std::ops::DerefMut for Aligned<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in deref, borrowed mutably through self.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr() as *mut T, self.len) }
    }
}

pub(crate) fn avx2_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Upper triangle of the symmetric row-major d x d matrix `m` as f32 into `out` (tri_block
/// long; the padding is zeroed).
pub(crate) fn pack_upper(m: &[f64], d: usize, out: &mut [f32]) {
    assert!(m.len() >= d * d && out.len() >= tri_block(d));
    let mut k = 0;
    for i in 0..d {
        let row = &m[i * d + i..(i + 1) * d];
        for (o, &v) in out[k..k + row.len()].iter_mut().zip(row) {
            *o = v as f32;
        }
        k += row.len();
    }
    out[k..].iter_mut().for_each(|v| *v = 0.0);
}

/// x x' packed like `pack_upper`, off-diagonal entries doubled, so that x'Mx is the dot
/// product of the two packings. `out` is at least `tri_block(d) + 8` long (the vector
/// kernel writes whole vectors past a row's end, which the next row then overwrites).
pub(crate) fn pack_outer(x: &[f64], out: &mut [f32], avx2: bool) {
    let d = x.len();
    assert!(out.len() >= tri_block(d) + 8);
    #[cfg(target_arch = "x86_64")]
    {
        if avx2 && d <= MAX_PACK {
            // SAFETY: AVX2 present; out is long enough for the overhang, d <= MAX_PACK.
            unsafe { pack_outer_avx2(x, out) };
            return;
        }
    }
    let _ = avx2;
    let mut k = 0;
    for i in 0..d {
        let xi = x[i];
        out[k] = (xi * xi) as f32;
        let twice = 2.0 * xi;
        for (o, &xj) in out[k + 1..k + d - i].iter_mut().zip(&x[i + 1..]) {
            *o = (twice * xj) as f32;
        }
        k += d - i;
    }
    out[k..].iter_mut().for_each(|v| *v = 0.0);
}

const MAX_PACK: usize = 512;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn pack_outer_avx2(x: &[f64], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let d = x.len();
    // x as f32 followed by 8 zeros (no zeroing of the whole buffer: at small d that would
    // cost as much as the packing).
    let mut buf = std::mem::MaybeUninit::<[f32; MAX_PACK + 8]>::uninit();
    let xf = buf.as_mut_ptr() as *mut f32;
    for (i, &v) in x.iter().enumerate() {
        *xf.add(i) = v as f32;
    }
    for i in d..d + 8 {
        *xf.add(i) = 0.0;
    }
    let o = out.as_mut_ptr();
    let mut k = 0;
    for i in 0..d {
        let xi = *xf.add(i);
        let twice = _mm256_set1_ps(2.0 * xi);
        let mut j = i;
        while j < d {
            _mm256_storeu_ps(
                o.add(k + j - i),
                _mm256_mul_ps(twice, _mm256_loadu_ps(xf.add(j))),
            );
            j += 8;
        }
        *o.add(k) = xi * xi;
        k += d - i;
    }
    out[k..].iter_mut().for_each(|v| *v = 0.0);
}

/// Plain f64 dot product (4 partial sums).
pub(crate) fn dot(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f64; 4];
    let chunks = n / 4;
    for c in 0..chunks {
        for l in 0..4 {
            acc[l] += a[c * 4 + l] * b[c * 4 + l];
        }
    }
    let mut s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for i in chunks * 4..n {
        s += a[i] * b[i];
    }
    s
}

/// Everything a decision's scoring pass needs.
pub(crate) struct ScoreInputs<'a> {
    /// Packed triangles, `block` floats per arm.
    pub tri: &'a [f32],
    pub block: usize,
    /// Thetas, `stride` values per arm (zero padded), and x padded the same way.
    pub thetas: &'a [f64],
    pub stride: usize,
    pub x: &'a [f64],
    pub sig: &'a [f64],
    /// The arms to score.
    pub ids: &'a [usize],
    pub xp: &'a [f32],
    /// Visit the arms last to first (alternating directions, a decision starts with the arms
    /// the previous one left in cache).
    pub backwards: bool,
}

/// mu[a] = theta_a'x, se[a] = sig[a] * sqrt(x'M_a x) for the arms in `ids`.
pub(crate) fn score_all(inp: &ScoreInputs<'_>, mu: &mut [f64], se: &mut [f64], avx2: bool) {
    let n = inp.sig.len();
    assert!(
        inp.tri.len() >= n * inp.block
            && inp.thetas.len() >= n * inp.stride
            && inp.x.len() >= inp.stride
            && mu.len() >= n
            && se.len() >= n
            && inp.xp.len() >= inp.block
            && inp.block.is_multiple_of(16)
            && inp.stride.is_multiple_of(4)
            && inp.ids.iter().all(|&a| a < n)
    );
    // The vector kernel's aligned loads.
    assert!(
        (inp.tri.as_ptr() as usize).is_multiple_of(32)
            && (inp.xp.as_ptr() as usize).is_multiple_of(32)
            && (inp.thetas.as_ptr() as usize).is_multiple_of(32)
            && (inp.x.as_ptr() as usize).is_multiple_of(32)
    );
    #[cfg(target_arch = "x86_64")]
    {
        if avx2 {
            // SAFETY: the CPU has AVX2 and FMA (the caller checked); lengths and indices
            // asserted above.
            unsafe { score_all_avx2(inp, mu, se) };
            return;
        }
    }
    let _ = avx2;
    let (block, stride) = (inp.block, inp.stride);
    for &a in inp.ids {
        let q = dot_f32_scalar(&inp.tri[a * block..(a + 1) * block], &inp.xp[..block]);
        mu[a] = dot(&inp.thetas[a * stride..(a + 1) * stride], &inp.x[..stride]);
        se[a] = inp.sig[a] * q.max(0.0).sqrt();
    }
}

/// Dot product of f32 vectors (length a multiple of 8) with 8 lanes of f32 partial sums.
pub(crate) fn dot_f32_scalar(a: &[f32], b: &[f32]) -> f64 {
    let mut acc = [0.0f32; 8];
    for (ca, cb) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += ca[l] * cb[l];
        }
    }
    acc.iter().map(|&v| v as f64).sum()
}

/// The packed quadratic form of one arm (for tests): dot of the two packings.
#[cfg(test)]
pub(crate) fn quad_form(tri: &[f32], xp: &[f32], avx2: bool) -> f64 {
    assert!(tri.len() == xp.len() && tri.len().is_multiple_of(16));
    #[cfg(target_arch = "x86_64")]
    {
        if avx2 {
            // SAFETY: AVX2/FMA present; equal lengths, a multiple of 16.
            return unsafe { dot_f32_avx2(tri.as_ptr(), xp.as_ptr(), tri.len()) };
        }
    }
    let _ = avx2;
    dot_f32_scalar(tri, xp)
}

#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn hsum_ps(v: std::arch::x86_64::__m256) -> f64 {
    use std::arch::x86_64::*;
    let lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
    let hi = _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v));
    hsum_pd(_mm256_add_pd(lo, hi))
}

#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn hsum_pd(v: std::arch::x86_64::__m256d) -> f64 {
    use std::arch::x86_64::*;
    let s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd::<1>(v));
    _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)))
}

/// Sum of a[i] * b[i] over n f32 values, n a multiple of 16.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_f32_avx2(a: *const f32, b: *const f32, n: usize) -> f64 {
    use std::arch::x86_64::*;
    let mut acc0 = _mm256_setzero_ps();
    let mut acc1 = _mm256_setzero_ps();
    let mut acc2 = _mm256_setzero_ps();
    let mut acc3 = _mm256_setzero_ps();
    let mut i = 0;
    while i + 32 <= n {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(i)), _mm256_loadu_ps(b.add(i)), acc0);
        acc1 = _mm256_fmadd_ps(
            _mm256_loadu_ps(a.add(i + 8)),
            _mm256_loadu_ps(b.add(i + 8)),
            acc1,
        );
        acc2 = _mm256_fmadd_ps(
            _mm256_loadu_ps(a.add(i + 16)),
            _mm256_loadu_ps(b.add(i + 16)),
            acc2,
        );
        acc3 = _mm256_fmadd_ps(
            _mm256_loadu_ps(a.add(i + 24)),
            _mm256_loadu_ps(b.add(i + 24)),
            acc3,
        );
        i += 32;
    }
    if i < n {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(i)), _mm256_loadu_ps(b.add(i)), acc0);
        acc1 = _mm256_fmadd_ps(
            _mm256_loadu_ps(a.add(i + 8)),
            _mm256_loadu_ps(b.add(i + 8)),
            acc1,
        );
    }
    hsum_ps(_mm256_add_ps(
        _mm256_add_ps(acc0, acc1),
        _mm256_add_ps(acc2, acc3),
    ))
}

/// Sum of a[i] * b[i] over n f64 values.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_f64_avx2(a: *const f64, b: *const f64, n: usize) -> f64 {
    use std::arch::x86_64::*;
    let mut acc0 = _mm256_setzero_pd();
    let mut acc1 = _mm256_setzero_pd();
    let mut i = 0;
    while i + 8 <= n {
        acc0 = _mm256_fmadd_pd(_mm256_loadu_pd(a.add(i)), _mm256_loadu_pd(b.add(i)), acc0);
        acc1 = _mm256_fmadd_pd(
            _mm256_loadu_pd(a.add(i + 4)),
            _mm256_loadu_pd(b.add(i + 4)),
            acc1,
        );
        i += 8;
    }
    if i + 4 <= n {
        acc0 = _mm256_fmadd_pd(_mm256_loadu_pd(a.add(i)), _mm256_loadu_pd(b.add(i)), acc0);
        i += 4;
    }
    let mut s = hsum_pd(_mm256_add_pd(acc0, acc1));
    while i < n {
        s += *a.add(i) * *b.add(i);
        i += 1;
    }
    s
}

/// x'M x of four arms (triangles at p[k], n floats, n a multiple of 16) and theta'x of the same
/// arms (thetas at t[k], m values, m a multiple of 4).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn score4(
    p: [*const f32; 4],
    xp: *const f32,
    n: usize,
    t: [*const f64; 4],
    x: *const f64,
    m: usize,
) -> ([f64; 4], [f64; 4]) {
    use std::arch::x86_64::*;
    let mut a0 = [_mm256_setzero_ps(); 4];
    let mut a1 = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i < n {
        let x0 = _mm256_load_ps(xp.add(i));
        let x1 = _mm256_load_ps(xp.add(i + 8));
        for k in 0..4 {
            a0[k] = _mm256_fmadd_ps(_mm256_load_ps(p[k].add(i)), x0, a0[k]);
            a1[k] = _mm256_fmadd_ps(_mm256_load_ps(p[k].add(i + 8)), x1, a1[k]);
        }
        i += 16;
    }
    let mut d = [_mm256_setzero_pd(); 4];
    let mut j = 0;
    while j < m {
        let xv = _mm256_load_pd(x.add(j));
        for k in 0..4 {
            d[k] = _mm256_fmadd_pd(_mm256_load_pd(t[k].add(j)), xv, d[k]);
        }
        j += 4;
    }
    let mut q = [0.0; 4];
    let mut mu = [0.0; 4];
    for k in 0..4 {
        q[k] = hsum_ps(_mm256_add_ps(a0[k], a1[k]));
        mu[k] = hsum_pd(d[k]);
    }
    (q, mu)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn score_all_avx2(inp: &ScoreInputs<'_>, mu: &mut [f64], se: &mut [f64]) {
    let groups = inp.ids.chunks_exact(4);
    let rest = groups.remainder();
    if inp.backwards {
        for &a in rest.iter().rev() {
            score1_avx2(inp, a, mu, se);
        }
        for g in groups.rev() {
            score4_avx2(inp, g, mu, se);
        }
    } else {
        for g in groups {
            score4_avx2(inp, g, mu, se);
        }
        for &a in rest {
            score1_avx2(inp, a, mu, se);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn score1_avx2(inp: &ScoreInputs<'_>, a: usize, mu: &mut [f64], se: &mut [f64]) {
    let (block, stride) = (inp.block, inp.stride);
    let q = dot_f32_avx2(inp.tri.as_ptr().add(a * block), inp.xp.as_ptr(), block);
    mu[a] = dot_f64_avx2(inp.thetas.as_ptr().add(a * stride), inp.x.as_ptr(), stride);
    se[a] = inp.sig[a] * q.max(0.0).sqrt();
}

#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn score4_avx2(inp: &ScoreInputs<'_>, g: &[usize], mu: &mut [f64], se: &mut [f64]) {
    let (block, stride) = (inp.block, inp.stride);
    let (tri, th) = (inp.tri.as_ptr(), inp.thetas.as_ptr());
    let (q, m) = score4(
        [
            tri.add(g[0] * block),
            tri.add(g[1] * block),
            tri.add(g[2] * block),
            tri.add(g[3] * block),
        ],
        inp.xp.as_ptr(),
        block,
        [
            th.add(g[0] * stride),
            th.add(g[1] * stride),
            th.add(g[2] * stride),
            th.add(g[3] * stride),
        ],
        inp.x.as_ptr(),
        stride,
    );
    for k in 0..4 {
        mu[g[k]] = m[k];
        se[g[k]] = inp.sig[g[k]] * q[k].max(0.0).sqrt();
    }
}

/// u = M x for the symmetric row-major d x d matrix `m`; returns x'u.
pub(crate) fn sym_times(m: &[f64], x: &[f64], u: &mut [f64], avx2: bool) -> f64 {
    let d = x.len();
    assert!(m.len() >= d * d && u.len() >= d);
    #[cfg(target_arch = "x86_64")]
    {
        if avx2 {
            // SAFETY: AVX2/FMA present; m is d x d, x and u d long.
            return unsafe { sym_times_avx2(m, x, u) };
        }
    }
    let _ = avx2;
    for (i, o) in u.iter_mut().enumerate().take(d) {
        *o = dot(&m[i * d..(i + 1) * d], x);
    }
    dot(x, &u[..d])
}

/// u = M x as sum_j x_j (row j of M) (M is symmetric), 32 columns at a time: the block of u
/// stays in eight registers, each an independent chain of FMAs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn sym_times_avx2(m: &[f64], x: &[f64], u: &mut [f64]) -> f64 {
    let d = x.len();
    let mut cb = 0;
    while cb + 32 <= d {
        sym_block::<8>(m, x, u, cb, 4);
        cb += 32;
    }
    let rest = d - cb;
    if rest > 0 {
        // The last vector of the block may be partial (tail lanes masked).
        let tail = match rest % 4 {
            0 => 4,
            t => t,
        };
        match rest.div_ceil(4) {
            1 => sym_block::<1>(m, x, u, cb, tail),
            2 => sym_block::<2>(m, x, u, cb, tail),
            3 => sym_block::<3>(m, x, u, cb, tail),
            4 => sym_block::<4>(m, x, u, cb, tail),
            5 => sym_block::<5>(m, x, u, cb, tail),
            6 => sym_block::<6>(m, x, u, cb, tail),
            7 => sym_block::<7>(m, x, u, cb, tail),
            _ => sym_block::<8>(m, x, u, cb, tail),
        }
    }
    dot_f64_avx2(x.as_ptr(), u.as_ptr(), d)
}

/// Columns cb .. cb + 4 (V - 1) + tail of u = M x.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn sym_block<const V: usize>(m: &[f64], x: &[f64], u: &mut [f64], cb: usize, tail: usize) {
    use std::arch::x86_64::*;
    let d = x.len();
    let lanes = [
        _mm256_setr_epi64x(-1, 0, 0, 0),
        _mm256_setr_epi64x(-1, -1, 0, 0),
        _mm256_setr_epi64x(-1, -1, -1, 0),
        _mm256_setr_epi64x(-1, -1, -1, -1),
    ];
    let mask = lanes[tail - 1];
    let mut acc = [_mm256_setzero_pd(); V];
    for j in 0..d {
        let xj = _mm256_set1_pd(*x.get_unchecked(j));
        let row = m.as_ptr().add(j * d + cb);
        for (k, a) in acc.iter_mut().enumerate() {
            let v = if k + 1 < V {
                _mm256_loadu_pd(row.add(4 * k))
            } else {
                _mm256_maskload_pd(row.add(4 * k), mask)
            };
            *a = _mm256_fmadd_pd(v, xj, *a);
        }
    }
    let out = u.as_mut_ptr().add(cb);
    for (k, a) in acc.iter().enumerate() {
        if k + 1 < V {
            _mm256_storeu_pd(out.add(4 * k), *a);
        } else {
            _mm256_maskstore_pd(out.add(4 * k), mask, *a);
        }
    }
}

/// M <- M - f u u' (full symmetric matrix) and the f32 upper triangle of the result into
/// `tri` (tri_block(d) long, padding left as it is: zero).
pub(crate) fn rank_one_pack(
    m: &mut [f64],
    d: usize,
    f: f64,
    u: &[f64],
    tri: &mut [f32],
    avx2: bool,
) {
    assert!(m.len() >= d * d && u.len() >= d && tri.len() >= d * (d + 1) / 2);
    #[cfg(target_arch = "x86_64")]
    {
        if avx2 {
            // SAFETY: AVX2/FMA present; lengths asserted above.
            unsafe { rank_one_pack_avx2(m, d, f, u, tri) };
            return;
        }
    }
    let _ = avx2;
    let mut k = 0;
    for i in 0..d {
        let fi = f * u[i];
        let row = &mut m[i * d..(i + 1) * d];
        for (cell, &uj) in row.iter_mut().zip(&u[..d]) {
            *cell -= fi * uj;
        }
        for (o, &v) in tri[k..k + d - i].iter_mut().zip(&row[i..]) {
            *o = v as f32;
        }
        k += d - i;
    }
}

/// Rows last to first, each converted to f32 from the registers that were just stored (reading
/// the row back would stall on store forwarding). A vector that straddles column i also writes
/// up to 7 values before row i's start: those belong to earlier rows, written afterwards.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rank_one_pack_avx2(m: &mut [f64], d: usize, f: f64, u: &[f64], tri: &mut [f32]) {
    use std::arch::x86_64::*;
    let up = u.as_ptr();
    let out = tri.as_mut_ptr();
    for i in (0..d).rev() {
        // Packed index of (i, i).
        let start = i * d - i * (i.saturating_sub(1)) / 2;
        let row = m.as_mut_ptr().add(i * d);
        let fs = -f * *up.add(i);
        let fi = _mm256_set1_pd(fs);
        let mut k = 0;
        while k + 8 <= d {
            let v0 = _mm256_fmadd_pd(fi, _mm256_loadu_pd(up.add(k)), _mm256_loadu_pd(row.add(k)));
            let v1 = _mm256_fmadd_pd(
                fi,
                _mm256_loadu_pd(up.add(k + 4)),
                _mm256_loadu_pd(row.add(k + 4)),
            );
            _mm256_storeu_pd(row.add(k), v0);
            _mm256_storeu_pd(row.add(k + 4), v1);
            if k + 8 > i {
                let both = _mm256_set_m128(_mm256_cvtpd_ps(v1), _mm256_cvtpd_ps(v0));
                _mm256_storeu_ps(out.add(start + k - i), both);
            }
            k += 8;
        }
        if k + 4 <= d {
            let v = _mm256_fmadd_pd(fi, _mm256_loadu_pd(up.add(k)), _mm256_loadu_pd(row.add(k)));
            _mm256_storeu_pd(row.add(k), v);
            if k + 4 > i {
                _mm_storeu_ps(out.add(start + k - i), _mm256_cvtpd_ps(v));
            }
            k += 4;
        }
        while k < d {
            let v = fs.mul_add(*up.add(k), *row.add(k));
            *row.add(k) = v;
            if k >= i {
                *out.add(start + k - i) = v as f32;
            }
            k += 1;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Standard normal cdf.

const CDF_LO: f64 = -9.0;
const CDF_STEPS: f64 = 32.0;
const CDF_NODES: usize = 18 * 32 + 1;

/// (Phi(z_i), phi(z_i)) interleaved at z_i = -9 + i/32.
pub(crate) struct CdfTable {
    pairs: Vec<f64>,
}

impl CdfTable {
    pub(crate) fn get() -> &'static CdfTable {
        static TABLE: std::sync::OnceLock<CdfTable> = std::sync::OnceLock::new();
        TABLE.get_or_init(|| {
            let inv_sqrt_2pi = 1.0 / (2.0 * std::f64::consts::PI).sqrt();
            let mut pairs = Vec::with_capacity(2 * CDF_NODES);
            for i in 0..CDF_NODES {
                let z = CDF_LO + i as f64 / CDF_STEPS;
                pairs.push(0.5 * libm::erfc(-z / std::f64::consts::SQRT_2));
                pairs.push((-0.5 * z * z).exp() * inv_sqrt_2pi);
            }
            CdfTable { pairs }
        })
    }

    /// Phi(z): 4th-order Taylor step from the nearest node; z is clamped to [-9, 9]
    /// (Phi(-9) = 1.1e-19, and Phi(9) rounds to 1).
    #[inline]
    pub(crate) fn cdf(&self, z: f64) -> f64 {
        let z = if z.is_nan() {
            CDF_LO
        } else {
            z.clamp(CDF_LO, -CDF_LO)
        };
        let i = ((z - CDF_LO) * CDF_STEPS + 0.5) as usize;
        let i = i.min(CDF_NODES - 1);
        let x0 = i as f64 / CDF_STEPS + CDF_LO;
        let dz = z - x0;
        let (big, small) = (self.pairs[2 * i], self.pairs[2 * i + 1]);
        big + small * dz * taylor(x0, dz)
    }
}

/// 1 - x0 dz / 2 + (x0^2 - 1) dz^2 / 6 + (3 x0 - x0^3) dz^3 / 24: Phi(x0 + dz) =
/// Phi(x0) + phi(x0) dz * taylor.
#[inline(always)]
fn taylor(x0: f64, dz: f64) -> f64 {
    let x2 = x0 * x0;
    let a4 = x0 * (0.125 - x2 * (1.0 / 24.0));
    let a3 = (x2 - 1.0) * (1.0 / 6.0);
    let a2 = -0.5 * x0;
    ((a4 * dz + a3) * dz + a2) * dz + 1.0
}

/// prod_b Phi((t - c[b]) * inv_r[b]); the slices' length is a multiple of 4 (padding rivals
/// give Phi = 1).
pub(crate) fn cdf_product(table: &CdfTable, t: f64, c: &[f64], inv_r: &[f64], avx2: bool) -> f64 {
    debug_assert!(c.len() == inv_r.len() && c.len().is_multiple_of(4));
    #[cfg(target_arch = "x86_64")]
    {
        if avx2 {
            // SAFETY: AVX2/FMA present; equal lengths, a multiple of 4; indices are clamped
            // into the table.
            return unsafe { cdf_product_avx2(table, t, c, inv_r) };
        }
    }
    let _ = avx2;
    let mut p = 1.0;
    for (&cb, &ib) in c.iter().zip(inv_r) {
        p *= table.cdf((t - cb) * ib);
    }
    p
}

/// The products at two points t0, t1 (see `cdf_product`). With few rivals one pass computes
/// both (two independent chains: a single product is then latency bound).
pub(crate) fn cdf_product2(
    table: &CdfTable,
    t: [f64; 2],
    c: &[f64],
    inv_r: &[f64],
    avx2: bool,
) -> [f64; 2] {
    debug_assert!(c.len() == inv_r.len() && c.len().is_multiple_of(4));
    #[cfg(target_arch = "x86_64")]
    {
        if avx2 && c.len() <= 16 {
            // SAFETY: AVX2/FMA present; equal lengths, a multiple of 4; indices are clamped
            // into the table.
            return unsafe { cdf_product2_avx2(table, t, c, inv_r) };
        }
    }
    [
        cdf_product(table, t[0], c, inv_r, avx2),
        cdf_product(table, t[1], c, inv_r, avx2),
    ]
}

/// Phi at 4 rivals' z = (t - c) * ir in one pass (see `cdf_nodes` and `cdf_values`).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn cdf4(
    tab: *const f64,
    tv: std::arch::x86_64::__m256d,
    c: *const f64,
    ir: *const f64,
) -> std::arch::x86_64::__m256d {
    use std::arch::x86_64::*;
    const MAGIC: f64 = 6755399441055744.0;
    let z = _mm256_mul_pd(_mm256_sub_pd(tv, _mm256_loadu_pd(c)), _mm256_loadu_pd(ir));
    let z = _mm256_min_pd(
        _mm256_max_pd(z, _mm256_set1_pd(CDF_LO)),
        _mm256_set1_pd(-CDF_LO),
    );
    let pos = _mm256_fmadd_pd(
        z,
        _mm256_set1_pd(CDF_STEPS),
        _mm256_set1_pd(-CDF_LO * CDF_STEPS),
    );
    let k = _mm256_sub_pd(
        _mm256_add_pd(pos, _mm256_set1_pd(MAGIC)),
        _mm256_set1_pd(MAGIC),
    );
    let bits = _mm256_castpd_si256(_mm256_fmadd_pd(
        k,
        _mm256_set1_pd(2.0),
        _mm256_set1_pd(MAGIC),
    ));
    let x0 = _mm256_fmadd_pd(k, _mm256_set1_pd(1.0 / CDF_STEPS), _mm256_set1_pd(CDF_LO));
    let dz = _mm256_sub_pd(z, x0);
    let lo = _mm256_castsi256_si128(bits);
    let hi = _mm256_extracti128_si256::<1>(bits);
    let at = |v: i32| tab.add(v as u32 as usize);
    let p02 = _mm256_insertf128_pd::<1>(
        _mm256_castpd128_pd256(_mm_loadu_pd(at(_mm_cvtsi128_si32(lo)))),
        _mm_loadu_pd(at(_mm_cvtsi128_si32(hi))),
    );
    let p13 = _mm256_insertf128_pd::<1>(
        _mm256_castpd128_pd256(_mm_loadu_pd(at(_mm_extract_epi32::<2>(lo)))),
        _mm_loadu_pd(at(_mm_extract_epi32::<2>(hi))),
    );
    taylor4(
        _mm256_unpacklo_pd(p02, p13),
        _mm256_unpackhi_pd(p02, p13),
        x0,
        dz,
    )
}

/// Phi(x0 + dz) = Phi(x0) + phi(x0) dz (1 - x0 dz / 2 + (x0^2 - 1) dz^2 / 6
/// + (3 x0 - x0^3) dz^3 / 24), by Estrin's scheme.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn taylor4(
    big: std::arch::x86_64::__m256d,
    small: std::arch::x86_64::__m256d,
    x0: std::arch::x86_64::__m256d,
    dz: std::arch::x86_64::__m256d,
) -> std::arch::x86_64::__m256d {
    use std::arch::x86_64::*;
    let x2 = _mm256_mul_pd(x0, x0);
    let a4 = _mm256_mul_pd(
        x0,
        _mm256_fnmadd_pd(x2, _mm256_set1_pd(1.0 / 24.0), _mm256_set1_pd(0.125)),
    );
    let a3 = _mm256_fmadd_pd(x2, _mm256_set1_pd(1.0 / 6.0), _mm256_set1_pd(-1.0 / 6.0));
    let a2 = _mm256_mul_pd(x0, _mm256_set1_pd(-0.5));
    let dz2 = _mm256_mul_pd(dz, dz);
    let p = _mm256_fmadd_pd(
        dz2,
        _mm256_fmadd_pd(a4, dz, a3),
        _mm256_fmadd_pd(a2, dz, _mm256_set1_pd(1.0)),
    );
    _mm256_fmadd_pd(_mm256_mul_pd(small, dz), p, big)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn cdf_product2_avx2(table: &CdfTable, t: [f64; 2], c: &[f64], inv_r: &[f64]) -> [f64; 2] {
    use std::arch::x86_64::*;
    let tab = table.pairs.as_ptr();
    let (t0, t1) = (_mm256_set1_pd(t[0]), _mm256_set1_pd(t[1]));
    let mut acc0 = _mm256_set1_pd(1.0);
    let mut acc1 = _mm256_set1_pd(1.0);
    let mut i = 0;
    while i < c.len() {
        let (cp, ip) = (c.as_ptr().add(i), inv_r.as_ptr().add(i));
        acc0 = _mm256_mul_pd(acc0, cdf4(tab, t0, cp, ip));
        acc1 = _mm256_mul_pd(acc1, cdf4(tab, t1, cp, ip));
        i += 4;
    }
    let hprod = |v: __m256d| {
        let s = _mm_mul_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd::<1>(v));
        _mm_cvtsd_f64(_mm_mul_sd(s, _mm_unpackhi_pd(s, s)))
    };
    [hprod(acc0), hprod(acc1)]
}

/// Rivals per pass of `cdf_product_avx2`.
#[cfg(target_arch = "x86_64")]
const CHUNK: usize = 64;

/// First pass over up to CHUNK rivals: the nearest table node of each z (as 2k in the low
/// bits of `pair`, and as x0 = k / 32 - 9) and dz = z - x0. Split from the second pass so
/// that each has short dependency chains: the FP scheduler then keeps several iterations in
/// flight (one fused pass was latency bound at ~3x the cost).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn cdf_nodes(
    t: f64,
    c: *const f64,
    ir: *const f64,
    n: usize,
    pair: *mut [u64; CHUNK],
    x0s: *mut [f64; CHUNK],
    dzs: *mut [f64; CHUNK],
) {
    use std::arch::x86_64::*;
    // k = round((z + 9) * 32) by the 1.5 * 2^52 trick: the sum's low mantissa bits are the
    // integer, the difference is k as a double.
    const MAGIC: f64 = 6755399441055744.0;
    let tv = _mm256_set1_pd(t);
    let mut i = 0;
    while i < n {
        let z = _mm256_mul_pd(
            _mm256_sub_pd(tv, _mm256_loadu_pd(c.add(i))),
            _mm256_loadu_pd(ir.add(i)),
        );
        // max/min return the second operand for NaN: a NaN z becomes -9.
        let z = _mm256_min_pd(
            _mm256_max_pd(z, _mm256_set1_pd(CDF_LO)),
            _mm256_set1_pd(-CDF_LO),
        );
        let pos = _mm256_fmadd_pd(
            z,
            _mm256_set1_pd(CDF_STEPS),
            _mm256_set1_pd(-CDF_LO * CDF_STEPS),
        );
        let k = _mm256_sub_pd(
            _mm256_add_pd(pos, _mm256_set1_pd(MAGIC)),
            _mm256_set1_pd(MAGIC),
        );
        let bits = _mm256_castpd_si256(_mm256_fmadd_pd(
            k,
            _mm256_set1_pd(2.0),
            _mm256_set1_pd(MAGIC),
        ));
        let x0 = _mm256_fmadd_pd(k, _mm256_set1_pd(1.0 / CDF_STEPS), _mm256_set1_pd(CDF_LO));
        _mm256_storeu_si256((pair as *mut u64).add(i) as *mut __m256i, bits);
        _mm256_storeu_pd((x0s as *mut f64).add(i), x0);
        _mm256_storeu_pd((dzs as *mut f64).add(i), _mm256_sub_pd(z, x0));
        i += 4;
    }
}

/// Second pass: Phi at the nodes of `cdf_nodes` (4th-order Taylor step, Estrin's scheme),
/// multiplied into acc.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn cdf_values(
    tab: *const f64,
    n: usize,
    pair: *const [u64; CHUNK],
    x0s: *const [f64; CHUNK],
    dzs: *const [f64; CHUNK],
    mut acc: std::arch::x86_64::__m256d,
) -> std::arch::x86_64::__m256d {
    use std::arch::x86_64::*;
    let value = |i: usize| {
        // Four 16-byte loads of (Phi, phi) pairs: cheaper than two gathers on AMD cores.
        let at = |j: usize| tab.add(*(pair as *const u64).add(i + j) as u32 as usize);
        let p02 = _mm256_insertf128_pd::<1>(
            _mm256_castpd128_pd256(_mm_loadu_pd(at(0))),
            _mm_loadu_pd(at(2)),
        );
        let p13 = _mm256_insertf128_pd::<1>(
            _mm256_castpd128_pd256(_mm_loadu_pd(at(1))),
            _mm_loadu_pd(at(3)),
        );
        let big = _mm256_unpacklo_pd(p02, p13);
        let small = _mm256_unpackhi_pd(p02, p13);
        let x0 = _mm256_loadu_pd((x0s as *const f64).add(i));
        let dz = _mm256_loadu_pd((dzs as *const f64).add(i));
        taylor4(big, small, x0, dz)
    };
    let mut i = 0;
    while i < n {
        acc = _mm256_mul_pd(acc, value(i));
        i += 4;
    }
    acc
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn cdf_product_avx2(table: &CdfTable, t: f64, c: &[f64], inv_r: &[f64]) -> f64 {
    use std::arch::x86_64::*;
    let tab = table.pairs.as_ptr();
    // Scratch written by cdf_nodes before cdf_values reads it (no zeroing: it would cost as
    // much as a small product).
    let mut pair = std::mem::MaybeUninit::<[u64; CHUNK]>::uninit();
    let mut x0s = std::mem::MaybeUninit::<[f64; CHUNK]>::uninit();
    let mut dzs = std::mem::MaybeUninit::<[f64; CHUNK]>::uninit();
    let (pair, x0s, dzs) = (pair.as_mut_ptr(), x0s.as_mut_ptr(), dzs.as_mut_ptr());
    let mut acc = _mm256_set1_pd(1.0);
    let mut start = 0;
    while start < c.len() {
        let n = (c.len() - start).min(CHUNK);
        cdf_nodes(
            t,
            c.as_ptr().add(start),
            inv_r.as_ptr().add(start),
            n,
            pair,
            x0s,
            dzs,
        );
        acc = cdf_values(tab, n, pair, x0s, dzs, acc);
        start += n;
    }
    let s = _mm_mul_pd(_mm256_castpd256_pd128(acc), _mm256_extractf128_pd::<1>(acc));
    _mm_cvtsd_f64(_mm_mul_sd(s, _mm_unpackhi_pd(s, s)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A symmetric positive definite d x d matrix and a vector, from a simple generator.
    fn problem(d: usize, seed: u64) -> (Vec<f64>, Vec<f64>) {
        let mut state = seed;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 11) as f64 / (1u64 << 53) as f64) - 0.5
        };
        let b: Vec<f64> = (0..d * d).map(|_| next()).collect();
        let mut m = vec![0.0; d * d];
        for i in 0..d {
            for j in 0..d {
                m[i * d + j] = (0..d).map(|k| b[i * d + k] * b[j * d + k]).sum::<f64>()
                    + if i == j { 1.0 } else { 0.0 };
            }
        }
        let x = (0..d).map(|_| next()).collect();
        (m, x)
    }

    #[test]
    fn update_kernels_agree() {
        for d in (1..=70).chain([100, 131]) {
            let (m, x) = problem(d, d as u64);
            let mut u0 = vec![0.0; d];
            let xu0 = sym_times(&m, &x, &mut u0, false);
            for avx in [false, avx2_available()] {
                let mut u = vec![0.0; d];
                let xu = sym_times(&m, &x, &mut u, avx);
                assert!((xu - xu0).abs() <= 1e-12 * xu0.abs(), "d={d}");
                for (a, b) in u.iter().zip(&u0) {
                    assert!((a - b).abs() <= 1e-12 * (1.0 + b.abs()), "d={d}");
                }
                let f = 0.5 / (1.0 + xu);
                let mut m1 = m.clone();
                let mut tri = vec![7.0f32; tri_block(d)];
                tri[d * (d + 1) / 2..].iter_mut().for_each(|v| *v = 0.0);
                rank_one_pack(&mut m1, d, f, &u0, &mut tri, avx);
                let mut m2 = m.clone();
                for i in 0..d {
                    for j in 0..d {
                        m2[i * d + j] -= f * u0[i] * u0[j];
                    }
                }
                for (a, b) in m1.iter().zip(&m2) {
                    assert!((a - b).abs() <= 1e-12 * (1.0 + b.abs()), "d={d}");
                }
                let mut packed = vec![0.0f32; tri_block(d)];
                pack_upper(&m1, d, &mut packed);
                assert_eq!(tri, packed, "d={d} avx={avx}");
            }
        }
    }

    #[test]
    fn cdf_is_accurate() {
        let table = CdfTable::get();
        let mut z = -9.0;
        while z <= 9.0 {
            let exact = 0.5 * libm::erfc(-z / std::f64::consts::SQRT_2);
            let got = table.cdf(z);
            assert!(
                (got - exact).abs() <= 1e-6 * exact + 1e-16,
                "{z}: {got} vs {exact}"
            );
            for avx in [false, avx2_available()] {
                let c = [0.0, 1.0, -1.0, 0.5];
                let ir = [1.0, 2.0, 0.5, 1e3];
                let p = cdf_product(table, z, &c, &ir, avx);
                let e: f64 = c
                    .iter()
                    .zip(&ir)
                    .map(|(&c, &i)| {
                        0.5 * libm::erfc(-((z - c) * i).clamp(-9.0, 9.0) / std::f64::consts::SQRT_2)
                    })
                    .product();
                assert!((p - e).abs() <= 1e-6 * e + 1e-30, "{z}: {p} vs {e}");
            }
            z += 0.0137;
        }
        assert_eq!(table.cdf(40.0), 1.0);
        assert!(table.cdf(-40.0) < 1e-18);
        assert!(table.cdf(f64::NAN) < 1e-18);
    }
}

#[cfg(test)]
mod timing {
    use super::*;

    #[test]
    #[ignore]
    fn time_cdf_product() {
        let table = CdfTable::get();
        let c: Vec<f64> = (0..100).map(|i| -0.5 + 0.01 * i as f64).collect();
        let ir: Vec<f64> = (0..100).map(|i| 1.0 + 0.002 * i as f64).collect();
        for avx in [false, true] {
            let mut best = std::time::Duration::MAX;
            let mut s = 0.0;
            for _ in 0..7 {
                let t = std::time::Instant::now();
                for k in 0..20_000 {
                    s += cdf_product(table, 1.0 + (k % 7) as f64 * 0.1, &c, &ir, avx);
                }
                best = best.min(t.elapsed() / 20_000);
            }
            println!("cdf_product x100 avx={avx}: {best:?} {s}");
        }
    }
}
