//! The attacks of security round 3 (issue 24), each run against the real
//! server as an outsider ran it: identity forged through a will, cross-site
//! requests to the admin API, console sessions that outlive their
//! certificate, quotas that reset on reconnect, retained bytes, CMP
//! replays, SHA-1 CSRs, spoofed log fields and a stale OCSP signer.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tests::{require_tool, run, Creds, Server};

fn start_with(extra: &[&str]) -> (tempfile::TempDir, Server) {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start_with(&tmp.path().join("data"), extra).unwrap();
    (tmp, server)
}

/// A running `mosquitto_sub -d` (MQTT 5): its output lines as they come.
struct Sub {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Sub {
    fn spawn(cmd: Command) -> Self {
        // Line-buffered: its debug lines say when it is subscribed.
        let mut child = Command::new("stdbuf")
            .arg("-oL")
            .arg(cmd.get_program())
            .args(cmd.get_args())
            .arg("-d")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        let out: Box<dyn std::io::Read + Send> = Box::new(child.stdout.take().unwrap());
        let err: Box<dyn std::io::Read + Send> = Box::new(child.stderr.take().unwrap());
        for r in [out, err] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(r).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits up to `within` for a line containing `needle`; the line.
    fn wait_for(&mut self, needle: &str, within: Duration) -> Option<String> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(l) = self.seen.iter().find(|l| l.contains(needle)) {
                return Some(l.clone());
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            match self.lines.recv_timeout(left) {
                Ok(l) => self.seen.push(l),
                Err(_) => return None,
            }
        }
    }

    /// Ends the client without a DISCONNECT: the TCP connection drops.
    fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Sub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `mosquitto_sub -V 5` as `c`, printing topic and user properties.
fn sub(server: &Server, c: &Creds, topic: &str) -> Command {
    let mut cmd = server.mosquitto("mosquitto_sub", c);
    cmd.args(["-V", "5", "-i", &c.id, "-t", topic, "-F", "%t|%P|%p"]);
    cmd
}

/// Forged identity properties a will carries, with lookalike names.
const FORGED: [(&str, &str); 5] = [
    ("x-fleetgate-mark", "1/dead00/beef00/evilcorp"),
    ("x-fleetgate-device-id", "dev2"),
    (" x-fleetgate-device-id", "dev2"),
    ("x\u{2010}fleetgate-serial", "dead00"),
    ("x\u{2011}fleetgate-manufacturer", "evilcorp"),
];

fn with_forged_will(cmd: &mut Command, topic: &str, retain: bool) {
    cmd.args(["--will-topic", topic, "--will-payload", "gone"]);
    if retain {
        cmd.arg("--will-retain");
    }
    for (k, v) in FORGED {
        cmd.args(["-D", "will", "user-property", k, v]);
    }
}

fn assert_not_forged(line: &str) {
    for bad in ["dev2", "dead00", "beef00", "evilcorp"] {
        assert!(
            !line.contains(bad),
            "forged identity reached a service: {line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_will_cannot_forge_the_identity_stamp() {
    require_tool("mosquitto_sub");
    let (tmp, server) = start_with(&[]);
    let dir = tmp.path().join("creds");
    let dev1 = server.enroll(&dir, "device", "dev1");
    let svc = server.enroll(&dir, "service", "backend");
    let svc2 = server.enroll(&dir, "service", "rogue");
    let watcher = server.enroll(&dir, "service", "watcher");
    let mut listening = Sub::spawn(sub(&server, &svc, "devices/+/status"));
    assert!(listening
        .wait_for("received SUBACK", Duration::from_secs(20))
        .is_some());
    let mut commands = Sub::spawn(sub(&server, &watcher, "devices/+/commands/#"));
    assert!(commands
        .wait_for("received SUBACK", Duration::from_secs(20))
        .is_some());

    // dev1: a retained will with a forged stamp, then the TCP drops.
    let mut cmd = sub(&server, &dev1, "devices/dev1/inbox");
    with_forged_will(&mut cmd, "devices/dev1/status", true);
    let mut attacker = Sub::spawn(cmd);
    assert!(attacker
        .wait_for("received SUBACK", Duration::from_secs(20))
        .is_some());
    attacker.kill9();
    let got = listening
        .wait_for("devices/dev1/status|", Duration::from_secs(20))
        .expect("the will arrived");
    assert_not_forged(&got);
    assert!(got.contains("x-fleetgate-device-id:dev1"), "{got}");
    assert!(got.ends_with("|gone"), "{got}");
    // One identity, the broker's: one serial, one device id.
    assert_eq!(got.matches("x-fleetgate-device-id").count(), 1, "{got}");
    assert_eq!(got.matches("fleetgate-serial").count(), 1, "{got}");

    // Retained: a later subscriber gets the broker's stamp too.
    let mut later = Sub::spawn(sub(&server, &svc, "devices/+/status"));
    let kept = later
        .wait_for("devices/dev1/status|", Duration::from_secs(20))
        .expect("the retained will");
    assert_not_forged(&kept);
    assert!(kept.contains("x-fleetgate-device-id:dev1"), "{kept}");

    // A service's will to a device's command topic is no device message.
    let mut cmd = sub(&server, &svc2, "devices/dev1/status");
    with_forged_will(&mut cmd, "devices/dev3/commands/x", false);
    let mut rogue = Sub::spawn(cmd);
    assert!(rogue
        .wait_for("received SUBACK", Duration::from_secs(20))
        .is_some());
    rogue.kill9();
    let got = commands
        .wait_for("devices/dev3/commands/x|", Duration::from_secs(20))
        .expect("the service's will");
    assert_not_forged(&got);
    assert!(
        !got.contains("fleetgate"),
        "a stamp on a service's will: {got}"
    );
}

/// `curl` against the admin API with the admin certificate; returns the
/// HTTP status and body.
fn admin_curl(
    server: &Server,
    method: &str,
    path: &str,
    headers: &[&str],
    body: Option<&str>,
) -> (u16, String) {
    require_tool("curl");
    let dd = &server.data_dir;
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-X", method, "-w", "\n%{http_code}", "--cacert"])
        .arg(dd.join("ca.crt"))
        .arg("--cert")
        .arg(dd.join("admin.crt"))
        .arg("--key")
        .arg(dd.join("admin.key"));
    for h in headers {
        cmd.args(["-H", h]);
    }
    if let Some(b) = body {
        cmd.args(["--data-binary", b]);
    }
    cmd.arg(format!("{}{path}", server.api_url()));
    let (ok, out) = run(&mut cmd);
    assert!(ok, "{out}");
    let (body, code) = out.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap(), body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_site_requests_change_nothing_and_the_last_admin_stays() {
    let (tmp, server) = start_with(&[]);
    let dir = tmp.path().join("creds");
    server.enroll(&dir, "device", "dev-4");
    let cross = [
        "Origin: https://evil.example",
        "Sec-Fetch-Site: cross-site",
        "Content-Type: application/x-www-form-urlencoded",
    ];
    for path in [
        "/v1/devices/dev-4/suspend",
        "/v1/devices/admin/suspend",
        "/v1/server-certificate/renew",
        "/v1/manufacturers/acme/challenge",
        "/v1/console/links",
    ] {
        let (code, body) = admin_curl(&server, "POST", path, &cross, Some(""));
        assert_eq!(code, 403, "{path}: {body}");
        assert!(body.contains("cross_site"), "{body}");
    }
    // Each signal alone is enough: a foreign Origin with JSON, and a
    // same-origin form post.
    let (code, _) = admin_curl(
        &server,
        "POST",
        "/v1/devices/dev-4/suspend",
        &[
            "Origin: https://evil.example",
            "Content-Type: application/json",
        ],
        Some("{}"),
    );
    assert_eq!(code, 403);
    let (code, body) = admin_curl(
        &server,
        "POST",
        "/v1/devices/dev-4/suspend",
        &["Content-Type: application/x-www-form-urlencoded"],
        Some(""),
    );
    assert_eq!(code, 415, "{body}");
    assert!(server.wait_for_log("a state change from another site", Duration::from_secs(5)));
    assert_eq!(server.device_json("dev-4")["status"], "active");
    // The CLI works unchanged, and curl with JSON as the README shows.
    server.cli_ok(&["device", "suspend", "dev-4"]);
    assert_eq!(server.device_json("dev-4")["status"], "suspended");
    let (code, body) = admin_curl(
        &server,
        "POST",
        "/v1/devices/dev-4/resume",
        &["Content-Type: application/json"],
        Some("{}"),
    );
    assert_eq!(code, 200, "{body}");

    // The only admin cannot take itself out.
    let out = server.cli(&["device", "suspend", "admin"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("last active admin"),
        "{out:?}"
    );
    let (code, body) = admin_curl(
        &server,
        "POST",
        "/v1/devices/admin/revoke",
        &["Content-Type: application/json"],
        Some("{}"),
    );
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("last_admin"), "{body}");
    let (code, body) = admin_curl(
        &server,
        "POST",
        "/v1/devices/revoke-batch",
        &["Content-Type: application/json"],
        Some(r#"{"ids": ["admin", "dev-4"]}"#),
    );
    assert_eq!(code, 409, "{body}");
    assert_eq!(server.device_json("admin")["status"], "active");
    assert_eq!(server.device_json("dev-4")["status"], "active");
    // With a second admin, the first may go; the override is explicit.
    enroll_admin(&server, &dir, "admin2").await;
    let (code, body) = admin_curl(
        &server,
        "POST",
        "/v1/devices/admin2/suspend",
        &["Content-Type: application/json"],
        Some("{}"),
    );
    assert_eq!(code, 200, "{body}");
    let (code, _) = admin_curl(
        &server,
        "POST",
        "/v1/devices/admin/suspend?allow_last_admin=true",
        &["Content-Type: application/json"],
        Some("{}"),
    );
    assert_eq!(code, 200);
}

/// A second admin through the API (the CLI enrolls devices and services
/// only): its credentials in `dir`, and its certificate's serial.
async fn enroll_admin(server: &Server, dir: &Path, id: &str) -> (Creds, String) {
    let (key, csr) = tests::pki::csr(id);
    let got: Value = server
        .admin()
        .post(
            "/v1/devices",
            &json!({"id": id, "csr": csr, "role": "admin"}),
        )
        .await
        .unwrap();
    let c = server.creds(
        dir,
        id,
        got["chain_pem"].as_str().unwrap(),
        &key.serialize_pem(),
    );
    (c, got["serial"].as_str().unwrap().to_owned())
}

/// `POST /v1/console/links` as the admin whose credentials are in `dir`:
/// the link's path.
async fn console_link(server: &Server, c: &Creds) -> String {
    let api = server.client(Some((&c.cert, &c.key)));
    let link: Value = api.post("/v1/console/links", &json!({})).await.unwrap();
    link["path"].as_str().unwrap().to_owned()
}

/// Spends a console link with curl: the session cookie jar.
fn sign_in(server: &Server, path: &str, jar: &Path) -> u16 {
    let token = path.rsplit_once("token=").unwrap().1;
    let (ok, out) = run(Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
        .arg(server.data_dir.join("ca.crt"))
        .arg("-c")
        .arg(jar)
        .args(["-d", &format!("token={token}")])
        .arg(format!("{}/console/login", server.api_url())));
    assert!(ok, "{out}");
    out.trim().parse().unwrap()
}

fn console_get(server: &Server, jar: &Path, path: &str) -> (u16, String) {
    let (ok, out) = run(Command::new("curl")
        .args(["-sS", "-w", "\n%{http_code}", "--cacert"])
        .arg(server.data_dir.join("ca.crt"))
        .arg("-b")
        .arg(jar)
        .arg(format!("{}{path}", server.api_url())));
    assert!(ok, "{out}");
    let (body, code) = out.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap(), body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_sessions_end_with_their_certificate() {
    require_tool("curl");
    let (tmp, server) = start_with(&[]);
    let dir = tmp.path().join("creds");
    let (admin2, serial) = enroll_admin(&server, &dir, "admin2").await;
    let jar = tmp.path().join("jar");
    let path = console_link(&server, &admin2).await;
    assert_eq!(sign_in(&server, &path, &jar), 303);
    let (code, me) = console_get(&server, &jar, "/console/api/me");
    assert_eq!(code, 200, "{me}");
    // A second link, minted before the revocation.
    let spare = console_link(&server, &admin2).await;
    let revoked: Value = server
        .admin()
        .post(
            &format!("/v1/certificates/{serial}/revoke"),
            &json!({"reason": "key-compromise"}),
        )
        .await
        .unwrap();
    assert!(revoked["revocation"].is_object(), "{revoked}");
    let (code, body) = console_get(&server, &jar, "/console/api/me");
    assert_eq!(code, 401, "the session outlived its certificate: {body}");
    assert!(body.contains("revoked"), "{body}");
    assert_eq!(sign_in(&server, &spare, &tmp.path().join("jar2")), 403);
    assert!(server.wait_for_log("console: refused a login", Duration::from_secs(5)));
    // admin2 itself is still active: it is the certificate that ended it.
    assert_eq!(server.device_json("admin2")["status"], "active");
}

/// A CSR for `cn` signed with `digest` by stock openssl: its PEM and
/// base64 DER paths.
fn openssl_csr(dir: &Path, cn: &str, digest: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let (pem, b64) = (dir.join(format!("{cn}.csr")), dir.join(format!("{cn}.b64")));
    let (ok, out) = run(Command::new("openssl")
        .args([
            "req",
            "-new",
            "-newkey",
            "rsa:2048",
            "-nodes",
            &format!("-{digest}"),
        ])
        .args(["-subj", &format!("/CN={cn}"), "-keyout"])
        .arg(dir.join(format!("{cn}.key")))
        .arg("-out")
        .arg(&pem));
    assert!(ok, "{out}");
    let (ok, text) = run(Command::new("openssl")
        .args(["req", "-noout", "-text", "-in"])
        .arg(&pem));
    assert!(
        ok && text.contains(&format!("{digest}WithRSAEncryption")),
        "{text}"
    );
    let (ok, out) = run(Command::new("sh").arg("-c").arg(format!(
        "openssl req -in {} -outform DER | openssl base64 > {}",
        pem.display(),
        b64.display()
    )));
    assert!(ok, "{out}");
    (pem, b64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sha1_csrs_are_refused_everywhere() {
    require_tool("openssl");
    require_tool("curl");
    let (tmp, server) = start_with(&[]);
    let dir = tmp.path().join("csrs");
    let (pem, b64) = openssl_csr(&dir, "weak-1", "sha1");
    // The JSON API, through the CLI.
    let out = server.cli(&[
        "device",
        "enroll",
        "weak-1",
        "--csr",
        pem.to_str().unwrap(),
        "--out",
        dir.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("never SHA-1"),
        "{err}"
    );
    // EST simpleenroll, as the admin.
    let dd = &server.data_dir;
    let (ok, out) = run(Command::new("curl")
        .args(["-sS", "-w", "\n%{http_code}", "--cacert"])
        .arg(dd.join("ca.crt"))
        .arg("--cert")
        .arg(dd.join("admin.crt"))
        .arg("--key")
        .arg(dd.join("admin.key"))
        .args(["-H", "Content-Type: application/pkcs10", "--data-binary"])
        .arg(format!("@{}", b64.display()))
        .arg(format!("{}/.well-known/est/simpleenroll", server.api_url())));
    assert!(ok, "{out}");
    assert!(out.ends_with("400") && out.contains("never SHA-1"), "{out}");
    assert!(!server.cli(&["device", "show", "weak-1"]).status.success());
    // The same request with SHA-256 goes through.
    let (pem, _) = openssl_csr(&dir, "strong-1", "sha256");
    server.cli_ok(&[
        "device",
        "enroll",
        "strong-1",
        "--csr",
        pem.to_str().unwrap(),
        "--out",
        dir.to_str().unwrap(),
    ]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_id_cannot_add_fields_to_the_log() {
    let (tmp, server) = start_with(&[]);
    let c = server.enroll(&tmp.path().join("d"), "device", "e-1");
    let spoof = "x reason=ok client=admin";
    let answer = tests::mqtt::probe(
        server.mqtt,
        c.client_config(),
        &tests::mqtt::connect_packet(spoof),
    )
    .await
    .unwrap();
    // CONNACK 0x05: not authorized (the id is not the certificate's).
    assert_eq!(answer, [0x20, 0x02, 0x00, 0x05]);
    assert!(server.wait_for_log(
        "client_id=\"x reason=ok client=admin\"",
        Duration::from_secs(5)
    ));
    for line in server.log() {
        assert!(
            !line.contains("client_id=x reason=ok"),
            "an unquoted peer value: {line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_ocsp_answer_after_a_clock_jump_is_signed_in_date() {
    require_tool("openssl");
    let tmp = tempfile::tempdir().unwrap();
    // The server's wall clock comes from a file the test moves; the
    // upkeep timer is an hour away, so only the answer itself can renew.
    let clock = tmp.path().join("clock");
    let server = Server::start_on_fake_clock(
        &tmp.path().join("data"),
        &clock,
        &["--upkeep-interval-secs", "3600"],
    )
    .unwrap();
    let c = server.enroll(&tmp.path().join("d"), "device", "o-1");
    let ocsp = |offset: &str| server.openssl_ocsp_at(&c.cert, offset);
    let now = ocsp("+0d");
    assert!(
        now.contains("Response verify OK") && now.contains(": good"),
        "{now}"
    );
    // 35 days on: the signing certificate (30 days) expired meanwhile.
    std::fs::write(&clock, "+35d\n").unwrap();
    let later = ocsp("+35d");
    assert!(
        later.contains("Response verify OK") && later.contains(": good"),
        "the first answer after the jump: {later}"
    );
    assert!(server.wait_for_log(
        "renewed the OCSP signing certificate",
        Duration::from_secs(5)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_belong_to_the_client_not_the_connection() {
    require_tool("mosquitto_pub");
    let (tmp, server) = start_with(&["--new-topics-per-minute", "3", "--max-subscriptions", "2"]);
    let dir = tmp.path().join("creds");
    let dev = server.enroll(&dir, "device", "q-1");
    let svc = server.enroll(&dir, "service", "q-svc");
    // Each mosquitto_pub is a new connection: the budget does not refill.
    let publish = |topic: &str| {
        run(server
            .mosquitto("mosquitto_pub", &dev)
            .args(["-V", "5", "-q", "1", "-t", topic, "-m", "x"]))
        .1
    };
    for i in 0..3 {
        let out = publish(&format!("devices/q-1/t{i}"));
        assert!(!out.contains("Quota exceeded"), "topic {i}: {out}");
    }
    let out = publish("devices/q-1/t3");
    assert!(
        out.contains("Quota exceeded"),
        "a reconnect refilled the budget: {out}"
    );
    // A topic in use still goes through.
    assert!(!publish("devices/q-1/t0").contains("Quota exceeded"));
    // A will to a new topic spends the same budget.
    let mut cmd = sub(&server, &dev, "devices/q-1/inbox");
    cmd.args([
        "--will-topic",
        "devices/q-1/will-new",
        "--will-payload",
        "x",
    ]);
    let mut willing = Sub::spawn(cmd);
    assert!(willing
        .wait_for("received SUBACK", Duration::from_secs(20))
        .is_some());
    willing.kill9();
    assert!(server.wait_for_log(
        "last will: more than 3 new topics a minute",
        Duration::from_secs(10)
    ));
    // A persistent service session keeps its filters, and its cap, across
    // connections.
    let subscribe = |filters: &[&str]| {
        let mut c = server.mosquitto("mosquitto_sub", &svc);
        c.args(["-V", "5", "-i", "q-svc", "-c", "-x", "600", "-E"]);
        for f in filters {
            c.args(["-t", f]);
        }
        run(&mut c).1
    };
    let first = subscribe(&["devices/a/#", "devices/b/#"]);
    assert!(!first.contains("denied"), "{first}");
    let second = subscribe(&["devices/c/#", "devices/d/#"]);
    assert!(
        second.contains("denied"),
        "the cap reset on reconnect: {second}"
    );
    assert!(server.wait_for_log("this session holds 2 subscriptions", Duration::from_secs(5)));
    // Its own filters again are no new ones.
    let again = subscribe(&["devices/a/#"]);
    assert!(!again.contains("denied"), "{again}");
}

/// The peak resident memory of process `pid`, in KiB (VmHWM).
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_are_bounded_in_bytes() {
    require_tool("mosquitto_pub");
    let (tmp, server) = start_with(&["--retained-bytes", "250000"]);
    let dir = tmp.path().join("creds");
    let dev = server.enroll(&dir, "device", "r-1");
    let svc = server.enroll(&dir, "service", "r-svc");
    let payload = tmp.path().join("payload");
    std::fs::write(&payload, vec![b'x'; 100_000]).unwrap();
    let retain = |topic: &str| {
        run(server
            .mosquitto("mosquitto_pub", &dev)
            .args(["-V", "5", "-q", "1", "-r", "-t", topic, "-f"])
            .arg(&payload))
        .1
    };
    assert!(!retain("devices/r-1/a").contains("Quota exceeded"));
    assert!(!retain("devices/r-1/b").contains("Quota exceeded"));
    // 300 kB would be kept: refused, whatever the count.
    let out = retain("devices/r-1/c");
    assert!(out.contains("Quota exceeded"), "{out}");
    assert!(server.wait_for_log("more than 250000", Duration::from_secs(5)));
    // Replacing one is no growth.
    assert!(!retain("devices/r-1/a").contains("Quota exceeded"));
    // Wildcard subscriptions that match none of them do not load them:
    // the server's peak memory barely moves.
    let before = peak_rss_kib(server.pid());
    for _ in 0..5 {
        let (ok, out) = run(server.mosquitto("mosquitto_sub", &svc).args([
            "-V",
            "5",
            "-i",
            "r-svc",
            "-t",
            "devices/+/nomatch",
            "-E",
        ]));
        assert!(ok, "{out}");
    }
    let grown = peak_rss_kib(server.pid()).saturating_sub(before);
    assert!(grown < 8 * 1024, "peak RSS grew by {grown} KiB");
    // The ones that match still arrive.
    let (ok, out) = run(server.mosquitto("mosquitto_sub", &svc).args([
        "-V",
        "5",
        "-i",
        "r-svc",
        "-t",
        "devices/+/b",
        "-C",
        "1",
        "-W",
        "10",
        "-F",
        "%t",
    ]));
    assert!(ok && out.contains("devices/r-1/b"), "{out}");
}
