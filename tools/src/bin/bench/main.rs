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
//! 5. start-up: exec to `/readyz` 200;
//! 6. routing: `least_loaded` against `cache_aware` on fleets with prefix caches
//!    (`routing.rs`; `bench routing` runs this part alone).
//!
//! The load generator is one thread on an epoll loop over non-blocking keep-alive
//! sockets, with a minimal HTTP/1.1 response parser (Content-Length and chunked), so it
//! costs little CPU: client, router, mock and nginx all share the same cores, and every
//! figure is read as a ratio against the others measured in the same run.

mod load;
mod parse;
mod print;
mod procs;
mod results;
mod routing;
mod watch;

use load::*;
use parse::*;
use print::*;
use procs::*;
use results::*;
use routing::*;
use watch::*;

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
const NGINX_TEMPLATE: &str = include_str!("nginx.conf.in");

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
    if std::env::args().nth(1).as_deref() == Some("routing") {
        report.routing = routing_part(&env)?;
        print_routing(&report.routing);
        return Ok(runs_with_errors(&report));
    }
    front_parts(&env, &mut report)?;
    scale_parts(&env, &mut report)?;
    report.startup = startup_part(&env)?;
    report.routing = routing_part(&env)?;
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
    let routing = r
        .routing
        .rows
        .iter()
        .filter(|row| row.errors > 0)
        .map(|row| {
            format!(
                "routing {} {} x{}: {} errors",
                row.workload, row.routing, row.replicas, row.errors
            )
        });
    throughput
        .chain(streaming)
        .chain(scale)
        .chain(queue)
        .chain(routing)
        .collect()
}

/// Parts 1, 2 and 3: a mock alone, the router and nginx, each proxy in front of a mock
/// of its own. Sharing one would mislead the router: it reads a backend's own
/// `/metrics` for its load, and would count the direct runs' requests as another
/// router's (docs/operations.md, "Load across router replicas").
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
    let cpu = |pids: &[u32]| pids.iter().map(|&p| procfs::cpu_us(p)).sum::<u64>();
    let cpu_before = cpu(&target.proxy_pids);
    let rec = Load::connect(target.addr, vec![request], starts, plan)?.run()?;
    let cpu_used = cpu(&target.proxy_pids).saturating_sub(cpu_before) as f64;
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
        proxy_cpu_us_per_event: (!target.proxy_pids.is_empty() && !delays.is_empty())
            .then(|| cpu_used / delays.len() as f64),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_with_errors_fails_the_benchmark_and_a_missed_target_does_not() {
        let mut report = Report::default();
        report.throughput.push(ClosedLoop::default());
        report.targets = check_targets(&report);
        assert!(runs_with_errors(&report).is_empty());
        let mut failed = QueueRow::default();
        failed.errors.add("status 502");
        report.queue.push(failed);
        let errors = runs_with_errors(&report);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].contains("status 502"), "{errors:?}");
    }
}
