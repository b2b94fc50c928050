"""The `trit` command: `trit generate`, `chat`, `perplexity`, `bench`, `serve` and `batch`.

Each subcommand is a function taking the parsed arguments; a new one adds a
parser in `_parser` and a function here.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import secrets
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from trit import models
from trit._core import InvalidInputError, TritError, __version__
from trit.generator import Generator, Message
from trit.sampling import SamplingOptions


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an int >= `minimum`. Checked here, argparse's error
    names the flag the user typed (-t/--threads), not an API keyword."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-m",
        "--model",
        help="model folder, GGUF file or Hugging Face repo id (default: the bundled model)",
    )
    p.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    p.add_argument("--gguf-file", help="which GGUF file of a folder or Hub repo to load")
    p.add_argument(
        "-t", "--threads", type=_at_least(1), help="worker threads (default: physical cores)"
    )
    p.add_argument(
        "-c",
        "--ctx",
        "--n-ctx",
        type=_at_least(1),
        help="context size (default: the model's maximum)",
    )
    _add_precision_args(p)


def _add_precision_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--head",
        choices=["int8", "bf16", "q6"],
        default="int8",
        help="output head precision: int8 (default, half the bytes per token), q6 (6-bit "
        "rows, 78%% of int8's bytes) or bf16 (as stored: transformers' exact logits)",
    )
    p.add_argument(
        "--kv-cache",
        choices=["auto", "q8_0", "f16", "f32"],
        default="auto",
        help="KV cache precision: auto (default: q8_0 where head_dim is a multiple of 32, "
        "else f16), q8_0 (8-bit blocks as llama.cpp's -ctk/-ctv q8_0: 53%% of f16's bytes, "
        "generation at depth slows half as much), f16 (half the bytes of f32) or f32 (exact: "
        "transformers' attention)",
    )
    p.add_argument(
        "--packing",
        choices=["i2", "tq1", "tl"],
        default="i2",
        help="ternary weight packing: i2 (default, 2 bits per weight), tq1 (1.625 bits: "
        "19 %% fewer bytes per token, more decoding work) or tl (1.6 bits, read by table "
        "lookups: on AVX-512 VBMI CPUs faster generation of one sequence, slower prompts "
        "and batches); the same logits",
    )


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--max-new-tokens", type=_at_least(0), default=256, help="default: 256")
    # Unset sampling flags take the model's generation_config.json values
    # (greedy when it asks for no sampling), as transformers does.
    defaults = "default: the model's generation_config.json"
    p.add_argument("--temp", type=float, help=f"temperature, 0 is greedy ({defaults})")
    p.add_argument("--top-k", type=int, help=f"0: off ({defaults})")
    p.add_argument("--top-p", type=float, help=f"1: off ({defaults})")
    p.add_argument("--min-p", type=float, help=f"0: off ({defaults})")
    p.add_argument("--repeat-penalty", type=float, help=f"1: off ({defaults})")
    p.add_argument("--seed", type=int, help="random seed (default: random, printed when sampling)")


# Each sampling flag and the SamplingOptions field it sets.
_SAMPLING_FLAGS = {
    "temperature": ("--temp", "temp"),
    "top_k": ("--top-k", "top_k"),
    "top_p": ("--top-p", "top_p"),
    "min_p": ("--min-p", "min_p"),
    "repetition_penalty": ("--repeat-penalty", "repeat_penalty"),
    "seed": ("--seed", "seed"),
}


class _FlagError(Exception):
    """A command-line value the engine refuses, with the flag that gave it."""


def _given_sampling(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling flags given on the command line, each checked on its own
    so that an error names the flag the user typed."""
    given = {}
    for field, (flag, dest) in _SAMPLING_FLAGS.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        try:
            SamplingOptions(**{field: value})
        except InvalidInputError as exc:
            raise _FlagError(f"argument {flag}: {exc}") from None
        given[field] = value
    return given


def _sampling(args: argparse.Namespace, g: Generator) -> SamplingOptions:
    """The model's generation defaults with the given flags on top; when it
    samples without a --seed, a seed is drawn and printed so the run can be
    repeated."""
    options = dataclasses.replace(g.generation_defaults, **_given_sampling(args))
    if options.temperature > 0 and options.seed is None:
        options = dataclasses.replace(options, seed=secrets.randbits(63))
        print(f"(sampling with seed {options.seed}; --seed repeats it)", file=sys.stderr)
    return options


def _load(args: argparse.Namespace, slots: int = 1) -> Generator:
    return Generator.from_pretrained(
        args.model,
        threads=args.threads,
        n_ctx=args.ctx,
        revision=args.revision,
        head=args.head,
        kv_cache=args.kv_cache,
        packing=args.packing,
        filename=args.gguf_file,
        slots=slots,
    )


AUTO_PARALLEL = 8
"""`trit serve`'s most slots by default: past about 8 sequences a step is
compute-bound (docs/performance.md), and each slot costs KV memory."""

MAX_PARALLEL = 256
"""The engine's limit on slots."""


def _available_memory() -> int | None:
    """Bytes the system can still give (MemAvailable on Linux), if known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def fit_slots(requested: int | None, g: Generator) -> int:
    """How many requests run at once: `requested` (`--parallel`), or as many
    slots as fit in the memory left (at most AUTO_PARALLEL). A ValueError
    saying why when the slots asked for cannot fit, each slot's KV cache
    being able to grow to its full n_ctx. `trit serve` and each replica of
    `trit serve --ray` decide this on their own machine."""
    per_slot = g.slot_cache_bytes
    available = _available_memory()
    if requested is None:
        fit = AUTO_PARALLEL if available is None else available // per_slot
        return max(1, min(AUTO_PARALLEL, fit))
    if available is not None and requested * per_slot > available:
        raise ValueError(
            f"--parallel {requested} needs up to "
            f"{requested * per_slot / 2**20:.0f} MiB of KV cache "
            f"({per_slot / 2**20:.0f} MiB a slot at n_ctx {g.n_ctx}), "
            f"and {available / 2**20:.0f} MiB are available: lower --parallel or --ctx"
        )
    return requested


def _serve_slots(args: argparse.Namespace, g: Generator) -> int | None:
    """`fit_slots` for --parallel; None (after printing why) when they cannot fit."""
    try:
        return fit_slots(args.parallel, g)
    except ValueError as exc:
        print(f"trit: error: {exc}", file=sys.stderr)
        return None


def _print_stream(pieces: Iterable[str]) -> str:
    out = []
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
        out.append(piece)
    return "".join(out)


def _report(g: Generator) -> None:
    s = g.last_stats
    if s is None:
        return
    print(
        f"\nprompt: {s.prompt_tokens} tokens ({s.prompt_tokens_processed} processed) in "
        f"{s.prompt_seconds:.3f} s, {s.prompt_tokens_per_s:.1f} tokens/s\n"
        f"generation: {s.new_tokens} tokens in {s.decode_seconds:.3f} s, "
        f"{s.decode_tokens_per_s:.1f} tokens/s ({s.finish_reason})",
        file=sys.stderr,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    _given_sampling(args)  # flags checked before the model loads
    g = _load(args)
    sampling = _sampling(args, g)
    _print_stream(g.stream(args.prompt, args.max_new_tokens, sampling=sampling))
    sys.stdout.write("\n")
    _report(g)
    return 0


def _fit_context(
    g: Generator, history: list[Message], n_system: int, reply_room: int
) -> tuple[list[Message], list[int], int]:
    """The conversation to send: `history` without its oldest exchanges (a user
    message and its reply; never the system message, never the newest message)
    until the rendered prompt leaves `reply_room` tokens of the context free.
    Returns the kept messages, their prompt ids and how many exchanges went."""
    kept = list(history)
    dropped = 0
    while True:
        ids = g.tokenizer.encode_chat(kept)
        if len(ids) + reply_room <= g.n_ctx or len(kept) - n_system <= 1:
            return kept, ids, dropped
        del kept[n_system : n_system + 2]
        dropped += 1


def cmd_chat(args: argparse.Namespace) -> int:
    _given_sampling(args)  # flags checked before the model loads
    g = _load(args)
    sampling = _sampling(args, g)
    system: list[Message] = [{"role": "system", "content": args.system}] if args.system else []
    history = list(system)
    # Room kept free for a reply when old turns have to go: a reply cut after a
    # few tokens by a full context would be worse than forgetting a turn.
    reply_room = min(args.max_new_tokens, g.n_ctx // 4)
    interactive = sys.stdin.isatty()
    if interactive:
        print(
            "trit chat: /reset clears the history, Ctrl-C stops a reply, Ctrl-D leaves.",
            file=sys.stderr,
        )
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            if interactive:
                print(file=sys.stderr)
            return 0
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            history = list(system)
            g.reset()
            print("(history cleared)", file=sys.stderr)
            continue
        try:
            kept, ids, dropped = _fit_context(
                g, [*history, {"role": "user", "content": text}], len(system), reply_room
            )
        except InvalidInputError as exc:  # the model's chat template refused to render
            print(f"(not sent: {exc})", file=sys.stderr)
            continue
        if len(ids) >= g.n_ctx:
            what = "this message and the system message take" if system else "this message takes"
            print(
                f"(not sent: {what} {len(ids)} tokens, the context holds {g.n_ctx}; "
                "write a shorter one, or /reset to start over)",
                file=sys.stderr,
            )
            continue
        if dropped:
            print(
                f"(the context holds {g.n_ctx} tokens: forgot the oldest "
                f"{'exchange' if dropped == 1 else f'{dropped} exchanges'})",
                file=sys.stderr,
            )
        history = kept
        pieces: list[str] = []
        try:
            for piece in g.stream(ids, args.max_new_tokens, sampling=sampling):
                sys.stdout.write(piece)
                sys.stdout.flush()
                pieces.append(piece)
        except KeyboardInterrupt:
            sys.stdout.write("\n")
            print("(reply stopped)", file=sys.stderr)
            if pieces:
                history.append({"role": "assistant", "content": "".join(pieces)})
            else:
                history.pop()  # nothing was said: forget the question too
            continue
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(pieces)})
        if g.last_stats is not None and g.last_stats.finish_reason == "context":
            print(f"(reply cut: the context of {g.n_ctx} tokens is full)", file=sys.stderr)
        if args.verbose:
            _report(g)


def _int_list(text: str) -> list[int]:
    """`1,2,4` -> [1, 2, 4] (llama-bench's list syntax)."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def cmd_perplexity(args: argparse.Namespace) -> int:
    try:
        text = Path(args.file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        print(f"trit perplexity: error: cannot read {args.file}: {exc}", file=sys.stderr)
        return 2
    g = _load(args)
    result = g.perplexity(text, ctx=args.ctx, stride=args.stride, progress=sys.stderr.isatty())
    print(
        f"perplexity {result.ppl:.4f} over {result.n_tokens} tokens "
        f"(mean NLL {result.nll:.5f} nats, window {result.ctx}, stride {result.stride})"
    )
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from trit.gguf_export import write_gguf
    from trit.loader import load_model, resolve
    from trit.safetensors_export import write_safetensors

    out = Path(args.output)
    to = args.to or ("gguf" if out.suffix.lower() == ".gguf" else "safetensors")
    if to == "gguf" and out.suffix.lower() != ".gguf":
        print("trit convert: error: --to gguf needs -o to name a .gguf file", file=sys.stderr)
        return 2
    if to == "safetensors" and out.exists() and not out.is_dir():
        print("trit convert: error: --to safetensors needs -o to name a folder", file=sys.stderr)
        return 2
    source = resolve(args.model or models.path(), revision=args.revision, filename=args.gguf_file)
    # The bf16 head keeps the embedding's stored values (the int8 one would not).
    model = load_model(source, threads=args.threads, head="bf16")
    if to == "gguf":
        write_gguf(model, source, out, args.type)
        print(f"wrote {out} ({args.type}, {out.stat().st_size / 1e6:.1f} MB)", file=sys.stderr)
    else:
        write_safetensors(model, source, out)
        print(f"wrote {out}/ (safetensors, packed)", file=sys.stderr)
    return 0


# Flags of `trit bench --server` alone (their defaults are None).
SERVER_ONLY_BENCH_FLAGS = {
    "clients": "--clients",
    "requests": "--requests",
    "timeout": "--timeout",
    "api_key": "--api-key",
}


def _bench_flags_given(args: argparse.Namespace, flags: dict[str, str]) -> list[str]:
    """The flags (of `flags`: dest -> flag) given on the command line: their
    defaults are None, so that a mode they do not apply to can refuse them."""
    return [flag for dest, flag in flags.items() if getattr(args, dest) is not None]


def cmd_bench(args: argparse.Namespace) -> int:
    import json

    from trit import bench

    if args.server is not None:
        return _bench_server(args)
    if args.model is not None and args.synthetic is not None:
        print("trit bench: error: give -m MODEL or --synthetic NAME, not both", file=sys.stderr)
        return 2
    if args.model is None and args.synthetic is None:
        args.model = str(models.path())
    if args.batch is not None:
        return _bench_batch(args)
    misplaced = _bench_flags_given(args, SERVER_ONLY_BENCH_FLAGS)
    if misplaced:
        print(f"trit bench: error: {misplaced[0]} needs --server URL", file=sys.stderr)
        return 2
    try:
        results = bench.run(
            args.model,
            synthetic_name=args.synthetic,
            n_prompt=[128] if args.n_prompt is None else args.n_prompt,
            n_gen=[128] if args.n_gen is None else args.n_gen,
            threads=args.threads or bench.env_threads(),
            depths=[0] if args.depths is None else args.depths,
            repetitions=5 if args.repetitions is None else args.repetitions,
            head=args.head,
            kv_cache=args.kv_cache,
            packing=args.packing,
            progress=None if args.json else (lambda msg: print(f"[{msg}]", file=sys.stderr)),
        )
    except ValueError as exc:
        if isinstance(exc, TritError):
            raise
        print(f"trit bench: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([r.to_json() for r in results], indent=2))
    else:
        print(bench.markdown(results))
    return 0


def _bench_batch(args: argparse.Namespace) -> int:
    """`trit bench --batch 1,2,4`: batched decoding (trit.bench_batch)."""
    import json

    from trit import bench_batch

    misplaced = _bench_flags_given(
        args,
        {"depths": "-d", **SERVER_ONLY_BENCH_FLAGS},
    )
    if misplaced:
        print(f"trit bench: error: {misplaced[0]} does not apply to --batch", file=sys.stderr)
        return 2
    for flag, values in (("-p", args.n_prompt), ("-n", args.n_gen)):
        if values is not None and len(values) != 1:
            print(f"trit bench: error: {flag} takes one value with --batch", file=sys.stderr)
            return 2
    say = None if args.json else (lambda msg: print(f"[{msg}]", file=sys.stderr))
    results = []
    try:
        for threads in args.threads or [None]:
            results.append(
                bench_batch.run(
                    args.model,
                    synthetic_name=args.synthetic,
                    batches=args.batch,
                    n_prompt=args.n_prompt[0] if args.n_prompt else 128,
                    n_gen=args.n_gen[0] if args.n_gen else 32,
                    threads=threads,
                    head=args.head,
                    kv_cache=args.kv_cache,
                    packing=args.packing,
                    repetitions=(
                        bench_batch.DEFAULT_REPETITIONS
                        if args.repetitions is None
                        else args.repetitions
                    ),
                    progress=say,
                )
            )
    except ValueError as exc:
        if isinstance(exc, TritError):
            raise
        print(f"trit bench: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([r.to_json() for rows in results for r in rows], indent=2))
    else:
        print("\n\n".join(bench_batch.markdown(rows) for rows in results))
    return 0


def _bench_server(args: argparse.Namespace) -> int:
    """`trit bench --server URL`: a load test of a running trit serve (trit.bench_server)."""
    import json

    from trit import bench_server

    misplaced = _bench_flags_given(
        args,
        {
            "model": "-m",
            "synthetic": "--synthetic",
            "batch": "--batch",
            "n_prompt": "-p",
            "threads": "-t",
            "repetitions": "-r",
            "depths": "-d",
        },
    )
    if misplaced:
        print(f"trit bench: error: {misplaced[0]} does not apply to --server", file=sys.stderr)
        return 2
    if args.n_gen is not None and len(args.n_gen) != 1:
        print("trit bench: error: -n takes one value with --server", file=sys.stderr)
        return 2
    try:
        result = bench_server.run(
            args.server,
            clients=8 if args.clients is None else args.clients,
            requests=32 if args.requests is None else args.requests,
            max_tokens=args.n_gen[0] if args.n_gen else 64,
            timeout=300.0 if args.timeout is None else args.timeout,
            api_key=args.api_key,
            progress=None if args.json else (lambda msg: print(f"[{msg}]", file=sys.stderr)),
        )
    except ValueError as exc:
        print(f"trit bench: error: {exc}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as exc:
        print(f"trit bench: error: {args.server}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(bench_server.markdown(result))
    return 0


def _model_id(args: argparse.Namespace) -> str:
    """The id the server answers to: --served-model-name, else the repo id,
    else the local folder's name (the bundled model's without -m)."""
    if args.served_model_name:
        return str(args.served_model_name)
    if args.model is None:
        return models.DEFAULT
    path = Path(args.model)
    return path.resolve().name if path.exists() else str(args.model)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from trit import webui
        from trit.server import create_app
        from trit.server.connections import uvicorn_config
    except ImportError as exc:
        print(
            f"trit: error: `trit serve` needs the serve extra ({exc}): pip install 'trit[serve]'",
            file=sys.stderr,
        )
        return 1
    if args.max_concurrency < 1:
        print("trit: error: --max-concurrency must be >= 1", file=sys.stderr)
        return 2
    if not args.request_timeout > 0:  # also refuses nan
        print("trit: error: --request-timeout must be > 0 seconds", file=sys.stderr)
        return 2
    if args.parallel is not None and not 1 <= args.parallel <= MAX_PARALLEL:
        print(f"trit: error: --parallel must be between 1 and {MAX_PARALLEL}", file=sys.stderr)
        return 2
    if args.ray:
        return _serve_ray(args)
    misplaced = [flag for dest, flag in RAY_SERVE_FLAGS.items() if getattr(args, dest) is not None]
    if misplaced:
        print(f"trit: error: {misplaced[0]} needs --ray", file=sys.stderr)
        return 2
    if args.max_connections is None:
        args.max_connections = 256
    # Slots not used cost no memory: a cache takes pages as it fills.
    g = _load(args, slots=args.parallel or AUTO_PARALLEL)
    parallel = _serve_slots(args, g)
    if parallel is None:
        return 2
    max_concurrency = max(args.max_concurrency, parallel)
    name = _model_id(args)
    app = create_app(
        g,
        model_name=name,
        api_key=args.api_key or None,
        max_concurrency=max_concurrency,
        parallel=parallel,
        request_timeout=args.request_timeout,
    )
    webui.mount(app)
    if not _is_loopback(args.host) and not args.api_key:
        print(
            f"trit: warning: listening on {args.host} without --api-key: anyone who can reach "
            "this port can use the model",
            file=sys.stderr,
        )
    host = f"[{args.host}]" if ":" in args.host else args.host  # an IPv6 address
    print(
        f"trit serve: model {name!r} (n_ctx {g.n_ctx}) on http://{host}:{args.port}/v1, "
        + (
            "one request at a time"
            if parallel == 1
            else f"{parallel} requests at once ({g.slot_cache_bytes / 2**20:.1f} MiB "
            "of KV cache each at most)"
        )
        + f", up to {max_concurrency} running or queued; "
        f"chat page: http://{host}:{args.port}/",
        file=sys.stderr,
    )
    server = uvicorn.Server(
        uvicorn_config(
            app,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            request_timeout=args.request_timeout,
            max_connections=args.max_connections,
        )
    )
    server.run()
    return 0 if server.started else 1  # uvicorn has said why (a port in use, ...)


# Flags of `trit serve --ray` alone (their defaults are None).
RAY_SERVE_FLAGS = {
    "replicas": "--replicas",
    "autoscale": "--autoscale",
    "ray_address": "--ray-address",
}


def _replica_range(text: str) -> tuple[int, int]:
    """`--autoscale MIN,MAX`."""
    parts = text.split(",")
    try:
        low, high = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX (two integers), got {text!r}") from None
    if not 0 <= low <= high or high < 1:
        raise argparse.ArgumentTypeError(f"needs 0 <= MIN <= MAX and MAX >= 1, got {text!r}")
    return low, high


def _need_ray(command: str) -> Any:
    """trit.ray, or None after saying which extra it needs."""
    try:
        from trit import ray as trit_ray
    except ImportError as exc:
        print(
            f"trit: error: `{command}` needs the ray extra ({exc}): pip install 'trit[ray]'",
            file=sys.stderr,
        )
        return None
    return trit_ray


def _ray_engine(trit_ray: Any, args: argparse.Namespace) -> Any:
    """The engine every replica or batch worker builds, from the model flags."""
    return trit_ray.EngineOptions(
        trit_ray.EngineOptions.model_path(args.model),
        revision=args.revision,
        gguf_file=args.gguf_file,
        threads=args.threads or 1,
        n_ctx=args.ctx,
        head=args.head,
        kv_cache=args.kv_cache,
        packing=args.packing,
    )


def _serve_ray(args: argparse.Namespace) -> int:
    """`trit serve --ray`: replicas on a Ray cluster behind Serve's proxy."""
    if args.replicas is not None and args.autoscale is not None:
        print("trit: error: give --replicas or --autoscale, not both", file=sys.stderr)
        return 2
    if args.max_connections is not None:
        print("trit: error: --max-connections does not apply with --ray", file=sys.stderr)
        return 2
    trit_ray = _need_ray("trit serve --ray")
    if trit_ray is None:
        return 1
    engine = _ray_engine(trit_ray, args)
    options = trit_ray.ServeOptions(
        engine,
        served_model_name=_model_id(args),
        api_key=args.api_key or None,
        parallel=args.parallel,
        max_concurrency=args.max_concurrency,
        request_timeout=args.request_timeout,
    )
    app = trit_ray.build_app(options, replicas=args.replicas or 1, autoscale=args.autoscale)
    started = trit_ray.connect(args.ray_address)
    if not _is_loopback(args.host) and not args.api_key:
        print(
            f"trit: warning: listening on {args.host} without --api-key: anyone who can reach "
            "this port can use the model",
            file=sys.stderr,
        )
    host = f"[{args.host}]" if ":" in args.host else args.host
    replicas = (
        f"{args.replicas or 1} replica{'s' if (args.replicas or 1) > 1 else ''}"
        if args.autoscale is None
        else f"{args.autoscale[0]} to {args.autoscale[1]} replicas"
    )
    print(
        f"trit serve --ray: deploying model {options.served_model_name!r}, {replicas} of "
        f"{engine.threads} thread{'s' if engine.threads > 1 else ''}, on "
        + ("a local Ray cluster" if started else "the Ray cluster")
        + " ...",
        file=sys.stderr,
    )

    def ready() -> None:
        print(
            f"trit serve --ray: serving on http://{host}:{args.port}/v1 (every node's proxy); "
            "Ctrl-C takes the deployment down",
            file=sys.stderr,
        )

    trit_ray.serve_until_stopped(
        app, host=args.host, port=args.port, started_cluster=started, ready=ready
    )
    print("trit serve --ray: the deployment is down", file=sys.stderr)
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    from trit import batch

    given = _given_sampling(args)  # flags checked before anything runs
    if args.max_new_tokens < 1:
        print("trit batch: error: -n must be at least 1", file=sys.stderr)
        return 2
    if args.parallel is not None and not 1 <= args.parallel <= MAX_PARALLEL:
        print(f"trit batch: error: --parallel must be in [1, {MAX_PARALLEL}]", file=sys.stderr)
        return 2
    misplaced = [
        f
        for d, f in (("workers", "--workers"), ("ray_address", "--ray-address"))
        if getattr(args, d) is not None and not args.ray
    ]
    if misplaced:
        print(f"trit batch: error: {misplaced[0]} needs --ray", file=sys.stderr)
        return 2
    output = Path(args.output)
    if Path(args.input).resolve() == output.resolve():
        print("trit batch: error: -o must not be the input file", file=sys.stderr)
        return 2
    rows = batch.read_rows(Path(args.input))

    def say(message: str) -> None:
        print(f"trit batch: {message}", file=sys.stderr)

    if args.ray:
        trit_ray = _need_ray("trit batch --ray")
        if trit_ray is None:
            return 1
        engine = _ray_engine(trit_ray, args)
        runner = trit_ray.batch_runner(
            engine,
            workers=args.workers or 1,
            slots=args.parallel,
            given=given,
            max_tokens=args.max_new_tokens,
        )
        started = trit_ray.connect(args.ray_address)
        try:
            result = batch.run_job(rows, output, runner, say)
        finally:
            if started:
                import ray

                ray.shutdown()
    else:
        g = _load(args, slots=args.parallel or AUTO_PARALLEL)
        parallel = _serve_slots(args, g)
        if parallel is None:
            return 2
        defaults = batch.job_defaults(
            g.generation_defaults, given, min(args.max_new_tokens, g.n_ctx)
        )
        result = batch.run_job(rows, output, batch.local_runner(g, defaults, parallel), say)
    errors = f", {result.errors} with an error" if result.errors else ""
    say(f"wrote {result.written} rows to {output}{errors} ({result.rows} in all)")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trit", description="CPU inference for ternary (BitNet b1.58) language models"
    )
    parser.add_argument("--version", action="version", version=f"trit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("generate", help="continue a prompt, streaming the text")
    _add_model_args(p)
    p.add_argument("-p", "--prompt", required=True, help="the text to continue")
    _add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="chat with the model, using its chat template")
    _add_model_args(p)
    p.add_argument("--system", help="a system message that starts every conversation")
    p.add_argument("-v", "--verbose", action="store_true", help="print speeds after each reply")
    _add_sampling_args(p)
    p.set_defaults(func=cmd_chat)

    from trit.synthetic import ALIASES, SHAPES

    p = sub.add_parser("perplexity", help="perplexity of the model over a text file")
    p.add_argument("file", help="a UTF-8 text file")
    p.add_argument(
        "-m", "--model", help="model folder, GGUF file or Hub repo id (default: the bundled model)"
    )
    p.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    p.add_argument("--gguf-file", help="which GGUF file of a folder or Hub repo to load")
    p.add_argument(
        "-t", "--threads", type=_at_least(1), help="worker threads (default: physical cores)"
    )
    # Its own name: --ctx is the context size everywhere else. The context is
    # sized to the window (dest "ctx", which _load reads as n_ctx).
    p.add_argument(
        "-w",
        "--window",
        dest="ctx",
        type=int,
        help="tokens per window, and the context size (default: the model's maximum)",
    )
    p.add_argument("--stride", type=int, help="tokens between window starts (default: ctx / 2)")
    _add_precision_args(p)
    p.set_defaults(func=cmd_perplexity)

    p = sub.add_parser(
        "convert",
        help="write a model as a GGUF file (needs the gguf package) or a safetensors folder",
        description="Writes the model as GGUF (I2_S for bitnet.cpp, TQ2_0 or TQ1_0 for "
        "llama.cpp) or as a Hugging Face folder (packed safetensors), with its tokenizer "
        "and chat template. Values are unchanged.",
    )
    p.add_argument(
        "-m", "--model", help="model folder, GGUF file or Hub repo id (default: the bundled model)"
    )
    p.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    p.add_argument("--gguf-file", help="which GGUF file of a folder or Hub repo to load")
    p.add_argument("-o", "--output", required=True, help="the .gguf file, or the folder, to write")
    p.add_argument(
        "--to",
        choices=["gguf", "safetensors"],
        help="output format (default: gguf for a .gguf output, else safetensors)",
    )
    p.add_argument(
        "--type",
        choices=["i2_s", "tq2_0", "tq1_0"],
        default="i2_s",
        help="GGUF projection type (default: i2_s)",
    )
    p.add_argument(
        "-t", "--threads", type=_at_least(1), help="worker threads (default: physical cores)"
    )
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "bench",
        help="measure prompt and generation speed (llama-bench style), batched decoding "
        "(--batch) or a running server (--server)",
    )
    p.add_argument(
        "-m", "--model", help="model folder, GGUF file or Hub repo id (default: the bundled model)"
    )
    p.add_argument(
        "--synthetic",
        choices=[*SHAPES, *ALIASES],
        metavar="NAME",
        help=f"random weights in the layout and shapes of a published model, written once to "
        f"~/.cache/trit: {', '.join(SHAPES)} ({', '.join(ALIASES)}: earlier names)",
    )
    p.add_argument(
        "-p", "--n-prompt", type=_int_list, help="pp sizes (default 128; one with --batch)"
    )
    p.add_argument(
        "-n",
        "--n-gen",
        type=_int_list,
        help="tg sizes (default 128; with --batch one, default 32; with --server the "
        "max_tokens of each request, default 64)",
    )
    p.add_argument("-t", "--threads", type=_int_list, help="thread counts (default 1,cores)")
    p.add_argument(
        "-r",
        "--repetitions",
        type=int,
        help="default 5 (with --batch 3, each rate the median of alternated runs)",
    )
    p.add_argument(
        "-d",
        "--depth",
        dest="depths",
        type=_int_list,
        help="tokens in the cache before tg, as llama-bench's -d (default 0)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_precision_args(p)
    group = p.add_argument_group("batched decoding (llama-batched-bench style)")
    group.add_argument(
        "--batch",
        type=_int_list,
        metavar="B,...",
        help="sequences run together: for each B, B prompts of -p tokens then -n steps; "
        "aggregate and per-sequence generation rates beside one sequence's pp128",
    )
    group = p.add_argument_group("load test of a running `trit serve` (loopback only)")
    group.add_argument(
        "--server", metavar="URL", help="the server, e.g. http://127.0.0.1:8000 (this machine only)"
    )
    group.add_argument(
        "--clients", type=int, metavar="C", help="concurrent streaming clients (default 8)"
    )
    group.add_argument("--requests", type=int, metavar="R", help="requests in all (default 32)")
    group.add_argument("--timeout", type=float, help="seconds per request (default 300)")
    group.add_argument("--api-key", help="the server's --api-key, if it has one")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server (needs trit[serve])",
        description="Serves a chat page at /, and /v1/chat/completions, /v1/completions, "
        "/v1/models, /health and /metrics (Prometheus). "
        "Up to --parallel requests run together (continuous batching); the rest "
        "wait in arrival order.",
    )
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="default: 8000")
    p.add_argument(
        "--api-key",
        default=os.environ.get("TRIT_API_KEY"),
        help="require `Authorization: Bearer KEY` on /v1/* (default: $TRIT_API_KEY; none: open)",
    )
    p.add_argument(
        "--max-concurrency",
        type=int,
        default=16,
        help="requests running or queued at once; more get a 503 (default: 16)",
    )
    p.add_argument(
        "--parallel",
        type=int,
        default=None,
        help="requests run together, each in a slot with its own KV cache of --ctx "
        f"positions; 1: one at a time (default: as many as fit in memory, at most "
        f"{AUTO_PARALLEL})",
    )
    p.add_argument(
        "--max-connections",
        type=_at_least(1),
        help="open HTTP connections at once; more get a 503 (default: 256; not with --ray)",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=30.0,
        help="seconds a client has to send a request's headers, and then its body, "
        "before the connection is closed (default: 30)",
    )
    p.add_argument(
        "--served-model-name",
        help="the model id clients use (default: the repo id, or the folder's name)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn's log level (default: info)",
    )
    group = p.add_argument_group(
        "replicas on a Ray cluster (needs trit[ray]; -t is each replica's threads, default 1)"
    )
    group.add_argument(
        "--ray",
        action="store_true",
        help="serve replicas on Ray Serve: on the cluster at --ray-address, else a local one",
    )
    group.add_argument("--replicas", type=_at_least(1), help="replicas (default: 1)")
    group.add_argument(
        "--autoscale",
        type=_replica_range,
        metavar="MIN,MAX",
        help="between MIN and MAX replicas, as the load asks",
    )
    group.add_argument(
        "--ray-address",
        help="the cluster to join, e.g. ray://head:10001 (default: $RAY_ADDRESS, else a "
        "local cluster started for this command)",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "batch",
        help="generate for every request of a JSON Lines file, resumably",
        description='Each line of INPUT is a request: {"id": ..., "prompt": ...} or '
        '{"id": ..., "messages": [...]}, with optional max_tokens, temperature, top_p, '
        "top_k, min_p, repetition_penalty, seed and stop. OUTPUT gets one line per request, "
        'in order: {"id", "text", "finish_reason", "usage"}, or {"id", "error"} '
        "for a request the model cannot take. A malformed line fails the job before it "
        "starts. Run again after an interruption: rows already in OUTPUT are kept.",
    )
    _add_model_args(p)
    p.add_argument("input", help="the requests, a JSON Lines file")
    p.add_argument("-o", "--output", required=True, help="the JSON Lines file to write")
    p.add_argument(
        "--parallel",
        type=int,
        help="requests run together by each engine, each in a slot with its own KV cache "
        f"(default: as many as fit in memory, at most {AUTO_PARALLEL})",
    )
    _add_sampling_args(p)
    group = p.add_argument_group(
        "on a Ray cluster (needs trit[ray]; -t is each worker's threads, default 1)"
    )
    group.add_argument(
        "--ray", action="store_true", help="run on Ray Data, over a pool of --workers engines"
    )
    group.add_argument("--workers", type=_at_least(1), help="engines (default: 1)")
    group.add_argument(
        "--ray-address",
        help="the cluster to join (default: $RAY_ADDRESS, else a local cluster)",
    )
    p.set_defaults(func=cmd_batch)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except _FlagError as exc:
        # Exit status 2, as argparse gives for a bad flag.
        print(f"trit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except TritError as exc:
        print(f"trit: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
