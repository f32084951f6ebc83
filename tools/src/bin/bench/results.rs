//! The figures of a run: what each part measured, the targets they are held to,
//! and the failed requests counted by what went wrong (also the JSON written).

use crate::*;

pub(crate) fn check_targets(r: &Report) -> Vec<TargetCheck> {
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
pub(crate) fn scale_ratio(rows: &[ScaleRow]) -> Option<f64> {
    let one = rows.first()?.router_cpu_us_per_req?;
    let many = rows.last()?.router_cpu_us_per_req?;
    (one > 0.0).then(|| many / one)
}

#[derive(Serialize, Default)]
pub(crate) struct Report {
    pub(crate) machine: Machine,
    pub(crate) nginx: bool,
    pub(crate) throughput: Vec<ClosedLoop>,
    pub(crate) streaming: Vec<Streaming>,
    pub(crate) memory: Memory,
    pub(crate) scale: Vec<ScaleRow>,
    pub(crate) queue: Vec<QueueRow>,
    pub(crate) startup: Vec<Startup>,
    pub(crate) binary_bytes: u64,
    pub(crate) targets: Vec<TargetCheck>,
    pub(crate) routing: RoutingReport,
}

#[derive(Serialize, Default)]
pub(crate) struct Machine {
    pub(crate) nproc: usize,
    pub(crate) cpu_model: String,
    pub(crate) date: String,
    pub(crate) git_commit: String,
    pub(crate) note: String,
    /// CPU used by processes outside this benchmark during the run, in percent of the
    /// machine: anything above a few percent skews every figure.
    pub(crate) others_cpu_percent: f64,
}

impl Machine {
    pub(crate) fn read() -> Machine {
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
pub(crate) struct CpuTicks {
    pub(crate) machine: u64,
    pub(crate) own: u64,
    pub(crate) at: Instant,
}

impl CpuTicks {
    pub(crate) fn now() -> CpuTicks {
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
    pub(crate) fn others_percent(&self, nproc: usize) -> f64 {
        let end = CpuTicks::now();
        let others = (end.machine - self.machine).saturating_sub(end.own - self.own);
        let capacity = end.at.duration_since(self.at).as_secs_f64()
            * procfs::clock_ticks() as f64
            * nproc as f64;
        100.0 * others as f64 / capacity.max(1.0)
    }
}

#[derive(Serialize, Default)]
pub(crate) struct ClosedLoop {
    pub(crate) target: String,
    pub(crate) conns: usize,
    /// Connections that got at least one reply.
    pub(crate) conns_answered: usize,
    pub(crate) seconds: f64,
    pub(crate) requests: u64,
    pub(crate) req_per_s: f64,
    pub(crate) p50_us: f64,
    pub(crate) p99_us: f64,
    pub(crate) p999_us: f64,
    pub(crate) errors: Errors,
    pub(crate) proxy_cpu_us_per_req: Option<f64>,
    pub(crate) mock_cpu_us_per_req: Option<f64>,
    pub(crate) client_cpu_us_per_req: Option<f64>,
}

impl ClosedLoop {
    /// The connection count, with how many were answered when not all were.
    pub(crate) fn conns_cell(&self) -> String {
        match self.conns_answered {
            n if n < self.conns => format!("{} ({n} answered)", self.conns),
            _ => self.conns.to_string(),
        }
    }

    pub(crate) fn summary(&self) -> String {
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
pub(crate) struct Streaming {
    pub(crate) target: String,
    pub(crate) streams: usize,
    pub(crate) events: u64,
    pub(crate) expected_events: u64,
    pub(crate) delay_p50_us: f64,
    pub(crate) delay_p99_us: f64,
    pub(crate) delay_max_us: f64,
    pub(crate) first_event_p50_ms: f64,
    pub(crate) first_event_p99_ms: f64,
    /// The proxy's CPU time over the whole run (streams opened, relayed, closed) per
    /// event relayed; none for direct.
    pub(crate) proxy_cpu_us_per_event: Option<f64>,
    pub(crate) errors: Errors,
}

impl Streaming {
    pub(crate) fn summary(&self) -> String {
        format!(
            "{:<6} {:>4} streams: delay p50 {:>5.0} us  p99 {:>6.0} us  first event p50 {:.1} ms  CPU/event {} us  events {}/{}  errors {}",
            self.target,
            self.streams,
            self.delay_p50_us,
            self.delay_p99_us,
            self.first_event_p50_ms,
            fmt_opt(self.proxy_cpu_us_per_event, 1),
            self.events,
            self.expected_events,
            self.errors
        )
    }
}

#[derive(Serialize, Default)]
pub(crate) struct Memory {
    pub(crate) idle: ProcSample,
    pub(crate) during_1000_streams: ProcSample,
    pub(crate) after: ProcSample,
}

#[derive(Serialize, Default)]
pub(crate) struct ScaleRow {
    pub(crate) backends: usize,
    pub(crate) conns: usize,
    pub(crate) req_per_s: f64,
    pub(crate) p50_us: f64,
    pub(crate) p99_us: f64,
    pub(crate) router_cpu_us_per_req: Option<f64>,
    pub(crate) errors: Errors,
}

impl ScaleRow {
    pub(crate) fn summary(&self) -> String {
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
pub(crate) struct QueueRow {
    pub(crate) queued: usize,
    pub(crate) queue_peak: u64,
    pub(crate) drain_ms: f64,
    pub(crate) median_gap_us: f64,
    pub(crate) serial_us_per_req: f64,
    /// Set when the line did not form: requests were accepted but not read.
    pub(crate) note: Option<String>,
    pub(crate) errors: Errors,
}

impl QueueRow {
    pub(crate) fn summary(&self) -> String {
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
pub(crate) struct Startup {
    pub(crate) config: String,
    pub(crate) workers: usize,
    pub(crate) runs: usize,
    pub(crate) ready_ms_median: f64,
    pub(crate) ready_rss_kib: u64,
    pub(crate) ready_threads: u64,
}

impl Startup {
    pub(crate) fn summary(&self) -> String {
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
pub(crate) struct TargetCheck {
    pub(crate) target: String,
    pub(crate) value: Option<f64>,
    pub(crate) limit: String,
    /// `None` when it could not be measured (nginx missing).
    pub(crate) met: Option<bool>,
}

impl TargetCheck {
    pub(crate) fn at_least(
        target: &str,
        value: Option<f64>,
        limit: f64,
        unit: &str,
    ) -> TargetCheck {
        TargetCheck {
            target: target.to_owned(),
            value,
            limit: format!(">= {limit} {unit}").trim_end().to_owned(),
            met: value.map(|v| v >= limit),
        }
    }

    pub(crate) fn below(target: &str, value: Option<f64>, limit: f64, unit: &str) -> TargetCheck {
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
pub(crate) struct Errors(pub(crate) BTreeMap<String, u64>);

impl Errors {
    pub(crate) fn add(&mut self, why: &str) {
        *self.0.entry(why.to_owned()).or_default() += 1;
    }

    pub(crate) fn total(&self) -> u64 {
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
