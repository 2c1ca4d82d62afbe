//! One MQTT connection: the TLS stream on one side, a rumqttd router link on
//! the other, fleetgate's checks in between.
//!
//! The router never sees a packet we have not checked: CONNECT is answered
//! here (identity), PUBLISH and SUBSCRIBE pass the ACL first, PINGREQ is
//! answered here. The last will is kept here too: rumqttd cannot be told of
//! an unclean close through a local link, so on one we publish the will
//! ourselves and then end the router session with a DISCONNECT.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use provisioning::ca::CertInfo;
use provisioning::{Authority, CertKey, DeviceId, Identity, Role};
use rumqttd::local::{LinkError, LinkRx, LinkTx};
use rumqttd::protocol::{
    ConnAck, ConnAckProperties, ConnectReturnCode, Disconnect, DisconnectReasonCode, LastWill,
    Packet, PingResp, PubAck, PubAckReason, Publish, PublishProperties, SubAck,
    SubscribeReasonCode,
};
use rumqttd::Notification;
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, watch};
use tokio_rustls::server::TlsStream;

use super::acl::{provision_request, sniff_connect, Acl, ConnectSniff};
use super::codec::Codec;
use super::{Kick, Shared};
use crate::metrics::Refusal;
use crate::status::StatusService;

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

/// Why a session ended.
#[derive(Debug)]
enum End {
    /// The client sent DISCONNECT: no will.
    ClientDisconnect,
    /// The socket closed or failed without DISCONNECT.
    Closed(String),
    KeepAlive,
    Kicked(Kick),
    CertificateExpired,
    Shutdown,
    Acl(String),
    Protocol(String),
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
            End::ClientDisconnect | End::Closed(_) | End::RouterDisconnect => None,
            End::KeepAlive => Some(R::KeepAliveTimeout),
            End::Kicked(_) => Some(R::AdministrativeAction),
            End::CertificateExpired => Some(R::MaximumConnectTime),
            End::Shutdown => Some(R::ServerShuttingDown),
            End::Acl(_) => Some(R::NotAuthorized),
            End::Protocol(_) => Some(R::ProtocolError),
            End::TakenOver => Some(R::SessionTakenOver),
        }
    }

    /// Whether the router session is still ours to end.
    fn router_session_live(&self) -> bool {
        !matches!(
            self,
            End::TakenOver | End::RouterDisconnect | End::ClientDisconnect
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
    /// SUBSCRIBEs sent to the router with some filters refused here: the
    /// refused positions, to merge into the router's SUBACK.
    pending_subacks: HashMap<u16, Vec<Option<SubscribeReasonCode>>>,
    status: Arc<StatusService>,
    /// For claims' provisioning requests.
    auth: Arc<Authority>,
    cert_lifetime: time::Duration,
    metrics: Arc<crate::metrics::Metrics>,
    /// OCSP requests this session may still have answered.
    ocsp_budget: crate::net::RateLimiter<()>,
    /// The client asked for a clean session (3.1.1) or clean start (5).
    clean: bool,
    /// The user properties stamped on this device's messages.
    stamp: Vec<(String, String)>,
}

/// The prefix of the MQTT 5 user properties fleetgate stamps on device
/// messages; a client's own properties under it are removed first.
pub const IDENTITY_PREFIX: &str = "x-fleetgate-";

/// The verified identity of a device's messages, as MQTT 5 user properties
/// (the MQTT form of an application gateway's client-certificate header):
/// `x-fleetgate-device-id`, `-serial`, `-fingerprint` (SHA-256 of the
/// certificate, hex) and `-manufacturer` if any. Other roles get none.
fn identity_stamp(peer: &Peer) -> Vec<(String, String)> {
    if peer.identity.role != Role::Device {
        return Vec::new();
    }
    let mut stamp = vec![
        (
            format!("{IDENTITY_PREFIX}device-id"),
            peer.identity.id.to_string(),
        ),
        (format!("{IDENTITY_PREFIX}serial"), peer.key.serial.to_hex()),
        (
            format!("{IDENTITY_PREFIX}fingerprint"),
            peer.info.fingerprint.clone(),
        ),
    ];
    if let Some(m) = &peer.manufacturer {
        stamp.push((format!("{IDENTITY_PREFIX}manufacturer"), m.to_string()));
    }
    stamp
}

/// `props` with every user property under [`IDENTITY_PREFIX`] removed and
/// `stamp` added.
fn stamped(
    props: Option<PublishProperties>,
    stamp: &[(String, String)],
) -> Option<PublishProperties> {
    let reserved = |k: &str| {
        k.get(..IDENTITY_PREFIX.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(IDENTITY_PREFIX))
    };
    let forged = props
        .as_ref()
        .is_some_and(|p| p.user_properties.iter().any(|(k, _)| reserved(k)));
    if stamp.is_empty() && !forged {
        return props;
    }
    let mut props = props.unwrap_or_default();
    props.user_properties.retain(|(k, _)| !reserved(k));
    props.user_properties.extend_from_slice(stamp);
    Some(props)
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

/// How long a kicked session waits, its client already cut, before it ends
/// its router session.
const KICKED_CLEANUP_DELAY: Duration = Duration::from_millis(100);

/// The MQTT 5 topic for OCSP requests; the answer goes to the request's
/// response topic. (On 3.1.1, `devices/<id>/ocsp/request` and `.../response`.)
pub const OCSP_TOPIC: &str = "$fleetgate/ocsp/request";

/// Runs one connection to its end.
pub(super) async fn run(
    stream: TlsStream<TcpStream>,
    peer: Peer,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
) {
    let span = tracing::info_span!("mqtt", device.id = %peer.identity.id, peer.addr = %peer.addr);
    let _ = tracing::Instrument::instrument(session(stream, peer, shared, shutdown), span).await;
}

async fn session(
    stream: TlsStream<TcpStream>,
    peer: Peer,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ()> {
    let mut s = Session {
        stream,
        codec: Codec::for_level(4),
        rbuf: BytesMut::with_capacity(4096),
        wbuf: BytesMut::with_capacity(4096),
        max_packet: shared.cfg.max_packet_size,
        acl: Acl::new(&peer.identity),
        stamp: identity_stamp(&peer),
        peer,
        pending_subacks: HashMap::new(),
        status: shared.status.clone(),
        auth: shared.auth.clone(),
        cert_lifetime: shared.cert_lifetime,
        metrics: shared.metrics.clone(),
        ocsp_budget: crate::net::RateLimiter::new(shared.cfg.ocsp_rate),
        clean: true,
    };

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
    let Packet::Connect(connect, _props, will, will_props, _login) = connect else {
        return Err(());
    };
    s.clean = connect.clean_session;

    // Identity: the certificate names the client. (Claims are shared by
    // many devices at once, so they keep whatever client id they chose.)
    let device_id = s.peer.identity.id.to_string();
    let assigned = connect.client_id.is_empty();
    let claim = s.peer.identity.role == Role::Claim;
    if !assigned && connect.client_id != device_id && !claim {
        shared.metrics.refused(Refusal::WrongIdentity);
        tracing::warn!(reason = "wrong_identity", client_id = %crate::printable(&connect.client_id), "mqtt: refused: client id is not the certificate's id");
        s.refuse_connect(ConnectReturnCode::NotAuthorized).await;
        return Err(());
    }
    if let Some(w) = &will {
        let topic = String::from_utf8_lossy(&w.topic);
        if let Err(why) = s.acl.can_publish(&topic) {
            shared.metrics.refused(Refusal::Acl);
            tracing::warn!(reason = "acl", detail = %crate::printable(&why.to_string()), "mqtt: refused: last will topic");
            s.refuse_connect(ConnectReturnCode::NotAuthorized).await;
            return Err(());
        }
    }

    // Kickable from here on: a revocation from now on finds this session,
    // so the one check of standing below cannot miss one.
    let (kick_rx, registration) = shared.sessions.register(&s.peer);

    // Standing now, before any CONNACK: a resumed TLS session skipped the
    // certificate verifier, and a manufacturer's new device registers here.
    if let Err(r) = shared.admit(&s.peer).await {
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
        s.refuse_connect(code).await;
        return Err(());
    }

    // A router link; building it waits on the router thread. Claims never
    // reach the router: this session answers everything they may send.
    let (mut link_tx, mut link_rx, notification) = if claim {
        let ack = ConnAck {
            session_present: false,
            code: ConnectReturnCode::Success,
        };
        (None, None, Some(Packet::ConnAck(ack, None)))
    } else {
        let Ok(slot) = shared.link_slots.acquire().await else {
            return Err(());
        };
        let links = shared.links.clone();
        let id = device_id.clone();
        let clean = connect.clean_session;
        let link = tokio::task::spawn_blocking(move || links(&id, clean)).await;
        drop(slot);
        match link {
            Ok(Ok((tx, rx, n))) => (Some(tx), Some(rx), Option::<Packet>::from(n)),
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
                s.refuse_connect(ConnectReturnCode::ServiceUnavailable)
                    .await;
                return Err(());
            }
            Err(e) => {
                tracing::error!(error = %e, "mqtt: link task failed");
                return Err(());
            }
        }
    };
    let connack = match notification {
        Some(Packet::ConnAck(ack, props)) => {
            let props = s.codec.is_v5().then(|| ConnAckProperties {
                assigned_client_identifier: assigned.then(|| device_id.clone()),
                max_packet_size: u32::try_from(s.max_packet).ok(),
                ..props.unwrap_or_default()
            });
            Packet::ConnAck(ack, props)
        }
        other => {
            tracing::error!(packet = ?other, "mqtt: router answered the link with no CONNACK");
            return Err(());
        }
    };
    if s.send(connack).await.is_err() {
        if let Some(tx) = link_tx.as_mut() {
            let _ = tx.send(Packet::Disconnect(normal_disconnect(), None)).await;
        }
        return Err(());
    }

    shared
        .metrics
        .sessions
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(protocol = if s.codec.is_v5() { 5 } else { 4 }, serial = %s.peer.key.serial, "mqtt: connected");

    let end = s
        .serve(
            link_tx.as_mut(),
            link_rx.as_mut(),
            kick_rx,
            &mut shutdown,
            connect.keep_alive,
        )
        .await;
    drop(registration);

    // Tell the client why, where the protocol has a way to.
    if let Some(reason) = end.reason() {
        if s.codec.is_v5() {
            let _ = s
                .send(Packet::Disconnect(
                    Disconnect {
                        reason_code: reason,
                    },
                    None,
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
        End::CertificateExpired => {
            shared.metrics.refused(Refusal::Expired);
            tracing::warn!(reason = "expired", "mqtt: certificate expired mid-session");
        }
        End::Closed(why) => {
            tracing::info!(detail = %crate::printable(why), "mqtt: connection closed without DISCONNECT")
        }
        other => tracing::info!(end = ?other, "mqtt: disconnected"),
    }

    // The client first: its connection ends now, whatever the router is
    // doing (a kicked device must be cut at once, even under load).
    let _ = tokio::time::timeout(Duration::from_secs(1), s.stream.shutdown()).await;
    let stamp = std::mem::take(&mut s.stamp);
    let s_id = s.peer.identity.id.clone();
    drop(s);

    // Then end the router session, publishing the will on an unclean end.
    // `LinkTx::send` blocks while the router's queue is full: on the blocking
    // pool, so a busy router never stalls the async workers.
    if let (true, Some(mut link_tx), Some(link_rx)) = (end.router_session_live(), link_tx, link_rx)
    {
        if matches!(end, End::Kicked(_)) {
            // A revocation cuts many sessions at once (a whole lot in one
            // bulk call): cutting the others' clients comes before the
            // router's bookkeeping, which competes for the same cores.
            tokio::time::sleep(KICKED_CLEANUP_DELAY).await;
        }
        let mut will = will.filter(|_| !matches!(end, End::Kicked(_)));
        let delay = will_props
            .as_ref()
            .and_then(|p| p.delay_interval)
            .map(|secs| Duration::from_secs(secs.into()).min(MAX_WILL_DELAY))
            .filter(|d| !d.is_zero());
        if let (Some(_), Some(delay)) = (&will, delay) {
            // MQTT 5 3.1.3.2.2: the will waits out its delay, and a new
            // connection of the device within it cancels the will. (The
            // router session stays open meanwhile; a shutdown sends it now.)
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.changed() => {}
            }
            if shared.sessions.is_live(&s_id) {
                tracing::info!(device.id = %s_id, "mqtt: the device came back within its will delay; no will");
                will = None;
            }
        }
        let handle = tokio::runtime::Handle::current();
        let _ = tokio::task::spawn_blocking(move || {
            let _link_rx = link_rx;
            if let Some(LastWill {
                topic,
                message,
                retain,
                ..
            }) = will
            {
                let props = will_props.map(|p| PublishProperties {
                    payload_format_indicator: p.payload_format_indicator,
                    message_expiry_interval: p.message_expiry_interval,
                    content_type: p.content_type,
                    response_topic: p.response_topic,
                    correlation_data: p.correlation_data,
                    user_properties: p.user_properties,
                    ..PublishProperties::default()
                });
                let will =
                    Packet::Publish(Publish::new(topic, message, retain), stamped(props, &stamp));
                let _ = handle.block_on(link_tx.send(will));
            }
            let _ = handle.block_on(link_tx.send(Packet::Disconnect(normal_disconnect(), None)));
        })
        .await;
    }
    Ok(())
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

    /// CONNACK with `code` (a 3.1.1 code, or any for MQTT 5), then close.
    async fn refuse_connect(&mut self, code: ConnectReturnCode) {
        let ack = ConnAck {
            session_present: false,
            code,
        };
        let _ = self.send(Packet::ConnAck(ack, None)).await;
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
        Ok(())
    }

    async fn send(&mut self, p: Packet) -> Result<(), String> {
        self.encode(p)?;
        self.flush().await
    }

    async fn serve(
        &mut self,
        mut link_tx: Option<&mut LinkTx>,
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
        // Packets that came in the same read as CONNECT.
        if !self.rbuf.is_empty() {
            if let Some(end) = self.incoming(link_tx.as_deref_mut()).await {
                return end;
            }
        }
        loop {
            tokio::select! {
                biased;
                k = &mut kick => return End::Kicked(k.unwrap_or(Kick::Revoked)),
                _ = shutdown.changed() => return End::Shutdown,
                _ = &mut expiry => return End::CertificateExpired,
                _ = sleep_until(deadline) => return End::KeepAlive,
                r = self.stream.read_buf(&mut self.rbuf) => match r {
                    Ok(0) => return End::Closed("peer closed".into()),
                    Err(e) => return End::Closed(e.to_string()),
                    Ok(_) => {
                        deadline = idle.map(|d| tokio::time::Instant::now() + d);
                        if let Some(end) = self.incoming(link_tx.as_deref_mut()).await {
                            return end;
                        }
                    }
                },
                n = next(link_rx.as_deref_mut()) => match n {
                    Ok(Some(n)) => if let Some(rx) = link_rx.as_deref_mut() {
                        if let Some(end) = self.outgoing(n, rx).await {
                            return end;
                        }
                    },
                    Ok(None) => {}
                    Err(_) => return End::TakenOver,
                },
            }
        }
    }

    /// Decodes what has arrived, checks it, forwards it.
    async fn incoming(&mut self, link_tx: Option<&mut LinkTx>) -> Option<End> {
        let mut forward: Vec<Packet> = Vec::new();
        let mut end = None;
        loop {
            let packet = match self.codec.read(&mut self.rbuf, self.max_packet) {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(e) => {
                    end = Some(End::Protocol(format!("malformed packet: {e}")));
                    break;
                }
            };
            match packet {
                Packet::Publish(p, props) => {
                    let topic = String::from_utf8_lossy(&p.topic).into_owned();
                    if self.peer.identity.role == Role::Claim {
                        // Claims only ever provision; nothing reaches the router.
                        match provision_request(&topic) {
                            Some(req) => {
                                let req = req.to_owned();
                                if let Err(e) = self.provision(&p, req).await {
                                    end = Some(End::Protocol(e));
                                    break;
                                }
                                continue;
                            }
                            None => {
                                let why = self.acl.can_publish(&topic).err();
                                end = Some(End::Acl(why.map(|w| w.0).unwrap_or_default()));
                                break;
                            }
                        }
                    }
                    match self.ocsp_reply_to(&topic, props.as_ref()) {
                        None => {}
                        Some(Ok((reply_topic, correlation))) => {
                            if let Err(e) = self.answer_ocsp(&p, reply_topic, correlation).await {
                                end = Some(End::Protocol(e));
                                break;
                            }
                            continue;
                        }
                        Some(Err(why)) => {
                            end = Some(End::Acl(why));
                            break;
                        }
                    }
                    if let Err(why) = self.acl.can_publish(&topic) {
                        end = Some(End::Acl(why.to_string()));
                        break;
                    }
                    forward.push(Packet::Publish(p, stamped(props, &self.stamp)));
                }
                Packet::Subscribe(mut sub, props) => {
                    let refused = if self.codec.is_v5() {
                        SubscribeReasonCode::NotAuthorized
                    } else {
                        SubscribeReasonCode::Failure
                    };
                    let mut codes = Vec::with_capacity(sub.filters.len());
                    let mut allowed = Vec::with_capacity(sub.filters.len());
                    for f in sub.filters.drain(..) {
                        match self.acl.can_subscribe(&f.path) {
                            // rumqttd 0.20's router panics (and refuses every
                            // link after) when a persistent session alone in a
                            // share group leaves with a QoS 1 delivery not
                            // acknowledged: shared subscriptions are for clean
                            // sessions only.
                            Ok(()) if !self.clean && f.path.starts_with("$share/") => {
                                tracing::warn!(reason = "acl", filter = %crate::printable(&f.path), "mqtt: subscription refused: shared subscriptions need a clean session");
                                codes.push(Some(if self.codec.is_v5() {
                                    SubscribeReasonCode::SharedSubscriptionsNotSupported
                                } else {
                                    SubscribeReasonCode::Failure
                                }));
                            }
                            Ok(()) => {
                                codes.push(None);
                                allowed.push(f);
                            }
                            Err(why) => {
                                tracing::warn!(reason = "acl", detail = %crate::printable(&why.to_string()), "mqtt: subscription refused");
                                codes.push(Some(refused));
                            }
                        }
                    }
                    if self.peer.identity.role == Role::Claim {
                        // Answered here: provisioning replies come from this
                        // session, never through the router.
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
                        if let Err(e) = self.encode(Packet::SubAck(ack, None)) {
                            end = Some(End::Protocol(e));
                            break;
                        }
                    } else if allowed.is_empty() {
                        let ack = SubAck {
                            pkid: sub.pkid,
                            return_codes: codes.into_iter().flatten().collect(),
                        };
                        if let Err(e) = self.encode(Packet::SubAck(ack, None)) {
                            end = Some(End::Protocol(e));
                            break;
                        }
                    } else {
                        if codes.iter().any(Option::is_some) {
                            self.pending_subacks.insert(sub.pkid, codes);
                        }
                        sub.filters = allowed;
                        forward.push(Packet::Subscribe(sub, props));
                    }
                }
                Packet::PingReq(_) => {
                    if let Err(e) = self.encode(Packet::PingResp(PingResp)) {
                        end = Some(End::Protocol(e));
                        break;
                    }
                }
                Packet::Disconnect(d, props) => {
                    forward.push(Packet::Disconnect(d, props));
                    end = Some(End::ClientDisconnect);
                    break;
                }
                p @ (Packet::Unsubscribe(..)
                | Packet::PubAck(..)
                | Packet::PubRec(..)
                | Packet::PubRel(..)
                | Packet::PubComp(..)) => forward.push(p),
                other => {
                    end = Some(End::Protocol(format!(
                        "unexpected packet from a client: {}",
                        packet_name(&other)
                    )));
                    break;
                }
            }
        }
        if let (Some(link_tx), Some(last)) = (link_tx, forward.pop()) {
            {
                let mut buffer = link_tx.buffer();
                buffer.extend(forward);
            }
            if link_tx.send(last).await.is_err() {
                return Some(End::TakenOver);
            }
        }
        if let Err(e) = self.flush().await {
            return Some(End::Closed(e));
        }
        end
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
            self.metrics.refused(Refusal::RateLimited);
            if warn {
                tracing::warn!(
                    reason = "rate_limited",
                    "mqtt: OCSP requests over this session's rate; dropped"
                );
            }
            return Ok(());
        }
        let (status, request) = (self.status.clone(), p.payload.clone());
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

    /// Acknowledges a PUBLISH we answer ourselves, if it was sent at QoS 1.
    fn ack(&mut self, p: &Publish) -> Result<(), String> {
        // QoS and packet id are private fields; rumqttd's own serialization
        // (not the wire format) starts with them: flags, then the packet id.
        let head = p.serialize();
        let qos = (head[0] >> 1) & 0b11;
        if qos == 0 {
            return Ok(());
        }
        let pkid = u16::from_be_bytes([head[1], head[2]]);
        self.encode(Packet::PubAck(
            PubAck {
                pkid,
                reason: PubAckReason::Success,
            },
            None,
        ))
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
                let auth = self.auth.clone();
                let lifetime = self.cert_lifetime;
                let done = tokio::task::spawn_blocking(move || {
                    let id = DeviceId::try_new(id)?;
                    auth.provision_with_claim(&claim, &id, &csr, lifetime)
                })
                .await;
                match done {
                    Ok(Ok((device, cert))) => Ok(serde_json::json!({
                        "id": device.id,
                        "serial": cert.serial,
                        "certificate_pem": cert.chain_pem,
                        "ca_pem": self.auth.ca.root_pem(),
                        "not_after": cert.not_after.unix_timestamp(),
                    })),
                    Ok(Err(e)) => {
                        let e = crate::api::ApiError::from(e);
                        Err((e.code(), e.message().to_owned()))
                    }
                    Err(_) => Err(("internal", "internal error; see the server log".into())),
                }
            }
        };
        let (reply, body) = match outcome {
            Ok(body) => {
                self.status.invalidate();
                self.metrics
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

    /// Writes what the router sent, and whatever else it has ready.
    async fn outgoing(&mut self, first: Notification, link_rx: &mut LinkRx) -> Option<End> {
        let mut next = Some(first);
        let mut unscheduled = false;
        let mut end = None;
        while let Some(n) = next.take() {
            if matches!(n, Notification::Unschedule) {
                unscheduled = true;
            } else {
                match Option::<Packet>::from(n) {
                    Some(Packet::SubAck(mut ack, props)) => {
                        if let Some(codes) = self.pending_subacks.remove(&ack.pkid) {
                            let mut granted = ack.return_codes.into_iter();
                            ack.return_codes = codes
                                .into_iter()
                                .map(|c| {
                                    c.or_else(|| granted.next())
                                        .unwrap_or(SubscribeReasonCode::Failure)
                                })
                                .collect();
                        }
                        if let Err(e) = self.encode(Packet::SubAck(ack, props)) {
                            return Some(End::Protocol(e));
                        }
                    }
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
        if let Err(e) = self.flush().await {
            return Some(End::Closed(e));
        }
        if unscheduled && end.is_none() && link_rx.wake().await.is_err() {
            return Some(End::TakenOver);
        }
        end
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
