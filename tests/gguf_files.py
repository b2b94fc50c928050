"""GGUF files of the tiny safetensors fixtures, written with the `gguf` package
(ggml's own writer and its numpy TQ1_0 / TQ2_0 quantizers), so trit's reader is
checked against the reference tools rather than against itself. I2_S, which
upstream ggml lacks, is packed here following bitnet.cpp's `quantize_i2_s`
(src/ggml-bitnet-mad.cpp, ACT_PARALLEL with QK_I2_S = 128) and the Python
`quantize_to_i2_s` of its utils/convert-hf-to-gguf-bitnet.py."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import st_files

ARCH = "bitnet-b1.58"
I2_S = 36  # GGML_TYPE_I2_S in bitnet.cpp's ggml fork

GGUF_NAMES = {
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


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf LlamaModel.permute (rows of Q and K)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write(
    folder: Path,
    out: Path,
    *,
    projections: str = "I2_S",
    embedding: str = "BF16",
    arch: str = ARCH,
    tokenizer: bool = True,
) -> Path:
    """Writes the model of safetensors `folder` as GGUF `out`. `projections`:
    I2_S, TQ1_0, TQ2_0 or F32 (ternary values times their scale);
    `embedding`: BF16, F32, F16, Q8_0 or Q6_K."""
    cfg = json.loads((folder / "config.json").read_text())
    tensors = st_files.read(folder / "model.safetensors")
    divides = cfg["quantization_config"].get("linear_class", "bitlinear") == "bitlinear"
    w = gguf.GGUFWriter(str(out), arch)
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
    if tokenizer:
        add_tokenizer(w, folder)
    for name, (dtype, shape, data) in tensors.items():
        if name.endswith(".weight_scale"):
            continue
        target = gguf_name(name)
        if dtype == "U8":
            values = unpack_hf(np.frombuffer(data, np.uint8).reshape(shape))
            (s_dtype, _, s_data) = tensors[name + "_scale"]
            scale = float(floats(s_dtype, s_data)[0])
            scale = 1.0 / scale if divides else scale
            if arch == "llama" and ("q_proj" in name or "k_proj" in name):
                heads = cfg["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
                values = permute(values, heads)
            if projections == "I2_S":
                raw = encode_i2s(values, scale)
                w.add_tensor_info(target, values.shape, np.dtype(np.int8), raw.nbytes, I2_S)  # type: ignore[arg-type]
                w.tensors[-1][target].tensor = raw
            elif projections == "F32":
                w.add_tensor(target, values.astype(np.float32) * np.float32(scale))
            else:
                qtype = gguf.GGMLQuantizationType[projections]
                real = values.astype(np.float32) * np.float32(scale)
                w.add_tensor(target, gguf.quants.quantize(real, qtype), raw_dtype=qtype)
        elif len(shape) == 2:
            real = floats(dtype, data).reshape(shape)
            if embedding == "BF16":
                assert dtype == "BF16"
                bits = np.frombuffer(data, "<u2").reshape(shape)
                w.add_tensor(target, bits.view(np.uint8), raw_dtype=gguf.GGMLQuantizationType.BF16)
            elif embedding in ("F32", "F16"):
                w.add_tensor(target, real.astype(np.float32 if embedding == "F32" else np.float16))
            elif embedding == "Q6_K":
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
                qtype = gguf.GGMLQuantizationType[embedding]
                w.add_tensor(target, gguf.quants.quantize(real, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(target, floats(dtype, data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


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
