//! The operator console in a real browser: headless Chromium over
//! WebDriver (`tests/console/browser.py`, chromedriver; both installed by
//! `.ci/run`) against the real server, with a device connected by
//! `mosquitto_sub` whose subscription must end when the console revokes
//! it.
//!
//! `FLEETGATE_SCREENSHOTS=docs cargo test -p tests --test console` also
//! writes the README's screenshots.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use tests::{require_tool, run, Server};

/// A login link from `fleetgate console login`, good for `ttl` seconds.
fn link(server: &Server, ttl: u64) -> String {
    let out = server.cli(&["console", "login", "--ttl", &ttl.to_string()]);
    assert!(out.status.success(), "{out:?}");
    // Its expiry in RFC 3339 (issue 29, item 23), not time's own format.
    let err = String::from_utf8_lossy(&out.stderr);
    let until = err
        .split("until ")
        .nth(1)
        .and_then(|t| t.strip_suffix(").\n"))
        .unwrap_or_else(|| panic!("no expiry in {err:?}"));
    assert!(
        time::OffsetDateTime::parse(until, &time::format_description::well_known::Rfc3339).is_ok(),
        "{until:?}"
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The ids of a page of the console's device list.
fn page_ids(page: &serde_json::Value) -> Vec<String> {
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn the_console_signs_in_once_shows_a_device_and_revokes_it() {
    for tool in [
        "python3",
        "chromium",
        "chromedriver",
        "mosquitto_sub",
        "curl",
    ] {
        require_tool(tool);
    }
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data")).unwrap();
    let dir = tmp.path().join("creds");
    std::fs::create_dir_all(&dir).unwrap();
    // A manufacturer for the overview to list.
    server.cli_ok(&[
        "manufacturer",
        "create",
        "acme",
        "--out",
        dir.to_str().unwrap(),
    ]);
    let dev = server.enroll(&dir, "device", "console-dev");
    let bystander = server.enroll(&dir, "device", "console-bystander");
    // Two devices of a manufacturer whose devices wait for an operator:
    // registered pending at their first connect.
    server.cli_ok(&[
        "manufacturer",
        "create",
        "slowco",
        "--policy",
        "pending",
        "--out",
        dir.to_str().unwrap(),
    ]);
    let slowco = tests::pki::TestCa::from_pem(
        &std::fs::read_to_string(dir.join("slowco.crt")).unwrap(),
        &std::fs::read_to_string(dir.join("slowco.key")).unwrap(),
    );
    // A claim, for its page.
    server.cli_ok(&[
        "claim",
        "create",
        "line-1",
        "--uses",
        "3",
        "--out",
        dir.to_str().unwrap(),
    ]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    for id in ["pend-1", "pend-2"] {
        let (chain, key) = slowco.issue(&tests::pki::Spec::device(id));
        let c = server.creds(&dir.join("pending"), id, &chain, &key);
        assert!(rt.block_on(tests::mqtt::refused(server.mqtt, &c)));
        assert_eq!(server.device_json(id)["status"], "pending");
    }

    // The device stays subscribed until it is cut.
    let mut sub = server
        .mosquitto("mosquitto_sub", &dev)
        .args(["-t", "devices/console-dev/commands", "-q", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    tests::eventually(Duration::from_secs(10), "mosquitto_sub connects", || {
        server
            .log()
            .iter()
            .any(|l| l.contains("mqtt: connected") && l.contains("device.id=console-dev"))
            .then_some(())
    });
    // A refusal for the live activity: the bystander publishing to the
    // device's topic (ACL).
    let _ = run(server.mosquitto("mosquitto_pub", &bystander).args([
        "-t",
        "devices/console-dev/telemetry",
        "-m",
        "x",
    ]));

    // A spent link, and one that expired.
    let used = link(&server, 600);
    let token = used.split("token=").nth(1).unwrap().to_owned();
    let jar = tmp.path().join("cookies");
    let (ok, out) = run(Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
        .arg(server.data_dir.join("ca.crt"))
        .arg("-c")
        .arg(&jar)
        .args(["-d", &format!("token={token}")])
        .arg(format!("{}/console/login", server.api_url())));
    assert!(ok && out == "303", "{out}");
    // That session's live activity stream ends when the session does.
    let with_jar = |path: &str| {
        let mut c = Command::new("curl");
        c.args(["-sS", "--cacert"])
            .arg(server.data_dir.join("ca.crt"))
            .arg("-b")
            .arg(&jar)
            .arg(format!("{}{path}", server.api_url()));
        c
    };
    let mut stream = with_jar("/console/api/activity")
        .arg("-N")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let (ok, me) = run(&mut with_jar("/console/api/me"));
    assert!(ok, "{me}");
    let me: serde_json::Value = serde_json::from_str(&me).unwrap();
    assert_eq!(me["session"], true);
    let (ok, out) = run(with_jar("/console/logout")
        .args(["-X", "POST", "-w", "%{http_code}", "-H"])
        .arg(format!("X-CSRF-Token: {}", me["csrf"].as_str().unwrap())));
    assert!(ok && out.ends_with("204"), "{out}");
    assert!(
        tests::exits(&mut stream, Duration::from_secs(15)),
        "the activity stream outlived its session"
    );
    let (_, out) = run(with_jar("/console/api/me").args(["-o", "/dev/null", "-w", "%{http_code}"]));
    assert_eq!(out, "401");
    let expired = link(&server, 1);
    std::thread::sleep(Duration::from_millis(1500));
    let fresh = link(&server, 600);

    // The bystander's new key and its CSR, for a rotation in the browser.
    let rotated = tmp.path().join("rotated");
    std::fs::create_dir_all(&rotated).unwrap();
    let (new_key, csr) = (rotated.join("new.key"), rotated.join("new.csr"));
    let (ok, out) = run(Command::new("openssl")
        .args([
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-subj", "/CN=console-bystander", "-keyout"])
        .arg(&new_key)
        .arg("-out")
        .arg(&csr));
    assert!(ok, "{out}");
    let chain_out = rotated.join("chain.pem");

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("console/browser.py");
    let axe =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("console/node_modules/axe-core/axe.min.js");
    assert!(
        axe.is_file(),
        "{} is missing: run .ci/run, or npm install --prefix tests/console axe-core@4.10.3",
        axe.display()
    );
    let mut cmd = Command::new("python3");
    cmd.arg(&script)
        .args(["--api", &server.api_url()])
        .args(["--link", &fresh])
        .args(["--used-link", &used])
        .args(["--expired-link", &expired])
        .args(["--device", "console-dev"])
        .args(["--bystander", "console-bystander"])
        .args(["--pending", "pend-1,pend-2"])
        .arg("--csr")
        .arg(&csr)
        .arg("--rotated-out")
        .arg(&chain_out)
        .env("PYTHONDONTWRITEBYTECODE", "1");
    if let Some(dir) = std::env::var_os("FLEETGATE_SCREENSHOTS") {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(dir);
        cmd.arg("--screenshots").arg(dir);
    }
    let (ok, out) = run(&mut cmd);
    eprintln!("{out}");
    if !ok {
        let log = server.log();
        let tail = &log[log.len().saturating_sub(40)..];
        panic!(
            "the browser checks failed:\n{out}\nserver log:\n{}",
            tail.join("\n")
        );
    }

    // The live subscription ended with the revocation.
    assert!(
        tests::exits(&mut sub, Duration::from_secs(10)),
        "mosquitto_sub still connected after the revocation"
    );
    assert_eq!(server.device_json("console-dev")["status"], "revoked");
    // Revoked from its page in the console.
    let makers = server.cli_ok(&["manufacturer", "list"]);
    let acme = makers
        .lines()
        .find(|l| l.contains("acme"))
        .unwrap_or_default();
    assert!(acme.contains("revoked"), "{makers}");
    // Approved from the console, one in bulk and one from its page.
    for id in ["pend-1", "pend-2"] {
        assert_eq!(server.device_json(id)["status"], "active", "{id}");
    }
    // pend-1's one certificate revoked from its page, the device not.
    let pend1 = server.device_json("pend-1");
    assert_eq!(pend1["certificates"][0]["status"], "revoked", "{pend1}");
    assert_eq!(
        pend1["certificates"][0]["revocation"]["reason"], "superseded",
        "{pend1}"
    );
    assert_eq!(
        server.device_json("console-dev")["revocation"]["reason"],
        "key-compromise"
    );
    // The chain the console issued works with the bystander's new key,
    // and each of its certificates downloads as what openssl verifies.
    let new_creds = server.creds(
        &rotated.join("creds"),
        "console-bystander",
        &std::fs::read_to_string(&chain_out).unwrap(),
        &std::fs::read_to_string(&new_key).unwrap(),
    );
    assert!(
        !rt.block_on(tests::mqtt::refused(server.mqtt, &new_creds)),
        "the rotated certificate was refused"
    );
    let bystander_json = server.device_json("console-bystander");
    let certs = bystander_json["certificates"].as_array().unwrap();
    assert_eq!(certs.len(), 2, "{bystander_json}");
    for c in certs {
        let pem = rotated.join(format!("{}.pem", c["serial"].as_str().unwrap()));
        let (ok, out) = run(Command::new("curl")
            .args(["-sS", "-f", "--cacert"])
            .arg(server.data_dir.join("ca.crt"))
            .arg("--cert")
            .arg(server.data_dir.join("admin.crt"))
            .arg("--key")
            .arg(server.data_dir.join("admin.key"))
            .arg("-o")
            .arg(&pem)
            .arg(format!(
                "{}/console/api/certificates/{}/pem",
                server.api_url(),
                c["key"].as_str().unwrap()
            )));
        assert!(ok, "{out}");
        let (ok, out) = run(Command::new("openssl")
            .args(["verify", "-CAfile"])
            .arg(server.data_dir.join("ca.crt"))
            // The issuing CA, from the chain the rotation returned.
            .arg("-untrusted")
            .arg(&chain_out)
            .arg(&pem));
        assert!(ok, "{out}");
        let (ok, out) = run(Command::new("openssl")
            .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
            .arg(&pem));
        assert!(ok, "{out}");
        let fp = out
            .trim()
            .rsplit('=')
            .next()
            .unwrap()
            .replace(':', "")
            .to_lowercase();
        assert_eq!(fp, c["fingerprint"].as_str().unwrap(), "{out}");
    }
    let audit = server.cli_ok(&["audit"]);
    assert!(
        audit.lines().any(|l| l.contains("rotate")
            && l.contains("console-bystander")
            && l.contains("(console)")),
        "{audit}"
    );

    // The cross-site POST and the one without a CSRF token changed nothing.
    assert_eq!(server.device_json("console-bystander")["status"], "active");
    // An admin client certificate works without a link; its changes need
    // its CSRF token all the same.
    let curl = |extra: &[&str], path: &str| {
        let dd = &server.data_dir;
        let (ok, out) = run(Command::new("curl")
            .args(["-sS", "-w", "\n%{http_code}", "--cacert"])
            .arg(dd.join("ca.crt"))
            .arg("--cert")
            .arg(dd.join("admin.crt"))
            .arg("--key")
            .arg(dd.join("admin.key"))
            .args(extra)
            .arg(format!("{}{path}", server.api_url())));
        assert!(ok, "{out}");
        let (body, code) = out.rsplit_once('\n').unwrap();
        (code.to_owned(), body.to_owned())
    };
    let (code, me) = curl(&[], "/console/api/me");
    assert_eq!(code, "200", "{me}");
    let me: serde_json::Value = serde_json::from_str(&me).unwrap();
    assert_eq!(me["session"], false);
    let csrf = me["csrf"].as_str().unwrap().to_owned();
    let suspend = "/console/api/devices/console-bystander/suspend";
    let json = ["-H", "Content-Type: application/json", "-d", "{}"];
    let (code, body) = curl(&json, suspend);
    assert_eq!(code, "403", "{body}");
    let header = format!("X-CSRF-Token: {csrf}");
    let mut with_token = json.to_vec();
    with_token.extend(["-H", &header]);
    let (code, body) = curl(&with_token, suspend);
    assert_eq!(code, "200", "{body}");
    assert_eq!(
        server.device_json("console-bystander")["status"],
        "suspended"
    );

    // The audit log has the revocation under the admin, through the console.
    let audit = server.cli_ok(&["audit"]);
    assert!(audit.contains("admin:admin (console)"), "{audit}");
    assert!(server.wait_for_log("console: refused a state change", Duration::from_secs(1)));
}

/// The console's device search: ids that start with the text are found in
/// their stretch of the id order (whatever the fleet's size), with the
/// status filter and pages; text inside ids is searched for when no id
/// starts with it. Over the console's API, with the admin's certificate.
#[test]
fn the_device_search_finds_ids_by_prefix_and_by_text_inside_them() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data")).unwrap();
    let creds = tmp.path().join("creds");
    for id in ["sensor-1", "sensor-10", "sensor-2", "probe-sensor-1"] {
        server.enroll(&creds, "device", id);
    }
    server.cli_ok(&["device", "suspend", "sensor-10"]);
    let admin = server.admin();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ids = |path: &str| -> (Vec<String>, serde_json::Value) {
        let page: serde_json::Value = rt.block_on(admin.get(path)).unwrap();
        (page_ids(&page), page["next"].clone())
    };
    // By prefix: the id itself first, then those after it that start so.
    let (found, next) = ids("/console/api/devices?q=sensor-1");
    assert_eq!(found, ["sensor-1", "sensor-10"]);
    assert!(next.is_null());
    let (found, _) = ids("/console/api/devices?q=sensor-1&status=suspended");
    assert_eq!(found, ["sensor-10"]);
    let (found, _) = ids("/console/api/devices?q=sensor-1&status=active");
    assert_eq!(found, ["sensor-1"]);
    // Inside ids, when none starts with it.
    let (found, _) = ids("/console/api/devices?q=nsor-1");
    assert_eq!(found, ["probe-sensor-1", "sensor-1", "sensor-10"]);
    let (found, _) = ids("/console/api/devices?q=nothing-like-it");
    assert!(found.is_empty());
}

/// The console's audit log over its API (issue 29, item 1): newest first,
/// paged back with `before`, filtered by who, what and when; a bad time
/// is refused with what is expected.
#[test]
fn the_audit_log_reads_newest_first_filtered_and_paged() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data")).unwrap();
    let creds = tmp.path().join("creds");
    for i in 0..60 {
        server.enroll(&creds, "device", &format!("a-{i}"));
    }
    server.cli_ok(&["device", "suspend", "a-7"]);
    let admin = server.admin();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let get = |path: &str| -> serde_json::Value { rt.block_on(admin.get(path)).unwrap() };
    let seqs = |page: &serde_json::Value| -> Vec<u64> {
        page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["seq"].as_u64().unwrap())
            .collect()
    };
    let first = get("/console/api/audit");
    let newest = seqs(&first);
    assert_eq!(newest.len(), 50, "a page");
    assert!(newest.windows(2).all(|w| w[0] > w[1]), "{newest:?}");
    assert_eq!(first["items"][0]["action"], "suspend", "the newest first");
    let before = first["next"].as_str().unwrap();
    let older = seqs(&get(&format!("/console/api/audit?before={before}")));
    assert!(!older.is_empty() && older[0] < *newest.last().unwrap());
    // By what and by whom.
    let suspended = get("/console/api/audit?action=SUSPEND");
    assert_eq!(seqs(&suspended).len(), 1);
    assert_eq!(suspended["items"][0]["device"], "a-7");
    assert!(seqs(&get("/console/api/audit?actor=nobody")).is_empty());
    // By time: all of it today, none of it in 2020.
    let today = time::OffsetDateTime::now_utc().date().to_string();
    assert_eq!(
        seqs(&get(&format!(
            "/console/api/audit?from={today}&action=enroll"
        )))
        .len(),
        50
    );
    assert!(seqs(&get("/console/api/audit?to=2020-01-01")).is_empty());
    // A time that is none.
    let err = rt
        .block_on(admin.get::<serde_json::Value>("/console/api/audit?from=yesterday"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("RFC 3339"), "{err}");
}

/// The device list at fleet scale (issue 29, item 5, in part): by role
/// (devices apart from services and admins), only those connected here,
/// the registry's total when unfiltered, and each row's certificate
/// expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_list_filters_by_role_and_connection_and_counts() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data")).unwrap();
    let creds = tmp.path().join("creds");
    let on = server.enroll(&creds, "device", "d-on");
    server.enroll(&creds, "device", "d-off");
    server.enroll(&creds, "service", "backend");
    let (_c, mut ev) = tests::mqtt::client(server.mqtt, &on, "d-on");
    tests::mqtt::connected(&mut ev).await;
    let admin = server.admin();
    let all: serde_json::Value = admin.get("/console/api/devices").await.unwrap();
    assert_eq!(page_ids(&all), ["admin", "backend", "d-off", "d-on"]);
    assert_eq!(all["total"], 4, "{all}");
    let devices: serde_json::Value = admin.get("/console/api/devices?role=device").await.unwrap();
    assert_eq!(page_ids(&devices), ["d-off", "d-on"]);
    assert!(devices["total"].is_null(), "filtered: no total");
    let expires = devices["items"][0]["expires"].as_str().unwrap();
    assert!(
        time::OffsetDateTime::parse(expires, &time::format_description::well_known::Rfc3339)
            .unwrap()
            > time::OffsetDateTime::now_utc() + time::Duration::days(80),
        "{expires}"
    );
    let connected: serde_json::Value = admin
        .get("/console/api/devices?connected=true")
        .await
        .unwrap();
    assert_eq!(page_ids(&connected), ["d-on"]);
    let err = admin
        .get::<serde_json::Value>("/console/api/devices?role=robot")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("device, service, admin"), "{err}");

    // Last seen: when it connected, then when it left; never for the
    // other; kept across a restart (written when the node stops).
    let seen = |page: &serde_json::Value, id: &str| -> Option<time::OffsetDateTime> {
        let row = page["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["id"] == id)
            .unwrap();
        row["last_seen"].as_str().map(|t| {
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).unwrap()
        })
    };
    let connected_at = seen(&devices, "d-on").expect("seen when it connected");
    assert!(seen(&devices, "d-off").is_none());
    drop(ev);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let left = loop {
        let page: serde_json::Value = admin.get("/console/api/devices?role=device").await.unwrap();
        let row = &page["items"][1];
        assert_eq!(row["id"], "d-on");
        if row["connected"] == false {
            break seen(&page, "d-on").expect("seen when it left");
        }
        assert!(
            std::time::Instant::now() < deadline,
            "d-on still connected: {page}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(left >= connected_at);
    let data = server.data_dir.clone();
    assert!(server.terminate().success());
    let server = Server::start(&data).unwrap();
    let admin = server.admin();
    let page: serde_json::Value = admin.get("/console/api/devices?role=device").await.unwrap();
    // Stored to the second.
    let stored = seen(&page, "d-on").expect("kept across the restart");
    assert_eq!(stored.unix_timestamp(), left.unix_timestamp(), "{page}");
    assert!(seen(&page, "d-off").is_none());
    let device: serde_json::Value = admin.get("/console/api/devices/d-on").await.unwrap();
    assert!(device["last_seen"].as_str().is_some(), "{device}");
}

/// The device list in the order people read ids (issue 29, item 5), and
/// the filter for devices whose certificates all expire soon: soonest
/// first, a rotated device left out (its new certificate lasts), a
/// suspended one too; a bad number of days refused with the range.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_list_reads_ids_as_people_do_and_finds_those_expiring() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data")).unwrap();
    let creds = tmp.path().join("creds");
    for id in ["n-10", "n-2", "n-100", "n-1", "n-9"] {
        server.enroll(&creds, "device", id);
    }
    for (id, days) in [
        ("soon-b", "20"),
        ("soon-a", "5"),
        ("soon-r", "5"),
        ("soon-s", "3"),
    ] {
        server.cli_ok(&[
            "device",
            "enroll",
            id,
            "--out",
            creds.to_str().unwrap(),
            "--lifetime-days",
            days,
        ]);
    }
    server.cli_ok(&["device", "suspend", "soon-s"]);
    server.cli_ok(&[
        "device",
        "rotate",
        "soon-r",
        "--out",
        creds.join("rotated").to_str().unwrap(),
    ]);
    let admin = server.admin();
    let all: serde_json::Value = admin.get("/console/api/devices?role=device").await.unwrap();
    assert_eq!(
        page_ids(&all)[..5],
        ["n-1", "n-2", "n-9", "n-10", "n-100"],
        "{all}"
    );
    let active: serde_json::Value = admin
        .get("/console/api/devices?status=active&after=n-9")
        .await
        .unwrap();
    assert_eq!(page_ids(&active)[..2], ["n-10", "n-100"], "{active}");
    let expiring: serde_json::Value = admin
        .get("/console/api/devices?role=&expiring=30")
        .await
        .unwrap();
    assert_eq!(page_ids(&expiring), ["soon-a", "soon-b"], "{expiring}");
    assert!(expiring["total"].is_null());
    let week: serde_json::Value = admin
        .get("/console/api/devices?role=&expiring=7")
        .await
        .unwrap();
    assert_eq!(page_ids(&week), ["soon-a"], "{week}");
    let err = admin
        .get::<serde_json::Value>("/console/api/devices?expiring=0")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("from 1 to 3650"), "{err}");
}
