//! Changes to the registry that live connections must react to, as a
//! committed write announces them.

use std::sync::Arc;

use crate::{CertKey, DeviceId, Status};

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
}
