//! GGUF metadata for Python (the tokenizer is built there from it).

use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use super::IntoPyResult;
use crate::checkpoint::gguf::{builder_name, read_metadata, MetaArray, MetaValue, Number};
use crate::checkpoint::{Checkpoint, GgufCheckpoint};
use crate::error::TritError;

fn number<'py>(py: Python<'py>, n: Number) -> PyResult<Bound<'py, PyAny>> {
    Ok(match n {
        Number::Int(v) => v.into_pyobject(py)?.into_any(),
        Number::Float(v) => v.into_pyobject(py)?.into_any(),
        Number::Bool(v) => pyo3::types::PyBool::new(py, v).to_owned().into_any(),
    })
}

fn array<'py>(py: Python<'py>, a: &MetaArray, file: &[u8]) -> PyResult<Bound<'py, PyAny>> {
    let list = PyList::empty(py);
    match a {
        MetaArray::Numbers { .. } => {
            for n in a.numbers(file).unwrap_or_default() {
                list.append(number(py, n)?)?;
            }
        }
        MetaArray::Strings(strings) => {
            for s in strings {
                list.append(s)?;
            }
        }
        MetaArray::Arrays(arrays) => {
            for inner in arrays {
                list.append(array(py, inner, file)?)?;
            }
        }
    }
    Ok(list.into_any())
}

/// Every metadata key of the GGUF file at `path` with its value: numbers as
/// int, float or bool, strings as str, arrays as lists.
#[pyfunction]
pub fn gguf_metadata(py: Python<'_>, path: PathBuf) -> PyResult<Bound<'_, PyDict>> {
    let (file, entries) = py.detach(|| read_metadata(&path)).py()?;
    let dict = PyDict::new(py);
    for (key, value) in &entries {
        let v = match value {
            MetaValue::Number(_, n) => number(py, *n)?,
            MetaValue::String(s) => s.into_pyobject(py)?.into_any(),
            MetaValue::Array(a) => array(py, a, file.bytes())?,
        };
        dict.set_item(key, v)?;
    }
    Ok(dict)
}

/// The values of float tensor `name` (its GGUF name) of the GGUF file at
/// `path`, widened to f32; None when the file has no such tensor. For small
/// tensors the writer copies (`rope_freqs.weight`); a tensor of another type
/// is an InvalidInputError naming it.
#[pyfunction]
pub fn gguf_float_tensor(
    py: Python<'_>,
    path: PathBuf,
    name: String,
) -> PyResult<Option<Vec<f32>>> {
    py.detach(|| -> crate::error::Result<Option<Vec<f32>>> {
        let checkpoint = GgufCheckpoint::open(&path)?;
        let key = builder_name(&name);
        match checkpoint.tensor(&key) {
            Some(t) => Ok(Some(t.to_f32(&name)?)),
            None if checkpoint.shape(&key).is_some() => Err(TritError::invalid(format!(
                "{}: tensor {name:?} is not a float tensor",
                path.display()
            ))),
            None => Ok(None),
        }
    })
    .py()
}
