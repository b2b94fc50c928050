#!/usr/bin/env bash
# Installs trit and its test tools into .venv, then runs every check CI runs:
# formatting and lints (Rust and Python), the type stub against the built
# module, the Rust unit tests, the Python tests (README.md's examples among
# them), and three optional parts that CI (.ci/run) turns on:
#
#   TRIT_AARCH64=1  the Rust tests for aarch64 under qemu (the NEON kernels),
#                   installing the cross gcc and qemu-user with apt (as root,
#                   through sudo if needed) when they are missing. Unset: run
#                   only if they are already installed; 0: skip.
#   TRIT_WHEEL=1    build the x86_64 manylinux wheel with zig and run it from a
#                   fresh venv with no Rust toolchain on PATH.
#   TRIT_BROWSER=1  install chromium and chromium-driver with apt (as root)
#                   when missing, for the chat page's browser test
#                   (tests/test_webui.py), which is skipped without them.
#   TRIT_RAY=1      install the ray extra (Ray Serve and Ray Data, about 1 GB)
#                   for tests/test_ray.py, a local Ray cluster on loopback
#                   (about 70 s on 2 cores); skipped when Ray is not installed.
#
# About 5 minutes from a fresh clone on 2 cores without the optional parts,
# 3 with warm cargo caches (README.md, "Test").
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip
if [ "${TRIT_RAY:-0}" = 1 ]; then
    python -m pip install -q ".[test,ray]"
else
    python -m pip install -q ".[test]"
fi
rustup component add rustfmt clippy >/dev/null 2>&1 || true

step() { printf '\n== %s\n' "$*"; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

if [ "${TRIT_BROWSER:-0}" = 1 ] && ! { command -v chromium && command -v chromedriver; } >/dev/null; then
    step "apt install chromium chromium-driver (TRIT_BROWSER=1)"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
fi

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
aarch64=${TRIT_AARCH64:-}
if [ -z "$aarch64" ]; then
    if [ "$(uname -m)" = aarch64 ] || { command -v aarch64-linux-gnu-gcc && command -v qemu-aarch64; } >/dev/null; then
        aarch64=1
    else
        aarch64=0
        skipped_aarch64=1
    fi
fi
if [ "$aarch64" = 1 ]; then
    step "cargo test, aarch64 under qemu (NEON)"
    scripts/test-aarch64.sh
    scripts/test-aarch64.sh --features simd-call-counts --test simd_calls
fi
step "pytest"
python -m pytest -q -m "not ray"
if python -c "import ray" 2>/dev/null; then
    # A local Ray cluster that fails to come up would otherwise wait forever.
    step "pytest -m ray (a local Ray cluster; at most 10 minutes)"
    timeout 600 python -m pytest -q -m ray
fi
if [ "${TRIT_WHEEL:-0}" = 1 ]; then
    step "manylinux wheel (x86_64, zig), run without Rust"
    rm -f dist/trit-*manylinux*_x86_64.whl
    scripts/build-wheels.sh x86_64-unknown-linux-gnu
    scripts/check-wheel.sh dist/trit-*manylinux*_x86_64.whl
fi
if [ "${skipped_aarch64:-0}" = 1 ]; then
    printf '\nSkipped the aarch64 tests (no cross gcc and qemu-user here): TRIT_AARCH64=1 %s\n' \
        "scripts/test.sh installs them (apt, as root) and runs them (about 8 more minutes)."
fi
if ! python -c "import ray" 2>/dev/null; then
    printf '\nSkipped the Ray tests (no ray here): %s\n' \
        "TRIT_RAY=1 scripts/test.sh installs the ray extra and runs them (about 70 s more)."
fi
if ! { command -v chromium && command -v chromedriver; } >/dev/null; then
    printf '\nSkipped the chat page in a browser (no chromium and chromedriver here): %s\n' \
        "TRIT_BROWSER=1 scripts/test.sh installs them (apt, as root)."
fi
