//! Property tests of the parsing front, each against an oracle that is not the code under
//! test: round trips (a config, a chunked body, a head, a request body built from generated
//! parts parses back to exactly those parts), generated defects with the error each must
//! give (a config with one bad line, a chunked body with one broken chunk), and for the key
//! check the rule as docs/security.md states it (`Authorization: Bearer <key>`, the key exactly).
//! Arbitrary bytes still go to the config parser, which must answer with one located line.
//! Each property runs 1000 random cases in `make test`; a failure prints the shrunk input
//! to add as a regular test.

use std::path::Path;
use std::time::Duration;

use proptest::prelude::*;
use serde_json::{json, Value};
use vllm_router::client::{chunked, head};
use vllm_router::control::config;
use vllm_router::request::error::RouterError;
use vllm_router::request::{auth, headers, relay};

const GUIDE: &str = include_str!("fixtures/guide-production.toml");

/// An edit of a config text: (position, what to do, a character).
fn edits() -> impl Strategy<Value = Vec<(usize, u8, char)>> {
    prop::collection::vec((0usize..2000, 0u8..3, any::<char>()), 1..8)
}

fn apply(text: &str, edits: &[(usize, u8, char)]) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    for &(at, op, c) in edits {
        let at = at % (chars.len() + 1);
        match op {
            0 => chars.insert(at, c),
            1 if at < chars.len() => {
                chars.remove(at);
            }
            _ if at < chars.len() => chars[at] = c,
            _ => chars.push(c),
        }
    }
    chars.into_iter().collect()
}

/// Where a config error points: its line and column, from `fuzz.toml:LINE:COL: ...`.
fn located(error: &str) -> Option<(usize, usize)> {
    let mut parts = error.strip_prefix("fuzz.toml:")?.splitn(3, ':');
    let line = parts.next()?.parse().ok()?;
    let col = parts.next()?.parse().ok()?;
    Some((line, col))
}

/// A config error is one line naming the file, and the place it names is in the text:
/// a line of it (or the one just past its end) and a column from 1.
fn one_located_line(text: &str, error: &str) -> Result<(), TestCaseError> {
    prop_assert!(!error.contains('\n'), "{}", error);
    match located(error) {
        Some((line, col)) => {
            prop_assert!(line >= 1 && line <= text.lines().count() + 1, "{}", error);
            prop_assert!(col >= 1, "{}", error);
        }
        None => prop_assert!(error.starts_with("fuzz.toml: "), "{}", error),
    }
    Ok(())
}

/// A backend as generated, and how its URL is written in the file.
#[derive(Debug, Clone)]
struct Server {
    host: String,
    port: u16,
    prefix: Option<String>,
    upper_scheme: bool,
    upper_host: bool,
    trailing_slash: bool,
    capacity: u32,
}

impl Server {
    fn written(&self) -> String {
        let scheme = if self.upper_scheme { "HTTP" } else { "http" };
        let host = if self.upper_host {
            self.host.to_ascii_uppercase()
        } else {
            self.host.clone()
        };
        let prefix = self
            .prefix
            .as_ref()
            .map_or(String::new(), |p| format!("/{p}"));
        let slash = if self.trailing_slash { "/" } else { "" };
        format!("{scheme}://{host}:{}{prefix}{slash}", self.port)
    }

    /// The URL as docs/configuration.md documents it is kept: lower-case scheme and host, no
    /// trailing `/`.
    fn expected(&self) -> String {
        let prefix = self
            .prefix
            .as_ref()
            .map_or(String::new(), |p| format!("/{p}"));
        format!("http://{}:{}{prefix}", self.host, self.port)
    }
}

/// Up to eight backends on distinct ports, so their URLs are distinct.
fn servers() -> impl Strategy<Value = Vec<Server>> {
    let host = prop_oneof![
        Just("127.0.0.1".to_string()),
        "[a-z][a-z0-9-]{0,10}[a-z0-9](\\.[a-z]{2,6})?",
    ];
    let one = (
        host,
        prop::option::of("[a-z0-9]{1,6}"),
        any::<(bool, bool, bool)>(),
        1u32..=100_000,
    );
    (1024u16..60_000, prop::collection::vec(one, 1..8)).prop_map(|(base, list)| {
        list.into_iter()
            .enumerate()
            .map(
                |(i, (host, prefix, (upper_scheme, upper_host, trailing_slash), capacity))| {
                    Server {
                        host,
                        port: base + i as u16,
                        prefix,
                        upper_scheme,
                        upper_host,
                        trailing_slash,
                        capacity,
                    }
                },
            )
            .collect()
    })
}

/// A valid `[config]` line and what it must set.
#[derive(Debug, Clone)]
enum Setting {
    ActiveHealthCheck(bool),
    WorkerThreads(u64),
    MaxQueueSize(u64),
    RequestTimeoutSecs(u64),
    /// In eighths of a second, which a float holds exactly.
    RetryDelayEighths(u64),
}

impl Setting {
    fn line(&self) -> String {
        match self {
            Setting::ActiveHealthCheck(b) => format!("enable_active_health_check = {b}"),
            Setting::WorkerThreads(n) => format!("worker_threads = {n}"),
            Setting::MaxQueueSize(n) => format!("max_queue_size = {n}"),
            Setting::RequestTimeoutSecs(n) => format!("request_timeout = {n}"),
            Setting::RetryDelayEighths(n) => format!("retry_delay = {:?}", *n as f64 / 8.0),
        }
    }

    fn apply(&self, s: &mut config::Settings) {
        match *self {
            Setting::ActiveHealthCheck(b) => s.enable_active_health_check = b,
            Setting::WorkerThreads(n) => s.worker_threads = n as usize,
            Setting::MaxQueueSize(n) => s.max_queue_size = n as usize,
            Setting::RequestTimeoutSecs(n) => s.request_timeout = Duration::from_secs(n),
            Setting::RetryDelayEighths(n) => s.retry_delay = Duration::from_millis(n * 125),
        }
    }
}

/// Any subset of the settings, in any order.
fn settings() -> impl Strategy<Value = Vec<Setting>> {
    (
        prop::option::of(any::<bool>().prop_map(Setting::ActiveHealthCheck)),
        prop::option::of((0u64..512).prop_map(Setting::WorkerThreads)),
        prop::option::of((0u64..100_000).prop_map(Setting::MaxQueueSize)),
        prop::option::of((1u64..=31_536_000).prop_map(Setting::RequestTimeoutSecs)),
        prop::option::of((0u64..800).prop_map(Setting::RetryDelayEighths)),
    )
        .prop_flat_map(|(a, b, c, d, e)| {
            Just([a, b, c, d, e].into_iter().flatten().collect::<Vec<_>>()).prop_shuffle()
        })
}

/// The lines of a config file with these servers and settings.
fn config_lines(servers: &[Server], settings: &[Setting]) -> Vec<String> {
    let mut lines = vec!["[servers]".to_string(), "servers = [".to_string()];
    for s in servers {
        lines.push(format!(
            "    {{ url = \"{}\", max_concurrent_requests = {} }},",
            s.written(),
            s.capacity
        ));
    }
    lines.push("]".into());
    lines.push(String::new());
    lines.push("[config]".into());
    lines.extend(settings.iter().map(Setting::line));
    lines
}

/// One bad `[config]` line (none of its keys is among `settings()`'s, so it never
/// repeats one), the column its error points at and the message, as docs/configuration.md's
/// "Configuration" table states each key's rule. An unknown key's message ends in a
/// hint, so only its start is known.
#[derive(Debug, Clone)]
enum Defect {
    UnknownKey(String),
    ZeroFailureThreshold,
    HeaderBytesBelowMin(u64),
    HeaderBytesAboveMax(u64),
    RetriesAsString(u64),
    IntervalNotPositive(i64),
}

impl Defect {
    fn line(&self) -> String {
        match self {
            Defect::UnknownKey(k) => format!("{k} = 1"),
            Defect::ZeroFailureThreshold => "failure_threshold = 0".into(),
            Defect::HeaderBytesBelowMin(n) | Defect::HeaderBytesAboveMax(n) => {
                format!("max_header_bytes = {n}")
            }
            Defect::RetriesAsString(n) => format!("max_retries = \"{n}\""),
            Defect::IntervalNotPositive(n) => format!("health_check_interval = {n}"),
        }
    }

    /// (column, message or its start, whether the message is whole).
    fn expected(&self) -> (usize, String, bool) {
        match self {
            Defect::UnknownKey(k) => (1, format!("unknown key `{k}` in [config]; "), false),
            Defect::ZeroFailureThreshold => (
                21,
                "failure_threshold must be at least 1, found 0".into(),
                true,
            ),
            Defect::HeaderBytesBelowMin(n) => (
                20,
                format!("max_header_bytes must be at least 1024, found {n}"),
                true,
            ),
            Defect::HeaderBytesAboveMax(n) => (
                20,
                format!("max_header_bytes must be at most 1048576, found {n}"),
                true,
            ),
            Defect::RetriesAsString(n) => (
                15,
                format!("max_retries must be a whole number, found string \"{n}\""),
                true,
            ),
            Defect::IntervalNotPositive(n) => (
                25,
                format!("health_check_interval must be more than 0 seconds, found {n}"),
                true,
            ),
        }
    }
}

fn defect() -> impl Strategy<Value = Defect> {
    prop_oneof![
        "zz_[a-z]{3,10}".prop_map(Defect::UnknownKey),
        Just(Defect::ZeroFailureThreshold),
        (0u64..1024).prop_map(Defect::HeaderBytesBelowMin),
        (1_048_577u64..u32::MAX.into()).prop_map(Defect::HeaderBytesAboveMax),
        any::<u64>().prop_map(Defect::RetriesAsString),
        (-100_000i64..=0).prop_map(Defect::IntervalNotPositive),
    ]
}

/// A chunked body on the wire, from `body` cut into chunks of `sizes` (cycled), and
/// where each chunk's size line and data start.
struct Encoded {
    wire: Vec<u8>,
    /// (size line start, data start, data length) per chunk.
    chunks: Vec<(usize, usize, usize)>,
}

fn encode_chunked(
    body: &[u8],
    sizes: &[usize],
    extensions: &[Option<String>],
    upper: bool,
) -> Encoded {
    let mut wire = Vec::new();
    let mut chunks = Vec::new();
    let mut rest = body;
    let mut i = 0;
    while !rest.is_empty() {
        let n = sizes[i % sizes.len()].min(rest.len());
        let line_start = wire.len();
        let size = if upper {
            format!("{n:X}")
        } else {
            format!("{n:x}")
        };
        wire.extend_from_slice(size.as_bytes());
        if let Some(ext) = &extensions[i % extensions.len()] {
            wire.extend_from_slice(format!(";{ext}").as_bytes());
        }
        wire.extend_from_slice(b"\r\n");
        chunks.push((line_start, wire.len(), n));
        wire.extend_from_slice(&rest[..n]);
        wire.extend_from_slice(b"\r\n");
        rest = &rest[n..];
        i += 1;
    }
    Encoded { wire, chunks }
}

/// One broken chunk, and the error RFC 9112's chunk grammar (as `chunked` states it:
/// a size is 1 to 16 hex digits, extensions without BWS, CRLF after every line) gives it.
#[derive(Debug, Clone, Copy)]
enum ChunkDefect {
    /// The size line is empty.
    NoSize,
    /// The size padded with zeros to 17 digits or more.
    LongSize(usize),
    /// A space between the size and the line's end or its extension.
    SpaceAfterSize,
    /// The size line ends in a bare LF.
    BareLf,
    /// The size says one byte less than the data.
    DataLonger,
}

impl ChunkDefect {
    fn error(self) -> &'static str {
        match self {
            ChunkDefect::NoSize => "a chunk size line has no size",
            ChunkDefect::LongSize(_) => "a chunk size has more than 16 hex digits",
            ChunkDefect::SpaceAfterSize | ChunkDefect::BareLf => {
                "a chunk size is followed by something other than CRLF or `;`"
            }
            ChunkDefect::DataLonger => "chunk data is longer than its size",
        }
    }
}

/// An `Authorization` value built from parts, and whether the documented rule (docs/security.md) accepts it:
/// the scheme `Bearer` in any case, one or more spaces, then exactly one of the keys,
/// with spaces or tabs around the whole value (a proxy may leave them).
#[derive(Debug, Clone)]
struct Credentials {
    lead: String,
    scheme: String,
    scheme_ok: bool,
    separator: String,
    token: String,
    trail: String,
}

fn credentials(keys: Vec<String>) -> impl Strategy<Value = (Vec<String>, Credentials)> {
    let scheme = prop_oneof![
        3 => prop::collection::vec(any::<bool>(), 6).prop_map(|upper| {
            let s: String = "bearer"
                .chars()
                .zip(upper)
                .map(|(c, u)| if u { c.to_ascii_uppercase() } else { c })
                .collect();
            (s, true)
        }),
        1 => prop::sample::select(vec!["Basic", "Beare", "Bearerx", "Token", "", "Bearer:"])
            .prop_map(|s| (s.to_string(), false)),
    ];
    let separator = prop_oneof![
        4 => " {1,3}",
        1 => prop::sample::select(vec!["", "\t", ":"]).prop_map(str::to_string),
    ];
    let n = keys.len();
    // The token: one of the keys, or a near miss of one.
    let token = (0..n, 0u8..6, any::<prop::sample::Index>(), "[a-z0-9]").prop_map({
        let keys = keys.clone();
        move |(k, how, at, extra)| {
            let key = &keys[k];
            match how {
                0..=1 => key.clone(),
                2 => key[..at.index(key.len())].to_string(),
                3 => format!("{key}{extra}"),
                4 => key.to_ascii_uppercase(),
                _ => {
                    let mut b = key.clone().into_bytes();
                    let i = at.index(b.len());
                    b[i] = if b[i] == b'x' { b'y' } else { b'x' };
                    String::from_utf8(b).expect("ascii")
                }
            }
        }
    });
    (
        Just(keys),
        "[ \t]{0,2}",
        scheme,
        separator,
        token,
        "[ \t]{0,2}",
    )
        .prop_map(
            |(keys, lead, (scheme, scheme_ok), separator, token, trail)| {
                (
                    keys,
                    Credentials {
                        lead,
                        scheme,
                        scheme_ok,
                        separator,
                        token,
                        trail,
                    },
                )
            },
        )
}

/// A JSON value without `model`'s meaning: a field of a request body.
fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        "\\PC{0,12}".prop_map(Value::String),
        prop::collection::vec(any::<i32>(), 0..4).prop_map(|v| json!(v)),
    ]
}

/// A request body: a JSON object of other fields, with `model` set to `model` if given.
fn body_with(model: Option<Value>, fields: std::collections::BTreeMap<String, Value>) -> Vec<u8> {
    let mut object: serde_json::Map<String, Value> =
        fields.into_iter().filter(|(k, _)| k != "model").collect();
    if let Some(model) = model {
        object.insert("model".into(), model);
    }
    serde_json::to_vec(&Value::Object(object)).expect("a JSON object serialises")
}

fn fields() -> impl Strategy<Value = std::collections::BTreeMap<String, Value>> {
    prop::collection::btree_map("[a-z_]{1,8}", json_leaf(), 0..5)
}

/// Routes whose POST body must be a JSON object (docs/security.md: 400 otherwise).
const MODEL_ROUTES: &[&str] = &[
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/chat/completions?x=1",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn any_text_parses_or_gives_one_located_line(text in "\\PC{0,300}") {
        if let Err(e) = config::parse(&text, Path::new("fuzz.toml")) {
            one_located_line(&text, &e.to_string())?;
        }
    }

    #[test]
    fn a_damaged_config_gives_one_located_line(edits in edits()) {
        let text = apply(GUIDE, &edits);
        if let Err(e) = config::parse(&text, Path::new("fuzz.toml")) {
            one_located_line(&text, &e.to_string())?;
        }
    }

    #[test]
    fn a_generated_config_parses_to_exactly_its_servers_and_settings(
        servers in servers(),
        settings in settings(),
    ) {
        let text = config_lines(&servers, &settings).join("\n");
        let parsed = config::parse(&text, Path::new("fuzz.toml"))
            .unwrap_or_else(|e| panic!("a valid config is refused: {e}\n{text}"));
        let expected: Vec<config::ServerConfig> = servers
            .iter()
            .map(|s| config::ServerConfig {
                url: s.expected(),
                max_concurrent_requests: s.capacity,
                api_key: None,
            })
            .collect();
        prop_assert_eq!(&parsed.servers, &expected, "{}", text);
        let mut want = config::Settings::default();
        for s in &settings {
            s.apply(&mut want);
        }
        prop_assert_eq!(&parsed.settings, &want, "{}", text);
    }

    #[test]
    fn a_config_with_one_bad_line_is_refused_at_that_line(
        servers in servers(),
        settings in settings(),
        defect in defect(),
        at in any::<prop::sample::Index>(),
    ) {
        let mut lines = config_lines(&servers, &settings);
        // Anywhere in [config]: every other line there is valid.
        let first = lines.len() - settings.len();
        let row = first + at.index(settings.len() + 1);
        lines.insert(row, defect.line());
        let text = lines.join("\n");
        let error = config::parse(&text, Path::new("fuzz.toml"))
            .map(|_| ())
            .expect_err("a config with a bad line is refused")
            .to_string();
        let (col, message, whole) = defect.expected();
        let want = format!("fuzz.toml:{}:{col}: {message}", row + 1);
        if whole {
            prop_assert_eq!(&error, &want, "{}", text);
        } else {
            prop_assert!(error.starts_with(&want), "{} (wanted {}) in\n{}", error, want, text);
        }
    }

    #[test]
    fn a_chunked_body_decodes_to_what_was_encoded_however_it_is_split(
        body in prop::collection::vec(any::<u8>(), 0..600),
        sizes in prop::collection::vec(1usize..80, 1..20),
        extensions in prop::collection::vec(prop::option::of("[a-z]{1,6}(=[a-z0-9]{1,6})?"), 1..20),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
        upper in any::<bool>(),
    ) {
        let mut wire = encode_chunked(&body, &sizes, &extensions, upper).wire;
        wire.extend_from_slice(b"0\r\nX-Trailer: t\r\n\r\n");
        let end = wire.len();
        wire.extend_from_slice(b"GET /next HTTP/1.1\r\n");
        let mut points: Vec<usize> = cuts.iter().map(|c| c.index(wire.len() + 1)).collect();
        points.push(wire.len());
        points.sort_unstable();
        let mut decoder = chunked::Decoder::default();
        let mut out = Vec::new();
        let mut used = 0;
        let mut from = 0;
        for to in points {
            if to < from { continue; }
            let piece = &wire[from..to];
            let n = decoder.feed(piece, &mut out).expect("a valid body decodes");
            used += n;
            if decoder.is_done() { break; }
            prop_assert_eq!(n, piece.len(), "an unfinished body takes every byte");
            from = to;
        }
        prop_assert!(decoder.is_done());
        prop_assert_eq!(used, end, "the body ends before the next request");
        prop_assert_eq!(out, body);
    }

    #[test]
    fn a_valid_head_parses_to_its_fields_and_a_control_byte_refuses_it(
        fields in prop::collection::vec(("[A-Za-z][A-Za-z0-9-]{0,12}", "[!-~]([ -~]{0,20}[!-~])?"), 0..12),
        bad in 0u8..0x20,
        at in any::<prop::sample::Index>(),
    ) {
        let fields: Vec<(String, String)> = fields
            .into_iter()
            .filter(|(n, _)| !["host", "content-length", "transfer-encoding", "expect", "upgrade", "connection"]
                .contains(&n.to_ascii_lowercase().as_str()))
            .collect();
        let mut text = String::from("POST /v1/x?y=1 HTTP/1.1\r\nHost: r\r\n");
        for (name, value) in &fields {
            text.push_str(&format!("{name}: {value}\r\n"));
        }
        text.push_str("\r\n");
        let end = head::find_end(text.as_bytes()).expect("valid").expect("whole");
        prop_assert_eq!(end, text.len());
        let parsed = head::parse(text.as_bytes()).expect("a valid head parses");
        prop_assert_eq!(&parsed.headers[1..], fields.as_slice());
        prop_assert_eq!(parsed.framing, head::Framing::None);
        // The same head with one control byte (other than tab) somewhere in a field.
        if bad != b'\t' && !fields.is_empty() {
            let field_start = "POST /v1/x?y=1 HTTP/1.1\r\nHost: r\r\n".len();
            let field_len = text.len() - 2 - field_start;
            let pos = field_start + at.index(field_len);
            let mut bytes = text.into_bytes();
            if bytes[pos] != b'\r' && bytes[pos] != b'\n' {
                bytes[pos] = bad;
                let verdict = head::find_end(&bytes).and_then(|end| match end {
                    Some(end) => head::parse(&bytes[..end]).map(|_| ()),
                    None => Ok(()),
                });
                prop_assert!(verdict.is_err(), "accepted a control byte 0x{:02x}", bad);
            }
        }
    }

    #[test]
    fn the_head_scanner_finds_the_same_end_however_the_bytes_arrive(
        text in "(GET|POST) /[a-z]{0,8} HTTP/1\\.1\r\n([A-Za-z]{1,6}: [ -~]{0,12}\r\n){0,6}\r\n[ -~]{0,10}",
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
    ) {
        let bytes = text.as_bytes();
        let whole = head::find_end(bytes);
        let mut points: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
        points.push(bytes.len());
        points.sort_unstable();
        let mut scanner = head::Scanner::default();
        let mut found = Ok(None);
        for to in points {
            found = scanner.scan(&bytes[..to]);
            if !matches!(found, Ok(None)) { break; }
        }
        prop_assert_eq!(found, whole);
    }

    #[test]
    fn forwarding_keeps_every_end_to_end_header(
        list in prop::collection::vec(("[Cc]ontent-[Ll]ength|[Tt]ransfer-[Ee]ncoding|[Cc]onnection|[Xx]-[a-z]{1,5}", "[ -~]{0,24}"), 0..6)
    ) {
        let peer: std::net::IpAddr = "127.0.0.1".parse().expect("ip");
        let up = headers::upstream_headers(&list, peer, false);
        for (name, value) in &list {
            let lower = name.to_ascii_lowercase();
            let listed = list.iter().any(|(n, v)| n.eq_ignore_ascii_case("connection")
                && v.split(',').any(|t| t.trim().eq_ignore_ascii_case(name)));
            let kept = up.iter().any(|(n, v)| n == name && v == value);
            if lower.starts_with("x-") && !listed {
                prop_assert!(kept, "{} dropped", name);
            } else if !lower.starts_with("x-") {
                prop_assert!(!kept, "{} forwarded", name);
            }
        }
        prop_assert_eq!(up.last().map(|(n, v)| (n.as_str(), v.as_str())), Some(("X-Forwarded-Proto", "http")));
    }

    #[test]
    fn a_chunked_body_with_one_broken_chunk_gives_that_chunks_error(
        body in prop::collection::vec(any::<u8>(), 1..600),
        sizes in prop::collection::vec(1usize..80, 1..20),
        extensions in prop::collection::vec(prop::option::of("[a-z]{1,6}(=[a-z0-9]{1,6})?"), 1..20),
        which in any::<prop::sample::Index>(),
        kind in 0u8..5,
        zeros in 17usize..40,
    ) {
        let Encoded { wire, chunks } = encode_chunked(&body, &sizes, &extensions, false);
        let (line, data, n) = chunks[which.index(chunks.len())];
        let defect = match kind {
            0 => ChunkDefect::NoSize,
            1 => ChunkDefect::LongSize(zeros),
            2 => ChunkDefect::SpaceAfterSize,
            3 => ChunkDefect::BareLf,
            _ => ChunkDefect::DataLonger,
        };
        // The byte past the declared size must not be a CR, or it would end the data
        // as a CRLF would begin to.
        prop_assume!(
            !matches!(defect, ChunkDefect::DataLonger) || (n >= 2 && wire[data + n - 1] != b'\r')
        );
        let size_line = &wire[line..data];
        let digits = size_line
            .iter()
            .position(|b| !b.is_ascii_hexdigit())
            .expect("a size line ends in CRLF");
        let (size, after) = size_line.split_at(digits);
        let broken_line: Vec<u8> = match defect {
            ChunkDefect::NoSize => after.to_vec(),
            ChunkDefect::LongSize(width) => {
                // Zeros in front: the value is the same, the digits too many.
                let mut l = vec![b'0'; width - size.len()];
                l.extend_from_slice(size_line);
                l
            }
            ChunkDefect::SpaceAfterSize => [size, b" ", after].concat(),
            ChunkDefect::BareLf => [size, b"\n"].concat(),
            ChunkDefect::DataLonger => [format!("{:x}", n - 1).as_bytes(), after].concat(),
        };
        let broken = [&wire[..line], &broken_line, &wire[data..], b"0\r\n\r\n"].concat();
        let mut decoder = chunked::Decoder::default();
        let mut out = Vec::new();
        let got = decoder.feed(&broken, &mut out);
        prop_assert_eq!(got, Err(chunked::ChunkError(defect.error())));
        // What came before the broken chunk was decoded as sent, and nothing after it.
        let before: usize = chunks.iter().take_while(|c| c.0 < line).map(|c| c.2).sum();
        prop_assert!(out.starts_with(&body[..before]));
        prop_assert!(out.len() <= before + n);
    }

    #[test]
    fn the_model_a_body_names_is_found_exactly(
        model in "\\PC{0,40}",
        fields in fields(),
        route in prop::sample::select(MODEL_ROUTES),
        space in "[ \t\r\n]{0,3}",
    ) {
        let body = [space.as_bytes(), &body_with(Some(json!(model)), fields)].concat();
        prop_assert_eq!(relay::requested_model("POST", route, &body), Ok(Some(model.clone())));
        // Off the model routes the model is found the same way.
        prop_assert_eq!(relay::requested_model("POST", "/v1/other?x=1", &body), Ok(Some(model)));
    }

    #[test]
    fn a_body_without_a_model_names_none(
        null in any::<bool>(),
        fields in fields(),
        route in prop::sample::select(MODEL_ROUTES),
    ) {
        let body = body_with(null.then_some(Value::Null), fields);
        prop_assert_eq!(relay::requested_model("POST", route, &body), Ok(None));
    }

    #[test]
    fn a_model_that_is_not_a_string_is_refused_on_the_model_routes(
        model in prop_oneof![
            any::<i64>().prop_map(|n| json!(n)),
            any::<bool>().prop_map(Value::Bool),
            prop::collection::vec(json_leaf(), 0..3).prop_map(Value::Array),
            fields().prop_map(|f| Value::Object(f.into_iter().collect())),
        ],
        fields in fields(),
        route in prop::sample::select(MODEL_ROUTES),
    ) {
        let body = body_with(Some(model), fields);
        let got = relay::requested_model("POST", route, &body);
        prop_assert!(matches!(got, Err(RouterError::BadRequest(_))), "{:?}", got);
    }

    #[test]
    fn a_body_that_is_not_a_json_object_is_refused_on_the_model_routes_only(
        body in prop_oneof![
            // Anything that does not start with `{`.
            prop::collection::vec(any::<u8>(), 0..64)
                .prop_filter("not an object", |b| b.iter().find(|c| !c.is_ascii_whitespace()) != Some(&b'{')),
            // A JSON value of another kind.
            json_leaf().prop_map(|v| serde_json::to_vec(&v).expect("json")),
            // An object cut short: every strict prefix of one is invalid JSON.
            ("\\PC{0,20}", fields(), any::<prop::sample::Index>()).prop_map(|(model, fields, at)| {
                let whole = body_with(Some(json!(model)), fields);
                whole[..1 + at.index(whole.len() - 1)].to_vec()
            }),
        ],
        route in prop::sample::select(MODEL_ROUTES),
    ) {
        let got = relay::requested_model("POST", route, &body);
        prop_assert!(matches!(got, Err(RouterError::BadRequest(_))), "{:?}", got);
        prop_assert_eq!(relay::requested_model("POST", "/v1/other?x=1", &body), Ok(None));
        prop_assert_eq!(relay::requested_model("GET", "/v1/chat/completions", &body), Ok(None));
    }

    #[test]
    fn reading_the_prompt_never_changes_the_verdict_on_a_body(
        model in prop_oneof![json_leaf(), "\\PC{0,12}".prop_map(Value::String)],
        fields in fields(),
        messages in prop_oneof![
            json_leaf(),
            prop::collection::vec(
                (json_leaf(), prop_oneof![json_leaf(), Just(json!([{"type": "text", "text": "hi"}]))])
                    .prop_map(|(role, content)| json!({"role": role, "content": content})),
                0..4,
            ).prop_map(Value::Array),
        ],
        key in prop::sample::select(&["messages", "prompt", "input", "tools", "system"][..]),
        route in prop::sample::select(&["/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages"][..]),
    ) {
        let mut fields = fields;
        fields.insert(key.to_owned(), messages);
        let body = body_with(Some(model), fields);
        let with_prompt = relay::requested("POST", route, &body, true).map(|(model, _)| model);
        prop_assert_eq!(with_prompt, relay::requested_model("POST", route, &body));
    }

    #[test]
    fn the_key_check_accepts_bearer_and_exactly_a_key(
        (keys, c) in prop::collection::vec("sk-[a-z0-9]{1,12}", 1..4).prop_flat_map(credentials),
    ) {
        let header = format!("{}{}{}{}{}", c.lead, c.scheme, c.separator, c.token, c.trail);
        let secrets: Vec<auth::Secret> = keys.iter().map(auth::Secret::new).collect();
        let expected = c.scheme_ok
            && !c.separator.is_empty()
            && c.separator.bytes().all(|b| b == b' ')
            && keys.contains(&c.token);
        prop_assert_eq!(auth::authorized(Some(&header), secrets.iter()), expected, "{:?}", header);
        prop_assert!(!auth::authorized(None, secrets.iter()));
    }

    #[test]
    fn the_key_check_refuses_any_header_without_the_key(
        header in "\\PC{0,64}",
        key in "[!-~]{1,16}",
    ) {
        let keys = [auth::Secret::new(key.clone())];
        if !header.contains(&key) {
            prop_assert!(!auth::authorized(Some(&header), keys.iter()), "{:?}", header);
        }
        let bearer = format!("Bearer {key}");
        prop_assert!(auth::authorized(Some(&bearer), keys.iter()), "{:?}", bearer);
    }
}
