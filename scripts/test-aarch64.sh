#!/usr/bin/env bash
# Runs the crate's tests for aarch64, where the Neon kernels are compiled and
# compared with the scalar definition (rust/kernels/tests.rs runs every kernel
# Kernel::supported() lists). On an x86-64 host it cross-links with the
# Debian/Ubuntu cross gcc and runs the test binaries under qemu-user (set
# through cargo's environment variables rather than a .cargo/config.toml, which
# would also apply to native builds on Arm machines); whatever is missing is
# installed first. Clippy runs for the target too, since the x86-64 lint pass
# never compiles the Neon module.
#
# Usage: scripts/test-aarch64.sh [extra cargo test args, e.g. -- kernels::]
# Set CARGO_TARGET_DIR to build somewhere other than target/.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

TARGET=aarch64-unknown-linux-gnu
PACKAGES=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user)

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    else
        sudo "$@"
    fi
}

if [ "$(uname -m)" = aarch64 ]; then
    # Native: no cross linker or emulator.
    export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=cc
    export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER=env
else
    export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
    export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
    missing=()
    for pkg in "${PACKAGES[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
            missing+=("$pkg")
        fi
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "installing ${missing[*]}" >&2
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
fi

if ! rustup target list --installed | grep -qx "$TARGET"; then
    rustup target add "$TARGET"
fi

cargo clippy --target "$TARGET" --all-targets -- -D warnings
# Release: the kernels are tested as they ship, and the reference sums run
# fast enough under emulation.
exec cargo test --release --target "$TARGET" "$@"
