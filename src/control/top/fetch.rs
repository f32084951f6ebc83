//! One reading of a running router for `top`: `GET /health` (the backends, always
//! open) and `GET /metrics` (with the API key, when status endpoints are protected),
//! over plain HTTP with a short deadline so a hung router never freezes the screen.

use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::control::top::exposition::{self, Sample};
use crate::request::auth::Secret;

/// How long one request of a reading may take: under the refresh period.
const DEADLINE: Duration = Duration::from_millis(800);

/// What `/health` says of the router and each backend.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Health {
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub uptime_seconds: u64,
    #[serde(default)]
    pub servers: Vec<Server>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Server {
    pub url: String,
    pub healthy: bool,
    pub reason: Option<String>,
    #[serde(default)]
    pub in_flight: u32,
    #[serde(default, rename = "max_concurrent_requests")]
    pub capacity: u32,
    #[serde(rename = "backend_running")]
    pub running: Option<f64>,
    #[serde(rename = "backend_waiting")]
    pub waiting: Option<f64>,
    #[serde(rename = "backend_kv_cache_usage")]
    pub kv_cache: Option<f64>,
}

/// One reading, taken at `at`.
#[derive(Debug, Clone)]
pub struct Reading {
    pub at: Instant,
    pub health: Health,
    pub metrics: Vec<Sample>,
}

/// Where readings come from.
pub struct Source {
    agent: ureq::Agent,
    /// The router's URL, without a trailing slash.
    pub base: String,
    key: Option<Secret>,
}

impl Source {
    pub fn new(base: &str, key: Option<Secret>) -> Source {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_global(Some(DEADLINE))
            .build()
            .new_agent();
        Source {
            agent,
            base: base.trim_end_matches('/').to_owned(),
            key,
        }
    }

    /// A reading, or what stopped it, said for the operator.
    pub fn read(&self) -> Result<Reading, String> {
        let health = self.get("/health")?;
        let health: Health = serde_json::from_str(&health)
            .map_err(|e| format!("/health is not the router's JSON: {e}"))?;
        let metrics = exposition::parse(&self.get("/metrics")?);
        Ok(Reading {
            at: Instant::now(),
            health,
            metrics,
        })
    }

    fn get(&self, path: &str) -> Result<String, String> {
        let url = format!("{}{path}", self.base);
        let mut request = self.agent.get(&url);
        if let Some(key) = &self.key {
            request = request.header("Authorization", format!("Bearer {}", key.expose()));
        }
        // The URL is on screen already: errors name the path.
        let response = request.call().map_err(|e| format!("GET {path}: {e}"))?;
        let status = response.status().as_u16();
        match status {
            // /health answers 503 with its document when no backend is healthy.
            200 | 503 => response
                .into_body()
                .read_to_string()
                .map_err(|e| format!("GET {path}: {e}")),
            401 => Err(format!(
                "GET {path}: 401, the router wants an API key: pass --api-key or set API_KEY"
            )),
            other => Err(format!("GET {path}: the router answered {other}")),
        }
    }
}
