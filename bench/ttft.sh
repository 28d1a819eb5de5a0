#!/usr/bin/env bash
# Time to first token for a long prompt under a tight budget: prefill grouped
# by expert (layer-major chunks, each expert read once per layer per chunk)
# against token-by-token prefill (--prefill-chunk 1). Uses the vault from
# bench/stream.sh.
#
#   PROMPT=512 PCT=25 bench/ttft.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${SMOE_BENCH_DIR:-$HOME/.cache/smoe-bench}
VAULT=${VAULT:-$DIR/qwen3-30b-a3b-8l-q4_k}
PROMPT=${PROMPT:-512}
PCT=${PCT:-25}
[ -d "$VAULT" ] || { echo "no vault at $VAULT: run bench/stream.sh first" >&2; exit 1; }
cargo build --release --quiet --bin smoe
EXPERT_BYTES=$(python3 -c "
import json
m=json.load(open('$VAULT/manifest.json'))
print(sum(l['record_len']*len(l['offsets']) for l in m['experts']))")
budget=$((EXPERT_BYTES * PCT / 100))
for chunk in "$PROMPT" 1; do
    target/release/smoe bench --model "$VAULT" --device cpu --ram-budget "$budget" --prefetch off \
        --prompt-tokens "$PROMPT" --gen-tokens 1 --repeat 1 --prefill-chunk "$chunk" --json |
    python3 -c "
import json, sys
r = json.load(sys.stdin); s = r['streaming']
print('prefill chunk %4s: time to first token %7.1f s, prefill %6.1f tok/s, %6.2f GB read' % ('$chunk', r['ttft_s'], r['prefill_tok_s'], s['prefill_bytes_read'] / 1e9))"
done
