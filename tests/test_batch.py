"""Several sequences on one Generator: `generate_batch`, `stream_batch`,
streams that each hold a slot, and prefix reuse across sequences, on a
fixture model. A sequence's tokens must not depend on its company."""

from __future__ import annotations

from functools import cache
from types import GeneratorType
from typing import Any

import pytest
from conftest import FIXTURES

from trit import Generator, InvalidInputError, SamplingOptions
from trit._core import Sampler
from trit.generator import Batch, Generation

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


def test_a_batch_samples_every_sequence_in_one_call_as_one_by_one() -> None:
    """`Engine.sample_many` draws on the engine's threads what `sample` draws
    pair after pair: greedy and seeded samplers, the same slot twice."""
    g = Generator.from_pretrained(MODEL, threads=2, slots=3)
    engine = g._engine
    slots = [engine.acquire([]) for _ in range(3)]
    engine.step([(s, g.encode(p), True) for s, p in zip(slots, PROMPTS)])
    options: list[dict[str, Any]] = [
        {},
        {"temperature": 0.9, "top_p": 0.9},
        {"temperature": 1.2, "top_k": 8, "repetition_penalty": 1.3},
    ]

    def samplers(seed: int) -> list[Sampler]:
        return [
            SamplingOptions(**options[o], seed=seed + i).sampler()
            for i, (_, o) in enumerate(requests)
        ]

    requests = [(slots[i % 3], i % 3) for i in range(4)]  # slot 0 twice
    for seed in range(5):
        together, apart = samplers(seed), samplers(seed)
        for _ in range(3):
            got = engine.sample_many([(s, smp) for (s, _), smp in zip(requests, together)])
            assert got == [engine.sample(s, smp) for (s, _), smp in zip(requests, apart)]


class _SamplingFailsIn:
    """An engine whose sampling fails in one slot, as NaN logits would."""

    def __init__(self, engine: object, slot: int) -> None:
        self._engine, self._slot = engine, slot

    def __getattr__(self, name: str) -> object:
        return getattr(self._engine, name)

    def sample_many(self, requests: list[tuple[int, object]]) -> list[int]:
        if any(s == self._slot for s, _ in requests):
            raise InvalidInputError("every logit is NaN")
        return self._engine.sample_many(requests)  # type: ignore[attr-defined]

    def sample(self, slot: int, sampler: object) -> int:
        if slot == self._slot:
            raise InvalidInputError("every logit is NaN")
        return self._engine.sample(slot, sampler)  # type: ignore[attr-defined]


def test_a_sequence_whose_sampling_fails_ends_alone_with_the_error() -> None:
    g = Generator.from_pretrained(MODEL, threads=1, slots=2)
    want = alone(PROMPTS[0], 6)
    batch = Batch(g)
    seqs = [
        Generation(i, g.encode(p), SamplingOptions().sampler(), 6, [])
        for i, p in enumerate(PROMPTS[:2])
    ]
    for seq in seqs:
        batch.add(seq)
    g._engine = _SamplingFailsIn(g._engine, seqs[1].slot)  # type: ignore[assignment]
    text = {0: "", 1: ""}
    while len(batch):
        for seq, piece, _ in batch.step():
            text[seq.index] += piece
    assert seqs[1].stats is not None and seqs[1].stats.finish_reason == "error"
    assert isinstance(seqs[1].error, InvalidInputError)
    assert seqs[0].error is None and text[0] == want
