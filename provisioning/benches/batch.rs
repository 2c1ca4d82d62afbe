//! Batch enrollment: certificates issued per second by
//! `Authority::enroll_batch` (CSR checked, signed by a manufacturer CA on
//! every core, registered with one flush per batch), beside the baseline of
//! `Authority::enroll` one CSR at a time (one flush each), same CSRs, same
//! data dir kind, run one after the other.
//!
//! cargo bench -p provisioning --bench batch                (10,000 CSRs)
//! FLEETGATE_BENCH_CSRS=2000 cargo bench -p provisioning --bench batch

use std::time::Instant;

use provisioning::csr::{new_key_and_csr, KeyKind};
use provisioning::manufacturer::{BatchItem, JitPolicy};
use provisioning::{Authority, DeviceId, EnrollRequest, InitOptions, Role, DEFAULT_CERT_LIFETIME};

fn main() {
    let n: usize = std::env::var("FLEETGATE_BENCH_CSRS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let chunk = 1000;
    eprintln!("making {n} P-256 CSRs ...");
    let csrs: Vec<String> = (0..n)
        .map(|i| {
            new_key_and_csr(KeyKind::EcdsaP256, &format!("b{i}"))
                .expect("csr")
                .1
        })
        .collect();

    let tmp = tempfile::tempdir().expect("temp dir");
    let auth =
        Authority::open_or_init(&tmp.path().join("data"), &InitOptions::default()).expect("init");
    let acme = DeviceId::try_new("acme").expect("id");
    auth.create_manufacturer(&acme, JitPolicy::AutoActivate, "bench")
        .expect("manufacturer");

    // Batch, in API-sized chunks.
    let t0 = Instant::now();
    let mut issued = 0;
    for (c, part) in csrs.chunks(chunk).enumerate() {
        let items: Vec<BatchItem> = part
            .iter()
            .enumerate()
            .map(|(i, csr)| {
                let id = format!("batch-{}", c * chunk + i);
                BatchItem {
                    name: id.clone(),
                    id,
                    csr: csr.clone().into_bytes(),
                }
            })
            .collect();
        let out = auth
            .enroll_batch(Some("acme"), &items, DEFAULT_CERT_LIFETIME, "bench")
            .expect("batch");
        issued += out.iter().filter(|r| r.is_ok()).count();
    }
    let batch_secs = t0.elapsed().as_secs_f64();
    assert_eq!(issued, n);

    // Baseline: one at a time, each flushed before the next.
    let single_n = (n / 5).max(100);
    let t0 = Instant::now();
    for (i, csr) in csrs.iter().take(single_n).enumerate() {
        let req = EnrollRequest {
            id: DeviceId::try_new(format!("single-{i}")).expect("id"),
            role: Role::Device,
            manufacturer: Some("acme".into()),
            csr: csr.clone().into_bytes(),
            lifetime: DEFAULT_CERT_LIFETIME,
        };
        auth.enroll(&req, "bench").expect("enroll");
    }
    let single_secs = t0.elapsed().as_secs_f64();

    let batch_rate = n as f64 / batch_secs;
    let single_rate = single_n as f64 / single_secs;
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    println!("| enrollment ({cores} cores) | certificates | seconds | certificates/s | vs one at a time |");
    println!("|---|---|---|---|---|");
    println!("| one at a time (`enroll`, flushed each) | {single_n} | {single_secs:.2} | {single_rate:.0} | 1.00x |");
    println!(
        "| batch of {chunk} (`enroll_batch`, one flush) | {n} | {batch_secs:.2} | {batch_rate:.0} | {:.2}x |",
        batch_rate / single_rate
    );
}
