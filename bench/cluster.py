"""Revoke-to-disconnect across nodes: N devices hold MQTT sessions on node
two; each is revoked through node one's API (the fleetgate CLI), one at a
time; the time from the revocation's request (and from its answer) to the
device seeing its connection cut is recorded. Driven by bench/cluster.sh.

Usage: python3 bench/cluster.py N NODE2_MQTT(host:port) CREDS_DIR
Environment: FG_BIN, FLEETGATE_API (node one), FLEETGATE_DATA_DIR.
"""

import json
import os
import subprocess
import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

N = int(sys.argv[1])
HOST, PORT = sys.argv[2].rsplit(":", 1)
CREDS = sys.argv[3]
FG = os.environ["FG_BIN"]

cut = {}
lock = threading.Lock()


def connect(ident):
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=ident, protocol=mqtt.MQTTv5)
    c.tls_set(ca_certs=f"{CREDS}/ca.crt", certfile=f"{CREDS}/{ident}.crt",
              keyfile=f"{CREDS}/{ident}.key")
    up = threading.Event()
    c.on_connect = lambda *a: up.set()

    def on_disconnect(client, userdata, flags, rc, props):
        with lock:
            cut.setdefault(ident, time.monotonic())
        client.loop_stop()

    c.on_disconnect = on_disconnect
    c.connect(HOST, int(PORT), keepalive=60)
    c.loop_start()
    if not up.wait(10):
        raise SystemExit(f"{ident}: no CONNACK from node two")
    return c


ids = [f"cl-{i:04d}" for i in range(N)]
clients = [connect(i) for i in ids]
time.sleep(1)
from_request, from_answer = [], []
for ident in ids:
    t0 = time.monotonic()
    subprocess.run([FG, "device", "revoke", ident], check=True, capture_output=True)
    t1 = time.monotonic()
    deadline = t1 + 10
    while time.monotonic() < deadline:
        with lock:
            t = cut.get(ident)
        if t is not None:
            from_request.append(t - t0)
            from_answer.append(max(0.0, t - t1))
            break
        time.sleep(0.001)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000 if xs else None


print(json.dumps({
    "revocations": N,
    "cut": len(from_request),
    "from_request_ms": {"p50": pct(from_request, 0.5), "p99": pct(from_request, 0.99),
                        "max": pct(from_request, 1.0)},
    "after_answer_ms": {"p50": pct(from_answer, 0.5), "p99": pct(from_answer, 0.99),
                        "max": pct(from_answer, 1.0)},
}, indent=1))
