//! Messages across nodes, on NATS JetStream (`serve --nats URL`).
//!
//! Every message a client publishes into this node's router is also put on
//! one JetStream stream, `FLEETGATE_MSG`, under
//! `fleetgate.msg.<node name>.<run>.<client id>`, with the sender's role and identity
//! stamp as headers and the message itself in the layout the session store
//! keeps ([`Message::to_bytes`]). Every node follows the stream through a
//! durable consumer of its own and hands what other nodes put there to its
//! router (so services here see devices there), keeps devices' retained
//! messages, and hands commands to devices connected here.
//!
//! A QoS 1 message is acknowledged to its sender only once JetStream has
//! stored it (on a majority of the stream's replicas); if that fails the
//! sender is refused (MQTT 5: PUBACK 0x80; 3.1.1: the connection closes, so
//! the client sends it again). A QoS 0 message that cannot be put on the
//! bus reaches this node only, and is counted. One sender's messages go out
//! on one NATS connection in order, and each node's consumer reads the
//! stream in order: per sender, other nodes see them in order.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::{self, consumer, stream};
use async_nats::HeaderMap;
use futures_util::StreamExt;
use provisioning::sessions::Message;
use provisioning::Role;
use tokio::sync::{mpsc, watch};

use provisioning::printable;
use provisioning::sessions::Keeper;

pub mod ask;
pub mod keeper;
pub mod seal;
mod streams;

pub use seal::BusKey;

/// What the bus counts, told to whoever watches it (the broker's metrics).
pub trait Observer: Send + Sync + std::fmt::Debug {
    /// A message put on the stream (QoS 1: once JetStream stored it,
    /// `stored_after` its publish).
    fn published(&self, stored_after: Option<Duration>);
    /// A message that could not be put on the stream.
    fn publish_failed(&self);
    /// A message another node put there, taken.
    fn received(&self);
    /// A message on the stream that is not fleetgate's (or not sealed),
    /// dropped.
    fn dropped(&self);
}

/// An observer that counts nothing.
#[derive(Debug, Default)]
pub struct Unobserved;

impl Observer for Unobserved {
    fn published(&self, _: Option<Duration>) {}
    fn publish_failed(&self) {}
    fn received(&self) {}
    fn dropped(&self) {}
}

/// The stream every node publishes to and follows.
pub const STREAM: &str = "FLEETGATE_MSG";

/// Subjects: `fleetgate.msg.<node name>.<run>.<client id>`: the node's
/// name (its NATS certificate's CN) is a token of its own, so NATS
/// permissions can let each node publish under its own name only.
const PREFIX: &str = "fleetgate.msg.";

const ROLE: &str = "fleetgate-role";
const STAMP: &str = "fleetgate-stamp";
/// On a command: where the sending node put it in the device's queue
/// ([`keeper`]), so that the node the device is on delivers that entry.
const QUEUED: &str = "fleetgate-queued";

/// Which node holds each client's session: the last message on
/// `fleetgate.owner.<client id>` names it (one kept per subject: a
/// key-value bucket made of a plain stream, which NATS 2.9 serves).
pub const OWNERS: &str = "FLEETGATE_OWNERS";
const OWNER_PREFIX: &str = "fleetgate.owner.";

/// How long a QoS 1 publish may wait for JetStream's ack.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// How the node uses NATS.
#[derive(Clone, Debug)]
pub struct BusConfig {
    /// NATS servers, `tls://host:port` or `nats://host:port` (any of one
    /// cluster).
    pub servers: Vec<String>,
    /// The CA of the servers' certificates (PEM); the system's otherwise.
    pub ca: Option<std::path::PathBuf>,
    /// This node's client certificate and key (PEM).
    pub identity: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// Replicas of the stream (1, or 3 on a three-server cluster).
    pub replicas: usize,
    /// How long the stream keeps a message.
    pub max_age: Duration,
}

/// This node's side of the bus.
#[derive(Debug)]
pub struct Bus {
    client: async_nats::Client,
    js: jetstream::Context,
    /// This run's name on the bus (random, so a restarted node starts
    /// with what is new, not with what it missed while down).
    node: String,
    /// `<name>.<run>`: where this node's messages go under [`PREFIX`].
    sender: String,
    metrics: Arc<dyn Observer>,
    /// Session ownership, cluster-wide (MQTT: one session per client id).
    owners: stream::Stream,
    /// The owners' revision of this node's last claim of each client.
    claims: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    /// Devices' persistent sessions and queues, cluster-wide.
    keeper: Arc<keeper::JetStreamKeeper>,
    /// Seals what this node puts on NATS, and checks what it takes off.
    key: BusKey,
}

/// This node's claim of a client's session, while the session lasts.
#[derive(Debug)]
pub struct Claim {
    bus: Arc<Bus>,
    client: String,
    seq: u64,
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut claims = self
            .bus
            .claims
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Unless a newer connection here claimed it since.
        if claims.get(&self.client) == Some(&self.seq) {
            claims.remove(&self.client);
        }
    }
}

/// A message another node put on the bus.
#[derive(Debug)]
pub struct Incoming {
    /// Who published it, as it connected there.
    pub client: String,
    pub role: Role,
    /// The sender's identity stamp (`stamp::of`), empty for a service.
    pub stamp: String,
    pub message: Message,
    /// A command's place in its device's queue, if the sender queued it.
    pub queued: Option<u64>,
    acker: jetstream::Message,
}

impl Incoming {
    /// Done with it: the stream need not send it to this node again.
    pub async fn ack(self) {
        self.into_acker().ack().await;
    }

    /// What acknowledges it later, once whoever takes it is done with it.
    pub fn into_acker(self) -> Acker {
        Acker(self.acker)
    }
}

/// Acknowledges one message to the stream, once its taker is done with it.
pub struct Acker(jetstream::Message);

impl std::fmt::Debug for Acker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Acker").field(&self.0.subject).finish()
    }
}

impl Acker {
    /// Done with it: the stream need not send it again.
    pub async fn ack(self) {
        if let Err(e) = self.0.ack().await {
            tracing::debug!(error = %e, "bus: ack failed; it may come again");
        }
    }

    /// Not taken: the stream sends it again now (to whichever puller asks
    /// next), not after its acknowledgement wait.
    pub async fn nak(self) {
        if let Err(e) = self.0.ack_with(jetstream::AckKind::Nak(None)).await {
            tracing::debug!(error = %e, "bus: nak failed; it comes again after its wait");
        }
    }
}

/// Resolves once a message is stored (at once for one nobody waits on).
pub type Stored = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), BusError>> + Send>>;

/// Why a message did not go on the bus.
#[derive(Debug, thiserror::Error)]
#[error("message bus: {0}")]
pub struct BusError(String);

fn random_name() -> String {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 6];
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Bus {
    /// Connects to NATS and makes sure the streams are there; fails if no
    /// server answers. `limits` are what one device's command queue may
    /// hold (every node the same).
    pub async fn connect(
        cfg: &BusConfig,
        limits: &provisioning::sessions::QueueLimits,
        key: BusKey,
        metrics: Arc<dyn Observer>,
    ) -> anyhow::Result<Arc<Bus>> {
        let node = random_name();
        let addrs = cfg
            .servers
            .iter()
            .map(|s| s.parse::<async_nats::ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .context("a NATS server address")?;
        let mut opts = async_nats::ConnectOptions::new()
            .name(format!("fleetgate-{node}"))
            .connection_timeout(Duration::from_secs(5))
            .retry_on_initial_connect();
        let tls = cfg.servers.iter().any(|s| s.starts_with("tls://"))
            || cfg.ca.is_some()
            || cfg.identity.is_some();
        if tls {
            for path in cfg
                .ca
                .iter()
                .chain(cfg.identity.iter().flat_map(|(c, k)| [c, k]))
            {
                std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
            }
            opts = opts.require_tls(true);
            if let Some(ca) = &cfg.ca {
                opts = opts.add_root_certificates(ca.clone());
            }
            if let Some((cert, key)) = &cfg.identity {
                opts = opts.add_client_certificate(cert.clone(), key.clone());
            }
        } else {
            tracing::warn!("bus: NATS without TLS or a client certificate: anyone who reaches it can read and inject messages (use tls:// with --nats-ca, --nats-cert and --nats-key)");
        }
        let client = opts.connect(addrs).await.context("connecting to NATS")?;
        let version = client.server_info().version;
        if too_old(&version) {
            tracing::warn!(version = %version, "bus: nats-server {version} is older than 2.10: under partitions and restarts, releases before 2.10 were seen to lose acknowledged commands and session records (fleetgate's fault harness, Debian 12's 2.9.10); use 2.10 or later");
        }
        let js = jetstream::new(client.clone());
        let stream = streams::ensure(
            &js,
            stream::Config {
                name: STREAM.into(),
                subjects: vec![format!("{PREFIX}>")],
                storage: stream::StorageType::File,
                num_replicas: cfg.replicas.max(1),
                max_age: cfg.max_age,
                discard: stream::DiscardPolicy::Old,
                ..Default::default()
            },
        )
        .await?;
        drop(stream);
        let owners = streams::ensure(
            &js,
            stream::Config {
                name: OWNERS.into(),
                subjects: vec![format!("{OWNER_PREFIX}>")],
                storage: stream::StorageType::File,
                num_replicas: cfg.replicas.max(1),
                max_messages_per_subject: 1,
                discard: stream::DiscardPolicy::Old,
                ..Default::default()
            },
        )
        .await?;
        let keeper = Arc::new(
            keeper::JetStreamKeeper::open(&client, &js, cfg.replicas, limits, key.clone()).await?,
        );
        tracing::info!(node = %node, servers = ?cfg.servers, "bus: on NATS JetStream");
        let name = node_name(cfg)?;
        Ok(Arc::new(Bus {
            client,
            js,
            sender: format!("{name}.{node}"),
            node,
            metrics,
            owners,
            claims: std::sync::Mutex::default(),
            keeper,
            key,
        }))
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// Where devices' persistent sessions and queues are kept.
    pub fn keeper(&self) -> Arc<dyn Keeper> {
        self.keeper.clone()
    }

    /// Whether NATS is there now: without it, nothing waits on it (the
    /// client reconnects in the background).
    fn connected(&self) -> Result<(), BusError> {
        match self.client.connection_state() {
            async_nats::connection::State::Connected => Ok(()),
            _ => Err(BusError("NATS is not connected".into())),
        }
    }

    /// Puts `m`, published here by `client`, on the bus for other nodes.
    /// With `stored`, what this returns resolves once JetStream has stored
    /// it: the message is on its way when this returns (so one sender's
    /// messages keep their order), and several can wait for their acks
    /// at once. `queued`: a command's place in its device's queue.
    pub async fn publish(
        &self,
        client: &str,
        role: Role,
        stamp: &str,
        m: &Message,
        stored: bool,
        queued: Option<u64>,
    ) -> Result<Stored, BusError> {
        let subject = format!("{PREFIX}{}.{client}", self.sender);
        let mut headers = HeaderMap::new();
        headers.insert(ROLE, role.to_string().as_str());
        if !stamp.is_empty() {
            headers.insert(STAMP, stamp);
        }
        let queued = queued.map(|q| q.to_string()).unwrap_or_default();
        if !queued.is_empty() {
            headers.insert(QUEUED, queued.as_str());
        }
        let payload: bytes::Bytes = m.to_bytes().into();
        let seal = self.key.seal(&[
            subject.as_bytes(),
            role.as_str().as_bytes(),
            stamp.as_bytes(),
            queued.as_bytes(),
            &payload,
        ]);
        headers.insert(seal::HEADER, seal.as_str());
        let metrics = self.metrics.clone();
        let fail = move |metrics: &Arc<dyn Observer>, e: String| {
            metrics.publish_failed();
            BusError(e)
        };
        self.connected().map_err(|e| fail(&metrics, e.0))?;
        if !stored {
            // Captured by the stream all the same; nobody waits for it.
            self.client
                .publish_with_headers(subject, headers, payload)
                .await
                .map_err(|e| fail(&metrics, e.to_string()))?;
            self.metrics.published(None);
            return Ok(Box::pin(std::future::ready(Ok(()))));
        }
        let t0 = std::time::Instant::now();
        let ack = self
            .js
            .publish_with_headers(subject, headers, payload)
            .await
            .map_err(|e| fail(&metrics, e.to_string()))?;
        Ok(Box::pin(async move {
            tokio::time::timeout(ACK_TIMEOUT, ack)
                .await
                .map_err(|_| fail(&metrics, "JetStream did not store it within 5 s".into()))?
                .map_err(|e| fail(&metrics, e.to_string()))?;
            metrics.published(Some(t0.elapsed()));
            Ok(())
        }))
    }

    /// Claims `client`'s session for this node, cluster-wide: the node
    /// that held it cuts its connection (see [`Bus::follow_owners`]).
    /// Held while the session lasts: dropping it forgets the claim here.
    pub async fn claim(self: &Arc<Self>, client: &str) -> Result<Claim, BusError> {
        self.connected()?;
        let subject = format!("{OWNER_PREFIX}{client}");
        let mut headers = HeaderMap::new();
        let seal = self.key.seal(&[subject.as_bytes(), self.node.as_bytes()]);
        headers.insert(seal::HEADER, seal.as_str());
        let put = async {
            self.js
                .publish_with_headers(subject, headers, self.node.clone().into())
                .await?
                .await
        };
        let ack = tokio::time::timeout(ACK_TIMEOUT, put)
            .await
            .map_err(|_| BusError("claiming the session: no answer within 5 s".into()))?
            .map_err(|e| BusError(format!("claiming the session: {e}")))?;
        self.claims
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(client.to_owned(), ack.sequence);
        Ok(Claim {
            bus: self.clone(),
            client: client.to_owned(),
            seq: ack.sequence,
        })
    }

    /// The clients whose sessions another node has claimed since this
    /// node last did: their connections here are to be cut.
    pub fn follow_owners(self: &Arc<Self>) -> mpsc::Receiver<String> {
        let (tx, rx) = mpsc::channel(1024);
        let bus = self.clone();
        tokio::spawn(async move {
            loop {
                match bus.watch_owners().await {
                    Ok(mut claims) => {
                        while let Some(c) = claims.next().await {
                            let Ok(c) = c else { break };
                            let Ok(info) = c.info() else { continue };
                            let seq = info.stream_sequence;
                            let Some(key) = c.subject.as_str().strip_prefix(OWNER_PREFIX) else {
                                continue;
                            };
                            let sealed = c.headers.as_ref().and_then(|h| h.get(seal::HEADER));
                            if !bus.key.verify(
                                &[c.subject.as_bytes(), &c.payload],
                                sealed.map(|v| v.as_str()),
                            ) {
                                bus.metrics.dropped();
                                tracing::warn!(reason = "bus", subject = %printable(c.subject.as_str()), "bus: dropped a takeover claim no node sealed");
                                continue;
                            }
                            if c.payload == bus.node.as_bytes() {
                                continue;
                            }
                            let taken = {
                                let mut mine = bus
                                    .claims
                                    .lock()
                                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                                match mine.get(key) {
                                    Some(at) if *at < seq => {
                                        mine.remove(key);
                                        true
                                    }
                                    _ => false,
                                }
                            };
                            if taken && tx.send(key.to_owned()).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "bus: watching session owners; resuming")
                    }
                }
                if tx.is_closed() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        rx
    }

    /// Every claim from now on, in order (an ordered consumer: nothing to
    /// acknowledge, nothing left behind).
    async fn watch_owners(&self) -> anyhow::Result<consumer::pull::Ordered> {
        let consumer = self
            .owners
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: format!("{OWNER_PREFIX}>"),
                deliver_policy: consumer::DeliverPolicy::New,
                ..Default::default()
            })
            .await?;
        Ok(consumer.messages().await?)
    }

    /// Follows the stream from now on: what other nodes put there comes
    /// out of the returned channel, in the stream's order. Resumes after
    /// NATS comes back.
    pub fn follow(self: &Arc<Self>) -> mpsc::Receiver<Incoming> {
        let name = format!("node-{}", self.node);
        let skip = Some(format!("{PREFIX}{}.", self.sender));
        // A node that went away leaves no consumer behind.
        self.pull(name, skip, Duration::from_secs(600), 1024).0
    }

    /// Share group `group`'s messages for `filter` (every node's, this
    /// one's too), from now on: one durable consumer per group and filter,
    /// which every node with members pulls from, so that JetStream hands
    /// each message to one of them. The node stops pulling when the
    /// returned channel is dropped; a consumer nobody pulls goes away.
    /// The flag turns true once the consumer exists: from then on, what
    /// any node stores reaches the group.
    pub fn follow_group(
        self: &Arc<Self>,
        group: &str,
        filter: &str,
    ) -> (mpsc::Receiver<Incoming>, watch::Receiver<bool>) {
        let digest = ring::digest::digest(
            &ring::digest::SHA256,
            format!("{group}\0{filter}").as_bytes(),
        );
        let hex: String = digest.as_ref()[..12]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        self.pull(format!("share-{hex}"), None, Duration::from_secs(60), 256)
    }

    /// Pulls durable consumer `name` into a channel, skipping subjects
    /// under `skip`, until the channel is dropped; and a flag that turns
    /// true once the consumer exists.
    fn pull(
        self: &Arc<Self>,
        name: String,
        skip: Option<String>,
        inactive: Duration,
        room: usize,
    ) -> (mpsc::Receiver<Incoming>, watch::Receiver<bool>) {
        let (tx, rx) = mpsc::channel(room);
        let (made, ready) = watch::channel(false);
        let bus = self.clone();
        tokio::spawn(async move {
            // The stream sequence of the last message this node took.
            let mut last: Option<u64> = None;
            loop {
                // Ends by itself once the channel is dropped (what it
                // pulled meanwhile goes back to the stream).
                let r = bus
                    .pull_once(&name, skip.as_deref(), inactive, &tx, &mut last, &made)
                    .await;
                if let Err(e) = r {
                    tracing::warn!(consumer = %name, error = %format!("{e:#}"), "bus: following the stream; resuming");
                }
                if tx.is_closed() {
                    return;
                }
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    () = tx.closed() => return,
                }
            }
        });
        (rx, ready)
    }

    async fn pull_once(
        &self,
        name: &str,
        skip: Option<&str>,
        inactive: Duration,
        tx: &mpsc::Sender<Incoming>,
        last: &mut Option<u64>,
        made: &watch::Sender<bool>,
    ) -> anyhow::Result<()> {
        let mut stream = self.js.get_stream(STREAM).await?;
        // Where the consumer starts if it has to be made: after the last
        // message this node took; for a new one, after the last message
        // the stream held just now (read before the consumer is made, so
        // whatever is stored from here on is in it). "New" was judged by
        // the consumer's leader when it was elected, after the consumer
        // was made and a SUBACK went out: a share group lost a message
        // stored in between (the fault harness, issue 30). A consumer gone
        // when this node comes back to it (nobody pulled it for
        // `inactive`, or NATS lost it) is made again from there too, not
        // from "new": a $share group lost 30 s of acknowledged telemetry.
        let after = match *last {
            Some(seq) => seq,
            None => stream.info().await?.state.last_sequence,
        };
        *last = Some(after);
        let consumer = stream
            .get_or_create_consumer(
                name,
                consumer::pull::Config {
                    durable_name: Some(name.to_owned()),
                    filter_subject: format!("{PREFIX}>"),
                    deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                        start_sequence: after + 1,
                    },
                    ack_policy: consumer::AckPolicy::Explicit,
                    max_ack_pending: 10_000,
                    inactive_threshold: inactive,
                    ..Default::default()
                },
            )
            .await?;
        made.send_replace(true);
        let mut messages = consumer.messages().await?;
        loop {
            let next = tokio::select! {
                next = messages.next() => next,
                () = tx.closed() => {
                    give_back(&mut messages).await;
                    return Ok(());
                }
            };
            let Some(next) = next else { break };
            let msg = next?;
            if let Ok(info) = msg.info() {
                *last = Some(info.stream_sequence);
            }
            let subject = msg.subject.to_string();
            if skip.is_some_and(|own| subject.starts_with(own)) {
                let _ = msg.ack().await;
                continue;
            }
            match parse(&subject, &msg, &self.key) {
                Ok((client, role, stamp, message, queued)) => {
                    self.metrics.received();
                    let i = Incoming {
                        client,
                        role,
                        stamp,
                        message,
                        queued,
                        acker: msg,
                    };
                    // Nobody takes it here any more: back to the stream at
                    // once, for another puller (not after its wait).
                    if let Err(mpsc::error::SendError(i)) = tx.send(i).await {
                        i.into_acker().nak().await;
                        give_back(&mut messages).await;
                        return Ok(());
                    }
                }
                Err(why) => {
                    self.metrics.dropped();
                    tracing::warn!(reason = "bus", subject = %printable(&subject), why = %why, "bus: dropped a message that is not fleetgate's");
                    let _ = msg.ack().await;
                }
            }
        }
        Ok(())
    }
}

/// Sends back to the stream what a pull that nobody takes from any more
/// already holds or is still being sent (until it stays quiet for a
/// moment, a second at most: what is sent back may come back here while
/// this pull is open): dropped, each would wait out its acknowledgement
/// wait before JetStream handed it to another puller.
async fn give_back(messages: &mut consumer::pull::Stream) {
    let until = tokio::time::Instant::now() + Duration::from_secs(1);
    while let Ok(Some(Ok(msg))) = tokio::time::timeout_at(
        until.min(tokio::time::Instant::now() + Duration::from_millis(200)),
        messages.next(),
    )
    .await
    {
        Acker(msg).nak().await;
    }
}

/// Whether nats-server `version` (`2.9.10`) is older than 2.10.
fn too_old(version: &str) -> bool {
    let mut parts = version
        .trim_start_matches('v')
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) < (2, 10),
        _ => false,
    }
}

/// This node's name on the bus: the CN of its NATS certificate (what NATS
/// maps to its user), else `node`.
fn node_name(cfg: &BusConfig) -> anyhow::Result<String> {
    let Some((cert, _)) = &cfg.identity else {
        return Ok("node".into());
    };
    let pem = std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem)
        .map_err(|e| anyhow::anyhow!("{}: not a PEM certificate: {e}", cert.display()))?;
    let x509 = pem
        .parse_x509()
        .map_err(|e| anyhow::anyhow!("{}: {e}", cert.display()))?;
    let cn = x509
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("{}: no common name (the node's name)", cert.display()))?;
    if cn.is_empty() || cn.contains(['.', '*', '>', ' ']) {
        anyhow::bail!(
            "{}: CN {cn:?} cannot be a NATS subject token",
            cert.display()
        );
    }
    Ok(cn)
}

/// A bus message's sender, role, stamp, message and queue place.
type Parsed = (String, Role, String, Message, Option<u64>);

fn parse(subject: &str, msg: &jetstream::Message, key: &BusKey) -> Result<Parsed, String> {
    let client = subject
        .strip_prefix(PREFIX)
        .and_then(|rest| rest.splitn(3, '.').nth(2))
        .map(str::to_owned)
        .ok_or("no sender in the subject")?;
    let header = |k: &str| {
        msg.headers
            .as_ref()
            .and_then(|h| h.get(k))
            .map(|v| v.as_str().to_owned())
    };
    let role = header(ROLE)
        .and_then(|r| r.parse::<Role>().ok())
        .ok_or("no sender role")?;
    let stamp = header(STAMP).unwrap_or_default();
    let queued_text = header(QUEUED).unwrap_or_default();
    let sealed = [
        subject.as_bytes(),
        role.as_str().as_bytes(),
        stamp.as_bytes(),
        queued_text.as_bytes(),
        &msg.payload,
    ];
    if !key.verify(&sealed, header(seal::HEADER).as_deref()) {
        return Err("no seal of this cluster's nodes".into());
    }
    let message = Message::from_bytes(&msg.payload).map_err(|e| e.to_string())?;
    let queued = match header(QUEUED) {
        Some(q) => Some(q.parse::<u64>().map_err(|_| "a malformed queue place")?),
        None => None,
    };
    Ok((client, role, stamp, message, queued))
}

#[cfg(test)]
mod tests {
    #[test]
    fn servers_before_2_10_are_too_old() {
        for v in ["2.9.10", "v2.9.25", "1.4.1", "2.2.0-beta"] {
            assert!(super::too_old(v), "{v}");
        }
        for v in ["2.10.0", "2.15.1", "v2.11.3", "3.0.0", "", "dev"] {
            assert!(!super::too_old(v), "{v}");
        }
    }
}
