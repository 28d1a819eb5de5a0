#!/usr/bin/env bash
# smoe against llama.cpp on the same synthetic Qwen3-30B-A3B (cut to $LAYERS
# layers), same machine, same thread count, runs interleaved A/B/A/B.
#
#   bench/vs-llama.cpp.sh           # setup (cached) + all measurements
#   bench/vs-llama.cpp.sh setup     # only build llama.cpp, the checkpoint, the GGUF and the vault
#
# Setup, cached under $SMOE_BENCH_DIR (default ~/.cache/smoe-bench):
# - llama.cpp's source from the llama-cpp-python source package on PyPI
#   (vendor/llama.cpp), built with cmake: llama-bench, llama-quantize (~17 min
#   on 2 cores, once);
# - the synthetic checkpoint from examples/synth with the real Qwen3 tokenizer
#   (../shared/qwen3-tokenizer; llama.cpp needs a real one), converted to GGUF
#   by the vendored convert_hf_to_gguf.py and quantized to Q4_K_M;
# - the smoe vault of the same checkpoint: q4_k experts and smoe's default
#   backbone (q4_k, with Q4_K_M's q6_k LM head and v_proj), or --backbone
#   $BACKBONE where set. The vault's name says "bb-default": remove it after
#   changing the default recipe.
#
# Measurements (median of $REPEAT each, engines alternating; smoe runs twice,
# on its vault and on the very Q4_K_M GGUF llama.cpp runs):
# - resident: prefill tok/s of a $PP-token prompt and decode tok/s of $TG tokens;
# - capped: decode with the process in a cgroup-v1 memory cgroup limited to
#   $CAP_PCT% of the GGUF's size (page cache counts against the cap, so mmap'd
#   weights beyond it are re-read from disk; llama.cpp runs with --repack 0 or
#   it is OOM-killed while repacking). smoe's `--ram-budget auto` reads the
#   cgroup's limit and sizes its expert cache to what the backbone and a
#   512-token KV cache leave.
# Needs root for the cgroup, python3, pip, cmake (installed with apt if missing).
#
# On a machine without Rust or network (the 16-core GPU host), set SMOE and
# SYNTH to carried binaries and LLAMA_SDIST to a llama-cpp-python source
# tarball; a python3 that already imports torch, transformers, numpy and
# safetensors converts the GGUF without a venv. The
# capped rows need a cgroup-v1 memory controller and are skipped without one.
set -euo pipefail
cd "$(dirname "$0")/.."

LAYERS=${LAYERS:-8}
THREADS=${THREADS:-$(lscpu -p=core | grep -v '^#' | sort -u | wc -l)}
REPEAT=${REPEAT:-3}
PP=${PP:-512}
TG=${TG:-128}
CAP_TG=${CAP_TG:-16}
CAP_PCT=${CAP_PCT:-25}
BACKBONE=${BACKBONE:-}
DIR=${SMOE_BENCH_DIR:-$HOME/.cache/smoe-bench}
TOKENIZER=${TOKENIZER:-../shared/qwen3-tokenizer}
CKPT="$DIR/qwen3-30b-a3b-${LAYERS}l"
VAULT="$DIR/qwen3-30b-a3b-${LAYERS}l-q4_k-bb-${BACKBONE:-default}"
LLAMA="$DIR/llama.cpp"
GGUF_BF16="$DIR/qwen3-30b-a3b-${LAYERS}l-bf16.gguf"
GGUF="$DIR/qwen3-30b-a3b-${LAYERS}l-Q4_K_M.gguf"
VENV="$DIR/venv-gguf"
SMOE=${SMOE:-target/release/smoe}
SYNTH=${SYNTH:-target/release/examples/synth}
LLAMA_SDIST=${LLAMA_SDIST:-}

setup() {
    mkdir -p "$DIR"
    command -v cmake >/dev/null || { apt-get update -qq && apt-get install -y -qq cmake; }
    if [ ! -x "$LLAMA/build/bin/llama-bench" ]; then
        if [ ! -d "$LLAMA/src" ]; then
            local tmp
            tmp=$(mktemp -d)
            if [ -n "$LLAMA_SDIST" ]; then
                cp "$LLAMA_SDIST" "$tmp/"
            else
                pip download --quiet --no-deps --no-binary llama-cpp-python llama-cpp-python -d "$tmp"
            fi
            tar -xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
            rm -rf "$LLAMA" && mv "$tmp"/llama_cpp_python-*/vendor/llama.cpp "$LLAMA"
            rm -rf "$tmp"
        fi
        cmake -S "$LLAMA" -B "$LLAMA/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
            -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF
        cmake --build "$LLAMA/build" -j "$(nproc)" --target llama-bench llama-quantize
    fi
    if command -v cargo >/dev/null; then
        cargo build --release --quiet --bin smoe --example synth
    fi
    [ -d "$CKPT" ] || "$SYNTH" --preset qwen3-30b-a3b --layers "$LAYERS" --tokenizer "$TOKENIZER" -o "$CKPT"
    if [ ! -f "$GGUF" ]; then
        if [ ! -f "$GGUF_BF16" ]; then
            # convert_hf_to_gguf.py imports torch and transformers (~6 GB);
            # the venv goes as soon as the GGUF exists.
            if python3 -c 'import torch, transformers, numpy, safetensors' 2>/dev/null; then
                PYTHONPATH="$LLAMA/gguf-py" python3 "$LLAMA/convert_hf_to_gguf.py" "$CKPT" \
                    --outtype bf16 --outfile "$GGUF_BF16.tmp"
            else
                python3 -m venv "$VENV"
                "$VENV/bin/pip" install --quiet numpy sentencepiece safetensors transformers torch "$LLAMA/gguf-py"
                "$VENV/bin/python" "$LLAMA/convert_hf_to_gguf.py" "$CKPT" --outtype bf16 --outfile "$GGUF_BF16.tmp"
                rm -rf "$VENV"
            fi
            mv "$GGUF_BF16.tmp" "$GGUF_BF16"
        fi
        "$LLAMA/build/bin/llama-quantize" "$GGUF_BF16" "$GGUF.tmp" Q4_K_M "$THREADS"
        mv "$GGUF.tmp" "$GGUF"
        rm -f "$GGUF_BF16"
    fi
    [ -d "$VAULT" ] || "$SMOE" convert "$CKPT" -o "$VAULT" --experts q4_k ${BACKBONE:+--backbone "$BACKBONE"} --quiet
}

tag() { sed "s/}\$/, \"mode\": \"$1\"}/"; }

# Runs "$@" inside a fresh memory cgroup capped at $1 bytes.
capped() {
    local cap=$1
    shift
    local cg=/sys/fs/cgroup/memory/smoe-bench-$$
    mkdir -p "$cg"
    echo "$cap" >"$cg/memory.limit_in_bytes"
    # Start from a cold page cache so neither engine inherits the other's pages.
    sync && echo 1 >/proc/sys/vm/drop_caches
    local rc=0
    (echo $BASHPID >"$cg/cgroup.procs" && "$@") || rc=$?
    rmdir "$cg" 2>/dev/null || true
    return $rc
}

llama_bench() { # prompt tokens, generated tokens, extra args...
    local pp=$1 tg=$2
    shift 2
    "$LLAMA/build/bin/llama-bench" -m "$GGUF" -t "$THREADS" -p "$pp" -n "$tg" -r 1 -o json "$@" 2>/dev/null |
        python3 -c "
import json, sys
for r in json.load(sys.stdin):
    kind = 'prefill' if r['n_prompt'] > 0 else 'decode'
    print(json.dumps({'engine': 'llama.cpp', 'kind': kind, 'tok_s': r['avg_ts']}))"
}

smoe_bench() { # model (vault or GGUF), prompt tokens, generated tokens, runs, extra args...
    # --device cpu: llama.cpp here is a CPU build, and smoe's default (auto)
    # would take a GPU where the machine has one.
    local model=$1 pp=$2 tg=$3 runs=$4 engine=smoe
    shift 4
    [ "$model" = "$GGUF" ] && engine=smoe-gguf
    "$SMOE" bench --model "$model" --device cpu --threads "$THREADS" --prompt-tokens "$pp" --gen-tokens "$tg" \
        --repeat "$runs" --json "$@" |
        python3 -c "
import json, sys
r = json.load(sys.stdin)
print(json.dumps({'engine': '$engine', 'kind': 'prefill', 'tok_s': r['prefill_tok_s']}))
print(json.dumps({'engine': '$engine', 'kind': 'decode', 'tok_s': r['decode_tok_s'],
                  'bytes_per_token': r['streaming']['bytes_read_per_token']}))"
}

setup
[ "${1:-}" = setup ] && exit 0

GGUF_BYTES=$(stat -c %s "$GGUF")
CAP=$((GGUF_BYTES * CAP_PCT / 100))
OUT=$(mktemp)
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB RAM, $(lscpu | sed -n 's/^Model name: *//p')"
echo "model: synthetic Qwen3-30B-A3B, $LAYERS layers; llama.cpp $(basename "$GGUF") ($((GGUF_BYTES / 1048576)) MiB);"
echo "       smoe $(basename "$VAULT") ($("$SMOE" inspect "$VAULT" | sed -n 's/^quant: //p')); $THREADS threads; median of $REPEAT"
echo "weights read per decoded token: llama.cpp $(python3 bench/gguf-bytes.py "$GGUF"); smoe $("$SMOE" inspect "$VAULT" | sed -n 's/^weights read per decoded token: //p')"
for r in $(seq "$REPEAT"); do
    echo "round $r/$REPEAT" >&2
    # llama-bench warms up before it measures; smoe bench's median of three
    # runs is a warm one (the first fills the expert cache from disk).
    llama_bench "$PP" 0 | tag resident >>"$OUT"
    # smoe runs its vault and, as a second engine, llama.cpp's own GGUF.
    for model in "$VAULT" "$GGUF"; do
        smoe_bench "$model" "$PP" 1 3 --ram-budget 8GiB | grep prefill | tag resident >>"$OUT"
    done
    llama_bench 0 "$TG" | tag resident >>"$OUT"
    for model in "$VAULT" "$GGUF"; do
        smoe_bench "$model" 8 "$TG" 3 --ram-budget 8GiB | grep decode | tag resident >>"$OUT"
    done
    if [ -d /sys/fs/cgroup/memory ]; then
        capped "$CAP" llama_bench 0 "$CAP_TG" --repack 0 | tag capped >>"$OUT"
        for model in "$VAULT" "$GGUF"; do
            capped "$CAP" smoe_bench "$model" 8 "$CAP_TG" 1 --ram-budget auto --ctx 512 | grep decode | tag capped >>"$OUT"
        done
    fi
done
python3 - "$OUT" "$CAP" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
cap = int(sys.argv[2])
def med(engine, kind, mode):
    xs = [r["tok_s"] for r in rows if (r["engine"], r["kind"], r["mode"]) == (engine, kind, mode)]
    return statistics.median(xs) if xs else float("nan")
# smoe (vault): the vault converted from the checkpoint; smoe (GGUF): smoe
# running the very GGUF file llama.cpp runs, experts streamed out of it.
print(f"{'measure':<34} {'llama.cpp':>10} {'smoe vault':>11} {'smoe GGUF':>10} "
      f"{'vault/llama':>12} {'GGUF/llama':>11} {'GGUF/vault':>11}  (tok/s)")
for label, kind, mode in [("prefill, resident", "prefill", "resident"),
                          ("decode, resident", "decode", "resident"),
                          (f"decode, memory cap {cap / 2**20:.0f} MiB", "decode", "capped")]:
    l, s, g = (med(e, kind, mode) for e in ("llama.cpp", "smoe", "smoe-gguf"))
    if l != l and s != s:  # not measured (no memory cgroup for the capped rows)
        continue
    print(f"{label:<34} {l:>10.2f} {s:>11.2f} {g:>10.2f} {s / l:>12.2f} {g / l:>11.2f} {g / s:>11.2f}")
for engine, name in (("smoe", "vault"), ("smoe-gguf", "GGUF")):
    bpt = [r["bytes_per_token"] for r in rows
           if r.get("bytes_per_token") and r["mode"] == "capped" and r["engine"] == engine]
    if bpt:
        print(f"smoe ({name}) expert bytes read per token under the cap: {statistics.median(bpt) / 1e6:.1f} MB")
PY
rm -f "$OUT"
