#!/usr/bin/env bash
# Nsight Compute on smoe's own decode steps: each kernel's device time
# alone (ncu serialises the launches, graphs node by node), where
# `smoe bench --profile`'s events add a few microseconds to every small
# kernel and a graph hides the gaps. Run on the GPU machine with a smoe
# binary built with --features cuda and a vault:
#
#   tools/ncu-decode.sh SMOE VAULT [extra smoe bench flags]
#
# Profiles LAUNCHES launches (default 900: six steps of the 8-layer bench
# model) after the first SKIP (the prompt and the first decode steps).
# PROMPT (default 64) sets the prompt's tokens: decode attention's splits
# and time follow the cache's length, so PROMPT=512 profiles the steps
# bench/cuda.sh times (with SKIP large enough to pass the prompt's
# launches).
# WARM=1 leaves the caches as the step before left them (ncu flushes L2
# before each kernel by default, which makes the many small kernels of a
# decode step read cold what a real step finds in L2).
# KERNELS=REGEX keeps to the kernels it matches and, instead of their
# times, collects why they take them (memory throughput, occupancy,
# registers, what warps stall on), each launch replayed by ncu:
#
#   KERNELS='mmvq_q4_k|norm_q8|route' tools/ncu-decode.sh SMOE VAULT
set -euo pipefail
NCU=${NCU:-$(command -v ncu || echo /usr/local/cuda/bin/ncu)}
SMOE=$1 VAULT=$2
shift 2
if [ -n "${KERNELS:-}" ]; then
    # SKIP and LAUNCHES count only the matching launches here: past the
    # prompt's, a decode step's first few.
    what=(--kernel-name "regex:^(${KERNELS})\$" --launch-skip "${SKIP:-40}" --launch-count "${LAUNCHES:-8}"
        --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats
        --section MemoryWorkloadAnalysis)
else
    what=(--clock-control none --metrics gpu__time_duration.sum --launch-skip "${SKIP:-1500}"
        --launch-count "${LAUNCHES:-900}" --print-summary per-kernel)
fi
[ "${WARM:-0}" = 1 ] && what+=(--cache-control none)
"$NCU" "${what[@]}" \
    "$SMOE" bench --model "$VAULT" --device cuda --prompt-tokens "${PROMPT:-64}" --gen-tokens 24 --repeat 1 "$@" 2>&1 |
    grep -vE '^==PROF==|^\s*$' | cut -c1-160
