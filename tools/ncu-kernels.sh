#!/usr/bin/env bash
# Nsight Compute on the CUDA kernel bench, for the kernels whose speed is
# in question: why a matrix-vector kernel reaches 150-600 GB/s of an
# H200's 4.8 TB/s (memory throughput, achieved occupancy, registers per
# thread, what warps stall on). Run on the GPU machine from the
# repository root, with tools/test-cuda.sh's target/devC/cuda_bench
# carried (bench/cuda.sh pack puts it under target/devX xz-compressed):
#
#   tools/ncu-kernels.sh [KERNEL_REGEX]     default: matvec_q6_k|matvec_q4_k|attention
#
# One launch of each matching kernel is profiled (ncu replays it for its
# counters); a run takes about a minute. ncu ships with the CUDA toolkit
# (/usr/local/cuda/bin/ncu there).
set -euo pipefail
cd "$(dirname "$0")/.."
NCU=${NCU:-$(command -v ncu || echo /usr/local/cuda/bin/ncu)}
BENCH=${BENCH:-target/devC/cuda_bench}
if [ ! -x "$BENCH" ]; then
    mkdir -p "$(dirname "$BENCH")"
    xz -dc target/devX/cuda_bench.xz >"$BENCH"
    chmod +x "$BENCH"
fi
REGEX=${1:-'matvec_q6_k|matvec_q4_k|attention'}
"$NCU" --kernel-name "regex:^($REGEX)\$" --launch-skip 20 --launch-count 3 \
    --section SpeedOfLight --section Occupancy --section LaunchStats \
    --section WarpStateStats --section MemoryWorkloadAnalysis \
    "$BENCH" 2>&1 | grep -vE '^==PROF==|^\s*$' | cut -c1-160
