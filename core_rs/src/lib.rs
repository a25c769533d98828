//! `banditd._core`: posterior state, sampling and scoring behind a small Python surface.
//!
//! Every method validates its input and returns a `CoreError` (a `ValueError`) with the
//! cause instead of panicking; long work runs with the GIL released.

#[cfg(target_arch = "x86_64")]
pub mod analysis;
mod avx2;
mod avx512;
pub mod bandit;
pub mod encoder;
pub mod error;
mod fastpath;
pub mod groups;
pub mod kernel;
pub mod linear;
mod linear_kernels;
mod linear_py;
pub mod memory;
pub mod policy;
pub mod sampling;
pub mod scores;
pub mod simulate;
pub mod special;
pub mod thompson;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use bandit::{Bandit, ThompsonPath};
use error::CoreError as RsError;
use kernel::{Isa, KernelRng};
use policy::{Policy, RewardModel};
use pyo3::buffer::PyBuffer;
use pyo3::create_exception;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple};
use rand::Rng;

create_exception!(
    _core,
    CoreError,
    PyValueError,
    "Invalid input to the decision core."
);

impl From<RsError> for PyErr {
    fn from(e: RsError) -> PyErr {
        match e {
            RsError::Invalid(m) => CoreError::new_err(m),
            RsError::Internal(m) => PyRuntimeError::new_err(m),
        }
    }
}

/// Monte Carlo draws behind a Thompson propensity (standard error <= 0.5/sqrt(draws)).
const PROPENSITY_DRAWS: usize = 2_000;
/// Arm-draws a decision may spend on a first Monte Carlo estimate when there is none yet.
const INLINE_PROPENSITY_WORK: usize = 200_000;
/// ... and at least this many draws for a single decision's first estimate.
const INLINE_MIN_DRAWS: usize = 50;
/// Exact (closed-form) propensities are recomputed inline up to this many active arms.
const INLINE_EXACT_ARMS: usize = 1_000;

struct PropensityCache {
    version: u64,
    k: usize,
    draws: usize,
    p: Vec<f64>,
}

/// Posterior draws that single decisions share (`set_draw_sharing`): valid for one slate
/// size and arm set, and for at most POOL_MAX_AGE across posterior versions.
struct DrawPool {
    k: usize,
    structure: u64,
    arms: usize,
    born: Instant,
    slates: Vec<Vec<usize>>,
}

/// Draws a pool keeps: its first POOL_DRAWS decisions each get a fresh draw (so a pool with
/// few decisions shares nothing and costs nothing extra); later ones a fresh draw with
/// probability 1 / units_per_draw (replacing a random slot), else a random slot's slate.
const POOL_DRAWS: usize = 8;
/// How long a pool outlives the posterior version it started on. Every commit (of this
/// process, and with a pool of processes of the others) makes a version: starting a pool
/// per version made a third of 10,000-arm decisions draw afresh at 2 processes. A pooled
/// draw is at most this much older than its decision, well within the logged propensities'
/// own bound (the background refresh: at least 0.5 s behind the posterior).
const POOL_MAX_AGE: Duration = Duration::from_millis(100);

struct State {
    bandit: Bandit,
    rng: KernelRng,
    cache: Vec<PropensityCache>,
    /// Single decisions per posterior draw (1 = a draw each; see `set_draw_sharing`).
    units_per_draw: usize,
    pool: Option<DrawPool>,
}

impl State {
    /// A decision's slate of k arms: a fresh draw of the current posterior, or (draw
    /// sharing on) a uniformly random one of the draws the pool made within POOL_MAX_AGE.
    /// Each slot holds an independent draw and the slot is picked independently of what it
    /// holds, so every decision is an exact draw from the policy's distribution under a
    /// posterior at most POOL_MAX_AGE old (the logged propensities hold); consecutive
    /// decisions are correlated.
    fn choose_slate(&mut self, k: usize) -> Result<Vec<usize>, RsError> {
        let draw = |s: &mut Self| -> Result<Vec<usize>, RsError> {
            Ok(s.bandit
                .choose(&mut s.rng, k)?
                .iter()
                .map(|c| c.arm)
                .collect())
        };
        if self.units_per_draw <= 1 {
            return draw(self);
        }
        let (structure, arms) = (self.bandit.structure, self.bandit.len());
        let stale = match &self.pool {
            Some(p) => {
                p.k != k
                    || p.structure != structure
                    || p.arms != arms
                    || p.born.elapsed() > POOL_MAX_AGE
            }
            None => true,
        };
        if stale {
            self.pool = Some(DrawPool {
                k,
                structure,
                arms,
                born: Instant::now(),
                slates: Vec::with_capacity(POOL_DRAWS),
            });
        }
        let filled = self.pool.as_ref().map_or(0, |p| p.slates.len());
        if filled < POOL_DRAWS {
            let slate = draw(self)?;
            if let Some(p) = self.pool.as_mut() {
                p.slates.push(slate.clone());
            }
            return Ok(slate);
        }
        let slot = self.rng.scalar.random_range(0..filled);
        if self.rng.scalar.random_range(0..self.units_per_draw) == 0 {
            let slate = draw(self)?;
            if let Some(p) = self.pool.as_mut() {
                p.slates[slot] = slate.clone();
            }
            return Ok(slate);
        }
        self.bandit.decisions += 1; // what `Bandit::choose` counts for a fresh draw
        Ok(self
            .pool
            .as_ref()
            .map_or_else(Vec::new, |p| p.slates[slot].clone()))
    }

    fn cached(&self, k: usize) -> Option<&PropensityCache> {
        self.cache.iter().find(|c| c.k == k)
    }

    fn store(&mut self, entry: PropensityCache) {
        self.cache.retain(|c| c.k != entry.k);
        self.cache.push(entry);
    }

    /// Inclusion probabilities of `arms` in slates of k. Exact ones are recomputed inline
    /// when the posterior moved and they are cheap; Monte Carlo estimates are kept current
    /// off the request path (`refresh_propensities`, which the server runs in the background
    /// within a stated staleness bound): a decision only estimates inline when there is no
    /// estimate at all yet, with fewer draws for large experiments.
    ///
    /// A first estimate spends at most INLINE_PROPENSITY_WORK arm-draws but at least
    /// `min_draws` draws: single decisions take 50 (a few ms at most, refreshed in the
    /// background), a bulk call PROPENSITY_DRAWS (its units all log the first estimate: 100
    /// draws at 2,000 arms was off by 0.07 in a test).
    fn propensities(
        &mut self,
        k: usize,
        arms: &[usize],
        min_draws: usize,
    ) -> Result<Vec<f64>, RsError> {
        let version = self.bandit.version;
        let n_arms = self.bandit.len();
        let pick = |p: &[f64]| arms.iter().map(|&a| p[a]).collect::<Vec<f64>>();
        let n_active = self.bandit.n_active().max(1);
        let exact = self.bandit.propensities_are_exact(k);
        if let Some(c) = self.cached(k).filter(|c| c.p.len() == n_arms) {
            let inline_exact = exact && n_active <= INLINE_EXACT_ARMS;
            if c.version == version || !inline_exact {
                return Ok(pick(&c.p));
            }
        }
        let draws = (INLINE_PROPENSITY_WORK / n_active)
            .clamp(min_draws.min(PROPENSITY_DRAWS), PROPENSITY_DRAWS);
        let p = self
            .bandit
            .inclusion_probabilities(&mut self.rng, k, draws)?;
        let out = pick(&p);
        self.store(PropensityCache {
            version,
            k,
            draws,
            p,
        });
        Ok(out)
    }
}

/// One experiment's arms, posterior and policy.
#[pyclass(name = "Bandit", module = "banditd._core", frozen)]
struct PyBandit {
    state: Mutex<State>,
    /// Number of arms, readable without the lock (decides whether to release the GIL).
    arms_hint: std::sync::atomic::AtomicUsize,
    /// Thompson draws run on AVX2 or AVX-512 (decides how many arms keep the GIL).
    vector_kernel: bool,
    /// Python ints of the arm indices decisions returned, made once per arm: indices past
    /// Python's small-int cache (256) would otherwise cost an allocation per arm per decision.
    /// Only touched with the GIL held.
    arm_ints: Mutex<Vec<Option<Py<PyAny>>>>,
}

/// `choose_many`: decisions per call, and per hold of the state lock.
const MAX_BULK: usize = 1_000_000;
const BULK_CHUNK: usize = 512;
/// `choose_many`: at most this many units share one posterior draw.
const MAX_UNITS_PER_DRAW: usize = 64;
/// Decisions over fewer arms than this keep the GIL: up to ~100 µs of work with a vector
/// kernel (~3 ns per arm), where releasing and re-taking the GIL costs more in thread
/// switches under load than the other threads gain. The scalar kernel (~30 ns per arm) keeps
/// it only below QUICK_ARMS_SCALAR.
const QUICK_ARMS: usize = 32_768;
const QUICK_ARMS_SCALAR: usize = 4_096;
/// Reward batches smaller than this keep the GIL.
const QUICK_REWARDS: usize = 2_000;

impl PyBandit {
    /// Runs `f` on the state with the GIL released (see `locked`).
    fn with<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut State) -> Result<T, RsError> + Send,
    ) -> PyResult<T> {
        locked(&self.state, py, false, f)
    }

    /// Like `with`, but short work keeps the GIL when the lock is free (see `locked`).
    fn with_quick<T: Send>(
        &self,
        py: Python<'_>,
        quick: bool,
        f: impl FnOnce(&mut State) -> Result<T, RsError> + Send,
    ) -> PyResult<T> {
        locked(&self.state, py, quick, f)
    }

    /// The tuple of `arms` as Python ints, from `arm_ints` (filled on first use).
    fn arm_tuple<'py>(&self, py: Python<'py>, arms: &[usize]) -> PyResult<Bound<'py, PyTuple>> {
        let Ok(mut cache) = self.arm_ints.try_lock() else {
            return PyTuple::new(py, arms);
        };
        let mut items = Vec::with_capacity(arms.len());
        for &arm in arms {
            if cache.len() <= arm {
                cache.resize_with(arm + 1, || None);
            }
            let int = match &cache[arm] {
                Some(int) => int.bind(py).clone(),
                None => {
                    let int = arm.into_pyobject(py)?.into_any();
                    cache[arm] = Some(int.clone().unbind());
                    int
                }
            };
            items.push(int);
        }
        PyTuple::new(py, items)
    }

    /// Arms below which a decision is quick enough to keep the GIL.
    fn quick_choice(&self) -> bool {
        let limit = if self.vector_kernel {
            QUICK_ARMS
        } else {
            QUICK_ARMS_SCALAR
        };
        self.arms_hint.load(std::sync::atomic::Ordering::Relaxed) < limit
    }
}

/// Runs `f` on the state behind `mutex`, guarded against panics. The lock is taken only with
/// the GIL released: a thread that held the GIL while waiting for the lock could deadlock with
/// the lock's holder waiting for the GIL. With `quick`, short work runs without releasing the
/// GIL when the lock is free: re-acquiring the GIL can wait for another thread's switch interval
/// (5 ms), far longer than a decision over a few thousand arms.
pub(crate) fn locked<S: Send, T: Send>(
    mutex: &Mutex<S>,
    py: Python<'_>,
    quick: bool,
    f: impl FnOnce(&mut S) -> Result<T, RsError> + Send,
) -> PyResult<T> {
    if quick {
        match mutex.try_lock() {
            Ok(mut guard) => return Ok(guarded(&mut *guard, f)?),
            Err(std::sync::TryLockError::Poisoned(_)) => return Err(poisoned()),
            Err(std::sync::TryLockError::WouldBlock) => {}
        }
    }
    let out = py.detach(|| match mutex.lock() {
        Ok(mut guard) => Ok(guarded(&mut *guard, f)),
        Err(_) => Err(()),
    });
    match out {
        Ok(result) => Ok(result?),
        Err(()) => Err(poisoned()),
    }
}

/// Runs `f` on the state, turning a panic (a bug) into an error before it can cross the FFI
/// boundary or poison the lock: the experiment keeps serving and the caller gets the cause.
pub(crate) fn guarded<S, T>(
    state: &mut S,
    f: impl FnOnce(&mut S) -> Result<T, RsError>,
) -> Result<T, RsError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(state))) {
        Ok(result) => result,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            Err(RsError::internal(format!("decision core failed: {msg}")))
        }
    }
}

pub(crate) fn poisoned() -> PyErr {
    PyRuntimeError::new_err("bandit state lock poisoned by an earlier failure")
}

#[pymethods]
impl PyBandit {
    /// reward_type: "binary" | "continuous"; policy: thompson | ucb1 | kl_ucb |
    /// epsilon_greedy | softmax | greedy | uniform. Zero-valued parameters take their
    /// defaults. thompson_path: auto | full | pruned; isa: auto | avx512 | avx2 | scalar;
    /// prune_epsilon bounds the chance that the pruned draw differs from the full one.
    #[new]
    #[pyo3(signature = (reward_type="binary", policy="thompson", *, exploitation=0.0,
        epsilon=0.0, epsilon_decay=0.0, temperature=0.0, ucb_c=0.0, half_life=0.0, seed=None,
        thompson_path="auto", isa="auto", prune_epsilon=1e-9))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        reward_type: &str,
        policy: &str,
        exploitation: f64,
        epsilon: f64,
        epsilon_decay: f64,
        temperature: f64,
        ucb_c: f64,
        half_life: f64,
        seed: Option<u64>,
        thompson_path: &str,
        isa: &str,
        prune_epsilon: f64,
    ) -> PyResult<Self> {
        let model = match reward_type {
            "binary" | "" => RewardModel::Bernoulli,
            "continuous" => RewardModel::Gaussian,
            other => {
                return Err(RsError::invalid(format!(
                    "unknown reward type {other:?}; expected binary or continuous"
                ))
                .into())
            }
        };
        let policy = Policy::parse(
            policy,
            exploitation,
            epsilon,
            epsilon_decay,
            temperature,
            ucb_c,
        )?;
        let mut bandit = Bandit::new(model, policy, half_life)?;
        bandit.path = ThompsonPath::parse(thompson_path)?;
        bandit.isa = Isa::checked(isa).map_err(RsError::invalid)?;
        bandit.set_prune_epsilon(prune_epsilon)?;
        let rng = KernelRng::seed_from_u64(seed.unwrap_or_else(rand::random));
        let vector_kernel = bandit.isa != Isa::Scalar;
        Ok(PyBandit {
            state: Mutex::new(State {
                bandit,
                rng,
                cache: Vec::new(),
                units_per_draw: 1,
                pool: None,
            }),
            vector_kernel,
            arms_hint: std::sync::atomic::AtomicUsize::new(0),
            arm_ints: Mutex::new(Vec::new()),
        })
    }

    /// Appends arms with priors (binary: alpha, beta; continuous: mean, strength).
    fn add_arms(&self, py: Python<'_>, prior_a: Vec<f64>, prior_b: Vec<f64>) -> PyResult<()> {
        let n = self.with(py, |s| {
            s.bandit.add_arms(&prior_a, &prior_b)?;
            Ok(s.bandit.len())
        })?;
        self.arms_hint
            .store(n, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    fn set_active(&self, py: Python<'_>, arm: usize, active: bool) -> PyResult<()> {
        self.with(py, |s| s.bandit.set_active(arm, active))
    }

    fn set_prior(&self, py: Python<'_>, arm: usize, prior_a: f64, prior_b: f64) -> PyResult<()> {
        self.with(py, |s| s.bandit.set_prior(arm, prior_a, prior_b))
    }

    /// Group index per arm (−1: none); grouped arms use their group's pooled prior with
    /// `strength` pseudo-observations.
    #[pyo3(signature = (groups, strength=20.0))]
    fn set_groups(&self, py: Python<'_>, groups: Vec<i64>, strength: f64) -> PyResult<()> {
        self.with(py, |s| s.bandit.set_groups(&groups, strength))
    }

    /// Orders arms and refreshes stale bounds for the pruned Thompson draw (GIL released).
    fn maintain(&self, py: Python<'_>) -> PyResult<()> {
        self.with(py, |s| {
            s.bandit.maintain();
            Ok(())
        })
    }

    /// Arms sampled by the last pruned Thompson draw (0 after a full draw).
    #[getter]
    fn last_drawn(&self, py: Python<'_>) -> PyResult<usize> {
        self.with(py, |s| Ok(s.bandit.last_drawn()))
    }

    /// Instruction set of the Thompson kernel: "avx512", "avx2" or "scalar".
    #[getter]
    fn isa(&self, py: Python<'_>) -> PyResult<&'static str> {
        self.with(py, |s| Ok(s.bandit.isa.name()))
    }

    /// Priors in use (own or group-pooled): (a, b).
    fn effective_priors(&self, py: Python<'_>) -> PyResult<(Vec<f64>, Vec<f64>)> {
        self.with(py, |s| {
            Ok(s.bandit.stats.iter().map(|st| (st.eff_a, st.eff_b)).unzip())
        })
    }

    /// Restores many arms' statistics at once: arm indices, counts, sums, sums of squares.
    fn set_stats_many(
        &self,
        py: Python<'_>,
        arms: Vec<usize>,
        n: Vec<f64>,
        sum: Vec<f64>,
        sumsq: Vec<f64>,
    ) -> PyResult<()> {
        self.with(py, |s| s.bandit.set_stats_many(&arms, &n, &sum, &sumsq))
    }

    /// Restores an arm's sufficient statistics: count, reward sum, sum of squares.
    fn set_stats(&self, py: Python<'_>, arm: usize, n: f64, sum: f64, sumsq: f64) -> PyResult<()> {
        self.with(py, |s| s.bandit.set_stats(arm, n, sum, sumsq))
    }

    /// Lets single decisions (`choose`) share posterior draws: up to `units_per_draw` per
    /// draw on average, within one posterior version (see `State::choose_slate`); 1 turns it
    /// off. Each decision stays an exact draw from the policy's distribution. For Thompson
    /// over thousands of arms, where a draw costs ~3 ns per arm and the rest of a decision
    /// costs a few µs.
    fn set_draw_sharing(&self, py: Python<'_>, units_per_draw: usize) -> PyResult<()> {
        if !(1..=MAX_UNITS_PER_DRAW).contains(&units_per_draw) {
            return Err(RsError::invalid(format!(
                "units_per_draw must be in [1, {MAX_UNITS_PER_DRAW}], got {units_per_draw}"
            ))
            .into());
        }
        self.with(py, |s| {
            s.units_per_draw = units_per_draw;
            s.pool = None;
            Ok(())
        })
    }

    /// Restores the policy's counters: decisions served (ε decay) and observations (UCB's t).
    fn set_counters(&self, py: Python<'_>, decisions: u64, observations: f64) -> PyResult<()> {
        self.with(py, |s| s.bandit.set_counters(decisions, observations))
    }

    /// (decisions served, observations made): the counters behind ε decay and UCB's t.
    #[getter]
    fn counters(&self, py: Python<'_>) -> PyResult<(u64, f64)> {
        self.with(py, |s| Ok((s.bandit.decisions, s.bandit.observations)))
    }

    /// Chooses k distinct arms. Returns tuples (arms, scores, propensities): scores are posterior
    /// means (probabilities for binary rewards), propensities the chance each arm was in
    /// the slate under the current posterior.
    /// Tuples, not lists: one allocation each instead of two (this is the hot path).
    #[pyo3(signature = (k=1))]
    #[allow(clippy::type_complexity)]
    fn choose<'py>(
        &self,
        py: Python<'py>,
        k: usize,
    ) -> PyResult<(
        Bound<'py, PyTuple>,
        Bound<'py, PyTuple>,
        Bound<'py, PyTuple>,
    )> {
        let (arms, scores, props) = self.with_quick(py, self.quick_choice(), |state| {
            let arms = state.choose_slate(k)?;
            let props = state.propensities(k, &arms, INLINE_MIN_DRAWS)?;
            let scores: Vec<f64> = arms.iter().map(|&a| state.bandit.mean(a)).collect();
            Ok((arms, scores, props))
        })?;
        Ok((
            self.arm_tuple(py, &arms)?,
            PyTuple::new(py, scores)?,
            PyTuple::new(py, props)?,
        ))
    }

    /// `n` decisions of k arms from the current posterior (a campaign batch): the arm
    /// indices (u32 little endian, k per decision) and each one's inclusion probability (f64
    /// little endian). The GIL is released; the state lock is taken per chunk of
    /// `BULK_CHUNK` decisions, so single decisions are served in between.
    ///
    /// `units_per_draw` > 1 lets units share posterior draws: a chunk of m units makes
    /// ceil(m / units_per_draw) draws and gives each unit one of them picked uniformly at
    /// random. Each unit's arms are still an exact draw from the policy's distribution (so
    /// the logged propensities hold), but units of a chunk are no longer independent: arm
    /// counts vary more than with one draw each. What makes 10,000-arm campaigns affordable.
    #[pyo3(signature = (n, k=1, units_per_draw=1))]
    fn choose_many<'py>(
        &self,
        py: Python<'py>,
        n: usize,
        k: usize,
        units_per_draw: usize,
    ) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyBytes>)> {
        if n > MAX_BULK {
            return Err(RsError::invalid(format!(
                "at most {MAX_BULK} decisions per call, got {n}"
            ))
            .into());
        }
        if !(1..=MAX_UNITS_PER_DRAW).contains(&units_per_draw) {
            return Err(RsError::invalid(format!(
                "units_per_draw must be in [1, {MAX_UNITS_PER_DRAW}], got {units_per_draw}"
            ))
            .into());
        }
        let mut arms: Vec<u8> = Vec::with_capacity(n * k * 4);
        let mut props: Vec<u8> = Vec::with_capacity(n * k * 8);
        let mut done = 0;
        while done < n {
            let m = BULK_CHUNK.min(n - done);
            let (a, p) = self.with(py, |state| {
                let mut idx = Vec::with_capacity(m * k);
                let draws = m.div_ceil(units_per_draw);
                let mut picks = Vec::with_capacity(draws * k);
                for _ in 0..draws {
                    let slate = state.bandit.choose(&mut state.rng, k)?;
                    picks.extend(slate.iter().map(|c| c.arm));
                }
                let width = picks.len() / draws;
                if draws == m {
                    idx = picks;
                } else {
                    for _ in 0..m {
                        let j = state.rng.scalar.random_range(0..draws);
                        idx.extend_from_slice(&picks[j * width..(j + 1) * width]);
                    }
                }
                let all: Vec<usize> = (0..state.bandit.len()).collect();
                let p = state.propensities(k, &all, PROPENSITY_DRAWS)?;
                let probs: Vec<f64> = idx.iter().map(|&a| p[a]).collect();
                Ok((idx, probs))
            })?;
            for (arm, prob) in a.iter().zip(&p) {
                arms.extend_from_slice(&(*arm as u32).to_le_bytes());
                props.extend_from_slice(&prob.to_le_bytes());
            }
            done += m;
        }
        Ok((PyBytes::new(py, &arms), PyBytes::new(py, &props)))
    }

    /// Checks a batch without applying it.
    fn validate_rewards(&self, py: Python<'_>, arms: Vec<usize>, values: Vec<f64>) -> PyResult<()> {
        self.with(py, |s| s.bandit.validate_rewards(&arms, &values))
    }

    /// Applies a batch of rewards, all or nothing. `arms` and `values` are sequences or, faster,
    /// buffers (array.array("q") / ("d"), numpy int64 / float64 arrays).
    fn apply_rewards(
        &self,
        py: Python<'_>,
        arms: &Bound<'_, PyAny>,
        values: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let arms = indices_from(py, arms)?;
        let values = floats_from(py, values)?;
        let quick = arms.len() < QUICK_REWARDS && self.quick_choice();
        self.with_quick(py, quick, |s| s.bandit.apply_rewards(&arms, &values))
    }

    /// Fresh Monte Carlo inclusion probabilities for slates of k (GIL released). The estimate
    /// runs on a snapshot of the posterior, outside the state lock: decisions keep being served
    /// while a large experiment's propensities are refreshed.
    #[pyo3(signature = (k=1, draws=PROPENSITY_DRAWS))]
    fn refresh_propensities(&self, py: Python<'_>, k: usize, draws: usize) -> PyResult<Vec<f64>> {
        let (mut snapshot, seed) = self.with(py, |state| {
            let seed: u64 = state.rng.scalar.random();
            Ok((state.bandit.clone(), seed))
        })?;
        let version = snapshot.version;
        let p = py.detach(|| {
            let mut rng = KernelRng::seed_from_u64(seed);
            snapshot.inclusion_probabilities(&mut rng, k, draws)
        })?;
        self.with(py, |state| {
            // Tagged with the snapshot's version: if the posterior moved meanwhile, the entry
            // is already stale and the next refresh replaces it.
            let newer = state
                .cached(k)
                .is_some_and(|c| c.version > version && c.draws >= draws);
            if !newer {
                state.store(PropensityCache {
                    version,
                    k,
                    draws,
                    p: p.clone(),
                });
            }
            Ok(p)
        })
    }

    /// The policy's own inclusion probabilities of `arms` in slates of k (the same numbers
    /// `choose` returns for the arms it picks), for decisions made by something else (a
    /// random control share, a traffic floor) whose logged propensity mixes them in.
    #[pyo3(signature = (arms, k=1))]
    fn propensities_of(&self, py: Python<'_>, arms: Vec<usize>, k: usize) -> PyResult<Vec<f64>> {
        self.with_quick(py, self.quick_choice(), |state| {
            let n = state.bandit.len();
            if let Some(&bad) = arms.iter().find(|&&a| a >= n) {
                return Err(RsError::invalid(format!(
                    "arm index {bad} out of range (the experiment has {n} arms)"
                )));
            }
            state.propensities(k, &arms, INLINE_MIN_DRAWS)
        })
    }

    /// True when the cached propensities for k lag the posterior.
    #[pyo3(signature = (k=1))]
    fn propensities_stale(&self, py: Python<'_>, k: usize) -> PyResult<bool> {
        self.with(py, |s| {
            Ok(s.cached(k)
                .is_none_or(|c| c.version != s.bandit.version || c.draws < PROPENSITY_DRAWS))
        })
    }

    /// Posterior means of some arms.
    fn means_of(&self, py: Python<'_>, arms: Vec<usize>) -> PyResult<Vec<f64>> {
        self.with_quick(py, arms.len() < QUICK_REWARDS, |s| {
            arms.iter()
                .map(|&a| {
                    if a < s.bandit.len() {
                        Ok(s.bandit.mean(a))
                    } else {
                        Err(RsError::invalid(format!("arm index {a} out of range")))
                    }
                })
                .collect()
        })
    }

    fn means(&self, py: Python<'_>) -> PyResult<Vec<f64>> {
        self.with(py, |s| {
            Ok((0..s.bandit.len()).map(|a| s.bandit.mean(a)).collect())
        })
    }

    /// Central credible intervals at `level` for every arm: (lows, highs).
    #[pyo3(signature = (level=0.95))]
    fn intervals(&self, py: Python<'_>, level: f64) -> PyResult<(Vec<f64>, Vec<f64>)> {
        if !(level > 0.0 && level < 1.0) {
            return Err(RsError::invalid(format!("level must be in (0, 1), got {level}")).into());
        }
        self.with(py, |s| {
            let b = &s.bandit;
            Ok((0..b.len()).map(|a| b.interval(a, level)).unzip())
        })
    }

    /// Sufficient statistics per arm: (n, sum, sumsq).
    fn stats(&self, py: Python<'_>) -> PyResult<(Vec<f64>, Vec<f64>, Vec<f64>)> {
        self.with(py, |s| {
            let st = &s.bandit.stats;
            Ok((
                st.iter().map(|x| x.n).collect(),
                st.iter().map(|x| x.sum).collect(),
                st.iter().map(|x| x.sumsq).collect(),
            ))
        })
    }

    fn priors(&self, py: Python<'_>) -> PyResult<(Vec<f64>, Vec<f64>)> {
        self.with(py, |s| {
            Ok((s.bandit.prior_a.clone(), s.bandit.prior_b.clone()))
        })
    }

    fn active(&self, py: Python<'_>) -> PyResult<Vec<bool>> {
        self.with(py, |s| Ok(s.bandit.active.clone()))
    }

    /// Plays a Bernoulli world against this bandit in Rust (see `simulate::run`): phase i
    /// has hidden `rates[i]` from round `starts[i]`. Returns (arms as little-endian u32
    /// bytes, rewards as u8 bytes, posterior means at each checkpoint, row-major).
    #[pyo3(signature = (rates, starts, horizon, update_every=1, checkpoints=Vec::new(), world_seed=0))]
    #[allow(clippy::too_many_arguments)]
    fn simulate<'py>(
        &self,
        py: Python<'py>,
        rates: Vec<Vec<f64>>,
        starts: Vec<usize>,
        horizon: usize,
        update_every: usize,
        checkpoints: Vec<usize>,
        world_seed: u64,
    ) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyBytes>, Vec<f64>)> {
        if rates.len() != starts.len() {
            return Err(RsError::invalid(format!(
                "{} phases of rates but {} phase starts",
                rates.len(),
                starts.len()
            ))
            .into());
        }
        let phases: Vec<simulate::Phase> = starts
            .into_iter()
            .zip(rates)
            .map(|(start, rates)| simulate::Phase { start, rates })
            .collect();
        let out = self.with(py, |s| {
            simulate::run(
                &mut s.bandit,
                &mut s.rng,
                &phases,
                horizon,
                update_every,
                &checkpoints,
                world_seed,
            )
        })?;
        let arms: Vec<u8> = out.arms.iter().flat_map(|a| a.to_le_bytes()).collect();
        Ok((
            PyBytes::new(py, &arms),
            PyBytes::new(py, &out.rewards),
            out.means,
        ))
    }

    #[getter]
    fn version(&self, py: Python<'_>) -> PyResult<u64> {
        self.with_quick(py, true, |s| Ok(s.bandit.version))
    }

    #[getter]
    fn n_arms(&self, py: Python<'_>) -> PyResult<usize> {
        self.with_quick(py, true, |s| Ok(s.bandit.len()))
    }

    /// Winner analysis by Monte Carlo from the posterior (see `analysis`): a dict of lists,
    /// one entry per arm, "p_best", "expected_loss", "uplift_low", "uplift_high" (95%
    /// interval of θ_arm / θ_ref − 1), "p_uplift" (P(θ_arm > θ_ref)), "reference" (the arm
    /// each uplift is against, None for inactive arms and the control itself) and "control"
    /// (the control given, else None: each arm against the best other arm by posterior mean).
    /// `level` is the credible level of the uplift interval, "p_min_uplift" the probability
    /// that an arm's uplift is at least `min_uplift`.
    #[pyo3(signature = (draws=20000, control=None, level=0.95, min_uplift=0.0))]
    fn winner_analysis<'py>(
        &self,
        py: Python<'py>,
        draws: usize,
        control: Option<usize>,
        level: f64,
        min_uplift: f64,
    ) -> PyResult<Bound<'py, pyo3::types::PyDict>> {
        let query = analysis::UpliftQuery {
            control,
            level,
            min_uplift,
        };
        let (snapshot, seed) = self.with(py, |state| {
            let seed: u64 = state.rng.scalar.random();
            Ok((state.bandit.clone(), seed))
        })?;
        let r = py.detach(|| {
            let mut rng = KernelRng::seed_from_u64(seed);
            analysis::winner_analysis(&snapshot, &mut rng, draws, query)
        })?;
        let d = pyo3::types::PyDict::new(py);
        d.set_item("p_best", r.p_best)?;
        d.set_item("expected_loss", r.expected_loss)?;
        d.set_item("uplift_low", r.uplift_low)?;
        d.set_item("uplift_high", r.uplift_high)?;
        d.set_item("p_uplift", r.p_uplift)?;
        d.set_item("p_min_uplift", r.p_min_uplift)?;
        d.set_item("reference", r.reference)?;
        d.set_item("control", r.control)?;
        Ok(d)
    }
}

/// Arm indices from a buffer of int64 or any sequence of ints.
fn indices_from(py: Python<'_>, obj: &Bound<'_, PyAny>) -> PyResult<Vec<usize>> {
    if let Ok(buf) = PyBuffer::<i64>::get(obj) {
        let raw = buf.to_vec(py)?;
        if let Some(&i) = raw.iter().find(|&&i| i < 0) {
            return Err(RsError::invalid(format!("arm index {i} is negative")).into());
        }
        // Same size and all non-negative: the collect reuses the allocation in place.
        return Ok(raw.into_iter().map(|i| i as usize).collect());
    }
    obj.extract()
}

/// Floats from a buffer of float64 or any sequence of numbers.
pub(crate) fn floats_from(py: Python<'_>, obj: &Bound<'_, PyAny>) -> PyResult<Vec<f64>> {
    if let Ok(buf) = PyBuffer::<f64>::get(obj) {
        return buf.to_vec(py);
    }
    obj.extract()
}

/// Exact quantile of Beta(a, b) (for intervals and the pruned Thompson bounds).
#[pyfunction]
fn beta_quantile(p: f64, a: f64, b: f64) -> PyResult<f64> {
    if !(a > 0.0 && b > 0.0 && a.is_finite() && b.is_finite() && (0.0..=1.0).contains(&p)) {
        return Err(RsError::invalid(format!(
            "beta_quantile needs 0 <= p <= 1 and finite a, b > 0; got p={p}, a={a}, b={b}"
        ))
        .into());
    }
    Ok(special::beta_quantile(p, a, b))
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyBandit>()?;
    m.add_class::<linear_py::PyLinear>()?;
    m.add_class::<fastpath::FastDecide>()?;
    m.add_function(wrap_pyfunction!(beta_quantile, m)?)?;
    m.add("CoreError", m.py().get_type::<CoreError>())?;
    Ok(())
}
