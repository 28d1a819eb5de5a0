#!/usr/bin/env bash
# smoe plan's forecast against smoe bench's measurement, in the same run.
#
#   bench/plan-vs-bench.sh [VAULT]      forecast vs measured at 10/25/50/100% of the expert bytes
#   bench/plan-vs-bench.sh --calibrate  the built-in model's hit-rate curve (plan.rs BUILTIN_CURVE)
#
# VAULT defaults to the 8-layer synthetic Qwen3-30B-A3B q4_k vault of
# bench/vs-llama.cpp.sh, made here if missing (cached under
# $SMOE_BENCH_DIR, default ~/.cache/smoe-bench). For each budget: `smoe
# plan --measure` (batches of direct reads on the vault's disk, the
# kernels' DRAM rate, the engine's own layer at the model's shapes) and
# then `smoe bench` with the same cache (512-token prompt, 32 generated,
# median of 3, cache warm between runs). Prints forecast, measured, the
# ratio measured/forecast and PASS/FAIL against +-25% (decode tok/s) and
# +-35% (prefill tok/s, time to first token), then the components behind
# them: decode and prefill hit rates, the wait for misses per token.
# Exits 1 if any check fails.
#
# The hit-rate curve is this vault's own, recalibrated first as the README
# tells a user to: `smoe bench --json` at 15%, 35% and 70% of the expert
# bytes, with the same prompt length, decode and repeats as the check but
# another prompt (--seed 1), so the forecast at the checked budgets is
# interpolated from text and budgets the measurement never saw. The
# built-in curve (a trained model's learned routing) is printed beside it
# for comparison; CURVE=builtin checks with it instead, CURVE=FILE with
# that file's curve (smoe bench --json lines of this vault).
#
# On a machine without Rust, set SMOE (and SYNTH, to make the default
# vault) to carried binaries. THREADS defaults to the physical cores.
# Timings on a shared machine move with its load, which is printed.
set -euo pipefail
cd "$(dirname "$0")/.."

LAYERS=${LAYERS:-8}
DIR=${SMOE_BENCH_DIR:-$HOME/.cache/smoe-bench}
TOKENIZER=${TOKENIZER:-../shared/qwen3-tokenizer}
THREADS=${THREADS:-$(lscpu -p=core | grep -v '^#' | sort -u | wc -l)}
if [[ -z "${SMOE:-}" ]]; then
    cargo build --release -q -p smoe-cli --bin smoe --example synth
fi
SMOE=${SMOE:-target/release/smoe}
SYNTH=${SYNTH:-target/release/examples/synth}

if [[ "${1:-}" == --calibrate ]]; then
    # Built-in model: 256 records of 16 KiB.
    for kib in 640 1024 2048 4096; do
        "$SMOE" bench --device cpu --prompts models/builtin/eval.json --gen-tokens 64 --repeat 1 \
            --threads "$THREADS" --ram-budget "${kib}KiB" --json 2>/dev/null
    done | python3 -c '
import json, sys
for line in sys.stdin:
    s = json.loads(line)["streaming"]
    print("(%.3f, %.3f)" % (s["expert_fraction"], s["decode_hit_rate"]))'
    exit 0
fi

VAULT=${1:-$DIR/qwen3-30b-a3b-${LAYERS}l-q4_k-bb-default}
if [[ ! -d "$VAULT" ]]; then
    CKPT="$DIR/qwen3-30b-a3b-${LAYERS}l"
    mkdir -p "$DIR"
    [[ -d "$CKPT" ]] || "$SYNTH" --preset qwen3-30b-a3b --layers "$LAYERS" --tokenizer "$TOKENIZER" -o "$CKPT"
    "$SMOE" convert "$CKPT" -o "$VAULT" --experts q4_k --quiet
fi
echo "vault $VAULT | threads $THREADS | $(nproc) CPUs | load average $(cut -d' ' -f1-3 /proc/loadavg) | $(date -u +%FT%TZ)"
results=$(mktemp)
calibration=$(mktemp)
trap 'rm -f "$results" "$calibration"' EXIT
budget_bytes() {
    "$SMOE" plan "$VAULT" --device cpu --ram-budget "$1%" --ctx 4096 --json |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["memory"]["ram"]["expert_cache_bytes"])'
}
CURVE_ARGS=()
case "${CURVE:-}" in
    builtin) ;;
    "")
        for pct in 15 35 70; do
            "$SMOE" bench --model "$VAULT" --device cpu --threads "$THREADS" --ram-budget "$(budget_bytes $pct)" --ctx 4096 \
                --prompt-tokens 512 --gen-tokens 32 --repeat 3 --seed 1 --json 2>/dev/null >>"$calibration"
        done
        CURVE_ARGS=(--hit-curve "$calibration")
        echo "hit curve of this vault (--seed 1): $(python3 -c '
import json, sys
print(", ".join("%.0f%% -> %.3f" % (100 * s["expert_fraction"], s["decode_hit_rate"])
                for s in (json.loads(l)["streaming"] for l in open(sys.argv[1]))))' "$calibration")"
        ;;
    *) CURVE_ARGS=(--hit-curve "$CURVE") ;;
esac
for pct in 10 25 50 100; do
    plan=$("$SMOE" plan "$VAULT" --device cpu --measure --threads "$THREADS" --ram-budget "$pct%" --ctx 4096 "${CURVE_ARGS[@]}" --json)
    bytes=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["memory"]["ram"]["expert_cache_bytes"])' "$plan")
    builtin=$("$SMOE" plan "$VAULT" --device cpu --ram-budget "$pct%" --ctx 4096 --json |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["locality"]["hit_rate"])')
    bench=$("$SMOE" bench --model "$VAULT" --device cpu --threads "$THREADS" --ram-budget "$bytes" --ctx 4096 \
        --prompt-tokens 512 --gen-tokens 32 --repeat 3 --json 2>/dev/null)
    printf '%s\t%s\t%s\t%s\n' "$pct" "$plan" "$bench" "$builtin" >>"$results"
done
python3 - "$results" <<'PY'
import json, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
checks = [("decode tok/s", "decode_tok_s", "decode_tok_s", 0.25, 2),
          ("prefill tok/s", "prefill_tok_s", "prefill_tok_s", 0.35, 1),
          ("TTFT(512) s", "ttft_s", "ttft_s", 0.35, 2)]
failed = 0
print(f"{'budget':<7}{'what':<15}{'forecast (range)':<28}{'measured':>10}{'ratio':>8}  check")
for pct, plan, bench, _ in rows:
    p, b = json.loads(plan), json.loads(bench)
    f = p["forecast"]
    for name, fk, bk, tol, d in checks:
        r, got = f[fk], b[bk]
        ratio = got / r["expected"]
        ok = abs(ratio - 1) <= tol
        failed += not ok
        rng = f"{r['expected']:.{d}f} ({r['low']:.{d}f}-{r['high']:.{d}f})"
        print(f"{pct + '%':<7}{name:<15}{rng:<28}{got:>10.{d}f}{ratio:>8.2f}  {'PASS' if ok else 'FAIL'} (+-{tol:.0%})")
print()
print("components, forecast / measured (decode hit: also the built-in curve's):")
print(f"{'budget':<7}{'decode hit':<21}{'prompt hit':<14}{'misses ms/tok':<16}{'token ms':<18}{'prompt reads':<22}")
for pct, plan, bench, builtin in rows:
    p, b = json.loads(plan), json.loads(bench)
    f, s = p["forecast"], b["streaming"]
    hit = f"{p['locality']['hit_rate']:.2f} / {s['decode_hit_rate']:.2f} ({float(builtin):.2f})"
    phit = f"{p['locality']['prefill_hit_rate']:.2f} / {s['prefill_hit_rate']:.2f}"
    wait = f"{1e3 * f['decode_read_s']['expected']:.1f} / {s['blocked_ms_per_token']:.1f}"
    tok = f"{1e3 / f['decode_tok_s']['expected']:.1f} / {1e3 / b['decode_tok_s']:.1f}"
    reads = f"{f['prefill_read_bytes']['warm'] / 1e6:.0f} / {s['prefill_bytes_read'] / 1e6:.0f} MB"
    print(f"{pct + '%':<7}{hit:<21}{phit:<14}{wait:<16}{tok:<18}{reads:<22}")
m = json.loads(rows[-1][1])["machine"]
layer = m["layer_s"] or {}
print()
print("machine (measured by the last plan): reads " + ", ".join(f"{n} at once {1e3 * t:.1f} ms" for n, t in m["reads_s"])
      + f" ({m['disk_gbps']:.2f} GB/s at 16) | kernels {m['mem_gbps']:.1f} GB/s | one layer: prefill {1e3 * layer.get('prefill', 0):.1f} ms"
      + f" (+ {1e3 * layer.get('session', 0):.1f} ms a new session, once per prompt),"
      + f" decode {1e3 * layer.get('decode', 0):.2f} ms")
print(f"{len(rows) * len(checks) - failed}/{len(rows) * len(checks)} within tolerance")
sys.exit(1 if failed else 0)
PY
