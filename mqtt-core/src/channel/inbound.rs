//! A client's PUBLISH, decided: its topic (and alias), what the broker
//! answers itself (a claim's certificate request, OCSP), the ACL, QoS 2
//! resends, a device's budget of new topics; and the acknowledgements.

use bytes::Bytes;
use provisioning::Role;
use rumqttd::protocol::{
    DisconnectReasonCode, Packet, PubAck, PubAckProperties, PubAckReason, PubRec, PubRecReason,
    Publish, PublishProperties,
};

use super::{Action, Channel, End, Inbound, Limits, Now};
use crate::acl::{provision_request, topic_name_problem, TopicProblem};
use crate::outbox::qos_and_pkid;
use crate::stamp;
use crate::Refusal;

/// The MQTT 5 topic for OCSP requests; the answer goes to the request's
/// response topic. (On 3.1.1, `devices/<id>/ocsp/request` and `.../response`.)
pub const OCSP_TOPIC: &str = "$fleetgate/ocsp/request";

impl Channel {
    pub(super) fn client_publish(
        &mut self,
        mut p: Publish,
        mut props: Option<PublishProperties>,
        now: Now,
        limits: Limits,
        actions: &mut Vec<Action>,
    ) {
        if let Err(end) = self.resolve_topic(&mut p, props.as_mut()) {
            actions.push(Action::Close(end));
            return;
        }
        let topic = String::from_utf8_lossy(&p.topic).into_owned();
        if self.role == Role::Claim {
            // Claims only ever provision; nothing reaches the router.
            actions.push(match provision_request(&topic) {
                Some(req) => Action::Provision {
                    request: req.to_owned(),
                    publish: p,
                },
                None => {
                    let why = self.acl.can_publish(&topic).err();
                    Action::Close(End::Acl(why.map(|w| w.0).unwrap_or_default()))
                }
            });
            return;
        }
        match self.ocsp_reply_to(&topic, props.as_ref()) {
            None => {}
            Some(Ok((reply_topic, correlation))) => {
                actions.push(Action::Ocsp {
                    publish: p,
                    reply_topic,
                    correlation,
                });
                return;
            }
            Some(Err(why)) => {
                actions.push(Action::Close(End::Acl(why)));
                return;
            }
        }
        let (qos, pkid) = qos_and_pkid(&p);
        if let Err(why) = self.acl.can_publish(&topic) {
            if !self.is_v5() || qos == 0 {
                // Nothing would tell the client (MQTT 3.1.1 has no
                // negative acknowledgement; QoS 0 has none at all): the
                // connection ends, DISCONNECT 0x87 on MQTT 5 (MQTT-3.3.5-2).
                actions.push(Action::Close(End::Acl(why.to_string())));
                return;
            }
            // MQTT 5, QoS 1 and 2: refused with 0x87 Not authorized,
            // dropped, and the connection goes on (3.3.4, 4.12).
            let why = why.to_string();
            actions.push(Action::Refused(Refusal::Acl));
            if self.log_refusal(now) {
                tracing::warn!(reason = "acl", topic = %crate::printable(&topic), detail = %crate::printable(&why), "mqtt: publish refused (0x87)");
            }
            actions.push(Action::Ack {
                qos,
                pkid,
                reason: PubAckReason::NotAuthorized,
                why: Some(why),
            });
            return;
        }
        if qos == 2 && !self.inbound_qos2.insert(pkid) {
            // A resend before PUBREL: passed on once already.
            actions.push(Action::Ack {
                qos,
                pkid,
                reason: PubAckReason::Success,
                why: None,
            });
            return;
        }
        if let Err(why) = self.admit_topic("", &p.topic, now, limits, actions) {
            actions.push(Action::Ack {
                qos,
                pkid,
                reason: PubAckReason::QuotaExceeded,
                why: Some(why),
            });
            return;
        }
        actions.push(Action::Publish(Inbound {
            publish: p,
            // Anything a client sent under the reserved prefix removed.
            props: stamp::unreserved(props),
            topic,
            qos,
            pkid,
        }));
    }

    /// A PUBLISH's topic, checked (MQTT 1.5.4, 4.7.1) and, on MQTT 5, set
    /// from or recorded as its topic alias (3.3.2.3.4). The alias is taken
    /// out of the properties: it is this connection's business only.
    pub(super) fn resolve_topic(
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
        let max = self.topic_alias_max;
        if alias == 0 || alias > max {
            return Err(End::Violation(
                DisconnectReasonCode::TopicAliasInvalid,
                format!("topic alias {alias} is outside 1..={max}, the Topic Alias Maximum this server advertised"),
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

    /// Where the answer to an OCSP request published on `topic` goes, if
    /// `topic` is a status request topic.
    pub(super) fn ocsp_reply_to(
        &self,
        topic: &str,
        props: Option<&PublishProperties>,
    ) -> Option<Result<(String, Option<Bytes>), String>> {
        let correlation = || props.and_then(|p| p.correlation_data.clone());
        if topic == OCSP_TOPIC {
            return Some(match props.and_then(|p| p.response_topic.clone()) {
                Some(t) if !t.is_empty() && !t.contains(['+', '#']) => Ok((t, correlation())),
                _ => Err(format!("{OCSP_TOPIC} needs an MQTT 5 response topic")),
            });
        }
        // Every PUBLISH asks this: nothing is built unless it is one.
        let own = topic
            .strip_prefix("devices/")
            .and_then(|t| t.strip_prefix(self.id.as_str()))
            .and_then(|t| t.strip_prefix("/ocsp/request"));
        (own == Some("")).then(|| Ok((format!("devices/{}/ocsp/response", self.id), correlation())))
    }

    /// PUBACK (QoS 1) or PUBREC (QoS 2) for the client's PUBLISH `pkid`,
    /// with `reason` (and, on MQTT 5, `why` as its reason string, if the
    /// client takes them). A QoS 2 flow then awaits PUBREL, unless the
    /// reason refused it.
    pub fn acknowledge(
        &mut self,
        qos: u8,
        pkid: u16,
        reason: PubAckReason,
        why: Option<String>,
    ) -> Result<(), End> {
        match qos {
            1 => {
                let props = why
                    .filter(|_| self.is_v5() && self.terms.problem_info)
                    .map(|r| PubAckProperties {
                        reason_string: Some(r),
                        user_properties: Vec::new(),
                    });
                self.send(Packet::PubAck(PubAck { pkid, reason }, props))
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
                self.send(Packet::PubRec(PubRec { pkid, reason }, None))
            }
            _ => Ok(()),
        }
    }
}

pub fn pubrec_reason(r: PubAckReason) -> PubRecReason {
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
