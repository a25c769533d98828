//! Context -> feature vector: an intercept, numbers standardised, strings one-hot over a fixed
//! list of levels plus "other". The definition (which keys, levels, means) is learnt by the
//! server from logged contexts; here it is only applied, on the request path (Fx hashing:
//! the keys are the caller's but the maps are small and rebuilt per definition, and SipHash
//! was most of an encode's time).

use rustc_hash::FxHashMap as HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::CoreError;

/// Standardised numbers are clipped to this many standard deviations: one outlier must not
/// dominate a ridge model's update.
pub const CLIP: f64 = 10.0;

enum Slot {
    Number {
        index: usize,
        mean: f64,
        inv_std: f64,
    },
    Category {
        levels: HashMap<String, usize>,
        other: usize,
    },
}

/// A context value as the caller sent it.
pub enum Value<'a> {
    Number(f64),
    Text(&'a str),
}

pub struct Encoder {
    slots: HashMap<String, Slot>,
    names: Vec<String>,
    /// Context keys outside the definition, and values of the wrong kind (ignored).
    pub unknown: AtomicU64,
    pub mismatched: AtomicU64,
}

impl Encoder {
    /// Only the intercept.
    pub fn empty() -> Encoder {
        Encoder {
            slots: HashMap::default(),
            names: vec!["(intercept)".to_string()],
            unknown: AtomicU64::new(0),
            mismatched: AtomicU64::new(0),
        }
    }

    pub fn new(
        numeric: &[(String, f64, f64)],
        categorical: &[(String, Vec<String>)],
    ) -> Result<Encoder, CoreError> {
        let mut enc = Encoder::empty();
        for (name, mean, std) in numeric {
            if !(mean.is_finite() && std.is_finite() && *std > 0.0) {
                return Err(CoreError::invalid(format!(
                    "feature {name:?}: mean {mean} and std {std} must be finite and std > 0"
                )));
            }
            let index = enc.names.len();
            enc.add(
                name,
                Slot::Number {
                    index,
                    mean: *mean,
                    inv_std: 1.0 / std,
                },
            )?;
            enc.names.push(name.clone());
        }
        for (name, levels) in categorical {
            let mut map = HashMap::with_capacity_and_hasher(levels.len(), Default::default());
            for level in levels {
                if map.insert(level.clone(), enc.names.len()).is_some() {
                    return Err(CoreError::invalid(format!(
                        "feature {name:?} lists level {level:?} twice"
                    )));
                }
                enc.names.push(format!("{name}={level}"));
            }
            let other = enc.names.len();
            enc.names.push(format!("{name}=<other>"));
            enc.add(name, Slot::Category { levels: map, other })?;
        }
        Ok(enc)
    }

    fn add(&mut self, name: &str, slot: Slot) -> Result<(), CoreError> {
        if self.slots.insert(name.to_string(), slot).is_some() {
            return Err(CoreError::invalid(format!(
                "feature {name:?} is defined twice"
            )));
        }
        Ok(())
    }

    pub fn dimension(&self) -> usize {
        self.names.len()
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Writes the features of one context item into `x` (zeroed, intercept set by the caller).
    #[inline]
    pub fn put(&self, x: &mut [f64], key: &str, value: Value<'_>) {
        match (self.slots.get(key), value) {
            (None, _) => {
                self.unknown.fetch_add(1, Ordering::Relaxed);
            }
            (
                Some(Slot::Number {
                    index,
                    mean,
                    inv_std,
                }),
                Value::Number(v),
            ) => {
                x[*index] = ((v - mean) * inv_std).clamp(-CLIP, CLIP);
            }
            (Some(Slot::Category { levels, other }), Value::Text(s)) => {
                x[*levels.get(s).unwrap_or(other)] = 1.0;
            }
            (Some(_), _) => {
                self.mismatched.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// A fresh vector: intercept 1, everything else 0 (missing numbers sit at their mean,
    /// a missing category has no level set).
    pub fn blank(&self) -> Vec<f64> {
        let mut x = vec![0.0; self.names.len()];
        x[0] = 1.0;
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_levels_other_unknown_and_mismatch() {
        let enc = Encoder::new(
            &[("age".into(), 30.0, 10.0)],
            &[("segment".into(), vec!["a".into(), "b".into()])],
        )
        .unwrap();
        assert_eq!(
            enc.names(),
            [
                "(intercept)",
                "age",
                "segment=a",
                "segment=b",
                "segment=<other>"
            ]
        );
        let mut x = enc.blank();
        enc.put(&mut x, "age", Value::Number(45.0));
        enc.put(&mut x, "segment", Value::Text("b"));
        enc.put(&mut x, "colour", Value::Text("red"));
        assert_eq!(x, vec![1.0, 1.5, 0.0, 1.0, 0.0]);
        let mut y = enc.blank();
        enc.put(&mut y, "segment", Value::Text("zzz"));
        enc.put(&mut y, "age", Value::Text("old"));
        enc.put(&mut y, "age", Value::Number(1e9));
        assert_eq!(y, vec![1.0, CLIP, 0.0, 0.0, 1.0]);
        assert_eq!(enc.unknown.load(Ordering::Relaxed), 1);
        assert_eq!(enc.mismatched.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn bad_definitions_are_refused() {
        assert!(Encoder::new(&[("a".into(), 0.0, 0.0)], &[]).is_err());
        assert!(Encoder::new(&[("a".into(), 0.0, 1.0)], &[("a".into(), vec![])]).is_err());
        assert!(Encoder::new(&[], &[("c".into(), vec!["x".into(), "x".into()])]).is_err());
    }
}
