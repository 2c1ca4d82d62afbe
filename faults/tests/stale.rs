//! A server cut off from the others answers from what it has: nothing a
//! node acts on is read from it. As root, with iproute2, nats-server and
//! etcd. Both found by the fault harness (issue 30):
//! - devices resumed on a stale session record or queue, their commands
//!   out of order or gone: the keeper read them with JetStream's direct
//!   get, which any replica answers, and the replica a node was connected
//!   to had been cut off from the writes;
//! - a node admitted a device revoked seconds before: its registry view
//!   is fed by a watch, the watch's etcd member had been cut off from the
//!   majority (its stream stays open, and quiet), and the heartbeats that
//!   said the view was current were answered by the other members.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::sync::Arc;
use std::time::{Duration, Instant};

use faults::etcd::EtcdCluster;
use faults::nats::{NatsCluster, CLIENT};
use faults::net::Net;
use fleetgate_bus::{Bus, BusConfig, BusKey, Unobserved};
use fleetgate_etcd::EtcdStore;
use provisioning::sessions::{QueueLimits, SessionRecord};
use provisioning::store::{Commit, Space, Store, Write};
use provisioning::DeviceId;

#[test]
fn a_view_fed_by_an_etcd_member_cut_off_from_the_majority_stops_answering() {
    let tmp = tempfile::tempdir().unwrap();
    let net = Net::with_subnet(&format!("fge{}", std::process::id()), 3, "10.76.0", true).unwrap();
    let _etcd = EtcdCluster::start(&net, &[0, 1, 2], tmp.path()).unwrap();
    let addr = |i: usize| format!("{}:{}", net.addr(i), faults::etcd::CLIENT);
    // Node A's watch on member 0 (its first), node B's writes through 1.
    let a = EtcdStore::connect(vec![addr(0), addr(1), addr(2)], "fleetgate/").unwrap();
    a.watch(|_| {});
    let b = EtcdStore::connect(vec![addr(1), addr(2), addr(0)], "fleetgate/").unwrap();
    let set = |value: &str| {
        let w = Write {
            space: Space::Devices,
            key: b"dev-1".to_vec(),
            value: Some(value.as_bytes().to_vec()),
        };
        b.commit(Commit::writes(vec![w]))
    };
    let read = || a.get_recent(Space::Devices, b"dev-1");
    set("standing").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while read().ok().flatten().as_deref() != Some(&b"standing"[..]) {
        assert!(Instant::now() < deadline, "A never read it: {:?}", read());
        std::thread::sleep(Duration::from_millis(100));
    }
    // Member 0 cut off from the others; B's next write (the revocation)
    // goes to the majority.
    net.partition(0, 1).unwrap();
    net.partition(0, 2).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Err(e) = set("revoked") {
        assert!(Instant::now() < deadline, "the majority took no write: {e}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let acked = Instant::now();
    // Once A's heartbeat (every second; a member that does not answer in
    // one is passed over) has read the majority's revision, A never
    // answers from the old view (3 s: the propagation the README
    // promises); then its watch moves on.
    let mut new = None;
    while acked.elapsed() < Duration::from_secs(15) {
        let started = acked.elapsed();
        let r = read();
        if started > Duration::from_secs(3) {
            assert!(
                !matches!(r, Ok(Some(ref v)) if v == b"standing"),
                "{started:?} after the revocation, A read what member 0 was left with"
            );
        }
        if new.is_none() && matches!(r, Ok(Some(ref v)) if v == b"revoked") {
            new = Some(started);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(new.is_some(), "A never read the revocation");
}

/// Server 0, a replica of the sessions' stream, cut off: it answers
/// direct gets from its copy (what the keeper read before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_is_not_read_from_a_nats_replica_cut_off_from_the_others() {
    session_read_through_a_cut_off_server(false, "10.77.0", "fgs").await;
}

/// Server 0, the sessions' stream's leader, cut off: until it notices,
/// it answers reads as the leader, from its copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_is_not_read_from_a_nats_leader_cut_off_from_the_others() {
    session_read_through_a_cut_off_server(true, "10.75.0", "fgl").await;
}

/// Which server leads `stream`, as the cluster says.
async fn leader(client: &async_nats::Client, stream: &str) -> Option<String> {
    let info = client
        .request(format!("$JS.API.STREAM.INFO.{stream}"), "".into())
        .await
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&info.payload).ok()?;
    v["cluster"]["leader"].as_str().map(str::to_owned)
}

async fn session_read_through_a_cut_off_server(lead: bool, subnet: &str, prefix: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let net =
        Net::with_subnet(&format!("{prefix}{}", std::process::id()), 3, subnet, true).unwrap();
    let _nats = NatsCluster::start(&net, &[0, 1, 2], tmp.path()).unwrap();
    let limits = QueueLimits {
        max_messages: 100,
        max_bytes: 1 << 20,
        max_age_ms: 3_600_000,
        retained_bytes: 1 << 20,
    };
    // A node on server 0 and one on server 1, nothing else between them.
    let connect = |i: usize| {
        let cfg = BusConfig {
            servers: vec![format!("nats://{}:{CLIENT}", net.addr(i))],
            ca: None,
            identity: None,
            replicas: 3,
            max_age: Duration::from_secs(3600),
        };
        let limits = &limits;
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                match Bus::connect(&cfg, limits, BusKey::derive(b"k"), Arc::new(Unobserved)).await {
                    Ok(bus) => return bus,
                    Err(e) if Instant::now() < deadline => {
                        eprintln!("server {i}: {e:#}; again");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    Err(e) => panic!("server {i}: {e:#}"),
                }
            }
        }
    };
    let (cut, other) = (connect(0).await, connect(1).await);
    let (cut, other) = (cut.keeper(), other.keeper());
    let id = DeviceId::try_new("dev-1").unwrap();
    // Records told apart by their expiry (their disconnect is dated by
    // when JetStream stored them).
    let record = |expiry_secs| SessionRecord {
        filters: Vec::new(),
        expiry_secs,
        disconnected_at: Some(1),
    };
    let expiry = |r: Result<Option<SessionRecord>, _>| r.ok().flatten().map(|r| r.expiry_secs);
    other.save_session(&id, &record(1), true).unwrap();
    // Server 0 has it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while expiry(cut.session(&id)) != Some(1) {
        assert!(Instant::now() < deadline, "server 0 never had the session");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Server 0 ("n0") leading the stream, or not, as asked.
    let admin = async_nats::connect(format!("nats://{}:{CLIENT}", net.addr(1)))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = leader(&admin, "FLEETGATE_SESSIONS").await;
        if now.is_some() && (now.as_deref() == Some("n0")) == lead {
            break;
        }
        assert!(Instant::now() < deadline, "the leader stayed {now:?}");
        let _ = admin
            .request(
                "$JS.API.STREAM.LEADER.STEPDOWN.FLEETGATE_SESSIONS",
                "".into(),
            )
            .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Server 0 cut off from the other two, which take the next write.
    net.partition(0, 1).unwrap();
    net.partition(0, 2).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Err(e) = other.save_session(&id, &record(2), true) {
        assert!(
            Instant::now() < deadline,
            "servers 1 and 2 took no write: {e}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Through server 0: the new record, or no answer; never the old.
    for _ in 0..5 {
        let read = cut.session(&id);
        assert!(
            !matches!(read, Ok(Some(ref r)) if r.expiry_secs == 1),
            "read the session server 0 was left with: {read:?}"
        );
    }
    // Healed, server 0 has the new one.
    net.heal(0, 1).unwrap();
    net.heal(0, 2).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while expiry(cut.session(&id)) != Some(2) {
        assert!(Instant::now() < deadline, "server 0 never caught up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
