#!/usr/bin/env bash
# Fleet benchmark at scale, with a telemetry consumer: at each fleet size,
# fleetgate and then Mosquitto 2 (require_certificate true) hold the same
# devices (same certificates), each publishing telemetry at RATE msg/s,
# while one service subscribed to devices/+/telemetry counts every message.
# Loopback only; one broker at a time; a fresh broker process per size.
#
#   bash bench/fleet-scale.sh                       # 1k, 5k, 10k, 19k
#   SIZES="1000 5000" DURATION=20 bash bench/fleet-scale.sh
#   # this build against an earlier one, side by side (broker "base"):
#   FG_BASE=/path/to/old/fleetgate BROKERS="fg base" SIZES=10000 bash bench/fleet-scale.sh
#
# Per size and broker: devices connected, connections dropped, messages sent
# and received by the consumer (lost = sent - received), the consumer's
# messages/s, broker RSS in total and per held device, broker CPU per
# 1,000 msg/s over the publishing window. Then connect storms with an
# independent loader (`firmware-sim load connect`, 10 devices x 200 full
# handshakes each) against each broker.
#
# The hard open-file limit here is 20,000 per process: a simulator process
# holds at most PER_PROC devices, so 19,000 devices are two processes.
set -euo pipefail
cd "$(dirname "$0")/.."

SIZES=${SIZES:-"1000 5000 10000 19000"}
RATE=${RATE:-0.1}
DURATION=${DURATION:-30}
PER_PROC=${PER_PROC:-9500}
BROKERS=${BROKERS:-"fg mq"}   # fleetgate, Mosquitto (to rerun one side: BROKERS=mq)
FG_BASE=${FG_BASE:-}          # an earlier fleetgate binary, broker "base"
[[ " $BROKERS " != *" base "* || -x "$FG_BASE" ]] || { echo "BROKERS has base: set FG_BASE to a fleetgate binary" >&2; exit 1; }
CONNECT_LIMIT=${CONNECT_LIMIT:-240}
ulimit -n "$(ulimit -Hn)"

cargo build --release -q -p broker -p firmware-sim
FG=$PWD/target/release/fleetgate
SIM=$PWD/target/release/firmware-sim
MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)
[ -x "$MOSQUITTO" ] || { echo "mosquitto is needed (apt-get install mosquitto)" >&2; exit 1; }

work=${WORK:-$(mktemp -d)}
mkdir -p "$work"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [ -n "${WORK:-}" ] || rm -rf "$work"
}
trap cleanup EXIT
fleet="$work/fleet"
max=0
for n in $SIZES; do (( n > max )) && max=$n; done

start_fleetgate() { # [binary]
    "${1:-$FG}" serve --data-dir "$work/fg" --api-listen 127.0.0.1:0 --mqtt-listen 127.0.0.1:0 \
        --ocsp-listen 127.0.0.1:0 --connect-rate-per-ip 0 --max-connections 25000 \
        --max-handshakes 20000 >"$work/fg.out" 2>>"$work/fg.log" &
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
    id mosquitto >/dev/null 2>&1 && chown -R mosquitto "$mq"
    chmod 755 "$work"
    cat >"$work/mosquitto.conf" <<CONF
per_listener_settings false
listener 38884 127.0.0.1
cafile $mq/ca.crt
certfile $mq/server.crt
keyfile $mq/server.key
require_certificate true
# AES-128-GCM, which fleetgate picks for these clients (mqtt/src/mqtt_tls.rs):
# the same handshake and records on both brokers
ciphers_tls1.3 TLS_AES_128_GCM_SHA256
use_identity_as_username true
set_tcp_nodelay true
max_connections -1
log_type error
CONF
    "$MOSQUITTO" -c "$work/mosquitto.conf" >>"$work/mosquitto.log" 2>&1 &
    broker_pid=$!
    pids+=($broker_pid)
    for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/38884) 2>/dev/null && break; sleep 0.1; done
    broker=127.0.0.1:38884
}

start_broker() { # fg | base | mq
    case $1 in
        fg) start_fleetgate ;;
        base) start_fleetgate "$FG_BASE" ;;
        *) start_mosquitto ;;
    esac
}

stop_broker() {
    kill "$broker_pid" 2>/dev/null || true
    wait "$broker_pid" 2>/dev/null || true
}

# Enrol the largest fleet once (and the consumer, a service), through
# fleetgate's API; every run after reuses the keys and certificates.
mkdir -p "$work/fg-init"
start_fleetgate
[ -f "$fleet/fleet-consumer.crt" ] || "$FG" service enroll fleet-consumer --out "$fleet" >/dev/null
procs_for() { echo $(( ($1 + PER_PROC - 1) / PER_PROC )); }
p=$(procs_for "$max")
for k in $(seq 0 $((p - 1))); do
    per=$(( (max + p - 1) / p ))
    echo "enrolling $per devices p$k- ..." >&2
    "$SIM" run --scenario storm --devices "$per" --prefix "p$k-" --fleet "$fleet" --broker "$broker" \
        --quiet --json "$work/warm-$k.json" --connect-limit 600 >/dev/null || true
done
stop_broker

run_size() { # name n
    local name=$1 n=$2 p per k
    # A reused WORK dir: this run's figures only.
    rm -f "$work/$name-$n-"*.json
    p=$(procs_for "$n")
    per=$(( n / p ))
    "$SIM" load consume --broker "$broker" --ca "$fleet/ca.crt" --creds "$fleet" --id fleet-consumer \
        --idle 30 --limit $((CONNECT_LIMIT + DURATION + 120)) >"$work/$name-$n-consumer.json" &
    local consumer=$!
    sleep 1
    local sims=()
    for k in $(seq 0 $((p - 1))); do
        "$SIM" run --scenario steady --devices "$per" --prefix "p$k-" --fleet "$fleet" --broker "$broker" \
            --broker-pid "$broker_pid" --rate "$RATE" --duration "$DURATION" --connect-limit "$CONNECT_LIMIT" \
            --quiet --json "$work/$name-$n-steady-$k.json" >/dev/null 2>>"$work/sim.log" &
        sims+=($!)
    done
    for s in "${sims[@]}"; do wait "$s" || true; done
    wait "$consumer" || true
}

storm() { # name
    rm -f "$work/$1-storm.json"
    "$SIM" load connect --broker "$broker" --ca "$fleet/ca.crt" --creds "$fleet" --prefix p0- \
        --concurrency 10 --connects 2000 >"$work/$1-storm.json"
}

for n in $SIZES; do
    for b in $BROKERS; do
        echo "size $n: $b ..." >&2
        start_broker "$b"
        run_size "$b" "$n"
        stop_broker
    done
done
for b in $BROKERS; do
    start_broker "$b"
    storm "$b"
    stop_broker
done

python3 - "$work" "$RATE" "$DURATION" $SIZES <<'PY'
import json, sys, os, glob
w, rate, dur, sizes = sys.argv[1], float(sys.argv[2]), sys.argv[3], [int(s) for s in sys.argv[4:]]
def load(p):
    try:
        return json.load(open(p))
    except Exception:
        return {}
def side(name, n):
    steady = [load(p).get("figures", {}) for p in sorted(glob.glob(os.path.join(w, f"{name}-{n}-steady-*.json")))]
    cons = load(os.path.join(w, f"{name}-{n}-consumer.json"))
    g = lambda k: sum(s.get(k, 0) for s in steady)
    sent, got = g("sent_total"), cons.get("received", 0)
    # Broker figures come from the first simulator (they all read the same broker).
    first = steady[0] if steady else {}
    win = first.get("window_s", 0) or 1
    mps = g("messages_per_s")
    cpu = first.get("broker_cpu_s", 0) / win
    rss = max(s.get("broker_rss_mib", 0) for s in steady) if steady else 0
    held = g("connected")
    return {
        "connected": held, "dropped": g("dropped"), "sent": sent, "received": got,
        "lost": sent - got, "consumer_per_s": cons.get("messages_per_s", 0), "sent_per_s": mps,
        "rss_mib": rss, "rss_per_device_kib": rss * 1024 / max(held, 1),
        "cpu_per_1000": cpu / (mps / 1000) if mps else 0, "cpu_pct": cpu * 100,
    }
print(f"\nfleet at scale: each device {rate} msg/s for {dur} s, one consumer on devices/+/telemetry; loopback, 2 cores shared with the fleet\n")
hdr = f"{'devices':>8} {'broker':<10}{'held':>7}{'dropped':>8}{'sent':>9}{'received':>9}{'lost':>6}{'msg/s':>8}{'RSS MiB':>9}{'KiB/dev':>8}{'CPU%':>6}{'CPU s/1k msg':>13}"
print(hdr)
for n in sizes:
    for name, label in (("fg", "fleetgate"), ("base", "baseline"), ("mq", "Mosquitto")):
        if not glob.glob(os.path.join(w, f"{name}-{n}-steady-*.json")):
            continue
        r = side(name, n)
        print(f"{n:>8} {label:<10}{r['connected']:>7}{r['dropped']:>8}{r['sent']:>9}{r['received']:>9}{r['lost']:>6}"
              f"{r['consumer_per_s']:>8.1f}{r['rss_mib']:>9.1f}{r['rss_per_device_kib']:>8.1f}{r['cpu_pct']:>6.1f}{r['cpu_per_1000']:>13.3f}")
fs, ms, bs = (load(os.path.join(w, f"{b}-storm.json")) for b in ("fg", "mq", "base"))
if fs and bs:
    print(f"\nconnect storm (10 devices x 200 full handshakes): fleetgate {fs['connects_per_s']:.1f}/s, "
          f"baseline {bs['connects_per_s']:.1f}/s, ratio {fs['connects_per_s'] / bs['connects_per_s']:.2f}x")
if fs and ms:
    print(f"\nconnect storm (10 devices x 200 full handshakes): fleetgate {fs['connects_per_s']:.1f}/s, "
          f"Mosquitto {ms['connects_per_s']:.1f}/s, ratio {fs['connects_per_s'] / ms['connects_per_s']:.2f}x")
PY
