//! The console's login links and sessions ("grants"), kept in the registry
//! so that every node sharing it honours them: a link asked for on one node
//! signs in on another, once, and a session works on every node.
//!
//! The registry keeps each grant's lifetime and its bytes, which it does
//! not read: the console seals them (a key only the CA's holders have), so
//! a grant written into the store by anyone else is no grant. Keys are
//! digests of the tokens, never the tokens.
//!
//! Value layout: until when (Unix milliseconds, 8 bytes big-endian), then
//! the console's bytes. A lapsed grant is no grant; lapsed ones are removed
//! as new ones are made.

use crate::store::{Space, Txn};
use crate::Error;

use super::Registry;

/// Lapsed grants removed per new one (one transaction).
const SWEEP: usize = 64;

fn split(v: &[u8]) -> Option<(u64, &[u8])> {
    let (until, rest) = v.split_first_chunk::<8>()?;
    Some((u64::from_be_bytes(*until), rest))
}

fn live(v: Option<&[u8]>, now_ms: u64) -> Option<(u64, Vec<u8>)> {
    v.and_then(split)
        .filter(|(until, _)| *until > now_ms)
        .map(|(until, v)| (until, v.to_vec()))
}

impl Registry {
    /// Keeps `value` under `key` until `until_ms` (Unix milliseconds),
    /// replacing any, and removes grants that lapsed by `now_ms`.
    pub fn put_grant(
        &self,
        key: &[u8],
        until_ms: u64,
        value: &[u8],
        now_ms: u64,
    ) -> Result<(), Error> {
        let lapsed: Vec<Vec<u8>> = self
            .store
            .scan(Space::Console, b"", b"")
            .filter_map(Result::ok)
            .filter(|(k, v)| k != key && split(v).is_none_or(|(until, _)| until <= now_ms))
            .map(|(k, _)| k)
            .take(SWEEP)
            .collect();
        let mut stored = until_ms.to_be_bytes().to_vec();
        stored.extend_from_slice(value);
        self.transact(|tx| {
            for k in &lapsed {
                tx.txn.remove(Space::Console, k);
            }
            tx.txn.insert(Space::Console, key, &stored);
            Ok(())
        })
    }

    /// The grant under `key`, if it is there and has not lapsed by `now_ms`:
    /// until when, and its bytes.
    pub fn grant(&self, key: &[u8], now_ms: u64) -> Result<Option<(u64, Vec<u8>)>, Error> {
        Ok(live(
            self.store.get(Space::Console, key)?.as_deref(),
            now_ms,
        ))
    }

    /// Removes the grant under `key` and returns it if it had not lapsed:
    /// across every node sharing the registry, one caller gets it.
    pub fn take_grant(&self, key: &[u8], now_ms: u64) -> Result<Option<(u64, Vec<u8>)>, Error> {
        self.transact(|tx| {
            let v = tx.txn.get(Space::Console, key)?;
            if v.is_some() {
                tx.txn.remove(Space::Console, key);
            }
            Ok(live(v.as_deref(), now_ms))
        })
    }

    /// Ends the grant under `key`, if there is one.
    pub fn end_grant(&self, key: &[u8]) -> Result<(), Error> {
        let store = &*self.store;
        let txn = Txn::new(store);
        txn.remove(Space::Console, key);
        txn.commit(true).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use crate::registry::Registry;

    fn registry() -> (tempfile::TempDir, Registry) {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::open(&dir.path().join("registry")).unwrap();
        (dir, r)
    }

    #[test]
    fn a_grant_lives_until_its_time_and_is_taken_once() {
        let (_dir, r) = registry();
        r.put_grant(b"link/a", 2_000, b"sealed", 1_000).unwrap();
        assert_eq!(
            r.grant(b"link/a", 1_999).unwrap(),
            Some((2_000, b"sealed".to_vec()))
        );
        assert_eq!(
            r.grant(b"link/a", 2_000).unwrap(),
            None,
            "lapsed at its time"
        );
        assert_eq!(
            r.take_grant(b"link/a", 1_500).unwrap(),
            Some((2_000, b"sealed".to_vec()))
        );
        assert_eq!(r.take_grant(b"link/a", 1_500).unwrap(), None, "once");
        assert_eq!(r.grant(b"link/a", 1_500).unwrap(), None);
    }

    #[test]
    fn a_lapsed_grant_is_not_taken_and_new_grants_sweep_lapsed_ones() {
        let (_dir, r) = registry();
        r.put_grant(b"session/old", 1_000, b"x", 0).unwrap();
        r.put_grant(b"session/live", 9_000, b"y", 0).unwrap();
        assert_eq!(r.take_grant(b"session/old", 1_000).unwrap(), None);
        r.put_grant(b"session/old2", 1_500, b"x", 0).unwrap();
        r.put_grant(b"session/new", 9_000, b"z", 2_000).unwrap();
        let keys: Vec<Vec<u8>> = r
            .store
            .scan(crate::store::Space::Console, b"", b"")
            .map(|e| e.unwrap().0)
            .collect();
        assert_eq!(
            keys,
            vec![b"session/live".to_vec(), b"session/new".to_vec()]
        );
        r.end_grant(b"session/live").unwrap();
        assert_eq!(r.grant(b"session/live", 2_000).unwrap(), None);
    }
}
