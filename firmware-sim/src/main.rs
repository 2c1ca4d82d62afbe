//! `firmware-sim`: a simulated device fleet, and the load generator behind
//! every broker figure.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use firmware_sim::load::{self, Target};
use rumqttc::QoS;

#[derive(Parser, Debug)]
#[command(
    name = "firmware-sim",
    version,
    about = "simulated device fleet and MQTT load generator"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a fleet scenario.
    Run(RunArgs),
    /// Load against any MQTT-over-mutual-TLS broker.
    #[command(subcommand)]
    Load(Load),
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Scenario {
    /// N devices connect and publish for a duration.
    Steady,
    /// N devices connect at once: connects/s and connect latency.
    Storm,
    /// Mid-run, K devices are revoked: revoke-to-disconnect latency.
    Revoke,
    /// Misbehaving devices beside well-behaved ones.
    Rogue,
    /// Factory-fresh devices provision themselves over MQTT through one
    /// shared claim, then connect as themselves.
    Provision,
    /// Hold the fleet's connections for the duration with churn and API
    /// writes: RSS over time, and every acknowledged write read back.
    Soak,
}

#[derive(Args, Debug)]
struct RunArgs {
    #[arg(long, value_enum)]
    scenario: Scenario,
    #[arg(long, default_value_t = 50)]
    devices: usize,
    /// Fleet directory: each device's key and certificate, kept for the next run.
    #[arg(long, default_value = "fleet")]
    fleet: PathBuf,
    /// Device ids are PREFIX0, PREFIX1, ...
    #[arg(long, default_value = "sim-")]
    prefix: String,
    /// The MQTT broker (any: fleetgate, Mosquitto, ...); loopback only.
    #[arg(long, default_value = "127.0.0.1:8883")]
    broker: SocketAddr,
    /// CA certificate of the broker (default: FLEET/ca.crt).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// fleetgate's admin API, for enrollment and revocation.
    #[arg(long, env = "FLEETGATE_API")]
    api: Option<String>,
    /// fleetgate data dir with the admin credentials.
    #[arg(long, env = "FLEETGATE_DATA_DIR", default_value = "fleetgate-data")]
    data_dir: PathBuf,
    /// Telemetry messages per device per second.
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// Seconds of publishing (steady), of waiting after revoking (revoke).
    #[arg(long, default_value_t = 5)]
    duration: u64,
    /// Devices to revoke (revoke).
    #[arg(long, default_value_t = 5)]
    revoke: usize,
    /// Revoke them in one bulk call instead of one call each (revoke).
    #[arg(long)]
    bulk: bool,
    /// Extra devices connecting and leaving each second (soak).
    #[arg(long, default_value_t = 10)]
    churn: usize,
    /// The broker's process id, to report its memory per connection.
    #[arg(long)]
    broker_pid: Option<u32>,
    /// Seconds to wait for every device to connect.
    #[arg(long, default_value_t = 120)]
    connect_limit: u64,
    /// Write every figure to this file as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args, Debug)]
struct TargetArgs {
    /// Broker address (loopback only for load runs).
    #[arg(long, default_value = "127.0.0.1:8883")]
    broker: SocketAddr,
    /// CA certificate that signed the broker's certificate.
    #[arg(long)]
    ca: PathBuf,
    /// Directory with `<id>.crt` and `<id>.key` for each device.
    #[arg(long)]
    creds: PathBuf,
    /// Device ids are PREFIX0, PREFIX1, ...
    #[arg(long, default_value = "bench-")]
    prefix: String,
}

#[derive(Subcommand, Debug)]
enum Load {
    /// Full mTLS handshakes + CONNECT/CONNACK/DISCONNECT, no resumption.
    Connect {
        #[command(flatten)]
        target: TargetArgs,
        /// Concurrent connectors, one device identity each.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        #[arg(long, default_value_t = 2000)]
        connects: usize,
    },
    /// Publishers to `devices/<id>/telemetry`, one subscriber counting.
    Publish {
        #[command(flatten)]
        target: TargetArgs,
        #[arg(long, default_value_t = 4)]
        publishers: usize,
        /// Messages per publisher.
        #[arg(long, default_value_t = 20_000)]
        messages: u64,
        /// Payload bytes.
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=1))]
        qos: u8,
        /// The subscriber's id (a service identity on fleetgate).
        #[arg(long, default_value = "bench-sub")]
        subscriber: String,
        /// The subscriber's broker, if not --broker (another node of a
        /// cluster: messages cross nodes).
        #[arg(long)]
        subscriber_broker: Option<SocketAddr>,
    },
    /// A telemetry consumer: one service subscribed to
    /// `devices/+/telemetry` (QoS 0), counting every message until the
    /// fleet goes quiet. Prints JSON.
    Consume {
        #[command(flatten)]
        target: TargetArgs,
        /// The consumer's id (a service identity on fleetgate).
        #[arg(long, default_value = "fleet-consumer")]
        id: String,
        #[arg(long, default_value = "devices/+/telemetry")]
        filter: String,
        /// Stop after this many seconds without a message.
        #[arg(long, default_value_t = 5)]
        idle: u64,
        /// Stop after this many seconds in any case.
        #[arg(long, default_value_t = 900)]
        limit: u64,
    },
    /// Enrollments over the JSON API, EST and CMP side by side, the same
    /// kind of key and CSR for each, as the admin; rounds alternate the
    /// protocols. Prints one JSON line a protocol a round.
    Enroll {
        /// fleetgate's API (loopback only).
        #[arg(long, default_value = "https://127.0.0.1:8443")]
        api: String,
        /// fleetgate data dir with the admin credentials.
        #[arg(long, default_value = "fleetgate-data")]
        data_dir: PathBuf,
        /// Enrollments per protocol per round.
        #[arg(long, default_value_t = 500)]
        count: usize,
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        #[arg(long, default_value_t = 2)]
        rounds: usize,
        /// Device ids are PREFIX<round>-<protocol>-<n>.
        #[arg(long, default_value = "enroll-")]
        prefix: String,
        /// Then suspend and resume each device the JSON API enrolled, at
        /// the same concurrency: flushed status changes/s (a line with
        /// protocol "status").
        #[arg(long)]
        status_changes: bool,
    },
    /// OCSP requests over HTTP, one random serial each.
    Ocsp {
        /// Responder address (loopback only).
        #[arg(long)]
        responder: SocketAddr,
        /// The issuing CA certificate (PEM).
        #[arg(long)]
        issuer: PathBuf,
        /// File with one hex serial per line.
        #[arg(long)]
        serials: PathBuf,
        /// A fresh nonce per request (each answer signed anew).
        #[arg(long)]
        nonce: bool,
        /// Reuse connections (HTTP keep-alive).
        #[arg(long)]
        keep_alive: bool,
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn target(t: &TargetArgs) -> anyhow::Result<Target> {
    if !t.broker.ip().is_loopback() {
        anyhow::bail!("load runs target loopback only, not {}", t.broker);
    }
    Ok(Target {
        broker: t.broker,
        ca: t.ca.clone(),
        creds: t.creds.clone(),
    })
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(a) => {
            if !a.broker.ip().is_loopback() {
                anyhow::bail!(
                    "the simulated fleet targets loopback only, not {}",
                    a.broker
                );
            }
            let api = match &a.api {
                Some(url) => {
                    fleetgate_api::tls::install_crypto_provider();
                    let paths = provisioning::ca::Paths::new(&a.data_dir);
                    let tls = fleetgate_api::tls::client_config(
                        &paths.ca_cert(),
                        Some((&paths.admin_cert(), &paths.admin_key())),
                    )?;
                    Some(fleetgate_api::client::ApiClient::new(url, tls)?)
                }
                None => None,
            };
            let ca = match &a.ca {
                Some(c) => c.clone(),
                None => {
                    if api.is_none() {
                        firmware_sim::fleet::check_dir(&a.fleet)?;
                    }
                    a.fleet.join("ca.crt")
                }
            };
            let fleet = firmware_sim::fleet::Fleet {
                broker: a.broker,
                ca,
                dir: a.fleet.clone(),
                api,
                prefix: a.prefix.clone(),
                progress: !a.quiet,
            };
            let o = firmware_sim::fleet::Options {
                devices: a.devices,
                rate: a.rate,
                duration: std::time::Duration::from_secs(a.duration),
                revoke: a.revoke,
                bulk: a.bulk,
                broker_pid: a.broker_pid,
                connect_limit: std::time::Duration::from_secs(a.connect_limit),
            };
            // Enroll first: the CA file is written by enrollment.
            if !matches!(a.scenario, Scenario::Provision | Scenario::Revoke) {
                fleet.ensure_enrolled(&fleet.ids(o.devices)).await?;
            }
            let mut report = match a.scenario {
                Scenario::Steady => firmware_sim::fleet::steady(&fleet, &o).await?,
                Scenario::Storm => firmware_sim::fleet::storm(&fleet, &o).await?,
                Scenario::Revoke => firmware_sim::fleet::revoke(&fleet, &o).await?,
                Scenario::Rogue => firmware_sim::fleet::rogue(&fleet, &o).await?,
                Scenario::Provision => firmware_sim::fleet::provision(&fleet, &o).await?,
                Scenario::Soak => firmware_sim::fleet::soak(&fleet, &o, a.churn).await?,
            };
            report.throttled(firmware_sim::throttle::total());
            print!("{}", report.table());
            if let Some(path) = &a.json {
                std::fs::write(path, serde_json::to_vec_pretty(&report.to_json())?)?;
            }
            if !report.ok {
                anyhow::bail!("scenario {} did not go as expected", report.scenario);
            }
        }
        Command::Load(Load::Connect {
            target: t,
            concurrency,
            connects,
        }) => {
            let ids = load::ids(&t.prefix, concurrency);
            load::check_creds(&t.creds, &ids)?;
            let r = load::connect_storm(&target(&t)?, &ids, connects).await?;
            println!(
                "{}",
                serde_json::json!({
                    "connects": r.connects,
                    "failures": r.failures,
                    "seconds": r.elapsed.as_secs_f64(),
                    "connects_per_s": r.per_second(),
                    "p50_ms": r.percentile(0.5).as_secs_f64() * 1e3,
                    "p99_ms": r.percentile(0.99).as_secs_f64() * 1e3,
                    "max_ms": r.percentile(1.0).as_secs_f64() * 1e3,
                })
            );
        }
        Command::Load(Load::Publish {
            target: t,
            publishers,
            messages,
            size,
            qos,
            subscriber,
            subscriber_broker,
        }) => {
            let ids = load::ids(&t.prefix, publishers);
            load::check_creds(&t.creds, &ids)?;
            let qos = if qos == 0 {
                QoS::AtMostOnce
            } else {
                QoS::AtLeastOnce
            };
            let pubs = target(&t)?;
            let mut subs = pubs.clone();
            if let Some(b) = subscriber_broker {
                subs = target(&TargetArgs { broker: b, ..t })?;
            }
            let r = load::publish_run(&pubs, &subs, &ids, &subscriber, messages, size, qos).await?;
            println!(
                "{}",
                serde_json::json!({
                    "sent": r.sent,
                    "received": r.received,
                    "seconds": r.elapsed.as_secs_f64(),
                    "messages_per_s": r.per_second(),
                    "p50_ms": r.percentile(0.5).as_secs_f64() * 1e3,
                    "p99_ms": r.percentile(0.99).as_secs_f64() * 1e3,
                })
            );
        }
        Command::Load(Load::Consume {
            target: t,
            id,
            filter,
            idle,
            limit,
        }) => {
            load::check_creds(&t.creds, std::slice::from_ref(&id))?;
            let r = load::consume(
                &target(&t)?,
                &id,
                &filter,
                std::time::Duration::from_secs(idle),
                std::time::Duration::from_secs(limit),
            )
            .await?;
            // The steady middle: the median of the whole seconds.
            let mut secs = r.per_second.clone();
            if secs.len() > 2 {
                secs = secs[1..secs.len() - 1].to_vec();
            }
            secs.sort_unstable();
            println!(
                "{}",
                serde_json::json!({
                    "received": r.received,
                    "seconds": r.span.as_secs_f64(),
                    "messages_per_s": r.received as f64 / r.span.as_secs_f64().max(1e-9),
                    "median_per_s": secs.get(secs.len() / 2).copied().unwrap_or(0),
                })
            );
        }
        Command::Load(Load::Enroll {
            api,
            data_dir,
            count,
            concurrency,
            rounds,
            prefix,
            status_changes,
        }) => {
            use load::EnrollProtocol;
            let host = api
                .trim_start_matches("https://")
                .split(['/', ']'])
                .next()
                .unwrap_or_default()
                .trim_start_matches('[')
                .rsplit_once(':')
                .map_or("", |(h, _)| h)
                .to_owned();
            if !host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
            {
                anyhow::bail!("load runs target loopback only, not {api}");
            }
            fleetgate_api::tls::install_crypto_provider();
            let paths = provisioning::ca::Paths::new(&data_dir);
            let tls = fleetgate_api::tls::client_config(
                &paths.ca_cert(),
                Some((&paths.admin_cert(), &paths.admin_key())),
            )?;
            let client = fleetgate_api::client::ApiClient::new(&api, tls)?;
            let admin_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(paths.admin_key())?)?;
            let admin_chain: Vec<Vec<u8>> = fleetgate_api::tls::load_certs(&paths.admin_cert())?
                .into_iter()
                .map(|c| c.to_vec())
                .collect();
            for round in 1..=rounds {
                for protocol in EnrollProtocol::ALL {
                    let ids: Vec<String> = (0..count)
                        .map(|i| format!("{prefix}{round}-{}-{i}", protocol.name()))
                        .collect();
                    let prepared =
                        load::prepare_enrollments(protocol, &ids, &admin_key, &admin_chain)?;
                    let r = load::enroll_run(&client, protocol, prepared, concurrency).await;
                    let ms = |p: f64| load::percentile(&r.latencies, p).as_secs_f64() * 1000.0;
                    println!(
                        "{}",
                        serde_json::json!({
                            "round": round,
                            "protocol": protocol.name(),
                            "enrolled": r.enrolled,
                            "failed": r.failed,
                            "first_failure": r.first_failure,
                            "seconds": r.elapsed.as_secs_f64(),
                            "enrollments_per_s": r.per_second(),
                            "p50_ms": ms(0.50),
                            "p99_ms": ms(0.99),
                        })
                    );
                    if status_changes && protocol == EnrollProtocol::Json {
                        let r = load::status_run(&client, ids, concurrency).await;
                        let ms = |p: f64| load::percentile(&r.latencies, p).as_secs_f64() * 1000.0;
                        println!(
                            "{}",
                            serde_json::json!({
                                "round": round,
                                "protocol": "status",
                                "changes": r.enrolled,
                                "failed": r.failed,
                                "first_failure": r.first_failure,
                                "seconds": r.elapsed.as_secs_f64(),
                                "changes_per_s": r.per_second(),
                                "p50_ms": ms(0.50),
                                "p99_ms": ms(0.99),
                            })
                        );
                    }
                }
            }
        }
        Command::Load(Load::Ocsp {
            responder,
            issuer,
            serials,
            nonce,
            keep_alive,
            concurrency,
            seconds,
        }) => {
            if !responder.ip().is_loopback() {
                anyhow::bail!("load runs target loopback only, not {responder}");
            }
            use rustls_pki_types::pem::PemObject;
            let issuer = rustls_pki_types::CertificateDer::from_pem_file(&issuer)?;
            let serials: Vec<provisioning::Serial> = std::fs::read_to_string(&serials)?
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| l.parse())
                .collect::<Result<_, _>>()?;
            let r = load::ocsp_run(
                responder,
                std::sync::Arc::new(issuer.to_vec()),
                std::sync::Arc::new(serials),
                nonce,
                keep_alive,
                concurrency,
                std::time::Duration::from_secs(seconds),
            )
            .await?;
            println!(
                "{}",
                serde_json::json!({
                    "responses": r.responses,
                    "failures": r.failures,
                    "seconds": r.elapsed.as_secs_f64(),
                    "responses_per_s": r.responses as f64 / r.elapsed.as_secs_f64(),
                    "p50_ms": r.percentile_ms(0.5),
                    "p99_ms": r.percentile_ms(0.99),
                    "revoked": r.revoked,
                    "unknown": r.unknown,
                })
            );
        }
    }
    Ok(())
}
