//! Part 6, routing (issue 15): `least_loaded` against `cache_aware`, and two router
//! replicas against one, on fleets of 4 mocks whose prefix caches each hold about a
//! third of the workload's working set. Hit rates come from the mocks' own
//! `vllm:prefix_cache_*` counters; time to first token is measured here, from sending
//! a streamed request to its first token event, with the mocks' prefill of the
//! uncached prompt (`--prefill-us-per-token`) in it.
//!
//! Workloads: `shared` (multi-turn chats in groups that share long system prompts),
//! `unique` (nothing shared), `hot` (one prefix for every request, more clients than
//! slots), `sessions` (multi-turn chats named by `X-Session-ID`). Then the router's
//! memory against a stream of distinct prompts. The CPU of the decision itself is
//! measured in process, by `benches/decision.rs` (`make bench` runs both): through the
//! network it is lost in the noise of a 128 KiB request.

use crate::*;
use serde_json::{json, Value};
use std::sync::Mutex;
use vllm_router_tools::prefix::{self, words};

const MOCKS: usize = 4;
const CAP: usize = 16;
const CLIENTS: usize = 32;
const PREFILL_US_PER_TOKEN: u64 = 20;
const DECODE_TOKENS: &str = "8";
const DECODE_DELAY_MS: &str = "5";
const HOT_CLIENTS: usize = 96;

#[derive(Serialize, Clone)]
pub(crate) struct RoutingRow {
    pub(crate) workload: &'static str,
    pub(crate) routing: &'static str,
    pub(crate) replicas: usize,
    pub(crate) requests: usize,
    pub(crate) errors: usize,
    pub(crate) req_per_s: f64,
    pub(crate) ttft_p50_ms: f64,
    pub(crate) ttft_p90_ms: f64,
    pub(crate) hit_rate: f64,
    pub(crate) backends_used: usize,
    /// The highest in-flight count any mock saw. Each replica keeps its own `CAP`.
    pub(crate) peak_in_flight: u64,
}

#[derive(Serialize, Default)]
pub(crate) struct RoutingReport {
    pub(crate) rows: Vec<RoutingRow>,
    /// Router VmRSS (KiB) after each count of distinct prompts, cache_aware.
    pub(crate) rss_kib_by_prompts: Vec<(usize, u64)>,
    pub(crate) index_bound_kib: u64,
}

/// One request of a workload: its body and headers.
#[derive(Clone)]
struct Turn {
    body: String,
    session: Option<String>,
}

/// The requests of a workload in the order each client sends them, and the tokens of
/// its working set (every distinct prompt token).
struct Workload {
    name: &'static str,
    /// One list per conversation: turns are sent in order, one conversation per client
    /// at a time.
    conversations: Vec<Vec<Turn>>,
    working_set_tokens: u64,
    clients: usize,
}

fn chat(messages: &[Value]) -> String {
    json!({"model": "mock-model", "stream": true, "max_tokens": 8, "messages": messages})
        .to_string()
}

/// Conversations of `turns` turns on `systems[c % len]`, each with its own first question.
fn conversations(systems: &[String], n: usize, turns: usize, session: bool) -> Vec<Vec<Turn>> {
    (0..n)
        .map(|c| {
            let mut messages = Vec::new();
            if !systems.is_empty() {
                messages.push(json!({"role": "system", "content": systems[c % systems.len()]}));
            }
            messages.push(json!({"role": "user", "content": words(&format!("conversation {c} asks"), 800)}));
            let mut out = Vec::new();
            for t in 0..turns {
                if t > 0 {
                    messages.push(json!({"role": "assistant", "content": words(&format!("answer {c}.{t}"), 1200)}));
                    messages.push(json!({"role": "user", "content": words(&format!("follow-up {c}.{t}"), 200)}));
                }
                out.push(Turn {
                    body: chat(&messages),
                    session: session.then(|| format!("session-{c}")),
                });
            }
            out
        })
        .collect()
}

fn workloads() -> Vec<Workload> {
    let systems: Vec<String> = (0..48)
        .map(|g| words(&format!("system prompt of group {g}"), 16_000))
        .collect();
    // Tokens are four bytes: 48 system prompts of 4000, 96 conversations (two in each
    // group) of 8 turns, about 2650 more each.
    let shared = Workload {
        name: "shared",
        conversations: conversations(&systems, 96, 8, false),
        working_set_tokens: 48 * 4000 + 96 * (200 + 7 * 350),
        clients: CLIENTS,
    };
    let unique = Workload {
        name: "unique",
        conversations: (0..240)
            .map(|i| {
                vec![Turn {
                    body: chat(&[json!({"role": "user", "content": words(&format!("unique prompt {i}"), 8000)})]),
                    session: None,
                }]
            })
            .collect(),
        working_set_tokens: 240 * 2000,
        clients: CLIENTS,
    };
    let hot_prompt = chat(&[
        json!({"role": "system", "content": words("the one hot system prompt", 16_000)}),
        json!({"role": "user", "content": "go"}),
    ]);
    let hot = Workload {
        name: "hot",
        conversations: (0..240)
            .map(|_| {
                vec![Turn {
                    body: hot_prompt.clone(),
                    session: None,
                }]
            })
            .collect(),
        working_set_tokens: 4000,
        clients: HOT_CLIENTS,
    };
    let sessions = Workload {
        name: "sessions",
        conversations: conversations(&[], 48, 6, true),
        working_set_tokens: 48 * (200 + 5 * 350),
        clients: CLIENTS,
    };
    vec![shared, unique, hot, sessions]
}

pub(crate) fn routing_part(env: &Env) -> Result<RoutingReport, String> {
    part("[6/6] routing: least_loaded against cache_aware, 4 mocks");
    let mut report = RoutingReport::default();
    for w in workloads() {
        for (routing, replicas) in [("least_loaded", 1), ("cache_aware", 1), ("cache_aware", 2)] {
            let row = run(env, &w, routing, replicas)?;
            println!(
                "  {:<8} {:<12} x{}  {:>6.1} req/s  ttft p50 {:>6.1} ms p90 {:>6.1} ms  hit rate {:.2}  backends {}  peak {}/{CAP}{}",
                row.workload,
                row.routing,
                row.replicas,
                row.req_per_s,
                row.ttft_p50_ms,
                row.ttft_p90_ms,
                row.hit_rate,
                row.backends_used,
                row.peak_in_flight,
                if row.errors > 0 { format!("  {} errors", row.errors) } else { String::new() }
            );
            report.rows.push(row);
        }
    }
    (report.rss_kib_by_prompts, report.index_bound_kib) = index_memory(env)?;
    println!(
        "  distinct prompts -> router VmRSS KiB: {:?} (index bound {} KiB for 4 backends)",
        report.rss_kib_by_prompts, report.index_bound_kib
    );
    Ok(report)
}

/// `MOCKS` mocks started with `args`.
fn mocks(env: &Env, tag: &str, args: &[&str]) -> Result<Vec<Mock>, String> {
    (0..MOCKS)
        .map(|i| env.mock_with(&format!("{tag}-mock-{i}"), args))
        .collect()
}

/// The mocks of a workload run: prefix caches of `cache_tokens`, a prefill, and a decode.
fn fleet(env: &Env, tag: &str, cache_tokens: u64) -> Result<Vec<Mock>, String> {
    let cache = cache_tokens.to_string();
    let prefill = PREFILL_US_PER_TOKEN.to_string();
    let args = [
        "--prefix-cache-tokens",
        &cache,
        "--prefill-us-per-token",
        &prefill,
        "--tokens",
        DECODE_TOKENS,
        "--delay-ms",
        DECODE_DELAY_MS,
    ];
    mocks(env, tag, &args)
}

fn routers(
    env: &Env,
    tag: &str,
    mocks: &[Mock],
    routing: &str,
    n: usize,
) -> Result<Vec<Router>, String> {
    let addrs: Vec<SocketAddr> = mocks.iter().map(|m| m.addr).collect();
    let toml = servers_toml(&addrs, CAP, 1024)
        + &format!("routing = \"{routing}\"\nhealth_check_interval = 1\n");
    (0..n)
        .map(|i| {
            let r = env.router(&format!("{tag}-router-{i}"), &toml, "warn")?;
            r.wait_healthy(mocks.len(), Duration::from_secs(20))?;
            Ok(r)
        })
        .collect()
}

fn run(
    env: &Env,
    w: &Workload,
    routing: &'static str,
    replicas: usize,
) -> Result<RoutingRow, String> {
    let tag = format!("routing-{}-{routing}-{replicas}", w.name);
    let mocks = fleet(env, &tag, (w.working_set_tokens / 3).max(1))?;
    let routers = routers(env, &tag, &mocks, routing, replicas)?;
    let addrs: Vec<SocketAddr> = routers.iter().map(|r| r.addr).collect();
    // Every conversation advances at once, a turn at a time (all first turns, then all
    // second turns...), so the whole working set is in use, as in a busy fleet; a
    // turn waits for the one before it.
    // Within a turn the conversations come in a shuffled order (the same in every run):
    // an order that repeats with the fleet's size would line groups up with backends
    // taken in turn.
    let mut turns: Vec<(usize, usize)> = Vec::new();
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    for t in 0..w.conversations.iter().map(Vec::len).max().unwrap_or(0) {
        let mut round: Vec<usize> = (0..w.conversations.len())
            .filter(|&c| t < w.conversations[c].len())
            .collect();
        for i in (1..round.len()).rev() {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            round.swap(i, (seed >> 33) as usize % (i + 1));
        }
        turns.extend(round.into_iter().map(|c| (c, t)));
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let done: Vec<std::sync::atomic::AtomicUsize> = w
        .conversations
        .iter()
        .map(|_| std::sync::atomic::AtomicUsize::new(0))
        .collect();
    let ttfts = Mutex::new(Vec::new());
    let errors = Mutex::new(0usize);
    let start = Instant::now();
    thread::scope(|s| {
        for _ in 0..w.clients {
            s.spawn(|| loop {
                let Some(&(c, t)) = turns.get(next.fetch_add(1, Ordering::Relaxed)) else {
                    return;
                };
                while done[c].load(Ordering::Acquire) < t {
                    thread::sleep(Duration::from_millis(1));
                }
                // With two replicas the turns of a conversation alternate between them.
                let addr = addrs[(c + t) % addrs.len()];
                match ttft(addr, &w.conversations[c][t]) {
                    Ok(d) => ttfts.lock().map(|mut v| v.push(d)).unwrap_or(()),
                    Err(_) => *errors.lock().unwrap_or_else(|e| e.into_inner()) += 1,
                }
                done[c].store(t + 1, Ordering::Release);
            });
        }
    });
    let elapsed = start.elapsed();
    let mut ttfts: Vec<u64> = ttfts
        .into_inner()
        .unwrap_or_default()
        .iter()
        .map(|d: &Duration| d.as_micros() as u64)
        .collect();
    ttfts.sort_unstable();
    let ms = |q: f64| percentile(&ttfts, q) / 1000.0;
    let (mut used, mut peak) = (0, 0);
    for m in &mocks {
        let stats = http::get_json(m.addr, "/mock/stats")?;
        used += usize::from(stats["total"].as_u64().unwrap_or(0) > 0);
        peak = peak.max(stats["peak_in_flight"].as_u64().unwrap_or(0));
    }
    Ok(RoutingRow {
        workload: w.name,
        routing,
        replicas,
        requests: ttfts.len(),
        errors: errors.into_inner().unwrap_or(0),
        req_per_s: ttfts.len() as f64 / elapsed.as_secs_f64(),
        ttft_p50_ms: ms(0.5),
        ttft_p90_ms: ms(0.9),
        hit_rate: prefix::fleet_hit_rate(mocks.iter().map(|m| m.addr))?,
        backends_used: used,
        peak_in_flight: peak,
    })
}

/// Sends one streamed turn and reads it to the end; the time to its first token event.
fn ttft(addr: SocketAddr, turn: &Turn) -> Result<Duration, String> {
    let mut conn = http::Conn::connect(addr, Duration::from_secs(60)).map_err(|e| e.to_string())?;
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(s) = &turn.session {
        headers.push(("X-Session-ID", s));
    }
    let sent = Instant::now();
    conn.send(
        "POST",
        "/v1/chat/completions",
        &headers,
        turn.body.as_bytes(),
        true,
    );
    let (status, _) = conn.read_head()?;
    if status != 200 {
        return Err(format!("status {status}"));
    }
    let mut first = None;
    while let Some(chunk) = conn.read_chunk()? {
        if first.is_none() && chunk.windows(3).any(|w| w == b"tok") {
            first = Some(sent.elapsed());
        }
    }
    first.ok_or_else(|| "no token".to_owned())
}

/// Router VmRSS after 0 to 100 000 distinct prompts of 40 blocks each (4 million
/// blocks, 30 times what the four indexes hold), sent by 8 clients.
fn index_memory(env: &Env) -> Result<(Vec<(usize, u64)>, u64), String> {
    const STEPS: [usize; 5] = [0, 12_500, 25_000, 50_000, 100_000];
    let mocks = mocks(env, "memory", &["--tokens", "1"])?;
    let router = routers(env, "memory", &mocks, "cache_aware", 1)?.remove(0);
    let pid = router.proc.pid();
    let mut out = vec![(0, procfs::field(pid, "VmRSS")?)];
    for pair in STEPS.windows(2) {
        let (from, to) = (pair[0], pair[1]);
        let next = std::sync::atomic::AtomicUsize::new(from);
        let failed = AtomicBool::new(false);
        thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    let Ok(mut conn) = http::Conn::connect(router.addr, Duration::from_secs(30)) else {
                        failed.store(true, Ordering::Relaxed);
                        return;
                    };
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= to {
                            return;
                        }
                        let body = json!({"model": "mock-model", "max_tokens": 1, "prompt": words(&format!("distinct {i}"), 40 * 128)}).to_string();
                        conn.send("POST", "/v1/completions", &[("Content-Type", "application/json")], body.as_bytes(), false);
                        if !conn.read_response(false).is_ok_and(|r| r.status == 200) {
                            failed.store(true, Ordering::Relaxed);
                            return;
                        }
                    }
                });
            }
        });
        if failed.load(Ordering::Relaxed) {
            return Err("a distinct-prompt request failed".into());
        }
        out.push((to, procfs::field(pid, "VmRSS")?));
    }
    let stats = http::get_json(router.addr, "/load-stats")?;
    let bound: u64 = stats["servers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["prefix_index_max_bytes"].as_u64())
        .sum();
    Ok((out, bound / 1024))
}

fn row<'a>(
    r: &'a RoutingReport,
    workload: &str,
    routing: &str,
    replicas: usize,
) -> Option<&'a RoutingRow> {
    r.rows
        .iter()
        .find(|x| x.workload == workload && x.routing == routing && x.replicas == replicas)
}

pub(crate) fn print_routing(r: &RoutingReport) {
    if r.rows.is_empty() {
        return;
    }
    println!(
        "\n6. Routing: {MOCKS} mocks of {CAP} slots, prefix caches of a third of the working set, prefill {PREFILL_US_PER_TOKEN} us/token; hit rate from the mocks' counters"
    );
    let mut t = Table::new(&[
        "workload",
        "routing",
        "replicas",
        "req/s",
        "ttft p50 ms",
        "ttft p90 ms",
        "hit rate",
        "backends",
        "peak/cap",
        "errors",
    ]);
    for x in &r.rows {
        t.row(vec![
            x.workload.to_owned(),
            x.routing.to_owned(),
            x.replicas.to_string(),
            format!("{:.1}", x.req_per_s),
            format!("{:.1}", x.ttft_p50_ms),
            format!("{:.1}", x.ttft_p90_ms),
            format!("{:.2}", x.hit_rate),
            x.backends_used.to_string(),
            format!("{}/{CAP}", x.peak_in_flight),
            x.errors.to_string(),
        ]);
    }
    t.print();
    let mut goals = Table::new(&["goal", "value", "result"]);
    let mut goal = |name: &str, value: String, met: Option<bool>| {
        let result = verdict(met);
        goals.row(vec![name.to_owned(), value, result.to_owned()]);
    };
    let pair = |w: &str| Some((row(r, w, "least_loaded", 1)?, row(r, w, "cache_aware", 1)?));
    for w in ["shared", "sessions"] {
        if let Some((ll, ca)) = pair(w) {
            goal(
                &format!("{w}: hit rate >= 0.6 and >= least_loaded + 0.25"),
                format!("{:.2} vs {:.2}", ca.hit_rate, ll.hit_rate),
                Some(ca.hit_rate >= 0.6 && ca.hit_rate >= ll.hit_rate + 0.25),
            );
            goal(
                &format!("{w}: ttft p90 <= half of least_loaded's"),
                format!("{:.1} vs {:.1} ms", ca.ttft_p90_ms, ll.ttft_p90_ms),
                Some(ca.ttft_p90_ms <= ll.ttft_p90_ms / 2.0),
            );
        }
    }
    if let Some((ll, ca)) = pair("unique") {
        let within = |a: f64, b: f64| (a - b).abs() <= 0.05 * b;
        goal(
            "unique: req/s within 5% of least_loaded",
            format!("{:.1} vs {:.1}", ca.req_per_s, ll.req_per_s),
            Some(ca.req_per_s >= ll.req_per_s * 0.95),
        );
        goal(
            "unique: ttft p50 within 5% of least_loaded",
            format!("{:.1} vs {:.1} ms", ca.ttft_p50_ms, ll.ttft_p50_ms),
            Some(within(ca.ttft_p50_ms, ll.ttft_p50_ms) || ca.ttft_p50_ms < ll.ttft_p50_ms),
        );
    }
    if let Some(hot) = row(r, "hot", "cache_aware", 1) {
        goal(
            "hot: every backend used, no cap exceeded",
            format!(
                "{} of {MOCKS} backends, peak {}/{CAP}",
                hot.backends_used, hot.peak_in_flight
            ),
            Some(hot.backends_used == MOCKS && hot.peak_in_flight <= CAP as u64),
        );
    }
    for w in ["shared", "sessions"] {
        if let (Some(one), Some(two)) = (row(r, w, "cache_aware", 1), row(r, w, "cache_aware", 2)) {
            goal(
                &format!("{w}: two replicas lose <= 10% of one's hit rate"),
                format!("{:.2} vs {:.2}", two.hit_rate, one.hit_rate),
                Some(two.hit_rate >= one.hit_rate * 0.9),
            );
        }
    }
    let rss: Vec<String> = r
        .rss_kib_by_prompts
        .iter()
        .map(|(n, kib)| format!("{n}: {kib}"))
        .collect();
    let grew = r
        .rss_kib_by_prompts
        .windows(2)
        .last()
        .map(|w| w[1].1.saturating_sub(w[0].1));
    goal(
        "index memory bounded (VmRSS KiB by distinct prompts)",
        format!("{} (bound {} KiB)", rss.join(", "), r.index_bound_kib),
        grew.map(|g| g < r.index_bound_kib.max(1024)),
    );
    goals.print();
}
