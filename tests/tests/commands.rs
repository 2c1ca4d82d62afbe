//! Commands to devices (issue 12): services publish to
//! `devices/<id>/commands/...`, and the device's own session delivers them,
//! at min(published, granted) QoS, within its Receive Maximum, exactly once
//! at QoS 2, and, for a persistent session, from a durable queue that
//! survives the device being away and the server being killed.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::process::Command;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, Packet, QoS};
use tests::mqtt::connected;
use tests::{require_tool, run, Creds, Server};

/// mosquitto_pub/_sub's options to present `c` and trust its CA.
fn tls_args(c: &Creds) -> Vec<String> {
    vec![
        "--cafile".to_owned(),
        c.ca.display().to_string(),
        "--cert".to_owned(),
        c.cert.display().to_string(),
        "--key".to_owned(),
        c.key.display().to_string(),
    ]
}

/// A service's command with stock `mosquitto_pub`: `(exit ok, output)`.
fn command(server: &Server, svc: &Creds, args: &[&str]) -> (bool, String) {
    require_tool("mosquitto_pub");
    run(Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &server.mqtt.port().to_string()])
        .args(tls_args(svc))
        .args(["-i", &svc.id])
        .args(args))
}

/// A 3.1.1 device client; `clean` false keeps its session.
fn device(server: &Server, c: &Creds, clean: bool) -> (AsyncClient, EventLoop) {
    let mut opts = tests::mqtt::options(server.mqtt, c, &c.id);
    opts.set_clean_session(clean);
    AsyncClient::new(opts, 16)
}

/// The next CONNACK's session-present flag.
async fn session_present(ev: &mut EventLoop) -> bool {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ev.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(a)))) => return a.session_present,
            Ok(Ok(_)) => {}
            other => panic!("no CONNACK: {other:?}"),
        }
    }
}

/// Polls until a SUBACK.
async fn subscribed(ev: &mut EventLoop) -> Vec<rumqttc::SubscribeReasonCode> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ev.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(a)))) => return a.return_codes,
            Ok(Ok(_)) => {}
            other => panic!("no SUBACK: {other:?}"),
        }
    }
}

/// The PUBLISHes that arrive within `quiet` of each other.
async fn publishes(ev: &mut EventLoop, quiet: Duration) -> Vec<rumqttc::Publish> {
    let mut got = Vec::new();
    while let Ok(r) = tokio::time::timeout(quiet, ev.poll()).await {
        match r {
            Ok(Event::Incoming(Packet::Publish(p))) => got.push(p),
            Ok(_) => {}
            Err(e) => panic!("device connection failed: {e}"),
        }
    }
    got
}

/// `d` connected and subscribed to its commands at `qos`.
async fn listening(server: &Server, d: &Creds, clean: bool, qos: QoS) -> (AsyncClient, EventLoop) {
    let (c, mut ev) = device(server, d, clean);
    connected(&mut ev).await;
    c.subscribe(format!("devices/{}/commands/#", d.id), qos)
        .await
        .unwrap();
    subscribed(&mut ev).await;
    (c, ev)
}

/// Subscribes a persistent session of `d` to its commands, then leaves.
async fn subscribe_and_leave(server: &Server, d: &Creds, qos: QoS) {
    let (c, mut ev) = listening(server, d, false, qos).await;
    c.disconnect().await.unwrap();
    while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), ev.poll()).await {}
}

fn queued(server: &Server, id: &str) -> u64 {
    server.device_json(id)["queued_commands"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_device_gets_its_commands_after_reconnecting_even_across_kill_9() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = Server::start(&data).unwrap();
    let svc = server.enroll(&tmp.path().join("s"), "service", "backend");
    let d = server.enroll(&tmp.path().join("d"), "device", "d-1");
    subscribe_and_leave(&server, &d, QoS::AtLeastOnce).await;

    // Acknowledged by the broker with the device away: stored.
    for n in ["one", "two", "three"] {
        let (ok, out) = command(
            &server,
            &svc,
            &["-t", "devices/d-1/commands/set", "-q", "1", "-m", n],
        );
        assert!(ok, "{out}");
    }
    // QoS 0 commands are not kept for an absent device.
    let (ok, out) = command(
        &server,
        &svc,
        &["-t", "devices/d-1/commands/set", "-q", "0", "-m", "lost"],
    );
    assert!(ok, "{out}");
    assert_eq!(queued(&server, "d-1"), 3);

    // kill -9: what was acknowledged is on disk.
    server.kill9();
    let server = Server::start(&data).unwrap();
    assert_eq!(queued(&server, "d-1"), 3);

    let (c, mut ev) = device(&server, &d, false);
    assert!(session_present(&mut ev).await, "the session survived");
    let got = publishes(&mut ev, Duration::from_secs(2)).await;
    let payloads: Vec<&[u8]> = got.iter().map(|p| &p.payload[..]).collect();
    assert_eq!(payloads, [&b"one"[..], b"two", b"three"], "in order, once");
    assert!(got.iter().all(|p| p.qos == QoS::AtLeastOnce));
    // Acknowledged by the device (rumqttc acks as it polls): gone.
    c.disconnect().await.unwrap();
    while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), ev.poll()).await {}
    assert_eq!(queued(&server, "d-1"), 0);
    let (_c, mut ev) = device(&server, &d, false);
    assert!(session_present(&mut ev).await);
    assert!(
        publishes(&mut ev, Duration::from_secs(1)).await.is_empty(),
        "delivered once"
    );

    // A clean session ends the stored one: nothing is kept for it after.
    drop(ev);
    let (_c, mut ev) = device(&server, &d, true);
    assert!(!session_present(&mut ev).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_and_revocation_empties_it() {
    let tmp = tempfile::tempdir().unwrap();
    let server =
        Server::start_with(&tmp.path().join("data"), &["--command-queue-max", "2"]).unwrap();
    let svc = server.enroll(&tmp.path().join("s"), "service", "backend");
    let d = server.enroll(&tmp.path().join("d"), "device", "d-1");
    subscribe_and_leave(&server, &d, QoS::AtLeastOnce).await;

    for n in ["1", "2"] {
        let (ok, out) = command(
            &server,
            &svc,
            &[
                "-V",
                "5",
                "-t",
                "devices/d-1/commands/x",
                "-q",
                "1",
                "-m",
                n,
            ],
        );
        assert!(ok, "{out}");
    }
    // MQTT 5: PUBACK 0x97, quota exceeded, with the reason.
    let (_, out) = command(
        &server,
        &svc,
        &[
            "-V",
            "5",
            "-t",
            "devices/d-1/commands/x",
            "-q",
            "1",
            "-m",
            "3",
            "-d",
        ],
    );
    assert!(
        out.contains("rc151") || out.contains("(151)") || out.to_lowercase().contains("quota"),
        "mosquitto_pub must see quota exceeded: {out}"
    );
    // 3.1.1 has no reason codes: dropped, logged and counted.
    let (ok, out) = command(
        &server,
        &svc,
        &["-t", "devices/d-1/commands/x", "-q", "1", "-m", "4"],
    );
    assert!(ok, "{out}");
    assert!(
        server.wait_for_log("command queue is full", Duration::from_secs(3)),
        "{:?}",
        server.log()
    );
    assert_eq!(queued(&server, "d-1"), 2);

    // Revocation: the queue goes with the device.
    server.cli_ok(&["device", "revoke", "d-1"]);
    assert_eq!(queued(&server, "d-1"), 0);
    // And nothing is kept for it from now on.
    let (_, out) = command(
        &server,
        &svc,
        &[
            "-V",
            "5",
            "-t",
            "devices/d-1/commands/x",
            "-q",
            "1",
            "-m",
            "5",
            "-d",
        ],
    );
    assert_eq!(queued(&server, "d-1"), 0, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos2_command_arrives_exactly_once_with_mosquitto_sub() {
    require_tool("mosquitto_sub");
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data")).unwrap();
    let svc = server.enroll(&tmp.path().join("s"), "service", "backend");
    let d = server.enroll(&tmp.path().join("d"), "device", "d-1");
    let sub = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &server.mqtt.port().to_string()])
        .args(tls_args(&d))
        .args([
            "-i",
            "d-1",
            "-q",
            "2",
            "-v",
            "-W",
            "6",
            "-t",
            "devices/d-1/commands/#",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The subscription is in place once the device's session is.
    tests::eventually(Duration::from_secs(5), "d-1's session", || {
        server
            .log()
            .iter()
            .any(|l| l.contains("mqtt: connected") && l.contains("d-1"))
            .then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));
    for n in ["first", "second"] {
        let (ok, out) = command(
            &server,
            &svc,
            &["-t", "devices/d-1/commands/run", "-q", "2", "-m", n],
        );
        assert!(ok, "{out}");
    }
    let out = sub.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        [
            "devices/d-1/commands/run first",
            "devices/d-1/commands/run second"
        ],
        "each exactly once: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receive_maximum_one_means_one_command_in_flight() {
    use rumqttc::v5::mqttbytes::v5::Packet as P5;
    use rumqttc::v5::mqttbytes::QoS as Q5;
    use rumqttc::v5::{AsyncClient as C5, Event as E5, MqttOptions as O5};
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data")).unwrap();
    let svc = server.enroll(&tmp.path().join("s"), "service", "backend");
    let d = server.enroll(&tmp.path().join("d"), "device", "d-1");

    let mut opts = O5::new("d-1", server.mqtt.ip().to_string(), server.mqtt.port());
    opts.set_keep_alive(Duration::from_secs(10));
    opts.set_receive_maximum(Some(1));
    opts.set_manual_acks(true);
    opts.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(d.client_config()),
    ));
    let (c, mut ev) = C5::new(opts, 16);
    c.subscribe("devices/d-1/commands/#", Q5::AtLeastOnce)
        .await
        .unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ev.poll()).await {
            Ok(Ok(E5::Incoming(P5::SubAck(_)))) => break,
            Ok(Ok(_)) => {}
            other => panic!("no SUBACK: {other:?}"),
        }
    }
    for n in ["a", "b", "c"] {
        let (ok, out) = command(
            &server,
            &svc,
            &["-t", "devices/d-1/commands/x", "-q", "1", "-m", n],
        );
        assert!(ok, "{out}");
    }
    let mut got = Vec::new();
    for _ in 0..3 {
        // One arrives...
        let p = loop {
            match tokio::time::timeout(Duration::from_secs(10), ev.poll()).await {
                Ok(Ok(E5::Incoming(P5::Publish(p)))) => break p,
                Ok(Ok(_)) => {}
                other => panic!("no command: {other:?}"),
            }
        };
        // ...and no other while it is unacknowledged.
        let quiet = tokio::time::timeout(Duration::from_millis(700), async {
            loop {
                if let Ok(E5::Incoming(P5::Publish(p))) = ev.poll().await {
                    return p;
                }
            }
        })
        .await;
        assert!(quiet.is_err(), "a second command in flight: {quiet:?}");
        got.push(p.payload.clone());
        c.ack(&p).await.unwrap();
    }
    assert_eq!(got, ["a", "b", "c"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos0_command_reaches_a_qos1_subscriber_at_qos0() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data")).unwrap();
    let svc = server.enroll(&tmp.path().join("s"), "service", "backend");
    let d = server.enroll(&tmp.path().join("d"), "device", "d-1");
    let (_c, mut ev) = listening(&server, &d, true, QoS::AtLeastOnce).await;
    let (ok, out) = command(
        &server,
        &svc,
        &["-t", "devices/d-1/commands/x", "-q", "0", "-m", "zero"],
    );
    assert!(ok, "{out}");
    let (ok, out) = command(
        &server,
        &svc,
        &["-t", "devices/d-1/commands/x", "-q", "1", "-m", "one"],
    );
    assert!(ok, "{out}");
    let got = publishes(&mut ev, Duration::from_secs(2)).await;
    let seen: Vec<(&[u8], QoS)> = got.iter().map(|p| (&p.payload[..], p.qos)).collect();
    assert_eq!(
        seen,
        [
            (&b"zero"[..], QoS::AtMostOnce),
            (&b"one"[..], QoS::AtLeastOnce)
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_command_waits_for_the_devices_subscription() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data")).unwrap();
    let svc = server.enroll(&tmp.path().join("s"), "service", "backend");
    let d = server.enroll(&tmp.path().join("d"), "device", "d-1");
    // Nobody subscribed yet: kept as the topic's retained message.
    let (ok, out) = command(
        &server,
        &svc,
        &[
            "-t",
            "devices/d-1/commands/cfg",
            "-q",
            "1",
            "-r",
            "-m",
            "on",
        ],
    );
    assert!(ok, "{out}");
    let (c, mut ev) = device(&server, &d, true);
    connected(&mut ev).await;
    c.subscribe("devices/d-1/commands/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    let got = publishes(&mut ev, Duration::from_secs(2)).await;
    let seen: Vec<(&[u8], bool)> = got.iter().map(|p| (&p.payload[..], p.retain)).collect();
    assert_eq!(
        seen,
        [(&b"on"[..], true)],
        "delivered on subscribe, flagged retained"
    );
    // A retained command to a subscribed device is forwarded as a plain
    // message (retain as published is off), and replaces the stored one.
    let (ok, out) = command(
        &server,
        &svc,
        &[
            "-t",
            "devices/d-1/commands/cfg",
            "-q",
            "1",
            "-r",
            "-m",
            "off",
        ],
    );
    assert!(ok, "{out}");
    let got = publishes(&mut ev, Duration::from_secs(2)).await;
    let seen: Vec<(&[u8], bool)> = got.iter().map(|p| (&p.payload[..], p.retain)).collect();
    assert_eq!(seen, [(&b"off"[..], false)]);
    drop(ev);
    let (c, mut ev) = device(&server, &d, true);
    connected(&mut ev).await;
    c.subscribe("devices/d-1/commands/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    let got = publishes(&mut ev, Duration::from_secs(2)).await;
    assert_eq!(&got[0].payload[..], b"off");
}

/// Whether the server logged `what` of `id`'s session.
fn logged(server: &Server, id: &str, what: &str) -> bool {
    let who = format!("device.id={id} ");
    server
        .log()
        .iter()
        .any(|l| l.contains(&who) && l.contains(what))
}

/// Whether `id`'s session settled and moved.
fn moved(server: &Server, id: &str) -> bool {
    logged(server, id, "moves to the session runtime")
}

/// A session still open when it settles (`--session-settle-ms`) moves to
/// the session runtime and goes on there: a command reaches it, its
/// telemetry reaches a service, a revocation cuts it. A client that
/// connects, publishes and leaves within the settling time never moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_settles_moves_to_the_session_runtime_and_goes_on_there() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start_with(
        &tmp.path().join("data"),
        &[
            "--session-settle-ms",
            "3000",
            "--log-level",
            "info,fleetgate_mqtt::mqtt::session=debug",
        ],
    )
    .unwrap();
    let svc = server.enroll(&tmp.path().join("s"), "service", "backend");
    let d = server.enroll(&tmp.path().join("d"), "device", "d-1");
    let quick = server.enroll(&tmp.path().join("q"), "device", "d-quick");

    // The service hands on what it gets.
    let (s, mut sev) = AsyncClient::new(tests::mqtt::options(server.mqtt, &svc, "backend"), 16);
    connected(&mut sev).await;
    s.subscribe("devices/+/telemetry", QoS::AtLeastOnce)
        .await
        .unwrap();
    subscribed(&mut sev).await;
    let (tx, mut got) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(e) = sev.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = e {
                let _ = tx.send(String::from_utf8_lossy(&p.payload).into_owned());
            }
        }
    });

    let (c, mut ev) = listening(&server, &d, true, QoS::AtLeastOnce).await;
    tests::until(
        Duration::from_secs(15),
        "d-1 and backend on the session runtime",
        || async { (moved(&server, "d-1") && moved(&server, "backend")).then_some(()) },
    )
    .await;

    // On the session runtime: a command in, telemetry out.
    s.publish("devices/d-1/commands/set", QoS::AtLeastOnce, false, "go")
        .await
        .unwrap();
    let commands = publishes(&mut ev, Duration::from_secs(2)).await;
    assert_eq!(
        commands.iter().map(|p| &p.payload[..]).collect::<Vec<_>>(),
        [&b"go"[..]]
    );
    c.publish("devices/d-1/telemetry", QoS::AtLeastOnce, false, "after")
        .await
        .unwrap();
    let _ = publishes(&mut ev, Duration::from_millis(300)).await;
    let next = tokio::time::timeout(Duration::from_secs(10), got.recv()).await;
    assert_eq!(next.unwrap().as_deref(), Some("after"));

    // In and out within the settling time: served where its handshake ran.
    let (ok, out) = run(Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &server.mqtt.port().to_string()])
        .args(tls_args(&quick))
        .args(["-q", "1", "-t", "devices/d-quick/telemetry", "-m", "quick"]));
    assert!(ok, "{out}");
    let next = tokio::time::timeout(Duration::from_secs(10), got.recv()).await;
    assert_eq!(next.unwrap().as_deref(), Some("quick"));
    tests::until(Duration::from_secs(10), "d-quick disconnected", || async {
        logged(&server, "d-quick", "mqtt: disconnected").then_some(())
    })
    .await;
    assert!(!moved(&server, "d-quick"), "{:#?}", server.log());

    // And a revocation cuts the moved session.
    server.cli_ok(&["device", "revoke", "d-1", "--reason", "key-compromise"]);
    assert!(
        tests::mqtt::until_closed(&mut ev, Duration::from_secs(10))
            .await
            .is_some(),
        "the revoked device is still connected"
    );
}
