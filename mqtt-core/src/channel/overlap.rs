//! Overlapping subscriptions of a service (MQTT 5 3.3.4): rumqttd's router
//! sends one copy of a message for each of a session's filters it matches,
//! each at that filter's granted QoS, and does not say which filter. Each
//! copy must carry the identifier of its own subscription, not of all of
//! them (MQTT-3.3.4-5). [`Overlaps`] gives the copies of one message the
//! matching subscriptions one by one, a copy to a subscription of its
//! QoS first.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

/// A subscription of the session that matches a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Match {
    /// Its MQTT 5 subscription identifier.
    pub id: Option<usize>,
    /// Its granted QoS.
    pub qos: u8,
}

/// Messages whose copies are still coming in, at most this many; past
/// it, the oldest record is forgotten (a copy the router never sent).
const MAX_OPEN: usize = 1024;

/// Which matching subscriptions the copies of a message have had.
#[derive(Debug, Default)]
pub struct Overlaps {
    open: HashMap<u64, Vec<bool>>,
}

/// What identifies one message's copies: its topic and payload.
pub fn key(topic: &[u8], payload: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    topic.hash(&mut h);
    payload.hash(&mut h);
    h.finish()
}

impl Overlaps {
    /// The subscription identifiers for one copy, delivered at `qos`, of
    /// the message `key` names, which `matching` subscriptions match.
    pub fn ids(&mut self, key: u64, matching: &[Match], qos: u8) -> Vec<usize> {
        if matching.len() <= 1 {
            return matching.iter().filter_map(|m| m.id).collect();
        }
        if self.open.len() >= MAX_OPEN && !self.open.contains_key(&key) {
            self.open.clear();
        }
        let used = self
            .open
            .entry(key)
            .or_insert_with(|| vec![false; matching.len()]);
        if used.len() != matching.len() {
            // The session's subscriptions changed meanwhile: start over.
            *used = vec![false; matching.len()];
        }
        let free = |want: Option<u8>| {
            (0..matching.len()).find(|&i| !used[i] && want.is_none_or(|q| matching[i].qos == q))
        };
        let i = free(Some(qos)).or_else(|| free(None)).unwrap_or(0);
        used[i] = true;
        if used.iter().all(|u| *u) {
            self.open.remove(&key);
        }
        matching[i].id.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(id: usize, qos: u8) -> Match {
        Match { id: Some(id), qos }
    }

    #[test]
    fn each_copy_of_an_overlapping_message_carries_its_own_subscriptions_id() {
        let mut o = Overlaps::default();
        let subs = [m(1, 2), m(2, 1)];
        let k = key(b"devices/d/t", b"x");
        // The router's copies come at each filter's QoS, in either order.
        assert_eq!(o.ids(k, &subs, 1), vec![2]);
        assert_eq!(o.ids(k, &subs, 2), vec![1]);
        assert!(o.open.is_empty(), "done with once every copy came");
        assert_eq!(o.ids(k, &subs, 2), vec![1]);
        assert_eq!(o.ids(k, &subs, 1), vec![2]);
    }

    #[test]
    fn copies_of_equal_qos_take_the_subscriptions_in_turn() {
        let mut o = Overlaps::default();
        let subs = [m(7, 1), m(8, 1), m(9, 1)];
        let k = key(b"t", b"p");
        let mut got: Vec<usize> = (0..3).flat_map(|_| o.ids(k, &subs, 1)).collect();
        got.sort();
        assert_eq!(got, vec![7, 8, 9]);
    }

    #[test]
    fn one_matching_subscription_is_just_its_id_and_none_is_nothing() {
        let mut o = Overlaps::default();
        assert_eq!(o.ids(1, &[m(4, 0)], 0), vec![4]);
        assert_eq!(
            o.ids(1, &[Match { id: None, qos: 1 }], 1),
            Vec::<usize>::new()
        );
        assert_eq!(o.ids(1, &[], 1), Vec::<usize>::new());
        assert!(o.open.is_empty());
    }

    #[test]
    fn copies_never_sent_are_forgotten_past_a_bound() {
        let mut o = Overlaps::default();
        let subs = [m(1, 1), m(2, 1)];
        for k in 0..(MAX_OPEN as u64 + 10) {
            o.ids(k, &subs, 1);
        }
        assert!(o.open.len() <= MAX_OPEN);
    }
}
