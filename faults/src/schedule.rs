//! The faults of a run, planned from a seed before it starts: the same
//! seed gives the same schedule, so a run that found something can be
//! run again. Pure; the harness carries it out.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::history::Ms;

/// What a fault does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Cuts each pair off from each other.
    Partition(Vec<(String, String)>),
    /// kill -9, started again when the fault ends.
    Kill(String),
    /// SIGSTOP, SIGCONT when the fault ends.
    Pause(String),
    /// A node's clock this many seconds off until the fault ends.
    Skew { node: String, secs: i64 },
}

/// A fault at its time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Planned {
    pub at: Ms,
    pub until: Ms,
    pub action: Action,
}

impl Planned {
    /// The processes it touches.
    pub fn targets(&self) -> Vec<String> {
        let mut t: Vec<String> = match &self.action {
            Action::Partition(pairs) => pairs
                .iter()
                .flat_map(|(a, b)| [a.clone(), b.clone()])
                .collect(),
            Action::Kill(p) | Action::Pause(p) => vec![p.clone()],
            Action::Skew { node, .. } => vec![node.clone()],
        };
        t.sort();
        t.dedup();
        t
    }

    pub fn kind(&self) -> &'static str {
        match self.action {
            Action::Partition(_) => "partition",
            Action::Kill(_) => "kill",
            Action::Pause(_) => "pause",
            Action::Skew { .. } => "skew",
        }
    }
}

impl Planned {
    /// What it does to whom: `partition etcd-0/etcd-1 etcd-0/etcd-2`.
    pub fn what(&self) -> String {
        let what = match &self.action {
            Action::Partition(pairs) => pairs
                .iter()
                .map(|(a, b)| format!("{a}/{b}"))
                .collect::<Vec<_>>()
                .join(" "),
            Action::Kill(p) | Action::Pause(p) => p.clone(),
            Action::Skew { node, secs } => format!("{node} {secs:+} s"),
        };
        format!("{:<9} {what}", self.kind())
    }
}

impl std::fmt::Display for Planned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:>7.1} s to {:>7.1} s  {}",
            self.at as f64 / 1000.0,
            self.until as f64 / 1000.0,
            self.what()
        )
    }
}

/// Clock offsets a skew picks from: minutes to days, both ways.
const SKEWS: [i64; 6] = [300, -300, 7200, -7200, 2 * 86_400, -86_400];

/// At most this many faults at once, and one per process.
const CONCURRENT: usize = 2;

/// The faults for a run of `run` ms over `procs` (`etcd-0`, `nats-1`,
/// `node-2`: skews go to `node-*` only), from `seed`: one starts every
/// 3-12 s from 5 s on, when fewer than two are on and its processes are
/// free; all end by `run`.
pub fn plan(seed: u64, run: Ms, procs: &[String]) -> Vec<Planned> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let nodes: Vec<&String> = procs.iter().filter(|p| p.starts_with("node-")).collect();
    let mut out: Vec<Planned> = Vec::new();
    let mut at: Ms = 5_000;
    while at < run.saturating_sub(3_000) {
        let pick =
            |rng: &mut ChaCha8Rng, from: &[&String]| from[rng.gen_range(0..from.len())].clone();
        let all: Vec<&String> = procs.iter().collect();
        let (action, len) = match rng.gen_range(0..10) {
            0..=3 => {
                let p = pick(&mut rng, &all);
                let others: Vec<&String> = all.iter().copied().filter(|q| **q != p).collect();
                let kind = p.split('-').next().unwrap_or_default().to_owned();
                let pairs = match rng.gen_range(0..3) {
                    // Isolated from everything.
                    0 => others.iter().map(|q| (p.clone(), (*q).clone())).collect(),
                    // Cut from its peers only (an etcd member or NATS
                    // server in a minority, still reached by the nodes).
                    1 if kind != "node" => others
                        .iter()
                        .filter(|q| q.starts_with(&format!("{kind}-")))
                        .map(|q| (p.clone(), (*q).clone()))
                        .collect(),
                    _ => vec![(p.clone(), pick(&mut rng, &others))],
                };
                (Action::Partition(pairs), rng.gen_range(3_000..20_000))
            }
            4..=5 => (
                Action::Kill(pick(&mut rng, &all)),
                rng.gen_range(1_000..10_000),
            ),
            6..=7 => (
                Action::Pause(pick(&mut rng, &all)),
                rng.gen_range(1_000..8_000),
            ),
            _ if !nodes.is_empty() => (
                Action::Skew {
                    node: pick(&mut rng, &nodes),
                    secs: SKEWS[rng.gen_range(0..SKEWS.len())],
                },
                rng.gen_range(10_000..30_000),
            ),
            _ => (
                Action::Pause(pick(&mut rng, &all)),
                rng.gen_range(1_000..8_000),
            ),
        };
        let planned = Planned {
            at,
            until: (at + len).min(run),
            action,
        };
        let on: Vec<&Planned> = out.iter().filter(|f| f.until > at).collect();
        let busy = planned
            .targets()
            .iter()
            .any(|t| on.iter().any(|f| f.targets().contains(t)));
        if on.len() < CONCURRENT && !busy {
            out.push(planned);
        }
        at += rng.gen_range(3_000..12_000);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn procs() -> Vec<String> {
        ["etcd", "nats", "node"]
            .iter()
            .flat_map(|k| (0..3).map(move |i| format!("{k}-{i}")))
            .collect()
    }

    #[test]
    fn a_seed_gives_its_schedule_and_another_seed_another() {
        let a = plan(7, 600_000, &procs());
        assert_eq!(a, plan(7, 600_000, &procs()));
        assert_ne!(a, plan(8, 600_000, &procs()));
        // Ten minutes hold dozens of faults of every kind.
        assert!(a.len() > 30, "{}", a.len());
        for kind in ["partition", "kill", "pause", "skew"] {
            assert!(a.iter().any(|f| f.kind() == kind), "no {kind}");
        }
    }

    #[test]
    fn at_most_two_at_once_one_per_process_skews_on_nodes_all_ended_by_the_run() {
        for seed in 0..50 {
            let run = 120_000;
            let s = plan(seed, run, &procs());
            for f in &s {
                assert!(f.at < f.until && f.until <= run, "{f}");
                if let Action::Skew { node, .. } = &f.action {
                    assert!(node.starts_with("node-"), "{f}");
                }
                let on: Vec<&Planned> = s
                    .iter()
                    .filter(|g| g.at <= f.at && f.at < g.until)
                    .collect();
                assert!(on.len() <= CONCURRENT, "seed {seed}: {on:?}");
                for g in on.iter().filter(|g| *g != &f) {
                    for t in f.targets() {
                        assert!(!g.targets().contains(&t), "seed {seed}: {f} and {g}");
                    }
                }
            }
        }
    }
}
