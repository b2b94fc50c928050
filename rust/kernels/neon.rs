//! Neon (aarch64 Advanced SIMD) kernels, baseline instructions only (no
//! `sdot`). 16 packed bytes of a block (chunk q, bytes 16q..16q + 16) shifted
//! by 2i and masked give the codes of the 16 consecutive inputs
//! 64i + 16q .. +16 (see `packing`).
//!
//! Unlike the x86 paths, the codes are turned into signed weights `w = code - 1`
//! in {-1, 0, 1} while they are extracted, at the cost of one instruction per
//! 64 weights: `usra` (shift right and accumulate) adds the shifted 2-bit field
//! to 0xFF, which wraps to `code - 1`. Neon's widening multiply is signed ×
//! signed anyway, so nothing is lost, no Σx correction is needed (`xsum` is
//! unused, as in `scalar`) and the products are half as large as code products.
//!
//! Products are widened i8 × i8 → i16 and summed per lane by `smlal`/`smlal2`
//! (`vmlal_s8` on the low 8 bytes, `vmlal_high_s8` on the high 8), then folded
//! pairwise into i32 by `sadalp` (`vpadalq_s16`) before an i16 lane can overflow.
//!
//! Overflow: |w · x| ≤ 1 · 128 (codes run from -128 to 127; -1 · -128 = +128),
//! so an i16 lane holds 255 products (255 · 128 = 32640 ≤ 32767). Each
//! constant below states how many products it lets a lane collect.

use std::arch::aarch64::*;
use std::ops::Range;

use super::packing::{PackedBlock, TernaryMatrix, BLOCK, BLOCK_BYTES};
use super::{aligned_scratch, gemm_k_block, QuantizedActivations};

/// GEMV rows per tile: they share each activation load.
const GEMV_ROWS: usize = 4;
/// GEMV blocks summed in i16 before widening. A row has two i16 accumulators
/// (low and high 8 bytes of each product vector, two independent dependency
/// chains); each block adds 16 products to every lane of each (4 chunks × 4
/// planes): 8 · 16 · 128 = 16384.
const GEMV_I16_BLOCKS: usize = 8;

/// GEMM tile: 4 rows × 4 tokens = 16 i16 accumulators + 4 + 4 operands, of 32
/// registers (the i32 accumulators are only touched when the i16 ones are
/// widened, outside the inner loop).
const TILE_ROWS: usize = 4;
const TILE_TOKENS: usize = 4;
/// GEMM steps of 16 inputs summed in i16: each step adds 2 products to every
/// lane (`smlal` + `smlal2`): 64 · 2 · 128 = 16384.
const GEMM_I16_STEPS: usize = 64;

/// The signed weights held by 16 packed bytes: plane i has `((byte >> 2i) & 3) - 1`.
#[inline]
#[target_feature(enable = "neon")]
fn weights(packed: uint8x16_t) -> [int8x16_t; 4] {
    // 0xFF + code wraps to code - 1.
    let minus_one = vdupq_n_u8(0xFF);
    let w0 = vaddq_u8(vandq_u8(packed, vdupq_n_u8(0x03)), minus_one);
    let w1 = vsraq_n_u8::<2>(minus_one, vandq_u8(packed, vdupq_n_u8(0x0C)));
    let w2 = vsraq_n_u8::<4>(minus_one, vandq_u8(packed, vdupq_n_u8(0x30)));
    // The top field needs no mask: the shift clears everything above it.
    let w3 = vsraq_n_u8::<6>(minus_one, packed);
    [w0, w1, w2, w3].map(|v| vreinterpretq_s8_u8(v))
}

/// `acc + Σ` of the 16 products `w[l] · x[l]`, two per i16 lane.
#[inline]
#[target_feature(enable = "neon")]
fn mlal2(acc: int16x8_t, w: int8x16_t, x: int8x16_t) -> int16x8_t {
    vmlal_high_s8(vmlal_s8(acc, vget_low_s8(w), vget_low_s8(x)), w, x)
}

/// # Safety
/// The CPU must support Neon; `xq` must hold at least `w.k_padded()` values.
#[target_feature(enable = "neon")]
pub unsafe fn gemv(w: &TernaryMatrix, xq: &[i8], _xsum: i32, rows: Range<usize>, dots: &mut [i32]) {
    assert!(xq.len() >= w.k_padded() && dots.len() == rows.len() && rows.end <= w.n_out());
    let mut n = rows.start;
    for out in dots.chunks_mut(GEMV_ROWS) {
        match out.len() {
            4 => gemv_tile::<4>(w, xq, n, out),
            3 => gemv_tile::<3>(w, xq, n, out),
            2 => gemv_tile::<2>(w, xq, n, out),
            _ => gemv_tile::<1>(w, xq, n, out),
        }
        n += out.len();
    }
}

#[inline]
#[target_feature(enable = "neon")]
unsafe fn gemv_tile<const R: usize>(w: &TernaryMatrix, xq: &[i8], n0: usize, out: &mut [i32]) {
    let rows: [*const u8; R] = std::array::from_fn(|j| w.row(n0 + j).as_ptr().cast::<u8>());
    let x = xq.as_ptr();
    let n_blocks = w.blocks_per_row();
    let mut acc32 = [vdupq_n_s32(0); R];
    let mut b0 = 0;
    while b0 < n_blocks {
        let b1 = (b0 + GEMV_I16_BLOCKS).min(n_blocks);
        // [row][products of the low 8 bytes, of the high 8 bytes]
        let mut acc16 = [[vdupq_n_s16(0); 2]; R];
        for b in b0..b1 {
            for q in 0..4 {
                // Activations 64i + 16q .. +16 of block b meet plane i of chunk q.
                let xs: [int8x16_t; 4] =
                    std::array::from_fn(|i| vld1q_s8(x.add(b * BLOCK + 64 * i + 16 * q)));
                for j in 0..R {
                    let ws = weights(vld1q_u8(rows[j].add(b * BLOCK_BYTES + 16 * q)));
                    for i in 0..4 {
                        acc16[j][0] = vmlal_s8(acc16[j][0], vget_low_s8(ws[i]), vget_low_s8(xs[i]));
                        acc16[j][1] = vmlal_high_s8(acc16[j][1], ws[i], xs[i]);
                    }
                }
            }
        }
        for j in 0..R {
            acc32[j] = vpadalq_s16(vpadalq_s16(acc32[j], acc16[j][0]), acc16[j][1]);
        }
        b0 = b1;
    }
    for j in 0..R {
        out[j] = vaddvq_s32(acc32[j]);
    }
}

/// # Safety
/// The CPU must support Neon. `dots` is [rows.len(), x.m()].
#[target_feature(enable = "neon")]
pub unsafe fn gemm(
    w: &TernaryMatrix,
    x: &QuantizedActivations,
    rows: Range<usize>,
    dots: &mut [i32],
) {
    let (m, kp) = (x.m(), w.k_padded());
    assert!(x.k_padded() == kp && dots.len() == rows.len() * m && rows.end <= w.n_out());
    dots.fill(0);
    let kb = gemm_k_block(m, kp);
    let mut scratch = aligned_scratch(TILE_ROWS * kb);
    let ws = scratch.as_mut_ptr().cast::<i8>(); // [TILE_ROWS, kb] signed weights
    let acts = x.codes().as_ptr(); // [m, kp]
    for k0 in (0..kp).step_by(kb) {
        let len = kb.min(kp - k0);
        let blocks = k0 / BLOCK..(k0 + len) / BLOCK;
        for r0 in rows.clone().step_by(TILE_ROWS) {
            let nr = TILE_ROWS.min(rows.end - r0);
            for j in 0..nr {
                unpack_weights(&w.row(r0 + j)[blocks.clone()], ws.add(j * kb));
            }
            let out_row = (r0 - rows.start) * m;
            for t0 in (0..m).step_by(TILE_TOKENS) {
                let nt = TILE_TOKENS.min(m - t0);
                let a = acts.add(t0 * kp + k0);
                let out = &mut dots[out_row + t0..];
                macro_rules! run {
                    ($nr:literal, $nt:literal) => {
                        tile::<$nr, $nt>(ws, kb, a, kp, len, out, m)
                    };
                }
                match (nr, nt) {
                    (4, 4) => run!(4, 4),
                    (4, 3) => run!(4, 3),
                    (4, 2) => run!(4, 2),
                    (4, _) => run!(4, 1),
                    (3, 4) => run!(3, 4),
                    (3, 3) => run!(3, 3),
                    (3, 2) => run!(3, 2),
                    (3, _) => run!(3, 1),
                    (2, 4) => run!(2, 4),
                    (2, 3) => run!(2, 3),
                    (2, 2) => run!(2, 2),
                    (2, _) => run!(2, 1),
                    (_, 4) => run!(1, 4),
                    (_, 3) => run!(1, 3),
                    (_, 2) => run!(1, 2),
                    _ => run!(1, 1),
                }
            }
        }
    }
}

/// Writes the signed weights of `blocks` in input order to `out`.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn unpack_weights(blocks: &[PackedBlock], out: *mut i8) {
    for (b, block) in blocks.iter().enumerate() {
        for q in 0..4 {
            let planes = weights(vld1q_u8(block.0.as_ptr().add(16 * q)));
            for (i, plane) in planes.into_iter().enumerate() {
                vst1q_s8(out.add(b * BLOCK + 64 * i + 16 * q), plane);
            }
        }
    }
}

/// `out[j·m + i] += Σ_{k < len} ws[j·w_stride + k] · acts[i·act_stride + k]`
/// for NR rows j and NT tokens i; `len` is a multiple of 16.
#[inline]
#[target_feature(enable = "neon")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<const NR: usize, const NT: usize>(
    ws: *const i8,
    w_stride: usize,
    acts: *const i8,
    act_stride: usize,
    len: usize,
    out: &mut [i32],
    m: usize,
) {
    let mut acc32 = [[vdupq_n_s32(0); NT]; NR];
    let mut k = 0;
    while k < len {
        let end = (k + GEMM_I16_STEPS * 16).min(len);
        let mut acc16 = [[vdupq_n_s16(0); NT]; NR];
        while k < end {
            let a: [int8x16_t; NT] =
                std::array::from_fn(|i| vld1q_s8(acts.add(i * act_stride + k)));
            for j in 0..NR {
                let c = vld1q_s8(ws.add(j * w_stride + k));
                for i in 0..NT {
                    acc16[j][i] = mlal2(acc16[j][i], c, a[i]);
                }
            }
            k += 16;
        }
        for j in 0..NR {
            for i in 0..NT {
                acc32[j][i] = vpadalq_s16(acc32[j][i], acc16[j][i]);
            }
        }
    }
    for j in 0..NR {
        for i in 0..NT {
            out[j * m + i] += vaddvq_s32(acc32[j][i]);
        }
    }
}
