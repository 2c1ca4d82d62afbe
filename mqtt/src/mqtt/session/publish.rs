//! A client's PUBLISH: checked, passed on (to the router, the hub or the
//! bus) and acknowledged in the order it came; and the client's
//! acknowledgements of what we sent.

use super::*;

/// What is left of a client's PUBLISH (or any action of the core's) once
/// [`Session::publish_at_once`] has done what it could without waiting.
pub(super) enum AtOnce<T = Inbound> {
    /// Nothing: passed on and acknowledged.
    Done,
    /// All of it, on the way that may wait ([`Session::client_publish`]).
    Wait(Box<T>),
    /// Passed on to this node's live services; the router's queue was
    /// full: the router's packet, then the acknowledgement (QoS, packet
    /// id).
    Router(Box<Packet>, u8, u16),
}

impl Session {
    /// A client's PUBLISH the core let through: heard by the device's own
    /// subscriptions (unless No Local), passed on, acknowledged in order.
    pub(super) async fn client_publish(&mut self, i: Inbound) -> Result<(), End> {
        self.hear_own_subscriptions(&i);
        let ack = self.publish_onward(i.publish, i.props).await?;
        self.ack_in_order(i.qos, i.pkid, ack)
    }

    /// [`Session::client_publish`] without waiting, where nothing on the
    /// PUBLISH's way can wait: not a device's retained message (kept on
    /// the blocking pool), no bus, not a command; the router, if it wants
    /// the message, has room for it now. Else the PUBLISH is given back.
    /// A fleet's telemetry goes this way, with no future made for it
    /// (the one that may wait is 4 KiB, allocated and copied each time).
    pub(super) fn publish_at_once(&mut self, i: Inbound) -> Result<AtOnce, End> {
        let role = self.peer.identity.role;
        if self.shared.cfg.bus.is_some()
            || (i.publish.retain && role == Role::Device)
            || (role == Role::Service && command_target(&i.topic).is_some())
        {
            return Ok(AtOnce::Wait(Box::new(i)));
        }
        self.hear_own_subscriptions(&i);
        let (qos, pkid) = (i.qos, i.pkid);
        let onward = self.marked(&i.publish, stamp::unreserved(i.props), qos);
        if let Some(packet) = fanout::here(&self.shared, onward) {
            let key = self.peer.identity.id.as_str();
            let link = fanout::router_link(&self.shared, key, self.router.as_ref());
            match link.try_send(packet) {
                Ok(()) => {}
                Err(TrySend::Full(packet)) => return Ok(AtOnce::Router(packet, qos, pkid)),
                Err(TrySend::Closed) => return Err(End::RouterDisconnect),
            }
        }
        self.ack_in_order(qos, pkid, Ack::now(PubAckReason::Success, None))?;
        Ok(AtOnce::Done)
    }

    /// The rest of [`AtOnce::Router`]: the router takes `packet` when it
    /// has room, then the PUBLISH is acknowledged.
    pub(super) async fn router_then_ack(
        &mut self,
        packet: Box<Packet>,
        qos: u8,
        pkid: u16,
    ) -> Result<(), End> {
        let key = self.peer.identity.id.as_str();
        fanout::to_router(&self.shared, key, self.router.as_ref(), *packet)
            .await
            .map_err(|_| End::RouterDisconnect)?;
        self.ack_in_order(qos, pkid, Ack::now(PubAckReason::Success, None))
    }

    /// A device hears its own PUBLISH on its matching subscriptions, but
    /// for those with No Local.
    fn hear_own_subscriptions(&mut self, i: &Inbound) {
        let Some(side) = self.device.as_mut() else {
            return;
        };
        let (p, topic, qos) = (&i.publish, i.topic.as_str(), i.qos);
        let matched = match &side.echo {
            Some((last, matched)) if last == topic => matched.clone(),
            _ => {
                let matched = side.mailbox.granted_to(topic, true);
                side.echo = Some((topic.to_owned(), matched.clone()));
                matched
            }
        };
        if let Some((granted, ids)) = matched {
            let retain = p.retain && side.mailbox.retain_as_published(topic);
            let m = message(p, qos, i.props.as_ref(), self.now().wall_ms);
            self.ch.outbox.push(outgoing(
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

    /// A client's PUBLISH as it enters the message plane: copied out of
    /// the read buffer (a message in the router's log would otherwise keep
    /// its whole read buffer alive), not retained in the router (fleetgate
    /// keeps retained messages itself, durably, with retain handling; the
    /// mark says it was), marked with the sender's identity.
    fn marked(&self, p: &Publish, props: Option<PublishProperties>, qos: u8) -> Marked {
        Marked::new(
            Publish::new(
                Bytes::copy_from_slice(&p.topic),
                Bytes::copy_from_slice(&p.payload),
                false,
            ),
            stamp::mark(props, qos, p.retain, &self.stamp),
            self.conn(),
        )
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
            let mut m = message(&p, qos, props.as_ref(), self.now().wall_ms);
            stamp::mark_kept(&mut m.props.user_properties, qos, &self.stamp);
            let (hub, id) = (self.shared.hub.clone(), self.peer.identity.id.clone());
            let kept = tokio::task::spawn_blocking(move || hub.retain_own(&id, &m, qos > 0)).await;
            match kept {
                Ok(Ok(())) => {}
                Ok(Err(provisioning::Error::QuotaExceeded { reason })) => {
                    let mut counted = Vec::new();
                    self.ch.over_quota(&reason, self.now(), &mut counted);
                    self.count(&counted);
                    return Ok(Ack::Now((PubAckReason::QuotaExceeded, Some(reason))));
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "mqtt: keeping a retained message failed; not acknowledged");
                    if qos > 0 && !self.ch.is_v5() {
                        return Err(End::Protocol(format!(
                            "a retained message was not stored ({e}); not acknowledged"
                        )));
                    }
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
                    Outcome::NoSubscribers if self.ch.is_v5() => {
                        (PubAckReason::NoMatchingSubscribers, None)
                    }
                    Outcome::NoSubscribers => (PubAckReason::Success, None),
                    Outcome::Full(why) => {
                        tracing::warn!(reason = "quota_exceeded", device.target = %target, detail = %crate::printable(&why), "mqtt: command refused");
                        if self.ch.is_v5() {
                            (PubAckReason::QuotaExceeded, Some(why))
                        } else {
                            (PubAckReason::Success, None)
                        }
                    }
                    Outcome::Refused(why) => {
                        tracing::warn!(reason = "refused", device.target = %target, detail = %crate::printable(&why), "mqtt: command refused");
                        (PubAckReason::NotAuthorized, Some(why))
                    }
                    // Durable before acknowledged: a 3.1.1 service has no
                    // negative PUBACK, so its connection ends with none,
                    // and its client sends the command again. (It was
                    // acknowledged, and lost: the fault harness, issue 30.)
                    Outcome::NotStored(why) => {
                        tracing::error!(reason = "storage_unavailable", device.target = %target, detail = %crate::printable(&why), "mqtt: a command was not stored; not acknowledged");
                        if qos > 0 && !self.ch.is_v5() {
                            return Err(End::Protocol(format!(
                                "a command for {target} was not stored ({why}); not acknowledged"
                            )));
                        }
                        (
                            PubAckReason::ImplementationSpecificError,
                            Some("the command was not stored; send it again".into()),
                        )
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
            .map(|_| message(&p, qos, props.as_ref(), self.now().wall_ms));
        // Into the router at QoS 0: acknowledged here, and the router's
        // delivery QoS is the subscription's.
        let onward = self.marked(&p, props, qos);
        let key = self.peer.identity.id.as_str();
        let sent = fanout::onward(&self.shared, key, self.router.as_ref(), onward).await;
        if sent.is_err() {
            return Err(End::RouterDisconnect);
        }
        if let (Some(bus), Some(m)) = (&self.shared.cfg.bus, for_bus) {
            let id = &self.peer.identity;
            let v5 = self.ch.is_v5();
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
        let m = Arc::new(message(p, qos, props, self.now().wall_ms));
        let hub = &self.shared.hub;
        if let Some(outcome) = hub.publish_now(target, &m) {
            return outcome;
        }
        let (hub, target) = (hub.clone(), target.clone());
        match tokio::task::spawn_blocking(move || hub.publish(&target, m)).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(e)) => Outcome::NotStored(e.to_string()),
            Err(e) => Outcome::NotStored(format!("the command task failed: {e}")),
        }
    }

    /// Acknowledges a PUBLISH we answer ourselves (QoS 1 or 2).
    pub(super) fn ack(&mut self, p: &Publish) -> Result<(), String> {
        let (qos, pkid) = qos_and_pkid(p);
        self.ack_in_order(qos, pkid, Ack::now(PubAckReason::Success, None))
            .map_err(|e| format!("{e:?}"))
    }

    /// Acknowledges the client's PUBLISH `pkid` now, or after those still
    /// waiting (MQTT 4.6: in the order they came), or once `ack` resolves.
    pub(super) fn ack_in_order(&mut self, qos: u8, pkid: u16, ack: Ack) -> Result<(), End> {
        match ack {
            Ack::Now((reason, why)) if pending(&mut self.pending_acks).is_empty() => {
                self.ch.acknowledge(qos, pkid, reason, why)
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

#[cfg(test)]
mod tests {
    use super::*;

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
