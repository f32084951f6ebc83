//! The summary table and the lines under it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use vllm_router_tools::procfs::Status;

use crate::checks::Closed;
use crate::stats::Kind;
use crate::{Samples, MAX_RSS_GROWTH_KIB, MAX_THREAD_GROWTH};

/// Everything the summary shows.
pub struct Report<'a> {
    pub table: &'a BTreeMap<String, Kind>,
    pub exact: u64,
    pub normal: u64,
    pub in_flight: &'a [u64],
    pub queue: Option<u64>,
    pub mocks_idle: &'a [Option<u64>],
    pub cold: Status,
    pub warm: Status,
    pub warmup: Duration,
    pub end: Status,
    pub samples: Samples,
    pub restarts: usize,
    /// `vllm_router_client_connections_closed_total` by reason, and the open gauge.
    pub closed: Option<Closed>,
    pub access: &'a str,
    /// What the mocks saw: their peaks in flight and the hostile requests they got.
    pub mocks: &'a str,
}

impl Report<'_> {
    pub fn render(&self, failures: &[String]) -> String {
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
        let _ = writeln!(out, "{}", self.mocks);
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
