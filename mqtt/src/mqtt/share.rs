//! `$share` groups across nodes (with the message bus): each message goes to
//! one member of a group, wherever in the cluster the members are.
//!
//! On one node rumqttd's router spreads a group's messages over its
//! members. With several nodes, each router would give every message to a
//! member on every node. So with a bus, a member's `$share/<group>/<filter>`
//! goes to the router as `$share/<group>/fleetgate:share/<group>/<filter>`,
//! which no client's message matches, and the group's messages come from
//! one JetStream pull consumer per group and filter that every node with
//! members pulls from ([`crate::bus::Bus::follow_group`]). JetStream hands
//! each message to one puller; that node puts it into its router under
//! `fleetgate:share/<group>/<topic>`, and the router gives it to one local
//! member, which gets it under its own topic. Clients can neither publish
//! nor subscribe there (the ACL keeps both under `devices/`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use super::acl::topic_matches;
use super::remote;
use super::Shared;

/// Where a group's messages go into the router.
const PREFIX: &str = "fleetgate:share/";

/// `$share/<group>/<filter>` as group and filter.
pub(super) fn split(filter: &str) -> Option<(&str, &str)> {
    filter.strip_prefix("$share/")?.split_once('/')
}

/// The router's filter for a member's `$share/<group>/<filter>`.
pub(super) fn router_filter(group: &str, filter: &str) -> String {
    format!("$share/{group}/{PREFIX}{group}/{filter}")
}

/// A topic the router delivered, as the client sees it: a group's
/// message without its internal prefix.
pub(super) fn member_topic(topic: &bytes::Bytes) -> bytes::Bytes {
    let Some(rest) = topic.strip_prefix(PREFIX.as_bytes()) else {
        return topic.clone();
    };
    match rest.iter().position(|b| *b == b'/') {
        Some(i) => topic.slice(PREFIX.len() + i + 1..),
        None => topic.clone(),
    }
}

/// The groups with members on this node, each pulling its messages while
/// it has any.
#[derive(Debug, Default)]
pub(crate) struct Groups {
    pulling: Mutex<HashMap<(String, String), Pulling>>,
}

#[derive(Debug)]
struct Pulling {
    members: usize,
    task: tokio::task::JoinHandle<()>,
    /// True once the group's consumer exists on the bus.
    ready: tokio::sync::watch::Receiver<bool>,
}

/// A member's place in a group: while any is held on this node, the node
/// pulls the group's messages.
#[derive(Debug)]
pub(super) struct Membership {
    groups: Weak<Shared>,
    key: (String, String),
    ready: tokio::sync::watch::Receiver<bool>,
}

impl Membership {
    /// Waits (up to `within`) until the group's consumer exists on the bus,
    /// so that what any node stores from then on reaches the group: the
    /// SUBACK waits for it. A subscription acknowledged before it lost
    /// what other nodes stored meanwhile (the fault harness, issue 30: a
    /// device's first telemetry, acknowledged, never consumed). False if
    /// it did not come in time (NATS out of reach: the node keeps trying).
    pub async fn ready(&self, within: std::time::Duration) -> bool {
        let mut ready = self.ready.clone();
        let made = tokio::time::timeout(within, ready.wait_for(|r| *r)).await;
        matches!(made, Ok(Ok(_)))
    }
}

impl Groups {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Pulling>> {
        self.pulling
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Joins `group` for `filter` on this node (a bus is configured).
pub(super) fn join(shared: &Arc<Shared>, group: &str, filter: &str) -> Option<Membership> {
    let bus = shared.cfg.bus.clone()?;
    let key = (group.to_owned(), filter.to_owned());
    let mut pulling = shared.groups.lock();
    let p = pulling.entry(key.clone()).or_insert_with(|| {
        let weak = Arc::downgrade(shared);
        let (group, filter) = key.clone();
        let (mut incoming, ready) = bus.follow_group(&group, &filter);
        Pulling {
            members: 0,
            ready,
            task: tokio::spawn(async move {
                let topic_of = |t: &str| format!("{PREFIX}{group}/{t}");
                while let Some(i) = incoming.recv().await {
                    let Some(shared) = weak.upgrade() else { return };
                    if topic_matches(&filter, &i.message.topic) && remote::admissible(&shared, &i) {
                        // Never retained for a group (MQTT 5 4.8.2).
                        remote::into_router(&shared, &i, topic_of(&i.message.topic), false).await;
                    }
                    i.ack().await;
                }
            }),
        }
    });
    p.members += 1;
    Some(Membership {
        groups: Arc::downgrade(shared),
        key,
        ready: p.ready.clone(),
    })
}

impl Drop for Membership {
    fn drop(&mut self) {
        let Some(shared) = self.groups.upgrade() else {
            return;
        };
        let mut pulling = shared.groups.lock();
        if let Some(p) = pulling.get_mut(&self.key) {
            p.members -= 1;
            if p.members == 0 {
                // The last member here: the others' nodes take it all.
                p.task.abort();
                pulling.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_members_filter_and_topics_go_through_the_internal_prefix() {
        assert_eq!(
            split("$share/workers/devices/+/telemetry"),
            Some(("workers", "devices/+/telemetry"))
        );
        assert_eq!(split("devices/#"), None);
        assert_eq!(
            router_filter("workers", "devices/+/telemetry"),
            "$share/workers/fleetgate:share/workers/devices/+/telemetry"
        );
        let t = bytes::Bytes::from_static(b"fleetgate:share/workers/devices/d-1/telemetry");
        assert_eq!(&member_topic(&t)[..], b"devices/d-1/telemetry");
        let t = bytes::Bytes::from_static(b"devices/d-1/telemetry");
        assert_eq!(member_topic(&t), t);
    }
}
