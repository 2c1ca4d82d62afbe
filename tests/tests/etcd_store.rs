//! The registry over a real etcd (Debian `etcd-server`, installed by
//! `.ci/run`, started here on loopback ports): two registries on one etcd
//! behave as two nodes on one registry.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::sync::Arc;

use provisioning::sessions::SessionStore;
use provisioning::store::{Commit, Space, Store, Txn};
use provisioning::{
    Authority, DeviceId, Error, Identity, InitOptions, Registry, RevocationReason, Role, Standing,
    DEFAULT_CERT_LIFETIME,
};
use tests::etcd::Etcd;

#[test]
fn a_commit_holds_only_if_what_was_read_still_is() {
    let tmp = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&tmp.path().join("etcd"));
    let s = etcd.store();
    let a = Txn::new(&s);
    assert_eq!(a.get(Space::Devices, b"d").unwrap(), None);
    a.insert(Space::Devices, b"d", b"first");
    let b = Txn::new(&s);
    assert_eq!(b.get(Space::Devices, b"d").unwrap(), None);
    b.insert(Space::Devices, b"d", b"second");
    assert!(b.commit(true).unwrap());
    assert!(
        !a.commit(true).unwrap(),
        "a read an absent key that is now there"
    );
    assert_eq!(
        s.get(Space::Devices, b"d").unwrap().as_deref(),
        Some(&b"second"[..])
    );
    // Scans page through more than one range request. (etcd takes at most
    // 128 operations in one transaction by default.)
    for chunk in 0..11u32 {
        let c = Txn::new(&s);
        for i in chunk * 100..(chunk + 1) * 100 {
            c.insert(Space::ByStatus, format!("p/{i:05}").as_bytes(), b"");
        }
        assert!(c.commit(true).unwrap());
    }
    let c = Txn::new(&s);
    c.insert(Space::ByStatus, b"q/1", b"");
    assert!(c.commit(true).unwrap());
    let keys: Vec<Vec<u8>> = s
        .scan(Space::ByStatus, b"p/", b"p/00100")
        .map(|kv| kv.unwrap().0)
        .collect();
    assert_eq!(keys.len(), 1000);
    assert_eq!(keys[0], b"p/00100".to_vec());
    assert_eq!(s.len(Space::ByStatus).unwrap(), 1101);
    // Too many operations for one etcd transaction: a clear error, nothing
    // written.
    let big = Txn::new(&s);
    for i in 0..200u32 {
        big.insert(Space::Claims, format!("c/{i}").as_bytes(), b"");
    }
    match big.commit(true) {
        Err(Error::Storage(why)) => assert!(why.contains("too many operations"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(s.len(Space::Claims).unwrap(), 0);
    // Counters go up, whoever asks.
    let other = etcd.store();
    let (x, y) = (s.next("audit").unwrap(), other.next("audit").unwrap());
    assert!(y > x);
}

#[test]
fn two_nodes_share_one_registry() {
    let tmp = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&tmp.path().join("etcd"));
    // The CA signs; both registries are the same etcd keys.
    let auth = Authority::open_or_init(&tmp.path().join("data"), &InitOptions::default()).unwrap();
    let node = |n: &str| {
        Registry::over(
            Arc::new(etcd.store()),
            SessionStore::open_at(&tmp.path().join(format!("sessions-{n}"))).unwrap(),
        )
        .unwrap()
    };
    let (one, two) = (node("1"), node("2"));

    let key = rcgen::KeyPair::generate().unwrap();
    let id = DeviceId::try_new("dev-1").unwrap();
    let identity = Identity {
        role: Role::Device,
        id: id.clone(),
    };
    let (new, cert) = auth
        .issue_new(&key, &identity, None, DEFAULT_CERT_LIFETIME)
        .unwrap();
    one.enroll(&new, &cert, "node-1").unwrap();
    // Enrolled on node 1, in good standing on node 2.
    let (_, standing) = two.standing(&cert.key()).unwrap().unwrap();
    assert_eq!(standing, Standing::Good);
    // The same id on node 2 is taken.
    assert!(matches!(
        two.enroll(&new, &cert, "node-2"),
        Err(Error::AlreadyExists { .. })
    ));
    // Revoked on node 2: node 1 reads it revoked.
    two.revoke(&id, RevocationReason::KeyCompromise, "node-2")
        .unwrap();
    let (_, standing) = one.standing(&cert.key()).unwrap().unwrap();
    assert!(matches!(standing, Standing::Revoked(_)), "{standing:?}");
    // One audit log, one order; CRL numbers go up across nodes.
    let audit = one.audit(None, 100).unwrap().items;
    let actions: Vec<&str> = audit.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(actions, ["enroll", "revoke"]);
    assert!(audit[0].seq < audit[1].seq);
    let a = one.next_crl_number("issuing").unwrap();
    let b = two.next_crl_number("issuing").unwrap();
    let c = one.next_crl_number("issuing").unwrap();
    assert_eq!((b, c), (a + 1, a + 2));
    assert!(one.check().unwrap().problems.is_empty());
}

#[test]
fn without_etcd_writes_fail_and_nothing_is_acknowledged() {
    let tmp = tempfile::tempdir().unwrap();
    let mut etcd = Etcd::start(&tmp.path().join("etcd"));
    let store = etcd.store();
    etcd.kill(0);
    let t = Txn::new(&store);
    t.insert(Space::Devices, b"d", b"x");
    match t.commit(true) {
        Err(Error::Unavailable(why)) => assert!(why.contains("etcd"), "{why}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_bulk_revocation_larger_than_one_etcd_transaction() {
    let tmp = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&tmp.path().join("etcd"));
    let auth = Authority::open_or_init(&tmp.path().join("data"), &InitOptions::default()).unwrap();
    let r = Registry::over(
        Arc::new(etcd.store()),
        SessionStore::open_at(&tmp.path().join("sessions")).unwrap(),
    )
    .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut ids = Vec::new();
    for i in 0..60 {
        let id = DeviceId::try_new(format!("lot-{i:02}")).unwrap();
        let identity = Identity {
            role: Role::Device,
            id: id.clone(),
        };
        let (new, cert) = auth
            .issue_new(&key, &identity, None, DEFAULT_CERT_LIFETIME)
            .unwrap();
        r.enroll(&new, &cert, "test").unwrap();
        ids.push(id);
    }
    ids.push(DeviceId::try_new("nobody").unwrap());
    // 60 devices' writes are several times etcd's 128 operations.
    let out = r
        .revoke_many(&ids, RevocationReason::KeyCompromise, "test")
        .unwrap();
    assert_eq!(out.revoked.len(), 60);
    assert_eq!(out.not_found.len(), 1);
    for id in &ids[..60] {
        assert_eq!(r.device(id).unwrap().status, provisioning::Status::Revoked);
    }
    assert!(r.check().unwrap().problems.is_empty());
}

/// A page of a scan may be far over gRPC's default 4 MiB a message (the
/// audit log's sealed segments are some 80 KB each): it is read whole.
#[test]
fn a_scan_reads_pages_of_large_values() {
    let tmp = tempfile::tempdir().unwrap();
    let etcd = tests::etcd::Etcd::start(&tmp.path().join("etcd"));
    let store = etcd.store();
    let big = vec![7u8; 600 * 1024];
    for i in 0..10u8 {
        let w = vec![provisioning::store::Write {
            space: Space::Meta,
            key: format!("big/{i}").into_bytes(),
            value: Some(big.clone()),
        }];
        assert!(store.commit(Commit::writes(w)).unwrap());
    }
    let read: Vec<_> = store
        .scan(Space::Meta, b"big/", b"")
        .map(|kv| kv.unwrap())
        .collect();
    assert_eq!(read.len(), 10);
    assert!(read.iter().all(|(_, v)| v.len() == big.len()));
}

/// Group commit: a node's concurrent commits share etcd transactions, yet
/// each holds only on what it read (no update lost on a key every thread
/// increments), and what they append is numbered densely, each number
/// once, across two nodes.
#[test]
fn concurrent_commits_on_two_nodes_lose_no_update_and_number_appends_densely() {
    const THREADS: usize = 6;
    const EACH: usize = 15;
    let tmp = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&tmp.path().join("etcd"));
    let nodes = [Arc::new(etcd.store()), Arc::new(etcd.store())];
    let count = |v: Option<Vec<u8>>| {
        v.map_or(0, |v| {
            String::from_utf8(v).unwrap().parse::<usize>().unwrap()
        })
    };
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let node = nodes[t % 2].clone();
            s.spawn(move || {
                for i in 0..EACH {
                    // A read-modify-write of the key all threads share, run
                    // again until it holds, as the registry does.
                    let held = (0..100).any(|_| {
                        let txn = Txn::new(&*node);
                        let n = count(txn.get(Space::Meta, b"shared").unwrap());
                        txn.insert(Space::Meta, b"shared", (n + 1).to_string().as_bytes());
                        let tag = format!("rmw {t}/{i}");
                        txn.append(
                            Space::Audit,
                            "audit",
                            move |seq| format!("{seq} {tag}").into_bytes(),
                            None,
                        );
                        txn.commit(true).unwrap()
                    });
                    assert!(held, "an increment never held");
                    // Writes only: nothing to clash, it goes with the others.
                    let txn = Txn::new(&*node);
                    txn.insert(Space::Claims, format!("own/{t}/{i}").as_bytes(), b"");
                    let tag = format!("own {t}/{i}");
                    // Indexed under its thread, as the log is by device.
                    let index = (Space::AuditByDevice, format!("t{t}\0").into_bytes());
                    txn.append(
                        Space::Audit,
                        "audit",
                        move |seq| format!("{seq} {tag}").into_bytes(),
                        Some(index),
                    );
                    assert!(txn.commit(true).unwrap());
                }
            });
        }
    });
    let total = THREADS * EACH;
    assert_eq!(
        count(nodes[1].get(Space::Meta, b"shared").unwrap()),
        total,
        "an increment was lost"
    );
    assert_eq!(nodes[0].len(Space::Claims).unwrap(), total);
    let entries: Vec<(Vec<u8>, Vec<u8>)> = nodes[0]
        .scan(Space::Audit, b"", b"")
        .map(|kv| kv.unwrap())
        .collect();
    assert_eq!(entries.len(), 2 * total);
    let mut tags = std::collections::HashSet::new();
    for (i, (k, v)) in entries.iter().enumerate() {
        let seq = u64::from_be_bytes(k.as_slice().try_into().unwrap());
        assert_eq!(seq, i as u64 + 1, "numbers are dense from 1");
        let v = String::from_utf8(v.clone()).unwrap();
        let (n, tag) = v.split_once(' ').unwrap();
        assert_eq!(n, seq.to_string(), "the entry holds its own number");
        assert!(tags.insert(tag.to_owned()), "{tag} appended twice");
    }
    // Each thread's index lists its own entries, by their numbers.
    for t in 0..THREADS {
        let prefix = format!("t{t}\0").into_bytes();
        let listed: Vec<Vec<u8>> = nodes[1]
            .scan(Space::AuditByDevice, &prefix, b"")
            .map(|kv| kv.unwrap().0)
            .collect();
        assert_eq!(listed.len(), EACH);
        for k in listed {
            let v = nodes[1]
                .get(Space::Audit, &k[prefix.len()..])
                .unwrap()
                .unwrap();
            let v = String::from_utf8(v).unwrap();
            assert!(v.contains(&format!(" own {t}/")), "{v} under t{t}");
        }
    }
    // The counter says where the next number starts, whichever node asks.
    assert_eq!(nodes[1].next("audit").unwrap(), 2 * total as u64 + 1);
}

/// Writes `n` small keys into `space`, a transaction per 100.
fn fill(store: &dyn Store, space: Space, n: usize) -> Vec<Vec<u8>> {
    let keys: Vec<Vec<u8>> = (0..n).map(|i| format!("k{i:05}").into_bytes()).collect();
    for chunk in keys.chunks(100) {
        let w = chunk
            .iter()
            .map(|k| provisioning::store::Write {
                space,
                key: k.clone(),
                value: Some([b"value of ".as_slice(), k].concat()),
            })
            .collect();
        assert!(store.commit(Commit::writes(w)).unwrap());
    }
    keys
}

/// A long scan reads ever larger pages (512 keys, then 1,024, ...): every
/// key once, in order, forwards and backwards.
#[test]
fn a_long_scan_reads_every_key_once_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&tmp.path().join("etcd"));
    let store = etcd.store();
    let keys = fill(&store, Space::Meta, 5_000);
    let read: Vec<Vec<u8>> = store
        .scan(Space::Meta, b"k", b"")
        .map(|kv| kv.unwrap().0)
        .collect();
    assert_eq!(read, keys);
    let back: Vec<Vec<u8>> = store
        .scan_rev(Space::Meta, b"k", b"")
        .map(|kv| kv.unwrap().0)
        .collect();
    assert_eq!(back, keys.iter().rev().cloned().collect::<Vec<_>>());
    // From the middle.
    let from: Vec<Vec<u8>> = store
        .scan(Space::Meta, b"k", b"k02500")
        .map(|kv| kv.unwrap().0)
        .collect();
    assert_eq!(from, keys[2_500..]);
    // Between two keys: the store is told where the scan stops.
    let between: Vec<Vec<u8>> = store
        .scan_between(Space::Meta, b"k01000", b"k01010")
        .map(|kv| kv.unwrap().0)
        .collect();
    assert_eq!(between, keys[1_000..1_010]);
    // Again from the start: up to the end of the first page the last
    // scan read, and what was put before it since, then on from there.
    assert!(store
        .commit(Commit::writes(vec![provisioning::store::Write {
            space: Space::Meta,
            key: b"k".to_vec(),
            value: Some(b"before the first".to_vec()),
        }]))
        .unwrap());
    let again: Vec<Vec<u8>> = store
        .scan(Space::Meta, b"k", b"")
        .map(|kv| kv.unwrap().0)
        .collect();
    assert_eq!(again, [&[b"k".to_vec()][..], &keys].concat());
    // Newest first below a key (a cursor): read through windows widening
    // from that key.
    let below: Vec<Vec<u8>> = store
        .scan_rev(Space::Meta, b"k", b"k02500")
        .map(|kv| kv.unwrap().0)
        .collect();
    assert_eq!(
        below,
        keys[..2_500]
            .iter()
            .rev()
            .cloned()
            .chain([b"k".to_vec()])
            .collect::<Vec<_>>()
    );
}

/// Counts requests to etcd.
#[derive(Debug, Default)]
struct Requests(std::sync::atomic::AtomicU64);

impl broker::etcd::Observer for Requests {
    fn request(&self, _: std::time::Duration) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    fn error(&self) {}
    fn watch_events(&self, _: u64) {}
    fn watch_interrupted(&self) {}
    fn integrity_violation(&self) {}
}

/// The keys `scan_recent` reads of `space`.
fn recent_keys(store: &dyn Store, space: Space, prefix: &[u8], start: &[u8]) -> Vec<Vec<u8>> {
    store
        .scan_recent(space, prefix, start)
        .map(|kv| kv.unwrap().0)
        .collect()
}

/// A node that warmed its view with its watch open (what `serve` does at
/// start) holds the device records whole: its scans for the console read
/// the view (no request to etcd), which follows other nodes' writes and
/// deletions; with etcd gone, it still answers for every device, where a
/// node that only read some answers for those alone. A warm-up stops at
/// its budget.
#[test]
fn a_warmed_view_holds_every_record_and_follows_other_nodes() {
    let tmp = tempfile::tempdir().unwrap();
    let mut etcd = Etcd::start(&tmp.path().join("etcd"));
    let mut keys = fill(&etcd.store(), Space::Devices, 6_000);
    fill(&etcd.store(), Space::Meta, 10);

    let requests = Arc::new(Requests::default());
    let warmed = broker::etcd::EtcdStore::connect_counted(
        vec![etcd.url().trim_start_matches("etcd://").to_owned()],
        "fleetgate/",
        None,
        requests.clone(),
    )
    .unwrap();
    warmed.watch(|_| {});
    assert_eq!(warmed.warm(Space::Devices, u64::MAX).unwrap(), keys.len());
    // Only what admission reads is kept.
    assert_eq!(warmed.warm(Space::Meta, u64::MAX).unwrap(), 0);

    // Another node adds a device and deletes one; the view follows.
    let other = etcd.store();
    let w = |key: &[u8], value: Option<&[u8]>| provisioning::store::Write {
        space: Space::Devices,
        key: key.to_vec(),
        value: value.map(<[u8]>::to_vec),
    };
    let gone = keys.remove(3);
    assert!(other
        .commit(Commit::writes(vec![
            w(b"k99999", Some(b"new")),
            w(&gone, None)
        ]))
        .unwrap());
    keys.push(b"k99999".to_vec());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let before = requests.0.load(std::sync::atomic::Ordering::Relaxed);
        let read = recent_keys(&warmed, Space::Devices, b"", b"");
        let took = requests.0.load(std::sync::atomic::Ordering::Relaxed) - before;
        // From the view: no page of 512 then 1,024 ... from etcd (a
        // heartbeat may fall in between).
        if read == keys && took < 3 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the view did not follow: {} keys, {took} requests",
            read.len()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(
        recent_keys(&warmed, Space::Devices, b"k05", b"k05995"),
        keys[keys.len() - 6..keys.len() - 1]
    );
    assert_eq!(
        recent_keys(&warmed, Space::Devices, b"k0000", b""),
        keys[..9]
    );

    let cold = etcd.store();
    assert!(cold.get(Space::Devices, &keys[7]).unwrap().is_some());
    let small = etcd.store();
    let some = small.warm(Space::Devices, 100 * 1024).unwrap();
    assert!(some > 0 && some < keys.len(), "{some}");

    etcd.kill(0);
    for k in keys.iter().step_by(37).chain([&keys[keys.len() - 2]]) {
        let value = warmed.get(Space::Devices, k).unwrap();
        assert_eq!(value.unwrap(), [b"value of ".as_slice(), k].concat());
    }
    assert_eq!(
        warmed.get(Space::Devices, b"k99999").unwrap().unwrap(),
        b"new"
    );
    assert_eq!(warmed.get(Space::Devices, &gone).unwrap(), None);
    assert!(cold.get(Space::Devices, &keys[7]).unwrap().is_some());
    match cold.get(Space::Devices, &keys[8]) {
        Err(Error::Unavailable(why)) => assert!(why.contains("not in this node's view"), "{why}"),
        other => panic!("{other:?}"),
    }
}
