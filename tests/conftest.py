from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from trit import Generator

FIXTURES = Path(__file__).parent / "fixtures"
MODELS = ["tiny-gqa-packed", "tiny-mha-packed", "tiny-gqa-bf16", "tiny-gqa-sharded"]

_cache: dict[tuple[str, bool], Generator] = {}


def generator(name: str, *, exact: bool = True) -> Generator:
    """One Generator per fixture model for the whole run (loading is cheap,
    but the tests call this often). `exact`: the bf16 head, as transformers
    and an f32 KV cache, as transformers computes (the fixtures' expected
    values come from it); otherwise trit's
    defaults, as the CLI and the server load a model."""
    if (name, exact) not in _cache:
        if exact:
            g = Generator.from_pretrained(FIXTURES / name, threads=2, head="bf16", kv_cache="f32")
        else:
            g = Generator.from_pretrained(FIXTURES / name, threads=2)
        _cache[name, exact] = g
    return _cache[name, exact]


@pytest.fixture
def model_copy(tmp_path: Path) -> Path:
    """A writable copy of tiny-gqa-packed to corrupt."""
    dst = tmp_path / "model"
    shutil.copytree(FIXTURES / "tiny-gqa-packed", dst)
    (dst / "expected.npz").unlink()
    return dst
