//! Raw tensors handed over by the loader (bytes + dtype + shape), their
//! element decoding, and the release of a checkpoint's file pages.

use crate::error::{Result, TritError};

/// Element types of safetensors files that BitNet checkpoints use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    U8,
    BF16,
    F16,
    F32,
}

impl DType {
    /// The safetensors name ("U8", "BF16", "F16", "F32").
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "U8" => Ok(DType::U8),
            "BF16" => Ok(DType::BF16),
            "F16" => Ok(DType::F16),
            "F32" => Ok(DType::F32),
            _ => Err(TritError::invalid(format!(
                "unsupported tensor dtype {name:?}; expected U8, BF16, F16 or F32"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::U8 => "U8",
            DType::BF16 => "BF16",
            DType::F16 => "F16",
            DType::F32 => "F32",
        }
    }

    pub fn size(self) -> usize {
        match self {
            DType::U8 => 1,
            DType::BF16 | DType::F16 => 2,
            DType::F32 => 4,
        }
    }

    pub fn is_float(self) -> bool {
        self != DType::U8
    }
}

/// One tensor as stored on disk: little-endian bytes, row-major.
#[derive(Clone, Copy, Debug)]
pub struct RawTensor<'a> {
    pub dtype: DType,
    pub shape: &'a [usize],
    pub data: &'a [u8],
}

impl<'a> RawTensor<'a> {
    /// A tensor whose byte count matches its shape and dtype.
    pub fn new(name: &str, dtype: DType, shape: &'a [usize], data: &'a [u8]) -> Result<Self> {
        let numel = numel(shape).ok_or_else(|| {
            TritError::invalid(format!("tensor {name:?}: shape {shape:?} overflows"))
        })?;
        if numel.checked_mul(dtype.size()) != Some(data.len()) {
            return Err(TritError::invalid(format!(
                "tensor {name:?}: {} bytes for {} {shape:?}, which needs {}",
                data.len(),
                dtype.name(),
                numel.saturating_mul(dtype.size())
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
    pub fn to_f32(&self) -> Vec<f32> {
        (0..self.numel()).map(|i| self.get_f32(i)).collect()
    }

    /// Row `r` of a 2-D tensor as f32 into `out` ([shape[1]]); the dtype is
    /// matched once per row, not per element.
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        let cols = self.shape[1];
        let bytes = &self.data[r * cols * self.dtype.size()..(r + 1) * cols * self.dtype.size()];
        match self.dtype {
            DType::BF16 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = bf16_to_f32(u16::from_le_bytes([b[0], b[1]]));
                }
            }
            DType::F16 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = f16_to_f32(u16::from_le_bytes([b[0], b[1]]));
                }
            }
            DType::F32 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            DType::U8 => {
                for (o, &b) in out.iter_mut().zip(bytes) {
                    *o = f32::from(b);
                }
            }
        }
    }
}

fn numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// bfloat16 bits to f32: bf16 is the top half of an f32, so this is exact.
#[inline(always)]
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// IEEE half bits to f32 (exact: every half is an f32).
pub fn f16_to_f32(bits: u16) -> f32 {
    let sign = u32::from(bits >> 15) << 31;
    let exp = u32::from((bits >> 10) & 0x1f);
    let mant = u32::from(bits & 0x3ff);
    let magnitude = match (exp, mant) {
        (0, 0) => 0,
        // Subnormal half: mant * 2^-24, exact in f32.
        (0, _) => return sign_of(sign) * (mant as f32) * f32::powi(2.0, -24),
        (31, 0) => 0xff << 23,
        (31, _) => (0xff << 23) | (mant << 13),
        _ => ((exp + 127 - 15) << 23) | (mant << 13),
    };
    f32::from_bits(sign | magnitude)
}

fn sign_of(sign_bit: u32) -> f32 {
    if sign_bit != 0 {
        -1.0
    } else {
        1.0
    }
}

/// Drops the whole pages inside `bytes` from this process's resident memory.
///
/// # Safety
/// `bytes` must lie in a read-only mapping of a file that nothing writes
/// through: then the pages are read back from the file if touched again, and
/// the content never changes. On anonymous memory this would zero the pages.
pub unsafe fn release_file_pages(bytes: &[u8]) {
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096; // every Linux page size is a multiple of this
        let start = (bytes.as_ptr() as usize).next_multiple_of(PAGE);
        let end = (bytes.as_ptr() as usize + bytes.len()) / PAGE * PAGE;
        if end > start {
            // A failed madvise only leaves the pages resident: nothing to handle.
            // SAFETY: per the contract, [start, end) is file-backed and read-only.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = bytes;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_formats_widen_exactly() {
        assert_eq!(bf16_to_f32(0x3f80), 1.0);
        assert_eq!(bf16_to_f32(0xc040), -3.0);
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x8001), -(2f32.powi(-24)));
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert!(f16_to_f32(0x7c00).is_infinite());
        assert!(f16_to_f32(0x7e00).is_nan());
    }

    #[test]
    fn raw_tensor_checks_its_byte_count() {
        let data = [0u8; 6];
        assert!(RawTensor::new("t", DType::BF16, &[3], &data).is_ok());
        assert!(RawTensor::new("t", DType::F32, &[3], &data).is_err());
        assert!(DType::parse("F64").is_err());
    }
}
