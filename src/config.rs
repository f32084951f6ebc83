//! Loading and validating `servers.toml`, the router's one configuration file.
//!
//! The format is the one users of the original Python router already have: a `[servers]` table
//! holding `servers = [ { url, max_concurrent_requests }, ... ]`, and an optional `[config]`
//! table of tuning keys. The file is read through toml's spanned document tree (`DeTable`) rather
//! than serde derive, so that every problem becomes one `path:line:col: message` line pointing at
//! the offending key or value. Nothing unknown or out of range is accepted: a typo in a reloaded
//! file must keep the running config in place, not quietly change behaviour.
//!
//! Every default lives in `impl Default for Settings`; every `[config]` key (its name, its rule
//! and how `check-config` shows it) lives in the `KEYS` table.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use log::LevelFilter;

use crate::auth::Secret;
use toml::de::{DeInteger, DeString, DeTable, DeValue};
use toml::Spanned;

/// A loaded and validated configuration file.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from.
    pub path: PathBuf,
    /// Backends in file order; never empty, URLs normalised and unique.
    pub servers: Vec<ServerConfig>,
    pub settings: Settings,
}

/// One vLLM backend.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    /// `http(s)://host[:port][/prefix]` with lower-case scheme and host and no trailing `/`.
    pub url: String,
    /// Requests sent to this server at once (1..=100000).
    pub max_concurrent_requests: u32,
    /// The key of a vLLM started with `--api-key`: sent to this server instead of the
    /// client's.
    pub api_key: Option<Secret>,
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
            api_keys: Vec::new(),
            api_keys_file: None,
            file_api_keys: Vec::new(),
            protect_status_endpoints: false,
            tls_cert_file: None,
            tls_key_file: None,
            tls_ca_file: None,
            host: None,
            port: None,
            log_level: None,
        }
    }
}

/// Why a config file was rejected. `Display` gives the one-line `path:line:col: message`.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    pub path: PathBuf,
    /// 1-based line and column of the offending key or value, when there is one.
    pub location: Option<(usize, usize)>,
    pub message: String,
}

impl ConfigError {
    fn new(path: &Path, location: Option<(usize, usize)>, message: impl Into<String>) -> Self {
        // Callers print this as one log line, so nothing from the input may break it.
        let message = message.into().replace(['\n', '\r'], " ");
        ConfigError {
            path: path.to_path_buf(),
            location,
            message,
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.location {
            Some((line, col)) => {
                write!(f, "{}:{line}:{col}: {}", self.path.display(), self.message)
            }
            None => write!(f, "{}: {}", self.path.display(), self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Reads and validates the file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    from_bytes(&read(path)?, path)
}

/// Reads the config file's bytes, with an error that says how to fix a missing file.
pub fn read(path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| ConfigError::new(path, None, read_failure(&e)))
}

/// Validates a config file's bytes (UTF-8, then `parse`); `path` is only used in messages.
pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Config, ConfigError> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let valid = e.valid_up_to();
        let prefix = String::from_utf8_lossy(bytes.get(..valid).unwrap_or_default());
        let at = Some(position(&prefix, valid));
        ConfigError::new(path, at, "config file is not valid UTF-8; save it as UTF-8")
    })?;
    parse(text, path)
}

/// Validates config `text`; `path` is only used in messages.
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    let fail = |Bad(span, msg)| ConfigError::new(path, span.map(|s| position(text, s.start)), msg);
    let root = DeTable::parse(text).map_err(|e| fail(syntax_error(&e, text)))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let (servers, settings) = document(root.get_ref(), text, base).map_err(fail)?;
    Ok(Config {
        path: path.to_path_buf(),
        servers,
        settings,
    })
}

fn read_failure(e: &std::io::Error) -> String {
    let hint = match e.kind() {
        std::io::ErrorKind::NotFound => "; set --config or CONFIG_PATH to the servers.toml to use",
        std::io::ErrorKind::PermissionDenied => "; make it readable by the user running the router",
        std::io::ErrorKind::IsADirectory => "; point --config or CONFIG_PATH at a file",
        _ => "",
    };
    format!("cannot read config file: {e}{hint}")
}

/// Case-insensitive `error`, `warn` (or `warning`), `info`, `debug` or `trace`.
pub fn parse_log_level(s: &str) -> Option<LevelFilter> {
    match s.to_ascii_lowercase().as_str() {
        "error" => Some(LevelFilter::Error),
        // `warning` is what users of the Python router have in LOG_LEVEL.
        "warn" | "warning" => Some(LevelFilter::Warn),
        "info" => Some(LevelFilter::Info),
        "debug" => Some(LevelFilter::Debug),
        "trace" => Some(LevelFilter::Trace),
        _ => None,
    }
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

/// Longest accepted duration: anything longer is a mistake, and it keeps `Instant + d` from
/// overflowing in the code that uses these values.
const MAX_SECS: f64 = 365.0 * 24.0 * 3600.0;
const MAX_CAPACITY: u64 = 100_000;
const ZERO_OK: bool = true;
const POSITIVE: bool = false;
const NO_SERVERS: &str =
    "no servers configured: add at least one { url, max_concurrent_requests } entry to [servers] servers";
const UNSET: &str = "(not set)";

/// One `[config]` key: how it is validated into `Settings` and how `summary` shows it.
struct Key {
    name: &'static str,
    set: fn(&mut Settings, &Val) -> Result<(), Bad>,
    show: fn(&Settings) -> String,
}

#[rustfmt::skip]
const KEYS: &[Key] = &[
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

/// A problem found while walking the document (byte span, message), before the span becomes
/// line:col.
struct Bad(Option<Range<usize>>, String);

fn bad(span: Range<usize>, msg: impl Into<String>) -> Bad {
    Bad(Some(span), msg.into())
}

type Entry<'a, 'i> = (&'a Spanned<DeString<'i>>, &'a Spanned<DeValue<'i>>);

/// Table entries in file order (toml sorts them by name), so the first problem reported is
/// the first one in the file.
fn sorted<'a, 'i>(table: &'a DeTable<'i>) -> Vec<Entry<'a, 'i>> {
    let mut entries: Vec<_> = table.iter().collect();
    entries.sort_by_key(|(key, _)| key.span().start);
    entries
}

fn document(root: &DeTable, text: &str, base: &Path) -> Result<(Vec<ServerConfig>, Settings), Bad> {
    let mut servers = None;
    let mut settings = Settings::default();
    for (key, value) in sorted(root) {
        match key.get_ref().as_ref() {
            "servers" => servers = Some(servers_table(&Val::new("servers", value, text))?),
            "config" => {
                for (key, value) in sorted(Val::new("config", value, text).table("a table")?) {
                    let name = key.get_ref().as_ref();
                    let Some(known) = KEYS.iter().find(|k| k.name == name) else {
                        let otherwise = "remove it or fix the spelling";
                        return Err(unknown(key, "in [config]", known_keys(), otherwise));
                    };
                    let val = Val::new(known.name, value, text);
                    (known.set)(&mut settings, &val)?;
                    if let Some(file) = settings
                        .api_keys_file
                        .as_ref()
                        .filter(|_| name == "api_keys_file")
                    {
                        settings.file_api_keys = val.key_file(&base.join(file))?;
                    }
                }
            }
            _ => {
                let (known, otherwise) = (
                    ["servers", "config"],
                    "only [servers] and [config] are allowed",
                );
                return Err(unknown(key, "at the top level", known, otherwise));
            }
        }
    }
    let servers = servers.ok_or_else(|| Bad(None, NO_SERVERS.to_string()))?;
    check_tls(&mut settings, base)?;
    if settings.max_buffered_body_bytes < settings.max_body_bytes {
        let msg = format!(
            "max_buffered_body_bytes ({}) must be at least max_body_bytes ({}): a body of the largest allowed size must fit",
            settings.max_buffered_body_bytes, settings.max_body_bytes
        );
        return Err(Bad(None, msg));
    }
    Ok((servers, settings))
}

/// TLS files are read relative to the config file; certificate and key go together;
/// a build without the `tls` feature refuses them rather than serving plain HTTP.
fn check_tls(settings: &mut Settings, base: &Path) -> Result<(), Bad> {
    for file in [
        &mut settings.tls_cert_file,
        &mut settings.tls_key_file,
        &mut settings.tls_ca_file,
    ] {
        if let Some(path) = file.take() {
            *file = Some(base.join(path));
        }
    }
    if settings.tls_cert_file.is_some() != settings.tls_key_file.is_some() {
        let msg = "set both tls_cert_file and tls_key_file to serve HTTPS, or neither";
        return Err(Bad(None, msg.to_string()));
    }
    let uses_tls = settings.tls_cert_file.is_some() || settings.tls_ca_file.is_some();
    if uses_tls && !cfg!(feature = "tls") {
        let msg = "tls_cert_file, tls_key_file and tls_ca_file need a build with TLS: \
                   `cargo build --release --features tls` (or `make build FEATURES=tls`)";
        return Err(Bad(None, msg.to_string()));
    }
    Ok(())
}

fn servers_table(val: &Val) -> Result<Vec<ServerConfig>, Bad> {
    let mut servers = None;
    for (key, value) in sorted(val.table("a [servers] table holding servers = [ ... ]")?) {
        if key.get_ref() != "servers" {
            let otherwise = "[servers] holds only servers = [ ... ]";
            return Err(unknown(key, "in [servers]", ["servers"], otherwise));
        }
        let list = Val::new("servers", value, val.text);
        let what = "an array of { url, max_concurrent_requests } tables";
        let DeValue::Array(items) = list.value else {
            return list.wrong_type(what);
        };
        if items.is_empty() {
            return Err(bad(list.span, NO_SERVERS));
        }
        let mut first_seen: HashMap<String, usize> = HashMap::new();
        let mut entries = Vec::new();
        for item in items.iter() {
            let (server, url_span) = server_entry(&Val::new("each server", item, val.text))?;
            if let Some(&offset) = first_seen.get(&server.url) {
                let line = position(val.text, offset).0;
                let msg = format!("duplicate server `{}` (already listed on line {line}); remove one of the two entries", server.url);
                return Err(bad(url_span, msg));
            }
            first_seen.insert(server.url.clone(), url_span.start);
            entries.push(server);
        }
        servers = Some(entries);
    }
    servers.ok_or_else(|| bad(val.span.clone(), NO_SERVERS))
}

fn server_entry(val: &Val) -> Result<(ServerConfig, Range<usize>), Bad> {
    let table =
        val.table("a table like { url = \"http://host:8000\", max_concurrent_requests = 4 }")?;
    let (mut url, mut capacity, mut api_key) = (None, None, None);
    for (key, value) in sorted(table) {
        match key.get_ref().as_ref() {
            "url" => url = Some((Val::new("url", value, val.text).url()?, value.span())),
            "max_concurrent_requests" => {
                let n =
                    Val::new("max_concurrent_requests", value, val.text).int(1, MAX_CAPACITY)?;
                capacity = Some(n as u32);
            }
            "api_key" => api_key = Some(Val::new("api_key", value, val.text).secret()?),
            _ => {
                let known = ["url", "max_concurrent_requests", "api_key"];
                let otherwise = "a server takes only url, max_concurrent_requests and api_key";
                return Err(unknown(key, "in server entry", known, otherwise));
            }
        }
    }
    let missing = |key: &str, example: &str| {
        let msg = format!("server entry is missing `{key}`; add e.g. {key} = {example}");
        bad(val.span.clone(), msg)
    };
    let (url, url_span) = url.ok_or_else(|| missing("url", "\"http://host:8000\""))?;
    let max_concurrent_requests =
        capacity.ok_or_else(|| missing("max_concurrent_requests", "4"))?;
    Ok((
        ServerConfig {
            url,
            max_concurrent_requests,
            api_key,
        },
        url_span,
    ))
}

/// A value under validation, with what is needed to complain about it.
struct Val<'a> {
    name: &'static str,
    value: &'a DeValue<'a>,
    span: Range<usize>,
    text: &'a str,
}

impl<'a> Val<'a> {
    fn new(name: &'static str, value: &'a Spanned<DeValue<'a>>, text: &'a str) -> Self {
        let span = value.span();
        Val {
            name,
            value: value.get_ref(),
            span,
            text,
        }
    }

    fn wrong_type<T>(&self, what: &str) -> Result<T, Bad> {
        let found = match self.value {
            DeValue::String(s) => format!("string {}", quote(s)),
            DeValue::Array(_) => "an array".to_string(),
            DeValue::Table(_) => "a table".to_string(),
            other => format!("{} {}", other.type_str(), self.raw()),
        };
        let msg = format!("{} must be {what}, found {found}", self.name);
        Err(bad(self.span.clone(), msg))
    }

    fn out_of_range<T>(&self, rule: &str) -> Result<T, Bad> {
        let msg = format!("{} must be {rule}, found {}", self.name, self.raw());
        Err(bad(self.span.clone(), msg))
    }

    /// The value as written, so messages quote exactly what the user typed.
    fn raw(&self) -> &str {
        self.text.get(self.span.clone()).unwrap_or_default()
    }

    fn table(&self, what: &str) -> Result<&'a DeTable<'a>, Bad> {
        match self.value {
            DeValue::Table(table) => Ok(table),
            _ => self.wrong_type(what),
        }
    }

    fn number(&self, what: &str) -> Result<f64, Bad> {
        let n = match self.value {
            DeValue::Integer(i) => Some(integer(i) as f64),
            DeValue::Float(f) => f.as_str().parse().ok(),
            _ => None,
        };
        n.map_or_else(|| self.wrong_type(what), Ok)
    }

    fn secs(&self, zero_ok: bool) -> Result<Duration, Bad> {
        let n = self.number("a number of seconds")?;
        if n > MAX_SECS && n.is_finite() {
            return self.out_of_range(&format!("at most {MAX_SECS} seconds (a year)"));
        }
        match Duration::try_from_secs_f64(n) {
            Ok(d) if zero_ok || !d.is_zero() => Ok(d),
            _ if zero_ok => self.out_of_range("zero or more seconds"),
            _ => self.out_of_range("more than 0 seconds"),
        }
    }

    fn int(&self, min: u64, max: u64) -> Result<u64, Bad> {
        let DeValue::Integer(i) = self.value else {
            return self.wrong_type("a whole number");
        };
        match integer(i) {
            n if n < i128::from(min) => self.out_of_range(&format!("at least {min}")),
            n if n <= i128::from(max) => Ok(n as u64),
            _ => self.out_of_range(&format!("at most {max}")),
        }
    }

    fn rate(&self) -> Result<f64, Bad> {
        match self.number("a number between 0 and 1")? {
            n if (0.0..=1.0).contains(&n) => Ok(n),
            _ => self.out_of_range("between 0 and 1"),
        }
    }

    fn boolean(&self) -> Result<bool, Bad> {
        self.value
            .as_bool()
            .map_or_else(|| self.wrong_type("true or false"), Ok)
    }

    /// A key. Messages never quote a string value here: it may be the key itself.
    fn secret(&self) -> Result<Secret, Bad> {
        match self.value.as_str() {
            Some(key) if crate::auth::valid_key(key) => Ok(Secret::new(key)),
            Some(_) => Err(bad(
                self.span.clone(),
                format!(
                    "{} must be a non-empty key without spaces or control characters",
                    self.name
                ),
            )),
            None if matches!(self.value, DeValue::Array(_) | DeValue::Table(_)) => {
                self.wrong_type("a string")
            }
            None => Err(bad(
                self.span.clone(),
                format!("{} must be a string", self.name),
            )),
        }
    }

    fn secret_list(&self) -> Result<Vec<Secret>, Bad> {
        let DeValue::Array(items) = self.value else {
            return Err(bad(
                self.span.clone(),
                format!(
                    "{} must be an array of strings, like [\"key-1\", \"key-2\"]",
                    self.name
                ),
            ));
        };
        items
            .iter()
            .map(|item| Val::new(self.name, item, self.text).secret())
            .collect()
    }

    fn path(&self) -> Result<PathBuf, Bad> {
        match self.value.as_str() {
            Some(p) if !p.trim().is_empty() => Ok(PathBuf::from(p)),
            _ => self.wrong_type("a file path"),
        }
    }

    /// Reads an `api_keys_file`; errors point at the `api_keys_file` value.
    fn key_file(&self, path: &Path) -> Result<Vec<Secret>, Bad> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            bad(
                self.span.clone(),
                format!("cannot read api_keys_file {}: {e}", path.display()),
            )
        })?;
        let keys = crate::auth::parse_key_file(&text).map_err(|line| {
            let msg = format!(
                "api_keys_file {} line {line} is not a valid key (no spaces or control characters)",
                path.display()
            );
            bad(self.span.clone(), msg)
        })?;
        // An empty file would open the router to everyone, for instance while a key
        // rotation rewrites it: refused, so a reload keeps the keys in force.
        if keys.is_empty() {
            let msg = format!(
                "api_keys_file {} holds no keys; add a key or remove api_keys_file",
                path.display()
            );
            return Err(bad(self.span.clone(), msg));
        }
        Ok(keys)
    }

    fn host(&self) -> Result<String, Bad> {
        match self.value.as_str() {
            Some(h) if valid_host(h) => Ok(h.to_string()),
            _ => self.wrong_type("an IP address or hostname such as \"0.0.0.0\""),
        }
    }

    fn log_level(&self) -> Result<LevelFilter, Bad> {
        let what = "one of \"error\", \"warn\", \"info\", \"debug\", \"trace\"";
        let level = self.value.as_str().and_then(parse_log_level);
        level.map_or_else(|| self.wrong_type(what), Ok)
    }

    fn url(&self) -> Result<String, Bad> {
        let Some(url) = self.value.as_str() else {
            return self.wrong_type("a string like \"http://host:8000\"");
        };
        normalise_url(url).map_err(|msg| bad(self.span.clone(), msg))
    }
}

/// The value of a TOML integer; one too long for i128 saturates, which every range check rejects.
fn integer(i: &DeInteger) -> i128 {
    let saturated = if i.as_str().starts_with('-') {
        i128::MIN
    } else {
        i128::MAX
    };
    i128::from_str_radix(i.as_str(), i.radix()).unwrap_or(saturated)
}

/// Checks a backend URL and returns it with lower-case scheme and host and no trailing `/`,
/// so that the same server written two ways is caught as a duplicate.
fn normalise_url(url: &str) -> Result<String, String> {
    let bad = |why: String| Err(format!("url {} {why}", quote(url)));
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return bad("must not contain spaces or control characters".into());
    }
    let Some((scheme, rest)) = url.split_once("://") else {
        return bad(format!(
            "must start with http:// or https://; write \"http://{}\"",
            shown(url)
        ));
    };
    let scheme = scheme.to_ascii_lowercase();
    if scheme != "http" && scheme != "https" {
        return bad("must start with http:// or https://".into());
    }
    if rest.contains(['?', '#']) {
        return bad("must not have a query (?) or fragment (#)".into());
    }
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let (host, port) = match authority.rfind(':') {
        Some(i) if !authority[i..].contains(']') => (&authority[..i], Some(&authority[i + 1..])),
        _ => (authority, None),
    };
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<Ipv6Addr>().is_ok(),
        None => !host.contains(':') && valid_host(host),
    };
    if host.is_empty() {
        return bad("has no host; write http://host:port".into());
    } else if !host_ok {
        return bad(format!(
            "has an invalid host `{}`; use a hostname or IP address",
            shown(host)
        ));
    }
    let port = match port.map(|p| (p, p.parse::<u16>())) {
        None => String::new(),
        Some((p, Ok(n))) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => format!(":{n}"),
        Some(_) => return bad("must have a port from 1 to 65535".into()),
    };
    let path = path.trim_end_matches('/');
    Ok(format!(
        "{scheme}://{}{port}{path}",
        host.to_ascii_lowercase()
    ))
}

/// An IP address or an RFC 1123 hostname (underscores allowed: Docker service names use them).
pub fn valid_host(host: &str) -> bool {
    if host.parse::<IpAddr>().is_ok() {
        return true;
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    // An all-digit last label would be a mistyped IPv4 address, not a name.
    let last_ok = name
        .rsplit('.')
        .next()
        .is_some_and(|l| !l.bytes().all(|b| b.is_ascii_digit()));
    name.len() <= 253 && name.split('.').all(label_ok) && last_ok
}

fn unknown<I>(key: &Spanned<DeString>, place: &str, known: I, otherwise: &str) -> Bad
where
    I: IntoIterator<Item = &'static str>,
{
    let name = key.get_ref().as_ref();
    let hint = match closest(name, known) {
        Some(k) => format!("did you mean `{k}`?"),
        None => otherwise.to_string(),
    };
    bad(
        key.span(),
        format!("unknown key `{}` {place}; {hint}", shown(name)),
    )
}

/// The known name nearest to `name`, if it is near enough to be a typo of it.
fn closest<I: IntoIterator<Item = &'static str>>(name: &str, known: I) -> Option<&'static str> {
    // No key is this long, and the distance table grows with the name.
    if name.len() > 64 {
        return None;
    }
    let name = name.to_ascii_lowercase();
    known
        .into_iter()
        .map(|k| (edit_distance(&name, k), k))
        .filter(|&(d, k)| d <= 1 + k.len() / 6)
        .min_by_key(|&(d, _)| d)
        .map(|(_, k)| k)
}

/// Optimal string alignment distance: Levenshtein plus swapped neighbours, the commonest typo.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut rows = vec![vec![0; b.len() + 1]; a.len() + 1];
    rows[0] = (0..=b.len()).collect();
    for (i, row) in rows.iter_mut().enumerate() {
        row[0] = i;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut d = (rows[i - 1][j] + 1)
                .min(rows[i][j - 1] + 1)
                .min(rows[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d = d.min(rows[i - 2][j - 2] + 1);
            }
            rows[i][j] = d;
        }
    }
    rows[a.len()][b.len()]
}

fn syntax_error(e: &toml::de::Error, text: &str) -> Bad {
    let key = e.span().and_then(|s| text.get(s)).filter(|k| !k.is_empty());
    let msg = match key {
        Some(key) if e.message() == "duplicate key" => {
            let key = shown(key);
            format!("duplicate key `{key}`; each key and table may be defined only once")
        }
        _ => format!("TOML syntax error: {}", e.message()),
    };
    Bad(e.span(), msg)
}

/// 1-based line and column (in characters) of a byte offset. A leading BOM takes no column.
fn position(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = before.bytes().filter(|&b| b == b'\n').count() + 1;
    let col = before[line_start..]
        .chars()
        .filter(|&c| c != '\u{feff}')
        .count()
        + 1;
    (line, col)
}

fn secs(d: Duration) -> String {
    format!("{}s", d.as_secs_f64())
}

/// User text made safe for a one-line message: escaped, and cut if long.
fn shown(s: &str) -> String {
    const MAX_CHARS: usize = 60;
    let cut: String = s.chars().take(MAX_CHARS).collect();
    let ellipsis = if cut.len() < s.len() { "..." } else { "" };
    format!("{}{ellipsis}", cut.escape_debug())
}

fn quote(s: &str) -> String {
    format!("\"{}\"", shown(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASIC: &str = include_str!("../tests/fixtures/guide-basic.toml");

    const PRODUCTION: &str = include_str!("../tests/fixtures/guide-production.toml");

    /// Line 1-2 hold one valid server, so `[config]` is line 3 and its first key line 4.
    const ONE_SERVER: &str =
        "[servers]\nservers = [{ url = \"http://a:8081\", max_concurrent_requests = 2 }]\n";

    fn with_config(lines: &str) -> String {
        format!("{ONE_SERVER}[config]\n{lines}\n")
    }

    fn check_ok(text: &str) -> Config {
        match parse(text, Path::new("servers.toml")) {
            Ok(config) => config,
            Err(e) => panic!("unexpected error: {e}"),
        }
    }

    fn check_err(text: &str, expected: &str) {
        match parse(text, Path::new("servers.toml")) {
            Ok(config) => panic!("accepted, expected {expected}: {config:?}"),
            Err(e) => assert_eq!(e.to_string(), expected, "for input:\n{text}"),
        }
    }

    fn server(url: &str, max_concurrent_requests: u32) -> ServerConfig {
        ServerConfig {
            url: url.to_string(),
            max_concurrent_requests,
            api_key: None,
        }
    }

    #[test]
    fn guide_basic_file() {
        let config = check_ok(BASIC);
        let urls = [
            server("http://localhost:8081", 2),
            server("http://localhost:8082", 2),
        ];
        assert_eq!(config.servers, urls);
        let expected = Settings {
            retry_delay: Duration::from_millis(100),
            ..Settings::default()
        };
        assert_eq!(config.settings, expected);
    }

    #[test]
    fn guide_production_file() {
        let config = check_ok(PRODUCTION);
        assert_eq!(config.servers.len(), 5);
        assert_eq!(config.servers[4], server("http://backup-server-1:8081", 2));
        let s = &config.settings;
        assert_eq!(s.health_check_interval, Duration::from_secs(5));
        assert_eq!(s.health_check_min_success_rate, 0.95);
        assert_eq!(s.health_check_max_response_time, Duration::from_secs(2));
        assert_eq!(
            (s.health_check_consecutive_failures, s.failure_threshold),
            (2, 2)
        );
        assert_eq!(s.auto_recovery_threshold, Duration::from_secs(120));
        assert_eq!(
            (s.request_timeout, s.max_retries),
            (Duration::from_secs(180), 5)
        );
        assert_eq!(s.retry_delay, Duration::from_millis(500));
    }

    #[test]
    fn defaults_apply_without_config_table() {
        let config = check_ok(ONE_SERVER);
        assert_eq!(config.settings, Settings::default());
        assert_eq!(config.servers, [server("http://a:8081", 2)]);
        assert_eq!(config.path, Path::new("servers.toml"));
    }

    #[test]
    fn seconds_accept_integers_and_floats() {
        let text = "health_check_interval = 2.5\nrequest_timeout = 7\nretry_delay = 0\n\
                    queue_timeout = 0.0\nshutdown_timeout = 1e1\nhealth_check_min_success_rate = 1";
        let s = check_ok(&with_config(text)).settings;
        assert_eq!(s.health_check_interval, Duration::from_millis(2500));
        assert_eq!(s.request_timeout, Duration::from_secs(7));
        assert_eq!(
            (s.retry_delay, s.queue_timeout),
            (Duration::ZERO, Duration::ZERO)
        );
        assert_eq!(s.shutdown_timeout, Duration::from_secs(10));
        assert_eq!(s.health_check_min_success_rate, 1.0);
    }

    #[test]
    fn listen_and_logging_keys() {
        let text = "host = \"0.0.0.0\"\nport = 8888\nlog_level = \"DEBUG\"\nworker_threads = 8";
        let s = check_ok(&with_config(text)).settings;
        assert_eq!((s.host.as_deref(), s.port), (Some("0.0.0.0"), Some(8888)));
        assert_eq!(
            (s.log_level, s.worker_threads),
            (Some(LevelFilter::Debug), 8)
        );
        assert_eq!(parse_log_level("Warning"), Some(LevelFilter::Warn));
        assert_eq!(parse_log_level("verbose"), None);
    }

    #[test]
    fn urls_are_normalised() {
        let text = "[servers]\nservers = [\n\
            { url = \"http://a:8081/\", max_concurrent_requests = 1 },\n\
            { url = \"HTTPS://GPU-1.example.com/v1//\", max_concurrent_requests = 100000 },\n\
            { url = \"http://[::1]:09000\", max_concurrent_requests = 1 },\n]";
        let urls: Vec<_> = check_ok(text).servers.into_iter().map(|s| s.url).collect();
        assert_eq!(
            urls,
            [
                "http://a:8081",
                "https://gpu-1.example.com/v1",
                "http://[::1]:9000"
            ]
        );
    }

    /// One case a line: TOML text, ` => `, and the expected error line.
    fn check_cases(cases: &str, wrap: impl Fn(&str) -> String) {
        for case in cases.lines().filter(|line| !line.is_empty()) {
            let (text, expected) = case.split_once(" => ").expect("a case is `text => error`");
            check_err(&wrap(text), expected);
        }
    }

    #[test]
    fn syntax_errors() {
        check_err(
            "[config\n",
            "servers.toml:1:8: TOML syntax error: unclosed table, expected `]`",
        );
        let text = "[config]\nfoo = bar";
        let expected =
            "2:7: TOML syntax error: string values must be quoted, expected literal string";
        check_err(text, &format!("servers.toml:{expected}"));
        let text = "[config]\nmax_retries = 1\nmax_retries = 2";
        let expected =
            "3:1: duplicate key `max_retries`; each key and table may be defined only once";
        check_err(text, &format!("servers.toml:{expected}"));
    }

    /// Each line goes in `[config]` on line 4, after a valid server.
    const CONFIG_CASES: &str = r#"
health_check_intervall = 10 => servers.toml:4:1: unknown key `health_check_intervall` in [config]; did you mean `health_check_interval`?
Request_Timeout = 10 => servers.toml:4:1: unknown key `Request_Timeout` in [config]; did you mean `request_timeout`?
timeout = 10 => servers.toml:4:1: unknown key `timeout` in [config]; remove it or fix the spelling
health_check_interval = "10" => servers.toml:4:25: health_check_interval must be a number of seconds, found string "10"
health_check_interval = -1 => servers.toml:4:25: health_check_interval must be more than 0 seconds, found -1
health_check_interval = 0 => servers.toml:4:25: health_check_interval must be more than 0 seconds, found 0
request_timeout = nan => servers.toml:4:19: request_timeout must be more than 0 seconds, found nan
retry_delay = -0.5 => servers.toml:4:15: retry_delay must be zero or more seconds, found -0.5
queue_timeout = inf => servers.toml:4:17: queue_timeout must be zero or more seconds, found inf
request_timeout = 1e9 => servers.toml:4:19: request_timeout must be at most 31536000 seconds (a year), found 1e9
health_check_min_success_rate = 1.5 => servers.toml:4:33: health_check_min_success_rate must be between 0 and 1, found 1.5
health_check_min_success_rate = true => servers.toml:4:33: health_check_min_success_rate must be a number between 0 and 1, found boolean true
max_retries = 2.0 => servers.toml:4:15: max_retries must be a whole number, found float 2.0
failure_threshold = 0 => servers.toml:4:21: failure_threshold must be at least 1, found 0
max_retries = -1 => servers.toml:4:15: max_retries must be at least 0, found -1
max_retries = 99999999999 => servers.toml:4:15: max_retries must be at most 4294967295, found 99999999999
max_retries = -999999999999999999999999999999999999999999 => servers.toml:4:15: max_retries must be at least 0, found -999999999999999999999999999999999999999999
request_timeout = 999999999999999999999999999999999999999999 => servers.toml:4:19: request_timeout must be at most 31536000 seconds (a year), found 999999999999999999999999999999999999999999
enable_active_health_check = "yes" => servers.toml:4:30: enable_active_health_check must be true or false, found string "yes"
port = 70000 => servers.toml:4:8: port must be at most 65535, found 70000
host = "" => servers.toml:4:8: host must be an IP address or hostname such as "0.0.0.0", found string ""
host = "bad host" => servers.toml:4:8: host must be an IP address or hostname such as "0.0.0.0", found string "bad host"
log_level = "verbose" => servers.toml:4:13: log_level must be one of "error", "warn", "info", "debug", "trace", found string "verbose"
worker_threads = [1] => servers.toml:4:18: worker_threads must be a whole number, found an array
"#;

    #[test]
    fn config_errors() {
        check_cases(CONFIG_CASES, with_config);
        let expected = "servers.toml:1:10: config must be a table, found integer 3";
        check_err(&format!("config = 3\n{ONE_SERVER}"), expected);
    }

    /// Each line is the one entry of `servers = [ ... ]`, on line 3 from column 3.
    const SERVER_CASES: &str = r#"
{ url = "ftp://a:21", max_concurrent_requests = 1 } => servers.toml:3:11: url "ftp://a:21" must start with http:// or https://
{ url = "localhost:8081", max_concurrent_requests = 1 } => servers.toml:3:11: url "localhost:8081" must start with http:// or https://; write "http://localhost:8081"
{ url = "http://:8081", max_concurrent_requests = 1 } => servers.toml:3:11: url "http://:8081" has no host; write http://host:port
{ url = "http://a:0", max_concurrent_requests = 1 } => servers.toml:3:11: url "http://a:0" must have a port from 1 to 65535
{ url = "http://a:1/v1?x=1", max_concurrent_requests = 1 } => servers.toml:3:11: url "http://a:1/v1?x=1" must not have a query (?) or fragment (#)
{ url = "http://a b", max_concurrent_requests = 1 } => servers.toml:3:11: url "http://a b" must not contain spaces or control characters
{ url = "http://u@a:1", max_concurrent_requests = 1 } => servers.toml:3:11: url "http://u@a:1" has an invalid host `u@a`; use a hostname or IP address
{ url = 8081, max_concurrent_requests = 1 } => servers.toml:3:11: url must be a string like "http://host:8000", found integer 8081
{ url = "http://a:1", max_concurrent_requests = 0 } => servers.toml:3:51: max_concurrent_requests must be at least 1, found 0
{ url = "http://a:1", max_concurrent_requests = 100001 } => servers.toml:3:51: max_concurrent_requests must be at most 100000, found 100001
{ url = "http://a:1", max_concurent_requests = 2 } => servers.toml:3:25: unknown key `max_concurent_requests` in server entry; did you mean `max_concurrent_requests`?
{ url = "http://a:1", weight = 2 } => servers.toml:3:25: unknown key `weight` in server entry; a server takes only url, max_concurrent_requests and api_key
{ url = "http://a:1" } => servers.toml:3:3: server entry is missing `max_concurrent_requests`; add e.g. max_concurrent_requests = 4
{ max_concurrent_requests = 1 } => servers.toml:3:3: server entry is missing `url`; add e.g. url = "http://host:8000"
"http://a:1" => servers.toml:3:3: each server must be a table like { url = "http://host:8000", max_concurrent_requests = 4 }, found string "http://a:1"
"#;

    #[test]
    fn server_errors() {
        check_cases(SERVER_CASES, |entry| {
            format!("[servers]\nservers = [\n  {entry},\n]\n")
        });
    }

    const NO_SERVERS_CASES: &str = r#"
[config]\nmax_retries = 1 => servers.toml: no servers configured: add at least one { url, max_concurrent_requests } entry to [servers] servers
[servers]\nservers = [] => servers.toml:2:11: no servers configured: add at least one { url, max_concurrent_requests } entry to [servers] servers
[servers] => servers.toml:1:1: no servers configured: add at least one { url, max_concurrent_requests } entry to [servers] servers
servers = [1] => servers.toml:1:11: servers must be a [servers] table holding servers = [ ... ], found an array
[servers]\nservers = "http://a:1" => servers.toml:2:11: servers must be an array of { url, max_concurrent_requests } tables, found string "http://a:1"
[servers]\nserver = [] => servers.toml:2:1: unknown key `server` in [servers]; did you mean `servers`?
[sever] => servers.toml:1:2: unknown key `sever` at the top level; did you mean `servers`?
[logging] => servers.toml:1:2: unknown key `logging` at the top level; only [servers] and [config] are allowed
\u{feff}[sever] => servers.toml:1:2: unknown key `sever` at the top level; did you mean `servers`?
"#;

    #[test]
    fn server_list_errors() {
        let unescape = |text: &str| text.replace("\\n", "\n").replace("\\u{feff}", "\u{feff}");
        check_cases(NO_SERVERS_CASES, unescape);
        let entry = |url: &str| format!("{{ url = \"{url}\", max_concurrent_requests = 1 }}");
        let text = format!(
            "[servers]\nservers = [\n  {},\n  {},\n]",
            entry("http://a:1"),
            entry("http://A:1/")
        );
        let expected = "4:11: duplicate server `http://a:1` (already listed on line 3); remove one of the two entries";
        check_err(&text, &format!("servers.toml:{expected}"));
    }

    #[test]
    fn first_problem_in_file_order_is_reported() {
        let text = with_config("zzz = 1\naaa = 2");
        check_err(
            &text,
            "servers.toml:4:1: unknown key `zzz` in [config]; remove it or fix the spelling",
        );
    }

    #[test]
    fn odd_inputs_give_one_line_errors() {
        let long = "x".repeat(10_000);
        let nested = format!("a = {}", "[".repeat(100_000));
        let inputs = [
            "\u{feff}[servers]\nservers = 1",
            "\0",
            "[config]\n\"a\nb\" = 1",
            &long,
            &nested,
        ];
        for text in inputs {
            let e = parse(text, Path::new("p")).expect_err(text).to_string();
            assert!(!e.contains('\n') && e.len() < 300, "{e}");
        }
        check_err("", "servers.toml: no servers configured: add at least one { url, max_concurrent_requests } entry to [servers] servers");
    }

    #[test]
    fn load_reports_missing_and_non_utf8_files() {
        let missing = Path::new("/nonexistent/servers.toml");
        let e = load(missing).expect_err("missing file");
        assert_eq!(e.to_string(), "/nonexistent/servers.toml: cannot read config file: No such file or directory (os error 2); set --config or CONFIG_PATH to the servers.toml to use");
        let path =
            std::env::temp_dir().join(format!("vllm-router-config-{}.toml", std::process::id()));
        std::fs::write(&path, b"[config]\nhost = \"\xff\"\n").expect("write temp file");
        let e = load(&path).expect_err("bad utf-8");
        let _ = std::fs::remove_file(&path);
        let expected = "2:9: config file is not valid UTF-8; save it as UTF-8";
        assert_eq!(e.to_string(), format!("{}:{expected}", path.display()));
    }

    #[test]
    fn summary_marks_defaults() {
        let summary = check_ok(PRODUCTION).summary();
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

    #[test]
    fn edit_distance_counts_swaps_as_one() {
        assert_eq!(edit_distance("prot", "port"), 1);
        assert_eq!(edit_distance("", "host"), 4);
        assert_eq!(closest("hots", ["host", "port"]), Some("host"));
        assert_eq!(closest("url", ["host", "port"]), None);
    }
}
