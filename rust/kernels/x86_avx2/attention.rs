//! AVX2 (with FMA and F16C) attention: `scalar::attention` eight lanes at a
//! time, with the very same floating-point operations in the same order
//! (sums in eight lanes reduced by the same tree, FMAs where the scalar code
//! has `mul_add`, the same polynomial exp), so that the results agree to the
//! bit. Each key and value row is read once for up to four heads.

use std::arch::x86_64::*;

use crate::kernels::attention::{HeadGroup, HeadRows, KvElement, Partial, Q8_0Group, Strided};
use crate::kernels::counts::{self, Isa};
use crate::kernels::half::F16;
use crate::kernels::q8_0::{BlockQ8_0, KeyTileBlock, ValueTileBlock, Q8_0_VALUES, TILE_POSITIONS};
use crate::kernels::scalar::attention::{self as scalar, exp_consts as c};

/// Loads eight cached values as f32.
pub trait Load8: Sized {
    /// # Safety
    /// `p` points at 8 readable elements; the CPU has AVX2 and F16C.
    unsafe fn load8(p: *const Self) -> __m256;
}

impl Load8 for f32 {
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> __m256 {
        // SAFETY: per the trait's contract.
        unsafe { _mm256_loadu_ps(p) }
    }
}

impl Load8 for F16 {
    #[inline(always)]
    unsafe fn load8(p: *const F16) -> __m256 {
        // SAFETY: per the trait's contract; F16 is a transparent u16.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
    }
}

/// Runs `$chunk::<H>(rows, keys, values, hd, scaling, extra..)` over a group's heads,
/// four at a time (H = the heads left, at most 4). A macro, not a generic
/// function: each `$chunk` is its own function with target features.
macro_rules! heads_by_four {
    ($group:expr, $chunk:ident $(, $extra:expr)*) => {{
        let group = $group;
        let (keys, values) = group.keys_values();
        let (hd, heads, scaling) = (group.head_dim(), group.heads(), group.scaling());
        let mut h = 0;
        while h < heads {
            let take = (heads - h).min(4);
            match take {
                4 => $chunk(&mut group.rows::<4>(h), keys, values, hd, scaling $(, $extra)*),
                3 => $chunk(&mut group.rows::<3>(h), keys, values, hd, scaling $(, $extra)*),
                2 => $chunk(&mut group.rows::<2>(h), keys, values, hd, scaling $(, $extra)*),
                _ => $chunk(&mut group.rows::<1>(h), keys, values, hd, scaling $(, $extra)*),
            }
            h += take;
        }
    }};
}
pub(crate) use heads_by_four;

/// The cache lines of the sequence's next chunk (its keys, then its
/// values), which a chunk's passes ask for into L2 a few at a time: `slots`
/// equal shares, taken in turn as the passes go (over q8_0, one per tile of
/// each pass; over float rows, one per key of each value pass), so that the
/// reads are spread over the chunk's arithmetic rather than bunched where
/// they would wait on memory.
pub(crate) struct NextChunkLines<'a, K, V> {
    keys: &'a [K],
    values: &'a [V],
    key_lines: usize,
    lines: usize,
    per_slot: usize,
}

impl<'a, K, V> NextChunkLines<'a, K, V> {
    pub(crate) fn new((keys, values): (&'a [K], &'a [V]), slots: usize) -> Self {
        let key_lines = std::mem::size_of_val(keys).div_ceil(64);
        let lines = key_lines + std::mem::size_of_val(values).div_ceil(64);
        NextChunkLines {
            keys,
            values,
            key_lines,
            lines,
            per_slot: lines.div_ceil(slots.max(1)),
        }
    }

    /// Asks for the lines of share `slot`.
    #[inline(always)]
    pub(crate) fn prefetch(&self, slot: usize) {
        let start = (slot * self.per_slot).min(self.lines);
        for line in start..(start + self.per_slot).min(self.lines) {
            let at = if line < self.key_lines {
                self.keys.as_ptr().cast::<u8>().wrapping_add(64 * line)
            } else {
                let line = line - self.key_lines;
                self.values.as_ptr().cast::<u8>().wrapping_add(64 * line)
            };
            // SAFETY: a prefetch never faults; the address is inside the
            // next chunk's keys or values.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(at.cast()) };
        }
    }
}

/// `scalar::attention::attend_chunk`: heads four at a time.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn attend_chunk<T: KvElement>(group: &mut HeadGroup<'_, T>) {
    counts::enter(Isa::Avx2);
    let next_chunk = group.next_chunk();
    heads_by_four!(group, heads_chunk, next_chunk);
}

#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) fn reduce(v: __m256) -> f32 {
    // (l + l+4), then (l + l+2), then the pair: as `reduce_lanes`.
    let quad = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
    _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps::<1>(pair, pair)))
}

/// `reduce` of eight vectors at once, with the same additions in the
/// same order for each: lane i of the result is the sum of
/// v[[0, 2, 4, 6, 1, 3, 5, 7][i]].
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) fn reduce8(v: [__m256; 8]) -> __m256 {
    // Halves: [v(2p).lo + v(2p).hi | v(2p+1).lo + v(2p+1).hi], i.e. l + l+4.
    let half = |x: __m256, y: __m256| {
        _mm256_add_ps(
            _mm256_permute2f128_ps::<0x20>(x, y),
            _mm256_permute2f128_ps::<0x31>(x, y),
        )
    };
    let (b01, b23, b45, b67) = (
        half(v[0], v[1]),
        half(v[2], v[3]),
        half(v[4], v[5]),
        half(v[6], v[7]),
    );
    // Quarters: l + l+2 within each half.
    let quarter = |x: __m256, y: __m256| {
        _mm256_add_ps(
            _mm256_shuffle_ps::<0b01_00_01_00>(x, y),
            _mm256_shuffle_ps::<0b11_10_11_10>(x, y),
        )
    };
    let (x0123, x4567) = (quarter(b01, b23), quarter(b45, b67));
    // The last pair.
    _mm256_add_ps(
        _mm256_shuffle_ps::<0b10_00_10_00>(x0123, x4567),
        _mm256_shuffle_ps::<0b11_01_11_01>(x0123, x4567),
    )
}

/// `scalar::attention::exp` of eight lanes.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn exp8(x: __m256) -> __m256 {
    let x = _mm256_min_ps(
        _mm256_max_ps(x, _mm256_set1_ps(c::MIN)),
        _mm256_set1_ps(c::MAX),
    );
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(c::LOG2E),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(c::LN2_HI), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(c::LN2_LO), r);
    let mut p = _mm256_set1_ps(c::P[0]);
    for &coef in &c::P[1..] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(coef));
    }
    let y = _mm256_add_ps(
        _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r),
        _mm256_set1_ps(1.0),
    );
    let exponent = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    let e = _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32::<23>(exponent)));
    // 0 at or below MIN (x is clamped: a NaN is MIN by now).
    _mm256_and_ps(e, _mm256_cmp_ps::<_CMP_GT_OQ>(x, _mm256_set1_ps(c::MIN)))
}

/// Scores of keys j..j+K for H heads: each key is loaded (and widened) once
/// for all heads; H·K independent FMA chains.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; keys j..j + K exist; each q row holds hd values.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn scores_step<T: KvElement, const H: usize, const K: usize>(
    rows: &mut [HeadRows<'_>; H],
    keys: &[T],
    hd: usize,
    scaling: f32,
    j: usize,
) {
    let full = hd / 8 * 8;
    let kp = keys.as_ptr();
    let mut acc = [[_mm256_setzero_ps(); K]; H];
    for c in (0..full).step_by(8) {
        let mut kv = [_mm256_setzero_ps(); K];
        for (u, k) in kv.iter_mut().enumerate() {
            // SAFETY: key j + u exists (the contract) and c + 8 <= hd.
            *k = unsafe { T::load8(kp.add((j + u) * hd + c)) };
        }
        for (row, acc_h) in rows.iter().zip(acc.iter_mut()) {
            // SAFETY: c + 8 <= hd values of the head's q row.
            let qv = unsafe { _mm256_loadu_ps(row.q.as_ptr().add(c)) };
            for (u, acc_hu) in acc_h.iter_mut().enumerate() {
                *acc_hu = _mm256_fmadd_ps(qv, kv[u], *acc_hu);
            }
        }
    }
    if H == 4 && K == 2 && full == hd {
        // The usual case (a 2B4T group, head_dim 128): eight sums
        // reduced together, lane i of the result being v(i)'s sum
        // (v(2h + u) = head h, key j + u) in the order [0 2 4 6 1 3 5 7].
        let v = |i: usize| acc[i / 2][i % 2];
        let sums = reduce8([v(0), v(1), v(2), v(3), v(4), v(5), v(6), v(7)]);
        let mut lanes = [0.0f32; 8];
        // SAFETY: `lanes` holds 8 floats.
        unsafe {
            _mm256_storeu_ps(
                lanes.as_mut_ptr(),
                _mm256_mul_ps(sums, _mm256_set1_ps(scaling)),
            )
        };
        for (h, row) in rows.iter_mut().enumerate() {
            row.scores[j] = lanes[h];
            row.scores[j + 1] = lanes[4 + h];
        }
        return;
    }
    for (row, acc_h) in rows.iter_mut().zip(&acc) {
        for (u, &acc_hu) in acc_h.iter().enumerate() {
            let k = &keys[(j + u) * hd..(j + u + 1) * hd];
            let mut total = reduce(acc_hu);
            for (d, kd) in k.iter().enumerate().skip(full) {
                total = row.q[d].mul_add(kd.to_f32(), total);
            }
            row.scores[j + u] = total * scaling;
        }
    }
}

/// `softmax_weights` of any row of numbers (the sampler's logits).
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn softmax_in_place(x: &mut [f32]) -> Partial {
    counts::enter(Isa::Avx2);
    softmax_weights(x)
}

/// exp(s - max) over one head's scores, in place; returns the max and their sum.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) fn softmax_weights(scores: &mut [f32]) -> Partial {
    let max = largest_score(scores);
    softmax_from(scores, 0, max, _mm256_setzero_ps())
}

/// The largest of one head's scores as `softmax_weights` takes it: eight
/// lanes of `maxps` in order, then the last n % 8.
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) fn largest_score(scores: &[f32]) -> f32 {
    let full_n = scores.len() / 8 * 8;
    let mut max8 = _mm256_set1_ps(f32::NEG_INFINITY);
    for c in (0..full_n).step_by(8) {
        // SAFETY: c + 8 <= n.
        max8 = _mm256_max_ps(max8, unsafe { _mm256_loadu_ps(scores.as_ptr().add(c)) });
    }
    let mut lanes = [0.0f32; 8];
    // SAFETY: `lanes` holds 8 floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), max8) };
    lanes
        .iter()
        .chain(&scores[full_n..])
        .fold(f32::NEG_INFINITY, |m, &s| m.max(s))
}

/// The rest of `softmax_weights` from score `from` (a multiple of 8) on,
/// the weights before it already made and summed into `sum8`: eight at a
/// time, each eight added into `sum8` in turn, then the last n % 8.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) fn softmax_from(scores: &mut [f32], from: usize, max: f32, mut sum8: __m256) -> Partial {
    let full_n = scores.len() / 8 * 8;
    assert!(from.is_multiple_of(8) && from <= full_n);
    let max8 = _mm256_set1_ps(max);
    for c in (from..full_n).step_by(8) {
        // SAFETY: c + 8 <= n.
        unsafe {
            let p = scores.as_mut_ptr().add(c);
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p), max8));
            _mm256_storeu_ps(p, e);
            sum8 = _mm256_add_ps(sum8, e);
        }
    }
    let mut total = reduce(sum8);
    for s in &mut scores[full_n..] {
        *s = scalar::exp(*s - max);
        total += *s;
    }
    Partial { max, sum: total }
}

/// Each head's softmax weights (its scores row, checked to hold n) as a
/// pointer, for the value sums' loads by key index.
#[inline(always)]
pub(crate) fn weight_rows<const H: usize>(rows: &[HeadRows<'_>; H], n: usize) -> [*const f32; H] {
    rows.each_ref().map(|row| {
        assert_eq!(row.scores.len(), n);
        row.scores.as_ptr()
    })
}

/// out_h[d..d+8B] = Σ_j e_h[j] v_j[d..d+8B]: each value row is loaded (and
/// widened) once for all heads.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `values` is [n, hd] with n the
/// heads' score count; d + 8B <= hd.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn values_step<T: KvElement, const H: usize, const B: usize>(
    rows: &mut [HeadRows<'_>; H],
    values: &[T],
    hd: usize,
    d: usize,
    next: &NextChunkLines<'_, T, T>,
    pass: usize,
) {
    let n = rows[0].scores.len();
    let vp = values.as_ptr();
    let weights = weight_rows(rows, n);
    let mut acc = [[_mm256_setzero_ps(); B]; H];
    for j in 0..n {
        next.prefetch(pass * n + j);
        let mut v = [_mm256_setzero_ps(); B];
        for (b, vb) in v.iter_mut().enumerate() {
            // SAFETY: j < n rows of values, d + 8b + 8 <= hd.
            *vb = unsafe { T::load8(vp.add(j * hd + d + 8 * b)) };
        }
        for (acc_h, &w) in acc.iter_mut().zip(&weights) {
            // SAFETY: j < n, the length of every head's scores (asserted).
            let e = unsafe { _mm256_broadcast_ss(&*w.add(j)) };
            for (b, acc_hb) in acc_h.iter_mut().enumerate() {
                *acc_hb = _mm256_fmadd_ps(e, v[b], *acc_hb);
            }
        }
    }
    for (row, acc_h) in rows.iter_mut().zip(&acc) {
        for (b, &acc_hb) in acc_h.iter().enumerate() {
            let o = &mut row.out[d + 8 * b..d + 8 * b + 8];
            // SAFETY: `o` holds 8 floats.
            unsafe { _mm256_storeu_ps(o.as_mut_ptr(), acc_hb) };
        }
    }
}

/// `scalar::attention::attend_head` for each of H heads sharing keys and
/// values, eight lanes at a time.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn heads_chunk<T: KvElement, const H: usize>(
    rows: &mut [HeadRows<'_>; H],
    keys: &[T],
    values: &[T],
    hd: usize,
    scaling: f32,
    next_chunk: (&[T], &[T]),
) {
    let n = keys.len() / hd;
    assert!(keys.len() == n * hd && values.len() == n * hd);
    assert!(rows
        .iter()
        .all(|r| r.scores.len() == n && r.q.len() == hd && r.out.len() == hd));
    let full = hd / 8 * 8;

    // While the scores are computed, ask for the value rows too: the
    // weighted sum then reads them from cache, not from memory slice by slice.
    let value_bytes = std::mem::size_of_val(values);
    let value_lines = values.as_ptr().cast::<u8>();
    let lines_per_pair = (2 * hd * std::mem::size_of::<T>()).div_ceil(64);
    let mut j = 0;
    while j + 2 <= n {
        for line in 0..lines_per_pair {
            let at = (j * hd * std::mem::size_of::<T>() + 64 * line).min(value_bytes - 1);
            _mm_prefetch::<_MM_HINT_T1>(value_lines.wrapping_add(at).cast());
        }
        // SAFETY: keys j and j + 1 exist; q rows hold hd values (asserted).
        unsafe { scores_step::<T, H, 2>(rows, keys, hd, scaling, j) };
        j += 2;
    }
    if j < n {
        // SAFETY: key j exists.
        unsafe { scores_step::<T, H, 1>(rows, keys, hd, scaling, j) };
    }

    for row in rows.iter_mut() {
        *row.stats = softmax_weights(row.scores);
    }

    // Σ e_j v_j, 16 outputs per pass over the chunk's value rows
    // (prefetched above: at most a chunk of rows, in cache), then the
    // last hd % 8 one by one.
    // Meanwhile, ask for the next chunk's keys (its values come with its
    // own scores), spread over the passes: pass p's key j takes slot p·n + j.
    let next = NextChunkLines::new((next_chunk.0, &next_chunk.1[..0]), full.div_ceil(16) * n);
    let mut d = 0;
    while d + 16 <= full {
        // SAFETY: values is [n, hd] (asserted), d + 16 <= hd.
        unsafe { values_step::<T, H, 2>(rows, values, hd, d, &next, d / 16) };
        d += 16;
    }
    if d < full {
        // SAFETY: as above, d + 8 <= hd.
        unsafe { values_step::<T, H, 1>(rows, values, hd, d, &next, d / 16) };
    }
    for row in rows.iter_mut() {
        for d in full..hd {
            let mut acc = 0.0f32;
            for (j, &e) in row.scores.iter().enumerate() {
                acc = e.mul_add(values[j * hd + d].to_f32(), acc);
            }
            row.out[d] = acc;
        }
    }
}

/// `scalar::attention::attend_chunk_q8_0`: heads four at a time.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn attend_chunk_q8_0(group: &mut Q8_0Group<'_>) {
    counts::enter(Isa::Avx2);
    heads_by_four!(group, heads_chunk_q8_0);
}

/// Four query codes (4 g..4 g + 4 of a block) as one i32, to broadcast.
#[inline(always)]
pub(crate) fn query_group(q: &BlockQ8_0, g: usize) -> i32 {
    let c = &q.qs[4 * g..4 * g + 4];
    i32::from_le_bytes([c[0] as u8, c[1] as u8, c[2] as u8, c[3] as u8])
}

/// Scores of the eight keys in half `half` of a tile (`tile`: its blocks,
/// [hd / 32]) for H heads, lane u being key 8 half + u: each head
/// accumulates `(d_q[b] · d_k[b]) · dot_b` by fused multiply-adds in block
/// order, as `scalar::attention::score_q8_0`; returns them times `scaling`.
///
/// Each 32 bytes of codes are four codes of the eight keys: `maddubs`
/// multiplies unsigned by signed bytes, so q · k is taken as
/// |k| · (q with k's sign), and `madd` sums each key's four products. Codes
/// lie in [-127, 127] (a lane past the keys may read -128), so a pair of
/// products is at most 2 · 128 · 127 = 32512: the 16-bit sums do not
/// saturate, and the 32-bit ones are exact (|dot| <= 32 · 128 · 127).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn scores8_q8_0<const H: usize>(
    rows: &[HeadRows<'_, BlockQ8_0>; H],
    tile: &[KeyTileBlock],
    half: usize,
    scaling: f32,
) -> [__m256; H] {
    assert!(half < 2 && rows.iter().all(|r| r.q.len() == tile.len()));
    let ones = _mm256_set1_epi16(1);
    let flip = _mm256_set1_epi8(i8::MIN);
    let mut acc = [_mm256_setzero_ps(); H];
    for (b, kb) in tile.iter().enumerate() {
        let scales = &kb.d[8 * half..8 * half + 8];
        // SAFETY: `scales` holds 8 halves (16 bytes).
        let dk = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(scales.as_ptr().cast()) });
        let mut dots = [_mm256_setzero_si256(); H];
        for g in 0..Q8_0_VALUES / 4 {
            let codes = &kb.qs[64 * g + 32 * half..64 * g + 32 * half + 32];
            // SAFETY: `codes` holds 32 bytes. Stored as k + 128: back to k.
            let k = _mm256_xor_si256(unsafe { _mm256_loadu_si256(codes.as_ptr().cast()) }, flip);
            let k_abs = _mm256_abs_epi8(k);
            for (row, dot) in rows.iter().zip(dots.iter_mut()) {
                let q4 = _mm256_set1_epi32(query_group(&row.q[b], g));
                let products = _mm256_maddubs_epi16(k_abs, _mm256_sign_epi8(q4, k));
                *dot = _mm256_add_epi32(*dot, _mm256_madd_epi16(products, ones));
            }
        }
        for ((row, acc_h), &dot) in rows.iter().zip(acc.iter_mut()).zip(&dots) {
            let dq = _mm256_cvtph_ps(_mm_set1_epi16(row.q[b].d.0 as i16));
            let w = _mm256_mul_ps(dq, dk);
            *acc_h = _mm256_fmadd_ps(w, _mm256_cvtepi32_ps(dot), *acc_h);
        }
    }
    acc.map(|a| _mm256_mul_ps(a, _mm256_set1_ps(scaling)))
}

/// The softmax weights e_j of the tile's 16 lanes from t·16, as two
/// vectors; lanes past `scores` (a partial last tile) are 0.
#[inline]
#[target_feature(enable = "avx2")]
fn tile_weights(scores: &[f32], t: usize) -> [__m256; 2] {
    let from = t * TILE_POSITIONS;
    let mut padded = [0.0f32; TILE_POSITIONS];
    let lanes = match scores.get(from..from + TILE_POSITIONS) {
        Some(whole) => whole,
        None => {
            let rest = &scores[from..];
            padded[..rest.len()].copy_from_slice(rest);
            &padded[..]
        }
    };
    // SAFETY: `lanes` holds 16 floats.
    unsafe {
        [
            _mm256_loadu_ps(lanes.as_ptr()),
            _mm256_loadu_ps(lanes.as_ptr().add(8)),
        ]
    }
}

/// The 16 scales of a value tile block, as f32.
#[inline]
#[target_feature(enable = "avx2,f16c")]
fn tile_scales(block: &ValueTileBlock) -> [__m256; 2] {
    // SAFETY: d holds 16 halves (32 bytes).
    let d = unsafe { _mm256_loadu_si256(block.d.as_ptr().cast()) };
    [
        _mm256_cvtph_ps(_mm256_castsi256_si128(d)),
        _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(d)),
    ]
}

/// Tiles of a chunk at most (`scalar::attention::MAX_VALUE_SUM_POSITIONS`).
pub(crate) const MAX_TILES: usize =
    crate::kernels::scalar::attention::MAX_VALUE_SUM_POSITIONS / TILE_POSITIONS;

/// One tile's weight codes for one head, position by position.
type TileWeights = [i16; TILE_POSITIONS];

/// For block b of the values and H heads, `scalar::attention::value_sums_q8_0`'s
/// weight codes: each head's largest weight e_j · d_v[j, b] gives its
/// `weight_scales`; every tile's codes go to `weights` ([tiles, H]).
/// Returns each head's from_code.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn weight_codes_q8_0<const H: usize>(
    rows: &[HeadRows<'_, BlockQ8_0>; H],
    values: &[ValueTileBlock], // [n / 16 rounded up, blocks]
    blocks: usize,
    b: usize,
    weights: &mut [[TileWeights; H]; MAX_TILES],
) -> [f32; H] {
    let n = rows[0].scores.len();
    let tiles = n.div_ceil(TILE_POSITIONS);
    assert!(b < blocks && values.len() == tiles * blocks && tiles <= MAX_TILES);
    assert!(rows.iter().all(|r| r.scores.len() == n));
    let mut top = [_mm256_setzero_ps(); H];
    for t in 0..tiles {
        let d = tile_scales(&values[t * blocks + b]);
        for (row, top) in rows.iter().zip(top.iter_mut()) {
            let e = tile_weights(row.scores, t);
            for k in 0..2 {
                // maxps(w, top) is top when w is a NaN: `larger_weight`.
                *top = _mm256_max_ps(_mm256_mul_ps(e[k], d[k]), *top);
            }
        }
    }
    let scales = top.map(|top| {
        let mut lanes = [0.0f32; 8];
        // SAFETY: `lanes` holds 8 floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), top) };
        scalar::weight_scales_of_maxima(&lanes)
    });
    let (zero, max) = (
        _mm256_setzero_ps(),
        _mm256_set1_ps(scalar::WEIGHT_CODE_MAX as f32),
    );
    for (t, weights) in weights[..tiles].iter_mut().enumerate() {
        let d = tile_scales(&values[t * blocks + b]);
        for ((weights, row), &(to_code, _)) in weights.iter_mut().zip(rows.iter()).zip(&scales) {
            let e = tile_weights(row.scores, t);
            let [a, c] = [0, 1].map(|k| {
                let x = _mm256_mul_ps(_mm256_mul_ps(e[k], d[k]), _mm256_set1_ps(to_code));
                // maxps(x, 0) is 0 for a NaN x, as f32::max.
                _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(x, zero), max))
            });
            // Codes fit i16; the pack interleaves 128-bit lanes, the permute
            // puts positions back in order.
            let words = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(a, c));
            // SAFETY: a `TileWeights` holds 32 bytes.
            unsafe { _mm256_storeu_si256(weights.as_mut_ptr().cast(), words) };
        }
    }
    scales.map(|(_, from_code)| from_code)
}

/// out_h[32 b..32 b + 32] for H heads: `scalar::attention::value_sums_q8_0`
/// of block b, eight outputs per pass over the tiles. Eight outputs of four
/// positions are 32 bytes of a tile: the codes (the stored c + 128 back to
/// c) widened to i16, then `madd` against the four positions' weight codes
/// (a 64-bit broadcast) adds two products into each 32-bit lane, two lanes
/// per output, summed pairwise at the end: exact in i32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn value_sums_q8_0<const H: usize>(
    rows: &mut [HeadRows<'_, BlockQ8_0>; H],
    values: &[ValueTileBlock],
    blocks: usize,
    b: usize,
    weights: &mut [[TileWeights; H]; MAX_TILES],
) {
    let n = rows[0].scores.len();
    let tiles = n.div_ceil(TILE_POSITIONS);
    let from_code = weight_codes_q8_0(rows, values, blocks, b, weights);
    let flip = _mm256_set1_epi8(i8::MIN);
    for k in 0..Q8_0_VALUES / 8 {
        let mut acc = [[_mm256_setzero_si256(); 2]; H];
        for (t, weights) in weights[..tiles].iter().enumerate() {
            let block = &values[t * blocks + b];
            for p in 0..4 {
                // SAFETY: 128 p + 32 k + 32 <= 512 bytes of qs.
                let stored =
                    unsafe { _mm256_loadu_si256(block.qs.as_ptr().add(128 * p + 32 * k).cast()) };
                let c = _mm256_xor_si256(stored, flip);
                let c = [
                    _mm256_cvtepi8_epi16(_mm256_castsi256_si128(c)),
                    _mm256_cvtepi8_epi16(_mm256_extracti128_si256::<1>(c)),
                ];
                for (acc, weights) in acc.iter_mut().zip(weights.iter()) {
                    let w = &weights[4 * p..4 * p + 4];
                    let w = _mm256_set1_epi64x(
                        (i64::from(w[0] as u16))
                            | (i64::from(w[1] as u16) << 16)
                            | (i64::from(w[2] as u16) << 32)
                            | (i64::from(w[3] as u16) << 48),
                    );
                    for (a, &c) in acc.iter_mut().zip(&c) {
                        *a = _mm256_add_epi32(*a, _mm256_madd_epi16(c, w));
                    }
                }
            }
        }
        for ((row, acc), &from_code) in rows.iter_mut().zip(&acc).zip(&from_code) {
            // Lanes 2i and 2i + 1 hold output i's two halves: summed
            // pairwise, then the 64-bit pairs put back in order.
            let sums = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_hadd_epi32(acc[0], acc[1]));
            let o = _mm256_mul_ps(_mm256_cvtepi32_ps(sums), _mm256_set1_ps(from_code));
            let at = Q8_0_VALUES * b + 8 * k;
            // SAFETY: out holds hd = 32 · blocks floats; at + 8 <= hd.
            unsafe { _mm256_storeu_ps(row.out[at..at + 8].as_mut_ptr(), o) };
        }
    }
}

/// `scalar::attention::attend_head_q8_0` for each of H heads sharing keys
/// and values: scores eight keys (half a tile) at a time, 16 outputs per
/// pass over the value rows.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn heads_chunk_q8_0<const H: usize>(
    rows: &mut [HeadRows<'_, BlockQ8_0>; H],
    keys: &[KeyTileBlock],
    values: &[ValueTileBlock],
    hd: usize,
    scaling: f32,
) {
    let blocks = hd / Q8_0_VALUES;
    let n = rows[0].scores.len();
    let tiles = n.div_ceil(TILE_POSITIONS) * blocks;
    assert!(blocks >= 1 && blocks * Q8_0_VALUES == hd);
    assert!(keys.len() == tiles && values.len() == tiles);
    assert!(rows
        .iter()
        .all(|r| r.scores.len() == n && r.q.len() == blocks && r.out.len() == hd));

    // While the scores are computed, ask for the value tiles too (as
    // `heads_chunk`): eight positions' share of them per step.
    let value_bytes = std::mem::size_of_val(values);
    let value_lines = values.as_ptr().cast::<u8>();
    let lines_per_half = (value_bytes / n.div_ceil(TILE_POSITIONS) / 2).div_ceil(64);
    for j in (0..n).step_by(8) {
        for line in 0..lines_per_half {
            let at = (j / 8 * lines_per_half * 64 + 64 * line).min(value_bytes - 1);
            _mm_prefetch::<_MM_HINT_T1>(value_lines.wrapping_add(at).cast());
        }
        let tile = &keys[j / TILE_POSITIONS * blocks..][..blocks];
        let scores = scores8_q8_0::<H>(rows, tile, j % TILE_POSITIONS / 8, scaling);
        // Lanes past the last key (of a partial tile) are dropped.
        let take = (n - j).min(8);
        for (row, &s) in rows.iter_mut().zip(&scores) {
            let mut lanes = [0.0f32; 8];
            // SAFETY: `lanes` holds 8 floats.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), s) };
            row.scores[j..j + take].copy_from_slice(&lanes[..take]);
        }
    }

    for row in rows.iter_mut() {
        *row.stats = softmax_weights(row.scores);
    }

    // Each block's weight codes, tile by tile: one buffer for every block.
    let mut weights = [[[0i16; TILE_POSITIONS]; H]; MAX_TILES];
    for b in 0..blocks {
        value_sums_q8_0::<H>(rows, values, blocks, b, &mut weights);
    }
}

/// `scalar::attention::merge`, compiled with FMA so that each `mul_add` is
/// one instruction (the same result as the scalar path's).
///
/// # Safety
/// The CPU must support FMA.
#[target_feature(enable = "fma")]
pub(crate) unsafe fn merge(
    heads: usize,
    hd: usize,
    partial_out: &[f32],
    stats: &[Partial],
    out: Strided<'_>,
) {
    counts::enter(Isa::Avx2);
    scalar::merge(heads, hd, partial_out, stats, out)
}
