#!/usr/bin/env bash
# smoe on CUDA against llama.cpp on the same GPU (issue 16's table): the
# synthetic Qwen3-30B-A3B cut to $LAYERS layers, llama.cpp on its Q4_K_M,
# smoe on a vault of the same checkpoint with the default recipe (q4_k
# experts, Q4_K_M's types for the backbone), engines alternating, median of
# $REPEAT, the ratio smoe / llama.cpp per row.
#
#   bench/cuda.sh pack     # here (Rust, network): build and pack what the GPU machine needs
#   bench/cuda.sh setup    # there: llama.cpp, the checkpoint, GGUF, Q4_K_M and vault (cached)
#   bench/cuda.sh          # there: setup, then the table
#   bench/cuda.sh profile  # there: checkpoint and vault only, then smoe's
#                          # per-kernel profile of the first three rows
#   bench/cuda.sh ab       # there: checkpoint and vault only, then the
#                          # three rows' smoe against $BASE's (bench/ab.sh)
#   bench/cuda.sh models   # there: the checkpoint and vault only (beside a
#                          # GPU job that needs the cores little)
#
# BASE=path/to/smoe at `pack` carries another smoe binary (built with
# --features cuda from the commit to compare against) for `ab`.
#
# The GPU machine has nvcc, cmake, python3 with torch and transformers, no
# Rust and no network. `pack` puts under $PACK (default target/devX, ignored
# by git, carried to the machine): smoe and the synth example built with
# --features cuda, stripped and xz-compressed (and tools/test-cuda.sh's
# binaries, when built); llama.cpp's source (from
# $LLAMA_SRC, default /work/bench/llama.cpp, without its build, models and
# docs) as a tarball; the Qwen3 tokenizer ($TOKENIZER). There, everything
# built goes to $DIR (default /var/tmp/smoe-cuda-bench) and a step whose
# output exists is skipped, so a second call on a machine still warm goes
# straight to the table. llama.cpp is built with CUDA for sm_90 (the H200),
# targets llama-bench and llama-quantize only (about 260 s on 16 cores).
#
# Rows (llama.cpp flags / smoe flags):
# - everything in VRAM:      -ngl 99 -fa 1                  / --vram-budget auto
# - experts in host RAM:     -ngl 99 -fa 1 -ot exps=CPU     / --vram-budget 0
# - 2 of 8 layers' experts:  -ngl 99 -fa 1 -ncmoe 6         / --vram-budget (a quarter of the expert bytes)
# - experts on SSD (smoe only): --ram-budget a quarter of the expert bytes,
#   --vram-budget a tenth: speed, hit rates, bytes read, share of the roofline
set -euo pipefail
cd "$(dirname "$0")/.."

LAYERS=${LAYERS:-8}
# Each row's runs per engine (the median): a streamed row's decode on
# these shared machines spreads by a tenth from run to run (279-341 tok/s
# in one call), so three can land the ratio on either side of a bound.
REPEAT=${REPEAT:-5}
# smoe's own runs per call (its median): the first reads the experts from
# the vault with O_DIRECT, cold, where llama.cpp's mapped GGUF is in the
# page cache, so a median of three leaves it out.
SMOE_REPEAT=${SMOE_REPEAT:-3}
PP=${PP:-512}
TG=${TG:-128}
THREADS=${THREADS:-$(nproc)}
PACK=${PACK:-target/devX}
DIR=${SMOE_CUDA_BENCH_DIR:-/var/tmp/smoe-cuda-bench}
LLAMA_SRC=${LLAMA_SRC:-/work/bench/llama.cpp}
# ../shared beside the main checkout; a worktree sets TOKENIZER.
TOKENIZER=${TOKENIZER:-../shared/qwen3-tokenizer}

pack() {
    cargo build --release -p smoe-cli --features cuda --bin smoe --example synth
    rm -rf "$PACK" && mkdir -p "$PACK/tok"
    local out=${CARGO_TARGET_DIR:-target}/release
    for b in "$out/smoe" "$out/examples/synth"; do
        strip -o "$PACK/$(basename "$b")" "$b"
        xz -T0 -6 "$PACK/$(basename "$b")"
    done
    tar -C "$LLAMA_SRC" --exclude=./build --exclude=./models --exclude=./docs --exclude=./.git \
        -cJf "$PACK/llama-src.tar.xz" .
    cp "$TOKENIZER"/tokenizer.json "$TOKENIZER"/tokenizer_config.json "$PACK/tok/"
    xz -T0 "$PACK/tok/tokenizer.json"
    if [ -n "${BASE:-}" ]; then
        strip -o "$PACK/smoe-base" "$BASE" && xz -T0 -6 "$PACK/smoe-base"
    fi
    # tools/test-cuda.sh's binaries, when built, travel too.
    for b in target/devC/cuda-tests target/devC/cuda_bench; do
        [ ! -f "$b" ] || xz -T0 -c "$b" >"$PACK/$(basename "$b").xz"
    done
    du -sh "$PACK"/*
}

BIN="$DIR/bin"
LLAMA="$DIR/llama.cpp"
CKPT="$DIR/qwen3-30b-a3b-${LAYERS}l"
GGUF_BF16="$DIR/qwen3-30b-a3b-${LAYERS}l-bf16.gguf"
GGUF="$DIR/qwen3-30b-a3b-${LAYERS}l-Q4_K_M.gguf"
VAULT="$DIR/qwen3-30b-a3b-${LAYERS}l-q4_k-bb-default"

# The carried binaries, unpacked when newer than the ones in $BIN.
unpack() {
    mkdir -p "$BIN" "$DIR/tok"
    for b in smoe synth smoe-base; do
        [ "$b" != smoe-base ] || [ -f "$PACK/$b.xz" ] || continue
        if [ ! -x "$BIN/$b" ] || [ "$PACK/$b.xz" -nt "$BIN/$b" ]; then
            xz -dc "$PACK/$b.xz" >"$BIN/$b.tmp" && chmod +x "$BIN/$b.tmp" && mv "$BIN/$b.tmp" "$BIN/$b"
        fi
    done
    [ -f "$DIR/tok/tokenizer.json" ] || xz -dc "$PACK/tok/tokenizer.json.xz" >"$DIR/tok/tokenizer.json"
    cp "$PACK/tok/tokenizer_config.json" "$DIR/tok/"
}

llama_source() {
    [ -f "$LLAMA/CMakeLists.txt" ] && [ -f "$LLAMA/convert_hf_to_gguf.py" ] && return
    rm -rf "$LLAMA" && mkdir -p "$LLAMA"
    tar -C "$LLAMA" -xJf "$PACK/llama-src.tar.xz"
}

build_llama() {
    [ -x "$LLAMA/build/bin/llama-bench" ] && [ -x "$LLAMA/build/bin/llama-quantize" ] && return
    local app=ON gen=()
    [ -d "$LLAMA/app" ] || app=OFF
    command -v ninja >/dev/null && gen=(-G Ninja)
    cmake -S "$LLAMA" -B "$LLAMA/build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
        -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_NATIVE=OFF -DLLAMA_BUILD_APP=$app \
        -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >"$DIR/llama-cmake.log"
    cmake --build "$LLAMA/build" -j "$(nproc)" --target llama-bench llama-quantize >"$DIR/llama-build.log"
}

models() {
    [ -d "$CKPT" ] || "$BIN/synth" --preset qwen3-30b-a3b --layers "$LAYERS" --tokenizer "$DIR/tok" -o "$CKPT"
    [ -d "$VAULT" ] || "$BIN/smoe" convert "$CKPT" -o "$VAULT" --experts q4_k --quiet
    if [ ! -f "$GGUF_BF16" ] && [ ! -f "$GGUF" ]; then
        PYTHONPATH="$LLAMA/gguf-py" python3 "$LLAMA/convert_hf_to_gguf.py" "$CKPT" \
            --outtype bf16 --outfile "$GGUF_BF16.tmp" >"$DIR/gguf-convert.log" 2>&1
        mv "$GGUF_BF16.tmp" "$GGUF_BF16"
    fi
}

quantize() {
    [ -f "$GGUF" ] && return
    "$LLAMA/build/bin/llama-quantize" "$GGUF_BF16" "$GGUF.tmp" Q4_K_M "$THREADS" >"$DIR/quantize.log" 2>&1
    mv "$GGUF.tmp" "$GGUF"
    rm -f "$GGUF_BF16"
}

setup() {
    mkdir -p "$DIR"
    unpack
    llama_source
    # The build takes the cores for minutes; the checkpoint, vault and
    # bf16 GGUF need none of it, so they are made meanwhile.
    build_llama &
    local build=$!
    models
    wait "$build"
    quantize
}

llama_row() { # extra llama-bench flags...
    "$LLAMA/build/bin/llama-bench" -m "$GGUF" -p "$PP" -n "$TG" -r 1 -t "$THREADS" -o json "$@" 2>/dev/null |
        python3 -c "
import json, sys
r = json.load(sys.stdin)
pp = [x['avg_ts'] for x in r if x['n_prompt'] > 0][0]
tg = [x['avg_ts'] for x in r if x['n_gen'] > 0][0]
print(pp, tg)"
}

smoe_row() { # extra smoe bench flags... [--print-ssd: the streaming figures, in words]
    local ssd=0 args=()
    for a in "$@"; do [ "$a" = --print-ssd ] && ssd=1 || args+=("$a"); done
    "$BIN/smoe" bench --model "$VAULT" --device cuda --threads "$THREADS" --prompt-tokens "$PP" \
        --gen-tokens "$TG" --repeat "$SMOE_REPEAT" --json "${args[@]}" 2>"$DIR/smoe-last.log" |
        python3 -c "
import json, sys
r = json.load(sys.stdin)
open('$DIR/smoe-last.device', 'w').write(r['device'] + '\n')
open('$DIR/last-rates', 'w').write('%s|%s\\n' % (r['prefill_tok_s'], r['decode_tok_s']))
if not $ssd:
    print(r['prefill_tok_s'], r['decode_tok_s'])
    sys.exit()
s = r['streaming']
v = s['decode_vs_roofline']
print(f\"pp{r['prompt_tokens']} {r['prefill_tok_s']:,.1f} tok/s, tg{r['gen_tokens']} {r['decode_tok_s']:,.2f} tok/s; \"
      f\"RAM-tier hit rate (of the experts not in VRAM) {s['decode_hit_rate']:.1%} decode, {s['prefill_hit_rate']:.1%} prefill; \"
      f\"{s['bytes_read_per_token'] / 2**20:,.1f} MiB read from the SSD per token at {s['read_gb_s']:.2f} GB/s \"
      f\"(disk measured {s['disk_read_gb_s']:.2f} GB/s); decode at {'?' if v is None else f'{v:.0%}'} of the SSD roofline\")
print('device:', r['device'])
g = r.get('gpu_experts')
if g:
    print(f\"GPU tiers over all runs: VRAM hits {g['vram_hits']:,}, experts copied {g['copied']:,} \"
          f\"({g['pcie_bytes'] / 1e9:.1f} GB over PCIe), run on the CPU {g['cpu_runs']:,}, \"
          f\"steps run as one CUDA graph {g.get('graph_steps', 0):,} ({g.get('graph_replays', 0):,} replayed), \"
          f\"stretches between the host's waits {g.get('graph_stretches', 0):,} ({g.get('stretch_replays', 0):,} replayed)\")"
}

median() { python3 -c "import statistics, sys; print(statistics.median(float(v) for v in sys.argv[1:]))" "$@"; }

row() { # name, llama flags (one word list), smoe flags (one word list)
    local name=$1 lflags=$2 sflags=$3 i
    local lpp=() ltg=() spp=() stg=() a b
    for i in $(seq "$REPEAT"); do
        # Alternate which engine goes first.
        if [ $((i % 2)) -eq 1 ]; then
            read -r a b < <(llama_row $lflags) && lpp+=("$a") && ltg+=("$b")
            read -r a b < <(smoe_row $sflags) && spp+=("$a") && stg+=("$b")
        else
            read -r a b < <(smoe_row $sflags) && spp+=("$a") && stg+=("$b")
            read -r a b < <(llama_row $lflags) && lpp+=("$a") && ltg+=("$b")
        fi
    done
    echo "$sflags|$(median "${spp[@]}")|$(median "${stg[@]}")" >>"$DIR/measured"
    python3 - "$name" "$lflags" "$sflags" "$(median "${lpp[@]}")" "$(median "${ltg[@]}")" \
        "$(median "${spp[@]}")" "$(median "${stg[@]}")" <<'PY'
import sys
name, lf, sf, lpp, ltg, spp, stg = sys.argv[1:4] + [float(v) for v in sys.argv[4:]]
print(f"| {name} | `{lf}` | `{sf}` | {lpp:,.0f} | {spp:,.0f} | {spp / lpp:.2f} | {ltg:,.1f} | {stg:,.1f} | {stg / ltg:.2f} |")
PY
}

# smoe alone (no llama.cpp build): where a step's time goes, per kernel
# (device time from events around each launch, which also serialises the
# launches: the rates are lower than the table's) and per op on the host.
smoe_models() {
    mkdir -p "$DIR"
    unpack
    [ -d "$CKPT" ] || "$BIN/synth" --preset qwen3-30b-a3b --layers "$LAYERS" --tokenizer "$DIR/tok" -o "$CKPT"
    [ -d "$VAULT" ] || "$BIN/smoe" convert "$CKPT" -o "$VAULT" --experts q4_k --quiet
}

profile() {
    smoe_models
    local quarter=$(($(stat -c %s "$VAULT/experts.bin") / 4 + (1 << 20)))
    for budget in auto 0 "$quarter"; do
        echo "== --vram-budget $budget"
        "$BIN/smoe" bench --model "$VAULT" --device cuda --threads "$THREADS" --prompt-tokens "$PP" \
            --gen-tokens "$TG" --repeat "$SMOE_REPEAT" --vram-budget "$budget" --profile
    done
}

# The three rows, this pack's smoe (B) against $BASE's (A), alternating,
# each row's medians and B/A.
ab() {
    smoe_models
    [ -x "$BIN/smoe-base" ] || { echo "bench/cuda.sh ab: no smoe-base (BASE= at pack)" >&2; return 1; }
    local quarter=$(($(stat -c %s "$VAULT/experts.bin") / 4 + (1 << 20))) f=--device,cuda,--vram-budget
    MODES="vram=$f,auto host=$f,0 quarter=$f,$quarter" PP=$PP TG=$TG \
        bash bench/ab.sh "$BIN/smoe-base" "$BIN/smoe" "$VAULT" "$REPEAT" "$THREADS"
}

case "${1:-}" in
pack) pack && exit 0 ;;
setup) setup && exit 0 ;;
profile) profile && exit 0 ;;
ab) ab && exit 0 ;;
models) smoe_models && exit 0 ;;
"") ;;
*) echo "usage: bench/cuda.sh [pack|setup|profile|ab|models]" >&2 && exit 2 ;;
esac

setup
QUARTER=$(($(stat -c %s "$VAULT/experts.bin") / 4 + (1 << 20)))
TENTH=$(($(stat -c %s "$VAULT/experts.bin") / 10))
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
ggml=$(sed -n 's/^set(GGML_VERSION_\(MAJOR\|MINOR\|PATCH\) \([0-9]*\))/\2/p' "$LLAMA/ggml/CMakeLists.txt" | paste -sd.)
echo "smoe: $("$BIN/smoe" --version 2>/dev/null || echo '?'); llama.cpp: ggml ${ggml:-?} (llama-cpp-python's source package)"
echo "$LAYERS-layer Qwen3-30B-A3B, pp$PP / tg$TG, median of $REPEAT, engines alternating"
echo
echo "| placement | llama.cpp | smoe | llama.cpp pp$PP tok/s | smoe | ratio | llama.cpp tg$TG tok/s | smoe | ratio |"
echo "|---|---|---|---|---|---|---|---|---|"
rm -f "$DIR/measured"
row "everything in VRAM" "-ngl 99 -fa 1" "--vram-budget auto"
row "experts in host RAM" "-ngl 99 -fa 1 -ot exps=CPU" "--vram-budget 0"
row "2 of 8 layers' experts in VRAM" "-ngl 99 -fa 1 -ncmoe 6" "--vram-budget $QUARTER"
echo
echo "smoe's placement in the last row: $(cat "$DIR/smoe-last.device")"

# No llama.cpp row: it has no mode that reads experts from the disk on
# demand (only mmap, through the page cache).
echo
echo "experts on SSD: --ram-budget $QUARTER (a quarter of the expert bytes), --vram-budget $TENTH (a tenth), median of $SMOE_REPEAT:"
smoe_row --ram-budget "$QUARTER" --vram-budget "$TENTH" --print-ssd
echo "--ram-budget $QUARTER --vram-budget $TENTH|$(cat "$DIR/last-rates")" >>"$DIR/measured"

# Issue 22: what `smoe plan` forecast for each row on this machine's
# figures, beside what the row measured.
echo
# The machine file of the card at hand (its own measured GPU figures).
MACHINE=fixtures/machines/h200-host.toml
nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H100 && MACHINE=fixtures/machines/h100-host.toml
echo "smoe plan's forecast of each row ($MACHINE), measured / forecast:"
while IFS='|' read -r flags pp tg; do
    # shellcheck disable=SC2086 # the row's flags, one word each
    "$BIN/smoe" plan "$VAULT" --machine "$MACHINE" --device cuda $flags \
        --ctx 1024 --json | python3 -c "
import json, sys
f = json.load(sys.stdin)['forecast']
d, p = f['decode_tok_s']['expected'], f['prefill_tok_s']['expected']
print(f'{sys.argv[1]}: decode {float(sys.argv[3]):,.1f} / {d:,.1f} = {float(sys.argv[3]) / d:.2f}, '
      f'prefill {float(sys.argv[2]):,.0f} / {p:,.0f} = {float(sys.argv[2]) / p:.2f}')" "$flags" "$pp" "$tg"
done <"$DIR/measured"

# The host-RAM row's roofline: every token reads its experts from host RAM,
# some by the cores and the rest by the GPU's copies, so what the RAM gives
# both at once bounds the decode (bench/host-bandwidth.py, torch). The
# bytes a token are `smoe plan`'s expert records.
echo
host_tg=$(sed -n 's/^--vram-budget 0|[^|]*|//p' "$DIR/measured")
records=$("$BIN/smoe" plan "$VAULT" --machine "$MACHINE" --json |
    python3 -c "import json, sys; m = json.load(sys.stdin)['model']; print(m['moe_layers'] * m['expert_record_bytes'])")
python3 bench/host-bandwidth.py "$THREADS" | python3 -c "
import json, sys
r = json.load(sys.stdin)
per_token = $records * json.load(open('$VAULT/config.json'))['num_experts_per_tok']
rate = float('$host_tg') * per_token / 1e9
print(f\"host RAM ({r['threads']} threads): the cores read {r['cpu_read_gb_s']} GB/s, page-locked copies to the GPU \"
      f\"{r['pinned_h2d_gb_s']} GB/s, both at once {r['together_gb_s']} GB/s ({r['together_cpu_gb_s']} + {r['together_h2d_gb_s']}); \"
      f\"the host-RAM row decodes {per_token / 2**20:,.1f} MiB of experts a token at {rate:.1f} GB/s, \"
      f\"{rate / r['together_gb_s']:.0%} of both at once\")" || echo "host RAM roofline: not measured (bench/host-bandwidth.py needs torch with CUDA)"
