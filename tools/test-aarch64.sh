#!/usr/bin/env bash
# Cross-builds smoe's library tests for arm64 and runs them under qemu-user,
# twice: on qemu's default CPU ("max", which has the dotprod extension) and on
# a Cortex-A53 (ARMv8.0, without it), so that run-time dispatch picks each of
# the NEON dot-product paths once. Emulation checks results only: its timings
# say nothing about real arm64 hardware.
# Arguments go to the test binary, e.g. `tools/test-aarch64.sh kernels::`.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
target=aarch64-unknown-linux-gnu
sysroot=/usr/aarch64-linux-gnu

need=()
command -v qemu-aarch64 >/dev/null 2>&1 || need+=(qemu-user)
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || need+=(gcc-aarch64-linux-gnu)
[ -e "$sysroot/include/stdio.h" ] || need+=(libc6-dev-arm64-cross)
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
rustup target list --installed | grep -qx "$target" || rustup target add "$target"

# Environment rather than a .cargo/config, so the host build is untouched;
# CC and AR are for the C parts of dependencies (tokenizers' oniguruma).
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L $sysroot"
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar

for cpu in max cortex-a53; do
    echo "== qemu-aarch64 -cpu $cpu"
    QEMU_CPU=$cpu cargo test -p smoe --lib --target "$target" -- "$@"
done
