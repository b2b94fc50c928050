//! GGUF metadata for Python (the tokenizer is built there from it).

use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use super::IntoPyResult;
use crate::checkpoint::gguf::{read_metadata, MetaArray, MetaValue, Number};

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
