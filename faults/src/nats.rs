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

/// The servers of one NATS cluster.
#[derive(Debug)]
pub struct NatsCluster {
    pub members: Vec<usize>,
    pub procs: Vec<Proc>,
}

impl NatsCluster {
    /// A server in each of `members`, stores and logs under `dir`.
    pub fn start(net: &Net, members: &[usize], dir: &Path) -> anyhow::Result<Self> {
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
                "nats-server",
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
