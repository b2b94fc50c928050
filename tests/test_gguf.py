"""GGUF files: a model read from GGUF gives the logits of the same model read
from safetensors, for every ternary encoding (I2_S, TQ1_0, TQ2_0, ternary
floats) and embedding type; broken or hostile files fail with an
InvalidInputError that names the file and what is wrong."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import gguf
import gguf_files
import numpy as np
import pytest
from conftest import FIXTURES

from trit import InvalidInputError
from trit._core import Model, Session, gguf_metadata
from trit.synthetic import Shape
from trit.synthetic import write as write_synthetic

IDS = [1, 5, 9, 60, 3, 17, 2]


def logits(path: Path) -> np.ndarray:
    model, warnings = Model.open(path, threads=1)
    assert warnings == []
    return Session(model, kv_cache="f32").logits(IDS)


@pytest.fixture(scope="module")
def block_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model whose rows are whole TQ blocks (256 weights), which the tiny
    fixtures' are not."""
    folder = tmp_path_factory.mktemp("block-model")
    write_synthetic(Shape("test", 256, 512, 2, 4, 2, 64, True, 64), folder)
    return folder


@pytest.mark.parametrize("name", ["tiny-gqa-packed", "tiny-mha-packed"])
@pytest.mark.parametrize(("projections", "arch"), [("I2_S", "bitnet-b1.58"), ("F32", "bitnet")])
def test_gguf_logits_equal_safetensors(
    tmp_path: Path, name: str, projections: str, arch: str
) -> None:
    path = gguf_files.write(
        FIXTURES / name, tmp_path / "m.gguf", projections=projections, arch=arch
    )
    assert np.array_equal(logits(path), logits(FIXTURES / name))


@pytest.mark.parametrize("projections", ["TQ1_0", "TQ2_0", "I2_S"])
def test_tq_and_i2s_blocks_load_exactly(
    tmp_path: Path, block_model: Path, projections: str
) -> None:
    path = gguf_files.write(
        block_model, tmp_path / "m.gguf", projections=projections, tokenizer=False
    )
    assert np.array_equal(logits(path), logits(block_model))
    # The file is one llama.cpp's own reader accepts (I2_S is bitnet.cpp's only).
    if projections != "I2_S":
        assert len(gguf.GGUFReader(path).tensors) == 2 * 11 + 2


def test_other_architectures_are_their_families(tmp_path: Path) -> None:
    """The 2B4T block written under llama.cpp's "llama" is refused by its
    sub-norms (test_gguf_families has that family's files); under "bitnet"
    without a tokenizer or hidden_act it is llama.cpp's default, 1bitLLM's
    SiLU block; an unknown architecture is refused by name."""
    packed = FIXTURES / "tiny-gqa-packed"
    path = gguf_files.write(packed, tmp_path / "m.gguf", arch="llama", tokenizer=False)
    with pytest.raises(InvalidInputError, match="sub_norm.*the llama family has no sub-norms"):
        Model.open(path)
    path = gguf_files.write(packed, tmp_path / "b.gguf", arch="bitnet", tokenizer=False)
    model, _ = Model.open(path)
    assert model.config.family == "1bitllm"
    path = gguf_files.write(packed, tmp_path / "q.gguf", arch="qwen2", tokenizer=False)
    with pytest.raises(InvalidInputError, match='architecture "qwen2" is not supported'):
        Model.open(path)


@pytest.mark.parametrize("embedding", ["Q8_0", "Q6_K", "F16"])
def test_quantized_embeddings_dequantize_exactly(
    tmp_path: Path, block_model: Path, embedding: str
) -> None:
    """A Q8_0 / Q6_K / F16 embedding gives the logits of an F32 embedding holding
    the values ggml's own dequantizer gives."""
    quantized = gguf_files.write(
        block_model, tmp_path / "q.gguf", projections="TQ2_0", embedding=embedding, tokenizer=False
    )
    reader = gguf.GGUFReader(quantized)
    t = next(t for t in reader.tensors if t.name == "token_embd.weight")
    values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
    reference = tmp_path / "f32.gguf"
    gguf_files.write(block_model, reference, projections="TQ2_0", embedding="F32", tokenizer=False)
    patched = bytearray(reference.read_bytes())
    r = gguf.GGUFReader(reference)
    t32 = next(t for t in r.tensors if t.name == "token_embd.weight")
    start = t32.data_offset
    patched[start : start + values.nbytes] = values.tobytes()
    reference.write_bytes(bytes(patched))
    assert np.array_equal(logits(quantized), logits(reference))


def test_metadata_reaches_python(tmp_path: Path) -> None:
    path = gguf_files.write(FIXTURES / "tiny-gqa-packed", tmp_path / "m.gguf")
    meta = gguf_metadata(path)
    assert meta["general.architecture"] == "bitnet-b1.58"
    assert meta["bitnet-b1.58.embedding_length"] == 64
    assert meta["tokenizer.ggml.model"] == "gpt2"
    tokens = meta["tokenizer.ggml.tokens"]
    assert isinstance(tokens, list) and len(tokens) == 512
    model, _ = Model.open(path)
    assert model.config.vocab_size == 512
    assert model.config.tie_word_embeddings


# ------------------------------------------------------------- broken files


def header(n_tensors: int, n_kv: int, version: int = 3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def gstr(s: str) -> bytes:
    return struct.pack("<Q", len(s)) + s.encode()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "truncated"),
        (b"GGML" + bytes(20), "not a GGUF file"),
        (header(0, 0, version=1), "version 1"),
        (header(1 << 62, 0), "tensor count"),
        (header(0, 1 << 62), "metadata count"),
        (header(0, 1) + struct.pack("<Q", 1 << 60) + bytes(8), "length of the key"),
        (header(0, 1) + gstr("k") + struct.pack("<I", 77), "unknown value type 77"),
        (header(0, 1) + gstr("k") + struct.pack("<IIQ", 9, 8, 1 << 58), "element count"),
        (header(0, 0), "general.architecture is missing"),
    ],
)
def test_hostile_headers_are_refused(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(InvalidInputError, match=message) as info:
        Model.open(path)
    assert str(path) in str(info.value)
    if message not in ("general.architecture is missing",):
        with pytest.raises(InvalidInputError, match=message):
            gguf_metadata(path)


def edit_tensor_info(
    path: Path, name: str, *, ggml_type: int | None = None, offset: int | None = None
) -> None:
    """Rewrites the type or data offset of tensor `name` in place."""
    raw = bytearray(path.read_bytes())
    key = struct.pack("<Q", len(name)) + name.encode()
    at = raw.index(key) + len(key)
    (n_dims,) = struct.unpack_from("<I", raw, at)
    at += 4 + 8 * n_dims
    if ggml_type is not None:
        struct.pack_into("<I", raw, at, ggml_type)
    if offset is not None:
        struct.pack_into("<Q", raw, at + 4, offset)
    path.write_bytes(bytes(raw))


def test_bad_tensor_infos_name_the_tensor(tmp_path: Path) -> None:
    good = gguf_files.write(FIXTURES / "tiny-gqa-packed", tmp_path / "m.gguf", tokenizer=False)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(good.read_bytes())
    edit_tensor_info(bad, "blk.0.attn_q.weight", ggml_type=12)
    with pytest.raises(InvalidInputError, match=r"blk\.0\.attn_q\.weight.*Q4_K"):
        Model.open(bad)
    bad.write_bytes(good.read_bytes())
    edit_tensor_info(bad, "blk.1.ffn_up.weight", offset=1 << 40)
    with pytest.raises(InvalidInputError, match=r"blk\.1\.ffn_up\.weight.*past the end"):
        Model.open(bad)
    bad.write_bytes(good.read_bytes()[:-64])
    with pytest.raises(InvalidInputError, match="past the end"):
        Model.open(bad)


def test_unequal_tq_block_scales_are_refused(tmp_path: Path, block_model: Path) -> None:
    path = gguf_files.write(block_model, tmp_path / "m.gguf", projections="TQ2_0", tokenizer=False)
    reader = gguf.GGUFReader(path)
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    raw = bytearray(path.read_bytes())
    # The f16 scale of the second 66-byte block: 1.5 -> 2.0.
    struct.pack_into("<H", raw, t.data_offset + 66 + 64, 0x4000)
    path.write_bytes(bytes(raw))
    with pytest.raises(InvalidInputError, match=r"blk\.0\.ffn_down\.weight.*different scales"):
        Model.open(path)


def test_i2s_code_three_is_refused(tmp_path: Path) -> None:
    path = gguf_files.write(FIXTURES / "tiny-gqa-packed", tmp_path / "m.gguf", tokenizer=False)
    # I2_S is unknown to the upstream reader: find the tensor by walking the header.
    raw = bytearray(path.read_bytes())
    name = b"blk.0.attn_v.weight"
    at = raw.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    (n_dims,) = struct.unpack_from("<I", raw, at)
    (offset,) = struct.unpack_from("<Q", raw, at + 4 + 8 * n_dims + 4)
    raw[_data_start(raw) + offset + 3] = 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(InvalidInputError, match=r"blk\.0\.attn_v\.weight.*code 3"):
        Model.open(path)


def _data_start(raw: bytearray) -> int:
    """Where the data section of a (well-formed) GGUF starts: after the
    metadata and tensor infos, aligned to 32."""
    (n_tensors, n_kv) = struct.unpack_from("<QQ", raw, 8)
    pos = 24
    for _ in range(n_kv):
        (klen,) = struct.unpack_from("<Q", raw, pos)
        pos += 8 + klen
        pos = _skip_value(raw, pos)
    for _ in range(n_tensors):
        (nlen,) = struct.unpack_from("<Q", raw, pos)
        pos += 8 + nlen
        (n_dims,) = struct.unpack_from("<I", raw, pos)
        pos += 4 + 8 * n_dims + 4 + 8
    return (pos + 31) // 32 * 32


_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _skip_value(raw: bytearray, pos: int, vtype: int | None = None) -> int:
    if vtype is None:
        (vtype,) = struct.unpack_from("<I", raw, pos)
        pos += 4
    if vtype == 8:
        (n,) = struct.unpack_from("<Q", raw, pos)
        return pos + 8 + n
    if vtype == 9:
        (etype, count) = struct.unpack_from("<IQ", raw, pos)
        pos += 12
        for _ in range(count):
            pos = _skip_value(raw, pos, etype)
        return pos
    return pos + _SIZES[vtype]


FUZZ = """
import random, sys
from pathlib import Path
from trit import InvalidInputError
from trit._core import Model, gguf_metadata
good = Path(sys.argv[1]).read_bytes()
bad = Path(sys.argv[2])
rng = random.Random(0)
header_end = int(sys.argv[3])
cases = [good[:n] for n in range(0, header_end, 31)]
for _ in range(300):
    raw = bytearray(good)
    for _ in range(rng.randint(1, 4)):
        raw[rng.randrange(header_end)] = rng.randrange(256)
    cases.append(bytes(raw))
for raw in cases:
    bad.write_bytes(raw)
    for call in (lambda: Model.open(bad, threads=1), lambda: gguf_metadata(bad)):
        try:
            call()
        except InvalidInputError:
            pass
print("ok", len(cases))
"""


def test_corrupted_headers_never_crash(tmp_path: Path) -> None:
    """Truncations and random byte changes in the header: each load either
    works or raises InvalidInputError. In a child process, so that a crash
    would fail this test rather than end the test run."""
    good = gguf_files.write(FIXTURES / "tiny-gqa-packed", tmp_path / "m.gguf", projections="F32")
    header_end = _data_start(bytearray(good.read_bytes()))
    r = subprocess.run(
        [sys.executable, "-c", FUZZ, str(good), str(tmp_path / "bad.gguf"), str(header_end)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("ok")
