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
use broker::client::ApiClient;

/// The `fleetgate` binary cargo built beside this test.
///
/// `cargo test --workspace` builds it: the `broker` package has integration
/// tests, so cargo builds its binary before running any test.
pub fn fleetgate_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/fleetgate
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("fleetgate"))
        .expect("target dir");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo test --workspace` (or `cargo build -p broker`) first",
        bin.display()
    );
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
    pub data_dir: PathBuf,
    stderr: mpsc::Receiver<String>,
}

impl Server {
    /// Starts `fleetgate serve` on a free port with `data_dir`, and waits
    /// until it says it is listening.
    pub fn start(data_dir: &Path) -> anyhow::Result<Self> {
        Self::start_with(data_dir, &[])
    }

    pub fn start_with(data_dir: &Path, extra: &[&str]) -> anyhow::Result<Self> {
        let mut child = Command::new(fleetgate_bin())
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--api-listen", "127.0.0.1:0"])
            .args(extra)
            .env("FLEETGATE_LOG", "info,sled=warn")
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
                let log: Vec<String> = err_rx.try_iter().collect();
                return Err(anyhow!(
                    "fleetgate serve did not start ({status}):\n{}",
                    log.join("\n")
                ));
            }
        };
        let api = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("api="))
            .ok_or_else(|| anyhow!("unexpected first line {line:?}"))?
            .parse()?;
        Ok(Self {
            child,
            api,
            data_dir: data_dir.to_owned(),
            stderr: err_rx,
        })
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

    /// An API client presenting `cert`/`key` (or no certificate).
    pub fn client(&self, identity: Option<(&Path, &Path)>) -> ApiClient {
        broker::tls::install_crypto_provider();
        let config = broker::tls::client_config(&self.data_dir.join("ca.crt"), identity)
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

    /// What the server logged so far.
    pub fn log(&self) -> Vec<String> {
        self.stderr.try_iter().collect()
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
