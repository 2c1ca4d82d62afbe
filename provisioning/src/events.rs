//! What committed writes announce: the registry's change feed. Every
//! write that commits bumps the registry's revision and announces itself
//! once, with the changes live connections must react to (kicks, new trust
//! anchors). The broker's one events follower subscribes; caches compare
//! revisions. On sled the feed is this process's; a shared store feeds it
//! from its own stream of committed changes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::broadcast;

use crate::{CertKey, DeviceId, Status};

/// One committed write.
#[derive(Clone, Debug)]
pub struct Committed {
    /// The registry's revision after it.
    pub revision: u64,
    /// What live connections must do about it (often nothing).
    pub changes: Arc<[Change]>,
    /// When it was announced on this node.
    pub at: std::time::Instant,
}

/// Announcements missed by a follower this far behind are dropped; it
/// then rechecks everything (`RecvError::Lagged`).
const BACKLOG: usize = 4096;

/// The registry's revision and its announcements.
#[derive(Debug)]
pub struct Feed {
    revision: AtomicU64,
    tx: broadcast::Sender<Committed>,
}

impl Default for Feed {
    fn default() -> Self {
        Self {
            revision: AtomicU64::new(0),
            tx: broadcast::channel(BACKLOG).0,
        }
    }
}

impl Feed {
    /// The revision of the last announced write.
    pub fn revision(&self) -> u64 {
        self.revision.load(Ordering::Acquire)
    }

    /// Announcements from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Committed> {
        self.tx.subscribe()
    }

    /// Announces a committed write; returns its revision.
    pub(crate) fn announce(&self, changes: Vec<Change>) -> u64 {
        let revision = self.revision.fetch_add(1, Ordering::AcqRel) + 1;
        // No subscriber is fine: nothing follows yet.
        let _ = self.tx.send(Committed {
            revision,
            changes: changes.into(),
            at: std::time::Instant::now(),
        });
        revision
    }
}

/// A committed change to the registry that live connections must react to.
#[derive(Clone, Debug)]
pub enum Change {
    /// A device is no longer active: every connection of it must close.
    DeviceOut { id: DeviceId, status: Status },
    /// Many devices were revoked at once (one write): their connections
    /// must close.
    DevicesRevoked { ids: Arc<Vec<DeviceId>> },
    /// One certificate was revoked: connections using it must close.
    CertificateRevoked { key: CertKey },
    /// A manufacturer was revoked: its devices' connections must close.
    ManufacturerRevoked { name: String },
    /// Manufacturers changed: trust anchors and OCSP signing units must be
    /// reloaded.
    Manufacturers,
}
