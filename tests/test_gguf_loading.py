"""A GGUF file alone is a model trit runs: Generator.from_pretrained and every
`trit` command take it (or a folder holding it), its tokenizer is built from
its metadata and encodes as the Hugging Face tokenizer of the same model."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import gguf_files
import numpy as np
import pytest
from conftest import FIXTURES

from trit import Generator, InvalidInputError
from trit.gguf_tokenizer import tokenizer_json
from trit.loader import choose_gguf
from trit.tokenizer import Tokenizer

TINY = FIXTURES / "tiny-gqa-packed"
BUNDLED = Path(__file__).parents[1] / "python" / "trit" / "models" / "tiny-fortunes"

CORPUS = (
    (FIXTURES / "tiny-fortunes-valid.txt").read_text(encoding="utf-8")
    + " héllo wörld 😀 ﬁ Ωmega 12345 6789 3.14159\n\n\t  x   y \r\n  <|begin_of_text|>  "
    + "can't WON'T it'll 你好，世界  \u00a0nbsp \u200bzero-width"
)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return gguf_files.write(TINY, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def tokenizer_only(folder: Path, out: Path) -> Path:
    w = gguf.GGUFWriter(str(out), gguf_files.ARCH)
    gguf_files.add_tokenizer(w, folder)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.mark.parametrize("folder", [TINY, BUNDLED], ids=["tiny", "bundled"])
def test_gguf_tokenizer_encodes_as_hugging_face(tmp_path: Path, folder: Path) -> None:
    hf = Tokenizer(folder)
    built = Tokenizer(tokenizer_only(folder, tmp_path / "t.gguf"))
    for text in [CORPUS, *CORPUS.split("\n")[:200]]:
        assert built.encode(text) == hf.encode(text)
        assert built.decode(hf.encode(text)) == hf.decode(hf.encode(text))
    assert built.vocab_size == hf.vocab_size
    assert built.eos_token == hf.eos_token
    assert built.chat_template == hf.chat_template


def test_unknown_pre_tokenizer_is_refused_by_name(tmp_path: Path) -> None:
    meta: dict[str, object] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "deepseek-llm",
        "tokenizer.ggml.tokens": ["a"],
        "tokenizer.ggml.merges": [],
    }
    with pytest.raises(InvalidInputError, match="'deepseek-llm' is not a pre-tokenizer"):
        tokenizer_json(meta, tmp_path / "x.gguf")
    meta["tokenizer.ggml.model"] = "t5"
    with pytest.raises(InvalidInputError, match="tokenizer.ggml.model 't5'"):
        tokenizer_json(meta, tmp_path / "x.gguf")


def test_generator_runs_a_gguf_file_as_its_safetensors_model(tiny_gguf: Path) -> None:
    kw = {"threads": 1, "head": "bf16", "kv_cache": "f32"}
    from_gguf = Generator.from_pretrained(tiny_gguf, **kw)  # type: ignore[arg-type]
    from_st = Generator.from_pretrained(TINY, **kw)  # type: ignore[arg-type]
    assert from_gguf.eos_ids == from_st.eos_ids
    a = from_gguf.generate("Hello world", max_new_tokens=16, temperature=0.0)
    b = from_st.generate("Hello world", max_new_tokens=16, temperature=0.0)
    assert a == b


def test_folders_holding_gguf_files(tmp_path: Path, tiny_gguf: Path) -> None:
    folder = tmp_path / "one"
    folder.mkdir()
    shutil.copy(tiny_gguf, folder / "model-i2_s.gguf")
    g = Generator.from_pretrained(folder, threads=1)
    assert g.config.hidden_size == 64
    shutil.copy(tiny_gguf, folder / "model-tq.gguf")
    with pytest.raises(InvalidInputError, match="2 GGUF files.*model-i2_s.gguf, model-tq.gguf"):
        Generator.from_pretrained(folder, threads=1)
    g = Generator.from_pretrained(folder, threads=1, filename="model-tq.gguf")
    assert g.config.num_hidden_layers == 2
    with pytest.raises(InvalidInputError, match="no file 'absent.gguf'"):
        Generator.from_pretrained(folder, threads=1, filename="absent.gguf")
    assert choose_gguf(["a.gguf", "README.md"], None, "repo") == "a.gguf"
    assert choose_gguf(["config.json"], None, "repo") is None


def test_cli_takes_a_gguf_file(tiny_gguf: Path) -> None:
    args = ["generate", "-m", str(tiny_gguf), "-p", "Hello world", "-n", "8", "-t", "1"]
    r = subprocess.run(
        [sys.executable, "-m", "trit.cli", *args, "--temp", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    st = subprocess.run(
        [sys.executable, "-m", "trit.cli", *args[:2], str(TINY), *args[3:], "--temp", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.stdout == st.stdout


def test_not_a_gguf_file_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "model.bin"
    other.write_bytes(b"x")
    with pytest.raises(InvalidInputError, match="not a .gguf file"):
        Generator.from_pretrained(other)
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(np.zeros(16, np.uint8).tobytes())
    with pytest.raises(InvalidInputError, match="fake.gguf.*not a GGUF file"):
        Generator.from_pretrained(fake)


def test_hub_repos_of_gguf_files(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_gguf: Path
) -> None:
    """A repo with GGUF files and no safetensors model: the one named by
    filename= is downloaded alone; several without it are listed. (The Hub is
    replaced by fakes: tests never download.)"""
    import huggingface_hub

    from trit.loader import ALLOW_PATTERNS, resolve

    downloads: list[str] = []
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()

    def snapshot_download(repo: str, *, revision: object, allow_patterns: list[str]) -> str:
        assert allow_patterns == ALLOW_PATTERNS
        assert not any(p.endswith(".gguf") for p in allow_patterns)
        return str(snapshot)

    def hf_hub_download(repo: str, filename: str, *, revision: object) -> str:
        downloads.append(filename)
        return str(tiny_gguf)

    files = ["README.md", "model-i2_s.gguf", "model-tq2_0.gguf"]
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo, revision: files)
    with pytest.raises(InvalidInputError, match="2 GGUF files.*model-i2_s.gguf, model-tq2_0.gguf"):
        resolve("org/model-gguf")
    assert downloads == []
    assert resolve("org/model-gguf", filename="model-tq2_0.gguf") == tiny_gguf
    assert downloads == ["model-tq2_0.gguf"]
    files.remove("model-tq2_0.gguf")
    assert resolve("org/model-gguf") == tiny_gguf
    assert downloads == ["model-tq2_0.gguf", "model-i2_s.gguf"]
    with pytest.raises(InvalidInputError, match="not a .gguf file"):
        resolve("org/model-gguf", filename="README.md")
