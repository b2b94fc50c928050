//! Building the model's weights from raw checkpoint tensors, with every
//! tensor's presence, shape and dtype checked first.
//!
//! Projections arrive either packed the Hugging Face way (U8 `[out/4, in]` plus
//! `weight_scale`, docs/formats.md "Packing") or as float masters that are
//! ternarised here with absmean (docs/formats.md "Absmean ternarisation").
//! Either way they become `TernaryMatrix`es whose scale multiplies. Norms
//! become f32 (bf16 widens exactly); the embedding keeps its bf16 storage.

use std::sync::Mutex;

use rayon::prelude::*;
use rayon::ThreadPool;

use super::config::{Config, LinearClass, QuantizationMode};
use super::dense::DenseMatrix;
use crate::checkpoint::{Checkpoint, DType, RawTensor, Usage};
use crate::error::{Result, TritError};
use crate::kernels::activations::clamped_code;
use crate::kernels::{Packing, TernaryMatrix};
use crate::memory::try_reserve_total;

/// The seven ternary projections of a decoder layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    pub const ALL: [Proj; 7] = [
        Proj::Q,
        Proj::K,
        Proj::V,
        Proj::O,
        Proj::Gate,
        Proj::Up,
        Proj::Down,
    ];

    /// The module path inside a layer, as transformers names it.
    pub fn path(self) -> &'static str {
        match self {
            Proj::Q => "self_attn.q_proj",
            Proj::K => "self_attn.k_proj",
            Proj::V => "self_attn.v_proj",
            Proj::O => "self_attn.o_proj",
            Proj::Gate => "mlp.gate_proj",
            Proj::Up => "mlp.up_proj",
            Proj::Down => "mlp.down_proj",
        }
    }

    /// "q_proj", "gate_proj", ...
    pub fn short_name(self) -> &'static str {
        self.path().rsplit('.').next().unwrap_or("")
    }

    pub fn parse(name: &str) -> Result<Proj> {
        Proj::ALL
            .into_iter()
            .find(|p| p.short_name() == name)
            .ok_or_else(|| {
                TritError::invalid(format!(
                    "unknown projection {name:?}; expected one of q_proj, k_proj, v_proj, \
                     o_proj, gate_proj, up_proj, down_proj"
                ))
            })
    }

    /// (n_out, n_in) of the full-size weight.
    pub fn dims(self, c: &Config) -> (usize, usize) {
        match self {
            Proj::Q => (c.q_dim(), c.hidden_size),
            Proj::K | Proj::V => (c.kv_dim(), c.hidden_size),
            Proj::O => (c.hidden_size, c.q_dim()),
            Proj::Gate | Proj::Up => (c.intermediate_size, c.hidden_size),
            Proj::Down => (c.hidden_size, c.intermediate_size),
        }
    }
}

/// One decoder layer.
#[derive(Clone, Debug)]
pub struct Layer {
    pub input_norm: Vec<f32>, // [hidden]
    pub q: TernaryMatrix,     // [q_dim, hidden]
    pub k: TernaryMatrix,     // [kv_dim, hidden]
    pub v: TernaryMatrix,     // [kv_dim, hidden]
    /// [q_dim] (= hidden); in the families that have sub-norms (`Family::sub_norms`).
    pub attn_sub_norm: Option<Vec<f32>>,
    pub o: TernaryMatrix,    // [hidden, q_dim]
    pub post_norm: Vec<f32>, // [hidden]
    pub gate: TernaryMatrix, // [intermediate, hidden]
    pub up: TernaryMatrix,   // [intermediate, hidden]
    /// [intermediate]; in the families that have sub-norms.
    pub ffn_sub_norm: Option<Vec<f32>>,
    pub down: TernaryMatrix, // [hidden, intermediate]
    /// `use_rms_norm`: the weight of the RMSNorm each projection applies to
    /// its input before quantising it, in `Proj::ALL` order ([n_in] each).
    pub bitlinear_norms: Option<Box<[Vec<f32>; 7]>>,
}

impl Layer {
    /// The input RMSNorm weight of projection `p` (use_rms_norm models).
    pub fn bitlinear_norm(&self, p: Proj) -> Option<&[f32]> {
        let i = Proj::ALL.iter().position(|&q| q == p)?;
        self.bitlinear_norms.as_ref().map(|n| &n[i][..])
    }

    /// Stores the layer's seven projections in `packing`, one at a time (at
    /// most one projection is held twice).
    pub fn repack(&mut self, packing: Packing) -> Result<()> {
        for m in [
            &mut self.q,
            &mut self.k,
            &mut self.v,
            &mut self.o,
            &mut self.gate,
            &mut self.up,
            &mut self.down,
        ] {
            if m.packing() != packing {
                *m = m.repacked(packing)?;
            }
        }
        Ok(())
    }

    pub fn proj(&self, p: Proj) -> &TernaryMatrix {
        match p {
            Proj::Q => &self.q,
            Proj::K => &self.k,
            Proj::V => &self.v,
            Proj::O => &self.o,
            Proj::Gate => &self.gate,
            Proj::Up => &self.up,
            Proj::Down => &self.down,
        }
    }
}

/// A loaded BitNet b1.58 model: configuration and weights, immutable and
/// shared by every session.
#[derive(Clone, Debug)]
pub struct Model {
    pub config: Config,
    pub embed: DenseMatrix, // [vocab, hidden], bf16 as stored
    pub layers: Vec<Layer>,
    pub norm: Vec<f32>, // [hidden]
    /// [vocab, hidden] when the head is not tied to the embedding.
    pub lm_head: Option<DenseMatrix>,
}

impl Model {
    /// The matrix the logits are computed with.
    pub fn head(&self) -> &DenseMatrix {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// The packing of the ternary projections (all share one).
    pub fn packing(&self) -> Packing {
        self.layers
            .first()
            .map_or(Packing::default(), |l| l.q.packing())
    }

    /// Bytes of the layers read once per token: packed projections and norms.
    fn layer_bytes(&self) -> usize {
        let f32s = std::mem::size_of::<f32>();
        self.layers
            .iter()
            .map(|l| {
                Proj::ALL
                    .iter()
                    .map(|&p| l.proj(p).packed_bytes())
                    .sum::<usize>()
                    + (l.input_norm.len()
                        + l.attn_sub_norm.as_ref().map_or(0, Vec::len)
                        + l.post_norm.len()
                        + l.ffn_sub_norm.as_ref().map_or(0, Vec::len)
                        + l.bitlinear_norms
                            .as_ref()
                            .map_or(0, |n| n.iter().map(Vec::len).sum()))
                        * f32s
            })
            .sum::<usize>()
            + self.norm.len() * f32s
    }

    /// Bytes of all weights in memory.
    pub fn weight_bytes(&self) -> usize {
        self.layer_bytes()
            + self.embed.nbytes()
            + self.lm_head.as_ref().map_or(0, DenseMatrix::nbytes)
    }

    /// Bytes of weights read to generate one token: every layer, the whole
    /// head, and one embedding row (the rest of an untied embedding is not touched).
    pub fn bytes_per_token(&self) -> usize {
        let row = self.embed.nbytes() / self.embed.rows().max(1);
        self.layer_bytes() + self.head().nbytes() + if self.lm_head.is_some() { row } else { 0 }
    }
}

/// The checkpoint being read, with the tensors used and the warnings so far.
struct Loader<'c> {
    checkpoint: &'c dyn Checkpoint,
    tensors: Usage<'c>,
    warnings: Mutex<Vec<String>>,
}

impl<'c> Loader<'c> {
    fn take(&self, name: &str) -> Result<RawTensor<'c>> {
        self.tensors.take(name)
    }

    fn warn(&self, msg: String) {
        self.warnings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(msg);
    }

    /// A float tensor of exactly `shape`, checked to hold only finite values.
    fn float(&self, name: &str, shape: &[usize]) -> Result<RawTensor<'c>> {
        let t = self.take(name)?;
        if !t.dtype.is_float() {
            return Err(TritError::invalid(format!(
                "tensor {name:?} has dtype {}; expected BF16, F16 or F32",
                t.dtype.name()
            )));
        }
        if t.shape != shape {
            return Err(TritError::invalid(format!(
                "tensor {name:?} has shape {:?}; expected {shape:?}",
                t.shape
            )));
        }
        let (bad, all_zero) = scan_floats(&t);
        if let Some(i) = bad {
            return Err(TritError::invalid(format!(
                "tensor {name:?} holds a non-finite value ({}) at flat index {i}",
                t.get_f32(i)
            )));
        }
        if all_zero {
            self.warn(format!("tensor {name:?} is all zeros"));
        }
        Ok(t)
    }

    /// A norm weight vector of `len` values, widened to f32.
    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        self.float(name, &[len])?.to_f32(name)
    }

    /// A ternary projection, packed or from float masters per the config.
    fn projection(&self, config: &Config, layer: usize, p: Proj) -> Result<TernaryMatrix> {
        let (n_out, n_in) = p.dims(config);
        let name = format!("model.layers.{layer}.{}.weight", p.path());
        // A checkpoint with ternary formats of its own (GGUF) hands the matrix over whole.
        if let Some(m) = self.tensors.take_ternary(&name) {
            let m = m?;
            if (m.n_out(), m.n_in()) != (n_out, n_in) {
                return Err(TritError::invalid(format!(
                    "tensor {name:?} is [{}, {}]; expected [{n_out}, {n_in}]",
                    m.n_out(),
                    m.n_in()
                )));
            }
            return Ok(m);
        }
        let m = match config.quantization_mode {
            QuantizationMode::Offline => {
                let scale_name = format!("model.layers.{layer}.{}.weight_scale", p.path());
                let ws = self.scalar(&scale_name)?;
                if ws == 0.0 {
                    self.warn(format!("tensor {scale_name:?} is zero"));
                }
                // docs/formats.md "Linear classes": AutoBitLinear stores
                // mean|W| and multiplies; BitLinear stores 1/mean|W| and divides.
                let scale = match config.linear_class {
                    LinearClass::AutoBitLinear => ws,
                    LinearClass::BitLinear => {
                        if ws == 0.0 {
                            return Err(TritError::invalid(format!(
                                "tensor {scale_name:?} is zero, but linear_class \"bitlinear\" \
                                 divides by it"
                            )));
                        }
                        1.0 / ws
                    }
                };
                let t = self.take(&name)?;
                // 0x55 is four zero codes. (A float master that ternarises to
                // all zeros is itself all zeros, which `float` reports.)
                if t.data.iter().all(|&b| b == 0x55) {
                    self.warn(format!("tensor {name:?} has only zero ternary weights"));
                }
                unpack_hf(&name, &t, n_out, n_in, scale)?
            }
            QuantizationMode::Online => {
                let t = self.float(&name, &[n_out, n_in])?;
                ternarize_absmean(&name, &t, n_out, n_in)?
            }
        };
        Ok(m)
    }

    /// The use_rms_norm weights of layer `l`'s projections,
    /// `{proj}.rms_norm.weight` [n_in]; transformers initialises a missing
    /// one to ones (and reports it missing), and so does trit, with a warning.
    fn bitlinear_norms(&self, config: &Config, l: usize) -> Result<[Vec<f32>; 7]> {
        let mut norms: [Vec<f32>; 7] = Default::default();
        for (norm, p) in norms.iter_mut().zip(Proj::ALL) {
            let name = format!("model.layers.{l}.{}.rms_norm.weight", p.path());
            let n_in = p.dims(config).1;
            *norm = if self.checkpoint.tensor(&name).is_some() {
                self.vector(&name, n_in)?
            } else {
                self.warn(format!(
                    "tensor {name:?} is absent; use_rms_norm takes its weight as ones \
                     (transformers' initial value)"
                ));
                vec![1.0; n_in]
            };
        }
        Ok(norms)
    }

    /// A one-element float tensor (shape [1] as transformers saves it, or []).
    fn scalar(&self, name: &str) -> Result<f32> {
        let t = self.take(name)?;
        if !t.dtype.is_float() || t.numel() != 1 || t.shape.len() > 1 {
            return Err(TritError::invalid(format!(
                "tensor {name:?} is {} {:?}; expected a float tensor of shape [1]",
                t.dtype.name(),
                t.shape
            )));
        }
        let v = t.get_f32(0);
        if !v.is_finite() {
            return Err(TritError::invalid(format!(
                "tensor {name:?} is {v}; expected a finite scale"
            )));
        }
        Ok(v)
    }
}

/// The index of the first non-finite value of a float tensor, and whether all
/// its values are zero. Works on the bits (an all-ones exponent is inf or NaN)
/// in parallel chunks: the embedding of a real model has 328 million values.
fn scan_floats(t: &RawTensor<'_>) -> (Option<usize>, bool) {
    // (element size, exponent mask, magnitude mask) of each float dtype.
    let (size, exponent, magnitude): (usize, u32, u32) = match t.dtype {
        DType::BF16 => (2, 0x7F80, 0x7FFF),
        DType::F16 => (2, 0x7C00, 0x7FFF),
        DType::F32 => (4, 0x7F80_0000, 0x7FFF_FFFF),
        _ => unreachable!("scan_floats is called on float tensors"),
    };
    const CHUNK: usize = 1 << 20; // elements
    let bits = |e: &[u8]| {
        if size == 2 {
            u32::from(u16::from_le_bytes([e[0], e[1]]))
        } else {
            u32::from_le_bytes([e[0], e[1], e[2], e[3]])
        }
    };
    let scan = |(c, bytes): (usize, &[u8])| {
        // One branch-free pass per element type, which the compiler
        // vectorizes; the position of a bad value is looked for only in a
        // chunk that has one.
        let (bad, any_magnitude) = if size == 2 {
            bytes.chunks_exact(2).fold((0u16, 0u16), |(bad, any), e| {
                let b = u16::from_le_bytes([e[0], e[1]]);
                let exp = exponent as u16;
                (
                    bad | u16::from(b & exp == exp),
                    any | (b & magnitude as u16),
                )
            })
        } else {
            let (bad, any) = bytes.chunks_exact(4).fold((0u32, 0u32), |(bad, any), e| {
                let b = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
                (
                    bad | u32::from(b & exponent == exponent),
                    any | (b & magnitude),
                )
            });
            (u16::from(bad != 0), u16::from(any != 0))
        };
        let at = if bad != 0 {
            bytes
                .chunks_exact(size)
                .position(|e| bits(e) & exponent == exponent)
                .map(|i| c * CHUNK + i)
        } else {
            None
        };
        (at, any_magnitude == 0)
    };
    let parts: Vec<(Option<usize>, bool)> = t
        .data
        .par_chunks(CHUNK * size)
        .enumerate()
        .map(scan)
        .collect();
    let bad = parts.iter().find_map(|&(b, _)| b);
    (bad, parts.iter().all(|&(_, zero)| zero))
}

/// Decodes a Hugging Face packed weight, U8 `[out/4, in]` (docs/formats.md
/// "Packing"):
/// output row `i*R + r` (R = out/4) sits in bits `2i..2i+1` of packed row `r`,
/// as the code `value + 1`.
pub fn unpack_hf(
    name: &str,
    t: &RawTensor<'_>,
    n_out: usize,
    n_in: usize,
    scale: f32,
) -> Result<TernaryMatrix> {
    let rows = n_out / 4;
    if t.dtype != DType::U8 || t.shape != [rows, n_in] {
        return Err(TritError::invalid(format!(
            "tensor {name:?} is {} {:?}; a packed weight of [{n_out}, {n_in}] must be U8 [{rows}, {n_in}]",
            t.dtype.name(),
            t.shape
        )));
    }
    // Code 3 (both bits of a pair set) is not a ternary value: the file is not
    // what it claims to be, so refuse it rather than compute with garbage.
    // A branch-free OR over each chunk (vectorized), then a search only in a bad one.
    let has_code_3 =
        |bytes: &[u8]| bytes.iter().fold(0u8, |acc, &b| acc | (b & (b >> 1))) & 0x55 != 0;
    let bad_chunk = t.data.chunks(1 << 16).position(has_code_3);
    if let Some(pos) = bad_chunk.and_then(|c| {
        let start = c << 16;
        t.data[start..]
            .iter()
            .position(|&b| b & (b >> 1) & 0x55 != 0)
            .map(|i| start + i)
    }) {
        return Err(TritError::invalid(format!(
            "tensor {name:?} holds byte {:#04x} at [{}, {}], which has the 2-bit code 3; \
             packed ternary weights use codes 0, 1, 2",
            t.data[pos],
            pos / n_in,
            pos % n_in
        )));
    }
    TernaryMatrix::from_hf_packed(t.data, n_out, n_in, scale)
}

/// Absmean ternarisation of a float master (transformers' `WeightQuant`,
/// docs/formats.md "Absmean ternarisation"): `s = 1 / max(mean|W|, 1e-5)` in f32,
/// `T = clamp(round_half_even(W * s), -1, 1)`, and the weight used is `T / s`,
/// so the matrix scale is `1 / s`.
pub fn ternarize_absmean(
    name: &str,
    t: &RawTensor<'_>,
    n_out: usize,
    n_in: usize,
) -> Result<TernaryMatrix> {
    let w = t.to_f32(name)?; // [n_out, n_in]
                             // The mean in f64, rounded once: torch's f32 cascade sum is that accurate
                             // too, so both land on the same f32 (one ulp apart at worst).
    let sum: f64 = w.iter().map(|v| f64::from(v.abs())).sum();
    let mean = (sum / w.len() as f64) as f32;
    let s = 1.0f32 / mean.max(1e-5);
    let scale = 1.0f32 / s;
    TernaryMatrix::from_fn(n_out, n_in, scale, |n, k| {
        clamped_code(w[n * n_in + k] * s, -1, 1)
    })
}

/// The precision the output head is kept in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HeadPrecision {
    /// As stored (bf16 for published checkpoints), computed in f32: the
    /// logits of transformers.
    #[default]
    AsStored,
    /// Requantized to symmetric int8 rows (`DenseMatrix::int8_from_raw`): half
    /// the bytes a generated token reads from a bf16 head. A tied head is the
    /// embedding, whose lookups then read the int8 rows too.
    Int8,
    /// Requantized to 6-bit rows with a sub-scale per 32 columns
    /// (`DenseMatrix::q6_from_raw`, `kernels::q6`): 78 % of the int8 head's
    /// bytes. A tied head is the embedding, whose lookups then read the 6-bit
    /// rows too (one copy in memory; the perplexity measured in
    /// `tests/test_bundled.py` includes both effects).
    Q6,
}

impl HeadPrecision {
    pub const ALL: [HeadPrecision; 3] = [
        HeadPrecision::AsStored,
        HeadPrecision::Int8,
        HeadPrecision::Q6,
    ];

    /// The name the Python API and the CLI use ("bf16" for as stored: what
    /// published checkpoints hold).
    pub fn name(self) -> &'static str {
        match self {
            HeadPrecision::AsStored => "bf16",
            HeadPrecision::Int8 => "int8",
            HeadPrecision::Q6 => "q6",
        }
    }

    /// The precision `name()` calls `name`.
    pub fn parse(name: &str) -> Result<HeadPrecision> {
        HeadPrecision::ALL
            .into_iter()
            .find(|h| h.name() == name)
            .ok_or_else(|| {
                TritError::invalid(format!(
                    "unknown head precision {name:?}; expected \"bf16\", \"int8\" or \"q6\""
                ))
            })
    }
}

/// Asks the allocator once, without touching the memory, for about as many
/// bytes as the model will keep: the checkpoint's tensors as they are (up to
/// twice that for F16 widened to f32), except the ternary projections, which
/// take their size in `packing` whatever they are stored as (2-bit packs,
/// float masters, GGUF blocks). A file can declare far more than the machine
/// has (a sparse file costs no disk), and its tensors would then be scanned
/// for hours before an allocation aborted; this makes it an `OutOfMemory`
/// error before any work. Counting the projections at their packed size lets
/// a model whose file is larger than memory load where its 1.6-bit packing
/// fits (each layer is repacked as it is read).
fn probe_memory(config: &Config, checkpoint: &dyn Checkpoint, packing: Packing) -> Result<()> {
    let stored = checkpoint
        .names()
        .into_iter()
        .filter(|name| !is_projection(config, name))
        .filter_map(|name| checkpoint.tensor(name))
        .fold(0usize, |sum, t| sum.saturating_add(t.data.len()));
    // Every layer's projections have the same shapes.
    let packed = Proj::ALL
        .iter()
        .try_fold(0usize, |sum, p| {
            let (n_out, n_in) = p.dims(config);
            sum.checked_add(packing.matrix_bytes(n_out, n_in)?)
        })
        .and_then(|layer| layer.checked_mul(config.num_layers))
        .unwrap_or(usize::MAX);
    let what = match packing {
        Packing::I2 => "the model's weights (packing \"i2\"; \"tq1\" or \"tl\" take a fifth less)",
        Packing::Tq1 => "the model's weights (packing \"tq1\")",
        Packing::Tl => "the model's weights (packing \"tl\")",
    };
    let mut probe: Vec<u8> = Vec::new();
    try_reserve_total(&mut probe, stored.saturating_add(packed), what)
}

/// Whether `name` is the weight of one of the config's ternary projections
/// (`model.layers.{l}.{path}.weight`, l below the layer count).
pub(super) fn is_projection(config: &Config, name: &str) -> bool {
    let Some((layer, rest)) = name
        .strip_prefix("model.layers.")
        .and_then(|rest| rest.split_once('.'))
    else {
        return false;
    };
    let Some(path) = rest.strip_suffix(".weight") else {
        return false;
    };
    layer.parse::<usize>().is_ok_and(|l| l < config.num_layers)
        && Proj::ALL.iter().any(|p| p.path() == path)
}

/// Builds the model from the tensors of `checkpoint`, its ternary
/// projections in `packing`. Returns it with the warnings a user should see
/// (all-zero tensors, tensors left unused). Each tensor is released
/// (`Checkpoint::release`) once converted.
pub fn load(
    config: Config,
    checkpoint: &dyn Checkpoint,
    pool: &ThreadPool,
    head: HeadPrecision,
    packing: Packing,
) -> Result<(Model, Vec<String>)> {
    config.validate()?;
    probe_memory(&config, checkpoint, packing)?;
    let ck = Loader {
        checkpoint,
        tensors: Usage::new(checkpoint),
        warnings: Mutex::default(),
    };
    let c = &config;
    let (hidden, inter) = (c.hidden_size, c.intermediate_size);
    let head_matrix = |t: &RawTensor<'_>| match head {
        HeadPrecision::AsStored => DenseMatrix::from_raw(t, "the output head"),
        HeadPrecision::Int8 => pool.install(|| DenseMatrix::int8_from_raw(t)),
        HeadPrecision::Q6 => pool.install(|| DenseMatrix::q6_from_raw(t)),
    };
    let embed_t = ck.float("model.embed_tokens.weight", &[c.vocab_size, hidden])?;
    let embed = if c.tie_word_embeddings {
        head_matrix(&embed_t)?
    } else {
        DenseMatrix::from_raw(&embed_t, "model.embed_tokens.weight")?
    };
    ck.tensors.release_prefix("model.embed_tokens.");
    let norm = ck.vector("model.norm.weight", hidden)?;
    let lm_head = if c.tie_word_embeddings {
        None
    } else {
        let matrix = head_matrix(&ck.float("lm_head.weight", &[c.vocab_size, hidden])?)?;
        ck.tensors.release_prefix("lm_head.");
        Some(matrix)
    };
    let load_layer = |l: usize| -> Result<Layer> {
        let prefix = format!("model.layers.{l}");
        let sub_norm = |path: Option<&str>, len: usize| {
            path.map(|p| ck.vector(&format!("{prefix}.{p}.weight"), len))
                .transpose()
        };
        let sub_norms = c.family.sub_norms();
        let mut layer = Layer {
            input_norm: ck.vector(&format!("{prefix}.input_layernorm.weight"), hidden)?,
            q: ck.projection(c, l, Proj::Q)?,
            k: ck.projection(c, l, Proj::K)?,
            v: ck.projection(c, l, Proj::V)?,
            attn_sub_norm: sub_norm(sub_norms.map(|n| n.0), c.q_dim())?,
            o: ck.projection(c, l, Proj::O)?,
            post_norm: ck.vector(&format!("{prefix}.post_attention_layernorm.weight"), hidden)?,
            gate: ck.projection(c, l, Proj::Gate)?,
            up: ck.projection(c, l, Proj::Up)?,
            ffn_sub_norm: sub_norm(sub_norms.map(|n| n.1), inter)?,
            down: ck.projection(c, l, Proj::Down)?,
            bitlinear_norms: match c.bitlinear_norm_eps {
                None => None,
                Some(_) => Some(Box::new(ck.bitlinear_norms(c, l)?)),
            },
        };
        ck.tensors.release_prefix(&format!("{prefix}."));
        // Now, not after every layer is read: the model is then never held
        // in two packings at once, only the layers being read.
        layer.repack(packing)?;
        Ok(layer)
    };
    // Layers unpack independently; the real model has 30 of them.
    let layers = pool.install(|| {
        (0..c.num_layers)
            .into_par_iter()
            .map(load_layer)
            .collect::<Result<Vec<_>>>()
    })?;
    let unused = ck.tensors.unused();
    let mut warnings = ck.warnings.into_inner().unwrap_or_else(|e| e.into_inner());
    if !unused.is_empty() {
        warnings.push(format!(
            "{} tensor(s) in the checkpoint are not used by the model: {}{}",
            unused.len(),
            unused[..unused.len().min(5)].join(", "),
            if unused.len() > 5 { ", ..." } else { "" }
        ));
    }
    // Layers run in parallel, so their warnings come in any order; sort for
    // reproducible messages.
    warnings.sort();
    Ok((
        Model {
            config,
            embed,
            layers,
            norm,
            lm_head,
        },
        warnings,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpacks_the_documented_worked_example() {
        // docs/formats.md "Packing", worked example: rows 0..7 = [0,1,0,-1,-1,-1,1,1]
        // pack to P[0,0] = 133 and P[1,0] = 130 (R = 2).
        let data = [133u8, 130];
        let shape = [2, 1];
        let t = RawTensor::new("w", DType::U8, &shape, &data).unwrap();
        let m = unpack_hf("w", &t, 8, 1, 1.5).unwrap();
        assert_eq!(m.unpack(), vec![0, 1, 0, -1, -1, -1, 1, 1]);
        assert_eq!(m.scale(), 1.5);
    }

    #[test]
    fn refuses_code_three_and_wrong_shapes() {
        let data = [0b11u8, 0x55];
        let shape = [2, 1];
        let t = RawTensor::new("w", DType::U8, &shape, &data).unwrap();
        let err = unpack_hf("w", &t, 8, 1, 1.0).unwrap_err();
        assert!(err.to_string().contains("code 3"), "{err}");
        assert!(unpack_hf("w", &t, 4, 2, 1.0).is_err());
    }

    #[test]
    fn absmean_ternarisation_follows_transformers() {
        // mean|W| = (0.5 + 1.5 + 0.1 + 2.0) / 4 = 1.025; W*s = [0.49, -1.46, 0.098, 1.95].
        let w = [0.5f32, -1.5, 0.1, 2.0];
        let bytes: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
        let shape = [2, 2];
        let t = RawTensor::new("w", DType::F32, &shape, &bytes).unwrap();
        let m = ternarize_absmean("w", &t, 2, 2).unwrap();
        assert_eq!(m.unpack(), vec![0, -1, 0, 1]);
        let s = 1.0f32 / 1.025f32;
        assert_eq!(m.scale(), 1.0f32 / s);
    }
}
