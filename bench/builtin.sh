#!/usr/bin/env bash
# The built-in model's numbers (its model card and the README quote them):
# the held-out evaluation scored by smoe at temperature 0, then `smoe bench`
# over the evaluation prompts (each reply to its <|im_end|>, the expert
# cache warm from prompt to prompt) at a quarter of the expert bytes, with
# read-ahead off and on, against the whole model in the cache as the
# baseline, in the same run.
#
#   bench/builtin.sh
#   REPEAT=3 GEN=64 bench/builtin.sh
set -euo pipefail
cd "$(dirname "$0")/.."

REPEAT=${REPEAT:-3}
GEN=${GEN:-64}
EVAL=models/builtin/eval.json
cargo build --release --quiet --bin smoe
SMOE=target/release/smoe

echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB RAM"
python3 - "$SMOE" "$EVAL" <<'EOF'
import json, subprocess, sys
smoe, path = sys.argv[1:]
items = json.load(open(path))
correct = 0
for it in items:
    out = subprocess.run([smoe, "run", "--prompt", it["prompt"], "--temperature", "0",
                          "--max-tokens", "64", "--json"], check=True, capture_output=True, text=True)
    j = json.loads(out.stdout)
    ok = j["text"].strip() == it["expected"] and j["stop_reason"] == "eos"
    correct += ok
    if not ok:
        print(f"  miss [{it['domain']}] {it['prompt']!r}: {j['text']!r} (want {it['expected']!r})")
print(f"held-out evaluation: {correct}/{len(items)} ({100 * correct / len(items):.1f}%) at temperature 0")
EOF

VAULT=$($SMOE check 2>&1 >/dev/null | sed -n 's/^built-in model: //p' | tail -1)
EXPERT_BYTES=$(python3 -c "
import json
m=json.load(open('$VAULT/manifest.json'))
print(sum(l['record_len']*len(l['offsets']) for l in m['experts']))")
echo "vault $VAULT; $(python3 -c "import json; print(len(json.load(open('$EVAL'))))") prompts, replies up to $GEN tokens, median of $REPEAT passes (cache warm after the first)"
printf '%-7s %-9s %10s %9s %8s %8s %10s %12s %8s\n' \
    budget prefetch decode_t/s vs_full prefill_hit decode_hit recall MB/token blocked_ms/t
base=""
for setting in "100 off" "25 off" "25 on"; do
    pct=${setting% *}
    prefetch=${setting#* }
    json=$($SMOE bench --device cpu --prompts "$EVAL" --gen-tokens "$GEN" --repeat "$REPEAT" \
        --ram-budget $((EXPERT_BYTES * pct / 100)) --prefetch "$prefetch" --json 2>/dev/null)
    line=$(python3 -c "
import json, sys
r = json.loads(sys.argv[1]); s = r['streaming']; base = sys.argv[2]
ratio = r['decode_tok_s'] / float(base) if base else 1.0
rc = '-' if s['recall'] is None else '%.1f%%' % (100 * s['recall'])
print(f\"{r['decode_tok_s']:.1f} {ratio:.2f} {100*s['prefill_hit_rate']:.1f}% {100*s['decode_hit_rate']:.1f}% {rc} {s['bytes_read_per_token']/1e6:.3f} {s['blocked_ms_per_token']:.2f}\")
" "$json" "$base")
    read -r tps ratio phit dhit recall mb blocked <<<"$line"
    [ -n "$base" ] || base=$tps
    printf '%-7s %-9s %10s %9s %8s %8s %10s %12s %8s\n' "$pct%" "$prefetch" "$tps" "$ratio" "$phit" "$dhit" "$recall" "$mb" "$blocked"
done
