//! Sequences being run through a model: their KV caches (one per slot), the
//! scratch buffers, and the forward pass (docs/formats.md "Forward pass").
//!
//! A prompt is processed in batches (GEMM, causal attention inside the batch),
//! then tokens one at a time (GEMV); a step of several sequences runs all
//! their tokens through each matmul at once. A new prompt that starts with
//! tokens already in a cache only processes the rest. Every forward pass runs
//! inside one `pool.install`, so the matmuls are issued from a pool thread
//! (calling into a pool from outside costs tens of µs per call).

use std::sync::Arc;

use rayon::prelude::*;
use rayon::ThreadPool;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::attention::{
    attend_chunk, attend_group, merge, ChunkScratch, Partial, Queries, ThenReads, KEY_CHUNK,
};
use super::cache::{BlockQ8_0, KvCache, KvType};
use super::config::Activation;
use super::ops::{add_rms_norm_rows, add_rows, glu_rows, rms_norm, rms_norm_rows, Rope};
use super::scoring::next_token_nll;
use super::weights::{Model, Proj};
use crate::error::{Result, TritError};
use crate::kernels::{
    matmul_glu_into, matmul_into, matmul_many_into, Kernel, QuantizedActivations,
};
use crate::memory::{try_filled, try_reserve_total};
use crate::sampling::Sampler;
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
    normed: Vec<f32>,      // [hidden] final-normed token
    normed_rows: Vec<f32>, // [sequences, hidden] final-normed last tokens of a step
    qa: QuantizedActivations,
}

/// Resizes without shrinking capacity: no allocation once the largest batch ran.
fn fit(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    buf.resize(len, 0.0);
    &mut buf[..]
}

/// One sequence's place in the engine: its cache, the tokens in it and the
/// logits after its last token. A released slot keeps its tokens, so that a
/// later sequence starting with them reuses them.
struct Slot {
    cache: KvCache,
    /// The tokens whose keys and values are in the cache, in order.
    tokens: Vec<u32>,
    /// [vocab] logits predicting the token after `tokens`, when
    /// `has_logits`; the buffer is kept between steps (not refilled).
    last_logits: Vec<f32>,
    has_logits: bool,
    /// Held by a sequence (between `acquire` and `release`).
    busy: bool,
}

impl Slot {
    /// The buffer of the slot's next logits, [vocab], to be written whole:
    /// from then on they are its logits. Sized once (not cleared between
    /// steps: a step of 8 sequences would refill 4 MB).
    fn logits_to_write(&mut self, vocab: usize) -> &mut [f32] {
        self.last_logits.resize(vocab, 0.0);
        self.has_logits = true;
        &mut self.last_logits
    }
}

/// The tokens one sequence runs in a step, after those already in its slot.
#[derive(Clone, Copy, Debug)]
pub struct Work<'a> {
    pub slot: usize,
    pub ids: &'a [u32],
    /// Whether the logits after the last of `ids` are wanted (a prompt
    /// chunk that is not the prompt's last needs none).
    pub logits: bool,
}

/// One slot's part of a forward pass.
#[derive(Clone, Copy)]
struct Segment<'a> {
    slot: usize,
    ids: &'a [u32],
    logits: Option<Logits>,
}

/// A model with `slots` sequences that run together: one forward pass (a
/// step) takes the tokens of several sequences at once, prompt chunks and
/// single decoded tokens mixed. The matmuls run over all of a step's tokens
/// (the weights are read once for all of them); attention runs per sequence
/// over its own cache; the logits are per sequence. Every row of a step is
/// computed exactly as if its sequence ran alone: the integer matmuls are
/// exact whatever the batch, the activations are quantised per token, and
/// attention depends on positions only.
///
/// Each slot has its own cache of n_ctx positions, allocated as zero pages
/// that the OS maps as they are first written: a slot costs memory for the
/// positions it has held, up to `slot_cache_bytes`.
pub struct Engine {
    model: Arc<Model>,
    pool: Arc<ThreadPool>,
    /// The SIMD path of every routine this engine runs.
    kernel: Kernel,
    rope: Rope,
    n_ctx: usize,
    slots: Vec<Slot>,
    scratch: Scratch,
}

impl Engine {
    /// An engine of `slots` sequences of up to `n_ctx` positions each (at
    /// most the model's max_position_embeddings; None: that), running on
    /// `threads` threads (None: default), caches holding keys and values as
    /// `kv`, on the kernel path `kernel` (an error if this CPU cannot run it).
    pub fn new(
        model: Arc<Model>,
        slots: usize,
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
        if slots == 0 || slots > MAX_SLOTS {
            return Err(TritError::invalid(format!(
                "the number of sequence slots must be between 1 and {MAX_SLOTS}, got {slots}"
            )));
        }
        let pool = threads::pool(threads)?;
        // The caches first: they are the largest buffers n_ctx sizes (each at
        // least 4 * n_ctx * head_dim bytes, as the RoPE tables), so once they
        // fit the others do.
        let slots = (0..slots)
            .map(|_| {
                Ok(Slot {
                    cache: KvCache::new(
                        c.num_layers,
                        c.num_kv_heads,
                        n_ctx,
                        c.head_dim,
                        kv,
                        kernel,
                    )?,
                    tokens: Vec::new(),
                    last_logits: Vec::new(),
                    has_logits: false,
                    busy: false,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let rope = Rope::for_config(c, n_ctx);
        let scratch = Scratch {
            attn: AttentionScratch::new(c.num_heads, c.head_dim, n_ctx)?,
            normed: vec![0.0; c.hidden_size],
            ..Default::default()
        };
        Ok(Engine {
            model,
            pool,
            kernel,
            rope,
            n_ctx,
            slots,
            scratch,
        })
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    /// The kernel path the engine runs (and its sampling should).
    pub fn kernel(&self) -> Kernel {
        self.kernel
    }

    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// How many sequences the engine holds.
    pub fn n_slots(&self) -> usize {
        self.slots.len()
    }

    /// How many slots no sequence holds.
    pub fn free_slots(&self) -> usize {
        self.slots.iter().filter(|s| !s.busy).count()
    }

    /// What the caches store keys and values as.
    pub fn kv_type(&self) -> KvType {
        self.slots[0].cache.kind()
    }

    /// Bytes one slot's cache takes when its n_ctx positions are filled.
    pub fn slot_cache_bytes(&self) -> usize {
        self.slots[0].cache.nbytes()
    }

    /// Bytes of the caches' positions that hold tokens now, all slots.
    pub fn cache_bytes_in_use(&self) -> usize {
        let per_position = self.slots[0].cache.bytes_per_position();
        self.slots.iter().map(|s| s.tokens.len()).sum::<usize>() * per_position
    }

    fn slot(&self, slot: usize) -> Result<&Slot> {
        self.slots.get(slot).ok_or_else(|| {
            TritError::invalid(format!(
                "slot {slot} does not exist; the engine has {}",
                self.slots.len()
            ))
        })
    }

    /// Tokens in `slot`'s cache.
    pub fn tokens(&self, slot: usize) -> Result<&[u32]> {
        Ok(&self.slot(slot)?.tokens)
    }

    /// Logits predicting `slot`'s next token, [vocab]; None before any input.
    pub fn last_logits(&self, slot: usize) -> Result<Option<&[f32]>> {
        let s = self.slot(slot)?;
        Ok(s.has_logits.then_some(&s.last_logits[..]))
    }

    /// The next token of each `(slot, sampler)` pair, drawn from the slot's
    /// last logits (its tokens as the history a repetition penalty reads),
    /// the pairs spread over the engine's threads. Each sampler keeps its own
    /// random state and buffers, so every token is what `sampler.sample`
    /// called pair after pair would give; a slot may appear more than once.
    /// Sampling a 128k vocabulary takes ~0.5-1 ms (temperature, top-p), so a
    /// step of many sequences would otherwise wait on them one by one.
    pub fn sample_many(&self, requests: &mut [(usize, &mut Sampler)]) -> Result<Vec<u32>> {
        let mut inputs = Vec::new(); // [requests] (logits, history)
        inputs.try_reserve_exact(requests.len()).map_err(|_| {
            TritError::invalid(format!(
                "{} sampling requests do not fit in memory",
                requests.len()
            ))
        })?;
        for &mut (slot, _) in requests.iter_mut() {
            let logits = self.last_logits(slot)?.ok_or_else(|| {
                TritError::invalid(format!(
                    "nothing to sample from: slot {slot} has no logits (run its tokens first)"
                ))
            })?;
            inputs.push((logits, self.tokens(slot)?));
        }
        let kernel = self.kernel;
        if let [(_, sampler)] = requests {
            // One sequence: on this thread (a call into the pool costs tens of µs).
            let (logits, history) = inputs[0];
            return Ok(vec![sampler.sample(kernel, logits, history)?]);
        }
        self.pool.install(|| {
            requests
                .par_iter_mut()
                .zip(inputs)
                .map(|((_, sampler), (logits, history))| sampler.sample(kernel, logits, history))
                .collect()
        })
    }

    /// Forgets `slot`'s cached tokens.
    pub fn reset(&mut self, slot: usize) -> Result<()> {
        self.slot(slot)?;
        let s = &mut self.slots[slot];
        s.tokens.clear();
        s.has_logits = false;
        Ok(())
    }

    /// Takes a free slot for a sequence that will start with `prompt`, or
    /// fails (an input error naming the slot count) when every slot is held.
    /// Prefix reuse: of the free slots, the one whose cached tokens share the
    /// longest start with `prompt` is taken; if another slot (held or not)
    /// shares a longer one, those positions are copied over. The slot then
    /// holds that shared start (short of `prompt`'s last token, whose logits
    /// are needed), and the caller runs the rest.
    pub fn acquire(&mut self, prompt: &[u32]) -> Result<usize> {
        let shared = |s: &Slot| {
            s.tokens
                .iter()
                .zip(prompt)
                .take_while(|(a, b)| a == b)
                .count()
        };
        let Some((slot, own)) = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.busy)
            .map(|(i, s)| (i, shared(s)))
            // The longest shared start; among equals, the emptiest slot.
            .max_by_key(|&(i, n)| (n, std::cmp::Reverse(self.slots[i].tokens.len())))
        else {
            return Err(TritError::invalid(format!(
                "all {} sequence slots are in use: finish or close a running generation \
                 first, or make the engine with more slots",
                self.slots.len()
            )));
        };
        let keep = prompt.len().saturating_sub(1);
        let (donor, best) = self
            .slots
            .iter()
            .enumerate()
            .map(|(i, s)| (i, shared(s)))
            .max_by_key(|&(_, n)| n)
            .unwrap_or((slot, own));
        let reused = if best.min(keep) > own.min(keep) {
            let n = best.min(keep);
            let (dst, src) = pair_mut(&mut self.slots, slot, donor);
            dst.cache.copy_prefix(&src.cache, n);
            dst.tokens.clear();
            dst.tokens.extend_from_slice(&prompt[..n]);
            n
        } else {
            own.min(keep)
        };
        let s = &mut self.slots[slot];
        s.tokens.truncate(reused);
        s.has_logits = false;
        s.busy = true;
        Ok(slot)
    }

    /// Gives `slot` back; its cache is kept for prefix reuse.
    pub fn release(&mut self, slot: usize) -> Result<()> {
        self.slot(slot)?;
        self.slots[slot].busy = false;
        Ok(())
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        if ids.is_empty() {
            return Err(TritError::invalid("the input has no tokens"));
        }
        if ids.len() > self.n_ctx {
            return Err(TritError::invalid(format!(
                "the input has {} tokens, more than the context size n_ctx = {}",
                ids.len(),
                self.n_ctx
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

    /// Makes `ids` `slot`'s sequence, reusing the longest prefix cached in
    /// it, and computes the logits after its last token. Returns how many
    /// tokens were actually processed. Refuses, before any work, input
    /// longer than n_ctx.
    pub fn prefill(&mut self, slot: usize, ids: &[u32]) -> Result<usize> {
        self.check_ids(ids)?;
        self.slot(slot)?;
        let s = &mut self.slots[slot];
        let shared = s.tokens.iter().zip(ids).take_while(|(a, b)| a == b).count();
        // The last token is always run again: its logits are not kept.
        let start = shared.min(ids.len() - 1);
        s.tokens.truncate(start);
        s.has_logits = false;
        self.run(slot, &ids[start..], Logits::Last, &mut |_, _| {})?;
        Ok(ids.len() - start)
    }

    /// Appends one token to `slot` and computes the logits after it.
    pub fn push(&mut self, slot: usize, id: u32) -> Result<()> {
        if self.slot(slot)?.tokens.len() >= self.n_ctx {
            return Err(TritError::invalid(format!(
                "the context is full (n_ctx = {})",
                self.n_ctx
            )));
        }
        self.check_ids(&[id])?;
        self.run(slot, &[id], Logits::Last, &mut |_, _| {})
    }

    /// Logits at every position of `ids`, [ids.len(), vocab], computed from an
    /// empty cache (cached positions keep no logits). `slot` then holds `ids`.
    pub fn logits(&mut self, slot: usize, ids: &[u32]) -> Result<Vec<f32>> {
        self.check_ids(ids)?;
        self.reset(slot)?;
        let vocab = self.model.config.vocab_size;
        let mut out = Vec::new(); // [ids.len(), vocab]
        let len = ids.len().checked_mul(vocab).ok_or_else(|| {
            TritError::invalid(format!(
                "{} positions of {vocab} logits overflow",
                ids.len()
            ))
        })?;
        try_reserve_total(&mut out, len, "the logits of every position")?;
        self.run(slot, ids, Logits::From(0), &mut |_, row| {
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
    pub fn nll(&mut self, slot: usize, ids: &[u32], first: usize) -> Result<f64> {
        self.check_ids(ids)?;
        if first == 0 || first >= ids.len() {
            return Err(TritError::invalid(format!(
                "the first scored position must be between 1 and {} (the input has {} tokens), \
                 got {first}",
                ids.len() - 1,
                ids.len()
            )));
        }
        self.reset(slot)?;
        let mut nll = 0.0;
        let mut partials = Vec::new(); // [vocab / EXP_CHUNK] partial sums
        self.run(slot, ids, Logits::From(first - 1), &mut |position, row| {
            // Row `position` predicts the token after it; the last has none.
            if let Some(&next) = ids.get(position + 1) {
                nll += next_token_nll(row, next as usize, &mut partials);
            }
        })?;
        Ok(nll)
    }

    /// Runs `ids` after `slot`'s cached tokens, in batches, inside the pool.
    fn run(
        &mut self,
        slot: usize,
        ids: &[u32],
        which: Logits,
        rows: &mut RowSink<'_>,
    ) -> Result<()> {
        let cached = self.slot(slot)?.tokens.len();
        if cached + ids.len() > self.n_ctx {
            return Err(TritError::invalid(format!(
                "{cached} cached + {} new tokens exceed the context size n_ctx = {}",
                ids.len(),
                self.n_ctx
            )));
        }
        let pool = self.pool.clone();
        if ids.len() == 1 && pool.current_num_threads() > 1 {
            let segment = [Segment {
                slot,
                ids,
                logits: Some(which),
            }];
            return pool.install(|| self.decode_with_helpers(&segment, rows, &pool));
        }
        pool.install(|| {
            for (i, batch) in ids.chunks(MAX_BATCH).enumerate() {
                let last_batch = (i + 1) * MAX_BATCH >= ids.len();
                let logits = match which {
                    Logits::From(first) => Some(Logits::From(first)),
                    Logits::Last if last_batch => Some(Logits::Last),
                    Logits::Last => None,
                };
                self.forward(
                    &[Segment {
                        slot,
                        ids: batch,
                        logits,
                    }],
                    rows,
                    &pool,
                )?;
            }
            Ok(())
        })
    }

    /// One forward pass over the tokens of several sequences (each of
    /// `work`'s slots at most once, each held by a sequence): each entry's
    /// ids go after its slot's cached tokens, and the slots that ask for
    /// logits get those after their last token. Checked whole before any work.
    pub fn step(&mut self, work: &[Work<'_>]) -> Result<()> {
        let mut seen = vec![false; self.slots.len()];
        for w in work {
            let s = self.slot(w.slot)?;
            if std::mem::replace(&mut seen[w.slot], true) {
                return Err(TritError::invalid(format!(
                    "slot {} appears twice in one step",
                    w.slot
                )));
            }
            if !s.busy {
                return Err(TritError::invalid(format!(
                    "slot {} is not held by a sequence (acquire it first)",
                    w.slot
                )));
            }
            self.check_ids(w.ids)?;
            if s.tokens.len() + w.ids.len() > self.n_ctx {
                return Err(TritError::invalid(format!(
                    "slot {}: {} cached + {} new tokens exceed the context size n_ctx = {}",
                    w.slot,
                    s.tokens.len(),
                    w.ids.len(),
                    self.n_ctx
                )));
            }
        }
        let segments: Vec<Segment<'_>> = work
            .iter()
            .map(|w| Segment {
                slot: w.slot,
                ids: w.ids,
                logits: w.logits.then_some(Logits::Last),
            })
            .collect();
        let total: usize = work.iter().map(|w| w.ids.len()).sum();
        if total == 0 {
            return Ok(());
        }
        // Logits after earlier tokens are stale once more come.
        for seg in &segments {
            self.slots[seg.slot].has_logits = false;
        }
        let pool = self.pool.clone();
        let no_rows = &mut |_: usize, _: &[f32]| {};
        // A step of a few tokens (one sequence's decode, or several's) is
        // short parallel regions: keep the helpers awake between them.
        if total <= HELPED_STEP_TOKENS && pool.current_num_threads() > 1 {
            return pool.install(|| self.decode_with_helpers(&segments, no_rows, &pool));
        }
        pool.install(|| self.forward(&segments, no_rows, &pool))
    }

    /// A step of few tokens (one sequence's decoded token, or one token of
    /// each of several sequences) with the pool's other threads kept awake:
    /// such a step is ~150 short parallel regions, and between them rayon's
    /// idle workers yield to the OS and then sleep, so each region could
    /// start with a wake-up. For the length of the step they instead run
    /// whatever work the regions offer (`rayon::yield_now`) and spin in
    /// between (docs/performance.md "Decode helpers").
    fn decode_with_helpers(
        &mut self,
        segments: &[Segment<'_>],
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
            result = self.forward(segments, rows, pool);
        });
        result
    }

    /// The forward pass of one batch: each segment's tokens at positions
    /// after its slot's cached ones (the segments' slots are distinct).
    /// Hands the rows that `Logits::From` asks for to `sink` (and keeps each
    /// slot's last computed row in its `last_logits`).
    fn forward(
        &mut self,
        segments: &[Segment<'_>],
        sink: &mut RowSink<'_>,
        pool: &ThreadPool,
    ) -> Result<()> {
        let model = self.model.clone();
        let c = &model.config;
        let t_len: usize = segments.iter().map(|seg| seg.ids.len()).sum();
        let (hidden, inter, hd) = (c.hidden_size, c.intermediate_size, c.head_dim);
        let (q_dim, kv_dim) = (c.q_dim(), c.kv_dim());
        let eps = c.rms_norm_eps;
        let activation = c.family.activation();
        let bl_eps = c.bitlinear_norm_eps.unwrap_or(0.0);
        let kernel = self.kernel;
        let Engine {
            slots,
            scratch: s,
            rope,
            ..
        } = self;
        // Where each segment's rows begin in the batch, and its first position.
        let placed = || {
            let mut row = 0;
            segments.iter().map(move |seg| {
                let first = row;
                row += seg.ids.len();
                (first, seg)
            })
        };

        let x = fit(&mut s.x, t_len * hidden);
        for (row, &id) in x
            .chunks_exact_mut(hidden)
            .zip(segments.iter().flat_map(|seg| seg.ids))
        {
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
            fit(&mut s.o, t_len * q_dim);
            // Positions, the cache and attention are each sequence's own.
            // One segment's rotary positions and cache writes: its q and k
            // rows ([n, q_dim], [n, kv_dim]) and v rows ([n, kv_dim]).
            let place = |slot: &mut Slot, q: &mut [f32], k: &mut [f32], v: &[f32]| {
                let (n, start) = (k.len() / kv_dim, slot.tokens.len());
                rope.apply_batch(q, k, n, start);
                for (t, (k_row, v_row)) in k
                    .chunks_exact(kv_dim)
                    .zip(v.chunks_exact(kv_dim))
                    .enumerate()
                {
                    for (g, (kh, vh)) in k_row
                        .chunks_exact(hd)
                        .zip(v_row.chunks_exact(hd))
                        .enumerate()
                    {
                        slot.cache.write(l, g, start + t, kh, vh);
                    }
                }
            };
            // Each segment's distinct slot and consecutive rows.
            let mut by_slot: Vec<Option<&mut Slot>> = slots.iter_mut().map(Some).collect();
            let (mut q, mut k, mut v) = (&mut s.q[..], &mut s.k[..], &s.v[..]);
            let mut tasks = Vec::with_capacity(segments.len());
            for seg in segments {
                let n = seg.ids.len();
                let (q_seg, q_rest) = std::mem::take(&mut q).split_at_mut(n * q_dim);
                let (k_seg, k_rest) = std::mem::take(&mut k).split_at_mut(n * kv_dim);
                let (v_seg, v_rest) = v.split_at(n * kv_dim);
                (q, k, v) = (q_rest, k_rest, v_rest);
                let slot = by_slot[seg.slot].take().expect("distinct slots");
                tasks.push((slot, q_seg, k_seg, v_seg));
            }
            if tasks.len() < 2 {
                tasks
                    .into_iter()
                    .for_each(|(slot, q, k, v)| place(slot, q, k, v));
            } else {
                // Several sequences (a batched step): a task each.
                tasks
                    .into_par_iter()
                    .for_each(|(slot, q, k, v)| place(slot, q, k, v));
            }
            // A prompt chunk spreads its tokens over the threads, and so does
            // one decoded token alone (by KV group and key chunk); the single
            // tokens of several decoding sequences are a task each, together.
            let together = segments.iter().filter(|seg| seg.ids.len() == 1).count() >= 2;
            for (row, seg) in placed() {
                let n = seg.ids.len();
                if together && n == 1 {
                    continue;
                }
                let slot = &slots[seg.slot];
                attention(
                    kernel,
                    &slot.cache,
                    l,
                    c.num_heads,
                    c.group_size(),
                    hd,
                    slot.tokens.len(),
                    n,
                    &s.q[row * q_dim..(row + n) * q_dim],
                    &mut s.o[row * q_dim..(row + n) * q_dim],
                    &mut s.attn,
                );
            }
            if together {
                let decoding = placed()
                    .filter(|(_, seg)| seg.ids.len() == 1)
                    .map(|(row, seg)| (row, seg.slot));
                let heads = HeadShape {
                    n_heads: c.num_heads,
                    group: c.group_size(),
                    hd,
                };
                attend_decoding(kernel, slots, decoding, l, heads, &s.q, &mut s.o);
            }
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
        for seg in segments {
            slots[seg.slot].tokens.extend_from_slice(seg.ids);
        }

        let vocab = c.vocab_size;
        let head = model.head();
        let wanting = segments.iter().filter(|seg| seg.logits.is_some()).count();
        if wanting > 1 {
            // Several sequences' last rows: the head is read once for all.
            let last_rows = placed()
                .filter(|(_, seg)| seg.logits == Some(Logits::Last))
                .map(|(row, seg)| (row + seg.ids.len() - 1, seg.slot));
            let normed = fit(&mut s.normed_rows, wanting * hidden); // [wanting, hidden]
            let mut outs: Vec<&mut [f32]> = Vec::with_capacity(wanting); // each [vocab]
            let mut order = Vec::with_capacity(wanting);
            for ((t, slot), row) in last_rows.zip(normed.chunks_exact_mut(hidden)) {
                rms_norm(&s.x[t * hidden..(t + 1) * hidden], &model.norm, eps, row);
                order.push(slot);
            }
            // In the order of `order`: gather the slots' buffers.
            let mut by_slot: Vec<Option<&mut [f32]>> = slots
                .iter_mut()
                .enumerate()
                .map(|(i, sl)| order.contains(&i).then(|| sl.logits_to_write(vocab)))
                .collect();
            for &slot in &order {
                outs.push(by_slot[slot].take().expect("distinct slots"));
            }
            head.matvecs(kernel, &s.normed_rows[..wanting * hidden], &mut outs);
            return Ok(());
        }
        for (row, seg) in placed() {
            let Some(which) = seg.logits else { continue };
            let (n, start) = (seg.ids.len(), slots[seg.slot].tokens.len() - seg.ids.len());
            let rows = match which {
                Logits::Last => n - 1..n,
                Logits::From(first) => first.saturating_sub(start).min(n)..n,
            };
            if rows.is_empty() {
                continue;
            }
            let last_logits = slots[seg.slot].logits_to_write(vocab);
            for t in rows {
                let x = &s.x[(row + t) * hidden..(row + t + 1) * hidden];
                rms_norm(x, &model.norm, eps, &mut s.normed);
                head.matvec(kernel, &s.normed, last_logits);
                if let Logits::From(_) = which {
                    sink(start + t, last_logits);
                }
            }
        }
        Ok(())
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

/// Most slots an engine may have: a bound on what input can ask for.
pub const MAX_SLOTS: usize = 256;

/// Mutable `slots[a]` and shared `slots[b]`, a != b.
fn pair_mut(slots: &mut [Slot], a: usize, b: usize) -> (&mut Slot, &Slot) {
    assert_ne!(a, b);
    if a < b {
        let (lo, hi) = slots.split_at_mut(b);
        (&mut lo[a], &hi[0])
    } else {
        let (lo, hi) = slots.split_at_mut(a);
        (&mut hi[0], &lo[b])
    }
}

/// The most tokens a step takes with the helpers kept awake
/// (`decode_with_helpers`): a step of one token per sequence for up to 16
/// sequences; a prompt's steps have regions long enough to wake threads for.
const HELPED_STEP_TOKENS: usize = 16;

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
    /// [n_heads, hd / 32]: one token's queries, for a q8_0 cache.
    query_blocks: Vec<BlockQ8_0>,
}

impl AttentionScratch {
    /// Sized for `n_ctx` positions; an error if they do not fit.
    fn new(n_heads: usize, hd: usize, n_ctx: usize) -> Result<Self> {
        let chunks = n_ctx.div_ceil(KEY_CHUNK);
        let size = |last: usize| {
            n_heads
                .checked_mul(chunks)
                .and_then(|n| n.checked_mul(last))
                .ok_or_else(|| {
                    TritError::invalid(format!("attention buffers for n_ctx = {n_ctx} overflow"))
                })
        };
        let what = format!("the attention buffers of n_ctx = {n_ctx}; pass a smaller n_ctx");
        Ok(AttentionScratch {
            scores: try_filled(size(KEY_CHUNK)?, 0.0, &what)?,
            partial_out: try_filled(size(hd)?, 0.0, &what)?,
            partial_stats: try_filled(size(1)?, Partial::default(), &what)?,
            query_blocks: Vec::new(),
        })
    }
}

/// The query heads of a model: `n_heads` of `hd` each, `group` per KV head.
#[derive(Clone, Copy)]
struct HeadShape {
    n_heads: usize,
    group: usize,
    hd: usize,
}

/// Attention of the single tokens of several decoding sequences, one task
/// per sequence (all its KV groups): `decoding` gives each token's row in the
/// batch and its slot, whose cache already holds the token's key and value
/// at position `tokens.len()`. `q` and `o` are [T, n_heads * hd]. Each result
/// is exactly `attention`'s for the token alone: the same chunks of keys,
/// the same merge.
fn attend_decoding(
    kernel: Kernel,
    slots: &[Slot],
    decoding: impl Iterator<Item = (usize, usize)>,
    layer: usize,
    heads: HeadShape,
    q: &[f32],
    o: &mut [f32],
) {
    let HeadShape { n_heads, group, hd } = heads;
    let q_dim = n_heads * hd;
    let scaling = (hd as f64).powf(-0.5) as f32;
    // The output rows of the decoding tokens, each [q_dim], with their slots.
    let mut rows: Vec<Option<&mut [f32]>> = o.chunks_exact_mut(q_dim).map(Some).collect();
    // Each task: its row, slot and output, and the next task's slot (a
    // thread mostly takes the tasks in order, so the next one's first KV
    // head is its likely next read).
    let decoding: Vec<(usize, usize)> = decoding.collect();
    let next_slots = decoding.iter().skip(1).map(|&(_, slot)| Some(slot));
    let tasks: Vec<(usize, usize, Option<usize>, &mut [f32])> = decoding
        .iter()
        .zip(next_slots.chain([None]))
        .map(|(&(row, slot), next)| {
            (
                row,
                slot,
                next,
                rows[row].take().expect("one token per row"),
            )
        })
        .collect();
    tasks
        .into_par_iter()
        .for_each(|(row, slot, next_slot, out)| {
            let slot = &slots[slot];
            let n = slot.tokens.len() + 1; // the cached keys and the token's own
            let mut scores = vec![0.0f32; group * KEY_CHUNK]; // [group, KEY_CHUNK]
            let mut chunk_scratch = ChunkScratch::default();
            let n_kv = n_heads / group;
            for g in 0..n_kv {
                let heads = g * group * hd..(g + 1) * group * hd;
                // The next KV head's keys and values are this task's next
                // reads; after its last, the next task's first.
                let then = if g + 1 < n_kv {
                    Some(ThenReads {
                        keys: slot.cache.keys(layer, g + 1, n),
                        values: slot.cache.values(layer, g + 1, n),
                    })
                } else {
                    next_slot.map(|next| {
                        let next = &slots[next];
                        let n = next.tokens.len() + 1;
                        ThenReads {
                            keys: next.cache.keys(layer, 0, n),
                            values: next.cache.values(layer, 0, n),
                        }
                    })
                };
                attend_group(
                    kernel,
                    &q[row * q_dim..][heads.clone()],
                    hd,
                    slot.cache.keys(layer, g, n),
                    slot.cache.values(layer, g, n),
                    n,
                    scaling,
                    &mut scores,
                    &mut out[heads],
                    hd,
                    &mut chunk_scratch,
                    then,
                );
            }
        });
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
        // Quantized once for every chunk of keys (over a q8_0 cache).
        let queries = Queries::new(
            kernel,
            cache.kind(),
            &q[..q_dim],
            hd,
            &mut scratch.query_blocks,
        );
        partial_out
            .par_chunks_mut(group * hd) // [group, hd] of (g, c)
            .zip(partial_stats.par_chunks_mut(group))
            .zip(scratch.scores.par_chunks_mut(group * KEY_CHUNK))
            .enumerate()
            .for_each(|(task, ((out, stats), scores))| {
                let (g, c) = (task / chunks, task % chunks);
                let (keys, values) = kv(g);
                let range = c * KEY_CHUNK..((c + 1) * KEY_CHUNK).min(n_all);
                let qg = queries.heads(g * group..(g + 1) * group, hd);
                // Tasks run in order on a thread, mostly: after a group's
                // last chunk comes the next group's first.
                let then = (c + 1 == chunks && g + 1 < n_kv).then(|| {
                    let (keys, values) = kv(g + 1);
                    ThenReads { keys, values }
                });
                attend_chunk(
                    kernel, qg, hd, keys, values, range, scaling, scores, KEY_CHUNK, out, hd,
                    stats, then,
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
                        None,
                    );
                }
            }
        });
}
