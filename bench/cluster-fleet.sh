#!/usr/bin/env bash
# A fleet spread over three fleetgate nodes, with one telemetry consumer:
# one etcd member (the registry), one nats-server with JetStream (the
# bus), three nodes each on its own loopback address (127.0.0.2, .3, .4),
# each node's devices in a simulator process of their own (each process
# holds at most ~19,000 connections: the hard open-file limit here is
# 20,000). Every device publishes telemetry at RATE msg/s for DURATION s;
# one service on node one (127.0.0.2) subscribed to devices/+/telemetry
# counts every message, so two thirds of them cross nodes on the bus.
#
#   bash bench/cluster-fleet.sh                 # PER_NODE=19000
#   PER_NODE=3000 DURATION=20 bash bench/cluster-fleet.sh
#
# Prints, per node: devices held, dropped, messages sent; the consumer's
# count (lost = sent - received); each node's RSS and CPU over the
# publishing window. Enrolment (through node one's API, into etcd) comes
# first and is not timed.
set -euo pipefail
cd "$(dirname "$0")/.."

PER_NODE=${PER_NODE:-19000}
RATE=${RATE:-0.1}
DURATION=${DURATION:-30}
CONNECT_LIMIT=${CONNECT_LIMIT:-240}
ulimit -n "$(ulimit -Hn)"
PATH=$PATH:/usr/sbin
for tool in etcd nats-server; do
    command -v $tool >/dev/null || { echo "needs $tool (apt-get install etcd-server nats-server)" >&2; exit 1; }
done

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
nats_port=$(port)
nats-server -a 127.0.0.1 -p "$nats_port" -js -sd "$work/nats" >"$work/nats.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$nats_port") 2>/dev/null && break; sleep 0.1; done

declare -A node_pid node_mqtt
node() { # name address
    "$FG" serve --data-dir "$work/$1" --store "etcd://$client" --nats "nats://127.0.0.1:$nats_port" \
        --api-listen "$2:0" --mqtt-listen "$2:0" --ocsp-listen "$2:0" \
        --san 127.0.0.2 --san 127.0.0.3 --san 127.0.0.4 \
        --connect-rate-per-ip 0 --http-rate-per-ip 0 --max-connections 25000 --max-handshakes 20000 \
        >"$work/$1.out" 2>>"$work/$1.log" &
    node_pid[$1]=$!
    pids+=($!)
    for _ in $(seq 200); do grep -q listening "$work/$1.out" 2>/dev/null && break; sleep 0.1; done
    node_mqtt[$1]=$(sed -n 's/.*mqtt=\([^ ]*\).*/\1/p' "$work/$1.out")
}
node n1 127.0.0.2
for n in n2 n3; do
    mkdir -p "$work/$n"
    (cd "$work/n1" && tar cf - --exclude registry .) | (cd "$work/$n" && tar xf -)
done
node n2 127.0.0.3
node n3 127.0.0.4
api=$(sed -n 's/.*api=\([^ ]*\).*/\1/p' "$work/n1.out")
export FLEETGATE_API="https://$api" FLEETGATE_DATA_DIR="$work/n1"
fleet="$work/fleet"
"$FG" service enroll fleet-consumer --out "$fleet" >/dev/null

# Enrol every node's devices (a storm against its node also warms it).
for k in 1 2 3; do
    echo "enrolling $PER_NODE devices for n$k ..." >&2
    "$SIM" run --scenario storm --devices "$PER_NODE" --prefix "n$k-" --fleet "$fleet" \
        --broker "${node_mqtt[n$k]}" --quiet --json "$work/warm-$k.json" --connect-limit 600 \
        >/dev/null 2>>"$work/sim.log" || true
done

echo "steady: $((3 * PER_NODE)) devices, $RATE msg/s each for $DURATION s, consumer on n1" >&2
"$SIM" load consume --broker "${node_mqtt[n1]}" --ca "$fleet/ca.crt" --creds "$fleet" \
    --id fleet-consumer --idle 30 --limit $((CONNECT_LIMIT + DURATION + 120)) >"$work/consumer.json" &
consumer=$!
sleep 1
sims=()
for k in 1 2 3; do
    "$SIM" run --scenario steady --devices "$PER_NODE" --prefix "n$k-" --fleet "$fleet" \
        --broker "${node_mqtt[n$k]}" --broker-pid "${node_pid[n$k]}" --rate "$RATE" \
        --duration "$DURATION" --connect-limit "$CONNECT_LIMIT" --quiet \
        --json "$work/steady-$k.json" >/dev/null 2>>"$work/sim.log" &
    sims+=($!)
done
for s in "${sims[@]}"; do wait "$s" || true; done
wait "$consumer" || true

python3 - "$work" "$RATE" "$DURATION" <<'PY'
import json, os, sys
w, rate, dur = sys.argv[1], sys.argv[2], sys.argv[3]
def load(p):
    try:
        return json.load(open(p))
    except Exception:
        return {}
cons = load(os.path.join(w, "consumer.json"))
print(f"\nfleet over three nodes: each device {rate} msg/s for {dur} s; one consumer on n1; loopback, 2 cores shared by all\n")
print(f"{'node':<6}{'held':>8}{'dropped':>9}{'sent':>9}{'msg/s':>8}{'RSS MiB':>9}{'KiB/dev':>8}{'CPU%':>6}")
sent = held = 0
for k in (1, 2, 3):
    f = load(os.path.join(w, f"steady-{k}.json")).get("figures", {})
    win = f.get("window_s", 0) or 1
    h, s = f.get("connected", 0), f.get("sent_total", 0)
    held += h
    sent += s
    rss = f.get("broker_rss_mib", 0)
    print(f"n{k:<5}{h:>8}{f.get('dropped', 0):>9}{s:>9}{f.get('messages_per_s', 0):>8.1f}"
          f"{rss:>9.1f}{rss * 1024 / max(h, 1):>8.1f}{100 * f.get('broker_cpu_s', 0) / win:>6.1f}")
got = cons.get("received", 0)
print(f"\nheld {held} devices; sent {sent}, the consumer on n1 received {got} (lost {sent - got}), "
      f"{cons.get('messages_per_s', 0):.1f} msg/s")
PY
