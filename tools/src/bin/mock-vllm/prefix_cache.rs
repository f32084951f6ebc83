//! The mock's automatic prefix cache, shaped like vLLM's: the prompt (rendered by the
//! mock's own chat template, not the router's canonical form) is cut into blocks of
//! `BLOCK_TOKENS` tokens (four bytes a token), each named by a hash chained over the
//! blocks before it; a request's hit is its run of leading blocks the cache holds; the
//! cache keeps at most `--prefix-cache-tokens` tokens, least recently used first out,
//! and a request's blocks are used last to first, as vLLM frees them, so a prompt's
//! first blocks leave the cache after its later ones.
//! The first token waits for the prefill of the uncached part
//! (`--prefill-us-per-token`), and `/metrics` exports vLLM's counters
//! `vllm:prefix_cache_queries_total` and `vllm:prefix_cache_hits_total` (tokens), so
//! tests and the benchmark read hit rates on the backends' side.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::Value;

/// Tokens per block, as vLLM's default block size.
pub(crate) const BLOCK_TOKENS: u64 = 16;
const BYTES_PER_TOKEN: u64 = 4;
const BLOCK_BYTES: usize = (BLOCK_TOKENS * BYTES_PER_TOKEN) as usize;

#[derive(Default)]
pub(crate) struct PrefixCache {
    capacity_blocks: u64,
    prefill_per_token: Duration,
    inner: Mutex<Lru>,
}

#[derive(Default)]
struct Lru {
    /// block hash -> when last used
    used: HashMap<u64, u64>,
    /// when last used -> block hash
    order: BTreeMap<u64, u64>,
    clock: u64,
    queries: u64,
    hits: u64,
}

impl PrefixCache {
    pub(crate) fn new(capacity_tokens: u64, prefill_us_per_token: u64) -> PrefixCache {
        PrefixCache {
            capacity_blocks: capacity_tokens / BLOCK_TOKENS,
            prefill_per_token: Duration::from_micros(prefill_us_per_token),
            inner: Mutex::default(),
        }
    }

    /// Looks the prompt of a request up, counts it, caches its blocks, and returns how
    /// long its prefill takes (the uncached tokens).
    pub(crate) fn prefill(&self, chat: bool, body: &Value) -> Duration {
        let prompt = if chat {
            render_chat(body)
        } else {
            render_prompt(body)
        };
        let tokens = prompt.len() as u64 / BYTES_PER_TOKEN;
        let blocks = chained_blocks(&prompt);
        // A poisoned lock cannot leave counters or maps inconsistent beyond one entry.
        let mut lru = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let hit_blocks = if self.capacity_blocks == 0 {
            0
        } else {
            blocks
                .iter()
                .take_while(|b| lru.used.contains_key(b))
                .count() as u64
        };
        let hit_tokens = hit_blocks * BLOCK_TOKENS;
        lru.queries += tokens;
        lru.hits += hit_tokens;
        if self.capacity_blocks > 0 {
            for &block in blocks.iter().rev() {
                lru.touch(block, self.capacity_blocks);
            }
        }
        drop(lru);
        let uncached = tokens.saturating_sub(hit_tokens);
        self.prefill_per_token
            .saturating_mul(uncached.min(u32::MAX as u64) as u32)
    }

    /// (queries, hits), in tokens.
    pub(crate) fn counters(&self) -> (u64, u64) {
        let lru = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        (lru.queries, lru.hits)
    }
}

impl Lru {
    fn touch(&mut self, block: u64, capacity: u64) {
        self.clock += 1;
        if let Some(old) = self.used.insert(block, self.clock) {
            self.order.remove(&old);
        }
        self.order.insert(self.clock, block);
        while self.used.len() as u64 > capacity {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            self.used.remove(&oldest);
        }
    }
}

/// A chat as a template renders it: the tools, then each message with its role.
fn render_chat(body: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    if let Some(tools) = body.get("tools").filter(|t| !t.is_null()) {
        out.extend_from_slice(b"<|tools|>");
        out.extend_from_slice(tools.to_string().as_bytes());
    }
    for m in body
        .get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        out.extend_from_slice(b"<|");
        out.extend_from_slice(
            m.get("role")
                .and_then(Value::as_str)
                .unwrap_or("")
                .as_bytes(),
        );
        out.extend_from_slice(b"|>\n");
        match m.get("content") {
            Some(Value::String(s)) => out.extend_from_slice(s.as_bytes()),
            Some(Value::Array(parts)) => {
                for p in parts {
                    match p.get("text").and_then(Value::as_str) {
                        Some(t) => out.extend_from_slice(t.as_bytes()),
                        None => out.extend_from_slice(p.to_string().as_bytes()),
                    }
                }
            }
            _ => {}
        }
        out.extend_from_slice(b"<|end|>\n");
    }
    out
}

/// A completion's prompt: text, or token ids (four bytes each); of a list, the first.
fn render_prompt(body: &Value) -> Vec<u8> {
    let prompt = body.get("prompt").unwrap_or(&Value::Null);
    let first = match prompt {
        Value::Array(items) if items.first().is_some_and(|p| !p.is_number()) => &items[0],
        other => other,
    };
    match first {
        Value::String(s) => s.as_bytes().to_vec(),
        Value::Array(ids) => ids
            .iter()
            .flat_map(|id| (id.as_u64().unwrap_or(0) as u32).to_le_bytes())
            .collect(),
        _ => Vec::new(),
    }
}

fn chained_blocks(prompt: &[u8]) -> Vec<u64> {
    let mut last = 0u64;
    prompt
        .chunks_exact(BLOCK_BYTES)
        .map(|block| {
            let mut h = DefaultHasher::new();
            last.hash(&mut h);
            block.hash(&mut h);
            last = h.finish();
            last
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_repeated_prefix_hits_and_prefills_less() {
        let cache = PrefixCache::new(1 << 20, 100);
        let system = "you are a mock. ".repeat(64);
        let turn = |u: &str| json!({"messages": [{"role": "system", "content": system}, {"role": "user", "content": u}]});
        let first = cache.prefill(true, &turn("hello"));
        let (queries, hits) = cache.counters();
        assert_eq!(hits, 0);
        assert!(queries >= 256);
        let second = cache.prefill(true, &turn("another question"));
        let (_, hits) = cache.counters();
        assert!(hits >= 240, "{hits}");
        assert!(second < first / 4, "{second:?} vs {first:?}");
    }

    #[test]
    fn the_cache_holds_its_capacity_and_no_more() {
        let cache = PrefixCache::new(4 * BLOCK_TOKENS, 0);
        let prompt = |c: char| json!({"prompt": c.to_string().repeat(8 * BLOCK_BYTES)});
        cache.prefill(false, &prompt('a'));
        cache.prefill(false, &prompt('a'));
        // The first four blocks stayed.
        assert_eq!(cache.counters(), (16 * BLOCK_TOKENS, 4 * BLOCK_TOKENS));
        cache.prefill(false, &prompt('b'));
        assert_eq!(cache.inner.lock().expect("lock").used.len(), 4);
    }
}
