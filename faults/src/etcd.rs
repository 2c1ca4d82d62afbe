//! etcd members of a run, each in its namespace of the run's network
//! ([`crate::net`]), on its own address with etcd's usual ports; killed
//! when dropped. Their health is asked from inside the network.

use std::path::Path;

use crate::net::Net;
use crate::proc::Proc;

/// Client and peer ports, the same on every member's address.
pub const CLIENT: u16 = 2379;
const PEER: u16 = 2380;

/// The members of one etcd cluster.
#[derive(Debug)]
pub struct EtcdCluster {
    /// The network members each runs in.
    pub members: Vec<usize>,
    pub procs: Vec<Proc>,
}

impl EtcdCluster {
    /// Starts a member in each of `members` (network members), data and
    /// logs under `dir`. A restart runs the same command: etcd ignores
    /// `--initial-cluster*` once its data dir holds a member.
    pub fn start(net: &Net, members: &[usize], dir: &Path) -> anyhow::Result<Self> {
        let initial = members
            .iter()
            .map(|&m| format!("m{m}=http://{}:{PEER}", net.addr(m)))
            .collect::<Vec<_>>()
            .join(",");
        let mut procs = Vec::new();
        for (i, &m) in members.iter().enumerate() {
            let addr = net.addr(m);
            let args: Vec<std::ffi::OsString> = vec![
                "--name".into(),
                format!("m{m}").into(),
                "--data-dir".into(),
                dir.join(format!("m{m}")).into(),
                "--listen-client-urls".into(),
                format!("http://{addr}:{CLIENT}").into(),
                "--advertise-client-urls".into(),
                format!("http://{addr}:{CLIENT}").into(),
                "--listen-peer-urls".into(),
                format!("http://{addr}:{PEER}").into(),
                "--initial-advertise-peer-urls".into(),
                format!("http://{addr}:{PEER}").into(),
                "--initial-cluster".into(),
                initial.clone().into(),
                "--initial-cluster-state".into(),
                "new".into(),
            ];
            procs.push(Proc::start(
                net,
                m,
                &format!("etcd-{i}"),
                "etcd",
                args,
                Vec::new(),
                dir.join(format!("m{m}.log")),
            )?);
        }
        Ok(Self {
            members: members.to_vec(),
            procs,
        })
    }

    /// `--store` for a fleetgate node.
    pub fn url(&self, net: &Net) -> String {
        let members: Vec<String> = self
            .members
            .iter()
            .map(|&m| format!("{}:{CLIENT}", net.addr(m)))
            .collect();
        format!("etcd://{}", members.join(","))
    }

    /// Whether member `i` of the cluster says it is healthy (it has a
    /// leader and answers), asked from network member `from`, within 2 s.
    pub fn healthy(&self, net: &Net, from: usize, i: usize) -> bool {
        let url = format!("http://{}:{CLIENT}/health", net.addr(self.members[i]));
        net.command(from, "curl")
            .args(["-s", "-m", "2", &url])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(r#""health":"true""#))
    }

    /// Kills member `i` (kill -9).
    pub fn kill(&mut self, i: usize) {
        self.procs[i].kill();
    }

    /// Starts member `i` again on its data, after [`EtcdCluster::kill`].
    pub fn restart(&mut self, net: &Net, i: usize) -> anyhow::Result<()> {
        self.procs[i].restart(net)
    }

    /// A process to pause (SIGSTOP) or kill: member `i`'s pid.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.procs[i].pid()
    }
}
