//! The attacks and relying-party checks of the security review (issue 11),
//! each against the real server: admin impersonation with a manufacturer's
//! key, manufacturer CA constraints, escapes from revocation (rotation, TLS
//! resumption), lock-outs, unmetered work, log injection, serial
//! collisions across issuers, and bulk revocation.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tests::mqtt::{client, connect_packet, connected};
use tests::pki::{Spec, TestCa};
use tests::{require_tool, run, Creds, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn start_with(extra: &[&str]) -> (tempfile::TempDir, Server) {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start_with(&tmp.path().join("data"), extra).unwrap();
    (tmp, server)
}

fn start() -> (tempfile::TempDir, Server) {
    start_with(&[])
}

/// An issued manufacturer CA: `fleetgate manufacturer create NAME`.
fn manufacturer(server: &Server, dir: &Path, name: &str, extra: &[&str]) -> TestCa {
    let mut args = vec![
        "manufacturer",
        "create",
        name,
        "--out",
        dir.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    server.cli_ok(&args);
    TestCa::from_pem(
        &std::fs::read_to_string(dir.join(format!("{name}.crt"))).unwrap(),
        &std::fs::read_to_string(dir.join(format!("{name}.key"))).unwrap(),
    )
}

/// A refusal counter from `GET /v1/stats`.
async fn refusals(server: &Server, reason: &str) -> u64 {
    let stats: Value = server.admin().get("/v1/stats").await.unwrap();
    stats["refusals"][reason].as_u64().unwrap_or(0)
}

/// The serial of the first certificate in a PEM file, big-endian bytes.
fn serial_of(pem_path: &Path) -> Vec<u8> {
    let der = fleetgate_api::tls::load_certs(pem_path).unwrap()[0].clone();
    provisioning::ca::inspect_certificate(&der)
        .unwrap()
        .serial
        .as_bytes()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manufacturer_key_cannot_make_an_admin() {
    let (tmp, server) = start();
    let dir = tmp.path();
    let acme = manufacturer(&server, dir, "acme", &[]);
    // The attack: the factory's key signs a leaf with the admin's serial
    // and the admin's URI. It chains to the root, like the real one.
    let admin_serial = serial_of(&server.data_dir.join("admin.crt"));
    let (chain, key) = acme.issue(&Spec {
        uri: "urn:fleetgate:admin:admin".into(),
        serial: Some(admin_serial),
        ..Spec::device("x")
    });
    let forged = server.creds(&dir.join("forged"), "admin", &chain, &key);
    let api = server.client(Some((&forged.cert, &forged.key)));
    let err = api.get::<Value>("/v1/stats").await.unwrap_err().to_string();
    assert!(
        err.contains("issued by fleetgate's issuing CA"),
        "the forged admin got in: {err}"
    );
    let err = api
        .post::<_, Value>("/v1/manufacturers", &serde_json::json!({"name": "evil"}))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("forbidden"), "{err}");
    assert!(server.wait_for_log("api: refused", Duration::from_secs(5)));
    // The real admin still works, and nothing was created.
    let list = server.cli_ok(&["manufacturer", "list"]);
    assert!(!list.contains("evil"), "{list}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manufacturer_cas_keep_their_constraints() {
    let (tmp, server) = start();
    let dir = tmp.path();
    let acme = manufacturer(&server, dir, "acme", &[]);
    // pathLen 0: a sub-CA under acme may not issue devices.
    let (sub_chain, sub_key) = acme.issue(&Spec {
        is_ca: true,
        ..Spec::device("sub")
    });
    let sub = TestCa::from_pem(&sub_chain, &sub_key);
    let (chain, key) = sub.issue(&Spec::device("deep-1"));
    let deep = server.creds(&dir.join("deep"), "deep-1", &chain, &key);
    // openssl, as any relying party, says no.
    std::fs::write(dir.join("sub.pem"), &sub_chain).unwrap();
    let (ok, out) = run(Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(server.data_dir.join("ca.crt"))
        .arg("-untrusted")
        .arg(dir.join("sub.pem"))
        .arg(&deep.cert));
    assert!(!ok, "openssl accepted the chain: {out}");
    assert!(
        tests::mqtt::refused(server.mqtt, &deep).await,
        "a device under a sub-CA got in"
    );
    assert!(server.cli(&["device", "show", "deep-1"]).status.code() != Some(0));
    assert!(server.wait_for_log("reason=\"bad_certificate\"", Duration::from_secs(5)));

    // A registered CA (a manufacturer's own root) past its notAfter admits
    // no one, old device or new.
    let expires = time::OffsetDateTime::now_utc() + time::Duration::seconds(4);
    let globex = TestCa::self_signed_until("globex root", expires);
    std::fs::write(dir.join("globex.crt"), &globex.cert_pem).unwrap();
    let code = server
        .cli_ok(&["manufacturer", "challenge", "globex"])
        .trim()
        .to_owned();
    std::fs::write(dir.join("verify.crt"), globex.sign_cn(&code)).unwrap();
    server.cli_ok(&[
        "manufacturer",
        "register",
        "globex",
        "--ca-cert",
        dir.join("globex.crt").to_str().unwrap(),
        "--verification-cert",
        dir.join("verify.crt").to_str().unwrap(),
    ]);
    let (chain, key) = globex.issue(&Spec::device("g-1"));
    let g1 = server.creds(&dir.join("g"), "g-1", &chain, &key);
    let _ev = tests::mqtt::online(server.mqtt, &g1).await;
    // A registered CA (no pathLen) may have its own intermediates: a device
    // sending its leaf and intermediate, not the root, gets in and is
    // registered under globex.
    let (sub_chain, sub_key) = globex.issue(&Spec {
        is_ca: true,
        ..Spec::device("globex-sub")
    });
    let (chain, key) = TestCa::from_pem(&sub_chain, &sub_key).issue(&Spec::device("g-deep"));
    let end = "-----END CERTIFICATE-----\n";
    let leaf_and_sub: String = chain.split_inclusive(end).take(2).collect();
    assert_eq!(leaf_and_sub.matches(end).count(), 2);
    let deep = server.creds(&dir.join("g"), "g-deep", &leaf_and_sub, &key);
    let _deep = tests::mqtt::online(server.mqtt, &deep).await;
    assert_eq!(server.device_json("g-deep")["manufacturer"], "globex");
    let (chain, key) = globex.issue(&Spec::device("g-2"));
    let g2 = server.creds(&dir.join("g"), "g-2", &chain, &key);
    // Once the CA has expired (polled: the server's clock is the real one).
    let _ = expires;
    tests::until(
        Duration::from_secs(30),
        "an expired CA's device refused",
        || async { tests::mqtt::refused(server.mqtt, &g1).await.then_some(()) },
    )
    .await;
    assert!(
        tests::mqtt::refused(server.mqtt, &g2).await,
        "a new device of an expired CA got in"
    );
    assert!(server.wait_for_log(
        "manufacturer globex's CA has expired",
        Duration::from_secs(5)
    ));
    assert!(server.cli(&["device", "show", "g-2"]).status.code() != Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_keeps_the_signer_and_falls_with_the_manufacturer() {
    require_tool("openssl");
    let (tmp, server) = start();
    let dir = tmp.path();
    manufacturer(&server, dir, "acme", &[]);
    let out = dir.join("devices");
    let out_s = out.to_str().unwrap();
    server.cli_ok(&[
        "device",
        "enroll",
        "m-1",
        "--manufacturer",
        "acme",
        "--out",
        out_s,
    ]);
    let first = serial_of(&out.join("m-1.crt"));
    server.cli_ok(&["device", "rotate", "m-1", "--out", out_s]);
    // Both certificates are on disk: the old one stays valid until revoked.
    let kept = out.join(format!("m-1.{}.crt", provisioning::id::hex(&first)));
    assert!(kept.exists(), "{} missing", kept.display());
    assert!(out
        .join(format!("m-1.{}.key", provisioning::id::hex(&first)))
        .exists());
    let v = server.device_json("m-1");
    let certs = v["certificates"].as_array().unwrap();
    assert_eq!(certs.len(), 2, "{v}");
    for c in certs {
        assert!(c["issuer"].as_str().unwrap().contains("acme"), "{c}");
        assert_eq!(c["status"], "good", "{c}");
    }
    let rotated = Creds::in_dir(&out, "m-1");
    let ev = tests::mqtt::online(server.mqtt, &rotated).await;
    drop(ev);

    server.cli_ok(&["manufacturer", "revoke", "acme"]);
    assert!(
        tests::mqtt::refused(server.mqtt, &rotated).await,
        "the rotated certificate escaped"
    );
    let v = server.device_json("m-1");
    for c in v["certificates"].as_array().unwrap() {
        assert_eq!(c["status"], "revoked", "device show says: {c}");
    }
    let (_, said) = run(Command::new("openssl")
        .args(["ocsp", "-issuer"])
        .arg(dir.join("acme.crt"))
        .arg("-cert")
        .arg(&rotated.cert)
        .args(["-url", &server.ocsp_url(), "-CAfile"])
        .arg(server.data_dir.join("ca.crt")));
    assert!(said.contains(": revoked"), "{said}");
}

/// Opens TLS with `config` (which remembers sessions), sends `bytes`, and
/// returns whether the handshake was a resumption and the first bytes
/// that came back.
async fn tls_exchange(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    bytes: &[u8],
) -> (bool, Vec<u8>) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(config);
    let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
    let mut tls = connector.connect(name, tcp).await.unwrap();
    let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    tls.write_all(bytes).await.unwrap();
    let mut buf = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    buf.truncate(n);
    (resumed, buf)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_tls_session_does_not_skip_revocation() {
    let (tmp, server) = start();
    let c = server.enroll(&tmp.path().join("d"), "device", "r-1");
    let config = c.client_config();
    let (resumed, first) = tls_exchange(server.mqtt, config.clone(), &connect_packet("r-1")).await;
    assert!(!resumed);
    assert_eq!(first, [0x20, 0x02, 0x00, 0x00], "first connect accepted");
    server.cli_ok(&["device", "revoke", "r-1"]);
    let (resumed, second) = tls_exchange(server.mqtt, config, &connect_packet("r-1")).await;
    assert!(resumed, "the test needs a resumed session to mean anything");
    assert_eq!(
        second,
        [0x20, 0x02, 0x00, 0x05],
        "a revoked device on a resumed session must get CONNACK 5, not success"
    );
    assert!(server.wait_for_log("refused at CONNECT", Duration::from_secs(5)));
}

/// A device resumes its TLS session however many others connected since:
/// the broker's tickets are stateless (rustls's default kept 256 sessions,
/// two tickets a connect, so a fleet's reconnects never resumed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_resumes_after_hundreds_of_other_connects() {
    require_tool("curl");
    let (tmp, server) = start_with(&["--metrics-listen", "127.0.0.1:0"]);
    let a = server.enroll(&tmp.path().join("a"), "device", "res-a");
    let b = server.enroll(&tmp.path().join("b"), "device", "res-b");
    let a_config = a.client_config();
    let (resumed, first) =
        tls_exchange(server.mqtt, a_config.clone(), &connect_packet("res-a")).await;
    assert!(!resumed);
    assert_eq!(first, [0x20, 0x02, 0x00, 0x00]);
    for _ in 0..300 {
        // A new client config each time: a full handshake, a new ticket.
        let (_, ack) = tls_exchange(server.mqtt, b.client_config(), &connect_packet("res-b")).await;
        assert_eq!(ack, [0x20, 0x02, 0x00, 0x00]);
    }
    let (resumed, again) = tls_exchange(server.mqtt, a_config, &connect_packet("res-a")).await;
    assert!(resumed, "res-a's session was forgotten");
    assert_eq!(again, [0x20, 0x02, 0x00, 0x00]);
    // Operators see it: one resumption of 302 handshakes.
    let url = format!(
        "http://{}/metrics",
        server.metrics.expect("metrics address")
    );
    let (ok, text) = run(std::process::Command::new("curl").args(["-sS", &url]));
    assert!(ok, "{text}");
    assert!(
        text.contains("fleetgate_mqtt_tls_resumptions_total 1\n")
            && text.contains("fleetgate_mqtt_handshakes_total 302\n"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ocsp_signing_certificate_is_renewed_while_running() {
    require_tool("openssl");
    let tmp = tempfile::tempdir().unwrap();
    // The server's wall clock is read from a file we move forward; its
    // timers (monotonic) run as usual, so upkeep runs every second.
    let clock = tmp.path().join("clock");
    let server = Server::start_on_fake_clock(
        &tmp.path().join("data"),
        &clock,
        &["--upkeep-interval-secs", "1"],
    )
    .unwrap();
    let c = server.enroll(&tmp.path().join("d"), "device", "o-1");
    let ocsp = |offset: &str| server.openssl_ocsp_at(&c.cert, offset);
    let now = ocsp("+0d");
    assert!(
        now.contains("Response verify OK") && now.contains(": good"),
        "{now}"
    );
    let signer = std::fs::read(server.data_dir.join("ocsp/signer.crt")).unwrap();
    // 35 days on: the first signing certificate (30 days) has expired.
    std::fs::write(&clock, "+35d\n").unwrap();
    let later = tests::eventually(Duration::from_secs(20), "an OCSP answer at +35d", || {
        let later = ocsp("+35d");
        later.contains("Response verify OK").then_some(later)
    });
    assert!(
        later.contains("Response verify OK") && later.contains(": good"),
        "after 35 days: {later}"
    );
    assert_ne!(
        signer,
        std::fs::read(server.data_dir.join("ocsp/signer.crt")).unwrap(),
        "the signing certificate was not renewed"
    );
    assert!(server.wait_for_log(
        "renewed the OCSP signing certificate",
        Duration::from_secs(5)
    ));
}

/// Opens `n` TCP connections to `to` from `from` (another loopback
/// address) and holds them open, idle.
async fn hold_idle(from: &str, to: SocketAddr, n: usize) -> Vec<tokio::net::TcpStream> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(format!("{from}:0").parse().unwrap()).unwrap();
        if let Ok(s) = sock.connect(to).await {
            held.push(s);
        }
    }
    held
}

/// A GET of `url` with curl; its HTTP status, 0 if none.
fn curl_status(url: &str) -> u16 {
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
            url,
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_cannot_lock_operators_out() {
    require_tool("curl");
    // Room for the attack's sockets in this process (and the server).
    let (ok, out) = run(Command::new("prlimit")
        .arg(format!("--pid={}", std::process::id()))
        .arg("--nofile=8192:"));
    assert!(ok, "{out}");
    let (_tmp, server) = start_with(&["--http-max-connections", "256", "--http-max-per-ip", "32"]);
    // One address holds as much as it may, many times over.
    let mut held = hold_idle("127.0.0.2", server.api, 1030).await;
    held.extend(hold_idle("127.0.0.2", server.ocsp, 1030).await);
    // And many addresses together fill each listener's cap.
    for i in 3..20 {
        held.extend(hold_idle(&format!("127.0.0.{i}"), server.api, 32).await);
        held.extend(hold_idle(&format!("127.0.0.{i}"), server.ocsp, 32).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The operator still gets in: admin API and OCSP/CRL.
    let out = server.cli_ok(&["device", "list"]);
    assert!(
        out.contains("admin") || out.is_empty() || out.contains("ID"),
        "{out}"
    );
    assert_eq!(
        curl_status(&format!("{}/crl/issuing.crl", server.ocsp_url())),
        200
    );
    assert!(server.wait_for_log(
        "too many connections open from this address",
        Duration::from_secs(5)
    ));
    assert!(server.wait_for_log("evicting the oldest connection", Duration::from_secs(5)));
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serials_are_unique_per_issuer_only() {
    let (tmp, server) = start();
    let dir = tmp.path();
    let acme = manufacturer(&server, dir, "acme", &[]);
    let globex = manufacturer(&server, dir, "globex", &[]);
    // Both factories number from 0x1000.
    let spec = |id: &str| Spec {
        serial: Some(vec![0x10, 0x00]),
        ..Spec::device(id)
    };
    let (chain, key) = globex.issue(&spec("globex-1"));
    let g = server.creds(&dir.join("g"), "globex-1", &chain, &key);
    let (chain, key) = acme.issue(&spec("acme-1"));
    let a = server.creds(&dir.join("a"), "acme-1", &chain, &key);
    let _g = tests::mqtt::online(server.mqtt, &g).await;
    let _a = tests::mqtt::online(server.mqtt, &a).await;
    for (id, m) in [("globex-1", "globex"), ("acme-1", "acme")] {
        let v = server.device_json(id);
        assert_eq!(v["status"], "active", "{v}");
        assert_eq!(v["certificates"][0]["serial"], "1000", "{v}");
        assert_eq!(v["manufacturer"], m, "{v}");
    }
    // The API names an ambiguous serial's certificates by key.
    let out = server.cli(&["device", "revoke-cert", "1000"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ambiguous_serial") || err.contains("2 issuers"),
        "{err}"
    );
    let key = server.device_json("acme-1")["certificates"][0]["key"]
        .as_str()
        .unwrap()
        .to_owned();
    server.cli_ok(&["device", "revoke-cert", &key]);
    assert!(tests::mqtt::refused(server.mqtt, &a).await);
    assert!(
        !tests::mqtt::refused(server.mqtt, &g).await,
        "globex's device fell with acme's"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn just_in_time_registration_has_a_quota_and_a_rate() {
    let (tmp, server) = start();
    let dir = tmp.path();
    let acme = manufacturer(&server, dir, "acme", &["--jit-quota", "2"]);
    let mut devices = Vec::new();
    for i in 0..3 {
        let id = format!("q-{i}");
        let (chain, key) = acme.issue(&Spec::device(&id));
        devices.push(server.creds(&dir.join("q"), &id, &chain, &key));
    }
    let _a = tests::mqtt::online(server.mqtt, &devices[0]).await;
    let _b = tests::mqtt::online(server.mqtt, &devices[1]).await;
    assert!(
        tests::mqtt::refused(server.mqtt, &devices[2]).await,
        "the quota let a third in"
    );
    assert!(server.wait_for_log("jit_quota_exceeded", Duration::from_secs(5)));
    assert!(refusals(&server, "jit_quota_exceeded").await >= 1);
    assert!(server.cli(&["device", "show", "q-2"]).status.code() != Some(0));
    server.cli_ok(&["manufacturer", "quota", "acme", "3"]);
    let _c = tests::mqtt::online(server.mqtt, &devices[2]).await;

    // The rate: one new device a minute, a burst of one.
    let (tmp, server) = start_with(&["--jit-rate", "0.016", "--jit-burst", "1"]);
    let dir = tmp.path();
    let acme = manufacturer(&server, dir, "acme", &[]);
    let (chain, key) = acme.issue(&Spec::device("r-0"));
    let first = server.creds(&dir.join("r"), "r-0", &chain, &key);
    let (chain, key) = acme.issue(&Spec::device("r-1"));
    let second = server.creds(&dir.join("r"), "r-1", &chain, &key);
    let _first = tests::mqtt::online(server.mqtt, &first).await;
    assert!(
        tests::mqtt::refused(server.mqtt, &second).await,
        "the rate let a second in"
    );
    assert!(server.wait_for_log("jit_rate_limited", Duration::from_secs(5)));
    assert!(refusals(&server, "jit_rate_limited").await >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ocsp_over_mqtt_is_metered_per_session() {
    let (tmp, server) = start();
    let c = server.enroll(&tmp.path().join("d"), "device", "m-1");
    let issuing = std::fs::read(server.data_dir.join("ca/issuing.crt")).unwrap();
    let issuing = rustls_pki_types::CertificateDer::from_pem_slice(&issuing).unwrap();
    let serial = provisioning::Serial::from_bytes(&serial_of(&c.cert)).unwrap();
    let request = provisioning::ocsp::build_request(&issuing, &[serial], None).unwrap();
    let (cl, mut ev) = client(server.mqtt, &c, "m-1");
    connected(&mut ev).await;
    cl.subscribe("devices/m-1/ocsp/response", rumqttc::QoS::AtMostOnce)
        .await
        .unwrap();
    // Published while the event loop below runs (the request queue is
    // shorter than 30).
    let publisher = tokio::spawn(async move {
        for _ in 0..30 {
            cl.publish(
                "devices/m-1/ocsp/request",
                rumqttc::QoS::AtMostOnce,
                false,
                request.clone(),
            )
            .await
            .unwrap();
        }
        cl
    });
    let mut answers = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while let Ok(Ok(e)) = tokio::time::timeout_at(deadline, ev.poll()).await {
        if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(_)) = e {
            answers += 1;
        }
    }
    let _cl = publisher.await.unwrap();
    assert!(answers >= 1, "no OCSP answer at all");
    assert!(answers <= 8, "{answers} answers to 30 requests in 2 s");
    assert!(refusals(&server, "rate_limited").await >= 20);
}

use rustls_pki_types::pem::PemObject;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_from_peers_are_escaped_in_logs() {
    let (tmp, server) = start();
    let c = server.enroll(&tmp.path().join("d"), "device", "e-1");
    let evil = "evil\n\u{1b}[2Jfake log line";
    let (_, answer) = tls_exchange(server.mqtt, c.client_config(), &connect_packet(evil)).await;
    assert_eq!(answer, [0x20, 0x02, 0x00, 0x05]);
    assert!(server.wait_for_log("evil\\n\\u{1b}[2Jfake log line", Duration::from_secs(5)));
    for line in server.log() {
        assert!(!line.contains('\u{1b}'), "raw ESC in the log: {line:?}");
        assert!(
            !line.starts_with("fake log line"),
            "a forged log line: {line:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_answers_follow_the_standards() {
    require_tool("openssl");
    require_tool("curl");
    let (tmp, server) = start();
    let dir = tmp.path();
    let c = server.enroll(&dir.join("d"), "device", "s-1");
    // The issuing CA points at its own status: the root's OCSP and CRL.
    let (ok, text) = run(Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(server.data_dir.join("ca/issuing.crt")));
    assert!(ok, "{text}");
    assert!(text.contains("OCSP - URI:http://"), "{text}");
    assert!(text.contains("/crl/root.crl"), "{text}");
    // RFC 5019 GET: caching headers, max-age never past nextUpdate.
    let (ok, req) = run(Command::new("openssl")
        .args(["ocsp", "-no_nonce", "-issuer"])
        .arg(server.data_dir.join("ca/issuing.crt"))
        .arg("-cert")
        .arg(&c.cert)
        .arg("-reqout")
        .arg(dir.join("req.der")));
    assert!(ok, "{req}");
    let der = std::fs::read(dir.join("req.der")).unwrap();
    let b64 = pem::encode(&pem::Pem::new("X", der));
    let b64: String = b64
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<String>()
        .replace('+', "%2B")
        .replace('/', "%2F")
        .replace('=', "%3D");
    let out = Command::new("curl")
        .args(["-s", "-D", "-", "-o", "/dev/null"])
        .arg(format!("{}/{b64}", server.ocsp_url()))
        .output()
        .unwrap();
    let headers = String::from_utf8_lossy(&out.stdout).to_lowercase();
    for h in [
        "last-modified: ",
        "expires: ",
        "etag: \"",
        "cache-control: max-age=",
    ] {
        assert!(headers.contains(h), "{h} missing: {headers}");
    }
    let max_age: i64 = headers
        .split("max-age=")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap();
    assert!((0..=3600).contains(&max_age), "{max_age}");

    // A leaf without any extended key usage is refused: clientAuth is required.
    let ours = TestCa::from_data_dir(&server.data_dir);
    let (chain, key) = ours.issue(&Spec {
        eku: false,
        ..Spec::device("no-eku")
    });
    let no_eku = server.creds(&dir.join("n"), "no-eku", &chain, &key);
    assert!(
        tests::mqtt::refused(server.mqtt, &no_eku).await,
        "a leaf without EKU got in"
    );
    assert!(server.wait_for_log("no extendedKeyUsage clientAuth", Duration::from_secs(5)));

    // Ed25519 keys are written so stock OpenSSL loads them.
    let out_dir = dir.join("ed");
    server.cli_ok(&[
        "device",
        "enroll",
        "ed-1",
        "--key-type",
        "ed25519",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    let (ok, said) = run(Command::new("openssl")
        .args(["pkey", "-noout", "-in"])
        .arg(out_dir.join("ed-1.key")));
    assert!(ok, "openssl cannot load the Ed25519 key: {said}");
    // An id named `ca` would overwrite the root in the output dir.
    let out = server.cli(&["device", "enroll", "ca", "--out", out_dir.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("would overwrite ca.crt"));
    assert!(server.cli(&["device", "show", "ca"]).status.code() != Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_disconnect_is_well_formed() {
    let (tmp, server) = start();
    let c = server.enroll(&tmp.path().join("d"), "device", "v5-1");
    let tcp = tokio::net::TcpStream::connect(server.mqtt).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(c.client_config());
    let name = rustls_pki_types::ServerName::IpAddress(server.mqtt.ip().into());
    let mut tls = connector.connect(name, tcp).await.unwrap();
    // MQTT 5 CONNECT: clean start, keep-alive 30, no properties.
    let id = b"v5-1";
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 30, 0];
    body.extend_from_slice(&(id.len() as u16).to_be_bytes());
    body.extend_from_slice(id);
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend_from_slice(&body);
    tls.write_all(&packet).await.unwrap();
    let mut buf = [0u8; 256];
    let n = tls.read(&mut buf).await.unwrap();
    assert!(
        n >= 3 && buf[0] == 0x20 && buf[3] == 0x00,
        "{:x?}",
        &buf[..n]
    );
    server.cli_ok(&["device", "revoke", "v5-1"]);
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut rest)).await;
    // DISCONNECT 0x98 with its reason string and nothing after: remaining
    // length, reason code, properties length, Reason String (0x1F).
    let why = b"device revoked";
    let mut want = vec![
        0xe0,
        (5 + why.len()) as u8,
        0x98,
        (3 + why.len()) as u8,
        0x1f,
        0,
    ];
    want.push(why.len() as u8);
    want.extend_from_slice(why);
    assert_eq!(rest, want, "DISCONNECT bytes: {rest:x?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_revocation_is_one_call_and_cuts_every_session() {
    let (tmp, server) = start();
    let dir = tmp.path();
    let ids: Vec<String> = (0..20).map(|i| format!("lot-{i:02}")).collect();
    let mut online_devices = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let c = server.enroll(&dir.join("d"), "device", id);
        if i % 2 == 0 {
            let (_cl, mut ev) = client(server.mqtt, &c, id);
            connected(&mut ev).await;
            online_devices.push((_cl, ev));
        }
    }
    server.enroll(&dir.join("d"), "device", "bystander");
    let list = dir.join("ids.txt");
    let mut f = std::fs::File::create(&list).unwrap();
    for id in &ids {
        writeln!(f, "{id}").unwrap();
    }
    writeln!(f, "no-such-device").unwrap();
    drop(f);
    let t = Instant::now();
    let out = server.cli_ok(&["device", "revoke-batch", "--file", list.to_str().unwrap()]);
    assert!(out.contains("revoked 20 devices"), "{out}");
    assert!(out.contains("1 not found"), "{out}");
    let mut cut = 0;
    for (_cl, mut ev) in online_devices {
        if tests::mqtt::until_closed(&mut ev, Duration::from_secs(2))
            .await
            .is_some()
        {
            cut += 1;
        }
    }
    println!(
        "bulk revocation of 20 (10 online), CLI call to all cut: {:?}",
        t.elapsed()
    );
    assert_eq!(cut, 10, "every live session of the lot is cut");
    for id in &ids {
        assert_eq!(server.device_json(id)["status"], "revoked");
    }
    assert_eq!(server.device_json("bystander")["status"], "active");
    let audit: Value =
        serde_json::from_str(&server.cli_ok(&["audit", "--json", "--limit", "1000"])).unwrap();
    let revokes = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "revoke")
        .count();
    assert_eq!(revokes, 20);

    // By selector: a manufacturer's lot issued before a time.
    manufacturer(&server, dir, "acme", &[]);
    let out_dir = dir.join("acme-devices");
    for id in ["a-1", "a-2"] {
        server.cli_ok(&[
            "device",
            "enroll",
            id,
            "--manufacturer",
            "acme",
            "--out",
            out_dir.to_str().unwrap(),
        ]);
    }
    let future = (time::OffsetDateTime::now_utc() + time::Duration::hours(1))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let out = server.cli_ok(&[
        "device",
        "revoke-batch",
        "--manufacturer",
        "acme",
        "--issued-before",
        &future,
    ]);
    assert!(out.contains("revoked 2 devices"), "{out}");
    assert_eq!(server.device_json("a-2")["status"], "revoked");
    assert_eq!(server.device_json("bystander")["status"], "active");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_the_same_data_dir_says_why() {
    let (_tmp, server) = start();
    let out = Command::new(tests::fleetgate_bin())
        .args(["serve", "--data-dir"])
        .arg(&server.data_dir)
        .args([
            "--api-listen",
            "127.0.0.1:0",
            "--mqtt-listen",
            "127.0.0.1:0",
        ])
        .args(["--ocsp-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("another fleetgate is using this data dir"),
        "{err}"
    );
}
