#!/usr/bin/env bash
# Two brokers side by side: each holds its own fleet of DEVICES devices
# (the same certificates) at RATE msg/s with one consumer, both at once,
# and their CPU is read over the same windows. On a shared machine the CPU
# a message costs drifts by a fifth from hour to hour, and one broker
# after the other measures the drift as much as the brokers; side by side,
# both see the same hour. Loopback only.
#
# WORK is a directory `bench/fleet-scale.sh` made (its fleet, data dir and
# Mosquitto configuration):
#
#   WORK=/tmp/fs bash bench/fleet-scale.sh          # once, to make WORK
#   WORK=/tmp/fs A=fg B=mq bash bench/side-by-side.sh
#   WORK=/tmp/fs A=base FG_BASE=/path/to/old/fleetgate B=fg bash bench/side-by-side.sh
#
# A and B: fg (this build), base (FG_BASE), mq (Mosquitto 2). Prints each
# window's CPU ticks (user+system) for both and B/A, then the sums.
set -euo pipefail
cd "$(dirname "$0")/.."

: "${WORK:?WORK must be a directory bench/fleet-scale.sh made}"
A=${A:-fg}
B=${B:-mq}
DEVICES=${DEVICES:-10000}
RATE=${RATE:-0.1}
WINDOWS=${WINDOWS:-5}
WINDOW=${WINDOW:-20}
SETTLE=${SETTLE:-35}
PER_PROC=${PER_PROC:-9500}
FG_BASE=${FG_BASE:-}
[ "$A" != "$B" ] || [ "$A" != mq ] || { echo "only one Mosquitto at a time" >&2; exit 1; }
for x in "$A" "$B"; do
    case $x in
        fg | mq) ;;
        base) [ -x "$FG_BASE" ] || { echo "base: set FG_BASE to a fleetgate binary" >&2; exit 1; } ;;
        *) echo "A and B are fg, base or mq, not $x" >&2; exit 1 ;;
    esac
done
ulimit -n "$(ulimit -Hn)"
cargo build --release -q -p broker -p firmware-sim
FG=$PWD/target/release/fleetgate
SIM=$PWD/target/release/firmware-sim
MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)
fleet=$WORK/fleet
[ -f "$fleet/fleet-consumer.crt" ] && [ -d "$WORK/fg" ] || { echo "$WORK has no fleet: run bench/fleet-scale.sh with WORK=$WORK first" >&2; exit 1; }

pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK/side-A" "$WORK/side-B"
}
trap cleanup EXIT

start() { # side kind: sets pid_<side>, broker_<side>, fds_<side>
    local side=$1 kind=$2 bin=$FG out=$WORK/side-$1.out
    if [ "$kind" = mq ]; then
        "$MOSQUITTO" -c "$WORK/mosquitto.conf" >>"$WORK/mosquitto.log" 2>&1 &
        pids+=($!)
        printf -v "pid_$side" %s $!
        for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/38884) 2>/dev/null && break; sleep 0.1; done
        printf -v "broker_$side" %s 127.0.0.1:38884
        printf -v "fds_$side" %s $((DEVICES + 4))
        return
    fi
    [ "$kind" = base ] && bin=$FG_BASE
    # Each fleetgate its own copy of the registry.
    rm -rf "$WORK/side-$side"
    cp -a "$WORK/fg" "$WORK/side-$side"
    "$bin" serve --data-dir "$WORK/side-$side" --api-listen 127.0.0.1:0 --mqtt-listen 127.0.0.1:0 \
        --ocsp-listen 127.0.0.1:0 --connect-rate-per-ip 0 --max-connections 25000 \
        --max-handshakes 20000 >"$out" 2>"$WORK/side-$side.log" &
    pids+=($!)
    printf -v "pid_$side" %s $!
    for _ in $(seq 100); do grep -q listening "$out" 2>/dev/null && break; sleep 0.1; done
    printf -v "broker_$side" %s "$(sed -n 's/.*mqtt=\([^ ]*\).*/\1/p' "$out")"
    printf -v "fds_$side" %s $((DEVICES + 10))
}
start A "$A"
start B "$B"

procs=$(( (DEVICES + PER_PROC - 1) / PER_PROC ))
per=$(( DEVICES / procs ))
duration=$(( 2 * DEVICES / 240 / procs + SETTLE + WINDOWS * WINDOW + 60 ))
for side in A B; do
    b=broker_$side p=pid_$side
    "$SIM" load consume --broker "${!b}" --ca "$fleet/ca.crt" --creds "$fleet" --id fleet-consumer \
        --idle 30 --limit $((duration + 60)) >"$WORK/side-$side-consumer.json" &
    pids+=($!)
    for k in $(seq 0 $((procs - 1))); do
        "$SIM" run --scenario steady --devices "$per" --prefix "p$k-" --fleet "$fleet" --broker "${!b}" \
            --broker-pid "${!p}" --rate "$RATE" --duration "$duration" --connect-limit 240 \
            --quiet --json "$WORK/side-$side-$k.json" >/dev/null 2>>"$WORK/sim.log" &
        pids+=($!)
    done
done
held() { ls "/proc/$1/fd" | wc -l; }
for _ in $(seq 1200); do
    (( $(held "$pid_A") >= fds_A && $(held "$pid_B") >= fds_B )) && break
    sleep 0.5
done
sleep "$SETTLE"
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
echo "$A (A) and $B (B) side by side: $DEVICES devices each at $RATE msg/s, one consumer each; CPU ticks in ${WINDOW} s windows"
sum_a=0 sum_b=0
for w in $(seq "$WINDOWS"); do
    a0=$(ticks "$pid_A") b0=$(ticks "$pid_B")
    sleep "$WINDOW"
    a=$(( $(ticks "$pid_A") - a0 )) b=$(( $(ticks "$pid_B") - b0 ))
    sum_a=$((sum_a + a)) sum_b=$((sum_b + b))
    python3 -c "print(f'window $w: A $a, B $b, B/A {$b / max($a, 1):.3f}')"
done
python3 -c "print(f'all windows: A $sum_a, B $sum_b, B/A {$sum_b / max($sum_a, 1):.3f}')"
