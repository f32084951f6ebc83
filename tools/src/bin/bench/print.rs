//! The report on stdout: one table per part, the targets, and the statistics
//! the tables use.

use crate::*;

/// A plain text table: the first column left-aligned, the others right-aligned.
pub(crate) struct Table {
    pub(crate) rows: Vec<Vec<String>>,
}

impl Table {
    pub(crate) fn new(header: &[&str]) -> Table {
        Table {
            rows: vec![header.iter().map(|h| h.to_string()).collect()],
        }
    }

    pub(crate) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub(crate) fn print(&self) {
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

pub(crate) fn fmt_opt(v: Option<f64>, decimals: usize) -> String {
    v.map_or("-".to_owned(), |v| format!("{v:.decimals$}"))
}

pub(crate) fn print_report(r: &Report) {
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
    print_routing(&r.routing);
    print_targets(r);
}

pub(crate) fn print_throughput(r: &Report) {
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

pub(crate) fn print_streaming(r: &Report) {
    println!("\n2. Streams: {TOKENS_PER_STREAM} events each, {TOKEN_GAP_MS} ms apart; delay = arrival - mock's sent_us; added = minus direct's; CPU us/event = the proxy's CPU time over the run per event relayed");
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
        "CPU us/event",
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
            fmt_opt(s.proxy_cpu_us_per_event, 1),
            s.errors.to_string(),
        ]);
    }
    t.print();
}

pub(crate) fn print_memory(r: &Report) {
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

pub(crate) fn print_scale(r: &Report) {
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

pub(crate) fn print_startup(r: &Report) {
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

pub(crate) fn print_targets(r: &Report) {
    println!("\nTargets (issue 7)");
    let mut t = Table::new(&["target", "value", "limit", "result"]);
    for c in &r.targets {
        let result = verdict(c.met);
        t.row(vec![
            c.target.clone(),
            fmt_opt(c.value, 2),
            c.limit.clone(),
            result.to_owned(),
        ]);
    }
    t.print();
}

/// How a target came out: met, missed, or not measured (`None`).
pub(crate) fn verdict(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "met",
        Some(false) => "MISSED",
        None => "not measured",
    }
}

/// The `q` quantile of sorted samples (nearest rank), 0 when there are none.
pub(crate) fn percentile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64
}

pub(crate) fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

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
