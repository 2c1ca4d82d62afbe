//! Messages to live services, outside rumqttd's router.
//!
//! A service session that keeps nothing past its connection (clean start,
//! no session expiry) holds its subscriptions here, `$share` groups
//! excepted. Every message that enters this node's message plane (a
//! client's PUBLISH or will, what the bus brought) is matched against them
//! where it enters, on the publisher's task, and handed to each matching
//! session's queue in the form the router delivers (marked, see
//! [`super::stamp`]). The router sees a message only if a subscription it
//! holds may match: a persistent service session's (connected, or kept
//! until it expires: [`super::kept::Kept::any_filter`]), or a `$share`
//! group's on a node without a bus (with one, a group's messages come
//! from the bus: [`super::share`]).
//!
//! So with no persistent service sessions and no groups, a device's
//! message to a service makes no thread hop (before: an ingest link's
//! thread, then the router's, then back to the service's task). What the
//! router still carries, and why: a persistent service session's messages
//! (its log keeps them while the service is away, and resumes from where
//! the service was), and `$share` groups (rumqttd spreads a group's
//! messages over its members).
//!
//! A session's queue is bounded in bytes (`--router-log-mib`, as the
//! router's log for one filter is): past it, a message for a session that
//! does not keep up is dropped for that session and counted
//! (`fleetgate_service_backlog_dropped_total`), as the router's log would
//! have dropped its oldest segment. A publisher never waits on a slow
//! service.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use rumqttd::protocol::{Packet, Publish, PublishProperties};
use tokio::sync::mpsc;

use super::acl::topic_matches;
use super::channel::subscribe::share_inner;
use super::kept::{lock, Filters, ServiceSub};

/// A message as the router would deliver it: marked with its published
/// QoS and its sender's identity.
#[derive(Debug)]
pub struct Marked {
    pub publish: Publish,
    pub props: Option<PublishProperties>,
    /// The publishing session, for No Local.
    pub from: Option<u64>,
    size: usize,
}

impl Marked {
    pub fn new(publish: Publish, props: Option<PublishProperties>, from: Option<u64>) -> Self {
        let props_size = props.as_ref().map_or(0, |p| {
            p.user_properties
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
                + p.content_type.as_ref().map_or(0, String::len)
                + p.response_topic.as_ref().map_or(0, String::len)
                + p.correlation_data.as_ref().map_or(0, |c| c.len())
        });
        let size = publish.topic.len() + publish.payload.len() + props_size;
        Self {
            publish,
            props,
            from,
            size,
        }
    }
}

/// Which of a session's subscriptions match `topic`, one copy each (MQTT 5
/// 3.3.4 allows a copy per subscription, each with its own identifier):
/// the subscriptions held here, not `$share` ones, and none with No Local
/// for the session's `own` message.
pub fn copies<'a>(
    filters: &'a HashMap<String, ServiceSub>,
    topic: &'a str,
    own: bool,
) -> impl Iterator<Item = &'a ServiceSub> + 'a {
    filters
        .iter()
        .filter(move |(f, _)| !f.starts_with("$share/") && topic_matches(f, topic))
        .filter(move |(_, s)| !(own && s.no_local))
        .map(|(_, s)| s)
}

struct Subscriber {
    filters: Filters,
    tx: mpsc::UnboundedSender<Arc<Marked>>,
    /// Bytes in its queue.
    queued: Arc<AtomicUsize>,
}

/// Where one message went.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reach {
    /// Sessions it was handed to.
    pub delivered: usize,
    /// Sessions whose queue had no room for it.
    pub dropped: usize,
    /// A `$share` filter of a session here matches it: the router holds
    /// that group.
    pub shared: bool,
}

/// The live services' subscriptions held outside the router.
pub struct Fanout {
    subs: RwLock<HashMap<u64, Subscriber>>,
    /// Bytes a session's queue holds at most.
    cap: usize,
}

impl std::fmt::Debug for Fanout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fanout")
            .field("cap", &self.cap)
            .finish_non_exhaustive()
    }
}

/// A session's queue; leaving the fanout when dropped.
#[derive(Debug)]
pub struct Inbox {
    conn: u64,
    rx: mpsc::UnboundedReceiver<Arc<Marked>>,
    queued: Arc<AtomicUsize>,
    fanout: Arc<Fanout>,
}

impl Inbox {
    /// The next message; `None` only once the fanout is gone.
    pub async fn recv(&mut self) -> Option<Arc<Marked>> {
        let m = self.rx.recv().await?;
        self.queued.fetch_sub(m.size, Ordering::Relaxed);
        Some(m)
    }

    /// The next message if one is waiting.
    pub fn try_recv(&mut self) -> Option<Arc<Marked>> {
        let m = self.rx.try_recv().ok()?;
        self.queued.fetch_sub(m.size, Ordering::Relaxed);
        Some(m)
    }

    /// The session's connection.
    pub fn conn(&self) -> u64 {
        self.conn
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        let mut subs = self
            .fanout
            .subs
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        subs.remove(&self.conn);
    }
}

impl Fanout {
    /// A fanout whose sessions' queues hold at most `cap` bytes each.
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self {
            subs: RwLock::default(),
            cap: cap.max(64 * 1024),
        })
    }

    /// Connection `conn`'s session takes its messages from here, by its
    /// `filters` (the session's own map: what it subscribes to from now on
    /// counts at once).
    pub fn register(self: &Arc<Self>, conn: u64, filters: Filters) -> Inbox {
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let s = Subscriber {
            filters,
            tx,
            queued: queued.clone(),
        };
        self.subs
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(conn, s);
        Inbox {
            conn,
            rx,
            queued,
            fanout: self.clone(),
        }
    }

    /// Hands `m`, published on `topic`, to every session here with a
    /// subscription that matches it.
    pub fn deliver(&self, topic: &str, m: &Arc<Marked>) -> Reach {
        let mut reach = Reach::default();
        let subs = self
            .subs
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (conn, s) in subs.iter() {
            let (wanted, shared) = {
                let f = lock(&s.filters);
                let own = m.from == Some(*conn);
                let wanted = copies(&f, topic, own).next().is_some();
                let shared = f
                    .keys()
                    .any(|k| k.starts_with("$share/") && topic_matches(share_inner(k), topic));
                (wanted, shared)
            };
            reach.shared |= shared;
            if !wanted {
                continue;
            }
            let before = s.queued.fetch_add(m.size, Ordering::Relaxed);
            if before + m.size > self.cap && before > 0 {
                s.queued.fetch_sub(m.size, Ordering::Relaxed);
                reach.dropped += 1;
                continue;
            }
            if s.tx.send(m.clone()).is_ok() {
                reach.delivered += 1;
            } else {
                s.queued.fetch_sub(m.size, Ordering::Relaxed);
            }
        }
        reach
    }
}

/// Hands a marked message to whoever subscribes to it on this node: the
/// live services held here, and the router (through `via`, or the ingest
/// link for `key`) if a subscription there may match it.
pub(super) async fn onward(
    shared: &super::Shared,
    key: &str,
    via: Option<&super::link::RouterTx>,
    m: Marked,
) -> Result<(), super::link::Closed> {
    match here(shared, m) {
        None => Ok(()),
        Some(p) => to_router(shared, key, via, p).await,
    }
}

/// What [`onward`] does without waiting: the message to the live
/// services held here; the packet for the router, if a subscription there
/// may match it.
pub(super) fn here(shared: &super::Shared, m: Marked) -> Option<Packet> {
    let m = Arc::new(m);
    let topic = std::str::from_utf8(&m.publish.topic).unwrap_or_default();
    let reach = shared.fanout.deliver(topic, &m);
    if reach.dropped > 0 {
        let n = reach.dropped as u64;
        let before = shared
            .metrics
            .service_backlog_dropped
            .fetch_add(n, Ordering::Relaxed);
        // Logged on the first, then once a thousand.
        if before == 0 || (before + n) / 1000 > before / 1000 {
            tracing::warn!(reason = "service_backlog", dropped_total = before + n, "mqtt: a service reads more slowly than its messages come: messages past its backlog dropped for it");
        }
    }
    // With a bus, a group is not the router's (see `super::share`).
    let groups_in_router = shared.cfg.bus.is_none();
    let router_wants = (reach.shared && groups_in_router)
        || shared.kept.any_filter(|f| {
            (groups_in_router || !f.starts_with("$share/")) && topic_matches(share_inner(f), topic)
        });
    if !router_wants {
        return None;
    }
    shared
        .metrics
        .router_messages
        .fetch_add(1, Ordering::Relaxed);
    let (publish, props) = match Arc::try_unwrap(m) {
        Ok(m) => (m.publish, m.props),
        Err(m) => (m.publish.clone(), m.props.clone()),
    };
    Some(Packet::Publish(publish, props))
}

/// Hands `p` to the router (through `via`, or the ingest link for `key`),
/// waiting while the link's queue is full.
pub(super) async fn to_router(
    shared: &super::Shared,
    key: &str,
    via: Option<&super::link::RouterTx>,
    p: Packet,
) -> Result<(), super::link::Closed> {
    router_link(shared, key, via).send(p).await
}

/// The router link a message goes by: the sender's own (`via`), or the
/// ingest link for `key`.
pub(super) fn router_link<'a>(
    shared: &'a super::Shared,
    key: &str,
    via: Option<&'a super::link::RouterTx>,
) -> &'a super::link::RouterTx {
    via.unwrap_or_else(|| shared.ingest.link(key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn sub(qos: u8, id: Option<usize>, no_local: bool) -> ServiceSub {
        ServiceSub {
            id,
            rap: false,
            qos,
            no_local,
        }
    }

    fn marked(topic: &'static str, payload: &[u8], from: Option<u64>) -> Arc<Marked> {
        Arc::new(Marked::new(
            Publish::new(
                Bytes::from_static(topic.as_bytes()),
                Bytes::copy_from_slice(payload),
                false,
            ),
            None,
            from,
        ))
    }

    #[test]
    fn a_message_goes_to_each_matching_session_once_and_a_group_is_left_to_the_router() {
        let fanout = Fanout::new(1 << 20);
        let a = Filters::default();
        lock(&a).insert("devices/+/telemetry".into(), sub(1, Some(1), false));
        lock(&a).insert("devices/#".into(), sub(0, Some(2), false));
        let b = Filters::default();
        lock(&b).insert("devices/+/status".into(), sub(1, None, false));
        let c = Filters::default();
        lock(&c).insert("$share/g/devices/+/telemetry".into(), sub(1, None, false));
        let (mut ia, mut ib, mut ic) = (
            fanout.register(1, a.clone()),
            fanout.register(2, b),
            fanout.register(3, c),
        );
        let m = marked("devices/d-1/telemetry", b"x", None);
        let reach = fanout.deliver("devices/d-1/telemetry", &m);
        assert_eq!(
            reach,
            Reach {
                delivered: 1,
                dropped: 0,
                shared: true
            }
        );
        assert!(ia.try_recv().is_some());
        assert!(ia.try_recv().is_none(), "one message, whatever matches it");
        assert!(ib.try_recv().is_none());
        assert!(ic.try_recv().is_none(), "a group is the router's");
        // Two of a's subscriptions match: a copy for each.
        assert_eq!(copies(&lock(&a), "devices/d-1/telemetry", false).count(), 2);
        // A subscription made after registering counts at once.
        lock(&a).clear();
        assert_eq!(fanout.deliver("devices/d-1/telemetry", &m).delivered, 0);
        // Gone with its inbox.
        drop(ib);
        assert_eq!(fanout.subs.read().unwrap().len(), 2);
    }

    #[test]
    fn no_local_keeps_a_sessions_own_message_from_it() {
        let fanout = Fanout::new(1 << 20);
        let f = Filters::default();
        lock(&f).insert("devices/+/commands/#".into(), sub(1, None, true));
        let mut inbox = fanout.register(7, f.clone());
        let own = marked("devices/d-1/commands/x", b"x", Some(7));
        assert_eq!(fanout.deliver("devices/d-1/commands/x", &own).delivered, 0);
        let other = marked("devices/d-1/commands/x", b"x", Some(8));
        assert_eq!(
            fanout.deliver("devices/d-1/commands/x", &other).delivered,
            1
        );
        assert!(inbox.try_recv().is_some());
    }

    #[test]
    fn a_session_that_does_not_keep_up_loses_what_is_past_its_cap_and_only_that() {
        let fanout = Fanout::new(64 * 1024);
        let f = Filters::default();
        lock(&f).insert("t/#".into(), sub(1, None, false));
        let mut inbox = fanout.register(1, f);
        let big = vec![0u8; 16 * 1024];
        let mut reach = Reach::default();
        for _ in 0..6 {
            let r = fanout.deliver("t/x", &marked("t/x", &big, None));
            reach.delivered += r.delivered;
            reach.dropped += r.dropped;
        }
        // 64 KiB hold three of 16 KiB and a bit (topic) each: the fourth
        // and later ones are past the cap.
        assert_eq!((reach.delivered, reach.dropped), (3, 3));
        // Taken: room again.
        while inbox.try_recv().is_some() {}
        assert_eq!(
            fanout.deliver("t/x", &marked("t/x", &big, None)).delivered,
            1
        );
    }
}
