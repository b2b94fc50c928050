//! AVX-512 attention, for up to four heads at a time, with the very same
//! floating-point operations in the same order as the scalar definitions,
//! so the results agree to the bit: over a q8_0 cache with VNNI
//! (`scalar::attention::attend_head_q8_0`), and over f32 or F16 rows
//! (`scalar::attention::attend_head`, `attend_chunk_float`, at the end). The
//! softmax is the AVX2 path's (`x86_avx2::attention::softmax_weights`),
//! with its exponentials 16 lanes at a time.
//!
//! Over float rows, the scores take two keys a vector (eight lanes each,
//! every lane the scalar dot's chain), and the value sums 16 outputs a
//! vector (each output its own chain in key order). The scores pass asks
//! for the chunk's value rows, and the value pass for the next chunk's key
//! rows, while they compute: one chunk's reads ahead of its arithmetic.
//!
//! Scores: a key tile (`KeyTileBlock`) holds codes 4 g..4 g + 4 of 16 keys
//! in 64 bytes, so one `vpdpbusd` against four query codes broadcast adds
//! 64 products into the 16 keys' dots: per block, 8 loads serve every head,
//! and each head takes 8 `vpdpbusd`, no horizontal sum. The stored codes are
//! k + 128 (u8), so each dot comes out as q · k + 128 · Σ q; the excess is
//! taken back once per block and head. Every product and sum is an integer
//! well inside i32 (|Σ| <= 32 · 255 · 127 per block), so the dots are exact.
//!
//! Values: the weights' 14-bit codes (`scalar::attention::weight_code`),
//! as two 7-bit halves; a value tile's 64-byte load is 16 outputs of four
//! positions, so one `vpdpbusd` against a half of the four positions' codes
//! broadcast adds 64 products into 16 outputs. The stored codes are
//! c + 128, so each sum comes out with 128 · Σ_j code_j in excess, taken
//! back once per block and head.

use std::arch::x86_64::*;

use crate::kernels::attention::{HeadGroup, HeadRows, KvElement, Partial, Q8_0Group};
use crate::kernels::counts::{self, Isa};
use crate::kernels::half::F16;
use crate::kernels::q8_0::{
    BlockQ8_0, KeyTileBlock, ValueTileBlock, Q8_0_VALUES, TILE_CODE_OFFSET, TILE_POSITIONS,
};
use crate::kernels::scalar::attention as scalar;
use crate::kernels::x86_avx2::attention::{
    heads_by_four, largest_score, query_group, reduce, reduce8, scores_step, softmax_from,
    weight_rows, NextChunkLines, MAX_TILES,
};
use scalar::exp_consts as c;

/// `scalar::attention::attend_chunk_q8_0`: heads four at a time.
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VNNI, AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
pub(crate) unsafe fn attend_chunk_q8_0_vnni(group: &mut Q8_0Group<'_>) {
    counts::enter(Isa::Avx512Vnni);
    let next_chunk = group.next_chunk();
    heads_by_four!(group, heads_chunk_q8_0, next_chunk);
}

/// `scalar::attention::exp` of 16 lanes: `x86_avx2::attention::exp8`'s
/// operations, in zmm.
#[inline]
#[target_feature(enable = "avx2,fma,avx512f")]
fn exp16(x: __m512) -> __m512 {
    let x = _mm512_min_ps(
        _mm512_max_ps(x, _mm512_set1_ps(c::MIN)),
        _mm512_set1_ps(c::MAX),
    );
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(c::LOG2E)),
    );
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(c::LN2_HI), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(c::LN2_LO), r);
    let mut p = _mm512_set1_ps(c::P[0]);
    for &coef in &c::P[1..] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(coef));
    }
    let y = _mm512_add_ps(
        _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r),
        _mm512_set1_ps(1.0),
    );
    let exponent = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
    let e = _mm512_mul_ps(y, _mm512_castsi512_ps(_mm512_slli_epi32::<23>(exponent)));
    _mm512_maskz_mov_ps(
        _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, _mm512_set1_ps(c::MIN)),
        e,
    )
}

/// `softmax_weights` of any row of numbers (the sampler's logits), counted
/// under `isa`, the AVX-512 path that runs it.
///
/// # Safety
/// The CPU must support AVX-512 F, AVX2 and FMA.
#[target_feature(enable = "avx2,fma,avx512f")]
pub(crate) unsafe fn softmax_in_place(isa: Isa, x: &mut [f32]) -> Partial {
    counts::enter(isa);
    softmax_weights(x)
}

/// `x86_avx2::attention::softmax_weights` (so `scalar::attention::softmax_weights`):
/// the same maximum; the exponentials 16 at a time, each half added into
/// the eight-lane sum in turn, so every sum is the same; then the rest as
/// there.
#[inline]
#[target_feature(enable = "avx2,fma,avx512f")]
fn softmax_weights(scores: &mut [f32]) -> Partial {
    let max = largest_score(scores);
    let full16 = scores.len() / 16 * 16;
    let mut sum8 = _mm256_setzero_ps();
    for c in (0..full16).step_by(16) {
        // SAFETY: c + 16 <= n.
        unsafe {
            let p = scores.as_mut_ptr().add(c);
            let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(p), _mm512_set1_ps(max)));
            _mm512_storeu_ps(p, e);
            sum8 = _mm256_add_ps(sum8, _mm512_castps512_ps256(e));
            sum8 = _mm256_add_ps(
                sum8,
                _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(e))),
            );
        }
    }
    softmax_from(scores, full16, max, sum8)
}

/// One tile's weight codes for one head, as the value sums load them:
/// `[lo 0..8, hi 0..8, lo 8..16, hi 8..16]`, code w = 128 hi + lo of
/// position u in byte u (lo) and 8 + u (hi) of half u / 8, so that the
/// four positions of quad p are 4 bytes at `quad_lo(p)` and `quad_lo(p) + 8`.
type TileWeightBytes = [u8; 2 * TILE_POSITIONS];

/// Where the low halves of quad p's four weight codes start in its
/// `TileWeightBytes` (the high halves 8 bytes on).
#[inline(always)]
fn quad_lo(p: usize) -> usize {
    16 * (p / 2) + 4 * (p % 2)
}

/// Four bytes of `bytes` from `at`, as one i32 (to broadcast).
#[inline(always)]
fn four_bytes(bytes: &TileWeightBytes, at: usize) -> i32 {
    i32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// The lanes of tile t that are positions below n (all 16 but in a
/// partial last tile).
#[inline(always)]
fn tile_mask(n: usize, t: usize) -> __mmask16 {
    let lanes = (n - t * TILE_POSITIONS).min(TILE_POSITIONS);
    (((1u32 << lanes) - 1) & 0xffff) as u16
}

/// The largest head_dim this kernel takes (its per-head constants live on
/// the stack); larger heads go to the AVX2 kernel, which gives the same bits.
pub(crate) const MAX_HEAD_DIM: usize = 512;
const MAX_BLOCKS: usize = MAX_HEAD_DIM / Q8_0_VALUES;

/// The scores of the chunk's keys for H heads, into each head's `scores`:
/// tile by tile (the keys are read in memory order), each key's score
/// accumulating `(d_q[b] · d_k[b]) · dot_b` by fused multiply-adds in block
/// order, as `scalar::attention::score_q8_0`, then times `scaling`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
fn scores_q8_0<const H: usize>(
    rows: &mut [HeadRows<'_, BlockQ8_0>; H],
    keys: &[KeyTileBlock], // [n / 16 rounded up, blocks]
    blocks: usize,
    scaling: f32,
    next: &NextChunkLines<'_, KeyTileBlock, ValueTileBlock>,
) {
    let n = rows[0].scores.len();
    assert!(blocks <= MAX_BLOCKS && keys.len() == n.div_ceil(TILE_POSITIONS) * blocks);
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
            excess[h][b] = TILE_CODE_OFFSET * qb.qs.iter().map(|&x| i32::from(x)).sum::<i32>();
            for (g, q) in q4[h][b].iter_mut().enumerate() {
                *q = query_group(qb, g);
            }
        }
    }
    let scale = _mm512_set1_ps(scaling);
    for (t, tile) in keys.chunks_exact(blocks).enumerate() {
        next.prefetch(t);
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
        let mask = tile_mask(n, t);
        for (row, &acc) in rows.iter_mut().zip(&acc) {
            let s = row.scores[t * TILE_POSITIONS..].as_mut_ptr();
            // SAFETY: the mask's lanes are scores t·16.. < n of the row;
            // the rest are masked off (not written).
            unsafe { _mm512_mask_storeu_ps(s, mask, _mm512_mul_ps(acc, scale)) };
        }
    }
}

/// out_h[32 b..32 b + 32] for H heads: `scalar::attention::value_sums_q8_0`
/// of block b. Each (head, half of the block) has a sum for the codes' high
/// halves and one for the low halves: `128 · Σ hi·(c + 128) + Σ lo·(c + 128)
/// - 128 · Σ code` is Σ code · c exactly (wrapping i32 arithmetic, and the
/// result within |Σ| < 2^30). The pass also asks for its share of the next
/// chunk's keys and values (`next`, into L2), a few lines a tile.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
fn value_sums_q8_0<const H: usize>(
    rows: &mut [HeadRows<'_, BlockQ8_0>; H],
    values: &[ValueTileBlock], // [n / 16 rounded up, blocks]
    blocks: usize,
    b: usize,
    next: &NextChunkLines<'_, KeyTileBlock, ValueTileBlock>,
    bytes: &mut [[TileWeightBytes; H]; MAX_TILES],
) {
    let n = rows[0].scores.len();
    let tiles = n.div_ceil(TILE_POSITIONS);
    assert!(tiles <= MAX_TILES && b < blocks && values.len() == tiles * blocks);
    assert!(rows.iter().all(|r| r.scores.len() == n));
    // Each tile's 16 weights e_j (lanes past n: 0) and scales d_v[j, b].
    let weights = |row: &HeadRows<'_, BlockQ8_0>, t: usize| {
        // SAFETY: the mask's lanes are scores t·16.. < n of the row; the
        // rest are masked off (not read).
        unsafe {
            _mm512_maskz_loadu_ps(tile_mask(n, t), row.scores.as_ptr().add(t * TILE_POSITIONS))
        }
    };
    let scales = |t: usize| {
        let block = &values[t * blocks + b];
        // SAFETY: d holds 16 halves (32 bytes).
        _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(block.d.as_ptr().cast()) })
    };

    // Each head's largest weight: maxps(w, top) is top when w is a NaN (a
    // lane past n with a junk scale), as `scalar::larger_weight`.
    let mut top = [_mm512_setzero_ps(); H];
    for t in 0..tiles {
        let d = scales(t);
        for (top, row) in top.iter_mut().zip(rows.iter()) {
            *top = _mm512_max_ps(_mm512_mul_ps(weights(row, t), d), *top);
        }
    }
    let to_from = top.map(|top| {
        let mut lanes = [0.0f32; 16];
        // SAFETY: `lanes` holds 16 floats.
        unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), top) };
        scalar::weight_scales_of_maxima(&lanes)
    });
    let (zero, max) = (
        _mm512_setzero_ps(),
        _mm512_set1_ps(scalar::WEIGHT_CODE_MAX as f32),
    );
    let high_half = _mm512_set1_epi32(0x3f80);
    // Within each 128-bit lane, the low bytes of its eight words, then the high ones.
    let split = _mm256_setr_epi8(
        0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, //
        0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
    );
    // Every tile's weight codes, `scalar::attention::weight_code` (maxps(x,
    // 0) is 0 for a NaN x, as f32::max), as `TileWeightBytes`: read back
    // from memory, each four bytes broadcast by the `vpdpbusd` that uses them.
    let mut code_sums = [_mm512_setzero_si512(); H];
    for (t, bytes) in bytes[..tiles].iter_mut().enumerate() {
        let d = scales(t);
        for ((bytes, row), (sum, &(to_code, _))) in bytes
            .iter_mut()
            .zip(rows.iter())
            .zip(code_sums.iter_mut().zip(&to_from))
        {
            let x = _mm512_mul_ps(_mm512_mul_ps(weights(row, t), d), _mm512_set1_ps(to_code));
            let w = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(x, zero), max));
            *sum = _mm512_add_epi32(*sum, w);
            // w = 128 hi + lo becomes lo + 256 hi: the two 7-bit halves as
            // the two bytes of a word.
            let w = _mm512_add_epi32(w, _mm512_and_si512(w, high_half));
            let halves = _mm256_shuffle_epi8(_mm512_cvtepi32_epi16(w), split);
            // SAFETY: a `TileWeightBytes` holds 32 bytes.
            unsafe { _mm256_storeu_si256(bytes.as_mut_ptr().cast(), halves) };
        }
    }

    let mut high = [[_mm512_setzero_si512(); 2]; H];
    let mut low = [[_mm512_setzero_si512(); 2]; H];
    for (t, bytes) in bytes[..tiles].iter().enumerate() {
        next.prefetch((b + 1) * tiles + t);
        let block = &values[t * blocks + b];
        for p in 0..4 {
            let c = [0, 1].map(|half| {
                // SAFETY: qs holds 512 bytes; 128 p + 64 half + 64 <= 512.
                unsafe { _mm512_loadu_si512(block.qs.as_ptr().add(128 * p + 64 * half).cast()) }
            });
            for ((high, low), bytes) in high.iter_mut().zip(low.iter_mut()).zip(bytes.iter()) {
                let lo = _mm512_set1_epi32(four_bytes(bytes, quad_lo(p)));
                let hi = _mm512_set1_epi32(four_bytes(bytes, quad_lo(p) + 8));
                for half in 0..2 {
                    high[half] = _mm512_dpbusd_epi32(high[half], c[half], hi);
                    low[half] = _mm512_dpbusd_epi32(low[half], c[half], lo);
                }
            }
        }
    }
    for (h, row) in rows.iter_mut().enumerate() {
        let from_code = to_from[h].1;
        let mut lanes = [0i32; 16];
        // SAFETY: `lanes` holds 16 i32.
        unsafe { _mm512_storeu_si512(lanes.as_mut_ptr().cast(), code_sums[h]) };
        // At most 16383 · 512: no overflow.
        let sum: i32 = lanes.iter().sum();
        let excess = _mm512_set1_epi32(sum * TILE_CODE_OFFSET);
        for half in 0..2 {
            let total = _mm512_add_epi32(_mm512_slli_epi32::<7>(high[h][half]), low[h][half]);
            let total = _mm512_sub_epi32(total, excess);
            let o = _mm512_mul_ps(_mm512_cvtepi32_ps(total), _mm512_set1_ps(from_code));
            let at = Q8_0_VALUES * b + 16 * half;
            // SAFETY: out holds hd = 32 · blocks floats; at + 16 <= hd.
            unsafe { _mm512_storeu_ps(row.out[at..at + 16].as_mut_ptr(), o) };
        }
    }
}

/// `scalar::attention::attend_head_q8_0` for each of H heads sharing keys
/// and values: scores 16 keys (a tile) at a time, then the AVX2 softmax,
/// then one block (32 outputs) per pass over the value tiles.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
fn heads_chunk_q8_0<const H: usize>(
    rows: &mut [HeadRows<'_, BlockQ8_0>; H],
    keys: &[KeyTileBlock],
    values: &[ValueTileBlock],
    hd: usize,
    scaling: f32,
    next_chunk: (&[KeyTileBlock], &[ValueTileBlock]),
) {
    let blocks = hd / Q8_0_VALUES;
    assert!(blocks >= 1 && blocks * Q8_0_VALUES == hd);
    let tiles = keys.len() / blocks;
    let next = NextChunkLines::new(next_chunk, (blocks + 1) * tiles);
    scores_q8_0(rows, keys, blocks, scaling, &next);
    for row in rows.iter_mut() {
        *row.stats = softmax_weights(row.scores);
    }
    // Each block's weight codes, tile by tile: one buffer for every block.
    let mut bytes: [[TileWeightBytes; H]; MAX_TILES] = [[[0; 2 * TILE_POSITIONS]; H]; MAX_TILES];
    for b in 0..blocks {
        value_sums_q8_0::<H>(rows, values, blocks, b, &next, &mut bytes);
    }
}

/// Loads of cached f32 or F16 values as 16 f32 lanes.
pub trait Load16: Sized {
    /// 16 consecutive values from `p`.
    ///
    /// # Safety
    /// `p` points at 16 readable elements; the CPU has AVX-512 F and F16C.
    unsafe fn load16(p: *const Self) -> __m512;

    /// Eight values from `a` in lanes 0..8, eight from `b` in lanes 8..16.
    ///
    /// # Safety
    /// `a` and `b` each point at 8 readable elements; the CPU has AVX-512 F and F16C.
    unsafe fn load8x2(a: *const Self, b: *const Self) -> __m512;
}

impl Load16 for f32 {
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> __m512 {
        // SAFETY: per the trait's contract.
        unsafe { _mm512_loadu_ps(p) }
    }

    #[inline(always)]
    unsafe fn load8x2(a: *const f32, b: *const f32) -> __m512 {
        // SAFETY: per the trait's contract.
        unsafe {
            let low = _mm512_castps_pd(_mm512_castps256_ps512(_mm256_loadu_ps(a)));
            let high = _mm256_castps_pd(_mm256_loadu_ps(b));
            _mm512_castpd_ps(_mm512_insertf64x4::<1>(low, high))
        }
    }
}

impl Load16 for F16 {
    #[inline(always)]
    unsafe fn load16(p: *const F16) -> __m512 {
        // SAFETY: per the trait's contract; F16 is a transparent u16.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
    }

    #[inline(always)]
    unsafe fn load8x2(a: *const F16, b: *const F16) -> __m512 {
        // SAFETY: per the trait's contract; F16 is a transparent u16.
        unsafe {
            let low = _mm256_castsi128_si256(_mm_loadu_si128(a.cast()));
            _mm512_cvtph_ps(_mm256_inserti128_si256::<1>(low, _mm_loadu_si128(b.cast())))
        }
    }
}

/// `scalar::attention::attend_chunk` over f32 or F16 keys and values whose
/// head_dim is a multiple of 16, heads four at a time (`heads_chunk_float`).
///
/// `isa`: the AVX-512 path that runs it, as the call counts name it.
///
/// # Safety
/// The CPU must support AVX-512 F and VL, AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl")]
pub(crate) unsafe fn attend_chunk_float<T: KvElement>(isa: Isa, group: &mut HeadGroup<'_, T>) {
    counts::enter(isa);
    assert!(group.head_dim().is_multiple_of(16));
    let next_chunk = group.next_chunk();
    heads_by_four!(group, heads_chunk_float, next_chunk);
}

/// The high 256 bits of `v` (AVX-512 F, where `vextractf32x8` needs DQ).
#[inline]
#[target_feature(enable = "avx512f")]
fn high_half(v: __m512) -> __m256 {
    _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)))
}

/// Scores of keys j..j + 2P for H heads (H <= 4), as `scalar::attention::dot`
/// times `scaling`: key pair p (keys j + 2p and j + 2p + 1) in one vector,
/// the first key's eight lanes in 0..8 and the second's in 8..16, so each
/// lane runs the very chain of fused multiply-adds that lane of the scalar
/// dot does (eight inputs on per step), with half the instructions of eight
/// lanes a vector. Each head's eight query values are broadcast to both
/// halves once for the P pairs; the sums are reduced by the AVX2 path's
/// tree, one 256-bit half at a time.
///
/// # Safety
/// The CPU must support AVX-512 F and VL, AVX2, FMA and F16C; keys j..j + 2P
/// exist; each q row holds hd values; hd is a multiple of 8.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl")]
unsafe fn score_pairs<T: KvElement, const H: usize, const P: usize>(
    rows: &mut [HeadRows<'_>; H],
    keys: &[T],
    hd: usize,
    scaling: f32,
    j: usize,
) {
    let kp = keys.as_ptr();
    let mut acc = [[_mm512_setzero_ps(); P]; H];
    for c in (0..hd).step_by(8) {
        let mut kv = [_mm512_setzero_ps(); P];
        for (p, kv) in kv.iter_mut().enumerate() {
            let first = j + 2 * p;
            // SAFETY: keys j + 2p and j + 2p + 1 exist (the contract), c + 8 <= hd.
            *kv = unsafe { T::load8x2(kp.add(first * hd + c), kp.add((first + 1) * hd + c)) };
        }
        for (row, acc_h) in rows.iter().zip(acc.iter_mut()) {
            // SAFETY: c + 8 <= hd values of the head's q row.
            let q8 = unsafe { _mm256_loadu_ps(row.q.as_ptr().add(c)) };
            let qv = _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(q8)));
            for (acc_hp, &kv) in acc_h.iter_mut().zip(&kv) {
                *acc_hp = _mm512_fmadd_ps(qv, kv, *acc_hp);
            }
        }
    }
    let scale = _mm256_set1_ps(scaling);
    for p in 0..P {
        let first = j + 2 * p;
        if H == 4 {
            // Eight sums at once: reduce8's lane i is the sum of its input
            // [0 2 4 6 1 3 5 7][i], input 2h + u being head h, key first + u.
            let mut halves = [_mm256_setzero_ps(); 8];
            for (h, acc_h) in acc.iter().enumerate() {
                halves[2 * h] = _mm512_castps512_ps256(acc_h[p]);
                halves[2 * h + 1] = high_half(acc_h[p]);
            }
            let sums = reduce8(halves);
            let mut lanes = [0.0f32; 8];
            // SAFETY: `lanes` holds 8 floats.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_mul_ps(sums, scale)) };
            for (h, row) in rows.iter_mut().enumerate() {
                row.scores[first] = lanes[h];
                row.scores[first + 1] = lanes[4 + h];
            }
        } else {
            for (row, acc_h) in rows.iter_mut().zip(&acc) {
                let pair = acc_h[p];
                row.scores[first] = reduce(_mm512_castps512_ps256(pair)) * scaling;
                row.scores[first + 1] = reduce(high_half(pair)) * scaling;
            }
        }
    }
}

/// out_h[d..d + 16B] = Σ_j e_h[j] v_j[d..d + 16B] for H heads, as
/// `scalar::attention::attend_head`'s value sums: each output its own
/// chain of fused multiply-adds in key order, 16 outputs a vector; each
/// value row loaded (and widened) once for all heads. The pass also asks
/// for its share of the next chunk's keys and values (`next`, into L2): slot
/// `pass · n + j` at key j.
///
/// # Safety
/// The CPU must support AVX-512 F and VL, AVX2, FMA and F16C; `values` is [n, hd]
/// with n the heads' score count; d + 16B <= hd.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl")]
unsafe fn value_sums<T: KvElement, const H: usize, const B: usize>(
    rows: &mut [HeadRows<'_>; H],
    values: &[T],
    hd: usize,
    d: usize,
    next: &NextChunkLines<'_, T, T>,
    pass: usize,
) {
    let n = rows[0].scores.len();
    assert!(values.len() == n * hd && d + 16 * B <= hd);
    let vp = values.as_ptr();
    let weights = weight_rows(rows, n);
    let mut acc = [[_mm512_setzero_ps(); B]; H];
    for j in 0..n {
        next.prefetch(pass * n + j);
        let mut v = [_mm512_setzero_ps(); B];
        for (b, vb) in v.iter_mut().enumerate() {
            // SAFETY: j < n rows of values, d + 16b + 16 <= hd (asserted).
            *vb = unsafe { T::load16(vp.add(j * hd + d + 16 * b)) };
        }
        for (acc_h, &w) in acc.iter_mut().zip(&weights) {
            // SAFETY: j < n, the length of every head's scores (asserted).
            let e = _mm512_set1_ps(unsafe { *w.add(j) });
            for (acc_hb, &vb) in acc_h.iter_mut().zip(&v) {
                *acc_hb = _mm512_fmadd_ps(e, vb, *acc_hb);
            }
        }
    }
    for (row, acc_h) in rows.iter_mut().zip(&acc) {
        for (b, &acc_hb) in acc_h.iter().enumerate() {
            let o = &mut row.out[d + 16 * b..d + 16 * b + 16];
            // SAFETY: `o` holds 16 floats.
            unsafe { _mm512_storeu_ps(o.as_mut_ptr(), acc_hb) };
        }
    }
}

/// Value outputs per pass of `heads_chunk_float` (four vectors a head, so
/// four heads' sums and the value vectors take 21 of the 32 registers).
const VALUE_PASS: usize = 64;

/// `scalar::attention::attend_head` for each of H heads sharing keys and
/// values (f32 or F16, head_dim a multiple of 16): the scores eight keys,
/// then two, at a time (`score_pairs`; a last odd key by the AVX2 step),
/// the chunk's values asked for meanwhile; the softmax as on the q8_0
/// path; then the value sums, 64 outputs a pass (then 16), which ask for
/// the next chunk's keys.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl")]
fn heads_chunk_float<T: KvElement, const H: usize>(
    rows: &mut [HeadRows<'_>; H],
    keys: &[T],
    values: &[T],
    hd: usize,
    scaling: f32,
    next_chunk: (&[T], &[T]),
) {
    let n = keys.len() / hd;
    assert!(hd.is_multiple_of(16) && keys.len() == n * hd && values.len() == n * hd);
    assert!(rows
        .iter()
        .all(|r| r.scores.len() == n && r.q.len() == hd && r.out.len() == hd));
    // While the scores are computed, ask for the value rows too: the
    // weighted sums then read them from cache.
    let row_bytes = hd * std::mem::size_of::<T>();
    let value_bytes = std::mem::size_of_val(values);
    let value_lines = values.as_ptr().cast::<u8>();
    let prefetch_values = |j: usize, keys: usize| {
        for line in 0..(keys * row_bytes).div_ceil(64) {
            // Only a hint (it never faults), at an address inside `values`.
            let at = (j * row_bytes + 64 * line).min(value_bytes - 1);
            _mm_prefetch::<_MM_HINT_T1>(value_lines.wrapping_add(at).cast());
        }
    };
    let mut j = 0;
    while j + 8 <= n {
        prefetch_values(j, 8);
        // SAFETY: keys j..j + 8 exist; q rows hold hd values (asserted).
        unsafe { score_pairs::<T, H, 4>(rows, keys, hd, scaling, j) };
        j += 8;
    }
    while j + 2 <= n {
        prefetch_values(j, 2);
        // SAFETY: keys j, j + 1 exist.
        unsafe { score_pairs::<T, H, 1>(rows, keys, hd, scaling, j) };
        j += 2;
    }
    if j < n {
        // SAFETY: key j exists; hd is whole vectors of 8.
        unsafe { scores_step::<T, H, 1>(rows, keys, hd, scaling, j) };
    }
    for row in rows.iter_mut() {
        *row.stats = softmax_weights(row.scores);
    }
    let passes = hd.div_ceil(VALUE_PASS);
    // Only the next chunk's keys: its values are asked for by its own
    // scores pass, so that each pass asks for as many lines as it reads.
    let next = NextChunkLines::new((next_chunk.0, &next_chunk.1[..0]), passes * n);
    let mut d = 0;
    while d + VALUE_PASS <= hd {
        // SAFETY: values is [n, hd] (asserted), d + 64 <= hd.
        unsafe { value_sums::<T, H, 4>(rows, values, hd, d, &next, d / VALUE_PASS) };
        d += VALUE_PASS;
    }
    while d < hd {
        // SAFETY: as above, d + 16 <= hd (hd a multiple of 16).
        unsafe { value_sums::<T, H, 1>(rows, values, hd, d, &next, d / VALUE_PASS) };
        d += 16;
    }
}
