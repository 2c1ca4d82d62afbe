//! `$share` groups across nodes (with the message bus): each message goes to
//! one member of a group, wherever in the cluster the members are.
//!
//! On one node rumqttd's router spreads a group's messages over its
//! members. With several nodes, each router would give every message to a
//! member on every node, so with a bus a group is not the router's: its
//! messages come from one JetStream pull consumer per group and filter
//! that every node with members pulls from ([`crate::bus::Bus::follow_group`]).
//! JetStream hands each message to one puller, and that node hands it to
//! one of its members (in turn; one with room), straight into the member
//! session's queue, with what acknowledges it to the stream.
//!
//! A message is acknowledged to the stream only once its member is done
//! with it: its PUBACK (PUBCOMP), or written at QoS 0. A member that goes
//! away first sends back what it held (a nak: JetStream hands it to a
//! puller again at once); a node that dies leaves it unacknowledged, and
//! JetStream hands it out again after its wait. So a group gets every
//! message at least once while it has a member anywhere. (Through the
//! router, a message was acknowledged once in the router: one that came
//! before the member's subscription reached the router, or while its
//! connection ended, was lost. The fault harness found one, issue 30.)

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::mpsc;

use super::acl::topic_matches;
use super::fanout::Marked;
use super::remote;
use super::Shared;
use crate::bus::Acker;

/// `$share/<group>/<filter>` as group and filter.
pub(super) fn split(filter: &str) -> Option<(&str, &str)> {
    filter.strip_prefix("$share/")?.split_once('/')
}

/// What a member's queue holds at most before the node waits for room
/// (the rest wait in JetStream).
pub(super) const MEMBER_QUEUE: usize = 256;

/// One of a group's messages for one member session on this node.
#[derive(Debug)]
pub(crate) struct GroupMessage {
    /// The member's subscription it is for: `$share/<group>/<filter>`.
    pub sub: Arc<str>,
    pub marked: Marked,
    /// Acknowledges it to the stream once the member is done with it.
    pub acker: Acker,
}

/// A member session's queue, where each of its groups on this node puts
/// the messages it hands to it.
pub(crate) type MemberTx = mpsc::Sender<GroupMessage>;

/// A member session's queue, both ends (it hands out the sender as it
/// joins groups).
pub(crate) type MemberQueue = (MemberTx, mpsc::Receiver<GroupMessage>);

type Members = Arc<Mutex<Vec<(u64, MemberTx)>>>;

fn lock_members(m: &Members) -> std::sync::MutexGuard<'_, Vec<(u64, MemberTx)>> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The groups with members on this node, each pulling its messages while
/// it has any.
#[derive(Debug, Default)]
pub(crate) struct Groups {
    pulling: Mutex<HashMap<(String, String), Pulling>>,
}

#[derive(Debug)]
struct Pulling {
    members: Members,
    /// Tells the task handing messages out to stop (the last member left).
    stop: tokio::sync::watch::Sender<bool>,
    /// True once the group's consumer exists on the bus.
    ready: tokio::sync::watch::Receiver<bool>,
}

/// A member's place in a group: while any is held on this node, the node
/// pulls the group's messages, and hands some to this member.
#[derive(Debug)]
pub(super) struct Membership {
    groups: Weak<Shared>,
    key: (String, String),
    id: u64,
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

/// Joins `group` for `filter` on this node (a bus is configured): the
/// member takes its share of the group's messages from `tx`.
pub(super) fn join(
    shared: &Arc<Shared>,
    group: &str,
    filter: &str,
    tx: MemberTx,
) -> Option<Membership> {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let bus = shared.cfg.bus.clone()?;
    let key = (group.to_owned(), filter.to_owned());
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut pulling = shared.groups.lock();
    let p = pulling.entry(key.clone()).or_insert_with(|| {
        let weak = Arc::downgrade(shared);
        let (group, filter) = key.clone();
        let (incoming, ready) = bus.follow_group(&group, &filter);
        let members = Members::default();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(hand_out(
            weak,
            group,
            filter,
            incoming,
            members.clone(),
            stopped,
        ));
        Pulling {
            members,
            stop,
            ready,
        }
    });
    lock_members(&p.members).push((id, tx));
    Some(Membership {
        groups: Arc::downgrade(shared),
        key,
        id,
        ready: p.ready.clone(),
    })
}

/// Hands each of a group's messages this node pulls to one of its
/// members here, in turn; one whose queue is full is passed over, and if
/// every one's is, the node waits for room. Once told to stop, it stops
/// pulling and sends back what it pulled and did not hand out, so that
/// JetStream hands it to another node's member at once (not after its
/// wait: a member that left sends its own back at the same moment, and
/// they must not come to this node again).
async fn hand_out(
    weak: Weak<Shared>,
    group: String,
    filter: String,
    mut incoming: mpsc::Receiver<crate::bus::Incoming>,
    members: Members,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let sub: Arc<str> = format!("$share/{group}/{filter}").into();
    let mut turn = 0usize;
    let mut back = Vec::new();
    'pulled: loop {
        let i = tokio::select! {
            i = incoming.recv() => match i {
                Some(i) => i,
                None => break,
            },
            _ = stop.wait_for(|s| *s) => break,
        };
        let Some(shared) = weak.upgrade() else { break };
        let marked = (topic_matches(&filter, &i.message.topic) && remote::admissible(&shared, &i))
            .then(|| remote::marked(&shared, &i, i.message.topic.clone(), false))
            .flatten();
        drop(shared);
        // Not the group's, or expired: done with.
        let Some(marked) = marked else {
            i.ack().await;
            continue;
        };
        let mut next = Some(GroupMessage {
            sub: sub.clone(),
            marked,
            acker: i.into_acker(),
        });
        while let Some(m) = next.take() {
            let list: Vec<(u64, MemberTx)> = lock_members(&members).clone();
            if list.is_empty() {
                back.push(m.acker);
                break 'pulled;
            }
            let n = list.len();
            let mut left = Some(m);
            for k in 0..n {
                let Some(m) = left.take() else { break };
                match list[(turn + k) % n].1.try_send(m) {
                    Ok(()) => turn = (turn + k + 1) % n,
                    Err(
                        mpsc::error::TrySendError::Full(m) | mpsc::error::TrySendError::Closed(m),
                    ) => left = Some(m),
                }
            }
            let Some(m) = left else { break };
            // No member has room: wait for the next one's.
            let (id, tx) = list[turn % n].clone();
            let room = tokio::select! {
                room = tx.reserve() => room,
                _ = stop.wait_for(|s| *s) => {
                    back.push(m.acker);
                    break 'pulled;
                }
            };
            match room {
                Ok(permit) => {
                    permit.send(m);
                    turn = (turn + 1) % n;
                }
                // Its session ended: it leaves the group.
                Err(_) => {
                    lock_members(&members).retain(|(other, _)| *other != id);
                    next = Some(m);
                }
            }
        }
    }
    // The puller stops at its next message, and sends that one back too.
    incoming.close();
    while let Ok(i) = incoming.try_recv() {
        back.push(i.into_acker());
    }
    tracing::debug!(group = %group, filter = %crate::printable(&filter), back = back.len(), "mqtt: a share group's last member here left; what this node pulled goes back");
    for a in back {
        a.nak().await;
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        let Some(shared) = self.groups.upgrade() else {
            return;
        };
        let mut pulling = shared.groups.lock();
        if let Some(p) = pulling.get_mut(&self.key) {
            let mut members = lock_members(&p.members);
            members.retain(|(m, _)| *m != self.id);
            if members.is_empty() {
                drop(members);
                // The last member here: the others' nodes take it all,
                // and what this node pulled goes back to the stream.
                p.stop.send_replace(true);
                pulling.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_members_filter_splits_into_group_and_filter() {
        assert_eq!(
            split("$share/workers/devices/+/telemetry"),
            Some(("workers", "devices/+/telemetry"))
        );
        assert_eq!(split("devices/#"), None);
        assert_eq!(split("$share/workers"), None);
    }
}
