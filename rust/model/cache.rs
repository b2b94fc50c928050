//! The key/value cache of one sequence, preallocated for `n_ctx` positions.

/// Keys and values of every layer, GQA-aware: one entry per *key/value* head,
/// not per query head.
#[derive(Clone, Debug)]
pub struct KvCache {
    n_ctx: usize,
    n_kv_heads: usize,
    head_dim: usize,
    k: Vec<f32>, // [layers, n_kv_heads, n_ctx, head_dim]
    v: Vec<f32>, // [layers, n_kv_heads, n_ctx, head_dim]
}

impl KvCache {
    /// Zero pages from the allocator: memory is only touched as positions fill.
    pub fn new(n_layers: usize, n_kv_heads: usize, n_ctx: usize, head_dim: usize) -> Self {
        let len = n_layers * n_kv_heads * n_ctx * head_dim;
        KvCache {
            n_ctx,
            n_kv_heads,
            head_dim,
            k: vec![0.0; len],
            v: vec![0.0; len],
        }
    }

    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    fn head_offset(&self, layer: usize, kv_head: usize) -> usize {
        (layer * self.n_kv_heads + kv_head) * self.n_ctx * self.head_dim
    }

    /// Stores the key and value of `kv_head` at `pos` (each [head_dim]).
    pub fn write(&mut self, layer: usize, kv_head: usize, pos: usize, k: &[f32], v: &[f32]) {
        debug_assert!(pos < self.n_ctx);
        let at = self.head_offset(layer, kv_head) + pos * self.head_dim;
        self.k[at..at + self.head_dim].copy_from_slice(k);
        self.v[at..at + self.head_dim].copy_from_slice(v);
    }

    /// Keys of `kv_head` at positions 0..n, [n, head_dim].
    pub fn keys(&self, layer: usize, kv_head: usize, n: usize) -> &[f32] {
        let at = self.head_offset(layer, kv_head);
        &self.k[at..at + n * self.head_dim]
    }

    /// Values of `kv_head` at positions 0..n, [n, head_dim].
    pub fn values(&self, layer: usize, kv_head: usize, n: usize) -> &[f32] {
        let at = self.head_offset(layer, kv_head);
        &self.v[at..at + n * self.head_dim]
    }

    /// Bytes held by keys and values.
    pub fn nbytes(&self) -> usize {
        (self.k.len() + self.v.len()) * std::mem::size_of::<f32>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_and_layers_do_not_overlap() {
        let mut c = KvCache::new(2, 3, 4, 2);
        c.write(1, 2, 3, &[1.0, 2.0], &[3.0, 4.0]);
        c.write(0, 0, 0, &[5.0, 6.0], &[7.0, 8.0]);
        assert_eq!(&c.keys(1, 2, 4)[6..], &[1.0, 2.0]);
        assert_eq!(&c.values(1, 2, 4)[6..], &[3.0, 4.0]);
        assert_eq!(c.keys(0, 0, 1), &[5.0, 6.0]);
        assert_eq!(c.keys(0, 1, 4), &[0.0; 8]);
        assert_eq!(c.nbytes(), 2 * 2 * 3 * 4 * 2 * 4);
    }
}
