//! Nodes whose clocks are off the cluster's (libfaketime): what they
//! queue, expire and record is judged by a clock the cluster agrees on
//! (JetStream's stored times), not by theirs.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use tests::etcd::Etcd;
use tests::nats::Nats;
use tests::{run, start_nodes, Server};

/// Two nodes on one etcd and one NATS, the second on a clock the test
/// sets (`clock`, libfaketime); a device and a service enrolled.
struct SkewFixture {
    two: Server,
    one: Server,
    clock: std::path::PathBuf,
    dev: tests::Creds,
    svc: tests::Creds,
    _nats: Nats,
    _etcd: Etcd,
    _tmp: tempfile::TempDir,
}

impl SkewFixture {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let etcd = Etcd::start(&tmp.path().join("etcd"));
        let nats = Nats::start(&tmp.path().join("nats"));
        let (store, bus) = (etcd.url(), nats.url());
        let args = ["--store", store.as_str(), "--nats", bus.as_str()];
        let one = start_nodes(tmp.path(), &[&args]).pop().unwrap();
        let dir = tmp.path().join("node-2");
        tests::copy_data_dir(&one.data_dir, &dir);
        let clock = tmp.path().join("clock");
        let two = Server::start_on_fake_clock(&dir, &clock, &args).unwrap();
        let creds = tmp.path().join("c");
        let dev = one.enroll(&creds, "device", "dev-1");
        let svc = one.enroll(&creds, "service", "backend");
        Self {
            two,
            one,
            clock,
            dev,
            svc,
            _nats: nats,
            _etcd: etcd,
            _tmp: tmp,
        }
    }

    /// The device's persistent session on `node`, with `extra` flags.
    fn session(&self, node: &Server, extra: &[&str]) -> (bool, String) {
        let mut a = vec![
            "-c",
            "-i",
            "dev-1",
            "-q",
            "1",
            "-t",
            "devices/dev-1/commands/#",
        ];
        a.extend(extra);
        run(node.mosquitto("mosquitto_sub", &self.dev).args(a))
    }

    /// The service queues command `c1` for the device through `node`
    /// (QoS 1, with `extra` flags), and it is acknowledged.
    fn command(&self, node: &Server, extra: &[&str]) {
        let mut a = vec!["-q", "1", "-t", "devices/dev-1/commands/update", "-m", "c1"];
        a.extend(extra);
        let (ok, out) = run(node.mosquitto("mosquitto_pub", &self.svc).args(a));
        assert!(ok && !out.contains("failed"), "{out}");
    }
}

/// A command queued through a node whose clock is behind keeps its whole
/// expiry interval: its age is read from when JetStream stored it, not
/// from the queueing node's clock. (A node a day behind queued commands
/// that had expired before anyone could read them: the fault harness,
/// issue 30.)
#[test]
fn a_command_queued_through_a_node_whose_clock_is_behind_keeps_its_expiry_interval() {
    let f = SkewFixture::new();
    let (one, two, clock) = (&f.one, &f.two, &f.clock);
    let session = |extra: &[&str]| f.session(one, extra);
    // The device's persistent session, then the device away.
    let (ok, out) = session(&["-E"]);
    assert!(ok, "{out}");
    // Node two's clock four minutes behind (certificates are backdated
    // five, so it still takes the service's), and a command with a
    // minute to live through it.
    std::fs::write(clock, "-4m\n").unwrap();
    f.command(
        two,
        &[
            "-V",
            "mqttv5",
            "-D",
            "publish",
            "message-expiry-interval",
            "60",
        ],
    );
    // The device back, on node one: the command is there.
    let (ok, out) = session(&["-C", "1", "-W", "20"]);
    assert!(ok && out.lines().any(|l| l == "c1"), "{out}");
}

/// A node whose clock runs ahead of the cluster's does not judge queued
/// commands expired by it: a node two days ahead read every command
/// queued with the default day to live as expired, and deleted it from
/// JetStream (the fault harness, issue 30). While its clock is not
/// trusted (here: it stepped), nothing has expired on it.
#[test]
fn a_node_whose_clock_jumped_ahead_delivers_queued_commands_rather_than_expire_them() {
    let f = SkewFixture::new();
    let (one, two, clock) = (&f.one, &f.two, &f.clock);
    let session = |node: &Server, extra: &[&str]| f.session(node, extra);
    let (ok, out) = session(one, &["-E"]);
    assert!(ok, "{out}");
    // Queued through node one (the default: a day to live).
    f.command(one, &[]);
    // Node two's clock two days ahead; the device back, on node two.
    std::fs::write(clock, "+2d\n").unwrap();
    let (ok, out) = session(two, &["-C", "1", "-W", "20"]);
    assert!(
        ok && out.lines().any(|l| l == "c1"),
        "{out}\nnode two:\n{}",
        two.log().join("\n")
    );
}

/// A session's expiry counts from when its disconnect was stored, by the
/// NATS server's clock, not by the clock of the node the device left: a
/// node four minutes behind recorded a disconnect that every other node
/// took for four minutes old, so a session kept for a minute was gone at
/// once (the fault harness, issue 30).
#[test]
fn a_session_left_on_a_node_whose_clock_is_behind_keeps_its_expiry() {
    let f = SkewFixture::new();
    let (one, two, clock) = (&f.one, &f.two, &f.clock);
    // Node two's clock four minutes behind (certificates are backdated
    // five, so it still takes the device's).
    std::fs::write(clock, "-4m\n").unwrap();
    // The device's MQTT 5 session, kept for a minute after it leaves node
    // two; a retained-free command queued for it meanwhile through node
    // one.
    let (ok, out) = f.session(two, &["-V", "mqttv5", "-x", "60", "-E"]);
    assert!(ok, "{out}");
    f.command(one, &[]);
    // Back within the minute, on node one: the session and the command
    // are there.
    let (ok, out) = f.session(one, &["-V", "mqttv5", "-x", "60", "-C", "1", "-W", "20"]);
    assert!(
        ok && out.lines().any(|l| l == "c1"),
        "{out}\nnode one:\n{}",
        one.log().join("\n")
    );
}
