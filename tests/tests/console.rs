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
    server
        .cli_ok(&["console", "login", "--ttl", &ttl.to_string()])
        .trim()
        .to_owned()
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

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("console/browser.py");
    let mut cmd = Command::new("python3");
    cmd.arg(&script)
        .args(["--api", &server.api_url()])
        .args(["--link", &fresh])
        .args(["--used-link", &used])
        .args(["--expired-link", &expired])
        .args(["--device", "console-dev"])
        .args(["--bystander", "console-bystander"])
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
    assert_eq!(
        server.device_json("console-dev")["revocation"]["reason"],
        "key-compromise"
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
