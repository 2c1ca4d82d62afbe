#!/usr/bin/env bash
# OCSP benchmark: fleetgate's responder beside `openssl ocsp` as a responder
# over the same certificates, statuses and delegated signing key, driven by
# the same load generator (firmware-sim load ocsp).
#
#   bash bench/ocsp.sh
#   DEVICES=500 SECONDS_EACH=10 CONCURRENCY=32 bash bench/ocsp.sh
#
# `openssl ocsp -port` listens on every interface, so the whole run happens
# in a network namespace of its own (unshare -n), where loopback is all
# there is. Needs root (unshare), openssl, python3.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${FLEETGATE_IN_NETNS:-}" != 1 ]; then
    cargo build --release -q -p broker -p firmware-sim
    exec unshare -n env FLEETGATE_IN_NETNS=1 bash "$0" "$@"
fi
ip link set lo up

DEVICES=${DEVICES:-200}
REVOKED=${REVOKED:-20}
CONCURRENCY=${CONCURRENCY:-16}
SECONDS_EACH=${SECONDS_EACH:-5}
FG=$PWD/target/release/fleetgate
SIM=$PWD/target/release/firmware-sim

work=$(mktemp -d)
pids=()
cleanup() {
    pkill -9 -f "openssl ocsp -index $work" 2>/dev/null || true
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

"$FG" serve --data-dir "$work/fg" --api-listen 127.0.0.1:0 --mqtt-listen 127.0.0.1:0 --connect-rate-per-ip 0 \
    --ocsp-listen 127.0.0.1:0 >"$work/fg.out" 2>"$work/fg.log" &
pids+=($!)
for _ in $(seq 100); do grep -q listening "$work/fg.out" 2>/dev/null && break; sleep 0.1; done
api=$(sed -n 's/.*api=\([^ ]*\).*/\1/p' "$work/fg.out")
ocsp=$(sed -n 's/.*ocsp=\([^ ]*\).*/\1/p' "$work/fg.out")
export FLEETGATE_API="https://$api" FLEETGATE_DATA_DIR="$work/fg"

echo "enrolling $DEVICES devices, revoking $REVOKED ..." >&2
for i in $(seq 0 $((DEVICES - 1))); do
    "$FG" device enroll "dev-$i" --out "$work/devices" >/dev/null
done
for i in $(seq 0 $((REVOKED - 1))); do
    "$FG" device revoke "dev-$i" --reason key-compromise >/dev/null
done
"$FG" device list --json --limit 100000 >"$work/devices.json"

# The same data for openssl: its CA database (index.txt) and serial list.
python3 - "$work/devices.json" "$work/index.txt" "$work/serials.txt" <<'EOF'
import json, sys
devices = json.load(open(sys.argv[1]))
with open(sys.argv[2], "w") as idx, open(sys.argv[3], "w") as ser:
    for d in devices:
        if d["role"] != "device":
            continue
        for s in d["certificates"]:
            s = s.split(":")[0]  # serial:issuer-hash
            ser.write(s + "\n")
            if d["status"] == "revoked":
                at = d["revocation"]["at"]  # 2026-11-22T21:03:37Z
                t = at[2:4] + at[5:7] + at[8:10] + at[11:13] + at[14:16] + at[17:19] + "Z"
                idx.write(f"R\t491231235959Z\t{t},keyCompromise\t{s.upper()}\tunknown\t/CN={d['id']}\n")
            else:
                idx.write(f"V\t491231235959Z\t\t{s.upper()}\tunknown\t/CN={d['id']}\n")
EOF

# openssl's responder: same signer certificate and key, two processes (one
# per core), answers valid for an hour like fleetgate's.
openssl ocsp -index "$work/index.txt" -port 19999 -multi 2 -ignore_err -nmin 60 \
    -rsigner "$work/fg/ocsp/signer.crt" -rkey "$work/fg/ocsp/signer.key" \
    -CA "$work/fg/ca/issuing.crt" >"$work/openssl.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/19999) 2>/dev/null && break; sleep 0.1; done

run() { # label addr flags...
    local label=$1 addr=$2
    shift 2
    echo "{\"label\":\"$label\",\"r\":$("$SIM" load ocsp --responder "$addr" \
        --issuer "$work/fg/ca/issuing.crt" --serials "$work/serials.txt" \
        --concurrency "$CONCURRENCY" --seconds "$SECONDS_EACH" "$@")}"
}
results="$work/results.jsonl"
{
    run "openssl,   no nonce, new connection each" 127.0.0.1:19999
    run "openssl,   nonce, new connection each" 127.0.0.1:19999 --nonce
} >"$results"
# openssl's -multi workers can be left spinning after their clients go, and
# the master ignores SIGTERM: stop them outright before measuring fleetgate.
pkill -9 -f "openssl ocsp -index $work" || true
{
    run "fleetgate, no nonce (cached), new connection each" "$ocsp"
    run "fleetgate, nonce (signed each), new connection each" "$ocsp" --nonce
    run "fleetgate, no nonce (cached), keep-alive" "$ocsp" --keep-alive
    run "fleetgate, nonce (signed each), keep-alive" "$ocsp" --nonce --keep-alive
} >>"$results"

python3 - "$results" "$DEVICES" "$REVOKED" "$CONCURRENCY" "$SECONDS_EACH" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
devices, revoked, conc, secs = sys.argv[2:]
print(f"\nOCSP benchmark: {devices} devices ({revoked} revoked), {conc} concurrent clients, "
      f"{secs} s each, one serial per request, network namespace of its own\n")
by = {r["label"]: r["r"] for r in rows}
base = {"no nonce": by["openssl,   no nonce, new connection each"]["responses_per_s"],
        "nonce": by["openssl,   nonce, new connection each"]["responses_per_s"]}
print(f"{'':<54}{'responses/s':>12}{'failures':>10}   vs openssl (same nonce mode, new connection each)")
for label, r in by.items():
    mode = "no nonce" if "no nonce" in label else "nonce"
    print(f"{label:<54}{r['responses_per_s']:>12,.0f}{r['failures']:>10}   {r['responses_per_s'] / base[mode]:.2f}x")
EOF
