//! The audit log's seal and `audit verify` at size: N entries (default
//! 100,000) written straight into the store, then sealed (chained and
//! signed, 1,000 a checkpoint) and verified, on sled beside etcd in one run.
//!
//! FLEETGATE_BENCH_ETCD=127.0.0.1:2379 cargo bench -p broker --bench audit
//! (bash bench/audit.sh starts an etcd member and runs it; without an etcd
//! member, sled alone.)

use std::sync::Arc;
use std::time::Instant;

use broker::etcd::EtcdStore;
use provisioning::store::{Space, Store, Txn};
use provisioning::{AuditEntry, Authority, DeviceId, InitOptions};

fn main() {
    let n: u64 = std::env::var("FLEETGATE_BENCH_ENTRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let tmp = tempfile::tempdir().expect("temp dir");
    println!("audit log of {n} entries: seal, then verify");
    let mut rows = vec![("sled", run(&tmp.path().join("sled"), None, n))];
    if let Ok(etcd) = std::env::var("FLEETGATE_BENCH_ETCD") {
        let root = format!("fleetgate-audit-bench-{}/", std::process::id());
        let store = Arc::new(EtcdStore::connect(vec![etcd], &root).expect("etcd"));
        rows.push(("etcd", run(&tmp.path().join("etcd"), Some(store), n)));
    }
    println!();
    println!(
        "{:<6} {:>12} {:>12} {:>14}",
        "store", "write s", "seal s", "verify s"
    );
    for (name, (write, seal, verify)) in &rows {
        println!("{name:<6} {write:>12.2} {seal:>12.2} {verify:>14.2}");
    }
}

/// Seconds to write, seal and verify `n` entries.
fn run(dir: &std::path::Path, store: Option<Arc<dyn Store>>, n: u64) -> (f64, f64, f64) {
    let opts = InitOptions {
        store: store.clone(),
        ..InitOptions::default()
    };
    let auth = Authority::open_or_init(dir, &opts).expect("init");
    let store: Arc<dyn Store> = match store {
        Some(s) => s,
        None => {
            drop(auth);
            return run_sled(dir, n);
        }
    };
    let write = fill(&*store, n);
    let (seal, verify) = seal_and_verify(&auth, n);
    (write, seal, verify)
}

/// sled: the registry's own store, reopened through the authority.
fn run_sled(dir: &std::path::Path, n: u64) -> (f64, f64, f64) {
    let registry_dir = dir.join("registry");
    let store = provisioning::store::SledStore::open(&registry_dir).expect("sled");
    let write = fill(&store, n);
    drop(store);
    let auth = Authority::open_or_init(dir, &InitOptions::default()).expect("reopen");
    let (seal, verify) = seal_and_verify(&auth, n);
    (write, seal, verify)
}

fn fill(store: &dyn Store, n: u64) -> f64 {
    let t = Instant::now();
    let per = store.max_writes().min(100) as u64;
    let device = DeviceId::try_new("dev-0000001").expect("id");
    let at = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    for start in (1_000_000..1_000_000 + n).step_by(per as usize) {
        let txn = Txn::new(store);
        for seq in start..(start + per).min(1_000_000 + n) {
            let e = AuditEntry {
                seq,
                at,
                actor: "admin:admin".into(),
                action: "suspend".into(),
                device: Some(device.clone()),
                serial: None,
                detail: "status suspended".into(),
            };
            txn.insert(
                Space::Audit,
                &seq.to_be_bytes(),
                &serde_json::to_vec(&e).expect("json"),
            );
        }
        assert!(txn.commit(false).expect("commit"));
    }
    store.flush().expect("flush");
    t.elapsed().as_secs_f64()
}

fn seal_and_verify(auth: &Authority, n: u64) -> (f64, f64) {
    let t = Instant::now();
    while auth
        .seal_audit(time::Duration::ZERO, 1000)
        .expect("seal")
        .is_some()
    {}
    let seal = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let v = auth.verify_audit().expect("verify");
    let verify = t.elapsed().as_secs_f64();
    assert!(v.problems.is_empty(), "{:?}", v.problems);
    assert!(v.sealed >= n, "{} sealed of {n}", v.sealed);
    (seal, verify)
}
