"""trit on Ray, on a local cluster on this machine (loopback only, every wait
bounded): `trit serve --ray` and Serve replicas of the bundled model behind one
endpoint (the official openai client, a replica killed mid-run), and
`trit batch --ray` / `trit.ray.generate` on Ray Data (a worker killed during a
job, a job resumed after an interruption). Select them with `-m ray`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip(
    "ray",
    reason="the Ray tests need the ray extra (pip install '.[ray]'; "
    "TRIT_RAY=1 scripts/test.sh installs it, as CI does)",
)
from ray import serve  # noqa: E402

import trit.ray as trit_ray  # noqa: E402
from trit import Generator, batch  # noqa: E402

pytestmark = pytest.mark.ray

KEY = "ray-test-key"
MODEL = "tiny-fortunes"
TIMEOUT = 120.0  # seconds any one wait may take: a start, a recovery, a job
QUESTIONS = ["Hi!", "Who are you?", "Tell me a story.", "Why?", "What is love?", "OK."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(condition: Any, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def client(port: int, api_key: str = KEY) -> Any:
    import openai

    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key=api_key, timeout=60, max_retries=0
    )


def chat(port: int, question: str, n: int = 8, stream: bool = False) -> str:
    messages = [{"role": "user", "content": question}]
    c = client(port)
    if not stream:
        r = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=n, temperature=0)
        return str(r.choices[0].message.content)
    chunks = c.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=n, temperature=0, stream=True
    )
    return "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)


def alone(question: str, n: int = 8) -> str:
    return Generator.from_pretrained(threads=1).chat([{"role": "user", "content": question}], n)


def replica_names() -> list[str]:
    return sorted(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA::")
    )


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A local cluster of 4 CPUs (2 replicas or 2 workers of 1 thread, and
    room for Serve's own actors), on loopback; its GCS address."""
    if ray.is_initialized():
        ray.shutdown()
    context = ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
    )
    yield str(context.address_info["gcs_address"])
    serve.shutdown()
    ray.shutdown()


# ---------------------------------------------------------------------------
# Serving


def test_trit_serve_ray_deploys_serves_and_goes_down_on_ctrl_c(cluster: str) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "trit.cli", "serve", "--ray", "--ray-address", cluster]
        + ["--replicas", "1", "-t", "1", "--parallel", "2", "--port", str(port)],
        env={**os.environ, "TRIT_API_KEY": KEY},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(
            lambda: proc.poll() is not None or status(f"http://127.0.0.1:{port}/health") == 200,
            "trit serve --ray to serve",
        )
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert status(f"http://127.0.0.1:{port}/v1/models") == 401  # the key is $TRIT_API_KEY
        assert chat(port, "Hi!") == alone("Hi!")
        assert len(replica_names()) == 1
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    assert "1 replica of 1 thread, on the Ray cluster" in stderr
    assert "the deployment is down" in stderr
    wait_for(lambda: not replica_names(), "the replica to go")
    assert status(f"http://127.0.0.1:{port}/health") == 0  # Serve's proxy went too


@pytest.fixture(scope="class")
def port(cluster: str) -> Iterator[int]:
    """Two replicas of one thread behind Serve's proxy, on this port: the
    application of a Serve config's args (as KubeRay deploys it)."""
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"replicas": 2, "threads": 1, "parallel": 2, "api_key": KEY}
    serve.run(trit_ray.app_builder(args), name="trit", route_prefix="/")
    yield port
    serve.shutdown()  # its CPUs are the batch tests'


class TestReplicas:
    """Two replicas of one thread behind Serve's proxy."""

    def test_the_openai_client_chats_and_streams(self, port: int) -> None:
        assert len(replica_names()) == 2
        for question in QUESTIONS[:3]:
            assert chat(port, question) == alone(question)
            assert chat(port, question, stream=True) == alone(question)
        assert client(port).models.list().data[0].id == MODEL
        with pytest.raises(Exception, match="401|API key"):
            client(port, api_key="wrong").models.list()
        assert status(f"http://127.0.0.1:{port}/") == 200  # the chat page

    def test_a_killed_replica_is_replaced_and_later_requests_succeed(self, port: int) -> None:
        before = replica_names()
        assert len(before) == 2
        outcomes: list[str] = []

        def load() -> None:
            # Requests in flight while a replica dies: each ends (an answer
            # or an error), none hangs.
            for question in QUESTIONS * 2:
                try:
                    chat(port, question, n=32, stream=True)
                    outcomes.append("ok")
                except Exception as exc:
                    outcomes.append(type(exc).__name__)

        clients = [threading.Thread(target=load) for _ in range(3)]
        for t in clients:
            t.start()
        wait_for(lambda: len(outcomes) >= 2, "requests to run")
        ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
        for t in clients:
            t.join(timeout=TIMEOUT)
            assert not t.is_alive(), "a request hung after its replica died"
        assert len(outcomes) == 3 * 2 * len(QUESTIONS)

        def replaced() -> bool:
            names = replica_names()
            return len(names) == 2 and before[0] not in names

        wait_for(replaced, "Serve to replace the killed replica")
        wait_for(lambda: serve.status().applications["trit"].status == "RUNNING", "RUNNING")
        for question in QUESTIONS * 2:
            assert chat(port, question, stream=True) == alone(question)


def test_app_builder_reads_a_serve_configs_args() -> None:
    app = trit_ray.app_builder({"threads": "2", "autoscale": "1,3", "ctx": 128})
    assert isinstance(app, serve.Application)
    with pytest.raises(ValueError, match="unknown argument 'threds'"):
        trit_ray.app_builder({"threds": 2})
    with pytest.raises(ValueError, match="autoscale needs"):
        trit_ray.app_builder({"autoscale": [3, 1]})


# ---------------------------------------------------------------------------
# Batch generation


def write_requests(path: Path, n: int) -> list[batch.Row]:
    with open(path, "w") as f:
        for i in range(n):
            request: dict[str, Any] = (
                {"messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]}
                if i % 4 == 0
                else {"prompt": f"Fortune {i}:"}
            )
            if i % 3 == 0:
                request["id"] = f"r{i}"
            f.write(json.dumps(request) + "\n")
    return batch.read_rows(path)


GREEDY = {"temperature": 0.0}


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[batch.Row], bytes]:
    """Three hundred requests and their output from the local engine."""
    folder = tmp_path_factory.mktemp("job")
    source = folder / "in.jsonl"
    rows = write_requests(source, 300)
    g = Generator.from_pretrained(threads=1, slots=4)
    reference = folder / "reference.jsonl"
    defaults = batch.job_defaults(g.generation_defaults, GREEDY, 12)
    batch.run_job(rows, reference, batch.local_runner(g, defaults))
    return source, rows, reference.read_bytes()


def map_workers() -> list[tuple[int, str]]:
    """(pid, title) of Ray Data's actor processes."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if title.startswith("ray::MapWorker"):
            found.append((int(entry.name), title))
    return found


def test_a_job_with_a_worker_killed_is_complete_in_order_without_duplicates(
    cluster: str, job: tuple[Path, list[batch.Row], bytes], tmp_path: Path
) -> None:
    _, rows, reference = job
    out = tmp_path / "out.jsonl"
    runner = trit_ray.batch_runner(
        trit_ray.EngineOptions(), workers=2, slots=4, given=GREEDY, max_tokens=12, batch_rows=8
    )
    killed: list[str] = []

    def kill_a_busy_worker() -> None:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            done = out.read_bytes().count(b"\n") if out.exists() else 0
            busy = [w for w in map_workers() if not w[1].endswith("__init__")]
            if done >= 8 and busy:
                os.kill(busy[0][0], signal.SIGKILL)
                killed.append(f"{busy[0][1]} after {done} rows")
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_a_busy_worker)
    killer.start()
    result = batch.run_job(rows, out, runner)
    killer.join()
    assert killed, "the job ended before a worker could be killed"
    assert result.written == len(rows) and result.errors == 0
    assert out.read_bytes() == reference  # complete, in order, once each, same text


def test_trit_batch_ray_resumes_an_interrupted_job(
    cluster: str, job: tuple[Path, list[batch.Row], bytes], tmp_path: Path
) -> None:
    source, rows, reference = job
    out = tmp_path / "out.jsonl"
    lines = reference.splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:100]) + lines[100][:7])  # cut inside row 101
    r = subprocess.run(
        [sys.executable, "-m", "trit.cli", "batch", str(source), "-o", str(out)]
        + ["--ray", "--ray-address", cluster, "--workers", "2", "-t", "1"]
        + ["--parallel", "4", "-n", "12", "--temp", "0"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 2,
    )
    assert r.returncode == 0, r.stderr
    assert "300 rows, 100 already in" in r.stderr and "wrote 200 rows" in r.stderr
    assert out.read_bytes() == reference


def test_generate_adds_a_column_to_a_dataset(cluster: str) -> None:
    prompts = [f"Fortune {i}:" for i in range(20)]
    ds = ray.data.from_items([{"prompt": p, "n": i} for i, p in enumerate(prompts)])
    out = trit_ray.generate(ds, max_new_tokens=6, workers=2, slots=3, batch_size=4).take_all()
    g = Generator.from_pretrained(threads=1)
    assert sorted(row["n"] for row in out) == list(range(20))
    for row in out:
        assert row["generated_text"] == g.generate(row["prompt"], 6)
    chats = ray.data.from_items(
        [{"messages": [{"role": "user", "content": q}]} for q in QUESTIONS[:3]]
    )
    replies = trit_ray.generate(
        chats, column="messages", output_column="reply", max_new_tokens=8
    ).take_all()
    assert sorted(r["reply"] for r in replies) == sorted(alone(q) for q in QUESTIONS[:3])
