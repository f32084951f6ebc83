use std::io::BufReader;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use vllm_router_tools::http::{self, ChunkError};

use crate::support::{servers_toml, wait_until, Conn, Mock, Router};

const CHAT: &str = "/v1/chat/completions";
const STREAM_BODY: &str =
    r#"{"model":"mock-model","messages":[{"role":"user","content":"hi"}],"stream":true}"#;

/// What comes next in a chunked reply, as its client sees it.
#[derive(Debug, PartialEq)]
pub(crate) enum Next {
    Chunk(Vec<u8>),
    /// The terminating chunk: the reply looks complete.
    End,
    /// The connection ended (EOF or reset) before the terminating chunk: the break
    /// no client can miss.
    Broke(String),
}

/// Reads the next chunk of a chunked reply. Only the connection's end counts as a
/// break: a read timeout panics, because a router that stops sending but keeps the
/// connection open leaves its client hanging, which it cannot tell from a slow
/// stream; a malformed chunk panics too, as the router must never send one.
pub(crate) fn next_chunk(reader: &mut BufReader<TcpStream>, what: &str) -> Next {
    match http::read_chunk(reader) {
        Ok(Some(data)) => Next::Chunk(data),
        Ok(None) => Next::End,
        Err(ChunkError::Ended(how)) => Next::Broke(how),
        Err(ChunkError::TimedOut) => panic!(
            "{what}: the reply neither went on nor ended within the read timeout: \
             a hung reply is no visible break"
        ),
        Err(e @ ChunkError::Bad(_)) => panic!("{what}: {e}"),
    }
}

/// Opens a stream of `tokens` events `delay_ms` apart and returns the connection with
/// the head already read.
fn open_stream(addr: SocketAddr, tokens: u32, delay_ms: u32) -> Conn {
    let (tokens, delay) = (tokens.to_string(), delay_ms.to_string());
    let mut conn = Conn::open(addr);
    conn.send(
        "POST",
        CHAT,
        &[
            ("Content-Type", "application/json"),
            ("x-mock-tokens", &tokens),
            ("x-mock-delay-ms", &delay),
        ],
        STREAM_BODY.as_bytes(),
        true,
    );
    let (status, headers) = conn.read_head().expect("stream head");
    assert_eq!(status, 200);
    assert!(
        headers
            .iter()
            .any(|(n, v)| n.eq_ignore_ascii_case("content-type")
                && v.starts_with("text/event-stream")),
        "{headers:?}"
    );
    conn
}

/// Arrival time of each SSE event, measured from the request.
fn event_times(addr: SocketAddr, tokens: u32, delay_ms: u32) -> Vec<Duration> {
    let started = Instant::now();
    let mut conn = open_stream(addr, tokens, delay_ms);
    let mut times = Vec::new();
    while let Some(chunk) = conn.read_chunk().expect("chunk") {
        let text = String::from_utf8_lossy(&chunk);
        for _ in text.matches("data: ") {
            times.push(started.elapsed());
        }
    }
    times
}

#[test]
fn events_arrive_one_by_one_not_at_the_end() {
    let mock = Mock::start(&[]);
    let router = Router::start(&servers_toml(&[(&mock.url, 4)], ""));
    let direct = event_times(mock.addr, 10, 100);
    let routed = event_times(router.addr, 10, 100);
    // 10 tokens and [DONE].
    assert_eq!(routed.len(), 11, "{routed:?}");
    assert_eq!(direct.len(), 11, "{direct:?}");
    let (first, last) = (routed[0], routed[10]);
    assert!(
        last >= Duration::from_millis(900),
        "the stream lasted only {last:?}"
    );
    assert!(
        first < Duration::from_millis(600),
        "first event only after {first:?}: buffered"
    );
    // Each event follows the backend's pace (100 ms). A busy machine may delay one
    // event onto the next now and then; buffering would clump them all.
    let clumped = routed[..10]
        .windows(2)
        .filter(|pair| pair[1] - pair[0] < Duration::from_millis(50))
        .count();
    assert!(clumped <= 2, "events clumped: {routed:?}");
    eprintln!(
        "time to first event: direct {:?}, through the router {:?}",
        direct[0], routed[0]
    );
}

#[test]
fn a_client_that_leaves_mid_stream_closes_the_backend_and_frees_the_slot() {
    let mock = Mock::start(&[]);
    let router = Router::start(&servers_toml(&[(&mock.url, 2)], ""));
    let mut conn = open_stream(router.addr, 10_000, 20);
    assert!(conn.read_chunk().expect("first event").is_some());
    assert_eq!(router.in_flight(), [1]);
    drop(conn);
    // The router notices at its next write, drops the backend connection, and the
    // mock sees its own write fail: generation stops.
    wait_until(
        Duration::from_secs(5),
        "the mock sees the stream aborted",
        || mock.stat("aborted") == 1 && mock.stat("in_flight") == 0,
    );
    wait_until(Duration::from_secs(5), "the router frees the slot", || {
        router.in_flight() == [0]
    });
    assert!(mock.stat("total") == 1);
}

#[test]
fn a_thousand_aborted_streams_leave_every_count_at_zero() {
    let a = Mock::start(&[]);
    let b = Mock::start(&[]);
    let router = Arc::new(Router::start(&servers_toml(
        &[(&a.url, 8), (&b.url, 8)],
        "queue_timeout = 60",
    )));
    let threads: Vec<_> = (0..16)
        .map(|t| {
            let router = Arc::clone(&router);
            thread::spawn(move || {
                for i in 0..(1000 / 16 + usize::from(t < 1000 % 16)) {
                    let mut conn = open_stream(router.addr, 100_000, 1);
                    // Half leave after the first event, half right after the head.
                    if i % 2 == 0 {
                        assert!(conn.read_chunk().expect("first event").is_some());
                    }
                    drop(conn);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client thread");
    }
    assert_eq!(a.stat("total") + b.stat("total"), 1000);
    wait_until(
        Duration::from_secs(10),
        "router in-flight back to zero",
        || router.in_flight() == [0, 0],
    );
    wait_until(
        Duration::from_secs(10),
        "backends see every stream closed",
        || a.stat("in_flight") == 0 && b.stat("in_flight") == 0,
    );
    // No peak check here: a backend notices a closed stream only at its next write,
    // so its own count lags the router's by a token or two. The cap itself is checked
    // on completed requests in the `admission` tests.
    eprintln!(
        "in-flight after 1000 aborted streams: {:?}",
        router.in_flight()
    );
}

#[test]
fn a_backend_that_breaks_mid_stream_never_looks_complete() {
    // A "backend" that answers a POST with a chunked head and one event, then
    // closes; anything else (the health thread's model fetch) gets a 404.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            use std::io::{Read, Write};
            let mut buf = [0u8; 4096];
            let n = s.read(&mut buf).unwrap_or(0);
            let reply: &[u8] = if buf[..n].starts_with(b"POST") {
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n\
                  b\r\ndata: one\n\n\r\n"
            } else {
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            };
            let _ = s.write_all(reply);
        }
    });
    let toml = servers_toml(&[(&url, 1)], "enable_active_health_check = false");
    let router = Router::start_with(&toml, &[], &[]).expect("router starts");
    let mut conn = Conn::open(router.addr);
    conn.send("POST", CHAT, &[], STREAM_BODY.as_bytes(), false);
    let (status, _) = conn.read_head().expect("head");
    assert_eq!(status, 200);
    assert_eq!(
        conn.read_chunk().expect("first event"),
        Some(b"data: one\n\n".to_vec())
    );
    // Next comes no terminating chunk but the connection's end, soon: the client
    // cannot miss it, nor wait for it forever.
    conn.stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("read timeout");
    let next = next_chunk(&mut conn.reader, "after the backend broke off");
    assert!(
        matches!(next, Next::Broke(_)),
        "a broken stream must end with the connection, not with {next:?}"
    );
    wait_until(Duration::from_secs(5), "slot freed", || {
        router.in_flight() == [0]
    });
}

/// A client that leaves during a long non-streamed generation: nothing is written to
/// it until the end, so only the janitor can notice (the socket in CLOSE_WAIT). The
/// router stops the backend connection, the backend (like vLLM) aborts the
/// generation, the slot is free at once, and the backend is not blamed.
#[test]
fn a_client_that_leaves_a_non_streamed_generation_stops_it() {
    let mock = Mock::start(&[]);
    let router = Router::start(&servers_toml(&[(&mock.url, 1)], ""));
    let mut conn = Conn::open(router.addr);
    let body = br#"{"model":"mock-model","messages":[{"role":"user","content":"hi"}]}"#;
    conn.send(
        "POST",
        CHAT,
        &[
            ("Content-Type", "application/json"),
            ("X-Request-Id", "left-mid-generation"),
            ("x-mock-tokens", "100"),
            ("x-mock-delay-ms", "100"),
        ],
        body,
        false,
    );
    wait_until(Duration::from_secs(5), "the generation runs", || {
        mock.stat("in_flight") == 1
    });
    let left = Instant::now();
    drop(conn);
    wait_until(Duration::from_secs(5), "the slot is free", || {
        router.in_flight() == [0]
    });
    wait_until(Duration::from_secs(5), "the backend aborted", || {
        mock.stat("aborted") == 1 && mock.stat("in_flight") == 0
    });
    assert!(
        left.elapsed() < Duration::from_secs(5),
        "stopped long before the 10 s generation would end"
    );
    let mut entry = None;
    wait_until(Duration::from_secs(5), "its access entry", || {
        entry = router.access_entry("left-mid-generation");
        entry.is_some()
    });
    let entry = entry.expect("entry");
    assert_eq!(entry["status"], 499, "{entry}");
    assert_eq!(entry["outcome"], "client_closed_request", "{entry}");
    assert_eq!(
        router.server(0)["request_failures"],
        0,
        "the backend is not blamed"
    );
    assert_eq!(router.server(0)["healthy"], true);
    // The slot serves the next request.
    assert_eq!(router.post(CHAT, crate::support::CHAT_BODY).status, 200);
}
