"""The compiled engine. Use it through `trit` and `trit.kernels`."""

from os import PathLike
from typing import final

import numpy as np
import numpy.typing as npt

__version__: str
MAX_JSON_BYTES: int
MAX_TOKENIZER_BYTES: int
__all__ = [
    "MAX_JSON_BYTES",
    "MAX_TOKENIZER_BYTES",
    "Engine",
    "InvalidInputError",
    "KernelUnavailableError",
    "Model",
    "ModelConfig",
    "Sampler",
    "Session",
    "TernaryMatrix",
    "OutOfMemoryError",
    "TritError",
    "__version__",
    "active_kernel",
    "available_kernels",
    "check_model_file",
    "default_threads",
    "gguf_float_tensor",
    "gguf_metadata",
    "quantize_activations",
    "read_bandwidth",
]

class TritError(Exception):
    """Base class of every error trit raises."""

class InvalidInputError(TritError, ValueError):
    """The input is at fault: a wrong shape, dtype or value, a malformed file."""

class KernelUnavailableError(TritError, RuntimeError):
    """The requested kernel path cannot run on this CPU."""

class OutOfMemoryError(TritError, MemoryError):
    """A buffer the input asks for does not fit this machine's memory
    (a smaller n_ctx or array would)."""

@final
class TernaryMatrix:
    """A ternary weight matrix W[n_out, n_in] in {-1, 0, 1}, packed 2 bits per weight
    (or 1.625 or 1.6: `packing`), with one float32 scale: the real weights are W * scale."""

    @staticmethod
    def pack(w: npt.NDArray[np.int8], scale: float, *, packing: str = "i2") -> TernaryMatrix: ...
    @property
    def shape(self) -> tuple[int, int]: ...
    @property
    def packing(self) -> str: ...
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

@final
class ModelConfig:
    """The hyper-parameters of a BitNet b1.58 model."""

    def __new__(
        cls,
        *,
        vocab_size: int,
        hidden_size: int,
        intermediate_size: int,
        num_hidden_layers: int,
        num_attention_heads: int,
        num_key_value_heads: int,
        rope_theta: float,
        rms_norm_eps: float,
        max_position_embeddings: int,
        head_dim: int | None = None,
        tie_word_embeddings: bool = True,
        linear_class: str = "bitlinear",
        quantization_mode: str = "offline",
    ) -> ModelConfig: ...
    @staticmethod
    def from_file(path: str | PathLike[str]) -> ModelConfig: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def hidden_size(self) -> int: ...
    @property
    def intermediate_size(self) -> int: ...
    @property
    def num_hidden_layers(self) -> int: ...
    @property
    def num_attention_heads(self) -> int: ...
    @property
    def num_key_value_heads(self) -> int: ...
    @property
    def head_dim(self) -> int: ...
    @property
    def rope_theta(self) -> float: ...
    @property
    def rms_norm_eps(self) -> float: ...
    @property
    def max_position_embeddings(self) -> int: ...
    @property
    def tie_word_embeddings(self) -> bool: ...
    @property
    def family(self) -> str: ...
    @property
    def linear_class(self) -> str: ...
    @property
    def quantization_mode(self) -> str: ...

@final
class Model:
    """A loaded model; immutable, shared by its sessions."""

    @staticmethod
    def open(
        folder: str | PathLike[str],
        *,
        threads: int | None = None,
        head: str = "bf16",
        packing: str = "i2",
    ) -> tuple[Model, list[str]]: ...
    @staticmethod
    def load(
        config: ModelConfig,
        tensors: list[tuple[str, str, list[int], npt.NDArray[np.uint8]]],
        *,
        threads: int | None = None,
        head: str = "bf16",
        packing: str = "i2",
    ) -> tuple[Model, list[str]]: ...
    @property
    def config(self) -> ModelConfig: ...
    @property
    def packing(self) -> str: ...
    @property
    def weight_bytes(self) -> int: ...
    @property
    def bytes_per_token(self) -> int: ...
    def projection(self, layer: int, name: str) -> TernaryMatrix: ...
    def norm(self, name: str, layer: int | None = None) -> npt.NDArray[np.float32]: ...
    def dense(self, name: str) -> tuple[str, npt.NDArray[np.uint16] | npt.NDArray[np.float32]]: ...

@final
class Sampler:
    """How the next token is picked: greedy when temperature is 0."""

    def __new__(
        cls,
        *,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        seed: int = 0,
    ) -> Sampler: ...

@final
class Session:
    """One sequence on a model: KV cache for n_ctx positions and the tokens in it."""

    def __new__(
        cls,
        model: Model,
        *,
        n_ctx: int | None = None,
        threads: int | None = None,
        kv_cache: str = "auto",
    ) -> Session: ...
    @property
    def n_ctx(self) -> int: ...
    @property
    def kv_cache(self) -> str: ...
    @property
    def cache_bytes(self) -> int: ...
    @property
    def threads(self) -> int: ...
    @property
    def tokens(self) -> list[int]: ...
    @property
    def n_tokens(self) -> int: ...
    def prefill(self, ids: list[int]) -> int: ...
    def push(self, token: int) -> None: ...
    def logits(self, ids: list[int]) -> npt.NDArray[np.float32]: ...
    def nll(self, ids: list[int], first: int) -> float: ...
    def last_logits(self) -> npt.NDArray[np.float32] | None: ...
    def sample(self, sampler: Sampler) -> int: ...
    def reset(self) -> None: ...

@final
class Engine:
    """Sequences run together on one model: `slots` KV caches of n_ctx
    positions each; `step` runs one forward pass over tokens of several."""

    def __new__(
        cls,
        model: Model,
        *,
        slots: int = 1,
        n_ctx: int | None = None,
        threads: int | None = None,
        kv_cache: str = "auto",
    ) -> Engine: ...
    @property
    def n_ctx(self) -> int: ...
    @property
    def kv_cache(self) -> str: ...
    @property
    def threads(self) -> int: ...
    @property
    def slots(self) -> int: ...
    @property
    def free_slots(self) -> int: ...
    @property
    def slot_cache_bytes(self) -> int: ...
    @property
    def cache_bytes_in_use(self) -> int: ...
    def acquire(self, ids: list[int]) -> int: ...
    def release(self, slot: int) -> None: ...
    def tokens(self, slot: int) -> list[int]: ...
    def n_tokens(self, slot: int) -> int: ...
    def step(self, work: list[tuple[int, list[int], bool]]) -> None: ...
    def prefill(self, slot: int, ids: list[int]) -> int: ...
    def logits(self, slot: int, ids: list[int]) -> npt.NDArray[np.float32]: ...
    def nll(self, slot: int, ids: list[int], first: int) -> float: ...
    def last_logits(self, slot: int) -> npt.NDArray[np.float32] | None: ...
    def sample(self, slot: int, sampler: Sampler) -> int: ...
    def sample_many(self, requests: list[tuple[int, Sampler]]) -> list[int]: ...
    def reset(self, slot: int) -> None: ...

def quantize_activations(
    x: npt.NDArray[np.float32],
) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.float32]]: ...
def available_kernels() -> list[str]: ...
def active_kernel() -> str: ...
def default_threads() -> int: ...
def gguf_metadata(path: str | PathLike[str]) -> dict[str, object]: ...
def gguf_float_tensor(path: str | PathLike[str], name: str) -> list[float] | None: ...
def read_bandwidth(bytes: int, threads: int | None = None, reps: int = 5) -> float: ...
def check_model_file(path: str | PathLike[str], max_bytes: int) -> int: ...
