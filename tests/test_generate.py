"""Generator: tokenizer and chat template as transformers, sampling, stop
conditions, streaming, context limits."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import FIXTURES, generator

from trit import Generator, InvalidInputError
from trit._core import Sampler, Session

CASES = json.loads((FIXTURES / "tokenizer_cases.json").read_text())


def test_tokenizer_matches_transformers() -> None:
    g = generator("tiny-gqa-packed")
    z = np.load(FIXTURES / "tiny-gqa-packed" / "expected.npz")
    assert g.encode("Hello world") == z["hello_ids"].tolist()
    assert g.encode("Hello world", add_special_tokens=False) == z["hello_ids_nobos"].tolist()
    for case in CASES["encode"]:
        assert g.encode(case["text"]) == case["ids"], case["text"]
        assert g.encode(case["text"], add_special_tokens=False) == case["ids_no_special"]
        assert g.decode(case["ids_no_special"]) == case["decoded"]
        assert (
            g.decode(case["ids_no_special"], skip_special_tokens=True)
            == case["decoded_skip_special"]
        )


def test_chat_template_matches_transformers() -> None:
    g = generator("tiny-gqa-packed")
    z = np.load(FIXTURES / "tiny-gqa-packed" / "expected.npz")
    hi = [{"role": "user", "content": "Hi!"}]
    assert g.tokenizer.render_chat(hi) == str(z["chat_text"])
    assert g.tokenizer.encode_chat(hi) == z["chat_ids"].tolist()
    for case in CASES["chat"]:
        assert g.tokenizer.render_chat(case["messages"]) == case["text"]
        assert g.tokenizer.encode_chat(case["messages"]) == case["ids"]


def test_eos_ids_come_from_generation_config() -> None:
    assert generator("tiny-gqa-packed").eos_ids == {510, 511}


def test_greedy_generate_follows_the_logits() -> None:
    g = generator("tiny-mha-packed")
    prompt = g.encode("The quick brown fox")
    text = g.generate(prompt, 6)
    # Rebuild greedy by hand from full-sequence logits.
    ids = list(prompt)
    for _ in range(6):
        nxt = int(g.logits(ids)[-1].argmax())
        if nxt in g.eos_ids:
            break
        ids.append(nxt)
    assert text == g.decode(ids[len(prompt) :], skip_special_tokens=True)
    stats = g.last_stats
    assert stats is not None and stats.prompt_tokens == len(prompt)
    assert stats.new_tokens == len(ids) - len(prompt)


def test_text_and_id_prompts() -> None:
    g = generator("tiny-gqa-packed")
    # A str is tokenized with BOS; ids are used as given (no BOS added).
    assert g.generate("Hello world", 8) == g.generate(g.encode("Hello world"), 8)
    g.generate(g.encode("Hello world", add_special_tokens=False), 2)
    assert g.last_stats is not None and g.last_stats.prompt_tokens == 8


def test_seeds_are_reproducible() -> None:
    g = generator("tiny-gqa-bf16")

    def sample(seed: int) -> str:
        return g.generate("Hello", 24, temperature=1.0, top_k=50, top_p=0.95, min_p=0.01, seed=seed)

    assert sample(1234) == sample(1234)
    others = {sample(s) for s in range(5)}
    assert len(others) > 1


def test_stop_strings_cut_the_text() -> None:
    g = generator("tiny-mha-packed")
    full = g.generate("The", 24)
    assert g.last_stats is not None and g.last_stats.finish_reason == "length"
    stop = full[6:9]
    cut = full.find(stop)
    assert g.generate("The", 24, stop=[stop]) == full[:cut]
    assert g.last_stats is not None and g.last_stats.finish_reason == "stop"
    pieces = list(g.stream("The", 24, stop=["zzz-never", stop]))
    assert "".join(pieces) == full[:cut]
    assert all(stop not in p for p in pieces)


def test_stream_joins_to_generate() -> None:
    g = generator("tiny-gqa-packed")
    pieces = list(g.stream("Once upon", 20, temperature=0.9, seed=7))
    assert "".join(pieces) == g.generate("Once upon", 20, temperature=0.9, seed=7)


def test_streaming_never_splits_a_utf8_character() -> None:
    g = generator("tiny-gqa-packed")
    text = next(c["text"] for c in CASES["encode"] if "café" in c["text"])
    ids = g.encode(text, add_special_tokens=False)
    # Some characters span several tokens: decoded alone, a token is U+FFFD.
    assert any("\ufffd" in g.decode([t]) for t in ids)
    pieces = g.tokenizer.stream().feed(ids)
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_eos_stops_generation() -> None:
    g = generator("tiny-gqa-packed")
    prompt = g.encode("Hi")
    first = int(g.logits(prompt)[-1].argmax())
    g.eos_ids = frozenset({first})
    try:
        assert g.generate(prompt, 10) == ""
        assert g.last_stats is not None and g.last_stats.finish_reason == "eos"
    finally:
        g.eos_ids = frozenset({510, 511})


def test_context_limits() -> None:
    g = Generator.from_pretrained(FIXTURES / "tiny-gqa-packed", threads=1, n_ctx=8)
    with pytest.raises(InvalidInputError, match="n_ctx = 8"):
        g.generate(list(range(9)), 4)
    with pytest.raises(InvalidInputError, match="n_ctx = 8"):
        g.logits(list(range(9)))
    with pytest.raises(InvalidInputError, match="n_ctx"):
        Generator.from_pretrained(FIXTURES / "tiny-gqa-packed", n_ctx=10_000)
    # A prompt that fits generates until the context is full.
    g.generate(list(range(5)), 50)
    assert g.last_stats is not None and g.last_stats.finish_reason == "context"
    assert g.last_stats.new_tokens == 4


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -0.5},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"min_p": -0.1},
        {"min_p": 1.5},
        {"repetition_penalty": 0.0},
        {"repetition_penalty": -1.0},
        {"stop": [""]},
    ],
)
def test_invalid_sampling_values(kwargs: dict[str, object]) -> None:
    g = generator("tiny-gqa-packed")
    with pytest.raises(InvalidInputError):
        g.generate("Hi", 4, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError):  # InvalidInputError is a ValueError
        g.stream("Hi", 4, **kwargs)  # type: ignore[arg-type]


def test_invalid_prompts() -> None:
    g = generator("tiny-gqa-packed")
    with pytest.raises(InvalidInputError, match="no tokens"):
        g.generate([], 4)
    with pytest.raises(InvalidInputError, match="vocabulary"):
        g.generate([1, 512], 4)
    with pytest.raises(InvalidInputError, match="not a valid id"):
        g.generate([1, -3], 4)
    with pytest.raises(InvalidInputError):
        g.generate(3.5, 4)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="max_new_tokens"):
        g.generate("Hi", -1)


def test_repetition_penalty_applies_to_the_history() -> None:
    g = generator("tiny-gqa-packed")
    prompt = g.encode("the the the the")
    s = Session(g.model, threads=1)
    s.prefill(prompt)
    logits = s.last_logits()
    assert logits is not None
    assert s.sample(Sampler(temperature=0.0)) == int(logits.argmax())
    # A huge penalty pushes every token of the history below every unseen one
    # (the best unseen logit of this model is positive).
    unseen = logits.copy()
    unseen[sorted(set(prompt))] = -np.inf
    assert unseen.max() > 0
    assert s.sample(Sampler(temperature=0.0, repetition_penalty=1e6)) == int(unseen.argmax())


def test_chat_reuses_the_cached_history() -> None:
    g = Generator.from_pretrained(FIXTURES / "tiny-gqa-packed", threads=1)
    msgs = [{"role": "user", "content": "Hi!"}]
    reply = g.chat(msgs, 8)
    first = g.last_stats
    assert first is not None and first.prompt_tokens_processed == first.prompt_tokens
    msgs += [{"role": "assistant", "content": reply}, {"role": "user", "content": "More?"}]
    g.chat(msgs, 8)
    second = g.last_stats
    assert second is not None
    # At least the first turn's prompt was reused from the cache.
    assert second.prompt_tokens - second.prompt_tokens_processed >= first.prompt_tokens - 1


def test_on_token_sees_each_token_and_its_logits() -> None:
    g = generator("tiny-mha-packed")
    prompt = g.encode("The quick brown fox")
    seen: list[tuple[int, np.ndarray]] = []
    text = g.generate(prompt, 8, on_token=lambda t, logits: seen.append((t, logits.copy())))
    stats = g.last_stats
    assert stats is not None
    tokens = [t for t, _ in seen]
    assert len(tokens) == stats.new_tokens + (stats.finish_reason == "eos")
    assert text == g.decode([t for t in tokens if t not in g.eos_ids], skip_special_tokens=True)
    full = g.logits(prompt + tokens)  # teacher-forced: row T-1+i predicts token i
    for i, (token, logits) in enumerate(seen):
        assert logits.shape == (g.config.vocab_size,) and logits.dtype == np.float32
        assert token == int(logits.argmax())  # greedy
        np.testing.assert_allclose(logits, full[len(prompt) - 1 + i], atol=1e-4)


def test_on_token_can_stop_the_generation() -> None:
    g = generator("tiny-gqa-packed")
    count = 0

    class Enough(Exception):
        pass

    def hook(token: int, logits: np.ndarray) -> None:
        nonlocal count
        count += 1
        if count == 3:
            raise Enough

    with pytest.raises(Enough):
        g.generate([509], 50, on_token=hook)
    assert count == 3
    assert g.generate([509], 4) == generator("tiny-gqa-sharded").generate([509], 4)


def test_token_bytes_spell_the_text() -> None:
    tok = generator("tiny-gqa-packed").tokenizer
    for case in CASES["encode"]:
        ids = case["ids_no_special"]
        assert b"".join(tok.token_bytes(t) for t in ids) == case["decoded"].encode(), case["text"]
    assert tok.token_bytes(511) == b"<|eot_id|>"
    with pytest.raises(InvalidInputError):
        tok.token_bytes(10_000)


def test_a_callback_may_decline_the_logits() -> None:
    """trit's server watches every token for a client that left, but needs
    the logits only for log-probs: it is spared a [vocab] copy per token."""
    g = generator("tiny-gqa-packed")

    class Watch:
        wants_logits = False

        def __init__(self) -> None:
            self.seen: list[tuple[int, int]] = []

        def __call__(self, token: int, logits: np.ndarray) -> None:
            self.seen.append((token, logits.size))

    watch = Watch()
    g.generate([509], 5, on_token=watch)
    assert len(watch.seen) == 5 and all(size == 0 for _, size in watch.seen)
    watch.wants_logits = True
    watch.seen.clear()
    g.generate([509], 5, on_token=watch)
    assert all(size == g.config.vocab_size for _, size in watch.seen)
