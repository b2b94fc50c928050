//! The model hyper-parameters, as a typed struct, and the checks that its
//! numbers make a model the forward pass can run. `json` reads one from a
//! transformers `config.json`, `gguf` from a GGUF file's metadata.

mod gguf;
mod json;

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

/// A BitNet b1.58 decoder (transformers' `BitNetForCausalLM`).
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
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
        // attn_sub_norm has hidden_size weights and normalises the concatenated
        // heads, so transformers' BitNet only runs when the two agree.
        if self.num_heads.checked_mul(self.head_dim) != Some(self.hidden_size) {
            return Err(TritError::invalid(format!(
                "config: num_attention_heads * head_dim = {} * {} must equal hidden_size {}",
                self.num_heads, self.head_dim, self.hidden_size
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
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return Err(TritError::invalid(format!(
                "config: rms_norm_eps must be a non-negative number, got {}",
                self.rms_norm_eps
            )));
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
