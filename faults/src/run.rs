//! A run: three etcd members, three NATS servers and three fleetgate nodes,
//! each in its own namespace of one network; the clients of
//! [`crate::clients`] against the nodes; the seeded faults of
//! [`crate::schedule`] carried out on time; every process probed twice a
//! second; a supervisor that starts again what died (as systemd would);
//! then everything healed, a settling time for what was queued, and the
//! history handed to the checker.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use provisioning::Role;

use crate::clients::{Recorder, Workload};
use crate::etcd::EtcdCluster;
use crate::history::{Fault, History, Ms, Silence, Span};
use crate::nats::NatsCluster;
use crate::net::Net;
use crate::node::{NodeConfig, Nodes};
use crate::proc::Proc;
use crate::schedule::{plan, Action, Planned};
use crate::world::{contact_spans, State};

/// What a run is.
#[derive(Clone, Debug)]
pub struct Config {
    pub seed: u64,
    /// How long faults are injected.
    pub run: Duration,
    /// After the faults: everything healed, clients go on this long.
    pub settle: Duration,
    /// Data, logs and the history go here.
    pub dir: PathBuf,
    /// The `fleetgate` binary.
    pub bin: PathBuf,
    pub staleness_secs: u64,
    /// Namespace names start with it: at most 12 characters.
    pub prefix: String,
    /// `10.78.0`: the run's subnet, unused on this host.
    pub subnet: String,
    /// Devices in use at once.
    pub fleet: usize,
}

/// What a run did.
#[derive(Debug)]
pub struct Report {
    pub schedule: Vec<Planned>,
    pub history: History,
    /// Processes that exited by themselves (not killed by a fault), with
    /// when and the end of their logs.
    pub exits: Vec<String>,
}

const ETCD: usize = 0;
const NATS: usize = 3;
const NODES: usize = 6;

/// The network member a process runs in.
fn member(name: &str) -> usize {
    let (kind, i) = name.split_once('-').unwrap_or((name, "0"));
    let i: usize = i.parse().unwrap_or(0);
    match kind {
        "etcd" => ETCD + i,
        "nats" => NATS + i,
        _ => NODES + i,
    }
}

struct Cluster {
    etcd: EtcdCluster,
    nats: NatsCluster,
    nodes: Nodes,
}

impl Cluster {
    fn procs(&mut self) -> impl Iterator<Item = &mut Proc> {
        self.etcd
            .procs
            .iter_mut()
            .chain(self.nats.procs.iter_mut())
            .chain(self.nodes.procs.iter_mut())
    }

    fn proc(&mut self, name: &str) -> Option<&mut Proc> {
        self.procs().find(|p| p.name == name)
    }
}

/// What a probe asks each kind of process: any HTTP answer will do (a
/// paused process still accepts TCP connections, so a connection is not
/// enough).
fn probe_path(name: &str) -> (u16, &'static str) {
    if name.starts_with("etcd") {
        (crate::etcd::CLIENT, "/version")
    } else if name.starts_with("nats") {
        (crate::nats::MONITOR, "/healthz")
    } else {
        (crate::node::OCSP, "/crl/probe")
    }
}

/// Whether `addr:port` answers an HTTP GET within a second.
fn answers(addr: &str, port: u16, path: &str) -> bool {
    status(addr, port, path).is_some()
}

/// The status code of an HTTP GET of `addr:port` within a second.
fn status(addr: &str, port: u16, path: &str) -> Option<u16> {
    let sock = format!("{addr}:{port}").parse().ok()?;
    let mut s = TcpStream::connect_timeout(&sock, Duration::from_secs(1)).ok()?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .ok()?;
    // "HTTP/1.1 200"
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    let head = std::str::from_utf8(&head).ok()?;
    head.strip_prefix("HTTP/")?.get(4..7)?.parse().ok()
}

/// Polls `cond` every 200 ms for up to `within`.
fn wait(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while !cond() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    true
}

/// Runs it; `say` gets each line of progress.
pub fn run(cfg: &Config, say: &(dyn Fn(String) + Sync)) -> anyhow::Result<Report> {
    std::fs::create_dir_all(&cfg.dir)?;
    let net = Arc::new(Net::with_subnet(&cfg.prefix, 9, &cfg.subnet, true)?);
    let addr = |name: &str| net.addr(member(name));
    let names: Vec<String> = ["etcd", "nats", "node"]
        .iter()
        .flat_map(|k| (0..3).map(move |i| format!("{k}-{i}")))
        .collect();
    let etcd_names: Vec<String> = names[0..3].to_vec();

    say("starting etcd, NATS and three nodes".into());
    let etcd = EtcdCluster::start(&net, &[0, 1, 2], &cfg.dir.join("etcd"))?;
    let nats = NatsCluster::start(&net, &[3, 4, 5], &cfg.dir.join("nats"))?;
    for n in &names[0..6] {
        let (port, path) = probe_path(n);
        anyhow::ensure!(
            wait(Duration::from_secs(60), || answers(&addr(n), port, path)),
            "{n} did not start"
        );
    }
    anyhow::ensure!(
        wait(Duration::from_secs(60), || (0..3)
            .all(|i| etcd.healthy(&net, 6, i))),
        "etcd has no leader"
    );
    // JetStream's meta leader: nodes make their streams at start.
    anyhow::ensure!(
        wait(Duration::from_secs(60), || names[3..6].iter().all(
            |n| status(&addr(n), crate::nats::MONITOR, "/healthz") == Some(200)
        )),
        "NATS JetStream is not ready"
    );
    let node_cfg = NodeConfig {
        bin: cfg.bin.clone(),
        store: etcd.url(&net),
        nats: nats.url(&net),
        staleness_secs: cfg.staleness_secs,
    };
    let nodes = Nodes::start(&net, &[6, 7, 8], &cfg.dir.join("nodes"), &node_cfg, |i| {
        answers(&net.addr(NODES + i), crate::node::OCSP, "/crl/probe")
    })?;
    for n in &names[6..9] {
        anyhow::ensure!(
            wait(Duration::from_secs(60), || answers(
                &addr(n),
                crate::node::OCSP,
                "/crl/probe"
            )),
            "{n} did not start"
        );
    }
    let admin = nodes.admin();
    let cluster = Arc::new(Mutex::new(Cluster { etcd, nats, nodes }));
    let lock = || cluster.lock().unwrap_or_else(|p| p.into_inner());

    let t0 = Instant::now();
    let rec = Arc::new(Recorder::new(t0));
    let run_ms = cfg.run.as_millis() as Ms;
    let schedule = plan(cfg.seed, run_ms, &names);
    say(format!(
        "seed {}: {} faults planned",
        cfg.seed,
        schedule.len()
    ));
    for f in &schedule {
        say(format!("  {f}"));
    }
    let world: Arc<Mutex<Vec<(Ms, State)>>> = Arc::new(Mutex::new(vec![(0, State::default())]));
    let change = |f: &dyn Fn(&mut State)| {
        let mut w = world.lock().unwrap_or_else(|p| p.into_inner());
        let mut s = w.last().map(|(_, s)| s.clone()).unwrap_or_default();
        f(&mut s);
        w.push((rec.now(), s));
    };
    let done = AtomicBool::new(false);
    let faults: Mutex<Vec<Fault>> = Mutex::new(Vec::new());
    let silences: Mutex<Vec<Silence>> = Mutex::new(Vec::new());
    let exits: Mutex<Vec<String>> = Mutex::new(Vec::new());
    // Killed by a fault: not to be started again by the supervisor.
    let held: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let nodes_addr: Vec<String> = (0..3).map(|i| net.addr(NODES + i)).collect();
    let work = Arc::new(Workload::new(
        rec.clone(),
        nodes_addr,
        admin,
        &cfg.dir.join("clients"),
    )?);

    let history = std::thread::scope(|scope| -> anyhow::Result<History> {
        // However this ends, the probes and the supervisor stop.
        struct Done<'a>(&'a AtomicBool);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let _done = Done(&done);
        // Probes: a silence is from a process's last answer to its next.
        for name in &names {
            let (port, path) = probe_path(name);
            let (rec, done, silences, a) = (&rec, &done, &silences, addr(name));
            scope.spawn(move || {
                let mut last_ok = rec.now();
                let mut silent = false;
                while !done.load(Ordering::Relaxed) {
                    let t = rec.now();
                    if answers(&a, port, path) {
                        if silent && t - last_ok > 2_000 {
                            silences
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .push(Silence {
                                    process: name.clone(),
                                    span: Span {
                                        from: last_ok,
                                        to: t,
                                    },
                                });
                        }
                        silent = false;
                        last_ok = t;
                    } else {
                        silent = true;
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
                if silent {
                    let t = rec.now();
                    silences
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(Silence {
                            process: name.clone(),
                            span: Span {
                                from: last_ok,
                                to: t,
                            },
                        });
                }
            });
        }
        // The supervisor: what died by itself is noted and started again.
        scope.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(500));
                let mut c = lock();
                let held = held.lock().unwrap_or_else(|p| p.into_inner()).clone();
                for p in c.procs() {
                    if !held.contains(&p.name) && !p.running() {
                        let t = rec.now();
                        let line = format!(
                            "{} exited by itself at {:.1} s; its log ends:\n{}",
                            p.name,
                            t as f64 / 1000.0,
                            p.log_tail(8)
                        );
                        say(line.clone());
                        exits.lock().unwrap_or_else(|e| e.into_inner()).push(line);
                        if let Err(e) = p.restart(&net) {
                            say(format!("restarting {}: {e:#}", p.name));
                        }
                    }
                }
            }
        });

        // The clients.
        let setup = rt.block_on(async {
            let mut services = Vec::new();
            for id in ["backend-a", "backend-b", "commander"] {
                let mut got = None;
                for _ in 0..20 {
                    if let Some(i) = work.enroll(id, Role::Service, 0).await {
                        got = Some(i);
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                services.push(got.with_context(|| format!("enrolling {id}"))?);
            }
            Ok::<_, anyhow::Error>(services)
        })?;
        let mut tasks = Vec::new();
        {
            let _guard = rt.enter();
            let [a, b, commander]: [_; 3] = setup
                .try_into()
                .map_err(|_| anyhow::anyhow!("three services"))?;
            tasks.push(rt.spawn(work.clone().operator(cfg.fleet)));
            tasks.push(rt.spawn(work.clone().consumer(a)));
            tasks.push(rt.spawn(work.clone().consumer(b)));
            tasks.push(rt.spawn(work.clone().commander(commander)));
            tasks.push(rt.spawn(work.clone().ocsp()));
            tasks.push(rt.spawn(work.clone().ocsp()));
        }

        // The nemesis, on this thread: each fault's start and end on time.
        let mut steps: Vec<(Ms, bool, usize)> = schedule
            .iter()
            .enumerate()
            .flat_map(|(i, f)| [(f.at, true, i), (f.until, false, i)])
            .collect();
        steps.sort();
        let mut began: Vec<Ms> = vec![0; schedule.len()];
        for (at, start, i) in steps {
            let now = rec.now();
            if at > now {
                std::thread::sleep(Duration::from_millis(at - now));
            }
            let f = &schedule[i];
            let t = rec.now();
            if start {
                began[i] = t;
                say(format!(
                    "{:>7.1} s  begins: {}",
                    t as f64 / 1000.0,
                    f.what()
                ));
            } else {
                faults
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(Fault {
                        kind: f.kind().to_owned(),
                        targets: f.targets(),
                        span: Span {
                            from: began[i],
                            to: t,
                        },
                    });
            }
            match (&f.action, start) {
                (Action::Partition(pairs), _) => {
                    for (a, b) in pairs {
                        let r = if start {
                            net.partition(member(a), member(b))
                        } else {
                            net.heal(member(a), member(b))
                        };
                        if let Err(e) = r {
                            say(format!("partition {a}/{b}: {e:#}"));
                        }
                    }
                    change(&|s: &mut State| {
                        for (a, b) in pairs {
                            if start {
                                s.cut(a, b);
                            } else {
                                s.join(a, b);
                            }
                        }
                    });
                }
                (Action::Kill(p), true) => {
                    held.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(p.clone());
                    if let Some(p) = lock().proc(p) {
                        p.kill();
                    }
                    change(&|s: &mut State| {
                        s.down.insert(p.clone());
                    });
                }
                (Action::Kill(p), false) => {
                    if let Some(proc) = lock().proc(p) {
                        if let Err(e) = proc.restart(&net) {
                            say(format!("restarting {p}: {e:#}"));
                        }
                    }
                    held.lock().unwrap_or_else(|e| e.into_inner()).remove(p);
                    change(&|s: &mut State| {
                        s.down.remove(p);
                    });
                }
                (Action::Pause(p), true) => {
                    if let Some(p) = lock().proc(p) {
                        p.pause();
                    }
                    change(&|s: &mut State| {
                        s.paused.insert(p.clone());
                    });
                }
                (Action::Pause(p), false) => {
                    if let Some(p) = lock().proc(p) {
                        p.wake();
                    }
                    change(&|s: &mut State| {
                        s.paused.remove(p);
                    });
                }
                (Action::Skew { node, secs }, _) => {
                    let i = member(node) - NODES;
                    if let Err(e) = lock().nodes.skew(i, if start { *secs } else { 0 }) {
                        say(format!("skewing {node}: {e:#}"));
                    }
                }
            }
        }
        let now = rec.now();
        if run_ms > now {
            std::thread::sleep(Duration::from_millis(run_ms - now));
        }

        // Healed (the schedule ends every fault by the run's end): wait
        // until every process answers, then let the clients settle.
        say(format!(
            "{:.1} s: faults over; {} operations so far",
            rec.now() as f64 / 1000.0,
            rec.count()
        ));
        let all_answer = wait(Duration::from_secs(120), || {
            names.iter().all(|n| {
                let (port, path) = probe_path(n);
                answers(&addr(n), port, path)
            })
        });
        if !all_answer {
            say("not every process answers 120 s after the faults ended".into());
        }
        work.settling.store(true, Ordering::Relaxed);
        std::thread::sleep(cfg.settle);
        work.stop.store(true, Ordering::Relaxed);
        rt.block_on(async {
            for t in tasks {
                let _ = tokio::time::timeout(Duration::from_secs(15), t).await;
            }
        });
        let end = rec.now();

        // The registry at the end, from any node that answers.
        let final_devices = rt.block_on(async {
            for node in 0..3 {
                if let Ok(d) = work.registry(node).await {
                    return Some(d);
                }
            }
            None
        });
        done.store(true, Ordering::Relaxed);
        let changes = world.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let contact = (0..3)
            .map(|i| contact_spans(&changes, end, &format!("node-{i}"), &etcd_names))
            .collect();
        Ok(History {
            events: rec.take(),
            contact,
            faults: std::mem::take(&mut *faults.lock().unwrap_or_else(|p| p.into_inner())),
            silences: Vec::new(),
            staleness: cfg.staleness_secs * 1000,
            propagation: 3_000,
            recovery: 45_000,
            end,
            final_devices: final_devices
                .as_ref()
                .map(|d| d.iter().map(|(id, _)| id.clone()).collect()),
            final_revoked: final_devices.map(|d| {
                d.into_iter()
                    .filter(|(_, s)| s == "revoked")
                    .map(|(id, _)| id)
                    .collect()
            }),
            dependencies: names[6..9]
                .iter()
                .flat_map(|n| names[0..6].iter().map(|d| (n.clone(), d.clone())))
                .collect(),
        })
    })?;
    let mut history = history;
    history.silences = std::mem::take(&mut *silences.lock().unwrap_or_else(|p| p.into_inner()));
    let exits = std::mem::take(&mut *exits.lock().unwrap_or_else(|p| p.into_inner()));
    drop(rt);
    Ok(Report {
        schedule,
        history,
        exits,
    })
}
