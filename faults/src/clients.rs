//! The run's clients, each recording what it did and saw: an operator
//! enrolling, suspending, resuming and revoking through any node's API;
//! devices connecting to any node, publishing QoS 1 telemetry and taking
//! QoS 1 commands on a persistent session; two services sharing the
//! telemetry (`$share`); a service sending commands; relying parties asking
//! OCSP (`openssl ocsp`) on any node.
//!
//! Every client picks its node at random, every operation has a time
//! limit, and nothing retries by itself: each attempt is one operation in
//! the history.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleetgate_api::client::{ApiClient, ApiFailure};
use fleetgate_api::types::EnrollBody;
use provisioning::Role;
use rand::Rng;

use crate::history::{CertStatus, Event, Ms, Node, Op, Outcome};
use crate::mqtt::{Conn, Failure};

/// Each operation's time limit.
const LIMIT: Duration = Duration::from_secs(8);

/// The history as it is recorded.
#[derive(Debug)]
pub struct Recorder {
    t0: Instant,
    next: AtomicU64,
    events: Mutex<Vec<Event>>,
}

impl Recorder {
    pub fn new(t0: Instant) -> Self {
        Self {
            t0,
            next: AtomicU64::new(0),
            events: Mutex::new(Vec::new()),
        }
    }

    /// Milliseconds since the run started.
    pub fn now(&self) -> Ms {
        self.t0.elapsed().as_millis() as Ms
    }

    /// An operation that started at `start` and ends now.
    pub fn record(&self, start: Ms, op: Op, outcome: Outcome) {
        let e = Event {
            id: self.next.fetch_add(1, Ordering::Relaxed),
            start,
            end: self.now(),
            op,
            outcome,
        };
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(e);
    }

    pub fn take(&self) -> Vec<Event> {
        let mut v = std::mem::take(&mut *self.events.lock().unwrap_or_else(|p| p.into_inner()));
        v.sort_by_key(|e| e.id);
        v
    }

    pub fn count(&self) -> usize {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

fn outcome(r: Result<(), Failure>) -> Outcome {
    match r {
        Ok(()) => Outcome::Ok,
        Err(Failure::Refused(w)) => Outcome::Refused(w),
        Err(Failure::Unknown(w)) => Outcome::Unknown(w),
    }
}

/// An API call's outcome: an error answer is a refusal (but a 503, which
/// says nothing was written), anything else unknown.
fn api_outcome<T>(
    r: Result<anyhow::Result<T>, tokio::time::error::Elapsed>,
) -> (Outcome, Option<T>) {
    match r {
        Ok(Ok(v)) => (Outcome::Ok, Some(v)),
        Ok(Err(e)) => match e.downcast_ref::<ApiFailure>() {
            Some(f) => (
                Outcome::Refused(format!("{} {}", f.status.as_u16(), f.code)),
                None,
            ),
            None => (Outcome::Unknown(format!("{e:#}")), None),
        },
        Err(_) => (Outcome::Unknown("no answer in time".into()), None),
    }
}

/// A device's or service's files and TLS config.
#[derive(Clone)]
#[allow(missing_debug_implementations)] // a TLS config
pub struct Identity {
    pub id: String,
    /// Leaf then issuing CA.
    pub chain: PathBuf,
    pub leaf: PathBuf,
    pub issuer: PathBuf,
    pub tls: Arc<rustls::ClientConfig>,
}

/// What the clients know of a device.
#[derive(Clone, Default)]
struct Standing {
    /// A revocation was sent (acknowledged or not).
    revoked: bool,
    suspended: bool,
    /// It subscribed on a persistent session once: commands may be sent.
    session: bool,
    commands: u64,
    telemetry: u64,
}

/// What every client shares.
#[allow(missing_debug_implementations)] // TLS configs
pub struct Workload {
    pub rec: Arc<Recorder>,
    /// Node `i`'s address.
    pub nodes: Vec<String>,
    /// The admin API of each node.
    apis: Vec<ApiClient>,
    /// The root CA, PEM file.
    ca: PathBuf,
    dir: PathBuf,
    devices: Mutex<BTreeMap<String, (Identity, Standing)>>,
    /// Set when the run stops making changes (faults healed): the
    /// operator only resumes what it suspended.
    pub settling: AtomicBool,
    /// Set when every client stops.
    pub stop: AtomicBool,
    enrolled: AtomicU64,
    /// Set once the `$share/backend` group has a member: telemetry before
    /// that has no subscriber to reach (MQTT drops it, acknowledged), so
    /// devices start after it.
    group_ready: AtomicBool,
}

impl Workload {
    /// `admin`: (ca, cert, key) of an admin; files under `dir`.
    pub fn new(
        rec: Arc<Recorder>,
        nodes: Vec<String>,
        admin: (PathBuf, PathBuf, PathBuf),
        dir: &Path,
    ) -> anyhow::Result<Self> {
        fleetgate_api::tls::install_crypto_provider();
        let tls = fleetgate_api::tls::client_config(&admin.0, Some((&admin.1, &admin.2)))?;
        let apis = nodes
            .iter()
            .map(|a| ApiClient::new(&format!("https://{a}:{}", crate::node::API), tls.clone()))
            .collect::<anyhow::Result<Vec<_>>>()?;
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            rec,
            nodes,
            apis,
            ca: admin.0,
            dir: dir.to_owned(),
            devices: Mutex::new(BTreeMap::new()),
            settling: AtomicBool::new(false),
            group_ready: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            enrolled: AtomicU64::new(0),
        })
    }

    fn node(&self) -> Node {
        rand::thread_rng().gen_range(0..self.nodes.len())
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn devices(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, (Identity, Standing)>> {
        self.devices.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Enrolls `id` as `role` through node `node`, recorded; its identity
    /// if acknowledged.
    pub async fn enroll(&self, id: &str, role: Role, node: Node) -> Option<Identity> {
        let start = self.rec.now();
        let (key, csr) =
            provisioning::csr::new_key_and_csr(provisioning::csr::KeyKind::EcdsaP256, id).ok()?;
        let body = EnrollBody {
            id: id.to_owned(),
            csr,
            role: Some(role),
            manufacturer: None,
            lifetime_days: None,
            lifetime_seconds: None,
        };
        let (out, enrolled) =
            api_outcome(tokio::time::timeout(LIMIT, self.apis[node].enroll(&body)).await);
        let op = Op::Enroll {
            device: id.to_owned(),
            node,
        };
        self.rec.record(start, op, out);
        let enrolled = enrolled?;
        let write = |name: &str, text: &str| -> Option<PathBuf> {
            let p = self.dir.join(format!("{id}.{name}"));
            std::fs::write(&p, text).ok()?;
            Some(p)
        };
        let pems: Vec<&str> = enrolled
            .chain_pem
            .split_inclusive("-----END CERTIFICATE-----\n")
            .collect();
        let chain = write("crt", &enrolled.chain_pem)?;
        let leaf = write("leaf.crt", pems.first()?)?;
        let issuer = write("issuer.crt", pems.get(1)?)?;
        let keyfile = write("key", &key.serialize_pem())?;
        let tls = crate::mqtt::tls(&self.ca, &chain, &keyfile).ok()?;
        Some(Identity {
            id: id.to_owned(),
            chain,
            leaf,
            issuer,
            tls,
        })
    }

    /// The operator: mostly enrollments while fewer than `fleet` devices
    /// are in use, then revocations, suspensions and resumptions; once
    /// settling, it resumes what it suspended and stops.
    pub async fn operator(self: Arc<Self>, fleet: usize) {
        while !self.stopped() {
            if self.settling.load(Ordering::Relaxed) {
                let suspended: Vec<String> = self
                    .devices()
                    .iter()
                    .filter(|(_, (_, s))| s.suspended && !s.revoked)
                    .map(|(id, _)| id.clone())
                    .collect();
                if suspended.is_empty() {
                    return;
                }
                for id in suspended {
                    self.change(&id, "resume").await;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            let (active, suspended): (Vec<String>, Vec<String>) = {
                let d = self.devices();
                (
                    d.iter()
                        .filter(|(_, (_, s))| !s.revoked && !s.suspended)
                        .map(|(id, _)| id.clone())
                        .collect(),
                    d.iter()
                        .filter(|(_, (_, s))| !s.revoked && s.suspended)
                        .map(|(id, _)| id.clone())
                        .collect(),
                )
            };
            let roll = rand::thread_rng().gen_range(0..10);
            let pick = |v: &[String]| v[rand::thread_rng().gen_range(0..v.len())].clone();
            if active.len() < fleet && roll < 6 || active.len() < 3 {
                let n = self.enrolled.fetch_add(1, Ordering::Relaxed);
                let id = format!("dev-{n}");
                if let Some(identity) = self.enroll(&id, Role::Device, self.node()).await {
                    self.devices()
                        .insert(id.clone(), (identity, Standing::default()));
                    tokio::spawn(self.clone().device(id));
                }
            } else if roll < 8 {
                self.change(&pick(&active), "revoke").await;
            } else if roll < 9 || suspended.is_empty() {
                self.change(&pick(&active), "suspend").await;
            } else {
                self.change(&pick(&suspended), "resume").await;
            }
            self.pause(200..600).await;
        }
    }

    /// Revokes, suspends or resumes `id` through a node, recorded.
    async fn change(&self, id: &str, what: &str) {
        let node = self.node();
        let api = &self.apis[node];
        let start = self.rec.now();
        let call = async {
            match what {
                "revoke" => api.revoke(id, Some("key-compromise")).await,
                "suspend" => api.suspend(id).await,
                _ => api.resume(id).await,
            }
        };
        let (out, _) = api_outcome(tokio::time::timeout(LIMIT, call).await);
        let device = id.to_owned();
        let op = match what {
            "revoke" => Op::Revoke { device, node },
            "suspend" => Op::Suspend { device, node },
            _ => Op::Resume { device, node },
        };
        let sent = !matches!(out, Outcome::Refused(_));
        if let Some((_, s)) = self.devices().get_mut(id) {
            match what {
                // Not acknowledged may still have happened: the device is
                // left alone by the other clients' choices either way.
                "revoke" => s.revoked |= sent || s.revoked,
                "suspend" => s.suspended = true,
                _ => s.suspended = !matches!(out, Outcome::Ok),
            }
        }
        self.rec.record(start, op, out);
    }

    /// A device: connect to a node (persistent session), subscribe to its
    /// commands, publish telemetry, take commands for a while, disconnect;
    /// again, until the run stops. A revoked device keeps trying.
    async fn device(self: Arc<Self>, id: String) {
        let commands = format!("devices/{id}/commands/#");
        let telemetry = format!("devices/{id}/telemetry");
        while !self.group_ready.load(Ordering::Relaxed) && !self.stopped() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        while !self.stopped() {
            let Some((identity, _)) = self.devices().get(&id).cloned() else {
                return;
            };
            let node = self.node();
            let addr = crate::mqtt::addr(&self.nodes[node], crate::node::MQTT);
            let start = self.rec.now();
            let r = Conn::connect(addr, identity.tls.clone(), &id, false, LIMIT).await;
            let connect = Op::Connect {
                device: id.clone(),
                node,
            };
            let mut conn = match r {
                Ok((conn, _)) => {
                    self.rec.record(start, connect, Outcome::Ok);
                    conn
                }
                Err(f) => {
                    self.rec.record(start, connect, outcome(Err(f)));
                    // A revoked or suspended device keeps trying, less
                    // often (every attempt is still checked).
                    let out = self
                        .devices()
                        .get(&id)
                        .is_some_and(|(_, s)| s.revoked || s.suspended);
                    self.pause(if out { 2_000..5_000 } else { 500..2_000 })
                        .await;
                    continue;
                }
            };
            let mut alive = conn.subscribe(&commands, LIMIT).await.is_ok();
            // Commands may come before the SUBACK, and stay acknowledged
            // if it never comes.
            self.delivered(&id, &mut conn);
            if alive {
                if let Some((_, s)) = self.devices().get_mut(&id) {
                    s.session = true;
                }
            }
            let rounds = rand::thread_rng().gen_range(1..4);
            for _ in 0..rounds {
                if !alive || self.stopped() {
                    break;
                }
                let seq = {
                    let mut d = self.devices();
                    let Some((_, s)) = d.get_mut(&id) else { return };
                    s.telemetry += 1;
                    s.telemetry
                };
                let start = self.rec.now();
                let r = conn
                    .publish(&telemetry, seq.to_string().as_bytes(), LIMIT)
                    .await;
                alive = r.is_ok();
                let op = Op::Publish {
                    device: id.clone(),
                    node,
                    seq,
                };
                self.rec.record(start, op, outcome(r));
                self.delivered(&id, &mut conn);
                if alive {
                    let wait = Duration::from_millis(rand::thread_rng().gen_range(300..1_500));
                    alive = conn.idle(wait).await.is_ok();
                    self.delivered(&id, &mut conn);
                }
            }
            if alive {
                conn.disconnect().await;
            }
            self.pause(200..1_500).await;
        }
    }

    /// Records the commands `conn` received.
    fn delivered(&self, id: &str, conn: &mut Conn) {
        for p in conn.inbox.drain(..) {
            if let Some(seq) = std::str::from_utf8(&p.payload)
                .ok()
                .and_then(|s| s.parse().ok())
            {
                let at = self.rec.now();
                let op = Op::Delivered {
                    device: id.to_owned(),
                    seq,
                };
                self.rec.record(at, op, Outcome::Ok);
            }
        }
    }

    async fn pause(&self, ms: std::ops::Range<u64>) {
        let ms = rand::thread_rng().gen_range(ms);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    /// A service in the `$share/backend` group for every device's
    /// telemetry, on a clean session, moving to another node when its
    /// connection ends.
    pub async fn consumer(self: Arc<Self>, me: Identity) {
        while !self.stopped() {
            let node = self.node();
            let addr = crate::mqtt::addr(&self.nodes[node], crate::node::MQTT);
            let Ok((mut conn, _)) = Conn::connect(addr, me.tls.clone(), &me.id, true, LIMIT).await
            else {
                self.pause(300..1_000).await;
                continue;
            };
            if conn
                .subscribe("$share/backend/devices/+/telemetry", LIMIT)
                .await
                .is_ok()
            {
                self.group_ready.store(true, Ordering::Relaxed);
                while !self.stopped() {
                    let r = conn.idle(Duration::from_millis(500)).await;
                    for p in conn.inbox.drain(..) {
                        let device = p.topic.split('/').nth(1).unwrap_or_default().to_owned();
                        if let Some(seq) = std::str::from_utf8(&p.payload)
                            .ok()
                            .and_then(|s| s.parse().ok())
                        {
                            let at = self.rec.now();
                            self.rec
                                .record(at, Op::Consumed { device, seq }, Outcome::Ok);
                        }
                    }
                    if r.is_err() {
                        break;
                    }
                }
            }
            self.pause(300..1_000).await;
        }
    }

    /// A service sending QoS 1 commands to devices that have a session,
    /// numbered per device.
    pub async fn commander(self: Arc<Self>, me: Identity) {
        let mut conn: Option<(Conn, Node)> = None;
        while !self.stopped() && !self.settling.load(Ordering::Relaxed) {
            self.pause(200..700).await;
            let target = {
                let mut d = self.devices();
                let ids: Vec<String> = d
                    .iter()
                    .filter(|(_, (_, s))| s.session && !s.revoked)
                    .map(|(id, _)| id.clone())
                    .collect();
                if ids.is_empty() {
                    continue;
                }
                let id = ids[rand::thread_rng().gen_range(0..ids.len())].clone();
                let Some((_, s)) = d.get_mut(&id) else {
                    continue;
                };
                s.commands += 1;
                (id, s.commands)
            };
            let (c, node) = match conn.take() {
                Some(c) => c,
                None => {
                    let node = self.node();
                    let addr = crate::mqtt::addr(&self.nodes[node], crate::node::MQTT);
                    match Conn::connect(addr, me.tls.clone(), &me.id, true, LIMIT).await {
                        Ok((c, _)) => (c, node),
                        Err(_) => {
                            // Not sent: the number is used again.
                            if let Some((_, s)) = self.devices().get_mut(&target.0) {
                                s.commands -= 1;
                            }
                            continue;
                        }
                    }
                }
            };
            let mut c = c;
            let (device, seq) = target;
            let start = self.rec.now();
            let r = c
                .publish(
                    &format!("devices/{device}/commands/run"),
                    seq.to_string().as_bytes(),
                    LIMIT,
                )
                .await;
            let ok = r.is_ok();
            let op = Op::Command {
                device,
                node,
                seq,
                expires: None,
            };
            self.rec.record(start, op, outcome(r));
            if ok {
                conn = Some((c, node));
            }
        }
    }

    /// A relying party: `openssl ocsp` on a node about a device's
    /// certificate.
    pub async fn ocsp(self: Arc<Self>) {
        while !self.stopped() {
            self.pause(200..600).await;
            let chosen = {
                let d = self.devices();
                if d.is_empty() {
                    continue;
                }
                let i = rand::thread_rng().gen_range(0..d.len());
                d.values().nth(i).map(|(id, _)| id.clone())
            };
            let Some(identity) = chosen else { continue };
            let node = self.node();
            let url = format!("http://{}:{}", self.nodes[node], crate::node::OCSP);
            let start = self.rec.now();
            let run = tokio::process::Command::new("openssl")
                .args(["ocsp", "-no_nonce", "-noverify", "-timeout", "5"])
                .arg("-issuer")
                .arg(&identity.issuer)
                .arg("-cert")
                .arg(&identity.leaf)
                .args(["-url", &url])
                .kill_on_drop(true)
                .output();
            let (outcome, answer) = match tokio::time::timeout(LIMIT, run).await {
                Ok(Ok(o)) => {
                    let text = String::from_utf8_lossy(&o.stdout);
                    let line = text
                        .lines()
                        .find(|l| {
                            l.contains(".crt: ")
                                || l.starts_with(identity.leaf.to_string_lossy().as_ref())
                        })
                        .unwrap_or_default()
                        .to_owned();
                    if line.ends_with(": good") {
                        (Outcome::Ok, Some(CertStatus::Good))
                    } else if line.ends_with(": revoked") {
                        (Outcome::Ok, Some(CertStatus::Revoked))
                    } else if line.ends_with(": unknown") {
                        (Outcome::Ok, Some(CertStatus::Unknown))
                    } else {
                        let err = String::from_utf8_lossy(&o.stderr);
                        (
                            Outcome::Unknown(err.lines().next().unwrap_or("no answer").to_owned()),
                            None,
                        )
                    }
                }
                Ok(Err(e)) => (Outcome::Unknown(format!("openssl: {e}")), None),
                Err(_) => (Outcome::Unknown("no answer in time".into()), None),
            };
            let op = Op::Ocsp {
                device: identity.id.clone(),
                node,
                answer,
            };
            self.rec.record(start, op, outcome);
        }
    }

    /// The devices the registry holds, read from node `node` page by page.
    pub async fn registry(&self, node: Node) -> anyhow::Result<Vec<(String, String)>> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let path = match &after {
                Some(a) => format!("/v1/devices?limit=1000&after={a}"),
                None => "/v1/devices?limit=1000".to_owned(),
            };
            let page: serde_json::Value =
                tokio::time::timeout(LIMIT, self.apis[node].get(&path)).await??;
            for d in page["items"].as_array().into_iter().flatten() {
                out.push((
                    d["id"].as_str().unwrap_or_default().to_owned(),
                    d["status"].as_str().unwrap_or_default().to_owned(),
                ));
            }
            match page["next"].as_str() {
                Some(n) => after = Some(n.to_owned()),
                None => return Ok(out),
            }
        }
    }
}
