//! The BitNet b1.58 model (every supported family, docs/formats.md "Model
//! families"): configuration, weights built from checkpoint
//! tensors, KV cache and the forward pass. No Python here.

pub mod attention;
pub mod cache;
pub mod config;
pub mod dense;
pub mod engine;
pub mod open;
pub mod ops;
pub mod scoring;
pub mod session;
pub mod weights;

pub use cache::{KvType, AUTO as KV_AUTO};
pub use config::{Activation, Config, Family, LinearClass, QuantizationMode};
pub use engine::{Engine, Work};
pub use open::open;
pub use session::Session;
pub use weights::{load, HeadPrecision, Model, Proj};
// Checkpoint tensors, as the model builder reads them.
pub use crate::checkpoint::{DType, RawTensor};

#[cfg(test)]
mod tests;
