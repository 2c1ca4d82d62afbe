//! Messages across nodes on NATS JetStream (`serve --nats`): two fleetgate
//! nodes on one etcd registry and one message stream, mosquitto clients.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tests::etcd::Etcd;
use tests::nats::Nats;
use tests::{run, start_nodes, two_nodes, Server};

/// `mosquitto_sub` on `node` as `c` with `args`, once it has subscribed.
fn listen(node: &Server, c: &tests::Creds, args: &[&str]) -> tests::Subscriber {
    tests::Subscriber::spawn(node.mosquitto("mosquitto_sub", c).args(args))
}

#[test]
fn a_service_on_one_node_sees_devices_on_another_and_its_commands_reach_them() {
    let (tmp, _etcd, _nats, one, two) = two_nodes(&[]);
    let creds = tmp.path().join("c");
    let dev = one.enroll(&creds, "device", "dev-1");
    let svc = one.enroll(&creds, "service", "backend");

    // Telemetry: the device on node one, the service (MQTT 5) on node two.
    let sub = listen(
        &two,
        &svc,
        &[
            "-V",
            "mqttv5",
            "-t",
            "devices/+/telemetry",
            "-F",
            "%t %P %p",
            "-C",
            "4",
            "-W",
            "20",
        ],
    );
    let (ok, out) = run(one.mosquitto("mosquitto_pub", &dev).args([
        "-t",
        "devices/dev-1/telemetry",
        "-m",
        "q0",
    ]));
    assert!(ok, "{out}");
    // Three at QoS 1 on one connection, in order.
    let mut publ = one
        .mosquitto("mosquitto_pub", &dev)
        .args([
            "-V",
            "mqttv5",
            "-q",
            "1",
            "-t",
            "devices/dev-1/telemetry",
            "-l",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    publ.stdin.take().unwrap().write_all(b"a\nb\nc\n").unwrap();
    let done = publ.wait_with_output().unwrap();
    assert!(done.status.success(), "{done:?}");
    let out = sub.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "the service on node two got: {text:?}");
    let payloads: Vec<&str> = lines
        .iter()
        .map(|l| l.rsplit(' ').next().unwrap())
        .collect();
    assert_eq!(payloads, ["q0", "a", "b", "c"], "{text}");
    for l in &lines {
        assert!(l.contains("x-fleetgate-device-id:dev-1"), "{l}");
        assert!(l.contains("x-fleetgate-fingerprint:"), "{l}");
    }

    // A retained message published on node one is there for a later
    // subscriber on node two.
    let (ok, out) = run(one.mosquitto("mosquitto_pub", &dev).args([
        "-q",
        "1",
        "-r",
        "-t",
        "devices/dev-1/state",
        "-m",
        "on",
    ]));
    assert!(ok, "{out}");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, out) = run(two.mosquitto("mosquitto_sub", &svc).args([
            "-t",
            "devices/dev-1/state",
            "-C",
            "1",
            "-W",
            "2",
        ]));
        if out.trim() == "on" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no retained message on node two: {out}"
        );
    }

    // A command from the service on node two reaches the device on node one.
    let cmd = listen(
        &one,
        &dev,
        &[
            "-q",
            "1",
            "-t",
            "devices/dev-1/commands/#",
            "-C",
            "1",
            "-W",
            "20",
        ],
    );
    let (ok, out) = run(two.mosquitto("mosquitto_pub", &svc).args([
        "-V",
        "mqttv5",
        "-q",
        "1",
        "-t",
        "devices/dev-1/commands/reboot",
        "-m",
        "now",
    ]));
    assert!(ok, "{out}");
    let out = cmd.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "now",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn without_nats_a_node_still_serves_its_own_clients_and_acknowledges_nothing_unstored() {
    let (tmp, _etcd, mut nats, one, _two) = two_nodes(&[]);
    let creds = tmp.path().join("c");
    let dev = one.enroll(&creds, "device", "dev-1");
    let svc = one.enroll(&creds, "service", "backend");
    nats.kill(0);

    // A service on the same node still gets the device's QoS 0 messages.
    let sub = listen(
        &one,
        &svc,
        &["-t", "devices/+/telemetry", "-C", "1", "-W", "20"],
    );
    let (ok, out) = run(one.mosquitto("mosquitto_pub", &dev).args([
        "-t",
        "devices/dev-1/telemetry",
        "-m",
        "local",
    ]));
    assert!(ok, "{out}");
    let out = sub.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "local");

    // A QoS 1 message the bus cannot store is not acknowledged: MQTT 5
    // gets PUBACK 0x80 with the reason.
    let (ok, out) = run(one.mosquitto("mosquitto_pub", &dev).args([
        "-V",
        "mqttv5",
        "-q",
        "1",
        "-t",
        "devices/dev-1/telemetry",
        "-m",
        "durable",
    ]));
    // (mosquitto_pub warns and exits 0.)
    let _ = ok;
    assert!(
        out.contains("Implementation specific error")
            && out.contains("not stored for the other nodes"),
        "a QoS 1 message was acknowledged without the bus: {out}"
    );
    assert!(
        one.wait_for_log("did not store", Duration::from_secs(10)),
        "{:?}",
        one.log()
    );
    // A persistent session lives on JetStream: without it, it is refused
    // (server unavailable), not started where no other node finds it.
    let (ok, out) = run(one.mosquitto("mosquitto_sub", &dev).args([
        "-c",
        "-i",
        "dev-1",
        "-q",
        "1",
        "-t",
        "devices/dev-1/commands/#",
        "-W",
        "3",
    ]));
    assert!(!ok && out.contains("unavailable"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_on_another_node_takes_the_session_over() {
    use tests::mqtt::{client, connected, until_closed};
    let (tmp, _etcd, _nats, one, two) = two_nodes(&[]);
    let dev = one.enroll(&tmp.path().join("c"), "device", "dev-1");

    let (_c1, mut first) = client(one.mqtt, &dev, "dev-1");
    connected(&mut first).await;
    let (_c2, mut second) = client(two.mqtt, &dev, "dev-1");
    connected(&mut second).await;
    // Node one cuts the older connection: one session per client id,
    // whichever node it is on.
    assert!(
        until_closed(&mut first, Duration::from_secs(10))
            .await
            .is_some(),
        "node one kept the older connection"
    );
    assert!(one.wait_for_log("took over the session", Duration::from_secs(5)));
    // The newer one stays.
    assert!(
        until_closed(&mut second, Duration::from_secs(2))
            .await
            .is_none(),
        "node two's connection was cut too"
    );
}

#[test]
fn commands_for_a_device_away_outlive_its_node_and_revocation_drops_them_everywhere() {
    let (tmp, _etcd, nats, one, two) = two_nodes(&["--command-queue-max", "3"]);
    let creds = tmp.path().join("c");
    let dev = one.enroll(&creds, "device", "dev-1");
    let svc = one.enroll(&creds, "service", "backend");
    // A persistent session, waiting for `n` commands.
    let sub = |node: &Server, n: &str, wait: &str| {
        run(node.mosquitto("mosquitto_sub", &dev).args([
            "-c",
            "-i",
            "dev-1",
            "-q",
            "1",
            "-t",
            "devices/dev-1/commands/#",
            "-C",
            n,
            "-W",
            wait,
        ]))
    };
    let try_command = |m: &str| {
        run(two.mosquitto("mosquitto_pub", &svc).args([
            "-V",
            "mqttv5",
            "-q",
            "1",
            "-t",
            "devices/dev-1/commands/update",
            "-m",
            m,
        ]))
    };
    let command = |m: &str| {
        let (ok, out) = try_command(m);
        assert!(ok && !out.contains("failed"), "{out}");
    };
    let queue = |n: u64| {
        tests::eventually(
            Duration::from_secs(10),
            &format!("the queue holds {n}"),
            || (nats.stream_messages(0, "FLEETGATE_QUEUE") == Some(n)).then_some(()),
        );
    };
    // The session starts on node one. A command through node two is
    // queued there, reaches the live device from the queue, and leaves
    // the queue with the device's acknowledgement.
    let live = listen(
        &one,
        &dev,
        &[
            "-c",
            "-i",
            "dev-1",
            "-q",
            "1",
            "-t",
            "devices/dev-1/commands/#",
            "-C",
            "1",
            "-W",
            "15",
        ],
    );
    command("v0");
    let out = live.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "v0");
    queue(0);
    // The device goes away.
    // Three commands go in through node two, each acknowledged (MQTT 5:
    // a refusal would say so) once JetStream has it.
    for m in ["v1", "v2", "v3"] {
        command(m);
    }
    queue(3);
    // The queue is full: JetStream's per-device limit refuses the next,
    // and the service is told (MQTT 5: quota exceeded).
    let (_, out) = try_command("v-over");
    assert!(out.contains("Quota exceeded"), "{out}");
    queue(3);
    // The node that held the session dies.
    one.kill9();
    // The device comes back on node two: its session is there, with every
    // acknowledged command, in order.
    let (ok, out) = sub(&two, "3", "15");
    assert!(ok, "{out}");
    assert_eq!(out.lines().collect::<Vec<_>>(), ["v1", "v2", "v3"], "{out}");
    // Its acknowledgements took them out of the queue.
    queue(0);

    // Away again, two more wait; revoking the device drops them, and its
    // session, cluster-wide.
    command("v4");
    command("v5");
    queue(2);
    assert_eq!(nats.stream_messages(0, "FLEETGATE_SESSIONS"), Some(1));
    two.cli_ok(&["device", "revoke", "dev-1"]);
    queue(0);
    assert_eq!(nats.stream_messages(0, "FLEETGATE_SESSIONS"), Some(0));
    // Nothing is kept for it any more.
    command("v6");
    std::thread::sleep(Duration::from_millis(300));
    queue(0);
}

#[test]
fn one_nats_server_of_three_down_loses_nothing_acknowledged() {
    let tmp = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&tmp.path().join("etcd"));
    let mut nats = Nats::cluster(&tmp.path().join("nats"), 3);
    let (store, bus) = (etcd.url(), nats.url());
    let args: &[&str] = &["--store", &store, "--nats", &bus, "--nats-replicas", "3"];
    let [one, two]: [Server; 2] = start_nodes(tmp.path(), &[args, args]).try_into().unwrap();
    let creds = tmp.path().join("c");
    let dev = one.enroll(&creds, "device", "dev-1");
    let svc = one.enroll(&creds, "service", "backend");

    // The first server in every node's list goes away.
    nats.kill(0);
    let sub = listen(
        &two,
        &svc,
        &[
            "-q",
            "1",
            "-t",
            "devices/+/telemetry",
            "-C",
            "3",
            "-W",
            "30",
        ],
    );
    // Every QoS 1 message the device had acknowledged arrives on the
    // other node (a publish may be refused while the client moves to
    // another server: then it is sent again, as a device would).
    for m in ["x", "y", "z"] {
        tests::eventually(Duration::from_secs(20), "acknowledged", || {
            let (ok, out) = run(one.mosquitto("mosquitto_pub", &dev).args([
                "-V",
                "mqttv5",
                "-q",
                "1",
                "-t",
                "devices/dev-1/telemetry",
                "-m",
                m,
            ]));
            (ok && !out.contains("failed")).then_some(())
        });
    }
    let out = sub.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let got: Vec<&str> = text.lines().collect();
    assert_eq!(got, ["x", "y", "z"], "{text}");
}

#[test]
fn a_share_group_spreads_messages_over_its_members_on_every_node() {
    let (tmp, _etcd, _nats, one, two) = two_nodes(&[]);
    let creds = tmp.path().join("c");
    let dev = one.enroll(&creds, "device", "dev-1");
    let svc1 = one.enroll(&creds, "service", "worker-1");
    let svc2 = one.enroll(&creds, "service", "worker-2");
    let n = 30;
    // One member of the group on each node, and a plain subscriber.
    let member = |node: &Server, c: &tests::Creds| {
        listen(
            node,
            c,
            &[
                "-q",
                "1",
                "-t",
                "$share/workers/devices/+/telemetry",
                "-W",
                "9",
            ],
        )
    };
    let (m1, m2) = (member(&one, &svc1), member(&two, &svc2));
    for i in 0..n {
        let (ok, out) = run(one.mosquitto("mosquitto_pub", &dev).args([
            "-q",
            "1",
            "-t",
            "devices/dev-1/telemetry",
            "-m",
            &format!("m{i}"),
        ]));
        assert!(ok, "{out}");
    }
    let got = |c: tests::Subscriber| -> Vec<String> {
        let out = c.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    };
    let (a, b) = (got(m1), got(m2));
    // Each message reached exactly one member: none twice, none lost.
    let mut all: Vec<String> = a.iter().chain(&b).cloned().collect();
    all.sort();
    let mut want: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
    want.sort();
    assert_eq!(all, want, "node one's member: {a:?}, node two's: {b:?}");
    // And both nodes' members had a share.
    assert!(!a.is_empty() && !b.is_empty(), "{a:?} {b:?}");
}

/// A `$share` group's consumer that NATS lost while its node was away
/// (nobody pulled it for a minute, a server lost it, an operator deleted
/// it) is made again from the message after the last one the node took:
/// what devices published meanwhile, acknowledged, still reaches the
/// group. It was made again at "new", and a group lost half a minute of
/// acknowledged telemetry (the fault harness, issue 30).
#[test]
fn a_share_groups_consumer_lost_while_its_node_was_away_is_made_again_where_it_left_off() {
    let (tmp, _etcd, nats, one, two) = two_nodes(&[]);
    let creds = tmp.path().join("c");
    let dev = one.enroll(&creds, "device", "dev-1");
    let svc = one.enroll(&creds, "service", "worker-1");
    let n = 8;
    let member = listen(
        &two,
        &svc,
        &[
            "-q",
            "1",
            "-t",
            "$share/workers/devices/+/telemetry",
            "-C",
            &n.to_string(),
            "-W",
            "60",
        ],
    );
    let publish = |i: usize| {
        let (ok, out) = run(one.mosquitto("mosquitto_pub", &dev).args([
            "-q",
            "1",
            "-t",
            "devices/dev-1/telemetry",
            "-m",
            &format!("m{i}"),
        ]));
        assert!(ok, "{out}");
    };
    const STREAM: &str = "FLEETGATE_MSG";
    // The group's consumer, once node two has made it.
    let group: String = tests::eventually(
        Duration::from_secs(30),
        "the group's consumer on JetStream",
        || {
            let names = nats.js_api(0, &format!("$JS.API.CONSUMER.NAMES.{STREAM}"), "{}");
            let mut group = names["consumers"]
                .as_array()?
                .iter()
                .filter_map(|c| c.as_str().filter(|c| c.starts_with("share-")));
            group.next().map(str::to_owned)
        },
    );
    let group = &group;
    // Two messages taken and acknowledged by node two.
    for i in 0..2 {
        publish(i);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let info = nats.js_api(0, &format!("$JS.API.CONSUMER.INFO.{STREAM}.{group}"), "");
        if info["num_pending"] == 0
            && info["num_ack_pending"] == 0
            && info["delivered"]["consumer_seq"] == 2
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node two did not take m0 and m1: {info}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Node two away (stopped); its group's consumer gone meanwhile; the
    // device goes on publishing, acknowledged by node one.
    let signal = |sig: &str| {
        let (ok, out) = run(std::process::Command::new("kill").args([sig, &two.pid().to_string()]));
        assert!(ok, "{out}");
    };
    signal("-STOP");
    let deleted = nats.js_api(0, &format!("$JS.API.CONSUMER.DELETE.{STREAM}.{group}"), "");
    assert_eq!(deleted["success"], true, "{deleted}");
    for i in 2..n {
        publish(i);
    }
    signal("-CONT");
    let (ok, out, err) = member.finish();
    let got: Vec<&str> = out.lines().collect();
    let want: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
    assert!(ok, "the member got {got:?}; {err}");
    assert_eq!(got, want);
}

/// A command that could not be stored is not acknowledged: MQTT 5 gets
/// PUBACK 0x83 with the reason, and a 3.1.1 service (no negative PUBACK)
/// loses its connection with none, so its client sends it again. It got
/// a PUBACK, and the command was gone (the fault harness, issue 30:
/// commands sent while the sessions' stream had no leader, the messages'
/// stream answering).
#[test]
fn a_command_the_session_keeper_could_not_store_is_not_acknowledged() {
    let (tmp, _etcd, nats, one, _two) = two_nodes(&[]);
    let creds = tmp.path().join("c");
    let dev = one.enroll(&creds, "device", "dev-1");
    let svc = one.enroll(&creds, "service", "backend");
    // The device's persistent session, kept on JetStream; the device away.
    let (ok, out) = run(one.mosquitto("mosquitto_sub", &dev).args([
        "-c",
        "-i",
        "dev-1",
        "-q",
        "1",
        "-t",
        "devices/dev-1/commands/#",
        "-E",
    ]));
    assert!(ok, "{out}");
    // The sessions' stream gone (as a stream without a leader answers
    // nothing), the messages' stream still there.
    let gone = nats.js_api(0, "$JS.API.STREAM.DELETE.FLEETGATE_SESSIONS", "");
    assert_eq!(gone["success"], true, "{gone}");
    let command = |extra: &[&str]| {
        let mut args = extra.to_vec();
        args.extend(["-q", "1", "-t", "devices/dev-1/commands/update", "-m", "c1"]);
        run(one.mosquitto("mosquitto_pub", &svc).args(args))
    };
    let (ok, out) = command(&[]);
    assert!(!ok, "MQTT 3.1.1: acknowledged, not stored: {out}");
    let (_, out) = command(&["-V", "mqttv5"]);
    assert!(
        out.contains("Implementation specific error") && out.contains("not stored"),
        "MQTT 5: {out}"
    );
    assert!(
        one.wait_for_log(
            "a command was not stored; not acknowledged",
            Duration::from_secs(10)
        ),
        "{:?}",
        one.log()
    );
}

#[test]
fn an_expired_session_and_its_queue_are_swept_from_jetstream() {
    let (tmp, etcd, nats, one, two) = two_nodes(&[]);
    let creds = tmp.path().join("c");
    let dev = one.enroll(&creds, "device", "dev-2");
    let svc = one.enroll(&creds, "service", "backend");
    // A persistent session that outlives its connection by one second.
    let (ok, out) = run(one.mosquitto("mosquitto_sub", &dev).args([
        "-V",
        "mqttv5",
        "-c",
        "-x",
        "1",
        "-i",
        "dev-2",
        "-q",
        "1",
        "-t",
        "devices/dev-2/commands/#",
        "-E",
    ]));
    assert!(ok, "{out}");
    // A command waits for it.
    let (ok, out) = run(two.mosquitto("mosquitto_pub", &svc).args([
        "-V",
        "mqttv5",
        "-q",
        "1",
        "-t",
        "devices/dev-2/commands/update",
        "-m",
        "late",
    ]));
    assert!(ok && !out.contains("failed"), "{out}");
    assert_eq!(nats.stream_messages(0, "FLEETGATE_SESSIONS"), Some(1));
    assert_eq!(nats.stream_messages(0, "FLEETGATE_QUEUE"), Some(1));
    // Past its expiry, a node's sweep (at start, then every ten minutes)
    // ends it: record and queue, on JetStream.
    std::thread::sleep(Duration::from_millis(2100));
    let data = two.data_dir.clone();
    two.terminate();
    let (store, bus) = (etcd.url(), nats.url());
    let _two = Server::start_with(&data, &["--store", &store, "--nats", &bus]).unwrap();
    tests::eventually(
        Duration::from_secs(10),
        "the expired session and its queue swept from JetStream",
        || {
            (nats.stream_messages(0, "FLEETGATE_SESSIONS") == Some(0)
                && nats.stream_messages(0, "FLEETGATE_QUEUE") == Some(0))
            .then_some(())
        },
    );
    drop(one);
}

/// Publishes on NATS as any client with network access to it could: a
/// raw `HPUB` with fleetgate's headers, no fleetgate node involved.
fn raw_nats_hpub(nats_url: &str, subject: &str, headers: &[(&str, &str)], payload: &[u8]) {
    use std::io::{BufRead, BufReader};
    let addr = nats_url
        .split(',')
        .next()
        .unwrap()
        .trim_start_matches("nats://");
    let tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut reader = BufReader::new(tcp.try_clone().unwrap());
    let mut info = String::new();
    reader.read_line(&mut info).unwrap();
    assert!(info.starts_with("INFO"), "{info}");
    let mut hdr = String::from("NATS/1.0\r\n");
    for (k, v) in headers {
        hdr.push_str(&format!("{k}: {v}\r\n"));
    }
    hdr.push_str("\r\n");
    let mut out = Vec::new();
    out.extend_from_slice(b"CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":true}\r\n");
    out.extend_from_slice(
        format!(
            "HPUB {subject} {} {}\r\n",
            hdr.len(),
            hdr.len() + payload.len()
        )
        .as_bytes(),
    );
    out.extend_from_slice(hdr.as_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\nPING\r\n");
    (&tcp).write_all(&out).unwrap();
    // PONG once the server has taken the publish.
    let mut line = String::new();
    while !line.starts_with("PONG") {
        line.clear();
        reader.read_line(&mut line).unwrap();
        assert!(!line.starts_with("-ERR"), "{line}");
    }
}

/// Telemetry, a command and a takeover claim put on NATS by something
/// that is no node (NATS here lets anyone publish): each is dropped by
/// both nodes, and counted, and the real ones still go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_no_node_sealed_is_dropped_from_the_bus() {
    let (tmp, _etcd, nats, one, two) = two_nodes(&["--metrics-listen", "127.0.0.1:0"]);
    let creds = tmp.path().join("c");
    let dev2 = one.enroll(&creds, "device", "dev-2");
    let svc = one.enroll(&creds, "service", "backend");
    // dev-2 online on node one, listening for commands.
    let cmds = listen(
        &one,
        &dev2,
        &[
            "-t",
            "devices/dev-2/commands/#",
            "-C",
            "1",
            "-W",
            "20",
            "-F",
            "%t %p",
        ],
    );
    let telemetry = listen(
        &two,
        &svc,
        &["-t", "devices/dev-2/telemetry", "-C", "1", "-W", "20"],
    );
    let forged = |topic: &str, payload: &[u8]| provisioning::sessions::Message {
        topic: topic.into(),
        payload: payload.to_vec(),
        qos: 1,
        retain: false,
        props: Default::default(),
        stored_at_ms: 0,
        expires_at_ms: None,
    };
    // Telemetry as dev-2, with a made-up stamp; a command as a service.
    raw_nats_hpub(
        &nats.url(),
        "fleetgate.msg.node.run.dev-2",
        &[
            ("fleetgate-role", "device"),
            ("fleetgate-stamp", "0a/ff/evil"),
        ],
        &forged("devices/dev-2/telemetry", b"forged").to_bytes(),
    );
    raw_nats_hpub(
        &nats.url(),
        "fleetgate.msg.node.run.backend",
        &[("fleetgate-role", "service")],
        &forged("devices/dev-2/commands/unlock-door", b"forged").to_bytes(),
    );
    // A takeover claim of dev-2's session.
    raw_nats_hpub(
        &nats.url(),
        "fleetgate.owner.dev-2",
        &[("x", "y")],
        b"attacker",
    );
    for node in [&one, &two] {
        assert!(node.wait_for_log(
            "bus: dropped a message that is not fleetgate's",
            Duration::from_secs(10)
        ));
    }
    assert!(one.wait_for_log(
        "bus: dropped a takeover claim no node sealed",
        Duration::from_secs(10)
    ));
    // The real ones: dev-2 is still connected, and what it and the
    // service get first is the real message. (Another service sends the
    // command: a second connection of `backend` would take over its own.)
    let ops = one.enroll(&creds, "service", "ops");
    let (ok, out) = run(two.mosquitto("mosquitto_pub", &ops).args([
        "-q",
        "1",
        "-t",
        "devices/dev-2/commands/reboot",
        "-m",
        "real",
    ]));
    assert!(ok, "{out}");
    let got = cmds.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&got.stdout).trim(),
        "devices/dev-2/commands/reboot real"
    );
    let (ok, out) = run(one.mosquitto("mosquitto_pub", &dev2).args([
        "-q",
        "1",
        "-t",
        "devices/dev-2/telemetry",
        "-m",
        "real",
    ]));
    assert!(ok, "{out}");
    let got = telemetry.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&got.stdout).trim(), "real");
    // Counted.
    let url = format!("http://{}/metrics", one.metrics.unwrap());
    let (ok, text) = run(std::process::Command::new("curl").args(["-sS", &url]));
    assert!(ok, "{text}");
    let dropped: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("fleetgate_bus_dropped_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(dropped >= 3, "{text}");
}

/// A CA and a server certificate for 127.0.0.1 made with openssl, for a
/// NATS server: `(ca.crt, server.crt, server.key)` in `dir`.
fn nats_server_pki(dir: &std::path::Path) -> [std::path::PathBuf; 3] {
    std::fs::create_dir_all(dir).unwrap();
    let p = |n: &str| dir.join(n);
    let sh = format!(
        "set -e; cd {d}; \
         openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
           -keyout ca.key -out ca.crt -subj /CN=nats-test-ca -days 2; \
         openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
           -keyout server.key -out server.csr -subj /CN=nats; \
         printf 'subjectAltName=IP:127.0.0.1\\nextendedKeyUsage=serverAuth\\n' > ext; \
         openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
           -days 2 -extfile ext -out server.crt",
        d = dir.display()
    );
    let (ok, out) = run(std::process::Command::new("sh").args(["-c", &sh]));
    assert!(ok, "{out}");
    [p("ca.crt"), p("server.crt"), p("server.key")]
}

/// What a NATS server says to a client that upgrades to TLS presenting
/// `identity` (or none) and sends CONNECT, `then` and PING: `Ok(first
/// line)` (`PONG`, or `-ERR ...`), `Err` if TLS itself failed.
async fn nats_hello(
    port: u16,
    ca: &std::path::Path,
    identity: Option<(&std::path::Path, &std::path::Path)>,
    then: &str,
) -> Result<String, String> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    fleetgate_api::tls::install_crypto_provider();
    let config = fleetgate_api::tls::client_config(ca, identity).unwrap();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut plain = BufReader::new(tcp);
    let mut info = String::new();
    plain.read_line(&mut info).await.unwrap();
    assert!(info.starts_with("INFO"), "{info}");
    let name = rustls_pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, plain.into_inner())
        .await
        .map_err(|e| e.to_string())?;
    let mut tls = BufReader::new(tls);
    tls.get_mut()
        .write_all(
            format!("CONNECT {{\"verbose\":false,\"pedantic\":false}}\r\n{then}PING\r\n")
                .as_bytes(),
        )
        .await
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    match tokio::time::timeout(Duration::from_secs(10), tls.read_line(&mut line)).await {
        Ok(Ok(_)) => Ok(line.trim().to_owned()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer".into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_on_a_tls_nats_with_client_certificates_and_permissions() {
    tests::require_tool("openssl");
    let tmp = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&tmp.path().join("etcd"));
    let store = etcd.url();
    let ids = tmp.path().join("ids");
    let creds = tmp.path().join("c");
    // The cluster's CA, and node identities from it, before any bus.
    let (dev, svc) = {
        let first = Server::start_with(&tmp.path().join("node-1"), &["--store", &store]).unwrap();
        for n in ["node-1", "node-2"] {
            first.cli_ok(&["node", "enroll", n, "--out", ids.to_str().unwrap()]);
        }
        // A node identity is no MQTT identity.
        let node = tests::Creds::in_dir(&ids, "node-1");
        assert!(tests::mqtt::refused(first.mqtt, &node).await);
        (
            first.enroll(&creds, "device", "dev-1"),
            first.enroll(&creds, "service", "backend"),
        )
    };
    let [nats_ca, cert, key] = nats_server_pki(&tmp.path().join("nats-pki"));
    let fleet_ca = tmp.path().join("node-1/ca.crt");
    let config = format!(
        r#"
tls {{
  cert_file: "{cert}"
  key_file: "{key}"
  ca_file: "{fleet_ca}"
  verify_and_map: true
}}
authorization {{
  users = [
    {{ user: "CN=node-1", permissions: {{
        publish: {{ allow: ["fleetgate.msg.node-1.>", {shared}] }}
        subscribe: {{ allow: ["fleetgate.>", "_INBOX.>"] }} }} }}
    {{ user: "CN=node-2", permissions: {{
        publish: {{ allow: ["fleetgate.msg.node-2.>", {shared}] }}
        subscribe: {{ allow: ["fleetgate.>", "_INBOX.>"] }} }} }}
  ]
}}
"#,
        shared = r#""fleetgate.owner.>", "fleetgate.session.>", "fleetgate.queue.>", "fleetgate.ask.>", "$JS.API.>", "$JS.ACK.>", "$JS.FC.>", "_INBOX.>""#,
        cert = cert.display(),
        key = key.display(),
        fleet_ca = fleet_ca.display(),
    );
    let nats = Nats::with_config(&tmp.path().join("nats"), &config);
    let port = nats.ports[0];
    // NATS refuses a client without a certificate, one whose certificate
    // another CA signed, and a fleetgate device (chains to the fleet's
    // root, but no user of NATS).
    assert!(nats_hello(port, &nats_ca, None, "").await.is_err());
    let foreign = tests::pki::TestCa::foreign();
    let (chain, fkey) = foreign.issue(&tests::pki::Spec::device("intruder"));
    std::fs::write(tmp.path().join("f.crt"), chain).unwrap();
    std::fs::write(tmp.path().join("f.key"), fkey).unwrap();
    let f = (tmp.path().join("f.crt"), tmp.path().join("f.key"));
    assert!(nats_hello(port, &nats_ca, Some((&f.0, &f.1)), "")
        .await
        .is_err());
    let said = nats_hello(port, &nats_ca, Some((&dev.cert, &dev.key)), "").await;
    assert!(
        said.as_deref()
            .is_ok_and(|l| l.contains("Authorization Violation")),
        "{said:?}"
    );
    let n1 = (ids.join("node-1.crt"), ids.join("node-1.key"));
    assert_eq!(
        nats_hello(port, &nats_ca, Some((&n1.0, &n1.1)), "").await,
        Ok("PONG".into())
    );
    // A node publishes under its own name only: node-2 posing as node-1
    // is refused by NATS.
    let n2 = (ids.join("node-2.crt"), ids.join("node-2.key"));
    let said = nats_hello(
        port,
        &nats_ca,
        Some((&n2.0, &n2.1)),
        "PUB fleetgate.msg.node-1.run.dev-1 1\r\nx\r\n",
    )
    .await;
    assert!(
        said.as_deref()
            .is_ok_and(|l| l.contains("Permissions Violation")),
        "{said:?}"
    );

    // Two nodes on it, each with its own identity.
    let bus = nats.tls_url();
    let node_args = |n: &str| -> Vec<String> {
        [
            "--store",
            &store,
            "--nats",
            &bus,
            "--nats-ca",
            nats_ca.to_str().unwrap(),
            "--nats-cert",
            ids.join(format!("{n}.crt")).to_str().unwrap(),
            "--nats-key",
            ids.join(format!("{n}.key")).to_str().unwrap(),
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let (a1, a2) = (node_args("node-1"), node_args("node-2"));
    let a1: Vec<&str> = a1.iter().map(String::as_str).collect();
    let a2: Vec<&str> = a2.iter().map(String::as_str).collect();
    let one = Server::start_with(&tmp.path().join("node-1"), &a1).unwrap();
    tests::copy_data_dir(&one.data_dir, &tmp.path().join("node-2"));
    let two = Server::start_with(&tmp.path().join("node-2"), &a2).unwrap();
    assert!(!one.log().iter().any(|l| l.contains("NATS without TLS")));

    // Telemetry from node one to a service on node two, a command back.
    let sub = listen(
        &two,
        &svc,
        &["-t", "devices/dev-1/telemetry", "-C", "1", "-W", "20"],
    );
    let (ok, out) = run(one.mosquitto("mosquitto_pub", &dev).args([
        "-q",
        "1",
        "-t",
        "devices/dev-1/telemetry",
        "-m",
        "over-tls",
    ]));
    assert!(ok, "{out}");
    let got = sub.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&got.stdout).trim(), "over-tls");
    let cmd = listen(
        &one,
        &dev,
        &["-t", "devices/dev-1/commands/#", "-C", "1", "-W", "20"],
    );
    let (ok, out) = run(two.mosquitto("mosquitto_pub", &svc).args([
        "-q",
        "1",
        "-t",
        "devices/dev-1/commands/reboot",
        "-m",
        "now",
    ]));
    assert!(ok, "{out}");
    let got = cmd.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&got.stdout).trim(), "now");
    // Revoked through node two: node one refuses it.
    two.cli_ok(&["device", "revoke", "dev-1"]);
    assert!(tests::mqtt::refused(one.mqtt, &dev).await);
}
