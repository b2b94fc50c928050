"""trit.kernels against numpy references of the same formulas, and every kernel path
against the scalar one, bit for bit."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import trit
from trit.kernels import TernaryMatrix, quantize_activations

KERNELS = trit.kernels.available()
ALL_KERNELS = ("scalar", "avx2", "avx512bw", "avx512vnni", "neon")


def numpy_quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """BitNet b1.58 per-token absmax quantization, as transformers computes it in float32."""
    x2 = np.atleast_2d(x).astype(np.float32)
    absmax = np.abs(x2).max(axis=1)
    s = np.float32(127.0) / np.maximum(absmax, np.float32(1e-5))
    q = np.clip(np.rint(x2 * s[:, None]), -128, 127).astype(np.int8)
    return q.reshape(x.shape), s


def numpy_matmul(w: np.ndarray, scale: float, x: np.ndarray) -> np.ndarray:
    q, s = numpy_quantize(x)
    dots = np.atleast_2d(q).astype(np.int64) @ w.astype(np.int64).T
    y = dots.astype(np.float32) / s[:, None] * np.float32(scale)
    return y.reshape(x.shape[:-1] + (w.shape[0],))


def random_case(seed: int, n_out: int, n_in: int, m: int | None):
    rng = np.random.default_rng(seed)
    w = rng.integers(-1, 2, size=(n_out, n_in), dtype=np.int8)
    shape = (n_in,) if m is None else (m, n_in)
    x = (rng.standard_normal(shape) * rng.uniform(0.01, 10)).astype(np.float32)
    return w, x


# Sizes off every block boundary: the packing block is 256, kernel tiles 3/4 rows, 32/64 bytes.
dims = st.one_of(st.integers(1, 70), st.sampled_from([255, 256, 257, 511, 513, 767, 1000, 1025]))


@settings(max_examples=60, deadline=None)
@given(n_out=dims, n_in=dims, seed=st.integers(0, 2**32 - 1))
def test_pack_unpack_round_trip(n_out: int, n_in: int, seed: int) -> None:
    w, _ = random_case(seed, n_out, n_in, None)
    m = TernaryMatrix.pack(w, 1.5)
    assert m.shape == (n_out, n_in)
    assert m.scale == 1.5
    assert m.nbytes == n_out * ((n_in + 255) // 256) * 64
    np.testing.assert_array_equal(m.unpack(), w)


@settings(max_examples=60, deadline=None)
@given(n_out=dims, n_in=dims, m=st.integers(1, 70), seed=st.integers(0, 2**32 - 1))
def test_every_kernel_matches_scalar_and_numpy(n_out: int, n_in: int, m: int, seed: int) -> None:
    w, x = random_case(seed, n_out, n_in, m)
    matrix = TernaryMatrix.pack(w, 0.37)
    expected = numpy_matmul(w, 0.37, x)
    scalar = matrix.matmul(x, kernel="scalar")
    # Integer accumulation is exact and the float epilogue is shared: same bits.
    np.testing.assert_array_equal(scalar.view(np.uint32), expected.view(np.uint32))
    for kernel in KERNELS:
        y = matrix.matmul(x, kernel=kernel, threads=2)
        np.testing.assert_array_equal(y.view(np.uint32), scalar.view(np.uint32), err_msg=kernel)


def assert_every_path_matches(matrix: TernaryMatrix, w: np.ndarray, x: np.ndarray) -> None:
    """`matrix` (holding the weights `w`, scale 0.37) times the tokens `x` on
    every path, and times one token, in the bits of the 2-bit product's
    definition (several tokens: the GEMM; one: the GEMV or the lookups)."""
    expected = numpy_matmul(w, 0.37, x)
    for kernel in KERNELS:
        for xs, want in ((x, expected), (x[0], expected[0])):
            y = matrix.matmul(xs, kernel=kernel, threads=2)
            np.testing.assert_array_equal(y.view(np.uint32), want.view(np.uint32), err_msg=kernel)


@settings(max_examples=40, deadline=None)
@given(n_out=dims, n_in=dims, m=st.integers(1, 40), seed=st.integers(0, 2**32 - 1))
def test_tq1_packing_gives_the_same_bits(n_out: int, n_in: int, m: int, seed: int) -> None:
    """1.625 bits per weight: the same weights, 52 bytes per 256 instead of 64,
    and every path's product the same bits as the 2-bit matrix's (one token:
    the GEMV; several: the GEMM)."""
    w, x = random_case(seed, n_out, n_in, m)
    i2, tq1 = TernaryMatrix.pack(w, 0.37), TernaryMatrix.pack(w, 0.37, packing="tq1")
    assert (i2.packing, tq1.packing) == ("i2", "tq1")
    assert tq1.nbytes == n_out * ((n_in + 255) // 256) * 52
    np.testing.assert_array_equal(tq1.unpack(), w)
    assert_every_path_matches(tq1, w, x)


@settings(max_examples=40, deadline=None)
@given(n_out=dims, n_in=dims, m=st.integers(1, 40), seed=st.integers(0, 2**32 - 1))
def test_tl_packing_gives_the_same_bits(n_out: int, n_in: int, m: int, seed: int) -> None:
    """1.6 bits per weight in tiles of 64 rows: the same weights, 64 bytes per
    5 weights of 64 rows, and every path's product the same bits as the 2-bit
    matrix's (one token: the table lookups; several: the GEMM)."""
    w, x = random_case(seed, n_out, n_in, m)
    tl = TernaryMatrix.pack(w, 0.37, packing="tl")
    assert tl.packing == "tl"
    assert tl.nbytes == -(-n_out // 64) * -(-n_in // 5) * 64
    np.testing.assert_array_equal(tl.unpack(), w)
    assert_every_path_matches(tl, w, x)


def test_pack_rejects_an_unknown_packing() -> None:
    w = np.zeros((2, 3), dtype=np.int8)
    with pytest.raises(trit.InvalidInputError, match='unknown packing "i3"'):
        TernaryMatrix.pack(w, 1.0, packing="i3")
    with pytest.raises(trit.InvalidInputError, match="packing"):
        TernaryMatrix.pack(w, 1.0, packing=2)  # type: ignore[arg-type]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("n_out,n_in", [(640, 2560), (1728, 2560), (256, 6912)])
def test_model_shapes(kernel: str, n_out: int, n_in: int) -> None:
    w, x = random_case(n_out + n_in, n_out, n_in, 9)
    matrix = TernaryMatrix.pack(w, 1.25)
    expected = numpy_matmul(w, 1.25, x)
    np.testing.assert_array_equal(matrix.matmul(x, kernel=kernel), expected)
    np.testing.assert_array_equal(matrix.matmul(x[3], kernel=kernel), expected[3])


def test_matmul_close_to_float_reference() -> None:
    # The quantized product approximates the float one: error bounded by int8 rounding.
    w, x = random_case(7, 300, 700, 5)
    y = TernaryMatrix.pack(w, 0.5).matmul(x)
    exact = x.astype(np.float64) @ w.T.astype(np.float64) * 0.5
    bound = 0.5 * np.abs(x).max(axis=1, keepdims=True) / 127 * np.abs(w).sum(axis=1) * 0.5
    assert np.all(np.abs(y - exact) <= bound + 1e-4)


@settings(max_examples=100, deadline=None)
@given(m=st.integers(1, 8), n=st.integers(1, 600), seed=st.integers(0, 2**32 - 1))
def test_quantize_activations_matches_numpy(m: int, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((m, n)) * 10 ** rng.uniform(-6, 3)).astype(np.float32)
    q, s = quantize_activations(x)
    q_ref, s_ref = numpy_quantize(x)
    np.testing.assert_array_equal(q, q_ref)
    np.testing.assert_array_equal(s, s_ref)


def test_quantize_ties_and_edges() -> None:
    # 0.5*127 = 63.5 rounds to even (64); the absmax maps to ±127; an all-zero row uses the floor.
    x = np.array([[0.5, -1.0, 0.25, 1.5 / 127], [0.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    q, s = quantize_activations(x)
    q_ref, s_ref = numpy_quantize(x)
    np.testing.assert_array_equal(q, q_ref)
    np.testing.assert_array_equal(s, s_ref)
    assert q[0, 0] == 64 and q[0, 3] == 2
    q, _ = quantize_activations(np.array([-1.004, 1.0], dtype=np.float32))
    assert q.tolist() == [-127, 126]
    q, s = quantize_activations(np.array([3.0], dtype=np.float32))
    assert q.shape == (1,) and s.shape == (1,)


def test_non_contiguous_input() -> None:
    w, x = random_case(3, 33, 70, 6)
    matrix = TernaryMatrix.pack(np.asfortranarray(w), 1.0)
    np.testing.assert_array_equal(matrix.unpack(), w)
    wide = np.repeat(x, 2, axis=1)  # every column twice; [:, ::2] is x with stride 2
    strided = wide[:, ::2]
    assert not strided.flags.c_contiguous
    np.testing.assert_array_equal(matrix.matmul(strided), matrix.matmul(x))
    np.testing.assert_array_equal(matrix.matmul(np.asfortranarray(x)), matrix.matmul(x))
    np.testing.assert_array_equal(quantize_activations(strided)[0], quantize_activations(x)[0])


def test_threads_give_the_same_result() -> None:
    w, x = random_case(5, 1000, 900, 17)
    matrix = TernaryMatrix.pack(w, 1.0)
    base = matrix.matmul(x, threads=1)
    for threads in (2, 3, 8):
        np.testing.assert_array_equal(matrix.matmul(x, threads=threads), base)
        np.testing.assert_array_equal(matrix.matmul(x[0], threads=threads), base[0])


@pytest.mark.parametrize(
    "w,message",
    [
        (np.zeros((2, 3), dtype=np.float32), "dtype int8"),
        (np.zeros((2, 3), dtype=np.int16), "dtype int8"),
        (np.zeros(3, dtype=np.int8), "2-D"),
        (np.zeros((2, 3, 4), dtype=np.int8), "1-D or 2-D"),
        (np.zeros((0, 3), dtype=np.int8), "empty"),
        (np.zeros((2, 0), dtype=np.int8), "empty"),
        (np.array([[0, 2]], dtype=np.int8), "must be -1, 0 or 1"),
        (np.array([[0, -3]], dtype=np.int8), r"weight \[0, 1\] is -3"),
        ([[0, 1]], "numpy array"),
    ],
)
def test_pack_rejects_bad_weights(w: object, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        TernaryMatrix.pack(w, 1.0)  # type: ignore[arg-type]
    assert isinstance(info.value, trit.InvalidInputError)
    assert isinstance(info.value, trit.TritError)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), 1e39])
def test_pack_rejects_bad_scale(scale: float) -> None:
    with pytest.raises(ValueError, match="scale"):
        TernaryMatrix.pack(np.zeros((1, 1), dtype=np.int8), scale)


@pytest.mark.parametrize(
    "x,message",
    [
        (np.zeros(4, dtype=np.float64), "dtype float32"),
        (np.zeros(4, dtype=np.int8), "dtype float32"),
        (np.zeros(5, dtype=np.float32), "5 features"),
        (np.zeros((2, 5), dtype=np.float32), "5 features"),
        (np.zeros((0, 4), dtype=np.float32), "empty"),
        (np.zeros((1, 1, 4), dtype=np.float32), "1-D or 2-D"),
        (np.array([0, 1, np.nan, 0], dtype=np.float32), "activation \\[0, 2\\] is NaN"),
        (np.array([[0, 1, 0, 0], [0, np.inf, 0, 0]], dtype=np.float32), "\\[1, 1\\] is inf"),
    ],
)
def test_matmul_rejects_bad_activations(x: np.ndarray, message: str) -> None:
    matrix = TernaryMatrix.pack(np.ones((3, 4), dtype=np.int8), 1.0)
    with pytest.raises(trit.InvalidInputError, match=message):
        matrix.matmul(x)


def test_quantize_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="NaN"):
        quantize_activations(np.array([np.nan], dtype=np.float32))
    with pytest.raises(ValueError, match="dtype float32"):
        quantize_activations(np.array([1.0]))


def test_bad_kernel_and_threads() -> None:
    matrix = TernaryMatrix.pack(np.ones((3, 4), dtype=np.int8), 1.0)
    x = np.ones(4, dtype=np.float32)
    with pytest.raises(ValueError, match="unknown kernel 'sse9'"):
        matrix.matmul(x, kernel="sse9")
    with pytest.raises(ValueError, match="at least 1"):
        matrix.matmul(x, threads=0)
    missing = [k for k in ALL_KERNELS if k not in KERNELS]
    for kernel in missing:
        with pytest.raises(trit.KernelUnavailableError, match="cannot run on this CPU"):
            matrix.matmul(x, kernel=kernel)


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=False,
    )


def test_trit_kernel_env_forces_a_path() -> None:
    for kernel in KERNELS:
        out = run_python("import trit; print(trit.kernels.active())", TRIT_KERNEL=kernel)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == kernel


@pytest.mark.skipif(
    not {"avx512bw", "avx512vnni"} & set(KERNELS), reason="this CPU has no AVX-512 path"
)
def test_avx512_names_the_best_avx512_path() -> None:
    out = run_python("import trit; print(trit.kernels.active())", TRIT_KERNEL="avx512")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("avx512vnni" if "avx512vnni" in KERNELS else "avx512bw")


def test_trit_kernel_env_fails_clearly() -> None:
    code = (
        "import numpy as np, trit\n"
        "m = trit.kernels.TernaryMatrix.pack(np.ones((1, 1), np.int8), 1.0)\n"
        "m.matmul(np.ones(1, np.float32))\n"
    )
    out = run_python(code, TRIT_KERNEL="bogus")
    assert out.returncode != 0
    assert "unknown kernel 'bogus'" in out.stderr
    missing = [k for k in ALL_KERNELS if k not in KERNELS]
    if missing:
        out = run_python(code, TRIT_KERNEL=missing[0])
        assert out.returncode != 0
        assert "KernelUnavailableError" in out.stderr and "cannot run on this CPU" in out.stderr


def test_thread_env_is_read() -> None:
    out = run_python("import trit; print(trit.kernels.default_threads())", TRIT_NUM_THREADS="3")
    assert out.stdout.strip() == "3", out.stderr
    out = run_python("import trit; trit.kernels.default_threads()", TRIT_NUM_THREADS="zero")
    assert "TRIT_NUM_THREADS" in out.stderr
