"""Writing a loaded model as a GGUF file (`trit convert`), with the `gguf`
package (llama.cpp's own writer; ``pip install gguf``).

Projections are written as I2_S (bitnet.cpp's type) or TQ2_0 / TQ1_0 (ggml's),
values and scale unchanged, under the ``general.architecture`` the family's
converter uses: bitnet.cpp's "bitnet-b1.58" for the 2B4T block, llama.cpp's
"llama" for the Llama family (Q and K rows permuted as its
convert_hf_to_gguf.py does, so llama.cpp's RoPE applies), and llama.cpp's
"bitnet" with ``bitnet.hidden_act`` "silu" for 1bitLLM. Norms as F32; the
embedding and an untied head as the engine holds them (BF16, or F32 for
F16/F32/quantized sources). The tokenizer goes into the metadata as
llama.cpp's converter writes it. Layouts: docs/formats.md, "GGUF".
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from trit._core import InvalidInputError, Model, TritError, gguf_float_tensor, gguf_metadata
from trit.gguf_tokenizer import CONTROL, PRE_TOKENIZERS, USER_DEFINED

TYPES = ("i2_s", "tq2_0", "tq1_0")
I2_S = 36  # GGML_TYPE_I2_S in bitnet.cpp's ggml
QK_I2_S = 128
NORMAL = 1

# (builder's module path, GGUF name) of a layer's tensors.
PROJECTIONS = [
    ("q_proj", "attn_q"),
    ("k_proj", "attn_k"),
    ("v_proj", "attn_v"),
    ("o_proj", "attn_output"),
    ("gate_proj", "ffn_gate"),
    ("up_proj", "ffn_up"),
    ("down_proj", "ffn_down"),
]
NORMS = [
    ("input_layernorm", "attn_norm"),
    ("attn_sub_norm", "attn_sub_norm"),
    ("post_attention_layernorm", "ffn_norm"),
    ("ffn_sub_norm", "ffn_sub_norm"),
]
# The family's GGUF architecture, and whether its block has sub-norms.
ARCHITECTURES = {
    "bitnet": ("bitnet-b1.58", True),
    "llama": ("llama", False),
    "1bitllm": ("bitnet", True),
}


def permute_rows(values: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute` (convert_hf_to_gguf.py) of Q or K rows:
    within each head, the two rotary halves are interleaved, so that file row
    2i + j holds row j*D/2 + i."""
    return (
        values.reshape(heads, 2, values.shape[0] // heads // 2, *values.shape[1:])
        .swapaxes(1, 2)
        .reshape(values.shape)
    )


def _refuse_unwritable(source: Path) -> None:
    """What a model folder's config asks for that GGUF cannot hold."""
    config_path = source / "config.json"
    if source.is_file() or not config_path.exists():
        return
    cfg = json.loads(config_path.read_text(encoding="utf-8"))
    quant = cfg.get("quantization_config") or {}
    if quant.get("use_rms_norm") is True:
        raise InvalidInputError(
            f"{config_path}: quantization_config.use_rms_norm gives each projection its own "
            "input norm, which no GGUF architecture holds"
        )


# Llama 3 RoPE parameters a reader recovers from rope_freqs alone (llama.cpp's
# converter's defaults); the original context goes in a key when it differs.
LLAMA3_LOW_FREQ_FACTOR = 1.0
LLAMA3_HIGH_FREQ_FACTOR = 4.0
LLAMA3_ORIGINAL_CONTEXT = 8192


def llama3_rope_factors(
    theta: float, head_dim: int, factor: float, low: float, high: float, original: int
) -> np.ndarray:
    """llama.cpp's `rope_freqs` (`LlamaModel.generate_extra_tensors`): one
    divisor per RoPE frequency, the Llama 3 scaling of transformers'
    `_compute_llama3_parameters`."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / float(freq)
        if wavelen < original / high:
            factors.append(1.0)
        elif wavelen > original / low:
            factors.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _rope_freqs(source: Path, cfg: Any) -> tuple[np.ndarray, int] | None:
    """The rope_freqs tensor and original context to write for the model of
    `source`: copied from a GGUF source, computed from a folder's Llama 3
    `rope_scaling`; None without RoPE scaling. Other scalings are refused."""
    if source.is_file():
        stored = gguf_float_tensor(source, "rope_freqs.weight")
        if stored is None:
            return None
        meta = gguf_metadata(source)
        key = f"{meta.get('general.architecture')}.rope.scaling.original_context_length"
        original = meta.get(key, LLAMA3_ORIGINAL_CONTEXT)
        if not isinstance(original, int):
            raise InvalidInputError(f"{source}: {key} is {original!r}; expected an integer")
        return np.array(stored, dtype=np.float32), original
    config_path = source / "config.json"
    if not config_path.exists():
        return None
    config = json.loads(config_path.read_text(encoding="utf-8"))
    for key in ("rope_scaling", "rope_parameters"):
        rope = config.get(key) or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind == "default":
            continue
        low, high = rope.get("low_freq_factor"), rope.get("high_freq_factor")
        if kind != "llama3" or (low, high) != (LLAMA3_LOW_FREQ_FACTOR, LLAMA3_HIGH_FREQ_FACTOR):
            raise InvalidInputError(
                f"{config_path}: {key} {kind!r} (low_freq_factor {low}, high_freq_factor "
                f"{high}) is not written to GGUF: trit writes Llama 3 scaling with factors 1 "
                "and 4, which a reader recovers from rope_freqs"
            )
        original = int(rope["original_max_position_embeddings"])
        factors = llama3_rope_factors(
            cfg.rope_theta,
            cfg.head_dim,
            float(rope["factor"]),
            LLAMA3_LOW_FREQ_FACTOR,
            LLAMA3_HIGH_FREQ_FACTOR,
            original,
        )
        return factors, original
    return None


def _gguf() -> Any:
    try:
        import gguf
    except ImportError as exc:
        raise TritError(f"writing GGUF needs the gguf package (pip install gguf): {exc}") from exc
    return gguf


def encode_i2s(values: np.ndarray, scale: float, name: str) -> np.ndarray:
    """bitnet.cpp's quantize_i2_s (x86, ACT_PARALLEL): codes value + 1 of the
    flattened matrix in blocks of 128; byte p of block b holds elements
    128b + p, +32, +64, +96 in bits 7-6, 5-4, 3-2, 1-0; then the f32 scale in
    a 32-byte tail."""
    if values.size % QK_I2_S:
        raise InvalidInputError(f"{name} has {values.size} weights; I2_S packs blocks of {QK_I2_S}")
    codes = (values.reshape(-1) + 1).astype(np.uint8).reshape(-1, 4, 32)
    packed = (codes[:, 0] << 6) | (codes[:, 1] << 4) | (codes[:, 2] << 2) | codes[:, 3]
    tail = np.zeros(32, np.uint8)
    tail[:4] = np.frombuffer(np.float32(scale).tobytes(), np.uint8)
    return np.concatenate([packed.reshape(-1), tail])


def _tq(gguf: Any, values: np.ndarray, scale: float, kind: str, name: str) -> np.ndarray:
    """TQ blocks with ggml's own quantizer. Every block's f16 scale is the
    matrix scale, so it must be an f16 exactly, and rows whole blocks."""
    if values.shape[1] % 256:
        raise InvalidInputError(
            f"{name} has rows of {values.shape[1]} weights; {kind.upper()} packs blocks of 256"
        )
    if float(np.float16(scale)) != scale:
        raise InvalidInputError(
            f"{name} has scale {scale}, which an f16 block scale cannot hold exactly; "
            "write i2_s (f32 scale) instead"
        )
    qtype = gguf.GGMLQuantizationType[kind.upper()]
    real = values.astype(np.float32) * np.float32(scale)
    return np.asarray(gguf.quants.quantize(real, qtype))


def _pre_tokenizer_name(structure: dict[str, Any], path: Path) -> str:
    pre = structure.get("pre_tokenizer")
    ignore = bool(structure.get("model", {}).get("ignore_merges", False))
    for name, (known, ignore_merges) in PRE_TOKENIZERS.items():
        if known == pre and ignore_merges == ignore:
            return name
    raise InvalidInputError(
        f"{path}: its pre-tokenizer is none that GGUF names and trit knows "
        f"({', '.join(sorted(PRE_TOKENIZERS))})"
    )


def _tokenizer_from_folder(w: Any, folder: Path) -> None:
    """tokenizer.json (byte-level BPE) as llama.cpp's `_set_vocab_gpt2` writes it."""
    gguf = _gguf()
    path = folder / "tokenizer.json"
    tok = json.loads(path.read_text(encoding="utf-8"))
    model = tok.get("model", {})
    if model.get("type") != "BPE":
        raise InvalidInputError(f"{path}: only byte-level BPE tokenizers can be written to GGUF")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in tok.get("added_tokens", [])}
    for content, t in added.items():
        vocab[content] = t["id"]
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for text, i in vocab.items():
        tokens[i] = text
        if text in added:
            types[i] = CONTROL if added[text].get("special") else USER_DEFINED
        else:
            types[i] = NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_tokenizer_name(tok, path))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    config: dict[str, Any] = {}
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        if (folder / name).exists():
            config[name] = json.loads((folder / name).read_text(encoding="utf-8"))
    model_cfg = config.get("config.json", {})
    if isinstance(model_cfg.get("bos_token_id"), int):
        w.add_bos_token_id(model_cfg["bos_token_id"])
        w.add_add_bos_token(_adds_bos(tok))
    eos = config.get("generation_config.json", {}).get(
        "eos_token_id", model_cfg.get("eos_token_id")
    )
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    if eos_ids:
        w.add_eos_token_id(eos_ids[0])
    if len(eos_ids) > 1:
        w.add_eot_token_id(eos_ids[1])
    template = config.get("tokenizer_config.json", {}).get("chat_template")
    if template is None and (folder / "chat_template.jinja").exists():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, str):
        w.add_chat_template(template)


def _adds_bos(tok: dict[str, Any]) -> bool:
    """Whether tokenizer.json's post-processor puts a special token first."""
    text = json.dumps(tok.get("post_processor"))
    return '"TemplateProcessing"' in text and '"single": [{"SpecialToken"' in text


def _tokenizer_from_gguf(w: Any, path: Path) -> None:
    gguf = _gguf()
    meta = gguf_metadata(path)
    for key, value in meta.items():
        if not key.startswith("tokenizer."):
            continue
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, list) and key.endswith("token_type"):
            w.add_array(key, [gguf.TokenType(int(v)) for v in value])
        elif isinstance(value, list):
            w.add_array(key, value)


def write_gguf(model: Model, source: Path, out: Path, kind: str) -> None:
    """Writes `model` (loaded from `source`, a folder or GGUF file, with the
    bf16 head) as GGUF `out` with projections of type `kind`."""
    cfg = model.config
    if cfg.family not in ARCHITECTURES:
        raise InvalidInputError(f"trit convert cannot write the {cfg.family} family to GGUF")
    if kind not in TYPES:
        raise InvalidInputError(f"type must be one of {', '.join(TYPES)}, got {kind!r}")
    _refuse_unwritable(source)
    gguf = _gguf()
    arch, has_sub_norms = ARCHITECTURES[cfg.family]
    partial = out.with_name(out.name + ".partial")
    w = gguf.GGUFWriter(str(partial), arch)
    if cfg.family == "1bitllm":
        # llama.cpp's bitnet graph reads its activation here (SiLU when absent).
        w.add_string(f"{arch}.hidden_act", "silu")
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    rope = _rope_freqs(source, cfg)
    if rope is not None:
        factors, original = rope
        w.add_tensor("rope_freqs.weight", factors)
        if original != LLAMA3_ORIGINAL_CONTEXT:
            w.add_rope_scaling_orig_ctx_len(original)
    if source.is_file():
        _tokenizer_from_gguf(w, source)
    else:
        _tokenizer_from_folder(w, source)

    def dense(name: str, target: str) -> None:
        dtype, values = model.dense(name)
        if dtype == "bf16":
            w.add_tensor(target, values.view(np.uint8), raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            w.add_tensor(target, values)

    dense("embed_tokens", "token_embd.weight")
    for layer in range(cfg.num_hidden_layers):
        for name, target in NORMS:
            if name.endswith("sub_norm") and not has_sub_norms:
                continue
            w.add_tensor(f"blk.{layer}.{target}.weight", model.norm(name, layer))
        for name, target in PROJECTIONS:
            m = model.projection(layer, name)
            values, scale = m.unpack(), m.scale
            if arch == "llama" and name in ("q_proj", "k_proj"):
                heads = cfg.num_attention_heads if name == "q_proj" else cfg.num_key_value_heads
                values = permute_rows(values, heads)
            full = f"blk.{layer}.{target}.weight"
            if kind == "i2_s":
                raw = encode_i2s(values, scale, full)
                w.add_tensor_info(full, values.shape, np.dtype(np.int8), raw.nbytes, I2_S)
                w.tensors[-1][full].tensor = raw
            else:
                raw = _tq(gguf, values, scale, kind, full)
                w.add_tensor(full, raw, raw_dtype=gguf.GGMLQuantizationType[kind.upper()])
    w.add_tensor("output_norm.weight", model.norm("norm"))
    if not cfg.tie_word_embeddings:
        dense("lm_head", "output.weight")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    partial.replace(out)
