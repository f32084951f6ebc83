//! The one HTTP/1.1 test client: a raw connection that writes any bytes (hostile ones
//! too) and reads replies framed as their heads say, for the integration tests, the
//! soak and the benchmark's control requests.
//!
//! Hand-rolled on purpose: a real client library would refuse to send most of what
//! these clients send, and would hide how the router framed its reply.

use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The start of every error that means the connection was closed before a single
/// byte of a reply came: the only failure that may be a server closing an idle
/// keep-alive connection.
pub const UNANSWERED: &str = "closed with no reply";

/// The socket timeouts of `Conn::open`: a stuck reply is an error, not a hang.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// A response read off the wire, with the arrival time of each body chunk.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// (arrival, bytes) per HTTP chunk, for chunked replies.
    pub chunks: Vec<(Instant, Vec<u8>)>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The first 300 characters of the body, for error messages.
    pub fn snippet(&self) -> String {
        String::from_utf8_lossy(&self.body)
            .chars()
            .take(300)
            .collect()
    }

    /// The body as JSON; panics (with the body) when it is not.
    pub fn json(&self) -> Value {
        self.try_json()
            .unwrap_or_else(|e| panic!("{e}: {}", self.text()))
    }

    pub fn try_json(&self) -> Result<Value, String> {
        serde_json::from_slice(&self.body)
            .map_err(|e| format!("not JSON ({e}): {}", self.snippet()))
    }
}

/// The value of the first header called `name` (any case).
pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// An error that says the peer closed or reset the connection.
pub fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof
    )
}

/// A raw client connection, for keep-alive, streaming, hostile and disconnect cases.
pub struct Conn {
    pub stream: TcpStream,
    pub reader: BufReader<TcpStream>,
}

impl Conn {
    /// Connects with `timeout` for the connect and for every read and write.
    pub fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<Conn> {
        let stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(Conn { stream, reader })
    }

    /// `connect` with `IO_TIMEOUT`; panics when the connection fails (for tests).
    pub fn open(addr: SocketAddr) -> Conn {
        Conn::connect(addr, IO_TIMEOUT).unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
    }

    /// Sends a request with `Host`, the headers, a Content-Length when there is a body
    /// (or for a POST), and `Connection: close` when asked; panics when it cannot.
    pub fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        close: bool,
    ) {
        self.send_raw(&request_bytes(method, path, headers, body, close));
    }

    /// Sends `bytes` as they are; panics when it cannot (for tests).
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send request");
    }

    /// Sends `bytes` as they are; a closed or reset connection is an `UNANSWERED` error.
    pub fn try_send_raw(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.stream.write_all(bytes).map_err(|e| {
            if is_reset(&e) {
                format!("{UNANSWERED} (send: {e})")
            } else {
                format!("send: {e}")
            }
        })
    }

    /// Reads the status line and headers only.
    pub fn read_head(&mut self) -> Result<(u16, Vec<(String, String)>), String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => return Err(format!("{UNANSWERED} (end of stream)")),
            Err(e) if line.is_empty() && is_reset(&e) => return Err(format!("{UNANSWERED} ({e})")),
            Err(e) => return Err(format!("reading the status line: {e}")),
            Ok(_) => {}
        }
        let status = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line {line:?}"))?;
        let mut headers = Vec::new();
        loop {
            line.clear();
            self.reader
                .read_line(&mut line)
                .map_err(|e| format!("reading a header: {e}"))?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let (n, v) = l
                .split_once(':')
                .ok_or_else(|| format!("bad header line {l:?}"))?;
            headers.push((n.trim().to_owned(), v.trim().to_owned()));
        }
        Ok((status, headers))
    }

    /// Reads one chunk of a chunked body: `Ok(None)` at the terminating chunk (whose
    /// CRLF it reads; no trailers are expected).
    pub fn read_chunk(&mut self) -> Result<Option<Vec<u8>>, String> {
        read_chunk(&mut self.reader).map_err(|e| e.to_string())
    }

    /// Reads a whole response, framed as its head says (`head_request`: the reply to a
    /// HEAD, which has no body whatever its head says).
    pub fn read_response(&mut self, head_request: bool) -> Result<Resp, String> {
        let (status, headers) = self.read_head()?;
        let mut resp = Resp {
            status,
            headers,
            body: Vec::new(),
            chunks: Vec::new(),
        };
        if head_request || status == 204 || status == 304 {
            return Ok(resp);
        }
        if resp
            .header("transfer-encoding")
            .is_some_and(|te| te.eq_ignore_ascii_case("chunked"))
        {
            while let Some(chunk) = self.read_chunk()? {
                resp.body.extend_from_slice(&chunk);
                resp.chunks.push((Instant::now(), chunk));
            }
        } else if let Some(len) = resp.header("content-length") {
            let len: usize = len.parse().map_err(|_| format!("bad length {len:?}"))?;
            resp.body.resize(len, 0);
            self.reader
                .read_exact(&mut resp.body)
                .map_err(|e| format!("reading the body: {e}"))?;
        } else {
            self.reader
                .read_to_end(&mut resp.body)
                .map_err(|e| format!("reading the body: {e}"))?;
        }
        Ok(resp)
    }
}

/// The bytes of a request: the request line, `Host`, the headers, a Content-Length
/// when there is a body (or for a POST), `Connection: close` when asked, the body.
pub fn request_bytes(
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    close: bool,
) -> Vec<u8> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    for (n, v) in headers {
        let _ = write!(head, "{n}: {v}\r\n");
    }
    if !body.is_empty() || method == "POST" {
        let _ = write!(head, "Content-Length: {}\r\n", body.len());
    }
    if close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// A request with `Host`, then `extra` header lines (each ending in CRLF), then
/// `body`, as they are: nothing added, nothing checked.
pub fn raw(method: &str, target: &str, extra: &str, body: &[u8]) -> Vec<u8> {
    let mut bytes =
        format!("{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n").into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// One request on a new connection (`Connection: close`), `timeout` for the connect
/// and every read: a refused connection or a broken reply is an `Err`.
pub fn fetch(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> Result<Resp, String> {
    let mut conn = Conn::connect(addr, timeout).map_err(|e| format!("connect to {addr}: {e}"))?;
    conn.try_send_raw(&request_bytes(method, path, headers, body, true))?;
    conn.read_response(method == "HEAD")
}

/// `GET path` on a new connection, within `IO_TIMEOUT`.
pub fn get(addr: SocketAddr, path: &str) -> Result<Resp, String> {
    fetch(addr, "GET", path, &[], b"", IO_TIMEOUT)
}

/// `GET path` on a new connection, its body as JSON.
pub fn get_json(addr: SocketAddr, path: &str) -> Result<Value, String> {
    get(addr, path)?
        .try_json()
        .map_err(|e| format!("GET {path}: {e}"))
}

/// Why the next chunk of a chunked reply could not be read.
#[derive(Debug)]
pub enum ChunkError {
    /// The connection ended (EOF or a reset) before the chunk was whole: a break its
    /// client cannot miss.
    Ended(String),
    /// Nothing more came within the socket's read timeout: the reply neither went on
    /// nor ended.
    TimedOut,
    /// Bytes that are not a chunk, or another read error.
    Bad(String),
}

impl std::fmt::Display for ChunkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChunkError::Ended(how) => write!(f, "the reply ended: {how}"),
            ChunkError::TimedOut => f.write_str("the reply neither went on nor ended in time"),
            ChunkError::Bad(what) => f.write_str(what),
        }
    }
}

/// Reads the next chunk of a chunked body: its data, or `None` for the terminating
/// chunk.
pub fn read_chunk(reader: &mut impl BufRead) -> Result<Option<Vec<u8>>, ChunkError> {
    let failed = |doing: &str, e: io::Error| match e.kind() {
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => ChunkError::Ended(format!("{doing}: {e}")),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ChunkError::TimedOut,
        _ => ChunkError::Bad(format!("{doing}: {e}")),
    };
    let mut line = Vec::new();
    reader
        .read_until(b'\n', &mut line)
        .map_err(|e| failed("reading a chunk size", e))?;
    if !line.ends_with(b"\n") {
        return Err(ChunkError::Ended(format!(
            "EOF after {:?} of a chunk size line",
            String::from_utf8_lossy(&line)
        )));
    }
    let size = std::str::from_utf8(&line)
        .ok()
        .and_then(|l| usize::from_str_radix(l.trim_end(), 16).ok())
        .ok_or_else(|| {
            ChunkError::Bad(format!(
                "bad chunk size line {:?}",
                String::from_utf8_lossy(&line)
            ))
        })?;
    let mut data = vec![0; size + 2];
    reader
        .read_exact(&mut data)
        .map_err(|e| failed("reading a chunk", e))?;
    if !data.ends_with(b"\r\n") {
        return Err(ChunkError::Bad("chunk not followed by CRLF".into()));
    }
    data.truncate(size);
    Ok((size > 0).then_some(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_bytes_frame_a_body_and_the_close() {
        let bytes = request_bytes("POST", "/x", &[("A", "b")], b"{}", true);
        assert_eq!(
            String::from_utf8_lossy(&bytes),
            "POST /x HTTP/1.1\r\nHost: 127.0.0.1\r\nA: b\r\nContent-Length: 2\r\n\
             Connection: close\r\n\r\n{}"
        );
        let get = request_bytes("GET", "/", &[], b"", false);
        assert_eq!(get, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    }
}
