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
    /// Load against any MQTT-over-mutual-TLS broker.
    #[command(subcommand)]
    Load(Load),
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
        }) => {
            let ids = load::ids(&t.prefix, publishers);
            load::check_creds(&t.creds, &ids)?;
            let qos = if qos == 0 {
                QoS::AtMostOnce
            } else {
                QoS::AtLeastOnce
            };
            let r = load::publish_run(&target(&t)?, &ids, &subscriber, messages, size, qos).await?;
            println!(
                "{}",
                serde_json::json!({
                    "sent": r.sent,
                    "received": r.received,
                    "seconds": r.elapsed.as_secs_f64(),
                    "messages_per_s": r.per_second(),
                })
            );
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
                })
            );
        }
    }
    Ok(())
}
