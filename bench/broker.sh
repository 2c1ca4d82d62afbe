#!/usr/bin/env bash
# Broker benchmark: fleetgate beside plain rumqttd (its own TLS listener,
# client certificates required) and Mosquitto 2 (require_certificate true),
# one broker at a time, same load generator (firmware-sim), same
# certificates (minted by fleetgate), loopback only.
#
#   bash bench/broker.sh
#   CONNECTS=4000 CONCURRENCY=32 MESSAGES=50000 bash bench/broker.sh
#
# Needs: mosquitto (apt-get install mosquitto), and a rumqttd 0.20 binary
# with client-certificate checks: RUMQTTD=/path/to/rumqttd, or it is built
# once with `cargo install rumqttd --features verify-client-cert` into
# target/bench-tools (a few minutes; outside the workspace, so its rustls 0.22
# never enters our dependency tree).
set -euo pipefail
cd "$(dirname "$0")/.."

CONNECTS=${CONNECTS:-2000}
CONCURRENCY=${CONCURRENCY:-16}
PUBLISHERS=${PUBLISHERS:-4}
MESSAGES=${MESSAGES:-20000}
SIZE=${SIZE:-64}

cargo build --release -q -p broker -p firmware-sim
FG=$PWD/target/release/fleetgate
SIM=$PWD/target/release/firmware-sim

RUMQTTD=${RUMQTTD:-$PWD/target/bench-tools/bin/rumqttd}
if [ ! -x "$RUMQTTD" ]; then
    echo "building rumqttd 0.20 (verify-client-cert) into target/bench-tools ..." >&2
    # Not --locked: its published lockfile pins a metrics release that no
    # longer compiles on current rustc.
    cargo install -q rumqttd --version 0.20.0 --features verify-client-cert \
        --root "$PWD/target/bench-tools"
fi
MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)

work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

wait_port() {
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "port $1 did not open" >&2
    return 1
}

# fleetgate first: it is also the CA for everyone's certificates.
"$FG" serve --data-dir "$work/fg" --api-listen 127.0.0.1:0 --mqtt-listen 127.0.0.1:0 --connect-rate-per-ip 0 \
    >"$work/fg.out" 2>"$work/fg.log" &
pids+=($!)
fg_pid=$!
for _ in $(seq 100); do grep -q listening "$work/fg.out" 2>/dev/null && break; sleep 0.1; done
api=$(sed -n 's/.*api=\([^ ]*\).*/\1/p' "$work/fg.out")
fg_mqtt=$(sed -n 's/.*mqtt=\([^ ]*\).*/\1/p' "$work/fg.out")
export FLEETGATE_API="https://$api" FLEETGATE_DATA_DIR="$work/fg"
creds="$work/creds"
for i in $(seq 0 $(( (CONCURRENCY > PUBLISHERS ? CONCURRENCY : PUBLISHERS) - 1 ))); do
    "$FG" device enroll "bench-$i" --out "$creds" >/dev/null
done
"$FG" service enroll bench-sub --out "$creds" >/dev/null
ca="$work/fg/ca.crt"

rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

run_suite() { # name addr pid
    local name=$1 addr=$2 pid=$3
    local t=(--broker "$addr" --ca "$ca" --creds "$creds")
    echo "{\"broker\":\"$name\",\"rss_idle_kb\":$(rss_kb "$pid")}"
    echo "{\"broker\":\"$name\",\"test\":\"connect\",\"r\":$("$SIM" load connect "${t[@]}" --concurrency "$CONCURRENCY" --connects "$CONNECTS")}"
    for q in 0 1; do
        echo "{\"broker\":\"$name\",\"test\":\"qos$q\",\"r\":$("$SIM" load publish "${t[@]}" --publishers "$PUBLISHERS" --messages "$MESSAGES" --size "$SIZE" --qos $q)}"
    done
    echo "{\"broker\":\"$name\",\"rss_after_kb\":$(rss_kb "$pid")}"
}

results="$work/results.jsonl"
run_suite fleetgate "$fg_mqtt" "$fg_pid" >>"$results"
kill "$fg_pid"; wait "$fg_pid" 2>/dev/null || true

# Plain rumqttd, TLS with client certificates, no throttling of accepts.
cat >"$work/rumqttd.toml" <<EOF
id = 0
[router]
id = 0
max_connections = 10010
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10
[v4.1]
name = "v4-tls"
listen = "127.0.0.1:28883"
next_connection_delay_ms = 0
    [v4.1.tls]
    capath = "$ca"
    certpath = "$work/fg/server.crt"
    keypath = "$work/fg/server.key"
    [v4.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = 262144
    max_inflight_count = 100
    dynamic_filters = true
EOF
"$RUMQTTD" -c "$work/rumqttd.toml" >"$work/rumqttd.log" 2>&1 &
pids+=($!)
wait_port 28883
run_suite rumqttd 127.0.0.1:28883 $! >>"$results"
kill "${pids[-1]}"

# Mosquitto 2, client certificates required. It drops root for the
# mosquitto user, who cannot read the 0700 data dir: it gets its own copies.
mq="$work/mosquitto-tls"
mkdir -p "$mq"
cp "$ca" "$work/fg/server.crt" "$work/fg/server.key" "$mq/"
id mosquitto >/dev/null 2>&1 && chown -R mosquitto "$mq"
chmod 755 "$work"
cat >"$work/mosquitto.conf" <<EOF
per_listener_settings false
listener 38883 127.0.0.1
cafile $mq/ca.crt
certfile $mq/server.crt
keyfile $mq/server.key
require_certificate true
use_identity_as_username true
set_tcp_nodelay true
max_queued_messages 100000
log_type error
EOF
"$MOSQUITTO" -c "$work/mosquitto.conf" >"$work/mosquitto.log" 2>&1 &
pids+=($!)
wait_port 38883
run_suite mosquitto 127.0.0.1:38883 $! >>"$results"

python3 - "$results" "$CONNECTS" "$CONCURRENCY" "$PUBLISHERS" "$MESSAGES" "$SIZE" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
connects, conc, pubs, msgs, size = sys.argv[2:]
by = {}
for r in rows:
    b = by.setdefault(r["broker"], {})
    if "test" in r: b[r["test"]] = r["r"]
    else: b.update({k: v for k, v in r.items() if k != "broker"})
names = [n for n in ("fleetgate", "rumqttd", "mosquitto") if n in by]
print(f"\nbroker benchmark: {connects} connects x {conc} concurrent (full mTLS handshakes, no resumption); "
      f"{pubs} publishers x {msgs} msgs of {size} B to 1 subscriber\n")
def row(label, f, fmt="{:,.0f}"):
    vals = [f(by[n]) for n in names]
    base = vals[names.index("rumqttd")] if "rumqttd" in names else None
    cells = [fmt.format(v) for v in vals]
    ratios = [f"{v / base:.2f}x" if base else "-" for v in vals]
    print(f"{label:<28}" + "".join(f"{c:>14}" for c in cells) + "   vs rumqttd: " + " ".join(ratios))
print(f"{'':<28}" + "".join(f"{n:>14}" for n in names))
row("connects/s", lambda b: b["connect"]["connects_per_s"])
row("connect p50 ms", lambda b: b["connect"]["p50_ms"], "{:.2f}")
row("connect p99 ms", lambda b: b["connect"]["p99_ms"], "{:.2f}")
row("connect failures", lambda b: b["connect"]["failures"])
row("QoS 0 msgs/s delivered", lambda b: b["qos0"]["messages_per_s"])
row("QoS 0 delivered of sent", lambda b: b["qos0"]["received"] / b["qos0"]["sent"], "{:.3f}")
row("QoS 1 msgs/s delivered", lambda b: b["qos1"]["messages_per_s"])
row("QoS 1 delivered of sent", lambda b: b["qos1"]["received"] / b["qos1"]["sent"], "{:.3f}")
row("RSS idle MiB", lambda b: b["rss_idle_kb"] / 1024, "{:.1f}")
row("RSS after MiB", lambda b: b["rss_after_kb"] / 1024, "{:.1f}")
EOF
