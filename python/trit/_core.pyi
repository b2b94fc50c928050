"""The compiled engine. Use it through `trit` and `trit.kernels`."""

from typing import final

import numpy as np
import numpy.typing as npt

__version__: str
__all__ = [
    "InvalidInputError",
    "KernelUnavailableError",
    "TernaryMatrix",
    "TritError",
    "__version__",
    "active_kernel",
    "available_kernels",
    "default_threads",
    "quantize_activations",
]

class TritError(Exception):
    """Base class of every error trit raises."""

class InvalidInputError(TritError, ValueError):
    """The input is at fault: a wrong shape, dtype or value, a malformed file."""

class KernelUnavailableError(TritError, RuntimeError):
    """The requested kernel path cannot run on this CPU."""

@final
class TernaryMatrix:
    """A ternary weight matrix W[n_out, n_in] in {-1, 0, 1}, packed 2 bits per weight,
    with one float32 scale: the real weights are W * scale."""

    @staticmethod
    def pack(w: npt.NDArray[np.int8], scale: float) -> TernaryMatrix: ...
    @property
    def shape(self) -> tuple[int, int]: ...
    @property
    def scale(self) -> float: ...
    @property
    def nbytes(self) -> int: ...
    def unpack(self) -> npt.NDArray[np.int8]: ...
    def matmul(
        self,
        x: npt.NDArray[np.float32],
        *,
        kernel: str | None = None,
        threads: int | None = None,
    ) -> npt.NDArray[np.float32]: ...

def quantize_activations(
    x: npt.NDArray[np.float32],
) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.float32]]: ...
def available_kernels() -> list[str]: ...
def active_kernel() -> str: ...
def default_threads() -> int: ...
