#!/usr/bin/env bash
# Two fleetgate nodes on one etcd member, on loopback: revoke-to-disconnect
# across nodes (bench/cluster.py) for N revocations, then the registry's
# writes and reads per second on etcd beside sled (cargo bench registry).
#
#   bash bench/cluster.sh           # N=100
#   N=20 bash bench/cluster.sh
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-100}
command -v etcd >/dev/null || { echo "needs etcd (apt-get install etcd-server)" >&2; exit 1; }
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

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
client=127.0.0.1:$(port)
peer=127.0.0.1:$(port)
etcd --data-dir "$work/etcd" --name m1 --listen-client-urls "http://$client" \
    --advertise-client-urls "http://$client" --listen-peer-urls "http://$peer" \
    --initial-advertise-peer-urls "http://$peer" --initial-cluster "m1=http://$peer" \
    >"$work/etcd.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do curl -sf "http://$client/health" >/dev/null && break; sleep 0.1; done

node() { # name
    "$FG" serve --data-dir "$work/$1" --store "etcd://$client" --api-listen 127.0.0.1:0 \
        --mqtt-listen 127.0.0.1:0 --ocsp-listen 127.0.0.1:0 --connect-rate-per-ip 0 \
        --http-rate-per-ip 0 >"$work/$1.out" 2>>"$work/$1.log" &
    pids+=($!)
    for _ in $(seq 100); do grep -q listening "$work/$1.out" 2>/dev/null && break; sleep 0.1; done
}
node one
mkdir -p "$work/two"
(cd "$work/one" && tar cf - --exclude registry .) | (cd "$work/two" && tar xf -)
node two
api1=$(sed -n 's/.*api=\([^ ]*\).*/\1/p' "$work/one.out")
mqtt2=$(sed -n 's/.*mqtt=\([^ ]*\).*/\1/p' "$work/two.out")
export FLEETGATE_API="https://$api1" FLEETGATE_DATA_DIR="$work/one" FG_BIN="$FG"
for i in $(seq 0 $((N - 1))); do
    "$FG" device enroll "$(printf 'cl-%04d' "$i")" --out "$work/creds" >/dev/null
done
echo "revoke-to-disconnect: $N devices on node two, each revoked through node one" >&2
python3 bench/cluster.py "$N" "$mqtt2" "$work/creds"
