#!/usr/bin/env bash
# Runs fuzz targets for SECONDS each (default 600), one after another:
#   bash fuzz/run.sh [SECONDS [TARGET ...]]        (default: every target)
# Needs a nightly toolchain and cargo-fuzz (cargo install cargo-fuzz).
# A crash leaves its input in fuzz/artifacts/<target>/; keep it in
# fuzz/regressions/<target>/ and as a unit test next to the fixed code.
set -uo pipefail
cd "$(dirname "$0")"
secs=${1:-600}
shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && mapfile -t targets < <(cargo +nightly fuzz list)
failed=0
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    for d in seeds regressions; do
        [ -d "$d/$t" ] && cp -n "$d/$t"/* "corpus/$t/" 2>/dev/null
    done
    echo "== $t: ${secs}s"
    if ! cargo +nightly fuzz run "$t" "corpus/$t" -- -max_total_time="$secs" \
        -rss_limit_mb=4096 -print_final_stats=1 >"/tmp/fuzz-$t.log" 2>&1; then
        echo "!! $t failed: see /tmp/fuzz-$t.log and artifacts/$t/"
        failed=1
    fi
    grep -E "^(Done|stat::number_of_executed_units|stat::peak_rss_mb|#[0-9]+ +DONE)" "/tmp/fuzz-$t.log"
done
exit $failed
