//! Operating fleetgate as an operator would: a configuration file (`serve
//! --config`, `config example`, `check --config`, SIGHUP), checked with the
//! real binary.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tests::{fleetgate_bin, run};

fn fleetgate(args: &[&str]) -> (bool, i32, String) {
    let out = Command::new(fleetgate_bin())
        .args(args)
        .env_remove("FLEETGATE_LOG")
        .output()
        .unwrap();
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), out.status.code().unwrap_or(-1), text)
}

/// `fleetgate serve ARGS` with nothing from the test's environment that a
/// file could set: its first stdout line, and its log as it comes.
struct Node {
    child: Child,
    listening: String,
    log: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Node {
    fn start(args: &[&str], envs: &[(&str, &str)]) -> Result<Self, String> {
        let mut child = Command::new(fleetgate_bin())
            .arg("serve")
            .args(args)
            .envs(envs.iter().copied())
            .env_remove("FLEETGATE_LOG")
            .env_remove("FLEETGATE_DATA_DIR")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, log) = mpsc::channel();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut listening = String::new();
        let _ = out.read_line(&mut listening);
        if listening.is_empty() {
            let status = child.wait().unwrap();
            let log: Vec<String> = log.try_iter().collect();
            return Err(format!("exit {:?}: {}", status.code(), log.join("\n")));
        }
        Ok(Self {
            child,
            listening,
            log,
            seen: Vec::new(),
        })
    }

    fn wait_for(&mut self, needle: &str) -> Option<String> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(l) = self.seen.iter().find(|l| l.contains(needle)) {
                return Some(l.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(l) => self.seen.push(l),
                Err(_) => return None,
            }
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

#[test]
fn the_example_file_is_valid_and_names_every_option() {
    let tmp = tempfile::tempdir().unwrap();
    let (ok, _, example) = fleetgate(&["config", "example"]);
    assert!(ok, "{example}");
    for key in [
        "api-listen",
        "mqtt-listen",
        "data-dir",
        "pin-file",
        "store",
        "log-level",
    ] {
        assert!(
            example.contains(&format!("# {key} =")),
            "{key} missing:\n{example}"
        );
    }
    let f = tmp.path().join("fleetgate.toml");
    write(&f, &example);
    let (ok, code, out) = fleetgate(&["check", "--config", f.to_str().unwrap()]);
    assert!(ok, "{code}: {out}");
    // Every default uncommented is still a valid file.
    let live: String = example
        .lines()
        .filter_map(|l| l.strip_prefix("# "))
        .filter(|l| {
            l.split_once(" = ").is_some_and(|(k, v)| {
                k.chars().all(|c| c.is_ascii_lowercase() || c == '-') && !v.contains("no default")
            })
        })
        .map(|l| format!("{l}\n"))
        .collect();
    write(&f, &live);
    let (ok, code, out) = fleetgate(&["check", "--config", f.to_str().unwrap()]);
    assert!(ok, "{code}: {out}\n{live}");
}

#[test]
fn bad_files_are_refused_with_the_file_line_and_key() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("bad.toml");
    let fs = f.to_str().unwrap();
    for (text, says) in [
        (
            "# node 1\napi-listen = \"127.0.0.1:0\"\nmqtt-listen = \"nowhere:x\"\n",
            ":3: mqtt-listen: bad value",
        ),
        (
            "max-conections = 10\n",
            ":1: max-conections: no such option",
        ),
        (
            "store_staleness_secs = 5\n",
            "did you mean store-staleness-secs?",
        ),
        ("max-connections = -1\n", ":1: max-connections: bad value"),
        ("api-listen = [\"a\", \"b\"]\n", "takes one value"),
        ("api-listen = \n", ":1: not TOML"),
    ] {
        write(&f, text);
        let (ok, code, out) = fleetgate(&["check", "--config", fs]);
        assert!(!ok && code == 64, "{text}: {code} {out}");
        assert!(out.contains(fs) && out.contains(says), "{text}: {out}");
        // serve refuses it the same way, before touching anything.
        let data = tmp.path().join("never");
        let (ok, code, out) = fleetgate(&[
            "serve",
            "--config",
            fs,
            "--data-dir",
            data.to_str().unwrap(),
        ]);
        assert!(!ok && code == 64, "{text}: {code} {out}");
        assert!(out.contains(says), "{text}: {out}");
        assert!(!data.exists(), "serve made a data dir from a refused file");
    }
}

#[test]
fn serve_takes_the_file_the_command_line_wins_and_sighup_applies_log_level_and_limits() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("fleetgate.toml");
    let data = tmp.path().join("data");
    // A port in use: the file's value would fail; the command line's wins.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap();
    let file = |level: &str, max: u32, subs: u32| {
        format!(
            "data-dir = \"{}\"\napi-listen = \"127.0.0.1:0\"\nmqtt-listen = \"{taken}\"\n\
             ocsp-listen = \"{taken}\"\nmetrics-listen = \"127.0.0.1:0\"\n\
             log-level = \"{level}\"\nmax-connections = {max}\naudit-seal-secs = 1\n\
             max-subscriptions = {subs}\n",
            data.display()
        )
    };
    write(&f, &file("info", 1000, 10));
    let fs = f.to_str().unwrap();
    // mqtt-listen from the command line, ocsp-listen from its variable.
    let mut node = Node::start(
        &["--config", fs, "--mqtt-listen", "127.0.0.1:0"],
        &[("FLEETGATE_OCSP_LISTEN", "127.0.0.1:0")],
    )
    .unwrap();
    // The file's metrics listener is there; its data dir was made.
    assert!(
        node.listening.contains("metrics=127.0.0.1:"),
        "{}",
        node.listening
    );
    assert!(data.join("fleetgate.json").exists());
    assert!(
        !node.listening.contains(&taken.to_string()),
        "{}",
        node.listening
    );

    // A request that ends in an error is logged at debug level only: not
    // at "info".
    let metrics = node
        .listening
        .split_whitespace()
        .find_map(|w| w.strip_prefix("metrics="))
        .unwrap()
        .to_owned();
    let garbage = || {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(&metrics).unwrap();
        c.write_all(b"NOT HTTP AT ALL\r\n\r\n").unwrap();
        let mut sink = Vec::new();
        let _ = c.read_to_end(&mut sink);
    };
    garbage();

    // SIGHUP: the new log level applies at once; the rest says restart.
    // A device holding a connection, with two subscriptions granted.
    let api = node
        .listening
        .split_whitespace()
        .find_map(|w| w.strip_prefix("api="))
        .unwrap()
        .to_owned();
    let mqtt_port: u16 = node
        .listening
        .split_whitespace()
        .find_map(|w| w.strip_prefix("mqtt="))
        .and_then(|a| a.rsplit(':').next())
        .unwrap()
        .parse()
        .unwrap();
    let devs = tmp.path().join("devs");
    let (ok, _, out) = fleetgate(&[
        "device",
        "enroll",
        "dev-1",
        "--out",
        devs.to_str().unwrap(),
        "--api",
        &format!("https://{api}"),
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    let subscribe_two = |n: u32| -> String {
        let script = format!(
            r#"
import threading
import paho.mqtt.client as mqtt
got = threading.Event(); codes = []
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="dev-1", protocol=mqtt.MQTTv5)
c.tls_set(ca_certs={ca:?}, certfile={crt:?}, keyfile={key:?})
c.on_connect = lambda cl, u, f, rc, p: cl.subscribe([("devices/dev-1/a{n}", 1), ("devices/dev-1/b{n}", 1)])
def on_subscribe(cl, u, mid, rcs, p):
    codes.extend(r.value for r in rcs); got.set()
c.on_subscribe = on_subscribe
c.connect("127.0.0.1", {port}); c.loop_start()
assert got.wait(10), "no SUBACK"
print(*codes); c.disconnect(); c.loop_stop()
"#,
            ca = devs.join("ca.crt").to_str().unwrap(),
            crt = devs.join("dev-1.crt").to_str().unwrap(),
            key = devs.join("dev-1.key").to_str().unwrap(),
            port = mqtt_port,
        );
        let (ok, out) = run(Command::new("python3").args(["-c", &script]));
        assert!(ok, "{out}");
        out.trim().to_owned()
    };
    assert_eq!(subscribe_two(1), "1 1");

    write(&f, &file("debug", 2000, 1));
    let (ok, out) = run(Command::new("kill").args(["-HUP", &node.child.id().to_string()]));
    assert!(ok, "{out}");
    let said = node
        .wait_for("configuration file:")
        .expect("no reload line");
    assert!(said.contains("applied log-level = \"debug\""), "{said}");
    assert!(said.contains("max-subscriptions = \"1\""), "{said}");
    assert!(said.contains("needs a restart: max-connections"), "{said}");
    garbage();
    assert!(
        node.wait_for("DEBUG").is_some(),
        "no debug line after the reload: {:?}",
        node.seen
    );
    // One subscription a session now: the second is refused (0x97).
    assert_eq!(subscribe_two(2), "1 151");
    let at = |needle: &str| node.seen.iter().position(|l| l.contains(needle)).unwrap();
    assert!(
        at("DEBUG") > at("configuration file:"),
        "debug lines before the reload: {:?}",
        node.seen
    );

    // A broken file on SIGHUP is refused; the node runs on.
    write(&f, "max-connections = \"lots\"\n");
    run(Command::new("kill").args(["-HUP", &node.child.id().to_string()]));
    let said = node
        .wait_for("configuration file is refused")
        .expect("no refusal");
    assert!(said.contains("max-connections"), "{said}");
    assert!(node.child.try_wait().unwrap().is_none());
}

/// `promtool` (Debian `prometheus`) on what an operator loads: a live
/// scrape passes `check metrics`; the alerting rules pass `check rules` and
/// their unit tests, every alert has one, and every metric the rules and
/// the Grafana dashboard name is one the node exports.
#[test]
fn monitoring_loads_as_prometheus_and_grafana_users_would() {
    use std::io::Write;
    tests::require_tool("promtool");
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let tmp = tempfile::tempdir().unwrap();
    let server = tests::Server::start_with(
        &tmp.path().join("data"),
        &["--metrics-listen", "127.0.0.1:0"],
    )
    .unwrap();
    let dev = server.enroll(&tmp.path().join("d"), "device", "dev-1");
    let st = server
        .mosquitto("mosquitto_pub", &dev)
        .args(["-t", "devices/dev-1/telemetry", "-m", "1"])
        .status()
        .unwrap();
    assert!(st.success());
    server.cli_ok(&["device", "revoke", "dev-1"]);
    let url = format!("http://{}/metrics", server.metrics.unwrap());
    let (ok, scrape) = run(Command::new("curl").args(["-sf", &url]));
    assert!(ok, "{scrape}");
    for expiry in ["root_ca", "issuing_ca", "server", "ocsp_signer"] {
        assert!(
            scrape.contains(&format!(
                "fleetgate_certificate_expiry_timestamp_seconds{{certificate=\"{expiry}\"}} "
            )),
            "{expiry}: {scrape}"
        );
    }
    assert!(
        scrape.contains("fleetgate_revocation_apply_seconds_count 1"),
        "{scrape}"
    );
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(scrape.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let rules = deploy.join("prometheus/fleetgate-rules.yml");
    let (ok, out) = run(Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&rules));
    assert!(ok, "{out}");
    let (ok, out) = run(Command::new("promtool")
        .args(["test", "rules"])
        .arg(deploy.join("prometheus/fleetgate-rules.test.yml")));
    assert!(ok && out.contains("SUCCESS"), "{out}");

    // Every alert has a unit test.
    let rules_text = std::fs::read_to_string(&rules).unwrap();
    let tests_text =
        std::fs::read_to_string(deploy.join("prometheus/fleetgate-rules.test.yml")).unwrap();
    let names = |text: &str, key: &str| -> std::collections::BTreeSet<String> {
        text.lines()
            .filter_map(|l| l.trim().strip_prefix(key))
            .map(|n| n.trim().to_owned())
            .collect()
    };
    let alerts = names(&rules_text, "- alert:");
    assert!(alerts.len() >= 12, "{alerts:?}");
    assert_eq!(alerts, names(&tests_text, "alertname:"));

    // Every metric named in the rules and the dashboard is exported.
    let dashboard = std::fs::read_to_string(deploy.join("grafana/fleetgate.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    assert!(json["panels"].as_array().unwrap().len() >= 8);
    for text in [&rules_text, &dashboard] {
        for (i, _) in text.match_indices("fleetgate_") {
            let name: String = text[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            assert!(
                scrape.lines().any(|l| l.starts_with(&name)),
                "{name} is not exported:\n{scrape}"
            );
        }
    }
}

/// The README's configuration and monitoring examples, run as printed.
#[test]
fn the_readme_configuration_and_monitoring_examples_work_as_printed() {
    tests::require_tool("promtool");
    let bin = fleetgate_bin();
    let path = format!(
        "{}:{}",
        bin.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let tmp = tempfile::tempdir().unwrap();
    let block = tests::readme_example("fleetgate config example > fleetgate.toml");
    let (ok, out) = run(Command::new("bash")
        .args(["-euo", "pipefail", "-c", &block])
        .current_dir(tmp.path())
        .env("PATH", &path)
        .env_remove("FLEETGATE_LOG"));
    assert!(ok, "the README's configuration example failed:\n{out}");
    assert!(out.contains("a valid configuration"), "{out}");
    let text = std::fs::read_to_string(tmp.path().join("fleetgate.toml")).unwrap();
    assert!(
        text.contains("# api-listen = ") && text.contains("\nsan = ["),
        "{text}"
    );

    let block = tests::readme_example("promtool check rules deploy/prometheus/fleetgate-rules.yml");
    let (ok, out) = run(Command::new("bash")
        .args(["-euo", "pipefail", "-c", &block])
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("..")));
    assert!(
        ok && out.contains("SUCCESS"),
        "the README's monitoring example failed:\n{out}"
    );
}
