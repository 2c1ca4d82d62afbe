//! The simulated fleet against the real server: each scenario at small
//! scale, with its outcomes asserted.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::time::Duration;

use firmware_sim::fleet::{self, Fleet, Options, Report};
use tests::Server;

const DEVICES: usize = 50;

fn fleet_for(server: &Server, dir: &std::path::Path) -> Fleet {
    Fleet {
        broker: server.mqtt,
        ca: dir.join("ca.crt"),
        dir: dir.to_owned(),
        api: Some(server.admin()),
        prefix: "sim-".into(),
        progress: false,
    }
}

fn options() -> Options {
    Options {
        devices: DEVICES,
        rate: 2.0,
        duration: Duration::from_secs(2),
        revoke: 5,
        bulk: false,
        broker_pid: None,
        connect_limit: Duration::from_secs(60),
    }
}

fn check(r: &Report) {
    assert!(r.ok, "{}", r.table());
}

fn figure(r: &Report, k: &str) -> f64 {
    r.figures[k]
        .as_f64()
        .unwrap_or_else(|| panic!("{k} in {}", r.table()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_at_small_scale() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data")).unwrap();
    let dir = tmp.path().join("fleet");
    let f = fleet_for(&server, &dir);

    // Enrollment by CSR, credentials kept for the next run.
    let ids = f.ids(DEVICES);
    assert_eq!(f.ensure_enrolled(&ids).await.unwrap(), DEVICES);
    assert_eq!(
        f.ensure_enrolled(&ids).await.unwrap(),
        0,
        "second run reuses the fleet dir"
    );
    let key_mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.join("sim-0.key"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(key_mode & 0o777, 0o600);

    // storm: everyone connects at once.
    let r = fleet::storm(&f, &options()).await.unwrap();
    check(&r);
    assert_eq!(figure(&r, "connected") as usize, DEVICES);
    assert!(figure(&r, "connects_per_s") > 0.0);

    // Full connects back to back (handshake, CONNECT, CONNACK,
    // DISCONNECT), ten at a time: every CONNACK arrives. (Each session
    // moves to the session runtime after its handshake; a CONNACK written
    // before that runtime knew the socket writable once stayed in rustls,
    // and about one connect in fifty waited out the loader's 10 s.)
    let target = firmware_sim::load::Target {
        broker: server.mqtt,
        ca: dir.join("ca.crt"),
        creds: dir.clone(),
    };
    let storm = firmware_sim::load::connect_storm(&target, &ids[..10], 1000)
        .await
        .unwrap();
    assert_eq!((storm.connects, storm.failures), (1000, 0));

    // steady: everyone publishes; nobody is dropped.
    let r = fleet::steady(&f, &options()).await.unwrap();
    check(&r);
    assert_eq!(figure(&r, "dropped") as usize, 0);
    // 50 devices at 2 msg/s: about 100 msg/s.
    assert!(figure(&r, "messages_per_s") > 50.0, "{}", r.table());

    // rogue: all refused, the well-behaved undisturbed.
    let r = fleet::rogue(&f, &options()).await.unwrap();
    check(&r);
    assert_eq!(figure(&r, "well_behaved_disturbed") as usize, 0);

    // provision: factory devices share one claim, all at once.
    let r = fleet::provision(&f, &options()).await.unwrap();
    check(&r);
    assert_eq!(figure(&r, "provisioned_and_connected") as usize, DEVICES);
    assert_eq!(r.figures["claim_spent_refused"], true);

    // soak, briefly: held connections, churn, writes read back.
    let mut o = options();
    o.duration = Duration::from_secs(3);
    let r = fleet::soak(&f, &o, 3).await.unwrap();
    check(&r);
    assert_eq!(figure(&r, "acknowledged_writes_lost") as usize, 0);
    assert!(figure(&r, "writes_acknowledged") >= 4.0, "{}", r.table());

    // revoke, one call each, then in one bulk call: each run on a fleet
    // of its own, so the default fleet is never revoked.
    for bulk in [false, true] {
        let r = fleet::revoke(&f, &Options { bulk, ..options() })
            .await
            .unwrap();
        check(&r);
        assert_eq!(figure(&r, "revoked_reconnected") as usize, 0);
        assert_eq!(figure(&r, "revoked_still_retrying") as usize, 0);
        assert!(
            figure(&r, "revoke_to_disconnect_p99_ms") < 1000.0,
            "{}",
            r.table()
        );
    }
    // And the default fleet still connects afterwards.
    let r = fleet::storm(&f, &options()).await.unwrap();
    check(&r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_renew_their_certificate_before_it_expires() {
    use std::sync::{Arc, Mutex};
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data")).unwrap();
    let dir = tmp.path().join("fleet");
    std::fs::create_dir_all(&dir).unwrap();
    let f = fleet_for(&server, &dir);
    // A 6-second certificate: renewed when 2 s are left.
    let ca = fleet::enroll_one(f.api.as_ref().unwrap(), &dir, "short-lived", Some(6))
        .await
        .unwrap();
    std::fs::write(dir.join("ca.crt"), ca).unwrap();
    let first = std::fs::read(dir.join("short-lived.crt")).unwrap();

    let log = Arc::new(Mutex::new(fleet::DeviceLog::default()));
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let target = firmware_sim::load::Target {
        broker: server.mqtt,
        ca: dir.join("ca.crt"),
        creds: dir.clone(),
    };
    let task = tokio::spawn(fleet::device(
        target,
        "short-lived".into(),
        None,
        std::time::Instant::now(),
        log.clone(),
        stop_rx,
        f.api.clone(),
    ));
    // Past the first certificate's expiry: renewed, and connected again.
    let l = tests::until(
        Duration::from_secs(30),
        "a renewal and a reconnect",
        || async {
            let l = log.lock().unwrap().clone();
            (l.renewals >= 1 && l.connects >= 2).then_some(l)
        },
    )
    .await;
    let _ = stop.send(true);
    let _ = task.await;
    assert!(l.renewals >= 1, "{l:?}");
    assert!(
        l.connects >= 2,
        "reconnected with the new certificate: {l:?}"
    );
    assert!(!l.revoked, "{l:?}");
    assert_ne!(std::fs::read(dir.join("short-lived.crt")).unwrap(), first);
    // The registry has the rotations.
    let v: serde_json::Value = server.admin().get("/v1/devices/short-lived").await.unwrap();
    assert!(v["certificates"].as_array().unwrap().len() >= 2, "{v}");
}
