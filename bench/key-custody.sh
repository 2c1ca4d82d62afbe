#!/usr/bin/env bash
# Signing through an HSM against keys in files, side by side: two nodes in
# the same run, one made by `ca init` with every key a file, one by `ca
# init --root-out --ca-key-uri` with the issuing CA's and the OCSP signer's
# keys in a SoftHSM2 token. Rounds alternate the nodes:
# - enrollments/s over the JSON API (firmware-sim load enroll), each one a
#   certificate signed by the issuing CA's key;
# - OCSP answers/s with a fresh nonce per request (firmware-sim load ocsp
#   --nonce), each one signed anew by the OCSP signer's key, keep-alive.
#
#   bash bench/key-custody.sh
#   COUNT=1000 ROUNDS=3 SECONDS_EACH=10 bash bench/key-custody.sh
#
# Needs softhsm2 (Debian `softhsm2`), python3.
set -euo pipefail
cd "$(dirname "$0")/.."

COUNT=${COUNT:-400}
CONCURRENCY=${CONCURRENCY:-16}
ROUNDS=${ROUNDS:-2}
SECONDS_EACH=${SECONDS_EACH:-5}
DEVICES=${DEVICES:-100}
MODULE=/usr/lib/softhsm/libsofthsm2.so
[ -e "$MODULE" ] || { echo "needs SoftHSM2 ($MODULE): apt-get install softhsm2" >&2; exit 1; }
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

export SOFTHSM2_CONF=$work/softhsm2.conf FLEETGATE_LOG=warn
mkdir -p "$work/tokens"
echo "directories.tokendir = $work/tokens" >"$SOFTHSM2_CONF"
softhsm2-util --init-token --free --label bench --pin 4912 --so-pin 771199 >/dev/null
(umask 077; echo 4912 >"$work/pin")

"$FG" ca init --data-dir "$work/file" >/dev/null
"$FG" ca init --data-dir "$work/hsm" --root-out "$work/root" --pin-file "$work/pin" \
    --ca-key-uri "pkcs11:token=bench;object=issuing-ca?module-path=$MODULE" >/dev/null

start() { # name extra-args...
    local name=$1
    shift
    "$FG" serve --data-dir "$work/$name" --api-listen 127.0.0.1:0 --mqtt-listen 127.0.0.1:0 \
        --ocsp-listen 127.0.0.1:0 --http-rate-per-ip 0 --http-max-per-ip 100000 "$@" \
        >"$work/$name.out" 2>"$work/$name.log" &
    pids+=($!)
    for _ in $(seq 100); do grep -q listening "$work/$name.out" 2>/dev/null && break; sleep 0.1; done
}
start file
start hsm --pin-file "$work/pin"
api() { sed -n 's/.*api=\([^ ]*\).*/\1/p' "$work/$1.out"; }
ocsp() { sed -n 's/.*ocsp=\([^ ]*\).*/\1/p' "$work/$1.out"; }

echo "enrolling $DEVICES devices on each for OCSP ..." >&2
for n in file hsm; do
    for i in $(seq 0 $((DEVICES - 1))); do
        FLEETGATE_API="https://$(api $n)" "$FG" device enroll "ocsp-$i" --data-dir "$work/$n" \
            --out "$work/$n-devs" >/dev/null
    done
    FLEETGATE_API="https://$(api $n)" "$FG" device list --json --limit 100000 --data-dir "$work/$n" |
        python3 -c 'import json,sys; [print(c.split(":")[0]) for d in json.load(sys.stdin) if d["role"]=="device" for c in d["certificates"]]' \
            >"$work/$n.serials"
done

results=$work/results.jsonl
for r in $(seq "$ROUNDS"); do
    for n in file hsm; do
        echo "round $r: $n ..." >&2
        "$SIM" load enroll --api "https://$(api $n)" --data-dir "$work/$n" --count "$COUNT" \
            --concurrency "$CONCURRENCY" --rounds 1 --prefix "r$r-" |
            python3 -c 'import json,sys
for l in sys.stdin:
    j = json.loads(l)
    if j["protocol"] == "json": print(json.dumps({"node": sys.argv[1], "what": "enroll", "r": j}))' "$n" \
            >>"$results"
        o=$("$SIM" load ocsp --responder "$(ocsp $n)" --issuer "$work/$n/ca/issuing.crt" \
            --serials "$work/$n.serials" --nonce --keep-alive --concurrency "$CONCURRENCY" \
            --seconds "$SECONDS_EACH")
        echo "{\"node\":\"$n\",\"what\":\"ocsp\",\"r\":$o}" >>"$results"
    done
done
grep -c "pkcs11:" "$work/hsm.log" >/dev/null 2>&1 || true

python3 - "$results" "$COUNT" "$CONCURRENCY" "$SECONDS_EACH" "$ROUNDS" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
count, conc, secs, rounds = sys.argv[2:]
def best(node, what, key):
    return max(r["r"][key] for r in rows if r["node"] == node and r["what"] == what)
def fails(node, what, key):
    return sum(r["r"][key] for r in rows if r["node"] == node and r["what"] == what)
print(f"\nKey custody: {rounds} rounds alternating the nodes; {count} JSON enrollments and "
      f"{secs} s of OCSP (nonce: signed each, keep-alive) a round, {conc} concurrent; best round\n")
print("| | keys in files | keys in SoftHSM2 | HSM / files |")
print("|---|---|---|---|")
e = (best("file", "enroll", "enrollments_per_s"), best("hsm", "enroll", "enrollments_per_s"))
o = (best("file", "ocsp", "responses_per_s"), best("hsm", "ocsp", "responses_per_s"))
print(f"| enrollments/s (JSON API) | {e[0]:,.0f} | {e[1]:,.0f} | {e[1] / e[0]:.2f}x |")
print(f"| OCSP answers/s (signed each) | {o[0]:,.0f} | {o[1]:,.0f} | {o[1] / o[0]:.2f}x |")
f = (fails("file", "enroll", "failed") + fails("file", "ocsp", "failures"),
     fails("hsm", "enroll", "failed") + fails("hsm", "ocsp", "failures"))
print(f"| failures | {f[0]} | {f[1]} | |")
EOF
