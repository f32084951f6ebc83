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
//!   leave mid-stream or before the reply, and clients that send half a head and close.
//!
//! Then it checks that every normal request succeeded byte-exact, every hostile one got
//! its expected answer, the router's in-flight counts are back to 0, its thread count
//! (from `/proc/PID/status`) is within +32 of its start, its RSS within +20 MiB of its
//! figure after the warm-up (the first quarter of the run, at most 15 s: the first
//! seconds of load touch worker and connection-thread stacks and the allocator's
//! arenas once, some 40 MiB; the start figure is printed too), and its log shows no
//! accept-loop restart (nothing here runs it out of descriptors). It prints one summary
//! table and exits 1 on any failure.
//!
//! std and serde_json only: raw sockets make the hostile clients easy to write.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
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
/// The bounds on the router at the end, against its start.
const MAX_THREAD_GROWTH: i64 = 32;
const MAX_RSS_GROWTH_KIB: i64 = 20 * 1024;
/// The longest warm-up before the RSS baseline is read (a quarter of a shorter run).
const WARMUP_SECONDS: f64 = 15.0;
/// Seconds between two progress lines.
const PROGRESS_EVERY: u64 = 10;
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
         api_keys = [\"{KEY}\"]\nmax_body_bytes = {MAX_BODY}\nhealth_check_interval = 1\n",
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
    let end = settle_threads(pid, cold.threads)?;
    // RSS is held against the figure after the warm-up: the first seconds of load
    // touch the worker stacks, the connection threads' stacks and the allocator's
    // arenas once, for good (see the report); a leak keeps growing after that.
    let warm = samples.warm.unwrap_or(cold);
    let thread_growth = end.threads as i64 - cold.threads as i64;
    let rss_growth = end.rss_kib as i64 - warm.rss_kib as i64;
    if thread_growth > MAX_THREAD_GROWTH {
        failures.push(format!(
            "threads {} -> {} (+{thread_growth}, bound +{MAX_THREAD_GROWTH})",
            cold.threads, end.threads
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
    // Nothing here exhausts descriptors, so the accept loop has no reason to stop.
    let log = std::fs::read_to_string(dir.join("logs").join("vllm-router.log")).unwrap_or_default();
    let restarts = log.matches("the accept loop stopped").count();
    if restarts > 0 {
        failures.push(format!(
            "the router restarted its accept loop {restarts} time(s) (\"the accept loop \
             stopped\" in its log) with no descriptor shortage"
        ));
    }

    let table = stats.table();
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
}

impl Report<'_> {
    fn render(&self, failures: &[String]) -> String {
        let mib = |kib: u64| kib as f64 / 1024.0;
        let rule = "-".repeat(70);
        let mut out = String::new();
        let row = |out: &mut String, name: &str, sent: u64, errors: u64| {
            let _ = writeln!(out, "{name:<42} {sent:>8} {:>9} {errors:>8}", sent - errors);
        };
        let _ = writeln!(
            out,
            "\n{:<42} {:>8} {:>9} {:>8}\n{rule}",
            "kind (expected answer)", "sent", "answered", "errors"
        );
        for (name, k) in self.table {
            row(
                &mut out,
                &format!("{name} ({})", k.expect),
                k.sent,
                k.errors,
            );
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
            let _ = writeln!(
                out,
                "{name} latency: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
                at(0.5),
                at(0.99),
                at(1.0)
            );
        }
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
             start, bound +{MAX_THREAD_GROWTH})",
            self.cold.threads,
            self.warm.threads,
            self.samples.peak_threads,
            self.end.threads,
            self.end.threads as i64 - self.cold.threads as i64
        );
        let _ = writeln!(
            out,
            "accept-loop restarts in the router log: {}",
            self.restarts
        );
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
/// its start (tiny_http's idle connection threads end after a few seconds); returns
/// the last reading.
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
    /// How long each request took, for the normal kinds.
    latencies: Vec<Duration>,
}

impl Stats {
    fn declare(&self, name: &str, expect: &str) {
        let mut kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        kinds.entry(name.to_owned()).or_default().expect = expect.to_owned();
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
        self.stream
            .write_all(bytes)
            .map_err(|e| format!("send: {e}"))
    }

    fn read_head(&mut self) -> Result<(u16, Vec<(String, String)>), String> {
        let mut line = String::new();
        self.reader
            .read_line(&mut line)
            .map_err(|e| format!("reading the status line: {e}"))?;
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

fn get_json(addr: SocketAddr, path: &str) -> Result<Value, String> {
    let mut conn = Conn::open(addr).map_err(|e| format!("connect: {e}"))?;
    conn.send(&raw("GET", path, "Connection: close\r\n", b""))?;
    let reply = conn.read_reply()?;
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

/// Whole JSON replies, several on one keep-alive connection.
fn json_client(
    addr: SocketAddr,
    t: usize,
    deadline: Instant,
    refs: &BTreeMap<Normal, Output>,
    stats: &Stats,
) {
    stats.declare("normal json", "200, byte-exact");
    let all: Vec<Normal> = Normal::all().into_iter().filter(|n| !n.stream).collect();
    let mut conn: Option<Conn> = None;
    let mut on_conn = 0;
    let mut i = t;
    while Instant::now() < deadline {
        let n = all[i % all.len()];
        i += JSON_CLIENTS + 1;
        if conn.is_none() {
            match Conn::open(addr) {
                Ok(c) => (conn, on_conn) = (Some(c), 0),
                Err(e) => {
                    stats.record("normal json", Some(format!("connect: {e}")), None);
                    continue;
                }
            }
        }
        on_conn += 1;
        let close = on_conn >= KEEP_ALIVE_REQUESTS;
        let c = conn.as_mut().expect("a connection");
        let started = Instant::now();
        let got = n.run(c, Some(KEY), close);
        let took = started.elapsed();
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
