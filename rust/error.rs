//! The one error type of the engine. The binding layer maps each variant to a
//! Python exception class.

use std::fmt;

pub type Result<T> = std::result::Result<T, TritError>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TritError {
    /// The caller passed something malformed: a wrong shape, a value outside
    /// its domain, a non-finite number. Maps to a `ValueError` subclass.
    InvalidInput(String),
    /// A kernel path was requested (TRIT_KERNEL) that this CPU or build cannot run.
    KernelUnavailable(String),
}

impl TritError {
    pub fn invalid(msg: impl Into<String>) -> Self {
        TritError::InvalidInput(msg.into())
    }
}

impl fmt::Display for TritError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TritError::InvalidInput(msg) | TritError::KernelUnavailable(msg) => f.write_str(msg),
        }
    }
}

impl std::error::Error for TritError {}
