//! This node's view of the keys admission reads: what it read or wrote,
//! each with the etcd revision its value is from, kept current by the
//! watch; whole spaces once a warm-up filled them (`Store::warm`).

use std::collections::HashMap;

use provisioning::store::{Space, Write};

use super::pb::etcdserverpb::WatchRequest;

/// A key's value (`None`: absent) and the etcd revision it is from.
pub(crate) type Known = (u64, Option<Vec<u8>>);

/// What this node knows of the keys admission reads.
#[derive(Debug, Default)]
pub(crate) struct View {
    /// Keys read or written here, with their value (`None`: absent) and
    /// the etcd revision it is from.
    pub(crate) keys: HashMap<(Space, Vec<u8>), Known>,
    /// The last revision the watch applied (or opened at).
    pub(crate) watched: u64,
    /// A watch stream is open: every change reaches `keys` as it commits.
    pub(crate) live: bool,
    /// When the open watch stream opened ([`now_ms`]).
    pub(crate) opened_ms: u64,
    /// Heartbeats the watch has not caught up with yet: when each was
    /// sent, and the majority's revision it read.
    pub(crate) pending: Vec<(u64, u64)>,
    /// When the view was last known to hold every change a majority of
    /// etcd had then ([`now_ms`]; 0: never): a heartbeat's revision that
    /// the watch has reached. A watch on a member cut off from the
    /// majority stays open and quiet; heartbeats answered by the others
    /// did not make its view current (the fault harness, issue 30: a
    /// node admitted a device revoked 3 s before).
    pub(crate) current_ms: u64,
    /// When the latest heartbeat a majority answered was sent: the view
    /// serves only while it has caught up with that one too.
    pub(crate) latest_ms: u64,
    /// Asks the open watch stream for its member's revision (etcd's
    /// progress request).
    pub(crate) progress: Option<tokio::sync::mpsc::UnboundedSender<WatchRequest>>,
    /// A watch was asked for ([`EtcdStore::watch`]).
    pub(crate) watching: bool,
    /// Spaces the view holds every key of, or is being filled with
    /// ([`Store::warm`]): their keys in order, for scans from the view.
    pub(crate) whole: HashMap<Space, Whole>,
}

/// A space the view holds whole, or is being filled with.
#[derive(Debug, Default)]
pub(crate) struct Whole {
    /// Its keys, in order (a deleted key stays, its value `None`).
    pub(crate) keys: std::collections::BTreeSet<Vec<u8>>,
    /// Being filled: the watch's revision when the filling began. Every
    /// change the watch brings from then on goes into the view, so a page
    /// read at that revision or later misses nothing.
    pub(crate) filling: Option<u64>,
}

impl View {
    /// What a read or a commit at revision `rev` saw, unless the view
    /// knows a later value. A key not yet in the view goes in only if the
    /// watch has applied nothing after `rev`: else a change to it that
    /// the watch passed over (the key was not in the view then) could be
    /// newer than what was read.
    pub(crate) fn saw(&mut self, space: Space, key: &[u8], rev: u64, value: Option<Vec<u8>>) {
        match self.keys.get_mut(&(space, key.to_vec())) {
            Some(known) if known.0 < rev => *known = (rev, value),
            Some(_) => {}
            None if self.watched <= rev => self.insert(space, key, rev, value),
            None => {}
        }
    }

    /// A key new to the view (its spaces held whole list it too).
    pub(crate) fn insert(&mut self, space: Space, key: &[u8], rev: u64, value: Option<Vec<u8>>) {
        if let Some(whole) = self.whole.get_mut(&space) {
            whole.keys.insert(key.to_vec());
        }
        self.keys.insert((space, key.to_vec()), (rev, value));
    }

    /// Begins holding `space` whole: every key the view has of it, and
    /// from now on every change the watch brings. `false` if it is
    /// already (or being) held whole.
    pub(crate) fn begin_whole(&mut self, space: Space) -> bool {
        if self.whole.contains_key(&space) {
            return false;
        }
        let keys = self
            .keys
            .keys()
            .filter(|(s, _)| *s == space)
            .map(|(_, k)| k.clone())
            .collect();
        let filling = Some(self.watched);
        self.whole.insert(space, Whole { keys, filling });
        true
    }

    /// What a warm-up's page read at `rev` saw of `key` in a space being
    /// filled: `false` if the page is too old to fill from (the filling
    /// then stops).
    pub(crate) fn filled(&mut self, space: Space, key: &[u8], rev: u64, value: Vec<u8>) -> bool {
        let since = self.whole.get(&space).and_then(|w| w.filling);
        match self.keys.get_mut(&(space, key.to_vec())) {
            Some(known) => {
                if known.0 < rev {
                    *known = (rev, Some(value));
                }
                true
            }
            // Absent, and every change since the filling began is in the
            // view: nothing changed it between `rev` and now.
            None if since.is_some_and(|since| since <= rev) => {
                self.insert(space, key, rev, Some(value));
                true
            }
            None => false,
        }
    }

    /// Whether the view holds every key of `space`.
    pub(crate) fn holds_whole(&self, space: Space) -> bool {
        self.whole.get(&space).is_some_and(|w| w.filling.is_none())
    }

    /// Why `value` would take back a revocation the view knows of `key`,
    /// if it would ([`provisioning::integrity`]).
    pub(crate) fn regression(
        &self,
        space: Space,
        key: &[u8],
        value: Option<&[u8]>,
    ) -> Option<String> {
        let (_, known) = self.keys.get(&(space, key.to_vec()))?;
        provisioning::integrity::regression(space, known.as_deref(), value)
    }

    /// The watch has applied everything up to `rev`: the heartbeats it
    /// caught up with make the view current as of when they were sent.
    pub(crate) fn reached(&mut self, rev: u64) {
        self.watched = self.watched.max(rev);
        let watched = self.watched;
        let mut current = self.current_ms;
        self.pending.retain(|&(at, r)| {
            if r <= watched {
                current = current.max(at);
                false
            } else {
                true
            }
        });
        self.current_ms = current;
    }

    /// A heartbeat sent at `at` read the majority's revision `rev`:
    /// whether the view has it already.
    pub(crate) fn heartbeat(&mut self, at: u64, rev: u64) -> bool {
        self.latest_ms = self.latest_ms.max(at);
        self.pending.push((at, rev));
        // A watch that never catches up keeps only the latest few.
        let len = self.pending.len();
        if len > 8 {
            self.pending.drain(..len - 8);
        }
        self.reached(0);
        self.pending.is_empty()
    }

    /// A change the watch brought: kept for keys in the view, unless it
    /// takes back a revocation (then `Err` says why, and the view keeps
    /// what it knew).
    pub(crate) fn changed(&mut self, rev: u64, w: &Write) -> Result<(), String> {
        self.reached(rev);
        if let Some(why) = self.regression(w.space, &w.key, w.value.as_deref()) {
            return Err(why);
        }
        match self.keys.get_mut(&(w.space, w.key.clone())) {
            Some(known) if known.0 < rev => *known = (rev, w.value.clone()),
            Some(_) => {}
            None if self.whole.contains_key(&w.space) => {
                self.insert(w.space, &w.key, rev, w.value.clone());
            }
            None => {}
        }
        Ok(())
    }

    /// The watch opened afresh at `rev` (not resumed): a value read
    /// before it may have changed since, unseen; only later ones stay.
    pub(crate) fn opened(&mut self, rev: u64) {
        self.keys.retain(|_, (r, _)| *r >= rev);
        self.whole.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_view_never_goes_back_to_an_older_value() {
        let mut view = View::default();
        let k = |v: &[u8]| Write {
            space: Space::Certs,
            key: b"c".to_vec(),
            value: Some(v.to_vec()),
        };
        let known = |view: &View| view.keys.get(&(Space::Certs, b"c".to_vec())).cloned();
        // Read at 5: kept.
        view.saw(Space::Certs, b"c", 5, Some(b"good".to_vec()));
        assert_eq!(known(&view), Some((5, Some(b"good".to_vec()))));
        // The watch brings 7; a slower read from 6 arrives after it.
        assert!(view.changed(7, &k(b"revoked")).is_ok());
        view.saw(Space::Certs, b"c", 6, Some(b"good".to_vec()));
        assert_eq!(known(&view), Some((7, Some(b"revoked".to_vec()))));
        // A key the watch passed over (not in the view at 9) is not taken
        // from a read at 8: the watch may have skipped a change to it.
        assert!(view
            .changed(
                9,
                &Write {
                    key: b"other".to_vec(),
                    ..k(b"x")
                },
            )
            .is_ok());
        view.saw(Space::Certs, b"new", 8, None);
        assert!(!view.keys.contains_key(&(Space::Certs, b"new".to_vec())));
        // From a read at 9 or later, it is.
        view.saw(Space::Certs, b"new", 9, None);
        assert!(view.keys.contains_key(&(Space::Certs, b"new".to_vec())));
    }

    #[test]
    fn the_view_keeps_a_revocation_the_store_takes_back() {
        let record = |status: &str, revocation: serde_json::Value| {
            json!({
                "id": "dev-1", "role": "device", "status": status,
                "revocation": revocation, "manufacturer": null,
                "created_at": "2026-12-01T00:00:00Z", "updated_at": "2026-12-01T00:00:00Z",
                "certificates": [],
            })
            .to_string()
            .into_bytes()
        };
        let revoked = record(
            "revoked",
            json!({"reason": "key-compromise", "at": "2026-12-02T00:00:00Z"}),
        );
        let active = record("active", serde_json::Value::Null);
        let mut view = View::default();
        view.saw(Space::Devices, b"dev-1", 5, Some(revoked.clone()));
        let undo = Write {
            space: Space::Devices,
            key: b"dev-1".to_vec(),
            value: Some(active),
        };
        let why = view.changed(6, &undo).err();
        assert!(why.is_some_and(|w| w.contains("revoked device dev-1")));
        let known = view.keys.get(&(Space::Devices, b"dev-1".to_vec())).cloned();
        assert_eq!(known, Some((5, Some(revoked))));
        assert_eq!(view.watched, 6);
    }

    #[test]
    fn the_view_is_current_as_of_the_heartbeats_its_watch_reached() {
        let mut view = View::default();
        // The watch at 5; a heartbeat sent at 100 ms read 5: current.
        view.reached(5);
        assert!(view.heartbeat(100, 5));
        assert_eq!((view.current_ms, view.latest_ms), (100, 100));
        // The next read the majority at 9: behind, until the watch gets
        // there (a change, or a progress answer).
        assert!(!view.heartbeat(1_100, 9));
        assert_eq!((view.current_ms, view.latest_ms), (100, 1_100));
        view.reached(8);
        assert_eq!(view.current_ms, 100);
        view.reached(9);
        assert_eq!(view.current_ms, 1_100);
        // A watch cut off from the majority never gets there; only the
        // latest few heartbeats are kept waiting.
        for i in 0..20 {
            assert!(!view.heartbeat(2_000 + i, 50 + i));
        }
        assert_eq!(view.pending.len(), 8);
        assert_eq!(view.current_ms, 1_100);
        view.reached(100);
        assert_eq!(view.current_ms, 2_019);
        assert!(view.pending.is_empty());
    }

    #[test]
    fn a_space_held_whole_takes_every_change_and_no_page_older_than_its_filling() {
        let mut view = View::default();
        let put = |key: &[u8], value: Option<&[u8]>| Write {
            space: Space::Devices,
            key: key.to_vec(),
            value: value.map(<[u8]>::to_vec),
        };
        view.reached(10);
        view.saw(Space::Devices, b"a", 10, Some(b"1".to_vec()));
        assert!(view.begin_whole(Space::Devices));
        assert!(!view.begin_whole(Space::Devices));
        assert!(!view.holds_whole(Space::Devices));
        // A key the view never read, created while it fills: taken.
        assert!(view.changed(12, &put(b"b", Some(b"2"))).is_ok());
        // A page read at 11 (after the filling began): an absent key is
        // taken; one the watch brought later keeps the later value.
        assert!(view.filled(Space::Devices, b"c", 11, b"3".to_vec()));
        assert!(view.filled(Space::Devices, b"b", 11, b"old".to_vec()));
        assert_eq!(
            view.keys.get(&(Space::Devices, b"b".to_vec())),
            Some(&(12, Some(b"2".to_vec())))
        );
        // A page from before the filling began may miss a change.
        assert!(!view.filled(Space::Devices, b"d", 9, b"4".to_vec()));
        let whole = &view.whole[&Space::Devices];
        let keys: Vec<&[u8]> = whole.keys.iter().map(Vec::as_slice).collect();
        assert_eq!(keys, [b"a", b"b", b"c"]);
        // A watch opened afresh at 12: what was read before goes.
        view.opened(12);
        assert!(view.whole.is_empty());
        assert!(!view.keys.contains_key(&(Space::Devices, b"a".to_vec())));
        assert!(view.keys.contains_key(&(Space::Devices, b"b".to_vec())));
    }
}
