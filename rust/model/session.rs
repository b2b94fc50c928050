//! One sequence on a model: an engine of one slot, held for the session's
//! life. Its forward pass is the engine's (see `engine`).

use std::sync::Arc;

use super::cache::KvType;
use super::engine::Engine;
use super::weights::Model;
use crate::error::Result;
use crate::kernels::Kernel;

pub use super::engine::MAX_BATCH;

/// The one slot of a session's engine.
const SLOT: usize = 0;

/// One sequence: cache, tokens in it, and the logits after its last token.
pub struct Session {
    engine: Engine,
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
        let mut engine = Engine::new(model, 1, n_ctx, threads, kv, kernel)?;
        engine.acquire(&[])?;
        Ok(Session { engine })
    }

    pub fn model(&self) -> &Arc<Model> {
        self.engine.model()
    }

    pub fn n_ctx(&self) -> usize {
        self.engine.n_ctx()
    }

    /// The kernel path the session runs (and its sampling should).
    pub fn kernel(&self) -> Kernel {
        self.engine.kernel()
    }

    pub fn threads(&self) -> usize {
        self.engine.threads()
    }

    /// Tokens currently in the cache.
    pub fn tokens(&self) -> &[u32] {
        self.engine.tokens(SLOT).expect("a session has its slot")
    }

    /// Logits predicting the next token, [vocab]; None before any input.
    pub fn last_logits(&self) -> Option<&[f32]> {
        self.engine
            .last_logits(SLOT)
            .expect("a session has its slot")
    }

    /// Forgets the cached tokens.
    pub fn reset(&mut self) {
        self.engine.reset(SLOT).expect("a session has its slot");
    }

    /// Makes `ids` the sequence, reusing the longest cached prefix, and
    /// computes the logits after its last token. Returns how many tokens were
    /// actually processed. Refuses, before any work, input longer than n_ctx.
    pub fn prefill(&mut self, ids: &[u32]) -> Result<usize> {
        self.engine.prefill(SLOT, ids)
    }

    /// Appends one token and computes the logits after it.
    pub fn push(&mut self, id: u32) -> Result<()> {
        self.engine.push(SLOT, id)
    }

    /// Logits at every position of `ids`, [ids.len(), vocab], computed from an
    /// empty cache (cached positions keep no logits). The cache then holds `ids`.
    pub fn logits(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        self.engine.logits(SLOT, ids)
    }

    /// The negative log-likelihood in nats, summed, of the tokens
    /// `ids[first..]`, each given the tokens before it (see `Engine::nll`).
    pub fn nll(&mut self, ids: &[u32], first: usize) -> Result<f64> {
        self.engine.nll(SLOT, ids, first)
    }

    /// Bytes of the KV cache.
    pub fn cache_bytes(&self) -> usize {
        self.engine.slot_cache_bytes()
    }

    /// What the KV cache stores keys and values as.
    pub fn kv_type(&self) -> KvType {
        self.engine.kv_type()
    }
}
