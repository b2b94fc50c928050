//! The PyO3 binding layer: converts and validates arguments, runs the engine
//! with the GIL released, and maps engine errors to Python exceptions. No
//! arithmetic lives here.

use std::path::PathBuf;

use numpy::{
    dtype, IntoPyArray, PyArrayDescrMethods, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn,
    PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyException, PyMemoryError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};

use crate::checkpoint;
use crate::error::TritError;
use crate::kernels::{self, Kernel, QuantizedActivations};
use crate::memory::{try_reserve_total, try_zeroed};
use crate::threads;

mod args;
mod gguf;
mod model;

// ---------------------------------------------------------------- exceptions

static TRIT_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static INVALID_INPUT_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static KERNEL_UNAVAILABLE_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static OUT_OF_MEMORY_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();

/// Makes `class name(*bases)` with a docstring, as the `class` statement would.
fn new_exception<'py>(
    py: Python<'py>,
    name: &str,
    bases: &[Bound<'py, PyAny>],
    doc: &str,
) -> PyResult<Bound<'py, PyType>> {
    let namespace = PyDict::new(py);
    namespace.set_item("__doc__", doc)?;
    namespace.set_item("__module__", "trit._core")?;
    let class = py
        .get_type::<PyType>()
        .call1((name, PyTuple::new(py, bases)?, namespace))?;
    Ok(class.cast_into::<PyType>()?)
}

fn add_exceptions(py: Python<'_>, m: &Bound<'_, PyModule>) -> PyResult<()> {
    let base = new_exception(
        py,
        "TritError",
        &[py.get_type::<PyException>().into_any()],
        "Base class of every error trit raises.",
    )?;
    let invalid = new_exception(
        py,
        "InvalidInputError",
        &[
            base.clone().into_any(),
            py.get_type::<PyValueError>().into_any(),
        ],
        "The input is at fault: a wrong shape, dtype or value, a malformed file.",
    )?;
    let unavailable = new_exception(
        py,
        "KernelUnavailableError",
        &[
            base.clone().into_any(),
            py.get_type::<PyRuntimeError>().into_any(),
        ],
        "The requested kernel path cannot run on this CPU.",
    )?;
    let out_of_memory = new_exception(
        py,
        "OutOfMemoryError",
        &[
            base.clone().into_any(),
            py.get_type::<PyMemoryError>().into_any(),
        ],
        "A buffer the input asks for does not fit this machine's memory \
         (a smaller n_ctx or array would).",
    )?;
    m.add("TritError", &base)?;
    m.add("InvalidInputError", &invalid)?;
    m.add("KernelUnavailableError", &unavailable)?;
    m.add("OutOfMemoryError", &out_of_memory)?;
    let _ = TRIT_ERROR.set(py, base.unbind());
    let _ = INVALID_INPUT_ERROR.set(py, invalid.unbind());
    let _ = KERNEL_UNAVAILABLE_ERROR.set(py, unavailable.unbind());
    let _ = OUT_OF_MEMORY_ERROR.set(py, out_of_memory.unbind());
    Ok(())
}

fn to_py_err(err: TritError) -> PyErr {
    Python::attach(|py| {
        let class = match &err {
            TritError::InvalidInput(_) => &INVALID_INPUT_ERROR,
            TritError::KernelUnavailable(_) => &KERNEL_UNAVAILABLE_ERROR,
            TritError::OutOfMemory(_) => &OUT_OF_MEMORY_ERROR,
        };
        match class.get(py) {
            Some(class) => PyErr::from_type(class.bind(py).clone(), err.to_string()),
            None => PyRuntimeError::new_err(err.to_string()),
        }
    })
}

/// The error for an object (`what`) that another thread is using now.
fn busy(what: &str) -> PyErr {
    let msg = format!(
        "this {what} is in use by another thread; give each thread its own {what}, \
         or hold a lock around its calls"
    );
    Python::attach(|py| match TRIT_ERROR.get(py) {
        Some(class) => PyErr::from_type(class.bind(py).clone(), msg),
        None => PyRuntimeError::new_err(msg),
    })
}

fn invalid(msg: impl Into<String>) -> PyErr {
    to_py_err(TritError::invalid(msg))
}

trait IntoPyResult<T> {
    fn py(self) -> PyResult<T>;
}

impl<T> IntoPyResult<T> for Result<T, TritError> {
    fn py(self) -> PyResult<T> {
        self.map_err(to_py_err)
    }
}

// ---------------------------------------------------------------- arrays

/// Checks that `obj` is a numpy array of dtype T with 1 or 2 dimensions, none
/// empty, and copies it out in C order (any strides accepted).
/// Returns (values, shape).
fn read_array<T: numpy::Element + Copy>(
    obj: &Bound<'_, PyAny>,
    what: &str,
    dtype_name: &str,
) -> PyResult<(Vec<T>, Vec<usize>)> {
    let py = obj.py();
    let array = obj.cast::<PyUntypedArray>().map_err(|_| {
        invalid(format!(
            "{what} must be a numpy array of {dtype_name}, got {}",
            type_name(obj)
        ))
    })?;
    if !array.dtype().is_equiv_to(&dtype::<T>(py)) {
        return Err(invalid(format!(
            "{what} must have dtype {dtype_name}, got {}",
            array.dtype().str()?
        )));
    }
    let shape = array.shape().to_vec();
    if !(1..=2).contains(&shape.len()) {
        return Err(invalid(format!(
            "{what} must be 1-D or 2-D, got shape {shape:?}"
        )));
    }
    if shape.contains(&0) {
        return Err(invalid(format!(
            "{what} has an empty dimension: shape {shape:?}"
        )));
    }
    let readonly: PyReadonlyArrayDyn<'_, T> = obj.extract()?;
    let view = readonly.as_array();
    // numpy keeps every array's element count addressable, but a broadcast
    // view has it without the memory: the copy is allocated fallibly.
    let mut values = Vec::new();
    try_reserve_total(
        &mut values,
        view.len(),
        &format!("a copy of {what} {shape:?}"),
    )
    .py()?;
    // ndarray's as_slice is Some only in C order; any other layout (Fortran, strided)
    // is copied element by element in logical order.
    match view.as_slice() {
        Some(slice) => values.extend_from_slice(slice),
        None => values.extend(view.iter().copied()),
    }
    Ok((values, shape))
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

/// Rows and columns of a 1-D (one row) or 2-D shape.
fn rows_cols(shape: &[usize]) -> (usize, usize) {
    match shape {
        [n] => (1, *n),
        [m, n] => (*m, *n),
        _ => unreachable!("read_array admits 1-D and 2-D only"),
    }
}

fn kernel_arg(kernel: Option<&str>) -> PyResult<Kernel> {
    match kernel {
        Some(name) => Kernel::parse(name).and_then(Kernel::require).py(),
        None => Kernel::active().py(),
    }
}

// ---------------------------------------------------------------- TernaryMatrix

/// A ternary weight matrix W[n_out, n_in] in {-1, 0, 1}, packed 2 bits per
/// weight (or 1.625 or 1.6: `packing`), with one float32 scale: the real weights are W * scale.
#[pyclass(name = "TernaryMatrix", module = "trit._core", frozen)]
struct PyTernaryMatrix {
    inner: kernels::TernaryMatrix,
}

#[pymethods]
impl PyTernaryMatrix {
    /// Packs `w` (int8 [n_out, n_in], values in {-1, 0, 1}) with `scale`,
    /// 2 bits per weight ("i2"), 1.625 ("tq1") or 1.6 ("tl").
    #[staticmethod]
    #[pyo3(signature = (w, scale, *, packing=kernels::Packing::I2))]
    #[pyo3(text_signature = "(w, scale, *, packing='i2')")]
    fn pack(
        py: Python<'_>,
        w: &Bound<'_, PyAny>,
        #[pyo3(from_py_with = args::scale)] scale: f64,
        #[pyo3(from_py_with = args::packing)] packing: kernels::Packing,
    ) -> PyResult<Self> {
        let (values, shape) = read_array::<i8>(w, "w", "int8")?;
        if shape.len() != 2 {
            return Err(invalid(format!(
                "w must be 2-D [n_out, n_in], got shape {shape:?}"
            )));
        }
        let scale = scale as f32;
        if !scale.is_finite() {
            return Err(invalid(format!(
                "scale must be a finite float32, got {scale}"
            )));
        }
        let inner = py
            .detach(|| {
                kernels::TernaryMatrix::pack(&values, shape[0], shape[1], scale)?.repacked(packing)
            })
            .py()?;
        Ok(PyTernaryMatrix { inner })
    }

    /// (n_out, n_in)
    #[getter]
    fn shape(&self) -> (usize, usize) {
        (self.inner.n_out(), self.inner.n_in())
    }

    #[getter]
    fn scale(&self) -> f32 {
        self.inner.scale()
    }

    /// How the weights are stored: "i2" or "tq1".
    #[getter]
    fn packing(&self) -> &'static str {
        self.inner.packing().name()
    }

    /// Bytes of packed weights.
    #[getter]
    fn nbytes(&self) -> usize {
        self.inner.packed_bytes()
    }

    /// The weights as int8 [n_out, n_in].
    fn unpack<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArrayDyn<i8>>> {
        let values = py.detach(|| self.inner.try_unpack()).py()?;
        values
            .into_pyarray(py)
            .reshape(vec![self.inner.n_out(), self.inner.n_in()])
    }

    /// y = quantize(x) @ W.T * scale, with x float32 [n_in] or [m, n_in];
    /// returns float32 [n_out] or [m, n_out].
    #[pyo3(signature = (x, *, kernel=None, threads=None))]
    fn matmul<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        #[pyo3(from_py_with = args::kernel)] kernel: Option<String>,
        #[pyo3(from_py_with = args::threads)] threads: Option<usize>,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let (values, shape) = read_array::<f32>(x, "x", "float32")?;
        let (m, k) = rows_cols(&shape);
        if k != self.inner.n_in() {
            return Err(invalid(format!(
                "x has {k} features in its last dimension but the matrix takes {} inputs",
                self.inner.n_in()
            )));
        }
        let kernel = kernel_arg(kernel.as_deref())?;
        let pool = threads::pool(threads).py()?;
        let n_out = self.inner.n_out();
        let y = py
            .detach(|| {
                let qa = QuantizedActivations::quantize(&values, m, k)?;
                // m rows of x (a broadcast view can have many) times n_out;
                // a product past usize is refused by try_zeroed as too large.
                let len = m.saturating_mul(n_out);
                let mut y = try_zeroed(len, &format!("the output [{m}, {n_out}]"))?;
                kernels::matmul_into(&self.inner, &qa, &mut y, kernel, &pool)?;
                Ok(y)
            })
            .py()?;
        let out_shape = if shape.len() == 1 {
            vec![self.inner.n_out()]
        } else {
            vec![m, self.inner.n_out()]
        };
        y.into_pyarray(py).reshape(out_shape)
    }

    fn __repr__(&self) -> String {
        format!(
            "TernaryMatrix(shape=({}, {}), scale={})",
            self.inner.n_out(),
            self.inner.n_in(),
            self.inner.scale()
        )
    }
}

// ---------------------------------------------------------------- functions

/// (codes, per-token multipliers)
type QuantizedPair<'py> = (Bound<'py, PyArrayDyn<i8>>, Bound<'py, PyArrayDyn<f32>>);

/// Per-token absmax int8 quantization of float32 x ([n] or [m, n]): returns
/// (q int8 of x's shape, s float32 [m]) with x ≈ q / s.
#[pyfunction]
fn quantize_activations<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
) -> PyResult<QuantizedPair<'py>> {
    let (values, shape) = read_array::<f32>(x, "x", "float32")?;
    let (m, k) = rows_cols(&shape);
    let qa = py
        .detach(|| QuantizedActivations::quantize(&values, m, k))
        .py()?;
    let mut codes = Vec::new(); // [m, k]
    try_reserve_total(&mut codes, values.len(), "the quantized codes").py()?;
    for t in 0..m {
        codes.extend_from_slice(&qa.token(t)[..k]);
    }
    let q = codes.into_pyarray(py).reshape(shape)?;
    let s = qa.scales().to_vec().into_pyarray(py).reshape(vec![m])?;
    Ok((q, s))
}

/// Checks, before anything opens it, that `path` is a regular file of at
/// most `max_bytes` bytes that resolves inside its model folder (for a
/// Hugging Face cache snapshot, inside its repo's folder); returns its size.
#[pyfunction]
fn check_model_file(
    py: Python<'_>,
    path: PathBuf,
    #[pyo3(from_py_with = args::max_bytes)] max_bytes: u64,
) -> PyResult<u64> {
    py.detach(|| checkpoint::files::check_model_file(&path, max_bytes))
        .py()
}

/// Names of the kernel paths this CPU can run, most portable first.
#[pyfunction]
fn available_kernels() -> Vec<&'static str> {
    Kernel::supported().into_iter().map(Kernel::name).collect()
}

/// Name of the kernel path in use (TRIT_KERNEL, or the best available).
#[pyfunction]
fn active_kernel() -> PyResult<&'static str> {
    Kernel::active().map(Kernel::name).py()
}

/// The default number of threads (TRIT_NUM_THREADS, or the physical cores).
#[pyfunction]
fn default_threads() -> PyResult<usize> {
    threads::default_threads().py()
}

/// The machine's streaming read bandwidth in GB/s: the median of `reps`
/// passes summing a buffer of `bytes` with `threads` threads.
#[pyfunction]
#[pyo3(signature = (bytes, threads=None, reps=5))]
fn read_bandwidth(
    py: Python<'_>,
    #[pyo3(from_py_with = args::bytes)] bytes: usize,
    #[pyo3(from_py_with = args::threads)] threads: Option<usize>,
    #[pyo3(from_py_with = args::reps)] reps: usize,
) -> PyResult<f64> {
    py.detach(|| crate::bandwidth::read_bandwidth(bytes, threads, reps))
        .py()
}

#[pymodule]
fn _core(py: Python<'_>, m: &Bound<'_, PyModule>) -> PyResult<()> {
    add_exceptions(py, m)?;
    m.add_class::<PyTernaryMatrix>()?;
    m.add_class::<model::PyModelConfig>()?;
    m.add_class::<model::PyModel>()?;
    m.add_class::<model::PySession>()?;
    m.add_class::<model::PyEngine>()?;
    m.add_class::<model::PySampler>()?;
    m.add_function(wrap_pyfunction!(quantize_activations, m)?)?;
    m.add_function(wrap_pyfunction!(available_kernels, m)?)?;
    m.add_function(wrap_pyfunction!(active_kernel, m)?)?;
    m.add_function(wrap_pyfunction!(default_threads, m)?)?;
    m.add_function(wrap_pyfunction!(read_bandwidth, m)?)?;
    m.add_function(wrap_pyfunction!(check_model_file, m)?)?;
    m.add("MAX_JSON_BYTES", checkpoint::files::MAX_JSON_BYTES)?;
    m.add(
        "MAX_TOKENIZER_BYTES",
        checkpoint::files::MAX_TOKENIZER_BYTES,
    )?;
    m.add_function(wrap_pyfunction!(gguf::gguf_metadata, m)?)?;
    m.add_function(wrap_pyfunction!(gguf::gguf_float_tensor, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
