//! A device's side: its mailbox and session in the hub (opened, stored,
//! closed), its subscriptions (only ever under its own topics, kept in
//! the mailbox, durably before the SUBACK for a persistent session) and
//! the messages the hub hands it.

use super::*;

impl Session {
    /// A device's session in the hub: its mailbox, what it kept queued.
    /// Whether a session was present.
    pub(super) async fn open_device(&mut self, conn: u64, terms: &Terms) -> Result<bool, ()> {
        let shared = self.shared.clone();
        let (hub, id) = (shared.hub.clone(), self.peer.identity.id.clone());
        let (clean, expiry) = (terms.clean, terms.expiry);
        let (opened, durable) = match hub.open_at_once(&id, conn, clean, expiry) {
            Some(opened) => (Ok(opened), false),
            None => (
                tokio::task::spawn_blocking(move || hub.open(&id, conn, clean, expiry)).await,
                true,
            ),
        };
        match opened {
            Ok(Ok(opened)) => {
                for q in opened.queued {
                    take_into(
                        &shared,
                        &self.peer,
                        &opened.mailbox,
                        &mut self.ch,
                        Some(q.seq),
                        Arc::new(q.message),
                    );
                }
                self.device = Some(DeviceSide {
                    conn,
                    durable: durable || opened.session_present,
                    mailbox: opened.mailbox,
                    rx: opened.rx,
                    echo: None,
                });
                Ok(opened.session_present)
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "mqtt: opening the device's session failed");
                self.refuse_connect(ConnectReturnCode::ServiceUnavailable, None)
                    .await;
                Err(())
            }
            Err(e) => {
                tracing::error!(error = %e, "mqtt: session task failed");
                Err(())
            }
        }
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
        if let Some(side) = self.device.as_mut() {
            side.echo = None;
        }
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
        if let Some(side) = self.device.as_mut() {
            side.echo = None;
        }
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
    /// Closes the device's session here; it outlives the connection by
    /// `expiry` (the CONNECT's, or what its DISCONNECT said).
    pub(super) async fn close_device(&mut self, expiry: Option<u32>) {
        let Some(side) = self.device.take() else {
            return;
        };
        let (hub, id, conn) = (
            self.shared.hub.clone(),
            self.peer.identity.id.clone(),
            side.conn,
        );
        // (A DISCONNECT can change the expiry only of a session its
        // CONNECT already kept: `durable` since it opened.)
        let durable = side.durable;
        drop(side);
        let closed = if durable {
            tokio::task::spawn_blocking(move || hub.close(&id, conn, expiry)).await
        } else {
            Ok(hub.close(&id, conn, expiry))
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
    // Judged by a clock the cluster believes (see `Hub::expiry_now_ms`).
    let expired = m
        .expires_at_ms
        .is_some_and(|t| t <= shared.hub.expiry_now_ms());
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
