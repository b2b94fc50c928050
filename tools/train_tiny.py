"""Train the tiny BitNet b1.58 model that ships in the wheel (python/trit/models/tiny-fortunes/).

Dev-only, like tools/make_fixtures.py (whose tokenizer, config, packing and checkpoint code it
imports): CI never runs it and never needs torch. It runs on CPU in the same throwaway venv:

    apt-get install -y fortunes fortunes-min      # the corpus (Debian, BSD licence)
    /tmp/fixvenv/bin/python tools/train_tiny.py   # ~50 min on one core; resumes after a crash

What it does:
1. Corpus: the Debian `fortunes` + `fortunes-min` cookie files (not the offensive set), split into
   entries, cleaned (overstrike sequences removed, trailing spaces stripped) and deduplicated.
   A seeded shuffle holds out ~60 KB of entries for validation; that text is written to
   tests/fixtures/tiny-fortunes-valid.txt in the fortune-file format ("entry\\n%\\n" per entry).
2. Tokenizer: a byte-level BPE trained on the training split, built exactly like the fixtures'
   Llama-3-style tokenizer (same split regex, ByteLevel, BOS post-processor, specials last).
3. Model: transformers' `BitNetForCausalLM` (the 2B4T architecture) with every projection an
   `AutoBitLinear(online_quant=True)`: absmean ternary weights and per-token absmax int8
   activations in the forward pass, straight-through gradients (FORMATS.md 4). AdamW, linear
   warm-up, cosine decay, gradient clipping; float32; one thread; seeded. A checkpoint is written
   every few hundred steps to --work and training resumes from it.
4. Export in the packed 2B4T format (U8 [out/4, in] + BF16 weight_scale = mean|W|, BF16
   embeddings and norms, quantization_mode "offline"), reload with `from_pretrained`, and check
   that transformers' perplexity on the validation text equals this script's own evaluation.
   The numbers go to tests/fixtures/tiny-fortunes-eval.json, samples and provenance to the
   model folder's README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

# before torch is imported (make_fixtures sets it too): eager quantisation functions
os.environ["TORCHDYNAMO_DISABLE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_fixtures as mf  # noqa: E402  (tools/make_fixtures.py)
import numpy as np  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import AutoTokenizer, BitNetConfig, BitNetForCausalLM  # noqa: E402
from transformers.integrations.bitnet import ActQuant, AutoBitLinear, WeightQuant  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "python" / "trit" / "models" / "tiny-fortunes"
VALID_TXT = REPO / "tests" / "fixtures" / "tiny-fortunes-valid.txt"
EVAL_JSON = REPO / "tests" / "fixtures" / "tiny-fortunes-eval.json"

# --------------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------------

FORTUNE_DIR = Path("/usr/share/games/fortunes")
FORTUNE_PACKAGES = ["fortunes", "fortunes-min"]
# Not prose (ascii-art: pictures) or not wanted in a model that ships to everyone (ethnic jokes).
# The offensive set (fortunes-off, under off/) is not installed and never read.
EXCLUDED_SETS = {"ascii-art", "ethnic"}
VALID_MAX_BYTES = 60_000  # validation text: held-out entries up to this size
SEPARATOR = "%\n"  # fortune-file format: every entry is followed by a line holding only "%"


def clean_entry(text: str) -> str:
    text = re.sub(r".\x08", "", text)  # overstrike ("_\bx" underlines, "x\bx" bold)
    text = text.replace("\r", "")
    text = "".join(c for c in text if c in "\n\t" or c >= " ")
    lines = [line.rstrip() for line in text.split("\n")]
    return "\n".join(lines).strip("\n")


def read_corpus() -> tuple[list[str], dict]:
    """Every entry of every installed (non-offensive) fortune set, cleaned, first copy kept."""
    files = sorted(
        p
        for p in FORTUNE_DIR.iterdir()
        if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8")
    )
    files = [p for p in files if p.name not in EXCLUDED_SETS]
    if not files:
        raise SystemExit("no fortune files: apt-get install -y fortunes fortunes-min")
    entries: list[str] = []
    seen: set[str] = set()
    file_info = {}
    duplicates = 0
    for path in files:
        raw = path.read_bytes()
        text = raw.decode("utf-8", errors="replace")
        count = 0
        for chunk in re.split(r"^%[ \t]*$", text, flags=re.M):
            entry = clean_entry(chunk)
            if not entry.strip():
                continue
            key = " ".join(entry.split())
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            entries.append(entry)
            count += 1
        file_info[path.name] = {"sha256": hashlib.sha256(raw).hexdigest(), "entries": count}
    versions = {}
    for pkg in FORTUNE_PACKAGES:
        try:
            versions[pkg] = subprocess.run(
                ["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True
            ).stdout
        except OSError:
            versions[pkg] = None
    info = {
        "packages": versions,
        "directory": str(FORTUNE_DIR),
        "files": file_info,
        "excluded_sets": sorted(EXCLUDED_SETS),
        "duplicates_dropped": duplicates,
        "entries": len(entries),
        "sha256": hashlib.sha256(to_text(entries).encode("utf-8")).hexdigest(),
        "sha256_of": "UTF-8 of the cleaned, deduplicated entries in file order, each + '\\n%\\n'",
    }
    return entries, info


def to_text(entries: list[str]) -> str:
    return "".join(e + "\n" + SEPARATOR for e in entries)


def split_corpus(entries: list[str], seed: int) -> tuple[list[str], list[str]]:
    """Seeded shuffle; the first shuffled entries up to VALID_MAX_BYTES are the validation set."""
    order = list(range(len(entries)))
    random.Random(seed).shuffle(order)
    valid_idx, size = [], 0
    for i in order:
        n = len((entries[i] + "\n" + SEPARATOR).encode("utf-8"))
        if size + n > VALID_MAX_BYTES:
            break
        valid_idx.append(i)
        size += n
    held = set(valid_idx)
    train = [e for i, e in enumerate(entries) if i not in held]
    valid = [entries[i] for i in sorted(valid_idx)]  # file order, for a readable fixture
    return train, valid


# --------------------------------------------------------------------------------------------------
# Tokenizer (make_fixtures.build_tokenizer, trained on this corpus to a larger vocabulary)
# --------------------------------------------------------------------------------------------------

VOCAB_SIZE = 4096  # 4093 byte-level BPE entries + <|begin_of_text|>, <|end_of_text|>, <|eot_id|>


def build_tokenizer(train_text: str) -> Tokenizer:
    n_merge_vocab = VOCAB_SIZE - 3
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(mf.LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=n_merge_vocab,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([train_text], trainer=trainer)
    assert tok.get_vocab_size() == n_merge_vocab, tok.get_vocab_size()
    tok.add_special_tokens([mf.BOS, mf.EOS, mf.EOT])
    bos = tok.token_to_id(mf.BOS)
    assert [bos, tok.token_to_id(mf.EOS), tok.token_to_id(mf.EOT)] == list(
        range(n_merge_vocab, VOCAB_SIZE)
    )
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
            processors.TemplateProcessing(
                single=f"{mf.BOS}:0 $A:0",
                pair=f"{mf.BOS}:0 $A:0 {mf.BOS}:1 $B:1",
                special_tokens=[(mf.BOS, bos)],
            ),
        ]
    )
    check_like_fixtures(tok)
    return tok


def check_like_fixtures(tok: Tokenizer) -> None:
    """Everything but the vocabulary is the fixtures' tokenizer (only the BOS id differs)."""
    fixture = REPO / "tests" / "fixtures" / "tiny-gqa-packed" / "tokenizer.json"
    if not fixture.exists():
        return
    ref = json.loads(fixture.read_text(encoding="utf-8"))
    ours = json.loads(tok.to_str())
    ref_bos, our_bos = mf.N_MERGE_VOCAB, tok.token_to_id(mf.BOS)
    for key in ("normalizer", "pre_tokenizer", "decoder", "post_processor"):
        want = json.dumps(ref[key]).replace(f"[{ref_bos}]", f"[{our_bos}]")
        assert json.dumps(ours[key]) == want, key
    model_keys = {k: v for k, v in ours["model"].items() if k not in ("vocab", "merges")}
    assert model_keys == {k: v for k, v in ref["model"].items() if k not in ("vocab", "merges")}
    for a, b in zip(ours["added_tokens"], ref["added_tokens"]):
        assert {**a, "id": 0} == {**b, "id": 0}, (a, b)


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------

# 2B4T shapes scaled down: head_dim 64, GQA 2:1, ffn 3x hidden (2B4T: 2.7x); every dimension a
# multiple of 128 as in 2B4T. rope_theta 10000 (2B4T: 500000) suits the 256-token context.
SPEC = mf.Spec(
    name="tiny-fortunes",
    seed=20250501,
    hidden=256,
    inter=768,
    layers=5,
    heads=4,
    kv_heads=2,
    rope_theta=10000.0,
    mode="offline",  # what is exported; training runs the same math online (FORMATS.md 4)
    emb_std=0.02,
    w_std=0.02,
)
CTX = 256  # config max_position_embeddings (make_fixtures.config_dict) and training window


def config_for(tok: Tokenizer) -> dict:
    ids = {name: tok.token_to_id(name) for name in (mf.BOS, mf.EOS, mf.EOT)}
    cfg = mf.config_dict(SPEC, tok.get_vocab_size(), ids)
    assert cfg["max_position_embeddings"] == CTX
    return cfg


def training_model(cfg: dict) -> BitNetForCausalLM:
    """transformers' BitNet with every projection an online AutoBitLinear (fp32 master weights)."""
    online = dict(cfg, quantization_config=dict(cfg["quantization_config"]))
    online["quantization_config"]["quantization_mode"] = "online"
    config = BitNetConfig.from_dict(online)
    config._attn_implementation = "eager"
    model = BitNetForCausalLM(config)
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            new = AutoBitLinear(
                module.in_features, module.out_features, bias=False, online_quant=True
            )
            torch.nn.init.normal_(new.weight, mean=0.0, std=SPEC.w_std)
            model.set_submodule(name, new)
    torch.nn.init.normal_(model.model.embed_tokens.weight, mean=0.0, std=SPEC.emb_std)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    return model.float()


def check_ste() -> None:
    """transformers' WeightQuant/ActQuant are straight-through: the gradients are those of a plain
    linear layer evaluated at the quantised weight and activations."""
    g = torch.Generator().manual_seed(0)
    layer = AutoBitLinear(64, 32, bias=False, online_quant=True)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(32, 64, generator=g) * 0.02)
    x = torch.randn(5, 64, generator=g, requires_grad=True)
    up = torch.randn(5, 32, generator=g)
    y = layer(x)
    w_q, x_q = WeightQuant.apply(layer.weight.detach()), ActQuant.apply(x.detach())
    assert torch.equal(y, F.linear(x_q, w_q))
    (y * up).sum().backward()
    torch.testing.assert_close(layer.weight.grad, up.T @ x_q)
    torch.testing.assert_close(x.grad, up @ w_q)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # the tied embedding appears once
        (decay if p.ndim == 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def encode_entries(tok: Tokenizer, entries: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token stream of to_text(entries) (no BOS) and the token index where each entry starts."""
    stream, starts = [], []
    for enc in tok.encode_batch([e + "\n" + SEPARATOR for e in entries], add_special_tokens=False):
        starts.append(len(stream))
        stream.extend(enc.ids)
    return np.array(stream, dtype=np.int64), np.array(starts, dtype=np.int64)


def sample_batch(rng, stream, starts, bos: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Half the windows are BOS + text from the start of an entry (how a prompt looks), half start
    anywhere without BOS (how the later windows of a sliding-window evaluation look)."""
    rows = []
    last_start = len(stream) - CTX - 1
    for _ in range(batch):
        if rng.random() < 0.5:
            s = int(starts[rng.integers(0, np.searchsorted(starts, last_start))])
            rows.append(np.concatenate([[bos], stream[s : s + CTX]]))
        else:
            r = int(rng.integers(0, last_start + 1))
            rows.append(stream[r : r + CTX + 1])
    seq = torch.from_numpy(np.stack(rows))
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------

EVAL_STRIDE = 128


@torch.no_grad()
def sliding_nll(model, ids: list[int], ctx: int = CTX, stride: int = EVAL_STRIDE) -> dict:
    """Perplexity as in the transformers docs ("Perplexity of fixed-length models"): windows of
    `ctx` tokens starting at 0, stride, 2*stride, ...; each window scores only the tokens that no
    earlier window scored (its last `end - prev_end` positions, with the context before them);
    stop after the window that reaches the end. Every token but the first (BOS) is scored once."""
    n = len(ids)
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, n, stride):
        end = min(begin + ctx, n)
        window = torch.tensor([ids[begin:end]])
        logits = model(input_ids=window, use_cache=False).logits[0].double()
        logp = torch.log_softmax(logits[:-1], dim=-1)
        targets = window[0, 1:]
        nll = -logp.gather(1, targets[:, None])[:, 0]
        first = max(prev_end, begin + 1) - (begin + 1)  # index into targets
        total += float(nll[first:].sum())
        count += len(nll) - first
        prev_end = end
        if end == n:
            break
    assert count == n - 1 or stride >= ctx, (count, n)  # stride == ctx skips window starts
    return {
        "nll_sum": total,
        "n_scored": count,
        "loss": total / count,
        "ppl": math.exp(total / count),
    }


@torch.no_grad()
def llama_style_nll(model, ids: list[int], ctx: int = CTX) -> dict:
    """llama.cpp's llama-perplexity: non-overlapping chunks of ctx tokens (the tail is dropped),
    the first token of every chunk replaced by BOS, only the second half of each chunk scored."""
    bos = ids[0]
    total, count = 0.0, 0
    for c in range(len(ids) // ctx):
        chunk = list(ids[c * ctx : (c + 1) * ctx])
        chunk[0] = bos
        logits = model(input_ids=torch.tensor([chunk]), use_cache=False).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1)
        first = ctx // 2
        for i in range(first, ctx - 1):
            total -= float(logp[i, chunk[i + 1]])
            count += 1
    return {
        "nll_sum": total,
        "n_scored": count,
        "loss": total / count,
        "ppl": math.exp(total / count),
    }


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def save_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(args, cfg: dict, tok: Tokenizer, train_entries: list[str], valid_ids: list[int]):
    ckpt_path = args.work / "checkpoint.pt"
    torch.manual_seed(args.seed)
    model = training_model(cfg)
    opt = torch.optim.AdamW(
        param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95), eps=1e-8
    )
    rng = np.random.default_rng(args.seed)
    stream, starts = encode_entries(tok, train_entries)
    bos = tok.token_to_id(mf.BOS)
    log: list[dict] = []
    step, elapsed, resumed_loss = 0, 0.0, None
    if ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=False)
        assert state["args"] == training_args(args), "checkpoint from other settings: --fresh"
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        rng.bit_generator.state = state["rng"]
        step, elapsed, log = state["step"], state["elapsed"], state["log"]
        resumed_loss = state["run_loss"]
        print(f"resumed at step {step} ({elapsed:.0f} s)", flush=True)
    print(
        f"train stream {len(stream)} tokens, {len(starts)} entries; "
        f"{sum(p.numel() for p in model.parameters())} parameters",
        flush=True,
    )
    valid_probe = valid_ids[: 32 * CTX + 1]  # quick non-overlapping probe during training
    model.train()
    t0, run_loss = time.time() - elapsed, resumed_loss
    stop_at = min(args.steps, step + args.stop_after) if args.stop_after else args.steps
    while step < stop_at:
        lr = lr_at(step, args)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = sample_batch(rng, stream, starts, bos, args.batch)
        logits = model(input_ids=x, use_cache=False).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step == 0:  # the straight-through gradients reach every master weight
            for name, p in model.named_parameters():
                assert p.grad is not None and bool(p.grad.abs().sum() > 0), name
        gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip))
        opt.step()
        step += 1
        loss = loss.detach()
        run_loss = float(loss) if run_loss is None else 0.98 * run_loss + 0.02 * float(loss)
        if step % 25 == 0 or step == args.steps:
            entry = {
                "step": step,
                "lr": lr,
                "loss": float(loss),
                "loss_ema": run_loss,
                "grad_norm": gnorm,
                "time": time.time() - t0,
            }
            if step % args.eval_every == 0 or step == args.steps:
                model.eval()
                entry["valid_probe_loss"] = sliding_nll(model, valid_probe, stride=CTX)["loss"]
                model.train()
            log.append(entry)
            tok_s = step * args.batch * CTX / max(entry["time"], 1e-9)
            print(
                f"step {step:5d} lr {lr:.2e} loss {float(loss):.3f} ema {run_loss:.3f} "
                f"gnorm {gnorm:.2f} {entry['time']:.0f}s {tok_s:.0f} tok/s"
                + (
                    f" valid {entry['valid_probe_loss']:.3f}" if "valid_probe_loss" in entry else ""
                ),
                flush=True,
            )
        if step % args.ckpt_every == 0 or step == stop_at:
            state = {
                "args": training_args(args),
                "model": model.state_dict(),
                "opt": opt.state_dict(),
                "rng": rng.bit_generator.state,
                "step": step,
                "elapsed": time.time() - t0,
                "log": log,
                "run_loss": run_loss,
            }
            save_atomic(state, ckpt_path)
    model.eval()
    if step < args.steps:
        raise SystemExit(f"stopped at step {step} (--stop-after); run again to resume")
    return model, log, time.time() - t0


def training_args(args) -> dict:
    keys = ("seed", "steps", "batch", "lr", "min_lr", "warmup", "weight_decay", "clip")
    return {k: getattr(args, k) for k in keys}


# --------------------------------------------------------------------------------------------------
# Export and checks
# --------------------------------------------------------------------------------------------------


def export(model: BitNetForCausalLM, cfg: dict, tok: Tokenizer, out: Path) -> dict:
    """The 2B4T packed layout, written with make_fixtures' packer and checks."""
    masters = {
        k: v.detach().float().clone()
        for k, v in model.state_dict().items()
        if k != "lm_head.weight"
    }
    tensors = mf.checkpoint_tensors(SPEC, masters)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    mf.write_checkpoint(out, SPEC, tensors)
    (out / "model.safetensors").chmod(0o644)  # safetensors writes 0600
    mf.write_json(out / "config.json", cfg)
    ids = {name: tok.token_to_id(name) for name in (mf.BOS, mf.EOS, mf.EOT)}
    gen_cfg = {
        "bos_token_id": ids[mf.BOS],
        "eos_token_id": [ids[mf.EOS], ids[mf.EOT]],
        # Sampling by default, as llama-cli does: greedy decoding of a model
        # this small repeats one phrase until the context is full.
        "do_sample": True,
        "temperature": 0.8,
        "top_k": 40,
        "top_p": 0.95,
        "transformers_version": transformers.__version__,
    }
    mf.write_json(out / "generation_config.json", gen_cfg)
    tok.save(str(out / "tokenizer.json"))
    mf.write_json(out / "tokenizer_config.json", mf.tokenizer_config(tok))
    return tensors


@torch.no_grad()
def check_export(folder: Path, cfg: dict, tensors: dict, probe: list[int]) -> BitNetForCausalLM:
    loaded = mf.load_pretrained(folder)  # from_pretrained (bf16), .to(float32), eager
    mem = mf.in_memory_model(SPEC, cfg, tensors)
    diff = mf.max_abs(mf.logits_of(loaded, probe), mf.logits_of(mem, probe))
    assert diff <= 1e-5, diff
    hf = AutoTokenizer.from_pretrained(folder)
    chat = hf.apply_chat_template(
        [{"role": "user", "content": "Hi!"}], add_generation_prompt=True, tokenize=False
    )
    assert chat == f"{mf.BOS}User: Hi!{mf.EOT}Assistant: ", chat
    return loaded


def tensor_stats(tensors: dict) -> dict:
    zeros, scales = [], []
    for name, t in tensors.items():
        if t.dtype == torch.uint8:
            codes = torch.stack([(t >> (2 * i)) & 3 for i in range(4)])
            zeros.append(float((codes == 1).float().mean()))
        elif name.endswith("weight_scale"):
            scales.append(float(t))
    return {
        "ternary_zero_fraction": [round(min(zeros), 3), round(max(zeros), 3)],
        "weight_scale_range": [round(min(scales), 5), round(max(scales), 5)],
    }


def numpy_reference(folder: Path, ids: list[int]) -> dict:
    """The same perplexity from make_fixtures' independent numpy implementation of the format."""

    class NumpyModel:
        def __call__(self, input_ids, use_cache=False):
            logits = mf.numpy_forward(folder, input_ids[0].tolist())
            return argparse.Namespace(logits=torch.from_numpy(logits)[None])

    return sliding_nll(NumpyModel(), ids)


def samples(model, hf_tok, seed: int) -> list[dict]:
    model.generation_config.pad_token_id = hf_tok.convert_tokens_to_ids(mf.EOS)
    runs = [
        ("Once upon a time", {"do_sample": False}),
        ("Once upon a time", {"do_sample": True, "temperature": 0.8, "top_k": 0, "top_p": 1.0}),
        ("The computer", {"do_sample": True, "temperature": 0.8, "top_k": 0, "top_p": 1.0}),
        ("A wise man", {"do_sample": True, "temperature": 0.8, "top_k": 0, "top_p": 1.0}),
    ]
    result = []
    for i, (prompt, kwargs) in enumerate(runs):
        torch.manual_seed(seed + i)
        ids = hf_tok(prompt, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=80, **kwargs)
        text = hf_tok.decode(out[0], skip_special_tokens=True)
        result.append({"prompt": prompt, "settings": kwargs, "seed": seed + i, "text": text})
    return result


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="exported model folder")
    parser.add_argument("--work", type=Path, default=Path("/tmp/train_tiny"), help="checkpoints")
    parser.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    parser.add_argument("--no-fixtures", action="store_true", help="don't write tests/fixtures")
    parser.add_argument("--seed", type=int, default=SPEC.seed, help="split, init and batches")
    parser.add_argument("--steps", type=int, default=1700)
    parser.add_argument("--batch", type=int, default=8, help="sequences of 256 tokens per step")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--min-lr", type=float, default=3e-4)
    parser.add_argument("--warmup", type=int, default=150)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--ckpt-every", type=int, default=100)
    parser.add_argument("--stop-after", type=int, default=0, help="checkpoint and exit after N")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the build machine is shared
    transformers.logging.set_verbosity_error()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.fresh:
        (args.work / "checkpoint.pt").unlink(missing_ok=True)
    check_ste()
    wall0 = time.time()

    entries, corpus = read_corpus()
    train_entries, valid_entries = split_corpus(entries, args.seed)
    train_text, valid_text = to_text(train_entries), to_text(valid_entries)
    tok = build_tokenizer(train_text)
    cfg = config_for(tok)
    valid_ids = tok.encode(valid_text).ids  # BOS + the whole file, tokenized once
    if not args.no_fixtures:
        VALID_TXT.write_text(valid_text, encoding="utf-8")
    print(
        f"corpus {corpus['entries']} entries, sha256 {corpus['sha256'][:16]}...; train "
        f"{len(train_entries)} entries ({len(train_text)} chars), valid {len(valid_entries)} "
        f"({len(valid_text)} chars, {len(valid_ids)} tokens)",
        flush=True,
    )

    model, log, train_seconds = train(args, cfg, tok, train_entries, valid_ids)

    # the training script's own evaluation: the fp32 training model (online quantisation)
    train_probe = tok.encode(to_text(train_entries[: len(valid_entries)])).ids
    own = {
        "valid": sliding_nll(model, valid_ids),
        "valid_llama_style": llama_style_nll(model, valid_ids),
        "train_subset": sliding_nll(model, train_probe),
    }
    print(f"training model: {json.dumps(own)}", flush=True)

    tensors = export(model, cfg, tok, args.out)
    loaded = check_export(args.out, cfg, tensors, valid_ids[:CTX])
    hf_tok = AutoTokenizer.from_pretrained(args.out)
    file_text = VALID_TXT.read_text(encoding="utf-8") if not args.no_fixtures else valid_text
    hf_ids = hf_tok(file_text)["input_ids"]
    assert hf_ids == valid_ids, "transformers tokenizes the validation file differently"
    hf = {
        "valid": sliding_nll(loaded, hf_ids),
        "valid_llama_style": llama_style_nll(loaded, hf_ids),
    }
    rel = hf["valid"]["ppl"] / own["valid"]["ppl"] - 1
    print(f"transformers: {json.dumps(hf)}; relative difference {rel:+.3%}", flush=True)
    assert abs(rel) < 0.01, rel
    ref = numpy_reference(args.out, hf_ids)
    rel_np = ref["ppl"] / hf["valid"]["ppl"] - 1
    print(f"numpy reference: {json.dumps(ref)}; vs transformers {rel_np:+.5%}", flush=True)
    assert abs(rel_np) < 1e-3, rel_np
    gen = samples(loaded, hf_tok, args.seed)
    for s in gen:
        print(f"--- {s['prompt']!r} {s['settings']}\n{s['text']}", flush=True)

    stats = tensor_stats(tensors)
    files = {p.name: p.stat().st_size for p in sorted(args.out.iterdir())}
    report = {
        "model": f"python/trit/models/{args.out.name}",
        "validation_file": "tests/fixtures/tiny-fortunes-valid.txt",
        "validation_file_sha256": hashlib.sha256(valid_text.encode("utf-8")).hexdigest(),
        "validation_entries": len(valid_entries),
        "tokenization": "tokenizer.json of the model applied once to the whole file (UTF-8), "
        "with the post-processor's BOS prepended, no other special tokens",
        "n_tokens": len(valid_ids),
        "perplexity": {
            "method": "transformers docs sliding window: windows of ctx tokens starting at "
            "0, stride, 2*stride, ...; each window scores only the tokens that no earlier window "
            "scored (the first window scores positions 1..ctx-1); stops after the window that "
            "reaches the end; every token but the leading BOS is scored once; "
            "ppl = exp(nll_sum / n_scored)",
            "ctx": CTX,
            "stride": EVAL_STRIDE,
            "transformers": hf["valid"],
            "training_script": own["valid"],
            "relative_difference": rel,
            "numpy_reference": ref
            | {
                "what": "tools/make_fixtures.py numpy_forward: FORMATS.md 0-2 in numpy float32, "
                "independent of transformers' modules",
                "relative_difference_to_transformers": rel_np,
            },
        },
        "perplexity_llama_style": {
            "method": "llama.cpp llama-perplexity: floor(n_tokens / ctx) non-overlapping chunks, "
            "the first token of each chunk set to BOS, positions ctx/2 .. ctx-2 predict the next "
            "token (ctx/2 - 1 scored per chunk)",
            "ctx": CTX,
            "transformers": hf["valid_llama_style"],
            "training_script": own["valid_llama_style"],
        },
        "train_subset_perplexity": own["train_subset"]
        | {"what": f"the first {len(valid_entries)} training entries, same method"},
        "transformers_model": "BitNetForCausalLM.from_pretrained(folder, "
        "attn_implementation='eager').to(torch.float32), TORCHDYNAMO_DISABLE=1",
        "training_model": "the same model with AutoBitLinear(online_quant=True) fp32 masters",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "numpy": np.__version__,
        },
    }
    train_info = {
        "command": "python tools/train_tiny.py",
        "args": training_args(args),
        "tokens_seen": args.steps * args.batch * CTX,
        "train_stream_tokens": int(encode_entries(tok, train_entries)[0].shape[0]),
        "train_seconds": round(train_seconds),
        "total_seconds": round(time.time() - wall0),
        "final_log": log[-1],
        "valid_probe_curve": [
            (e["step"], round(e["valid_probe_loss"], 4)) for e in log if "valid_probe_loss" in e
        ],
    }
    if not args.no_fixtures:
        mf.write_json(EVAL_JSON, report)
    mf.write_json(args.work / "train_log.json", {"train": train_info, "log": log})
    write_readme(args.out, cfg, corpus, report, train_info, stats, gen, files)
    print(f"done in {time.time() - wall0:.0f} s", flush=True)
    return 0


def write_readme(out, cfg, corpus, report, train_info, stats, gen, files) -> None:
    ppl = report["perplexity"]
    sample_md = "\n\n".join(
        f"Prompt `{s['prompt']}`, "
        + (
            "greedy"
            if not s["settings"]["do_sample"]
            else f"temperature {s['settings']['temperature']} (no top-k/top-p), seed {s['seed']}"
        )
        + ":\n\n```\n"
        + s["text"]
        + "\n```"
        for s in gen
    )
    sources = ", ".join(f"`{k}` {v}" for k, v in corpus["packages"].items())
    sets = ", ".join(sorted(corpus["files"]))
    text = f"""# tiny-fortunes: a tiny BitNet b1.58 model trained on Debian's fortune cookies

A small ternary language model that ships inside the trit wheel so that `trit generate` works
offline. It writes fortune-cookie English (quips, quotes with `-- Author` lines, entries
separated by a line holding `%`); it knows nothing else. Not an assistant: it was never trained
on chat turns, and it never emits `<|end_of_text|>`, so generation runs to the token limit.

## Format

Exactly the layout of `microsoft/bitnet-b1.58-2B-4T` (see `shared/docs/FORMATS.md`): transformers
`BitNetForCausalLM`, `quantization_config` = `{json.dumps(cfg["quantization_config"])}`,
projections stored as packed ternary U8 `[out/4, in]` with a BF16 `weight_scale` = mean|W|
(multiplied), BF16 embeddings (tied with the output head) and norms, Llama-3-style byte-level BPE
`tokenizer.json` with the 2B4T chat template in `tokenizer_config.json`.

| | |
|---|---|
| hidden / ffn / layers | {cfg["hidden_size"]} / {cfg["intermediate_size"]} / \
{cfg["num_hidden_layers"]} |
| heads / kv heads / head_dim | {cfg["num_attention_heads"]} / {cfg["num_key_value_heads"]} / \
{cfg["hidden_size"] // cfg["num_attention_heads"]} |
| context | {cfg["max_position_embeddings"]} tokens, rope_theta {cfg["rope_theta"]} |
| vocab | {cfg["vocab_size"]} (bos {cfg["bos_token_id"]}, eos {cfg["eos_token_id"]}, \
`<|eot_id|>` {cfg["vocab_size"] - 1}) |
| ternary zero fraction | {stats["ternary_zero_fraction"][0]}–{stats["ternary_zero_fraction"][1]} |
| weight_scale range | {stats["weight_scale_range"][0]}–{stats["weight_scale_range"][1]} |

Files: {", ".join(f"`{k}` ({v:,} B)" for k, v in files.items() if k != "README.md")}.

## Quality

Validation text: `tests/fixtures/tiny-fortunes-valid.txt` ({report["validation_entries"]} held-out
entries, {report["n_tokens"]} tokens with the leading BOS). Perplexity with a sliding window of
ctx {ppl["ctx"]}, stride {ppl["stride"]} (transformers-docs method, details and numbers in
`tests/fixtures/tiny-fortunes-eval.json`):

- transformers `from_pretrained` of this folder, float32, eager:
  **{ppl["transformers"]["ppl"]:.3f}**
- the training script's own evaluation (fp32 master weights, online quantisation):
  {ppl["training_script"]["ppl"]:.3f} (relative difference {ppl["relative_difference"]:+.3%})
- `numpy_forward` of tools/make_fixtures.py (FORMATS.md 0-2 in numpy, no transformers):
  {ppl["numpy_reference"]["ppl"]:.3f}
- llama-perplexity-style (ctx {ppl["ctx"]}, second half of each chunk):
  {report["perplexity_llama_style"]["transformers"]["ppl"]:.3f}
- training text, same method (first {report["validation_entries"]} training entries):
  {report["train_subset_perplexity"]["ppl"]:.3f}

Samples from transformers' `generate` on this folder (float32, 80 new tokens; the BOS is prepended
by the tokenizer):

{sample_md}

## How it was made

Command: `python tools/train_tiny.py` (from the trit repository, in the venv described in
`tests/fixtures/README.md`, after `apt-get install -y fortunes fortunes-min`).

- Quantisation-aware from the first step: transformers' `AutoBitLinear(online_quant=True)`,
  i.e. absmean ternary weights and per-token absmax int8 activations in the forward pass with
  straight-through gradients, float32 master weights; exported by ternarising the masters.
- AdamW (betas 0.9/0.95, weight decay on matrices only), linear warm-up then cosine decay,
  gradient clipping: `{json.dumps(train_info["args"])}`.
- Windows of 256 tokens (half start at an entry with BOS, half anywhere);
  {train_info["tokens_seen"]:,} tokens seen, about
  {train_info["tokens_seen"] / train_info["train_stream_tokens"]:.1f} passes over the
  {train_info["train_stream_tokens"]:,}-token training stream.
- float32 on one CPU thread: {train_info["train_seconds"]} s of training.
- Everything is seeded; a rerun with the same versions on the same kind of machine gives the
  same model. Versions: `{json.dumps(report["versions"])}`.

## Training data and licence

- Source: the Debian packages {sources}: the fortune cookie files in
  `{corpus["directory"]}`: {sets}. The offensive set (`fortunes-off`) is not used;
  `ascii-art` (pictures) and `ethnic` were left out as well.
- Licence: BSD, per `/usr/share/doc/fortunes/copyright` ("This program falls under the BSD
  copyright", Copyright (c) 1991 The Regents of the University of California).
- Preparation: entries split at `%` lines, overstrike sequences (`x\\b`) removed, trailing spaces
  stripped, duplicates dropped ({corpus["duplicates_dropped"]}), leaving {corpus["entries"]}
  entries.
  sha256 of the cleaned corpus ({corpus["sha256_of"]}): `{corpus["sha256"]}`.
- Split: a seeded shuffle (seed {train_info["args"]["seed"]}) puts the first
  {report["validation_entries"]} entries (up to 60 KB) in the validation set; the rest is training.
  Validation sha256: `{report["validation_file_sha256"]}`.
- Per-file sha256 of the raw cookie files is in `SOURCE.json`.
"""
    (out / "README.md").write_text(text, encoding="utf-8")
    mf.write_json(out / "SOURCE.json", corpus)


if __name__ == "__main__":
    sys.exit(main())
