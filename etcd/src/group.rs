//! Group commit: a node's concurrent commits go to etcd together, one
//! transaction per round trip, and their appends take their numbers in it.
//!
//! The first committer to find no transaction of this node's in flight
//! leads: it takes the waiting commits, in arrival order, that touch no
//! key another commit of the batch writes (or write none another reads),
//! sends them as one etcd transaction, and hands each its outcome; the
//! others wait for theirs. Each commit's compares hold only against what
//! was there before the batch, so commits that share a written key go in
//! separate batches, in order.
//!
//! Appends (the audit log): the transaction compares each counter with
//! the value this node last saw and writes the new one, so numbers are
//! dense and follow etcd's order of commits across every node. A batch
//! that does not hold comes back with the counters' values: sent again if
//! a counter moved (another node appended), else each of its commits is
//! sent alone, so one stale read fails only its own commit, which the
//! registry runs again.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use provisioning::store::{Commit, Space};
use provisioning::Error;

use super::pb::etcdserverpb::request_op::Request as Op;
use super::pb::etcdserverpb::response_op::Response;
use super::pb::etcdserverpb::{RangeRequest, RequestOp, TxnRequest};
use super::{counter_value, put_op, revision, viewed, EtcdStore, MAX_TXN_OPS};

/// Bytes of keys and values one batch carries at most (etcd refuses a
/// request over 1.5 MiB by default, `--max-request-bytes`).
const MAX_BATCH_BYTES: usize = 1024 * 1024;

/// How often a batch is sent again while other nodes' appends move a
/// counter under it.
const ATTEMPTS: usize = 16;

/// Commits waiting for this node's next transaction.
#[derive(Default)]
pub(crate) struct Group {
    queue: Mutex<Queue>,
    turn: Condvar,
    /// Each counter's value as this node last saw it (as stored; `None`:
    /// absent). The leader's alone.
    counters: Mutex<HashMap<&'static str, Option<Vec<u8>>>>,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Queue {
    tickets: u64,
    waiting: VecDeque<(u64, Commit)>,
    done: HashMap<u64, Result<bool, Error>>,
    /// A committer is sending a batch.
    leading: bool,
}

/// A leader's batch while it is sent: if the leader's thread unwinds (a
/// panic making an entry), its commits fail and another committer may
/// lead, rather than every committer waiting for ever.
struct Leading<'a> {
    group: &'a Group,
    /// The batch's commits not yet answered.
    tickets: Vec<u64>,
}

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        if self.tickets.is_empty() {
            return;
        }
        let mut q = lock(&self.group.queue);
        for t in self.tickets.drain(..) {
            q.done.insert(
                t,
                Err(Error::Storage(
                    "the commit's batch failed to be sent".into(),
                )),
            );
        }
        q.leading = false;
        self.group.turn.notify_all();
    }
}

/// How one transaction went.
enum Sent {
    Held,
    /// A compare failed; `moved`: a counter had moved.
    Failed {
        moved: bool,
    },
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The same error, for each commit of a batch that met it.
fn again(e: &Error) -> Error {
    match e {
        Error::Unavailable(why) => Error::Unavailable(why.clone()),
        e => Error::Storage(e.to_string()),
    }
}

/// The operations a commit costs in each list of a transaction: compares
/// and writes (a counter's compare and write counted with the first
/// append).
fn ops(c: &Commit) -> (usize, usize) {
    let counters = c
        .appends
        .iter()
        .map(|a| a.counter)
        .collect::<HashSet<_>>()
        .len();
    let indexed = c.appends.iter().filter(|a| a.index.is_some()).count();
    (
        c.reads.len() + counters,
        c.writes.len() + c.appends.len() + indexed + counters,
    )
}

/// About the bytes a commit puts in a request (an append's entry is
/// small; counted at 1 KiB).
fn bytes(c: &Commit) -> usize {
    let value = |v: &Option<Vec<u8>>| v.as_ref().map_or(0, Vec::len);
    c.reads
        .iter()
        .map(|r| r.key.len() + value(&r.value))
        .sum::<usize>()
        + c.writes
            .iter()
            .map(|w| w.key.len() + value(&w.value))
            .sum::<usize>()
        + c.appends.len() * 1024
}

/// The waiting commits that can go in one transaction: in arrival order,
/// each touching no key an earlier one of the batch writes and writing no
/// key an earlier one reads, within etcd's bounds of operations and bytes.
/// The first always goes, whatever its size: etcd's answer is then its
/// own.
fn take_batch(waiting: &mut VecDeque<(u64, Commit)>) -> Vec<(u64, Commit)> {
    let mut read: HashSet<(Space, Vec<u8>)> = HashSet::new();
    let mut written: HashSet<(Space, Vec<u8>)> = HashSet::new();
    let (mut compares, mut writes, mut size) = (0, 0, 0);
    let mut batch = Vec::new();
    let mut left = VecDeque::new();
    while let Some((t, c)) = waiting.pop_front() {
        let (nc, nw) = ops(&c);
        let nb = bytes(&c);
        let key = |space: Space, k: &[u8]| (space, k.to_vec());
        let clash = c
            .reads
            .iter()
            .any(|r| written.contains(&key(r.space, &r.key)))
            || c.writes.iter().any(|w| {
                let k = key(w.space, &w.key);
                written.contains(&k) || read.contains(&k)
            });
        let fits = batch.is_empty()
            || (compares + nc <= MAX_TXN_OPS
                && writes + nw <= MAX_TXN_OPS
                && size + nb <= MAX_BATCH_BYTES);
        if clash || !fits {
            left.push_back((t, c));
            continue;
        }
        compares += nc;
        writes += nw;
        size += nb;
        read.extend(c.reads.iter().map(|r| key(r.space, &r.key)));
        written.extend(c.writes.iter().map(|w| key(w.space, &w.key)));
        batch.push((t, c));
    }
    *waiting = left;
    batch
}

impl EtcdStore {
    /// Commits `c` with whatever else this node commits meanwhile.
    pub(crate) fn commit_grouped(&self, c: Commit) -> Result<bool, Error> {
        let group = &self.group;
        let mut q = lock(&group.queue);
        let ticket = q.tickets;
        q.tickets += 1;
        q.waiting.push_back((ticket, c));
        loop {
            if let Some(out) = q.done.remove(&ticket) {
                return out;
            }
            if q.leading {
                q = group.turn.wait(q).unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            q.leading = true;
            let batch = take_batch(&mut q.waiting);
            drop(q);
            let mut leading = Leading {
                group,
                tickets: batch.iter().map(|(t, _)| *t).collect(),
            };
            let outcomes = self.lead(batch);
            leading.tickets.clear();
            drop(leading);
            q = lock(&group.queue);
            q.done.extend(outcomes);
            q.leading = false;
            group.turn.notify_all();
        }
    }

    /// Sends a batch; each commit's outcome.
    fn lead(&self, batch: Vec<(u64, Commit)>) -> Vec<(u64, Result<bool, Error>)> {
        let all: Vec<&Commit> = batch.iter().map(|(_, c)| c).collect();
        match self.send_settled(&all) {
            Ok(false) if batch.len() > 1 => batch
                .iter()
                .map(|(t, c)| (*t, self.send_settled(&[c])))
                .collect(),
            Ok(held) => batch.iter().map(|(t, _)| (*t, Ok(held))).collect(),
            Err(e) => batch.iter().map(|(t, _)| (*t, Err(again(&e)))).collect(),
        }
    }

    /// Sends `commits` as one transaction until no counter moves under it:
    /// whether it held.
    fn send_settled(&self, commits: &[&Commit]) -> Result<bool, Error> {
        for _ in 0..ATTEMPTS {
            match self.send(commits)? {
                Sent::Held => return Ok(true),
                Sent::Failed { moved: true } => continue,
                Sent::Failed { moved: false } => return Ok(false),
            }
        }
        Ok(false)
    }

    fn send(&self, commits: &[&Commit]) -> Result<Sent, Error> {
        let mut counters = lock(&self.group.counters);
        // The counters these commits append under, read once per node.
        let names: Vec<&'static str> = {
            let mut seen = Vec::new();
            for a in commits.iter().flat_map(|c| &c.appends) {
                if !seen.contains(&a.counter) {
                    seen.push(a.counter);
                }
            }
            seen
        };
        for name in &names {
            if !counters.contains_key(name) {
                let resp = self.range(RangeRequest {
                    key: self.counter_key(name),
                    ..RangeRequest::default()
                })?;
                counters.insert(name, resp.kvs.into_iter().next().map(|kv| kv.value));
            }
        }
        let mut compare = Vec::new();
        for c in commits {
            for r in &c.reads {
                compare.push(self.compare(&self.key(r.space, &r.key), r.value.as_deref()));
            }
        }
        let mut next: BTreeMap<&'static str, u64> = BTreeMap::new();
        for name in &names {
            compare.push(self.compare(&self.counter_key(name), counters[name].as_deref()));
            next.insert(name, counter_value(counters[name].as_deref()));
        }
        let mut success = Vec::new();
        for c in commits {
            success.extend(c.writes.iter().map(|w| self.write_op(w)));
            for a in &c.appends {
                let n = next.get_mut(a.counter).expect("counter read above");
                *n += 1;
                success.push(put_op(self.key(a.space, &n.to_be_bytes()), (a.value)(*n)));
                if let Some((space, key)) = a.index_key(*n) {
                    success.push(put_op(self.key(space, &key), Vec::new()));
                }
            }
        }
        for (name, n) in &next {
            success.push(put_op(self.counter_key(name), n.to_be_bytes().to_vec()));
        }
        let failure = names
            .iter()
            .map(|name| RequestOp {
                request: Some(Op::RequestRange(RangeRequest {
                    key: self.counter_key(name),
                    ..RangeRequest::default()
                })),
            })
            .collect();
        let req = TxnRequest {
            compare,
            success,
            failure,
        };
        let resp = self.call(|m| async move { m.txn(req).await })?;
        if resp.succeeded {
            for (name, n) in next {
                counters.insert(name, Some(n.to_be_bytes().to_vec()));
            }
            drop(counters);
            // This node reads its own writes at once, not when the watch
            // brings them back.
            let rev = revision(resp.header.as_ref());
            let mut view = self.lock_view();
            for w in commits.iter().flat_map(|c| &c.writes) {
                if viewed(w.space) {
                    view.saw(w.space, &w.key, rev, w.value.clone());
                }
            }
            return Ok(Sent::Held);
        }
        let mut moved = false;
        for (name, op) in names.iter().zip(resp.responses) {
            if let Some(Response::ResponseRange(r)) = op.response {
                let now = r.kvs.into_iter().next().map(|kv| kv.value);
                if counters.get(name) != Some(&now) {
                    moved = true;
                    counters.insert(name, now);
                }
            }
        }
        Ok(Sent::Failed { moved })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use provisioning::store::{Append, Read, Write};

    fn commit(reads: &[&str], writes: &[&str], appends: usize) -> Commit {
        Commit {
            reads: reads
                .iter()
                .map(|k| Read {
                    space: Space::Devices,
                    key: k.as_bytes().to_vec(),
                    value: None,
                })
                .collect(),
            writes: writes
                .iter()
                .map(|k| Write {
                    space: Space::Devices,
                    key: k.as_bytes().to_vec(),
                    value: Some(b"v".to_vec()),
                })
                .collect(),
            appends: (0..appends)
                .map(|_| Append {
                    space: Space::Audit,
                    counter: "audit",
                    value: Box::new(|n| n.to_be_bytes().to_vec()),
                    index: None,
                })
                .collect(),
        }
    }

    fn tickets(batch: &[(u64, Commit)]) -> Vec<u64> {
        batch.iter().map(|(t, _)| *t).collect()
    }

    #[test]
    fn commits_on_other_keys_go_together_and_a_clash_waits_its_turn() {
        let mut q: VecDeque<(u64, Commit)> = [
            commit(&["a"], &["a"], 1),
            commit(&["b"], &["b"], 1),
            // Reads what the first writes: the next batch.
            commit(&["a"], &["c"], 1),
            // Writes what the second reads: the next batch.
            commit(&[], &["b"], 0),
            // Two readers of one key go together.
            commit(&["shared"], &["d"], 1),
            commit(&["shared"], &["e"], 1),
        ]
        .into_iter()
        .enumerate()
        .map(|(i, c)| (i as u64, c))
        .collect();
        assert_eq!(tickets(&take_batch(&mut q)), [0, 1, 4, 5]);
        assert_eq!(tickets(&take_batch(&mut q)), [2, 3]);
        assert!(q.is_empty());
    }

    #[test]
    fn a_batch_stays_within_etcds_operations_and_the_first_always_goes() {
        // 40 writes each: three fit in 128 operations, not four.
        let keys: Vec<Vec<String>> = (0..5)
            .map(|c| (0..40).map(|k| format!("{c}/{k}")).collect())
            .collect();
        let mut q: VecDeque<(u64, Commit)> = keys
            .iter()
            .enumerate()
            .map(|(i, ks)| {
                let ks: Vec<&str> = ks.iter().map(String::as_str).collect();
                (i as u64, commit(&[], &ks, 0))
            })
            .collect();
        assert_eq!(tickets(&take_batch(&mut q)), [0, 1, 2]);
        assert_eq!(tickets(&take_batch(&mut q)), [3, 4]);
        // One commit over the bound goes alone, for etcd to refuse.
        let big: Vec<String> = (0..200).map(|k| k.to_string()).collect();
        let big: Vec<&str> = big.iter().map(String::as_str).collect();
        let mut q: VecDeque<(u64, Commit)> =
            [(7, commit(&[], &big, 0)), (8, commit(&[], &["x"], 0))].into();
        assert_eq!(tickets(&take_batch(&mut q)), [7]);
        assert_eq!(tickets(&take_batch(&mut q)), [8]);
    }

    #[test]
    fn a_counter_costs_one_compare_and_one_write_per_commit_however_many_appends() {
        assert_eq!(ops(&commit(&["a", "b"], &["a"], 3)), (3, 5));
        assert_eq!(ops(&commit(&["a"], &["a"], 0)), (1, 1));
    }
}
