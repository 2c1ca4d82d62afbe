"""One device degrading everyone, within its own topics: the conformance
issue's three cases, against one broker (driven by bench/degrade.sh).

  rounds  4 clean sessions that each try 5,000 subscriptions, then leave:
          broker RSS after each round.
  flood   one device tries 10,000 subscriptions and publishes to 10,000
          new topics while another device's QoS 1 probe messages go to a
          service: probe latency beside the same probe with no flood.
  volume  200 MiB (800 x 256 KiB, QoS 1) through one subscription, then
          both clients leave: broker RSS before, at the end, 3 s after.

Usage: python3 bench/degrade.py HOST:PORT CREDS_DIR BROKER_PID > figures.json
CREDS_DIR holds ca.crt and <id>.crt/.key for devices deg-a, deg-b, deg-c
and the service deg-svc. Loopback only; counts and time are bounded.
"""

import json
import queue
import statistics
import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

HOST, PORT = sys.argv[1].rsplit(":", 1)
PORT = int(PORT)
CREDS = sys.argv[2]
PID = int(sys.argv[3])


def rss_mib():
    with open(f"/proc/{PID}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def client(ident, on_message=None):
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=ident, protocol=mqtt.MQTTv311,
                    clean_session=True)
    c.tls_set(ca_certs=f"{CREDS}/ca.crt", certfile=f"{CREDS}/{ident}.crt",
              keyfile=f"{CREDS}/{ident}.key")
    c.max_inflight_messages_set(20)
    c.max_queued_messages_set(0)
    connected = threading.Event()
    c.on_connect = lambda *a: connected.set()
    if on_message:
        c.on_message = on_message
    c.connect(HOST, PORT, keepalive=60)
    c.loop_start()
    if not connected.wait(10):
        raise SystemExit(f"{ident}: no CONNACK")
    return c


def subscribe_all(c, filters, batch=100):
    """SUBSCRIBEs of `batch` filters each; waits for every SUBACK."""
    done = queue.Queue()
    c.on_subscribe = lambda c_, u, mid, rcs, p: done.put(
        sum(1 for rc in rcs if not rc.is_failure))
    sent = 0
    for i in range(0, len(filters), batch):
        c.subscribe([(f, 0) for f in filters[i:i + batch]])
        sent += 1
    granted = 0
    for _ in range(sent):
        granted += done.get(timeout=60)
    return granted


def close(c):
    c.disconnect()
    c.loop_stop()


def rounds():
    out = {"rss_before_mib": rss_mib(), "rss_after_round_mib": [], "granted": []}
    for r in range(4):
        c = client("deg-a")
        out["granted"].append(subscribe_all(c, [f"devices/deg-a/r{r}/{i}" for i in range(5000)]))
        close(c)
        time.sleep(1)
        out["rss_after_round_mib"].append(rss_mib())
    return out


def probe(seconds, during=None):
    """Latency of deg-b's QoS 1 messages to deg-svc, every 20 ms."""
    lat = []
    got = threading.Event()

    def on_message(c, u, m):
        lat.append(time.monotonic() - float(m.payload))
        got.set()

    svc = client("deg-svc", on_message)
    svc.subscribe("devices/deg-b/probe", 1)
    time.sleep(0.5)
    b = client("deg-b")
    flood = threading.Thread(target=during) if during else None
    if flood:
        flood.start()
    deadline = time.monotonic() + seconds
    sent = 0
    while time.monotonic() < deadline:
        b.publish("devices/deg-b/probe", str(time.monotonic()), qos=1)
        sent += 1
        time.sleep(0.02)
    time.sleep(2)
    if flood:
        flood.join()
    close(b)
    close(svc)
    lat.sort()
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else None
    return {"sent": sent, "received": len(lat), "p50_ms": pct(0.5), "p99_ms": pct(0.99),
            "max_ms": lat[-1] * 1000 if lat else None}


def flood_device():
    a = client("deg-a")
    granted = subscribe_all(a, [f"devices/deg-a/f/{i}" for i in range(10000)])
    for i in range(10000):
        a.publish(f"devices/deg-a/new/{i}", b"x", qos=0)
    time.sleep(1)
    close(a)
    flood_device.granted = granted


def volume():
    n, size = 800, 256 * 1024
    got = []
    done = threading.Event()

    def on_message(c, u, m):
        got.append(len(m.payload))
        if len(got) == n:
            done.set()

    before = rss_mib()
    svc = client("deg-svc", on_message)
    svc.subscribe("devices/deg-c/bulk", 1)
    time.sleep(0.5)
    c = client("deg-c")
    payload = b"v" * size
    t0 = time.monotonic()
    for _ in range(n):
        c.publish("devices/deg-c/bulk", payload, qos=1).wait_for_publish(30)
    done.wait(120)
    secs = time.monotonic() - t0
    peak = rss_mib()
    close(c)
    close(svc)
    time.sleep(3)
    return {"messages": n, "received": len(got), "mib": n * size / 2**20, "seconds": secs,
            "rss_before_mib": before, "rss_end_mib": peak, "rss_after_mib": rss_mib()}


figures = {"rounds": rounds()}
figures["probe_idle"] = probe(10)
figures["probe_flood"] = probe(10, flood_device)
figures["flood_subscriptions_granted"] = getattr(flood_device, "granted", None)
figures["volume"] = volume()
print(json.dumps(figures, indent=1))
