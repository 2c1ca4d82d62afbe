//! CA key custody: the root kept offline and used only at ceremonies, the
//! issuing CA's and signers' keys in a PKCS#11 token (SoftHSM2, checked
//! from outside with pkcs11-tool), and `fleetgate check`'s key report.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tests::softhsm::Token;
use tests::{exits, fleetgate_bin, openssl_device, require_tool, run, Creds, Server};

/// `fleetgate ARGS` with the token's config in the environment.
fn fleetgate(args: &[&str], token: Option<&Token>) -> (bool, String) {
    let mut cmd = Command::new(fleetgate_bin());
    cmd.args(args).env("FLEETGATE_LOG", "warn");
    if let Some(t) = token {
        cmd.env("SOFTHSM2_CONF", &t.conf);
    }
    run(&mut cmd)
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Every file under `dir` holding a PEM private key.
fn private_keys_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(private_keys_under(&p));
        } else if std::fs::read(&p).is_ok_and(|b| b.windows(11).any(|w| w == b"PRIVATE KEY")) {
            out.push(p);
        }
    }
    out
}

fn openssl_verify(ca: &Path, chain: &Path) -> String {
    require_tool("openssl");
    let (ok, out) = run(Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(ca)
        .arg("-untrusted")
        .arg(chain)
        .arg(chain));
    assert!(ok, "openssl verify: {out}");
    out
}

#[test]
fn offline_root_and_keys_in_softhsm_serve_enroll_connect_and_answer_ocsp() {
    let tmp = tempfile::tempdir().unwrap();
    let token = Token::new(tmp.path(), "fleetgate");
    let data = tmp.path().join("data");
    let root = tmp.path().join("root");
    let (ok, out) = fleetgate(
        &[
            "ca",
            "init",
            "--data-dir",
            s(&data),
            "--root-out",
            s(&root),
            "--ca-key-uri",
            &token.uri("issuing-ca"),
            "--pin-file",
            s(&token.pin_file),
        ],
        Some(&token),
    );
    assert!(ok, "ca init: {out}");
    assert!(
        out.contains("issuing CA key pkcs11:token=fleetgate;object=issuing-ca"),
        "{out}"
    );

    // The key is in the token: sensitive (its value is never shown) and
    // never extractable (it cannot be wrapped out), for signing only.
    let (ok, objects) = token.pkcs11_tool(&["--list-objects", "--type", "privkey"]);
    assert!(ok, "{objects}");
    let issuing = objects
        .split("Private Key Object")
        .find(|o| o.contains("label:      issuing-ca"))
        .unwrap_or_else(|| panic!("no issuing-ca private key in the token: {objects}"));
    assert!(issuing.contains("never extractable"), "{issuing}");
    assert!(issuing.contains("always sensitive"), "{issuing}");
    assert!(issuing.contains("Usage:      sign\n"), "{issuing}");

    let envs = [("SOFTHSM2_CONF", token.conf.as_path())];
    let pin = ["--pin-file", s(&token.pin_file)];
    // Without the PIN the node says what it needs, and does not start.
    let e = Server::start_env(&[], &data, &[], &envs)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--pin-file"), "{e}");
    let server = Server::start_env(&[], &data, &pin, &envs).unwrap();
    assert!(
        server.wait_for_log("the root CA is offline", Duration::from_secs(10)),
        "{:?}",
        server.log()
    );

    // Enroll: the chain verifies with stock openssl up to the root.
    let devs = tmp.path().join("devs");
    let dev = server.enroll(&devs, "device", "dev-1");
    assert!(openssl_verify(&data.join("ca.crt"), &dev.cert).contains("OK"));
    // The device connects with mosquitto_pub.
    let st = server
        .mosquitto("mosquitto_pub", &dev)
        .args(["-t", "devices/dev-1/telemetry", "-m", "21.5"])
        .status()
        .unwrap();
    assert!(st.success(), "mosquitto_pub as dev-1");
    // OCSP answers, signed through the token (the responder's key is a
    // token object the data dir names by URI).
    let answer = server.openssl_ocsp(&dev.cert);
    assert!(answer.contains("Response verify OK"), "{answer}");
    assert!(answer.contains(": good"), "{answer}");
    let signer_uri = std::fs::read_to_string(data.join("ocsp/signer.key.uri")).unwrap();
    let label = signer_uri
        .split(';')
        .find_map(|a| a.strip_prefix("object="))
        .and_then(|a| a.split('?').next())
        .unwrap()
        .to_owned();
    assert!(objects.contains("label:      issuing-ca"));
    let (_, now) = token.pkcs11_tool(&["--list-objects", "--type", "privkey"]);
    assert!(
        now.contains(&format!("label:      {label}")),
        "{label} not in {now}"
    );
    // The issuing CA's own status, answered for the root by its responder.
    let (ok, out) = run(Command::new("openssl")
        .arg("ocsp")
        .arg("-issuer")
        .arg(data.join("ca.crt"))
        .arg("-cert")
        .arg(data.join("ca/issuing.crt"))
        .args(["-url", &server.ocsp_url(), "-CAfile"])
        .arg(data.join("ca.crt")));
    assert!(
        ok && out.contains("Response verify OK") && out.contains(": good"),
        "{out}"
    );

    // CMP: stock `openssl cmp` checks the response's protection, signed by
    // the CMP signer's key in the token.
    let c = tmp.path().join("cmp");
    server.cli_ok(&["claim", "create", "line-1", "--uses", "1", "--out", s(&c)]);
    let newkey = c.join("cmp-1.key");
    let (ok, out) = run(Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
        ])
        .arg(&newkey));
    assert!(ok, "{out}");
    let (ok, out) = run(Command::new("openssl")
        .args(["cmp", "-cmd", "ir", "-server"])
        .arg(server.api.to_string())
        .args(["-path", ".well-known/cmp", "-tls_used", "-tls_trusted"])
        .arg(data.join("ca.crt"))
        .arg("-trusted")
        .arg(data.join("ca.crt"))
        .arg("-cert")
        .arg(c.join("line-1.crt"))
        .arg("-key")
        .arg(c.join("line-1.key"))
        .arg("-newkey")
        .arg(&newkey)
        .args(["-subject", "/CN=cmp-1", "-certout"])
        .arg(c.join("cmp-1.crt")));
    assert!(ok && out.contains("received PKICONF"), "{out}");
    assert!(std::fs::read_to_string(data.join("cmp/signer.key.uri"))
        .unwrap()
        .starts_with("pkcs11:token=fleetgate;object=cmp-signer-"));

    // Only the root needs the root: a manufacturer CA is a ceremony.
    let out = server.cli(&[
        "manufacturer",
        "create",
        "acme",
        "--out",
        s(&tmp.path().join("acme")),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("root_offline") && err.contains("--root-dir"),
        "{err}"
    );
    let made = server.cli_ok(&[
        "manufacturer",
        "create",
        "acme",
        "--out",
        s(&tmp.path().join("acme")),
        "--root-dir",
        s(&root),
    ]);
    assert!(made.contains("stays in the node's token"), "{made}");
    assert!(!tmp.path().join("acme/acme.key").exists());
    let s1 = server.enroll_with(&devs, "s-1", &["--manufacturer", "acme"]);
    assert!(openssl_verify(&data.join("ca.crt"), &s1.cert).contains("OK"));

    // Nothing in the data dir is a CA or signer private key: only the TLS
    // server's key and the operator's credential.
    let mut found: Vec<String> = private_keys_under(&data)
        .iter()
        .map(|p| p.strip_prefix(&data).unwrap().display().to_string())
        .collect();
    found.sort();
    assert_eq!(found, ["admin.key", "server.key"]);
    assert_eq!(private_keys_under(&root), [root.join("root.key")]);
    let (ok, report) = fleetgate(
        &[
            "check",
            "--data-dir",
            s(&data),
            "--key-policy",
            "hsm",
            "--keys-only",
        ],
        None,
    );
    assert!(ok, "{report}");
    assert!(report.contains("manufacturer CA acme"), "{report}");
    assert!(!report.contains("problem"), "{report}");

    // A restart reopens every key from the token; nothing is made anew.
    server.terminate();
    let server = Server::start_env(&[], &data, &pin, &envs).unwrap();
    assert!(server.openssl_ocsp(&dev.cert).contains(": good"));
    assert!(
        !server.log().iter().any(|l| l.contains("issued a new")),
        "{:?}",
        server.log()
    );
    server.cli_ok(&["device", "revoke", "dev-1"]);
    assert!(server.openssl_ocsp(&dev.cert).contains(": revoked"));
}

#[test]
fn a_manufacturer_ca_made_at_a_root_ceremony_admits_just_in_time_and_falls() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let root = tmp.path().join("root");
    let (ok, out) = fleetgate(
        &["ca", "init", "--data-dir", s(&data), "--root-out", s(&root)],
        None,
    );
    assert!(ok, "{out}");
    assert!(!data.join("ca/root.key").exists());
    let server = Server::start(&data).unwrap();
    let m = tmp.path().join("acme");
    let out = server.cli_ok(&[
        "manufacturer",
        "create",
        "acme",
        "--out",
        s(&m),
        "--root-dir",
        s(&root),
    ]);
    assert!(out.contains("hand it to the factory"), "{out}");

    // The factory signs a device with stock openssl; it registers itself
    // on its first connect.
    let dev: Creds = openssl_device(
        &tmp.path().join("factory"),
        &server,
        &m.join("acme.crt"),
        &m.join("acme.key"),
        "sensor-7",
    );
    let mut sub = server
        .mosquitto("mosquitto_sub", &dev)
        .args(["-t", "devices/sensor-7/commands/#", "-q", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    tests::eventually(Duration::from_secs(15), "sensor-7 registers", || {
        server
            .cli(&["device", "show", "sensor-7"])
            .status
            .success()
            .then_some(())
    });
    assert!(server.wait_for_log("connected", Duration::from_secs(10)));
    assert!(
        !exits(&mut sub, Duration::from_millis(200)),
        "sensor-7 was not admitted"
    );

    // The root's CRL before: nobody listed. Revoking the manufacturer cuts
    // its device at once, without the root.
    let serial = server.cli_ok(&["manufacturer", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_str(&serial).unwrap();
    let serial = list[0]["serial"].as_str().unwrap().to_uppercase();
    let crl = || -> String {
        let der = ureq_get(&format!("{}/crl/root.crl", server.ocsp_url()));
        let path = tmp.path().join("root.crl");
        std::fs::write(&path, der).unwrap();
        run(Command::new("openssl")
            .args(["crl", "-inform", "der", "-noout", "-text", "-in"])
            .arg(&path))
        .1
        .replace(':', "")
    };
    assert!(!crl().contains(&serial));
    server.cli_ok(&["manufacturer", "revoke", "acme"]);
    assert!(
        exits(&mut sub, Duration::from_secs(10)),
        "sensor-7's connection was not cut"
    );
    // The root's responder says the manufacturer CA is revoked.
    let (ok, out) = run(Command::new("openssl")
        .arg("ocsp")
        .arg("-issuer")
        .arg(data.join("ca.crt"))
        .arg("-cert")
        .arg(m.join("acme.crt"))
        .args(["-url", &server.ocsp_url(), "-CAfile"])
        .arg(data.join("ca.crt")));
    assert!(
        ok && out.contains("Response verify OK") && out.contains(": revoked"),
        "{out}"
    );
    // The CRL ceremony lists it, on every node (it is in the registry).
    let out = server.cli_ok(&["ca", "crl", "--root-dir", s(&root)]);
    assert!(out.contains("1 revoked manufacturer CAs"), "{out}");
    assert!(
        crl().contains(&serial),
        "the root CRL does not list {serial}"
    );
    // A CRL that leaves the revoked CA out is refused.
    let stale = std::fs::read(data.join("ca/root.crl")).unwrap();
    let pem = provisioning::manufacturer::pem_encode("X509 CRL", &stale);
    let body = serde_json::json!({ "crl_pem": pem });
    let err = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(
            server
                .admin()
                .post::<_, serde_json::Value>("/v1/ca/root-crl", &body),
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("does not list revoked manufacturer CA"),
        "{err}"
    );
}

/// A plain HTTP GET (the status service is plain HTTP), with curl.
fn ureq_get(url: &str) -> Vec<u8> {
    require_tool("curl");
    let out = Command::new("curl")
        .args(["-sf", url])
        .output()
        .expect("curl");
    assert!(out.status.success(), "curl {url}");
    out.stdout
}

#[test]
fn check_says_where_each_key_is_and_refuses_what_policy_forbids() {
    let tmp = tempfile::tempdir().unwrap();
    // The one-command start: every key a file in the data dir.
    let online = tmp.path().join("online");
    let (ok, out) = fleetgate(&["ca", "init", "--data-dir", s(&online)], None);
    assert!(ok, "{out}");
    let (ok, report) = fleetgate(&["check", "--data-dir", s(&online), "--keys-only"], None);
    assert!(ok, "{report}");
    assert!(
        report.contains("root CA") && report.contains("(mode 0600)"),
        "{report}"
    );
    let (ok, report) = fleetgate(
        &[
            "check",
            "--data-dir",
            s(&online),
            "--keys-only",
            "--key-policy",
            "offline-root",
        ],
        None,
    );
    assert!(!ok);
    assert!(
        report.contains("the root CA's key is in the data dir"),
        "{report}"
    );

    // An offline root: fine, until a copy of the root's key turns up in
    // the data dir, or a key file is opened up to others.
    let data = tmp.path().join("data");
    let root = tmp.path().join("root");
    let (ok, out) = fleetgate(
        &["ca", "init", "--data-dir", s(&data), "--root-out", s(&root)],
        None,
    );
    assert!(ok, "{out}");
    let policy = [
        "check",
        "--data-dir",
        s(&data),
        "--keys-only",
        "--key-policy",
        "offline-root",
    ];
    let (ok, report) = fleetgate(&policy, None);
    assert!(ok, "{report}");
    let (ok, report) = fleetgate(
        &[
            "check",
            "--data-dir",
            s(&data),
            "--keys-only",
            "--key-policy",
            "hsm",
        ],
        None,
    );
    assert!(!ok, "hsm policy with file keys: {report}");
    assert!(report.contains("the issuing CA key is a file"), "{report}");
    std::fs::copy(root.join("root.key"), data.join("ca/root-backup.pem")).unwrap();
    let (ok, report) = fleetgate(&policy, None);
    assert!(!ok);
    assert!(report.contains("root-backup.pem"), "{report}");
    std::fs::remove_file(data.join("ca/root-backup.pem")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        data.join("ca/issuing.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let (ok, report) = fleetgate(&policy, None);
    assert!(!ok);
    assert!(
        report.contains("readable by others (mode 0644)"),
        "{report}"
    );
    // And the node refuses to start on it.
    let e = Server::start(&data).unwrap_err().to_string();
    assert!(e.contains("chmod 600"), "{e}");
}

/// The CRL at `url` (DER), as text with the colons of serials removed.
fn crl_text(dir: &Path, url: &str) -> String {
    let path = dir.join("fetched.crl");
    std::fs::write(&path, ureq_get(url)).expect("writing the CRL");
    run(Command::new("openssl")
        .args(["crl", "-inform", "der", "-noout", "-text", "-in"])
        .arg(&path))
    .1
    .replace(':', "")
}

fn issuer_of(cert: &Path) -> String {
    run(Command::new("openssl")
        .args(["x509", "-noout", "-issuer", "-in"])
        .arg(cert))
    .1
}

fn serial_of(cert: &Path) -> String {
    run(Command::new("openssl")
        .args(["x509", "-noout", "-serial", "-in"])
        .arg(cert))
    .1
    .trim()
    .trim_start_matches("serial=")
    .to_uppercase()
}

#[test]
fn a_fleet_runs_across_a_ca_rollover_with_no_connection_refused() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let root = tmp.path().join("root");
    let (ok, out) = fleetgate(
        &["ca", "init", "--data-dir", s(&data), "--root-out", s(&root)],
        None,
    );
    assert!(ok, "{out}");
    let server = Server::start_with(
        &data,
        &["--audit-seal-secs", "1", "--audit-settle-secs", "0"],
    )
    .unwrap();
    let devs = tmp.path().join("devs");
    let old: Vec<Creds> = (0..3)
        .map(|i| server.enroll(&devs, "device", &format!("old-{i}")))
        .collect();

    // Two devices hold a connection throughout; a third reconnects and
    // publishes (QoS 1) over and over, before, during and after.
    let mut held: Vec<tests::Reaped> = old[..2]
        .iter()
        .enumerate()
        .map(|(i, c)| {
            server
                .mosquitto("mosquitto_sub", c)
                .args(["-t", &format!("devices/old-{i}/commands/#"), "-q", "1"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map(tests::Reaped)
                .unwrap()
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let (done, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let churn = {
        let cmd = {
            let mut c = server.mosquitto("mosquitto_pub", &old[2]);
            c.args(["-t", "devices/old-2/telemetry", "-q", "1", "-m", "1"]);
            c
        };
        let program = cmd.get_program().to_owned();
        let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
        let (stop, done, failed) = (stop.clone(), done.clone(), failed.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let ok = Command::new(&program)
                    .args(&args)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                if ok { &done } else { &failed }.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let at_least = |n: usize| {
        let start = done.load(Ordering::SeqCst);
        tests::eventually(
            Duration::from_secs(30),
            "the churning device goes on",
            || (done.load(Ordering::SeqCst) >= start + n).then_some(()),
        );
    };
    at_least(3);

    // The ceremony: the node makes the key and a request, the root signs.
    let out = server.cli_ok(&["ca", "rollover", "--root-dir", s(&root)]);
    assert!(out.contains("fleetgate issuing CA 2"), "{out}");
    at_least(3);

    // New enrollments and rotations come from the new CA, and chain.
    let new = server.enroll(&devs, "device", "new-0");
    assert!(
        issuer_of(&new.cert).contains("fleetgate issuing CA 2"),
        "{}",
        issuer_of(&new.cert)
    );
    assert!(openssl_verify(&data.join("ca.crt"), &new.cert).contains("OK"));
    let st = server
        .mosquitto("mosquitto_pub", &new)
        .args(["-t", "devices/new-0/telemetry", "-m", "1"])
        .status()
        .unwrap();
    assert!(st.success(), "a device of the new CA connects");
    let rotated_dir = tmp.path().join("rotated");
    server.cli_ok(&["device", "rotate", "old-1", "--out", s(&rotated_dir)]);
    let rotated = Creds::in_dir(&rotated_dir, "old-1");
    assert!(issuer_of(&rotated.cert).contains("fleetgate issuing CA 2"));
    // Devices of the old CA go on: none refused, none cut.
    at_least(3);
    stop.store(true, Ordering::SeqCst);
    churn.join().unwrap();
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "connections refused across the rollover"
    );
    for h in &mut held {
        assert!(
            h.0.try_wait().unwrap().is_none(),
            "a held connection was cut by the rollover"
        );
    }

    // OCSP answers for both CAs' certificates.
    let ocsp = |issuer: &Path, cert: &Path| {
        run(Command::new("openssl")
            .arg("ocsp")
            .arg("-issuer")
            .arg(issuer)
            .arg("-cert")
            .arg(cert)
            .args(["-url", &server.ocsp_url(), "-CAfile"])
            .arg(data.join("ca.crt")))
        .1
    };
    let a = ocsp(&data.join("ca/issuing.crt"), &old[0].cert);
    assert!(
        a.contains("Response verify OK") && a.contains(": good"),
        "{a}"
    );
    let a = ocsp(&data.join("ca/issuing-2.crt"), &new.cert);
    assert!(
        a.contains("Response verify OK") && a.contains(": good"),
        "{a}"
    );
    let a = ocsp(&data.join("ca.crt"), &data.join("ca/issuing-2.crt"));
    assert!(
        a.contains("Response verify OK") && a.contains(": good"),
        "{a}"
    );

    // Revocation works under both, and each CA's CRL lists its own.
    server.cli_ok(&["device", "revoke", "old-0"]);
    assert!(
        exits(&mut held[0].0, Duration::from_secs(10)),
        "old-0 not cut"
    );
    server.cli_ok(&["device", "revoke", "new-0"]);
    let a = ocsp(&data.join("ca/issuing.crt"), &old[0].cert);
    assert!(a.contains(": revoked"), "{a}");
    let a = ocsp(&data.join("ca/issuing-2.crt"), &new.cert);
    assert!(a.contains(": revoked"), "{a}");
    let (old_serial, new_serial) = (serial_of(&old[0].cert), serial_of(&new.cert));
    let first = crl_text(
        tmp.path(),
        &format!("{}/crl/issuing.crl", server.ocsp_url()),
    );
    assert!(
        first.contains(&old_serial) && !first.contains(&new_serial),
        "{first}"
    );
    let second = crl_text(
        tmp.path(),
        &format!("{}/crl/issuing-2.crl", server.ocsp_url()),
    );
    assert!(
        second.contains(&new_serial) && !second.contains(&old_serial),
        "{second}"
    );
    assert!(second.contains("fleetgate issuing CA 2"), "{second}");

    // The audit log, sealed by both generations, verifies; and a restart
    // comes back with both.
    tests::eventually(Duration::from_secs(20), "the audit log sealed", || {
        let v: serde_json::Value =
            serde_json::from_str(&server.cli_ok(&["audit", "verify", "--json"])).unwrap();
        assert_eq!(v["problems"], serde_json::json!([]), "{v}");
        (v["sealed"] == v["entries"]).then_some(())
    });
    server.terminate();
    let server = Server::start(&data).unwrap();
    let st = server
        .mosquitto("mosquitto_pub", &rotated)
        .args(["-t", "devices/old-1/telemetry", "-m", "1"])
        .status()
        .unwrap();
    assert!(st.success());
    let st = server
        .mosquitto("mosquitto_pub", &old[2])
        .args(["-t", "devices/old-2/telemetry", "-m", "1"])
        .status()
        .unwrap();
    assert!(st.success());
    let out = server.cli_ok(&["audit", "verify"]);
    assert!(out.contains("0 problems"), "{out}");
}

/// The README's "Protecting the CA keys" examples, run as printed: a
/// SoftHSM2 token, `ca init` with an offline root and the issuing key in
/// the token, the check and pkcs11-tool; then, against the running node,
/// every ceremony.
#[test]
fn the_readme_key_custody_examples_work_as_printed() {
    for tool in ["softhsm2-util", "pkcs11-tool", "openssl"] {
        require_tool(tool);
    }
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("work");
    let tokens = tmp.path().join("tokens");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::create_dir_all(&tokens).unwrap();
    let conf = tmp.path().join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!("directories.tokendir = {}\n", tokens.display()),
    )
    .unwrap();
    let bin = fleetgate_bin();
    let path = format!(
        "{}:{}",
        bin.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let script = |block: &str| {
        run(Command::new("bash")
            .args(["-euo", "pipefail", "-c", block])
            .current_dir(&work)
            .env("PATH", &path)
            .env("SOFTHSM2_CONF", &conf)
            .env("FLEETGATE_LOG", "warn"))
    };
    let init = tests::readme_example("softhsm2-util --init-token --free --label fleetgate");
    let (ok, out) = script(&init);
    assert!(ok, "the README's HSM example failed:\n{out}");
    assert!(out.contains("never extractable"), "{out}");
    assert!(work.join("root-ca/root.key").exists());
    assert!(!work.join("fleetgate-data/ca/root.key").exists());
    assert!(work.join("fleetgate-data/ca/issuing.key.uri").exists());

    let data = work.join("fleetgate-data");
    let pin = work.join("token.pin");
    let server = Server::start_env(
        &[],
        &data,
        &["--pin-file", s(&pin)],
        &[("SOFTHSM2_CONF", conf.as_path())],
    )
    .unwrap();
    let ceremonies =
        tests::readme_example("# A manufacturer CA (its key is in the node's token, or with");
    let (ok, out) = run(Command::new("bash")
        .args(["-euo", "pipefail", "-c", &ceremonies])
        .current_dir(&work)
        .env("PATH", &path)
        .env("SOFTHSM2_CONF", &conf)
        .env("FLEETGATE_API", server.api_url())
        .env("FLEETGATE_LOG", "warn"));
    assert!(ok, "the README's ceremonies failed:\n{out}");
    assert!(out.contains("stays in the node's token"), "{out}");
    assert!(out.contains("1 revoked manufacturer CAs"), "{out}");
    assert!(
        out.contains("rolled over to fleetgate issuing CA 2"),
        "{out}"
    );
    assert!(out.contains("root's OCSP responder"), "{out}");
    assert!(data.join("ca/issuing-2.key.uri").exists());
    // And nothing in the data dir is a CA key after all of it.
    let mut found: Vec<String> = private_keys_under(&data)
        .iter()
        .map(|p| p.strip_prefix(&data).unwrap().display().to_string())
        .collect();
    found.sort();
    assert_eq!(found, ["admin.key", "server.key"]);
}

/// Two nodes on one etcd open one token (a network HSM's stand-in: one
/// SoftHSM2 token directory): each signs through it, neither's data dir
/// holds a CA key, and a rollover made on one reaches the other with the
/// certificate and the key's URI copied over and a SIGHUP.
#[test]
fn two_nodes_share_one_token_and_neither_holds_a_ca_key() {
    let tmp = tempfile::tempdir().unwrap();
    let token = Token::new(tmp.path(), "cluster");
    let etcd = tests::etcd::Etcd::start(&tmp.path().join("etcd"));
    let store = etcd.url();
    let one_dir = tmp.path().join("node-1");
    let root = tmp.path().join("root");
    let (ok, out) = fleetgate(
        &[
            "ca",
            "init",
            "--data-dir",
            s(&one_dir),
            "--root-out",
            s(&root),
            "--ca-key-uri",
            &token.uri("issuing-ca"),
            "--pin-file",
            s(&token.pin_file),
            "--store",
            &store,
        ],
        Some(&token),
    );
    assert!(ok, "{out}");
    let two_dir = tmp.path().join("node-2");
    tests::copy_data_dir(&one_dir, &two_dir);
    let envs = [("SOFTHSM2_CONF", token.conf.as_path())];
    let args = ["--pin-file", s(&token.pin_file), "--store", &store];
    let one = Server::start_env(&[], &one_dir, &args, &envs).unwrap();
    let two = Server::start_env(&[], &two_dir, &args, &envs).unwrap();

    // Enrolled through node two (signed in the token), admitted and
    // answered for by node one.
    let devs = tmp.path().join("devs");
    let dev = two.enroll(&devs, "device", "dev-1");
    assert!(openssl_verify(&one_dir.join("ca.crt"), &dev.cert).contains("OK"));
    let st = one
        .mosquitto("mosquitto_pub", &dev)
        .args(["-t", "devices/dev-1/telemetry", "-m", "1"])
        .status()
        .unwrap();
    assert!(st.success());
    for node in [&one, &two] {
        let a = node.openssl_ocsp(&dev.cert);
        assert!(
            a.contains("Response verify OK") && a.contains(": good"),
            "{a}"
        );
    }
    for dir in [&one_dir, &two_dir] {
        let mut found: Vec<String> = private_keys_under(dir)
            .iter()
            .map(|p| p.strip_prefix(dir).unwrap().display().to_string())
            .collect();
        found.sort();
        assert_eq!(found, ["admin.key", "server.key"], "in {}", dir.display());
    }

    // A rollover on node one; node two takes it with two small files.
    one.cli_ok(&["ca", "rollover", "--root-dir", s(&root)]);
    for f in ["ca/issuing-2.crt", "ca/issuing-2.key.uri"] {
        std::fs::copy(one_dir.join(f), two_dir.join(f)).unwrap();
    }
    let (ok, out) = run(Command::new("kill").args(["-HUP", &two.pid().to_string()]));
    assert!(ok, "{out}");
    assert!(two.wait_for_log("SIGHUP", Duration::from_secs(10)));
    let mut n = 0;
    let next = tests::eventually(
        Duration::from_secs(10),
        "node two issues from the new CA",
        || {
            n += 1;
            let c = two.enroll(&tmp.path().join("next"), "device", &format!("dev-n{n}"));
            issuer_of(&c.cert)
                .contains("fleetgate issuing CA 2")
                .then_some(c)
        },
    );
    for node in [&one, &two] {
        let st = node
            .mosquitto("mosquitto_pub", &next)
            .args(["-t", &format!("devices/{}/telemetry", next.id), "-m", "1"])
            .status()
            .unwrap();
        assert!(st.success());
    }
}

/// The root itself in a token at its ceremonies (`--root-key-uri`): the
/// root dir holds only its URI, and a ceremony opens it with its PIN.
#[test]
fn the_root_can_live_in_a_token_of_its_own() {
    let tmp = tempfile::tempdir().unwrap();
    let token = Token::new(tmp.path(), "root-token");
    let data = tmp.path().join("data");
    let root = tmp.path().join("root");
    let (ok, out) = fleetgate(
        &[
            "ca",
            "init",
            "--data-dir",
            s(&data),
            "--root-out",
            s(&root),
            "--root-key-uri",
            &token.uri("root-ca"),
            "--root-pin-file",
            s(&token.pin_file),
        ],
        Some(&token),
    );
    assert!(ok, "{out}");
    assert!(root.join("root.key.uri").exists());
    assert!(private_keys_under(&root).is_empty());
    let (ok, objects) = token.pkcs11_tool(&["--list-objects", "--type", "privkey"]);
    assert!(ok && objects.contains("label:      root-ca"), "{objects}");
    // The node's keys are files here (no --ca-key-uri), the root is not.
    let server = Server::start(&data).unwrap();
    let ceremony = |args: &[&str]| {
        let mut c = Command::new(fleetgate_bin());
        c.args(args)
            .env("SOFTHSM2_CONF", &token.conf)
            .env("FLEETGATE_API", server.api_url())
            .env("FLEETGATE_DATA_DIR", &data)
            .env("FLEETGATE_LOG", "warn");
        run(&mut c)
    };
    // Without the PIN the ceremony says what it needs.
    let (ok, out) = ceremony(&["ca", "rollover", "--root-dir", s(&root)]);
    assert!(!ok && out.contains("--pin-file"), "{out}");
    let (ok, out) = ceremony(&[
        "ca",
        "rollover",
        "--root-dir",
        s(&root),
        "--pin-file",
        s(&token.pin_file),
    ]);
    assert!(ok, "{out}");
    let dev = server.enroll(&tmp.path().join("devs"), "device", "dev-1");
    assert!(issuer_of(&dev.cert).contains("fleetgate issuing CA 2"));
    assert!(openssl_verify(&data.join("ca.crt"), &dev.cert).contains("OK"));
}
