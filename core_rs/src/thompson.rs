//! Beta–Bernoulli Thompson sampling over every active arm, full or pruned.
//!
//! The index keeps the kernel's per-arm constants in "positions". After `maintain`, positions
//! are ordered by an upper bound U_j of each arm's posterior (the exact Beta quantile at
//! 1 − ε/K), so the pruned draw can stop at the first chunk whose bounds are all below the
//! k-th best draw: the chance it differs from the full draw is at most Σ P(X_j > U_j) ≤ ε.
//! A reward that can raise an arm's posterior marks the arm dirty: until the next `maintain`
//! its bound is not trusted and the pruned draw samples it first, unconditionally. A reward
//! of 0 only lowers the posterior (stochastically), so its old bound stays safe.

use crate::kernel::{draw_range, BetaArrays, Isa, KernelRng, TopK, LANES};
use crate::special::beta_upper_bound;

/// Positions per pruning chunk (a multiple of the kernel's lanes).
const CHUNK: usize = 4 * LANES;
/// Offered positions at or above this refer to the dirty list.
const DIRTY_BASE: u32 = 1 << 31;

#[derive(Clone, Debug, Default)]
pub struct ThompsonIndex {
    arrays: BetaArrays,
    pos_arm: Vec<u32>,
    /// Position of each arm; u32::MAX for retired arms.
    arm_pos: Vec<u32>,
    /// The arrays hold every active arm's current posterior.
    built: bool,
    /// Positions are in bound order and the bounds are trustworthy (except dirty arms).
    ordered: bool,
    bound: Vec<f32>,
    chunk_max: Vec<f32>,
    suffix_max: Vec<f32>,
    dirty: Vec<u32>,
    is_dirty: Vec<bool>,
    dirty_arrays: BetaArrays,
    dirty_gathered: bool,
    /// Bound updates since the last sort; a re-sort restores tight pruning.
    updates_since_sort: usize,
    /// Arms drawn by the last pruned decision (for benchmarks and diagnostics).
    pub last_drawn: usize,
}

impl ThompsonIndex {
    pub fn invalidate(&mut self) {
        self.built = false;
        self.ordered = false;
    }

    pub fn is_ordered(&self) -> bool {
        self.ordered
    }

    #[cfg(test)]
    pub fn dirty_len(&self) -> usize {
        self.dirty.len()
    }

    /// Lays out every active arm (in arm order) with its sharpened Beta shapes.
    pub fn rebuild(&mut self, shapes: impl Fn(usize) -> (f64, f64), active: &[bool]) {
        self.pos_arm = (0..active.len() as u32)
            .filter(|&a| active[a as usize])
            .collect();
        self.lay_out(&shapes, active.len());
        self.ordered = false;
    }

    fn lay_out(&mut self, shapes: &impl Fn(usize) -> (f64, f64), n_arms: usize) {
        self.arrays = BetaArrays::with_len(self.pos_arm.len());
        self.arm_pos = vec![u32::MAX; n_arms];
        for (pos, &arm) in self.pos_arm.iter().enumerate() {
            let (a, b) = shapes(arm as usize);
            self.arrays.set(pos, a, b);
            self.arm_pos[arm as usize] = pos as u32;
        }
        self.is_dirty = vec![false; self.pos_arm.len()];
        self.dirty.clear();
        self.dirty_gathered = false;
        self.built = true;
    }

    pub fn is_built(&self) -> bool {
        self.built
    }

    /// Asks the CPU to start loading an arm's position (first stage of `prefetch_arm`).
    #[inline]
    pub fn prefetch_position(&self, arm: usize) {
        if self.built {
            crate::memory::prefetch(self.arm_pos.as_ptr().wrapping_add(arm));
        }
    }

    /// Asks the CPU to start loading the cache lines `update_arm` will write for `arm`.
    #[inline]
    pub fn prefetch_arm(&self, arm: usize) {
        if !self.built {
            return;
        }
        let pos = self.arm_pos[arm] as usize;
        let Some(blk) = self.arrays.blocks.get(pos / LANES) else {
            return;
        };
        let lane = pos % LANES;
        crate::memory::prefetch(&blk.da[lane]);
        crate::memory::prefetch(&blk.ca[lane]);
        crate::memory::prefetch(&blk.db[lane]);
        crate::memory::prefetch(&blk.cb[lane]);
        if self.ordered {
            crate::memory::prefetch(self.is_dirty.as_ptr().wrapping_add(pos));
        }
    }

    /// An arm's posterior changed; `may_rise` when it could now exceed its bound.
    pub fn update_arm(&mut self, arm: usize, a: f64, b: f64, may_rise: bool) {
        if !self.built {
            return;
        }
        let pos = self.arm_pos[arm];
        if pos == u32::MAX {
            return;
        }
        let pos = pos as usize;
        self.arrays.set(pos, a, b);
        if self.ordered && (may_rise || self.is_dirty[pos]) {
            if !self.is_dirty[pos] {
                self.is_dirty[pos] = true;
                self.dirty.push(arm as u32);
            }
            self.dirty_gathered = false;
        }
    }

    /// Computes bounds (all of them, or only the dirty arms'), re-sorting when the order has
    /// drifted. Work proportional to the arms touched, except for the (amortised) sort.
    pub fn maintain(
        &mut self,
        shapes: impl Fn(usize) -> (f64, f64),
        active: &[bool],
        epsilon: f64,
    ) {
        if !self.built {
            self.rebuild(&shapes, active);
        }
        let n = self.pos_arm.len();
        if n == 0 {
            return;
        }
        let tail = epsilon / n as f64;
        let bound_of = |arm: usize| -> f32 {
            let (a, b) = shapes(arm);
            (beta_upper_bound(tail, a, b) as f32).next_up()
        };
        if !self.ordered || self.updates_since_sort > n / 8 {
            let mut keyed: Vec<(f32, u32)> = self
                .pos_arm
                .iter()
                .map(|&arm| (bound_of(arm as usize), arm))
                .collect();
            keyed.sort_unstable_by(|x, y| y.0.total_cmp(&x.0));
            self.pos_arm = keyed.iter().map(|k| k.1).collect();
            self.bound = keyed.iter().map(|k| k.0).collect();
            self.lay_out(&shapes, active.len());
            self.updates_since_sort = 0;
        } else {
            for i in 0..self.dirty.len() {
                let arm = self.dirty[i] as usize;
                let pos = self.arm_pos[arm] as usize;
                self.bound[pos] = bound_of(arm);
                self.is_dirty[pos] = false;
            }
            self.updates_since_sort += self.dirty.len();
            self.dirty.clear();
            self.dirty_gathered = false;
        }
        self.chunk_max = self
            .bound
            .chunks(CHUNK)
            .map(|c| c.iter().copied().fold(f32::NEG_INFINITY, f32::max))
            .collect();
        self.suffix_max = vec![f32::NEG_INFINITY; self.chunk_max.len() + 1];
        for c in (0..self.chunk_max.len()).rev() {
            self.suffix_max[c] = self.suffix_max[c + 1].max(self.chunk_max[c]);
        }
        self.ordered = true;
    }

    fn to_arms(&self, top: TopK) -> Vec<(usize, f64)> {
        top.items
            .into_iter()
            .map(|(v, pos)| {
                let arm = if pos >= DIRTY_BASE {
                    self.dirty[(pos - DIRTY_BASE) as usize]
                } else {
                    self.pos_arm[pos as usize]
                };
                (arm as usize, v as f64)
            })
            .collect()
    }

    /// The k largest draws over every active arm, best first: (arm, draw).
    pub fn choose_full(&self, isa: Isa, rng: &mut KernelRng, k: usize) -> Vec<(usize, f64)> {
        let mut top = TopK::new(k);
        draw_range(
            isa,
            &self.arrays,
            0,
            self.arrays.len,
            rng,
            &mut top,
            None,
            0,
        );
        self.to_arms(top)
    }

    /// The same choice as `choose_full` except with probability at most ε; needs `maintain`.
    pub fn choose_pruned(&mut self, isa: Isa, rng: &mut KernelRng, k: usize) -> Vec<(usize, f64)> {
        debug_assert!(self.ordered);
        let mut top = TopK::new(k);
        let mut drawn = 0;
        if !self.dirty.is_empty() {
            if !self.dirty_gathered {
                let mut g = BetaArrays::with_len(self.dirty.len());
                for (i, &arm) in self.dirty.iter().enumerate() {
                    let pos = self.arm_pos[arm as usize] as usize;
                    g.set_constants(i, self.arrays.constants(pos));
                }
                self.dirty_arrays = g;
                self.dirty_gathered = true;
            }
            let len = self.dirty_arrays.len;
            draw_range(
                isa,
                &self.dirty_arrays,
                0,
                len,
                rng,
                &mut top,
                None,
                DIRTY_BASE,
            );
            drawn += len;
        }
        let skip = if self.dirty.is_empty() {
            None
        } else {
            Some(self.is_dirty.as_slice())
        };
        let n = self.arrays.len;
        for c in 0..self.chunk_max.len() {
            if top.items.len() == k && self.suffix_max[c] < top.threshold() {
                break;
            }
            let start = c * CHUNK;
            let end = (start + CHUNK).min(n);
            draw_range(isa, &self.arrays, start, end, rng, &mut top, skip, 0);
            drawn += end - start;
        }
        self.last_drawn = drawn;
        self.to_arms(top)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::tests::{chi2_critical, chi2_two_sample, isas};
    use crate::sampling;

    /// 10 contenders with small shapes (wide posteriors, the slow path runs often) and 118
    /// long-tail arms whose bounds let the pruned draw skip them.
    fn shapes() -> Vec<(f64, f64)> {
        (0..128)
            .map(|i| {
                if i % 13 == 0 {
                    (1.0 + (i % 3) as f64, 10.0 + (i % 11) as f64)
                } else {
                    (1.0 + (i % 3) as f64, 3000.0 + 17.0 * i as f64)
                }
            })
            .collect()
    }

    fn reference(shapes: &[(f64, f64)], n: usize) -> Vec<u64> {
        let mut rng = KernelRng::seed_from_u64(1234).scalar;
        let mut counts = vec![0u64; shapes.len()];
        for _ in 0..n {
            let mut best = (f64::NEG_INFINITY, 0);
            for (i, &(a, b)) in shapes.iter().enumerate() {
                let v = sampling::beta(&mut rng, a, b);
                if v > best.0 {
                    best = (v, i);
                }
            }
            counts[best.1] += 1;
        }
        counts
    }

    fn pruned_counts(
        index: &mut ThompsonIndex,
        isa: Isa,
        n: usize,
        arms: usize,
    ) -> (Vec<u64>, f64) {
        let mut rng = KernelRng::seed_from_u64(99);
        let mut counts = vec![0u64; arms];
        let mut drawn = 0usize;
        for _ in 0..n {
            let pick = index.choose_pruned(isa, &mut rng, 1);
            counts[pick[0].0] += 1;
            drawn += index.last_drawn;
        }
        (counts, drawn as f64 / n as f64)
    }

    fn assert_same(got: &[u64], want: &[u64], label: &str) {
        let (stat, df) = chi2_two_sample(got, want);
        assert!(
            stat < chi2_critical(df),
            "{label}: chi2 {stat:.1} > {:.1} (df {df})",
            chi2_critical(df)
        );
    }

    /// The pruned draw picks each arm as often as drawing every arm would (1,000,000
    /// decisions, both instruction sets), while drawing far fewer arms; a dirty arm (its
    /// bound stale after a success) is still drawn.
    #[test]
    fn pruned_draw_matches_reference_and_prunes() {
        let n = 1_000_000;
        let mut sh = shapes();
        let active = vec![true; sh.len()];
        let want = reference(&sh, n);
        for isa in isas() {
            let mut index = ThompsonIndex::default();
            let s = sh.clone();
            index.maintain(|a| s[a], &active, 1e-9);
            let (got, drawn) = pruned_counts(&mut index, isa, n, sh.len());
            assert_same(&got, &want, &format!("pruned {isa:?}"));
            assert!(
                drawn < 0.75 * sh.len() as f64,
                "drew {drawn} of {} arms",
                sh.len()
            );
        }
        // A long-tail arm turns into a contender after maintain: it is dirty, so drawn anyway.
        let star = 127;
        sh[star] = (4.0, 20.0);
        let want = reference(&sh, n);
        for isa in isas() {
            let mut index = ThompsonIndex::default();
            let before = shapes();
            index.maintain(|a| before[a], &active, 1e-9);
            index.update_arm(star, sh[star].0, sh[star].1, true);
            let (got, _) = pruned_counts(&mut index, isa, n, sh.len());
            assert!(got[star] > 0, "dirty arm never chosen");
            assert_same(&got, &want, &format!("pruned with a dirty arm {isa:?}"));
        }
    }
}
