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
    /// A buffer whose size the input decides could not be allocated: the
    /// input is valid but too large for this machine's memory. Maps to a
    /// `MemoryError` subclass; the message names the buffer and its size.
    OutOfMemory(String),
}

impl TritError {
    pub fn invalid(msg: impl Into<String>) -> Self {
        TritError::InvalidInput(msg.into())
    }

    /// The allocation of `bytes` bytes for `what` failed.
    pub fn out_of_memory(what: &str, bytes: usize) -> Self {
        TritError::OutOfMemory(format!(
            "not enough memory: cannot allocate {} for {what}",
            human_bytes(bytes)
        ))
    }
}

/// A byte count for messages: "512 bytes", "3.2 GiB".
fn human_bytes(bytes: usize) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} bytes");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

impl fmt::Display for TritError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TritError::InvalidInput(msg)
            | TritError::KernelUnavailable(msg)
            | TritError::OutOfMemory(msg) => f.write_str(msg),
        }
    }
}

impl std::error::Error for TritError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_memory_names_the_buffer_and_its_size() {
        let e = TritError::out_of_memory("the KV cache", 3 << 30);
        assert_eq!(
            e.to_string(),
            "not enough memory: cannot allocate 3.0 GiB for the KV cache"
        );
        assert!(TritError::out_of_memory("x", 12)
            .to_string()
            .contains("12 bytes"));
    }
}
