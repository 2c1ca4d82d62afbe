//! The Debian package as an operator installs it: `cargo deb -p broker`
//! builds it, `dpkg -i` installs it on this machine, the files, owners and
//! modes are checked, the systemd unit's ExecStart runs as the `fleetgate`
//! user (systemd itself may be absent: the command line the unit names is
//! run), and `dpkg -r` / `dpkg -P` remove it. Needs root, dpkg and
//! cargo-deb (`.ci/run` installs it).

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::io::{BufRead, BufReader};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};

use tests::{require_tool, run};

fn owner_mode(path: &str) -> (String, u32) {
    let (ok, out) = run(Command::new("stat").args(["-c", "%U:%G", path]));
    assert!(ok, "{path}: {out}");
    let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o7777;
    (out.trim().to_owned(), mode)
}

#[test]
fn the_debian_package_installs_runs_as_its_user_and_removes_cleanly() {
    require_tool("dpkg");
    assert_eq!(
        std::fs::metadata("/proc/self").unwrap().uid(),
        0,
        "installing a package needs root"
    );
    let (ok, out) = run(Command::new("cargo").args(["deb", "--version"]));
    assert!(ok, "cargo-deb is missing (cargo install cargo-deb): {out}");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let tmp = tempfile::tempdir().unwrap();
    // The binary the tests run (debug), packaged as a release would be.
    let (ok, out) = run(Command::new("cargo")
        .current_dir(&root)
        .args([
            "deb",
            "-p",
            "broker",
            "--profile",
            "dev",
            "--no-build",
            "-o",
        ])
        .arg(tmp.path()));
    assert!(ok, "cargo deb: {out}");
    let deb = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .unwrap();
    let name = deb.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with("fleetgate_") && name.ends_with("_amd64.deb"),
        "{name}"
    );

    // A clean slate (an earlier run's leftovers), then install.
    let _ = run(Command::new("dpkg").args(["-P", "fleetgate"]));
    let _ = std::fs::remove_dir_all("/var/lib/fleetgate");
    let (ok, out) = run(Command::new("dpkg").arg("-i").arg(&deb));
    assert!(ok, "dpkg -i: {out}");

    let (ok, user) = run(Command::new("getent").args(["passwd", "fleetgate"]));
    assert!(ok, "no fleetgate user: {user}");
    let fields: Vec<&str> = user.trim().split(':').collect();
    assert!(
        fields[2].parse::<u32>().unwrap() < 1000,
        "not a system user: {user}"
    );
    assert_eq!(fields[5], "/var/lib/fleetgate", "{user}");
    assert!(fields[6].ends_with("nologin"), "{user}");
    assert_eq!(
        owner_mode("/usr/bin/fleetgate"),
        ("root:root".into(), 0o755)
    );
    assert_eq!(
        owner_mode("/etc/fleetgate/fleetgate.toml"),
        ("root:fleetgate".into(), 0o640)
    );
    assert_eq!(
        owner_mode("/var/lib/fleetgate"),
        ("fleetgate:fleetgate".into(), 0o700)
    );
    let unit_path = "/usr/lib/systemd/system/fleetgate.service";
    let unit = std::fs::read_to_string(unit_path).unwrap();
    for line in [
        "User=fleetgate",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "ReadWritePaths=/var/lib/fleetgate",
        "LimitNOFILE=",
        "AmbientCapabilities=\n",
    ] {
        assert!(unit.contains(line), "the unit lacks {line:?}:\n{unit}");
    }
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok()
    {
        let (ok, out) = run(Command::new("systemd-analyze").args(["verify", unit_path]));
        assert!(ok, "systemd-analyze verify: {out}");
    }
    let (ok, out) = run(Command::new("/usr/bin/fleetgate").args([
        "check",
        "--config",
        "/etc/fleetgate/fleetgate.toml",
    ]));
    assert!(ok, "the packaged configuration: {out}");

    // The unit's ExecStart, as its user, in its working directory (ports
    // moved to free ones through the environment, which wins over the file).
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap();
    let argv: Vec<&str> = exec.split_whitespace().collect();
    require_tool("setpriv");
    let mut node = Command::new("setpriv")
        .args([
            "--reuid=fleetgate",
            "--regid=fleetgate",
            "--init-groups",
            "--",
        ])
        .args(&argv)
        .current_dir("/var/lib/fleetgate")
        .env("FLEETGATE_API_LISTEN", "127.0.0.1:0")
        .env("FLEETGATE_MQTT_LISTEN", "127.0.0.1:0")
        .env("FLEETGATE_OCSP_LISTEN", "127.0.0.1:0")
        .env_remove("FLEETGATE_DATA_DIR")
        .env_remove("FLEETGATE_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(node.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(
        first.starts_with("listening "),
        "ExecStart did not start: {first}"
    );
    let (ok, out) = run(Command::new("kill").args(["-TERM", &node.id().to_string()]));
    assert!(ok, "{out}");
    let status = node.wait().unwrap();
    assert!(status.success(), "{status}");
    assert_eq!(
        owner_mode("/var/lib/fleetgate/ca/root.key"),
        ("fleetgate:fleetgate".into(), 0o600)
    );
    assert!(Path::new("/var/lib/fleetgate/fleetgate.json").exists());

    // Remove: the files go, the configuration stays until purge, the CA
    // and registry stay after it (a fleet's identity is not removed by
    // removing a package).
    let (ok, out) = run(Command::new("dpkg").args(["-r", "fleetgate"]));
    assert!(ok, "dpkg -r: {out}");
    assert!(!Path::new("/usr/bin/fleetgate").exists());
    assert!(!Path::new(unit_path).exists());
    assert!(Path::new("/etc/fleetgate/fleetgate.toml").exists());
    let (ok, out) = run(Command::new("dpkg").args(["-P", "fleetgate"]));
    assert!(ok, "dpkg -P: {out}");
    assert!(!Path::new("/etc/fleetgate").exists(), "{out}");
    assert!(
        out.contains("/var/lib/fleetgate (the CA and the registry) is kept"),
        "{out}"
    );
    assert!(Path::new("/var/lib/fleetgate/fleetgate.json").exists());
    let (_, status) = run(Command::new("dpkg").args(["-s", "fleetgate"]));
    assert!(
        status.contains("not installed") || !status.contains("Status: install"),
        "{status}"
    );
    std::fs::remove_dir_all("/var/lib/fleetgate").unwrap();
}
