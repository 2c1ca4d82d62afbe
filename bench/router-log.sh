#!/usr/bin/env bash
# Broker memory under sustained publishing with one subscriber, for each
# --router-log-mib given: 4 publishers x 100k QoS 0 messages of 64 B a round,
# six rounds, RSS after each and how many the subscriber received.
# Loopback only.
#
#   bash bench/router-log.sh 1600 64 16
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p broker -p firmware-sim
FG=$PWD/target/release/fleetgate
SIM=$PWD/target/release/firmware-sim
for mib in "${@:-64}"; do
    work=$(mktemp -d)
    "$FG" serve --data-dir "$work/fg" --api-listen 127.0.0.1:0 --mqtt-listen 127.0.0.1:0 \
        --connect-rate-per-ip 0 --ocsp-listen 127.0.0.1:0 --router-log-mib "$mib" \
        >"$work/fg.out" 2>"$work/fg.log" &
    pid=$!
    for _ in $(seq 100); do grep -q listening "$work/fg.out" 2>/dev/null && break; sleep 0.1; done
    api=$(sed -n 's/.*api=\([^ ]*\).*/\1/p' "$work/fg.out")
    mqtt=$(sed -n 's/.*mqtt=\([^ ]*\).*/\1/p' "$work/fg.out")
    export FLEETGATE_API="https://$api" FLEETGATE_DATA_DIR="$work/fg"
    for i in 0 1 2 3; do "$FG" device enroll "bench-$i" --out "$work/creds" >/dev/null; done
    "$FG" service enroll bench-sub --out "$work/creds" >/dev/null
    rss() { awk '/VmRSS/ {print int($2/1024)}' "/proc/$pid/status"; }
    line="router-log-mib $mib: RSS MiB idle $(rss)"
    for round in 1 2 3 4 5 6; do
        out=$("$SIM" load publish --broker "$mqtt" --ca "$work/creds/ca.crt" --creds "$work/creds" \
            --publishers 4 --messages 100000 --size 64 --qos 0)
        got=$(echo "$out" | python3 -c 'import json,sys; r=json.load(sys.stdin); print("%d of %d" % (r["received"], r["sent"]))')
        line="$line; after $((round * 400))k: $(rss) (received $got)"
    done
    echo "$line"
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    rm -rf "$work"
done
