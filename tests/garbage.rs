//! Backends that send garbage, against the real router on 127.0.0.1: a reply that is not
//! HTTP, a chunked stream with a broken chunk size, a reply cut mid-body and a head
//! that never ends. The client gets a clean 502 or a reply that visibly breaks off
//! (never one that looks complete), the backend is counted as failing (two such
//! requests mark it down with `failure_threshold = 2`), and the router keeps serving a
//! good backend in the same config. A 4xx from the same backend is not a failure.
//!
//! Each misbehaving backend is a `TcpListener` in the test: it answers `/health` and
//! `/v1/models` (listing `garbage-model`) properly and misbehaves on every POST. The
//! good backend is a `mock-vllm` serving `mock-model`; requests pick one by `model`.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::streaming::{next_chunk, Next};
use crate::support::{
    chat_for, request, servers_toml, wait_until, Conn, FakeBackend, Mock, Resp, Router, CHAT, SOON,
};

/// The model only the misbehaving backend serves.
const GARBAGE_MODEL: &str = "garbage-model";

/// What the misbehaving backend does with a POST.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Garbage {
    /// `hello\r\n`, then close: not HTTP at all.
    NotHttp,
    /// A 200 chunked head, one good chunk, then `zz\r\n` as a chunk size; the
    /// connection stays open until the router closes it.
    BrokenChunks,
    /// A 200 head with `Content-Length: 100`, 10 bytes of body, then close.
    CutBody,
    /// `HTTP/1.1 200 OK` and then header lines without end (`X-A: aaa...`), until
    /// the router closes the connection or 64 MiB were sent.
    EndlessHeader,
    /// A proper `400` with an OpenAI-style body: the backend refusing a request.
    ClientError,
}

/// The first good chunk of the broken stream.
const FIRST_EVENT: &[u8] = b"data: one\n\n";
/// The body the cut reply does send, of the 100 bytes it declares.
const CUT_BODY: &[u8] = b"{\"id\":\"xy\"";
/// One line of the endless header: 1 KiB.
const HEADER_LINE_LEN: usize = 1024;
/// The most the endless header sends before giving up.
const ENDLESS_CAP: u64 = 64 * 1024 * 1024;

/// A backend on 127.0.0.1 that misbehaves on POST, one thread per connection.
struct Fake {
    backend: FakeBackend,
    posts: Arc<AtomicU64>,
    /// The most header bytes one endless-header reply got out.
    header_bytes: Arc<AtomicU64>,
}

impl Fake {
    fn start(garbage: Garbage) -> Fake {
        let posts = Arc::new(AtomicU64::new(0));
        let header_bytes = Arc::new(AtomicU64::new(0));
        let backend = {
            let (posts, header_bytes) = (Arc::clone(&posts), Arc::clone(&header_bytes));
            FakeBackend::start(move |stream| {
                let _ = serve(stream, garbage, &posts, &header_bytes);
            })
        };
        Fake {
            backend,
            posts,
            header_bytes,
        }
    }

    fn posts(&self) -> u64 {
        self.posts.load(Ordering::SeqCst)
    }
}

/// Reads one request (head and Content-Length body) and answers it, then closes.
fn serve(
    stream: TcpStream,
    garbage: Garbage,
    posts: &AtomicU64,
    header_bytes: &AtomicU64,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let _ = stream.set_nodelay(true);
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split(' ');
    let method = parts.next().unwrap_or_default().to_owned();
    let path = parts.next().unwrap_or_default().to_owned();
    let mut length = 0usize;
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((name, value)) = l.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0; length.min(1 << 20)];
    reader.read_exact(&mut body)?;
    let mut out = &stream;
    if method != "POST" {
        let (status, doc) = match path.as_str() {
            "/health" => (200, json!({"status": "ok"})),
            "/v1/models" => (
                200,
                json!({"object": "list", "data": [{"id": GARBAGE_MODEL, "object": "model"}]}),
            ),
            _ => (404, json!({"error": "not found"})),
        };
        return out.write_all(&reply(status, &doc.to_string()));
    }
    posts.fetch_add(1, Ordering::SeqCst);
    match garbage {
        Garbage::NotHttp => out.write_all(b"hello\r\n"),
        Garbage::BrokenChunks => {
            let mut first = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\
                Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                .to_vec();
            first.extend_from_slice(format!("{:x}\r\n", FIRST_EVENT.len()).as_bytes());
            first.extend_from_slice(FIRST_EVENT);
            first.extend_from_slice(b"\r\n");
            out.write_all(&first)?;
            thread::sleep(Duration::from_millis(100));
            out.write_all(b"zz\r\n")?;
            // Held open: the router must act on the chunk size, not on a close.
            let mut sink = [0u8; 1024];
            while matches!(reader.read(&mut sink), Ok(1..)) {}
            Ok(())
        }
        Garbage::CutBody => {
            let mut cut = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                Content-Length: 100\r\nConnection: close\r\n\r\n"
                .to_vec();
            cut.extend_from_slice(CUT_BODY);
            out.write_all(&cut)
        }
        Garbage::EndlessHeader => {
            let mut lines = Vec::with_capacity(1 << 20);
            while lines.len() < 1 << 20 {
                lines.extend_from_slice(b"X-A: ");
                lines.extend(std::iter::repeat_n(b'a', HEADER_LINE_LEN - 7));
                lines.extend_from_slice(b"\r\n");
            }
            out.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")?;
            let mut sent = 0u64;
            let result = loop {
                if sent >= ENDLESS_CAP {
                    break Ok(());
                }
                if let Err(e) = out.write_all(&lines) {
                    break Err(e);
                }
                sent += lines.len() as u64;
                header_bytes.fetch_max(sent, Ordering::SeqCst);
            };
            header_bytes.fetch_max(sent, Ordering::SeqCst);
            result
        }
        Garbage::ClientError => {
            let doc = json!({"error": {"message": "bad prompt", "type": "BadRequestError",
                                       "code": 400}});
            out.write_all(&reply(400, &doc.to_string()))
        }
    }
}

/// A whole JSON reply with `Connection: close`.
fn reply(status: u16, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The fake (server 0) and a good mock (server 1) behind one router that counts
/// request failures only (no active checks), marks a backend down after 2 of them and
/// keeps it down for the whole test.
struct Setup {
    fake: Fake,
    mock: Mock,
    router: Router,
}

fn setup(garbage: Garbage) -> Setup {
    let fake = Fake::start(garbage);
    let mock = Mock::start(&[]);
    let router = Router::start(&servers_toml(
        &[(&fake.backend.url, 4), (&mock.url, 4)],
        "enable_active_health_check = false\nfailure_threshold = 2\n\
         auto_recovery_threshold = 600\nmax_retries = 0\nbackend_metrics_interval = 0",
    ));
    // Until their model lists are known, either backend may get either model.
    wait_until(SOON, "both model lists learned", || {
        let health = router.health();
        health["servers"][0]["models"] == json!([GARBAGE_MODEL])
            && health["servers"][1]["models"] == json!(["mock-model"])
    });
    Setup { fake, mock, router }
}

/// A chat request for `model` on a new connection, HTTP/1.1 or 1.0, `Connection:
/// close`. The connection is returned with nothing read.
fn send_chat(addr: SocketAddr, model: &str, version: &str) -> Conn {
    let body = chat_for(model);
    let mut conn = Conn::open(addr);
    conn.stream
        .set_read_timeout(Some(SOON))
        .expect("read timeout");
    conn.send_raw(
        format!(
            "POST {CHAT} {version}\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    conn
}

/// Checks a clean OpenAI-style 502 from the router itself.
fn assert_bad_gateway(resp: &Resp, what: &str) {
    assert_eq!(resp.status, 502, "{what}: {}", resp.text());
    assert!(
        resp.header("content-type")
            .is_some_and(|ct| ct.starts_with("application/json")),
        "{what}: {:?}",
        resp.headers
    );
    let body = resp.json();
    assert_eq!(body["error"]["type"], "upstream_error", "{what}: {body}");
    assert_eq!(
        body["error"]["code"], "backend_unavailable",
        "{what}: {body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{what}: {body}"
    );
}

/// Reads a reply as an HTTP client does and panics if it is a complete 200: the
/// reply must be a clean 502 or break off visibly (a broken chunk, or the
/// connection closing before the terminating chunk or the declared length). Returns
/// the body bytes of a chunked reply that arrived before the break; `None` for a 502
/// or a body shorter than its declared length.
fn assert_never_complete(conn: &mut Conn, what: &str) -> Option<Vec<u8>> {
    let (status, headers) = conn
        .read_head()
        .unwrap_or_else(|e| panic!("{what}: no reply head: {e}"));
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    if status == 502 {
        let mut body = Vec::new();
        let _ = conn.reader.read_to_end(&mut body);
        let resp = Resp {
            status,
            headers,
            body,
            chunks: Vec::new(),
        };
        assert_bad_gateway(&resp, what);
        return None;
    }
    assert_eq!(status, 200, "{what}: the backend's status goes through");
    let mut body = Vec::new();
    if header("transfer-encoding").is_some_and(|te| te.eq_ignore_ascii_case("chunked")) {
        loop {
            match next_chunk(&mut conn.reader, what) {
                Next::Chunk(chunk) => body.extend_from_slice(&chunk),
                Next::End => panic!(
                    "{what}: the reply ended with a terminating chunk, as a complete one \
                     does, after {:?}",
                    String::from_utf8_lossy(&body)
                ),
                Next::Broke(how) => {
                    eprintln!("{what}: the client saw the reply break off: {how}");
                    return Some(body);
                }
            }
        }
    }
    if let Some(len) = header("content-length") {
        let len: usize = len.parse().expect("content-length");
        let mut buf = vec![0; len];
        // The connection must end before the declared length: a read that times out
        // instead is a client left hanging, not a break it can see.
        match conn.reader.read_exact(&mut buf) {
            Ok(()) => panic!(
                "{what}: all {len} declared bytes arrived: {:?}",
                String::from_utf8_lossy(&buf)
            ),
            Err(e) => assert!(
                matches!(
                    e.kind(),
                    ErrorKind::UnexpectedEof
                        | ErrorKind::ConnectionReset
                        | ErrorKind::ConnectionAborted
                ),
                "{what}: the short body did not end with the connection: {e}"
            ),
        }
        return None;
    }
    // Framed by the close: nothing tells the client the body is short.
    let _ = conn.reader.read_to_end(&mut body);
    panic!(
        "{what}: a reply delimited by the connection close, {} bytes, looks complete: \
         {:?} (headers {headers:?})",
        body.len(),
        String::from_utf8_lossy(&body)
    );
}

/// After the garbage: the router still serves the good backend, no slot is held, and
/// the misbehaving backend is down with at least two request failures counted.
fn assert_keeps_serving_and_counted(s: &mut Setup, what: &str) {
    let resp = request(
        s.router.addr,
        "POST",
        CHAT,
        &[("Content-Type", "application/json")],
        chat_for("mock-model").as_bytes(),
    );
    assert_eq!(resp.status, 200, "after {what}: {}", resp.text());
    assert_eq!(resp.json()["model"], "mock-model");
    assert!(s.mock.stat("total") >= 1);
    wait_until(SOON, "no request in flight", || {
        s.router.in_flight() == [0, 0]
    });
    s.router.assert_alive();

    let mut server = json!(null);
    let counted = Instant::now() + SOON;
    while Instant::now() < counted {
        server = s.router.server(0);
        if server["healthy"] == false && server["request_failures"].as_u64() >= Some(2) {
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    assert!(
        server["healthy"] == false && server["request_failures"].as_u64() >= Some(2),
        "{what}: two requests to a backend that sent garbage must count as two failures \
         and mark it down (failure_threshold = 2), but /health says {server}"
    );
    // Down: its model has no backend now, and nothing more reaches it.
    let posts = s.fake.posts();
    let resp = request(
        s.router.addr,
        "POST",
        CHAT,
        &[("Content-Type", "application/json")],
        chat_for(GARBAGE_MODEL).as_bytes(),
    );
    assert_eq!(resp.status, 503, "{what}, once down: {}", resp.text());
    assert_eq!(
        s.fake.posts(),
        posts,
        "{what}: a backend marked down got a request"
    );
}

#[test]
fn a_reply_that_is_not_http_gets_a_clean_502_and_counts_as_a_failure() {
    let mut s = setup(Garbage::NotHttp);
    for i in 1..=2 {
        let started = Instant::now();
        let mut conn = send_chat(s.router.addr, GARBAGE_MODEL, "HTTP/1.1");
        let resp = conn
            .read_response(false)
            .unwrap_or_else(|e| panic!("request {i}: no whole reply: {e}"));
        assert_bad_gateway(&resp, &format!("request {i}"));
        assert!(started.elapsed() < SOON, "{:?}", started.elapsed());
    }
    assert_eq!(s.fake.posts(), 2);
    assert_keeps_serving_and_counted(&mut s, "a reply that is not HTTP");
}

/// Two requests to a backend whose reply breaks off: neither may look complete to the
/// client, whatever reaches it is the start of what the backend sent (`sent`), and the
/// backend is counted as failing.
fn assert_breaks_never_look_complete(garbage: Garbage, sent: &[u8], per_request: &str, kind: &str) {
    let mut s = setup(garbage);
    for i in 1..=2 {
        let what = format!("{per_request}, request {i}");
        let mut conn = send_chat(s.router.addr, GARBAGE_MODEL, "HTTP/1.1");
        if let Some(body) = assert_never_complete(&mut conn, &what) {
            assert!(
                sent.starts_with(&body),
                "{what}: the client got {:?}",
                String::from_utf8_lossy(&body)
            );
        }
    }
    assert_eq!(s.fake.posts(), 2);
    assert_keeps_serving_and_counted(&mut s, kind);
}

#[test]
fn a_broken_chunked_stream_never_looks_complete_and_counts_as_a_failure() {
    assert_breaks_never_look_complete(
        Garbage::BrokenChunks,
        FIRST_EVENT,
        "broken chunk size",
        "a broken chunked stream",
    );
}

#[test]
fn a_reply_cut_mid_body_never_looks_complete_and_counts_as_a_failure() {
    assert_breaks_never_look_complete(
        Garbage::CutBody,
        CUT_BODY,
        "reply cut after 10 of 100 bytes",
        "a reply cut mid-body",
    );
}

/// An HTTP/1.0 keep-alive client gets the backend's Content-Length, or a reply
/// delimited by the close: one that breaks off must never look complete to it.
#[test]
fn a_reply_cut_mid_body_never_looks_complete_to_an_http10_keep_alive_client() {
    let mut s = setup(Garbage::CutBody);
    let body = chat_for(GARBAGE_MODEL);
    for i in 1..=2 {
        let what = format!("HTTP/1.0 keep-alive, request {i}");
        let mut conn = Conn::open(s.router.addr);
        conn.stream
            .set_read_timeout(Some(SOON))
            .expect("read timeout");
        conn.send_raw(
            format!(
                "POST {CHAT} HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\nConnection: keep-alive\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
        assert_never_complete(&mut conn, &what);
    }
    assert_keeps_serving_and_counted(&mut s, "a reply cut mid-body (HTTP/1.0 keep-alive)");
}

/// An HTTP/1.0 client without keep-alive gets the body delimited by the connection
/// close, so the invalid chunk header that aborts a chunked reply cannot tell it the
/// reply broke off. It must still never see a reply that looks complete: a clean 502,
/// or the backend's own Content-Length so the short body shows.
#[test]
fn a_reply_cut_mid_body_never_looks_complete_to_an_http10_client_without_keep_alive() {
    let s = setup(Garbage::CutBody);
    let what = "reply cut after 10 of 100 bytes, HTTP/1.0 client without keep-alive";
    let mut conn = send_chat(s.router.addr, GARBAGE_MODEL, "HTTP/1.0");
    assert_never_complete(&mut conn, what);
    let resp = request(
        s.router.addr,
        "POST",
        CHAT,
        &[("Content-Type", "application/json")],
        chat_for("mock-model").as_bytes(),
    );
    assert_eq!(resp.status, 200, "after {what}: {}", resp.text());
}

#[test]
fn an_endless_header_gets_a_502_soon_and_memory_stays_bounded() {
    let mut s = setup(Garbage::EndlessHeader);
    let rss_before = crate::support::rss_kib(s.router.pid());
    for i in 1..=2 {
        let started = Instant::now();
        let mut conn = send_chat(s.router.addr, GARBAGE_MODEL, "HTTP/1.1");
        let resp = conn
            .read_response(false)
            .unwrap_or_else(|e| panic!("endless header, request {i}: no whole reply: {e}"));
        let took = started.elapsed();
        assert_bad_gateway(&resp, &format!("endless header, request {i}"));
        assert!(took < SOON, "the 502 took {took:?}");
        eprintln!(
            "endless header, request {i}: 502 after {took:?}; the backend got {} KiB of \
             header out",
            s.fake.header_bytes.load(Ordering::SeqCst) / 1024
        );
    }
    let grown = crate::support::rss_kib(s.router.pid()).saturating_sub(rss_before);
    eprintln!("router RSS grew by {grown} KiB");
    assert!(grown < 16 * 1024, "the router grew by {grown} KiB");
    assert_eq!(s.fake.posts(), 2);
    assert_keeps_serving_and_counted(&mut s, "an endless header");
}

#[test]
fn a_4xx_from_the_backend_is_relayed_and_not_counted_as_a_failure() {
    let s = setup(Garbage::ClientError);
    for i in 1..=3 {
        let mut conn = send_chat(s.router.addr, GARBAGE_MODEL, "HTTP/1.1");
        let resp = conn
            .read_response(false)
            .unwrap_or_else(|e| panic!("request {i}: no whole reply: {e}"));
        assert_eq!(resp.status, 400, "request {i}: {}", resp.text());
        assert_eq!(resp.json()["error"]["message"], "bad prompt");
    }
    let server = s.router.server(0);
    assert_eq!(server["healthy"], true, "{server}");
    assert_eq!(server["request_failures"], 0, "{server}");
    assert_eq!(s.fake.posts(), 3);
    let resp = request(
        s.router.addr,
        "POST",
        CHAT,
        &[("Content-Type", "application/json")],
        chat_for("mock-model").as_bytes(),
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
    wait_until(SOON, "no request in flight", || {
        s.router.in_flight() == [0, 0]
    });
}
