//! EST (RFC 7030) with stock tools only: `openssl req` makes the CSRs,
//! `curl` talks to `/.well-known/est/`, `openssl pkcs7 -print_certs` and
//! `openssl verify` read the answers, and `mosquitto_pub` connects with
//! what came back.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::path::{Path, PathBuf};
use std::process::Command;

use tests::{pki, require_tool, run, Creds, Server};

/// A new P-256 key and a base64 DER CSR for `/CN=<cn>`, as an EST client
/// makes them: `<dir>/<name>.key`, `<dir>/<name>.b64`.
fn csr(dir: &Path, name: &str, cn: &str) -> (PathBuf, PathBuf) {
    let key = dir.join(format!("{name}.key"));
    let der = dir.join(format!("{name}.der"));
    let b64 = dir.join(format!("{name}.b64"));
    let (ok, out) = run(Command::new("openssl")
        .args([
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args([
            "-nodes",
            "-subj",
            &format!("/CN={cn}"),
            "-outform",
            "DER",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&der));
    assert!(ok, "{out}");
    let (ok, out) = run(Command::new("openssl")
        .args(["base64", "-in"])
        .arg(&der)
        .arg("-out")
        .arg(&b64));
    assert!(ok, "{out}");
    (key, b64)
}

/// `curl` to EST path `path` (after `/.well-known/est/`), as `who`
/// (cert, key) if any, posting `body` as `content_type` if any. The HTTP
/// status and the body.
fn est(
    server: &Server,
    path: &str,
    who: Option<(&Path, &Path)>,
    body: Option<(&str, &Path)>,
) -> (u16, String) {
    let mut c = Command::new("curl");
    c.args(["-sS", "-w", "\n%{http_code}", "--cacert"])
        .arg(server.data_dir.join("ca.crt"));
    if let Some((cert, key)) = who {
        c.arg("--cert").arg(cert).arg("--key").arg(key);
    }
    if let Some((ct, file)) = body {
        c.args(["-H", &format!("Content-Type: {ct}"), "--data-binary"])
            .arg(format!("@{}", file.display()));
    }
    c.arg(format!("{}/.well-known/est/{path}", server.api_url()));
    let (ok, out) = run(&mut c);
    assert!(ok, "curl: {out}");
    let (text, code) = out.trim_end().rsplit_once('\n').unwrap_or(("", out.trim()));
    (code.trim().parse().unwrap(), text.to_owned())
}

/// The certificates of a base64 certs-only CMS answer, through
/// `openssl pkcs7 -print_certs`, as PEM in `<dir>/<name>.pem`.
fn print_certs(dir: &Path, name: &str, answer: &str) -> (PathBuf, usize) {
    let b64 = dir.join(format!("{name}.p7.b64"));
    let p7 = dir.join(format!("{name}.p7"));
    let pem = dir.join(format!("{name}.pem"));
    std::fs::write(&b64, answer).unwrap();
    let (ok, out) = run(Command::new("openssl")
        .args(["base64", "-d", "-in"])
        .arg(&b64)
        .arg("-out")
        .arg(&p7));
    assert!(ok, "{out}");
    let (ok, out) = run(Command::new("openssl")
        .args(["pkcs7", "-inform", "DER", "-print_certs", "-in"])
        .arg(&p7)
        .arg("-out")
        .arg(&pem));
    assert!(ok, "{out}");
    let text = std::fs::read_to_string(&pem).unwrap();
    (pem, text.matches("-----BEGIN CERTIFICATE-----").count())
}

fn verify(server: &Server, chain: &Path, cert: &Path) {
    let (ok, out) = run(Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(server.data_dir.join("ca.crt"))
        .arg("-untrusted")
        .arg(chain)
        .arg(cert));
    assert!(ok && out.contains(": OK"), "{out}");
}

/// Creds for `mosquitto_pub`: the EST certificate and the issuing CA.
fn creds(dir: &Path, id: &str, cert: &Path, issuing: &str, key: &Path) -> Creds {
    let chain = cert.with_extension("chain.pem");
    let mut text = std::fs::read_to_string(cert).unwrap();
    text.push_str(issuing);
    std::fs::write(&chain, text).unwrap();
    Creds {
        id: id.to_owned(),
        cert: chain,
        key: key.to_owned(),
        ca: dir.join("ca.crt"),
    }
}

fn publishes(server: &Server, c: &Creds) {
    let (ok, out) = run(server.mosquitto("mosquitto_pub", c).args([
        "-q",
        "1",
        "-t",
        &format!("devices/{}/telemetry", c.id),
        "-m",
        "hello",
    ]));
    assert!(
        ok,
        "{}: {out}\n{:?}",
        c.id,
        server.log().iter().rev().take(5).collect::<Vec<_>>()
    );
}

fn unknown(server: &Server, id: &str) -> bool {
    !server.cli(&["device", "show", id]).status.success()
}

#[test]
fn est_enrolls_with_an_admin_a_claim_and_reenrolls_with_the_devices_own_certificate() {
    for tool in ["curl", "openssl", "mosquitto_pub"] {
        require_tool(tool);
    }
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data")).unwrap();
    let dd = server.data_dir.clone();
    let dir = tmp.path().join("c");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(dd.join("ca.crt"), dir.join("ca.crt")).unwrap();
    let admin = (dd.join("admin.crt"), dd.join("admin.key"));
    let admin = Some((admin.0.as_path(), admin.1.as_path()));

    // cacerts: fleetgate's issuing CA and root, to anyone.
    let (code, body) = est(&server, "cacerts", None, None);
    assert_eq!(code, 200, "{body}");
    let (chain, n) = print_certs(&dir, "cacerts", &body);
    assert_eq!(n, 2);
    let chain_text = std::fs::read_to_string(&chain).unwrap();
    let issuing = std::fs::read_to_string(dd.join("ca/issuing.crt")).unwrap();
    let body_of =
        |pem: &str| -> String { pem.lines().filter(|l| !l.starts_with("-----")).collect() };
    assert!(
        body_of(&chain_text).contains(&body_of(&issuing)),
        "{chain_text}"
    );
    let issuing = issuing.as_str();

    // csrattrs: what CSRs should carry.
    let (code, body) = est(&server, "csrattrs", None, None);
    assert_eq!(code, 200, "{body}");

    // An admin enrolls est-1; the answer verifies, and the device connects.
    let (key1, req1) = csr(&dir, "est-1", "est-1");
    let (code, body) = est(
        &server,
        "simpleenroll",
        admin,
        Some(("application/pkcs10", &req1)),
    );
    assert_eq!(code, 200, "{body}");
    let (cert1, n) = print_certs(&dir, "est-1", &body);
    assert_eq!(n, 1);
    verify(&server, &chain, &cert1);
    let dev1 = creds(&dir, "est-1", &cert1, issuing, &key1);
    publishes(&server, &dev1);
    assert_eq!(server.device_json("est-1")["status"], "active");

    // A claim with one use enrolls est-2, as over MQTT; its second try is
    // refused (no uses left) and writes nothing.
    server.cli_ok(&[
        "claim",
        "create",
        "line-4",
        "--uses",
        "1",
        "--out",
        dir.to_str().unwrap(),
    ]);
    let claim = (dir.join("line-4.crt"), dir.join("line-4.key"));
    let claim = Some((claim.0.as_path(), claim.1.as_path()));
    let (key2, req2) = csr(&dir, "est-2", "est-2");
    let (code, body) = est(
        &server,
        "simpleenroll",
        claim,
        Some(("application/pkcs10", &req2)),
    );
    assert_eq!(code, 200, "{body}");
    let (cert2, _) = print_certs(&dir, "est-2", &body);
    verify(&server, &chain, &cert2);
    publishes(&server, &creds(&dir, "est-2", &cert2, issuing, &key2));
    let (_, req3) = csr(&dir, "est-3", "est-3");
    let (code, body) = est(
        &server,
        "simpleenroll",
        claim,
        Some(("application/pkcs10", &req3)),
    );
    assert_eq!(code, 409, "{body}");
    assert!(
        body.contains("claim_exhausted") && body.contains("no uses left"),
        "{body}"
    );
    assert!(unknown(&server, "est-3"));

    // est-1 reenrolls itself with its current certificate: a new one for
    // the same id, and the old one stays valid.
    let own = Some((dev1.cert.as_path(), dev1.key.as_path()));
    let (key1b, req1b) = csr(&dir, "est-1b", "est-1");
    let (code, body) = est(
        &server,
        "simplereenroll",
        own,
        Some(("application/pkcs10", &req1b)),
    );
    assert_eq!(code, 200, "{body}");
    let (cert1b, _) = print_certs(&dir, "est-1b", &body);
    verify(&server, &chain, &cert1b);
    let dev1b = creds(&dir, "est-1", &cert1b, issuing, &key1b);
    publishes(&server, &dev1b);
    publishes(&server, &dev1);
    assert_eq!(
        server.device_json("est-1")["certificates"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // A device may not reenroll another id, nor enroll anything.
    let (_, other) = csr(&dir, "steal", "est-2");
    let (code, body) = est(
        &server,
        "simplereenroll",
        own,
        Some(("application/pkcs10", &other)),
    );
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("may reenroll only itself"), "{body}");
    let (_, fresh) = csr(&dir, "fresh", "est-9");
    let (code, body) = est(
        &server,
        "simpleenroll",
        own,
        Some(("application/pkcs10", &fresh)),
    );
    assert_eq!(code, 403, "{body}");
    assert!(unknown(&server, "est-9"));
    assert!(server.wait_for_log(
        "may reenroll only itself",
        std::time::Duration::from_secs(3)
    ));

    // Bad input: each its own refusal, nothing written.
    let garbage = dir.join("garbage");
    std::fs::write(&garbage, "this is not base64 %%%").unwrap();
    let (code, body) = est(
        &server,
        "simpleenroll",
        admin,
        Some(("application/pkcs10", &garbage)),
    );
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("not base64"), "{body}");
    let (code, body) = est(
        &server,
        "simpleenroll",
        admin,
        Some(("application/json", &fresh)),
    );
    assert_eq!(code, 415, "{body}");
    assert!(body.contains("application/pkcs10"), "{body}");
    let forged = dir.join("forged.b64");
    std::fs::write(&forged, base64_lines(&pki::csr_signed_by_another_key())).unwrap();
    let (code, body) = est(
        &server,
        "simpleenroll",
        admin,
        Some(("application/pkcs10", &forged)),
    );
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("csr_bad_signature"), "{body}");
    assert!(unknown(&server, "forged"));
    let (code, body) = est(
        &server,
        "simpleenroll",
        None,
        Some(("application/pkcs10", &fresh)),
    );
    assert_eq!(code, 401, "{body}");
    let (code, body) = est(
        &server,
        "nosuchmaker/simpleenroll",
        admin,
        Some(("application/pkcs10", &fresh)),
    );
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("manufacturer"), "{body}");
    assert!(unknown(&server, "est-9"));

    // The audit log names who enrolled through EST.
    let audit = server.cli_ok(&["audit"]);
    assert!(audit.contains("(est)"), "{audit}");
}

/// Base64 of `der` through `openssl base64`, as a client would send it.
fn base64_lines(der: &[u8]) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let raw = tmp.path().join("raw");
    std::fs::write(&raw, der).unwrap();
    let out = Command::new("openssl")
        .args(["base64", "-in"])
        .arg(&raw)
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap()
}

/// The README's EST example, run as printed (in a directory where
/// `fleetgate-data` is this server's data dir and `claims/line-4` a
/// claim), with stock curl, GNU base64 and openssl: cacerts, an enrollment
/// by a claim, and the device renewing itself with the certificate
/// `simpleenroll` returned (a leaf alone).
#[test]
fn the_readme_est_example_works_as_printed() {
    for tool in ["curl", "openssl", "base64"] {
        require_tool(tool);
    }
    let block = tests::readme_example("E=https://127.0.0.1:8443/.well-known/est\n");
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data")).unwrap();
    let work = tests::readme_workdir(&server, &tmp.path().join("work"));
    server.cli_ok(&[
        "claim",
        "create",
        "line-4",
        "--uses",
        "10",
        "--out",
        work.join("claims").to_str().unwrap(),
    ]);
    let script = block.replace("https://127.0.0.1:8443", &server.api_url());
    let (ok, out) = tests::run_script(&work, &script);
    assert!(ok, "the README's EST example failed:\n{out}");
    for f in ["cacerts.pem", "sensor-11.crt", "sensor-11.new.crt"] {
        let text = std::fs::read_to_string(work.join(f)).unwrap();
        assert!(text.contains("BEGIN CERTIFICATE"), "{f}: {text}");
    }
    // The steps after the enrollment can be run again on their own (issue
    // 29, item 16): the answer was kept, nothing is enrolled twice.
    let after: String = script
        .lines()
        .skip_while(|l| !l.starts_with("base64 -d sensor-11.p7.b64"))
        .take(2)
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(after.contains("openssl verify"), "{after}");
    let (ok, out) = tests::run_script(&work, &after);
    assert!(ok, "run again:\n{out}");
    assert_eq!(
        server.device_json("sensor-11")["certificates"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    // Enrolled by the claim over EST, and the audit log says so.
    let audit = server.cli_ok(&["audit"]);
    assert!(audit.contains("claim:line-4 (est)"), "{audit}");
    // A CSR sent as PEM is taken too.
    let (_, pem) = tests::pki::csr("sensor-12");
    std::fs::write(work.join("sensor-12.csr"), pem).unwrap();
    let admin = (
        server.data_dir.join("admin.crt"),
        server.data_dir.join("admin.key"),
    );
    let (code, body) = est(
        &server,
        "simpleenroll",
        Some((admin.0.as_path(), admin.1.as_path())),
        Some(("application/pkcs10", &work.join("sensor-12.csr"))),
    );
    assert_eq!(code, 200, "{body}");
    assert!(!body.contains('\r'), "EST's base64 has CRLF line ends");
}
