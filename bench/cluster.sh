#!/usr/bin/env bash
# Two fleetgate nodes on one etcd member, on loopback: revoke-to-disconnect
# across nodes (bench/cluster.py) for N revocations; admission connects/s
# (firmware-sim load connect) on a node on etcd beside a node on sled,
# alternating, ROUNDS each; then the registry's reads and writes per second
# on etcd beside sled (cargo bench -p broker --bench store).
#
#   bash bench/cluster.sh           # N=100 CONNECTS=2000 ROUNDS=2
#   N=20 CONNECTS=500 bash bench/cluster.sh
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-100}
CONNECTS=${CONNECTS:-2000}
CONCURRENCY=${CONCURRENCY:-16}
ROUNDS=${ROUNDS:-2}
command -v etcd >/dev/null || { echo "needs etcd (apt-get install etcd-server)" >&2; exit 1; }
python3 -c 'import paho.mqtt' || { echo "needs paho-mqtt: pip install paho-mqtt==2.1.0" >&2; exit 1; }
cargo build --release -q -p broker -p firmware-sim
FG=$PWD/target/release/fleetgate
SIM=$PWD/target/release/firmware-sim
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

node() { # name [store]
    local store=()
    [ "${2:-etcd}" = etcd ] && store=(--store "etcd://$client")
    "$FG" serve --data-dir "$work/$1" "${store[@]}" --api-listen 127.0.0.1:0 \
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

# Admission: the same handshakes and CONNECTs against a node on etcd and a
# node on sled (each enrolls its own devices: the sled node has its own CA).
node solo sled
mqtt1=$(sed -n 's/.*mqtt=\([^ ]*\).*/\1/p' "$work/one.out")
mqtt_solo=$(sed -n 's/.*mqtt=\([^ ]*\).*/\1/p' "$work/solo.out")
api_solo=$(sed -n 's/.*api=\([^ ]*\).*/\1/p' "$work/solo.out")
for i in $(seq 0 $((CONCURRENCY - 1))); do
    "$FG" device enroll "bench-$i" --out "$work/creds-etcd" >/dev/null
    FLEETGATE_API="https://$api_solo" FLEETGATE_DATA_DIR="$work/solo" \
        "$FG" device enroll "bench-$i" --out "$work/creds-sled" >/dev/null
done
connects() { # store addr data-dir
    "$SIM" load connect --broker "$2" --ca "$work/$3/ca.crt" --creds "$work/creds-$1" \
        --concurrency "$CONCURRENCY" --connects "$CONNECTS" |
        python3 -c 'import json,sys; r=json.load(sys.stdin); print(round(r["connects_per_s"])); r["failures"] and print(r["failures"], "failed", file=sys.stderr)'
}
echo "admission: $CONNECTS full mTLS handshakes + CONNECT, $CONCURRENCY at a time, connects/s" >&2
printf '%-6s %10s %10s %8s\n' round sled etcd etcd/sled
for r in $(seq "$ROUNDS"); do
    s=$(connects sled "$mqtt_solo" solo)
    e=$(connects etcd "$mqtt1" one)
    printf '%-6s %10s %10s %7.2fx\n' "$r" "$s" "$e" "$(python3 -c "print($e/$s)")"
done

echo >&2
FLEETGATE_BENCH_ETCD=$client cargo bench -q -p broker --bench store 2>/dev/null
