from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from trit import Generator

FIXTURES = Path(__file__).parent / "fixtures"
MODELS = ["tiny-gqa-packed", "tiny-mha-packed", "tiny-gqa-bf16", "tiny-gqa-sharded"]

_cache: dict[str, Generator] = {}


def generator(name: str) -> Generator:
    """One Generator per fixture model for the whole run (loading is cheap,
    but the tests call this often)."""
    if name not in _cache:
        # The bf16 head, as transformers computes: these are compared with it.
        _cache[name] = Generator.from_pretrained(FIXTURES / name, threads=2, head="bf16")
    return _cache[name]


@pytest.fixture
def model_copy(tmp_path: Path) -> Path:
    """A writable copy of tiny-gqa-packed to corrupt."""
    dst = tmp_path / "model"
    shutil.copytree(FIXTURES / "tiny-gqa-packed", dst)
    (dst / "expected.npz").unlink()
    return dst
