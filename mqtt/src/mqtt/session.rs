//! One MQTT connection's driver: the TLS stream on one side, the
//! connection core ([`super::channel::Channel`], every protocol decision) in
//! between, and behind them either the command hub (a device) or a rumqttd
//! router link (a service). The driver reads and writes, waits on kicks,
//! shutdown and timers, and does what the core's actions say.
//!
//! Nothing reaches a device or the router that the core has not checked:
//! CONNECT is decided there (identity), PUBLISH and SUBSCRIBE pass the ACL
//! first, PINGREQ is answered there. A device has no router link at all: its
//! subscriptions (only ever under its own `devices/<id>/`) live in its
//! [`Mailbox`], commands reach it through the [`super::hub::Hub`], and this
//! session owns their packet ids, in-flight window (the device's Receive
//! Maximum) and acknowledgements ([`Outbox`]); its own messages go to the
//! router through the shared ingest links. Every PUBLISH a client sends is
//! acknowledged here (QoS 1 and 2 included), once it is handed on. The
//! last will is published here too, on an unclean end.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::stream::{FuturesOrdered, StreamExt};
use provisioning::ca::CertInfo;
use provisioning::sessions::{Message, MessageProps, StoredFilter};
use provisioning::{CertKey, DeviceId, Identity, Role};
use rumqttd::local::{LinkError, LinkRx};
use rumqttd::protocol::{
    ConnAck, ConnectReturnCode, Disconnect, DisconnectProperties, Packet, PubAckReason, Publish,
    PublishProperties, SubAck, SubscribeReasonCode, UnsubAck, UnsubAckReason,
};
use rumqttd::Notification;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_rustls::server::TlsStream;

use super::acks::RouterAcks;
use super::acl::{command_target, topic_matches};
use super::channel::connect::{self, Terms};
use super::channel::end::normal_disconnect;
use super::channel::overlap::Overlaps;
use super::channel::subscribe::{sends_retained, share_inner, suback_props};
use super::channel::{will, Action, Channel, End, Inbound, Limits, Now};
use super::codec::Codec;
use super::fanout::{self, Inbox, Marked};
use super::hub::{Delivery, Mailbox, Outcome};
use super::kept::{lock, Filters, ServiceSub};
use super::link::{RouterTx, TrySend};
use super::outbox::{qos_and_pkid, Outgoing};
use super::share;
use super::stamp;
use super::{Kick, Shared, TOPIC_ALIAS_MAX};
use crate::metrics::Refusal;
use crate::mqtt::channel::subscribe::FilterRefused;

mod answers;
mod claim;
mod device;
mod publish;
mod service;

use device::{next_delivery, take_into};
use publish::AtOnce;
use service::expire_service_session;

/// What the TLS handshake established.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    pub identity: Identity,
    /// The certificate's registry key.
    pub key: CertKey,
    pub info: Arc<CertInfo>,
    /// The manufacturer whose CA the chain runs through, if any.
    pub manufacturer: Option<DeviceId>,
}

/// How a client's PUBLISH is acknowledged: now, or once the message bus
/// has stored it.
enum Ack {
    Now((PubAckReason, Option<String>)),
    Later(Pin<Box<dyn Future<Output = AckResult> + Send>>),
}

impl Ack {
    fn now(reason: PubAckReason, why: Option<String>) -> Self {
        Ack::Now((reason, why))
    }
}

type AckResult = Result<(PubAckReason, Option<String>), End>;

/// A waiting acknowledgement: QoS, packet id, and how it ends.
type PendingAck = Pin<Box<dyn Future<Output = (u8, u16, AckResult)> + Send>>;

fn pending(
    acks: &mut std::sync::Mutex<FuturesOrdered<PendingAck>>,
) -> &mut FuturesOrdered<PendingAck> {
    acks.get_mut()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Acknowledgements waiting on the bus at most; past it, the client is
/// not read until the oldest is done.
const MAX_PENDING_ACKS: usize = 64;

/// A QoS 1 message the bus did not store: refused (MQTT 5), or left
/// unacknowledged as the connection closes (3.1.1 has no refusal), so the
/// client sends it again.
fn bus_refusal(e: &crate::bus::BusError, v5: bool) -> AckResult {
    if v5 {
        tracing::warn!(error = %e, "mqtt: refused a QoS 1 message the bus did not store");
        Ok((
            PubAckReason::ImplementationSpecificError,
            Some("not stored for the other nodes; send it again".into()),
        ))
    } else {
        Err(End::Protocol(format!("{e}; not acknowledged")))
    }
}

struct Session {
    stream: TlsStream<super::conn::Conn>,
    rbuf: BytesMut,
    /// The connection core: every protocol decision, and what to write.
    ch: Channel,
    peer: Peer,
    shared: Arc<Shared>,
    /// SUBSCRIBEs sent to the router with some filters refused here: the
    /// refused positions, to merge into the router's SUBACK.
    pending_subacks: HashMap<u16, (Vec<Option<SubscribeReasonCode>>, Option<String>)>,
    /// UNSUBSCRIBEs sent to the router with some filters answered here:
    /// those filters' reasons in their places, to merge into its UNSUBACK.
    pending_unsubacks: HashMap<u16, Vec<Option<UnsubAckReason>>>,
    /// OCSP requests this session may still have answered.
    ocsp_budget: crate::net::RateLimiter<()>,
    /// What this device's messages carry of its identity ([`stamp::of`]).
    stamp: String,
    /// Acknowledgements of the client's PUBLISHes still waiting (for the
    /// message bus to store them), in the order they came. (In a mutex
    /// only so that the session is `Sync`; it is used through `&mut`.)
    pending_acks: std::sync::Mutex<FuturesOrdered<PendingAck>>,
    /// A service's acknowledgements owed to the router, in its order.
    acks: RouterAcks,
    /// A device's side: its mailbox and session in the hub.
    device: Option<DeviceSide>,
    /// A service's router link.
    router: Option<RouterTx>,
    /// A service's messages taken without the router (a session that
    /// keeps nothing past its connection: see [`fanout`]).
    inbox: Option<Inbox>,
    /// A service's subscriptions, with their MQTT 5 identifiers: its
    /// session's, kept across its connections while the session persists.
    service_subs: Filters,
    /// Which of a service's overlapping subscriptions each copy is for.
    overlaps: Overlaps,
    /// A service's `$share` subscriptions across nodes (with a bus).
    groups: HashMap<String, super::share::Membership>,
    /// Where its groups on this node hand it their messages.
    group_queue: Option<super::share::MemberQueue>,
    /// Group messages in its outbox, by token: acknowledged to the stream
    /// once the client is done with them.
    group_owed: HashMap<u64, crate::bus::Acker>,
    /// Group messages the client is done with, to acknowledge.
    group_done: Vec<crate::bus::Acker>,
    /// The session is this node's, cluster-wide (with a bus).
    claim: Option<crate::bus::Claim>,
    /// A service's SUBSCRIBEs whose retained messages are sent once the
    /// router's SUBACK is: the filters and their granted QoS.
    pending_retained: HashMap<u16, Vec<(String, u8)>>,
}

struct DeviceSide {
    conn: u64,
    /// Its session is (or was) stored: closing it writes to the store.
    durable: bool,
    mailbox: Arc<Mailbox>,
    rx: mpsc::Receiver<Delivery>,
    /// The last topic it published to and what of its own subscriptions
    /// matched it ([`Mailbox::granted_to`]): a device publishes to the
    /// same few topics, and its subscriptions change only through this
    /// session (cleared at each SUBSCRIBE and UNSUBSCRIBE), so most
    /// PUBLISHes do not reach into the mailbox.
    echo: Option<(String, Option<super::hub::Granted>)>,
}

/// Room for one read from the TLS stream (rustls hands over what it has
/// decrypted; a bigger packet takes several reads).
const READ_SIZE: usize = 512;

/// A service's messages waiting for room in its window, at most, before
/// it takes more from its inbox (the rest wait there, within its cap).
const INBOX_TAKE: usize = 1024;

/// A buffer past this size is dropped once empty, not kept for the next
/// message.
const KEEP_BUFFER: usize = 8 * 1024;

/// A claim's request for a device certificate, when not a bare CSR.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ProvisionRequest {
    /// The device id asked for; the request id when absent.
    #[serde(default)]
    id: Option<String>,
    /// PEM.
    csr: String,
}

/// Runs one connection from its CONNECT: to its end, or, with a `settle`
/// time and if it is still open that long after its CONNACK, until then;
/// what is left of it is the [`Live`] session, to go on wherever it is
/// polled next (the session runtime). A client that connects, publishes
/// and leaves within `settle` never moves.
pub(super) fn run(
    stream: TlsStream<super::conn::Conn>,
    peer: Peer,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
    settle: Option<Duration>,
) -> impl std::future::Future<Output = Option<Live>> {
    let span = tracing::info_span!("mqtt", device.id = %peer.identity.id, peer.addr = %peer.addr);
    // Built here and boxed, so the session's future holds a pointer, not
    // the stream and peer twice over (an async fn keeps its arguments'
    // slots for its whole life): most of a held connection's memory.
    let now = shared.clock.now();
    let not_after_ms = peer.info.not_after.unix_timestamp().saturating_mul(1000);
    let s = Box::new(Session {
        stream,
        rbuf: BytesMut::with_capacity(READ_SIZE),
        ch: Channel::new(
            Codec::for_level(4),
            &peer.identity,
            shared.live.max_packet_size(),
            TOPIC_ALIAS_MAX,
            not_after_ms,
            now,
        ),
        stamp: stamp::of(
            peer.identity.role,
            &peer.key.serial.to_hex(),
            &peer.info.fingerprint,
            peer.manufacturer.as_ref().map(DeviceId::as_str),
        ),
        peer,
        pending_subacks: HashMap::new(),
        pending_unsubacks: HashMap::new(),
        ocsp_budget: crate::net::RateLimiter::new(shared.cfg.ocsp_rate),
        shared: shared.clone(),
        pending_acks: std::sync::Mutex::default(),
        acks: RouterAcks::default(),
        device: None,
        router: None,
        inbox: None,
        service_subs: Filters::default(),
        overlaps: Overlaps::default(),
        groups: HashMap::new(),
        group_queue: None,
        group_owed: HashMap::new(),
        group_done: Vec::new(),
        claim: None,
        pending_retained: HashMap::new(),
    });
    let f = tracing::Instrument::instrument(
        async move {
            let c = connect(s, shared, shutdown).await.ok()?;
            live(c, settle).await
        },
        span.clone(),
    );
    // A combinator, not an async block: a block would keep the session's
    // future twice over (as what it captured and as what it awaits).
    futures_util::FutureExt::map(f, |c| c.map(|c| Live { c, span }))
}

/// A session past its CONNACK, open when it settled: to be served on.
pub(super) struct Live {
    c: Connected,
    span: tracing::Span,
}

impl Live {
    /// Its socket, to move to the runtime that will serve it.
    pub(super) fn conn(&mut self) -> &mut super::conn::Conn {
        self.c.s.stream.get_mut().0
    }

    pub(super) fn shared(&self) -> Arc<Shared> {
        self.c.shared.clone()
    }

    /// Serves it to its end.
    pub(super) fn finish(self) -> impl std::future::Future<Output = ()> {
        let f = futures_util::FutureExt::map(live(self.c, None), drop);
        tracing::Instrument::instrument(f, self.span)
    }
}

/// What a connection established at its CONNECT, kept until it ends.
struct Connected {
    s: Box<Session>,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
    v5: bool,
    terms: Terms,
    will: Option<rumqttd::protocol::LastWill>,
    will_props: Option<rumqttd::protocol::LastWillProperties>,
    kick_rx: oneshot::Receiver<Kick>,
    registration: super::Registration,
    link_rx: Option<LinkRx>,
}

/// Serves a connection until it ends, or until `settle` has passed
/// (then it is handed back, to move, between two packets).
async fn live(mut c: Connected, settle: Option<Duration>) -> Option<Connected> {
    let Some(end) = c.s.serve(c.link_rx.as_mut(), &mut c.kick_rx, settle).await else {
        tracing::debug!("mqtt: settled; the session moves to the session runtime");
        return Some(c);
    };
    let _ = ended(c, end).await;
    None
}

/// A connection from its CONNECT to its CONNACK: refused (and closed), or
/// connected.
async fn connect(
    mut s: Box<Session>,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
) -> Result<Connected, ()> {
    // CONNECT, within the connect timeout.
    let connect = match tokio::time::timeout(shared.cfg.connect_timeout, s.read_connect()).await {
        Ok(Ok(p)) => p,
        Ok(Err(why)) => {
            shared.metrics.refused(Refusal::Protocol);
            tracing::warn!(reason = "protocol", detail = %crate::printable(&why), "mqtt: refused");
            return Err(());
        }
        Err(_) => {
            shared.metrics.refused(Refusal::Protocol);
            tracing::warn!(reason = "protocol", "mqtt: refused: no CONNECT in time");
            return Err(());
        }
    };
    let Packet::Connect(connect, connect_props, will, will_props, _login) = connect else {
        return Err(());
    };
    let v5 = s.ch.is_v5();
    let terms = match connect::decide(
        &s.peer.identity,
        &connect,
        connect_props.as_ref(),
        will.as_ref(),
        v5,
    ) {
        Ok(t) => t,
        Err(r) => {
            shared.metrics.refused(r.refusal);
            tracing::warn!(reason = r.refusal.as_str(), client_id = %crate::printable(&connect.client_id), detail = %crate::printable(&r.why), "mqtt: refused at CONNECT");
            match r.code {
                Some(code) => s.refuse_connect(code, Some(r.why)).await,
                // 3.1.1 has no CONNACK code for it: the connection closes.
                None => {
                    let _ = tokio::time::timeout(Duration::from_secs(1), s.stream.shutdown()).await;
                }
            }
            return Err(());
        }
    };
    let role = s.peer.identity.role;
    let device_id = s.peer.identity.id.to_string();
    let topics = (role == Role::Device).then(|| {
        shared.kept.budget(
            &device_id,
            shared.live.new_topics_per_minute(),
            shared.clock.now().mono,
        )
    });
    s.ch.accept(terms.clone(), topics, shared.clock.now());

    // Kickable from here on: a revocation from now on finds this session,
    // so the one check of standing below cannot miss one. A device's older
    // connection is cut here (its session is this one's now).
    // On several nodes, the session is this node's from now on: the node
    // that held it cuts its connection.
    if let Some(bus) = &shared.cfg.bus {
        match bus.claim(s.peer.identity.id.as_str()).await {
            Ok(c) => s.claim = Some(c),
            Err(e) => {
                tracing::warn!(error = %e, "mqtt: the session could not be claimed across nodes")
            }
        }
    }
    let protocol = if v5 { "MQTT 5" } else { "MQTT 3.1.1" };
    let (kick_rx, registration) = shared
        .sessions
        .register(&s.peer, protocol, role == Role::Device);
    let conn = registration.conn;

    // Standing now, before any CONNACK: a resumed TLS session skipped the
    // certificate verifier, and a manufacturer's new device registers here.
    if let Err(r) = Box::pin(shared.admit(&s.peer)).await {
        shared.metrics.refused(r.reason);
        // The detail names the client and serial.
        tracing::warn!(reason = r.reason.as_str(), detail = %crate::printable(&r.detail), "mqtt: refused at CONNECT");
        let code = connect::refusal_code(r.reason, v5);
        s.refuse_connect(code, Some(r.reason.as_str().replace('_', " ")))
            .await;
        return Err(());
    }

    // Claims never reach the router or the hub: this session answers
    // everything they may send. A device gets its mailbox; a service a
    // router link (building it waits on the router thread).
    let (link_rx, session_present) = match role {
        // Refused at the handshake; nothing to open if one got here.
        Role::Claim | Role::Node => (None, false),
        Role::Device => match s.open_device(conn, &terms).await {
            Ok(present) => (None, present),
            Err(()) => return Err(()),
        },
        Role::Service | Role::Admin => match s.open_service(conn, &terms).await {
            Ok((rx, present)) => (Some(rx), present),
            Err(()) => return Err(()),
        },
    };
    let connack = connect::connack(
        &terms,
        session_present,
        v5,
        shared.live.max_packet_size(),
        &device_id,
        TOPIC_ALIAS_MAX,
    );
    if s.send(connack).await.is_err() {
        s.end_router_session(&End::Closed("at CONNACK".into()))
            .await;
        s.close_device(terms.expiry).await;
        return Err(());
    }

    shared
        .metrics
        .sessions
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(protocol = if v5 { 5 } else { 4 }, serial = %s.peer.key.serial, session_present, "mqtt: connected");
    Ok(Connected {
        s,
        shared,
        shutdown,
        v5,
        terms,
        will,
        will_props,
        kick_rx,
        registration,
        link_rx,
    })
}

/// A connection's end: the client told why (MQTT 5) and cut, its session
/// closed or kept, its will published.
async fn ended(c: Connected, end: End) -> Result<(), ()> {
    let Connected {
        mut s,
        shared,
        mut shutdown,
        v5,
        terms,
        will,
        will_props,
        kick_rx: _,
        registration,
        link_rx,
    } = c;
    let role = s.peer.identity.role;
    let device_id = s.peer.identity.id.to_string();
    // The CONNECT's, or what the client's DISCONNECT said instead.
    let expiry = s.ch.session_expiry();
    // Watched before this connection lets go of the client id: a new
    // connection from here on cancels a delayed will and keeps a session.
    let mut back = shared.sessions.watch_return(&s.peer.identity.id);
    drop(registration);

    // Tell the client why, where the protocol has a way to.
    if let Some(reason) = end.reason().filter(|_| v5) {
        let props = end.reason_string().map(|why| DisconnectProperties {
            session_expiry_interval: None,
            reason_string: Some(why),
            user_properties: Vec::new(),
            server_reference: None,
        });
        let bye = Packet::Disconnect(
            Disconnect {
                reason_code: reason,
            },
            props,
        );
        let _ = s.send(bye).await;
    }
    log_end(&shared, &end);

    // The client first: its connection ends now (a kicked device must be
    // cut at once, even under load). Then its session, here and in the
    // router.
    let _ = tokio::time::timeout(Duration::from_secs(1), s.stream.shutdown()).await;
    s.close_device(expiry).await;
    s.end_router_session(&end).await;
    drop(link_rx);
    s.inbox = None;
    s.leave_groups().await;

    // A service's kept session in the router ends at its expiry (now, if
    // it has none), unless the service comes back first (rumqttd itself
    // keeps it for good).
    if role == Role::Service
        && terms.keeps_session()
        && !matches!(end, End::TakenOver | End::RouterDisconnect)
    {
        let secs = expiry.unwrap_or(0);
        expire_service_session(&shared, &device_id, secs, shutdown.clone());
    }

    // The last will, on an unclean end (not a takeover, not a kick).
    let Some(will) = will::plan(&end, will, will_props, expiry) else {
        return Ok(());
    };
    // MQTT 5 3.1.3.2.2: the will waits out its delay or the session's end,
    // whichever comes first, and a new connection of the client within it
    // cancels the will. (A shutdown sends it now.)
    if let Some(delay) = will.delay {
        if back.within(delay, &mut shutdown).await {
            tracing::info!("mqtt: the client came back within its will delay; no will");
            return Ok(());
        }
    }
    drop(back);
    // A will spends from the device's budget of new topics like a PUBLISH.
    let mut counted = Vec::new();
    let admitted = s.ch.admit_topic(
        "last will: ",
        &will.topic,
        shared.clock.now(),
        s.limits(),
        &mut counted,
    );
    s.count(&counted);
    if admitted.is_err() {
        return Ok(());
    }
    if let Ok(Ack::Later(stored)) = Box::pin(s.publish_onward(will.publish, will.props)).await {
        let _ = stored.await;
    }
    Ok(())
}

/// Counts and logs how a connection ended.
fn log_end(shared: &Shared, end: &End) {
    use std::sync::atomic::Ordering::Relaxed;
    match end {
        End::Kicked(k) => {
            shared.metrics.kicked.fetch_add(1, Relaxed);
            tracing::warn!(reason = k.as_str(), "mqtt: connection cut");
        }
        End::TakenOver => {
            shared.metrics.taken_over.fetch_add(1, Relaxed);
            tracing::info!("mqtt: session taken over by a newer connection");
        }
        End::Acl(why) => {
            shared.metrics.refused(Refusal::Acl);
            tracing::warn!(reason = "acl", detail = %crate::printable(why), "mqtt: disconnected");
        }
        End::Protocol(why) => {
            shared.metrics.refused(Refusal::Protocol);
            tracing::warn!(reason = "protocol", detail = %crate::printable(why), "mqtt: disconnected");
        }
        End::Violation(code, why) => {
            shared.metrics.refused(Refusal::Protocol);
            tracing::warn!(reason = "protocol", code = ?code, detail = %crate::printable(why), "mqtt: disconnected");
        }
        End::CertificateExpired => {
            shared.metrics.refused(Refusal::Expired);
            tracing::warn!(reason = "expired", "mqtt: certificate expired mid-session");
        }
        End::Closed(why) => {
            tracing::info!(detail = %crate::printable(why), "mqtt: connection closed without DISCONNECT")
        }
        other => tracing::info!(end = ?other, "mqtt: disconnected"),
    }
}

impl Session {
    /// The limits as they stand now.
    /// This connection's number, where a message it publishes may come
    /// back to it (No Local): a device's, or a service's held by the
    /// fanout.
    fn conn(&self) -> Option<u64> {
        self.device
            .as_ref()
            .map(|d| d.conn)
            .or(self.inbox.as_ref().map(Inbox::conn))
    }

    fn limits(&self) -> Limits {
        Limits {
            max_subscriptions: self.shared.live.max_subscriptions(),
            new_topics_per_minute: self.shared.live.new_topics_per_minute(),
        }
    }

    fn now(&self) -> Now {
        self.shared.clock.now()
    }

    /// Counts the refusals among `actions`.
    fn count(&self, actions: &[Action]) {
        for a in actions {
            if let Action::Refused(r) = a {
                self.shared.metrics.refused(*r);
            }
        }
    }

    /// The refusals among `checked`, counted; the SUBACK's codes and why.
    fn refusals(
        &mut self,
        checked: Vec<Option<FilterRefused>>,
    ) -> (Vec<Option<SubscribeReasonCode>>, Option<String>) {
        let mut counted = Vec::new();
        let r = self.ch.refusals(checked, self.now(), &mut counted);
        self.count(&counted);
        r
    }

    /// Reads the CONNECT, choosing the codec from its protocol level.
    async fn read_connect(&mut self) -> Result<Packet, String> {
        let max = self.shared.live.max_packet_size();
        loop {
            if let Some((codec, p)) = connect::first_packet(&mut self.rbuf, max)? {
                self.ch = Channel::new(
                    codec,
                    &self.peer.identity,
                    max,
                    TOPIC_ALIAS_MAX,
                    self.peer
                        .info
                        .not_after
                        .unix_timestamp()
                        .saturating_mul(1000),
                    self.now(),
                );
                return Ok(p);
            }
            match self.stream.read_buf(&mut self.rbuf).await {
                Ok(0) => return Err("closed before CONNECT".into()),
                Ok(_) => {}
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }

    /// CONNACK with `code` (a 3.1.1 code, or any for MQTT 5) and, on MQTT
    /// 5, `why` as its reason string; then close.
    async fn refuse_connect(&mut self, code: ConnectReturnCode, why: Option<String>) {
        let v5 = self.ch.is_v5();
        let _ = self.send(connect::refusal(code, why, v5)).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), self.stream.shutdown()).await;
    }

    fn encode(&mut self, p: Packet) -> Result<(), String> {
        self.ch.send(p).map_err(|e| format!("{e:?}"))
    }

    async fn flush(&mut self) -> Result<(), String> {
        if self.ch.pending_output().is_empty() {
            return Ok(());
        }
        self.stream
            .write_all(self.ch.pending_output())
            .await
            .map_err(|e| format!("write: {e}"))?;
        self.ch.output_written();
        // What rustls took is not yet on the socket: a write that would
        // block leaves the records in rustls, and only a flush waits for
        // the socket to take them (a socket just moved to the session
        // runtime is not known to be writable until its reactor says so).
        self.stream.flush().await.map_err(|e| format!("write: {e}"))
    }

    async fn send(&mut self, p: Packet) -> Result<(), String> {
        self.encode(p)?;
        self.flush().await
    }

    async fn serve(
        &mut self,
        link_rx: Option<&mut LinkRx>,
        kick: &mut oneshot::Receiver<Kick>,
        settle: Option<Duration>,
    ) -> Option<End> {
        // What the device's session kept for it, and packets that came in
        // the same read as CONNECT.
        if let Some(end) = Box::pin(self.pump()).await {
            return Some(end);
        }
        if !self.rbuf.is_empty() {
            if let Some(end) = Box::pin(self.incoming()).await {
                return Some(end);
            }
        }
        // The keep-alive's end or the certificate's, as the core says: one
        // timer for the connection, moved earlier at once but later only
        // when it fires (`tick` then finds nothing due), not on every
        // packet that moves the keep-alive on.
        let mut timer = std::pin::pin!(tokio::time::sleep_until(tokio::time::Instant::from_std(
            self.ch.wake_at(self.now())
        )));
        // The router's next notification, waited for across the loop's
        // turns (a wait begun anew each turn registered with the link's
        // channel and left it again: once a message, for a service).
        let mut link = std::pin::pin!(next(link_rx));
        // Past `settle`, the session is handed back between two packets,
        // with nothing of this loop's but its timers (made again). Boxed:
        // a session served to its end holds no timer for it.
        let mut settled = settle.map(|d| Box::pin(tokio::time::sleep(d)));
        loop {
            let now = self.now();
            let wake = tokio::time::Instant::from_std(self.ch.wake_at(now));
            if wake < timer.deadline() || timer.is_elapsed() {
                timer.as_mut().reset(wake);
            }
            // An idle connection holds a small read buffer: most of a fleet
            // is idle most of the time.
            if self.rbuf.is_empty() && self.rbuf.capacity() > KEEP_BUFFER {
                self.rbuf = BytesMut::new();
            }
            if self.rbuf.capacity() - self.rbuf.len() < READ_SIZE / 2 {
                self.rbuf.reserve(READ_SIZE);
            }
            tokio::select! {
                biased;
                // Shutdown too comes as a kick (`Sessions::shut_all`).
                k = &mut *kick => return Some(match k {
                    Ok(Kick::TakenOver) => End::TakenOver,
                    Ok(Kick::Shutdown) => End::Shutdown,
                    k => End::Kicked(k.unwrap_or(Kick::Revoked)),
                }),
                _ = &mut timer => if let Some(end) = self.ch.tick(self.now()) {
                    return Some(end);
                },
                Some((qos, pkid, done)) = pending(&mut self.pending_acks).next(), if !pending(&mut self.pending_acks).is_empty() => {
                    match done {
                        Ok((reason, why)) => if let Err(e) = self.ch.acknowledge(qos, pkid, reason, why) {
                            return Some(e);
                        },
                        Err(end) => return Some(end),
                    }
                    if let Some(end) = Box::pin(self.pump()).await {
                        return Some(end);
                    }
                }
                r = self.stream.read_buf(&mut self.rbuf), if pending(&mut self.pending_acks).len() < MAX_PENDING_ACKS => match r {
                    Ok(0) => return Some(End::Closed("peer closed".into())),
                    Err(e) => return Some(End::Closed(e.to_string())),
                    Ok(_) => {
                        let now = self.now();
                        self.ch.heard(now);
                        if let Some(end) = Box::pin(self.incoming()).await {
                            return Some(end);
                        }
                    }
                },
                d = next_delivery(self.device.as_mut()) => if let Some(d) = d {
                    if let Some(side) = self.device.as_mut() {
                        let mut d = Some(d);
                        while let Some(Delivery { seq, message }) = d.take() {
                            take_into(&self.shared, &self.peer, &side.mailbox, &mut self.ch, seq, message);
                            d = side.rx.try_recv().ok();
                        }
                    }
                    if let Some(end) = Box::pin(self.pump()).await {
                        return Some(end);
                    }
                },
                g = next_group(self.group_queue.as_mut()), if self.ch.outbox.len().0 < INBOX_TAKE => if let Some(g) = g {
                    self.take_group(g);
                    while self.ch.outbox.len().0 < INBOX_TAKE {
                        let Some(g) = self.group_queue.as_mut().and_then(|(_, rx)| rx.try_recv().ok()) else { break };
                        self.take_group(g);
                    }
                    if let Some(end) = Box::pin(self.pump()).await {
                        return Some(end);
                    }
                },
                m = next_marked(self.inbox.as_mut()), if self.ch.outbox.len().0 < INBOX_TAKE => if let Some(m) = m {
                    // One write for what this wake-up brings: the sessions
                    // the same poll of the reactor made ready run first
                    // (a yield waits until the runtime has nothing else
                    // to run), and what they publish to this one meanwhile
                    // goes out in the same TLS record.
                    tokio::task::yield_now().await;
                    self.take_marked(&m);
                    while self.ch.outbox.len().0 < INBOX_TAKE {
                        let Some(m) = self.inbox.as_mut().and_then(Inbox::try_recv) else { break };
                        self.take_marked(&m);
                    }
                    if let Some(end) = Box::pin(self.pump()).await {
                        return Some(end);
                    }
                },
                (n, rx) = &mut link => {
                    match n {
                        Ok(Some(n)) => if let Some(end) = Box::pin(self.outgoing(n, rx)).await {
                            return Some(end);
                        },
                        Ok(None) => {}
                        Err(_) => return Some(End::TakenOver),
                    }
                    link.set(next(Some(rx)));
                },
                Some(()) = futures_util::future::OptionFuture::from(settled.as_mut()), if settled.is_some() => return None,
            }
        }
    }

    /// Writes what the outbox lets through (reading a device's durable
    /// queue again if the hub could not hand something over), sends the
    /// router what is owed it, then flushes.
    async fn pump(&mut self) -> Option<End> {
        self.pump_with(Vec::new()).await
    }

    async fn pump_with(&mut self, mut to_router: Vec<Packet>) -> Option<End> {
        let mut done = Vec::new();
        loop {
            if let Err(end) = self.ch.write_outbox(&mut done) {
                return Some(end);
            }
            for token in done.drain(..) {
                self.finished(token, &mut to_router);
            }
            for acker in self.group_done.drain(..) {
                // Boxed, as the router link's wait for room is: what is
                // rarely waited for does not make each pump's future bigger.
                Box::pin(acker.ack()).await;
            }
            let Some(side) = self.device.as_ref() else {
                break;
            };
            if !side.mailbox.take_reload() {
                break;
            }
            let id = &self.peer.identity.id;
            let now = self.now().wall_ms;
            match self
                .shared
                .hub
                .keeper()
                .queued(id, self.ch.outbox.last_seq(), now)
            {
                Ok(q) => {
                    for q in q {
                        take_into(
                            &self.shared,
                            &self.peer,
                            &side.mailbox,
                            &mut self.ch,
                            Some(q.seq),
                            Arc::new(q.message),
                        );
                    }
                }
                Err(e) => tracing::error!(error = %e, "mqtt: reading the device's queue"),
            }
        }
        if let Some(router) = &self.router {
            for p in to_router {
                if router.send(p).await.is_err() {
                    return Some(End::TakenOver);
                }
            }
        }
        self.flush().await.err().map(End::Closed)
    }

    /// The client is done with what `token` marks: a device's stored
    /// command leaves its queue; a service's delivery is acknowledged to
    /// the router (in the router's order).
    fn finished(&mut self, token: u64, to_router: &mut Vec<Packet>) {
        if self.device.is_some() {
            self.shared
                .hub
                .keeper()
                .delivered(&self.peer.identity.id, token);
        } else if let Some(acker) = self.group_owed.remove(&token) {
            self.group_done.push(acker);
        } else {
            to_router.extend(self.acks.done(token));
        }
    }

    /// Decodes what has arrived; the core decides each packet, and this
    /// does what it says.
    async fn incoming(&mut self) -> Option<End> {
        let mut forward: Vec<Packet> = Vec::new();
        let mut end = None;
        // Not kept between reads: an idle connection holds no room for
        // actions (most of a fleet is idle most of the time).
        let mut actions = Vec::new();
        'packets: loop {
            let packet = match self.ch.read(&mut self.rbuf) {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(e) => {
                    end = Some(e);
                    break;
                }
            };
            let (now, limits) = (self.now(), self.limits());
            self.ch.handle_in(packet, now, limits, &mut actions);
            for action in actions.drain(..) {
                let done = match self.act_at_once(action, &mut forward) {
                    Ok(AtOnce::Done) => Ok(()),
                    Ok(AtOnce::Wait(action)) => Box::pin(self.act(*action, &mut forward)).await,
                    Ok(AtOnce::Router(p, qos, pkid)) => {
                        Box::pin(self.router_then_ack(p, qos, pkid)).await
                    }
                    Err(e) => Err(e),
                };
                if let Err(e) = done {
                    end = Some(e);
                    break 'packets;
                }
            }
        }
        if let Some(e) = self.pump_with(forward).await {
            return Some(e);
        }
        end
    }

    /// Does what the core asked for if it needs no waiting (most packets:
    /// acknowledgements, a fleet's telemetry), else gives it back for
    /// [`Session::act`]: a future that can wait is made only for what may.
    fn act_at_once(
        &mut self,
        action: Action,
        forward: &mut Vec<Packet>,
    ) -> Result<AtOnce<Action>, End> {
        match action {
            Action::Publish(inbound) => Ok(match self.publish_at_once(inbound)? {
                AtOnce::Done => AtOnce::Done,
                AtOnce::Wait(inbound) => AtOnce::Wait(Box::new(Action::Publish(*inbound))),
                AtOnce::Router(p, qos, pkid) => AtOnce::Router(p, qos, pkid),
            }),
            Action::Ack {
                qos,
                pkid,
                reason,
                why,
            } => self
                .ack_in_order(qos, pkid, Ack::now(reason, why))
                .map(|()| AtOnce::Done),
            Action::Done(token) => {
                self.finished(token, forward);
                Ok(AtOnce::Done)
            }
            Action::Forward(p) => {
                forward.push(p);
                Ok(AtOnce::Done)
            }
            Action::Refused(r) => {
                self.shared.metrics.refused(r);
                Ok(AtOnce::Done)
            }
            Action::Close(end) => Err(end),
            action => Ok(AtOnce::Wait(Box::new(action))),
        }
    }

    /// Does one thing the core asked for.
    async fn act(&mut self, action: Action, forward: &mut Vec<Packet>) -> Result<(), End> {
        let device = self.peer.identity.role == Role::Device;
        match action {
            Action::Publish(inbound) => self.client_publish(inbound).await,
            Action::Provision { publish, request } => self
                .provision(&publish, request)
                .await
                .map_err(End::Protocol),
            Action::Ocsp {
                publish,
                reply_topic,
                correlation,
            } => self
                .answer_ocsp(&publish, reply_topic, correlation)
                .await
                .map_err(End::Protocol),
            Action::Subscribe(sub, props) if device => self.device_subscribe(sub, props).await,
            Action::Subscribe(sub, props) => {
                let retained = self.subscribe(sub, props, forward).await?;
                if !retained.is_empty() {
                    self.service_retained(retained).await;
                }
                Ok(())
            }
            Action::Unsubscribe(unsub, _) if device => self.device_unsubscribe(unsub).await,
            Action::Unsubscribe(unsub, props) => self.service_unsubscribe(unsub, props, forward),
            // Never waits: done there (or the connection ends).
            action @ (Action::Ack { .. }
            | Action::Done(_)
            | Action::Forward(_)
            | Action::Refused(_)
            | Action::Close(_)) => self.act_at_once(action, forward).map(drop),
        }
    }
}

/// A message for a device as it goes out: at `qos`, with what is left of
/// its expiry and the identifiers of the subscriptions it matched.
fn outgoing(
    m: &Message,
    seq: Option<u64>,
    qos: u8,
    subscription_ids: Vec<usize>,
    retain: bool,
    now: i64,
    expand: bool,
) -> Outgoing {
    let props = message_properties(m, subscription_ids, now);
    Outgoing {
        seq,
        topic: Bytes::from(m.topic.clone()),
        payload: Bytes::from(m.payload.clone()),
        qos,
        retain,
        // A stored device message's mark: expanded into the sender's
        // identity for a service (MQTT 5), dropped for anyone else.
        props: stamp::unmark(props, m.topic.as_bytes(), expand).props,
    }
}

/// The MQTT 5 properties a kept message goes out with: its own, what is
/// left of its expiry, and `subscription_ids`; `None` if that is nothing.
pub(super) fn message_properties(
    m: &Message,
    subscription_ids: Vec<usize>,
    now: i64,
) -> Option<PublishProperties> {
    let p = &m.props;
    if p == &MessageProps::default() && subscription_ids.is_empty() {
        return None;
    }
    Some(PublishProperties {
        payload_format_indicator: p.payload_format_indicator,
        message_expiry_interval: p.message_expiry_interval.and_then(|_| {
            let left = m.expires_at_ms?.saturating_sub(now).max(1);
            u32::try_from((left + 999) / 1000).ok()
        }),
        topic_alias: None,
        response_topic: p.response_topic.clone(),
        correlation_data: p.correlation_data.clone().map(Bytes::from),
        user_properties: p.user_properties.clone(),
        subscription_identifiers: subscription_ids,
        content_type: p.content_type.clone(),
    })
}

/// The next message its share groups handed it; never, without a queue.
async fn next_group(
    queue: Option<&mut super::share::MemberQueue>,
) -> Option<super::share::GroupMessage> {
    match queue {
        Some((_, rx)) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The fanout's next message; never, without an inbox.
async fn next_marked(inbox: Option<&mut Inbox>) -> Option<Arc<Marked>> {
    match inbox {
        Some(inbox) => inbox.recv().await,
        None => std::future::pending().await,
    }
}

/// The router's next notification, and the link back; never, without a
/// link.
async fn next(
    rx: Option<&mut LinkRx>,
) -> (
    Result<Option<Notification>, rumqttd::local::LinkError>,
    &mut LinkRx,
) {
    match rx {
        Some(rx) => (rx.next().await, rx),
        None => std::future::pending().await,
    }
}
