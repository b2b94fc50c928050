//! The model hyper-parameters, as a typed struct, and the checks that its
//! numbers make a model the forward pass can run. `json` reads one from a
//! transformers `config.json`, `gguf` from a GGUF file's metadata.

mod gguf;
mod json;

pub use gguf::ROPE_FREQS;

use crate::error::{Result, TritError};

/// Which transformers class the projections were saved for. It decides what a
/// packed checkpoint's `weight_scale` means (docs/formats.md, "Linear classes").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinearClass {
    /// `AutoBitLinear`: `weight_scale` = mean|W|, multiplied.
    AutoBitLinear,
    /// `BitLinear` (transformers' default): `weight_scale` = 1/mean|W|, divided.
    BitLinear,
}

impl LinearClass {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "autobitlinear" => Ok(LinearClass::AutoBitLinear),
            "bitlinear" => Ok(LinearClass::BitLinear),
            _ => Err(TritError::invalid(format!(
                "unsupported linear_class {name:?}; expected \"autobitlinear\" or \"bitlinear\""
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            LinearClass::AutoBitLinear => "autobitlinear",
            LinearClass::BitLinear => "bitlinear",
        }
    }
}

/// How the projection weights are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantizationMode {
    /// Packed U8 `[out/4, in]` plus a `weight_scale` tensor.
    Offline,
    /// Float master weights, ternarised with absmean at load time.
    Online,
}

impl QuantizationMode {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "offline" => Ok(QuantizationMode::Offline),
            "online" => Ok(QuantizationMode::Online),
            _ => Err(TritError::invalid(format!(
                "unsupported quantization_mode {name:?}; expected \"offline\" or \"online\""
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            QuantizationMode::Offline => "offline",
            QuantizationMode::Online => "online",
        }
    }
}

/// The checkpoint family: which class the decoder layers follow
/// (docs/formats.md "Model families").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Family {
    /// transformers' `BitNetForCausalLM` (microsoft/bitnet-b1.58-2B-4T): relu²
    /// GLU, sub-norms `attn_sub_norm` and `ffn_sub_norm` before o_proj and down_proj.
    #[default]
    BitNet,
    /// transformers' `LlamaForCausalLM` with a bitnet `quantization_config`
    /// (Falcon3-*-1.58bit, Falcon-E, HF1BitLLM/Llama3-8B-1.58): SiLU GLU, no sub-norms.
    Llama,
    /// 1bitLLM's `BitnetForCausalLM` (code published with the model): SiLU
    /// GLU, sub-norms `inner_attn_ln` and `ffn_layernorm`, float masters.
    OneBitLlm,
}

/// The GLU nonlinearity of the MLP: `h = act(gate) * up`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `relu(g)²` (transformers' "relu2").
    Relu2,
    /// `g * sigmoid(g)` (transformers' "silu").
    Silu,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::BitNet => "bitnet",
            Family::Llama => "llama",
            Family::OneBitLlm => "1bitllm",
        }
    }

    pub fn activation(self) -> Activation {
        match self {
            Family::BitNet => Activation::Relu2,
            Family::Llama | Family::OneBitLlm => Activation::Silu,
        }
    }

    /// The module paths (inside a layer) of the sub-norms before o_proj and
    /// before down_proj, for the families that have them.
    pub fn sub_norms(self) -> Option<(&'static str, &'static str)> {
        match self {
            Family::BitNet => Some(("self_attn.attn_sub_norm", "mlp.ffn_sub_norm")),
            Family::OneBitLlm => Some(("self_attn.inner_attn_ln", "mlp.ffn_layernorm")),
            Family::Llama => None,
        }
    }
}

/// Llama 3's RoPE frequency scaling (transformers' `rope_type: "llama3"`,
/// docs/formats.md "RoPE scaling").
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Llama3Rope {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: usize,
}

/// A BitNet b1.58 decoder of one of the supported families.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f32,
    pub rms_norm_eps: f32,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub linear_class: LinearClass,
    pub quantization_mode: QuantizationMode,
    /// `use_rms_norm` of transformers' BitLinear: the epsilon of an RMSNorm
    /// applied to every projection's input before it is quantised.
    pub bitlinear_norm_eps: Option<f32>,
    pub rope_scaling: Option<Llama3Rope>,
}

impl Config {
    /// Checks that the numbers describe a model the forward pass supports.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(TritError::invalid(format!(
                    "config: {name} must be positive"
                )));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(TritError::invalid(format!(
                "config: num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_heads, self.num_kv_heads
            )));
        }
        // A sub-norm before o_proj has hidden_size weights and normalises the
        // concatenated heads, so those families only run when the two agree.
        let q_dim = self.num_heads.checked_mul(self.head_dim);
        if self.family.sub_norms().is_some() && q_dim != Some(self.hidden_size) {
            return Err(TritError::invalid(format!(
                "config: num_attention_heads * head_dim = {} * {} must equal hidden_size {} \
                 (the sub-norm before o_proj has hidden_size weights)",
                self.num_heads, self.head_dim, self.hidden_size
            )));
        }
        if q_dim.is_none() {
            return Err(TritError::invalid(format!(
                "config: num_attention_heads * head_dim = {} * {} is too large for this machine",
                self.num_heads, self.head_dim
            )));
        }
        // The largest matrices must be addressable: every later size (q_dim,
        // kv_dim, a matrix's elements and f32 bytes) is then below these.
        for (name, rows, cols) in [
            (
                "vocab_size * hidden_size",
                self.vocab_size,
                self.hidden_size,
            ),
            (
                "intermediate_size * hidden_size",
                self.intermediate_size,
                self.hidden_size,
            ),
            ("q_dim * hidden_size", self.q_dim(), self.hidden_size),
        ] {
            let fits = rows
                .checked_mul(cols)
                .and_then(|n| n.checked_mul(std::mem::size_of::<f32>()))
                .is_some_and(|bytes| isize::try_from(bytes).is_ok());
            if !fits {
                return Err(TritError::invalid(format!(
                    "config: {name} = {rows} * {cols} is too large for this machine"
                )));
            }
        }
        // RoPE rotates the two halves of each head (rotate_half).
        if !self.head_dim.is_multiple_of(2) {
            return Err(TritError::invalid(format!(
                "config: head_dim {} must be even for rotary embeddings",
                self.head_dim
            )));
        }
        // The packed layout stores 4 output rows per byte (docs/formats.md, "Packing").
        if self.quantization_mode == QuantizationMode::Offline {
            for (name, out) in [
                ("num_attention_heads * head_dim", self.q_dim()),
                ("num_key_value_heads * head_dim", self.kv_dim()),
                ("intermediate_size", self.intermediate_size),
                ("hidden_size", self.hidden_size),
            ] {
                if !out.is_multiple_of(4) {
                    return Err(TritError::invalid(format!(
                        "config: {name} = {out} is not a multiple of 4, which packed weights need"
                    )));
                }
            }
        }
        if self.quantization_mode == QuantizationMode::Online
            && self.linear_class == LinearClass::BitLinear
        {
            return Err(TritError::invalid(
                "config: quantization_mode \"online\" exists only for linear_class \"autobitlinear\"",
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(TritError::invalid(format!(
                "config: rope_theta must be a positive number, got {}",
                self.rope_theta
            )));
        }
        for (name, eps) in [
            ("rms_norm_eps", Some(self.rms_norm_eps)),
            ("quantization_config.rms_norm_eps", self.bitlinear_norm_eps),
        ] {
            if let Some(eps) = eps.filter(|e| !(e.is_finite() && *e >= 0.0)) {
                return Err(TritError::invalid(format!(
                    "config: {name} must be a non-negative number, got {eps}"
                )));
            }
        }
        if let Some(r) = &self.rope_scaling {
            let factors_ok = [r.factor, r.low_freq_factor, r.high_freq_factor]
                .iter()
                .all(|f| f.is_finite() && *f > 0.0);
            // transformers divides by high_freq_factor - low_freq_factor.
            if !factors_ok
                || r.high_freq_factor <= r.low_freq_factor
                || r.original_max_position_embeddings == 0
            {
                return Err(TritError::invalid(format!(
                    "config: rope_scaling {r:?} needs positive factors, \
                     high_freq_factor > low_freq_factor and a positive \
                     original_max_position_embeddings"
                )));
            }
        }
        Ok(())
    }

    /// Width of the concatenated query heads.
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Width of the concatenated key (or value) heads.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Query heads served by one key/value head (GQA group size).
    pub fn group_size(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }
}

#[cfg(test)]
pub(crate) fn tiny() -> Config {
    Config {
        family: Family::BitNet,
        vocab_size: 40,
        hidden_size: 16,
        intermediate_size: 24,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 4,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-5,
        max_position_embeddings: 64,
        tie_word_embeddings: true,
        linear_class: LinearClass::AutoBitLinear,
        quantization_mode: QuantizationMode::Offline,
        bitlinear_norm_eps: None,
        rope_scaling: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_a_valid_config_and_rejects_broken_ones() {
        assert!(tiny().validate().is_ok());
        let mut c = tiny();
        c.num_kv_heads = 3;
        assert!(c.validate().is_err());
        let mut c = tiny();
        c.head_dim = 8;
        assert!(c.validate().is_err());
        let mut c = tiny();
        c.intermediate_size = 22;
        assert!(c.validate().is_err());
        let mut c = tiny();
        c.linear_class = LinearClass::BitLinear;
        c.quantization_mode = QuantizationMode::Online;
        assert!(c.validate().is_err());
        let mut c = tiny();
        c.vocab_size = 0;
        assert!(c.validate().is_err());
        assert!(LinearClass::parse("dense").is_err());
        assert!(QuantizationMode::parse("dynamic").is_err());
    }
}
