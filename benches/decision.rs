//! What cache-aware routing costs a request, in process and without the network: the
//! CPU of reading a 32k-token conversation's prompt into blocks, matching it against
//! four backends' indexes, the pick, and recording it, against `least_loaded`'s model
//! probe and pick. `make bench` runs it (`cargo bench --bench decision`); under
//! `cargo test` it runs a few rounds only, so the suite checks that it works.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vllm_router::control::config;
use vllm_router::request::queue::{Limits, Want};
use vllm_router::request::{relay, route};
use vllm_router::shared::Shared;
use vllm_router_tools::prefix::words;

const CHAT: &str = "/v1/chat/completions";

/// 32 turns of 4 KiB: 128 KiB of text, about 32k tokens.
fn conversation(seed: &str) -> Vec<u8> {
    let messages: Vec<Value> = (0..32)
        .map(|t| {
            let role = if t % 2 == 0 { "user" } else { "assistant" };
            json!({"role": role, "content": words(&format!("{seed} turn {t}"), 4096)})
        })
        .collect();
    json!({"model": "m", "max_tokens": 1, "stream": true, "messages": messages})
        .to_string()
        .into_bytes()
}

#[derive(Default)]
struct Phases {
    read: Duration,
    plan: Duration,
    pick: Duration,
    record: Duration,
}

fn main() {
    let rounds: u32 = if std::env::args().any(|a| a == "--bench") {
        5000
    } else {
        5
    };
    let mut text = String::from("[servers]\nservers = [\n");
    for i in 0..4 {
        text +=
            &format!("  {{ url = \"http://10.0.0.{i}:8000\", max_concurrent_requests = 64 }},\n");
    }
    text += "]\n[config]\nenable_active_health_check = false\n";
    let config = config::parse(&text, Path::new("bench.toml")).expect("config");
    let shared = Shared::new(config, None).expect("shared state");
    let limits = Limits {
        max_queue_size: 0,
        queue_timeout: Duration::ZERO,
    };
    // Other conversations first, so the indexes are not empty.
    for k in 0..64 {
        let body = conversation(&format!("other {k}"));
        let (model, blocks) = relay::requested("POST", CHAT, &body, true).expect("body");
        let plan = route::plan(&shared, blocks, None);
        let want = Want {
            model,
            exclude: Vec::new(),
            route: Some(plan.clone()),
        };
        let slot = shared.table.acquire(want, limits).expect("slot");
        route::remember(&shared, &plan, &slot);
    }
    let body = conversation("measured");
    let mut cache = Phases::default();
    let mut blocks_n = 0;
    for _ in 0..rounds {
        let t0 = Instant::now();
        let (model, blocks) = relay::requested("POST", CHAT, &body, true).expect("body");
        blocks_n = blocks.len();
        let t1 = Instant::now();
        let plan = route::plan(&shared, blocks, None);
        let t2 = Instant::now();
        let want = Want {
            model,
            exclude: Vec::new(),
            route: Some(plan.clone()),
        };
        let slot = shared.table.acquire(want, limits).expect("slot");
        let t3 = Instant::now();
        route::remember(&shared, &plan, &slot);
        let t4 = Instant::now();
        drop(slot);
        cache.read += t1 - t0;
        cache.plan += t2 - t1;
        cache.pick += t3 - t2;
        cache.record += t4 - t3;
    }
    let mut least = Phases::default();
    for _ in 0..rounds {
        let t0 = Instant::now();
        let (model, _) = relay::requested("POST", CHAT, &body, false).expect("body");
        let t1 = Instant::now();
        let want = Want {
            model,
            exclude: Vec::new(),
            route: None,
        };
        let slot = shared.table.acquire(want, limits).expect("slot");
        let t2 = Instant::now();
        drop(slot);
        least.read += t1 - t0;
        least.pick += t2 - t1;
    }
    let us = |d: Duration| d.as_secs_f64() * 1e6 / f64::from(rounds);
    let total = |p: &Phases| us(p.read) + us(p.plan) + us(p.pick) + us(p.record);
    println!(
        "decision for a 32k-token conversation ({} KiB, {blocks_n} blocks, 4 backends), us per request:",
        body.len() / 1024
    );
    println!(
        "  cache_aware : read+hash {:.1}  match {:.2}  pick {:.2}  record {:.1}  total {:.1}",
        us(cache.read),
        us(cache.plan),
        us(cache.pick),
        us(cache.record),
        total(&cache)
    );
    println!(
        "  least_loaded: read {:.1}  pick {:.2}  total {:.1}",
        us(least.read),
        us(least.pick),
        total(&least)
    );
    println!(
        "  cache_aware costs {:.1} us more",
        total(&cache) - total(&least)
    );
}
