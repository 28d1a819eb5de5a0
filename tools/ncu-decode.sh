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
set -euo pipefail
NCU=${NCU:-$(command -v ncu || echo /usr/local/cuda/bin/ncu)}
SMOE=$1 VAULT=$2
shift 2
"$NCU" --clock-control none --metrics gpu__time_duration.sum --launch-skip "${SKIP:-1500}" \
    --launch-count "${LAUNCHES:-900}" --print-summary per-kernel \
    "$SMOE" bench --model "$VAULT" --device cuda --prompt-tokens 64 --gen-tokens 24 --repeat 1 "$@" 2>&1 |
    grep -vE '^==PROF==|^\s*$' | cut -c1-160
