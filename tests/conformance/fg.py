"""Helpers for the conformance suite: paho-mqtt clients over mutual TLS to
a running fleetgate, devices enrolled through its CLI, and raw MQTT bytes
for what a well-behaved client library will not send.

The Rust test `tests/tests/conformance.rs` starts the server and sets:
FG_MQTT (host:port), FG_CREDS (a folder for certificates), FG_BIN (the
fleetgate binary), FLEETGATE_API and FLEETGATE_DATA_DIR (for the CLI), and
FG_METRICS (host:port of the Prometheus listener).
"""

import itertools
import os
import queue
import socket
import ssl
import struct
import subprocess
import threading
import time
import urllib.request

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

HOST, PORT = os.environ["FG_MQTT"].rsplit(":", 1)
PORT = int(PORT)
CREDS = os.environ["FG_CREDS"]
FG_BIN = os.environ["FG_BIN"]
CA = os.path.join(CREDS, "ca.crt")

# How long to wait for something that should happen; never a measure of
# speed.
WAIT = 10.0
# How long to watch for something that should not happen.
QUIET = 1.0

_ids = itertools.count(1)
_enroll_lock = threading.Lock()


def fleetgate(*args):
    """Runs the fleetgate CLI; returns stdout."""
    out = subprocess.run(
        [FG_BIN, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "FLEETGATE_LOG": "warn"},
    )
    if out.returncode != 0:
        raise AssertionError(f"fleetgate {args}: {out.stderr}")
    return out.stdout


def enroll(role, ident):
    """Enrolls `ident` as a device or service (once); returns (cert, key)."""
    cert = os.path.join(CREDS, f"{ident}.crt")
    key = os.path.join(CREDS, f"{ident}.key")
    with _enroll_lock:
        if not os.path.exists(cert):
            fleetgate(role, "enroll", ident, "--out", CREDS)
    return cert, key


def new_device(tag="d"):
    """A freshly enrolled device: its id."""
    ident = f"{tag}-{os.getpid()}-{next(_ids)}"
    enroll("device", ident)
    return ident


SERVICE = "conformance-svc"


def metric(name):
    """A Prometheus counter's value (summed over its labels)."""
    url = f"http://{os.environ['FG_METRICS']}/metrics"
    total = 0.0
    for line in urllib.request.urlopen(url, timeout=WAIT).read().decode().splitlines():
        if line.startswith(name) and line[len(name)] in " {":
            total += float(line.rsplit(" ", 1)[1])
    return total


def props(packet_type, **kv):
    p = Properties(packet_type)
    for k, v in kv.items():
        setattr(p, k, v)
    return p


def sub_opts(qos, **kv):
    return SubscribeOptions(qos=qos, **kv)


def prop(msg_or_props, name, default=None):
    """A property of a message, or of a packet's properties."""
    p = msg_or_props
    if p is not None and not isinstance(p, Properties):
        p = getattr(p, "properties", None)
    return getattr(p, name, default) if p is not None else default


class Client:
    """A paho client for `ident` (a device or the service) that records
    everything the server sends it."""

    def __init__(self, ident, v5=True, role="device", client_id=None, clean=True,
                 manual_ack=False):
        self.ident = ident
        self.v5 = v5
        cert, key = enroll(role, ident)
        kwargs = {}
        if not v5:
            kwargs["clean_session"] = clean
        self.clean = clean
        self.c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=ident if client_id is None else client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            manual_ack=manual_ack,
            **kwargs,
        )
        self.c.tls_set(ca_certs=CA, certfile=cert, keyfile=key)
        self.messages = queue.Queue()
        self.connack = queue.Queue()
        self.subacks = {}
        self.unsubacks = {}
        self.acks = {}
        self.disconnects = queue.Queue()
        self.cond = threading.Condition()
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message
        self.c.on_subscribe = self._on_subscribe
        self.c.on_unsubscribe = self._on_unsubscribe
        self.c.on_publish = self._on_publish
        self.c.on_disconnect = self._on_disconnect

    # paho callbacks (its network thread)
    def _on_connect(self, c, u, flags, rc, properties):
        self.connack.put((flags.session_present, rc, properties))

    def _on_message(self, c, u, msg):
        self.messages.put(msg)

    def _on_subscribe(self, c, u, mid, rcs, properties):
        with self.cond:
            self.subacks[mid] = (rcs, properties)
            self.cond.notify_all()

    def _on_unsubscribe(self, c, u, mid, rcs, properties):
        with self.cond:
            self.unsubacks[mid] = (rcs, properties)
            self.cond.notify_all()

    def _on_publish(self, c, u, mid, rc, properties):
        with self.cond:
            self.acks[mid] = (rc, properties)
            self.cond.notify_all()

    def _on_disconnect(self, c, u, flags, rc, properties):
        self.disconnects.put((rc, properties))

    def _wait(self, table, mid):
        with self.cond:
            if not self.cond.wait_for(lambda: mid in table, WAIT):
                raise AssertionError(f"{self.ident}: no acknowledgement for mid {mid}")
            return table.pop(mid)

    def connect(self, clean_start=True, expect_ok=True, keepalive=30, **connect_props):
        """Connects; returns (session_present, reason_code, properties)."""
        p = props(PacketTypes.CONNECT, **connect_props) if connect_props else None
        kwargs = {"clean_start": clean_start} if self.v5 else {}
        self.c.connect(HOST, PORT, keepalive=keepalive, properties=p, **kwargs)
        self.c.loop_start()
        try:
            got = self.connack.get(timeout=WAIT)
        except queue.Empty:
            raise AssertionError(f"{self.ident}: no CONNACK")
        if expect_ok and got[1].is_failure:
            raise AssertionError(f"{self.ident}: refused: {got[1]}")
        return got

    def will(self, topic, payload=b"gone", qos=0, retain=False, **will_props):
        p = props(PacketTypes.WILLMESSAGE, **will_props) if will_props else None
        self.c.will_set(topic, payload, qos, retain, properties=p)

    def subscribe(self, topic, qos=0, **kv):
        """SUBSCRIBE; returns (reason codes, SUBACK properties)."""
        p = kv.pop("properties", None)
        if self.v5:
            opts = sub_opts(qos, **kv)
            rc, mid = self.c.subscribe(topic, options=opts, properties=p)
        else:
            rc, mid = self.c.subscribe(topic, qos)
        assert rc == mqtt.MQTT_ERR_SUCCESS, rc
        return self._wait(self.subacks, mid)

    def subscribe_many(self, topics):
        rc, mid = self.c.subscribe([(t, sub_opts(q) if self.v5 else q) for t, q in topics])
        assert rc == mqtt.MQTT_ERR_SUCCESS, rc
        return self._wait(self.subacks, mid)

    def unsubscribe(self, topic):
        rc, mid = self.c.unsubscribe(topic)
        assert rc == mqtt.MQTT_ERR_SUCCESS, rc
        return self._wait(self.unsubacks, mid)

    def publish(self, topic, payload=b"x", qos=0, retain=False, wait=True, **pub_props):
        """PUBLISH; for QoS 1 and 2 waits for the flow's end and returns
        (reason code, properties)."""
        p = props(PacketTypes.PUBLISH, **pub_props) if pub_props else None
        info = self.c.publish(topic, payload, qos, retain, properties=p)
        if qos == 0 or not wait:
            return info
        return self._wait(self.acks, info.mid)

    def ack(self, msg):
        self.c.ack(msg.mid, msg.qos)

    def expect(self, n=1, timeout=WAIT):
        """The next `n` messages."""
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            try:
                out.append(self.messages.get(timeout=max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                raise AssertionError(f"{self.ident}: {len(out)} of {n} messages: {[m.topic for m in out]}")
        return out

    def quiet(self, within=QUIET):
        """Asserts nothing arrives within `within` seconds; returns what did."""
        try:
            m = self.messages.get(timeout=within)
        except queue.Empty:
            return None
        return m

    def expect_disconnect(self, timeout=WAIT):
        """The server's DISCONNECT (reason, properties), or the close."""
        try:
            return self.disconnects.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"{self.ident}: still connected")

    def disconnect(self):
        self.c.disconnect()
        self.c.loop_stop()

    def drop(self):
        """Ends the connection without DISCONNECT (a lost network)."""
        self.c.loop_stop()
        sock = self.c.socket()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def close(self):
        try:
            self.c.loop_stop()
            self.c.disconnect()
        except Exception:
            pass


def service(v5=True, **kw):
    c = Client(SERVICE, v5=v5, role="service", **kw)
    c.connect()
    return c


# --- raw MQTT, for packets a client library will not make -----------------

def tls_socket(ident):
    cert, key = enroll("device", ident)
    ctx = ssl.create_default_context(cafile=CA)
    ctx.load_cert_chain(cert, key)
    s = socket.create_connection((HOST, PORT), timeout=WAIT)
    return ctx.wrap_socket(s, server_hostname=HOST)


def varint(n):
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def mqtt_str(b):
    return struct.pack(">H", len(b)) + b


def packet(first, body):
    return bytes([first]) + varint(len(body)) + body


def connect_packet(client_id, v5, will_topic=None, will_payload=b"x", keepalive=30):
    flags = 0x02
    payload = mqtt_str(client_id.encode())
    props_ = b"\x00" if v5 else b""
    if will_topic is not None:
        flags |= 0x04
        if v5:
            payload += b"\x00"  # will properties
        payload += mqtt_str(will_topic) + mqtt_str(will_payload)
    head = mqtt_str(b"MQTT") + bytes([5 if v5 else 4, flags]) + struct.pack(">H", keepalive)
    return packet(0x10, head + props_ + payload)


def publish_packet(topic, payload, v5, qos=0, pkid=1):
    body = mqtt_str(topic)
    if qos:
        body += struct.pack(">H", pkid)
    if v5:
        body += b"\x00"
    return packet(0x30 | (qos << 1), body + payload)


def read_packet(sock):
    """(first byte, body), or None at the end of the stream."""
    def exact(n):
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                return None
            buf += chunk
        return buf
    try:
        first = exact(1)
        if first is None:
            return None
        mult, length = 1, 0
        while True:
            b = exact(1)[0]
            length += (b & 0x7F) * mult
            mult *= 128
            if not b & 0x80:
                break
        return first[0], exact(length) or b""
    except (ConnectionResetError, ssl.SSLError, OSError):
        return None


def read_all(sock, limit=8):
    """Every packet until the server closes (at most `limit`)."""
    out = []
    for _ in range(limit):
        p = read_packet(sock)
        if p is None:
            return out
        out.append(p)
    raise AssertionError(f"the server did not close the connection: {out}")


def connack_max_packet(body):
    """The Maximum Packet Size in an MQTT 5 CONNACK's body, if any."""
    i, mult, length = 2, 1, 0
    while True:
        b = body[i]
        i += 1
        length += (b & 0x7F) * mult
        mult *= 128
        if not b & 0x80:
            break
    end = i + length
    sizes = {0x11: 4, 0x21: 2, 0x22: 2, 0x13: 2, 0x24: 1, 0x25: 1, 0x27: 4, 0x28: 1,
             0x29: 1, 0x2A: 1}
    while i < end:
        kind = body[i]
        i += 1
        if kind == 0x27:
            return struct.unpack(">I", body[i:i + 4])[0]
        if kind in sizes:
            i += sizes[kind]
        elif kind == 0x26:  # user property: two strings
            for _ in range(2):
                i += 2 + struct.unpack(">H", body[i:i + 2])[0]
        else:  # a string or binary
            i += 2 + struct.unpack(">H", body[i:i + 2])[0]
    return None
