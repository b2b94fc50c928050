//! Neon GEMV of 1.625-bit ternary weights (`Tq1Block`), and their decoding
//! into codes for the GEMM tile.
//!
//! A block is decoded in registers into sixteen 16-code vectors (vector v:
//! the weights 16v..16v + 16): the head and mid bytes times 3^i (`vmulq_u8`
//! multiplies bytes modulo 256, one instruction) hold digit i at their top,
//! read by two signed compares (the bytes' top bits are stored flipped, see
//! `Tq1Block`) whose masks (0 or -1) add up to minus the digit. The GEMV
//! keeps that negated code and multiply-subtracts it (`smlsl`), so undoing
//! the sign costs nothing; the tail's 2-bit codes are negated once to match.
//! Σx is subtracted once per dot, as in `ternary`.
//!
//! Overflow: as in `ternary`, |code · x| ≤ 2 · 128 = 256 and an i16 lane
//! holds 127 products.

use std::arch::aarch64::*;
use std::ops::Range;

use crate::kernels::counts::{self, Isa};
use crate::kernels::packing::{Packing, TernaryMatrix, Tq1Block, BLOCK, TQ1_HEAD, TQ1_MID};

/// GEMV rows per tile: they share each activation load.
const GEMV_ROWS: usize = 4;
/// GEMV blocks summed in i16 before widening. A block adds 16 products
/// (`smlsl` for the low 8 bytes of each of its 16 vectors) to every lane of
/// a row's first accumulator, and 16 (`smlsl2`) to its second:
/// 4 · 16 · 256 = 16384.
const GEMV_I16_BLOCKS: usize = 4;

/// Minus the digit at the top of each byte `p` (flipped top bit, read as a
/// signed byte): `-([p > -43] + [p > 42])`, the masks' sum.
///
/// # Safety
/// The CPU must support Neon.
#[inline(always)]
unsafe fn minus_digits(p: uint8x16_t) -> int8x16_t {
    // SAFETY: per the contract.
    unsafe {
        let p = vreinterpretq_s8_u8(p);
        let low = vcgtq_s8(p, vdupq_n_s8(-43));
        let high = vcgtq_s8(p, vdupq_n_s8(42));
        vreinterpretq_s8_u8(vaddq_u8(low, high))
    }
}

/// Minus the codes (`-(w + 1)`) of the block at `block` as sixteen vectors:
/// vector v holds those of the weights 16v..16v + 16.
///
/// # Safety
/// The CPU must support Neon; `block` points to a `Tq1Block`.
#[inline(always)]
unsafe fn minus_codes(block: *const u8) -> [int8x16_t; 16] {
    // SAFETY: per the contract: the loads read bytes 0..32, 32..48 and 48..52.
    unsafe {
        let head = [vld1q_u8(block), vld1q_u8(block.add(16))];
        let mid = vld1q_u8(block.add(TQ1_HEAD));
        let tail = vdupq_n_u32(block.add(TQ1_HEAD + TQ1_MID).cast::<u32>().read_unaligned());
        // Lane i (a u32) keeps the tail's codes of bits 2i..2i + 1.
        let shifts = vld1q_s32([0, -2, -4, -6].as_ptr());
        let tail_codes = vandq_u8(vreinterpretq_u8_u32(vshlq_u32(tail, shifts)), vdupq_n_u8(3));
        let mut out = [vdupq_n_s8(0); 16];
        let mut power = 1u8;
        for i in 0..5 {
            let factor = vdupq_n_u8(power);
            out[2 * i] = minus_digits(vmulq_u8(head[0], factor));
            out[2 * i + 1] = minus_digits(vmulq_u8(head[1], factor));
            out[10 + i] = minus_digits(vmulq_u8(mid, factor));
            power = power.wrapping_mul(3);
        }
        out[15] = vnegq_s8(vreinterpretq_s8_u8(tail_codes));
        out
    }
}

/// Writes the codes of `blocks` in input order to `out`: what the 2-bit
/// GEMM tile reads.
///
/// # Safety
/// The CPU must support Neon; `out` takes `blocks.len() * BLOCK` bytes.
#[inline(always)]
pub(crate) unsafe fn unpack(blocks: &[Tq1Block], out: *mut i8) {
    for (b, block) in blocks.iter().enumerate() {
        // SAFETY: per the contract; b·BLOCK + 16v + 16 <= the bytes out takes.
        unsafe {
            for (v, minus) in minus_codes(block.0.as_ptr()).into_iter().enumerate() {
                vst1q_s8(out.add(b * BLOCK + 16 * v), vnegq_s8(minus));
            }
        }
    }
}

/// `dots[i] = Σ_k xq[k] · W[rows.start + i, k]` of a `Packing::Tq1` matrix.
///
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
    assert!(w.packing() == Packing::Tq1);
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
/// The CPU must support Neon; the rows exist, packed as tq1, and `xq` holds
/// their padded length.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn gemv_tile<const R: usize>(
    w: &TernaryMatrix,
    xq: &[i8],
    xsum: i32,
    n0: usize,
    out: &mut [i32],
) {
    let rows: [&[Tq1Block]; R] = std::array::from_fn(|j| w.tq1_row(n0 + j));
    let x = xq.as_ptr();
    let n_blocks = w.blocks_per_row();
    let mut acc32 = [vdupq_n_s32(0); R];
    let mut b0 = 0;
    while b0 < n_blocks {
        let b1 = (b0 + GEMV_I16_BLOCKS).min(n_blocks);
        // [row][products of the low 8 bytes, of the high 8 bytes]
        let mut acc16 = [[vdupq_n_s16(0); 2]; R];
        for b in b0..b1 {
            let mut xs = [vdupq_n_s8(0); 16];
            for (v, xs) in xs.iter_mut().enumerate() {
                // SAFETY: b·BLOCK + 256 <= the padded length xq holds.
                *xs = unsafe { vld1q_s8(x.add(b * BLOCK + 16 * v)) };
            }
            for j in 0..R {
                // SAFETY: block b of row j is a Tq1Block.
                let minus = unsafe { minus_codes(rows[j][b].0.as_ptr()) };
                for v in 0..16 {
                    let (c, a) = (minus[v], xs[v]);
                    acc16[j][0] = vmlsl_s8(acc16[j][0], vget_low_s8(c), vget_low_s8(a));
                    acc16[j][1] = vmlsl_high_s8(acc16[j][1], c, a);
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
