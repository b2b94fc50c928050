"""Several sequences on one Generator: `generate_batch`, `stream_batch`,
streams that each hold a slot, and prefix reuse across sequences, on a
fixture model. A sequence's tokens must not depend on its company."""

from __future__ import annotations

from functools import cache
from types import GeneratorType

import pytest
from conftest import FIXTURES

from trit import Generator, InvalidInputError, SamplingOptions

MODEL = FIXTURES / "tiny-gqa-packed"
PROMPTS = [
    "Once upon a time",
    "The fortune cookie says",
    "Hello",
    "A long time ago, in a galaxy far, far away, there was",
    "Why?",
]


@cache
def slotted(slots: int) -> Generator:
    return Generator.from_pretrained(MODEL, threads=2, slots=slots)


def alone(prompt: str | list[int], n: int, **sampling: object) -> str:
    """The continuation from a Generator of one slot, emptied first."""
    g = slotted(1)
    g.reset()
    return g.generate(prompt, n, **sampling)  # type: ignore[arg-type]


@pytest.mark.parametrize("slots", [2, 5])
def test_greedy_batch_equals_each_prompt_alone(slots: int) -> None:
    # With 2 slots the other prompts wait and join as slots free up: every
    # step mixes prompts and decoded tokens differently.
    g = slotted(slots)
    got = g.generate_batch(PROMPTS, 24)
    assert got == [alone(p, 24) for p in PROMPTS]
    assert len(g.last_batch_stats) == len(PROMPTS)
    for stats, prompt in zip(g.last_batch_stats, PROMPTS):
        assert stats.prompt_tokens == len(g.encode(prompt))
        assert stats.finish_reason in ("length", "eos")


def test_seeded_sampling_in_a_batch_equals_alone() -> None:
    opts = SamplingOptions(temperature=0.9, top_p=0.95, seed=11)
    got = slotted(5).generate_batch(PROMPTS, 20, sampling=opts)
    assert got == [alone(p, 20, sampling=opts) for p in PROMPTS]
    # The seed matters: a different one changes some continuation.
    other = slotted(5).generate_batch(PROMPTS, 20, temperature=0.9, top_p=0.95, seed=12)
    assert other != got


def test_stream_batch_yields_each_prompt_in_order_and_interleaved() -> None:
    g = slotted(5)
    pieces = list(g.stream_batch(PROMPTS[:3], 16))
    texts = ["", "", ""]
    for index, piece in pieces:
        assert piece
        texts[index] += piece
    assert texts == g.generate_batch(PROMPTS[:3], 16)
    # They ran together: the first pieces come from different prompts.
    first = [index for index, _ in pieces[:6]]
    assert len(set(first)) > 1, pieces


def test_batch_arguments_are_checked_at_the_call() -> None:
    g = slotted(2)
    with pytest.raises(InvalidInputError, match="list of prompts"):
        g.stream_batch("one prompt", 4)
    with pytest.raises(InvalidInputError, match="temperature"):
        g.generate_batch(PROMPTS, 4, temperature=-1)
    with pytest.raises(InvalidInputError, match="on_token"):
        g.generate_batch(PROMPTS, 4, on_token=print)
    with pytest.raises(InvalidInputError, match="max_new_tokens"):
        g.generate_batch(PROMPTS, -1)
    assert g.generate_batch(PROMPTS[:2], 0) == ["", ""]
    assert g.generate_batch([], 4) == []


def test_two_streams_hold_two_slots_and_a_third_is_refused() -> None:
    g = slotted(2)
    a = g.stream(PROMPTS[0], 12)
    b = g.stream(PROMPTS[1], 12)
    # Interleaved pieces: each stream continues in its own cache.
    texts = [next(a), next(b)]
    with pytest.raises(InvalidInputError, match="all 2 sequence slots are in use"):
        next(g.stream(PROMPTS[2], 4))
    texts[0] += "".join(a)
    texts[1] += "".join(b)
    assert texts == [alone(PROMPTS[0], 12), alone(PROMPTS[1], 12)]
    # Both slots are free again.
    assert g.free_slots == 2
    assert g.generate(PROMPTS[2], 4) == alone(PROMPTS[2], 4)


def test_a_closed_stream_frees_its_slot() -> None:
    g = slotted(2)
    s = g.stream(PROMPTS[0], 50)
    assert isinstance(s, GeneratorType)
    next(s)
    assert g.free_slots == 1
    s.close()
    assert g.free_slots == 2


def test_a_new_sequence_reuses_a_prefix_another_one_computed() -> None:
    g = slotted(2)
    g.reset()
    system = g.encode("You are a fortune teller. Tell the future in one line.")
    first = g.stream([*system, *g.encode("Me?", add_special_tokens=False)], 30)
    assert isinstance(first, GeneratorType)
    next(first)  # its prompt has run, and it still holds its slot
    second = [*system, *g.encode("And you?", add_special_tokens=False)]
    text = g.generate(second, 8)
    stats = g.last_stats
    assert stats is not None
    assert stats.prompt_tokens_processed == len(second) - len(system)
    first.close()
    assert text == alone(second, 8)
    # The next turn of the same sequence runs only its new tokens.
    g.generate(second, 8)
    assert g.last_stats is not None and g.last_stats.prompt_tokens_processed == 1


@pytest.mark.parametrize(
    "name", ["tiny-mha-packed", "tiny-falcon3-1.58bit", "tiny-falcon-e", "tiny-1bitllm"]
)
def test_every_family_batches_as_it_runs_alone(name: str) -> None:
    folder = FIXTURES / name
    batched = Generator.from_pretrained(folder, threads=2, slots=3)
    single = Generator.from_pretrained(folder, threads=2)
    prompts = PROMPTS[:3]
    assert batched.generate_batch(prompts, 10) == [single.generate(p, 10) for p in prompts]
