#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 600), one after another.
# Needs a nightly toolchain and cargo-fuzz (cargo install cargo-fuzz).
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-600}
for t in $(cargo +nightly fuzz list); do
    mkdir -p corpus/$t
    if [ -d seeds/$t ]; then cp -n seeds/$t/* corpus/$t/ 2>/dev/null || true; fi
    echo "== $t: ${secs}s"
    cargo +nightly fuzz run "$t" corpus/$t -- -max_total_time="$secs" -rss_limit_mb=4096 2>&1 | tail -n 12
done
