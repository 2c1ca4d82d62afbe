//! Documents the registry keeps whole for every node: what a root ceremony
//! signed (the root's CRL), shared like any record so each node of a
//! cluster serves the newest.

use super::Registry;
use crate::Error;

fn key(name: &str) -> String {
    format!("blob/{name}")
}

impl Registry {
    /// The document called `name`, with the number it was stored under.
    pub fn blob(&self, name: &str) -> Result<Option<(u64, Vec<u8>)>, Error> {
        let k = key(name);
        self.transact(|tx| {
            Ok(tx.meta.get(k.as_bytes())?.and_then(|v| {
                let (n, doc) = v.split_at_checked(8)?;
                Some((u64::from_be_bytes(n.try_into().ok()?), doc.to_vec()))
            }))
        })
    }

    /// Stores `doc` as `name` if `number` is greater than the stored one's:
    /// an older document never replaces a newer one. Returns whether it did.
    pub fn put_blob_if_newer(&self, name: &str, number: u64, doc: &[u8]) -> Result<bool, Error> {
        let k = key(name);
        self.transact(|tx| {
            let current = tx
                .meta
                .get(k.as_bytes())?
                .and_then(|v| v.get(..8).and_then(|n| n.try_into().ok()))
                .map(u64::from_be_bytes);
            if current.is_some_and(|c| c >= number) {
                return Ok(false);
            }
            let mut v = number.to_be_bytes().to_vec();
            v.extend_from_slice(doc);
            tx.meta.insert(k.as_bytes(), v)?;
            Ok(true)
        })
    }
}
