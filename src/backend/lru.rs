//! A least-recently-used map of fixed capacity keyed by 64-bit hashes: what the
//! router remembers of each backend's prefix cache (`backend::affinity`) and of where
//! each session went. It never holds more than its capacity, so its memory is bounded
//! whatever the traffic: at most `capacity` nodes in one vector and one hash table
//! of `capacity` entries (`HashLru::bound_bytes`).
//!
//! Nodes live in a vector and link to each other by index; the table maps a key to
//! its node. The keys are hashes already, so the table does not hash them again.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Index of no node.
const NONE: u32 = u32::MAX;

struct Node<V> {
    key: u64,
    value: V,
    /// Towards the most recently used end.
    newer: u32,
    /// Towards the least recently used end.
    older: u32,
}

/// The map; see the module comment.
pub struct HashLru<V> {
    capacity: usize,
    map: HashMap<u64, u32, BuildHasherDefault<KeyIsHash>>,
    nodes: Vec<Node<V>>,
    newest: u32,
    oldest: u32,
}

impl<V: Copy> HashLru<V> {
    /// An empty map that will hold up to `capacity` keys (at least one). Memory is
    /// taken as keys arrive, up to the bound.
    pub fn new(capacity: usize) -> HashLru<V> {
        HashLru {
            capacity: capacity.clamp(1, NONE as usize),
            map: HashMap::default(),
            nodes: Vec::new(),
            newest: NONE,
            oldest: NONE,
        }
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The value of `key`, without making it more recent.
    pub fn peek(&self, key: u64) -> Option<V> {
        self.map.get(&key).map(|&i| self.nodes[i as usize].value)
    }

    pub fn contains(&self, key: u64) -> bool {
        self.map.contains_key(&key)
    }

    /// Sets `key` to `value` and makes it the most recent; when full, the least
    /// recently used key makes room.
    pub fn insert(&mut self, key: u64, value: V) {
        if let Some(&i) = self.map.get(&key) {
            self.nodes[i as usize].value = value;
            self.unlink(i);
            self.link_newest(i);
            return;
        }
        let i = if self.nodes.len() < self.capacity {
            if self.nodes.len() == self.nodes.capacity() {
                // Doubling, but never past the capacity.
                let more = self
                    .nodes
                    .len()
                    .max(16)
                    .min(self.capacity - self.nodes.len());
                self.nodes.reserve_exact(more);
            }
            self.nodes.push(Node {
                key,
                value,
                newer: NONE,
                older: NONE,
            });
            (self.nodes.len() - 1) as u32
        } else {
            let i = self.oldest;
            self.unlink(i);
            let node = &mut self.nodes[i as usize];
            self.map.remove(&node.key);
            node.key = key;
            node.value = value;
            i
        };
        self.map.insert(key, i);
        self.link_newest(i);
    }

    /// The most memory the map can take at its capacity, in bytes: the nodes, and the
    /// hash table (a power of two of buckets at most 7/8 full, one control byte each).
    pub fn bound_bytes(&self) -> usize {
        self.capacity * std::mem::size_of::<Node<V>>() + table_bytes(self.capacity)
    }

    /// The memory it has taken so far, in bytes (same accounting as `bound_bytes`).
    #[cfg(test)]
    pub fn heap_bytes(&self) -> usize {
        self.nodes.capacity() * std::mem::size_of::<Node<V>>() + table_bytes(self.map.capacity())
    }

    fn unlink(&mut self, i: u32) {
        let (newer, older) = {
            let n = &self.nodes[i as usize];
            (n.newer, n.older)
        };
        match newer {
            NONE => self.newest = older,
            n => self.nodes[n as usize].older = older,
        }
        match older {
            NONE => self.oldest = newer,
            o => self.nodes[o as usize].newer = newer,
        }
    }

    fn link_newest(&mut self, i: u32) {
        let old_newest = self.newest;
        {
            let n = &mut self.nodes[i as usize];
            n.newer = NONE;
            n.older = old_newest;
        }
        match old_newest {
            NONE => self.oldest = i,
            o => self.nodes[o as usize].newer = i,
        }
        self.newest = i;
    }
}

/// The bytes of a hash table that holds `items`: hashbrown's buckets are a power of two,
/// at most 7/8 full, each an entry and a control byte.
fn table_bytes(items: usize) -> usize {
    let buckets = (items * 8).div_ceil(7).next_power_of_two();
    buckets * (std::mem::size_of::<(u64, u32)>() + 1)
}

/// The table's hasher: its keys are hashes already.
#[derive(Default)]
pub struct KeyIsHash(u64);

impl Hasher for KeyIsHash {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used by `u64` keys; anything else still hashes.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_recently_used_key_makes_room() {
        let mut lru = HashLru::new(3);
        for k in 1..=3 {
            lru.insert(k, k * 10);
        }
        // Touching 1 makes 2 the oldest.
        lru.insert(1, 11);
        lru.insert(4, 40);
        assert_eq!(lru.len(), 3);
        assert_eq!(lru.peek(2), None);
        assert_eq!(lru.peek(1), Some(11));
        assert_eq!(lru.peek(3), Some(30));
        assert_eq!(lru.peek(4), Some(40));
        lru.insert(5, 50);
        assert_eq!(lru.peek(3), None, "3 was the oldest now");
    }

    #[test]
    fn a_capacity_of_one_holds_the_last_key() {
        let mut lru = HashLru::new(0);
        lru.insert(7, ());
        lru.insert(8, ());
        assert!(!lru.contains(7) && lru.contains(8));
        assert_eq!(lru.len(), 1);
    }

    #[test]
    fn a_million_distinct_keys_stay_within_the_bound() {
        let capacity = 32 * 1024;
        let mut lru = HashLru::new(capacity);
        for k in 0..1_000_000u64 {
            lru.insert(k.wrapping_mul(0x9E37_79B9_7F4A_7C15), ());
        }
        assert_eq!(lru.len(), capacity);
        assert!(
            lru.heap_bytes() <= lru.bound_bytes(),
            "{} > {}",
            lru.heap_bytes(),
            lru.bound_bytes()
        );
        assert!(lru.bound_bytes() < 2 * 1024 * 1024, "{}", lru.bound_bytes());
    }
}
