//! AVX2 kernels. Weights arrive as codes `w + 1` in {0, 1, 2} (see `packing`),
//! multiplied with int8 activations by `vpmaddubsw` (unsigned × signed, pairs
//! summed into i16), widened to i32 by `vpmaddwd` with ones. The `+ 1` adds
//! Σ_k x[k] to every dot; it is subtracted once at the end.
//!
//! Overflow: a `vpmaddubsw` lane is c0·x0 + c1·x1 with c ≤ 2 and |x| ≤ 128, so
//! |lane| ≤ 512 and 63 of them still fit an i16 (63 · 512 = 32256 < 32767).

use std::arch::x86_64::*;
use std::ops::Range;

use super::packing::{PackedBlock, TernaryMatrix, BLOCK};
use super::{aligned_scratch, gemm_k_block, QuantizedActivations};

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
fn hsum_epi32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    _mm_cvtsi128_si32(s)
}

/// Rows multiplied at once by the GEMV, each from its own stretch of the
/// rows it was given (row i of each third), so that the weights are read as
/// three sequential streams far apart rather than one. On Zen 3 one stream
/// with a software prefetch reached ~72 % of the read bandwidth whatever the
/// prefetch distance or hint, and did not get faster when its arithmetic was
/// removed altogether: a single stream, not the ALU, was the limit. Measured
/// on a 128 MB matrix, rows split between threads as the decoder then split
/// them (480 and 864 rows a task): 1.12-1.20x one stream at 1 and 2 threads; two
/// streams gained less, four no more than three (and need more registers),
/// and three streams inside 96-row pieces (20 KB apart) gained nothing, nor
/// did neighbouring rows (interleaved streams 640 bytes apart defeat the
/// hardware prefetcher: slower than one stream). A decoded 2B4T token, with
/// the int8 head read the same way, went 1.16-1.18x faster at 1 thread and
/// 1.04-1.14x at 2 (three runs of one process alternating both ways 12
/// times; four streams: the same). From cache it is 6-9 % slower than one
/// stream, but a token's weights never fit in cache.
pub(crate) const GEMV_STREAMS: usize = 3;

/// # Safety
/// The CPU must support AVX2; `xq` must hold at least `w.k_padded()` values.
#[target_feature(enable = "avx2")]
pub unsafe fn gemv(w: &TernaryMatrix, xq: &[i8], xsum: i32, rows: Range<usize>, dots: &mut [i32]) {
    assert!(xq.len() >= w.k_padded() && dots.len() == rows.len() && rows.end <= w.n_out());
    let stretch = rows.len() / GEMV_STREAMS;
    // Plain loops, no closures: a closure does not inherit `avx2`, and the
    // ones that built these arrays were calls per row (5 % of a token).
    let mut row_dots = [0i32; GEMV_STREAMS];
    for i in 0..stretch {
        let mut stream_rows: [&[PackedBlock]; GEMV_STREAMS] = [&[]; GEMV_STREAMS];
        for (s, row) in stream_rows.iter_mut().enumerate() {
            *row = w.row(rows.start + i + s * stretch);
        }
        gemv_rows(&stream_rows, xq, xsum, &mut row_dots);
        for (s, &dot) in row_dots.iter().enumerate() {
            dots[i + s * stretch] = dot;
        }
    }
    let mut one = [0i32; 1];
    for j in GEMV_STREAMS * stretch..rows.len() {
        gemv_rows(&[w.row(rows.start + j)], xq, xsum, &mut one);
        dots[j] = one[0];
    }
}

/// The dots of R rows (of equal length) with one token, sharing its
/// activation loads. Each row is prefetched `GEMV_PREFETCH` ahead (it took a
/// single stream from 83 % to ~94 % of the bandwidth criterion's scalar sum
/// measured, a reading 15-20 % under the AVX2 one).
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
                // PackedBlock is 64-byte aligned, so each half is 32-byte aligned.
                let mut packed = [_mm256_setzero_si256(); R];
                for (p, row) in packed.iter_mut().zip(rows) {
                    *p = _mm256_load_si256(row[b].0.as_ptr().add(32 * half).cast());
                }
                for plane in 0..4 {
                    // Activations 64·plane + 32·half .. +32 of block b meet
                    // the codes in bits 2·plane..2·plane+1 of this half.
                    let xs = _mm256_loadu_si256(x.add(b * BLOCK + 64 * plane + 32 * half).cast());
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

/// GEMM tile: 4 rows × 2 tokens = 8 accumulators, plus 2 activation vectors
/// and a code vector. Measured against 3 × 3 (and 6 × 2, 5 × 2, 4 × 3, 8 × 1,
/// 7 × 1, 6 × 1), interleaved in one process on Zen 3: 1.07-1.12× the 3 × 3
/// speed on the 2B4T shapes (m = 128), the best of them.
const TILE_ROWS: usize = 4;
const TILE_TOKENS: usize = 2;
/// GEMM steps of 32 inputs summed in i16: 32 · 512 = 16384.
const GEMM_I16_STEPS: usize = 32;

/// # Safety
/// The CPU must support AVX2. `dots` is [rows.len(), x.m()].
#[target_feature(enable = "avx2")]
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
    let codes = scratch.as_mut_ptr().cast::<u8>(); // [TILE_ROWS, kb] unpacked codes
    let acts = x.codes().as_ptr(); // [m, kp]
    for k0 in (0..kp).step_by(kb) {
        let len = kb.min(kp - k0);
        let blocks = k0 / BLOCK..(k0 + len) / BLOCK;
        for r0 in rows.clone().step_by(TILE_ROWS) {
            let nr = TILE_ROWS.min(rows.end - r0);
            for j in 0..nr {
                unpack_codes(&w.row(r0 + j)[blocks.clone()], codes.add(j * kb));
            }
            let out_row = (r0 - rows.start) * m;
            for t0 in (0..m).step_by(TILE_TOKENS) {
                let nt = TILE_TOKENS.min(m - t0);
                let a = acts.add(t0 * kp + k0);
                let out = &mut dots[out_row + t0..];
                match (nr, nt) {
                    (4, 2) => tile::<4, 2>(codes, kb, a, kp, len, out, m),
                    (4, _) => tile::<4, 1>(codes, kb, a, kp, len, out, m),
                    (3, 2) => tile::<3, 2>(codes, kb, a, kp, len, out, m),
                    (3, _) => tile::<3, 1>(codes, kb, a, kp, len, out, m),
                    (2, 2) => tile::<2, 2>(codes, kb, a, kp, len, out, m),
                    (2, _) => tile::<2, 1>(codes, kb, a, kp, len, out, m),
                    (_, 2) => tile::<1, 2>(codes, kb, a, kp, len, out, m),
                    _ => tile::<1, 1>(codes, kb, a, kp, len, out, m),
                }
            }
        }
    }
    for row_dots in dots.chunks_exact_mut(m) {
        for (dot, &sum) in row_dots.iter_mut().zip(x.sums()) {
            *dot -= sum;
        }
    }
}

/// Writes the codes of `blocks` in input order to `out` (32-byte aligned).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn unpack_codes(blocks: &[PackedBlock], out: *mut u8) {
    for (b, block) in blocks.iter().enumerate() {
        for half in 0..2 {
            let packed = _mm256_load_si256(block.0.as_ptr().add(32 * half).cast());
            for (i, codes) in planes(packed).into_iter().enumerate() {
                _mm256_store_si256(out.add(b * BLOCK + 64 * i + 32 * half).cast(), codes);
            }
        }
    }
}

/// `out[j·m + i] += Σ_{k < len} codes[j·code_stride + k] · acts[i·act_stride + k]`
/// for NR rows j and NT tokens i.
#[inline]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<const NR: usize, const NT: usize>(
    codes: *const u8,
    code_stride: usize,
    acts: *const i8,
    act_stride: usize,
    len: usize,
    out: &mut [i32],
    m: usize,
) {
    let ones = _mm256_set1_epi16(1);
    let mut acc32 = [[_mm256_setzero_si256(); NT]; NR];
    let mut k = 0;
    while k < len {
        let end = (k + GEMM_I16_STEPS * 32).min(len);
        let mut acc16 = [[_mm256_setzero_si256(); NT]; NR];
        while k < end {
            let a: [__m256i; NT] =
                std::array::from_fn(|i| _mm256_loadu_si256(acts.add(i * act_stride + k).cast()));
            for j in 0..NR {
                let c = _mm256_load_si256(codes.add(j * code_stride + k).cast());
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
