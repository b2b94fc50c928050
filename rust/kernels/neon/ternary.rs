//! Neon (aarch64 Advanced SIMD) kernels, baseline instructions only (no
//! `sdot`). The same scheme as AVX2: weights stay codes `w + 1` in {0, 1, 2}
//! (see `packing`), are multiplied with the int8 activations, and Σ_k x[k]
//! (`xsum`, the token's sum) is subtracted once per dot to undo the `+ 1`.
//! 16 packed bytes of a block (chunk q, bytes 16q..16q + 16) shifted right by
//! 2i and masked with 3 give the codes of the 16 consecutive inputs
//! 64i + 16q .. +16.
//!
//! Why codes rather than signed weights `code - 1`: the decode is 3 shifts and
//! 3 masks per 64 weights, and the `- 1` would add 4 more instructions (LLVM
//! turns a shift-right-accumulate onto -1 back into shift, mask, add) in the
//! GEMV, whose cost per weight byte is exactly this decode plus the multiplies.
//! Neon's widening multiply is signed × signed, so the codes simply enter it as
//! small non-negative i8 values.
//!
//! Products are widened i8 × i8 → i16 and summed per lane by `smlal`/`smlal2`
//! (`vmlal_s8` on the low 8 bytes of a vector, `vmlal_high_s8` on the high 8),
//! then folded pairwise into i32 by `sadalp` (`vpadalq_s16`) before an i16
//! lane can overflow.
//!
//! Overflow: |code · x| ≤ 2 · 128 = 256 (activation codes run from -128 to
//! 127), so an i16 lane holds 127 products (127 · 256 = 32512 ≤ 32767). Each
//! constant below states how many products it lets a lane collect.

use std::arch::aarch64::*;
use std::ops::Range;

use crate::kernels::counts::{self, Isa};
use crate::kernels::driver::{self, GemmTile, SmallGemmTile, SmallTileOperands, TileOperands};
use crate::kernels::packing::{PackedBlock, TernaryMatrix, Tq1Block, BLOCK, BLOCK_BYTES};
use crate::kernels::{CacheLine, QuantizedActivations};

/// GEMV rows per tile: they share each activation load.
const GEMV_ROWS: usize = 4;
/// GEMV blocks summed in i16 before widening. A row has two i16 accumulators
/// (products of the low and of the high 8 bytes: two independent dependency
/// chains); a block adds 16 products (4 chunks × 4 planes) to every lane of
/// each: 4 · 16 · 256 = 16384.
const GEMV_I16_BLOCKS: usize = 4;

/// GEMM steps of 16 inputs summed in i16: a step adds 2 products to every lane
/// (`smlal` + `smlal2` into one accumulator): 32 · 2 · 256 = 16384.
const GEMM_I16_STEPS: usize = 32;

/// Small tile: blocks summed in i16 before widening. A block adds 32
/// products (4 chunks × 4 planes, `smlal` + `smlal2`) to every lane of a
/// (row, token) accumulator: 3 · 32 · 256 = 24576.
const SMALL_I16_BLOCKS: usize = 3;

/// The four 16-code planes held by 16 packed bytes: plane i has the codes of
/// bits 2i..2i+1.
#[inline]
#[target_feature(enable = "neon")]
fn planes(packed: uint8x16_t) -> [int8x16_t; 4] {
    let mask = vdupq_n_u8(3);
    [
        vreinterpretq_s8_u8(vandq_u8(packed, mask)),
        vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8::<2>(packed), mask)),
        vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8::<4>(packed), mask)),
        // The top field needs no mask: the shift clears everything above it.
        vreinterpretq_s8_u8(vshrq_n_u8::<6>(packed)),
    ]
}

/// # Safety
/// The CPU must support Neon; `xq` must hold at least `w.k_padded()` values.
#[target_feature(enable = "neon")]
pub(crate) unsafe fn gemv(
    w: &TernaryMatrix,
    xq: &[i8],
    xsum: i32,
    rows: Range<usize>,
    dots: &mut [i32],
) {
    counts::enter(Isa::Neon);
    assert!(xq.len() >= w.k_padded() && dots.len() == rows.len() && rows.end <= w.n_out());
    let mut n = rows.start;
    for out in dots.chunks_mut(GEMV_ROWS) {
        // SAFETY: this function runs with Neon; rows n..n + out.len() exist
        // and xq holds their padded length (asserted).
        unsafe {
            match out.len() {
                4 => gemv_tile::<4>(w, xq, xsum, n, out),
                3 => gemv_tile::<3>(w, xq, xsum, n, out),
                2 => gemv_tile::<2>(w, xq, xsum, n, out),
                _ => gemv_tile::<1>(w, xq, xsum, n, out),
            }
        }
        n += out.len();
    }
}

/// The dots of rows n0..n0 + R with one token, sharing its activation loads.
///
/// # Safety
/// The CPU must support Neon; the rows exist and `xq` holds their padded length.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn gemv_tile<const R: usize>(
    w: &TernaryMatrix,
    xq: &[i8],
    xsum: i32,
    n0: usize,
    out: &mut [i32],
) {
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
                let mut xs = [vdupq_n_s8(0); 4];
                for (i, xs) in xs.iter_mut().enumerate() {
                    // SAFETY: b·BLOCK + 256 <= the padded length xq holds.
                    *xs = unsafe { vld1q_s8(x.add(b * BLOCK + 64 * i + 16 * q)) };
                }
                for j in 0..R {
                    // SAFETY: block b < n_blocks of row j: 64 bytes from b·BLOCK_BYTES.
                    let packed = unsafe { vld1q_u8(rows[j].add(b * BLOCK_BYTES + 16 * q)) };
                    let codes = planes(packed);
                    for i in 0..4 {
                        let (c, a) = (codes[i], xs[i]);
                        acc16[j][0] = vmlal_s8(acc16[j][0], vget_low_s8(c), vget_low_s8(a));
                        acc16[j][1] = vmlal_high_s8(acc16[j][1], c, a);
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
        out[j] = vaddvq_s32(acc32[j]) - xsum;
    }
}

/// The GEMM tile: 4 rows × 4 tokens = 16 i16 accumulators + 4 + 4 operands,
/// of 32 registers (the i32 accumulators are touched only when the i16 ones
/// are widened, outside the inner loop).
pub(crate) struct Tile;

impl GemmTile for Tile {
    const ROWS: usize = 4;
    const TOKENS: usize = 4;

    #[inline(always)]
    unsafe fn unpack(blocks: &[PackedBlock], out: *mut u8) {
        // SAFETY: per the trait's contract (Neon; room for the codes).
        unsafe { unpack_codes(blocks, out.cast::<i8>()) }
    }

    #[inline(always)]
    unsafe fn unpack_tq1(blocks: &[Tq1Block], out: *mut u8) {
        // SAFETY: per the trait's contract (Neon; room for the codes).
        unsafe { super::tq1::unpack(blocks, out.cast::<i8>()) }
    }

    #[inline(always)]
    unsafe fn tile(nr: usize, nt: usize, ops: TileOperands, out: &mut [i32], m: usize) {
        macro_rules! run {
            ($nr:literal, $nt:literal) => {
                tile::<$nr, $nt>(ops, out, m)
            };
        }
        // SAFETY: per the trait's contract (Neon; nr, nt and the operands in range).
        unsafe { driver::tile_4x4!(nr, nt, run) }
    }
}

/// `dots[i, t] = Σ_k x[t, k] · W[rows.start + i, k]`, dots is [rows.len(), x.m()];
/// `scratch` holds the unpacked codes (kept by the caller between calls).
///
/// # Safety
/// The CPU must support Neon.
#[target_feature(enable = "neon")]
pub(crate) unsafe fn gemm(
    w: &TernaryMatrix,
    x: &QuantizedActivations,
    rows: Range<usize>,
    dots: &mut [i32],
    scratch: &mut Vec<CacheLine>,
) {
    counts::enter(Isa::Neon);
    // SAFETY: this function runs with Neon, what `Tile` needs.
    unsafe { driver::gemm::<Tile>(w, x, rows, dots, scratch) }
}

/// `gemm` for a few tokens (a batched decode step): the small-batch tile.
///
/// # Safety
/// The CPU must support Neon.
#[target_feature(enable = "neon")]
pub(crate) unsafe fn gemm_small(
    w: &TernaryMatrix,
    x: &QuantizedActivations,
    rows: Range<usize>,
    dots: &mut [i32],
) {
    counts::enter(Isa::Neon);
    // SAFETY: this function runs with Neon, what `SmallTile` needs.
    unsafe { driver::gemm_small::<SmallTile>(w, x, rows, dots) }
}

/// The small-batch tile: 2 rows × 8 tokens = 16 i16 accumulators, 8
/// activation vectors (each load shared by the two rows), 2 chunks of
/// packed codes, a plane and the mask, of 32 registers.
pub(crate) struct SmallTile;

impl SmallGemmTile for SmallTile {
    const ROWS: usize = 2;
    const TOKENS: usize = 8;

    #[inline(always)]
    unsafe fn tile(nr: usize, nt: usize, ops: SmallTileOperands, out: &mut [i32], m: usize) {
        macro_rules! run {
            ($nr:literal, $nt:literal) => {
                small_tile::<$nr, $nt>(ops, out, m)
            };
        }
        // SAFETY: per the trait's contract (Neon; nr, nt and the operands in range).
        unsafe { driver::tile_2x8!(nr, nt, run) }
    }
}

/// `out[j·m + i] += Σ_k code(row j, k) · acts[i·act_stride + k]`: block by
/// block, chunk by chunk, each row's 16 packed bytes loaded once and their
/// four planes decoded in registers, each plane multiplied with the NT
/// tokens' 16 activations it meets.
///
/// # Safety
/// As `SmallGemmTile::tile`, with nr = NR and nt = NT.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn small_tile<const NR: usize, const NT: usize>(
    ops: SmallTileOperands,
    out: &mut [i32],
    m: usize,
) {
    let SmallTileOperands {
        rows,
        row_stride,
        blocks,
        acts,
        act_stride,
        prefetch_ahead,
    } = ops;
    let mut acc32 = [[vdupq_n_s32(0); NT]; NR];
    let mut b = 0;
    while b < blocks {
        let end = (b + SMALL_I16_BLOCKS).min(blocks);
        let mut acc16 = [[vdupq_n_s16(0); NT]; NR];
        while b < end {
            if prefetch_ahead != 0 {
                for j in 0..NR {
                    let ahead = rows.wrapping_add(j * row_stride + b + prefetch_ahead);
                    driver::prefetch(ahead.cast());
                }
            }
            for q in 0..4 {
                let mut codes = [[vdupq_n_s8(0); 4]; NR];
                for (j, codes) in codes.iter_mut().enumerate() {
                    // SAFETY: rows j < NR hold `blocks` blocks of 64 bytes
                    // from rows + j·row_stride, b < blocks; chunk q is 16 of them.
                    let packed =
                        unsafe { vld1q_u8(rows.add(j * row_stride + b).cast::<u8>().add(16 * q)) };
                    *codes = planes(packed);
                }
                for plane in 0..4 {
                    // Activations 64·plane + 16q .. +16 of block b meet plane `plane` of chunk q.
                    let mut a = [vdupq_n_s8(0); NT];
                    for (i, a) in a.iter_mut().enumerate() {
                        // SAFETY: token i < NT holds blocks·BLOCK codes from
                        // acts + i·act_stride, and b·BLOCK + 256 <= that.
                        *a = unsafe {
                            vld1q_s8(acts.add(i * act_stride + b * BLOCK + 64 * plane + 16 * q))
                        };
                    }
                    for j in 0..NR {
                        let c = codes[j][plane];
                        for i in 0..NT {
                            let lo = vmlal_s8(acc16[j][i], vget_low_s8(c), vget_low_s8(a[i]));
                            acc16[j][i] = vmlal_high_s8(lo, c, a[i]);
                        }
                    }
                }
            }
            b += 1;
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

/// Writes the codes of `blocks` in input order to `out`.
///
/// # Safety
/// The CPU must support Neon; `out` takes `blocks.len() * BLOCK` bytes.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn unpack_codes(blocks: &[PackedBlock], out: *mut i8) {
    for (b, block) in blocks.iter().enumerate() {
        for q in 0..4 {
            // SAFETY: a block is 64 bytes; chunk q is 16 of them.
            let packed = unsafe { vld1q_u8(block.0.as_ptr().add(16 * q)) };
            for (i, codes) in planes(packed).into_iter().enumerate() {
                // SAFETY: b·BLOCK + 256 <= the bytes out takes.
                unsafe { vst1q_s8(out.add(b * BLOCK + 64 * i + 16 * q), codes) };
            }
        }
    }
}

/// `out[j·m + i] += Σ_{k < len} codes[j·code_stride + k] · acts[i·act_stride + k]`
/// for NR rows j and NT tokens i; `len` is a multiple of 16.
///
/// # Safety
/// As `GemmTile::tile`, with nr = NR and nt = NT.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn tile<const NR: usize, const NT: usize>(ops: TileOperands, out: &mut [i32], m: usize) {
    let TileOperands {
        codes,
        code_stride,
        acts,
        act_stride,
        len,
        ..
    } = ops;
    let codes = codes.cast::<i8>();
    let mut acc32 = [[vdupq_n_s32(0); NT]; NR];
    let mut k = 0;
    while k < len {
        let end = (k + GEMM_I16_STEPS * 16).min(len);
        let mut acc16 = [[vdupq_n_s16(0); NT]; NR];
        while k < end {
            ops.prefetch_at(k);
            let mut a = [vdupq_n_s8(0); NT];
            for (i, a) in a.iter_mut().enumerate() {
                // SAFETY: token i < NT holds len codes from acts + i·act_stride; k + 16 <= len.
                *a = unsafe { vld1q_s8(acts.add(i * act_stride + k)) };
            }
            for j in 0..NR {
                // SAFETY: row j < NR holds len codes; k + 16 <= len.
                let c = unsafe { vld1q_s8(codes.add(j * code_stride + k)) };
                for i in 0..NT {
                    let lo = vmlal_s8(acc16[j][i], vget_low_s8(c), vget_low_s8(a[i]));
                    acc16[j][i] = vmlal_high_s8(lo, c, a[i]);
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
