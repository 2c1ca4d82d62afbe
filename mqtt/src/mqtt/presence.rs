//! Where devices are connected across the cluster, for operators: this
//! node's sessions, and what the other nodes answer over the bus
//! ([`crate::bus::Bus::ask`]) within [`WAIT`]. A node that does not answer
//! in time is left out: the console says what it heard.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use provisioning::DeviceId;
use serde::{Deserialize, Serialize};

use super::{Broker, LiveSession, Shared};

/// How long a question waits for the other nodes, at most.
const WAIT: Duration = Duration::from_millis(500);
/// Once one node answered, how long to wait for the next.
const QUIET: Duration = Duration::from_millis(50);
/// Ids asked about at once (a page of the console's list).
const MAX_IDS: usize = 200;

/// A live session, and the node it is on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSession {
    /// The node, as it names itself (`--mqtt-listen` and host name).
    pub node: String,
    pub addr: std::net::SocketAddr,
    /// `MQTT 3.1.1` or `MQTT 5`.
    pub protocol: String,
    /// The certificate it presented (hex serial).
    pub serial: String,
    #[serde(with = "time::serde::rfc3339")]
    pub since: time::OffsetDateTime,
}

impl NodeSession {
    fn of(node: &str, s: LiveSession) -> Self {
        Self {
            node: node.to_owned(),
            addr: s.addr,
            protocol: s.protocol.to_owned(),
            serial: s.serial,
            since: s.since,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Held {
    id: DeviceId,
    session: NodeSession,
}

#[derive(Debug, Serialize, Deserialize)]
struct ConnectedAfter {
    after: Option<String>,
    limit: usize,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Connected {
    ids: Vec<DeviceId>,
    more: bool,
}

/// This node's live sessions of `ids`.
fn held(shared: &Shared, ids: &[DeviceId]) -> Vec<Held> {
    ids.iter()
        .take(MAX_IDS)
        .flat_map(|id| {
            shared.sessions.live(id).into_iter().map(|s| Held {
                id: id.clone(),
                session: NodeSession::of(&shared.cfg.node, s),
            })
        })
        .collect()
}

/// Answers the other nodes' questions from now on.
pub(super) fn answer(shared: &Arc<Shared>, bus: &Arc<crate::bus::Bus>) {
    let label = shared.cfg.node.clone();
    let s = shared.clone();
    bus.answer(
        "sessions",
        label.clone(),
        Arc::new(move |body| {
            let ids: Vec<DeviceId> = serde_json::from_slice(body).ok()?;
            serde_json::to_vec(&held(&s, &ids)).ok()
        }),
    );
    let s = shared.clone();
    bus.answer(
        "connected",
        label,
        Arc::new(move |body| {
            let q: ConnectedAfter = serde_json::from_slice(body).ok()?;
            let (ids, more) = s
                .sessions
                .connected(q.after.as_deref(), q.limit.min(MAX_IDS));
            serde_json::to_vec(&Connected { ids, more }).ok()
        }),
    );
}

/// The first `limit` ids of every node's answer, merged in id order, and
/// whether any node has more.
fn merge(answers: impl IntoIterator<Item = Connected>, limit: usize) -> (Vec<DeviceId>, bool) {
    let mut ids = BTreeSet::new();
    let mut more = false;
    for a in answers {
        more |= a.more;
        ids.extend(a.ids);
    }
    more |= ids.len() > limit;
    (ids.into_iter().take(limit).collect(), more)
}

impl Broker {
    /// The live sessions of `ids` on every node that answered (this one
    /// at least), each with its node.
    pub async fn sessions_anywhere(&self, ids: &[DeviceId]) -> Vec<(DeviceId, NodeSession)> {
        let mut out: Vec<(DeviceId, NodeSession)> = held(&self.shared, ids)
            .into_iter()
            .map(|h| (h.id, h.session))
            .collect();
        let Some(bus) = &self.shared.cfg.bus else {
            return out;
        };
        let body = serde_json::to_vec(&ids[..ids.len().min(MAX_IDS)]).unwrap_or_default();
        match bus.ask("sessions", body, WAIT, QUIET).await {
            Ok(answers) => {
                for a in answers {
                    let held: Vec<Held> = serde_json::from_slice(&a.body).unwrap_or_default();
                    out.extend(held.into_iter().map(|h| (h.id, h.session)));
                }
            }
            Err(e) => tracing::warn!(error = %e, "console: the other nodes could not be asked"),
        }
        out
    }

    /// Up to `limit` ids connected to any node that answered, in id order,
    /// after `after`; and whether there are more.
    pub async fn connected_anywhere(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> (Vec<DeviceId>, bool) {
        let limit = limit.min(MAX_IDS);
        let (ids, more) = self.shared.sessions.connected(after, limit);
        let mut all = vec![Connected { ids, more }];
        if let Some(bus) = &self.shared.cfg.bus {
            let q = ConnectedAfter {
                after: after.map(str::to_owned),
                limit,
            };
            let body = serde_json::to_vec(&q).unwrap_or_default();
            match bus.ask("connected", body, WAIT, QUIET).await {
                Ok(answers) => all.extend(
                    answers
                        .iter()
                        .filter_map(|a| serde_json::from_slice(&a.body).ok()),
                ),
                Err(e) => tracing::warn!(error = %e, "console: the other nodes could not be asked"),
            }
        }
        merge(all, limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[&str]) -> Vec<DeviceId> {
        v.iter().map(|s| DeviceId::try_new(*s).unwrap()).collect()
    }

    #[test]
    fn every_nodes_first_ids_merge_into_the_first_of_all() {
        let a = Connected {
            ids: ids(&["a", "c", "e"]),
            more: true,
        };
        let b = Connected {
            ids: ids(&["b", "c", "d"]),
            more: false,
        };
        assert_eq!(merge([a, b], 3), (ids(&["a", "b", "c"]), true));
        let a = Connected {
            ids: ids(&["a"]),
            more: false,
        };
        assert_eq!(merge([a, Connected::default()], 3), (ids(&["a"]), false));
    }
}
