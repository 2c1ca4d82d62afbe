//! When each device was last seen: each node notes its devices' connects
//! and disconnects in memory and writes them here in batches (every 30 s
//! and when it stops). Advisory, for operators: a batch is one commit of
//! plain writes (no read, so no conflict and one round trip on etcd), not
//! flushed on its own; the later of two nodes' batches wins, so a device
//! that moved between nodes within a batch's interval may show the earlier
//! time.

use time::OffsetDateTime;

use super::Registry;
use crate::store::{Space, Txn};
use crate::{DeviceId, Error};

impl Registry {
    /// Records when each device was seen.
    pub fn record_seen(&self, seen: &[(DeviceId, OffsetDateTime)]) -> Result<(), Error> {
        for chunk in seen.chunks(self.store.max_writes().clamp(1, 1000)) {
            let txn = Txn::new(&*self.store);
            for (id, at) in chunk {
                let secs = at.unix_timestamp().max(0) as u64;
                txn.insert(Space::Seen, id.as_str().as_bytes(), &secs.to_be_bytes());
            }
            txn.commit(false)?;
        }
        Ok(())
    }

    /// When `id` was last seen, as recorded.
    pub fn last_seen(&self, id: &DeviceId) -> Result<Option<OffsetDateTime>, Error> {
        let Some(v) = self.store.get(Space::Seen, id.as_str().as_bytes())? else {
            return Ok(None);
        };
        let secs = <[u8; 8]>::try_from(v.as_slice())
            .map_err(|_| Error::Corrupt(format!("last seen of {id}")))?;
        OffsetDateTime::from_unix_timestamp(u64::from_be_bytes(secs) as i64)
            .map(Some)
            .map_err(|e| Error::Corrupt(format!("last seen of {id}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use crate::{Authority, DeviceId, InitOptions};

    #[test]
    fn the_last_time_seen_is_kept_per_device() {
        let tmp = tempfile::tempdir().unwrap();
        let auth = Authority::open_or_init(tmp.path(), &InitOptions::default()).unwrap();
        let r = &auth.registry;
        let a = DeviceId::try_new("seen-a").unwrap();
        let b = DeviceId::try_new("seen-b").unwrap();
        assert_eq!(r.last_seen(&a).unwrap(), None);
        let t1 = time::OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let t2 = t1 + time::Duration::minutes(5);
        let many: Vec<_> = (0..2500)
            .map(|i| (DeviceId::try_new(format!("seen-{i}")).unwrap(), t1))
            .collect();
        r.record_seen(&many).unwrap();
        r.record_seen(&[(a.clone(), t1), (b.clone(), t1)]).unwrap();
        r.record_seen(&[(a.clone(), t2)]).unwrap();
        assert_eq!(r.last_seen(&a).unwrap(), Some(t2));
        assert_eq!(r.last_seen(&b).unwrap(), Some(t1));
        let last = DeviceId::try_new("seen-2499").unwrap();
        assert_eq!(r.last_seen(&last).unwrap(), Some(t1));
    }
}
