//! The core's one error type; the bindings turn it into a Python exception.

use std::fmt;

#[derive(Debug, Clone, PartialEq)]
pub enum CoreError {
    /// Bad input from the caller: nothing was changed.
    Invalid(String),
    /// A bug in the core (a caught panic).
    Internal(String),
}

impl CoreError {
    pub fn invalid(msg: impl Into<String>) -> Self {
        CoreError::Invalid(msg.into())
    }

    pub fn internal(msg: impl Into<String>) -> Self {
        CoreError::Internal(msg.into())
    }
}

impl fmt::Display for CoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CoreError::Invalid(m) | CoreError::Internal(m) => write!(f, "{m}"),
        }
    }
}

impl std::error::Error for CoreError {}
