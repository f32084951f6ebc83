//! One round of a health probe against one backend, on its probe thread: `GET /health`
//! (up or not, and how fast), `GET /v1/models` (what it serves) and `GET /metrics`
//! (the load it reports, read from vLLM's gauges). What the answers mean for the
//! backend's health is the health thread's to decide (`backend::health`).

use std::time::{Duration, Instant, SystemTime};

use crate::backend::http::BackendAgent;
use crate::backend::registry::Reported;
use crate::request::auth::Secret;

/// One backend as a probe thread sees it.
pub(super) struct Target<'a> {
    pub(super) agent: &'a BackendAgent,
    pub(super) url: &'a str,
    pub(super) timeout: Duration,
    /// The backend's `api_key`, sent with every probe (vLLM guards `/v1/*` with it).
    pub(super) key: Option<Secret>,
}

impl Target<'_> {
    /// `GET /health`: good when it answers 2xx within the timeout.
    pub(super) fn check_health(&self) -> Result<Duration, String> {
        let started = Instant::now();
        let response = self.get("/health")?;
        let status = response.status().as_u16();
        if (200..300).contains(&status) {
            Ok(started.elapsed())
        } else {
            Err(format!("/health answered {status}"))
        }
    }

    /// `GET /v1/models`: the model objects of an OpenAI list, or `None`.
    pub(super) fn fetch_models(&self) -> Option<Vec<serde_json::Value>> {
        let doc: serde_json::Value = serde_json::from_str(&self.get_text("/v1/models")?).ok()?;
        let list = doc.get("data")?.as_array()?;
        Some(
            list.iter()
                .filter(|m| m.get("id").is_some_and(|id| id.is_string()))
                .cloned()
                .collect(),
        )
    }

    /// `GET /metrics`: the backend's own load, or `None` when it cannot be read.
    pub(super) fn scrape_load(&self) -> Option<Reported> {
        parse_vllm_metrics(&self.get_text("/metrics")?)
    }

    /// The body of a 200 answer to `GET path`.
    fn get_text(&self, path: &str) -> Option<String> {
        let mut response = self.get(path).ok()?;
        if response.status().as_u16() != 200 {
            return None;
        }
        response.body_mut().read_to_string().ok()
    }

    /// `GET path`, resent once on a fresh connection if a pooled one turns out closed
    /// (`BackendAgent::send`): a probe must not fail a healthy backend for that.
    fn get(&self, path: &str) -> Result<ureq::http::Response<ureq::Body>, String> {
        let mut request = ureq::http::Request::get(format!("{}{path}", self.url));
        if let Some(key) = &self.key {
            request = request.header("Authorization", format!("Bearer {}", key.expose()));
        }
        let request = request.body(()).map_err(|e| e.to_string())?;
        let timeout = Some(self.timeout);
        let configure = |builder: ureq::config::ConfigBuilder<_>| builder.timeout_global(timeout);
        self.agent
            .send(request, configure, || true)
            .map_err(|e| match e {
                ureq::Error::Timeout(_) => {
                    format!("no answer within {:.1}s", self.timeout.as_secs_f64())
                }
                other => other.to_string(),
            })
    }
}

/// Reads vLLM's load gauges from Prometheus text: running and waiting requests summed
/// over their label sets (one per model), and the KV-cache use under either name vLLM
/// has used. `None` unless at least the running count is there.
fn parse_vllm_metrics(text: &str) -> Option<Reported> {
    let (mut running, mut waiting, mut kv) = (None::<f64>, 0.0, None::<f64>);
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let after_labels = match line[name_end..].strip_prefix('{') {
            Some(rest) => rest.rsplit_once('}').map_or("", |(_, v)| v),
            None => &line[name_end..],
        };
        let Some(value) = after_labels
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        else {
            continue;
        };
        if !value.is_finite() {
            continue;
        }
        match &line[..name_end] {
            "vllm:num_requests_running" => *running.get_or_insert(0.0) += value,
            "vllm:num_requests_waiting" => waiting += value,
            "vllm:kv_cache_usage_perc" | "vllm:gpu_cache_usage_perc" => {
                kv = Some(kv.map_or(value, |k| k.max(value)))
            }
            _ => {}
        }
    }
    Some(Reported {
        running: running?,
        waiting,
        kv_cache_usage: kv,
        scraped_at: SystemTime::now(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vllm_metrics_are_summed_over_label_sets() {
        let text = "# HELP vllm:num_requests_running Number of requests running.\n\
            # TYPE vllm:num_requests_running gauge\n\
            vllm:num_requests_running{model_name=\"a\"} 3.0\n\
            vllm:num_requests_running{model_name=\"b\",engine=\"0\"} 2\n\
            vllm:num_requests_waiting{model_name=\"a\"} 4 1700000000000\n\
            vllm:gpu_cache_usage_perc{model_name=\"a\"} 0.25\n\
            vllm:kv_cache_usage_perc{model_name=\"b\"} 0.5\n\
            vllm:num_requests_running_total 99\n";
        let r = parse_vllm_metrics(text).expect("parsed");
        assert_eq!(
            (r.running, r.waiting, r.kv_cache_usage),
            (5.0, 4.0, Some(0.5))
        );
        assert_eq!(
            parse_vllm_metrics("up 1\n"),
            None,
            "no vLLM gauges: the router's own count decides"
        );
        assert_eq!(
            parse_vllm_metrics("vllm:num_requests_running{x=\"1\"} nope\n"),
            None
        );
    }
}
