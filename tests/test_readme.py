"""Every code block of README.md, run as written, so a README that drifts fails.

The examples use the bundled model, so they run offline; the Hub forms in them
are commented-out `# trit ...` lines, which are parsed (their flags must exist)
but not run, since tests never download. Python blocks are executed; in bash
blocks each command is run, or checked where running it here would make no
sense:

- `trit ...` runs (stdin "Hello"), except with a Hub id or `--synthetic`
  (a download, or a 1 GB checkpoint and minutes of benchmark): parsed only.
- `trit serve`: the first one starts on a free loopback port and serves the
  `curl` and OpenAI-client examples (their `127.0.0.1:8000` points to it);
  any other starts, answers /health (and 401 without its --api-key), stops.
- `pip install` checks its target (the checkout with a real extra, or the
  wheel's name); `scripts/*` must exist and be executable (they build wheels
  or run this very suite); `cargo bench --bench NAME` must name a bench.
- A block preceded by `<!-- output of: COMMAND -->` must be COMMAND's stdout.
Anything else fails: a new kind of example needs a rule here.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from trit import cli

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_ADDRESS = "127.0.0.1:8000"
API_KEY = "readme-test-key"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "KEY": API_KEY, "PYTHONUNBUFFERED": "1"}


@dataclass(frozen=True)
class Block:
    lang: str
    text: str
    line: int  # of the opening fence, 1-based
    output_of: str | None  # the command whose stdout this block shows


def readme_blocks() -> list[Block]:
    lines = README.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        fence = re.fullmatch(r"```(\w*)\s*", lines[i])
        if not fence:
            i += 1
            continue
        end = lines.index("```", i + 1)
        marker = re.fullmatch(r"<!-- output of: (.+) -->", lines[i - 1]) if i else None
        text = "\n".join(lines[i + 1 : end]) + "\n"
        blocks.append(Block(fence[1], text, i + 1, marker[1] if marker else None))
        i = end + 1
    return blocks


def commands(text: str) -> Iterator[tuple[list[str], bool]]:
    """The commands of a bash block as argument lists, with whether each is
    commented out (`# trit ...`: to be parsed, not run)."""
    pending = ""
    for line in text.replace("\\\n", " ").splitlines():
        commented = re.match(r"#\s+(trit .*)", line)
        if commented and not pending:
            yield shlex.split(commented[1], comments=True), True
            continue
        pending += line + "\n"
        try:
            words = shlex.split(pending, comments=True)
        except ValueError:  # a quote spans lines (curl -d '{...}')
            continue
        pending = ""
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            yield words[:cut], False
            words = words[cut + 1 :]
    assert not pending, f"unterminated command: {pending!r}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def trit(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trit.cli", *args],
        cwd=ROOT,
        env=ENV,
        input="Hello\n",
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def parse_only(args: list[str]) -> None:
    try:
        cli._parser().parse_args(args)
    except SystemExit as exc:
        raise AssertionError(f"trit {shlex.join(args)}: the flags do not parse") from exc


def needs_download_or_minutes(args: list[str]) -> bool:
    if "--synthetic" in args:
        return True
    model = args[args.index("-m") + 1] if "-m" in args else None
    return model is not None and not (ROOT / model).exists()


class Server:
    """`trit serve` with the README's arguments, on a free loopback port."""

    def __init__(self, args: list[str]) -> None:
        for flag in ("--host", "--port"):
            if flag in args:
                i = args.index(flag)
                del args[i : i + 2]
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "trit.cli", *args, "--host", "127.0.0.1"]
            + ["--port", str(self.port), "--log-level", "warning"],
            cwd=ROOT,
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        while self.status("/health") != 200:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"trit {shlex.join(args)} did not come up: {self.stderr}")
            time.sleep(0.2)

    def status(self, path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://{self.address}{path}", timeout=5) as r:
                return int(r.status)
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0

    def stop(self) -> None:
        self.proc.terminate()
        try:
            _, self.stderr = self.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, self.stderr = self.proc.communicate()

    stderr = ""


class ReadmeServer:
    """The first `trit serve` of the README, which the examples after it call."""

    server: Server | None = None


@pytest.fixture(scope="module")
def readme_server() -> Iterator[ReadmeServer]:
    holder = ReadmeServer()
    yield holder
    if holder.server is not None:
        holder.server.stop()


def the_server(holder: ReadmeServer) -> Server:
    if holder.server is None:
        first = next(
            args
            for block in readme_blocks()
            if block.lang == "bash"
            for args, commented in commands(block.text)
            if args[:2] == ["trit", "serve"] and not commented
        )
        holder.server = Server(first[1:])
    return holder.server


def pyproject_version() -> str:
    found = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert found
    return found[1]


def check_pip(args: list[str]) -> None:
    assert args[:2] == ["pip", "install"] and len(args) == 3, shlex.join(args)
    target = args[2]
    if target.endswith(".whl"):
        wheel = f"trit-{pyproject_version()}-cp39-abi3-manylinux2014_x86_64.manylinux_2_17_x86_64"
        assert fnmatch.fnmatch(f"dist/{wheel}.whl", target), target
        return
    extra = re.fullmatch(r"\.(?:\[(\w+)\])?", target)
    assert extra, f"pip install {target}: not this checkout"
    if extra[1]:
        pyproject = (ROOT / "pyproject.toml").read_text()
        assert re.search(rf"^{extra[1]} = \[", pyproject, re.M), f"no extra {extra[1]!r}"


def run_command(args: list[str], holder: ReadmeServer) -> None:
    env_prefix = 0
    while re.fullmatch(r"[A-Z_]+=\S*", args[env_prefix]):
        env_prefix += 1
    args = [os.path.expandvars(a) for a in args[env_prefix:]]
    program = args[0]
    if program == "trit":
        if needs_download_or_minutes(args[1:]):
            parse_only(args[1:])
        elif args[1] == "serve":
            if holder.server is None:
                the_server(holder)
            else:
                other = Server(args[1:])
                try:
                    if "--api-key" in args:
                        assert other.status("/v1/models") == 401
                finally:
                    other.stop()
        else:
            r = trit(args[1:])
            assert r.returncode == 0, f"{shlex.join(args)}:\n{r.stderr}"
    elif program == "pip":
        check_pip(args)
    elif program.startswith("scripts/"):
        assert os.access(ROOT / program, os.X_OK), f"{program} is not an executable script"
    elif program == "cargo":
        assert args[1:3] == ["bench", "--bench"], shlex.join(args)
        cargo_toml = (ROOT / "Cargo.toml").read_text()
        assert f'[[bench]]\nname = "{args[3]}"' in cargo_toml, f"no bench {args[3]!r}"
    elif program == "curl":
        address = the_server(holder).address
        args = [a.replace(README_ADDRESS, address) for a in args]
        r = subprocess.run(
            ["curl", "-sS", "--fail-with-body", "--max-time", "60", *args[1:]],
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert r.returncode == 0, f"{shlex.join(args)}:\n{r.stdout}{r.stderr}"
        if '"stream": true' in " ".join(args):
            assert r.stdout.rstrip().endswith("data: [DONE]"), r.stdout
    else:
        raise AssertionError(f"test_readme.py has no rule for `{shlex.join(args)}`")


BLOCKS = readme_blocks()


@pytest.mark.parametrize("block", BLOCKS, ids=[f"README.md:{b.line}" for b in BLOCKS])
def test_readme_example(block: Block, readme_server: ReadmeServer) -> None:
    if block.output_of is not None:
        args = shlex.split(block.output_of)
        assert args[0] == "trit"
        r = trit(args[1:])
        assert r.returncode == 0, r.stderr
        assert r.stdout.rstrip("\n") == block.text.rstrip("\n")
    elif block.lang == "python":
        text = block.text
        if README_ADDRESS in text:
            text = text.replace(README_ADDRESS, the_server(readme_server).address)
        exec(compile(text, f"README.md:{block.line}", "exec"), {"__name__": "readme_example"})
    elif block.lang == "bash":
        for args, commented in commands(block.text):
            if commented:
                parse_only(args[1:])
            else:
                run_command(args, readme_server)
    else:
        assert block.lang == "text", f"README.md:{block.line}: a block with no language"
        # Text that is not an example: the layout of the repository.
        for folder in re.findall(r"^(\w+)/ ", block.text, re.M):
            assert (ROOT / folder).is_dir(), folder


def test_every_block_is_found() -> None:
    # A fence the parser missed would be an example nobody runs.
    fences = README.read_text(encoding="utf-8").count("\n```")
    assert fences == 2 * len(BLOCKS)
    assert {b.lang for b in BLOCKS} == {"bash", "python", "text"}
