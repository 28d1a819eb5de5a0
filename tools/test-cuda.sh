#!/usr/bin/env bash
# Builds the CUDA tests (crates/smoe/tests/cuda.rs: every kernel, and every
# family's fixture on the GPU against the CPU backend) into one stripped
# binary under target/devC/, for a GPU machine that has the repository's
# tree (the tests read fixtures/ from the directory they run in) but no
# Rust. With `--run`, runs it here too, requiring a GPU: on a machine
# without one every test prints SKIPPED, which is what CI sees.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

# The tests and the kernel bench in one build: the bench target built in
# test mode is the same program (harness = false).
json=$(cargo test -p smoe --features cuda --release --test cuda --bench cuda_bench --no-run \
    --message-format=json 2>/dev/null)
bin=$(sed -n 's/.*"executable":"\([^"]*\/cuda-[0-9a-f]*\)".*/\1/p' <<<"$json" | tail -1)
bench=$(sed -n 's/.*"executable":"\([^"]*\/cuda_bench-[0-9a-f]*\)".*/\1/p' <<<"$json" | tail -1)
[ -n "$bin" ] && [ -n "$bench" ] || { echo "test-cuda: the build gave no test binary" >&2; exit 1; }
mkdir -p target/devC
cp "$bin" target/devC/cuda-tests
cp "$bench" target/devC/cuda_bench
strip target/devC/cuda-tests target/devC/cuda_bench
echo "built target/devC/cuda-tests ($(du -h target/devC/cuda-tests | cut -f1)) and cuda_bench at $(git rev-parse --short HEAD)"
cat <<'HOW'
On the GPU machine, from the repository root (fixtures/ beside it), with
target/devC carried over:
    SMOE_REQUIRE_CUDA=1 target/devC/cuda-tests --nocapture --test-threads=1
    SMOE_REQUIRE_CUDA=1 target/devC/cuda_bench
(bench/cuda.sh pack also puts both, xz-compressed, under target/devX.)
SMOE_REQUIRE_CUDA=1 makes a missing or unusable GPU a failure instead of
SKIPPED; --nocapture shows each comparison's error and tolerance.
HOW
if [ "${1:-}" = "--run" ]; then
    SMOE_REQUIRE_CUDA=1 target/devC/cuda-tests --nocapture --test-threads=1
fi
