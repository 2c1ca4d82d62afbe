//! The `fleetgate` binary's start-up contract: bad configuration exits 64
//! with a message that names the problem.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::process::Command;

fn fleetgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fleetgate"))
}

#[test]
fn a_data_dir_that_is_not_ours_exits_64() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("notes.txt"), "hello").unwrap();
    let out = fleetgate()
        .args([
            "serve",
            "--api-listen",
            "127.0.0.1:0",
            "--mqtt-listen",
            "127.0.0.1:0",
        ])
        .args(["--ocsp-listen", "127.0.0.1:0", "--data-dir"])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("fleetgate.json"), "{err}");
}

#[test]
fn a_port_in_use_exits_64() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let tmp = tempfile::tempdir().unwrap();
    let out = fleetgate()
        .args([
            "serve",
            "--api-listen",
            &addr,
            "--mqtt-listen",
            "127.0.0.1:0",
        ])
        .args(["--ocsp-listen", "127.0.0.1:0", "--data-dir"])
        .arg(tmp.path().join("data"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&addr), "{err}");
}

#[test]
fn usage_errors_are_reported_by_clap() {
    let out = fleetgate()
        .args(["serve", "--api-listen", "not-an-address"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = fleetgate()
        .args(["device", "enroll", "dev-1"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("--out"));
}
