"""A `tokenizers` Tokenizer built from a GGUF file's tokenizer metadata.

llama.cpp's converters store a byte-level BPE (``tokenizer.ggml.model``
"gpt2") as its token list, merges and token types, plus the name of the
pre-tokenizer (``tokenizer.ggml.pre``) rather than its regex; and a
SentencePiece BPE (``tokenizer.ggml.model`` "llama": Llama 2's, 1bitLLM's) as
its pieces with their scores and types, without merges. Here each is rebuilt
as the ``tokenizer.json`` structure Hugging Face would save: the regex a
pre-tokenizer name stands for, or the merges the piece scores rank. A name
trit does not know is refused by name rather than guessed.
(docs/formats.md, "GGUF tokenizer")
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
# llama.cpp runs these with LLAMA_VOCAB_PRE_TYPE_LLAMA3 too (src/llama-vocab.cpp):
# Falcon3's "falcon3", and the "falcon_e" of the official Falcon-E GGUFs
# (bitnet.cpp's fork; ik_llama.cpp issue #551 maps it the same way).
for _alias in ("llama3", "llama-v3", "falcon3", "falcon_e"):
    PRE_TOKENIZERS[_alias] = PRE_TOKENIZERS["llama-bpe"]

# llama.cpp's token types (llama_token_type).
NORMAL = 1
UNKNOWN = 2
CONTROL = 3
USER_DEFINED = 4
BYTE = 6

# SentencePiece's word-boundary mark, which stands for a space in its pieces.
SPACE_MARK = "\u2581"
# Longer pieces are not split into merges: SentencePiece's trainer caps pieces at
# max_sentencepiece_length (default 16), and splitting costs the square of a
# piece's length, which a hostile file could make large.
MAX_MERGED_PIECE_CHARS = 64


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


def _vocab_and_added(
    tokens: list[str], types: list[Any], *, special: tuple[int, ...], plain: tuple[int, ...]
) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """The vocabulary (a repeated text keeps its first id) and the added tokens:
    those whose token type is in `special` (marked special) or `plain`."""
    vocab: dict[str, int] = {}
    added: list[dict[str, Any]] = []
    for i, (text, kind) in enumerate(zip(tokens, types)):
        vocab.setdefault(text, i)
        if kind in special or kind in plain:
            added.append(
                {
                    "id": i,
                    "content": text,
                    "single_word": False,
                    "lstrip": False,
                    "rstrip": False,
                    "normalized": False,
                    "special": kind in special,
                }
            )
    return vocab, added


def tokenizer_json(meta: dict[str, object], path: Path) -> dict[str, Any]:
    """The tokenizer.json structure of the GGUF metadata `meta` (read from `path`)."""
    model = meta.get("tokenizer.ggml.model")
    if model == "llama":
        return _sentencepiece_json(meta, path)
    if model != "gpt2":
        raise InvalidInputError(
            f"{path}: tokenizer.ggml.model {model!r} is not supported; trit builds byte-level "
            'BPE ("gpt2") and SentencePiece BPE ("llama") tokenizers'
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
    # Byte-level BPE: control tokens are special, user-defined ones are added as they are.
    vocab, added = _vocab_and_added(tokens, types, special=(CONTROL,), plain=(USER_DEFINED,))
    pairs = []
    for m in merges:
        left, sep, right = m.partition(" ")
        if not sep:
            raise InvalidInputError(f"{path}: merge {m!r} is not two tokens joined by a space")
        pairs.append([left, right])
    # Without tokenizer.ggml.add_bos_token, no BOS: gguf's SpecialVocab writes
    # the key whenever the Hugging Face tokenizer adds one (tokenizer_config's
    # add_bos_token, or a TemplateProcessing that starts with it).
    post_processor = _special_tokens_processor(meta, tokens, path, add_bos_default=False)
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


def _special_tokens_processor(
    meta: dict[str, object], tokens: list[str], path: Path, *, add_bos_default: bool
) -> dict[str, Any] | None:
    """A TemplateProcessing that puts BOS first and EOS last as
    tokenizer.ggml.add_bos_token / add_eos_token ask; None when neither."""
    n = len(tokens)
    first: list[tuple[str, int]] = []
    last: list[tuple[str, int]] = []
    for name, default, where in (("bos", add_bos_default, first), ("eos", False, last)):
        add = meta.get(f"tokenizer.ggml.add_{name}_token", default)
        if not isinstance(add, bool):
            raise InvalidInputError(f"{path}: tokenizer.ggml.add_{name}_token must be a bool")
        token = _optional_id(meta, f"tokenizer.ggml.{name}_token_id", n, path)
        if add and token is not None:
            where.append((tokens[token], token))
    if not first and not last:
        return None

    def template(type_id: int, sequence: str) -> list[dict[str, Any]]:
        return [
            *({"SpecialToken": {"id": t, "type_id": type_id}} for t, _ in first),
            {"Sequence": {"id": sequence, "type_id": type_id}},
            *({"SpecialToken": {"id": t, "type_id": type_id}} for t, _ in last),
        ]

    return {
        "type": "TemplateProcessing",
        "single": template(0, "A"),
        "pair": template(0, "A") + template(1, "B"),
        "special_tokens": {t: {"id": t, "ids": [i], "tokens": [t]} for t, i in first + last},
    }


def sentencepiece_merges(
    tokens: list[str], scores: list[float], types: list[object]
) -> list[list[str]]:
    """The BPE merges a SentencePiece BPE model's pieces and scores stand for:
    every split of a normal piece into two normal pieces, ranked by the piece's
    score, highest first (SentencePiece merges the adjacent pair whose union
    scores highest), then by the piece's id and the split's strings, as
    transformers 5 ranks them (`SpmConverter.build_tokenizer_from_spm_proto`).
    Byte, control and user-defined pieces are never merged, nor pieces longer
    than MAX_MERGED_PIECE_CHARS."""
    normal: dict[str, int] = {}
    for i, (t, kind) in enumerate(zip(tokens, types)):
        if kind == NORMAL:
            normal.setdefault(t, i)
    ranked: list[tuple[float, int, str, str]] = []
    for piece, i in normal.items():
        if len(piece) > MAX_MERGED_PIECE_CHARS:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-scores[i], i, left, right))
    ranked.sort()
    return [[left, right] for _, _, left, right in ranked]


def _sentencepiece_json(meta: dict[str, object], path: Path) -> dict[str, Any]:
    """tokenizer.ggml.model "llama": SentencePiece BPE with byte fallback, as
    transformers' LlamaTokenizer builds it from the same model: pieces
    with scores become BPE merges, a Metaspace pre-tokenizer puts "\u2581" for
    spaces and (tokenizer.ggml.add_space_prefix, default true) before every
    chunk between special tokens, and BOS is added unless
    tokenizer.ggml.add_bos_token says otherwise (llama.cpp's and
    LlamaTokenizer's default)."""
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre != "default":
        raise InvalidInputError(
            f"{path}: tokenizer.ggml.pre {pre!r} is not a pre-tokenizer trit knows for "
            'SentencePiece ("llama") tokenizers; known: default'
        )
    tokens = _field(meta, "tokenizer.ggml.tokens", list, path)
    scores = _field(meta, "tokenizer.ggml.scores", list, path)
    types = meta.get("tokenizer.ggml.token_type", [NORMAL] * len(tokens))
    if not all(isinstance(t, str) for t in tokens):
        raise InvalidInputError(f"{path}: tokenizer.ggml.tokens must hold strings")
    if len(scores) != len(tokens) or not all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in scores
    ):
        raise InvalidInputError(
            f"{path}: tokenizer.ggml.scores must list one number per token ({len(tokens)})"
        )
    if not isinstance(types, list) or len(types) != len(tokens):
        raise InvalidInputError(
            f"{path}: tokenizer.ggml.token_type must list one type per token ({len(tokens)})"
        )
    if BYTE not in types:
        raise InvalidInputError(
            f"{path}: its SentencePiece tokenizer has no byte pieces (<0x00>...); trit builds "
            "SentencePiece tokenizers with byte fallback only"
        )
    # SentencePiece: the unknown piece is special too, as transformers makes it.
    vocab, added = _vocab_and_added(
        tokens, types, special=(UNKNOWN, CONTROL), plain=(USER_DEFINED,)
    )
    unk = _optional_id(meta, "tokenizer.ggml.unknown_token_id", len(tokens), path)
    if unk is None and UNKNOWN in types:
        unk = types.index(UNKNOWN)
    prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    if not isinstance(prefix, bool):
        raise InvalidInputError(f"{path}: tokenizer.ggml.add_space_prefix must be a bool")
    decoders: list[dict[str, Any]] = [
        {"type": "Replace", "pattern": {"String": SPACE_MARK}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
    ]
    if prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Metaspace",
            "replacement": SPACE_MARK,
            "prepend_scheme": "always" if prefix else "never",
            "split": False,
        },
        "post_processor": _special_tokens_processor(meta, tokens, path, add_bos_default=True),
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": tokens[unk] if unk is not None else None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": sentencepiece_merges(tokens, [float(x) for x in scores], types),
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
