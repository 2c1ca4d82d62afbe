#!/usr/bin/env bash
# The cost of securing the back office, side by side in one run on
# loopback: a cluster on plain etcd and plain NATS beside one on etcd with
# TLS, client-certificate auth and RBAC, and NATS with TLS, verify_and_map
# and per-node permissions. Each cluster: two nodes. Measured on each:
# enrollments/s over the JSON API (every one an etcd transaction),
# admission connects/s (full mTLS handshake + CONNECT), and messages/s
# from devices on one node to a service on the other (QoS 1, across NATS).
#
#   bash bench/secure-cluster.sh
#   CONNECTS=500 MESSAGES=1000 bash bench/secure-cluster.sh
set -euo pipefail
cd "$(dirname "$0")/.."

CONNECTS=${CONNECTS:-1000}
ENROLLS=${ENROLLS:-300}
CONCURRENCY=${CONCURRENCY:-16}
MESSAGES=${MESSAGES:-2000}
PUBLISHERS=${PUBLISHERS:-4}
PATH=$PATH:/usr/sbin
for t in etcd nats-server openssl curl python3; do
    command -v $t >/dev/null || { echo "needs $t" >&2; exit 1; }
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
b64() { printf %s "$1" | base64 -w0; }

# PKI for etcd, NATS and the nodes (the operator's own).
pki=$work/pki
mkdir -p "$pki"
(
    cd "$pki"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key \
        -out ca.crt -subj /CN=bench-ca -days 2 2>/dev/null
    sign() {
        openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$1.key" \
            -out "$1.csr" -subj "/CN=$1" 2>/dev/null
        printf "$2" >"$1.ext"
        openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
            -extfile "$1.ext" -out "$1.crt" 2>/dev/null
    }
    sign server 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n'
    for n in node-1 node-2; do sign $n 'extendedKeyUsage=clientAuth\n'; done
)

etcd_member() { # name client peer [tls]
    local scheme=http extra=()
    if [ "${4:-}" = tls ]; then
        scheme=https
        extra=(--cert-file "$pki/server.crt" --key-file "$pki/server.key"
            --trusted-ca-file "$pki/ca.crt" --client-cert-auth)
    fi
    etcd --data-dir "$work/$1" --name m1 --listen-client-urls "$scheme://$2" \
        --advertise-client-urls "$scheme://$2" --listen-peer-urls "http://$3" \
        --initial-advertise-peer-urls "http://$3" --initial-cluster "m1=http://$3" \
        "${extra[@]}" >"$work/$1.log" 2>&1 &
    pids+=($!)
}
wait_etcd() { # client [curl tls args...]
    local c=$1 s=http
    shift
    [ $# -gt 0 ] && s=https
    for _ in $(seq 200); do curl -sf "$@" "$s://$c/health" >/dev/null && return; sleep 0.1; done
    echo "etcd at $c did not come up" >&2
    exit 1
}

# Plain etcd.
plain_etcd=127.0.0.1:$(port)
etcd_member etcd-plain "$plain_etcd" "127.0.0.1:$(port)"
wait_etcd "$plain_etcd"
# Secure etcd: RBAC set up on a plain start, then TLS with client certs.
secure_etcd=127.0.0.1:$(port)
secure_peer=127.0.0.1:$(port)
etcd_member etcd-secure "$secure_etcd" "$secure_peer"
wait_etcd "$secure_etcd"
E=http://$secure_etcd
curl -sf $E/v3/auth/role/add -d '{"name":"fleetgate"}' >/dev/null
curl -sf $E/v3/auth/role/grant -d "{\"name\":\"fleetgate\",\"perm\":{\"permType\":\"READWRITE\",\"key\":\"$(b64 fleetgate/)\",\"range_end\":\"$(b64 fleetgate0)\"}}" >/dev/null
for u in root node-1 node-2; do
    curl -sf $E/v3/auth/user/add -d "{\"name\":\"$u\",\"password\":\"$(openssl rand -hex 16)\"}" >/dev/null
done
curl -sf $E/v3/auth/user/grant -d '{"user":"root","role":"root"}' >/dev/null
for u in node-1 node-2; do
    curl -sf $E/v3/auth/user/grant -d "{\"user\":\"$u\",\"role\":\"fleetgate\"}" >/dev/null
done
curl -sf $E/v3/auth/enable -d '{}' >/dev/null
kill "${pids[-1]}"
wait "${pids[-1]}" 2>/dev/null || true
etcd_member etcd-secure "$secure_etcd" "$secure_peer" tls
wait_etcd "$secure_etcd" --cacert "$pki/ca.crt" --cert "$pki/node-1.crt" --key "$pki/node-1.key"

# Plain NATS, and NATS with TLS, verify_and_map and per-node permissions.
plain_nats=$(port)
nats-server -a 127.0.0.1 -p "$plain_nats" -js -sd "$work/nats-plain" >"$work/nats-plain.log" 2>&1 &
pids+=($!)
secure_nats=$(port)
shared='"fleetgate.owner.>", "fleetgate.session.>", "fleetgate.queue.>", "$JS.API.>", "$JS.ACK.>", "$JS.FC.>", "_INBOX.>"'
cat >"$work/nats.conf" <<EOF
tls {
  cert_file: "$pki/server.crt"
  key_file: "$pki/server.key"
  ca_file: "$pki/ca.crt"
  verify_and_map: true
}
authorization {
  users = [
    { user: "CN=node-1", permissions: { publish: { allow: ["fleetgate.msg.node-1.>", $shared] }, subscribe: { allow: ["fleetgate.>", "_INBOX.>"] } } }
    { user: "CN=node-2", permissions: { publish: { allow: ["fleetgate.msg.node-2.>", $shared] }, subscribe: { allow: ["fleetgate.>", "_INBOX.>"] } } }
  ]
}
EOF
nats-server -c "$work/nats.conf" -a 127.0.0.1 -p "$secure_nats" -js -sd "$work/nats-secure" \
    >"$work/nats-secure.log" 2>&1 &
pids+=($!)
for p in $plain_nats $secure_nats; do
    for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null && break; sleep 0.1; done
done

node() { # name data-dir [serve args...]
    "$FG" serve --data-dir "$work/$2" "${@:3}" --api-listen 127.0.0.1:0 \
        --mqtt-listen 127.0.0.1:0 --ocsp-listen 127.0.0.1:0 --connect-rate-per-ip 0 \
        --http-rate-per-ip 0 >"$work/$1.out" 2>>"$work/$1.log" &
    pids+=($!)
    for _ in $(seq 300); do grep -q listening "$work/$1.out" 2>/dev/null && break; sleep 0.1; done
    grep -q listening "$work/$1.out" || { echo "node $1 did not start:" >&2; tail -5 "$work/$1.log" >&2; exit 1; }
}
addr() { sed -n "s/.*$2=\([^ ]*\).*/\1/p" "$work/$1.out"; }
copy() { mkdir -p "$work/$2"; (cd "$work/$1" && tar cf - --exclude registry --exclude sessions .) | (cd "$work/$2" && tar xf -); }

plain=(--store "etcd://$plain_etcd" --nats "nats://127.0.0.1:$plain_nats")
secure() { # node name
    echo --store "https://$secure_etcd" --store-ca "$pki/ca.crt" --store-cert "$pki/$1.crt" \
        --store-key "$pki/$1.key" --nats "tls://127.0.0.1:$secure_nats" --nats-ca "$pki/ca.crt" \
        --nats-cert "$pki/$1.crt" --nats-key "$pki/$1.key"
}
node p1 p1 "${plain[@]}"
copy p1 p2
node p2 p2 "${plain[@]}"
# shellcheck disable=SC2046
node s1 s1 $(secure node-1)
copy s1 s2
# shellcheck disable=SC2046
node s2 s2 $(secure node-2)

for c in p s; do
    for i in $(seq 0 $((CONCURRENCY - 1))); do
        FLEETGATE_API="https://$(addr ${c}1 api)" FLEETGATE_DATA_DIR="$work/${c}1" \
            "$FG" device enroll "bench-$i" --out "$work/creds-$c" >/dev/null
    done
    for i in $(seq 0 $((PUBLISHERS - 1))); do
        FLEETGATE_API="https://$(addr ${c}1 api)" FLEETGATE_DATA_DIR="$work/${c}1" \
            "$FG" device enroll "pub-$i" --out "$work/creds-$c" >/dev/null
    done
    FLEETGATE_API="https://$(addr ${c}1 api)" FLEETGATE_DATA_DIR="$work/${c}1" \
        "$FG" service enroll bench-sub --out "$work/creds-$c" >/dev/null
done

enrolls() { # c
    "$SIM" load enroll --api "https://$(addr ${1}1 api)" --data-dir "$work/${1}1" --count "$ENROLLS" \
        --concurrency "$CONCURRENCY" --rounds 1 --prefix "e$RANDOM-" |
        python3 -c 'import json,sys; r=[json.loads(l) for l in sys.stdin if "\"json\"" in l][0]; print(round(r["enrollments_per_s"]))'
}
connects() { # c
    "$SIM" load connect --broker "$(addr ${1}1 mqtt)" --ca "$work/${1}1/ca.crt" --creds "$work/creds-$1" \
        --concurrency "$CONCURRENCY" --connects "$CONNECTS" |
        python3 -c 'import json,sys; r=json.load(sys.stdin); print(round(r["connects_per_s"]))'
}
messages() { # c
    "$SIM" load publish --broker "$(addr ${1}1 mqtt)" --subscriber-broker "$(addr ${1}2 mqtt)" \
        --ca "$work/${1}1/ca.crt" --creds "$work/creds-$1" --prefix pub- --publishers "$PUBLISHERS" \
        --messages "$MESSAGES" --qos 1 |
        python3 -c 'import json,sys; r=json.load(sys.stdin); print("%.0f/s p99 %.1f ms (%d/%d)" % (r["messages_per_s"], r["p99_ms"], r["received"], r["sent"]))'
}
echo "two nodes each: plain etcd + NATS beside TLS + client certificates + RBAC/permissions" >&2
printf '| %-44s | %-24s | %-24s |\n' measure plain secure
printf '|---|---|---|\n'
printf '| %-44s | %-24s | %-24s |\n' "enrollments/s, JSON API ($ENROLLS, $CONCURRENCY at a time)" "$(enrolls p)" "$(enrolls s)"
printf '| %-44s | %-24s | %-24s |\n' "admission connects/s ($CONNECTS, $CONCURRENCY at a time)" "$(connects p)" "$(connects s)"
printf '| %-44s | %-24s | %-24s |\n' "QoS 1 messages across nodes ($PUBLISHERS x $MESSAGES)" "$(messages p)" "$(messages s)"
