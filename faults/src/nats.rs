//! A NATS cluster with JetStream for a run: a server in each of its
//! members' namespaces, clustered over their addresses; killed when
//! dropped.

use std::path::Path;

use crate::net::Net;
use crate::proc::Proc;

/// Client, cluster and monitoring ports, the same on every address.
pub const CLIENT: u16 = 4222;
const ROUTE: u16 = 6222;
pub const MONITOR: u16 = 8222;

/// The nats-server a run starts: `$FLEETGATE_NATS_SERVER` if set (a
/// current release; `.ci/run` sets it), else `nats-server` on the PATH.
pub fn server() -> String {
    std::env::var("FLEETGATE_NATS_SERVER").unwrap_or_else(|_| "nats-server".into())
}

/// The version of [`server`] (`2.15.1`), as it prints it.
pub fn server_version() -> Option<String> {
    let out = std::process::Command::new(server())
        .arg("--version")
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v = text.split_whitespace().last()?.trim_start_matches('v');
    Some(v.to_owned())
}

/// Whether a nats-server of `version` (`2.9.10`) is 2.10 or later: older
/// ones lose acknowledged messages under the harness's NATS faults (the
/// README, "The cluster under faults").
pub fn keeps_acknowledged(version: &str) -> bool {
    let mut parts = version.split(['.', '-']).map(|p| p.parse::<u32>().ok());
    matches!(
        (parts.next().flatten(), parts.next().flatten()),
        (Some(major), Some(minor)) if (major, minor) >= (2, 10)
    )
}

/// The servers of one NATS cluster.
#[derive(Debug)]
pub struct NatsCluster {
    pub members: Vec<usize>,
    pub procs: Vec<Proc>,
}

impl NatsCluster {
    /// A server in each of `members`, stores and logs under `dir`.
    pub fn start(net: &Net, members: &[usize], dir: &Path) -> anyhow::Result<Self> {
        let server = server();
        let routes = members
            .iter()
            .map(|&m| format!("nats://{}:{ROUTE}", net.addr(m)))
            .collect::<Vec<_>>()
            .join(",");
        let mut procs = Vec::new();
        for (i, &m) in members.iter().enumerate() {
            let addr = net.addr(m);
            let args: Vec<std::ffi::OsString> = vec![
                "-a".into(),
                addr.clone().into(),
                "-p".into(),
                CLIENT.to_string().into(),
                "-m".into(),
                MONITOR.to_string().into(),
                "-js".into(),
                "-sd".into(),
                dir.join(format!("n{i}")).into(),
                "-n".into(),
                format!("n{i}").into(),
                "--cluster_name".into(),
                "fleetgate".into(),
                "--cluster".into(),
                format!("nats://{addr}:{ROUTE}").into(),
                "--routes".into(),
                routes.clone().into(),
            ];
            procs.push(Proc::start(
                net,
                m,
                &format!("nats-{i}"),
                &server,
                args,
                Vec::new(),
                dir.join(format!("n{i}.log")),
            )?);
        }
        Ok(Self {
            members: members.to_vec(),
            procs,
        })
    }

    /// `--nats` for a fleetgate node.
    pub fn url(&self, net: &Net) -> String {
        self.members
            .iter()
            .map(|&m| format!("nats://{}:{CLIENT}", net.addr(m)))
            .collect::<Vec<_>>()
            .join(",")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn releases_from_2_10_keep_what_they_acknowledged() {
        assert!(super::keeps_acknowledged("2.15.1"));
        assert!(super::keeps_acknowledged("2.10.0"));
        assert!(!super::keeps_acknowledged("2.9.10"));
        assert!(!super::keeps_acknowledged("unknown"));
    }
}
