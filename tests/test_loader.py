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
    edit_config(model_copy, model_type="gpt2")
    with pytest.raises(InvalidInputError, match='config.json: model_type "gpt2" is not supported'):
        load(model_copy)


def test_unknown_architecture(model_copy: Path) -> None:
    edit_config(model_copy, architectures=["LlamaForCausalLM"])
    with pytest.raises(InvalidInputError, match="LlamaForCausalLM"):
        load(model_copy)


@pytest.mark.parametrize(
    ("quant", "message"),
    [
        (None, "config.json: no quantization_config"),
        ({"quant_method": "gptq"}, 'quant_method "gptq"'),
        ({"quant_method": "bitnet", "linear_class": "dense"}, 'linear_class "dense"'),
        ({"quant_method": "bitnet", "quantization_mode": "dynamic"}, "quantization_mode"),
        (
            {"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "online"},
            "online",
        ),
        (
            {
                "quant_method": "bitnet",
                "linear_class": "autobitlinear",
                "modules_to_not_convert": ["lm_head", "q_proj"],
            },
            'modules_to_not_convert entry "q_proj"',
        ),
    ],
)
def test_unsupported_quantization_config(model_copy: Path, quant: object, message: str) -> None:
    edit_config(model_copy, quantization_config=quant)
    with pytest.raises(InvalidInputError, match=message):
        load(model_copy)


def test_unsupported_activation_and_rope_scaling(model_copy: Path) -> None:
    edit_config(model_copy, hidden_act="silu")
    with pytest.raises(InvalidInputError, match='hidden_act "silu"'):
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
    with pytest.raises(
        InvalidInputError, match='model.safetensors: tensor "model.norm.weight" has dtype I16'
    ):
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


def checkpoint_arrays(folder: Path) -> list[tuple[str, str, list[int], bytes]]:
    """(name, dtype, shape, bytes) of every tensor, read by the test's own reader."""
    tensors = st_files.read(folder / "model.safetensors")
    return [(name, dtype, shape, data) for name, (dtype, shape, data) in tensors.items()]


def test_no_public_call_changes_a_read_only_buffer(model_copy: Path) -> None:
    """Model.load only reads the arrays it is given: views of immutable bytes
    and arrays made read-only are byte-identical afterwards (no page of them is
    released or zeroed), and the model equals the one read from the files."""
    from trit._core import Model, ModelConfig

    config = ModelConfig.from_file(model_copy / "config.json")
    given, expected = [], []
    for i, (name, dtype, shape, data) in enumerate(checkpoint_arrays(model_copy)):
        # Page-sized tensors would be the ones a page release could hit; the
        # embedding of the fixture is one.
        if i % 2:
            array = np.frombuffer(data, dtype=np.uint8)  # a view of immutable bytes
        else:
            array = np.array(np.frombuffer(data, dtype=np.uint8))
            array.setflags(write=False)
        given.append((name, dtype, shape, array))
        expected.append(bytes(data))
    assert any(len(d) >= 2 * 4096 for d in expected)
    for head in ("bf16", "int8", "q6"):
        model, warnings_ = Model.load(config, given, threads=2, head=head)
        assert warnings_ == []
        for (_, _, _, array), data in zip(given, expected):
            assert not array.flags.writeable
            assert array.tobytes() == data
    # Opening the folder maps its file read-only and releases its pages: the
    # file is unchanged too.
    file_bytes = (model_copy / "model.safetensors").read_bytes()
    reference, _ = Model.open(model_copy, threads=1, head="q6")
    assert (model_copy / "model.safetensors").read_bytes() == file_bytes
    assert model.weight_bytes == reference.weight_bytes
    for layer in range(config.num_hidden_layers):
        np.testing.assert_array_equal(
            model.projection(layer, "down_proj").unpack(),
            reference.projection(layer, "down_proj").unpack(),
        )
    # The flag that let a caller ask for pages of its arrays to be dropped is gone.
    with pytest.raises(TypeError):
        Model.load(config, given, release_file_pages=True)  # type: ignore[call-arg]


def test_model_load_refuses_bad_tensors(model_copy: Path) -> None:
    from trit._core import Model, ModelConfig

    config = ModelConfig.from_file(model_copy / "config.json")
    tensors = [
        (name, dtype, shape, np.frombuffer(data, dtype=np.uint8))
        for name, dtype, shape, data in checkpoint_arrays(model_copy)
    ]
    name, dtype, shape, data = tensors[0]
    with pytest.raises(InvalidInputError, match="given twice"):
        Model.load(config, [*tensors, tensors[0]])
    with pytest.raises(InvalidInputError, match=f'tensor "{name}": .* bytes for'):
        Model.load(config, [(name, dtype, shape, data[:-1]), *tensors[1:]])
    with pytest.raises(InvalidInputError, match="unsupported tensor dtype"):
        Model.load(config, [(name, "I16", shape, data), *tensors[1:]])
    with pytest.raises(InvalidInputError, match="contiguous"):
        Model.load(config, [(name, dtype, shape, np.repeat(data, 2)[::2]), *tensors[1:]])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"tie_word_embeddings": "false"},
            'tie_word_embeddings is "false"; expected true or false',
        ),
        ({"head_dim": 16.0}, "head_dim is 16.0; expected a positive integer"),
        ({"head_dim": 0}, "head_dim is 0; expected a positive integer"),
        ({"num_hidden_layers": True}, "num_hidden_layers is true; expected a positive integer"),
        ({"vocab_size": 2**62}, "vocab_size \\* hidden_size .* is too large"),
        ({"hidden_size": 10**30}, "hidden_size is 1e\\+30; expected a positive integer"),
        ({"num_attention_heads": 2**63, "head_dim": 2**63}, "num_attention_heads \\* head_dim"),
        ({"rope_theta": "10000"}, 'rope_theta is "10000"; expected a number'),
        ({"attention_bias": "false"}, 'attention_bias is "false"; expected true or false'),
    ],
)
def test_config_types_are_strict(
    model_copy: Path, changes: dict[str, object], message: str
) -> None:
    edit_config(model_copy, **changes)
    with pytest.raises(InvalidInputError, match=f"config.json: {message}"):
        load(model_copy)
    from trit.loader import model_config

    with pytest.raises(InvalidInputError, match=message):
        model_config(model_copy)


def test_config_floats_accept_integers(model_copy: Path) -> None:
    from trit.loader import model_config

    edit_config(model_copy, rope_theta=10000, rms_norm_eps=0)
    config, raw = model_config(model_copy)
    assert (config.rope_theta, config.rms_norm_eps) == (10000.0, 0.0)
    assert raw["rope_theta"] == 10000


def sharded_copy(tmp_path: Path) -> Path:
    dst = tmp_path / "sharded"
    shutil.copytree(FIXTURES / "tiny-gqa-sharded", dst)
    return dst


def test_sharded_checkpoint_is_one_checkpoint(tmp_path: Path) -> None:
    dst = sharded_copy(tmp_path)
    z = np.load(FIXTURES / "tiny-gqa-packed" / "expected.npz")
    ids = z["prompt2_ids"].tolist()
    np.testing.assert_array_equal(load(dst).logits(ids), generator("tiny-gqa-packed").logits(ids))


def test_shard_index_faults(tmp_path: Path) -> None:
    dst = sharded_copy(tmp_path)
    index_path = dst / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    moved = next(name for name, file in index["weight_map"].items() if file == second)

    def write_index(weight_map: object) -> None:
        index_path.write_text(json.dumps({**index, "weight_map": weight_map}))

    write_index({**index["weight_map"], moved: first})
    with pytest.raises(
        InvalidInputError, match=f'maps "{moved}" to {first}, which does not hold it'
    ):
        load(dst)
    write_index({**index["weight_map"], moved: "../" + second})
    with pytest.raises(InvalidInputError, match="not a file name in the folder"):
        load(dst)
    write_index({})
    with pytest.raises(InvalidInputError, match="index.json: no weight_map"):
        load(dst)
    # The same tensor in both shards.
    write_index(index["weight_map"])
    one, two = st_files.read(dst / first), st_files.read(dst / second)
    one[moved] = two[moved]
    st_files.write(dst / first, one)
    with pytest.raises(
        InvalidInputError, match=f'tensor "{moved}" is in both .*{first} and .*{second}'
    ):
        load(dst)
