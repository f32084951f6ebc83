//! WebSocket tunnels: vLLM's realtime API (`GET /v1/realtime`, `Upgrade: websocket`)
//! proxied to one backend, chosen as any request is (the `model` query parameter;
//! without one, any backend), then the socket relayed both ways until either side
//! closes.
//!
//! The handshake goes to the backend over a connection of its own
//! (`backend::socket`: TCP, or TLS to an https:// backend; ureq has no upgrades), with the client's headers as for any request (hop-by-hop ones
//! dropped, the forwarding headers and the request id added, the client's key taken
//! out and the backend's put in) plus `Upgrade` and `Connection`. A `101` from the
//! backend goes to the client with its handshake headers (`Sec-WebSocket-Accept`,
//! the chosen protocol and extensions); any other reply is relayed as the backend's
//! answer, and nothing is tunnelled.
//!
//! The tunnel holds its backend slot and its worker for its whole life, so it counts
//! in `in_flight` (`/load-stats`, `/metrics`) and in `max_concurrent_requests`. One
//! thread relays both directions: it waits in `poll` on both sockets. Frames pass
//! untouched; `websocket::Frames` only follows where each ends, so that the router's
//! own close frame (1001) goes between two frames: when the router shuts down
//! (within a `TICK` of the drain starting, well within `shutdown_timeout`), after
//! `websocket_idle_timeout` without a frame either way, and after
//! `websocket_max_lifetime`. After its close, the router waits `CLOSE_GRACE` for the
//! sides' own closes, then drops both connections.

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use crate::backend::registry::Slot;
use crate::backend::socket::Socket;
use crate::client::reply;
use crate::client::request::Request;
use crate::control::config::Config;
use crate::request::access::Access;
use crate::request::error::RouterError;
use crate::request::websocket::{self, Frames};

/// How often a tunnel looks whether the router is shutting down.
const TICK: Duration = Duration::from_millis(200);
/// How long the sides have to answer the router's close (or the other side's end).
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Connecting to a backend, as for any request (`request::exchange`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest handshake reply head read from a backend, as for ureq's (`backend::http`).
const MAX_REPLY_HEAD: usize = 8 * 1024;
/// The largest body of a refusal (a non-101 reply) relayed to the client.
const MAX_REFUSAL_BODY: usize = 64 * 1024;
const READ_BUF: usize = 16 * 1024;

/// Whether a WebSocket upgrade on `path` is proxied: vLLM's realtime route only.
pub fn is_tunnelled(method: &str, path: &str) -> bool {
    method == "GET" && matches!(path, "/v1/realtime" | "/v1/realtime/")
}

/// How a tunnel ended, for the access log.
enum End {
    /// A side closed (a close frame, or its connection).
    Closed,
    ClientGone,
    BackendGone,
    /// The router closed it (1001): shutdown, idle or lifetime.
    Router(&'static str),
}

/// Opens the tunnel on `slot`'s backend and relays it until it ends. `headers` are
/// the request's upstream headers (the client's key already out, the id in).
pub(crate) fn serve(
    request: &mut Request,
    config: &Config,
    shared: &crate::shared::Shared,
    slot: &Slot,
    headers: &[(String, String)],
    access: &mut Access,
) -> Result<(), RouterError> {
    let settings = &config.settings;
    let url = slot.backend_url();
    let bad_gateway = |reason: String| RouterError::BadGateway {
        backend: url.to_owned(),
        reason,
    };
    let (mut backend, authority, prefix) =
        Socket::connect(url, settings, CONNECT_TIMEOUT).map_err(bad_gateway)?;
    backend
        .tcp()
        .set_write_timeout(Some(settings.client_write_timeout))
        .and_then(|()| {
            backend
                .tcp()
                .set_read_timeout(Some(settings.request_timeout))
        })
        .map_err(|e| bad_gateway(e.to_string()))?;
    let mut out = format!(
        "GET {prefix}{} HTTP/1.1\r\nHost: {authority}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n",
        request.head.target
    );
    let backend_key = slot.api_key();
    for (name, value) in headers {
        if backend_key.is_some() && name.eq_ignore_ascii_case("authorization") {
            continue;
        }
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(key) = backend_key {
        out.push_str(&format!("Authorization: Bearer {}\r\n", key.expose()));
    }
    out.push_str("\r\n");
    backend
        .write_all(out.as_bytes())
        .and_then(|()| backend.flush())
        .map_err(|e| bad_gateway(format!("cannot send the handshake: {e}")))?;
    let (status, reply_headers, leftover) = read_reply_head(&mut backend).map_err(|e| match e {
        Failure::Timeout => RouterError::GatewayTimeout {
            backend: url.to_owned(),
        },
        Failure::Other(why) => bad_gateway(why),
    })?;
    access.status = status;
    let mut down_headers: Vec<(String, String)> = reply_headers
        .iter()
        .filter(|(n, _)| {
            !["content-length", "transfer-encoding", "keep-alive"]
                .iter()
                .any(|h| n.eq_ignore_ascii_case(h))
        })
        .cloned()
        .collect();
    access.tag(&mut down_headers);
    if status != 101 {
        return relay_refusal(
            request,
            &mut backend,
            status,
            &reply_headers,
            leftover,
            access,
        );
    }
    reply::send_switching(request, &down_headers).map_err(|_| RouterError::ClientClosed)?;
    access.first_byte = Some(Instant::now());
    let _ = backend.tcp().set_read_timeout(None);
    let end = relay(request, &mut backend, leftover, config, shared, access);
    access.outcome = match end {
        End::Closed => "complete",
        End::ClientGone => "client_gone",
        End::BackendGone => "backend_closed",
        End::Router(why) => why,
    };
    Ok(())
}

/// A reply's status, its headers, and the bytes read past its head.
type ReplyHead = (u16, Vec<(String, String)>, Vec<u8>);

enum Failure {
    Timeout,
    Other(String),
}

/// Reads the backend's reply head; returns its status, headers and the bytes read
/// past it (the first frames, or a refusal's body).
fn read_reply_head(backend: &mut Socket) -> Result<ReplyHead, Failure> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = match backend.read(&mut chunk) {
            Ok(0) => {
                return Err(Failure::Other(
                    "closed before answering the handshake".into(),
                ))
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if crate::client::connection::is_timeout(&e) => return Err(Failure::Timeout),
            Err(e) => return Err(Failure::Other(e.to_string())),
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut fields = [httparse::EMPTY_HEADER; 64];
        let mut reply = httparse::Response::new(&mut fields);
        match reply.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let status = reply.code.unwrap_or(0);
                let headers = reply
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_owned(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect();
                return Ok((status, headers, buf[len..].to_vec()));
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_REPLY_HEAD => {}
            Ok(httparse::Status::Partial) => {
                return Err(Failure::Other(
                    "the handshake reply head is too large".into(),
                ))
            }
            Err(e) => return Err(Failure::Other(format!("invalid handshake reply: {e}"))),
        }
    }
}

/// Relays a backend's refusal of the handshake (401, 404, ...) as its answer.
fn relay_refusal(
    request: &mut Request,
    backend: &mut Socket,
    status: u16,
    headers: &[(String, String)],
    mut body: Vec<u8>,
    access: &mut Access,
) -> Result<(), RouterError> {
    let declared = crate::request::headers::find(headers, "content-length")
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0)
        .min(MAX_REFUSAL_BODY);
    let mut chunk = [0u8; 4096];
    while body.len() < declared {
        match backend.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    body.truncate(declared);
    let mut out = crate::request::headers::downstream_headers(headers);
    access.tag(&mut out);
    access.outcome = "refused_by_backend";
    reply::send_full(request, status, &out, &body).map_err(|_| RouterError::ClientClosed)?;
    access.bytes_out = body.len() as u64;
    Ok(())
}

/// One direction of the tunnel.
struct Side {
    frames: Frames,
    /// This side's input has ended.
    ended: bool,
    /// The router's close went out towards this side; nothing more is sent to it.
    closed_by_router: bool,
}

impl Side {
    fn new() -> Side {
        Side {
            frames: Frames::default(),
            ended: false,
            closed_by_router: false,
        }
    }
}

/// Relays frames both ways until the tunnel ends.
fn relay(
    request: &mut Request,
    backend: &mut Socket,
    leftover: Vec<u8>,
    config: &Config,
    shared: &crate::shared::Shared,
    access: &mut Access,
) -> End {
    let settings = &config.settings;
    let started = Instant::now();
    let mut last_frame = started;
    // `up` follows what the client sends (towards the backend), `down` the reverse.
    let (mut up, mut down) = (Side::new(), Side::new());
    let mut closing: Option<(&'static str, Instant)> = None;
    let mut buf = vec![0u8; READ_BUF];
    let client_fd = request.connection().fd();
    let backend_fd = backend.fd();
    if !leftover.is_empty() {
        down.frames.feed(&leftover);
        if request.connection().write_all(&leftover).is_err() {
            return End::ClientGone;
        }
        access.bytes_out += leftover.len() as u64;
    }
    // Frames the client sent before it saw the 101 came in with the head.
    let early = request.connection().buffered().to_vec();
    if !early.is_empty() {
        up.frames.feed(&early);
        if backend
            .write_all(&early)
            .and_then(|()| backend.flush())
            .is_err()
        {
            return End::BackendGone;
        }
        request.connection().consume(early.len());
    }
    // When the client's side ended: the backend has `CLOSE_GRACE` to end too.
    let mut client_ended_at: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if closing.is_none() {
            let why = if shared.is_draining() {
                Some("shutdown")
            } else if now >= last_frame + settings.websocket_idle_timeout {
                Some("idle_timeout")
            } else if now >= started + settings.websocket_max_lifetime {
                Some("max_lifetime")
            } else {
                None
            };
            if let Some(why) = why {
                closing = Some((why, now + CLOSE_GRACE));
            }
        }
        if let Some((why, until)) = closing {
            // The router's close goes to each side between two frames.
            if !down.closed_by_router && down.frames.at_boundary() {
                down.closed_by_router = true;
                let frame = websocket::close_frame(websocket::GOING_AWAY, why, None);
                let _ = request.connection().write_all(&frame);
            }
            if !up.closed_by_router && up.frames.at_boundary() {
                up.closed_by_router = true;
                let frame =
                    websocket::close_frame(websocket::GOING_AWAY, why, Some(websocket::mask_key()));
                let _ = backend.write_all(&frame).and_then(|()| backend.flush());
            }
            if now >= until || (up.ended && down.ended) {
                return End::Router(why);
            }
        }
        if let Some(at) = client_ended_at {
            if now >= at + CLOSE_GRACE {
                return End::ClientGone;
            }
        }
        let mut deadline = match closing {
            Some((_, until)) => until,
            None => (last_frame + settings.websocket_idle_timeout)
                .min(started + settings.websocket_max_lifetime),
        };
        if let Some(at) = client_ended_at {
            deadline = deadline.min(at + CLOSE_GRACE);
        }
        let wait = deadline.saturating_duration_since(now).min(TICK);
        let held = (request.connection().has_pending(), backend.has_pending());
        let (client_ready, backend_ready) = if held.0 || held.1 {
            held
        } else {
            match wait_readable(
                (!up.ended).then_some(client_fd),
                (!down.ended).then_some(backend_fd),
                wait,
            ) {
                Ok(ready) => ready,
                Err(_) => return End::ClientGone,
            }
        };
        if client_ready {
            let connection = request.connection();
            match connection.fill(Instant::now() + TICK) {
                Ok(0) => {
                    up.ended = true;
                    client_ended_at = Some(Instant::now());
                    backend.shutdown_write();
                }
                Ok(_) => {
                    last_frame = Instant::now();
                    let bytes = connection.buffered();
                    let n = bytes.len();
                    if !up.closed_by_router {
                        up.frames.feed(bytes);
                        if backend
                            .write_all(bytes)
                            .and_then(|()| backend.flush())
                            .is_err()
                        {
                            return End::BackendGone;
                        }
                    }
                    connection.consume(n);
                }
                Err(e) if crate::client::connection::is_timeout(&e) => {}
                Err(_) => {
                    return match closing {
                        Some((why, _)) => End::Router(why),
                        None => End::ClientGone,
                    };
                }
            }
        }
        if backend_ready {
            match backend.read(&mut buf) {
                Ok(0) => down.ended = true,
                Ok(n) => {
                    last_frame = Instant::now();
                    if !down.closed_by_router {
                        down.frames.feed(&buf[..n]);
                        if request.connection().write_all(&buf[..n]).is_err() {
                            return End::ClientGone;
                        }
                        access.bytes_out += n as u64;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => down.ended = true,
            }
            if down.ended {
                // The backend is done; the client sees its connection end after the
                // last frame (the connection's close drains what it still sends).
                return match closing {
                    Some((why, _)) => End::Router(why),
                    None => End::Closed,
                };
            }
        }
    }
}

/// Waits up to `timeout` for either descriptor to be readable (or hung up).
fn wait_readable(a: Option<i32>, b: Option<i32>, timeout: Duration) -> io::Result<(bool, bool)> {
    let events = libc::POLLIN | libc::POLLRDHUP;
    let mut fds = [
        libc::pollfd {
            fd: a.unwrap_or(-1),
            events,
            revents: 0,
        },
        libc::pollfd {
            fd: b.unwrap_or(-1),
            events,
            revents: 0,
        },
    ];
    let ms = timeout.as_millis().clamp(0, i32::MAX as u128) as i32;
    // SAFETY: `fds` is a live array of the length passed.
    #[allow(unsafe_code)]
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok((false, false))
        } else {
            Err(e)
        };
    }
    Ok((fds[0].revents != 0, fds[1].revents != 0))
}
