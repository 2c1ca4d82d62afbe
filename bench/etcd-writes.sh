#!/usr/bin/env bash
# Registry writes on etcd against sled, in one run: enrollments/s over the
# JSON API (firmware-sim load enroll, COUNT at CONCURRENCY at a time, a new
# P-256 key each), then flushed status changes/s over it (each of those
# devices suspended and resumed, --status-changes) on a node on its
# embedded sled, a node on one local etcd
# member and, with FG_BASE, an earlier build on a second etcd member of its
# own; rounds alternate the nodes. Then the registry benchmark (cargo bench
# -p broker --bench store: flushed status changes on 1, 2, 4 and 8 threads) on
# sled beside etcd. Loopback only.
#
#   bash bench/etcd-writes.sh
#   FG_BASE=/path/to/old/fleetgate ROUNDS=3 bash bench/etcd-writes.sh
set -euo pipefail
cd "$(dirname "$0")/.."

COUNT=${COUNT:-600}
CONCURRENCY=${CONCURRENCY:-16}
ROUNDS=${ROUNDS:-2}
BASE=${FG_BASE:-}
PATH=$PATH:/usr/sbin
command -v etcd >/dev/null || { echo "needs etcd (apt-get install etcd-server)" >&2; exit 1; }
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
etcd_member() { # name -> prints its client address
    local client=127.0.0.1:$(port) peer=127.0.0.1:$(port)
    etcd --data-dir "$work/$1" --name "$1" --listen-client-urls "http://$client" \
        --advertise-client-urls "http://$client" --listen-peer-urls "http://$peer" \
        --initial-advertise-peer-urls "http://$peer" --initial-cluster "$1=http://$peer" \
        >"$work/$1.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 100); do curl -sf "http://$client/health" >/dev/null && break; sleep 0.1; done
    echo "$client"
}
node() { # name binary [serve args...]
    "$2" serve --data-dir "$work/$1" "${@:3}" --api-listen 127.0.0.1:0 --mqtt-listen 127.0.0.1:0 \
        --ocsp-listen 127.0.0.1:0 --http-rate-per-ip 0 >"$work/$1.out" 2>>"$work/$1.log" &
    pids+=($!)
    for _ in $(seq 300); do grep -q listening "$work/$1.out" 2>/dev/null && break; sleep 0.1; done
    grep -q listening "$work/$1.out" || { echo "node $1 did not start:" >&2; tail "$work/$1.log" >&2; exit 1; }
}
api() { sed -n 's/.*api=\([^ ]*\).*/\1/p' "$work/$1.out"; }

etcd1=$(etcd_member m1)
nodes=(sled etcd)
node sled "$FG"
node etcd "$FG" --store "etcd://$etcd1"
if [ -n "$BASE" ]; then
    etcd2=$(etcd_member m2)
    node base "$BASE" --store "etcd://$etcd2"
    nodes+=(base)
fi

echo "$COUNT enrollments a round (JSON API), then a suspension and a resumption of each, $CONCURRENCY at a time, $ROUNDS rounds, nodes: ${nodes[*]}" >&2
for r in $(seq "$ROUNDS"); do
    for n in "${nodes[@]}"; do
        "$SIM" load enroll --api "https://$(api $n)" --data-dir "$work/$n" --count "$COUNT" \
            --concurrency "$CONCURRENCY" --rounds 1 --prefix "r$r-" --status-changes |
            python3 -c 'import json,sys
for l in sys.stdin:
    j = json.loads(l)
    if j["protocol"] == "json": print(sys.argv[1], sys.argv[2], "enroll", j["enrollments_per_s"], j["p99_ms"], j["failed"])
    if j["protocol"] == "status": print(sys.argv[1], sys.argv[2], "status", j["changes_per_s"], j["p99_ms"], j["failed"])' "$n" "$r" \
            >>"$work/rounds.txt"
    done
done
python3 - "$work/rounds.txt" <<'PY'
import sys
rows = [l.split() for l in open(sys.argv[1])]
best = {}
for n, r, kind, rate, p99, failed in rows:
    what = "enrollments" if kind == "enroll" else "status changes"
    print(f"round {r} {n}: {float(rate):,.0f} {what}/s, p99 {float(p99):.1f} ms, {failed} failed")
    key = (n, kind)
    if key not in best or float(rate) > best[key][0]:
        best[key] = (float(rate), float(p99))
for kind, what in [("enroll", "enrollments/s"), ("status", "flushed status changes/s")]:
    print(f"\n| node | {what} over the API (best round) | p99 ms | against sled |")
    print("|---|---|---|---|")
    for n in ["sled", "etcd", "base"]:
        if (n, kind) in best:
            rate, p99 = best[(n, kind)]
            print(f"| {n} | {rate:,.0f} | {p99:.1f} | {rate / best[('sled', kind)][0]:.2f}x |")
PY
for p in "${pids[@]:1}"; do kill "$p" 2>/dev/null || true; done
echo
FLEETGATE_BENCH_ETCD=$etcd1 cargo bench -q -p broker --bench store 2>/dev/null
