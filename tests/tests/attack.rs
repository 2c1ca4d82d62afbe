//! Attacks and faults against the real server: slow and silent clients,
//! floods past the connection, handshake and per-address caps, running out
//! of file descriptors, weak TLS, a key usage without digitalSignature,
//! secrets in logs, kill -9 in the middle of enrollment and revocation
//! storms, and a disk that fills up. Each asserts what the server did.
//! (Malformed MQTT, wrong EKU, CA certificates as clients, foreign CAs and
//! cross-device topics are in `broker.rs`; malformed CSRs and OCSP requests
//! in `provisioning.rs` and `status.rs`.)

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleetgate_api::client::ApiClient;
use serde_json::{json, Value};
use tests::mqtt::{client, connected, probe};
use tests::pki::{self, Spec, TestCa};
use tests::{require_tool, run, Server};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

fn start(extra: &[&str]) -> (tempfile::TempDir, Server) {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start_with(&tmp.path().join("data"), extra).unwrap();
    (tmp, server)
}

async fn refusals(admin: &ApiClient, reason: &str) -> u64 {
    let stats: Value = admin.get("/v1/stats").await.unwrap();
    stats["refusals"][reason].as_u64().unwrap()
}

/// Waits for the refusals for `reason` to reach `n` (fails the test if
/// they do not within 5 s): a refusal is counted as its connection ends,
/// so a client can see the close a moment before the count moves.
async fn refusals_reach(admin: &ApiClient, reason: &str, n: u64) {
    let what = format!("{n} refusals for {reason}");
    tests::until(Duration::from_secs(5), &what, || async {
        (refusals(admin, reason).await >= n).then_some(())
    })
    .await
}

/// Whether the server closes `tcp` within `within` (EOF or reset).
async fn closed_within(tcp: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(within, tcp.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

async fn silent(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(TcpStream::connect(addr).await.unwrap());
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_slow_clients_are_dropped_at_the_handshake_timeout() {
    let (tmp, server) = start(&["--handshake-timeout-secs", "1"]);
    let dev = server.enroll(tmp.path(), "device", "dev-1");
    let mut idle = silent(server.mqtt, 20).await;
    // One that starts a ClientHello and never finishes it.
    let mut slow = TcpStream::connect(server.mqtt).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut slow, &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .unwrap();
    idle.push(slow);
    // A real device gets in meanwhile.
    let (_c, mut ev) = client(server.mqtt, &dev, "dev-1");
    connected(&mut ev).await;
    let t0 = Instant::now();
    for tcp in &mut idle {
        assert!(closed_within(tcp, Duration::from_secs(4)).await);
    }
    assert!(t0.elapsed() < Duration::from_secs(4));
    refusals_reach(&server.admin(), "handshake_timeout", 21).await;
    assert!(server.wait_for_log("TLS handshake timed out", Duration::from_secs(2)));

    // The same on the plain-HTTP OCSP port: a request that never finishes
    // its headers is dropped, and answers go on meanwhile.
    let mut slow = TcpStream::connect(server.ocsp).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut slow, b"GET /crl/issuing.crl HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let (ok, out) = run(Command::new("curl")
        .args(["-sf", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("{}/crl/issuing.crl", server.ocsp_url())));
    assert!(ok && out.contains("200"), "{out}");
    assert!(closed_within(&mut slow, Duration::from_secs(4)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_are_closed_at_once() {
    let (tmp, server) = start(&["--max-connections", "4", "--handshake-timeout-secs", "30"]);
    let dev = server.enroll(tmp.path(), "device", "dev-1");
    let held = silent(server.mqtt, 4).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut extra = TcpStream::connect(server.mqtt).await.unwrap();
    assert!(closed_within(&mut extra, Duration::from_millis(500)).await);
    assert!(server.wait_for_log("connection cap reached", Duration::from_secs(2)));
    refusals_reach(&server.admin(), "overloaded", 1).await;
    // Room again once they go.
    drop(held);
    admitted_again(&server, &dev).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_past_the_cap_are_closed_at_once() {
    let (tmp, server) = start(&["--max-handshakes", "3", "--handshake-timeout-secs", "30"]);
    let dev = server.enroll(tmp.path(), "device", "dev-1");
    let held = silent(server.mqtt, 3).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut extra = TcpStream::connect(server.mqtt).await.unwrap();
    assert!(closed_within(&mut extra, Duration::from_millis(500)).await);
    assert!(server.wait_for_log("too many TLS handshakes in flight", Duration::from_secs(2)));
    drop(held);
    admitted_again(&server, &dev).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_connecting_too_fast_is_rate_limited() {
    let (tmp, server) = start(&["--connect-rate-per-ip", "5", "--connect-burst-per-ip", "5"]);
    let dev = server.enroll(tmp.path(), "device", "dev-1");
    let mut conns = silent(server.mqtt, 30).await;
    let mut closed = 0;
    for tcp in &mut conns {
        if closed_within(tcp, Duration::from_millis(100)).await {
            closed += 1;
        }
    }
    // 5 of burst, and a few refilled while connecting: the rest refused.
    assert!(closed >= 20, "only {closed} of 30 refused");
    assert!(server.wait_for_log(
        "too many connects from this address",
        Duration::from_secs(2)
    ));
    // One log line a second per address, not one per refusal.
    let lines = server
        .log()
        .iter()
        .filter(|l| l.contains("too many connects from this address"))
        .count();
    assert!(lines <= 3, "{lines} log lines for {closed} refusals");
    refusals_reach(&server.admin(), "rate_limited", 20).await;
    drop(conns);
    // The bucket refills.
    admitted_again(&server, &dev).await;
}

/// Waits (polling, at most 15 s) until `dev` is admitted again.
async fn admitted_again(server: &Server, dev: &tests::Creds) {
    tests::until(Duration::from_secs(15), "admitted again", || async {
        (!tests::mqtt::refused(server.mqtt, dev).await).then_some(())
    })
    .await;
}

/// CPU seconds (user + system) the process has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / 100.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_file_descriptors_backs_off_instead_of_spinning() {
    require_tool("prlimit");
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start_under(
        &["prlimit", "--nofile=64:64"],
        &tmp.path().join("data"),
        &["--handshake-timeout-secs", "60"],
    )
    .unwrap();
    let dev = server.enroll(tmp.path(), "device", "dev-1");
    // More silent connections than the server has descriptors left.
    let flood = silent(server.mqtt, 100).await;
    assert!(server.wait_for_log("accept failed; backing off", Duration::from_secs(5)));
    let before = cpu_seconds(server.pid());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu_seconds(server.pid()) - before;
    assert!(
        used < 0.5,
        "{used:.2} CPU seconds in 2 s: spinning on accept"
    );
    // When descriptors come back, so does service.
    drop(flood);
    admitted_again(&server, &dev).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_usage_without_digital_signature_is_refused() {
    let (tmp, server) = start(&[]);
    let ca = TestCa::from_data_dir(&server.data_dir);
    let mut spec = Spec::device("dev-ku");
    spec.digital_signature = false;
    let (chain, key) = ca.issue(&spec);
    let root = std::fs::read(tmp.path().join("data/ca.crt")).unwrap();
    let r = probe(
        server.mqtt,
        pki::client_config(&root, Some((&chain, &key))),
        &tests::mqtt::connect_packet("dev-ku"),
    )
    .await;
    assert!(r.is_err() || r.as_ref().unwrap().is_empty(), "{r:?}");
    assert!(server.wait_for_log("lacks digitalSignature", Duration::from_secs(5)));
    refusals_reach(&server.admin(), "wrong_usage", 1).await;
}

fn s_client(
    server: &Server,
    port: u16,
    args: &[&str],
    creds: Option<&tests::Creds>,
) -> (bool, String) {
    require_tool("openssl");
    let mut cmd = Command::new("openssl");
    cmd.args([
        "s_client",
        "-connect",
        &format!("127.0.0.1:{port}"),
        "-CAfile",
    ])
    .arg(server.data_dir.join("ca.crt"))
    .args(args);
    if let Some(c) = creds {
        cmd.arg("-cert")
            .arg(&c.cert)
            .arg("-cert_chain")
            .arg(&c.cert)
            .arg("-key")
            .arg(&c.key);
    }
    cmd.stdin(std::process::Stdio::null());
    let (_, out) = run(&mut cmd);
    let ok = out.contains("Verify return code: 0 (ok)") && !out.contains("alert");
    (ok, out)
}

#[test]
fn tls_1_2_is_the_minimum_1_3_is_preferred_and_no_weak_suites() {
    let (tmp, server) = start(&[]);
    let dev = server.enroll(tmp.path(), "device", "dev-1");
    for port in [server.api.port(), server.mqtt.port()] {
        let (ok, out) = s_client(&server, port, &[], Some(&dev));
        assert!(
            ok && out.contains("TLSv1.3"),
            "{port}: default is not TLS 1.3: {out}"
        );
        let (ok, out) = s_client(&server, port, &["-tls1_2"], Some(&dev));
        assert!(
            ok && out.contains("TLSv1.2"),
            "{port}: TLS 1.2 refused: {out}"
        );
        for weak in [
            &["-tls1_1"][..],
            &["-tls1"],
            &["-tls1_2", "-cipher", "AES128-SHA"],
            &["-tls1_2", "-cipher", "DES-CBC3-SHA"],
            &["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA"],
        ] {
            let (ok, out) = s_client(&server, port, weak, Some(&dev));
            assert!(!ok, "{port}: {weak:?} accepted: {out}");
        }
    }
}

#[test]
fn private_keys_are_0600_and_never_logged() {
    let (tmp, server) = start(&[]);
    let out = tmp.path().join("out");
    server.enroll(&out, "device", "dev-1");
    server.cli_ok(&[
        "manufacturer",
        "create",
        "acme",
        "--out",
        out.to_str().unwrap(),
    ]);
    server.cli_ok(&[
        "claim",
        "create",
        "c-1",
        "--uses",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    let mut keys = Vec::new();
    let mut dirs = vec![server.data_dir.clone(), out.clone()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "key") {
                keys.push(p);
            }
        }
    }
    // root, issuing, server, admin, OCSP signer, manufacturer (kept and
    // handed out), device, claim.
    assert!(keys.len() >= 8, "{keys:?}");
    let log = server.log().join("\n");
    assert!(!log.contains("PRIVATE KEY"), "a key reached the log");
    for k in &keys {
        let mode = std::fs::metadata(k).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", k.display());
        let pem = std::fs::read_to_string(k).unwrap();
        for line in pem
            .lines()
            .filter(|l| !l.starts_with("-----") && l.len() > 16)
        {
            assert!(!log.contains(line), "{} reached the log", k.display());
        }
    }
}

/// Starts `tasks` workers calling `op(worker, n)` in a loop until the
/// server dies; returns what each acknowledged.
fn storm<T: Send + 'static>(
    tasks: usize,
    op: impl Fn(usize, usize) -> Option<T> + Send + Sync + 'static,
) -> (Arc<Mutex<Vec<T>>>, Vec<std::thread::JoinHandle<()>>) {
    let acked = Arc::new(Mutex::new(Vec::new()));
    let op = Arc::new(op);
    let handles = (0..tasks)
        .map(|w| {
            let (acked, op) = (acked.clone(), op.clone());
            std::thread::spawn(move || {
                for n in 0.. {
                    match op(w, n) {
                        Some(t) => acked.lock().unwrap().push(t),
                        None => return,
                    }
                }
            })
        })
        .collect();
    (acked, handles)
}

fn check_ok(data_dir: &Path) -> String {
    let out = Command::new(tests::fleetgate_bin())
        .args(["check", "--data-dir"])
        .arg(data_dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("consistent"), "{text}");
    text
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn kill_9_in_an_enrollment_storm_loses_no_acknowledged_enrollment() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = Server::start(&data).unwrap();
    let csrs: Arc<Vec<String>> = Arc::new((0..8).map(|_| pki::csr("x").1).collect());
    let url = server.api_url();
    let dir = data.clone();
    let (acked, handles) = storm(8, move |w, n| {
        let admin = tests::admin_client(&url, &dir);
        let id = format!("storm-{w}-{n}");
        let r: anyhow::Result<Value> =
            runtime().block_on(admin.post("/v1/devices", &json!({"id": id, "csr": csrs[w]})));
        r.ok()
            .map(|v| (id, v["serial"].as_str().unwrap_or("").to_owned()))
    });
    std::thread::sleep(Duration::from_millis(1500));
    server.kill9();
    for h in handles {
        h.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 20,
        "only {} enrollments before the kill",
        acked.len()
    );
    // Nothing half-written: the registry's indexes agree, and it starts.
    check_ok(&data);
    let server = Server::start(&data).unwrap();
    let admin = server.admin();
    let rt = runtime();
    for (id, serial) in &acked {
        let d: Value = rt
            .block_on(admin.get(&format!("/v1/devices/{id}")))
            .unwrap_or_else(|e| panic!("acknowledged {id} lost: {e}"));
        assert_eq!(d["certificates"][0]["serial"], serial.as_str(), "{id}");
        assert_eq!(d["status"], "active");
    }
}

#[test]
fn kill_9_in_a_revocation_storm_loses_no_acknowledged_revocation() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = Server::start(&data).unwrap();
    let rt = runtime();
    let (_k, csr) = pki::csr("x");
    let items: Vec<Value> = (0..400)
        .map(|i| json!({"id": format!("r-{i}"), "csr": csr}))
        .collect();
    let report: Value = rt
        .block_on(
            server
                .admin()
                .post("/v1/devices/batch", &json!({"items": items})),
        )
        .unwrap();
    assert_eq!(report["issued"], 400, "{report}");
    let url = server.api_url();
    let dir = data.clone();
    let (acked, handles) = storm(8, move |w, n| {
        let i = n * 8 + w;
        if i >= 400 {
            return None;
        }
        let admin = tests::admin_client(&url, &dir);
        let id = format!("r-{i}");
        let r: anyhow::Result<Value> = runtime().block_on(admin.post(
            &format!("/v1/devices/{id}/revoke"),
            &json!({"reason": "key-compromise"}),
        ));
        r.ok().map(|_| id)
    });
    std::thread::sleep(Duration::from_millis(700));
    server.kill9();
    for h in handles {
        h.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 10 && acked.len() < 400,
        "{} revocations before the kill: not mid-storm",
        acked.len()
    );
    check_ok(&data);
    let server = Server::start(&data).unwrap();
    let admin = server.admin();
    let mut statuses = BTreeMap::new();
    for i in 0..400 {
        let id = format!("r-{i}");
        let d: Value = rt
            .block_on(admin.get(&format!("/v1/devices/{id}")))
            .unwrap();
        let s = d["status"].as_str().unwrap().to_owned();
        if acked.contains(&id) {
            assert_eq!(s, "revoked", "acknowledged revocation of {id} lost");
            assert_eq!(d["revocation"]["reason"], "key-compromise");
        }
        *statuses.entry(s).or_insert(0) += 1;
    }
    // Every device is whole: active or revoked, nothing in between.
    assert!(
        statuses.keys().all(|s| s == "active" || s == "revoked"),
        "{statuses:?}"
    );
}

#[test]
fn a_full_disk_refuses_writes_and_acknowledges_nothing_it_did_not_keep() {
    require_tool("prlimit");
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    // Start once without a limit to create the CA; then a file size cap
    // stands in for a full disk (writes fail with EFBIG, as with ENOSPC).
    drop(Server::start(&data).unwrap());
    let size = std::fs::metadata(data.join("registry/db")).unwrap().len();
    // sled grows its log a segment at a time: room for start-up, then a
    // few hundred enrollments.
    let limit = format!("--fsize={}", size + 1_200_000);
    let server = Server::start_under(&["prlimit", &limit], &data, &[]).unwrap();
    let admin = server.admin();
    let rt = runtime();
    let (_k, csr) = pki::csr("x");
    let mut acked = Vec::new();
    let mut refused = None;
    for i in 0..5000 {
        let id = format!("fill-{i}");
        match rt.block_on(admin.post::<_, Value>("/v1/devices", &json!({"id": id, "csr": csr}))) {
            Ok(_) => acked.push(id),
            Err(e) => {
                refused = Some((id, e.to_string()));
                break;
            }
        }
    }
    let (first_refused, err) = refused.expect("the disk never filled");
    assert!(
        err.contains("storage_unavailable") && err.contains("503"),
        "{err}"
    );
    assert!(server.wait_for_log("registry write failed", Duration::from_secs(2)));
    // The server is still up, and keeps refusing rather than pretending.
    let again =
        rt.block_on(admin.post::<_, Value>("/v1/devices", &json!({"id": "later", "csr": csr})));
    assert!(again
        .unwrap_err()
        .to_string()
        .contains("storage_unavailable"));
    assert!(std::fs::metadata(format!("/proc/{}", server.pid())).is_ok());
    server.kill9();
    check_ok(&data);
    let server = Server::start(&data).unwrap();
    let admin = server.admin();
    for id in &acked {
        rt.block_on(admin.get::<Value>(&format!("/v1/devices/{id}")))
            .unwrap_or_else(|e| panic!("acknowledged {id} lost: {e}"));
    }
    let gone = rt.block_on(admin.get::<Value>(&format!("/v1/devices/{first_refused}")));
    assert!(gone.is_err(), "{first_refused} was refused but is there");
}
