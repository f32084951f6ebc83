//! `soak`: a bounded soak of the release router on 127.0.0.1 (`make soak`).
//!
//! Starts two `mock-vllm` backends (streaming with small delays) and the `vllm-router`
//! found next to this binary, with client API keys on, then for `SOAK_SECONDS`
//! (default 180) runs in parallel:
//! - normal requests with the key: SSE streams and whole JSON replies, on
//!   `/v1/chat/completions` and `/v1/completions`, each checked byte for byte against
//!   the same request sent directly to a mock (the mock's output is deterministic for
//!   a token count; `id`, `created`, `sent_us` and the mock's `backend` name differ
//!   and are left out of the comparison);
//! - every hostile input the router refuses today (docs/security.md): oversized
//!   bodies (declared and chunked), `Content-Length: 99999999999999`, garbage, negative
//!   and doubled lengths, Content-Length with Transfer-Encoding, `gzip, chunked`, too
//!   many and too large headers, a 20 KiB target, TRACE and BREW, bodies that are not
//!   JSON objects, `{"model":5}`, bad header bytes, a missing or wrong key, clients that
//!   leave mid-stream or before the reply, and clients that send half a head and close;
//! - slow clients, on threads of their own (each takes seconds), against client
//!   timeouts of 2 s (`client_idle_timeout`, `client_body_timeout`,
//!   `client_write_timeout`): a head sent a byte every 200 ms, a connection that sends
//!   nothing, a 5000-byte body that stalls after 1000 bytes, a client that stops
//!   reading a 100000-token stream, each of which the router must close no sooner than
//!   the timeout and at most 5 s after it; and a body cut short by the client's FIN,
//!   which must get 400. Two of the JSON clients pause on their keep-alive connections:
//!   one until the router closes it for idling (it then opens a new one), one for half
//!   the idle timeout (the connection must stay open).
//!
//! Then it checks that every normal request succeeded byte-exact, every hostile and
//! slow one got its expected answer, the router's closed-connection counts
//! (`/metrics`) cover the slow clients it closed and show no shedding, the access log
//! shows no slow head or body forwarded and no stalled stream complete, the router's
//! in-flight counts are back to 0, its thread count (from `/proc/PID/status`) within
//! +32 and its RSS within +20 MiB of their figures after the warm-up (the first
//! quarter of the run, at most 15 s: the first seconds of load start workers, which
//! stay, and touch their stacks, the connection threads' and the allocator's arenas
//! once; the start figures are printed too), and its log shows no shedding of
//! connections (nothing here runs it out of descriptors or threads). It prints one summary
//! table and exits 1 on any failure.
//!
//!
//! The mocks count their own requests in flight: their peaks must stay within the
//! slots the router gives each (`max_concurrent_requests`), and the hostile requests
//! the router must refuse, which carry a tag the mocks count, must never reach them.
//! A keep-alive connection closed with no reply after the client idled about the
//! idle timeout on it (a race with the router's idle close that HTTP/1.1 allows) is
//! counted on a line of its own, and the request sent again.
//!
//! std, serde_json and the harness (`vllm_router_tools`): raw sockets make the
//! hostile clients easy to write.

mod checks;
mod hostile;
mod normal;
mod report;
mod slow;
mod stats;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use vllm_router_tools::http;
use vllm_router_tools::process::{self, Proc};
use vllm_router_tools::procfs::{self, Status};

use checks::{
    check_closed, check_mocks, client_connections, settle_in_flight, settle_mock, settle_threads,
    slow_access,
};
use hostile::hostile_client;
use normal::{json_client, references, stream_client};
use report::Report;
use slow::slow_client;
use stats::Stats;

/// The client key the router is started with.
const KEY: &str = "soak-key-5b1c9e2f";
/// `max_body_bytes` of the router under soak: small, so oversized bodies are cheap.
const MAX_BODY: usize = 256 * 1024;
/// Slots per backend.
const SLOTS: u32 = 16;
/// Delay before each token of the mocks.
const MOCK_DELAY_MS: u32 = 5;
/// Client threads of each sort.
const STREAM_CLIENTS: usize = 4;
const JSON_CLIENTS: usize = 4;
const HOSTILE_CLIENTS: usize = 4;
/// Token counts of the normal requests.
const TOKENS: [u32; 7] = [1, 2, 5, 8, 13, 21, 32];
/// Requests on one keep-alive connection of a JSON client.
const KEEP_ALIVE_REQUESTS: usize = 20;
/// Socket timeouts of every client: a stuck reply is an error, not a hang.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// What the router logs when its accept loop sheds connections (`client::listener::accept_loop`).
const ACCEPT_TROUBLE: [&str; 4] = [
    "cannot accept connections",
    "out of file descriptors",
    "cannot start a connection thread",
    "cannot start worker thread",
];
/// The bounds on the router at the end, against its figures after the warm-up.
const MAX_THREAD_GROWTH: i64 = 32;
const MAX_RSS_GROWTH_KIB: i64 = 20 * 1024;
/// The longest warm-up before the RSS baseline is read (a quarter of a shorter run).
const WARMUP_SECONDS: f64 = 15.0;
/// Seconds between two progress lines.
const PROGRESS_EVERY: u64 = 10;
/// The router's `client_idle_timeout`, `client_body_timeout` and
/// `client_write_timeout` under soak, in seconds: short, so that the slow clients are
/// closed within seconds. No normal client idles or stalls this long by accident.
const CLIENT_TIMEOUT_SECS: u64 = 2;
const CLIENT_TIMEOUT: Duration = Duration::from_secs(CLIENT_TIMEOUT_SECS);
/// How much later than its timeout the router may close a slow client (the janitor
/// looks every quarter timeout; the rest is room for a loaded machine).
const CLOSE_SLACK: Duration = Duration::from_secs(5);
/// How much earlier than its timeout a close may be seen: the client's clock starts
/// a little before the router's, so only rounding is allowed for.
const EARLY_SLACK: Duration = Duration::from_millis(100);
/// A keep-alive connection the router closes is taken for an idle close (and opened
/// again) only if the client has been idle at least this long on it.
const IDLE_CLOSE_AFTER: Duration = Duration::from_millis(CLIENT_TIMEOUT_SECS * 1000 - 250);
/// Slow-client threads, each going through every slow kind from its own place.
const SLOW_CLIENTS: usize = 5;
/// The gap between two bytes of the slowloris head.
const SLOWLORIS_GAP: Duration = Duration::from_millis(200);
/// Tokens of the stream whose client stops reading: some 20 MB sent at once
/// (`x-mock-delay-ms: 0`), more than every socket buffer on the way holds.
const STALLED_TOKENS: u32 = 100_000;
const CHAT: &str = "/v1/chat/completions";
const COMPLETIONS: &str = "/v1/completions";

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("soak: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<bool, String> {
    let seconds: f64 = match std::env::var("SOAK_SECONDS") {
        Ok(s) => s
            .trim()
            .parse()
            .ok()
            .filter(|s: &f64| s.is_finite() && *s > 0.0)
            .ok_or_else(|| format!("SOAK_SECONDS must be a positive number, not {s:?}"))?,
        Err(_) => 180.0,
    };
    let bin_dir = process::bin_dir()?;
    let dir = std::env::temp_dir().join(format!("vllm-router-soak-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;

    let delay = MOCK_DELAY_MS.to_string();
    let mock_a = start_mock(&bin_dir, "soak-a", &delay)?;
    let mock_b = start_mock(&bin_dir, "soak-b", &delay)?;
    let config = format!(
        "[servers]\nservers = [\n  {{ url = \"http://{}\", max_concurrent_requests = {SLOTS} }},\n  \
         {{ url = \"http://{}\", max_concurrent_requests = {SLOTS} }},\n]\n\n[config]\n\
         api_keys = [\"{KEY}\"]\nmax_body_bytes = {MAX_BODY}\nhealth_check_interval = 1\n\
         client_idle_timeout = {CLIENT_TIMEOUT_SECS}\nclient_body_timeout = {CLIENT_TIMEOUT_SECS}\n\
         client_write_timeout = {CLIENT_TIMEOUT_SECS}\n",
        mock_a.1, mock_b.1
    );
    let config_path = dir.join("servers.toml");
    std::fs::write(&config_path, config).map_err(|e| format!("cannot write the config: {e}"))?;
    let mut router_cmd = Command::new(bin_dir.join("vllm-router"));
    router_cmd
        .args(["run", "--host", "127.0.0.1", "--port", "0", "--config"])
        .arg(&config_path)
        .env("LOG_DIR", dir.join("logs"))
        .env_remove("API_KEY")
        .stdin(Stdio::null())
        .stderr(Stdio::null());
    let (mut router, addr) = process::spawn_listening(router_cmd, "vllm-router")
        .map_err(|e| format!("{e} (build it first: make build)"))?;
    wait_ready(addr)?;
    let references = references(mock_a.1, mock_b.1)?;
    // The references went to the mocks directly, all at once: the peaks and tags
    // checked at the end are the routed load's alone.
    for mock in [mock_a.1, mock_b.1] {
        let reset = http::fetch(mock, "POST", "/mock/reset", &[], b"", IO_TIMEOUT)?;
        if reset.status != 200 {
            return Err(format!(
                "POST /mock/reset on {mock}: status {}",
                reset.status
            ));
        }
    }
    let pid = router.pid();
    let cold = procfs::status(pid)?;
    let warmup = Duration::from_secs_f64((seconds / 4.0).min(WARMUP_SECONDS));
    println!(
        "soak: router {addr} (pid {pid}), mocks {} and {}, {seconds} s (the first {:.0} s \
         warm up), logs in {}",
        mock_a.1,
        mock_b.1,
        warmup.as_secs_f64(),
        dir.display()
    );

    let stats = Arc::new(Stats::default());
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let references = Arc::new(references);
    let mut clients = Vec::new();
    for t in 0..STREAM_CLIENTS {
        let (stats, references) = (Arc::clone(&stats), Arc::clone(&references));
        clients.push(thread::spawn(move || {
            stream_client(addr, t, deadline, &references, &stats)
        }));
    }
    for t in 0..JSON_CLIENTS {
        let (stats, references) = (Arc::clone(&stats), Arc::clone(&references));
        clients.push(thread::spawn(move || {
            json_client(addr, t, deadline, &references, &stats)
        }));
    }
    for t in 0..HOSTILE_CLIENTS {
        let stats = Arc::clone(&stats);
        clients.push(thread::spawn(move || {
            hostile_client(addr, t, deadline, &stats)
        }));
    }
    for t in 0..SLOW_CLIENTS {
        let stats = Arc::clone(&stats);
        clients.push(thread::spawn(move || {
            slow_client(addr, t, deadline, &stats)
        }));
    }
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (sampling, stats) = (Arc::clone(&sampling), Arc::clone(&stats));
        thread::spawn(move || sample(pid, warmup, &sampling, &stats))
    };
    for client in clients {
        if client.join().is_err() {
            stats.record(
                "client thread",
                Some("a client thread panicked".into()),
                None,
            );
        }
    }
    sampling.store(false, Ordering::SeqCst);
    let samples = sampler.join().unwrap_or_default();

    let mut failures = Vec::new();
    // Settle: every slot back, the mocks idle, the connection threads gone.
    let (in_flight, queue) = settle_in_flight(addr);
    if in_flight.iter().any(|&n| n != 0) || queue != Some(0) {
        failures.push(format!(
            "in-flight counts {in_flight:?}, queue {queue:?} after the load"
        ));
    }
    let mocks_idle = [mock_a.1, mock_b.1].map(settle_mock);
    if mocks_idle.iter().any(|n| *n != Some(0)) {
        failures.push(format!("mocks still count {mocks_idle:?} in flight"));
    }
    // What the mocks saw: never more at once than the router's slots, and no request
    // the router had to refuse.
    let mocks = check_mocks(&[mock_a.1, mock_b.1], u64::from(SLOTS));
    failures.extend(mocks.failures.iter().cloned());
    // Threads and RSS are held against the figures after the warm-up: the first
    // seconds of load start workers (they stay), and touch their stacks, the
    // connection threads' stacks and the allocator's arenas once, for good (see the
    // report); a leak keeps growing after that.
    let warm = samples.warm.unwrap_or(cold);
    let end = settle_threads(pid, warm.threads)?;
    let thread_growth = end.threads as i64 - warm.threads as i64;
    let rss_growth = end.rss_kib as i64 - warm.rss_kib as i64;
    if thread_growth > MAX_THREAD_GROWTH {
        failures.push(format!(
            "threads {} after the warm-up -> {} (+{thread_growth}, bound +{MAX_THREAD_GROWTH})",
            warm.threads, end.threads
        ));
    }
    if rss_growth > MAX_RSS_GROWTH_KIB {
        failures.push(format!(
            "RSS {} KiB after the warm-up -> {} KiB at the end (+{rss_growth} KiB, bound \
             +{MAX_RSS_GROWTH_KIB} KiB)",
            warm.rss_kib, end.rss_kib
        ));
    }
    match router.0.try_wait() {
        Ok(None) => {}
        other => failures.push(format!("the router exited: {other:?}")),
    }
    let healthy = http::get_json(addr, "/health")
        .ok()
        .and_then(|h| h["healthy_servers"].as_u64());
    if healthy != Some(2) {
        failures.push(format!("healthy servers at the end: {healthy:?}"));
    }
    // Nothing here exhausts descriptors or threads, so the accept loop sheds nothing.
    let log = std::fs::read_to_string(dir.join("logs").join("vllm-router.log")).unwrap_or_default();
    let restarts = ACCEPT_TROUBLE
        .iter()
        .map(|line| log.matches(line).count())
        .sum::<usize>();
    if restarts > 0 {
        failures.push(format!(
            "the router logged {restarts} accept problem(s) ({ACCEPT_TROUBLE:?}) with no \
             descriptor or thread shortage"
        ));
    }

    let table = stats.table();
    // The router's own count of the connections it closed, against the slow clients
    // it closed as each expected.
    let closed = client_connections(addr);
    match &closed {
        Ok(c) => failures.extend(check_closed(c, &table)),
        Err(e) => failures.push(format!("cannot read the closed-connection counts: {e}")),
    }
    // The access log: which slow requests reached a backend, and how they ended.
    let structured = std::fs::read_to_string(dir.join("logs").join("vllm-router-structured.log"))
        .unwrap_or_default();
    let access = slow_access(&structured, &table);
    failures.extend(access.failures.iter().cloned());
    let kind_errors: u64 = table.values().map(|k| k.errors).sum();
    let normal: u64 = table
        .iter()
        .filter(|(name, _)| name.starts_with("normal"))
        .map(|(_, k)| k.sent)
        .sum();
    let exact: u64 = normal
        - table
            .iter()
            .filter(|(name, _)| name.starts_with("normal"))
            .map(|(_, k)| k.errors)
            .sum::<u64>();
    if kind_errors > 0 {
        failures.push(format!("{kind_errors} requests did not get their answer"));
    }
    if normal == 0 {
        failures.push("no normal request was sent".into());
    }

    let report = Report {
        table: &table,
        exact,
        normal,
        in_flight: &in_flight,
        queue,
        mocks_idle: &mocks_idle,
        cold,
        warm,
        warmup,
        end,
        samples,
        restarts,
        closed: closed.ok(),
        access: &access.summary,
        mocks: &mocks.summary,
    };
    let passed = failures.is_empty();
    print!("{}", report.render(&failures));
    drop(router);
    if passed {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        println!("router logs kept in {}", dir.join("logs").display());
    }
    Ok(passed)
}

/// The router's figures while the load runs: peaks, and the figure once warmed up.
#[derive(Default)]
struct Samples {
    peak_rss_kib: u64,
    peak_threads: u64,
    warm: Option<Status>,
}

/// Samples the router every 0.5 s until `sampling` ends, printing a progress line
/// every `PROGRESS_EVERY` seconds.
fn sample(pid: u32, warmup: Duration, sampling: &AtomicBool, stats: &Stats) -> Samples {
    let started = Instant::now();
    let mut samples = Samples::default();
    let mut reported = 0;
    while sampling.load(Ordering::SeqCst) {
        if let Ok(s) = procfs::status(pid) {
            samples.peak_rss_kib = samples.peak_rss_kib.max(s.rss_kib);
            samples.peak_threads = samples.peak_threads.max(s.threads);
            if samples.warm.is_none() && started.elapsed() >= warmup {
                samples.warm = Some(s);
            }
            let secs = started.elapsed().as_secs();
            if secs >= reported + PROGRESS_EVERY {
                reported = secs;
                let (sent, errors) = stats.totals();
                println!(
                    "  {secs:>4} s: {sent} requests, {errors} errors; router RSS {:.1} MiB, \
                     {} threads",
                    s.rss_kib as f64 / 1024.0,
                    s.threads
                );
            }
        }
        thread::sleep(Duration::from_millis(500));
    }
    samples
}

/// A `mock-vllm` with the soak's delay, its address.
fn start_mock(bin_dir: &Path, id: &str, delay_ms: &str) -> Result<(Proc, SocketAddr), String> {
    let mut cmd = Command::new(bin_dir.join("mock-vllm"));
    cmd.args(["--host", "127.0.0.1", "--port", "0", "--id", id])
        .args(["--delay-ms", delay_ms])
        .stdin(Stdio::null())
        .stderr(Stdio::null());
    process::spawn_listening(cmd, "mock-vllm")
        .map_err(|e| format!("{e} (build it first: make tools)"))
}

/// Waits until both backends are healthy and their model lists are known.
fn wait_ready(addr: SocketAddr) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(h) = http::get_json(addr, "/health") {
            let models_known = h["servers"].as_array().is_some_and(|s| {
                s.iter()
                    .all(|s| s["models"] == serde_json::json!(["mock-model"]))
            });
            if h["healthy_servers"] == 2 && models_known {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err("the router did not see both mocks healthy within 15 s".into());
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// The key header line of every request that should pass.
fn auth() -> String {
    format!("Authorization: Bearer {KEY}\r\n")
}
