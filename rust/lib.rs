//! trit: CPU inference for ternary (BitNet b1.58) language models.
//!
//! The engine modules (`kernels`, `threads`, ...) know nothing of Python; the
//! `python` module is a thin PyO3 layer over them, compiled only with the
//! `python` feature that maturin turns on.

pub mod bandwidth;
pub mod checkpoint;
pub mod error;
pub mod kernels;
pub mod memory;
pub mod model;
pub mod sampling;
pub mod threads;

#[cfg(feature = "python")]
mod python;

pub use error::{Result, TritError};
