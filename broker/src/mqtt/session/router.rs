//! A service's side: deliveries from rumqttd's router (with their
//! subscription identifiers and retain flags), retained messages for new
//! subscriptions, and the router session's end.

use super::*;
use crate::mqtt::channel::overlap;

impl Session {
    /// Ends a service's router session, if it is still ours to end.
    pub(super) async fn end_router_session(&mut self, end: &End) {
        let Some(router) = self.router.take() else {
            return;
        };
        if end.router_session_live() {
            let _ = router
                .send(Packet::Disconnect(normal_disconnect(), None))
                .await;
        }
    }

    /// Takes what the router sent, and whatever else it has ready: SUBACKs
    /// (merged with our refusals), deliveries (into the outbox, at
    /// min(published QoS, granted QoS)), its PUBRELs (answered here).
    pub(super) async fn outgoing(
        &mut self,
        first: Notification,
        link_rx: &mut LinkRx,
    ) -> Option<End> {
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
                        let u = stamp::unmark(props, &topic, self.ch.is_v5());
                        let mut props = u.props;
                        let (matching, rap) = self.matching_subs(&topic);
                        // One copy per matching filter comes from the
                        // router, each with its own subscription's id.
                        let key = overlap::key(&topic, &p.payload);
                        let ids = self.overlaps.ids(key, &matching, qos);
                        if self.ch.is_v5() && !ids.is_empty() {
                            props
                                .get_or_insert_with(Default::default)
                                .subscription_identifiers = ids;
                        }
                        let token = (qos > 0).then(|| self.acks.owe(pkid, qos));
                        self.ch.outbox.push(Outgoing {
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

    /// The retained messages matching a service's new subscriptions, into
    /// its outbox: at min(published, granted) QoS, flagged retained, with
    /// the sender's identity and the subscriptions' identifiers.
    pub(super) async fn service_retained(&mut self, wanted: Vec<(String, u8)>) {
        let filters: Vec<String> = wanted.iter().map(|(f, _)| f.clone()).collect();
        let hub = self.shared.hub.clone();
        let now = self.now().wall_ms;
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
        let v5 = self.ch.is_v5();
        for m in messages {
            let Some(granted) = wanted
                .iter()
                .filter(|(f, _)| topic_matches(f, &m.topic))
                .map(|(_, q)| *q)
                .max()
            else {
                continue;
            };
            let (matching, _) = self.matching_subs(m.topic.as_bytes());
            let ids = if v5 {
                matching.iter().filter_map(|m| m.id).collect()
            } else {
                Vec::new()
            };
            self.ch
                .outbox
                .push(outgoing(&m, None, m.qos.min(granted), ids, true, now, v5));
        }
    }

    /// What a service's subscriptions that match `topic` ask for (the
    /// router carries neither): their identifiers and granted QoS (MQTT 5
    /// 3.3.4), and whether any wants Retain As Published.
    pub(super) fn matching_subs(&self, topic: &[u8]) -> (Vec<overlap::Match>, bool) {
        let subs = lock(&self.service_subs);
        if !subs.values().any(|s| s.id.is_some() || s.rap) {
            return (Vec::new(), false);
        }
        let topic = String::from_utf8_lossy(topic);
        let mut matching = Vec::new();
        let mut rap = false;
        for (filter, sub) in subs.iter() {
            if topic_matches(share_inner(filter), &topic) {
                matching.push(overlap::Match {
                    id: sub.id,
                    qos: sub.qos,
                });
                rap |= sub.rap;
            }
        }
        (matching, rap)
    }
}

/// Ends a client's kept session in the router: a clean link with its id,
/// at once disconnected (blocking: it waits on the router thread).
pub(super) fn wipe_router_session(links: &super::super::LinkFactory, id: &str) {
    if let Ok((mut tx, _rx, _)) = links(id, true) {
        let _ = super::super::link::ready(tx.send(Packet::Disconnect(normal_disconnect(), None)));
    }
}
