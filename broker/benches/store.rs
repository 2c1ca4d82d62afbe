//! The registry on sled beside the registry on etcd, same operations, same
//! devices, one run: linearizable status lookups/s (a read from etcd each:
//! what a device GET asks), admission's lookups/s (from the node's view,
//! which the watch keeps current; OCSP reads it too), and flushed status changes/s (each one committed before
//! it returns: fsync on sled, a majority's raft commit on etcd), beside
//! each store's floor (a commit of one key, nothing read).
//!
//! FLEETGATE_BENCH_ETCD=127.0.0.1:2379 cargo bench -p broker --bench store
//! (bench/cluster.sh starts an etcd member and runs it.)

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use broker::etcd::EtcdStore;
use provisioning::store::{Commit, SledStore, Space, Store, Write};
use provisioning::{
    Authority, CertKey, DeviceId, Identity, InitOptions, IssuedCert, NewDevice, Registry, Role,
    DEFAULT_CERT_LIFETIME,
};

const LOOKUP_TIME: Duration = Duration::from_secs(3);

mod common;
use common::Rng;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Figures for one store, in the order of [`ROWS`].
type Figures = Vec<f64>;

const ROWS: [&str; 8] = [
    "status lookup (linearizable), 1 thread",
    "status lookup (linearizable), 2 threads",
    "admission lookup (node's view), 2 threads",
    "flushed status change, 1 thread",
    "flushed status change, 2 threads",
    "flushed status change, 4 threads",
    "flushed status change, 8 threads",
    "the store's floor: a one-key commit, 1 thread",
];

/// The writer threads of the concurrent status-change rows: operators'
/// scripts and the API's handlers change statuses side by side, and a
/// shared store groups concurrent commits into one round trip.
const WRITERS: [u64; 3] = [2, 4, 8];

/// Durable commits/s of one key each, one after another: the least a
/// registry write can cost on `store` (an fsync on sled; a round trip and a
/// majority's raft commit on etcd).
fn floor(store: &dyn Store, writes: usize) -> f64 {
    let t = Instant::now();
    for i in 0..writes {
        let w = vec![Write {
            space: Space::Meta,
            key: format!("bench-floor/{}", i % 16).into_bytes(),
            value: Some(i.to_be_bytes().to_vec()),
        }];
        assert!(store.commit(Commit::writes(w)).expect("commit"));
    }
    writes as f64 / t.elapsed().as_secs_f64()
}

fn main() {
    let Ok(etcd) = std::env::var("FLEETGATE_BENCH_ETCD") else {
        eprintln!("set FLEETGATE_BENCH_ETCD=host:port of an etcd member (bench/cluster.sh does)");
        return;
    };
    let devices = env("FLEETGATE_BENCH_DEVICES", 2000);
    let writes = env("FLEETGATE_BENCH_WRITES", 200);
    let tmp = tempfile::tempdir().expect("temp dir");

    println!("registry on sled beside etcd ({etcd}): {devices} devices, {writes} writes");
    let mut sled = run(&tmp.path().join("sled"), None, devices, writes);
    let raw = SledStore::open(&tmp.path().join("raw")).expect("sled");
    sled.push(floor(&raw, writes));
    // A prefix of its own, so the bench runs again on the same member.
    let prefix = format!(
        "fleetgate-bench/{}/",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    let store = EtcdStore::connect(vec![etcd], &prefix).expect("etcd");
    let store = Arc::new(store);
    // The watch keeps the node's view current, as in `serve`.
    store.watch(|_| {});
    let mut etcd = run(
        &tmp.path().join("etcd"),
        Some(store.clone() as Arc<dyn Store>),
        devices,
        writes,
    );
    etcd.push(floor(&*store, writes));

    println!();
    println!(
        "{:<44} {:>12} {:>12} {:>8}",
        "operation", "sled/s", "etcd/s", "etcd/sled"
    );
    for (i, name) in ROWS.iter().enumerate() {
        println!(
            "{name:<44} {:>12.0} {:>12.0} {:>7.2}x",
            sled[i],
            etcd[i],
            etcd[i] / sled[i]
        );
    }
}

fn run(
    dir: &std::path::Path,
    store: Option<Arc<dyn Store>>,
    devices: usize,
    writes: usize,
) -> Figures {
    let opts = InitOptions {
        store,
        ..InitOptions::default()
    };
    let auth = Authority::open_or_init(dir, &opts).expect("init");
    let key = rcgen::KeyPair::generate().expect("key");
    let t = Instant::now();
    let mut serials: Vec<CertKey> = Vec::with_capacity(devices);
    let mut ids: Vec<DeviceId> = Vec::with_capacity(devices);
    for start in (0..devices).step_by(200) {
        let batch: Vec<(NewDevice, IssuedCert)> = (start..(start + 200).min(devices))
            .map(|i| {
                let identity = Identity {
                    role: Role::Device,
                    id: DeviceId::try_new(format!("dev-{i:07}")).expect("id"),
                };
                let (new, cert) = auth
                    .issue_new(&key, &identity, None, DEFAULT_CERT_LIFETIME)
                    .expect("issue");
                (new, cert)
            })
            .collect();
        for (new, cert) in &batch {
            serials.push(cert.key());
            ids.push(new.id.clone());
        }
        for r in auth.registry.enroll_batch(&batch, "bench").expect("batch") {
            r.expect("enroll");
        }
    }
    let populate = t.elapsed().as_secs_f64();
    println!(
        "  {}: populated in {populate:.1} s ({:.0} enrollments/s incl. signing)",
        if opts.store.is_some() { "etcd" } else { "sled" },
        devices as f64 / populate
    );

    let registry = auth.registry.clone();
    let recent = registry.recent();
    let lookup = |r: &Registry| {
        let r = r.clone();
        move |s: &CertKey| {
            let (_, standing) = r.standing(s).expect("lookup").expect("known");
            std::hint::black_box(standing);
        }
    };
    let mut out = vec![
        rate(1, &serials, lookup(&registry)),
        rate(2, &serials, lookup(&registry)),
        rate(2, &serials, lookup(&recent)),
    ];

    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let t = Instant::now();
    for _ in 0..writes / 2 {
        let id = &ids[rng.below(ids.len())];
        registry.suspend(id, "bench").expect("suspend");
        registry.resume(id, "bench").expect("resume");
    }
    out.push(writes as f64 / t.elapsed().as_secs_f64());

    for writers in WRITERS {
        out.push(status_changes(&registry, &ids, writers, writes));
    }
    out
}

/// Flushed status changes/s on `writers` threads, `writes` in all: each
/// suspends a random device and resumes it.
fn status_changes(registry: &Registry, ids: &[DeviceId], writers: u64, writes: usize) -> f64 {
    let done = AtomicU64::new(0);
    let t = Instant::now();
    std::thread::scope(|scope| {
        for w in 0..writers {
            let done = &done;
            scope.spawn(move || {
                let mut rng = Rng(0x1234_5678 + w);
                for _ in 0..writes / (2 * writers as usize) {
                    let id = &ids[rng.below(ids.len())];
                    // Two writers may pick the same device: the loser's
                    // suspend is refused, and counts for nothing.
                    if registry.suspend(id, "bench").is_ok() {
                        registry.resume(id, "bench").expect("resume");
                        done.fetch_add(2, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    done.load(Ordering::Relaxed) as f64 / t.elapsed().as_secs_f64()
}

/// Operations per second of `op` over random serials on `threads` threads.
fn rate(threads: u64, serials: &[CertKey], op: impl Fn(&CertKey) + Send + Sync + Clone) -> f64 {
    let total = AtomicU64::new(0);
    let start = Instant::now();
    std::thread::scope(|scope| {
        for t in 0..threads {
            let op = op.clone();
            let total = &total;
            scope.spawn(move || {
                let mut rng = Rng(0xdead_beef + t);
                let mut n = 0u64;
                while start.elapsed() < LOOKUP_TIME {
                    for _ in 0..16 {
                        op(&serials[rng.below(serials.len())]);
                    }
                    n += 16;
                }
                total.fetch_add(n, Ordering::Relaxed);
            });
        }
    });
    total.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}
