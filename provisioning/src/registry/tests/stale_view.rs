//! A shared store's first run of a transaction reads this node's recent
//! view ([`Registry::run`]): a stale value there costs a run more, never a
//! wrong write or a wrong refusal. The view is played by a layer over a
//! real sled store that answers `get_recent` for a frozen key with the
//! value it had when frozen.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use super::*;
use crate::store::{Commit, Entries};

/// Values by key, as they were when frozen (`None`: absent).
type Frozen = HashMap<(Space, Vec<u8>), Option<Vec<u8>>>;

#[derive(Debug)]
struct StaleView {
    inner: Arc<dyn Store>,
    frozen: Mutex<Frozen>,
    /// Reads answered from a frozen value.
    stale_reads: AtomicUsize,
}

impl StaleView {
    /// From now on the view answers `key` as it is now.
    fn freeze(&self, space: Space, key: &[u8]) {
        let now = self.inner.get(space, key).unwrap();
        self.frozen
            .lock()
            .unwrap()
            .insert((space, key.to_vec()), now);
    }
}

impl Store for StaleView {
    fn get(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        self.inner.get(space, key)
    }
    fn get_recent(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        if let Some(v) = self.frozen.lock().unwrap().get(&(space, key.to_vec())) {
            self.stale_reads.fetch_add(1, Ordering::Relaxed);
            return Ok(v.clone());
        }
        self.inner.get(space, key)
    }
    /// As a shared store: the registry reads its view first.
    fn may_block(&self) -> bool {
        true
    }
    fn scan<'a>(&'a self, space: Space, prefix: &[u8], start: &[u8]) -> Entries<'a> {
        self.inner.scan(space, prefix, start)
    }
    fn scan_rev<'a>(&'a self, space: Space, prefix: &[u8], before: &[u8]) -> Entries<'a> {
        self.inner.scan_rev(space, prefix, before)
    }
    fn len(&self, space: Space) -> Result<usize, Error> {
        self.inner.len(space)
    }
    fn commit(&self, c: Commit) -> Result<bool, Error> {
        self.inner.commit(c)
    }
    fn commit_unflushed(&self, c: Commit) -> Result<bool, Error> {
        self.inner.commit_unflushed(c)
    }
    fn next(&self, name: &str) -> Result<u64, Error> {
        self.inner.next(name)
    }
    fn flush(&self) -> Result<(), Error> {
        self.inner.flush()
    }
}

/// An authority with `dev-1` enrolled, and a registry over the same
/// store seen through a view that can be made stale.
fn setup() -> (
    tempfile::TempDir,
    Authority,
    Arc<StaleView>,
    Registry,
    DeviceId,
) {
    let tmp = tempfile::tempdir().unwrap();
    let auth = Authority::open_or_init(tmp.path(), &InitOptions::default()).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let (new, cert) = auth
        .issue_new(&key, &device("dev-1"), None, DEFAULT_CERT_LIFETIME)
        .unwrap();
    auth.registry.enroll(&new, &cert, "test").unwrap();
    let view = Arc::new(StaleView {
        inner: auth.registry.store.clone(),
        frozen: Mutex::default(),
        stale_reads: AtomicUsize::new(0),
    });
    let node = Registry::over(view.clone(), auth.registry.sessions.clone()).unwrap();
    (tmp, auth, view, node, DeviceId::try_new("dev-1").unwrap())
}

#[test]
fn a_refusal_from_a_stale_view_is_read_again_before_it_is_answered() {
    let (_tmp, auth, view, node, id) = setup();
    // The view saw dev-1 suspended; another node has resumed it since.
    auth.registry.suspend(&id, "test").unwrap();
    view.freeze(Space::Devices, id.as_str().as_bytes());
    auth.registry.resume(&id, "test").unwrap();

    // From the view alone a suspension would be refused (already
    // suspended); read again, it holds.
    let d = node.suspend(&id, "operator").unwrap();
    assert_eq!(d.status, Status::Suspended);
    assert!(
        view.stale_reads.load(Ordering::Relaxed) > 0,
        "the view was not read"
    );
    // And a refusal that is right stays one.
    assert!(matches!(
        node.suspend(&id, "operator"),
        Err(Error::InvalidTransition { .. })
    ));
}

#[test]
fn a_write_from_a_stale_view_does_not_hold_and_runs_again_on_the_store() {
    let (_tmp, auth, view, node, id) = setup();
    // The view holds dev-1 with one certificate; another node rotated it.
    view.freeze(Space::Devices, id.as_str().as_bytes());
    let key = rcgen::KeyPair::generate().unwrap();
    let (_, cert) = auth
        .issue_new(&key, &device("dev-1"), None, DEFAULT_CERT_LIFETIME)
        .unwrap();
    auth.registry.add_certificate(&id, &cert, "test").unwrap();

    let d = node.suspend(&id, "operator").unwrap();
    assert!(
        view.stale_reads.load(Ordering::Relaxed) > 0,
        "the view was not read"
    );
    // Written from the store's value, not the view's: the rotation's
    // certificate is kept, and suspended with the device.
    assert_eq!(d.certificates.len(), 2);
    let stored = auth.registry.device(&id).unwrap();
    assert_eq!(stored.status, Status::Suspended);
    assert_eq!(stored.certificates.len(), 2);
    for k in &stored.certificates {
        let c = auth.registry.certificate(k).unwrap().unwrap();
        assert_eq!(c.device_status, Status::Suspended);
    }
}
