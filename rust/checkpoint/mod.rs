//! Checkpoints: the tensors of a model as files store them, looked up by name.
//!
//! A `Checkpoint` lists its tensor names and hands out each tensor as a
//! `RawTensor` (dtype, shape, bytes). `SafetensorsCheckpoint` reads a
//! `model.safetensors` file or the shards of an index, mapped read-only;
//! `MemoryCheckpoint` holds tensors given in memory (tests, synthetic models,
//! the Python `Model.load`); `GgufCheckpoint` reads a GGUF file. The model
//! builder sees only the trait, and `Usage` tracks which tensors it took
//! so that unused ones can be reported.

pub mod dtype;
pub mod files;
pub mod gguf;
pub mod mapping;
pub mod memory;
pub mod raw;
pub mod safetensors;

use std::collections::HashSet;
use std::sync::Mutex;

use crate::error::{Result, TritError};
use crate::kernels::TernaryMatrix;

pub use dtype::{bf16_to_f32, f16_to_f32, DType};
pub use gguf::GgufCheckpoint;
pub use memory::MemoryCheckpoint;
pub use raw::RawTensor;
pub use safetensors::SafetensorsCheckpoint;

/// The tensors of one model, however many files hold them.
pub trait Checkpoint: Sync {
    /// The name of every tensor, in no particular order.
    fn names(&self) -> Vec<&str>;

    /// The tensor called `name`, if there is one.
    fn tensor(&self, name: &str) -> Option<RawTensor<'_>>;

    /// Tells the checkpoint that tensor `name` has been converted and will not
    /// be read again: a file-backed one drops its pages from resident memory,
    /// so peak memory at load stays near the model's own size. Never changes
    /// what `tensor` returns.
    fn release(&self, _name: &str) {}

    /// Tensor `name` as a ternary matrix, for a checkpoint whose own formats
    /// hold ternary weights with their scale (GGUF's I2_S, TQ1_0, TQ2_0):
    /// the matrix comes out whole, values unchanged. None means the tensor is
    /// read with `tensor` as usual.
    fn ternary(&self, _name: &str) -> Option<Result<TernaryMatrix>> {
        None
    }
}

/// A checkpoint with a record of the tensors taken from it.
pub struct Usage<'c> {
    checkpoint: &'c dyn Checkpoint,
    used: Mutex<HashSet<String>>,
}

impl<'c> Usage<'c> {
    pub fn new(checkpoint: &'c dyn Checkpoint) -> Self {
        Usage {
            checkpoint,
            used: Mutex::default(),
        }
    }

    /// The tensor called `name`, marked as used; an error if there is none.
    pub fn take(&self, name: &str) -> Result<RawTensor<'c>> {
        let t = self
            .checkpoint
            .tensor(name)
            .ok_or_else(|| TritError::invalid(format!("missing tensor {name:?}")))?;
        self.used
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string());
        Ok(t)
    }

    /// `Checkpoint::ternary` of `name`, marked as used when there is one.
    pub fn take_ternary(&self, name: &str) -> Option<Result<TernaryMatrix>> {
        let m = self.checkpoint.ternary(name)?;
        self.used
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string());
        Some(m)
    }

    /// Releases (see `Checkpoint::release`) every tensor whose name starts
    /// with `prefix`.
    pub fn release_prefix(&self, prefix: &str) {
        for name in self.checkpoint.names() {
            if name.starts_with(prefix) {
                self.checkpoint.release(name);
            }
        }
    }

    /// The names of the tensors never taken, sorted.
    pub fn unused(&self) -> Vec<&'c str> {
        let used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        let mut unused: Vec<&str> = self
            .checkpoint
            .names()
            .into_iter()
            .filter(|name| !used.contains(*name))
            .collect();
        unused.sort_unstable();
        unused
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_reports_missing_and_unused_tensors() {
        let mut c = MemoryCheckpoint::new();
        c.insert("b", DType::U8, vec![2], vec![1, 2]).unwrap();
        c.insert("a", DType::U8, vec![1], vec![3]).unwrap();
        c.insert("c", DType::U8, vec![0], vec![]).unwrap();
        let usage = Usage::new(&c);
        assert_eq!(usage.take("b").unwrap().data, [1, 2]);
        let err = usage.take("z").unwrap_err().to_string();
        assert_eq!(err, "missing tensor \"z\"");
        assert_eq!(usage.unused(), ["a", "c"]);
    }
}
