"""Tiny random checkpoints of the other BitNet b1.58 families, with reference outputs.

Dev-only, like tools/make_fixtures.py (whose tokenizer, prompts and file helpers it reuses); run
it in the same throwaway venv:

    /tmp/fixvenv/bin/python tools/make_family_fixtures.py           # rebuild, then verify
    /tmp/fixvenv/bin/python tools/make_family_fixtures.py --verify  # only re-check

Families (docs/formats.md "Model families"):
- `LlamaForCausalLM` with transformers' bitnet quantization (`BitLinear`: packed U8 weights and
  `weight_scale = 1/mean|W|`, divided), as Falcon3-*-1.58bit, Falcon-E and
  HF1BitLLM/Llama3-8B-1.58 publish them. The references come from transformers itself: the
  folder is read back with `LlamaForCausalLM.from_pretrained`.
- 1bitLLM's `BitnetForCausalLM` (bitnet_b1_58-large / -3B), whose modeling code lives in the
  model repo, not in transformers. The reference is transformers' Llama with that code's three
  differences put in: its `BitLinear` (online absmean weights, per-token absmax activations, both
  in float32, straight-through form), `inner_attn_ln` before o_proj and `ffn_layernorm` before
  down_proj (see `OneBitLinear` and `one_bit_llm`).

tests/fixtures/README.md documents the files; expected.npz has the keys of the 2B4T fixtures'
(prompts, greedy runs, tokenizer) plus per-module records of layer 0.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as base  # noqa: E402  (sets TORCHDYNAMO_DISABLE before torch is imported)
import numpy as np  # noqa: E402
import safetensors  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.integrations.bitnet import BitLinear, pack_weights, unpack_weights  # noqa: E402

PROJ = base.PROJ

# Chat templates of the fixtures. Llama 3's is the published one reduced to what the tiny
# tokenizer has (no header tokens: "<|start_header_id|>" is plain text here) [U]; Falcon3's
# <|system|>/<|user|>/<|assistant|> layout is recalled, not downloaded [U].
LLAMA3_CHAT = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)
FALCON3_CHAT = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class FamilySpec:
    name: str
    family: str  # "llama": LlamaForCausalLM + bitnet quantization; "1bitllm"
    seed: int
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    rope_theta: float
    tied: bool
    quantization: dict | None
    rope_scaling: dict | None = None
    chat_template: str = LLAMA3_CHAT
    add_bos: bool = True  # whether the tokenizer's post-processor adds <|begin_of_text|>
    extra: dict = field(default_factory=dict)  # more config.json keys


SPECS = [
    # Falcon3-*-1.58bit: untied head, large rope_theta, head_dim given explicitly (here not
    # hidden / heads, to exercise that path), no BOS, its own chat layout.
    FamilySpec(
        "tiny-falcon3-1.58bit",
        "llama",
        41,
        64,
        160,
        2,
        4,
        2,
        24,
        1000042.0,
        False,
        {"quant_method": "bitnet"},
        chat_template=FALCON3_CHAT,
        add_bos=False,
    ),
    # Falcon-E: modules_to_not_convert names lm_head, tied embedding.
    FamilySpec(
        "tiny-falcon-e",
        "llama",
        42,
        64,
        160,
        2,
        4,
        2,
        16,
        10000.0,
        True,
        {"quant_method": "bitnet", "modules_to_not_convert": ["lm_head"]},
        extra={"pretraining_tp": 1},
    ),
    # Llama 3 shape family (HF1BitLLM): untied, Llama 3 RoPE scaling, and use_rms_norm.
    FamilySpec(
        "tiny-llama3-1.58bit",
        "llama",
        43,
        64,
        160,
        2,
        4,
        2,
        16,
        500000.0,
        False,
        {"quant_method": "bitnet", "use_rms_norm": True},
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    # 1bitLLM: float16 masters, MHA, sub-norms, untied head.
    FamilySpec("tiny-1bitllm", "1bitllm", 44, 64, 160, 2, 4, 4, 16, 10000.0, False, None),
]


def proj_shape(spec: FamilySpec, proj: str) -> tuple[int, int]:
    q, kv = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
    return {
        "self_attn.q_proj": (q, spec.hidden),
        "self_attn.k_proj": (kv, spec.hidden),
        "self_attn.v_proj": (kv, spec.hidden),
        "self_attn.o_proj": (spec.hidden, q),
        "mlp.gate_proj": (spec.inter, spec.hidden),
        "mlp.up_proj": (spec.inter, spec.hidden),
        "mlp.down_proj": (spec.hidden, spec.inter),
    }[proj]


def config_dict(spec: FamilySpec, vocab: int, ids: dict) -> dict:
    cfg = {
        "architectures": ["BitnetForCausalLM" if spec.family == "1bitllm" else "LlamaForCausalLM"],
        "attention_bias": False,
        "bos_token_id": ids[base.BOS],
        "eos_token_id": ids[base.EOS],
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "hidden_size": spec.hidden,
        "initializer_range": 0.02,
        "intermediate_size": spec.inter,
        "max_position_embeddings": 256,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": spec.heads,
        "num_hidden_layers": spec.layers,
        "num_key_value_heads": spec.kv_heads,
        "rms_norm_eps": 1e-05 if spec.family == "1bitllm" else 1e-06,
        "rope_scaling": spec.rope_scaling,
        "rope_theta": spec.rope_theta,
        "tie_word_embeddings": spec.tied,
        "torch_dtype": "float16" if spec.family == "1bitllm" else "bfloat16",
        "use_cache": True,
        "vocab_size": vocab,
    }
    if spec.family == "1bitllm":
        cfg |= {"input_bits": 8, "weight_bits": 1}
    else:
        cfg["quantization_config"] = spec.quantization
    return cfg | spec.extra


def master_weights(spec: FamilySpec, vocab: int) -> dict[str, torch.Tensor]:
    """Random float masters, bf16-exact (fp16-exact for 1bitLLM), in state_dict order."""
    g = torch.Generator().manual_seed(spec.seed)

    def randn(shape, std):
        return torch.randn(shape, generator=g) * std

    def unif(shape, lo, hi):
        return lo + (hi - lo) * torch.rand(shape, generator=g)

    w = {"model.embed_tokens.weight": randn((vocab, spec.hidden), 0.5)}
    for layer in range(spec.layers):
        p = f"model.layers.{layer}."
        w[p + "input_layernorm.weight"] = unif((spec.hidden,), 0.5, 1.5)
        w[p + "post_attention_layernorm.weight"] = unif((spec.hidden,), 0.5, 1.5)
        if spec.family == "1bitllm":
            w[p + "self_attn.inner_attn_ln.weight"] = unif((spec.hidden,), 0.5, 2.0) * (1 + layer)
            w[p + "mlp.ffn_layernorm.weight"] = unif((spec.inter,), 0.5, 2.0) * (1 + layer)
        for proj in PROJ:
            factor = float(unif((1,), 0.5, 2.0))
            std = 1.0 if spec.family == "1bitllm" else 0.3
            w[p + proj + ".weight"] = randn(proj_shape(spec, proj), std * factor)
            if spec.quantization and spec.quantization.get("use_rms_norm"):
                # BitLinear's own LlamaRMSNorm over the projection's input
                n_in = proj_shape(spec, proj)[1]
                w[p + proj + ".rms_norm.weight"] = unif((n_in,), 0.5, 1.5)
    w["model.norm.weight"] = unif((spec.hidden,), 0.5, 1.5)
    if not spec.tied:
        w["lm_head.weight"] = randn((vocab, spec.hidden), 0.5)
    dtype = torch.float16 if spec.family == "1bitllm" else torch.bfloat16
    return {k: v.to(dtype).to(torch.float32) for k, v in w.items()}


def checkpoint_tensors(spec: FamilySpec, masters: dict[str, torch.Tensor]) -> dict:
    """BitLinear's on-disk layout: U8 [out/4, in] + weight_scale = 1/mean|W| (bf16 [1]), as
    Falcon-E's `quantize_to_1bit` writes it; 1bitLLM keeps its float16 masters."""
    out = {}
    for name, w in masters.items():
        is_proj = any(name.endswith(p + ".weight") for p in PROJ) and "rms_norm" not in name
        if spec.family == "1bitllm":
            out[name] = w.to(torch.float16)
            continue
        if not is_proj:
            out[name] = w.to(torch.bfloat16)
            continue
        inv_mean = 1.0 / w.abs().mean().clamp(min=1e-5)
        t = (w * inv_mean).round().clamp(-1, 1)
        assert set(t.unique().tolist()) == {-1.0, 0.0, 1.0}, name
        packed = pack_weights(t.clone())
        assert np.array_equal(packed.numpy(), base.pack_reference(t.numpy())), name
        assert torch.equal(unpack_weights(packed, dtype=torch.float32), t), name
        out[name] = packed
        out[name[: -len("weight")] + "weight_scale"] = inv_mean.reshape(1).to(torch.bfloat16)
    return out


# --------------------------------------------------------------------------------------------------
# 1bitLLM's model: transformers' Llama with the published modeling code's differences
# --------------------------------------------------------------------------------------------------


def weight_quant(w: torch.Tensor) -> torch.Tensor:
    """1bitLLM utils_quant.weight_quant: absmean ternarisation in float32, cast back."""
    dtype = w.dtype
    w = w.float()
    s = 1 / w.abs().mean().clamp(min=1e-5)
    return ((w * s).round().clamp(-1, 1) / s).type(dtype)


def activation_quant(x: torch.Tensor) -> torch.Tensor:
    """1bitLLM utils_quant.activation_quant: per-token absmax int8 in float32, cast back."""
    dtype = x.dtype
    x = x.float()
    s = 127 / x.abs().max(dim=-1, keepdim=True).values.clamp(min=1e-5)
    return ((x * s).round().clamp(-128, 127) / s).type(dtype)


class OneBitLinear(torch.nn.Linear):
    """1bitLLM utils_quant.BitLinear (weight_bits 1, input_bits 8), straight-through form."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quant_input = x + (activation_quant(x) - x).detach()
        quant_weight = self.weight + (weight_quant(self.weight) - self.weight).detach()
        return torch.nn.functional.linear(quant_input, quant_weight)


class NormThen(torch.nn.Module):
    """A sub-norm followed by a projection: 1bitLLM runs `inner_attn_ln` right before o_proj
    and `ffn_layernorm` right before down_proj, which is this in Llama's module tree."""

    def __init__(self, norm: torch.nn.Module, proj: torch.nn.Module) -> None:
        super().__init__()
        self.norm, self.proj = norm, proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x))


def one_bit_llm(cfg: dict, tensors: dict[str, torch.Tensor]) -> LlamaForCausalLM:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    config = LlamaConfig.from_dict(cfg)
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config)
    eps = config.rms_norm_eps
    for layer in model.model.layers:
        for proj in PROJ:
            old = layer.get_submodule(proj)
            layer.set_submodule(proj, OneBitLinear(old.in_features, old.out_features, bias=False))
        attn, mlp = layer.self_attn, layer.mlp
        attn.o_proj = NormThen(LlamaRMSNorm(config.hidden_size, eps=eps), attn.o_proj)
        mlp.down_proj = NormThen(LlamaRMSNorm(config.intermediate_size, eps=eps), mlp.down_proj)
    renamed = {}
    for name, t in tensors.items():
        name = name.replace("self_attn.inner_attn_ln.", "self_attn.o_proj.norm.")
        name = name.replace("mlp.ffn_layernorm.", "mlp.down_proj.norm.")
        for p in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
            name = name.replace(p, p.replace(".weight", ".proj.weight"))
        renamed[name] = t.to(torch.float32)
    missing, unexpected = model.load_state_dict(renamed, strict=False)
    allowed = [] if not cfg["tie_word_embeddings"] else ["lm_head.weight"]
    assert list(missing) == allowed and not unexpected, (missing, unexpected)
    return model.to(torch.float32).eval()


def load_reference(folder: Path, spec: FamilySpec, cfg: dict, tensors: dict):
    if spec.family == "1bitllm":
        return one_bit_llm(cfg, tensors)
    model, info = LlamaForCausalLM.from_pretrained(
        folder, attn_implementation="eager", output_loading_info=True, dtype=torch.float32
    )
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(key), (folder.name, key, info[key])
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, BitLinear), type(q)
    assert type(model.lm_head) is torch.nn.Linear
    return model.to(torch.float32).eval()


# --------------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def module_records(model, spec: FamilySpec, ids: list[int]) -> dict[str, np.ndarray]:
    """Layer 0's projections: input, output, and the ternary weight with its multiplier."""
    records = {}
    handles = []
    for proj in PROJ:
        module = model.get_submodule(f"model.layers.0.{proj}")
        if isinstance(module, NormThen):
            module = module.proj
        key = proj.split(".")[1]

        def hook(mod, inp, out, key=key):
            records[key] = (inp[0][0].detach().clone(), out[0].detach().clone())

        handles.append(module.register_forward_hook(hook))
    model(input_ids=torch.tensor([ids]), use_cache=False)
    for h in handles:
        h.remove()
    arrays = {}
    for proj in PROJ:
        key = proj.split(".")[1]
        module = model.get_submodule(f"model.layers.0.{proj}")
        module = module.proj if isinstance(module, NormThen) else module
        x, y = records[key]
        if getattr(module, "rms_norm", None) is not None:
            x = module.rms_norm(x)  # use_rms_norm: the input as it is quantised
        if isinstance(module, BitLinear):
            t = unpack_weights(module.weight, dtype=torch.float32)
            ws = (1.0 / module.weight_scale.float()).reshape(1)
        else:
            w = module.weight.float()
            s = 1 / w.abs().mean().clamp(min=1e-5)
            t = (w * s).round().clamp(-1, 1)
            ws = (1 / s).reshape(1)
        arrays[f"L0_{key}_in"] = x.float().numpy()
        arrays[f"L0_{key}_out"] = y.float().numpy()
        arrays[f"L0_{key}_weight"] = t.numpy().astype(np.int8)
        arrays[f"L0_{key}_wscale"] = ws.float().numpy()
    return arrays


@torch.no_grad()
def reference_outputs(model, spec: FamilySpec, prompts: list[list[int]]) -> tuple[dict, dict]:
    arrays: dict[str, np.ndarray] = {}
    stats: dict = {}
    for i, ids in enumerate(prompts):
        arrays[f"prompt{i}_ids"] = np.array(ids, dtype=np.int32)
        arrays[f"prompt{i}_logits"] = base.logits_of(model, ids)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    for j, p in enumerate(base.GEN_PROMPTS):
        ids = prompts[p]
        out = model.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=base.N_NEW,
            min_new_tokens=base.N_NEW,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
        new = out.sequences[0, len(ids) :].tolist()
        full = ids + new
        tf = base.logits_of(model, full)
        steps = tf[len(ids) - 1 : len(ids) - 1 + base.N_NEW]
        margin = base.top2_margin(steps)
        step_scores = torch.stack(out.scores)[:, 0].float().numpy()
        arrays[f"gen{j}_prompt_index"] = np.array(p, dtype=np.int32)
        arrays[f"gen{j}_new_ids"] = np.array(new, dtype=np.int32)
        arrays[f"gen{j}_ids"] = np.array(full, dtype=np.int32)
        arrays[f"gen{j}_logits"] = tf
        arrays[f"gen{j}_margin"] = margin
        arrays[f"gen{j}_step_margin"] = base.top2_margin(step_scores)
        stats[f"gen{j}"] = {
            "new_ids": new,
            "decided_steps": int((margin > 0.5).sum()),
            "cached_vs_full_max_abs": float(np.abs(step_scores - steps).max()),
        }
    arrays["hook_prompt_index"] = np.array(base.HOOK_PROMPT, dtype=np.int32)
    arrays.update(module_records(model, spec, prompts[base.HOOK_PROMPT]))
    long = arrays[f"prompt{len(prompts) - 1}_logits"]
    stats["logits_std"] = float(long.std())
    return arrays, stats


def tokenizer_files(tok, spec: FamilySpec, out: Path) -> None:
    tok = tokenizers.Tokenizer.from_str(tok.to_str())
    if not spec.add_bos:
        tok.post_processor = tokenizers.processors.ByteLevel(
            add_prefix_space=True, trim_offsets=False, use_regex=True
        )
    tok.save(str(out / "tokenizer.json"))
    cfg = base.tokenizer_config(tok)
    cfg["chat_template"] = spec.chat_template
    base.write_json(out / "tokenizer_config.json", cfg)


@torch.no_grad()
def tokenizer_records(folder: Path) -> dict[str, np.ndarray]:
    hf = AutoTokenizer.from_pretrained(folder)
    arrays = {"hello_ids": np.array(hf("Hello world")["input_ids"], dtype=np.int32)}
    for i, messages in enumerate(base.CHAT_CASES):
        text = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if not isinstance(ids, list):
            ids = ids["input_ids"]
        arrays[f"chat{i}_text"] = np.array(text)
        arrays[f"chat{i}_ids"] = np.array(ids, dtype=np.int32)
    return arrays


def build(out_dir: Path) -> None:
    torch.manual_seed(0)
    tok, tok_info = base.build_tokenizer()
    vocab = tok.get_vocab_size()
    ids = {name: tok.token_to_id(name) for name in (base.BOS, base.EOS, base.EOT)}
    prompts = base.make_prompts(tok, vocab)
    provenance = {
        "command": "python tools/make_family_fixtures.py",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "safetensors": safetensors.__version__,
            "numpy": np.__version__,
        },
        "tokenizer": tok_info | {"bos_id": ids[base.BOS], "eos_id": ids[base.EOS]},
        "models": {},
    }
    for spec in SPECS:
        folder = out_dir / spec.name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        cfg = config_dict(spec, vocab, ids)
        tensors = checkpoint_tensors(spec, master_weights(spec, vocab))
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        base.write_json(folder / "config.json", cfg)
        base.write_json(
            folder / "generation_config.json",
            {
                "bos_token_id": ids[base.BOS],
                "eos_token_id": [ids[base.EOS], ids[base.EOT]],
                "transformers_version": transformers.__version__,
            },
        )
        tokenizer_files(tok, spec, folder)
        model = load_reference(folder, spec, cfg, tensors)
        arrays, stats = reference_outputs(model, spec, prompts)
        arrays.update(tokenizer_records(folder))
        base.save_npz(folder / "expected.npz", arrays)
        provenance["models"][spec.name] = {
            "seed": spec.seed,
            "family": spec.family,
            "stats": stats,
        }
        print(f"{spec.name}: {json.dumps(stats)}")
    base.write_json(out_dir / "families-provenance.json", provenance)


def verify(out_dir: Path) -> None:
    for spec in SPECS:
        folder = out_dir / spec.name
        with np.load(folder / "expected.npz", allow_pickle=False) as npz:
            exp = {k: npz[k] for k in npz.files}
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        tensors = load_file(folder / "model.safetensors")
        model = load_reference(folder, spec, cfg, tensors)
        worst = 0.0
        for key in sorted(k for k in exp if k.startswith("prompt") and k.endswith("_ids")):
            got = base.logits_of(model, exp[key].tolist())
            worst = max(worst, base.max_abs(got, exp[key.replace("_ids", "_logits")]))
        assert worst <= 1e-5, (spec.name, worst)
        print(f"verified {spec.name}: reload max |diff| {worst:.1e}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=base.DEFAULT_OUT)
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
