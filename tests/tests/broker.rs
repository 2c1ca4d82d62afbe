//! The broker end to end: mosquitto clients, rumqttc and raw TLS probes
//! against the real `fleetgate serve`.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::process::Command;
use std::time::{Duration, Instant};

use fleetgate_api::client::ApiClient;
use rumqttc::{Event, Packet, QoS, SubscribeFilter, SubscribeReasonCode};
use serde_json::{json, Value};
use tests::mqtt::{client, connect_packet, connected, probe, until_closed};
use tests::pki::{self, Spec, TestCa};
use tests::{require_tool, Creds, Server};
use time::OffsetDateTime;

/// A certificate chain and its key, PEM.
type Pem = (String, String);

fn start() -> (tempfile::TempDir, Server) {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data")).unwrap();
    (tmp, server)
}

async fn stats(admin: &ApiClient) -> Value {
    admin.get("/v1/stats").await.unwrap()
}

#[test]
fn mosquitto_devices_and_a_service_exchange_messages() {
    let (tmp, server) = start();
    let dev = server.enroll(tmp.path(), "device", "dev-1");
    let svc = server.enroll(tmp.path(), "service", "backend");

    // The service listens to all telemetry (MQTT 5).
    let sub = tests::Subscriber::spawn(server.mosquitto("mosquitto_sub", &svc).args([
        "-V",
        "mqttv5",
        "-t",
        "devices/+/telemetry",
        "-v",
        "-C",
        "2",
        "-W",
        "15",
    ]));

    // No -i: the client id comes from the certificate.
    for (version, qos, msg) in [("mqttv311", "0", "t-311"), ("mqttv5", "1", "t-5")] {
        let out = server
            .mosquitto("mosquitto_pub", &dev)
            .args([
                "-V",
                version,
                "-q",
                qos,
                "-t",
                "devices/dev-1/telemetry",
                "-m",
                msg,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Then the device listens for commands (one connection per device: a
    // second one with the same certificate would take this one over).
    let cmds = tests::Subscriber::spawn(server.mosquitto("mosquitto_sub", &dev).args([
        "-t",
        "devices/dev-1/commands/#",
        "-v",
        "-C",
        "1",
        "-W",
        "15",
    ]));
    let out = server
        .mosquitto("mosquitto_pub", &svc)
        .args([
            "-i",
            "backend",
            "-t",
            "devices/dev-1/commands/reboot",
            "-m",
            "now",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let (ok, got, err) = sub.finish();
    assert!(ok, "{got} {err}");
    assert_eq!(
        got.lines().collect::<Vec<_>>(),
        [
            "devices/dev-1/telemetry t-311",
            "devices/dev-1/telemetry t-5"
        ]
    );
    let (_, got, _) = cmds.finish();
    assert_eq!(got.trim(), "devices/dev-1/commands/reboot now");
}

#[test]
fn mosquitto_identity_and_acl_refusals() {
    let (tmp, server) = start();
    let dev = server.enroll(tmp.path(), "device", "dev-1");
    server.enroll(tmp.path(), "device", "dev-2");

    // A client id that is not the certificate's: CONNACK not authorized.
    let out = server
        .mosquitto("mosquitto_pub", &dev)
        .args(["-i", "dev-2", "-t", "devices/dev-1/x", "-m", "spoof"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not authori"), "{err}");

    // Subscriptions beyond its own topics: SUBACK failure for each.
    for filter in ["#", "devices/+/telemetry", "devices/dev-2/#", "$SYS/#"] {
        let out = server
            .mosquitto("mosquitto_sub", &dev)
            .args(["-t", filter, "-W", "5"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("All subscription requests were denied"),
            "{filter}: {err}"
        );
    }
    let log = server.log().join("\n");
    assert!(
        server.wait_for_log("wrong_identity", std::time::Duration::from_secs(3)),
        "{log}"
    );
    assert!(
        server.wait_for_log("subscription refused", std::time::Duration::from_secs(3)),
        "{log}"
    );
}

/// MQTT 5 (Eclipse Paho's Python client, paho-mqtt): a QoS 1 publish
/// outside the device's topics gets PUBACK 0x87 Not authorized, nothing
/// leaks, and the connection goes on (at QoS 0 it ends: the conformance
/// suite's `test_disconnect_says_why`): the next publish to its own topic is
/// acknowledged and delivered (Paho's interoperability `test_dollar_topics`
/// publishes to a `$` topic and expects to go on).
#[test]
fn an_mqtt5_publish_outside_its_topics_gets_0x87_and_the_connection_goes_on() {
    require_tool("python3");
    let (tmp, server) = start();
    let dev = server.enroll(tmp.path(), "device", "dev-1");
    let svc = server.enroll(tmp.path(), "service", "backend");
    let script = format!(
        r#"
import threading
import paho.mqtt.client as mqtt
def client(cid, crt, key):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5)
    c.tls_set(ca_certs={ca:?}, certfile=crt, keyfile=key)
    return c
# The service watches everything it may see, subscribed before anything is sent.
seen, subscribed, heard = [], threading.Event(), threading.Event()
svc = client("backend", {scrt:?}, {skey:?})
svc.on_connect = lambda cl, u, f, rc, p: cl.subscribe([("devices/#", 1), ("$devices/#", 1)])
svc.on_subscribe = lambda cl, u, mid, rcs, p: subscribed.set()
def on_message(cl, u, m):
    seen.append(m.topic)
    heard.set()
svc.on_message = on_message
svc.connect("127.0.0.1", {port})
svc.loop_start()
assert subscribed.wait(10), "no SUBACK"
acks, done, up = {{}}, threading.Event(), threading.Event()
dev = client("dev-1", {dcrt:?}, {dkey:?})
dev.on_connect = lambda cl, u, f, rc, p: up.set()
def on_publish(cl, u, mid, rc, p):
    acks[mid] = rc.value
    if len(acks) == 3: done.set()
dev.on_publish = on_publish
dev.connect("127.0.0.1", {port})
dev.loop_start()
assert up.wait(10), "no CONNACK"
m = [dev.publish(t, b"x", qos=1).mid
     for t in ("devices/dev-2/telemetry", "$devices/dev-1/telemetry", "devices/dev-1/telemetry")]
assert done.wait(10), acks
assert heard.wait(10), "the service heard nothing"
print(" ".join(str(acks[i]) for i in m), dev.is_connected(), ",".join(seen))
dev.disconnect(); svc.disconnect(); dev.loop_stop(); svc.loop_stop()
"#,
        ca = dev.ca.to_str().unwrap(),
        dcrt = dev.cert.to_str().unwrap(),
        dkey = dev.key.to_str().unwrap(),
        scrt = svc.cert.to_str().unwrap(),
        skey = svc.key.to_str().unwrap(),
        port = server.mqtt.port(),
    );
    let (ok, out) = tests::run(Command::new("python3").args(["-c", &script]));
    assert!(ok, "{out}");
    // 0x87 twice, then success; still connected; and the service saw only
    // the publish to the device's own topic (messages in order: the
    // refused ones came first and nothing of them arrived).
    assert_eq!(
        out.trim(),
        "135 135 0 True devices/dev-1/telemetry",
        "{out}"
    );
    assert!(server.wait_for_log("publish refused (0x87)", Duration::from_secs(5)));
}

#[tokio::test]
async fn a_device_publishing_outside_its_topics_is_cut_and_nothing_leaks() {
    let (tmp, server) = start();
    let dev = server.enroll(tmp.path(), "device", "dev-1");
    let svc = server.enroll(tmp.path(), "service", "backend");

    let (watcher, mut watcher_loop) = client(server.mqtt, &svc, "backend");
    connected(&mut watcher_loop).await;
    watcher
        .subscribe("devices/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    let (c, mut l) = client(server.mqtt, &dev, "dev-1");
    connected(&mut l).await;
    c.publish("devices/dev-2/telemetry", QoS::AtLeastOnce, false, "forged")
        .await
        .unwrap();
    let closed = until_closed(&mut l, Duration::from_secs(5)).await;
    assert!(closed.is_some(), "the ACL escape must cut the connection");

    // The watcher sees nothing in the next moment.
    let seen = tokio::time::timeout(Duration::from_millis(500), async {
        loop {
            if let Ok(Event::Incoming(Packet::Publish(p))) = watcher_loop.poll().await {
                return p.topic;
            }
        }
    })
    .await;
    assert!(seen.is_err(), "leaked: {seen:?}");
    let s = stats(&server.admin()).await;
    assert!(s["refusals"]["acl"].as_u64().unwrap() >= 1, "{s}");
}

#[tokio::test]
async fn mixed_subscribe_gets_per_filter_answers() {
    let (tmp, server) = start();
    let dev = server.enroll(tmp.path(), "device", "dev-1");
    let (c, mut l) = client(server.mqtt, &dev, "dev-1");
    connected(&mut l).await;
    c.subscribe_many([
        SubscribeFilter::new("devices/dev-1/commands/#".into(), QoS::AtLeastOnce),
        SubscribeFilter::new("#".into(), QoS::AtLeastOnce),
        SubscribeFilter::new("devices/dev-1/config".into(), QoS::AtMostOnce),
    ])
    .await
    .unwrap();
    let codes = loop {
        match tokio::time::timeout(Duration::from_secs(5), l.poll())
            .await
            .unwrap()
        {
            Ok(Event::Incoming(Packet::SubAck(ack))) => break ack.return_codes,
            Ok(_) => {}
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(
        codes,
        [
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            SubscribeReasonCode::Failure,
            SubscribeReasonCode::Success(QoS::AtMostOnce),
        ]
    );
    // And the allowed subscription works.
    c.publish("devices/dev-1/config", QoS::AtMostOnce, false, "v2")
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Ok(Event::Incoming(Packet::Publish(p))) = l.poll().await {
                return p.payload;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(&got[..], b"v2");
}

#[tokio::test]
async fn refused_at_the_handshake_with_the_matching_alert_or_at_connect_by_the_registry() {
    let (tmp, server) = start();
    let data = &server.data_dir;
    let ca_pem = std::fs::read(data.join("ca.crt")).unwrap();
    let ours = TestCa::from_data_dir(data);
    let now = OffsetDateTime::now_utc();
    let admin = server.admin();

    // Registered devices to revoke and suspend.
    let revoked = server.enroll(tmp.path(), "device", "gone");
    let suspended = server.enroll(tmp.path(), "device", "paused");
    server.cli_ok(&["device", "revoke", "gone", "--reason", "key-compromise"]);
    server.cli_ok(&["device", "suspend", "paused"]);
    let read = |c: &Creds| {
        (
            std::fs::read_to_string(&c.cert).unwrap(),
            std::fs::read_to_string(&c.key).unwrap(),
        )
    };

    let expired = ours.issue(&Spec {
        not_before: now - time::Duration::days(2),
        not_after: now - time::Duration::days(1),
        ..Spec::device("old")
    });
    let future = ours.issue(&Spec {
        not_before: now + time::Duration::days(1),
        not_after: now + time::Duration::days(2),
        ..Spec::device("future")
    });
    let unknown_serial = ours.issue(&Spec::device("ghost"));
    let foreign = TestCa::foreign().issue(&Spec::device("dev-1"));
    let self_signed = pki::self_signed(&Spec::device("dev-1"));
    let server_usage = ours.issue(&Spec {
        client_auth: false,
        ..Spec::device("dev-1")
    });
    let as_ca = ours.issue(&Spec {
        is_ca: true,
        ..Spec::device("dev-1")
    });
    let admin_cert = (
        std::fs::read_to_string(data.join("admin.crt")).unwrap(),
        std::fs::read_to_string(data.join("admin.key")).unwrap(),
    );

    // (case, client certificate chain and key, the alert expected)
    let cases: Vec<(&str, Option<Pem>, &str)> = vec![
        ("no certificate", None, "CertificateRequired"),
        ("self-signed", Some(self_signed), "UnknownCA"),
        ("foreign CA", Some(foreign), "UnknownCA"),
        ("expired", Some(expired), "CertificateExpired"),
        ("not yet valid", Some(future), "CertificateExpired"),
        (
            "server-only usage",
            Some(server_usage),
            "UnsupportedCertificate",
        ),
        ("CA certificate as client", Some(as_ca), "BadCertificate"),
        ("admin certificate", Some(admin_cert), "AccessDenied"),
    ];
    for (name, identity, alert) in cases {
        let config = pki::client_config(
            &ca_pem,
            identity.as_ref().map(|(c, k)| (c.as_str(), k.as_str())),
        );
        let r = probe(server.mqtt, config, &connect_packet("")).await;
        let err = r.expect_err(name);
        assert!(
            err.contains(alert),
            "{name}: expected {alert}, got {err}\n{}",
            server.log().join("\n")
        );
    }

    // What the registry says is decided once, after the handshake (no
    // registry IO inside it): a CONNACK refusal, not authorized (3.1.1
    // return code 5).
    for (name, identity) in [
        ("revoked", read(&revoked)),
        ("suspended", read(&suspended)),
        ("unknown serial", unknown_serial),
    ] {
        let config = pki::client_config(&ca_pem, Some((&identity.0, &identity.1)));
        let got = probe(server.mqtt, config, &connect_packet(""))
            .await
            .unwrap_or_else(|e| panic!("{name}: the handshake is not where it is refused: {e}"));
        assert_eq!(&got[..4], &[0x20, 0x02, 0x00, 0x05], "{name}: {got:02x?}");
    }

    let s = stats(&admin).await;
    let r = &s["refusals"];
    for (reason, at_least) in [
        ("no_certificate", 1),
        ("unknown_ca", 2),
        ("expired", 1),
        ("not_yet_valid", 1),
        ("revoked", 1),
        ("suspended", 1),
        ("unknown_serial", 1),
        ("wrong_usage", 1),
        ("wrong_identity", 1),
    ] {
        assert!(r[reason].as_u64().unwrap() >= at_least, "{reason}: {s}");
    }
    let log = server.log().join("\n");
    for reason in [
        "revoked (key-compromise)",
        "device is suspended",
        "serial not in the registry",
    ] {
        assert!(
            server.wait_for_log(reason, std::time::Duration::from_secs(3)),
            "{reason} not logged: {log}"
        );
    }
    // A handshake refusal says who asked from where, in words (issue 29,
    // item 4): the peer's address, what the certificate says it is, and
    // times in RFC 3339, not a Rust value.
    let refusals: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("refused at handshake"))
        .collect();
    assert!(
        refusals
            .iter()
            .all(|l| l.contains("peer.addr=127.0.0.1:") && l.contains("subject")),
        "{refusals:#?}"
    );
    let expired = refusals
        .iter()
        .find(|l| l.contains(r#"reason="expired""#))
        .unwrap_or_else(|| panic!("no expired refusal in {refusals:#?}"));
    assert!(
        expired.contains("the certificate expired at 20") && !expired.contains("UnixTime"),
        "{expired}"
    );
    assert!(
        refusals
            .iter()
            .any(|l| l.contains(r#"reason="unknown_ca""#) && l.contains("no CA this broker trusts")),
        "{refusals:#?}"
    );
}

#[tokio::test]
async fn revoking_suspending_and_cert_revocation_cut_live_sessions_within_a_second() {
    let (tmp, server) = start();
    let admin = server.admin();
    for (id, action, body) in [
        ("dev-r", "revoke", json!({"reason": "key-compromise"})),
        ("dev-s", "suspend", json!({})),
        ("dev-c", "cert", json!({"reason": "superseded"})),
    ] {
        let creds = server.enroll(tmp.path(), "device", id);
        let (c, mut l) = client(server.mqtt, &creds, id);
        connected(&mut l).await;
        c.subscribe(format!("devices/{id}/#"), QoS::AtLeastOnce)
            .await
            .unwrap();
        // Let the subscription settle, then cut.
        let _ = tokio::time::timeout(Duration::from_millis(300), async {
            loop {
                let _ = l.poll().await;
            }
        })
        .await;

        let started = Instant::now();
        let _: Value = if action == "cert" {
            let show: Value = admin.get(&format!("/v1/devices/{id}")).await.unwrap();
            let serial = show["certificates"][0]["serial"]
                .as_str()
                .unwrap()
                .to_owned();
            admin
                .post(&format!("/v1/certificates/{serial}/revoke"), &body)
                .await
                .unwrap()
        } else {
            admin
                .post(&format!("/v1/devices/{id}/{action}"), &body)
                .await
                .unwrap()
        };
        let closed = until_closed(&mut l, Duration::from_secs(5)).await;
        let took = started.elapsed();
        assert!(closed.is_some(), "{id}: still connected after {action}");
        eprintln!("{id}: {action} to disconnect: {took:?}");
        assert!(
            took < Duration::from_secs(1),
            "{id}: {action} took {took:?}"
        );

        // And it stays out.
        let (_c, mut again) = client(server.mqtt, &creds, id);
        let err = match tokio::time::timeout(Duration::from_secs(5), again.poll()).await {
            Ok(Err(e)) => e.to_string(),
            other => panic!("{id}: reconnect after {action} was not refused: {other:?}"),
        };
        // Refused before CONNACK by the registry: not authorized.
        assert!(err.contains("NotAuthorized"), "{id}: {err}");
    }
    // A resumed device gets back in.
    server.cli_ok(&["device", "resume", "dev-s"]);
    let creds = Creds::in_dir(tmp.path(), "dev-s");
    let (_c, mut l) = client(server.mqtt, &creds, "dev-s");
    connected(&mut l).await;
    let s = stats(&admin).await;
    assert!(s["kicked"].as_u64().unwrap() >= 3, "{s}");
}

#[tokio::test]
async fn a_second_connection_with_the_same_certificate_takes_over() {
    let (tmp, server) = start();
    let dev = server.enroll(tmp.path(), "device", "dev-1");
    let (_c1, mut first) = client(server.mqtt, &dev, "dev-1");
    connected(&mut first).await;
    let (c2, mut second) = client(server.mqtt, &dev, "");
    connected(&mut second).await;
    assert!(
        until_closed(&mut first, Duration::from_secs(5))
            .await
            .is_some(),
        "the first connection must end"
    );
    // The second one works.
    c2.subscribe("devices/dev-1/#", QoS::AtMostOnce)
        .await
        .unwrap();
    c2.publish("devices/dev-1/x", QoS::AtMostOnce, false, "hi")
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match second.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => return p.payload,
                Ok(_) => {}
                Err(e) => panic!("second connection failed: {e}"),
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(&got[..], b"hi");
    assert!(
        server.wait_for_log("taken over by a newer connection", Duration::from_secs(3)),
        "{:?}",
        server.log()
    );
}

#[tokio::test]
async fn a_connection_ends_when_its_certificate_expires() {
    let (_tmp, server) = start();
    let admin = server.admin();
    let dir = tempfile::tempdir().unwrap();
    let (key, csr) = pki::csr("short");
    let enrolled: Value = admin
        .post(
            "/v1/devices",
            &json!({"id": "short", "csr": csr, "lifetime_seconds": 3}),
        )
        .await
        .unwrap();
    std::fs::write(
        dir.path().join("short.crt"),
        enrolled["chain_pem"].as_str().unwrap(),
    )
    .unwrap();
    std::fs::write(dir.path().join("short.key"), key.serialize_pem()).unwrap();
    std::fs::write(
        dir.path().join("ca.crt"),
        enrolled["ca_pem"].as_str().unwrap(),
    )
    .unwrap();
    let creds = Creds::in_dir(dir.path(), "short");
    let (_c, mut l) = client(server.mqtt, &creds, "short");
    connected(&mut l).await;
    let started = Instant::now();
    let closed = until_closed(&mut l, Duration::from_secs(8)).await;
    assert!(closed.is_some(), "still connected after expiry");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        server.wait_for_log("certificate expired mid-session", Duration::from_secs(3)),
        "{:?}",
        server.log()
    );
}

#[tokio::test]
async fn bad_mqtt_input_is_refused_and_the_server_stays_up() {
    let tmp = tempfile::tempdir().unwrap();
    let server =
        Server::start_with(&tmp.path().join("data"), &["--max-packet-size", "1024"]).unwrap();
    let dev = server.enroll(tmp.path(), "device", "dev-1");
    let config = dev.client_config();

    // Garbage instead of CONNECT, an HTTP request, a truncated CONNECT, a
    // CONNECT for MQTT 3.1 (protocol level 3): each closes without CONNACK.
    let mut v3 = connect_packet("dev-1");
    v3[8] = 3;
    let connect = connect_packet("dev-1");
    for bytes in [
        b"\xff\xff\xff\xff\xff".to_vec(),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        v3,
        connect[..connect.len() - 2].to_vec(),
    ] {
        let r = probe(server.mqtt, config.clone(), &bytes).await;
        assert!(
            matches!(&r, Ok(b) if b.is_empty()) || r.is_err(),
            "{bytes:?} got {r:?}"
        );
    }
    // A good CONNECT then a malformed packet, and an oversized one.
    for tail in [
        vec![0x30, 0x02, 0x00, 0x05], // PUBLISH whose topic is longer than the packet
        {
            let mut p = vec![0x30, 0x80, 0x10]; // PUBLISH of 2048 bytes > 1024
            p.extend(std::iter::repeat_n(0u8, 2048));
            p
        },
    ] {
        let mut bytes = connect_packet("dev-1");
        bytes.extend(tail);
        let r = probe(server.mqtt, config.clone(), &bytes).await.unwrap();
        assert_eq!(&r[..2], &[0x20, 0x02], "CONNACK first: {r:?}");
        assert_eq!(r.len(), 4, "then the connection is closed: {r:?}");
    }
    // Packets only a server sends, from a client: on MQTT 5 a CONNACK or
    // UNSUBACK with a payload made rumqttd's decoder panic (found by the
    // fuzzer); now a protocol error like any other.
    let v5_connect = {
        let id = b"dev-1";
        let mut body = vec![
            0x00, 0x04, b'M', b'Q', b'T', b'T', 5, 0x02, 0x00, 0x1e, 0x00,
        ];
        body.extend_from_slice(&[0x00, id.len() as u8]);
        body.extend_from_slice(id);
        let mut p = vec![0x10, body.len() as u8];
        p.extend(body);
        p
    };
    for tail in [
        [0x20u8, 0x03, 0x00, 0x00, 0x00],
        [0xb0, 0x03, 0x00, 0x01, 0x00],
    ] {
        let mut bytes = v5_connect.clone();
        bytes.extend(tail);
        let r = probe(server.mqtt, config.clone(), &bytes).await.unwrap();
        assert_eq!(r[0], 0x20, "CONNACK first: {r:?}");
        // Then DISCONNECT (MQTT 5: protocol error) and the end.
        assert!(r.windows(3).any(|w| w[0] == 0xe0 && w[2] == 0x82), "{r:?}");
    }
    // Still serving.
    let (_c, mut l) = client(server.mqtt, &dev, "dev-1");
    connected(&mut l).await;
    let log = server.log().join("\n");
    assert!(!log.contains("panicked"), "{log}");
    assert!(
        server.wait_for_log("reason=\"protocol\"", std::time::Duration::from_secs(3)),
        "{log}"
    );
}

#[tokio::test]
async fn server_certificate_renewal_applies_to_new_handshakes_only() {
    let (tmp, server) = start();
    let dev = server.enroll(tmp.path(), "device", "dev-1");
    let (c, mut l) = client(server.mqtt, &dev, "dev-1");
    connected(&mut l).await;
    let before = server_cert_of(&server, &dev).await;
    let _: Value = server
        .admin()
        .post("/v1/server-certificate/renew", &json!({}))
        .await
        .unwrap();
    let after = server_cert_of(&server, &dev).await;
    assert_ne!(before, after, "new handshakes see the new certificate");
    // The open connection carries on.
    c.subscribe("devices/dev-1/#", QoS::AtMostOnce)
        .await
        .unwrap();
    let ok = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match l.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    })
    .await
    .unwrap();
    assert!(ok);
}

async fn server_cert_of(server: &Server, c: &Creds) -> Vec<u8> {
    let tcp = tokio::net::TcpStream::connect(server.mqtt).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(c.client_config());
    let name = rustls_pki_types::ServerName::IpAddress(server.mqtt.ip().into());
    let tls = connector.connect(name, tcp).await.unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[test]
fn sigterm_closes_connections_and_exits_cleanly() {
    let (tmp, server) = start();
    let dev = server.enroll(tmp.path(), "device", "dev-1");
    let mut sub = tests::Subscriber::spawn(server.mosquitto("mosquitto_sub", &dev).args([
        "-V",
        "mqttv5",
        "-t",
        "devices/dev-1/#",
        "-W",
        "60",
    ]));
    let status = server.terminate();
    assert!(status.success(), "{status}");
    assert!(
        sub.exits(Duration::from_secs(10)),
        "subscriber was not disconnected by shutdown"
    );
}

/// Shutdown reaches a session as a kick: an MQTT 5 client hears
/// DISCONNECT 0x8B (server shutting down) with its reason, not a bare
/// close when the process ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_tells_an_mqtt5_client_the_server_is_shutting_down() {
    use rumqttc::v5::mqttbytes::v5::{DisconnectReasonCode, Packet as P5};
    use rumqttc::v5::{AsyncClient as C5, Event as E5, MqttOptions as O5};
    let (tmp, server) = start();
    let d = server.enroll(tmp.path(), "device", "d-1");
    let mut opts = O5::new("d-1", server.mqtt.ip().to_string(), server.mqtt.port());
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(d.client_config()),
    ));
    let (c, mut ev) = C5::new(opts, 16);
    c.subscribe(
        "devices/d-1/commands/#",
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
    )
    .await
    .unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ev.poll()).await {
            Ok(Ok(E5::Incoming(P5::SubAck(_)))) => break,
            Ok(Ok(_)) => {}
            other => panic!("no SUBACK: {other:?}"),
        }
    }
    let stopped = tokio::task::spawn_blocking(move || server.terminate());
    // rumqttc hands a server's DISCONNECT over as the error that ends
    // its connection.
    let (code, why) = loop {
        match tokio::time::timeout(Duration::from_secs(10), ev.poll()).await {
            Ok(Err(rumqttc::v5::ConnectionError::MqttState(
                rumqttc::v5::StateError::ServerDisconnect {
                    reason_code,
                    reason_string,
                },
            ))) => break (reason_code, reason_string),
            Ok(Ok(E5::Incoming(P5::Disconnect(d)))) => {
                break (d.reason_code, d.properties.and_then(|p| p.reason_string))
            }
            Ok(Ok(_)) => {}
            other => panic!("no DISCONNECT before the connection ended: {other:?}"),
        }
    };
    assert_eq!(code, DisconnectReasonCode::ServerShuttingDown);
    assert_eq!(why.as_deref(), Some("the server is shutting down"));
    let status = stopped.await.unwrap();
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn prometheus_metrics_count_sessions_and_refusals() {
    require_tool("curl");
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start_with(
        &tmp.path().join("data"),
        &["--metrics-listen", "127.0.0.1:0"],
    )
    .unwrap();
    let dev = server.enroll(tmp.path(), "device", "dev-1");
    let gone = server.enroll(tmp.path(), "device", "gone");
    server.cli_ok(&["device", "revoke", "gone"]);
    let (_c, mut l) = client(server.mqtt, &dev, "dev-1");
    connected(&mut l).await;
    let (_g, mut refused) = client(server.mqtt, &gone, "gone");
    let _ = until_closed(&mut refused, Duration::from_secs(5)).await;

    let url = format!(
        "http://{}/metrics",
        server.metrics.expect("metrics address")
    );
    let (ok, text) = tests::run(Command::new("curl").args(["-sS", &url]));
    assert!(ok, "{text}");
    assert!(
        text.contains("# TYPE fleetgate_refusals_total counter"),
        "{text}"
    );
    assert!(text.contains("fleetgate_mqtt_sessions 1\n"), "{text}");
    // admin, dev-1, gone
    assert!(text.contains("fleetgate_devices 3\n"), "{text}");
    let revoked: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("fleetgate_refusals_total{reason=\"revoked\"} "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(revoked >= 1, "{text}");
}

/// `--log-format json`: every log line one JSON object, with the event's
/// fields and the connection's span (device id, peer address), as a log
/// shipper reads them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_can_be_json_one_object_a_line() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start_with(&tmp.path().join("data"), &["--log-format", "json"]).unwrap();
    let dev = server.enroll(&tmp.path().join("c"), "device", "json-1");
    let (ok, _) = tests::run(server.mosquitto("mosquitto_pub", &dev).args([
        "-t",
        "devices/someone-else/x",
        "-m",
        "1",
    ]));
    assert!(ok);
    assert!(server.wait_for_log("mqtt: disconnected", std::time::Duration::from_secs(5)));
    let lines = server.log();
    let events: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let refusal = events
        .iter()
        .find(|e| e["fields"]["message"] == "mqtt: disconnected")
        .unwrap();
    assert_eq!(refusal["level"], "WARN", "{refusal}");
    assert_eq!(refusal["fields"]["reason"], "acl", "{refusal}");
    assert_eq!(refusal["spans"][0]["device.id"], "json-1", "{refusal}");
    assert!(refusal["timestamp"].as_str().is_some(), "{refusal}");
}

/// What `openssl s_client -brief` says of a connection to the broker's
/// MQTT listener as `creds`, given `args`: its protocol and cipher suite,
/// once the handshake is done, when it then sends an MQTT CONNECT (and
/// leaves). Bounded: a client never answered is cut off.
fn s_client(server: &Server, creds: &Creds, args: &[&str]) -> String {
    let mut args = args.to_vec();
    args.push("-brief");
    s_client_sending(server, creds, &args, &connect_packet(&creds.id))
}

/// `s_client` as `creds` with `args`, sending `bytes` once connected:
/// all it printed.
fn s_client_sending(server: &Server, creds: &Creds, args: &[&str], bytes: &[u8]) -> String {
    use std::io::Write;
    let mut child = Command::new("timeout")
        .args(["20", "openssl", "s_client", "-connect"])
        .arg(server.mqtt.to_string())
        .arg("-CAfile")
        .arg(&creds.ca)
        .arg("-cert")
        .arg(&creds.cert)
        .arg("-key")
        .arg(&creds.key)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(bytes).unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let mut said = String::from_utf8_lossy(&out.stdout).into_owned();
    said.push_str(&String::from_utf8_lossy(&out.stderr));
    said
}

/// A device that keeps its TLS 1.3 session ticket resumes with it, as the
/// README says `openssl s_client -sess_out` and `-sess_in` show (that
/// any device of a fleet can: `security.rs`).
#[test]
fn openssl_resumes_its_session_with_the_ticket_it_kept() {
    require_tool("openssl");
    require_tool("timeout");
    let (tmp, server) = start();
    let dev = server.enroll(tmp.path(), "device", "tls-2");
    let session = tmp.path().join("session.pem");
    let session = session.to_str().unwrap();
    // CONNECT, then DISCONNECT: the broker answers and closes, and
    // s_client (not leaving at its input's end) reads all of it.
    let mut bytes = connect_packet("tls-2");
    bytes.extend_from_slice(&[0xe0, 0x00]);
    let first = s_client_sending(&server, &dev, &["-ign_eof", "-sess_out", session], &bytes);
    assert!(first.contains("New, TLSv1.3"), "{first}");
    let again = s_client_sending(&server, &dev, &["-ign_eof", "-sess_in", session], &bytes);
    assert!(again.contains("Reused, TLSv1.3"), "{again}");
}

/// Devices on TLS 1.2 connect: a client that sends its CONNECT only once
/// its handshake is done gets the server's Finished, which the server
/// writes after it has verified the client's certificate, while the
/// server waits for that CONNECT (it was held back for the CONNACK, and
/// went only when the server gave up on the client). And the server's
/// cipher suite order decides: AES-128-GCM, which clients put after
/// AES-256, unless a client puts ChaCha20 first (no AES in hardware), and
/// AES-256 still for a client that offers nothing else.
#[test]
fn tls_1_2_clients_connect_and_the_server_prefers_aes_128_gcm() {
    require_tool("openssl");
    require_tool("timeout");
    let (tmp, server) = start();
    let dev = server.enroll(tmp.path(), "device", "tls-1");
    let cases: [(&[&str], &str, &str); 6] = [
        (&[], "TLSv1.3", "TLS_AES_128_GCM_SHA256"),
        (
            &[
                "-ciphersuites",
                "TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256",
            ],
            "TLSv1.3",
            "TLS_AES_128_GCM_SHA256",
        ),
        (
            &[
                "-ciphersuites",
                "TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256",
            ],
            "TLSv1.3",
            "TLS_CHACHA20_POLY1305_SHA256",
        ),
        (
            &["-ciphersuites", "TLS_AES_256_GCM_SHA384"],
            "TLSv1.3",
            "TLS_AES_256_GCM_SHA384",
        ),
        (&["-tls1_2"], "TLSv1.2", "ECDHE-ECDSA-AES128-GCM-SHA256"),
        (
            &[
                "-tls1_2",
                "-cipher",
                "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES128-GCM-SHA256",
            ],
            "TLSv1.2",
            "ECDHE-ECDSA-CHACHA20-POLY1305",
        ),
    ];
    let connects = |server: &Server| {
        server
            .log()
            .iter()
            .filter(|l| l.contains("device.id=tls-1") && l.contains("mqtt: connected"))
            .count()
    };
    for (n, (args, version, suite)) in cases.into_iter().enumerate() {
        let said = s_client(&server, &dev, args);
        assert!(
            said.contains("CONNECTION ESTABLISHED")
                && said.contains(&format!("Protocol version: {version}"))
                && said.contains(&format!("Ciphersuite: {suite}")),
            "s_client {args:?}: expected {version} {suite}: {said}"
        );
        // Its CONNECT reached the broker, which admitted it.
        tests::eventually(
            Duration::from_secs(10),
            "the CONNECT sent after the handshake",
            || (connects(&server) > n).then_some(()),
        );
    }
    let log = server.log().join("\n");
    assert!(!log.contains("closed before CONNECT"), "{log}");
}
