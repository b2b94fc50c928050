"""Finding a BitNet b1.58 checkpoint and reading it into a trit model.

A checkpoint is a local folder, a GGUF file, or a Hugging Face repo id
(downloaded with ``huggingface_hub``, which honours ``HF_HUB_OFFLINE``). The
engine reads the files itself: ``config.json`` is checked and the safetensors
files are parsed and mapped in Rust, or the GGUF file is (``Model.open``).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

from trit._core import (
    MAX_JSON_BYTES,
    InvalidInputError,
    Model,
    ModelConfig,
    TritError,
    check_model_file,
)

# What a model needs from a Hub repo; everything else (PyTorch .bin files,
# GGUF, READMEs) is left on the server.
ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "*.safetensors",
    "model.safetensors.index.json",
]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

GGUF_SUFFIX = ".gguf"


def is_gguf(path: Path) -> bool:
    return path.suffix.lower() == GGUF_SUFFIX


def choose_gguf(names: list[str], filename: str | None, where: str) -> str | None:
    """The GGUF file to load among `names` (files of a folder or repo): the one
    `filename` names, else the only one; None when there is none. Several
    without `filename` is an error listing them."""
    ggufs = sorted(n for n in names if is_gguf(Path(n)))
    if filename is not None:
        if filename not in names:
            listed = ", ".join(ggufs) or "none"
            raise InvalidInputError(f"{where} has no file {filename!r} (GGUF files: {listed})")
        return filename
    if len(ggufs) > 1:
        raise InvalidInputError(
            f"{where} holds {len(ggufs)} GGUF files; choose one with filename= "
            f"(--gguf-file on the command line): {', '.join(ggufs)}"
        )
    return ggufs[0] if ggufs else None


def _local(path: Path, filename: str | None) -> Path:
    """The model in local folder `path`: its safetensors checkpoint, or the
    GGUF file `filename` names (or the only one it holds when it has no
    config.json)."""
    if filename is None and (path / "config.json").exists():
        return path
    names = [p.name for p in path.iterdir() if p.is_file()]
    chosen = choose_gguf(names, filename, str(path))
    return path / chosen if chosen is not None else path


def resolve(
    name_or_path: str | Path, *, revision: str | None = None, filename: str | None = None
) -> Path:
    """The local folder or GGUF file of a model: `name_or_path` itself if it
    is a folder (or the GGUF file in it: `filename`) or a GGUF file, else the
    snapshot of that Hugging Face repo id (only the GGUF file `filename` names
    when given, or the repo's only GGUF when it has no safetensors model)."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise InvalidInputError(
            f"expected a model folder or a Hub repo id, got {type(name_or_path).__name__}"
        )
    for name, value in (("revision", revision), ("filename", filename)):
        if value is not None and not isinstance(value, str):
            raise InvalidInputError(f"{name} must be a str, got {type(value).__name__}")
    try:
        path = Path(name_or_path).expanduser()
        is_dir, is_file, exists = path.is_dir(), path.is_file(), path.exists()
    # A NUL byte, a lone surrogate, a name too long, an unknown ~user.
    except (ValueError, OSError, RuntimeError) as exc:
        raise InvalidInputError(f"{name_or_path!r} is not a usable path: {exc}") from None
    if is_dir or is_file:
        if revision is not None:
            raise InvalidInputError(f"revision={revision!r} applies to Hub repos, not to {path}")
    if is_dir:
        return _local(path, filename)
    if exists:
        if not is_gguf(path):
            raise InvalidInputError(
                f"{path} is a file but not a .gguf file; expected a model folder, a GGUF "
                "file or a Hub repo id"
            )
        if filename is not None:
            raise InvalidInputError(f"filename={filename!r} applies to folders and Hub repos")
        return path
    name = str(name_or_path)
    if not _REPO_ID.match(name):
        raise InvalidInputError(f"no model folder {name!r}, and it is not a Hub repo id")
    try:
        import huggingface_hub
        from huggingface_hub.errors import (
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise TritError(f"downloading {name!r} needs huggingface_hub: {exc}") from exc
    try:
        if filename is not None:
            # One GGUF file of the repo, never every quantization it offers.
            return Path(
                huggingface_hub.hf_hub_download(
                    name, _checked_gguf_name(filename), revision=revision
                )
            )
        folder = huggingface_hub.snapshot_download(
            name, revision=revision, allow_patterns=ALLOW_PATTERNS
        )
        if not (Path(folder) / "config.json").exists():
            files = huggingface_hub.list_repo_files(name, revision=revision)
            chosen = choose_gguf(files, None, f"Hub repo {name!r}")
            if chosen is not None:
                return Path(huggingface_hub.hf_hub_download(name, chosen, revision=revision))
    except InvalidInputError:
        raise
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise InvalidInputError(
            f"no model {name!r} (revision {revision}) on the Hub: {exc}"
        ) from exc
    except LocalEntryNotFoundError as exc:
        raise TritError(
            f"{name!r} is not in the local Hugging Face cache and cannot be downloaded "
            f"(offline, HF_HUB_OFFLINE set, or no network): {exc}"
        ) from exc
    except Exception as exc:  # network and server errors of every kind
        raise TritError(f"cannot download {name!r}: {exc}") from exc
    return Path(folder)


def _checked_gguf_name(filename: str) -> str:
    if not is_gguf(Path(filename)):
        raise InvalidInputError(f"filename={filename!r} is not a .gguf file")
    return filename


def read_text(path: Path, max_bytes: int = MAX_JSON_BYTES) -> str:
    """The text of the model file `path`: a regular file inside its model
    folder of at most `max_bytes` (checked before it is opened), UTF-8."""
    check_model_file(path, max_bytes)
    try:
        with path.open("rb") as f:
            raw = f.read(max_bytes + 1)
        if len(raw) > max_bytes:
            raise InvalidInputError(f"{path} has more than the {max_bytes} bytes it may have")
        return raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"{path} is not readable UTF-8 text: {exc}") from exc


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from the model file `path` (see `read_text`), or an
    InvalidInputError naming the file."""
    text = read_text(path)
    try:
        data = json.loads(text)
    # ValueError: malformed JSON, or an integer of more digits than Python
    # converts; RecursionError: nesting deeper than the interpreter's stack.
    except (ValueError, RecursionError) as exc:
        raise InvalidInputError(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidInputError(f"{path} holds {type(data).__name__}, not a JSON object")
    return data


def model_config(folder: Path) -> tuple[ModelConfig, dict[str, Any]]:
    """Checks `config.json` describes a BitNet b1.58 model trit runs; returns
    the engine's config and the raw JSON."""
    path = folder / "config.json"
    return ModelConfig.from_file(path), read_json(path)


HEADS = ("int8", "bf16", "q6")
PACKINGS = ("i2", "tq1", "tl")


def load_model(
    folder: Path, *, threads: int | None = None, head: str = "int8", packing: str = "i2"
) -> Model:
    """Reads the checkpoint in `folder` (or the GGUF file it is) into the engine. Load warnings (an
    all-zero tensor, unused tensors) are issued with `warnings.warn`.

    `head` is the precision of the output head: "int8" (default) quantizes
    its rows (and, for a tied head, the embedding lookups) to int8, halving
    the bytes each generated token reads for a perplexity change of about
    0.02 % (README, "Precision"); "q6" to 6-bit rows with a scale per 32
    columns, 78 % of int8's bytes; "bf16" keeps it as stored, and the logits
    are then transformers' own.

    `packing` is how the ternary projections are stored: "i2" (default) 2
    bits per weight, "tq1" 1.625 (five weights per byte): 19 % fewer bytes
    per generated token for more decoding work per byte, or "tl" 1.6 (five
    weights per byte in tiles of 64 rows, multiplied by table lookups on
    AVX-512 VBMI CPUs); the same logits (README, "Packing")."""
    if not isinstance(head, str) or head not in HEADS:
        raise InvalidInputError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
    if not isinstance(packing, str) or packing not in PACKINGS:
        raise InvalidInputError(f"packing must be one of {', '.join(PACKINGS)}, got {packing!r}")
    # Errors name the file at fault, or the folder for a tensor the model
    # needs but the checkpoint lacks or holds wrongly.
    model, messages = Model.open(folder, threads=threads, head=head, packing=packing)
    for message in messages:
        warnings.warn(f"{folder}: {message}", RuntimeWarning, stacklevel=3)
    return model
