"""The `trit` command, run as a subprocess on a fixture model."""

from __future__ import annotations

import subprocess
import sys

from conftest import FIXTURES

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


def test_errors_are_one_line_and_exit_1() -> None:
    r = run("generate", "-m", str(FIXTURES / "missing"), "-p", "x")
    assert r.returncode == 1
    assert r.stderr.startswith("trit: error: no model folder")
    r = run("generate", "-m", MODEL, "-p", "x", "--top-p", "2")
    assert r.returncode == 1 and "top_p" in r.stderr
