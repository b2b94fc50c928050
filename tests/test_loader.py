"""Loading checkpoints: every broken input gives a trit exception that names
the file or tensor at fault. Each case corrupts a copy of tiny-gqa-packed."""

from __future__ import annotations

import json
import shutil
import struct
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import st_files
from conftest import FIXTURES, generator

from trit import Generator, InvalidInputError, TritError


def edit_config(folder: Path, **changes: object) -> None:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    path.write_text(json.dumps(cfg))


def edit_tensors(folder: Path, edit: Callable[[st_files.Tensors], object]) -> None:
    path = folder / "model.safetensors"
    tensors = st_files.read(path)
    edit(tensors)
    st_files.write(path, tensors)


def load(folder: Path) -> Generator:
    return Generator.from_pretrained(folder, threads=1, head="bf16", kv_cache="f32")


def test_a_faithful_copy_loads_and_agrees(model_copy: Path) -> None:
    # The writer used below round-trips: corruption, not rewriting, makes the errors.
    edit_tensors(model_copy, lambda t: None)
    z = np.load(FIXTURES / "tiny-gqa-packed" / "expected.npz")
    ids = z["prompt2_ids"].tolist()
    np.testing.assert_array_equal(
        load(model_copy).logits(ids), generator("tiny-gqa-packed").logits(ids)
    )


def test_missing_weights_file(model_copy: Path) -> None:
    (model_copy / "model.safetensors").unlink()
    with pytest.raises(InvalidInputError, match="no model.safetensors"):
        load(model_copy)


def test_missing_config(model_copy: Path) -> None:
    (model_copy / "config.json").unlink()
    with pytest.raises(InvalidInputError, match="config.json does not exist"):
        load(model_copy)


def test_missing_shard(tmp_path: Path) -> None:
    dst = tmp_path / "sharded"
    shutil.copytree(FIXTURES / "tiny-gqa-sharded", dst)
    (dst / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(InvalidInputError, match="model-00002-of-00002.safetensors"):
        load(dst)


def test_missing_folder_and_bad_names(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="no model folder"):
        load(tmp_path / "nothing-here")
    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidInputError, match="is a file"):
        load(tmp_path / "file")


def test_unknown_model_type(model_copy: Path) -> None:
    edit_config(model_copy, model_type="llama")
    with pytest.raises(InvalidInputError, match="model_type 'llama' is not supported"):
        load(model_copy)


def test_unknown_architecture(model_copy: Path) -> None:
    edit_config(model_copy, architectures=["LlamaForCausalLM"])
    with pytest.raises(InvalidInputError, match="LlamaForCausalLM"):
        load(model_copy)


@pytest.mark.parametrize(
    ("quant", "message"),
    [
        (None, "no quantization_config"),
        ({"quant_method": "gptq"}, "quant_method 'gptq'"),
        ({"quant_method": "bitnet", "linear_class": "dense"}, "linear_class 'dense'"),
        ({"quant_method": "bitnet", "quantization_mode": "dynamic"}, "quantization_mode"),
        (
            {"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "online"},
            "online",
        ),
        (
            {"quant_method": "bitnet", "linear_class": "autobitlinear", "use_rms_norm": True},
            "use_rms_norm",
        ),
    ],
)
def test_unsupported_quantization_config(model_copy: Path, quant: object, message: str) -> None:
    edit_config(model_copy, quantization_config=quant)
    with pytest.raises(InvalidInputError, match=message):
        load(model_copy)


def test_unsupported_activation_and_rope_scaling(model_copy: Path) -> None:
    edit_config(model_copy, hidden_act="silu")
    with pytest.raises(InvalidInputError, match="hidden_act 'silu'"):
        load(model_copy)
    edit_config(model_copy, hidden_act="relu2", rope_scaling={"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(InvalidInputError, match="llama3"):
        load(model_copy)


def test_config_numbers_that_do_not_fit(model_copy: Path) -> None:
    edit_config(model_copy, num_key_value_heads=3)
    with pytest.raises(InvalidInputError, match="num_key_value_heads"):
        load(model_copy)


def test_wrong_tensor_shape(model_copy: Path) -> None:
    def edit(t: st_files.Tensors) -> None:
        dtype, _, data = t["model.norm.weight"]
        t["model.norm.weight"] = (dtype, [32, 2], data)

    edit_tensors(model_copy, edit)
    with pytest.raises(
        InvalidInputError,
        match=r'model: tensor "model.norm.weight" has shape \[32, 2\]; expected \[64\]',
    ):
        load(model_copy)


def test_wrong_tensor_dtype(model_copy: Path) -> None:
    name = "model.layers.1.self_attn.q_proj.weight"

    def edit(t: st_files.Tensors) -> None:
        _, shape, data = t[name]
        t[name] = ("BF16", [shape[0], shape[1] // 2], data)

    edit_tensors(model_copy, edit)
    with pytest.raises(InvalidInputError, match=f"{name}.*must be U8"):
        load(model_copy)


def test_dtype_the_engine_does_not_read(model_copy: Path) -> None:
    def edit(t: st_files.Tensors) -> None:
        _, shape, data = t["model.norm.weight"]
        t["model.norm.weight"] = ("I16", shape, data)

    edit_tensors(model_copy, edit)
    with pytest.raises(InvalidInputError, match="'model.norm.weight' has dtype I16"):
        load(model_copy)


def test_missing_tensor(model_copy: Path) -> None:
    edit_tensors(model_copy, lambda t: t.pop("model.layers.0.mlp.down_proj.weight_scale"))
    with pytest.raises(InvalidInputError, match="missing tensor.*down_proj.weight_scale"):
        load(model_copy)


def test_packed_code_three_is_refused(model_copy: Path) -> None:
    name = "model.layers.0.mlp.up_proj.weight"

    def edit(t: st_files.Tensors) -> None:
        dtype, shape, data = t[name]
        t[name] = (dtype, shape, b"\xff" + data[1:])

    edit_tensors(model_copy, edit)
    with pytest.raises(InvalidInputError, match=f"{name}.*code 3"):
        load(model_copy)


def test_truncated_file(model_copy: Path) -> None:
    path = model_copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(InvalidInputError, match="model.safetensors.*truncated"):
        load(model_copy)
    path.write_bytes(data[:5])
    with pytest.raises(InvalidInputError, match="truncated"):
        load(model_copy)
    path.write_bytes(struct.pack("<Q", 10**12) + data[8:])
    with pytest.raises(InvalidInputError, match="header length"):
        load(model_copy)
    path.write_bytes(struct.pack("<Q", 4) + b"{{{{")
    with pytest.raises(InvalidInputError, match="not JSON"):
        load(model_copy)


def test_all_zero_tensor_warns(model_copy: Path) -> None:
    name = "model.layers.1.mlp.ffn_sub_norm.weight"

    def edit(t: st_files.Tensors) -> None:
        dtype, shape, data = t[name]
        t[name] = (dtype, shape, bytes(len(data)))

    edit_tensors(model_copy, edit)
    with pytest.warns(RuntimeWarning, match=f"{name}.*all zeros"):
        load(model_copy)


def test_clean_load_does_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load(FIXTURES / "tiny-gqa-packed")


def test_bitlinear_scales_are_divided(model_copy: Path) -> None:
    """The same weights saved the BitLinear way (weight_scale = 1/mean|W|, here
    as F32 so the inverse is exact enough) give the same logits."""

    def edit(t: st_files.Tensors) -> None:
        for name, (_, shape, data) in list(t.items()):
            if name.endswith("weight_scale"):
                ws = (np.frombuffer(data, np.uint16).astype(np.uint32) << 16).view(np.float32)
                t[name] = ("F32", shape, (np.float32(1) / ws).astype("<f4").tobytes())

    edit_tensors(model_copy, edit)
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["quantization_config"]["linear_class"] = "bitlinear"
    (model_copy / "config.json").write_text(json.dumps(cfg))
    z = np.load(FIXTURES / "tiny-gqa-packed" / "expected.npz")
    ids = z["prompt1_ids"].tolist()
    np.testing.assert_allclose(load(model_copy).logits(ids), z["prompt1_logits"], atol=1e-4, rtol=0)
    # Read as autobitlinear, the inverted scales give garbage: the test can fail.
    cfg["quantization_config"]["linear_class"] = "autobitlinear"
    (model_copy / "config.json").write_text(json.dumps(cfg))
    assert np.abs(load(model_copy).logits(ids) - z["prompt1_logits"]).max() > 1.0


def test_hub_ids_respect_offline_mode(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub.constants

    # The env var is read when huggingface_hub is imported; set both.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TritError, match="not in the local Hugging Face cache"):
        Generator.from_pretrained("someone/bitnet-that-is-not-cached")


def test_releasing_pages_needs_read_only_arrays(model_copy: Path) -> None:
    from trit._core import Model
    from trit.loader import checkpoint_tensors, model_config

    config, _ = model_config(model_copy)
    tensors = []
    for t in checkpoint_tensors(model_copy):
        data = np.fromfile(t.path, dtype=np.uint8, count=t.end - t.start, offset=t.start)
        tensors.append((t.name, t.dtype, t.shape, data))  # writable, anonymous memory
    with pytest.raises(InvalidInputError, match="release_file_pages needs read-only"):
        Model.load(config, tensors, release_file_pages=True)
    model, _ = Model.load(config, tensors)  # copies are fine without releasing
    reference = Generator.from_pretrained(model_copy, head="bf16").model
    assert model.weight_bytes == reference.weight_bytes
