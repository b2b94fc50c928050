"""Hostile model folders: whatever a folder holds, loading it ends in a trit
error or a working model, never an abort, a panic, a hang or another
exception (issue 15, classes 1, 6 and 7).

The hypothesis cases run in child processes (tests/hostile_folders.py), so
that an abort fails one test rather than the whole run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from trit import Generator, InvalidInputError, OutOfMemoryError, TritError
from trit.loader import read_json

HERE = Path(__file__).parent
FIXTURES = HERE / "fixtures"

# Examples per class of damage: together well under a minute on two cores.
EXAMPLES = {
    "config": 300,
    "header": 300,
    "tokenizer": 150,
    "shards": 100,
    "links": 30,
    "sizes": 20,
}


def run_child(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "TRIT_NUM_THREADS": "1"},
    )


@pytest.mark.parametrize("damage", sorted(EXAMPLES))
def test_hostile_folders_end_in_trit_errors(damage: str) -> None:
    result = run_child([str(HERE / "hostile_folders.py"), damage, str(EXAMPLES[damage])], 150)
    assert result.returncode == 0, (
        f"exit status {result.returncode} (negative: killed by a signal)\n"
        f"{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    )
    summary = result.stdout.strip().splitlines()[-1]
    print(summary)
    assert summary.startswith(f"{damage} examples=")
    assert int(summary.split("examples=")[1].split()[0]) >= EXAMPLES[damage] // 2


def copy_model(tmp_path: Path, name: str = "tiny-gqa-packed") -> Path:
    folder = tmp_path / "model"
    shutil.copytree(FIXTURES / name, folder, ignore=shutil.ignore_patterns("*.npz"))
    return folder


def edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def load(folder: Path, **kwargs: object) -> Generator:
    return Generator.from_pretrained(folder, threads=1, **kwargs)  # type: ignore[arg-type]


def test_a_kv_cache_too_large_is_an_error_naming_n_ctx(tmp_path: Path) -> None:
    # Before: SIGABRT at 2**35, a capacity-overflow panic at 2**58, and a size
    # that wrapped to 0 at 2**62. In a child, so that a regression fails here.
    folder = copy_model(tmp_path)
    code = textwrap.dedent(
        f"""
        import json, sys
        from pathlib import Path
        from trit import Generator, OutOfMemoryError, InvalidInputError
        folder = Path({str(folder)!r})
        for exponent in (35, 40, 58, 62, 63):
            config = json.loads((folder / "config.json").read_text())
            config["max_position_embeddings"] = 2**exponent
            (folder / "config.json").write_text(json.dumps(config))
            try:
                Generator.from_pretrained(folder, threads=1)
            except (OutOfMemoryError, InvalidInputError) as exc:
                assert "n_ctx" in str(exc), exc
                print(exponent, type(exc).__name__)
            else:
                sys.exit(f"2**{{exponent}} positions were allocated")
        """
    )
    result = run_child(["-c", code], 60)
    assert result.returncode == 0, result.stderr[-4000:]
    lines = result.stdout.split("\n")
    assert "35 OutOfMemoryError" in lines and "62 InvalidInputError" in lines, result.stdout
    # A smaller n_ctx makes the same model usable.
    g = load(folder, n_ctx=64)
    assert g.n_ctx == 64 and g.generate("Once", 2) is not None


def test_out_of_memory_is_a_trit_error_and_a_memory_error() -> None:
    assert issubclass(OutOfMemoryError, TritError)
    assert issubclass(OutOfMemoryError, MemoryError)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("tie_word_embeddings", "false", "expected true or false"),
        ("max_position_embeddings", -1, "expected a positive integer"),
        ("max_position_embeddings", 2**64, "expected a positive integer"),
        ("hidden_size", "64", "expected a positive integer"),
        ("rms_norm_eps", [1e-5], "expected a number"),
        ("num_hidden_layers", 2.0, "expected a positive integer"),
    ],
)
def test_bad_config_values_name_the_file_and_field(
    tmp_path: Path, field: str, value: object, expected: str
) -> None:
    folder = copy_model(tmp_path)
    edit_json(folder / "config.json", **{field: value})
    with pytest.raises(InvalidInputError, match=expected) as info:
        load(folder)
    assert "config.json" in str(info.value) and field in str(info.value)


def test_deeply_nested_json_is_invalid_input(tmp_path: Path) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        folder = copy_model(tmp_path / name)
        (folder / name).write_text(deep)
        with pytest.raises(InvalidInputError, match=name):
            load(folder)
    with pytest.raises(InvalidInputError, match="not readable JSON"):
        (tmp_path / "x.json").write_text('{"a": ' + "1" * 5000 + "}")
        read_json(tmp_path / "x.json")


def st_bytes(header: dict[str, object], data: bytes) -> bytes:
    blob = json.dumps(header).encode()
    return len(blob).to_bytes(8, "little") + blob + data


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        # overlapping data_offsets
        (
            {
                "a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
                "b": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]},
            },
            "gap before it or overlap",
        ),
        # float offsets and shapes are refused, not truncated
        ({"a": {"dtype": "U8", "shape": [3], "data_offsets": [0.0, 3.0]}}, "malformed"),
        ({"a": {"dtype": "U8", "shape": [3.0], "data_offsets": [0, 3]}}, "malformed"),
        # a zero-size tensor where the model needs one
        ({"a": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}}, "missing tensor"),
        # an element count that overflows
        (
            {"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 3]}},
            "too large|do not match",
        ),
        ({"a": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 3]}}, "malformed"),
        ({"a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 2**64]}}, "malformed"),
    ],
)
def test_invalid_safetensors_headers_are_refused(
    tmp_path: Path, header: dict[str, object], expected: str
) -> None:
    folder = copy_model(tmp_path)
    ends = [
        end
        for info in header.values()
        for end in [info["data_offsets"][1]]  # type: ignore[index]
        if isinstance(end, int) and end <= 3
    ]
    (folder / "model.safetensors").write_bytes(st_bytes(header, b"\0" * max(ends, default=3)))
    with pytest.raises(InvalidInputError, match=expected) as info:
        load(folder)
    assert "model.safetensors" in str(info.value) or str(folder) in str(info.value)


def test_a_deeply_nested_header_is_refused(tmp_path: Path) -> None:
    folder = copy_model(tmp_path)
    blob = b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    (folder / "model.safetensors").write_bytes(len(blob).to_bytes(8, "little") + blob)
    with pytest.raises(InvalidInputError, match="model.safetensors"):
        load(folder)


@pytest.mark.parametrize(
    "shard", ["../model-00001-of-00002.safetensors", "/etc/passwd", "sub/x.safetensors", ""]
)
def test_shard_names_outside_the_folder_are_refused(tmp_path: Path, shard: str) -> None:
    folder = copy_model(tmp_path, "tiny-gqa-sharded")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = shard
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(InvalidInputError, match="not a file name in the folder"):
        load(folder)


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "tokenizer_config.json"])
@pytest.mark.parametrize("target", ["/dev/zero", "outside", "fifo"])
def test_links_to_devices_or_outside_files_are_refused_before_opening(
    tmp_path: Path, name: str, target: str
) -> None:
    folder = copy_model(tmp_path)
    (folder / name).unlink()
    if target == "outside":
        outside = tmp_path / name
        shutil.copy(FIXTURES / "tiny-gqa-packed" / name, outside)
        (folder / name).symlink_to(outside)
        expected = "outside the model folder"
    elif target == "fifo":
        os.mkfifo(folder / name)  # opening it would block forever
        expected = "not a regular file"
    else:
        (folder / name).symlink_to(target)
        expected = "not a regular file"
    with pytest.raises(InvalidInputError, match=expected):
        load(folder)


def test_hugging_face_snapshot_links_are_followed(tmp_path: Path) -> None:
    # The cache layout: snapshots/<revision>/<file> -> ../../blobs/<hash>.
    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, path in enumerate(sorted((FIXTURES / "tiny-gqa-packed").iterdir())):
        if path.suffix == ".npz":
            continue
        shutil.copy(path, repo / "blobs" / f"blob{i}")
        (snapshot / path.name).symlink_to(f"../../blobs/blob{i}")
    assert load(snapshot).generate("Once", 2) is not None


def test_oversized_json_files_are_refused(tmp_path: Path) -> None:
    from trit._core import MAX_JSON_BYTES

    folder = copy_model(tmp_path)
    with (folder / "generation_config.json").open("w") as f:
        f.write('{"eos_token_id": 510, "pad": "')
        f.truncate(MAX_JSON_BYTES + 10)
    with pytest.raises(InvalidInputError, match="generation_config.json has .* bytes, more than"):
        load(folder)


@pytest.mark.parametrize("eos", ["510", [510, "x"], [1.5], -1, 2**64, True])
def test_bad_eos_token_ids_are_invalid_input(tmp_path: Path, eos: object) -> None:
    folder = copy_model(tmp_path)
    edit_json(folder / "generation_config.json", eos_token_id=eos)
    with pytest.raises(InvalidInputError, match="eos_token_id"):
        load(folder)


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{{ raise_exception('Conversation roles must alternate') }}", "roles must alternate"),
        (
            "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
            "ran for more than",
        ),
        ("{% for i in range(99999) %}{{ 'abcdefghij' * 99 }}{% endfor %}", "output passed"),
        ("{{ 'x' * 10 ** 9 }}", "repetition too large"),
        ("{{ ((2 ** 1000) ** 1000) ** 1000 }}", "power too large"),
        ("{{ no_such_function() }}", "refused these messages"),
    ],
)
def test_chat_templates_render_within_bounds(
    tmp_path: Path, template: str, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import trit.tokenizer

    monkeypatch.setattr(trit.tokenizer, "RENDER_SECONDS", 0.5)
    folder = copy_model(tmp_path)
    edit_json(folder / "tokenizer_config.json", chat_template=template)
    g = load(folder)
    with pytest.raises(InvalidInputError, match=expected):
        g.chat([{"role": "user", "content": "hi"}], 2)


def test_trit_chat_reports_a_template_that_raises(tmp_path: Path) -> None:
    folder = copy_model(tmp_path)
    edit_json(
        folder / "tokenizer_config.json",
        chat_template="{{ raise_exception('Conversation roles must alternate') }}",
    )
    result = subprocess.run(
        [sys.executable, "-m", "trit.cli", "chat", "-m", str(folder), "-n", "2", "-t", "1"],
        input="Hi\nHello\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("(not sent: the chat template refused these messages") == 2


def test_a_checkpoint_larger_than_memory_is_refused_before_any_work(tmp_path: Path) -> None:
    # A sparse file declares a 1 TiB embedding at no disk cost: before, its
    # values were scanned for hours and then an allocation aborted.
    folder = copy_model(tmp_path)
    edit_json(folder / "config.json", vocab_size=2**33)
    code = textwrap.dedent(
        f"""
        import json, struct
        from pathlib import Path
        from trit import OutOfMemoryError
        from trit._core import Model
        path = Path({str(folder)!r}) / "model.safetensors"
        size = 2**33 * 64 * 2
        header = json.dumps({{"model.embed_tokens.weight": {{
            "dtype": "BF16", "shape": [2**33, 64], "data_offsets": [0, size]}}}}).encode()
        try:
            with path.open("wb") as f:
                f.write(struct.pack("<Q", len(header)) + header)
                f.truncate(8 + len(header) + size)
        except OSError:
            raise SystemExit("no sparse files")
        try:
            Model.open(path.parent, threads=1)
        except OutOfMemoryError as exc:
            print("refused:", exc)
        """
    )
    result = run_child(["-c", code], 60)
    if "no sparse files" in result.stderr:
        pytest.skip("this file system has no sparse files of 1 TiB")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "refused: not enough memory" in result.stdout, result.stdout + result.stderr[-2000:]
