//! Lightweight CMP (RFC 9483) with OpenSSL's own client, `openssl cmp`:
//! `ir` with a claim certificate, `kur` with the device's certificate,
//! `rr` revoking it; `curl` for what `openssl cmp` will not send.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tests::{require_tool, run, Creds, Server};

/// A new P-256 key at `<dir>/<name>.key`.
fn key(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(format!("{name}.key"));
    let (ok, out) = run(Command::new("openssl")
        .args(["genpkey", "-algorithm", "EC", "-pkeyopt"])
        .args(["ec_paramgen_curve:P-256", "-out"])
        .arg(&path));
    assert!(ok, "{out}");
    path
}

/// `openssl cmp -cmd <cmd>` against the server, protected by `cert` and
/// `key`, with `extra` arguments: whether it succeeded, and its output.
fn cmp(server: &Server, cmd: &str, who: (&Path, &Path), extra: &[&str]) -> (bool, String) {
    let ca = server.data_dir.join("ca.crt");
    let mut c = Command::new("openssl");
    c.args(["cmp", "-cmd", cmd, "-server"])
        .arg(server.api.to_string())
        .args(["-path", ".well-known/cmp", "-tls_used", "-tls_trusted"])
        .arg(&ca)
        .arg("-trusted")
        .arg(&ca)
        .arg("-cert")
        .arg(who.0)
        .arg("-key")
        .arg(who.1)
        .args(extra);
    if matches!(cmd, "ir" | "kur") && !extra.contains(&"-certout") {
        // Where a refused request's certificate would have gone.
        c.arg("-certout").arg(server.data_dir.join("never.crt"));
    }
    run(&mut c)
}

/// A certificate followed by the issuing CA, as a device presents it.
fn chain(server: &Server, cert: &Path) -> PathBuf {
    let mut text = std::fs::read_to_string(cert).unwrap();
    text.push_str(&std::fs::read_to_string(server.data_dir.join("ca/issuing.crt")).unwrap());
    let path = cert.with_extension("chain.pem");
    std::fs::write(&path, text).unwrap();
    path
}

fn publishes(server: &Server, c: &Creds) -> (bool, String) {
    run(server.mosquitto("mosquitto_pub", c).args([
        "-q",
        "1",
        "-t",
        &format!("devices/{}/telemetry", c.id),
        "-m",
        "hello",
    ]))
}

fn certificates(server: &Server, id: &str) -> usize {
    server.device_json(id)["certificates"]
        .as_array()
        .unwrap()
        .len()
}

fn unknown(server: &Server, id: &str) -> bool {
    !server.cli(&["device", "show", id]).status.success()
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn openssl_cmp_enrolls_with_a_claim_updates_the_key_and_revokes() {
    for tool in ["openssl", "curl", "mosquitto_pub"] {
        require_tool(tool);
    }
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data")).unwrap();
    let dd = server.data_dir.clone();
    let dir = tmp.path().join("c");
    std::fs::create_dir_all(&dir).unwrap();
    let admin = (dd.join("admin.crt"), dd.join("admin.key"));
    let admin = (admin.0.as_path(), admin.1.as_path());
    server.cli_ok(&[
        "claim",
        "create",
        "line-7",
        "--uses",
        "1",
        "--out",
        path(&dir),
    ]);
    let claim = (dir.join("line-7.crt"), dir.join("line-7.key"));
    let claim = (claim.0.as_path(), claim.1.as_path());

    // ir with the claim: a certificate for cmp-1, confirmed, that
    // verifies and connects.
    let k1 = key(&dir, "cmp-1");
    let c1 = dir.join("cmp-1.crt");
    let (ok, out) = cmp(
        &server,
        "ir",
        claim,
        &[
            "-newkey",
            path(&k1),
            "-subject",
            "/CN=cmp-1",
            "-certout",
            path(&c1),
        ],
    );
    assert!(ok, "{out}");
    assert!(out.contains("received PKICONF"), "{out}");
    let (ok, out) = run(Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(dd.join("ca.crt"))
        .arg("-untrusted")
        .arg(dd.join("ca/issuing.crt"))
        .arg(&c1));
    assert!(ok && out.contains(": OK"), "{out}");
    let dev1 = Creds {
        id: "cmp-1".into(),
        cert: chain(&server, &c1),
        key: k1.clone(),
        ca: dd.join("ca.crt"),
    };
    let (ok, out) = publishes(&server, &dev1);
    assert!(ok, "{out}");
    assert_eq!(server.device_json("cmp-1")["status"], "active");

    // The claim's one use is spent: refused, nothing written.
    let k2 = key(&dir, "cmp-2");
    let (ok, out) = cmp(
        &server,
        "ir",
        claim,
        &["-newkey", path(&k2), "-subject", "/CN=cmp-2"],
    );
    assert!(!ok, "{out}");
    assert!(
        out.contains("notAuthorized") && out.contains("no uses left"),
        "{out}"
    );
    assert!(unknown(&server, "cmp-2"));

    // A validity asked for (openssl cmp -days puts one in the template,
    // which crmf cannot read): honoured within the server's lifetime, and
    // a longer one shortened, saying so (issue 29, item 13).
    let k3 = key(&dir, "cmp-30");
    let c3 = dir.join("cmp-30.crt");
    let (ok, out) = cmp(
        &server,
        "ir",
        admin,
        &[
            "-newkey",
            path(&k3),
            "-subject",
            "/CN=cmp-30",
            "-days",
            "30",
            "-certout",
            path(&c3),
        ],
    );
    assert!(ok, "{out}");
    let days = |cert: &Path| -> i64 {
        let (ok, text) = run(Command::new("openssl")
            .args([
                "x509",
                "-noout",
                "-startdate",
                "-enddate",
                "-dateopt",
                "iso_8601",
                "-in",
            ])
            .arg(cert));
        assert!(ok, "{text}");
        let at = |k: &str| {
            let v = text.lines().find_map(|l| l.strip_prefix(k)).unwrap().trim();
            time::OffsetDateTime::parse(
                &v.replace(' ', "T"),
                &time::format_description::well_known::Rfc3339,
            )
            .unwrap()
        };
        (at("notAfter=") - at("notBefore=")).whole_days()
    };
    // notBefore is backdated a few minutes for clock skew.
    assert_eq!(days(&c3), 30);
    let k3b = key(&dir, "cmp-31");
    let c3b = dir.join("cmp-31.crt");
    let (ok, out) = cmp(
        &server,
        "ir",
        admin,
        &[
            "-newkey",
            path(&k3b),
            "-subject",
            "/CN=cmp-31",
            "-days",
            "400",
            "-certout",
            path(&c3b),
        ],
    );
    assert!(ok, "{out}");
    assert!(out.contains("shortened to the server's 90 days"), "{out}");
    assert_eq!(days(&c3b), 90);

    // A subject with more than a CN, and names asked for as SANs: issued
    // without them, and the answer says so (issue 29, item 14): granted
    // with modifications, in its statusString.
    let k4 = key(&dir, "cmp-13");
    let c4 = dir.join("cmp-13.crt");
    let (ok, out) = cmp(
        &server,
        "ir",
        admin,
        &[
            "-newkey",
            path(&k4),
            "-subject",
            "/CN=cmp-13/O=Acme/OU=Line 4",
            "-sans",
            "DNS:cmp-13.example",
            "-certout",
            path(&c4),
        ],
    );
    assert!(ok, "{out}");
    assert!(
        out.contains("O=Acme, OU=Line 4 left out") && out.contains("DNS:cmp-13.example left out"),
        "{out}"
    );
    let (ok, text) = run(Command::new("openssl")
        .args([
            "x509",
            "-noout",
            "-subject",
            "-ext",
            "subjectAltName",
            "-in",
        ])
        .arg(&c4));
    assert!(ok, "{text}");
    assert!(
        !text.contains("Acme") && !text.contains("cmp-13.example"),
        "{text}"
    );

    // genm: the CA certificates.
    let (ok, out) = cmp(&server, "genm", admin, &["-infotype", "caCerts"]);
    assert!(ok && out.contains("id-it-caCerts"), "{out}");

    // kur with the device's own certificate: a new one for cmp-1, the old
    // one still valid.
    let k1b = key(&dir, "cmp-1b");
    let c1b = dir.join("cmp-1b.crt");
    let own = (dev1.cert.as_path(), k1.as_path());
    let (ok, out) = cmp(
        &server,
        "kur",
        own,
        &["-newkey", path(&k1b), "-certout", path(&c1b)],
    );
    assert!(ok, "{out}");
    assert_eq!(certificates(&server, "cmp-1"), 2);
    let dev1b = Creds {
        id: "cmp-1".into(),
        cert: chain(&server, &c1b),
        key: k1b.clone(),
        ca: dd.join("ca.crt"),
    };
    let (ok, out) = publishes(&server, &dev1b);
    assert!(ok, "{out}");
    let (ok, out) = publishes(&server, &dev1);
    assert!(ok, "{out}");

    // A device may not update another id's key, nor enroll new devices.
    let (ok, out) = cmp(
        &server,
        "kur",
        own,
        &["-newkey", path(&k2), "-subject", "/CN=cmp-9"],
    );
    assert!(!ok && out.contains("may update only its own key"), "{out}");
    let (ok, out) = cmp(
        &server,
        "ir",
        own,
        &["-newkey", path(&k2), "-subject", "/CN=cmp-9"],
    );
    assert!(!ok && out.contains("notAuthorized"), "{out}");
    assert!(unknown(&server, "cmp-9"));
    assert_eq!(certificates(&server, "cmp-1"), 2);

    // An admin enrolls any id; a device may not revoke another's
    // certificate.
    let c3 = dir.join("cmp-3.crt");
    let (ok, out) = cmp(
        &server,
        "ir",
        admin,
        &[
            "-newkey",
            path(&k2),
            "-subject",
            "/CN=cmp-3",
            "-certout",
            path(&c3),
        ],
    );
    assert!(ok, "{out}");
    // p10cr: a PKCS#10 request made by `openssl req`, enrolled by the
    // admin; one whose signature fails is refused.
    let csr5 = dir.join("cmp-5.csr");
    let (ok, out) = run(Command::new("openssl")
        .args([
            "req",
            "-new",
            "-key",
            path(&k2),
            "-subj",
            "/CN=cmp-5",
            "-out",
        ])
        .arg(&csr5));
    assert!(ok, "{out}");
    let c5 = dir.join("cmp-5.crt");
    let (ok, out) = cmp(
        &server,
        "p10cr",
        admin,
        &["-csr", path(&csr5), "-certout", path(&c5)],
    );
    assert!(ok && out.contains("received CP"), "{out}");
    assert_eq!(server.device_json("cmp-5")["status"], "active");
    let forged = dir.join("forged.csr");
    std::fs::write(&forged, tests::pki::csr_signed_by_another_key()).unwrap();
    let (ok, out) = cmp(
        &server,
        "p10cr",
        admin,
        &[
            "-csr",
            path(&forged),
            "-certout",
            path(&dir.join("never.crt")),
        ],
    );
    assert!(!ok && out.contains("badPOP"), "{out}");

    let (ok, out) = cmp(&server, "rr", own, &["-oldcert", path(&c3)]);
    assert!(!ok && out.contains("may revoke only its own"), "{out}");
    assert!(server.openssl_ocsp(&c3).contains(": good"));

    // Bad input, each refused for its reason and nothing written: an
    // unprotected request, a proof of possession that is not a
    // signature, garbage, the wrong content type.
    let (ok, out) = cmp(
        &server,
        "ir",
        admin,
        &[
            "-newkey",
            path(&k2),
            "-subject",
            "/CN=cmp-4",
            "-unprotected_requests",
        ],
    );
    assert!(!ok && out.contains("badMessageCheck"), "{out}");
    assert!(out.contains("not protected"), "{out}");
    let (ok, out) = cmp(
        &server,
        "ir",
        admin,
        &["-newkey", path(&k2), "-subject", "/CN=cmp-4", "-popo", "0"],
    );
    assert!(!ok && out.contains("badPOP"), "{out}");
    assert!(unknown(&server, "cmp-4"));
    let curl = |ct: &str| {
        run(Command::new("curl")
            .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
            .arg(dd.join("ca.crt"))
            .args(["-H", &format!("Content-Type: {ct}")])
            .args(["--data-binary", "not a PKIMessage"])
            .arg(format!("{}/.well-known/cmp", server.api_url())))
    };
    let (ok, code) = curl("application/pkixcmp");
    assert!(ok && code == "200", "{code}");
    assert!(server.wait_for_log("badDataFormat", Duration::from_secs(3)));
    let (ok, code) = curl("application/json");
    assert!(ok && code == "415", "{code}");

    // rr: cmp-1 revokes its new certificate. A connection with it is
    // refused at once (before CONNACK), OCSP says revoked; the other
    // stays good.
    let (ok, out) = cmp(
        &server,
        "rr",
        own,
        &["-oldcert", path(&c1b), "-revreason", "1"],
    );
    assert!(ok && out.contains("revocation accepted"), "{out}");
    let (ok, out) = publishes(&server, &dev1b);
    assert!(!ok, "{out}");
    assert!(server.wait_for_log(
        "reason=\"revoked\" detail=\"device cmp-1",
        Duration::from_secs(3)
    ));
    let ocsp = server.openssl_ocsp(&c1b);
    assert!(
        ocsp.contains(": revoked") && ocsp.contains("keyCompromise"),
        "{ocsp}"
    );
    assert!(server.openssl_ocsp(&c1).contains(": good"));

    // No refused request got a certificate.
    assert!(!dd.join("never.crt").exists());
    assert!(!dir.join("never.crt").exists());

    // The audit log names who did each through CMP.
    let audit = server.cli_ok(&["audit"]);
    assert!(audit.contains("device:cmp-1 (cmp)"), "{audit}");
    assert!(audit.contains("admin:"), "{audit}");
}

/// Posts the DER CMP message in `file` to the server with curl, as a
/// captured request is replayed: the answer's bytes.
fn post_cmp(server: &Server, file: &Path) -> Vec<u8> {
    let out = Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(server.data_dir.join("ca.crt"))
        .args(["-H", "Content-Type: application/pkixcmp", "--data-binary"])
        .arg(format!("@{}", file.display()))
        .arg(format!("{}/.well-known/cmp", server.api_url()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    out.stdout
}

#[test]
fn a_captured_kur_replayed_issues_nothing() {
    for tool in ["openssl", "curl"] {
        require_tool(tool);
    }
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data")).unwrap();
    let dir = tmp.path().join("c");
    let dev = server.enroll(&dir, "device", "cmp-r");
    let new_key = key(&dir, "cmp-r-new");
    // The device's own kur, its requests captured as they went out.
    let (kur, conf) = (dir.join("kur.der"), dir.join("conf.der"));
    let (ok, out) = cmp(
        &server,
        "kur",
        (&dev.cert, &dev.key),
        &[
            "-newkey",
            path(&new_key),
            "-reqout",
            &format!("{},{}", path(&kur), path(&conf)),
            "-certout",
            path(&dir.join("cmp-r-new.crt")),
        ],
    );
    assert!(ok, "{out}");
    assert_eq!(certificates(&server, "cmp-r"), 2);
    // The attack: the captured kur, posted three more times.
    for _ in 0..3 {
        let answer = post_cmp(&server, &kur);
        let (ok, text) = run(Command::new("openssl")
            .args(["asn1parse", "-inform", "DER"])
            .stdin(std::process::Stdio::piped())
            .arg("-in")
            .arg({
                let f = dir.join("answer.der");
                std::fs::write(&f, &answer).unwrap();
                f
            }));
        assert!(ok, "{text}");
        assert!(text.contains("a replay"), "not refused as a replay: {text}");
    }
    assert_eq!(
        certificates(&server, "cmp-r"),
        2,
        "a replay issued a certificate"
    );
    // The captured certConf is refused too (its transaction is done).
    let answer = post_cmp(&server, &conf);
    assert!(!answer.is_empty());
    assert!(server.wait_for_log(
        "a replay: this senderNonce was used before",
        Duration::from_secs(5)
    ));
}
