"""The `trit` command, run as a subprocess on a fixture model."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time

from conftest import FIXTURES

import trit

MODEL = str(FIXTURES / "tiny-gqa-packed")


def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trit.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_generate_streams_text_and_reports_speed() -> None:
    args = ("generate", "-m", MODEL, "-p", "Hello world", "-n", "12", "-t", "1")
    r = run(*args, "--seed", "3", "--temp", "0.7")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    assert "prompt: 9 tokens" in r.stderr and "tokens/s" in r.stderr
    assert "generation: " in r.stderr
    again = run(*args, "--seed", "3", "--temp", "0.7")
    assert again.stdout == r.stdout


def test_chat_reads_turns_and_resets() -> None:
    r = run("chat", "-m", MODEL, "-n", "4", "-v", stdin="Hi!\n/reset\nHello\n")
    assert r.returncode == 0, r.stderr
    assert "(history cleared)" in r.stderr
    assert r.stderr.count("tokens/s") == 4  # prompt and generation, two replies


def test_chat_forgets_the_oldest_turns_when_the_context_fills() -> None:
    # The bundled model holds 256 tokens: six exchanges of up to 100 tokens
    # cannot all stay, and the chat goes on without them.
    turns = "Tell me a story.\nWhat is love?\nAnd then?\nWhy?\nTell me more.\nOK.\n"
    r = run("chat", "-n", "100", "--temp", "0.8", "--seed", "1", "-t", "1", "-v", stdin=turns)
    assert r.returncode == 0, r.stderr
    assert "error" not in r.stderr
    assert r.stderr.count("generation: ") == 6  # every turn was answered
    assert "the context holds 256 tokens: forgot the oldest exchange" in r.stderr


def test_chat_keeps_the_session_when_a_message_does_not_fit() -> None:
    long_message = "the fortune cookie says " * 80
    r = run("chat", "-n", "8", "-t", "1", "-v", stdin=f"{long_message}\nHello\n")
    assert r.returncode == 0, r.stderr
    assert "(not sent: this message takes " in r.stderr and "/reset" in r.stderr
    assert r.stderr.count("generation: ") == 1  # "Hello" was answered


# Generation of the bundled model is faster than a signal can be aimed at it,
# so each text piece is delayed; the SIGINT itself is real.
SLOW_CHAT = """
import sys, time
import trit.generator
from trit.cli import main

def slow_stream(self, *args, **kwargs):
    for piece in original(self, *args, **kwargs):
        time.sleep(0.02)
        yield piece

original = trit.generator.Generator._stream
trit.generator.Generator._stream = slow_stream
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_stops_the_reply_not_the_chat() -> None:
    args = ["chat", "-n", "200", "--temp", "0.8", "--seed", "1", "-t", "1", "-v"]
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_CHAT, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(b"Tell me a story.\n")
        proc.stdin.flush()
        first = b""
        deadline = time.monotonic() + 60
        while len(first.strip()) < 3 and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                first += os.read(proc.stdout.fileno(), 4096)
        assert first.strip(), "the first reply never started"
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(b"Hello\n", timeout=60)
    finally:
        proc.kill()
    stderr = err.decode()
    assert proc.returncode == 0, stderr
    assert "(reply stopped)" in stderr
    assert stderr.count("generation: ") == 1  # the second reply ran to its end
    assert (first + rest).strip()


def test_errors_are_one_line_and_exit_1() -> None:
    r = run("generate", "-m", str(FIXTURES / "missing"), "-p", "x")
    assert r.returncode == 1
    assert r.stderr.startswith("trit: error: no model folder")


def test_a_refused_sampling_value_names_its_flag_before_loading() -> None:
    # A missing model folder too: the flag is checked first.
    r = run("generate", "-m", str(FIXTURES / "missing"), "-p", "x", "--top-p", "2")
    assert r.returncode == 2
    assert r.stderr == "trit generate: error: argument --top-p: top_p must be in (0, 1], got 2\n"
    r = run("chat", "-m", MODEL, "--repeat-penalty", "0")
    assert r.returncode == 2 and "argument --repeat-penalty:" in r.stderr


def test_sampling_follows_generation_config_and_prints_its_seed() -> None:
    # The bundled model asks for sampling: a drawn seed is printed, and
    # passing it back repeats the text.
    first = run("generate", "-p", "Once upon a time", "-n", "12")
    assert first.returncode == 0, first.stderr
    seed = re.search(r"sampling with seed (\d+)", first.stderr)
    assert seed, first.stderr
    again = run("generate", "-p", "Once upon a time", "-n", "12", "--seed", seed.group(1))
    assert again.stdout == first.stdout
    assert "sampling with seed" not in again.stderr
    # --temp 0 is greedy (nothing drawn), and the fixture without sampling
    # fields in its generation_config.json stays greedy.
    greedy = run("generate", "-p", "Once upon a time", "-n", "12", "--temp", "0")
    assert "seed" not in greedy.stderr
    assert run("generate", "-p", "Once upon a time", "-n", "12", "--temp", "0").stdout == (
        greedy.stdout
    )
    fixture = run("generate", "-m", MODEL, "-p", "x", "-n", "4")
    assert fixture.returncode == 0 and "seed" not in fixture.stderr


def test_version() -> None:
    r = run("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"trit {trit.__version__}\n"


def test_bad_counts_are_named_by_their_flag() -> None:
    r = run("generate", "-p", "x", "-t", "0")
    assert r.returncode == 2
    assert "argument -t/--threads: must be at least 1, got 0" in r.stderr
    assert "tiny-fortunes" not in r.stderr  # not a model's error
    r = run("chat", "-n", "-1")
    assert r.returncode == 2 and "argument -n/--max-new-tokens: must be at least 0" in r.stderr
    r = run("generate", "-p", "x", "--ctx", "zero")
    assert r.returncode == 2 and "argument -c/--ctx/--n-ctx: expected an integer" in r.stderr


def test_bench_depth_is_its_own_flag() -> None:
    r = run("bench", "-m", MODEL, "-p", "0", "-n", "2", "-t", "1", "-r", "1", "-d", "4", "--json")
    assert r.returncode == 0, r.stderr
    assert '"n_ctx": 4' in r.stdout
    r = run("bench", "-m", MODEL, "--ctx", "4")
    assert r.returncode == 2 and "unrecognized arguments: --ctx" in r.stderr
