#!/usr/bin/env bash
# Decode speed of a vault streamed under shrinking RAM budgets.
#
# Builds (once, cached under $SMOE_BENCH_DIR) a synthetic Qwen3-30B-A3B
# checkpoint cut to 8 layers with the real Qwen3 tokenizer, converts it to a
# q4_k vault, then decodes the same prompt with the expert cache at 100%,
# 50%, 25% and 10% of the vault's expert bytes. Prints the median of
# $REPEAT runs per budget: decode tok/s, hit rate, read GB/s and the time
# the compute thread was blocked on I/O per token.
#
#   bench/stream.sh            # from the repository root
#   LAYERS=8 TOKENS=32 REPEAT=3 SMOE_BENCH_DIR=~/.cache/smoe-bench bench/stream.sh
set -euo pipefail
cd "$(dirname "$0")/.."

LAYERS=${LAYERS:-8}
TOKENS=${TOKENS:-32}
REPEAT=${REPEAT:-3}
EXPERTS=${EXPERTS:-q4_k}
DIR=${SMOE_BENCH_DIR:-$HOME/.cache/smoe-bench}
TOKENIZER=${TOKENIZER:-../shared/qwen3-tokenizer}
CKPT="$DIR/qwen3-30b-a3b-${LAYERS}l"
VAULT="$DIR/qwen3-30b-a3b-${LAYERS}l-$EXPERTS"

cargo build --release --quiet --bin smoe --example synth
SMOE=target/release/smoe
mkdir -p "$DIR"
[ -d "$CKPT" ] || target/release/examples/synth --preset qwen3-30b-a3b --layers "$LAYERS" --tokenizer "$TOKENIZER" -o "$CKPT"
[ -d "$VAULT" ] || "$SMOE" convert "$CKPT" -o "$VAULT" --experts "$EXPERTS"

EXPERT_BYTES=$(python3 -c "
import json,sys
m=json.load(open('$VAULT/manifest.json'))
print(sum(l['record_len']*len(l['offsets']) for l in m['experts']))")

echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB RAM, $(uname -m)"
echo "vault: $VAULT ($EXPERTS experts, $((EXPERT_BYTES / 1048576)) MiB of experts), $TOKENS tokens, median of $REPEAT"
printf '%-8s %10s %10s %8s %10s %14s %12s\n' budget cache_MiB decode_t/s hit_rate read_GB/s blocked_ms/tok MB_read/tok
for pct in 100 50 25 10; do
    budget=$((EXPERT_BYTES * pct / 100))
    for r in $(seq "$REPEAT"); do
        "$SMOE" run --model "$VAULT" --prompt "Write a short story about a lighthouse keeper." \
            --max-tokens "$TOKENS" --ram-budget "$budget" --json
    done | python3 -c "
import json, statistics, sys
runs = [json.loads(l) for l in sys.stdin if l.strip()]
med = lambda f: statistics.median(f(r) for r in runs)
s = lambda k: med(lambda r: r['stats'][k])
print('%-8s %10.0f %10.2f %8.3f %10.2f %14.1f %12.1f' % ('$pct%', s('cache_bytes') / 2**20,
      med(lambda r: r['timings']['decode_tok_s']), s('hit_rate'), s('read_gb_s'),
      s('blocked_ms_per_token'), s('bytes_read_per_token') / 1e6))"
done
