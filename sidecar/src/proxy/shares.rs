//! Values the open connections share when theirs would be equal (their routes, their
//! observers): one allocation for a thousand connections to one destination, and none in each
//! parked connection. Held weakly: a value lives as long as a connection holds it. At most twice
//! as many entries as there were live values at the last sweep (plus 64), so a stream of new
//! destinations or clients cannot grow it.
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

pub(crate) struct Shares<K, V> {
    inner: Mutex<Entries<K, V>>,
}

struct Entries<K, V> {
    map: HashMap<K, Weak<V>>,
    /// Entries at the last sweep.
    swept: usize,
}

impl<K, V> Default for Shares<K, V> {
    fn default() -> Self {
        Shares {
            inner: Mutex::new(Entries {
                map: HashMap::new(),
                swept: 0,
            }),
        }
    }
}

impl<K: Hash + Eq, V> Shares<K, V> {
    /// The value for `key` that connections hold, if it still `fits`; else `make`'s, from now
    /// on the one for `key`.
    pub(crate) fn share(
        &self,
        key: K,
        fits: impl FnOnce(&V) -> bool,
        make: impl FnOnce() -> V,
    ) -> Arc<V> {
        let found = self.lock().map.get(&key).and_then(Weak::upgrade);
        if let Some(value) = found.filter(|v| fits(v)) {
            return value;
        }
        let value = Arc::new(make());
        let mut entries = self.lock();
        if entries.map.len() > 2 * entries.swept + 64 {
            entries.map.retain(|_, v| v.strong_count() > 0);
            entries.swept = entries.map.len();
        }
        entries.map.insert(key, Arc::downgrade(&value));
        value
    }

    fn lock(&self) -> MutexGuard<'_, Entries<K, V>> {
        // Nothing under the lock can panic half-way.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Entries in the map, dead ones included.
    #[cfg(test)]
    pub(crate) fn entries(&self) -> usize {
        self.lock().map.len()
    }

    /// The values connections hold now.
    #[cfg(test)]
    pub(crate) fn live(&self) -> Vec<Arc<V>> {
        self.lock().map.values().filter_map(Weak::upgrade).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ever new keys (a scan of destinations, a crawler's clients) leave at most twice as many
    /// entries as there are values in use (plus 64); a value in use is found again, and one that
    /// no longer fits is replaced.
    #[test]
    fn new_keys_keep_the_entries_bounded() {
        let shares = Shares::<u32, u32>::default();
        let mut held = Vec::new();
        for key in 1..=5000 {
            let v = shares.share(key, |_| true, || key);
            if key % 250 == 0 {
                held.push(v);
            }
            let entries = shares.lock().map.len();
            assert!(
                entries <= 2 * held.len() + 64 + 1,
                "{entries} entries at {key}"
            );
        }
        assert_eq!(held.len(), 20);
        let again = shares.share(250, |_| true, || unreachable!("in use, so shared"));
        assert!(Arc::ptr_eq(&again, &held[0]));
        let fresh = shares.share(250, |_| false, || 250);
        assert!(!Arc::ptr_eq(&fresh, &held[0]));
        assert!(shares.live().iter().any(|v| Arc::ptr_eq(v, &fresh)));
    }
}
