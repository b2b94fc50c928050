"""`trit convert`: a model written as GGUF and read back gives identical
logits, the reference reader accepts the TQ files, and the tokenizer travels
in the metadata."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import FIXTURES

from trit import InvalidInputError
from trit._core import Model, Session
from trit.gguf_export import write_gguf
from trit.safetensors_export import write_safetensors
from trit.synthetic import Shape
from trit.synthetic import write as write_synthetic
from trit.tokenizer import Tokenizer

TINY = FIXTURES / "tiny-gqa-packed"
IDS = [1, 5, 9, 60, 3, 17, 2]


def logits(path: Path) -> np.ndarray:
    model, _ = Model.open(path, threads=1)
    return Session(model, kv_cache="f32").logits(IDS)


def convert(source: Path, out: Path, kind: str) -> Path:
    model, _ = Model.open(source, threads=1)
    write_gguf(model, source, out, kind)
    return out


@pytest.fixture(scope="module")
def block_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("block-model")
    write_synthetic(Shape("test", 256, 512, 2, 4, 2, 512, False, 64), folder)
    # The tiny fixture's tokenizer, with its special token ids.
    (folder / "tokenizer.json").write_bytes((TINY / "tokenizer.json").read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config.update(bos_token_id=509, eos_token_id=510)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_cli_round_trip_from_safetensors(tmp_path: Path) -> None:
    out = tmp_path / "tiny.gguf"
    r = subprocess.run(
        [sys.executable, "-m", "trit.cli", "convert", "-m", str(TINY), "-o", str(out), "-t", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert np.array_equal(logits(out), logits(TINY))
    text = "Hello wörld 12345, can't stop 😀"
    assert Tokenizer(out).encode(text) == Tokenizer(TINY).encode(text)
    assert Tokenizer(out).chat_template == Tokenizer(TINY).chat_template


@pytest.mark.parametrize("kind", ["tq2_0", "tq1_0"])
def test_tq_round_trip_and_reference_reader(tmp_path: Path, block_model: Path, kind: str) -> None:
    out = convert(block_model, tmp_path / "m.gguf", kind)
    assert np.array_equal(logits(out), logits(block_model))
    reader = gguf.GGUFReader(out)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.1.ffn_down.weight"] == kind.upper()
    assert "output.weight" in types  # the untied head
    # GGUF to GGUF: TQ back to I2_S, still the same model.
    again = convert(out, tmp_path / "again.gguf", "i2_s")
    assert np.array_equal(logits(again), logits(block_model))


def test_tq_needs_whole_blocks(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"blk\.0\.attn_q\.weight has rows of 64"):
        convert(TINY, tmp_path / "m.gguf", "tq2_0")


def test_gguf_to_safetensors_and_back(tmp_path: Path, block_model: Path) -> None:
    tq = convert(block_model, tmp_path / "m.gguf", "tq2_0")
    folder = tmp_path / "hf"
    r = subprocess.run(
        [sys.executable, "-m", "trit.cli", "convert", "-m", str(tq), "-o", str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert np.array_equal(logits(folder), logits(block_model))
    text = "Hello wörld 12345, can't stop 😀"
    assert Tokenizer(folder).encode(text) == Tokenizer(TINY).encode(text)
    back = convert(folder, tmp_path / "back.gguf", "i2_s")
    assert np.array_equal(logits(back), logits(block_model))


def test_safetensors_folder_round_trip(tmp_path: Path) -> None:
    model, _ = Model.open(TINY, threads=1)
    write_safetensors(model, TINY, tmp_path / "copy")
    assert np.array_equal(logits(tmp_path / "copy"), logits(TINY))
