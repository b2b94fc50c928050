"""trit: fast CPU inference for ternary (BitNet b1.58) language models."""

from trit import kernels
from trit._core import (
    InvalidInputError,
    KernelUnavailableError,
    TritError,
    __version__,
)

__all__ = [
    "InvalidInputError",
    "KernelUnavailableError",
    "TritError",
    "__version__",
    "kernels",
]
