//! Prometheus metrics: every metric name is defined here, counted here, and written
//! here in the text exposition format (version 0.0.4), by hand: the format is simple,
//! a crate would add more code to the binary than this module has, and the test suite
//! checks the output with `promtool check metrics` and a parser.
//!
//! Counters and histograms live in one `Mutex<Registry>`, updated once per request (by
//! `request::relay`), once per health check (health thread) and once per reload (reload
//! thread). Gauges (in-flight, capacity, health, queue, backend-reported load) are read
//! from the slot table when `/metrics` is scraped. Series are keyed by backend URL, so
//! the counters of a server that stays in the config survive a reload.
//!
//! Labels are bounded: backend URL (from the config), model (only models some backend
//! lists, anything else is `other`), status class (`2xx`...), and fixed reason names.
//! Never a request id, a path, or anything else a client chooses freely.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use parking_lot::Mutex;

use crate::backend::registry::TableView;
use crate::control::generation_metrics::GenerationMetrics;
use crate::control::histogram::Histogram;
use crate::request::access::Access;
use crate::request::pick::Reason;

/// Why the router closes a client connection itself: refused at accept (over
/// `max_client_connections` or `max_connections_per_ip`, no thread, no file
/// descriptor), or closed for breaking a client timeout. Every label
/// `observe_connection_closed` is given must be here: one missing was never exported,
/// and in debug builds its `debug_assert` killed the accept thread (`per_ip` was).
pub const CONNECTION_CLOSE_REASONS: [&str; 7] = [
    "over_cap",
    "per_ip",
    "no_thread",
    "no_fd",
    "idle",
    "slow_body",
    "stalled_write",
];

/// Histogram buckets in seconds: LLM requests last from milliseconds (a cached error,
/// a tokenize call) to minutes (a long generation).
const BUCKETS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

#[derive(Default)]
pub struct Metrics {
    registry: Mutex<Registry>,
    /// TTFT, tokens and the rest, from the replies' content (`control::generation_metrics`).
    generation: GenerationMetrics,
}

#[derive(Default)]
struct Registry {
    /// (backend, model, status class)
    requests: BTreeMap<(String, String, &'static str), u64>,
    duration: BTreeMap<String, Timings>,
    ttfb: BTreeMap<String, Timings>,
    queue_wait: Timings,
    rejected: BTreeMap<&'static str, u64>,
    retries: BTreeMap<String, u64>,
    /// (backend, "success" | "failure")
    health_checks: BTreeMap<(String, &'static str), u64>,
    health_check_duration: BTreeMap<String, Timings>,
    /// "success" | "failure"
    reloads: BTreeMap<&'static str, u64>,
    /// Client connections the router closed itself, by reason.
    connections_closed: BTreeMap<&'static str, u64>,
}

/// A request-time histogram, over `BUCKETS`.
#[derive(Clone)]
struct Timings(Histogram);

impl Default for Timings {
    fn default() -> Self {
        Timings(Histogram::new(&BUCKETS))
    }
}

impl Timings {
    fn observe(&mut self, d: Duration) {
        self.0.observe(d);
    }
}

impl Metrics {
    /// Counts one finished request. `known_model` says whether some backend lists the
    /// request's model (only those become label values).
    pub fn observe_request(&self, access: &Access, known_model: bool) {
        let mut r = self.registry.lock();
        if let Some(reason) = access.rejected {
            *r.rejected.entry(reason).or_default() += 1;
        }
        let Some(backend) = access.backend.clone() else {
            return;
        };
        let model = model_label(access, known_model);
        *r.requests
            .entry((backend.clone(), model.clone(), status_class(access.status)))
            .or_default() += 1;
        r.duration
            .entry(backend.clone())
            .or_default()
            .observe(access.elapsed());
        if let Some(ttfb) = access.time_to_first_byte() {
            r.ttfb.entry(backend.clone()).or_default().observe(ttfb);
        }
        r.queue_wait.observe(access.queue_wait);
        if access.retries > 0 {
            *r.retries.entry(backend.clone()).or_default() += u64::from(access.retries);
        }
        drop(r);
        if let Some(generation) = &access.generation {
            self.generation
                .observe(&model, &backend, access.elapsed(), generation);
        }
    }

    /// Counts a request the router answered itself, by reason (an error code).
    pub fn observe_rejection(&self, reason: &'static str) {
        *self.registry.lock().rejected.entry(reason).or_default() += 1;
    }

    pub fn observe_health_check(&self, backend: &str, ok: bool, took: Duration) {
        let mut r = self.registry.lock();
        let result = if ok { "success" } else { "failure" };
        *r.health_checks
            .entry((backend.to_owned(), result))
            .or_default() += 1;
        r.health_check_duration
            .entry(backend.to_owned())
            .or_default()
            .observe(took);
    }

    pub fn observe_reload(&self, ok: bool) {
        *self
            .registry
            .lock()
            .reloads
            .entry(if ok { "success" } else { "failure" })
            .or_default() += 1;
    }

    /// Counts a client connection the router closed itself: refused over a cap or
    /// for lack of a thread, or closed for a client timeout.
    pub fn observe_connection_closed(&self, reason: &'static str) {
        // Only the listed reasons are written out.
        debug_assert!(CONNECTION_CLOSE_REASONS.contains(&reason), "{reason}");
        *self
            .registry
            .lock()
            .connections_closed
            .entry(reason)
            .or_default() += 1;
    }

    /// The whole exposition, with gauges from `table` and the count of open client
    /// connections.
    pub fn render(&self, table: &TableView, max_queue_size: usize, connections: usize) -> String {
        let mut out = String::with_capacity(8 * 1024);
        let r = self.registry.lock();

        family(
            &mut out,
            "vllm_router_build_info",
            "gauge",
            "Version of the running router.",
        );
        let _ = writeln!(
            out,
            "vllm_router_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );

        family(
            &mut out,
            "vllm_router_requests_total",
            "counter",
            "Proxied requests that reached a backend, by backend, model and status class.",
        );
        for ((backend, model, class), n) in &r.requests {
            let labels = [
                ("backend", backend.as_str()),
                ("model", model),
                ("status", class),
            ];
            sample(&mut out, "vllm_router_requests_total", &labels, *n as f64);
        }
        histograms(
            &mut out,
            "vllm_router_request_duration_seconds",
            "Time from a request's arrival to the last byte of its reply, by backend.",
            &r.duration,
        );
        histograms(
            &mut out,
            "vllm_router_time_to_first_byte_seconds",
            "Time from a request's arrival to the first byte of its reply, by backend.",
            &r.ttfb,
        );
        family(
            &mut out,
            "vllm_router_queue_wait_seconds",
            "histogram",
            "Time requests waited for a free backend slot.",
        );
        histogram(
            &mut out,
            "vllm_router_queue_wait_seconds",
            &[],
            &r.queue_wait,
        );

        family(
            &mut out,
            "vllm_router_rejected_requests_total",
            "counter",
            "Requests the router answered itself without a backend, by reason.",
        );
        for (reason, n) in &r.rejected {
            sample(
                &mut out,
                "vllm_router_rejected_requests_total",
                &[("reason", reason)],
                *n as f64,
            );
        }
        family(
            &mut out,
            "vllm_router_retries_total",
            "counter",
            "Requests sent again to another backend, by the backend that finally served them.",
        );
        for (backend, n) in &r.retries {
            sample(
                &mut out,
                "vllm_router_retries_total",
                &[("backend", backend)],
                *n as f64,
            );
        }

        family(
            &mut out,
            "vllm_router_queue_length",
            "gauge",
            "Requests waiting for a free slot.",
        );
        sample(
            &mut out,
            "vllm_router_queue_length",
            &[],
            table.queue_len as f64,
        );
        family(
            &mut out,
            "vllm_router_queue_capacity",
            "gauge",
            "max_queue_size.",
        );
        sample(
            &mut out,
            "vllm_router_queue_capacity",
            &[],
            max_queue_size as f64,
        );

        type Gauge = fn(&crate::backend::registry::BackendView) -> Option<f64>;
        let gauges: [(&str, &str, Gauge); 8] = [
            (
                "vllm_router_backend_in_flight",
                "Requests this router has in flight on the backend.",
                |b| Some(f64::from(b.in_flight)),
            ),
            (
                "vllm_router_backend_capacity",
                "max_concurrent_requests of the backend.",
                |b| Some(f64::from(b.max_concurrent)),
            ),
            (
                "vllm_router_backend_load",
                "Load admission counts for the backend (own or backend-reported).",
                |b| Some(f64::from(b.load)),
            ),
            (
                "vllm_router_backend_healthy",
                "1 when the backend takes traffic, else 0.",
                |b| Some(if b.healthy { 1.0 } else { 0.0 }),
            ),
            (
                "vllm_router_backend_reported_running",
                "vllm:num_requests_running the backend reported.",
                |b| b.reported.as_ref().map(|r| r.running),
            ),
            (
                "vllm_router_backend_reported_waiting",
                "vllm:num_requests_waiting the backend reported.",
                |b| b.reported.as_ref().map(|r| r.waiting),
            ),
            (
                "vllm_router_backend_kv_cache_usage_ratio",
                "KV-cache use the backend reported, 0 to 1.",
                |b| b.reported.as_ref().and_then(|r| r.kv_cache_usage),
            ),
            (
                "vllm_router_backend_prefix_blocks",
                "Prompt blocks the router's prefix index holds for the backend.",
                |b| Some(b.prefix_blocks as f64),
            ),
        ];
        for (name, help, value) in gauges {
            family(&mut out, name, "gauge", help);
            for b in &table.backends {
                if let Some(v) = value(b) {
                    sample(&mut out, name, &[("backend", &b.url)], v);
                }
            }
        }

        family(
            &mut out,
            "vllm_router_routing_decisions_total",
            "counter",
            "Requests cache-aware routing admitted, by backend and reason (prefix, session, load).",
        );
        for b in &table.backends {
            for (reason, n) in Reason::ALL.iter().zip(b.routed) {
                let labels = [("backend", b.url.as_str()), ("reason", reason.as_str())];
                sample(
                    &mut out,
                    "vllm_router_routing_decisions_total",
                    &labels,
                    n as f64,
                );
            }
        }

        family(
            &mut out,
            "vllm_router_health_checks_total",
            "counter",
            "Active health checks, by backend and result.",
        );
        for ((backend, result), n) in &r.health_checks {
            let labels = [("backend", backend.as_str()), ("result", result)];
            sample(
                &mut out,
                "vllm_router_health_checks_total",
                &labels,
                *n as f64,
            );
        }
        histograms(
            &mut out,
            "vllm_router_health_check_duration_seconds",
            "Time active health checks took, by backend.",
            &r.health_check_duration,
        );
        family(
            &mut out,
            "vllm_router_config_reloads_total",
            "counter",
            "Config reloads, by result.",
        );
        for result in ["success", "failure"] {
            let n = r.reloads.get(result).copied().unwrap_or(0);
            sample(
                &mut out,
                "vllm_router_config_reloads_total",
                &[("result", result)],
                n as f64,
            );
        }
        family(
            &mut out,
            "vllm_router_client_connections",
            "gauge",
            "Client connections open.",
        );
        sample(
            &mut out,
            "vllm_router_client_connections",
            &[],
            connections as f64,
        );
        family(
            &mut out,
            "vllm_router_client_connections_closed_total",
            "counter",
            "Client connections the router closed itself, by reason.",
        );
        for reason in CONNECTION_CLOSE_REASONS {
            let n = r.connections_closed.get(reason).copied().unwrap_or(0);
            sample(
                &mut out,
                "vllm_router_client_connections_closed_total",
                &[("reason", reason)],
                n as f64,
            );
        }
        self.generation.render(&mut out);
        out
    }
}

/// A request's model as a label value: only models some backend lists, so a client
/// cannot grow the label set.
fn model_label(access: &Access, known_model: bool) -> String {
    match &access.model {
        Some(m) if known_model => m.clone(),
        Some(_) => "other".to_owned(),
        None => "none".to_owned(),
    }
}

fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "other",
    }
}

pub(crate) fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

pub(crate) fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: f64) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{k}=\"");
            escape_label(out, v);
            out.push('"');
        }
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

/// Label values escape backslash, double quote and line feed.
fn escape_label(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn histograms(out: &mut String, name: &str, help: &str, by_backend: &BTreeMap<String, Timings>) {
    family(out, name, "histogram", help);
    for (backend, h) in by_backend {
        histogram(out, name, &[("backend", backend)], h);
    }
}

fn histogram(out: &mut String, name: &str, labels: &[(&str, &str)], h: &Timings) {
    h.0.write(out, name, labels);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut h = Timings::default();
        for ms in [3, 30, 3000] {
            h.observe(Duration::from_millis(ms));
        }
        let mut out = String::new();
        histogram(&mut out, "x_seconds", &[("backend", "b\"1")], &h);
        assert!(
            out.contains("x_seconds_bucket{backend=\"b\\\"1\",le=\"0.005\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("x_seconds_bucket{backend=\"b\\\"1\",le=\"0.05\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("x_seconds_bucket{backend=\"b\\\"1\",le=\"+Inf\"} 3\n"),
            "{out}"
        );
        assert!(
            out.contains("x_seconds_count{backend=\"b\\\"1\"} 3\n"),
            "{out}"
        );
    }

    #[test]
    fn status_classes() {
        assert_eq!(
            [200, 404, 503, 101, 999].map(status_class),
            ["2xx", "4xx", "5xx", "1xx", "other"]
        );
    }
}
