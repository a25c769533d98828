//! Python surface of the contextual models (`banditd._core.Linear`, see `_core.pyi`).
//!
//! The encoder sits outside the model's lock behind an `Arc`: encoding a context needs the
//! GIL (it reads a dict), the model's arithmetic does not, and neither waits for the other.

use std::sync::{Arc, Mutex, RwLock};

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyString, PyTuple};
use rand::SeedableRng;
use rand_xoshiro::Xoshiro256PlusPlus;

use crate::encoder::{Encoder, Value};
use crate::error::CoreError as RsError;
use crate::linear::{Linear, Mode, Model};
use crate::{floats_from, locked};

/// Arms x features below which a decision keeps the GIL (tens of microseconds at most).
const QUICK_WORK: usize = 2_000_000;

struct LinState {
    lin: Linear,
    rng: Xoshiro256PlusPlus,
}

#[pyclass(name = "Linear", module = "banditd._core", frozen)]
pub struct PyLinear {
    state: Mutex<LinState>,
    encoder: RwLock<Arc<Encoder>>,
    work: std::sync::atomic::AtomicUsize,
}

impl PyLinear {
    fn with<T: Send>(
        &self,
        py: Python<'_>,
        quick: bool,
        f: impl FnOnce(&mut LinState) -> Result<T, RsError> + Send,
    ) -> PyResult<T> {
        locked(&self.state, py, quick, f)
    }

    fn encoder(&self) -> Arc<Encoder> {
        match self.encoder.read() {
            Ok(e) => e.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn quick(&self) -> bool {
        self.work.load(std::sync::atomic::Ordering::Relaxed) < QUICK_WORK
    }

    fn note_size(&self, lin: &Linear) {
        self.work.store(
            lin.arms.len() * lin.d() * lin.d(),
            std::sync::atomic::Ordering::Relaxed,
        );
    }
}

/// The feature vector of a context (a dict of str -> str | int | float, or None).
fn encode(enc: &Encoder, context: &Bound<'_, PyAny>) -> PyResult<Vec<f64>> {
    let mut x = enc.blank();
    if context.is_none() {
        return Ok(x);
    }
    let dict = context
        .cast::<PyDict>()
        .map_err(|_| RsError::invalid("context must be a dict of str to str or number"))?;
    for (key, value) in dict.iter() {
        let key = key
            .cast::<PyString>()
            .map_err(|_| RsError::invalid("context keys must be strings"))?;
        let key = key.to_str()?;
        if let Ok(text) = value.cast::<PyString>() {
            enc.put(&mut x, key, Value::Text(text.to_str()?));
        } else if let Ok(flag) = value.cast::<PyBool>() {
            enc.put(
                &mut x,
                key,
                Value::Text(if flag.is_true() { "true" } else { "false" }),
            );
        } else if let Ok(number) = value.extract::<f64>() {
            if !number.is_finite() {
                return Err(RsError::invalid(format!(
                    "context value of {key:?} is {number}; numbers must be finite"
                ))
                .into());
            }
            enc.put(&mut x, key, Value::Number(number));
        } else {
            return Err(RsError::invalid(format!(
                "context value of {key:?} must be a str or a number, got {}",
                value.get_type().name()?
            ))
            .into());
        }
    }
    Ok(x)
}

/// Float64 values from bytes (little-endian), a float64 buffer or a sequence of numbers.
fn f64s(py: Python<'_>, obj: &Bound<'_, PyAny>) -> PyResult<Vec<f64>> {
    if let Ok(bytes) = obj.cast::<PyBytes>() {
        let raw = bytes.as_bytes();
        if raw.len() % 8 != 0 {
            return Err(RsError::invalid(format!(
                "feature bytes must be float64 values; {} bytes is not a multiple of 8",
                raw.len()
            ))
            .into());
        }
        return Ok(raw
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect());
    }
    // Lists and tuples directly: probing them for a buffer first raises (and discards) a
    // TypeError, which costs more than the update itself.
    if let Ok(list) = obj.cast::<pyo3::types::PyList>() {
        return list.iter().map(|v| v.extract::<f64>()).collect();
    }
    if let Ok(tuple) = obj.cast::<PyTuple>() {
        return tuple.iter().map(|v| v.extract::<f64>()).collect();
    }
    floats_from(py, obj)
}

fn to_bytes(x: &[f64]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

#[pymethods]
impl PyLinear {
    /// model: ridge | logistic; policy: ucb | thompson. See `_core.pyi`.
    #[new]
    #[pyo3(signature = (model="ridge", policy="thompson", *, binary=true, alpha=1.96, ridge=1.0,
        floor=0.0, seed=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        model: &str,
        policy: &str,
        binary: bool,
        alpha: f64,
        ridge: f64,
        floor: f64,
        seed: Option<u64>,
    ) -> PyResult<Self> {
        let model = match model {
            "ridge" => Model::Ridge,
            "logistic" => Model::Logistic,
            other => {
                return Err(RsError::invalid(format!(
                    "unknown model {other:?}; expected ridge or logistic"
                ))
                .into())
            }
        };
        let mode = match policy {
            "ucb" => Mode::Ucb,
            "thompson" => Mode::Thompson,
            other => {
                return Err(RsError::invalid(format!(
                    "unknown contextual policy {other:?}; expected ucb or thompson"
                ))
                .into())
            }
        };
        let lin = Linear::new(model, mode, binary, alpha, ridge, floor)?;
        Ok(PyLinear {
            state: Mutex::new(LinState {
                lin,
                rng: Xoshiro256PlusPlus::seed_from_u64(seed.unwrap_or_else(rand::random)),
            }),
            encoder: RwLock::new(Arc::new(Encoder::empty())),
            work: 0.into(),
        })
    }

    fn n_arms(&self, py: Python<'_>) -> PyResult<usize> {
        self.with(py, true, |s| Ok(s.lin.arms.len()))
    }

    fn n_features(&self, py: Python<'_>) -> PyResult<usize> {
        self.with(py, true, |s| Ok(s.lin.d()))
    }

    fn isa(&self, py: Python<'_>) -> PyResult<&'static str> {
        self.with(py, true, |s| Ok(s.lin.isa()))
    }

    fn version(&self, py: Python<'_>) -> PyResult<u64> {
        self.with(py, true, |s| Ok(s.lin.version))
    }

    fn add_arms(&self, py: Python<'_>, n: usize) -> PyResult<()> {
        self.with(py, false, |s| s.lin.add_arms(n))?;
        self.with(py, true, |s| {
            self.note_size(&s.lin);
            Ok(())
        })
    }

    fn set_active(&self, py: Python<'_>, arm: usize, active: bool) -> PyResult<()> {
        self.with(py, true, |s| s.lin.set_active(arm, active))
    }

    fn active(&self, py: Python<'_>) -> PyResult<Vec<bool>> {
        self.with(py, true, |s| Ok(s.lin.active.clone()))
    }

    /// A new feature definition; every arm's model restarts from its prior.
    fn set_encoder(
        &self,
        py: Python<'_>,
        numeric: Vec<(String, f64, f64)>,
        categorical: Vec<(String, Vec<String>)>,
    ) -> PyResult<()> {
        let enc = Encoder::new(&numeric, &categorical)?;
        let d = enc.dimension();
        self.with(py, false, |s| s.lin.set_dimension(d))?;
        match self.encoder.write() {
            Ok(mut e) => *e = Arc::new(enc),
            Err(p) => *p.into_inner() = Arc::new(enc),
        }
        self.with(py, true, |s| {
            self.note_size(&s.lin);
            Ok(())
        })
    }

    fn feature_names(&self) -> Vec<String> {
        self.encoder().names().to_vec()
    }

    fn encode<'py>(
        &self,
        py: Python<'py>,
        context: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let x = encode(&self.encoder(), context)?;
        Ok(PyBytes::new(py, &to_bytes(&x)))
    }

    /// (context keys outside the definition, values of the wrong kind) since construction.
    fn encoder_counters(&self) -> (u64, u64) {
        let e = self.encoder();
        (
            e.unknown.load(std::sync::atomic::Ordering::Relaxed),
            e.mismatched.load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    #[pyo3(signature = (context, k=1))]
    #[allow(clippy::type_complexity)]
    fn choose<'py>(
        &self,
        py: Python<'py>,
        context: &Bound<'py, PyAny>,
        k: usize,
    ) -> PyResult<(
        Bound<'py, PyTuple>,
        Bound<'py, PyTuple>,
        Bound<'py, PyTuple>,
        Bound<'py, PyBytes>,
    )> {
        let x = encode(&self.encoder(), context)?;
        let choice = self.with(py, self.quick(), |s| s.lin.choose(&mut s.rng, &x, k))?;
        Ok((
            PyTuple::new(py, choice.arms)?,
            PyTuple::new(py, choice.scores)?,
            PyTuple::new(py, choice.propensities)?,
            PyBytes::new(py, &to_bytes(&x)),
        ))
    }

    #[pyo3(signature = (x, k=1))]
    #[allow(clippy::type_complexity)]
    fn choose_x<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        k: usize,
    ) -> PyResult<(
        Bound<'py, PyTuple>,
        Bound<'py, PyTuple>,
        Bound<'py, PyTuple>,
    )> {
        let x = f64s(py, x)?;
        let choice = self.with(py, self.quick(), |s| s.lin.choose(&mut s.rng, &x, k))?;
        Ok((
            PyTuple::new(py, choice.arms)?,
            PyTuple::new(py, choice.scores)?,
            PyTuple::new(py, choice.propensities)?,
        ))
    }

    fn update(
        &self,
        py: Python<'_>,
        arms: Vec<usize>,
        xs: &Bound<'_, PyAny>,
        w: &Bound<'_, PyAny>,
        wy: &Bound<'_, PyAny>,
        wyy: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let (xs, w, wy, wyy) = (f64s(py, xs)?, f64s(py, w)?, f64s(py, wy)?, f64s(py, wyy)?);
        let quick = arms.len() < 64 && self.quick();
        self.with(py, quick, |s| s.lin.update(&arms, &xs, &w, &wy, &wyy))
    }

    #[pyo3(signature = (arm, xs, ys, weights, iterations=25))]
    fn refit_logistic(
        &self,
        py: Python<'_>,
        arm: usize,
        xs: &Bound<'_, PyAny>,
        ys: &Bound<'_, PyAny>,
        weights: &Bound<'_, PyAny>,
        iterations: usize,
    ) -> PyResult<usize> {
        let (xs, ys, weights) = (f64s(py, xs)?, f64s(py, ys)?, f64s(py, weights)?);
        // The fit runs on a copy outside the lock: decisions go on meanwhile.
        let mut copy = self.with(py, true, |s| {
            s.lin.check_refit(arm)?;
            Ok(s.lin.detached_arm(arm))
        })?;
        let used = py.detach(|| copy.refit_logistic(0, &xs, &ys, &weights, iterations))?;
        self.with(py, true, |s| s.lin.adopt_arm(arm, &copy))?;
        Ok(used)
    }

    /// Variance inflation of half-life discounting, d^-(clock - base) (>= 1).
    fn set_inflation(&self, py: Python<'_>, c: f64) -> PyResult<()> {
        self.with(py, true, |s| s.lin.set_inflation(c))
    }

    fn reset(&self, py: Python<'_>) -> PyResult<()> {
        self.with(py, false, |s| {
            s.lin.reset();
            Ok(())
        })
    }

    fn predict(&self, py: Python<'_>, arm: usize, x: &Bound<'_, PyAny>) -> PyResult<(f64, f64)> {
        let x = f64s(py, x)?;
        self.with(py, true, |s| s.lin.predict(arm, &x))
    }

    fn coefficients(&self, py: Python<'_>, arm: usize) -> PyResult<(Vec<f64>, Vec<f64>)> {
        self.with(py, true, |s| s.lin.coefficients(arm))
    }

    fn observations(&self, py: Python<'_>) -> PyResult<Vec<f64>> {
        self.with(py, true, |s| Ok(s.lin.arms.iter().map(|a| a.n).collect()))
    }

    fn memory_per_arm(&self, py: Python<'_>) -> PyResult<usize> {
        self.with(py, true, |s| Ok(Linear::bytes_per_arm(s.lin.d())))
    }

    fn state<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let bytes = self.with(py, false, |s| Ok(s.lin.state()))?;
        Ok(PyBytes::new(py, &bytes))
    }

    fn load_state(&self, py: Python<'_>, data: &[u8]) -> PyResult<()> {
        let data = data.to_vec();
        self.with(py, false, |s| s.lin.load_state(&data))
    }
}
