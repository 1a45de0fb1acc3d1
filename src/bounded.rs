//! A map with a hard size limit whose eviction frees memory in O(1) amortized: when full, the
//! entry written longest ago goes. For maps keyed by client input (throttle buckets, cached
//! lookups), which an attacker must not be able to grow, nor make slow by filling.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

pub struct BoundedMap<K, V> {
    map: HashMap<K, (V, u64)>,
    /// Keys in the order they were written, with the write's number; entries whose number no
    /// longer matches the map's were rewritten or removed since.
    order: VecDeque<(K, u64)>,
    next: u64,
    cap: usize,
}

impl<K: Hash + Eq + Clone, V> BoundedMap<K, V> {
    pub fn new(cap: usize) -> Self {
        BoundedMap {
            map: HashMap::new(),
            order: VecDeque::new(),
            next: 0,
            cap: cap.max(1),
        }
    }

    pub fn get(&self, k: &K) -> Option<&V> {
        self.map.get(k).map(|(v, _)| v)
    }

    pub fn get_mut(&mut self, k: &K) -> Option<&mut V> {
        self.map.get_mut(k).map(|(v, _)| v)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Writes `k`, which then counts as the newest entry; evicts the oldest ones past the cap.
    pub fn insert(&mut self, k: K, v: V) {
        self.next += 1;
        self.map.insert(k.clone(), (v, self.next));
        self.order.push_back((k, self.next));
        while self.map.len() > self.cap {
            match self.order.pop_front() {
                Some((old, n)) if self.map.get(&old).is_some_and(|(_, m)| *m == n) => {
                    self.map.remove(&old);
                }
                Some(_) => {}
                None => break,
            }
        }
        self.compact();
    }

    pub fn remove(&mut self, k: &K) -> Option<V> {
        let v = self.map.remove(k).map(|(v, _)| v);
        self.compact();
        v
    }

    /// Keeps the entries for which `keep` holds.
    pub fn retain(&mut self, mut keep: impl FnMut(&K, &mut V) -> bool) {
        self.map.retain(|k, (v, _)| keep(k, v));
        self.compact();
    }

    /// Drops stale order records once they outnumber the live entries, so rewriting the same
    /// keys cannot grow the queue.
    fn compact(&mut self) {
        if self.order.len() <= 2 * self.map.len() + 64 {
            return;
        }
        let map = &self.map;
        self.order
            .retain(|(k, n)| map.get(k).is_some_and(|(_, m)| m == n));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_write_goes_first_and_size_stays_bounded() {
        let mut m = BoundedMap::new(3);
        for k in 0..3 {
            m.insert(k, k);
        }
        m.insert(0, 10); // rewritten: now the newest
        m.insert(3, 3);
        assert_eq!(m.len(), 3);
        assert_eq!(m.get(&1), None, "1 was the oldest write");
        assert_eq!(m.get(&0), Some(&10));
        for k in 0..100_000 {
            m.insert(k % 5, k);
        }
        assert_eq!(m.len(), 3);
        assert!(m.order.len() <= 2 * 3 + 64);
        m.retain(|_, _| false);
        assert_eq!(m.len(), 0);
    }
}
