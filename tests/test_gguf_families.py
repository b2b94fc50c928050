"""GGUF files of the Llama family (arch "llama": Falcon3-1.58bit, Falcon-E,
Llama3-8B-1.58) and of 1bitLLM (llama.cpp's arch "bitnet"), written as the
published converters write them (tests/gguf_files.py), give the logits of the
safetensors fixture they were made from; their tokenizers (falcon3, falcon_e,
SentencePiece) encode as the Hugging Face tokenizer of the same model; what
such files carry that trit does not run is refused by name."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import gguf_files
import numpy as np
import pytest
import st_files
from conftest import FIXTURES
from test_gguf import FUZZ, _data_start
from test_gguf_loading import CORPUS

from trit import InvalidInputError
from trit._core import Model, Session, gguf_float_tensor, gguf_metadata
from trit.gguf_export import write_gguf
from trit.synthetic import Shape
from trit.synthetic import write as write_synthetic
from trit.tokenizer import Tokenizer

IDS = [1, 5, 9, 60, 3, 17, 2]
FALCON3 = FIXTURES / "tiny-falcon3-1.58bit"
FALCON_E = FIXTURES / "tiny-falcon-e"
ONE_BIT_LLM = FIXTURES / "tiny-1bitllm"
LLAMA3 = FIXTURES / "tiny-llama3-1.58bit"
SPM = FIXTURES / "tiny-spm-tokenizer"
PRE = {FALCON3: "falcon3", FALCON_E: "falcon_e"}


def logits(path: Path) -> np.ndarray:
    model, warnings = Model.open(path, threads=1)
    assert warnings == []
    return Session(model, kv_cache="f32").logits(IDS)


@pytest.fixture(scope="module")
def block_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama-family model whose rows are whole TQ blocks (256 weights) and
    whose BitLinear multiplier 1/weight_scale = 2 is an exact f16, so a TQ
    block scale holds it exactly."""
    folder = tmp_path_factory.mktemp("block-llama")
    shape = Shape("test", 256, 512, 2, 4, 2, 512, False, 64, family="llama", rope_theta=10000.0)
    write_synthetic(shape, folder)
    tensors = st_files.read(folder / "model.safetensors")
    half = np.array([0x3F00], "<u2").tobytes()  # bf16 0.5
    for name, (dtype, dims, _) in list(tensors.items()):
        if name.endswith("weight_scale"):
            tensors[name] = (dtype, dims, half)
    st_files.write(folder / "model.safetensors", tensors)
    # Falcon-E's tokenizer, with its special token ids.
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(FALCON_E / name, folder / name)
    config = json.loads((folder / "config.json").read_text())
    config.update(bos_token_id=509, eos_token_id=510)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("folder", [FALCON3, FALCON_E], ids=["falcon3", "falcon-e"])
@pytest.mark.parametrize("projections", ["F32", "I2_S_MAX", "I2_S"])
def test_llama_gguf_logits_equal_safetensors(
    tmp_path: Path, folder: Path, projections: str
) -> None:
    """F32: llama.cpp's convert_hf_to_gguf.py --outtype f32 (dequant_bitnet);
    I2_S_MAX: bitnet.cpp's setup_env.py (that F32 file through llama-quantize
    I2_S), the kind of the official Falcon GGUFs; I2_S: trit convert's."""
    path = gguf_files.write(folder, tmp_path / "m.gguf", projections=projections, pre=PRE[folder])
    meta = gguf_metadata(path)
    assert meta["general.architecture"] == "llama"
    assert np.array_equal(logits(path), logits(folder))


def test_llama_q_and_k_rows_are_stored_permuted(tmp_path: Path) -> None:
    """The file holds llama.cpp's row order (so the permutation is undone at
    load, not merely never applied): reading Q as unpermuted changes the logits."""
    path = gguf_files.write(FALCON3, tmp_path / "m.gguf", projections="F32", pre="falcon3")
    reader = gguf.GGUFReader(path)
    q = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    stored = np.array(q.data).reshape(96, 64)
    hf = np.load(FALCON3 / "expected.npz")["L0_q_proj_weight"].astype(np.float32)
    assert np.array_equal(np.sign(stored), gguf_files.permute(hf, 4))
    assert not np.array_equal(np.sign(stored), hf)


@pytest.mark.parametrize("projections", ["TQ2_0", "TQ1_0", "F16", "I2_S_MAX"])
def test_llama_tq_files_load_exactly(tmp_path: Path, block_llama: Path, projections: str) -> None:
    """llama.cpp's --outtype tq2_0 / tq1_0 / f16 of a Llama-family model (ggml's
    own quantizers), and bitnet.cpp's I2_S, all give the safetensors logits."""
    path = gguf_files.write(
        block_llama, tmp_path / "m.gguf", projections=projections, tokenizer=False
    )
    assert np.array_equal(logits(path), logits(block_llama))
    if projections != "I2_S_MAX":
        types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
        assert types["blk.1.attn_k.weight"] == projections
        assert "output.weight" in types


def test_one_bit_llm_gguf_runs_its_family(tmp_path: Path) -> None:
    """llama.cpp's BitnetModel: weight_quant of the float16 masters, so each
    scale is rounded to f16; the logits agree with the safetensors model's to
    that rounding, and every argmax is the same. With hidden_act "relu2" the
    same file would be the 2B4T block, which it is not."""
    path = gguf_files.write(ONE_BIT_LLM, tmp_path / "m.gguf", projections="F16", tokenizer=False)
    model, _ = Model.open(path, threads=1)
    assert model.config.family == "1bitllm"
    got, want = logits(path), logits(ONE_BIT_LLM)
    assert np.abs(got - want).max() < 1.0
    assert np.array_equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize(
    "folder", [FALCON3, FALCON_E, ONE_BIT_LLM], ids=["falcon3", "falcon-e", "1bitllm"]
)
def test_trit_convert_writes_what_llama_cpp_expects(tmp_path: Path, folder: Path) -> None:
    """trit convert of a Llama-family or 1bitLLM model: llama.cpp's arch and
    row order, the tokenizer in the metadata, identical logits read back."""
    model, _ = Model.open(folder, threads=1)
    out = tmp_path / "m.gguf"
    write_gguf(model, folder, out, "i2_s")
    assert np.array_equal(logits(out), logits(folder))
    meta = gguf_metadata(out)
    family = model.config.family
    assert meta["general.architecture"] == {"llama": "llama", "1bitllm": "bitnet"}[family]
    text = "Hello wörld 12345, can't stop 😀"
    assert Tokenizer(out).encode(text) == Tokenizer(folder).encode(text)
    if family == "llama":
        again = gguf_files.write(folder, tmp_path / "ref.gguf", projections="I2_S", pre=PRE[folder])
        assert _tensor_bytes(out, "blk.1.attn_q.weight") == _tensor_bytes(
            again, "blk.1.attn_q.weight"
        )


def _tensor_bytes(path: Path, name: str) -> bytes:
    raw = bytearray(path.read_bytes())
    key = struct.pack("<Q", len(name)) + name.encode()
    at = raw.index(key) + len(key)
    (n_dims,) = struct.unpack_from("<I", raw, at)
    dims = struct.unpack_from(f"<{n_dims}Q", raw, at + 4)
    (offset,) = struct.unpack_from("<Q", raw, at + 4 + 8 * n_dims + 4)
    start = _data_start(raw) + offset
    return bytes(raw[start : start + int(np.prod(dims)) // 4 + 32])


def test_trit_convert_tq_of_the_llama_family(tmp_path: Path, block_llama: Path) -> None:
    model, _ = Model.open(block_llama, threads=1)
    out = tmp_path / "m.gguf"
    write_gguf(model, block_llama, out, "tq2_0")
    assert np.array_equal(logits(out), logits(block_llama))
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.architecture"].contents() == "llama"


def test_what_gguf_cannot_hold_is_not_written(tmp_path: Path) -> None:
    model, _ = Model.open(LLAMA3, threads=1)
    with pytest.raises(InvalidInputError, match="use_rms_norm"):
        write_gguf(model, LLAMA3, tmp_path / "m.gguf", "i2_s")


# ------------------------------------------------------------- tokenizers


@pytest.mark.parametrize("folder", [FALCON3, FALCON_E], ids=["falcon3", "falcon-e"])
def test_falcon_pre_tokenizers_encode_as_hugging_face(tmp_path: Path, folder: Path) -> None:
    """The tokenizer metadata llama.cpp's _set_vocab_gpt2 and gguf's SpecialVocab
    write, read back: the same ids as the folder's tokenizer.json (Falcon3's
    adds no BOS, Falcon-E's does)."""
    path = gguf_files.write(folder, tmp_path / "m.gguf", projections="F32", pre=PRE[folder])
    hf, built = Tokenizer(folder), Tokenizer(path)
    for text in [CORPUS, *CORPUS.split("\n")[:200]]:
        assert built.encode(text) == hf.encode(text)
        assert built.decode(hf.encode(text)) == hf.decode(hf.encode(text))
    assert built.eos_token == hf.eos_token
    assert built.chat_template == hf.chat_template


def test_sentencepiece_tokenizer_encodes_as_hugging_face() -> None:
    """tokenizer.ggml.model "llama": pieces, scores and types as llama.cpp's
    _set_vocab_sentencepiece writes them (tools/make_spm_fixture.py) give the
    ids of transformers' LlamaTokenizer of the same tokenizer.model: byte
    fallback, the "\u2581" prefix, BOS."""
    hf, built = Tokenizer(SPM), Tokenizer(SPM / "tokenizer.gguf")
    texts = [CORPUS, *CORPUS.split("\n")[:200], " leading", "  two", "<s> in text </s>", ""]
    for text in texts:
        assert built.encode(text) == hf.encode(text)
        assert built.encode(text, add_special_tokens=False) == hf.encode(
            text, add_special_tokens=False
        )
        assert built.decode(hf.encode(text)) == hf.decode(hf.encode(text))
    assert hf.encode("x")[0] == 1  # BOS
    assert built.vocab_size == hf.vocab_size


def test_a_bitnet_cpp_one_bit_llm_file_with_its_sentencepiece_tokenizer(tmp_path: Path) -> None:
    """A 1bitLLM-shaped model of the SentencePiece fixture's vocabulary, as
    bitnet.cpp's converter files it (arch "bitnet-b1.58", the tokenizer of
    _set_vocab_sentencepiece): trit runs the 1bitLLM block and the GGUF-built
    tokenizer, and generates what the safetensors folder with tokenizer.json does."""
    from trit import Generator

    folder = tmp_path / "model"
    shape = Shape("test", 64, 128, 2, 4, 4, 640, False, 128, family="1bitllm", rope_theta=1e4)
    write_synthetic(shape, folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(SPM / name, folder / name)
    config = json.loads((folder / "config.json").read_text())
    config.update(bos_token_id=1, eos_token_id=2)
    (folder / "config.json").write_text(json.dumps(config))
    plain = gguf_files.write(
        folder, tmp_path / "m.gguf", projections="F16", arch="bitnet-b1.58", tokenizer=False
    )
    path = tmp_path / "with-tokenizer.gguf"
    reader, source = gguf.GGUFReader(plain), gguf.GGUFReader(SPM / "tokenizer.gguf")
    w = gguf.GGUFWriter(str(path), "bitnet-b1.58")
    for r in (reader, source):
        for name, field in r.fields.items():
            if not name.startswith("GGUF.") and name != "general.architecture":
                w.add_key_value(name, field.contents(), field.types[0], field.types[-1])
    for t in reader.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    kw = {"threads": 1, "head": "bf16", "kv_cache": "f32"}
    from_gguf = Generator.from_pretrained(path, **kw)  # type: ignore[arg-type]
    from_st = Generator.from_pretrained(folder, **kw)  # type: ignore[arg-type]
    assert from_gguf.config.family == "1bitllm"
    assert from_gguf.eos_ids == from_st.eos_ids
    prompt = "Permission is hereby granted, free of charge"
    ids = from_st.tokenizer.encode(prompt)
    assert from_gguf.tokenizer.encode(prompt) == ids
    assert from_gguf.tokenizer.decode(ids) == from_st.tokenizer.decode(ids)
    # The GGUF holds each scale rounded to f16 (weight_quant), the folder float
    # masters, and random weights amplify that: close logits, mostly the same argmax.
    got = Session(Model.open(path, threads=1)[0], kv_cache="f32").logits(ids)
    want = Session(Model.open(folder, threads=1)[0], kv_cache="f32").logits(ids)
    assert np.abs(got - want).max() < 0.1 * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9
    assert from_gguf.generate(prompt, max_new_tokens=4, temperature=0.0)
    # trit convert of that file: llama.cpp's "bitnet", the same model and tokenizer.
    model, _ = Model.open(path, threads=1)
    again = tmp_path / "again.gguf"
    write_gguf(model, path, again, "i2_s")
    assert gguf_metadata(again)["general.architecture"] == "bitnet"
    assert np.array_equal(logits(again), logits(path))
    assert Tokenizer(again).encode(prompt) == ids


def test_sentencepiece_metadata_is_checked(tmp_path: Path) -> None:
    from trit.gguf_tokenizer import tokenizer_json

    meta = dict(gguf_metadata(SPM / "tokenizer.gguf"))
    where = tmp_path / "x.gguf"
    bad = {**meta, "tokenizer.ggml.pre": "falcon3"}
    with pytest.raises(InvalidInputError, match="'falcon3' is not a pre-tokenizer trit knows"):
        tokenizer_json(bad, where)
    scores = meta["tokenizer.ggml.scores"]
    assert isinstance(scores, list)
    with pytest.raises(InvalidInputError, match="one number per token"):
        tokenizer_json({**meta, "tokenizer.ggml.scores": scores[:-1]}, where)
    with pytest.raises(InvalidInputError, match="add_space_prefix must be a bool"):
        tokenizer_json({**meta, "tokenizer.ggml.add_space_prefix": 1}, where)
    types = meta["tokenizer.ggml.token_type"]
    assert isinstance(types, list)
    with pytest.raises(InvalidInputError, match="byte fallback"):
        tokenizer_json({**meta, "tokenizer.ggml.token_type": [1] * len(types)}, where)
    spaced = tokenizer_json({**meta, "tokenizer.ggml.add_space_prefix": False}, where)
    assert spaced["pre_tokenizer"]["prepend_scheme"] == "never"
    # A hostile piece of a million characters is not split into a million merges.
    tokens = list(meta["tokenizer.ggml.tokens"])  # type: ignore[call-overload]
    tokens[-1] = "a" * 1_000_000
    huge = tokenizer_json({**meta, "tokenizer.ggml.tokens": tokens}, where)
    assert len(huge["model"]["merges"]) <= len(spaced["model"]["merges"])


# ------------------------------------------------------------- refused by name


def _with_metadata(source: Path, out: Path, extra: dict[str, object]) -> Path:
    """A copy of GGUF `source` with metadata keys added or replaced."""
    reader = gguf.GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(out), arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in extra:
            continue
        w.add_key_value(name, field.contents(), field.types[0], field.types[-1])
    for key, value in extra.items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            assert isinstance(value, int)
            w.add_uint32(key, value)
    for t in reader.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"llama.rope.scaling.factor": 8.0}, "rope.scaling.factor is 8; RoPE scaling"),
        ({"llama.rope.scale_linear": 2.0}, "rope.scale_linear is 2; RoPE scaling"),
        ({"llama.rope.scaling.type": "yarn"}, 'rope.scaling.type "yarn" is not supported'),
        ({"llama.expert_count": 8}, "expert_count is 8; mixture-of-experts"),
        ({"llama.attention.value_length": 16}, "value_length is 16"),
        ({"llama.rope.dimension_count": 12}, "partial rotary"),
        ({"llama.rope.freq_base": "x"}, "rope.freq_base is a string; expected a float"),
    ],
)
def test_llama_metadata_trit_does_not_run_is_refused(
    tmp_path: Path, extra: dict[str, object], message: str
) -> None:
    good = gguf_files.write(FALCON3, tmp_path / "m.gguf", projections="F32", tokenizer=False)
    bad = _with_metadata(good, tmp_path / "bad.gguf", extra)
    with pytest.raises(InvalidInputError, match=message) as info:
        Model.open(bad)
    assert str(bad) in str(info.value)


def test_bitnet_hidden_act_decides_the_block(tmp_path: Path) -> None:
    ternary = gguf_files.write(ONE_BIT_LLM, tmp_path / "m.gguf", projections="F16", tokenizer=False)
    silu = _with_metadata(ternary, tmp_path / "silu.gguf", {"bitnet.hidden_act": "silu"})
    assert np.array_equal(logits(silu), logits(ternary))
    gelu = _with_metadata(ternary, tmp_path / "gelu.gguf", {"bitnet.hidden_act": "gelu"})
    with pytest.raises(InvalidInputError, match='bitnet.hidden_act "gelu" is not supported'):
        Model.open(gelu)
    packed = FIXTURES / "tiny-gqa-packed"
    relu2 = gguf_files.write(
        packed, tmp_path / "r.gguf", arch="bitnet", projections="F32", tokenizer=False
    )
    relu2 = _with_metadata(relu2, tmp_path / "relu2.gguf", {"bitnet.hidden_act": "relu2"})
    assert np.array_equal(logits(relu2), logits(packed))


def test_bitnet_cpp_files_of_one_bit_llm_run_its_family(tmp_path: Path) -> None:
    """bitnet.cpp's converter files 1bitLLM's model under "bitnet-b1.58" too,
    with its SentencePiece tokenizer: that is the SiLU block, not 2B4T's."""
    silu = gguf_files.write(ONE_BIT_LLM, tmp_path / "m.gguf", projections="F16", tokenizer=False)
    renamed = gguf_files.write(
        ONE_BIT_LLM, tmp_path / "b.gguf", projections="F16", arch="bitnet-b1.58", tokenizer=False
    )
    spm = _with_metadata(renamed, tmp_path / "spm.gguf", {"tokenizer.ggml.model": "llama"})
    model, _ = Model.open(spm, threads=1)
    assert model.config.family == "1bitllm"
    assert np.array_equal(logits(spm), logits(silu))


def _with_rope_scaling(tmp_path: Path, top_level_original: int | None) -> Path:
    """tiny-falcon-e with Llama 3.1 RoPE scaling (factor 8, original context
    8192, which the tiny model's frequencies straddle: all three bands occur)."""
    folder = tmp_path / "scaled"
    shutil.copytree(FALCON_E, folder)
    config = json.loads((folder / "config.json").read_text())
    config["rope_scaling"] = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    if top_level_original is not None:
        config["original_max_position_embeddings"] = top_level_original
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_llama3_rope_factors_are_read_back(tmp_path: Path) -> None:
    """llama.cpp writes Llama 3 RoPE scaling as a rope_freqs tensor, one divisor
    per frequency; trit recovers the parameters and gives the safetensors logits."""
    folder = _with_rope_scaling(tmp_path, None)
    path = gguf_files.write(folder, tmp_path / "m.gguf", projections="F32", tokenizer=False)
    assert np.array_equal(logits(path), logits(folder))
    assert not np.array_equal(logits(path), logits(FALCON_E))


def test_other_rope_factors_are_refused_by_name(tmp_path: Path) -> None:
    """The converter takes the original context from config.json's top level:
    factors for 64 are not Llama 3.1's 8192, which trit would assume."""
    folder = _with_rope_scaling(tmp_path, 64)
    path = gguf_files.write(folder, tmp_path / "m.gguf", projections="F32", tokenizer=False)
    with pytest.raises(InvalidInputError, match=r'tensor "rope_freqs\.weight" is not supported'):
        Model.open(path)
    fixed = _with_metadata(
        path, tmp_path / "ctx.gguf", {"llama.rope.scaling.original_context_length": 64}
    )
    # Parameters that match, but not the folder's (its rope_scaling says 8192).
    model, warnings = Model.open(fixed, threads=1)
    assert warnings == []


@pytest.mark.parametrize("original", [8192, 64])
def test_trit_convert_writes_llama3_rope_scaling(tmp_path: Path, original: int) -> None:
    """rope_freqs as llama.cpp's converter computes it, and the original context
    in rope.scaling.original_context_length when it is not 8192; read back,
    the same logits; converted again from that GGUF, still the same."""
    folder = _with_rope_scaling(tmp_path, None)
    config = json.loads((folder / "config.json").read_text())
    config["rope_scaling"]["original_max_position_embeddings"] = original
    (folder / "config.json").write_text(json.dumps(config))
    model, _ = Model.open(folder, threads=1)
    out = tmp_path / "m.gguf"
    write_gguf(model, folder, out, "i2_s")
    assert np.array_equal(logits(out), logits(folder))
    meta = gguf_metadata(out)
    assert meta.get("llama.rope.scaling.original_context_length") == (
        None if original == 8192 else original
    )
    again = tmp_path / "again.gguf"
    write_gguf(Model.open(out, threads=1)[0], out, again, "i2_s")
    assert np.array_equal(logits(again), logits(folder))
    assert gguf_float_tensor(out, "absent.weight") is None
    with pytest.raises(InvalidInputError, match="blk.0.attn_q.weight.*not a float tensor"):
        gguf_float_tensor(out, "blk.0.attn_q.weight")
    config["rope_scaling"]["high_freq_factor"] = 2.0
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidInputError, match="high_freq_factor 2.0"):
        write_gguf(Model.open(folder, threads=1)[0], folder, tmp_path / "x.gguf", "i2_s")


def test_tensors_outside_the_block_are_refused_by_name(tmp_path: Path) -> None:
    """A sub-norm in a llama file, or a layer beyond block_count."""
    good = gguf_files.write(FALCON3, tmp_path / "m.gguf", projections="F32", tokenizer=False)
    reader = gguf.GGUFReader(good)
    for extra, message in [
        ("blk.0.attn_sub_norm.weight", "the llama family has no sub-norms"),
        ("blk.7.attn_norm.weight", r"it is not part of the llama block trit runs \(2 layers\)"),
        ("blk.0.attn_q_norm.weight", "it is not part of the llama block"),
    ]:
        out = tmp_path / "bad.gguf"
        w = gguf.GGUFWriter(str(out), "llama")
        for name, field in reader.fields.items():
            if not name.startswith("GGUF.") and name != "general.architecture":
                w.add_key_value(name, field.contents(), field.types[0], field.types[-1])
        for t in reader.tensors:
            w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
        w.add_tensor(extra, np.ones(64, np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with pytest.raises(InvalidInputError, match=rf'"{extra}" is not supported: {message}'):
            Model.open(out)


def test_projection_scale_tensors_multiply(tmp_path: Path, block_llama: Path) -> None:
    """llama.cpp's optional `blk.N.{proj}.scale` (one float multiplying the
    matmul): the same model stored as TQ2_0 blocks of scale 1 and each scale
    in its .scale tensor gives the same logits; a scale of another shape is refused."""
    exact = gguf_files.write(block_llama, tmp_path / "m.gguf", projections="TQ2_0", tokenizer=False)
    reader = gguf.GGUFReader(exact)
    out = tmp_path / "scaled.gguf"
    for shape in [(1,), (2,)]:
        w = gguf.GGUFWriter(str(out), "llama")
        for name, field in reader.fields.items():
            if not name.startswith("GGUF.") and name != "general.architecture":
                w.add_key_value(name, field.contents(), field.types[0], field.types[-1])
        for t in reader.tensors:
            data = np.array(t.data)
            if t.tensor_type == gguf.GGMLQuantizationType.TQ2_0:
                # The f16 d of every 66-byte block: 2.0 -> 1.0, the 2 moves out.
                blocks = data.reshape(-1, 66).copy()
                blocks[:, 64:] = np.frombuffer(np.float16(1.0).tobytes(), np.uint8)
                data = blocks.reshape(data.shape)
                w.add_tensor(t.name.replace(".weight", ".scale"), np.full(shape, 2.0, np.float32))
            w.add_tensor(t.name, data, raw_dtype=t.tensor_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        if shape == (1,):
            assert np.array_equal(logits(out), logits(exact))
        else:
            with pytest.raises(
                InvalidInputError, match=r"\.scale\" is F32 \[2\]; a projection scale is one float"
            ):
                Model.open(out)


def test_corrupted_llama_headers_never_crash(tmp_path: Path) -> None:
    """test_gguf's header fuzz, on a llama file with its tokenizer metadata."""
    good = gguf_files.write(FALCON3, tmp_path / "m.gguf", projections="F32", pre="falcon3")
    header_end = _data_start(bytearray(good.read_bytes()))
    r = subprocess.run(
        [sys.executable, "-c", FUZZ, str(good), str(tmp_path / "bad.gguf"), str(header_end)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("ok")


def test_a_folder_with_a_llama_gguf_runs(tmp_path: Path) -> None:
    from trit import Generator

    folder = tmp_path / "falcon"
    folder.mkdir()
    gguf_files.write(
        FALCON3, folder / "ggml-model-i2_s.gguf", projections="I2_S_MAX", pre="falcon3"
    )
    kw = {"threads": 1, "head": "bf16", "kv_cache": "f32"}
    a = Generator.from_pretrained(folder, **kw)  # type: ignore[arg-type]
    b = Generator.from_pretrained(FALCON3, **kw)  # type: ignore[arg-type]
    assert a.generate("Hello world", max_new_tokens=12, temperature=0.0) == b.generate(
        "Hello world", max_new_tokens=12, temperature=0.0
    )
    shutil.rmtree(folder)
