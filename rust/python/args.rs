//! Argument conversion. Numbers, strings and token lists from Python are
//! checked here, so that a wrong type or a value out of range is an
//! `InvalidInputError` naming the argument, never the `TypeError` or
//! `OverflowError` of a plain conversion. Each argument gets a named
//! extractor (`#[pyo3(from_py_with = args::threads)]`).

use numpy::PyReadonlyArray1;
use pyo3::exceptions::PyOverflowError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyString};

use super::model::PySampler;
use super::{invalid, type_name};
use crate::kernels::Packing;

/// The integer types an argument converts to, with their ranges for messages.
pub(super) trait IntArg: TryFrom<i128> {
    const MIN: i128;
    const MAX: i128;
}

macro_rules! int_arg_types {
    ($($t:ty),*) => {$(
        impl IntArg for $t {
            const MIN: i128 = <$t>::MIN as i128;
            const MAX: i128 = <$t>::MAX as i128;
        }
    )*};
}
int_arg_types!(u32, i64, u64, usize);

/// `obj` as an integer of type `T`; the error names `name`. Bools are
/// refused (True is not a count), as are floats and strings.
pub(super) fn int<T: IntArg>(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<T> {
    if obj.is_instance_of::<PyBool>() {
        return Err(invalid(format!("{name} must be an integer, got a bool")));
    }
    let value = match obj.extract::<i128>() {
        Ok(v) => Some(v),
        Err(e) if e.is_instance_of::<PyOverflowError>(obj.py()) => None,
        Err(_) => {
            return Err(invalid(format!(
                "{name} must be an integer, got {}",
                type_name(obj)
            )))
        }
    };
    value.and_then(|v| T::try_from(v).ok()).ok_or_else(|| {
        let shown = value.map_or_else(|| "one beyond 128 bits".to_string(), |v| v.to_string());
        invalid(format!(
            "{name} must be an integer from {} to {}, got {shown}",
            T::MIN,
            T::MAX
        ))
    })
}

/// As `int`, with None passing through.
pub(super) fn optional_int<T: IntArg>(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<Option<T>> {
    if obj.is_none() {
        return Ok(None);
    }
    int(obj, name).map(Some)
}

/// `obj` as a float (ints accepted, as Python does); the error names `name`.
pub(super) fn float(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<f64> {
    if obj.is_instance_of::<PyBool>() {
        return Err(invalid(format!("{name} must be a number, got a bool")));
    }
    obj.extract::<f64>().map_err(|e| {
        if e.is_instance_of::<PyOverflowError>(obj.py()) {
            invalid(format!("{name} is too large for a float"))
        } else {
            invalid(format!("{name} must be a number, got {}", type_name(obj)))
        }
    })
}

/// `obj` as a str; the error names `name`.
pub(super) fn string(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<String> {
    let s = obj
        .cast::<PyString>()
        .map_err(|_| invalid(format!("{name} must be a str, got {}", type_name(obj))))?;
    s.to_cow()
        .map(|s| s.into_owned())
        .map_err(|_| invalid(format!("{name} is not valid UTF-8 (a lone surrogate?)")))
}

/// As `string`, with None passing through.
pub(super) fn optional_string(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<Option<String>> {
    if obj.is_none() {
        return Ok(None);
    }
    string(obj, name).map(Some)
}

/// `obj` as a bool (only True or False); the error names `name`.
pub(super) fn boolean(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<bool> {
    obj.cast::<PyBool>().map(|b| b.is_true()).map_err(|_| {
        invalid(format!(
            "{name} must be True or False, got {}",
            type_name(obj)
        ))
    })
}

/// `obj` as token ids: a sequence of integers from 0 to 2**32 - 1.
pub(super) fn token_ids(obj: &Bound<'_, PyAny>) -> PyResult<Vec<u32>> {
    if obj.is_instance_of::<PyString>() {
        return Err(invalid("ids must be a list of token ids, got a str"));
    }
    // The common case in one conversion; the slow walk below only finds
    // the culprit for the message.
    if let Ok(ids) = obj.extract::<Vec<u32>>() {
        return Ok(ids);
    }
    let items = obj.try_iter().map_err(|_| {
        invalid(format!(
            "ids must be a list of token ids, got {}",
            type_name(obj)
        ))
    })?;
    let mut ids = Vec::new();
    for (i, item) in items.enumerate() {
        ids.push(token_id(&item?, &format!(" at position {i}"))?);
    }
    Ok(ids)
}

/// `obj` as one token id; `place` (" at position 3", or "") for the message.
fn token_id(obj: &Bound<'_, PyAny>, place: &str) -> PyResult<u32> {
    int::<u32>(obj, "token id").map_err(|_| {
        let shown = match obj.extract::<i128>() {
            Ok(v) if !obj.is_instance_of::<PyBool>() => v.to_string(),
            _ => format!("(a {})", type_name(obj)),
        };
        invalid(format!(
            "token id {shown}{place} is not a valid id; token ids are integers from 0 to {}",
            u32::MAX
        ))
    })
}

/// `obj` as the token id of `push`.
pub(super) fn token(obj: &Bound<'_, PyAny>) -> PyResult<u32> {
    token_id(obj, "")
}

/// The items of a sequence argument `name`, each checked to be a tuple of
/// `len` fields (`what` describes one for the message).
fn records<'py>(
    obj: &Bound<'py, PyAny>,
    name: &str,
    len: usize,
    what: &str,
) -> PyResult<Vec<Vec<Bound<'py, PyAny>>>> {
    let items = obj.try_iter().map_err(|_| {
        invalid(format!(
            "{name} must be a list of {what}, got {}",
            type_name(obj)
        ))
    })?;
    let mut out = Vec::new();
    for (i, item) in items.enumerate() {
        let item = item?;
        let fields: Vec<Bound<'py, PyAny>> = match item.try_iter() {
            Ok(fields) if !item.is_instance_of::<PyString>() => fields.collect::<PyResult<_>>()?,
            _ => Vec::new(),
        };
        if fields.len() != len {
            return Err(invalid(format!(
                "{name}[{i}] must be {what}, got {}",
                type_name(&item)
            )));
        }
        out.push(fields);
    }
    Ok(out)
}

/// One tensor of `Model.load`: (name, dtype, shape, uint8 array of its bytes).
pub(super) type TensorArg<'py> = (String, String, Vec<usize>, PyReadonlyArray1<'py, u8>);

/// `Model.load`'s tensors, each a (name, dtype, shape, uint8 array) tuple.
pub(super) fn tensors<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Vec<TensorArg<'py>>> {
    let what = "(name, dtype, shape, uint8 array) tuples";
    records(obj, "tensors", 4, what)?
        .into_iter()
        .map(|f| {
            let name = string(&f[0], "tensor name")?;
            let dtype = string(&f[1], &format!("tensor {name:?}: dtype"))?;
            let shape_name = format!("tensor {name:?}: shape");
            let shape = f[2]
                .try_iter()
                .map_err(|_| invalid(format!("{shape_name} must be a list of integers")))?
                .map(|d| int::<usize>(&d?, &shape_name))
                .collect::<PyResult<Vec<usize>>>()?;
            let data = f[3].extract::<PyReadonlyArray1<'py, u8>>().map_err(|_| {
                invalid(format!(
                    "tensor {name:?}: data must be a 1-D uint8 numpy array, got {}",
                    type_name(&f[3])
                ))
            })?;
            Ok((name, dtype, shape, data))
        })
        .collect()
}

/// `Engine.step`'s work: (slot, token ids, whether logits are wanted) tuples.
pub(super) fn work(obj: &Bound<'_, PyAny>) -> PyResult<Vec<(usize, Vec<u32>, bool)>> {
    records(obj, "work", 3, "(slot, token ids, logits) tuples")?
        .into_iter()
        .map(|f| {
            Ok((
                int(&f[0], "slot")?,
                token_ids(&f[1])?,
                boolean(&f[2], "logits")?,
            ))
        })
        .collect()
}

/// `Engine.sample_many`'s requests: (slot, sampler) pairs, each sampler its
/// own object (one sampler cannot draw for two sequences at once).
pub(super) fn sample_requests<'py>(
    obj: &Bound<'py, PyAny>,
) -> PyResult<Vec<(usize, Bound<'py, PySampler>)>> {
    let mut out: Vec<(usize, Bound<'py, PySampler>)> = Vec::new();
    for (i, f) in records(obj, "requests", 2, "(slot, Sampler) pairs")?
        .into_iter()
        .enumerate()
    {
        let slot = int(&f[0], "slot")?;
        let sampler = f[1].cast::<PySampler>().map_err(|_| {
            invalid(format!(
                "requests[{i}]'s sampler must be a trit._core.Sampler, got {}",
                type_name(&f[1])
            ))
        })?;
        if let Some(j) = out.iter().position(|(_, s)| s.is(sampler)) {
            return Err(invalid(format!(
                "requests[{j}] and requests[{i}] share one Sampler: each sequence needs its own"
            )));
        }
        out.push((slot, sampler.clone()));
    }
    Ok(out)
}

/// The `packing` of a model or matrix: "i2" or "tq1" (`Packing::parse`).
pub(super) fn packing(obj: &Bound<'_, PyAny>) -> PyResult<Packing> {
    let name = string(obj, "packing")?;
    Packing::parse(&name).map_err(|e| invalid(e.to_string()))
}

/// Named extractors for `#[pyo3(from_py_with = ...)]`, one per argument
/// name, so that each message names its argument.
macro_rules! named {
    ($($f:ident -> $t:ty = $conv:ident($name:literal);)*) => {$(
        pub(super) fn $f(obj: &Bound<'_, PyAny>) -> PyResult<$t> {
            $conv(obj, $name)
        }
    )*};
}

named! {
    threads -> Option<usize> = optional_int("threads");
    n_ctx -> Option<usize> = optional_int("n_ctx");
    slots -> usize = int("slots");
    slot -> usize = int("slot");
    kernel -> Option<String> = optional_string("kernel");
    kv_cache -> String = string("kv_cache");
    scale -> f64 = float("scale");
    bytes -> usize = int("bytes");
    max_bytes -> u64 = int("max_bytes");
    reps -> usize = int("reps");
    layer -> usize = int("layer");
    projection_name -> String = string("name");
    first -> i64 = int("first");
    temperature -> f64 = float("temperature");
    top_k -> i64 = int("top_k");
    top_p -> f64 = float("top_p");
    min_p -> f64 = float("min_p");
    repetition_penalty -> f64 = float("repetition_penalty");
    seed -> u64 = int("seed");
    vocab_size -> usize = int("vocab_size");
    hidden_size -> usize = int("hidden_size");
    intermediate_size -> usize = int("intermediate_size");
    num_hidden_layers -> usize = int("num_hidden_layers");
    num_attention_heads -> usize = int("num_attention_heads");
    num_key_value_heads -> usize = int("num_key_value_heads");
    rope_theta -> f64 = float("rope_theta");
    rms_norm_eps -> f64 = float("rms_norm_eps");
    max_position_embeddings -> usize = int("max_position_embeddings");
    head_dim -> Option<usize> = optional_int("head_dim");
    linear_class -> String = string("linear_class");
    tie_word_embeddings -> bool = boolean("tie_word_embeddings");
    head -> String = string("head");
    quantization_mode -> String = string("quantization_mode");
}
