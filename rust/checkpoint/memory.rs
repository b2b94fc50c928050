//! A checkpoint held in memory: tensors given as bytes (tests, synthetic
//! models, the Python `Model.load`). It owns copies, so nothing it is built
//! from is ever borrowed past the call or released.

use std::collections::HashMap;

use super::{Checkpoint, DType, RawTensor};
use crate::error::{Result, TritError};

struct OwnedTensor {
    dtype: DType,
    shape: Vec<usize>,
    data: Vec<u8>,
}

#[derive(Default)]
pub struct MemoryCheckpoint {
    tensors: HashMap<String, OwnedTensor>,
}

impl MemoryCheckpoint {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a tensor; its byte count must match shape and dtype, and its name
    /// must be new.
    pub fn insert(
        &mut self,
        name: impl Into<String>,
        dtype: DType,
        shape: Vec<usize>,
        data: Vec<u8>,
    ) -> Result<()> {
        let name = name.into();
        RawTensor::new(&name, dtype, &shape, &data)?;
        if self.tensors.contains_key(&name) {
            return Err(TritError::invalid(format!(
                "tensor {name:?} is given twice"
            )));
        }
        self.tensors
            .insert(name, OwnedTensor { dtype, shape, data });
        Ok(())
    }
}

impl Checkpoint for MemoryCheckpoint {
    fn names(&self) -> Vec<&str> {
        self.tensors.keys().map(String::as_str).collect()
    }

    fn tensor(&self, name: &str) -> Option<RawTensor<'_>> {
        self.tensors.get(name).map(|t| RawTensor {
            dtype: t.dtype,
            shape: &t.shape,
            data: &t.data,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_wrong_sizes_and_repeated_names() {
        let mut c = MemoryCheckpoint::new();
        c.insert("w", DType::BF16, vec![2], vec![0; 4]).unwrap();
        assert!(c.insert("x", DType::BF16, vec![2], vec![0; 3]).is_err());
        let err = c.insert("w", DType::U8, vec![1], vec![0]).unwrap_err();
        assert!(err.to_string().contains("given twice"), "{err}");
        let t = c.tensor("w").unwrap();
        assert_eq!((t.dtype, t.shape, t.data.len()), (DType::BF16, &[2][..], 4));
        assert!(c.tensor("x").is_none());
    }
}
