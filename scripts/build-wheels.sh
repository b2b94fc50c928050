#!/usr/bin/env bash
# Builds the wheels a release publishes: manylinux2014 (glibc >= 2.17), abi3
# (one wheel for every CPython >= 3.9), for x86_64 and aarch64, into dist/.
# maturin cross-links with zig (the `ziglang` package from PyPI), so neither a
# cross gcc nor Docker is needed; only rustup, to add the Rust target.
# The release workflow (.github/workflows/release.yml) builds the same wheels
# with maturin's GitHub action.
#
# Usage: scripts/build-wheels.sh [rust target ...]
#   default: x86_64-unknown-linux-gnu aarch64-unknown-linux-gnu
# Runs in the active Python environment (installing maturin and ziglang there
# if they are missing). The cross builds go to $TRIT_WHEEL_TARGET_DIR
# (default: target/zig), apart from the native build's target directory, so
# switching between them does not rebuild everything.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
TARGET_DIR=${TRIT_WHEEL_TARGET_DIR:-target/zig}
if [ "$#" -eq 0 ]; then
    set -- x86_64-unknown-linux-gnu aarch64-unknown-linux-gnu
fi

if ! "$PYTHON" -m maturin --version >/dev/null 2>&1 || ! "$PYTHON" -m ziglang version >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q "maturin>=1.7,<2" ziglang
fi

for target in "$@"; do
    if ! rustup target list --installed | grep -qx "$target"; then
        rustup target add "$target"
    fi
    # --compatibility makes maturin refuse a wheel that would need a newer
    # glibc (or another library) than manylinux2014 allows.
    "$PYTHON" -m maturin build --release --zig --target "$target" \
        --compatibility manylinux2014 --target-dir "$TARGET_DIR" --out dist
done
ls -l dist/
