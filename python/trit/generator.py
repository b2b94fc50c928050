"""Text generation with a BitNet b1.58 model.

>>> g = trit.Generator.from_pretrained("microsoft/bitnet-b1.58-2B-4T")  # doctest: +SKIP
>>> g.generate("The capital of France is", max_new_tokens=8)  # doctest: +SKIP

Several prompts run together (one forward pass per step for all of them):

>>> g = trit.Generator.from_pretrained(slots=4)  # doctest: +SKIP
>>> g.generate_batch(["Once upon a time", "The sky is"], max_new_tokens=8)  # doctest: +SKIP
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import numpy.typing as npt

from trit import models, perplexity
from trit._core import Engine, InvalidInputError, Model, ModelConfig, Sampler
from trit.loader import load_model, read_json, resolve
from trit.perplexity import Perplexity
from trit.sampling import SamplingOptions
from trit.tokenizer import Tokenizer

Prompt = Union[str, Sequence[int]]
Message = dict[str, Any]
TokenCallback = Callable[[int, npt.NDArray[np.float32]], None]
"""`on_token(token, logits)`: called once per sampled token (an eos too) with
the logits it was sampled from, float32 [vocab], before any sampling filter."""

_NO_LOGITS: npt.NDArray[np.float32] = np.empty(0, np.float32)
_NO_LOGITS.flags.writeable = False


def _wants_logits(on_token: TokenCallback) -> bool:
    """False for a callback that declares `wants_logits = False` (trit's
    server, when no log-probs were asked for: it only watches for a client
    that left). It then gets an empty array instead of a [vocab] copy per token."""
    return bool(getattr(on_token, "wants_logits", True))


@dataclass(frozen=True)
class GenerationStats:
    """Timings of the last generation."""

    prompt_tokens: int
    """Tokens in the prompt."""
    prompt_tokens_processed: int
    """Of those, tokens actually run (the rest were reused from the cache)."""
    prompt_seconds: float
    new_tokens: int
    """Tokens generated (a final eos is not counted)."""
    decode_seconds: float
    """Time spent after the prompt: one forward pass and one sampling per token."""
    decode_passes: int
    """Forward passes of single tokens (the first new token comes from the prompt pass)."""
    finish_reason: str
    """"eos", "stop" (a stop string), "length" (max_new_tokens), "context" (n_ctx
    full), or, in a `Batch`, "cancelled" and "error"."""

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.prompt_tokens_processed / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_passes / self.decode_seconds if self.decode_seconds else 0.0


def _eos_ids(folder: Path, tokenizer: Tokenizer) -> set[int]:
    """Stop tokens: generation_config.json's eos_token_id, else config.json's;
    a GGUF file's end-of-sequence and end-of-turn ids."""
    if folder.is_file():
        from trit.gguf_tokenizer import stop_ids

        return stop_ids(folder)
    for name in ("generation_config.json", "config.json"):
        path = folder / name
        if path.exists():
            eos = read_json(path).get("eos_token_id")
            if eos is None or eos == []:
                continue
            ids = eos if isinstance(eos, list) else [eos]
            if not all(type(e) is int and 0 <= e < 1 << 32 for e in ids):
                raise InvalidInputError(
                    f"{path}: eos_token_id is {eos!r}; expected a token id or a list of them"
                )
            return set(ids)
    if tokenizer.eos_token is not None:
        eos_id = tokenizer.token_id(tokenizer.eos_token)
        if eos_id is not None:
            return {eos_id}
    return set()


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that could begin a stop string."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return hold


STEP_TOKENS = 256
"""Most tokens one step runs (prompt chunks and decoded tokens together):
the engine's prompt batch, so a prompt alone runs as `Session.prefill` does."""


@dataclass(eq=False)
class Generation:
    """One generation in a `Batch`: its prompt, sampler and stop conditions,
    and what it has produced so far."""

    index: int
    ids: list[int]
    sampler: Sampler
    max_new_tokens: int
    stops: list[str]
    on_token: TokenCallback | None = None
    cancelled: Callable[[], bool] | None = None
    """Polled at every step: once it returns True the sequence ends ("cancelled")."""
    slot: int = -1
    pending: list[int] = field(default_factory=list)
    """Tokens still to run: the rest of the prompt, or the last sampled token."""
    decoding: bool = False
    processed: int = 0
    sampled: int = 0
    new_tokens: int = 0
    passes: int = 0
    text: str = ""
    emitted: int = 0
    t0: float = 0.0
    t1: float = 0.0
    error: BaseException | None = None
    """What ended it with finish reason "error" (an exception of `on_token`)."""
    stats: GenerationStats | None = None
    """Set when it ends."""
    _text_stream: Any = None


class Batch:
    """Sequences running together on one Generator's engine, a step at a
    time: each step is one forward pass over the decoded tokens of the
    running sequences and chunks of the prompts of arriving ones (at most
    `STEP_TOKENS` tokens in all). A sequence holds a slot (its own KV cache)
    from `add` until it ends; `close` ends the rest. The tokens of a sequence
    are those it would get alone: its own sampler, stops and cancellation."""

    def __init__(self, generator: Generator) -> None:
        self._g = generator
        self._running: list[Generation] = []
        self._ended: list[Generation] = []  # ended in `add` (max_new_tokens = 0)
        self.last_step_sequences = 0
        """How many sequences the last step's forward pass ran."""

    def __len__(self) -> int:
        return len(self._running) + len(self._ended)

    @property
    def sequences(self) -> list[Generation]:
        return list(self._running)

    def add(self, seq: Generation) -> None:
        """Starts `seq` in a free slot, reusing the cached start of its prompt
        that any slot holds; an InvalidInputError when no slot is free."""
        g = self._g
        seq.t0 = seq.t1 = time.perf_counter()
        seq._text_stream = g.tokenizer.stream()
        if seq.max_new_tokens == 0:
            self._end(seq, "length")
            self._ended.append(seq)
            return
        with g._lock:
            seq.slot = g._engine.acquire(seq.ids)
            cached = g._engine.n_tokens(seq.slot)
        seq.pending = seq.ids[cached:]
        seq.processed = len(seq.pending)
        self._running.append(seq)

    def step(self) -> list[tuple[Generation, str, bool]]:
        """Runs one step. Returns (sequence, new text, ended) for each
        sequence that produced text or ended; an ended one has its `stats`."""
        events: list[tuple[Generation, str, bool]] = []
        for seq in self._ended:
            events.append((seq, "", True))
        self._ended = []
        for seq in list(self._running):
            if seq.cancelled is not None and seq.cancelled():
                events.append((seq, self._finish(seq, "cancelled"), True))
        work: list[tuple[int, list[int], bool]] = []
        ready: list[Generation] = []
        budget = STEP_TOKENS
        # Decoded tokens first: a running sequence never waits for a prompt.
        for seq in self._running:
            if seq.decoding:
                work.append((seq.slot, seq.pending, True))
                ready.append(seq)
                budget -= 1
        for seq in self._running:
            if seq.decoding or budget <= 0:
                continue
            chunk, seq.pending = seq.pending[:budget], seq.pending[budget:]
            budget -= len(chunk)
            work.append((seq.slot, chunk, not seq.pending))
            if not seq.pending:
                ready.append(seq)
        self.last_step_sequences = len(work)
        if not work:
            return events
        g = self._g
        try:
            with g._lock:
                g._engine.step(work)
        except Exception as exc:  # nothing of this step was computed
            for seq in list(self._running):
                seq.error = exc
                events.append((seq, self._finish(seq, "error"), True))
            return events
        now = time.perf_counter()
        for seq, token in zip(ready, self._sample(ready)):
            if isinstance(token, Exception):
                seq.error = token
                events.append((seq, self._finish(seq, "error"), True))
                continue
            if seq.decoding:
                seq.passes += 1
            else:
                seq.t1 = now
                seq.decoding = True
            piece, ended = self._advance(seq, token)
            if piece or ended:
                events.append((seq, piece, ended))
        return events

    def _sample(self, ready: list[Generation]) -> list[int | Exception]:
        """The next token of each sequence in `ready`, in one call that samples
        them on the engine's threads; if that fails, one by one, so that only
        the sequence whose sampling fails gets the error."""
        g = self._g
        with g._lock:
            try:
                return list(g._engine.sample_many([(seq.slot, seq.sampler) for seq in ready]))
            except Exception:
                pass
            tokens: list[int | Exception] = []
            for seq in ready:
                try:
                    tokens.append(g._engine.sample(seq.slot, seq.sampler))
                except Exception as exc:
                    tokens.append(exc)
            return tokens

    def _advance(self, seq: Generation, token: int) -> tuple[str, bool]:
        """Handles `seq`'s next token, just sampled: (text to emit, ended)."""
        g = self._g
        with g._lock:
            wants = seq.on_token is not None and _wants_logits(seq.on_token)
            logits = g._engine.last_logits(seq.slot) if wants else _NO_LOGITS
            n_tokens = g._engine.n_tokens(seq.slot)
        seq.sampled += 1
        if seq.on_token is not None:
            assert logits is not None  # sample() just used them
            try:
                seq.on_token(token, logits)
            except Exception as exc:
                seq.error = exc
                return self._finish(seq, "error"), True
        if token in g.eos_ids:
            return self._finish(seq, "eos"), True
        seq.new_tokens += 1
        seq.text += seq._text_stream.step(token)
        text, emitted, stops = seq.text, seq.emitted, seq.stops
        cut = min((i for i in (text.find(s, emitted) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            piece = text[emitted:cut]
            seq.emitted = cut
            self._finish(seq, "stop")
            return piece, True
        piece = ""
        safe = len(text) - _held_back(text[emitted:], stops)
        if safe > emitted:
            piece = text[emitted:safe]
            seq.emitted = safe
        if seq.sampled == seq.max_new_tokens:
            return piece + self._finish(seq, "length"), True
        if n_tokens >= g.n_ctx:
            return piece + self._finish(seq, "context"), True
        seq.pending = [token]
        return piece, False

    def _finish(self, seq: Generation, reason: str) -> str:
        """Ends `seq`: frees its slot, sets its stats; returns its held-back text."""
        if seq in self._running:
            self._running.remove(seq)
            with self._g._lock:
                self._g._engine.release(seq.slot)
        return self._end(seq, reason)

    def _end(self, seq: Generation, reason: str) -> str:
        seq.stats = GenerationStats(
            prompt_tokens=len(seq.ids),
            prompt_tokens_processed=seq.processed,
            prompt_seconds=seq.t1 - seq.t0,
            new_tokens=seq.new_tokens,
            decode_seconds=time.perf_counter() - seq.t1,
            decode_passes=seq.passes,
            finish_reason=reason,
        )
        rest = ""
        if reason in ("eos", "length", "context") and len(seq.text) > seq.emitted:
            rest = seq.text[seq.emitted :]
            seq.emitted = len(seq.text)
        return rest

    def close(self) -> None:
        """Ends every running sequence ("cancelled") and frees its slot."""
        for seq in list(self._running):
            self._finish(seq, "cancelled")
        self._ended = []


class Generator:
    """A model, its tokenizer and an engine of `slots` cached sequences.

    Successive calls reuse the cached tokens their prompt starts with (a chat
    history only runs its new turn; a shared system prompt runs once). Each
    generation holds a slot of its own while it runs: two open streams need
    two slots, and one more than there are slots is refused with an
    InvalidInputError. `generate_batch` runs several prompts together.
    Calls from several threads take turns at the engine, step by step.
    """

    def __init__(
        self, model: Model, tokenizer: Tokenizer, engine: Engine, eos_ids: set[int]
    ) -> None:
        self._model = model
        self.tokenizer = tokenizer
        self._engine = engine
        self.eos_ids = frozenset(eos_ids)
        self.last_stats: GenerationStats | None = None
        """Timings and finish reason of the last generation (None before the first)."""
        self.last_batch_stats: list[GenerationStats] = []
        """Of the last `generate_batch` or `stream_batch`, one per prompt."""
        self.generation_defaults = SamplingOptions()
        """The sampling the model's generation_config.json asks for (greedy
        when it asks for none). `generate` and friends stay greedy unless
        told otherwise; `trit generate` and `trit chat` start from these."""
        # One engine call at a time: the engine is borrowed while it computes
        # (with the GIL released), and streams may run in several threads.
        self._lock = threading.Lock()
        self._n_ctx = engine.n_ctx
        self._slots = engine.slots

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path | None = None,
        *,
        threads: int | None = None,
        n_ctx: int | None = None,
        revision: str | None = None,
        head: str = "int8",
        kv_cache: str = "auto",
        packing: str = "i2",
        filename: str | None = None,
        slots: int = 1,
    ) -> Generator:
        """Loads a local folder, a GGUF file or a Hugging Face repo id (with
        GGUF files: `filename` chooses one, needed when there are several, and
        only it is downloaded); with no name, the
        model that ships with trit (`trit.models`). `n_ctx` (default: the
        model's max_position_embeddings) sets the context size; `threads` the
        worker threads (default: TRIT_NUM_THREADS or the physical cores);
        `head` the output head's precision: "int8" (default: half the bytes
        per generated token), "q6" (6-bit rows: 78 % of int8's bytes) or
        "bf16" (as stored: transformers' logits);
        `kv_cache` the KV cache's: "auto" (default: "q8_0" where the model's
        head_dim is a multiple of 32, else "f16"), "q8_0" (blocks of 32 values
        as an f16 scale and int8 codes, llama.cpp's q8_0: 53 % of f16's bytes,
        so generation slows less with depth), "f16" (half the bytes of f32) or
        "f32" (transformers' attention); the `kv_cache` property says which
        it is. With head="bf16" and kv_cache="f32" the logits are
        transformers' own (README, "Precision").
        `packing` stores the ternary weights at "i2" (default: 2 bits per
        weight), "tq1" (1.625 bits: fewer bytes per generated token, more
        decoding work) or "tl" (1.6 bits, read by table lookups on AVX-512
        VBMI CPUs); the same logits.
        `slots` is how many sequences can run at once (each a KV cache of
        `n_ctx` positions, `slot_cache_bytes` when full; memory is taken as
        positions fill)."""
        if name_or_path is None:
            if revision is not None:
                raise InvalidInputError("revision= needs a Hub repo id")
            name_or_path = models.path()
        folder = resolve(name_or_path, revision=revision, filename=filename)
        tokenizer = Tokenizer(folder)
        model = load_model(folder, threads=threads, head=head, packing=packing)
        engine = Engine(model, slots=slots, n_ctx=n_ctx, threads=threads, kv_cache=kv_cache)
        g = cls(model, tokenizer, engine, _eos_ids(folder, tokenizer))
        generation_config = folder / "generation_config.json"
        if generation_config.exists():
            g.generation_defaults = SamplingOptions.from_generation_config(
                read_json(generation_config), source=str(generation_config)
            )
        return g

    @property
    def config(self) -> ModelConfig:
        """The model's hyper-parameters, as config.json gave them."""
        return self._model.config

    @property
    def model(self) -> Model:
        return self._model

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    @property
    def slots(self) -> int:
        """How many sequences can run at once."""
        return self._slots

    @property
    def free_slots(self) -> int:
        with self._lock:
            return self._engine.free_slots

    @property
    def kv_cache(self) -> str:
        """What the KV caches hold: "q8_0", "f16" or "f32" ("auto" resolved)."""
        return self._engine.kv_cache

    @property
    def slot_cache_bytes(self) -> int:
        """Bytes of one slot's KV cache when its n_ctx positions are filled."""
        return self._engine.slot_cache_bytes

    @property
    def cache_bytes_in_use(self) -> int:
        """Bytes of KV cache that hold tokens now, all slots."""
        with self._lock:
            return self._engine.cache_bytes_in_use

    def _in_a_slot(self, run: Callable[[int], Any]) -> Any:
        """`run(slot)` in a slot taken for the call (the engine's lock held)."""
        with self._lock:
            slot = self._engine.acquire([])
            try:
                return run(slot)
            finally:
                self._engine.release(slot)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, with the special tokens (such as BOS) the
        tokenizer adds unless `add_special_tokens` is false."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """The text of token ids; special tokens are kept unless
        `skip_special_tokens`."""
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def logits(self, ids: Sequence[int]) -> npt.NDArray[np.float32]:
        """Logits at every position of `ids`: float32 [len(ids), vocab]."""
        ids = self._ids(ids)
        logits: npt.NDArray[np.float32] = self._in_a_slot(lambda s: self._engine.logits(s, ids))
        return logits

    def perplexity(
        self,
        text: str,
        *,
        ctx: int | None = None,
        stride: int | None = None,
        progress: bool = False,
    ) -> Perplexity:
        """Perplexity of the model over `text` (see `trit.perplexity`): windows
        of `ctx` tokens (default: n_ctx) every `stride` tokens (default: ctx // 2)."""
        ctx = self.n_ctx if ctx is None else ctx
        if ctx > self.n_ctx:
            raise InvalidInputError(f"ctx={ctx} is more than the context size n_ctx = {self.n_ctx}")
        stride = max(ctx // 2, 1) if stride is None else stride
        ids = self.encode(text)

        def nll(window: list[int], first: int) -> float:
            result: float = self._in_a_slot(lambda s: self._engine.nll(s, window, first))
            return result

        return perplexity.compute(ids, nll, ctx=ctx, stride=stride, progress=progress)

    def _ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            ids = self.encode(prompt)
        elif isinstance(prompt, (list, tuple, np.ndarray)):
            if not all(
                isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompt
            ):
                raise InvalidInputError("a token-id prompt must hold only ints")
            ids = [int(t) for t in prompt]
        else:
            raise InvalidInputError(
                f"prompt must be a str or a list of token ids, got {type(prompt).__name__}"
            )
        if not ids:
            raise InvalidInputError("the prompt has no tokens")
        if len(ids) > self.n_ctx:
            raise InvalidInputError(
                f"the prompt has {len(ids)} tokens, more than the context size n_ctx = {self.n_ctx}"
            )
        return ids

    def generate(
        self,
        prompt: Prompt,
        max_new_tokens: int = 256,
        *,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        on_token: TokenCallback | None = None,
        sampling: SamplingOptions | None = None,
    ) -> str:
        """The continuation of `prompt` as text. A str prompt is tokenized as
        the tokenizer says (BOS added); a list of ids is used as given.
        Greedy when temperature is 0. Stops at an eos token, after
        `max_new_tokens`, or before the first `stop` string. `sampling` (a
        `trit.SamplingOptions`) may replace the sampling keywords, from
        `temperature` to `stop`.

        `on_token(token, logits)` is called after each token is sampled, with
        the raw logits (float32 [vocab]) it was drawn from: for log-probs, or
        to stop early, since an exception it raises ends the generation (and
        comes out of this call)."""
        return "".join(
            self.stream(
                prompt,
                max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                min_p=min_p,
                repetition_penalty=repetition_penalty,
                seed=seed,
                stop=stop,
                on_token=on_token,
                sampling=sampling,
            )
        )

    def stream(
        self,
        prompt: Prompt,
        max_new_tokens: int = 256,
        *,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        on_token: TokenCallback | None = None,
        sampling: SamplingOptions | None = None,
    ) -> Iterator[str]:
        """As `generate`, yielding text pieces as they are produced. A piece
        never ends inside a UTF-8 character or inside a possible stop string."""
        keywords = SamplingOptions(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
            stop=stop,
        )
        if sampling is None:
            sampling = keywords
        elif not isinstance(sampling, SamplingOptions):
            raise InvalidInputError(
                f"sampling must be a trit.SamplingOptions, got {type(sampling).__name__}"
            )
        elif keywords != SamplingOptions():
            raise InvalidInputError(
                "give the sampling options as sampling= or as keywords "
                "(temperature=, top_k=, ...), not both"
            )
        _check_max_new_tokens(max_new_tokens)
        if on_token is not None and not callable(on_token):
            raise InvalidInputError(f"on_token must be callable, got {type(on_token).__name__}")
        ids = self._ids(prompt)
        # Validation is done before the first next(): errors surface at the
        # call, not at the first iteration.
        return self._stream(ids, sampling.sampler(), max_new_tokens, list(sampling.stop), on_token)

    def _stream(
        self,
        ids: list[int],
        sampler: Sampler,
        max_new_tokens: int,
        stops: list[str],
        on_token: TokenCallback | None,
    ) -> Iterator[str]:
        self.last_stats = None
        batch = Batch(self)
        seq = Generation(0, ids, sampler, max_new_tokens, stops, on_token)
        batch.add(seq)
        try:
            while len(batch):
                for _, piece, _ in batch.step():
                    if piece:
                        yield piece
        finally:
            batch.close()
        if seq.error is not None:
            raise seq.error
        self.last_stats = seq.stats

    def generate_batch(
        self,
        prompts: Sequence[Prompt],
        max_new_tokens: int = 256,
        **sampling: Any,
    ) -> list[str]:
        """The continuation of each prompt, run together: as many at once as
        there are free slots (the rest wait for one), every step one forward
        pass for all of them. Takes `generate`'s sampling arguments (keywords
        or `sampling=`), the same for every prompt (with a seed, each prompt's
        tokens are those it gets alone with that seed); `on_token` is not
        taken. `last_batch_stats` then holds each prompt's stats."""
        texts = [""] * len(prompts)
        for index, piece in self.stream_batch(prompts, max_new_tokens, **sampling):
            texts[index] += piece
        return texts

    def stream_batch(
        self,
        prompts: Sequence[Prompt],
        max_new_tokens: int = 256,
        **sampling: Any,
    ) -> Iterator[tuple[int, str]]:
        """As `generate_batch`, yielding (prompt index, text piece) as the
        pieces are produced; each prompt's pieces come in order."""
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise InvalidInputError("prompts must be a list of prompts (str or token-id lists)")
        options = self._options(sampling)
        _check_max_new_tokens(max_new_tokens)
        generations = [
            Generation(i, self._ids(p), options.sampler(), max_new_tokens, list(options.stop))
            for i, p in enumerate(prompts)
        ]
        return self._stream_batch(generations)

    def _stream_batch(self, generations: list[Generation]) -> Iterator[tuple[int, str]]:
        self.last_batch_stats = []
        waiting = deque(generations)
        batch = Batch(self)
        try:
            while waiting or len(batch):
                while waiting and (self.free_slots or waiting[0].max_new_tokens == 0):
                    batch.add(waiting.popleft())
                if not len(batch):
                    # Another stream of this Generator holds every slot.
                    batch.add(waiting[0])  # raises the engine's "all slots in use"
                for seq, piece, _ in batch.step():
                    if seq.error is not None:
                        raise seq.error
                    if piece:
                        yield seq.index, piece
        finally:
            batch.close()
        stats = [g.stats for g in generations]
        self.last_batch_stats = [s for s in stats if s is not None]

    def _options(self, sampling: dict[str, Any]) -> SamplingOptions:
        """The sampling options given as keywords or as `sampling=`."""
        if "on_token" in sampling:
            raise InvalidInputError("on_token is not taken by the batch calls")
        options = sampling.pop("sampling", None)
        try:
            keywords = SamplingOptions(**sampling)
        except TypeError as exc:
            raise InvalidInputError(f"unknown sampling argument: {exc}") from exc
        if options is None:
            return keywords
        if not isinstance(options, SamplingOptions):
            raise InvalidInputError(
                f"sampling must be a trit.SamplingOptions, got {type(options).__name__}"
            )
        if keywords != SamplingOptions():
            raise InvalidInputError(
                "give the sampling options as sampling= or as keywords "
                "(temperature=, top_k=, ...), not both"
            )
        return options

    def chat(self, messages: Sequence[Message], max_new_tokens: int = 256, **kwargs: Any) -> str:
        """The assistant's reply to `messages` (dicts with "role" and
        "content"), rendered with the model's chat template. Takes the
        sampling arguments of `generate` (keywords or `sampling=`)."""
        return "".join(self.chat_stream(messages, max_new_tokens, **kwargs))

    def chat_stream(
        self, messages: Sequence[Message], max_new_tokens: int = 256, **kwargs: Any
    ) -> Iterator[str]:
        """As `chat`, yielding the reply's text pieces as they are generated
        (never splitting a UTF-8 character); `last_stats` is set when it ends."""
        ids = self.tokenizer.encode_chat(messages)
        return self.stream(ids, max_new_tokens, **kwargs)

    def reset(self) -> None:
        """Forgets the cached tokens of every slot no generation holds."""
        with self._lock:
            held = []
            try:
                while self._engine.free_slots:
                    slot = self._engine.acquire([])
                    held.append(slot)
                    self._engine.reset(slot)
            finally:
                for slot in held:
                    self._engine.release(slot)


def _check_max_new_tokens(max_new_tokens: Any) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise InvalidInputError("max_new_tokens must be an int")
    if max_new_tokens < 0:
        raise InvalidInputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
