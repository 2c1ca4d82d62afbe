//! ARCHITECTURE.md's invariants, checked on the source: where storage may
//! be named, which modules decide without IO, who follows the registry's
//! change feed. A failure names the file and the line that broke one.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// Every `.rs` file under `dir` (relative to the workspace root).
fn sources(dir: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root().join(dir)];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out
}

/// The lines of `file` that are code (not comments), with their numbers.
fn code_lines(file: &Path) -> Vec<(usize, String)> {
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim_start().starts_with("//"))
        .map(|(i, l)| (i + 1, l.to_owned()))
        .collect()
}

fn rel(p: &Path) -> String {
    p.strip_prefix(root()).unwrap().display().to_string()
}

/// Fails listing every code line of `files` that contains any of `needles`.
fn none_contain(files: &[PathBuf], needles: &[&str], rule: &str) {
    let mut broken = Vec::new();
    for f in files {
        for (n, line) in code_lines(f) {
            if needles.iter().any(|x| line.contains(x)) {
                broken.push(format!("{}:{n}: {}", rel(f), line.trim()));
            }
        }
    }
    assert!(broken.is_empty(), "{rule}:\n{}", broken.join("\n"));
}

#[test]
fn only_the_sled_store_names_sled() {
    let allowed = [
        "provisioning/src/store/sled_store.rs",
        // Devices' MQTT sessions: one node's state, beside the registry.
        "provisioning/src/sessions.rs",
        // The one From<sled::Error> into provisioning::Error.
        "provisioning/src/error.rs",
    ];
    let files: Vec<PathBuf> = ["provisioning/src", "broker/src", "firmware-sim/src"]
        .iter()
        .flat_map(|d| sources(d))
        .filter(|f| !allowed.contains(&rel(f).as_str()))
        .collect();
    none_contain(&files, &["sled::"], "sled named outside the sled store");
}

#[test]
fn decisions_do_no_io() {
    let pure = [
        "provisioning/src/lifecycle.rs",
        "provisioning/src/ocsp.rs",
        "provisioning/src/csr.rs",
        "broker/src/mqtt/acl.rs",
        "broker/src/mqtt/codec.rs",
        "broker/src/mqtt/outbox.rs",
        "broker/src/mqtt/acks.rs",
        "broker/src/mqtt/quota.rs",
        "broker/src/mqtt/stamp.rs",
    ]
    .map(|f| root().join(f));
    none_contain(
        &pure,
        &[
            "sled::",
            "std::fs",
            "tokio::net",
            "std::net::Tcp",
            "Registry",
            "spawn_blocking",
        ],
        "IO (or the registry) in a module that only decides",
    );
}

#[test]
fn only_the_events_follower_subscribes_to_the_registry() {
    let files: Vec<PathBuf> = ["broker/src", "provisioning/src"]
        .iter()
        .flat_map(|d| sources(d))
        .filter(|f| {
            !matches!(
                rel(f).as_str(),
                "broker/src/events.rs"
                    | "provisioning/src/registry.rs"
                    | "provisioning/src/events.rs"
            )
        })
        .collect();
    none_contain(
        &files,
        &["registry.subscribe()", ".feed.subscribe()"],
        "the registry's change feed followed outside broker/src/events.rs",
    );
}

#[test]
fn the_fleet_simulator_does_not_link_the_server() {
    let manifest = std::fs::read_to_string(root().join("firmware-sim/Cargo.toml")).unwrap();
    let deps = manifest
        .split("[dependencies]")
        .nth(1)
        .unwrap()
        .split("\n[")
        .next()
        .unwrap();
    assert!(
        deps.lines().any(|l| l.starts_with("fleetgate-api")),
        "firmware-sim should speak to fleetgate through fleetgate-api:\n{deps}"
    );
    assert!(
        !deps.lines().any(|l| l.starts_with("broker")),
        "firmware-sim links the server crate:\n{deps}"
    );
    let files: Vec<PathBuf> = sources("firmware-sim/src");
    none_contain(
        &files,
        &["broker::"],
        "the server's code used by the fleet simulator",
    );
}
