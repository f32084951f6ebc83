//! Every `[config]` key in one place: its type (a field of `Settings`), its default
//! (`impl Default for Settings`, with the defaults of what the command line decides beside
//! it), its rule (the `KEYS` table) and how `check-config` shows it (`Config::summary`).

use std::path::PathBuf;
use std::time::Duration;

use log::LevelFilter;

use super::checks::{Val, POSITIVE, ZERO_OK};
use super::error::Bad;
use super::Config;
use crate::request::auth::Secret;

/// `routing`: how a backend is chosen among the healthy ones with a free slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routing {
    /// The least loaded (load over capacity), ties in turn.
    LeastLoaded,
    /// By what each backend holds of the prompt, weighed against load, and by session
    /// (`request::pick::cache_aware`).
    CacheAware,
}

impl Routing {
    const ALL: [Routing; 2] = [Routing::LeastLoaded, Routing::CacheAware];
    const NAMES: &'static [&'static str] = &["least_loaded", "cache_aware"];

    pub fn name(self) -> &'static str {
        Self::NAMES[Self::ALL.iter().position(|r| *r == self).unwrap_or(0)]
    }
}

/// The `[config]` table with defaults filled in. Durations come from seconds in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub health_check_interval: Duration,
    pub health_check_timeout: Duration,
    pub health_check_min_success_rate: f64,
    pub health_check_max_response_time: Duration,
    pub health_check_consecutive_failures: u32,
    pub health_check_recovery_successes: u32,
    pub config_reload_interval: Duration,
    pub enable_active_health_check: bool,
    pub failure_threshold: u32,
    pub auto_recovery_threshold: Duration,
    pub request_timeout: Duration,
    pub max_retries: u32,
    pub retry_delay: Duration,
    /// Zero means a request that finds every server full is refused at once.
    pub queue_timeout: Duration,
    /// Zero means no queue.
    pub max_queue_size: usize,
    /// Zero means pick automatically.
    pub worker_threads: usize,
    pub max_body_bytes: u64,
    pub shutdown_timeout: Duration,
    /// Client connections open at once; more are closed as soon as they are accepted.
    pub max_client_connections: usize,
    /// Client connections open at once from one address; zero means no limit (behind
    /// a load balancer every client has its address).
    pub max_connections_per_ip: usize,
    /// The largest request head (request line and fields) the router reads.
    pub max_header_bytes: usize,
    /// All request bodies held in memory at once.
    pub max_buffered_body_bytes: u64,
    /// How long a connection may go without sending a whole request head: from its
    /// start, or from the end of its previous reply (an idle keep-alive connection).
    /// Above 60 s by default, as nginx's `keepalive_timeout`: a load balancer in front
    /// reuses idle connections for up to its own idle timeout (60 s on AWS), and must
    /// not find them closed under it.
    pub client_idle_timeout: Duration,
    /// How long a request body may take to arrive, from the end of its head.
    pub client_body_timeout: Duration,
    /// How long one write to a client may block: a client that stopped reading.
    pub client_write_timeout: Duration,
    /// How often each backend's `/metrics` is read for its own load; zero turns the
    /// backend-reported load off.
    pub backend_metrics_interval: Duration,
    /// How a backend is chosen among those with room.
    pub routing: Routing,
    /// The request header that names a session (`cache_aware` keeps it on its backend).
    pub session_header: String,
    /// About how many tokens of prompts the router remembers per backend (its prefix
    /// index, `backend::affinity`).
    pub prefix_index_tokens: u64,
    /// How long a request for a model no backend lists waits for the backends' model
    /// lists to be read again (`backend::refresh`) before it is refused; zero refuses
    /// at once.
    pub model_refresh_wait: Duration,
    /// Response ids remembered with the backend that made them (`request::stored`);
    /// zero remembers none (every stored-response request asks the backends in turn).
    pub stored_responses_max: usize,
    /// How long a response id is remembered.
    pub stored_responses_ttl: Duration,
    /// A WebSocket with no frame either way for this long is closed (1001).
    pub websocket_idle_timeout: Duration,
    /// A WebSocket open this long is closed (1001), however busy.
    pub websocket_max_lifetime: Duration,
    /// Client API keys written in the file.
    pub api_keys: Vec<Secret>,
    /// A file of client API keys, one per line, as written (relative to the config file).
    pub api_keys_file: Option<PathBuf>,
    /// The keys read from `api_keys_file` when the config was loaded.
    pub file_api_keys: Vec<Secret>,
    /// Whether `/metrics` and `/load-stats` need a key too.
    pub protect_status_endpoints: bool,
    /// HTTPS on the listening side: a PEM certificate chain and its private key
    /// (resolved against the config file's directory).
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// PEM certificates to trust for https:// backends, instead of the public roots.
    pub tls_ca_file: Option<PathBuf>,
    /// `None` leaves the choice to the caller (command line or its default).
    pub host: Option<String>,
    pub port: Option<u16>,
    pub log_level: Option<LevelFilter>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            health_check_interval: Duration::from_secs(10),
            health_check_timeout: Duration::from_secs(5),
            health_check_min_success_rate: 0.8,
            health_check_max_response_time: Duration::from_secs(3),
            health_check_consecutive_failures: 3,
            health_check_recovery_successes: 2,
            config_reload_interval: Duration::from_secs(30),
            enable_active_health_check: true,
            failure_threshold: 3,
            auto_recovery_threshold: Duration::from_secs(60),
            request_timeout: Duration::from_secs(120),
            max_retries: 3,
            retry_delay: Duration::from_millis(100),
            queue_timeout: Duration::from_secs(30),
            max_queue_size: 256,
            worker_threads: 0,
            max_body_bytes: 32 * 1024 * 1024,
            shutdown_timeout: Duration::from_secs(30),
            max_client_connections: 4096,
            max_connections_per_ip: 0,
            max_header_bytes: 64 * 1024,
            max_buffered_body_bytes: 128 * 1024 * 1024,
            client_idle_timeout: Duration::from_secs(75),
            client_body_timeout: Duration::from_secs(60),
            client_write_timeout: Duration::from_secs(60),
            backend_metrics_interval: Duration::from_secs(2),
            routing: Routing::CacheAware,
            session_header: "x-session-id".to_owned(),
            prefix_index_tokens: 1 << 20,
            model_refresh_wait: Duration::from_secs(2),
            stored_responses_max: 100_000,
            stored_responses_ttl: Duration::from_secs(24 * 3600),
            websocket_idle_timeout: Duration::from_secs(300),
            websocket_max_lifetime: Duration::from_secs(3600),
            api_keys: Vec::new(),
            api_keys_file: None,
            file_api_keys: Vec::new(),
            protect_status_endpoints: false,
            tls_cert_file: None,
            tls_key_file: None,
            tls_ca_file: None,
            // Unset, so the command line can tell; see `Settings::DEFAULT_HOST` and below.
            host: None,
            port: None,
            log_level: None,
        }
    }
}

/// What the router uses for what the command line, the environment and the file can all
/// leave unset, when none of them sets it. `Settings` keeps `None` for those fields, so
/// that the precedence (flag > env > file > default) can tell "not in the file" from a
/// value, and `check-config` shows `(not set)`.
impl Settings {
    /// Where the config file is (`--config`, `CONFIG_PATH`).
    pub const DEFAULT_CONFIG_PATH: &'static str = "./servers.toml";
    /// `host`, `--host`, `HOST`.
    pub const DEFAULT_HOST: &'static str = "0.0.0.0";
    /// `port`, `--port`, `PORT`; also the port `healthcheck` probes.
    pub const DEFAULT_PORT: u16 = 8888;
    /// `log_level`, `--log-level`, `LOG_LEVEL`.
    pub const DEFAULT_LOG_LEVEL: LevelFilter = LevelFilter::Info;
    /// Where log files go (`--log-dir`, `LOG_DIR`).
    pub const DEFAULT_LOG_DIR: &'static str = "./logs";
}

/// The names of the keys `[config]` accepts, in documentation order.
pub fn known_keys() -> impl Iterator<Item = &'static str> {
    KEYS.iter().map(|key| key.name)
}

impl Settings {
    /// The `[config]` keys whose effective value differs from `other`'s, by name.
    pub fn changed_keys(&self, other: &Settings) -> Vec<&'static str> {
        KEYS.iter()
            .filter(|key| (key.show)(self) != (key.show)(other))
            .map(|key| key.name)
            .collect()
    }
}

impl Config {
    /// A one-screen description for `check-config`: servers, capacity and every setting.
    pub fn summary(&self) -> String {
        let total: u64 = self
            .servers
            .iter()
            .map(|s| u64::from(s.max_concurrent_requests))
            .sum();
        let mut lines = vec![
            format!("config file: {}", self.path.display()),
            format!(
                "{} server(s), total capacity {total} concurrent requests:",
                self.servers.len()
            ),
        ];
        for s in &self.servers {
            lines.push(format!(
                "  {}  max_concurrent_requests = {}",
                s.url, s.max_concurrent_requests
            ));
        }
        lines.push("[config]".to_string());
        let defaults = Settings::default();
        let width = KEYS.iter().map(|key| key.name.len()).max().unwrap_or(0);
        for key in KEYS {
            let value = (key.show)(&self.settings);
            let mark = if value == (key.show)(&defaults) {
                "  (default)"
            } else {
                ""
            };
            lines.push(format!("  {:width$} = {value}{mark}", key.name));
        }
        lines.join("\n")
    }
}

const UNSET: &str = "(not set)";

/// One `[config]` key: how it is validated into `Settings` and how `summary` shows it.
pub(super) struct Key {
    pub(super) name: &'static str,
    pub(super) set: fn(&mut Settings, &Val) -> Result<(), Bad>,
    show: fn(&Settings) -> String,
}

#[rustfmt::skip]
pub(super) const KEYS: &[Key] = &[
    Key { name: "health_check_interval",
        set: |s, v| v.secs(POSITIVE).map(|d| s.health_check_interval = d),
        show: |s| secs(s.health_check_interval) },
    Key { name: "health_check_timeout",
        set: |s, v| v.secs(POSITIVE).map(|d| s.health_check_timeout = d),
        show: |s| secs(s.health_check_timeout) },
    Key { name: "health_check_min_success_rate",
        set: |s, v| v.rate().map(|r| s.health_check_min_success_rate = r),
        show: |s| s.health_check_min_success_rate.to_string() },
    Key { name: "health_check_max_response_time",
        set: |s, v| v.secs(POSITIVE).map(|d| s.health_check_max_response_time = d),
        show: |s| secs(s.health_check_max_response_time) },
    Key { name: "health_check_consecutive_failures",
        set: |s, v| v.int(1, u32::MAX.into()).map(|n| s.health_check_consecutive_failures = n as u32),
        show: |s| s.health_check_consecutive_failures.to_string() },
    Key { name: "health_check_recovery_successes",
        set: |s, v| v.int(1, u32::MAX.into()).map(|n| s.health_check_recovery_successes = n as u32),
        show: |s| s.health_check_recovery_successes.to_string() },
    Key { name: "config_reload_interval",
        set: |s, v| v.secs(POSITIVE).map(|d| s.config_reload_interval = d),
        show: |s| secs(s.config_reload_interval) },
    Key { name: "enable_active_health_check",
        set: |s, v| v.boolean().map(|b| s.enable_active_health_check = b),
        show: |s| s.enable_active_health_check.to_string() },
    Key { name: "failure_threshold",
        set: |s, v| v.int(1, u32::MAX.into()).map(|n| s.failure_threshold = n as u32),
        show: |s| s.failure_threshold.to_string() },
    Key { name: "auto_recovery_threshold",
        set: |s, v| v.secs(POSITIVE).map(|d| s.auto_recovery_threshold = d),
        show: |s| secs(s.auto_recovery_threshold) },
    Key { name: "request_timeout",
        set: |s, v| v.secs(POSITIVE).map(|d| s.request_timeout = d),
        show: |s| secs(s.request_timeout) },
    Key { name: "max_retries",
        set: |s, v| v.int(0, u32::MAX.into()).map(|n| s.max_retries = n as u32),
        show: |s| s.max_retries.to_string() },
    Key { name: "retry_delay",
        set: |s, v| v.secs(ZERO_OK).map(|d| s.retry_delay = d),
        show: |s| secs(s.retry_delay) },
    Key { name: "queue_timeout",
        set: |s, v| v.secs(ZERO_OK).map(|d| s.queue_timeout = d),
        show: |s| secs(s.queue_timeout) },
    Key { name: "max_queue_size",
        set: |s, v| v.int(0, usize::MAX as u64).map(|n| s.max_queue_size = n as usize),
        show: |s| s.max_queue_size.to_string() },
    Key { name: "worker_threads",
        set: |s, v| v.int(0, usize::MAX as u64).map(|n| s.worker_threads = n as usize),
        show: |s| match s.worker_threads { 0 => "0 (automatic)".into(), n => n.to_string() } },
    Key { name: "max_body_bytes",
        set: |s, v| v.int(1, u64::MAX).map(|n| s.max_body_bytes = n),
        show: |s| s.max_body_bytes.to_string() },
    Key { name: "shutdown_timeout",
        set: |s, v| v.secs(POSITIVE).map(|d| s.shutdown_timeout = d),
        show: |s| secs(s.shutdown_timeout) },
    Key { name: "max_client_connections",
        set: |s, v| v.int(1, usize::MAX as u64).map(|n| s.max_client_connections = n as usize),
        show: |s| s.max_client_connections.to_string() },
    Key { name: "max_connections_per_ip",
        set: |s, v| v.int(0, usize::MAX as u64).map(|n| s.max_connections_per_ip = n as usize),
        show: |s| match s.max_connections_per_ip { 0 => "0 (no limit)".into(), n => n.to_string() } },
    Key { name: "max_header_bytes",
        set: |s, v| v.int(1024, 1024 * 1024).map(|n| s.max_header_bytes = n as usize),
        show: |s| s.max_header_bytes.to_string() },
    Key { name: "max_buffered_body_bytes",
        set: |s, v| v.int(1, u64::MAX).map(|n| s.max_buffered_body_bytes = n),
        show: |s| s.max_buffered_body_bytes.to_string() },
    Key { name: "client_idle_timeout",
        set: |s, v| v.secs(POSITIVE).map(|d| s.client_idle_timeout = d),
        show: |s| secs(s.client_idle_timeout) },
    Key { name: "client_body_timeout",
        set: |s, v| v.secs(POSITIVE).map(|d| s.client_body_timeout = d),
        show: |s| secs(s.client_body_timeout) },
    Key { name: "client_write_timeout",
        set: |s, v| v.secs(POSITIVE).map(|d| s.client_write_timeout = d),
        show: |s| secs(s.client_write_timeout) },
    Key { name: "backend_metrics_interval",
        set: |s, v| v.secs(ZERO_OK).map(|d| s.backend_metrics_interval = d),
        show: |s| secs(s.backend_metrics_interval) },
    Key { name: "routing",
        set: |s, v| v.one_of(Routing::NAMES).map(|i| s.routing = Routing::ALL[i]),
        show: |s| s.routing.name().to_owned() },
    Key { name: "session_header",
        set: |s, v| v.header_name().map(|h| s.session_header = h),
        show: |s| s.session_header.clone() },
    Key { name: "prefix_index_tokens",
        set: |s, v| v.int(1024, 1 << 36).map(|n| s.prefix_index_tokens = n),
        show: |s| s.prefix_index_tokens.to_string() },
    Key { name: "model_refresh_wait",
        set: |s, v| v.secs(ZERO_OK).map(|d| s.model_refresh_wait = d),
        show: |s| secs(s.model_refresh_wait) },
    Key { name: "stored_responses_max",
        set: |s, v| v.int(0, 100_000_000).map(|n| s.stored_responses_max = n as usize),
        show: |s| s.stored_responses_max.to_string() },
    Key { name: "stored_responses_ttl",
        set: |s, v| v.secs(POSITIVE).map(|d| s.stored_responses_ttl = d),
        show: |s| secs(s.stored_responses_ttl) },
    Key { name: "websocket_idle_timeout",
        set: |s, v| v.secs(POSITIVE).map(|d| s.websocket_idle_timeout = d),
        show: |s| secs(s.websocket_idle_timeout) },
    Key { name: "websocket_max_lifetime",
        set: |s, v| v.secs(POSITIVE).map(|d| s.websocket_max_lifetime = d),
        show: |s| secs(s.websocket_max_lifetime) },
    Key { name: "api_keys",
        set: |s, v| v.secret_list().map(|keys| s.api_keys = keys),
        show: |s| format!("{} key(s)", s.api_keys.len()) },
    Key { name: "api_keys_file",
        set: |s, v| v.path().map(|p| s.api_keys_file = Some(p)),
        show: |s| s.api_keys_file.as_ref().map_or_else(|| UNSET.into(), |p| format!("{} ({} key(s))", p.display(), s.file_api_keys.len())) },
    Key { name: "protect_status_endpoints",
        set: |s, v| v.boolean().map(|b| s.protect_status_endpoints = b),
        show: |s| s.protect_status_endpoints.to_string() },
    Key { name: "tls_cert_file",
        set: |s, v| v.path().map(|p| s.tls_cert_file = Some(p)),
        show: |s| s.tls_cert_file.as_ref().map_or_else(|| UNSET.into(), |p| p.display().to_string()) },
    Key { name: "tls_key_file",
        set: |s, v| v.path().map(|p| s.tls_key_file = Some(p)),
        show: |s| s.tls_key_file.as_ref().map_or_else(|| UNSET.into(), |p| p.display().to_string()) },
    Key { name: "tls_ca_file",
        set: |s, v| v.path().map(|p| s.tls_ca_file = Some(p)),
        show: |s| s.tls_ca_file.as_ref().map_or_else(|| UNSET.into(), |p| p.display().to_string()) },
    Key { name: "host",
        set: |s, v| v.host().map(|h| s.host = Some(h)),
        show: |s| s.host.clone().unwrap_or_else(|| UNSET.into()) },
    Key { name: "port",
        set: |s, v| v.int(1, u16::MAX.into()).map(|n| s.port = Some(n as u16)),
        show: |s| s.port.map_or_else(|| UNSET.into(), |p| p.to_string()) },
    Key { name: "log_level",
        set: |s, v| v.log_level().map(|l| s.log_level = Some(l)),
        show: |s| s.log_level.map_or_else(|| UNSET.into(), |l| l.as_str().to_lowercase()) },
];

fn secs(d: Duration) -> String {
    format!("{}s", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    const PRODUCTION: &str = include_str!("../../../tests/fixtures/guide-production.toml");

    #[test]
    fn summary_marks_defaults() {
        let config =
            crate::control::config::parse(PRODUCTION, Path::new("servers.toml")).expect("valid");
        let summary = config.summary();
        let expected = [
            "config file: servers.toml",
            "5 server(s), total capacity 26 concurrent requests:",
            "  http://gpu-server-4:8081  max_concurrent_requests = 4",
            "  request_timeout                   = 180s",
            "  retry_delay                       = 0.5s",
            "  queue_timeout                     = 30s  (default)",
            "  host                              = (not set)  (default)",
        ];
        for line in expected {
            assert!(
                summary.lines().any(|l| l == line),
                "no {line:?} in\n{summary}"
            );
        }
        assert_eq!(summary.lines().count(), 2 + 5 + 1 + known_keys().count());
    }
}
