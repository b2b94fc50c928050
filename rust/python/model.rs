//! Bindings for the model, its sessions and the sampler. Arguments are
//! converted and checked here with the GIL held; loading, forward passes and
//! sampling run detached.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};

use numpy::{IntoPyArray, PyArray1, PyArray2, PyArrayMethods};
use pyo3::prelude::*;

use super::{args, busy, invalid, IntoPyResult, PyTernaryMatrix};
use crate::checkpoint::MemoryCheckpoint;
use crate::kernels::Packing;
use crate::model::dense::DenseMatrix;
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
        linear_class="bitlinear".to_string(), quantization_mode="offline".to_string()
    ))]
    // The defaults as Python sees them (PyO3 writes a computed default as `...`).
    #[pyo3(text_signature = "(*, vocab_size, hidden_size, intermediate_size, \
        num_hidden_layers, num_attention_heads, num_key_value_heads, rope_theta, rms_norm_eps, \
        max_position_embeddings, head_dim=None, tie_word_embeddings=True, \
        linear_class='bitlinear', quantization_mode='offline')")]
    #[allow(clippy::too_many_arguments)]
    fn new(
        #[pyo3(from_py_with = args::vocab_size)] vocab_size: usize,
        #[pyo3(from_py_with = args::hidden_size)] hidden_size: usize,
        #[pyo3(from_py_with = args::intermediate_size)] intermediate_size: usize,
        #[pyo3(from_py_with = args::num_hidden_layers)] num_hidden_layers: usize,
        #[pyo3(from_py_with = args::num_attention_heads)] num_attention_heads: usize,
        #[pyo3(from_py_with = args::num_key_value_heads)] num_key_value_heads: usize,
        #[pyo3(from_py_with = args::rope_theta)] rope_theta: f64,
        #[pyo3(from_py_with = args::rms_norm_eps)] rms_norm_eps: f64,
        #[pyo3(from_py_with = args::max_position_embeddings)] max_position_embeddings: usize,
        #[pyo3(from_py_with = args::head_dim)] head_dim: Option<usize>,
        #[pyo3(from_py_with = args::tie_word_embeddings)] tie_word_embeddings: bool,
        #[pyo3(from_py_with = args::linear_class)] linear_class: String,
        #[pyo3(from_py_with = args::quantization_mode)] quantization_mode: String,
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
            linear_class: LinearClass::parse(&linear_class).py()?,
            quantization_mode: QuantizationMode::parse(&quantization_mode).py()?,
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

/// A loaded model; immutable, shared by its sessions.
#[pyclass(name = "Model", module = "trit._core", frozen)]
pub(super) struct PyModel {
    inner: Arc<model::Model>,
}

#[pymethods]
impl PyModel {
    /// Reads the model in `folder` (config.json and model.safetensors, or
    /// shards and their index), or the GGUF file `folder` names. Returns it with warnings (all-zero or unused
    /// tensors) for the caller to show. `head` is the output head's
    /// precision: "bf16" (as stored), "int8" or "q6" (see `HeadPrecision`).
    /// `packing` is how the ternary projections are stored: "i2" or "tq1"
    /// (`Packing`).
    #[staticmethod]
    #[pyo3(signature = (folder, *, threads=None, head="bf16".to_string(), packing=Packing::I2))]
    #[pyo3(text_signature = "(folder, *, threads=None, head='bf16', packing='i2')")]
    fn open(
        py: Python<'_>,
        folder: PathBuf,
        #[pyo3(from_py_with = args::threads)] threads: Option<usize>,
        #[pyo3(from_py_with = args::head)] head: String,
        #[pyo3(from_py_with = args::packing)] packing: Packing,
    ) -> PyResult<(PyModel, Vec<String>)> {
        let pool = threads::pool(threads).py()?;
        let head = model::HeadPrecision::parse(&head).py()?;
        let (m, warnings) = py
            .detach(|| model::open(&folder, &pool, head, packing))
            .py()?;
        Ok((PyModel { inner: Arc::new(m) }, warnings))
    }

    /// Builds the model from tensors given in memory. Their bytes are copied
    /// first, so the arrays are only read, never kept or changed. Returns the
    /// model with warnings (all-zero or unused tensors) for the caller to
    /// show. `head` as for `open`.
    #[staticmethod]
    #[pyo3(signature = (config, tensors, *, threads=None, head="bf16".to_string(), packing=Packing::I2))]
    #[pyo3(text_signature = "(config, tensors, *, threads=None, head='bf16', packing='i2')")]
    fn load(
        py: Python<'_>,
        config: &PyModelConfig,
        #[pyo3(from_py_with = args::tensors)] tensors: Vec<args::TensorArg<'_>>,
        #[pyo3(from_py_with = args::threads)] threads: Option<usize>,
        #[pyo3(from_py_with = args::head)] head: String,
        #[pyo3(from_py_with = args::packing)] packing: Packing,
    ) -> PyResult<(PyModel, Vec<String>)> {
        let pool = threads::pool(threads).py()?;
        let head = model::HeadPrecision::parse(&head).py()?;
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
            .detach(|| model::load(config, &checkpoint, &pool, head, packing))
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

    /// How the ternary projections are stored: "i2" or "tq1".
    #[getter]
    fn packing(&self) -> &'static str {
        self.inner.packing().name()
    }

    /// Bytes of weights read to generate one token.
    #[getter]
    fn bytes_per_token(&self) -> usize {
        self.inner.bytes_per_token()
    }

    /// A copy of projection `name` ("q_proj", ..., "down_proj") of `layer`.
    fn projection(
        &self,
        #[pyo3(from_py_with = args::layer)] layer: usize,
        #[pyo3(from_py_with = args::projection_name)] name: String,
    ) -> PyResult<PyTernaryMatrix> {
        let p = model::Proj::parse(&name).py()?;
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

    /// A copy of norm weight `name` of `layer` ("input_layernorm",
    /// "post_attention_layernorm", "attn_sub_norm", "ffn_sub_norm"), or of the
    /// final "norm" (no layer).
    #[pyo3(signature = (name, layer=None))]
    fn norm<'py>(
        &self,
        py: Python<'py>,
        name: &str,
        layer: Option<usize>,
    ) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let m = &self.inner;
        let values = match layer {
            None if name == "norm" => &m.norm,
            None => return Err(invalid(format!("norm {name:?} needs a layer"))),
            Some(l) => {
                let layer = m.layers.get(l).ok_or_else(|| {
                    invalid(format!(
                        "layer {l} does not exist; the model has {}",
                        m.layers.len()
                    ))
                })?;
                let absent = || invalid(format!("this model's layers have no {name}"));
                match name {
                    "input_layernorm" => &layer.input_norm,
                    "post_attention_layernorm" => &layer.post_norm,
                    "attn_sub_norm" => layer.attn_sub_norm.as_ref().ok_or_else(absent)?,
                    "ffn_sub_norm" => layer.ffn_sub_norm.as_ref().ok_or_else(absent)?,
                    _ => {
                        return Err(invalid(format!(
                            "unknown norm {name:?}; expected input_layernorm, \
                             post_attention_layernorm, attn_sub_norm or ffn_sub_norm"
                        )))
                    }
                }
            }
        };
        Ok(values.clone().into_pyarray(py))
    }

    /// A copy of the embedding ("embed_tokens") or the untied head
    /// ("lm_head") as held: ("bf16", its uint16 bits) or ("f32", float32),
    /// [rows, cols]. An int8 or q6 head is refused: it is not the stored values.
    fn dense<'py>(
        &self,
        py: Python<'py>,
        name: &str,
    ) -> PyResult<(&'static str, Bound<'py, PyAny>)> {
        let m = &self.inner;
        let matrix = match name {
            "embed_tokens" => &m.embed,
            "lm_head" => m
                .lm_head
                .as_ref()
                .ok_or_else(|| invalid("the model's head is tied to its embedding"))?,
            _ => {
                return Err(invalid(format!(
                    "unknown matrix {name:?}; expected embed_tokens or lm_head"
                )))
            }
        };
        let (rows, cols) = (matrix.rows(), matrix.cols());
        match matrix {
            DenseMatrix::Bf16 { bits, .. } => Ok((
                "bf16",
                bits.clone()
                    .into_pyarray(py)
                    .reshape([rows, cols])?
                    .into_any(),
            )),
            DenseMatrix::F32 { values, .. } => Ok((
                "f32",
                values
                    .clone()
                    .into_pyarray(py)
                    .reshape([rows, cols])?
                    .into_any(),
            )),
            DenseMatrix::Int8 { .. } => Err(invalid(format!(
                "{name} is held as int8 rows; load the model with the bf16 head to read it"
            ))),
            DenseMatrix::Q6(_) => Err(invalid(format!(
                "{name} is held as q6 rows; load the model with the bf16 head to read it"
            ))),
        }
    }
}

/// An object that one thread uses at a time. A Python thread that reaches
/// it while another computes with it gets a `TritError` naming it rather
/// than a wait: the holder runs without the GIL and needs it back to
/// return, so a thread waiting with the GIL held could wait forever.
struct Exclusive<T> {
    value: Mutex<T>,
    what: &'static str,
}

impl<T> Exclusive<T> {
    fn new(what: &'static str, value: T) -> Self {
        Exclusive {
            value: Mutex::new(value),
            what,
        }
    }

    fn get(&self) -> PyResult<MutexGuard<'_, T>> {
        match self.value.try_lock() {
            Ok(guard) => Ok(guard),
            // A panic is caught at the boundary and raised; the value is
            // left as the failed call left it, as it was before this lock.
            Err(TryLockError::Poisoned(poisoned)) => Ok(poisoned.into_inner()),
            Err(TryLockError::WouldBlock) => Err(busy(self.what)),
        }
    }
}

/// How the next token is picked: greedy when temperature is 0.
#[pyclass(name = "Sampler", module = "trit._core", frozen)]
pub(super) struct PySampler {
    inner: Exclusive<Sampler>,
}

#[pymethods]
impl PySampler {
    #[new]
    #[pyo3(signature = (
        *, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, seed=0
    ))]
    fn new(
        #[pyo3(from_py_with = args::temperature)] temperature: f64,
        #[pyo3(from_py_with = args::top_k)] top_k: i64,
        #[pyo3(from_py_with = args::top_p)] top_p: f64,
        #[pyo3(from_py_with = args::min_p)] min_p: f64,
        #[pyo3(from_py_with = args::repetition_penalty)] repetition_penalty: f64,
        #[pyo3(from_py_with = args::seed)] seed: u64,
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
            inner: Exclusive::new("Sampler", Sampler::new(params, seed).py()?),
        })
    }
}

/// One sequence on a model: KV cache for n_ctx positions and the tokens in it.
#[pyclass(name = "Session", module = "trit._core", frozen)]
pub(super) struct PySession {
    inner: Exclusive<model::Session>,
    n_ctx: usize,
    kv: model::KvType,
    cache_bytes: usize,
    threads: usize,
}

#[pymethods]
impl PySession {
    #[new]
    #[pyo3(signature = (model, *, n_ctx=None, threads=None, kv_cache=model::KV_AUTO.to_string()))]
    // The default as Python sees it (PyO3 writes a computed default as `...`).
    #[pyo3(text_signature = "(model, *, n_ctx=None, threads=None, kv_cache='auto')")]
    fn new(
        model: &PyModel,
        #[pyo3(from_py_with = args::n_ctx)] n_ctx: Option<usize>,
        #[pyo3(from_py_with = args::threads)] threads: Option<usize>,
        #[pyo3(from_py_with = args::kv_cache)] kv_cache: String,
    ) -> PyResult<Self> {
        let kv = model::KvType::for_head_dim(&kv_cache, model.inner.config.head_dim).py()?;
        let session = model::Session::new(model.inner.clone(), n_ctx, threads, kv).py()?;
        Ok(PySession {
            n_ctx: session.n_ctx(),
            kv: session.kv_type(),
            cache_bytes: session.cache_bytes(),
            threads: session.threads(),
            inner: Exclusive::new("Session", session),
        })
    }

    #[getter]
    fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    /// What the KV cache stores keys and values as: "f16", "f32" or "q8_0"
    /// ("auto" resolved for the model).
    #[getter]
    fn kv_cache(&self) -> &'static str {
        self.kv.name()
    }

    /// Bytes of the KV cache.
    #[getter]
    fn cache_bytes(&self) -> usize {
        self.cache_bytes
    }

    #[getter]
    fn threads(&self) -> usize {
        self.threads
    }

    /// The tokens in the cache (a copy: `n_tokens` is the cheap way to count them).
    #[getter]
    fn tokens(&self) -> PyResult<Vec<u32>> {
        Ok(self.inner.get()?.tokens().to_vec())
    }

    /// How many tokens are in the cache.
    #[getter]
    fn n_tokens(&self) -> PyResult<usize> {
        Ok(self.inner.get()?.tokens().len())
    }

    /// Makes `ids` the sequence (reusing the cached prefix) and computes the
    /// logits after it; returns the number of tokens processed.
    fn prefill(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = args::token_ids)] ids: Vec<u32>,
    ) -> PyResult<usize> {
        let mut s = self.inner.get()?;
        let s = &mut *s;
        py.detach(|| s.prefill(&ids)).py()
    }

    /// Appends one token and computes the logits after it.
    fn push(&self, py: Python<'_>, #[pyo3(from_py_with = args::token)] token: u32) -> PyResult<()> {
        let mut s = self.inner.get()?;
        let s = &mut *s;
        py.detach(|| s.push(token)).py()
    }

    /// Logits at every position of `ids`: float32 [len(ids), vocab].
    fn logits<'py>(
        &self,
        py: Python<'py>,
        #[pyo3(from_py_with = args::token_ids)] ids: Vec<u32>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let mut s = self.inner.get()?;
        let vocab = s.model().config.vocab_size;
        let s = &mut *s;
        let values = py.detach(|| s.logits(&ids)).py()?;
        values.into_pyarray(py).reshape([ids.len(), vocab])
    }

    /// The negative log-likelihood in nats, summed, of the tokens
    /// `ids[first:]`, each given the tokens before it, computed from an empty
    /// cache (which then holds `ids`). The logits are those of `logits(ids)`,
    /// reduced position by position in float64: memory O(vocab), not
    /// O(len(ids) * vocab).
    fn nll(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = args::token_ids)] ids: Vec<u32>,
        #[pyo3(from_py_with = args::first)] first: i64,
    ) -> PyResult<f64> {
        let first = usize::try_from(first).map_err(|_| {
            invalid(format!(
                "the first scored position must be >= 1, got {first}"
            ))
        })?;
        let mut s = self.inner.get()?;
        let s = &mut *s;
        py.detach(|| s.nll(&ids, first)).py()
    }

    /// Logits predicting the next token, float32 [vocab]; None before any input.
    fn last_logits<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyArray1<f32>>>> {
        let s = self.inner.get()?;
        Ok(s.last_logits().map(|l| l.to_vec().into_pyarray(py)))
    }

    /// Picks the next token from the current logits.
    fn sample(&self, py: Python<'_>, sampler: &PySampler) -> PyResult<u32> {
        let s = self.inner.get()?;
        let logits = s
            .last_logits()
            .ok_or_else(|| invalid("nothing to sample from: feed the session a prompt first"))?;
        let mut sampler = sampler.inner.get()?;
        let sampler = &mut *sampler;
        py.detach(|| sampler.sample(s.kernel(), logits, s.tokens()))
            .py()
    }

    /// Forgets the cached tokens.
    fn reset(&self) -> PyResult<()> {
        self.inner.get()?.reset();
        Ok(())
    }
}

/// Sequences run together on one model: `slots` KV caches of n_ctx
/// positions each; `step` runs one forward pass over tokens of several of
/// them at once.
#[pyclass(name = "Engine", module = "trit._core", frozen)]
pub(super) struct PyEngine {
    inner: Exclusive<model::Engine>,
    n_ctx: usize,
    kv: model::KvType,
    threads: usize,
    slots: usize,
    slot_cache_bytes: usize,
}

#[pymethods]
impl PyEngine {
    #[new]
    #[pyo3(signature = (model, *, slots=1, n_ctx=None, threads=None, kv_cache=model::KV_AUTO.to_string()))]
    // The default as Python sees it (PyO3 writes a computed default as `...`).
    #[pyo3(text_signature = "(model, *, slots=1, n_ctx=None, threads=None, kv_cache='auto')")]
    fn new(
        model: &PyModel,
        #[pyo3(from_py_with = args::slots)] slots: usize,
        #[pyo3(from_py_with = args::n_ctx)] n_ctx: Option<usize>,
        #[pyo3(from_py_with = args::threads)] threads: Option<usize>,
        #[pyo3(from_py_with = args::kv_cache)] kv_cache: String,
    ) -> PyResult<Self> {
        let kv = model::KvType::for_head_dim(&kv_cache, model.inner.config.head_dim).py()?;
        let kernel = crate::kernels::Kernel::active().py()?;
        let engine =
            model::Engine::new(model.inner.clone(), slots, n_ctx, threads, kv, kernel).py()?;
        Ok(PyEngine {
            n_ctx: engine.n_ctx(),
            kv: engine.kv_type(),
            threads: engine.threads(),
            slots: engine.n_slots(),
            slot_cache_bytes: engine.slot_cache_bytes(),
            inner: Exclusive::new("Engine", engine),
        })
    }

    #[getter]
    fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    /// What the KV caches store keys and values as: "f16", "f32" or "q8_0"
    /// ("auto" resolved for the model).
    #[getter]
    fn kv_cache(&self) -> &'static str {
        self.kv.name()
    }

    #[getter]
    fn threads(&self) -> usize {
        self.threads
    }

    /// How many sequences the engine holds.
    #[getter]
    fn slots(&self) -> usize {
        self.slots
    }

    /// How many slots no sequence holds.
    #[getter]
    fn free_slots(&self) -> PyResult<usize> {
        Ok(self.inner.get()?.free_slots())
    }

    /// Bytes of one slot's KV cache when full (n_ctx positions).
    #[getter]
    fn slot_cache_bytes(&self) -> usize {
        self.slot_cache_bytes
    }

    /// Bytes of the KV caches' positions that hold tokens now.
    #[getter]
    fn cache_bytes_in_use(&self) -> PyResult<usize> {
        Ok(self.inner.get()?.cache_bytes_in_use())
    }

    /// Takes a free slot for a sequence starting with `ids`, reusing the
    /// longest cached start of it (from any slot); an InvalidInputError when
    /// every slot is held. The slot then holds that start.
    fn acquire(&self, #[pyo3(from_py_with = args::token_ids)] ids: Vec<u32>) -> PyResult<usize> {
        self.inner.get()?.acquire(&ids).py()
    }

    /// Gives a slot back (its cache is kept for prefix reuse).
    fn release(&self, #[pyo3(from_py_with = args::slot)] slot: usize) -> PyResult<()> {
        self.inner.get()?.release(slot).py()
    }

    /// The tokens in a slot's cache.
    fn tokens(&self, #[pyo3(from_py_with = args::slot)] slot: usize) -> PyResult<Vec<u32>> {
        Ok(self.inner.get()?.tokens(slot).py()?.to_vec())
    }

    /// How many tokens are in a slot's cache.
    fn n_tokens(&self, #[pyo3(from_py_with = args::slot)] slot: usize) -> PyResult<usize> {
        Ok(self.inner.get()?.tokens(slot).py()?.len())
    }

    /// One forward pass: each (slot, ids, logits) runs ids after the slot's
    /// cached tokens; slots asking for logits get those after their last token.
    fn step(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = args::work)] work: Vec<(usize, Vec<u32>, bool)>,
    ) -> PyResult<()> {
        let work: Vec<model::Work<'_>> = work
            .iter()
            .map(|(slot, ids, logits)| model::Work {
                slot: *slot,
                ids,
                logits: *logits,
            })
            .collect();
        let mut engine = self.inner.get()?;
        let engine = &mut *engine;
        py.detach(|| engine.step(&work)).py()
    }

    /// Makes `ids` a slot's sequence (reusing its cached prefix) and computes
    /// the logits after it; returns the number of tokens processed.
    fn prefill(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = args::slot)] slot: usize,
        #[pyo3(from_py_with = args::token_ids)] ids: Vec<u32>,
    ) -> PyResult<usize> {
        let mut engine = self.inner.get()?;
        let engine = &mut *engine;
        py.detach(|| engine.prefill(slot, &ids)).py()
    }

    /// Logits at every position of `ids`, run in `slot` from an empty cache:
    /// float32 [len(ids), vocab].
    fn logits<'py>(
        &self,
        py: Python<'py>,
        #[pyo3(from_py_with = args::slot)] slot: usize,
        #[pyo3(from_py_with = args::token_ids)] ids: Vec<u32>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let mut engine = self.inner.get()?;
        let vocab = engine.model().config.vocab_size;
        let engine = &mut *engine;
        let values = py.detach(|| engine.logits(slot, &ids)).py()?;
        values.into_pyarray(py).reshape([ids.len(), vocab])
    }

    /// As `Session.nll`, in `slot`.
    fn nll(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = args::slot)] slot: usize,
        #[pyo3(from_py_with = args::token_ids)] ids: Vec<u32>,
        #[pyo3(from_py_with = args::first)] first: i64,
    ) -> PyResult<f64> {
        let first = usize::try_from(first).map_err(|_| {
            invalid(format!(
                "the first scored position must be >= 1, got {first}"
            ))
        })?;
        let mut engine = self.inner.get()?;
        let engine = &mut *engine;
        py.detach(|| engine.nll(slot, &ids, first)).py()
    }

    /// Logits predicting a slot's next token, float32 [vocab]; None before any input.
    fn last_logits<'py>(
        &self,
        py: Python<'py>,
        #[pyo3(from_py_with = args::slot)] slot: usize,
    ) -> PyResult<Option<Bound<'py, PyArray1<f32>>>> {
        let engine = self.inner.get()?;
        let logits = engine.last_logits(slot).py()?;
        Ok(logits.map(|l| l.to_vec().into_pyarray(py)))
    }

    /// Picks a slot's next token from its current logits.
    fn sample(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = args::slot)] slot: usize,
        sampler: &PySampler,
    ) -> PyResult<u32> {
        let e = self.inner.get()?;
        let mut sampler = sampler.inner.get()?;
        let mut pair = [(slot, &mut *sampler)];
        let tokens = py.detach(|| e.sample_many(&mut pair)).py()?;
        Ok(tokens[0])
    }

    /// The next token of each (slot, sampler) pair, sampled on the engine's
    /// threads: the same tokens as `sample` called pair after pair.
    fn sample_many(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = args::sample_requests)] requests: Vec<(usize, Bound<'_, PySampler>)>,
    ) -> PyResult<Vec<u32>> {
        let e = self.inner.get()?;
        let mut guards = requests
            .iter()
            .map(|(_, s)| s.get().inner.get())
            .collect::<PyResult<Vec<_>>>()?;
        let mut pairs: Vec<(usize, &mut Sampler)> = requests
            .iter()
            .zip(guards.iter_mut())
            .map(|((slot, _), guard)| (*slot, &mut **guard))
            .collect();
        py.detach(|| e.sample_many(&mut pairs)).py()
    }

    /// Forgets a slot's cached tokens.
    fn reset(&self, #[pyo3(from_py_with = args::slot)] slot: usize) -> PyResult<()> {
        self.inner.get()?.reset(slot).py()
    }
}
