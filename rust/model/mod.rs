//! The BitNet b1.58 model: configuration, weights built from checkpoint
//! tensors, KV cache and the forward pass. No Python here.

pub mod attention;
pub mod cache;
pub mod config;
pub mod dense;
pub mod ops;
pub mod session;
pub mod tensor;
pub mod weights;

pub use cache::KvType;
pub use config::{Config, LinearClass, QuantizationMode};
pub use session::Session;
pub use tensor::{DType, RawTensor};
pub use weights::{load, load_file_backed, HeadPrecision, Model, Proj};

#[cfg(test)]
mod tests;
