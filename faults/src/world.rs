//! What the harness knows of the run's processes at each moment (which
//! are down, paused, cut off from which), and from that, when each node
//! could reach a majority of etcd: the contact spans the checker reads.
//! Pure.

use std::collections::BTreeSet;

use crate::history::{Ms, Span};

/// The processes' state at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct State {
    /// Killed, or found not running.
    pub down: BTreeSet<String>,
    pub paused: BTreeSet<String>,
    /// Pairs cut off from each other, the smaller name first.
    pub cut: BTreeSet<(String, String)>,
}

fn pair(a: &str, b: &str) -> (String, String) {
    if a <= b {
        (a.to_owned(), b.to_owned())
    } else {
        (b.to_owned(), a.to_owned())
    }
}

impl State {
    pub fn up(&self, p: &str) -> bool {
        !self.down.contains(p) && !self.paused.contains(p)
    }

    pub fn linked(&self, a: &str, b: &str) -> bool {
        !self.cut.contains(&pair(a, b))
    }

    pub fn cut(&mut self, a: &str, b: &str) {
        self.cut.insert(pair(a, b));
    }

    pub fn join(&mut self, a: &str, b: &str) {
        self.cut.remove(&pair(a, b));
    }

    /// Whether `node` runs and reaches a member of a majority of `etcd`
    /// (members up and joined to each other): then its requests and its
    /// watch can be served by a leader.
    pub fn contact(&self, node: &str, etcd: &[String]) -> bool {
        if !self.up(node) {
            return false;
        }
        let quorum = etcd.len() / 2 + 1;
        // The largest group of members up and joined pairwise that the
        // node reaches one of; three members: try every subset.
        let n = etcd.len();
        (0u32..1 << n).any(|mask| {
            let group: Vec<&String> = (0..n)
                .filter(|i| mask & (1 << i) != 0)
                .map(|i| &etcd[i])
                .collect();
            group.len() >= quorum
                && group.iter().all(|m| self.up(m))
                && group
                    .iter()
                    .enumerate()
                    .all(|(i, a)| group[i + 1..].iter().all(|b| self.linked(a, b)))
                && group.iter().any(|m| self.linked(node, m))
        })
    }
}

/// The spans in which `node` was in contact, from the states the run went
/// through (`changes`: each state from its time on, in time order) up to
/// `end`.
pub fn contact_spans(changes: &[(Ms, State)], end: Ms, node: &str, etcd: &[String]) -> Vec<Span> {
    let mut spans: Vec<Span> = Vec::new();
    for (i, (at, state)) in changes.iter().enumerate() {
        let to = changes.get(i + 1).map_or(end, |(t, _)| *t);
        if !state.contact(node, etcd) || to < *at {
            continue;
        }
        match spans.last_mut() {
            Some(last) if last.to == *at => last.to = to,
            _ => spans.push(Span { from: *at, to }),
        }
    }
    spans
}

#[cfg(test)]
mod tests {
    use super::*;

    fn etcd() -> Vec<String> {
        (0..3).map(|i| format!("etcd-{i}")).collect()
    }

    #[test]
    fn a_node_needs_a_majority_joined_together_and_one_of_it_in_reach() {
        let e = etcd();
        let mut s = State::default();
        assert!(s.contact("node-0", &e));
        // One member down, or cut from the node: the other two serve.
        s.down.insert("etcd-0".into());
        assert!(s.contact("node-0", &e));
        s.cut("node-0", "etcd-1");
        assert!(s.contact("node-0", &e), "etcd-2 is reached");
        s.cut("node-0", "etcd-2");
        assert!(!s.contact("node-0", &e));
        // Two members up but cut from each other: no majority.
        let mut s = State::default();
        s.paused.insert("etcd-2".into());
        s.cut("etcd-0", "etcd-1");
        assert!(!s.contact("node-0", &e));
        s.join("etcd-1", "etcd-0");
        assert!(s.contact("node-0", &e));
        // A node down or paused has no contact.
        s.paused.insert("node-0".into());
        assert!(!s.contact("node-0", &e));
    }

    #[test]
    fn spans_join_across_states_that_keep_contact() {
        let e = etcd();
        let ok = State::default();
        let mut one_down = State::default();
        one_down.down.insert("etcd-1".into());
        let mut cut = State::default();
        cut.cut("node-0", "etcd-0");
        cut.cut("node-0", "etcd-1");
        cut.cut("node-0", "etcd-2");
        let changes = vec![(0, ok.clone()), (10, one_down), (20, cut), (35, ok)];
        assert_eq!(
            contact_spans(&changes, 50, "node-0", &e),
            vec![Span { from: 0, to: 20 }, Span { from: 35, to: 50 }]
        );
        assert_eq!(
            contact_spans(&changes, 50, "node-1", &e),
            vec![Span { from: 0, to: 50 }]
        );
    }
}
