//! The key/value cache of one sequence, preallocated for `n_ctx` positions,
//! in f32, in IEEE half precision or in 8-bit blocks (q8_0).

use crate::error::{Result, TritError};
use crate::kernels::half::halves_from_f32;
use crate::kernels::q8_0::{quantize_q8_0, TileBlock, TileLanes, Q8_0_VALUES, TILE_POSITIONS};
use crate::kernels::Kernel;
use crate::memory::ZeroedPages;

/// The name of the default KV cache type, resolved per model by
/// `KvType::for_head_dim`.
pub const AUTO: &str = "auto";

/// What the cache stores keys and values as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvType {
    /// Half precision (as llama.cpp and bitnet.cpp keep their caches by
    /// default): half the bytes attention reads per generated token of f32;
    /// keys and values are rounded to 11 bits.
    F16,
    /// Exactly the values computed: transformers' own attention inputs.
    F32,
    /// GGML's q8_0 (llama.cpp's `-ctk q8_0 -ctv q8_0`): blocks of 32 values
    /// as an f16 scale and 32 int8 codes, 8.5 bits a value, so attention
    /// reads 47 % fewer bytes than from f16; scores are integer dots with the
    /// queries quantized the same way. Needs head_dim a multiple of 32.
    Q8_0,
}

impl KvType {
    pub const ALL: [KvType; 3] = [KvType::F16, KvType::F32, KvType::Q8_0];

    pub fn name(self) -> &'static str {
        match self {
            KvType::F16 => "f16",
            KvType::F32 => "f32",
            KvType::Q8_0 => "q8_0",
        }
    }

    /// The type named `name`, where "auto" names none: `for_head_dim` resolves it.
    pub fn parse(name: &str) -> Result<KvType> {
        KvType::ALL
            .into_iter()
            .find(|t| t.name() == name)
            .ok_or_else(|| {
                TritError::invalid(format!(
                    "unknown KV cache type {name:?}: kv_cache must be \"auto\", \"f16\", \"f32\" \
                     or \"q8_0\""
                ))
            })
    }

    /// The type a cache named `name` takes on a model whose heads have
    /// `head_dim` values: "auto" (the default) is q8_0 wherever head_dim is a
    /// whole number of q8_0 blocks, else f16. q8_0 reads 47 % fewer bytes
    /// than f16 at every position, which keeps generation at depth within
    /// reach of depth 0 (docs/performance.md, "Generation at depth"), at a
    /// perplexity no further from f32's than f16's (README, "Precision").
    pub fn for_head_dim(name: &str, head_dim: usize) -> Result<KvType> {
        if name != AUTO {
            return KvType::parse(name);
        }
        Ok(if head_dim.is_multiple_of(Q8_0_VALUES) {
            KvType::Q8_0
        } else {
            KvType::F16
        })
    }
}

pub use crate::kernels::attention::KvElement;
pub use crate::kernels::half::F16;
pub use crate::kernels::q8_0::{BlockQ8_0, KeyTileBlock, ValueTileBlock};

/// Keys or values of one KV head at positions 0..n: rows of [n, head_dim]
/// values, or (q8_0) tiles of 16 positions.
#[derive(Clone, Copy, Debug)]
pub enum KvRows<'a> {
    F32(&'a [f32]),
    F16(&'a [F16]),
    /// [n / 16 rounded up, head_dim / 32] tile blocks: q8_0 keys, position
    /// p at lane p % 16 of tile p / 16; lanes past n are not keys.
    Q8_0Keys {
        tiles: &'a [KeyTileBlock],
        n: usize,
    },
    /// q8_0 values in tiles, as the keys.
    Q8_0Values {
        tiles: &'a [ValueTileBlock],
        n: usize,
    },
}

impl KvRows<'_> {
    /// The cache type the rows are kept in.
    pub fn kind(&self) -> KvType {
        match self {
            KvRows::F32(_) => KvType::F32,
            KvRows::F16(_) => KvType::F16,
            KvRows::Q8_0Keys { .. } | KvRows::Q8_0Values { .. } => KvType::Q8_0,
        }
    }
}

/// The cache's elements for `heads` (layers × KV heads) heads of `n_ctx`
/// positions of `hd` values each, head after head.
#[derive(Clone, Debug)]
enum Store {
    F32(ZeroedPages<f32>),                   // [heads, n_ctx, hd]
    F16(ZeroedPages<F16>),                   // [heads, n_ctx, hd]
    Q8_0Keys(ZeroedPages<KeyTileBlock>),     // [heads, n_ctx / 16 rounded up, hd / 32]
    Q8_0Values(ZeroedPages<ValueTileBlock>), // [heads, n_ctx / 16 rounded up, hd / 32]
}

/// The shape every store of a cache shares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Shape {
    heads: usize,
    n_ctx: usize,
    hd: usize,
}

impl Shape {
    /// q8_0 blocks per position (hd is whole blocks: checked in `KvCache::new`).
    fn blocks(self) -> usize {
        self.hd / Q8_0_VALUES
    }

    /// Tile blocks per head: n_ctx rounded up to whole tiles.
    fn tile_blocks(self) -> usize {
        self.n_ctx.div_ceil(TILE_POSITIONS) * self.blocks()
    }
}

impl Store {
    /// Zeros for `shape`, q8_0 keys (`keys`) or values in tiles; an error (naming
    /// `what`) if the size overflows or does not fit in memory.
    fn new(kind: KvType, keys: bool, shape: Shape, what: &str) -> Result<Store> {
        let len = |per_head: usize| {
            shape
                .heads
                .checked_mul(per_head)
                .ok_or_else(|| TritError::invalid(format!("{what}: its size overflows")))
        };
        let values = shape
            .n_ctx
            .checked_mul(shape.hd)
            .ok_or_else(|| TritError::invalid(format!("{what}: its size overflows")))?;
        // Untouched zero pages: memory is only used as positions fill
        // (`ZeroedPages` says why not in 2 MiB pages).
        let store = match kind {
            KvType::F32 => Store::F32(ZeroedPages::new(len(values)?, what)?),
            KvType::F16 => Store::F16(ZeroedPages::new(len(values)?, what)?),
            KvType::Q8_0 if keys => {
                Store::Q8_0Keys(ZeroedPages::new(len(shape.tile_blocks())?, what)?)
            }
            KvType::Q8_0 => Store::Q8_0Values(ZeroedPages::new(len(shape.tile_blocks())?, what)?),
        };
        Ok(store)
    }

    /// Writes `x` ([hd]) at position `pos` of head `head`.
    fn write(&mut self, kernel: Kernel, shape: Shape, head: usize, pos: usize, x: &[f32]) {
        let at = (head * shape.n_ctx + pos) * shape.hd;
        match self {
            Store::F32(v) => v[at..at + shape.hd].copy_from_slice(x),
            Store::F16(v) => halves_from_f32(kernel, &mut v[at..at + shape.hd], x),
            Store::Q8_0Keys(v) => write_tiles(v, kernel, shape, head, pos, x),
            Store::Q8_0Values(v) => write_tiles(v, kernel, shape, head, pos, x),
        }
    }

    /// Positions 0..n of head `head`.
    fn rows(&self, shape: Shape, head: usize, n: usize) -> KvRows<'_> {
        let at = head * shape.n_ctx * shape.hd;
        let len = n * shape.hd;
        match self {
            Store::F32(v) => KvRows::F32(&v[at..at + len]),
            Store::F16(v) => KvRows::F16(&v[at..at + len]),
            Store::Q8_0Keys(v) => KvRows::Q8_0Keys {
                tiles: tiles_of(v, shape, head, n),
                n,
            },
            Store::Q8_0Values(v) => KvRows::Q8_0Values {
                tiles: tiles_of(v, shape, head, n),
                n,
            },
        }
    }

    /// Copies positions 0..n of every head from `other` (of the same type
    /// and shape); the rest stays as it was.
    fn copy_prefix(&mut self, other: &Store, shape: Shape, n: usize) {
        for head in 0..shape.heads {
            let at = head * shape.n_ctx * shape.hd;
            let len = n * shape.hd;
            match (&mut *self, other) {
                (Store::F32(v), Store::F32(w)) => {
                    v[at..at + len].copy_from_slice(&w[at..at + len]);
                }
                (Store::F16(v), Store::F16(w)) => {
                    v[at..at + len].copy_from_slice(&w[at..at + len]);
                }
                (Store::Q8_0Keys(v), Store::Q8_0Keys(w)) => copy_tiles(v, w, shape, head, n),
                (Store::Q8_0Values(v), Store::Q8_0Values(w)) => copy_tiles(v, w, shape, head, n),
                _ => unreachable!("caches of one engine share their type"),
            }
        }
    }

    fn nbytes(&self) -> usize {
        match self {
            Store::F32(v) => std::mem::size_of_val(&v[..]),
            Store::F16(v) => std::mem::size_of_val(&v[..]),
            Store::Q8_0Keys(v) => std::mem::size_of_val(&v[..]),
            Store::Q8_0Values(v) => std::mem::size_of_val(&v[..]),
        }
    }
}

/// Writes `x` ([hd]) at position `pos` of head `head` of q8_0 tiles
/// ([heads, n_ctx / 16 rounded up, hd / 32]): quantized a few blocks at a
/// time on the stack, then scattered into the position's lane.
fn write_tiles<L: TileLanes>(
    tiles: &mut [TileBlock<L>],
    kernel: Kernel,
    shape: Shape,
    head: usize,
    pos: usize,
    x: &[f32],
) {
    let tile = head * shape.tile_blocks() + pos / TILE_POSITIONS * shape.blocks();
    let tile = &mut tiles[tile..tile + shape.blocks()];
    let mut blocks = [BlockQ8_0::default(); 8];
    for (tile, x) in tile
        .chunks_mut(blocks.len())
        .zip(x.chunks(blocks.len() * Q8_0_VALUES))
    {
        let blocks = &mut blocks[..tile.len()];
        quantize_q8_0(kernel, blocks, x);
        for (t, block) in tile.iter_mut().zip(blocks.iter()) {
            t.set(pos % TILE_POSITIONS, block);
        }
    }
}

/// The tiles of positions 0..n of head `head`.
fn tiles_of<L: TileLanes>(
    tiles: &[TileBlock<L>],
    shape: Shape,
    head: usize,
    n: usize,
) -> &[TileBlock<L>] {
    let at = head * shape.tile_blocks();
    &tiles[at..at + n.div_ceil(TILE_POSITIONS) * shape.blocks()]
}

/// Copies positions 0..n of head `head` from `from`: whole tiles, then the
/// lanes below n of a partial one (the rest of it stays as it was).
fn copy_tiles<L: TileLanes>(
    to: &mut [TileBlock<L>],
    from: &[TileBlock<L>],
    shape: Shape,
    head: usize,
    n: usize,
) {
    let at = head * shape.tile_blocks();
    let whole = at..at + n / TILE_POSITIONS * shape.blocks();
    to[whole.clone()].copy_from_slice(&from[whole.clone()]);
    let lanes = n % TILE_POSITIONS;
    if lanes > 0 {
        let partial = whole.end..whole.end + shape.blocks();
        for (t, o) in to[partial.clone()].iter_mut().zip(&from[partial]) {
            for u in 0..lanes {
                t.set(u, &o.get(u));
            }
        }
    }
}

/// Keys and values of every layer, GQA-aware: one entry per *key/value* head,
/// not per query head.
#[derive(Clone, Debug)]
pub struct KvCache {
    shape: Shape, // heads = layers × KV heads
    n_kv_heads: usize,
    kind: KvType,
    /// The path that converts what is written to half precision or q8_0.
    kernel: Kernel,
    /// [layers, n_kv_heads, n_ctx, head_dim] values; q8_0 keys and values
    /// in tiles of 16 positions (`TileBlock`): the scores' kernels read 16
    /// keys' codes per load, the value sums four positions' codes per load.
    k: Store,
    v: Store, // as `k`
}

impl KvCache {
    /// A cache for `n_ctx` positions (q8_0 in whole tiles of 16: n_ctx
    /// rounded up); an error (naming n_ctx) if it does not fit this
    /// machine's memory or address space, or (naming the type and head_dim)
    /// if head_dim is not a whole number of q8_0 blocks.
    pub fn new(
        n_layers: usize,
        n_kv_heads: usize,
        n_ctx: usize,
        head_dim: usize,
        kind: KvType,
        kernel: Kernel,
    ) -> Result<Self> {
        if kind == KvType::Q8_0 && !head_dim.is_multiple_of(Q8_0_VALUES) {
            return Err(TritError::invalid(format!(
                "the KV cache type \"q8_0\" stores blocks of {Q8_0_VALUES} values, and the \
                 model's head_dim ({head_dim}) is not a multiple of {Q8_0_VALUES}; use \
                 kv_cache=\"f16\" or \"f32\""
            )));
        }
        let what = format!(
            "the KV cache of n_ctx = {n_ctx} positions ({n_layers} layers, {n_kv_heads} \
             key/value heads of {head_dim}); pass a smaller n_ctx"
        );
        let heads = n_layers
            .checked_mul(n_kv_heads)
            .ok_or_else(|| TritError::invalid(format!("{what}: its size overflows")))?;
        let shape = Shape {
            heads,
            n_ctx,
            hd: head_dim,
        };
        Ok(KvCache {
            shape,
            n_kv_heads,
            kind,
            kernel,
            k: Store::new(kind, true, shape, &what)?,
            v: Store::new(kind, false, shape, &what)?,
        })
    }

    pub fn n_ctx(&self) -> usize {
        self.shape.n_ctx
    }

    pub fn kind(&self) -> KvType {
        self.kind
    }

    /// The store's head index of `kv_head` of `layer`.
    fn head(&self, layer: usize, kv_head: usize) -> usize {
        debug_assert!(kv_head < self.n_kv_heads);
        layer * self.n_kv_heads + kv_head
    }

    /// Stores the key and value of `kv_head` at `pos` (each [head_dim]).
    pub fn write(&mut self, layer: usize, kv_head: usize, pos: usize, k: &[f32], v: &[f32]) {
        debug_assert!(pos < self.shape.n_ctx);
        let (head, hd) = (self.head(layer, kv_head), self.shape.hd);
        self.k.write(self.kernel, self.shape, head, pos, &k[..hd]);
        self.v.write(self.kernel, self.shape, head, pos, &v[..hd]);
    }

    /// Keys of `kv_head` at positions 0..n.
    pub fn keys(&self, layer: usize, kv_head: usize, n: usize) -> KvRows<'_> {
        self.k.rows(self.shape, self.head(layer, kv_head), n)
    }

    /// Values of `kv_head` at positions 0..n, [n, head_dim].
    pub fn values(&self, layer: usize, kv_head: usize, n: usize) -> KvRows<'_> {
        self.v.rows(self.shape, self.head(layer, kv_head), n)
    }

    /// Makes positions 0..n hold `other`'s (a cache of the same shape and
    /// type): a prefix that another sequence already computed.
    pub fn copy_prefix(&mut self, other: &KvCache, n: usize) {
        assert!(
            n <= self.shape.n_ctx
                && (self.shape, self.n_kv_heads, self.kind)
                    == (other.shape, other.n_kv_heads, other.kind)
        );
        self.k.copy_prefix(&other.k, self.shape, n);
        self.v.copy_prefix(&other.v, self.shape, n);
    }

    /// Bytes held by keys and values.
    pub fn nbytes(&self) -> usize {
        self.k.nbytes() + self.v.nbytes()
    }

    /// Bytes of keys and values one position takes, over all layers and
    /// heads (what a filled position costs; `nbytes` also counts the q8_0
    /// last tiles, rounded up to 16 positions).
    pub fn bytes_per_position(&self) -> usize {
        let Shape { heads, hd, .. } = self.shape;
        let per_value_pair = match self.kind {
            KvType::F32 => 2 * hd * 4,
            KvType::F16 => 2 * hd * 2,
            KvType::Q8_0 => 2 * self.shape.blocks() * std::mem::size_of::<BlockQ8_0>(),
        };
        heads * per_value_pair
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32s(rows: KvRows<'_>) -> Vec<f32> {
        match rows {
            KvRows::F32(v) => v.to_vec(),
            KvRows::F16(v) => v.iter().map(|h| h.to_f32()).collect(),
            KvRows::Q8_0Keys { .. } | KvRows::Q8_0Values { .. } => {
                blocks(rows).iter().flat_map(|b| b.dequantize()).collect()
            }
        }
    }

    /// The q8_0 blocks of positions 0..n, [n, head_dim / 32], read from
    /// tiles.
    fn blocks(rows: KvRows<'_>) -> Vec<BlockQ8_0> {
        fn of<L: TileLanes>(tiles: &[TileBlock<L>], n: usize) -> Vec<BlockQ8_0> {
            let per_tile = tiles.len() / n.div_ceil(TILE_POSITIONS);
            (0..n)
                .flat_map(|p| {
                    let tile = &tiles[p / TILE_POSITIONS * per_tile..][..per_tile];
                    tile.iter().map(move |t| t.get(p % TILE_POSITIONS))
                })
                .collect()
        }
        match rows {
            KvRows::Q8_0Keys { tiles, n } => of(tiles, n),
            KvRows::Q8_0Values { tiles, n } => of(tiles, n),
            _ => panic!("not a q8_0 store"),
        }
    }

    const HD: usize = 32;

    /// A row of HD values that every type holds exactly: integers, with
    /// 127 making the q8_0 scale 1.
    fn row(a: f32, b: f32) -> Vec<f32> {
        let mut r = vec![0.0; HD];
        (r[0], r[1], r[HD - 1]) = (a, b, 127.0);
        r
    }

    #[test]
    fn heads_and_layers_do_not_overlap() {
        for kind in KvType::ALL {
            let mut c = KvCache::new(2, 3, 4, HD, kind, Kernel::Scalar).unwrap();
            c.write(1, 2, 3, &row(1.0, 2.0), &row(3.0, 4.0));
            c.write(0, 0, 0, &row(5.0, 6.0), &row(7.0, 8.0));
            assert_eq!(&f32s(c.keys(1, 2, 4))[3 * HD..], &row(1.0, 2.0));
            assert_eq!(&f32s(c.values(1, 2, 4))[3 * HD..], &row(3.0, 4.0));
            assert_eq!(f32s(c.keys(0, 0, 1)), row(5.0, 6.0));
            assert_eq!(f32s(c.keys(0, 1, 4)), vec![0.0; 4 * HD]);
            let values = 2 * 2 * 3 * 4 * HD; // keys and values, layers, heads, n_ctx, hd
            let bytes = match kind {
                KvType::F32 => values * 4,
                KvType::F16 => values * 2,
                // Keys and values in whole tiles of 16 positions.
                KvType::Q8_0 => 2 * 2 * 3 * 16 * HD / 32 * 34,
            };
            assert_eq!(c.nbytes(), bytes, "{kind:?}");
            // Per position: exactly, where n_ctx = 4 leaves 12 positions
            // of each q8_0 tile unused.
            let per_position = match kind {
                KvType::Q8_0 => 2 * 2 * 3 * HD / 32 * 34,
                _ => bytes / 4,
            };
            assert_eq!(c.bytes_per_position(), per_position, "{kind:?}");
        }
    }

    #[test]
    fn a_cache_too_large_is_an_error_naming_n_ctx() {
        for kind in KvType::ALL {
            for (n_ctx, overflow) in [(1usize << 40, false), (1 << 58, true), (1 << 62, true)] {
                let err = KvCache::new(30, 5, n_ctx, 128, kind, Kernel::Scalar).unwrap_err();
                let text = err.to_string();
                assert!(text.contains(&format!("n_ctx = {n_ctx}")), "{text}");
                if overflow {
                    assert!(matches!(err, TritError::InvalidInput(_)), "{err:?}");
                } else {
                    assert!(matches!(err, TritError::OutOfMemory(_)), "{err:?}");
                }
            }
        }
    }

    #[test]
    fn q8_0_needs_whole_blocks_per_head() {
        for head_dim in [16, 24, 48, 100] {
            let err = KvCache::new(2, 2, 8, head_dim, KvType::Q8_0, Kernel::Scalar).unwrap_err();
            let text = err.to_string();
            assert!(matches!(err, TritError::InvalidInput(_)), "{err:?}");
            assert!(
                text.contains("q8_0") && text.contains(&format!("head_dim ({head_dim})")),
                "{text}"
            );
            assert!(KvCache::new(2, 2, 8, head_dim, KvType::F16, Kernel::Scalar).is_ok());
        }
        assert!(KvCache::new(2, 2, 8, 64, KvType::Q8_0, Kernel::Scalar).is_ok());
    }

    #[test]
    fn a_copied_prefix_is_the_other_cache_s_rows_and_nothing_more() {
        for kind in KvType::ALL {
            let mut a = KvCache::new(2, 2, 3, HD, kind, Kernel::Scalar).unwrap();
            let mut b = KvCache::new(2, 2, 3, HD, kind, Kernel::Scalar).unwrap();
            for (layer, head, pos) in [(0, 0, 0), (1, 1, 1), (1, 0, 2)] {
                let x = (layer * 4 + head * 2 + pos) as f32;
                b.write(layer, head, pos, &row(x, x + 1.0), &row(-x, 1.0));
            }
            a.copy_prefix(&b, 2);
            let zero = vec![0.0; HD];
            assert_eq!(
                f32s(a.keys(0, 0, 3)),
                [row(0.0, 1.0), zero.clone(), zero.clone()].concat()
            );
            assert_eq!(
                f32s(a.keys(1, 1, 3)),
                [zero.clone(), row(7.0, 8.0), zero.clone()].concat()
            );
            assert_eq!(f32s(a.values(1, 1, 2))[HD..], row(-7.0, 1.0));
            // Position 2 lies beyond the prefix.
            assert_eq!(f32s(a.keys(1, 0, 3)), vec![0.0; 3 * HD], "{kind:?}");
        }
    }

    #[test]
    fn q8_0_rows_are_the_blocks_of_what_was_written() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut float = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 * 6.0 - 3.0
        };
        let hd = 64;
        for kernel in Kernel::supported() {
            let mut c = KvCache::new(1, 2, 5, hd, KvType::Q8_0, kernel).unwrap();
            let k: Vec<f32> = (0..hd).map(|_| float()).collect();
            let v: Vec<f32> = (0..hd).map(|_| float()).collect();
            c.write(0, 1, 2, &k, &v);
            let keys = c.keys(0, 1, 3);
            assert!(matches!(keys, KvRows::Q8_0Keys { n: 3, .. }), "{keys:?}");
            let mut want = vec![BlockQ8_0::default(); 2];
            crate::kernels::scalar::q8_0::quantize(&mut want, &k);
            assert_eq!(&blocks(keys)[4..], &want[..], "{kernel}");
            for (got, x) in f32s(c.values(0, 1, 3))[2 * hd..].iter().zip(&v) {
                // Half a step (d = max|x| / 127, max|x| < 3), plus the f16
                // rounding of d (2^-11 of it) times a code of up to 127.
                assert!((got - x).abs() <= 3.0 / 127.0 * 0.57, "{got} vs {x}");
            }
        }
    }

    /// Keys and values of every position of several tiles (a partial last
    /// one) read back through the tiles as the blocks written, each head its
    /// own; a copied prefix ending inside a tile takes the other cache's
    /// keys and values below n only.
    #[test]
    fn q8_0_tiles_hold_each_position_s_blocks() {
        let (hd, n_ctx) = (96, 37);
        let key = |head: usize, pos: usize| -> Vec<f32> {
            (0..hd)
                .map(|i| ((head * 131 + pos * 17 + i * 7) % 255) as f32 - 127.0)
                .collect()
        };
        let quantized = |x: &[f32]| {
            let mut b = vec![BlockQ8_0::default(); x.len() / 32];
            crate::kernels::scalar::q8_0::quantize(&mut b, x);
            b
        };
        let mut a = KvCache::new(2, 2, n_ctx, hd, KvType::Q8_0, Kernel::Scalar).unwrap();
        let mut b = KvCache::new(2, 2, n_ctx, hd, KvType::Q8_0, Kernel::Scalar).unwrap();
        // Values are the "keys" of heads 8.. .
        for (layer, head) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
            for pos in 0..n_ctx {
                let h = layer * 2 + head;
                a.write(layer, head, pos, &key(h, pos), &key(h + 8, pos));
                b.write(layer, head, pos, &key(h + 4, pos), &key(h + 12, pos));
            }
        }
        for (layer, head) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
            let h = layer * 2 + head;
            let want =
                |h| -> Vec<BlockQ8_0> { (0..n_ctx).flat_map(|p| quantized(&key(h, p))).collect() };
            for n in [1, 15, 16, 17, 32, 37] {
                let got = blocks(a.keys(layer, head, n));
                assert_eq!(got, want(h)[..n * hd / 32], "head {h} n {n}");
                let got = blocks(a.values(layer, head, n));
                assert_eq!(got, want(h + 8)[..n * hd / 32], "values: head {h} n {n}");
            }
        }
        for n in [0, 5, 16, 21, 37] {
            let mut c = a.clone();
            c.copy_prefix(&b, n);
            for (layer, head) in [(0, 0), (1, 1)] {
                let h = layer * 2 + head;
                let keys = blocks(c.keys(layer, head, n_ctx));
                let values = blocks(c.values(layer, head, n_ctx));
                for p in 0..n_ctx {
                    let src = if p < n { h + 4 } else { h };
                    assert_eq!(
                        keys[p * 3..p * 3 + 3],
                        quantized(&key(src, p)),
                        "n {n} p {p}"
                    );
                    assert_eq!(
                        values[p * 3..p * 3 + 3],
                        quantized(&key(src + 8, p)),
                        "values: n {n} p {p}"
                    );
                }
            }
        }
    }

    /// A sequence's first token takes a page per head and layer, not the
    /// cache: with 2 MiB pages it took 2 MiB per head and layer (here), and
    /// the whole cache where a head's positions fill a MiB or less.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_first_position_takes_pages_not_the_whole_cache() {
        const MB: usize = 1 << 20;
        // 2 layers, 64 heads of 32 values, 2^18 positions: 4 stores of 1 GiB
        // (f16) or 544 MiB (q8_0), each head's positions 16 MiB (8.5) long.
        for kind in [KvType::F16, KvType::Q8_0] {
            let before = crate::memory::resident_bytes();
            let mut c = KvCache::new(2, 64, 1 << 18, 32, kind, Kernel::Scalar).unwrap();
            let x = [0.5f32; 32];
            for layer in 0..2 {
                for head in 0..64 {
                    c.write(layer, head, 0, &x, &x);
                }
            }
            let after = crate::memory::resident_bytes();
            // 256 pages of 4 KiB written: 1 MiB; in 2 MiB pages it was 512 MiB.
            // Other tests run alongside: allow them some growth.
            assert!(
                after < before + 96 * MB,
                "{kind:?}: {} MiB -> {} MiB",
                before / MB,
                after / MB
            );
            assert_eq!(c.keys(1, 63, 1).kind(), kind);
        }
    }

    #[test]
    fn kv_types_parse_by_name() {
        for kind in KvType::ALL {
            assert_eq!(KvType::parse(kind.name()).unwrap(), kind);
        }
        assert_eq!(KvType::parse("q8_0").unwrap(), KvType::Q8_0);
        let err = KvType::parse("q4_0").unwrap_err().to_string();
        assert!(
            err.contains("kv_cache") && err.contains("\"q4_0\""),
            "{err}"
        );
        for kind in KvType::ALL {
            assert!(err.contains(&format!("\"{}\"", kind.name())), "{err}");
        }
        assert!(err.contains("\"auto\""), "{err}");
    }

    #[test]
    fn auto_is_q8_0_where_head_dim_is_whole_blocks_else_f16() {
        for (head_dim, want) in [(128, KvType::Q8_0), (64, KvType::Q8_0), (32, KvType::Q8_0)] {
            assert_eq!(KvType::for_head_dim(AUTO, head_dim).unwrap(), want);
        }
        for head_dim in [100, 48, 8, 1] {
            assert_eq!(KvType::for_head_dim(AUTO, head_dim).unwrap(), KvType::F16);
        }
        // A named type stays what it names, and q8_0 stays refused where it cannot hold a head.
        for kind in KvType::ALL {
            assert_eq!(KvType::for_head_dim(kind.name(), 100).unwrap(), kind);
        }
        assert!(KvCache::new(
            1,
            1,
            4,
            100,
            KvType::for_head_dim("q8_0", 100).unwrap(),
            Kernel::Scalar
        )
        .is_err());
        assert!(KvType::for_head_dim("Auto", 128).is_err());
    }
}
