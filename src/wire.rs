//! Writing responses to the client: the only place that knows HTTP/1.1 response framing.
//!
//! tiny_http's own `Response` path pushes a body of unknown length through an 8 KiB
//! chunk encoder and never flushes, which holds a token stream back for a second or
//! more. So a relayed backend reply goes through `request.into_writer()` instead
//! (`BodyWriter`): the head is written here, and each piece of body becomes one HTTP
//! chunk followed by a flush, so an SSE event leaves the router the moment it arrives
//! from the backend. The listening socket has `TCP_NODELAY` (see `server`), so those
//! small writes are not held by Nagle either. Replies whose whole body is known (the
//! router's own JSON and errors) use tiny_http's `respond` (`send_full`).
//!
//! Bodies of unknown length are sent chunked to HTTP/1.1 clients. Chunked framing is
//! also what lets the router abort a reply visibly: a backend that breaks mid-body
//! makes the router write an invalid chunk header, so the client sees an error instead
//! of a reply that looks complete.

use std::io::{self, Write};
use std::thread;
use std::time::Instant;

use tiny_http::{HTTPVersion, Request};

use crate::clients::Ticket;
use crate::error::RouterError;

/// How the body of a response is delimited on the client connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `Transfer-Encoding: chunked`: HTTP/1.1 clients.
    Chunked,
    /// No body at all (HEAD, 204, 304).
    None,
}

/// What the client's request says about the connection.
#[derive(Debug, Clone, Copy)]
pub struct ClientConn {
    pub http10: bool,
    /// The client wants the connection closed after this reply.
    pub close: bool,
    pub head_request: bool,
}

impl ClientConn {
    pub fn of(request: &Request) -> ClientConn {
        let http10 = *request.http_version() == HTTPVersion(1, 0);
        let connection = request
            .headers()
            .get("Connection")
            .map(|v| v.as_str().to_ascii_lowercase())
            .unwrap_or_default();
        let close = connection.contains("close") || (http10 && !connection.contains("keep-alive"));
        ClientConn {
            http10,
            close,
            head_request: *request.method() == tiny_http::Method::Head,
        }
    }

    /// The framing for a body whose length is not known up front. An HTTP/1.0 client
    /// has no chunked framing, and a body ended by closing the connection would look
    /// complete even when the backend broke off: such a reply is read whole first and
    /// sent with a Content-Length (`None`: the caller buffers).
    pub fn streaming_framing(&self) -> Option<Framing> {
        (!self.http10).then_some(Framing::Chunked)
    }
}

/// A response being written to the client. The head is held back until the first
/// body bytes (or `finish`), so head and first chunk leave in one write.
pub struct BodyWriter {
    out: Box<dyn Write + Send>,
    framing: Framing,
    pending: Vec<u8>,
    bytes_out: u64,
    first_byte: Option<Instant>,
}

impl BodyWriter {
    /// Starts a response; nothing is written until `send` or `finish`.
    pub fn start(
        request: Request,
        ticket: &Ticket,
        conn: ClientConn,
        status: u16,
        headers: &[(String, String)],
        framing: Framing,
    ) -> BodyWriter {
        let mut head = Vec::with_capacity(256);
        write_head(&mut head, status, headers, framing, conn.close);
        let framing = if conn.head_request {
            Framing::None
        } else {
            framing
        };
        BodyWriter {
            // Timed, so a client that stops reading is seen by the janitor.
            out: Box::new(ticket.watch(request.into_writer())),
            framing,
            pending: head,
            bytes_out: 0,
            first_byte: None,
        }
    }

    /// Sends one piece of body and flushes it to the client at once.
    pub fn send(&mut self, data: &[u8]) -> io::Result<()> {
        self.hold(data);
        self.push()
    }

    /// Frames a piece of body without sending it yet: for the last piece of a reply of
    /// known length, which then leaves together with the end of the body in one write.
    pub fn hold(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        match self.framing {
            Framing::Chunked => {
                let _ = write!(self.pending, "{:x}\r\n", data.len());
                self.pending.extend_from_slice(data);
                self.pending.extend_from_slice(b"\r\n");
            }
            Framing::None => {}
        }
        self.bytes_out += data.len() as u64;
    }

    /// Ends the body properly.
    pub fn finish_body(&mut self) -> io::Result<()> {
        if self.framing == Framing::Chunked {
            self.pending.extend_from_slice(b"0\r\n\r\n");
        }
        self.push()
    }

    /// Ends the reply so that the client cannot take it for complete: an invalid chunk
    /// header makes any HTTP/1.1 client fail the response and drop the connection.
    pub fn abort(&mut self) {
        if self.framing == Framing::Chunked {
            self.pending
                .extend_from_slice(b"ROUTER-ABORTED: the backend failed mid-reply\r\n\r\n");
            let _ = self.push();
        }
    }

    /// Body bytes sent, not counting framing.
    pub fn bytes_out(&self) -> u64 {
        self.bytes_out
    }

    /// When the first bytes (head and first chunk) left for the client.
    pub fn first_byte(&self) -> Option<Instant> {
        self.first_byte
    }

    fn push(&mut self) -> io::Result<()> {
        if !self.pending.is_empty() {
            self.out.write_all(&self.pending)?;
            self.pending.clear();
            self.first_byte.get_or_insert_with(Instant::now);
        }
        self.out.flush()
    }
}

/// Writes a whole response whose body is known. This goes through tiny_http's own
/// `respond`, the one path that writes the reply *before* dropping the request.
///
/// A request whose body was not read (`unread_body`: refused before it, or an
/// endpoint that takes none) is drained by tiny_http when it is dropped, which waits
/// for the client to send the rest or go away, and tiny_http drops a `Connection:
/// close` set on a `Response`. So such a reply is written, and the request dropped, on
/// a short-lived thread of its own: a client that declares a body and never sends it
/// holds that thread (as it already holds tiny_http's thread for its connection), never
/// a worker.
pub fn send_full(
    request: Request,
    ticket: &Ticket,
    status: u16,
    headers: &[(String, String)],
    body: &[u8],
    unread_body: bool,
) -> io::Result<()> {
    let mut response = tiny_http::Response::from_data(body).with_status_code(status);
    for (name, value) in headers {
        // tiny_http refuses names and values that could split the head (CR, LF, NUL).
        if let Ok(header) = tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes()) {
            response.add_header(header);
        }
    }
    if !unread_body {
        // A reply larger than the socket's buffers blocks on a client that does not
        // read, like a stream.
        let _writing = ticket.writing();
        return request.respond(response);
    }
    thread::Builder::new()
        .name("drain".to_owned())
        .stack_size(DRAIN_STACK)
        .spawn(move || {
            let _ = request.respond(response);
        })
        .map(|_| ())
}

/// A drain thread only reads and discards; it needs little stack.
const DRAIN_STACK: usize = 64 * 1024;

/// Whether the request still declares body bytes that nobody has read.
pub fn declares_body(request: &Request) -> bool {
    request.body_length().is_some_and(|n| n > 0)
        || request.headers().get("Transfer-Encoding").is_some()
}

/// Answers with one of the router's own errors, adding `extra` headers. Returns the
/// size of the body sent. `unread_body` as for `send_full`.
pub fn send_error(
    request: Request,
    ticket: &Ticket,
    err: &RouterError,
    extra: &[(String, String)],
    unread_body: bool,
) -> io::Result<u64> {
    let mut headers = vec![("Content-Type".to_owned(), "application/json".to_owned())];
    headers.extend_from_slice(extra);
    if let Some(secs) = err.retry_after() {
        headers.push(("Retry-After".to_owned(), secs.to_string()));
    }
    if let RouterError::MethodNotAllowed { allow } = err {
        headers.push(("Allow".to_owned(), (*allow).to_owned()));
    }
    if let RouterError::Unauthorized = err {
        headers.push((
            "WWW-Authenticate".to_owned(),
            "Bearer realm=\"vllm-router\"".to_owned(),
        ));
    }
    let body = err.body();
    send_full(
        request,
        ticket,
        err.status(),
        &headers,
        body.as_bytes(),
        unread_body,
    )?;
    Ok(body.len() as u64)
}

fn write_head(
    out: &mut Vec<u8>,
    status: u16,
    headers: &[(String, String)],
    framing: Framing,
    close: bool,
) {
    let reason = ureq::http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Unknown");
    let _ = write!(out, "HTTP/1.1 {status} {reason}\r\n");
    for (name, value) in headers {
        // Values came through tiny_http or ureq, which refuse CR and LF; check again
        // because a header that splits here would inject a response.
        if name
            .bytes()
            .chain(value.bytes())
            .any(|b| b == b'\r' || b == b'\n')
        {
            continue;
        }
        let _ = write!(out, "{name}: {value}\r\n");
    }
    match framing {
        Framing::Chunked => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
        Framing::None => {}
    }
    if close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(status: u16, headers: &[(&str, &str)], framing: Framing, close: bool) -> String {
        let headers: Vec<(String, String)> = headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        let mut out = Vec::new();
        write_head(&mut out, status, &headers, framing, close);
        String::from_utf8(out).expect("ascii head")
    }

    #[test]
    fn heads_carry_status_headers_and_framing() {
        assert_eq!(
            head(200, &[("Content-Type", "text/event-stream")], Framing::Chunked, false),
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
        assert_eq!(
            head(503, &[], Framing::None, true),
            "HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n\r\n"
        );
        assert_eq!(
            head(299, &[], Framing::None, false),
            "HTTP/1.1 299 Unknown\r\n\r\n"
        );
    }

    #[test]
    fn a_header_with_a_line_break_is_never_written() {
        assert_eq!(
            head(
                200,
                &[("X-Evil", "a\r\nSet-Cookie: x=1")],
                Framing::None,
                false
            ),
            "HTTP/1.1 200 OK\r\n\r\n"
        );
    }
}
