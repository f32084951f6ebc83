//! The slow clients: each breaks one client timeout (or cuts its body short) and
//! checks how, and when, the router ends its connection.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use vllm_router_tools::hostile::SMALL_CHAT;
use vllm_router_tools::http::{is_reset, raw, Conn};
use vllm_router_tools::procfs;

use crate::stats::Stats;
use crate::{
    auth, CHAT, CLIENT_TIMEOUT, CLIENT_TIMEOUT_SECS, CLOSE_SLACK, EARLY_SLACK, IO_TIMEOUT,
    SLOWLORIS_GAP, STALLED_TOKENS,
};

/// A slow client: it breaks one client timeout (or cuts its body short) and checks
/// how, and when, the router ends its connection.
pub struct Slow {
    name: &'static str,
    expect: &'static str,
    /// What the time it returns measures.
    timing: &'static str,
    /// Runs it once; `n` makes its request id unique.
    run: fn(SocketAddr, u64) -> Result<Duration, String>,
}

pub const SLOWLORIS: &str = "slowloris head, a byte every 200 ms";
pub const IDLE_CONNECTION: &str = "connection that sends nothing";
pub const SLOW_BODY: &str = "body stalls at 1000 of 5000 bytes";
pub const STALLED_READER: &str = "stops reading a 100000-token stream";
pub const CUT_BODY: &str = "body cut short: 100 of 5000 bytes, FIN";
/// The request ids of the slow requests that have one, for the access-log checks.
pub const SLOWLORIS_ID: &str = "soak-slowloris-";
pub const SLOW_BODY_ID: &str = "soak-slow-body-";
pub const STALLED_ID: &str = "soak-stalled-";
pub const CUT_BODY_ID: &str = "soak-cut-body-";
/// The declared length of the slow and cut bodies.
pub const SLOW_BODY_LEN: usize = 5000;

pub fn slows() -> Vec<Slow> {
    vec![
        Slow {
            name: SLOWLORIS,
            expect: "closed (idle), never forwarded",
            timing: "closed after",
            run: slowloris,
        },
        Slow {
            name: IDLE_CONNECTION,
            expect: "closed (idle)",
            timing: "closed after",
            run: idle_connection,
        },
        Slow {
            name: SLOW_BODY,
            expect: "closed (slow_body), never forwarded",
            timing: "closed after",
            run: slow_body,
        },
        Slow {
            name: STALLED_READER,
            expect: "closed (stalled_write), cut",
            timing: "closed after",
            run: stalled_reader,
        },
        Slow {
            name: CUT_BODY,
            expect: "400, never forwarded",
            timing: "answered after",
            run: cut_body,
        },
    ]
}

/// Goes through every slow client, each thread from its own place in the list: they
/// take seconds each, so they run beside the hostile clients, not among them.
pub fn slow_client(addr: SocketAddr, t: usize, deadline: Instant, stats: &Stats) {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let all = slows();
    for s in &all {
        stats.declare_timed(s.name, s.expect, s.timing);
    }
    let mut i = t;
    while Instant::now() < deadline {
        let s = &all[i % all.len()];
        i += 1;
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        match (s.run)(addr, n) {
            Ok(took) => stats.record(s.name, None, Some(took)),
            Err(e) => stats.record(s.name, Some(e), None),
        }
    }
}

/// A head sent a byte every `SLOWLORIS_GAP`: far too long to finish before the
/// router's idle timeout closes the connection.
pub fn slowloris(addr: SocketAddr, n: u64) -> Result<Duration, String> {
    let mut conn = Conn::connect(addr, IO_TIMEOUT).map_err(|e| format!("connect: {e}"))?;
    let extra = format!(
        "X-Request-Id: {SLOWLORIS_ID}{n}\r\n{}Connection: close\r\nContent-Type: \
         application/json\r\nContent-Length: {}\r\n",
        auth(),
        SMALL_CHAT.len()
    );
    let request = raw("POST", CHAT, &extra, SMALL_CHAT.as_bytes());
    let since = Instant::now();
    for (sent, byte) in request.iter().enumerate() {
        match conn.stream.write_all(&[*byte]) {
            Ok(()) => {}
            Err(e) if is_reset(&e) => return in_time(since.elapsed()),
            Err(e) => return Err(format!("send: {e}")),
        }
        if poll_closed(&conn.stream, SLOWLORIS_GAP)? {
            return in_time(since.elapsed());
        }
        if since.elapsed() > CLIENT_TIMEOUT + CLOSE_SLACK {
            return Err(format!(
                "still open after {:.1} s, {sent} bytes of the head sent",
                since.elapsed().as_secs_f64()
            ));
        }
    }
    Err("the whole request went out a byte at a time and the connection stayed open".into())
}

/// A connection that sends nothing at all.
pub fn idle_connection(addr: SocketAddr, _: u64) -> Result<Duration, String> {
    let conn = Conn::connect(addr, IO_TIMEOUT).map_err(|e| format!("connect: {e}"))?;
    closed_in_time(&conn.stream, Instant::now())
}

/// A request declaring a body of `SLOW_BODY_LEN` bytes (over 1 KiB, so not read with
/// the head), of which only the first `sent` are sent.
pub fn partial_body(addr: SocketAddr, request_id: &str, sent: usize) -> Result<Conn, String> {
    let mut conn = Conn::connect(addr, IO_TIMEOUT).map_err(|e| format!("connect: {e}"))?;
    let mut body = SMALL_CHAT.as_bytes().to_vec();
    body.resize(SLOW_BODY_LEN, b' ');
    let extra = format!(
        "X-Request-Id: {request_id}\r\n{}Connection: close\r\nContent-Type: \
         application/json\r\nContent-Length: {SLOW_BODY_LEN}\r\n",
        auth()
    );
    conn.try_send_raw(&raw("POST", CHAT, &extra, &body[..sent]))?;
    Ok(conn)
}

/// A head and the first 1000 bytes of the body, then nothing: once
/// `client_body_timeout` has passed the router answers 408 with `Connection: close`
/// and closes the connection (as nginx does).
pub fn slow_body(addr: SocketAddr, n: u64) -> Result<Duration, String> {
    let mut conn = partial_body(addr, &format!("{SLOW_BODY_ID}{n}"), 1000)?;
    let since = Instant::now();
    conn.stream
        .set_read_timeout(Some(CLIENT_TIMEOUT + CLOSE_SLACK))
        .map_err(|e| format!("set_read_timeout: {e}"))?;
    let reply = conn.read_response(false)?;
    let took = since.elapsed();
    if reply.status != 408
        || !reply
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    {
        return Err(format!(
            "answered {} {:?}, not 408 with Connection: close",
            reply.status, reply.headers
        ));
    }
    if !poll_closed(&conn.stream, CLOSE_SLACK)? {
        return Err("still open after its 408".into());
    }
    in_time(took)
}

/// A stream of `STALLED_TOKENS` tokens sent as fast as the mock can: the client reads
/// the head and then nothing, so the router's writes block once the socket buffers
/// are full.
pub fn stalled_reader(addr: SocketAddr, n: u64) -> Result<Duration, String> {
    let mut conn = Conn::connect(addr, IO_TIMEOUT).map_err(|e| format!("connect: {e}"))?;
    // A small receive buffer, so the router's writes block soon after the client stops
    // reading: with the kernel's autotuned megabytes, how long filling them takes
    // depends on how fast the mock makes tokens, not on the router.
    small_receive_buffer(&conn.stream)?;
    let body = format!(
        r#"{{"model":"mock-model","messages":[{{"role":"user","content":"soak"}}],"max_tokens":{STALLED_TOKENS},"stream":true}}"#
    );
    let extra = format!(
        "X-Request-Id: {STALLED_ID}{n}\r\n{}Connection: close\r\nx-mock-delay-ms: 0\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n",
        auth(),
        body.len()
    );
    conn.try_send_raw(&raw("POST", CHAT, &extra, body.as_bytes()))?;
    let (status, _) = conn.read_head()?;
    if status != 200 {
        return Err(format!("status {status}"));
    }
    let since = Instant::now();
    let local = conn
        .stream
        .local_addr()
        .map_err(|e| format!("local address: {e}"))?;
    // The router's FIN waits behind the bytes this client leaves unread, so the close
    // is seen on the router's end of the connection, in the kernel's table.
    while procfs::tcp_established(addr, local)? {
        if since.elapsed() > CLIENT_TIMEOUT + CLOSE_SLACK {
            return Err(format!(
                "the router's end still open after {:.1} s",
                since.elapsed().as_secs_f64()
            ));
        }
        thread::sleep(Duration::from_millis(100));
    }
    let took = in_time(since.elapsed())?;
    // What the router had sent is still on its way: it must be a stream cut short.
    let mut rest = Vec::new();
    let _ = conn.reader.read_to_end(&mut rest);
    if rest.ends_with(b"\r\n0\r\n\r\n") {
        return Err(format!(
            "the stream ended normally ({} bytes after the head)",
            rest.len()
        ));
    }
    Ok(took)
}

/// A body of `SLOW_BODY_LEN` bytes declared, 100 sent, then the client's FIN.
pub fn cut_body(addr: SocketAddr, n: u64) -> Result<Duration, String> {
    let mut conn = partial_body(addr, &format!("{CUT_BODY_ID}{n}"), 100)?;
    conn.stream
        .shutdown(Shutdown::Write)
        .map_err(|e| format!("shutdown: {e}"))?;
    let since = Instant::now();
    let reply = conn.read_response(false)?;
    let took = since.elapsed();
    if reply.status != 400 {
        return Err(format!("status {}: {}", reply.status, reply.snippet()));
    }
    let doc: Value = serde_json::from_slice(&reply.body)
        .map_err(|e| format!("not JSON ({e}): {}", reply.snippet()))?;
    if doc["error"]["code"] != "bad_request" {
        return Err(format!("error body {doc}, code bad_request wanted"));
    }
    if took > CLIENT_TIMEOUT + CLOSE_SLACK {
        return Err(format!("answered after {:.1} s", took.as_secs_f64()));
    }
    Ok(took)
}

/// Caps the kernel's receive buffer of `stream` at 16 KiB (std has no call for it).
pub fn small_receive_buffer(stream: &TcpStream) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let size: libc::c_int = 16 * 1024;
    // SAFETY: a valid socket and a pointer to a c_int that lives across the call, with
    // its size.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(format!("SO_RCVBUF: {}", io::Error::last_os_error()));
    }
    Ok(())
}

/// Whether the router has closed `stream` (the end of the stream, or a reset),
/// waiting up to `wait`. Anything the router sends instead is an error.
pub fn poll_closed(stream: &TcpStream, wait: Duration) -> Result<bool, String> {
    stream
        .set_read_timeout(Some(wait))
        .map_err(|e| format!("set_read_timeout: {e}"))?;
    let mut buf = [0; 256];
    match stream.peek(&mut buf) {
        Ok(0) => Ok(true),
        Ok(n) => Err(format!(
            "answered instead of closing: {:?}",
            String::from_utf8_lossy(&buf[..n])
        )),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            Ok(false)
        }
        Err(e) if is_reset(&e) => Ok(true),
        Err(e) => Err(format!("reading: {e}")),
    }
}

/// Waits for the router to close `stream`; returns how long after `since` it did.
pub fn closed_in_time(stream: &TcpStream, since: Instant) -> Result<Duration, String> {
    while !poll_closed(stream, Duration::from_millis(100))? {
        if since.elapsed() > CLIENT_TIMEOUT + CLOSE_SLACK {
            return Err(format!(
                "still open after {:.1} s",
                since.elapsed().as_secs_f64()
            ));
        }
    }
    in_time(since.elapsed())
}

/// A close `took` after its clock started: no sooner than the timeout, no later than
/// `CLOSE_SLACK` after it.
pub fn in_time(took: Duration) -> Result<Duration, String> {
    if took + EARLY_SLACK < CLIENT_TIMEOUT {
        Err(format!(
            "closed after {:.2} s, before its timeout of {CLIENT_TIMEOUT_SECS} s",
            took.as_secs_f64()
        ))
    } else if took > CLIENT_TIMEOUT + CLOSE_SLACK {
        Err(format!(
            "closed only after {:.1} s (timeout {CLIENT_TIMEOUT_SECS} s)",
            took.as_secs_f64()
        ))
    } else {
        Ok(took)
    }
}
