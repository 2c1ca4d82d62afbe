//! What another node's client published, as the bus brought it
//! ([`crate::bus`]): into this node's router with the sender's identity
//! mark, as a device's retained message kept here too, and as a command
//! to a device whose session (live or persistent) is here.

use std::sync::Arc;

use bytes::Bytes;
use provisioning::sessions::now_ms;
use provisioning::Role;
use rumqttd::protocol::Publish;

use super::acl::{command_target, Acl};
use super::fanout::{self, Marked};
use super::session::message_properties;
use super::stamp;
use super::Shared;
use crate::bus::Incoming;

/// Applies one message from another node. What it carries under the
/// reserved prefix is dropped first, as from a client: the sender's
/// identity is the stamp the sending node wrote, nothing else.
pub(super) async fn apply(shared: &Arc<Shared>, i: &mut Incoming) {
    stamp::scrub(&mut i.message.props.user_properties);
    let i = &*i;
    if !admissible(shared, i) {
        return;
    }
    let m = &i.message;
    if !into_router(shared, i, m.topic.clone(), m.retain).await {
        return;
    }
    let hub = shared.hub.clone();
    if m.retain && i.role == Role::Device {
        let Ok(id) = provisioning::DeviceId::try_new(i.client.as_str()) else {
            return;
        };
        let mut kept = m.clone();
        stamp::mark_kept(&mut kept.props.user_properties, m.qos, &i.stamp);
        let done =
            tokio::task::spawn_blocking(move || hub.retain_own(&id, &kept, kept.qos > 0)).await;
        if !matches!(done, Ok(Ok(()))) {
            tracing::warn!(device.id = %crate::printable(&i.client), "bus: a retained message from another node was not kept");
        }
    } else if i.role == Role::Service {
        if let Some(target) = command_target(&m.topic) {
            let m = Arc::new(m.clone());
            let queued = i.queued;
            // Queued by the sender: delivered from the queue if the
            // device is live here. Otherwise delivered if it is live here.
            let done = tokio::task::spawn_blocking(move || match queued {
                Some(seq) => Ok(hub.publish_queued(&target, seq, &m)),
                None => hub.publish(&target, m).map(Some),
            })
            .await;
            if let Ok(Err(e)) = done {
                tracing::error!(error = %e, "bus: a command from another node was not delivered");
            }
        }
    }
}

/// Whether `i`'s sender could have published it here: the same ACL as
/// for a client of this node (a device under its own topics only, a
/// command from a service only). Anything else was put on NATS by
/// someone other than a node: dropped, counted and logged.
pub(super) fn admissible(shared: &Shared, i: &Incoming) -> bool {
    let why = match provisioning::DeviceId::try_new(i.client.as_str()) {
        Ok(id) => Acl::new(&provisioning::Identity { role: i.role, id })
            .can_publish(&i.message.topic)
            .err()
            .map(|d| d.0),
        Err(e) => Some(format!("the sender {:?}: {e}", i.client)),
    };
    let Some(why) = why else { return true };
    shared
        .metrics
        .bus_dropped
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tracing::warn!(reason = "bus", client = %crate::printable(&i.client), role = %i.role, detail = %crate::printable(&why), "bus: dropped a message its sender could not have published");
    false
}

/// Puts a message from the bus into this node's message plane under
/// `topic` (the fanout's services, and the router if it holds a matching
/// subscription), with the sender's identity mark (and whether it was
/// retained). False if the router is gone or it expired.
pub(super) async fn into_router(
    shared: &Shared,
    i: &Incoming,
    topic: String,
    retain: bool,
) -> bool {
    let Some(onward) = marked(shared, i, topic, retain) else {
        return false;
    };
    if fanout::onward(shared, &i.client, None, onward)
        .await
        .is_err()
    {
        tracing::warn!("bus: the router is gone");
        return false;
    }
    true
}

/// A message from the bus as this node delivers it, under `topic`, with
/// the sender's identity mark (and whether it was retained); `None` if it
/// expired.
pub(super) fn marked(shared: &Shared, i: &Incoming, topic: String, retain: bool) -> Option<Marked> {
    let m = &i.message;
    if m.expires_at_ms
        .is_some_and(|t| t <= shared.hub.expiry_now_ms())
    {
        return None;
    }
    let now = now_ms();
    Some(Marked::new(
        Publish::new(Bytes::from(topic), Bytes::from(m.payload.clone()), false),
        stamp::mark(
            message_properties(m, Vec::new(), now),
            m.qos,
            retain,
            &i.stamp,
        ),
        None,
    ))
}
