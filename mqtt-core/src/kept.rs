//! What belongs to a client rather than to one of its connections: a
//! device's budget of new topics, and a persistent service session's
//! filters. Both outlive a reconnect (or a takeover), so a client cannot
//! refill a quota or escape a cap by connecting again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::quota::TopicBudget;

/// A service's subscription, as fleetgate (not the router) needs it.
#[derive(Debug, Clone, Copy)]
pub struct ServiceSub {
    pub id: Option<usize>,
    /// Retain As Published.
    pub rap: bool,
    /// Its granted QoS.
    pub qos: u8,
    /// No Local (MQTT 5): not the session's own messages.
    pub no_local: bool,
}

/// A session's filters, shared by its connections.
pub type Filters = Arc<Mutex<HashMap<String, ServiceSub>>>;

/// A device's budget, shared by its connections.
pub type Budget = Arc<Mutex<TopicBudget>>;

/// Budgets are looked at for pruning once their number reaches this (and
/// then twice what was left).
const PRUNE_FROM: usize = 1024;

/// The node's clients' budgets and kept filters.
#[derive(Debug, Default)]
pub struct Kept {
    budgets: Mutex<Budgets>,
    filters: Mutex<HashMap<String, Filters>>,
}

#[derive(Debug, Default)]
struct Budgets {
    by_client: HashMap<String, Budget>,
    prune_at: usize,
}

/// A lock, whatever a panic elsewhere left in it.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Kept {
    /// `client`'s budget of new topics: the one its earlier connections
    /// spent from, unless it has refilled since and nobody holds it.
    pub fn budget(&self, client: &str, per_minute: u32, now: Instant) -> Budget {
        let mut b = lock(&self.budgets);
        if let Some(budget) = b.by_client.get(client) {
            return budget.clone();
        }
        if b.by_client.len() >= b.prune_at.max(PRUNE_FROM) {
            // Forgetting a full budget nobody holds changes nothing.
            b.by_client
                .retain(|_, v| Arc::strong_count(v) > 1 || !lock(v).is_full(now));
            b.prune_at = 2 * b.by_client.len();
        }
        let budget = Arc::new(Mutex::new(TopicBudget::new(per_minute)));
        b.by_client.insert(client.to_owned(), budget.clone());
        budget
    }

    /// The filters of `client`'s session: those its session held if it
    /// `resumed` a persistent one, else none. A persistent session's are
    /// kept for its next connection; a clean one's are its own.
    pub fn filters(&self, client: &str, persistent: bool, resumed: bool) -> Filters {
        let mut kept = lock(&self.filters);
        if !persistent {
            kept.remove(client);
            return Filters::default();
        }
        if resumed {
            if let Some(f) = kept.get(client) {
                return f.clone();
            }
        }
        let f = Filters::default();
        kept.insert(client.to_owned(), f.clone());
        f
    }

    /// `client`'s persistent session ended for good (it expired).
    pub fn forget_filters(&self, client: &str) {
        lock(&self.filters).remove(client);
    }

    /// Whether any persistent session (connected or kept) holds a filter
    /// for which `wanted` says yes: what rumqttd's router holds for them.
    pub fn any_filter(&self, wanted: impl Fn(&str) -> bool) -> bool {
        let kept = lock(&self.filters);
        kept.values().any(|f| lock(f).keys().any(|k| wanted(k)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_budget_outlives_the_connection_that_spent_it() {
        let kept = Kept::default();
        let t0 = Instant::now();
        let first = kept.budget("d-1", 2, t0);
        assert!(lock(&first).admit(b"a", t0));
        assert!(lock(&first).admit(b"b", t0));
        drop(first);
        // Reconnected: the same budget, still spent.
        let again = kept.budget("d-1", 2, t0);
        assert!(!lock(&again).admit(b"c", t0));
        assert!(lock(&again).admit(b"a", t0), "a topic in use is free");
        drop(again);
        // Refilled and unheld budgets are pruned when there are many.
        let later = t0 + Duration::from_secs(120);
        for i in 0..PRUNE_FROM {
            drop(kept.budget(&format!("x-{i}"), 2, later));
        }
        assert!(lock(&kept.budgets).by_client.len() <= PRUNE_FROM);
    }

    #[test]
    fn a_persistent_sessions_filters_survive_reconnects_and_takeovers() {
        let kept = Kept::default();
        let sub = ServiceSub {
            id: None,
            rap: false,
            qos: 1,
            no_local: false,
        };
        let first = kept.filters("svc", true, false);
        lock(&first).insert("a/#".into(), sub);
        // A takeover while the first is live: the same map.
        let second = kept.filters("svc", true, true);
        assert_eq!(lock(&second).len(), 1);
        assert!(kept.any_filter(|f| f == "a/#"));
        assert!(!kept.any_filter(|f| f == "c/#"));
        lock(&second).insert("b/#".into(), sub);
        assert_eq!(lock(&first).len(), 2);
        // A new session (not resumed) starts empty; a clean one forgets.
        assert!(lock(&kept.filters("svc", true, false)).is_empty());
        lock(&kept.filters("svc", true, true)).insert("c".into(), sub);
        assert!(lock(&kept.filters("svc", false, false)).is_empty());
        assert!(lock(&kept.filters("svc", true, true)).is_empty());
        kept.forget_filters("svc");
        assert!(lock(&kept.filters).is_empty());
    }
}
