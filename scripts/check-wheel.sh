#!/usr/bin/env bash
# Installs a wheel into a fresh virtual environment with no Rust toolchain on
# PATH and runs trit from it, offline, on the bundled model: what a user
# without Rust gets from `pip install trit`.
#
# Usage: scripts/check-wheel.sh dist/trit-*-manylinux*_x86_64.whl
# The wheel's dependencies (numpy, tokenizers, ...) come from the package index.
set -euo pipefail

wheel=$(realpath "${1:?usage: scripts/check-wheel.sh WHEEL}")
PYTHON=$(command -v "${PYTHON:-python3}")
venv=$(mktemp -d)
trap 'rm -rf "$venv"' EXIT

# PATH without any folder that holds cargo or rustc (~/.cargo/bin, a system
# toolchain), so nothing in the install can fall back to building from source.
clean_path=
IFS=: read -r -a dirs <<<"$PATH"
for dir in "${dirs[@]}"; do
    if [ -z "$dir" ] || [ -e "$dir/cargo" ] || [ -e "$dir/rustc" ] || [[ "$dir" == */.cargo/bin ]]; then
        continue
    fi
    clean_path=${clean_path:+$clean_path:}$dir
done
export PATH=$clean_path
if command -v cargo >/dev/null || command -v rustc >/dev/null; then
    echo "check-wheel: cargo or rustc is still on PATH" >&2
    exit 1
fi
unset VIRTUAL_ENV CARGO_TARGET_DIR

"$PYTHON" -m venv "$venv"
start=$(date +%s)
"$venv/bin/python" -m pip install -q --only-binary=:all: "$wheel"
echo "installed $(basename "$wheel") ($(du -k "$wheel" | cut -f1) KiB) in $(($(date +%s) - start)) s"

cd "$venv"  # not the checkout, whose python/ folder could shadow the install
HF_HUB_OFFLINE=1 "$venv/bin/trit" generate -p "Once upon a time" -n 8 --seed 1 --temp 0.8 -t 1
HF_HUB_OFFLINE=1 "$venv/bin/python" -c '
import trit
assert trit.__file__.startswith("'"$venv"'"), trit.__file__
print("trit", trit.__version__, "kernels", trit.kernels.available())
'
