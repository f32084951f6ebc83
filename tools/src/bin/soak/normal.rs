//! The normal clients: streams and whole JSON replies with the key, each compared
//! byte for byte with the same request sent directly to a mock, and the keep-alive
//! pauses around the router's idle timeout.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use vllm_router_tools::hostile::json_post;
use vllm_router_tools::http::{Conn, UNANSWERED};

use crate::slow::closed_in_time;
use crate::stats::Stats;
use crate::{
    CHAT, CLIENT_TIMEOUT_SECS, COMPLETIONS, IDLE_CLOSE_AFTER, IO_TIMEOUT, JSON_CLIENTS,
    KEEP_ALIVE_REQUESTS, KEY, STREAM_CLIENTS, TOKENS,
};

/// One normal request: endpoint, streamed or not, token count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Normal {
    path: &'static str,
    stream: bool,
    tokens: u32,
}

impl Normal {
    pub fn all() -> Vec<Normal> {
        let mut all = Vec::new();
        for path in [CHAT, COMPLETIONS] {
            for stream in [true, false] {
                for tokens in TOKENS {
                    all.push(Normal {
                        path,
                        stream,
                        tokens,
                    });
                }
            }
        }
        all
    }

    /// The body: the same bytes every time for the same request, so the mock's
    /// `usage` (which counts body bytes) is the same too.
    pub fn body(&self) -> String {
        let prompt = if self.path == CHAT {
            r#""messages":[{"role":"user","content":"soak"}]"#
        } else {
            r#""prompt":"soak""#
        };
        format!(
            r#"{{"model":"mock-model",{prompt},"max_tokens":{},"stream":{}}}"#,
            self.tokens, self.stream
        )
    }

    /// Sends it on `conn` (the key when given) and reads the reply into its
    /// comparable form.
    pub fn run(&self, conn: &mut Conn, key: Option<&str>, close: bool) -> Result<Output, String> {
        conn.try_send_raw(&json_post(self.path, &self.body(), key, close))?;
        let reply = conn.read_response(false)?;
        if reply.status != 200 {
            return Err(format!("status {}: {}", reply.status, reply.snippet()));
        }
        let ctype = reply.header("content-type").unwrap_or_default();
        let wanted = if self.stream {
            "text/event-stream"
        } else {
            "application/json"
        };
        if !ctype.starts_with(wanted) {
            return Err(format!("Content-Type {ctype:?}, not {wanted}"));
        }
        if self.stream {
            Output::of_stream(&reply.body)
        } else {
            Output::of_json(&reply.body)
        }
    }
}

/// A reply in the form compared byte for byte: the generated text, and every JSON
/// document with the fields that differ between two runs removed.
#[derive(Debug, PartialEq)]
pub struct Output {
    text: String,
    docs: Vec<Value>,
}

/// Fields that differ between two identical requests: ids, times, the mock's name.
pub const VOLATILE: [&str; 4] = ["id", "created", "sent_us", "backend"];

pub fn strip(mut doc: Value) -> Value {
    if let Some(map) = doc.as_object_mut() {
        for key in VOLATILE {
            map.remove(key);
        }
    }
    doc
}

/// The generated text of a choice: chat message, chat delta or completion text.
pub fn choice_text(doc: &Value) -> Result<&str, String> {
    let choice = &doc["choices"][0];
    choice["message"]["content"]
        .as_str()
        .or_else(|| choice["delta"]["content"].as_str())
        .or_else(|| choice["text"].as_str())
        .ok_or_else(|| format!("no text in {doc}"))
}

impl Output {
    pub fn of_json(body: &[u8]) -> Result<Output, String> {
        let doc: Value = serde_json::from_slice(body).map_err(|e| {
            format!(
                "not JSON ({e}): {}",
                String::from_utf8_lossy(&body[..body.len().min(300)])
            )
        })?;
        Ok(Output {
            text: choice_text(&doc)?.to_owned(),
            docs: vec![strip(doc)],
        })
    }

    /// An SSE body: `data: {json}` events, each ending in a blank line, then
    /// `data: [DONE]`.
    pub fn of_stream(body: &[u8]) -> Result<Output, String> {
        let text = std::str::from_utf8(body).map_err(|_| "the stream is not UTF-8")?;
        let events = text
            .strip_suffix("\n\n")
            .ok_or_else(|| format!("the stream does not end with a blank line: {text:?}"))?;
        let mut out = Output {
            text: String::new(),
            docs: Vec::new(),
        };
        let mut done = false;
        for event in events.split("\n\n") {
            if done {
                return Err(format!("an event after [DONE]: {event:?}"));
            }
            let data = event
                .strip_prefix("data: ")
                .ok_or_else(|| format!("not an SSE data event: {event:?}"))?;
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let doc: Value = serde_json::from_str(data)
                .map_err(|e| format!("event not JSON ({e}): {data:?}"))?;
            out.text.push_str(choice_text(&doc)?);
            out.docs.push(strip(doc));
        }
        if !done {
            return Err("the stream has no [DONE]".into());
        }
        Ok(out)
    }
}

/// Each normal request sent directly to both mocks: the reference every routed reply
/// must match. The two mocks must agree, or the premise of the check is wrong.
pub fn references(a: SocketAddr, b: SocketAddr) -> Result<BTreeMap<Normal, Output>, String> {
    let fetch = |addr: SocketAddr, n: Normal| -> Result<Output, String> {
        let mut conn = Conn::connect(addr, IO_TIMEOUT).map_err(|e| format!("connect: {e}"))?;
        n.run(&mut conn, None, true)
    };
    let handles: Vec<_> = Normal::all()
        .into_iter()
        .map(|n| thread::spawn(move || (n, fetch(a, n), fetch(b, n))))
        .collect();
    let mut refs = BTreeMap::new();
    for h in handles {
        let (n, from_a, from_b) = h.join().map_err(|_| "a reference thread panicked")?;
        let from_a = from_a.map_err(|e| format!("{n:?} sent to a mock: {e}"))?;
        let from_b = from_b.map_err(|e| format!("{n:?} sent to a mock: {e}"))?;
        if from_a != from_b {
            return Err(format!(
                "the two mocks answer {n:?} differently: {from_a:?} / {from_b:?}"
            ));
        }
        let expected_docs = if n.stream { n.tokens as usize } else { 1 };
        if from_a.docs.len() != expected_docs {
            return Err(format!(
                "{n:?}: {} documents from a mock",
                from_a.docs.len()
            ));
        }
        refs.insert(n, from_a);
    }
    Ok(refs)
}

/// Checks a routed reply against its reference.
pub fn compare(
    n: Normal,
    got: Result<Output, String>,
    refs: &BTreeMap<Normal, Output>,
) -> Option<String> {
    let got = match got {
        Ok(got) => got,
        Err(e) => return Some(format!("{} {} tokens: {e}", n.path, n.tokens)),
    };
    let want = &refs[&n];
    if got.text.as_bytes() != want.text.as_bytes() {
        return Some(format!(
            "{} {} tokens: text {:?}, directly {:?}",
            n.path, n.tokens, got.text, want.text
        ));
    }
    if got.docs != want.docs {
        return Some(format!(
            "{} {} tokens: documents differ: {:?} / directly {:?}",
            n.path, n.tokens, got.docs, want.docs
        ));
    }
    None
}

/// Streams, each on a new connection.
pub fn stream_client(
    addr: SocketAddr,
    t: usize,
    deadline: Instant,
    refs: &BTreeMap<Normal, Output>,
    stats: &Stats,
) {
    stats.declare("normal stream", "200, byte-exact");
    let all: Vec<Normal> = Normal::all().into_iter().filter(|n| n.stream).collect();
    let mut i = t;
    while Instant::now() < deadline {
        let n = all[i % all.len()];
        i += STREAM_CLIENTS + 1;
        let started = Instant::now();
        let got = Conn::connect(addr, IO_TIMEOUT)
            .map_err(|e| format!("connect: {e}"))
            .and_then(|mut conn| n.run(&mut conn, Some(KEY), true));
        let took = started.elapsed();
        stats.record("normal stream", compare(n, got, refs), Some(took));
    }
}

/// The kinds the keep-alive pauses of the JSON clients are counted under.
pub const IDLE_CLOSE_KIND: &str = "keep-alive idle past client_idle_timeout";
/// A request on a reused connection that the router closed with no reply after the
/// client idled `IDLE_CLOSE_AFTER` or more on it: the request and the router's idle
/// close crossed (HTTP/1.1 allows it; the client sends again). Not an error, but
/// counted, so that a router that drops requests on busy connections shows.
pub const IDLE_RACE_KIND: &str = "keep-alive closed unanswered after ~1.75 s idle";
pub const SHORT_PAUSE_KIND: &str = "keep-alive pause of half the idle timeout";
/// The pause of JSON client 1, which the router must sit out.
pub const SHORT_PAUSE: Duration = Duration::from_millis(CLIENT_TIMEOUT_SECS * 500);

/// Whole JSON replies, several on one keep-alive connection. Halfway through each
/// connection, client 0 idles until the router closes the connection for
/// `client_idle_timeout` (and opens a new one), and client 1 pauses for half that
/// (its connection must stay open). A reused connection closed with no reply at all
/// after the client idled about `client_idle_timeout` on it is the router's idle
/// close, whichever client it happens to: the request goes again on a new
/// connection, and it is no error. Any other failure is.
pub fn json_client(
    addr: SocketAddr,
    t: usize,
    deadline: Instant,
    refs: &BTreeMap<Normal, Output>,
    stats: &Stats,
) {
    stats.declare("normal json", "200, byte-exact");
    stats.declare_timed(
        IDLE_CLOSE_KIND,
        "closed by the router, reopened",
        "closed after",
    );
    stats.declare_timed(IDLE_RACE_KIND, "counted, sent again", "idle before");
    if t == 1 {
        stats.declare(SHORT_PAUSE_KIND, "kept open");
    }
    let all: Vec<Normal> = Normal::all().into_iter().filter(|n| !n.stream).collect();
    // The connection, the requests sent on it, and when its last reply ended.
    let mut conn: Option<(Conn, usize, Instant)> = None;
    // A request to send again on a new connection after an idle close.
    let mut again: Option<Normal> = None;
    let mut i = t;
    while Instant::now() < deadline {
        let n = match again.take() {
            Some(n) => n,
            None => {
                let n = all[i % all.len()];
                i += JSON_CLIENTS + 1;
                n
            }
        };
        if conn.is_none() {
            match Conn::connect(addr, IO_TIMEOUT) {
                Ok(c) => conn = Some((c, 0, Instant::now())),
                Err(e) => {
                    stats.record("normal json", Some(format!("connect: {e}")), None);
                    continue;
                }
            }
        }
        let (c, on_conn, idle_since) = conn.as_mut().expect("a connection");
        let mut short_pause = false;
        if *on_conn == KEEP_ALIVE_REQUESTS / 2 {
            if t == 0 {
                let closed = closed_in_time(&c.stream, *idle_since);
                stats.record(IDLE_CLOSE_KIND, closed.as_ref().err().cloned(), closed.ok());
                (conn, again) = (None, Some(n));
                continue;
            }
            if t == 1 {
                thread::sleep(SHORT_PAUSE);
                short_pause = true;
            }
        }
        *on_conn += 1;
        let close = *on_conn >= KEEP_ALIVE_REQUESTS;
        let reused = *on_conn > 1;
        let idle = idle_since.elapsed();
        let started = Instant::now();
        let got = n.run(c, Some(KEY), close);
        let took = started.elapsed();
        *idle_since = Instant::now();
        let unanswered = got.as_ref().is_err_and(|e| e.starts_with(UNANSWERED));
        if short_pause {
            let error = unanswered
                .then(|| format!("closed after a pause of {:.1} s", SHORT_PAUSE.as_secs_f64()));
            stats.record(SHORT_PAUSE_KIND, error, None);
        }
        if unanswered && reused && idle >= IDLE_CLOSE_AFTER {
            stats.record(IDLE_RACE_KIND, None, Some(idle));
            (conn, again) = (None, Some(n));
            continue;
        }
        let failed = got.is_err();
        stats.record("normal json", compare(n, got, refs), Some(took));
        if close || failed {
            conn = None;
        }
    }
}
