//! The request-level metrics of generations, by model and backend: time to first
//! token, the gaps between tokens, time per output token, end-to-end latency, token
//! counts and finish reasons, from what `request::generation` saw in each reply.
//!
//! Under a mutex of their own, apart from the router's other counters
//! (`control::metrics`), and written once per request, when it ends. The buckets are
//! vLLM's own for the same quantities (with finer steps under 10 ms between tokens),
//! so the router's figures sit beside a backend's on one dashboard.

use std::collections::BTreeMap;
use std::time::Duration;

use parking_lot::Mutex;

use crate::control::histogram::Histogram;
use crate::control::metrics::{family, sample};
use crate::request::generation::Summary;

/// Time to first token: from a few milliseconds (a cached prefix) to minutes (a long
/// prompt behind a queue).
pub static TTFT_BUCKETS: [f64; 22] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
/// Between tokens, and per output token: a few milliseconds on a fast GPU, seconds
/// on a saturated one.
pub static TOKEN_GAP_BUCKETS: [f64; 22] = [
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
];
/// A whole request: from a tokenize call to a generation of many minutes.
pub static E2E_BUCKETS: [f64; 21] = [
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

/// (model, backend)
type Key = (String, String);

#[derive(Default)]
pub struct GenerationMetrics {
    registry: Mutex<Registry>,
}

#[derive(Default)]
struct Registry {
    ttft: BTreeMap<Key, Histogram>,
    itl: BTreeMap<Key, Histogram>,
    tpot: BTreeMap<Key, Histogram>,
    e2e: BTreeMap<Key, Histogram>,
    /// (model, backend, source)
    prompt_tokens: BTreeMap<(String, String, &'static str), u64>,
    completion_tokens: BTreeMap<(String, String, &'static str), u64>,
    /// (model, backend, finish reason)
    finish_reasons: BTreeMap<(String, String, &'static str), u64>,
}

impl GenerationMetrics {
    /// Counts one request whose reply a backend sent: `model` is already a label value
    /// (a known model, `other` or `none`), `e2e` its whole time, and `s` what its reply
    /// said.
    pub fn observe(&self, model: &str, backend: &str, e2e: Duration, s: &Summary) {
        let key = (model.to_owned(), backend.to_owned());
        let mut r = self.registry.lock();
        r.e2e
            .entry(key.clone())
            .or_insert_with(|| Histogram::new(&E2E_BUCKETS))
            .observe(e2e);
        if let Some(ttft) = s.ttft() {
            r.ttft
                .entry(key.clone())
                .or_insert_with(|| Histogram::new(&TTFT_BUCKETS))
                .observe(ttft);
        }
        if s.gaps.count() > 0 {
            r.itl
                .entry(key.clone())
                .or_insert_with(|| Histogram::new(&TOKEN_GAP_BUCKETS))
                .merge(&s.gaps);
        }
        if let Some(tpot) = s.time_per_output_token() {
            r.tpot
                .entry(key.clone())
                .or_insert_with(|| Histogram::new(&TOKEN_GAP_BUCKETS))
                .observe(tpot);
        }
        if let Some(usage) = s.usage {
            *r.prompt_tokens
                .entry((key.0.clone(), key.1.clone(), "usage"))
                .or_default() += usage.prompt_tokens;
        }
        if let Some((n, source)) = s.completion_tokens() {
            *r.completion_tokens
                .entry((key.0.clone(), key.1.clone(), source))
                .or_default() += n;
        }
        for reason in &s.finish_reasons {
            *r.finish_reasons
                .entry((key.0.clone(), key.1.clone(), reason))
                .or_default() += 1;
        }
    }

    /// Appends these families to an exposition.
    pub fn render(&self, out: &mut String) {
        let r = self.registry.lock();
        let histograms = [
            (
                "vllm_router_time_to_first_token_seconds",
                "Time from a request's arrival to the first SSE event carrying generated content (streams), by model and backend.",
                &r.ttft,
            ),
            (
                "vllm_router_inter_token_latency_seconds",
                "Time between consecutive SSE events carrying generated content, by model and backend.",
                &r.itl,
            ),
            (
                "vllm_router_time_per_output_token_seconds",
                "(last - first content event) / (completion tokens - 1), one per stream of two tokens or more, by model and backend.",
                &r.tpot,
            ),
            (
                "vllm_router_e2e_request_latency_seconds",
                "Time from a request's arrival to the end of its reply, for requests a backend answered, by model and backend.",
                &r.e2e,
            ),
        ];
        for (name, help, by_key) in histograms {
            family(out, name, "histogram", help);
            for ((model, backend), h) in by_key {
                h.write(out, name, &[("model", model), ("backend", backend)]);
            }
        }
        let counters = [
            (
                "vllm_router_prompt_tokens_total",
                "Prompt tokens of answered requests, from the reply's usage, by model and backend.",
                &r.prompt_tokens,
            ),
            (
                "vllm_router_completion_tokens_total",
                "Completion tokens of answered requests, by model, backend and source: usage (the reply's), or estimated (content events counted in a stream without usage).",
                &r.completion_tokens,
            ),
        ];
        for (name, help, by_key) in counters {
            family(out, name, "counter", help);
            for ((model, backend, source), n) in by_key {
                let labels = [
                    ("model", model.as_str()),
                    ("backend", backend),
                    ("source", source),
                ];
                sample(out, name, &labels, *n as f64);
            }
        }
        let name = "vllm_router_requests_by_finish_reason_total";
        family(
            out,
            name,
            "counter",
            "Choices of answered requests by the finish reason their reply gave, by model and backend.",
        );
        for ((model, backend, reason), n) in &r.finish_reasons {
            let labels = [
                ("model", model.as_str()),
                ("backend", backend),
                ("finish_reason", reason),
            ];
            sample(out, name, &labels, *n as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_written_cumulative_with_the_bound_as_le() {
        let mut h = Histogram::new(&TTFT_BUCKETS);
        for ms in [300, 300, 3000, 9_000_000] {
            h.observe(Duration::from_millis(ms));
        }
        h.observe(Duration::from_millis(250)); // on a bound: counted in it
        let mut out = String::new();
        h.write(&mut out, "x_seconds", &[("model", "m")]);
        for line in [
            "x_seconds_bucket{model=\"m\",le=\"0.25\"} 1\n",
            "x_seconds_bucket{model=\"m\",le=\"0.5\"} 3\n",
            "x_seconds_bucket{model=\"m\",le=\"5\"} 4\n",
            "x_seconds_bucket{model=\"m\",le=\"2560\"} 4\n",
            "x_seconds_bucket{model=\"m\",le=\"+Inf\"} 5\n",
            "x_seconds_count{model=\"m\"} 5\n",
        ] {
            assert!(out.contains(line), "{line} in\n{out}");
        }
    }

    #[test]
    fn bounds_rise() {
        for bounds in [&TTFT_BUCKETS[..], &TOKEN_GAP_BUCKETS, &E2E_BUCKETS] {
            assert!(bounds.windows(2).all(|w| w[0] < w[1]), "{bounds:?}");
        }
    }
}
