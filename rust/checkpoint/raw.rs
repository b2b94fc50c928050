//! One tensor as a checkpoint stores it: dtype, shape and its bytes.

use super::dtype::{bf16_to_f32, decode_into, f16_to_f32, DType};
use crate::error::{Result, TritError};
use crate::memory::try_zeroed;

/// A borrowed view of one stored tensor: little-endian bytes, row-major,
/// whose count matches shape and dtype (checked by `new`).
#[derive(Clone, Copy, Debug)]
pub struct RawTensor<'a> {
    pub dtype: DType,
    pub shape: &'a [usize],
    pub data: &'a [u8],
}

impl<'a> RawTensor<'a> {
    /// A tensor whose byte count matches its shape and dtype.
    pub fn new(name: &str, dtype: DType, shape: &'a [usize], data: &'a [u8]) -> Result<Self> {
        let bytes = numel(shape)
            .and_then(|n| dtype.bytes_for(n))
            .ok_or_else(|| {
                TritError::invalid(format!("tensor {name:?}: shape {shape:?} overflows"))
            })?;
        if bytes != data.len() {
            return Err(TritError::invalid(format!(
                "tensor {name:?}: {} bytes for {} {shape:?}, which needs {bytes}",
                data.len(),
                dtype.name(),
            )));
        }
        Ok(RawTensor { dtype, shape, data })
    }

    pub fn numel(&self) -> usize {
        self.data.len() / self.dtype.size()
    }

    /// Element `i` as f32 (exact for every float dtype; U8 as its value).
    #[inline]
    pub fn get_f32(&self, i: usize) -> f32 {
        let d = self.data;
        match self.dtype {
            DType::U8 => f32::from(d[i]),
            DType::BF16 => bf16_to_f32(u16::from_le_bytes([d[2 * i], d[2 * i + 1]])),
            DType::F16 => f16_to_f32(u16::from_le_bytes([d[2 * i], d[2 * i + 1]])),
            DType::F32 => f32::from_le_bytes([d[4 * i], d[4 * i + 1], d[4 * i + 2], d[4 * i + 3]]),
        }
    }

    /// All elements as f32.
    /// The values widened to f32, in a buffer allocated fallibly: a tensor
    /// too large for memory is an error naming `what`, not an abort.
    pub fn to_f32(&self, what: &str) -> Result<Vec<f32>> {
        let mut out = try_zeroed::<f32>(self.numel(), what)?;
        decode_into(self.dtype, self.data, &mut out);
        Ok(out)
    }

    /// Row `r` of a 2-D tensor as f32 into `out` ([shape[1]]).
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        let row_bytes = self.shape[1] * self.dtype.size();
        decode_into(
            self.dtype,
            &self.data[r * row_bytes..(r + 1) * row_bytes],
            out,
        );
    }
}

fn numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_its_byte_count() {
        let data = [0u8; 6];
        assert!(RawTensor::new("t", DType::BF16, &[3], &data).is_ok());
        assert!(RawTensor::new("t", DType::F32, &[3], &data).is_err());
        let err = RawTensor::new("t", DType::U8, &[usize::MAX, 2], &data).unwrap_err();
        assert!(err.to_string().contains("overflows"), "{err}");
    }

    #[test]
    fn rows_decode_like_elements() {
        let bytes: Vec<u8> = [1.0f32, 2.0, 3.0, -4.0]
            .iter()
            .flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes())
            .collect();
        let shape = [2, 2];
        let t = RawTensor::new("t", DType::BF16, &shape, &bytes).unwrap();
        let mut row = [0.0f32; 2];
        t.row_into(1, &mut row);
        assert_eq!(row, [t.get_f32(2), t.get_f32(3)]);
        assert_eq!(t.to_f32("t").unwrap(), vec![1.0, 2.0, 3.0, -4.0]);
    }
}
