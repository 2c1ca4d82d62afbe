//! A real etcd cluster on the run's network, under the faults the harness
//! will inject: a member cut off from the other two loses its leader
//! while they keep theirs, and is healthy again once healed; a member
//! killed (kill -9) and restarted rejoins. As root, with iproute2, etcd
//! and curl.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::time::{Duration, Instant};

use faults::etcd::EtcdCluster;
use faults::net::Net;

/// Polls `cond` every 200 ms until it holds, or fails after `within`.
fn until(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_member_cut_off_loses_its_leader_and_heals_and_a_killed_one_rejoins() {
    let tmp = tempfile::tempdir().unwrap();
    let net = Net::new(&format!("fge{}n", std::process::id()), 3).unwrap();
    let mut etcd = EtcdCluster::start(&net, &[0, 1, 2], tmp.path()).unwrap();
    for i in 0..3 {
        until(Duration::from_secs(30), "a member is healthy", || {
            etcd.healthy(&net, i, i)
        });
    }
    assert!(etcd.url(&net).starts_with("etcd://10.77.0.1:2379,"));

    // Member 0 alone: no leader there; the other two keep theirs.
    net.partition(0, 1).unwrap();
    net.partition(0, 2).unwrap();
    until(
        Duration::from_secs(20),
        "the cut-off member loses its leader",
        || !etcd.healthy(&net, 0, 0),
    );
    // (If it was the leader, the other two elect one first.)
    until(
        Duration::from_secs(20),
        "the other two keep a leader",
        || etcd.healthy(&net, 1, 1) && etcd.healthy(&net, 2, 2),
    );
    net.heal(0, 1).unwrap();
    net.heal(0, 2).unwrap();
    until(
        Duration::from_secs(30),
        "the healed member has a leader again",
        || etcd.healthy(&net, 0, 0),
    );

    // kill -9 and a restart on its data.
    etcd.kill(2);
    until(
        Duration::from_secs(10),
        "a killed member stops answering",
        || !etcd.healthy(&net, 1, 2),
    );
    until(
        Duration::from_secs(20),
        "the two left keep a leader",
        || etcd.healthy(&net, 0, 0) && etcd.healthy(&net, 1, 1),
    );
    etcd.restart(&net, 2).unwrap();
    until(
        Duration::from_secs(30),
        "the restarted member rejoins",
        || etcd.healthy(&net, 2, 2),
    );
}
