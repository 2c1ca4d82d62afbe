#!/usr/bin/env bash
# Fleet benchmark: the simulated fleet (firmware-sim) against fleetgate and
# against Mosquitto 2 (require_certificate true, set_tcp_nodelay true), same
# devices, same certificates, loopback only, one broker at a time:
#   storm  STORM devices connecting at once (full handshakes)
#   steady STEADY idle-ish devices (one message each per 10 s) for DURATION s
#   revoke REVOKE_OF devices, REVOKE of them revoked mid-run (fleetgate only)
#   bulk   BULK_OF devices, BULK of them revoked in one bulk call (fleetgate
#          only): revoke-to-disconnect measured from the API's answer
#
#   bash bench/fleet.sh
#   STORM=500 STEADY=2000 bash bench/fleet.sh
set -euo pipefail
cd "$(dirname "$0")/.."

STORM=${STORM:-2000}
STEADY=${STEADY:-10000}
DURATION=${DURATION:-20}
REVOKE_OF=${REVOKE_OF:-500}
REVOKE=${REVOKE:-50}
BULK_OF=${BULK_OF:-1200}
BULK=${BULK:-1000}
CONNECT_LIMIT=${CONNECT_LIMIT:-120}
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

cargo build --release -q -p broker -p firmware-sim
FG=$PWD/target/release/fleetgate
SIM=$PWD/target/release/firmware-sim
MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)

work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

"$FG" serve --data-dir "$work/fg" --api-listen 127.0.0.1:0 --mqtt-listen 127.0.0.1:0 --connect-rate-per-ip 0 \
    --ocsp-listen 127.0.0.1:0 --max-connections 20000 --max-handshakes 20000 >"$work/fg.out" 2>"$work/fg.log" &
fg_pid=$!
pids+=($fg_pid)
for _ in $(seq 100); do grep -q listening "$work/fg.out" 2>/dev/null && break; sleep 0.1; done
api=$(sed -n 's/.*api=\([^ ]*\).*/\1/p' "$work/fg.out")
fg_mqtt=$(sed -n 's/.*mqtt=\([^ ]*\).*/\1/p' "$work/fg.out")
export FLEETGATE_API="https://$api" FLEETGATE_DATA_DIR="$work/fg"
fleet="$work/fleet"
n=$(( STORM > STEADY ? STORM : STEADY ))

sim() { # broker pid json scenario args...
    local broker=$1 pid=$2 json=$3
    shift 3
    # A scenario that misses its expectations still writes its figures: the
    # report below shows them (connected counts included).
    "$SIM" run --fleet "$fleet" --broker "$broker" --broker-pid "$pid" --quiet --json "$json" "$@" \
        || echo "($(basename "$json" .json): expectations not met, see the figures)" >&2
}

echo "enrolling $n devices ..." >&2
t0=$(date +%s.%N)
"$SIM" run --scenario storm --devices "$n" --fleet "$fleet" --broker "$fg_mqtt" --quiet \
    --json "$work/warmup.json" --connect-limit 300 >/dev/null
echo "enrolled + one storm in $(echo "$(date +%s.%N) - $t0" | bc) s" >&2

sim "$fg_mqtt" $fg_pid "$work/fg-storm.json" --scenario storm --devices "$STORM" >/dev/null
sim "$fg_mqtt" $fg_pid "$work/fg-steady.json" --scenario steady --devices "$STEADY" \
    --rate 0.1 --duration "$DURATION" --connect-limit "$CONNECT_LIMIT" >/dev/null
sim "$fg_mqtt" $fg_pid "$work/fg-revoke.json" --scenario revoke --devices "$REVOKE_OF" \
    --revoke "$REVOKE" --duration 3 >/dev/null
sim "$fg_mqtt" $fg_pid "$work/fg-bulk.json" --scenario revoke --devices "$BULK_OF" \
    --revoke "$BULK" --bulk --duration 3 --connect-limit "$CONNECT_LIMIT" >/dev/null
kill $fg_pid; wait $fg_pid 2>/dev/null || true

# Mosquitto, on copies of the certificates it can read after dropping root.
mq="$work/mosquitto-tls"
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
use_identity_as_username true
set_tcp_nodelay true
log_type error
CONF
"$MOSQUITTO" -c "$work/mosquitto.conf" >"$work/mosquitto.log" 2>&1 &
mq_pid=$!
pids+=($mq_pid)
for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/38884) 2>/dev/null && break; sleep 0.1; done
sim 127.0.0.1:38884 $mq_pid "$work/mq-storm.json" --scenario storm --devices "$STORM" >/dev/null
sim 127.0.0.1:38884 $mq_pid "$work/mq-steady.json" --scenario steady --devices "$STEADY" \
    --rate 0.1 --duration "$DURATION" --connect-limit "$CONNECT_LIMIT" >/dev/null

python3 - "$work" "$STORM" "$STEADY" "$DURATION" "$REVOKE_OF" "$REVOKE" "$BULK_OF" "$BULK" <<'PY'
import json, sys, os
w, storm, steady, dur, rof, rv, bof, bulk = sys.argv[1:]
f = lambda n: json.load(open(os.path.join(w, n)))["figures"]
fs, fst, fr, fb = f("fg-storm.json"), f("fg-steady.json"), f("fg-revoke.json"), f("fg-bulk.json")
ms, mst = f("mq-storm.json"), f("mq-steady.json")
print(f"\nfleet benchmark: storm {storm} devices at once; steady {steady} devices, 0.1 msg/s each, {dur} s; loopback, 2 cores shared with the fleet\n")
print(f"{'':<40}{'fleetgate':>12}{'Mosquitto 2':>14}{'ratio':>8}")
def row(label, a, b, fmt="{:,.1f}"):
    ratio = f"{a / b:.2f}x" if b else "-"
    print(f"{label:<40}{fmt.format(a):>12}{fmt.format(b):>14}{ratio:>8}")
row("storm connects/s", fs["connects_per_s"], ms["connects_per_s"])
row("storm connect p99 ms", fs["connect_p99_ms"], ms["connect_p99_ms"])
row("storm connected", fs["connected"], ms["connected"], "{:,.0f}")
row("steady connected (of %s)" % steady, fst["connected"], mst["connected"], "{:,.0f}")
row("steady dropped", fst["dropped"], mst["dropped"], "{:,.0f}")
row("steady messages/s", fst["messages_per_s"], mst["messages_per_s"])
row("broker RSS per connection KiB", fst.get("broker_rss_per_connection_kib", 0), mst.get("broker_rss_per_connection_kib", 0))
row("broker RSS with all connected MiB", fst.get("broker_rss_mib", 0), mst.get("broker_rss_mib", 0))
print(f"\nrevoke ({rof} devices, {rv} revoked; fleetgate only, Mosquitto has no revocation API):")
print(f"  revoke-to-disconnect p50 {fr['revoke_to_disconnect_p50_ms']:.1f} ms, p99 {fr['revoke_to_disconnect_p99_ms']:.1f} ms, max {fr['revoke_to_disconnect_max_ms']:.1f} ms; "
      f"reconnected {fr['revoked_reconnected']}, bystanders dropped {fr['bystanders_dropped']}")
print(f"\nbulk revocation ({bof} devices online, {bulk} revoked in one API call and one durable write):")
print(f"  API call {fb['api_call_ms']:.1f} ms; after its answer, disconnect p50 {fb['answer_to_disconnect_p50_ms']:.1f} ms, "
      f"p99 {fb['answer_to_disconnect_p99_ms']:.1f} ms, max {fb['answer_to_disconnect_max_ms']:.1f} ms; "
      f"not cut {fb['revoked_not_cut']}, reconnected {fb['revoked_reconnected']}, bystanders dropped {fb['bystanders_dropped']}")
PY
