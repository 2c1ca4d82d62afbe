//! What the connection core decides, checked end to end with a stock
//! MQTT 5 client (Eclipse Paho's Python client): overlapping
//! subscriptions, the client's Maximum Packet Size, and a delayed will;
//! and tests of Eclipse Paho's interoperability suite with its own client.
//! (Each has its unit test on the core in `mqtt-core/src/channel`.)

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::process::Command;

use tests::{require_tool, Creds, Server};

fn start() -> (tempfile::TempDir, Server) {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data")).unwrap();
    (tmp, server)
}

/// Python that makes a Paho MQTT 5 client `name` from `creds`.
fn prelude(server: &Server, clients: &[(&str, &Creds)]) -> String {
    let mut s = String::from(
        r#"
import sys, threading, subprocess, time
import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes
PORT = "#,
    );
    s.push_str(&server.mqtt.port().to_string());
    s.push('\n');
    for (name, c) in clients {
        s.push_str(&format!(
            "{name}_creds = ({ca:?}, {crt:?}, {key:?})\n",
            ca = c.ca.to_str().unwrap(),
            crt = c.cert.to_str().unwrap(),
            key = c.key.to_str().unwrap(),
        ));
    }
    s.push_str(
        r#"
def client(cid, creds):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5)
    c.tls_set(ca_certs=creds[0], certfile=creds[1], keyfile=creds[2])
    return c
"#,
    );
    s
}

fn python(script: &str) -> String {
    let (ok, out) = tests::run(Command::new("python3").args(["-c", script]));
    assert!(ok, "{out}");
    out
}

#[test]
fn each_copy_of_a_message_for_overlapping_subscriptions_carries_its_own_identifier() {
    require_tool("python3");
    let (tmp, server) = start();
    let dev = server.enroll(tmp.path(), "device", "dev-1");
    let svc = server.enroll(tmp.path(), "service", "backend");
    let script = prelude(&server, &[("dev", &dev), ("svc", &svc)])
        + r#"
got, subscribed, done = [], threading.Event(), threading.Event()
svc = client("backend", svc_creds)
def on_connect(cl, u, f, rc, p):
    for (flt, q, sid) in (("devices/+/telemetry", 2, 1), ("devices/#", 1, 2)):
        props = Properties(PacketTypes.SUBSCRIBE)
        props.SubscriptionIdentifier = sid
        cl.subscribe(flt, qos=q, properties=props)
subs = []
def on_subscribe(cl, u, mid, rcs, p):
    subs.append(mid)
    if len(subs) == 2: subscribed.set()
ends = []
def on_message(cl, u, m):
    ids = getattr(m.properties, "SubscriptionIdentifier", [])
    if m.payload == b"end":
        # Each filter delivers in order: once both copies of the last
        # message came, every copy of the first one has.
        ends.append(1)
        if len(ends) == 2: done.set()
    else:
        got.append((m.qos, sorted(ids)))
svc.on_connect, svc.on_subscribe, svc.on_message = on_connect, on_subscribe, on_message
svc.connect("127.0.0.1", PORT)
svc.loop_start()
assert subscribed.wait(10), "no SUBACKs"
up = threading.Event()
dev = client("dev-1", dev_creds)
dev.on_connect = lambda cl, u, f, rc, p: up.set()
dev.connect("127.0.0.1", PORT)
dev.loop_start()
assert up.wait(10)
dev.publish("devices/dev-1/telemetry", b"overlapping", qos=2).wait_for_publish(10)
dev.publish("devices/dev-1/telemetry", b"end", qos=2).wait_for_publish(10)
assert done.wait(10), got
print(sorted(got))
dev.disconnect(); svc.disconnect()
"#;
    let out = python(&script);
    // MQTT 5 3.3.4: one copy per subscription, at its QoS, each with its
    // own identifier (MQTT-3.3.4-5), not both on each.
    assert_eq!(out.trim(), "[(1, [2]), (2, [1])]", "{out}");
}

#[test]
fn a_message_over_the_clients_maximum_packet_size_is_skipped_and_the_next_delivered() {
    require_tool("python3");
    let (tmp, server) = start();
    let dev = server.enroll(tmp.path(), "device", "dev-1");
    let svc = server.enroll(tmp.path(), "service", "backend");
    let script = prelude(&server, &[("dev", &dev), ("svc", &svc)])
        + r#"
got, subscribed, one = [], threading.Event(), threading.Event()
cp = Properties(PacketTypes.CONNECT)
cp.MaximumPacketSize = 512
svc = client("backend", svc_creds)
svc.on_connect = lambda cl, u, f, rc, p: cl.subscribe("devices/+/telemetry", qos=1)
svc.on_subscribe = lambda cl, u, mid, rcs, p: subscribed.set()
def on_message(cl, u, m):
    got.append(len(m.payload))
    one.set()
svc.on_message = on_message
svc.connect("127.0.0.1", PORT, properties=cp)
svc.loop_start()
assert subscribed.wait(10)
up = threading.Event()
dev = client("dev-1", dev_creds)
dev.on_connect = lambda cl, u, f, rc, p: up.set()
dev.connect("127.0.0.1", PORT)
dev.loop_start()
assert up.wait(10)
dev.publish("devices/dev-1/telemetry", b"x" * 2000, qos=1).wait_for_publish(10)
dev.publish("devices/dev-1/telemetry", b"y" * 10, qos=1).wait_for_publish(10)
# In order: when the small one comes, the big one would have come first.
assert one.wait(10), "the small message never came"
print(got, svc.is_connected())
dev.disconnect(); svc.disconnect()
"#;
    let out = python(&script);
    assert_eq!(out.trim(), "[10] True", "{out}");
}

#[test]
fn a_delayed_will_arrives_with_exactly_its_payload() {
    require_tool("python3");
    let (tmp, server) = start();
    let dev = server.enroll(tmp.path(), "device", "dev-1");
    let svc = server.enroll(tmp.path(), "service", "backend");
    // The device runs in a process of its own, killed with SIGKILL: its
    // connection ends with no DISCONNECT, as Paho's test_will_delay ends
    // its client.
    let script = prelude(&server, &[("dev", &dev), ("svc", &svc)])
        + r#"
device = f'''
import sys, time
import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="dev-1", protocol=mqtt.MQTTv5)
c.tls_set(ca_certs={dev_creds[0]!r}, certfile={dev_creds[1]!r}, keyfile={dev_creds[2]!r})
wp = Properties(PacketTypes.WILLMESSAGE)
wp.WillDelayInterval = 1
cp = Properties(PacketTypes.CONNECT)
cp.SessionExpiryInterval = 5
c.will_set("devices/dev-1/status", b"test_will_delay will message", qos=1, properties=wp)
c.on_connect = lambda cl, u, f, rc, p: print("up", flush=True)
c.connect("127.0.0.1", {PORT}, properties=cp)
c.loop_forever()
'''
got, subscribed, heard = [], threading.Event(), threading.Event()
svc = client("backend", svc_creds)
svc.on_connect = lambda cl, u, f, rc, p: cl.subscribe("devices/+/status", qos=1)
svc.on_subscribe = lambda cl, u, mid, rcs, p: subscribed.set()
def on_message(cl, u, m):
    got.append(m.payload)
    heard.set()
svc.on_message = on_message
svc.connect("127.0.0.1", PORT)
svc.loop_start()
assert subscribed.wait(10)
d = subprocess.Popen([sys.executable, "-c", device], stdout=subprocess.PIPE, text=True)
assert d.stdout.readline().strip() == "up"
d.kill()
d.wait()
assert heard.wait(10), "no will"
print(got)
svc.disconnect()
"#;
    let out = python(&script);
    assert_eq!(out.trim(), "[b'test_will_delay will message']", "{out}");
}

/// The tests of Eclipse Paho's interoperability suite
/// (`tests/paho-interop`, its own MQTT 5 client, over a TLS proxy) that
/// once failed on fleetgate where Mosquitto passed: a DISCONNECT's new
/// session expiry, a session resumed with expiry 0, publication expiry
/// while a service is away, request/response, a delayed will, and a
/// `$` topic refused with PUBACK 0x87 (the connection goes on).
#[test]
fn the_paho_interoperability_suite_passes_on_sessions_expiry_and_wills() {
    use std::io::BufRead;
    require_tool("python3");
    let (tmp, server) = start();
    // The suite's own client ids: a device and a service.
    let creds = tmp.path().join("creds");
    server.enroll(&creds, "device", "myclientid");
    server.enroll(&creds, "service", "myclientid2");
    let suite = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("paho-interop");
    let mut proxy = std::process::Command::new("python3")
        .arg(suite.join("tlsproxy.py"))
        .arg(server.mqtt.port().to_string())
        .arg(&creds)
        .arg("myclientid")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    std::io::BufReader::new(proxy.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    let port = ready
        .trim()
        .strip_prefix("ready ")
        .unwrap_or_else(|| panic!("the proxy said {ready:?}"))
        .to_owned();
    // The suite's client waits without a bound in places: `timeout` ends
    // it if the server never answers.
    let (ok, out) = tests::run(
        Command::new("timeout")
            .arg("300")
            .arg("python3")
            .arg(suite.join("suite.py"))
            .arg(&port)
            .arg("devices/myclientid/commands/")
            .args([
                "test_session_expiry",
                "test_redelivery_on_reconnect",
                "test_publication_expiry",
                "test_request_response",
                "test_will_delay",
                "test_dollar_topics",
            ]),
    );
    let _ = proxy.kill();
    let _ = proxy.wait();
    assert!(ok, "{out}");
    assert!(out.contains("Ran 6 tests") && out.contains("\nOK"), "{out}");
}
