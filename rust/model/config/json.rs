//! Reading a transformers `config.json` into a `Config`, with strict types.
//!
//! Every check of what trit supports lives here: the family (model_type and
//! architectures: BitNet, Llama with bitnet quantization, 1bitLLM), its
//! activation, no biases, default or Llama 3 RoPE, and the quantisation
//! (a bitnet `quantization_config`, or 1bitLLM's `weight_bits`/`input_bits`). Fields are typed strictly: a string `"false"` is not
//! a bool, a bool is not an integer, `128.0` is not an integer, and a float
//! field accepts an integer. Defaults are transformers' (`PretrainedConfig`,
//! `BitNetConfig`, `LlamaConfig`, `BitNetQuantConfig`; docs/formats.md,
//! "config.json" and "Model families").
//! Errors name the file and the field.

use std::path::Path;

use serde_json::{Map, Value};

use super::{Activation, Config, Family, LinearClass, Llama3Rope, QuantizationMode};
use crate::checkpoint::files;
use crate::error::{Result, TritError};
use crate::model::weights::Proj;

impl Config {
    /// Reads and checks the `config.json` at `path`.
    pub fn from_json_file(path: &Path) -> Result<Config> {
        let json = files::read_json(path, files::MAX_JSON_BYTES)?;
        Config::from_json(&json, &path.display().to_string())
    }

    /// A config from the parsed JSON of a `config.json`; `source` names the
    /// file in messages.
    pub fn from_json(json: &Value, source: &str) -> Result<Config> {
        let Value::Object(map) = json else {
            return Err(TritError::invalid(format!(
                "{source} holds {}, not a JSON object",
                kind(json)
            )));
        };
        let f = Fields {
            source,
            prefix: "",
            map,
        };
        let family = family(&f)?;
        let (rope_theta, rope_scaling) = rope(&f, family)?;
        let quant = quantization(&f, family)?;
        let hidden_size = f.positive("hidden_size")?;
        let num_heads = f.positive("num_attention_heads")?;
        let num_layers = f.positive("num_hidden_layers")?;
        check_full_precision_modules(&f, &quant.full_precision, num_layers)?;
        // LlamaConfig's defaults differ from BitNetConfig's (and from
        // PretrainedConfig's tie_word_embeddings = true).
        let (default_eps, default_tied) = match family {
            Family::BitNet => (1e-5, true),
            Family::Llama | Family::OneBitLlm => (1e-6, false),
        };
        let config = Config {
            family,
            vocab_size: f.positive("vocab_size")?,
            hidden_size,
            intermediate_size: f.positive("intermediate_size")?,
            num_layers,
            num_heads,
            // transformers: None means one key/value head per query head (MHA).
            num_kv_heads: f
                .optional_positive("num_key_value_heads")?
                .unwrap_or(num_heads),
            head_dim: f
                .optional_positive("head_dim")?
                .unwrap_or(hidden_size / num_heads),
            // transformers keeps these as Python floats and meets them in f32 ops.
            rope_theta: rope_theta as f32,
            rms_norm_eps: f.optional_float("rms_norm_eps")?.unwrap_or(default_eps) as f32,
            max_position_embeddings: f.positive("max_position_embeddings")?,
            tie_word_embeddings: f
                .optional_bool("tie_word_embeddings")?
                .unwrap_or(default_tied),
            linear_class: quant.linear_class,
            quantization_mode: quant.mode,
            bitlinear_norm_eps: quant.bitlinear_norm_eps,
            rope_scaling,
        };
        config.validate().map_err(|e| {
            let message = e.to_string();
            let message = message.strip_prefix("config: ").unwrap_or(&message);
            TritError::invalid(format!("{source}: {message}"))
        })?;
        Ok(config)
    }
}

/// The family a config describes (docs/formats.md "Model families"), once
/// its architecture fields are ones trit runs.
fn family(f: &Fields<'_>) -> Result<Family> {
    let archs: Vec<&str> = match f.get("architectures") {
        None => Vec::new(),
        Some(archs) => {
            let names = archs.as_array().filter(|a| a.iter().all(Value::is_string));
            let Some(names) = names else {
                return Err(f.error(format!(
                    "architectures is {}; expected a list of class names",
                    short(archs)
                )));
            };
            names.iter().filter_map(Value::as_str).collect()
        }
    };
    let has = |name: &str| archs.contains(&name);
    let model_type = f.optional_str("model_type")?;
    let family = match model_type {
        // 1bitLLM's class (lower-case n) over a Llama config.
        Some("llama" | "bitnet") if has("BitnetForCausalLM") => Family::OneBitLlm,
        Some("bitnet") if archs.is_empty() || has("BitNetForCausalLM") => Family::BitNet,
        Some("llama") if archs.is_empty() || has("LlamaForCausalLM") => Family::Llama,
        Some("bitnet" | "llama") => {
            return Err(f.error(format!(
                "architectures {} is not supported with model_type {}; expected \
                 BitNetForCausalLM (model_type \"bitnet\"), LlamaForCausalLM or 1bitLLM's \
                 BitnetForCausalLM (model_type \"llama\")",
                f.shown("architectures"),
                f.shown("model_type")
            )))
        }
        _ => {
            return Err(f.error(format!(
                "model_type {} is not supported; trit runs BitNet b1.58 checkpoints \
                 (model_type \"bitnet\", or \"llama\" with a bitnet quantization_config \
                 or 1bitLLM's BitnetForCausalLM)",
                f.shown("model_type")
            )))
        }
    };
    let act = match family.activation() {
        Activation::Relu2 => "relu2",
        Activation::Silu => "silu",
    };
    if f.optional_str("hidden_act")?.unwrap_or(act) != act {
        return Err(f.error(format!(
            "hidden_act {} is not supported for {} checkpoints (only {act:?})",
            f.shown("hidden_act"),
            family.name()
        )));
    }
    for bias in ["attention_bias", "mlp_bias"] {
        if f.optional_bool(bias)? == Some(true) {
            return Err(f.error(format!("{bias} is not supported")));
        }
    }
    // transformers 4's Llama split projections into pretraining_tp slices;
    // only the unsplit model is implemented.
    if let Some(tp) = f.optional_positive("pretraining_tp")? {
        if tp != 1 {
            return Err(f.error(format!("pretraining_tp {tp} is not supported (only 1)")));
        }
    }
    Ok(family)
}

/// rope_theta, from `rope_parameters` (transformers 5) or the top level,
/// and Llama 3 frequency scaling if asked for; other RoPE variants are refused.
fn rope(f: &Fields<'_>, family: Family) -> Result<(f64, Option<Llama3Rope>)> {
    let params = f.optional_object("rope_parameters")?;
    let scaling = f.optional_object("rope_scaling")?;
    let mut rope_type = None;
    for fields in [&scaling, &params].into_iter().flatten() {
        for key in ["rope_type", "type"] {
            if rope_type.is_none() {
                rope_type = fields
                    .optional_str(key)?
                    .map(|t| (fields.shown(key), t, fields));
            }
        }
    }
    let llama3 = match rope_type {
        None | Some((_, "default", _)) => None,
        Some((_, "llama3", fields)) => {
            let read = || -> Result<Llama3Rope> {
                Ok(Llama3Rope {
                    factor: fields.float("factor")? as f32,
                    low_freq_factor: fields.float("low_freq_factor")? as f32,
                    high_freq_factor: fields.float("high_freq_factor")? as f32,
                    original_max_position_embeddings: fields
                        .positive("original_max_position_embeddings")?,
                })
            };
            Some(read().map_err(|e| TritError::invalid(format!("{e} (RoPE scaling \"llama3\")")))?)
        }
        Some((shown, _, _)) => {
            return Err(f.error(format!("RoPE scaling {shown} is not supported")));
        }
    };
    let from_params = match &params {
        Some(p) => p.optional_float("rope_theta")?,
        None => None,
    };
    let theta = match (from_params, f.optional_float("rope_theta")?) {
        (Some(theta), _) | (None, Some(theta)) => theta,
        // LlamaConfig's default; BitNet configs always carry theirs.
        (None, None) if family != Family::BitNet => 10000.0,
        (None, None) => return Err(f.error("rope_theta is missing or null")),
    };
    Ok((theta, llama3))
}

/// How a checkpoint's projections are quantised.
struct Quantization {
    linear_class: LinearClass,
    mode: QuantizationMode,
    bitlinear_norm_eps: Option<f32>,
    /// `modules_to_not_convert`: names of modules kept in full precision.
    full_precision: Vec<String>,
}

/// The quantisation a config asks for: transformers' `BitNetQuantConfig`,
/// or 1bitLLM's `weight_bits` / `input_bits` (float masters, ternarised at
/// load as transformers' online AutoBitLinear does).
fn quantization(f: &Fields<'_>, family: Family) -> Result<Quantization> {
    let unsupported = |what: String| f.error(format!("unsupported quantization config: {what}"));
    if family == Family::OneBitLlm {
        for (key, bits) in [("weight_bits", 1), ("input_bits", 8)] {
            if let Some(n) = f.optional_positive(key)? {
                if n != bits {
                    return Err(f.error(format!("{key} {n} is not supported (only {bits})")));
                }
            }
        }
        if f.get("quantization_config").is_some() {
            return Err(unsupported(
                "1bitLLM checkpoints hold float masters; a quantization_config is not expected"
                    .into(),
            ));
        }
        return Ok(Quantization {
            linear_class: LinearClass::AutoBitLinear,
            mode: QuantizationMode::Online,
            bitlinear_norm_eps: None,
            full_precision: Vec::new(),
        });
    }
    let Some(q) = f.optional_object("quantization_config")? else {
        return Err(f.error(
            "no quantization_config; trit runs BitNet b1.58 (quant_method \"bitnet\") checkpoints",
        ));
    };
    if q.optional_str("quant_method")? != Some("bitnet") {
        return Err(unsupported(format!(
            "quant_method {}, expected \"bitnet\"",
            q.shown("quant_method")
        )));
    }
    // BitNetQuantConfig's defaults.
    let linear_class = match q.optional_str("linear_class")?.unwrap_or("bitlinear") {
        "bitlinear" => LinearClass::BitLinear,
        "autobitlinear" => LinearClass::AutoBitLinear,
        _ => {
            return Err(unsupported(format!(
                "linear_class {}",
                q.shown("linear_class")
            )))
        }
    };
    let mode = match q.optional_str("quantization_mode")?.unwrap_or("offline") {
        "offline" => QuantizationMode::Offline,
        "online" => QuantizationMode::Online,
        _ => {
            return Err(unsupported(format!(
                "quantization_mode {}",
                q.shown("quantization_mode")
            )))
        }
    };
    if linear_class == LinearClass::BitLinear && mode == QuantizationMode::Online {
        return Err(unsupported(
            "\"online\" needs linear_class \"autobitlinear\"".into(),
        ));
    }
    let bitlinear_norm_eps = if q.optional_bool("use_rms_norm")? == Some(true) {
        // BitNetQuantConfig's default.
        Some(q.optional_float("rms_norm_eps")?.unwrap_or(1e-6) as f32)
    } else {
        None
    };
    let full_precision = match q.get("modules_to_not_convert") {
        None => Vec::new(),
        Some(v) => {
            let names = v.as_array().filter(|a| a.iter().all(Value::is_string));
            let Some(names) = names else {
                return Err(q.wrong_type("modules_to_not_convert", v, "a list of module names"));
            };
            names
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        }
    };
    Ok(Quantization {
        linear_class,
        mode,
        bitlinear_norm_eps,
        full_precision,
    })
}

/// transformers (`should_convert_module`) keeps a module unquantised when an
/// entry of `modules_to_not_convert` matches its dotted name from the start
/// up to a module boundary (`"model.layers.1"`) or as a suffix (`"q_proj"`).
/// The embedding, the norms and the head are never quantised by trit either;
/// a projection kept in full precision is not implemented, so an entry that
/// matches one is refused, as is a regular expression (transformers reads
/// entries as such), which trit does not evaluate.
fn check_full_precision_modules(f: &Fields<'_>, names: &[String], layers: usize) -> Result<()> {
    let refuse = |what: String| {
        f.error(format!(
            "unsupported quantization config: quantization_config.modules_to_not_convert {what}"
        ))
    };
    for name in names {
        if name.contains(|c: char| "*+?[](){}|^$\\".contains(c)) {
            return Err(refuse(format!(
                "entry {name:?} is a regular expression, which trit does not evaluate"
            )));
        }
        let matches = |module: &str| {
            module.ends_with(name.as_str())
                || module
                    .strip_prefix(name.as_str())
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
        };
        let hit = (0..layers).find_map(|l| {
            Proj::ALL
                .iter()
                .map(|p| format!("model.layers.{l}.{}", p.path()))
                .find(|module| matches(module))
        });
        if let Some(module) = hit {
            return Err(refuse(format!(
                "entry {name:?} keeps projection {module} in full precision, which trit does \
                 not implement (only modules outside the decoder layers' projections, such as \
                 lm_head)"
            )));
        }
    }
    Ok(())
}

/// The fields of one JSON object, read with strict types.
struct Fields<'a> {
    source: &'a str,
    /// "" at the top level, "quantization_config." inside that object.
    prefix: &'static str,
    map: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    fn error(&self, message: impl std::fmt::Display) -> TritError {
        TritError::invalid(format!("{}: {message}", self.source))
    }

    /// The field, with null taken as absent (transformers' None).
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    /// The value of a field for a message: `key` is its JSON, or absent.
    fn shown(&self, key: &str) -> String {
        self.get(key).map_or_else(|| "(absent)".into(), short)
    }

    fn wrong_type(&self, key: &str, value: &Value, expected: &str) -> TritError {
        self.error(format!(
            "{}{key} is {}; expected {expected}",
            self.prefix,
            short(value)
        ))
    }

    fn optional_positive(&self, key: &str) -> Result<Option<usize>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        // as_u64 is None for negative numbers and for floats, even 128.0.
        match v.as_u64().map(usize::try_from) {
            Some(Ok(n)) if n > 0 => Ok(Some(n)),
            Some(Err(_)) => Err(self.error(format!(
                "{}{key} is {v}, too large for this machine",
                self.prefix
            ))),
            _ => Err(self.wrong_type(key, v, "a positive integer")),
        }
    }

    fn positive(&self, key: &str) -> Result<usize> {
        self.optional_positive(key)?
            .ok_or_else(|| self.error(format!("{}{key} is missing or null", self.prefix)))
    }

    /// A number; integers are floats too, as in Python.
    fn optional_float(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, v, "a number")),
        }
    }

    fn float(&self, key: &str) -> Result<f64> {
        self.optional_float(key)?
            .ok_or_else(|| self.error(format!("{}{key} is missing or null", self.prefix)))
    }

    fn optional_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, v, "true or false")),
        }
    }

    fn optional_str(&self, key: &str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, v, "a string")),
        }
    }

    fn optional_object(&self, key: &'static str) -> Result<Option<Fields<'a>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Object(map)) => Ok(Some(Fields {
                source: self.source,
                prefix: object_prefix(key),
                map,
            })),
            Some(v) => Err(self.wrong_type(key, v, "an object")),
        }
    }
}

/// The prefix that names a nested object's fields in messages.
fn object_prefix(key: &'static str) -> &'static str {
    match key {
        "quantization_config" => "quantization_config.",
        "rope_parameters" => "rope_parameters.",
        "rope_scaling" => "rope_scaling.",
        _ => "",
    }
}

/// A JSON value for a message, cut short if long.
fn short(v: &Value) -> String {
    let text = v.to_string();
    match text.char_indices().nth(80) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text,
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a bool",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// The config of tests/fixtures/tiny-gqa-packed, in the shape of 2B4T's.
    fn base() -> Value {
        json!({
            "architectures": ["BitNetForCausalLM"],
            "model_type": "bitnet",
            "hidden_size": 64,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 300,
            "max_position_embeddings": 128,
            "rope_theta": 500000.0,
            "rms_norm_eps": 1e-5,
            "hidden_act": "relu2",
            "tie_word_embeddings": true,
            "quantization_config": {
                "quant_method": "bitnet",
                "linear_class": "autobitlinear",
                "quantization_mode": "offline"
            }
        })
    }

    fn with(changes: &[(&str, Value)]) -> Value {
        let mut v = base();
        for (key, value) in changes {
            let mut target = &mut v;
            let mut parts = key.split('.').peekable();
            while let Some(part) = parts.next() {
                if parts.peek().is_none() {
                    target[part] = value.clone();
                } else {
                    target = &mut target[part];
                }
            }
        }
        v
    }

    fn parse(v: &Value) -> Result<Config> {
        Config::from_json(v, "m/config.json")
    }

    fn error(changes: &[(&str, Value)]) -> String {
        parse(&with(changes)).unwrap_err().to_string()
    }

    #[test]
    fn reads_a_bitnet_config_with_transformers_defaults() {
        let c = parse(&base()).unwrap();
        assert_eq!(
            (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim),
            (64, 4, 2, 16)
        );
        assert_eq!((c.rope_theta, c.rms_norm_eps), (500000.0, 1e-5));
        assert_eq!(c.linear_class, LinearClass::AutoBitLinear);
        let mut v = base();
        let m = v.as_object_mut().unwrap();
        for key in [
            "num_key_value_heads",
            "rms_norm_eps",
            "tie_word_embeddings",
            "hidden_act",
        ] {
            m.remove(key);
        }
        m["quantization_config"] = json!({"quant_method": "bitnet"});
        m.insert("head_dim".into(), Value::Null);
        let c = parse(&v).unwrap();
        assert_eq!(
            (c.num_kv_heads, c.head_dim, c.tie_word_embeddings),
            (4, 16, true)
        );
        assert_eq!(c.rms_norm_eps, 1e-5);
        assert_eq!(c.linear_class, LinearClass::BitLinear);
        assert_eq!(c.quantization_mode, QuantizationMode::Offline);
        // Floats accept integers; rope_parameters wins over the top level.
        let c = parse(&with(&[
            ("rope_theta", json!(10000)),
            (
                "rope_parameters",
                json!({"rope_theta": 20000, "rope_type": "default"}),
            ),
        ]))
        .unwrap();
        assert_eq!(c.rope_theta, 20000.0);
        let c = parse(&with(&[("rope_theta", json!(10000))])).unwrap();
        assert_eq!(c.rope_theta, 10000.0);
    }

    #[test]
    fn types_are_strict() {
        let cases: Vec<(&str, Value, &str)> = vec![
            (
                "tie_word_embeddings",
                json!("false"),
                "tie_word_embeddings is \"false\"; expected true or false",
            ),
            (
                "tie_word_embeddings",
                json!(0),
                "tie_word_embeddings is 0; expected true or false",
            ),
            (
                "head_dim",
                json!(16.0),
                "head_dim is 16.0; expected a positive integer",
            ),
            (
                "head_dim",
                json!(0),
                "head_dim is 0; expected a positive integer",
            ),
            (
                "head_dim",
                json!(-16),
                "head_dim is -16; expected a positive integer",
            ),
            (
                "head_dim",
                json!("16"),
                "head_dim is \"16\"; expected a positive integer",
            ),
            (
                "hidden_size",
                json!(true),
                "hidden_size is true; expected a positive integer",
            ),
            (
                "vocab_size",
                json!(1e30),
                "vocab_size is 1e+30; expected a positive integer",
            ),
            (
                "rope_theta",
                json!("1e4"),
                "rope_theta is \"1e4\"; expected a number",
            ),
            (
                "rope_theta",
                json!(false),
                "rope_theta is false; expected a number",
            ),
            (
                "rms_norm_eps",
                json!([0.5]),
                "rms_norm_eps is [0.5]; expected a number",
            ),
            (
                "attention_bias",
                json!("no"),
                "attention_bias is \"no\"; expected true or false",
            ),
            (
                "model_type",
                json!(["bitnet"]),
                "model_type is [\"bitnet\"]; expected a string",
            ),
            (
                "quantization_config.use_rms_norm",
                json!(1),
                "quantization_config.use_rms_norm is 1",
            ),
            (
                "quantization_config.linear_class",
                json!(7),
                "quantization_config.linear_class is 7",
            ),
            (
                "rope_scaling",
                json!("none"),
                "rope_scaling is \"none\"; expected an object",
            ),
        ];
        for (key, value, expected) in cases {
            let err = error(&[(key, value)]);
            assert!(err.starts_with("m/config.json: "), "{err}");
            assert!(err.contains(expected), "{expected:?} not in {err:?}");
        }
    }

    #[test]
    fn refuses_what_trit_does_not_run() {
        let cases: Vec<(&str, Value, &str)> = vec![
            (
                "model_type",
                json!("llama"),
                "is not supported with model_type \"llama\"",
            ),
            (
                "model_type",
                json!("mistral"),
                "model_type \"mistral\" is not supported",
            ),
            (
                "model_type",
                Value::Null,
                "model_type (absent) is not supported",
            ),
            (
                "architectures",
                json!(["LlamaForCausalLM"]),
                "LlamaForCausalLM",
            ),
            (
                "architectures",
                json!("BitNetForCausalLM"),
                "expected a list of class names",
            ),
            (
                "hidden_act",
                json!("silu"),
                "hidden_act \"silu\" is not supported",
            ),
            (
                "attention_bias",
                json!(true),
                "attention_bias is not supported",
            ),
            (
                "rope_scaling",
                json!({"rope_type": "llama3", "factor": 8.0}),
                "rope_scaling.low_freq_factor is missing or null",
            ),
            (
                "rope_scaling",
                json!({"type": "linear"}),
                "RoPE scaling \"linear\"",
            ),
            (
                "rope_parameters",
                json!({"rope_type": "yarn"}),
                "RoPE scaling \"yarn\"",
            ),
            ("rope_theta", Value::Null, "rope_theta is missing or null"),
            ("quantization_config", Value::Null, "no quantization_config"),
            (
                "quantization_config.quant_method",
                json!("gptq"),
                "quant_method \"gptq\"",
            ),
            (
                "quantization_config.linear_class",
                json!("dense"),
                "linear_class \"dense\"",
            ),
            (
                "quantization_config.quantization_mode",
                json!("dynamic"),
                "quantization_mode \"dynamic\"",
            ),
            ("quantization_config.linear_class", json!("bitlinear"), "OK"),
            (
                "quantization_config.modules_to_not_convert",
                json!(["lm_head", "model.layers.0"]),
                "modules_to_not_convert",
            ),
            ("num_key_value_heads", json!(3), "num_key_value_heads"),
            ("vocab_size", Value::Null, "vocab_size is missing or null"),
        ];
        for (key, value, expected) in cases {
            if expected == "OK" {
                // bitlinear with the base config's "offline" mode is fine...
                parse(&with(&[(key, value.clone())])).unwrap();
                // ...but not with "online".
                let err = error(&[
                    (key, value),
                    ("quantization_config.quantization_mode", json!("online")),
                ]);
                assert!(
                    err.contains("\"online\" needs linear_class \"autobitlinear\""),
                    "{err}"
                );
                continue;
            }
            let err = error(&[(key, value)]);
            assert!(err.starts_with("m/config.json: "), "{err}");
            assert!(err.contains(expected), "{expected:?} not in {err:?}");
        }
        let err = error(&[("num_attention_heads", json!(8)), ("head_dim", json!(16))]);
        assert!(
            err.contains("num_attention_heads * head_dim = 8 * 16"),
            "{err}"
        );
        parse(&with(&[(
            "quantization_config.modules_to_not_convert",
            json!(["lm_head"]),
        )]))
        .unwrap();
        parse(&with(&[
            ("attention_bias", json!(false)),
            ("architectures", Value::Null),
        ]))
        .unwrap();
        let err = Config::from_json(&json!([1]), "c.json")
            .unwrap_err()
            .to_string();
        assert_eq!(err, "c.json holds a list, not a JSON object");
    }

    /// A Llama-architecture config as Falcon3-1.58bit / Falcon-E publish it.
    fn llama() -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": 64,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 24,
            "vocab_size": 300,
            "max_position_embeddings": 128,
            "quantization_config": {"quant_method": "bitnet"}
        })
    }

    #[test]
    fn reads_llama_and_1bitllm_configs_with_their_defaults() {
        let c = parse(&llama()).unwrap();
        assert_eq!(c.family, Family::Llama);
        // LlamaConfig's defaults, not BitNetConfig's.
        assert_eq!((c.rope_theta, c.rms_norm_eps), (10000.0, 1e-6));
        assert!(!c.tie_word_embeddings);
        // head_dim need not be hidden / heads without a sub-norm.
        assert_eq!((c.head_dim, c.q_dim()), (24, 96));
        assert_eq!(c.linear_class, LinearClass::BitLinear);
        assert_eq!((c.bitlinear_norm_eps, c.rope_scaling), (None, None));

        let mut v = llama();
        v["quantization_config"] = json!({
            "quant_method": "bitnet",
            "use_rms_norm": true,
            "modules_to_not_convert": ["lm_head", "model.embed_tokens"],
        });
        v["rope_scaling"] = json!({
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192
        });
        let c = parse(&v).unwrap();
        assert_eq!(c.bitlinear_norm_eps, Some(1e-6));
        let r = c.rope_scaling.unwrap();
        assert_eq!((r.factor, r.original_max_position_embeddings), (8.0, 8192));

        let mut v = llama();
        let m = v.as_object_mut().unwrap();
        m["architectures"] = json!(["BitnetForCausalLM"]);
        m.remove("quantization_config");
        m.remove("head_dim");
        m.insert("weight_bits".into(), json!(1));
        m.insert("input_bits".into(), json!(8));
        let c = parse(&v).unwrap();
        assert_eq!(c.family, Family::OneBitLlm);
        assert_eq!(c.quantization_mode, QuantizationMode::Online);
        assert_eq!(c.linear_class, LinearClass::AutoBitLinear);
        v["weight_bits"] = json!(2);
        let err = parse(&v).unwrap_err().to_string();
        assert!(err.contains("weight_bits 2 is not supported"), "{err}");
        // 1bitLLM's inner_attn_ln has hidden_size weights.
        v["weight_bits"] = json!(1);
        v["head_dim"] = json!(24);
        let err = parse(&v).unwrap_err().to_string();
        assert!(err.contains("must equal hidden_size"), "{err}");
    }

    #[test]
    fn refuses_llama_variants_by_name() {
        let cases: Vec<(&str, Value, &str)> = vec![
            (
                "hidden_act",
                json!("relu2"),
                "hidden_act \"relu2\" is not supported for llama",
            ),
            ("mlp_bias", json!(true), "mlp_bias is not supported"),
            (
                "pretraining_tp",
                json!(4),
                "pretraining_tp 4 is not supported",
            ),
            ("quantization_config", Value::Null, "no quantization_config"),
            (
                "quantization_config",
                json!({"quant_method": "bitnet", "modules_to_not_convert": ["q_proj"]}),
                "entry \"q_proj\" keeps projection model.layers.0.self_attn.q_proj",
            ),
            (
                "quantization_config",
                json!({"quant_method": "bitnet", "modules_to_not_convert": "lm_head"}),
                "modules_to_not_convert is \"lm_head\"; expected a list of module names",
            ),
            (
                "rope_scaling",
                json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                       "high_freq_factor": 1.0, "original_max_position_embeddings": 64}),
                "high_freq_factor > low_freq_factor",
            ),
        ];
        for (key, value, expected) in cases {
            let mut v = llama();
            v[key] = value;
            let err = parse(&v).unwrap_err().to_string();
            assert!(err.starts_with("m/config.json: "), "{err}");
            assert!(err.contains(expected), "{expected:?} not in {err:?}");
        }
    }

    #[test]
    fn sizes_are_checked_without_overflow() {
        let huge = json!(u64::MAX);
        let err = error(&[
            ("num_attention_heads", huge.clone()),
            ("num_key_value_heads", huge.clone()),
            ("head_dim", huge.clone()),
        ]);
        assert!(err.contains("num_attention_heads * head_dim"), "{err}");
        let err = error(&[("vocab_size", json!(1u64 << 62))]);
        assert!(err.contains("vocab_size * hidden_size"), "{err}");
        let err = error(&[("intermediate_size", json!(1u64 << 60))]);
        assert!(err.contains("intermediate_size * hidden_size"), "{err}");
        let err = error(&[("hidden_size", json!(18446744073709551616.0))]);
        assert!(err.contains("expected a positive integer"), "{err}");
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        fn value() -> impl Strategy<Value = Value> {
            prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                any::<u64>().prop_map(Value::from),
                prop::sample::select(vec![0u64, 1, 2, 4, 16, 64, 1 << 32, 1 << 62, u64::MAX])
                    .prop_map(Value::from),
                any::<f64>().prop_map(Value::from),
                "[a-z0-9.]{0,6}".prop_map(Value::from),
                prop::collection::vec(any::<u8>().prop_map(Value::from), 0..3)
                    .prop_map(Value::from),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(1000))]

            /// Any values in any fields: a config that validates, or an
            /// error naming the file; never a panic.
            #[test]
            fn any_config_is_read_or_refused(
                changes in prop::collection::vec((
                    prop::sample::select(vec![
                        "hidden_size", "intermediate_size", "num_hidden_layers",
                        "num_attention_heads", "num_key_value_heads", "vocab_size",
                        "max_position_embeddings", "rope_theta", "rms_norm_eps",
                        "tie_word_embeddings", "head_dim", "model_type", "hidden_act",
                        "architectures", "rope_scaling", "quantization_config",
                        "quantization_config.linear_class",
                        "quantization_config.quantization_mode", "attention_bias",
                    ]),
                    value(),
                ), 1..4),
            ) {
                let mut v = base();
                for (key, value) in &changes {
                    let mut target = &mut v;
                    let mut parts = key.split('.').peekable();
                    while let Some(part) = parts.next() {
                        if !target.is_object() {
                            break;
                        }
                        if parts.peek().is_none() {
                            target[part] = value.clone();
                        } else {
                            target = &mut target[part];
                        }
                    }
                }
                match parse(&v) {
                    Ok(c) => prop_assert!(c.validate().is_ok()),
                    Err(e) => prop_assert!(e.to_string().starts_with("m/config.json"), "{}", e),
                }
            }
        }
    }
}
