"""Hostile model folders, run in a child process by tests/test_hostile_files.py.

`python tests/hostile_folders.py CLASS EXAMPLES` runs EXAMPLES hypothesis
examples of one class of damage (see `CLASSES`) against a copy of a fixture
model: each folder is loaded with `Generator.from_pretrained`, and if that
works, used (a generation, a chat turn). The only exceptions allowed out are
trit's own (`TritError` and its subclasses: `InvalidInputError`,
`OutOfMemoryError`). It prints one summary line, `CLASS examples=N loaded=L
refused=R`, and exits 0; a failing example exits non-zero after hypothesis
printed it, and an abort or a hang shows in the parent as the exit status or
a timeout, so that it fails one test instead of the whole pytest run.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FIXTURES = Path(__file__).parent / "fixtures"

# ---------------------------------------------------------------- values

# Integers at and beyond every boundary a size can cross.
EDGE_INTS = st.sampled_from(
    [0, 1, -1, 3, 255, 256, 2**31, 2**32, 2**32 + 4, 2**53 + 1, 2**58, 2**62, 2**63]
    + [2**63 - 1, 2**64 - 1, 2**64, 2**64 + 4, 2**100, -(2**63), -(2**64)]
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    EDGE_INTS,
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0.5, -0.0, 1e308, 2.0**64, 64.0]),
    st.text(max_size=8),
    st.sampled_from(["false", "true", "64", "1e4", "\ud800", "offline", "bitnet"]),
)


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


JSON_VALUES = st.one_of(
    SCALARS,
    st.lists(SCALARS, max_size=3),
    st.dictionaries(st.text(max_size=5), SCALARS, max_size=3),
    st.sampled_from([100, 1000, 100_000]).map(nested),
)


def raw_json(value: Any) -> str:
    """JSON text for `value`, written by hand where `json` would refuse:
    deep nesting without recursion, NaN and infinities as Python writes them,
    lone surrogates as they are."""
    if isinstance(value, list) and value and isinstance(value[0], list):
        depth = 0
        inner: Any = value
        while isinstance(inner, list) and len(inner) == 1:
            inner, depth = inner[0], depth + 1
        if depth > 20:
            return "[" * depth + raw_json(inner) + "]" * depth
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {raw_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(raw_json(v) for v in value) + "]"
    return json.dumps(value)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """`data` as JSON (see `raw_json`)."""
    path.write_text(raw_json(data), encoding="utf-8", errors="surrogatepass")


# ---------------------------------------------------------------- safetensors


def read_st(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_st(
    path: Path, header: dict[str, Any] | str, data: bytes, length: int | None = None
) -> None:
    text = header if isinstance(header, str) else raw_json(header)
    blob = text.encode("utf-8", errors="surrogatepass")
    n = len(blob) if length is None else length
    path.write_bytes(struct.pack("<Q", n % 2**64) + blob + data)


# ---------------------------------------------------------------- classes of damage

Damage = Callable[[Path], None]


@st.composite
def config_damage(draw: Any) -> Damage:
    config = json.loads((FIXTURES / "tiny-gqa-packed" / "config.json").read_text())
    keys = sorted(config) + [
        "head_dim",
        "quantization_config.linear_class",
        "quantization_config.quantization_mode",
        "rope_scaling",
    ]
    changes = draw(st.lists(st.tuples(st.sampled_from(keys), JSON_VALUES), min_size=1, max_size=3))

    def damage(folder: Path) -> None:
        for key, value in changes:
            target = config
            if "." in key:
                outer, key = key.split(".")
                if not isinstance(config.get(outer), dict):
                    config[outer] = {}
                target = config[outer]
            target[key] = value
        write_json(folder / "config.json", config)

    return damage


@st.composite
def header_damage(draw: Any) -> Damage:
    kind = draw(st.sampled_from(["field", "length", "truncate", "append", "raw", "overlap"]))
    field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
    value = draw(
        st.one_of(
            JSON_VALUES,
            st.lists(EDGE_INTS, min_size=1, max_size=3),
            st.sampled_from(["I8", "F64", "BOOL", "F8_E4M3", "U8", "BF16", "F32"]),
            st.lists(st.floats(0, 1e6), min_size=1, max_size=2),
        )
    )
    which = draw(st.integers(0, 10**6))
    number = draw(st.integers(0, 2**64 - 1))
    text = draw(st.text(max_size=40))

    def damage(folder: Path) -> None:
        path = folder / "model.safetensors"
        header, data = read_st(path)
        names = sorted(k for k in header if k != "__metadata__")
        name = names[which % len(names)]
        if kind == "field":
            header[name][field] = value
            write_st(path, header, data)
        elif kind == "length":
            write_st(path, header, data, length=number)
        elif kind == "truncate":
            raw = path.read_bytes()
            path.write_bytes(raw[: which % len(raw)])
        elif kind == "append":
            path.write_bytes(path.read_bytes() + text.encode("utf-8", "surrogatepass"))
        elif kind == "raw":
            write_st(path, text, data)
        else:  # two tensors sharing bytes
            other = names[(which + 1) % len(names)]
            header[other]["data_offsets"] = header[name]["data_offsets"]
            write_st(path, header, data)

    return damage


@st.composite
def tokenizer_damage(draw: Any) -> Damage:
    target = draw(
        st.sampled_from(["tokenizer.json", "tokenizer_config.json", "generation_config.json"])
    )
    kind = draw(st.sampled_from(["field", "bytes", "template"]))
    key = draw(
        st.sampled_from(
            [
                "chat_template",
                "bos_token",
                "eos_token",
                "eos_token_id",
                "model",
                "decoder",
                "added_tokens",
                "pre_tokenizer",
                "normalizer",
                "unk_token",
            ]
        )
    )
    value = draw(JSON_VALUES)
    cut = draw(st.integers(0, 10**6))
    template = draw(
        st.sampled_from(
            [
                "{{ raise_exception('no') }}",
                "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                "{{ 'x' * 1000000000 }}",
                "{{ 10 ** 10 ** 10 }}",
                "{% for i in range(99999) %}{{ 'abcdefghij' * 99 }}{% endfor %}",
                "{{ messages[0].content.__class__ }}",
                "{{ ''.__class__.__mro__ }}",
                "{% if %}",
                "{{ messages | tojson }}",
            ]
        )
    )

    def damage(folder: Path) -> None:
        path = folder / target
        if kind == "bytes":
            raw = path.read_bytes() if path.exists() else b"{}"
            path.write_bytes(raw[: cut % (len(raw) + 1)])
            return
        data = json.loads(path.read_text()) if path.exists() else {}
        if kind == "template":
            cfg = folder / "tokenizer_config.json"
            data = json.loads(cfg.read_text())
            data["chat_template"] = template
            write_json(cfg, data)
            return
        data[key] = value
        write_json(path, data)

    return damage


@st.composite
def shard_damage(draw: Any) -> Damage:
    shard = draw(
        st.sampled_from(
            [
                "../model-00001-of-00002.safetensors",
                "/etc/passwd",
                "/dev/zero",
                "",
                ".",
                "..",
                "sub/model-00001-of-00002.safetensors",
                "model-00003-of-00002.safetensors",
                "tokenizer.json",
                "config.json",
            ]
        )
    )
    value = draw(st.one_of(st.just(shard), JSON_VALUES))
    which = draw(st.integers(0, 10**6))
    whole = draw(st.one_of(st.none(), JSON_VALUES))

    def damage(folder: Path) -> None:
        path = folder / "model.safetensors.index.json"
        index = json.loads(path.read_text())
        if whole is not None:
            index["weight_map"] = whole
        else:
            names = sorted(index["weight_map"])
            index["weight_map"][names[which % len(names)]] = value
        write_json(path, index)

    return damage


@st.composite
def link_damage(draw: Any) -> Damage:
    name = draw(
        st.sampled_from(
            [
                "config.json",
                "tokenizer.json",
                "tokenizer_config.json",
                "generation_config.json",
                "model.safetensors",
            ]
        )
    )
    target = draw(st.sampled_from(["/dev/zero", "/dev/null", "outside", "fifo", "folder", "self"]))

    def damage(folder: Path) -> None:
        path = folder / name
        path.unlink()
        if target == "outside":
            outside = folder.parent / f"outside-{name}"
            shutil.copy(FIXTURES / "tiny-gqa-packed" / name, outside)
            path.symlink_to(outside)
        elif target == "fifo":
            os.mkfifo(path)
        elif target == "folder":
            path.mkdir()
        elif target == "self":
            path.symlink_to(path)
        else:
            path.symlink_to(target)

    return damage


@st.composite
def size_damage(draw: Any) -> Damage:
    """Configs whose sizes exceed memory (the KV cache, huge tensors)."""
    max_pos = draw(st.sampled_from([2**31, 2**40, 2**50, 2**58, 2**62, 2**63 - 1, 2**64 - 1]))
    vocab = draw(st.sampled_from([512, 2**40, 2**62]))

    def damage(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        config["max_position_embeddings"] = max_pos
        config["vocab_size"] = vocab
        write_json(folder / "config.json", config)

    return damage


CLASSES: dict[str, tuple[str, Any]] = {
    "config": ("tiny-gqa-packed", config_damage()),
    "header": ("tiny-gqa-packed", header_damage()),
    "tokenizer": ("tiny-gqa-packed", tokenizer_damage()),
    "shards": ("tiny-gqa-sharded", shard_damage()),
    "links": ("tiny-gqa-packed", link_damage()),
    "sizes": ("tiny-gqa-packed", size_damage()),
}


def use(folder: Path) -> str:
    """Loads and uses the model in `folder`: "loaded", or "refused" when a
    trit error said why; anything else propagates."""
    import warnings

    from trit import Generator, TritError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            g = Generator.from_pretrained(folder, threads=1)
        g.generate("Once", 2)
        if g.tokenizer.chat_template is not None:
            g.chat([{"role": "user", "content": "hi"}], 2)
        return "loaded"
    except TritError as exc:
        assert str(exc), "an error without a message"
        return "refused"


def main() -> int:
    import trit.tokenizer

    # Templates that loop forever are stopped sooner (the bound is what is tested).
    trit.tokenizer.RENDER_SECONDS = 0.5
    name, examples = sys.argv[1], int(sys.argv[2])
    fixture, strategy = CLASSES[name]
    outcomes: Counter[str] = Counter()
    scratch = Path(tempfile.mkdtemp(prefix="trit-hostile-"))

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def check(damage: Damage) -> None:
        case = scratch / f"case-{sum(outcomes.values())}"
        folder = case / "model"
        shutil.copytree(FIXTURES / fixture, folder, ignore=shutil.ignore_patterns("*.npz"))
        try:
            damage(folder)
            outcomes[use(folder)] += 1
        finally:
            shutil.rmtree(case, ignore_errors=True)

    try:
        check()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    total = sum(outcomes.values())
    print(f"{name} examples={total} loaded={outcomes['loaded']} refused={outcomes['refused']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
