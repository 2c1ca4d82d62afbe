//! The MQTT broker: mutual TLS terminated here, rumqttd's router behind.
//!
//! ```text
//! device --TLS--> Acceptor --handshake (RegistryVerifier)--> session task
//!                                                              |  identity, ACL
//!                                          LinkTx / LinkRx <---+
//!                                                 |
//!                                          rumqttd Router (its own thread)
//! ```
//!
//! Every live session is in [`Sessions`], by device id, with a kick channel;
//! a committed registry change ([`provisioning::events::Change`]), applied
//! by the events follower ([`crate::events`]), kicks the sessions it affects.

pub mod admission;
mod conn;
pub mod fanout;
mod handshake;
pub mod hub;
mod link;
mod presence;
mod recent;
mod remote;
pub mod seen;
mod session;
mod share;
mod signatures;

// The connection core and the pure pieces it is made of: a crate of their
// own (`mqtt-core`), which names no socket, runtime or store.
pub use fleetgate_mqtt_core::{acks, acl, channel, codec, kept, outbox, quota, stamp, Kick};

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use provisioning::{Authority, CertKey, DeviceId, Registry, Standing};
use rumqttd::local::{LinkBuilder, LinkError, LinkRx, LinkTx};
use rumqttd::{Notification, Router, RouterConfig};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};

use crate::metrics::{Metrics, Refusal};
use crate::mqtt::admission::RegistryVerifier;
use crate::mqtt::handshake::{accept, log_panic, moved, peer_of, spawn_session, Open};
use crate::net::{Accepted, Acceptor, Rate, RateLimiter, Verdict};
use crate::status::StatusService;
use provisioning::events::Change;

pub use presence::NodeSession;
pub use session::Peer;

/// The default largest MQTT packet: a 256 KiB payload and 8 KiB for its
/// topic and properties.
pub const MAX_PACKET_SIZE: usize = 256 * 1024 + 8 * 1024;

/// Topic aliases a client may set (MQTT 5 Topic Alias Maximum).
pub const TOPIC_ALIAS_MAX: u16 = 32;

#[derive(Clone, Debug)]
pub struct MqttConfig {
    pub max_connections: usize,
    /// TLS handshakes in progress at most; more are closed at once.
    pub max_handshakes: usize,
    /// New connections per second per source IP; `None` for no limit.
    pub connect_rate_per_ip: Option<crate::net::Rate>,
    pub max_packet_size: usize,
    /// Subscriptions per session; 0: no limit.
    pub max_subscriptions: usize,
    /// New topics per device per minute (token bucket); 0: no limit.
    pub new_topics_per_minute: u32,
    pub handshake_timeout: Duration,
    pub connect_timeout: Duration,
    pub drain_timeout: Duration,
    /// Workers of the runtime sessions run on (handshakes run on the
    /// process's): see [`conn`].
    pub session_threads: usize,
    /// How long a session stays where its handshake ran, from its
    /// CONNACK, before it moves to the session runtime; zero, it moves
    /// before its CONNECT is read (see [`conn`]).
    pub session_settle: Duration,
    /// Just-in-time registrations per second per manufacturer (token
    /// bucket); `None` for no limit. Each manufacturer's total is capped by
    /// its own quota, in the registry.
    pub jit_rate: Option<Rate>,
    /// OCSP requests answered per second per MQTT session (token bucket).
    pub ocsp_rate: Rate,
    /// What one subscription filter's message log in the router may hold,
    /// in bytes (topic + payload + 4 a message): older messages are dropped
    /// as it rotates, so memory under sustained traffic stays flat. A
    /// subscriber this far behind loses the oldest.
    pub router_log_bytes: usize,
    /// What one device's durable command queue may hold.
    pub queue_limits: provisioning::sessions::QueueLimits,
    /// Messages across nodes (NATS JetStream); `None` on a single node.
    pub bus: Option<Arc<crate::bus::Bus>>,
    /// This node as operators know it (the console shows it beside a
    /// device's live session): its host name and MQTT listener.
    pub node: String,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            max_handshakes: 512,
            connect_rate_per_ip: Some(crate::net::Rate {
                per_second: 100.0,
                burst: 200.0,
            }),
            max_packet_size: MAX_PACKET_SIZE,
            max_subscriptions: 100,
            new_topics_per_minute: 60,
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(5),
            session_threads: 1,
            session_settle: Duration::from_millis(500),
            jit_rate: Some(Rate {
                per_second: 20.0,
                burst: 100.0,
            }),
            ocsp_rate: Rate {
                per_second: 1.0,
                burst: 5.0,
            },
            router_log_bytes: 8 * 1024 * 1024,
            node: "this node".into(),
            queue_limits: provisioning::sessions::QueueLimits::default(),
            bus: None,
        }
    }
}

/// Makes a router link for a client id. (The router's sender type names a
/// private rumqttd type, so it is captured here rather than stored.)
pub(crate) type LinkFactory =
    Arc<dyn Fn(&str, bool) -> Result<(LinkTx, LinkRx, Notification), Box<LinkError>> + Send + Sync>;

/// What every session shares.
pub(crate) struct Shared {
    /// The runtime sessions run on ([`conn`]).
    sessions_rt: tokio::runtime::Handle,
    links: LinkFactory,
    auth: Arc<Authority>,
    /// Lifetime of certificates issued to claims' devices.
    cert_lifetime: time::Duration,
    /// The registry as this node last saw it, for admission and rechecks
    /// (read only; see [`Registry::recent`]).
    registry: Registry,
    metrics: Arc<Metrics>,
    status: Arc<StatusService>,
    sessions: Arc<Sessions>,
    /// Commands to devices, and their sessions' durable side.
    hub: Arc<hub::Hub>,
    /// Devices' messages into the router.
    ingest: link::Ingest,
    /// Live services' subscriptions, served without the router.
    fanout: Arc<fanout::Fanout>,
    /// `$share` groups with members here (with a bus).
    groups: share::Groups,
    /// Link builds wait on the router thread from the blocking pool; this
    /// caps how many do at once, so a connect storm cannot take the pool
    /// from the API's registry writes (revocations).
    link_slots: tokio::sync::Semaphore,
    /// Who may connect, and which manufacturer a chain runs through.
    verifier: Arc<RegistryVerifier>,
    /// Just-in-time registrations per manufacturer.
    jit_limiter: Option<Mutex<RateLimiter<DeviceId>>>,
    /// Clients' budgets and kept filters, across their connections.
    kept: kept::Kept,
    /// The limits SIGHUP may change while sessions run.
    live: Live,
    /// Where sessions read the time.
    clock: Arc<dyn channel::Clock>,
    cfg: MqttConfig,
}

/// The limits a running node takes from a new configuration (SIGHUP): read
/// at each use, so sessions see them from their next packet (the packet
/// size from their next connection).
#[derive(Debug)]
pub struct Live {
    max_subscriptions: std::sync::atomic::AtomicUsize,
    new_topics_per_minute: std::sync::atomic::AtomicU32,
    max_packet_size: std::sync::atomic::AtomicUsize,
}

/// New values for [`Live`]: `None` leaves one as it is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Retune {
    pub max_subscriptions: Option<usize>,
    pub new_topics_per_minute: Option<u32>,
    pub max_packet_size: Option<usize>,
}

impl Live {
    fn new(cfg: &MqttConfig) -> Self {
        Self {
            max_subscriptions: cfg.max_subscriptions.into(),
            new_topics_per_minute: cfg.new_topics_per_minute.into(),
            max_packet_size: cfg.max_packet_size.into(),
        }
    }
    pub fn max_subscriptions(&self) -> usize {
        self.max_subscriptions
            .load(std::sync::atomic::Ordering::Relaxed)
    }
    pub fn new_topics_per_minute(&self) -> u32 {
        self.new_topics_per_minute
            .load(std::sync::atomic::Ordering::Relaxed)
    }
    pub fn max_packet_size(&self) -> usize {
        self.max_packet_size
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Takes the values `r` has; leaves the others.
    pub fn apply(&self, r: &Retune) {
        use std::sync::atomic::Ordering::Relaxed;
        if let Some(v) = r.max_subscriptions {
            self.max_subscriptions.store(v, Relaxed);
        }
        if let Some(v) = r.new_topics_per_minute {
            self.new_topics_per_minute.store(v, Relaxed);
        }
        if let Some(v) = r.max_packet_size {
            self.max_packet_size.store(v, Relaxed);
        }
    }
}

#[cfg(test)]
mod live_tests {
    use super::*;

    #[test]
    fn a_retune_changes_what_it_names_and_nothing_else() {
        let live = Live::new(&MqttConfig::default());
        assert_eq!(live.max_subscriptions(), 100);
        live.apply(&Retune {
            max_subscriptions: Some(1),
            ..Retune::default()
        });
        assert_eq!(live.max_subscriptions(), 1);
        assert_eq!(live.new_topics_per_minute(), 60, "untouched");
        assert_eq!(live.max_packet_size(), MAX_PACKET_SIZE, "untouched");
        live.apply(&Retune::default());
        assert_eq!(
            live.max_subscriptions(),
            1,
            "an empty retune changes nothing"
        );
    }
}

/// Segments of each filter's message log in the router.
const ROUTER_SEGMENTS: usize = 4;

/// Concurrent router link builds at most.
const LINK_SLOTS: usize = 32;

/// Router links that carry devices' messages (each on its own thread; a
/// device always uses the same one, so its messages keep their order).
const INGEST_LINKS: usize = 4;

/// Messages waiting in front of each ingest link at most; past that,
/// publishing devices wait (and stop being read).
const INGEST_QUEUE: usize = 4096;

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// Live sessions by device id.
#[derive(Debug, Default)]
struct Sessions {
    next: AtomicU64,
    by_device: Mutex<HashMap<DeviceId, Vec<Entry>>>,
    /// Ended sessions waiting on something a new connection of the same
    /// client cancels (a delayed will, a service session's expiry).
    returns: Mutex<HashMap<DeviceId, Vec<Watcher>>>,
    /// When devices connected or left, until written to the registry.
    seen: seen::Seen,
    /// The broker is shutting down: a session registering now is told at
    /// once (see [`Sessions::shut_all`]).
    closing: std::sync::atomic::AtomicBool,
}

/// A [`Return`]'s token and the sender that fires it.
type Watcher = (u64, oneshot::Sender<()>);

/// Fires when a new connection of the client comes back ([`Sessions::watch_return`]).
struct Return<'a> {
    sessions: &'a Sessions,
    device: DeviceId,
    token: u64,
    rx: oneshot::Receiver<()>,
}

impl Return<'_> {
    /// Waits up to `delay`: whether the client came back meanwhile.
    async fn within(&mut self, delay: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
        tokio::select! {
            r = &mut self.rx => r.is_ok(),
            _ = tokio::time::sleep(delay) => false,
            _ = shutdown.changed() => false,
        }
    }
}

impl Drop for Return<'_> {
    fn drop(&mut self) {
        let mut map = self
            .sessions
            .returns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(v) = map.get_mut(&self.device) {
            v.retain(|(t, _)| *t != self.token);
            if v.is_empty() {
                map.remove(&self.device);
            }
        }
    }
}

/// A live connection, as an operator sees it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LiveSession {
    pub addr: std::net::SocketAddr,
    /// `MQTT 3.1.1` or `MQTT 5`.
    pub protocol: &'static str,
    /// The certificate it presented (hex serial).
    pub serial: String,
    #[serde(with = "time::serde::rfc3339")]
    pub since: time::OffsetDateTime,
}

#[derive(Debug)]
struct Entry {
    conn: u64,
    key: CertKey,
    /// What the console shows of it.
    live: LiveSession,
    kick: oneshot::Sender<Kick>,
}

/// Removes its session from [`Sessions`] when dropped.
struct Registration {
    sessions: Arc<Sessions>,
    device: DeviceId,
    /// This connection's number, unique in the process.
    conn: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.sessions.seen.note(&self.device);
        let mut map = self.sessions.lock();
        if let Some(v) = map.get_mut(&self.device) {
            v.retain(|e| e.conn != self.conn);
            if v.is_empty() {
                map.remove(&self.device);
            }
        }
    }
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<DeviceId, Vec<Entry>>> {
        // A panic while holding this lock leaves a plain map: still usable.
        self.by_device
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers a connection of `peer`; with `take_over`, the device's
    /// older connections are cut (MQTT 3.1.4-3: one session per client id).
    fn register(
        self: &Arc<Self>,
        peer: &Peer,
        protocol: &'static str,
        take_over: bool,
    ) -> (oneshot::Receiver<Kick>, Registration) {
        let conn = self.next.fetch_add(1, Ordering::Relaxed);
        self.seen.note(&peer.identity.id);
        let (tx, rx) = oneshot::channel();
        let back = self
            .returns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&peer.identity.id);
        for (_, back) in back.into_iter().flatten() {
            let _ = back.send(());
        }
        let mut map = self.lock();
        let registration = Registration {
            sessions: self.clone(),
            device: peer.identity.id.clone(),
            conn,
        };
        if self.closing.load(Ordering::Relaxed) {
            let _ = tx.send(Kick::Shutdown);
            return (rx, registration);
        }
        let entries = map.entry(peer.identity.id.clone()).or_default();
        if !entries.is_empty() {
            tracing::info!(device.id = %peer.identity.id, "mqtt: a new connection takes over the device's session");
            if take_over {
                for old in entries.drain(..) {
                    let _ = old.kick.send(Kick::TakenOver);
                }
            }
        }
        entries.push(Entry {
            conn,
            key: peer.key.clone(),
            live: LiveSession {
                addr: peer.addr,
                protocol,
                serial: peer.key.serial.to_hex(),
                since: time::OffsetDateTime::now_utc(),
            },
            kick: tx,
        });
        (rx, registration)
    }

    /// The live sessions of `device` on this node.
    fn live(&self, device: &DeviceId) -> Vec<LiveSession> {
        self.lock()
            .get(device)
            .map(|v| v.iter().map(|e| e.live.clone()).collect())
            .unwrap_or_default()
    }

    /// Kicks every session of `device`; returns how many.
    fn kick_device(&self, device: &DeviceId, why: Kick) -> usize {
        self.kick_devices(std::slice::from_ref(device), why)
    }

    /// Kicks every session of each of `devices`, taking the map's lock
    /// once; returns how many.
    fn kick_devices(&self, devices: &[DeviceId], why: Kick) -> usize {
        let entries: Vec<Entry> = {
            let mut map = self.lock();
            devices
                .iter()
                .filter_map(|d| map.remove(d))
                .flatten()
                .collect()
        };
        let n = entries.len();
        for e in entries {
            let _ = e.kick.send(why);
        }
        n
    }

    /// Tells every session, and each that registers from now on, that the
    /// broker is shutting down. A session hears of shutdown through its
    /// kick alone: polling the shared shutdown watch on every wake-up of
    /// every connection cost a lock of its one list of waiters each time.
    fn shut_all(&self) {
        let entries: Vec<Entry> = {
            let mut map = self.lock();
            self.closing.store(true, Ordering::Relaxed);
            map.drain().flat_map(|(_, v)| v).collect()
        };
        for e in entries {
            let _ = e.kick.send(Kick::Shutdown);
        }
    }

    /// Kicks every session using the certificate `key`.
    fn kick_cert(&self, key: &CertKey, why: Kick) -> usize {
        let mut map = self.lock();
        let mut n = 0;
        for entries in map.values_mut() {
            let (cut, keep): (Vec<Entry>, Vec<Entry>) =
                entries.drain(..).partition(|e| &e.key == key);
            *entries = keep;
            for e in cut {
                let _ = e.kick.send(why);
                n += 1;
            }
        }
        map.retain(|_, v| !v.is_empty());
        n
    }

    /// Checks every live session against the registry (after missed
    /// changes, or a change that touches many devices at once).
    fn recheck(&self, registry: &Registry, why: Kick) {
        let keys: Vec<CertKey> = self
            .lock()
            .values()
            .flat_map(|v| v.iter().map(|e| e.key.clone()))
            .collect();
        for key in keys {
            if !matches!(registry.standing(&key), Ok(Some((_, Standing::Good)))) {
                self.kick_cert(&key, why);
            }
        }
    }

    /// Whether `device` has a live session.
    /// Watches for the next connection of `device`.
    fn watch_return(&self, device: &DeviceId) -> Return<'_> {
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.returns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(device.clone())
            .or_default()
            .push((token, tx));
        Return {
            sessions: self,
            device: device.clone(),
            token,
            rx,
        }
    }

    fn count(&self) -> usize {
        self.lock().values().map(Vec::len).sum()
    }

    /// Up to `limit` ids with a live session, in id order, after `after`;
    /// and whether there are more.
    fn connected(&self, after: Option<&str>, limit: usize) -> (Vec<DeviceId>, bool) {
        let mut ids: Vec<DeviceId> = self
            .lock()
            .iter()
            .filter(|(id, v)| !v.is_empty() && after.is_none_or(|a| id.as_str() > a))
            .map(|(id, _)| id.clone())
            .collect();
        ids.sort();
        let more = ids.len() > limit;
        ids.truncate(limit);
        (ids, more)
    }
}

/// The broker: the router, the session registry, the listener.
#[derive(Debug, Clone)]
pub struct Broker {
    shared: Arc<Shared>,
    /// Where sessions run (stopped when the broker is dropped).
    _sessions_rt: Arc<conn::SessionRuntime>,
}

impl Broker {
    /// Starts rumqttd's router (on its own thread).
    pub fn new(
        auth: Arc<Authority>,
        cert_lifetime: time::Duration,
        metrics: Arc<Metrics>,
        status: Arc<StatusService>,
        verifier: Arc<RegistryVerifier>,
        cfg: MqttConfig,
    ) -> Self {
        let router = Router::new(
            0,
            RouterConfig {
                // The router never answers a link it has no room for (the
                // builder would wait forever), and sessions that just closed
                // hold their slot until the router processes their
                // DISCONNECT. Only services and the ingest links have links
                // (devices have none), but a fleet of services is not
                // bounded otherwise: room for every connection twice over
                // (slots are reserved, not touched).
                max_connections: cfg.max_connections * 2 + 64,
                max_outgoing_packet_count: 200,
                // The log rotates one segment at a time: four segments keep
                // at least three quarters of the bound.
                max_segment_size: (cfg.router_log_bytes / ROUTER_SEGMENTS).max(64 * 1024),
                max_segment_count: ROUTER_SEGMENTS,
                custom_segment: None,
                initialized_filters: None,
                shared_subscriptions_strategy: Default::default(),
            },
        );
        let router_tx = router.spawn();
        let ingest = (0..INGEST_LINKS)
            .map(|i| {
                let (tx, rx, _) = // Not a device id (those never hold a colon), so no client
                // can take the link over.
                LinkBuilder::new(&format!("fleetgate:ingest:{i}"), router_tx.clone())
                    .clean_session(true)
                    .topic_alias_max(0)
                    .build()
                    .expect("the router answers its first links");
                link::RouterTx::spawn(format!("ingest-{i}"), tx, Some(rx), INGEST_QUEUE)
                    .expect("a thread for an ingest link")
            })
            .collect();
        let links: LinkFactory = Arc::new(move |client_id: &str, clean: bool| {
            LinkBuilder::new(client_id, router_tx.clone())
                .clean_session(clean)
                .topic_alias_max(0)
                .build()
                .map_err(Box::new)
        });
        let clock: Arc<dyn channel::Clock> = Arc::new(channel::SystemClock);
        let sessions_rt =
            conn::SessionRuntime::start(cfg.session_threads).expect("a runtime for sessions");
        Self {
            shared: Arc::new(Shared {
                sessions_rt: sessions_rt.handle().clone(),
                links,
                registry: auth.registry.recent(),
                hub: Arc::new(
                    hub::Hub::new(
                        auth.registry.clone(),
                        cfg.bus.as_ref().map(|b| b.keeper()),
                        cfg.queue_limits,
                        metrics.clone(),
                        clock.clone(),
                    )
                    .with_clock_trust(auth.ca.clock().clone()),
                ),
                auth,
                cert_lifetime,
                metrics,
                status,
                sessions: Arc::default(),
                ingest: link::Ingest::new(ingest),
                fanout: fanout::Fanout::new(cfg.router_log_bytes),
                groups: share::Groups::default(),
                link_slots: tokio::sync::Semaphore::new(LINK_SLOTS),
                verifier,
                jit_limiter: cfg.jit_rate.map(|r| Mutex::new(RateLimiter::new(r))),
                kept: kept::Kept::default(),
                live: Live::new(&cfg),
                clock,
                cfg,
            }),
            _sessions_rt: Arc::new(sessions_rt),
        }
    }

    /// Follows the message bus, if there is one: what other nodes'
    /// clients publish reaches this node's router, devices' retained
    /// messages are kept here too, and commands reach devices connected
    /// here. Runs until the bus is dropped.
    pub fn follow_bus(&self) -> Option<tokio::task::JoinHandle<()>> {
        let bus = self.shared.cfg.bus.clone()?;
        presence::answer(&self.shared, &bus);
        let mut incoming = bus.follow();
        let mut taken = bus.follow_owners();
        let shared = self.shared.clone();
        Some(tokio::spawn(async move {
            loop {
                tokio::select! {
                    Some(mut i) = incoming.recv() => {
                        remote::apply(&shared, &mut i).await;
                        i.ack().await;
                    }
                    Some(client) = taken.recv() => {
                        // Another node has the client's newer connection.
                        if let Ok(id) = DeviceId::try_new(client.as_str()) {
                            // Its session is the newer connection's now:
                            // closing this one leaves it as it is.
                            shared.hub.released(&id);
                            let n = shared.sessions.kick_device(&id, Kick::TakenOver);
                            tracing::info!(client = %id, sessions = n, "mqtt: a connection on another node took over the session");
                        }
                    }
                    else => return,
                }
            }
        }))
    }

    /// Writes when devices were seen to the registry (what was noted since
    /// the last write); what cannot be written is kept for the next.
    pub async fn write_seen(&self) {
        let seen = self.shared.sessions.seen.take();
        if seen.is_empty() {
            return;
        }
        let shared = self.shared.clone();
        let r = tokio::task::spawn_blocking(move || {
            let r = shared.auth.registry.record_seen(&seen);
            if r.is_err() {
                shared.sessions.seen.put_back(seen);
            }
            r
        })
        .await;
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "mqtt: could not record when devices were last seen; kept for the next try")
            }
            Err(e) => {
                tracing::warn!(error = %e, "mqtt: recording when devices were last seen failed")
            }
        }
    }

    /// When `id` was last seen connecting or leaving: this node's note not
    /// yet written, else the registry's.
    pub fn last_seen(&self, id: &DeviceId) -> Option<time::OffsetDateTime> {
        let here = self.shared.sessions.seen.pending(id);
        let stored = self.shared.auth.registry.last_seen(id).ok().flatten();
        here.max(stored)
    }

    pub fn live_sessions(&self) -> usize {
        self.shared.sessions.count()
    }

    /// Applies new limits to the running broker (SIGHUP).
    pub fn retune(&self, r: &Retune) {
        self.shared.live.apply(r);
    }

    /// The counters this broker writes to.
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// Up to `limit` ids connected to this node, in id order, after
    /// `after`; and whether there are more.
    pub fn connected(&self, after: Option<&str>, limit: usize) -> (Vec<DeviceId>, bool) {
        self.shared.sessions.connected(after, limit)
    }

    /// The live sessions of `id` on this node.
    pub fn sessions_of(&self, id: &DeviceId) -> Vec<LiveSession> {
        self.shared.sessions.live(id)
    }

    /// Commands waiting in `id`'s durable queue (blocking: the queue may be
    /// on JetStream).
    pub fn queued_commands(
        &self,
        id: &DeviceId,
    ) -> Result<Vec<provisioning::sessions::Queued>, provisioning::Error> {
        let now_ms = self.shared.hub.expiry_now_ms();
        self.shared.hub.keeper().queued(id, None, now_ms)
    }

    /// Ends expired persistent sessions and drops expired commands, and
    /// whatever is kept for revoked or deleted devices (blocking: run it on
    /// the blocking pool).
    pub fn sweep_sessions(&self) {
        match self.shared.hub.sweep() {
            Ok(s) if s.sessions > 0 || s.messages > 0 => tracing::info!(
                sessions = s.sessions,
                messages = s.messages,
                "mqtt: ended expired sessions and dropped expired commands"
            ),
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "mqtt: sweeping sessions"),
        }
    }

    /// Cuts the live sessions a committed change takes out.
    pub fn apply(&self, change: &Change) {
        let sessions = &self.shared.sessions;
        match change {
            Change::DeviceOut { id, status } => {
                let why = if *status == provisioning::Status::Suspended {
                    Kick::Suspended
                } else {
                    Kick::Revoked
                };
                let n = sessions.kick_device(id, why);
                tracing::info!(device.id = %id, sessions = n, reason = why.as_str(), "mqtt: cutting live sessions");
                if why == Kick::Revoked {
                    self.forget(vec![id.clone()]);
                }
            }
            Change::DevicesRevoked { ids } => {
                self.forget(ids.to_vec());
                let n = sessions.kick_devices(ids, Kick::Revoked);
                tracing::info!(
                    devices = ids.len(),
                    sessions = n,
                    "mqtt: cutting the live sessions of devices revoked in bulk"
                );
            }
            Change::ManufacturerRevoked { name } => {
                let before = sessions.count();
                sessions.recheck(&self.shared.registry, Kick::ManufacturerRevoked);
                tracing::info!(manufacturer = %name, sessions = before.saturating_sub(sessions.count()), "mqtt: cut the live sessions of a revoked manufacturer's devices");
            }
            Change::CertificateRevoked { key } => {
                let n = sessions.kick_cert(key, Kick::CertificateRevoked);
                tracing::info!(serial = %key.serial, sessions = n, "mqtt: cutting sessions of a revoked certificate");
            }
            Change::Manufacturers => {}
        }
    }

    /// Drops what a cluster keeps for revoked devices (their sessions and
    /// queued commands), in the background: each node does it on the
    /// change, so one that is down does not keep them.
    fn forget(&self, ids: Vec<DeviceId>) {
        if self.shared.hub.keeper().is_local() || ids.is_empty() {
            return;
        }
        let hub = self.shared.hub.clone();
        tokio::task::spawn_blocking(move || match hub.forget(&ids) {
            Ok(n) => tracing::info!(
                devices = ids.len(),
                messages = n,
                "mqtt: dropped revoked devices' sessions and queues cluster-wide"
            ),
            Err(e) => {
                tracing::error!(error = %e, "mqtt: dropping revoked devices' queues cluster-wide")
            }
        });
    }

    /// Checks every live session's standing again (changes were missed).
    pub fn recheck_all(&self) {
        self.shared
            .sessions
            .recheck(&self.shared.registry, Kick::Revoked);
    }

    /// Accepts and serves connections until `shutdown` turns true, then
    /// tells every session to end and waits for them, within the drain time.
    pub async fn serve(
        &self,
        listener: TcpListener,
        tls: watch::Receiver<Arc<crate::mqtt_tls::MqttTls>>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let cfg = &self.shared.cfg;
        let mut incoming = Acceptor::new(
            "mqtt",
            listener,
            crate::net::AcceptLimits {
                max_connections: cfg.max_connections,
                per_ip: cfg.connect_rate_per_ip,
                max_per_ip: None,
            },
            Some(self.shared.metrics.clone()),
        );
        let handshakes = Arc::new(tokio::sync::Semaphore::new(cfg.max_handshakes.max(1)));
        let mut handshake_warning = crate::net::LogThrottle::default();
        // Handshakes in flight, on this runtime.
        let mut tasks = tokio::task::JoinSet::new();
        // Sessions, on the session runtime: counted, not joined (a join
        // would wake this runtime at the end of every connection).
        let sessions = tokio_util::task::TaskTracker::new();
        while let Some(Accepted { tcp, addr, permit }) = incoming.next(&mut shutdown).await {
            // Handshakes cost CPU: a flood of them is cut here, before any.
            let Ok(handshake) = handshakes.clone().try_acquire_owned() else {
                self.shared.metrics.refused(Refusal::Overloaded);
                if handshake_warning.ready(std::time::Instant::now()) {
                    tracing::warn!(peer.addr = %addr, max_handshakes = cfg.max_handshakes, reason = "overloaded", "mqtt: refused: too many TLS handshakes in flight; closing");
                }
                continue;
            };
            let acceptor = tls.borrow().clone();
            let shared = self.shared.clone();
            let shutdown = shutdown.clone();
            let sessions = sessions.clone();
            // Reap finished tasks so the set does not grow.
            while let Some(done) = tasks.try_join_next() {
                log_panic(done);
            }
            tasks.spawn(async move {
                // The connection's slot, held until its session ends.
                let open = Open::new(permit, &shared.metrics);
                // The handshake's state is boxed apart from the session's:
                // inline, this task would be as large as both together for
                // its whole life (most of a held connection's memory).
                let (stream, verified) =
                    Box::pin(accept(acceptor, conn::Conn::new(tcp), addr, &shared)).await;
                drop(handshake);
                let Some(mut stream) = stream else { return };
                shared.metrics.handshakes.fetch_add(1, Ordering::Relaxed);
                if verified.is_none() {
                    // The verifier did not run: a resumed session.
                    shared
                        .metrics
                        .tls_resumptions
                        .fetch_add(1, Ordering::Relaxed);
                }
                let Some(peer) = peer_of(&stream, addr, &shared.verifier, verified) else {
                    return;
                };
                let settle = shared.cfg.session_settle;
                if settle.is_zero() {
                    // All of the session on the session runtime (`conn`).
                    if moved(stream.get_mut().0, &shared, addr) {
                        let session = session::run(stream, peer, shared.clone(), shutdown, None);
                        spawn_session(&sessions, &shared, open, session);
                    }
                    return;
                }
                // Its CONNECT and first moments here; a session still open
                // after them moves to the session runtime.
                let Some(mut live) =
                    session::run(stream, peer, shared, shutdown, Some(settle)).await
                else {
                    return;
                };
                let shared = live.shared();
                if !moved(live.conn(), &shared, addr) {
                    // It ends at its next read, here.
                    return live.finish().await;
                }
                spawn_session(&sessions, &shared, open, live.finish());
            });
        }
        drop(incoming);
        // The accept loop ends only at shutdown (or with its sender gone):
        // every session hears it now, through its kick.
        self.shared.sessions.shut_all();
        if tokio::time::timeout(cfg.drain_timeout, async {
            // The handshakes first: a session they start is counted.
            while let Some(done) = tasks.join_next().await {
                log_panic(done);
            }
            sessions.close();
            sessions.wait().await;
        })
        .await
        .is_err()
        {
            tracing::warn!(
                left = tasks.len() + sessions.len(),
                "mqtt: sessions still open after the drain timeout"
            );
        }
    }
}

/// Why a connection may not have its CONNACK.
#[derive(Debug)]
pub(crate) struct Refused {
    pub reason: Refusal,
    pub detail: String,
}

impl Shared {
    /// The check before CONNACK: the certificate is in date and in good
    /// standing now (the handshake may have been a resumption, which skips
    /// the certificate verifier, and standing may have changed since), and
    /// a manufacturer's device the registry does not know yet is
    /// registered, just in time, within its manufacturer's rate and quota.
    async fn admit(&self, peer: &Peer) -> Result<(), Refused> {
        // The log names whom it refused, as the handshake's refusals do.
        self.standing_now(peer).await.map_err(|mut r| {
            r.detail = format!(
                "{} {} serial {}: {}",
                peer.identity.role, peer.identity.id, peer.key.serial, r.detail
            );
            r
        })
    }

    async fn standing_now(&self, peer: &Peer) -> Result<(), Refused> {
        let refused = |reason, detail: String| Err(Refused { reason, detail });
        let now = time::OffsetDateTime::now_utc();
        if peer.info.not_after < now {
            return refused(Refusal::Expired, "certificate has expired".into());
        }
        if peer.info.not_before > now {
            return refused(Refusal::NotYetValid, "certificate is not valid yet".into());
        }
        let internal = |e: &dyn std::fmt::Display| {
            tracing::error!(error = %e, "mqtt: registry lookup failed");
            Refused {
                reason: Refusal::Internal,
                detail: "registry lookup failed".into(),
            }
        };
        // The one registry read of an admission: off the async workers
        // where the store may block (a shared store's miss is a request
        // to the cluster).
        let lookup = {
            let (registry, key, metrics) = (
                self.registry.clone(),
                peer.key.clone(),
                self.metrics.clone(),
            );
            move || metrics.registry_lookups.time(|| registry.standing(&key))
        };
        let mut standing = if self.registry.may_block() {
            tokio::task::spawn_blocking(lookup)
                .await
                .map_err(|e| internal(&e))?
        } else {
            lookup()
        }
        .map_err(|e| internal(&e))?;
        if standing.is_none() {
            if let Some(m) = &peer.manufacturer {
                standing = self.register_jit(m, peer).await?;
            }
        }
        let Some((rec, standing)) = standing else {
            return refused(Refusal::UnknownSerial, "serial not in the registry".into());
        };
        if rec.device_id != peer.identity.id
            || rec.role != peer.identity.role
            || rec.fingerprint != peer.info.fingerprint
        {
            return refused(
                Refusal::WrongIdentity,
                "certificate does not match the registry's record of its serial".into(),
            );
        }
        match admission::refusal_for(&rec, standing) {
            None => Ok(()),
            Some((reason, detail)) => refused(reason, detail),
        }
    }

    /// Registers a manufacturer's new device (on the blocking pool, never
    /// on an async worker) and returns its standing.
    async fn register_jit(
        &self,
        m: &DeviceId,
        peer: &Peer,
    ) -> Result<Option<(provisioning::CertRecord, Standing)>, Refused> {
        if let Some(limiter) = &self.jit_limiter {
            let verdict = limiter
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .check(m.clone(), std::time::Instant::now());
            if let Verdict::Deny { .. } = verdict {
                return Err(Refused {
                    reason: Refusal::JitRateLimited,
                    detail: format!(
                        "manufacturer {m} registers new devices faster than its limit of {}/s; try again later",
                        self.cfg.jit_rate.map_or(0.0, |r| r.per_second)
                    ),
                });
            }
        }
        let (auth, m, id, info) = (
            self.auth.clone(),
            m.clone(),
            peer.identity.id.clone(),
            peer.info.clone(),
        );
        let key = peer.key.clone();
        let metrics = self.metrics.clone();
        let done = tokio::task::spawn_blocking(move || {
            let rec = auth.known_manufacturer(m.as_str())?;
            let registered = match auth.register_jit(&rec, &id, &info) {
                Ok(_) => true,
                // The id is taken: by this very certificate if the same
                // device connected twice at once, else by another (then
                // the fingerprint check refuses it).
                Err(provisioning::Error::AlreadyExists { .. })
                | Err(provisioning::Error::CertExists { .. }) => false,
                Err(e) => return Err(e),
            };
            if registered {
                metrics
                    .jit_registrations
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Ok((registered, auth.registry.standing(&key)?))
        })
        .await;
        match done {
            Ok(Ok((_, standing))) => match standing {
                Some(s) => Ok(Some(s)),
                None => Err(Refused {
                    reason: Refusal::WrongIdentity,
                    detail: "a device with this id is already registered with another certificate"
                        .into(),
                }),
            },
            Ok(Err(provisioning::Error::QuotaExceeded { reason })) => Err(Refused {
                reason: Refusal::JitQuotaExceeded,
                detail: reason,
            }),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "mqtt: just-in-time registration failed");
                Err(Refused {
                    reason: Refusal::Internal,
                    detail: "just-in-time registration failed".into(),
                })
            }
            Err(e) => {
                tracing::error!(error = %e, "mqtt: just-in-time registration task failed");
                Err(Refused {
                    reason: Refusal::Internal,
                    detail: "just-in-time registration failed".into(),
                })
            }
        }
    }
}
