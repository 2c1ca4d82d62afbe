//! fleetgate nodes of a run: `fleetgate serve` in each of its members'
//! namespaces on that member's address, sharing the etcd cluster and the
//! NATS cluster; the first makes the CA, each other starts on a copy of its
//! CA files (as the README's cluster section does with tar). Each runs
//! under libfaketime with a clock file of its own, so that its clock can be
//! skewed while it runs.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::net::Net;
use crate::proc::Proc;

pub const MQTT: u16 = 8883;
pub const API: u16 = 8443;
pub const OCSP: u16 = 8080;

const LIBFAKETIME: [&str; 2] = [
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
];

/// What every node is started with.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// The `fleetgate` binary.
    pub bin: PathBuf,
    /// `--store`.
    pub store: String,
    /// `--nats`.
    pub nats: String,
    /// `--store-staleness-secs`.
    pub staleness_secs: u64,
}

/// The nodes.
#[derive(Debug)]
pub struct Nodes {
    pub procs: Vec<Proc>,
    /// Each node's data dir.
    pub dirs: Vec<PathBuf>,
    /// Each node's libfaketime clock file (`+0`, `+2d`, `-300`).
    clocks: Vec<PathBuf>,
}

impl Nodes {
    /// Starts node 0 in `members[0]`, waits for its CA files, then the
    /// others on copies of them; data, clocks and logs under `dir`.
    /// `ready(i)` says whether node `i` answers.
    pub fn start(
        net: &Net,
        members: &[usize],
        dir: &Path,
        cfg: &NodeConfig,
        ready: impl Fn(usize) -> bool,
    ) -> anyhow::Result<Self> {
        let lib = LIBFAKETIME
            .into_iter()
            .find(|p| Path::new(p).exists())
            .context("libfaketime is not installed (apt-get install faketime)")?;
        std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
        let mut nodes = Self {
            procs: Vec::new(),
            dirs: Vec::new(),
            clocks: Vec::new(),
        };
        // Node 0's server certificate names every node's address, and the
        // others start on a copy of it.
        let sans: Vec<String> = members.iter().map(|&m| net.addr(m)).collect();
        for (i, &m) in members.iter().enumerate() {
            let data = dir.join(format!("node-{i}"));
            if i > 0 {
                copy_ca_files(&nodes.dirs[0], &data)?;
            }
            let clock = dir.join(format!("node-{i}.clock"));
            std::fs::write(&clock, "+0\n").with_context(|| format!("{}", clock.display()))?;
            let addr = net.addr(m);
            let mut args: Vec<std::ffi::OsString> = vec!["serve".into(), "--data-dir".into()];
            args.push(data.clone().into());
            for (flag, value) in [
                ("--store", cfg.store.clone()),
                ("--nats", cfg.nats.clone()),
                ("--nats-replicas", "3".into()),
                ("--mqtt-listen", format!("{addr}:{MQTT}")),
                ("--api-listen", format!("{addr}:{API}")),
                ("--ocsp-listen", format!("{addr}:{OCSP}")),
                ("--public-url", format!("http://{addr}:{OCSP}")),
                ("--store-staleness-secs", cfg.staleness_secs.to_string()),
                // Every client of the run comes from one address.
                ("--connect-rate-per-ip", "0".into()),
                ("--http-rate-per-ip", "0".into()),
                ("--http-max-per-ip", "100000".into()),
            ] {
                args.push(flag.into());
                args.push(value.into());
            }
            for s in &sans {
                args.push("--san".into());
                args.push(s.into());
            }
            let envs = vec![
                ("FLEETGATE_LOG".to_owned(), "info,sled=warn".to_owned()),
                ("LD_PRELOAD".to_owned(), lib.to_owned()),
                (
                    "FAKETIME_TIMESTAMP_FILE".to_owned(),
                    clock.display().to_string(),
                ),
                // Read again at most every second, not on every call.
                ("FAKETIME_CACHE_DURATION".to_owned(), "1".to_owned()),
                ("FAKETIME_DONT_FAKE_MONOTONIC".to_owned(), "1".to_owned()),
            ];
            let proc = Proc::start(
                net,
                m,
                &format!("node-{i}"),
                &cfg.bin.display().to_string(),
                args,
                envs,
                dir.join(format!("node-{i}.log")),
            )?;
            nodes.procs.push(proc);
            nodes.dirs.push(data);
            nodes.clocks.push(clock);
            // The first node makes the CA: the others wait for it.
            if i == 0 {
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
                while !ready(0) {
                    if !nodes.procs[0].running() || std::time::Instant::now() > deadline {
                        anyhow::bail!("node 0 did not start:\n{}", nodes.procs[0].log_tail(30));
                    }
                    std::thread::sleep(std::time::Duration::from_millis(200));
                }
            }
        }
        Ok(nodes)
    }

    /// Sets node `i`'s clock `offset` seconds off (0: true time).
    pub fn skew(&self, i: usize, offset: i64) -> anyhow::Result<()> {
        let text = if offset >= 0 {
            format!("+{offset}\n")
        } else {
            format!("{offset}\n")
        };
        std::fs::write(&self.clocks[i], text).context("writing a node's clock file")
    }

    /// Node 0's admin credentials and CA: (ca, cert, key).
    pub fn admin(&self) -> (PathBuf, PathBuf, PathBuf) {
        let d = &self.dirs[0];
        (d.join("ca.crt"), d.join("admin.crt"), d.join("admin.key"))
    }
}

/// What another node gets from the first: its data dir but the registry,
/// the sessions and the operator's admin key (as the README's `tar` line).
fn copy_ca_files(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o700))?;
    let status = std::process::Command::new("sh")
        .args([
            "-c",
            "tar cf - -C \"$1\" --exclude ./registry --exclude ./sessions --exclude ./admin.key . | tar xpf - -C \"$2\"",
            "sh",
        ])
        .arg(from)
        .arg(to)
        .status()
        .context("tar")?;
    anyhow::ensure!(status.success(), "copying the CA files with tar failed");
    Ok(())
}
