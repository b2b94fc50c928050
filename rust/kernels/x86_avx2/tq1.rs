//! AVX2 matmuls of 1.625-bit ternary weights (`Tq1Block`, `Packing::Tq1`).
//!
//! A block is decoded in registers into the same eight 32-code vectors
//! (`w + 1`, in input order) that a 2-bit block's planes give, and those are
//! multiplied exactly as the 2-bit kernels do (`vpmaddubsw`, Σx subtracted
//! once per row). The decoding (see `Tq1Block` for the encoding):
//! - the head bytes times 3^i (two byte adds per factor of 3) hold digit i of
//!   every byte at its top: the codes of weights 32i..32i + 32;
//! - the mid bytes, broadcast to both halves and tripled in the upper one,
//!   give digits 0 and 1 side by side (weights 160..192); times 9, digits 2
//!   and 3 (192..224); times 9 again, digit 4 (224..240) in the lower half,
//!   where the tail's 2-bit codes (240..256) replace the upper one;
//! - a digit is `[p > -43] + [p > 42]` of the signed byte p (two compares
//!   giving 0 or -1, an add and an absolute value).
//!
//! The GEMM (several tokens) decodes rows into the unpacked codes the 2-bit
//! GEMM tile reads (`unpack`), and the AVX-512 paths use the same decoding.

use std::arch::x86_64::*;
use std::marker::PhantomData;
use std::ops::Range;

use crate::kernels::counts::{self, Isa};
use crate::kernels::driver::{self, RowDots};
use crate::kernels::packing::{Packing, TernaryMatrix, Tq1Block, BLOCK, TQ1_HEAD};
use crate::kernels::x86_avx2::ternary::{hsum_epi32, GEMV_PREFETCH};

/// Bytes ahead of the block being decoded that the GEMV prefetches: the
/// distance of the 2-bit GEMV (`GEMV_PREFETCH` blocks of 64 bytes).
pub(crate) const GEMV_PREFETCH_BYTES: usize = GEMV_PREFETCH * 64;

/// GEMV: blocks summed in i16 before widening. A block adds 4 `vpmaddubsw`
/// lanes to each of a row's two accumulators, each lane at most
/// 2 · 2 · 128 = 512 in magnitude: 8 · 4 · 512 = 16384 < 32767.
const GEMV_I16_BLOCKS: usize = 8;

/// `3 · v` in every byte, modulo 256: two byte adds.
///
/// # Safety
/// The CPU must support AVX2.
#[inline(always)]
pub(crate) unsafe fn triple(v: __m256i) -> __m256i {
    // SAFETY: per the contract (AVX2 includes AVX).
    unsafe { opaque(_mm256_add_epi8(v, _mm256_add_epi8(v, v))) }
}

/// `v`, hidden from the optimizer: LLVM turns a chain of `triple`s into
/// multiplies by 9, 27 and 81, which x86 has only for 16-bit lanes (widen,
/// `vpmullw`, narrow: several times the two adds).
///
/// # Safety
/// The CPU must support AVX.
#[inline]
#[target_feature(enable = "avx")]
unsafe fn opaque(mut v: __m256i) -> __m256i {
    // SAFETY: the assembly is empty: it reads and writes only the register
    // holding v, and leaves it unchanged.
    unsafe {
        std::arch::asm!("/* {0} */", inout(ymm_reg) v, options(pure, nomem, nostack, preserves_flags));
    }
    v
}

/// The digit at the top of each byte `p` (stored with its top bit flipped,
/// so read as a signed byte): `[p > -43] + [p > 42]`, i.e. `[p >= 86] + [p
/// >= 171]` of the unflipped byte (`packing::tq1_digit`).
///
/// # Safety
/// The CPU must support AVX2.
#[inline(always)]
unsafe fn digits(p: __m256i) -> __m256i {
    // SAFETY: per the contract.
    unsafe {
        let low = _mm256_cmpgt_epi8(p, _mm256_set1_epi8(-43));
        let high = _mm256_cmpgt_epi8(p, _mm256_set1_epi8(42));
        _mm256_abs_epi8(_mm256_add_epi8(low, high))
    }
}

/// The codes of the block at `block` (52 bytes, any alignment) as eight
/// vectors: vector g holds the codes of the weights 32g..32g + 32.
///
/// # Safety
/// The CPU must support AVX2; `block` points to a `Tq1Block`.
#[inline(always)]
pub(crate) unsafe fn decode_block(block: *const u8) -> [__m256i; 8] {
    // SAFETY: per the contract: the loads read bytes 0..32, 32..48 and
    // 48..52 of the block.
    unsafe {
        let head = _mm256_loadu_si256(block.cast());
        let mid = _mm256_broadcastsi128_si256(_mm_loadu_si128(block.add(TQ1_HEAD).cast()));
        let tail = _mm256_set1_epi32(block.add(TQ1_HEAD + 16).cast::<i32>().read_unaligned());
        let head1 = triple(head);
        let head2 = triple(head1);
        let head3 = triple(head2);
        let head4 = triple(head3);
        let mid01 = _mm256_blend_epi32::<0xf0>(mid, triple(mid)); // [mid | 3·mid]
        let mid23 = triple(triple(mid01)); // [9·mid | 27·mid]
        let mid4 = triple(triple(mid23)); // [81·mid | (no digit)]
                                          // Dword 4 + i of the upper half: the tail's codes of bits 2i..2i+1.
        let tail_codes = _mm256_and_si256(
            _mm256_srlv_epi32(tail, _mm256_setr_epi32(0, 0, 0, 0, 0, 2, 4, 6)),
            _mm256_set1_epi8(3),
        );
        [
            digits(head),
            digits(head1),
            digits(head2),
            digits(head3),
            digits(head4),
            digits(mid01),
            digits(mid23),
            _mm256_blend_epi32::<0xf0>(digits(mid4), tail_codes),
        ]
    }
}

/// Writes the codes of `blocks` in input order to `out` (32-byte aligned):
/// what the 2-bit GEMM tile reads.
///
/// # Safety
/// The CPU must support AVX2; `out` takes `blocks.len() * BLOCK` bytes.
#[inline(always)]
pub(crate) unsafe fn unpack(blocks: &[Tq1Block], out: *mut u8) {
    for (b, block) in blocks.iter().enumerate() {
        // SAFETY: per the contract; b·BLOCK + 32g + 32 <= the bytes out
        // takes, 32-byte aligned.
        unsafe {
            for (g, codes) in decode_block(block.0.as_ptr()).into_iter().enumerate() {
                _mm256_store_si256(out.add(b * BLOCK + 32 * g).cast(), codes);
            }
        }
    }
}

/// `dots[i] = Σ_k xq[k] · W[rows.start + i, k]` of a `Packing::Tq1` matrix,
/// the rows read as three far-apart streams (`driver::three_streams`).
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
    // SAFETY: this function runs with AVX2; the rest is the caller's.
    unsafe { gemv_body(w, xq, xsum, rows, dots) }
}

/// `gemv` without its call count: also the AVX-512 BW path's GEMV, which
/// without VNNI has no faster multiply than this one's `vpmaddubsw` on the
/// decoded 32-byte vectors (pairing them into 64-byte ones cost shuffles).
///
/// # Safety
/// As `gemv`.
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn gemv_body(
    w: &TernaryMatrix,
    xq: &[i8],
    xsum: i32,
    rows: Range<usize>,
    dots: &mut [i32],
) {
    let rows = Tq1Rows::<Avx2>::new(w, xq, xsum, rows, dots);
    // SAFETY: this function runs with AVX2, and `rows` covers dots.len() rows.
    unsafe { driver::three_streams(&rows, dots) }
}

/// Rows `first..` of a `Packing::Tq1` matrix against one token `xq` (sum
/// `xsum`), for the GEMV of the path `P`: a marker type, for which that path
/// implements `RowDots`.
pub(crate) struct Tq1Rows<'a, P> {
    w: &'a TernaryMatrix,
    first: usize,
    pub(crate) xq: &'a [i8],
    pub(crate) xsum: i32,
    path: PhantomData<P>,
}

impl<'a, P> Tq1Rows<'a, P> {
    /// The rows `rows` of `w` whose dots with `xq` go to `dots`, after
    /// checking that every index the GEMV makes is in range.
    pub(crate) fn new(
        w: &'a TernaryMatrix,
        xq: &'a [i8],
        xsum: i32,
        rows: Range<usize>,
        dots: &[i32],
    ) -> Self {
        assert!(w.packing() == Packing::Tq1);
        assert!(xq.len() >= w.k_padded() && dots.len() == rows.len() && rows.end <= w.n_out());
        Tq1Rows {
            w,
            first: rows.start,
            xq,
            xsum,
            path: PhantomData,
        }
    }

    /// The blocks of row `r` (counted from `first`).
    pub(crate) fn row(&self, r: usize) -> &'a [Tq1Block] {
        self.w.tq1_row(self.first + r)
    }
}

/// The AVX2 path's `Tq1Rows`.
pub(crate) struct Avx2;

impl RowDots for Tq1Rows<'_, Avx2> {
    type Dot = i32;

    #[inline(always)]
    unsafe fn dots<const R: usize>(&self, rows: [usize; R]) -> [i32; R] {
        let blocks: [&[Tq1Block]; R] = std::array::from_fn(|j| self.row(rows[j]));
        // SAFETY: the caller runs the AVX2 path; `Tq1Rows::new` checked
        // that xq holds the rows' padded length.
        unsafe { gemv_rows(&blocks, self.xq, self.xsum) }
    }
}

/// The dots of R rows (of equal length) with one token: each block decoded
/// in registers and multiplied with the token's activations, read from L1
/// by every row.
///
/// # Safety
/// The CPU must support AVX2; `xq` holds the rows' padded length.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn gemv_rows<const R: usize>(rows: &[&[Tq1Block]; R], xq: &[i8], xsum: i32) -> [i32; R] {
    let ones = _mm256_set1_epi16(1);
    let x = xq.as_ptr();
    let n_blocks = rows[0].len();
    debug_assert!(rows.iter().all(|row| row.len() == n_blocks));
    let mut acc32 = [_mm256_setzero_si256(); R];
    for b0 in (0..n_blocks).step_by(GEMV_I16_BLOCKS) {
        // Two accumulators per row: independent add chains.
        let mut acc16 = [[_mm256_setzero_si256(); 2]; R];
        for b in b0..(b0 + GEMV_I16_BLOCKS).min(n_blocks) {
            for (acc, row) in acc16.iter_mut().zip(rows) {
                let block = row[b].0.as_ptr();
                _mm_prefetch::<_MM_HINT_T0>(block.wrapping_add(GEMV_PREFETCH_BYTES).cast());
                // SAFETY: block b of the row is a Tq1Block.
                let codes = unsafe { decode_block(block) };
                for (g, &c) in codes.iter().enumerate() {
                    // SAFETY: b·BLOCK + 32g + 32 <= the padded length xq holds.
                    let xs = unsafe { _mm256_loadu_si256(x.add(b * BLOCK + 32 * g).cast()) };
                    acc[g % 2] = _mm256_add_epi16(acc[g % 2], _mm256_maddubs_epi16(c, xs));
                }
            }
        }
        for (acc32, acc16) in acc32.iter_mut().zip(&acc16) {
            let pairs = _mm256_add_epi32(
                _mm256_madd_epi16(acc16[0], ones),
                _mm256_madd_epi16(acc16[1], ones),
            );
            *acc32 = _mm256_add_epi32(*acc32, pairs);
        }
    }
    let mut dots = [0i32; R];
    for (dot, &acc) in dots.iter_mut().zip(&acc32) {
        *dot = hsum_epi32(acc) - xsum;
    }
    dots
}
