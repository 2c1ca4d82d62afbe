//! The embedded store: one sled database, a tree per [`Space`]. Commits
//! are sled transactions across the trees that check the reads first.

use std::path::Path;

use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use super::{Commit, Entries, Space, Store};
use crate::Error;

#[derive(Clone, Debug)]
pub struct SledStore {
    db: sled::Db,
    /// Indexed by [`Space::index`].
    trees: Vec<sled::Tree>,
}

/// How long opening waits for a lock that is being let go.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

impl SledStore {
    /// Opens (or creates) the database at `path`, with sled's page cache
    /// at its default (1 GiB).
    pub fn open(path: &Path) -> Result<Self, Error> {
        Self::open_with(path, None)
    }

    /// Opens (or creates) the database at `path`, its page cache bounded
    /// to `cache_bytes` (sled's default, 1 GiB, if `None`): what the
    /// registry holds in memory beyond its working set.
    pub fn open_with(path: &Path, cache_bytes: Option<u64>) -> Result<Self, Error> {
        // sled holds an exclusive lock on its files while open (and reports
        // a taken one as an `Other` error naming the lock). A registry just
        // closed in this process may hold it a moment longer, until sled's
        // IO threads let go of the file: a short wait, then the refusal.
        let locked = |e: &sled::Error| {
            matches!(e, sled::Error::Io(io)
                if io.kind() == std::io::ErrorKind::WouldBlock
                    || io.to_string().contains("could not acquire lock"))
        };
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        let db = loop {
            let mut config = sled::Config::new()
                .path(path)
                // We flush explicitly before acknowledging; no need for a timer.
                .flush_every_ms(None);
            if let Some(bytes) = cache_bytes {
                config = config.cache_capacity(bytes);
            }
            match config.open() {
                Ok(db) => break db,
                Err(e) if locked(&e) && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) if locked(&e) => {
                    return Err(Error::DataDir {
                        path: path.to_owned(),
                        reason: "another fleetgate is using this data dir (its registry is \
                                 locked); stop it first, or pass another --data-dir"
                            .into(),
                    })
                }
                Err(e) => return Err(Error::from(e)),
            }
        };
        let trees = Space::ALL
            .iter()
            .map(|s| db.open_tree(s.name()))
            .collect::<Result<_, _>>()?;
        Ok(Self { db, trees })
    }

    /// The database, for what lives beside the registry on one node (MQTT
    /// sessions).
    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    fn tree(&self, space: Space) -> &sled::Tree {
        &self.trees[space.index()]
    }

    fn apply(&self, c: Commit) -> Result<bool, Error> {
        let Commit {
            reads,
            writes,
            appends,
        } = c;
        /// A read that no longer holds.
        struct Conflict;
        // Numbered as `next` numbers (a commit that does not hold leaves a
        // gap).
        let appended = appends
            .iter()
            .map(|a| {
                let n = self.next(a.counter)?;
                Ok((a.space, n.to_be_bytes(), (a.value)(n), a.index_key(n)))
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let done = self.trees[..].transaction(|t| {
            for r in &reads {
                let now = t[r.space.index()].get(&r.key)?;
                if now.as_deref() != r.value.as_deref() {
                    return Err(ConflictableTransactionError::Abort(Conflict));
                }
            }
            for w in &writes {
                let tree = &t[w.space.index()];
                match &w.value {
                    Some(v) => tree.insert(w.key.as_slice(), v.as_slice())?,
                    None => tree.remove(w.key.as_slice())?,
                };
            }
            for (space, key, value, index) in &appended {
                t[space.index()].insert(key, value.as_slice())?;
                if let Some((space, key)) = index {
                    t[space.index()].insert(key.as_slice(), &[][..])?;
                }
            }
            Ok(())
        });
        match done {
            Ok(()) => Ok(true),
            Err(TransactionError::Abort(Conflict)) => Ok(false),
            Err(TransactionError::Storage(e)) => Err(Error::from(e)),
        }
    }
}

impl Store for SledStore {
    fn get(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        Ok(self.tree(space).get(key)?.map(|v| v.to_vec()))
    }

    fn scan<'a>(&'a self, space: Space, prefix: &[u8], start: &[u8]) -> Entries<'a> {
        let prefix = prefix.to_vec();
        let from = if start > prefix.as_slice() {
            start.to_vec()
        } else {
            prefix.clone()
        };
        Box::new(
            self.tree(space)
                .range(from..)
                .take_while(move |kv| match kv {
                    Ok((k, _)) => k.starts_with(&prefix),
                    Err(_) => true,
                })
                .map(|kv| {
                    kv.map(|(k, v)| (k.to_vec(), v.to_vec()))
                        .map_err(Error::from)
                }),
        )
    }

    fn scan_rev<'a>(&'a self, space: Space, prefix: &[u8], before: &[u8]) -> Entries<'a> {
        let prefix = prefix.to_vec();
        let tree = self.tree(space);
        let range = if before.is_empty() {
            // Everything under the prefix: up to the first key after it.
            match super::prefix_end(&prefix) {
                Some(end) => tree.range(..end),
                None => tree.range::<&[u8], _>(..),
            }
        } else {
            tree.range(..before.to_vec())
        };
        Box::new(
            range
                .rev()
                .take_while(move |kv| match kv {
                    Ok((k, _)) => k.starts_with(&prefix),
                    Err(_) => true,
                })
                .map(|kv| {
                    kv.map(|(k, v)| (k.to_vec(), v.to_vec()))
                        .map_err(Error::from)
                }),
        )
    }

    fn len(&self, space: Space) -> Result<usize, Error> {
        Ok(self.tree(space).len())
    }

    fn commit(&self, c: Commit) -> Result<bool, Error> {
        let held = self.apply(c)?;
        if held {
            self.db.flush()?;
        }
        Ok(held)
    }

    fn commit_unflushed(&self, c: Commit) -> Result<bool, Error> {
        self.apply(c)
    }

    fn next(&self, _name: &str) -> Result<u64, Error> {
        // One monotonic id generator for the database, as the audit log
        // always used: durable across restarts, never repeated.
        Ok(self.db.generate_id()?)
    }

    fn flush(&self) -> Result<(), Error> {
        self.db.flush()?;
        Ok(())
    }
}
