//! `mock-vllm`: a stand-in for a vLLM OpenAI-compatible server.
//!
//! Integration tests, `make demo` and the benchmark put it behind the router so
//! routing, streaming pass-through, error pass-through and failover can be
//! exercised without GPUs. It is blocking HTTP/1.1 on `std::net`, one thread per
//! connection, so its timing is predictable and it needs no extra dependencies.
//! Test hooks: `x-mock-*` request headers force statuses, token counts and delays
//! (`x-mock-delay-ms` between tokens, `x-mock-first-token-ms` before a stream's first,
//! `x-mock-role-chunk: 1` for vLLM's role-only opening chunk);
//! `/mock/*` admin endpoints expose counters, the last request seen and the mode.
//! Requests carrying `x-mock-tag: NAME` are counted per name in `/mock/stats`
//! (`tags`), so a test can tell that a kind of request never got here.

mod audio;
mod inference;
mod lora;
mod prefix_cache;
mod realtime;
mod reply;
mod responses;
mod server;
mod wire;

use inference::*;
use reply::*;
use server::*;
use wire::*;

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
  --prefix-cache-tokens N  tokens of prompts its prefix cache holds (default 0: none)
  --prefill-us-per-token N prefill time per uncached prompt token, in us (default 0)
  --first-token-ms N   delay before a stream's first token instead (default: --delay-ms)
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
    first_token_ms: Option<u64>,
    mode: u8,
    fail_status: u16,
    id: Option<String>,
    prefix_cache_tokens: u64,
    prefill_us_per_token: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            host: "127.0.0.1".into(),
            port: 0,
            models: Vec::new(),
            tokens: 16,
            delay_ms: 0,
            first_token_ms: None,
            mode: 0,
            fail_status: 503,
            id: None,
            prefix_cache_tokens: 0,
            prefill_us_per_token: 0,
        }
    }
}

const FLAGS: &str = "--host --port --model --tokens --delay-ms --first-token-ms --mode \
    --fail-status --id --prefix-cache-tokens --prefill-us-per-token";

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
            "--prefix-cache-tokens" => cfg.prefix_cache_tokens = num(u64::MAX)?,
            "--prefill-us-per-token" => cfg.prefill_us_per_token = num(1_000_000)?,
            "--first-token-ms" => cfg.first_token_ms = Some(num(MAX_DELAY_MS)?),
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
    prefix: prefix_cache::PrefixCache,
    /// LoRA adapters loaded at runtime (`/v1/load_lora_adapter`): name to path.
    adapters: Mutex<BTreeMap<String, String>>,
    /// Stored responses (`/v1/responses`), by id.
    responses: Mutex<BTreeMap<String, Value>>,
    /// WebSocket sessions served.
    sessions: AtomicU64,
    /// `GET /v1/models` served.
    model_reads: AtomicU64,
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

    fn adapters(&self) -> MutexGuard<'_, BTreeMap<String, String>> {
        // A map insert or remove cannot be left half-done by a panicking holder.
        self.adapters.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn responses(&self) -> MutexGuard<'_, BTreeMap<String, Value>> {
        self.responses.lock().unwrap_or_else(|e| e.into_inner())
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
            "sessions": self.sessions.load(SeqCst),
            "model_reads": self.model_reads.load(SeqCst),
            "responses": self.responses().len(),
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
    let prefix = prefix_cache::PrefixCache::new(cfg.prefix_cache_tokens, cfg.prefill_us_per_token);
    let st = Arc::new(State {
        cfg,
        id,
        mode,
        prefix,
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
