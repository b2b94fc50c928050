"""Text generation with a BitNet b1.58 model.

>>> g = trit.Generator.from_pretrained("microsoft/bitnet-b1.58-2B-4T")  # doctest: +SKIP
>>> g.generate("The capital of France is", max_new_tokens=8)  # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import numpy.typing as npt

from trit import models, perplexity
from trit._core import InvalidInputError, Model, ModelConfig, Sampler, Session
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
    """"eos", "stop" (a stop string), "length" (max_new_tokens) or "context" (n_ctx full)."""

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
            if isinstance(eos, int):
                return {eos}
            if isinstance(eos, list) and eos:
                return {int(e) for e in eos}
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


class Generator:
    """A model, its tokenizer and one cached sequence.

    Successive calls reuse the cached tokens their prompt starts with (a chat
    history only runs its new turn). Not safe to use from several threads at
    once; make one Generator per thread.
    """

    def __init__(
        self, model: Model, tokenizer: Tokenizer, session: Session, eos_ids: set[int]
    ) -> None:
        self._model = model
        self.tokenizer = tokenizer
        self._session = session
        self.eos_ids = frozenset(eos_ids)
        self.last_stats: GenerationStats | None = None
        """Timings and finish reason of the last generation (None before the first)."""
        self.generation_defaults = SamplingOptions()
        """The sampling the model's generation_config.json asks for (greedy
        when it asks for none). `generate` and friends stay greedy unless
        told otherwise; `trit generate` and `trit chat` start from these."""
        # Read once: the session is borrowed while it computes (with the GIL
        # released), and other threads may still ask for n_ctx meanwhile.
        self._n_ctx = session.n_ctx

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path | None = None,
        *,
        threads: int | None = None,
        n_ctx: int | None = None,
        revision: str | None = None,
        head: str = "int8",
        kv_cache: str = "f16",
        filename: str | None = None,
    ) -> Generator:
        """Loads a local folder, a GGUF file or a Hugging Face repo id (with
        GGUF files: `filename` chooses one, needed when there are several, and
        only it is downloaded); with no name, the
        model that ships with trit (`trit.models`). `n_ctx` (default: the
        model's max_position_embeddings) sets the context size; `threads` the
        worker threads (default: TRIT_NUM_THREADS or the physical cores);
        `head` the output head's precision: "int8" (default: half the bytes
        per generated token) or "bf16" (as stored: transformers' logits);
        `kv_cache` the KV cache's: "f16" (default: half the bytes attention
        reads) or "f32" (transformers' attention). With head="bf16" and
        kv_cache="f32" the logits are transformers' own (README, "Precision")."""
        if name_or_path is None:
            if revision is not None:
                raise InvalidInputError("revision= needs a Hub repo id")
            name_or_path = models.path()
        folder = resolve(name_or_path, revision=revision, filename=filename)
        tokenizer = Tokenizer(folder)
        model = load_model(folder, threads=threads, head=head)
        session = Session(model, n_ctx=n_ctx, threads=threads, kv_cache=kv_cache)
        g = cls(model, tokenizer, session, _eos_ids(folder, tokenizer))
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
        return self._session.logits(self._ids(ids))

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
        return perplexity.compute(ids, self._session.nll, ctx=ctx, stride=stride, progress=progress)

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
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise InvalidInputError("max_new_tokens must be an int")
        if max_new_tokens < 0:
            raise InvalidInputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
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
        session = self._session
        self.last_stats = None
        t0 = time.perf_counter()
        processed = session.prefill(ids) if max_new_tokens else 0
        t1 = time.perf_counter()
        text_stream = self.tokenizer.stream()
        text, emitted, new_tokens, passes = "", 0, 0, 0
        finish = "length"
        wants_logits = on_token is not None and _wants_logits(on_token)
        for step in range(max_new_tokens):
            token = session.sample(sampler)
            if on_token is not None:
                logits = session.last_logits() if wants_logits else _NO_LOGITS
                assert logits is not None  # sample() just used them
                on_token(token, logits)
            if token in self.eos_ids:
                finish = "eos"
                break
            new_tokens += 1
            text += text_stream.step(token)
            cut = min((i for i in (text.find(s, emitted) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                if cut > emitted:
                    yield text[emitted:cut]
                emitted = cut
                finish = "stop"
                break
            safe = len(text) - _held_back(text[emitted:], stops)
            if safe > emitted:
                yield text[emitted:safe]
                emitted = safe
            if step + 1 == max_new_tokens:
                break
            if session.n_tokens >= self._n_ctx:
                finish = "context"
                break
            session.push(token)
            passes += 1
        if finish != "stop" and len(text) > emitted:
            yield text[emitted:]
        self.last_stats = GenerationStats(
            prompt_tokens=len(ids),
            prompt_tokens_processed=processed,
            prompt_seconds=t1 - t0,
            new_tokens=new_tokens,
            decode_seconds=time.perf_counter() - t1,
            decode_passes=passes,
            finish_reason=finish,
        )

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
        """Forgets the cached tokens."""
        self._session.reset()
