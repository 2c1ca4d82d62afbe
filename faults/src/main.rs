//! `faults check FILE`: checks a recorded history (JSON) against
//! fleetgate's promises; prints the operations' counts and each violation;
//! exits 1 if there is any.

use std::process::ExitCode;

use faults::check::check;
use faults::history::{History, Outcome};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [cmd, file] = args.as_slice() else {
        eprintln!("usage: faults check HISTORY.json");
        return ExitCode::from(2);
    };
    if cmd != "check" {
        eprintln!("usage: faults check HISTORY.json (not {cmd:?})");
        return ExitCode::from(2);
    }
    let history: History = match std::fs::read(file)
        .map_err(anyhow::Error::from)
        .and_then(|b| serde_json::from_slice(&b).map_err(anyhow::Error::from))
    {
        Ok(h) => h,
        Err(e) => {
            eprintln!("error: {file}: {e:#}");
            return ExitCode::from(2);
        }
    };
    let count = |f: fn(&Outcome) -> bool| history.events.iter().filter(|e| f(&e.outcome)).count();
    println!(
        "{} operations: {} acknowledged, {} refused, {} unknown; {} faults",
        history.events.len(),
        count(|o| *o == Outcome::Ok),
        count(|o| matches!(o, Outcome::Refused(_))),
        count(|o| matches!(o, Outcome::Unknown(_))),
        history.faults.len()
    );
    let violations = check(&history);
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
