#!/usr/bin/env bash
# Installs trit and its test tools into .venv, then runs every check CI runs:
# formatting and lints (Rust and Python), the type stub against the built
# module, the Rust unit tests (x86-64, and aarch64 under qemu where it can be
# set up), and the Python tests.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q ".[test]"
rustup component add rustfmt clippy >/dev/null 2>&1 || true

step() { printf '\n== %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --check
step "cargo clippy -D warnings"
cargo clippy --all-targets --features python -- -D warnings
cargo clippy --all-targets --features simd-call-counts -- -D warnings
step "ruff"
ruff check .
ruff format --check .
step "mypy.stubtest trit._core, mypy"
python -m mypy.stubtest trit._core
mypy python/trit tests
step "cargo test"
cargo test --release
step "cargo test: TRIT_KERNEL=scalar runs no SIMD routine (call counts)"
cargo test --release --features simd-call-counts --test simd_calls
if [ "${TRIT_SKIP_AARCH64:-0}" != 1 ]; then
    step "cargo test, aarch64 under qemu (NEON)"
    scripts/test-aarch64.sh
    scripts/test-aarch64.sh --features simd-call-counts --test simd_calls
fi
step "pytest"
python -m pytest -q
