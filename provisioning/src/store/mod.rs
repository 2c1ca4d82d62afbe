//! The registry's storage seam: named key spaces of bytes, read one key or
//! a range at a time, written by atomic commits that hold only if what the
//! writer read is still there (compare-and-swap), plus global counters.
//! A commit may also append: values numbered by a counter as they commit
//! (the audit log), so the number costs the writer no round trip of its own.
//! [`SledStore`] is the embedded default; a shared store (etcd) lets
//! several nodes hold one registry.
//!
//! [`Txn`] is the registry's unit of work over a store: reads go through
//! (and are remembered), writes are buffered and read back, and the commit
//! applies them only if every remembered read still holds; on a conflict
//! the registry runs the work again.

use std::cell::RefCell;
use std::collections::BTreeMap;

use crate::Error;

mod sled_store;

pub use sled_store::SledStore;

/// The registry's key spaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Space {
    Devices,
    Certs,
    Fingerprints,
    ByStatus,
    Audit,
    Meta,
    Manufacturers,
    Claims,
    Challenges,
    /// The audit log by device: `<device id>\0<number>`, empty values.
    AuditByDevice,
    /// Certificates a CRL lists (revoked, or their device not active):
    /// their keys, empty values.
    Listed,
    /// The console's login links and sessions, so that every node of a
    /// cluster honours them: a token's digest -> until when, and what the
    /// console sealed.
    Console,
    /// Each certificate as issued (DER), by its key: what an operator
    /// downloads. Admission never reads it.
    CertDer,
    /// Devices in the order people read ids, all and by status
    /// (`registry::sorted`).
    Sorted,
    /// Certificates not revoked, by when they expire (`registry::sorted`).
    Expiring,
    /// When each device was last seen connecting or leaving, by id (8
    /// bytes, big-endian Unix seconds): advisory, written in batches.
    Seen,
}

impl Space {
    pub const ALL: [Space; 16] = [
        Self::Devices,
        Self::Certs,
        Self::Fingerprints,
        Self::ByStatus,
        Self::Audit,
        Self::Meta,
        Self::Manufacturers,
        Self::Claims,
        Self::Challenges,
        Self::AuditByDevice,
        Self::Listed,
        Self::Console,
        Self::CertDer,
        Self::Sorted,
        Self::Expiring,
        Self::Seen,
    ];

    /// Its name in the store.
    pub fn name(self) -> &'static str {
        match self {
            Self::Devices => "devices",
            Self::Certs => "certs",
            Self::Fingerprints => "fingerprints",
            Self::ByStatus => "by_status",
            Self::Audit => "audit",
            Self::Meta => "meta",
            Self::Manufacturers => "manufacturers",
            Self::Claims => "claims",
            Self::Challenges => "challenges",
            Self::AuditByDevice => "audit_by_device",
            Self::Listed => "listed",
            Self::Console => "console",
            Self::CertDer => "cert_der",
            Self::Sorted => "sorted",
            Self::Expiring => "expiring",
            Self::Seen => "seen",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A key and its value.
pub type Kv = (Vec<u8>, Vec<u8>);

/// Entries of a scan, in key order.
pub type Entries<'a> = Box<dyn Iterator<Item = Result<Kv, Error>> + 'a>;

/// A transaction's reads or writes by key (`None`: absent, or deleted).
type ByKey = RefCell<BTreeMap<(Space, Vec<u8>), Option<Vec<u8>>>>;

/// What a transaction read: the commit holds only if it still holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Read {
    pub space: Space,
    pub key: Vec<u8>,
    /// `None`: the key was absent.
    pub value: Option<Vec<u8>>,
}

/// A value a commit numbers: it goes in under the next number of the
/// counter `counter` (the key is the number, 8 bytes big-endian), and
/// `value` makes it from its number. The numbers a commit takes increase
/// in its order, after every number an earlier commit took.
pub struct Append {
    pub space: Space,
    pub counter: &'static str,
    pub value: Box<dyn Fn(u64) -> Vec<u8> + Send + Sync>,
    /// An index entry to write with it, empty, at this prefix followed by
    /// the number: `(space, prefix)`.
    pub index: Option<(Space, Vec<u8>)>,
}

impl Append {
    /// The index entry's key for the number `n`, if there is one.
    pub fn index_key(&self, n: u64) -> Option<(Space, Vec<u8>)> {
        self.index.as_ref().map(|(space, prefix)| {
            let mut key = prefix.clone();
            key.extend_from_slice(&n.to_be_bytes());
            (*space, key)
        })
    }
}

impl std::fmt::Debug for Append {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Append")
            .field("space", &self.space)
            .field("counter", &self.counter)
            .finish_non_exhaustive()
    }
}

/// What a transaction commits: the values it read, to check, what it
/// writes, and what it appends.
#[derive(Debug, Default)]
pub struct Commit {
    pub reads: Vec<Read>,
    pub writes: Vec<Write>,
    pub appends: Vec<Append>,
}

impl Commit {
    /// Writes only, checking nothing.
    pub fn writes(writes: Vec<Write>) -> Self {
        Self {
            writes,
            ..Self::default()
        }
    }
}

/// What a transaction writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Write {
    pub space: Space,
    pub key: Vec<u8>,
    /// `None`: delete the key.
    pub value: Option<Vec<u8>>,
}

/// Where the registry keeps its records.
pub trait Store: Send + Sync + std::fmt::Debug {
    fn get(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>, Error>;

    /// A read for a decision that may rest on this node's recent view of
    /// the store (admission): a shared store may answer from what its
    /// change stream keeps current instead of asking the cluster. A local
    /// store has one view, and answers as [`Store::get`].
    fn get_recent(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        self.get(space, key)
    }

    /// A read for a transaction whose commit compares what it read (see
    /// [`Txn::optimistic`]): it may be a guess, at no cost to
    /// correctness, only to a run more when wrong. By default
    /// [`Store::get_recent`]; a shared store answers from its view, and a
    /// key its view does not hold as absent (a new device's keys), with
    /// no round trip.
    fn get_optimistic(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        self.get_recent(space, key)
    }

    /// Whether a read may wait on the network (a shared store): callers on
    /// an async runtime then read from the blocking pool.
    fn may_block(&self) -> bool {
        false
    }

    /// The entries of `space` whose keys start with `prefix`, from `start`
    /// on (inclusive; empty for the first), in key order.
    fn scan<'a>(&'a self, space: Space, prefix: &[u8], start: &[u8]) -> Entries<'a>;

    /// [`Store::scan`] for reads that may rest on this node's recent view
    /// (see [`Store::get_recent`]): a shared store whose view holds the
    /// whole space ([`Store::warm`]) reads it there, not from the cluster.
    fn scan_recent<'a>(&'a self, space: Space, prefix: &[u8], start: &[u8]) -> Entries<'a> {
        self.scan(space, prefix, start)
    }

    /// The entries of `space` from `start` (inclusive) to `end`
    /// (exclusive), in key order: a scan that tells the store where it
    /// stops (etcd counts every key of a range it is asked for).
    fn scan_between<'a>(&'a self, space: Space, start: &[u8], end: &[u8]) -> Entries<'a> {
        let end = end.to_vec();
        Box::new(
            self.scan(space, b"", start)
                .take_while(move |kv| kv.as_ref().map_or(true, |(k, _)| *k < end)),
        )
    }

    /// The entries of `space` whose keys start with `prefix` and come
    /// before `before` (exclusive; empty: no bound), last key first.
    fn scan_rev<'a>(&'a self, space: Space, prefix: &[u8], before: &[u8]) -> Entries<'a>;

    /// How many entries `space` holds.
    fn len(&self, space: Space) -> Result<usize, Error>;

    /// Reads `space` once so that later random reads of it are local (a
    /// node's first minutes after a start, when its whole fleet
    /// reconnects): how many entries. A local store reads them into its
    /// page cache, which bounds itself; a shared store keeps them in its
    /// view, up to about `budget` bytes.
    fn warm(&self, space: Space, budget: u64) -> Result<usize, Error> {
        let _ = budget;
        let mut n = 0;
        for kv in self.scan(space, b"", b"") {
            kv?;
            n += 1;
        }
        Ok(n)
    }

    /// Applies the commit's writes and appends atomically if every one of
    /// its reads still holds; `Ok(false)` (nothing written) if one does
    /// not. Durable on return.
    fn commit(&self, c: Commit) -> Result<bool, Error>;

    /// [`Store::commit`], not yet durable: [`Store::flush`] before
    /// acknowledging anything (a batch shares one flush).
    fn commit_unflushed(&self, c: Commit) -> Result<bool, Error>;

    /// The next value of the counter `name`, increasing across every user
    /// of the store.
    fn next(&self, name: &str) -> Result<u64, Error>;

    /// The number [`Store::commit`] last gave an append under `counter`,
    /// where the store keeps it (`None`: it does not, or has given none):
    /// where a scan of the numbered values, newest first, starts.
    fn last_appended(&self, _counter: &str) -> Result<Option<u64>, Error> {
        Ok(None)
    }

    fn flush(&self) -> Result<(), Error>;

    /// The most writes one commit may carry (etcd bounds a transaction's
    /// operations); unbounded by default.
    fn max_writes(&self) -> usize {
        usize::MAX
    }
}

/// The first key after every key that starts with `prefix` (`None`: no
/// such key, the prefix is all 0xff or empty).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// A store read through [`Store::get_recent`], for decisions that only
/// read (see `Registry::recent`). It commits nothing.
#[derive(Debug)]
pub struct Recent(pub std::sync::Arc<dyn Store>);

impl Recent {
    fn read_only<T>(&self) -> Result<T, Error> {
        Err(Error::Storage(
            "a registry read from the node's recent view writes nothing".into(),
        ))
    }
}

impl Store for Recent {
    fn get(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        self.0.get_recent(space, key)
    }

    fn may_block(&self) -> bool {
        self.0.may_block()
    }

    fn scan<'a>(&'a self, space: Space, prefix: &[u8], start: &[u8]) -> Entries<'a> {
        self.0.scan_recent(space, prefix, start)
    }

    fn scan_rev<'a>(&'a self, space: Space, prefix: &[u8], before: &[u8]) -> Entries<'a> {
        self.0.scan_rev(space, prefix, before)
    }

    fn scan_between<'a>(&'a self, space: Space, start: &[u8], end: &[u8]) -> Entries<'a> {
        self.0.scan_between(space, start, end)
    }

    fn len(&self, space: Space) -> Result<usize, Error> {
        self.0.len(space)
    }

    fn commit(&self, _: Commit) -> Result<bool, Error> {
        self.read_only()
    }

    fn commit_unflushed(&self, _: Commit) -> Result<bool, Error> {
        self.read_only()
    }

    fn next(&self, _: &str) -> Result<u64, Error> {
        self.read_only()
    }

    fn last_appended(&self, counter: &str) -> Result<Option<u64>, Error> {
        self.0.last_appended(counter)
    }

    fn flush(&self) -> Result<(), Error> {
        Ok(())
    }
}

/// One unit of work over a store (see the module doc). Not `Sync`: one
/// thread runs it.
#[derive(Debug)]
pub struct Txn<'s> {
    store: &'s dyn Store,
    reads: ByKey,
    writes: ByKey,
    appends: RefCell<Vec<Append>>,
    /// Reads go to [`Store::get_optimistic`].
    optimistic: bool,
}

impl<'s> Txn<'s> {
    pub fn new(store: &'s dyn Store) -> Self {
        Self {
            store,
            reads: RefCell::default(),
            writes: RefCell::default(),
            appends: RefCell::default(),
            optimistic: false,
        }
    }

    /// A transaction that reads through [`Store::get_optimistic`] (a
    /// shared store's view of it on this node, or a guess): its commit
    /// holds only if what it read was the store's value. What it would
    /// answer without committing (a refusal, a read) must be read again
    /// through [`Txn::new`].
    pub fn optimistic(store: &'s dyn Store) -> Self {
        Self {
            optimistic: true,
            ..Self::new(store)
        }
    }

    /// Whether the commit would write or append anything.
    pub fn writes_anything(&self) -> bool {
        !self.writes.borrow().is_empty() || !self.appends.borrow().is_empty()
    }

    /// The value of `key`: this transaction's own write if any, else the
    /// store's (remembered for the commit's check).
    pub fn get(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        let k = (space, key.to_vec());
        if let Some(w) = self.writes.borrow().get(&k) {
            return Ok(w.clone());
        }
        if let Some(r) = self.reads.borrow().get(&k) {
            return Ok(r.clone());
        }
        let v = if self.optimistic {
            self.store.get_optimistic(space, key)?
        } else {
            self.store.get(space, key)?
        };
        self.reads.borrow_mut().insert(k, v.clone());
        Ok(v)
    }

    pub fn insert(&self, space: Space, key: &[u8], value: &[u8]) {
        self.writes
            .borrow_mut()
            .insert((space, key.to_vec()), Some(value.to_vec()));
    }

    pub fn remove(&self, space: Space, key: &[u8]) {
        self.writes.borrow_mut().insert((space, key.to_vec()), None);
    }

    /// Appends a value numbered by `counter` at the commit, and an empty
    /// entry at `index`'s prefix and the number if given (see [`Append`]);
    /// not read back by this transaction.
    pub fn append(
        &self,
        space: Space,
        counter: &'static str,
        value: impl Fn(u64) -> Vec<u8> + Send + Sync + 'static,
        index: Option<(Space, Vec<u8>)>,
    ) {
        self.appends.borrow_mut().push(Append {
            space,
            counter,
            value: Box::new(value),
            index,
        });
    }

    /// Commits: whether it held (see [`Store::commit`]).
    pub fn commit(self, durable: bool) -> Result<bool, Error> {
        let reads: Vec<Read> = self
            .reads
            .into_inner()
            .into_iter()
            .map(|((space, key), value)| Read { space, key, value })
            .collect();
        let writes: Vec<Write> = self
            .writes
            .into_inner()
            .into_iter()
            .map(|((space, key), value)| Write { space, key, value })
            .collect();
        let appends = self.appends.into_inner();
        if writes.is_empty() && appends.is_empty() {
            return Ok(true);
        }
        let c = Commit {
            reads,
            writes,
            appends,
        };
        if durable {
            self.store.commit(c)
        } else {
            self.store.commit_unflushed(c)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, SledStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(&dir.path().join("db")).unwrap();
        (dir, s)
    }

    #[test]
    fn a_commit_holds_only_if_what_was_read_still_is() {
        let (_d, s) = store();
        let a = Txn::new(&s);
        assert_eq!(a.get(Space::Devices, b"d").unwrap(), None);
        a.insert(Space::Devices, b"d", b"first");
        // Reads its own write.
        assert_eq!(
            a.get(Space::Devices, b"d").unwrap().as_deref(),
            Some(&b"first"[..])
        );
        // Another writer gets there first.
        let b = Txn::new(&s);
        assert_eq!(b.get(Space::Devices, b"d").unwrap(), None);
        b.insert(Space::Devices, b"d", b"second");
        assert!(b.commit(true).unwrap());
        assert!(
            !a.commit(true).unwrap(),
            "a read an absent key that is now there"
        );
        assert_eq!(
            s.get(Space::Devices, b"d").unwrap().as_deref(),
            Some(&b"second"[..])
        );
        // A delete, and a scan by prefix from a start.
        let c = Txn::new(&s);
        for k in ["p/1", "p/2", "p/3", "q/1"] {
            c.insert(Space::ByStatus, k.as_bytes(), b"");
        }
        c.remove(Space::Devices, b"d");
        assert!(c.commit(true).unwrap());
        assert_eq!(s.get(Space::Devices, b"d").unwrap(), None);
        let keys: Vec<Vec<u8>> = s
            .scan(Space::ByStatus, b"p/", b"p/2")
            .map(|kv| kv.unwrap().0)
            .collect();
        assert_eq!(keys, [b"p/2".to_vec(), b"p/3".to_vec()]);
        assert_eq!(s.len(Space::ByStatus).unwrap(), 4);
    }

    #[test]
    fn counters_increase() {
        let (_d, s) = store();
        let a = s.next("audit").unwrap();
        let b = s.next("audit").unwrap();
        assert!(b > a);
    }
}
