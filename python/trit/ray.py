"""trit on Ray (the `trit[ray]` extra): replicas of `trit serve` behind one
OpenAI endpoint (Ray Serve), and generation over datasets (Ray Data).

Serving: `build_app` makes a Ray Serve application whose replicas each hold
a Generator with its own threads (Ray reserves `threads` CPUs a replica, so
it packs replicas onto machines by their cores) and serve the very app of
`trit serve` (`trit.server.create_app`, the chat page included), built in
the replica when it starts:

    from ray import serve
    import trit.ray
    serve.run(trit.ray.build_app(trit.ray.ServeOptions(), replicas=2))

`app_builder` is the same for `serve run trit.ray:app_builder` and Serve
config files (KubeRay's RayService). `trit serve --ray` runs `serve`.

Datasets: `generate` adds a column of generated text to a Ray Dataset;
`batch_runner` runs `trit batch --ray`'s rows (`trit.batch`). Both map
batches of rows over a pool of actors, each holding a Generator.

Every replica and actor loads the model itself: a folder or GGUF file at the
same path on every node, a Hugging Face repo id (downloaded once per node,
into that node's Hub cache), or, with no model named, the bundled one.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import ray
from ray import serve

from trit import models
from trit._core import TritError
from trit.batch import Row, Runner, generate_rows, job_defaults
from trit.generator import Generator
from trit.sampling import SamplingOptions

if TYPE_CHECKING:
    from fastapi import FastAPI
    from ray.data import Dataset

APP_NAME = "trit"
"""The Serve application's name (and its deployment's)."""


@dataclass(frozen=True)
class EngineOptions:
    """How each replica or actor loads its Generator."""

    model: str | None = None
    """A folder or GGUF file present at this path on every node, or a Hub
    repo id; None: the bundled model."""
    revision: str | None = None
    gguf_file: str | None = None
    threads: int = 1
    """Worker threads, and the CPUs Ray reserves for them."""
    n_ctx: int | None = None
    head: str = "int8"
    kv_cache: str = "auto"
    packing: str = "i2"

    def load(self, slots: int) -> Generator:
        return Generator.from_pretrained(
            self.model,
            threads=self.threads,
            n_ctx=self.n_ctx,
            revision=self.revision,
            head=self.head,
            kv_cache=self.kv_cache,
            packing=self.packing,
            filename=self.gguf_file,
            slots=slots,
        )

    @staticmethod
    def model_path(model: str | None) -> str | None:
        """`model` as the replicas should see it: an existing local path made
        absolute (replicas do not start in this directory); a Hub id as is."""
        if model is None:
            return None
        path = Path(model)
        return str(path.resolve()) if path.exists() else model


# ---------------------------------------------------------------------------
# Serving


@dataclass(frozen=True)
class ServeOptions:
    """What `trit serve` takes, for each replica."""

    engine: EngineOptions = field(default_factory=EngineOptions)
    served_model_name: str | None = None
    """The id clients ask for (default: the repo id, or the folder's name)."""
    api_key: str | None = None
    """None: the replica's $TRIT_API_KEY, if set (else the API is open)."""
    parallel: int | None = None
    """Requests a replica runs together (None: as many as fit, at most 8)."""
    max_concurrency: int = 16
    """Requests a replica holds at once, running or waiting."""
    request_timeout: float = 30.0

    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        model = self.engine.model
        if model is None:
            return models.DEFAULT
        path = Path(model)
        return path.name if path.is_absolute() else model


def replica_app(options: ServeOptions) -> FastAPI:
    """`trit serve`'s app around a Generator loaded here (in a replica)."""
    from trit import webui
    from trit.cli import AUTO_PARALLEL, fit_slots
    from trit.server import create_app

    g = options.engine.load(slots=options.parallel or AUTO_PARALLEL)
    parallel = fit_slots(options.parallel, g)
    app = create_app(
        g,
        model_name=options.model_name(),
        api_key=options.api_key or os.environ.get("TRIT_API_KEY") or None,
        max_concurrency=max(options.max_concurrency, parallel),
        parallel=parallel,
        request_timeout=options.request_timeout,
    )
    webui.mount(app)
    return app


def build_app(
    options: ServeOptions,
    *,
    replicas: int = 1,
    autoscale: tuple[int, int] | None = None,
    name: str = APP_NAME,
) -> serve.Application:
    """A Serve application of `replicas` replicas, or between `autoscale`'s
    (min, max) as load asks (the target: a replica's parallel requests).
    Serve sends a replica at most its max_concurrency requests at once and
    queues the rest in front of the replicas."""
    from trit.cli import AUTO_PARALLEL

    if autoscale is not None:
        low, high = autoscale
        if not 0 <= low <= high or high < 1:
            raise ValueError(f"autoscale needs 0 <= MIN <= MAX and MAX >= 1, got {low},{high}")
    elif replicas < 1:
        raise ValueError(f"replicas must be at least 1, got {replicas}")

    # A builder function, not an app: Serve calls it in each replica as it
    # starts, so the model loads there and not in this process.
    def build() -> FastAPI:
        return replica_app(options)

    parallel = options.parallel or AUTO_PARALLEL
    scaling: dict[str, Any] = (
        {"num_replicas": replicas}
        if autoscale is None
        else {
            "autoscaling_config": {
                "min_replicas": autoscale[0],
                "max_replicas": autoscale[1],
                "target_ongoing_requests": parallel,
            }
        }
    )
    deployment = serve.deployment(
        name=name,
        ray_actor_options={"num_cpus": options.engine.threads},
        max_ongoing_requests=max(options.max_concurrency, parallel),
        **scaling,
    )(serve.ingress(build)())
    return deployment.bind()


_ENGINE_ARGS = {f.name for f in fields(EngineOptions)} | {"ctx"}
_SERVE_ARGS = {"served_model_name", "api_key", "parallel", "max_concurrency", "request_timeout"}
_INT_ARGS = {"threads", "n_ctx", "ctx", "parallel", "max_concurrency", "replicas"}


def app_builder(args: dict[str, Any]) -> serve.Application:
    """The application from a Serve config's `args` (or `serve run
    trit.ray:app_builder key=value ...`): `model`, `revision`, `gguf_file`,
    `threads`, `ctx`, `head`, `kv_cache`, `parallel`, `max_concurrency`,
    `request_timeout`, `served_model_name`, `replicas` or `autoscale`
    ("MIN,MAX" or [MIN, MAX]). The API key is the replicas' $TRIT_API_KEY
    (a Kubernetes Secret, say), or `api_key`."""
    unknown = sorted(set(args) - _ENGINE_ARGS - _SERVE_ARGS - {"replicas", "autoscale"})
    if unknown:
        raise ValueError(f"trit.ray.app_builder: unknown argument {unknown[0]!r}")
    values = dict(args)
    for key in _INT_ARGS & set(values):
        values[key] = int(values[key])
    if "request_timeout" in values:
        values["request_timeout"] = float(values["request_timeout"])
    if "ctx" in values:
        values["n_ctx"] = values.pop("ctx")
    autoscale = values.pop("autoscale", None)
    if isinstance(autoscale, str):
        autoscale = [int(x) for x in autoscale.split(",")]
    replicas = values.pop("replicas", 1)
    engine = EngineOptions(**{k: v for k, v in values.items() if k in _ENGINE_ARGS})
    options = ServeOptions(engine, **{k: v for k, v in values.items() if k in _SERVE_ARGS})
    return build_app(
        options,
        replicas=replicas,
        autoscale=None if autoscale is None else (int(autoscale[0]), int(autoscale[1])),
    )


def connect(address: str | None, *, num_cpus: int | None = None) -> bool:
    """Connects to the Ray cluster at `address` (else $RAY_ADDRESS), or
    starts a local one (with `num_cpus` CPUs; default: this machine's).
    True when this call started the cluster."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
        return False
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    return True


class _Stop(Exception):
    pass


def serve_until_stopped(
    app: serve.Application,
    *,
    host: str,
    port: int,
    started_cluster: bool,
    ready: Callable[[], None] = lambda: None,
    name: str = APP_NAME,
) -> None:
    """Deploys `app` (Serve's proxy on `host`:`port` of every node), calls
    `ready`, and waits for Ctrl-C or SIGTERM; then takes the application
    down, and Serve too when no other application is left (and the local
    cluster, if `started_cluster`)."""

    def stop(signum: int, frame: Any) -> None:
        raise _Stop

    serve.start(http_options={"host": host, "port": port})
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        try:
            serve.run(app, name=name, route_prefix="/")
        except RuntimeError as exc:
            raise TritError(f"the deployment failed: {_failure(name) or exc}") from None
        ready()
        while True:
            time.sleep(3600)
    except (_Stop, KeyboardInterrupt):
        pass
    finally:
        # A second Ctrl-C during the teardown is ignored: half a teardown
        # would leave replicas holding the cluster's CPUs.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            serve.delete(name)
            if started_cluster or not serve.status().applications:
                serve.shutdown()
        finally:
            if started_cluster:
                ray.shutdown()
            signal.signal(signal.SIGTERM, previous)
            signal.signal(signal.SIGINT, signal.default_int_handler)


def _failure(name: str) -> str | None:
    """Why the application's deployment failed: the last line of its
    replicas' error (the exception), if Serve has one."""
    try:
        deployment = serve.status().applications[name].deployments[name]
    except (KeyError, RuntimeError):
        return None
    lines = [line for line in deployment.message.splitlines() if line.strip()]
    return lines[-1].strip() if lines else None


# ---------------------------------------------------------------------------
# Datasets


class _RowEngine:
    """A Ray Data actor: generates `trit batch` rows on its own Generator."""

    def __init__(
        self, engine: EngineOptions, slots: int | None, given: dict[str, Any], max_tokens: int
    ) -> None:
        from trit.cli import AUTO_PARALLEL, fit_slots

        self._g = engine.load(slots or AUTO_PARALLEL)
        self._slots = fit_slots(slots, self._g)
        self._defaults = job_defaults(
            self._g.generation_defaults, given, min(max_tokens, self._g.n_ctx)
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [Row.from_json(str(text)) for text in batch["row"]]
        out = dict(generate_rows(self._g, rows, self._defaults, self._slots))
        results = [json.dumps(out[row.index], ensure_ascii=False) for row in rows]
        return {
            "index": np.array([row.index for row in rows], dtype=np.int64),
            "result": np.array(results, dtype=object),
        }


def batch_runner(
    engine: EngineOptions,
    *,
    workers: int,
    slots: int | None,
    given: dict[str, Any],
    max_tokens: int,
    batch_rows: int = 32,
) -> Runner:
    """`trit batch --ray`: rows mapped in batches of `batch_rows` over
    `workers` actors of `slots` slots each (None: as many as fit in a
    worker's memory, at most 8), results in the input's order (an actor that
    dies is restarted by Ray and its batch run again)."""

    def run(rows: list[Row]) -> Iterator[tuple[int, dict[str, Any]]]:
        items = [{"row": row.to_json()} for row in rows]
        blocks = max(1, -(-len(items) // batch_rows))
        ds = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
            _RowEngine,
            fn_constructor_kwargs={
                "engine": engine,
                "slots": slots,
                "given": given,
                "max_tokens": max_tokens,
            },
            batch_size=batch_rows,
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=engine.threads,
        )
        ds.context.execution_options.preserve_order = True
        for item in ds.iter_rows():
            yield int(item["index"]), json.loads(item["result"])

    return run


class _ColumnEngine:
    """A Ray Data actor: `generate`'s text column on its own Generator."""

    def __init__(
        self,
        engine: EngineOptions,
        slots: int,
        column: str,
        output_column: str,
        max_new_tokens: int,
        sampling: SamplingOptions,
    ) -> None:
        self._g = engine.load(slots)
        self._column = column
        self._output = output_column
        self._max_new_tokens = max_new_tokens
        self._sampling = sampling

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prompts = [self._prompt(value) for value in batch[self._column]]
        texts = self._g.generate_batch(prompts, self._max_new_tokens, sampling=self._sampling)
        return {**batch, self._output: np.array(texts, dtype=object)}

    def _prompt(self, value: Any) -> str | list[int]:
        if isinstance(value, str):
            return value
        return self._g.tokenizer.encode_chat([dict(m) for m in value])


def generate(
    dataset: Dataset,
    *,
    model: str | None = None,
    column: str = "prompt",
    output_column: str = "generated_text",
    max_new_tokens: int = 256,
    sampling: SamplingOptions | None = None,
    workers: int = 1,
    threads: int = 1,
    slots: int = 8,
    batch_size: int = 32,
    n_ctx: int | None = None,
    revision: str | None = None,
    gguf_file: str | None = None,
) -> Dataset:
    """`dataset` with `output_column` added: the text generated for each
    row's `column`, a prompt string or a list of chat messages ({"role",
    "content"}: rendered with the chat template). Runs on `workers` actors
    of `threads` threads (and CPUs) and `slots` sequences at once each, over
    batches of `batch_size` rows; `sampling` (default: greedy) is every
    row's. Lazy, as Ray Datasets are: nothing runs until it is consumed."""
    engine = EngineOptions(
        EngineOptions.model_path(model),
        revision=revision,
        gguf_file=gguf_file,
        threads=threads,
        n_ctx=n_ctx,
    )
    return dataset.map_batches(
        _ColumnEngine,
        fn_constructor_kwargs={
            "engine": engine,
            "slots": slots,
            "column": column,
            "output_column": output_column,
            "max_new_tokens": max_new_tokens,
            "sampling": sampling or SamplingOptions(),
        },
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=threads,
    )
