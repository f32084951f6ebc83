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
//! - every hostile input the router refuses today (README, "Security"): oversized
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
//! std and serde_json only: raw sockets make the hostile clients easy to write.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

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
/// What the router logs when its accept loop sheds connections (`server::accept_loop`).
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
    let bin_dir = std::env::current_exe()
        .map_err(|e| format!("cannot find this binary: {e}"))?
        .parent()
        .map(Path::to_path_buf)
        .ok_or("this binary has no directory")?;
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
        mock_a.addr, mock_b.addr
    );
    let config_path = dir.join("servers.toml");
    std::fs::write(&config_path, config).map_err(|e| format!("cannot write the config: {e}"))?;
    let mut router_cmd = Command::new(bin_dir.join("vllm-router"));
    router_cmd
        .args(["run", "--host", "127.0.0.1", "--port", "0", "--config"])
        .arg(&config_path)
        .env("LOG_DIR", dir.join("logs"))
        .env_remove("API_KEY")
        .stderr(Stdio::null());
    let mut router = spawn_listening(router_cmd, "vllm-router")?;
    let addr = router.addr;
    wait_ready(addr)?;
    let references = references(mock_a.addr, mock_b.addr)?;
    let pid = router.child.id();
    let cold = proc_status(pid)?;
    let warmup = Duration::from_secs_f64((seconds / 4.0).min(WARMUP_SECONDS));
    println!(
        "soak: router {addr} (pid {pid}), mocks {} and {}, {seconds} s (the first {:.0} s \
         warm up), logs in {}",
        mock_a.addr,
        mock_b.addr,
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
    let mocks_idle = [mock_a.addr, mock_b.addr].map(settle_mock);
    if mocks_idle.iter().any(|n| *n != Some(0)) {
        failures.push(format!("mocks still count {mocks_idle:?} in flight"));
    }
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
    match router.child.try_wait() {
        Ok(None) => {}
        other => failures.push(format!("the router exited: {other:?}")),
    }
    let healthy = get_json(addr, "/health")
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
    warm: Option<ProcStatus>,
}

/// Samples the router every 0.5 s until `sampling` ends, printing a progress line
/// every `PROGRESS_EVERY` seconds.
fn sample(pid: u32, warmup: Duration, sampling: &AtomicBool, stats: &Stats) -> Samples {
    let started = Instant::now();
    let mut samples = Samples::default();
    let mut reported = 0;
    while sampling.load(Ordering::SeqCst) {
        if let Ok(s) = proc_status(pid) {
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

/// Everything the summary shows.
struct Report<'a> {
    table: &'a BTreeMap<String, Kind>,
    exact: u64,
    normal: u64,
    in_flight: &'a [u64],
    queue: Option<u64>,
    mocks_idle: &'a [Option<u64>],
    cold: ProcStatus,
    warm: ProcStatus,
    warmup: Duration,
    end: ProcStatus,
    samples: Samples,
    restarts: usize,
    /// `vllm_router_client_connections_closed_total` by reason, and the open gauge.
    closed: Option<Closed>,
    access: &'a str,
}

impl Report<'_> {
    fn render(&self, failures: &[String]) -> String {
        let mib = |kib: u64| kib as f64 / 1024.0;
        let label = |name: &str, k: &Kind| format!("{name} ({})", k.expect);
        let width = self
            .table
            .iter()
            .map(|(name, k)| label(name, k).len())
            .max()
            .unwrap_or(0)
            .max(42);
        let rule = "-".repeat(width + 28);
        let mut out = String::new();
        let row = |out: &mut String, name: &str, sent: u64, errors: u64| {
            let _ = writeln!(
                out,
                "{name:<width$} {sent:>8} {:>9} {errors:>8}",
                sent - errors
            );
        };
        let _ = writeln!(
            out,
            "\n{:<width$} {:>8} {:>9} {:>8}\n{rule}",
            "kind (expected answer)", "sent", "answered", "errors"
        );
        for (name, k) in self.table {
            row(&mut out, &label(name, k), k.sent, k.errors);
        }
        let total: u64 = self.table.values().map(|k| k.sent).sum();
        let errors: u64 = self.table.values().map(|k| k.errors).sum();
        let _ = writeln!(out, "{rule}");
        row(&mut out, "total", total, errors);
        let _ = writeln!(
            out,
            "\nbyte-exact normal replies: {} of {} (vs. the same request sent to a mock)",
            self.exact, self.normal
        );
        for (name, k) in self.table.iter().filter(|(_, k)| !k.latencies.is_empty()) {
            let mut l = k.latencies.clone();
            l.sort();
            let at = |q: f64| l[((l.len() - 1) as f64 * q) as usize].as_secs_f64() * 1000.0;
            let timing = if k.timing.is_empty() {
                "latency"
            } else {
                k.timing
            };
            let _ = writeln!(
                out,
                "{name} {timing}: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
                at(0.5),
                at(0.99),
                at(1.0)
            );
        }
        match &self.closed {
            Some(c) => {
                let by_reason: Vec<String> = c
                    .by_reason
                    .iter()
                    .map(|(r, n)| format!("{r} {n}"))
                    .collect();
                let _ = writeln!(
                    out,
                    "client connections closed by the router: {}; open at the end: {}",
                    by_reason.join(", "),
                    c.open.map_or("?".into(), |n| n.to_string())
                );
            }
            None => {
                let _ = writeln!(out, "client connections closed by the router: unknown");
            }
        }
        let _ = writeln!(out, "slow requests in the access log: {}", self.access);
        let _ = writeln!(
            out,
            "router in flight at the end: {:?}, queue {:?}; mocks in flight: {:?}",
            self.in_flight, self.queue, self.mocks_idle
        );
        let _ = writeln!(
            out,
            "router RSS:     start {:.1} MiB, after {:.0} s warm-up {:.1} MiB, peak {:.1} MiB, \
             end {:.1} MiB ({:+.1} MiB from the warm-up, bound +{} MiB; {:+.1} MiB from the start)",
            mib(self.cold.rss_kib),
            self.warmup.as_secs_f64(),
            mib(self.warm.rss_kib),
            mib(self.samples.peak_rss_kib),
            mib(self.end.rss_kib),
            (self.end.rss_kib as f64 - self.warm.rss_kib as f64) / 1024.0,
            MAX_RSS_GROWTH_KIB / 1024,
            (self.end.rss_kib as f64 - self.cold.rss_kib as f64) / 1024.0,
        );
        let _ = writeln!(
            out,
            "router threads: start {}, after the warm-up {}, peak {}, end {} ({:+} from the \
             warm-up, bound +{MAX_THREAD_GROWTH})",
            self.cold.threads,
            self.warm.threads,
            self.samples.peak_threads,
            self.end.threads,
            self.end.threads as i64 - self.warm.threads as i64
        );
        let _ = writeln!(out, "accept problems in the router log: {}", self.restarts);
        for (name, k) in self.table {
            for sample in &k.samples {
                let _ = writeln!(out, "  {name}: {sample}");
            }
        }
        for f in failures {
            let _ = writeln!(out, "FAIL: {f}");
        }
        let verdict = if failures.is_empty() {
            "PASSED"
        } else {
            "FAILED"
        };
        let _ = writeln!(out, "soak {verdict}");
        out
    }
}

// ---------------------------------------------------------------- processes

/// A child process on 127.0.0.1, killed on drop.
struct Running {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_mock(bin_dir: &Path, id: &str, delay_ms: &str) -> Result<Running, String> {
    let mut cmd = Command::new(bin_dir.join("mock-vllm"));
    cmd.args(["--host", "127.0.0.1", "--port", "0", "--id", id])
        .args(["--delay-ms", delay_ms])
        .stderr(Stdio::null());
    spawn_listening(cmd, "mock-vllm")
}

/// Spawns `cmd` and reads the address from the `listening on ...` line it prints first.
fn spawn_listening(mut cmd: Command, what: &str) -> Result<Running, String> {
    cmd.stdout(Stdio::piped()).stdin(Stdio::null());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {what} (build it first: make build): {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        if let Some(Ok(line)) = lines.next() {
            let _ = tx.send(line);
        }
        // Keep draining so the child never blocks on a full pipe.
        for _ in lines {}
    });
    let line = rx.recv_timeout(Duration::from_secs(20));
    let addr = line.as_ref().ok().and_then(|line| {
        line.rsplit("listening on ")
            .next()
            .map(|a| a.trim_start_matches("http://"))
            .and_then(|a| a.parse().ok())
    });
    let running = |addr| Running { child, addr };
    match addr {
        Some(addr) => Ok(running(addr)),
        None => {
            drop(running(SocketAddr::from(([127, 0, 0, 1], 0))));
            Err(format!("{what} printed no listening address: {line:?}"))
        }
    }
}

/// Waits until both backends are healthy and their model lists are known.
fn wait_ready(addr: SocketAddr) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(h) = get_json(addr, "/health") {
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

/// What `/proc/PID/status` says of the router.
#[derive(Debug, Clone, Copy, Default)]
struct ProcStatus {
    rss_kib: u64,
    threads: u64,
}

fn proc_status(pid: u32) -> Result<ProcStatus, String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("cannot read /proc/{pid}/status: {e}"))?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| format!("no {name} in /proc/{pid}/status"))
    };
    Ok(ProcStatus {
        rss_kib: field("VmRSS:")?,
        threads: field("Threads:")?,
    })
}

/// Waits up to 15 s for the router's in-flight counts and queue to be 0; returns the
/// last reading.
fn settle_in_flight(addr: SocketAddr) -> (Vec<u64>, Option<u64>) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let reading = get_json(addr, "/load-stats").ok().map(|doc| {
            let counts: Vec<u64> = doc["servers"]
                .as_array()
                .map(|s| s.iter().filter_map(|s| s["in_flight"].as_u64()).collect())
                .unwrap_or_default();
            (counts, doc["summary"]["queue_length"].as_u64())
        });
        let (counts, queue) = reading.unwrap_or_default();
        let zero = counts.len() == 2 && counts.iter().all(|&n| n == 0) && queue == Some(0);
        if zero || Instant::now() > deadline {
            return (counts, queue);
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// A mock's own in-flight count, once 0 or after 15 s.
fn settle_mock(addr: SocketAddr) -> Option<u64> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let n = get_json(addr, "/mock/stats")
            .ok()
            .and_then(|s| s["in_flight"].as_u64());
        if n == Some(0) || Instant::now() > deadline {
            return n;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Settles for 2 s, then waits up to 15 s more for the thread count to come back to
/// `start` (connection threads end with their connections; workers stay); returns the
/// last reading.
fn settle_threads(pid: u32, start: u64) -> Result<ProcStatus, String> {
    thread::sleep(Duration::from_secs(2));
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now = proc_status(pid)?;
        if now.threads <= start + 4 || Instant::now() > deadline {
            return Ok(now);
        }
        thread::sleep(Duration::from_millis(200));
    }
}

// ---------------------------------------------------------------- counting

/// Requests sent and failed, per kind.
#[derive(Default)]
struct Stats {
    kinds: Mutex<BTreeMap<String, Kind>>,
}

#[derive(Default, Clone)]
struct Kind {
    expect: String,
    sent: u64,
    errors: u64,
    /// The first few errors, for the report.
    samples: Vec<String>,
    /// How long each request took, for the normal kinds; until the close or the
    /// answer, for the slow ones.
    latencies: Vec<Duration>,
    /// What `latencies` measure, in the report; "latency" when empty.
    timing: &'static str,
}

impl Stats {
    fn declare(&self, name: &str, expect: &str) {
        let mut kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        kinds.entry(name.to_owned()).or_default().expect = expect.to_owned();
    }

    /// Declares a kind whose times are not request latencies.
    fn declare_timed(&self, name: &str, expect: &str, timing: &'static str) {
        self.declare(name, expect);
        let mut kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        kinds.entry(name.to_owned()).or_default().timing = timing;
    }

    fn record(&self, name: &str, error: Option<String>, took: Option<Duration>) {
        let mut kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        let kind = kinds.entry(name.to_owned()).or_default();
        kind.sent += 1;
        kind.latencies.extend(took);
        if let Some(e) = error {
            kind.errors += 1;
            if kind.samples.len() < 5 {
                kind.samples.push(e);
            }
        }
    }

    /// Requests sent and errors, over every kind.
    fn totals(&self) -> (u64, u64) {
        let kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        kinds
            .values()
            .fold((0, 0), |(s, e), k| (s + k.sent, e + k.errors))
    }

    fn table(&self) -> BTreeMap<String, Kind> {
        self.kinds.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

// ---------------------------------------------------------------- HTTP client

/// One client connection.
struct Conn {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

/// A reply read whole.
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    fn text(&self) -> String {
        let text = String::from_utf8_lossy(&self.body);
        text.chars().take(300).collect()
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

impl Conn {
    fn open(addr: SocketAddr) -> io::Result<Conn> {
        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(Conn { stream, reader })
    }

    fn send(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.stream.write_all(bytes).map_err(|e| {
            if is_reset(&e) {
                format!("{UNANSWERED} (send: {e})")
            } else {
                format!("send: {e}")
            }
        })
    }

    fn read_head(&mut self) -> Result<(u16, Vec<(String, String)>), String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => return Err(format!("{UNANSWERED} (end of stream)")),
            Err(e) if line.is_empty() && is_reset(&e) => return Err(format!("{UNANSWERED} ({e})")),
            Err(e) => return Err(format!("reading the status line: {e}")),
            Ok(_) => {}
        }
        let status = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line {line:?}"))?;
        let mut headers = Vec::new();
        loop {
            line.clear();
            self.reader
                .read_line(&mut line)
                .map_err(|e| format!("reading a header: {e}"))?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let (n, v) = l
                .split_once(':')
                .ok_or_else(|| format!("bad header line {l:?}"))?;
            headers.push((n.trim().to_owned(), v.trim().to_owned()));
        }
        Ok((status, headers))
    }

    /// One chunk of a chunked body; `None` at the terminating chunk.
    fn read_chunk(&mut self) -> Result<Option<Vec<u8>>, String> {
        let mut line = String::new();
        self.reader
            .read_line(&mut line)
            .map_err(|e| format!("reading a chunk size: {e}"))?;
        let size = usize::from_str_radix(line.trim_end(), 16)
            .map_err(|_| format!("bad chunk size line {line:?}"))?;
        let mut data = vec![0; size + 2];
        self.reader
            .read_exact(&mut data)
            .map_err(|e| format!("reading a chunk: {e}"))?;
        if !data.ends_with(b"\r\n") {
            return Err("chunk not followed by CRLF".into());
        }
        data.truncate(size);
        if size == 0 {
            // The terminating chunk: its CRLF was read above, no trailers follow.
            return Ok(None);
        }
        Ok(Some(data))
    }

    /// A whole reply, framed as its head says.
    fn read_reply(&mut self) -> Result<Reply, String> {
        let (status, headers) = self.read_head()?;
        let mut body = Vec::new();
        if header(&headers, "transfer-encoding")
            .is_some_and(|te| te.eq_ignore_ascii_case("chunked"))
        {
            while let Some(chunk) = self.read_chunk()? {
                body.extend_from_slice(&chunk);
            }
        } else if let Some(len) = header(&headers, "content-length") {
            let len: usize = len.parse().map_err(|_| format!("bad length {len:?}"))?;
            body.resize(len, 0);
            self.reader
                .read_exact(&mut body)
                .map_err(|e| format!("reading the body: {e}"))?;
        } else if status != 204 && status != 304 {
            self.reader
                .read_to_end(&mut body)
                .map_err(|e| format!("reading the body: {e}"))?;
        }
        Ok(Reply {
            status,
            headers,
            body,
        })
    }
}

/// The start of every error that means the connection was closed before a single
/// byte of a reply came: the only failure that may be the router closing an idle
/// keep-alive connection.
const UNANSWERED: &str = "closed with no reply";

/// An error that says the peer closed or reset the connection.
fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof
    )
}

/// A request with `Host`, then `extra` header lines (each ending in CRLF), then `body`.
fn raw(method: &str, target: &str, extra: &str, body: &[u8]) -> Vec<u8> {
    let mut bytes =
        format!("{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n").into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// A JSON POST with a Content-Length, the key when given, and `Connection: close`
/// when asked.
fn json_post(target: &str, body: &str, key: Option<&str>, close: bool) -> Vec<u8> {
    let mut extra = format!(
        "Content-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(key) = key {
        let _ = write!(extra, "Authorization: Bearer {key}\r\n");
    }
    if close {
        extra.push_str("Connection: close\r\n");
    }
    raw("POST", target, &extra, body.as_bytes())
}

fn get(addr: SocketAddr, path: &str) -> Result<Reply, String> {
    let mut conn = Conn::open(addr).map_err(|e| format!("connect: {e}"))?;
    conn.send(&raw("GET", path, "Connection: close\r\n", b""))?;
    conn.read_reply()
}

fn get_json(addr: SocketAddr, path: &str) -> Result<Value, String> {
    let reply = get(addr, path)?;
    serde_json::from_slice(&reply.body).map_err(|e| format!("{path}: not JSON ({e})"))
}

// ---------------------------------------------------------------- normal requests

/// One normal request: endpoint, streamed or not, token count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Normal {
    path: &'static str,
    stream: bool,
    tokens: u32,
}

impl Normal {
    fn all() -> Vec<Normal> {
        let mut all = Vec::new();
        for path in [CHAT, COMPLETIONS] {
            for stream in [true, false] {
                for tokens in TOKENS {
                    all.push(Normal {
                        path,
                        stream,
                        tokens,
                    });
                }
            }
        }
        all
    }

    /// The body: the same bytes every time for the same request, so the mock's
    /// `usage` (which counts body bytes) is the same too.
    fn body(&self) -> String {
        let prompt = if self.path == CHAT {
            r#""messages":[{"role":"user","content":"soak"}]"#
        } else {
            r#""prompt":"soak""#
        };
        format!(
            r#"{{"model":"mock-model",{prompt},"max_tokens":{},"stream":{}}}"#,
            self.tokens, self.stream
        )
    }

    /// Sends it on `conn` (the key when given) and reads the reply into its
    /// comparable form.
    fn run(&self, conn: &mut Conn, key: Option<&str>, close: bool) -> Result<Output, String> {
        conn.send(&json_post(self.path, &self.body(), key, close))?;
        let reply = conn.read_reply()?;
        if reply.status != 200 {
            return Err(format!("status {}: {}", reply.status, reply.text()));
        }
        let ctype = reply.header("content-type").unwrap_or_default();
        let wanted = if self.stream {
            "text/event-stream"
        } else {
            "application/json"
        };
        if !ctype.starts_with(wanted) {
            return Err(format!("Content-Type {ctype:?}, not {wanted}"));
        }
        if self.stream {
            Output::of_stream(&reply.body)
        } else {
            Output::of_json(&reply.body)
        }
    }
}

/// A reply in the form compared byte for byte: the generated text, and every JSON
/// document with the fields that differ between two runs removed.
#[derive(Debug, PartialEq)]
struct Output {
    text: String,
    docs: Vec<Value>,
}

/// Fields that differ between two identical requests: ids, times, the mock's name.
const VOLATILE: [&str; 4] = ["id", "created", "sent_us", "backend"];

fn strip(mut doc: Value) -> Value {
    if let Some(map) = doc.as_object_mut() {
        for key in VOLATILE {
            map.remove(key);
        }
    }
    doc
}

/// The generated text of a choice: chat message, chat delta or completion text.
fn choice_text(doc: &Value) -> Result<&str, String> {
    let choice = &doc["choices"][0];
    choice["message"]["content"]
        .as_str()
        .or_else(|| choice["delta"]["content"].as_str())
        .or_else(|| choice["text"].as_str())
        .ok_or_else(|| format!("no text in {doc}"))
}

impl Output {
    fn of_json(body: &[u8]) -> Result<Output, String> {
        let doc: Value = serde_json::from_slice(body).map_err(|e| {
            format!(
                "not JSON ({e}): {}",
                String::from_utf8_lossy(&body[..body.len().min(300)])
            )
        })?;
        Ok(Output {
            text: choice_text(&doc)?.to_owned(),
            docs: vec![strip(doc)],
        })
    }

    /// An SSE body: `data: {json}` events, each ending in a blank line, then
    /// `data: [DONE]`.
    fn of_stream(body: &[u8]) -> Result<Output, String> {
        let text = std::str::from_utf8(body).map_err(|_| "the stream is not UTF-8")?;
        let events = text
            .strip_suffix("\n\n")
            .ok_or_else(|| format!("the stream does not end with a blank line: {text:?}"))?;
        let mut out = Output {
            text: String::new(),
            docs: Vec::new(),
        };
        let mut done = false;
        for event in events.split("\n\n") {
            if done {
                return Err(format!("an event after [DONE]: {event:?}"));
            }
            let data = event
                .strip_prefix("data: ")
                .ok_or_else(|| format!("not an SSE data event: {event:?}"))?;
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let doc: Value = serde_json::from_str(data)
                .map_err(|e| format!("event not JSON ({e}): {data:?}"))?;
            out.text.push_str(choice_text(&doc)?);
            out.docs.push(strip(doc));
        }
        if !done {
            return Err("the stream has no [DONE]".into());
        }
        Ok(out)
    }
}

/// Each normal request sent directly to both mocks: the reference every routed reply
/// must match. The two mocks must agree, or the premise of the check is wrong.
fn references(a: SocketAddr, b: SocketAddr) -> Result<BTreeMap<Normal, Output>, String> {
    let fetch = |addr: SocketAddr, n: Normal| -> Result<Output, String> {
        let mut conn = Conn::open(addr).map_err(|e| format!("connect: {e}"))?;
        n.run(&mut conn, None, true)
    };
    let handles: Vec<_> = Normal::all()
        .into_iter()
        .map(|n| thread::spawn(move || (n, fetch(a, n), fetch(b, n))))
        .collect();
    let mut refs = BTreeMap::new();
    for h in handles {
        let (n, from_a, from_b) = h.join().map_err(|_| "a reference thread panicked")?;
        let from_a = from_a.map_err(|e| format!("{n:?} sent to a mock: {e}"))?;
        let from_b = from_b.map_err(|e| format!("{n:?} sent to a mock: {e}"))?;
        if from_a != from_b {
            return Err(format!(
                "the two mocks answer {n:?} differently: {from_a:?} / {from_b:?}"
            ));
        }
        let expected_docs = if n.stream { n.tokens as usize } else { 1 };
        if from_a.docs.len() != expected_docs {
            return Err(format!(
                "{n:?}: {} documents from a mock",
                from_a.docs.len()
            ));
        }
        refs.insert(n, from_a);
    }
    Ok(refs)
}

/// Checks a routed reply against its reference.
fn compare(
    n: Normal,
    got: Result<Output, String>,
    refs: &BTreeMap<Normal, Output>,
) -> Option<String> {
    let got = match got {
        Ok(got) => got,
        Err(e) => return Some(format!("{} {} tokens: {e}", n.path, n.tokens)),
    };
    let want = &refs[&n];
    if got.text.as_bytes() != want.text.as_bytes() {
        return Some(format!(
            "{} {} tokens: text {:?}, directly {:?}",
            n.path, n.tokens, got.text, want.text
        ));
    }
    if got.docs != want.docs {
        return Some(format!(
            "{} {} tokens: documents differ: {:?} / directly {:?}",
            n.path, n.tokens, got.docs, want.docs
        ));
    }
    None
}

/// Streams, each on a new connection.
fn stream_client(
    addr: SocketAddr,
    t: usize,
    deadline: Instant,
    refs: &BTreeMap<Normal, Output>,
    stats: &Stats,
) {
    stats.declare("normal stream", "200, byte-exact");
    let all: Vec<Normal> = Normal::all().into_iter().filter(|n| n.stream).collect();
    let mut i = t;
    while Instant::now() < deadline {
        let n = all[i % all.len()];
        i += STREAM_CLIENTS + 1;
        let started = Instant::now();
        let got = Conn::open(addr)
            .map_err(|e| format!("connect: {e}"))
            .and_then(|mut conn| n.run(&mut conn, Some(KEY), true));
        let took = started.elapsed();
        stats.record("normal stream", compare(n, got, refs), Some(took));
    }
}

/// The kinds the keep-alive pauses of the JSON clients are counted under.
const IDLE_CLOSE_KIND: &str = "keep-alive idle past client_idle_timeout";
const SHORT_PAUSE_KIND: &str = "keep-alive pause of half the idle timeout";
/// The pause of JSON client 1, which the router must sit out.
const SHORT_PAUSE: Duration = Duration::from_millis(CLIENT_TIMEOUT_SECS * 500);

/// Whole JSON replies, several on one keep-alive connection. Halfway through each
/// connection, client 0 idles until the router closes the connection for
/// `client_idle_timeout` (and opens a new one), and client 1 pauses for half that
/// (its connection must stay open). A reused connection closed with no reply at all
/// after the client idled about `client_idle_timeout` on it is the router's idle
/// close, whichever client it happens to: the request goes again on a new
/// connection, and it is no error. Any other failure is.
fn json_client(
    addr: SocketAddr,
    t: usize,
    deadline: Instant,
    refs: &BTreeMap<Normal, Output>,
    stats: &Stats,
) {
    stats.declare("normal json", "200, byte-exact");
    stats.declare_timed(
        IDLE_CLOSE_KIND,
        "closed by the router, reopened",
        "closed after",
    );
    if t == 1 {
        stats.declare(SHORT_PAUSE_KIND, "kept open");
    }
    let all: Vec<Normal> = Normal::all().into_iter().filter(|n| !n.stream).collect();
    // The connection, the requests sent on it, and when its last reply ended.
    let mut conn: Option<(Conn, usize, Instant)> = None;
    // A request to send again on a new connection after an idle close.
    let mut again: Option<Normal> = None;
    let mut i = t;
    while Instant::now() < deadline {
        let n = match again.take() {
            Some(n) => n,
            None => {
                let n = all[i % all.len()];
                i += JSON_CLIENTS + 1;
                n
            }
        };
        if conn.is_none() {
            match Conn::open(addr) {
                Ok(c) => conn = Some((c, 0, Instant::now())),
                Err(e) => {
                    stats.record("normal json", Some(format!("connect: {e}")), None);
                    continue;
                }
            }
        }
        let (c, on_conn, idle_since) = conn.as_mut().expect("a connection");
        let mut short_pause = false;
        if *on_conn == KEEP_ALIVE_REQUESTS / 2 {
            if t == 0 {
                let closed = closed_in_time(&c.stream, *idle_since);
                stats.record(IDLE_CLOSE_KIND, closed.as_ref().err().cloned(), closed.ok());
                (conn, again) = (None, Some(n));
                continue;
            }
            if t == 1 {
                thread::sleep(SHORT_PAUSE);
                short_pause = true;
            }
        }
        *on_conn += 1;
        let close = *on_conn >= KEEP_ALIVE_REQUESTS;
        let reused = *on_conn > 1;
        let idle = idle_since.elapsed();
        let started = Instant::now();
        let got = n.run(c, Some(KEY), close);
        let took = started.elapsed();
        *idle_since = Instant::now();
        let unanswered = got.as_ref().is_err_and(|e| e.starts_with(UNANSWERED));
        if short_pause {
            let error = unanswered
                .then(|| format!("closed after a pause of {:.1} s", SHORT_PAUSE.as_secs_f64()));
            stats.record(SHORT_PAUSE_KIND, error, None);
        }
        if unanswered && reused && idle >= IDLE_CLOSE_AFTER {
            stats.record(IDLE_CLOSE_KIND, None, Some(idle));
            (conn, again) = (None, Some(n));
            continue;
        }
        let failed = got.is_err();
        stats.record("normal json", compare(n, got, refs), Some(took));
        if close || failed {
            conn = None;
        }
    }
}

// ---------------------------------------------------------------- hostile requests

/// What a hostile request must get.
#[derive(Clone, Copy)]
enum Expect {
    /// This status, and this error `code` in an OpenAI-style body when given.
    Status(u16, Option<&'static str>),
    /// A stream that starts (200 and a first event); the client then leaves.
    StreamStarts,
    /// Nothing: the client leaves before any reply.
    Nothing,
}

struct Hostile {
    name: &'static str,
    expect: Expect,
    /// The bytes to send; for `Nothing`, the client closes right after.
    request: fn() -> Vec<u8>,
}

fn auth() -> String {
    format!("Authorization: Bearer {KEY}\r\n")
}

/// A chat POST with the key, `Connection: close` and the given extra header lines.
fn hostile_chat(extra: &str, body: &[u8]) -> Vec<u8> {
    let extra = format!("{}Connection: close\r\n{extra}", auth());
    raw("POST", CHAT, &extra, body)
}

/// A chat POST of a JSON `body` with its length.
fn hostile_json(body: &str) -> Vec<u8> {
    hostile_chat(
        &format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ),
        body.as_bytes(),
    )
}

fn pad_headers(n: usize, value: &str) -> String {
    (0..n).map(|i| format!("X-Pad-{i}: {value}\r\n")).collect()
}

fn chunked(body: &[u8], chunk: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for piece in body.chunks(chunk) {
        out.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        out.extend_from_slice(piece);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

const SMALL_CHAT: &str =
    r#"{"model":"mock-model","messages":[{"role":"user","content":"hi"}],"max_tokens":2}"#;

fn hostiles() -> Vec<Hostile> {
    use Expect::{Nothing, Status, StreamStarts};
    vec![
        Hostile {
            name: "body over max_body_bytes",
            expect: Status(413, Some("request_too_large")),
            request: || {
                let body = vec![b' '; MAX_BODY + 1];
                let extra = format!(
                    "Content-Type: application/json\r\nContent-Length: {}\r\n",
                    body.len()
                );
                hostile_chat(&extra, &body)
            },
        },
        Hostile {
            name: "chunked body over max_body_bytes",
            expect: Status(413, Some("request_too_large")),
            request: || {
                let body = chunked(&vec![b' '; MAX_BODY + 16 * 1024], 16 * 1024);
                hostile_chat(
                    "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n",
                    &body,
                )
            },
        },
        Hostile {
            name: "Content-Length: 99999999999999",
            expect: Status(413, Some("request_too_large")),
            request: || {
                hostile_chat(
                    "Content-Type: application/json\r\nContent-Length: 99999999999999\r\n",
                    b"{\"model\":",
                )
            },
        },
        Hostile {
            name: "Content-Length: abc",
            expect: Status(400, Some("bad_request")),
            request: || {
                raw(
                    "POST",
                    "/v1/other",
                    &format!("{}Connection: close\r\nContent-Length: abc\r\n", auth()),
                    b"",
                )
            },
        },
        Hostile {
            name: "Content-Length: -1",
            expect: Status(400, Some("bad_request")),
            request: || {
                raw(
                    "POST",
                    "/v1/other",
                    &format!("{}Connection: close\r\nContent-Length: -1\r\n", auth()),
                    b"",
                )
            },
        },
        Hostile {
            name: "two Content-Lengths",
            expect: Status(400, Some("bad_request")),
            request: || {
                raw(
                    "POST",
                    "/v1/other",
                    &format!(
                        "{}Connection: close\r\nContent-Length: 2\r\nContent-Length: 3\r\n",
                        auth()
                    ),
                    b"{} ",
                )
            },
        },
        Hostile {
            name: "Content-Length + Transfer-Encoding",
            expect: Status(400, None),
            request: || {
                raw(
                    "POST",
                    "/v1/other",
                    &format!(
                        "{}Connection: close\r\nContent-Length: 12\r\nTransfer-Encoding: chunked\r\n",
                        auth()
                    ),
                    b"2\r\n{}\r\n0\r\n\r\n",
                )
            },
        },
        Hostile {
            name: "Transfer-Encoding: gzip, chunked",
            expect: Status(400, Some("bad_request")),
            request: || {
                raw(
                    "POST",
                    "/v1/other",
                    &format!(
                        "{}Connection: close\r\nTransfer-Encoding: gzip, chunked\r\n",
                        auth()
                    ),
                    b"2\r\n{}\r\n0\r\n\r\n",
                )
            },
        },
        Hostile {
            name: "120 headers",
            expect: Status(431, Some("headers_too_large")),
            request: || {
                let extra = format!(
                    "Content-Type: application/json\r\nContent-Length: {}\r\n{}",
                    SMALL_CHAT.len(),
                    pad_headers(120, "v")
                );
                hostile_chat(&extra, SMALL_CHAT.as_bytes())
            },
        },
        Hostile {
            name: "70 KiB of headers",
            expect: Status(431, Some("headers_too_large")),
            request: || {
                let extra = format!(
                    "Content-Type: application/json\r\nContent-Length: {}\r\n{}",
                    SMALL_CHAT.len(),
                    pad_headers(5, &"v".repeat(14 * 1024))
                );
                hostile_chat(&extra, SMALL_CHAT.as_bytes())
            },
        },
        Hostile {
            name: "20 KiB target",
            expect: Status(414, Some("uri_too_long")),
            request: || {
                let target = format!("{CHAT}?pad={}", "a".repeat(20 * 1024));
                let extra = format!(
                    "{}Connection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
                    auth(),
                    SMALL_CHAT.len()
                );
                raw("POST", &target, &extra, SMALL_CHAT.as_bytes())
            },
        },
        Hostile {
            name: "TRACE",
            expect: Status(501, Some("method_not_implemented")),
            request: || {
                raw(
                    "TRACE",
                    CHAT,
                    &format!("{}Connection: close\r\n", auth()),
                    b"",
                )
            },
        },
        Hostile {
            name: "BREW",
            expect: Status(501, Some("method_not_implemented")),
            request: || {
                raw(
                    "BREW",
                    CHAT,
                    &format!("{}Connection: close\r\n", auth()),
                    b"",
                )
            },
        },
        Hostile {
            name: "body not JSON",
            expect: Status(400, Some("bad_request")),
            request: || hostile_json("not json"),
        },
        Hostile {
            name: "JSON array body",
            expect: Status(400, Some("bad_request")),
            request: || hostile_json("[1,2]"),
        },
        Hostile {
            name: "{\"model\":5}",
            expect: Status(400, Some("bad_request")),
            request: || hostile_json(r#"{"model":5}"#),
        },
        Hostile {
            name: "non-ASCII header value",
            expect: Status(400, None),
            request: || {
                let extra = format!(
                    "X-Note: caf\u{e9}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
                    SMALL_CHAT.len()
                );
                hostile_chat(&extra, SMALL_CHAT.as_bytes())
            },
        },
        Hostile {
            name: "bare CR in a header",
            expect: Status(400, None),
            request: || {
                let extra = format!(
                    "X-Note: a\rb\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
                    SMALL_CHAT.len()
                );
                hostile_chat(&extra, SMALL_CHAT.as_bytes())
            },
        },
        Hostile {
            name: "no API key",
            expect: Status(401, Some("invalid_api_key")),
            request: || json_post(CHAT, SMALL_CHAT, None, true),
        },
        Hostile {
            name: "wrong API key",
            expect: Status(401, Some("invalid_api_key")),
            request: || json_post(CHAT, SMALL_CHAT, Some("soak-wrong-key"), true),
        },
        Hostile {
            name: "leaves mid-stream",
            expect: StreamStarts,
            request: || {
                let body = r#"{"model":"mock-model","messages":[{"role":"user","content":"hi"}],"max_tokens":2000,"stream":true}"#;
                json_post(CHAT, body, Some(KEY), true)
            },
        },
        Hostile {
            name: "leaves before the reply",
            expect: Nothing,
            request: || {
                let body = r#"{"model":"mock-model","messages":[{"role":"user","content":"hi"}],"max_tokens":50,"stream":true}"#;
                json_post(CHAT, body, Some(KEY), true)
            },
        },
        Hostile {
            name: "half a head, then close",
            expect: Nothing,
            request: || {
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty".to_vec()
            },
        },
    ]
}

impl Expect {
    fn describe(&self) -> String {
        match self {
            Expect::Status(status, _) => status.to_string(),
            Expect::StreamStarts => "200, then leave".into(),
            Expect::Nothing => "no reply".into(),
        }
    }
}

fn run_hostile(addr: SocketAddr, h: &Hostile) -> Result<(), String> {
    let mut conn = Conn::open(addr).map_err(|e| format!("connect: {e}"))?;
    conn.send(&(h.request)())?;
    match h.expect {
        Expect::Nothing => Ok(()),
        Expect::StreamStarts => {
            let (status, _) = conn.read_head()?;
            if status != 200 {
                return Err(format!("status {status}"));
            }
            match conn.read_chunk()? {
                Some(first) if first.starts_with(b"data: ") => Ok(()),
                other => Err(format!("no first event: {other:?}")),
            }
        }
        Expect::Status(status, code) => {
            let reply = conn.read_reply()?;
            if reply.status != status {
                return Err(format!("status {}: {}", reply.status, reply.text()));
            }
            if let Some(code) = code {
                let doc: Value = serde_json::from_slice(&reply.body)
                    .map_err(|e| format!("not JSON ({e}): {}", reply.text()))?;
                if doc["error"]["code"] != code || !doc["error"]["message"].is_string() {
                    return Err(format!("error body {doc}, code {code} wanted"));
                }
            }
            if status == 401
                && !reply
                    .header("www-authenticate")
                    .is_some_and(|c| c.starts_with("Bearer"))
            {
                return Err("401 without WWW-Authenticate: Bearer".into());
            }
            Ok(())
        }
    }
}

/// Cycles through every hostile input, each client from its own place in the list.
fn hostile_client(addr: SocketAddr, t: usize, deadline: Instant, stats: &Stats) {
    let all = hostiles();
    for h in &all {
        stats.declare(h.name, &h.expect.describe());
    }
    let mut i = t * all.len() / HOSTILE_CLIENTS;
    while Instant::now() < deadline {
        let h = &all[i % all.len()];
        i += 1;
        stats.record(h.name, run_hostile(addr, h).err(), None);
    }
}

// ---------------------------------------------------------------- slow clients

/// A slow client: it breaks one client timeout (or cuts its body short) and checks
/// how, and when, the router ends its connection.
struct Slow {
    name: &'static str,
    expect: &'static str,
    /// What the time it returns measures.
    timing: &'static str,
    /// Runs it once; `n` makes its request id unique.
    run: fn(SocketAddr, u64) -> Result<Duration, String>,
}

const SLOWLORIS: &str = "slowloris head, a byte every 200 ms";
const IDLE_CONNECTION: &str = "connection that sends nothing";
const SLOW_BODY: &str = "body stalls at 1000 of 5000 bytes";
const STALLED_READER: &str = "stops reading a 100000-token stream";
const CUT_BODY: &str = "body cut short: 100 of 5000 bytes, FIN";
/// The request ids of the slow requests that have one, for the access-log checks.
const SLOWLORIS_ID: &str = "soak-slowloris-";
const SLOW_BODY_ID: &str = "soak-slow-body-";
const STALLED_ID: &str = "soak-stalled-";
const CUT_BODY_ID: &str = "soak-cut-body-";
/// The declared length of the slow and cut bodies.
const SLOW_BODY_LEN: usize = 5000;

fn slows() -> Vec<Slow> {
    vec![
        Slow {
            name: SLOWLORIS,
            expect: "closed (idle), never forwarded",
            timing: "closed after",
            run: slowloris,
        },
        Slow {
            name: IDLE_CONNECTION,
            expect: "closed (idle)",
            timing: "closed after",
            run: idle_connection,
        },
        Slow {
            name: SLOW_BODY,
            expect: "closed (slow_body), never forwarded",
            timing: "closed after",
            run: slow_body,
        },
        Slow {
            name: STALLED_READER,
            expect: "closed (stalled_write), cut",
            timing: "closed after",
            run: stalled_reader,
        },
        Slow {
            name: CUT_BODY,
            expect: "400, never forwarded",
            timing: "answered after",
            run: cut_body,
        },
    ]
}

/// Goes through every slow client, each thread from its own place in the list: they
/// take seconds each, so they run beside the hostile clients, not among them.
fn slow_client(addr: SocketAddr, t: usize, deadline: Instant, stats: &Stats) {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let all = slows();
    for s in &all {
        stats.declare_timed(s.name, s.expect, s.timing);
    }
    let mut i = t;
    while Instant::now() < deadline {
        let s = &all[i % all.len()];
        i += 1;
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        match (s.run)(addr, n) {
            Ok(took) => stats.record(s.name, None, Some(took)),
            Err(e) => stats.record(s.name, Some(e), None),
        }
    }
}

/// A head sent a byte every `SLOWLORIS_GAP`: far too long to finish before the
/// router's idle timeout closes the connection.
fn slowloris(addr: SocketAddr, n: u64) -> Result<Duration, String> {
    let mut conn = Conn::open(addr).map_err(|e| format!("connect: {e}"))?;
    let extra = format!(
        "X-Request-Id: {SLOWLORIS_ID}{n}\r\n{}Connection: close\r\nContent-Type: \
         application/json\r\nContent-Length: {}\r\n",
        auth(),
        SMALL_CHAT.len()
    );
    let request = raw("POST", CHAT, &extra, SMALL_CHAT.as_bytes());
    let since = Instant::now();
    for (sent, byte) in request.iter().enumerate() {
        match conn.stream.write_all(&[*byte]) {
            Ok(()) => {}
            Err(e) if is_reset(&e) => return in_time(since.elapsed()),
            Err(e) => return Err(format!("send: {e}")),
        }
        if poll_closed(&conn.stream, SLOWLORIS_GAP)? {
            return in_time(since.elapsed());
        }
        if since.elapsed() > CLIENT_TIMEOUT + CLOSE_SLACK {
            return Err(format!(
                "still open after {:.1} s, {sent} bytes of the head sent",
                since.elapsed().as_secs_f64()
            ));
        }
    }
    Err("the whole request went out a byte at a time and the connection stayed open".into())
}

/// A connection that sends nothing at all.
fn idle_connection(addr: SocketAddr, _: u64) -> Result<Duration, String> {
    let conn = Conn::open(addr).map_err(|e| format!("connect: {e}"))?;
    closed_in_time(&conn.stream, Instant::now())
}

/// A request declaring a body of `SLOW_BODY_LEN` bytes (over 1 KiB, so not read with
/// the head), of which only the first `sent` are sent.
fn partial_body(addr: SocketAddr, request_id: &str, sent: usize) -> Result<Conn, String> {
    let mut conn = Conn::open(addr).map_err(|e| format!("connect: {e}"))?;
    let mut body = SMALL_CHAT.as_bytes().to_vec();
    body.resize(SLOW_BODY_LEN, b' ');
    let extra = format!(
        "X-Request-Id: {request_id}\r\n{}Connection: close\r\nContent-Type: \
         application/json\r\nContent-Length: {SLOW_BODY_LEN}\r\n",
        auth()
    );
    conn.send(&raw("POST", CHAT, &extra, &body[..sent]))?;
    Ok(conn)
}

/// A head and the first 1000 bytes of the body, then nothing: once
/// `client_body_timeout` has passed the router answers 408 with `Connection: close`
/// and closes the connection (as nginx does).
fn slow_body(addr: SocketAddr, n: u64) -> Result<Duration, String> {
    let mut conn = partial_body(addr, &format!("{SLOW_BODY_ID}{n}"), 1000)?;
    let since = Instant::now();
    conn.stream
        .set_read_timeout(Some(CLIENT_TIMEOUT + CLOSE_SLACK))
        .map_err(|e| format!("set_read_timeout: {e}"))?;
    let reply = conn.read_reply()?;
    let took = since.elapsed();
    if reply.status != 408
        || !header(&reply.headers, "connection").is_some_and(|v| v.eq_ignore_ascii_case("close"))
    {
        return Err(format!(
            "answered {} {:?}, not 408 with Connection: close",
            reply.status, reply.headers
        ));
    }
    if !poll_closed(&conn.stream, CLOSE_SLACK)? {
        return Err("still open after its 408".into());
    }
    in_time(took)
}

/// A stream of `STALLED_TOKENS` tokens sent as fast as the mock can: the client reads
/// the head and then nothing, so the router's writes block once the socket buffers
/// are full.
fn stalled_reader(addr: SocketAddr, n: u64) -> Result<Duration, String> {
    let mut conn = Conn::open(addr).map_err(|e| format!("connect: {e}"))?;
    // A small receive buffer, so the router's writes block soon after the client stops
    // reading: with the kernel's autotuned megabytes, how long filling them takes
    // depends on how fast the mock makes tokens, not on the router.
    small_receive_buffer(&conn.stream)?;
    let body = format!(
        r#"{{"model":"mock-model","messages":[{{"role":"user","content":"soak"}}],"max_tokens":{STALLED_TOKENS},"stream":true}}"#
    );
    let extra = format!(
        "X-Request-Id: {STALLED_ID}{n}\r\n{}Connection: close\r\nx-mock-delay-ms: 0\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n",
        auth(),
        body.len()
    );
    conn.send(&raw("POST", CHAT, &extra, body.as_bytes()))?;
    let (status, _) = conn.read_head()?;
    if status != 200 {
        return Err(format!("status {status}"));
    }
    let since = Instant::now();
    let local = conn
        .stream
        .local_addr()
        .map_err(|e| format!("local address: {e}"))?;
    // The router's FIN waits behind the bytes this client leaves unread, so the close
    // is seen on the router's end of the connection, in the kernel's table.
    while router_end_open(addr, local)? {
        if since.elapsed() > CLIENT_TIMEOUT + CLOSE_SLACK {
            return Err(format!(
                "the router's end still open after {:.1} s",
                since.elapsed().as_secs_f64()
            ));
        }
        thread::sleep(Duration::from_millis(100));
    }
    let took = in_time(since.elapsed())?;
    // What the router had sent is still on its way: it must be a stream cut short.
    let mut rest = Vec::new();
    let _ = conn.reader.read_to_end(&mut rest);
    if rest.ends_with(b"\r\n0\r\n\r\n") {
        return Err(format!(
            "the stream ended normally ({} bytes after the head)",
            rest.len()
        ));
    }
    Ok(took)
}

/// A body of `SLOW_BODY_LEN` bytes declared, 100 sent, then the client's FIN.
fn cut_body(addr: SocketAddr, n: u64) -> Result<Duration, String> {
    let mut conn = partial_body(addr, &format!("{CUT_BODY_ID}{n}"), 100)?;
    conn.stream
        .shutdown(Shutdown::Write)
        .map_err(|e| format!("shutdown: {e}"))?;
    let since = Instant::now();
    let reply = conn.read_reply()?;
    let took = since.elapsed();
    if reply.status != 400 {
        return Err(format!("status {}: {}", reply.status, reply.text()));
    }
    let doc: Value = serde_json::from_slice(&reply.body)
        .map_err(|e| format!("not JSON ({e}): {}", reply.text()))?;
    if doc["error"]["code"] != "bad_request" {
        return Err(format!("error body {doc}, code bad_request wanted"));
    }
    if took > CLIENT_TIMEOUT + CLOSE_SLACK {
        return Err(format!("answered after {:.1} s", took.as_secs_f64()));
    }
    Ok(took)
}

/// Caps the kernel's receive buffer of `stream` at 16 KiB (std has no call for it).
fn small_receive_buffer(stream: &TcpStream) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let size: libc::c_int = 16 * 1024;
    // SAFETY: a valid socket and a pointer to a c_int that lives across the call, with
    // its size.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(format!("SO_RCVBUF: {}", io::Error::last_os_error()));
    }
    Ok(())
}

/// Whether the router has closed `stream` (the end of the stream, or a reset),
/// waiting up to `wait`. Anything the router sends instead is an error.
fn poll_closed(stream: &TcpStream, wait: Duration) -> Result<bool, String> {
    stream
        .set_read_timeout(Some(wait))
        .map_err(|e| format!("set_read_timeout: {e}"))?;
    let mut buf = [0; 256];
    match stream.peek(&mut buf) {
        Ok(0) => Ok(true),
        Ok(n) => Err(format!(
            "answered instead of closing: {:?}",
            String::from_utf8_lossy(&buf[..n])
        )),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            Ok(false)
        }
        Err(e) if is_reset(&e) => Ok(true),
        Err(e) => Err(format!("reading: {e}")),
    }
}

/// Waits for the router to close `stream`; returns how long after `since` it did.
fn closed_in_time(stream: &TcpStream, since: Instant) -> Result<Duration, String> {
    while !poll_closed(stream, Duration::from_millis(100))? {
        if since.elapsed() > CLIENT_TIMEOUT + CLOSE_SLACK {
            return Err(format!(
                "still open after {:.1} s",
                since.elapsed().as_secs_f64()
            ));
        }
    }
    in_time(since.elapsed())
}

/// A close `took` after its clock started: no sooner than the timeout, no later than
/// `CLOSE_SLACK` after it.
fn in_time(took: Duration) -> Result<Duration, String> {
    if took + EARLY_SLACK < CLIENT_TIMEOUT {
        Err(format!(
            "closed after {:.2} s, before its timeout of {CLIENT_TIMEOUT_SECS} s",
            took.as_secs_f64()
        ))
    } else if took > CLIENT_TIMEOUT + CLOSE_SLACK {
        Err(format!(
            "closed only after {:.1} s (timeout {CLIENT_TIMEOUT_SECS} s)",
            took.as_secs_f64()
        ))
    } else {
        Ok(took)
    }
}

/// Whether the router's end of the connection from `client` is still established,
/// as `/proc/net/tcp` lists it.
fn router_end_open(router: SocketAddr, client: SocketAddr) -> Result<bool, String> {
    let kernel = |a: SocketAddr| match a {
        SocketAddr::V4(a) => Ok(format!(
            "{:08X}:{:04X}",
            u32::from_ne_bytes(a.ip().octets()),
            a.port()
        )),
        SocketAddr::V6(_) => Err(format!("{a}: IPv4 only")),
    };
    let (local, remote) = (kernel(router)?, kernel(client)?);
    let table = std::fs::read_to_string("/proc/net/tcp")
        .map_err(|e| format!("cannot read /proc/net/tcp: {e}"))?;
    Ok(table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().take(4).collect();
        fields.get(1) == Some(&local.as_str())
            && fields.get(2) == Some(&remote.as_str())
            && fields.get(3) == Some(&"01")
    }))
}

/// `vllm_router_client_connections_closed_total` by reason, and the
/// `vllm_router_client_connections` gauge.
struct Closed {
    by_reason: BTreeMap<String, u64>,
    open: Option<u64>,
}

fn client_connections(addr: SocketAddr) -> Result<Closed, String> {
    let reply = get(addr, "/metrics")?;
    if reply.status != 200 {
        return Err(format!("/metrics: status {}", reply.status));
    }
    let mut closed = Closed {
        by_reason: BTreeMap::new(),
        open: None,
    };
    for line in String::from_utf8_lossy(&reply.body).lines() {
        let number = |v: &str| v.trim().parse::<f64>().ok().map(|v| v as u64);
        if let Some(rest) =
            line.strip_prefix("vllm_router_client_connections_closed_total{reason=\"")
        {
            if let Some((reason, n)) = rest.split_once("\"}") {
                let n = number(n).ok_or_else(|| format!("bad sample {line:?}"))?;
                closed.by_reason.insert(reason.to_owned(), n);
            }
        } else if let Some(n) = line.strip_prefix("vllm_router_client_connections ") {
            closed.open = number(n);
        }
    }
    if closed.by_reason.is_empty() {
        return Err("no vllm_router_client_connections_closed_total in /metrics".into());
    }
    Ok(closed)
}

/// The router's closed-connection counts against the slow clients that saw their
/// close: each reason counts at least those, and nothing was shed.
fn check_closed(closed: &Closed, table: &BTreeMap<String, Kind>) -> Vec<String> {
    let passed = |name: &str| table.get(name).map_or(0, |k| k.sent - k.errors);
    let count = |reason: &str| closed.by_reason.get(reason).copied().unwrap_or(0);
    let mut failures = Vec::new();
    let seen = [
        (
            "idle",
            passed(SLOWLORIS) + passed(IDLE_CONNECTION) + passed(IDLE_CLOSE_KIND),
        ),
        ("slow_body", passed(SLOW_BODY)),
        ("stalled_write", passed(STALLED_READER)),
    ];
    for (reason, clients) in seen {
        if count(reason) == 0 {
            failures.push(format!("no client connection closed for {reason}"));
        } else if count(reason) < clients {
            failures.push(format!(
                "{} connections closed for {reason}, but {clients} slow clients saw one",
                count(reason)
            ));
        }
    }
    for reason in ["over_cap", "no_thread", "no_fd"] {
        if count(reason) > 0 {
            failures.push(format!(
                "{} connections shed ({reason}), with nothing here near a limit",
                count(reason)
            ));
        }
    }
    // The /metrics request itself is the one open connection left.
    if closed.open.is_none_or(|n| n > 2) {
        failures.push(format!(
            "{:?} client connections open at the end",
            closed.open
        ));
    }
    failures
}

/// What the access log says of the slow requests.
struct SlowAccess {
    summary: String,
    failures: Vec<String>,
}

/// Checks the access entries of the slow requests: no slowloris head became a
/// request, slow and cut bodies never reached a backend (408 and 400), and every
/// stalled stream ended short of complete. Each slow request that sent a whole head
/// has one entry.
fn slow_access(structured_log: &str, table: &BTreeMap<String, Kind>) -> SlowAccess {
    let entries: Vec<Value> = structured_log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["target"] == "access")
        .collect();
    let with_id = |prefix: &str| -> Vec<&Value> {
        entries
            .iter()
            .filter(|e| {
                e["request_id"]
                    .as_str()
                    .is_some_and(|id| id.starts_with(prefix))
            })
            .collect()
    };
    let tally = |of: &[&Value], field: &str| -> String {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for e in of {
            let v = match &e[field] {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            *counts.entry(v).or_default() += 1;
        }
        let parts: Vec<String> = counts.iter().map(|(v, n)| format!("{v} x{n}")).collect();
        parts.join(", ")
    };
    let mut failures = Vec::new();
    let slowloris = with_id(SLOWLORIS_ID);
    if !slowloris.is_empty() {
        failures.push(format!(
            "{} slowloris heads became requests in the access log",
            slowloris.len()
        ));
    }
    let mut parts = vec![format!("slowloris {} (none wanted)", slowloris.len())];
    // (kind, id prefix, the status wanted, whether it reaches a backend)
    let checks = [
        (SLOW_BODY, SLOW_BODY_ID, Some(408), false),
        (CUT_BODY, CUT_BODY_ID, Some(400), false),
        (STALLED_READER, STALLED_ID, None, true),
    ];
    for (kind, prefix, status, forwarded) in checks {
        let found = with_id(prefix);
        let (sent, passed) = table
            .get(kind)
            .map_or((0, 0), |k| (k.sent, k.sent - k.errors));
        if found.len() < passed as usize || found.len() > sent as usize {
            failures.push(format!(
                "{} access entries for \"{kind}\", {sent} sent and {passed} as expected",
                found.len()
            ));
        }
        for e in &found {
            let backend = e["backend"].as_str().unwrap_or("-");
            let wrong = if forwarded {
                backend == "-" || e["outcome"] == "complete"
            } else {
                backend != "-" || status.is_some_and(|s| e["status"] != s)
            };
            if wrong {
                failures.push(format!("\"{kind}\": access entry {e}"));
            }
        }
        parts.push(format!(
            "{prefix}* {} (status {}; backend {}; outcome {})",
            found.len(),
            tally(&found, "status"),
            if forwarded { "a mock" } else { "none" },
            tally(&found, "outcome")
        ));
    }
    failures.truncate(10);
    SlowAccess {
        summary: parts.join("; "),
        failures,
    }
}
