//! q8_0 quantization and the integer dot of two blocks: the definitions the
//! SIMD paths reproduce bit for bit.

use crate::kernels::half::F16;
use crate::kernels::q8_0::{BlockQ8_0, KeyTileBlock, Q8_0_VALUES};

/// The largest |x| of a block, NaNs left out (as `vmaxps(|x|, m)` leaves
/// them out: it keeps its second operand when the first is NaN).
#[inline(always)]
pub fn block_amax(x: &[f32]) -> f32 {
    x.iter().fold(0.0f32, |m, v| v.abs().max(m))
}

/// The multiplier that turns a block's values into codes: 1 / d for
/// d = amax / 127, or 0 where d is 0 in half precision (the stored scale
/// then makes every value 0 anyway). Below the smallest half, 1 / d could be
/// infinite: never here, so every x · (1 / d) is at most 127 (1 + 2^-22).
#[inline(always)]
pub fn block_scale(amax: f32) -> (F16, f32) {
    let d = amax / 127.0;
    let stored = F16::from_f32(d);
    let inverse = if stored.to_f32() != 0.0 { 1.0 / d } else { 0.0 };
    (stored, inverse)
}

/// One block: d = max|x| / 127, codes round(x · (1 / d)) half away from zero
/// (a NaN value becomes code 0).
#[inline(always)]
pub fn quantize_block(x: &[f32]) -> BlockQ8_0 {
    assert_eq!(x.len(), Q8_0_VALUES);
    let (d, inverse) = block_scale(block_amax(x));
    let mut qs = [0i8; Q8_0_VALUES];
    for (q, &v) in qs.iter_mut().zip(x) {
        // |v · inverse| <= 127 (1 + 2^-22) rounds into [-127, 127]; `as`
        // takes NaN to 0.
        *q = (v * inverse).round() as i8;
    }
    BlockQ8_0 { d, qs }
}

/// `dst[b] = quantize_block(src[32 b..32 b + 32])`.
pub fn quantize(dst: &mut [BlockQ8_0], src: &[f32]) {
    for (block, x) in dst.iter_mut().zip(src.chunks_exact(Q8_0_VALUES)) {
        *block = quantize_block(x);
    }
}

/// Σ_i a.qs[i] · b.qs[i], exact: |Σ| <= 32 · 128² = 2^19, so it fits i32
/// and converts to f32 exactly.
#[inline(always)]
pub fn block_dot(a: &BlockQ8_0, b: &BlockQ8_0) -> i32 {
    a.qs.iter()
        .zip(&b.qs)
        .map(|(&x, &y)| i32::from(x) * i32::from(y))
        .sum()
}

/// `block_dot` of `q` with key u of a tile block: Σ_i q.qs[i] · k_u[i], exact.
#[inline(always)]
pub fn tile_dot(q: &BlockQ8_0, tile: &KeyTileBlock, u: usize) -> i32 {
    q.qs.iter()
        .enumerate()
        .map(|(i, &x)| i32::from(x) * i32::from(tile.code(u, i)))
        .sum()
}
