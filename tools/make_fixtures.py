"""Build tiny random BitNet b1.58 checkpoints and transformers' reference outputs for trit's tests.

Dev-only: CI never runs this and never needs torch. Run it in a throwaway venv:

    python3 -m venv /tmp/fixvenv
    /tmp/fixvenv/bin/pip install torch transformers accelerate safetensors tokenizers numpy ruff
    /tmp/fixvenv/bin/python tools/make_fixtures.py           # rebuild tests/fixtures/, verify
    /tmp/fixvenv/bin/python tools/make_fixtures.py --verify  # only re-check what is there

Every model is made with transformers' own classes (BitNetConfig, BitNetForCausalLM,
AutoBitLinear, pack_weights), written to disk in the layout of the published Microsoft 2B4T
checkpoints (see shared/docs/FORMATS.md sections 0-2), read back with `from_pretrained`, and run
in float32 with eager attention. tests/fixtures/README.md documents every file and every key of
expected.npz.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import hashlib
import io
import json
import os
import platform
import shutil
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

# Must be set before torch is imported: transformers' quantisation functions are @torch.compile'd,
# and the references must come from their eager form (FORMATS.md 4 and 8.7).
os.environ["TORCHDYNAMO_DISABLE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import numpy as np
import safetensors
import tokenizers
import torch
import transformers
from safetensors.torch import load_file, save_file
from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import AutoTokenizer, BitNetConfig, BitNetForCausalLM
from transformers.integrations.bitnet import (
    ActQuant,
    AutoBitLinear,
    WeightQuant,
    pack_weights,
    unpack_weights,
)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "tests" / "fixtures"

# --------------------------------------------------------------------------------------------------
# Tokenizer: a small byte-level BPE in the Llama 3 style (regex split, byte-level, specials last)
# --------------------------------------------------------------------------------------------------

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
EOT = "<|eot_id|>"
N_MERGE_VOCAB = 509  # 256 byte symbols + 253 merges; the 3 specials then take ids 509, 510, 511
LICENSE_FILES = ["Apache-2.0", "BSD", "GPL-3", "MPL-2.0"]  # under /usr/share/common-licenses
# sha256 of the training corpus this script was last run with; a different corpus gives a different
# tokenizer (and so different fixtures): the script warns when it changes.
CORPUS_SHA256 = "a9a431d5fd80cd47f6fbffe15d26939ae29855f78cb21af3db0146594ec2e2c5"

# Llama 3's pre-tokenizer pattern (tokenizer.json of meta-llama/Meta-Llama-3-8B), used verbatim.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The 2B4T chat template as published in its tokenizer_config.json (recalled, not downloaded: [U] in
# FORMATS.md terms): role capitalised, content trimmed, each turn closed by <|eot_id|>, BOS first.
CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = message['role'] | capitalize + ': '+ message['content'] | trim"
    " + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)

TOKENIZER_TEXTS = [
    "Hello world",
    "",
    " leading space and trailing  ",
    "Numbers: 1234567, 3.14159 and 2024-05-01.",
    "Contractions: don't, I'll, WE'RE, she's, they'd.",
    "Tabs\tand\nnewlines\n\n  indented\r\nwindows line",
    "Unicode: café naïve Zürich 日本語 🙂 Ω≈ç√",
    "Special tokens in text: <|eot_id|> and <|begin_of_text|>!",
    "The Licensor grants You a worldwide, royalty-free, non-exclusive license.",
]

CHAT_CASES = [
    [{"role": "user", "content": "Hi!"}],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "  What is 2+2?  "},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "Thanks"},
    ],
]


def training_corpus() -> tuple[list[str], list[str]]:
    """Text found on any Debian machine with Python: the Zen of Python and four license files."""
    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen
        import this
    texts = [codecs.decode(this.s, "rot13")]
    sources = ["python:this (The Zen of Python)"]
    for name in LICENSE_FILES:
        path = Path("/usr/share/common-licenses") / name
        texts.append(path.read_text(encoding="utf-8"))
        sources.append(str(path))
    return texts, sources


def build_tokenizer() -> tuple[Tokenizer, dict]:
    texts, sources = training_corpus()
    digest = hashlib.sha256("\x00".join(texts).encode("utf-8")).hexdigest()
    if digest != CORPUS_SHA256:
        print(
            f"WARNING: training corpus sha256 {digest} differs from {CORPUS_SHA256}: new tokenizer"
        )
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=N_MERGE_VOCAB,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    assert tok.get_vocab_size() == N_MERGE_VOCAB, tok.get_vocab_size()
    tok.add_special_tokens([BOS, EOS, EOT])
    ids = {name: tok.token_to_id(name) for name in (BOS, EOS, EOT)}
    assert list(ids.values()) == [N_MERGE_VOCAB, N_MERGE_VOCAB + 1, N_MERGE_VOCAB + 2], ids
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
            processors.TemplateProcessing(
                single=f"{BOS}:0 $A:0",
                pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
                special_tokens=[(BOS, ids[BOS])],
            ),
        ]
    )
    info = {"sources": sources, "corpus_sha256": digest, "vocab_size": tok.get_vocab_size()}
    return tok, info


def tokenizer_config(tok: Tokenizer) -> dict:
    added = {}
    for name in (BOS, EOS, EOT):
        added[str(tok.token_to_id(name))] = {
            "content": name,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
    return {
        "added_tokens_decoder": added,
        "bos_token": BOS,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 256,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------

PROJ = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
PROJ += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


@dataclass(frozen=True)
class Spec:
    name: str
    seed: int
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    rope_theta: float
    mode: str  # "offline": packed U8 + weight_scale (2B4T); "online": bf16 masters (2B4T-bf16)
    emb_std: float  # std of the embedding rows (tied with the head)
    w_std: float  # base std of the master weights (each tensor draws a factor in [0.5, 2])
    max_shard_bytes: int = 0  # > 0: HF-style sharding with this max_shard_size
    weights_from: str | None = None  # reuse another spec's tensors (same seed and sizes)


SPECS = [
    # Embeddings of std 0.5 give logits of std ~4-5 and greedy runs that do not repeat (HF's 0.02
    # gives near-uniform logits). Packed: masters of std 0.3 x [0.5, 2], so weight_scale = mean|W|
    # is 0.1-0.5.
    # bf16: O(1) masters like the real 2B4T-bf16 (its effective scale mean|W| is then 0.4-1.6).
    Spec("tiny-gqa-packed", 11, 64, 160, 2, 4, 2, 500000.0, "offline", 0.5, 0.3),
    Spec("tiny-mha-packed", 22, 96, 256, 3, 6, 6, 10000.0, "offline", 0.5, 0.3),
    Spec("tiny-gqa-bf16", 33, 64, 160, 2, 4, 2, 500000.0, "online", 0.5, 1.0),
    Spec(
        "tiny-gqa-sharded",
        11,
        64,
        160,
        2,
        4,
        2,
        500000.0,
        "offline",
        0.5,
        0.3,
        72_000,
        "tiny-gqa-packed",
    ),
]


def proj_shape(spec: Spec, proj: str) -> tuple[int, int]:
    head_dim = spec.hidden // spec.heads
    kv = spec.kv_heads * head_dim
    return {
        "self_attn.q_proj": (spec.hidden, spec.hidden),
        "self_attn.k_proj": (kv, spec.hidden),
        "self_attn.v_proj": (kv, spec.hidden),
        "self_attn.o_proj": (spec.hidden, spec.hidden),
        "mlp.gate_proj": (spec.inter, spec.hidden),
        "mlp.up_proj": (spec.inter, spec.hidden),
        "mlp.down_proj": (spec.hidden, spec.inter),
    }[proj]


def config_dict(spec: Spec, vocab: int, ids: dict) -> dict:
    """The 2B4T config.json (FORMATS.md 1, shared/docs/configs/) with tiny sizes, same key order."""
    return {
        "architectures": ["BitNetForCausalLM"],
        "bos_token_id": ids[BOS],
        "eos_token_id": ids[EOS],
        "hidden_act": "relu2",
        "hidden_size": spec.hidden,
        "initializer_range": 0.02,
        "intermediate_size": spec.inter,
        "max_position_embeddings": 256,
        "model_type": "bitnet",
        "rms_norm_eps": 1e-05,
        "num_attention_heads": spec.heads,
        "num_hidden_layers": spec.layers,
        "num_key_value_heads": spec.kv_heads,
        "rope_theta": spec.rope_theta,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": vocab,
        "quantization_config": {
            "quant_method": "bitnet",
            "linear_class": "autobitlinear",
            "quantization_mode": spec.mode,
        },
    }


def bf16_exact(t: torch.Tensor) -> torch.Tensor:
    """Round to bf16 and back: the checkpoint holds bf16 floats, so the fp32 model is exact."""
    return t.to(torch.bfloat16).to(torch.float32)


def master_weights(spec: Spec, vocab: int) -> dict[str, torch.Tensor]:
    """Random fp32 (bf16-exact) masters. Larger than HF's std 0.02 so the logits have a spread."""
    g = torch.Generator().manual_seed(spec.seed)

    def randn(shape, std):
        return torch.randn(shape, generator=g) * std

    def unif(shape, lo, hi):
        return lo + (hi - lo) * torch.rand(shape, generator=g)

    w = {"model.embed_tokens.weight": randn((vocab, spec.hidden), spec.emb_std)}
    for layer in range(spec.layers):
        p = f"model.layers.{layer}."
        w[p + "input_layernorm.weight"] = unif((spec.hidden,), 0.5, 1.5)
        w[p + "post_attention_layernorm.weight"] = unif((spec.hidden,), 0.5, 1.5)
        # sub-norm weights grow with depth in the real model (FORMATS.md 2)
        w[p + "self_attn.attn_sub_norm.weight"] = unif((spec.hidden,), 0.5, 2.0) * (1 + layer)
        w[p + "mlp.ffn_sub_norm.weight"] = unif((spec.inter,), 0.5, 2.0) * (1 + layer)
        for proj in PROJ:
            factor = float(unif((1,), 0.5, 2.0))
            w[p + proj + ".weight"] = randn(proj_shape(spec, proj), spec.w_std * factor)
    w["model.norm.weight"] = unif((spec.hidden,), 0.5, 1.5)
    return {k: bf16_exact(v) for k, v in w.items()}


def ternarise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FORMATS.md 0 (absmean): T = clamp(round(W / mean|W|), -1, 1); returns (T, bf16 mean|W|)."""
    w = w.float()
    scale = 1.0 / w.abs().mean().clamp(min=1e-5)
    t = (w * scale).round().clamp(-1, 1)
    return t, (1.0 / scale).reshape(1).to(torch.bfloat16)


def pack_reference(t: np.ndarray) -> np.ndarray:
    """Independent numpy packing (FORMATS.md 0): row i*R + r goes to bits 2i..2i+1 of row r."""
    rows = t.shape[0] // 4
    codes = (t + 1).astype(np.uint8)
    out = np.zeros((rows, t.shape[1]), dtype=np.uint8)
    for i in range(4):
        out |= codes[i * rows : (i + 1) * rows] << (2 * i)
    return out


def checkpoint_tensors(spec: Spec, masters: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What goes into the safetensors file(s), in HF state_dict order; no lm_head (tied)."""
    out = {}
    for name, w in masters.items():
        assert bool(w.any()), name  # FORMATS.md 1: the re-uploaded 2B4T has all-zero tensors
        is_proj = any(name.endswith(p + ".weight") for p in PROJ)
        if not is_proj or spec.mode == "online":
            out[name] = w.to(torch.bfloat16)
            continue
        t, ws = ternarise(w)
        assert set(t.unique().tolist()) == {-1.0, 0.0, 1.0}, name
        packed = pack_weights(t.clone())
        assert packed.dtype == torch.uint8 and packed.shape == (w.shape[0] // 4, w.shape[1]), name
        assert bool(packed.any()) and not bool((packed == packed.flatten()[0]).all()), name
        assert np.array_equal(packed.numpy(), pack_reference(t.numpy())), name
        assert torch.equal(unpack_weights(packed, dtype=torch.float32), t), name
        assert float(ws) > 0, name
        out[name] = packed
        out[name[: -len("weight")] + "weight_scale"] = ws
    return out


def in_memory_model(spec: Spec, cfg: dict, tensors: dict[str, torch.Tensor]) -> BitNetForCausalLM:
    """The model the checkpoint describes, built with transformers' classes (no loading code)."""
    config = BitNetConfig.from_dict(cfg)
    config._attn_implementation = "eager"
    model = BitNetForCausalLM(config)
    online = spec.mode == "online"
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            new = AutoBitLinear(
                module.in_features, module.out_features, bias=False, online_quant=online
            )
            model.set_submodule(name, new)
    state = {}
    for name, t in tensors.items():
        if t.dtype == torch.uint8:
            # ternary weights from the packed bytes, via transformers' own unpack
            state[name] = unpack_weights(t, dtype=torch.float32)
        else:
            state[name] = t.to(torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert list(missing) == ["lm_head.weight"] and not unexpected, (missing, unexpected)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model.to(torch.float32).eval()


def write_checkpoint(folder: Path, spec: Spec, tensors: dict[str, torch.Tensor]) -> None:
    if not spec.max_shard_bytes:
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        return
    # HF-style sharding: tensors in state_dict order, a new shard when the next one would overflow
    groups: list[list[str]] = [[]]
    acc = total = 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        if groups[-1] and acc + size > spec.max_shard_bytes:
            groups.append([])
            acc = 0
        groups[-1].append(name)
        acc += size
        total += size
    n = len(groups)
    assert n == 2, n
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file({n: tensors[n] for n in group}, folder / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in group})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    write_json(folder / "model.safetensors.index.json", index)


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez without timestamps, so that a rerun gives byte-identical files."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, value in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(value), allow_pickle=False)
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def load_pretrained(folder: Path) -> BitNetForCausalLM:
    """References come from: from_pretrained (bf16 per config), .to(float32), eager attention."""
    model, info = BitNetForCausalLM.from_pretrained(
        folder, attn_implementation="eager", output_loading_info=True
    )
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(key), (folder.name, key, info[key])
    assert model.dtype == torch.bfloat16, model.dtype  # torch_dtype from config.json
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, AutoBitLinear)
    assert q.weight.shape == (q.out_features, q.in_features)  # unpacked (FORMATS.md 8.10)
    return model.to(torch.float32).eval()


# --------------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------------

N_NEW = 16
GEN_PROMPTS = [0, 2]  # which prompts get a greedy continuation
HOOK_PROMPT = 2  # which prompt gets per-module tensors


def make_prompts(tok: Tokenizer, vocab: int) -> list[list[int]]:
    bos = tok.token_to_id(BOS)
    rng = np.random.default_rng(1234)
    short = tok.encode("The quick brown fox jumps over the lazy dog.", add_special_tokens=False).ids
    long = tok.encode(
        "Redistribution and use in source and binary forms, with or without modification, are "
        "permitted "
        "provided that the following conditions are met: the software is provided as is.",
        add_special_tokens=False,
    ).ids
    assert len(short) >= 11 and len(long) >= 39
    return [
        [bos],  # length 1: BOS alone
        [int(i) for i in rng.integers(0, N_MERGE_VOCAB, size=5)],  # length 5: random ids, no BOS
        [bos] + short[:11],  # length 12
        [bos] + long[:39],  # length 40
    ]


def quant_codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FORMATS.md 0: s = 127 / clamp(absmax, 1e-5); q = clamp(round_half_even(x * s), -128, 127)."""
    x = x.float()
    s = 127 / x.abs().max(dim=-1, keepdim=True).values.clamp(min=1e-5)
    q = (x * s).round().clamp(-128, 127)
    return q, s


def effective_weight(module: AutoBitLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """(ternary T, scale w) with the weight the forward uses equal to T * w exactly (float32)."""
    if module.online_quant:
        w = module.weight.float()
        scale = 1.0 / w.abs().mean().clamp(min=1e-5)
        t = (w * scale).round().clamp(-1, 1)
        ws = (1.0 / scale).reshape(1)
        assert torch.equal(WeightQuant.apply(module.weight), t * ws)
        return t, ws
    return module.weight.detach().clone(), module.weight_scale.detach().float().clone()


@torch.no_grad()
def logits_of(model, ids: list[int]) -> np.ndarray:
    out = model(input_ids=torch.tensor([ids]), use_cache=False)
    return out.logits[0].float().numpy()


def top2_margin(logits: np.ndarray) -> np.ndarray:
    part = np.sort(logits, axis=-1)
    return (part[..., -1] - part[..., -2]).astype(np.float32)


@torch.no_grad()
def module_records(model, spec: Spec, ids: list[int]) -> dict[str, np.ndarray]:
    """Teacher-forced per-module tensors (layer 0 and the last layer) via forward hooks."""
    records: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    layer_out: list[torch.Tensor] = []
    handles = []
    layer_ids = sorted({0, spec.layers - 1})
    for layer in layer_ids:
        for proj in PROJ:
            module = model.get_submodule(f"model.layers.{layer}.{proj}")
            key = f"L{layer}_{proj.split('.')[1]}"

            def hook(mod, inp, out, key=key):
                records[key] = (inp[0].detach().clone(), out.detach().clone())

            handles.append(module.register_forward_hook(hook))
    for layer in model.model.layers:

        def layer_hook(mod, inp, out):
            layer_out.append((out[0] if isinstance(out, tuple) else out).detach().clone())

        handles.append(layer.register_forward_hook(layer_hook))
    out = model(input_ids=torch.tensor([ids]), use_cache=False, output_hidden_states=True)
    for h in handles:
        h.remove()
    arrays: dict[str, np.ndarray] = {}
    for layer in layer_ids:
        for proj in PROJ:
            key = f"L{layer}_{proj.split('.')[1]}"
            module = model.get_submodule(f"model.layers.{layer}.{proj}")
            x, y = records[key]
            x, y = x[0], y[0]
            q, s = quant_codes(x)
            # the codes/scales above are exactly what transformers' ActQuant feeds the matmul
            assert torch.equal(ActQuant.apply(x), q / s), key
            t, ws = effective_weight(module)
            if module.online_quant:
                ref = torch.nn.functional.linear(q / s, t * ws)
            else:
                ref = torch.nn.functional.linear(q / s, t) * ws
            assert torch.equal(ref, y), key
            arrays[key + "_in"] = x.numpy().astype(np.float32)
            arrays[key + "_codes"] = q.numpy().astype(np.int8)
            arrays[key + "_scale"] = s[:, 0].numpy().astype(np.float32)
            arrays[key + "_out"] = y.numpy().astype(np.float32)
            if layer == 0:
                arrays[key + "_weight"] = t.numpy().astype(np.int8)
                arrays[key + "_wscale"] = ws.numpy().astype(np.float32)
    arrays["hook_hidden_states"] = torch.stack([h[0] for h in out.hidden_states]).numpy()
    arrays["hook_layer_out"] = torch.stack([h[0] for h in layer_out]).numpy()
    return arrays


def tokenizer_records(folder: Path) -> tuple[dict[str, np.ndarray], dict]:
    hf = AutoTokenizer.from_pretrained(folder)
    arrays = {
        "hello_ids": np.array(hf("Hello world")["input_ids"], dtype=np.int32),
        "hello_ids_nobos": np.array(
            hf("Hello world", add_special_tokens=False)["input_ids"], dtype=np.int32
        ),
    }
    cases = {"encode": [], "chat": []}
    for text in TOKENIZER_TEXTS:
        ids = hf(text)["input_ids"]
        ids_ns = hf(text, add_special_tokens=False)["input_ids"]
        cases["encode"].append(
            {
                "text": text,
                "ids": ids,
                "ids_no_special": ids_ns,
                "decoded": hf.decode(ids_ns),
                "decoded_skip_special": hf.decode(ids, skip_special_tokens=True),
            }
        )
    for messages in CHAT_CASES:
        text = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        assert ids == hf(text, add_special_tokens=False)["input_ids"], (text, ids)
        cases["chat"].append(
            {"messages": messages, "add_generation_prompt": True, "text": text, "ids": ids}
        )
    chat0 = cases["chat"][0]
    arrays["chat_text"] = np.array(chat0["text"])
    arrays["chat_ids"] = np.array(chat0["ids"], dtype=np.int32)
    return arrays, cases


@torch.no_grad()
def reference_outputs(
    model, spec: Spec, prompts: list[list[int]]
) -> tuple[dict[str, np.ndarray], dict]:
    arrays: dict[str, np.ndarray] = {}
    stats: dict = {}
    for i, ids in enumerate(prompts):
        arrays[f"prompt{i}_ids"] = np.array(ids, dtype=np.int32)
        arrays[f"prompt{i}_logits"] = logits_of(model, ids)
    model.generation_config.eos_token_id = None  # FORMATS.md 8.9: otherwise it may stop early
    model.generation_config.pad_token_id = None
    for j, p in enumerate(GEN_PROMPTS):
        ids = prompts[p]
        out = model.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=N_NEW,
            min_new_tokens=N_NEW,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
        new = out.sequences[0, len(ids) :].tolist()
        assert len(new) == N_NEW, new
        full = ids + new
        tf = logits_of(model, full)
        steps = tf[len(ids) - 1 : len(ids) - 1 + N_NEW]
        margin = top2_margin(steps)
        step_scores = torch.stack(out.scores)[:, 0].float().numpy()
        arrays[f"gen{j}_prompt_index"] = np.array(p, dtype=np.int32)
        arrays[f"gen{j}_new_ids"] = np.array(new, dtype=np.int32)
        arrays[f"gen{j}_ids"] = np.array(full, dtype=np.int32)
        arrays[f"gen{j}_logits"] = tf
        arrays[f"gen{j}_margin"] = margin
        arrays[f"gen{j}_step_margin"] = top2_margin(step_scores)
        agree = steps.argmax(-1) == np.array(new)
        stats[f"gen{j}"] = {
            "new_ids": new,
            "distinct": len(set(new)),
            "min_margin": float(margin.min()),
            "teacher_forced_argmax_agrees": int(agree.sum()),
            "disagreements_with_margin_gt_0.5": int((~agree & (margin > 0.5)).sum()),
            "cached_vs_full_max_abs": float(np.abs(step_scores - steps).max()),
        }
    arrays["hook_prompt_index"] = np.array(HOOK_PROMPT, dtype=np.int32)
    arrays.update(module_records(model, spec, prompts[HOOK_PROMPT]))
    long = arrays[f"prompt{len(prompts) - 1}_logits"]
    stats["logits_std"] = float(long.std())
    stats["logits_row_range_mean"] = float((long.max(-1) - long.min(-1)).mean())
    stats["min_top2_margin_long_prompt"] = float(top2_margin(long).min())
    hs = arrays["hook_layer_out"]
    emb = arrays["hook_hidden_states"][0]
    stats["layer_out_rms"] = [float(np.sqrt((h**2).mean())) for h in hs]
    stats["embedding_rms"] = float(np.sqrt((emb**2).mean()))
    return arrays, stats


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def build(out_dir: Path) -> None:
    torch.manual_seed(0)
    tok, tok_info = build_tokenizer()
    vocab = tok.get_vocab_size()
    ids = {name: tok.token_to_id(name) for name in (BOS, EOS, EOT)}
    tok_dir = out_dir / "_tokenizer_tmp"
    shutil.rmtree(tok_dir, ignore_errors=True)
    tok_dir.mkdir(parents=True)
    tok.save(str(tok_dir / "tokenizer.json"))
    write_json(tok_dir / "tokenizer_config.json", tokenizer_config(tok))
    prompts = make_prompts(tok, vocab)

    provenance = {
        "command": "python tools/make_fixtures.py",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "safetensors": safetensors.__version__,
            "numpy": np.__version__,
        },
        "tokenizer": tok_info | {"bos_id": ids[BOS], "eos_id": ids[EOS], "eot_id": ids[EOT]},
        "models": {},
    }
    masters_cache: dict[str, dict[str, torch.Tensor]] = {}
    expected_cache: dict[str, dict[str, np.ndarray]] = {}
    tok_cases = None
    for spec in SPECS:
        folder = out_dir / spec.name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        cfg = config_dict(spec, vocab, ids)
        masters = masters_cache.get(spec.weights_from or "") or master_weights(spec, vocab)
        masters_cache[spec.name] = masters
        tensors = checkpoint_tensors(spec, masters)
        write_checkpoint(folder, spec, tensors)
        write_json(folder / "config.json", cfg)
        gen_cfg = {
            "bos_token_id": ids[BOS],
            "eos_token_id": [ids[EOS], ids[EOT]],
            "transformers_version": transformers.__version__,
        }
        write_json(folder / "generation_config.json", gen_cfg)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(tok_dir / name, folder / name)

        # references from the checkpoint as transformers loads it
        model = load_pretrained(folder)
        assert model.config.rope_parameters["rope_theta"] == spec.rope_theta
        arrays, stats = reference_outputs(model, spec, prompts)
        # ... and the model built in memory must agree with it
        mem = in_memory_model(spec, cfg, tensors)
        for i, p in enumerate(prompts):
            diff = max_abs(logits_of(mem, p), arrays[f"prompt{i}_logits"])
            assert diff <= 1e-5, (spec.name, i, diff)
        for j in range(len(GEN_PROMPTS)):
            diff = max_abs(logits_of(mem, arrays[f"gen{j}_ids"].tolist()), arrays[f"gen{j}_logits"])
            assert diff <= 1e-5, (spec.name, "gen", j, diff)
        tok_arrays, tok_cases = tokenizer_records(folder)
        arrays.update(tok_arrays)
        arrays["bos_id"] = np.array(ids[BOS], dtype=np.int32)
        arrays["eos_id"] = np.array(ids[EOS], dtype=np.int32)
        arrays["eot_id"] = np.array(ids[EOT], dtype=np.int32)
        if spec.weights_from:  # same weights, other file layout: identical references
            ref = expected_cache[spec.weights_from]
            assert ref.keys() == arrays.keys()
            for key in ref:
                assert np.array_equal(ref[key], arrays[key]), (spec.name, key)
        save_npz(folder / "expected.npz", arrays)
        expected_cache[spec.name] = arrays

        scales = {k: round(float(v), 5) for k, v in tensors.items() if k.endswith("weight_scale")}
        stats["weight_scale_range"] = (
            [min(scales.values()), max(scales.values())] if scales else None
        )
        zeros = []
        for name in tensors:
            if any(name.endswith(p + ".weight") for p in PROJ):
                t = model.get_submodule(name[: -len(".weight")])
                zeros.append(float((effective_weight(t)[0] == 0).float().mean()))
        stats["ternary_zero_fraction"] = [round(min(zeros), 3), round(max(zeros), 3)]
        provenance["models"][spec.name] = {
            "seed": spec.seed,
            "mode": spec.mode,
            "emb_std": spec.emb_std,
            "w_std": spec.w_std,
            "max_shard_bytes": spec.max_shard_bytes,
            "weights_from": spec.weights_from,
            "stats": stats,
        }
        print(f"{spec.name}: {json.dumps(stats)}")
    shutil.rmtree(tok_dir)
    write_json(out_dir / "tokenizer_cases.json", tok_cases)
    write_json(out_dir / "provenance.json", provenance)


def numpy_forward(folder: Path, ids: list[int], trace: dict | None = None) -> np.ndarray:
    """FORMATS.md 0-2 written out in numpy float32, independent of transformers' modules: a check
    that the fixtures mean what the format document says (and a readable model of trit's math)."""
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    raw = {}
    for path in sorted(folder.glob("*.safetensors")):
        raw.update(
            {
                k: v.float().numpy() if v.is_floating_point() else v.numpy()
                for k, v in load_file(path).items()
            }
        )
    eps = cfg["rms_norm_eps"]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg["hidden_size"] // heads
    n = len(ids)

    def rmsnorm(x, w):
        return w * (x / np.sqrt((x * x).mean(-1, keepdims=True) + eps))

    def bitlinear(x, name):
        w = raw[name + ".weight"]
        if w.dtype == np.uint8:  # packed: 4 row blocks, code = value + 1 in bits 2i..2i+1
            t = np.concatenate([((w >> (2 * i)) & 3).astype(np.float32) - 1 for i in range(4)])
            ws = raw[name + ".weight_scale"][0]
        else:  # online: absmean ternarisation of the master, in float32
            inv = np.float32(1) / np.maximum(np.abs(w).mean(dtype=np.float32), np.float32(1e-5))
            t = np.clip(np.rint(w * inv), -1, 1)
            ws = np.float32(1) / inv
        sx = np.float32(127) / np.maximum(np.abs(x).max(-1, keepdims=True), np.float32(1e-5))
        q = np.clip(np.rint(x * sx), -128, 127)  # np.rint rounds half to even
        if trace is not None:
            trace[name] = (x, q, sx[:, 0])
        return ((q / sx) @ t.T) * ws

    inv_freq = 1.0 / (
        cfg["rope_theta"] ** (np.arange(0, hd, 2, dtype=np.int64).astype(np.float32) / hd)
    )
    ang = np.arange(n, dtype=np.float32)[:, None] * inv_freq[None, :].astype(np.float32)
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rope(x):  # x [heads, n, hd], rotate_half pairs j and j + hd/2
        rot = np.concatenate([-x[..., hd // 2 :], x[..., : hd // 2]], -1)
        return x * cos + rot * sin

    h = raw["model.embed_tokens.weight"][ids]  # [n, hidden]
    mask = np.triu(np.full((n, n), -np.inf, dtype=np.float32), 1)
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        a = rmsnorm(h, raw[p + "input_layernorm.weight"])
        q = rope(bitlinear(a, p + "self_attn.q_proj").reshape(n, heads, hd).transpose(1, 0, 2))
        k = rope(bitlinear(a, p + "self_attn.k_proj").reshape(n, kv_heads, hd).transpose(1, 0, 2))
        v = bitlinear(a, p + "self_attn.v_proj").reshape(n, kv_heads, hd).transpose(1, 0, 2)
        group = heads // kv_heads
        k, v = (
            np.repeat(k, group, axis=0),
            np.repeat(v, group, axis=0),
        )  # kv head j serves q heads j*g..
        scores = q @ k.transpose(0, 2, 1) * np.float32(hd**-0.5) + mask
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        o = (probs @ v).transpose(1, 0, 2).reshape(n, heads * hd)
        h = h + bitlinear(
            rmsnorm(o, raw[p + "self_attn.attn_sub_norm.weight"]), p + "self_attn.o_proj"
        )
        m = rmsnorm(h, raw[p + "post_attention_layernorm.weight"])
        z = np.maximum(bitlinear(m, p + "mlp.gate_proj"), 0) ** 2 * bitlinear(m, p + "mlp.up_proj")
        h = h + bitlinear(rmsnorm(z, raw[p + "mlp.ffn_sub_norm.weight"]), p + "mlp.down_proj")
    return rmsnorm(h, raw["model.norm.weight"]) @ raw["model.embed_tokens.weight"].T


def verify(out_dir: Path) -> None:
    """Reload every folder from disk and compare with what was recorded."""
    cases = json.loads((out_dir / "tokenizer_cases.json").read_text(encoding="utf-8"))
    for spec in SPECS:
        folder = out_dir / spec.name
        with np.load(folder / "expected.npz", allow_pickle=False) as npz:
            exp = {k: npz[k] for k in npz.files}
        model = load_pretrained(folder)
        worst = 0.0
        for key in sorted(k for k in exp if k.endswith("_ids") and k.startswith("prompt")):
            i = key[len("prompt") : -len("_ids")]
            worst = max(
                worst, max_abs(logits_of(model, exp[key].tolist()), exp[f"prompt{i}_logits"])
            )
        for j in range(len(GEN_PROMPTS)):
            worst = max(
                worst, max_abs(logits_of(model, exp[f"gen{j}_ids"].tolist()), exp[f"gen{j}_logits"])
            )
        hook = module_records(
            model, spec, exp[f"prompt{int(exp['hook_prompt_index'])}_ids"].tolist()
        )
        for key, value in hook.items():
            if value.dtype.kind == "f":
                worst = max(worst, max_abs(value, exp[key]))
            else:
                assert np.array_equal(value, exp[key]), (spec.name, key)
        assert worst <= 1e-5, (spec.name, worst)
        # greedy again, free-running
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = None
        for j in range(len(GEN_PROMPTS)):
            prompt = exp[f"gen{j}_ids"][: len(exp[f"gen{j}_ids"]) - N_NEW]
            seq = model.generate(
                input_ids=torch.tensor([prompt.tolist()]), max_new_tokens=N_NEW, do_sample=False
            )
            assert np.array_equal(seq[0, len(prompt) :].numpy(), exp[f"gen{j}_new_ids"]), (
                spec.name,
                j,
            )
        # packing: transformers' unpack of the raw bytes == the ternary weights the model holds
        raw = {}
        for path in sorted(folder.glob("*.safetensors")):
            raw.update(load_file(path))
        for name, t in raw.items():
            if t.dtype == torch.uint8:
                module = model.get_submodule(name[: -len(".weight")])
                unpacked = unpack_weights(t, dtype=torch.float32)
                assert torch.equal(unpacked, module.weight.float()), name
                assert set(unpacked.unique().tolist()) == {-1.0, 0.0, 1.0}, name
                assert np.array_equal(t.numpy(), pack_reference(unpacked.numpy())), name
            else:
                assert t.dtype == torch.bfloat16, (name, t.dtype)
        if spec.max_shard_bytes:
            index = json.loads((folder / "model.safetensors.index.json").read_text())
            assert set(index["weight_map"]) == set(raw), spec.name
            assert len(set(index["weight_map"].values())) == 2
            layer0 = {f for k, f in index["weight_map"].items() if k.startswith("model.layers.0.")}
            assert len(layer0) == 2, "layer 0 should straddle the two shards"
            assert not (folder / "model.safetensors").exists()
        # tokenizer
        hf = AutoTokenizer.from_pretrained(folder)
        assert hf("Hello world")["input_ids"] == exp["hello_ids"].tolist()
        for case in cases["encode"]:
            assert hf(case["text"])["input_ids"] == case["ids"], case["text"]
        for case in cases["chat"]:
            text = hf.apply_chat_template(
                case["messages"], add_generation_prompt=True, tokenize=False
            )
            assert text == case["text"], text
        assert str(exp["chat_text"]) == cases["chat"][0]["text"]
        # the format document's math in numpy: close on short prompts, same argmax where decided
        np_diff = {}
        for key in sorted(k for k in exp if k.endswith("_ids") and k.startswith(("prompt", "gen"))):
            logits_key = key.replace("_new_ids", "").replace("_ids", "_logits")
            if key.endswith("_new_ids"):
                continue
            ref = exp[logits_key]
            got = numpy_forward(folder, exp[key].tolist())
            np_diff[key] = max_abs(got, ref)
            decided = top2_margin(ref) > 0.5
            assert (got.argmax(-1) == ref.argmax(-1))[decided].all(), (spec.name, key)
            # longer prompts may move more: one flipped int8 code gets amplified (FORMATS.md 9)
            assert len(ref) > 5 or np_diff[key] <= 1e-4, (spec.name, key, np_diff[key])
        summary = ", ".join(f"{k[:-4]} {v:.1e}" for k, v in np_diff.items())
        print(
            f"verified {spec.name}: reload max |diff| {worst:.1e}; numpy re-implementation: "
            f"{summary}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="fixtures folder (default tests/fixtures)"
    )
    parser.add_argument("--verify", action="store_true", help="only re-check existing fixtures")
    args = parser.parse_args()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    if not args.verify:
        build(args.out)
    verify(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
