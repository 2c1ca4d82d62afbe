//! What one client may take of the shared router: new topics per device
//! per unit of time. (rumqttd's router matches every topic it has not seen
//! against every filter, and remembers it for good: a device inventing
//! topics costs every other client.) Sans-IO: the caller passes the time.

use std::collections::HashSet;
use std::hash::BuildHasher;
use std::time::Instant;

/// Topics remembered as in use, per session; past this the memory is
/// cleared and topics count as new again (a device with that many topics
/// spends its budget again, which is the point).
const REMEMBERED: usize = 1024;

/// A device's budget of new topics: a token bucket of `per_minute` tokens
/// (also the burst), one spent on each topic the session has not used.
#[derive(Debug)]
pub struct TopicBudget {
    per_minute: u32,
    tokens: f64,
    last: Option<Instant>,
    seen: HashSet<u64>,
    hasher: std::collections::hash_map::RandomState,
}

impl TopicBudget {
    /// `per_minute` 0: no limit.
    pub fn new(per_minute: u32) -> Self {
        Self {
            per_minute,
            tokens: f64::from(per_minute),
            last: None,
            seen: HashSet::new(),
            hasher: Default::default(),
        }
    }

    /// A new rate (SIGHUP): the bucket keeps what it holds, up to the new
    /// cap.
    pub fn set_rate(&mut self, per_minute: u32) {
        if per_minute != self.per_minute {
            self.per_minute = per_minute;
            self.tokens = self.tokens.min(f64::from(per_minute));
            if self.last.is_none() {
                self.tokens = f64::from(per_minute);
            }
        }
    }

    /// Whether the bucket would be full at `now` (nothing spent that has
    /// not come back): forgetting it then changes nothing.
    pub fn is_full(&self, now: Instant) -> bool {
        let cap = f64::from(self.per_minute);
        let refill = self.last.map_or(cap, |last| {
            now.saturating_duration_since(last).as_secs_f64() * cap / 60.0
        });
        self.per_minute == 0 || self.tokens + refill >= cap
    }

    /// [`TopicBudget::admit`] at the rate in force now (it may have changed
    /// since the bucket was made).
    pub fn admit_at(&mut self, topic: &[u8], now: Instant, per_minute: u32) -> bool {
        self.set_rate(per_minute);
        self.admit(topic, now)
    }

    /// Whether the device may publish to `topic` now: a topic in use, or a
    /// new one with a token to spend.
    pub fn admit(&mut self, topic: &[u8], now: Instant) -> bool {
        if self.per_minute == 0 {
            return true;
        }
        let key = self.hasher.hash_one(topic);
        if self.seen.contains(&key) {
            return true;
        }
        let cap = f64::from(self.per_minute);
        if let Some(last) = self.last {
            let secs = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + secs * cap / 60.0).min(cap);
        }
        self.last = Some(now);
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        if self.seen.len() >= REMEMBERED {
            self.seen.clear();
        }
        self.seen.insert(key);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn new_topics_spend_the_budget_and_used_ones_do_not() {
        let t0 = Instant::now();
        let mut b = TopicBudget::new(3);
        for t in ["a", "b", "c"] {
            assert!(b.admit(t.as_bytes(), t0), "{t}");
        }
        assert!(!b.admit(b"d", t0));
        assert!(b.admit(b"a", t0), "a topic in use is free");
        // A token comes back every 20 s at 3 a minute.
        assert!(!b.admit(b"d", t0 + Duration::from_secs(10)));
        assert!(b.admit(b"d", t0 + Duration::from_secs(21)));
        assert!(!b.admit(b"e", t0 + Duration::from_secs(21)));
    }

    #[test]
    fn a_new_rate_applies_to_a_bucket_in_use() {
        let t0 = Instant::now();
        let mut b = TopicBudget::new(60);
        assert!(b.admit(b"a", t0));
        b.set_rate(1);
        assert!(b.admit(b"b", t0), "the one token left");
        assert!(!b.admit(b"c", t0));
        // One a minute now: not yet after 30 s, yes after 61.
        assert!(!b.admit(b"c", t0 + Duration::from_secs(30)));
        assert!(b.admit(b"c", t0 + Duration::from_secs(61)));
        b.set_rate(0);
        assert!(b.admit(b"d", t0 + Duration::from_secs(61)), "0 is no limit");
    }

    #[test]
    fn zero_is_no_limit() {
        let mut b = TopicBudget::new(0);
        let now = Instant::now();
        assert!((0..10_000).all(|i| b.admit(format!("t{i}").as_bytes(), now)));
    }
}
