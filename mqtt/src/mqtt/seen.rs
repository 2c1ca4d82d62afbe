//! When this node's devices were last seen (connected or left), noted in
//! memory as it happens and written to the registry in batches
//! ([`provisioning::Registry::record_seen`]): every [`INTERVAL`] and when
//! the node stops. What is noted but not yet written answers too, so this
//! node's console is never behind its own devices.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use provisioning::DeviceId;
use time::OffsetDateTime;

/// How often what was noted is written.
pub const INTERVAL: Duration = Duration::from_secs(30);

/// Devices seen since the last write, and when.
#[derive(Debug, Default)]
pub(crate) struct Seen {
    pending: Mutex<HashMap<DeviceId, OffsetDateTime>>,
}

impl Seen {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<DeviceId, OffsetDateTime>> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `id` was seen now.
    pub(crate) fn note(&self, id: &DeviceId) {
        self.lock().insert(id.clone(), OffsetDateTime::now_utc());
    }

    /// What was noted since the last call.
    pub(crate) fn take(&self) -> Vec<(DeviceId, OffsetDateTime)> {
        std::mem::take(&mut *self.lock()).into_iter().collect()
    }

    /// What is noted of `id` and not yet written.
    pub(crate) fn pending(&self, id: &DeviceId) -> Option<OffsetDateTime> {
        self.lock().get(id).copied()
    }

    /// Puts back what could not be written, unless newer was noted since.
    pub(crate) fn put_back(&self, seen: Vec<(DeviceId, OffsetDateTime)>) {
        let mut map = self.lock();
        for (id, at) in seen {
            map.entry(id).or_insert(at);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noted_taken_and_put_back_without_losing_newer() {
        let s = Seen::default();
        let a = DeviceId::try_new("a").unwrap();
        s.note(&a);
        let first = s.pending(&a).unwrap();
        let taken = s.take();
        assert_eq!(taken, [(a.clone(), first)]);
        assert!(s.pending(&a).is_none());
        s.note(&a);
        let newer = s.pending(&a).unwrap();
        s.put_back(taken);
        assert_eq!(s.pending(&a), Some(newer), "the newer note kept");
    }
}
