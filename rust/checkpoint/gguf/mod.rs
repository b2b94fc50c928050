//! Reading GGUF files (llama.cpp's and bitnet.cpp's format) as a checkpoint.
//!
//! The file is mapped read-only; its header is parsed with every count and
//! offset checked (`parse`), and each tensor's byte range is checked to lie in
//! the file. Tensors are listed under the names the model builder uses
//! (`model.layers.N.self_attn.q_proj.weight` for `blk.N.attn_q.weight`), with
//! ggml's dimension order reversed (ggml's `ne[0]` is the row length).
//! Projections come out whole through `Checkpoint::ternary`, repacked from
//! I2_S, TQ1_0, TQ2_0 or exactly ternary floats without changing a value;
//! Q8_0, Q4_0 and Q6_K tensors (embeddings, heads) are dequantized exactly to
//! f32 at open. Layouts: docs/formats.md, "GGUF".

mod blocks;
mod parse;

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

pub use blocks::GgmlType;
use blocks::{decode_ternary, dequantize, type_id_name, NotTernary};
pub use parse::{MetaArray, MetaValue, Number, ValueType};

use super::mapping::FileMapping;
use super::{Checkpoint, DType, RawTensor};
use crate::error::{Result, TritError};
use crate::kernels::TernaryMatrix;

/// The GGUF architectures whose files hold the BitNet b1.58 2B4T block
/// (relu² GLU, sub-norms): bitnet.cpp's "bitnet-b1.58" and its earlier
/// "bitnet-25" (1bitLLM's model, which bitnet.cpp also files under
/// "bitnet-b1.58", is told apart by its SentencePiece tokenizer). llama.cpp's
/// "bitnet" is either block, told apart by `bitnet.hidden_act`
/// (docs/formats.md "GGUF metadata", `Config::from_gguf`).
pub const BITNET_ARCHITECTURES: [&str; 2] = ["bitnet-b1.58", "bitnet-25"];

/// Where one tensor lives and how it is stored.
struct Entry {
    gguf_name: String,
    ty: GgmlType,
    shape: Vec<usize>, // row-major, outermost first
    bytes: Range<usize>,
    /// f32 bytes of a dequantized Q8_0 / Q4_0 / Q6_K tensor.
    dequantized: Option<Vec<u8>>,
    /// A projection's per-tensor scale from a `blk.N.{proj}.scale` tensor
    /// (llama.cpp's `wq_s` and kin), which multiplies its output.
    output_scale: Option<f32>,
}

/// A GGUF file, mapped read-only.
pub struct GgufCheckpoint {
    file: FileMapping,
    version: u32,
    metadata: HashMap<String, MetaValue>,
    architecture: String,
    tensors: HashMap<String, Entry>, // by the builder's name
    /// llama.cpp's converter permutes the rows of Q and K for its RoPE in
    /// `llama`-architecture files (docs/formats.md "GGUF"): the head counts
    /// of Q and K, to undo it.
    rope_permuted: Option<(usize, usize)>,
}

/// The builder's name of a GGUF tensor name; names it does not know stay as
/// they are (and are then reported as unused).
pub fn builder_name(gguf: &str) -> String {
    match gguf {
        "token_embd.weight" => return "model.embed_tokens.weight".into(),
        "output_norm.weight" => return "model.norm.weight".into(),
        "output.weight" => return "lm_head.weight".into(),
        _ => {}
    }
    let Some(rest) = gguf.strip_prefix("blk.") else {
        return gguf.into();
    };
    let Some((layer, module)) = rest.split_once('.') else {
        return gguf.into();
    };
    if layer.parse::<usize>().is_err() {
        return gguf.into();
    }
    let Some(module) = module.strip_suffix(".weight") else {
        return gguf.into();
    };
    let path = match module {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_sub_norm" => "self_attn.attn_sub_norm",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "ffn_sub_norm" => "mlp.ffn_sub_norm",
        _ => return gguf.into(),
    };
    format!("model.layers.{layer}.{path}.weight")
}

/// Whether a builder name is one of the seven projections of a layer.
fn is_projection(name: &str) -> bool {
    name.starts_with("model.layers.") && name.ends_with("_proj.weight")
}

/// The metadata of the GGUF file at `path` alone (for the tokenizer), with
/// the mapping whose bytes its number arrays point into.
pub fn read_metadata(path: &Path) -> Result<(FileMapping, Vec<(String, MetaValue)>)> {
    let file = FileMapping::open(path)?;
    let header = parse::parse(file.bytes())
        .map_err(|msg| TritError::invalid(format!("{}: {msg}", path.display())))?;
    Ok((file, header.metadata))
}

impl GgufCheckpoint {
    /// Maps and checks the GGUF file at `path`. Errors name the file and the
    /// tensor or key at fault.
    pub fn open(path: &Path) -> Result<Self> {
        let file = FileMapping::open(path)?;
        let shown = path.display();
        let fail = |msg: String| TritError::invalid(format!("{shown}: {msg}"));
        let header = parse::parse(file.bytes()).map_err(fail)?;
        let metadata: HashMap<String, MetaValue> = header.metadata.into_iter().collect();
        let architecture = match metadata.get("general.architecture") {
            Some(MetaValue::String(a)) => a.clone(),
            Some(v) => {
                return Err(fail(format!(
                    "general.architecture is a {}; expected a string",
                    v.type_name()
                )))
            }
            None => return Err(fail("general.architecture is missing".into())),
        };
        let file_len = file.bytes().len();
        let mut tensors = HashMap::new();
        for info in header.tensors {
            let name = &info.name;
            let ty = GgmlType::from_id(info.ggml_type).ok_or_else(|| {
                fail(format!(
                    "tensor {name:?} has {}, which trit does not read; it reads F32, F16, BF16, \
                     Q8_0, Q4_0, Q6_K, TQ1_0, TQ2_0 and I2_S",
                    type_id_name(info.ggml_type)
                ))
            })?;
            let shape: Option<Vec<usize>> = info
                .dims
                .iter()
                .rev()
                .map(|&d| usize::try_from(d).ok())
                .collect();
            let numel = shape
                .as_ref()
                .and_then(|s| s.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)));
            let (Some(shape), Some(numel)) = (shape, numel) else {
                return Err(fail(format!(
                    "tensor {name:?} has shape {:?} (ggml order), whose size overflows",
                    info.dims
                )));
            };
            let row_len = shape.last().copied().unwrap_or(1);
            let size = ty
                .bytes_for(row_len, numel)
                .map_err(|e| fail(format!("tensor {name:?} ({:?}): {e}", info.dims)))?;
            let start = usize::try_from(info.offset)
                .ok()
                .and_then(|o| o.checked_add(header.data_start));
            let range = start
                .and_then(|s| Some(s..s.checked_add(size)?))
                .filter(|r| r.end <= file_len)
                .ok_or_else(|| {
                    fail(format!(
                        "tensor {name:?} ({} bytes at data offset {}) runs past the end of the \
                         file ({file_len} bytes, data from byte {})",
                        size, info.offset, header.data_start
                    ))
                })?;
            let dequantized = match ty {
                GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q6K => Some(
                    dequantize(ty, &file.bytes()[range.clone()], numel)
                        .iter()
                        .flat_map(|v| v.to_le_bytes())
                        .collect(),
                ),
                _ => None,
            };
            let key = builder_name(name);
            if ty.is_ternary() && !is_projection(&key) && key != *name {
                return Err(fail(format!(
                    "tensor {name:?} is {}; trit reads ternary types only for the projections \
                     of a layer",
                    ty.name()
                )));
            }
            let entry = Entry {
                gguf_name: info.name.clone(),
                ty,
                shape,
                bytes: range,
                dequantized,
                output_scale: None,
            };
            if tensors.insert(key, entry).is_some() {
                return Err(fail(format!("tensor {name:?} appears twice")));
            }
        }
        attach_output_scales(&mut tensors, file.bytes()).map_err(fail)?;
        let mut checkpoint = GgufCheckpoint {
            file,
            version: header.version,
            metadata,
            architecture,
            tensors,
            rope_permuted: None,
        };
        if checkpoint.architecture == "llama" {
            let heads = checkpoint.required_uint("llama.attention.head_count")?;
            let kv_heads = checkpoint
                .uint("llama.attention.head_count_kv")?
                .unwrap_or(heads);
            checkpoint.rope_permuted = Some((to_usize(heads), to_usize(kv_heads)));
        }
        Ok(checkpoint)
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// The GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> &str {
        &self.architecture
    }

    /// The bytes of the whole file (number arrays of the metadata point into them).
    pub fn file_bytes(&self) -> &[u8] {
        self.file.bytes()
    }

    /// Every metadata key and value.
    pub fn metadata(&self) -> impl Iterator<Item = (&str, &MetaValue)> {
        self.metadata.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    /// Every tensor as (builder name, GGUF name).
    pub fn tensor_names(&self) -> impl Iterator<Item = (&str, &str)> {
        self.tensors
            .iter()
            .map(|(k, e)| (k.as_str(), e.gguf_name.as_str()))
    }

    /// Files the sub-norms (`blk.N.attn_sub_norm`, `blk.N.ffn_sub_norm`)
    /// under the module paths of the family that reads them (1bitLLM's
    /// `self_attn.inner_attn_ln` and `mlp.ffn_layernorm`).
    pub fn rename_sub_norms(&mut self, attn: &str, ffn: &str) {
        for (generic, path) in [("self_attn.attn_sub_norm", attn), ("mlp.ffn_sub_norm", ffn)] {
            let keys: Vec<String> = self
                .tensors
                .keys()
                .filter(|k| k.ends_with(&format!(".{generic}.weight")))
                .cloned()
                .collect();
            for key in keys {
                if let Some(e) = self.tensors.remove(&key) {
                    self.tensors.insert(key.replace(generic, path), e);
                }
            }
        }
    }

    /// Forgets tensor `name` (a builder name) that the config has read
    /// itself (`rope_freqs.weight`), so that the model builder does not
    /// report it unused.
    pub fn remove(&mut self, name: &str) {
        self.tensors.remove(name);
    }

    /// The shape of tensor `name` (a builder name), if the file has it.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|e| e.shape.as_slice())
    }

    fn error(&self, msg: String) -> TritError {
        TritError::invalid(format!("{}: {msg}", self.path().display()))
    }

    /// A non-negative integer value of any integer type; an error for another type.
    pub fn uint(&self, key: &str) -> Result<Option<u64>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(MetaValue::Number(_, Number::Int(v))) => u64::try_from(*v)
                .map(Some)
                .map_err(|_| self.error(format!("{key} is {v}; expected a non-negative integer"))),
            Some(v) => {
                Err(self.error(format!("{key} is a {}; expected an integer", v.type_name())))
            }
        }
    }

    pub fn required_uint(&self, key: &str) -> Result<u64> {
        self.uint(key)?
            .ok_or_else(|| self.error(format!("{key} is missing")))
    }

    /// A float32 or float64 value; an error for another type.
    pub fn float(&self, key: &str) -> Result<Option<f64>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(MetaValue::Number(_, Number::Float(v))) => Ok(Some(*v)),
            Some(v) => Err(self.error(format!("{key} is a {}; expected a float", v.type_name()))),
        }
    }

    pub fn string(&self, key: &str) -> Result<Option<&str>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(MetaValue::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.error(format!("{key} is a {}; expected a string", v.type_name()))),
        }
    }

    /// The length of an array value.
    pub fn array_len(&self, key: &str) -> Result<Option<usize>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(MetaValue::Array(a)) => Ok(Some(a.len())),
            Some(v) => Err(self.error(format!("{key} is a {}; expected an array", v.type_name()))),
        }
    }

    /// The projection `name` decoded to values and one scale, rows in the
    /// builder's order.
    fn projection(&self, name: &str, e: &Entry) -> Result<TernaryMatrix> {
        let gguf = &e.gguf_name;
        let what = format!(
            "{}: tensor {gguf:?} ({})",
            self.path().display(),
            e.ty.name()
        );
        let [n_out, n_in] = e.shape[..] else {
            return Err(TritError::invalid(format!(
                "{what} has shape {:?}; a projection is 2-D",
                e.shape
            )));
        };
        let numel = n_out * n_in;
        let t =
            decode_ternary(e.ty, &self.file.bytes()[e.bytes.clone()], numel).map_err(|err| {
                let at = |i: usize| format!("[{}, {}]", i / n_in, i % n_in);
                TritError::invalid(match err {
                    NotTernary::BadCode(i) => {
                        format!(
                            "{what} holds the 2-bit code 3 at {}; ternary codes are 0, 1, 2",
                            at(i)
                        )
                    }
                    NotTernary::ScaleDiffers {
                        element,
                        first,
                        this,
                    } => format!(
                        "{what}: the block at {} has scale {this}, the first block {first}; trit \
                     holds one scale per matrix, so ternary blocks with different scales \
                     cannot be represented exactly",
                        at(element)
                    ),
                    NotTernary::NotAMultiple {
                        element,
                        value,
                        scale,
                    } => format!(
                        "{what} holds {value} at {}, which is neither 0 nor ±{scale}; trit reads \
                     float projections only when they are already ternary",
                        at(element)
                    ),
                })
            })?;
        // llama.cpp computes (W·x)·s; trit folds s into the one matrix scale.
        let scale = t.scale * e.output_scale.unwrap_or(1.0);
        if !scale.is_finite() {
            return Err(TritError::invalid(format!(
                "{what} has scale {scale}; expected a finite number"
            )));
        }
        let heads = match (self.rope_permuted, name) {
            (Some((q, _)), n) if n.ends_with("self_attn.q_proj.weight") => Some(q),
            (Some((_, k)), n) if n.ends_with("self_attn.k_proj.weight") => Some(k),
            _ => None,
        };
        let values = match heads {
            Some(heads) => unpermute_rows(&t.values, n_out, n_in, heads).ok_or_else(|| {
                TritError::invalid(format!(
                    "{what} has {n_out} rows, which do not split into {heads} heads of even size"
                ))
            })?,
            None => t.values,
        }; // [n_out, n_in]
        let matrix = if n_out.is_multiple_of(4) {
            // Through the Hugging Face packing, whose repack assembles our
            // blocks a byte at a time rather than a weight at a time.
            TernaryMatrix::from_hf_packed(&pack_hf(&values, n_out, n_in), n_out, n_in, scale)
        } else {
            TernaryMatrix::from_fn(n_out, n_in, scale, |n, k| values[n * n_in + k])
        };
        matrix.map_err(|err| TritError::invalid(format!("{what}: {err}")))
    }
}

/// Moves each `blk.N.{proj}.scale` tensor (one float; llama.cpp's optional
/// per-tensor scale of a projection, `wq_s` and kin in `src/models/bitnet.cpp`,
/// applied as `ggml_mul` after the matmul) into its projection's entry, which
/// multiplies it into the matrix scale. A scale without its projection stays
/// and is refused later as a tensor trit does not run.
fn attach_output_scales(
    tensors: &mut HashMap<String, Entry>,
    file: &[u8],
) -> std::result::Result<(), String> {
    let scales: Vec<String> = tensors
        .keys()
        .filter(|k| k.starts_with("blk.") && k.ends_with(".scale"))
        .cloned()
        .collect();
    for name in scales {
        let projection = builder_name(&format!("{}.weight", name.trim_end_matches(".scale")));
        if !is_projection(&projection) || !tensors.contains_key(&projection) {
            continue;
        }
        let e = &tensors[&name];
        let bytes = &file[e.bytes.clone()];
        let value = match (e.ty, e.shape.iter().product::<usize>()) {
            (GgmlType::F32, 1) => f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
            (GgmlType::F16, 1) => super::f16_to_f32(u16::from_le_bytes([bytes[0], bytes[1]])),
            (GgmlType::BF16, 1) => super::bf16_to_f32(u16::from_le_bytes([bytes[0], bytes[1]])),
            _ => {
                return Err(format!(
                    "tensor {name:?} is {} {:?}; a projection scale is one float",
                    e.ty.name(),
                    e.shape
                ))
            }
        };
        if !value.is_finite() {
            return Err(format!(
                "tensor {name:?} is {value}; expected a finite scale"
            ));
        }
        tensors.remove(&name);
        if let Some(p) = tensors.get_mut(&projection) {
            p.output_scale = Some(value);
        }
    }
    Ok(())
}

/// Ternary values [n_out, n_in] (n_out a multiple of 4) in the Hugging Face
/// packing (docs/formats.md "Packing"): U8 [n_out / 4, n_in] whose row r holds
/// output row i * n_out / 4 + r in bits 2i..2i+1, as value + 1.
fn pack_hf(values: &[i8], n_out: usize, n_in: usize) -> Vec<u8> {
    let rows = n_out / 4;
    let mut packed = vec![0u8; rows * n_in]; // [n_out / 4, n_in]
    for (i, quarter) in values.chunks_exact(rows * n_in).enumerate() {
        for (p, &v) in packed.iter_mut().zip(quarter) {
            *p |= ((v + 1) as u8) << (2 * i);
        }
    }
    packed
}

/// Undoes llama.cpp's Q/K permutation (`LlamaModel.permute` in
/// convert_hf_to_gguf.py): within each head of D rows, file row `2i + j` holds
/// original row `j*D/2 + i`. None when the rows do not split into `heads`
/// heads of even size.
fn unpermute_rows(values: &[i8], n_out: usize, n_in: usize, heads: usize) -> Option<Vec<i8>> {
    if heads == 0 || !n_out.is_multiple_of(heads) || !(n_out / heads).is_multiple_of(2) {
        return None;
    }
    let head_dim = n_out / heads;
    let half = head_dim / 2;
    let mut out = vec![0i8; values.len()]; // [n_out, n_in]
    for (n, row) in out.chunks_exact_mut(n_in).enumerate() {
        let (h, r) = (n / head_dim, n % head_dim);
        let (j, i) = (r / half, r % half);
        let source = h * head_dim + 2 * i + j;
        row.copy_from_slice(&values[source * n_in..(source + 1) * n_in]);
    }
    Some(out)
}

fn to_usize(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

impl Checkpoint for GgufCheckpoint {
    fn names(&self) -> Vec<&str> {
        self.tensors.keys().map(String::as_str).collect()
    }

    fn tensor(&self, name: &str) -> Option<RawTensor<'_>> {
        let e = self.tensors.get(name)?;
        let (dtype, data) = match (e.ty, &e.dequantized) {
            (GgmlType::F32, _) => (DType::F32, &self.file.bytes()[e.bytes.clone()]),
            (GgmlType::F16, _) => (DType::F16, &self.file.bytes()[e.bytes.clone()]),
            (GgmlType::BF16, _) => (DType::BF16, &self.file.bytes()[e.bytes.clone()]),
            (_, Some(values)) => (DType::F32, values.as_slice()),
            // Ternary types come out through `ternary` only.
            _ => return None,
        };
        Some(RawTensor {
            dtype,
            shape: &e.shape,
            data,
        })
    }

    fn ternary(&self, name: &str) -> Option<Result<TernaryMatrix>> {
        let e = self.tensors.get(name)?;
        if !is_projection(name) {
            return None;
        }
        Some(self.projection(name, e))
    }

    fn release(&self, name: &str) {
        if let Some(e) = self.tensors.get(name) {
            self.file.release(e.bytes.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_the_builders() {
        assert_eq!(
            builder_name("token_embd.weight"),
            "model.embed_tokens.weight"
        );
        assert_eq!(
            builder_name("blk.12.attn_sub_norm.weight"),
            "model.layers.12.self_attn.attn_sub_norm.weight"
        );
        assert_eq!(
            builder_name("blk.0.ffn_down.weight"),
            "model.layers.0.mlp.down_proj.weight"
        );
        assert_eq!(builder_name("blk.x.attn_q.weight"), "blk.x.attn_q.weight");
        assert_eq!(builder_name("rope_freqs.weight"), "rope_freqs.weight");
        assert!(is_projection("model.layers.3.self_attn.o_proj.weight"));
        assert!(!is_projection("model.layers.3.input_layernorm.weight"));
    }

    #[test]
    fn unpermutes_llama_rows() {
        // One head of 4 rows: llama.cpp stores original rows [0, 2, 1, 3].
        let file: Vec<i8> = vec![0, 0, 1, 1, -1, -1, 1, 0];
        let stored_order = [0usize, 2, 1, 3];
        let original = unpermute_rows(&file, 4, 2, 1).unwrap();
        for (file_row, &orig_row) in stored_order.iter().enumerate() {
            assert_eq!(
                original[orig_row * 2..orig_row * 2 + 2],
                file[file_row * 2..file_row * 2 + 2]
            );
        }
        assert!(unpermute_rows(&file, 4, 2, 3).is_none());
    }

    #[test]
    fn hf_packing_round_trips_through_the_repack() {
        let values: Vec<i8> = (0..8 * 3).map(|i| (i * 7 % 3) as i8 - 1).collect(); // [8, 3]
        let packed = pack_hf(&values, 8, 3);
        let m = TernaryMatrix::from_hf_packed(&packed, 8, 3, 1.0).unwrap();
        assert_eq!(m.unpack(), values);
    }
}
