//! The simulated fleet: devices with their own keys, enrolled by CSR through
//! the admin API, credentials kept in a fleet directory for the next run;
//! each device a task that connects over mutual TLS with rumqttc, publishes
//! telemetry, listens for commands, reconnects with jittered exponential
//! back-off, and gives up for good once refused as revoked.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use fleetgate_api::client::{ApiClient, ApiFailure};
use indicatif::{ProgressBar, ProgressStyle};
use provisioning::csr::{new_key_and_csr, KeyKind};
use rumqttc::{AsyncClient, Event, Outgoing, Packet, QoS};
use rustls_pki_types::ServerName;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use crate::load::{mqtt_options, percentile, Target};
use crate::{throttle, wire};

mod provision;
mod rogue;
mod soak;

pub use provision::provision;
pub use rogue::rogue;
pub use soak::soak;

/// Where the fleet lives and what it talks to.
#[derive(Clone, Debug)]
pub struct Fleet {
    pub broker: SocketAddr,
    /// The CA the broker's certificate chains to.
    pub ca: PathBuf,
    /// `<id>.crt` / `<id>.key` per device.
    pub dir: PathBuf,
    /// The admin API, for enrollment and revocation (not needed to run an
    /// already enrolled fleet against another broker).
    pub api: Option<ApiClient>,
    pub prefix: String,
    pub progress: bool,
}

impl Fleet {
    pub fn ids(&self, n: usize) -> Vec<String> {
        (0..n).map(|i| format!("{}{i}", self.prefix)).collect()
    }

    fn target(&self) -> Target {
        Target {
            broker: self.broker,
            ca: self.ca.clone(),
            creds: self.dir.clone(),
        }
    }

    fn api(&self) -> anyhow::Result<&ApiClient> {
        self.api
            .as_ref()
            .context("this needs the admin API (--api and admin credentials)")
    }

    fn bar(&self, len: u64, what: &str) -> ProgressBar {
        if !self.progress {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new(len);
        bar.set_style(
            ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos}/{len} {per_sec} {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_message(what.to_owned());
        bar
    }

    /// Enrolls every device that has no credentials in the fleet dir yet
    /// (key made here, CSR sent): returns how many were enrolled.
    pub async fn ensure_enrolled(&self, ids: &[String]) -> anyhow::Result<usize> {
        std::fs::create_dir_all(&self.dir)?;
        let missing: Vec<String> = ids
            .iter()
            .filter(|id| !self.dir.join(format!("{id}.crt")).exists())
            .cloned()
            .collect();
        if missing.is_empty() {
            return Ok(0);
        }
        let api = self.api()?.clone();
        let bar = self.bar(missing.len() as u64, "enrolling");
        let queue = Arc::new(Mutex::new(missing.clone()));
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let (api, queue, dir, bar) =
                (api.clone(), queue.clone(), self.dir.clone(), bar.clone());
            workers.spawn(async move {
                let mut ca = None;
                loop {
                    let Some(id) = queue.lock().ok().and_then(|mut q| q.pop()) else {
                        return Ok::<_, anyhow::Error>(ca);
                    };
                    ca = Some(enroll_one(&api, &dir, &id, None).await?);
                    bar.inc(1);
                }
            });
        }
        let mut ca = None;
        while let Some(r) = workers.join_next().await {
            ca = r??.or(ca);
        }
        bar.finish_and_clear();
        if let Some(ca) = ca {
            provisioning::ca::write_file(&self.dir.join("ca.crt"), ca.as_bytes(), false)?;
        }
        Ok(missing.len())
    }
}

/// Enrolls `id` (or, if it exists already, rotates it) and writes its key
/// and certificate: the key never leaves this process but for the file.
/// Returns the CA certificate (PEM) the answer carried.
pub async fn enroll_one(
    api: &ApiClient,
    dir: &Path,
    id: &str,
    lifetime_seconds: Option<u32>,
) -> anyhow::Result<String> {
    let (key, csr) = new_key_and_csr(KeyKind::EcdsaP256, id)?;
    let body = json!({"id": id, "csr": csr, "lifetime_seconds": lifetime_seconds});
    let answer: Value = match api.post("/v1/devices", &body).await {
        Ok(v) => v,
        Err(e)
            if e.downcast_ref::<ApiFailure>()
                .is_some_and(|f| f.code == "already_exists") =>
        {
            api.post(
                &format!("/v1/devices/{id}/rotate"),
                &json!({"csr": csr, "lifetime_seconds": lifetime_seconds}),
            )
            .await?
        }
        Err(e) => return Err(e.context(format!("enrolling {id}"))),
    };
    let chain = answer["chain_pem"].as_str().context("no chain_pem")?;
    let ca = answer["ca_pem"].as_str().context("no ca_pem")?;
    provisioning::ca::write_file(
        &dir.join(format!("{id}.key")),
        key.serialize_pem().as_bytes(),
        true,
    )?;
    provisioning::ca::write_file(&dir.join(format!("{id}.crt")), chain.as_bytes(), false)?;
    Ok(ca.to_owned())
}

/// What one simulated device lived through.
#[derive(Debug, Default, Clone)]
pub struct DeviceLog {
    /// From the scenario's start to the first CONNACK.
    pub first_connect: Option<Duration>,
    pub connects: u32,
    /// When the first established connection was lost.
    pub dropped_at: Option<Instant>,
    /// Connected again after a drop.
    pub reconnected: bool,
    /// Refused at the handshake as revoked: the device stopped trying.
    pub revoked: bool,
    pub last_error: Option<String>,
    pub sent: u64,
    pub commands: u64,
    /// Certificates renewed (rotated) before expiry.
    pub renewals: u32,
}

/// Runs one device until `stop`: connect, subscribe to its commands,
/// publish telemetry every `period` (never if `None`), reconnect with
/// jittered exponential back-off.
pub async fn device(
    target: Target,
    id: String,
    period: Option<Duration>,
    start: Instant,
    log: Arc<Mutex<DeviceLog>>,
    mut stop: watch::Receiver<bool>,
    api: Option<ApiClient>,
) {
    let mut tls = match target.tls(&id) {
        Ok(t) => t,
        Err(e) => {
            set(&log, |l| l.last_error = Some(format!("credentials: {e:#}")));
            return;
        }
    };
    let mut rng = seed(&id);
    let mut backoff = Duration::from_millis(200);
    let topic = format!("devices/{id}/telemetry");
    loop {
        // Renew once a third of the certificate's life is left (if the API
        // is at hand), then connect with whatever is current.
        let renew_in = renew_after(&target.creds.join(format!("{id}.crt")));
        if renew_in == Some(Duration::ZERO) {
            if let Some(api) = &api {
                match renew(api, &target, &id).await {
                    Ok(new_tls) => {
                        tls = new_tls;
                        set(&log, |l| l.renewals += 1);
                        continue;
                    }
                    Err(e) => set(&log, |l| l.last_error = Some(format!("renewal: {e:#}"))),
                }
            }
        }
        let renew_timer = tokio::time::sleep(match (renew_in, &api) {
            (Some(d), Some(_)) if !d.is_zero() => d,
            _ => Duration::from_secs(365 * 86400),
        });
        tokio::pin!(renew_timer);
        let opts = mqtt_options(target.broker, &id, tls.clone());
        let (client, mut events) = AsyncClient::new(opts, 64);
        // Patient, like a real device in a crowd: a broker busy with a
        // connect storm answers late, and a client that gives up at the
        // default 5 s only comes back to add to the storm.
        let mut net = events.network_options();
        net.set_connection_timeout(30);
        events.set_network_options(net);
        // A random phase, as in a real fleet: devices that connected
        // together do not publish in lockstep.
        let every = period.unwrap_or(Duration::from_secs(3600));
        let phase = every.mul_f64(next_unit(&mut rng));
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + phase, every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut connected = false;
        let ended = loop {
            tokio::select! {
                _ = &mut renew_timer => {
                    // Time to renew: end this session cleanly, rotate above.
                    let _ = client.try_disconnect();
                    let _ = tokio::time::timeout(Duration::from_millis(200), events.poll()).await;
                    break "renewal".to_owned();
                }
                _ = stop.changed() => {
                    let _ = client.try_disconnect();
                    // What is still queued goes out first, and counts.
                    let until = tokio::time::Instant::now() + Duration::from_millis(500);
                    while let Ok(Ok(ev)) = tokio::time::timeout_at(until, events.poll()).await {
                        match ev {
                            Event::Outgoing(Outgoing::Publish(_)) => set(&log, |l| l.sent += 1),
                            Event::Outgoing(Outgoing::Disconnect) => break,
                            _ => {}
                        }
                    }
                    return;
                }
                _ = ticker.tick(), if connected && period.is_some() => {
                    // Counted as sent once written (below), not when queued:
                    // a message still queued when the run stops never left.
                    let _ = client.try_publish(&topic, QoS::AtMostOnce, false, &b"{\"t\":21.5}"[..]);
                }
                ev = events.poll() => match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        connected = true;
                        backoff = Duration::from_millis(200);
                        let _ = client.try_subscribe(format!("devices/{id}/commands/#"), QoS::AtLeastOnce);
                        set(&log, |l| {
                            l.connects += 1;
                            if l.first_connect.is_none() {
                                l.first_connect = Some(start.elapsed());
                            } else if l.dropped_at.is_some() {
                                l.reconnected = true;
                            }
                        });
                    }
                    Ok(Event::Incoming(Packet::Publish(_))) => set(&log, |l| l.commands += 1),
                    Ok(Event::Outgoing(Outgoing::Publish(_))) => set(&log, |l| l.sent += 1),
                    Ok(_) => {}
                    Err(e) if !connected && throttle::closed_early(&e) => break throttle::count(&e),
                    Err(e) => break e.to_string(),
                },
            }
        };
        if ended == "renewal" {
            continue;
        }
        // Refused by the registry (CONNACK not authorized; a TLS alert
        // certificate_revoked from servers that check at the handshake):
        // not something a retry mends.
        let revoked = ended.contains("NotAuthorized") || ended.contains("CertificateRevoked");
        set(&log, |l| {
            if connected && l.dropped_at.is_none() {
                l.dropped_at = Some(Instant::now());
            }
            l.revoked |= revoked;
            l.last_error = Some(ended.clone());
        });
        if revoked {
            return; // refused as revoked: stop for good
        }
        // Jittered exponential back-off: half to full of the current step.
        let jitter = throttle::next_wait(&mut backoff, next_unit(&mut rng));
        tokio::select! {
            _ = tokio::time::sleep(jitter) => {}
            _ = stop.changed() => return,
        }
    }
}

/// How long until the certificate at `path` should be renewed: zero once a
/// third or less of its lifetime is left; `None` if it cannot be read.
fn renew_after(path: &Path) -> Option<Duration> {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::from_pem_file(path).ok()?;
    let info = provisioning::ca::inspect_certificate(&der).ok()?;
    // fleetgate backdates not_before by 5 minutes for slow device clocks:
    // the lifetime runs from issuance.
    let issued = info.not_before + time::Duration::minutes(5);
    let life = info.not_after - issued.min(info.not_after);
    let renew_at = info.not_after - life / 3;
    let now = time::OffsetDateTime::now_utc();
    Some(if renew_at <= now {
        Duration::ZERO
    } else {
        Duration::try_from(renew_at - now).unwrap_or(Duration::ZERO)
    })
}

/// Rotates `id`'s certificate with a new local key, keeping the same
/// lifetime, and returns the TLS config for the new credentials.
async fn renew(
    api: &ApiClient,
    target: &Target,
    id: &str,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use rustls_pki_types::pem::PemObject;
    let path = target.creds.join(format!("{id}.crt"));
    let der = rustls_pki_types::CertificateDer::from_pem_file(&path)?;
    let info = provisioning::ca::inspect_certificate(&der)?;
    // The old lifetime less the 5-minute backdating the CA applies.
    let secs = ((info.not_after - info.not_before).whole_seconds() - 300).max(1);
    let (key, csr) = new_key_and_csr(KeyKind::EcdsaP256, id)?;
    let answer: Value = api
        .post(
            &format!("/v1/devices/{id}/rotate"),
            &json!({"csr": csr, "lifetime_seconds": u32::try_from(secs).unwrap_or(u32::MAX)}),
        )
        .await?;
    let chain = answer["chain_pem"].as_str().context("no chain_pem")?;
    provisioning::ca::write_file(
        &target.creds.join(format!("{id}.key")),
        key.serialize_pem().as_bytes(),
        true,
    )?;
    provisioning::ca::write_file(&path, chain.as_bytes(), false)?;
    target.tls(id)
}

fn set(log: &Mutex<DeviceLog>, f: impl FnOnce(&mut DeviceLog)) {
    if let Ok(mut l) = log.lock() {
        f(&mut l);
    }
}

fn seed(id: &str) -> u64 {
    id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    }) ^ Instant::now().elapsed().as_nanos() as u64
}

fn next_unit(state: &mut u64) -> f64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    (*state >> 11) as f64 / (1u64 << 53) as f64
}

/// A running set of devices.
struct Running {
    logs: Vec<(String, Arc<Mutex<DeviceLog>>)>,
    stop: watch::Sender<bool>,
    tasks: tokio::task::JoinSet<()>,
    start: Instant,
}

impl Running {
    fn spawn(fleet: &Fleet, ids: &[String], period: Option<Duration>) -> Self {
        let (stop, stop_rx) = watch::channel(false);
        let start = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        let mut logs = Vec::with_capacity(ids.len());
        for id in ids {
            let log = Arc::new(Mutex::new(DeviceLog::default()));
            logs.push((id.clone(), log.clone()));
            tasks.spawn(device(
                fleet.target(),
                id.clone(),
                period,
                start,
                log,
                stop_rx.clone(),
                fleet.api.clone(),
            ));
        }
        Self {
            logs,
            stop,
            tasks,
            start,
        }
    }

    fn snapshot(&self) -> Vec<(String, DeviceLog)> {
        self.logs
            .iter()
            .map(|(id, l)| (id.clone(), l.lock().map(|l| l.clone()).unwrap_or_default()))
            .collect()
    }

    fn connected(&self) -> usize {
        self.snapshot()
            .iter()
            .filter(|(_, l)| l.first_connect.is_some())
            .count()
    }

    /// Waits until every device connected once, or `limit` passes.
    async fn all_connected(&self, limit: Duration, bar: &ProgressBar) -> Duration {
        loop {
            let n = self.connected();
            bar.set_position(n as u64);
            if n == self.logs.len() || self.start.elapsed() > limit {
                return self.start.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn finish(mut self) -> Vec<(String, DeviceLog)> {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        self.snapshot()
    }
}

fn rss_kib(pid: Option<u32>) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid?)).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// User plus system CPU seconds of process `pid` so far.
fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid?)).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5): 12 and 13 here.
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on every Linux this runs on.
    Some(ticks as f64 / 100.0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Options every scenario takes.
#[derive(Clone, Debug)]
pub struct Options {
    pub devices: usize,
    /// Telemetry messages per device per second (steady, revoke, rogue).
    pub rate: f64,
    pub duration: Duration,
    /// Devices to revoke (revoke scenario).
    pub revoke: usize,
    /// Revoke them in one bulk call (`POST /v1/devices/revoke-batch`)
    /// instead of one call each.
    pub bulk: bool,
    /// The broker's pid, to read its memory per connection.
    pub broker_pid: Option<u32>,
    /// How long to wait for everyone to connect.
    pub connect_limit: Duration,
}

/// A scenario's figures (`--json`) and whether it met its expectations.
#[derive(Debug)]
pub struct Report {
    pub scenario: &'static str,
    pub figures: BTreeMap<String, Value>,
    pub ok: bool,
    pub problems: Vec<String>,
    /// What the figures mean, where that is not plain.
    pub notes: Vec<String>,
}

impl Report {
    fn new(scenario: &'static str) -> Self {
        Self {
            scenario,
            figures: BTreeMap::new(),
            ok: true,
            problems: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// Records how many connections the broker closed before their TLS
    /// handshake (its limits), and, if any, that the figures include the
    /// devices' waits after them.
    pub fn throttled(&mut self, n: u64) {
        self.put("closed_before_handshake", n);
        if n > 0 {
            self.notes.push(format!(
                "{n} connections were closed before the TLS handshake, {}. The devices backed \
                 off and tried again, so connect figures measure those limits too",
                throttle::HINT
            ));
        }
    }

    fn put(&mut self, k: &str, v: impl Into<Value>) {
        self.figures.insert(k.to_owned(), v.into());
    }

    fn expect(&mut self, cond: bool, problem: impl Into<String>) {
        if !cond {
            self.ok = false;
            self.problems.push(problem.into());
        }
    }

    pub fn to_json(&self) -> Value {
        json!({"scenario": self.scenario, "ok": self.ok, "problems": self.problems, "notes": self.notes, "figures": self.figures})
    }

    /// The summary table.
    pub fn table(&self) -> String {
        let mut out = format!(
            "scenario {}: {}\n",
            self.scenario,
            if self.ok { "OK" } else { "FAILED" }
        );
        for (k, v) in &self.figures {
            let v = match v {
                Value::Number(n) if n.is_f64() => format!("{:.2}", n.as_f64().unwrap_or(0.0)),
                other => other.to_string(),
            };
            out.push_str(&format!("  {k:<34} {v}\n"));
        }
        for p in &self.problems {
            out.push_str(&format!("  problem: {p}\n"));
        }
        for n in &self.notes {
            out.push_str(&format!("  note: {n}\n"));
        }
        out
    }
}

/// `storm`: every device connects at once (full handshakes).
pub async fn storm(fleet: &Fleet, o: &Options) -> anyhow::Result<Report> {
    let ids = fleet.ids(o.devices);
    fleet.ensure_enrolled(&ids).await?;
    let rss0 = rss_kib(o.broker_pid);
    let bar = fleet.bar(ids.len() as u64, "connecting");
    let run = Running::spawn(fleet, &ids, None);
    let took = run.all_connected(o.connect_limit, &bar).await;
    bar.finish_and_clear();
    let rss1 = rss_kib(o.broker_pid);
    let logs = run.finish().await;
    let mut lat: Vec<Duration> = logs.iter().filter_map(|(_, l)| l.first_connect).collect();
    lat.sort();
    let mut r = Report::new("storm");
    r.put("devices", ids.len());
    r.put("connected", lat.len());
    r.put("connects_per_s", lat.len() as f64 / took.as_secs_f64());
    r.put("connect_p50_ms", ms(percentile(&lat, 0.5)));
    r.put("connect_p99_ms", ms(percentile(&lat, 0.99)));
    r.put("connect_max_ms", ms(percentile(&lat, 1.0)));
    if let (Some(a), Some(b)) = (rss0, rss1) {
        r.put(
            "broker_rss_per_connection_kib",
            (b.saturating_sub(a)) as f64 / lat.len().max(1) as f64,
        );
    }
    r.expect(
        lat.len() == ids.len(),
        format!("{} of {} connected", lat.len(), ids.len()),
    );
    Ok(r)
}

/// `steady`: every device connects, then publishes for the duration.
pub async fn steady(fleet: &Fleet, o: &Options) -> anyhow::Result<Report> {
    let ids = fleet.ids(o.devices);
    fleet.ensure_enrolled(&ids).await?;
    let rss0 = rss_kib(o.broker_pid);
    let period = (o.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / o.rate));
    let bar = fleet.bar(ids.len() as u64, "connecting");
    let run = Running::spawn(fleet, &ids, period);
    run.all_connected(o.connect_limit, &bar).await;
    bar.finish_and_clear();
    let rss1 = rss_kib(o.broker_pid);
    let sent0: u64 = run.snapshot().iter().map(|(_, l)| l.sent).sum();
    let cpu0 = cpu_seconds(o.broker_pid);
    let t0 = Instant::now();
    tokio::time::sleep(o.duration).await;
    let sent1: u64 = run.snapshot().iter().map(|(_, l)| l.sent).sum();
    let cpu1 = cpu_seconds(o.broker_pid);
    let rss2 = rss_kib(o.broker_pid);
    let secs = t0.elapsed().as_secs_f64();
    let logs = run.finish().await;
    let sent_total: u64 = logs.iter().map(|(_, l)| l.sent).sum();
    let connected = logs
        .iter()
        .filter(|(_, l)| l.first_connect.is_some())
        .count();
    let dropped = logs.iter().filter(|(_, l)| l.dropped_at.is_some()).count();
    let mut r = Report::new("steady");
    r.put("devices", ids.len());
    r.put("connected", connected);
    r.put("dropped", dropped);
    r.put("messages_per_s", (sent1 - sent0) as f64 / secs);
    r.put("sent_total", sent_total);
    r.put("window_s", secs);
    if let (Some(a), Some(b)) = (cpu0, cpu1) {
        // The broker's CPU over the publishing window (all its threads).
        r.put("broker_cpu_s", b - a);
    }
    if let (Some(a), Some(b)) = (rss0, rss1) {
        r.put(
            "broker_rss_per_connection_kib",
            (b.saturating_sub(a)) as f64 / connected.max(1) as f64,
        );
        r.put("broker_rss_mib", b as f64 / 1024.0);
    }
    if let Some(c) = rss2 {
        r.put("broker_rss_end_mib", c as f64 / 1024.0);
    }
    r.expect(
        connected == ids.len(),
        format!("{connected} of {} connected", ids.len()),
    );
    r.expect(dropped == 0, format!("{dropped} connections dropped"));
    Ok(r)
}

/// `revoke`: the fleet connects, then K devices are revoked through the API
/// (one call each, or one bulk call); reports how fast their connections
/// end and that none gets back in. Each run has a fleet of its own (revoked
/// is final), so it never revokes the devices other scenarios use.
pub async fn revoke(fleet: &Fleet, o: &Options) -> anyhow::Result<Report> {
    let run_id = format!(
        "{}-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        std::process::id()
    );
    let ids: Vec<String> = (0..o.devices)
        .map(|i| format!("{}revoke-{run_id}-{i}", fleet.prefix))
        .collect();
    fleet.ensure_enrolled(&ids).await?;
    let api = fleet.api()?.clone();
    let k = o.revoke.min(ids.len());
    let period = (o.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / o.rate));
    let bar = fleet.bar(ids.len() as u64, "connecting");
    let run = Running::spawn(fleet, &ids, period);
    run.all_connected(o.connect_limit, &bar).await;
    bar.finish_and_clear();

    let victims: Vec<String> = ids[..k].to_vec();
    // When each revocation was asked for, and when the API answered it.
    let mut sent_at = BTreeMap::new();
    let mut answered_at = BTreeMap::new();
    let mut api_failures = 0;
    let mut api_call = Duration::ZERO;
    if o.bulk {
        let at = Instant::now();
        let r: anyhow::Result<Value> = api
            .post(
                "/v1/devices/revoke-batch",
                &json!({"ids": victims, "reason": "key-compromise"}),
            )
            .await;
        let done = Instant::now();
        api_call = done - at;
        match r {
            Ok(v) if v["revoked"].as_array().map(Vec::len) == Some(k) => {}
            _ => api_failures += 1,
        }
        for id in &victims {
            sent_at.insert(id.clone(), at);
            answered_at.insert(id.clone(), done);
        }
    } else {
        let mut calls = tokio::task::JoinSet::new();
        for id in victims.clone() {
            let api = api.clone();
            calls.spawn(async move {
                let at = Instant::now();
                let r: anyhow::Result<Value> = api
                    .post(
                        &format!("/v1/devices/{id}/revoke"),
                        &json!({"reason": "key-compromise"}),
                    )
                    .await;
                (id, at, Instant::now(), r.is_ok())
            });
        }
        while let Some(r) = calls.join_next().await {
            let (id, at, done, ok) = r?;
            if !ok {
                api_failures += 1;
            }
            api_call = api_call.max(done - at);
            sent_at.insert(id.clone(), at);
            answered_at.insert(id, done);
        }
    }
    // Time to be cut, then to try (and fail) to come back.
    tokio::time::sleep(o.duration.max(Duration::from_secs(3))).await;
    let logs = run.finish().await;
    let by_id: BTreeMap<_, _> = logs.into_iter().collect();
    let mut lat = Vec::new();
    let mut after_answer = Vec::new();
    let (mut not_cut, mut came_back, mut kept_trying) = (0, 0, 0);
    for id in &victims {
        let l = &by_id[id];
        match (l.dropped_at, sent_at.get(id), answered_at.get(id)) {
            (Some(d), Some(s), Some(a)) => {
                lat.push(d.saturating_duration_since(*s));
                after_answer.push(d.saturating_duration_since(*a));
            }
            _ => not_cut += 1,
        }
        came_back += usize::from(l.reconnected);
        kept_trying += usize::from(!l.revoked);
    }
    let bystanders_dropped = ids[k..]
        .iter()
        .filter(|id| by_id[*id].dropped_at.is_some())
        .count();
    lat.sort();
    after_answer.sort();
    let mut r = Report::new("revoke");
    r.put("devices", ids.len());
    r.put("revoked", k);
    r.put("bulk", o.bulk);
    r.put("api_call_ms", ms(api_call));
    r.put(
        "answer_to_disconnect_p50_ms",
        ms(percentile(&after_answer, 0.5)),
    );
    r.put(
        "answer_to_disconnect_p99_ms",
        ms(percentile(&after_answer, 0.99)),
    );
    r.put(
        "answer_to_disconnect_max_ms",
        ms(percentile(&after_answer, 1.0)),
    );
    r.put("revoke_to_disconnect_p50_ms", ms(percentile(&lat, 0.5)));
    r.put("revoke_to_disconnect_p99_ms", ms(percentile(&lat, 0.99)));
    r.put("revoke_to_disconnect_max_ms", ms(percentile(&lat, 1.0)));
    r.put("revoked_not_cut", not_cut);
    r.put("revoked_reconnected", came_back);
    r.put("revoked_still_retrying", kept_trying);
    r.put("bystanders_dropped", bystanders_dropped);
    r.expect(
        api_failures == 0,
        format!("{api_failures} revoke calls failed"),
    );
    r.expect(
        not_cut == 0,
        format!("{not_cut} revoked devices were not cut"),
    );
    r.expect(
        came_back == 0,
        format!("{came_back} revoked devices got back in"),
    );
    r.expect(
        kept_trying == 0,
        format!("{kept_trying} revoked devices were not refused as revoked"),
    );
    r.expect(
        bystanders_dropped == 0,
        format!("{bystanders_dropped} other devices were dropped"),
    );
    Ok(r)
}

/// Checks a fleet directory exists with a CA certificate.
pub fn check_dir(dir: &Path) -> anyhow::Result<()> {
    if !dir.join("ca.crt").exists() {
        bail!(
            "{}: no ca.crt (enroll devices with --api first)",
            dir.display()
        );
    }
    Ok(())
}

/// One churn cycle: a full handshake, CONNACK, one QoS 1 message
/// acknowledged, DISCONNECT. `Ok` only if all of that happened.
async fn churn_once(target: &Target, id: &str) -> anyhow::Result<()> {
    let opts = mqtt_options(target.broker, id, target.tls(id)?);
    let (client, mut events) = AsyncClient::new(opts, 8);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut step = Duration::from_millis(200);
    let mut connected = false;
    loop {
        match tokio::time::timeout_at(deadline, events.poll()).await {
            // Closed before the handshake (the broker's limits): again
            // after a while, as a device would (the next poll reconnects).
            Ok(Err(e)) if !connected && throttle::closed_early(&e) => {
                if let Err(why) = throttle::back_off(&e, &mut step, deadline).await {
                    bail!("{id}: {why}");
                }
            }
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                connected = true;
                client.try_publish(
                    format!("devices/{id}/telemetry"),
                    QoS::AtLeastOnce,
                    false,
                    &b"{\"churn\":1}"[..],
                )?;
            }
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => {
                client.try_disconnect()?;
                let _ = tokio::time::timeout(Duration::from_millis(200), events.poll()).await;
                return Ok(());
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => bail!("{id}: {e}"),
            Err(_) => bail!("{id}: no CONNACK and PUBACK in 30 s"),
        }
    }
}
