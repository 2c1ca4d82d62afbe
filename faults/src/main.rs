//! `faults run --seed N --minutes M`: the cluster under seeded faults
//! while clients record a history; prints the schedule, the operations'
//! counts and each violation, writes the history, and exits 1 on any
//! violation. `faults check FILE`: checks a recorded history again.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use faults::check::check;
use faults::history::{History, Op, Outcome};

#[derive(Parser)]
#[command(about = "fleetgate's cluster under faults: runs and checks histories")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs three etcd members, three NATS servers and three nodes in
    /// network namespaces (as root) under seeded faults.
    Run {
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// How long faults are injected.
        #[arg(long, default_value_t = 2.0)]
        minutes: f64,
        /// After the faults, the clients go on this long.
        #[arg(long, default_value_t = 30)]
        settle_secs: u64,
        /// Data, logs and history.json go here (default: a new temporary
        /// directory, kept).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The nodes' --store-staleness-secs.
        #[arg(long, default_value_t = 20)]
        staleness_secs: u64,
        /// Devices in use at once.
        #[arg(long, default_value_t = 24)]
        fleet: usize,
        /// The run's subnet (a /24 unused on this host).
        #[arg(long, default_value = "10.78.0")]
        subnet: String,
        /// The fleetgate binary (default: fleetgate-node beside this one).
        #[arg(long)]
        bin: Option<PathBuf>,
    },
    /// Prints the faults a seed plans for a run, without running it.
    Plan {
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 2.0)]
        minutes: f64,
    },
    /// Checks a recorded history (JSON).
    Check { file: PathBuf },
}

fn main() -> ExitCode {
    match Cli::parse().cmd {
        Cmd::Plan { seed, minutes } => {
            let names: Vec<String> = ["etcd", "nats", "node"]
                .iter()
                .flat_map(|k| (0..3).map(move |i| format!("{k}-{i}")))
                .collect();
            for f in faults::schedule::plan(seed, (minutes * 60_000.0) as u64, &names) {
                println!("{f}");
            }
            ExitCode::SUCCESS
        }
        Cmd::Check { file } => {
            let history: History = match std::fs::read(&file)
                .map_err(anyhow::Error::from)
                .and_then(|b| serde_json::from_slice(&b).map_err(anyhow::Error::from))
            {
                Ok(h) => h,
                Err(e) => {
                    eprintln!("error: {}: {e:#}", file.display());
                    return ExitCode::from(2);
                }
            };
            report(&history)
        }
        Cmd::Run {
            seed,
            minutes,
            settle_secs,
            dir,
            staleness_secs,
            fleet,
            subnet,
            bin,
        } => {
            let bin = bin.unwrap_or_else(|| {
                std::env::current_exe()
                    .ok()
                    .and_then(|e| e.parent().map(|d| d.join("fleetgate-node")))
                    .unwrap_or_else(|| PathBuf::from("fleetgate"))
            });
            let dir = match dir {
                Some(d) => d,
                None => std::env::temp_dir().join(format!("faults-{seed}-{}", std::process::id())),
            };
            let cfg = faults::run::Config {
                seed,
                run: std::time::Duration::from_secs_f64(minutes * 60.0),
                settle: std::time::Duration::from_secs(settle_secs),
                dir: dir.clone(),
                bin,
                staleness_secs,
                prefix: format!("fg{}", std::process::id()),
                subnet,
                fleet,
            };
            println!("run in {}", dir.display());
            let done = match faults::run::run(&cfg, &|line| println!("{line}")) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    return ExitCode::from(2);
                }
            };
            let path = dir.join("history.json");
            if let Err(e) = serde_json::to_vec(&done.history)
                .map_err(anyhow::Error::from)
                .and_then(|b| std::fs::write(&path, b).map_err(anyhow::Error::from))
            {
                eprintln!("error: writing {}: {e:#}", path.display());
            } else {
                println!("history: {}", path.display());
            }
            for e in &done.exits {
                println!("exit: {e}");
            }
            report(&done.history)
        }
    }
}

/// Prints the counts and the violations of `history`.
fn report(history: &History) -> ExitCode {
    let count =
        |f: &dyn Fn(&Outcome) -> bool| history.events.iter().filter(|e| f(&e.outcome)).count();
    println!(
        "{} operations: {} acknowledged, {} refused, {} unknown; {} faults",
        history.events.len(),
        count(&|o| *o == Outcome::Ok),
        count(&|o| matches!(o, Outcome::Refused(_))),
        count(&|o| matches!(o, Outcome::Unknown(_))),
        history.faults.len()
    );
    let mut kinds: std::collections::BTreeMap<&str, (usize, usize)> = Default::default();
    for e in &history.events {
        let k = match e.op {
            Op::Enroll { .. } => "enroll",
            Op::Revoke { .. } => "revoke",
            Op::Suspend { .. } => "suspend",
            Op::Resume { .. } => "resume",
            Op::Connect { .. } => "connect",
            Op::Publish { .. } => "publish",
            Op::Consumed { .. } => "consumed",
            Op::Command { .. } => "command",
            Op::Delivered { .. } => "delivered",
            Op::Ocsp { .. } => "ocsp",
        };
        let c = kinds.entry(k).or_default();
        c.0 += 1;
        c.1 += usize::from(e.ok());
    }
    for (k, (n, ok)) in kinds {
        println!("  {k:<10} {n:>6} ({ok} acknowledged)");
    }
    let violations = check(history);
    for v in &violations {
        println!("violation {v}");
    }
    println!("{} violations", violations.len());
    if violations.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
