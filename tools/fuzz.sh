#!/bin/sh
# Runs every cargo-fuzz target (or those named) for SECONDS each, all at
# once, one process per target, and prints each one's last coverage line.
#
#   tools/fuzz.sh SECONDS [TARGET ...]
#
# SMOE_FUZZ_JOBS=N runs N processes per target (N x SECONDS CPU-seconds);
# SMOE_FUZZ_FLAGS adds libFuzzer flags (-fork=4 -ignore_crashes=1 keeps a
# target going past crashes it has already found).
#
# Builds the targets first with the nightly toolchain and cargo-fuzz
# (cargo +nightly install cargo-fuzz), without a sanitizer but with debug
# assertions, so an overflow or an out-of-bounds index is a crash. On a
# machine without Rust, set SMOE_FUZZ_BIN to a directory holding the built
# binaries. Each run starts from the committed seeds (fuzz/corpus/TARGET)
# plus what earlier runs found (fuzz/work/TARGET); logs go to
# fuzz/logs/TARGET.N.log, crashes to fuzz/artifacts/TARGET/. Run from the
# repository root: the targets read fixtures/.
set -eu
[ $# -ge 1 ] || { echo "usage: tools/fuzz.sh SECONDS [TARGET ...]" >&2; exit 2; }
secs=$1
shift
cd "$(dirname "$0")/.."
bin=${SMOE_FUZZ_BIN:-}
if [ -z "$bin" ]; then
    (cd fuzz && cargo +nightly fuzz build -O -a -s none)
    bin=fuzz/target/x86_64-unknown-linux-gnu/release
fi
targets=${*:-"config_safetensors tokenizer_json template_messages vault_manifest http_request"}
mkdir -p fuzz/logs
jobs=${SMOE_FUZZ_JOBS:-1}
for t in $targets; do
    mkdir -p "fuzz/work/$t" "fuzz/artifacts/$t"
    j=1
    while [ "$j" -le "$jobs" ]; do
        # Processes of one target share its work corpus and pick up each
        # other's finds.
        "$bin/$t" "fuzz/work/$t" "fuzz/corpus/$t" -seed="$j" \
            -max_total_time="$secs" -timeout=30 -rss_limit_mb=4096 \
            -print_final_stats=1 -artifact_prefix="fuzz/artifacts/$t/" \
            ${SMOE_FUZZ_FLAGS:-} > "fuzz/logs/$t.$j.log" 2>&1 &
        j=$((j + 1))
    done
done
wait
status=0
for t in $targets; do
    crashes=$(find "fuzz/artifacts/$t" -type f | wc -l)
    execs=$(grep -h '^stat::number_of_executed_units' fuzz/logs/"$t".*.log |
        awk '{ n += $2 } END { print n + 0 }')
    last=$(grep -hE '^#[0-9]+' fuzz/logs/"$t".*.log | tail -n 1)
    echo "$t: $jobs x $secs s, $crashes crash(es), $execs runs; last: $last"
    [ "$crashes" -eq 0 ] || status=1
done
exit $status
