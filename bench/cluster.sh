#!/usr/bin/env bash
# Two fleetgate nodes on one etcd member, on loopback: revoke-to-disconnect
# across nodes (bench/cluster.py) for N revocations; admission connects/s
# (firmware-sim load connect) on a node on etcd beside a node on sled,
# alternating, ROUNDS each; then the registry's reads and writes per second
# on etcd beside sled (cargo bench -p broker --bench store); then messages
# across nodes on NATS JetStream: messages/s and latency p50/p99 with the
# subscriber on the publishers' node and on the other node, QoS 0 and 1,
# beside a node without NATS (firmware-sim load publish).
#
#   bash bench/cluster.sh           # N=100 CONNECTS=2000 ROUNDS=2
#   N=20 CONNECTS=500 bash bench/cluster.sh
#   SKIP=revoke,store bash bench/cluster.sh   # leave parts out
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-100}
CONNECTS=${CONNECTS:-2000}
CONCURRENCY=${CONCURRENCY:-16}
ROUNDS=${ROUNDS:-2}
SKIP=${SKIP:-}
MESSAGES=${MESSAGES:-5000}
PUBLISHERS=${PUBLISHERS:-4}
command -v etcd >/dev/null || { echo "needs etcd (apt-get install etcd-server)" >&2; exit 1; }
PATH=$PATH:/usr/sbin
command -v nats-server >/dev/null || { echo "needs nats-server (apt-get install nats-server)" >&2; exit 1; }
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

node() { # name [store] [extra serve args...]
    local store=()
    [ "${2:-etcd}" = etcd ] && store=(--store "etcd://$client")
    "$FG" serve --data-dir "$work/$1" "${store[@]}" "${@:3}" --api-listen 127.0.0.1:0 \
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
skip() { [[ ",$SKIP," == *",$1,"* ]]; }
if ! skip revoke; then
    for i in $(seq 0 $((N - 1))); do
        "$FG" device enroll "$(printf 'cl-%04d' "$i")" --out "$work/creds" >/dev/null
    done
    echo "revoke-to-disconnect: $N devices on node two, each revoked through node one" >&2
    python3 bench/cluster.py "$N" "$mqtt2" "$work/creds"
fi

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
skip admission && ROUNDS=0
for r in $(seq "$ROUNDS"); do
    s=$(connects sled "$mqtt_solo" solo)
    e=$(connects etcd "$mqtt1" one)
    printf '%-6s %10s %10s %7.2fx\n' "$r" "$s" "$e" "$(python3 -c "print($e/$s)")"
done

echo >&2
skip store || FLEETGATE_BENCH_ETCD=$client cargo bench -q -p broker --bench store 2>/dev/null

# Messages across nodes: two more nodes on the etcd, with NATS.
nats_port=$(port)
nats-server -a 127.0.0.1 -p "$nats_port" -js -sd "$work/nats" >"$work/nats.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$nats_port") 2>/dev/null && break; sleep 0.1; done
for n in b1 b2; do
    mkdir -p "$work/$n"
    (cd "$work/one" && tar cf - --exclude registry --exclude sessions .) | (cd "$work/$n" && tar xf -)
    node "$n" etcd --nats "nats://127.0.0.1:$nats_port"
done
addr() { sed -n 's/.*mqtt=\([^ ]*\).*/\1/p' "$work/$1.out"; }
for i in $(seq 0 $((PUBLISHERS - 1))); do
    "$FG" device enroll "pub-$i" --out "$work/creds-etcd" >/dev/null
    FLEETGATE_API="https://$api_solo" FLEETGATE_DATA_DIR="$work/solo" \
        "$FG" device enroll "pub-$i" --out "$work/creds-sled" >/dev/null
done
"$FG" service enroll bench-sub --out "$work/creds-etcd" >/dev/null
FLEETGATE_API="https://$api_solo" FLEETGATE_DATA_DIR="$work/solo" \
    "$FG" service enroll bench-sub --out "$work/creds-sled" >/dev/null
publish() { # creds data-dir pub-addr sub-addr qos
    "$SIM" load publish --broker "$3" --subscriber-broker "$4" --ca "$work/$2/ca.crt" \
        --creds "$work/creds-$1" --prefix pub- --publishers "$PUBLISHERS" \
        --messages "$MESSAGES" --qos "$5" |
        python3 -c 'import json,sys; r=json.load(sys.stdin); print("%d/%d %.0f/s p50 %.1f ms p99 %.1f ms" % (r["received"], r["sent"], r["messages_per_s"], r["p50_ms"], r["p99_ms"]))'
}
echo >&2
echo "messages: $PUBLISHERS devices x $MESSAGES messages of 64 bytes to one service (devices/+/telemetry)" >&2
for q in 0 1; do
    echo "QoS $q, one node without NATS:      $(publish sled solo "$mqtt_solo" "$mqtt_solo" $q)"
    echo "QoS $q, same node, with NATS:       $(publish etcd one "$(addr b1)" "$(addr b1)" $q)"
    echo "QoS $q, across nodes (NATS):        $(publish etcd one "$(addr b1)" "$(addr b2)" $q)"
done
echo >&2
echo "admission on etcd, a node without NATS beside one with it (each CONNECT claims its session and reads its session record on JetStream), connects/s" >&2
printf '%-6s %10s %10s %8s\n' round without with with/without
for r in $(seq "${BUS_ROUNDS:-2}"); do
    e=$(connects etcd "$mqtt1" one)
    b=$(connects etcd "$(addr b1)" one)
    printf '%-6s %10s %10s %7.2fx\n' "$r" "$e" "$b" "$(python3 -c "print($b/$e)")"
done
