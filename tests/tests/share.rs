//! `$share` groups across nodes: a group's first member is subscribed, on
//! every node, from its SUBACK on.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{Event, Outgoing, Packet, QoS};
use tests::mqtt::{client, connected};

/// Every message a device on node two has acknowledged after a share
/// group's first member on node one got its SUBACK reaches that member.
/// The SUBACK went out before the group's consumer existed on the bus,
/// and what was stored in between was lost to the group (the fault
/// harness, issue 30: a device's first telemetry, acknowledged, never
/// consumed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_share_group_gets_what_any_node_stored_after_its_first_suback() {
    let (tmp, _etcd, _nats, one, two) = tests::two_nodes(&[]);
    let creds = tmp.path().join("c");
    let dev = one.enroll(&creds, "device", "dev-1");
    let svc = one.enroll(&creds, "service", "backend");

    // The device on node two, publishing QoS 1 telemetry without pause;
    // when each was acknowledged.
    let (device, mut dev_ev) = client(two.mqtt, &dev, "dev-1");
    connected(&mut dev_ev).await;
    let acked: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let sent: Arc<Mutex<VecDeque<u64>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = tokio::spawn({
        let (sent, stop) = (sent.clone(), stop.clone());
        async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                sent.lock().unwrap().push_back(n);
                device
                    .publish(
                        "devices/dev-1/telemetry",
                        QoS::AtLeastOnce,
                        false,
                        n.to_string(),
                    )
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    });
    let device_loop = tokio::spawn({
        let (sent, acked) = (sent.clone(), acked.clone());
        async move {
            let mut by_pkid = HashMap::new();
            loop {
                match dev_ev.poll().await {
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                        if let Some(n) = sent.lock().unwrap().pop_front() {
                            by_pkid.insert(pkid, n);
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(a))) => {
                        if let Some(n) = by_pkid.remove(&a.pkid) {
                            acked.lock().unwrap().insert(n, Instant::now());
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        }
    });
    tests::eventually(Duration::from_secs(10), "telemetry acknowledged", || {
        (acked.lock().unwrap().len() > 20).then_some(())
    });

    // The group's first member, on node one.
    let (service, mut svc_ev) = client(one.mqtt, &svc, "backend");
    connected(&mut svc_ev).await;
    service
        .subscribe("$share/g/devices/+/telemetry", QoS::AtLeastOnce)
        .await
        .unwrap();
    let mut got = BTreeSet::new();
    let subscribed = loop {
        match tokio::time::timeout(Duration::from_secs(10), svc_ev.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => break Instant::now(),
            Ok(Ok(_)) => {}
            other => panic!("no SUBACK: {other:?}"),
        }
    };
    // A second and a half of telemetry after it, then the device stops.
    let until = Instant::now() + Duration::from_millis(1500);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if Instant::now() > until {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let wanted: BTreeSet<u64> = acked
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, at)| **at > subscribed)
            .map(|(n, _)| *n)
            .collect();
        let missing: Vec<u64> = wanted.difference(&got).copied().collect();
        if Instant::now() > until + Duration::from_secs(1) && missing.is_empty() {
            assert!(
                wanted.len() > 50,
                "only {} acknowledged after the SUBACK",
                wanted.len()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "acknowledged after the SUBACK, never received by the group: {missing:?}"
        );
        if let Ok(Ok(Event::Incoming(Packet::Publish(p)))) =
            tokio::time::timeout(Duration::from_millis(200), svc_ev.poll()).await
        {
            got.insert(String::from_utf8_lossy(&p.payload).parse::<u64>().unwrap());
        }
    }
    publisher.abort();
    device_loop.abort();
}

/// A group's message is the member's to lose only once the member has
/// acknowledged it: what a member received and did not acknowledge before
/// its connection ended goes to another member. Each node acknowledged a
/// group's message to the stream once it was in its router, so a member
/// that went away with messages in flight took them with it (a clean
/// session keeps nothing: lost, though the device had its PUBACK).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_member_left_unacknowledged_goes_to_another_member() {
    let (tmp, _etcd, nats, one, two) = tests::two_nodes(&[]);
    let creds = tmp.path().join("c");
    let dev = one.enroll(&creds, "device", "dev-1");
    let svc_a = one.enroll(&creds, "service", "backend-a");
    let svc_b = one.enroll(&creds, "service", "backend-b");
    let filter = "$share/g/devices/+/telemetry";

    // Member a, on node one, takes messages and never acknowledges them.
    let mut opts = tests::mqtt::options(one.mqtt, &svc_a, "backend-a");
    opts.set_manual_acks(true);
    let (a, mut a_ev) = rumqttc::AsyncClient::new(opts, 16);
    connected(&mut a_ev).await;
    a.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), a_ev.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => break,
            Ok(Ok(_)) => {}
            other => panic!("no SUBACK: {other:?}"),
        }
    }

    // The device, on node two: five QoS 1 messages, each acknowledged.
    let (device, mut dev_ev) = client(two.mqtt, &dev, "dev-1");
    connected(&mut dev_ev).await;
    for n in 1..=5 {
        device
            .publish(
                "devices/dev-1/telemetry",
                QoS::AtLeastOnce,
                false,
                n.to_string(),
            )
            .await
            .unwrap();
    }
    let mut acked = 0;
    while acked < 5 {
        match tokio::time::timeout(Duration::from_secs(10), dev_ev.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            other => panic!("telemetry not acknowledged: {other:?}"),
        }
    }

    // Member a gets all five, acknowledges none, and goes away.
    let mut held = BTreeSet::new();
    while held.len() < 5 {
        match tokio::time::timeout(Duration::from_secs(10), a_ev.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                held.insert(String::from_utf8_lossy(&p.payload).into_owned());
            }
            Ok(Ok(_)) => {}
            other => panic!("member a got {held:?} only: {other:?}"),
        }
    }
    // JetStream still holds them as handed out: a node acknowledges a
    // group's message only once its member has.
    let pending = || nats.ack_pending(0, "FLEETGATE_MSG", "share-");
    tests::eventually(Duration::from_secs(10), "five pending", || {
        (pending() == Some(5)).then_some(())
    });
    drop(a);
    drop(a_ev);

    // Member b, on node two, joins: it gets the five.
    let (b, mut b_ev) = client(two.mqtt, &svc_b, "backend-b");
    connected(&mut b_ev).await;
    b.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    let mut got = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while got != held {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, b_ev.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                got.insert(String::from_utf8_lossy(&p.payload).into_owned());
            }
            Ok(Ok(_)) => {}
            other => {
                let tail = |s: &tests::Server| {
                    let log = s.log();
                    log[log.len().saturating_sub(25)..].join("\n")
                };
                panic!(
                    "member b got {got:?} of the {held:?} member a left unacknowledged: {other:?}\n\
                     node one's log ends:\n{}\nnode two's log ends:\n{}",
                    tail(&one),
                    tail(&two)
                )
            }
        }
    }
    // Member b acknowledged them (rumqttc does): done with, on the stream.
    tests::eventually(Duration::from_secs(10), "none pending", || {
        (pending() == Some(0)).then_some(())
    });
    drop(device);
}
