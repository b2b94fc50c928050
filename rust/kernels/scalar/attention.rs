//! Attention of one head over one chunk of keys, and the merge of chunks:
//! the definitions the SIMD paths reproduce bit for bit. Sums are kept in
//! eight lanes and reduced by a fixed tree, the exponential is a fixed
//! polynomial, and products are fused multiply-adds (`mul_add`), so that a
//! vector version can perform exactly these operations in this order.

use crate::kernels::attention::{HeadGroup, KvElement, Partial, Q8_0Group, Strided};
use crate::kernels::q8_0::{BlockQ8_0, KeyTileBlock, ValueTileBlock, Q8_0_VALUES, TILE_POSITIONS};
use crate::kernels::scalar::q8_0::tile_dot;

/// Cephes' single-precision exp: `x = n ln2 + r`, |r| <= ln2 / 2, a degree-5
/// polynomial for exp(r) - 1 - r, then a scaling by 2^n. Within 2 ulp of the
/// true value on (-64, 88]; inputs above are clamped to 88, and at or below
/// -64 (and NaN) the result is 0.
///
/// Why 0 below e^-64 (1.6e-28): these are softmax weights beside the
/// largest, 1, where no sum at f32's precision can tell them from 0, while
/// their products with the cache's values (an f16 value or scale is at
/// least 2^-24) would be subnormal numbers, which x86 cores multiply by
/// microcode assists of a hundred cycles or more. Every weight kept is at
/// least 2^-92, so those products stay normal. At depth most keys of a
/// peaked head fall below the cut.
pub mod exp_consts {
    pub const MIN: f32 = -64.0;
    pub const MAX: f32 = 88.0;
    pub const LOG2E: f32 = std::f32::consts::LOG2_E;
    pub const LN2_HI: f32 = 0.693_359_4;
    pub const LN2_LO: f32 = -2.121_944_4e-4;
    pub const P: [f32; 6] = [
        1.987_569_1e-4,
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ];
}

use exp_consts as c;

/// Sum of eight lanes in the order `_mm256` code reduces them:
/// halves first (l + l+4), then quarters, then the last pair.
#[inline(always)]
pub fn reduce_lanes(a: [f32; 8]) -> f32 {
    let b = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    let c = [b[0] + b[2], b[1] + b[3]];
    c[0] + c[1]
}

/// exp(x) as the SIMD paths compute it, lane by lane.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // Not `clamp`: a NaN becomes MIN here, as `vmaxps` makes it.
    #[allow(clippy::manual_clamp)]
    let x = x.max(c::MIN).min(c::MAX);
    let n = (x * c::LOG2E).round_ties_even();
    let r = (-n).mul_add(c::LN2_HI, x);
    let r = (-n).mul_add(c::LN2_LO, r);
    let mut p = c::P[0];
    for &coef in &c::P[1..] {
        p = p.mul_add(r, coef);
    }
    let y = p.mul_add(r * r, r) + 1.0;
    let e = y * f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x > c::MIN {
        e
    } else {
        0.0
    }
}

/// Σ_d q[d] · k[d]: eight lanes of fused multiply-adds, reduced, then
/// the last hd % 8 products one by one.
#[inline(always)]
pub fn dot<T: KvElement>(q: &[f32], k: &[T]) -> f32 {
    let full = q.len() / 8 * 8;
    let mut acc = [0.0f32; 8];
    for c in (0..full).step_by(8) {
        for l in 0..8 {
            acc[l] = q[c + l].mul_add(k[c + l].to_f32(), acc[l]);
        }
    }
    let mut total = reduce_lanes(acc);
    for d in full..q.len() {
        total = q[d].mul_add(k[d].to_f32(), total);
    }
    total
}

/// Σ x in eight lanes, reduced, then the tail.
#[inline(always)]
pub fn sum(x: &[f32]) -> f32 {
    let full = x.len() / 8 * 8;
    let mut acc = [0.0f32; 8];
    for c in (0..full).step_by(8) {
        for l in 0..8 {
            acc[l] += x[c + l];
        }
    }
    let mut total = reduce_lanes(acc);
    for &v in &x[full..] {
        total += v;
    }
    total
}

/// The definition of one head's partial over one chunk of keys: the scores
/// `s_j = q · k_j · scaling` (in `scores`, then replaced by exp(s_j - max)),
/// `out = Σ_j exp(s_j - max) v_j`; returns (max, Σ_j exp(s_j - max)).
pub fn attend_head<T: KvElement>(
    q: &[f32],    // [hd]
    keys: &[T],   // [n, hd]
    values: &[T], // [n, hd]
    scaling: f32,
    scores: &mut [f32], // [n]
    out: &mut [f32],    // [hd]
) -> Partial {
    let hd = q.len();
    let n = keys.len() / hd;
    let scores = &mut scores[..n];
    for (j, s) in scores.iter_mut().enumerate() {
        *s = dot(q, &keys[j * hd..(j + 1) * hd]) * scaling;
    }
    let partial = softmax_weights(scores);
    for (d, o) in out.iter_mut().enumerate() {
        let mut acc = 0.0f32;
        for (j, &e) in scores.iter().enumerate() {
            acc = e.mul_add(values[j * hd + d].to_f32(), acc);
        }
        *o = acc;
    }
    partial
}

/// Scores to softmax weights in place: s_j becomes exp(s_j - max); returns
/// (max, Σ_j exp(s_j - max)).
#[inline(always)]
pub fn softmax_weights(scores: &mut [f32]) -> Partial {
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    for s in scores.iter_mut() {
        *s = exp(*s - max);
    }
    Partial {
        max,
        sum: sum(scores),
    }
}

/// The score of key u of a tile (`tile`: its hd / 32 blocks) over q8_0
/// blocks: `Σ_b (d_q[b] · d_k[b]) · (q_b · k_b)`, each block's dot an exact
/// integer (`tile_dot`), fused multiply-adds in block order, then times
/// `scaling`.
#[inline(always)]
pub fn score_q8_0(q: &[BlockQ8_0], tile: &[KeyTileBlock], u: usize, scaling: f32) -> f32 {
    let mut acc = 0.0f32;
    for (qb, kb) in q.iter().zip(tile) {
        let w = qb.d.to_f32() * kb.d[u].to_f32();
        acc = w.mul_add(tile_dot(qb, kb, u) as f32, acc);
    }
    acc * scaling
}

/// The largest code of a weight in the value sums over q8_0: 14 bits, two
/// 7-bit halves that are each a signed byte, the operand `vpdpbusd` takes.
pub const WEIGHT_CODE_MAX: i32 = (1 << 14) - 1;

/// Positions a value sum over q8_0 may take at once: each sum of a weight
/// code times a value code stays within i32 (|Σ| <= 16383 · 128 · 512 < 2^30).
pub const MAX_VALUE_SUM_POSITIONS: usize = 512;

/// For the largest weight `top` of a block, (`to_code`, `from_code`): the
/// factor that makes a weight its code, and the value of one code.
#[inline(always)]
pub fn weight_scales(top: f32) -> (f32, f32) {
    if top > 0.0 {
        let max = WEIGHT_CODE_MAX as f32;
        (max / top, top / max)
    } else {
        (0.0, 0.0)
    }
}

/// A weight's code: `w · to_code` clamped to [0, 16383] (a NaN to 0),
/// rounded to nearest, ties to even.
#[inline(always)]
pub fn weight_code(w: f32, to_code: f32) -> i32 {
    (w * to_code)
        .max(0.0)
        .min(WEIGHT_CODE_MAX as f32)
        .round_ties_even() as i32
}

/// `weight_scales` of the largest of `maxima`, a SIMD path's running
/// maxima by lane (`larger_weight` from 0: no NaN among them, so the order
/// of the reduction does not matter).
pub fn weight_scales_of_maxima(maxima: &[f32]) -> (f32, f32) {
    weight_scales(maxima.iter().fold(0.0, |m, &x| larger_weight(x, m)))
}

/// The largest of `top` and `w`, a NaN `w` ignored (as `maxps(w, top)`).
#[inline(always)]
pub fn larger_weight(w: f32, top: f32) -> f32 {
    if w > top {
        w
    } else {
        top
    }
}

/// The weighted sums of q8_0 values: for each block b of 32 values, with
/// the weights `w_j = e_j · d_v[j, b]` (`weights`: e_j, j < n; `values`:
/// [n / 16 rounded up, blocks] tiles), their largest `top` (NaNs ignored,
/// at least 0) and `(to_code, from_code) = weight_scales(top)`:
/// `out[32 b + i] = (Σ_j weight_code(w_j, to_code) · v_j[b].qs[i]) as f32 ·
/// from_code`, the sum an exact integer. Each weight moves by at most half
/// a code, top / 32766: relative to the sum of weights, less than f16's
/// rounding of a single value.
pub fn value_sums_q8_0(weights: &[f32], values: &[ValueTileBlock], out: &mut [f32]) {
    let n = weights.len();
    let blocks = out.len() / Q8_0_VALUES;
    assert!((1..=MAX_VALUE_SUM_POSITIONS).contains(&n));
    assert_eq!(values.len(), n.div_ceil(TILE_POSITIONS) * blocks);
    let tile = |j: usize, b: usize| &values[j / TILE_POSITIONS * blocks + b];
    for (b, out) in out.chunks_exact_mut(Q8_0_VALUES).enumerate() {
        let weight = |j: usize| weights[j] * tile(j, b).d[j % TILE_POSITIONS].to_f32();
        let top = (0..n).fold(0.0f32, |top, j| larger_weight(weight(j), top));
        let (to_code, from_code) = weight_scales(top);
        let mut sums = [0i32; Q8_0_VALUES];
        for j in 0..n {
            let w = weight_code(weight(j), to_code);
            for (i, sum) in sums.iter_mut().enumerate() {
                *sum += w * i32::from(tile(j, b).code(j % TILE_POSITIONS, i));
            }
        }
        for (o, &sum) in out.iter_mut().zip(&sums) {
            *o = sum as f32 * from_code;
        }
    }
}

/// The definition of one head's partial over one chunk of q8_0 keys and
/// values (in tiles, the chunk starting at a tile), the query quantized to
/// q8_0 as well: the scores `s_j = score_q8_0(q, k_j)` (in `scores`, then
/// replaced by e_j = exp(s_j - max)), then `out` = `value_sums_q8_0` of the
/// e_j; returns (max, Σ_j e_j).
pub fn attend_head_q8_0(
    q: &[BlockQ8_0],           // [hd / 32]
    keys: &[KeyTileBlock],     // [n / 16 rounded up, hd / 32]
    values: &[ValueTileBlock], // [n / 16 rounded up, hd / 32]
    scaling: f32,
    scores: &mut [f32], // [n]
    out: &mut [f32],    // [hd]
) -> Partial {
    let blocks = q.len();
    let n = scores.len();
    for (j, s) in scores.iter_mut().enumerate() {
        let tile = &keys[j / TILE_POSITIONS * blocks..][..blocks];
        *s = score_q8_0(q, tile, j % TILE_POSITIONS, scaling);
    }
    let partial = softmax_weights(scores);
    value_sums_q8_0(&scores[..n], values, out);
    partial
}

/// `attend_head_q8_0` for every head of the group.
pub fn attend_chunk_q8_0(group: &mut Q8_0Group<'_>) {
    let (keys, values) = group.keys_values();
    let scaling = group.scaling();
    for h in 0..group.heads() {
        let [head] = group.rows::<1>(h);
        *head.stats = attend_head_q8_0(head.q, keys, values, scaling, head.scores, head.out);
    }
}

/// `attend_head` for every head of the group.
pub fn attend_chunk<T: KvElement>(group: &mut HeadGroup<'_, T>) {
    let (keys, values) = group.keys_values();
    let scaling = group.scaling();
    for h in 0..group.heads() {
        let [head] = group.rows::<1>(h);
        *head.stats = attend_head(head.q, keys, values, scaling, head.scores, head.out);
    }
}

/// See `kernels::attention::merge` (which checked the shapes).
#[inline(always)]
pub fn merge(heads: usize, hd: usize, partial_out: &[f32], stats: &[Partial], out: Strided<'_>) {
    let chunks = stats.len() / heads;
    for h in 0..heads {
        let max = (0..chunks).fold(f32::NEG_INFINITY, |m, c| m.max(stats[c * heads + h].max));
        let o = &mut out.data[h * out.stride..h * out.stride + hd];
        o.fill(0.0);
        let mut total = 0.0f32;
        for c in 0..chunks {
            let part = stats[c * heads + h];
            let w = exp(part.max - max);
            total = w.mul_add(part.sum, total);
            let src = &partial_out[(c * heads + h) * hd..(c * heads + h + 1) * hd];
            for (od, &p) in o.iter_mut().zip(src) {
                *od = w.mul_add(p, *od);
            }
        }
        for od in o.iter_mut() {
            *od /= total;
        }
    }
}
