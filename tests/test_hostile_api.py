"""Hostile API arguments: every public call either works or raises one of
trit's own exceptions naming the argument (issue 15, classes 1, 2, 5, 6).
Calls that once aborted the process run in a child process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import numpy as np
import pytest
from conftest import FIXTURES, generator
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from trit import Generator, InvalidInputError, SamplingOptions, TritError
from trit._core import (
    Engine,
    Model,
    ModelConfig,
    Sampler,
    Session,
    TernaryMatrix,
    quantize_activations,
)

EDGE_INTS = st.sampled_from(
    [0, 1, -1, 2, 7, 2**31, 2**32, 2**32 - 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**100]
    + [-(2**63), -(2**64), 10**400]
)
HOSTILE = st.one_of(
    st.none(),
    st.booleans(),
    EDGE_INTS,
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.sampled_from([1e308, -1e308, float("nan"), float("inf"), 1e-45]),
    st.text(max_size=5),
    st.sampled_from(["\ud800", "a\udfffb", "", "0", "1.5", "f16", "avx2", "int8"]),
    st.binary(max_size=4),
    st.lists(st.one_of(EDGE_INTS, st.text(max_size=2), st.none()), max_size=3),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
    st.sampled_from([np.int64(3), np.float32(0.5), np.array([1, 2]), object()]),
)
# The examples are cheap: a tiny model, a few tokens.
FUZZ = settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)


def attempt(name: str, call: Any, *args: Any, **kwargs: Any) -> Any:
    """`call(*args, **kwargs)`, allowing only trit's exceptions out."""
    try:
        return call(*args, **kwargs)
    except TritError as exc:
        assert str(exc), f"{name}: an error without a message"
        return None


SAMPLING_KEYS = [
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "seed",
    "stop",
    "sampling",
    "on_token",
    "max_new_tokens",
]


@FUZZ
@given(
    prompt=st.one_of(HOSTILE, st.lists(EDGE_INTS, min_size=1, max_size=3), st.just("Once")),
    changes=st.dictionaries(st.sampled_from(SAMPLING_KEYS), HOSTILE, max_size=3),
)
def test_generate_takes_any_arguments(prompt: Any, changes: dict[str, Any]) -> None:
    g = generator("tiny-gqa-packed", exact=False)
    kwargs = {"max_new_tokens": 3, **changes}
    if isinstance(kwargs["max_new_tokens"], int) and kwargs["max_new_tokens"] > 16:
        kwargs["max_new_tokens"] = 16  # valid, and costs time only
    attempt("Generator.generate", g.generate, prompt, **kwargs)
    attempt("Generator.chat", g.chat, prompt, 2)
    attempt(
        "SamplingOptions",
        SamplingOptions,
        **{k: v for k, v in changes.items() if k in SAMPLING_KEYS[:7]},
    )


@FUZZ
@given(value=HOSTILE, ids=st.one_of(HOSTILE, st.lists(EDGE_INTS, max_size=3)))
def test_tokenizer_takes_any_arguments(value: Any, ids: Any) -> None:
    tok = generator("tiny-gqa-packed", exact=False).tokenizer
    attempt("Tokenizer.encode", tok.encode, value)
    attempt("Tokenizer.decode", tok.decode, ids)
    attempt("Tokenizer.token_bytes", tok.token_bytes, value)
    attempt("Tokenizer.token_id", tok.token_id, value)
    attempt("Tokenizer.render_chat", tok.render_chat, [{"role": "user", "content": value}])


ARRAYS = hnp.arrays(
    dtype=st.sampled_from([np.int8, np.float32, np.float64, np.int64, np.int16]),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5),
    elements=st.integers(-2, 2),
)


@FUZZ
@given(
    w=st.one_of(ARRAYS, HOSTILE),
    scale=HOSTILE,
    x=st.one_of(ARRAYS, HOSTILE),
    threads=HOSTILE,
    kernel=HOSTILE,
)
def test_kernels_take_any_arguments(w: Any, scale: Any, x: Any, threads: Any, kernel: Any) -> None:
    attempt("TernaryMatrix.pack", TernaryMatrix.pack, w, scale)
    m = TernaryMatrix.pack(np.ones((4, 3), np.int8), 0.5)
    if isinstance(x, np.ndarray) and x.dtype == np.float32 and x.ndim == 2 and x.shape[1:] == (3,):
        x = x.astype(np.float32)
    attempt("TernaryMatrix.matmul", m.matmul, x, threads=threads, kernel=kernel)
    attempt("TernaryMatrix.matmul", m.matmul, np.ones(3, np.float32), threads=threads)
    attempt("quantize_activations", quantize_activations, x)


@FUZZ
@given(
    kwargs=st.dictionaries(
        st.sampled_from(
            [
                "n_ctx",
                "threads",
                "kv_cache",
                "temperature",
                "top_k",
                "top_p",
                "min_p",
                "repetition_penalty",
                "seed",
                "head",
                "ids",
                "token",
                "first",
            ]
        ),
        HOSTILE,
        max_size=4,
    )
)
def test_sessions_and_samplers_take_any_arguments(kwargs: dict[str, Any]) -> None:
    g = generator("tiny-gqa-packed", exact=False)
    pick = lambda *keys: {k: v for k, v in kwargs.items() if k in keys}  # noqa: E731
    session = attempt("Session", Session, g.model, **pick("n_ctx", "threads", "kv_cache"))
    attempt(
        "Sampler",
        Sampler,
        **pick("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed"),
    )
    if session is not None:
        attempt("Session.prefill", session.prefill, kwargs.get("ids", [1, 2]))
        attempt("Session.push", session.push, kwargs.get("token", 3))
        attempt("Session.nll", session.nll, kwargs.get("ids", [1, 2, 3]), kwargs.get("first", 1))
        attempt("Session.logits", session.logits, kwargs.get("ids", [1]))


CONFIG = dict(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=1e4,
    rms_norm_eps=1e-5,
    max_position_embeddings=32,
)


@FUZZ
@given(
    changes=st.dictionaries(
        st.sampled_from(
            [*CONFIG, "head_dim", "tie_word_embeddings", "linear_class", "quantization_mode"]
        ),
        HOSTILE,
        min_size=1,
        max_size=3,
    )
)
def test_model_config_takes_any_arguments(changes: dict[str, Any]) -> None:
    attempt("ModelConfig", ModelConfig, **{**CONFIG, **changes})


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("seed", 2**64, "seed must be"),
        ("seed", -1, "seed must be"),
        ("top_k", 2**64, "top_k must be"),
        ("temperature", "hot", "temperature must be a number"),
        ("repetition_penalty", 10**400, "repetition_penalty"),
        ("stop", None, "stop must be a str or a list"),
    ],
)
def test_sampling_values_name_the_argument(field: str, value: Any, expected: str) -> None:
    g = generator("tiny-gqa-packed", exact=False)
    with pytest.raises(InvalidInputError, match=expected):
        g.generate("Once", 2, **{field: value})


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (
            lambda s: s.prefill([2**64]),
            "token id 18446744073709551616 at position 0 is not a valid id",
        ),
        (lambda s: s.prefill([1, "a"]), r"token id \(a str\) at position 1 is not a valid id"),
        (lambda s: s.prefill("abc"), "ids must be a list of token ids, got a str"),
        (
            lambda s: s.push(-1),
            "token id -1 is not a valid id; token ids are integers from 0 to 4294967295",
        ),
        (lambda s: s.nll([1, 2], 2**70), "first must be an integer"),
        (lambda s: Session(s_model(), threads=2**64), "threads must be an integer from 0"),
        (lambda s: Session(s_model(), n_ctx=-5), "n_ctx must be an integer from 0"),
        (lambda s: Session(s_model(), kv_cache=16), "kv_cache must be a str, got int"),  # type: ignore[arg-type]
        (lambda s: Sampler(seed=2**64), "seed must be an integer from 0 to"),
        (lambda s: Sampler(temperature="1"), "temperature must be a number, got str"),  # type: ignore[arg-type]
        (lambda s: Sampler(top_k=True), "top_k must be an integer, got a bool"),
        (lambda s: TernaryMatrix.pack(np.ones((4, 4), np.int8), "1"), "scale must be a number"),  # type: ignore[arg-type]
        (lambda s: TernaryMatrix.pack(np.ones((4, 4), np.int8), 2**2000), "scale is too large"),
        (lambda s: Model.load(s_model().config, 7), "tensors must be a list of"),  # type: ignore[arg-type]
        (lambda s: Model.load(s_model().config, [("w", "U8")]), r"tensors\[0\] must be"),  # type: ignore[list-item]
        (
            lambda s: Model.load(s_model().config, [("w", "U8", [1], b"x")]),  # type: ignore[list-item]
            'tensor "w": data must be a 1-D uint8 numpy array, got bytes',
        ),
        (
            lambda s: Model.load(s_model().config, [("w", "U8", [-1], np.zeros(1, np.uint8))]),
            'tensor "w": shape must be an integer from 0',
        ),
        (lambda s: Engine(s_model()).step([(0, [1], "yes")]), "logits must be True or False"),  # type: ignore[list-item]
        (lambda s: Engine(s_model()).step([(2**64, [1], True)]), "slot must be an integer from 0"),
        (lambda s: Engine(s_model()).release(-1), "slot must be an integer from 0"),
        (lambda s: Engine(s_model()).step("abc"), r"work\[0\] must be"),  # type: ignore[arg-type]
        (lambda s: Engine(s_model()).sample_many(3), "requests must be a list of"),  # type: ignore[arg-type]
        (
            lambda s: Engine(s_model()).sample_many([(0, "greedy")]),  # type: ignore[list-item]
            r"requests\[0\]'s sampler must be a trit._core.Sampler, got str",
        ),
        (
            lambda s: Engine(s_model()).sample_many([(-1, Sampler())]),
            "slot must be an integer from 0",
        ),
        (lambda s: Engine(s_model()).sample_many([(0, Sampler())]), "slot 0 has no logits"),
        (lambda s: Engine(s_model()).sample_many([(7, Sampler())]), "slot 7 does not exist"),
        (
            lambda s: (lambda g: Engine(s_model(), slots=2).sample_many([(0, g), (1, g)]))(
                Sampler()
            ),
            r"requests\[0\] and requests\[1\] share one Sampler",
        ),
    ],
)
def test_engine_arguments_name_themselves(call: Any, expected: str) -> None:
    session = Session(s_model(), threads=1, n_ctx=16)
    with pytest.raises(InvalidInputError, match=expected):
        call(session)


def s_model() -> Any:
    return generator("tiny-gqa-packed", exact=False).model


def test_lone_surrogates_are_invalid_input() -> None:
    g = generator("tiny-gqa-packed", exact=False)
    with pytest.raises(InvalidInputError, match=r"lone surrogate \(U\+D800\) at position 3"):
        g.generate("abc\ud800", 2)
    with pytest.raises(InvalidInputError, match="the content of message 0 holds a lone surrogate"):
        g.chat([{"role": "user", "content": "\udfff"}], 2)


# ---------------------------------------------------------------- class 1: huge views


def test_huge_broadcast_views_are_memory_errors_not_aborts() -> None:
    # Before: an abort on a 1 TiB allocation. In a child, so that a
    # regression fails this test only.
    code = textwrap.dedent(
        """
        import numpy as np
        from trit import OutOfMemoryError
        from trit._core import TernaryMatrix, quantize_activations
        calls = [
            lambda: TernaryMatrix.pack(np.broadcast_to(np.int8(0), (2**20, 2**20)), 1.0),
            lambda: quantize_activations(np.broadcast_to(np.float32(1), (2**20, 2**20))),
            lambda: TernaryMatrix.pack(np.ones((4, 256), np.int8), 1.0).matmul(
                np.broadcast_to(np.float32(1), (2**32, 256))),
        ]
        for call in calls:
            try:
                call()
            except OutOfMemoryError as exc:
                assert "cannot allocate" in str(exc), exc
                print("refused:", exc)
            else:
                raise SystemExit("allocated")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("refused:") == 3, result.stdout


# ---------------------------------------------------------------- class 2: no shared sequence
# Each generation holds a sequence slot of its own (the batched engine); with
# every slot taken, one more is refused, never run on another's cache.


@pytest.fixture
def own_generator() -> Generator:
    return Generator.from_pretrained(FIXTURES / "tiny-gqa-packed", threads=1)


def test_generate_inside_on_token_is_refused_with_one_slot(own_generator: Generator) -> None:
    g = own_generator

    def reenter(token: int, logits: Any) -> None:
        g.generate("Other text", 2)

    with pytest.raises(TritError, match="slots are in use"):
        g.generate("Once", 4, on_token=reenter)
    # The generator is usable afterwards, and gives what a fresh one gives.
    fresh = Generator.from_pretrained(FIXTURES / "tiny-gqa-packed", threads=1)
    assert g.generate("Once", 3) == fresh.generate("Once", 3)


def test_streams_advanced_in_turn_never_share_a_sequence(own_generator: Generator) -> None:
    alone = Generator.from_pretrained(FIXTURES / "tiny-gqa-packed", threads=1)
    want_a = alone.generate("Once upon a time", 8)
    want_b = alone.generate("The capital of", 8)
    # One slot: the second stream is refused; the first goes on undisturbed.
    g = own_generator
    first = g.stream("Once upon a time", 8)
    head = next(first)
    with pytest.raises(TritError, match="slots are in use"):
        second = g.stream("The capital of", 8)
        next(second)
    assert head + "".join(first) == want_a
    # Two slots: both run, in turn, each on its own sequence.
    g2 = Generator.from_pretrained(FIXTURES / "tiny-gqa-packed", threads=1, slots=2)
    a, b = g2.stream("Once upon a time", 8), g2.stream("The capital of", 8)
    texts = ["", ""]
    for _ in range(20):
        for i, s in enumerate((a, b)):
            texts[i] += next(s, "")
    assert texts == [want_a, want_b]


def test_a_closed_stream_frees_its_slot(own_generator: Generator) -> None:
    g = own_generator
    s = g.stream("Once upon a time", 8)
    next(s)
    s.close()  # type: ignore[attr-defined]  # a Python generator
    assert g.generate("Once", 2) is not None


def test_threads_sharing_a_generator_never_fail_with_already_borrowed() -> None:
    g = Generator.from_pretrained(FIXTURES / "tiny-gqa-packed", threads=1, slots=2)
    want = g.generate("Once", 6)
    results: list[object] = []

    def run() -> None:
        try:
            results.append(g.generate("Once", 6))
        except TritError as exc:  # all slots taken: a trit error that says so
            results.append(exc)

    workers = [threading.Thread(target=run) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(30)
    assert len(results) == 4
    for r in results:
        assert r == want or (isinstance(r, TritError) and "slots are in use" in str(r)), r


@pytest.mark.parametrize("kind", ["Session", "Engine"])
def test_a_raw_session_or_engine_shared_by_threads_says_it_is_busy(kind: str) -> None:
    """While one thread computes with a Session or Engine (the GIL released),
    another thread's call on it is a TritError naming it, not PyO3's
    "Already borrowed" RuntimeError; the first call's result is unharmed."""
    model = s_model()
    ids = list(range(1, 120))
    if kind == "Session":
        obj: Any = Session(model, threads=1, n_ctx=128)
        want = Session(model, threads=1, n_ctx=128).logits(ids)

        def compute() -> Any:
            return obj.logits(ids)

        def poke() -> object:
            return obj.n_tokens
    else:
        obj = Engine(model, slots=1, threads=1, n_ctx=128)
        want = Engine(model, slots=1, threads=1, n_ctx=128).logits(0, ids)

        def compute() -> Any:
            return obj.logits(0, ids)

        def poke() -> object:
            return obj.free_slots

    for _ in range(200):
        results: list[Any] = []
        worker = threading.Thread(target=lambda out=results: out.append(compute()))
        worker.start()
        seen: list[BaseException] = []
        while worker.is_alive() and not seen:
            try:
                poke()
            except BaseException as exc:  # noqa: BLE001  # any class: checked below
                seen.append(exc)
        worker.join(30)
        np.testing.assert_array_equal(results[0], want)
        if seen:
            assert type(seen[0]) is TritError, repr(seen[0])
            assert f"this {kind} is in use by another thread" in str(seen[0])
            assert obj.n_ctx == 128  # what never changes stays readable
            return
    pytest.fail("the second thread never met the first one's call")


# ---------------------------------------------------------------- class 5: thread pools


def max_threads() -> int:
    with pytest.raises(InvalidInputError) as info:
        TernaryMatrix.pack(np.ones((4, 4), np.int8), 1.0).matmul(
            np.ones(4, np.float32), threads=10**6
        )
    return int(str(info.value).split("is more than ")[1].split()[0])


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs /proc")
def test_thread_counts_are_capped_and_pools_bounded() -> None:
    cap = max_threads()
    assert cap >= 8
    with pytest.raises(InvalidInputError, match="threads=1000 is more than"):
        Generator.from_pretrained(FIXTURES / "tiny-gqa-packed", threads=1000)
    m = TernaryMatrix.pack(np.ones((8, 4), np.int8), 1.0)
    x = np.ones((64, 4), np.float32)
    before = os_threads()
    for _ in range(2):
        for n in range(1, cap + 1):
            m.matmul(x, threads=n)
    # At most the 4 most recent pools stay; the others' threads end (soon).
    bound = before + sum(range(cap - 3, cap + 1))
    deadline = time.monotonic() + 10
    while os_threads() > bound and time.monotonic() < deadline:
        time.sleep(0.05)
    assert os_threads() <= bound, (os_threads(), before, cap)


@FUZZ
@given(
    name=st.one_of(HOSTILE, st.sampled_from(["a\0b", "org/model", "../x", "", "/dev/null"])),
    changes=st.dictionaries(
        st.sampled_from(["threads", "n_ctx", "head", "kv_cache", "revision"]), HOSTILE, max_size=2
    ),
)
def test_from_pretrained_takes_any_arguments(
    name: Any, changes: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never the network
    attempt("from_pretrained", Generator.from_pretrained, name, **changes)
    attempt("from_pretrained", Generator.from_pretrained, FIXTURES / "tiny-gqa-packed", **changes)
