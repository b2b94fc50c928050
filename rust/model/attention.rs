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
//! `scalar::attend_chunk` defines a partial; the AVX2 twin (with FMA and F16C)
//! performs the very same floating-point operations in the same order — sums
//! kept in eight lanes and reduced by the same tree, fused multiply-adds where
//! the scalar code has `mul_add`, the same polynomial exp — so the two agree
//! to the bit and the tests compare them exactly.

use super::cache::{KvElement, KvRows};
use crate::kernels::Kernel;

/// Which implementation runs attention; chosen once per session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionPath {
    Scalar,
    /// x86-64 AVX2 + FMA + F16C.
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl AttentionPath {
    /// The SIMD path wherever the matmul kernel is not forced to `scalar`
    /// and the CPU has the instructions; the scalar one otherwise.
    pub fn for_kernel(kernel: Kernel) -> AttentionPath {
        #[cfg(target_arch = "x86_64")]
        if kernel != Kernel::Scalar && AttentionPath::Avx2.is_supported() {
            return AttentionPath::Avx2;
        }
        let _ = kernel;
        AttentionPath::Scalar
    }

    pub fn is_supported(self) -> bool {
        match self {
            AttentionPath::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            AttentionPath::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
        }
    }
}

/// Keys per chunk. Attention over n keys is computed chunk by chunk — each
/// chunk's softmax partial: its largest score, its sum of weights and its
/// unnormalised weighted sum of values — then the chunks are merged. A
/// chunk is a task of its own, so one sequence's decode attention spreads
/// over the threads; the split depends on positions only, never on the
/// thread count, so the results do not either.
pub const KEY_CHUNK: usize = 256;

/// One head's softmax partial over one chunk of keys.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Partial {
    /// The largest score of the chunk.
    pub max: f32,
    /// Σ exp(score - max) over the chunk.
    pub sum: f32,
}

/// Reusable buffers of `attend_group`.
#[derive(Default)]
pub struct ChunkScratch {
    out: Vec<f32>,       // [chunks, heads, hd]
    stats: Vec<Partial>, // [chunks, heads]
}

/// Attention of the query heads that share one KV head (a GQA group) over
/// positions 0..n of `keys` and `values` ([>= n, hd] each): `attend_chunk`
/// on every chunk of `KEY_CHUNK` keys, then `merge`. `q` is [heads, hd];
/// head h's output goes to `out[h * out_stride..][..hd]`; `scores` is
/// scratch of [heads, KEY_CHUNK].
#[allow(clippy::too_many_arguments)]
pub fn attend_group(
    path: AttentionPath,
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
) {
    assert!(hd >= 1 && !q.is_empty() && q.len().is_multiple_of(hd));
    let heads = q.len() / hd;
    let chunks = n.div_ceil(KEY_CHUNK);
    scratch.out.resize(chunks * heads * hd, 0.0);
    scratch.stats.resize(chunks * heads, Partial::default());
    for (c, (part, stats)) in scratch
        .out
        .chunks_exact_mut(heads * hd)
        .zip(scratch.stats.chunks_exact_mut(heads))
        .enumerate()
    {
        let range = c * KEY_CHUNK..((c + 1) * KEY_CHUNK).min(n);
        attend_chunk(
            path, q, hd, keys, values, range, scaling, scores, KEY_CHUNK, part, hd, stats,
        );
    }
    merge(heads, hd, &scratch.out, &scratch.stats, out, out_stride);
}

/// The softmax partials of the query heads of one group over the keys in
/// `range` (at most `KEY_CHUNK` of them): for head h, its scores (scratch)
/// at `scores[h * scores_stride..]`, `out[h * out_stride..][..hd]` =
/// Σ_j exp(s_j - max) v_j and `stats[h]` = (max, Σ_j exp(s_j - max)).
/// The SIMD path reads each key and value once for up to four heads; every
/// head's result is exactly `scalar::attend_chunk` of that head.
#[allow(clippy::too_many_arguments)]
pub fn attend_chunk(
    path: AttentionPath,
    q: &[f32],
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
) {
    let n = range.len();
    assert!(hd >= 1 && n >= 1 && q.len().is_multiple_of(hd) && !q.is_empty());
    let heads = q.len() / hd;
    assert!(scores_stride >= n && scores.len() >= (heads - 1) * scores_stride + n);
    assert!(out_stride >= hd && out.len() >= (heads - 1) * out_stride + hd);
    assert!(stats.len() >= heads);
    let group = Group {
        q,
        hd,
        n,
        scaling,
        scores,
        scores_stride,
        out,
        out_stride,
        stats,
    };
    let rows = range.start * hd..range.end * hd;
    match (keys, values) {
        (KvRows::F32(k), KvRows::F32(v)) => group.run(path, &k[rows.clone()], &v[rows]),
        (KvRows::F16(k), KvRows::F16(v)) => group.run(path, &k[rows.clone()], &v[rows]),
        _ => unreachable!("keys and values share the cache's type"),
    }
}

/// Combines the partials of consecutive chunks, in chunk order:
/// with M the largest max and w_c = exp(max_c - M),
/// `out = Σ_c w_c out_c / Σ_c w_c sum_c` (fused multiply-adds, chunk by chunk).
/// `partial_out` is [chunks, heads, hd], `stats` [chunks, heads]; head h's
/// result goes to `out[h * out_stride..][..hd]`. For one chunk, w = 1 and
/// this is `out_0 / sum_0`.
pub fn merge(
    heads: usize,
    hd: usize,
    partial_out: &[f32],
    stats: &[Partial],
    out: &mut [f32],
    out_stride: usize,
) {
    let chunks = stats.len() / heads;
    assert!(chunks >= 1 && stats.len() == chunks * heads);
    assert!(partial_out.len() == chunks * heads * hd);
    assert!(out_stride >= hd && out.len() >= (heads - 1) * out_stride + hd);
    // The same operations either way; with FMA in hardware, `mul_add` is one
    // instruction instead of a libm call.
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("fma") {
        #[target_feature(enable = "fma")]
        unsafe fn with_fma(args: MergeArgs<'_>) {
            merge_body(args)
        }
        // SAFETY: FMA was detected just above.
        return unsafe { with_fma((heads, hd, partial_out, stats, out, out_stride)) };
    }
    merge_body((heads, hd, partial_out, stats, out, out_stride));
}

/// `merge`'s arguments, checked.
type MergeArgs<'a> = (usize, usize, &'a [f32], &'a [Partial], &'a mut [f32], usize);

#[inline(always)]
fn merge_body((heads, hd, partial_out, stats, out, out_stride): MergeArgs<'_>) {
    let chunks = stats.len() / heads;
    for h in 0..heads {
        let max = (0..chunks).fold(f32::NEG_INFINITY, |m, c| m.max(stats[c * heads + h].max));
        let o = &mut out[h * out_stride..h * out_stride + hd];
        o.fill(0.0);
        let mut total = 0.0f32;
        for c in 0..chunks {
            let part = stats[c * heads + h];
            let w = scalar::exp(part.max - max);
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

/// The arguments of `attend_chunk`, checked.
struct Group<'a> {
    q: &'a [f32],
    hd: usize,
    n: usize,
    scaling: f32,
    scores: &'a mut [f32],
    scores_stride: usize,
    out: &'a mut [f32],
    out_stride: usize,
    stats: &'a mut [Partial],
}

impl Group<'_> {
    fn run<T: KvElement + simd::Load>(self, path: AttentionPath, keys: &[T], values: &[T]) {
        let (hd, n) = (self.hd, self.n);
        let heads = self.q.len() / hd;
        match path {
            AttentionPath::Scalar => {
                for h in 0..heads {
                    self.stats[h] = scalar::attend_chunk(
                        &self.q[h * hd..(h + 1) * hd],
                        keys,
                        values,
                        self.scaling,
                        &mut self.scores[h * self.scores_stride..h * self.scores_stride + n],
                        &mut self.out[h * self.out_stride..h * self.out_stride + hd],
                    );
                }
            }
            #[cfg(target_arch = "x86_64")]
            AttentionPath::Avx2 => {
                assert!(path.is_supported(), "AVX2 attention on a CPU without it");
                let mut h = 0;
                while h < heads {
                    let take = (heads - h).min(4);
                    let args = simd::Heads {
                        q: self.q[h * hd..(h + take) * hd].as_ptr(),
                        hd,
                        n,
                        scaling: self.scaling,
                        // SAFETY (of the offsets): the bounds were asserted in
                        // attend_chunk for every head.
                        scores: self.scores[h * self.scores_stride..].as_mut_ptr(),
                        scores_stride: self.scores_stride,
                        out: self.out[h * self.out_stride..].as_mut_ptr(),
                        out_stride: self.out_stride,
                    };
                    let stats = &mut self.stats[h..h + take];
                    // SAFETY: the CPU has AVX2, FMA and F16C (asserted above);
                    // `args` points at `take` heads' valid, disjoint rows.
                    unsafe {
                        match take {
                            4 => simd::attend_chunk::<T, 4>(args, keys, values, stats),
                            3 => simd::attend_chunk::<T, 3>(args, keys, values, stats),
                            2 => simd::attend_chunk::<T, 2>(args, keys, values, stats),
                            _ => simd::attend_chunk::<T, 1>(args, keys, values, stats),
                        }
                    }
                    h += take;
                }
            }
        }
    }
}

/// Sum of eight lanes in the order `_mm256` code reduces them:
/// halves first (l + l+4), then quarters, then the last pair.
#[inline(always)]
fn reduce_lanes(a: [f32; 8]) -> f32 {
    let b = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    let c = [b[0] + b[2], b[1] + b[3]];
    c[0] + c[1]
}

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

pub mod scalar {
    use super::exp_consts as c;
    use super::{reduce_lanes, KvElement, Partial};

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

    /// The definition of one head's partial over one chunk of keys: see
    /// `super::attend_chunk`.
    pub fn attend_chunk<T: KvElement>(
        q: &[f32],
        keys: &[T],   // [n, hd]
        values: &[T], // [n, hd]
        scaling: f32,
        scores: &mut [f32],
        out: &mut [f32], // [hd]
    ) -> Partial {
        let hd = q.len();
        let n = keys.len() / hd;
        let scores = &mut scores[..n];
        for (j, s) in scores.iter_mut().enumerate() {
            *s = dot(q, &keys[j * hd..(j + 1) * hd]) * scaling;
        }
        let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        for s in scores.iter_mut() {
            *s = exp(*s - max);
        }
        let total = sum(scores);
        for (d, o) in out.iter_mut().enumerate() {
            let mut acc = 0.0f32;
            for (j, &e) in scores.iter().enumerate() {
                acc = e.mul_add(values[j * hd + d].to_f32(), acc);
            }
            *o = acc;
        }
        Partial { max, sum: total }
    }
}

mod simd {
    use super::super::cache::F16;

    /// Loads eight cached values as f32.
    pub trait Load: Sized {
        /// # Safety
        /// `p` points at 8 readable elements; the CPU has AVX2 and F16C.
        #[cfg(target_arch = "x86_64")]
        unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
    }

    impl Load for f32 {
        #[cfg(target_arch = "x86_64")]
        #[inline(always)]
        unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
            // SAFETY: per the trait's contract.
            unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
        }
    }

    impl Load for F16 {
        #[cfg(target_arch = "x86_64")]
        #[inline(always)]
        unsafe fn load8(p: *const F16) -> std::arch::x86_64::__m256 {
            use std::arch::x86_64::*;
            // SAFETY: per the trait's contract; F16 is a transparent u16.
            unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
        }
    }

    /// H query heads of one group: q [H, hd]; head h's scores at
    /// `scores + h * scores_stride` (n of them), its output at
    /// `out + h * out_stride` (hd of them).
    #[cfg(target_arch = "x86_64")]
    pub struct Heads {
        pub q: *const f32,
        pub hd: usize,
        pub n: usize,
        pub scaling: f32,
        pub scores: *mut f32,
        pub scores_stride: usize,
        pub out: *mut f32,
        pub out_stride: usize,
    }

    #[cfg(target_arch = "x86_64")]
    pub use x86::attend_chunk;

    #[cfg(target_arch = "x86_64")]
    mod x86 {
        use std::arch::x86_64::*;

        use super::super::exp_consts as c;
        use super::super::scalar;
        use super::super::{KvElement, Partial};
        use super::{Heads, Load};

        #[inline(always)]
        unsafe fn reduce(v: __m256) -> f32 {
            // (l + l+4), then (l + l+2), then the pair: as `reduce_lanes`.
            let quad = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
            _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps::<1>(pair, pair)))
        }

        /// `reduce` of eight vectors at once, with the same additions in the
        /// same order for each: lane i of the result is the sum of
        /// v[[0, 2, 4, 6, 1, 3, 5, 7][i]].
        #[inline(always)]
        unsafe fn reduce8(v: [__m256; 8]) -> __m256 {
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

        #[inline(always)]
        unsafe fn exp8(x: __m256) -> __m256 {
            let x = _mm256_min_ps(
                _mm256_max_ps(x, _mm256_set1_ps(c::MIN)),
                _mm256_set1_ps(c::MAX),
            );
            let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm256_mul_ps(x, _mm256_set1_ps(c::LOG2E)),
            );
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
            _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32::<23>(exponent)))
        }

        /// Scores of keys j..j+K for H heads: each key is loaded (and
        /// widened) once for all heads; H·K independent FMA chains.
        #[inline(always)]
        unsafe fn scores_step<T: KvElement + Load, const H: usize, const K: usize>(
            a: &Heads,
            keys: &[T],
            j: usize,
        ) {
            let (hd, full) = (a.hd, a.hd / 8 * 8);
            let kp = keys.as_ptr();
            let mut acc = [[_mm256_setzero_ps(); K]; H];
            for c in (0..full).step_by(8) {
                let mut kv = [_mm256_setzero_ps(); K];
                for (u, k) in kv.iter_mut().enumerate() {
                    *k = T::load8(kp.add((j + u) * hd + c));
                }
                for (h, acc_h) in acc.iter_mut().enumerate() {
                    let qv = _mm256_loadu_ps(a.q.add(h * hd + c));
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
                _mm256_storeu_ps(
                    lanes.as_mut_ptr(),
                    _mm256_mul_ps(sums, _mm256_set1_ps(a.scaling)),
                );
                for h in 0..4 {
                    *a.scores.add(h * a.scores_stride + j) = lanes[h];
                    *a.scores.add(h * a.scores_stride + j + 1) = lanes[4 + h];
                }
                return;
            }
            for (h, acc_h) in acc.iter().enumerate() {
                for (u, &acc_hu) in acc_h.iter().enumerate() {
                    let k = &keys[(j + u) * hd..(j + u + 1) * hd];
                    let mut total = reduce(acc_hu);
                    for (d, kd) in k.iter().enumerate().skip(full) {
                        total = (*a.q.add(h * hd + d)).mul_add(kd.to_f32(), total);
                    }
                    *a.scores.add(h * a.scores_stride + j + u) = total * a.scaling;
                }
            }
        }

        /// exp(s - max) over one head's scores, in place; returns the max
        /// and their sum.
        #[inline(always)]
        unsafe fn softmax_weights(scores: &mut [f32]) -> Partial {
            let n = scores.len();
            let full_n = n / 8 * 8;
            let mut max8 = _mm256_set1_ps(f32::NEG_INFINITY);
            for c in (0..full_n).step_by(8) {
                max8 = _mm256_max_ps(max8, _mm256_loadu_ps(scores.as_ptr().add(c)));
            }
            let mut lanes = [0.0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), max8);
            let max = lanes
                .iter()
                .chain(&scores[full_n..])
                .fold(f32::NEG_INFINITY, |m, &s| m.max(s));
            let max8 = _mm256_set1_ps(max);
            let mut sum8 = _mm256_setzero_ps();
            for c in (0..full_n).step_by(8) {
                let p = scores.as_mut_ptr().add(c);
                let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p), max8));
                _mm256_storeu_ps(p, e);
                sum8 = _mm256_add_ps(sum8, e);
            }
            let mut total = reduce(sum8);
            for s in &mut scores[full_n..] {
                *s = scalar::exp(*s - max);
                total += *s;
            }
            Partial { max, sum: total }
        }

        /// out[h][d..d+8B] = Σ_j e_h[j] v_j[d..d+8B]: each value row is
        /// loaded (and widened) once for all heads.
        #[inline(always)]
        unsafe fn values_step<T: KvElement + Load, const H: usize, const B: usize>(
            a: &Heads,
            values: &[T],
            d: usize,
        ) {
            let vp = values.as_ptr();
            let mut acc = [[_mm256_setzero_ps(); B]; H];
            for j in 0..a.n {
                let mut v = [_mm256_setzero_ps(); B];
                for (b, vb) in v.iter_mut().enumerate() {
                    *vb = T::load8(vp.add(j * a.hd + d + 8 * b));
                }
                for (h, acc_h) in acc.iter_mut().enumerate() {
                    let e = _mm256_broadcast_ss(&*a.scores.add(h * a.scores_stride + j));
                    for (b, acc_hb) in acc_h.iter_mut().enumerate() {
                        *acc_hb = _mm256_fmadd_ps(e, v[b], *acc_hb);
                    }
                }
            }
            for (h, acc_h) in acc.iter().enumerate() {
                for (b, &acc_hb) in acc_h.iter().enumerate() {
                    _mm256_storeu_ps(a.out.add(h * a.out_stride + d + 8 * b), acc_hb);
                }
            }
        }

        /// `scalar::attend_chunk` for each of H heads sharing keys and
        /// values, eight lanes at a time; head h's partial goes to stats[h].
        ///
        /// # Safety
        /// The CPU must support AVX2, FMA and F16C; `a` describes H heads
        /// whose q, score and output rows are valid and disjoint; keys and
        /// values are [a.n, a.hd].
        #[target_feature(enable = "avx2,fma,f16c")]
        pub unsafe fn attend_chunk<T: KvElement + Load, const H: usize>(
            a: Heads,
            keys: &[T],
            values: &[T],
            stats: &mut [Partial],
        ) {
            let (hd, n) = (a.hd, a.n);
            assert!(keys.len() == n * hd && values.len() == n * hd);
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
                    _mm_prefetch::<_MM_HINT_T1>(value_lines.add(at).cast());
                }
                scores_step::<T, H, 2>(&a, keys, j);
                j += 2;
            }
            if j < n {
                scores_step::<T, H, 1>(&a, keys, j);
            }

            for (h, st) in stats.iter_mut().enumerate().take(H) {
                let scores = std::slice::from_raw_parts_mut(a.scores.add(h * a.scores_stride), n);
                *st = softmax_weights(scores);
            }

            // Σ e_j v_j, 16 outputs per pass over the chunk's value rows
            // (prefetched above: at most KEY_CHUNK rows, in cache), then the
            // last hd % 8 one by one.
            let mut d = 0;
            while d + 16 <= full {
                values_step::<T, H, 2>(&a, values, d);
                d += 16;
            }
            if d < full {
                values_step::<T, H, 1>(&a, values, d);
            }
            for h in 0..H {
                for d in full..hd {
                    let mut acc = 0.0f32;
                    for j in 0..n {
                        let e = *a.scores.add(h * a.scores_stride + j);
                        acc = e.mul_add(values[j * hd + d].to_f32(), acc);
                    }
                    *a.out.add(h * a.out_stride + d) = acc;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::cache::F16;
    use super::*;

    fn paths() -> Vec<AttentionPath> {
        #[allow(unused_mut)] // only x86-64 has a second path
        let mut p = vec![AttentionPath::Scalar];
        #[cfg(target_arch = "x86_64")]
        if AttentionPath::Avx2.is_supported() {
            p.push(AttentionPath::Avx2);
        }
        p
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
    fn exp_is_within_two_ulp() {
        let mut x = -87.0f32;
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
        assert!(scalar::exp(-1000.0) < 1e-37);
        assert_eq!(scalar::exp(f32::NEG_INFINITY), scalar::exp(-87.0));
    }

    /// Runs `attend_group` on `path` with a padded output stride; returns
    /// each head's output.
    fn run_group(
        path: AttentionPath,
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
        );
        // The padding between rows is left alone.
        for h in 0..heads {
            assert!(out[h * os + hd..(h + 1) * os].iter().all(|v| v.is_nan()));
        }
        (0..heads)
            .map(|h| out[h * os..h * os + hd].to_vec())
            .collect()
    }

    /// `attend_chunk` of one chunk on `path`: (outputs, partials) per head.
    fn run_chunk(
        path: AttentionPath,
        q: &[f32],
        hd: usize,
        keys: KvRows<'_>,
        values: KvRows<'_>,
        range: std::ops::Range<usize>,
    ) -> (Vec<f32>, Vec<Partial>) {
        let heads = q.len() / hd;
        let (ss, os) = (range.len() + 5, hd + 3);
        let mut scores = vec![0.0; heads * ss];
        let mut out = vec![0.0; heads * os];
        let mut stats = vec![Partial::default(); heads];
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
                let want32 = run_chunk(AttentionPath::Scalar, &q, hd, k32r, v32r, range.clone());
                let want16 = run_chunk(AttentionPath::Scalar, &q, hd, k16r, v16r, range.clone());
                for path in paths() {
                    let got = run_chunk(path, &q, hd, k32r, v32r, range.clone());
                    assert_eq!(
                        got, want32,
                        "{path:?} f32 hd {hd} n {n} heads {heads} chunk {c}"
                    );
                    let got = run_chunk(path, &q, hd, k16r, v16r, range.clone());
                    assert_eq!(
                        got, want16,
                        "{path:?} f16 hd {hd} n {n} heads {heads} chunk {c}"
                    );
                }
            }
            // The whole: the paths agree to the bit, and with the formula.
            let want32 = run_group(AttentionPath::Scalar, &q, hd, k32r, v32r, n, scaling);
            let want16 = run_group(AttentionPath::Scalar, &q, hd, k16r, v16r, n, scaling);
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
        merge(heads, hd, &parts, &stats, &mut out, hd);
        for h in 0..heads {
            for d in 0..hd {
                assert_eq!(out[h * hd + d], parts[h * hd + d] / stats[h].sum);
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
