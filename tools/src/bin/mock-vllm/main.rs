//! `mock-vllm`: a stand-in for a vLLM OpenAI-compatible server.
//!
//! Integration tests, `make demo` and the benchmark put it behind the router so
//! routing, streaming pass-through, error pass-through and failover can be
//! exercised without GPUs. It is blocking HTTP/1.1 on `std::net`, one thread per
//! connection, so its timing is predictable and it needs no extra dependencies.
//! Test hooks: `x-mock-*` request headers force statuses, token counts and delays;
//! `/mock/*` admin endpoints expose counters, the last request seen and the mode.
//! Requests carrying `x-mock-tag: NAME` are counted per name in `/mock/stats`
//! (`tags`), so a test can tell that a kind of request never got here.

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use std::{env, process, thread};

const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 256;
const MAX_BODY: usize = 32 * 1024 * 1024;
// Caps keep a hostile or mistaken request from allocating or sleeping without bound.
const MAX_TOKENS: u64 = 100_000;
const MAX_DELAY_MS: u64 = 3_600_000;
/// Mode names; the index is what `State::mode` stores.
const MODES: [&str; 3] = ["ok", "fail", "hang"];
const FAIL: u8 = 1;
const HANG: u8 = 2;
const REASONS: &str = "200 OK|400 Bad Request|401 Unauthorized|403 Forbidden|404 Not Found|\
    405 Method Not Allowed|408 Request Timeout|413 Content Too Large|422 Unprocessable Content|\
    418 I'm a teapot|429 Too Many Requests|\
    431 Request Header Fields Too Large|500 Internal Server Error|501 Not Implemented|\
    502 Bad Gateway|503 Service Unavailable|504 Gateway Timeout|505 HTTP Version Not Supported";

const USAGE: &str = "\
mock-vllm: a mock vLLM OpenAI-compatible server for tests, demos and benchmarks.

USAGE: mock-vllm [OPTIONS]

  --host ADDR          address to bind (default 127.0.0.1)
  --port N             port to bind, 0 picks a free one (default 0)
  --model NAME         model to serve; repeat for several (default mock-model)
  --tokens N           tokens per reply without x-mock-tokens/max_tokens (default 16)
  --delay-ms N         delay before each generated token (default 0)
  --mode ok|fail|hang  initial mode (default ok)
  --fail-status N      status returned in fail mode (default 503)
  --id STRING          backend name put in replies (default mock-<port>)
  -h, --help           print this help

Prints `listening on ADDR:PORT` once bound.
";

fn mode_of(name: &str) -> Option<u8> {
    MODES.iter().position(|m| *m == name).map(|i| i as u8)
}

/// Statuses a reply with a JSON body can carry: 1xx, 204 and 304 forbid a body.
fn parse_status(s: &str) -> Option<u16> {
    let n: u16 = s.trim().parse().ok()?;
    ((200..=599).contains(&n) && n != 204 && n != 304).then_some(n)
}

struct Config {
    host: String,
    port: u16,
    models: Vec<String>,
    tokens: u64,
    delay_ms: u64,
    mode: u8,
    fail_status: u16,
    id: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            host: "127.0.0.1".into(),
            port: 0,
            models: Vec::new(),
            tokens: 16,
            delay_ms: 0,
            mode: 0,
            fail_status: 503,
            id: None,
        }
    }
}

const FLAGS: &str = "--host --port --model --tokens --delay-ms --mode --fail-status --id";

/// `Ok(None)` means `--help` was asked for.
fn parse_args(args: &[String]) -> Result<Option<Config>, String> {
    let mut cfg = Config::default();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        if arg == "--help" || arg == "-h" {
            return Ok(None);
        }
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f, Some(v)),
            None => (arg.as_str(), None),
        };
        if !FLAGS.split(' ').any(|f| f == flag) {
            return Err(format!("unknown argument {arg:?}"));
        }
        let value = match inline.or_else(|| args.next().map(String::as_str)) {
            Some(v) => v.to_string(),
            None => return Err(format!("{flag} needs a value")),
        };
        let bad = || format!("invalid value for {flag}: {value:?}");
        let num = |max: u64| value.parse::<u64>().map(|n| n.min(max)).map_err(|_| bad());
        match flag {
            "--host" => cfg.host = value.clone(),
            "--port" => cfg.port = value.parse().map_err(|_| bad())?,
            "--model" => cfg.models.push(value.clone()),
            "--tokens" => cfg.tokens = num(MAX_TOKENS)?,
            "--delay-ms" => cfg.delay_ms = num(MAX_DELAY_MS)?,
            "--mode" => cfg.mode = mode_of(&value).ok_or_else(bad)?,
            "--fail-status" => cfg.fail_status = parse_status(&value).ok_or_else(bad)?,
            _ => cfg.id = Some(value.clone()),
        }
    }
    if cfg.models.is_empty() {
        cfg.models.push("mock-model".into());
    }
    Ok(Some(cfg))
}

#[derive(Default)]
struct State {
    cfg: Config,
    id: String,
    mode: AtomicU8,
    in_flight: AtomicU64,
    peak: AtomicU64,
    total: AtomicU64,
    aborted: AtomicU64,
    seq: AtomicU64,
    last: Mutex<Option<Value>>,
    /// Requests seen per `x-mock-tag` value.
    tags: Mutex<BTreeMap<String, u64>>,
}

impl State {
    fn mode(&self) -> u8 {
        self.mode.load(SeqCst)
    }

    fn default_model(&self) -> &str {
        self.cfg.models.first().map_or("mock-model", String::as_str)
    }

    fn last(&self) -> MutexGuard<'_, Option<Value>> {
        // A panicked holder cannot leave an Option<Value> half-written, so poison is harmless.
        self.last.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, req: &Request) {
        let headers: Vec<[&String; 2]> = req.head.headers.iter().map(|(n, v)| [n, v]).collect();
        let body = String::from_utf8_lossy(&req.body);
        let (method, path) = (&req.head.method, &req.head.target);
        *self.last() =
            Some(json!({"method": method, "path": path, "headers": headers, "body": body}));
    }

    fn tags(&self) -> MutexGuard<'_, BTreeMap<String, u64>> {
        // A counter map cannot be left half-updated by a panicking holder.
        self.tags.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn count_tags(&self, head: &Head) {
        let mut tags = self.tags();
        for tag in head.all("x-mock-tag") {
            *tags.entry(tag.to_owned()).or_default() += 1;
        }
    }

    fn stats(&self) -> Value {
        json!({
            "tags": *self.tags(),
            "id": self.id,
            "in_flight": self.in_flight.load(SeqCst),
            "peak_in_flight": self.peak.load(SeqCst),
            "total": self.total.load(SeqCst),
            "aborted": self.aborted.load(SeqCst),
            "mode": MODES[self.mode() as usize % MODES.len()],
        })
    }

    fn reset(&self) {
        // Peak restarts from what is running now, which is 0 when idle.
        self.peak.store(self.in_flight.load(SeqCst), SeqCst);
        self.total.store(0, SeqCst);
        self.aborted.store(0, SeqCst);
        *self.last() = None;
        self.tags().clear();
    }
}

/// Counts one inference request as in flight while it lives, so every exit path
/// (reply, error, abort, end of a hang, even a panic) decrements exactly once.
struct InFlight<'a>(&'a State);

impl<'a> InFlight<'a> {
    fn start(st: &'a State) -> Self {
        let now = st.in_flight.fetch_add(1, SeqCst) + 1;
        st.peak.fetch_max(now, SeqCst);
        st.total.fetch_add(1, SeqCst);
        InFlight(st)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, SeqCst);
    }
}

// ---------------------------------------------------------------- HTTP parsing

#[derive(Debug)]
struct Head {
    method: String,
    target: String,
    http10: bool,
    headers: Vec<(String, String)>,
}

impl Head {
    fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        let named = self
            .headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name));
        named.map(|(_, v)| v.as_str())
    }

    fn header<'a>(&'a self, name: &'a str) -> Option<&'a str> {
        self.all(name).next()
    }

    fn has_token(&self, name: &str, token: &str) -> bool {
        let mut tokens = self.all(name).flat_map(|v| v.split(','));
        tokens.any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    fn keep_alive(&self) -> bool {
        !self.http10 && !self.has_token("connection", "close")
    }
}

struct Request {
    head: Head,
    body: Vec<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum ReadErr {
    /// The peer went away or the socket failed: nothing sensible to reply.
    Io,
    /// Malformed or unacceptable request: reply with this status, then close.
    Bad(u16, &'static str),
}

impl From<io::Error> for ReadErr {
    fn from(_: io::Error) -> Self {
        ReadErr::Io
    }
}

#[derive(Debug, PartialEq)]
enum Framing {
    None,
    Length(usize),
    Chunked,
}

fn bad(msg: &'static str) -> ReadErr {
    ReadErr::Bad(400, msg)
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn trim_eol(l: &[u8]) -> &[u8] {
    let l = l.strip_suffix(b"\n").unwrap_or(l);
    l.strip_suffix(b"\r").unwrap_or(l)
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// Reads one LF-terminated line, charging it to `budget`; a line that would
/// exceed the budget yields `too_long`. Returns 0 at a clean EOF.
fn read_line(
    r: &mut impl BufRead,
    buf: &mut Vec<u8>,
    budget: &mut usize,
    too_long: ReadErr,
) -> Result<usize, ReadErr> {
    if *budget == 0 {
        return Err(too_long);
    }
    let n = Read::take(&mut *r, *budget as u64).read_until(b'\n', buf)?;
    if n > 0 && buf.last() != Some(&b'\n') {
        return Err(if n >= *budget { too_long } else { ReadErr::Io });
    }
    *budget -= n;
    Ok(n)
}

/// `Ok(None)` when the peer closed cleanly between requests.
fn read_head(r: &mut impl BufRead) -> Result<Option<Head>, ReadErr> {
    let too_long = ReadErr::Bad(431, "request head too large");
    let (mut budget, mut line) = (MAX_HEAD, Vec::new());
    // RFC 9112 2.2: skip empty lines before the request line (stray CRLF after a body).
    while trim_eol(&line).is_empty() {
        line.clear();
        if read_line(r, &mut line, &mut budget, too_long)? == 0 {
            return Ok(None);
        }
    }
    let (method, target, http10) = parse_request_line(trim_eol(&line))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        if read_line(r, &mut line, &mut budget, too_long)? == 0 {
            return Err(ReadErr::Io);
        }
        match trim_eol(&line) {
            [] => {
                return Ok(Some(Head {
                    method,
                    target,
                    http10,
                    headers,
                }))
            }
            _ if headers.len() == MAX_HEADERS => return Err(too_long),
            l => headers.push(parse_header(l)?),
        }
    }
}

fn parse_request_line(l: &[u8]) -> Result<(String, String, bool), ReadErr> {
    let s = std::str::from_utf8(l).map_err(|_| bad("request line is not UTF-8"))?;
    let parts: Vec<&str> = s.split(' ').collect();
    let [method, target, version] = parts[..] else {
        return Err(bad("malformed request line"));
    };
    if method.is_empty() || !method.bytes().all(is_tchar) {
        return Err(bad("malformed method"));
    }
    if target.is_empty() || target.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(bad("malformed request target"));
    }
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        v if v.starts_with("HTTP/") => return Err(ReadErr::Bad(505, "only HTTP/1.x is supported")),
        _ => return Err(bad("malformed HTTP version")),
    };
    Ok((method.into(), origin_form(target).into(), http10))
}

/// Servers must accept absolute-form targets (RFC 9112 3.2.2); routing needs only the path.
fn origin_form(target: &str) -> &str {
    let rest = target
        .strip_prefix("http://")
        .or_else(|| target.strip_prefix("https://"));
    match rest.map(|r| (r, r.find(['/', '?']))) {
        None => target,
        Some((r, Some(i))) if r[i..].starts_with('/') => &r[i..],
        Some(_) => "/",
    }
}

fn parse_header(l: &[u8]) -> Result<(String, String), ReadErr> {
    if matches!(l.first(), Some(b' ' | b'\t')) {
        return Err(bad("obsolete header line folding"));
    }
    let colon = l
        .iter()
        .position(|&b| b == b':')
        .ok_or(bad("header line without colon"))?;
    let (name, value) = (&l[..colon], trim_ows(&l[colon + 1..]));
    if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
        return Err(bad("malformed header name"));
    }
    if value.iter().any(|&b| b == 0 || b == b'\r') {
        return Err(bad("malformed header value"));
    }
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    Ok((text(name), text(value)))
}

fn body_framing(head: &Head) -> Result<Framing, ReadErr> {
    let too_large = ReadErr::Bad(413, "request body too large");
    let mut length: Option<u64> = None;
    for part in head
        .all("content-length")
        .flat_map(|v| v.split(','))
        .map(str::trim)
    {
        if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad("malformed Content-Length"));
        }
        let n = part.parse::<u64>().map_err(|_| too_large)?;
        if length.is_some_and(|l| l != n) {
            return Err(bad("conflicting Content-Length values"));
        }
        length = Some(n);
    }
    if head.header("transfer-encoding").is_some() {
        // Both framings at once is the classic request-smuggling shape: refuse it.
        if length.is_some() || head.http10 {
            return Err(bad("Transfer-Encoding not allowed here"));
        }
        let codings: Vec<&str> = head
            .all("transfer-encoding")
            .flat_map(|v| v.split(','))
            .collect();
        return match codings[..] {
            [c] if c.trim().eq_ignore_ascii_case("chunked") => Ok(Framing::Chunked),
            _ => Err(ReadErr::Bad(
                501,
                "only Transfer-Encoding: chunked is supported",
            )),
        };
    }
    match length {
        None | Some(0) => Ok(Framing::None),
        Some(n) if n > MAX_BODY as u64 => Err(too_large),
        Some(n) => Ok(Framing::Length(n as usize)),
    }
}

/// Appends exactly `n` bytes to `buf`, growing with the data actually received
/// rather than trusting a declared size up front.
fn read_exact_into(r: &mut impl BufRead, n: usize, buf: &mut Vec<u8>) -> Result<(), ReadErr> {
    let got = Read::take(&mut *r, n as u64).read_to_end(buf)?;
    if got == n {
        Ok(())
    } else {
        Err(ReadErr::Io)
    }
}

fn read_body(r: &mut impl BufRead, framing: &Framing) -> Result<Vec<u8>, ReadErr> {
    let mut body = Vec::new();
    match *framing {
        Framing::None => {}
        Framing::Length(n) => read_exact_into(r, n, &mut body)?,
        Framing::Chunked => body = read_chunked(r, MAX_BODY)?,
    }
    Ok(body)
}

fn read_chunked(r: &mut impl BufRead, limit: usize) -> Result<Vec<u8>, ReadErr> {
    let (mut body, mut line) = (Vec::new(), Vec::new());
    loop {
        line.clear();
        if read_line(r, &mut line, &mut 4096, bad("chunk size line too long"))? == 0 {
            return Err(ReadErr::Io);
        }
        let size = parse_chunk_size(trim_eol(&line))?;
        if size == 0 {
            break;
        }
        if size > limit - body.len() {
            return Err(ReadErr::Bad(413, "request body too large"));
        }
        read_exact_into(r, size, &mut body)?;
        line.clear();
        let no_crlf = bad("missing CRLF after chunk data");
        match read_line(r, &mut line, &mut 2, no_crlf)? {
            0 => return Err(ReadErr::Io),
            _ if !trim_eol(&line).is_empty() => return Err(no_crlf),
            _ => {}
        }
    }
    // Trailer fields carry nothing we use; read them so the next request starts cleanly.
    let mut budget = MAX_HEAD;
    loop {
        line.clear();
        match read_line(
            r,
            &mut line,
            &mut budget,
            ReadErr::Bad(431, "trailers too large"),
        )? {
            0 => return Err(ReadErr::Io),
            _ if trim_eol(&line).is_empty() => return Ok(body),
            _ => {}
        }
    }
}

fn parse_chunk_size(l: &[u8]) -> Result<usize, ReadErr> {
    let hex = trim_ows(l.split(|&b| b == b';').next().unwrap_or_default());
    // At most 15 hex digits: the value always fits a u64 and the check below rejects it.
    if hex.is_empty() || hex.len() > 15 || !hex.iter().all(u8::is_ascii_hexdigit) {
        return Err(bad("malformed chunk size"));
    }
    let s = std::str::from_utf8(hex).map_err(|_| bad("malformed chunk size"))?;
    usize::from_str_radix(s, 16).map_err(|_| ReadErr::Bad(413, "chunk too large"))
}

// ---------------------------------------------------------------- HTTP replies

struct Resp {
    status: u16,
    ctype: &'static str,
    /// Extra header lines, each ending in CRLF.
    extra: String,
    body: Vec<u8>,
}

impl Resp {
    fn json(status: u16, v: &Value) -> Resp {
        let body = v.to_string().into_bytes();
        let ctype = "application/json";
        Resp {
            status,
            ctype,
            extra: String::new(),
            body,
        }
    }

    /// OpenAI-style error body: what vLLM returns and what clients parse.
    fn error(status: u16, kind: &str, msg: &str) -> Resp {
        Resp::json(
            status,
            &json!({"error": {"message": msg, "type": kind, "code": status}}),
        )
    }

    fn invalid(msg: &str) -> Resp {
        Resp::error(400, "invalid_request_error", msg)
    }

    fn not_allowed(allow: &str) -> Resp {
        let mut r = Resp::error(405, "invalid_request_error", "method not allowed");
        r.extra = format!("Allow: {allow}\r\n");
        r
    }
}

fn reason(status: u16) -> &'static str {
    let prefix = format!("{status} ");
    REASONS
        .split('|')
        .find_map(|r| r.strip_prefix(prefix.as_str()))
        .unwrap_or("Unknown")
}

fn now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// IMF-fixdate for the Date header (RFC 9110 5.6.7), via the days-to-civil algorithm.
fn http_date(secs: u64) -> String {
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: &str = "JanFebMarAprMayJunJulAugSepOctNovDec";
    let (days, t) = (secs / 86_400, secs % 86_400);
    let (era, doe) = ((days + 719_468) / 146_097, (days + 719_468) % 146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = (if mp < 10 { mp + 3 } else { mp - 9 }) as usize;
    let year = yoe + era * 400 + u64::from(month <= 2);
    let (wd, mon) = (
        WEEKDAYS[(days % 7) as usize],
        &MONTHS[month * 3 - 3..month * 3],
    );
    let (h, m, s) = (t / 3600, t / 60 % 60, t % 60);
    format!("{wd}, {day:02} {mon} {year} {h:02}:{m:02}:{s:02} GMT")
}

struct Conn<'a> {
    st: &'a State,
    reader: BufReader<TcpStream>,
    out: TcpStream,
    close: bool,
    head_only: bool,
}

impl Conn<'_> {
    fn head(&self, status: u16, ctype: &str, framing: &str, extra: &str) -> Vec<u8> {
        let (reason, date, id) = (reason(status), http_date(now().as_secs()), &self.st.id);
        let close = if self.close {
            "Connection: close\r\n"
        } else {
            ""
        };
        format!(
            "HTTP/1.1 {status} {reason}\r\nDate: {date}\r\nContent-Type: {ctype}\r\n{framing}\r\n\
             x-mock-backend: {id}\r\n{extra}{close}\r\n"
        )
        .into_bytes()
    }

    /// One write per reply: with nodelay set, head and body leave in one packet.
    fn send(&mut self, r: &Resp) -> io::Result<()> {
        let length = format!("Content-Length: {}", r.body.len());
        let mut buf = self.head(r.status, r.ctype, &length, &r.extra);
        if !self.head_only {
            buf.extend_from_slice(&r.body);
        }
        self.out.write_all(&buf)
    }

    /// After an error reply to a request we did not fully read, closing at once
    /// could RST the connection and destroy the reply before the client reads it.
    fn linger(&mut self) {
        let _ = self.out.shutdown(Shutdown::Write);
        let _ = self.out.set_read_timeout(Some(Duration::from_secs(1)));
        let (mut sink, mut left) = ([0u8; 8192], 1usize << 20);
        while let Ok(n @ 1..) = self.reader.read(&mut sink) {
            left = left.saturating_sub(n);
            if left == 0 {
                break;
            }
        }
    }
}

// ---------------------------------------------------------------- server

fn serve_conn(st: &State, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let reader = BufReader::with_capacity(16 * 1024, read_half);
    let mut c = Conn {
        st,
        reader,
        out: stream,
        close: false,
        head_only: false,
    };
    loop {
        match read_request(&mut c) {
            Ok(Some(req)) => {
                c.close = !req.head.keep_alive();
                c.head_only = req.head.method == "HEAD";
                if route(&mut c, &req).is_err() || c.close {
                    return;
                }
            }
            Ok(None) | Err(ReadErr::Io) => return,
            Err(ReadErr::Bad(status, msg)) => {
                (c.close, c.head_only) = (true, false);
                if c.send(&Resp::error(status, "invalid_request_error", msg))
                    .is_ok()
                {
                    c.linger();
                }
                return;
            }
        }
    }
}

fn read_request(c: &mut Conn) -> Result<Option<Request>, ReadErr> {
    let Some(head) = read_head(&mut c.reader)? else {
        return Ok(None);
    };
    let framing = body_framing(&head)?;
    // curl and others wait up to a second for this before sending a large body.
    if framing != Framing::None && !head.http10 && head.has_token("expect", "100-continue") {
        c.out.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
    }
    let body = read_body(&mut c.reader, &framing)?;
    Ok(Some(Request { head, body }))
}

fn route(c: &mut Conn, req: &Request) -> io::Result<()> {
    let st = c.st;
    let method = req.head.method.as_str();
    let (get, post) = (method == "GET" || method == "HEAD", method == "POST");
    let path = req.head.target.split('?').next().unwrap_or_default();
    st.count_tags(&req.head);
    let resp = match path {
        "/mock/stats" if get => Resp::json(200, &st.stats()),
        "/mock/last" if get => match st.last().as_ref() {
            Some(v) => Resp::json(200, v),
            None => Resp::error(404, "not_found_error", "no inference request recorded"),
        },
        "/mock/reset" if post => {
            st.reset();
            Resp::json(200, &json!({"status": "ok"}))
        }
        "/mock/mode" if post => set_mode(st, &req.body),
        "/health" if get => match st.mode() {
            FAIL => fail_resp(st),
            HANG => return hang(c),
            _ => Resp::json(200, &json!({"status": "ok"})),
        },
        "/v1/models" if get => models(st),
        "/metrics" if get => metrics(st),
        "/mock/stats" | "/mock/last" | "/health" | "/v1/models" | "/metrics" => {
            Resp::not_allowed("GET, HEAD")
        }
        "/mock/reset" | "/mock/mode" => Resp::not_allowed("POST"),
        p if p.starts_with("/v1/") || p == "/tokenize" || p == "/detokenize" => match post {
            true => return inference(c, req, p),
            false => Resp::not_allowed("POST"),
        },
        _ => Resp::error(404, "not_found_error", &format!("no route for {path}")),
    };
    c.send(&resp)
}

fn set_mode(st: &State, body: &[u8]) -> Resp {
    let v: Value = serde_json::from_slice(body).unwrap_or_default();
    match v.get("mode").and_then(Value::as_str).and_then(mode_of) {
        Some(m) => {
            st.mode.store(m, SeqCst);
            Resp::json(200, &json!({"mode": MODES[m as usize]}))
        }
        None => Resp::invalid(r#"body must be {"mode":"ok"|"fail"|"hang"}"#),
    }
}

fn fail_resp(st: &State) -> Resp {
    let msg = format!("mock backend {} is in fail mode", st.id);
    Resp::error(st.cfg.fail_status, "mock_error", &msg)
}

/// Holds the connection open without answering until the peer gives up, which
/// is what a wedged vLLM looks like to the router.
fn hang(c: &mut Conn) -> io::Result<()> {
    let mut sink = [0u8; 4096];
    loop {
        match c.reader.read(&mut sink) {
            Ok(0) => return Err(io::ErrorKind::ConnectionAborted.into()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn models(st: &State) -> Resp {
    let created = now().as_secs();
    let model =
        |m| json!({"id": m, "object": "model", "created": created, "owned_by": "mock-vllm"});
    let data: Vec<Value> = st.cfg.models.iter().map(model).collect();
    Resp::json(200, &json!({"object": "list", "data": data}))
}

const GAUGES: [(&str, &str); 3] = [
    ("num_requests_running", "Requests running on the engine."),
    ("num_requests_waiting", "Requests waiting to be scheduled."),
    (
        "kv_cache_usage_perc",
        "KV-cache usage, 1 means 100 percent.",
    ),
];

fn metrics(st: &State) -> Resp {
    let running = st.in_flight.load(SeqCst);
    let kv = format!("{:.4}", (running as f64 / 100.0).min(1.0));
    let values = [running.to_string(), "0".to_string(), kv];
    let mut text = String::new();
    for ((name, help), value) in GAUGES.iter().zip(values) {
        text += &format!("# HELP vllm:{name} {help}\n# TYPE vllm:{name} gauge\n");
        for m in &st.cfg.models {
            let label = m
                .replace('\\', r"\\")
                .replace('"', "\\\"")
                .replace('\n', r"\n");
            text += &format!("vllm:{name}{{model_name=\"{label}\"}} {value}\n");
        }
    }
    let mut r = Resp::json(200, &Value::Null);
    (r.ctype, r.body) = (
        "text/plain; version=0.0.4; charset=utf-8",
        text.into_bytes(),
    );
    r
}

// ---------------------------------------------------------------- inference

/// Test hooks carried in `x-mock-*` request headers.
struct Hooks {
    tokens: Option<u64>,
    delay_ms: u64,
    first_byte_ms: u64,
    status: Option<u16>,
}

fn hooks(head: &Head, st: &State) -> Result<Hooks, String> {
    let num = |name: &str| match head.header(name).map(|v| (v, v.trim().parse::<u64>())) {
        None => Ok(None),
        Some((_, Ok(n))) => Ok(Some(n.min(MAX_DELAY_MS))),
        Some((v, Err(_))) => Err(format!("invalid {name}: {v:?}")),
    };
    let status = match head.header("x-mock-status") {
        None => None,
        Some(v) => Some(parse_status(v).ok_or(format!("invalid x-mock-status {v:?}"))?),
    };
    Ok(Hooks {
        tokens: num("x-mock-tokens")?.map(|n| n.min(MAX_TOKENS)),
        delay_ms: num("x-mock-delay-ms")?.unwrap_or(st.cfg.delay_ms),
        first_byte_ms: num("x-mock-first-byte-delay-ms")?.unwrap_or(0),
        status,
    })
}

/// One generation: what both the JSON and the SSE replies are built from.
struct Gen {
    chat: bool,
    rid: String,
    model: String,
    created: u64,
    n: u64,
    delay: Duration,
}

impl Gen {
    /// `object` and `choices[0]` shaped as vLLM shapes them for this endpoint.
    fn choice(&self, text: String, stream: bool) -> (&'static str, Value) {
        let finish = if stream { Value::Null } else { json!("stop") };
        let (object, mut choice) = match (self.chat, stream) {
            (true, false) => (
                "chat.completion",
                json!({"message": {"role": "assistant", "content": text}}),
            ),
            (true, true) => ("chat.completion.chunk", json!({"delta": {"content": text}})),
            (false, _) => ("text_completion", json!({"text": text, "logprobs": null})),
        };
        choice["index"] = json!(0);
        choice["finish_reason"] = finish;
        (object, choice)
    }
}

/// Drops the in-flight guard before the last write, so a client that has read
/// the whole reply never finds its request still counted in `/mock/stats`.
/// Waits `total`, looking every 20 ms whether the client has closed the connection;
/// false if it has.
fn generate_while_connected(stream: &TcpStream, total: Duration) -> bool {
    let deadline = std::time::Instant::now() + total;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return true;
        }
        thread::sleep(left.min(Duration::from_millis(20)));
        if stream.set_nonblocking(true).is_err() {
            return true;
        }
        // End of stream (0) is a client gone; bytes or "would block" are one still there.
        let closed = matches!(stream.peek(&mut [0u8; 1]), Ok(0));
        let _ = stream.set_nonblocking(false);
        if closed {
            return false;
        }
    }
}

fn finish(c: &mut Conn, guard: InFlight, r: &Resp) -> io::Result<()> {
    drop(guard);
    c.send(r)
}

fn inference(c: &mut Conn, req: &Request, path: &str) -> io::Result<()> {
    let st = c.st;
    let guard = InFlight::start(st);
    st.record(req);
    let mode = st.mode();
    if mode == HANG {
        return hang(c);
    }
    let h = match hooks(&req.head, st) {
        Ok(h) => h,
        Err(msg) => return finish(c, guard, &Resp::invalid(&msg)),
    };
    thread::sleep(Duration::from_millis(h.first_byte_ms));
    if mode == FAIL {
        return finish(c, guard, &fail_resp(st));
    }
    if let Some(s) = h.status {
        let msg = format!("mock forced status {s}");
        return finish(c, guard, &Resp::error(s, "mock_error", &msg));
    }
    let seq = st.seq.fetch_add(1, SeqCst);
    let chat = match path {
        "/v1/chat/completions" => true,
        "/v1/completions" => false,
        _ => return finish(c, guard, &echo(st, req, seq)),
    };
    let Ok(body @ Value::Object(_)) = serde_json::from_slice::<Value>(&req.body) else {
        return finish(
            c,
            guard,
            &Resp::invalid("request body must be a JSON object"),
        );
    };
    let max_tokens = body
        .get("max_tokens")
        .or_else(|| body.get("max_completion_tokens"));
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or(st.default_model());
    let kind = if chat { "chatcmpl" } else { "cmpl" };
    let g = Gen {
        chat,
        rid: format!("{kind}-{}-{seq}", st.id),
        model: model.to_string(),
        created: now().as_secs(),
        n: h.tokens
            .or(max_tokens.and_then(Value::as_u64))
            .unwrap_or(st.cfg.tokens)
            .min(MAX_TOKENS),
        delay: Duration::from_millis(h.delay_ms),
    };
    if body.get("stream").and_then(Value::as_bool).unwrap_or(false) {
        return stream(c, guard, &g);
    }
    // Like vLLM, a non-streamed generation stops when its client goes away.
    if !generate_while_connected(&c.out, g.delay.saturating_mul(g.n as u32)) {
        st.aborted.fetch_add(1, SeqCst);
        return Err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "client left",
        ));
    }
    finish(c, guard, &completion(st, &g, req.body.len() as u64 / 4))
}

fn echo(st: &State, req: &Request, seq: u64) -> Resp {
    let text = || Value::String(String::from_utf8_lossy(&req.body).into_owned());
    let request: Value = serde_json::from_slice(&req.body).unwrap_or_else(|_| text());
    let model = request
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or(st.default_model());
    let v = json!({
        "id": format!("echo-{}-{seq}", st.id),
        "object": "mock.echo",
        "backend": st.id,
        "path": req.head.target,
        "model": model,
        "request": request,
    });
    Resp::json(200, &v)
}

/// `prompt` is a rough token estimate (body bytes / 4), enough for a plausible `usage`.
fn completion(st: &State, g: &Gen, prompt: u64) -> Resp {
    let text = (0..g.n)
        .map(|i| format!("tok{i}"))
        .collect::<Vec<_>>()
        .join(" ");
    let (object, choice) = g.choice(text, false);
    let v = json!({
        "id": g.rid,
        "object": object,
        "created": g.created,
        "model": g.model,
        "backend": st.id,
        "choices": [choice],
        "usage": {"prompt_tokens": prompt, "completion_tokens": g.n, "total_tokens": prompt + g.n},
    });
    Resp::json(200, &v)
}

fn sse_chunk(data: &str) -> Vec<u8> {
    format!("{:x}\r\n{data}\r\n", data.len()).into_bytes()
}

fn stream(c: &mut Conn, guard: InFlight, g: &Gen) -> io::Result<()> {
    let st = c.st;
    let aborted = |e: io::Error| {
        st.aborted.fetch_add(1, SeqCst);
        e
    };
    let head = c.head(
        200,
        "text/event-stream",
        "Transfer-Encoding: chunked",
        "Cache-Control: no-cache\r\n",
    );
    c.out.write_all(&head).map_err(aborted)?;
    for i in 0..g.n {
        // Delay before each token: the head goes out at once, token i at about (i+1) * delay.
        thread::sleep(g.delay);
        let (object, choice) = g.choice(format!("tok{i} "), true);
        let ev = json!({
            "id": g.rid,
            "object": object,
            "created": g.created,
            "model": g.model,
            "backend": st.id,
            "index": i,
            "sent_us": now().as_micros() as u64,
            "choices": [choice],
        });
        // One write per event; with nodelay each event is its own chunk and packet.
        c.out
            .write_all(&sse_chunk(&format!("data: {ev}\n\n")))
            .map_err(aborted)?;
    }
    drop(guard);
    let mut tail = sse_chunk("data: [DONE]\n\n");
    tail.extend_from_slice(b"0\r\n\r\n");
    c.out.write_all(&tail).map_err(aborted)
}

// ---------------------------------------------------------------- main

/// Unlike eprintln!, never panics when stderr is gone.
fn log(msg: &str) {
    let _ = writeln!(io::stderr(), "mock-vllm: {msg}");
}

fn die(code: i32, msg: &str) -> ! {
    log(msg);
    process::exit(code)
}

fn main() {
    let args: Vec<String> = env::args_os()
        .skip(1)
        .map(|a| a.to_string_lossy().into())
        .collect();
    let cfg = match parse_args(&args) {
        Ok(Some(cfg)) => cfg,
        Ok(None) => {
            let _ = io::stdout().write_all(USAGE.as_bytes());
            return;
        }
        Err(msg) => die(2, &format!("{msg}\n\n{USAGE}")),
    };
    let listener = TcpListener::bind((cfg.host.as_str(), cfg.port))
        .unwrap_or_else(|e| die(1, &format!("cannot bind {}:{}: {e}", cfg.host, cfg.port)));
    // std listens with a backlog of 128; vLLM (uvicorn) uses 2048. A router opening a
    // thousand connections at once would otherwise see dropped SYNs and 1 s retries that
    // are the mock's, not the router's.
    // SAFETY: the fd is a bound TCP socket owned by `listener` for the whole call.
    #[allow(unsafe_code)]
    let relisten = unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&listener), 2048) };
    if relisten != 0 {
        die(1, &format!("cannot listen: {}", io::Error::last_os_error()));
    }
    let addr = listener
        .local_addr()
        .unwrap_or_else(|e| die(1, &format!("no local address: {e}")));
    let id = cfg
        .id
        .clone()
        .unwrap_or_else(|| format!("mock-{}", addr.port()));
    let mode = AtomicU8::new(cfg.mode);
    let st = Arc::new(State {
        cfg,
        id,
        mode,
        ..State::default()
    });
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "listening on {addr}").and_then(|_| out.flush());
    drop(out);
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let st = Arc::clone(&st);
                let spawned = thread::Builder::new().spawn(move || serve_conn(&st, stream));
                if let Err(e) = spawned {
                    log(&format!("cannot spawn connection thread: {e}"));
                }
            }
            Err(e) => {
                // Usually transient (ECONNABORTED, EMFILE): back off briefly instead of spinning.
                log(&format!("accept failed: {e}"));
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &str) -> Head {
        read_head(&mut raw.as_bytes())
            .expect("valid head")
            .expect("a head")
    }

    /// 0 = parsed, 1 = peer gone (Io), else the error status.
    fn status<T>(r: Result<T, ReadErr>) -> u16 {
        match r {
            Ok(_) => 0,
            Err(ReadErr::Io) => 1,
            Err(ReadErr::Bad(s, _)) => s,
        }
    }

    fn head_status(raw: &str) -> u16 {
        status(read_head(&mut raw.as_bytes()))
    }

    fn chunked(raw: &str) -> Result<Vec<u8>, ReadErr> {
        read_chunked(&mut raw.as_bytes(), 1024)
    }

    #[test]
    fn parses_head_preserving_header_order_and_case() {
        let h = head("\r\nPOST /v1/completions?x=1 HTTP/1.1\r\nHost: a\r\nX-Mock-Tokens:  3 \r\nhost: b\r\n\r\n");
        assert_eq!(
            (h.method.as_str(), h.target.as_str(), h.http10),
            ("POST", "/v1/completions?x=1", false)
        );
        let pairs: Vec<_> = h
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            pairs,
            [("Host", "a"), ("X-Mock-Tokens", "3"), ("host", "b")]
        );
        assert_eq!(h.header("x-mock-tokens"), Some("3"));
        assert!(h.keep_alive());
        let h = head("GET http://x:1/health?a HTTP/1.0\nConnection: keep-alive\n\n");
        assert_eq!((h.target.as_str(), h.keep_alive()), ("/health?a", false));
        assert!(!head("GET / HTTP/1.1\r\nConnection: Keep-Alive, close\r\n\r\n").keep_alive());
    }

    #[test]
    fn rejects_bad_heads() {
        assert!(read_head(&mut "".as_bytes()).expect("clean EOF").is_none());
        assert_eq!(head_status("GET / HTTP/1.1\r\nHost: a\r\n"), 1);
        assert_eq!(head_status("GET /\r\n\r\n"), 400);
        assert_eq!(head_status("GET  / HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(head_status("G@T / HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(head_status("GET / HTTP/2.0\r\n\r\n"), 505);
        assert_eq!(head_status("GET / HTTP/1.1\r\nA: b\r\n c\r\n\r\n"), 400);
        assert_eq!(head_status("GET / HTTP/1.1\r\nBad Name: b\r\n\r\n"), 400);
        assert_eq!(head_status("GET / HTTP/1.1\r\nNoColon\r\n\r\n"), 400);
        assert_eq!(
            head_status(&format!(
                "GET / HTTP/1.1\r\nX: {}\r\n\r\n",
                "a".repeat(MAX_HEAD)
            )),
            431
        );
    }

    #[test]
    fn frames_bodies() {
        let f = |h: &str| body_framing(&head(&format!("POST / HTTP/1.1\r\n{h}\r\n")));
        assert_eq!(f("Content-Length: 5\r\n"), Ok(Framing::Length(5)));
        assert_eq!(f("Content-Length: 5, 5\r\n"), Ok(Framing::Length(5)));
        assert_eq!(f("Transfer-Encoding: Chunked\r\n"), Ok(Framing::Chunked));
        assert_eq!(f(""), Ok(Framing::None));
        assert_eq!(status(f("Content-Length: 5\r\nContent-Length: 6\r\n")), 400);
        assert_eq!(status(f("Content-Length: -1\r\n")), 400);
        assert_eq!(
            status(f("Content-Length: 99999999999999999999999\r\n")),
            413
        );
        assert_eq!(
            status(f("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n")),
            400
        );
        assert_eq!(status(f("Transfer-Encoding: gzip, chunked\r\n")), 501);
    }

    #[test]
    fn decodes_chunked_and_leaves_the_rest() {
        let mut input =
            "4\r\nWiki\r\n5;e=1\r\npedia\r\nE \r\n in\r\n\r\nchunks.\r\n0\r\nT: x\r\n\r\nNEXT"
                .as_bytes();
        assert_eq!(
            read_chunked(&mut input, 1024).expect("valid"),
            b"Wikipedia in\r\n\r\nchunks."
        );
        assert_eq!(input, b"NEXT");
        assert_eq!(chunked("3\nabc\n0\n\n").expect("bare LF"), b"abc");
    }

    #[test]
    fn rejects_bad_chunked() {
        assert_eq!(status(chunked("zz\r\nabc\r\n0\r\n\r\n")), 400);
        assert_eq!(status(chunked("\r\n")), 400);
        assert_eq!(status(chunked("3\r\nabcd\r\n0\r\n\r\n")), 400);
        assert_eq!(status(chunked("fffffffffffffff\r\n")), 413);
        assert_eq!(status(chunked("ffffffffffffffff\r\n")), 400);
        assert_eq!(status(chunked("5\r\nab")), 1);
        assert_eq!(status(chunked("3\r\nabc\r\n0\r\n")), 1);
    }

    #[test]
    fn formats_http_dates_and_reasons() {
        assert_eq!(http_date(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(http_date(784_111_777), "Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(http_date(951_782_400), "Tue, 29 Feb 2000 00:00:00 GMT");
        assert_eq!(
            (reason(200), reason(418), reason(299)),
            ("OK", "I'm a teapot", "Unknown")
        );
    }

    #[test]
    fn parses_cli() {
        let args = "--port=0 --model a --model b --mode hang --id x --tokens 3";
        let args: Vec<String> = args.split(' ').map(String::from).collect();
        let cfg = parse_args(&args).expect("valid").expect("not help");
        assert_eq!(
            (cfg.models.len(), cfg.mode, cfg.id.as_deref(), cfg.tokens),
            (2, HANG, Some("x"), 3)
        );
        let err =
            |a: &[&str]| parse_args(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>()).is_err();
        assert!(err(&["--port"]) && err(&["--fail-status", "204"]) && err(&["--bogus", "1"]));
        assert!(parse_args(&["--help".to_string()]).expect("ok").is_none());
    }
}
