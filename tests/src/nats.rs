//! Real NATS servers with JetStream on loopback ports (Debian
//! `nats-server`), killed when dropped.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::etcd::free_port;

/// `n` servers of one cluster (`n` = 1: a lone server).
#[derive(Debug)]
pub struct Nats {
    servers: Vec<Child>,
    /// Client ports.
    pub ports: Vec<u16>,
    monitors: Vec<u16>,
    commands: Vec<Vec<String>>,
}

impl Nats {
    pub fn start(dir: &Path) -> Self {
        Self::cluster(dir, 1)
    }

    pub fn cluster(dir: &Path, n: usize) -> Self {
        nats_server();
        // A port found free can be taken by another test's process before
        // the server binds it: one that exits at once is started again,
        // on other ports, with a store of its own.
        for attempt in 0..4 {
            if let Some(nats) = Self::try_cluster(&dir.join(format!("try{attempt}")), n) {
                return nats;
            }
        }
        panic!("nats-server did not start");
    }

    fn try_cluster(dir: &Path, n: usize) -> Option<Self> {
        let ports: Vec<(u16, u16, u16)> = (0..n)
            .map(|_| (free_port(), free_port(), free_port()))
            .collect();
        let routes = ports
            .iter()
            .map(|(_, _, c)| format!("nats://127.0.0.1:{c}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut nats = Nats {
            servers: Vec::new(),
            ports: Vec::new(),
            monitors: Vec::new(),
            commands: Vec::new(),
        };
        for (i, (client, monitor, cluster)) in ports.iter().enumerate() {
            let store: PathBuf = dir.join(format!("n{i}"));
            let mut args: Vec<String> = [
                "-a",
                "127.0.0.1",
                "-p",
                &client.to_string(),
                "-m",
                &monitor.to_string(),
                "-js",
                "-sd",
                &store.to_string_lossy(),
                "-n",
                &format!("n{i}"),
            ]
            .map(str::to_owned)
            .to_vec();
            if n > 1 {
                args.extend(
                    [
                        "--cluster_name",
                        "fleetgate",
                        "--cluster",
                        &format!("nats://127.0.0.1:{cluster}"),
                        "--routes",
                        &routes,
                    ]
                    .map(str::to_owned),
                );
            }
            nats.servers.push(spawn(&args));
            nats.commands.push(args);
            nats.ports.push(*client);
            nats.monitors.push(*monitor);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for i in 0..n {
            while !healthy(nats.monitors[i]) {
                if nats
                    .servers
                    .iter_mut()
                    .any(|s| matches!(s.try_wait(), Ok(Some(_))))
                {
                    return None;
                }
                assert!(Instant::now() < deadline, "nats-server {i} not healthy");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Some(nats)
    }

    /// One server with JetStream and `config` (a nats-server
    /// configuration: `tls`, `authorization`, ...) written to
    /// `dir/nats.conf`; its ports are chosen here.
    pub fn with_config(dir: &Path, config: &str) -> Self {
        nats_server();
        std::fs::create_dir_all(dir).expect("nats dir");
        let conf = dir.join("nats.conf");
        std::fs::write(&conf, config).expect("writing nats.conf");
        let (client, monitor) = (free_port(), free_port());
        let args: Vec<String> = [
            "-c",
            &conf.to_string_lossy(),
            "-a",
            "127.0.0.1",
            "-p",
            &client.to_string(),
            "-m",
            &monitor.to_string(),
            "-js",
            "-sd",
            &dir.join("n0").to_string_lossy(),
        ]
        .map(str::to_owned)
        .to_vec();
        let nats = Nats {
            servers: vec![spawn(&args)],
            ports: vec![client],
            monitors: vec![monitor],
            commands: vec![args],
        };
        nats.wait_healthy(0);
        nats
    }

    /// `--nats` with TLS: `tls://` URLs.
    pub fn tls_url(&self) -> String {
        self.url().replace("nats://", "tls://")
    }

    /// Waits until server `i` says JetStream is ready.
    pub fn wait_healthy(&self, i: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !healthy(self.monitors[i]) {
            assert!(Instant::now() < deadline, "nats-server {i} not healthy");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `--nats` for a fleetgate node.
    pub fn url(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn kill(&mut self, i: usize) {
        let _ = self.servers[i].kill();
        let _ = self.servers[i].wait();
    }

    pub fn restart(&mut self, i: usize) {
        self.servers[i] = spawn(&self.commands[i]);
        self.wait_healthy(i);
    }
}

/// The nats-server to run: `$FLEETGATE_NATS_SERVER` if set (`.ci/run`
/// sets it to a current release), else `nats-server` on the PATH.
pub fn nats_server() -> PathBuf {
    match std::env::var_os("FLEETGATE_NATS_SERVER") {
        Some(p) => PathBuf::from(p),
        None => crate::require_tool("nats-server"),
    }
}

fn spawn(args: &[String]) -> Child {
    Command::new(nats_server())
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting nats-server")
}

impl Nats {
    /// How many messages stream `name` holds, as server `i`'s
    /// monitoring endpoint says (`None`: no such stream there).
    pub fn stream_messages(&self, i: usize, name: &str) -> Option<u64> {
        let body = get(self.monitors[i], "/jsz?accounts=true&streams=true")?;
        let body = body.split_once("\r\n\r\n")?.1;
        let v: serde_json::Value = serde_json::from_str(body).ok()?;
        v["account_details"]
            .as_array()?
            .iter()
            .flat_map(|a| a["stream_detail"].as_array().into_iter().flatten())
            .find(|s| s["name"] == name)
            .and_then(|s| s["state"]["messages"].as_u64())
    }
}

impl Nats {
    /// Messages handed out and not yet acknowledged, summed over stream
    /// `name`'s consumers whose names start with `prefix`, as server `i`'s
    /// monitoring endpoint says (`None`: no such stream there).
    pub fn ack_pending(&self, i: usize, name: &str, prefix: &str) -> Option<u64> {
        let body = get(
            self.monitors[i],
            "/jsz?accounts=true&streams=true&consumers=true",
        )?;
        let body = body.split_once("\r\n\r\n")?.1;
        let v: serde_json::Value = serde_json::from_str(body).ok()?;
        let stream = v["account_details"]
            .as_array()?
            .iter()
            .flat_map(|a| a["stream_detail"].as_array().into_iter().flatten())
            .find(|s| s["name"] == name)?;
        Some(
            stream["consumer_detail"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|c| c["name"].as_str().is_some_and(|n| n.starts_with(prefix)))
                .filter_map(|c| c["num_ack_pending"].as_u64())
                .sum(),
        )
    }

    /// A request to JetStream's API on server `i`, as any NATS client
    /// (the `nats` CLI) makes it: `subject` (`$JS.API.CONSUMER.DELETE.<stream>.<name>`,
    /// ...) with `payload`; the answer's JSON.
    pub fn js_api(&self, i: usize, subject: &str, payload: &str) -> serde_json::Value {
        use std::io::{BufRead, BufReader};
        let tcp = TcpStream::connect(("127.0.0.1", self.ports[i])).expect("connecting to NATS");
        tcp.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("a read timeout");
        let mut reader = BufReader::new(tcp.try_clone().expect("a second handle"));
        let mut line = String::new();
        reader.read_line(&mut line).expect("NATS's INFO");
        assert!(line.starts_with("INFO"), "{line}");
        let out = format!(
            "CONNECT {{\"verbose\":false,\"pedantic\":false}}\r\nSUB _INBOX.api 1\r\nPUB {subject} _INBOX.api {}\r\n{payload}\r\n",
            payload.len()
        );
        (&tcp).write_all(out.as_bytes()).expect("writing to NATS");
        loop {
            line.clear();
            reader
                .read_line(&mut line)
                .expect("an answer from JetStream");
            assert!(!line.starts_with("-ERR"), "{line}");
            if line.starts_with("PING") {
                (&tcp).write_all(b"PONG\r\n").expect("writing to NATS");
            }
            if let Some(head) = line.strip_prefix("MSG ") {
                let len: usize = head
                    .trim()
                    .rsplit(' ')
                    .next()
                    .and_then(|n| n.parse().ok())
                    .expect("a MSG line's length");
                let mut body = vec![0; len + 2];
                reader.read_exact(&mut body).expect("the answer");
                return serde_json::from_slice(&body[..len]).expect("JetStream's JSON");
            }
        }
    }
}

/// A plain HTTP GET of `path` from the monitoring port, head and body.
fn get(monitor: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", monitor)).ok()?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .ok()?;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    Some(out)
}

fn healthy(monitor: u16) -> bool {
    get(monitor, "/healthz")
        .is_some_and(|out| out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200"))
}

impl Drop for Nats {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
    }
}

impl Nats {
    /// Answers every message on `subject` (server `i`) with `answer`, as
    /// any client that can reach NATS could, until NATS closes the
    /// connection; how many it answered so far is in the counter.
    pub fn impostor(
        &self,
        i: usize,
        subject: &str,
        answer: &str,
    ) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
        use std::io::{BufRead, BufReader};
        let tcp = TcpStream::connect(("127.0.0.1", self.ports[i])).expect("connecting to NATS");
        let mut reader = BufReader::new(tcp.try_clone().expect("a second handle"));
        let mut line = String::new();
        reader.read_line(&mut line).expect("NATS's INFO");
        (&tcp)
            .write_all(
                format!("CONNECT {{\"verbose\":false}}\r\nSUB {subject} 1\r\nPING\r\n").as_bytes(),
            )
            .expect("writing to NATS");
        // Subscribed once the PONG is back.
        loop {
            line.clear();
            reader.read_line(&mut line).expect("NATS's PONG");
            if line.starts_with("PONG") {
                break;
            }
        }
        let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (count, answer) = (answered.clone(), answer.to_owned());
        std::thread::spawn(move || loop {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line.starts_with("PING") {
                let _ = (&tcp).write_all(b"PONG\r\n");
            }
            // HMSG <subject> <sid> <reply> <header len> <total len>
            let parts: Vec<&str> = line.split_whitespace().collect();
            let (reply, len) = match parts.as_slice() {
                ["MSG", _, _, reply, len] => (*reply, *len),
                ["HMSG", _, _, reply, _, len] => (*reply, *len),
                _ => continue,
            };
            let mut body = vec![0; len.parse::<usize>().unwrap_or(0) + 2];
            if reader.read_exact(&mut body).is_err() {
                return;
            }
            let out = format!("PUB {reply} {}\r\n{answer}\r\n", answer.len());
            if (&tcp).write_all(out.as_bytes()).is_err() {
                return;
            }
            count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        });
        answered
    }
}
