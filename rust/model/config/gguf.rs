//! A `Config` from a GGUF file's metadata (`{arch}.embedding_length` and its
//! kin, docs/formats.md "GGUF metadata"), with strict types: an integer key
//! must hold an integer, a float key a float. Errors name the file and key.

use super::{Config, Family, LinearClass, QuantizationMode};
use crate::checkpoint::gguf::BITNET_ARCHITECTURES;
use crate::checkpoint::GgufCheckpoint;
use crate::error::{Result, TritError};

/// llama.cpp's default RoPE base when `{arch}.rope.freq_base` is absent.
const DEFAULT_ROPE_BASE: f64 = 10000.0;
impl Config {
    pub fn from_gguf(ck: &GgufCheckpoint) -> Result<Config> {
        let shown = ck.path().display().to_string();
        let fail = |msg: String| TritError::invalid(format!("{shown}: {msg}"));
        let arch = ck.architecture();
        // llama.cpp names two blocks "bitnet": 1bitLLM's (SiLU, a SentencePiece
        // "llama" tokenizer) and, in its newer converter, 2B4T's (relu², the
        // Llama 3 byte-level BPE, "gpt2"). The tokenizer tells them apart.
        let llama_cpp_2b4t = arch == "bitnet" && ck.string("tokenizer.ggml.model")? == Some("gpt2");
        if !BITNET_ARCHITECTURES.contains(&arch) && !llama_cpp_2b4t {
            return Err(fail(format!(
                "general.architecture {arch:?} is not supported; trit runs GGUF files of the \
                 BitNet b1.58 2B4T block ({}, or \"bitnet\" with a gpt2 tokenizer)",
                BITNET_ARCHITECTURES.join(", ")
            )));
        }
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
        if let Some(rot) = ck.uint(&key("rope.dimension_count"))? {
            if rot != head_dim as u64 {
                return Err(fail(format!(
                    "{} is {rot}, but heads have {head_dim} dimensions; partial rotary \
                     embeddings are not supported",
                    key("rope.dimension_count")
                )));
            }
        }
        match ck.string(&key("rope.scaling.type"))? {
            None | Some("none") => {}
            Some("linear") if ck.float(&key("rope.scaling.factor"))?.unwrap_or(1.0) == 1.0 => {}
            Some(other) => {
                return Err(fail(format!(
                    "{} {other:?} is not supported",
                    key("rope.scaling.type")
                )))
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
            family: Family::BitNet,
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
            rope_scaling: None,
        };
        config.validate().map_err(|e| {
            let message = e.to_string();
            let message = message.strip_prefix("config: ").unwrap_or(&message);
            fail(message.to_string())
        })?;
        Ok(config)
    }
}
