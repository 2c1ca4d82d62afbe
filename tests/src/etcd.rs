//! Real etcd members on loopback ports (Debian `etcd-server`), killed
//! when dropped.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use broker::etcd::EtcdStore;

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `n` members of one cluster, with data under `dir`.
#[derive(Debug)]
pub struct Etcd {
    members: Vec<Child>,
    /// The members' client addresses, `host:port`.
    pub clients: Vec<String>,
    /// How to start each member again (its data stays).
    commands: Vec<Vec<String>>,
}

impl Etcd {
    /// One member.
    pub fn start(dir: &Path) -> Self {
        Self::cluster(dir, 1)
    }

    pub fn cluster(dir: &Path, n: usize) -> Self {
        crate::require_tool("etcd");
        // A port found free can be taken by another test's process before
        // etcd binds it: a member that exits at once is started again, on
        // other ports, in a data dir of its own.
        for attempt in 0..4 {
            if let Some(etcd) = Self::try_cluster(&dir.join(format!("try{attempt}")), n) {
                return etcd;
            }
        }
        panic!("etcd did not start");
    }

    fn try_cluster(dir: &Path, n: usize) -> Option<Self> {
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let initial = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut etcd = Etcd {
            members: Vec::new(),
            clients: Vec::new(),
            commands: Vec::new(),
        };
        for (i, (client, peer)) in ports.iter().enumerate() {
            let client = format!("127.0.0.1:{client}");
            let peer = format!("http://127.0.0.1:{peer}");
            let data = dir.join(format!("m{i}")).to_string_lossy().into_owned();
            let args: Vec<String> = [
                "--data-dir",
                &data,
                "--name",
                &format!("m{i}"),
                "--listen-client-urls",
                &format!("http://{client}"),
                "--advertise-client-urls",
                &format!("http://{client}"),
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
                "--initial-cluster",
                &initial,
                "--initial-cluster-state",
                "new",
            ]
            .map(str::to_owned)
            .to_vec();
            etcd.members.push(spawn(&args));
            etcd.commands.push(args);
            etcd.clients.push(client);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while EtcdStore::connect(etcd.clients.clone(), "probe/").is_err() {
            let exited = etcd
                .members
                .iter_mut()
                .any(|m| matches!(m.try_wait(), Ok(Some(_))));
            if exited {
                for m in &mut etcd.members {
                    let _ = m.kill();
                    let _ = m.wait();
                }
                return None;
            }
            assert!(Instant::now() < deadline, "etcd did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(etcd)
    }

    /// `--store` for a fleetgate node.
    pub fn url(&self) -> String {
        format!("etcd://{}", self.clients.join(","))
    }

    /// A registry store on every member.
    pub fn store(&self) -> EtcdStore {
        EtcdStore::connect(self.clients.clone(), "fleetgate/").expect("etcd store")
    }

    /// Kills member `i`. While a majority is left, returns once it has
    /// a leader again: etcd refuses requests during the election, as
    /// fleetgate then does (503, nothing acknowledged).
    pub fn kill(&mut self, i: usize) {
        let _ = self.members[i].kill();
        let _ = self.members[i].wait();
        let live: Vec<String> = self
            .members
            .iter_mut()
            .zip(&self.clients)
            .filter_map(|(m, c)| matches!(m.try_wait(), Ok(None)).then(|| c.clone()))
            .collect();
        if live.len() * 2 > self.members.len() {
            // A linearizable read: it needs a leader (waits up to 30 s).
            EtcdStore::connect(live, "probe/").expect("the members left elect a leader");
        }
    }

    /// Starts member `i` again on its data, after [`Etcd::kill`].
    pub fn restart(&mut self, i: usize) {
        self.members[i] = spawn(&self.commands[i]);
    }
}

fn spawn(args: &[String]) -> Child {
    Command::new("etcd")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting etcd")
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for m in &mut self.members {
            let _ = m.kill();
            let _ = m.wait();
        }
    }
}
