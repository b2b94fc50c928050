//! AVX-512 VNNI output-head dots of several tokens at once (a batched
//! decode step asks for the logits of every sequence): the head is read from
//! memory once per step, and each 64 bytes of a row, once loaded, multiply
//! every token's activations.
//!
//! `vpdpbusd` multiplies u8 by i8, and both the head's codes and the
//! activations are signed: a row's codes are flipped to `w + 128` (u8, one
//! `vpxorq` per 64 bytes) and the excess `128 · Σx` is subtracted once per
//! token at the end. Every product and sum is an integer well inside i32
//! (|Σ| <= 255 · 127 · n), so the dots are exactly the scalar ones.

use std::arch::x86_64::*;

use crate::kernels::counts::{self, Isa};

/// Tiles: 4 rows × 4 tokens (16 accumulators, 4 row and 4 token operands)
/// for up to four tokens, 2 rows × 8 tokens (16 accumulators, 2 row and 8
/// token operands) for more: eight tokens' dots are then taken in one pass
/// over the rows, which come from memory once, rather than in two passes of
/// which the second reads them back from L2 while memory idles.
const ROWS: usize = 4;
const TOKENS: usize = 4;
const WIDE_ROWS: usize = 2;
const WIDE_TOKENS: usize = 8;
/// The accumulator block every tile fills: [ROWS.max(WIDE_ROWS), TOKENS.max(WIDE_TOKENS)].
type TileDots = [[i32; WIDE_TOKENS]; ROWS];

/// Rows of the head ahead of the tile being read that it prefetches, into
/// L2: the head streams from memory, and prefetching into L1 held too few
/// lines in flight (the L1 has fewer miss buffers than L2) to keep up with
/// a tile's compute.
const PREFETCH_ROWS: usize = 24;

/// `dots[i · rows + r] = Σ_k head[r · n + k] · xs[i · n + k]` for the
/// `dots.len() / tokens` consecutive rows of n = `xs.len() / tokens` int8 values
/// in `head`, and `tokens` token rows in `xs` ([tokens, n]); `dots` is [tokens, rows].
///
/// Token tile by token tile: the first reads the rows from memory (and
/// prefetches them), the others from cache (a call's rows are a head task's,
/// sized to stay in L2).
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VNNI.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(crate) unsafe fn int8_dots_tokens_vnni(
    head: &[i8],
    xs: &[i8],
    tokens: usize,
    dots: &mut [i32],
) {
    counts::enter(Isa::Avx512Vnni);
    assert!(tokens > 0 && xs.len().is_multiple_of(tokens) && dots.len().is_multiple_of(tokens));
    let (n, rows) = (xs.len() / tokens, dots.len() / tokens);
    assert!(head.len() >= rows * n);
    let mut t0 = 0;
    while t0 < tokens {
        let wide = tokens - t0 > TOKENS;
        let (tile_rows, tile_tokens) = if wide {
            (WIDE_ROWS, WIDE_TOKENS)
        } else {
            (ROWS, TOKENS)
        };
        let nt = tile_tokens.min(tokens - t0);
        // 128 · Σx of each token: what flipping the codes to w + 128 added.
        let mut excess = [0i32; WIDE_TOKENS];
        for (i, e) in excess.iter_mut().enumerate().take(nt) {
            let x = &xs[(t0 + i) * n..(t0 + i + 1) * n];
            *e = 128 * x.iter().map(|&v| i32::from(v)).sum::<i32>();
        }
        for r0 in (0..rows).step_by(tile_rows) {
            let nr = tile_rows.min(rows - r0);
            let operands = Operands {
                // SAFETY: r0 < rows, inside head's rows·n values.
                rows: unsafe { head.as_ptr().add(r0 * n) },
                // SAFETY: t0 < tokens, inside xs.
                xs: unsafe { xs.as_ptr().add(t0 * n) },
                n,
                prefetch: t0 == 0,
            };
            let mut tile: TileDots = [[0; WIDE_TOKENS]; ROWS];
            macro_rules! run {
                ($nr:literal, $nt:literal) => {
                    // SAFETY: this function runs with AVX-512 F, BW and
                    // VNNI; rows r0..r0 + nr and tokens t0..t0 + nt exist.
                    unsafe { tile_dots::<$nr, $nt>(operands, &mut tile) }
                };
            }
            if wide {
                crate::kernels::driver::tile_2x8!(nr, nt, run);
            } else {
                crate::kernels::driver::tile_4x4!(nr, nt, run);
            }
            for (j, tile_row) in tile.iter().enumerate().take(nr) {
                for (i, &dot) in tile_row.iter().enumerate().take(nt) {
                    dots[(t0 + i) * rows + r0 + j] = dot - excess[i];
                }
            }
        }
        t0 += nt;
    }
}

/// One tile's operands: NR consecutive rows and NT consecutive tokens of n values.
#[derive(Clone, Copy)]
struct Operands {
    rows: *const i8, // [NR, n]
    xs: *const i8,   // [NT, n]
    n: usize,
    /// Whether to prefetch the rows PREFETCH_ROWS on (the first token tile
    /// of a row tile reads the rows from memory; the others from cache).
    prefetch: bool,
}

/// `out[j][i] = Σ_k (rows[j·n + k] + 128) · xs[i·n + k]`.
///
/// # Safety
/// AVX-512 F, BW and VNNI; the operands hold NR rows and NT tokens of n values.
#[inline(always)]
unsafe fn tile_dots<const NR: usize, const NT: usize>(ops: Operands, out: &mut TileDots) {
    let Operands {
        rows,
        xs,
        n,
        prefetch,
    } = ops;
    // SAFETY: per the contract (AVX-512 F, BW and VNNI); every load is
    // masked to the n values of a row or token; a prefetch never faults.
    unsafe {
        let flip = _mm512_set1_epi8(i8::MIN);
        let mut acc = [[_mm512_setzero_si512(); NT]; NR];
        let mut k = 0;
        while k < n {
            // Lanes past n load as 0: a flipped 0 (128) times an activation 0 adds nothing.
            let mask: __mmask64 = if n - k >= 64 {
                !0
            } else {
                (1u64 << (n - k)) - 1
            };
            if prefetch {
                for j in 0..NR {
                    let ahead = rows.wrapping_add((PREFETCH_ROWS + j) * n + k);
                    _mm_prefetch::<_MM_HINT_T1>(ahead.cast());
                }
            }
            let mut x = [_mm512_setzero_si512(); NT];
            for (i, x) in x.iter_mut().enumerate() {
                *x = _mm512_maskz_loadu_epi8(mask, xs.add(i * n + k));
            }
            for j in 0..NR {
                let w = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, rows.add(j * n + k)), flip);
                for i in 0..NT {
                    acc[j][i] = _mm512_dpbusd_epi32(acc[j][i], w, x[i]);
                }
            }
            k += 64;
        }
        for j in 0..NR {
            for i in 0..NT {
                out[j][i] = _mm512_reduce_add_epi32(acc[j][i]);
            }
        }
    }
}
