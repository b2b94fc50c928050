//! The packed ternary matrix every kernel reads.

use crate::error::{Result, TritError};
use crate::memory::{try_filled, try_reserve_total};

/// Weights per block along the input dimension.
pub const BLOCK: usize = 256;
/// Bytes per block: 2 bits per weight.
pub const BLOCK_BYTES: usize = BLOCK / 4;

/// One block of 256 ternary weights of one row, 2 bits each.
///
/// Byte `j` (0..64) holds the weights `j`, `j + 64`, `j + 128` and `j + 192` of
/// the block in bits 0-1, 2-3, 4-5 and 6-7, each stored as the code `w + 1`
/// (0, 1 or 2; 3 never occurs). Why this order: shifting a vector of the
/// block's bytes right by `2i` and masking with 3 yields the codes of 16, 32 or
/// 64 *consecutive* weights (NEON, AVX2, AVX-512), which multiply a plain
/// contiguous load of activations. Why `w + 1`: the codes are unsigned, as
/// `vpmaddubsw`/`vpdpbusd` want their first operand; the kernels subtract the
/// activation sum once per row to undo the `+ 1`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(C, align(64))]
pub struct PackedBlock(pub [u8; BLOCK_BYTES]);

const _: () = assert!(std::mem::size_of::<PackedBlock>() == BLOCK / 4);
const _: () = assert!(std::mem::align_of::<PackedBlock>() == 64);

/// The code of a zero weight; padding past `n_in` holds it.
const ZERO_BYTE: u8 = 0b01_01_01_01;

/// A ternary weight matrix `W[n_out, n_in]` with one f32 scale:
/// the real weight is `W[n, k] * scale`.
#[derive(Clone, Debug, PartialEq)]
pub struct TernaryMatrix {
    n_out: usize,
    n_in: usize,
    scale: f32,
    /// [n_out, blocks_per_row], rows padded with zero weights to a whole block.
    blocks: Vec<PackedBlock>,
}

/// One output row from one Hugging Face packed row: the codes in bits
/// `shift..shift + 2` of `source` ([n_in] bytes), laid out as blocks.
fn repack_row(source: &[u8], shift: u32, row: &mut [PackedBlock]) {
    let n_in = source.len();
    let code = |k: usize| {
        if k < n_in {
            (source[k] >> shift) & 3
        } else {
            1
        }
    };
    for (b, block) in row.iter_mut().enumerate() {
        let k0 = b * BLOCK;
        if k0 + BLOCK <= n_in {
            let src = &source[k0..k0 + BLOCK];
            for (j, byte) in block.0.iter_mut().enumerate() {
                *byte = ((src[j] >> shift) & 3)
                    | ((src[j + 64] >> shift) & 3) << 2
                    | ((src[j + 128] >> shift) & 3) << 4
                    | ((src[j + 192] >> shift) & 3) << 6;
            }
        } else {
            for (j, byte) in block.0.iter_mut().enumerate() {
                let k = k0 + j;
                *byte = code(k) | code(k + 64) << 2 | code(k + 128) << 4 | code(k + 192) << 6;
            }
        }
    }
}

/// Number of 256-weight blocks needed for `n_in` weights.
pub fn blocks_for(n_in: usize) -> usize {
    n_in.div_ceil(BLOCK)
}

impl TernaryMatrix {
    /// Packs `weights` ([n_out, n_in] row-major, values in {-1, 0, 1}).
    pub fn pack(weights: &[i8], n_out: usize, n_in: usize, scale: f32) -> Result<Self> {
        check_dims(n_out, n_in)?;
        if n_out.checked_mul(n_in) != Some(weights.len()) {
            return Err(TritError::invalid(format!(
                "weights hold {} values, not n_out * n_in = {n_out} * {n_in}",
                weights.len()
            )));
        }
        if let Some(pos) = weights.iter().position(|w| !(-1..=1).contains(w)) {
            return Err(TritError::invalid(format!(
                "weight [{}, {}] is {}; ternary weights must be -1, 0 or 1",
                pos / n_in,
                pos % n_in,
                weights[pos]
            )));
        }
        Self::from_fn(n_out, n_in, scale, |n, k| weights[n * n_in + k])
    }

    /// Packs the weight matrix whose element `[n, k]` is `weight(n, k)` (in {-1, 0, 1}).
    pub fn from_fn(
        n_out: usize,
        n_in: usize,
        scale: f32,
        mut weight: impl FnMut(usize, usize) -> i8,
    ) -> Result<Self> {
        check_dims(n_out, n_in)?;
        check_scale(scale)?;
        let per_row = blocks_for(n_in);
        let mut blocks = zero_blocks(n_out, n_in)?;
        for n in 0..n_out {
            for k in 0..n_in {
                let w = weight(n, k);
                debug_assert!((-1..=1).contains(&w));
                let (block, byte, shift) = position(k);
                let cell = &mut blocks[n * per_row + block].0[byte];
                *cell = (*cell & !(3 << shift)) | (((w + 1) as u8) << shift);
            }
        }
        Ok(TernaryMatrix {
            n_out,
            n_in,
            scale,
            blocks,
        })
    }

    /// Repacks a Hugging Face packed weight: `packed` is U8 [n_out / 4, n_in]
    /// whose packed row `r` holds output row `i * n_out / 4 + r` in bits
    /// `2i..2i+1` as the code `w + 1` (docs/formats.md "Packing"). The codes are the same
    /// as ours, only placed differently, so bytes are assembled directly.
    /// The caller checks that no code is 3 and that n_out is a multiple of 4.
    pub fn from_hf_packed(packed: &[u8], n_out: usize, n_in: usize, scale: f32) -> Result<Self> {
        check_dims(n_out, n_in)?;
        check_scale(scale)?;
        if !n_out.is_multiple_of(4) || (n_out / 4).checked_mul(n_in) != Some(packed.len()) {
            return Err(TritError::invalid(format!(
                "a packed weight of [{n_out}, {n_in}] must hold [{}, {n_in}] bytes, got {}",
                n_out / 4,
                packed.len()
            )));
        }
        let per_row = blocks_for(n_in);
        let rows = n_out / 4;
        let mut blocks = zero_blocks(n_out, n_in)?;
        // Packed row r feeds output rows r, r + R, r + 2R and r + 3R: fill
        // all four from one read of it (the source is read once, not four times).
        let (quarter0, rest) = blocks.split_at_mut(rows * per_row);
        let (quarter1, rest) = rest.split_at_mut(rows * per_row);
        let (quarter2, quarter3) = rest.split_at_mut(rows * per_row);
        let quarters = [quarter0, quarter1, quarter2, quarter3];
        let mut outs: Vec<_> = quarters
            .into_iter()
            .map(|q| q.chunks_exact_mut(per_row))
            .collect();
        for source in packed.chunks_exact(n_in) {
            for (i, out) in outs.iter_mut().enumerate() {
                let row = out.next().expect("one output row per packed row");
                repack_row(source, 2 * i as u32, row);
            }
        }
        Ok(TernaryMatrix {
            n_out,
            n_in,
            scale,
            blocks,
        })
    }

    pub fn n_out(&self) -> usize {
        self.n_out
    }

    pub fn n_in(&self) -> usize {
        self.n_in
    }

    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// Blocks per row: `n_in` rounded up to a whole block, over 256.
    pub fn blocks_per_row(&self) -> usize {
        blocks_for(self.n_in)
    }

    /// `n_in` rounded up to a whole block.
    pub fn k_padded(&self) -> usize {
        self.blocks_per_row() * BLOCK
    }

    /// The packed blocks of row `n`.
    pub fn row(&self, n: usize) -> &[PackedBlock] {
        let per_row = self.blocks_per_row();
        &self.blocks[n * per_row..(n + 1) * per_row]
    }

    /// Bytes of packed weights (what one matmul streams).
    pub fn packed_bytes(&self) -> usize {
        self.blocks.len() * BLOCK_BYTES
    }

    /// The weight `[n, k]` in {-1, 0, 1}.
    pub fn get(&self, n: usize, k: usize) -> i8 {
        let (block, byte, shift) = position(k);
        ((self.row(n)[block].0[byte] >> shift) & 3) as i8 - 1
    }

    /// The weights as [n_out, n_in] row-major values in {-1, 0, 1}.
    pub fn unpack(&self) -> Vec<i8> {
        let mut out = Vec::with_capacity(self.n_out * self.n_in);
        self.unpack_into(&mut out);
        out
    }

    /// As `unpack`, an error instead of an abort if there is no memory for
    /// the values (4x the packed bytes).
    pub fn try_unpack(&self) -> Result<Vec<i8>> {
        let mut out = Vec::new();
        // The product is below 4 * packed_bytes, which exist: no overflow.
        let len = self.n_out * self.n_in;
        try_reserve_total(&mut out, len, "the unpacked ternary matrix")?;
        self.unpack_into(&mut out);
        Ok(out)
    }

    fn unpack_into(&self, out: &mut Vec<i8>) {
        for n in 0..self.n_out {
            out.extend((0..self.n_in).map(|k| self.get(n, k)));
        }
    }
}

/// Where weight `k` of a row lives: (block, byte within the block, bit shift).
#[inline]
fn position(k: usize) -> (usize, usize, u32) {
    let within = k % BLOCK;
    (
        k / BLOCK,
        within % BLOCK_BYTES,
        2 * (within / BLOCK_BYTES) as u32,
    )
}

fn check_scale(scale: f32) -> Result<()> {
    if !scale.is_finite() {
        return Err(TritError::invalid(format!(
            "scale must be finite, got {scale}"
        )));
    }
    Ok(())
}

/// The blocks of an [n_out, n_in] matrix of zero weights, allocated
/// fallibly: the dimensions may come from input.
fn zero_blocks(n_out: usize, n_in: usize) -> Result<Vec<PackedBlock>> {
    let len = n_out.checked_mul(blocks_for(n_in)).ok_or_else(|| {
        TritError::invalid(format!(
            "a ternary matrix of [{n_out}, {n_in}] is too large to address"
        ))
    })?;
    try_filled(
        len,
        PackedBlock([ZERO_BYTE; BLOCK_BYTES]),
        &format!("a packed ternary matrix of [{n_out}, {n_in}]"),
    )
}

fn check_dims(n_out: usize, n_in: usize) -> Result<()> {
    if n_out == 0 || n_in == 0 {
        return Err(TritError::invalid(format!(
            "a ternary matrix needs n_out >= 1 and n_in >= 1, got [{n_out}, {n_in}]"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn layout_matches_the_documented_bit_positions() {
        // Weight 64*i + j of a block sits in byte j, bits 2i..2i+1.
        let n_in = 300;
        let w: Vec<i8> = (0..n_in)
            .map(|k| {
                if k == 70 {
                    1
                } else if k == 260 {
                    -1
                } else {
                    0
                }
            })
            .collect();
        let m = TernaryMatrix::pack(&w, 1, n_in, 1.0).unwrap();
        let row = m.row(0);
        assert_eq!(row.len(), 2);
        // k = 70 = 64*1 + 6: byte 6, bits 2..3, code 2.
        assert_eq!((row[0].0[6] >> 2) & 3, 2);
        assert_eq!(row[0].0[5], ZERO_BYTE);
        // k = 260 = 256 + 4: block 1, byte 4, bits 0..1, code 0.
        assert_eq!(row[1].0[4] & 3, 0);
        // Padding past n_in is zero weight.
        assert_eq!(row[1].0[63], ZERO_BYTE);
    }

    #[test]
    fn rejects_bad_input() {
        assert!(TernaryMatrix::pack(&[], 0, 3, 1.0).is_err());
        assert!(TernaryMatrix::pack(&[0, 2], 1, 2, 1.0).is_err());
        assert!(TernaryMatrix::pack(&[0, 1, 0], 1, 2, 1.0).is_err());
        assert!(TernaryMatrix::pack(&[0, 1], 1, 2, f32::NAN).is_err());
        // Sizes that overflow or cannot be allocated are errors, not aborts.
        let err = TernaryMatrix::pack(&[0], usize::MAX, 2, 1.0).unwrap_err();
        assert!(err.to_string().contains("not n_out * n_in"), "{err}");
        let err = TernaryMatrix::from_fn(usize::MAX, 300, 1.0, |_, _| 0).unwrap_err();
        assert!(err.to_string().contains("too large to address"), "{err}");
        let err = TernaryMatrix::from_fn(1 << 40, 1 << 20, 1.0, |_, _| 0).unwrap_err();
        assert!(matches!(err, TritError::OutOfMemory(_)), "{err:?}");
        let err = TernaryMatrix::from_hf_packed(&[0; 4], usize::MAX - 3, 2, 1.0).unwrap_err();
        assert!(err.to_string().contains("must hold"), "{err}");
    }

    proptest! {
        #[test]
        fn hf_packed_matches_its_definition(rows in 1usize..5, n_in in 1usize..600, seed in any::<u64>()) {
            let n_out = 4 * rows;
            let mut state = seed | 1;
            let packed: Vec<u8> = (0..rows * n_in).map(|_| {
                state ^= state << 13; state ^= state >> 7; state ^= state << 17;
                let c = |s: u64| (s % 3) as u8;
                c(state) | c(state >> 8) << 2 | c(state >> 16) << 4 | c(state >> 24) << 6
            }).collect();
            let fast = TernaryMatrix::from_hf_packed(&packed, n_out, n_in, 0.5).unwrap();
            let slow = TernaryMatrix::from_fn(n_out, n_in, 0.5, |n, k| {
                ((packed[(n % rows) * n_in + k] >> (2 * (n / rows))) & 3) as i8 - 1
            }).unwrap();
            prop_assert_eq!(fast, slow);
        }

        #[test]
        fn pack_unpack_round_trips(n_out in 1usize..9, n_in in 1usize..700, seed in any::<u64>()) {
            let mut state = seed | 1;
            let w: Vec<i8> = (0..n_out * n_in).map(|_| {
                state ^= state << 13; state ^= state >> 7; state ^= state << 17;
                (state % 3) as i8 - 1
            }).collect();
            let m = TernaryMatrix::pack(&w, n_out, n_in, 0.5).unwrap();
            prop_assert_eq!(m.try_unpack().unwrap(), w);
            prop_assert_eq!(m.packed_bytes(), n_out * n_in.div_ceil(256) * 64);
        }
    }
}
