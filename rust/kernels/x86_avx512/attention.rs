//! AVX-512 VNNI attention over a q8_0 cache: `scalar::attention::attend_head_q8_0`
//! for up to four heads at a time, with the very same floating-point
//! operations in the same order, so the results agree to the bit. The
//! softmax is the AVX2 path's (`x86_avx2::attention::softmax_weights`).
//!
//! Scores: a key tile (`KeyTileBlock`) holds codes 4 g..4 g + 4 of 16 keys
//! in 64 bytes, so one `vpdpbusd` against four query codes broadcast adds
//! 64 products into the 16 keys' dots: per block, 8 loads serve every head,
//! and each head takes 8 `vpdpbusd`, no horizontal sum. The stored codes are
//! k + 128 (u8), so each dot comes out as q · k + 128 · Σ q; the excess is
//! taken back once per block and head. Every product and sum is an integer
//! well inside i32 (|Σ| <= 32 · 255 · 127 per block), so the dots are exact.
//!
//! Values: 32 outputs (one block) in two vectors per key: codes widened to
//! i32, converted, times d_v (exact: an f16 times a code below 2^7), then
//! one FMA per head with its weight broadcast.

use std::arch::x86_64::*;

use crate::kernels::attention::{HeadGroup, HeadRows};
use crate::kernels::counts::{self, Isa};
use crate::kernels::q8_0::{BlockQ8_0, KeyTileBlock, KEY_CODE_OFFSET, KEY_TILE, Q8_0_VALUES};
use crate::kernels::x86_avx2::attention::{heads_by_four, query_group, softmax_weights};

/// `scalar::attention::attend_chunk_q8_0`: heads four at a time.
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VNNI, AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
pub(crate) unsafe fn attend_chunk_q8_0_vnni(
    group: &mut HeadGroup<'_, BlockQ8_0, BlockQ8_0, KeyTileBlock>,
) {
    counts::enter(Isa::Avx512Vnni);
    let next_chunk = group.next_chunk();
    heads_by_four!(group, heads_chunk_q8_0, next_chunk);
}

/// A half as f32 in every lane.
#[inline]
#[target_feature(enable = "avx2,f16c,avx512f")]
fn broadcast_half(h: u16) -> __m512 {
    _mm512_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(h))))
}

/// The largest head_dim this kernel takes (its per-head constants live on
/// the stack); larger heads go to the AVX2 kernel, which gives the same bits.
pub(crate) const MAX_HEAD_DIM: usize = 512;
const MAX_BLOCKS: usize = MAX_HEAD_DIM / Q8_0_VALUES;

/// Rows ahead of the one being summed whose values are prefetched.
const VALUE_PREFETCH_ROWS: usize = 8;

/// The scores of the chunk's keys for H heads, into each head's `scores`:
/// tile by tile (the keys are read in memory order), each key's score
/// accumulating `(d_q[b] · d_k[b]) · dot_b` by fused multiply-adds in block
/// order, as `scalar::attention::score_q8_0`, then times `scaling`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
fn scores_q8_0<const H: usize>(
    rows: &mut [HeadRows<'_, BlockQ8_0>; H],
    keys: &[KeyTileBlock], // [n / 16 rounded up, blocks]
    values: &[BlockQ8_0],  // [n, blocks]
    blocks: usize,
    scaling: f32,
) {
    let n = values.len() / blocks;
    assert!(blocks <= MAX_BLOCKS && keys.len() == n.div_ceil(KEY_TILE) * blocks);
    assert!(rows
        .iter()
        .all(|r| r.scores.len() == n && r.q.len() == blocks));
    // Per head and block: d_q as f32, the excess 128 · Σ q of the offset
    // codes, and the query codes four at a time.
    let mut dq = [[0.0f32; MAX_BLOCKS]; H];
    let mut excess = [[0i32; MAX_BLOCKS]; H];
    let mut q4 = [[[0i32; Q8_0_VALUES / 4]; MAX_BLOCKS]; H];
    for (h, row) in rows.iter().enumerate() {
        for (b, qb) in row.q.iter().enumerate() {
            dq[h][b] = qb.d.to_f32();
            excess[h][b] = KEY_CODE_OFFSET * qb.qs.iter().map(|&x| i32::from(x)).sum::<i32>();
            for (g, q) in q4[h][b].iter_mut().enumerate() {
                *q = query_group(qb, g);
            }
        }
    }
    let scale = _mm512_set1_ps(scaling);
    for (t, tile) in keys.chunks_exact(blocks).enumerate() {
        let mut acc = [_mm512_setzero_ps(); H];
        for (b, kb) in tile.iter().enumerate() {
            // SAFETY: d holds 16 halves (32 bytes).
            let dk = _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(kb.d.as_ptr().cast()) });
            let mut dots = [_mm512_setzero_si512(); H];
            for g in 0..Q8_0_VALUES / 4 {
                // SAFETY: qs holds 512 bytes; 64 g + 64 <= 512.
                let codes = unsafe { _mm512_loadu_si512(kb.qs.as_ptr().add(64 * g).cast()) };
                for (dot, q4) in dots.iter_mut().zip(&q4) {
                    *dot = _mm512_dpbusd_epi32(*dot, codes, _mm512_set1_epi32(q4[b][g]));
                }
            }
            for h in 0..H {
                let dot = _mm512_sub_epi32(dots[h], _mm512_set1_epi32(excess[h][b]));
                let w = _mm512_mul_ps(_mm512_set1_ps(dq[h][b]), dk);
                acc[h] = _mm512_fmadd_ps(w, _mm512_cvtepi32_ps(dot), acc[h]);
            }
        }
        // Lanes past the last key (of a partial tile) are not written.
        let lanes = (n - t * KEY_TILE).min(KEY_TILE);
        let mask: __mmask16 = (((1u32 << lanes) - 1) & 0xffff) as u16;
        for (row, &acc) in rows.iter_mut().zip(&acc) {
            let s = row.scores[t * KEY_TILE..].as_mut_ptr();
            // SAFETY: lanes below `lanes` are scores t·16.. < n of the row;
            // the rest are masked off (not written).
            unsafe { _mm512_mask_storeu_ps(s, mask, _mm512_mul_ps(acc, scale)) };
        }
    }
}

/// out_h[32 b..32 (b + B)] = Σ_j e_h[j] · (d_v[j, b] · v_j[b].qs) for
/// blocks b0..b0 + B, fused multiply-adds in key order: each value block is
/// loaded, widened and scaled (exactly) once for all heads. The passes also
/// ask for the next chunk's keys and values (`next_chunk`, into L2), a few
/// lines a row.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw")]
fn values_step_q8_0<const H: usize, const B: usize>(
    rows: &mut [HeadRows<'_, BlockQ8_0>; H],
    values: &[BlockQ8_0], // [n, blocks]
    blocks: usize,
    b0: usize,
    (next_keys, next_values): (&[KeyTileBlock], &[BlockQ8_0]),
) {
    let n = rows[0].scores.len();
    assert!(b0 + B <= blocks && values.len() == n * blocks);
    assert!(rows
        .iter()
        .all(|r| r.scores.len() == n && r.out.len() == blocks * Q8_0_VALUES));
    let mut acc = [[[_mm512_setzero_ps(); 2]; B]; H];
    let row_bytes = blocks * std::mem::size_of::<BlockQ8_0>();
    let pass_lines = values
        .as_ptr()
        .cast::<u8>()
        .wrapping_add(b0 * std::mem::size_of::<BlockQ8_0>());
    let last = std::mem::size_of_val(values) - b0 * std::mem::size_of::<BlockQ8_0>() - 1;
    let key_lines = std::mem::size_of_val(next_keys).div_ceil(64);
    let next_lines = key_lines + std::mem::size_of_val(next_values).div_ceil(64);
    // Spread over the passes (two blocks each, the last maybe one): a few
    // lines a row, the pass's share of them.
    let (passes, pass) = (blocks.div_ceil(2), b0 / 2);
    let next_per_row = next_lines.div_ceil(passes * n);
    let first_line = pass * n * next_per_row;
    let line_at = |line: usize| {
        if line < key_lines {
            next_keys.as_ptr().cast::<u8>().wrapping_add(64 * line)
        } else {
            next_values
                .as_ptr()
                .cast::<u8>()
                .wrapping_add(64 * (line - key_lines))
        }
    };
    for (j, row) in values.chunks_exact(blocks).enumerate() {
        // The pass's bytes of a later row: one row in 64 bytes or less,
        // two lines at most.
        let ahead = ((j + VALUE_PREFETCH_ROWS) * row_bytes).min(last);
        _mm_prefetch::<_MM_HINT_T0>(pass_lines.wrapping_add(ahead).cast());
        _mm_prefetch::<_MM_HINT_T0>(pass_lines.wrapping_add((ahead + 63).min(last)).cast());
        let start = (first_line + j * next_per_row).min(next_lines);
        for line in start..(start + next_per_row).min(next_lines) {
            _mm_prefetch::<_MM_HINT_T1>(line_at(line).cast());
        }
        let mut v = [[_mm512_setzero_ps(); 2]; B];
        for (vb, block) in v.iter_mut().zip(&row[b0..b0 + B]) {
            let dv = broadcast_half(block.d.0);
            for (half, vh) in vb.iter_mut().enumerate() {
                // SAFETY: qs holds 32 bytes; 16 half + 16 <= 32.
                let codes = unsafe { _mm_loadu_si128(block.qs.as_ptr().add(16 * half).cast()) };
                *vh = _mm512_mul_ps(dv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(codes)));
            }
        }
        for (acc_h, head) in acc.iter_mut().zip(rows.iter()) {
            let e = _mm512_set1_ps(head.scores[j]);
            for (acc_hb, vb) in acc_h.iter_mut().zip(&v) {
                for (a, &vh) in acc_hb.iter_mut().zip(vb) {
                    *a = _mm512_fmadd_ps(e, vh, *a);
                }
            }
        }
    }
    for (head, acc_h) in rows.iter_mut().zip(&acc) {
        for (bb, acc_hb) in acc_h.iter().enumerate() {
            for (half, &a) in acc_hb.iter().enumerate() {
                let at = (b0 + bb) * Q8_0_VALUES + 16 * half;
                let o = &mut head.out[at..at + 16];
                // SAFETY: `o` holds 16 floats.
                unsafe { _mm512_storeu_ps(o.as_mut_ptr(), a) };
            }
        }
    }
}

/// `scalar::attention::attend_head_q8_0` for each of H heads sharing keys
/// and values: scores 16 keys (a tile) at a time, then the AVX2 softmax,
/// then two blocks (64 outputs) per pass over the value rows.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
fn heads_chunk_q8_0<const H: usize>(
    rows: &mut [HeadRows<'_, BlockQ8_0>; H],
    keys: &[KeyTileBlock],
    values: &[BlockQ8_0],
    hd: usize,
    scaling: f32,
    next_chunk: (&[KeyTileBlock], &[BlockQ8_0]),
) {
    let blocks = hd / Q8_0_VALUES;
    assert!(blocks >= 1 && blocks * Q8_0_VALUES == hd);
    scores_q8_0(rows, keys, values, blocks, scaling);
    for row in rows.iter_mut() {
        *row.stats = softmax_weights(row.scores);
    }
    let mut b = 0;
    while b + 2 <= blocks {
        values_step_q8_0::<H, 2>(rows, values, blocks, b, next_chunk);
        b += 2;
    }
    if b < blocks {
        values_step_q8_0::<H, 1>(rows, values, blocks, b, next_chunk);
    }
}
