"""SamplingOptions: one checked type for the Generator, the CLI and the server."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
from conftest import generator

from trit import InvalidInputError, SamplingOptions


@pytest.mark.parametrize(
    "field,value",
    [
        ("temperature", -0.5),
        ("temperature", float("nan")),
        ("temperature", "hot"),
        ("temperature", True),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -1),
        ("top_k", 2.0),
        ("top_k", 1 << 63),
        ("min_p", -0.1),
        ("min_p", 1.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", float("inf")),
        ("seed", -1),
        ("seed", 1 << 64),
        ("seed", 1.5),
        ("stop", [""]),
        ("stop", ["ok", 3]),
        ("stop", 3),
    ],
)
def test_a_bad_value_is_refused_naming_its_field(field: str, value: Any) -> None:
    with pytest.raises(InvalidInputError, match=field):
        SamplingOptions(**{field: value})


def test_values_are_normalized_and_frozen() -> None:
    top_k: Any = np.int64(5)  # numpy integers are taken as ints
    o = SamplingOptions(temperature=1, top_k=top_k, seed=(1 << 64) - 1, stop="END")
    assert o.temperature == 1.0 and isinstance(o.temperature, float)
    assert o.top_k == 5 and type(o.top_k) is int
    assert o.stop == ("END",)
    assert SamplingOptions(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingOptions(stop=["a"]) == SamplingOptions(stop=("a",))
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.temperature = 2.0  # type: ignore[misc]


def test_the_generator_takes_options_or_keywords_alike() -> None:
    g = generator("tiny-gqa-packed")
    kw: dict[str, Any] = {"temperature": 0.9, "top_k": 20, "seed": 7, "stop": ["zz"]}
    by_keywords = g.generate([509], 12, **kw)
    assert g.generate([509], 12, sampling=SamplingOptions(**kw)) == by_keywords
    assert "".join(g.stream([509], 12, sampling=SamplingOptions(**kw))) == by_keywords
    msgs = [{"role": "user", "content": "Hi!"}]
    assert g.chat(msgs, 6, sampling=SamplingOptions(**kw)) == g.chat(msgs, 6, **kw)


def test_the_generator_refuses_options_and_keywords_together() -> None:
    g = generator("tiny-gqa-packed")
    with pytest.raises(InvalidInputError, match="not both"):
        g.generate([509], 4, temperature=0.5, sampling=SamplingOptions())
    with pytest.raises(InvalidInputError, match="not both"):
        g.stream([509], 4, stop=["x"], sampling=SamplingOptions(seed=1))
    with pytest.raises(InvalidInputError, match="SamplingOptions"):
        g.generate([509], 4, sampling={"temperature": 0.5})  # type: ignore[arg-type]


def test_generation_config_is_read_as_transformers_reads_it() -> None:
    # Greedy unless do_sample; then transformers' defaults fill the gaps.
    assert SamplingOptions.from_generation_config({}) == SamplingOptions()
    assert SamplingOptions.from_generation_config({"temperature": 0.7}) == SamplingOptions()
    sampled = SamplingOptions.from_generation_config({"do_sample": True, "top_p": 0.9})
    assert (sampled.temperature, sampled.top_k, sampled.top_p, sampled.min_p) == (1.0, 50, 0.9, 0)
    penalized = SamplingOptions.from_generation_config({"repetition_penalty": 1.3})
    assert penalized.temperature == 0 and penalized.repetition_penalty == 1.3


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"do_sample": "true"}, "do_sample"),
        ({"do_sample": True, "top_p": 2}, "top_p"),
        ({"do_sample": True, "temperature": "hot"}, "temperature"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
    ],
)
def test_a_bad_generation_config_names_the_file_and_field(config: dict, field: str) -> None:
    with pytest.raises(InvalidInputError, match=rf"^gen\.json: {field}"):
        SamplingOptions.from_generation_config(config, source="gen.json")
