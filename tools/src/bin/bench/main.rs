//! `bench`: the benchmark of issue 7, run by `make bench`.
//!
//! It starts its own `mock-vllm`, `vllm-router` and (when installed) nginx processes on
//! 127.0.0.1, measures them side by side in one run, prints one table and writes the
//! figures to `target/bench/latest.json`:
//!
//! 1. non-streamed completions, closed loop at 1, 16, 64 and 256 keep-alive connections,
//!    directly against the mock, through the router and through nginx;
//! 2. streams (100 and 1000 at once): added delay per SSE event, from the mock's
//!    `sent_us` stamp to its arrival here, and time to first event;
//! 3. the router's memory and threads, idle, during 1000 streams and after; binary size;
//! 4. scale: request cost with 1, 8 and 64 backends, and the drain of a queue of 1000;
//! 5. start-up: exec to `/readyz` 200.
//!
//! The load generator is one thread on an epoll loop over non-blocking keep-alive
//! sockets, with a minimal HTTP/1.1 response parser (Content-Length and chunked), so it
//! costs little CPU: client, router, mock and nginx all share the same cores, and every
//! figure is read as a ratio against the others measured in the same run.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use vllm_router_tools::{http, process, procfs};

/// Closed-loop concurrency levels of part 1.
const CONNS: [usize; 4] = [1, 16, 64, 256];
/// Concurrent streams of part 2.
const STREAMS: [usize; 2] = [100, 1000];
/// Backends of part 4.
const BACKENDS: [usize; 3] = [1, 8, 64];
/// Queue depths of part 4: a short line, and the 1000 of the issue.
const QUEUE_DEPTHS: [usize; 2] = [10, 1000];

const WARMUP: Duration = Duration::from_secs(1);
const MEASURE: Duration = Duration::from_secs(5);
const SCALE_MEASURE: Duration = Duration::from_secs(3);
const SCALE_CONNS: usize = 16;
const TOKENS_PER_STREAM: u32 = 40;
/// Stream starts are spread over this: the mock's listen backlog is 128 (Rust's
/// default), and a proxy opening 1000 backend connections at once overflows it.
const STREAM_RAMP: Duration = Duration::from_millis(500);
/// tiny_http keeps an idle connection thread for 5 s: sample "after" past that.
const SETTLE: Duration = Duration::from_secs(6);
const TOKEN_GAP_MS: u64 = 50;
const STARTUP_RUNS: usize = 5;
/// How long the request at the head of the queue test holds the only slot.
const BLOCKER: Duration = Duration::from_secs(2);
/// Router slots and queue of parts 1-3: large enough that admission never waits, and
/// the automatic worker pool (slots + queue + 16) covers 1000 streams.
const BENCH_CAP: usize = 1024;
const BENCH_QUEUE: usize = 256;
/// A run waits this long past its expected end for late replies; whatever has not
/// come by then counts as "no reply in time".
const GRACE: Duration = Duration::from_secs(5);

const COMPLETION_BODY: &str = r#"{"model":"mock-model","prompt":"Say hello","max_tokens":4}"#;
const STREAM_BODY: &str =
    r#"{"model":"mock-model","stream":true,"messages":[{"role":"user","content":"Say hello"}]}"#;
const NGINX_TEMPLATE: &str = include_str!("../../../../bench/nginx.conf.in");

/// Exits 1 when the benchmark could not run, or when a run had failed requests (the
/// figures of such a run are not comparable); a target missed is only reported.
fn main() -> ExitCode {
    match run() {
        Ok(errors) if errors.is_empty() => ExitCode::SUCCESS,
        Ok(errors) => {
            eprintln!("\nbench: {} runs had errors:", errors.len());
            for e in &errors {
                eprintln!("  {e}");
            }
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs every part; the runs that had errors, each said in a line.
fn run() -> Result<Vec<String>, String> {
    raise_fd_limit()?;
    let env = Env::new()?;
    let machine = Machine::read();
    println!(
        "vllm-router benchmark on {} x {}, {} (commit {})",
        machine.nproc, machine.cpu_model, machine.date, machine.git_commit
    );
    part("start");
    let ticks = CpuTicks::now();
    let mut report = Report {
        machine,
        ..Report::default()
    };
    front_parts(&env, &mut report)?;
    scale_parts(&env, &mut report)?;
    report.startup = startup_part(&env)?;
    report.binary_bytes = file_size(&env.bin_dir.join("vllm-router"));
    report.targets = check_targets(&report);
    report.machine.others_cpu_percent = ticks.others_percent(report.machine.nproc);
    print_report(&report);
    let path = env.write_json(&report)?;
    println!("\nfigures written to {}", path.display());
    Ok(runs_with_errors(&report))
}

/// Every run of the report that counted a failed request, with its summary line.
fn runs_with_errors(r: &Report) -> Vec<String> {
    let throughput = r
        .throughput
        .iter()
        .filter(|row| row.errors.total() > 0)
        .map(ClosedLoop::summary);
    let streaming = r
        .streaming
        .iter()
        .filter(|row| row.errors.total() > 0)
        .map(Streaming::summary);
    let scale = r
        .scale
        .iter()
        .filter(|row| row.errors.total() > 0)
        .map(ScaleRow::summary);
    let queue = r
        .queue
        .iter()
        .filter(|row| row.errors.total() > 0)
        .map(QueueRow::summary);
    throughput.chain(streaming).chain(scale).chain(queue).collect()
}

/// Parts 1, 2 and 3: a mock alone, the router and nginx, each proxy in front of a mock
/// of its own. Sharing one would mislead the router: it reads a backend's own
/// `/metrics` for its load, and would count the direct runs' requests as another
/// router's (README, "Load across router replicas").
fn front_parts(env: &Env, report: &mut Report) -> Result<(), String> {
    let mock = env.mock("mock")?;
    let router_mock = env.mock("router-mock")?;
    let toml = servers_toml(&[router_mock.addr], BENCH_CAP, BENCH_QUEUE);
    let router = env.router("router", &toml, "info")?;
    router.wait_ready(Duration::from_secs(10))?;
    thread::sleep(Duration::from_millis(500));
    report.memory.idle = ProcSample::of(router.proc.pid());
    let nginx_mock = env.mock("nginx-mock")?;
    let nginx = env.nginx(nginx_mock.addr)?;
    let mut targets = vec![
        Target::new("direct", mock.addr, vec![], &[&mock]),
        Target::new(
            "router",
            router.addr,
            vec![router.proc.pid()],
            &[&router_mock],
        ),
    ];
    if let Some(nginx) = &nginx {
        let workers = nginx.worker_pids();
        targets.push(Target::new("nginx", nginx.addr, workers, &[&nginx_mock]));
    }
    part("[1/5] non-streamed completions, closed loop");
    for conns in CONNS {
        for t in &targets {
            let row = closed_loop(t, conns, WARMUP, MEASURE)?;
            println!("  {}", row.summary());
            report.throughput.push(row);
        }
    }
    part(&format!(
        "[2/5] streams of {TOKENS_PER_STREAM} events, {TOKEN_GAP_MS} ms apart"
    ));
    for streams in STREAMS {
        for t in &targets {
            let watch = (t.name == "router" && streams == 1000)
                .then(|| PeakWatch::spawn(router.proc.pid()));
            let row = stream_run(t, streams)?;
            println!("  {}", row.summary());
            if let Some(watch) = watch {
                report.memory.during_1000_streams = watch.stop();
            }
            report.streaming.push(row);
        }
    }
    part("[3/5] router memory and threads once the streams are over");
    thread::sleep(SETTLE);
    report.memory.after = ProcSample::of(router.proc.pid());
    report.nginx = nginx.is_some();
    Ok(())
}

/// Part 4: request cost as backends are added, and the drain of a long queue.
fn scale_parts(env: &Env, report: &mut Report) -> Result<(), String> {
    part("[4/5] scale: backends and queue");
    let max = BACKENDS.iter().copied().max().unwrap_or(1);
    let mocks = (0..max)
        .map(|i| env.mock(&format!("scale-mock-{i}")))
        .collect::<Result<Vec<_>, _>>()?;
    for n in BACKENDS {
        let row = scale_run(env, &mocks[..n])?;
        println!("  {}", row.summary());
        report.scale.push(row);
    }
    let toml = servers_toml(&[mocks[0].addr], 1, 1100);
    let router = env.router("queue", &toml, "info")?;
    router.wait_ready(Duration::from_secs(10))?;
    let target = Target::new("router", router.addr, vec![router.proc.pid()], &[]);
    let serial = closed_loop(&target, 1, WARMUP / 2, Duration::from_secs(2))?;
    for depth in QUEUE_DEPTHS {
        let row = queue_drain(router.addr, depth, &serial)?;
        println!("  {}", row.summary());
        report.queue.push(row);
    }
    Ok(())
}

/// One router in front of `mocks`, under a fixed closed loop.
fn scale_run(env: &Env, mocks: &[Mock]) -> Result<ScaleRow, String> {
    let n = mocks.len();
    let cap = (BENCH_CAP / n).max(SCALE_CONNS);
    let addrs: Vec<SocketAddr> = mocks.iter().map(|m| m.addr).collect();
    let toml = servers_toml(&addrs, cap, BENCH_QUEUE);
    let router = env.router(&format!("scale-{n}"), &toml, "info")?;
    router.wait_healthy(n, Duration::from_secs(20))?;
    let mocks: Vec<&Mock> = mocks.iter().collect();
    let target = Target::new("router", router.addr, vec![router.proc.pid()], &mocks);
    let run = closed_loop(&target, SCALE_CONNS, WARMUP, SCALE_MEASURE)?;
    Ok(ScaleRow {
        backends: n,
        conns: SCALE_CONNS,
        req_per_s: run.req_per_s,
        p50_us: run.p50_us,
        p99_us: run.p99_us,
        router_cpu_us_per_req: run.proxy_cpu_us_per_req,
        errors: run.errors,
    })
}

/// Announces a part, with the time since the benchmark began.
fn part(title: &str) {
    static BEGAN: OnceLock<Instant> = OnceLock::new();
    let began = BEGAN.get_or_init(Instant::now);
    println!("\n{title} (at {:.0} s)", began.elapsed().as_secs_f64());
}

// ---------------------------------------------------------------- part 1

/// One closed-loop run: `conns` keep-alive connections each sending the next request
/// as soon as the previous reply is complete; only requests sent and answered inside
/// the measuring window count.
fn closed_loop(
    target: &Target,
    conns: usize,
    warmup: Duration,
    measure: Duration,
) -> Result<ClosedLoop, String> {
    let request = post(target.addr, "/v1/completions", &[], COMPLETION_BODY);
    let start = Instant::now();
    let (from, until) = (start + warmup, start + warmup + measure);
    let groups = vec![
        target.proxy_pids.clone(),
        target.mock_pids.clone(),
        vec![std::process::id()],
    ];
    let cpu = CpuWatch::spawn(groups, from, until);
    let plan = Plan::Closed { from, until };
    let rec = Load::connect(
        target.addr,
        vec![request],
        vec![(0, Duration::ZERO); conns],
        plan,
    )?
    .run()?;
    let cpu = cpu.join()?;
    let mut lat = rec.latencies_ns;
    lat.sort_unstable();
    let done = lat.len() as f64;
    // CPU time per answered request of group `g`, when the group has processes.
    let per_req = |g: usize, pids: &[u32]| (done > 0.0 && !pids.is_empty()).then(|| cpu[g] / done);
    Ok(ClosedLoop {
        target: target.name.to_owned(),
        conns,
        conns_answered: rec.done_at.iter().filter(|d| d.is_some()).count(),
        seconds: measure.as_secs_f64(),
        requests: lat.len() as u64,
        req_per_s: done / measure.as_secs_f64(),
        p50_us: percentile(&lat, 0.5) / 1e3,
        p99_us: percentile(&lat, 0.99) / 1e3,
        p999_us: percentile(&lat, 0.999) / 1e3,
        errors: rec.errors.clone(),
        proxy_cpu_us_per_req: per_req(0, &target.proxy_pids),
        mock_cpu_us_per_req: per_req(1, &target.mock_pids),
        client_cpu_us_per_req: per_req(2, &[std::process::id()]),
    })
}

// ---------------------------------------------------------------- part 2

/// `streams` streams at once, their starts spread over `STREAM_RAMP` so that events
/// arrive evenly rather than in lockstep, and the backend can accept the connections
/// proxies open for them.
fn stream_run(target: &Target, streams: usize) -> Result<Streaming, String> {
    let headers = [
        ("x-mock-tokens", TOKENS_PER_STREAM.to_string()),
        ("x-mock-delay-ms", TOKEN_GAP_MS.to_string()),
    ];
    let request = post(target.addr, "/v1/chat/completions", &headers, STREAM_BODY);
    let starts = (0..streams)
        .map(|i| (0, STREAM_RAMP * i as u32 / streams as u32))
        .collect();
    let streaming = Duration::from_millis(TOKEN_GAP_MS) * (TOKENS_PER_STREAM + 1);
    let plan = Plan::Once {
        // Twice the grace: a connection that waited out a full backlog starts late.
        deadline: Instant::now() + STREAM_RAMP + streaming + 2 * GRACE,
    };
    let rec = Load::connect(target.addr, vec![request], starts, plan)?.run()?;
    let mut delays = rec.event_delays_us;
    delays.sort_unstable();
    let mut first = rec.first_event_us;
    first.sort_unstable();
    Ok(Streaming {
        target: target.name.to_owned(),
        streams,
        events: delays.len() as u64,
        expected_events: streams as u64 * u64::from(TOKENS_PER_STREAM),
        delay_p50_us: percentile(&delays, 0.5),
        delay_p99_us: percentile(&delays, 0.99),
        delay_max_us: delays.last().copied().unwrap_or(0) as f64,
        first_event_p50_ms: percentile(&first, 0.5) / 1e3,
        first_event_p99_ms: percentile(&first, 0.99) / 1e3,
        errors: rec.errors.clone(),
    })
}

// ---------------------------------------------------------------- part 4, queue

/// One request holds the only slot (a backend with max_concurrent_requests = 1) for
/// two seconds while `depth` others line up behind it; then the line drains one by
/// one. The drain time per request, against one request at a time on an empty line,
/// is what admission costs with that many waiters.
fn queue_drain(addr: SocketAddr, depth: usize, serial: &ClosedLoop) -> Result<QueueRow, String> {
    let blocker = post(
        addr,
        "/v1/completions",
        &[(
            "x-mock-first-byte-delay-ms",
            BLOCKER.as_millis().to_string(),
        )],
        COMPLETION_BODY,
    );
    let quick = post(addr, "/v1/completions", &[], COMPLETION_BODY);
    let mut starts = vec![(0, Duration::ZERO)];
    starts.extend((0..depth).map(|_| (1, Duration::from_millis(100))));
    let queue_peak = QueueWatch::spawn(addr);
    let plan = Plan::Once {
        deadline: Instant::now() + BLOCKER + GRACE + GRACE,
    };
    let rec = Load::connect(addr, vec![blocker, quick], starts, plan)?.run()?;
    let peak = queue_peak.stop();
    let Some(blocker_done) = rec.done_at.first().copied().flatten() else {
        return Err(format!(
            "queue of {depth}: the first request did not complete"
        ));
    };
    // Completions from the moment the slot first came free, in order.
    let mut done: Vec<Instant> = rec.done_at.iter().flatten().copied().collect();
    done.sort_unstable();
    let drain = done.last().map_or(Duration::ZERO, |l| *l - blocker_done);
    // The median gap between successive completions: the handoff interval, which a
    // request that joined the line late (and so stretches the whole drain) does not
    // move.
    let mut gaps: Vec<u64> = done
        .windows(2)
        .map(|w| (w[1] - w[0]).as_nanos() as u64)
        .collect();
    gaps.sort_unstable();
    Ok(QueueRow {
        queued: depth,
        queue_peak: peak,
        drain_ms: drain.as_secs_f64() * 1e3,
        median_gap_us: percentile(&gaps, 0.5) / 1e3,
        serial_us_per_req: 1e6 / serial.req_per_s,
        errors: rec.errors.clone(),
        note: (peak < depth as u64).then(|| {
            format!(
                "only {peak} of {depth} were ever queued: the others were accepted but not read \
                 until a router connection thread came free"
            )
        }),
    })
}

// ---------------------------------------------------------------- part 5

fn startup_part(env: &Env) -> Result<Vec<Startup>, String> {
    part("[5/5] start-up");
    let mock = env.mock("startup-mock")?;
    let configs = [
        ("bench config", BENCH_CAP, BENCH_QUEUE),
        ("small config", 4, BENCH_QUEUE),
    ];
    let mut rows = Vec::new();
    for (what, cap, queue) in configs {
        let toml = servers_toml(&[mock.addr], cap, queue);
        let mut times = Vec::new();
        let mut sample = ProcSample::default();
        for i in 0..STARTUP_RUNS {
            let t0 = Instant::now();
            let router = env.router(&format!("startup-{cap}-{i}"), &toml, "info")?;
            router.wait_ready(Duration::from_secs(10))?;
            times.push(t0.elapsed().as_micros() as u64);
            sample = ProcSample::of(router.proc.pid());
        }
        times.sort_unstable();
        let row = Startup {
            config: what.to_owned(),
            workers: cap + queue + 16,
            runs: STARTUP_RUNS,
            ready_ms_median: percentile(&times, 0.5) / 1e3,
            ready_rss_kib: sample.rss_kib,
            ready_threads: sample.threads,
        };
        println!("  {}", row.summary());
        rows.push(row);
    }
    Ok(rows)
}

// ---------------------------------------------------------------- targets

fn check_targets(r: &Report) -> Vec<TargetCheck> {
    let tput = |name: &str, conns: usize| {
        r.throughput
            .iter()
            .find(|t| t.target == name && t.conns == conns)
    };
    let stream = |name: &str, n: usize| {
        r.streaming
            .iter()
            .find(|s| s.target == name && s.streams == n)
    };
    let mut checks = Vec::new();
    for conns in [16, 64] {
        let ratio = tput("router", conns)
            .zip(tput("nginx", conns))
            .map(|(a, b)| a.req_per_s / b.req_per_s);
        checks.push(TargetCheck::at_least(
            &format!("throughput at {conns} connections, router / nginx"),
            ratio,
            1.0,
            "x",
        ));
    }
    let added_p50 = tput("router", 1)
        .zip(tput("direct", 1))
        .map(|(a, b)| a.p50_us - b.p50_us);
    checks.push(TargetCheck::below(
        "added p50 latency at 1 connection",
        added_p50,
        100.0,
        "us",
    ));
    let added_p99 = stream("router", 100)
        .zip(stream("direct", 100))
        .map(|(a, b)| a.delay_p99_us - b.delay_p99_us);
    checks.push(TargetCheck::below(
        "added per-event delay p99 at 100 streams",
        added_p99,
        1000.0,
        "us",
    ));
    let held = r
        .streaming
        .iter()
        .filter(|s| s.target == "router")
        .map(|s| s.expected_events.saturating_sub(s.events) as f64 + s.errors.total() as f64)
        .sum();
    checks.push(TargetCheck::below(
        "router stream events missing or failed",
        Some(held),
        0.5,
        "",
    ));
    let mib = |kib: u64| kib as f64 / 1024.0;
    checks.push(TargetCheck::below(
        "router RSS idle",
        Some(mib(r.memory.idle.rss_kib)),
        10.0,
        "MiB",
    ));
    checks.push(TargetCheck::below(
        "router RSS at 1000 streams (peak)",
        Some(mib(r.memory.during_1000_streams.rss_kib)),
        100.0,
        "MiB",
    ));
    checks.push(TargetCheck::below(
        "release binary size",
        Some(r.binary_bytes as f64 / 1_048_576.0),
        5.0,
        "MiB",
    ));
    checks.push(TargetCheck::below(
        "router CPU per request, 64 backends / 1 backend",
        scale_ratio(&r.scale),
        1.15,
        "x",
    ));
    checks
}

/// Router CPU per request with the most backends over that with one.
fn scale_ratio(rows: &[ScaleRow]) -> Option<f64> {
    let one = rows.first()?.router_cpu_us_per_req?;
    let many = rows.last()?.router_cpu_us_per_req?;
    (one > 0.0).then(|| many / one)
}

// ---------------------------------------------------------------- results

#[derive(Serialize, Default)]
struct Report {
    machine: Machine,
    nginx: bool,
    throughput: Vec<ClosedLoop>,
    streaming: Vec<Streaming>,
    memory: Memory,
    scale: Vec<ScaleRow>,
    queue: Vec<QueueRow>,
    startup: Vec<Startup>,
    binary_bytes: u64,
    targets: Vec<TargetCheck>,
}

#[derive(Serialize, Default)]
struct Machine {
    nproc: usize,
    cpu_model: String,
    date: String,
    git_commit: String,
    note: String,
    /// CPU used by processes outside this benchmark during the run, in percent of the
    /// machine: anything above a few percent skews every figure.
    others_cpu_percent: f64,
}

impl Machine {
    fn read() -> Machine {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or("unknown".to_owned(), |(_, m)| m.trim().to_owned());
        let nproc = thread::available_parallelism().map_or(1, |n| n.get());
        // `make bench` runs from the repository.
        let commit = command_output("git", &["rev-parse", "--short", "HEAD"]);
        let dirty = !command_output("git", &["status", "--porcelain"]).is_empty();
        Machine {
            nproc,
            cpu_model,
            date: command_output("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
            git_commit: if dirty {
                format!("{commit}+dirty")
            } else {
                commit
            },
            note: format!("load generator, router, mock and nginx all share these {nproc} cores"),
            others_cpu_percent: 0.0,
        }
    }
}

/// Busy CPU ticks: of the whole machine, and of this process with its reaped children.
#[derive(Clone, Copy)]
struct CpuTicks {
    machine: u64,
    own: u64,
    at: Instant,
}

impl CpuTicks {
    fn now() -> CpuTicks {
        let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
        // cpu user nice system idle iowait irq softirq steal ...: all but idle and iowait.
        let fields: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .filter_map(|f| f.parse().ok())
            .collect();
        let machine = fields
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 3 && *i != 4)
            .map(|(_, t)| t)
            .take(8)
            .sum();
        let me = std::process::id();
        let own = (14..=17).filter_map(|n| procfs::stat_field(me, n)).sum();
        CpuTicks {
            machine,
            own,
            at: Instant::now(),
        }
    }

    /// The share of the machine that other processes used since `self`.
    fn others_percent(&self, nproc: usize) -> f64 {
        let end = CpuTicks::now();
        let others = (end.machine - self.machine).saturating_sub(end.own - self.own);
        let capacity =
            end.at.duration_since(self.at).as_secs_f64() * procfs::clock_ticks() as f64 * nproc as f64;
        100.0 * others as f64 / capacity.max(1.0)
    }
}

#[derive(Serialize, Default)]
struct ClosedLoop {
    target: String,
    conns: usize,
    /// Connections that got at least one reply.
    conns_answered: usize,
    seconds: f64,
    requests: u64,
    req_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    errors: Errors,
    proxy_cpu_us_per_req: Option<f64>,
    mock_cpu_us_per_req: Option<f64>,
    client_cpu_us_per_req: Option<f64>,
}

impl ClosedLoop {
    /// The connection count, with how many were answered when not all were.
    fn conns_cell(&self) -> String {
        match self.conns_answered {
            n if n < self.conns => format!("{} ({n} answered)", self.conns),
            _ => self.conns.to_string(),
        }
    }

    fn summary(&self) -> String {
        format!(
            "{:<6} {:>3} conns: {:>8.0} req/s  p50 {:>6.0} us  p99 {:>7.0} us  errors {}",
            self.target,
            self.conns_cell(),
            self.req_per_s,
            self.p50_us,
            self.p99_us,
            self.errors
        )
    }
}

#[derive(Serialize, Default)]
struct Streaming {
    target: String,
    streams: usize,
    events: u64,
    expected_events: u64,
    delay_p50_us: f64,
    delay_p99_us: f64,
    delay_max_us: f64,
    first_event_p50_ms: f64,
    first_event_p99_ms: f64,
    errors: Errors,
}

impl Streaming {
    fn summary(&self) -> String {
        format!(
            "{:<6} {:>4} streams: delay p50 {:>5.0} us  p99 {:>6.0} us  first event p50 {:.1} ms  events {}/{}  errors {}",
            self.target,
            self.streams,
            self.delay_p50_us,
            self.delay_p99_us,
            self.first_event_p50_ms,
            self.events,
            self.expected_events,
            self.errors
        )
    }
}

#[derive(Serialize, Default)]
struct Memory {
    idle: ProcSample,
    during_1000_streams: ProcSample,
    after: ProcSample,
}

#[derive(Serialize, Default)]
struct ScaleRow {
    backends: usize,
    conns: usize,
    req_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    router_cpu_us_per_req: Option<f64>,
    errors: Errors,
}

impl ScaleRow {
    fn summary(&self) -> String {
        format!(
            "{:>2} backends: {:>8.0} req/s  p50 {:>6.0} us  router cpu {} us/req  errors {}",
            self.backends,
            self.req_per_s,
            self.p50_us,
            fmt_opt(self.router_cpu_us_per_req, 1),
            self.errors
        )
    }
}

#[derive(Serialize, Default)]
struct QueueRow {
    queued: usize,
    queue_peak: u64,
    drain_ms: f64,
    median_gap_us: f64,
    serial_us_per_req: f64,
    /// Set when the line did not form: requests were accepted but not read.
    note: Option<String>,
    errors: Errors,
}

impl QueueRow {
    fn summary(&self) -> String {
        format!(
            "{:>4} queued (peak seen {}): drained in {:.1} ms, median gap {:.0} us (one at a time: {:.0} us/req)  errors {}",
            self.queued,
            self.queue_peak,
            self.drain_ms,
            self.median_gap_us,
            self.serial_us_per_req,
            self.errors
        )
    }
}

#[derive(Serialize, Default)]
struct Startup {
    config: String,
    workers: usize,
    runs: usize,
    ready_ms_median: f64,
    ready_rss_kib: u64,
    ready_threads: u64,
}

impl Startup {
    fn summary(&self) -> String {
        format!(
            "{} ({} workers): /readyz 200 after {:.1} ms (median of {}), RSS {} KiB, {} threads",
            self.config,
            self.workers,
            self.ready_ms_median,
            self.runs,
            self.ready_rss_kib,
            self.ready_threads
        )
    }
}

#[derive(Serialize)]
struct TargetCheck {
    target: String,
    value: Option<f64>,
    limit: String,
    /// `None` when it could not be measured (nginx missing).
    met: Option<bool>,
}

impl TargetCheck {
    fn at_least(target: &str, value: Option<f64>, limit: f64, unit: &str) -> TargetCheck {
        TargetCheck {
            target: target.to_owned(),
            value,
            limit: format!(">= {limit} {unit}").trim_end().to_owned(),
            met: value.map(|v| v >= limit),
        }
    }

    fn below(target: &str, value: Option<f64>, limit: f64, unit: &str) -> TargetCheck {
        TargetCheck {
            target: target.to_owned(),
            value,
            limit: format!("< {limit} {unit}").trim_end().to_owned(),
            met: value.map(|v| v < limit),
        }
    }
}

/// Failed requests, counted by what went wrong.
#[derive(Serialize, Default, Clone)]
struct Errors(BTreeMap<String, u64>);

impl Errors {
    fn add(&mut self, why: &str) {
        *self.0.entry(why.to_owned()).or_default() += 1;
    }

    fn total(&self) -> u64 {
        self.0.values().sum()
    }
}

impl fmt::Display for Errors {
    /// `0`, or the total and each kind: `3 (status 502: 2, closed by the server: 1)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.total())?;
        if self.total() > 0 {
            let kinds: Vec<String> = self.0.iter().map(|(k, n)| format!("{k}: {n}")).collect();
            write!(f, " ({})", kinds.join(", "))?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- printing

/// A plain text table: the first column left-aligned, the others right-aligned.
struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(header: &[&str]) -> Table {
        Table {
            rows: vec![header.iter().map(|h| h.to_string()).collect()],
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn print(&self) {
        let cols = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let width: Vec<usize> = (0..cols)
            .map(|c| {
                let len = |r: &Vec<String>| r.get(c).map_or(0, |s| s.chars().count());
                self.rows.iter().map(len).max().unwrap_or(0)
            })
            .collect();
        for row in &self.rows {
            let cells: Vec<String> = row
                .iter()
                .enumerate()
                .map(|(c, s)| match c {
                    0 => format!("{s:<w$}", w = width[c]),
                    _ => format!("{s:>w$}", w = width[c]),
                })
                .collect();
            println!("  {}", cells.join("  "));
        }
    }
}

fn fmt_opt(v: Option<f64>, decimals: usize) -> String {
    v.map_or("-".to_owned(), |v| format!("{v:.decimals$}"))
}

fn print_report(r: &Report) {
    let m = &r.machine;
    println!("\n================ vllm-router benchmark ================");
    println!(
        "machine: {} cores ({}), {}, commit {}",
        m.nproc, m.cpu_model, m.date, m.git_commit
    );
    println!("{}: figures are side-by-side ratios, not capacity.", m.note);
    println!(
        "other processes used {:.1}% of the machine's CPU during the run{}",
        m.others_cpu_percent,
        if m.others_cpu_percent > 5.0 {
            ": the figures are skewed, run again on a quiet machine"
        } else {
            ""
        }
    );
    if !r.nginx {
        println!("nginx not installed: its rows are missing");
    }
    print_throughput(r);
    print_streaming(r);
    print_memory(r);
    print_scale(r);
    print_startup(r);
    print_targets(r);
}

fn print_throughput(r: &Report) {
    println!("\n1. Non-streamed completions, closed loop ({WARMUP:?} warm-up + {MEASURE:?}); cpu = CPU time per request");
    let mut t = Table::new(&[
        "target",
        "conns",
        "req/s",
        "p50 us",
        "p99 us",
        "p99.9 us",
        "errors",
        "proxy cpu us",
        "mock cpu us",
        "client cpu us",
    ]);
    for x in &r.throughput {
        t.row(vec![
            x.target.clone(),
            x.conns_cell(),
            format!("{:.0}", x.req_per_s),
            format!("{:.0}", x.p50_us),
            format!("{:.0}", x.p99_us),
            format!("{:.0}", x.p999_us),
            x.errors.to_string(),
            fmt_opt(x.proxy_cpu_us_per_req, 1),
            fmt_opt(x.mock_cpu_us_per_req, 1),
            fmt_opt(x.client_cpu_us_per_req, 1),
        ]);
    }
    t.print();
    let get = |name: &str, c: usize| {
        r.throughput
            .iter()
            .find(|x| x.target == name && x.conns == c)
    };
    let mut t = Table::new(&[
        "conns",
        "router/direct",
        "router/nginx",
        "router +p50 us",
        "nginx +p50 us",
        "mock busy at router's rate",
    ]);
    for c in CONNS {
        let (Some(d), Some(rt)) = (get("direct", c), get("router", c)) else {
            continue;
        };
        let n = get("nginx", c);
        let busy = rt.mock_cpu_us_per_req.map(|us| us * rt.req_per_s / 1e4);
        t.row(vec![
            c.to_string(),
            format!("{:.2}", rt.req_per_s / d.req_per_s),
            fmt_opt(n.map(|n| rt.req_per_s / n.req_per_s), 2),
            format!("{:.0}", rt.p50_us - d.p50_us),
            fmt_opt(n.map(|n| n.p50_us - d.p50_us), 0),
            fmt_opt(busy, 0) + "% of a core",
        ]);
    }
    t.print();
}

fn print_streaming(r: &Report) {
    println!("\n2. Streams: {TOKENS_PER_STREAM} events each, {TOKEN_GAP_MS} ms apart; delay = arrival - mock's sent_us; added = minus direct's");
    let mut t = Table::new(&[
        "target",
        "streams",
        "events",
        "delay p50 us",
        "delay p99 us",
        "max us",
        "added p50 us",
        "added p99 us",
        "1st event p50 ms",
        "1st event p99 ms",
        "errors",
    ]);
    for s in &r.streaming {
        let base = r
            .streaming
            .iter()
            .find(|b| b.target == "direct" && b.streams == s.streams);
        t.row(vec![
            s.target.clone(),
            s.streams.to_string(),
            format!("{}/{}", s.events, s.expected_events),
            format!("{:.0}", s.delay_p50_us),
            format!("{:.0}", s.delay_p99_us),
            format!("{:.0}", s.delay_max_us),
            fmt_opt(base.map(|b| s.delay_p50_us - b.delay_p50_us), 0),
            fmt_opt(base.map(|b| s.delay_p99_us - b.delay_p99_us), 0),
            format!("{:.2}", s.first_event_p50_ms),
            format!("{:.2}", s.first_event_p99_ms),
            s.errors.to_string(),
        ]);
    }
    t.print();
}

fn print_memory(r: &Report) {
    println!("\n3. Router memory and threads ({BENCH_CAP} slots + {BENCH_QUEUE} queue places: {} workers)", BENCH_CAP + BENCH_QUEUE + 16);
    let mut t = Table::new(&["when", "RSS KiB", "threads"]);
    let m = &r.memory;
    for (when, s) in [
        ("idle", &m.idle),
        ("1000 streams (peak)", &m.during_1000_streams),
        ("after", &m.after),
    ] {
        t.row(vec![
            when.to_owned(),
            s.rss_kib.to_string(),
            s.threads.to_string(),
        ]);
    }
    t.print();
    println!("  release binary: {} bytes", r.binary_bytes);
}

fn print_scale(r: &Report) {
    println!("\n4. Scale: {SCALE_CONNS} connections, {WARMUP:?} warm-up + {SCALE_MEASURE:?}, one mock process per backend");
    let mut t = Table::new(&[
        "backends",
        "req/s",
        "p50 us",
        "p99 us",
        "router cpu us/req",
        "errors",
    ]);
    for s in &r.scale {
        t.row(vec![
            s.backends.to_string(),
            format!("{:.0}", s.req_per_s),
            format!("{:.0}", s.p50_us),
            format!("{:.0}", s.p99_us),
            fmt_opt(s.router_cpu_us_per_req, 1),
            s.errors.to_string(),
        ]);
    }
    t.print();
    println!("   Queue: one backend with max_concurrent_requests = 1, a 2 s request holds it while the line forms");
    let mut t = Table::new(&[
        "queued",
        "peak seen",
        "drain ms",
        "median gap us",
        "1-at-a-time us/req",
        "errors",
    ]);
    for q in &r.queue {
        t.row(vec![
            q.queued.to_string(),
            q.queue_peak.to_string(),
            format!("{:.1}", q.drain_ms),
            format!("{:.0}", q.median_gap_us),
            format!("{:.0}", q.serial_us_per_req),
            q.errors.to_string(),
        ]);
    }
    t.print();
    for q in &r.queue {
        if let Some(note) = &q.note {
            println!("   {} queued: {note}", q.queued);
        }
    }
}

fn print_startup(r: &Report) {
    println!("\n5. Start-up: exec to /readyz 200, median of {STARTUP_RUNS}");
    let mut t = Table::new(&["config", "workers", "ready ms", "RSS KiB", "threads"]);
    for s in &r.startup {
        t.row(vec![
            s.config.clone(),
            s.workers.to_string(),
            format!("{:.1}", s.ready_ms_median),
            s.ready_rss_kib.to_string(),
            s.ready_threads.to_string(),
        ]);
    }
    t.print();
}

fn print_targets(r: &Report) {
    println!("\nTargets (issue 7)");
    let mut t = Table::new(&["target", "value", "limit", "result"]);
    for c in &r.targets {
        let result = match c.met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "not measured",
        };
        t.row(vec![
            c.target.clone(),
            fmt_opt(c.value, 2),
            c.limit.clone(),
            result.to_owned(),
        ]);
    }
    t.print();
}

// ---------------------------------------------------------------- statistics

/// The `q` quantile of sorted samples (nearest rank), 0 when there are none.
fn percentile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64
}

fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

// ---------------------------------------------------------------- load generator

/// A place to send load to.
struct Target {
    name: &'static str,
    addr: SocketAddr,
    /// The proxy's processes, whose CPU time is charged to it (none for direct).
    proxy_pids: Vec<u32>,
    /// The mocks behind it, whose CPU time is shown beside.
    mock_pids: Vec<u32>,
}

impl Target {
    fn new(name: &'static str, addr: SocketAddr, proxy_pids: Vec<u32>, mocks: &[&Mock]) -> Target {
        Target {
            name,
            addr,
            proxy_pids,
            mock_pids: mocks.iter().map(|m| m.proc.pid()).collect(),
        }
    }
}

/// What the connections of one run do.
enum Plan {
    /// Send again as soon as a reply is complete, until `until`; latencies count for
    /// requests sent at or after `from` and answered by `until`.
    Closed { from: Instant, until: Instant },
    /// One request per connection; whatever is not answered by `deadline` fails.
    Once { deadline: Instant },
}

/// What one run measured.
#[derive(Default)]
struct Record {
    latencies_ns: Vec<u64>,
    errors: Errors,
    /// Arrival minus the backend's `sent_us`, per SSE event.
    event_delays_us: Vec<u64>,
    /// Request sent to first SSE event, per stream.
    first_event_us: Vec<u64>,
    /// When each connection's (last) reply completed, by connection.
    done_at: Vec<Option<Instant>>,
}

#[derive(PartialEq)]
enum Phase {
    /// Not started yet: sends at `start` after the run begins.
    Idle,
    Waiting,
    Finished,
}

/// One client connection.
struct Conn {
    stream: TcpStream,
    request: usize,
    start: Duration,
    parser: Parser,
    /// The SSE scanner of the current reply, when it is an event stream.
    sse: Option<Sse>,
    sent: Instant,
    saw_event: bool,
    phase: Phase,
}

/// A single-threaded epoll loop over many keep-alive connections.
struct Load {
    addr: SocketAddr,
    requests: Vec<Vec<u8>>,
    conns: Vec<Conn>,
    epoll: Epoll,
    plan: Plan,
    rec: Record,
    began: Instant,
    /// Connections in start order whose first request is not sent yet.
    next_start: usize,
    active: usize,
}

impl Load {
    /// Opens one connection per `(request index, start offset)`, in start order.
    fn connect(
        addr: SocketAddr,
        requests: Vec<Vec<u8>>,
        starts: Vec<(usize, Duration)>,
        plan: Plan,
    ) -> Result<Load, String> {
        let epoll = Epoll::new().map_err(|e| format!("epoll_create1: {e}"))?;
        let mut conns = Vec::with_capacity(starts.len());
        for (i, (request, start)) in starts.into_iter().enumerate() {
            let stream = open(addr).map_err(|e| format!("cannot connect to {addr}: {e}"))?;
            epoll
                .add(stream.as_raw_fd(), i as u64)
                .map_err(|e| format!("epoll_ctl: {e}"))?;
            conns.push(Conn {
                stream,
                request,
                start,
                parser: Parser::default(),
                sse: None,
                sent: Instant::now(),
                saw_event: false,
                phase: Phase::Idle,
            });
        }
        let n = conns.len();
        Ok(Load {
            addr,
            requests,
            conns,
            epoll,
            plan,
            rec: Record {
                done_at: vec![None; n],
                ..Record::default()
            },
            began: Instant::now(),
            next_start: 0,
            active: n,
        })
    }

    fn run(mut self) -> Result<Record, String> {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 512];
        let mut buf = vec![0u8; 64 * 1024];
        self.began = Instant::now();
        while self.active > 0 {
            self.start_due();
            let n = self
                .epoll
                .wait(&mut events, self.wait_timeout())
                .map_err(|e| format!("epoll_wait: {e}"))?;
            for ev in &events[..n] {
                let key = ev.u64 as usize;
                self.readable(key, &mut buf);
            }
            self.give_up_if_stuck();
        }
        Ok(self.rec)
    }

    /// Sends the first request of every connection whose start time has come.
    fn start_due(&mut self) {
        let elapsed = self.began.elapsed();
        while self.next_start < self.conns.len() && self.conns[self.next_start].start <= elapsed {
            let i = self.next_start;
            self.next_start += 1;
            self.send(i);
        }
    }

    fn wait_timeout(&self) -> Duration {
        let next = self.conns.get(self.next_start).map(|c| c.start);
        next.map_or(Duration::from_millis(50), |s| {
            s.saturating_sub(self.began.elapsed())
        })
    }

    fn send(&mut self, i: usize) {
        let c = &mut self.conns[i];
        c.sent = Instant::now();
        c.phase = Phase::Waiting;
        c.saw_event = false;
        // A small request on an idle socket never fills the send buffer, so a
        // non-blocking write that does not take it all is a failure like any other.
        if let Err(e) = c.stream.write_all(&self.requests[c.request]) {
            self.failed(i, &format!("write: {}", e.kind()));
        }
    }

    fn readable(&mut self, i: usize, buf: &mut [u8]) {
        let c = &mut self.conns[i];
        if c.phase == Phase::Finished {
            return;
        }
        let n = match c.stream.read(buf) {
            Ok(0) => return self.failed(i, "closed by the server"),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                return
            }
            Err(e) => return self.failed(i, &format!("read: {}", e.kind())),
        };
        let arrival = unix_us();
        c.parser.extend(&buf[..n]);
        match drain_steps(c, &mut self.rec, arrival) {
            Ok(Some(status)) => self.completed(i, status),
            Ok(None) => {}
            Err(e) => self.failed(i, &format!("bad reply: {e}")),
        }
    }

    fn completed(&mut self, i: usize, status: u16) {
        let now = Instant::now();
        self.rec.done_at[i] = Some(now);
        if status != 200 {
            self.rec.errors.add(&format!("status {status}"));
        }
        match self.plan {
            Plan::Closed { from, until } => {
                let sent = self.conns[i].sent;
                if status == 200 && sent >= from && now <= until {
                    self.rec.latencies_ns.push((now - sent).as_nanos() as u64);
                }
                if now < until {
                    self.send(i);
                } else {
                    self.finish(i);
                }
            }
            Plan::Once { .. } => self.finish(i),
        }
    }

    /// Counts a failure; in a closed loop the connection is opened again and goes on.
    fn failed(&mut self, i: usize, why: &str) {
        if self.conns[i].phase == Phase::Finished {
            return;
        }
        self.rec.errors.add(why);
        let retry = matches!(self.plan, Plan::Closed { until, .. } if Instant::now() < until);
        if !retry || self.reconnect(i).is_err() {
            return self.finish(i);
        }
        self.send(i);
    }

    fn reconnect(&mut self, i: usize) -> io::Result<()> {
        let stream = open(self.addr)?;
        self.epoll.add(stream.as_raw_fd(), i as u64)?;
        let c = &mut self.conns[i];
        c.stream = stream;
        c.parser = Parser::default();
        c.sse = None;
        Ok(())
    }

    fn finish(&mut self, i: usize) {
        let c = &mut self.conns[i];
        if c.phase != Phase::Finished {
            c.phase = Phase::Finished;
            let _ = self.epoll.delete(c.stream.as_raw_fd());
            self.active -= 1;
        }
    }

    /// A run that cannot end (a reply that never comes) ends here, its stragglers failed.
    fn give_up_if_stuck(&mut self) {
        let deadline = match self.plan {
            Plan::Closed { until, .. } => until + GRACE,
            Plan::Once { deadline } => deadline,
        };
        if Instant::now() < deadline {
            return;
        }
        for i in 0..self.conns.len() {
            if self.conns[i].phase != Phase::Finished {
                self.rec.errors.add("no reply in time");
                self.finish(i);
            }
        }
    }
}

/// Works through what the parser holds: the events of an event stream are recorded,
/// and a complete reply returns its status.
fn drain_steps(c: &mut Conn, rec: &mut Record, arrival_us: u64) -> Result<Option<u16>, String> {
    loop {
        let sse = match c.parser.next()? {
            Step::NeedMore => return Ok(None),
            Step::Head { event_stream } => {
                c.sse = event_stream.then(Sse::default);
                continue;
            }
            Step::Done(status) => return Ok(Some(status)),
            Step::Data(data) => match c.sse.as_mut() {
                Some(sse) => sse.feed(data),
                None => continue,
            },
        };
        for sent_us in sse {
            rec.event_delays_us.push(arrival_us.saturating_sub(sent_us));
            if !c.saw_event {
                c.saw_event = true;
                rec.first_event_us.push(c.sent.elapsed().as_micros() as u64);
            }
        }
    }
}

fn open(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_nodelay(true)?;
    stream.set_nonblocking(true)?;
    Ok(stream)
}

/// A POST with a JSON body and extra headers, ready to write.
fn post(addr: SocketAddr, path: &str, headers: &[(&str, String)], body: &str) -> Vec<u8> {
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        req += &format!("{name}: {value}\r\n");
    }
    req += "\r\n";
    req += body;
    req.into_bytes()
}

// ---------------------------------------------------------------- epoll

/// The few epoll calls the load generator needs, level-triggered on readability.
struct Epoll {
    fd: OwnedFd,
}

// The only unsafe code of the benchmark: three libc calls, each given valid pointers.
#[allow(unsafe_code)]
impl Epoll {
    fn new() -> io::Result<Epoll> {
        // SAFETY: plain syscall; a non-negative result is a new fd that we own.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a freshly created descriptor nobody else owns.
        Ok(Epoll {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, key: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
            u64: key,
        };
        // SAFETY: both fds are open and `ev` is a live epoll_event for the call.
        let rc = unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, fd, &mut ev) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn add(&self, fd: RawFd, key: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, key)
    }

    fn delete(&self, fd: RawFd) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_DEL, fd, 0)
    }

    fn wait(&self, events: &mut [libc::epoll_event], timeout: Duration) -> io::Result<usize> {
        let ms = timeout.as_millis().min(1000) as libc::c_int;
        let max = events.len().min(libc::c_int::MAX as usize) as libc::c_int;
        // SAFETY: `events` is valid for writes of `max` entries.
        let n = unsafe { libc::epoll_wait(self.fd.as_raw_fd(), events.as_mut_ptr(), max, ms) };
        match n {
            n if n >= 0 => Ok(n as usize),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() == ErrorKind::Interrupted {
                    Ok(0)
                } else {
                    Err(e)
                }
            }
        }
    }
}

/// Raises the soft limit on open files to the hard limit: 1000 streams need 1000
/// client sockets here, and the router and nginx (which inherit it) twice that.
#[allow(unsafe_code)]
fn raise_fd_limit() -> Result<(), String> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a live rlimit for both calls.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    if rc != 0 {
        return Err(format!("getrlimit: {}", io::Error::last_os_error()));
    }
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: as above.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    if rc != 0 || lim.rlim_cur < 4096 {
        return Err(format!(
            "need at least 4096 open files, the hard limit is {} (raise it with ulimit -Hn)",
            lim.rlim_max
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------- HTTP parsing

/// One step of reading a response stream.
#[derive(Debug, PartialEq)]
enum Step<'a> {
    /// More bytes are needed.
    NeedMore,
    /// A response head; `event_stream` when it is `text/event-stream`.
    Head { event_stream: bool },
    /// A piece of body.
    Data(&'a [u8]),
    /// The response is complete; the next one may follow.
    Done(u16),
}

#[derive(Debug, Clone, Copy, Default)]
enum State {
    #[default]
    Head,
    Length {
        status: u16,
        left: usize,
    },
    ChunkSize {
        status: u16,
    },
    ChunkData {
        status: u16,
        left: usize,
    },
    ChunkEnd {
        status: u16,
    },
    Trailer {
        status: u16,
    },
}

/// An incremental HTTP/1.1 response reader for keep-alive connections: Content-Length
/// and chunked bodies, which is what the mock, the router and nginx send.
#[derive(Default)]
struct Parser {
    buf: Vec<u8>,
    pos: usize,
    state: State,
}

const MAX_HEAD: usize = 64 * 1024;

impl Parser {
    fn extend(&mut self, data: &[u8]) {
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos > MAX_HEAD {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(data);
    }

    fn next(&mut self) -> Result<Step<'_>, String> {
        loop {
            match self.state {
                State::Head => {
                    let Some((state, event_stream)) = self.head()? else {
                        return Ok(Step::NeedMore);
                    };
                    self.state = state;
                    return Ok(Step::Head { event_stream });
                }
                State::Length { status, left: 0 } => return Ok(self.done(status)),
                State::Length { status, left } => {
                    return Ok(self.data(left, |left| State::Length { status, left }))
                }
                State::ChunkSize { status } => {
                    let Some((a, b)) = self.line() else {
                        return Ok(Step::NeedMore);
                    };
                    self.state = chunk_state(status, &self.buf[a..b])?;
                }
                State::ChunkData { status, left: 0 } => self.state = State::ChunkEnd { status },
                State::ChunkData { status, left } => {
                    return Ok(self.data(left, |left| State::ChunkData { status, left }))
                }
                State::ChunkEnd { status } => match self.line() {
                    None => return Ok(Step::NeedMore),
                    Some((a, b)) if a == b => self.state = State::ChunkSize { status },
                    Some(_) => return Err("chunk data not followed by CRLF".to_owned()),
                },
                State::Trailer { status } => match self.line() {
                    None => return Ok(Step::NeedMore),
                    Some((a, b)) if a == b => return Ok(self.done(status)),
                    Some(_) => {}
                },
            }
        }
    }

    fn done(&mut self, status: u16) -> Step<'static> {
        self.state = State::Head;
        Step::Done(status)
    }

    /// Parses a complete head, if there is one: the body's state and whether it is an
    /// event stream.
    fn head(&mut self) -> Result<Option<(State, bool)>, String> {
        let avail = &self.buf[self.pos..];
        let Some(end) = find(avail, b"\r\n\r\n") else {
            if avail.len() > MAX_HEAD {
                return Err("response head too large".to_owned());
            }
            return Ok(None);
        };
        let parsed = parse_head(&avail[..end])?;
        self.pos += end + 4;
        Ok(Some(parsed))
    }

    /// Up to `left` body bytes from what is buffered.
    fn data(&mut self, left: usize, next: impl Fn(usize) -> State) -> Step<'_> {
        let n = left.min(self.buf.len() - self.pos);
        if n == 0 {
            return Step::NeedMore;
        }
        let start = self.pos;
        self.pos += n;
        self.state = next(left - n);
        Step::Data(&self.buf[start..start + n])
    }

    /// The buffer range of the next CRLF-terminated line, without its CRLF.
    fn line(&mut self) -> Option<(usize, usize)> {
        let end = self.pos + find(&self.buf[self.pos..], b"\r\n")?;
        let start = self.pos;
        self.pos = end + 2;
        Some((start, end))
    }
}

fn chunk_state(status: u16, line: &[u8]) -> Result<State, String> {
    let hex = line.split(|&b| b == b';').next().unwrap_or_default();
    let text = std::str::from_utf8(hex).map_err(|_| "bad chunk size".to_owned())?;
    let size = usize::from_str_radix(text.trim(), 16)
        .map_err(|_| format!("bad chunk size {:?}", String::from_utf8_lossy(line)))?;
    Ok(match size {
        0 => State::Trailer { status },
        left => State::ChunkData { status, left },
    })
}

/// The body framing (with the status) of a response head without its final CRLFCRLF,
/// and whether the body is an event stream.
fn parse_head(head: &[u8]) -> Result<(State, bool), String> {
    let text = std::str::from_utf8(head).map_err(|_| "response head is not UTF-8".to_owned())?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let (mut length, mut chunked, mut events) = (None, false, false);
    for (name, value) in lines.filter_map(|l| l.split_once(':')) {
        let value = value.trim().to_ascii_lowercase();
        if name.eq_ignore_ascii_case("content-length") {
            length = value.parse::<usize>().ok();
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.contains("chunked");
        } else if name.eq_ignore_ascii_case("content-type") {
            events = value.starts_with("text/event-stream");
        }
    }
    let state = match (chunked, length) {
        (true, _) => State::ChunkSize { status },
        (false, Some(left)) => State::Length { status, left },
        _ if status == 204 || status == 304 || status < 200 => State::Length { status, left: 0 },
        _ => {
            return Err(format!(
                "response {status} has neither length nor chunked framing"
            ))
        }
    };
    Ok((state, events))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Splits an SSE body into events and reads each event's `"sent_us"` stamp.
#[derive(Default)]
struct Sse {
    pending: Vec<u8>,
}

impl Sse {
    /// Takes a piece of body; returns the stamps of the events it completed.
    fn feed(&mut self, data: &[u8]) -> Vec<u64> {
        self.pending.extend_from_slice(data);
        let (mut start, mut stamps) = (0, Vec::new());
        while let Some(end) = find(&self.pending[start..], b"\n\n") {
            stamps.extend(sent_us(&self.pending[start..start + end]));
            start += end + 2;
        }
        self.pending.drain(..start);
        stamps
    }
}

fn sent_us(event: &[u8]) -> Option<u64> {
    const KEY: &[u8] = b"\"sent_us\":";
    let at = find(event, KEY)? + KEY.len();
    let digits = &event[at..];
    let len = digits.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&digits[..len]).ok()?.parse().ok()
}

/// A blocking GET on a new connection: status and body.
fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, Vec<u8>), String> {
    let resp = http::fetch(addr, "GET", path, &[], b"", Duration::from_secs(10))
        .map_err(|e| format!("GET {path} on {addr}: {e}"))?;
    Ok((resp.status, resp.body))
}

fn get_json(addr: SocketAddr, path: &str) -> Result<serde_json::Value, String> {
    let (_, body) = http_get(addr, path)?;
    serde_json::from_slice(&body).map_err(|e| format!("GET {path}: not JSON: {e}"))
}

// ---------------------------------------------------------------- processes

/// Paths of one run: the binaries and a scratch directory removed at the end.
struct Env {
    bin_dir: PathBuf,
    work: PathBuf,
}

impl Env {
    fn new() -> Result<Env, String> {
        let exe = std::env::current_exe().map_err(|e| format!("cannot find myself: {e}"))?;
        let bin_dir = exe.parent().ok_or("no binary directory")?.to_owned();
        for bin in ["vllm-router", "mock-vllm"] {
            if !bin_dir.join(bin).is_file() {
                return Err(format!(
                    "{} is missing: build with `cargo build --release` (or run `make bench`)",
                    bin_dir.join(bin).display()
                ));
            }
        }
        let work = std::env::temp_dir().join(format!("vllm-router-bench-{}", std::process::id()));
        fs::create_dir_all(&work).map_err(|e| format!("cannot create {}: {e}", work.display()))?;
        Ok(Env { bin_dir, work })
    }

    fn mock(&self, name: &str) -> Result<Mock, String> {
        let mut cmd = Command::new(self.bin_dir.join("mock-vllm"));
        cmd.args(["--host", "127.0.0.1", "--port", "0", "--id", name]);
        let (proc, addr) = Proc::spawn_listening(cmd, name, &self.work)?;
        Ok(Mock { proc, addr })
    }

    fn router(&self, name: &str, toml: &str, log_level: &str) -> Result<Router, String> {
        let config = self.work.join(format!("{name}.toml"));
        fs::write(&config, toml).map_err(|e| format!("cannot write {}: {e}", config.display()))?;
        let mut cmd = Command::new(self.bin_dir.join("vllm-router"));
        cmd.arg("run")
            .arg("--config")
            .arg(&config)
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--log-level",
                log_level,
            ])
            .arg("--log-dir")
            .arg(self.work.join(format!("{name}-logs")));
        let (proc, addr) = Proc::spawn_listening(cmd, name, &self.work)?;
        Ok(Router { proc, addr })
    }

    /// nginx in front of `upstream`, or `None` (said on stdout) when it is not installed.
    fn nginx(&self, upstream: SocketAddr) -> Result<Option<Nginx>, String> {
        let Some(bin) = find_in_path("nginx") else {
            println!("nginx not installed: skipping");
            return Ok(None);
        };
        let dir = self.work.join("nginx");
        fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let port = free_port()?;
        let conf = NGINX_TEMPLATE
            .replace("{{DIR}}", &dir.to_string_lossy())
            .replace("{{LISTEN}}", &format!("127.0.0.1:{port}"))
            .replace("{{UPSTREAM}}", &upstream.to_string());
        let conf_path = dir.join("nginx.conf");
        fs::write(&conf_path, conf).map_err(|e| format!("cannot write nginx.conf: {e}"))?;
        let mut cmd = Command::new(bin);
        cmd.arg("-c")
            .arg(&conf_path)
            .arg("-p")
            .arg(&dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .args(["-g", "daemon off;"])
            .stdout(Stdio::null());
        let proc = Proc::spawn(cmd, "nginx", &self.work)?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        wait_until(Duration::from_secs(10), "nginx to answer /health", || {
            http_get(addr, "/health").is_ok_and(|(s, _)| s == 200)
        })?;
        println!(
            "nginx {} in front of the mock, config {}",
            nginx_version(),
            conf_path.display()
        );
        Ok(Some(Nginx { proc, addr }))
    }

    fn write_json(&self, report: &Report) -> Result<PathBuf, String> {
        let dir = self
            .bin_dir
            .parent()
            .ok_or("no target directory")?
            .join("bench");
        fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let path = dir.join("latest.json");
        let json = serde_json::to_string_pretty(report).map_err(|e| e.to_string())?;
        fs::write(&path, json + "\n")
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        Ok(path)
    }
}

impl Drop for Env {
    /// Removes the scratch directory (configs, logs), unless `BENCH_KEEP` is set.
    fn drop(&mut self) {
        if std::env::var_os("BENCH_KEEP").is_some() {
            println!("scratch directory kept: {}", self.work.display());
        } else {
            let _ = fs::remove_dir_all(&self.work);
        }
    }
}

/// A child process, stopped (SIGTERM, then SIGKILL) when dropped.
struct Proc {
    name: String,
    proc: process::Proc,
}

impl Proc {
    /// Starts `cmd` with its stderr in `<work>/<name>.stderr`.
    fn spawn(mut cmd: Command, name: &str, work: &Path) -> Result<Proc, String> {
        Proc::log_stderr(&mut cmd, name, work)?;
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        Ok(Proc {
            name: name.to_owned(),
            proc: process::Proc(child),
        })
    }

    fn log_stderr(cmd: &mut Command, name: &str, work: &Path) -> Result<(), String> {
        let log = work.join(format!("{name}.stderr"));
        let stderr =
            fs::File::create(&log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        cmd.stdin(Stdio::null()).stderr(stderr);
        Ok(())
    }

    /// Starts `cmd` and reads the `listening on ADDR` line it prints first.
    fn spawn_listening(
        mut cmd: Command,
        name: &str,
        work: &Path,
    ) -> Result<(Proc, SocketAddr), String> {
        Proc::log_stderr(&mut cmd, name, work)?;
        match process::spawn_listening(cmd, name) {
            Ok((proc, addr)) => Ok((
                Proc {
                    name: name.to_owned(),
                    proc,
                },
                addr,
            )),
            Err(e) => {
                let log = work.join(format!("{name}.stderr"));
                let why = fs::read_to_string(&log).unwrap_or_default();
                Err(format!("{e}: {}", why.trim()))
            }
        }
    }

    fn pid(&self) -> u32 {
        self.proc.pid()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SIGTERM lets nginx's master stop its workers; SIGKILL would orphan them.
        if !self.proc.terminate(Duration::from_secs(5)) {
            eprintln!("bench: {} did not stop on SIGTERM; killing it", self.name);
        }
    }
}

struct Mock {
    proc: Proc,
    addr: SocketAddr,
}

struct Router {
    proc: Proc,
    addr: SocketAddr,
}

impl Router {
    fn wait_ready(&self, timeout: Duration) -> Result<(), String> {
        wait_until(timeout, "the router's /readyz", || {
            http_get(self.addr, "/readyz").is_ok_and(|(s, _)| s == 200)
        })
    }

    fn wait_healthy(&self, n: usize, timeout: Duration) -> Result<(), String> {
        wait_until(timeout, &format!("{n} healthy backends"), || {
            get_json(self.addr, "/health")
                .ok()
                .and_then(|h| h["healthy_servers"].as_u64())
                == Some(n as u64)
        })
    }
}

struct Nginx {
    proc: Proc,
    addr: SocketAddr,
}

impl Nginx {
    /// The worker processes, where nginx does its work.
    fn worker_pids(&self) -> Vec<u32> {
        let master = self.proc.pid();
        procfs::children(master)
    }
}

/// A `servers.toml` for these backends.
fn servers_toml(backends: &[SocketAddr], cap: usize, queue: usize) -> String {
    let servers: Vec<String> = backends
        .iter()
        .map(|a| format!("    {{ url = \"http://{a}\", max_concurrent_requests = {cap} }},"))
        .collect();
    format!(
        "[servers]\nservers = [\n{}\n]\n\n[config]\nmax_queue_size = {queue}\nqueue_timeout = 60\nrequest_timeout = 60\n",
        servers.join("\n")
    )
}

/// Polls every millisecond, not the harness's 10: the start-up figures are read
/// through it.
fn wait_until(timeout: Duration, what: &str, mut ok: impl FnMut() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    while !ok() {
        if Instant::now() > deadline {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

fn free_port() -> Result<u16, String> {
    process::free_port().map_err(|e| format!("cannot find a free port: {e}"))
}

fn find_in_path(bin: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = ["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from);
    std::env::split_paths(&path)
        .chain(extra)
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

fn nginx_version() -> String {
    let out = Command::new(find_in_path("nginx").unwrap_or_default())
        .arg("-v")
        .output();
    out.map(|o| String::from_utf8_lossy(&o.stderr).trim().to_owned())
        .unwrap_or_default()
}

fn command_output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned())
}

fn file_size(path: &Path) -> u64 {
    fs::metadata(path).map_or(0, |m| m.len())
}

// ---------------------------------------------------------------- /proc

/// Resident memory and thread count of a process.
#[derive(Serialize, Default, Clone, Copy)]
struct ProcSample {
    rss_kib: u64,
    threads: u64,
}

impl ProcSample {
    /// The figures of `pid`, zeros when it is gone.
    fn of(pid: u32) -> ProcSample {
        let status = procfs::status(pid).unwrap_or_default();
        ProcSample {
            rss_kib: status.rss_kib,
            threads: status.threads,
        }
    }
}

/// CPU time spent by groups of processes between two instants, measured on a
/// thread of its own while the load runs.
struct CpuWatch(JoinHandle<Vec<f64>>);

impl CpuWatch {
    fn spawn(groups: Vec<Vec<u32>>, from: Instant, until: Instant) -> CpuWatch {
        CpuWatch(thread::spawn(move || {
            let total = |g: &Vec<u32>| g.iter().map(|&p| procfs::cpu_us(p)).sum::<u64>();
            thread::sleep(from.saturating_duration_since(Instant::now()));
            let before: Vec<u64> = groups.iter().map(total).collect();
            thread::sleep(until.saturating_duration_since(Instant::now()));
            groups
                .iter()
                .zip(before)
                .map(|(g, b)| total(g).saturating_sub(b) as f64)
                .collect()
        }))
    }

    fn join(self) -> Result<Vec<f64>, String> {
        self.0
            .join()
            .map_err(|_| "the CPU watch thread panicked".to_owned())
    }
}

/// The highest RSS and thread count of a process while it runs.
struct PeakWatch {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<ProcSample>,
}

impl PeakWatch {
    fn spawn(pid: u32) -> PeakWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = thread::spawn(move || {
            let mut peak = ProcSample::default();
            while !flag.load(Ordering::Relaxed) {
                let s = ProcSample::of(pid);
                peak.rss_kib = peak.rss_kib.max(s.rss_kib);
                peak.threads = peak.threads.max(s.threads);
                thread::sleep(Duration::from_millis(20));
            }
            peak
        });
        PeakWatch { stop, handle }
    }

    fn stop(self) -> ProcSample {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or_default()
    }
}

/// The longest queue the router's `/load-stats` showed while a run went on.
struct QueueWatch {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<u64>,
}

impl QueueWatch {
    fn spawn(addr: SocketAddr) -> QueueWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = thread::spawn(move || {
            let mut peak = 0;
            while !flag.load(Ordering::Relaxed) {
                let stats = get_json(addr, "/load-stats").unwrap_or_default();
                peak = stats["summary"]["queue_length"]
                    .as_u64()
                    .unwrap_or(0)
                    .max(peak);
                thread::sleep(Duration::from_millis(50));
            }
            peak
        });
        QueueWatch { stop, handle }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steps(raw: &[&[u8]]) -> Vec<String> {
        let mut p = Parser::default();
        let mut out = Vec::new();
        for piece in raw {
            p.extend(piece);
            loop {
                match p.next().expect("valid") {
                    Step::NeedMore => break,
                    Step::Head { event_stream } => out.push(format!("[{event_stream}]")),
                    Step::Data(d) => out.push(String::from_utf8_lossy(d).into_owned()),
                    Step::Done(s) => out.push(format!("<{s}>")),
                }
            }
        }
        out
    }

    #[test]
    fn reads_length_and_chunked_replies_back_to_back() {
        // Split at awkward places; the 503 is an event stream.
        let raw: &[&[u8]] = &[
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel",
            b"loHTTP/1.1 503 X\r\ntransfer-encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n3\r\nab",
            b"c\r\n1;x=y\r\nd\r\n0\r\nT: 1\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\n\r\n",
        ];
        assert_eq!(
            steps(raw),
            [
                "[false]", "hel", "lo", "<200>", "[true]", "ab", "c", "d", "<503>", "[false]",
                "<204>"
            ]
        );
    }

    #[test]
    fn rejects_broken_framing() {
        // What the router writes when the backend breaks mid-reply.
        let mut p = Parser::default();
        p.extend(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nROUTER-ABORTED\r\n\r\n");
        assert_eq!(
            p.next(),
            Ok(Step::Head {
                event_stream: false
            })
        );
        assert!(p.next().is_err());
        let mut p = Parser::default();
        p.extend(b"HTTP/1.1 200 OK\r\n\r\n");
        assert!(p.next().is_err());
    }

    #[test]
    fn finds_sent_stamps_across_pieces() {
        let mut sse = Sse::default();
        assert!(sse.feed(b"data: {\"index\":0,\"sent_us\":12").is_empty());
        assert_eq!(sse.feed(b"34,\"x\":1}\n\ndata: [DONE]\n\n"), [1234]);
        assert!(sse.pending.is_empty());
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(
            (
                percentile(&v, 0.5),
                percentile(&v, 0.99),
                percentile(&v, 1.0)
            ),
            (50.0, 99.0, 100.0)
        );
        assert_eq!(percentile(&[], 0.5), 0.0);
    }
}
