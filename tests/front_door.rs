//! The front door: how the router's own HTTP/1.1 server reads what clients send, as
//! a specification run against the real router on 127.0.0.1 over raw sockets.
//!
//! The rule behind every case: a request the router could read differently from a
//! backend or another proxy is refused, with exactly one reply that says
//! `Connection: close`, and then the connection ends; so whatever followed the refused
//! request on the connection (a second, smuggled request) is never read as a request,
//! never answered and never forwarded. Each such case checks all three: the one reply,
//! the end of the connection, and what the backend saw (a recording backend that keeps
//! every request it gets, or the mock's counters).
//!
//! The recording backend answers the router's model fetches itself; those are told apart
//! from the test's traffic by path, and active health checks and metrics scrapes are off
//! in every router here so that nothing else reaches it.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::{
    admitted, chat_for, proc_status, servers_toml, wait_until, Conn, FakeBackend, Mock, Resp,
    Router, CHAT, SOON,
};

/// The read timeout while waiting for the end of a connection: how often the wait
/// looks at its deadline.
const POLL: Duration = Duration::from_millis(100);

/// The client key of the routers that require one.
const KEY: &str = "front-door-key";

/// A complete request that follows the one under test on the same connection, on a
/// path the router would forward: if it ever reaches the backend, the router read it
/// as a request of its own.
const AFTER: &str = "GET /v1/smuggled HTTP/1.1\r\nHost: x\r\nX-Smuggled: after\r\n\r\n";

/// A complete request carried inside a body, on one of the router's own paths.
const INNER: &str = "GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Smuggled: inner\r\n\r\n";

const MIB: usize = 1024 * 1024;

// ---------------------------------------------------------------- the recording backend

/// One request as the recording backend received it.
#[derive(Debug, Clone)]
struct Seen {
    /// The request line and header lines, CRLFs included.
    head: String,
    /// The first `BODY_KEPT` bytes of the body (decoded, if it came chunked).
    body: Vec<u8>,
    body_len: u64,
}

/// How much of each body the recorder keeps: enough for every body compared here,
/// little enough that 31 MiB bodies cost the test nothing.
const BODY_KEPT: usize = 64 * 1024;

impl Seen {
    fn request_line(&self) -> &str {
        self.head.lines().next().unwrap_or("")
    }

    fn path(&self) -> &str {
        self.request_line().split(' ').nth(1).unwrap_or("")
    }

    /// The values of the header `name`, compared without case.
    fn header(&self, name: &str) -> Vec<String> {
        self.head
            .lines()
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .filter(|(n, _)| n.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_owned())
            .collect()
    }

    /// The router's own model fetch (or a health probe), not the test's traffic.
    fn is_probe(&self) -> bool {
        let lower = self.head.to_ascii_lowercase();
        self.request_line().starts_with("GET ")
            && ["/v1/models", "/health", "/metrics"]
                .iter()
                .any(|p| self.path().ends_with(p))
            && !lower.contains("x-smuggled")
            && !lower.contains("x-control")
    }
}

/// What the recording backend writes back, and whether it then closes.
struct Reply {
    bytes: Vec<u8>,
    close: bool,
}

fn json_reply(body: &str) -> Reply {
    Reply {
        bytes: format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
        close: false,
    }
}

/// The recorder's usual answers: a model list, a health document, and for anything
/// else a small JSON object saying how long the body was.
fn plain_answer(seen: &Seen) -> Reply {
    let path = seen.path();
    if path.ends_with("/v1/models") {
        json_reply(r#"{"object":"list","data":[{"id":"rec-model","object":"model"}]}"#)
    } else if path.ends_with("/health") {
        json_reply(r#"{"status":"ok"}"#)
    } else {
        json_reply(&format!(r#"{{"ok":true,"body_bytes":{}}}"#, seen.body_len))
    }
}

/// A backend on 127.0.0.1 that records every request it receives, on any connection.
struct Recorder {
    backend: FakeBackend,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Recorder {
    fn start() -> Recorder {
        Recorder::answering(plain_answer)
    }

    fn answering(answer: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> Recorder {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let backend = {
            let seen = Arc::clone(&seen);
            FakeBackend::start(move |stream| {
                let _ = serve_recorded(stream, &seen, &answer);
            })
        };
        Recorder { backend, seen }
    }

    fn url(&self) -> &str {
        &self.backend.url
    }

    /// Every request but the router's own model fetches, in the order received.
    fn requests(&self) -> Vec<Seen> {
        self.seen
            .lock()
            .expect("seen")
            .iter()
            .filter(|s| !s.is_probe())
            .cloned()
            .collect()
    }

    /// Every request, model fetches included.
    fn everything(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }

    /// Panics unless the backend received none of the test's traffic.
    fn assert_nothing(&self, what: &str) {
        let got = self.requests();
        assert!(
            got.is_empty(),
            "{what}: the backend received {} request(s): {:?}",
            got.len(),
            got.iter().map(|s| s.head.clone()).collect::<Vec<_>>()
        );
    }

    /// Sends one ordinary request through `router` and checks that it, and only it,
    /// reached the backend: so the recorder did see the traffic of the cases before
    /// it, and none of it got through.
    fn assert_only_control_gets_through(&self, router: &Router, auth: bool) {
        self.assert_nothing("before the control request");
        let mut headers = vec![("X-Control", "1")];
        let bearer = format!("Bearer {KEY}");
        if auth {
            headers.push(("Authorization", bearer.as_str()));
        }
        let resp = crate::support::request(router.addr, "POST", "/v1/other", &headers, b"ctl");
        assert_eq!(resp.status, 200, "the control request: {}", resp.text());
        let got = self.requests();
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(got[0].head.to_ascii_lowercase().contains("x-control: 1"));
        assert_eq!(got[0].body, b"ctl");
    }
}

fn serve_recorded(
    stream: TcpStream,
    seen: &Mutex<Vec<Seen>>,
    answer: &(impl Fn(&Seen) -> Reply + ?Sized),
) -> io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    while let Some(request) = read_request(&mut reader)? {
        seen.lock().expect("seen").push(request.clone());
        let reply = answer(&request);
        out.write_all(&reply.bytes)?;
        if reply.close {
            let _ = out.shutdown(Shutdown::Both);
            return Ok(());
        }
    }
    Ok(())
}

/// Reads one request off the backend connection; `None` at a clean end.
fn read_request(reader: &mut impl BufRead) -> io::Result<Option<Seen>> {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return if head.is_empty() {
                Ok(None)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
        let end = line == "\r\n";
        head.push_str(&line);
        if end {
            break;
        }
    }
    let mut seen = Seen {
        head,
        body: Vec::new(),
        body_len: 0,
    };
    let length = seen.header("content-length").first().cloned();
    let chunked = seen
        .header("transfer-encoding")
        .iter()
        .any(|v| v.eq_ignore_ascii_case("chunked"));
    if chunked {
        loop {
            let mut line = String::new();
            reader.read_line(&mut line)?;
            let size = line.trim_end().split(';').next().unwrap_or("");
            let size = u64::from_str_radix(size.trim(), 16)
                .map_err(|_| io::Error::other(format!("bad chunk size {line:?}")))?;
            if size == 0 {
                // Trailers up to the empty line.
                loop {
                    line.clear();
                    if reader.read_line(&mut line)? == 0 || line == "\r\n" {
                        break;
                    }
                }
                break;
            }
            take_body(reader, size, &mut seen)?;
            let mut crlf = [0u8; 2];
            reader.read_exact(&mut crlf)?;
        }
    } else if let Some(length) = length {
        let n: u64 = length
            .parse()
            .map_err(|_| io::Error::other("bad content-length"))?;
        take_body(reader, n, &mut seen)?;
    }
    Ok(Some(seen))
}

fn take_body(reader: &mut impl Read, n: u64, seen: &mut Seen) -> io::Result<()> {
    let mut left = n;
    let mut buf = vec![0u8; 64 * 1024];
    while left > 0 {
        let want = buf.len().min(left as usize);
        let got = reader.read(&mut buf[..want])?;
        if got == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let keep = got.min(BODY_KEPT.saturating_sub(seen.body.len()));
        seen.body.extend_from_slice(&buf[..keep]);
        seen.body_len += got as u64;
        left -= got as u64;
    }
    Ok(())
}

// ---------------------------------------------------------------- routers

/// `[config]` lines that keep a backend's traffic to what the test sends (and the
/// model fetch), then `extra`.
fn quiet(extra: &str) -> String {
    format!("enable_active_health_check = false\nbackend_metrics_interval = 0\n{extra}")
}

/// A router in front of the one backend at `url`.
fn router_for(url: &str, extra: &str) -> Router {
    Router::start(&servers_toml(&[(url, 8)], &quiet(extra)))
}

// ---------------------------------------------------------------- the client side

/// What one connection got back for the bytes sent on it.
struct Outcome {
    resp: Resp,
    /// Everything after the first reply, up to the end of the connection.
    rest: Vec<u8>,
    /// The router ended the connection (EOF or reset) within `SOON` of the reply.
    closed: bool,
    /// From the first byte sent to the whole first reply.
    took: Duration,
}

impl Outcome {
    /// Replies on the connection: the first, and any other status line after it.
    fn replies(&self) -> usize {
        1 + count(&self.rest, b"HTTP/1.")
    }

    fn says_close(&self) -> bool {
        self.resp
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }

    /// The refusal contract: `status`, `Connection: close`, one reply, then the end.
    fn assert_refused(&self, what: &str, status: u16) {
        assert_eq!(self.resp.status, status, "{what}: {}", self.resp.text());
        assert!(self.says_close(), "{what}: no Connection: close");
        assert_eq!(
            self.replies(),
            1,
            "{what}: more than one reply; after the first: {:?}",
            String::from_utf8_lossy(&self.rest)
        );
        assert!(self.closed, "{what}: the connection stayed open");
    }

    fn row(&self, what: &str) {
        eprintln!(
            "| {what:<52} | {:>6} | {:>7} | {:<5} | {:>5} ms |",
            self.resp.status,
            self.replies(),
            if self.closed { "EOF" } else { "open" },
            self.took.as_millis()
        );
    }
}

fn table_header(title: &str) {
    eprintln!("{title}");
    eprintln!(
        "| {:<52} | {:>6} | {:>7} | {:<5} | {:>8} |",
        "case", "status", "replies", "end", "reply in"
    );
}

fn count(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .filter(|w| *w == needle)
        .count()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    count(haystack, needle) > 0
}

/// Sends `raw` on a new connection, reads the reply, then reads on until the router
/// ends the connection (or `SOON` passes).
fn exchange(addr: SocketAddr, raw: &[u8]) -> Outcome {
    let mut conn = Conn::open(addr);
    conn.stream.set_read_timeout(Some(SOON)).expect("timeout");
    let started = Instant::now();
    // The router may refuse and close before it has read all of it: a write that
    // fails is part of what is tested, not a failure of the test.
    let _ = conn.stream.write_all(raw);
    let resp = conn
        .read_response(false)
        .unwrap_or_else(|e| panic!("no reply to {:?}: {e}", String::from_utf8_lossy(raw)));
    let took = started.elapsed();
    let (rest, closed) = rest_of(&mut conn);
    Outcome {
        resp,
        rest,
        closed,
        took,
    }
}

/// Reads what is left on `conn` until the router ends it, within `SOON`.
fn rest_of(conn: &mut Conn) -> (Vec<u8>, bool) {
    conn.stream.set_read_timeout(Some(POLL)).expect("timeout");
    read_until_closed(&mut conn.reader, SOON)
}

/// Reads until the end of the stream or a reset (`true`), or until `within` passes
/// with the connection still open (`false`). The socket's read timeout must be short
/// (`POLL`), so that the deadline is looked at.
fn read_until_closed(reader: &mut impl Read, within: Duration) -> (Vec<u8>, bool) {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return (got, true),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return (got, true),
        }
        if Instant::now() >= deadline {
            return (got, false);
        }
    }
}

/// One chunk of a chunked body.
fn chunk(data: &str) -> String {
    format!("{:x}\r\n{data}\r\n", data.len())
}

/// A POST on `conn`, kept alive; returns its reply.
fn post_on(conn: &mut Conn, path: &str, body: &[u8]) -> Resp {
    conn.send("POST", path, &[], body, false);
    conn.read_response(false).expect("a reply")
}

// ---------------------------------------------------------------- 1. smuggling

#[test]
fn smuggling_attempts_get_one_reply_then_the_end_and_never_reach_the_backend() {
    let rec = Recorder::start();
    let router = router_for(rec.url(), &format!("api_keys = [\"{KEY}\"]"));
    let auth = format!("Authorization: Bearer {KEY}\r\n");
    let post = |path: &str, extra: &str, body: &str| {
        format!("POST {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n{body}")
    };
    let chunked = "Transfer-Encoding: chunked\r\n";
    let inner_chunked = format!("{}0\r\n\r\n", chunk(INNER));
    let inner_len = format!("Content-Length: {}\r\n", INNER.len());
    // (what, request (AFTER follows each), status)
    let cases: Vec<(&str, String, u16)> = vec![
        (
            "chunked POST without a key, body holds a request",
            post(CHAT, chunked, &inner_chunked),
            401,
        ),
        (
            "POST without a key, Content-Length body is a request",
            post(CHAT, &inner_len, INNER),
            401,
        ),
        (
            "POST /health with a chunked body",
            post("/health", chunked, &inner_chunked),
            405,
        ),
        (
            "GET /livez with a chunked body",
            format!("GET /livez HTTP/1.1\r\nHost: x\r\n{chunked}\r\n{inner_chunked}"),
            200,
        ),
        (
            "Content-Length: 102, 102",
            post(
                "/v1/other",
                &format!("{auth}Content-Length: 102, 102\r\n"),
                INNER,
            ),
            400,
        ),
        (
            "Content-Length: 0x65",
            post(
                "/v1/other",
                &format!("{auth}Content-Length: 0x65\r\n"),
                INNER,
            ),
            400,
        ),
        (
            "two Transfer-Encoding: chunked",
            post(
                "/v1/other",
                &format!("{auth}{chunked}{chunked}"),
                &inner_chunked,
            ),
            400,
        ),
        (
            "Transfer-Encoding: gzip, chunked",
            post(
                "/v1/other",
                &format!("{auth}Transfer-Encoding: gzip, chunked\r\n"),
                &inner_chunked,
            ),
            400,
        ),
        (
            "Content-Length and Transfer-Encoding",
            post(
                "/v1/other",
                &format!("{auth}Content-Length: 5\r\n{chunked}"),
                &format!("0\r\n\r\n{INNER}"),
            ),
            400,
        ),
        (
            "chunk size zz",
            post(
                "/v1/other",
                &format!("{auth}{chunked}"),
                &format!("zz\r\n{INNER}\r\n0\r\n\r\n"),
            ),
            400,
        ),
        (
            "last chunk 0 without its CRLF, then a request",
            post(
                "/v1/other",
                &format!("{auth}{chunked}"),
                &format!("{}0\r\n{INNER}", chunk("hello")),
            ),
            400,
        ),
        (
            "BREW with a body that is a request",
            format!("BREW /v1/other HTTP/1.1\r\nHost: x\r\n{auth}{inner_len}\r\n{INNER}"),
            501,
        ),
        (
            "CONNECT with a body that is a request",
            format!(
                "CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1:443\r\n{auth}{inner_len}\r\n{INNER}"
            ),
            501,
        ),
    ];
    table_header("smuggling (each followed by a complete GET on the same connection)");
    for (what, raw, status) in &cases {
        let outcome = exchange(router.addr, format!("{raw}{AFTER}").as_bytes());
        outcome.row(what);
        outcome.assert_refused(what, *status);
        rec.assert_nothing(what);
    }
    rec.assert_only_control_gets_through(&router, true);
}

// ---------------------------------------------------------------- 2, 3. upgrades

#[test]
fn an_h2c_upgrade_is_ignored_and_never_forwarded() {
    let rec = Recorder::start();
    let router = router_for(rec.url(), "");
    let mut conn = Conn::open(router.addr);
    conn.send_raw(
        b"POST /v1/other HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n\
          Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nContent-Length: 5\r\n\r\nhello",
    );
    let first = conn.read_response(false).expect("a reply");
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(first.header("upgrade"), None);
    assert_ne!(first.header("connection"), Some("close"));
    // The same connection serves the next request as HTTP/1.1.
    let second = post_on(&mut conn, "/v1/other", b"again");
    assert_eq!(second.status, 200, "{}", second.text());
    let got = rec.requests();
    assert_eq!(got.len(), 2, "{got:?}");
    let head = got[0].head.to_ascii_lowercase();
    assert!(
        !head.contains("upgrade") && !head.contains("http2-settings"),
        "the backend got the upgrade: {head}"
    );
    assert_eq!(
        (&got[0].body[..], &got[1].body[..]),
        (&b"hello"[..], &b"again"[..])
    );
}

#[test]
fn a_websocket_upgrade_is_refused_and_the_connection_closed() {
    let rec = Recorder::start();
    let router = router_for(rec.url(), "");
    // Only `/v1/realtime` is tunnelled (tests/routes.rs); anywhere else is refused.
    let raw = format!(
        "GET /v1/chat/completions HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n{AFTER}"
    );
    let outcome = exchange(router.addr, raw.as_bytes());
    outcome.assert_refused("a WebSocket upgrade", 400);
    assert_eq!(
        outcome.resp.json()["error"]["code"],
        "upgrade_not_supported"
    );
    rec.assert_only_control_gets_through(&router, false);
}

// ---------------------------------------------------------------- 4. lenient forms

#[test]
fn lenient_forms_are_refused_and_never_forwarded() {
    let rec = Recorder::start();
    let router = router_for(rec.url(), "");
    let get = |extra: &str| format!("GET /v1/smuggled HTTP/1.1\r\nHost: x\r\n{extra}\r\n");
    let chunked = |size_line: &str| {
        format!(
            "POST /v1/other HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
             {size_line}\r\n{}\r\n0\r\n\r\n",
            "a".repeat(0x24)
        )
    };
    let te = |value: &str| {
        format!(
            "POST /v1/other HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: {value}\r\n\r\n{}0\r\n\r\n",
            chunk("hello")
        )
    };
    let cases: Vec<(&str, String)> = vec![
        ("obs-fold continuation line", get("X-A: 1\r\n folded\r\n")),
        ("space before the colon", get("X-A : 1\r\n")),
        ("VT before chunked", te("\x0bchunked")),
        ("FF after chunked", te("chunked\x0c")),
        (
            "bare LF line endings",
            "GET /v1/smuggled HTTP/1.1\nHost: x\nX-Smuggled: lf\n\n".to_owned(),
        ),
        (
            "bare LF inside a chunk extension",
            "POST /v1/other HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
             5;a\nb\r\nhello\r\n0\r\n\r\n"
                .to_owned(),
        ),
        ("chunk size +24", chunked("+24")),
        ("chunk size ' 24'", chunked(" 24")),
        ("chunk size '24 '", chunked("24 ")),
        (
            "chunk size with 40 leading zeros",
            chunked(&format!("{}24", "0".repeat(40))),
        ),
        (
            "text after HTTP/1.1 in the request line",
            "GET /v1/smuggled HTTP/1.1 extra\r\nHost: x\r\n\r\n".to_owned(),
        ),
        ("control byte in a header value", get("X-A: a\x01b\r\n")),
        ("NUL in a header value", get("X-A: a\x00b\r\n")),
    ];
    table_header("lenient forms");
    for (what, raw) in &cases {
        let outcome = exchange(router.addr, format!("{raw}{AFTER}").as_bytes());
        outcome.row(what);
        outcome.assert_refused(what, 400);
        rec.assert_nothing(what);
    }
    rec.assert_only_control_gets_through(&router, false);
}

// ---------------------------------------------------------------- 5. Host and version

#[test]
fn host_and_version_are_checked() {
    let rec = Recorder::start();
    let router = router_for(rec.url(), "");
    let cases: Vec<(&str, String, u16)> = vec![
        (
            "HTTP/1.1 without Host",
            "GET /v1/smuggled HTTP/1.1\r\n\r\n".into(),
            400,
        ),
        (
            "two Host headers",
            "GET /v1/smuggled HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".into(),
            400,
        ),
        (
            "HTTP/2.0 request line",
            "GET /v1/smuggled HTTP/2.0\r\nHost: x\r\n\r\n".into(),
            505,
        ),
        (
            "the HTTP/2 connection preface",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".into(),
            505,
        ),
        // The router speaks HTTP/1.0 and 1.1 only (`client::head`); a later 1.x is
        // refused rather than guessed at.
        (
            "HTTP/1.2 request line",
            "GET /v1/smuggled HTTP/1.2\r\nHost: x\r\n\r\n".into(),
            505,
        ),
    ];
    table_header("Host and version");
    for (what, raw, status) in &cases {
        let outcome = exchange(router.addr, format!("{raw}{AFTER}").as_bytes());
        outcome.row(what);
        outcome.assert_refused(what, *status);
        assert!(
            outcome.took < Duration::from_secs(2),
            "{what}: answered after {:?}",
            outcome.took
        );
        rec.assert_nothing(what);
    }
    // HTTP/1.0 may omit Host; without keep-alive the connection ends after the reply.
    let old = exchange(router.addr, b"GET /livez HTTP/1.0\r\n\r\n");
    assert_eq!(old.resp.status, 200, "{}", old.resp.text());
    assert!(old.closed && old.replies() == 1);
    rec.assert_only_control_gets_through(&router, false);
}

// ---------------------------------------------------------------- 6. trailers

#[test]
fn a_chunked_body_with_trailers_reaches_the_backend_whole_and_without_them() {
    let rec = Recorder::start();
    let router = router_for(rec.url(), "");
    let mut conn = Conn::open(router.addr);
    conn.send_raw(
        format!(
            "POST /v1/other HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n\
             {}{}0\r\nX-Checksum: trailer-value\r\n\r\n",
            chunk("hello"),
            chunk(" world")
        )
        .as_bytes(),
    );
    let resp = conn.read_response(false).expect("a reply");
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_ne!(resp.header("connection"), Some("close"));
    // The body was read whole, so the connection carries the next request.
    assert_eq!(post_on(&mut conn, "/v1/other", b"next").status, 200);
    let got = rec.requests();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0].body, b"hello world");
    assert_eq!(got[0].body_len, 11);
    let head = got[0].head.to_ascii_lowercase();
    assert!(
        !head.contains("trailer") && !head.contains("x-checksum"),
        "{head}"
    );
}

// ---------------------------------------------------------------- 7. no Server header

#[test]
fn replies_carry_no_server_header() {
    let mock = Mock::start(&[]);
    let router = Router::start(&servers_toml(&[(&mock.url, 4)], ""));
    let mut conn = Conn::open(router.addr);
    for path in ["/livez", "/health", "/readyz", "/v1/models", "/metrics"] {
        conn.send("GET", path, &[], b"", false);
        let resp = conn.read_response(false).expect("a reply");
        assert_eq!(resp.status, 200, "{path}");
        assert_eq!(resp.header("server"), None, "{path}: {:?}", resp.headers);
    }
    let proxied = post_on(&mut conn, CHAT, chat_for("mock-model").as_bytes());
    assert_eq!(proxied.status, 200, "{}", proxied.text());
    assert_eq!(proxied.header("server"), None, "{:?}", proxied.headers);
    let own_error = post_on(&mut conn, "/health", b"x");
    assert_eq!(own_error.status, 405);
    assert_eq!(own_error.header("server"), None, "{:?}", own_error.headers);
    let refused = exchange(router.addr, b"GET / HTTP/1.1\r\n\r\n");
    refused.assert_refused("no Host", 400);
    assert_eq!(refused.resp.header("server"), None);
}

// ---------------------------------------------------------------- 8. paths

#[test]
fn paths_that_normalise_elsewhere_are_refused_and_a_url_prefix_never_gets_dot_segments() {
    let rec = Recorder::start();
    let prefixed = format!("{}/tenant-a", rec.url());
    let router = router_for(&prefixed, "");
    let paths = [
        ("GET", "/v1/../v1/chat/completions"),
        ("POST", "/v1/../v1/chat/completions"),
        ("GET", "/./v1/models"),
        ("GET", "//v1/models"),
        ("POST", "/%761/chat/completions"),
        ("POST", "/v1/chat%2Fcompletions"),
        ("GET", "/v1/models#frag"),
        ("GET", "/v1/../../admin"),
        ("GET", "/v1/%2e%2e/%2e%2e/admin"),
        ("GET", "/.."),
    ];
    table_header("paths (backend at .../tenant-a)");
    for (method, path) in paths {
        let body = if method == "POST" {
            "Content-Length: 2\r\n\r\n{}".to_owned()
        } else {
            "\r\n".to_owned()
        };
        let raw =
            format!("{method} {path} HTTP/1.1\r\nHost: x\r\nX-Smuggled: path\r\n{body}{AFTER}");
        let what = format!("{method} {path}");
        let outcome = exchange(router.addr, raw.as_bytes());
        outcome.row(&what);
        outcome.assert_refused(&what, 400);
        rec.assert_nothing(&what);
    }
    rec.assert_only_control_gets_through(&router, false);
    let got = rec.requests();
    assert_eq!(got[0].path(), "/tenant-a/v1/other");
    for seen in rec.everything() {
        let line = seen.request_line();
        assert!(
            line.starts_with("GET /tenant-a/") || line.starts_with("POST /tenant-a/"),
            "{line}"
        );
        for bad in ["..", "%2e", "%2E", "//"] {
            assert!(!seen.path().contains(bad), "the backend got {line}");
        }
    }
}

// ---------------------------------------------------------------- 9. a 101 from the backend

#[test]
fn a_backend_that_switches_protocols_gets_the_client_a_502() {
    let rec = Recorder::answering(|seen| {
        if seen.request_line().starts_with("POST ") {
            Reply {
                bytes: b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
                    .to_vec(),
                close: false,
            }
        } else {
            plain_answer(seen)
        }
    });
    let router = router_for(rec.url(), "");
    let mut conn = Conn::open(router.addr);
    conn.stream.set_read_timeout(Some(SOON)).expect("timeout");
    conn.send("POST", "/v1/other", &[], b"hello", true);
    let resp = conn.read_response(false).expect("a reply");
    assert_eq!(resp.status, 502, "{}", resp.text());
    assert_eq!(resp.header("upgrade"), None);
    let (rest, closed) = rest_of(&mut conn);
    assert!(closed);
    assert!(
        !contains(&rest, b"HTTP/1."),
        "{:?}",
        String::from_utf8_lossy(&rest)
    );
    assert_eq!(rec.requests().len(), 1);
}

// ---------------------------------------------------------------- 10. forwarded headers

#[test]
fn x_forwarded_for_is_appended_and_x_forwarded_proto_set() {
    let rec = Recorder::start();
    let router = router_for(rec.url(), "");
    let resp = crate::support::request(
        router.addr,
        "POST",
        "/v1/other",
        &[
            ("X-Forwarded-For", "10.1.2.3"),
            ("X-Forwarded-Proto", "https"),
        ],
        b"{}",
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
    let got = rec.requests();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].header("x-forwarded-for"), ["10.1.2.3, 127.0.0.1"]);
    assert_eq!(got[0].header("x-forwarded-proto"), ["http"]);
}

// ---------------------------------------------------------------- 11. per-address cap

#[test]
fn max_connections_per_ip_refuses_the_third_and_serves_the_first_two() {
    let rec = Recorder::start();
    let router = router_for(rec.url(), "max_connections_per_ip = 2");
    let mut first = admitted(router.addr);
    let mut second = admitted(router.addr);
    for _ in 0..3 {
        // The router once stopped accepting altogether here: the `per_ip` close reason
        // was missing from the metrics, whose debug assertion killed the accept thread.
        let mut third = TcpStream::connect(router.addr)
            .unwrap_or_else(|e| panic!("connect: {e}; log:\n{}", router.log()));
        let _ = third.write_all(
            b"POST /v1/other HTTP/1.1\r\nHost: x\r\nX-Smuggled: third\r\nContent-Length: 2\r\n\r\n{}",
        );
        third
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let started = Instant::now();
        let (got, closed) = read_until_closed(&mut third, SOON);
        assert!(closed, "a third connection from 127.0.0.1 stayed open");
        assert!(started.elapsed() < Duration::from_secs(2));
        // The router closes it as soon as it is accepted, without a reply.
        assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
    }
    for conn in [&mut first, &mut second] {
        assert_eq!(post_on(conn, "/v1/other", b"held").status, 200);
    }
    assert_eq!(rec.requests().len(), 2, "the third's request was forwarded");
    second.send("GET", "/metrics", &[], b"", false);
    let metrics = second.read_response(false).expect("metrics").text();
    let refused = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("vllm_router_client_connections_closed_total{reason=\"per_ip\"}")
        })
        .and_then(|v| v.trim().parse::<f64>().ok());
    assert_eq!(refused, Some(3.0), "the refusals are counted");
    // One leaves, and a new one gets its place.
    drop(first);
    let mut next = admitted(router.addr);
    assert_eq!(post_on(&mut next, "/v1/other", b"next").status, 200);
    assert_eq!(post_on(&mut second, "/v1/other", b"still").status, 200);
    assert_eq!(rec.requests().len(), 4);
}

// ---------------------------------------------------------------- 12. keep-alive

#[test]
fn three_posts_on_one_connection_are_all_served() {
    let rec = Recorder::start();
    let router = router_for(rec.url(), "");
    let mut conn = Conn::open(router.addr);
    let bodies = ["first body", "the second one", "3"];
    // Pipelined, in one write: each request's bytes after its body stay for the next.
    let raw: String = bodies
        .iter()
        .map(|b| {
            format!(
                "POST /v1/other HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{b}",
                b.len()
            )
        })
        .collect();
    conn.send_raw(raw.as_bytes());
    for body in bodies {
        let resp = conn.read_response(false).expect("a reply");
        assert_eq!(resp.status, 200, "{}", resp.text());
        assert_eq!(resp.header("connection"), None);
        assert_eq!(resp.json()["body_bytes"], body.len());
    }
    // And one more after them, sent on its own.
    assert_eq!(post_on(&mut conn, "/v1/other", b"fourth").status, 200);
    let got: Vec<Vec<u8>> = rec.requests().into_iter().map(|s| s.body).collect();
    assert_eq!(
        got,
        [&b"first body"[..], b"the second one", b"3", b"fourth"]
    );
}

// ---------------------------------------------------------------- 13, 14. huge heads

/// What a client that kept sending got back.
struct Blast {
    /// Bytes the router took before it stopped the client.
    sent: usize,
    /// Everything the client read until the end of the connection.
    reply: Vec<u8>,
    /// From the first byte to the end of the connection.
    took: Duration,
}

impl Blast {
    fn status(&self) -> Option<u16> {
        let text = String::from_utf8_lossy(&self.reply);
        text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
    }
}

/// Sends `start`, waits at `barrier`, then `fill` over and over until `limit` bytes
/// in all or the router stops reading; reads the reply meanwhile, on another thread,
/// since the router answers while the client is still sending.
fn blast(addr: SocketAddr, start: &[u8], fill: &[u8], limit: usize, barrier: &Barrier) -> Blast {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream.set_read_timeout(Some(POLL)).expect("timeout");
    let mut reader = stream.try_clone().expect("clone");
    let started = Instant::now();
    let read = thread::spawn(move || read_until_closed(&mut reader, Duration::from_secs(15)));
    let mut sent = 0;
    if stream.write_all(start).is_ok() {
        sent += start.len();
        barrier.wait();
        while sent < limit {
            match stream.write(fill) {
                Ok(n) => sent += n,
                Err(_) => break,
            }
        }
    } else {
        barrier.wait();
    }
    let (reply, closed) = read.join().expect("reader");
    assert!(closed, "the router kept the connection open");
    Blast {
        sent,
        reply,
        took: started.elapsed(),
    }
}

/// `n` bytes of header lines.
fn header_lines(n: usize) -> Vec<u8> {
    let line = format!("X-Pad: {}\r\n", "p".repeat(1014));
    line.repeat(n / line.len()).into_bytes()
}

fn hwm_kib(router: &Router) -> u64 {
    proc_status(router.pid(), "VmHWM")
}

#[test]
fn twenty_huge_heads_at_once_get_431_and_the_router_stays_small() {
    let rec = Recorder::start();
    let router = router_for(rec.url(), "");
    assert_eq!(router.get("/livez").status, 200);
    let before = hwm_kib(&router);
    const CLIENTS: usize = 20;
    let barrier = Arc::new(Barrier::new(CLIENTS));
    let fill = Arc::new(header_lines(64 * 1024));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (barrier, fill, addr) = (Arc::clone(&barrier), Arc::clone(&fill), router.addr);
            thread::spawn(move || {
                let start = format!("GET /v1/smuggled HTTP/1.1\r\nHost: x\r\nX-Client: {i}\r\n");
                blast(addr, start.as_bytes(), &fill, 32 * MIB, &barrier)
            })
        })
        .collect();
    let results: Vec<Blast> = clients
        .into_iter()
        .map(|c| c.join().expect("client"))
        .collect();
    let after = hwm_kib(&router);
    let growth = after.saturating_sub(before);
    let statuses: Vec<Option<u16>> = results.iter().map(Blast::status).collect();
    let most_sent = results.iter().map(|r| r.sent).max().unwrap_or(0);
    eprintln!(
        "20 x 32 MiB heads: VmHWM {before} KiB -> {after} KiB, growth {growth} KiB; \
         statuses {statuses:?}; the most any client got out: {most_sent} bytes; slowest {:?}",
        results.iter().map(|r| r.took).max().unwrap_or_default()
    );
    for (i, r) in results.iter().enumerate() {
        assert!(
            matches!(r.status(), Some(431) | None),
            "client {i}: {:?}",
            String::from_utf8_lossy(&r.reply)
        );
        assert!(count(&r.reply, b"HTTP/1.") <= 1, "client {i}: two replies");
        assert!(r.sent < 32 * MIB, "client {i}: the router read all 32 MiB");
    }
    assert!(
        statuses.iter().filter(|s| **s == Some(431)).count() >= CLIENTS / 2,
        "most clients should have read their 431: {statuses:?}"
    );
    assert!(
        growth < 16 * 1024,
        "VmHWM grew by {growth} KiB for 20 huge heads"
    );
    rec.assert_only_control_gets_through(&router, false);
}

#[test]
fn a_huge_header_line_or_target_is_refused_at_once() {
    let rec = Recorder::start();
    let router = router_for(rec.url(), "");
    let one = Barrier::new(1);
    let filler = vec![b'a'; 64 * 1024];
    let cases: [(&str, &[u8], usize, u16); 2] = [
        (
            "one header line of 256 MiB",
            b"GET /v1/smuggled HTTP/1.1\r\nHost: x\r\nX-Big: ",
            256 * MIB,
            431,
        ),
        ("a target of 64 MiB", b"GET /v1/", 64 * MIB, 414),
    ];
    for (what, start, limit, status) in cases {
        let r = blast(router.addr, start, &filler, limit, &one);
        eprintln!(
            "{what}: {:?} after {} bytes, in {:?}",
            r.status(),
            r.sent,
            r.took
        );
        assert_eq!(r.status(), Some(status), "{what}");
        assert_eq!(count(&r.reply, b"HTTP/1."), 1, "{what}");
        assert!(
            r.sent < 16 * MIB,
            "{what}: the router read {} bytes",
            r.sent
        );
        assert!(r.took < SOON, "{what}: took {:?}", r.took);
    }
    rec.assert_only_control_gets_through(&router, false);
}

#[test]
fn the_routers_own_endpoints_cap_heads_too() {
    let rec = Recorder::start();
    let router = router_for(rec.url(), "");
    let one = Barrier::new(1);
    let r = blast(
        router.addr,
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\n",
        &header_lines(64 * 1024),
        16 * MIB,
        &one,
    );
    assert_eq!(
        r.status(),
        Some(431),
        "{:?}",
        String::from_utf8_lossy(&r.reply)
    );
    assert_eq!(count(&r.reply, b"HTTP/1."), 1);
    assert!(r.sent < 16 * MIB && r.took < SOON);
}

// ---------------------------------------------------------------- 15, 16. bodies

/// What a client sending one large body got back.
struct Sent {
    status: u16,
    retry_after: Option<String>,
    replies: usize,
    closed: bool,
}

/// POSTs a body of `len` bytes (`Connection: close`), writing it on another thread, as
/// the router may answer before it has read it.
fn post_large(addr: SocketAddr, len: usize) -> Sent {
    let stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    stream
        .set_write_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut writer = stream.try_clone().expect("clone");
    let write = thread::spawn(move || {
        let head = format!(
            "POST /v1/other HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
        );
        writer.write_all(head.as_bytes())?;
        let piece = vec![b'b'; 64 * 1024];
        let mut left = len;
        while left > 0 {
            let n = left.min(piece.len());
            writer.write_all(&piece[..n])?;
            left -= n;
        }
        io::Result::Ok(())
    });
    let reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut conn = Conn { stream, reader };
    let resp = conn.read_response(false).expect("a reply");
    let (rest, closed) = rest_of(&mut conn);
    // A write cut off by the router's close is expected after a refusal.
    let _ = write.join().expect("writer");
    Sent {
        status: resp.status,
        retry_after: resp.header("retry-after").map(str::to_owned),
        replies: 1 + count(&rest, b"HTTP/1."),
        closed,
    }
}

#[test]
fn bodies_beyond_the_budget_wait_or_get_503_and_are_never_cut() {
    // Every request is held 4 s at the backend: the first two bodies take the whole
    // budget for that long, and the rest wait their 2 s for room, then are refused.
    let rec = Recorder::answering(|seen| {
        if seen.request_line().starts_with("POST ") {
            thread::sleep(Duration::from_secs(4));
        }
        plain_answer(seen)
    });
    let router = router_for(
        rec.url(),
        "max_body_bytes = 1048576\nmax_buffered_body_bytes = 2097152",
    );
    let clients: Vec<_> = (0..5)
        .map(|_| {
            let addr = router.addr;
            thread::spawn(move || post_large(addr, MIB))
        })
        .collect();
    let results: Vec<Sent> = clients
        .into_iter()
        .map(|c| c.join().expect("client"))
        .collect();
    let ok = results.iter().filter(|r| r.status == 200).count();
    let busy: Vec<&Sent> = results.iter().filter(|r| r.status == 503).collect();
    eprintln!(
        "5 x 1 MiB bodies, budget 2 MiB, backend 4 s: {ok} x 200, {} x 503",
        busy.len()
    );
    assert_eq!(
        (ok, busy.len()),
        (2, 3),
        "statuses {:?}",
        results.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    for r in &results {
        assert_eq!(r.replies, 1);
        assert!(r.closed);
    }
    for r in busy {
        assert_eq!(r.retry_after.as_deref(), Some("1"));
    }
    let got = rec.requests();
    assert_eq!(got.len(), ok, "only the served bodies reached the backend");
    for seen in &got {
        assert_eq!(seen.body_len, MIB as u64, "a body reached the backend cut");
    }
    // The budget is whole again.
    assert_eq!(post_large(router.addr, MIB).status, 200);
}

#[test]
fn twelve_bodies_of_31_mib_at_once_stay_within_the_body_budget() {
    let rec = Recorder::start();
    let router = Router::start(&servers_toml(&[(rec.url(), 8)], &quiet("")));
    router.wait_all_healthy();
    assert_eq!(router.get("/livez").status, 200);
    let before = hwm_kib(&router);
    const CLIENTS: usize = 12;
    let started = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let addr = router.addr;
            thread::spawn(move || post_large(addr, 31 * MIB))
        })
        .collect();
    let results: Vec<Sent> = clients
        .into_iter()
        .map(|c| c.join().expect("client"))
        .collect();
    let took = started.elapsed();
    let after = hwm_kib(&router);
    let growth = after.saturating_sub(before);
    let ok = results.iter().filter(|r| r.status == 200).count();
    let busy = results.iter().filter(|r| r.status == 503).count();
    eprintln!(
        "12 x 31 MiB bodies: VmHWM {before} KiB -> {after} KiB, growth {growth} KiB \
         ({} MiB); {ok} x 200, {busy} x 503, in {took:?}",
        growth / 1024
    );
    assert_eq!(
        ok + busy,
        CLIENTS,
        "{:?}",
        results.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    assert!(ok >= 4, "at least one budget's worth is served");
    for seen in rec.requests() {
        assert_eq!(
            seen.body_len,
            31 * MIB as u64,
            "a body reached the backend cut"
        );
    }
    assert_eq!(rec.requests().len(), ok);
    // 128 MiB of budget, plus slack for the threads and buffers of a dozen requests:
    // freed bodies go back to the system (`budget::return_freed_bodies_to_the_system`).
    assert!(
        growth < (128 + 16) * 1024,
        "VmHWM grew by {growth} KiB for 12 x 31 MiB"
    );
}

#[test]
fn a_declared_length_over_max_body_bytes_is_refused_before_the_body() {
    let rec = Recorder::start();
    let router = router_for(rec.url(), "max_body_bytes = 1048576");
    for (what, expect) in [
        ("a declared 2 MiB body", ""),
        (
            "a declared 2 MiB body with Expect: 100-continue",
            "Expect: 100-continue\r\n",
        ),
    ] {
        for path in ["/v1/other", CHAT] {
            let raw = format!(
                "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                 Content-Length: 2097152\r\n{expect}\r\n"
            );
            let what = format!("{what} to {path}");
            // Only the head is sent: the reply must not wait for the body.
            let outcome = exchange(router.addr, raw.as_bytes());
            outcome.row(&what);
            outcome.assert_refused(&what, 413);
            assert!(
                outcome.took < Duration::from_secs(2),
                "{what}: {:?}",
                outcome.took
            );
            assert_eq!(outcome.resp.json()["error"]["code"], "request_too_large");
        }
    }
    rec.assert_only_control_gets_through(&router, false);
}

// ---------------------------------------------------------------- 17. stream head

#[test]
fn a_streams_head_arrives_before_its_first_token() {
    let mock = Mock::start(&[]);
    let router = Router::start(&servers_toml(&[(&mock.url, 4)], ""));
    let mut conn = Conn::open(router.addr);
    let body =
        r#"{"model":"mock-model","messages":[{"role":"user","content":"hi"}],"stream":true}"#;
    let started = Instant::now();
    conn.send(
        "POST",
        CHAT,
        &[
            ("Content-Type", "application/json"),
            ("x-mock-delay-ms", "1500"),
            ("x-mock-tokens", "1"),
        ],
        body.as_bytes(),
        false,
    );
    let (status, headers) = conn.read_head().expect("a head");
    let head_at = started.elapsed();
    assert_eq!(status, 200);
    assert!(
        headers
            .iter()
            .any(|(n, v)| n.eq_ignore_ascii_case("content-type")
                && v.starts_with("text/event-stream"))
    );
    let first = conn.read_chunk().expect("a chunk").expect("a token");
    let token_at = started.elapsed();
    eprintln!("stream: head after {head_at:?}, first token after {token_at:?}");
    assert!(
        contains(&first, b"tok0"),
        "{:?}",
        String::from_utf8_lossy(&first)
    );
    assert!(
        head_at < Duration::from_millis(700),
        "the head came after {head_at:?}"
    );
    assert!(
        token_at >= Duration::from_millis(1400),
        "the token came after {token_at:?}"
    );
    while conn.read_chunk().expect("chunk").is_some() {}
}

// ---------------------------------------------------------------- 18. a reply cut off

#[test]
fn a_reply_the_backend_breaks_off_never_gets_its_last_chunk() {
    let rec = Recorder::answering(|seen| {
        if seen.request_line().starts_with("POST ") {
            let mut bytes = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\
                Transfer-Encoding: chunked\r\n\r\n"
                .to_vec();
            bytes.extend_from_slice(chunk("data: one\n\n").as_bytes());
            Reply { bytes, close: true }
        } else {
            plain_answer(seen)
        }
    });
    let router = router_for(rec.url(), "");
    let mut conn = Conn::open(router.addr);
    conn.stream.set_read_timeout(Some(SOON)).expect("timeout");
    conn.send("POST", "/v1/other", &[], b"{}", false);
    let (status, headers) = conn.read_head().expect("a head");
    assert_eq!(status, 200);
    assert!(headers
        .iter()
        .any(|(n, v)| n.eq_ignore_ascii_case("transfer-encoding") && v == "chunked"));
    let (body, closed) = rest_of(&mut conn);
    assert!(
        closed,
        "the connection stayed open after the backend broke off"
    );
    let chunks = parse_chunks(&body);
    eprintln!("cut reply: chunks {chunks:?}");
    assert_eq!(chunks.data, [b"data: one\n\n".to_vec()]);
    assert!(
        !chunks.terminated,
        "the cut reply ended with the last chunk"
    );
    let text = String::from_utf8_lossy(&body).to_ascii_lowercase();
    assert!(
        !text.contains("aborted") && !text.contains("error"),
        "{text:?}"
    );
}

#[derive(Debug)]
struct Chunks {
    data: Vec<Vec<u8>>,
    /// The zero-size last chunk came.
    terminated: bool,
}

/// The chunks of a chunked body, as far as they are whole.
fn parse_chunks(mut raw: &[u8]) -> Chunks {
    let mut data = Vec::new();
    loop {
        let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") else {
            return Chunks {
                data,
                terminated: false,
            };
        };
        let size = std::str::from_utf8(&raw[..eol])
            .ok()
            .and_then(|s| usize::from_str_radix(s, 16).ok());
        let Some(size) = size else {
            return Chunks {
                data,
                terminated: false,
            };
        };
        if size == 0 {
            return Chunks {
                data,
                terminated: true,
            };
        }
        let start = eol + 2;
        if raw.len() < start + size + 2 {
            return Chunks {
                data,
                terminated: false,
            };
        }
        data.push(raw[start..start + size].to_vec());
        raw = &raw[start + size + 2..];
    }
}

// ---------------------------------------------------------------- 19. logs

#[test]
fn control_bytes_from_clients_never_reach_the_logs() {
    let mock = Mock::start(&[]);
    let router = Router::start(&servers_toml(&[(&mock.url, 4)], ""));
    // JSON's \u001b is a real ESC in the model name; \n would start a forged log line.
    for (id, model) in [
        ("esc-model", "a\u{1b}[31mb"),
        ("newline-model", "m\nFORGED [INFO] x"),
    ] {
        let body = json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
        let resp = crate::support::post(router.addr, &[("X-Request-Id", id)], &body.to_string());
        assert!(resp.status >= 400, "{id}: {}", resp.text());
        wait_until(SOON, "the access-log entry", || {
            router.access_entry(id).is_some()
        });
    }
    // A raw ESC in the path or a header is refused by the head parser.
    for (what, raw) in [
        (
            "ESC in the path",
            &b"GET /v1/\x1b[31m HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        ),
        (
            "ESC in User-Agent",
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\nUser-Agent: a\x1b[31mb\r\n\r\n",
        ),
    ] {
        exchange(router.addr, raw).assert_refused(what, 400);
    }
    let mut files = 0;
    for entry in std::fs::read_dir(router.log_dir()).expect("log dir") {
        let path = entry.expect("entry").path();
        let bytes = std::fs::read(&path).expect("log file");
        files += 1;
        assert!(
            !bytes.contains(&0x1b),
            "a raw ESC in {}:\n{}",
            path.display(),
            String::from_utf8_lossy(&bytes).escape_debug()
        );
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            !text.lines().any(|l| l.starts_with("FORGED")),
            "a forged line in {}",
            path.display()
        );
    }
    assert!(files >= 2, "both log files are there");
    let log = router.log();
    assert!(
        log.contains(r"a\u{1b}[31mb"),
        "the model is logged escaped:\n{log}"
    );
}

// ---------------------------------------------------------------- 20. client timeouts

#[test]
fn an_idle_connection_is_closed_and_a_stalled_body_gets_408() {
    let rec = Recorder::start();
    let router = router_for(
        rec.url(),
        "client_idle_timeout = 1\nclient_body_timeout = 1",
    );
    // Idle after a reply.
    let mut idle = Conn::open(router.addr);
    let started = Instant::now();
    assert_eq!(post_on(&mut idle, "/v1/other", b"once").status, 200);
    let (rest, closed) = rest_of(&mut idle);
    let waited = started.elapsed();
    assert!(closed, "an idle connection stayed open");
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    assert!(
        waited >= Duration::from_millis(900),
        "closed after {waited:?}"
    );
    eprintln!("idle keep-alive connection closed after {waited:?}");
    // A body that stops coming.
    let raw = b"POST /v1/other HTTP/1.1\r\nHost: x\r\nX-Smuggled: slow\r\nContent-Length: 5000\r\n\r\n{\"model\":";
    let outcome = exchange(router.addr, raw);
    eprintln!("stalled body answered after {:?}", outcome.took);
    outcome.assert_refused("a stalled body", 408);
    assert!(outcome.took >= Duration::from_millis(900));
    assert_eq!(
        rec.requests().len(),
        1,
        "only the first POST reached the backend"
    );
}
