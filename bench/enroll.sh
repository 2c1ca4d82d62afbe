#!/usr/bin/env bash
# Enrollments/s over the JSON API, EST (RFC 7030) and CMP (RFC 9483) side by
# side: one server, the admin enrolling over each protocol in turn (rounds
# alternate them), a new P-256 key and CSR per device made before the
# clock starts, one TLS connection per enrollment.
#
#   bash bench/enroll.sh
#   COUNT=1000 CONCURRENCY=32 ROUNDS=3 bash bench/enroll.sh
set -euo pipefail
cd "$(dirname "$0")/.."

COUNT=${COUNT:-500}
CONCURRENCY=${CONCURRENCY:-16}
ROUNDS=${ROUNDS:-2}
cargo build --release -q -p broker -p firmware-sim
FG=$PWD/target/release/fleetgate
SIM=$PWD/target/release/firmware-sim

work=$(mktemp -d)
pid=
cleanup() {
    [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

"$FG" serve --data-dir "$work/fg" --api-listen 127.0.0.1:0 --mqtt-listen 127.0.0.1:0 \
    --ocsp-listen 127.0.0.1:0 >"$work/fg.out" 2>"$work/fg.log" &
pid=$!
for _ in $(seq 100); do grep -q listening "$work/fg.out" 2>/dev/null && break; sleep 0.1; done
api=$(sed -n 's/.*api=\([^ ]*\).*/\1/p' "$work/fg.out")

echo "$COUNT enrollments a protocol a round, $CONCURRENCY at a time, $ROUNDS rounds" >&2
"$SIM" load enroll --api "https://$api" --data-dir "$work/fg" --count "$COUNT" \
    --concurrency "$CONCURRENCY" --rounds "$ROUNDS" | tee "$work/enroll.json"
python3 - "$work/enroll.json" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
best = {}
for r in rows:
    if r["failed"]:
        print(f"round {r['round']} {r['protocol']}: {r['failed']} failed: {r['first_failure']}")
    p = r["protocol"]
    if p not in best or r["enrollments_per_s"] > best[p]["enrollments_per_s"]:
        best[p] = r
base = best["json"]["enrollments_per_s"]
print("\n| protocol | enrollments/s (best round) | p50 | p99 | against JSON |")
print("|---|---|---|---|---|")
for p in ["json", "est", "cmp"]:
    r = best[p]
    print(f"| {p} | {r['enrollments_per_s']:,.0f} | {r['p50_ms']:.1f} ms | {r['p99_ms']:.1f} ms | {r['enrollments_per_s'] / base:.2f}x |")
PY
