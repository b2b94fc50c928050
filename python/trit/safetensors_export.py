"""Writing a loaded model as a Hugging Face folder (`trit convert --to
safetensors`): config.json, model.safetensors in the packed 2B4T layout
(U8 ``[out/4, in]`` plus an F32 ``weight_scale``, docs/formats.md "Packing"),
and the tokenizer. From a GGUF file, the tokenizer.json is the one
`trit.gguf_tokenizer` builds from its metadata."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np

from trit._core import InvalidInputError, Model, gguf_metadata
from trit.gguf_export import NORMS, PROJECTIONS
from trit.gguf_tokenizer import STOP_KEYS, tokenizer_json

PATHS = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "gate_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
    "input_layernorm": "input_layernorm",
    "post_attention_layernorm": "post_attention_layernorm",
    "attn_sub_norm": "self_attn.attn_sub_norm",
    "ffn_sub_norm": "mlp.ffn_sub_norm",
}
TOKENIZER_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
]


def pack_hf(values: np.ndarray) -> np.ndarray:
    """Hugging Face packing: output row i*R + r (R = out/4) goes to bits
    2i..2i+1 of packed row r, as value + 1."""
    rows = values.shape[0] // 4
    codes = (values + 1).astype(np.uint8).reshape(4, rows, values.shape[1])
    return codes[0] | (codes[1] << 2) | (codes[2] << 4) | (codes[3] << 6)


def _f32_json(x: float) -> float:
    """The shortest decimal that reads back as the same f32."""
    return float(str(np.float32(x)))


def _config(model: Model, extra: dict[str, Any]) -> dict[str, Any]:
    c = model.config
    return {
        "architectures": ["BitNetForCausalLM"],
        "model_type": "bitnet",
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "hidden_act": "relu2",
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": _f32_json(c.rms_norm_eps),
        "rope_theta": _f32_json(c.rope_theta),
        "tie_word_embeddings": c.tie_word_embeddings,
        "torch_dtype": "bfloat16",
        "quantization_config": {
            "quant_method": "bitnet",
            "linear_class": "autobitlinear",
            "quantization_mode": "offline",
        },
        **extra,
    }


def _write_safetensors(path: Path, tensors: list[tuple[str, str, np.ndarray]]) -> None:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, array in tensors:
        header[name] = {
            "dtype": dtype,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    partial = path.with_name(path.name + ".partial")
    with partial.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, _, array in tensors:
            f.write(np.ascontiguousarray(array).tobytes())
    partial.replace(path)


def write_safetensors(model: Model, source: Path, out: Path) -> None:
    """Writes `model` (loaded from `source`, a folder or GGUF file, with the
    bf16 head) as a Hugging Face folder `out`."""
    if model.config.family != "bitnet":
        raise InvalidInputError(
            f"trit convert writes the BitNet family (2B4T block); this is {model.config.family}"
        )
    out.mkdir(parents=True, exist_ok=True)
    tensors: list[tuple[str, str, np.ndarray]] = []

    def dense(name: str, target: str) -> None:
        dtype, values = model.dense(name)
        tensors.append((target, "BF16" if dtype == "bf16" else "F32", values))

    dense("embed_tokens", "model.embed_tokens.weight")
    for layer in range(model.config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        for name, _ in NORMS:
            tensors.append((prefix + PATHS[name] + ".weight", "F32", model.norm(name, layer)))
        for name, _ in PROJECTIONS:
            m = model.projection(layer, name)
            tensors.append((prefix + PATHS[name] + ".weight", "U8", pack_hf(m.unpack())))
            scale = np.array([m.scale], np.float32)
            tensors.append((prefix + PATHS[name] + ".weight_scale", "F32", scale))
    tensors.append(("model.norm.weight", "F32", model.norm("norm")))
    if not model.config.tie_word_embeddings:
        dense("lm_head", "lm_head.weight")
    _write_safetensors(out / "model.safetensors", tensors)

    extra: dict[str, Any] = {}
    if source.is_file():
        meta = gguf_metadata(source)
        (out / "tokenizer.json").write_text(json.dumps(tokenizer_json(meta, source)))
        tokens = meta.get("tokenizer.ggml.tokens")
        assert isinstance(tokens, list)
        tok_config: dict[str, Any] = {}
        for key in ("bos", "eos"):
            i = meta.get(f"tokenizer.ggml.{key}_token_id")
            if isinstance(i, int) and 0 <= i < len(tokens):
                tok_config[f"{key}_token"] = tokens[i]
                extra[f"{key}_token_id"] = i
        template = meta.get("tokenizer.chat_template")
        if isinstance(template, str):
            tok_config["chat_template"] = template
        (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
        stops = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in STOP_KEYS]
        stop_ids = [i for i in stops if isinstance(i, int)]
        if stop_ids:
            (out / "generation_config.json").write_text(
                json.dumps({"eos_token_id": stop_ids}, indent=2)
            )
    else:
        for name in TOKENIZER_FILES:
            if (source / name).exists() and source.resolve() != out.resolve():
                shutil.copyfile(source / name, out / name)
        source_config = json.loads((source / "config.json").read_text(encoding="utf-8"))
        for key in ("bos_token_id", "eos_token_id"):
            if key in source_config:
                extra[key] = source_config[key]
    (out / "config.json").write_text(json.dumps(_config(model, extra), indent=2) + "\n")
