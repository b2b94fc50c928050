//! Attention of one head over one chunk of keys, and the merge of chunks:
//! the definitions the SIMD paths reproduce bit for bit. Sums are kept in
//! eight lanes and reduced by a fixed tree, the exponential is a fixed
//! polynomial, and products are fused multiply-adds (`mul_add`), so that a
//! vector version can perform exactly these operations in this order.

use crate::kernels::attention::{HeadGroup, KvElement, Partial, Strided};
use crate::kernels::q8_0::{BlockQ8_0, KeyTileBlock, KEY_TILE, Q8_0_VALUES};
use crate::kernels::scalar::q8_0::tile_dot;

/// Cephes' single-precision exp: `x = n ln2 + r`, |r| <= ln2 / 2, a degree-5
/// polynomial for exp(r) - 1 - r, then a scaling by 2^n. Within 2 ulp of the
/// true value on [-87, 88]; inputs are clamped to that range (exp(-87) is
/// 1.6e-38, nothing beside the softmax's largest weight, 1).
pub mod exp_consts {
    pub const MIN: f32 = -87.0;
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
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
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

/// The definition of one head's partial over one chunk of q8_0 keys (in
/// tiles, the chunk starting at a tile) and values, the query quantized to
/// q8_0 as well: the scores
/// `s_j = score_q8_0(q, k_j)` (in `scores`, then replaced by exp(s_j - max)),
/// `out[32 b + i] = Σ_j e_j · (d_v[j, b] · v_j[b].qs[i])` (fused
/// multiply-adds in key order); returns (max, Σ_j exp(s_j - max)). Each
/// value d · code is exact in f32 (an 11-bit significand times at most 2^7),
/// so it is the dequantized value itself, computed once for all heads.
pub fn attend_head_q8_0(
    q: &[BlockQ8_0],       // [hd / 32]
    keys: &[KeyTileBlock], // [n / 16 rounded up, hd / 32]
    values: &[BlockQ8_0],  // [n, hd / 32]
    scaling: f32,
    scores: &mut [f32], // [n]
    out: &mut [f32],    // [hd]
) -> Partial {
    let blocks = q.len();
    let n = values.len() / blocks;
    let scores = &mut scores[..n];
    for (j, s) in scores.iter_mut().enumerate() {
        let tile = &keys[j / KEY_TILE * blocks..][..blocks];
        *s = score_q8_0(q, tile, j % KEY_TILE, scaling);
    }
    let partial = softmax_weights(scores);
    // Key by key, each output accumulating in key order: the same
    // operations per output as a loop over keys inside a loop over outputs.
    out.fill(0.0);
    for (&e, row) in scores.iter().zip(values.chunks_exact(blocks)) {
        for (o, v) in out.chunks_exact_mut(Q8_0_VALUES).zip(row) {
            let d = v.d.to_f32();
            for (od, &code) in o.iter_mut().zip(&v.qs) {
                *od = e.mul_add(d * f32::from(code), *od);
            }
        }
    }
    partial
}

/// `attend_head_q8_0` for every head of the group.
pub fn attend_chunk_q8_0(group: &mut HeadGroup<'_, BlockQ8_0, BlockQ8_0, KeyTileBlock>) {
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
