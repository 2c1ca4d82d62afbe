//! The operator console on a cluster: links and sessions that work on
//! every node (kept in the shared registry, sealed), and where a device is
//! connected, asked of every node over the bus (sealed both ways).

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::process::Command;
use std::time::Duration;

use provisioning::store::{Space, Store};

use tests::etcd::Etcd;
use tests::mqtt::{client, connected};
use tests::{run, start_nodes, Server};

/// `curl` against a node's API with the test CA, saying its status code
/// last.
fn curl(node: &Server, args: &[&str], path: &str) -> String {
    let (ok, out) = run(Command::new("curl")
        .args(["-sS", "-w", "\n%{http_code}", "--cacert"])
        .arg(node.data_dir.join("ca.crt"))
        .args(args)
        .arg(format!("{}{path}", node.api_url())));
    assert!(ok, "{out}");
    out
}

fn status(out: &str) -> &str {
    out.lines().last().unwrap_or_default()
}

#[test]
fn a_console_session_works_on_every_node_and_a_copied_one_on_none() {
    use provisioning::store::Commit;
    tests::require_tool("curl");
    let tmp = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&tmp.path().join("etcd"));
    let store_url = etcd.url();
    let [one, two]: [Server; 2] = start_nodes(
        tmp.path(),
        &[&["--store", &store_url], &["--store", &store_url]],
    )
    .try_into()
    .unwrap();

    // A link asked for on node one signs in on node two, once.
    let link = one.cli_ok(&["console", "login"]);
    let token = link.trim().split("token=").nth(1).unwrap().to_owned();
    let form = format!("token={token}");
    let out = curl(
        &two,
        &["-D", "-", "-o", "/dev/null", "-d", &form],
        "/console/login",
    );
    assert_eq!(status(&out), "303", "{out}");
    let sid = out
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .starts_with("set-cookie: __host-fleetgate-console=")
                .then(|| {
                    l.split_once('=')
                        .unwrap()
                        .1
                        .split(';')
                        .next()
                        .unwrap()
                        .to_owned()
                })
        })
        .unwrap_or_else(|| panic!("no session cookie in {out}"));
    let again = curl(&one, &["-o", "/dev/null", "-d", &form], "/console/login");
    assert_eq!(status(&again), "403", "a link signed in twice: {again}");

    // The session works on both nodes, with one CSRF token.
    let cookie = format!("Cookie: __Host-fleetgate-console={sid}");
    let mut csrf = Vec::new();
    for node in [&one, &two] {
        let out = curl(node, &["-H", &cookie], "/console/api/me");
        assert_eq!(status(&out), "200", "{out}");
        let me: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
        assert_eq!(me["session"], true, "{me}");
        csrf.push(me["csrf"].as_str().unwrap().to_owned());
    }
    assert_eq!(csrf[0], csrf[1]);

    // The attack: with write access to etcd, the stored session copied
    // under the digest of an id of the attacker's own choosing, and one
    // whose lifetime was lengthened. Neither is a session: the seal
    // covers the key and the lifetime.
    let store = etcd.store();
    let (key, value) = store
        .scan(Space::Console, b"session/", b"")
        .map(Result::unwrap)
        .next()
        .expect("the session is in etcd");
    let forged_sid = "f".repeat(64);
    let digest = ring::digest::digest(&ring::digest::SHA256, forged_sid.as_bytes());
    let forged_key: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    let mut longer = value.clone();
    longer[..8].copy_from_slice(&u64::MAX.to_be_bytes());
    let put = |k: Vec<u8>, v: Vec<u8>| {
        store
            .commit(Commit::writes(vec![provisioning::store::Write {
                space: Space::Console,
                key: k,
                value: Some(v),
            }]))
            .unwrap()
    };
    assert!(put(
        format!("session/{forged_key}").into_bytes(),
        value.clone()
    ));
    let out = curl(
        &two,
        &[
            "-H",
            &format!("Cookie: __Host-fleetgate-console={forged_sid}"),
        ],
        "/console/api/me",
    );
    assert_eq!(status(&out), "401", "a copied session was taken: {out}");
    assert!(two.wait_for_log("did not make", Duration::from_secs(5)));
    assert!(put(key.clone(), longer));
    let out = curl(&one, &["-H", &cookie], "/console/api/me");
    assert_eq!(status(&out), "401", "a lengthened session was taken: {out}");
    assert!(put(key, value));

    // Signing out on node two ends the session on node one too.
    let out = curl(
        &two,
        &[
            "-X",
            "POST",
            "-H",
            &cookie,
            "-H",
            &format!("X-CSRF-Token: {}", csrf[0]),
            "-H",
            "Sec-Fetch-Site: same-origin",
        ],
        "/console/logout",
    );
    assert_eq!(status(&out), "204", "{out}");
    let out = curl(&one, &["-H", &cookie], "/console/api/me");
    assert_eq!(status(&out), "401", "{out}");
}

/// A device connected to node two is shown connected, with node two's
/// name, by the console of node one (the device's page and the list,
/// filtered to those connected); an answer injected into NATS by someone
/// without the cluster's key (here: claiming the device is on a node of
/// theirs) is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_of_one_node_shows_a_device_connected_to_another_and_on_which() {
    let (tmp, _etcd, nats, one, two) = tests::two_nodes(&[]);
    let creds = tmp.path().join("c");
    let dev = one.enroll(&creds, "device", "dev-1");
    one.enroll(&creds, "device", "dev-2");
    let (_c, mut ev) = client(two.mqtt, &dev, "dev-1");
    connected(&mut ev).await;
    // Node two names itself by its MQTT listener.
    let two_name = format!("({})", two.mqtt);

    // The attack: an answer for every question, from outside the cluster.
    let forged = r#"[{"id":"dev-1","session":{"node":"evil-node","addr":"10.6.6.6:1","protocol":"MQTT 5","serial":"00","since":"2026-01-01T00:00:00Z"}},{"id":"dev-2","session":{"node":"evil-node","addr":"10.6.6.6:2","protocol":"MQTT 5","serial":"00","since":"2026-01-01T00:00:00Z"}}]"#;
    let answered = nats.impostor(0, "fleetgate.ask.sessions", forged);

    let admin = one.admin();
    let page: serde_json::Value = admin.get("/console/api/devices/dev-1").await.unwrap();
    let sessions = page["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 1, "{page}");
    assert!(
        sessions[0]["node"].as_str().unwrap().ends_with(&two_name),
        "{page}"
    );
    let list: serde_json::Value = admin
        .get("/console/api/devices?connected=true")
        .await
        .unwrap();
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{list}");
    assert_eq!(items[0]["id"], "dev-1");
    assert!(
        items[0]["nodes"][0].as_str().unwrap().ends_with(&two_name),
        "{list}"
    );
    let all: serde_json::Value = admin.get("/console/api/devices").await.unwrap();
    let dev2 = all["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == "dev-2")
        .unwrap();
    assert_eq!(dev2["connected"], false, "{all}");
    // The impostor was heard, and its answers dropped.
    assert!(answered.load(std::sync::atomic::Ordering::Relaxed) >= 2);
    assert!(one.wait_for_log("dropped an answer no node sealed", Duration::from_secs(5)));
    assert!(!all.to_string().contains("evil-node"));
    assert!(!page.to_string().contains("evil-node"));
}
