"""How the next token is chosen: one options type that the Generator, the
`trit` command and the server all take.

>>> opts = trit.SamplingOptions(temperature=0.7, top_p=0.9, seed=1)  # doctest: +SKIP
>>> g.generate("Once upon a time", 32, sampling=opts)  # doctest: +SKIP
"""

from __future__ import annotations

import numbers
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from trit._core import InvalidInputError, Sampler

_SEED_LIMIT = 1 << 64


@dataclass(frozen=True)
class SamplingOptions:
    """Sampling settings, checked when made: a wrong type or value raises
    `trit.InvalidInputError` naming the field. The defaults are greedy
    decoding with no stop string."""

    temperature: float = 0.0
    """0 is greedy: always the most likely token."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0: off."""
    top_p: float = 1.0
    """Keep the most likely tokens whose probabilities sum to top_p, in (0, 1]; 1: off."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the most likely one, in [0, 1]; 0: off."""
    repetition_penalty: float = 1.0
    """> 0: divides the positive logits (multiplies the negative ones) of
    tokens already in the sequence, as transformers; 1: off."""
    seed: int | None = None
    """0 <= seed < 2**64; None: a fresh random seed for every generation."""
    stop: Sequence[str] | str = ()
    """Texts before which generation ends (they are not output); a str is one
    stop string. Kept as a tuple."""

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise InvalidInputError(f"{name} must be a number, got {type(value).__name__}")
            try:
                object.__setattr__(self, name, float(value))
            except OverflowError:
                raise InvalidInputError(f"{name} is too large for a float") from None
        object.__setattr__(self, "top_k", _integer("top_k", self.top_k, 0, 1 << 63))
        if self.seed is not None:
            object.__setattr__(self, "seed", _integer("seed", self.seed, 0, _SEED_LIMIT))
        stops = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stops, Iterable):
            raise InvalidInputError(f"stop must be a str or a list of str, got {self.stop!r}")
        stops = tuple(stops)
        if not all(isinstance(s, str) and s for s in stops):
            raise InvalidInputError(f"stop strings must be non-empty str, got {self.stop!r}")
        object.__setattr__(self, "stop", stops)
        # The ranges are the engine's to check (its messages name the field):
        # one definition for every caller of the sampler.
        self._sampler(0)

    @classmethod
    def from_generation_config(
        cls, config: Mapping[str, Any], *, source: str = "generation_config.json"
    ) -> SamplingOptions:
        """The sampling a model's generation_config.json asks for, read as
        transformers reads it: greedy unless `do_sample` is true, and then
        `temperature` (default 1), `top_k` (50), `top_p` (1) and `min_p`
        (off); `repetition_penalty` (1) applies either way. A field of the
        wrong type or range raises `InvalidInputError` naming `source` and
        the field."""
        do_sample = config.get("do_sample", False)
        if not isinstance(do_sample, bool):
            raise InvalidInputError(f"{source}: do_sample must be true or false, got {do_sample!r}")
        defaults = {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": None}
        fields: dict[str, Any] = {}
        if do_sample:
            for name, default in defaults.items():
                value = config.get(name, default)
                if value is not None:
                    fields[name] = value
        penalty = config.get("repetition_penalty")
        if penalty is not None:
            fields["repetition_penalty"] = penalty
        try:
            return cls(**fields)
        except InvalidInputError as exc:
            raise InvalidInputError(f"{source}: {exc}") from None

    def sampler(self) -> Sampler:
        """The engine's sampler for one generation (seeded at random when
        `seed` is None)."""
        return self._sampler(secrets.randbits(64) if self.seed is None else self.seed)

    def _sampler(self, seed: int) -> Sampler:
        return Sampler(
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            seed=seed,
        )


def _integer(name: str, value: Any, lo: int, hi: int) -> int:
    """`value` as an int in [lo, hi), or an error naming `name`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidInputError(f"{name} must be an integer, got {type(value).__name__}")
    n = int(value)
    # Python refuses to print ints of more than 4300 digits.
    shown = str(n) if n.bit_length() < 256 else f"an integer of {n.bit_length()} bits"
    if n < lo:
        raise InvalidInputError(f"{name} must be >= {lo}, got {shown}")
    if n >= hi:
        raise InvalidInputError(f"{name} must be < 2**{hi.bit_length() - 1}, got {shown}")
    return n
