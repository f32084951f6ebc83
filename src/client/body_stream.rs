//! A request body read as it is sent on, never held whole: a `Read` over the client's
//! connection that follows the body's framing (Content-Length, or chunked through the
//! strict `Decoder`), under the same rules as `Request::read_body` (`max_body_bytes`,
//! `client_body_timeout`, `100 Continue`). Multipart uploads use it
//! (`request::upload`), so a 64 MiB audio file costs the router a few reads' worth
//! of memory, not 64 MiB.
//!
//! Why the body stopped, when it did not end properly, is kept (`failure`) so that
//! the request is answered with that error (413, 408, 400) rather than with whatever
//! the HTTP client towards the backend made of a failed read.

use std::io::{self, Read};
use std::time::Instant;

use crate::client::chunked::Decoder;
use crate::client::connection::is_timeout;
use crate::client::head::{Framing, Version};
use crate::client::reply;
use crate::client::request::{BodyLimits, Request};
use crate::request::error::RouterError;

/// The body of `request`, read as it is asked for.
pub struct BodyStream<'a> {
    request: &'a mut Request,
    limits: BodyLimits,
    deadline: Instant,
    /// Bytes of a Content-Length body still to come.
    left: u64,
    /// The chunked decoder, and what it decoded but was not read yet.
    chunked: Option<(Decoder, Vec<u8>, usize)>,
    /// Body bytes handed out so far.
    pub taken: u64,
    /// Why the body stopped early, if it did.
    pub failure: Option<RouterError>,
    done: bool,
}

impl<'a> BodyStream<'a> {
    /// Starts reading `request`'s body: refuses at once (413) a declared length over
    /// `max_bytes`, and sends `100 Continue` when the client waits for it.
    pub fn start(request: &'a mut Request, limits: BodyLimits) -> Result<Self, RouterError> {
        let framing = request.head.framing;
        if let Framing::Length(n) = framing {
            if n > limits.max_bytes {
                return Err(RouterError::BodyTooLarge {
                    limit: limits.max_bytes,
                });
            }
        }
        if framing != Framing::None
            && request.head.expect_continue
            && request.head.version == Version::Http11
        {
            reply::send_continue(request.connection()).map_err(|_| RouterError::ClientClosed)?;
        }
        let deadline = request.received() + limits.timeout;
        let (left, chunked) = match framing {
            Framing::Length(n) => (n, None),
            Framing::Chunked => (0, Some((Decoder::default(), Vec::new(), 0))),
            Framing::None => (0, None),
        };
        let done = framing == Framing::None;
        if done {
            request.body_finished();
        }
        Ok(BodyStream {
            request,
            limits,
            deadline,
            left,
            chunked,
            taken: 0,
            failure: None,
            done,
        })
    }

    /// Whether the whole body has been read.
    pub fn is_done(&self) -> bool {
        self.done
    }

    fn fail(&mut self, err: RouterError) -> io::Error {
        let e = io::Error::other(err.to_string());
        self.failure = Some(err);
        e
    }

    /// Reads more from the client into the connection's buffer.
    fn fill(&mut self) -> io::Result<()> {
        let taken = self.taken;
        match self.request.connection().fill(self.deadline) {
            Ok(0) => Err(self.fail(RouterError::BadRequest(format!(
                "the request body ended after {taken} bytes, before its end"
            )))),
            Ok(_) => Ok(()),
            Err(e) if is_timeout(&e) => {
                self.request.connection().timed_out = Some("slow_body");
                let limit = self.limits.timeout;
                Err(self.fail(RouterError::BodyTimeout { limit }))
            }
            Err(_) => Err(self.fail(RouterError::ClientClosed)),
        }
    }

    fn finished(&mut self) {
        self.done = true;
        self.request.body_finished();
    }
}

impl Read for BodyStream<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.done || out.is_empty() {
            return Ok(0);
        }
        if self.failure.is_some() {
            return Err(io::Error::other("the request body failed"));
        }
        if self.chunked.is_none() {
            if self.request.connection().buffered().is_empty() {
                self.fill()?;
            }
            let connection = self.request.connection();
            let buffered = connection.buffered();
            let n = buffered.len().min(out.len()).min(self.left as usize);
            out[..n].copy_from_slice(&buffered[..n]);
            connection.consume(n);
            self.left -= n as u64;
            self.taken += n as u64;
            if self.left == 0 {
                self.finished();
            }
            return Ok(n);
        }
        loop {
            let Some((decoder, decoded, at)) = &mut self.chunked else {
                return Ok(0);
            };
            if *at < decoded.len() {
                let n = (decoded.len() - *at).min(out.len());
                out[..n].copy_from_slice(&decoded[*at..*at + n]);
                *at += n;
                self.taken += n as u64;
                return Ok(n);
            }
            decoded.clear();
            *at = 0;
            if decoder.is_done() {
                self.finished();
                return Ok(0);
            }
            let connection = self.request.connection();
            if connection.buffered().is_empty() {
                self.fill()?;
                continue;
            }
            let Some((decoder, decoded, _)) = &mut self.chunked else {
                return Ok(0);
            };
            let connection = self.request.connection();
            let used = match decoder.feed(connection.buffered(), decoded) {
                Ok(used) => used,
                Err(e) => return Err(self.fail(RouterError::BadRequest(e.to_string()))),
            };
            connection.consume(used);
            let total = self.taken + decoded.len() as u64;
            if total > self.limits.max_bytes {
                let limit = self.limits.max_bytes;
                return Err(self.fail(RouterError::BodyTooLarge { limit }));
            }
        }
    }
}
