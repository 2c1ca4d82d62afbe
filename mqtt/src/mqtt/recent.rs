//! What the broker worked out lately about a certificate, kept for the
//! next time the same certificate comes: two generations of a bounded
//! map, the newer filled to half the bound and then made the older (the
//! oldest dropped). A hit in the older generation moves into the newer,
//! so what comes back often stays; what has not come back for two
//! generations goes. One lock, held for a lookup or an insertion.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;

#[derive(Debug)]
pub struct Recent<K, V> {
    cap: usize,
    gens: Mutex<Generations<K, V>>,
}

#[derive(Debug)]
struct Generations<K, V> {
    newer: HashMap<K, V>,
    older: HashMap<K, V>,
}

impl<K: Hash + Eq, V: Clone> Recent<K, V> {
    /// Room for `cap` entries (at least two).
    pub fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(2),
            gens: Mutex::new(Generations {
                newer: HashMap::new(),
                older: HashMap::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Generations<K, V>> {
        self.gens.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The value kept for `key`, if any (kept another generation).
    pub fn get(&self, key: &K) -> Option<V> {
        let mut g = self.lock();
        if let Some(v) = g.newer.get(key) {
            return Some(v.clone());
        }
        let (k, v) = g.older.remove_entry(key)?;
        g.insert(self.cap, k, v.clone());
        Some(v)
    }

    pub fn insert(&self, key: K, value: V) {
        self.lock().insert(self.cap, key, value);
    }

    /// How many entries it holds.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        let g = self.lock();
        g.newer.len() + g.older.len()
    }
}

impl<K: Hash + Eq, V> Generations<K, V> {
    fn insert(&mut self, cap: usize, key: K, value: V) {
        if self.newer.len() >= cap / 2 && !self.newer.contains_key(&key) {
            self.older = std::mem::take(&mut self.newer);
        }
        self.newer.insert(key, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_is_bounded_and_keeps_the_newest() {
        let r = Recent::new(4);
        for i in 0..10u8 {
            r.insert(i, i);
        }
        assert!(r.len() <= 4, "{}", r.len());
        assert_eq!(r.get(&9), Some(9));
        assert_eq!(r.get(&0), None);
    }

    /// An entry that keeps coming back outlives the generations that
    /// pass meanwhile.
    #[test]
    fn what_comes_back_stays() {
        let r = Recent::new(4);
        r.insert(100u32, "kept");
        for i in 0..50 {
            r.insert(i, "passing");
            assert_eq!(r.get(&100), Some("kept"), "after {i} others");
        }
        assert!(r.len() <= 4);
    }
}
