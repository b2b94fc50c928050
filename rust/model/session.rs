//! One sequence being run through a model: its KV cache, its scratch
//! buffers, and the forward pass (docs/formats.md "Forward pass").
//!
//! A prompt is processed in batches (GEMM, causal attention inside the batch),
//! then tokens one at a time (GEMV). A new prompt that starts with tokens
//! already in the cache only processes the rest. Every forward pass runs
//! inside one `pool.install`, so the matmuls are issued from a pool thread
//! (calling into a pool from outside costs tens of µs per call).

use std::sync::Arc;

use rayon::prelude::*;
use rayon::ThreadPool;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::attention::{attend_chunk, attend_group, merge, ChunkScratch, Partial, KEY_CHUNK};
use super::cache::{KvCache, KvType};
use super::config::Activation;
use super::ops::{add_rms_norm_rows, add_rows, glu_rows, rms_norm, rms_norm_rows, Rope};
use super::scoring::next_token_nll;
use super::weights::{Model, Proj};
use crate::error::{Result, TritError};
use crate::kernels::{
    matmul_glu_into, matmul_into, matmul_many_into, Kernel, QuantizedActivations,
};
use crate::threads;

/// Most tokens of a prompt processed in one batch: bounds the scratch memory
/// ([batch, intermediate] floats) while keeping the GEMMs wide.
pub const MAX_BATCH: usize = 256;

/// Which positions of a batch need logits.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Logits {
    /// Only the last token's (prompt processing and decoding).
    Last,
    /// Those of every position from this one (of the sequence) on, each
    /// handed to the row sink as soon as it is computed.
    From(usize),
}

/// Receives `(position, [vocab] logits)` for each position that `Logits::From`
/// asks for; the row is overwritten by the next one.
type RowSink<'a> = dyn FnMut(usize, &[f32]) + Send + 'a;

/// Buffers reused from call to call; sized for the largest batch seen.
#[derive(Default)]
struct Scratch {
    x: Vec<f32>,         // [T, hidden] residual stream
    a: Vec<f32>,         // [T, hidden] normalised input of a block
    q: Vec<f32>,         // [T, n_heads * head_dim]
    k: Vec<f32>,         // [T, n_kv_heads * head_dim]
    v: Vec<f32>,         // [T, n_kv_heads * head_dim]
    o: Vec<f32>,         // [T, n_heads * head_dim] attention output, token-major
    proj: Vec<f32>,      // [T, hidden] output of o_proj / down_proj
    h: Vec<f32>,         // [T, intermediate] act(gate) · up
    up: Vec<f32>,        // [T, intermediate] up_proj output (SiLU families)
    h_normed: Vec<f32>,  // [T, intermediate] h after ffn_sub_norm
    normed_in: Vec<f32>, // [T, n_in] a projection's input after its own RMSNorm (use_rms_norm)
    attn: AttentionScratch,
    normed: Vec<f32>, // [hidden] final-normed token
    qa: QuantizedActivations,
}

/// Resizes without shrinking capacity: no allocation once the largest batch ran.
fn fit(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    buf.resize(len, 0.0);
    &mut buf[..]
}

/// One sequence: cache, tokens in it, and the logits after its last token.
pub struct Session {
    model: Arc<Model>,
    pool: Arc<ThreadPool>,
    /// The SIMD path of every routine this session runs.
    kernel: Kernel,
    rope: Rope,
    cache: KvCache,
    /// The tokens whose keys and values are in the cache, in order.
    tokens: Vec<u32>,
    /// [vocab] logits predicting the token after `tokens` (empty when unknown).
    last_logits: Vec<f32>,
    scratch: Scratch,
}

impl Session {
    /// A session of up to `n_ctx` positions (at most the model's
    /// max_position_embeddings), running on `threads` threads (None: default),
    /// its cache holding keys and values as `kv`, on the process's kernel
    /// path (`Kernel::active`).
    pub fn new(
        model: Arc<Model>,
        n_ctx: Option<usize>,
        threads: Option<usize>,
        kv: KvType,
    ) -> Result<Self> {
        Session::with_kernel(model, n_ctx, threads, kv, Kernel::active()?)
    }

    /// `new` on the kernel path `kernel` (an error if this CPU cannot run it).
    pub fn with_kernel(
        model: Arc<Model>,
        n_ctx: Option<usize>,
        threads: Option<usize>,
        kv: KvType,
        kernel: Kernel,
    ) -> Result<Self> {
        let kernel = kernel.require()?;
        let c = &model.config;
        let n_ctx = n_ctx.unwrap_or(c.max_position_embeddings);
        if n_ctx == 0 || n_ctx > c.max_position_embeddings {
            return Err(TritError::invalid(format!(
                "n_ctx must be between 1 and the model's max_position_embeddings ({}), got {n_ctx}",
                c.max_position_embeddings
            )));
        }
        let pool = threads::pool(threads)?;
        let rope = Rope::for_config(c, n_ctx);
        let cache = KvCache::new(c.num_layers, c.num_kv_heads, n_ctx, c.head_dim, kv, kernel);
        let scratch = Scratch {
            attn: AttentionScratch::new(c.num_heads, c.head_dim, n_ctx),
            normed: vec![0.0; c.hidden_size],
            ..Default::default()
        };
        Ok(Session {
            model,
            pool,
            kernel,
            rope,
            cache,
            tokens: Vec::new(),
            last_logits: Vec::new(),
            scratch,
        })
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    pub fn n_ctx(&self) -> usize {
        self.cache.n_ctx()
    }

    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// Tokens currently in the cache.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Logits predicting the next token, [vocab]; None before any input.
    pub fn last_logits(&self) -> Option<&[f32]> {
        (!self.last_logits.is_empty()).then_some(&self.last_logits[..])
    }

    /// Forgets the cached tokens.
    pub fn reset(&mut self) {
        self.tokens.clear();
        self.last_logits.clear();
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        if ids.is_empty() {
            return Err(TritError::invalid("the input has no tokens"));
        }
        if ids.len() > self.n_ctx() {
            return Err(TritError::invalid(format!(
                "the input has {} tokens, more than the context size n_ctx = {}",
                ids.len(),
                self.n_ctx()
            )));
        }
        let vocab = self.model.config.vocab_size;
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(TritError::invalid(format!(
                "token id {bad} is outside the vocabulary (size {vocab})"
            )));
        }
        Ok(())
    }

    /// Makes `ids` the sequence, reusing the longest cached prefix, and
    /// computes the logits after its last token. Returns how many tokens were
    /// actually processed. Refuses, before any work, input longer than n_ctx.
    pub fn prefill(&mut self, ids: &[u32]) -> Result<usize> {
        self.check_ids(ids)?;
        let shared = self
            .tokens
            .iter()
            .zip(ids)
            .take_while(|(a, b)| a == b)
            .count();
        // The last token is always run again: its logits are not kept.
        let start = shared.min(ids.len() - 1);
        self.tokens.truncate(start);
        self.last_logits.clear();
        self.run(&ids[start..], Logits::Last, &mut |_, _| {})?;
        Ok(ids.len() - start)
    }

    /// Appends one token and computes the logits after it.
    pub fn push(&mut self, id: u32) -> Result<()> {
        if self.tokens.len() >= self.n_ctx() {
            return Err(TritError::invalid(format!(
                "the context is full (n_ctx = {})",
                self.n_ctx()
            )));
        }
        self.check_ids(&[id])?;
        self.run(&[id], Logits::Last, &mut |_, _| {})
    }

    /// Logits at every position of `ids`, [ids.len(), vocab], computed from an
    /// empty cache (cached positions keep no logits). The cache then holds `ids`.
    pub fn logits(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        self.check_ids(ids)?;
        self.reset();
        let mut out = Vec::with_capacity(ids.len() * self.model.config.vocab_size);
        self.run(ids, Logits::From(0), &mut |_, row| {
            out.extend_from_slice(row)
        })?;
        Ok(out)
    }

    /// The negative log-likelihood in nats, summed, of the tokens
    /// `ids[first..]`, each given the tokens before it: `ids` run from an
    /// empty cache (which then holds them), and each position's logits are
    /// reduced to the next token's log-probability as soon as they are
    /// computed (see `scoring`), so the memory is O(vocab), not
    /// O(len × vocab). The logits are those `logits(ids)` returns.
    pub fn nll(&mut self, ids: &[u32], first: usize) -> Result<f64> {
        self.check_ids(ids)?;
        if first == 0 || first >= ids.len() {
            return Err(TritError::invalid(format!(
                "the first scored position must be between 1 and {} (the input has {} tokens), \
                 got {first}",
                ids.len() - 1,
                ids.len()
            )));
        }
        self.reset();
        let mut nll = 0.0;
        let mut partials = Vec::new(); // [vocab / EXP_CHUNK] partial sums
        self.run(ids, Logits::From(first - 1), &mut |position, row| {
            // Row `position` predicts the token after it; the last has none.
            if let Some(&next) = ids.get(position + 1) {
                nll += next_token_nll(row, next as usize, &mut partials);
            }
        })?;
        Ok(nll)
    }

    /// Runs `ids` after the cached tokens, in batches, inside the pool.
    fn run(&mut self, ids: &[u32], which: Logits, rows: &mut RowSink<'_>) -> Result<()> {
        if self.tokens.len() + ids.len() > self.n_ctx() {
            return Err(TritError::invalid(format!(
                "{} cached + {} new tokens exceed the context size n_ctx = {}",
                self.tokens.len(),
                ids.len(),
                self.n_ctx()
            )));
        }
        let pool = self.pool.clone();
        if ids.len() == 1 && pool.current_num_threads() > 1 {
            return pool.install(|| self.decode_with_helpers(ids, which, rows, &pool));
        }
        pool.install(|| {
            for (i, batch) in ids.chunks(MAX_BATCH).enumerate() {
                let last_batch = (i + 1) * MAX_BATCH >= ids.len();
                let logits = match which {
                    Logits::From(first) => Some(Logits::From(first)),
                    Logits::Last if last_batch => Some(Logits::Last),
                    Logits::Last => None,
                };
                self.forward(batch, logits, rows, &pool)?;
            }
            Ok(())
        })
    }

    /// One decoded token with the pool's other threads kept awake: a token
    /// is ~150 short parallel regions, and between them rayon's idle workers
    /// yield to the OS and then sleep, so each region could start with a
    /// wake-up. For the length of the token they instead run whatever work
    /// the regions offer (`rayon::yield_now`) and spin in between
    /// (docs/performance.md "Decode helpers").
    fn decode_with_helpers(
        &mut self,
        ids: &[u32],
        which: Logits,
        rows: &mut RowSink<'_>,
        pool: &ThreadPool,
    ) -> Result<()> {
        let done = AtomicBool::new(false);
        let caller = rayon::current_thread_index();
        let mut result = Ok(());
        rayon::scope(|scope| {
            scope.spawn_broadcast(|_, ctx| {
                if Some(ctx.index()) == caller {
                    return;
                }
                // A helper gives up after HELPER_PATIENCE without work: it
                // may have been started inside a task of this very token
                // (rayon runs a waiting thread's queued jobs, and so a helper
                // can sit on top of a task that the token waits for), and it
                // must then return for that task to finish.
                let mut last_work = Instant::now();
                let mut spins = 0u32;
                while !done.load(Ordering::Acquire) {
                    if rayon::yield_now() == Some(rayon::Yield::Executed) {
                        last_work = Instant::now();
                        continue;
                    }
                    std::hint::spin_loop();
                    spins = spins.wrapping_add(1);
                    // The clock is read now and then: the spin should stay cheap.
                    if spins.is_multiple_of(64) && last_work.elapsed() > HELPER_PATIENCE {
                        break;
                    }
                }
            });
            // Released on the way out, panics included, so that the helpers
            // stop at once.
            let _release = Release(&done);
            result = self.forward(ids, Some(which), rows, pool);
        });
        result
    }

    /// The forward pass of one batch at positions `tokens.len()..`; hands
    /// the requested rows of logits to `sink` (and keeps the last computed
    /// row in `last_logits`).
    fn forward(
        &mut self,
        ids: &[u32],
        logits: Option<Logits>,
        sink: &mut RowSink<'_>,
        pool: &ThreadPool,
    ) -> Result<()> {
        let model = self.model.clone();
        let c = &model.config;
        let (t_len, start) = (ids.len(), self.tokens.len());
        let (hidden, inter, hd) = (c.hidden_size, c.intermediate_size, c.head_dim);
        let (q_dim, kv_dim) = (c.q_dim(), c.kv_dim());
        let eps = c.rms_norm_eps;
        let activation = c.family.activation();
        let bl_eps = c.bitlinear_norm_eps.unwrap_or(0.0);
        let kernel = self.kernel;
        let s = &mut self.scratch;

        let x = fit(&mut s.x, t_len * hidden);
        for (row, &id) in x.chunks_exact_mut(hidden).zip(ids) {
            model.embed.row_into(id as usize, row); // no embedding scaling
        }
        for (l, layer) in model.layers.iter().enumerate() {
            // ---- attention block; the previous layer's MLP output is added
            // to the residual stream in the same pass as the norm.
            if l == 0 {
                rms_norm_rows(&s.x, &layer.input_norm, eps, fit(&mut s.a, t_len * hidden));
            } else {
                let a = fit(&mut s.a, t_len * hidden);
                add_rms_norm_rows(&mut s.x, &s.proj, &layer.input_norm, eps, a);
            }
            let (q, k, v) = (
                fit(&mut s.q, t_len * q_dim),
                fit(&mut s.k, t_len * kv_dim),
                fit(&mut s.v, t_len * kv_dim),
            );
            if layer.bitlinear_norms.is_none() {
                // One quantisation of the block input serves q, k and v,
                // which run as one parallel pass.
                s.qa.requantize(&s.a, t_len, hidden)?;
                matmul_many_into(
                    &[&layer.q, &layer.k, &layer.v],
                    &s.qa,
                    &mut [q, k, v],
                    kernel,
                    pool,
                )?;
            } else {
                // use_rms_norm: each projection normalises its input itself.
                for (p, out) in [(Proj::Q, q), (Proj::K, k), (Proj::V, v)] {
                    let norm = layer.bitlinear_norm(p);
                    quantize_input(&mut s.qa, &s.a, t_len, norm, bl_eps, &mut s.normed_in)?;
                    matmul_into(layer.proj(p), &s.qa, out, kernel, pool)?;
                }
            }
            self.rope.apply_batch(&mut s.q, &mut s.k, t_len, start);
            for (t, (k_row, v_row)) in
                s.k.chunks_exact(kv_dim)
                    .zip(s.v.chunks_exact(kv_dim))
                    .enumerate()
            {
                for (g, (kh, vh)) in k_row
                    .chunks_exact(hd)
                    .zip(v_row.chunks_exact(hd))
                    .enumerate()
                {
                    self.cache.write(l, g, start + t, kh, vh);
                }
            }
            attention(
                kernel,
                &self.cache,
                l,
                c.num_heads,
                c.group_size(),
                hd,
                start,
                t_len,
                &s.q,
                fit(&mut s.o, t_len * q_dim),
                &mut s.attn,
            );
            // A sub-norm, in the families that have one, comes before o_proj.
            let o_in: &[f32] = match &layer.attn_sub_norm {
                Some(w) => {
                    rms_norm_rows(&s.o, w, eps, fit(&mut s.a, t_len * q_dim));
                    &s.a
                }
                None => &s.o,
            };
            let norm = layer.bitlinear_norm(Proj::O);
            quantize_input(&mut s.qa, o_in, t_len, norm, bl_eps, &mut s.normed_in)?;
            matmul_into(
                &layer.o,
                &s.qa,
                fit(&mut s.proj, t_len * hidden),
                kernel,
                pool,
            )?;

            // ---- MLP block
            let a = fit(&mut s.a, t_len * hidden);
            add_rms_norm_rows(&mut s.x, &s.proj, &layer.post_norm, eps, a);
            let h = fit(&mut s.h, t_len * inter);
            match (activation, layer.bitlinear_norms.is_some()) {
                // One quantisation serves gate and up, in one parallel pass
                // that stores only relu(gate)² · up.
                (Activation::Relu2, false) => {
                    s.qa.requantize(&s.a, t_len, hidden)?;
                    matmul_glu_into(&layer.gate, &layer.up, &s.qa, h, kernel, pool)?;
                }
                (Activation::Silu, false) => {
                    s.qa.requantize(&s.a, t_len, hidden)?;
                    let up = fit(&mut s.up, t_len * inter);
                    matmul_many_into(
                        &[&layer.gate, &layer.up],
                        &s.qa,
                        &mut [&mut *h, &mut *up],
                        kernel,
                        pool,
                    )?;
                    glu_rows(activation, h, up);
                }
                // use_rms_norm: gate and up normalise their input themselves.
                (_, true) => {
                    let up = fit(&mut s.up, t_len * inter);
                    for (p, out) in [(Proj::Gate, &mut *h), (Proj::Up, &mut *up)] {
                        let norm = layer.bitlinear_norm(p);
                        quantize_input(&mut s.qa, &s.a, t_len, norm, bl_eps, &mut s.normed_in)?;
                        matmul_into(layer.proj(p), &s.qa, out, kernel, pool)?;
                    }
                    glu_rows(activation, h, up);
                }
            }
            // A sub-norm, in the families that have one, comes before down_proj.
            let h_in: &[f32] = match &layer.ffn_sub_norm {
                Some(w) => {
                    rms_norm_rows(&s.h, w, eps, fit(&mut s.h_normed, t_len * inter));
                    &s.h_normed
                }
                None => &s.h,
            };
            let norm = layer.bitlinear_norm(Proj::Down);
            quantize_input(&mut s.qa, h_in, t_len, norm, bl_eps, &mut s.normed_in)?;
            matmul_into(
                &layer.down,
                &s.qa,
                fit(&mut s.proj, t_len * hidden),
                kernel,
                pool,
            )?;
        }
        // The last layer's MLP output (the others' went in with the next norm).
        add_rows(&mut s.x, &s.proj);
        self.tokens.extend_from_slice(ids);

        let rows = match logits {
            None => return Ok(()),
            Some(Logits::Last) => t_len - 1..t_len,
            Some(Logits::From(first)) => first.saturating_sub(start).min(t_len)..t_len,
        };
        let vocab = c.vocab_size;
        let head = model.head();
        self.last_logits.resize(vocab, 0.0);
        for t in rows {
            rms_norm(
                &s.x[t * hidden..(t + 1) * hidden],
                &model.norm,
                eps,
                &mut s.normed,
            );
            head.matvec(kernel, &s.normed, &mut self.last_logits);
            if let Some(Logits::From(_)) = logits {
                sink(start + t, &self.last_logits);
            }
        }
        Ok(())
    }

    /// Bytes of the KV cache.
    pub fn cache_bytes(&self) -> usize {
        self.cache.nbytes()
    }

    /// What the KV cache stores keys and values as.
    pub fn kv_type(&self) -> KvType {
        self.cache.kind()
    }
}

/// Quantises `x` ([t_len, k]) into `qa`, through a projection's own RMSNorm
/// first (weight `norm` [k], epsilon `eps`) for use_rms_norm models.
fn quantize_input(
    qa: &mut QuantizedActivations,
    x: &[f32],
    t_len: usize,
    norm: Option<&[f32]>,
    eps: f32,
    buf: &mut Vec<f32>,
) -> Result<()> {
    let k = x.len() / t_len;
    match norm {
        None => qa.requantize(x, t_len, k),
        Some(w) => {
            rms_norm_rows(x, w, eps, fit(buf, x.len()));
            qa.requantize(buf, t_len, k)
        }
    }
}

/// How long a decoding helper spins without finding work before it returns
/// to rayon: longer than the serial stretches of a token (tens of µs), short
/// enough that a helper stacked on a task of its own token (see
/// `decode_with_helpers`) delays it little.
const HELPER_PATIENCE: Duration = Duration::from_micros(200);

/// Sets its flag when dropped: tells `decode_with_helpers`' helpers to stop.
struct Release<'a>(&'a AtomicBool);

impl Drop for Release<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Buffers of `attention`, sized for a full context.
#[derive(Default)]
struct AttentionScratch {
    scores: Vec<f32>,            // [n_heads, chunks, KEY_CHUNK]
    partial_out: Vec<f32>,       // [n_heads, chunks, hd], by KV group: [n_kv, chunks, group, hd]
    partial_stats: Vec<Partial>, // [n_heads, chunks], by KV group: [n_kv, chunks, group]
}

impl AttentionScratch {
    fn new(n_heads: usize, hd: usize, n_ctx: usize) -> Self {
        let chunks = n_ctx.div_ceil(KEY_CHUNK);
        AttentionScratch {
            scores: vec![0.0; n_heads * chunks * KEY_CHUNK],
            partial_out: vec![0.0; n_heads * chunks * hd],
            partial_stats: vec![Partial::default(); n_heads * chunks],
        }
    }
}

/// Causal attention of a batch of `t_len` tokens at positions `start..` over
/// the cache (which already holds the batch's own keys and values).
/// `q` is [T, n_heads * hd] (rotated); writes `o` [T, n_heads * hd], the
/// heads concatenated as o_proj takes them.
/// Every task reads its keys and values once for all the query heads of its
/// KV group. One token (decoding) is split into (group, chunk of keys)
/// tasks, then merged, so that it spreads over the threads; a batch runs a
/// task per few tokens (all groups), so more threads than KV heads help.
#[allow(clippy::too_many_arguments)]
fn attention(
    kernel: Kernel,
    cache: &KvCache,
    layer: usize,
    n_heads: usize,
    group: usize,
    hd: usize,
    start: usize,
    t_len: usize,
    q: &[f32],
    o: &mut [f32],
    scratch: &mut AttentionScratch,
) {
    let q_dim = n_heads * hd;
    let n_kv = n_heads / group;
    // As transformers: head_dim ** -0.5 as a Python float, applied in f32
    // after the dot product.
    let scaling = (hd as f64).powf(-0.5) as f32;
    let n_all = start + t_len;
    let kv = |g: usize| (cache.keys(layer, g, n_all), cache.values(layer, g, n_all));
    if t_len == 1 {
        let chunks = n_all.div_ceil(KEY_CHUNK);
        let partial_out = &mut scratch.partial_out[..n_kv * chunks * group * hd];
        let partial_stats = &mut scratch.partial_stats[..n_kv * chunks * group];
        partial_out
            .par_chunks_mut(group * hd) // [group, hd] of (g, c)
            .zip(partial_stats.par_chunks_mut(group))
            .zip(scratch.scores.par_chunks_mut(group * KEY_CHUNK))
            .enumerate()
            .for_each(|(task, ((out, stats), scores))| {
                let (g, c) = (task / chunks, task % chunks);
                let (keys, values) = kv(g);
                let range = c * KEY_CHUNK..((c + 1) * KEY_CHUNK).min(n_all);
                let qg = &q[g * group * hd..(g + 1) * group * hd];
                attend_chunk(
                    kernel, qg, hd, keys, values, range, scaling, scores, KEY_CHUNK, out, hd, stats,
                );
            });
        // A few thousand multiply-adds: not worth waking a thread for.
        for ((out, parts), stats) in o
            .chunks_mut(group * hd) // [group, hd] of g
            .zip(partial_out.chunks(chunks * group * hd))
            .zip(partial_stats.chunks(chunks * group))
        {
            merge(kernel, group, hd, parts, stats, out, hd);
        }
        return;
    }
    // Tasks of a few tokens each: later tokens see more keys, and several
    // tasks per thread let stealing even that out.
    let threads = rayon::current_num_threads();
    let tokens_per_task = t_len.div_ceil(threads * 4).max(1);
    o[..t_len * q_dim]
        .par_chunks_mut(tokens_per_task * q_dim) // [tokens, n_heads * hd]
        .enumerate()
        .for_each(|(task, out)| {
            let t0 = task * tokens_per_task;
            let mut scores = vec![0.0f32; group * KEY_CHUNK];
            let mut chunk_scratch = ChunkScratch::default();
            // Group by group, so one KV head's rows are reused by the task's
            // tokens while they are still in cache.
            for g in 0..n_kv {
                // kv head g serves query heads g*group .. (g+1)*group (repeat_kv).
                let (keys, values) = kv(g);
                let heads = g * group * hd..(g + 1) * group * hd;
                for (i, out_t) in out.chunks_exact_mut(q_dim).enumerate() {
                    let t = t0 + i;
                    // causal: positions 0..=start+t
                    attend_group(
                        kernel,
                        &q[t * q_dim..][heads.clone()],
                        hd,
                        keys,
                        values,
                        start + t + 1,
                        scaling,
                        &mut scores,
                        &mut out_t[heads.clone()],
                        hd,
                        &mut chunk_scratch,
                    );
                }
            }
        });
}
