//! One client connection's socket, owned by the router: plain TCP or TLS (rustls, in
//! builds with the `tls` feature), a read buffer the size of which is capped, the
//! client timeouts enforced on the socket itself, and the way a connection is closed.
//!
//! The connection thread owns it between requests and lends it to the worker serving
//! a request (`client::request`); only one thread uses it at a time, so the TLS session
//! needs no lock. Timeouts are deadlines turned into `SO_RCVTIMEO` before each read,
//! so a client that trickles bytes cannot stretch them; `SO_SNDTIMEO` bounds each
//! write, so a client that stops reading is let go after `client_write_timeout`.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use crate::client::head::{self, Head, HeadError, Scanner};

/// The size of one read from the client, and the buffer an idle connection keeps.
pub const READ_CHUNK: usize = 4 * 1024;

/// How long, and how much, a closing connection reads and discards after its write
/// side is shut: enough for the client to see the reply and the end before the
/// socket closes (closing with unread bytes would send a reset, which can destroy the
/// reply in the client's buffers), never long enough to be held open.
const DRAIN_FOR: Duration = Duration::from_secs(2);
const DRAIN_BYTES: usize = 256 * 1024;

/// Why reading a request head ended without one.
#[derive(Debug)]
pub enum HeadRead {
    /// The client closed the connection (or it broke) before sending a byte of it.
    Closed,
    /// `client_idle_timeout` passed without a whole head.
    TimedOut,
    /// The connection broke mid-head.
    Broken(io::Error),
    /// The head cannot be served; the reply says why, then the connection closes.
    Invalid(HeadError),
}

enum Stream {
    Plain(TcpStream),
    #[cfg(feature = "tls")]
    Tls(Box<rustls::StreamOwned<rustls::ServerConnection, TcpStream>>),
}

/// A client connection: its socket and the bytes read from it but not used yet.
pub struct Connection {
    stream: Stream,
    /// Bytes read; `buf[start..]` are not used yet (the start of a body, or of the
    /// next request).
    buf: Vec<u8>,
    start: usize,
    peer: SocketAddr,
    /// The `SO_RCVTIMEO` last set, to skip the system call when it would not change.
    read_timeout: Option<Duration>,
    /// Set when a client timeout ended the connection: the label of
    /// `vllm_router_client_connections_closed_total`.
    pub timed_out: Option<&'static str>,
}

impl Connection {
    /// A plain TCP connection, each write bounded by `write_timeout`.
    pub fn plain(tcp: TcpStream, peer: SocketAddr, write_timeout: Duration) -> io::Result<Self> {
        tcp.set_write_timeout(Some(write_timeout.max(Duration::from_millis(1))))?;
        Ok(Connection::new(Stream::Plain(tcp), peer))
    }

    /// A TLS connection: the handshake runs here, on the connection's own thread,
    /// within `deadline`.
    #[cfg(feature = "tls")]
    pub fn tls(
        tcp: TcpStream,
        peer: SocketAddr,
        config: std::sync::Arc<rustls::ServerConfig>,
        deadline: Instant,
        write_timeout: Duration,
    ) -> io::Result<Self> {
        tcp.set_write_timeout(Some(write_timeout.max(Duration::from_millis(1))))?;
        let session = rustls::ServerConnection::new(config).map_err(io::Error::other)?;
        let mut connection = Connection::new(
            Stream::Tls(Box::new(rustls::StreamOwned::new(session, tcp))),
            peer,
        );
        connection.set_deadline(deadline)?;
        if let Stream::Tls(tls) = &mut connection.stream {
            while tls.conn.is_handshaking() {
                tls.conn.complete_io(&mut tls.sock)?;
            }
        }
        Ok(connection)
    }

    fn new(stream: Stream, peer: SocketAddr) -> Self {
        Connection {
            stream,
            buf: Vec::new(),
            start: 0,
            peer,
            read_timeout: None,
            timed_out: None,
        }
    }

    fn tcp(&self) -> &TcpStream {
        match &self.stream {
            Stream::Plain(tcp) => tcp,
            #[cfg(feature = "tls")]
            Stream::Tls(tls) => &tls.sock,
        }
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    pub fn is_secure(&self) -> bool {
        !matches!(self.stream, Stream::Plain(_))
    }

    /// The socket's descriptor, which the connection thread polls while a worker has
    /// the connection (`client::handoff`).
    pub fn fd(&self) -> RawFd {
        self.tcp().as_raw_fd()
    }

    /// Reads the next request head, holding at most `max_bytes` of it (plus one read)
    /// in memory, within `deadline`.
    pub fn read_head(&mut self, max_bytes: usize, deadline: Instant) -> Result<Head, HeadRead> {
        let mut scanner = Scanner::default();
        loop {
            let unread = &self.buf[self.start..];
            match head::next_head(&mut scanner, unread, max_bytes) {
                Err(e) => return Err(HeadRead::Invalid(e)),
                Ok(Some((head, end))) => {
                    self.consume(end);
                    return Ok(head);
                }
                Ok(None) => {}
            }
            let started = !unread.is_empty();
            match self.fill(deadline) {
                Ok(0) if started => {
                    return Err(HeadRead::Broken(io::ErrorKind::UnexpectedEof.into()))
                }
                Ok(0) => return Err(HeadRead::Closed),
                Ok(_) => {}
                Err(e) if is_timeout(&e) => {
                    self.timed_out = Some("idle");
                    return Err(HeadRead::TimedOut);
                }
                Err(_) if !started => return Err(HeadRead::Closed),
                Err(e) => return Err(HeadRead::Broken(e)),
            }
        }
    }

    /// The bytes read and not used yet.
    pub fn buffered(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    /// Whether bytes already taken off the socket wait to be used: in the buffer, or
    /// (TLS) decrypted and held by rustls. A `poll` on the socket would not tell of
    /// them; the WebSocket tunnel (`request::tunnel`) asks before it waits.
    pub fn has_pending(&mut self) -> bool {
        if !self.buffered().is_empty() {
            return true;
        }
        match &mut self.stream {
            Stream::Plain(_) => false,
            #[cfg(feature = "tls")]
            Stream::Tls(tls) => tls
                .conn
                .process_new_packets()
                .is_ok_and(|state| state.plaintext_bytes_to_read() > 0),
        }
    }

    /// Marks `n` buffered bytes as used.
    pub fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
            // A large head or body read leaves a large buffer: an idle connection
            // keeps one read's worth.
            if self.buf.capacity() > 2 * READ_CHUNK {
                self.buf = Vec::new();
            }
        }
    }

    /// Reads once more from the client, within `deadline`. Returns how many bytes
    /// were added to `buffered`, 0 at the end of the stream.
    pub fn fill(&mut self, deadline: Instant) -> io::Result<usize> {
        self.set_deadline(deadline)?;
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let len = self.buf.len();
        // Exact, so a head held up to its cap takes the cap plus one read, not the
        // doubling a growing vector would give.
        self.buf.reserve_exact(READ_CHUNK);
        self.buf.resize(len + READ_CHUNK, 0);
        let result = loop {
            let read = match &mut self.stream {
                Stream::Plain(tcp) => tcp.read(&mut self.buf[len..]),
                #[cfg(feature = "tls")]
                Stream::Tls(tls) => tls.read(&mut self.buf[len..]),
            };
            match read {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        self.buf.truncate(len + *result.as_ref().unwrap_or(&0));
        result
    }

    fn set_deadline(&mut self, deadline: Instant) -> io::Result<()> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        // Rounded up to 10 ms, so a deadline far away does not cost a system call on
        // every read.
        let left = Duration::from_millis(left.as_millis().div_ceil(10) as u64 * 10);
        if self.read_timeout != Some(left) {
            self.tcp().set_read_timeout(Some(left))?;
            self.read_timeout = Some(left);
        }
        Ok(())
    }

    /// Writes all of `data` and flushes it to the client.
    pub fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        let result = match &mut self.stream {
            Stream::Plain(tcp) => tcp.write_all(data),
            #[cfg(feature = "tls")]
            Stream::Tls(tls) => tls.write_all(data).and_then(|()| tls.flush()),
        };
        if let Err(e) = &result {
            if is_timeout(e) {
                self.timed_out = Some("stalled_write");
            }
        }
        result
    }

    /// Closes the connection so that the client reads everything written before:
    /// the write side is shut first (the client sees the end of the reply), then
    /// whatever the client still sends is read and discarded for a short while, then
    /// the socket closes.
    #[cfg_attr(not(feature = "tls"), allow(unused_mut))]
    pub fn close(mut self) {
        #[cfg(feature = "tls")]
        if let Stream::Tls(tls) = &mut self.stream {
            tls.conn.send_close_notify();
            let _ = tls.conn.complete_io(&mut tls.sock);
        }
        if self.tcp().shutdown(Shutdown::Write).is_err() {
            return;
        }
        let deadline = Instant::now() + DRAIN_FOR;
        let mut drained = 0;
        let mut scratch = [0u8; READ_CHUNK];
        while drained < DRAIN_BYTES {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.tcp().set_read_timeout(Some(left)).is_err() {
                return;
            }
            match (&mut self.tcp()).read(&mut scratch) {
                Ok(0) | Err(_) => return,
                Ok(n) => drained += n,
            }
        }
    }
}

/// Whether an IO error is a socket timeout (`SO_RCVTIMEO` / `SO_SNDTIMEO` report
/// `EAGAIN`).
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}
