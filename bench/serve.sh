#!/usr/bin/env bash
# Decode speed through `smoe serve` against `smoe run` on the same model,
# prompt and token count, in one script so the two share the machine's
# state. Each `smoe run` is a fresh process; the server loads once and
# keeps its expert cache (and, for a repeated prompt, the prompt's KV)
# across requests, so its first request and its later ones are reported
# apart. Medians of $REPEAT.
#
#   bench/serve.sh                                   # the fixture model
#   MODEL=~/.cache/smoe-bench/qwen3-30b-a3b-8l-q4_k TOKENS=32 bench/serve.sh
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:-fixtures/qwen3-moe-a}
TOKENS=${TOKENS:-32}
REPEAT=${REPEAT:-3}
BUDGET=${BUDGET:-auto}
PROMPT=${PROMPT:-Write a short story about a lighthouse keeper.}

cargo build --release --quiet --bin smoe
SMOE=target/release/smoe
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB RAM, $(uname -m)"
echo "model: $MODEL, $TOKENS tokens, greedy, --ram-budget $BUDGET, median of $REPEAT"

for r in $(seq "$REPEAT"); do
    "$SMOE" run --model "$MODEL" --prompt "$PROMPT" --max-tokens "$TOKENS" --ram-budget "$BUDGET" --json
done | python3 -c "
import json, statistics, sys
runs = [json.loads(l) for l in sys.stdin if l.strip()]
print('smoe run (a process per reply)   decode %.2f tok/s' % statistics.median(r['timings']['decode_tok_s'] for r in runs))"

log=$(mktemp)
"$SMOE" serve --model "$MODEL" --device cpu --port 0 --ram-budget "$BUDGET" 2>"$log" &
pid=$!
trap 'kill $pid 2>/dev/null; rm -f "$log"' EXIT
python3 - "$log" "$TOKENS" "$REPEAT" "$PROMPT" <<'PY'
import json, re, statistics, sys, time, urllib.request
log, tokens, repeat, prompt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
while True:
    m = re.search(r"listening on (http://\S+)", open(log).read())
    if m:
        break
    time.sleep(0.1)
url = m.group(1)
while True:
    try:
        if json.load(urllib.request.urlopen(url + "/health"))["status"] == "ok":
            break
    except Exception:
        pass
    time.sleep(0.2)

def post(stream):
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
            "temperature": 0, "stream": stream, "stream_options": {"include_usage": True}}
    req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    t0, first, n, final = time.perf_counter(), None, 0, None
    with urllib.request.urlopen(req) as r:
        if not stream:
            final = json.load(r)
        else:
            for line in r:
                line = line.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    final = chunk
                elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    first = first or time.perf_counter()
                    n += 1
    end = time.perf_counter()
    server = final["timings"]["predicted_per_second"]
    client = (n - 1) / (end - first) if stream and n > 1 and first else None
    return server, client, end - t0

first = post(False)
print("smoe serve, first request        decode %.2f tok/s (server), %.2f s wall" % (first[0], first[2]))
whole = [post(False) for _ in range(repeat)]
streamed = [post(True) for _ in range(repeat)]
med = lambda xs: statistics.median(xs)
print("smoe serve, later requests       decode %.2f tok/s (server), %.2f s wall" % (med(w[0] for w in whole), med(w[2] for w in whole)))
print("smoe serve, streamed (SSE)       decode %.2f tok/s (server), %.2f tok/s seen by the client" % (
    med(s[0] for s in streamed), med(s[1] for s in streamed)))
h = json.load(urllib.request.urlopen(url + "/health"))
if h["cache"]:
    print("expert cache after the server's requests: hit rate %.3f, read %.2f GB/s" % (h["cache"]["hit_rate"], h["cache"]["read_gb_s"]))
PY
