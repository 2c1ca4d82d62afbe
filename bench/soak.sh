#!/usr/bin/env bash
# Soak: fleetgate holds DEVICES mutual-TLS connections (RATE messages each a
# second, default 0.1) for DURATION seconds while CHURN more devices a second connect,
# publish at QoS 1 and leave, and a writer enrolls a device every 500 ms and
# revokes one every 2 s through the admin API. Loopback only, bounded.
# Prints the broker's RSS every 30 s; then reads back every acknowledged
# write, kills the broker with -9, runs `fleetgate check`, restarts it and
# reads them back again.
#
# With CONSUMER=1 a service subscribed to devices/+/telemetry counts every
# message (received against sent, and its messages/s).
#
#   bash bench/soak.sh                       # 5,000 connections, 10 minutes
#   DEVICES=500 DURATION=60 bash bench/soak.sh
#   DEVICES=10000 DURATION=1800 CONSUMER=1 bash bench/soak.sh   # 1,000 msg/s, 30 min
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICES=${DEVICES:-5000}
DURATION=${DURATION:-600}
CHURN=${CHURN:-10}
RATE=${RATE:-0.1}
CONSUMER=${CONSUMER:-0}
# FG_ARGS: more `fleetgate serve` flags, e.g. FG_ARGS="--router-log-mib 16".
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
        --ocsp-listen 127.0.0.1:0 --connect-rate-per-ip 0 --max-connections 20000 ${FG_ARGS:-} \
        >"$work/fg.out" 2>>"$work/fg.log" &
    fg_pid=$!
    for _ in $(seq 100); do grep -q listening "$work/fg.out" 2>/dev/null && break; sleep 0.1; done
    api=$(sed -n 's/.*api=\([^ ]*\).*/\1/p' "$work/fg.out")
    mqtt=$(sed -n 's/.*mqtt=\([^ ]*\).*/\1/p' "$work/fg.out")
    export FLEETGATE_API="https://$api" FLEETGATE_DATA_DIR="$work/fg"
}

start
echo "soak: $DEVICES held connections at $RATE msg/s each, churn $CHURN/s, ${DURATION}s (broker pid $fg_pid)" >&2
consumer=
if [ "$CONSUMER" = 1 ]; then
    "$FG" service enroll fleet-consumer --out "$work/consumer" >/dev/null
    "$SIM" load consume --broker "$mqtt" --ca "$work/fg/ca.crt" --creds "$work/consumer" \
        --id fleet-consumer --idle 15 --limit $((DURATION + 900)) >"$work/consumer.json" &
    consumer=$!
fi
"$SIM" run --scenario soak --devices "$DEVICES" --churn "$CHURN" --rate "$RATE" \
    --duration "$DURATION" --connect-limit 300 --fleet "$work/fleet" --broker "$mqtt" \
    --broker-pid "$fg_pid" --json "$work/soak.json" \
    || echo "(soak: expectations not met, see the figures)" >&2
if [ -n "$consumer" ]; then
    wait "$consumer" || true
    python3 - "$work/soak.json" "$work/consumer.json" <<'PY'
import json, sys
f = json.load(open(sys.argv[1]))["figures"]
c = json.load(open(sys.argv[2]))
sent = f.get("sent_total", f.get("messages_sent", 0))
print(f"consumer: received {c['received']} (held devices sent {sent}, the churn one each), "
      f"{c['messages_per_s']:.1f} msg/s over {c['seconds']:.0f} s")
PY
fi

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
