//! The `fleetgate` command line: `serve`, and the operator commands that talk
//! to the admin API.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use provisioning::ca::{write_file, Paths};
use provisioning::csr::{new_key_and_csr, private_key_pem, KeyKind};
use provisioning::registry::Page;
use provisioning::{AuditEntry, CertRecord, DeviceId, DeviceRecord, DeviceView, Role};
use serde_json::json;

use crate::api::manufacturers::{BatchReport, ClaimIssued, Created};
use crate::api::Enrolled;
use crate::client::ApiClient;
use crate::mqtt::MqttConfig;
use crate::serve::{ServeConfig, Server};
use crate::{https, printable, tls};
use provisioning::manufacturer::{Challenge, ManufacturerRecord};

/// Exit code for bad configuration (EX_USAGE).
pub const EXIT_CONFIG: u8 = 64;

/// `println!` that ends the process quietly when stdout is gone (a closed
/// pipe, as with `| head`), as Unix tools do, instead of panicking.
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        if writeln!(std::io::stdout(), $($t)*).is_err() {
            std::process::exit(0);
        }
    }};
}

mod ca;
mod config;
mod logging;
mod manufacturer;
mod serve_args;

use logging::init_tracing;
pub use logging::set_log_filter;
pub(super) use logging::DEFAULT_LOG;
use manufacturer::{enroll_batch, manufacturer_cmd};
use serve_args::{check_cmd, serve_cmd, ServeArgs};

#[derive(Parser, Debug)]
#[command(
    name = "fleetgate",
    version,
    about = "IoT device authentication broker: mTLS MQTT, CA and device registry"
)]
pub struct Cli {
    /// How log lines are written to stderr: `text` (key=value), or
    /// `json` (one object a line, the same fields, for a log shipper).
    #[arg(long, global = true, env = "FLEETGATE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a node: the MQTT broker (mutual TLS), the CA and registry, the
    /// admin API (with EST, CMP and the console), and the OCSP responder
    /// and CRLs. Creates the data dir on first start.
    Serve(Box<ServeArgs>),
    /// Manage devices through the admin API.
    #[command(subcommand)]
    Device(DeviceCmd),
    /// Manage backend services (role `service`) through the admin API.
    #[command(subcommand)]
    Service(ServiceCmd),
    /// Identities for fleetgate nodes (role `node`): the client
    /// certificates they present to etcd and NATS.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Manage manufacturers and their CAs through the admin API.
    #[command(subcommand)]
    Manufacturer(ManufacturerCmd),
    /// Make a CA with its root offline and keys in a token; root
    /// ceremonies.
    #[command(subcommand)]
    Ca(ca::CaCmd),
    /// Manage factory claims (shared certificates that can only provision).
    #[command(subcommand)]
    Claim(ClaimCmd),
    /// Check a data dir: where each key lives (file or token), key file
    /// permissions and keys that policy says must not be there; then, with
    /// the server stopped, the registry (every index against the records
    /// it indexes). Exit 0 when all is well, 1 with each problem.
    Check {
        #[arg(long, env = "FLEETGATE_DATA_DIR", default_value = "fleetgate-data")]
        data_dir: PathBuf,
        /// What to require of the keys: any (report only), offline-root
        /// (no root key in the data dir), hsm (no CA or signer key file).
        #[arg(long, value_enum, default_value_t = KeyPolicyArg::Any)]
        key_policy: KeyPolicyArg,
        /// Keys only: leave the registry alone (a running server holds it).
        #[arg(long)]
        keys_only: bool,
        #[arg(long)]
        json: bool,
        /// Check a configuration file for `serve --config` instead (every
        /// key an option, every value one it takes): exit 0, or 64 with
        /// the file, line and key.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// The operator console in the browser.
    #[command(subcommand)]
    Console(ConsoleCmd),
    /// Configuration files for `serve --config`.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Read the audit log; `audit verify` checks it has not been tampered
    /// with.
    #[command(args_conflicts_with_subcommands = true)]
    Audit {
        #[command(subcommand)]
        verify: Option<AuditCmd>,
        #[command(flatten)]
        api: ApiArgs,
        /// Oldest first, from after this sequence number (default: the
        /// newest first).
        #[arg(long, conflicts_with = "before")]
        after: Option<u64>,
        /// Newest first, from before this sequence number.
        #[arg(long)]
        before: Option<u64>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigCmd {
    /// Print a configuration file with every option of `serve`, its help
    /// and its default (commented out).
    Example,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum KeyPolicyArg {
    Any,
    OfflineRoot,
    Hsm,
}

#[derive(Subcommand, Debug)]
enum AuditCmd {
    /// Walk the whole audit log against its hash chain and signed
    /// checkpoints, and the registry against the log; exit 1 naming the
    /// first entry edited, deleted, inserted or moved.
    Verify {
        #[command(flatten)]
        api: ApiArgs,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
struct ApiArgs {
    /// Admin API base URL.
    #[arg(long, env = "FLEETGATE_API", default_value = "https://127.0.0.1:8443")]
    api: String,
    /// Data dir to take ca.crt, admin.crt and admin.key from.
    #[arg(long, env = "FLEETGATE_DATA_DIR", default_value = "fleetgate-data")]
    data_dir: PathBuf,
    /// CA certificate to trust (default: DATA_DIR/ca.crt).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Admin certificate (default: DATA_DIR/admin.crt).
    #[arg(long)]
    cert: Option<PathBuf>,
    /// Admin key (default: DATA_DIR/admin.key).
    #[arg(long)]
    key: Option<PathBuf>,
}

impl ApiArgs {
    fn client(&self) -> anyhow::Result<ApiClient> {
        let paths = Paths::new(&self.data_dir);
        let ca = self.ca.clone().unwrap_or_else(|| paths.ca_cert());
        let cert = self.cert.clone().unwrap_or_else(|| paths.admin_cert());
        let key = self.key.clone().unwrap_or_else(|| paths.admin_key());
        // The defaults are relative to where the command runs: say so,
        // rather than a bare "No such file".
        if self.ca.is_none() && !ca.exists() {
            let where_ = std::env::current_dir()
                .map(|d| d.join(&self.data_dir))
                .unwrap_or_else(|_| self.data_dir.clone());
            anyhow::bail!(
                "no {} here: the admin's credentials are read from the data dir {} (relative \
                 to where the command runs). Pass --data-dir (or FLEETGATE_DATA_DIR) with the \
                 server's data dir, or --ca, --cert and --key",
                ca.display(),
                where_.display()
            );
        }
        let config = tls::client_config(&ca, Some((&cert, &key)))?;
        ApiClient::new(&self.api, config)
    }
}

#[derive(Subcommand, Debug)]
enum ConsoleCmd {
    /// Print a one-time link that signs you in to the console (as the
    /// admin whose certificate asks), good once and for a short while.
    Login {
        #[command(flatten)]
        api: ApiArgs,
        /// Seconds the link stays good (at most 3600).
        #[arg(long, default_value_t = crate::api::console::LINK_LIFETIME.as_secs())]
        ttl: u64,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum KeyType {
    P256,
    P384,
    Ed25519,
}

impl From<KeyType> for KeyKind {
    fn from(k: KeyType) -> Self {
        match k {
            KeyType::P256 => KeyKind::EcdsaP256,
            KeyType::P384 => KeyKind::EcdsaP384,
            KeyType::Ed25519 => KeyKind::Ed25519,
        }
    }
}

#[derive(Args, Debug)]
struct EnrollArgs {
    /// Device id: 1-64 of A-Z a-z 0-9 . _ -
    id: String,
    /// Where to write ID.crt (and ID.key, ca.crt).
    #[arg(long)]
    out: PathBuf,
    /// Use this CSR (PEM) instead of generating a key here.
    #[arg(long)]
    csr: Option<PathBuf>,
    /// Key type to generate when no --csr is given.
    #[arg(long, value_enum, default_value_t = KeyType::P256)]
    key_type: KeyType,
    /// Certificate lifetime in days (default: the server's).
    #[arg(long)]
    lifetime_days: Option<u32>,
    /// Sign with this manufacturer's CA (one `manufacturer create` made)
    /// and count the device in its fleet (its quota, its revocation);
    /// default: fleetgate's own issuing CA.
    #[arg(long)]
    manufacturer: Option<String>,
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(Subcommand, Debug)]
enum DeviceCmd {
    /// Enroll a device: issue its certificate from a CSR (made here unless --csr).
    Enroll(EnrollArgs),
    /// Issue a new certificate to an active device; the old one stays valid.
    Rotate(EnrollArgs),
    /// Show a device and its certificates.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List devices.
    List {
        /// active, suspended or revoked.
        #[arg(long)]
        status: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Suspend a device: refused until resumed; live connections are cut.
    Suspend {
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Resume a suspended device.
    Resume {
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Approve a device that registered itself just in time as pending.
    Approve {
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Sign a directory of CSRs in one call: DIR/<id>.csr (PEM) each, the
    /// file name being the device id. Writes OUT/<id>.crt; a bad CSR is
    /// reported by name and the rest go on (exit 1 if any failed).
    EnrollBatch {
        /// Sign with this manufacturer's CA (one `manufacturer create` made).
        #[arg(long)]
        manufacturer: Option<String>,
        #[arg(long)]
        csr_dir: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        lifetime_days: Option<u32>,
        /// CSRs per API call.
        #[arg(long, default_value_t = 1000)]
        chunk: usize,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Revoke a device and all its certificates. Final.
    Revoke {
        id: String,
        /// RFC 5280 reason: unspecified, key-compromise, ca-compromise,
        /// affiliation-changed, superseded, cessation-of-operation,
        /// privilege-withdrawn, aa-compromise.
        #[arg(long, default_value = "unspecified")]
        reason: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Revoke many devices in one call and one durable write (a
    /// compromised production lot): the ids in --file (one per line), or
    /// a manufacturer's devices, optionally only those with a certificate
    /// issued within --issued-after .. --issued-before (RFC 3339).
    RevokeBatch {
        /// The device ids, one per line.
        #[arg(long, conflicts_with_all = ["manufacturer", "issued_after", "issued_before"])]
        file: Option<PathBuf>,
        /// Every device of this manufacturer (within the dates, if given).
        #[arg(long)]
        manufacturer: Option<String>,
        /// Only certificates issued at or after this time (RFC 3339).
        #[arg(long)]
        issued_after: Option<String>,
        /// Only certificates issued before this time (RFC 3339).
        #[arg(long)]
        issued_before: Option<String>,
        /// The CRL reason code (as for `device revoke`).
        #[arg(long, default_value = "key-compromise")]
        reason: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Revoke one certificate by serial (hex), or by its key
    /// (`SERIAL:SCOPE`, as `device show --json` lists it) when two issuers
    /// used the serial; the device keeps its others.
    RevokeCert {
        serial: String,
        #[arg(long, default_value = "unspecified")]
        reason: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Subcommand, Debug)]
enum ManufacturerCmd {
    /// Issue an intermediate CA for a manufacturer (pathLen 0, device
    /// certificates only). Writes OUT/NAME.crt and OUT/NAME.key (0600).
    Create {
        name: String,
        #[arg(long)]
        out: PathBuf,
        /// Just-in-time registration: auto-activate or pending.
        #[arg(long, default_value = "auto-activate")]
        policy: String,
        /// Devices it may register just in time (default 100,000).
        #[arg(long)]
        jit_quota: Option<u64>,
        /// A root ceremony, where the root is offline: the node makes the
        /// CA's key and a request, and the root in ROOT_DIR signs it here.
        #[arg(long)]
        root_dir: Option<PathBuf>,
        /// The PIN of the root's token, if its key is in one.
        #[arg(long, requires = "root_dir")]
        root_pin_file: Option<PathBuf>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Set how many devices NAME may register just in time, in all.
    Quota {
        name: String,
        jit_quota: u64,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Get a proof-of-possession challenge for registering NAME's own CA.
    Challenge {
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Register a manufacturer's own CA. Needs proof of possession: a
    /// certificate with CN=<challenge> signed by the CA's key.
    Register {
        name: String,
        #[arg(long)]
        ca_cert: PathBuf,
        #[arg(long)]
        verification_cert: Option<PathBuf>,
        #[arg(long, default_value = "auto-activate")]
        policy: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Revoke a manufacturer: every device under it is refused and cut.
    Revoke {
        name: String,
        #[arg(long, default_value = "ca-compromise")]
        reason: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List manufacturers.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Subcommand, Debug)]
enum ClaimCmd {
    /// Issue a claim certificate good for USES device provisionings over
    /// MQTT. Writes OUT/ID.crt and OUT/ID.key.
    Create {
        /// The claim's id: 1-64 of A-Z a-z 0-9 . _ -
        id: String,
        /// How many devices it may provision.
        #[arg(long)]
        uses: u32,
        /// The devices it provisions are this manufacturer's (signed by
        /// its CA, counted against its quota).
        #[arg(long)]
        manufacturer: Option<String>,
        /// Where to write ID.crt and ID.key.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Subcommand, Debug)]
enum NodeCmd {
    /// Issue a node's client certificate (role `node`, CN = NAME): what
    /// NATS (`verify_and_map`) and etcd map to a user of that name.
    /// Writes OUT/NAME.crt (with the issuing CA), OUT/NAME.key (0600) and
    /// OUT/ca.crt.
    Enroll(EnrollArgs),
}

#[derive(Subcommand, Debug)]
enum ServiceCmd {
    /// Enroll a backend service (role `service`).
    Enroll(EnrollArgs),
}

/// Runs the command line; the binary's whole `main`.
pub fn main() -> ExitCode {
    // `serve --config FILE`: the file's options become flags first.
    let raw: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let (argv, reloader) =
        match config::expand(raw.clone()).and_then(|a| Ok((a, config::Reloader::new(&raw)?))) {
            Ok(a) => a,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        };
    let cli = Cli::parse_from(argv);
    let spec = match &cli.command {
        Command::Serve(a) => Some(a.log_level.clone()),
        _ => None,
    };
    init_tracing(cli.log_format, spec.as_deref());
    tls::install_crypto_provider();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve_cmd(*args, reloader).await,
            Command::Check {
                config: Some(path), ..
            } => match config::serve_args_from(&path) {
                Ok(_) => {
                    outln!("{}: a valid configuration", path.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(EXIT_CONFIG)
                }
            },
            Command::Check {
                data_dir,
                key_policy,
                keys_only,
                json,
                config: None,
            } => check_cmd(&data_dir, key_policy, keys_only, json),
            other => match client_cmd(other).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            },
        }
    })
}

async fn client_cmd(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Serve(_) | Command::Check { .. } => unreachable!("handled by main"),
        Command::Config(ConfigCmd::Example) => {
            outln!("{}", config::example());
            Ok(())
        }
        Command::Device(DeviceCmd::Enroll(a)) => enroll(a, Role::Device, false).await,
        Command::Device(DeviceCmd::Rotate(a)) => enroll(a, Role::Device, true).await,
        Command::Service(ServiceCmd::Enroll(a)) => enroll(a, Role::Service, false).await,
        Command::Node(NodeCmd::Enroll(a)) => enroll(a, Role::Node, false).await,
        Command::Device(DeviceCmd::Show { id, json, api }) => {
            let id = DeviceId::try_new(id)?;
            let client = api.client()?;
            let view: DeviceView = client.get(&format!("/v1/devices/{id}")).await?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&view)?);
            } else {
                let revoked = revoked_manufacturers(&client).await?;
                print_device(&view, &revoked);
            }
            Ok(())
        }
        Command::Device(DeviceCmd::List {
            status,
            limit,
            json,
            api,
        }) => {
            let client = api.client()?;
            let mut all: Vec<DeviceRecord> = Vec::new();
            let mut after: Option<String> = None;
            while all.len() < limit {
                let mut path = format!("/v1/devices?limit={}", (limit - all.len()).min(1000));
                if let Some(s) = &status {
                    path.push_str(&format!("&status={s}"));
                }
                if let Some(a) = &after {
                    path.push_str(&format!("&after={a}"));
                }
                let page: Page<DeviceRecord> = client.get(&path).await?;
                all.extend(page.items);
                match page.next {
                    Some(n) => after = Some(n),
                    None => break,
                }
            }
            if json {
                outln!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                let revoked = revoked_manufacturers(&client).await?;
                outln!(
                    "{:<24} {:<8} {:<10} {:>5}  MANUFACTURER",
                    "ID",
                    "ROLE",
                    "STATUS",
                    "CERTS"
                );
                for d in &all {
                    // Refused at connect whatever its own status says.
                    let m = d.manufacturer.as_deref().unwrap_or("-");
                    let m = if revoked.iter().any(|r| r == m) {
                        format!("{m} (revoked: its devices are refused)")
                    } else {
                        m.to_owned()
                    };
                    outln!(
                        "{:<24} {:<8} {:<10} {:>5}  {m}",
                        d.id,
                        d.role,
                        d.status,
                        d.certificates.len(),
                    );
                }
            }
            Ok(())
        }
        Command::Device(DeviceCmd::Suspend { id, api }) => {
            let id = DeviceId::try_new(id)?;
            let v: DeviceView = api
                .client()?
                .post(&format!("/v1/devices/{id}/suspend"), &json!({}))
                .await?;
            outln!("{} is {}", v.id, v.status);
            Ok(())
        }
        Command::Device(DeviceCmd::Resume { id, api }) => {
            let id = DeviceId::try_new(id)?;
            let v: DeviceView = api
                .client()?
                .post(&format!("/v1/devices/{id}/resume"), &json!({}))
                .await?;
            outln!("{} is {}", v.id, v.status);
            Ok(())
        }
        Command::Device(DeviceCmd::Approve { id, api }) => {
            let id = DeviceId::try_new(id)?;
            let v: DeviceView = api
                .client()?
                .post(&format!("/v1/devices/{id}/approve"), &json!({}))
                .await?;
            outln!("{} is {}", v.id, v.status);
            Ok(())
        }
        Command::Device(DeviceCmd::EnrollBatch {
            manufacturer,
            csr_dir,
            out,
            lifetime_days,
            chunk,
            api,
        }) => enroll_batch(manufacturer, &csr_dir, &out, lifetime_days, chunk, &api).await,
        Command::Manufacturer(cmd) => manufacturer_cmd(cmd).await,
        Command::Ca(cmd) => ca::ca_cmd(cmd).await,
        Command::Claim(ClaimCmd::Create {
            id,
            uses,
            manufacturer,
            out,
            api,
        }) => {
            let id = DeviceId::try_new(id)?;
            check_out_name(id.as_str())?;
            let (key, csr) = new_key_and_csr(KeyKind::EcdsaP256, id.as_str())?;
            let issued: ClaimIssued = api
                .client()?
                .post(
                    "/v1/claims",
                    &json!({"id": id, "csr": csr, "uses": uses, "manufacturer": manufacturer}),
                )
                .await?;
            let (crt, _) = write_credentials(
                &out,
                id.as_str(),
                Some(&private_key_pem(&key)),
                &issued.chain_pem,
                &issued.ca_pem,
            )?;
            outln!(
                "claim {id}: {uses} uses, serial {}, certificate {}",
                issued.serial,
                crt.display()
            );
            Ok(())
        }
        Command::Device(DeviceCmd::Revoke { id, reason, api }) => {
            let id = DeviceId::try_new(id)?;
            let v: DeviceView = api
                .client()?
                .post(
                    &format!("/v1/devices/{id}/revoke"),
                    &json!({ "reason": reason }),
                )
                .await?;
            outln!("{} is {} ({reason})", v.id, v.status);
            Ok(())
        }
        Command::Device(DeviceCmd::RevokeBatch {
            file,
            manufacturer,
            issued_after,
            issued_before,
            reason,
            api,
        }) => {
            let ids = match &file {
                Some(f) => Some(
                    std::fs::read_to_string(f)
                        .with_context(|| format!("reading {}", f.display()))?
                        .lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty() && !l.starts_with('#'))
                        .map(str::to_owned)
                        .collect::<Vec<_>>(),
                ),
                None => None,
            };
            let body = crate::api::RevokeBatchBody {
                ids,
                manufacturer,
                issued_after,
                issued_before,
                reason: Some(reason.clone()),
            };
            let started = std::time::Instant::now();
            let out: provisioning::BulkRevocation = api
                .client()?
                .post("/v1/devices/revoke-batch", &body)
                .await?;
            outln!(
                "revoked {} devices ({reason}) in {:.0} ms; {} already revoked, {} not found",
                out.revoked.len(),
                started.elapsed().as_secs_f64() * 1000.0,
                out.already_revoked.len(),
                out.not_found.len()
            );
            for id in &out.not_found {
                eprintln!("not found: {id}");
            }
            Ok(())
        }
        Command::Device(DeviceCmd::RevokeCert {
            serial,
            reason,
            api,
        }) => {
            // A serial, or a certificate key (serial:scope).
            match serial.split_once(':') {
                Some(_) => {
                    serial.parse::<provisioning::CertKey>()?;
                }
                None => {
                    serial.parse::<provisioning::Serial>()?;
                }
            }
            let c: CertRecord = api
                .client()?
                .post(
                    &format!("/v1/certificates/{serial}/revoke"),
                    &json!({ "reason": reason }),
                )
                .await?;
            outln!(
                "certificate {} of {} is revoked ({reason})",
                c.serial,
                c.device_id
            );
            Ok(())
        }
        Command::Console(ConsoleCmd::Login { api, ttl }) => {
            let link: crate::api::console::Link = api
                .client()?
                .post(
                    "/v1/console/links",
                    &serde_json::json!({ "ttl_seconds": ttl }),
                )
                .await?;
            outln!("{}{}", api.api.trim_end_matches('/'), link.path);
            eprintln!(
                "Open it in a browser that trusts {} (good once, until {}).",
                api.ca
                    .clone()
                    .unwrap_or_else(|| Paths::new(&api.data_dir).ca_cert())
                    .display(),
                rfc3339(link.expires_at)
            );
            Ok(())
        }
        Command::Audit {
            verify: Some(AuditCmd::Verify { api, json }),
            ..
        } => {
            let v: provisioning::registry::Verification =
                api.client()?.get("/v1/audit/verify").await?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for p in &v.problems {
                    outln!("problem: {p}");
                }
                outln!(
                    "{} entries, {} sealed by {} signed checkpoints{}; {} problems",
                    v.entries,
                    v.sealed,
                    v.checkpoints,
                    v.sealed_through
                        .map(|s| format!(" (through entry {s})"))
                        .unwrap_or_default(),
                    v.problems.len()
                );
            }
            if v.problems.is_empty() {
                Ok(())
            } else {
                Err(anyhow::anyhow!(
                    "the audit log does not verify: {}",
                    v.problems[0]
                ))
            }
        }
        Command::Audit {
            verify: None,
            api,
            after,
            before,
            limit,
            json,
        } => {
            let mut path = format!("/v1/audit?limit={limit}");
            match (after, before) {
                (Some(a), _) => path.push_str(&format!("&after={a}")),
                (None, Some(b)) => path.push_str(&format!("&before={b}")),
                (None, None) => path.push_str("&order=newest"),
            }
            let page: Page<AuditEntry> = api.client()?.get(&path).await?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&page)?);
            } else {
                for e in &page.items {
                    outln!(
                        "{:>6} {} {:<20} {:<18} {:<24} {}",
                        e.seq,
                        rfc3339(e.at),
                        e.actor,
                        e.action,
                        e.device.as_ref().map_or("-", |d| d.as_str()),
                        e.detail
                    );
                }
                if let Some(next) = &page.next {
                    let flag = if after.is_some() { "after" } else { "before" };
                    outln!("(more: fleetgate audit --{flag} {next})");
                }
            }
            Ok(())
        }
    }
}

/// Output directories hold `ca.crt` (the root) beside `<id>.crt`: an id
/// named `ca` would overwrite one with the other.
fn check_out_name(id: &str) -> anyhow::Result<()> {
    if id == "ca" {
        anyhow::bail!(
            "the id \"ca\" would overwrite ca.crt (the root CA) in the output directory; \
             choose another id"
        );
    }
    Ok(())
}

async fn enroll(a: EnrollArgs, role: Role, rotate: bool) -> anyhow::Result<()> {
    let id = DeviceId::try_new(a.id)?;
    check_out_name(id.as_str())?;
    let (key, csr) = match &a.csr {
        Some(path) => (
            None,
            std::fs::read_to_string(path)
                .with_context(|| format!("reading the CSR {}", path.display()))?,
        ),
        None => {
            let (key, csr) = new_key_and_csr(a.key_type.into(), id.as_str())?;
            (Some(key), csr)
        }
    };
    let client = a.api.client()?;
    let enrolled: Enrolled = if rotate {
        client
            .post(
                &format!("/v1/devices/{id}/rotate"),
                &json!({ "csr": csr, "lifetime_days": a.lifetime_days }),
            )
            .await?
    } else {
        client
            .post(
                "/v1/devices",
                &json!({
                    "id": id,
                    "csr": csr,
                    "role": role,
                    "manufacturer": a.manufacturer,
                    "lifetime_days": a.lifetime_days,
                }),
            )
            .await?
    };
    if rotate {
        // The old certificate stays valid until revoked or expired: keep it
        // (and its key) beside the new one.
        keep_previous(&a.out, id.as_str())?;
    }
    let (crt, key_path) = write_credentials(
        &a.out,
        id.as_str(),
        key.as_ref().map(private_key_pem).as_deref(),
        &enrolled.chain_pem,
        &enrolled.ca_pem,
    )?;
    outln!(
        "{} {role} {id}: serial {}, certificate {}{}",
        if rotate { "rotated" } else { "enrolled" },
        enrolled.serial,
        crt.display(),
        if a.csr.is_none() {
            format!(", key {}", key_path.display())
        } else {
            String::new()
        }
    );
    Ok(())
}

/// Renames `DIR/NAME.crt` and `DIR/NAME.key`, if there, to
/// `NAME.<serial>.crt` and `.key`, so that writing new ones keeps them.
fn keep_previous(dir: &Path, name: &str) -> anyhow::Result<()> {
    let crt = dir.join(format!("{name}.crt"));
    let Ok(pem) = std::fs::read(&crt) else {
        return Ok(());
    };
    let serial = tls::load_certs(&crt)
        .ok()
        .and_then(|c| c.first().cloned())
        .and_then(|c| provisioning::ca::inspect_certificate(&c).ok())
        .map(|i| i.serial.to_hex())
        .unwrap_or_else(|| format!("{:x}", pem.len()));
    for ext in ["crt", "key"] {
        let from = dir.join(format!("{name}.{ext}"));
        let to = dir.join(format!("{name}.{serial}.{ext}"));
        if from.exists() {
            std::fs::rename(&from, &to)
                .with_context(|| format!("keeping {} as {}", from.display(), to.display()))?;
            eprintln!("kept the previous {} as {}", from.display(), to.display());
        }
    }
    Ok(())
}

/// Writes `DIR/NAME.key` (0600, if given), `DIR/NAME.crt` and `DIR/ca.crt`,
/// creating DIR; returns the certificate's and the key's paths.
fn write_credentials(
    dir: &Path,
    name: &str,
    key_pem: Option<&str>,
    cert_pem: &str,
    ca_pem: &str,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (crt, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    if let Some(pem) = key_pem {
        write_file(&key, pem.as_bytes(), true)?;
    }
    write_file(&crt, cert_pem.as_bytes(), false)?;
    write_file(&dir.join("ca.crt"), ca_pem.as_bytes(), false)?;
    Ok((crt, key))
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

/// The names of the revoked manufacturers: their devices are refused
/// whatever their own status says.
async fn revoked_manufacturers(client: &ApiClient) -> anyhow::Result<Vec<String>> {
    let all: Vec<provisioning::manufacturer::ManufacturerRecord> =
        client.get("/v1/manufacturers").await?;
    Ok(all
        .into_iter()
        .filter(|m| m.revocation.is_some())
        .map(|m| m.name.to_string())
        .collect())
}

fn print_device(v: &DeviceView, revoked_manufacturers: &[String]) {
    outln!("id:           {}", v.id);
    outln!("role:         {}", v.role);
    match &v.revocation {
        Some(r) => outln!(
            "status:       {} ({} at {})",
            v.status,
            r.reason,
            rfc3339(r.at)
        ),
        None => outln!("status:       {}", v.status),
    }
    match v.manufacturer.as_deref() {
        Some(m) if revoked_manufacturers.iter().any(|r| r == m) => {
            outln!("manufacturer: {m} (revoked: this device is refused at connect)")
        }
        m => outln!("manufacturer: {}", m.unwrap_or("-")),
    }
    outln!("created:      {}", rfc3339(v.created_at));
    outln!("updated:      {}", rfc3339(v.updated_at));
    outln!("queued:       {} commands", v.queued_commands);
    outln!("certificates:");
    for c in &v.certificates {
        let r = &c.record;
        let why = r
            .revocation
            .map(|x| format!(" ({})", x.reason))
            .unwrap_or_default();
        outln!("  serial {}  {}{why}", r.serial, c.status);
        outln!(
            "    valid   {} .. {}",
            rfc3339(r.not_before),
            rfc3339(r.not_after)
        );
        outln!("    sha256  {}", r.fingerprint);
        outln!("    issuer  {}", printable(&r.issuer));
    }
}
