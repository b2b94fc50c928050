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

# PATH without rustup's folders (~/.cargo/bin, $CARGO_HOME/bin), so nothing in
# the install can fall back to building from source. A system toolchain
# (/usr/bin/cargo) cannot be taken off PATH this way: the check then stops.
clean_path=
IFS=: read -r -a dirs <<<"$PATH"
for dir in "${dirs[@]}"; do
    if [ -z "$dir" ] || [[ "$dir" == */.cargo/bin ]] || [ "$dir" = "${CARGO_HOME:-}/bin" ] \
        || [ -e "$dir/rustup" ]; then
        continue
    fi
    clean_path=${clean_path:+$clean_path:}$dir
done
export PATH=$clean_path
for tool in cargo rustc; do
    if command -v "$tool" >/dev/null; then
        echo "check-wheel: $tool is still on PATH ($(command -v "$tool")): run this where Rust is installed only by rustup" >&2
        exit 1
    fi
done
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
