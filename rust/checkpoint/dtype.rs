//! Element types of checkpoint tensors and their decoding to f32.

use crate::error::{Result, TritError};

/// The element types trit reads from checkpoints (the safetensors names).
///
/// Every type here is a plain array of fixed-size little-endian elements. A
/// block-quantized type (GGUF's, where a block of elements shares a scale)
/// joins as its own variant: `bytes_for` is where its block size enters, and
/// the decoders below are where it gets its own.
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

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::U8 => 1,
            DType::BF16 | DType::F16 => 2,
            DType::F32 => 4,
        }
    }

    /// Bytes that `numel` elements take, or None on overflow.
    pub fn bytes_for(self, numel: usize) -> Option<usize> {
        numel.checked_mul(self.size())
    }

    pub fn is_float(self) -> bool {
        self != DType::U8
    }
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

/// Widens little-endian elements of `dtype` from `bytes` into `out`, one
/// element per output value; the dtype is matched once per call, not per
/// element. U8 decodes as its value.
pub fn decode_into(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    match dtype {
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
    fn names_and_sizes() {
        for d in [DType::U8, DType::BF16, DType::F16, DType::F32] {
            assert_eq!(DType::parse(d.name()).unwrap(), d);
        }
        assert!(DType::parse("F64").is_err());
        assert_eq!(DType::F32.bytes_for(3), Some(12));
        assert_eq!(DType::F16.bytes_for(usize::MAX), None);
    }

    #[test]
    fn decodes_every_dtype() {
        let mut out = [0.0f32; 2];
        decode_into(DType::BF16, &[0x80, 0x3f, 0x40, 0xc0], &mut out);
        assert_eq!(out, [1.0, -3.0]);
        decode_into(DType::F16, &[0x00, 0x3c, 0x00, 0xc0], &mut out);
        assert_eq!(out, [1.0, -2.0]);
        decode_into(DType::U8, &[7, 255], &mut out);
        assert_eq!(out, [7.0, 255.0]);
        let bytes: Vec<u8> = [0.5f32, -8.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        decode_into(DType::F32, &bytes, &mut out);
        assert_eq!(out, [0.5, -8.0]);
    }
}
