//! Bindings for the model, its sessions and the sampler. Arguments are
//! converted and checked here with the GIL held; loading, forward passes and
//! sampling run detached.

use std::path::PathBuf;
use std::sync::Arc;

use numpy::{IntoPyArray, PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray1};
use pyo3::prelude::*;

use super::{invalid, IntoPyResult, PyTernaryMatrix};
use crate::checkpoint::MemoryCheckpoint;
use crate::model::{self, Config, DType, LinearClass, QuantizationMode};
use crate::sampling::{Sampler, SamplingParams};
use crate::threads;

/// The hyper-parameters of a BitNet b1.58 model.
#[pyclass(name = "ModelConfig", module = "trit._core", frozen)]
#[derive(Clone)]
pub(super) struct PyModelConfig {
    inner: Config,
}

#[pymethods]
impl PyModelConfig {
    #[new]
    #[pyo3(signature = (
        *, vocab_size, hidden_size, intermediate_size, num_hidden_layers,
        num_attention_heads, num_key_value_heads, rope_theta, rms_norm_eps,
        max_position_embeddings, head_dim=None, tie_word_embeddings=true,
        linear_class="bitlinear", quantization_mode="offline"
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        vocab_size: usize,
        hidden_size: usize,
        intermediate_size: usize,
        num_hidden_layers: usize,
        num_attention_heads: usize,
        num_key_value_heads: usize,
        rope_theta: f64,
        rms_norm_eps: f64,
        max_position_embeddings: usize,
        head_dim: Option<usize>,
        tie_word_embeddings: bool,
        linear_class: &str,
        quantization_mode: &str,
    ) -> PyResult<Self> {
        if num_attention_heads == 0 {
            return Err(invalid("config: num_attention_heads must be positive"));
        }
        let inner = Config {
            family: model::Family::BitNet,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_layers: num_hidden_layers,
            num_heads: num_attention_heads,
            num_kv_heads: num_key_value_heads,
            head_dim: head_dim.unwrap_or(hidden_size / num_attention_heads),
            // transformers keeps these as Python floats and meets them in f32 ops.
            rope_theta: rope_theta as f32,
            rms_norm_eps: rms_norm_eps as f32,
            max_position_embeddings,
            tie_word_embeddings,
            linear_class: LinearClass::parse(linear_class).py()?,
            quantization_mode: QuantizationMode::parse(quantization_mode).py()?,
            bitlinear_norm_eps: None,
            rope_scaling: None,
        };
        inner.validate().py()?;
        Ok(PyModelConfig { inner })
    }

    /// Reads and checks a transformers `config.json` of a BitNet b1.58 model.
    #[staticmethod]
    fn from_file(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let inner = py.detach(|| Config::from_json_file(&path)).py()?;
        Ok(PyModelConfig { inner })
    }

    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size
    }
    #[getter]
    fn hidden_size(&self) -> usize {
        self.inner.hidden_size
    }
    #[getter]
    fn intermediate_size(&self) -> usize {
        self.inner.intermediate_size
    }
    #[getter]
    fn num_hidden_layers(&self) -> usize {
        self.inner.num_layers
    }
    #[getter]
    fn num_attention_heads(&self) -> usize {
        self.inner.num_heads
    }
    #[getter]
    fn num_key_value_heads(&self) -> usize {
        self.inner.num_kv_heads
    }
    #[getter]
    fn head_dim(&self) -> usize {
        self.inner.head_dim
    }
    #[getter]
    fn rope_theta(&self) -> f32 {
        self.inner.rope_theta
    }
    #[getter]
    fn rms_norm_eps(&self) -> f32 {
        self.inner.rms_norm_eps
    }
    #[getter]
    fn max_position_embeddings(&self) -> usize {
        self.inner.max_position_embeddings
    }
    #[getter]
    fn tie_word_embeddings(&self) -> bool {
        self.inner.tie_word_embeddings
    }
    /// "bitnet" (BitNetForCausalLM), "llama" (LlamaForCausalLM with bitnet
    /// quantization) or "1bitllm" (1bitLLM's BitnetForCausalLM).
    #[getter]
    fn family(&self) -> &'static str {
        self.inner.family.name()
    }
    #[getter]
    fn linear_class(&self) -> &'static str {
        self.inner.linear_class.name()
    }
    #[getter]
    fn quantization_mode(&self) -> &'static str {
        self.inner.quantization_mode.name()
    }

    fn __repr__(&self) -> String {
        let c = &self.inner;
        format!(
            "ModelConfig(family={:?}, vocab_size={}, hidden_size={}, intermediate_size={}, \
             num_hidden_layers={}, num_attention_heads={}, num_key_value_heads={}, \
             head_dim={}, rope_theta={}, rms_norm_eps={}, max_position_embeddings={}, \
             tie_word_embeddings={}, linear_class={:?}, quantization_mode={:?})",
            c.family.name(),
            c.vocab_size,
            c.hidden_size,
            c.intermediate_size,
            c.num_layers,
            c.num_heads,
            c.num_kv_heads,
            c.head_dim,
            c.rope_theta,
            c.rms_norm_eps,
            c.max_position_embeddings,
            if c.tie_word_embeddings {
                "True"
            } else {
                "False"
            },
            c.linear_class.name(),
            c.quantization_mode.name()
        )
    }
}

/// One checkpoint tensor as the loader hands it over:
/// (name, safetensors dtype, shape, uint8 array of its bytes).
type TensorArg<'py> = (String, String, Vec<usize>, PyReadonlyArray1<'py, u8>);

/// A loaded model; immutable, shared by its sessions.
#[pyclass(name = "Model", module = "trit._core", frozen)]
pub(super) struct PyModel {
    inner: Arc<model::Model>,
}

fn head_precision(int8_head: bool) -> model::HeadPrecision {
    if int8_head {
        model::HeadPrecision::Int8
    } else {
        model::HeadPrecision::AsStored
    }
}

#[pymethods]
impl PyModel {
    /// Reads the model in `folder` (config.json and model.safetensors, or
    /// shards and their index). Returns it with warnings (all-zero or unused
    /// tensors) for the caller to show. With `int8_head`, the output head is
    /// quantized to int8 rows (see `HeadPrecision::Int8`).
    #[staticmethod]
    #[pyo3(signature = (folder, *, threads=None, int8_head=false))]
    fn open(
        py: Python<'_>,
        folder: PathBuf,
        threads: Option<usize>,
        int8_head: bool,
    ) -> PyResult<(PyModel, Vec<String>)> {
        let pool = threads::pool(threads).py()?;
        let (m, warnings) = py
            .detach(|| model::open(&folder, &pool, head_precision(int8_head)))
            .py()?;
        Ok((PyModel { inner: Arc::new(m) }, warnings))
    }

    /// Builds the model from tensors given in memory. Their bytes are copied
    /// first, so the arrays are only read, never kept or changed. Returns the
    /// model with warnings (all-zero or unused tensors) for the caller to show.
    #[staticmethod]
    #[pyo3(signature = (config, tensors, *, threads=None, int8_head=false))]
    fn load(
        py: Python<'_>,
        config: &PyModelConfig,
        tensors: Vec<TensorArg<'_>>,
        threads: Option<usize>,
        int8_head: bool,
    ) -> PyResult<(PyModel, Vec<String>)> {
        let pool = threads::pool(threads).py()?;
        let mut checkpoint = MemoryCheckpoint::new();
        for (name, dtype, shape, data) in tensors {
            let dtype =
                DType::parse(&dtype).map_err(|e| invalid(format!("tensor {name:?}: {e}")))?;
            let bytes = data
                .as_slice()
                .map_err(|_| invalid(format!("tensor {name:?}: data must be contiguous")))?
                .to_vec();
            checkpoint.insert(name, dtype, shape, bytes).py()?;
        }
        let config = config.inner.clone();
        let (m, warnings) = py
            .detach(|| model::load(config, &checkpoint, &pool, head_precision(int8_head)))
            .py()?;
        Ok((PyModel { inner: Arc::new(m) }, warnings))
    }

    #[getter]
    fn config(&self) -> PyModelConfig {
        PyModelConfig {
            inner: self.inner.config.clone(),
        }
    }

    /// Bytes of all weights in memory.
    #[getter]
    fn weight_bytes(&self) -> usize {
        self.inner.weight_bytes()
    }

    /// Bytes of weights read to generate one token.
    #[getter]
    fn bytes_per_token(&self) -> usize {
        self.inner.bytes_per_token()
    }

    /// A copy of projection `name` ("q_proj", ..., "down_proj") of `layer`.
    fn projection(&self, layer: usize, name: &str) -> PyResult<PyTernaryMatrix> {
        let p = model::Proj::parse(name).py()?;
        let l = self.inner.layers.get(layer).ok_or_else(|| {
            invalid(format!(
                "layer {layer} does not exist; the model has {}",
                self.inner.layers.len()
            ))
        })?;
        Ok(PyTernaryMatrix {
            inner: l.proj(p).clone(),
        })
    }
}

/// How the next token is picked: greedy when temperature is 0.
#[pyclass(name = "Sampler", module = "trit._core")]
pub(super) struct PySampler {
    inner: Sampler,
}

#[pymethods]
impl PySampler {
    #[new]
    #[pyo3(signature = (
        *, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, seed=0
    ))]
    fn new(
        temperature: f64,
        top_k: i64,
        top_p: f64,
        min_p: f64,
        repetition_penalty: f64,
        seed: u64,
    ) -> PyResult<Self> {
        if top_k < 0 {
            return Err(invalid(format!("top_k must be >= 0, got {top_k}")));
        }
        let params = SamplingParams {
            temperature: temperature as f32,
            top_k: top_k as usize,
            top_p: top_p as f32,
            min_p: min_p as f32,
            repetition_penalty: repetition_penalty as f32,
        };
        Ok(PySampler {
            inner: Sampler::new(params, seed).py()?,
        })
    }
}

fn token_ids(ids: Vec<i64>) -> PyResult<Vec<u32>> {
    ids.into_iter()
        .map(|id| {
            u32::try_from(id).map_err(|_| invalid(format!("token id {id} is not a valid id")))
        })
        .collect()
}

/// One sequence on a model: KV cache for n_ctx positions and the tokens in it.
#[pyclass(name = "Session", module = "trit._core")]
pub(super) struct PySession {
    inner: model::Session,
}

#[pymethods]
impl PySession {
    #[new]
    #[pyo3(signature = (model, *, n_ctx=None, threads=None, kv_cache="f16"))]
    fn new(
        model: &PyModel,
        n_ctx: Option<usize>,
        threads: Option<usize>,
        kv_cache: &str,
    ) -> PyResult<Self> {
        let kv = model::KvType::parse(kv_cache).py()?;
        Ok(PySession {
            inner: model::Session::new(model.inner.clone(), n_ctx, threads, kv).py()?,
        })
    }

    #[getter]
    fn n_ctx(&self) -> usize {
        self.inner.n_ctx()
    }

    /// What the KV cache stores keys and values as: "f16" or "f32".
    #[getter]
    fn kv_cache(&self) -> &'static str {
        self.inner.kv_type().name()
    }

    /// Bytes of the KV cache.
    #[getter]
    fn cache_bytes(&self) -> usize {
        self.inner.cache_bytes()
    }

    #[getter]
    fn threads(&self) -> usize {
        self.inner.threads()
    }

    /// The tokens in the cache (a copy: `n_tokens` is the cheap way to count them).
    #[getter]
    fn tokens(&self) -> Vec<u32> {
        self.inner.tokens().to_vec()
    }

    /// How many tokens are in the cache.
    #[getter]
    fn n_tokens(&self) -> usize {
        self.inner.tokens().len()
    }

    /// Makes `ids` the sequence (reusing the cached prefix) and computes the
    /// logits after it; returns the number of tokens processed.
    fn prefill(&mut self, py: Python<'_>, ids: Vec<i64>) -> PyResult<usize> {
        let ids = token_ids(ids)?;
        let s = &mut self.inner;
        py.detach(|| s.prefill(&ids)).py()
    }

    /// Appends one token and computes the logits after it.
    fn push(&mut self, py: Python<'_>, token: i64) -> PyResult<()> {
        let id = token_ids(vec![token])?[0];
        let s = &mut self.inner;
        py.detach(|| s.push(id)).py()
    }

    /// Logits at every position of `ids`: float32 [len(ids), vocab].
    fn logits<'py>(
        &mut self,
        py: Python<'py>,
        ids: Vec<i64>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let ids = token_ids(ids)?;
        let vocab = self.inner.model().config.vocab_size;
        let s = &mut self.inner;
        let values = py.detach(|| s.logits(&ids)).py()?;
        values.into_pyarray(py).reshape([ids.len(), vocab])
    }

    /// The negative log-likelihood in nats, summed, of the tokens
    /// `ids[first:]`, each given the tokens before it, computed from an empty
    /// cache (which then holds `ids`). The logits are those of `logits(ids)`,
    /// reduced position by position in float64: memory O(vocab), not
    /// O(len(ids) * vocab).
    fn nll(&mut self, py: Python<'_>, ids: Vec<i64>, first: i64) -> PyResult<f64> {
        let ids = token_ids(ids)?;
        let first = usize::try_from(first).map_err(|_| {
            invalid(format!(
                "the first scored position must be >= 1, got {first}"
            ))
        })?;
        let s = &mut self.inner;
        py.detach(|| s.nll(&ids, first)).py()
    }

    /// Logits predicting the next token, float32 [vocab]; None before any input.
    fn last_logits<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyArray1<f32>>> {
        self.inner
            .last_logits()
            .map(|l| l.to_vec().into_pyarray(py))
    }

    /// Picks the next token from the current logits.
    fn sample(&self, py: Python<'_>, sampler: &mut PySampler) -> PyResult<u32> {
        let s = &self.inner;
        let logits = s
            .last_logits()
            .ok_or_else(|| invalid("nothing to sample from: feed the session a prompt first"))?;
        let sampler = &mut sampler.inner;
        py.detach(|| sampler.sample(logits, s.tokens())).py()
    }

    /// Forgets the cached tokens.
    fn reset(&mut self) {
        self.inner.reset();
    }
}

/// Sequences run together on one model: `slots` KV caches of n_ctx
/// positions each; `step` runs one forward pass over tokens of several of
/// them at once.
#[pyclass(name = "Engine", module = "trit._core")]
pub(super) struct PyEngine {
    inner: model::Engine,
}

/// One entry of a step: (slot, token ids to run after its cached ones,
/// whether the logits after the last are wanted).
type WorkArg = (usize, Vec<i64>, bool);

#[pymethods]
impl PyEngine {
    #[new]
    #[pyo3(signature = (model, *, slots=1, n_ctx=None, threads=None, kv_cache="f16"))]
    fn new(
        model: &PyModel,
        slots: usize,
        n_ctx: Option<usize>,
        threads: Option<usize>,
        kv_cache: &str,
    ) -> PyResult<Self> {
        let kv = model::KvType::parse(kv_cache).py()?;
        let kernel = crate::kernels::Kernel::active().py()?;
        let inner = model::Engine::new(model.inner.clone(), slots, n_ctx, threads, kv, kernel);
        Ok(PyEngine { inner: inner.py()? })
    }

    #[getter]
    fn n_ctx(&self) -> usize {
        self.inner.n_ctx()
    }

    /// What the KV caches store keys and values as: "f16" or "f32".
    #[getter]
    fn kv_cache(&self) -> &'static str {
        self.inner.kv_type().name()
    }

    #[getter]
    fn threads(&self) -> usize {
        self.inner.threads()
    }

    /// How many sequences the engine holds.
    #[getter]
    fn slots(&self) -> usize {
        self.inner.n_slots()
    }

    /// How many slots no sequence holds.
    #[getter]
    fn free_slots(&self) -> usize {
        self.inner.free_slots()
    }

    /// Bytes of one slot's KV cache when full (n_ctx positions).
    #[getter]
    fn slot_cache_bytes(&self) -> usize {
        self.inner.slot_cache_bytes()
    }

    /// Bytes of the KV caches' positions that hold tokens now.
    #[getter]
    fn cache_bytes_in_use(&self) -> usize {
        self.inner.cache_bytes_in_use()
    }

    /// Takes a free slot for a sequence starting with `ids`, reusing the
    /// longest cached start of it (from any slot); an InvalidInputError when
    /// every slot is held. The slot then holds that start.
    fn acquire(&mut self, ids: Vec<i64>) -> PyResult<usize> {
        let ids = token_ids(ids)?;
        self.inner.acquire(&ids).py()
    }

    /// Gives a slot back (its cache is kept for prefix reuse).
    fn release(&mut self, slot: usize) -> PyResult<()> {
        self.inner.release(slot).py()
    }

    /// The tokens in a slot's cache.
    fn tokens(&self, slot: usize) -> PyResult<Vec<u32>> {
        Ok(self.inner.tokens(slot).py()?.to_vec())
    }

    /// How many tokens are in a slot's cache.
    fn n_tokens(&self, slot: usize) -> PyResult<usize> {
        Ok(self.inner.tokens(slot).py()?.len())
    }

    /// One forward pass: each (slot, ids, logits) runs ids after the slot's
    /// cached tokens; slots asking for logits get those after their last token.
    fn step(&mut self, py: Python<'_>, work: Vec<WorkArg>) -> PyResult<()> {
        let ids = work
            .into_iter()
            .map(|(slot, ids, logits)| Ok((slot, token_ids(ids)?, logits)))
            .collect::<PyResult<Vec<_>>>()?;
        let work: Vec<model::Work<'_>> = ids
            .iter()
            .map(|(slot, ids, logits)| model::Work {
                slot: *slot,
                ids,
                logits: *logits,
            })
            .collect();
        let engine = &mut self.inner;
        py.detach(|| engine.step(&work)).py()
    }

    /// Makes `ids` a slot's sequence (reusing its cached prefix) and computes
    /// the logits after it; returns the number of tokens processed.
    fn prefill(&mut self, py: Python<'_>, slot: usize, ids: Vec<i64>) -> PyResult<usize> {
        let ids = token_ids(ids)?;
        let engine = &mut self.inner;
        py.detach(|| engine.prefill(slot, &ids)).py()
    }

    /// Logits at every position of `ids`, run in `slot` from an empty cache:
    /// float32 [len(ids), vocab].
    fn logits<'py>(
        &mut self,
        py: Python<'py>,
        slot: usize,
        ids: Vec<i64>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let ids = token_ids(ids)?;
        let vocab = self.inner.model().config.vocab_size;
        let engine = &mut self.inner;
        let values = py.detach(|| engine.logits(slot, &ids)).py()?;
        values.into_pyarray(py).reshape([ids.len(), vocab])
    }

    /// As `Session.nll`, in `slot`.
    fn nll(&mut self, py: Python<'_>, slot: usize, ids: Vec<i64>, first: i64) -> PyResult<f64> {
        let ids = token_ids(ids)?;
        let first = usize::try_from(first).map_err(|_| {
            invalid(format!(
                "the first scored position must be >= 1, got {first}"
            ))
        })?;
        let engine = &mut self.inner;
        py.detach(|| engine.nll(slot, &ids, first)).py()
    }

    /// Logits predicting a slot's next token, float32 [vocab]; None before any input.
    fn last_logits<'py>(
        &self,
        py: Python<'py>,
        slot: usize,
    ) -> PyResult<Option<Bound<'py, PyArray1<f32>>>> {
        let logits = self.inner.last_logits(slot).py()?;
        Ok(logits.map(|l| l.to_vec().into_pyarray(py)))
    }

    /// Picks a slot's next token from its current logits.
    fn sample(&self, py: Python<'_>, slot: usize, sampler: &mut PySampler) -> PyResult<u32> {
        let e = &self.inner;
        let logits = e.last_logits(slot).py()?.ok_or_else(|| {
            invalid(format!(
                "nothing to sample from: slot {slot} has no logits (run its tokens first)"
            ))
        })?;
        let tokens = e.tokens(slot).py()?;
        let sampler = &mut sampler.inner;
        py.detach(|| sampler.sample(logits, tokens)).py()
    }

    /// Forgets a slot's cached tokens.
    fn reset(&mut self, slot: usize) -> PyResult<()> {
        self.inner.reset(slot).py()
    }
}
