//! Registry benchmark: status lookups/s and flushed writes/s at 100k devices,
//! each beside a baseline of raw sled doing the same IO (a get of a value of
//! the same size; an insert of the same size plus a flush), so the figures
//! read as "fleetgate's cost over the storage floor".
//!
//! cargo bench -p provisioning --bench registry            (100,000 devices)
//! FLEETGATE_BENCH_DEVICES=10000 cargo bench -p provisioning --bench registry

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use provisioning::{
    Authority, CertKey, DeviceId, Identity, InitOptions, IssuedCert, NewDevice, Role,
    DEFAULT_CERT_LIFETIME,
};

const LOOKUP_TIME: Duration = Duration::from_secs(3);
const WRITES: usize = 400;

/// xorshift64*: reproducible picks without a dependency.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n as u64) as usize
    }
}

fn main() {
    let devices: usize = std::env::var("FLEETGATE_BENCH_DEVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let tmp = tempfile::tempdir().expect("temp dir");
    let auth = Arc::new(
        Authority::open_or_init(&tmp.path().join("data"), &InitOptions::default()).expect("init"),
    );

    // Populate: real certificates (one key, each signed), 1,000 per flush.
    let key = rcgen::KeyPair::generate().expect("key");
    let t = Instant::now();
    let mut serials: Vec<CertKey> = Vec::with_capacity(devices);
    let mut ids: Vec<DeviceId> = Vec::with_capacity(devices);
    for chunk_start in (0..devices).step_by(1000) {
        let batch: Vec<(NewDevice, IssuedCert)> = (chunk_start..(chunk_start + 1000).min(devices))
            .map(|i| {
                let identity = Identity {
                    role: Role::Device,
                    id: DeviceId::try_new(format!("dev-{i:07}")).expect("id"),
                };
                let (new, cert) = auth
                    .issue_new(&key, &identity, Some("bench"), DEFAULT_CERT_LIFETIME)
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
    let populate = t.elapsed();
    println!(
        "registry benchmark: {devices} devices, populated in {:.1} s ({:.0} enrollments/s incl. signing, 1000 per flush)",
        populate.as_secs_f64(),
        devices as f64 / populate.as_secs_f64()
    );

    // Baseline store: raw sled, same number of keys, same value size.
    let raw = sled::Config::new()
        .path(tmp.path().join("raw"))
        .flush_every_ms(None)
        .open()
        .expect("raw sled");
    let sample = auth
        .registry
        .certificate(&serials[0])
        .expect("read")
        .expect("present");
    let value = serde_json::to_vec(&sample).expect("json");
    for s in &serials {
        raw.insert(s.to_bytes(), value.as_slice()).expect("insert");
    }
    raw.flush().expect("flush");

    println!();
    println!(
        "{:<44} {:>14} {:>14} {:>8}",
        "operation", "fleetgate/s", "raw sled/s", "ratio"
    );
    for threads in [1, 2] {
        let ours = rate(threads, LOOKUP_TIME, &serials, {
            let auth = auth.clone();
            move |s: &CertKey| {
                let (_, standing) = auth.registry.standing(s).expect("lookup").expect("known");
                std::hint::black_box(standing);
            }
        });
        let base = rate(threads, LOOKUP_TIME, &serials, {
            let raw = raw.clone();
            move |s: &CertKey| {
                std::hint::black_box(raw.get(s.to_bytes()).expect("get"));
            }
        });
        row(
            &format!("status lookup by serial, {threads} thread(s)"),
            ours,
            base,
        );
    }

    // Flushed writes: suspend/resume of random devices, each durable.
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let t = Instant::now();
    for _ in 0..WRITES / 2 {
        let id = &ids[rng.below(ids.len())];
        auth.registry.suspend(id, "bench").expect("suspend");
        auth.registry.resume(id, "bench").expect("resume");
    }
    let ours = WRITES as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    for i in 0..WRITES {
        let s = &serials[rng.below(serials.len())];
        let mut v = value.clone();
        v.push((i % 10) as u8);
        raw.insert(s.to_bytes(), v).expect("insert");
        raw.flush().expect("flush");
    }
    let base = WRITES as f64 / t.elapsed().as_secs_f64();
    row(
        "flushed status change (suspend/resume), 1 thread",
        ours,
        base,
    );

    // Two writers: sled's flush covers whatever is dirty, so concurrent
    // writers share fsyncs.
    let done = Arc::new(AtomicU64::new(0));
    let t = Instant::now();
    std::thread::scope(|scope| {
        for w in 0..2u64 {
            let auth = auth.clone();
            let ids = &ids;
            let done = done.clone();
            scope.spawn(move || {
                let mut rng = Rng(0x1234_5678 + w);
                for _ in 0..WRITES / 4 {
                    let id = &ids[rng.below(ids.len())];
                    if auth.registry.suspend(id, "bench").is_ok() {
                        auth.registry.resume(id, "bench").expect("resume");
                        done.fetch_add(2, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let ours2 = done.load(Ordering::Relaxed) as f64 / t.elapsed().as_secs_f64();
    println!("{:<44} {:>14.0}", "flushed status change, 2 threads", ours2);
    println!();
    println!("registry size on disk: {:.1} MiB", auth.registry_size_mib());
}

trait Size {
    fn registry_size_mib(&self) -> f64;
}
impl Size for Authority {
    fn registry_size_mib(&self) -> f64 {
        fn walk(p: &std::path::Path) -> u64 {
            std::fs::read_dir(p)
                .map(|d| {
                    d.flatten()
                        .map(|e| match e.metadata() {
                            Ok(m) if m.is_dir() => walk(&e.path()),
                            Ok(m) => m.len(),
                            Err(_) => 0,
                        })
                        .sum()
                })
                .unwrap_or(0)
        }
        walk(&self.paths.registry()) as f64 / (1024.0 * 1024.0)
    }
}

fn row(name: &str, ours: f64, base: f64) {
    println!("{name:<44} {ours:>14.0} {base:>14.0} {:>7.2}x", ours / base);
}

/// Operations per second of `op` over random serials on `threads` threads.
fn rate(
    threads: u64,
    time: Duration,
    serials: &[CertKey],
    op: impl Fn(&CertKey) + Send + Sync + Clone,
) -> f64 {
    let total = AtomicU64::new(0);
    let start = Instant::now();
    std::thread::scope(|scope| {
        for t in 0..threads {
            let op = op.clone();
            let total = &total;
            scope.spawn(move || {
                let mut rng = Rng(0xdead_beef + t);
                let mut n = 0u64;
                while start.elapsed() < time {
                    for _ in 0..256 {
                        op(&serials[rng.below(serials.len())]);
                    }
                    n += 256;
                }
                total.fetch_add(n, Ordering::Relaxed);
            });
        }
    });
    total.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}
