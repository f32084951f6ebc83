//! Prefix-cache workloads, as the routing tests and the routing benchmarks drive them:
//! long texts that differ from their first bytes, and a mock's own prefix-cache
//! counters (`vllm:prefix_cache_queries_total` and `_hits_total`), read the way a
//! Prometheus scrape of a vLLM would.

use std::net::SocketAddr;

use crate::http;

/// `bytes` bytes of text unique to `seed`, which it starts with.
pub fn words(seed: &str, bytes: usize) -> String {
    let word = format!("{seed} lorem ipsum dolor sit amet consectetur; ");
    let mut text = word.repeat(bytes / word.len() + 1);
    text.truncate(bytes);
    text
}

/// The prompt tokens a mock looked up in its prefix cache, and those it found there.
pub fn cache_counters(mock: SocketAddr) -> Result<(f64, f64), String> {
    let text = http::get(mock, "/metrics")?.text();
    let sum = |name: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    Ok((
        sum("vllm:prefix_cache_queries_total"),
        sum("vllm:prefix_cache_hits_total"),
    ))
}

/// The share of prompt tokens a fleet of mocks found in their caches.
pub fn fleet_hit_rate(mocks: impl IntoIterator<Item = SocketAddr>) -> Result<f64, String> {
    let (mut queries, mut hits) = (0.0, 0.0);
    for mock in mocks {
        let (q, h) = cache_counters(mock)?;
        queries += q;
        hits += h;
    }
    Ok(hits / f64::max(queries, 1.0))
}
