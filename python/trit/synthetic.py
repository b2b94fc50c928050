"""Synthetic checkpoints with the exact shapes of published ternary models.

`trit bench --synthetic NAME` measures a machine without downloading
anything: it writes, once, a checkpoint in the published
microsoft/bitnet-b1.58-2B-4T format (U8-packed ternary weights with a
`weight_scale`, BF16 embeddings and norms) filled with random values, and
loads it through the same loader real checkpoints take.

Every synthetic model uses the 2B4T block (relu² GLU, sub-norms); the other
names borrow only their published dimensions, which is what speed depends on.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np


@dataclass(frozen=True)
class Shape:
    """The dimensions of a published model."""

    source: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    max_positions: int = 4096

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


SHAPES = {
    "2b4t": Shape("microsoft/bitnet-b1.58-2B-4T", 2560, 6912, 30, 20, 5, 128256, True),
    "large": Shape("1bitLLM/bitnet_b1_58-large", 1536, 4096, 24, 16, 16, 32002, False, 2048),
    "3b": Shape("1bitLLM/bitnet_b1_58-3B", 3200, 8640, 26, 32, 32, 32002, False, 2048),
    "8b": Shape("HF1BitLLM/Llama3-8B-1.58-100B-tokens", 4096, 14336, 32, 32, 8, 128256, False),
}

# Version of the files this module writes: bump it when their content changes.
FORMAT_VERSION = 1

# The 81 bytes whose four 2-bit fields are all valid codes (0, 1, 2 = -1, 0, +1).
_VALID_BYTES = np.array(
    [
        a | b << 2 | c << 4 | d << 6
        for a in range(3)
        for b in range(3)
        for c in range(3)
        for d in range(3)
    ],
    dtype=np.uint8,
)
_BF16_ONE = 0x3F80  # 1.0
_CHUNK = 1 << 24  # elements generated at a time: bounds the writer's memory


def cache_dir() -> Path:
    """Where synthetic checkpoints live: $TRIT_CACHE, else ~/.cache/trit."""
    root = (
        os.environ.get("TRIT_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "trit"
    )
    return Path(root) / "synthetic"


def config(shape: Shape) -> dict[str, object]:
    """config.json of the synthetic model, in the 2B4T layout."""
    return {
        "architectures": ["BitNetForCausalLM"],
        "model_type": "bitnet",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "vocab_size": shape.vocab,
        "hidden_act": "relu2",
        "max_position_embeddings": shape.max_positions,
        "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "tie_word_embeddings": shape.tied,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "torch_dtype": "bfloat16",
        "quantization_config": {
            "quant_method": "bitnet",
            "linear_class": "autobitlinear",
            "quantization_mode": "offline",
        },
        "trit_synthetic": {"source": shape.source, "format_version": FORMAT_VERSION},
    }


def _tensors(shape: Shape) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype, shape) of every tensor, in file order."""
    h, f, kv = shape.hidden, shape.intermediate, shape.kv_heads * shape.head_dim
    q = shape.heads * shape.head_dim
    out: list[tuple[str, str, tuple[int, ...]]] = [
        ("model.embed_tokens.weight", "BF16", (shape.vocab, h))
    ]
    for layer in range(shape.layers):
        p = f"model.layers.{layer}."
        out.append((p + "input_layernorm.weight", "BF16", (h,)))
        out.append((p + "post_attention_layernorm.weight", "BF16", (h,)))
        out.append((p + "self_attn.attn_sub_norm.weight", "BF16", (q,)))
        out.append((p + "mlp.ffn_sub_norm.weight", "BF16", (f,)))
        projections = [
            ("self_attn.q_proj", q, h),
            ("self_attn.k_proj", kv, h),
            ("self_attn.v_proj", kv, h),
            ("self_attn.o_proj", h, q),
            ("mlp.gate_proj", f, h),
            ("mlp.up_proj", f, h),
            ("mlp.down_proj", h, f),
        ]
        for name, n_out, n_in in projections:
            # HF packing: four output rows per byte, so [n_out / 4, n_in].
            out.append((p + name + ".weight", "U8", (n_out // 4, n_in)))
            out.append((p + name + ".weight_scale", "BF16", (1,)))
    out.append(("model.norm.weight", "BF16", (h,)))
    if not shape.tied:
        out.append(("lm_head.weight", "BF16", (shape.vocab, h)))
    return out


_SIZES = {"BF16": 2, "U8": 1}


def _write_tensor(
    file: BinaryIO, name: str, dtype: str, dims: tuple[int, ...], rng: np.random.Generator
) -> None:
    count = int(np.prod(dims))
    if name.endswith("weight_scale"):
        # mean|W| of a real 2B4T projection is about 1.5; any positive value will do.
        file.write(np.array([0x3FC0], dtype="<u2").tobytes())  # 1.5
    elif dtype == "U8":
        for start in range(0, count, _CHUNK):
            n = min(_CHUNK, count - start)
            file.write(_VALID_BYTES[rng.integers(0, len(_VALID_BYTES), n)].tobytes())
    elif len(dims) == 1:
        file.write(np.full(count, _BF16_ONE, dtype="<u2").tobytes())  # norm weights
    else:
        for start in range(0, count, _CHUNK):
            n = min(_CHUNK, count - start)
            values = rng.standard_normal(n, dtype=np.float32)
            file.write((values.view(np.uint32) >> 16).astype("<u2").tobytes())  # truncate to bf16


def write(shape: Shape, folder: Path, *, seed: int = 0) -> None:
    """Writes config.json and model.safetensors of `shape` into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    tensors = _tensors(shape)
    for name, dtype, dims in tensors:
        size = int(np.prod(dims)) * _SIZES[dtype]
        header[name] = {
            "dtype": dtype,
            "shape": list(dims),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header to 8 bytes
    rng = np.random.default_rng(seed)
    partial = folder / "model.safetensors.partial"
    with open(partial, "wb") as file:
        file.write(struct.pack("<Q", len(blob)))
        file.write(blob)
        for name, dtype, dims in tensors:
            _write_tensor(file, name, dtype, dims, rng)
    partial.replace(folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config(shape), indent=2) + "\n")


def ensure(name: str, *, root: Path | None = None) -> Path:
    """The folder of synthetic model `name`, written first if missing or stale."""
    if name not in SHAPES:
        raise ValueError(f"unknown synthetic model {name!r}; expected one of {', '.join(SHAPES)}")
    folder = (root or cache_dir()) / name
    expected = config(SHAPES[name])
    config_path = folder / "config.json"
    if config_path.is_file() and (folder / "model.safetensors").is_file():
        try:
            if json.loads(config_path.read_text()) == expected:
                return folder
        except (OSError, ValueError):
            pass
    write(SHAPES[name], folder)
    return folder
