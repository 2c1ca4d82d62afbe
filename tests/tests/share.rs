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
