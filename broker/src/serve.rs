//! `fleetgate serve`: every listener in one process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use provisioning::{Authority, InitOptions};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::{self, AppState};
use crate::https;
use crate::metrics::Metrics;
use crate::mqtt::{Broker, MqttConfig};
use crate::status::StatusService;
use crate::tls::ServerTls;

#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    /// The PIN of the PKCS#11 token the CA and signer keys are in, if
    /// they are in one (`--pin-file`).
    pub pin_file: Option<PathBuf>,
    /// etcd members' client addresses for a shared registry; `None` for
    /// the embedded one.
    pub store: Option<Vec<String>>,
    /// TLS to etcd (`--store https://`).
    pub store_tls: Option<crate::etcd::EtcdTls>,
    /// How old a node's view of an etcd registry may be and still admit.
    pub store_staleness: Duration,
    /// MiB sled's page cache holds at most (the registry, or a cluster
    /// node's MQTT sessions).
    pub registry_cache_mib: u64,
    /// Messages across nodes on NATS JetStream; `None` on a single node.
    pub nats: Option<crate::bus::BusConfig>,
    pub api_listen: SocketAddr,
    pub mqtt_listen: SocketAddr,
    pub ocsp_listen: SocketAddr,
    /// Prometheus metrics (plain HTTP, `GET /metrics`); off when `None`.
    pub metrics_listen: Option<SocketAddr>,
    /// Base URL written into certificates for OCSP and CRLs; default
    /// `http://<ocsp listen address>`.
    pub public_url: Option<String>,
    pub server_sans: Vec<String>,
    pub cert_lifetime: time::Duration,
    pub limits: https::Limits,
    pub mqtt: MqttConfig,
    /// How often the upkeep renews what is about to expire.
    pub upkeep_interval: Duration,
    /// How often the audit log is sealed, and how old an entry must be to
    /// be sealed (nothing with a lower sequence number still committing).
    pub audit_seal: Duration,
    pub audit_settle: Duration,
    /// Re-reads the configuration file on SIGHUP (`serve --config`),
    /// applies what can change at run time, and says what it did.
    pub reload_config: Option<ConfigReload>,
}

/// What SIGHUP does with the configuration file: a line for the log and
/// the limits to apply, or why the file was refused (the running
/// configuration stays).
#[derive(Clone)]
#[allow(clippy::type_complexity)]
pub struct ConfigReload(
    pub Arc<dyn Fn() -> Result<(String, crate::mqtt::Retune), String> + Send + Sync>,
);

impl std::fmt::Debug for ConfigReload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConfigReload")
    }
}

/// A server whose listeners are bound and whose data dir is open.
#[derive(Debug)]
pub struct Server {
    cfg: ServeConfig,
    auth: Arc<Authority>,
    api: TcpListener,
    mqtt: TcpListener,
    ocsp: TcpListener,
    prometheus: Option<TcpListener>,
    metrics: Arc<Metrics>,
    status: Arc<StatusService>,
    /// The CMP responder: its signer is made (or read back) while binding,
    /// so the data dir is whole once the node says it listens (the
    /// README's copy of it to another node reads no half-written file).
    cmp: Arc<crate::api::cmp::Cmp>,
    /// The shared registry's store, when on etcd.
    etcd: Option<Arc<crate::etcd::EtcdStore>>,
    /// SIGHUP, caught from the moment the listeners are bound (its
    /// default action would end the process).
    hup: Option<tokio::signal::unix::Signal>,
}

impl Server {
    /// Opens (or creates) the data dir and binds every listener. Errors here
    /// are configuration errors.
    pub async fn bind(cfg: ServeConfig) -> anyhow::Result<Self> {
        // Bound first: its address goes into the certificates we issue.
        let ocsp = TcpListener::bind(cfg.ocsp_listen)
            .await
            .with_context(|| format!("binding OCSP/CRL to {}", cfg.ocsp_listen))?;
        let status_url = match &cfg.public_url {
            Some(u) => u.trim_end_matches('/').to_owned(),
            None => format!("http://{}", ocsp.local_addr()?),
        };
        let dir = cfg.data_dir.clone();
        let metrics = Arc::new(Metrics::default());
        let etcd = match cfg.store.clone() {
            Some(endpoints) => Some(Arc::new(
                tokio::task::spawn_blocking({
                    let metrics = metrics.clone();
                    let staleness = cfg.store_staleness;
                    let tls = cfg.store_tls.clone();
                    if tls.is_none() {
                        tracing::warn!("etcd without TLS or a client certificate: anyone who reaches it can read and rewrite the registry (use --store https://... with --store-ca, --store-cert and --store-key)");
                    }
                    move || {
                        crate::etcd::EtcdStore::connect_counted(endpoints, "fleetgate/", tls, metrics)
                            .map(|s| s.with_staleness(staleness))
                    }
                })
                .await
                .context("connecting to etcd")?
                .context("the registry's etcd cluster")?,
            )),
            None => None,
        };
        let pin = cfg
            .pin_file
            .as_deref()
            .map(provisioning::keys::Pin::from_file)
            .transpose()
            .context("--pin-file")?;
        let opts = InitOptions {
            server_sans: cfg.server_sans.clone(),
            status_url: Some(status_url),
            store: etcd
                .clone()
                .map(|e| e as Arc<dyn provisioning::store::Store>),
            pin,
            cache_bytes: Some(cfg.registry_cache_mib.saturating_mul(1024 * 1024)),
            ..InitOptions::default()
        };
        let (auth, status, cmp) = tokio::task::spawn_blocking({
            let metrics = metrics.clone();
            move || -> anyhow::Result<_> {
                let auth = Arc::new(Authority::open_or_init(&dir, &opts)?);
                say_where_the_keys_are(&auth);
                let status = StatusService::new(auth.clone(), metrics)
                    .context("setting up the OCSP responder")?;
                let cmp = crate::api::cmp::Cmp::new(auth.clone())
                    .context("setting up the CMP responder")?;
                Ok((auth, Arc::new(status), Arc::new(cmp)))
            }
        })
        .await
        .context("opening the data dir")??;
        let mut cfg = cfg;
        if let Some(nats) = &cfg.nats {
            cfg.mqtt.bus = Some(
                crate::bus::Bus::connect(
                    nats,
                    &cfg.mqtt.queue_limits,
                    crate::bus::BusKey::derive(
                        &auth
                            .ca
                            .first_issuing()
                            .key()
                            .seal_secret()
                            .context("the bus seal's secret")?,
                    ),
                    metrics.clone(),
                )
                .await
                .context("the message bus (--nats)")?,
            );
        }
        let api = TcpListener::bind(cfg.api_listen)
            .await
            .with_context(|| format!("binding the admin API to {}", cfg.api_listen))?;
        let mqtt = TcpListener::bind(cfg.mqtt_listen)
            .await
            .with_context(|| format!("binding MQTT to {}", cfg.mqtt_listen))?;
        // How the console names this node beside a device's session.
        cfg.mqtt.node = format!(
            "{} ({})",
            host_name(),
            mqtt.local_addr().unwrap_or(cfg.mqtt_listen)
        );
        let prometheus = match cfg.metrics_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding metrics to {addr}"))?,
            ),
            None => None,
        };
        let hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "no SIGHUP handler; reload by restart");
                None
            }
        };
        Ok(Self {
            prometheus,
            cfg,
            auth,
            api,
            mqtt,
            ocsp,
            metrics,
            status,
            cmp,
            etcd,
            hup,
        })
    }

    pub fn api_addr(&self) -> SocketAddr {
        // A bound listener always has a local address.
        self.api.local_addr().unwrap_or(self.cfg.api_listen)
    }

    pub fn mqtt_addr(&self) -> SocketAddr {
        self.mqtt.local_addr().unwrap_or(self.cfg.mqtt_listen)
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.prometheus.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn ocsp_addr(&self) -> SocketAddr {
        self.ocsp.local_addr().unwrap_or(self.cfg.ocsp_listen)
    }

    pub fn authority(&self) -> &Arc<Authority> {
        &self.auth
    }

    /// Serves until `shutdown` turns true, then drains and flushes.
    pub async fn run(mut self, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        let metrics = self.metrics.clone();
        let tls = Arc::new(ServerTls::load(&self.auth, metrics.clone())?);
        let broker = Broker::new(
            self.auth.clone(),
            self.cfg.cert_lifetime,
            metrics.clone(),
            self.status.clone(),
            tls.mqtt_verifier(),
            self.cfg.mqtt.clone(),
        );
        // The one events follower: committed writes, applied to this node.
        // On etcd, other nodes' writes reach the feed through the watch.
        let (follower, applied) = crate::events::spawn(
            self.auth.registry.clone(),
            broker.clone(),
            tls.clone(),
            self.status.clone(),
        );
        let _bus = broker.follow_bus();
        if let Some(etcd) = &self.etcd {
            let registry = self.auth.registry.clone();
            // This node's clock against the others': a node far off issues
            // no certificate.
            let clock = crate::clock::ClusterClock::new(self.auth.ca.clock().clone());
            tokio::spawn(clock.clone().run(etcd.clone(), shutdown.clone()));
            etcd.watch(move |writes| {
                // Clock stamps change nothing in the registry: a batch of
                // them alone leaves caches (OCSP, CRLs) as they are.
                if clock.heard(&writes) < writes.len() {
                    registry.announce_remote(provisioning::registry::changes_from(&writes));
                }
            });
        }
        // What admission and OCSP read at random, into the page cache (or
        // an etcd node's view, once its watch is open), while the node
        // already answers: a restarted node's fleet reconnects at once,
        // each admission a random read.
        tokio::task::spawn_blocking({
            let registry = self.auth.registry.clone();
            let budget = self.cfg.registry_cache_mib.saturating_mul(1024 * 1024);
            move || {
                let t = std::time::Instant::now();
                match registry.warm(budget) {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(
                        records = n,
                        ms = t.elapsed().as_millis() as u64,
                        "registry: records admission reads read ahead"
                    ),
                    Err(e) => {
                        tracing::warn!(error = %e, "registry: reading the records admission reads ahead failed")
                    }
                }
            }
        });
        // Console sessions are sealed with a key every node of the cluster
        // holds (the issuing CA key's seal secret), and no one else.
        let console_secret = self
            .auth
            .ca
            .first_issuing()
            .key()
            .seal_secret()
            .context("the console's seal secret")?;
        let state = AppState {
            auth: self.auth.clone(),
            cert_lifetime: self.cfg.cert_lifetime,
            applied,
            metrics: metrics.clone(),
            tls: tls.clone(),
            broker: broker.clone(),
            status: self.status.clone(),
            cmp: self.cmp.clone(),
            console: Arc::new(crate::api::console::Console::new(&console_secret)?),
        };
        // The overview's counts, ready before an operator asks.
        crate::api::console::count_soon(&state);
        // The console's chart: the counters, sampled.
        tokio::spawn({
            let (console, metrics) = (state.console.clone(), metrics.clone());
            let mut shutdown = shutdown.clone();
            async move {
                let mut tick = tokio::time::interval(crate::api::console::Console::sample_every());
                loop {
                    tokio::select! {
                        _ = tick.tick() => console.sample(&metrics),
                        _ = shutdown.changed() => return,
                    }
                }
            }
        });
        tracing::info!(
            api = %self.api_addr(),
            mqtt = %self.mqtt_addr(),
            ocsp = %self.ocsp_addr(),
            devices = self.auth.registry.device_count(),
            "serving"
        );

        // Persistent sessions: what expired while we were down, and then
        // every ten minutes (expiry is also checked on every use).
        let sweeper = tokio::spawn({
            let broker = broker.clone();
            let mut shutdown = shutdown.clone();
            async move {
                loop {
                    let b = broker.clone();
                    let _ = tokio::task::spawn_blocking(move || b.sweep_sessions()).await;
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(600)) => {}
                        _ = shutdown.changed() => return,
                    }
                }
            }
        });
        // When devices were last seen: written in batches.
        tokio::spawn({
            let broker = broker.clone();
            let mut shutdown = shutdown.clone();
            async move {
                let mut tick = tokio::time::interval(crate::mqtt::seen::INTERVAL);
                loop {
                    tokio::select! {
                        _ = tick.tick() => broker.write_seen().await,
                        _ = shutdown.changed() => return,
                    }
                }
            }
        });
        // The audit log's seal: what settled since the last checkpoint,
        // chained and signed (every node tries; one commits each).
        tokio::spawn({
            let (auth, mut shutdown) = (self.auth.clone(), shutdown.clone());
            let (every, settle) = (self.cfg.audit_seal, self.cfg.audit_settle);
            async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = shutdown.changed() => return,
                    }
                    let auth = auth.clone();
                    let sealed =
                        tokio::task::spawn_blocking(move || seal_audit(&auth, settle)).await;
                    if let Ok(Err(e)) = sealed {
                        tracing::warn!(error = %e, "audit: sealing failed; trying again later");
                    }
                }
            }
        });
        let upkeep = tokio::spawn(
            Upkeep {
                auth: self.auth.clone(),
                tls: tls.clone(),
                status: self.status.clone(),
                sans: self.cfg.server_sans.clone(),
                every: self.cfg.upkeep_interval,
                reload_config: self.cfg.reload_config.clone(),
                hup: self.hup.take(),
                broker: broker.clone(),
            }
            .run(shutdown.clone()),
        );
        let ocsp = serve_http(
            "ocsp",
            self.ocsp,
            crate::status_routes::router(self.status.clone()),
            self.cfg.limits.clone(),
            shutdown.clone(),
        );
        let prometheus = self.prometheus.map(|listener| {
            let (metrics, broker, auth) = (metrics.clone(), broker.clone(), self.auth.clone());
            let status = self.status.clone();
            let app = axum::Router::new().route(
                "/metrics",
                axum::routing::get(move || {
                    let expiries = expiries(&auth, &status);
                    let text = metrics.prometheus(
                        auth.registry.device_count(),
                        broker.live_sessions(),
                        &expiries,
                    );
                    async move {
                        (
                            [(
                                axum::http::header::CONTENT_TYPE,
                                "text/plain; version=0.0.4",
                            )],
                            text,
                        )
                    }
                }),
            );
            serve_http(
                "metrics",
                listener,
                app,
                self.cfg.limits.clone(),
                shutdown.clone(),
            )
        });
        let mqtt = {
            let broker = broker.clone();
            let rx = tls.mqtt();
            let shutdown = shutdown.clone();
            let listener = self.mqtt;
            tokio::spawn(async move { broker.serve(listener, rx, shutdown).await })
        };
        https::serve(
            "api",
            self.api,
            Some(tls.api()),
            api::router(state),
            self.cfg.limits.clone(),
            shutdown,
        )
        .await;
        // The API is down: nothing writes any more.
        let _ = mqtt.await;
        let _ = ocsp.await;
        if let Some(p) = prometheus {
            let _ = p.await;
        }
        follower.abort();
        upkeep.abort();
        sweeper.abort();
        // The connections closed: when each device was last seen.
        broker.write_seen().await;
        let auth = self.auth.clone();
        tokio::task::spawn_blocking(move || auth.registry.flush())
            .await
            .context("flushing the registry")??;
        tracing::info!("stopped; registry flushed");
        Ok(())
    }
}

/// Serves a plain-HTTP router until `shutdown` turns true, with the same
/// connection cap and header timeout as the admin API.
fn serve_http(
    name: &'static str,
    listener: TcpListener,
    app: axum::Router,
    limits: https::Limits,
    shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(https::serve(name, listener, None, app, limits, shutdown))
}

/// Renews the server certificate and the OCSP signing certificate before
/// they expire, and reloads TLS and the OCSP signers on SIGHUP (after a
/// certificate was replaced on disk, or a manufacturer's CA key copied in).
/// Seals what settled of the audit log, a segment at a time.
fn seal_audit(auth: &Authority, settle: Duration) -> Result<(), provisioning::Error> {
    let settle = time::Duration::try_from(settle).unwrap_or(time::Duration::seconds(30));
    // A bounded amount per tick: a long backlog is sealed over a few.
    for _ in 0..100 {
        match auth.seal_audit(settle, 1000)? {
            Some(c) => tracing::debug!(seq = c.seq, count = c.count, "audit: sealed"),
            None => break,
        }
    }
    Ok(())
}

/// What renews and reloads in the background: the OCSP signer and the
/// server certificate when due, and everything SIGHUP re-reads.
struct Upkeep {
    auth: Arc<Authority>,
    tls: Arc<ServerTls>,
    status: Arc<StatusService>,
    sans: Vec<String>,
    every: Duration,
    reload_config: Option<ConfigReload>,
    hup: Option<tokio::signal::unix::Signal>,
    broker: Broker,
}

impl Upkeep {
    async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let Upkeep {
            auth,
            tls,
            status,
            sans,
            every,
            reload_config,
            mut hup,
            broker,
        } = self;
        let mut tick = tokio::time::interval(every);
        tick.tick().await; // the first tick is now; start-up already checked
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let s = status.clone();
                    match tokio::task::spawn_blocking(move || s.renew_signer_if_needed()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => tracing::error!(error = %e, "renewing the OCSP signing certificate"),
                        Err(e) => tracing::error!(error = %e, "OCSP signer renewal task"),
                    }
                    let (a, s) = (auth.clone(), sans.clone());
                    match tokio::task::spawn_blocking(move || a.renew_server_cert_if_needed(&s)).await {
                        Ok(Ok(true)) => {
                            if let Err(e) = tls.reload() {
                                tracing::error!(error = %e, "reloading TLS after renewal");
                            }
                        }
                        Ok(Ok(false)) => {}
                        Ok(Err(e)) => tracing::error!(error = %e, "renewing the server certificate"),
                        Err(e) => tracing::error!(error = %e, "renewal task"),
                    }
                }
                Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                    tracing::info!("SIGHUP: reloading the configuration file, the issuing CAs, TLS and the OCSP signers");
                    if let Some(reload) = &reload_config {
                        match (reload.0)() {
                            Ok((said, retune)) => {
                                broker.retune(&retune);
                                tracing::info!("SIGHUP: configuration file: {said}");
                            }
                            Err(e) => tracing::error!(error = %e, "SIGHUP: the configuration file is refused; the running configuration stays"),
                        }
                    }
                    // Issuing CA generations copied in from another node.
                    if let Err(e) = auth.reload_issuing() {
                        tracing::error!(error = %e, "reloading the issuing CAs; keeping the old ones");
                    }
                    if let Err(e) = tls.reload() {
                        tracing::error!(error = %e, "reloading TLS; keeping the old certificate");
                    }
                    // Manufacturer CA keys copied in from another node.
                    if let Err(e) = status.reload() {
                        tracing::error!(error = %e, "reloading the OCSP signers; keeping the old ones");
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// A shutdown signal: turns true on SIGINT or SIGTERM.
pub fn shutdown_on_signals() -> anyhow::Result<watch::Receiver<bool>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let which = tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        };
        tracing::info!(signal = which, "shutting down");
        let _ = tx.send(true);
    });
    Ok(rx)
}

/// One line at start on where the root is, and what needs a ceremony soon.
fn say_where_the_keys_are(auth: &Authority) {
    let issuing = auth.ca.issuing().key().location();
    if auth.ca.root_online() {
        tracing::info!(
            issuing_key = %issuing,
            "the root CA's key is in the data dir ({}): fine to start with; in production keep \
             it offline (fleetgate ca init --root-out; README: Protecting the CA keys)",
            auth.paths.root_key().display()
        );
        return;
    }
    tracing::info!(
        issuing_key = %issuing,
        "the root CA is offline: a new manufacturer CA (fleetgate manufacturer create NAME \
             --root-dir ROOTDIR), the root's CRL (fleetgate ca crl --root-dir ROOTDIR) and its OCSP \
             responder (fleetgate ca responder --root-dir ROOTDIR) are signed at ceremonies"
    );
    let soon = time::OffsetDateTime::now_utc() + provisioning::ceremony::CEREMONY_DUE_BEFORE;
    match provisioning::ceremony::not_after(&auth.paths.root_ocsp_cert()) {
        Ok(t) if t < soon => tracing::warn!(
            expires = %t,
            "the root's OCSP responder certificate runs out soon: run fleetgate ca responder \
             --root-dir ROOTDIR --data-dir DIR"
        ),
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(error = %e, "the root's OCSP responder: OCSP for the issuing CA will fail")
        }
    }
}

/// When each certificate the node depends on runs out (Unix time), for the
/// metrics: the root, the current issuing CA, the server certificate, the
/// OCSP signer, and where the root is offline its responder and CRL.
fn expiries(auth: &Authority, status: &StatusService) -> Vec<(&'static str, i64)> {
    use provisioning::ceremony::{crl_next_update, not_after};
    let of_der = |der: &[u8]| {
        x509_parser::parse_x509_certificate(der)
            .ok()
            .map(|(_, c)| c.validity().not_after.timestamp())
    };
    let mut out = Vec::new();
    out.extend(of_der(auth.ca.root_der()).map(|t| ("root_ca", t)));
    out.extend(of_der(&auth.ca.issuing().der).map(|t| ("issuing_ca", t)));
    out.extend(
        not_after(&auth.paths.server_cert())
            .ok()
            .map(|t| ("server", t.unix_timestamp())),
    );
    out.extend(
        status
            .responder()
            .signer_expires
            .map(|t| ("ocsp_signer", t.unix_timestamp())),
    );
    if !auth.ca.root_online() {
        out.extend(
            not_after(&auth.paths.root_ocsp_cert())
                .ok()
                .map(|t| ("root_ocsp_responder", t.unix_timestamp())),
        );
        out.extend(
            crl_next_update(&auth.paths.root_crl())
                .ok()
                .flatten()
                .map(|t| ("root_crl", t.unix_timestamp())),
        );
    }
    out
}

/// This host's name, as the kernel has it (`localhost` if unreadable).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}
