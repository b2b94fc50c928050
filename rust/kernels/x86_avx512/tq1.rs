//! AVX-512 GEMVs of 1.625-bit ternary weights (`Tq1Block`). A block is
//! decoded by the AVX2 routine (`x86_avx2::tq1::decode_block`) into eight
//! 32-code vectors; pairs of them are the codes of 64 consecutive inputs
//! (32g..32g + 64), which one 64-byte load of activations meets: four
//! `vpdpbusd` a block with VNNI (`vpmaddubsw` + `vpmaddwd` without) where
//! AVX2 takes eight multiplies and their adds. The decoding stays on 32-byte
//! vectors because the block's three parts (32, 16 and 4 bytes) are cut to
//! them; the GEMM unpacks with the same routine (`Tile::unpack_tq1`).
//!
//! As in `ternary`, the bodies are `#[inline(always)]`, compiled inside a
//! VNNI (`*_vnni`) or non-VNNI (`*_bw`) entry point.

use std::arch::x86_64::*;
use std::ops::Range;

use super::ternary::step;
use crate::kernels::counts::{self, Isa};
use crate::kernels::driver::{self, RowDots};
use crate::kernels::packing::{Packing, TernaryMatrix, Tq1Block, BLOCK};
use crate::kernels::x86_avx2::tq1::{decode_block, GEMV_PREFETCH_BYTES};

/// `dots[i] = Σ_k xq[k] · W[rows.start + i, k]` of a `Packing::Tq1` matrix.
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VNNI; `xq` must hold at least `w.k_padded()` values.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(crate) unsafe fn gemv_vnni(
    w: &TernaryMatrix,
    xq: &[i8],
    xsum: i32,
    rows: Range<usize>,
    dots: &mut [i32],
) {
    counts::enter(Isa::Avx512Vnni);
    // SAFETY: this function runs with AVX-512 F, BW and VNNI; the rest is the caller's.
    unsafe { gemv_with::<true>(w, xq, xsum, rows, dots) }
}

/// `gemv_vnni` without VNNI.
///
/// # Safety
/// The CPU must support AVX-512 F and BW; `xq` must hold at least `w.k_padded()` values.
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn gemv_bw(
    w: &TernaryMatrix,
    xq: &[i8],
    xsum: i32,
    rows: Range<usize>,
    dots: &mut [i32],
) {
    counts::enter(Isa::Avx512Bw);
    // SAFETY: this function runs with AVX-512 F and BW; the rest is the caller's.
    unsafe { gemv_with::<false>(w, xq, xsum, rows, dots) }
}

/// # Safety
/// As `gemv_vnni` (`gemv_bw` without VNNI).
#[inline(always)]
unsafe fn gemv_with<const VNNI: bool>(
    w: &TernaryMatrix,
    xq: &[i8],
    xsum: i32,
    rows: Range<usize>,
    dots: &mut [i32],
) {
    assert!(w.packing() == Packing::Tq1);
    assert!(xq.len() >= w.k_padded() && dots.len() == rows.len() && rows.end <= w.n_out());
    let rows = Tq1Rows::<VNNI> {
        w,
        first: rows.start,
        xq,
        xsum,
    };
    // SAFETY: per the contract, and `rows` covers dots.len() rows.
    unsafe { driver::three_streams(&rows, dots) }
}

/// Rows `first..` of a `Packing::Tq1` matrix `w` against one token `xq` (sum `xsum`).
struct Tq1Rows<'a, const VNNI: bool> {
    w: &'a TernaryMatrix,
    first: usize,
    xq: &'a [i8],
    xsum: i32,
}

impl<const VNNI: bool> RowDots for Tq1Rows<'_, VNNI> {
    type Dot = i32;

    #[inline(always)]
    unsafe fn dots<const R: usize>(&self, rows: [usize; R]) -> [i32; R] {
        let blocks: [&[Tq1Block]; R] =
            std::array::from_fn(|j| self.w.tq1_row(self.first + rows[j]));
        // SAFETY: the caller runs this path (AVX-512 F and BW, VNNI if
        // VNNI); `gemv_with` checked that xq holds the rows' padded length.
        unsafe { gemv_rows::<R, VNNI>(&blocks, self.xq, self.xsum) }
    }
}

/// The dots of R rows (of equal length) with one token. Four i32
/// accumulators a row, one per 64 inputs of a block: independent chains
/// (`vpdpbusd` must wait several cycles before adding to its result again).
/// Without VNNI each `vpmaddubsw` pair (at most 2 · 2 · 128 = 512) is
/// widened at once, so nothing can overflow.
///
/// # Safety
/// AVX-512 F and BW, and VNNI if `VNNI`; `xq` holds the rows' padded length.
#[inline(always)]
unsafe fn gemv_rows<const R: usize, const VNNI: bool>(
    rows: &[&[Tq1Block]; R],
    xq: &[i8],
    xsum: i32,
) -> [i32; R] {
    let x = xq.as_ptr();
    let n_blocks = rows[0].len();
    debug_assert!(rows.iter().all(|row| row.len() == n_blocks));
    // SAFETY: the CPU has AVX-512 F and BW (so AVX2), and VNNI if VNNI, per
    // the contract; block b of each row is a Tq1Block; its activations
    // b·BLOCK..+256 lie inside xq; a prefetch never faults.
    unsafe {
        let mut acc = [[_mm512_setzero_si512(); 4]; R];
        for b in 0..n_blocks {
            for (acc, row) in acc.iter_mut().zip(rows) {
                let block = row[b].0.as_ptr();
                _mm_prefetch::<_MM_HINT_T0>(block.wrapping_add(GEMV_PREFETCH_BYTES).cast());
                let codes = decode_block(block);
                for (g, acc) in acc.iter_mut().enumerate() {
                    let pair = _mm512_inserti64x4::<1>(
                        _mm512_castsi256_si512(codes[2 * g]),
                        codes[2 * g + 1],
                    );
                    let acts = _mm512_loadu_si512(x.add(b * BLOCK + 64 * g).cast());
                    *acc = step::<VNNI>(*acc, pair, acts);
                }
            }
        }
        let mut dots = [0i32; R];
        for (dot, acc) in dots.iter_mut().zip(&acc) {
            let sum = _mm512_add_epi32(
                _mm512_add_epi32(acc[0], acc[1]),
                _mm512_add_epi32(acc[2], acc[3]),
            );
            *dot = _mm512_reduce_add_epi32(sum) - xsum;
        }
        dots
    }
}
