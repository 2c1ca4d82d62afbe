#!/usr/bin/env bash
# The audit log's seal and `audit verify` at size, on sled beside one local
# etcd member (cargo bench -p broker --bench audit): seconds to write,
# seal (hash chain + signed checkpoints) and verify ENTRIES entries.
#
#   bash bench/audit.sh                 # ENTRIES=100000
#   ENTRIES=10000 bash bench/audit.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ENTRIES=${ENTRIES:-100000}
command -v etcd >/dev/null || { echo "needs etcd (apt-get install etcd-server)" >&2; exit 1; }
work=$(mktemp -d)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
client=127.0.0.1:$(port)
peer=127.0.0.1:$(port)
etcd --data-dir "$work/etcd" --name m1 --listen-client-urls "http://$client" \
    --advertise-client-urls "http://$client" --listen-peer-urls "http://$peer" \
    --initial-advertise-peer-urls "http://$peer" --initial-cluster "m1=http://$peer" \
    --quota-backend-bytes 4294967296 >"$work/etcd.log" 2>&1 &
pid=$!
for _ in $(seq 100); do curl -sf "http://$client/health" >/dev/null && break; sleep 0.1; done
FLEETGATE_BENCH_ETCD=$client FLEETGATE_BENCH_ENTRIES=$ENTRIES cargo bench -q -p broker --bench audit
