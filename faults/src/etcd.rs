//! etcd members of a run, each in its namespace of the run's network
//! ([`crate::net`]), on its own address with etcd's usual ports; killed
//! when dropped. Their health is asked from inside the network.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::Context;

use crate::net::Net;

/// Client and peer ports, the same on every member's address.
const CLIENT: u16 = 2379;
const PEER: u16 = 2380;

/// The members of one etcd cluster.
#[derive(Debug)]
pub struct EtcdCluster {
    /// The network members each runs in.
    pub members: Vec<usize>,
    children: Vec<Option<Child>>,
    dir: PathBuf,
    initial: String,
}

impl EtcdCluster {
    /// Starts a member in each of `members` (network members), data under
    /// `dir`.
    pub fn start(net: &Net, members: &[usize], dir: &Path) -> anyhow::Result<Self> {
        let initial = members
            .iter()
            .map(|&m| format!("m{m}=http://{}:{PEER}", net.addr(m)))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = Self {
            members: members.to_vec(),
            children: Vec::new(),
            dir: dir.to_owned(),
            initial,
        };
        for i in 0..members.len() {
            let child = cluster.spawn(net, i, "new")?;
            cluster.children.push(Some(child));
        }
        Ok(cluster)
    }

    fn spawn(&self, net: &Net, i: usize, state: &str) -> anyhow::Result<Child> {
        let m = self.members[i];
        let addr = net.addr(m);
        let data = self.dir.join(format!("m{m}"));
        let log =
            std::fs::File::create(self.dir.join(format!("m{m}.log"))).context("etcd's log file")?;
        net.command(m, "etcd")
            .args(["--name", &format!("m{m}"), "--data-dir"])
            .arg(&data)
            .args([
                "--listen-client-urls",
                &format!("http://{addr}:{CLIENT}"),
                "--advertise-client-urls",
                &format!("http://{addr}:{CLIENT}"),
                "--listen-peer-urls",
                &format!("http://{addr}:{PEER}"),
                "--initial-advertise-peer-urls",
                &format!("http://{addr}:{PEER}"),
                "--initial-cluster",
                &self.initial,
                "--initial-cluster-state",
                state,
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting etcd (Debian etcd-server)")
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
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again on its data, after [`EtcdCluster::kill`].
    pub fn restart(&mut self, net: &Net, i: usize) -> anyhow::Result<()> {
        self.kill(i);
        let child = self.spawn(net, i, "existing")?;
        self.children[i] = Some(child);
        Ok(())
    }

    /// A process to pause (SIGSTOP) or kill: member `i`'s pid.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.children[i].as_ref().map(Child::id)
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.children.len() {
            // A paused member is woken so that it can die.
            if let Some(pid) = self.pid(i) {
                let _ = Command::new("kill")
                    .args(["-CONT", &pid.to_string()])
                    .status();
            }
            self.kill(i);
        }
    }
}
