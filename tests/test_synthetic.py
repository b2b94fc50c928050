"""`trit bench --synthetic`: each published shape is written in its family's
layout (the one the reference-made fixtures have), read as that family, and
runs. The full-size files are never written here: a shrunken copy of each
shape (same family, same config keys, tiny dimensions) stands in for it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import st_files
from conftest import FIXTURES

from trit import synthetic
from trit._core import ModelConfig, Sampler, Session
from trit.loader import load_model

NAMES = list(synthetic.SHAPES)

# The reference-made fixture whose on-disk layout each family's synthetic model copies.
FIXTURE = {
    ("bitnet", True): "tiny-gqa-packed",
    ("llama", False): "tiny-falcon3-1.58bit",
    ("llama", True): "tiny-falcon-e",
    ("1bitllm", False): "tiny-1bitllm",
    ("1bitllm", True): "tiny-1bitllm",
}


def shrunk(shape: synthetic.Shape) -> synthetic.Shape:
    """`shape` with tiny dimensions: same family, head layout, tying and constants."""
    heads = 4
    kv_heads = 4 if shape.kv_heads == shape.heads else 2
    head_size = None if shape.head_size is None else 24  # still != hidden / heads
    return dataclasses.replace(
        shape,
        hidden=64,
        intermediate=160,
        layers=2,
        heads=heads,
        kv_heads=kv_heads,
        vocab=300,
        max_positions=64,
        head_size=head_size,
    )


def test_names_and_aliases() -> None:
    expected = {"2b4t", "falcon3-1b", "falcon3-3b", "falcon3-7b", "falcon3-10b"}
    expected |= {"falcon-e-1b", "falcon-e-3b", "bitnet-large", "bitnet-3b", "llama3-8b", "100b"}
    assert set(synthetic.SHAPES) == expected
    assert all(target in synthetic.SHAPES for target in synthetic.ALIASES.values())
    for name, shape in synthetic.SHAPES.items():
        assert shape.source, name
        assert shape.hidden % 4 == 0 and shape.intermediate % 4 == 0, name
        assert shape.heads % shape.kv_heads == 0, name


@pytest.mark.parametrize("name", NAMES)
def test_published_config_is_read_as_its_family(name: str, tmp_path: Path) -> None:
    shape = synthetic.SHAPES[name]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(synthetic.config(shape)))
    c = ModelConfig.from_file(path)
    assert c.family == shape.family
    got = (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size)
    assert got == (shape.hidden, shape.intermediate, shape.layers, shape.vocab)
    assert (c.num_attention_heads, c.num_key_value_heads) == (shape.heads, shape.kv_heads)
    assert (c.head_dim, c.tie_word_embeddings) == (shape.head_dim, shape.tied)
    assert c.rope_theta == shape.rope_theta and c.rms_norm_eps == pytest.approx(shape.rms_norm_eps)
    mode = "online" if shape.family == "1bitllm" else "offline"
    assert c.quantization_mode == mode


@pytest.mark.parametrize("name", NAMES)
def test_layout_is_the_families_published_one(name: str, tmp_path: Path) -> None:
    """Same config keys and tensors (names and dtypes) as the fixture that transformers or
    1bitLLM's code wrote for this family."""
    shape = shrunk(synthetic.SHAPES[name])
    synthetic.write(shape, tmp_path)
    fixture = FIXTURES / FIXTURE[shape.family, shape.tied]
    ours = json.loads((tmp_path / "config.json").read_text())
    theirs = json.loads((fixture / "config.json").read_text())
    for key in ("architectures", "model_type", "hidden_act", "torch_dtype"):
        assert ours[key] == theirs[key], key
    assert ("quantization_config" in ours) == ("quantization_config" in theirs)

    def layout(path: Path) -> set[tuple[str, str]]:
        tensors = st_files.read(path / "model.safetensors")
        kept = {(k, dtype) for k, (dtype, _, _) in tensors.items() if ".layers.1." not in k}
        return kept - {("lm_head.weight", "F16")}  # 1bitLLM's fixture is untied

    assert layout(tmp_path) == layout(fixture)


@pytest.mark.parametrize("name", NAMES)
def test_shrunken_shape_loads_and_generates(name: str, tmp_path: Path) -> None:
    shape = shrunk(synthetic.SHAPES[name])
    synthetic.write(shape, tmp_path)
    model = load_model(tmp_path)
    assert model.config.family == shape.family
    down = model.projection(1, "down_proj")
    assert down.shape == (shape.hidden, shape.intermediate)
    assert set(down.unpack().ravel().tolist()) == {-1, 0, 1}
    q = model.projection(0, "q_proj")
    assert q.shape == (shape.heads * shape.head_dim, shape.hidden)

    session = Session(model, n_ctx=32)
    logits = session.logits([1, 2, 3, 4])
    assert logits.shape == (4, shape.vocab) and np.isfinite(logits).all()
    assert logits.std() > 0
    session.reset()
    session.prefill([1, 2, 3])
    greedy = Sampler()
    for _ in range(4):
        token = session.sample(greedy)
        assert 0 <= token < shape.vocab
        session.push(token)
    assert session.n_tokens == 7


def test_masters_are_float16_and_ternarised_at_load(tmp_path: Path) -> None:
    shape = shrunk(synthetic.SHAPES["bitnet-large"])
    synthetic.write(shape, tmp_path)
    tensors = st_files.read(tmp_path / "model.safetensors")
    dtype, dims, data = tensors["model.layers.0.mlp.up_proj.weight"]
    assert (dtype, dims) == ("F16", [shape.intermediate, shape.hidden])
    master = np.frombuffer(data, dtype="<f2").astype(np.float32).reshape(dims)
    # 1bitLLM's weight_quant: s = 1 / mean|W| in f32, round half to even, clamp.
    s = np.float32(1) / np.float32(np.abs(master).astype(np.float64).mean())
    expected = np.clip(np.rint(master * s), -1, 1)
    got = load_model(tmp_path).projection(0, "up_proj").unpack()
    assert np.array_equal(got, expected)


def test_aliases_name_the_same_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = shrunk(synthetic.SHAPES["llama3-8b"])
    monkeypatch.setitem(synthetic.SHAPES, "llama3-8b", tiny)
    folder = synthetic.ensure("8b", root=tmp_path)
    assert folder == tmp_path / "llama3-8b"
    assert synthetic.ensure("llama3-8b", root=tmp_path) == folder
