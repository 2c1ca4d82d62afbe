#!/usr/bin/env bash
# The registry at a real fleet's size: a data dir a `serve` initialized
# gets DEVICES devices (default 1,000,000, enrolled in batches in process:
# broker/benches/registry_scale.rs) and REVOKED revocations (100,000); that
# bench prints enrollment, revocation, admission lookups, the CRL, device
# list pages and audit verify, then the same on the data dir opened afresh
# (a node's restart; page cache as FLEETGATE_REGISTRY_CACHE_MIB, default
# serve's 1024 MiB). Then `serve` on it: time to listening, RSS
# idle, OCSP answers/s and p50/p99 for good and revoked certificates
# (firmware-sim load ocsp), `fleetgate device list`, the console's device
# search and overview. Loopback only; sled. Needs some 7 GiB of disk at 1M.
#
#   bash bench/registry-scale.sh
#   DEVICES=100000 REVOKED=10000 bash bench/registry-scale.sh
#   # the same data dir again, serve with another page cache:
#   WORK=/tmp/rs FLEETGATE_REGISTRY_CACHE_MIB=256 SERVE_ARGS="--registry-cache-mib 256" \
#       bash bench/registry-scale.sh
#   # the registry on one local etcd member (its quota raised to 8 GiB):
#   STORE=etcd DEVICES=100000 REVOKED=10000 bash bench/registry-scale.sh
#   # serve's figures beside a baseline build's, on the same registry:
#   FG_BASE=/path/to/old/fleetgate WORK=/tmp/rs bash bench/registry-scale.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# Everything the first run writes is dated PAST ago (libfaketime, if
# installed; PAST= to date it now): a fleet's revocations gather over
# months, and a delta CRL lists what changed since its base, a day's worth
# at most, which the fresh open's delta then shows.
PAST=${PAST-2d}
DEVICES=${DEVICES:-1000000}
REVOKED=${REVOKED:-100000}
SECONDS_EACH=${SECONDS_EACH:-5}
cargo build --release -q -p broker -p firmware-sim
BENCH=$(cargo bench -q -p broker --bench registry_scale --no-run --message-format=json |
    python3 -c 'import json, sys
for l in sys.stdin:
    j = json.loads(l)
    if j.get("executable") and "bench" in j["target"]["kind"]: print(j["executable"])')
past=()
lib=$(find /usr/lib -name libfaketime.so.1 2>/dev/null | head -1)
if [ -n "$PAST" ] && [ -n "$lib" ]; then
    # `env` execs the program itself, so $! is its pid.
    past=(env LD_PRELOAD="$lib" FAKETIME="-$PAST" FAKETIME_DONT_FAKE_MONOTONIC=1)
fi
FG=$PWD/target/release/fleetgate
SIM=$PWD/target/release/firmware-sim
work=${WORK:-$(mktemp -d)}
mkdir -p "$work"
pid=
etcd_pid=
cleanup() {
    [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
    [ -n "$etcd_pid" ] && kill "$etcd_pid" 2>/dev/null || true
    wait 2>/dev/null || true
    [ -n "${WORK:-}" ] || rm -rf "$work"
}
trap cleanup EXIT

if [ "${STORE:-sled}" = etcd ]; then
    PATH=$PATH:/usr/sbin
    command -v etcd >/dev/null || { echo "needs etcd (apt-get install etcd-server)" >&2; exit 1; }
    port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
    client=127.0.0.1:$(port); peer=127.0.0.1:$(port)
    etcd --data-dir "$work/etcd" --name m1 --listen-client-urls "http://$client" \
        --advertise-client-urls "http://$client" --listen-peer-urls "http://$peer" \
        --initial-advertise-peer-urls "http://$peer" --initial-cluster "m1=http://$peer" \
        --quota-backend-bytes $((8 << 30)) >>"$work/etcd.log" 2>&1 &
    etcd_pid=$!
    for _ in $(seq 100); do curl -sf "http://$client/health" >/dev/null && break; sleep 0.1; done
    export FLEETGATE_BENCH_ETCD=$client
    SERVE_ARGS="${SERVE_ARGS:-} --store etcd://$client"
fi
serve() {
    ${SERVE_PREFIX:-} "$FG" serve --data-dir "$work/fg" --api-listen 127.0.0.1:0 --mqtt-listen 127.0.0.1:0 \
        --ocsp-listen 127.0.0.1:0 --http-rate-per-ip 0 ${SERVE_ARGS:-} >"$work/fg.out" 2>>"$work/fg.log" &
    pid=$!
    for _ in $(seq 6000); do grep -q listening "$work/fg.out" 2>/dev/null && return; sleep 0.01; done
    echo "serve did not start:" >&2; tail "$work/fg.log" >&2; exit 1
}
stop() { kill "$pid"; wait "$pid" 2>/dev/null || true; pid=; }

if [ ! -f "$work/good.txt" ]; then
    [ ${#past[@]} -gt 0 ] && echo "(dated $PAST ago: ${past[*]})"
    SERVE_PREFIX="${past[*]}" serve; stop
    "${past[@]}" "$BENCH" "$work/fg" "$DEVICES" "$REVOKED" 2>>"$work/bench.log" ||
        { echo "the registry bench failed; its log:" >&2; tail -5 "$work/bench.log" >&2; exit 1; }
fi
# The same measures on a fresh open of the data dir, as a node restarting
# on it sees them (nothing cached; the writes settled).
echo "--- the data dir opened afresh:"
"$BENCH" "$work/fg" 0 0 2>>"$work/bench.log" ||
    { echo "the registry bench failed; its log:" >&2; tail -5 "$work/bench.log" >&2; exit 1; }
if [ -n "$etcd_pid" ]; then
    curl -s "http://$client/metrics" | awk '/^etcd_mvcc_db_total_size_in_bytes / {printf "registry in etcd: %.0f MiB (its db)\n", $2 / 1048576}'
    du -sh "$work/etcd" | sed 's/^/etcd member dir on disk: /'
else
    du -sh "$work/fg/registry" | sed 's/^/registry on disk: /'
fi

measure() { # label: serve on the data dir, then what a fleet and an operator ask of it
    echo "--- serve ($1):"
    t0=$(date +%s.%N)
    serve
    t1=$(date +%s.%N)
    python3 -c "print(f'serve: listening {float($t1) - float($t0):.2f} s after start')"
    api=$(sed -n 's/.*api=\([^ ]*\).*/\1/p' "$work/fg.out")
    ocsp=$(sed -n 's/.*ocsp=\([^ ]*\).*/\1/p' "$work/fg.out")
    export FLEETGATE_API="https://$api" FLEETGATE_DATA_DIR="$work/fg"
    # The read-ahead of what admission reads (serve logs when it is done;
    # a build before it did not on etcd).
    for _ in $(seq 600); do
        grep -q "read ahead\|read into the page cache" "$work/fg.log" && break
        sleep 0.1
    done
    { grep "read ahead\|read into the page cache" "$work/fg.log" || echo "(none logged in 60 s)"; } | tail -1 |
        sed 's/.*\(records\|certificates\)=\([0-9]*\).*ms=\([0-9]*\).*/serve: read ahead \2 records in \3 ms/'
    echo "serve: RSS idle $(awk '/VmRSS/ {printf "%.1f MiB", $2 / 1024}' /proc/$pid/status)"

    for kind in good revoked; do
        "$SIM" load ocsp --responder "$ocsp" --issuer "$work/fg/ca/issuing.crt" --serials "$work/$kind.txt" \
            --keep-alive --concurrency 16 --seconds "$SECONDS_EACH" |
            python3 -c 'import json,sys
r = json.loads(sys.stdin.read())
print("OCSP %s: %.0f answers/s, p50 %.2f ms, p99 %.2f ms, %d answered revoked, %d unknown, %d failed"
      % (sys.argv[1], r["responses_per_s"], r["p50_ms"], r["p99_ms"], r["revoked"], r["unknown"], r["failures"]))' "$kind"
    done

    timed "fleetgate device list (first page, CLI process included)" "$FG" device list
    mid=$(printf 'dev-%07d' $((DEVICES / 2)))
    for path in "/console/api/overview" "/console/api/devices" "/console/api/devices?q=dev-0999990" \
        "/console/api/devices?q=dev-0000007" "/console/api/devices?status=revoked" \
        "/console/api/devices?after=$mid" "/console/api/devices?status=active&after=$mid" \
        "/console/api/devices?role=&expiring=3650" "/console/api/devices?role=&expiring=7" \
        "/console/api/devices/dev-0000001"; do
        first=$(console "$path")
        again=$(console "$path")
        python3 -c 'import sys; print("console %s: %.0f ms, again %.0f ms" % (sys.argv[1], float(sys.argv[2]) * 1000, float(sys.argv[3]) * 1000))' \
            "$path" "$first" "$again"
    done
    echo "serve: RSS after the OCSP load and the console $(awk '/VmRSS/ {printf "%.1f MiB", $2 / 1024}' /proc/$pid/status)"
    stop
}
timed() { # label command...
    local a b
    a=$(date +%s%N); "${@:2}" >/dev/null; b=$(date +%s%N)
    echo "$1: $(( (b - a) / 1000000 )) ms"
}
console() {
    curl -sf --cacert "$work/fg/ca.crt" --cert "$work/fg/admin.crt" --key "$work/fg/admin.key" \
        -o /dev/null -w '%{time_total}' "https://$api$1"
}
# A baseline build side by side (FG_BASE=path/to/fleetgate): first, on the
# same data dir and the same etcd.
if [ -n "${FG_BASE:-}" ]; then
    FG_NEW=$FG
    FG=$FG_BASE
    : >"$work/fg.log"
    measure "baseline $FG_BASE"
    FG=$FG_NEW
fi
: >"$work/fg.log"
measure "$FG"
