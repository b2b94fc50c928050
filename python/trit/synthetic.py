"""Synthetic checkpoints with the exact shapes of published ternary models.

`trit bench --synthetic NAME` measures a machine without downloading
anything: it writes, once, a checkpoint with a published model's dimensions
in its family's on-disk layout, filled with random values, and loads it
through the same loader real checkpoints take, so the speed measured is that
family's real path:

- "bitnet" (microsoft/bitnet-b1.58-2B-4T): U8-packed ternary weights with a
  `weight_scale`, relu² GLU, sub-norms, BF16 embeddings and norms.
- "llama" (Falcon3-1.58bit, Falcon-E, HF1BitLLM Llama3): `LlamaForCausalLM`
  with transformers' bitnet quantization (the same packing, `weight_scale`
  divided), SiLU GLU, no sub-norms, a BF16 head unless tied.
- "1bitllm" (1bitLLM/bitnet_b1_58-*): `BitnetForCausalLM` with float16
  master weights, ternarised at load, and its two sub-norms.

Each Shape's `source` says where its dimensions come from; docs/formats.md
("Synthetic shapes") lists which are unverified.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

FAMILIES = ("bitnet", "llama", "1bitllm")


@dataclass(frozen=True)
class Shape:
    """The dimensions of a published model, and the family whose block it uses."""

    source: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    max_positions: int = 4096
    family: str = "bitnet"
    head_size: int | None = None  # None: hidden / heads
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-05

    @property
    def head_dim(self) -> int:
        return self.head_size or self.hidden // self.heads


def _falcon3(
    source: str, hidden: int, intermediate: int, layers: int, heads: int, max_positions: int
) -> Shape:
    """Falcon3: 4 KV heads of 256, vocab 131072, untied, rope_theta 1000042, eps 1e-6."""
    return Shape(
        source, hidden, intermediate, layers, heads, 4, 131072, False, max_positions,
        family="llama", head_size=256, rope_theta=1000042.0, rms_norm_eps=1e-06,
    )  # fmt: skip


# Positional: source, hidden, intermediate, layers, heads, kv_heads, vocab, tied, max_positions.
# fmt: off
SHAPES = {
    "2b4t": Shape(
        "microsoft/bitnet-b1.58-2B-4T config.json", 2560, 6912, 30, 20, 5, 128256, True, 4096,
    ),
    "falcon3-1b": _falcon3(
        "tiiuae/Falcon3-1B-Instruct config.json (the -1.58bit repo's own config not seen)",
        2048, 8192, 18, 8, 8192,
    ),
    "falcon3-3b": _falcon3("tiiuae/Falcon3-3B-Base-1.58bit config.json", 3072, 9216, 22, 12, 4096),
    "falcon3-7b": _falcon3("tiiuae/Falcon3-7B-Base-1.58bit config.json", 3072, 23040, 28, 12, 8192),
    "falcon3-10b": _falcon3(
        "tiiuae/Falcon3-10B-Base-1.58bit config.json", 3072, 23040, 40, 12, 32768
    ),
    "falcon-e-1b": Shape(
        "tiiuae/Falcon-E-1B-Base: UNVERIFIED (24 layers from a third-party layer count; "
        "the other dimensions, the vocab and the tied head assumed)",
        2048, 8192, 24, 8, 2, 32768, True, 2048,
        family="llama", rope_theta=10000.0, rms_norm_eps=1e-06,
    ),
    "falcon-e-3b": Shape(
        "tiiuae/Falcon-E-3B-Base: UNVERIFIED (dimensions, vocab and tied head assumed)",
        2560, 10240, 32, 10, 2, 32768, True, 2048,
        family="llama", rope_theta=10000.0, rms_norm_eps=1e-06,
    ),
    "bitnet-large": Shape(
        "1bitLLM/bitnet_b1_58-large: a public copy of its config (BitBLAS's 'bitnet-base'); "
        "hidden and ffn also in bitnet.cpp's kernel shape table",
        1536, 4096, 24, 16, 16, 32002, True, 2048, family="1bitllm", rope_theta=10000.0,
    ),
    "bitnet-3b": Shape(
        "1bitLLM/bitnet_b1_58-3B: hidden and ffn from bitnet.cpp's kernel shape table; "
        "26 layers, 32 heads and the tied head UNVERIFIED",
        3200, 8640, 26, 32, 32, 32002, True, 2048, family="1bitllm", rope_theta=10000.0,
    ),
    "llama3-8b": Shape(
        "HF1BitLLM/Llama3-8B-1.58-100B-tokens: Llama 3 8B dimensions (hidden, ffn and kv dim "
        "in bitnet.cpp's kernel shape table); its own config not seen",
        4096, 14336, 32, 32, 8, 128256, False, 8192, family="llama",
    ),
    "100b": Shape(
        "bitnet.cpp's utils/generate-dummy-bitnet-model.py, size '100B' (hidden, ffn, layers and "
        "heads; KV heads as many as heads and vocab 32002, as that script writes them), in the "
        "2B4T layout (2-bit packs, 25.5 GB)",
        8192, 45568, 72, 64, 64, 32002, True, 2048, family="bitnet",
    ),
}
# fmt: on

# Earlier names, kept so scripts that use them still work.
ALIASES = {"large": "bitnet-large", "3b": "bitnet-3b", "8b": "llama3-8b"}

# Version of the files this module writes: bump it when their content changes.
FORMAT_VERSION = 2

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
_CHUNK = 1 << 24  # elements generated at a time: bounds the writer's memory


def cache_dir() -> Path:
    """Where synthetic checkpoints live: $TRIT_CACHE, else ~/.cache/trit."""
    root = (
        os.environ.get("TRIT_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "trit"
    )
    return Path(root) / "synthetic"


def config(shape: Shape) -> dict[str, object]:
    """config.json of the synthetic model, in its family's published layout."""
    if shape.family not in FAMILIES:
        raise ValueError(f"unknown family {shape.family!r}; expected one of {', '.join(FAMILIES)}")
    sizes: dict[str, object] = {
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "vocab_size": shape.vocab,
        "max_position_embeddings": shape.max_positions,
        "rms_norm_eps": shape.rms_norm_eps,
        "rope_theta": shape.rope_theta,
        "tie_word_embeddings": shape.tied,
    }
    if shape.head_size is not None:
        sizes["head_dim"] = shape.head_size
    stamp = {"trit_synthetic": {"source": shape.source, "format_version": FORMAT_VERSION}}
    if shape.family == "bitnet":
        return {
            "architectures": ["BitNetForCausalLM"],
            "model_type": "bitnet",
            **sizes,
            "hidden_act": "relu2",
            "bos_token_id": 0,
            "eos_token_id": 1,
            "torch_dtype": "bfloat16",
            "quantization_config": {
                "quant_method": "bitnet",
                "linear_class": "autobitlinear",
                "quantization_mode": "offline",
            },
            **stamp,
        }
    if shape.family == "llama":
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            **sizes,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "pretraining_tp": 1,
            "rope_scaling": None,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "torch_dtype": "bfloat16",
            # As Falcon's quantize_to_1bit writes it; transformers' default is the same.
            "quantization_config": {
                "quant_method": "bitnet",
                "modules_to_not_convert": ["lm_head"],
            },
            **stamp,
        }
    return {
        "architectures": ["BitnetForCausalLM"],
        "model_type": "llama",
        **sizes,
        "hidden_act": "silu",
        "attention_bias": False,
        "pretraining_tp": 1,
        "rope_scaling": None,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float16",
        "input_bits": 8,
        "weight_bits": 1,
        **stamp,
    }


def _tensors(shape: Shape) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype, shape) of every tensor, in file order."""
    h, f, kv = shape.hidden, shape.intermediate, shape.kv_heads * shape.head_dim
    q = shape.heads * shape.head_dim
    masters = shape.family == "1bitllm"
    float_type = "F16" if masters else "BF16"
    out: list[tuple[str, str, tuple[int, ...]]] = [
        ("model.embed_tokens.weight", float_type, (shape.vocab, h))
    ]
    sub_norms = {
        "bitnet": ("self_attn.attn_sub_norm", "mlp.ffn_sub_norm"),
        "1bitllm": ("self_attn.inner_attn_ln", "mlp.ffn_layernorm"),
    }.get(shape.family)
    for layer in range(shape.layers):
        p = f"model.layers.{layer}."
        out.append((p + "input_layernorm.weight", float_type, (h,)))
        out.append((p + "post_attention_layernorm.weight", float_type, (h,)))
        if sub_norms is not None:
            out.append((p + sub_norms[0] + ".weight", float_type, (q,)))
            out.append((p + sub_norms[1] + ".weight", float_type, (f,)))
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
            if masters:
                out.append((p + name + ".weight", float_type, (n_out, n_in)))
            else:
                # HF packing: four output rows per byte, so [n_out / 4, n_in].
                out.append((p + name + ".weight", "U8", (n_out // 4, n_in)))
                out.append((p + name + ".weight_scale", "BF16", (1,)))
    out.append(("model.norm.weight", float_type, (h,)))
    if not shape.tied:
        out.append(("lm_head.weight", float_type, (shape.vocab, h)))
    return out


_SIZES = {"BF16": 2, "F16": 2, "U8": 1}
_ONES = {"BF16": 0x3F80, "F16": 0x3C00}  # 1.0: norm weights


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
        file.write(np.full(count, _ONES[dtype], dtype="<u2").tobytes())
    else:
        for start in range(0, count, _CHUNK):
            n = min(_CHUNK, count - start)
            values = rng.standard_normal(n, dtype=np.float32)
            if dtype == "F16":
                file.write(values.astype("<f2").tobytes())
            else:
                file.write((values.view(np.uint32) >> 16).astype("<u2").tobytes())  # to bf16


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
    """The folder of synthetic model `name` (or an alias), written first if missing or stale."""
    name = ALIASES.get(name, name)
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
