#!/usr/bin/env bash
# Prefetch on/off and cache policy across RAM budgets, with `smoe bench`.
#
# Uses the synthetic Qwen3-30B-A3B vault that bench/stream.sh builds (run
# that first, or point VAULT at any vault). For each budget (a share of the
# vault's expert bytes) and each setting it prints the median decode tok/s,
# time to first token, hit rate, prediction recall/precision, MB read per
# token, time blocked on I/O, and how close decode is to the I/O roofline
# measured in the same run.
#
#   bench/readahead.sh
#   BUDGETS="25 10" PROMPT=128 GEN=32 REPEAT=3 bench/readahead.sh
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=${SMOE_BENCH_DIR:-$HOME/.cache/smoe-bench}
VAULT=${VAULT:-$DIR/qwen3-30b-a3b-8l-q4_k}
BUDGETS=${BUDGETS:-"25 10"}
SETTINGS=${SETTINGS:-"off/lru on/lru off/lfu on/lfu"}
PROMPT=${PROMPT:-64}
GEN=${GEN:-32}
REPEAT=${REPEAT:-3}

[ -d "$VAULT" ] || { echo "no vault at $VAULT: run bench/stream.sh first" >&2; exit 1; }
cargo build --release --quiet --bin smoe
SMOE=target/release/smoe
EXPERT_BYTES=$(python3 -c "
import json
m=json.load(open('$VAULT/manifest.json'))
print(sum(l['record_len']*len(l['offsets']) for l in m['experts']))")

echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB RAM; vault $VAULT"
echo "prompt $PROMPT tokens, $GEN generated, median of $REPEAT (cache warm after the first run)"
printf '%-7s %-9s %-6s %10s %8s %8s %8s %9s %9s %12s %9s\n' \
    budget prefetch policy decode_t/s ttft_s hit recall precision MB/token blocked_ms/t roofline
for pct in $BUDGETS; do
    budget=$((EXPERT_BYTES * pct / 100))
    for setting in $SETTINGS; do
        prefetch=${setting%/*}
        policy=${setting#*/}
        "$SMOE" bench --model "$VAULT" --device cpu --ram-budget "$budget" --prefetch "$prefetch" --cache-policy "$policy" \
            --prompt-tokens "$PROMPT" --gen-tokens "$GEN" --repeat "$REPEAT" --json |
        python3 -c "
import json, sys
r = json.load(sys.stdin); s = r['streaming']
roof = s['decode_vs_roofline']
share = lambda v: '-' if v is None else '%.3f' % v
print('%-7s %-9s %-6s %10.2f %8.2f %8.3f %8s %9s %9.1f %12.1f %9s' % ('$pct%', '$prefetch', '$policy',
      r['decode_tok_s'], r['ttft_s'], s['decode_hit_rate'], share(s['recall']), share(s['precision']),
      s['bytes_read_per_token'] / 1e6, s['blocked_ms_per_token'], '-' if roof is None else '%.0f%%' % (100 * roof)))"
    done
done
