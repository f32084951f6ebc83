//! A connection's thread: one per client connection, from the TLS handshake to the
//! close. It owns its connection between requests: it reads a head, lends the
//! connection to a worker with the request, notices the client leaving while the
//! worker has it (`client::handoff`), and takes it back at the request's end, to read
//! the next head or to close it. So one request at a time per connection is with the
//! workers: a client pipelining requests cannot take more than one worker.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Instant;

use crate::client::connection::{is_timeout, Connection, HeadRead};
use crate::client::head::Upgrade;
use crate::client::listener::Front;
use crate::client::registry::{Conn, Returned};
use crate::client::reply;
use crate::client::request::Request;
use crate::request::error::RouterError;
use crate::request::pool::Incoming;
use crate::shared::Shared;

/// A connection thread reads and parses heads, and nothing more.
const CONNECTION_STACK: usize = 256 * 1024;

/// Starts the thread of a connection the accept loop has admitted.
pub(crate) fn spawn(
    tcp: TcpStream,
    peer: SocketAddr,
    conn: Arc<Conn>,
    front: Arc<Front>,
) -> io::Result<()> {
    std::thread::Builder::new()
        .name("conn".to_owned())
        .stack_size(CONNECTION_STACK)
        .spawn(move || serve_connection(tcp, peer, &conn, &front))
        .map(drop)
}

/// The life of one client connection, from accept to close: the TLS handshake if
/// any, then each request head read and lent with the connection to a worker, until
/// the client closes, a timeout passes, or a request leaves the connection unusable.
fn serve_connection(tcp: TcpStream, peer: SocketAddr, conn: &Arc<Conn>, front: &Front) {
    let shared = &front.shared;
    let config = shared.config();
    let settings = &config.settings;
    #[cfg_attr(not(feature = "tls"), allow(unused_variables))]
    let handshake_deadline = Instant::now() + settings.client_idle_timeout;
    let write_timeout = settings.client_write_timeout;
    let opened = match &front.tls {
        None => Connection::plain(tcp, peer, write_timeout),
        #[cfg(feature = "tls")]
        Some(identity) => Connection::tls(
            tcp,
            peer,
            Arc::clone(identity),
            handshake_deadline,
            write_timeout,
        ),
        #[cfg(not(feature = "tls"))]
        Some(never) => match *never {},
    };
    drop(config);
    let mut connection = match opened {
        Ok(connection) => connection,
        Err(e) => {
            if is_timeout(&e) {
                shared.metrics.observe_connection_closed("idle");
            }
            log::debug!("connection from {peer} closed before its first request: {e}");
            return;
        }
    };
    // Idle from the end of the last request (or from the connection's start).
    let mut idle_since = Instant::now();
    loop {
        let config = shared.config();
        let settings = &config.settings;
        let idle_timeout = settings.client_idle_timeout;
        let deadline = idle_since + idle_timeout;
        let head = match connection.read_head(settings.max_header_bytes, deadline) {
            Ok(head) => head,
            Err(HeadRead::Closed) => return,
            Err(HeadRead::TimedOut) => {
                shared.metrics.observe_connection_closed("idle");
                return;
            }
            // A client closing mid-head, or a reset.
            Err(HeadRead::Broken(e)) => {
                log::trace!("connection from {peer} broke mid-head: {e}");
                return;
            }
            Err(HeadRead::Invalid(e)) => {
                let err = RouterError::of_head(e, settings.max_header_bytes);
                return refuse_head(connection, &err, shared);
            }
        };
        if head.upgrade == Upgrade::WebSocket
            && !crate::request::tunnel::is_tunnelled(&head.method, head.path())
        {
            return refuse_head(connection, &RouterError::UpgradeRefused, shared);
        }
        drop(config);
        let fd = connection.fd();
        front.pool.submit(Incoming {
            request: Request::new(head, connection, conn.ticket()),
        });
        let (
            Returned {
                connection: mut returned,
                reusable,
            },
            returned_at,
        ) = conn.take_back(fd, idle_timeout);
        idle_since = returned_at;
        if let Some(reason) = returned.timed_out.take() {
            shared.metrics.observe_connection_closed(reason);
        }
        if !reusable {
            returned.close();
            return;
        }
        connection = returned;
    }
}

/// Answers a head the router will not serve, then closes: whatever follows it on the
/// connection cannot be trusted to start a request.
fn refuse_head(mut connection: Connection, err: &RouterError, shared: &Shared) {
    shared.metrics.observe_rejection(err.code());
    log::debug!(
        "refused a request head from {}: {} {err}",
        connection.peer(),
        err.status()
    );
    if reply::send_head_error(&mut connection, err).is_ok() {
        connection.close();
    }
}
