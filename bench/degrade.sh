#!/usr/bin/env bash
# One device degrading everyone (bench/degrade.py): fleetgate, then
# Mosquitto 2 (require_certificate, use_identity_as_username, and an ACL of
# each device's own topics), with the same certificates. Loopback only.
#
#   bash bench/degrade.sh            # both brokers
#   BROKERS=fg bash bench/degrade.sh # one
#
# Prints each broker's figures as JSON, then a summary side by side.
set -euo pipefail
cd "$(dirname "$0")/.."

BROKERS=${BROKERS:-"fg mq"}
python3 -c 'import paho.mqtt' || { echo "needs paho-mqtt: pip install paho-mqtt==2.1.0" >&2; exit 1; }
cargo build --release -q -p broker
FG=$PWD/target/release/fleetgate
work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

start_fleetgate() {
    "$FG" serve --data-dir "$work/fg" --api-listen 127.0.0.1:0 --mqtt-listen 127.0.0.1:0 \
        --ocsp-listen 127.0.0.1:0 --connect-rate-per-ip 0 >"$work/fg.out" 2>>"$work/fg.log" &
    broker_pid=$!
    pids+=($broker_pid)
    for _ in $(seq 100); do grep -q listening "$work/fg.out" 2>/dev/null && break; sleep 0.1; done
    api=$(sed -n 's/.*api=\([^ ]*\).*/\1/p' "$work/fg.out")
    broker=$(sed -n 's/.*mqtt=\([^ ]*\).*/\1/p' "$work/fg.out")
    export FLEETGATE_API="https://$api" FLEETGATE_DATA_DIR="$work/fg"
}

start_mosquitto() {
    local mq="$work/mosquitto-tls"
    mkdir -p "$mq"
    cp "$work/fg/ca.crt" "$work/fg/server.crt" "$work/fg/server.key" "$mq/"
    cat >"$mq/acl" <<ACL
pattern readwrite devices/%u/#
user deg-svc
topic read devices/#
ACL
    id mosquitto >/dev/null 2>&1 && chown -R mosquitto "$mq"
    chmod 755 "$work"
    cat >"$work/mosquitto.conf" <<CONF
per_listener_settings false
listener 38885 127.0.0.1
cafile $mq/ca.crt
certfile $mq/server.crt
keyfile $mq/server.key
require_certificate true
use_identity_as_username true
acl_file $mq/acl
log_type error
CONF
    mosquitto -c "$work/mosquitto.conf" >>"$work/mosquitto.log" 2>&1 &
    broker_pid=$!
    pids+=($broker_pid)
    for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/38885) 2>/dev/null && break; sleep 0.1; done
    broker=127.0.0.1:38885
}

stop_broker() {
    kill "$broker_pid" 2>/dev/null || true
    wait "$broker_pid" 2>/dev/null || true
}

# Certificates, from fleetgate's CA, for both brokers.
start_fleetgate
creds="$work/creds"
for d in deg-a deg-b deg-c; do "$FG" device enroll "$d" --out "$creds" >/dev/null; done
"$FG" service enroll deg-svc --out "$creds" >/dev/null

for b in $BROKERS; do
    if [ "$b" = fg ]; then
        [ -n "$(jobs -p)" ] || start_fleetgate
    else
        start_mosquitto
    fi
    echo "$b ..." >&2
    python3 bench/degrade.py "$broker" "$creds" "$broker_pid" >"$work/$b.json"
    cat "$work/$b.json"
    stop_broker
done

python3 - "$work" $BROKERS <<'PY'
import json, os, sys
w, brokers = sys.argv[1], sys.argv[2:]
names = {"fg": "fleetgate", "mq": "Mosquitto"}
print(f"\n{'':<44}" + "".join(f"{names[b]:>12}" for b in brokers))
rows = [
    ("rounds: subscriptions granted a round", lambda f: f["rounds"]["granted"][0]),
    ("rounds: RSS growth, 4 rounds (MiB)", lambda f: f["rounds"]["rss_after_round_mib"][-1] - f["rounds"]["rss_before_mib"]),
    ("flood: subscriptions granted", lambda f: f["flood_subscriptions_granted"]),
    ("probe p50 idle (ms)", lambda f: f["probe_idle"]["p50_ms"]),
    ("probe p50 under flood (ms)", lambda f: f["probe_flood"]["p50_ms"]),
    ("probe p99 idle (ms)", lambda f: f["probe_idle"]["p99_ms"]),
    ("probe p99 under flood (ms)", lambda f: f["probe_flood"]["p99_ms"]),
    ("probe max under flood (ms)", lambda f: f["probe_flood"]["max_ms"]),
    ("volume: received of 800", lambda f: f["volume"]["received"]),
    ("volume: MiB/s", lambda f: f["volume"]["mib"] / f["volume"]["seconds"]),
    ("volume: RSS at the end, over before (MiB)", lambda f: f["volume"]["rss_end_mib"] - f["volume"]["rss_before_mib"]),
    ("volume: RSS 3 s after, over before (MiB)", lambda f: f["volume"]["rss_after_mib"] - f["volume"]["rss_before_mib"]),
]
figs = {b: json.load(open(os.path.join(w, f"{b}.json"))) for b in brokers}
for label, get in rows:
    cells = []
    for b in brokers:
        try:
            v = get(figs[b])
            cells.append(f"{v:>12.1f}" if isinstance(v, float) else f"{v:>12}")
        except Exception:
            cells.append(f"{'-':>12}")
    print(f"{label:<44}" + "".join(cells))
PY
