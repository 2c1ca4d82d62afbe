#!/usr/bin/env bash
# Soak: fleetgate holds DEVICES mutual-TLS connections (one message each per
# 10 s) for DURATION seconds while CHURN more devices a second connect,
# publish at QoS 1 and leave, and a writer enrolls a device every 500 ms and
# revokes one every 2 s through the admin API. Loopback only, bounded.
# Prints the broker's RSS every 30 s; then reads back every acknowledged
# write, kills the broker with -9, runs `fleetgate check`, restarts it and
# reads them back again.
#
#   bash bench/soak.sh                       # 5,000 connections, 10 minutes
#   DEVICES=500 DURATION=60 bash bench/soak.sh
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICES=${DEVICES:-5000}
DURATION=${DURATION:-600}
CHURN=${CHURN:-10}
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

cargo build --release -q -p broker -p firmware-sim
FG=$PWD/target/release/fleetgate
SIM=$PWD/target/release/firmware-sim

work=$(mktemp -d)
fg_pid=
cleanup() {
    [ -n "${KEEP_LOG:-}" ] && cp "$work/fg.log" "$KEEP_LOG" 2>/dev/null || true
    [ -n "$fg_pid" ] && kill "$fg_pid" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

start() {
    : >"$work/fg.out"
    "$FG" serve --data-dir "$work/fg" --api-listen 127.0.0.1:0 --mqtt-listen 127.0.0.1:0 \
        --ocsp-listen 127.0.0.1:0 --connect-rate-per-ip 0 --max-connections 20000 \
        >"$work/fg.out" 2>>"$work/fg.log" &
    fg_pid=$!
    for _ in $(seq 100); do grep -q listening "$work/fg.out" 2>/dev/null && break; sleep 0.1; done
    api=$(sed -n 's/.*api=\([^ ]*\).*/\1/p' "$work/fg.out")
    mqtt=$(sed -n 's/.*mqtt=\([^ ]*\).*/\1/p' "$work/fg.out")
    export FLEETGATE_API="https://$api" FLEETGATE_DATA_DIR="$work/fg"
}

start
echo "soak: $DEVICES held connections, churn $CHURN/s, ${DURATION}s (broker pid $fg_pid)" >&2
"$SIM" run --scenario soak --devices "$DEVICES" --churn "$CHURN" --rate 0.1 \
    --duration "$DURATION" --connect-limit 300 --fleet "$work/fleet" --broker "$mqtt" \
    --broker-pid "$fg_pid" --json "$work/soak.json" \
    || echo "(soak: expectations not met, see the figures)" >&2

echo "kill -9, check, restart, read back" >&2
kill -9 "$fg_pid"; wait "$fg_pid" 2>/dev/null || true; fg_pid=
"$FG" check --data-dir "$work/fg"
start
"$FG" device list --json --limit 100000 >"$work/devices.json"
python3 - "$work/fleet/soak-writes/acked.json" "$work/devices.json" <<'PY'
import json, sys
acked = json.load(open(sys.argv[1]))
status = {d["id"]: d["status"] for d in json.load(open(sys.argv[2]))}
revoked = set(acked["revoked"])
lost = [i for i in acked["enrolled"]
        if status.get(i) != ("revoked" if i in revoked else "active")]
print(f"after kill -9 and restart: {len(acked['enrolled'])} enrollments and "
      f"{len(revoked)} revocations acknowledged, {len(lost)} lost {lost[:5]}")
sys.exit(1 if lost else 0)
PY
