#!/usr/bin/env bash
# Connect storms, this build against an earlier one, alternating on one
# data dir and the same 10 certificates: RUNS rounds of CONNECTS full
# handshakes (10 at a time, `firmware-sim load connect`) per build.
# Loopback only.
#
#   FG_BASE=/path/to/old/fleetgate bash bench/connect-ab.sh
set -u
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
CONNECTS=${CONNECTS:-10000}
BASE=${FG_BASE:?set FG_BASE to an earlier fleetgate binary}
cargo build --release -q -p broker -p firmware-sim
FG=$PWD/target/release/fleetgate; SIM=$PWD/target/release/firmware-sim
w=$(mktemp -d); fleet=$w/fleet; mkdir -p $fleet
start() {
  "$1" serve --data-dir $w/fg --api-listen 127.0.0.1:0 --mqtt-listen 127.0.0.1:0 --ocsp-listen 127.0.0.1:0 \
    --connect-rate-per-ip 0 --max-connections 25000 --max-handshakes 20000 > $w/fg.out 2>> $w/fg.log &
  pid=$!
  for _ in $(seq 100); do grep -q listening $w/fg.out 2>/dev/null && break; sleep 0.1; done
  api=$(sed -n 's/.*api=\([^ ]*\).*/\1/p' $w/fg.out); broker=$(sed -n 's/.*mqtt=\([^ ]*\).*/\1/p' $w/fg.out)
  export FLEETGATE_API="https://$api" FLEETGATE_DATA_DIR="$w/fg"
}
start $FG
for i in $(seq 0 9); do $FG device enroll p0-$i --out $fleet >/dev/null; done
kill $pid; wait $pid 2>/dev/null
for r in $(seq "$RUNS"); do
  for b in $FG $BASE; do
    start $b
    $SIM load connect --broker "$broker" --ca $fleet/ca.crt --creds $fleet --prefix p0- --concurrency 10 --connects "$CONNECTS" > $w/s.json 2>/dev/null
    echo "run $r $( [ $b = $FG ] && echo this || echo base ): $(python3 -c "import json; print(round(json.load(open('$w/s.json'))['connects_per_s']))") connects/s"
    kill $pid; wait $pid 2>/dev/null
  done
done
rm -rf $w
