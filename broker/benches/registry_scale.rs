//! The registry at a fleet's size, in process (`bench/registry-scale.sh`
//! runs it, then `serve` on what it wrote):
//!
//!   cargo bench -p broker --bench registry_scale -- DATA_DIR DEVICES REVOKED
//!
//! Opens the data dir a `serve` initialized (and stopped), enrolls DEVICES
//! devices in batches of 10,000 (signing on every core, one flush each),
//! revokes REVOKED of them in bulk calls of 10,000, and prints: the time
//! of each, admission lookups p50/p99 (the node's view, random
//! certificates), the issuing CA's CRL (time to make, size), a page of
//! the device list at its start, middle and end, and `audit verify`.
//! Writes `good.txt` and `revoked.txt` (10,000 hex serials each) beside
//! the data dir for `firmware-sim load ocsp`.
//!
//! With `FLEETGATE_BENCH_ETCD=host:port` the registry is that etcd
//! member's, under the root `serve --store etcd://...` uses, watched as
//! `serve` watches it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use provisioning::{
    Authority, CertKey, DeviceId, Identity, InitOptions, IssuedCert, NewDevice, RevocationReason,
    Role, DEFAULT_CERT_LIFETIME,
};

mod common;
use common::Rng;

const BATCH: usize = 10_000;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let [dir, devices, revoked] = args.as_slice() else {
        eprintln!(
            "usage: registry_scale DATA_DIR DEVICES REVOKED (bench/registry-scale.sh runs it)"
        );
        return;
    };
    let dir = PathBuf::from(dir);
    let devices: usize = devices.parse().expect("DEVICES");
    let revoked: usize = revoked.parse().expect("REVOKED");
    let id = |i: usize| DeviceId::try_new(format!("dev-{i:07}")).expect("id");
    // The page cache `serve` gives the registry (its default, or what
    // FLEETGATE_REGISTRY_CACHE_MIB says, as for `serve`).
    let cache_mib: u64 = std::env::var("FLEETGATE_REGISTRY_CACHE_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let store = std::env::var("FLEETGATE_BENCH_ETCD").ok().map(|etcd| {
        let store = broker::etcd::EtcdStore::connect(vec![etcd], "fleetgate/").expect("etcd");
        store.watch(|_| {});
        std::sync::Arc::new(store) as std::sync::Arc<dyn provisioning::store::Store>
    });
    let opts = InitOptions {
        cache_bytes: Some(cache_mib << 20),
        store,
        ..InitOptions::default()
    };
    let t = Instant::now();
    let auth = Authority::open(&dir, &opts).expect("open the data dir");
    println!(
        "opened the data dir in {:.1} s (page cache {cache_mib} MiB)",
        t.elapsed().as_secs_f64()
    );
    let mut keys: Vec<CertKey> = Vec::with_capacity(devices);
    if devices > 0 {
        populate(&auth, devices, revoked, &dir, &mut keys);
    } else {
        // Measure what is there: every device's certificates.
        let mut after: Option<String> = None;
        loop {
            let page = auth
                .registry
                .list(None, after.as_deref(), 1000)
                .expect("list");
            keys.extend(page.items.iter().flat_map(|d| d.certificates.clone()));
            after = page.next;
            if after.is_none() {
                break;
            }
        }
        println!("{} certificates in the registry", keys.len());
    }

    // Admission's lookup, as a handshake makes it: a first pass over
    // random certificates (what the cache holds is what the enrollment
    // left, or nothing on a fresh open), then a second.
    let recent = auth.registry.recent();
    for (pass, seed) in [
        ("first", 0x9e37_79b9_7f4a_7c15),
        ("after the warm-up", 0x2545_f491_4f6c_dd1d),
    ] {
        if pass != "first" {
            // What `serve` does in the background once listening.
            let t = Instant::now();
            let n = auth.registry.warm(cache_mib << 20).expect("warm");
            println!(
                "warm-up: {n} records read in {:.1} s",
                t.elapsed().as_secs_f64()
            );
        }
        let mut rng = Rng(seed);
        let mut took: Vec<Duration> = (0..100_000)
            .map(|_| {
                let k = &keys[rng.below(keys.len())];
                let t = Instant::now();
                let found = recent.standing(k).expect("lookup");
                let d = t.elapsed();
                assert!(found.is_some());
                d
            })
            .collect();
        took.sort();
        println!(
            "admission lookup, {pass}: p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us (100,000 random certificates)",
            percentile(&took, 0.5).as_secs_f64() * 1e6,
            percentile(&took, 0.99).as_secs_f64() * 1e6,
            percentile(&took, 0.999).as_secs_f64() * 1e6
        );
    }

    let t = Instant::now();
    let issuer = auth
        .registry
        .certificate(&keys[0])
        .expect("read")
        .expect("a certificate")
        .issuer;
    let listed = auth
        .registry
        .revoked_by_issuer(None, &issuer)
        .expect("listed");
    println!(
        "certificates a CRL lists: {} found in {:.0} ms",
        listed.len(),
        ms(t.elapsed())
    );
    let t = Instant::now();
    let crl = auth.issuing_crl().expect("crl");
    println!(
        "issuing CRL: made in {:.0} ms, {} bytes",
        ms(t.elapsed()),
        crl.len()
    );

    // What a relying party downloads between complete CRLs: the delta,
    // after 100 devices are suspended (resumed again after, so the data
    // dir stays as it was).
    // (Measuring what is there: the devices the certificates count, less
    // the admin.)
    let count = if devices > 0 {
        devices
    } else {
        keys.len().saturating_sub(1)
    };
    let held: Vec<DeviceId> = (count.saturating_sub(100)..count)
        .map(id)
        .filter(|d| {
            auth.registry
                .device(d)
                .is_ok_and(|r| r.status == provisioning::Status::Active)
        })
        .collect();
    for d in &held {
        auth.registry.suspend(d, "bench").expect("suspend");
    }
    let t = Instant::now();
    let delta = auth
        .issuing_delta_crl_named("issuing-delta")
        .expect("the issuing CA's delta")
        .expect("delta crl");
    println!(
        "delta CRL after {} suspensions: made in {:.0} ms, {} bytes (the complete CRL: {} bytes)",
        held.len(),
        ms(t.elapsed()),
        delta.len(),
        crl.len()
    );
    for d in &held {
        auth.registry.resume(d, "bench").expect("resume");
    }

    for (name, after) in [
        ("start", None),
        ("middle", Some(id(count / 2).to_string())),
        ("end", Some(id(count.saturating_sub(60)).to_string())),
    ] {
        let t = Instant::now();
        let page = auth
            .registry
            .list(None, after.as_deref(), 50)
            .expect("list");
        println!(
            "device list, a page of 50 at the {name}: {:.2} ms ({} items)",
            ms(t.elapsed()),
            page.items.len()
        );
    }

    let t = Instant::now();
    let v = auth.verify_audit().expect("verify");
    println!(
        "audit verify: {:.1} s ({} entries, {} problems)",
        t.elapsed().as_secs_f64(),
        v.entries,
        v.problems.len()
    );
}

/// Enrolls `devices` devices (signing each batch on every core) and revokes
/// `revoked` of them in bulk; writes the serial files for the OCSP load.
fn populate(
    auth: &Authority,
    devices: usize,
    revoked: usize,
    dir: &std::path::Path,
    keys: &mut Vec<CertKey>,
) {
    let key = rcgen::KeyPair::generate().expect("key");
    let id = |i: usize| DeviceId::try_new(format!("dev-{i:07}")).expect("id");
    // Enroll, signing each batch on every core.
    let t = Instant::now();
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    for start in (0..devices).step_by(BATCH) {
        let end = (start + BATCH).min(devices);
        let per = (end - start).div_ceil(workers);
        let batch: Vec<(NewDevice, IssuedCert)> = std::thread::scope(|s| {
            let parts: Vec<_> = (start..end)
                .step_by(per)
                .map(|from| {
                    let key = &key;
                    s.spawn(move || {
                        (from..(from + per).min(end))
                            .map(|i| {
                                let identity = Identity {
                                    role: Role::Device,
                                    id: id(i),
                                };
                                auth.issue_new(key, &identity, None, DEFAULT_CERT_LIFETIME)
                                    .expect("issue")
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            parts
                .into_iter()
                .flat_map(|p| p.join().expect("signer"))
                .collect()
        });
        keys.extend(batch.iter().map(|(_, c)| c.key()));
        for r in auth.registry.enroll_batch(&batch, "bench").expect("batch") {
            r.expect("enroll");
        }
    }
    let enrolled = t.elapsed();
    println!(
        "enrolled {devices} devices in {:.1} s ({:.0}/s incl. signing)",
        enrolled.as_secs_f64(),
        devices as f64 / enrolled.as_secs_f64()
    );

    // Revoke every (devices / revoked)-th device, in bulk calls.
    let step = (devices / revoked.max(1)).max(1);
    let to_revoke: Vec<usize> = (0..devices).step_by(step).take(revoked).collect();
    let t = Instant::now();
    for chunk in to_revoke.chunks(BATCH) {
        let ids: Vec<DeviceId> = chunk.iter().map(|&i| id(i)).collect();
        auth.registry
            .revoke_many(&ids, RevocationReason::KeyCompromise, "bench")
            .expect("revoke");
    }
    println!(
        "revoked {} devices in {:.1} s",
        to_revoke.len(),
        t.elapsed().as_secs_f64()
    );

    // Serials for the OCSP load: good and revoked.
    let hex = |k: &CertKey| k.serial.to_hex();
    let parent = dir.parent().expect("data dir's parent");
    let good: Vec<String> = (0..devices)
        .filter(|i| i % step != 0 || i / step >= revoked)
        .take(BATCH)
        .map(|i| hex(&keys[i]))
        .collect();
    let bad: Vec<String> = to_revoke
        .iter()
        .take(BATCH)
        .map(|&i| hex(&keys[i]))
        .collect();
    std::fs::write(parent.join("good.txt"), good.join("\n") + "\n").expect("good.txt");
    std::fs::write(parent.join("revoked.txt"), bad.join("\n") + "\n").expect("revoked.txt");
}
