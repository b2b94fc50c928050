"""trit: fast CPU inference for ternary (BitNet b1.58) language models."""

from trit import kernels
from trit._core import (
    InvalidInputError,
    KernelUnavailableError,
    OutOfMemoryError,
    TritError,
    __version__,
)
from trit.generator import GenerationStats, Generator
from trit.sampling import SamplingOptions

__all__ = [
    "GenerationStats",
    "Generator",
    "InvalidInputError",
    "KernelUnavailableError",
    "OutOfMemoryError",
    "SamplingOptions",
    "TritError",
    "__version__",
    "kernels",
]
