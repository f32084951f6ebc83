//! The parse: config text to `Config`. It walks toml's spanned document tree (`DeTable`)
//! by hand rather than using serde derive, so that every problem keeps the span of the key
//! or value it is about, and the first problem in file order is the one reported.
//!
//! It is pure: it reads no file. The `api_keys_file` a config names is only noted (with
//! where it was named); `load` reads it.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::de::{DeString, DeTable, DeValue};
use toml::Spanned;

use super::checks::{self, Val, MAX_CAPACITY};
use super::error::{bad, position, shown, Bad, ConfigError};
use super::keys::{known_keys, KEYS};
use super::suggest::unknown;
use super::{Config, ServerConfig, Settings};

const NO_SERVERS: &str =
    "no servers configured: add at least one { url, max_concurrent_requests } entry to [servers] servers";

/// Validates config `text`; `path` names it in messages, and relative paths in it start
/// from its directory. Reads no file: `settings.file_api_keys` stays empty (`load` and
/// `from_bytes` fill it).
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    parse_document(text, path).result
}

/// What the parse made of a file: the config or its first problem, and the key file it
/// named before that problem. A key file's problem comes before any problem later in the
/// file, so `load` reads the key file first and reports its problem instead.
pub(super) struct Parsed {
    pub(super) result: Result<Config, ConfigError>,
    pub(super) key_file: Option<KeyFile>,
}

/// An `api_keys_file` to read: its path (relative to the config file's directory when
/// written so), and the line and column of its value, where its problems point.
pub(super) struct KeyFile {
    pub(super) path: PathBuf,
    pub(super) location: (usize, usize),
}

pub(super) fn parse_document(text: &str, path: &Path) -> Parsed {
    let fail = |Bad(span, msg)| ConfigError::new(path, span.map(|s| position(text, s.start)), msg);
    let mut key_file = None;
    let result = match DeTable::parse(text) {
        Err(e) => Err(fail(syntax_error(&e, text))),
        Ok(root) => {
            let base = path.parent().unwrap_or(Path::new("."));
            document(root.get_ref(), text, base, &mut key_file)
                .map(|(servers, settings)| Config {
                    path: path.to_path_buf(),
                    servers,
                    settings,
                })
                .map_err(fail)
        }
    };
    Parsed { result, key_file }
}

type Entry<'a, 'i> = (&'a Spanned<DeString<'i>>, &'a Spanned<DeValue<'i>>);

/// Table entries in file order (toml sorts them by name), so the first problem reported is
/// the first one in the file.
fn sorted<'a, 'i>(table: &'a DeTable<'i>) -> Vec<Entry<'a, 'i>> {
    let mut entries: Vec<_> = table.iter().collect();
    entries.sort_by_key(|(key, _)| key.span().start);
    entries
}

fn document(
    root: &DeTable,
    text: &str,
    base: &Path,
    key_file: &mut Option<KeyFile>,
) -> Result<(Vec<ServerConfig>, Settings), Bad> {
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
                        *key_file = Some(KeyFile {
                            path: base.join(file),
                            location: position(text, val.span.start),
                        });
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
    checks::cross_field(&mut settings, base)?;
    Ok((servers, settings))
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use log::LevelFilter;

    use super::*;
    use crate::control::config::parse_log_level;

    const BASIC: &str = include_str!("../../../tests/fixtures/guide-basic.toml");

    const PRODUCTION: &str = include_str!("../../../tests/fixtures/guide-production.toml");

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
    fn routing_keys() {
        let text = "routing = \"least_loaded\"\nsession_header = \"X-Conversation\"\nprefix_index_tokens = 4096";
        let s = check_ok(&with_config(text)).settings;
        assert_eq!(s.routing, crate::control::config::Routing::LeastLoaded);
        assert_eq!(s.session_header, "x-conversation");
        assert_eq!(s.prefix_index_tokens, 4096);
        assert_eq!(Settings::default().routing.name(), "cache_aware");
        check_err(
            &with_config("routing = \"round_robin\""),
            "servers.toml:4:11: routing must be \"least_loaded\" or \"cache_aware\", found string \"round_robin\"",
        );
        check_err(
            &with_config("session_header = \"X Session\""),
            "servers.toml:4:18: session_header must be a header name such as \"X-Session-ID\", found string \"X Session\"",
        );
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
}
