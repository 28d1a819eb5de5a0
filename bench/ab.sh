#!/usr/bin/env bash
# Same-run A/B of two smoe binaries on one vault: rounds alternate A and B,
# each round one `smoe bench` per binary and mode (resident, and an expert
# cache of each size in CAP), and the medians are compared.
#
#   bench/ab.sh OLD_SMOE NEW_SMOE VAULT [ROUNDS=5] [THREADS=2]
#
# PP (128) prompt tokens and TG (32) generated tokens per run; CAP is the
# capped modes' --ram-budget, one or more sizes apart by spaces (default
# 648MiB: a quarter of the 8-layer bench vault's 2.53 GiB of experts, as
# `smoe inspect` prints them; 259MiB is a tenth). MODES, when set, replaces
# those modes: NAME=FLAGS entries apart by spaces, each entry's flags apart
# by commas; the CUDA rows of bench/cuda.sh, on the GPU machine:
#
#   MODES="vram=--device,cuda,--vram-budget,auto host=--device,cuda,--vram-budget,0
#          quarter=--device,cuda,--vram-budget,680526848" PP=512 TG=128 \
#       bench/ab.sh OLD NEW VAULT 5 16
set -euo pipefail
A=$1 B=$2 VAULT=$3 ROUNDS=${4:-5} THREADS=${5:-2}
PP=${PP:-128} TG=${TG:-32} CAP=${CAP:-648MiB}
if [ -z "${MODES:-}" ]; then
    MODES="resident=--ram-budget,64GiB"
    for c in $CAP; do MODES+=" $c=--ram-budget,$c"; done
fi
OUT=$(mktemp)
for r in $(seq "$ROUNDS"); do
    for bin in A B; do
        exe=${!bin}
        for entry in $MODES; do
            mode=${entry%%=*}
            IFS=, read -r -a flags <<<"${entry#*=}"
            "$exe" bench --model "$VAULT" --device cpu --threads "$THREADS" --prompt-tokens "$PP" \
                --gen-tokens "$TG" --repeat 1 "${flags[@]}" --json |
                python3 -c "import json,sys; r=json.load(sys.stdin); print(json.dumps({'bin':'$bin','mode':'$mode','prefill':r['prefill_tok_s'],'decode':r['decode_tok_s']}))" >>"$OUT"
        done
    done
done
python3 - "$OUT" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"{'mode':<9} {'measure':<8} {'A median':>9} {'B median':>9} {'B/A':>6}   A runs / B runs")
for mode in dict.fromkeys(r["mode"] for r in rows):
    for k in ("prefill", "decode"):
        a = [r[k] for r in rows if r["bin"] == "A" and r["mode"] == mode]
        b = [r[k] for r in rows if r["bin"] == "B" and r["mode"] == mode]
        ma, mb = statistics.median(a), statistics.median(b)
        print(f"{mode:<9} {k:<8} {ma:>9.2f} {mb:>9.2f} {mb/ma:>6.3f}   "
              + " ".join(f"{x:.1f}" for x in a) + " / " + " ".join(f"{x:.1f}" for x in b))
PY
rm -f "$OUT"
