//! Load generation against any MQTT-over-mutual-TLS broker: fleetgate,
//! rumqttd, Mosquitto. The same bytes and the same certificates for each,
//! so their figures can stand side by side.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use rustls::client::Resumption;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Where the broker is and which credentials to use.
#[derive(Clone, Debug)]
pub struct Target {
    pub broker: SocketAddr,
    pub ca: PathBuf,
    /// Holds `<id>.crt` and `<id>.key` for every id used.
    pub creds: PathBuf,
}

impl Target {
    /// A TLS config for `id` with session resumption off: every connect is
    /// a full handshake.
    pub fn tls(&self, id: &str) -> anyhow::Result<Arc<ClientConfig>> {
        fleetgate_api::tls::install_crypto_provider();
        let cert = self.creds.join(format!("{id}.crt"));
        let key = self.creds.join(format!("{id}.key"));
        let config = fleetgate_api::tls::client_config(&self.ca, Some((&cert, &key)))?;
        let mut config = Arc::unwrap_or_clone(config);
        config.resumption = Resumption::disabled();
        Ok(Arc::new(config))
    }
}

/// Summary of a connect run.
#[derive(Debug)]
pub struct ConnectReport {
    pub connects: usize,
    pub failures: usize,
    pub elapsed: Duration,
    pub latencies: Vec<Duration>,
}

impl ConnectReport {
    pub fn per_second(&self) -> f64 {
        self.connects as f64 / self.elapsed.as_secs_f64()
    }

    pub fn percentile(&self, p: f64) -> Duration {
        percentile(&self.latencies, p)
    }
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// `total` full connects (TCP, TLS handshake, CONNECT, CONNACK, DISCONNECT)
/// spread over `ids.len()` workers, one device identity each.
pub async fn connect_storm(
    target: &Target,
    ids: &[String],
    total: usize,
) -> anyhow::Result<ConnectReport> {
    if ids.is_empty() {
        bail!("no device ids");
    }
    let left = Arc::new(AtomicU64::new(total as u64));
    let failures = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for id in ids {
        let config = target.tls(id)?;
        let connect = crate::wire::connect(id);
        let (addr, left, failures) = (target.broker, left.clone(), failures.clone());
        workers.spawn(async move {
            let mut latencies = Vec::new();
            while left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
            {
                let t = Instant::now();
                match one_connect(addr, config.clone(), &connect).await {
                    Ok(()) => latencies.push(t.elapsed()),
                    Err(_) => {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            latencies
        });
    }
    let mut latencies = Vec::with_capacity(total);
    while let Some(r) = workers.join_next().await {
        latencies.extend(r.context("connect worker")?);
    }
    let elapsed = started.elapsed();
    latencies.sort();
    Ok(ConnectReport {
        connects: latencies.len(),
        failures: failures.load(Ordering::Relaxed) as usize,
        elapsed,
        latencies,
    })
}

async fn one_connect(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    connect: &[u8],
) -> anyhow::Result<()> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = ServerName::IpAddress(addr.ip().into());
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?;
    tls.write_all(connect).await?;
    let mut connack = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), tls.read_exact(&mut connack)).await??;
    if connack[0] != 0x20 || connack[3] != 0 {
        bail!("refused: CONNACK {connack:02x?}");
    }
    tls.write_all(&crate::wire::DISCONNECT).await?;
    let _ = tls.shutdown().await;
    Ok(())
}

/// Summary of a publish run.
#[derive(Debug)]
pub struct PublishReport {
    pub sent: u64,
    pub received: u64,
    pub elapsed: Duration,
    /// From each message's send to its arrival at the subscriber, sorted.
    pub latencies: Vec<Duration>,
}

impl PublishReport {
    pub fn per_second(&self) -> f64 {
        self.received as f64 / self.elapsed.as_secs_f64()
    }

    pub fn percentile(&self, p: f64) -> Duration {
        percentile(&self.latencies, p)
    }
}

/// Microseconds since the Unix epoch: the send time a payload carries
/// (publisher and subscriber share this machine's clock).
fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// rumqttc options for `client_id` at `broker` over mutual TLS with `tls`,
/// keep-alive 30 s: what every simulated client starts from.
pub fn mqtt_options(
    broker: SocketAddr,
    client_id: impl Into<String>,
    tls: Arc<ClientConfig>,
) -> MqttOptions {
    let mut opts = MqttOptions::new(client_id, broker.ip().to_string(), broker.port());
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    opts
}

fn mqtt_client(
    target: &Target,
    id: &str,
    inflight: u16,
) -> anyhow::Result<(AsyncClient, rumqttc::EventLoop)> {
    let mut opts = mqtt_options(target.broker, id, target.tls(id)?);
    opts.set_inflight(inflight);
    opts.set_max_packet_size(1 << 20, 1 << 20);
    Ok(AsyncClient::new(opts, 1024))
}

/// `publishers` devices each publish `messages` of `size` bytes to
/// `devices/<id>/telemetry` at `qos`; `subscriber` (a service identity)
/// receives them on `devices/+/telemetry`. Throughput is what arrives.
pub async fn publish_run(
    target: &Target,
    sub_target: &Target,
    publishers: &[String],
    subscriber: &str,
    messages: u64,
    size: usize,
    qos: QoS,
) -> anyhow::Result<PublishReport> {
    let expected = messages * publishers.len() as u64;
    let (sub, mut sub_loop) = mqtt_client(sub_target, subscriber, 1000)?;
    await_connack(&mut sub_loop).await?;
    sub.subscribe("devices/+/telemetry", qos).await?;
    loop {
        match sub_loop.poll().await? {
            Event::Incoming(Packet::SubAck(_)) => break,
            _ => continue,
        }
    }
    let received = Arc::new(AtomicU64::new(0));
    let counter = {
        let received = received.clone();
        tokio::spawn(async move {
            let mut last = Instant::now();
            let mut latencies = Vec::with_capacity(expected as usize);
            loop {
                match tokio::time::timeout(Duration::from_secs(3), sub_loop.poll()).await {
                    Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                        last = Instant::now();
                        if let Some(sent) = p.payload.get(..8) {
                            let sent = u64::from_be_bytes(sent.try_into().unwrap_or_default());
                            latencies
                                .push(Duration::from_micros(now_micros().saturating_sub(sent)));
                        }
                        if received.fetch_add(1, Ordering::Relaxed) + 1 >= expected {
                            return (last, latencies);
                        }
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(_)) | Err(_) => return (last, latencies),
                }
            }
        })
    };

    let payload = vec![b'x'; size.max(8)];
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for id in publishers {
        let (client, mut eventloop) = mqtt_client(target, id, 100)?;
        await_connack(&mut eventloop).await?;
        let topic = format!("devices/{id}/telemetry");
        let payload = payload.clone();
        tasks.spawn(async move {
            let driver = tokio::spawn(async move {
                let mut acked = 0u64;
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Incoming(Packet::PubAck(_))) => {
                            acked += 1;
                            if acked >= messages {
                                return;
                            }
                        }
                        Ok(Event::Outgoing(rumqttc::Outgoing::Publish(_)))
                            if qos == QoS::AtMostOnce =>
                        {
                            acked += 1;
                            if acked >= messages {
                                // Let the last writes leave.
                                let _ = tokio::time::timeout(
                                    Duration::from_millis(200),
                                    eventloop.poll(),
                                )
                                .await;
                                return;
                            }
                        }
                        Ok(_) => {}
                        Err(_) => return,
                    }
                }
            });
            for _ in 0..messages {
                let mut payload = payload.clone();
                payload[..8].copy_from_slice(&now_micros().to_be_bytes());
                if client.publish(&topic, qos, false, payload).await.is_err() {
                    break;
                }
            }
            let _ = driver.await;
        });
    }
    while tasks.join_next().await.is_some() {}
    let (last, mut latencies) = counter.await.context("subscriber")?;
    let elapsed = last
        .saturating_duration_since(started)
        .max(Duration::from_millis(1));
    latencies.sort_unstable();
    Ok(PublishReport {
        sent: expected,
        received: received.load(Ordering::Relaxed),
        elapsed,
        latencies,
    })
}

/// What a telemetry consumer received.
#[derive(Debug)]
pub struct ConsumeReport {
    pub received: u64,
    /// From the first message to the last.
    pub span: Duration,
    /// Received per whole second of the span (for the steadiest part).
    pub per_second: Vec<u64>,
}

/// A service (`id`) subscribed to `filter` at QoS 0 counts what arrives,
/// until `idle` passes with nothing after the first message, or `limit`.
pub async fn consume(
    target: &Target,
    id: &str,
    filter: &str,
    idle: Duration,
    limit: Duration,
) -> anyhow::Result<ConsumeReport> {
    let (client, mut events) = mqtt_client(target, id, 1000)?;
    await_connack(&mut events).await?;
    client.subscribe(filter, QoS::AtMostOnce).await?;
    let started = Instant::now();
    let mut first: Option<Instant> = None;
    let mut last = Instant::now();
    let mut received = 0u64;
    let mut per_second: Vec<u64> = Vec::new();
    loop {
        // Idle counts from the last message, not the last packet: the
        // keep-alive's pings would otherwise keep a quiet consumer waiting
        // until `limit`.
        let until = match first {
            Some(_) => (last + idle).min(started + limit),
            None => started + limit,
        };
        let Some(wait) = until.checked_duration_since(Instant::now()) else {
            break;
        };
        match tokio::time::timeout(wait, events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(_)))) => {
                let now = Instant::now();
                let t0 = *first.get_or_insert(now);
                last = now;
                received += 1;
                let sec = (now - t0).as_secs() as usize;
                if per_second.len() <= sec {
                    per_second.resize(sec + 1, 0);
                }
                per_second[sec] += 1;
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => bail!("the consumer's connection failed: {e}"),
            Err(_) => break,
        }
    }
    Ok(ConsumeReport {
        received,
        span: first.map_or(Duration::ZERO, |f| last - f),
        per_second,
    })
}

async fn await_connack(eventloop: &mut rumqttc::EventLoop) -> anyhow::Result<()> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => return Ok(()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(anyhow!("connect failed: {e}")),
            Err(_) => bail!("no CONNACK within 10 s"),
        }
    }
}

/// Ids `<prefix>0 .. <prefix>(n-1)`.
pub fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

/// Checks that the credentials for every id are present.
pub fn check_creds(dir: &Path, ids: &[String]) -> anyhow::Result<()> {
    for id in ids {
        for ext in ["crt", "key"] {
            let p = dir.join(format!("{id}.{ext}"));
            if !p.exists() {
                bail!("{} is missing", p.display());
            }
        }
    }
    Ok(())
}

/// Summary of an OCSP run.
#[derive(Debug)]
pub struct OcspReport {
    pub responses: u64,
    pub failures: u64,
    pub elapsed: Duration,
    /// Each successful answer's time, request to response, sorted.
    pub latencies: Vec<Duration>,
    /// Certificates answered revoked (the rest good or unknown).
    pub revoked: u64,
    pub unknown: u64,
}

impl OcspReport {
    /// The answer time below which a fraction `p` of answers came (ms).
    pub fn percentile_ms(&self, p: f64) -> f64 {
        let n = self.latencies.len();
        if n == 0 {
            return 0.0;
        }
        let i = ((n as f64 * p) as usize).min(n - 1);
        self.latencies[i].as_secs_f64() * 1000.0
    }
}

/// POSTs OCSP requests (one random serial each, a fresh nonce each if
/// `nonce`) to `addr` from `concurrency` workers for `duration`. A new
/// connection per request unless `keep_alive`. Counts well-formed
/// successful answers.
pub async fn ocsp_run(
    addr: SocketAddr,
    issuer_der: Arc<Vec<u8>>,
    serials: Arc<Vec<provisioning::Serial>>,
    nonce: bool,
    keep_alive: bool,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<OcspReport> {
    if serials.is_empty() {
        bail!("no serials");
    }
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let revoked = Arc::new(AtomicU64::new(0));
    let unknown = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..concurrency {
        let (issuer_der, serials, ok, failed) = (
            issuer_der.clone(),
            serials.clone(),
            ok.clone(),
            failed.clone(),
        );
        let (revoked, unknown) = (revoked.clone(), unknown.clone());
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (w as u64).wrapping_mul(0x2545_f491);
            let mut conn: Option<tokio::net::TcpStream> = None;
            let mut counter = 0u64;
            while started.elapsed() < duration {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let serial = &serials[(rng % serials.len() as u64) as usize];
                counter += 1;
                let n = format!("{w}-{counter}-{rng}");
                let req = match provisioning::ocsp::build_request(
                    &issuer_der,
                    std::slice::from_ref(serial),
                    nonce.then_some(n.as_bytes()),
                ) {
                    Ok(r) => r,
                    Err(_) => return latencies,
                };
                let sent = Instant::now();
                let answer = ocsp_post(addr, &req, keep_alive, &mut conn)
                    .await
                    .ok()
                    .and_then(|body| provisioning::ocsp::read_response(&body).ok())
                    .filter(|s| s.status == 0);
                match answer {
                    Some(summary) => {
                        latencies.push(sent.elapsed());
                        ok.fetch_add(1, Ordering::Relaxed);
                        for (_, status) in summary.certs {
                            match status {
                                "revoked" => revoked.fetch_add(1, Ordering::Relaxed),
                                "unknown" => unknown.fetch_add(1, Ordering::Relaxed),
                                _ => 0,
                            };
                        }
                    }
                    None => {
                        conn = None;
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            latencies
        });
    }
    let mut latencies = Vec::new();
    while let Some(done) = tasks.join_next().await {
        latencies.extend(done.unwrap_or_default());
    }
    latencies.sort();
    Ok(OcspReport {
        responses: ok.load(Ordering::Relaxed),
        failures: failed.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
        latencies,
        revoked: revoked.load(Ordering::Relaxed),
        unknown: unknown.load(Ordering::Relaxed),
    })
}

/// One HTTP/1.1 POST of an OCSP request; the response body.
async fn ocsp_post(
    addr: SocketAddr,
    req: &[u8],
    keep_alive: bool,
    conn: &mut Option<tokio::net::TcpStream>,
) -> anyhow::Result<Vec<u8>> {
    let mut stream = match conn.take() {
        Some(s) => s,
        None => {
            let s = tokio::net::TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            s
        }
    };
    let head = format!(
        "POST / HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/ocsp-request\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n",
        req.len(),
        if keep_alive { "keep-alive" } else { "close" }
    );
    let mut msg = head.into_bytes();
    msg.extend_from_slice(req);
    stream.write_all(&msg).await?;
    // Read headers, then Content-Length bytes (or to EOF).
    let mut buf = Vec::with_capacity(2048);
    let mut chunk = [0u8; 4096];
    let (header_end, length) = loop {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk)).await??;
        if n == 0 {
            bail!("closed before the response");
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
            if !head.starts_with("http/1.1 200") && !head.starts_with("http/1.0 200") {
                bail!("HTTP error: {}", head.lines().next().unwrap_or(""));
            }
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok());
            break (i + 4, len);
        }
    };
    loop {
        if let Some(len) = length {
            if buf.len() >= header_end + len {
                break;
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk)).await??;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = buf[header_end..].to_vec();
    if keep_alive && length.is_some() {
        *conn = Some(stream);
    }
    Ok(body)
}

/// The enrollment protocols fleetgate speaks, side by side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EnrollProtocol {
    /// `POST /v1/devices`, the CSR in JSON.
    Json,
    /// EST `simpleenroll`, the CSR as base64 DER.
    Est,
    /// CMP `ir` (with implicitConfirm: one round trip, as the others).
    Cmp,
}

impl EnrollProtocol {
    pub const ALL: [EnrollProtocol; 3] = [Self::Json, Self::Est, Self::Cmp];

    pub fn name(self) -> &'static str {
        match self {
            Self::Json => "json",
            Self::Est => "est",
            Self::Cmp => "cmp",
        }
    }
}

/// One enrollment's request body, made before the clock starts: the
/// same key and subject whatever the protocol.
#[derive(Debug)]
pub struct Prepared {
    pub id: String,
    pub body: Vec<u8>,
}

/// The bodies to enroll `ids` over `protocol`, each for a new P-256 key:
/// a CSR (JSON, EST) or an `ir` protected by the admin's key, its
/// certificate first in `admin_chain` (CMP).
pub fn prepare_enrollments(
    protocol: EnrollProtocol,
    ids: &[String],
    admin_key: &rcgen::KeyPair,
    admin_chain: &[Vec<u8>],
) -> anyhow::Result<Vec<Prepared>> {
    ids.iter()
        .map(|id| {
            let key = rcgen::KeyPair::generate()?;
            let body = match protocol {
                EnrollProtocol::Json | EnrollProtocol::Est => {
                    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
                    params
                        .distinguished_name
                        .push(rcgen::DnType::CommonName, id.as_str());
                    let csr = params.serialize_request(&key)?;
                    if protocol == EnrollProtocol::Json {
                        serde_json::to_vec(&fleetgate_api::types::EnrollBody {
                            id: id.clone(),
                            csr: csr.pem()?,
                            role: None,
                            manufacturer: None,
                            lifetime_days: None,
                            lifetime_seconds: None,
                        })?
                    } else {
                        provisioning::est::to_base64(csr.der()).into_bytes()
                    }
                }
                EnrollProtocol::Cmp => provisioning::cmp::initialization_request(
                    admin_key,
                    admin_chain,
                    id,
                    &key,
                    true,
                )?,
            };
            Ok(Prepared {
                id: id.clone(),
                body,
            })
        })
        .collect()
}

/// Summary of an enrollment run.
#[derive(Debug)]
pub struct EnrollReport {
    pub enrolled: u64,
    pub failed: u64,
    /// The first failure's words.
    pub first_failure: Option<String>,
    pub elapsed: Duration,
    /// Each success's latency, sorted.
    pub latencies: Vec<Duration>,
}

impl EnrollReport {
    pub fn per_second(&self) -> f64 {
        self.enrolled as f64 / self.elapsed.as_secs_f64()
    }
}

/// Hands each of `items` to `op` from `concurrency` workers, as the
/// admin; `op` makes its requests and gives each one's latency or why it
/// failed.
async fn api_run<T, F, Fut>(
    api: &fleetgate_api::client::ApiClient,
    items: Vec<T>,
    concurrency: usize,
    op: F,
) -> EnrollReport
where
    T: Send + 'static,
    F: Fn(fleetgate_api::client::ApiClient, T) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Vec<Result<Duration, String>>> + Send,
{
    let queue = Arc::new(std::sync::Mutex::new(items));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (api, queue, op) = (api.clone(), queue.clone(), op.clone());
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            let mut failures = Vec::new();
            loop {
                let next = queue.lock().unwrap_or_else(|e| e.into_inner()).pop();
                let Some(item) = next else { break };
                for outcome in op(api.clone(), item).await {
                    match outcome {
                        Ok(took) => latencies.push(took),
                        Err(e) => failures.push(e),
                    }
                }
            }
            (latencies, failures)
        });
    }
    let mut latencies = Vec::new();
    let mut failures = Vec::new();
    while let Some(done) = tasks.join_next().await {
        if let Ok((l, f)) = done {
            latencies.extend(l);
            failures.extend(f);
        }
    }
    let elapsed = started.elapsed();
    latencies.sort();
    EnrollReport {
        enrolled: latencies.len() as u64,
        failed: failures.len() as u64,
        first_failure: failures.into_iter().next(),
        elapsed,
        latencies,
    }
}

/// Sends `prepared` over `protocol` from `concurrency` workers, one
/// connection (a full TLS handshake as the admin) per enrollment, and
/// checks each answer carries a certificate.
pub async fn enroll_run(
    api: &fleetgate_api::client::ApiClient,
    protocol: EnrollProtocol,
    prepared: Vec<Prepared>,
    concurrency: usize,
) -> EnrollReport {
    use fleetgate_api::client::{Bytes, Method, StatusCode};
    api_run(
        api,
        prepared,
        concurrency,
        move |api, p: Prepared| async move {
            let (path, ct, want) = match protocol {
                EnrollProtocol::Json => ("/v1/devices", "application/json", StatusCode::CREATED),
                EnrollProtocol::Est => (
                    "/.well-known/est/simpleenroll",
                    "application/pkcs10",
                    StatusCode::OK,
                ),
                EnrollProtocol::Cmp => ("/.well-known/cmp", "application/pkixcmp", StatusCode::OK),
            };
            let t = Instant::now();
            let outcome = match api
                .send_as(Method::POST, path, ct, Bytes::from(p.body))
                .await
            {
                Ok((status, body)) if status == want => match protocol {
                    EnrollProtocol::Cmp => provisioning::cmp::issued_certificate(&body)
                        .map(|_| ())
                        .map_err(|e| format!("{}: {e}", p.id)),
                    _ => Ok(()),
                },
                Ok((status, body)) => Err(format!(
                    "{}: HTTP {status}: {}",
                    p.id,
                    String::from_utf8_lossy(&body)
                )),
                Err(e) => Err(format!("{}: {e:#}", p.id)),
            };
            vec![outcome.map(|()| t.elapsed())]
        },
    )
    .await
}

/// Suspends and resumes each of `ids` over the JSON API (two flushed
/// status changes a device), from `concurrency` workers, as the admin:
/// what an operator's script does to many devices. Each change's latency.
pub async fn status_run(
    api: &fleetgate_api::client::ApiClient,
    ids: Vec<String>,
    concurrency: usize,
) -> EnrollReport {
    use fleetgate_api::client::{Bytes, Method, StatusCode};
    api_run(api, ids, concurrency, |api, id: String| async move {
        let mut out = Vec::with_capacity(2);
        for change in ["suspend", "resume"] {
            let t = Instant::now();
            let path = format!("/v1/devices/{id}/{change}");
            out.push(match api.send(Method::POST, &path, Bytes::new()).await {
                Ok((StatusCode::OK, _)) => Ok(t.elapsed()),
                Ok((status, body)) => Err(format!(
                    "{change} {id}: HTTP {status}: {}",
                    String::from_utf8_lossy(&body)
                )),
                Err(e) => Err(format!("{change} {id}: {e:#}")),
            });
        }
        out
    })
    .await
}
