//! The attention kernels' arguments (`HeadGroup`, one view of the query
//! heads of a GQA group over a chunk of keys) and their dispatch by
//! `Kernel`. What attention computes, and how chunks are formed and merged,
//! is `model::attention`'s; the kernels are `scalar::attention` (the
//! definition), `x86_avx2::attention` and `x86_avx512::attention` (over
//! q8_0, and over float rows whose head_dim is whole 16-lane vectors),
//! which perform the very same floating-point operations in the same order,
//! so they agree to the bit. Keys and values are f32 or F16 rows, or q8_0
//! tiles of 16 positions (`KeyTileBlock`, `ValueTileBlock`), the queries
//! quantized to q8_0 blocks too, and integer dots for scores and for the
//! weighted sums of values.

#[cfg(target_arch = "x86_64")]
use super::counts::Isa;
use super::half::F16;
use super::q8_0::{
    BlockQ8_0, KeyTileBlock, TileBlock, TileLanes, ValueTileBlock, Q8_0_VALUES, TILE_POSITIONS,
};
use super::scalar;
use super::Kernel;
#[cfg(target_arch = "x86_64")]
use super::{x86_avx2, x86_avx512};

/// The loads the x86-64 attention paths need from an element type.
#[cfg(target_arch = "x86_64")]
pub trait ArchLoads: x86_avx2::attention::Load8 + x86_avx512::attention::Load16 {}
#[cfg(target_arch = "x86_64")]
impl<T: x86_avx2::attention::Load8 + x86_avx512::attention::Load16> ArchLoads for T {}

/// The loads an instruction set's attention needs from an element type
/// (none on this architecture).
#[cfg(not(target_arch = "x86_64"))]
pub trait ArchLoads {}
#[cfg(not(target_arch = "x86_64"))]
impl<T> ArchLoads for T {}

/// What rows of queries, keys and values are made of: `VALUES` values per
/// element.
pub trait RowElement: Copy + Send + Sync + 'static {
    const VALUES: usize;
}

impl RowElement for f32 {
    const VALUES: usize = 1;
}

impl RowElement for F16 {
    const VALUES: usize = 1;
}

impl RowElement for BlockQ8_0 {
    const VALUES: usize = Q8_0_VALUES;
}

/// What a chunk's keys or values are stored as: rows of f32 or F16, or
/// q8_0 tiles.
pub trait ChunkElement: Copy + Send + Sync + 'static {
    /// Elements that hold n positions of hd values.
    fn elements(n: usize, hd: usize) -> usize;
}

impl ChunkElement for f32 {
    fn elements(n: usize, hd: usize) -> usize {
        n * hd
    }
}

impl ChunkElement for F16 {
    fn elements(n: usize, hd: usize) -> usize {
        n * hd
    }
}

impl<L: TileLanes> ChunkElement for TileBlock<L> {
    /// Whole tiles: the last one may hold fewer than 16 positions.
    fn elements(n: usize, hd: usize) -> usize {
        n.div_ceil(TILE_POSITIONS) * (hd / Q8_0_VALUES)
    }
}

/// A float element keys and values are kept in: f32 or F16.
pub trait KvElement: RowElement + ChunkElement + Default + ArchLoads {
    fn to_f32(self) -> f32;
}

impl KvElement for f32 {
    #[inline]
    fn to_f32(self) -> f32 {
        self
    }
}

impl KvElement for F16 {
    #[inline]
    fn to_f32(self) -> f32 {
        F16::to_f32(self)
    }
}

/// One head's softmax partial over one chunk of keys.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Partial {
    /// The largest score of the chunk.
    pub max: f32,
    /// Σ exp(score - max) over the chunk.
    pub sum: f32,
}

/// Rows of a buffer laid out `stride` apart: row h is `data[h * stride..]`.
pub struct Strided<'a> {
    pub data: &'a mut [f32],
    pub stride: usize,
}

/// The query heads of one GQA group (sharing one KV head) over n keys and
/// values, with each head's scratch and output rows: the arguments of every
/// attention kernel, checked once when the view is made. The queries are
/// f32 for float keys, q8_0 blocks for q8_0 keys; keys and values are rows
/// of the same float type (K = T) or q8_0 tiles.
pub struct HeadGroup<'a, T, Q = f32, K = T> {
    q: &'a [Q],      // [heads, hd / Q::VALUES]
    keys: &'a [K],   // K::elements(n, hd): [n, hd], or [n / 16 rounded up, hd / 32] tiles
    values: &'a [T], // T::elements(n, hd), as the keys
    n: usize,
    hd: usize,
    scaling: f32,
    scores: Strided<'a>, // [heads, stride]: the first n of row h are head h's scores
    out: Strided<'a>,    // [heads, stride]: the first hd of row h are head h's output
    stats: &'a mut [Partial], // [>= heads]
    /// The keys and values of the next chunk of the sequence, which a
    /// kernel may ask the cache for while it computes this chunk
    /// (`prefetching`).
    next_chunk: (&'a [K], &'a [T]),
}

/// One head's rows inside a `HeadGroup`.
pub struct HeadRows<'g, Q = f32> {
    pub q: &'g [Q],            // [hd / Q::VALUES]
    pub scores: &'g mut [f32], // [n] scratch: scores, then softmax weights
    pub out: &'g mut [f32],    // [hd]: Σ_j exp(s_j - max) v_j
    pub stats: &'g mut Partial,
}

impl<'a, T: ChunkElement, Q: RowElement, K: ChunkElement> HeadGroup<'a, T, Q, K> {
    /// A group of heads over the `keys` and `values` of n >= 1 positions, hd
    /// values per row. Panics unless hd is a whole number of query elements,
    /// the keys and values are n positions' elements and every head's rows
    /// fit their buffers.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        q: &'a [Q],
        hd: usize,
        n: usize,
        (keys, values): (&'a [K], &'a [T]),
        scaling: f32,
        scores: Strided<'a>,
        out: Strided<'a>,
        stats: &'a mut [Partial],
    ) -> Self {
        assert!(hd >= 1 && hd.is_multiple_of(Q::VALUES) && n >= 1);
        let q_row = hd / Q::VALUES;
        assert!(!q.is_empty() && q.len().is_multiple_of(q_row));
        let heads = q.len() / q_row;
        assert_eq!(keys.len(), K::elements(n, hd));
        assert_eq!(values.len(), T::elements(n, hd));
        assert!(scores.stride >= n && scores.data.len() >= (heads - 1) * scores.stride + n);
        assert!(out.stride >= hd && out.data.len() >= (heads - 1) * out.stride + hd);
        assert!(stats.len() >= heads);
        HeadGroup {
            q,
            keys,
            values,
            n,
            hd,
            scaling,
            scores,
            out,
            stats,
            next_chunk: (&[], &[]),
        }
    }

    /// The group, with `next_chunk` (the keys and values of the sequence's
    /// next chunk) to bring into cache while this chunk is computed: the
    /// sums of values take longer than memory needs to give the next
    /// chunk's bytes, so the reads of one chunk overlap the arithmetic of
    /// the one before.
    pub fn prefetching(mut self, next_chunk: (&'a [K], &'a [T])) -> Self {
        self.next_chunk = next_chunk;
        self
    }

    /// See `prefetching` (empty if none was given).
    pub fn next_chunk(&self) -> (&'a [K], &'a [T]) {
        self.next_chunk
    }

    pub fn heads(&self) -> usize {
        self.q.len() / (self.hd / Q::VALUES)
    }

    pub fn head_dim(&self) -> usize {
        self.hd
    }

    /// Keys (and values) in the group's chunk.
    pub fn n(&self) -> usize {
        self.n
    }

    pub fn scaling(&self) -> f32 {
        self.scaling
    }

    /// Keys (`K::elements(n, hd)`) and values (`T::elements(n, hd)`).
    pub fn keys_values(&self) -> (&'a [K], &'a [T]) {
        (self.keys, self.values)
    }

    /// The rows of heads h0..h0 + H, each borrowed on its own (rows of
    /// different heads never overlap: each stride is at least its row).
    pub fn rows<const H: usize>(&mut self, h0: usize) -> [HeadRows<'_, Q>; H] {
        assert!(h0 + H <= self.heads());
        let (hd, n, q_row) = (self.hd, self.n(), self.hd / Q::VALUES);
        let mut q = self.q[h0 * q_row..].chunks_exact(q_row);
        let mut scores = self.scores.data[h0 * self.scores.stride..].chunks_mut(self.scores.stride);
        let mut out = self.out.data[h0 * self.out.stride..].chunks_mut(self.out.stride);
        let mut stats = self.stats[h0..].iter_mut();
        std::array::from_fn(|_| HeadRows {
            q: q.next().expect("checked in new"),
            scores: &mut scores.next().expect("checked in new")[..n],
            out: &mut out.next().expect("checked in new")[..hd],
            stats: stats.next().expect("checked in new"),
        })
    }
}

/// For each head h of the group, its softmax partial over the group's keys:
/// `out_h = Σ_j exp(s_j - max) v_j`, `stats_h = (max, Σ_j exp(s_j - max))`
/// with `s_j = q_h · k_j · scaling` (left in the head's scores). Every
/// path's result is exactly `scalar::attention::attend_head` of each head.
pub fn attend_chunk<T: KvElement>(kernel: Kernel, group: &mut HeadGroup<'_, T>) {
    #[cfg(target_arch = "x86_64")]
    if matches!(kernel, Kernel::Avx512Bw | Kernel::Avx512Vnni)
        && group.head_dim().is_multiple_of(16)
    {
        kernel.assert_supported();
        let isa = Isa::avx512_of(kernel);
        // SAFETY: the path runs on this CPU (asserted): it has AVX-512 F
        // and VL, and AVX2, FMA and F16C.
        unsafe { x86_avx512::attention::attend_chunk_float(isa, group) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if kernel.uses_avx2_routines() {
        kernel.assert_supported();
        // SAFETY: the path runs on this CPU (asserted), and every path that
        // uses the AVX2 routines has AVX2, FMA and F16C.
        unsafe { x86_avx2::attention::attend_chunk(group) };
        return;
    }
    let _ = kernel;
    scalar::attention::attend_chunk(group);
}

/// x_j becomes exp(x_j - max) in place (attention's exponential, so 0 at or
/// below e^-64 of the largest); returns (max, Σ_j exp(x_j - max)). Every
/// path's result is exactly `scalar::attention::softmax_weights`. The
/// sampler's softmax over a vocabulary of logits.
pub fn softmax_in_place(kernel: Kernel, x: &mut [f32]) -> Partial {
    #[cfg(target_arch = "x86_64")]
    if matches!(kernel, Kernel::Avx512Bw | Kernel::Avx512Vnni) {
        kernel.assert_supported();
        let isa = Isa::avx512_of(kernel);
        // SAFETY: the path runs on this CPU (asserted): it has AVX-512 F,
        // AVX2 and FMA.
        return unsafe { x86_avx512::attention::softmax_in_place(isa, x) };
    }
    #[cfg(target_arch = "x86_64")]
    if kernel.uses_avx2_routines() {
        kernel.assert_supported();
        // SAFETY: the path runs on this CPU (asserted), and every path that
        // uses the AVX2 routines has AVX2 and FMA.
        return unsafe { x86_avx2::attention::softmax_in_place(x) };
    }
    let _ = kernel;
    scalar::attention::softmax_weights(x)
}

/// `attend_chunk` over q8_0 keys and values (in tiles), the queries
/// quantized to q8_0 too: `s_j = scaling · Σ_b (d_q[b] · d_k[b]) · (q_b · k_b)`,
/// each block's integer dot exact, and each block of `out_h` an exact
/// integer sum of the values' codes times 14-bit codes of the weights
/// `e_j · d_v[j, b]`, scaled back (`scalar::attention::value_sums_q8_0`).
/// Every path's result is exactly `scalar::attention::attend_head_q8_0` of
/// each head.
pub fn attend_chunk_q8_0(kernel: Kernel, group: &mut Q8_0Group<'_>) {
    #[cfg(target_arch = "x86_64")]
    if kernel == Kernel::Avx512Vnni && group.head_dim() <= x86_avx512::attention::MAX_HEAD_DIM {
        kernel.assert_supported();
        // SAFETY: the path runs on this CPU (asserted): it has AVX-512 F, BW
        // and VNNI, and AVX2, FMA and F16C.
        unsafe { x86_avx512::attention::attend_chunk_q8_0_vnni(group) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if kernel.uses_avx2_routines() {
        kernel.assert_supported();
        // SAFETY: the path runs on this CPU (asserted), and every path that
        // uses the AVX2 routines has AVX2, FMA and F16C.
        unsafe { x86_avx2::attention::attend_chunk_q8_0(group) };
        return;
    }
    let _ = kernel;
    scalar::attention::attend_chunk_q8_0(group);
}

/// A head group over q8_0 keys and values.
pub type Q8_0Group<'a> = HeadGroup<'a, ValueTileBlock, BlockQ8_0, KeyTileBlock>;

/// Combines the partials of consecutive chunks, in chunk order:
/// with M the largest max and w_c = exp(max_c - M),
/// `out = Σ_c w_c out_c / Σ_c w_c sum_c` (fused multiply-adds, chunk by chunk).
/// `partial_out` is [chunks, heads, hd], `stats` [chunks, heads]; head h's
/// result goes to `out[h * out_stride..][..hd]`. The same operations on
/// every path (`scalar::attention::merge`); with FMA in hardware, each
/// `mul_add` is one instruction instead of a libm call.
pub fn merge(
    kernel: Kernel,
    heads: usize,
    hd: usize,
    partial_out: &[f32],
    stats: &[Partial],
    out: Strided<'_>,
) {
    let chunks = stats.len() / heads.max(1);
    assert!(heads >= 1 && hd >= 1 && chunks >= 1 && stats.len() == chunks * heads);
    assert!(partial_out.len() == chunks * heads * hd);
    assert!(out.stride >= hd && out.data.len() >= (heads - 1) * out.stride + hd);
    #[cfg(target_arch = "x86_64")]
    if kernel.uses_avx2_routines() {
        kernel.assert_supported();
        // SAFETY: the path runs on this CPU (asserted), and every path that
        // uses the AVX2 routines has FMA.
        unsafe { x86_avx2::attention::merge(heads, hd, partial_out, stats, out) };
        return;
    }
    let _ = kernel;
    scalar::attention::merge(heads, hd, partial_out, stats, out);
}
