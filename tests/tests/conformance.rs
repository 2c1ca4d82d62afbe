//! The MQTT conformance suite (`tests/conformance/suite.py`), run with an
//! independent client, paho-mqtt 2 for Python (installed by `.ci/run`),
//! and the mosquitto clients. Each group of checks runs against its own
//! fleetgate, so the groups run side by side.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::path::Path;
use std::process::Command;

use tests::{fleetgate_bin, require_tool, Server};

/// Runs the suite's class `group` against a new server started with
/// `extra`; fails with the suite's own report.
fn group(group: &str, extra: &[&str]) {
    require_tool("python3");
    require_tool("mosquitto_pub");
    let paho = Command::new("python3")
        .args(["-c", "import paho.mqtt"])
        .status()
        .expect("python3");
    assert!(
        paho.success(),
        "paho-mqtt is not installed: pip install paho-mqtt==2.1.0 (.ci/run does)"
    );
    let tmp = tempfile::tempdir().unwrap();
    let mut args = vec!["--metrics-listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let server = Server::start_with(&tmp.path().join("data"), &args).unwrap();
    let creds = tmp.path().join("creds");
    std::fs::create_dir_all(&creds).unwrap();
    std::fs::copy(server.data_dir.join("ca.crt"), creds.join("ca.crt")).unwrap();
    let suite = Path::new(env!("CARGO_MANIFEST_DIR")).join("conformance");
    let out = Command::new("python3")
        .args(["-m", "unittest", "-v", &format!("suite.{group}")])
        .current_dir(&suite)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("FG_MQTT", server.mqtt.to_string())
        .env("FG_METRICS", server.metrics.expect("metrics").to_string())
        .env("FG_CREDS", &creds)
        .env("FG_BIN", fleetgate_bin())
        .env("FLEETGATE_API", server.api_url())
        .env("FLEETGATE_DATA_DIR", &server.data_dir)
        .output()
        .expect("running the suite");
    let report = String::from_utf8_lossy(&out.stderr);
    eprintln!("{report}");
    if !out.status.success() {
        let log = server.log();
        let tail = &log[log.len().saturating_sub(60)..];
        panic!(
            "conformance group {group} failed:\n{report}\nserver log (last lines):\n{}",
            tail.join("\n")
        );
    }
    assert!(
        report.contains("\nOK"),
        "the suite did not report OK: {report}"
    );
}

#[test]
fn identity() {
    group("TestIdentity", &[]);
}

#[test]
fn qos() {
    group("TestQoS", &[]);
}

#[test]
fn topic_aliases() {
    group("TestTopicAliases", &[]);
}

#[test]
fn sessions() {
    group("TestSessions", &[]);
}

#[test]
fn subscription_options() {
    group("TestSubscriptionOptions", &[]);
}

#[test]
fn flow_control() {
    group("TestFlowControl", &[]);
}

#[test]
fn wills() {
    group("TestWills", &[]);
}

#[test]
fn reason_strings() {
    group("TestReasonStrings", &[]);
}

#[test]
fn protocol_errors() {
    group("TestProtocolErrors", &[]);
}

#[test]
fn limits() {
    group(
        "TestLimits",
        &["--max-subscriptions", "20", "--new-topics-per-minute", "30"],
    );
}
