//! Helpers for fleetgate's end-to-end tests: run the real `fleetgate` binary
//! on free loopback ports against a fresh data dir, drive it with its own CLI,
//! the API client, and outside tools (openssl, curl).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use fleetgate_api::client::ApiClient;

/// The `fleetgate` command under test: this package's copy of the binary
/// (`src/bin/fleetgate-under-test.rs`, the same `broker::cli::main`), which
/// cargo builds before it runs this package's tests, so it is never stale.
pub fn fleetgate_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/fleetgate-under-test
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("fleetgate-under-test"))
        .expect("target dir");
    assert!(bin.exists(), "{} is missing", bin.display());
    bin
}

/// Whether an outside tool is on PATH. CI installs them; a test that needs
/// one fails with a clear message rather than skipping silently.
pub fn require_tool(name: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| panic!("{name} is not installed: run .ci/run, or apt-get install it"))
}

/// A running `fleetgate serve`.
#[derive(Debug)]
pub struct Server {
    child: Child,
    pub api: SocketAddr,
    pub mqtt: SocketAddr,
    pub ocsp: SocketAddr,
    /// With `--metrics-listen`.
    pub metrics: Option<SocketAddr>,
    pub data_dir: PathBuf,
    stderr: mpsc::Receiver<String>,
    seen: std::cell::RefCell<Vec<String>>,
}

impl Server {
    /// Starts `fleetgate serve` on a free port with `data_dir`, and waits
    /// until it says it is listening.
    pub fn start(data_dir: &Path) -> anyhow::Result<Self> {
        Self::start_with(data_dir, &[])
    }

    pub fn start_with(data_dir: &Path, extra: &[&str]) -> anyhow::Result<Self> {
        Self::start_under(&[], data_dir, extra)
    }

    /// [`Server::start_with`], run under `wrapper` (e.g. `prlimit
    /// --nofile=64`): the wrapper must exec the server in its place.
    pub fn start_under(wrapper: &[&str], data_dir: &Path, extra: &[&str]) -> anyhow::Result<Self> {
        Self::start_env(wrapper, data_dir, extra, &[])
    }

    /// [`Server::start_under`] with more environment (e.g. SoftHSM2's
    /// `SOFTHSM2_CONF`).
    pub fn start_env(
        wrapper: &[&str],
        data_dir: &Path,
        extra: &[&str],
        envs: &[(&str, &Path)],
    ) -> anyhow::Result<Self> {
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(fleetgate_bin());
                c
            }
            None => Command::new(fleetgate_bin()),
        };
        let mut child = cmd
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .args([
                "--api-listen",
                "127.0.0.1:0",
                "--mqtt-listen",
                "127.0.0.1:0",
                "--ocsp-listen",
                "127.0.0.1:0",
            ])
            // Every test client comes from 127.0.0.1: no per-address
            // limit, unless a test sets one.
            .args(
                [
                    ["--connect-rate-per-ip", "0"],
                    ["--http-rate-per-ip", "0"],
                    ["--http-max-per-ip", "100000"],
                ]
                .into_iter()
                .filter(|[flag, _]| !extra.contains(flag))
                .flatten(),
            )
            .args(extra)
            .envs(envs.iter().copied())
            .env(
                "FLEETGATE_LOG",
                std::env::var("FLEETGATE_TEST_LOG").unwrap_or_else(|_| "info,sled=warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning fleetgate serve")?;
        let stdout = child.stdout.take().context("stdout")?;
        let stderr = child.stderr.take().context("stderr")?;
        let (err_tx, err_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if err_tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let status = child.wait()?;
                // The process is gone, so its stderr ends: read it to the
                // end (its reader may not have sent it all yet).
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                let mut log = Vec::new();
                while let Ok(l) = err_rx
                    .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
                {
                    log.push(l);
                }
                return Err(anyhow!(
                    "fleetgate serve did not start ({status}):\n{}",
                    log.join("\n")
                ));
            }
        };
        let addr = |key: &str| -> anyhow::Result<SocketAddr> {
            Ok(line
                .split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .ok_or_else(|| anyhow!("no {key} in the first line {line:?}"))?
                .parse()?)
        };
        Ok(Self {
            api: addr("api=")?,
            mqtt: addr("mqtt=")?,
            ocsp: addr("ocsp=")?,
            metrics: addr("metrics=").ok(),
            child,
            data_dir: data_dir.to_owned(),
            stderr: err_rx,
            seen: Default::default(),
        })
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn ocsp_url(&self) -> String {
        format!("http://{}", self.ocsp)
    }

    /// `openssl ocsp` for `cert` (issued by the issuing CA), as a relying
    /// party runs it against this server: stdout and stderr.
    pub fn openssl_ocsp(&self, cert: &Path) -> String {
        require_tool("openssl");
        let (ok, text) = run(Command::new("openssl")
            .arg("ocsp")
            .arg("-issuer")
            .arg(self.data_dir.join("ca/issuing.crt"))
            .arg("-cert")
            .arg(cert)
            .args(["-url", &self.ocsp_url(), "-CAfile"])
            .arg(self.data_dir.join("ca.crt")));
        assert!(ok, "openssl ocsp failed: {text}");
        text
    }

    /// [`Server::openssl_ocsp`] with openssl's clock at `offset` (a
    /// faketime offset such as `+35d`), for a server on a fake clock.
    pub fn openssl_ocsp_at(&self, cert: &Path, offset: &str) -> String {
        // libfaketime itself, not the `faketime` wrapper: the wrapper
        // names a semaphore after its pid, and one left behind by a
        // killed process of the same pid makes it fail ("sem_open: File
        // exists").
        let lib = libfaketime().unwrap_or_else(|e| panic!("{e}"));
        run(Command::new("openssl")
            .env("LD_PRELOAD", lib)
            .env("FAKETIME", offset)
            .args(["ocsp", "-issuer"])
            .arg(self.data_dir.join("ca/issuing.crt"))
            .arg("-cert")
            .arg(cert)
            .args(["-url", &self.ocsp_url(), "-CAfile"])
            .arg(self.data_dir.join("ca.crt")))
        .1
    }

    /// A server on a wall clock the test moves: it reads the offset from
    /// `clock` (`+0d` at first; write e.g. `+35d` to it), while its
    /// timers (monotonic) run as usual. libfaketime.
    pub fn start_on_fake_clock(
        data_dir: &Path,
        clock: &Path,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let lib = libfaketime()?;
        std::fs::write(clock, "+0d\n")?;
        let env = [
            format!("LD_PRELOAD={lib}"),
            format!("FAKETIME_TIMESTAMP_FILE={}", clock.display()),
            "FAKETIME_NO_CACHE=1".into(),
            "FAKETIME_DONT_FAKE_MONOTONIC=1".into(),
        ];
        let mut wrapper = vec!["env"];
        wrapper.extend(env.iter().map(String::as_str));
        Self::start_under(&wrapper, data_dir, extra)
    }

    pub fn api_url(&self) -> String {
        format!("https://{}", self.api)
    }

    /// Runs `fleetgate ARGS` against this server, as an operator would.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(fleetgate_bin())
            .args(args)
            .env("FLEETGATE_API", self.api_url())
            .env("FLEETGATE_DATA_DIR", &self.data_dir)
            .env("FLEETGATE_LOG", "warn")
            .output()
            .expect("running the fleetgate CLI")
    }

    /// Like [`Server::cli`], but the command must succeed; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "fleetgate {args:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Writes a chain and key made elsewhere (by a test CA) as credentials
    /// for `id` in `dir`, beside this server's root.
    pub fn creds(&self, dir: &Path, id: &str, chain: &str, key: &str) -> Creds {
        std::fs::create_dir_all(dir).expect("creds dir");
        std::fs::write(dir.join(format!("{id}.crt")), chain).expect("write crt");
        std::fs::write(dir.join(format!("{id}.key")), key).expect("write key");
        std::fs::copy(self.data_dir.join("ca.crt"), dir.join("ca.crt")).expect("copy ca.crt");
        Creds::in_dir(dir, id)
    }

    /// `fleetgate device show ID --json`.
    pub fn device_json(&self, id: &str) -> serde_json::Value {
        serde_json::from_str(&self.cli_ok(&["device", "show", id, "--json"]))
            .expect("device show --json")
    }

    /// An API client presenting `cert`/`key` (or no certificate).
    pub fn client(&self, identity: Option<(&Path, &Path)>) -> ApiClient {
        fleetgate_api::tls::install_crypto_provider();
        let config = fleetgate_api::tls::client_config(&self.data_dir.join("ca.crt"), identity)
            .expect("client TLS config");
        ApiClient::new(&self.api_url(), config).expect("API client")
    }

    /// An API client with the data dir's admin credentials.
    pub fn admin(&self) -> ApiClient {
        self.client(Some((
            &self.data_dir.join("admin.crt"),
            &self.data_dir.join("admin.key"),
        )))
    }

    /// Enrolls `id` (role device or service) through the CLI into `dir`.
    pub fn enroll(&self, dir: &Path, role: &str, id: &str) -> Creds {
        let out = dir.to_str().expect("utf-8 path");
        self.cli_ok(&[role, "enroll", id, "--out", out]);
        Creds::in_dir(dir, id)
    }

    /// Enrolls device `id` through the CLI into `dir`, with more options
    /// (e.g. `--manufacturer acme`).
    pub fn enroll_with(&self, dir: &Path, id: &str, extra: &[&str]) -> Creds {
        let out = dir.to_str().expect("utf-8 path");
        let mut args = vec!["device", "enroll", id, "--out", out];
        args.extend_from_slice(extra);
        self.cli_ok(&args);
        Creds::in_dir(dir, id)
    }

    /// Everything the server logged so far.
    pub fn log(&self) -> Vec<String> {
        let mut seen = self.seen.borrow_mut();
        seen.extend(self.stderr.try_iter());
        seen.clone()
    }

    /// Waits up to `within` for a log line containing `needle`.
    pub fn wait_for_log(&self, needle: &str, within: Duration) -> bool {
        let deadline = std::time::Instant::now() + within;
        loop {
            if self.log().iter().any(|l| l.contains(needle)) {
                return true;
            }
            if std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, and the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        self.child.wait().expect("waiting for fleetgate")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// libfaketime, to preload.
fn libfaketime() -> anyhow::Result<&'static str> {
    const LIBS: [&str; 2] = [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
    ];
    LIBS.into_iter()
        .find(|p| Path::new(p).exists())
        .context("libfaketime is not installed: run .ci/run, or apt-get install faketime")
}

/// A client process a test started, killed when the test ends however
/// it ends (`mosquitto_sub` retries a closed connection for ever: left
/// running, it outlives the test and its broker).
#[derive(Debug)]
pub struct Reaped(pub std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Server {
    /// `mosquitto_pub`/`mosquitto_sub` (`tool`) against this server's MQTT
    /// listener as `c`.
    pub fn mosquitto(&self, tool: &str, c: &Creds) -> Command {
        require_tool(tool);
        let mut cmd = Command::new(tool);
        cmd.args(["-h", "127.0.0.1", "-p", &self.mqtt.port().to_string()])
            .arg("--cafile")
            .arg(&c.ca)
            .arg("--cert")
            .arg(&c.cert)
            .arg("--key")
            .arg(&c.key);
        cmd
    }
}

/// Copies a node's data dir for another node of a cluster: the same CA,
/// keys and admin credentials, not its own registry files.
pub fn copy_data_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("data dir");
    for e in std::fs::read_dir(from).expect("reading a data dir") {
        let e = e.expect("a data dir entry");
        if e.file_name() == "registry" {
            continue;
        }
        let dst = to.join(e.file_name());
        if e.file_type().expect("a file type").is_dir() {
            copy_data_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), &dst).expect("copying");
        }
    }
}

/// The nodes of one cluster, node `i` started with `args[i]` in
/// `dir/node-<i + 1>`: the first makes the CA, each other starts on a copy
/// of its data dir.
pub fn start_nodes(dir: &Path, args: &[&[&str]]) -> Vec<Server> {
    let mut nodes: Vec<Server> = Vec::new();
    for (i, a) in args.iter().enumerate() {
        let d = dir.join(format!("node-{}", i + 1));
        if let Some(first) = nodes.first() {
            copy_data_dir(&first.data_dir, &d);
        }
        nodes.push(Server::start_with(&d, a).expect("starting a node"));
    }
    nodes
}

/// Two nodes on one etcd member and one NATS server, each node with
/// `extra` flags. (Bound in this order, they drop nodes first.)
pub fn two_nodes(extra: &[&str]) -> (tempfile::TempDir, etcd::Etcd, nats::Nats, Server, Server) {
    let tmp = tempfile::tempdir().expect("a temporary dir");
    let etcd = etcd::Etcd::start(&tmp.path().join("etcd"));
    let nats = nats::Nats::start(&tmp.path().join("nats"));
    let (store, bus) = (etcd.url(), nats.url());
    let mut args: Vec<&str> = vec!["--store", &store, "--nats", &bus];
    args.extend(extra);
    let mut nodes = start_nodes(tmp.path(), &[&args, &args]);
    let two = nodes.pop().expect("node two");
    let one = nodes.pop().expect("node one");
    (tmp, etcd, nats, one, two)
}

/// An admin API client for the server at `api_url` with the admin
/// credentials in `data_dir` (for threads that cannot share a [`Server`]).
pub fn admin_client(api_url: &str, data_dir: &Path) -> ApiClient {
    fleetgate_api::tls::install_crypto_provider();
    let config = fleetgate_api::tls::client_config(
        &data_dir.join("ca.crt"),
        Some((&data_dir.join("admin.crt"), &data_dir.join("admin.key"))),
    )
    .expect("client TLS config");
    ApiClient::new(api_url, config).expect("API client")
}

/// A certificate chain, its key and the CA to trust, as files.
#[derive(Clone, Debug)]
pub struct Creds {
    pub id: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl Creds {
    pub fn in_dir(dir: &Path, id: &str) -> Self {
        Self {
            id: id.to_owned(),
            cert: dir.join(format!("{id}.crt")),
            key: dir.join(format!("{id}.key")),
            ca: dir.join("ca.crt"),
        }
    }

    /// A rustls client config presenting these credentials.
    pub fn client_config(&self) -> std::sync::Arc<rustls::ClientConfig> {
        fleetgate_api::tls::install_crypto_provider();
        fleetgate_api::tls::client_config(&self.ca, Some((&self.cert, &self.key)))
            .expect("client config")
    }
}

/// MQTT clients and probes against a running server.
pub mod mqtt {
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::time::Duration;

    use rumqttc::{AsyncClient, EventLoop, MqttOptions, TlsConfiguration, Transport};
    use rustls_pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::Creds;

    /// rumqttc (MQTT 3.1.1) options for `creds` over mutual TLS: keep-alive
    /// 5 s; tests add clean session, manual acks or a will.
    pub fn options(addr: SocketAddr, creds: &Creds, client_id: &str) -> MqttOptions {
        let mut opts = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            creds.client_config(),
        )));
        opts
    }

    /// A rumqttc (MQTT 3.1.1) client over mutual TLS.
    pub fn client(addr: SocketAddr, creds: &Creds, client_id: &str) -> (AsyncClient, EventLoop) {
        AsyncClient::new(options(addr, creds, client_id), 16)
    }

    /// Polls until CONNACK; panics on anything else.
    pub async fn connected(eventloop: &mut EventLoop) {
        loop {
            match tokio::time::timeout(Duration::from_secs(10), eventloop.poll()).await {
                Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)))) => return,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("connection failed: {e}"),
                Err(_) => panic!("no CONNACK in 10 s"),
            }
        }
    }

    /// Connects as `c` and waits for CONNACK; returns the event loop, to
    /// hold the connection open.
    pub async fn online(addr: SocketAddr, c: &Creds) -> EventLoop {
        let (_client, mut ev) = client(addr, c, &c.id);
        connected(&mut ev).await;
        ev
    }

    /// Whether a connection as `c` is refused: an error, or a CONNACK that
    /// is not success, within 10 s.
    pub async fn refused(addr: SocketAddr, c: &Creds) -> bool {
        let (_client, mut ev) = client(addr, c, &c.id);
        loop {
            match tokio::time::timeout(Duration::from_secs(10), ev.poll()).await {
                Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(a)))) => {
                    return a.code != rumqttc::ConnectReturnCode::Success
                }
                Ok(Ok(_)) => {}
                Ok(Err(_)) => return true,
                Err(_) => panic!("neither admitted nor refused in 10 s"),
            }
        }
    }

    /// Polls until the connection ends; returns the error it ended with.
    pub async fn until_closed(eventloop: &mut EventLoop, within: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, eventloop.poll()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Some(e.to_string()),
                Err(_) => return None,
            }
        }
    }

    /// A 3.1.1 CONNECT with this client id, keep-alive 30 s, clean session.
    pub use firmware_sim::wire::connect as connect_packet;

    /// Opens TLS with `config`, sends `bytes`, and reports what came back:
    /// `Ok(bytes read)` or `Err(the TLS or IO error)`, e.g. a TLS alert.
    pub async fn probe(
        addr: SocketAddr,
        config: Arc<rustls::ClientConfig>,
        bytes: &[u8],
    ) -> Result<Vec<u8>, String> {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let connector = tokio_rustls::TlsConnector::from(config);
        let name = ServerName::IpAddress(addr.ip().into());
        let mut tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        tls.write_all(bytes).await.map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        match tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut buf)).await {
            Ok(Ok(_)) => Ok(buf),
            Ok(Err(e)) if buf.is_empty() => Err(e.to_string()),
            Ok(Err(_)) => Ok(buf),
            Err(_) => Err("timed out".into()),
        }
    }
}

/// The README's code block that starts with the line `start`: its text up
/// to the closing fence, as printed.
pub fn readme_example(start: &str) -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("reading README.md");
    let at = readme
        .find(start)
        .unwrap_or_else(|| panic!("the README has no example starting {start:?}"));
    let block = &readme[at..];
    block[..block.find("```").expect("a closing fence")].to_owned()
}

/// A directory where `fleetgate-data` is `server`'s data dir, as the
/// README's examples expect to run.
pub fn readme_workdir(server: &Server, dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).expect("a work dir");
    std::os::unix::fs::symlink(&server.data_dir, dir.join("fleetgate-data"))
        .expect("linking fleetgate-data");
    dir.to_owned()
}

/// Runs `script` with `bash -euo pipefail` in `dir`: (success, output).
pub fn run_script(dir: &Path, script: &str) -> (bool, String) {
    run(Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .current_dir(dir))
}

/// Runs an outside command, returning (success, stdout + stderr).
pub fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().expect("running an outside command");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// Test PKI: keys and CSRs made in one line.
pub mod pki {
    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SigningKey};

    use std::path::Path;
    use std::sync::Arc;

    use rcgen::{
        BasicConstraints, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyUsagePurpose, SanType,
    };
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use time::OffsetDateTime;

    /// What a test certificate should look like.
    #[derive(Clone, Debug)]
    pub struct Spec {
        pub uri: String,
        pub not_before: OffsetDateTime,
        pub not_after: OffsetDateTime,
        pub client_auth: bool,
        pub is_ca: bool,
        /// Key usage digitalSignature (without it: keyEncipherment only).
        pub digital_signature: bool,
        /// Whether there is an extended key usage extension at all.
        pub eku: bool,
        /// The serial, big-endian; random if `None`.
        pub serial: Option<Vec<u8>>,
        /// The subject's CN.
        pub cn: String,
    }

    impl Spec {
        /// A good device certificate for `id`, valid for a day.
        pub fn device(id: &str) -> Self {
            let now = OffsetDateTime::now_utc();
            Self {
                uri: format!("urn:fleetgate:device:{id}"),
                not_before: now - time::Duration::hours(1),
                not_after: now + time::Duration::days(1),
                client_auth: true,
                is_ca: false,
                digital_signature: true,
                eku: true,
                serial: None,
                cn: "test".into(),
            }
        }
    }

    /// A CA that signs test certificates: the server's own issuing CA (read
    /// from its data dir) or a foreign one.
    pub struct TestCa {
        issuer: Issuer<'static, KeyPair>,
        pub cert_pem: String,
    }

    impl std::fmt::Debug for TestCa {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("TestCa")
        }
    }

    impl TestCa {
        /// The issuing CA of a fleetgate data dir: what it signs chains to
        /// the server's root but is not in its registry.
        pub fn from_data_dir(dir: &Path) -> Self {
            let cert_pem =
                std::fs::read_to_string(dir.join("ca/issuing.crt")).expect("issuing.crt");
            let key = std::fs::read_to_string(dir.join("ca/issuing.key")).expect("issuing.key");
            let key = KeyPair::from_pem(&key).expect("issuing key");
            Self {
                issuer: Issuer::from_ca_cert_pem(&cert_pem, key).expect("issuer"),
                cert_pem,
            }
        }

        /// A CA from its certificate and key, PEM.
        pub fn from_pem(cert_pem: &str, key_pem: &str) -> Self {
            let key = KeyPair::from_pem(key_pem).expect("CA key");
            Self {
                issuer: Issuer::from_ca_cert_pem(cert_pem, key).expect("issuer"),
                cert_pem: cert_pem.to_owned(),
            }
        }

        /// The CA's key, PEM.
        pub fn key_pem(&self) -> String {
            self.issuer.key().serialize_pem()
        }

        /// A plain certificate with CN = `cn` (a proof-of-possession
        /// verification certificate), PEM.
        pub fn sign_cn(&self, cn: &str) -> String {
            let key = KeyPair::generate().expect("key");
            let mut params = CertificateParams::default();
            params.distinguished_name = DistinguishedName::new();
            params.distinguished_name.push(DnType::CommonName, cn);
            params.signed_by(&key, &self.issuer).expect("sign").pem()
        }

        /// A self-signed CA named `cn`, valid until `not_after` (a
        /// manufacturer's own root, to register).
        pub fn self_signed_until(cn: &str, not_after: OffsetDateTime) -> Self {
            let key = KeyPair::generate().expect("key");
            let mut params = CertificateParams::default();
            params.distinguished_name = DistinguishedName::new();
            params.distinguished_name.push(DnType::CommonName, cn);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            params.not_before = OffsetDateTime::now_utc() - time::Duration::hours(1);
            params.not_after = not_after;
            let cert = params.self_signed(&key).expect("self-signed");
            Self {
                cert_pem: cert.pem(),
                issuer: Issuer::new(params, key),
            }
        }

        /// A CA nobody trusts.
        pub fn foreign() -> Self {
            let key = KeyPair::generate().expect("key");
            let mut params = CertificateParams::default();
            params.distinguished_name = DistinguishedName::new();
            params
                .distinguished_name
                .push(DnType::CommonName, "foreign CA");
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            let cert = params.self_signed(&key).expect("self-signed");
            Self {
                cert_pem: cert.pem(),
                issuer: Issuer::new(params, key),
            }
        }

        /// A certificate per `spec`, with a fresh key: (chain PEM, key PEM).
        pub fn issue(&self, spec: &Spec) -> (String, String) {
            let key = KeyPair::generate().expect("key");
            let params = params_for(spec);
            let cert = params.signed_by(&key, &self.issuer).expect("sign");
            (
                format!("{}{}", cert.pem(), self.cert_pem),
                key.serialize_pem(),
            )
        }
    }

    fn params_for(spec: &Spec) -> CertificateParams {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, spec.cn.as_str());
        if let Some(serial) = &spec.serial {
            params.serial_number = Some(rcgen::SerialNumber::from_slice(serial));
        }
        params.subject_alt_names = vec![SanType::URI(spec.uri.clone().try_into().expect("uri"))];
        params.not_before = spec.not_before;
        params.not_after = spec.not_after;
        params.use_authority_key_identifier_extension = true;
        if spec.is_ca {
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::DigitalSignature,
            ];
        } else if spec.digital_signature {
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        } else {
            params.key_usages = vec![KeyUsagePurpose::KeyEncipherment];
        }
        params.extended_key_usages = match (spec.eku, spec.client_auth) {
            (false, _) => vec![],
            (true, true) => vec![ExtendedKeyUsagePurpose::ClientAuth],
            (true, false) => vec![ExtendedKeyUsagePurpose::ServerAuth],
        };
        params
    }

    /// A self-signed client certificate: (cert PEM, key PEM).
    pub fn self_signed(spec: &Spec) -> (String, String) {
        let key = KeyPair::generate().expect("key");
        let cert = params_for(spec).self_signed(&key).expect("self-signed");
        (cert.pem(), key.serialize_pem())
    }

    /// A client config trusting `ca_pem` (the server's root) and presenting
    /// `(chain, key)` if given.
    pub fn client_config(
        ca_pem: &[u8],
        identity: Option<(&str, &str)>,
    ) -> Arc<rustls::ClientConfig> {
        fleetgate_api::tls::install_crypto_provider();
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca_pem).expect("ca pem"))
            .expect("root");
        let b = rustls::ClientConfig::builder().with_root_certificates(roots);
        Arc::new(match identity {
            Some((chain, key)) => {
                let chain = CertificateDer::pem_slice_iter(chain.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .expect("chain");
                let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key");
                b.with_client_auth_cert(chain, key).expect("client auth")
            }
            None => b.with_no_client_auth(),
        })
    }

    /// A fresh P-256 key and a PEM CSR for it.
    pub fn csr(cn: &str) -> (KeyPair, String) {
        provisioning::csr::new_key_and_csr(provisioning::csr::KeyKind::EcdsaP256, cn).expect("csr")
    }

    /// A DER CSR carrying one key but signed by another: the request body of
    /// a fresh CSR, with a signature made by a second key.
    pub fn csr_signed_by_another_key() -> Vec<u8> {
        let key = KeyPair::generate().expect("key");
        let other = KeyPair::generate().expect("key");
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, "forged");
        let der = params.serialize_request(&key).expect("csr").der().to_vec();
        // CertificationRequest ::= SEQUENCE { info, algorithm, signature }
        let (info, rest) = der_element(der_contents(&der));
        let (algorithm, _) = der_element(rest);
        let signature = other.sign(info).expect("sign");
        let mut bits = vec![0u8];
        bits.extend_from_slice(&signature);
        let mut body = info.to_vec();
        body.extend_from_slice(algorithm);
        body.extend(der_tlv(0x03, &bits));
        der_tlv(0x30, &body)
    }

    fn der_len(input: &[u8]) -> (usize, usize) {
        match input[1] {
            n if n < 0x80 => (n as usize, 2),
            0x81 => (input[2] as usize, 3),
            0x82 => (((input[2] as usize) << 8) | input[3] as usize, 4),
            n => panic!("length form {n:#x} not expected in a test CSR"),
        }
    }

    fn der_contents(input: &[u8]) -> &[u8] {
        let (len, hdr) = der_len(input);
        &input[hdr..hdr + len]
    }

    /// The first element of `input` (whole TLV) and what follows it.
    fn der_element(input: &[u8]) -> (&[u8], &[u8]) {
        let (len, hdr) = der_len(input);
        input.split_at(hdr + len)
    }

    fn der_tlv(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        match content.len() {
            n if n < 0x80 => out.push(n as u8),
            n if n < 0x100 => out.extend_from_slice(&[0x81, n as u8]),
            n => out.extend_from_slice(&[0x82, (n >> 8) as u8, n as u8]),
        }
        out.extend_from_slice(content);
        out
    }
}

/// A certificate signed by a manufacturer's CA with stock openssl, as a
/// factory would: a P-256 key, CN = `id`, clientAuth; written as creds for
/// `server` (the chain is the leaf and the manufacturer CA).
pub fn openssl_device(
    dir: &Path,
    server: &Server,
    ca_crt: &Path,
    ca_key: &Path,
    id: &str,
) -> Creds {
    require_tool("openssl");
    std::fs::create_dir_all(dir).expect("device dir");
    let key = dir.join(format!("{id}.key"));
    let csr = dir.join(format!("{id}.csr"));
    let leaf = dir.join(format!("{id}.leaf"));
    let (ok, out) = run(Command::new("openssl")
        .args(["req", "-new", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:P-256", "-nodes", "-keyout"])
        .arg(&key)
        .args(["-subj", &format!("/CN={id}"), "-out"])
        .arg(&csr));
    assert!(ok, "{out}");
    let ext = dir.join("device.ext");
    std::fs::write(
        &ext,
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n",
    )
    .expect("device.ext");
    let (ok, out) = run(Command::new("openssl")
        .args(["x509", "-req", "-in"])
        .arg(&csr)
        .arg("-CA")
        .arg(ca_crt)
        .arg("-CAkey")
        .arg(ca_key)
        .args(["-CAcreateserial", "-days", "30", "-extfile"])
        .arg(&ext)
        .arg("-out")
        .arg(&leaf));
    assert!(ok, "{out}");
    let chain = format!(
        "{}{}",
        std::fs::read_to_string(&leaf).expect("leaf"),
        std::fs::read_to_string(ca_crt).expect("manufacturer CA")
    );
    let key = std::fs::read_to_string(&key).expect("key");
    server.creds(dir, id, &chain, &key)
}

/// Writes a file only its owner may read.
pub fn write_private(path: &Path, text: &str) {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .expect("private file");
    std::io::Write::write_all(&mut f, text.as_bytes()).expect("write private file");
}

pub mod etcd;
pub mod nats;
pub mod softhsm;

/// Polls `f` until it returns `Some`, for at most `within`: the one way
/// tests wait for a real process (no fixed sleeps). Panics naming `what`
/// when time runs out.
pub fn eventually<T>(within: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not within {within:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether `child` exits within `within` (polled).
pub fn exits(child: &mut Child, within: Duration) -> bool {
    let deadline = std::time::Instant::now() + within;
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls the future `f` makes until it yields `Some`, for at most
/// `within`: [`eventually`] for async checks. Panics naming `what` when
/// time runs out.
pub async fn until<T, F, Fut>(within: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {within:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A `mosquitto_sub` whose subscription is in place: started with `-d`,
/// returned once it printed its SUBACK (within 15 s). Its output is what
/// it printed of messages, its debug lines left out.
#[derive(Debug)]
pub struct Subscriber {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    reader: std::thread::JoinHandle<()>,
}

impl Subscriber {
    /// Spawns `cmd` (a `mosquitto_sub`) with `-d` and waits for its SUBACK.
    pub fn spawn(cmd: &mut Command) -> Subscriber {
        // Line-buffered (a pipe is otherwise block-buffered), so its
        // SUBACK line shows when it happens.
        let mut line_buffered = Command::new("stdbuf");
        line_buffered
            .arg("-oL")
            .arg(cmd.get_program())
            .args(cmd.get_args())
            .arg("-d");
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => line_buffered.env(k, v),
                None => line_buffered.env_remove(k),
            };
        }
        if let Some(dir) = cmd.get_current_dir() {
            line_buffered.current_dir(dir);
        }
        let mut child = line_buffered
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawning mosquitto_sub");
        let out = child.stdout.take().expect("piped stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in std::io::BufRead::lines(std::io::BufReader::new(out)).map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match lines.recv_timeout(left) {
                Ok(l) if l.contains("received SUBACK") => break,
                Ok(_) => {}
                Err(e) => panic!("mosquitto_sub printed no SUBACK: {e}"),
            }
        }
        Subscriber {
            child,
            lines,
            reader,
        }
    }

    /// Whether it exits within `within` (polled).
    pub fn exits(&mut self, within: Duration) -> bool {
        exits(&mut self.child, within)
    }

    /// Waits for it to exit: whether it succeeded, what it printed of
    /// messages (stdout without its debug lines), and its stderr.
    pub fn finish(self) -> (bool, String, String) {
        let out = self.wait_with_output().expect("waiting for mosquitto_sub");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// [`Child::wait_with_output`], its debug lines left out of stdout.
    pub fn wait_with_output(mut self) -> std::io::Result<Output> {
        let status = self.child.wait()?;
        let _ = self.reader.join();
        let text: String = self
            .lines
            .try_iter()
            .filter(|l| !l.starts_with("Client ") && !l.starts_with("Subscribed (mid"))
            .map(|l| l + "\n")
            .collect();
        let mut stderr = Vec::new();
        if let Some(mut e) = self.child.stderr.take() {
            std::io::Read::read_to_end(&mut e, &mut stderr)?;
        }
        Ok(Output {
            status,
            stdout: text.into_bytes(),
            stderr,
        })
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
    }
}
