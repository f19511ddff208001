//! [`Classifier`]: classification with a bounded LRU cache keyed by SQL
//! text.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::fast_path::fast_path;
use super::parser::classify_slow;
use super::types::Classification;

/// A thread-safe classifier that caches results by SQL text in a bounded
/// LRU. Statements longer than [`Classifier::MAX_CACHED_SQL_LEN`] bytes or
/// carrying a `lagrouter:token=` hint are classified but not cached; trivial
/// statements take the fast path and share preallocated results.
pub struct Classifier {
    cache: Option<Mutex<Lru>>,
}

impl std::fmt::Debug for Classifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Classifier")
            .field("capacity", &self.capacity())
            .field("len", &self.len())
            .finish()
    }
}

impl Default for Classifier {
    /// A classifier caching up to [`Classifier::DEFAULT_CAPACITY`] entries.
    fn default() -> Self {
        Classifier::new(Self::DEFAULT_CAPACITY)
    }
}

impl Classifier {
    /// The cache capacity of [`Classifier::default`].
    pub const DEFAULT_CAPACITY: usize = 1024;
    /// SQL texts longer than this many bytes are not cached.
    pub const MAX_CACHED_SQL_LEN: usize = 8 * 1024;

    /// A classifier caching up to `capacity` results (`0`: no cache).
    pub fn new(capacity: usize) -> Self {
        Classifier {
            cache: (capacity > 0).then(|| Mutex::new(Lru::new(capacity))),
        }
    }

    /// Classifies `sql`, from the cache when it was seen recently.
    pub fn classify(&self, sql: &str) -> Arc<Classification> {
        if let Some(fast) = fast_path(sql) {
            return fast.shared();
        }
        let Some(cache) = &self.cache else {
            return Arc::new(classify_slow(sql));
        };
        // Texts carrying a token hint are nearly always unique: caching them
        // would only evict useful entries.
        if sql.len() > Self::MAX_CACHED_SQL_LEN || sql.contains("lagrouter:token=") {
            return Arc::new(classify_slow(sql));
        }
        if let Some(hit) = lock(cache).get(sql) {
            return hit;
        }
        let result = Arc::new(classify_slow(sql));
        lock(cache).insert(sql, result.clone());
        result
    }

    /// The number of cached results.
    pub fn len(&self) -> usize {
        self.cache.as_ref().map_or(0, |c| lock(c).len())
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The cache capacity (`0`: no cache).
    pub fn capacity(&self) -> usize {
        self.cache.as_ref().map_or(0, |c| lock(c).capacity)
    }
}

fn lock(m: &Mutex<Lru>) -> std::sync::MutexGuard<'_, Lru> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

const NIL: usize = usize::MAX;

struct LruNode {
    key: Arc<str>,
    value: Arc<Classification>,
    prev: usize,
    next: usize,
}

/// A least-recently-used map from SQL text to classification: a hash map
/// into a slab of nodes threaded on a doubly linked list (head = newest).
struct Lru {
    capacity: usize,
    map: HashMap<Arc<str>, usize>,
    nodes: Vec<LruNode>,
    head: usize,
    tail: usize,
}

impl Lru {
    fn new(capacity: usize) -> Self {
        Lru {
            capacity,
            map: HashMap::with_capacity(capacity.min(4096)),
            nodes: Vec::with_capacity(capacity.min(4096)),
            head: NIL,
            tail: NIL,
        }
    }

    fn len(&self) -> usize {
        self.map.len()
    }

    fn unlink(&mut self, i: usize) {
        let (prev, next) = (self.nodes[i].prev, self.nodes[i].next);
        if prev == NIL {
            self.head = next;
        } else {
            self.nodes[prev].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.nodes[next].prev = prev;
        }
    }

    fn push_front(&mut self, i: usize) {
        self.nodes[i].prev = NIL;
        self.nodes[i].next = self.head;
        if self.head != NIL {
            self.nodes[self.head].prev = i;
        }
        self.head = i;
        if self.tail == NIL {
            self.tail = i;
        }
    }

    fn get(&mut self, key: &str) -> Option<Arc<Classification>> {
        let i = *self.map.get(key)?;
        if self.head != i {
            self.unlink(i);
            self.push_front(i);
        }
        Some(self.nodes[i].value.clone())
    }

    fn insert(&mut self, key: &str, value: Arc<Classification>) {
        if let Some(&i) = self.map.get(key) {
            self.nodes[i].value = value;
            if self.head != i {
                self.unlink(i);
                self.push_front(i);
            }
            return;
        }
        let key: Arc<str> = Arc::from(key);
        let i = if self.nodes.len() < self.capacity {
            self.nodes.push(LruNode {
                key: key.clone(),
                value,
                prev: NIL,
                next: NIL,
            });
            self.nodes.len() - 1
        } else {
            let i = self.tail;
            self.unlink(i);
            let old = std::mem::replace(&mut self.nodes[i].key, key.clone());
            self.map.remove(&old);
            self.nodes[i].value = value;
            i
        };
        self.map.insert(key, i);
        self.push_front(i);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_evicts_least_recently_used() {
        let mut lru = Lru::new(2);
        let v = Arc::new(Classification::default());
        lru.insert("a", v.clone());
        lru.insert("b", v.clone());
        assert!(lru.get("a").is_some()); // a is now newest
        lru.insert("c", v.clone()); // evicts b
        assert!(lru.get("b").is_none());
        assert!(lru.get("a").is_some());
        assert!(lru.get("c").is_some());
        assert_eq!(lru.len(), 2);
        lru.insert("c", v.clone());
        assert_eq!(lru.len(), 2);
        for i in 0..100 {
            lru.insert(&i.to_string(), v.clone());
        }
        assert_eq!(lru.len(), 2);
        assert!(lru.get("99").is_some() && lru.get("98").is_some());
    }

    #[test]
    fn lru_capacity_one() {
        let mut lru = Lru::new(1);
        let v = Arc::new(Classification::default());
        lru.insert("a", v.clone());
        lru.insert("b", v.clone());
        assert!(lru.get("a").is_none());
        assert!(lru.get("b").is_some());
    }
}
