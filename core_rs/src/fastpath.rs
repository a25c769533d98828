//! The Decide fast path: a whole Decide of one arm without a context, for experiments the
//! server marks plain (running, not sticky, no control share / floors / burn-in, no model,
//! a decision observed the moment it is stored), from the request's bytes to the response's
//! bytes in one call holding the GIL for a few microseconds.
//!
//! Per call the server's Python would otherwise parse the request, look up the experiment,
//! check the unit id, draw, make the decision id, build the record, queue it, update the
//! serving counters and build the response: ~20 µs of interpreter time, and with the GIL
//! contended by a dozen RPC threads each microsecond held costs several more in switches.
//! Here the records wait in memory until the writer thread takes them (`take`) for its next
//! group commit, as JSON in the decision record's stored format, with the per-arm counts the
//! statistics need; rewards find them meanwhile (`get`). Anything unusual (an unknown
//! experiment, a field other than experiment id / unit id / k <= 1, an id the server would
//! refuse, a full queue, a failing store) returns None and the server's general path answers,
//! with its errors.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyTuple};
use rand::TryRngCore;

use crate::{locked, PyBandit};

/// Bytes of a unit id the server accepts (`banditd.validation.ID_LIMITS`).
const UNIT_ID_LIMIT: usize = 256;
/// Decision ids: 11 hex digits of unix ms, then 12 random hex digits (`store.new_decision_id`).
const ID_LEN: usize = 23;
const RANDOM_IDS_PER_READ: usize = 4096;

type DecisionKey = [u8; ID_LEN];

struct Experiment {
    id: Arc<str>,
    bandit: Py<PyBandit>,
    arm_ids: Arc<Vec<Arc<str>>>,
}

struct Record {
    experiment: Arc<str>,
    arm: u32,
    arm_id: Arc<str>,
    propensity: f64,
    unit: String,
    ts_ms: u64,
    version: u64,
    seconds: f64,
}

#[derive(Default)]
struct Log {
    /// Answered and not yet committed (taken or not).
    records: HashMap<DecisionKey, Record>,
    /// Answered and not yet taken by the writer, in order.
    order: Vec<DecisionKey>,
    /// Taken and not yet committed, by the token `take` returned.
    taken: HashMap<u64, Vec<DecisionKey>>,
    next_token: u64,
}

/// Random hex digits for decision ids, read from the OS 4,096 ids at a time.
#[derive(Default)]
struct RandomHex {
    digits: Vec<u8>,
    used: usize,
}

impl RandomHex {
    fn next(&mut self) -> Option<[u8; 12]> {
        if self.used + 12 > self.digits.len() {
            let mut raw = vec![0u8; 6 * RANDOM_IDS_PER_READ];
            rand::rngs::OsRng.try_fill_bytes(&mut raw).ok()?;
            const HEX: &[u8; 16] = b"0123456789abcdef";
            self.digits = raw
                .iter()
                .flat_map(|b| [HEX[(b >> 4) as usize], HEX[(b & 15) as usize]])
                .collect();
            self.used = 0;
        }
        let mut out = [0u8; 12];
        out.copy_from_slice(&self.digits[self.used..self.used + 12]);
        self.used += 12;
        Some(out)
    }
}

/// One experiment's records of a `take`.
struct Group {
    experiment: Arc<str>,
    items: Vec<(DecisionKey, Vec<u8>)>,
    counts: Vec<(String, u64)>,
    arms: Vec<u8>,
    times: Vec<u8>,
    seconds: Vec<u8>,
}

fn take_groups(log: &Log, order: &[DecisionKey]) -> Vec<Group> {
    let mut groups: Vec<Group> = Vec::new();
    let mut at: HashMap<&str, usize> = HashMap::new();
    let mut count_at: Vec<HashMap<u32, usize>> = Vec::new();
    let mut keys: Vec<Vec<&DecisionKey>> = Vec::new();
    for key in order {
        let Some(r) = log.records.get(key) else {
            continue;
        };
        let g = *at.entry(&*r.experiment).or_insert_with(|| {
            groups.push(Group {
                experiment: r.experiment.clone(),
                items: Vec::new(),
                counts: Vec::new(),
                arms: Vec::new(),
                times: Vec::new(),
                seconds: Vec::new(),
            });
            count_at.push(HashMap::new());
            keys.push(Vec::new());
            groups.len() - 1
        });
        let group = &mut groups[g];
        let c = *count_at[g].entry(r.arm).or_insert_with(|| {
            group.counts.push((r.arm_id.to_string(), 0));
            group.counts.len() - 1
        });
        group.counts[c].1 += 1;
        group.arms.extend_from_slice(&r.arm.to_le_bytes());
        group.times.extend_from_slice(&r.ts_ms.to_le_bytes());
        group.seconds.extend_from_slice(&r.seconds.to_le_bytes());
        keys[g].push(key);
    }
    for (group, mut keys) in groups.iter_mut().zip(keys) {
        keys.sort_unstable(); // LMDB takes sorted keys fastest
        group.items = keys
            .into_iter()
            .map(|k| (*k, encode_record(&log.records[k])))
            .collect();
    }
    groups
}

#[pyclass(name = "FastDecide", module = "banditd._core", frozen)]
pub struct FastDecide {
    enabled: AtomicBool,
    limit: usize,
    experiments: Mutex<HashMap<String, Experiment>>,
    log: Mutex<Log>,
    random: Mutex<RandomHex>,
    /// Called (GIL held) when a record enters an empty queue: wakes the writer.
    wake: Py<PyAny>,
}

/// A length-delimited field's bytes at `i`, and the index after it.
fn delimited(raw: &[u8], i: usize) -> Option<(&[u8], usize)> {
    let (len, i) = varint(raw, i)?;
    let end = i.checked_add(usize::try_from(len).ok()?)?;
    Some((raw.get(i..end)?, end))
}

fn varint(raw: &[u8], mut i: usize) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *raw.get(i)?;
        i += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Some((v, i));
        }
    }
    None
}

/// (experiment id, unit id) of a DecideRequest that asks nothing but one arm for a unit.
fn parse_request(raw: &[u8]) -> Option<(&str, &str)> {
    let (mut exp, mut unit): (&[u8], &[u8]) = (b"", b"");
    let mut i = 0;
    while i < raw.len() {
        let (tag, next) = varint(raw, i)?;
        i = next;
        match tag {
            0x0a => (exp, i) = delimited(raw, i)?,
            0x12 => (unit, i) = delimited(raw, i)?,
            // k (uint32: the low 32 bits count) and allocation_version: only their defaults.
            0x18 | 0x30 => {
                let (v, next) = varint(raw, i)?;
                let limit = if tag == 0x18 { 1 } else { 0 };
                if (tag == 0x18 && (v & 0xffff_ffff) > limit) || (tag == 0x30 && v != 0) {
                    return None;
                }
                i = next;
            }
            _ => return None, // a context, features, or a field this path does not know
        }
    }
    Some((
        std::str::from_utf8(exp).ok()?,
        std::str::from_utf8(unit).ok()?,
    ))
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A DecideResponse: decision id, one ChosenArm; sticky_hit and model_version at their defaults.
fn encode_response(id: &[u8], arm_id: &str, score: f64, propensity: f64) -> Vec<u8> {
    let mut chosen = Vec::with_capacity(arm_id.len() + 24);
    chosen.push(0x0a);
    put_varint(&mut chosen, arm_id.len() as u64);
    chosen.extend_from_slice(arm_id.as_bytes());
    // proto3 leaves out fields at their default (+0.0), as the Python serializer does.
    for (tag, v) in [(0x11u8, score), (0x19u8, propensity)] {
        if v.to_bits() != 0 {
            chosen.push(tag);
            chosen.extend_from_slice(&v.to_le_bytes());
        }
    }
    let mut out = Vec::with_capacity(chosen.len() + id.len() + 6);
    out.push(0x0a);
    put_varint(&mut out, id.len() as u64);
    out.extend_from_slice(id);
    out.push(0x12);
    put_varint(&mut out, chosen.len() as u64);
    out.extend_from_slice(&chosen);
    out
}

fn json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// The stored decision record, as `DecisionRecord.encode` writes it.
fn encode_record(r: &Record) -> Vec<u8> {
    let mut s = String::with_capacity(64 + r.experiment.len() + r.arm_id.len() + r.unit.len());
    s.push_str("{\"e\":");
    json_string(&mut s, &r.experiment);
    s.push_str(",\"a\":[");
    json_string(&mut s, &r.arm_id);
    // Debug keeps a fraction or an exponent ("1.0", "1e-7"): JSON reads it back as a float.
    let _ = write!(s, "],\"p\":[{:?}],\"u\":", r.propensity);
    json_string(&mut s, &r.unit);
    let _ = write!(s, ",\"t\":{},\"v\":{}}}", r.ts_ms, r.version);
    s.into_bytes()
}

fn now_ms() -> Option<u64> {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .ok()?
        .as_millis();
    u64::try_from(ms).ok()
}

impl FastDecide {
    fn decide_inner(&self, py: Python<'_>, raw: &[u8]) -> Option<Vec<u8>> {
        let started = Instant::now();
        if !self.enabled.load(Ordering::Acquire) {
            return None;
        }
        let (exp_id, unit) = parse_request(raw)?;
        if unit.len() > UNIT_ID_LIMIT || unit.contains('\0') {
            return None;
        }
        let (exp, bandit, arm_ids) = {
            let map = self.experiments.lock().ok()?;
            let e = map.get(exp_id)?;
            (e.id.clone(), e.bandit.clone_ref(py), e.arm_ids.clone())
        };
        if self.log.lock().ok()?.records.len() >= self.limit {
            return None; // the general path refuses with RESOURCE_EXHAUSTED
        }
        let b = bandit.get();
        let (arm, score, propensity, version) = locked(&b.state, py, b.quick_choice(), |s| {
            let arms = s.choose_slate(1)?;
            let props = s.propensities(1, &arms, crate::INLINE_MIN_DRAWS)?;
            Ok((arms[0], s.bandit.mean(arms[0]), props[0], s.bandit.version))
        })
        .ok()?;
        let arm_id = arm_ids.get(arm)?.clone();
        let ts_ms = now_ms()?;
        let mut id = [0u8; ID_LEN];
        let time = format!("{ts_ms:011x}");
        if time.len() != 11 {
            return None;
        }
        id[..11].copy_from_slice(time.as_bytes());
        id[11..].copy_from_slice(&self.random.lock().ok()?.next()?);
        let response = encode_response(&id, &arm_id, score, propensity);
        let record = Record {
            experiment: exp,
            arm: u32::try_from(arm).ok()?,
            arm_id,
            propensity,
            unit: unit.to_owned(),
            ts_ms,
            version,
            seconds: started.elapsed().as_secs_f64(),
        };
        let first = {
            let mut log = self.log.lock().ok()?;
            if log.records.insert(id, record).is_some() {
                return None; // 48 random bits collided within a millisecond: let Python retry
            }
            log.order.push(id);
            log.order.len() == 1
        };
        if first {
            // The record is queued and will be committed whether or not the writer is woken
            // now (it also drains on its next round): a failing callback changes nothing here.
            let _ = self.wake.call0(py);
        }
        Some(response)
    }
}

#[pymethods]
impl FastDecide {
    #[new]
    fn new(limit: usize, wake: Py<PyAny>) -> Self {
        FastDecide {
            enabled: AtomicBool::new(true),
            limit,
            experiments: Mutex::new(HashMap::new()),
            log: Mutex::new(Log::default()),
            random: Mutex::new(RandomHex::default()),
            wake,
        }
    }

    /// Serves the experiment on the fast path (or updates its arms).
    fn set(&self, experiment_id: &str, bandit: Py<PyBandit>, arm_ids: Vec<String>) -> PyResult<()> {
        let entry = Experiment {
            id: Arc::from(experiment_id),
            bandit,
            arm_ids: Arc::new(arm_ids.into_iter().map(Arc::from).collect()),
        };
        let old = self
            .experiments
            .lock()
            .map_err(|_| crate::poisoned())?
            .insert(experiment_id.to_owned(), entry);
        drop(old); // after the lock: dropping a Python reference may run Python code
        Ok(())
    }

    /// Sends the experiment's decisions back to the general path.
    fn remove(&self, experiment_id: &str) -> PyResult<()> {
        let old = self
            .experiments
            .lock()
            .map_err(|_| crate::poisoned())?
            .remove(experiment_id);
        drop(old);
        Ok(())
    }

    /// Off: every call returns None (a failing store, a stopping writer).
    fn set_enabled(&self, enabled: bool) {
        self.enabled.store(enabled, Ordering::Release);
    }

    #[getter]
    fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    /// The serialized DecideResponse, or None when the general path must answer.
    fn decide<'py>(&self, py: Python<'py>, request: &[u8]) -> Option<Bound<'py, PyBytes>> {
        self.decide_inner(py, request).map(|r| PyBytes::new(py, &r))
    }

    /// The records not yet taken: a token for `committed` and, per experiment, (experiment
    /// id, [(decision id, record JSON)] sorted by id, [(arm id, decisions)], arm indices
    /// (u32 LE, in order), unix ms (u64 LE), server seconds of each call (f64 LE)). They stay
    /// findable by `get` until `committed(token)`.
    fn take<'py>(&self, py: Python<'py>) -> PyResult<(u64, Bound<'py, PyList>)> {
        // Encoded under the lock, turned into Python objects after it: making them may run
        // Python code that lets another thread take the GIL and wait for this lock.
        let (token, groups) = {
            let mut log = self.log.lock().map_err(|_| crate::poisoned())?;
            let order = std::mem::take(&mut log.order);
            let groups = take_groups(&log, &order);
            let token = log.next_token;
            log.next_token += 1;
            log.taken.insert(token, order);
            (token, groups)
        };
        let out = PyList::empty(py);
        for g in groups {
            let items = PyList::empty(py);
            for (key, json) in &g.items {
                items.append((PyBytes::new(py, key), PyBytes::new(py, json)))?;
            }
            out.append((
                g.experiment.to_string(),
                items,
                g.counts,
                PyBytes::new(py, &g.arms),
                PyBytes::new(py, &g.times),
                PyBytes::new(py, &g.seconds),
            ))?;
        }
        Ok((token, out))
    }

    /// Forgets the records of a `take` once their commit succeeded or failed for good.
    fn committed(&self, token: u64) -> PyResult<()> {
        let mut log = self.log.lock().map_err(|_| crate::poisoned())?;
        let keys = log.taken.remove(&token).unwrap_or_default();
        for key in keys {
            log.records.remove(&key);
        }
        Ok(())
    }

    /// A record answered and not yet committed: (experiment id, arm id, propensity, unit
    /// id, unix ms, posterior version); None for any other id.
    #[allow(clippy::type_complexity)]
    fn get<'py>(
        &self,
        py: Python<'py>,
        decision_id: &str,
    ) -> PyResult<Option<Bound<'py, PyTuple>>> {
        let Ok(key) = DecisionKey::try_from(decision_id.as_bytes()) else {
            return Ok(None);
        };
        let log = self.log.lock().map_err(|_| crate::poisoned())?;
        let Some(r) = log.records.get(&key) else {
            return Ok(None);
        };
        let t = (
            r.experiment.to_string(),
            r.arm_id.to_string(),
            r.propensity,
            r.unit.clone(),
            r.ts_ms,
            r.version,
        );
        drop(log);
        Ok(Some(t.into_pyobject(py)?))
    }

    /// Arm indices (u32 LE) of the experiment's records answered and not yet committed.
    fn pending_arms<'py>(
        &self,
        py: Python<'py>,
        experiment_id: &str,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let arms: Vec<u8> = {
            let log = self.log.lock().map_err(|_| crate::poisoned())?;
            log.records
                .values()
                .filter(|r| &*r.experiment == experiment_id)
                .flat_map(|r| r.arm.to_le_bytes())
                .collect()
        };
        Ok(PyBytes::new(py, &arms))
    }

    /// Records answered and not yet committed.
    fn __len__(&self) -> PyResult<usize> {
        Ok(self
            .log
            .lock()
            .map_err(|_| crate::poisoned())?
            .records
            .len())
    }

    /// Records not yet taken by the writer.
    #[getter]
    fn queued(&self) -> PyResult<usize> {
        Ok(self.log.lock().map_err(|_| crate::poisoned())?.order.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_with_anything_but_experiment_unit_and_k1_are_left_to_python() {
        assert_eq!(parse_request(b"\x0a\x01e\x12\x02u1"), Some(("e", "u1")));
        assert_eq!(parse_request(b"\x0a\x01e\x18\x01"), Some(("e", "")));
        assert_eq!(parse_request(b"\x0a\x01e\x18\x02"), None); // k = 2
        assert_eq!(parse_request(b"\x0a\x01e\x30\x01"), None); // allocation_version
        assert_eq!(parse_request(b"\x0a\x01e\x22\x00"), None); // a context entry
        assert_eq!(parse_request(b"\x0a\x05e"), None); // truncated
        assert_eq!(parse_request(b"\x0a\x01\xff"), None); // not UTF-8
    }

    #[test]
    fn records_are_json_with_escapes_and_float_propensities() {
        let r = Record {
            experiment: Arc::from("e\"x"),
            arm: 0,
            arm_id: Arc::from("a\\b"),
            propensity: 1.0,
            unit: "u\n".to_owned(),
            ts_ms: 5,
            version: 7,
            seconds: 0.0,
        };
        let s = String::from_utf8(encode_record(&r)).unwrap();
        assert_eq!(
            s,
            r#"{"e":"e\"x","a":["a\\b"],"p":[1.0],"u":"u\u000a","t":5,"v":7}"#
        );
    }
}
