#!/usr/bin/env bash
# Connects against their floor, in one run: full mTLS connects (no
# resumption; TLS handshake, CONNECT, CONNACK, DISCONNECT) from the same
# loader (`firmware-sim load connect`, 10 identities, CONNECTS each round)
# to fleetgate and to Mosquitto 2 on the same certificates, rounds
# alternating, with each broker's CPU per connect read from /proc; beside
# them the server's side of an in-memory TLS 1.3 mTLS P-256 handshake
# (`cargo bench -p fleetgate-mqtt --bench handshake`), the least a full
# connect can cost, and the socket floor: the same loader against a tokio +
# rustls server that does nothing but the handshake, a CONNACK and the
# close (`mqtt/examples/socket_floor.rs`), the least a connect over real
# sockets costs on this machine. Loopback only.
#
#   bash bench/connect-floor.sh
#   ROUNDS=3 CONNECTS=10000 bash bench/connect-floor.sh
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-2}
CONNECTS=${CONNECTS:-10000}
CONCURRENCY=${CONCURRENCY:-10}
MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)
[ -x "$MOSQUITTO" ] || { echo "mosquitto is needed (apt-get install mosquitto)" >&2; exit 1; }
cargo build --release -q -p broker -p firmware-sim
cargo build --release -q -p fleetgate-mqtt --example socket_floor
SOCKET_FLOOR=$PWD/target/release/examples/socket_floor
FG=$PWD/target/release/fleetgate
SIM=$PWD/target/release/firmware-sim
work=$(mktemp -d)
pid=
cleanup() {
    [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# The floor moves with this machine's hour (274-327 us within two hours
# once): each round measures it again, right before its fleetgate run.
floor_now() {
    cargo bench -q -p fleetgate-mqtt --bench handshake -- 3000 2>/dev/null | tee /dev/stderr |
        sed -n "s/^server_us_per_handshake=\([0-9.]*\).*/\1/p"
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
start_fleetgate() {
    "$FG" serve --data-dir "$work/fg" --api-listen 127.0.0.1:0 --mqtt-listen 127.0.0.1:0 \
        --ocsp-listen 127.0.0.1:0 --connect-rate-per-ip 0 --max-handshakes 20000 \
        >"$work/fg.out" 2>>"$work/fg.log" &
    pid=$!
    for _ in $(seq 300); do grep -q listening "$work/fg.out" 2>/dev/null && break; sleep 0.1; done
    broker=$(sed -n 's/.*mqtt=\([^ ]*\).*/\1/p' "$work/fg.out")
    export FLEETGATE_API="https://$(sed -n 's/.*api=\([^ ]*\).*/\1/p' "$work/fg.out")" FLEETGATE_DATA_DIR="$work/fg"
}
start_mosquitto() {
    local mq="$work/mosquitto-tls"
    mkdir -p "$mq"
    cp "$work/fg/ca.crt" "$work/fg/server.crt" "$work/fg/server.key" "$mq/"
    id mosquitto >/dev/null 2>&1 && chown -R mosquitto "$mq"
    chmod 755 "$work"
    cat >"$work/mosquitto.conf" <<CONF
per_listener_settings false
listener 38885 127.0.0.1
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
    pid=$!
    for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/38885) 2>/dev/null && break; sleep 0.1; done
    broker=127.0.0.1:38885
}
# A tokio + rustls server and nothing else (mqtt/examples/socket_floor.rs),
# trusting what fleetgate trusts (the root and the issuing CA, so that a
# device's chain is one signature, as in the floor): the floor with the
# kernel's and the runtime's part of a connect added.
start_socket_floor() {
    cat "$work/fg/ca.crt" "$work/fg/ca/issuing.crt" >"$work/anchors.pem"
    "$SOCKET_FLOOR" "$work/anchors.pem" "$work/fg/server.crt" "$work/fg/server.key" >"$work/sf.out" 2>>"$work/sf.log" &
    pid=$!
    for _ in $(seq 100); do grep -q listening "$work/sf.out" 2>/dev/null && break; sleep 0.1; done
    broker=$(sed -n 's/.*mqtt=\([^ ]*\).*/\1/p' "$work/sf.out")
}
stop() { kill "$pid"; wait "$pid" 2>/dev/null || true; pid=; }

start_fleetgate
for i in $(seq 0 $((CONCURRENCY - 1))); do "$FG" device enroll "p0-$i" --out "$work/fleet" >/dev/null; done
stop
hz=$(getconf CLK_TCK)
for r in $(seq "$ROUNDS"); do
    echo "floor $r $(floor_now)" >>"$work/rounds.txt"
    for b in fleetgate socket_floor mosquitto; do
        "start_$b"
        before=$(cpu_ticks "$pid")
        "$SIM" load connect --broker "$broker" --ca "$work/fleet/ca.crt" --creds "$work/fleet" --prefix p0- \
            --concurrency "$CONCURRENCY" --connects "$CONNECTS" >"$work/s.json" 2>/dev/null
        after=$(cpu_ticks "$pid")
        stop
        python3 - "$work/s.json" "$b" "$r" "$before" "$after" "$hz" <<'PY' >>"$work/rounds.txt"
import json, sys
s = json.load(open(sys.argv[1]))
cpu_s = (int(sys.argv[5]) - int(sys.argv[4])) / int(sys.argv[6])
n = s.get("connects", 0) or 1
print(sys.argv[2], sys.argv[3], s["connects_per_s"], cpu_s * 1e6 / n, s.get("failures", 0))
PY
    done
done
python3 - "$work/rounds.txt" <<'PY'
import statistics, sys
by, floors = {}, {}
for l in open(sys.argv[1]):
    f = l.split()
    if f[0] == "floor":
        floors[f[1]] = float(f[2])
        continue
    b, r, rate, cpu, failed = f
    by.setdefault(r, {})[b] = (float(rate), float(cpu), failed)
print(f"\nfull mTLS connects, {len(by)} rounds alternating, each after the server's side of an in-memory handshake (the floor); the socket floor is a tokio + rustls server that does nothing else\n")
print("| round | fleetgate connects/s | Mosquitto connects/s | ratio | fleetgate CPU us/connect | socket floor us | Mosquitto CPU us/connect | floor us | fleetgate / floor | socket floor / floor | fleetgate / socket floor |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
ratios, over, sock, beyond = [], [], [], []
for r, v in sorted(by.items(), key=lambda kv: int(kv[0])):
    f, s_, m, fl = v["fleetgate"], v["socket_floor"], v["mosquitto"], floors[r]
    ratios.append(f[0] / m[0])
    over.append(f[1] / fl)
    sock.append(s_[1] / fl)
    beyond.append(f[1] / s_[1])
    print(f"| {r} | {f[0]:,.0f} | {m[0]:,.0f} | {f[0] / m[0]:.2f}x | {f[1]:,.0f} | {s_[1]:,.0f} | {m[1]:,.0f} | {fl:.0f} | {f[1] / fl:.2f}x | {s_[1] / fl:.2f}x | {f[1] / s_[1]:.2f}x |")
med = statistics.median
print(f"\nmedian: {med(ratios):.2f}x Mosquitto's connects/s, {med(over):.2f}x the floor; the socket floor {med(sock):.2f}x the floor, fleetgate {med(beyond):.2f}x the socket floor")
PY
