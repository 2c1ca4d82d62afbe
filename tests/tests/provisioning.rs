//! Provisioning end to end: the real server, its CLI, curl and openssl.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use fleetgate_api::client::{ApiFailure, Bytes, Method};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use serde_json::{json, Value};
use tests::{pki, require_tool, run, Server};

fn start() -> (tempfile::TempDir, Server) {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data")).unwrap();
    (tmp, server)
}

fn show(server: &Server, id: &str) -> String {
    server.cli_ok(&["device", "show", id])
}

#[test]
fn enroll_verify_and_lifecycle_through_the_cli() {
    let (tmp, server) = start();
    let out = tmp.path().join("devices");
    let out_s = out.to_str().unwrap();
    let said = server.cli_ok(&["device", "enroll", "dev-1", "--out", out_s]);
    assert!(said.contains("enrolled device dev-1"), "{said}");

    // Key stays private, certificate is leaf + issuing CA.
    let key = out.join("dev-1.key");
    let crt = out.join("dev-1.crt");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&crt)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(chain.len(), 2);

    // webpki: the chain verifies to the root for client auth.
    let ca_crt = server.data_dir.join("ca.crt");
    let root = CertificateDer::from_pem_file(&ca_crt).unwrap();
    let anchor = webpki::anchor_from_trusted_cert(&root).unwrap();
    let ee = webpki::EndEntityCert::try_from(&chain[0]).unwrap();
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &[anchor],
        &chain[1..],
        rustls_pki_types::UnixTime::now(),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .unwrap();

    // openssl, independently.
    require_tool("openssl");
    let (ok, text) = run(Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(&ca_crt)
        .arg("-untrusted")
        .arg(&crt)
        .arg(&crt));
    assert!(ok && text.contains(": OK"), "{text}");
    let (ok, text) = run(Command::new("openssl")
        .args([
            "x509",
            "-noout",
            "-subject",
            "-ext",
            "subjectAltName,extendedKeyUsage",
            "-in",
        ])
        .arg(&crt));
    assert!(ok, "{text}");
    assert!(
        text.contains("CN=dev-1") || text.contains("CN = dev-1"),
        "{text}"
    );
    assert!(text.contains("URI:urn:fleetgate:device:dev-1"), "{text}");
    assert!(text.contains("TLS Web Client Authentication"), "{text}");
    assert!(!text.contains("Server Authentication"), "{text}");

    assert!(show(&server, "dev-1").contains("status:       active"));
    server.cli_ok(&["device", "suspend", "dev-1"]);
    let s = show(&server, "dev-1");
    assert!(s.contains("status:       suspended"), "{s}");
    assert!(
        s.contains("  suspended"),
        "certificate follows its device: {s}"
    );
    server.cli_ok(&["device", "resume", "dev-1"]);
    assert!(show(&server, "dev-1").contains("status:       active"));
    server.cli_ok(&["device", "revoke", "dev-1", "--reason", "key-compromise"]);
    let s = show(&server, "dev-1");
    assert!(s.contains("status:       revoked (key-compromise"), "{s}");

    // Revoked is final, and each refusal says why.
    for args in [
        ["device", "revoke", "dev-1"],
        ["device", "resume", "dev-1"],
        ["device", "suspend", "dev-1"],
    ] {
        let out = server.cli(&args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("invalid_transition") && err.contains("HTTP 409"),
            "{err}"
        );
    }

    // The audit log has it all, in order (newest first).
    let audit = server.cli_ok(&["audit", "--json"]);
    let audit: Value = serde_json::from_str(&audit).unwrap();
    let actions: Vec<&str> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["device"] == "dev-1")
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["revoke", "resume", "suspend", "enroll"]);
}

#[test]
fn service_enrollment_rotation_and_listing() {
    let (tmp, server) = start();
    let out = tmp.path().join("creds");
    let out_s = out.to_str().unwrap();
    server.cli_ok(&["service", "enroll", "backend", "--out", out_s]);
    server.cli_ok(&[
        "device",
        "enroll",
        "dev-a",
        "--out",
        out_s,
        "--key-type",
        "ed25519",
    ]);
    server.cli_ok(&[
        "device",
        "enroll",
        "dev-b",
        "--out",
        out_s,
        "--key-type",
        "p384",
    ]);
    let (ok, text) = run(Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
        .arg(out.join("backend.crt")));
    assert!(
        ok && text.contains("urn:fleetgate:service:backend"),
        "{text}"
    );

    let old = std::fs::read(out.join("dev-a.crt")).unwrap();
    server.cli_ok(&["device", "rotate", "dev-a", "--out", out_s]);
    assert_ne!(std::fs::read(out.join("dev-a.crt")).unwrap(), old);
    let s = show(&server, "dev-a");
    assert_eq!(s.matches("  good").count(), 2, "old stays valid: {s}");

    server.cli_ok(&["device", "suspend", "dev-b"]);
    let list = server.cli_ok(&["device", "list", "--status", "suspended"]);
    assert!(list.contains("dev-b") && !list.contains("dev-a"), "{list}");
    let list = server.cli_ok(&["device", "list"]);
    for id in ["admin", "backend", "dev-a", "dev-b"] {
        assert!(list.contains(id), "{list}");
    }
}

#[test]
fn openssl_made_csrs_rsa_accepted_weak_rsa_refused() {
    let (tmp, server) = start();
    require_tool("openssl");
    let dir = tmp.path();
    for (bits, id) in [(2048, "rsa-2048"), (1024, "rsa-1024")] {
        let csr = dir.join(format!("{id}.csr"));
        let (ok, text) = run(Command::new("openssl")
            .args([
                "req",
                "-new",
                "-newkey",
                &format!("rsa:{bits}"),
                "-nodes",
                "-subj",
                "/CN=ignored",
                "-keyout",
            ])
            .arg(dir.join(format!("{id}.key")))
            .arg("-out")
            .arg(&csr));
        assert!(ok, "{text}");
        let out = server.cli(&[
            "device",
            "enroll",
            id,
            "--csr",
            csr.to_str().unwrap(),
            "--out",
            dir.to_str().unwrap(),
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        if bits >= 2048 {
            assert!(out.status.success(), "{err}");
            // The CSR's CN is ignored: the certificate names the enrolled id.
            let (ok, text) = run(Command::new("openssl")
                .args(["x509", "-noout", "-subject", "-in"])
                .arg(dir.join(format!("{id}.crt"))));
            assert!(
                ok && text.contains(id) && !text.contains("ignored"),
                "{text}"
            );
        } else {
            assert!(!out.status.success());
            assert!(
                err.contains("unsupported_key") && err.contains("1024"),
                "{err}"
            );
        }
    }
}

/// Expects an API failure with `status` and `code`.
fn expect_failure(r: anyhow::Result<Value>, status: u16, code: &str) {
    let e = r.expect_err("expected a failure");
    let f = e
        .downcast_ref::<ApiFailure>()
        .unwrap_or_else(|| panic!("not an API error: {e:#}"));
    assert_eq!(
        (f.status.as_u16(), f.code.as_str()),
        (status, code),
        "{}",
        f.message
    );
}

#[tokio::test]
async fn bad_input_gets_specific_errors_never_a_crash() {
    let (_tmp, server) = start();
    let admin = server.admin();
    let (_key, good_csr) = pki::csr("dev");

    let enroll = |body: Value| {
        let admin = admin.clone();
        async move { admin.post::<_, Value>("/v1/devices", &body).await }
    };
    expect_failure(
        enroll(json!({"id": "dev-1", "csr": "not a csr"})).await,
        400,
        "malformed_csr",
    );
    expect_failure(
        enroll(json!({"id": "dev-1", "csr": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"})).await,
        400,
        "malformed_csr",
    );
    let forged = pki::csr_signed_by_another_key();
    let forged_pem = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", forged));
    expect_failure(
        enroll(json!({"id": "dev-1", "csr": forged_pem})).await,
        400,
        "csr_bad_signature",
    );
    expect_failure(
        enroll(json!({"id": "a/b", "csr": good_csr})).await,
        400,
        "invalid_id",
    );
    expect_failure(
        enroll(json!({"id": "x".repeat(300), "csr": good_csr})).await,
        400,
        "invalid_id",
    );
    expect_failure(
        enroll(json!({"id": "dev-1", "csr": good_csr, "lifetime_days": 0})).await,
        400,
        "invalid_input",
    );
    expect_failure(
        enroll(json!({"id": "dev-1", "csr": "x".repeat(128 * 1024)})).await,
        413,
        "too_large",
    );
    expect_failure(
        enroll(json!({"id": "dev-1", "csr": good_csr, "colour": "blue"})).await,
        422,
        "invalid_json",
    );
    let (status, body) = admin
        .send(
            Method::POST,
            "/v1/devices",
            Bytes::from_static(b"{not json"),
        )
        .await
        .unwrap();
    assert_eq!(status.as_u16(), 400, "{body:?}");
    assert!(
        String::from_utf8_lossy(&body).contains("invalid_json"),
        "{body:?}"
    );

    expect_failure(
        admin.get("/v1/devices/nobody").await,
        404,
        "device_not_found",
    );
    expect_failure(
        admin.get("/v1/devices?status=sleeping").await,
        400,
        "invalid_input",
    );

    // The good request still works: nothing above broke the server.
    let ok: Value = enroll(json!({"id": "dev-1", "csr": good_csr}))
        .await
        .unwrap();
    assert_eq!(ok["device"]["status"], "active");
    expect_failure(
        enroll(json!({"id": "dev-1", "csr": good_csr})).await,
        409,
        "already_exists",
    );
    expect_failure(
        admin
            .post("/v1/devices/dev-1/revoke", &json!({"reason": "bored"}))
            .await,
        400,
        "invalid_input",
    );
    let _: Value = admin
        .post("/v1/devices/dev-1/revoke", &json!({"reason": "superseded"}))
        .await
        .unwrap();
    expect_failure(
        admin
            .post("/v1/devices/dev-1/revoke", &json!({"reason": "superseded"}))
            .await,
        409,
        "invalid_transition",
    );
    expect_failure(
        admin.post("/v1/devices/dev-1/resume", &json!({})).await,
        409,
        "invalid_transition",
    );
    let log = server.log().join("\n");
    assert!(!log.contains("panicked"), "{log}");
}

#[tokio::test]
async fn admin_api_refuses_device_certificates_and_anonymous_clients() {
    let (tmp, server) = start();
    let out = tmp.path().join("devices");
    server.cli_ok(&["device", "enroll", "dev-1", "--out", out.to_str().unwrap()]);

    let device = server.client(Some((&out.join("dev-1.crt"), &out.join("dev-1.key"))));
    expect_failure(device.get("/v1/devices").await, 403, "admin_role_required");
    expect_failure(
        device.post("/v1/devices/dev-1/revoke", &json!({})).await,
        403,
        "admin_role_required",
    );
    let anonymous = server.client(None);
    expect_failure(
        anonymous.get("/v1/devices").await,
        401,
        "client_certificate_required",
    );
    let log = server.log().join("\n");
    assert!(
        server.wait_for_log("has no admin role", std::time::Duration::from_secs(3)),
        "refusal logged: {log}"
    );

    // curl, as the README shows it.
    require_tool("curl");
    let dd = &server.data_dir;
    let url = format!("{}/v1/devices/dev-1", server.api_url());
    let (ok, text) = run(Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(dd.join("ca.crt"))
        .arg("--cert")
        .arg(dd.join("admin.crt"))
        .arg("--key")
        .arg(dd.join("admin.key"))
        .arg(&url));
    assert!(ok, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["id"], "dev-1");
    let (_, text) = run(Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(dd.join("ca.crt"))
        .arg("--cert")
        .arg(out.join("dev-1.crt"))
        .arg("--key")
        .arg(out.join("dev-1.key"))
        .arg(&url));
    assert!(text.contains("admin_role_required"), "{text}");
}

#[test]
fn acknowledged_changes_survive_kill_9() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let out = tmp.path().join("devices");
    let out_s = out.to_str().unwrap();
    let server = Server::start(&data).unwrap();
    for id in ["keep", "gone", "paused"] {
        server.cli_ok(&["device", "enroll", id, "--out", out_s]);
    }
    server.cli_ok(&["device", "revoke", "gone", "--reason", "key-compromise"]);
    server.cli_ok(&["device", "suspend", "paused"]);
    let root_before = std::fs::read(data.join("ca.crt")).unwrap();
    let audit_before = server.cli_ok(&["audit", "--json"]);
    server.kill9();

    let server = Server::start(&data).unwrap();
    assert_eq!(
        std::fs::read(data.join("ca.crt")).unwrap(),
        root_before,
        "same CA"
    );
    assert!(show(&server, "keep").contains("status:       active"));
    assert!(show(&server, "gone").contains("status:       revoked (key-compromise"));
    assert!(show(&server, "paused").contains("status:       suspended"));
    assert_eq!(server.cli_ok(&["audit", "--json"]), audit_before);
    // Certificates issued before the crash still verify against the root.
    let (ok, text) = run(Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(data.join("ca.crt"))
        .arg("-untrusted")
        .arg(out.join("keep.crt"))
        .arg(out.join("keep.crt")));
    assert!(ok, "{text}");
    // And the CA goes on issuing.
    server.cli_ok(&["device", "enroll", "after", "--out", out_s]);
}

#[test]
fn graceful_stop_then_restart_and_refusal_of_a_broken_data_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = Server::start(&data).unwrap();
    let status = server.terminate();
    assert!(status.success(), "SIGTERM exits cleanly: {status}");
    Server::start(&data).unwrap().terminate();

    // A half-written data dir: refused, never silently replaced.
    std::fs::remove_file(data.join("fleetgate.json")).unwrap();
    let err = Server::start(&data).unwrap_err().to_string();
    assert!(err.contains("interrupted"), "{err}");
    assert_eq!(exit_code_of_serve(&data), Some(64));
}

fn exit_code_of_serve(data: &Path) -> Option<i32> {
    Command::new(tests::fleetgate_bin())
        .args([
            "serve",
            "--api-listen",
            "127.0.0.1:0",
            "--mqtt-listen",
            "127.0.0.1:0",
        ])
        .args(["--ocsp-listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .output()
        .unwrap()
        .status
        .code()
}

/// `fleetgate audit`: the newest first, `--limit`, a line saying how to
/// go on, `--before` for the next page; on sled and on etcd.
#[test]
fn the_audit_log_reads_newest_first_and_pages_back() {
    let tmp = tempfile::tempdir().unwrap();
    let etcd = tests::etcd::Etcd::start(&tmp.path().join("etcd"));
    let on_etcd = ["--store".to_owned(), etcd.url()];
    let on_etcd: Vec<&str> = on_etcd.iter().map(String::as_str).collect();
    for (name, extra) in [("sled", &[][..]), ("etcd", &on_etcd[..])] {
        let server = Server::start_with(&tmp.path().join(format!("{name}-data")), extra).unwrap();
        let dir = tmp.path().join(format!("{name}-d"));
        for i in 0..3 {
            server.enroll(&dir, "device", &format!("page-{i}"));
        }
        server.cli_ok(&["device", "suspend", "page-2"]);
        let page: Value =
            serde_json::from_str(&server.cli_ok(&["audit", "--json", "--limit", "2"])).unwrap();
        let seqs = |p: &Value| -> Vec<u64> {
            p["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["seq"].as_u64().unwrap())
                .collect()
        };
        let first = seqs(&page);
        assert_eq!(first.len(), 2, "{name}: {page}");
        assert!(first[0] > first[1], "{name}: not newest first: {page}");
        assert_eq!(page["items"][0]["action"], "suspend", "{name}: {page}");
        let text = server.cli_ok(&["audit", "--limit", "2"]);
        let next = page["next"].as_str().unwrap();
        assert!(
            text.ends_with(&format!("(more: fleetgate audit --before {next})\n")),
            "{name}: {text}"
        );
        let older: Value = serde_json::from_str(
            &server.cli_ok(&["audit", "--json", "--limit", "2", "--before", next]),
        )
        .unwrap();
        let second = seqs(&older);
        assert!(second.iter().all(|s| *s < first[1]), "{name}: {older}");
        assert!(second[0] > second[1], "{name}: {older}");
        // Oldest first from --after, as before.
        let oldest: Value = serde_json::from_str(&server.cli_ok(&[
            "audit",
            "--json",
            "--limit",
            "2",
            "--after",
            &second[1].to_string(),
        ]))
        .unwrap();
        assert_eq!(seqs(&oldest), [second[0], first[1]], "{name}: {oldest}");
    }
}

/// Issue 29, item 23: the CLI pointed at another of the server's ports,
/// or run where the data dir is not, says what is wrong and what to pass.
#[test]
fn the_cli_says_what_is_wrong_when_pointed_at_the_wrong_place() {
    let (tmp, server) = start();
    for (addr, says) in [
        (server.ocsp, "does not speak TLS"),
        (server.mqtt, "refused an admin's certificate"),
    ] {
        let out = server.cli(&["device", "list", "--api", &format!("https://{addr}")]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{err}");
        assert!(err.contains("--api-listen"), "{err}");
    }
    // The default data dir is relative to where the command runs.
    let elsewhere = tmp.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let out = Command::new(tests::fleetgate_bin())
        .args(["device", "list"])
        .current_dir(&elsewhere)
        .env_remove("FLEETGATE_DATA_DIR")
        .env("FLEETGATE_API", server.api_url())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Pass --data-dir"), "{err}");
    assert!(err.contains("elsewhere/fleetgate-data"), "{err}");
}
