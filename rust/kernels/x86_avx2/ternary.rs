//! AVX2 ternary matmuls. Weights arrive as codes `w + 1` in {0, 1, 2} (see
//! `packing`), multiplied with int8 activations by `vpmaddubsw` (unsigned ×
//! signed, pairs summed into i16), widened to i32 by `vpmaddwd` with ones.
//! The `+ 1` adds Σ_k x[k] to every dot; it is subtracted once at the end.
//!
//! Overflow: a `vpmaddubsw` lane is c0·x0 + c1·x1 with c ≤ 2 and |x| ≤ 128, so
//! |lane| ≤ 512 and 63 of them still fit an i16 (63 · 512 = 32256 < 32767).

use std::arch::x86_64::*;
use std::ops::Range;

use crate::kernels::counts::{self, Isa};
use crate::kernels::driver::{
    self, GemmTile, RowDots, SmallGemmTile, SmallTileOperands, TileOperands,
};
use crate::kernels::packing::{PackedBlock, TernaryMatrix, Tq1Block, BLOCK};
use crate::kernels::{CacheLine, QuantizedActivations};

/// GEMV: blocks summed in i16 before widening. Each block adds 4 `vpmaddubsw`
/// lanes (4 planes) to each of a row's two accumulators: 4 · 4 · 512 = 8192.
const GEMV_I16_BLOCKS: usize = 4;
/// GEMV: blocks (of 64 bytes) to prefetch ahead of the one being read.
pub(crate) const GEMV_PREFETCH: usize = 32;

/// The four 32-code planes held by 32 packed bytes: plane i has the codes of
/// bits 2i..2i+1.
#[inline]
#[target_feature(enable = "avx2")]
fn planes(packed: __m256i) -> [__m256i; 4] {
    let mask = _mm256_set1_epi8(3);
    [
        _mm256_and_si256(packed, mask),
        _mm256_and_si256(_mm256_srli_epi16::<2>(packed), mask),
        _mm256_and_si256(_mm256_srli_epi16::<4>(packed), mask),
        _mm256_and_si256(_mm256_srli_epi16::<6>(packed), mask),
    ]
}

#[inline]
#[target_feature(enable = "avx2")]
pub(crate) fn hsum_epi32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    _mm_cvtsi128_si32(s)
}

/// `dots[i] = Σ_k xq[k] · W[rows.start + i, k]`, the rows read as three
/// far-apart streams (`driver::three_streams`).
///
/// # Safety
/// The CPU must support AVX2; `xq` must hold at least `w.k_padded()` values.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn gemv(
    w: &TernaryMatrix,
    xq: &[i8],
    xsum: i32,
    rows: Range<usize>,
    dots: &mut [i32],
) {
    counts::enter(Isa::Avx2);
    assert!(xq.len() >= w.k_padded() && dots.len() == rows.len() && rows.end <= w.n_out());
    let rows = TernaryRows {
        w,
        first: rows.start,
        xq,
        xsum,
    };
    // SAFETY: this function runs with AVX2, and `rows` covers dots.len() rows.
    unsafe { driver::three_streams(&rows, dots) }
}

/// Rows `first..` of `w` against one token `xq` (sum `xsum`).
struct TernaryRows<'a> {
    w: &'a TernaryMatrix,
    first: usize,
    xq: &'a [i8],
    xsum: i32,
}

impl RowDots for TernaryRows<'_> {
    type Dot = i32;

    #[inline(always)]
    unsafe fn dots<const R: usize>(&self, rows: [usize; R]) -> [i32; R] {
        let mut blocks: [&[PackedBlock]; R] = [&[]; R];
        for (b, &r) in blocks.iter_mut().zip(&rows) {
            *b = self.w.row(self.first + r);
        }
        let mut dots = [0i32; R];
        // SAFETY: the caller runs the AVX2 path; `gemv` checked that xq
        // holds the rows' padded length.
        unsafe { gemv_rows(&blocks, self.xq, self.xsum, &mut dots) };
        dots
    }
}

/// The dots of R rows (of equal length) with one token, sharing its
/// activation loads; each row is prefetched `GEMV_PREFETCH` blocks ahead
/// (a stream runs nearer the read bandwidth: docs/performance.md, "GEMV prefetch").
///
/// # Safety
/// The CPU must support AVX2; `xq` holds the rows' padded length.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn gemv_rows<const R: usize>(
    rows: &[&[PackedBlock]; R],
    xq: &[i8],
    xsum: i32,
    dots: &mut [i32; R],
) {
    let ones = _mm256_set1_epi16(1);
    let mask = _mm256_set1_epi8(3);
    let x = xq.as_ptr();
    let n_blocks = rows[0].len();
    debug_assert!(rows.iter().all(|row| row.len() == n_blocks));
    let mut acc32 = [_mm256_setzero_si256(); R];
    for b0 in (0..n_blocks).step_by(GEMV_I16_BLOCKS) {
        // One accumulator per row and half: independent add chains.
        let mut acc16 = [[_mm256_setzero_si256(); 2]; R];
        for b in b0..(b0 + GEMV_I16_BLOCKS).min(n_blocks) {
            for row in rows {
                let ahead = row.as_ptr().wrapping_add(b + GEMV_PREFETCH);
                _mm_prefetch::<_MM_HINT_T0>(ahead.cast());
            }
            for half in 0..2 {
                let mut packed = [_mm256_setzero_si256(); R];
                for (p, row) in packed.iter_mut().zip(rows) {
                    // SAFETY: b < n_blocks; a PackedBlock is 64 bytes,
                    // 64-byte aligned, so each half is 32 aligned bytes.
                    *p = unsafe { _mm256_load_si256(row[b].0.as_ptr().add(32 * half).cast()) };
                }
                for plane in 0..4 {
                    // Activations 64·plane + 32·half .. +32 of block b meet
                    // the codes in bits 2·plane..2·plane+1 of this half.
                    // SAFETY: b·BLOCK + 256 <= the padded length xq holds.
                    let xs = unsafe {
                        _mm256_loadu_si256(x.add(b * BLOCK + 64 * plane + 32 * half).cast())
                    };
                    for (acc, &p) in acc16.iter_mut().zip(&packed) {
                        let shifted = match plane {
                            0 => p,
                            1 => _mm256_srli_epi16::<2>(p),
                            2 => _mm256_srli_epi16::<4>(p),
                            _ => _mm256_srli_epi16::<6>(p),
                        };
                        let codes = _mm256_and_si256(shifted, mask);
                        acc[half] = _mm256_add_epi16(acc[half], _mm256_maddubs_epi16(codes, xs));
                    }
                }
            }
        }
        for (acc32, acc16) in acc32.iter_mut().zip(&acc16) {
            *acc32 = _mm256_add_epi32(*acc32, _mm256_madd_epi16(acc16[0], ones));
            *acc32 = _mm256_add_epi32(*acc32, _mm256_madd_epi16(acc16[1], ones));
        }
    }
    for (dot, &acc) in dots.iter_mut().zip(&acc32) {
        *dot = hsum_epi32(acc) - xsum;
    }
}

/// The GEMM tile: 4 rows × 2 tokens = 8 accumulators, plus 2 activation
/// vectors and a code vector, of 16 registers; the fastest of the shapes
/// tried (docs/performance.md, "GEMM tiles").
pub(crate) struct Tile;

/// GEMM steps of 32 inputs summed in i16: 32 · 512 = 16384.
const GEMM_I16_STEPS: usize = 32;

impl GemmTile for Tile {
    const ROWS: usize = 4;
    const TOKENS: usize = 2;

    #[inline(always)]
    unsafe fn unpack(blocks: &[PackedBlock], out: *mut u8) {
        // SAFETY: per the trait's contract (AVX2, room for the codes).
        unsafe { unpack_codes(blocks, out) }
    }

    #[inline(always)]
    unsafe fn unpack_tq1(blocks: &[Tq1Block], out: *mut u8) {
        // SAFETY: per the trait's contract (AVX2, room for the codes).
        unsafe { super::tq1::unpack(blocks, out) }
    }

    #[inline(always)]
    unsafe fn tile(nr: usize, nt: usize, ops: TileOperands, out: &mut [i32], m: usize) {
        // SAFETY: per the trait's contract (AVX2, nr and nt in range, operands valid).
        unsafe {
            match (nr, nt) {
                (4, 2) => tile::<4, 2>(ops, out, m),
                (4, _) => tile::<4, 1>(ops, out, m),
                (3, 2) => tile::<3, 2>(ops, out, m),
                (3, _) => tile::<3, 1>(ops, out, m),
                (2, 2) => tile::<2, 2>(ops, out, m),
                (2, _) => tile::<2, 1>(ops, out, m),
                (_, 2) => tile::<1, 2>(ops, out, m),
                _ => tile::<1, 1>(ops, out, m),
            }
        }
    }
}

/// `dots[i, t] = Σ_k x[t, k] · W[rows.start + i, k]`, dots is [rows.len(), x.m()];
/// `scratch` holds the unpacked codes (kept by the caller between calls).
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn gemm(
    w: &TernaryMatrix,
    x: &QuantizedActivations,
    rows: Range<usize>,
    dots: &mut [i32],
    scratch: &mut Vec<CacheLine>,
) {
    counts::enter(Isa::Avx2);
    // SAFETY: this function runs with AVX2, what `Tile` needs.
    unsafe { driver::gemm::<Tile>(w, x, rows, dots, scratch) }
}

/// `gemm` for a few tokens (a batched decode step): the small-batch tile.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn gemm_small(
    w: &TernaryMatrix,
    x: &QuantizedActivations,
    rows: Range<usize>,
    dots: &mut [i32],
) {
    counts::enter(Isa::Avx2);
    // SAFETY: this function runs with AVX2, what `SmallTile` needs.
    unsafe { driver::gemm_small::<SmallTile>(w, x, rows, dots) }
}

/// The small-batch tile: one row × 8 tokens = 8 accumulators, the row's
/// packed half-block, a plane of codes and the mask, of 16 registers; the
/// activations are `vpmaddubsw`'s memory operands (each is used once per
/// tile), so the registers go to tokens rather than rows. A row's codes are
/// decoded once for 8 tokens (a second row would share the activation
/// loads instead, which a memory operand makes free): docs/performance.md,
/// "Small batches".
pub(crate) struct SmallTile;

impl SmallGemmTile for SmallTile {
    const ROWS: usize = 1;
    const TOKENS: usize = 8;

    #[inline(always)]
    unsafe fn tile(_nr: usize, nt: usize, ops: SmallTileOperands, out: &mut [i32], _m: usize) {
        macro_rules! run {
            ($nr:literal, $nt:literal) => {
                small_tile::<$nt>(ops, out)
            };
        }
        // SAFETY: per the trait's contract (AVX2; nr = 1, nt and the
        // operands in range).
        unsafe { driver::tile_1x8!(nt, run) }
    }
}

/// Small tile: blocks summed in i16 before widening. Each block adds 8
/// `vpmaddubsw` lanes (2 halves × 4 planes) to a token's accumulator:
/// 7 · 8 · 512 = 28672.
const SMALL_I16_BLOCKS: usize = 7;
/// `out[i] += Σ_k code(row, k) · acts[i·act_stride + k]` for the NT tokens i:
/// block by block, each half of the row's block loaded once and its four
/// planes decoded in registers (shift and mask), each plane multiplied with
/// the NT tokens' 32 activations it meets.
///
/// # Safety
/// As `SmallGemmTile::tile`, with nr = 1 and nt = NT.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn small_tile<const NT: usize>(ops: SmallTileOperands, out: &mut [i32]) {
    let SmallTileOperands {
        rows: row,
        blocks,
        acts,
        act_stride,
        prefetch_ahead,
        ..
    } = ops;
    let ones = _mm256_set1_epi16(1);
    let mask = _mm256_set1_epi8(3);
    let mut acc32 = [_mm256_setzero_si256(); NT];
    let mut b = 0;
    while b < blocks {
        let end = (b + SMALL_I16_BLOCKS).min(blocks);
        let mut acc16 = [_mm256_setzero_si256(); NT];
        while b < end {
            // SAFETY: b < blocks: a block of the row.
            let block = unsafe { row.add(b) };
            if prefetch_ahead != 0 {
                let ahead = block.wrapping_add(prefetch_ahead);
                _mm_prefetch::<_MM_HINT_T0>(ahead.cast());
            }
            for half in 0..2 {
                // SAFETY: a block is 64 aligned bytes; each half is 32.
                let packed = unsafe { _mm256_load_si256(block.cast::<u8>().add(32 * half).cast()) };
                for plane in 0..4 {
                    let shifted = match plane {
                        0 => packed,
                        1 => _mm256_srli_epi16::<2>(packed),
                        2 => _mm256_srli_epi16::<4>(packed),
                        _ => _mm256_srli_epi16::<6>(packed),
                    };
                    let codes = _mm256_and_si256(shifted, mask);
                    for (i, acc) in acc16.iter_mut().enumerate() {
                        // Activations 64·plane + 32·half .. +32 of block b
                        // meet the codes in bits 2·plane..2·plane+1 of this half.
                        // SAFETY: token i < NT holds blocks·BLOCK codes from
                        // acts + i·act_stride, and b·BLOCK + 256 <= that.
                        let a = unsafe {
                            _mm256_loadu_si256(
                                acts.add(i * act_stride + b * BLOCK + 64 * plane + 32 * half)
                                    .cast(),
                            )
                        };
                        *acc = _mm256_add_epi16(*acc, _mm256_maddubs_epi16(codes, a));
                    }
                }
            }
            b += 1;
        }
        for (acc32, &acc16) in acc32.iter_mut().zip(&acc16) {
            *acc32 = _mm256_add_epi32(*acc32, _mm256_madd_epi16(acc16, ones));
        }
    }
    if NT == 8 {
        let mut sums = [0i32; 8];
        // SAFETY: sums holds 8 i32, 32 bytes.
        unsafe { _mm256_storeu_si256(sums.as_mut_ptr().cast(), sum_eight(&acc32)) };
        for (out, sum) in out.iter_mut().zip(sums) {
            *out += sum;
        }
    } else {
        for (out, &acc) in out.iter_mut().zip(&acc32) {
            *out += hsum_epi32(acc);
        }
    }
}

/// Lane i of the result = the sum of the 8 lanes of `v[i]`: a transposing
/// tree of 21 instructions where 8 separate horizontal sums take about 50
/// (a small tile pays it once per row, a cost a few tokens do not
/// amortize). Exact: integer adds, in any order.
#[inline]
#[target_feature(enable = "avx2")]
fn sum_eight(v: &[__m256i]) -> __m256i {
    // Macros, not closures: a closure may be compiled as a function of its
    // own without the caller's target features, a call per use.
    // Pairs of vectors: per 128-bit lane, [a0+a2, b0+b2, a1+a3, b1+b3].
    macro_rules! pair {
        ($a:expr, $b:expr) => {
            _mm256_add_epi32(_mm256_unpacklo_epi32($a, $b), _mm256_unpackhi_epi32($a, $b))
        };
    }
    // Pairs of pairs: per 128-bit lane L, the lane-L partial sums of four vectors.
    macro_rules! quad {
        ($a:expr, $b:expr) => {
            _mm256_add_epi32(_mm256_unpacklo_epi64($a, $b), _mm256_unpackhi_epi64($a, $b))
        };
    }
    let q0 = quad!(pair!(v[0], v[1]), pair!(v[2], v[3]));
    let q1 = quad!(pair!(v[4], v[5]), pair!(v[6], v[7]));
    // Across the two 128-bit lanes: [q0.L0 + q0.L1, q1.L0 + q1.L1].
    _mm256_add_epi32(
        _mm256_permute2x128_si256::<0x20>(q0, q1),
        _mm256_permute2x128_si256::<0x31>(q0, q1),
    )
}

/// Writes the codes of `blocks` in input order to `out` (32-byte aligned).
///
/// # Safety
/// The CPU must support AVX2; `out` takes `blocks.len() * BLOCK` bytes.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn unpack_codes(blocks: &[PackedBlock], out: *mut u8) {
    for (b, block) in blocks.iter().enumerate() {
        for half in 0..2 {
            // SAFETY: a block is 64 aligned bytes; each half is 32.
            let packed = unsafe { _mm256_load_si256(block.0.as_ptr().add(32 * half).cast()) };
            for (i, codes) in planes(packed).into_iter().enumerate() {
                // SAFETY: b·BLOCK + 256 <= the bytes out takes; 32-aligned.
                unsafe {
                    _mm256_store_si256(out.add(b * BLOCK + 64 * i + 32 * half).cast(), codes)
                };
            }
        }
    }
}

/// `out[j·m + i] += Σ_{k < len} codes[j·code_stride + k] · acts[i·act_stride + k]`
/// for NR rows j and NT tokens i.
///
/// # Safety
/// As `GemmTile::tile`, with nr = NR and nt = NT.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn tile<const NR: usize, const NT: usize>(ops: TileOperands, out: &mut [i32], m: usize) {
    let TileOperands {
        codes,
        code_stride,
        acts,
        act_stride,
        len,
        ..
    } = ops;
    let ones = _mm256_set1_epi16(1);
    let mut acc32 = [[_mm256_setzero_si256(); NT]; NR];
    let mut k = 0;
    while k < len {
        let end = (k + GEMM_I16_STEPS * 32).min(len);
        let mut acc16 = [[_mm256_setzero_si256(); NT]; NR];
        while k < end {
            ops.prefetch_at(k);
            let mut a = [_mm256_setzero_si256(); NT];
            for (i, a) in a.iter_mut().enumerate() {
                // SAFETY: token i < NT holds len codes from acts + i·act_stride; k + 32 <= len.
                *a = unsafe { _mm256_loadu_si256(acts.add(i * act_stride + k).cast()) };
            }
            for j in 0..NR {
                // SAFETY: row j < NR holds len codes, 64-byte aligned rows; k + 32 <= len.
                let c = unsafe { _mm256_load_si256(codes.add(j * code_stride + k).cast()) };
                for i in 0..NT {
                    acc16[j][i] = _mm256_add_epi16(acc16[j][i], _mm256_maddubs_epi16(c, a[i]));
                }
            }
            k += 32;
        }
        for j in 0..NR {
            for i in 0..NT {
                acc32[j][i] = _mm256_add_epi32(acc32[j][i], _mm256_madd_epi16(acc16[j][i], ones));
            }
        }
    }
    for j in 0..NR {
        for i in 0..NT {
            out[j * m + i] += hsum_epi32(acc32[j][i]);
        }
    }
}
