//! A request as a worker holds it: its head, its connection (lent by the connection
//! thread), and what has happened on that connection since the head, which decides
//! whether it can carry another request.
//!
//! A connection is reused only when its request's body was read whole under valid
//! framing and its reply was complete and delimited. Every other ending (a refusal
//! before the body, a framing error, a reply cut off) closes it, so bytes the router
//! has not read as a body are never read as the next request.
//!
//! Dropping the `Request` gives the connection back to its thread, however the
//! request ended; one dropped while a panic unwinds first answers 500 if nothing was
//! written yet.

use std::fmt;
use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::client::budget::{self, Budget, Share};
use crate::client::chunked::{ChunkError, Decoder};
use crate::client::connection::{is_timeout, Connection};
use crate::client::head::{self, Framing, Head, HeadError, Scanner, Version};
use crate::client::registry::{Returned, Ticket};
use crate::client::reply;
use crate::request::error::RouterError;

/// What the request may hold and how long its body may take.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// `max_body_bytes`.
    pub max_bytes: u64,
    /// `max_buffered_body_bytes`: all bodies held at once.
    pub budget: u64,
    /// `client_body_timeout`, from the end of the head.
    pub timeout: Duration,
}

/// A request body read whole, counted in the body budget until it drops.
pub struct Body {
    bytes: Vec<u8>,
    _share: Option<Share>,
}

impl Body {
    fn empty() -> Body {
        Body {
            bytes: Vec::new(),
            _share: None,
        }
    }
}

impl Deref for Body {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

/// One request and the connection it came on.
pub struct Request {
    pub head: Head,
    /// `Some` until given back, in `drop`.
    connection: Option<Connection>,
    ticket: Ticket,
    /// When the head was read: the start of the body's clock.
    received: Instant,
    /// The body has been read whole, or there is none.
    body_read: bool,
    /// A reply head has been written, or is being.
    replied: bool,
    /// The reply said `Connection: close`.
    reply_closes: bool,
    /// The reply ended properly.
    reply_done: bool,
}

impl Request {
    pub fn new(head: Head, connection: Connection, ticket: Ticket) -> Request {
        Request {
            body_read: !head.has_body(),
            head,
            connection: Some(connection),
            ticket,
            received: Instant::now(),
            replied: false,
            reply_closes: false,
            reply_done: false,
        }
    }

    pub fn ticket(&self) -> &Ticket {
        &self.ticket
    }

    pub fn peer(&self) -> SocketAddr {
        self.ticket.peer()
    }

    pub fn is_secure(&self) -> bool {
        self.connection.as_ref().is_some_and(Connection::is_secure)
    }

    /// Whether the connection closes after this reply: the client asked, or bytes of
    /// its body are still unread.
    pub fn must_close(&self) -> bool {
        !self.head.keep_alive || !self.body_read
    }

    /// The connection, which only `drop` takes away.
    pub(crate) fn connection(&mut self) -> &mut Connection {
        self.connection
            .as_mut()
            .expect("the connection stays with the request until it drops")
    }

    pub(crate) fn reply_started(&mut self, closes: bool) {
        self.replied = true;
        self.reply_closes = closes;
    }

    pub(crate) fn reply_finished(&mut self) {
        self.reply_done = true;
    }

    /// When the head was read: where the body's clock starts (`client::body_stream`).
    pub(crate) fn received(&self) -> Instant {
        self.received
    }

    /// The body was read whole by a stream (`client::body_stream`).
    pub(crate) fn body_finished(&mut self) {
        self.body_read = true;
    }

    /// Reads the whole body within `limits`. A body over `max_bytes` is refused
    /// before it is read when its length is declared, and as soon as it passes the
    /// limit otherwise; one that ends early or breaks its framing is refused, never
    /// forwarded in part.
    pub fn read_body(
        &mut self,
        limits: BodyLimits,
        budget: &Arc<Budget>,
    ) -> Result<Body, RouterError> {
        let framing = self.head.framing;
        if framing == Framing::None {
            return Ok(Body::empty());
        }
        let too_large = RouterError::BodyTooLarge {
            limit: limits.max_bytes,
        };
        if let Framing::Length(n) = framing {
            if n > limits.max_bytes {
                return Err(too_large);
            }
        }
        if self.head.expect_continue && self.head.version == Version::Http11 {
            reply::send_continue(self.connection()).map_err(|_| RouterError::ClientClosed)?;
        }
        let deadline = self.received + limits.timeout;
        let room_deadline = Instant::now() + budget::WAIT_FOR_ROOM;
        let mut share = budget.share();
        let mut bytes = Vec::new();
        let no_room = || RouterError::BodyBudget;
        match framing {
            Framing::Length(n) => {
                if !budget.grow(&mut share, n, limits.budget, room_deadline) {
                    return Err(no_room());
                }
                bytes.reserve_exact(n as usize);
                let connection = self.connection();
                while (bytes.len() as u64) < n {
                    if connection.buffered().is_empty() {
                        fill_body(connection, deadline, limits.timeout, || {
                            format!(
                                "the request body ended after {} of its {n} bytes",
                                bytes.len()
                            )
                        })?;
                    }
                    let buffered = connection.buffered();
                    let take = buffered.len().min((n - bytes.len() as u64) as usize);
                    bytes.extend_from_slice(&buffered[..take]);
                    connection.consume(take);
                }
            }
            Framing::Chunked => {
                let mut decoder = Decoder::default();
                let connection = self.connection();
                while !decoder.is_done() {
                    if connection.buffered().is_empty() {
                        fill_body(connection, deadline, limits.timeout, || {
                            format!(
                                "the chunked request body ended after {} bytes, before its last chunk",
                                bytes.len()
                            )
                        })?;
                    }
                    let used = decoder
                        .feed(connection.buffered(), &mut bytes)
                        .map_err(|e| RouterError::BadRequest(e.to_string()))?;
                    connection.consume(used);
                    if bytes.len() as u64 > limits.max_bytes {
                        return Err(too_large);
                    }
                    let (held, taken) = (bytes.len() as u64, share.bytes());
                    if held > taken {
                        // In steps, so a body of many small chunks does not take the
                        // budget's lock for each; never past `max_bytes`, which `held`
                        // is within.
                        let step = (held - taken)
                            .max(CHUNKED_STEP)
                            .min(limits.max_bytes - taken);
                        if !budget.grow(&mut share, step, limits.budget, room_deadline) {
                            return Err(no_room());
                        }
                    }
                }
            }
            Framing::None => {}
        }
        self.body_read = true;
        Ok(Body {
            bytes,
            _share: Some(share),
        })
    }
}

/// Why `message_end` refused a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageError {
    Head(HeadError),
    Body(ChunkError),
}

impl fmt::Display for MessageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MessageError::Head(e) => e.fmt(f),
            MessageError::Body(e) => e.fmt(f),
        }
    }
}

/// Where the first request in `buf` ends, its body included, decided by the code a
/// connection runs: `head::next_head` as `Connection::read_head` calls it, then the
/// framing `read_body` follows, with its chunked `Decoder`. `Ok(Some((head, n)))`: the
/// request is `buf[..n]`; `Ok(None)`: more bytes are needed. What only the config
/// decides (`max_body_bytes`, the budget, the timeouts) and what is refused once the
/// head is read (methods, keys, WebSocket) are the caller's: this is the framing
/// verdict, without a socket, that the differential test against llhttp and the fuzz
/// targets (`fuzz/`) check.
pub fn message_end(
    buf: &[u8],
    max_header_bytes: usize,
) -> Result<Option<(Head, usize)>, MessageError> {
    let Some((head, head_len)) = head::next_head(&mut Scanner::default(), buf, max_header_bytes)
        .map_err(MessageError::Head)?
    else {
        return Ok(None);
    };
    let body = &buf[head_len..];
    let body_len = match head.framing {
        Framing::None => Some(0),
        Framing::Length(n) => usize::try_from(n).ok().filter(|&n| n <= body.len()),
        Framing::Chunked => {
            let mut decoder = Decoder::default();
            let used = decoder
                .feed(body, &mut Vec::new())
                .map_err(MessageError::Body)?;
            decoder.is_done().then_some(used)
        }
    };
    Ok(body_len.map(|n| (head, head_len + n)))
}

/// Reads more of a body from `connection`, by `deadline`: a client that ends the
/// body early gets 400 saying how far it got (`ended`), one too slow 408.
fn fill_body(
    connection: &mut Connection,
    deadline: Instant,
    timeout: Duration,
    ended: impl FnOnce() -> String,
) -> Result<(), RouterError> {
    match connection.fill(deadline) {
        Ok(0) => Err(RouterError::BadRequest(ended())),
        Ok(_) => Ok(()),
        Err(e) if is_timeout(&e) => {
            connection.timed_out = Some("slow_body");
            Err(RouterError::BodyTimeout { limit: timeout })
        }
        Err(_) => Err(RouterError::ClientClosed),
    }
}

/// How much of the budget a chunked body takes at a time.
const CHUNKED_STEP: u64 = 64 * 1024;

impl Drop for Request {
    fn drop(&mut self) {
        let Some(mut connection) = self.connection.take() else {
            return;
        };
        let panicking = std::thread::panicking();
        if panicking && !self.replied {
            let _ = reply::send_head_error(&mut connection, &RouterError::Internal);
        }
        let reusable = !panicking
            && self.body_read
            && self.replied
            && self.reply_done
            && !self.reply_closes
            && self.head.keep_alive;
        self.ticket.hand_back(Returned {
            connection,
            reusable,
        });
    }
}
