#!/usr/bin/env bash
# Many users at once: aggregate decode tok/s and p50/p99 inter-token latency
# with 1, 2, 4 and 8 concurrent streams, `smoe serve --parallel N` against
# llama.cpp's `llama-server -np N` on the same model, with the same load
# generator (bench/loadgen.py, Python standard library only), resident and
# under a memory cap of $CAP_PCT% of the GGUF (a cgroup, as in
# bench/vs-llama.cpp.sh; page cache counts against it).
#
#   bench/concurrency.sh              # the 8-layer bench vault and GGUF of vs-llama.cpp.sh
#   ENGINES=smoe SMOE_MODEL= STREAMS="1 2 4" bench/concurrency.sh   # smoe alone, built-in model
#
# Environment (defaults in brackets), so that it runs where there is no Rust:
#   SMOE           smoe binary [target/release/smoe, built when cargo is here]
#   SMOE_MODEL     vault for smoe [vs-llama.cpp.sh's 8-layer q4_k vault];
#                  empty: smoe's built-in model (capped = its default budget,
#                  a quarter of its experts, no cgroup: it is too small for one)
#   LLAMA_SERVER   llama-server binary [built in vs-llama.cpp.sh's llama.cpp
#                  tree with cmake when missing]
#   GGUF           the same model for llama.cpp [vs-llama.cpp.sh's Q4_K_M]
#   ENGINES        "smoe llama"; MODES "resident capped"; STREAMS "1 2 4 8"
#   TOKENS [64] per reply, ROUNDS [2] replies per stream, THREADS [physical
#   cores], CTX [256] context per sequence (the memory plan holds a KV
#   cache of CTX for each of N sequences; the replies need far less),
#   CAP_PCT [25], PROMPT [a varied set; the built-in model's replies are
#   short: "Count from 1 to 100." gets its longest]
# The capped rows need root and a cgroup-v1 memory controller (or cgroup v2
# with the memory controller enabled); without one they are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=${SMOE_BENCH_DIR:-$HOME/.cache/smoe-bench}
LAYERS=${LAYERS:-8}
SMOE=${SMOE:-target/release/smoe}
SMOE_MODEL=${SMOE_MODEL-$DIR/qwen3-30b-a3b-${LAYERS}l-q4_k-bb-default}
GGUF=${GGUF:-$DIR/qwen3-30b-a3b-${LAYERS}l-Q4_K_M.gguf}
LLAMA=${LLAMA:-$DIR/llama.cpp}
LLAMA_SERVER=${LLAMA_SERVER:-$LLAMA/build/bin/llama-server}
ENGINES=${ENGINES:-smoe llama}
MODES=${MODES:-resident capped}
STREAMS=${STREAMS:-1 2 4 8}
TOKENS=${TOKENS:-64}
ROUNDS=${ROUNDS:-2}
THREADS=${THREADS:-$(lscpu -p=core | grep -v '^#' | sort -u | wc -l)}
CTX=${CTX:-256}
CAP_PCT=${CAP_PCT:-25}
PORT=${PORT:-18431}

has() { [[ " $1 " == *" $2 "* ]]; }

if [ "$SMOE" = target/release/smoe ] && command -v cargo >/dev/null; then
    cargo build --release --quiet --bin smoe
fi
if has "$ENGINES" llama && [ ! -x "$LLAMA_SERVER" ]; then
    # The GGUF and llama.cpp's tree come from vs-llama.cpp.sh's setup.
    bench/vs-llama.cpp.sh setup
    cmake --build "$LLAMA/build" -j "$(nproc)" --target llama-server
fi
if has "$ENGINES" smoe && [ -n "$SMOE_MODEL" ] && [ ! -d "$SMOE_MODEL" ]; then
    bench/vs-llama.cpp.sh setup
fi

# The cap: a share of the GGUF, else of smoe's model on disk.
if [ -f "$GGUF" ]; then
    CAP=$(($(stat -c %s "$GGUF") * CAP_PCT / 100))
elif [ -n "$SMOE_MODEL" ]; then
    CAP=$(($(du -sb "$SMOE_MODEL" | cut -f1) * CAP_PCT / 100))
else
    CAP=0
fi
CG=""
if [ -d /sys/fs/cgroup/memory ]; then
    CG=/sys/fs/cgroup/memory/smoe-concurrency-$$
elif grep -qw memory /sys/fs/cgroup/cgroup.subtree_control 2>/dev/null; then
    CG=/sys/fs/cgroup/smoe-concurrency-$$
fi

SERVER_PID=""
stop_server() {
    if [ -n "$SERVER_PID" ]; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=""
    fi
    [ -n "$CG" ] && rmdir "$CG" 2>/dev/null || true
}
OUT=$(mktemp)
LOG=$(mktemp)
trap 'stop_server; rm -f "$OUT" "$LOG"' EXIT

# Starts "$@" in the background, inside the capped cgroup when $1 is
# "capped", and waits until /health answers 200.
start_server() {
    local mode=$1
    shift
    if [ "$mode" = capped ] && [ -n "$CG" ] && [ "$CAP" -gt 0 ]; then
        mkdir -p "$CG"
        if [ -f "$CG/memory.limit_in_bytes" ]; then
            echo "$CAP" >"$CG/memory.limit_in_bytes"
        else
            echo "$CAP" >"$CG/memory.max"
        fi
        # A cold page cache, so neither engine inherits the other's pages.
        sync && echo 1 >/proc/sys/vm/drop_caches
        (echo $BASHPID >"$CG/cgroup.procs" && exec "$@") >"$LOG" 2>&1 &
    else
        "$@" >"$LOG" 2>&1 &
    fi
    SERVER_PID=$!
    for _ in $(seq 1200); do
        if curl -sf "http://127.0.0.1:$PORT/health" >/dev/null 2>&1; then
            return 0
        fi
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            echo "server exited:" >&2
            tail -5 "$LOG" >&2
            SERVER_PID=""
            return 1
        fi
        sleep 0.25
    done
    echo "server not ready after 300 s" >&2
    return 1
}

# CPU seconds the server has used (user + system): tokens per CPU second
# say what batching saves even on a machine busy with other work, where
# wall-clock rates mostly measure the neighbours.
cpu_s() { awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) / hz}' "/proc/$SERVER_PID/stat"; }

run_load() { # engine mode streams
    local before result
    before=$(cpu_s)
    result=$(python3 bench/loadgen.py --url "http://127.0.0.1:$PORT" --streams "$3" --tokens "$TOKENS" \
        --rounds "$ROUNDS" ${PROMPT:+--prompt "$PROMPT"} \
        --label "{\"engine\": \"$1\", \"mode\": \"$2\"}")
    python3 -c "import json, sys; r = json.loads(sys.argv[1]); r['server_cpu_s'] = $(cpu_s) - $before; print(json.dumps(r))" \
        "$result" | tee -a "$OUT"
}

echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB RAM, $(lscpu | sed -n 's/^Model name: *//p')"
echo "smoe model: ${SMOE_MODEL:-built-in}; llama.cpp: $GGUF; $THREADS threads; $TOKENS tokens x $ROUNDS replies per stream; ctx $CTX per sequence"
[ -n "$CG" ] && [ "$CAP" -gt 0 ] && echo "cap: $((CAP / 1048576)) MiB ($CAP_PCT%)"

for mode in $MODES; do
    if [ "$mode" = capped ] && { [ -z "$CG" ] || [ "$CAP" -eq 0 ]; } && { [ -n "$SMOE_MODEL" ] || has "$ENGINES" llama; }; then
        echo "no memory cgroup here: skipping the capped rows" >&2
        continue
    fi
    for n in $STREAMS; do
        for engine in $ENGINES; do
            case $engine in
            smoe)
                model=()
                [ -n "$SMOE_MODEL" ] && model=(--model "$SMOE_MODEL")
                budget=8GiB
                [ "$mode" = capped ] && budget=auto
                start_server "$mode" "$SMOE" serve "${model[@]}" --device cpu --port "$PORT" --threads "$THREADS" \
                    --parallel "$n" --ctx "$CTX" --ram-budget "$budget" --no-check || continue
                ;;
            llama)
                extra=()
                [ "$mode" = capped ] && extra=(--no-repack)
                start_server "$mode" "$LLAMA_SERVER" -m "$GGUF" --port "$PORT" -t "$THREADS" \
                    -np "$n" -c $((CTX * n)) "${extra[@]}" || continue
                ;;
            esac
            # One warm-up reply fills the expert cache or page cache.
            python3 bench/loadgen.py --url "http://127.0.0.1:$PORT" --streams 1 --tokens 8 --rounds 1 >/dev/null
            run_load "$engine" "$mode" "$n"
            stop_server
        done
    done
done

python3 - "$OUT" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(f"\n{'engine':<7} {'mode':<9} {'streams':>7} {'agg tok/s':>10} {'x 1 stream':>10} {'p50 ms':>8} {'p99 ms':>8} {'ttft ms':>8} {'tok/cpu-s':>9} {'errors':>6}")
for r in rows:
    one = next((o for o in rows if (o["engine"], o["mode"], o["streams"]) == (r["engine"], r["mode"], 1)), None)
    rel = r.get("agg_tok_s", 0) / one["agg_tok_s"] if one and one.get("agg_tok_s") else float("nan")
    print(f"{r['engine']:<7} {r['mode']:<9} {r['streams']:>7} {r.get('agg_tok_s', 0):>10.2f} {rel:>10.2f} "
          f"{r.get('itl_ms_p50', float('nan')):>8.1f} {r.get('itl_ms_p99', float('nan')):>8.1f} "
          f"{r.get('ttft_ms_p50', float('nan')):>8.1f} "
          f"{r.get('tokens', 0) / r['server_cpu_s'] if r.get('server_cpu_s') else float('nan'):>9.1f} {r['errors']:>6}")
by = {(r["engine"], r["mode"], r["streams"]): r.get("agg_tok_s") for r in rows}
for mode in ("resident", "capped"):
    for n in sorted({r["streams"] for r in rows}):
        s, l = by.get(("smoe", mode, n)), by.get(("llama", mode, n))
        if s and l:
            print(f"smoe / llama-server, {mode}, {n} streams: {s / l:.2f}x")
PY
