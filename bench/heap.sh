#!/usr/bin/env bash
# Where a held connection's memory goes: this build and an earlier one
# under heaptrack, each holding the same N devices (firmware-sim's steady
# scenario, 0.1 msg/s, 20 s) on one data dir. Prints each build's peak
# heap, per device, and the tokio tasks' allocations (the connection's
# task is the one with about one call per device) in bytes per task.
# Loopback only. Needs heaptrack (apt-get install heaptrack).
#
#   FG_BASE=/path/to/old/fleetgate bash bench/heap.sh
set -u
cd "$(dirname "$0")/.."
N=${N:-2000}
BASE=${FG_BASE:?set FG_BASE to an earlier fleetgate binary}
command -v heaptrack >/dev/null || { echo "heaptrack is needed (apt-get install heaptrack)" >&2; exit 1; }
ulimit -n "$(ulimit -Hn)"
cargo build --release -q -p broker -p firmware-sim
FG=$PWD/target/release/fleetgate; SIM=$PWD/target/release/firmware-sim
w=${WORK:-$(mktemp -d)}; fleet=$w/fleet
trap '[ -n "${WORK:-}" ] || rm -rf "$w"' EXIT
start() { # binary [wrapper ...]
  local bin=$1; shift
  "$@" "$bin" serve --data-dir "$w/fg" --api-listen 127.0.0.1:0 --mqtt-listen 127.0.0.1:0 \
    --ocsp-listen 127.0.0.1:0 --connect-rate-per-ip 0 --max-connections 25000 \
    --max-handshakes 20000 >"$w/fg.out" 2>>"$w/fg.log" &
  wrapper=$!
  for _ in $(seq 300); do grep -q listening "$w/fg.out" 2>/dev/null && break; sleep 0.1; done
  broker=$(sed -n 's/.*mqtt=\([^ ]*\).*/\1/p' "$w/fg.out")
  pid=$(pgrep -nf "$bin serve --data-dir $w/fg")
}
stop() { kill "$pid"; wait "$wrapper" 2>/dev/null; }
if [ ! -d "$fleet" ]; then
  mkdir -p "$fleet"; start "$FG"
  export FLEETGATE_API="https://$(sed -n 's/.*api=\([^ ]*\).*/\1/p' "$w/fg.out")" FLEETGATE_DATA_DIR="$w/fg"
  "$SIM" run --scenario storm --devices "$N" --prefix p0- --fleet "$fleet" --broker "$broker" \
    --quiet --json "$w/warm.json" --connect-limit 600 >/dev/null
  stop
fi
for b in this base; do
  bin=$FG; [ $b = base ] && bin=$BASE
  rm -f "$w/heap-$b".*
  start "$bin" heaptrack -o "$w/heap-$b"
  "$SIM" run --scenario steady --devices "$N" --prefix p0- --fleet "$fleet" --broker "$broker" \
    --broker-pid "$pid" --rate 0.1 --duration 20 --connect-limit 240 --quiet --json "$w/$b.json" >/dev/null 2>>"$w/sim.log"
  stop
  out=$(heaptrack_print -f "$w/heap-$b.zst" --print-peaks 1 --peak-limit 4 --sub-peak-limit 6 \
    --print-allocators 0 --print-temporary 0 --print-leaks 0 --print-histogram 0 2>/dev/null)
  peak=$(sed -n 's/^peak heap memory consumption: //p' <<<"$out")
  rss=$(grep -o '"broker_rss_per_connection_kib": *[0-9.]*' "$w/$b.json" | grep -o '[0-9.]*$')
  echo "$b: peak heap $peak for $N devices; RSS per connection ${rss} KiB"
  # The tasks: aligned allocations (tokio's task cells are cache-line aligned).
  awk '/peak memory consumed over .* calls from/{a=0} /aligned_malloc/{a=1}
       a && /consumed over [0-9]+ calls from:/{print}' <<<"$out" |
    awk -v n="$N" '{ v=$1; u=substr(v,length(v)); x=v+0; if(u=="K")x*=1000; if(u=="M")x*=1e6;
       c=$4; printf "  tasks: %s over %d calls = %.0f B each%s\n", v, c, x/c, (c>n*0.7 && c<n*1.3)?"  <- one per device":"" }'
done
echo "heaptrack files: $w/heap-this.zst $w/heap-base.zst (heaptrack_print -f FILE --print-peaks 1)"
