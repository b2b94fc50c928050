//! Query heads attending to the cached keys and values of their KV head:
//! `out = Σ_j softmax_j(q · k_j · scaling) v_j`, in f32 whatever the cache
//! stores.
//!
//! The keys are taken in chunks of `KEY_CHUNK`; each chunk gives a softmax
//! partial (`attend_chunk`) and `merge` combines them, as flash-decoding
//! does, so one token's attention can be split over threads. The softmax is
//! normalised once at the end (`Σ e_j v_j / Σ e_j`) rather than per weight:
//! the same value up to rounding, and `n` fewer divisions.
//!
//! The kernels are `kernels::scalar::attention` (the definition of a
//! partial) and its SIMD twins, which agree with it to the bit; the tests
//! compare them exactly, and with an f64 reference.
//!
//! Over a q8_0 cache the queries are quantized to q8_0 too (`Queries`), once
//! per call rather than per chunk, and each score is a sum of exact integer
//! block dots times the two blocks' scales.

use super::cache::F16;
use super::cache::{KvRows, KvType};
use crate::kernels::attention::{self as kernels, HeadGroup, KvElement, Strided};
use crate::kernels::q8_0::{quantize_q8_0, BlockQ8_0, Q8_0_VALUES, TILE_POSITIONS};
use crate::kernels::Kernel;

pub use crate::kernels::attention::Partial;

/// Keys per chunk. Attention over n keys is computed chunk by chunk — each
/// chunk's softmax partial: its largest score, its sum of weights and its
/// unnormalised weighted sum of values — then the chunks are merged. A
/// chunk is a task of its own, so one sequence's decode attention spreads
/// over the threads; the split depends on positions only, never on the
/// thread count, so the results do not either.
pub const KEY_CHUNK: usize = 256;

const _: () = assert!(KEY_CHUNK.is_multiple_of(TILE_POSITIONS));
// A chunk's q8_0 value sums are exact integers up to this many positions.
const _: () = assert!(KEY_CHUNK <= crate::kernels::scalar::attention::MAX_VALUE_SUM_POSITIONS);

/// The keys and values a task reads after the group it is computing (the
/// next KV head's, positions 0..): the last chunk of a group asks the cache
/// for their first chunk, as every other chunk asks for the next one of
/// its own group, so that no chunk but a task's first starts cold. A path
/// may ignore it (the scalar and AVX2 float kernels do).
#[derive(Clone, Copy, Debug)]
pub struct ThenReads<'a> {
    pub keys: KvRows<'a>,
    pub values: KvRows<'a>,
}

/// Reusable buffers of `attend_group`.
#[derive(Default)]
pub struct ChunkScratch {
    out: Vec<f32>,                // [chunks, heads, hd]
    stats: Vec<Partial>,          // [chunks, heads]
    query_blocks: Vec<BlockQ8_0>, // [heads, hd / 32], for a q8_0 cache
}

/// Query heads as attention takes them: [heads, hd] values, in f32 for an
/// f32 or f16 cache, as q8_0 blocks for a q8_0 cache.
#[derive(Clone, Copy, Debug)]
pub enum Queries<'a> {
    F32(&'a [f32]), // [heads, hd]
    /// [heads, hd / 32]
    Q8_0(&'a [BlockQ8_0]),
}

impl<'a> Queries<'a> {
    /// The queries `q` ([heads, hd]) for a cache of type `kind`: `q` itself,
    /// or its q8_0 blocks, quantized into `blocks` (reused: it only grows).
    pub fn new(
        kernel: Kernel,
        kind: KvType,
        q: &'a [f32],
        hd: usize,
        blocks: &'a mut Vec<BlockQ8_0>,
    ) -> Queries<'a> {
        match kind {
            KvType::F32 | KvType::F16 => Queries::F32(q),
            KvType::Q8_0 => {
                // The cache checked that head_dim is whole blocks.
                assert!(hd.is_multiple_of(Q8_0_VALUES) && q.len().is_multiple_of(hd));
                let n = q.len() / Q8_0_VALUES;
                if blocks.len() < n {
                    blocks.resize(n, BlockQ8_0::default());
                }
                quantize_q8_0(kernel, &mut blocks[..n], q);
                Queries::Q8_0(&blocks[..n])
            }
        }
    }

    /// Heads `heads` (of hd values each).
    pub fn heads(self, heads: std::ops::Range<usize>, hd: usize) -> Queries<'a> {
        match self {
            Queries::F32(q) => Queries::F32(&q[heads.start * hd..heads.end * hd]),
            Queries::Q8_0(q) => {
                let per_head = hd / Q8_0_VALUES;
                Queries::Q8_0(&q[heads.start * per_head..heads.end * per_head])
            }
        }
    }
}

/// Attention of the query heads that share one KV head (a GQA group) over
/// positions 0..n of `keys` and `values` ([>= n, hd] each): `attend_chunk`
/// on every chunk of `KEY_CHUNK` keys, then `merge`. `q` is [heads, hd]
/// (quantized once here for a q8_0 cache); head h's output goes to
/// `out[h * out_stride..][..hd]`; `scores` is scratch of [heads, KEY_CHUNK];
/// `then`: what the caller reads next, if it knows (`ThenReads`).
#[allow(clippy::too_many_arguments)]
pub fn attend_group(
    kernel: Kernel,
    q: &[f32],
    hd: usize,
    keys: KvRows<'_>,
    values: KvRows<'_>,
    n: usize,
    scaling: f32,
    scores: &mut [f32],
    out: &mut [f32],
    out_stride: usize,
    scratch: &mut ChunkScratch,
    then: Option<ThenReads<'_>>,
) {
    assert!(hd >= 1 && !q.is_empty() && q.len().is_multiple_of(hd));
    let heads = q.len() / hd;
    let chunks = n.div_ceil(KEY_CHUNK);
    scratch.out.resize(chunks * heads * hd, 0.0);
    scratch.stats.resize(chunks * heads, Partial::default());
    let q = Queries::new(kernel, keys.kind(), q, hd, &mut scratch.query_blocks);
    for (c, (part, stats)) in scratch
        .out
        .chunks_exact_mut(heads * hd)
        .zip(scratch.stats.chunks_exact_mut(heads))
        .enumerate()
    {
        let range = c * KEY_CHUNK..((c + 1) * KEY_CHUNK).min(n);
        attend_chunk(
            kernel, q, hd, keys, values, range, scaling, scores, KEY_CHUNK, part, hd, stats, then,
        );
    }
    merge(
        kernel,
        heads,
        hd,
        &scratch.out,
        &scratch.stats,
        out,
        out_stride,
    );
}

/// The softmax partials of the query heads of one group over the keys in
/// `range` (at most `KEY_CHUNK` of them), the queries made for the keys'
/// type (`Queries::new`): for head h, its scores (scratch)
/// at `scores[h * scores_stride..]`, `out[h * out_stride..][..hd]` =
/// Σ_j exp(s_j - max) v_j and `stats[h]` = (max, Σ_j exp(s_j - max)).
/// The arguments become one `HeadGroup` view, checked there; every path's
/// result for each head is exactly the scalar definition's. The chunk may
/// ask for the next one's keys and values while it computes: its group's
/// next chunk, or after the last one the first chunk of `then`, if given.
#[allow(clippy::too_many_arguments)]
pub fn attend_chunk(
    kernel: Kernel,
    q: Queries<'_>,
    hd: usize,
    keys: KvRows<'_>,
    values: KvRows<'_>,
    range: std::ops::Range<usize>,
    scaling: f32,
    scores: &mut [f32],
    scores_stride: usize,
    out: &mut [f32],
    out_stride: usize,
    stats: &mut [Partial],
    then: Option<ThenReads<'_>>,
) {
    assert!(hd >= 1 && !range.is_empty());
    let scores = Strided {
        data: scores,
        stride: scores_stride,
    };
    let out = Strided {
        data: out,
        stride: out_stride,
    };
    let len = range.len();
    match (q, keys, values) {
        (Queries::F32(q), KvRows::F32(k), KvRows::F32(v)) => {
            let views = (scores, out, stats);
            attend_float_chunk(kernel, q, hd, (k, v), range, scaling, views, then);
        }
        (Queries::F32(q), KvRows::F16(k), KvRows::F16(v)) => {
            let views = (scores, out, stats);
            attend_float_chunk(kernel, q, hd, (k, v), range, scaling, views, then);
        }
        (
            Queries::Q8_0(q),
            KvRows::Q8_0Keys { tiles: k, n },
            KvRows::Q8_0Values {
                tiles: v,
                n: n_values,
            },
        ) => {
            // Chunks start at a tile (KEY_CHUNK is whole tiles), so the
            // chunk's keys and values are whole tiles, the last maybe partial.
            assert!(n == n_values && range.start.is_multiple_of(TILE_POSITIONS) && range.end <= n);
            let per_position = hd / Q8_0_VALUES;
            let tiles = |positions: std::ops::Range<usize>| {
                positions.start / TILE_POSITIONS * per_position
                    ..positions.end.div_ceil(TILE_POSITIONS) * per_position
            };
            let next = range.end..(range.end + KEY_CHUNK).min(n);
            let next_chunk = match then {
                _ if !next.is_empty() => (&k[tiles(next.clone())], &v[tiles(next)]),
                Some(ThenReads {
                    keys: KvRows::Q8_0Keys { tiles: k, n },
                    values: KvRows::Q8_0Values { tiles: v, .. },
                }) => {
                    // Another head of the same cache: the same tiles per
                    // position. Only a hint, so a mismatch asks for nothing.
                    let first = tiles(0..KEY_CHUNK.min(n));
                    match (k.get(first.clone()), v.get(first)) {
                        (Some(k), Some(v)) => (k, v),
                        _ => (&[][..], &[][..]),
                    }
                }
                _ => (&[][..], &[][..]),
            };
            let kv = (&k[tiles(range.clone())], &v[tiles(range)]);
            let mut group =
                HeadGroup::new(q, hd, len, kv, scaling, scores, out, stats).prefetching(next_chunk);
            kernels::attend_chunk_q8_0(kernel, &mut group);
        }
        _ => unreachable!("queries, keys and values are made for the cache's type"),
    }
}

/// Float keys and values as the cache's rows hold them.
trait FloatRows: KvElement {
    /// `rows`' elements, if they are of this type.
    fn of(rows: KvRows<'_>) -> Option<&[Self]>;
}

impl FloatRows for f32 {
    fn of(rows: KvRows<'_>) -> Option<&[f32]> {
        match rows {
            KvRows::F32(r) => Some(r),
            _ => None,
        }
    }
}

impl FloatRows for F16 {
    fn of(rows: KvRows<'_>) -> Option<&[F16]> {
        match rows {
            KvRows::F16(r) => Some(r),
            _ => None,
        }
    }
}

/// The keys and values of positions `range` of float rows of hd.
fn float_chunk<'r, T>(
    k: &'r [T],
    v: &'r [T],
    range: &std::ops::Range<usize>,
    hd: usize,
) -> (&'r [T], &'r [T]) {
    let rows = range.start * hd..range.end * hd;
    (&k[rows.clone()], &v[rows])
}

/// `attend_chunk` of a float group (queries `q`, the views its results go
/// to) over positions `range` of `k` and `v` (rows of hd), asking for the
/// chunk after it while it computes: the
/// group's next, else the first of `then`'s (another head of the same
/// cache; one of another type asks for nothing).
#[allow(clippy::too_many_arguments)]
fn attend_float_chunk<T: FloatRows>(
    kernel: Kernel,
    q: &[f32],
    hd: usize,
    (k, v): (&[T], &[T]),
    range: std::ops::Range<usize>,
    scaling: f32,
    (scores, out, stats): (Strided<'_>, Strided<'_>, &mut [Partial]),
    then: Option<ThenReads<'_>>,
) {
    let chunk = float_chunk(k, v, &range, hd);
    let group = HeadGroup::new(q, hd, range.len(), chunk, scaling, scores, out, stats);
    let n = k.len().min(v.len()) / hd;
    let next = range.end..(range.end + KEY_CHUNK).min(n);
    let then = then.and_then(|t| Some((T::of(t.keys)?, T::of(t.values)?)));
    let next_chunk = match then {
        _ if !next.is_empty() => float_chunk(k, v, &next, hd),
        Some((k, v)) => float_chunk(k, v, &(0..KEY_CHUNK.min(k.len().min(v.len()) / hd)), hd),
        None => (&[][..], &[][..]),
    };
    let mut group = group.prefetching(next_chunk);
    kernels::attend_chunk(kernel, &mut group);
}

/// Combines the partials of consecutive chunks, in chunk order:
/// with M the largest max and w_c = exp(max_c - M),
/// `out = Σ_c w_c out_c / Σ_c w_c sum_c` (fused multiply-adds, chunk by chunk).
/// `partial_out` is [chunks, heads, hd], `stats` [chunks, heads]; head h's
/// result goes to `out[h * out_stride..][..hd]`. For one chunk, w = 1 and
/// this is `out_0 / sum_0`.
pub fn merge(
    kernel: Kernel,
    heads: usize,
    hd: usize,
    partial_out: &[f32],
    stats: &[Partial],
    out: &mut [f32],
    out_stride: usize,
) {
    let out = Strided {
        data: out,
        stride: out_stride,
    };
    kernels::merge(kernel, heads, hd, partial_out, stats, out);
}

#[cfg(test)]
mod tests {
    use super::super::cache::F16;
    use super::*;
    use crate::kernels::q8_0::{KeyTileBlock, TileBlock, TileLanes, ValueTileBlock};
    use crate::kernels::scalar::attention as scalar;

    fn paths() -> Vec<Kernel> {
        Kernel::supported()
    }

    struct Rng(u64);
    impl Rng {
        fn float(&mut self) -> f32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        }
    }

    /// The textbook formula in f64: softmax weights, then their sum of values.
    fn reference(q: &[f32], k: &[f32], v: &[f32], scaling: f32) -> Vec<f64> {
        let hd = q.len();
        let n = k.len() / hd;
        let s: Vec<f64> = (0..n)
            .map(|j| {
                (0..hd)
                    .map(|d| f64::from(q[d]) * f64::from(k[j * hd + d]))
                    .sum::<f64>()
                    * f64::from(scaling)
            })
            .collect();
        let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
        let total: f64 = e.iter().sum();
        (0..hd)
            .map(|d| (0..n).map(|j| e[j] * f64::from(v[j * hd + d])).sum::<f64>() / total)
            .collect()
    }

    #[test]
    fn exp_is_within_two_ulp_and_zero_at_or_below_its_cut() {
        use crate::kernels::scalar::attention::exp_consts::MIN;
        let mut x = MIN + 0.000_37;
        while x < 88.0 {
            let want = f64::from(x).exp();
            let got = f64::from(scalar::exp(x));
            assert!(
                ((got - want) / want).abs() < 2.5e-7,
                "exp({x}) = {got}, want {want}"
            );
            x += 0.000_37;
        }
        assert_eq!(scalar::exp(0.0), 1.0);
        assert!(scalar::exp(MIN.next_up()) > 1e-28);
        for x in [MIN, -64.5, -87.0, -1000.0, f32::NEG_INFINITY, f32::NAN] {
            assert_eq!(scalar::exp(x).to_bits(), 0, "exp({x})");
        }
    }

    /// The sampler's softmax (`softmax_in_place`): every path equals scalar
    /// bit for bit over rows of any length, a vocabulary's included, with
    /// logits spread past the exponential's cut and some -inf; each weight
    /// is exp(x - max) within 2 ulp, or 0 at or below e^-64.
    #[test]
    fn softmax_in_place_equals_scalar_on_every_path() {
        use crate::kernels::attention::softmax_in_place;
        let mut rng = Rng(0x1405_7b7e_f767_814f);
        for n in [1usize, 7, 8, 15, 16, 17, 33, 1000, 128_256] {
            let x: Vec<f32> = (0..n)
                .map(|i| {
                    if i % 97 == 5 {
                        f32::NEG_INFINITY
                    } else {
                        60.0 * rng.float()
                    }
                })
                .collect();
            let mut want = x.clone();
            let partial = scalar::softmax_weights(&mut want);
            let max = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(partial.max, max);
            for (&w, &xj) in want.iter().zip(&x) {
                let exact = f64::from(xj - max).exp();
                if xj - max > -64.0 {
                    assert!(
                        ((f64::from(w) - exact) / exact).abs() < 2.5e-7,
                        "{xj} - {max}: {w} vs {exact}"
                    );
                } else {
                    assert_eq!(w.to_bits(), 0, "{xj}");
                }
            }
            for path in paths() {
                let mut got = x.clone();
                let p = softmax_in_place(path, &mut got);
                assert_eq!((p.max, p.sum), (partial.max, partial.sum), "{path:?} n {n}");
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{path:?} n {n}");
            }
        }
    }

    /// Scores spread over hundreds of units (a peaked head, as at depth):
    /// most softmax weights fall below exp's cut and are 0. Every path
    /// zeroes the same ones (equal to scalar bit for bit, chunk by chunk
    /// and whole, over f32, f16 and q8_0 rows), and the result is the
    /// formula's, which keeps them.
    #[test]
    fn weights_past_the_exponential_cut_are_zero_on_every_path() {
        let mut rng = Rng(0x5851_f42d_4c95_7f2d);
        let (hd, n, heads) = (128, 300, 4);
        let scaling = (hd as f32).powf(-0.5);
        let q: Vec<f32> = (0..heads * hd).map(|_| 30.0 * rng.float()).collect();
        let k: Vec<f32> = (0..n * hd).map(|_| 3.0 * rng.float()).collect();
        let v: Vec<f32> = (0..n * hd).map(|_| rng.float()).collect();
        let k16: Vec<F16> = k.iter().map(|&x| F16::from_f32(x)).collect();
        let v16: Vec<F16> = v.iter().map(|&x| F16::from_f32(x)).collect();
        let (k8, v8) = (q8_0_blocks(&k), q8_0_blocks(&v));
        let (k8t, v8t) = (tiles(&k8, hd / Q8_0_VALUES), tiles(&v8, hd / Q8_0_VALUES));
        let caches = [
            ("f32", KvRows::F32(&k), KvRows::F32(&v)),
            ("f16", KvRows::F16(&k16), KvRows::F16(&v16)),
            (
                "q8_0",
                KvRows::Q8_0Keys { tiles: &k8t, n },
                KvRows::Q8_0Values { tiles: &v8t, n },
            ),
        ];
        // The cut is reached: most of head 0's scores lie 64 below its largest.
        let scores: Vec<f32> = (0..n)
            .map(|j| scalar::dot::<f32>(&q[..hd], &k[j * hd..(j + 1) * hd]) * scaling)
            .collect();
        let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let cut = scores.iter().filter(|&&s| s - max <= -64.0).count();
        assert!(cut > n / 2, "{cut} of {n}");
        for (name, keys, values) in caches {
            for c in 0..n.div_ceil(KEY_CHUNK) {
                let range = c * KEY_CHUNK..((c + 1) * KEY_CHUNK).min(n);
                let want = run_chunk(Kernel::Scalar, &q, hd, keys, values, range.clone(), None);
                for path in paths() {
                    let got = run_chunk(path, &q, hd, keys, values, range.clone(), None);
                    assert_eq!(got, want, "{path:?} {name} chunk {c}");
                }
            }
            let want = run_group(Kernel::Scalar, &q, hd, keys, values, n, scaling);
            for path in paths() {
                let got = run_group(path, &q, hd, keys, values, n, scaling);
                assert_eq!(got, want, "{path:?} {name}");
            }
            if name == "f32" {
                for h in 0..heads {
                    let exact = reference(&q[h * hd..(h + 1) * hd], &k, &v, scaling);
                    for (d, &w) in exact.iter().enumerate() {
                        let got = f64::from(want[h][d]);
                        assert!((got - w).abs() < 1e-5, "h {h} d {d}: {got} vs {w}");
                    }
                }
            }
        }
    }

    /// Runs `attend_group` on `path` with a padded output stride; returns
    /// each head's output.
    fn run_group(
        path: Kernel,
        q: &[f32],
        hd: usize,
        keys: KvRows<'_>,
        values: KvRows<'_>,
        n: usize,
        scaling: f32,
    ) -> Vec<Vec<f32>> {
        let heads = q.len() / hd;
        let os = hd + 3;
        let mut scores = vec![0.0; heads * KEY_CHUNK];
        let mut out = vec![f32::NAN; heads * os];
        let mut scratch = ChunkScratch::default();
        attend_group(
            path,
            q,
            hd,
            keys,
            values,
            n,
            scaling,
            &mut scores,
            &mut out,
            os,
            &mut scratch,
            None,
        );
        // The padding between rows is left alone.
        for h in 0..heads {
            assert!(out[h * os + hd..(h + 1) * os].iter().all(|v| v.is_nan()));
        }
        (0..heads)
            .map(|h| out[h * os..h * os + hd].to_vec())
            .collect()
    }

    /// `attend_chunk` of one chunk on `path` (`then`: what it may ask the
    /// cache for after its group): (outputs, partials) per head.
    fn run_chunk(
        path: Kernel,
        q: &[f32],
        hd: usize,
        keys: KvRows<'_>,
        values: KvRows<'_>,
        range: std::ops::Range<usize>,
        then: Option<ThenReads<'_>>,
    ) -> (Vec<f32>, Vec<Partial>) {
        let heads = q.len() / hd;
        let (ss, os) = (range.len() + 5, hd + 3);
        let mut scores = vec![0.0; heads * ss];
        let mut out = vec![0.0; heads * os];
        let mut stats = vec![Partial::default(); heads];
        let mut blocks = Vec::new();
        let q = Queries::new(path, keys.kind(), q, hd, &mut blocks);
        attend_chunk(
            path,
            q,
            hd,
            keys,
            values,
            range,
            0.1,
            &mut scores,
            ss,
            &mut out,
            os,
            &mut stats,
            then,
        );
        (out, stats)
    }

    #[test]
    fn every_path_equals_scalar_bit_for_bit_and_the_formula() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for &(hd, n, heads) in &[
            (128usize, 1usize, 4usize),
            (128, 7, 4),
            (128, 256, 4),
            (128, 300, 4),
            (128, 601, 5),
            (64, 33, 1),
            (16, 5, 2),
            (8, 9, 3),
            (12, 17, 4),
            (3, 4, 2),
            (72, 65, 8),
            (200, 11, 1),
            (48, 19, 3),
            (80, 10, 6),
            (32, 2, 4),
            (16, 3, 1),
        ] {
            let scaling = (hd as f32).powf(-0.5);
            // Scores of several units: a peaked softmax, as in real models.
            let q: Vec<f32> = (0..heads * hd).map(|_| 3.0 * rng.float()).collect();
            let k: Vec<f32> = (0..n * hd).map(|_| 3.0 * rng.float()).collect();
            let v: Vec<f32> = (0..n * hd).map(|_| rng.float()).collect();
            let k16: Vec<F16> = k.iter().map(|&x| F16::from_f32(x)).collect();
            let v16: Vec<F16> = v.iter().map(|&x| F16::from_f32(x)).collect();
            let (k32r, v32r) = (KvRows::F32(&k), KvRows::F32(&v));
            let (k16r, v16r) = (KvRows::F16(&k16), KvRows::F16(&v16));
            // Every chunk's partial: the paths agree to the bit.
            for c in 0..n.div_ceil(KEY_CHUNK) {
                let range = c * KEY_CHUNK..((c + 1) * KEY_CHUNK).min(n);
                let want32 = run_chunk(Kernel::Scalar, &q, hd, k32r, v32r, range.clone(), None);
                let want16 = run_chunk(Kernel::Scalar, &q, hd, k16r, v16r, range.clone(), None);
                for path in paths() {
                    let got = run_chunk(path, &q, hd, k32r, v32r, range.clone(), None);
                    assert_eq!(
                        got, want32,
                        "{path:?} f32 hd {hd} n {n} heads {heads} chunk {c}"
                    );
                    let got = run_chunk(path, &q, hd, k16r, v16r, range.clone(), None);
                    assert_eq!(
                        got, want16,
                        "{path:?} f16 hd {hd} n {n} heads {heads} chunk {c}"
                    );
                }
            }
            // The whole: the paths agree to the bit, and with the formula.
            let want32 = run_group(Kernel::Scalar, &q, hd, k32r, v32r, n, scaling);
            let want16 = run_group(Kernel::Scalar, &q, hd, k16r, v16r, n, scaling);
            for h in 0..heads {
                let exact = reference(&q[h * hd..(h + 1) * hd], &k, &v, scaling);
                for (d, &w) in exact.iter().enumerate() {
                    let (a, b) = (f64::from(want32[h][d]), f64::from(want16[h][d]));
                    assert!(
                        (a - w).abs() < 1e-5,
                        "hd {hd} n {n} h {h} d {d}: {a} vs {w}"
                    );
                    assert!(
                        (b - w).abs() < 1e-2,
                        "f16 hd {hd} n {n} h {h} d {d}: {b} vs {w}"
                    );
                }
            }
            for path in paths() {
                let got = run_group(path, &q, hd, k32r, v32r, n, scaling);
                assert_eq!(got, want32, "{path:?} f32 hd {hd} n {n} heads {heads}");
                let got = run_group(path, &q, hd, k16r, v16r, n, scaling);
                assert_eq!(got, want16, "{path:?} f16 hd {hd} n {n} heads {heads}");
            }
        }
    }

    fn q8_0_blocks(x: &[f32]) -> Vec<BlockQ8_0> {
        let mut blocks = vec![BlockQ8_0::default(); x.len() / Q8_0_VALUES];
        quantize_q8_0(Kernel::Scalar, &mut blocks, x);
        blocks
    }

    /// The tiles of q8_0 rows `rows` ([n, blocks]), lanes past n left zero.
    fn tiles<L: TileLanes>(rows: &[BlockQ8_0], blocks: usize) -> Vec<TileBlock<L>> {
        let n = rows.len() / blocks;
        let mut tiles = vec![TileBlock::zeroed(); n.div_ceil(TILE_POSITIONS) * blocks];
        for (j, row) in rows.chunks_exact(blocks).enumerate() {
            for (b, block) in row.iter().enumerate() {
                tiles[j / TILE_POSITIONS * blocks + b].set(j % TILE_POSITIONS, block);
            }
        }
        tiles
    }

    fn dequantized(blocks: &[BlockQ8_0]) -> Vec<f32> {
        blocks.iter().flat_map(|b| b.dequantize()).collect()
    }

    /// Over a q8_0 cache: every path equals scalar bit for bit, chunk by
    /// chunk and whole; the result is the formula over the dequantized
    /// queries, keys and values within `DEQUANTIZED_TOL` (the weights'
    /// 14-bit codes: each within half a code, 1/32766 of its chunk's
    /// largest, and hundreds of them add up to 4.2e-4 here; f32 rounding is
    /// far below), and the f32 result within `F32_TOL` (the codes' rounding: half
    /// a step, max|x| / 254, on each of q and k moves scores of several units
    /// by about 1 %, and each value by as much).
    #[test]
    fn q8_0_paths_equal_scalar_bit_for_bit_and_the_dequantized_formula() {
        const DEQUANTIZED_TOL: f64 = 1e-3;
        const F32_TOL: f64 = 0.05;
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let mut worst = 0.0f64;
        for &(hd, n, heads) in &[
            (128usize, 1usize, 4usize),
            (128, 7, 4),
            (128, 8, 4),
            (128, 15, 3),
            (128, 256, 4),
            (128, 300, 4),
            (128, 601, 5),
            (64, 33, 1),
            (64, 520, 4),
            (32, 9, 3),
            (32, 17, 2),
            (96, 65, 8),
            (256, 11, 1),
            (64, 263, 6),
            (32, 272, 2),
            (64, 529, 4),
            // Past the AVX-512 kernel's largest head: the AVX2 kernel's.
            (544, 40, 2),
        ] {
            let scaling = (hd as f32).powf(-0.5);
            let q: Vec<f32> = (0..heads * hd).map(|_| 3.0 * rng.float()).collect();
            let k: Vec<f32> = (0..n * hd).map(|_| 3.0 * rng.float()).collect();
            let v: Vec<f32> = (0..n * hd).map(|_| rng.float()).collect();
            let (k8, v8) = (q8_0_blocks(&k), q8_0_blocks(&v));
            let (k8t, v8t) = (tiles(&k8, hd / Q8_0_VALUES), tiles(&v8, hd / Q8_0_VALUES));
            let k8r = KvRows::Q8_0Keys { tiles: &k8t, n };
            let v8r = KvRows::Q8_0Values { tiles: &v8t, n };
            for c in 0..n.div_ceil(KEY_CHUNK) {
                let range = c * KEY_CHUNK..((c + 1) * KEY_CHUNK).min(n);
                let want = run_chunk(Kernel::Scalar, &q, hd, k8r, v8r, range.clone(), None);
                for path in paths() {
                    let got = run_chunk(path, &q, hd, k8r, v8r, range.clone(), None);
                    assert_eq!(
                        got, want,
                        "{path:?} q8_0 hd {hd} n {n} heads {heads} chunk {c}"
                    );
                }
            }
            let want = run_group(Kernel::Scalar, &q, hd, k8r, v8r, n, scaling);
            for path in paths() {
                let got = run_group(path, &q, hd, k8r, v8r, n, scaling);
                assert_eq!(got, want, "{path:?} q8_0 hd {hd} n {n} heads {heads}");
            }
            let (kd, vd) = (dequantized(&k8), dequantized(&v8));
            for h in 0..heads {
                let qh = &q[h * hd..(h + 1) * hd];
                let qd = dequantized(&q8_0_blocks(qh));
                let exact = reference(&qd, &kd, &vd, scaling);
                let unquantized = reference(qh, &k, &v, scaling);
                for d in 0..hd {
                    let got = f64::from(want[h][d]);
                    assert!(
                        (got - exact[d]).abs() < DEQUANTIZED_TOL,
                        "hd {hd} n {n} h {h} d {d}: {got} vs {}",
                        exact[d]
                    );
                    let off = (got - unquantized[d]).abs();
                    worst = worst.max(off);
                    assert!(
                        off < F32_TOL,
                        "hd {hd} n {n} h {h} d {d}: {got} vs {}",
                        unquantized[d]
                    );
                }
            }
        }
        // The quantization does change the result: the f32 tolerance is needed.
        assert!(worst > DEQUANTIZED_TOL, "{worst}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
        /// Ragged key counts, group sizes and head sizes over a q8_0 cache:
        /// every path equals scalar bit for bit.
        #[test]
        fn q8_0_ragged_groups_agree(
            blocks in 1usize..6,
            n in 1usize..600,
            heads in 1usize..9,
            seed in 1u64..u64::MAX,
        ) {
            let hd = blocks * Q8_0_VALUES;
            let mut rng = Rng(seed);
            let q: Vec<f32> = (0..heads * hd).map(|_| 4.0 * rng.float()).collect();
            let k: Vec<f32> = (0..n * hd).map(|_| 4.0 * rng.float()).collect();
            let v: Vec<f32> = (0..n * hd).map(|_| rng.float()).collect();
            let (k8, v8) = (q8_0_blocks(&k), q8_0_blocks(&v));
            let (k8t, v8t) = (tiles(&k8, hd / Q8_0_VALUES), tiles(&v8, hd / Q8_0_VALUES));
            let k8r = KvRows::Q8_0Keys { tiles: &k8t, n };
            let v8r = KvRows::Q8_0Values { tiles: &v8t, n };
            let want = run_group(Kernel::Scalar, &q, hd, k8r, v8r, n, 0.1);
            for path in paths() {
                proptest::prop_assert_eq!(run_group(path, &q, hd, k8r, v8r, n, 0.1), want.clone(), "{}", path);
            }
        }
    }

    #[test]
    fn what_a_chunk_asks_for_next_changes_nothing() {
        // A chunk asks the cache for the next chunk of its group, or after
        // the last one for the first chunk of `then`: a hint only. Every
        // path gives the same bits with or without it, and a `then` whose
        // tiles are another shape's (or rows of another type) asks for nothing.
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let q8 = |rng: &mut Rng, hd: usize, n: usize| {
            let x: Vec<f32> = (0..n * hd).map(|_| rng.float()).collect();
            let blocks = q8_0_blocks(&x);
            let keys: Vec<KeyTileBlock> = tiles(&blocks, hd / Q8_0_VALUES);
            let values: Vec<ValueTileBlock> = tiles(&blocks, hd / Q8_0_VALUES);
            (keys, values)
        };
        let (hd, n, heads) = (128, 300, 4);
        let q: Vec<f32> = (0..heads * hd).map(|_| 3.0 * rng.float()).collect();
        let (k, v) = q8(&mut rng, hd, n);
        let (keys, values) = (
            KvRows::Q8_0Keys { tiles: &k, n },
            KvRows::Q8_0Values { tiles: &v, n },
        );
        let (next_k, next_v) = q8(&mut rng, hd, 40);
        let (small_k, small_v) = q8(&mut rng, 32, 3);
        let f16 = vec![F16::from_f32(0.5); 40 * hd];
        let thens = [
            ThenReads {
                keys: KvRows::Q8_0Keys {
                    tiles: &next_k,
                    n: 40,
                },
                values: KvRows::Q8_0Values {
                    tiles: &next_v,
                    n: 40,
                },
            },
            ThenReads {
                keys: KvRows::Q8_0Keys {
                    tiles: &small_k,
                    n: 3,
                },
                values: KvRows::Q8_0Values {
                    tiles: &small_v,
                    n: 3,
                },
            },
            ThenReads {
                keys: KvRows::F16(&f16),
                values: KvRows::F16(&f16),
            },
        ];
        for path in paths() {
            for range in [0..KEY_CHUNK, KEY_CHUNK..n] {
                let want = run_chunk(path, &q, hd, keys, values, range.clone(), None);
                for then in thens {
                    let got = run_chunk(path, &q, hd, keys, values, range.clone(), Some(then));
                    assert_eq!(got, want, "{path:?} {range:?} {then:?}");
                }
            }
        }
        // The same over float rows: the next chunk of the group, the first
        // of a `then` of the same type (longer or shorter than a chunk, or
        // less than a row), or of another type (which asks for nothing).
        let k16: Vec<F16> = (0..n * hd).map(|_| F16::from_f32(rng.float())).collect();
        let v16: Vec<F16> = (0..n * hd).map(|_| F16::from_f32(rng.float())).collect();
        let k32: Vec<f32> = (0..n * hd).map(|_| rng.float()).collect();
        let long16 = vec![F16::from_f32(0.25); 300 * hd];
        let part_row = vec![F16::from_f32(0.25); hd / 2];
        let thens = [
            ThenReads {
                keys: KvRows::F16(&f16),
                values: KvRows::F16(&f16),
            },
            ThenReads {
                keys: KvRows::F16(&long16),
                values: KvRows::F16(&long16),
            },
            ThenReads {
                keys: KvRows::F16(&part_row),
                values: KvRows::F16(&part_row),
            },
            ThenReads {
                keys: KvRows::F32(&k32),
                values: KvRows::F32(&k32),
            },
            thens[0],
        ];
        for path in paths() {
            for (keys, values) in [
                (KvRows::F16(&k16), KvRows::F16(&v16)),
                (KvRows::F32(&k32), KvRows::F32(&k32)),
            ] {
                for range in [0..KEY_CHUNK, KEY_CHUNK..n, 7..8] {
                    let want = run_chunk(path, &q, hd, keys, values, range.clone(), None);
                    for then in thens {
                        let got = run_chunk(path, &q, hd, keys, values, range.clone(), Some(then));
                        assert_eq!(got, want, "{path:?} {range:?} {then:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn one_chunk_merges_to_its_own_normalisation() {
        let (hd, heads) = (5, 2);
        let parts: Vec<f32> = (0..heads * hd).map(|i| i as f32 * 0.37 - 1.0).collect();
        let stats = [
            Partial {
                max: 3.5,
                sum: 2.25,
            },
            Partial {
                max: -1.0,
                sum: 7.0,
            },
        ];
        let mut out = vec![0.0; heads * hd];
        for kernel in paths() {
            merge(kernel, heads, hd, &parts, &stats, &mut out, hd);
            for h in 0..heads {
                for d in 0..hd {
                    assert_eq!(
                        out[h * hd + d],
                        parts[h * hd + d] / stats[h].sum,
                        "{kernel}"
                    );
                }
            }
        }
        merge(Kernel::Scalar, heads, hd, &parts, &stats, &mut out, hd);
        for h in 0..heads {
            for d in 0..hd {
                assert_eq!(out[h * hd + d], parts[h * hd + d] / stats[h].sum);
            }
        }
    }

    /// Lanes of a partial key or value tile past n hold whatever they hold
    /// (another sequence's after a copied prefix): huge codes, infinite and
    /// NaN scales there change nothing.
    #[test]
    fn q8_0_lanes_past_n_do_not_count() {
        let (hd, heads) = (64, 3);
        let blocks = hd / Q8_0_VALUES;
        let mut rng = Rng(0x1234_5678_9abc_def1);
        let q: Vec<f32> = (0..heads * hd).map(|_| rng.float()).collect();
        for n in [1, 9, 16, 23, 257, 270] {
            let k: Vec<f32> = (0..n * hd).map(|_| rng.float()).collect();
            let v: Vec<f32> = (0..n * hd).map(|_| rng.float()).collect();
            let (k8, v8) = (q8_0_blocks(&k), q8_0_blocks(&v));
            let (clean_k, clean_v) = (tiles(&k8, blocks), tiles(&v8, blocks));
            fn dirtied<L: TileLanes>(
                tiles: &[TileBlock<L>],
                n: usize,
                blocks: usize,
            ) -> Vec<TileBlock<L>> {
                let mut dirty = tiles.to_vec();
                let last = n.div_ceil(TILE_POSITIONS) - 1;
                for (b, t) in dirty[last * blocks..].iter_mut().enumerate() {
                    for u in n - last * TILE_POSITIONS..TILE_POSITIONS {
                        t.d[u] = if b % 2 == 0 { F16(0x7c00) } else { F16(0x7e00) };
                        for i in 0..Q8_0_VALUES {
                            t.qs[L::at(u, i)] = (i * 97) as u8;
                        }
                    }
                }
                dirty
            }
            let (dirty_k, dirty_v) = (dirtied(&clean_k, n, blocks), dirtied(&clean_v, n, blocks));
            let want = run_group(
                Kernel::Scalar,
                &q,
                hd,
                KvRows::Q8_0Keys { tiles: &clean_k, n },
                KvRows::Q8_0Values { tiles: &clean_v, n },
                n,
                0.3,
            );
            assert!(want.iter().flatten().all(|x| x.is_finite()));
            for path in paths() {
                let keys = KvRows::Q8_0Keys { tiles: &dirty_k, n };
                let values = KvRows::Q8_0Values { tiles: &dirty_v, n };
                assert_eq!(
                    run_group(path, &q, hd, keys, values, n, 0.3),
                    want,
                    "{path} n {n}"
                );
            }
        }
    }

    #[test]
    fn only_the_first_n_positions_count() {
        let (hd, n) = (16, 3);
        let q = vec![0.5f32; 2 * hd];
        let mut k = vec![0.1f32; 5 * hd];
        let mut v = vec![1.0f32; 5 * hd];
        // Positions past n hold huge values that must not leak in.
        k[n * hd..].fill(100.0);
        v[n * hd..].fill(-1e6);
        for path in paths() {
            let out = run_group(path, &q, hd, KvRows::F32(&k), KvRows::F32(&v), n, 0.25);
            for o in out {
                assert!(o.iter().all(|&x| (x - 1.0).abs() < 1e-6), "{path:?}: {o:?}");
            }
        }
    }
}
