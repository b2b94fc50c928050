"""Writes a servable folder for a synthetic model: its config and weights
(linked, from `trit.synthetic`) with the bundled model's tokenizer, whose
byte-level BPE vocabulary is padded to the model's vocab_size with distinct
tokens. Random weights pick ids anywhere in the vocabulary; with the bundled
4,096 tokens most of them would decode to nothing, and a streaming client
would see its first text late, so time to first token could not be measured.

    python benches/synthetic_serving_folder.py OUT [--model 2b4t]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from trit import models, synthetic


def write(out: Path, name: str) -> Path:
    source = synthetic.ensure(name)
    config = json.loads((source / "config.json").read_text())
    vocab_size = int(config["vocab_size"])
    tiny = models.path()
    tokenizer = json.loads((tiny / "tokenizer.json").read_text())
    vocab: dict[str, int] = tokenizer["model"]["vocab"]
    taken = set(vocab.values()) | {t["id"] for t in tokenizer.get("added_tokens", [])}
    for i in range(vocab_size):
        if i not in taken:
            # "Ġ" is the byte-level alphabet's space: each pads to " w<id>".
            vocab[f"\u0120w{i}"] = i
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "tokenizer.json").write_text(json.dumps(tokenizer))
    shutil.copy(tiny / "tokenizer_config.json", out / "tokenizer_config.json")
    weights = out / "model.safetensors"
    if weights.is_symlink() or weights.exists():
        weights.unlink()
    weights.symlink_to(source / "model.safetensors")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", default="2b4t", help="a trit.synthetic model name")
    args = parser.parse_args()
    print(write(args.out, args.model))


if __name__ == "__main__":
    main()
