#!/usr/bin/env bash
# smoe plan's forecast against smoe bench's measurement, in the same run.
#
#   bench/plan-vs-bench.sh [VAULT]      forecast vs measured at 10/25/50/100% of the expert bytes
#   bench/plan-vs-bench.sh --calibrate  the built-in model's hit-rate curve (plan.rs BUILTIN_CURVE)
#
# VAULT defaults to the 8-layer bench vault. For each budget: `smoe plan
# --measure` (direct reads on the vault's disk, the kernels' GB/s and
# GFLOP/s here) and then `smoe bench` with the same cache (512-token prompt,
# 32 generated, median of 3, cache warm between runs), and the ratio of the
# two. With CURVE=FILE the plan uses that hit curve (smoe bench --json lines
# of this vault) instead of the built-in model's. Threads: 2. Timings on a
# shared machine move with its load: the load average is printed.
set -euo pipefail
cd "$(dirname "$0")/.."
SMOE=${SMOE:-target/release/smoe}
THREADS=${THREADS:-2}
cargo build --release -q -p smoe-cli

if [[ "${1:-}" == --calibrate ]]; then
    # Built-in model: 256 records of 16 KiB.
    for kib in 640 1024 2048 4096; do
        "$SMOE" bench --prompts models/builtin/eval.json --gen-tokens 64 --repeat 1 \
            --threads "$THREADS" --ram-budget "${kib}KiB" --json 2>/dev/null
    done | python3 -c '
import json, sys
for line in sys.stdin:
    s = json.loads(line)["streaming"]
    print("(%.3f, %.3f)" % (s["expert_fraction"], s["decode_hit_rate"]))'
    exit 0
fi

VAULT=${1:-/work/bench/qwen3-30b-a3b-8l-q4_k-bb-default}
CURVE_ARGS=()
[[ -n "${CURVE:-}" ]] && CURVE_ARGS=(--hit-curve "$CURVE")
echo "vault $VAULT | threads $THREADS | load average $(cut -d' ' -f1-3 /proc/loadavg) | $(date -u +%FT%TZ)"
printf '%-6s %-26s %-9s %-7s %-30s %-9s %-7s %-30s %-9s %-7s %s\n' budget "decode tok/s forecast" measured ratio \
    "prefill tok/s forecast" measured ratio "TTFT s forecast" measured ratio "hit plan/bench"
for pct in 10 25 50 100; do
    plan=$("$SMOE" plan "$VAULT" --measure --threads "$THREADS" --ram-budget "$pct%" --ctx 4096 "${CURVE_ARGS[@]}" --json)
    bytes=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["memory"]["ram"]["expert_cache_bytes"])' "$plan")
    bench=$("$SMOE" bench --model "$VAULT" --threads "$THREADS" --ram-budget "$bytes" --ctx 4096 \
        --prompt-tokens 512 --gen-tokens 32 --repeat 3 --json 2>/dev/null)
    python3 - "$pct" "$plan" "$bench" <<'PY'
import json, sys
pct, plan, bench = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
f = plan["forecast"]
def cell(r, measured, p):
    return (f"{r['low']:.{p}f}-{r['high']:.{p}f} ({r['expected']:.{p}f})", f"{measured:.{p}f}",
            f"{measured / r['expected']:.2f}")
rows = cell(f["decode_tok_s"], bench["decode_tok_s"], 2) + cell(f["prefill_tok_s"], bench["prefill_tok_s"], 1) \
    + cell(f["ttft_s"], bench["ttft_s"], 1)
hit = f"{plan['locality']['hit_rate']:.3f}/{bench['streaming']['decode_hit_rate']:.3f}"
print(f"{pct + '%':<6} {rows[0]:<26} {rows[1]:<9} {rows[2]:<7} {rows[3]:<30} {rows[4]:<9} {rows[5]:<7} {rows[6]:<30} {rows[7]:<9} {rows[8]:<7} {hit}")
PY
done
echo "ratio: measured / expected forecast; machine (measured by plan): $(python3 -c 'import json,sys; m=json.loads(sys.argv[1])["machine"]; print("disk %.2f GB/s, kernels %.1f GB/s, %.0f GFLOP/s" % (m["disk_gbps"], m["mem_gbps"], m["gflops"]))' "$plan")"
