//! Nodes on an etcd and a NATS that run the way production ones do. etcd:
//! TLS, client certificates (`--client-cert-auth`) and auth enabled, the
//! node's certificate CN as its etcd user, whose role may touch
//! `fleetgate/` only. NATS: TLS, `verify_and_map` to the same CN, each
//! node publishing under its own name only. Two nodes enroll, admit and
//! revoke across each other and carry telemetry and a command across NATS;
//! a client without a certificate, and a node whose certificate names no
//! etcd user, are refused by etcd.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64ct::{Base64, Encoding};
use tests::{require_tool, run, Server};

/// An etcd CA, a server certificate for 127.0.0.1 and client
/// certificates for `clients` (CN = the name), made with openssl in `dir`.
fn etcd_pki(dir: &Path, clients: &[&str]) {
    std::fs::create_dir_all(dir).unwrap();
    let mut sh = format!(
        "set -e; cd {d}; \
         openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
           -keyout ca.key -out ca.crt -subj /CN=etcd-test-ca -days 2; \
         sign() {{ openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
           -keyout $1.key -out $1.csr -subj /CN=$1; printf \"$2\" > $1.ext; \
           openssl x509 -req -in $1.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
           -extfile $1.ext -out $1.crt; }}; \
         sign server 'subjectAltName=IP:127.0.0.1\\nextendedKeyUsage=serverAuth,clientAuth\\n'; ",
        d = dir.display()
    );
    for c in clients {
        sh.push_str(&format!("sign {c} 'extendedKeyUsage=clientAuth\\n'; "));
    }
    let (ok, out) = run(Command::new("sh").args(["-c", &sh]));
    assert!(ok, "{out}");
}

struct EtcdProc {
    child: Child,
}

impl Drop for EtcdProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One etcd member on `client` (`127.0.0.1:port`), data in `data`; with
/// `tls`, HTTPS with client-certificate auth against `pki/ca.crt`.
fn etcd(data: &Path, client: &str, peer: u16, pki: Option<&Path>) -> EtcdProc {
    let scheme = if pki.is_some() { "https" } else { "http" };
    let mut cmd = Command::new("etcd");
    cmd.arg("--data-dir")
        .arg(data)
        .args(["--name", "m0"])
        .args(["--listen-client-urls", &format!("{scheme}://{client}")])
        .args(["--advertise-client-urls", &format!("{scheme}://{client}")])
        .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
        .args([
            "--initial-advertise-peer-urls",
            &format!("http://127.0.0.1:{peer}"),
        ])
        .args(["--initial-cluster", &format!("m0=http://127.0.0.1:{peer}")]);
    if let Some(p) = pki {
        cmd.arg("--cert-file")
            .arg(p.join("server.crt"))
            .arg("--key-file")
            .arg(p.join("server.key"))
            .arg("--trusted-ca-file")
            .arg(p.join("ca.crt"))
            .arg("--client-cert-auth");
    }
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    EtcdProc { child }
}

/// `curl` against etcd's JSON gateway: the status line's code and body.
fn gateway(client: &str, path: &str, body: &serde_json::Value, tls: &[&str]) -> (bool, String) {
    let scheme = if tls.is_empty() { "http" } else { "https" };
    run(Command::new("curl")
        .args(["-sS", "-X", "POST"])
        .args(tls)
        .args(["-d", &body.to_string()])
        .arg(format!("{scheme}://{client}{path}")))
}

fn b64(s: &str) -> String {
    Base64::encode_string(s.as_bytes())
}

/// Waits for the member's `/health` (not the JSON gateway, which takes no
/// client certificate with a CN).
fn wait_healthy(client: &str, tls: &[&str]) {
    let scheme = if tls.is_empty() { "http" } else { "https" };
    tests::eventually(Duration::from_secs(20), "etcd answers /health", || {
        let (ok, out) = run(Command::new("curl")
            .arg("-sS")
            .args(tls)
            .arg(format!("{scheme}://{client}/health")));
        (ok && out.contains("true")).then_some(())
    });
}

/// A `mosquitto_sub -d` and its output lines as they come.
struct Sub {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Drop for Sub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `mosquitto_sub -d` on `node` as `c` for `topic`, returned once its
/// subscription is in place.
fn subscribed(node: &Server, c: &tests::Creds, topic: &str) -> Sub {
    let cmd = node.mosquitto("mosquitto_sub", c);
    let mut child = Command::new("stdbuf")
        .arg("-oL")
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .args(["-d", "-t", topic, "-F", "%t %p"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in std::io::BufRead::lines(std::io::BufReader::new(out)).map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let sub = Sub { child, lines };
    loop {
        let l = sub
            .lines
            .recv_timeout(Duration::from_secs(20))
            .expect("mosquitto_sub did not subscribe");
        if l.contains("received SUBACK") {
            return sub;
        }
    }
}

/// The first message a [`subscribed`] client printed (`topic payload`).
fn received(sub: Sub) -> String {
    loop {
        let l = sub
            .lines
            .recv_timeout(Duration::from_secs(20))
            .expect("no message within 20 s");
        if l.starts_with("devices/") {
            return l;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_on_an_etcd_with_tls_client_certificates_and_rbac() {
    for tool in ["etcd", "openssl", "curl", "mosquitto_sub", "stdbuf"] {
        require_tool(tool);
    }
    let tmp = tempfile::tempdir().unwrap();
    let pki = tmp.path().join("pki");
    etcd_pki(&pki, &["node-1", "node-2", "intruder"]);
    let data = tmp.path().join("etcd");
    let client = format!("127.0.0.1:{}", tests::etcd::free_port());
    let peer = tests::etcd::free_port();

    // RBAC first, on a plain member: a role for fleetgate's prefix, a user
    // per node (the certificate's CN), root, then auth on.
    {
        let _plain = etcd(&data, &client, peer, None);
        wait_healthy(&client, &[]);
        let calls = [
            (
                "/v3/auth/role/add",
                serde_json::json!({"name": "fleetgate"}),
            ),
            (
                "/v3/auth/role/grant",
                serde_json::json!({"name": "fleetgate", "perm": {
                    "permType": "READWRITE", "key": b64("fleetgate/"), "range_end": b64("fleetgate0")}}),
            ),
            (
                "/v3/auth/user/add",
                serde_json::json!({"name": "root", "password": "not-used-here"}),
            ),
            (
                "/v3/auth/user/grant",
                serde_json::json!({"user": "root", "role": "root"}),
            ),
            (
                "/v3/auth/user/add",
                serde_json::json!({"name": "node-1", "password": "not-used-here"}),
            ),
            (
                "/v3/auth/user/grant",
                serde_json::json!({"user": "node-1", "role": "fleetgate"}),
            ),
            (
                "/v3/auth/user/add",
                serde_json::json!({"name": "node-2", "password": "not-used-here"}),
            ),
            (
                "/v3/auth/user/grant",
                serde_json::json!({"user": "node-2", "role": "fleetgate"}),
            ),
            ("/v3/auth/enable", serde_json::json!({})),
        ];
        for (path, body) in calls {
            let (ok, out) = gateway(&client, path, &body, &[]);
            assert!(ok && !out.contains("\"error\""), "{path}: {out}");
        }
    }
    // Then the member again, with TLS and client-certificate auth.
    let _etcd = etcd(&data, &client, peer, Some(&pki));
    let ca = pki.join("ca.crt");
    let with = |who: &str| -> [String; 6] {
        [
            "--cacert".into(),
            ca.display().to_string(),
            "--cert".into(),
            pki.join(format!("{who}.crt")).display().to_string(),
            "--key".into(),
            pki.join(format!("{who}.key")).display().to_string(),
        ]
    };
    let root_cert = with("node-1");
    let root_args: Vec<&str> = root_cert.iter().map(String::as_str).collect();
    wait_healthy(&client, &root_args);

    // Refused by etcd: no certificate at all.
    let (ok, out) = run(Command::new("curl")
        .args(["-sS", "--cacert", ca.to_str().unwrap()])
        .arg(format!("https://{client}/health")));
    assert!(!ok, "no certificate, and etcd answered: {out}");

    // NATS the same way: TLS, the node's certificate as its user, each
    // node publishing under its own name only.
    let shared = r#""fleetgate.owner.>", "fleetgate.session.>", "fleetgate.queue.>", "fleetgate.ask.>", "$JS.API.>", "$JS.ACK.>", "$JS.FC.>", "_INBOX.>""#;
    let user = |n: &str| {
        format!(
            r#"{{ user: "CN={n}", permissions: {{ publish: {{ allow: ["fleetgate.msg.{n}.>", {shared}] }}, subscribe: {{ allow: ["fleetgate.>", "_INBOX.>"] }} }} }}"#
        )
    };
    let nats = tests::nats::Nats::with_config(
        &tmp.path().join("nats"),
        &format!(
            "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  verify_and_map: true\n}}\n\
             authorization {{\n  users = [\n    {}\n    {}\n  ]\n}}\n",
            pki.join("server.crt").display(),
            pki.join("server.key").display(),
            ca.display(),
            user("node-1"),
            user("node-2"),
        ),
    );
    let bus = nats.tls_url();

    // The nodes, each with its own certificate, for etcd and NATS alike.
    let store = format!("https://{client}");
    let node_args = |n: &str| -> Vec<String> {
        let (cert, key) = (pki.join(format!("{n}.crt")), pki.join(format!("{n}.key")));
        [
            "--store",
            &store,
            "--store-ca",
            ca.to_str().unwrap(),
            "--store-cert",
            cert.to_str().unwrap(),
            "--store-key",
            key.to_str().unwrap(),
            "--nats",
            &bus,
            "--nats-ca",
            ca.to_str().unwrap(),
            "--nats-cert",
            cert.to_str().unwrap(),
            "--nats-key",
            key.to_str().unwrap(),
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let a1 = node_args("node-1");
    let a1: Vec<&str> = a1.iter().map(String::as_str).collect();
    let one = Server::start_with(&tmp.path().join("node-1"), &a1).unwrap();
    assert!(!one.log().iter().any(|l| l.contains("etcd without TLS")));
    tests::copy_data_dir(&one.data_dir, &tmp.path().join("node-2"));
    let a2 = node_args("node-2");
    let a2: Vec<&str> = a2.iter().map(String::as_str).collect();
    let two = Server::start_with(&tmp.path().join("node-2"), &a2).unwrap();

    // Enrolled on one, admitted by two; telemetry from a device on two to
    // a service on one, a command back across NATS; revoked on two,
    // refused by one.
    let creds = tmp.path().join("c");
    let dev = one.enroll(&creds, "device", "dev-1");
    let svc = one.enroll(&creds, "service", "backend");
    let ops = one.enroll(&creds, "service", "ops");
    let ev = tests::mqtt::online(two.mqtt, &dev).await;
    drop(ev);
    let telemetry = subscribed(&one, &svc, "devices/dev-1/telemetry");
    let (ok, out) = run(two.mosquitto("mosquitto_pub", &dev).args([
        "-q",
        "1",
        "-t",
        "devices/dev-1/telemetry",
        "-m",
        "sealed",
    ]));
    assert!(ok, "{out}");
    assert_eq!(received(telemetry), "devices/dev-1/telemetry sealed");
    let commands = subscribed(&two, &dev, "devices/dev-1/commands/#");
    // Node one's console finds the device on node two: the question and
    // its answer pass NATS's permissions (`fleetgate.ask.>`, `_INBOX.>`).
    let page: serde_json::Value = one.admin().get("/console/api/devices/dev-1").await.unwrap();
    let on = page["sessions"][0]["node"].as_str().unwrap_or_default();
    assert!(on.ends_with(&format!("({})", two.mqtt)), "{page}");
    let (ok, out) = run(one.mosquitto("mosquitto_pub", &ops).args([
        "-q",
        "1",
        "-t",
        "devices/dev-1/commands/reboot",
        "-m",
        "now",
    ]));
    assert!(ok, "{out}");
    assert_eq!(received(commands), "devices/dev-1/commands/reboot now");
    two.cli_ok(&["device", "revoke", "dev-1"]);
    assert!(tests::mqtt::refused(one.mqtt, &dev).await);
    assert_eq!(one.device_json("dev-1")["status"], "revoked");

    // A certificate of the same CA whose CN is no etcd user: a node with
    // it does not start, and says etcd refused it.
    let a3 = node_args("intruder");
    let a3: Vec<&str> = a3.iter().map(String::as_str).collect();
    tests::copy_data_dir(&one.data_dir, &tmp.path().join("node-3"));
    let err = Server::start_with(&tmp.path().join("node-3"), &a3).unwrap_err();
    let err = format!("{err:#}");
    assert!(err.contains("etcd refused"), "{err}");
}
