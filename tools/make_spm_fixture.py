"""A tiny SentencePiece tokenizer (the kind 1bitLLM's and Llama 2's models ship) with the two
files a test compares: the Hugging Face `tokenizer.json` transformers converts it to, and a
tokenizer-only GGUF holding what llama.cpp's converter writes for it.

Dev-only, like tools/make_fixtures.py; it needs no torch:

    python3 -m venv /tmp/fixvenv
    /tmp/fixvenv/bin/pip install sentencepiece transformers protobuf gguf tokenizers
    /tmp/fixvenv/bin/python tools/make_spm_fixture.py

Writes tests/fixtures/tiny-spm-tokenizer/:
- `tokenizer.model`: SentencePiece BPE trained on the fixtures' corpus (the Zen of Python and four
  license files, tools/make_fixtures.py) with Llama 2's trainer settings that matter for encoding:
  `model_type=bpe`, `byte_fallback`, `split_digits`, `add_dummy_prefix`, identity normalization,
  `remove_extra_whitespaces=false`, `allow_whitespace_only_pieces`, ids `<unk>` 0, `<s>` 1,
  `</s>` 2, no pad.
- `tokenizer.json`, `tokenizer_config.json`: what transformers' `AutoTokenizer` makes of
  `tokenizer.model` beside a Llama 2 style `tokenizer_config.json` (`LlamaTokenizer`,
  `legacy: true`, `add_bos_token: true`), saved: BPE with byte fallback, merges ranked by piece
  score, a `Metaspace` pre-tokenizer that prefixes every chunk between special tokens.
- `tokenizer.gguf`: no tensors; the tokenizer metadata as llama.cpp's `_set_vocab_sentencepiece`
  (convert_hf_to_gguf.py; the same in bitnet.cpp's utils/convert-hf-to-gguf-bitnet.py) writes it:
  `tokenizer.ggml.model` "llama", `.pre` "default", every piece with its score and type (NORMAL,
  UNKNOWN, CONTROL, UNUSED, BYTE from `is_unknown`/`is_control`/`is_unused`/`is_byte`), then
  gguf's own `SpecialVocab` (special ids and add_bos/add_eos from the saved folder).
"""

from __future__ import annotations

import codecs
import contextlib
import io
import json
import tempfile
from pathlib import Path

import gguf
import sentencepiece as spm
from transformers import AutoTokenizer

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tiny-spm-tokenizer"
LICENSE_FILES = ["Apache-2.0", "BSD", "GPL-3", "MPL-2.0"]
VOCAB_SIZE = 640
TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "legacy": True,
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "clean_up_tokenization_spaces": False,
}


def corpus() -> str:
    """tools/make_fixtures.py's training text."""
    with contextlib.redirect_stdout(io.StringIO()):
        import this
    texts = [codecs.decode(this.s, "rot13")]
    for name in LICENSE_FILES:
        texts.append((Path("/usr/share/common-licenses") / name).read_text(encoding="utf-8"))
    return "\n".join(texts)


def train(folder: Path) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "corpus.txt"
        text.write_text(corpus(), encoding="utf-8")
        spm.SentencePieceTrainer.train(
            input=str(text),
            model_prefix=str(folder / "tokenizer"),
            model_type="bpe",
            vocab_size=VOCAB_SIZE,
            byte_fallback=True,
            split_digits=True,
            add_dummy_prefix=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            character_coverage=1.0,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            max_sentence_length=100000,
            minloglevel=2,
        )
    (folder / "tokenizer.vocab").unlink()
    return folder / "tokenizer.model"


def write_gguf(folder: Path) -> Path:
    """llama.cpp's `_set_vocab_sentencepiece`, then `gguf.SpecialVocab`."""
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        kind = gguf.TokenType.NORMAL
        if sp.is_unknown(i):
            kind = gguf.TokenType.UNKNOWN
        elif sp.is_control(i):
            kind = gguf.TokenType.CONTROL
        elif sp.is_unused(i):
            kind = gguf.TokenType.UNUSED
        elif sp.is_byte(i):
            kind = gguf.TokenType.BYTE
        tokens.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(sp.get_score(i))
        types.append(kind)
    out = folder / "tokenizer.gguf"
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    gguf.SpecialVocab(folder, n_vocab=len(tokens)).add_to_gguf(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for stale in OUT.iterdir():
        stale.unlink()
    train(OUT)
    (OUT / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    AutoTokenizer.from_pretrained(OUT).save_pretrained(OUT)
    (OUT / "config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=2) + "\n"
    )
    write_gguf(OUT)
    for p in sorted(OUT.iterdir()):
        print(p.name, p.stat().st_size)


if __name__ == "__main__":
    main()
