"""trit's BitNet forward pass against transformers' references (tests/fixtures).

Tolerances (FORMATS.md 9 and tests/fixtures/README.md): transformers itself
is not self-consistent at int8 rounding boundaries, where a 1e-6 difference
can flip one activation code and relu² plus the sub-norms amplify it into
0.02-3 logits. So: short prompts (1 and 5 tokens) must agree to 1e-4; longer
ones must agree to 1e-4 at most positions and have the same argmax wherever
HF's top-2 margin exceeds 0.5; the per-module int8 codes must be equal (a
rare +-1 allowed), which is the check that catches quantisation bugs that
hide in end-to-end noise.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FIXTURES, MODELS, generator

from trit import Generator, InvalidInputError
from trit._core import Model, Sampler, Session
from trit.kernels import quantize_activations

SHORT_TOL = 1e-4
MARGIN = 0.5
PROJS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def expected(name: str) -> np.lib.npyio.NpzFile:
    return np.load(FIXTURES / name / "expected.npz", allow_pickle=False)


def top2_margin(logits: np.ndarray) -> np.ndarray:
    part = np.sort(logits, axis=-1)
    return part[..., -1] - part[..., -2]


@pytest.mark.parametrize("name", MODELS)
def test_short_prompts_match_transformers(name: str) -> None:
    g, z = generator(name), expected(name)
    for k in (0, 1):
        got = g.logits(z[f"prompt{k}_ids"].tolist())
        want = z[f"prompt{k}_logits"]
        assert got.shape == want.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=0, atol=SHORT_TOL)


def check_long(got: np.ndarray, want: np.ndarray) -> None:
    # Most positions within 1e-4, not all: in tiny-gqa-bf16's gen0, a layer-0
    # activation of position 7 lies 1.5e-5 from an int8 rounding tie, and HF
    # rounds it the other way from both trit and an independent numpy float32
    # forward (which agree to 1e-5 everywhere); positions 7.. then move by up
    # to 0.42. A real bug (scale, layout, RoPE) moves nearly every position.
    err = np.abs(got - want).max(axis=1)
    close = np.mean(err <= SHORT_TOL)
    assert close >= 0.5, f"positions off by > 1e-4: {np.flatnonzero(err > SHORT_TOL)}"
    clear = top2_margin(want) > MARGIN
    assert clear.sum() > 0
    np.testing.assert_array_equal(got.argmax(1)[clear], want.argmax(1)[clear])


@pytest.mark.parametrize("name", MODELS)
def test_long_prompts_match_transformers(name: str) -> None:
    g, z = generator(name), expected(name)
    for k in (2, 3):
        check_long(g.logits(z[f"prompt{k}_ids"].tolist()), z[f"prompt{k}_logits"])


@pytest.mark.parametrize("name", MODELS)
def test_teacher_forced_greedy_matches_transformers(name: str) -> None:
    g, z = generator(name), expected(name)
    for j in (0, 1):
        ids = z[f"gen{j}_ids"].tolist()
        new = z[f"gen{j}_new_ids"]
        t = len(ids) - len(new)
        got = g.logits(ids)
        check_long(got, z[f"gen{j}_logits"])
        decided = z[f"gen{j}_margin"] > MARGIN
        assert decided.sum() >= 7  # the README's counts: 7 to 13 of 16
        np.testing.assert_array_equal(got[t - 1 : -1].argmax(1)[decided], new[decided])


@pytest.mark.parametrize("name", ["tiny-gqa-packed", "tiny-mha-packed", "tiny-gqa-bf16"])
def test_cached_greedy_decoding_follows_transformers(name: str) -> None:
    """Free-running greedy with the KV cache, as HF's generate ran it: equal
    tokens up to the first step HF itself decided by a margin < 0.5."""
    g, z = generator(name), expected(name)
    for j in (0, 1):
        prompt = z[f"prompt{int(z[f'gen{j}_prompt_index'])}_ids"].tolist()
        new = z[f"gen{j}_new_ids"].tolist()
        margins = z[f"gen{j}_step_margin"]
        session = Session(g.model, threads=1, kv_cache="f32")
        sampler = Sampler(temperature=0.0)
        session.prefill(prompt)
        for i, want in enumerate(new):
            if margins[i] <= MARGIN:
                break
            assert session.sample(sampler) == want, f"gen{j} step {i}"
            session.push(want)


@pytest.mark.parametrize("name", ["tiny-gqa-packed", "tiny-mha-packed", "tiny-gqa-bf16"])
def test_per_module_weights_codes_and_outputs(name: str) -> None:
    g, z = generator(name), expected(name)
    last = g.config.num_hidden_layers - 1
    for p in PROJS:
        m = g.model.projection(0, p)
        np.testing.assert_array_equal(m.unpack(), z[f"L0_{p}_weight"])
        # bf16 masters: mean|W| summed in another order may move one ulp.
        np.testing.assert_allclose(m.scale, z[f"L0_{p}_wscale"][0], rtol=2.5e-7, atol=0)
        for layer in (0, last):
            x = z[f"L{layer}_{p}_in"]
            q, s = quantize_activations(x)
            diff = q.astype(np.int16) - z[f"L{layer}_{p}_codes"]
            assert np.abs(diff).max() <= 1 and np.count_nonzero(diff) <= 1, (layer, p)
            np.testing.assert_allclose(s, z[f"L{layer}_{p}_scale"], rtol=1.2e-7)
            out = g.model.projection(layer, p).matmul(x)
            want = z[f"L{layer}_{p}_out"]
            assert np.abs(out - want).max() <= 1e-5 * np.abs(want).max(), (layer, p)


def test_sharded_equals_unsharded() -> None:
    z = expected("tiny-gqa-packed")
    ids = z["prompt3_ids"].tolist()
    a = generator("tiny-gqa-packed").logits(ids)
    b = generator("tiny-gqa-sharded").logits(ids)
    np.testing.assert_array_equal(a, b)


def test_prefix_reuse_gives_the_same_logits() -> None:
    g, z = generator("tiny-mha-packed"), expected("tiny-mha-packed")
    ids = z["prompt3_ids"].tolist()
    full = g.logits(ids)
    s = Session(g.model, threads=2, kv_cache="f32")
    assert s.prefill(ids[:25]) == 25
    assert s.prefill(ids) == len(ids) - 25  # only the new tokens run
    last = s.last_logits()
    assert last is not None
    np.testing.assert_array_equal(last, full[-1])
    # One token at a time through the cache gives the same numbers too.
    s.reset()
    s.prefill(ids[:1])
    for i, t in enumerate(ids[1:], start=1):
        s.push(t)
        np.testing.assert_array_equal(s.last_logits(), full[i])
    # A prompt that diverges recomputes from the divergence on.
    other = ids[:10] + [7, 8, 9]
    assert s.prefill(other) == 3
    np.testing.assert_array_equal(s.last_logits(), g.logits(other)[-1])


def test_threads_do_not_change_results() -> None:
    z = expected("tiny-gqa-packed")
    ids = z["prompt3_ids"].tolist()
    g1 = Generator.from_pretrained(FIXTURES / "tiny-gqa-packed", threads=1)
    g2 = generator("tiny-gqa-packed", exact=False)
    np.testing.assert_array_equal(g1.logits(ids), g2.logits(ids))


def test_config_is_read() -> None:
    c = generator("tiny-mha-packed").config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (96, 256, 3)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (6, 6, 16)
    assert c.rope_theta == 10000.0 and c.vocab_size == 512
    assert c.linear_class == "autobitlinear" and c.quantization_mode == "offline"
    assert generator("tiny-gqa-bf16").config.quantization_mode == "online"


def test_tq1_packing_gives_the_same_logits_in_fewer_bytes() -> None:
    """The 1.625-bit packing computes the same integer dots as the 2-bit one,
    so a prompt's logits (the GEMM) and one token's (the GEMV) are the same
    bits; each projection takes 52 bytes per 256 weights instead of 64."""
    path = FIXTURES / "tiny-mha-packed"
    i2 = Generator.from_pretrained(path, threads=2)
    tq1 = Generator.from_pretrained(path, threads=2, packing="tq1")
    assert (i2.model.packing, tq1.model.packing) == ("i2", "tq1")
    for ids in ([5, 17, 300, 42, 7, 1, 99], [509]):
        np.testing.assert_array_equal(i2.logits(ids), tq1.logits(ids))
    a, b = i2.model.projection(1, "down_proj"), tq1.model.projection(1, "down_proj")
    assert b.packing == "tq1" and b.nbytes * 64 == a.nbytes * 52
    np.testing.assert_array_equal(a.unpack(), b.unpack())
    assert tq1.model.bytes_per_token < i2.model.bytes_per_token
    with pytest.raises(InvalidInputError, match="packing must be one of i2, tq1, tl, got 'tq2'"):
        Generator.from_pretrained(path, packing="tq2")
    # The engine's own check, for callers of Model.open.
    with pytest.raises(InvalidInputError, match='unknown packing "tq2"'):
        Model.open(path, packing="tq2")


def test_int8_head_is_close_and_smaller() -> None:
    """The int8 head (the default) against the bf16 one on a fixture: the
    bound is what was measured on these tiny random models (hidden 64: the
    per-row int8 steps are coarse; on the bundled real model the perplexity
    moves by 0.02 %, tests/test_bundled.py), and a 1-token prompt isolates the
    head's own error."""
    path = FIXTURES / "tiny-gqa-packed"
    exact = Generator.from_pretrained(path, head="bf16", kv_cache="f32")
    fast = Generator.from_pretrained(path, head="int8", kv_cache="f32")
    la, lb = exact.logits([509]), fast.logits([509])
    assert np.abs(la - lb).max() < 1.0
    assert np.abs(la - lb).mean() < 0.2
    assert la.argmax() == lb.argmax()
    # Tied: the embedding itself became int8 (1 byte per value plus row scales).
    cfg = exact.config
    values = cfg.vocab_size * cfg.hidden_size
    saved = 2 * values - (values + 4 * cfg.vocab_size)
    assert exact.model.weight_bytes - fast.model.weight_bytes == saved
    with pytest.raises(ValueError, match="head must be one of"):
        Generator.from_pretrained(path, head="fp4")


def test_q6_head_is_close_and_smaller_than_int8() -> None:
    """The 6-bit head against the bf16 one on the same fixture and prompt as
    the int8 test: measured max 0.59 and mean 0.14 (int8: 0.47 and 0.09),
    the bound is the int8 test's with a third more room; on the bundled real
    model the perplexity moves by 0.04 % from int8's (tests/test_bundled.py)."""
    path = FIXTURES / "tiny-gqa-packed"
    exact = Generator.from_pretrained(path, head="bf16", kv_cache="f32")
    q6 = Generator.from_pretrained(path, head="q6", kv_cache="f32")
    la, lb = exact.logits([509]), q6.logits([509])
    assert np.abs(la - lb).max() < 0.8
    assert np.abs(la - lb).mean() < 0.2
    # The exact head's two best tokens here differ by 0.017 (12.023 and
    # 12.006), less than either quantized head's error: the q6 choice must
    # be one of the exact near-ties, not necessarily its first.
    assert la[0, lb.argmax()] > la.max() - 0.05
    # Tied: the embedding itself became q6, a row of 64 values one group:
    # 48 code bytes, the 8 sub-scales of its band (which would hold four
    # groups) and the row's f32 step.
    cfg = exact.config
    assert cfg.hidden_size == 64
    saved = cfg.vocab_size * (2 * 64 - (48 + 8 + 4))
    assert exact.model.weight_bytes - q6.model.weight_bytes == saved
    with pytest.raises(ValueError, match="q6 rows"):
        q6.model.dense("embed_tokens")
