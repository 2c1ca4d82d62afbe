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

mod answers;
mod end;
mod publish;
mod router;
mod subscriptions;

use end::{normal_disconnect, End};
use router::wipe_router_session;
use subscriptions::{next_delivery, take_into};

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

#[cfg(test)]
mod tests;
