//! What the router remembers of where requests went, for cache-aware routing: each
//! backend's `PrefixIndex` (the prompt blocks it was sent lately, an approximation of
//! its vLLM prefix cache), and `Sessions` (the backend each session last went to).
//! Both are fixed-capacity LRUs (`backend::lru`), so their memory is bounded whatever
//! the traffic; both have their own lock, never held with the table's, so recording
//! a long prompt never holds up admission (the table reads an index's size figures, which
//! sit outside its lock).
//!
//! Written by workers only, after a request was admitted (`request::route::remember`);
//! read under the table lock by the pick, through the request's `Route`.

use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;

use crate::backend::lru::HashLru;
use crate::backend::registry::BackendId;
use crate::request::prefix::BLOCK_BYTES;

/// Sessions remembered at most (under 4 MiB at the bound); the least recently seen
/// session is forgotten first, and starts again as a new one.
pub const MAX_SESSIONS: usize = 65_536;

/// One backend's index: the block hashes of the prompts it was sent, most recent first.
/// Its size figures are kept outside the lock, so that the status views, read under the
/// table lock, never wait for a long prompt being recorded.
pub struct PrefixIndex {
    blocks: Mutex<HashLru<()>>,
    held: AtomicUsize,
    capacity: usize,
    bound_bytes: usize,
}

impl PrefixIndex {
    /// An index of about `tokens` tokens (blocks of `BLOCK_BYTES` bytes, about 32 tokens).
    pub fn with_tokens(tokens: u64) -> PrefixIndex {
        let lru = HashLru::new(blocks_for(tokens));
        PrefixIndex {
            held: AtomicUsize::new(0),
            capacity: lru.capacity(),
            bound_bytes: lru.bound_bytes(),
            blocks: Mutex::new(lru),
        }
    }

    /// How many of `blocks`' leading blocks the backend holds. Blocks are recorded
    /// last to first, so a prompt's first blocks are always more recent than its later
    /// ones and are evicted after them: the held blocks of a chain are a prefix of it,
    /// and a binary search finds its end.
    pub fn matched(&self, blocks: &[u64]) -> u32 {
        let index = self.blocks.lock();
        let (mut held, mut missing) = (0, blocks.len());
        while held < missing {
            let mid = held + (missing - held) / 2;
            if index.contains(blocks[mid]) {
                held = mid + 1;
            } else {
                missing = mid;
            }
        }
        held as u32
    }

    /// Records that the backend was sent a prompt of these blocks.
    pub fn record(&self, blocks: &[u64]) {
        let mut index = self.blocks.lock();
        for &block in blocks.iter().rev() {
            index.insert(block, ());
        }
        self.held.store(index.len(), Ordering::Relaxed);
    }

    /// Blocks held now.
    pub fn len(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Blocks held at most.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The most memory the index can take, in bytes.
    pub fn bound_bytes(&self) -> usize {
        self.bound_bytes
    }
}

/// The number of blocks that hold about `tokens` tokens (four bytes of text each).
pub fn blocks_for(tokens: u64) -> usize {
    (tokens.saturating_mul(4) / BLOCK_BYTES as u64).clamp(1, u64::from(u32::MAX - 1)) as usize
}

/// The backend each session (by the hash of its id) was last sent to.
pub struct Sessions {
    map: Mutex<HashLru<BackendId>>,
}

impl Default for Sessions {
    fn default() -> Self {
        Sessions {
            map: Mutex::new(HashLru::new(MAX_SESSIONS)),
        }
    }
}

impl Sessions {
    pub fn backend_of(&self, session: u64) -> Option<BackendId> {
        self.map.lock().peek(session)
    }

    pub fn set(&self, session: u64, backend: BackendId) {
        self.map.lock().insert(session, backend);
    }

    pub fn len(&self) -> usize {
        self.map.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_match_is_the_run_of_leading_blocks_held() {
        let index = PrefixIndex::with_tokens(1 << 20);
        index.record(&[1, 2, 3, 4]);
        assert_eq!(index.matched(&[1, 2, 3, 4, 5, 6]), 4);
        assert_eq!(index.matched(&[1, 2, 9]), 2);
        // A chain that starts elsewhere differs in every block.
        assert_eq!(index.matched(&[9, 10, 11]), 0);
        assert_eq!(index.matched(&[]), 0);
    }

    #[test]
    fn a_full_index_forgets_the_ends_of_prompts_before_their_starts() {
        // Room for 6 blocks.
        let index = PrefixIndex::with_tokens(6 * BLOCK_BYTES as u64 / 4);
        assert_eq!(index.capacity(), 6);
        index.record(&[1, 2, 3, 4]);
        index.record(&[10, 11, 12, 13]);
        // The older prompt lost its last two blocks, not its first.
        assert_eq!(index.matched(&[1, 2, 3, 4]), 2);
        assert_eq!(index.matched(&[10, 11, 12, 13]), 4);
        assert_eq!(index.len(), 6);
    }

    #[test]
    fn a_million_distinct_prompts_stay_within_the_bound() {
        let index = PrefixIndex::with_tokens(1 << 20);
        let blocks = index.capacity();
        for p in 0..1_000_000u64 {
            let chain: Vec<u64> = (0..4)
                .map(|b| (p << 8 | b).wrapping_mul(0x9E37_79B9_7F4A_7C15))
                .collect();
            index.record(&chain);
        }
        assert_eq!(index.len(), blocks);
        let lru = index.blocks.lock();
        assert!(lru.heap_bytes() <= lru.bound_bytes());
        // 32768 blocks for a million tokens: under 2 MiB.
        assert_eq!(blocks, 32_768);
        assert!(lru.bound_bytes() < 2 << 20, "{}", lru.bound_bytes());
    }

    #[test]
    fn sessions_remember_the_last_backend() {
        let sessions = Sessions::default();
        sessions.set(7, 1);
        sessions.set(7, 2);
        assert_eq!(sessions.backend_of(7), Some(2));
        assert_eq!(sessions.backend_of(8), None);
    }
}
