//! ggml's tensor types that trit reads, their block layouts
//! (docs/formats.md "GGUF tensor types"), and their exact decoding: ternary
//! types to codes and one scale, quantized float types to f32.

use crate::checkpoint::dtype::{bf16_to_f32, f16_to_f32};

/// Elements of a K-quant or TQ super-block (ggml's QK_K).
const QK_K: usize = 256;
/// Elements of a Q4_0 / Q8_0 block (ggml's QK4_0, QK8_0).
const QK32: usize = 32;
/// Elements of one I2_S block: bitnet.cpp's QK_I2_S on x86, the layout of the
/// published files (docs/formats.md "I2_S").
pub const QK_I2_S: usize = 128;

/// The ggml tensor types trit reads (ids from ggml.h; I2_S from bitnet.cpp's fork).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q8_0,
    Q6K,
    BF16,
    TQ1_0,
    TQ2_0,
    I2S,
}

impl GgmlType {
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            8 => GgmlType::Q8_0,
            14 => GgmlType::Q6K,
            30 => GgmlType::BF16,
            34 => GgmlType::TQ1_0,
            35 => GgmlType::TQ2_0,
            36 => GgmlType::I2S,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q6K => "Q6_K",
            GgmlType::BF16 => "BF16",
            GgmlType::TQ1_0 => "TQ1_0",
            GgmlType::TQ2_0 => "TQ2_0",
            GgmlType::I2S => "I2_S",
        }
    }

    /// (elements, bytes) of one block; plain types are blocks of one.
    fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (QK32, 2 + QK32 / 2),
            GgmlType::Q8_0 => (QK32, 2 + QK32),
            // ql[128], qh[64], scales[16], d
            GgmlType::Q6K => (QK_K, QK_K / 2 + QK_K / 4 + QK_K / 16 + 2),
            // qs[48] (5 trits a byte), qh[4] (4 trits a byte), d
            GgmlType::TQ1_0 => (QK_K, (QK_K - 4 * QK_K / 64) / 5 + QK_K / 64 + 2),
            // qs[64] (4 trits a byte), d
            GgmlType::TQ2_0 => (QK_K, QK_K / 4 + 2),
            GgmlType::I2S => (QK_I2_S, QK_I2_S / 4),
        }
    }

    /// Stored as ternary codes with scales.
    pub fn is_ternary(self) -> bool {
        matches!(self, GgmlType::TQ1_0 | GgmlType::TQ2_0 | GgmlType::I2S)
    }

    /// The bytes a tensor of `numel` elements with rows of `row_len` takes,
    /// or an error saying why that shape cannot be stored in this type.
    pub fn bytes_for(self, row_len: usize, numel: usize) -> Result<usize, String> {
        let (per_block, block_bytes) = self.block();
        // ggml blocks never straddle rows; I2_S blocks run over the whole
        // tensor, which bitnet.cpp packs only when it divides evenly.
        let unit = if self == GgmlType::I2S {
            numel
        } else {
            row_len
        };
        if !unit.is_multiple_of(per_block) {
            return Err(format!(
                "{} stores blocks of {per_block} elements, which {} {unit} is not a multiple of",
                self.name(),
                if self == GgmlType::I2S {
                    "its element count"
                } else {
                    "its row length"
                },
            ));
        }
        let bytes = (numel / per_block)
            .checked_mul(block_bytes)
            .ok_or("its size overflows")?;
        // I2_S: the packed codes, then one f32 scale in a 32-byte tail.
        Ok(if self == GgmlType::I2S {
            bytes + 32
        } else {
            bytes
        })
    }
}

/// A ggml type id as ggml names it, for messages about types trit does not read.
pub fn type_id_name(id: u32) -> String {
    let name = match id {
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        15 => "Q8_K",
        16..=23 | 29 => "an IQ type",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        37 | 38 => "a bitnet.cpp TL type (machine-specific)",
        _ => return format!("ggml type {id}"),
    };
    format!("ggml type {id} ({name})")
}

fn half(b: &[u8]) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[0], b[1]]))
}

/// Ternary weights as stored: values in {-1, 0, 1} (row-major, flat) and the
/// one scale they are multiplied by.
pub struct Ternary {
    pub values: Vec<i8>,
    pub scale: f32,
}

/// Why a tensor's values are not a ternary matrix with one scale.
pub enum NotTernary {
    /// A 2-bit code of 3 at this flat element index.
    BadCode(usize),
    /// The block starting at this element has a scale other than the first's.
    ScaleDiffers {
        element: usize,
        first: f32,
        this: f32,
    },
    /// A float value that is neither 0 nor ± the scale.
    NotAMultiple {
        element: usize,
        value: f32,
        scale: f32,
    },
}

/// Block scales of a TQ tensor: they must all be equal to be one matrix
/// scale. Blocks whose codes are all zero are skipped: their scale multiplies
/// nothing (and ggml's quantizer writes 0 for them).
struct ScaleCheck {
    scale: Option<f32>,
}

impl ScaleCheck {
    fn block(&mut self, element: usize, d: f32, values: &[i8]) -> Result<(), NotTernary> {
        if values.iter().all(|&v| v == 0) {
            return Ok(());
        }
        match self.scale {
            None => self.scale = Some(d),
            Some(first) if first.to_bits() != d.to_bits() => {
                return Err(NotTernary::ScaleDiffers {
                    element,
                    first,
                    this: d,
                })
            }
            Some(_) => {}
        }
        Ok(())
    }
}

/// Decodes a tensor of `numel` elements (`data` of the size `bytes_for`
/// gave) to ternary values and one scale: ternary types as stored, float
/// types only when every value is 0 or ± one scale.
pub fn decode_ternary(ty: GgmlType, data: &[u8], numel: usize) -> Result<Ternary, NotTernary> {
    let mut values = vec![0i8; numel];
    let mut scales = ScaleCheck { scale: None };
    match ty {
        GgmlType::I2S => {
            // bitnet.cpp quantize_i2_s (ACT_PARALLEL, QK_I2_S = 128): block b
            // is 32 bytes; byte p holds elements 128b + 32g + p, g = 0..3, in
            // bits 7-6, 5-4, 3-2, 1-0, as the code value + 1.
            let packed = &data[..numel / 4];
            for (b, (block, out)) in packed
                .chunks_exact(QK_I2_S / 4)
                .zip(values.chunks_exact_mut(QK_I2_S))
                .enumerate()
            {
                for g in 0..4 {
                    for (p, &byte) in block.iter().enumerate() {
                        let code = (byte >> (6 - 2 * g)) & 3;
                        if code == 3 {
                            return Err(NotTernary::BadCode(b * QK_I2_S + 32 * g + p));
                        }
                        out[32 * g + p] = code as i8 - 1;
                    }
                }
            }
            let tail = &data[numel / 4..numel / 4 + 4];
            let scale = f32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]);
            return Ok(Ternary { values, scale });
        }
        GgmlType::TQ2_0 => {
            // ggml dequantize_row_tq2_0: element 128h + 32l + m of a block is
            // bits 2l..2l+1 of qs[32h + m], as the code value + 1.
            let (_, size) = ty.block();
            for (b, (block, out)) in data
                .chunks_exact(size)
                .zip(values.chunks_exact_mut(QK_K))
                .enumerate()
            {
                let qs = &block[..QK_K / 4];
                for h in 0..2 {
                    for l in 0..4 {
                        for m in 0..32 {
                            let code = (qs[32 * h + m] >> (2 * l)) & 3;
                            if code == 3 {
                                return Err(NotTernary::BadCode(b * QK_K + 128 * h + 32 * l + m));
                            }
                            out[128 * h + 32 * l + m] = code as i8 - 1;
                        }
                    }
                }
                scales.block(b * QK_K, half(&block[QK_K / 4..]), out)?;
            }
        }
        GgmlType::TQ1_0 => {
            // ggml dequantize_row_tq1_0: a byte holds 5 (qs) or 4 (qh) trits
            // as a base-3 fraction; trit n is the top digit of byte * 3^n
            // (a u8 product, wrapping), read as (q * 3) >> 8. Elements
            // 0..160 come from qs[0..32] (n major), 160..240 from
            // qs[32..48], 240..256 from qh[0..4].
            const POW3: [u8; 5] = [1, 3, 9, 27, 81];
            let trit =
                |byte: u8, n: usize| ((u16::from(byte.wrapping_mul(POW3[n])) * 3) >> 8) as i8 - 1;
            let (_, size) = ty.block();
            for (b, (block, out)) in data
                .chunks_exact(size)
                .zip(values.chunks_exact_mut(QK_K))
                .enumerate()
            {
                let (qs, rest) = block.split_at(48);
                let (qh, d) = rest.split_at(4);
                let mut e = 0;
                for (bytes, digits) in [(&qs[..32], 5), (&qs[32..], 5), (qh, 4)] {
                    for n in 0..digits {
                        for &byte in bytes {
                            out[e] = trit(byte, n);
                            e += 1;
                        }
                    }
                }
                scales.block(b * QK_K, half(d), out)?;
            }
        }
        GgmlType::F32
        | GgmlType::F16
        | GgmlType::BF16
        | GgmlType::Q8_0
        | GgmlType::Q4_0
        | GgmlType::Q6K => {
            return decode_float_ternary(ty, data, numel);
        }
    }
    Ok(Ternary {
        values,
        // An all-zero tensor: any scale gives the same matrix.
        scale: scales.scale.unwrap_or(0.0),
    })
}

/// A float tensor whose values are all 0 or ± one scale (a converter's
/// ternarised weights), as codes and that scale.
fn decode_float_ternary(ty: GgmlType, data: &[u8], numel: usize) -> Result<Ternary, NotTernary> {
    let floats = dequantize(ty, data, numel);
    let scale = floats.iter().find(|v| **v != 0.0).map_or(0.0, |v| v.abs());
    let mut values = vec![0i8; numel];
    for (i, (&v, out)) in floats.iter().zip(values.iter_mut()).enumerate() {
        *out = if v == 0.0 {
            0
        } else if v == scale {
            1
        } else if v == -scale {
            -1
        } else {
            return Err(NotTernary::NotAMultiple {
                element: i,
                value: v,
                scale,
            });
        };
    }
    Ok(Ternary { values, scale })
}

/// Decodes a float or quantized-float tensor to f32, exactly: every value of
/// these types (a half, or an f16 scale times a small integer) is an f32.
pub fn dequantize(ty: GgmlType, data: &[u8], numel: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; numel];
    let (per_block, size) = ty.block();
    let blocks = data.chunks_exact(size).zip(out.chunks_exact_mut(per_block));
    match ty {
        GgmlType::F32 => {
            for (b, o) in blocks {
                o[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        GgmlType::F16 => {
            for (b, o) in blocks {
                o[0] = half(b);
            }
        }
        GgmlType::BF16 => {
            for (b, o) in blocks {
                o[0] = bf16_to_f32(u16::from_le_bytes([b[0], b[1]]));
            }
        }
        GgmlType::Q8_0 => {
            // d, then 32 int8 values: y = q * d.
            for (b, o) in blocks {
                let d = half(b);
                for (y, &q) in o.iter_mut().zip(&b[2..]) {
                    *y = f32::from(q as i8) * d;
                }
            }
        }
        GgmlType::Q4_0 => {
            // d, then 16 bytes: element j is the low nibble of byte j, element
            // j + 16 the high one, both offset by 8: y = (q - 8) * d.
            for (b, o) in blocks {
                let d = half(b);
                for (j, &q) in b[2..].iter().enumerate() {
                    o[j] = f32::from((q & 0xf) as i8 - 8) * d;
                    o[j + 16] = f32::from((q >> 4) as i8 - 8) * d;
                }
            }
        }
        GgmlType::Q6K => {
            // ggml dequantize_row_q6_K: two halves of 128; in each, element
            // l + 32i (l < 32) takes 4 low bits from ql and 2 high bits from
            // qh, minus 32, times d * scales[(l / 16) + 2i].
            for (b, o) in blocks {
                let (ql, rest) = b.split_at(QK_K / 2);
                let (qh, rest) = rest.split_at(QK_K / 4);
                let (sc, d) = rest.split_at(QK_K / 16);
                let d = half(d);
                for h in 0..2 {
                    let (ql, qh, sc) = (&ql[64 * h..], &qh[32 * h..], &sc[8 * h..]);
                    let y = &mut o[128 * h..];
                    for l in 0..32 {
                        let is = l / 16;
                        let q = [
                            (ql[l] & 0xf) | ((qh[l] & 3) << 4),
                            (ql[l + 32] & 0xf) | (((qh[l] >> 2) & 3) << 4),
                            (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
                            (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4),
                        ];
                        for (i, q) in q.into_iter().enumerate() {
                            let scale = d * f32::from(sc[is + 2 * i] as i8);
                            y[l + 32 * i] = scale * f32::from(q as i8 - 32);
                        }
                    }
                }
            }
        }
        GgmlType::TQ1_0 | GgmlType::TQ2_0 | GgmlType::I2S => {
            unreachable!("ternary types are decoded by decode_ternary")
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_sizes_match_ggml() {
        // ggml-common.h static_asserts: block_q4_0 18, block_q8_0 34,
        // block_q6_K 210, block_tq1_0 54, block_tq2_0 66.
        assert_eq!(GgmlType::Q4_0.block(), (32, 18));
        assert_eq!(GgmlType::Q8_0.block(), (32, 34));
        assert_eq!(GgmlType::Q6K.block(), (256, 210));
        assert_eq!(GgmlType::TQ1_0.block(), (256, 54));
        assert_eq!(GgmlType::TQ2_0.block(), (256, 66));
        assert_eq!(GgmlType::I2S.bytes_for(256, 512), Ok(128 + 32));
        assert!(GgmlType::TQ2_0.bytes_for(128, 256).is_err());
        assert!(GgmlType::I2S.bytes_for(3, 192).is_err());
    }

    #[test]
    fn decodes_i2s_blocks() {
        // Element 32g + p of a block sits at byte p, bits 6 - 2g.
        let mut data = vec![0x55u8; 32 + 32];
        data[0] = 0b10_00_01_10; // elements 0, 32, 64, 96: 1, -1, 0, 1
        data[32..36].copy_from_slice(&0.5f32.to_le_bytes());
        let t = decode_ternary(GgmlType::I2S, &data, 128).ok().unwrap();
        assert_eq!(
            (t.values[0], t.values[32], t.values[64], t.values[96]),
            (1, -1, 0, 1)
        );
        assert_eq!(t.values.iter().filter(|&&v| v != 0).count(), 3);
        assert_eq!(t.scale, 0.5);
        data[5] = 0xff;
        assert!(matches!(
            decode_ternary(GgmlType::I2S, &data, 128),
            Err(NotTernary::BadCode(5))
        ));
    }

    #[test]
    fn decodes_tq_blocks_and_refuses_unequal_scales() {
        let mut block = vec![0x55u8; 66];
        block[64..].copy_from_slice(&0x3c00u16.to_le_bytes()); // d = 1
        block[1] = 0x56; // element 1 (l = 0): code 2 → +1
        let t = decode_ternary(GgmlType::TQ2_0, &block, 256).ok().unwrap();
        assert_eq!(t.values[1], 1);
        assert_eq!(t.scale, 1.0);
        let mut two = block.clone();
        two.extend_from_slice(&block);
        two[66 + 64..].copy_from_slice(&0x4000u16.to_le_bytes()); // d = 2
        assert!(matches!(
            decode_ternary(GgmlType::TQ2_0, &two, 512),
            Err(NotTernary::ScaleDiffers { element: 256, .. })
        ));
        // TQ1_0: a byte of 0 reads as trits of value -1 everywhere.
        let mut tq1 = vec![0u8; 54];
        tq1[52..].copy_from_slice(&0x3800u16.to_le_bytes()); // d = 0.5
        let t = decode_ternary(GgmlType::TQ1_0, &tq1, 256).ok().unwrap();
        assert!(t.values.iter().all(|&v| v == -1));
        assert_eq!(t.scale, 0.5);
    }

    #[test]
    fn dequantizes_q8_0_and_q4_0() {
        let mut q8 = 0x3800u16.to_le_bytes().to_vec(); // d = 0.5
        q8.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let y = dequantize(GgmlType::Q8_0, &q8, 32);
        assert_eq!(y[0], -8.0);
        assert_eq!(y[31], 7.5);
        let mut q4 = 0x4000u16.to_le_bytes().to_vec(); // d = 2
        q4.extend([0x9fu8; 16]); // low nibble 15, high 9
        let y = dequantize(GgmlType::Q4_0, &q4, 32);
        assert_eq!((y[0], y[16]), (14.0, 2.0));
    }
}
