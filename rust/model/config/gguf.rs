//! A `Config` from a GGUF file's metadata (`{arch}.embedding_length` and its
//! kin, docs/formats.md "GGUF metadata"), with strict types: an integer key
//! must hold an integer, a float key a float. Errors name the file and key.
//! What a file carries that trit does not run (a RoPE variant, experts, a
//! tensor outside the family's block) is refused by name.

use super::{Config, Family, LinearClass, Llama3Rope, QuantizationMode};
use crate::checkpoint::gguf::BITNET_ARCHITECTURES;
use crate::checkpoint::{Checkpoint, DType, GgufCheckpoint};
use crate::error::{Result, TritError};

/// llama.cpp's default RoPE base when `{arch}.rope.freq_base` is absent.
const DEFAULT_ROPE_BASE: f64 = 10000.0;

/// The key llama.cpp reads the MLP activation of a `bitnet` file from
/// (`LLM_KV_HIDDEN_ACT` in `src/models/bitnet.cpp`; SiLU when absent).
const HIDDEN_ACT: &str = "bitnet.hidden_act";

/// The tensor llama.cpp's converter writes Llama 3 RoPE scaling as.
pub const ROPE_FREQS: &str = "rope_freqs.weight";

/// The Llama 3 RoPE parameters llama.cpp's converter assumes when config.json
/// does not give them (`LlamaModel.generate_extra_tensors`): Llama 3.1's.
const LLAMA3_LOW_FREQ_FACTOR: f64 = 1.0;
const LLAMA3_HIGH_FREQ_FACTOR: f64 = 4.0;
const LLAMA3_ORIGINAL_CONTEXT: u64 = 8192;

impl Config {
    pub fn from_gguf(ck: &GgufCheckpoint) -> Result<Config> {
        let shown = ck.path().display().to_string();
        let fail = |msg: String| TritError::invalid(format!("{shown}: {msg}"));
        let arch = ck.architecture();
        let family = family(ck, arch).map_err(fail)?;
        let key = |k: &str| format!("{arch}.{k}");
        let positive = |k: &str| -> Result<usize> {
            let v = ck.required_uint(&key(k))?;
            usize::try_from(v)
                .ok()
                .filter(|&v| v > 0)
                .ok_or_else(|| fail(format!("{} is {v}; expected a positive size", key(k))))
        };
        let hidden_size = positive("embedding_length")?;
        let num_heads = positive("attention.head_count")?;
        let num_kv_heads = match ck.uint(&key("attention.head_count_kv"))? {
            Some(_) => positive("attention.head_count_kv")?,
            None => num_heads,
        };
        let head_dim = match ck.uint(&key("attention.key_length"))? {
            Some(_) => positive("attention.key_length")?,
            None => hidden_size / num_heads,
        };
        if let Some(v) = ck.uint(&key("attention.value_length"))? {
            if v != head_dim as u64 {
                return Err(fail(format!(
                    "{} is {v}, but keys have {head_dim} dimensions; trit runs heads whose \
                     keys and values have one size",
                    key("attention.value_length")
                )));
            }
        }
        if let Some(rot) = ck.uint(&key("rope.dimension_count"))? {
            if rot != head_dim as u64 {
                return Err(fail(format!(
                    "{} is {rot}, but heads have {head_dim} dimensions; partial rotary \
                     embeddings are not supported",
                    key("rope.dimension_count")
                )));
            }
        }
        // llama.cpp applies a linear factor (`rope.scaling.factor`, or the
        // older `rope.scale_linear`) whatever `rope.scaling.type` says; only
        // no scaling (absent, 0 or 1) is what trit runs.
        for factor_key in ["rope.scaling.factor", "rope.scale_linear"] {
            match ck.float(&key(factor_key))? {
                None => {}
                Some(f) if f == 0.0 || f == 1.0 => {}
                Some(f) => {
                    return Err(fail(format!(
                        "{} is {f}; RoPE scaling is not supported",
                        key(factor_key)
                    )))
                }
            }
        }
        match ck.string(&key("rope.scaling.type"))? {
            None | Some("none" | "linear") => {}
            Some(other) => {
                return Err(fail(format!(
                    "{} {other:?} is not supported",
                    key("rope.scaling.type")
                )))
            }
        }
        if let Some(n) = ck.uint(&key("expert_count"))? {
            if n > 0 {
                return Err(fail(format!(
                    "{} is {n}; mixture-of-experts models are not supported",
                    key("expert_count")
                )));
            }
        }
        // The vocabulary: the embedding's rows, which the token list (the
        // tokenizer's) must not exceed.
        let vocab_size = match ck.shape("model.embed_tokens.weight") {
            Some(&[rows, cols]) if cols == hidden_size => rows,
            Some(shape) => {
                return Err(fail(format!(
                "tensor \"token_embd.weight\" has shape {shape:?}; expected [vocab, {hidden_size}]"
            )))
            }
            None => return Err(fail("tensor \"token_embd.weight\" is missing".into())),
        };
        if let Some(tokens) = ck.array_len("tokenizer.ggml.tokens")? {
            if tokens > vocab_size {
                return Err(fail(format!(
                    "tokenizer.ggml.tokens lists {tokens} tokens, more than the embedding's \
                     {vocab_size} rows"
                )));
            }
        }
        let rope_theta = ck
            .float(&key("rope.freq_base"))?
            .unwrap_or(DEFAULT_ROPE_BASE);
        let rms_norm_eps = ck
            .float(&key("attention.layer_norm_rms_epsilon"))?
            .ok_or_else(|| {
                fail(format!(
                    "{} is missing",
                    key("attention.layer_norm_rms_epsilon")
                ))
            })?;
        let config = Config {
            family,
            vocab_size,
            hidden_size,
            intermediate_size: positive("feed_forward_length")?,
            num_layers: positive("block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rope_theta: rope_theta as f32,
            rms_norm_eps: rms_norm_eps as f32,
            max_position_embeddings: positive("context_length")?,
            // llama.cpp ties the head to the embedding when there is no output tensor.
            tie_word_embeddings: ck.shape("lm_head.weight").is_none(),
            // Projections arrive as whole ternary matrices with their scale
            // (`Checkpoint::ternary`): quantized offline, scale multiplied.
            linear_class: LinearClass::AutoBitLinear,
            quantization_mode: QuantizationMode::Offline,
            bitlinear_norm_eps: None,
            rope_scaling: llama3_rope(ck, arch, head_dim, rope_theta).map_err(fail)?,
        };
        config.validate().map_err(|e| {
            let message = e.to_string();
            let message = message.strip_prefix("config: ").unwrap_or(&message);
            fail(message.to_string())
        })?;
        check_tensors(ck, &config).map_err(fail)?;
        Ok(config)
    }
}

/// The family whose block a GGUF architecture holds (docs/formats.md "GGUF
/// metadata"): bitnet.cpp's `bitnet-b1.58` / `bitnet-25` are 2B4T's block;
/// `llama` with ternary projections is the Llama family (Falcon3-1.58bit,
/// Falcon-E, Llama3-8B-1.58); llama.cpp's `bitnet` is 1bitLLM's block (SiLU)
/// or, with `hidden_act` "relu2", 2B4T's.
fn family(ck: &GgufCheckpoint, arch: &str) -> std::result::Result<Family, String> {
    let sentencepiece = ck.string("tokenizer.ggml.model").ok().flatten() == Some("llama");
    if BITNET_ARCHITECTURES.contains(&arch) {
        // bitnet.cpp's converter files 1bitLLM's BitnetForCausalLM under
        // "bitnet-b1.58" too (its `BitnetModel`), with 1bitLLM's SentencePiece
        // tokenizer; that model's MLP is SiLU, whatever the graph the name selects.
        return Ok(if sentencepiece {
            Family::OneBitLlm
        } else {
            Family::BitNet
        });
    }
    match arch {
        "llama" => Ok(Family::Llama),
        "bitnet" => match ck.string(HIDDEN_ACT).map_err(|e| e.to_string())? {
            Some("relu2") => Ok(Family::BitNet),
            Some("silu") => Ok(Family::OneBitLlm),
            Some(other) => Err(format!(
                "{HIDDEN_ACT} {other:?} is not supported (\"relu2\" or \"silu\")"
            )),
            // Files written before the key: llama.cpp's earlier 2B4T
            // converter wrote the Llama 3 byte-level BPE (gpt2); 1bitLLM's
            // have its SentencePiece tokenizer.
            None => Ok(
                if ck.string("tokenizer.ggml.model").ok().flatten() == Some("gpt2") {
                    Family::BitNet
                } else {
                    Family::OneBitLlm
                },
            ),
        },
        _ => Err(format!(
            "general.architecture {arch:?} is not supported; trit runs GGUF files of BitNet \
             b1.58 models: {}, \"bitnet\" (1bitLLM, or 2B4T) and \"llama\" with ternary \
             projections (Falcon3-1.58bit, Falcon-E, Llama3-8B-1.58)",
            BITNET_ARCHITECTURES.map(|a| format!("{a:?}")).join(", ")
        )),
    }
}

/// Llama 3 RoPE scaling from `rope_freqs.weight` [head_dim / 2]: llama.cpp's
/// converter (`LlamaModel.generate_extra_tensors`) stores one divisor per
/// frequency, `factor` where the wavelength exceeds `original / low`, 1 below
/// `original / high`, `1 / ((1 - smooth) / factor + smooth)` between: the
/// same frequencies transformers' `llama3` RoPE computes. The file does not
/// keep the parameters, so they are recovered: `factor` is the largest
/// divisor, low and high are Llama 3.1's 1 and 4 (the converter's defaults),
/// the original context `{arch}.rope.scaling.original_context_length` or
/// 8192; the divisors those give must match the file's, or the tensor is
/// refused by name. All ones is no scaling.
fn llama3_rope(
    ck: &GgufCheckpoint,
    arch: &str,
    head_dim: usize,
    theta: f64,
) -> std::result::Result<Option<Llama3Rope>, String> {
    let Some(t) = ck.tensor(ROPE_FREQS) else {
        return Ok(None);
    };
    let half = head_dim / 2;
    if !matches!(t.dtype, DType::F32 | DType::F16 | DType::BF16) || t.shape != [half] {
        return Err(format!(
            "tensor {ROPE_FREQS:?} is {} {:?}; expected {half} float RoPE factors",
            t.dtype.name(),
            t.shape
        ));
    }
    let stored: Vec<f64> = t
        .to_f32(ROPE_FREQS)
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(f64::from)
        .collect();
    let factor = stored.iter().copied().fold(f64::NAN, f64::max);
    if stored.iter().all(|&f| f == 1.0) {
        return Ok(None);
    }
    let original_key = format!("{arch}.rope.scaling.original_context_length");
    let original = ck
        .uint(&original_key)
        .map_err(|e| e.to_string())?
        .unwrap_or(LLAMA3_ORIGINAL_CONTEXT);
    let (low, high) = (LLAMA3_LOW_FREQ_FACTOR, LLAMA3_HIGH_FREQ_FACTOR);
    let old = original as f64;
    let expected = |i: usize| {
        let freq = theta.powf(-((2 * i) as f64) / head_dim as f64);
        let wavelen = std::f64::consts::TAU / freq;
        if wavelen < old / high {
            1.0
        } else if wavelen > old / low {
            factor
        } else {
            let smooth = (old / wavelen - low) / (high - low);
            1.0 / ((1.0 - smooth) / factor + smooth)
        }
    };
    // The converter computes in f32: a relative 1e-4 separates rounding from
    // another set of parameters.
    let matches = factor.is_finite()
        && factor > 1.0
        && stored
            .iter()
            .enumerate()
            .all(|(i, &f)| (f - expected(i)).abs() <= 1e-4 * expected(i));
    if !matches {
        return Err(format!(
            "tensor {ROPE_FREQS:?} is not supported: its RoPE frequency factors are not Llama \
             3's with factor {factor}, low_freq_factor {low}, high_freq_factor {high} and an \
             original context of {original} ({original_key}, default {LLAMA3_ORIGINAL_CONTEXT}), \
             the only per-frequency factors trit runs"
        ));
    }
    Ok(Some(Llama3Rope {
        factor: factor as f32,
        low_freq_factor: low as f32,
        high_freq_factor: high as f32,
        original_max_position_embeddings: usize::try_from(original)
            .map_err(|_| format!("{original_key} is {original}; too large"))?,
    }))
}

/// Refuses every tensor the family's block does not read, by name: the
/// model would run without it, which is not the model the file describes.
fn check_tensors(ck: &GgufCheckpoint, config: &Config) -> std::result::Result<(), String> {
    let mut names: Vec<(&str, &str)> = ck.tensor_names().collect();
    names.sort_unstable();
    for (name, gguf) in names {
        // `rope_freqs.weight` was read, or refused, by `llama3_rope`.
        if expected(name, config) || gguf == ROPE_FREQS {
            continue;
        }
        let why = if gguf.contains("_sub_norm.") {
            format!("the {} family has no sub-norms", config.family.name())
        } else {
            format!(
                "it is not part of the {} block trit runs ({} layers)",
                config.family.name(),
                config.num_layers
            )
        };
        return Err(format!("tensor {gguf:?} is not supported: {why}"));
    }
    Ok(())
}

/// Whether `name` (a builder name, sub-norms under their GGUF module paths)
/// is a tensor the family's block reads.
fn expected(name: &str, config: &Config) -> bool {
    if matches!(
        name,
        "model.embed_tokens.weight" | "model.norm.weight" | "lm_head.weight"
    ) {
        return true;
    }
    let Some(rest) = name.strip_prefix("model.layers.") else {
        return false;
    };
    let Some((layer, module)) = rest.split_once('.') else {
        return false;
    };
    if !layer.parse::<usize>().is_ok_and(|l| l < config.num_layers) {
        return false;
    }
    match module {
        "input_layernorm.weight" | "post_attention_layernorm.weight" => true,
        "self_attn.attn_sub_norm.weight" | "mlp.ffn_sub_norm.weight" => {
            config.family.sub_norms().is_some()
        }
        _ => crate::model::weights::Proj::ALL
            .iter()
            .any(|p| module == format!("{}.weight", p.path())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::tiny;

    #[test]
    fn each_family_expects_its_own_tensors() {
        let mut llama = tiny();
        llama.family = Family::Llama;
        let bitnet = tiny();
        for name in [
            "model.embed_tokens.weight",
            "lm_head.weight",
            "model.layers.1.post_attention_layernorm.weight",
            "model.layers.0.self_attn.k_proj.weight",
            "model.layers.1.mlp.down_proj.weight",
        ] {
            assert!(expected(name, &llama) && expected(name, &bitnet), "{name}");
        }
        let sub_norm = "model.layers.0.self_attn.attn_sub_norm.weight";
        assert!(expected(sub_norm, &bitnet) && !expected(sub_norm, &llama));
        for name in [
            "model.layers.2.input_layernorm.weight", // beyond the 2 layers
            "model.layers.x.input_layernorm.weight",
            "model.layers.0.self_attn.q_norm.weight",
            "rope_freqs.weight",
            "blk.0.attn_q.scale",
        ] {
            assert!(!expected(name, &bitnet), "{name}");
        }
    }
}
