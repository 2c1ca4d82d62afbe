//! A client's PUBLISH: checked, passed on (to the router, the hub or the
//! bus) and acknowledged in the order it came; and the client's
//! acknowledgements of what we sent.

use super::*;

impl Session {
    /// A PUBLISH from the client: answered here (claims' provisioning,
    /// OCSP), or checked against the ACL, passed on and acknowledged.
    pub(super) async fn client_publish(
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
    pub(super) fn refused_publish(&mut self, topic: &str, why: &str) {
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

    pub(super) fn over_quota(&mut self, why: &str) {
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
    pub(super) async fn publish_onward(
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
    pub(super) async fn command(
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
    pub(super) fn client_ack(&mut self, p: Packet, to_router: &mut Vec<Packet>) -> Result<(), End> {
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

    /// Acknowledges a PUBLISH we answer ourselves (QoS 1 or 2).
    pub(super) fn ack(&mut self, p: &Publish) -> Result<(), String> {
        let (qos, pkid) = qos_and_pkid(p);
        self.ack_in_order(qos, pkid, Ack::now(PubAckReason::Success, None))
    }

    /// Acknowledges the client's PUBLISH `pkid` now, or after those still
    /// waiting (MQTT 4.6: in the order they came), or once `ack` resolves.
    pub(super) fn ack_in_order(&mut self, qos: u8, pkid: u16, ack: Ack) -> Result<(), String> {
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
    pub(super) fn acknowledge(
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
}

/// A PUBLISH as a message kept for a device (queued or retained).
pub(super) fn message(
    p: &Publish,
    qos: u8,
    props: Option<&PublishProperties>,
    now: i64,
) -> Message {
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

pub(super) fn pubrec_reason(r: PubAckReason) -> PubRecReason {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_puback_reason_has_its_pubrec_twin() {
        for (ack, rec) in [
            (PubAckReason::Success, PubRecReason::Success),
            (PubAckReason::NotAuthorized, PubRecReason::NotAuthorized),
            (PubAckReason::QuotaExceeded, PubRecReason::QuotaExceeded),
            (
                PubAckReason::NoMatchingSubscribers,
                PubRecReason::NoMatchingSubscribers,
            ),
            (
                PubAckReason::ImplementationSpecificError,
                PubRecReason::ImplementationSpecificError,
            ),
            (
                PubAckReason::TopicNameInvalid,
                PubRecReason::TopicNameInvalid,
            ),
        ] {
            assert_eq!(pubrec_reason(ack), rec);
        }
    }

    #[test]
    fn a_stored_message_keeps_what_the_publisher_said_and_when_it_expires() {
        let p = Publish::new("devices/d/commands/x", "on", true);
        let props = PublishProperties {
            message_expiry_interval: Some(30),
            content_type: Some("text/plain".into()),
            correlation_data: Some(Bytes::from_static(b"c1")),
            user_properties: vec![("k".into(), "v".into())],
            ..Default::default()
        };
        let m = message(&p, 1, Some(&props), 1_000);
        assert_eq!(m.topic, "devices/d/commands/x");
        assert_eq!(m.payload, b"on");
        assert!(m.retain);
        assert_eq!(m.expires_at_ms, Some(31_000), "now + 30 s");
        assert_eq!(m.props.content_type.as_deref(), Some("text/plain"));
        assert_eq!(m.props.correlation_data.as_deref(), Some(&b"c1"[..]));
        assert_eq!(m.props.user_properties, vec![("k".into(), "v".into())]);
        // No properties (MQTT 3.1.1): no expiry.
        assert_eq!(message(&p, 1, None, 1_000).expires_at_ms, None);
    }
}
