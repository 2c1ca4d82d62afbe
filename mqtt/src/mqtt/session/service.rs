//! A service's side (and an admin's): its router link and session in
//! rumqttd (opened, expired, ended), its subscriptions (held by the fanout
//! for a session that keeps nothing, else the router's; with fleetgate's
//! identifiers, share groups and retained messages), and the deliveries
//! of both (with their subscription identifiers and retain flags).

use super::*;
use crate::mqtt::channel::overlap;

impl Session {
    /// A service's router link (building it waits on the router thread).
    /// Whether a session was present.
    pub(super) async fn open_service(
        &mut self,
        conn: u64,
        terms: &Terms,
    ) -> Result<(LinkRx, bool), ()> {
        let shared = self.shared.clone();
        let Ok(slot) = shared.link_slots.acquire().await else {
            return Err(());
        };
        let links = shared.links.clone();
        let device_id = self.peer.identity.id.to_string();
        let id = device_id.clone();
        // rumqttd keeps a session iff its link is not clean, resuming one
        // and keeping it after: a session resumed with an expiry of 0 is
        // ended after the connection (see `run`). (Clean start with an
        // expiry ends the old session first.)
        let clean = !terms.keeps_session();
        let wipe = terms.clean && !clean;
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
                // The filters its kept session holds in the router count
                // against its cap, as they did before.
                self.service_subs = shared.kept.filters(&device_id, !clean, present);
                // A session that keeps nothing takes its messages from the
                // fanout; a kept one from the router, whose log holds them
                // while the service is away.
                if clean {
                    self.inbox = Some(shared.fanout.register(conn, self.service_subs.clone()));
                }
                match RouterTx::spawn(format!("link-{device_id}"), tx, None, 64) {
                    Ok(tx) => self.router = Some(tx),
                    Err(e) => {
                        tracing::error!(error = %e, "mqtt: no thread for the router link");
                        self.refuse_connect(ConnectReturnCode::ServiceUnavailable, None)
                            .await;
                        return Err(());
                    }
                }
                Ok((rx, present))
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
                let _ = tokio::time::timeout(Duration::from_secs(1), self.stream.shutdown()).await;
                Err(())
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "mqtt: router refused the link");
                self.refuse_connect(ConnectReturnCode::ServiceUnavailable, None)
                    .await;
                Err(())
            }
            Err(e) => {
                tracing::error!(error = %e, "mqtt: link task failed");
                Err(())
            }
        }
    }

    /// A service's (or claim's) SUBSCRIBE: the ACL and the cap here; a
    /// session held by the fanout answered here too, and a group across
    /// nodes (with a bus: [`share`]); the rest passed to its router link. Returns the filters
    /// whose retained messages go out now (answered here), with their
    /// granted QoS.
    pub(super) async fn subscribe(
        &mut self,
        mut sub: rumqttd::protocol::Subscribe,
        props: Option<rumqttd::protocol::SubscribeProperties>,
        forward: &mut Vec<Packet>,
    ) -> Result<Vec<(String, u8)>, End> {
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
        let (mut codes, why) = self.refusals(checked);
        let held_here = self.inbox.is_some();
        // Retained messages (MQTT 3.3.1.3) as each filter's retain handling
        // says; none for a share group (MQTT 5 4.8.2).
        let mut wanted = Vec::new();
        let mut to_router = Vec::new();
        for (f, code) in sub.filters.drain(..).zip(codes.iter_mut()) {
            if code.is_some() {
                continue;
            }
            let qos = (f.qos as u8).min(2);
            let s = ServiceSub {
                id,
                rap: f.preserve_retain,
                qos,
                no_local: f.nolocal,
            };
            let new = lock(&self.service_subs).insert(f.path.clone(), s).is_none();
            let in_group = f.path.starts_with("$share/");
            if sends_retained(&f.retain_forward_rule, new) && !in_group {
                wanted.push((f.path.clone(), qos));
            }
            // A group across nodes: its messages come through the bus,
            // not the router.
            if let Some((group, inner)) = share::split(&f.path) {
                if !self.groups.contains_key(&f.path) {
                    let tx = self.group_sender();
                    if let Some(m) = share::join(&self.shared, group, inner, tx) {
                        if !m.ready(std::time::Duration::from_secs(5)).await {
                            tracing::warn!(filter = %crate::printable(&f.path), "mqtt: a share group's consumer is not on the bus yet; other nodes' messages reach it once it is");
                        }
                        self.groups.insert(f.path.clone(), m);
                    }
                }
            }
            if (held_here && !in_group) || self.groups.contains_key(&f.path) {
                *code = Some(SubscribeReasonCode::Success(f.qos));
            } else {
                to_router.push(f);
            }
        }
        if self.peer.identity.role != Role::Service {
            wanted.clear();
        }
        if self.peer.identity.role == Role::Claim || to_router.is_empty() {
            // Answered here: a claim's (provisioning replies come from
            // this session, never through the router), or one the router
            // has no part in.
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
            self.encode(Packet::SubAck(ack, suback_props(why)))
                .map_err(End::Protocol)?;
            return Ok(wanted);
        }
        if codes.iter().any(Option::is_some) {
            self.pending_subacks.insert(sub.pkid, (codes, why));
        }
        if !wanted.is_empty() {
            self.pending_retained.insert(sub.pkid, wanted);
        }
        sub.filters = to_router;
        forward.push(Packet::Subscribe(sub, props));
        Ok(Vec::new())
    }

    /// A service's UNSUBSCRIBE: forgotten here; answered here for a
    /// session held by the fanout and for a group across nodes (with a
    /// bus); the rest go to the router, whose UNSUBACK is merged with the
    /// reasons given here.
    pub(super) fn service_unsubscribe(
        &mut self,
        mut unsub: rumqttd::protocol::Unsubscribe,
        props: Option<rumqttd::protocol::UnsubscribeProperties>,
        forward: &mut Vec<Packet>,
    ) -> Result<(), End> {
        let held_here = self.inbox.is_some();
        // Each filter's reason if answered here; the router's in order
        // for the rest.
        let mut reasons = Vec::new();
        let mut to_router = Vec::new();
        for f in unsub.filters.drain(..) {
            let existed = lock(&self.service_subs).remove(&f).is_some();
            let in_group = f.starts_with("$share/");
            // A group across nodes is not the router's.
            let bus_group = self.groups.remove(&f).is_some();
            if (held_here && !in_group) || bus_group {
                reasons.push(Some(if existed {
                    UnsubAckReason::Success
                } else {
                    UnsubAckReason::NoSubscriptionExisted
                }));
            } else {
                reasons.push(None);
                to_router.push(f);
            }
        }
        if to_router.is_empty() {
            let ack = UnsubAck {
                pkid: unsub.pkid,
                reasons: reasons.into_iter().flatten().collect(),
            };
            return self
                .encode(Packet::UnsubAck(ack, None))
                .map_err(End::Protocol);
        }
        if reasons.iter().any(Option::is_some) {
            self.pending_unsubacks.insert(unsub.pkid, reasons);
        }
        unsub.filters = to_router;
        forward.push(Packet::Unsubscribe(unsub, props));
        Ok(())
    }

    /// A message the fanout handed over, into the outbox: a copy for each
    /// matching subscription (MQTT 5 3.3.4), at min(published QoS, its
    /// granted QoS), with its identifier, retained if it asks for Retain
    /// As Published.
    pub(super) fn take_marked(&mut self, m: &Marked) {
        let v5 = self.ch.is_v5();
        let topic = m.publish.topic.clone();
        let Ok(t) = std::str::from_utf8(&topic) else {
            return;
        };
        let u = stamp::unmark(m.props.clone(), &topic, v5);
        let own = m.from.is_some() && m.from == self.conn();
        let copies: Vec<ServiceSub> = {
            let subs = lock(&self.service_subs);
            fanout::copies(&subs, t, own).copied().collect()
        };
        for sub in copies {
            let mut props = u.props.clone();
            if let (true, Some(id)) = (v5, sub.id) {
                props
                    .get_or_insert_with(Default::default)
                    .subscription_identifiers = vec![id];
            }
            self.ch.outbox.push(Outgoing {
                seq: None,
                topic: topic.clone(),
                payload: m.publish.payload.clone(),
                qos: u.qos.min(sub.qos),
                retain: u.retained && sub.rap,
                props,
            });
        }
    }

    /// This session's queue for its groups' messages on this node.
    fn group_sender(&mut self) -> share::MemberTx {
        let (tx, _) = self
            .group_queue
            .get_or_insert_with(|| mpsc::channel(share::MEMBER_QUEUE));
        tx.clone()
    }

    /// One of its groups' messages, into the outbox: at min(published QoS,
    /// granted QoS), with its subscription's identifier, never retained
    /// (MQTT 5 4.8.2), acknowledged to the stream once the client is done
    /// with it. One for a subscription it has left goes back at once.
    pub(super) fn take_group(&mut self, g: share::GroupMessage) {
        let sub = lock(&self.service_subs).get(&*g.sub).copied();
        let Some(sub) = sub.filter(|_| self.groups.contains_key(&*g.sub)) else {
            tokio::spawn(g.acker.nak());
            return;
        };
        let v5 = self.ch.is_v5();
        let topic = g.marked.publish.topic;
        let u = stamp::unmark(g.marked.props, &topic, v5);
        let mut props = u.props;
        if let (true, Some(id)) = (v5, sub.id) {
            props
                .get_or_insert_with(Default::default)
                .subscription_identifiers = vec![id];
        }
        let token = self.acks.token();
        self.group_owed.insert(token, g.acker);
        self.ch.outbox.push(Outgoing {
            seq: Some(token),
            topic,
            payload: g.marked.publish.payload,
            qos: u.qos.min(sub.qos),
            retain: false,
            props,
        });
    }

    /// Leaves its groups on this node; what they handed it and the client
    /// did not finish goes back to the stream at once, for another member.
    pub(super) async fn leave_groups(&mut self) {
        self.groups.clear();
        for done in self.group_done.drain(..) {
            done.ack().await;
        }
        let mut back: Vec<crate::bus::Acker> = self.group_owed.drain().map(|(_, a)| a).collect();
        if let Some((tx, mut rx)) = self.group_queue.take() {
            drop(tx);
            rx.close();
            while let Ok(g) = rx.try_recv() {
                back.push(g.acker);
            }
        }
        if !back.is_empty() {
            tracing::debug!(
                back = back.len(),
                "mqtt: left its share groups; what it held goes back"
            );
        }
        for a in back {
            a.nak().await;
        }
    }

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
                            ack.return_codes =
                                merged(codes, ack.return_codes, SubscribeReasonCode::Failure);
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
                        let topic = p.topic.clone();
                        let u = stamp::unmark(props, &topic, self.ch.is_v5());
                        let mut props = u.props;
                        // A session held by the fanout has only its groups
                        // in the router.
                        let groups_only = self.inbox.is_some();
                        let (matching, rap) = self.matching_subs(&topic, groups_only);
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
                    Some(Packet::UnsubAck(mut ack, props)) => {
                        // Merged with the reasons given here, in the
                        // UNSUBSCRIBE's order.
                        if let Some(mine) = self.pending_unsubacks.remove(&ack.pkid) {
                            ack.reasons =
                                merged(mine, ack.reasons, UnsubAckReason::UnspecifiedError);
                        }
                        if let Err(e) = self.encode(Packet::UnsubAck(ack, props)) {
                            return Some(End::Protocol(e));
                        }
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
            let (matching, _) = self.matching_subs(m.topic.as_bytes(), false);
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
    /// 3.3.4), and whether any wants Retain As Published. `groups_only`:
    /// its `$share` subscriptions alone, all the router holds of a session
    /// the fanout serves.
    pub(super) fn matching_subs(
        &self,
        topic: &[u8],
        groups_only: bool,
    ) -> (Vec<overlap::Match>, bool) {
        let subs = lock(&self.service_subs);
        if !subs.values().any(|s| s.id.is_some() || s.rap) {
            return (Vec::new(), false);
        }
        let topic = String::from_utf8_lossy(topic);
        let mut matching = Vec::new();
        let mut rap = false;
        for (filter, sub) in subs.iter() {
            // A group across nodes comes from the bus, not the router.
            if (groups_only && !filter.starts_with("$share/")) || self.groups.contains_key(filter) {
                continue;
            }
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

/// An acknowledgement's codes: those given here in their places, the
/// router's in order for the rest (`missing` if it gave too few).
fn merged<T: Copy>(mine: Vec<Option<T>>, router: Vec<T>, missing: T) -> Vec<T> {
    let mut router = router.into_iter();
    mine.into_iter()
        .map(|c| c.or_else(|| router.next()).unwrap_or(missing))
        .collect()
}

/// Ends a client's kept session in the router: a clean link with its id,
/// at once disconnected (blocking: it waits on the router thread).
fn wipe_router_session(links: &super::super::LinkFactory, id: &str) {
    if let Ok((mut tx, _rx, _)) = links(id, true) {
        let _ = super::super::link::ready(tx.send(Packet::Disconnect(normal_disconnect(), None)));
    }
}

/// Ends a service's kept router session `secs` from now, unless the
/// service comes back first.
pub(super) fn expire_service_session(
    shared: &Arc<Shared>,
    id: &str,
    secs: u32,
    mut down: watch::Receiver<bool>,
) {
    let (links, id) = (shared.links.clone(), id.to_owned());
    let shared = shared.clone();
    tokio::spawn(async move {
        let client = match DeviceId::try_new(id.clone()) {
            Ok(c) => c,
            Err(_) => return,
        };
        let mut back = shared.sessions.watch_return(&client);
        if !back
            .within(Duration::from_secs(secs.into()), &mut down)
            .await
            && !*down.borrow()
        {
            tracing::info!(client = %id, "mqtt: a service's session expired");
            shared.kept.forget_filters(&id);
            let _ = tokio::task::spawn_blocking(move || wipe_router_session(&links, &id)).await;
        }
    });
}
