//! One MQTT connection: the TLS stream on one side, fleetgate's checks in
//! between, and behind them either the command hub (a device) or a rumqttd
//! router link (a service).
//!
//! Nothing reaches a device or the router that we have not checked: CONNECT
//! is answered here (identity), PUBLISH and SUBSCRIBE pass the ACL first,
//! PINGREQ is answered here. A device has no router link at all: its
//! subscriptions (only ever under its own `devices/<id>/`) live in its
//! [`Mailbox`], commands reach it through the [`super::hub::Hub`], and this
//! session owns their packet ids, in-flight window (the device's Receive
//! Maximum) and acknowledgements ([`Outbox`]); its own messages go to the
//! router through the shared ingest links. Every PUBLISH a client sends is
//! acknowledged here (QoS 1 and 2 included), once it is handed on. The
//! last will is published here too, on an unclean end.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::stream::{FuturesOrdered, StreamExt};
use provisioning::ca::CertInfo;
use provisioning::sessions::{now_ms, Message, MessageProps, StoredFilter};
use provisioning::{CertKey, DeviceId, Identity, Role};
use rumqttd::local::{LinkError, LinkRx};
use rumqttd::protocol::{
    ConnAck, ConnAckProperties, ConnectReturnCode, Disconnect, DisconnectProperties,
    DisconnectReasonCode, LastWill, Packet, PingResp, PubAck, PubAckProperties, PubAckReason,
    PubComp, PubCompReason, PubRec, PubRecReason, PubRel, PubRelReason, Publish, PublishProperties,
    RetainForwardRule, SubAck, SubAckProperties, SubscribeReasonCode, UnsubAck, UnsubAckReason,
};
use rumqttd::Notification;
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_rustls::server::TlsStream;

use super::acks::RouterAcks;
use super::acl::{
    command_target, provision_request, sniff_connect, topic_matches, topic_name_problem, Acl,
    ConnectSniff, TopicProblem,
};
use super::codec::Codec;
use super::hub::{Delivery, Mailbox, Outcome, MAX_SESSION_EXPIRY};
use super::kept::{lock, Budget, Filters, ServiceSub};
use super::link::RouterTx;
use super::outbox::{qos_and_pkid, Outbox, Outgoing};
use super::share;
use super::stamp;
use super::{Kick, Shared, TOPIC_ALIAS_MAX};
use crate::metrics::Refusal;

/// What the TLS handshake established.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    pub identity: Identity,
    /// The certificate's registry key.
    pub key: CertKey,
    pub info: CertInfo,
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

/// Why a session ended.
#[derive(Debug)]
enum End {
    /// The client sent DISCONNECT: no will, unless its reason code was
    /// 0x04, Disconnect with Will Message (MQTT 5 3.14.4).
    ClientDisconnect {
        will: bool,
    },
    /// The socket closed or failed without DISCONNECT.
    Closed(String),
    KeepAlive,
    Kicked(Kick),
    CertificateExpired,
    Shutdown,
    Acl(String),
    Protocol(String),
    /// A protocol error with its own MQTT 5 reason code (malformed, topic
    /// name or alias invalid, packet too large).
    Violation(DisconnectReasonCode, String),
    /// The router dropped our link: a newer connection took the client id.
    TakenOver,
    /// The router sent DISCONNECT.
    RouterDisconnect,
}

impl End {
    /// The MQTT 5 DISCONNECT reason we send, if any.
    fn reason(&self) -> Option<DisconnectReasonCode> {
        use DisconnectReasonCode as R;
        match self {
            End::ClientDisconnect { .. } | End::Closed(_) | End::RouterDisconnect => None,
            End::KeepAlive => Some(R::KeepAliveTimeout),
            End::Kicked(_) => Some(R::AdministrativeAction),
            End::CertificateExpired => Some(R::MaximumConnectTime),
            End::Shutdown => Some(R::ServerShuttingDown),
            End::Acl(_) => Some(R::NotAuthorized),
            End::Protocol(_) => Some(R::ProtocolError),
            End::Violation(code, _) => Some(*code),
            End::TakenOver => Some(R::SessionTakenOver),
        }
    }

    /// What the DISCONNECT's reason string says (MQTT 5 3.14.2.2.3).
    fn reason_string(&self) -> Option<String> {
        match self {
            End::KeepAlive => Some("nothing received within 1.5 keep-alive periods".into()),
            End::Kicked(k) => Some(k.as_str().into()),
            End::CertificateExpired => Some("the client certificate expired".into()),
            End::Shutdown => Some("the server is shutting down".into()),
            End::Acl(why) | End::Protocol(why) | End::Violation(_, why) => Some(why.clone()),
            End::TakenOver => Some("a newer connection of this client took the session".into()),
            End::ClientDisconnect { .. } | End::Closed(_) | End::RouterDisconnect => None,
        }
    }

    /// Whether the router session is still ours to end.
    fn router_session_live(&self) -> bool {
        !matches!(
            self,
            End::TakenOver | End::RouterDisconnect | End::ClientDisconnect { .. }
        )
    }
}

struct Session {
    stream: TlsStream<TcpStream>,
    codec: Codec,
    rbuf: BytesMut,
    wbuf: BytesMut,
    max_packet: usize,
    acl: Acl,
    peer: Peer,
    shared: Arc<Shared>,
    /// SUBSCRIBEs sent to the router with some filters refused here: the
    /// refused positions, to merge into the router's SUBACK.
    pending_subacks: HashMap<u16, (Vec<Option<SubscribeReasonCode>>, Option<String>)>,
    /// OCSP requests this session may still have answered.
    ocsp_budget: crate::net::RateLimiter<()>,
    /// The client asked for a clean session (3.1.1) or clean start (5).
    clean: bool,
    /// What this device's messages carry of its identity ([`stamp::of`]).
    stamp: String,
    /// Packet ids of the client's QoS 2 PUBLISHes awaiting PUBREL: a
    /// repeated one is acknowledged, not passed on again.
    inbound_qos2: HashSet<u16>,
    /// Acknowledgements of the client's PUBLISHes still waiting (for the
    /// message bus to store them), in the order they came. (In a mutex
    /// only so that the session is `Sync`; it is used through `&mut`.)
    pending_acks: std::sync::Mutex<FuturesOrdered<PendingAck>>,
    /// What we send the client ourselves (a device's commands, a
    /// service's deliveries from the router): packet ids, window, acks.
    outbox: Outbox,
    /// A service's acknowledgements owed to the router, in its order.
    acks: RouterAcks,
    /// A device's side: its mailbox and session in the hub.
    device: Option<DeviceSide>,
    /// A service's router link.
    router: Option<RouterTx>,
    /// MQTT 5 topic aliases the client set (alias n at n - 1).
    aliases: Vec<Bytes>,
    /// The client's Maximum Packet Size (MQTT 5): a PUBLISH larger than
    /// this is dropped as if delivered, never sent.
    client_max_packet: usize,
    /// The client takes reason strings on acknowledgements (MQTT 5
    /// Request Problem Information).
    problem_info: bool,
    /// A service's subscriptions, with their MQTT 5 identifiers: its
    /// session's, kept across its connections while the session persists.
    service_subs: Filters,
    /// A service's `$share` subscriptions across nodes (with a bus).
    groups: HashMap<String, super::share::Membership>,
    /// The session is this node's, cluster-wide (with a bus).
    claim: Option<crate::bus::Claim>,
    /// A service's SUBSCRIBEs whose retained messages are sent once the
    /// router's SUBACK is: the filters and their granted QoS.
    pending_retained: HashMap<u16, Vec<(String, u8)>>,
    /// A device's budget of new topics (its own across its connections).
    topics: Budget,
    /// When this session last logged a refusal it goes on after (over a
    /// quota, or an MQTT 5 publish outside its topics): at most one a
    /// second.
    quota_logged: Option<std::time::Instant>,
}

struct DeviceSide {
    conn: u64,
    /// Its session is (or was) stored: closing it writes to the store.
    durable: bool,
    mailbox: Arc<Mailbox>,
    rx: mpsc::Receiver<Delivery>,
}

/// Room for one read from the TLS stream (rustls hands over what it has
/// decrypted; a bigger packet takes several reads).
const READ_SIZE: usize = 512;

/// A buffer past this size is dropped once empty, not kept for the next
/// message.
const KEEP_BUFFER: usize = 8 * 1024;

/// The most QoS 1 and 2 messages in flight to a device at once, whatever
/// Receive Maximum it allows.
const MAX_IN_FLIGHT: u16 = 100;

/// Whether a SUBSCRIBE's filter gets the retained messages it matches
/// (MQTT 5 3.8.3.1 retain handling; 3.1.1 always): `new`, it was not held.
fn sends_retained(rule: &RetainForwardRule, new: bool) -> bool {
    match rule {
        RetainForwardRule::OnEverySubscribe => true,
        RetainForwardRule::OnNewSubscribe => new,
        RetainForwardRule::Never => false,
    }
}

/// A share group's filter is what follows `$share/<group>/`.
fn share_inner(filter: &str) -> &str {
    match filter.strip_prefix("$share/") {
        Some(rest) => rest.split_once('/').map_or(rest, |(_, f)| f),
        None => filter,
    }
}

/// A filter of a SUBSCRIBE refused.
struct FilterRefused {
    code: SubscribeReasonCode,
    why: String,
    /// Over the subscription cap (counted as a quota refusal).
    quota: bool,
}

/// A SUBACK's properties: its reason string, if any.
fn suback_props(why: Option<String>) -> Option<SubAckProperties> {
    why.map(|why| SubAckProperties {
        reason_string: Some(why),
        user_properties: Vec::new(),
    })
}

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

/// An OCSP request over MQTT as DER: sent as DER, or as base64 text
/// (what a shell can pass, e.g. `mosquitto_rr -m "$(base64 -w0 req.der)"`;
/// a DER request always holds bytes outside base64's alphabet, such as its
/// OID tags).
fn ocsp_request_der(payload: &Bytes) -> Bytes {
    use base64ct::Encoding;
    let text = payload.iter().all(|b| {
        b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=') || b.is_ascii_whitespace()
    });
    if !text || payload.is_empty() {
        return payload.clone();
    }
    let compact: String = payload
        .iter()
        .filter(|b| !b.is_ascii_whitespace())
        .map(|b| char::from(*b))
        .collect();
    match base64ct::Base64::decode_vec(&compact) {
        Ok(der) => Bytes::from(der),
        Err(_) => payload.clone(),
    }
}

/// The longest MQTT 5 will delay honoured.
const MAX_WILL_DELAY: Duration = Duration::from_secs(24 * 3600);

/// The MQTT 5 topic for OCSP requests; the answer goes to the request's
/// response topic. (On 3.1.1, `devices/<id>/ocsp/request` and `.../response`.)
pub const OCSP_TOPIC: &str = "$fleetgate/ocsp/request";

/// Runs one connection to its end.
pub(super) fn run(
    stream: TlsStream<TcpStream>,
    peer: Peer,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
) -> impl std::future::Future<Output = ()> {
    let span = tracing::info_span!("mqtt", device.id = %peer.identity.id, peer.addr = %peer.addr);
    // Built here and boxed, so the session's future holds a pointer, not
    // the stream and peer twice over (an async fn keeps its arguments'
    // slots for its whole life): most of a held connection's memory.
    let topics = shared.kept.budget(
        peer.identity.id.as_str(),
        shared.live.new_topics_per_minute(),
        std::time::Instant::now(),
    );
    let s = Box::new(Session {
        stream,
        codec: Codec::for_level(4),
        rbuf: BytesMut::with_capacity(READ_SIZE),
        wbuf: BytesMut::new(),
        max_packet: shared.live.max_packet_size(),
        acl: Acl::new(&peer.identity),
        stamp: stamp::of(&peer),
        peer,
        pending_subacks: HashMap::new(),
        ocsp_budget: crate::net::RateLimiter::new(shared.cfg.ocsp_rate),
        shared: shared.clone(),
        clean: true,
        inbound_qos2: HashSet::new(),
        pending_acks: std::sync::Mutex::default(),
        outbox: Outbox::new(MAX_IN_FLIGHT),
        acks: RouterAcks::default(),
        device: None,
        router: None,
        aliases: Vec::new(),
        client_max_packet: usize::MAX,
        problem_info: true,
        service_subs: Filters::default(),
        groups: HashMap::new(),
        claim: None,
        pending_retained: HashMap::new(),
        topics,
        quota_logged: None,
    });
    let f = async move {
        let _ = session(s, shared, shutdown).await;
    };
    tracing::Instrument::instrument(f, span)
}

async fn session(
    mut s: Box<Session>,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ()> {
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
    s.clean = connect.clean_session;
    if let Some(p) = &connect_props {
        s.client_max_packet = p.max_packet_size.map_or(usize::MAX, |m| m as usize);
        s.problem_info = p.request_problem_info != Some(0);
    }

    // Identity: the certificate names the client. (Claims are shared by
    // many devices at once, so they keep whatever client id they chose.)
    let device_id = s.peer.identity.id.to_string();
    let assigned = connect.client_id.is_empty();
    let role = s.peer.identity.role;
    let claim = role == Role::Claim;
    if !assigned && connect.client_id != device_id && !claim {
        shared.metrics.refused(Refusal::WrongIdentity);
        tracing::warn!(reason = "wrong_identity", client_id = %crate::printable(&connect.client_id), "mqtt: refused: client id is not the certificate's id");
        let why = format!(
            "the client id must be the certificate's id, {device_id}, or empty (the server assigns it)"
        );
        s.refuse_connect(ConnectReturnCode::NotAuthorized, Some(why))
            .await;
        return Err(());
    }
    if let Some(w) = &will {
        // MQTT 1.5.4-1, 3.1.3.3: a will topic is a topic name.
        if let Some((problem, why)) = topic_name_problem(&w.topic) {
            shared.metrics.refused(Refusal::Protocol);
            tracing::warn!(reason = "protocol", detail = %crate::printable(&why), "mqtt: refused: last will topic");
            let code = match problem {
                TopicProblem::Malformed => ConnectReturnCode::MalformedPacket,
                TopicProblem::Invalid => ConnectReturnCode::TopicNameInvalid,
            };
            if s.codec.is_v5() {
                s.refuse_connect(code, Some(why)).await;
            } else {
                // 3.1.1 has no CONNACK code for it: the connection closes.
                let _ = tokio::time::timeout(Duration::from_secs(1), s.stream.shutdown()).await;
            }
            return Err(());
        }
        let topic = String::from_utf8_lossy(&w.topic);
        if let Err(why) = s.acl.can_publish(&topic) {
            shared.metrics.refused(Refusal::Acl);
            tracing::warn!(reason = "acl", detail = %crate::printable(&why.to_string()), "mqtt: refused: last will topic");
            s.refuse_connect(
                ConnectReturnCode::NotAuthorized,
                Some(format!("last will: {why}")),
            )
            .await;
            return Err(());
        }
    }

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
    let protocol = if s.codec.is_v5() {
        "MQTT 5"
    } else {
        "MQTT 3.1.1"
    };
    let (kick_rx, registration) = shared
        .sessions
        .register(&s.peer, protocol, role == Role::Device);
    let conn = registration.conn;

    // Standing now, before any CONNACK: a resumed TLS session skipped the
    // certificate verifier, and a manufacturer's new device registers here.
    if let Err(r) = Box::pin(shared.admit(&s.peer)).await {
        shared.metrics.refused(r.reason);
        tracing::warn!(reason = r.reason.as_str(), serial = %s.peer.key.serial, detail = %crate::printable(&r.detail), "mqtt: refused at CONNECT");
        let code = match (r.reason, s.codec.is_v5()) {
            (Refusal::JitRateLimited | Refusal::JitQuotaExceeded, true) => {
                ConnectReturnCode::QuotaExceeded
            }
            (Refusal::JitRateLimited | Refusal::JitQuotaExceeded, false) => {
                ConnectReturnCode::ServiceUnavailable
            }
            _ => ConnectReturnCode::NotAuthorized,
        };
        s.refuse_connect(code, Some(r.reason.as_str().replace('_', " ")))
            .await;
        return Err(());
    }

    // How long the session outlives the connection: 3.1.1 clean_session=0
    // keeps it (for the broker's bound), MQTT 5 says so in its CONNECT.
    let asked_expiry = if s.codec.is_v5() {
        connect_props
            .as_ref()
            .and_then(|p| p.session_expiry_interval)
            .filter(|e| *e > 0)
    } else {
        (!connect.clean_session).then_some(u32::MAX)
    };
    let expiry = asked_expiry.map(|e| e.min(MAX_SESSION_EXPIRY));
    // MQTT 5 Receive Maximum: what we send at QoS 1 and 2 waits for room.
    s.outbox = Outbox::new(
        connect_props
            .as_ref()
            .and_then(|p| p.receive_maximum)
            .unwrap_or(u16::MAX)
            .min(MAX_IN_FLIGHT),
    );

    // Claims never reach the router or the hub: this session answers
    // everything they may send. A device gets its mailbox; a service a
    // router link (building it waits on the router thread).
    let (mut link_rx, session_present) = match role {
        // Refused at the handshake; nothing to open if one got here.
        Role::Claim | Role::Node => (None, false),
        Role::Device => {
            let (hub, id) = (shared.hub.clone(), s.peer.identity.id.clone());
            let clean = connect.clean_session;
            let durable = hub.may_block(&id, expiry);
            let opened = if durable {
                tokio::task::spawn_blocking(move || hub.open(&id, conn, clean, expiry)).await
            } else {
                Ok(hub.open(&id, conn, clean, expiry))
            };
            match opened {
                Ok(Ok(opened)) => {
                    for q in opened.queued {
                        take_into(
                            &shared,
                            &s.peer,
                            &opened.mailbox,
                            &mut s.outbox,
                            Some(q.seq),
                            Arc::new(q.message),
                        );
                    }
                    s.device = Some(DeviceSide {
                        conn,
                        durable: durable || opened.session_present,
                        mailbox: opened.mailbox,
                        rx: opened.rx,
                    });
                    (None, opened.session_present)
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "mqtt: opening the device's session failed");
                    s.refuse_connect(ConnectReturnCode::ServiceUnavailable, None)
                        .await;
                    return Err(());
                }
                Err(e) => {
                    tracing::error!(error = %e, "mqtt: session task failed");
                    return Err(());
                }
            }
        }
        Role::Service | Role::Admin => {
            let Ok(slot) = shared.link_slots.acquire().await else {
                return Err(());
            };
            let links = shared.links.clone();
            let id = device_id.clone();
            // rumqttd keeps a session iff its link is not clean: an MQTT 5
            // session expiry of 0 is a clean one. (Clean start with an
            // expiry ends the old session first.)
            let clean = expiry.is_none();
            let wipe = connect.clean_session && !clean;
            let link = tokio::task::spawn_blocking(move || {
                if wipe {
                    wipe_router_session(&links, &id);
                }
                links(&id, clean)
            })
            .await;
            drop(slot);
            match link {
                Ok(Ok((tx, rx, n))) => {
                    let present = matches!(
                        Option::<Packet>::from(n),
                        Some(Packet::ConnAck(
                            ConnAck {
                                session_present: true,
                                ..
                            },
                            _
                        ))
                    );
                    // The filters its kept session holds in the router
                    // count against its cap, as they did before.
                    s.service_subs = shared.kept.filters(&device_id, !clean, present);
                    match RouterTx::spawn(format!("link-{device_id}"), tx, None, 64) {
                        Ok(tx) => s.router = Some(tx),
                        Err(e) => {
                            tracing::error!(error = %e, "mqtt: no thread for the router link");
                            s.refuse_connect(ConnectReturnCode::ServiceUnavailable, None)
                                .await;
                            return Err(());
                        }
                    }
                    (Some(rx), present)
                }
                // The router dropped the link before its CONNACK: a newer
                // connection with the same client id took it over meanwhile.
                // That is a takeover, not a refusal of this client.
                Ok(Err(e)) if matches!(*e, LinkError::Recv(_)) => {
                    shared
                        .metrics
                        .taken_over
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::info!("mqtt: taken over by a newer connection while connecting");
                    let _ = tokio::time::timeout(Duration::from_secs(1), s.stream.shutdown()).await;
                    return Err(());
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "mqtt: router refused the link");
                    s.refuse_connect(ConnectReturnCode::ServiceUnavailable, None)
                        .await;
                    return Err(());
                }
                Err(e) => {
                    tracing::error!(error = %e, "mqtt: link task failed");
                    return Err(());
                }
            }
        }
    };
    let props = s.codec.is_v5().then(|| ConnAckProperties {
        assigned_client_identifier: assigned.then(|| device_id.clone()),
        max_packet_size: u32::try_from(s.max_packet).ok(),
        topic_alias_max: Some(TOPIC_ALIAS_MAX),
        // Said only when it differs from what the client asked.
        session_expiry_interval: (asked_expiry != expiry).then_some(expiry.unwrap_or(0)),
        ..ConnAckProperties::default()
    });
    let connack = Packet::ConnAck(
        ConnAck {
            session_present: session_present && !connect.clean_session,
            code: ConnectReturnCode::Success,
        },
        props,
    );
    if s.send(connack).await.is_err() {
        s.end_router_session(&End::Closed("at CONNACK".into()))
            .await;
        s.close_device().await;
        return Err(());
    }

    shared
        .metrics
        .sessions
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(protocol = if s.codec.is_v5() { 5 } else { 4 }, serial = %s.peer.key.serial, session_present, "mqtt: connected");

    // The packet handlers' states are boxed while they run (see
    // `serve`): a held connection's future is mostly its `Session`.
    let end = s
        .serve(link_rx.as_mut(), kick_rx, &mut shutdown, connect.keep_alive)
        .await;
    // Watched before this connection lets go of the client id: a new
    // connection from here on cancels a delayed will and keeps a session.
    let mut back = shared.sessions.watch_return(&s.peer.identity.id);
    drop(registration);

    // Tell the client why, where the protocol has a way to.
    if let Some(reason) = end.reason() {
        if s.codec.is_v5() {
            let props = end.reason_string().map(|why| DisconnectProperties {
                session_expiry_interval: None,
                reason_string: Some(why),
                user_properties: Vec::new(),
                server_reference: None,
            });
            let _ = s
                .send(Packet::Disconnect(
                    Disconnect {
                        reason_code: reason,
                    },
                    props,
                ))
                .await;
        }
    }
    match &end {
        End::Kicked(k) => {
            shared
                .metrics
                .kicked
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(reason = k.as_str(), "mqtt: connection cut");
        }
        End::TakenOver => {
            shared
                .metrics
                .taken_over
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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

    // The client first: its connection ends now (a kicked device must be
    // cut at once, even under load). Then its session, here and in the
    // router.
    let _ = tokio::time::timeout(Duration::from_secs(1), s.stream.shutdown()).await;
    s.close_device().await;
    s.end_router_session(&end).await;
    drop(link_rx);

    // A service's kept session in the router ends at its expiry, unless
    // the service comes back first (rumqttd itself keeps it for good).
    if role == Role::Service && !matches!(end, End::TakenOver | End::RouterDisconnect) {
        if let Some(secs) = expiry {
            let (links, id, mut down) = (shared.links.clone(), device_id.clone(), shutdown.clone());
            let (shared, client) = (shared.clone(), s.peer.identity.id.clone());
            tokio::spawn(async move {
                let mut back = shared.sessions.watch_return(&client);
                if !back
                    .within(Duration::from_secs(secs.into()), &mut down)
                    .await
                    && !*down.borrow()
                {
                    tracing::info!(client = %id, "mqtt: a service's session expired");
                    shared.kept.forget_filters(&id);
                    let _ =
                        tokio::task::spawn_blocking(move || wipe_router_session(&links, &id)).await;
                }
            });
        }
    }

    // The last will, on an unclean end (not a takeover, not a kick).
    let unclean = matches!(
        end,
        End::ClientDisconnect { will: true }
            | End::Closed(_)
            | End::KeepAlive
            | End::CertificateExpired
            | End::Shutdown
            | End::Acl(_)
            | End::Protocol(_)
            | End::Violation(..)
    );
    let Some(will) = will.filter(|_| unclean) else {
        return Ok(());
    };
    // MQTT 5 3.1.3.2.2: the will waits out its delay or the session's end,
    // whichever comes first, and a new connection of the client within it
    // cancels the will. (A shutdown sends it now.)
    let delay = will_props
        .as_ref()
        .and_then(|p| p.delay_interval)
        .map(|secs| secs.min(expiry.unwrap_or(0)))
        .map(|secs| Duration::from_secs(secs.into()).min(MAX_WILL_DELAY))
        .filter(|d| !d.is_zero());
    if let Some(delay) = delay {
        if back.within(delay, &mut shutdown).await {
            tracing::info!("mqtt: the client came back within its will delay; no will");
            return Ok(());
        }
    }
    drop(back);
    let LastWill {
        topic,
        message,
        retain,
        qos,
    } = will;
    // A will spends from the device's budget of new topics like a PUBLISH.
    if s.peer.identity.role == Role::Device
        && !lock(&s.topics).admit_at(
            &topic,
            std::time::Instant::now(),
            shared.live.new_topics_per_minute(),
        )
    {
        let why = format!(
            "last will: more than {} new topics a minute from this device",
            shared.live.new_topics_per_minute()
        );
        s.over_quota(&why);
        return Ok(());
    }
    let props = will_props.map(|p| PublishProperties {
        payload_format_indicator: p.payload_format_indicator,
        message_expiry_interval: p.message_expiry_interval,
        content_type: p.content_type,
        response_topic: p.response_topic,
        correlation_data: p.correlation_data,
        user_properties: p.user_properties,
        ..PublishProperties::default()
    });
    let will = super::outbox::publish(&topic, &message, qos as u8, 1, false, retain);
    if let Ok(Ack::Later(stored)) = Box::pin(s.publish_onward(will, props)).await {
        let _ = stored.await;
    }
    Ok(())
}

/// Ends a client's kept session in the router: a clean link with its id,
/// at once disconnected (blocking: it waits on the router thread).
fn wipe_router_session(links: &super::LinkFactory, id: &str) {
    if let Ok((mut tx, _rx, _)) = links(id, true) {
        let _ = super::link::ready(tx.send(Packet::Disconnect(normal_disconnect(), None)));
    }
}

fn normal_disconnect() -> Disconnect {
    Disconnect {
        reason_code: DisconnectReasonCode::NormalDisconnection,
    }
}

impl Session {
    /// Reads the CONNECT, choosing the codec from its protocol level.
    async fn read_connect(&mut self) -> Result<Packet, String> {
        loop {
            match sniff_connect(&self.rbuf) {
                ConnectSniff::Incomplete => {}
                ConnectSniff::NotConnect(why) => return Err(why.to_owned()),
                ConnectSniff::Level(level) => {
                    self.codec = Codec::for_level(level);
                    match self.codec.read(&mut self.rbuf, self.max_packet) {
                        Ok(Some(p @ Packet::Connect(..))) => return Ok(p),
                        Ok(Some(_)) => return Err("first packet is not CONNECT".into()),
                        Ok(None) => {}
                        Err(e) => return Err(format!("malformed CONNECT: {e}")),
                    }
                }
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
        let ack = ConnAck {
            session_present: false,
            code,
        };
        let props = why
            .filter(|_| self.codec.is_v5())
            .map(|why| ConnAckProperties {
                reason_string: Some(why),
                ..ConnAckProperties::default()
            });
        let _ = self.send(Packet::ConnAck(ack, props)).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), self.stream.shutdown()).await;
    }

    fn encode(&mut self, p: Packet) -> Result<(), String> {
        self.codec
            .write(p, &mut self.wbuf)
            .map_err(|e| format!("encoding: {e}"))
    }

    async fn flush(&mut self) -> Result<(), String> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        self.stream
            .write_all(&self.wbuf)
            .await
            .map_err(|e| format!("write: {e}"))?;
        self.wbuf.clear();
        if self.wbuf.capacity() > KEEP_BUFFER {
            // A large message went out: give its room back.
            self.wbuf = BytesMut::new();
        }
        Ok(())
    }

    async fn send(&mut self, p: Packet) -> Result<(), String> {
        self.encode(p)?;
        self.flush().await
    }

    async fn serve(
        &mut self,
        mut link_rx: Option<&mut LinkRx>,
        mut kick: oneshot::Receiver<Kick>,
        shutdown: &mut watch::Receiver<bool>,
        keep_alive: u16,
    ) -> End {
        // MQTT 3.1.2.10: one and a half keep-alive periods.
        let idle = (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500));
        let mut deadline = idle.map(|d| tokio::time::Instant::now() + d);
        let until_expiry = (self.peer.info.not_after - OffsetDateTime::now_utc())
            .try_into()
            .unwrap_or(Duration::ZERO);
        let expiry = tokio::time::sleep(until_expiry);
        tokio::pin!(expiry);
        // What the device's session kept for it, and packets that came in
        // the same read as CONNECT.
        if let Some(end) = Box::pin(self.pump()).await {
            return end;
        }
        if !self.rbuf.is_empty() {
            if let Some(end) = Box::pin(self.incoming()).await {
                return end;
            }
        }
        loop {
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
                k = &mut kick => return match k {
                    Ok(Kick::TakenOver) => End::TakenOver,
                    k => End::Kicked(k.unwrap_or(Kick::Revoked)),
                },
                _ = shutdown.changed() => return End::Shutdown,
                _ = &mut expiry => return End::CertificateExpired,
                _ = sleep_until(deadline) => return End::KeepAlive,
                Some((qos, pkid, done)) = pending(&mut self.pending_acks).next(), if !pending(&mut self.pending_acks).is_empty() => {
                    match done {
                        Ok((reason, why)) => if let Err(e) = self.acknowledge(qos, pkid, reason, why) {
                            return End::Protocol(e);
                        },
                        Err(end) => return end,
                    }
                    if let Some(end) = Box::pin(self.pump()).await {
                        return end;
                    }
                }
                r = self.stream.read_buf(&mut self.rbuf), if pending(&mut self.pending_acks).len() < MAX_PENDING_ACKS => match r {
                    Ok(0) => return End::Closed("peer closed".into()),
                    Err(e) => return End::Closed(e.to_string()),
                    Ok(_) => {
                        deadline = idle.map(|d| tokio::time::Instant::now() + d);
                        if let Some(end) = Box::pin(self.incoming()).await {
                            return end;
                        }
                    }
                },
                d = next_delivery(self.device.as_mut()) => if let Some(d) = d {
                    if let Some(side) = self.device.as_mut() {
                        let mut d = Some(d);
                        while let Some(Delivery { seq, message }) = d.take() {
                            take_into(&self.shared, &self.peer, &side.mailbox, &mut self.outbox, seq, message);
                            d = side.rx.try_recv().ok();
                        }
                    }
                    if let Some(end) = Box::pin(self.pump()).await {
                        return end;
                    }
                },
                n = next(link_rx.as_deref_mut()) => match n {
                    Ok(Some(n)) => if let Some(rx) = link_rx.as_deref_mut() {
                        if let Some(end) = Box::pin(self.outgoing(n, rx)).await {
                            return end;
                        }
                    },
                    Ok(None) => {}
                    Err(_) => return End::TakenOver,
                },
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
        loop {
            while let Some((p, props, mut done)) = self.outbox.next_publish() {
                let before = self.wbuf.len();
                let limited = (self.client_max_packet != usize::MAX).then(|| p.clone());
                if let Err(e) = self.codec.write(Packet::Publish(p, props), &mut self.wbuf) {
                    return Some(End::Protocol(format!("encoding: {e}")));
                }
                let size = self.wbuf.len() - before;
                if let Some(p) = limited.filter(|_| size > self.client_max_packet) {
                    // MQTT 5 3.1.2.11.4: not sent, and done with as if it
                    // had been.
                    self.wbuf.truncate(before);
                    let (qos, pkid) = qos_and_pkid(&p);
                    if qos > 0 {
                        done = self.outbox.discard(pkid);
                    }
                    tracing::info!(
                        size,
                        limit = self.client_max_packet,
                        "mqtt: a message over the client's Maximum Packet Size dropped"
                    );
                }
                if let Some(token) = done {
                    self.finished(token, &mut to_router);
                }
            }
            let Some(side) = self.device.as_ref() else {
                break;
            };
            if !side.mailbox.take_reload() {
                break;
            }
            let id = &self.peer.identity.id;
            match self
                .shared
                .hub
                .keeper()
                .queued(id, self.outbox.last_seq(), now_ms())
            {
                Ok(q) => {
                    for q in q {
                        take_into(
                            &self.shared,
                            &self.peer,
                            &side.mailbox,
                            &mut self.outbox,
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
        } else {
            to_router.extend(self.acks.done(token));
        }
    }

    /// Decodes what has arrived, checks it, passes it on.
    async fn incoming(&mut self) -> Option<End> {
        let mut forward: Vec<Packet> = Vec::new();
        let mut end = None;
        let role = self.peer.identity.role;
        loop {
            let packet = match self.codec.read(&mut self.rbuf, self.max_packet) {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(rumqttd::protocol::Error::PayloadSizeLimitExceeded(n)) => {
                    end = Some(End::Violation(
                        DisconnectReasonCode::PacketTooLarge,
                        format!(
                            "a packet of {n} bytes is over this server's Maximum Packet Size of {} bytes",
                            self.max_packet
                        ),
                    ));
                    break;
                }
                // A packet type only a server sends (MQTT 5 4.13).
                Err(rumqttd::protocol::Error::InvalidPacketType(t)) => {
                    end = Some(End::Protocol(format!(
                        "packet type {t} is not one a client sends"
                    )));
                    break;
                }
                Err(e) => {
                    end = Some(End::Violation(
                        DisconnectReasonCode::MalformedPacket,
                        format!("malformed packet: {e}"),
                    ));
                    break;
                }
            };
            let done = match packet {
                Packet::Publish(p, props) => self.client_publish(p, props).await,
                Packet::Subscribe(sub, props) => match role {
                    Role::Device => self.device_subscribe(sub, props).await,
                    _ => self.subscribe(sub, props, &mut forward),
                },
                Packet::Unsubscribe(unsub, props) => match role {
                    Role::Device => self.device_unsubscribe(unsub).await,
                    _ => {
                        let mut unsub = unsub;
                        for f in &mut unsub.filters {
                            lock(&self.service_subs).remove(f);
                            if self.groups.remove(f).is_some() {
                                if let Some((group, inner)) = share::split(f) {
                                    *f = share::router_filter(group, inner);
                                }
                            }
                        }
                        forward.push(Packet::Unsubscribe(unsub, props));
                        Ok(())
                    }
                },
                Packet::PingReq(_) => self
                    .encode(Packet::PingResp(PingResp))
                    .map_err(End::Protocol),
                Packet::Disconnect(d, props) => {
                    let will = d.reason_code == DisconnectReasonCode::DisconnectWithWillMessage;
                    forward.push(Packet::Disconnect(d, props));
                    end = Some(End::ClientDisconnect { will });
                    break;
                }
                Packet::PubRel(rel, _) => {
                    // The end of one of the client's QoS 2 PUBLISHes.
                    let reason = if self.inbound_qos2.remove(&rel.pkid) {
                        PubCompReason::Success
                    } else {
                        PubCompReason::PacketIdentifierNotFound
                    };
                    self.encode(Packet::PubComp(
                        PubComp {
                            pkid: rel.pkid,
                            reason,
                        },
                        None,
                    ))
                    .map_err(End::Protocol)
                }
                p @ (Packet::PubAck(..) | Packet::PubRec(..) | Packet::PubComp(..)) => {
                    self.client_ack(p, &mut forward)
                }
                other => Err(End::Protocol(format!(
                    "unexpected packet from a client: {}",
                    packet_name(&other)
                ))),
            };
            if let Err(e) = done {
                end = Some(e);
                break;
            }
        }
        if let Some(e) = self.pump_with(forward).await {
            return Some(e);
        }
        end
    }

    /// A PUBLISH from the client: answered here (claims' provisioning,
    /// OCSP), or checked against the ACL, passed on and acknowledged.
    async fn client_publish(
        &mut self,
        mut p: Publish,
        mut props: Option<PublishProperties>,
    ) -> Result<(), End> {
        self.resolve_topic(&mut p, props.as_mut())?;
        let topic = String::from_utf8_lossy(&p.topic).into_owned();
        if self.peer.identity.role == Role::Claim {
            // Claims only ever provision; nothing reaches the router.
            return match provision_request(&topic) {
                Some(req) => {
                    let req = req.to_owned();
                    self.provision(&p, req).await.map_err(End::Protocol)
                }
                None => {
                    let why = self.acl.can_publish(&topic).err();
                    Err(End::Acl(why.map(|w| w.0).unwrap_or_default()))
                }
            };
        }
        match self.ocsp_reply_to(&topic, props.as_ref()) {
            None => {}
            Some(Ok((reply_topic, correlation))) => {
                return self
                    .answer_ocsp(&p, reply_topic, correlation)
                    .await
                    .map_err(End::Protocol);
            }
            Some(Err(why)) => return Err(End::Acl(why)),
        }
        let (qos, pkid) = qos_and_pkid(&p);
        if let Err(why) = self.acl.can_publish(&topic) {
            if !self.codec.is_v5() || qos == 0 {
                // Nothing would tell the client (MQTT 3.1.1 has no
                // negative acknowledgement; QoS 0 has none at all): the
                // connection ends, DISCONNECT 0x87 on MQTT 5 (MQTT-3.3.5-2).
                return Err(End::Acl(why.to_string()));
            }
            // MQTT 5, QoS 1 and 2: refused with 0x87 Not authorized,
            // dropped, and the connection goes on (3.3.4, 4.12); counted,
            // logged at most once a second per session.
            let why = why.to_string();
            self.refused_publish(&topic, &why);
            return self
                .ack_in_order(qos, pkid, Ack::now(PubAckReason::NotAuthorized, Some(why)))
                .map_err(End::Protocol);
        }
        if qos == 2 && !self.inbound_qos2.insert(pkid) {
            // A resend before PUBREL: passed on once already.
            return self
                .ack_in_order(2, pkid, Ack::now(PubAckReason::Success, None))
                .map_err(End::Protocol);
        }
        if self.device.is_some()
            && !lock(&self.topics).admit_at(
                &p.topic,
                std::time::Instant::now(),
                self.shared.live.new_topics_per_minute(),
            )
        {
            let why = format!(
                "more than {} new topics a minute from this device",
                self.shared.live.new_topics_per_minute()
            );
            self.over_quota(&why);
            return self
                .ack_in_order(qos, pkid, Ack::now(PubAckReason::QuotaExceeded, Some(why)))
                .map_err(End::Protocol);
        }
        // Anything a client sent under the reserved prefix removed.
        let props = stamp::unreserved(props);
        if let Some(side) = self.device.as_ref() {
            // The device's own subscriptions hear it too (unless No Local).
            if let Some((granted, ids)) = side.mailbox.granted_to(&topic, true) {
                let m = message(&p, qos, props.as_ref(), now_ms());
                let retain = p.retain && side.mailbox.retain_as_published(&topic);
                self.outbox.push(outgoing(
                    &m,
                    None,
                    qos.min(granted),
                    ids,
                    retain,
                    m.stored_at_ms,
                    false,
                ));
            }
        }
        let ack = self.publish_onward(p, props).await?;
        self.ack_in_order(qos, pkid, ack).map_err(End::Protocol)
    }

    /// A PUBLISH's topic, checked (MQTT 1.5.4, 4.7.1) and, on MQTT 5, set
    /// from or recorded as its topic alias (3.3.2.3.4). The alias is taken
    /// out of the properties: it is this connection's business only.
    fn resolve_topic(
        &mut self,
        p: &mut Publish,
        props: Option<&mut PublishProperties>,
    ) -> Result<(), End> {
        if !p.topic.is_empty() {
            if let Some((problem, why)) = topic_name_problem(&p.topic) {
                let code = match problem {
                    TopicProblem::Malformed => DisconnectReasonCode::MalformedPacket,
                    TopicProblem::Invalid => DisconnectReasonCode::TopicNameInvalid,
                };
                return Err(End::Violation(code, why));
            }
        }
        let Some(alias) = props.and_then(|pr| pr.topic_alias.take()) else {
            if p.topic.is_empty() {
                return Err(End::Protocol(
                    "a PUBLISH with an empty topic and no topic alias".into(),
                ));
            }
            return Ok(());
        };
        if alias == 0 || alias > TOPIC_ALIAS_MAX {
            return Err(End::Violation(
                DisconnectReasonCode::TopicAliasInvalid,
                format!("topic alias {alias} is outside 1..={TOPIC_ALIAS_MAX}, the Topic Alias Maximum this server advertised"),
            ));
        }
        let slot = usize::from(alias - 1);
        if p.topic.is_empty() {
            match self.aliases.get(slot).filter(|t| !t.is_empty()) {
                Some(t) => p.topic = t.clone(),
                None => {
                    return Err(End::Protocol(format!(
                        "topic alias {alias} was never set on this connection"
                    )))
                }
            }
        } else {
            if self.aliases.len() <= slot {
                self.aliases.resize(slot + 1, Bytes::new());
            }
            // Copied: it outlives this read buffer.
            self.aliases[slot] = Bytes::copy_from_slice(&p.topic);
        }
        Ok(())
    }

    /// Counts and logs (once a second at most) a refusal over a quota.
    /// A PUBLISH outside the client's topics, refused without ending the
    /// connection (MQTT 5).
    fn refused_publish(&mut self, topic: &str, why: &str) {
        self.shared.metrics.refused(Refusal::Acl);
        let now = std::time::Instant::now();
        if self
            .quota_logged
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            self.quota_logged = Some(now);
            tracing::warn!(reason = "acl", topic = %crate::printable(topic), detail = %crate::printable(why), "mqtt: publish refused (0x87)");
        }
    }

    fn over_quota(&mut self, why: &str) {
        self.shared.metrics.refused(Refusal::Quota);
        let now = std::time::Instant::now();
        if self
            .quota_logged
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            self.quota_logged = Some(now);
            tracing::warn!(reason = "quota_exceeded", detail = %crate::printable(why), "mqtt: refused");
        }
    }

    /// Passes a checked PUBLISH on: a command to its device's session
    /// through the hub; anything to services through the router (this
    /// service's own link, or the shared ingest links). Returns the
    /// acknowledgement's reason (MQTT 5 only; a 3.1.1 client gets a plain
    /// PUBACK, the refusal logged and counted).
    ///
    /// Every message a client sends enters the message plane here (a
    /// PUBLISH and a will alike), so here is where what it sent under the
    /// reserved prefix is removed: the stamp is the only identity.
    async fn publish_onward(
        &mut self,
        p: Publish,
        props: Option<PublishProperties>,
    ) -> Result<Ack, End> {
        let props = stamp::unreserved(props);
        let (qos, _) = qos_and_pkid(&p);
        let topic = String::from_utf8_lossy(&p.topic).into_owned();
        let mut ack = (PubAckReason::Success, None);
        let mut queued = None;
        if p.retain && self.peer.identity.role == Role::Device {
            // Kept for the device's own later subscriptions too.
            let mut m = message(&p, qos, props.as_ref(), now_ms());
            stamp::mark_kept(&mut m.props.user_properties, qos, &self.stamp);
            let (hub, id) = (self.shared.hub.clone(), self.peer.identity.id.clone());
            let kept = tokio::task::spawn_blocking(move || hub.retain_own(&id, &m, qos > 0)).await;
            match kept {
                Ok(Ok(())) => {}
                Ok(Err(provisioning::Error::QuotaExceeded { reason })) => {
                    self.over_quota(&reason);
                    return Ok(Ack::Now((PubAckReason::QuotaExceeded, Some(reason))));
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "mqtt: keeping a retained message failed");
                    return Ok(Ack::Now((
                        PubAckReason::ImplementationSpecificError,
                        Some("the retained message could not be stored".into()),
                    )));
                }
                Err(e) => {
                    tracing::error!(error = %e, "mqtt: retain task failed");
                    return Err(End::Protocol("internal error".into()));
                }
            }
        }
        if self.peer.identity.role == Role::Service {
            if let Some(target) = command_target(&topic) {
                let outcome = self.command(&target, &p, qos, props.as_ref()).await;
                if let Outcome::Queued { seq } = outcome {
                    queued = Some(seq);
                }
                ack = match outcome {
                    Outcome::Delivered | Outcome::Queued { .. } => (PubAckReason::Success, None),
                    // The device may be on another node: the bus takes it.
                    Outcome::NoSubscribers if self.shared.cfg.bus.is_some() => {
                        (PubAckReason::Success, None)
                    }
                    Outcome::NoSubscribers if self.codec.is_v5() => {
                        (PubAckReason::NoMatchingSubscribers, None)
                    }
                    Outcome::NoSubscribers => (PubAckReason::Success, None),
                    Outcome::Full(why) => {
                        tracing::warn!(reason = "quota_exceeded", device.target = %target, detail = %crate::printable(&why), "mqtt: command refused");
                        if self.codec.is_v5() {
                            (PubAckReason::QuotaExceeded, Some(why))
                        } else {
                            (PubAckReason::Success, None)
                        }
                    }
                    Outcome::Refused(why) => {
                        tracing::warn!(reason = "refused", device.target = %target, detail = %crate::printable(&why), "mqtt: command refused");
                        (PubAckReason::NotAuthorized, Some(why))
                    }
                };
            }
        }
        // For other nodes, as published (the mark is made where it lands).
        let for_bus = self
            .shared
            .cfg
            .bus
            .as_ref()
            .map(|_| message(&p, qos, props.as_ref(), now_ms()));
        // Into the router at QoS 0: acknowledged here, and the router's
        // delivery QoS is the subscription's.
        // Copied out of the read buffer: a message in the router's log
        // would otherwise keep its whole read buffer alive.
        // Never retained in the router: fleetgate keeps retained messages
        // itself (durably, with retain handling); the mark says it was.
        let onward = Packet::Publish(
            Publish::new(
                Bytes::copy_from_slice(&p.topic),
                Bytes::copy_from_slice(&p.payload),
                false,
            ),
            stamp::mark(props, qos, p.retain, &self.stamp),
        );
        let sent = match &self.router {
            Some(router) => router.send(onward).await,
            None => {
                self.shared
                    .ingest
                    .send(self.peer.identity.id.as_str(), onward)
                    .await
            }
        };
        if sent.is_err() {
            return Err(End::RouterDisconnect);
        }
        if let (Some(bus), Some(m)) = (&self.shared.cfg.bus, for_bus) {
            let id = &self.peer.identity;
            let v5 = self.codec.is_v5();
            match bus
                .publish(id.id.as_str(), id.role, &self.stamp, &m, qos > 0, queued)
                .await
            {
                // Acknowledged once stored; the next packets are read
                // meanwhile (acknowledgements still go out in order).
                Ok(stored) if qos > 0 => {
                    return Ok(Ack::Later(Box::pin(async move {
                        match stored.await {
                            Ok(()) => Ok(ack),
                            Err(e) => bus_refusal(&e, v5),
                        }
                    })));
                }
                Ok(_) => {}
                Err(e) if qos == 0 => {
                    tracing::debug!(error = %e, "mqtt: a QoS 0 message reached this node only");
                }
                Err(e) => return bus_refusal(&e, v5).map(Ack::Now),
            }
        }
        Ok(Ack::Now(ack))
    }

    /// A service's command for device `target`, through the hub.
    async fn command(
        &self,
        target: &DeviceId,
        p: &Publish,
        qos: u8,
        props: Option<&PublishProperties>,
    ) -> Outcome {
        let m = Arc::new(message(p, qos, props, now_ms()));
        let hub = &self.shared.hub;
        if let Some(outcome) = hub.publish_now(target, &m) {
            return outcome;
        }
        let (hub, target) = (hub.clone(), target.clone());
        match tokio::task::spawn_blocking(move || hub.publish(&target, m)).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "mqtt: storing a command failed");
                Outcome::Full("the command could not be stored".into())
            }
            Err(e) => {
                tracing::error!(error = %e, "mqtt: command task failed");
                Outcome::Full("the command could not be stored".into())
            }
        }
    }

    /// The client's PUBACK, PUBREC or PUBCOMP for something we sent it.
    fn client_ack(&mut self, p: Packet, to_router: &mut Vec<Packet>) -> Result<(), End> {
        let done = match p {
            Packet::PubAck(a, _) => self.outbox.puback(a.pkid),
            Packet::PubRec(r, _) => self.outbox.pubrec(r.pkid).map(|()| {
                let rel = PubRel {
                    pkid: r.pkid,
                    reason: PubRelReason::Success,
                };
                let _ = self.codec.write(Packet::PubRel(rel, None), &mut self.wbuf);
                None
            }),
            Packet::PubComp(c, _) => self.outbox.pubcomp(c.pkid),
            _ => Ok(None),
        };
        match done {
            Ok(Some(token)) => {
                self.finished(token, to_router);
                Ok(())
            }
            Ok(None) => Ok(()),
            // MQTT 4.4: an acknowledgement for nothing in flight is a
            // protocol error.
            Err(e) => Err(End::Protocol(e.0)),
        }
    }

    /// A service's (or claim's) SUBSCRIBE: the ACL and the cap here, the
    /// rest to its router link.
    fn subscribe(
        &mut self,
        mut sub: rumqttd::protocol::Subscribe,
        props: Option<rumqttd::protocol::SubscribeProperties>,
        forward: &mut Vec<Packet>,
    ) -> Result<(), End> {
        let id = props.as_ref().and_then(|p| p.id);
        let checked = {
            let subs = lock(&self.service_subs);
            self.check_filters(&sub.filters, subs.len(), |f| subs.contains_key(f))
        };
        let (codes, why) = self.refusals(checked);
        let allowed: Vec<_> = sub
            .filters
            .drain(..)
            .zip(&codes)
            .filter(|(_, c)| c.is_none())
            .map(|(f, _)| f)
            .collect();
        // Retained messages (MQTT 3.3.1.3) as each filter's retain handling
        // says; none for a share group (MQTT 5 4.8.2).
        let mut wanted = Vec::new();
        let mut allowed = allowed;
        for f in &mut allowed {
            let sub = ServiceSub {
                id,
                rap: f.preserve_retain,
            };
            let new = lock(&self.service_subs)
                .insert(f.path.clone(), sub)
                .is_none();
            if sends_retained(&f.retain_forward_rule, new) && !f.path.starts_with("$share/") {
                wanted.push((f.path.clone(), (f.qos as u8).min(2)));
            }
            // A group across nodes: its messages come through the bus.
            if let Some((group, inner)) = share::split(&f.path) {
                if !self.groups.contains_key(&f.path) {
                    if let Some(m) = share::join(&self.shared, group, inner) {
                        self.groups.insert(f.path.clone(), m);
                    }
                }
                if self.groups.contains_key(&f.path) {
                    f.path = share::router_filter(group, inner);
                }
            }
        }
        if !wanted.is_empty() && self.peer.identity.role == Role::Service {
            self.pending_retained.insert(sub.pkid, wanted);
        }
        if self.peer.identity.role == Role::Claim {
            // Answered here: provisioning replies come from this session,
            // never through the router.
            let ack = SubAck {
                pkid: sub.pkid,
                return_codes: codes
                    .into_iter()
                    .map(|c| {
                        c.unwrap_or(SubscribeReasonCode::Success(
                            rumqttd::protocol::QoS::AtMostOnce,
                        ))
                    })
                    .collect(),
            };
            return self
                .encode(Packet::SubAck(ack, suback_props(why)))
                .map_err(End::Protocol);
        }
        if allowed.is_empty() {
            let ack = SubAck {
                pkid: sub.pkid,
                return_codes: codes.into_iter().flatten().collect(),
            };
            return self
                .encode(Packet::SubAck(ack, suback_props(why)))
                .map_err(End::Protocol);
        }
        if codes.iter().any(Option::is_some) {
            self.pending_subacks.insert(sub.pkid, (codes, why));
        }
        sub.filters = allowed;
        forward.push(Packet::Subscribe(sub, props));
        Ok(())
    }

    /// The ACL's answer for each filter, then the subscription cap's (the
    /// session holds `held` filters, `holds` says which): `None` if
    /// allowed, else the refusal's reason code and why.
    fn check_filters(
        &self,
        filters: &[rumqttd::protocol::Filter],
        mut held: usize,
        holds: impl Fn(&str) -> bool,
    ) -> Vec<Option<FilterRefused>> {
        let max = self.shared.live.max_subscriptions();
        let mut seen = HashSet::new();
        let mut room = |f: &str| {
            let new = !holds(f) && seen.insert(f.to_owned());
            let room = !new || max == 0 || held < max;
            held += usize::from(new && room);
            room
        };
        let v5 = self.codec.is_v5();
        let code = |c: SubscribeReasonCode| if v5 { c } else { SubscribeReasonCode::Failure };
        filters
            .iter()
            .map(|f| match self.acl.can_subscribe(&f.path) {
                // rumqttd 0.20's router panics (and refuses every link
                // after) when a persistent session alone in a share group
                // leaves with a QoS 1 delivery not acknowledged: shared
                // subscriptions are for clean sessions only.
                Ok(()) if !self.clean && f.path.starts_with("$share/") => {
                    let why = format!("filter {:?}: shared subscriptions need a clean session", f.path);
                    tracing::warn!(reason = "acl", detail = %crate::printable(&why), "mqtt: subscription refused");
                    Some(FilterRefused {
                        code: code(SubscribeReasonCode::SharedSubscriptionsNotSupported),
                        why,
                        quota: false,
                    })
                }
                Ok(()) if !room(&f.path) => {
                    let why = format!(
                        "filter {:?}: this session holds {} subscriptions, the most allowed",
                        f.path, self.shared.live.max_subscriptions()
                    );
                    Some(FilterRefused {
                        code: code(SubscribeReasonCode::QuotaExceeded),
                        why,
                        quota: true,
                    })
                }
                Ok(()) => None,
                Err(why) => {
                    tracing::warn!(reason = "acl", detail = %crate::printable(&why.to_string()), "mqtt: subscription refused");
                    Some(FilterRefused {
                        code: code(SubscribeReasonCode::NotAuthorized),
                        why: why.0,
                        quota: false,
                    })
                }
            })
            .collect()
    }

    /// Reason codes of refused filters, and one reason string for the
    /// SUBACK (MQTT 5, if the client takes problem information).
    fn refusals(
        &mut self,
        checked: Vec<Option<FilterRefused>>,
    ) -> (Vec<Option<SubscribeReasonCode>>, Option<String>) {
        let mut whys = Vec::new();
        let mut quota = None;
        let codes = checked
            .into_iter()
            .map(|c| {
                c.map(|r| {
                    if r.quota && quota.is_none() {
                        quota = Some(r.why.clone());
                    }
                    whys.push(r.why);
                    r.code
                })
            })
            .collect();
        if let Some(why) = quota {
            self.over_quota(&why);
        }
        let why =
            (!whys.is_empty() && self.codec.is_v5() && self.problem_info).then(|| whys.join("; "));
        (codes, why)
    }

    /// A device's SUBSCRIBE, kept in its mailbox (and, for a persistent
    /// session, durably before the SUBACK); then the retained messages on
    /// its topics that match.
    async fn device_subscribe(
        &mut self,
        sub: rumqttd::protocol::Subscribe,
        props: Option<rumqttd::protocol::SubscribeProperties>,
    ) -> Result<(), End> {
        let Some(mailbox) = self.device.as_ref().map(|side| side.mailbox.clone()) else {
            return Ok(());
        };
        let checked =
            self.check_filters(&sub.filters, mailbox.subscriptions(), |f| mailbox.holds(f));
        let (codes, why) = self.refusals(checked);
        let id = props.as_ref().and_then(|p| p.id);
        let mut added = Vec::new();
        let mut rules = Vec::new();
        let return_codes = sub
            .filters
            .iter()
            .zip(codes)
            .map(|(f, code)| {
                code.unwrap_or_else(|| {
                    let qos = (f.qos as u8).min(2);
                    added.push(StoredFilter {
                        filter: f.path.clone(),
                        qos,
                        no_local: f.nolocal,
                        retain_as_published: f.preserve_retain,
                        id,
                    });
                    rules.push(f.retain_forward_rule.clone());
                    SubscribeReasonCode::Success(
                        rumqttd::protocol::qos(qos).unwrap_or(rumqttd::protocol::QoS::AtMostOnce),
                    )
                })
            })
            .collect();
        let fresh = mailbox.subscribe(&added);
        self.save_session(&mailbox).await?;
        self.encode(Packet::SubAck(
            SubAck {
                pkid: sub.pkid,
                return_codes,
            },
            suback_props(why),
        ))
        .map_err(End::Protocol)?;
        // Retained messages (MQTT 3.3.1.3), as each filter's retain
        // handling says.
        let wanted: Vec<&StoredFilter> = added
            .iter()
            .zip(fresh.iter().zip(&rules))
            .filter(|(_, (fresh, rule))| sends_retained(rule, **fresh))
            .map(|(f, _)| f)
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        let matching = |topic: &str| wanted.iter().any(|f| topic_matches(&f.filter, topic));
        let retained = match self.shared.hub.store().retained_where(
            Some(&self.peer.identity.id),
            now,
            matching,
        ) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "mqtt: reading retained messages");
                return Ok(());
            }
        };
        for m in retained {
            let matching = wanted.iter().filter(|f| topic_matches(&f.filter, &m.topic));
            let Some(qos) = matching.map(|f| f.qos).max() else {
                continue;
            };
            let ids = wanted.iter().filter_map(|f| f.id).collect();
            self.outbox
                .push(outgoing(&m, None, m.qos.min(qos), ids, true, now, false));
        }
        Ok(())
    }

    /// A device's UNSUBSCRIBE.
    async fn device_unsubscribe(
        &mut self,
        unsub: rumqttd::protocol::Unsubscribe,
    ) -> Result<(), End> {
        let Some(side) = self.device.as_ref() else {
            return Ok(());
        };
        let mailbox = side.mailbox.clone();
        let existed = mailbox.unsubscribe(&unsub.filters);
        self.save_session(&mailbox).await?;
        let reasons = existed
            .into_iter()
            .map(|e| {
                if e {
                    UnsubAckReason::Success
                } else {
                    UnsubAckReason::NoSubscriptionExisted
                }
            })
            .collect();
        self.encode(Packet::UnsubAck(
            UnsubAck {
                pkid: unsub.pkid,
                reasons,
            },
            None,
        ))
        .map_err(End::Protocol)
    }

    /// A persistent session's subscriptions, durably, on the blocking pool.
    async fn save_session(&self, mailbox: &Arc<Mailbox>) -> Result<(), End> {
        if !mailbox.is_persistent() {
            return Ok(());
        }
        let (hub, id, mailbox) = (
            self.shared.hub.clone(),
            self.peer.identity.id.clone(),
            mailbox.clone(),
        );
        match tokio::task::spawn_blocking(move || hub.save(&id, &mailbox)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "mqtt: saving the session's subscriptions");
                Err(End::Protocol("the session could not be saved".into()))
            }
            Err(e) => {
                tracing::error!(error = %e, "mqtt: session task failed");
                Err(End::Protocol("the session could not be saved".into()))
            }
        }
    }

    /// Closes a device's session in the hub (a persistent one starts its
    /// expiry; any other is dropped).
    async fn close_device(&mut self) {
        let Some(side) = self.device.take() else {
            return;
        };
        let (hub, id, conn) = (
            self.shared.hub.clone(),
            self.peer.identity.id.clone(),
            side.conn,
        );
        let durable = side.durable;
        drop(side);
        let closed = if durable {
            tokio::task::spawn_blocking(move || hub.close(&id, conn)).await
        } else {
            Ok(hub.close(&id, conn))
        };
        match closed {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "mqtt: closing the device's session"),
            Err(e) => tracing::error!(error = %e, "mqtt: session task failed"),
        }
    }

    /// Ends a service's router session, if it is still ours to end.
    async fn end_router_session(&mut self, end: &End) {
        let Some(router) = self.router.take() else {
            return;
        };
        if end.router_session_live() {
            let _ = router
                .send(Packet::Disconnect(normal_disconnect(), None))
                .await;
        }
    }

    /// Where the answer to an OCSP request published on `topic` goes, if
    /// `topic` is a status request topic.
    fn ocsp_reply_to(
        &self,
        topic: &str,
        props: Option<&PublishProperties>,
    ) -> Option<Result<(String, Option<bytes::Bytes>), String>> {
        let correlation = props.and_then(|p| p.correlation_data.clone());
        if topic == OCSP_TOPIC {
            return Some(match props.and_then(|p| p.response_topic.clone()) {
                Some(t) if !t.is_empty() && !t.contains(['+', '#']) => Ok((t, correlation)),
                _ => Err(format!("{OCSP_TOPIC} needs an MQTT 5 response topic")),
            });
        }
        let own = format!("devices/{}/ocsp/", self.peer.identity.id);
        (topic.strip_prefix(own.as_str()) == Some("request"))
            .then(|| Ok((format!("{own}response"), correlation)))
    }

    /// Answers an OCSP request straight back to this client (signed on the
    /// blocking pool, within this session's OCSP rate), and acknowledges it
    /// if it was sent with QoS 1. Over the rate, the request is dropped,
    /// counted and logged (once a second at most).
    async fn answer_ocsp(
        &mut self,
        p: &Publish,
        reply_topic: String,
        correlation: Option<bytes::Bytes>,
    ) -> Result<(), String> {
        self.ack(p)?;
        if let crate::net::Verdict::Deny { warn } =
            self.ocsp_budget.check((), std::time::Instant::now())
        {
            self.shared.metrics.refused(Refusal::RateLimited);
            if warn {
                tracing::warn!(
                    reason = "rate_limited",
                    "mqtt: OCSP requests over this session's rate; dropped"
                );
            }
            return Ok(());
        }
        let (status, request) = (self.shared.status.clone(), ocsp_request_der(&p.payload));
        let der = tokio::task::spawn_blocking(move || status.ocsp(&request))
            .await
            .map_err(|e| format!("OCSP task: {e}"))?;
        let props = self.codec.is_v5().then(|| PublishProperties {
            correlation_data: correlation,
            content_type: Some("application/ocsp-response".into()),
            ..PublishProperties::default()
        });
        tracing::debug!(topic = %crate::printable(&reply_topic), "mqtt: answered an OCSP request");
        self.encode(Packet::Publish(
            Publish::new(
                bytes::Bytes::from(reply_topic),
                bytes::Bytes::from(der),
                false,
            ),
            props,
        ))
    }

    /// Acknowledges a PUBLISH we answer ourselves (QoS 1 or 2).
    fn ack(&mut self, p: &Publish) -> Result<(), String> {
        let (qos, pkid) = qos_and_pkid(p);
        self.ack_in_order(qos, pkid, Ack::now(PubAckReason::Success, None))
    }

    /// Acknowledges the client's PUBLISH `pkid` now, or after those still
    /// waiting (MQTT 4.6: in the order they came), or once `ack` resolves.
    fn ack_in_order(&mut self, qos: u8, pkid: u16, ack: Ack) -> Result<(), String> {
        match ack {
            Ack::Now((reason, why)) if pending(&mut self.pending_acks).is_empty() => {
                self.acknowledge(qos, pkid, reason, why)
            }
            Ack::Now(r) => {
                pending(&mut self.pending_acks).push_back(Box::pin(std::future::ready((
                    qos,
                    pkid,
                    Ok(r),
                ))));
                Ok(())
            }
            Ack::Later(f) => {
                pending(&mut self.pending_acks)
                    .push_back(Box::pin(async move { (qos, pkid, f.await) }));
                Ok(())
            }
        }
    }

    /// PUBACK (QoS 1) or PUBREC (QoS 2) for the client's PUBLISH `pkid`,
    /// with `reason` (and, on MQTT 5, `why` as its reason string). A QoS 2
    /// flow then awaits PUBREL, unless the reason refused it.
    fn acknowledge(
        &mut self,
        qos: u8,
        pkid: u16,
        reason: PubAckReason,
        why: Option<String>,
    ) -> Result<(), String> {
        match qos {
            1 => {
                let props = why
                    .filter(|_| self.codec.is_v5() && self.problem_info)
                    .map(|r| PubAckProperties {
                        reason_string: Some(r),
                        user_properties: Vec::new(),
                    });
                self.encode(Packet::PubAck(PubAck { pkid, reason }, props))
            }
            2 => {
                let reason = pubrec_reason(reason);
                if reason == PubRecReason::Success || reason == PubRecReason::NoMatchingSubscribers
                {
                    self.inbound_qos2.insert(pkid);
                } else {
                    // MQTT 5 4.3.3: a PUBREC of 0x80 or more ends the flow.
                    self.inbound_qos2.remove(&pkid);
                }
                self.encode(Packet::PubRec(PubRec { pkid, reason }, None))
            }
            _ => Ok(()),
        }
    }

    /// A claim's provisioning request: a device certificate for a CSR, sent
    /// back on `<topic>/accepted`, or the reason on `<topic>/rejected`.
    async fn provision(&mut self, p: &Publish, req: String) -> Result<(), String> {
        self.ack(p)?;
        let topic = format!("{}{req}", super::acl::PROVISION);
        let parsed: Result<(String, Vec<u8>), (&'static str, String)> =
            if p.payload.first() == Some(&b'{') {
                serde_json::from_slice::<ProvisionRequest>(&p.payload)
                    .map(|r| (r.id.unwrap_or_else(|| req.clone()), r.csr.into_bytes()))
                    .map_err(|e| ("invalid_json", e.to_string()))
            } else {
                Ok((req.clone(), p.payload.to_vec()))
            };
        let claim = self.peer.identity.id.clone();
        let outcome = match parsed {
            Err(e) => Err(e),
            Ok((id, csr)) => {
                let auth = self.shared.auth.clone();
                let lifetime = self.shared.cert_lifetime;
                let done = tokio::task::spawn_blocking(move || {
                    let id = DeviceId::try_new(id)?;
                    let actor = format!("claim:{claim} (mqtt)");
                    auth.provision_with_claim(&claim, &id, &csr, lifetime, &actor)
                })
                .await;
                match done {
                    Ok(Ok((device, cert))) => Ok(serde_json::json!({
                        "id": device.id,
                        "serial": cert.serial,
                        "certificate_pem": cert.chain_pem,
                        "ca_pem": self.shared.auth.ca.root_pem(),
                        "not_after": cert.not_after.unix_timestamp(),
                    })),
                    Ok(Err(e)) => {
                        let w = crate::wire::of(&e);
                        Err((w.code, w.message))
                    }
                    Err(_) => Err(("internal", "internal error; see the server log".into())),
                }
            }
        };
        let (reply, body) = match outcome {
            Ok(body) => {
                self.shared
                    .metrics
                    .claim_provisions
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(request = %crate::printable(&req), device.id = %body["id"], "mqtt: claim provisioned a device");
                (format!("{topic}/accepted"), body)
            }
            Err((code, message)) => {
                tracing::warn!(reason = code, request = %crate::printable(&req), detail = %crate::printable(&message), "mqtt: provisioning request rejected");
                (
                    format!("{topic}/rejected"),
                    serde_json::json!({"code": code, "message": message}),
                )
            }
        };
        self.encode(Packet::Publish(
            Publish::new(
                bytes::Bytes::from(reply),
                bytes::Bytes::from(body.to_string()),
                false,
            ),
            None,
        ))
    }

    /// Takes what the router sent, and whatever else it has ready: SUBACKs
    /// (merged with our refusals), deliveries (into the outbox, at
    /// min(published QoS, granted QoS)), its PUBRELs (answered here).
    async fn outgoing(&mut self, first: Notification, link_rx: &mut LinkRx) -> Option<End> {
        let mut next = Some(first);
        let mut unscheduled = false;
        let mut end = None;
        let mut to_router = Vec::new();
        while let Some(n) = next.take() {
            if matches!(n, Notification::Unschedule) {
                unscheduled = true;
            } else {
                match Option::<Packet>::from(n) {
                    Some(Packet::SubAck(mut ack, props)) => {
                        let mut props = props;
                        if let Some((codes, why)) = self.pending_subacks.remove(&ack.pkid) {
                            if why.is_some() {
                                props = suback_props(why);
                            }
                            let mut granted = ack.return_codes.into_iter();
                            ack.return_codes = codes
                                .into_iter()
                                .map(|c| {
                                    c.or_else(|| granted.next())
                                        .unwrap_or(SubscribeReasonCode::Failure)
                                })
                                .collect();
                        }
                        let pkid = ack.pkid;
                        if let Err(e) = self.encode(Packet::SubAck(ack, props)) {
                            return Some(End::Protocol(e));
                        }
                        if let Some(wanted) = self.pending_retained.remove(&pkid) {
                            self.service_retained(wanted).await;
                        }
                    }
                    Some(Packet::Publish(p, props)) => {
                        let (qos, pkid) = qos_and_pkid(&p);
                        let topic = share::member_topic(&p.topic);
                        let u = stamp::unmark(props, &topic, self.codec.is_v5());
                        let mut props = u.props;
                        let (ids, rap) = self.matching_subs(&topic);
                        if self.codec.is_v5() && !ids.is_empty() {
                            props
                                .get_or_insert_with(Default::default)
                                .subscription_identifiers = ids;
                        }
                        let token = (qos > 0).then(|| self.acks.owe(pkid, qos));
                        self.outbox.push(Outgoing {
                            seq: token,
                            topic,
                            payload: p.payload,
                            qos: qos.min(u.qos),
                            // Retain As Published (MQTT 5 3.8.3.1).
                            retain: u.retained && rap,
                            props,
                        });
                    }
                    Some(Packet::PubRel(rel, _)) => to_router.extend(self.acks.pubrel(rel.pkid)),
                    // Acknowledgements of our publishes: we send the router
                    // QoS 0 only.
                    Some(Packet::PubAck(..) | Packet::PubRec(..) | Packet::PubComp(..)) => {}
                    Some(p @ Packet::Disconnect(..)) => {
                        let _ = self.encode(p);
                        end = Some(End::RouterDisconnect);
                        break;
                    }
                    Some(p) => {
                        if let Err(e) = self.encode(p) {
                            return Some(End::Protocol(e));
                        }
                    }
                    None => {}
                }
            }
            // Whatever else is ready now, without waiting.
            next = tokio::select! {
                biased;
                n = link_rx.next() => match n {
                    Ok(n) => n,
                    Err(_) => { end = Some(End::TakenOver); None }
                },
                _ = std::future::ready(()) => None,
            };
        }
        if let Some(e) = self.pump_with(to_router).await {
            return Some(e);
        }
        if unscheduled && end.is_none() && link_rx.wake().await.is_err() {
            return Some(End::TakenOver);
        }
        end
    }
}

impl Session {
    /// The retained messages matching a service's new subscriptions, into
    /// its outbox: at min(published, granted) QoS, flagged retained, with
    /// the sender's identity and the subscriptions' identifiers.
    async fn service_retained(&mut self, wanted: Vec<(String, u8)>) {
        let filters: Vec<String> = wanted.iter().map(|(f, _)| f.clone()).collect();
        let hub = self.shared.hub.clone();
        let now = now_ms();
        let found = tokio::task::spawn_blocking(move || hub.retained_matching(&filters, now)).await;
        let messages = match found {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "mqtt: reading retained messages");
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "mqtt: retained task failed");
                return;
            }
        };
        let v5 = self.codec.is_v5();
        for m in messages {
            let Some(granted) = wanted
                .iter()
                .filter(|(f, _)| topic_matches(f, &m.topic))
                .map(|(_, q)| *q)
                .max()
            else {
                continue;
            };
            let (ids, _) = self.matching_subs(m.topic.as_bytes());
            let ids = if v5 { ids } else { Vec::new() };
            self.outbox
                .push(outgoing(&m, None, m.qos.min(granted), ids, true, now, v5));
        }
    }

    /// What a service's subscriptions that match `topic` ask for (the
    /// router carries neither): their identifiers (MQTT 5 3.3.4), and
    /// whether any wants Retain As Published.
    fn matching_subs(&self, topic: &[u8]) -> (Vec<usize>, bool) {
        let subs = lock(&self.service_subs);
        if !subs.values().any(|s| s.id.is_some() || s.rap) {
            return (Vec::new(), false);
        }
        let topic = String::from_utf8_lossy(topic);
        let mut ids = Vec::new();
        let mut rap = false;
        for (filter, sub) in subs.iter() {
            if topic_matches(share_inner(filter), &topic) {
                ids.extend(sub.id);
                rap |= sub.rap;
            }
        }
        (ids, rap)
    }
}

/// Takes a message for a device into its outbox, at min(published QoS,
/// granted QoS), if a subscription still matches it and it has not
/// expired; a stored one that will not be delivered leaves the queue.
fn take_into(
    shared: &Shared,
    peer: &Peer,
    mailbox: &Mailbox,
    outbox: &mut Outbox,
    seq: Option<u64>,
    m: Arc<Message>,
) {
    let now = now_ms();
    let granted = mailbox.granted(&m.topic);
    let expired = m.expires_at_ms.is_some_and(|t| t <= now);
    let Some((granted, ids)) = granted.filter(|_| !expired) else {
        if let Some(seq) = seq {
            shared.hub.keeper().delivered(&peer.identity.id, seq);
        }
        return;
    };
    let retain = m.retain && mailbox.retain_as_published(&m.topic);
    outbox.push(outgoing(
        &m,
        seq,
        m.qos.min(granted),
        ids,
        retain,
        now,
        false,
    ));
}

/// A PUBLISH as a message kept for a device (queued or retained).
fn message(p: &Publish, qos: u8, props: Option<&PublishProperties>, now: i64) -> Message {
    let props = props.cloned().unwrap_or_default();
    Message {
        topic: String::from_utf8_lossy(&p.topic).into_owned(),
        payload: p.payload.to_vec(),
        qos,
        retain: p.retain,
        expires_at_ms: props
            .message_expiry_interval
            .map(|s| now.saturating_add(i64::from(s) * 1000)),
        props: MessageProps {
            payload_format_indicator: props.payload_format_indicator,
            content_type: props.content_type,
            response_topic: props.response_topic,
            correlation_data: props.correlation_data.map(|b| b.to_vec()),
            user_properties: props.user_properties,
            message_expiry_interval: props.message_expiry_interval,
        },
        stored_at_ms: now,
    }
}

/// The next message for a device session; never, for other sessions.
async fn next_delivery(side: Option<&mut DeviceSide>) -> Option<Delivery> {
    match side {
        Some(side) => side.rx.recv().await,
        None => std::future::pending().await,
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

fn pubrec_reason(r: PubAckReason) -> PubRecReason {
    match r {
        PubAckReason::Success => PubRecReason::Success,
        PubAckReason::NoMatchingSubscribers => PubRecReason::NoMatchingSubscribers,
        PubAckReason::UnspecifiedError => PubRecReason::UnspecifiedError,
        PubAckReason::ImplementationSpecificError => PubRecReason::ImplementationSpecificError,
        PubAckReason::NotAuthorized => PubRecReason::NotAuthorized,
        PubAckReason::TopicNameInvalid => PubRecReason::TopicNameInvalid,
        PubAckReason::PacketIdentifierInUse => PubRecReason::PacketIdentifierInUse,
        PubAckReason::QuotaExceeded => PubRecReason::QuotaExceeded,
        PubAckReason::PayloadFormatInvalid => PubRecReason::PayloadFormatInvalid,
    }
}

/// The router's next notification; never, without a link.
async fn next(rx: Option<&mut LinkRx>) -> Result<Option<Notification>, rumqttd::local::LinkError> {
    match rx {
        Some(rx) => rx.next().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn packet_name(p: &Packet) -> &'static str {
    match p {
        Packet::Connect(..) => "CONNECT",
        Packet::ConnAck(..) => "CONNACK",
        Packet::Publish(..) => "PUBLISH",
        Packet::PubAck(..) => "PUBACK",
        Packet::PingReq(..) => "PINGREQ",
        Packet::PingResp(..) => "PINGRESP",
        Packet::Subscribe(..) => "SUBSCRIBE",
        Packet::SubAck(..) => "SUBACK",
        Packet::PubRec(..) => "PUBREC",
        Packet::PubRel(..) => "PUBREL",
        Packet::PubComp(..) => "PUBCOMP",
        Packet::Unsubscribe(..) => "UNSUBSCRIBE",
        Packet::UnsubAck(..) => "UNSUBACK",
        Packet::Disconnect(..) => "DISCONNECT",
    }
}
