"""GGUF files of the tiny safetensors fixtures, written with the `gguf` package
(ggml's own writer and its numpy TQ1_0 / TQ2_0 quantizers), so trit's reader is
checked against the reference tools rather than against itself. I2_S, which
upstream ggml lacks, is packed here following bitnet.cpp's `quantize_i2_s`
(src/ggml-bitnet-mad.cpp, ACT_PARALLEL with QK_I2_S = 128) and the Python
`quantize_to_i2_s` of its utils/convert-hf-to-gguf-bitnet.py.

Llama-family folders (Falcon3-1.58bit, Falcon-E, Llama3-8B-1.58) are written as
llama.cpp's convert_hf_to_gguf.py writes them (`LlamaModel`, arch "llama"): the
packed weights dequantized to floats (`dequant_bitnet`: values / weight_scale in
f32), Q and K rows permuted (`LlamaModel.permute`), the hyperparameters of
`TextModel.set_gguf_parameters`, and the tokenizer through gguf's own
`SpecialVocab`. 1bitLLM folders as its `BitnetModel` (arch "bitnet"):
`weight_quant` of the float16 masters, sub-norms as `attn_sub_norm` and
`ffn_sub_norm`, RoPE scaling linear 1.0."""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
import st_files

ARCH = "bitnet-b1.58"
I2_S = 36  # GGML_TYPE_I2_S in bitnet.cpp's ggml fork

GGUF_NAMES = {
    "self_attn.inner_attn_ln": "attn_sub_norm",
    "mlp.ffn_layernorm": "ffn_sub_norm",
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.attn_sub_norm": "attn_sub_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "mlp.ffn_sub_norm": "ffn_sub_norm",
}


def gguf_name(hf: str) -> str:
    top = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf in top:
        return top[hf]
    _, _, layer, rest = hf.split(".", 3)
    module = rest.removesuffix(".weight")
    return f"blk.{layer}.{GGUF_NAMES[module]}.weight"


def floats(dtype: str, data: bytes) -> np.ndarray:
    """A safetensors float tensor's values as float32 (exact)."""
    if dtype == "BF16":
        return (np.frombuffer(data, "<u2").astype(np.uint32) << 16).view(np.float32)
    return np.frombuffer(data, {"F16": "<f2", "F32": "<f4"}[dtype]).astype(np.float32)


def unpack_hf(packed: np.ndarray) -> np.ndarray:
    """Hugging Face packing, U8 [out/4, in]: output row i*R + r is bits 2i..2i+1
    of packed row r, as value + 1 (docs/formats.md "Packing")."""
    return np.concatenate([((packed >> (2 * i)) & 3).astype(np.int8) - 1 for i in range(4)])


def encode_i2s(values: np.ndarray, scale: float) -> np.ndarray:
    """bitnet.cpp quantize_i2_s: codes value + 1 of the flattened tensor, in
    blocks of 128; byte j of block b holds elements 128b + j, +32, +64, +96 in
    bits 7-6, 5-4, 3-2, 1-0; then the f32 scale in a 32-byte tail."""
    codes = (values.reshape(-1) + 1).astype(np.uint8).reshape(-1, 4, 32)
    packed = (codes[:, 0] << 6) | (codes[:, 1] << 4) | (codes[:, 2] << 2) | codes[:, 3]
    tail = np.zeros(32, np.uint8)
    tail[:4] = np.frombuffer(np.float32(scale).tobytes(), np.uint8)
    return np.concatenate([packed.reshape(-1), tail])


def quantize_i2s(w: np.ndarray) -> np.ndarray:
    """bitnet.cpp's `quantize_i2_s` (ACT_PARALLEL) of float weights, as
    `llama-quantize` runs it on a converted model: the scale is max|w| (as a
    double, stored as f32), a weight below 1e-6 in magnitude is code 1, others
    2 or 0 by sign."""
    flat = w.reshape(-1).astype(np.float64)
    scale = np.abs(flat).max()
    values = np.where(np.abs(flat) < 1e-6, 0, np.where(flat * scale > 0, 1, -1))
    return encode_i2s(values.astype(np.int8), float(np.float32(scale)))


def weight_quant(w: np.ndarray) -> np.ndarray:
    """llama.cpp's `BitnetModel.weight_quant` (conversion/bitnet.py) of a
    float16 master: absmean ternarisation in f32, `/ iscale`, cast back."""
    w32 = w.astype(np.float32)
    scale = np.maximum(np.abs(w32).mean(dtype=np.float32), np.float32(1e-5))
    iscale = np.float32(1) / scale
    return (np.clip(np.round(w32 * iscale), -1, 1) / iscale).astype(w.dtype)


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf LlamaModel.permute (rows of Q and K)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def family(cfg: dict) -> str:
    if "BitnetForCausalLM" in cfg.get("architectures", []):
        return "1bitllm"
    return "llama" if cfg.get("model_type") == "llama" else "bitnet"


def write(
    folder: Path,
    out: Path,
    *,
    projections: str = "I2_S",
    embedding: str | None = None,
    arch: str | None = None,
    tokenizer: bool = True,
    pre: str = "llama-bpe",
) -> Path:
    """Writes the model of safetensors `folder` as GGUF `out`. `projections`:
    I2_S (packed from the ternary values and the scale), I2_S_MAX (bitnet.cpp's
    setup_env.py: `llama-quantize` of the converter's F32 file, scale = max of
    the floats), TQ1_0, TQ2_0, F32 or F16 (ternary values times their scale);
    `embedding`: BF16, F32, F16, Q8_0 or Q6_K (default: as stored). `arch` defaults to the family's
    (bitnet-b1.58, llama, bitnet); `pre` names the byte-level pre-tokenizer."""
    cfg = json.loads((folder / "config.json").read_text())
    kind = family(cfg)
    arch = arch or {"bitnet": ARCH, "llama": "llama", "1bitllm": "bitnet"}[kind]
    tensors = st_files.read(folder / "model.safetensors")
    quant = cfg.get("quantization_config", {})
    divides = quant.get("linear_class", "bitlinear") == "bitlinear"
    heads, kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads")
    head_dim = cfg.get("head_dim", cfg["hidden_size"] // heads)
    w = gguf.GGUFWriter(str(out), arch)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    if kv_heads is not None:
        w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    if "head_dim" in cfg:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_vocab_size(cfg["vocab_size"])
    w.add_rope_dimension_count(head_dim)
    if kind == "1bitllm":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(1.0)
    rope = cfg.get("rope_scaling") or {}
    if rope.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(cfg, head_dim))
    if tokenizer:
        if kind == "bitnet":
            add_tokenizer(w, folder)
        else:
            add_tokenizer_as_converter(w, folder, pre)
    for name, (dtype, shape, data) in tensors.items():
        if name.endswith(".weight_scale") or ".rms_norm." in name:
            continue
        target = gguf_name(name)
        is_projection = name.endswith("_proj.weight") and "lm_head" not in name
        if is_projection:
            if dtype == "U8":
                values = unpack_hf(np.frombuffer(data, np.uint8).reshape(shape))
                (s_dtype, _, s_data) = tensors[name + "_scale"]
                scale = float(floats(s_dtype, s_data)[0])
                scale = float(np.float32(1) / np.float32(scale)) if divides else scale
            else:  # 1bitLLM's float masters, ternarised as the converter does
                master = np.frombuffer(data, "<f2").reshape(shape)
                quantized = weight_quant(master).astype(np.float32)
                scale = float(np.abs(quantized).max())
                values = np.sign(quantized).astype(np.int8)
            if arch == "llama" and ("q_proj" in name or "k_proj" in name):
                values = permute(values, heads if "q_proj" in name else kv_heads or heads)
            real = values.astype(np.float32) * np.float32(scale)
            if projections == "I2_S":
                add_i2s(w, target, values.shape, encode_i2s(values, scale))
            elif projections == "I2_S_MAX":
                add_i2s(w, target, values.shape, quantize_i2s(real))
            elif projections in ("F32", "F16"):
                w.add_tensor(
                    target, real.astype(np.float32 if projections == "F32" else np.float16)
                )
            else:
                qtype = gguf.GGMLQuantizationType[projections]
                w.add_tensor(target, gguf.quants.quantize(real, qtype), raw_dtype=qtype)
        elif len(shape) == 2:
            real = floats(dtype, data).reshape(shape)
            stored_as = embedding or dtype
            if stored_as == "BF16":
                assert dtype == "BF16"
                bits = np.frombuffer(data, "<u2").reshape(shape)
                w.add_tensor(target, bits.view(np.uint8), raw_dtype=gguf.GGMLQuantizationType.BF16)
            elif stored_as in ("F32", "F16"):
                as_f32 = stored_as == "F32"
                w.add_tensor(target, real.astype(np.float32 if as_f32 else np.float16))
            elif stored_as == "Q6_K":
                # gguf has no Q6_K quantizer: random blocks with a small f16
                # scale d (bytes 208-209) stand in; the test dequantizes them
                # with gguf's own dequantizer.
                rows, cols = shape
                rng = np.random.default_rng(0)
                blocks = rng.integers(0, 256, (rows * cols // 256, 210), dtype=np.uint8)
                blocks[:, 208:] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
                qtype = gguf.GGMLQuantizationType.Q6_K
                w.add_tensor(target, blocks.reshape(rows, -1), raw_dtype=qtype)
            else:
                qtype = gguf.GGMLQuantizationType[stored_as]
                w.add_tensor(target, gguf.quants.quantize(real, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(target, floats(dtype, data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def llama3_rope_factors(cfg: dict, dim: int) -> np.ndarray:
    """`LlamaModel.generate_extra_tensors` of llama.cpp's converter: Llama 3
    RoPE scaling as one factor per frequency (the original context read from
    the top level of config.json, default 8192, as that code does)."""
    rope = cfg["rope_scaling"]
    freqs = 1.0 / (cfg["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = cfg.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def add_i2s(w: gguf.GGUFWriter, name: str, shape: tuple[int, ...], raw: np.ndarray) -> None:
    """An I2_S tensor (type 36, unknown to upstream gguf): its info and bytes."""
    w.add_tensor_info(name, shape, np.dtype(np.int8), raw.nbytes, I2_S)  # type: ignore[arg-type]
    w.tensors[-1][name].tensor = raw


def add_tokenizer_as_converter(w: gguf.GGUFWriter, folder: Path, pre: str) -> None:
    """llama.cpp's `_set_vocab_gpt2`: tokens by id with their types from
    `get_vocab_base` (added special tokens CONTROL, other added tokens
    USER_DEFINED, the rest NORMAL, ids without a token "[PADn]" UNUSED), the
    pre-tokenizer name its hash table gives the model, then gguf's own
    `SpecialVocab` for merges, special ids, add_bos/add_eos and the chat template."""
    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab: dict[str, int] = dict(tok["model"]["vocab"])
    added = {t["content"]: t for t in tok["added_tokens"]}
    for content, t in added.items():
        vocab[content] = t["id"]
    size = json.loads((folder / "config.json").read_text())["vocab_size"]
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for text, i in vocab.items():
        tokens[i] = text
        if text in added:
            special = added[text]["special"]
            types[i] = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
        else:
            types[i] = gguf.TokenType.NORMAL
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True).add_to_gguf(w, quiet=True)


def add_tokenizer(w: gguf.GGUFWriter, folder: Path) -> None:
    """The tokenizer metadata llama.cpp's converter writes for a byte-level BPE
    (`_set_vocab_gpt2`): tokens by id, merges, token types, special ids."""
    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab: dict[str, int] = dict(tok["model"]["vocab"])
    added = {t["content"]: t for t in tok["added_tokens"]}
    for content, t in added.items():
        vocab[content] = t["id"]
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for text, i in vocab.items():
        tokens[i] = text
        if text in added:
            types[i] = (
                gguf.TokenType.CONTROL if added[text]["special"] else gguf.TokenType.USER_DEFINED
            )
        else:
            types[i] = gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    cfg = json.loads((folder / "config.json").read_text())
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    generation = folder / "generation_config.json"
    stops = json.loads(generation.read_text()).get("eos_token_id") if generation.exists() else None
    if isinstance(stops, list):
        # llama.cpp's converter: the second stop id of a chat model is its end of turn.
        for extra in stops:
            if extra != cfg["eos_token_id"]:
                w.add_eot_token_id(extra)
    w.add_add_bos_token(True)
    tok_cfg_path = folder / "tokenizer_config.json"
    if tok_cfg_path.exists():
        template = json.loads(tok_cfg_path.read_text()).get("chat_template")
        if isinstance(template, str):
            w.add_chat_template(template)
