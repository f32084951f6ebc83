//! Writing replies to the client: the only code that knows HTTP/1.1 response framing.
//!
//! A relayed reply goes out as it arrives (`BodyWriter`): the head, then each piece of
//! body as one chunk, flushed at once, so an SSE event leaves the router the moment it
//! arrives from the backend (the listening socket has `TCP_NODELAY`, see `client::listener`, so
//! small writes are not held by Nagle either). Replies whose whole body is known (the
//! router's own JSON and errors) go out in one write (`send_full`); an error's status,
//! headers and body are `RouterError::reply`'s, its framing is this module's.
//!
//! Bodies of unknown length are sent chunked to HTTP/1.1 clients; an HTTP/1.0 client,
//! which has no chunked framing, gets the backend's Content-Length when it sent one and
//! otherwise a body ended by closing the connection. A reply that cannot be finished
//! (the backend broke off) is never ended properly: the connection is closed before the
//! last chunk, so the client sees a cut reply, not a complete one, as with nginx.
//!
//! Every reply says `Connection: close` when the connection will not carry another
//! request (`Request::must_close`): a body left unread, or a client that asked.

use std::io::{self, Write};
use std::time::Instant;

use crate::client::connection::Connection;
use crate::client::head::Version;
use crate::client::request::Request;
use crate::request::error::RouterError;

/// How the body of a reply is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `Transfer-Encoding: chunked`: HTTP/1.1 clients.
    Chunked,
    /// `Content-Length`, as the backend declared it (HTTP/1.0 clients).
    Length(u64),
    /// Ended by closing the connection (HTTP/1.0 clients, no length known).
    Close,
    /// No body at all (HEAD, 204, 304).
    None,
}

impl Framing {
    /// The framing for a relayed body to this client: `declared` is the backend's
    /// Content-Length, if any.
    pub fn for_client(version: Version, declared: Option<u64>) -> Framing {
        match (version, declared) {
            (Version::Http11, _) => Framing::Chunked,
            (Version::Http10, Some(n)) => Framing::Length(n),
            (Version::Http10, None) => Framing::Close,
        }
    }
}

/// A reply being written to the client. The head is held back until the first body
/// bytes (or `flush_head`, or the end), so head and first chunk leave in one write.
pub struct BodyWriter<'a> {
    request: &'a mut Request,
    framing: Framing,
    pending: Vec<u8>,
    bytes_out: u64,
    first_byte: Option<Instant>,
}

impl<'a> BodyWriter<'a> {
    /// Starts a reply; nothing is written until `send`, `flush_head` or `finish_body`.
    pub fn start(
        request: &'a mut Request,
        status: u16,
        headers: &[(String, String)],
        framing: Framing,
    ) -> BodyWriter<'a> {
        let close = request.must_close() || framing == Framing::Close;
        let mut pending = Vec::with_capacity(256);
        write_head(
            &mut pending,
            request.head.version,
            status,
            headers,
            framing,
            close,
        );
        request.reply_started(close);
        let framing = if request.head.method == "HEAD" {
            Framing::None
        } else {
            framing
        };
        BodyWriter {
            request,
            framing,
            pending,
            bytes_out: 0,
            first_byte: None,
        }
    }

    /// Sends one piece of body and flushes it to the client at once.
    pub fn send(&mut self, data: &[u8]) -> io::Result<()> {
        self.hold(data);
        self.push()
    }

    /// Sends the head now, before any body: a stream's head reaches the client when
    /// the backend sends it, not with the first token.
    pub fn flush_head(&mut self) -> io::Result<()> {
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
            Framing::Length(_) | Framing::Close => self.pending.extend_from_slice(data),
            Framing::None => {}
        }
        self.bytes_out += data.len() as u64;
    }

    /// Ends the body properly; the reply is then complete.
    pub fn finish_body(&mut self) -> io::Result<()> {
        if self.framing == Framing::Chunked {
            self.pending.extend_from_slice(b"0\r\n\r\n");
        }
        self.push()?;
        self.request.reply_finished();
        Ok(())
    }

    /// Ends a reply that cannot be finished: what was sent stays, and the connection
    /// is closed without the end of the body, so the client cannot take it for
    /// complete.
    pub fn abort(&mut self) {
        self.pending.clear();
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
            self.request.connection().write_all(&self.pending)?;
            self.pending.clear();
            self.first_byte.get_or_insert_with(Instant::now);
        }
        Ok(())
    }
}

/// Writes a whole reply whose body is known, in one write.
pub fn send_full(
    request: &mut Request,
    status: u16,
    headers: &[(String, String)],
    body: &[u8],
) -> io::Result<()> {
    let close = request.must_close();
    let head_only = request.head.method == "HEAD";
    let out = full_reply(
        request.head.version,
        status,
        headers,
        body,
        head_only,
        close,
    );
    request.reply_started(close);
    request.connection().write_all(&out)?;
    request.reply_finished();
    Ok(())
}

/// A whole reply: head with Content-Length, then the body unless `head_only`.
fn full_reply(
    version: Version,
    status: u16,
    headers: &[(String, String)],
    body: &[u8],
    head_only: bool,
    close: bool,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + body.len());
    write_head(
        &mut out,
        version,
        status,
        headers,
        Framing::Length(body.len() as u64),
        close,
    );
    if !head_only {
        out.extend_from_slice(body);
    }
    out
}

/// Answers with one of the router's own errors, adding `extra` headers. Returns the
/// size of the body sent.
pub fn send_error(
    request: &mut Request,
    err: &RouterError,
    extra: &[(String, String)],
) -> io::Result<u64> {
    let reply = err.reply(extra);
    send_full(request, reply.status, &reply.headers, reply.body.as_bytes())?;
    Ok(reply.body.len() as u64)
}

/// Answers a head the router could not read, on a connection that closes after it.
pub fn send_head_error(connection: &mut Connection, err: &RouterError) -> io::Result<()> {
    let reply = err.reply(&[]);
    let out = full_reply(
        Version::Http11,
        reply.status,
        &reply.headers,
        reply.body.as_bytes(),
        false,
        true,
    );
    connection.write_all(&out)
}

/// `HTTP/1.1 101 Switching Protocols` with the backend's handshake headers: after it
/// the connection carries WebSocket frames (`request::tunnel`), never another request.
pub fn send_switching(request: &mut Request, headers: &[(String, String)]) -> io::Result<()> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"HTTP/1.1 101 Switching Protocols\r\n");
    write_fields(&mut out, headers);
    out.extend_from_slice(b"\r\n");
    request.reply_started(true);
    request.connection().write_all(&out)?;
    request.reply_finished();
    Ok(())
}

/// `HTTP/1.1 100 Continue`, for a client that waits for it before sending its body.
pub fn send_continue(connection: &mut Connection) -> io::Result<()> {
    connection.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
}

fn write_head(
    out: &mut Vec<u8>,
    version: Version,
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
    write_fields(out, headers);
    match framing {
        Framing::Chunked => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
        Framing::Length(n) => {
            let _ = write!(out, "Content-Length: {n}\r\n");
        }
        Framing::Close | Framing::None => {}
    }
    if close {
        out.extend_from_slice(b"Connection: close\r\n");
    } else if version == Version::Http10 {
        out.extend_from_slice(b"Connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

fn write_fields(out: &mut Vec<u8>, headers: &[(String, String)]) {
    for (name, value) in headers {
        // Values came through the router's head parser, httparse or ureq, which refuse
        // CR and LF; check again because a header that splits here would inject a
        // response.
        if name
            .bytes()
            .chain(value.bytes())
            .any(|b| b == b'\r' || b == b'\n')
        {
            continue;
        }
        let _ = write!(out, "{name}: {value}\r\n");
    }
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
        write_head(&mut out, Version::Http11, status, &headers, framing, close);
        String::from_utf8(out).expect("ascii head")
    }

    #[test]
    fn heads_carry_status_headers_and_framing() {
        assert_eq!(
            head(200, &[("Content-Type", "text/event-stream")], Framing::Chunked, false),
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
        assert_eq!(
            head(503, &[], Framing::Length(0), true),
            "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
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

    #[test]
    fn an_http10_client_that_keeps_the_connection_is_told_so() {
        let mut out = Vec::new();
        write_head(
            &mut out,
            Version::Http10,
            200,
            &[],
            Framing::Length(2),
            false,
        );
        assert!(String::from_utf8_lossy(&out).contains("Connection: keep-alive\r\n"));
        assert_eq!(Framing::for_client(Version::Http10, None), Framing::Close);
        assert_eq!(
            Framing::for_client(Version::Http10, Some(5)),
            Framing::Length(5)
        );
        assert_eq!(
            Framing::for_client(Version::Http11, Some(5)),
            Framing::Chunked
        );
    }
}
