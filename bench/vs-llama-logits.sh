#!/usr/bin/env bash
# llama.cpp's logits against smoe's on the same GGUF file, for the same
# token ids: bench/llama-logits.c (linked against the libllama that
# bench/vs-llama.cpp.sh builds) and `smoe logits --all` each run the ids as
# one prompt; prints the top-1 agreement over the positions and the mean
# and largest |difference| of the logits, against llama.cpp with an f32 KV
# cache and flash attention off (what smoe computes) and with its defaults
# (f16 KV cache). As a yardstick, smoe against itself with its AVX2 kernels
# instead of AVX-512 (the same products summed in another order), where the
# CPU has AVX-512.
#
#   bench/vs-llama-logits.sh          # the 8-layer bench model's Q4_K_M GGUF
#   bench/vs-llama-logits.sh builtin  # the built-in model: BF16, Q8_0, Q4_K_M
#
# The bench model is synthetic: its random routers pick among near-equal
# experts, so rounding alone flips expert choices and moves logits by
# percents, and its ids are spread over Qwen3's ordinary vocabulary. The
# built-in model (models/builtin) has trained routing; its ids are the
# held-out evaluation conversations (models/builtin/eval.json, each prompt
# and its expected reply) rendered with its chat template, text it is
# confident on. Its GGUFs are made once under $SMOE_BENCH_DIR by llama.cpp's
# convert_hf_to_gguf.py (bf16, through bench/llama-convert.py, in a venv
# $DIR/venv-gguf-trained with torch and transformers, ~6 GB, kept for the
# next run: remove it when done) and llama-quantize (Q8_0 and Q4_K_M).
#
# Environment: GGUF [vs-llama.cpp.sh's Q4_K_M; bench model only], N [256]
# ids, THREADS [physical cores], SMOE [target/release/smoe], LLAMA [the
# llama.cpp tree].
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${1:-bench}
DIR=${SMOE_BENCH_DIR:-$HOME/.cache/smoe-bench}
LAYERS=${LAYERS:-8}
LLAMA=${LLAMA:-$DIR/llama.cpp}
SMOE=${SMOE:-target/release/smoe}
N=${N:-256}
THREADS=${THREADS:-$(lscpu -p=core | grep -v '^#' | sort -u | wc -l)}
BUILTIN=models/builtin
VENV="$DIR/venv-gguf-trained"

case "$MODEL" in
bench)
    GGUFS=("${GGUF:-$DIR/qwen3-30b-a3b-${LAYERS}l-Q4_K_M.gguf}")
    if [ ! -f "${GGUFS[0]}" ] || [ ! -d "$LLAMA/build/bin" ]; then
        bench/vs-llama.cpp.sh setup
    fi
    ;;
builtin)
    GGUFS=("$DIR/builtin-BF16.gguf" "$DIR/builtin-Q8_0.gguf" "$DIR/builtin-Q4_K_M.gguf")
    [ -d "$LLAMA/build/bin" ] || bench/vs-llama.cpp.sh setup
    ;;
*)
    echo "usage: $0 [bench|builtin]" >&2
    exit 2
    ;;
esac
if [ "$SMOE" = target/release/smoe ] && command -v cargo >/dev/null; then
    cargo build --release --quiet --bin smoe
fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

if [ "$MODEL" = builtin ] && [ ! -f "${GGUFS[2]}" ]; then
    if [ ! -f "${GGUFS[0]}" ]; then
        if ! python3 -c 'import torch, transformers, numpy, safetensors, sentencepiece' 2>/dev/null; then
            [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
            "$VENV/bin/pip" install --quiet numpy sentencepiece safetensors transformers torch "$LLAMA/gguf-py"
        fi
        PY=python3
        [ -x "$VENV/bin/python" ] && PY="$VENV/bin/python"
        "$PY" bench/llama-convert.py "$LLAMA" qwen2 "$BUILTIN" --outtype bf16 --outfile "${GGUFS[0]}.tmp"
        mv "${GGUFS[0]}.tmp" "${GGUFS[0]}"
    fi
    for q in Q8_0 Q4_K_M; do
        "$LLAMA/build/bin/llama-quantize" "${GGUFS[0]}" "$DIR/builtin-$q.gguf.tmp" "$q" "$THREADS" >"$TMP/quantize-$q.log" 2>&1 ||
            { cat "$TMP/quantize-$q.log" >&2; exit 1; }
        mv "$DIR/builtin-$q.gguf.tmp" "$DIR/builtin-$q.gguf"
    done
fi

cc -O2 -o "$TMP/llama-logits" bench/llama-logits.c -I"$LLAMA/include" -I"$LLAMA/ggml/include" \
    -L"$LLAMA/build/bin" -lllama -lggml-base -Wl,-rpath,"$LLAMA/build/bin"

if [ "$MODEL" = bench ]; then
    # Spread over the ordinary vocabulary (Qwen3's specials start at 151643).
    IDS=$(python3 -c "print(','.join(str((i * 7919 + 11) % 151643) for i in range($N)))")
else
    python3 -c "
import json, sys
msgs = []
for e in json.load(open('$BUILTIN/eval.json')):
    msgs += [{'role': 'user', 'content': e['prompt']}, {'role': 'assistant', 'content': e['expected']}]
json.dump(msgs, sys.stdout)" >"$TMP/messages.json"
    IDS=$("$SMOE" template --model "$BUILTIN" --messages "$TMP/messages.json" --no-generation-prompt --ids |
        python3 -c "import json, sys; ids = json.load(sys.stdin)[:$N]; assert len(ids) == $N, len(ids); print(','.join(map(str, ids)))")
fi

for gguf in "${GGUFS[@]}"; do
    for kv in f32 f16; do
        "$TMP/llama-logits" "$gguf" "$IDS" "$THREADS" "$TMP/llama-$kv.f32" "$kv" >"$TMP/vocab"
    done
    "$SMOE" logits --model "$gguf" --threads "$THREADS" --ids "$IDS" --all >"$TMP/smoe.json"
    rm -f "$TMP/smoe-avx2.json"
    if grep -qw avx512f /proc/cpuinfo; then
        SMOE_KERNELS=avx2 "$SMOE" logits --model "$gguf" --threads "$THREADS" --ids "$IDS" --all >"$TMP/smoe-avx2.json"
    fi
    python3 - "$TMP" "$(cat "$TMP/vocab")" "$gguf" <<'PY'
import array, json, os, sys
tmp, vocab = sys.argv[1], int(sys.argv[2])
smoe = json.load(open(f"{tmp}/smoe.json"))["logits"]
n = len(smoe)
print(f"model: {sys.argv[3]}; {n} positions")
refs = []
for kv, what in (("f32", "llama.cpp, f32 KV cache, flash attention off"), ("f16", "llama.cpp, defaults (f16 KV cache)")):
    llama = array.array("f")
    with open(f"{tmp}/llama-{kv}.f32", "rb") as f:
        llama.frombytes(f.read())
    assert len(llama) == n * vocab, f"llama.cpp gave {len(llama)} logits, expected {n} x {vocab}"
    refs.append((what, [llama[i * vocab:(i + 1) * vocab] for i in range(n)]))
if os.path.exists(f"{tmp}/smoe-avx2.json"):
    refs.append(("smoe's own AVX2 kernels (yardstick)", json.load(open(f"{tmp}/smoe-avx2.json"))["logits"]))
for what, rows in refs:
    agree, total, worst, scale = 0, 0.0, 0.0, 0.0
    for i, row in enumerate(smoe):
        ref = rows[i]
        # smoe's row may be the config's vocab_size, llama.cpp's the tokens
        # the GGUF lists; compare what both have.
        m = min(len(row), vocab)
        agree += max(range(m), key=row.__getitem__) == max(range(m), key=ref.__getitem__)
        d = [abs(row[j] - ref[j]) for j in range(m)]
        total += sum(d) / m
        worst = max(worst, max(d))
        scale += sum(abs(ref[j]) for j in range(m)) / m
    print(f"smoe vs {what}: top-1 agreement {agree}/{n} = {100 * agree / n:.1f}%; "
          f"mean |difference| {total / n:.4f} (mean |logit| {scale / n:.4f}), largest {worst:.4f}")
PY
done
