//! The key/value cache of one sequence, preallocated for `n_ctx` positions,
//! in f32 or in IEEE half precision.

use crate::error::{Result, TritError};
use crate::kernels::half::halves_from_f32;
use crate::kernels::Kernel;
use crate::memory::try_zeroed;

/// What the cache stores keys and values as.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvType {
    /// Half precision (as llama.cpp and bitnet.cpp keep their caches): half
    /// the bytes attention reads per generated token, so a long context slows
    /// generation half as much; keys and values are rounded to 11 bits.
    #[default]
    F16,
    /// Exactly the values computed: transformers' own attention inputs.
    F32,
}

impl KvType {
    pub const ALL: [KvType; 2] = [KvType::F16, KvType::F32];

    pub fn name(self) -> &'static str {
        match self {
            KvType::F16 => "f16",
            KvType::F32 => "f32",
        }
    }

    pub fn parse(name: &str) -> Result<KvType> {
        KvType::ALL
            .into_iter()
            .find(|t| t.name() == name)
            .ok_or_else(|| {
                TritError::invalid(format!(
                    "unknown KV cache type {name:?}; expected \"f16\" or \"f32\""
                ))
            })
    }
}

pub use crate::kernels::attention::KvElement;
pub use crate::kernels::half::F16;

/// Rows of keys or values of one KV head, [n, head_dim].
#[derive(Clone, Copy, Debug)]
pub enum KvRows<'a> {
    F32(&'a [f32]),
    F16(&'a [F16]),
}

#[derive(Clone, Debug)]
enum Store {
    F32(Vec<f32>),
    F16(Vec<F16>),
}

impl Store {
    fn new(kind: KvType, len: usize, what: &str) -> Result<Store> {
        // Zero pages from the allocator: memory is only touched as positions fill.
        Ok(match kind {
            KvType::F32 => Store::F32(try_zeroed(len, what)?),
            KvType::F16 => Store::F16(try_zeroed(len, what)?),
        })
    }

    fn write(&mut self, kernel: Kernel, at: usize, x: &[f32]) {
        match self {
            Store::F32(v) => v[at..at + x.len()].copy_from_slice(x),
            Store::F16(v) => halves_from_f32(kernel, &mut v[at..at + x.len()], x),
        }
    }

    fn rows(&self, at: usize, len: usize) -> KvRows<'_> {
        match self {
            Store::F32(v) => KvRows::F32(&v[at..at + len]),
            Store::F16(v) => KvRows::F16(&v[at..at + len]),
        }
    }

    /// Copies `len` elements at `at` from `other` (of the same type).
    fn copy_from(&mut self, other: &Store, at: usize, len: usize) {
        match (self, other) {
            (Store::F32(v), Store::F32(w)) => v[at..at + len].copy_from_slice(&w[at..at + len]),
            (Store::F16(v), Store::F16(w)) => v[at..at + len].copy_from_slice(&w[at..at + len]),
            _ => unreachable!("caches of one engine share their type"),
        }
    }

    fn len(&self) -> usize {
        match self {
            Store::F32(v) => v.len(),
            Store::F16(v) => v.len(),
        }
    }

    fn nbytes(&self) -> usize {
        match self {
            Store::F32(v) => v.len() * 4,
            Store::F16(v) => v.len() * 2,
        }
    }
}

/// Keys and values of every layer, GQA-aware: one entry per *key/value* head,
/// not per query head.
#[derive(Clone, Debug)]
pub struct KvCache {
    n_ctx: usize,
    n_kv_heads: usize,
    head_dim: usize,
    kind: KvType,
    /// The path that converts what is written to half precision.
    kernel: Kernel,
    k: Store, // [layers, n_kv_heads, n_ctx, head_dim]
    v: Store, // [layers, n_kv_heads, n_ctx, head_dim]
}

impl KvCache {
    /// A cache for `n_ctx` positions; an error (naming n_ctx) if it does not
    /// fit this machine's memory or address space.
    pub fn new(
        n_layers: usize,
        n_kv_heads: usize,
        n_ctx: usize,
        head_dim: usize,
        kind: KvType,
        kernel: Kernel,
    ) -> Result<Self> {
        let what = format!(
            "the KV cache of n_ctx = {n_ctx} positions ({n_layers} layers, {n_kv_heads} \
             key/value heads of {head_dim}); pass a smaller n_ctx"
        );
        let len = [n_kv_heads, n_ctx, head_dim]
            .iter()
            .try_fold(n_layers, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| TritError::invalid(format!("{what}: its size overflows")))?;
        Ok(KvCache {
            n_ctx,
            n_kv_heads,
            head_dim,
            kind,
            kernel,
            k: Store::new(kind, len, &what)?,
            v: Store::new(kind, len, &what)?,
        })
    }

    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    pub fn kind(&self) -> KvType {
        self.kind
    }

    fn head_offset(&self, layer: usize, kv_head: usize) -> usize {
        (layer * self.n_kv_heads + kv_head) * self.n_ctx * self.head_dim
    }

    /// Stores the key and value of `kv_head` at `pos` (each [head_dim]).
    pub fn write(&mut self, layer: usize, kv_head: usize, pos: usize, k: &[f32], v: &[f32]) {
        debug_assert!(pos < self.n_ctx);
        let at = self.head_offset(layer, kv_head) + pos * self.head_dim;
        self.k.write(self.kernel, at, &k[..self.head_dim]);
        self.v.write(self.kernel, at, &v[..self.head_dim]);
    }

    /// Keys of `kv_head` at positions 0..n, [n, head_dim].
    pub fn keys(&self, layer: usize, kv_head: usize, n: usize) -> KvRows<'_> {
        self.k
            .rows(self.head_offset(layer, kv_head), n * self.head_dim)
    }

    /// Values of `kv_head` at positions 0..n, [n, head_dim].
    pub fn values(&self, layer: usize, kv_head: usize, n: usize) -> KvRows<'_> {
        self.v
            .rows(self.head_offset(layer, kv_head), n * self.head_dim)
    }

    /// Makes positions 0..n hold `other`'s (a cache of the same shape and
    /// type): a prefix that another sequence already computed.
    pub fn copy_prefix(&mut self, other: &KvCache, n: usize) {
        assert!(
            n <= self.n_ctx
                && (self.n_ctx, self.n_kv_heads, self.head_dim, self.kind)
                    == (other.n_ctx, other.n_kv_heads, other.head_dim, other.kind)
        );
        let heads = self.k.len() / (self.n_ctx * self.head_dim);
        for head in 0..heads {
            let at = head * self.n_ctx * self.head_dim;
            self.k.copy_from(&other.k, at, n * self.head_dim);
            self.v.copy_from(&other.v, at, n * self.head_dim);
        }
    }

    /// Bytes held by keys and values.
    pub fn nbytes(&self) -> usize {
        self.k.nbytes() + self.v.nbytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32s(rows: KvRows<'_>) -> Vec<f32> {
        match rows {
            KvRows::F32(v) => v.to_vec(),
            KvRows::F16(v) => v.iter().map(|h| h.to_f32()).collect(),
        }
    }

    #[test]
    fn heads_and_layers_do_not_overlap() {
        for kind in KvType::ALL {
            let mut c = KvCache::new(2, 3, 4, 2, kind, Kernel::Scalar).unwrap();
            c.write(1, 2, 3, &[1.0, 2.0], &[3.0, 4.0]);
            c.write(0, 0, 0, &[5.0, 6.0], &[7.0, 8.0]);
            assert_eq!(&f32s(c.keys(1, 2, 4))[6..], &[1.0, 2.0]);
            assert_eq!(&f32s(c.values(1, 2, 4))[6..], &[3.0, 4.0]);
            assert_eq!(f32s(c.keys(0, 0, 1)), &[5.0, 6.0]);
            assert_eq!(f32s(c.keys(0, 1, 4)), &[0.0; 8]);
            let size = if kind == KvType::F32 { 4 } else { 2 };
            assert_eq!(c.nbytes(), 2 * 2 * 3 * 4 * 2 * size);
        }
    }

    #[test]
    fn a_cache_too_large_is_an_error_naming_n_ctx() {
        for (n_ctx, overflow) in [(1usize << 40, false), (1 << 58, true), (1 << 62, true)] {
            let err = KvCache::new(30, 5, n_ctx, 128, KvType::F16, Kernel::Scalar).unwrap_err();
            let text = err.to_string();
            assert!(text.contains(&format!("n_ctx = {n_ctx}")), "{text}");
            if overflow {
                assert!(matches!(err, TritError::InvalidInput(_)), "{err:?}");
            } else {
                assert!(matches!(err, TritError::OutOfMemory(_)), "{err:?}");
            }
        }
    }

    #[test]
    fn a_copied_prefix_is_the_other_cache_s_rows_and_nothing_more() {
        for kind in KvType::ALL {
            let mut a = KvCache::new(2, 2, 3, 2, kind, Kernel::Scalar).unwrap();
            let mut b = KvCache::new(2, 2, 3, 2, kind, Kernel::Scalar).unwrap();
            for (layer, head, pos) in [(0, 0, 0), (1, 1, 1), (1, 0, 2)] {
                let x = (layer * 4 + head * 2 + pos) as f32;
                b.write(layer, head, pos, &[x, x + 0.5], &[-x, 1.0]);
            }
            a.copy_prefix(&b, 2);
            assert_eq!(f32s(a.keys(0, 0, 3)), &[0.0, 0.5, 0.0, 0.0, 0.0, 0.0]);
            assert_eq!(f32s(a.keys(1, 1, 3)), &[0.0, 0.0, 7.0, 7.5, 0.0, 0.0]);
            assert_eq!(f32s(a.values(1, 1, 2))[2..], [-7.0, 1.0]);
            // Position 2 lies beyond the prefix.
            assert_eq!(f32s(a.keys(1, 0, 3)), &[0.0; 6]);
        }
    }

    #[test]
    fn kv_types_parse_by_name() {
        assert_eq!(KvType::parse("f16").unwrap(), KvType::F16);
        assert_eq!(KvType::parse("f32").unwrap(), KvType::F32);
        assert!(KvType::parse("q8_0").is_err());
    }
}
