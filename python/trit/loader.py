"""Finding a BitNet b1.58 checkpoint and reading it into a trit model.

A checkpoint is a local folder or a Hugging Face repo id (downloaded with
``huggingface_hub.snapshot_download``, which honours ``HF_HUB_OFFLINE``). Its
``config.json`` is checked here; its safetensors files are read by parsing
their headers and handing each tensor to the engine as a zero-copy view of a
memory map, which is closed as soon as the engine has copied what it keeps.
"""

from __future__ import annotations

import json
import mmap
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from trit._core import InvalidInputError, Model, ModelConfig, TritError

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

# Bytes per element of every safetensors dtype, so a header can be checked
# before the engine sees it (the engine itself reads U8, BF16, F16 and F32).
DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
ENGINE_DTYPES = {"U8", "BF16", "F16", "F32"}

# A safetensors header this large is not a header: refuse before reading it.
MAX_HEADER_BYTES = 100 * 1024 * 1024

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve(name_or_path: str | Path, *, revision: str | None = None) -> Path:
    """The local folder of a model: `name_or_path` itself if it is a folder,
    else the snapshot of that Hugging Face repo id."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if revision is not None:
            raise InvalidInputError(f"revision={revision!r} applies to Hub repos, not to {path}")
        return path
    if path.exists():
        raise InvalidInputError(f"{path} is a file; expected a model folder or a Hub repo id")
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
        folder = huggingface_hub.snapshot_download(
            name, revision=revision, allow_patterns=ALLOW_PATTERNS
        )
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


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or an InvalidInputError naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidInputError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInputError(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidInputError(f"{path} holds {type(data).__name__}, not a JSON object")
    return data


def _require(cfg: dict[str, Any], key: str, kind: type, path: Path) -> Any:
    value = cfg.get(key)
    # bool is an int subclass; a flag is never a size.
    if value is None or isinstance(value, bool) and kind is not bool:
        raise InvalidInputError(f"{path}: {key} is missing or null")
    if kind is float and isinstance(value, int):
        value = float(value)
    if not isinstance(value, kind):
        raise InvalidInputError(f"{path}: {key} is {value!r}; expected {kind.__name__}")
    return value


def model_config(folder: Path) -> tuple[ModelConfig, dict[str, Any]]:
    """Checks `config.json` describes a BitNet b1.58 model trit runs; returns
    the engine's config and the raw JSON."""
    path = folder / "config.json"
    cfg = read_json(path)
    model_type = cfg.get("model_type")
    if model_type != "bitnet":
        raise InvalidInputError(
            f"{path}: model_type {model_type!r} is not supported; trit runs BitNet b1.58 "
            'checkpoints (model_type "bitnet")'
        )
    archs = cfg.get("architectures")
    if archs is not None and "BitNetForCausalLM" not in archs:
        raise InvalidInputError(
            f"{path}: architectures {archs!r} is not supported; expected BitNetForCausalLM"
        )
    act = cfg.get("hidden_act", "relu2")
    if act != "relu2":
        raise InvalidInputError(f"{path}: hidden_act {act!r} is not supported (only relu2)")
    if cfg.get("attention_bias"):
        raise InvalidInputError(f"{path}: attention_bias is not supported")
    rope_theta, rope_type = _rope(cfg, path)
    if rope_type not in (None, "default"):
        raise InvalidInputError(f"{path}: RoPE scaling {rope_type!r} is not supported")
    linear_class, mode = _quantization(cfg, path)
    heads = _require(cfg, "num_attention_heads", int, path)
    head_dim = cfg.get("head_dim")
    config = ModelConfig(
        vocab_size=_require(cfg, "vocab_size", int, path),
        hidden_size=_require(cfg, "hidden_size", int, path),
        intermediate_size=_require(cfg, "intermediate_size", int, path),
        num_hidden_layers=_require(cfg, "num_hidden_layers", int, path),
        num_attention_heads=heads,
        num_key_value_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=head_dim if isinstance(head_dim, int) else None,
        rope_theta=rope_theta,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        max_position_embeddings=_require(cfg, "max_position_embeddings", int, path),
        # transformers' PretrainedConfig default.
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        linear_class=linear_class,
        quantization_mode=mode,
    )
    return config, cfg


def _rope(cfg: dict[str, Any], path: Path) -> tuple[float, str | None]:
    # transformers 5 may nest the RoPE settings in rope_parameters.
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise InvalidInputError(f"{path}: rope_parameters / rope_scaling must be objects")
    theta = params.get("rope_theta", cfg.get("rope_theta"))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool):
        raise InvalidInputError(f"{path}: rope_theta is missing or not a number")
    rope_type = scaling.get("rope_type", scaling.get("type")) or params.get("rope_type")
    return float(theta), rope_type


def _quantization(cfg: dict[str, Any], path: Path) -> tuple[str, str]:
    q = cfg.get("quantization_config")
    if not isinstance(q, dict):
        raise InvalidInputError(
            f"{path}: no quantization_config; trit runs BitNet b1.58 (quant_method "
            '"bitnet") checkpoints'
        )
    if q.get("quant_method") != "bitnet":
        raise InvalidInputError(
            f"{path}: unsupported quantization config: quant_method "
            f'{q.get("quant_method")!r}, expected "bitnet"'
        )
    # transformers' BitNetQuantConfig defaults.
    linear_class = q.get("linear_class", "bitlinear")
    mode = q.get("quantization_mode", "offline")
    if linear_class not in ("bitlinear", "autobitlinear"):
        raise InvalidInputError(
            f"{path}: unsupported quantization config: linear_class {linear_class!r}"
        )
    if mode not in ("offline", "online"):
        raise InvalidInputError(
            f"{path}: unsupported quantization config: quantization_mode {mode!r}"
        )
    if linear_class == "bitlinear" and mode == "online":
        raise InvalidInputError(
            f'{path}: unsupported quantization config: "online" needs linear_class "autobitlinear"'
        )
    if q.get("use_rms_norm"):
        raise InvalidInputError(
            f"{path}: unsupported quantization config: use_rms_norm (an RMSNorm before "
            "activation quantisation) is not implemented"
        )
    skipped = q.get("modules_to_not_convert") or []
    if any(m != "lm_head" for m in skipped):
        raise InvalidInputError(
            f"{path}: unsupported quantization config: modules_to_not_convert {skipped!r} "
            "(only lm_head may stay unquantised)"
        )
    return linear_class, mode


# ---------------------------------------------------------------- safetensors


class _Tensor:
    __slots__ = ("dtype", "end", "name", "path", "shape", "start")

    def __init__(
        self, name: str, path: Path, dtype: str, shape: list[int], start: int, end: int
    ) -> None:
        self.name, self.path, self.dtype, self.shape = name, path, dtype, shape
        self.start, self.end = start, end  # absolute byte offsets in the file


def read_header(path: Path) -> list[_Tensor]:
    """The tensors listed in a safetensors file's header, each checked to lie
    inside the file with a byte count that matches its shape and dtype."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise InvalidInputError(
                    f"{path}: truncated safetensors file ({size} bytes, no header length)"
                )
            n = int.from_bytes(prefix, "little")
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise InvalidInputError(
                    f"{path}: header length {n} does not fit the file ({size} bytes); "
                    "truncated or not a safetensors file"
                )
            raw = f.read(n)
    except FileNotFoundError:
        raise InvalidInputError(f"{path} does not exist") from None
    except OSError as exc:
        raise InvalidInputError(f"{path}: cannot read: {exc}") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInputError(f"{path}: the safetensors header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise InvalidInputError(f"{path}: the safetensors header is not a JSON object")
    data_start = 8 + n
    tensors = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = info["dtype"]
            shape = [int(d) for d in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInputError(f"{path}: malformed header entry for {name!r}") from exc
        if dtype not in DTYPE_SIZES:
            raise InvalidInputError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        if dtype not in ENGINE_DTYPES:
            raise InvalidInputError(
                f"{path}: tensor {name!r} has dtype {dtype}; trit reads U8, BF16, F16, F32"
            )
        if any(d < 0 for d in shape):
            raise InvalidInputError(f"{path}: tensor {name!r} has shape {shape}")
        numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if not 0 <= begin <= end or end - begin != numel * DTYPE_SIZES[dtype]:
            raise InvalidInputError(
                f"{path}: tensor {name!r} ({dtype} {shape}) has data_offsets "
                f"[{begin}, {end}], which do not match its size"
            )
        if data_start + end > size:
            raise InvalidInputError(
                f"{path}: tensor {name!r} ends at byte {data_start + end} but the file has "
                f"{size} bytes; the file is truncated"
            )
        tensors.append(_Tensor(name, path, dtype, shape, data_start + begin, data_start + end))
    return tensors


def checkpoint_tensors(folder: Path) -> list[_Tensor]:
    """Every tensor of the checkpoint, from `model.safetensors` or the shards
    its index names."""
    index_path = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    if index_path.exists():
        index = read_json(index_path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise InvalidInputError(f"{index_path}: no weight_map")
        files = sorted(set(weight_map.values()))
        by_file = {}
        for name in files:
            shard = folder / name
            if not shard.exists():
                raise InvalidInputError(f"{index_path} names {name}, which does not exist")
            by_file[name] = read_header(shard)
        tensors = [t for name in files for t in by_file[name]]
        held = {t.name: t.path.name for t in tensors}
        for tensor, file in weight_map.items():
            if held.get(tensor) != file:
                raise InvalidInputError(
                    f"{index_path} maps {tensor!r} to {file}, which does not hold it"
                )
    elif single.exists():
        tensors = read_header(single)
    else:
        raise InvalidInputError(
            f"{folder} has no model.safetensors or model.safetensors.index.json"
        )
    seen: dict[str, Path] = {}
    for t in tensors:
        if t.name in seen:
            raise InvalidInputError(f"tensor {t.name!r} is in both {seen[t.name]} and {t.path}")
        seen[t.name] = t.path
    return tensors


def _bytes_of(m: mmap.mmap, t: _Tensor) -> np.ndarray:
    """A read-only uint8 view of the tensor's bytes in the map (no copy)."""
    if t.end == t.start:
        return np.empty(0, np.uint8)
    return np.frombuffer(m, dtype=np.uint8, count=t.end - t.start, offset=t.start)


HEADS = ("int8", "bf16")


def load_model(folder: Path, *, threads: int | None = None, head: str = "int8") -> Model:
    """Reads the checkpoint in `folder` into the engine. Load warnings (an
    all-zero tensor, unused tensors) are issued with `warnings.warn`.

    `head` is the precision of the output head: "int8" (default) quantizes
    its rows (and, for a tied head, the embedding lookups) to int8, halving
    the bytes each generated token reads for a perplexity change of about
    0.02 % (README, "Output head"); "bf16" keeps it as stored, and the logits
    are then transformers' own."""
    if head not in HEADS:
        raise InvalidInputError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
    config, _ = model_config(folder)
    tensors = checkpoint_tensors(folder)
    maps: dict[Path, mmap.mmap] = {}
    args: list[tuple[str, str, list[int], np.ndarray]] = []
    try:
        for t in tensors:
            if t.path not in maps:
                with t.path.open("rb") as f:
                    maps[t.path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            args.append((t.name, t.dtype, t.shape, _bytes_of(maps[t.path], t)))
        try:
            # The views are read-only views of read-only maps: the engine may
            # drop their pages as it converts them, keeping peak memory near
            # the model's size rather than model plus file.
            model, messages = Model.load(
                config, args, threads=threads, release_file_pages=True, int8_head=head == "int8"
            )
        except InvalidInputError as exc:
            raise InvalidInputError(f"{folder}: {exc}") from None
    finally:
        # Drop every view before closing its map: an exported buffer keeps a
        # map from closing, and the views may sit in a traceback's frame.
        args.clear()
        for m in maps.values():
            m.close()
    for message in messages:
        warnings.warn(f"{folder}: {message}", RuntimeWarning, stacklevel=3)
    return model
