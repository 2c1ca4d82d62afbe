//! The connection core: the MQTT decisions of one connection, sans-IO.
//!
//! [`Channel`] holds a connection's protocol state (codec, topic aliases,
//! the client's QoS 2 flows, the outbox and its window, keep-alive, the
//! certificate's end) and is driven by the session ([`super::session`]),
//! which does all the IO. It takes a packet, or the time, and says what to
//! do: the packets it answers itself it writes into its output buffer
//! ([`Channel::take_output`]), everything else comes back as an
//! [`Action`] (pass this PUBLISH on, acknowledge that one, subscribe,
//! close with this reason). Like rustls' unbuffered connection and EMQX's
//! `emqx_channel`: no sockets, no tokio, no registry, no clock of its own
//! ([`clock::Now`] comes in with each call), so every decision here is
//! unit-tested from packet sequences (`tests.rs`).
//!
//! What it may import is checked by `tests/tests/invariants.rs`.

pub mod clock;
pub mod connect;
pub mod end;
mod inbound;
pub mod overlap;
pub mod subscribe;
#[cfg(test)]
mod tests;
pub mod will;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use provisioning::{DeviceId, Identity, Role};
use rumqttd::protocol::{
    DisconnectProperties, DisconnectReasonCode, Packet, PingResp, PubAckReason, PubComp,
    PubCompReason, PubRel, PubRelReason, Publish, PublishProperties, Subscribe,
    SubscribeProperties, Unsubscribe, UnsubscribeProperties,
};

use crate::acl::Acl;
use crate::codec::Codec;
use crate::kept::Budget;
use crate::outbox::{qos_and_pkid, Outbox};
use crate::Refusal;
pub use clock::{Clock, Now, SystemClock};
pub use connect::Terms;
pub use end::End;
pub use inbound::OCSP_TOPIC;

/// The limits a node's configuration sets, as they stand when a packet is
/// decided (SIGHUP may change them between packets).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Subscriptions per session; 0: no limit.
    pub max_subscriptions: usize,
    /// New topics per device per minute; 0: no limit.
    pub new_topics_per_minute: u32,
}

/// A PUBLISH from the client that passed every check here, for the driver
/// to pass on (to the hub, the router, the bus) and then acknowledge with
/// [`Channel::acknowledge`], in order.
#[derive(Debug, PartialEq, Eq)]
pub struct Inbound {
    pub publish: Publish,
    /// Its properties, the topic alias taken out and anything under the
    /// reserved prefix removed.
    pub props: Option<PublishProperties>,
    pub topic: String,
    pub qos: u8,
    pub pkid: u16,
}

/// What the driver is to do after a packet.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Pass a client's PUBLISH on, then acknowledge it.
    Publish(Inbound),
    /// Acknowledge the client's PUBLISH (QoS 1, 2) with this reason, after
    /// any still waiting.
    Ack {
        qos: u8,
        pkid: u16,
        reason: PubAckReason,
        why: Option<String>,
    },
    /// A claim asks for a device certificate (`request`: the device id in
    /// the topic).
    Provision {
        publish: Publish,
        request: String,
    },
    /// An OCSP request to answer on `reply_topic`.
    Ocsp {
        publish: Publish,
        reply_topic: String,
        correlation: Option<Bytes>,
    },
    Subscribe(Subscribe, Option<SubscribeProperties>),
    Unsubscribe(Unsubscribe, Option<UnsubscribeProperties>),
    /// The client is done with what this token marks (a stored command,
    /// or a delivery owed to the router).
    Done(u64),
    /// Passed to the router as it is (a service's DISCONNECT).
    Forward(Packet),
    /// Count a refusal the connection goes on after.
    Refused(Refusal),
    /// The connection ends.
    Close(End),
}

/// One connection's protocol state.
#[derive(Debug)]
pub struct Channel {
    codec: Codec,
    /// What to write to the client.
    out: BytesMut,
    /// This server's Maximum Packet Size.
    max_packet: usize,
    id: DeviceId,
    role: Role,
    acl: Acl,
    terms: Terms,
    /// MQTT 5 topic aliases the client set (alias n at n - 1).
    aliases: Vec<Bytes>,
    topic_alias_max: u16,
    /// Packet ids of the client's QoS 2 PUBLISHes awaiting PUBREL: a
    /// repeated one is acknowledged, not passed on again.
    inbound_qos2: HashSet<u16>,
    /// What we send the client: packet ids, window, acknowledgements.
    pub outbox: Outbox,
    /// A device's budget of new topics (its own across its connections).
    topics: Option<Budget>,
    /// When a refusal the connection goes on after was last logged: at
    /// most one a second.
    refusal_logged: Option<Instant>,
    /// Nothing heard for this long ends the connection (1.5 keep-alives).
    idle: Option<Duration>,
    last_heard: Instant,
    /// The client certificate's end, wall time (ms).
    not_after_ms: i64,
}

/// A buffer past this size is dropped once empty, not kept for the next
/// message.
const KEEP_BUFFER: usize = 8 * 1024;

impl Channel {
    /// A channel for a client `identity` names whose certificate ends at
    /// `not_after_ms`, speaking `codec`; [`Self::accept`] sets its terms.
    pub fn new(
        codec: Codec,
        identity: &Identity,
        max_packet: usize,
        topic_alias_max: u16,
        not_after_ms: i64,
        now: Now,
    ) -> Self {
        let terms = Terms::before_connect();
        let topics = None;
        Channel {
            codec,
            out: BytesMut::new(),
            max_packet,
            id: identity.id.clone(),
            role: identity.role,
            acl: Acl::new(identity),
            aliases: Vec::new(),
            topic_alias_max,
            inbound_qos2: HashSet::new(),
            outbox: Outbox::new(terms.receive_maximum),
            topics,
            refusal_logged: None,
            // MQTT 3.1.2.10: one and a half keep-alive periods.
            idle: (terms.keep_alive > 0)
                .then(|| Duration::from_millis(u64::from(terms.keep_alive) * 1500)),
            last_heard: now.mono,
            not_after_ms,
            terms,
        }
    }

    /// The CONNECT was accepted on `terms`, at `now`: its window, its
    /// keep-alive and (a device's) budget of new topics hold from here.
    pub fn accept(&mut self, terms: Terms, topics: Option<Budget>, now: Now) {
        self.outbox = Outbox::new(terms.receive_maximum);
        // MQTT 3.1.2.10: one and a half keep-alive periods.
        self.idle = (terms.keep_alive > 0)
            .then(|| Duration::from_millis(u64::from(terms.keep_alive) * 1500));
        self.last_heard = now.mono;
        self.topics = topics;
        self.terms = terms;
    }

    /// MQTT 5 3.14.2.2.2: a DISCONNECT's Session Expiry Interval replaces
    /// the CONNECT's (the session then lives that long, or ends now if it
    /// is 0); a session that was to end with its connection may not be
    /// kept this way (a Protocol Error, MQTT-3.14.2-2).
    fn expiry_at_disconnect(&mut self, props: Option<&DisconnectProperties>) -> Result<(), End> {
        let Some(asked) = props.and_then(|p| p.session_expiry_interval) else {
            return Ok(());
        };
        if self.terms.expiry.is_none() && asked > 0 {
            return Err(End::Violation(
                DisconnectReasonCode::ProtocolError,
                format!(
                    "a DISCONNECT set a session expiry of {asked} s on a session \
                     its CONNECT said ends with the connection"
                ),
            ));
        }
        self.terms.asked_expiry = (asked > 0).then_some(asked);
        self.terms.expiry = self
            .terms
            .asked_expiry
            .map(|e| e.min(connect::MAX_SESSION_EXPIRY));
        Ok(())
    }

    /// How long the session outlives this connection, as it stands now
    /// (`None`: it ends with it): the CONNECT's, or what its DISCONNECT
    /// said instead.
    pub fn session_expiry(&self) -> Option<u32> {
        self.terms.expiry
    }

    pub fn is_v5(&self) -> bool {
        self.codec.is_v5()
    }

    pub fn terms(&self) -> &Terms {
        &self.terms
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn acl(&self) -> &Acl {
        &self.acl
    }

    /// The client takes reason strings.
    pub fn problem_info(&self) -> bool {
        self.terms.problem_info
    }

    /// Writes a packet for the client.
    pub fn send(&mut self, p: Packet) -> Result<(), End> {
        self.codec
            .write(p, &mut self.out)
            .map_err(|e| End::Protocol(format!("encoding: {e}")))
    }

    /// What there is to write to the client, if anything.
    pub fn pending_output(&self) -> &[u8] {
        &self.out
    }

    /// The driver wrote [`Self::pending_output`].
    pub fn output_written(&mut self) {
        self.out.clear();
        if self.out.capacity() > KEEP_BUFFER {
            // A large message went out: give its room back.
            self.out = BytesMut::new();
        }
    }

    /// Takes what is to be written (tests, and the last words of a
    /// connection).
    pub fn take_output(&mut self) -> BytesMut {
        std::mem::take(&mut self.out)
    }

    /// Bytes came from the client: the keep-alive starts again.
    pub fn heard(&mut self, now: Now) {
        self.last_heard = now.mono;
    }

    /// When [`Self::tick`] has something to say, if ever: the keep-alive's
    /// end or the certificate's, whichever is first.
    pub fn wake_at(&self, now: Now) -> Instant {
        let expiry = now.mono_at(self.not_after_ms);
        match self.idle {
            Some(idle) => expiry.min(self.last_heard + idle),
            None => expiry,
        }
    }

    /// Whether the connection ends at `now`: its certificate has expired,
    /// or nothing came within 1.5 keep-alive periods (MQTT 3.1.2.10).
    pub fn tick(&self, now: Now) -> Option<End> {
        if now.wall_ms >= self.not_after_ms {
            return Some(End::CertificateExpired);
        }
        match self.idle {
            Some(idle) if now.mono >= self.last_heard + idle => Some(End::KeepAlive),
            _ => None,
        }
    }

    /// The next whole packet in `buf`: `Ok(None)` if more bytes are
    /// needed; the end it makes if it is too large, malformed or one only
    /// a server sends.
    pub fn read(&mut self, buf: &mut BytesMut) -> Result<Option<Packet>, End> {
        match self.codec.read(buf, self.max_packet) {
            Ok(p) => Ok(p),
            Err(rumqttd::protocol::Error::PayloadSizeLimitExceeded(n)) => Err(End::Violation(
                DisconnectReasonCode::PacketTooLarge,
                format!(
                    "a packet of {n} bytes is over this server's Maximum Packet Size of {} bytes",
                    self.max_packet
                ),
            )),
            // A packet type only a server sends (MQTT 5 4.13).
            Err(rumqttd::protocol::Error::InvalidPacketType(t)) => Err(End::Protocol(format!(
                "packet type {t} is not one a client sends"
            ))),
            Err(e) => Err(End::Violation(
                DisconnectReasonCode::MalformedPacket,
                format!("malformed packet: {e}"),
            )),
        }
    }

    /// Decides one packet from the client; what the driver must do is
    /// pushed on `actions`. After a [`Action::Close`], nothing more is read.
    pub fn handle_in(&mut self, p: Packet, now: Now, limits: Limits, actions: &mut Vec<Action>) {
        let done = match p {
            Packet::Publish(p, props) => {
                self.client_publish(p, props, now, limits, actions);
                Ok(())
            }
            Packet::Subscribe(s, props) => {
                actions.push(Action::Subscribe(s, props));
                Ok(())
            }
            Packet::Unsubscribe(u, props) => {
                actions.push(Action::Unsubscribe(u, props));
                Ok(())
            }
            Packet::PingReq(_) => self.send(Packet::PingResp(PingResp)),
            Packet::Disconnect(d, props) => {
                match self.expiry_at_disconnect(props.as_ref()) {
                    Err(end) => Err(end),
                    Ok(()) => {
                        // MQTT 5 3.14.4: no will, unless 0x04 asked for it.
                        let will = d.reason_code == DisconnectReasonCode::DisconnectWithWillMessage;
                        actions.push(Action::Forward(Packet::Disconnect(d, props)));
                        Err(End::ClientDisconnect { will })
                    }
                }
            }
            Packet::PubRel(rel, _) => {
                // The end of one of the client's QoS 2 PUBLISHes.
                let reason = if self.inbound_qos2.remove(&rel.pkid) {
                    PubCompReason::Success
                } else {
                    PubCompReason::PacketIdentifierNotFound
                };
                self.send(Packet::PubComp(
                    PubComp {
                        pkid: rel.pkid,
                        reason,
                    },
                    None,
                ))
            }
            // MQTT 4.4: an acknowledgement for nothing in flight is a
            // protocol error.
            Packet::PubAck(a, _) => match self.outbox.puback(a.pkid) {
                Ok(t) => {
                    actions.extend(t.map(Action::Done));
                    Ok(())
                }
                Err(e) => Err(End::Protocol(e.0)),
            },
            Packet::PubRec(r, _) => match self.outbox.pubrec(r.pkid) {
                Ok(()) => self.send(Packet::PubRel(
                    PubRel {
                        pkid: r.pkid,
                        reason: PubRelReason::Success,
                    },
                    None,
                )),
                Err(e) => Err(End::Protocol(e.0)),
            },
            Packet::PubComp(c, _) => match self.outbox.pubcomp(c.pkid) {
                Ok(t) => {
                    actions.extend(t.map(Action::Done));
                    Ok(())
                }
                Err(e) => Err(End::Protocol(e.0)),
            },
            other => Err(End::Protocol(format!(
                "unexpected packet from a client: {}",
                packet_name(&other)
            ))),
        };
        if let Err(end) = done {
            actions.push(Action::Close(end));
        }
    }

    /// Writes what the outbox lets through. A message over the client's
    /// Maximum Packet Size is not sent and is done with as if it had been
    /// (MQTT 5 3.1.2.11.4); the messages after it go on. Tokens of what
    /// is done with are pushed on `done`.
    pub fn write_outbox(&mut self, done: &mut Vec<u64>) -> Result<(), End> {
        let limit = self.terms.client_max_packet;
        while let Some((p, props, token)) = self.outbox.next_publish() {
            let before = self.out.len();
            let (qos, pkid) = qos_and_pkid(&p);
            self.send(Packet::Publish(p, props))?;
            let size = self.out.len() - before;
            let mut token = token;
            if size > limit {
                self.out.truncate(before);
                if qos > 0 {
                    token = self.outbox.discard(pkid);
                }
                tracing::info!(
                    size,
                    limit,
                    "mqtt: a message over the client's Maximum Packet Size dropped"
                );
            }
            done.extend(token);
        }
        Ok(())
    }

    /// Logs a refusal the connection goes on after, at most once a second.
    fn log_refusal(&mut self, now: Now) -> bool {
        let due = self
            .refusal_logged
            .is_none_or(|t| now.mono.duration_since(t) >= Duration::from_secs(1));
        if due {
            self.refusal_logged = Some(now.mono);
        }
        due
    }

    /// Whether a device's message on `topic` fits its budget of new
    /// topics; if not, the refusal is counted and (at most once a second)
    /// logged, and the reason returned. `what` names a message that is
    /// not a PUBLISH (`"last will: "`).
    pub fn admit_topic(
        &mut self,
        what: &str,
        topic: &[u8],
        now: Now,
        limits: Limits,
        actions: &mut Vec<Action>,
    ) -> Result<(), String> {
        let Some(budget) = &self.topics else {
            return Ok(());
        };
        if crate::kept::lock(budget).admit_at(topic, now.mono, limits.new_topics_per_minute) {
            return Ok(());
        }
        let why = format!(
            "{what}more than {} new topics a minute from this device",
            limits.new_topics_per_minute
        );
        self.over_quota(&why, now, actions);
        Err(why)
    }

    /// Counts (and at most once a second logs) a refusal over a quota.
    pub fn over_quota(&mut self, why: &str, now: Now, actions: &mut Vec<Action>) {
        actions.push(Action::Refused(Refusal::Quota));
        if self.log_refusal(now) {
            tracing::warn!(reason = "quota_exceeded", detail = %crate::printable(why), "mqtt: refused");
        }
    }
}

pub fn packet_name(p: &Packet) -> &'static str {
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
