//! Status answers end to end: stock `openssl ocsp` and `openssl crl` against
//! the real responder, bad input over HTTP, and OCSP over MQTT.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use provisioning::ocsp::{build_request, read_response};
use provisioning::Serial;
use rumqttc::{Event, Packet, QoS};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tests::mqtt::{client, connected};
use tests::{require_tool, run, Creds, Server};

fn start() -> (tempfile::TempDir, Server) {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data")).unwrap();
    (tmp, server)
}

fn issuing(server: &Server) -> PathBuf {
    server.data_dir.join("ca/issuing.crt")
}

/// `openssl ocsp` for `certs`, as a relying party runs it: stdout + stderr.
fn openssl_ocsp(server: &Server, certs: &[&Path], extra: &[&str]) -> String {
    require_tool("openssl");
    let mut cmd = Command::new("openssl");
    cmd.arg("ocsp").arg("-issuer").arg(issuing(server));
    for c in certs {
        cmd.arg("-cert").arg(c);
    }
    cmd.args(["-url", &server.ocsp_url(), "-CAfile"])
        .arg(server.data_dir.join("ca.crt"))
        .args(extra);
    let (ok, text) = run(&mut cmd);
    assert!(ok, "openssl ocsp failed: {text}");
    text
}

fn serial_of(creds: &Creds) -> Serial {
    let der = CertificateDer::from_pem_file(&creds.cert).unwrap();
    provisioning::ca::inspect_certificate(&der).unwrap().serial
}

#[test]
fn openssl_ocsp_verifies_good_revoked_and_on_hold_with_nonce() {
    let (tmp, server) = start();
    let a = server.enroll(tmp.path(), "device", "dev-a");
    let b = server.enroll(tmp.path(), "device", "dev-b");

    // Issued certificates point at the responder and the CRL.
    let (ok, text) = run(Command::new("openssl")
        .args([
            "x509",
            "-noout",
            "-ext",
            "authorityInfoAccess,crlDistributionPoints",
            "-in",
        ])
        .arg(&a.cert));
    assert!(ok, "{text}");
    assert!(
        text.contains(&format!("OCSP - URI:{}", server.ocsp_url())),
        "{text}"
    );
    assert!(
        text.contains(&format!("URI:{}/crl/issuing.crl", server.ocsp_url())),
        "{text}"
    );

    let out = openssl_ocsp(&server, &[&a.cert], &[]);
    assert!(out.contains("Response verify OK"), "{out}");
    assert!(
        out.contains(&format!("{}: good", a.cert.display())),
        "{out}"
    );
    // openssl sends a nonce by default and warns when it is not echoed.
    assert!(!out.contains("WARNING") && !out.contains("nonce"), "{out}");

    server.cli_ok(&["device", "revoke", "dev-b", "--reason", "key-compromise"]);
    server.cli_ok(&["device", "suspend", "dev-a"]);
    let out = openssl_ocsp(&server, &[&a.cert, &b.cert], &[]);
    assert!(out.contains("Response verify OK"), "{out}");
    assert!(
        out.contains(&format!("{}: revoked", b.cert.display())),
        "{out}"
    );
    assert!(out.contains("Reason: keyCompromise"), "{out}");
    assert!(
        out.contains(&format!("{}: revoked", a.cert.display())),
        "{out}"
    );
    assert!(out.contains("Reason: certificateHold"), "{out}");

    server.cli_ok(&["device", "resume", "dev-a"]);
    let out = openssl_ocsp(&server, &[&a.cert], &[]);
    assert!(
        out.contains(&format!("{}: good", a.cert.display())),
        "{out}"
    );
}

#[test]
fn cached_answers_change_the_moment_a_device_is_revoked() {
    let (tmp, server) = start();
    let a = server.enroll(tmp.path(), "device", "dev-a");
    for _ in 0..3 {
        let out = openssl_ocsp(&server, &[&a.cert], &["-no_nonce"]);
        assert!(
            out.contains(": good") && out.contains("Response verify OK"),
            "{out}"
        );
    }
    server.cli_ok(&["device", "revoke", "dev-a", "--reason", "superseded"]);
    let out = openssl_ocsp(&server, &[&a.cert], &["-no_nonce"]);
    assert!(
        out.contains(": revoked") && out.contains("Reason: superseded"),
        "{out}"
    );

    // The RFC 5019 GET form, fetched with curl, verified with openssl.
    require_tool("curl");
    let req = tmp.path().join("req.der");
    let (ok, text) = run(Command::new("openssl")
        .args(["ocsp", "-no_nonce", "-issuer"])
        .arg(issuing(&server))
        .arg("-cert")
        .arg(&a.cert)
        .arg("-reqout")
        .arg(&req));
    assert!(ok, "{text}");
    let b64 = pem::encode(&pem::Pem::new("X", std::fs::read(&req).unwrap()))
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<String>();
    let url = format!(
        "{}/{}",
        server.ocsp_url(),
        b64.replace('+', "%2B")
            .replace('/', "%2F")
            .replace('=', "%3D")
    );
    let resp = tmp.path().join("resp.der");
    let (ok, headers) = run(Command::new("curl")
        .args(["-sS", "-D", "-", "-o"])
        .arg(&resp)
        .arg(&url));
    assert!(ok, "{headers}");
    assert!(headers.contains("application/ocsp-response"), "{headers}");
    assert!(
        headers.to_lowercase().contains("cache-control: max-age"),
        "{headers}"
    );
    let (ok, text) = run(Command::new("openssl")
        .args(["ocsp", "-respin"])
        .arg(&resp)
        .arg("-issuer")
        .arg(issuing(&server))
        .arg("-cert")
        .arg(&a.cert)
        .arg("-CAfile")
        .arg(server.data_dir.join("ca.crt")));
    assert!(
        ok && text.contains("Response verify OK") && text.contains(": revoked"),
        "{text}"
    );
}

#[test]
fn the_crl_verifies_and_lists_revoked_and_held_certificates() {
    let (tmp, server) = start();
    let a = server.enroll(tmp.path(), "device", "dev-a");
    let b = server.enroll(tmp.path(), "device", "dev-b");
    let c = server.enroll(tmp.path(), "device", "dev-c");
    server.cli_ok(&["device", "revoke", "dev-b", "--reason", "key-compromise"]);
    server.cli_ok(&["device", "suspend", "dev-c"]);

    require_tool("curl");
    let chain = tmp.path().join("chain.pem");
    let mut both = std::fs::read(server.data_dir.join("ca.crt")).unwrap();
    both.extend(std::fs::read(issuing(&server)).unwrap());
    std::fs::write(&chain, both).unwrap();
    let fetch = |name: &str| {
        let path = tmp.path().join(name);
        let (ok, text) = run(Command::new("curl")
            .args(["-sS", "-f", "-o"])
            .arg(&path)
            .arg(format!("{}/crl/issuing.crl", server.ocsp_url())));
        assert!(ok, "{text}");
        let (ok, text) = run(Command::new("openssl")
            .args(["crl", "-inform", "DER", "-noout", "-text", "-in"])
            .arg(&path)
            .arg("-CAfile")
            .arg(&chain));
        assert!(ok, "{text}");
        text
    };
    let text = fetch("1.crl");
    assert!(text.contains("verify OK"), "{text}");
    let hex = |c: &Creds| serial_of(c).to_hex().to_uppercase();
    assert!(text.contains(&hex(&b)), "{text}");
    assert!(text.contains("Key Compromise"), "{text}");
    assert!(text.contains(&hex(&c)), "{text}");
    assert!(text.contains("Certificate Hold"), "{text}");
    assert!(!text.contains(&hex(&a)), "{text}");
    let number = |t: &str| {
        t.lines()
            .skip_while(|l| !l.contains("CRL Number"))
            .nth(1)
            .unwrap()
            .trim()
            .to_owned()
    };
    let first = number(&text);

    // Re-signed after the next change, with a higher number.
    server.cli_ok(&["device", "resume", "dev-c"]);
    let text = fetch("2.crl");
    assert!(!text.contains(&hex(&c)), "{text}");
    assert!(number(&text).parse::<u64>().unwrap() > first.parse::<u64>().unwrap());
}

/// Delta CRLs (RFC 5280 §5.2.4): the complete CRL names its delta
/// (Freshest CRL), and the delta lists what changed since its base, a
/// revocation and a release from hold (removeFromCRL). `openssl verify
/// -use_deltas` with the base and the delta judges as the registry does
/// now; with the base alone, as it did then.
#[test]
fn a_delta_crl_brings_a_base_up_to_date_for_openssl() {
    let (tmp, server) = start();
    require_tool("curl");
    let a = server.enroll(tmp.path(), "device", "dev-a");
    let b = server.enroll(tmp.path(), "device", "dev-b");
    let c = server.enroll(tmp.path(), "device", "dev-c");
    let d = server.enroll(tmp.path(), "device", "dev-d");
    server.cli_ok(&["device", "revoke", "dev-b", "--reason", "key-compromise"]);
    server.cli_ok(&["device", "suspend", "dev-c"]);
    let fetch = |name: &str, file: &str| -> (std::path::PathBuf, String) {
        let path = tmp.path().join(file);
        let (ok, text) = run(Command::new("curl")
            .args(["-sS", "-f", "-o"])
            .arg(&path)
            .arg(format!("{}/crl/{name}", server.ocsp_url())));
        assert!(ok, "{text}");
        let (ok, text) = run(Command::new("openssl")
            .args(["crl", "-inform", "DER", "-noout", "-text", "-in"])
            .arg(&path));
        assert!(ok, "{text}");
        (path, text)
    };
    let (base, text) = fetch("issuing.crl", "base.crl");
    assert!(text.contains("X509v3 Freshest CRL"), "{text}");
    assert!(
        text.contains(&format!("URI:{}/crl/issuing-delta.crl", server.ocsp_url())),
        "{text}"
    );
    let number = |t: &str, label: &str| -> u64 {
        t.lines()
            .skip_while(|l| !l.contains(label))
            .nth(1)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let base_number = number(&text, "CRL Number");

    // After the base: d revoked, c resumed.
    server.cli_ok(&["device", "revoke", "dev-d", "--reason", "superseded"]);
    server.cli_ok(&["device", "resume", "dev-c"]);
    let (delta, text) = fetch("issuing-delta.crl", "delta.crl");
    assert!(
        text.contains("X509v3 Delta CRL Indicator: critical"),
        "{text}"
    );
    assert_eq!(number(&text, "Delta CRL Indicator"), base_number, "{text}");
    assert!(number(&text, "CRL Number") > base_number, "{text}");
    let hex = |c: &Creds| serial_of(c).to_hex().to_uppercase();
    assert!(text.contains(&hex(&d)), "{text}");
    assert!(text.contains("Superseded"), "{text}");
    assert!(text.contains(&hex(&c)), "{text}");
    assert!(text.contains("Remove From CRL"), "{text}");
    // Never listed: not in the delta. (b, revoked within the hour before
    // the base, is listed again: the margin for clocks, harmless.)
    assert!(!text.contains(&hex(&a)), "{text}");

    let verify = |cert: &Creds, crls: &[&std::path::Path]| -> (bool, String) {
        let mut cmd = Command::new("openssl");
        cmd.args(["verify", "-crl_check", "-use_deltas", "-CAfile"])
            .arg(server.data_dir.join("ca.crt"))
            .arg("-untrusted")
            .arg(issuing(&server));
        for crl in crls {
            cmd.arg("-CRLfile").arg(crl);
        }
        run(cmd.arg(&cert.cert))
    };
    for (who, with_delta, revoked) in [
        (&a, true, false),
        (&b, true, true),
        (&c, true, false),
        (&d, true, true),
        // The base alone: as things stood then.
        (&c, false, true),
        (&d, false, false),
    ] {
        let crls: Vec<&std::path::Path> = match with_delta {
            true => vec![&base, &delta],
            false => vec![&base],
        };
        let (ok, out) = verify(who, &crls);
        assert_eq!(!ok, revoked, "{} with_delta={with_delta}: {out}", who.id);
        if revoked {
            assert!(out.contains("certificate revoked"), "{out}");
        }
    }
}

/// POSTs `body` with `content_type`: (HTTP status, response body).
fn post(server: &Server, body: &[u8], content_type: &str) -> (u16, Vec<u8>) {
    require_tool("curl");
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in"), dir.path().join("out"));
    std::fs::write(&input, body).unwrap();
    let out = Command::new("curl")
        .args(["-sS", "-o"])
        .arg(&output)
        .args([
            "-w",
            "%{http_code}",
            "-H",
            &format!("content-type: {content_type}"),
        ])
        .arg("--data-binary")
        .arg(format!("@{}", input.display()))
        .arg(server.ocsp_url())
        .output()
        .unwrap();
    let code = String::from_utf8_lossy(&out.stdout).parse().unwrap();
    (code, std::fs::read(&output).unwrap_or_default())
}

const MALFORMED: &[u8] = &[0x30, 0x03, 0x0a, 0x01, 0x01];
const UNAUTHORIZED: &[u8] = &[0x30, 0x03, 0x0a, 0x01, 0x06];

#[test]
fn bad_ocsp_requests_get_specific_answers_never_a_crash() {
    let (tmp, server) = start();
    let a = server.enroll(tmp.path(), "device", "dev-a");
    let issuer = CertificateDer::from_pem_file(issuing(&server)).unwrap();
    let good = build_request(&issuer, &[serial_of(&a)], None).unwrap();
    let ct = "application/ocsp-request";

    assert_eq!(
        post(&server, &good[..good.len() / 2], ct),
        (200, MALFORMED.to_vec())
    );
    assert_eq!(post(&server, b"", ct), (200, MALFORMED.to_vec()));
    assert_eq!(
        post(&server, b"\x30\x80garbage", ct),
        (200, MALFORMED.to_vec())
    );
    assert_eq!(post(&server, &good, "text/plain").0, 415);
    let many: Vec<Serial> = (0..1000u32)
        .map(|i| Serial::from_bytes(&(i + 1).to_be_bytes()).unwrap())
        .collect();
    let big = build_request(&issuer, &many, None).unwrap();
    assert_eq!(post(&server, &big, ct), (200, MALFORMED.to_vec()));
    assert_eq!(post(&server, &vec![0x30; 200 * 1024], ct).0, 413);
    let foreign = tests::pki::TestCa::foreign();
    let foreign_der = CertificateDer::from_pem_slice(foreign.cert_pem.as_bytes()).unwrap();
    let other = build_request(&foreign_der, &[serial_of(&a)], None).unwrap();
    assert_eq!(post(&server, &other, ct), (200, UNAUTHORIZED.to_vec()));

    // Garbage in the GET form.
    let (ok, text) = run(Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("{}/%%%%not-base64", server.ocsp_url())));
    assert!(ok && text == "200", "{text}");
    let out = Command::new("curl")
        .args(["-sS"])
        .arg(format!("{}/!!!!", server.ocsp_url()))
        .output()
        .unwrap();
    assert_eq!(out.stdout, MALFORMED);

    // And good requests are still answered.
    let (code, body) = post(&server, &good, ct);
    assert_eq!(code, 200);
    let summary = read_response(&body).unwrap();
    assert_eq!(summary.status, 0);
    assert_eq!(summary.certs, vec![(serial_of(&a), "good")]);
    let log = server.log().join("\n");
    assert!(!log.contains("panicked"), "{log}");
    assert!(
        server.wait_for_log("malformedRequest", std::time::Duration::from_secs(3)),
        "{log}"
    );
}

#[tokio::test]
async fn ocsp_over_mqtt_311_topics_and_mqtt5_response_topic() {
    let (tmp, server) = start();
    let asker = server.enroll(tmp.path(), "device", "asker");
    let peer = server.enroll(tmp.path(), "device", "peer");
    server.cli_ok(&["device", "revoke", "peer", "--reason", "key-compromise"]);
    let issuer = CertificateDer::from_pem_file(issuing(&server)).unwrap();
    let request = build_request(&issuer, &[serial_of(&peer)], Some(b"0123456789abcdef")).unwrap();

    // MQTT 3.1.1: devices/<id>/ocsp/request -> devices/<id>/ocsp/response.
    let (c, mut l) = client(server.mqtt, &asker, "asker");
    connected(&mut l).await;
    c.subscribe("devices/asker/ocsp/response", QoS::AtMostOnce)
        .await
        .unwrap();
    c.publish(
        "devices/asker/ocsp/request",
        QoS::AtLeastOnce,
        false,
        request.clone(),
    )
    .await
    .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Ok(Event::Incoming(Packet::Publish(p))) = l.poll().await {
                assert_eq!(p.topic, "devices/asker/ocsp/response");
                return p.payload;
            }
        }
    })
    .await
    .unwrap();
    let summary = read_response(&answer).unwrap();
    assert_eq!(summary.certs, vec![(serial_of(&peer), "revoked")]);
    // The same signed response openssl verifies.
    let resp = tmp.path().join("mqtt-resp.der");
    std::fs::write(&resp, &answer).unwrap();
    // (-no_nonce: openssl holds no request here to match the echoed nonce to.)
    let (ok, text) = run(Command::new("openssl")
        .args(["ocsp", "-no_nonce", "-respin"])
        .arg(&resp)
        .arg("-issuer")
        .arg(issuing(&server))
        .arg("-cert")
        .arg(&peer.cert)
        .arg("-CAfile")
        .arg(server.data_dir.join("ca.crt")));
    assert!(
        ok && text.contains("Response verify OK") && text.contains(": revoked"),
        "{text}"
    );
    drop(c);
    drop(l);

    // MQTT 5: $fleetgate/ocsp/request with a response topic and correlation
    // data (rumqttc's v5 client; Debian's mosquitto_rr sends -f/-s payloads
    // empty).
    use rumqttc::v5::mqttbytes::v5::{Packet as P5, PublishProperties};
    use rumqttc::v5::{AsyncClient as Client5, Event as E5, MqttOptions as O5};
    let mut opts = O5::new("asker", "127.0.0.1", server.mqtt.port());
    opts.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(asker.client_config()),
    ));
    let (c5, mut l5) = Client5::new(opts, 16);
    let props = PublishProperties {
        response_topic: Some("devices/asker/ocsp/reply".into()),
        correlation_data: Some(bytes::Bytes::from_static(b"req-42")),
        ..Default::default()
    };
    c5.publish_with_properties(
        "$fleetgate/ocsp/request",
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        false,
        request.clone(),
        props,
    )
    .await
    .unwrap();
    let (topic, payload, correlation) = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match l5.poll().await {
                Ok(E5::Incoming(P5::Publish(p))) => {
                    let corr = p.properties.and_then(|pr| pr.correlation_data);
                    return (p.topic, p.payload, corr);
                }
                Ok(_) => {}
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(&topic[..], b"devices/asker/ocsp/reply");
    assert_eq!(correlation.as_deref(), Some(&b"req-42"[..]));
    let summary = read_response(&payload).unwrap();
    assert_eq!(summary.status, 0);
    assert_eq!(summary.certs, vec![(serial_of(&peer), "revoked")]);
}

/// The README's OCSP-over-MQTT example, run as printed (with this
/// server's port) with stock openssl and mosquitto_rr.
#[test]
fn the_readme_ocsp_over_mqtt_example_works_as_printed() {
    for tool in ["openssl", "mosquitto_rr", "base64"] {
        require_tool(tool);
    }
    let block = tests::readme_example(
        "  openssl ocsp -issuer fleetgate-data/ca/issuing.crt -cert devices/dev-1.crt",
    );
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data")).unwrap();
    let work = tests::readme_workdir(&server, &tmp.path().join("work"));
    server.enroll(&work.join("devices"), "device", "dev-1");
    let script = block.replace("-p 8883", &format!("-p {}", server.mqtt.port()));
    let (ok, out) = tests::run_script(&work, &script);
    assert!(ok, "the README's OCSP over MQTT example failed:\n{out}");
    assert!(
        out.contains("Response verify OK") && out.contains("dev-1.crt: good"),
        "{out}"
    );
}

/// The README's OCSP and CRL example (default ports), run as printed
/// against this server's status port, with stock openssl and curl.
#[test]
fn the_readme_ocsp_and_crl_example_works_as_printed() {
    for tool in ["openssl", "curl"] {
        require_tool(tool);
    }
    let block = tests::readme_example("D=fleetgate-data\nopenssl ocsp -issuer");
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data")).unwrap();
    let work = tests::readme_workdir(&server, &tmp.path().join("work"));
    server.enroll(&work.join("devices"), "device", "dev-1");
    let script = block.replace("http://127.0.0.1:8080", &server.ocsp_url());
    let (ok, out) = tests::run_script(&work, &script);
    assert!(ok, "the README's OCSP and CRL example failed:\n{out}");
    assert!(out.contains("dev-1.crt: good"), "{out}");
    assert!(out.contains("verify OK"), "{out}");
    assert!(out.contains("devices/dev-1.crt: OK"), "{out}");
}
