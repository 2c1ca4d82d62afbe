//! The message plane (issue 12, first part): the router cannot be crashed
//! by a client, device messages reach services stamped with the sender's
//! verified identity, and a forged identity does not get through.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::process::Command;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, Packet, QoS};
use tests::mqtt::{client, connected};
use tests::{require_tool, run, Creds, Server};

fn start() -> (tempfile::TempDir, Server) {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data")).unwrap();
    (tmp, server)
}

/// mosquitto_pub/_sub's options to present `c` and trust its CA.
fn tls_args(c: &Creds) -> [String; 6] {
    [
        "--cafile".to_owned(),
        c.ca.display().to_string(),
        "--cert".to_owned(),
        c.cert.display().to_string(),
        "--key".to_owned(),
        c.key.display().to_string(),
    ]
}

/// A 3.1.1 client with a persistent session and manual acknowledgements.
fn persistent(server: &Server, c: &Creds) -> (AsyncClient, EventLoop) {
    let mut opts = tests::mqtt::options(server.mqtt, c, &c.id);
    opts.set_clean_session(false);
    opts.set_manual_acks(true);
    AsyncClient::new(opts, 16)
}

/// Polls until a SUBACK; returns its return codes.
async fn suback(ev: &mut EventLoop) -> Vec<rumqttc::SubscribeReasonCode> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ev.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(a)))) => return a.return_codes,
            Ok(Ok(_)) => {}
            other => panic!("no SUBACK: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_shared_subscriber_cannot_crash_the_router() {
    let (tmp, server) = start();
    let dir = tmp.path();
    let svc = server.enroll(&dir.join("s"), "service", "backend");
    let d1 = server.enroll(&dir.join("d"), "device", "d-1");
    let d2 = server.enroll(&dir.join("d"), "device", "d-2");

    // rumqttd 0.20 panics its router thread when a persistent session,
    // alone in a share group, leaves with a QoS 1 delivery unacknowledged.
    let (sc, mut sev) = persistent(&server, &svc);
    connected(&mut sev).await;
    sc.subscribe("$share/g/devices/+/telemetry", QoS::AtLeastOnce)
        .await
        .unwrap();
    let codes = suback(&mut sev).await;
    let (dc, mut dev) = client(server.mqtt, &d1, "d-1");
    connected(&mut dev).await;
    dc.publish("devices/d-1/telemetry", QoS::AtLeastOnce, false, "21.5")
        .await
        .unwrap();
    let poll_device = tokio::spawn(async move {
        while tokio::time::timeout(Duration::from_secs(3), dev.poll())
            .await
            .is_ok_and(|r| r.is_ok())
        {}
    });
    // The service takes the delivery (if any) and never acknowledges it.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            if let Ok(Event::Incoming(Packet::Publish(_))) = sev.poll().await {
                return;
            }
        }
    })
    .await;
    drop(sev);
    drop(sc);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The router is alive: a new device gets in and its messages flow.
    let (_c2, mut ev2) = client(server.mqtt, &d2, "d-2");
    connected(&mut ev2).await;
    assert!(
        !server.log().iter().any(|l| l.contains("panicked")),
        "{:#?}",
        server.log()
    );
    // The refusal says why, and is the MQTT 3.1.1 failure code.
    assert_eq!(codes, [rumqttc::SubscribeReasonCode::Failure], "{codes:?}");
    assert!(server.wait_for_log(
        "shared subscriptions need a clean session",
        Duration::from_secs(5)
    ));
    poll_device.abort();

    // A clean session may share.
    let (c3, mut ev3) = client(server.mqtt, &svc, "backend");
    connected(&mut ev3).await;
    c3.subscribe("$share/g/devices/+/telemetry", QoS::AtLeastOnce)
        .await
        .unwrap();
    assert_eq!(
        suback(&mut ev3).await,
        [rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_messages_carry_the_verified_identity() {
    require_tool("mosquitto_sub");
    require_tool("mosquitto_pub");
    let (tmp, server) = start();
    let dir = tmp.path();
    let svc = server.enroll(&dir.join("s"), "service", "backend");
    let svc4 = server.enroll(&dir.join("s"), "service", "backend-4");
    let dev = server.enroll(&dir.join("d"), "device", "d-1");
    let host = server.mqtt.ip().to_string();
    let port = server.mqtt.port().to_string();
    // A service (MQTT 5) prints each message's user properties.
    let mut sub = Command::new("mosquitto_sub");
    sub.args(["-h", &host, "-p", &port, "-V", "5", "-C", "2", "-W", "20"])
        .args(tls_args(&svc))
        .args(["-t", "devices/+/telemetry", "-F", "%t %P %p"]);
    let sub = tests::Subscriber::spawn(&mut sub);
    // And a 3.1.1 service gets the same messages, without properties.
    let mut sub4 = Command::new("mosquitto_sub");
    sub4.args(["-h", &host, "-p", &port, "-C", "2", "-W", "20"])
        .args(tls_args(&svc4))
        .args(["-t", "devices/+/telemetry", "-F", "%t %p"]);
    let sub4 = tests::Subscriber::spawn(&mut sub4);
    // The device sends one plain message (3.1.1) and one (MQTT 5) with a
    // forged identity property.
    let (ok, out) = run(Command::new("mosquitto_pub")
        .args(["-h", &host, "-p", &port])
        .args(tls_args(&dev))
        .args(["-t", "devices/d-1/telemetry", "-m", "plain"]));
    assert!(ok, "{out}");
    let (ok, out) = run(Command::new("mosquitto_pub")
        .args(["-h", &host, "-p", &port, "-V", "5"])
        .args(tls_args(&dev))
        .args(["-t", "devices/d-1/telemetry", "-m", "forged"])
        .args([
            "-D",
            "publish",
            "user-property",
            "x-fleetgate-device-id",
            "d-2",
        ])
        .args(["-D", "publish", "user-property", "note", "kept"]));
    assert!(ok, "{out}");
    let (ok, out4, _) = sub4.finish();
    assert!(ok, "the 3.1.1 service: {out4}");
    assert_eq!(out4.lines().count(), 2, "{out4}");
    let (ok, out, _) = sub.finish();
    assert!(ok, "{out}");
    let fingerprint =
        provisioning::id::fingerprint(&fleetgate_api::tls::load_certs(&dev.cert).unwrap()[0]);
    let serial = provisioning::ca::inspect_certificate(
        &fleetgate_api::tls::load_certs(&dev.cert).unwrap()[0],
    )
    .unwrap()
    .serial
    .to_hex();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    for line in &lines {
        assert!(line.contains("x-fleetgate-device-id:d-1"), "{line}");
        assert!(
            line.contains(&format!("x-fleetgate-serial:{serial}")),
            "{line}"
        );
        assert!(
            line.contains(&format!("x-fleetgate-fingerprint:{fingerprint}")),
            "{line}"
        );
        assert!(
            !line.contains("d-2"),
            "a forged identity got through: {line}"
        );
    }
    assert!(lines[1].contains("note:kept"), "{out}");
}

/// An MQTT 5 CONNECT with a will on `topic` delayed `delay` seconds, and a
/// session expiry of 60 s (the will waits for the earlier of the two).
fn connect_with_will(id: &str, topic: &str, delay: u32) -> Vec<u8> {
    // Properties: Session Expiry Interval (0x11) = 60.
    let mut body = vec![
        0, 4, b'M', b'Q', b'T', b'T', 5, 0x06, 0, 30, 5, 0x11, 0, 0, 0, 60,
    ];
    body.extend_from_slice(&(id.len() as u16).to_be_bytes());
    body.extend_from_slice(id.as_bytes());
    // Will properties: Will Delay Interval (0x18).
    body.extend_from_slice(&[5, 0x18]);
    body.extend_from_slice(&delay.to_be_bytes());
    body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(&4u16.to_be_bytes());
    body.extend_from_slice(b"gone");
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend_from_slice(&body);
    packet
}

/// Connects `c` over MQTT 5 with a delayed will, reads CONNACK, then drops
/// the connection without DISCONNECT.
async fn vanish_with_will(server: &Server, c: &Creds, delay: u32) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(server.mqtt).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(c.client_config());
    let name = rustls_pki_types::ServerName::IpAddress(server.mqtt.ip().into());
    let mut tls = connector.connect(name, tcp).await.unwrap();
    tls.write_all(&connect_with_will(
        &c.id,
        &format!("devices/{}/status", c.id),
        delay,
    ))
    .await
    .unwrap();
    let mut buf = [0u8; 64];
    let n = tls.read(&mut buf).await.unwrap();
    assert!(
        n >= 4 && buf[0] == 0x20 && buf[3] == 0,
        "CONNACK: {:x?}",
        &buf[..n]
    );
    // Gone without a word: the TCP connection drops.
    drop(tls);
}

/// Waits up to `within` for a message on the watcher; when it came.
async fn will_seen(ev: &mut EventLoop, within: Duration) -> Option<std::time::Instant> {
    let deadline = tokio::time::Instant::now() + within;
    while let Ok(Ok(e)) = tokio::time::timeout_at(deadline, ev.poll()).await {
        if let Event::Incoming(Packet::Publish(p)) = e {
            assert_eq!(&p.payload[..], b"gone");
            return Some(std::time::Instant::now());
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_will_delay_is_honoured() {
    let (tmp, server) = start();
    let dir = tmp.path();
    let svc = server.enroll(&dir.join("s"), "service", "watcher");
    let dev = server.enroll(&dir.join("d"), "device", "w-1");
    let (wc, mut wev) = client(server.mqtt, &svc, "watcher");
    connected(&mut wev).await;
    wc.subscribe("devices/+/status", QoS::AtMostOnce)
        .await
        .unwrap();
    suback(&mut wev).await;

    // Gone for good: the will comes, but not before its 2 s delay.
    let gone = std::time::Instant::now();
    vanish_with_will(&server, &dev, 2).await;
    let seen = will_seen(&mut wev, Duration::from_secs(10))
        .await
        .expect("the will never came");
    let waited = seen - gone;
    assert!(
        waited >= Duration::from_millis(1900),
        "the will came after {waited:?}"
    );

    // Back within the delay: no will.
    vanish_with_will(&server, &dev, 3).await;
    let (_back, mut bev) = client(server.mqtt, &dev, "w-1");
    connected(&mut bev).await;
    assert!(
        will_seen(&mut wev, Duration::from_secs(5)).await.is_none(),
        "a will was sent although the device came back"
    );
    assert!(server.wait_for_log("came back within its will delay", Duration::from_secs(5)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_device_message_reaches_a_later_service_with_its_identity() {
    require_tool("mosquitto_sub");
    require_tool("mosquitto_pub");
    let (tmp, server) = start();
    let dir = tmp.path();
    let svc = server.enroll(&dir.join("s"), "service", "backend");
    let dev = server.enroll(&dir.join("d"), "device", "d-1");
    let (host, port) = (server.mqtt.ip().to_string(), server.mqtt.port().to_string());
    let (ok, out) = run(Command::new("mosquitto_pub")
        .args(["-h", &host, "-p", &port, "-q", "1", "-r"])
        .args(tls_args(&dev))
        .args(["-t", "devices/d-1/state", "-m", "on"]));
    assert!(ok, "{out}");
    // The service comes later, and still gets it: retained, stamped.
    let (ok, out) = run(Command::new("mosquitto_sub")
        .args(["-h", &host, "-p", &port, "-V", "5", "-C", "1", "-W", "10"])
        .args(tls_args(&svc))
        .args(["-t", "devices/+/state", "-F", "%t %r %P %p"]));
    assert!(ok, "{out}");
    let line = out.trim();
    assert!(line.starts_with("devices/d-1/state 1 "), "{line}");
    assert!(line.contains("x-fleetgate-device-id:d-1"), "{line}");
    assert!(line.ends_with(" on"), "{line}");
}

/// A 3.1.1 service that acknowledges by hand.
fn manual_service(server: &Server, c: &Creds) -> (AsyncClient, EventLoop) {
    let mut opts = tests::mqtt::options(server.mqtt, c, &c.id);
    opts.set_manual_acks(true);
    AsyncClient::new(opts, 16)
}

/// The next `n` PUBLISHes.
async fn next_publishes(ev: &mut EventLoop, n: usize) -> Vec<rumqttc::Publish> {
    let mut got = Vec::new();
    while got.len() < n {
        match tokio::time::timeout(Duration::from_secs(10), ev.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => got.push(p),
            Ok(Ok(_)) => {}
            other => panic!("{} of {n} messages, then {other:?}", got.len()),
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_get_min_qos_and_may_acknowledge_in_any_order() {
    let (tmp, server) = start();
    let dir = tmp.path();
    let svc = server.enroll(&dir.join("s"), "service", "backend");
    let d = server.enroll(&dir.join("d"), "device", "d-1");
    let (sc, mut sev) = manual_service(&server, &svc);
    connected(&mut sev).await;
    sc.subscribe("devices/+/telemetry", QoS::AtLeastOnce)
        .await
        .unwrap();
    suback(&mut sev).await;
    let (dc, mut dev) = client(server.mqtt, &d, "d-1");
    connected(&mut dev).await;
    let device = tokio::spawn(async move {
        while tokio::time::timeout(Duration::from_secs(8), dev.poll())
            .await
            .is_ok_and(|r| r.is_ok())
        {}
    });
    // A QoS 0 message reaches the QoS 1 subscription at QoS 0; QoS 1 at 1.
    dc.publish("devices/d-1/telemetry", QoS::AtMostOnce, false, "zero")
        .await
        .unwrap();
    for n in ["one", "two", "three"] {
        dc.publish("devices/d-1/telemetry", QoS::AtLeastOnce, false, n)
            .await
            .unwrap();
    }
    let got = next_publishes(&mut sev, 4).await;
    let seen: Vec<(&[u8], QoS)> = got.iter().map(|p| (&p.payload[..], p.qos)).collect();
    assert_eq!(
        seen,
        [
            (&b"zero"[..], QoS::AtMostOnce),
            (b"one", QoS::AtLeastOnce),
            (b"two", QoS::AtLeastOnce),
            (b"three", QoS::AtLeastOnce)
        ]
    );
    // Acknowledged last to first (MQTT allows it; rumqttd's router alone
    // would cut the client): the session keeps serving.
    for p in got.iter().rev() {
        sc.ack(p).await.unwrap();
    }
    dc.publish("devices/d-1/telemetry", QoS::AtLeastOnce, false, "four")
        .await
        .unwrap();
    let more = next_publishes(&mut sev, 1).await;
    assert_eq!(&more[0].payload[..], b"four");
    sc.ack(&more[0]).await.unwrap();
    device.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_will_goes_out_at_its_qos_and_retained() {
    let (tmp, server) = start();
    let dir = tmp.path();
    let svc = server.enroll(&dir.join("s"), "service", "watcher");
    let late = server.enroll(&dir.join("s"), "service", "late");
    let d = server.enroll(&dir.join("d"), "device", "d-1");
    let (sc, mut sev) = manual_service(&server, &svc);
    connected(&mut sev).await;
    sc.subscribe("devices/+/status", QoS::AtLeastOnce)
        .await
        .unwrap();
    suback(&mut sev).await;

    let mut opts = tests::mqtt::options(server.mqtt, &d, "d-1");
    opts.set_last_will(rumqttc::LastWill::new(
        "devices/d-1/status",
        "offline",
        QoS::AtLeastOnce,
        true,
    ));
    let (_dc, mut dev) = AsyncClient::new(opts, 16);
    connected(&mut dev).await;
    // Gone without DISCONNECT.
    drop(dev);

    let will = next_publishes(&mut sev, 1).await;
    assert_eq!(&will[0].payload[..], b"offline");
    assert_eq!(will[0].qos, QoS::AtLeastOnce, "the will's QoS");
    sc.ack(&will[0]).await.unwrap();
    // Retained: a service subscribing later gets it, flagged retained.
    let (lc, mut lev) = client(server.mqtt, &late, "late");
    connected(&mut lev).await;
    lc.subscribe("devices/d-1/status", QoS::AtLeastOnce)
        .await
        .unwrap();
    let got = next_publishes(&mut lev, 1).await;
    assert_eq!(&got[0].payload[..], b"offline");
    assert!(got[0].retain, "retained will");
}

/// CPU seconds the server's router thread (rumqttd's `router-0`) has used.
fn router_cpu(pid: u32) -> f64 {
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap().path();
        if std::fs::read_to_string(t.join("comm"))
            .unwrap_or_default()
            .trim()
            != "router-0"
        {
            continue;
        }
        let stat = std::fs::read_to_string(t.join("stat")).unwrap();
        let f: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
            .split_whitespace()
            .collect();
        let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        return ticks as f64 / 100.0;
    }
    panic!("no router thread in {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_goes_quiet_after_churn_and_a_stalled_subscriber() {
    use tokio::io::AsyncWriteExt;
    let (tmp, server) = start();
    let dir = tmp.path();
    let svc = server.enroll(&dir.join("s"), "service", "stalled");
    let watcher = server.enroll(&dir.join("s"), "service", "watcher");
    let devices: Vec<Creds> = (0..4)
        .map(|i| server.enroll(&dir.join("d"), "device", &format!("d-{i}")))
        .collect();

    // A service that subscribes at QoS 1 and then never reads again: its
    // socket fills, its session stops taking from the router, the router's
    // queue for it fills.
    let tcp = tokio::net::TcpStream::connect(server.mqtt).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(svc.client_config());
    let name = rustls_pki_types::ServerName::IpAddress(server.mqtt.ip().into());
    let mut stalled = connector.connect(name, tcp).await.unwrap();
    let id = b"stalled";
    let mut connect = vec![
        0x10,
        (12 + id.len()) as u8,
        0,
        4,
        b'M',
        b'Q',
        b'T',
        b'T',
        4,
        0x02,
        0,
        60,
    ];
    connect.extend_from_slice(&(id.len() as u16).to_be_bytes());
    connect.extend_from_slice(id);
    let filter = b"devices/+/telemetry";
    let mut subscribe = vec![0x82, (5 + filter.len()) as u8, 0, 1];
    subscribe.extend_from_slice(&(filter.len() as u16).to_be_bytes());
    subscribe.extend_from_slice(filter);
    subscribe.push(1);
    stalled.write_all(&connect).await.unwrap();
    stalled.write_all(&subscribe).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Churn: devices and a persistent service come and go, publishing.
    let payload = vec![b'x'; 2048];
    for round in 0..6 {
        // A persistent session that acknowledges as it reads.
        let mut opts = tests::mqtt::options(server.mqtt, &watcher, "watcher");
        opts.set_clean_session(false);
        let (wc, mut wev) = AsyncClient::new(opts, 16);
        connected(&mut wev).await;
        wc.subscribe("devices/#", QoS::AtLeastOnce).await.unwrap();
        suback(&mut wev).await;
        let watch = tokio::spawn(async move {
            while tokio::time::timeout(Duration::from_millis(500), wev.poll())
                .await
                .is_ok_and(|r| r.is_ok())
            {}
        });
        for d in &devices {
            let (c, mut ev) = client(server.mqtt, d, &d.id);
            connected(&mut ev).await;
            let driver = tokio::spawn(async move {
                while let Ok(Ok(_)) =
                    tokio::time::timeout(Duration::from_millis(500), ev.poll()).await
                {
                }
            });
            for _ in 0..50 {
                c.publish(
                    format!("devices/{}/telemetry", d.id),
                    QoS::AtLeastOnce,
                    false,
                    payload.clone(),
                )
                .await
                .unwrap();
            }
            c.disconnect().await.unwrap();
            driver.await.unwrap();
        }
        if round % 2 == 0 {
            wc.disconnect().await.unwrap();
        }
        watch.await.unwrap();
    }

    // Traffic has stopped: the router thread must be idle, not spinning
    // (a spin shows as a second of CPU per second).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = router_cpu(server.pid());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let used = router_cpu(server.pid()) - before;
    assert!(
        used < 0.5,
        "the router thread used {used:.2} s of CPU in 3 s of quiet"
    );
    drop(stalled);
}

/// An MQTT 5 CONNECT for `client` with clean start, keep-alive 60 s and a
/// will of `payload` to `topic`.
fn connect_v5_with_will(client: &str, topic: &str, payload: &str) -> Vec<u8> {
    let s = |b: &mut Vec<u8>, t: &[u8]| {
        b.extend_from_slice(&(t.len() as u16).to_be_bytes());
        b.extend_from_slice(t);
    };
    let mut body = Vec::new();
    s(&mut body, b"MQTT");
    body.extend_from_slice(&[5, 0x06, 0, 60, 0]); // level 5; will + clean start; no properties
    s(&mut body, client.as_bytes());
    body.push(0); // will properties
    s(&mut body, topic.as_bytes());
    s(&mut body, payload.as_bytes());
    let mut out = vec![0x10, u8::try_from(body.len()).unwrap()];
    out.extend_from_slice(&body);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnect_with_a_reason_code_alone_keeps_or_sends_the_will_as_it_says() {
    require_tool("mosquitto_sub");
    let (tmp, server) = start();
    let dir = tmp.path().join("c");
    let a = server.enroll(&dir, "device", "will-a");
    let b = server.enroll(&dir, "device", "will-b");
    let svc = server.enroll(&dir, "service", "will-svc");
    // Line-buffered, with -d: it says when its subscription is in place.
    let cmd = server.mosquitto("mosquitto_sub", &svc);
    let mut sub = Command::new("stdbuf")
        .arg("-oL")
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .args([
            "-d",
            "-V",
            "5",
            "-t",
            "devices/+/status",
            "-C",
            "1",
            "-W",
            "20",
            "-F",
            "%t %p",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(sub.stdout.take().unwrap()));
    for line in lines.by_ref() {
        if line.unwrap().contains("received SUBACK") {
            break;
        }
    }
    // e0 01 00: Normal Disconnection, reason code alone: no will.
    let mut bytes = connect_v5_with_will("will-a", "devices/will-a/status", "a-gone");
    bytes.extend_from_slice(&[0xe0, 0x01, 0x00]);
    tests::mqtt::probe(server.mqtt, a.client_config(), &bytes)
        .await
        .unwrap();
    // e0 01 04: Disconnect with Will Message: the will goes out.
    let mut bytes = connect_v5_with_will("will-b", "devices/will-b/status", "b-gone");
    bytes.extend_from_slice(&[0xe0, 0x01, 0x04]);
    tests::mqtt::probe(server.mqtt, b.client_config(), &bytes)
        .await
        .unwrap();
    let got: Vec<String> = lines
        .map_while(Result::ok)
        .filter(|l| l.starts_with("devices/"))
        .collect();
    assert_eq!(
        got,
        ["devices/will-b/status b-gone"],
        "the wills a service got"
    );
    let _ = sub.wait();
    for line in server.log() {
        assert!(!line.contains("malformed"), "{line}");
    }
}

/// `fleetgate_router_messages_total`, from the node's Prometheus endpoint.
fn router_messages(server: &Server) -> u64 {
    let url = format!("http://{}/metrics", server.metrics.expect("metrics"));
    let (ok, text) = run(Command::new("curl").args(["-sS", &url]));
    assert!(ok, "{text}");
    text.lines()
        .find_map(|l| l.strip_prefix("fleetgate_router_messages_total "))
        .unwrap_or_else(|| panic!("no router counter in {text}"))
        .trim()
        .parse()
        .unwrap()
}

/// Publishes `n` QoS 1 messages `<prefix>-<i>` from the device, each
/// acknowledged before the next.
async fn publish_acked(dc: &AsyncClient, dev: &mut EventLoop, prefix: &str, n: usize) {
    for i in 0..n {
        dc.publish(
            "devices/d-1/telemetry",
            QoS::AtLeastOnce,
            false,
            format!("{prefix}-{i}"),
        )
        .await
        .unwrap();
        loop {
            match tokio::time::timeout(Duration::from_secs(10), dev.poll()).await {
                Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => break,
                Ok(Ok(_)) => {}
                other => panic!("no PUBACK: {other:?}"),
            }
        }
    }
}

fn payloads(got: &[rumqttc::Publish]) -> Vec<String> {
    got.iter()
        .map(|p| String::from_utf8_lossy(&p.payload).into_owned())
        .collect()
}

/// Issue 28, goal 1: a live service that keeps nothing gets device
/// messages from the node's fanout, without rumqttd's router; the router
/// carries only what a persistent session (away, too) or a `$share` group
/// there may want, and those still get every message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_services_get_messages_without_the_router_and_persistent_ones_and_groups_through_it() {
    require_tool("curl");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let server =
        Server::start_with(&dir.join("data"), &["--metrics-listen", "127.0.0.1:0"]).unwrap();
    let live = server.enroll(&dir.join("s"), "service", "live");
    let kept = server.enroll(&dir.join("s"), "service", "kept");
    let worker = server.enroll(&dir.join("s"), "service", "worker");
    let d = server.enroll(&dir.join("d"), "device", "d-1");

    let (lc, mut lev) = client(server.mqtt, &live, "live");
    connected(&mut lev).await;
    lc.subscribe("devices/+/telemetry", QoS::AtLeastOnce)
        .await
        .unwrap();
    suback(&mut lev).await;
    let (dc, mut dev) = client(server.mqtt, &d, "d-1");
    connected(&mut dev).await;

    // Only a live service that keeps nothing: the router sees nothing.
    publish_acked(&dc, &mut dev, "a", 5).await;
    assert_eq!(
        payloads(&next_publishes(&mut lev, 5).await),
        ["a-0", "a-1", "a-2", "a-3", "a-4"]
    );
    assert_eq!(router_messages(&server), 0, "no subscription in the router");

    // A persistent session subscribes, then goes away: kept in the router.
    let (kc, mut kev) = persistent(&server, &kept);
    connected(&mut kev).await;
    kc.subscribe("devices/+/telemetry", QoS::AtLeastOnce)
        .await
        .unwrap();
    suback(&mut kev).await;
    kc.disconnect().await.unwrap();
    while tokio::time::timeout(Duration::from_secs(10), kev.poll())
        .await
        .is_ok_and(|r| r.is_ok())
    {}
    drop((kc, kev));

    publish_acked(&dc, &mut dev, "b", 5).await;
    assert_eq!(
        payloads(&next_publishes(&mut lev, 5).await),
        ["b-0", "b-1", "b-2", "b-3", "b-4"],
        "the live service, as before"
    );
    assert_eq!(router_messages(&server), 5, "the kept session's");
    // Back: what came while it was away, from the router.
    let (kc, mut kev) = persistent(&server, &kept);
    let got = next_publishes(&mut kev, 5).await;
    assert_eq!(payloads(&got), ["b-0", "b-1", "b-2", "b-3", "b-4"]);
    for p in &got {
        kc.ack(p).await.unwrap();
    }

    // A group member on this node: through the router too.
    let (wc, mut wev) = client(server.mqtt, &worker, "worker");
    connected(&mut wev).await;
    wc.subscribe("$share/g/devices/+/telemetry", QoS::AtLeastOnce)
        .await
        .unwrap();
    suback(&mut wev).await;
    publish_acked(&dc, &mut dev, "c", 3).await;
    assert_eq!(
        payloads(&next_publishes(&mut wev, 3).await),
        ["c-0", "c-1", "c-2"]
    );
    assert_eq!(
        payloads(&next_publishes(&mut lev, 3).await),
        ["c-0", "c-1", "c-2"]
    );
    assert_eq!(router_messages(&server), 8);
}

/// A device hears its own PUBLISH on its matching subscription, and, once
/// it has unsubscribed, no longer (the session remembers what matched the
/// last topic a device published to; an UNSUBSCRIBE and a SUBSCRIBE must
/// each forget it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_hears_its_own_messages_only_while_subscribed() {
    let (tmp, server) = start();
    let dev = server.enroll(&tmp.path().join("d"), "device", "d-1");
    let (c, mut ev) = client(server.mqtt, &dev, "d-1");
    connected(&mut ev).await;
    let (filter, topic) = ("devices/d-1/state/#", "devices/d-1/state/now");
    let turn = |c: AsyncClient, payload: &'static str| async move {
        c.publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    };
    c.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    assert_eq!(suback(&mut ev).await.len(), 1);
    turn(c.clone(), "one").await;
    assert_eq!(payloads(&next_publishes(&mut ev, 1).await), ["one"]);
    c.unsubscribe(filter).await.unwrap();
    // Not heard: had it been, it would come before "three", which is
    // published after the next SUBSCRIBE.
    turn(c.clone(), "two").await;
    c.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    turn(c.clone(), "three").await;
    assert_eq!(payloads(&next_publishes(&mut ev, 1).await), ["three"]);
}
