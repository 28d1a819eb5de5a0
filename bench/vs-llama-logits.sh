#!/usr/bin/env bash
# llama.cpp's logits against smoe's on the same GGUF file, for the same
# token ids: bench/llama-logits.c (linked against the libllama that
# bench/vs-llama.cpp.sh builds) and `smoe logits --all` each run the ids as
# one prompt; prints the top-1 agreement over the positions and the mean
# and largest |difference| of the logits, against llama.cpp with an f32 KV
# cache and flash attention off (what smoe computes) and with its defaults
# (f16 KV cache). As a yardstick, smoe against itself with its AVX2 kernels
# instead of AVX-512 (the same products summed in another order), where the
# CPU has AVX-512: on the synthetic bench model, whose random routers pick
# among near-equal experts, rounding alone moves logits by percents.
#
#   bench/vs-llama-logits.sh          # the 8-layer bench model's Q4_K_M GGUF
#
# Environment: GGUF [vs-llama.cpp.sh's Q4_K_M], N [256] ids, THREADS
# [physical cores], SMOE [target/release/smoe], LLAMA [the llama.cpp tree].
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=${SMOE_BENCH_DIR:-$HOME/.cache/smoe-bench}
LAYERS=${LAYERS:-8}
GGUF=${GGUF:-$DIR/qwen3-30b-a3b-${LAYERS}l-Q4_K_M.gguf}
LLAMA=${LLAMA:-$DIR/llama.cpp}
SMOE=${SMOE:-target/release/smoe}
N=${N:-256}
THREADS=${THREADS:-$(lscpu -p=core | grep -v '^#' | sort -u | wc -l)}

if [ ! -f "$GGUF" ] || [ ! -d "$LLAMA/build/bin" ]; then
    bench/vs-llama.cpp.sh setup
fi
if [ "$SMOE" = target/release/smoe ] && command -v cargo >/dev/null; then
    cargo build --release --quiet --bin smoe
fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
cc -O2 -o "$TMP/llama-logits" bench/llama-logits.c -I"$LLAMA/include" -I"$LLAMA/ggml/include" \
    -L"$LLAMA/build/bin" -lllama -Wl,-rpath,"$LLAMA/build/bin"

# Spread over the ordinary vocabulary (Qwen3's specials start at 151643).
IDS=$(python3 -c "print(','.join(str((i * 7919 + 11) % 151643) for i in range($N)))")
for kv in f32 f16; do
    "$TMP/llama-logits" "$GGUF" "$IDS" "$THREADS" "$TMP/llama-$kv.f32" "$kv" >"$TMP/vocab"
done
"$SMOE" logits --model "$GGUF" --threads "$THREADS" --ids "$IDS" --all >"$TMP/smoe.json"
if grep -qw avx512f /proc/cpuinfo; then
    SMOE_KERNELS=avx2 "$SMOE" logits --model "$GGUF" --threads "$THREADS" --ids "$IDS" --all >"$TMP/smoe-avx2.json"
fi

python3 - "$TMP" "$(cat "$TMP/vocab")" "$GGUF" <<'PY'
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
