"""Packed-ternary matrix kernels.

>>> import numpy as np, trit
>>> w = np.array([[1, 0, -1], [0, 1, 1]], dtype=np.int8)
>>> m = trit.kernels.TernaryMatrix.pack(w, 0.5)
>>> m.matmul(np.array([1.0, 2.0, 3.0], dtype=np.float32)).round(2)
array([-1. ,  2.5], dtype=float32)

`matmul` quantizes each token of x to int8 (per-token absmax, as BitNet b1.58
does), multiplies exactly in integers, and rescales:
``y[t, n] = (sum_k q[t, k] * W[n, k]) / s[t] * scale``.

The kernel path (scalar, avx2, avx512bw, avx512vnni, neon) is the best this CPU
supports, or the one named by the environment variable ``TRIT_KERNEL``
(``avx512`` names the best AVX-512 path: avx512vnni where the CPU has VNNI). It
governs every SIMD routine (matmuls, output head, attention, KV cache
conversions); ``scalar`` runs none. The thread count is ``TRIT_NUM_THREADS`` or
the number of physical cores.
"""

from __future__ import annotations

from trit._core import (
    TernaryMatrix,
    active_kernel,
    available_kernels,
    default_threads,
    quantize_activations,
)


def available() -> list[str]:
    """Names of the kernel paths this CPU can run, most portable first."""
    return available_kernels()


def active() -> str:
    """Name of the kernel path in use."""
    return active_kernel()


__all__ = [
    "TernaryMatrix",
    "active",
    "available",
    "default_threads",
    "quantize_activations",
]
