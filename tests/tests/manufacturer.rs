//! Manufacturers end to end: manufacturer CAs signing devices offline (rcgen
//! and `openssl x509 -req`), just-in-time registration, proof of possession,
//! batch enrollment, claims over MQTT and manufacturer revocation.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use rumqttc::{Event, Packet, QoS};
use serde_json::{json, Value};
use tests::mqtt::{client, connected, until_closed};
use tests::pki::{self, Spec, TestCa};
use tests::{require_tool, run, Creds, Server};

fn start() -> (tempfile::TempDir, Server) {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data")).unwrap();
    (tmp, server)
}

fn audit_actions(server: &Server) -> Vec<(String, String, String)> {
    // Newest first: turned round, oldest first.
    let out = server.cli_ok(&["audit", "--json", "--limit", "1000"]);
    let page: Value = serde_json::from_str(&out).unwrap();
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .map(|e| {
            (
                e["actor"].as_str().unwrap_or("").to_owned(),
                e["action"].as_str().unwrap_or("").to_owned(),
                e["device"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

fn ocsp(server: &Server, issuer: &Path, cert: &Path, extra: &[&str]) -> String {
    let (_, out) = run(Command::new("openssl")
        .args(["ocsp", "-issuer"])
        .arg(issuer)
        .arg("-cert")
        .arg(cert)
        .args(["-url", &server.ocsp_url(), "-CAfile"])
        .arg(server.data_dir.join("ca.crt"))
        .args(extra));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manufacturer_devices_register_just_in_time_and_fall_with_their_manufacturer() {
    let (tmp, server) = start();
    let dir = tmp.path();
    let out = server.cli_ok(&[
        "manufacturer",
        "create",
        "acme",
        "--out",
        dir.join("acme").to_str().unwrap(),
    ]);
    assert!(out.contains("manufacturer acme"), "{out}");
    let (ca_crt, ca_key) = (dir.join("acme/acme.crt"), dir.join("acme/acme.key"));
    assert_eq!(
        std::fs::metadata(&ca_key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // An intermediate under the root: pathLen 0, client certificates only,
    // no DNS name or IP address may ever chain to it.
    let (ok, text) = run(Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(&ca_crt));
    assert!(ok, "{text}");
    assert!(text.contains("CA:TRUE, pathlen:0"), "{text}");
    assert!(text.contains("Name Constraints: critical"), "{text}");
    assert!(text.contains("TLS Web Client Authentication"), "{text}");
    let (ok, text) = run(Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(server.data_dir.join("ca.crt"))
        .arg(&ca_crt));
    assert!(ok, "{text}");

    // Signed offline, as at the factory: with rcgen (URI identity) ...
    let acme = TestCa::from_pem(
        &std::fs::read_to_string(&ca_crt).unwrap(),
        &std::fs::read_to_string(&ca_key).unwrap(),
    );
    let (chain, key) = acme.issue(&Spec::device("rc-1"));
    let rc1 = server.creds(&dir.join("rc-1"), "rc-1", &chain, &key);
    // ... and with openssl x509 -req (CN identity).
    let sensor = tests::openssl_device(&dir.join("sensor"), &server, &ca_crt, &ca_key, "sensor-7");
    let (ok, text) = run(Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(server.data_dir.join("ca.crt"))
        .arg("-untrusted")
        .arg(&ca_crt)
        .arg(dir.join("sensor/sensor-7.leaf")));
    assert!(ok, "{text}");
    // Neither is in the registry yet.
    assert!(!server.cli(&["device", "show", "rc-1"]).status.success());

    let mut ev_rc1 = tests::mqtt::online(server.mqtt, &rc1).await;
    let mut ev_sensor = tests::mqtt::online(server.mqtt, &sensor).await;
    // mosquitto_pub with the openssl-made certificate, too.
    require_tool("mosquitto_pub");
    let (ok, text) = run(Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &server.mqtt.port().to_string()])
        .arg("--cafile")
        .arg(&sensor.ca)
        .arg("--cert")
        .arg(&sensor.cert)
        .arg("--key")
        .arg(&sensor.key)
        .args(["-t", "devices/sensor-7/telemetry", "-m", "21.5"]));
    assert!(ok, "mosquitto_pub: {text}");

    for id in ["rc-1", "sensor-7"] {
        let d = server.device_json(id);
        assert_eq!(d["status"], "active", "{d}");
        assert_eq!(d["manufacturer"], "acme", "{d}");
        assert!(
            d["certificates"][0]["issuer"]
                .as_str()
                .unwrap()
                .contains("acme manufacturer CA"),
            "{d}"
        );
    }
    let audit = audit_actions(&server);
    for id in ["rc-1", "sensor-7"] {
        assert!(
            audit.contains(&("manufacturer:acme".into(), "jit-register".into(), id.into())),
            "{audit:?}"
        );
    }
    // Registered once: the second connect of the same certificate is a
    // plain admission.
    assert_eq!(
        audit
            .iter()
            .filter(|(_, a, d)| a == "jit-register" && d == "sensor-7")
            .count(),
        1
    );

    // A new device connecting twice at once registers once; both pass the
    // handshake. One may then lose the takeover race in rumqttd's router
    // before its CONNACK (it is closed, as taken over); neither is refused.
    let (chain, key) = acme.issue(&Spec::device("twin"));
    let root = std::fs::read(server.data_dir.join("ca.crt")).unwrap();
    let config = pki::client_config(&root, Some((&chain, &key)));
    // CONNECT, then DISCONNECT so that each ends by itself.
    let mut connect = tests::mqtt::connect_packet("twin");
    connect.extend_from_slice(&[0xe0, 0x00]);
    let (a, b) = tokio::join!(
        tests::mqtt::probe(server.mqtt, config.clone(), &connect),
        tests::mqtt::probe(server.mqtt, config.clone(), &connect)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let admitted = [&a, &b]
        .iter()
        .filter(|r| r.starts_with(&[0x20, 0x02, 0x00, 0x00]))
        .count();
    for r in [&a, &b] {
        assert!(
            r.starts_with(&[0x20, 0x02, 0x00, 0x00]) || r.is_empty(),
            "refused: {r:?}"
        );
    }
    assert!(admitted >= 1, "{a:?} {b:?}");
    assert!(!server
        .log()
        .iter()
        .any(|l| l.contains("twin") && (l.contains("refused") || l.contains("router refused"))));
    assert_eq!(
        audit_actions(&server)
            .iter()
            .filter(|(_, a, d)| a == "jit-register" && d == "twin")
            .count(),
        1
    );

    // A manufacturer may only vouch for devices, and not for one fleetgate
    // already knows under another certificate.
    let mut svc = Spec::device("x");
    svc.uri = "urn:fleetgate:service:backend".into();
    let (chain, key) = acme.issue(&svc);
    assert!(
        tests::mqtt::refused(
            server.mqtt,
            &server.creds(&dir.join("svc"), "backend", &chain, &key)
        )
        .await
    );
    let _dev1 = server.enroll(&dir.join("own"), "device", "dev-1");
    let (chain, key) = acme.issue(&Spec::device("dev-1"));
    assert!(
        tests::mqtt::refused(
            server.mqtt,
            &server.creds(&dir.join("fake"), "dev-1", &chain, &key)
        )
        .await
    );
    assert!(server.wait_for_log(
        "already registered with another certificate",
        Duration::from_secs(5)
    ));

    // OCSP answers for the manufacturer CA's certificates, signed by it.
    let text = ocsp(&server, &ca_crt, &dir.join("sensor/sensor-7.leaf"), &[]);
    assert!(
        text.contains("Response verify OK") && text.contains(": good"),
        "{text}"
    );

    // Revoking the manufacturer cuts both live devices within a second.
    let own = server.enroll(&dir.join("own2"), "device", "dev-2");
    let mut ev_own = tests::mqtt::online(server.mqtt, &own).await;
    let t0 = Instant::now();
    server.cli_ok(&["manufacturer", "revoke", "acme"]);
    let (a, b) = tokio::join!(
        until_closed(&mut ev_rc1, Duration::from_secs(1)),
        until_closed(&mut ev_sensor, Duration::from_secs(1))
    );
    assert!(a.is_some() && b.is_some(), "still connected: {a:?} {b:?}");
    let took = t0.elapsed();
    eprintln!("manufacturer revoke (CLI call included) to both devices cut: {took:?}");
    assert!(took < Duration::from_millis(1500), "{took:?}");
    // A device of fleetgate's own issuing CA is not touched.
    assert!(until_closed(&mut ev_own, Duration::from_millis(300))
        .await
        .is_none());

    // Refused from now on, with the reason logged.
    assert!(tests::mqtt::refused(server.mqtt, &rc1).await);
    assert!(tests::mqtt::refused(server.mqtt, &sensor).await);
    assert!(server.wait_for_log("manufacturer acme is revoked", Duration::from_secs(5)));
    // The CLI says so where the device's own status does not.
    let shown = server.cli_ok(&["device", "show", "sensor-7"]);
    assert!(
        shown.contains("acme (revoked: this device is refused at connect)")
            && shown.contains("queued:       0 commands"),
        "{shown}"
    );
    let listed = server.cli_ok(&["device", "list", "--status", "active"]);
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("sensor-7")
                && l.ends_with("acme (revoked: its devices are refused)")),
        "{listed}"
    );
    // OCSP: the device is revoked (cACompromise), and so is the CA itself
    // on the root's responder; the root's CRL lists the CA.
    let text = ocsp(&server, &ca_crt, &dir.join("sensor/sensor-7.leaf"), &[]);
    assert!(text.contains("Response verify OK"), "{text}");
    assert!(
        text.contains(": revoked") && text.contains("cACompromise"),
        "{text}"
    );
    let text = ocsp(&server, &server.data_dir.join("ca.crt"), &ca_crt, &[]);
    assert!(
        text.contains("Response verify OK") && text.contains(": revoked"),
        "{text}"
    );
    let crl = dir.join("root.crl");
    let (ok, text) = run(Command::new("curl")
        .args(["-sf", "-o"])
        .arg(&crl)
        .arg(format!("{}/crl/root.crl", server.ocsp_url())));
    assert!(ok, "{text}");
    let (ok, text) = run(Command::new("openssl")
        .args(["crl", "-inform", "DER", "-noout", "-text", "-in"])
        .arg(&crl)
        .arg("-CAfile")
        .arg(server.data_dir.join("ca.crt")));
    assert!(ok && text.contains("verify OK"), "{text}");
    let serial = text_serial(&ca_crt);
    assert!(
        text.to_uppercase().contains(&serial),
        "{serial} not in {text}"
    );
    // No new devices under a revoked manufacturer.
    let (_k, csr) = pki::csr("x");
    let err = server
        .admin()
        .post::<_, Value>(
            "/v1/devices",
            &json!({"id": "late", "csr": csr, "manufacturer": "acme"}),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("manufacturer_revoked"), "{err}");
}

/// The serial of a PEM certificate as openssl prints it (upper-case hex).
fn text_serial(cert: &Path) -> String {
    let (ok, text) = run(Command::new("openssl")
        .args(["x509", "-noout", "-serial", "-in"])
        .arg(cert));
    assert!(ok, "{text}");
    text.trim().trim_start_matches("serial=").to_uppercase()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_policy_waits_for_an_operator() {
    let (tmp, server) = start();
    let dir = tmp.path();
    server.cli_ok(&[
        "manufacturer",
        "create",
        "slowco",
        "--policy",
        "pending",
        "--out",
        dir.to_str().unwrap(),
    ]);
    let ca = TestCa::from_pem(
        &std::fs::read_to_string(dir.join("slowco.crt")).unwrap(),
        &std::fs::read_to_string(dir.join("slowco.key")).unwrap(),
    );
    let (chain, key) = ca.issue(&Spec::device("p-1"));
    let p1 = server.creds(&dir.join("p"), "p-1", &chain, &key);
    assert!(tests::mqtt::refused(server.mqtt, &p1).await);
    assert_eq!(server.device_json("p-1")["status"], "pending");
    assert!(server.wait_for_log("pending an operator's approval", Duration::from_secs(5)));
    // Still pending on the second try: registered once.
    assert!(tests::mqtt::refused(server.mqtt, &p1).await);
    let out = server.cli_ok(&["device", "list", "--status", "pending"]);
    assert!(out.contains("p-1"), "{out}");
    server.cli_ok(&["device", "approve", "p-1"]);
    let _ev = tests::mqtt::online(server.mqtt, &p1).await;
    let actions: Vec<String> = audit_actions(&server)
        .into_iter()
        .filter(|(_, _, d)| d == "p-1")
        .map(|(_, a, _)| a)
        .collect();
    assert_eq!(actions, ["jit-register", "approve"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registering_a_manufacturer_ca_needs_proof_of_possession() {
    let (tmp, server) = start();
    let dir = tmp.path();
    let theirs = TestCa::foreign();
    let ca_file = dir.join("theirs.crt");
    std::fs::write(&ca_file, &theirs.cert_pem).unwrap();
    let register = |verification: Option<&Path>| {
        let mut args = vec![
            "manufacturer".to_owned(),
            "register".into(),
            "globex".into(),
            "--ca-cert".into(),
            ca_file.to_str().unwrap().into(),
        ];
        if let Some(v) = verification {
            args.push("--verification-cert".into());
            args.push(v.to_str().unwrap().into());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = server.cli(&args);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let challenge = || {
        server
            .cli_ok(&["manufacturer", "challenge", "globex"])
            .trim()
            .to_owned()
    };

    // No proof at all.
    let (ok, err) = register(None);
    assert!(!ok && err.contains("proof_of_possession_failed"), "{err}");
    // Signed by another key (a CA that is not theirs), right CN.
    let code = challenge();
    let forged = dir.join("forged.crt");
    std::fs::write(&forged, TestCa::foreign().sign_cn(&code)).unwrap();
    let (ok, err) = register(Some(&forged));
    assert!(!ok && err.contains("not signed by the CA's key"), "{err}");
    // The challenge was spent by that try: the right proof for it fails too.
    let stale = dir.join("stale.crt");
    std::fs::write(&stale, theirs.sign_cn(&code)).unwrap();
    let (ok, err) = register(Some(&stale));
    assert!(!ok && err.contains("no challenge outstanding"), "{err}");
    // Their key, wrong CN.
    challenge();
    let wrong = dir.join("wrong.crt");
    std::fs::write(&wrong, theirs.sign_cn("not-the-challenge")).unwrap();
    let (ok, err) = register(Some(&wrong));
    assert!(!ok && err.contains("not the challenge"), "{err}");
    // Garbage as the CA certificate.
    std::fs::write(
        dir.join("garbage.crt"),
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let out = server.cli(&[
        "manufacturer",
        "register",
        "globex",
        "--ca-cert",
        dir.join("garbage.crt").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid_input"));
    // A device of theirs is unknown before registration.
    let (chain, key) = theirs.issue(&Spec::device("g-1"));
    let g1 = server.creds(&dir.join("g"), "g-1", &chain, &key);
    assert!(tests::mqtt::refused(server.mqtt, &g1).await);

    // The real proof.
    let code = challenge();
    let proof = dir.join("proof.crt");
    std::fs::write(&proof, theirs.sign_cn(&code)).unwrap();
    let (ok, err) = register(Some(&proof));
    assert!(ok, "{err}");
    let (ok, err) = register(Some(&proof));
    assert!(!ok && err.contains("already_exists"), "{err}");

    let _ev = tests::mqtt::online(server.mqtt, &g1).await;
    assert_eq!(server.device_json("g-1")["manufacturer"], "globex");
    // OCSP for their devices comes from fleetgate's delegated responder,
    // which a relying party trusts explicitly.
    let leaf = dir.join("g/leaf.crt");
    std::fs::write(
        &leaf,
        chain
            .split_inclusive("-----END CERTIFICATE-----\n")
            .next()
            .unwrap(),
    )
    .unwrap();
    let text = ocsp(
        &server,
        &ca_file,
        &leaf,
        &[
            "-VAfile",
            server.data_dir.join("ocsp/signer.crt").to_str().unwrap(),
        ],
    );
    assert!(
        text.contains("Response verify OK") && text.contains(": good"),
        "{text}"
    );
}

#[test]
fn batch_enrollment_signs_a_directory_and_names_the_bad_entries() {
    let (tmp, server) = start();
    let dir = tmp.path();
    server.cli_ok(&[
        "manufacturer",
        "create",
        "acme",
        "--out",
        dir.join("acme").to_str().unwrap(),
    ]);
    let csrs = dir.join("csrs");
    std::fs::create_dir_all(&csrs).unwrap();
    let mut keys = Vec::new();
    for i in 0..40 {
        let id = format!("batch-{i:03}");
        let (key, csr) = pki::csr(&id);
        std::fs::write(csrs.join(format!("{id}.csr")), csr).unwrap();
        keys.push((id, key));
    }
    std::fs::write(
        csrs.join("broken.csr"),
        "-----BEGIN CERTIFICATE REQUEST-----\nnot base64\n",
    )
    .unwrap();
    std::fs::write(csrs.join("forged.csr"), pki::csr_signed_by_another_key()).unwrap();
    let (_k, csr) = pki::csr("x");
    std::fs::write(csrs.join("bad id.csr"), csr).unwrap();
    let _taken = server.enroll(&dir.join("own"), "device", "taken");
    let (_k, csr) = pki::csr("x");
    std::fs::write(csrs.join("taken.csr"), csr).unwrap();

    let outdir = dir.join("issued");
    let out = server.cli(&[
        "device",
        "enroll-batch",
        "--manufacturer",
        "acme",
        "--csr-dir",
        csrs.to_str().unwrap(),
        "--out",
        outdir.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "partial failure must not exit 0");
    assert!(stdout.contains("issued 40, failed 4"), "{stdout}\n{stderr}");
    for (name, code) in [
        ("broken.csr", "malformed_csr"),
        ("forged.csr", "csr_bad_signature"),
        ("bad id.csr", "invalid_id"),
        ("taken.csr", "already_exists"),
    ] {
        assert!(
            stderr.lines().any(|l| l.contains(name) && l.contains(code)),
            "{name}/{code} not reported: {stderr}"
        );
    }
    // Every good one has a certificate from the manufacturer CA, which
    // openssl verifies up to the root.
    for (id, _) in &keys {
        let crt = outdir.join(format!("{id}.crt"));
        let (ok, text) = run(Command::new("openssl")
            .args(["verify", "-CAfile"])
            .arg(server.data_dir.join("ca.crt"))
            .arg("-untrusted")
            .arg(dir.join("acme/acme.crt"))
            .arg(&crt));
        assert!(ok, "{id}: {text}");
    }
    assert!(!outdir.join("broken.crt").exists());
    let d = server.device_json("batch-007");
    assert_eq!(d["manufacturer"], "acme");
    assert_eq!(d["status"], "active");
}

/// Reads publishes until one arrives on a topic ending in `suffix`.
async fn reply(ev: &mut rumqttc::EventLoop, suffix: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, ev.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                assert!(
                    p.topic.ends_with(suffix),
                    "{} instead of {suffix}: {:?}",
                    p.topic,
                    String::from_utf8_lossy(&p.payload)
                );
                return serde_json::from_slice(&p.payload).unwrap();
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("connection ended: {e}"),
            Err(_) => panic!("no reply on {suffix}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_provisions_a_device_over_mqtt_and_nothing_else() {
    let (tmp, server) = start();
    let dir = tmp.path();
    let out = server.cli_ok(&[
        "claim",
        "create",
        "factory-7",
        "--uses",
        "1",
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert!(out.contains("1 uses"), "{out}");
    let claim = Creds::in_dir(dir, "factory-7");

    // Any client id: many devices share one claim.
    let (c, mut ev) = client(server.mqtt, &claim, "unit-0042");
    connected(&mut ev).await;
    c.subscribe("$fleetgate/provision/+/+", QoS::AtLeastOnce)
        .await
        .unwrap();
    // A broken CSR is rejected with its reason and spends nothing.
    c.publish(
        "$fleetgate/provision/new-1",
        QoS::AtLeastOnce,
        false,
        json!({"csr": "junk"}).to_string(),
    )
    .await
    .unwrap();
    let r = reply(&mut ev, "/rejected").await;
    assert_eq!(r["code"], "malformed_csr", "{r}");
    // A good one: a certificate for the device's own key.
    let (key, csr) = pki::csr("new-1");
    c.publish(
        "$fleetgate/provision/new-1",
        QoS::AtLeastOnce,
        false,
        json!({"csr": csr}).to_string(),
    )
    .await
    .unwrap();
    let r = reply(&mut ev, "new-1/accepted").await;
    assert_eq!(r["id"], "new-1", "{r}");
    let new1 = server.creds(
        &dir.join("new"),
        "new-1",
        r["certificate_pem"].as_str().unwrap(),
        &key.serialize_pem(),
    );
    // The claim is used up.
    let (_key, csr) = pki::csr("new-2");
    c.publish("$fleetgate/provision/new-2", QoS::AtLeastOnce, false, csr)
        .await
        .unwrap();
    let r = reply(&mut ev, "new-2/rejected").await;
    assert_eq!(r["code"], "claim_exhausted", "{r}");

    // The new device connects as itself.
    let _dev = tests::mqtt::online(server.mqtt, &new1).await;
    let d = server.device_json("new-1");
    assert_eq!(d["status"], "active");
    assert!(audit_actions(&server).contains(&(
        "claim:factory-7 (mqtt)".into(),
        "claim-provision".into(),
        "new-1".into()
    )));

    // A claim publishing anywhere else is cut.
    c.publish("devices/new-1/telemetry", QoS::AtMostOnce, false, "x")
        .await
        .unwrap();
    assert!(until_closed(&mut ev, Duration::from_secs(5))
        .await
        .is_some());
    assert!(server.wait_for_log("a claim may only publish", Duration::from_secs(5)));

    // Revoked like any certificate: a live claim session is cut at once.
    let (_c2, mut ev2) = client(server.mqtt, &claim, "unit-0043");
    connected(&mut ev2).await;
    server.cli_ok(&[
        "device",
        "revoke",
        "factory-7",
        "--reason",
        "key-compromise",
    ]);
    assert!(until_closed(&mut ev2, Duration::from_secs(1))
        .await
        .is_some());
    assert!(tests::mqtt::refused(server.mqtt, &claim).await);
}
