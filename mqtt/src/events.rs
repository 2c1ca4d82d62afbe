//! The one events follower: every committed registry write, from the
//! store's feed ([`provisioning::events`]), applied to this node. It cuts
//! the live sessions a change takes out and reloads trust anchors and OCSP
//! signing units when manufacturers change. Handlers only write; OCSP and
//! CRL caches compare the registry's revision on every answer.
//!
//! A handler that must not answer before its own write is applied here
//! (the trust anchors a new manufacturer's devices need, the sessions a
//! revocation cuts) waits for [`Applied::caught_up`].

use std::sync::Arc;
use std::time::Duration;

use provisioning::events::{Change, Committed};
use provisioning::Registry;
use tokio::sync::{broadcast, watch};

use crate::mqtt::Broker;
use crate::status::StatusService;
use crate::tls::ServerTls;

/// The revision this node has applied.
#[derive(Clone, Debug)]
pub struct Applied {
    rx: watch::Receiver<u64>,
    registry: Registry,
}

/// How long a handler waits for its write to be applied before it answers
/// anyway (and says so in the log).
const CATCH_UP: Duration = Duration::from_secs(5);

impl Applied {
    /// Waits until every write committed so far is applied on this node.
    pub async fn caught_up(&self) {
        let want = self.registry.revision();
        let mut rx = self.rx.clone();
        let done = tokio::time::timeout(CATCH_UP, rx.wait_for(|r| *r >= want)).await;
        if !matches!(done, Ok(Ok(_))) {
            tracing::warn!(
                revision = want,
                "events: a write was not applied within 5 s; answering anyway"
            );
        }
    }
}

/// Starts following `registry`'s feed; returns the task and its progress.
pub fn spawn(
    registry: Registry,
    broker: Broker,
    tls: Arc<ServerTls>,
    status: Arc<StatusService>,
) -> (tokio::task::JoinHandle<()>, Applied) {
    // Subscribed before anything is written from here on.
    let feed = registry.subscribe();
    let (tx, rx) = watch::channel(registry.revision());
    let applied = Applied {
        rx,
        registry: registry.clone(),
    };
    let task = tokio::spawn(follow(feed, tx, registry, broker, tls, status));
    (task, applied)
}

async fn follow(
    mut feed: broadcast::Receiver<Committed>,
    applied: watch::Sender<u64>,
    registry: Registry,
    broker: Broker,
    tls: Arc<ServerTls>,
    status: Arc<StatusService>,
) {
    loop {
        match feed.recv().await {
            Ok(c) => {
                for change in c.changes.iter() {
                    if matches!(change, Change::Manufacturers) {
                        reload(&tls, &status);
                    }
                    broker.apply(change);
                    if !matches!(change, Change::Manufacturers) {
                        broker.metrics().revocation_apply.observe(c.at.elapsed());
                    }
                }
                applied.send_replace(c.revision);
            }
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                // Whatever was missed: everything that depends on it again.
                tracing::warn!(missed, "events: changes missed; rechecking every session");
                let revision = registry.revision();
                reload(&tls, &status);
                broker.recheck_all();
                applied.send_replace(revision);
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// New trust anchors for the next handshake, new OCSP signing units.
fn reload(tls: &ServerTls, status: &StatusService) {
    if let Err(e) = tls.reload_trust() {
        tracing::error!(error = %e, "events: reloading MQTT trust anchors");
    }
    if let Err(e) = status.reload() {
        tracing::error!(error = %e, "events: reloading the OCSP responder");
    }
}
