//! SUBSCRIBE and UNSUBSCRIBE: the ACL and quotas, a device's mailbox in
//! the hub (and its stored session), a service's router subscriptions.

use super::*;
use crate::mqtt::channel::subscribe::FilterRefused;

impl Session {
    /// A service's (or claim's) SUBSCRIBE: the ACL and the cap here, the
    /// rest to its router link.
    pub(super) fn subscribe(
        &mut self,
        mut sub: rumqttd::protocol::Subscribe,
        props: Option<rumqttd::protocol::SubscribeProperties>,
        forward: &mut Vec<Packet>,
    ) -> Result<(), End> {
        let id = props.as_ref().and_then(|p| p.id);
        let checked = {
            let subs = lock(&self.service_subs);
            self.ch.check_filters(
                &sub.filters,
                subs.len(),
                |f| subs.contains_key(f),
                self.limits(),
            )
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
                qos: (f.qos as u8).min(2),
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

    /// A device's SUBSCRIBE, kept in its mailbox (and, for a persistent
    /// session, durably before the SUBACK); then the retained messages on
    /// its topics that match.
    pub(super) async fn device_subscribe(
        &mut self,
        sub: rumqttd::protocol::Subscribe,
        props: Option<rumqttd::protocol::SubscribeProperties>,
    ) -> Result<(), End> {
        let Some(mailbox) = self.device.as_ref().map(|side| side.mailbox.clone()) else {
            return Ok(());
        };
        let checked = self.ch.check_filters(
            &sub.filters,
            mailbox.subscriptions(),
            |f| mailbox.holds(f),
            self.limits(),
        );
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
        let now = self.now().wall_ms;
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
            self.ch
                .outbox
                .push(outgoing(&m, None, m.qos.min(qos), ids, true, now, false));
        }
        Ok(())
    }

    /// The refusals among `checked`, counted; the SUBACK's codes and why.
    pub(super) fn refusals(
        &mut self,
        checked: Vec<Option<FilterRefused>>,
    ) -> (Vec<Option<SubscribeReasonCode>>, Option<String>) {
        let mut counted = Vec::new();
        let r = self.ch.refusals(checked, self.now(), &mut counted);
        self.count(&counted);
        r
    }

    /// A service's UNSUBSCRIBE: forgotten here, passed to the router (a
    /// group across nodes by its router filter).
    pub(super) fn service_unsubscribe(
        &mut self,
        mut unsub: rumqttd::protocol::Unsubscribe,
        props: Option<rumqttd::protocol::UnsubscribeProperties>,
        forward: &mut Vec<Packet>,
    ) {
        for f in &mut unsub.filters {
            lock(&self.service_subs).remove(f);
            if self.groups.remove(f).is_some() {
                if let Some((group, inner)) = share::split(f) {
                    *f = share::router_filter(group, inner);
                }
            }
        }
        forward.push(Packet::Unsubscribe(unsub, props));
    }

    /// A device's UNSUBSCRIBE.
    pub(super) async fn device_unsubscribe(
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
    pub(super) async fn save_session(&self, mailbox: &Arc<Mailbox>) -> Result<(), End> {
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
    pub(super) async fn close_device(&mut self) {
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
}

/// Takes a message for a device into its outbox, at min(published QoS,
/// granted QoS), if a subscription still matches it and it has not
/// expired; a stored one that will not be delivered leaves the queue.
pub(super) fn take_into(
    shared: &Shared,
    peer: &Peer,
    mailbox: &Mailbox,
    ch: &mut Channel,
    seq: Option<u64>,
    m: Arc<Message>,
) {
    let now = shared.clock.now().wall_ms;
    let granted = mailbox.granted(&m.topic);
    let expired = m.expires_at_ms.is_some_and(|t| t <= now);
    let Some((granted, ids)) = granted.filter(|_| !expired) else {
        if let Some(seq) = seq {
            shared.hub.keeper().delivered(&peer.identity.id, seq);
        }
        return;
    };
    let retain = m.retain && mailbox.retain_as_published(&m.topic);
    ch.outbox.push(outgoing(
        &m,
        seq,
        m.qos.min(granted),
        ids,
        retain,
        now,
        false,
    ));
}

/// The next message for a device session; never, for other sessions.
pub(super) async fn next_delivery(side: Option<&mut DeviceSide>) -> Option<Delivery> {
    match side {
        Some(side) => side.rx.recv().await,
        None => std::future::pending().await,
    }
}
