"""A `tokenizers` Tokenizer built from a GGUF file's tokenizer metadata.

llama.cpp's converters store a byte-level BPE (``tokenizer.ggml.model``
"gpt2") as its token list, merges and token types, plus the name of the
pre-tokenizer (``tokenizer.ggml.pre``) rather than its regex. Here the same
tokenizer is rebuilt as the ``tokenizer.json`` structure Hugging Face would
save, with the regex that pre-tokenizer name stands for; a name trit does not
know is refused by name rather than guessed. (docs/formats.md, "GGUF tokenizer")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HfTokenizer

from trit._core import InvalidInputError, gguf_metadata

# The Llama 3 pre-tokenizer split (tokenizer.json of meta-llama/Meta-Llama-3-8B;
# llama.cpp's LLAMA_VOCAB_PRE_TYPE_LLAMA3).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# tokenizer.ggml.pre -> (pre_tokenizer, ignore_merges) as Hugging Face's
# tokenizer.json of such a model has them.
PRE_TOKENIZERS: dict[str, tuple[dict[str, Any], bool]] = {
    "llama-bpe": (
        {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": LLAMA3_SPLIT},
                    "behavior": "Isolated",
                    "invert": False,
                },
                {
                    "type": "ByteLevel",
                    "add_prefix_space": False,
                    "trim_offsets": True,
                    "use_regex": False,
                },
            ],
        },
        True,
    ),
    "gpt2": (
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        False,
    ),
}
PRE_TOKENIZERS["llama3"] = PRE_TOKENIZERS["llama-bpe"]

# llama.cpp's token types (llama_token_type).
CONTROL = 3
USER_DEFINED = 4


def _field(meta: dict[str, object], key: str, kind: type, path: Path) -> Any:
    value = meta.get(key)
    if value is None:
        raise InvalidInputError(f"{path}: {key} is missing")
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise InvalidInputError(
            f"{path}: {key} is {type(value).__name__}; expected {kind.__name__}"
        )
    return value


def _optional_id(meta: dict[str, object], key: str, n: int, path: Path) -> int | None:
    value = meta.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n:
        raise InvalidInputError(f"{path}: {key} is {value!r}; expected a token id below {n}")
    return value


def tokenizer_json(meta: dict[str, object], path: Path) -> dict[str, Any]:
    """The tokenizer.json structure of the GGUF metadata `meta` (read from `path`)."""
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise InvalidInputError(
            f"{path}: tokenizer.ggml.model {model!r} is not supported; trit builds byte-level "
            'BPE tokenizers ("gpt2")'
        )
    pre = meta.get("tokenizer.ggml.pre", "gpt2")
    if pre not in PRE_TOKENIZERS:
        raise InvalidInputError(
            f"{path}: tokenizer.ggml.pre {pre!r} is not a pre-tokenizer trit knows; "
            f"known: {', '.join(sorted(PRE_TOKENIZERS))}"
        )
    pre_tokenizer, ignore_merges = PRE_TOKENIZERS[str(pre)]
    tokens = _field(meta, "tokenizer.ggml.tokens", list, path)
    merges = _field(meta, "tokenizer.ggml.merges", list, path)
    types = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    if not all(isinstance(t, str) for t in tokens) or not all(isinstance(m, str) for m in merges):
        raise InvalidInputError(f"{path}: tokenizer.ggml.tokens and .merges must hold strings")
    if not isinstance(types, list) or len(types) != len(tokens):
        raise InvalidInputError(
            f"{path}: tokenizer.ggml.token_type must list one type per token ({len(tokens)})"
        )
    vocab: dict[str, int] = {}
    added: list[dict[str, Any]] = []
    for i, (text, kind) in enumerate(zip(tokens, types)):
        vocab.setdefault(text, i)
        if kind in (CONTROL, USER_DEFINED):
            added.append(
                {
                    "id": i,
                    "content": text,
                    "single_word": False,
                    "lstrip": False,
                    "rstrip": False,
                    "normalized": False,
                    "special": kind == CONTROL,
                }
            )
    pairs = []
    for m in merges:
        left, sep, right = m.partition(" ")
        if not sep:
            raise InvalidInputError(f"{path}: merge {m!r} is not two tokens joined by a space")
        pairs.append([left, right])
    n = len(tokens)
    bos = _optional_id(meta, "tokenizer.ggml.bos_token_id", n, path)
    add_bos = meta.get("tokenizer.ggml.add_bos_token", False) is True
    post_processor = None
    if add_bos and bos is not None:
        bos_text = tokens[bos]
        post_processor = {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": bos_text, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
            ],
            "pair": [
                {"SpecialToken": {"id": bos_text, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": bos_text, "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {bos_text: {"id": bos_text, "ids": [bos], "tokens": [bos_text]}},
        }
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": True,
            "trim_offsets": True,
            "use_regex": True,
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": ignore_merges,
            "vocab": vocab,
            "merges": pairs,
        },
    }


def read_gguf_tokenizer(path: Path) -> tuple[_HfTokenizer, dict[str, Any], str | None]:
    """The tokenizer of GGUF file `path`, a tokenizer_config-like dict (bos and
    eos tokens) and its chat template."""
    meta = gguf_metadata(path)
    structure = tokenizer_json(meta, path)
    try:
        tok = _HfTokenizer.from_str(json.dumps(structure))
    except Exception as exc:  # the tokenizers library raises plain Exceptions
        raise InvalidInputError(f"{path}: cannot build the tokenizer: {exc}") from exc
    tokens = meta["tokenizer.ggml.tokens"]
    assert isinstance(tokens, list)
    config: dict[str, Any] = {}
    for name in ("bos", "eos"):
        i = _optional_id(meta, f"tokenizer.ggml.{name}_token_id", len(tokens), path)
        if i is not None:
            config[f"{name}_token"] = tokens[i]
    template = meta.get("tokenizer.chat_template")
    return tok, config, template if isinstance(template, str) else None


# The ids that end a turn: llama.cpp's end-of-generation tokens.
STOP_KEYS = ("eos", "eot", "eom")


def stop_ids(path: Path) -> set[int]:
    """The end-of-sequence, end-of-turn and end-of-message token ids of GGUF file `path`."""
    meta = gguf_metadata(path)
    tokens = meta.get("tokenizer.ggml.tokens")
    n = len(tokens) if isinstance(tokens, list) else 0
    ids = (_optional_id(meta, f"tokenizer.ggml.{k}_token_id", n, path) for k in STOP_KEYS)
    return {i for i in ids if i is not None}
