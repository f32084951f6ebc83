//! The request path of a proxied request, one function per phase, called top-down
//! from `handle`:
//!
//! The head is already parsed and checked (`client::head`). The API-key check →
//! `Request::read_body` (size limit, body budget) → `requested_model` →
//! `Exchange::forward` (`admit` a slot or wait in line, `send` with ureq, retry
//! elsewhere while it is safe) → `relay_response` (head, then one chunk per backend read, flushed) → the `Slot`
//! drops and the backend's slot is free again; `Access::finish` logs the request once.
//!
//! Nothing reaches the client before the backend's response head, so until then any
//! failure can still be answered with a clean error.

use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ureq::config::ConfigBuilder;
use ureq::http;
use ureq::typestate::HttpCrateScope;

use crate::backend::registry::Slot;
use crate::client::registry::Ticket;
use crate::client::reply::{self, BodyWriter, Framing};
use crate::client::request::{BodyLimits, Request};
use crate::config::Config;
use crate::request::access::{self, Access};
use crate::request::auth;
use crate::request::error::RouterError;
use crate::request::headers;
use crate::request::queue::{Limits, Want};
use crate::shared::Shared;

/// Connecting to a backend on the same network takes milliseconds; a backend that
/// does not accept within this is treated as down rather than waited for.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The size of one read from the backend, and so the largest chunk sent to the client.
/// An SSE event is far smaller; a large JSON reply takes more reads. Each stream holds
/// one for its whole life, so the size counts at 1000 streams (4 MiB at 4 KiB).
const READ_BUF: usize = 4 * 1024;

/// How relaying a reply ended.
enum End {
    Complete,
    /// Relayed whole, but the stream carried an error event of the backend's (vLLM
    /// ends a stream that fails mid-way that way, under a 200).
    ErrorEvent,
    /// The client went away; the backend connection was closed with it.
    ClientGone,
    /// The backend broke mid-body; the client saw an aborted reply.
    BackendBroke(String),
}

/// Handles one proxied request to its end, and writes its access-log entry. The
/// request, and with it the connection, goes back to its connection thread only after
/// the entry is written: a keep-alive client's next request then never finds this
/// worker still busy logging.
pub fn handle(mut request: Request, shared: &Arc<Shared>) {
    let mut access = Access::start(
        &request.head.method,
        &request.head.target,
        request.head.header(access::REQUEST_ID_HEADER),
    );
    // The backend connection the request uses is recorded, so that the connection
    // thread can stop it when the client leaves (`client::handoff`).
    let call = Arc::clone(request.ticket().backend_call());
    call.during(|| proxy(&mut request, shared, &mut access));
    let known_model = access
        .model
        .as_deref()
        .is_some_and(|m| shared.table.is_known_model(m));
    shared.metrics.observe_request(&access, known_model);
    access.finish();
    drop(request);
}

fn proxy(request: &mut Request, shared: &Arc<Shared>, access: &mut Access) {
    let config = shared.config();
    let settings = &config.settings;
    let method = request.head.method.clone();
    if !headers::relayed_method(&method) {
        return reject(request, &RouterError::MethodNotImplemented(method), access);
    }
    let auth_on = shared.client_keys(&config).next().is_some();
    let presented = request.head.header("authorization");
    if auth_on && !auth::authorized(presented, shared.client_keys(&config)) {
        return reject(request, &RouterError::Unauthorized, access);
    }
    let limits = BodyLimits {
        max_bytes: settings.max_body_bytes,
        budget: settings.max_buffered_body_bytes,
        timeout: settings.client_body_timeout,
    };
    let body = match request.read_body(limits, &shared.budget) {
        Ok(body) => body,
        Err(err) => return reject(request, &err, access),
    };
    let target = request.head.target.clone();
    access.model = match requested_model(&method, &target, &body) {
        Ok(model) => model,
        Err(err) => return reject(request, &err, access),
    };
    let mut upstream = headers::upstream_headers(
        &request.head.headers,
        request.peer().ip(),
        request.is_secure(),
    );
    if auth_on {
        // The client's key is for the router; it never reaches a backend.
        upstream.retain(|(name, _)| !name.eq_ignore_ascii_case("authorization"));
    }
    upstream.retain(|(name, _)| !name.eq_ignore_ascii_case(access::REQUEST_ID_HEADER));
    upstream.push((
        access::REQUEST_ID_HEADER.to_owned(),
        access.request_id.clone(),
    ));
    let exchange = Exchange {
        shared,
        config: &config,
        ticket: request.ticket().clone(),
        method: &method,
        target: &target,
        headers: &upstream,
        body: &body,
    };
    let want = Want {
        model: access.model.clone(),
        exclude: Vec::new(),
    };
    let (slot, response) = match exchange.forward(want, access) {
        Ok(sent) => sent,
        Err(err) => return reject(request, &err, access),
    };
    access.backend = Some(slot.backend_url().to_owned());
    access.queue_wait = slot.queued_for;
    let end = relay_response(request, response, access);
    access.outcome = match &end {
        End::Complete => {
            if !is_backend_failure(access.status) {
                shared.table.request_succeeded(slot.backend_id());
            }
            "complete"
        }
        // A failed generation, not a failing backend: passive health is untouched.
        End::ErrorEvent => "backend_error",
        End::ClientGone => "client_gone",
        // The client left and its connection thread stopped the backend connection: not the backend's fault.
        End::BackendBroke(_) if exchange.ticket.client_left() => "client_gone",
        End::BackendBroke(why) => {
            exchange.record_failure(&slot, why);
            "backend_broke"
        }
    };
}

/// Routes whose POST body is a JSON object that may name the `model`.
const MODEL_ROUTES: &[&str] = &[
    "/v1/chat/completions",
    "/v1/messages",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/score",
    "/v1/rerank",
    "/v2/rerank",
    "/score",
    "/rerank",
    "/pooling",
    "/classify",
    "/tokenize",
    "/detokenize",
];

/// The `model` a request's JSON body names. On the routes that take a JSON body
/// (`MODEL_ROUTES`), a body that is not a JSON object, or a `model` that is not a
/// string, is refused here: no backend would accept it, and the router could not
/// route it. Elsewhere a body that is not JSON simply names no model.
pub fn requested_model(
    method: &str,
    target: &str,
    body: &[u8],
) -> Result<Option<String>, RouterError> {
    #[derive(serde::Deserialize)]
    struct Probe {
        model: Option<serde_json::Value>,
    }
    let path = target.split('?').next().unwrap_or("");
    // A trailing slash reaches the same handler on a vLLM (FastAPI redirects it).
    let route = path
        .strip_suffix('/')
        .filter(|p| !p.is_empty())
        .unwrap_or(path);
    let needs_json = method == "POST" && MODEL_ROUTES.contains(&route);
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return if needs_json {
            Err(RouterError::BadRequest(format!(
                "{path} takes a JSON object body"
            )))
        } else {
            Ok(None)
        };
    }
    match serde_json::from_slice::<Probe>(body).map(|p| p.model) {
        Ok(Some(serde_json::Value::String(model))) => Ok(Some(model)),
        Err(e) if needs_json => Err(RouterError::BadRequest(format!(
            "the body is not valid JSON: {e}"
        ))),
        Ok(Some(serde_json::Value::Null) | None) | Err(_) => Ok(None),
        Ok(Some(other)) => Err(RouterError::BadRequest(format!(
            "\"model\" must be a string, found {other}"
        ))),
    }
}

/// One request as it is sent, possibly several times, to backends.
struct Exchange<'a> {
    shared: &'a Shared,
    config: &'a Config,
    ticket: Ticket,
    method: &'a str,
    target: &'a str,
    headers: &'a [(String, String)],
    body: &'a [u8],
}

impl Exchange<'_> {
    /// Admits the request and sends it, retrying on another backend while it is safe:
    /// nothing has reached the client yet, and the backend either refused the
    /// connection or answered 502/503/504/429. A request that may already be generating
    /// (a timeout after it was sent) is never sent again. Returns the slot, the reply
    /// to relay; counts retries in `access.retries`, and names the backend in
    /// `access.backend` when the client left while a backend had the request.
    fn forward(
        &self,
        mut want: Want,
        access: &mut Access,
    ) -> Result<(Slot, http::Response<ureq::Body>), RouterError> {
        let settings = &self.config.settings;
        let retries = &mut access.retries;
        loop {
            let slot = self.admit(want.clone())?;
            let result = self.send(&slot);
            if result.is_err() && self.ticket.client_left() {
                // The connection thread stopped the backend connection because the client left:
                // not the backend's fault, and nobody to retry for. The request did
                // reach this backend, which the access log says.
                access.backend = Some(slot.backend_url().to_owned());
                return Err(RouterError::ClientClosed);
            }
            match &result {
                Ok(response) if is_backend_failure(response.status().as_u16()) => {
                    self.record_failure(&slot, &format!("replied {}", response.status().as_u16()));
                }
                // Success is recorded once the whole reply has been relayed.
                Ok(_) => {}
                Err(failure) if failure.backend_fault => {
                    // The client's error text leaves the backend out; the log names it.
                    log::info!("backend {} failed: {}", slot.backend_url(), failure.err);
                    self.record_failure(&slot, &failure.err.to_string())
                }
                Err(_) => {}
            }
            let retryable = match &result {
                Ok(response) => matches!(response.status().as_u16(), 429 | 502 | 503 | 504),
                Err(failure) => failure.before_send,
            };
            want.exclude.push(slot.backend_id());
            // The last backend's answer is what the client gets when no other
            // backend is left to try.
            if !retryable || *retries >= settings.max_retries || !self.shared.table.can_serve(&want)
            {
                return result.map(|response| (slot, response)).map_err(|f| f.err);
            }
            // The path only: a query string may hold credentials.
            log::debug!(
                "{} {} on {} failed before reaching the client; retrying elsewhere",
                self.method,
                self.target.split('?').next().unwrap_or(""),
                slot.backend_url()
            );
            drop(result);
            drop(slot);
            *retries += 1;
            std::thread::sleep(settings.retry_delay);
        }
    }

    /// Takes a slot on the least-loaded backend that serves `want`, waiting in line if
    /// all are full, for as long as the client is there: a request whose client left
    /// is never sent, so no backend generates a reply nobody reads.
    fn admit(&self, want: Want) -> Result<Slot, RouterError> {
        let settings = &self.config.settings;
        let limits = Limits {
            max_queue_size: settings.max_queue_size,
            queue_timeout: settings.queue_timeout,
        };
        let ticket = &self.ticket;
        let slot = self
            .shared
            .table
            .acquire_while(want, limits, || !ticket.client_left())?;
        if ticket.client_left() {
            return Err(RouterError::ClientClosed);
        }
        Ok(slot)
    }

    /// Sends the request to the slot's backend and waits for its response head.
    fn send(&self, slot: &Slot) -> Result<http::Response<ureq::Body>, SendFailure> {
        let uri = format!("{}{}", slot.backend_url(), self.target);
        let mut builder = http::Request::builder().method(self.method).uri(&uri);
        let backend_key = slot.api_key();
        for (name, value) in self.headers {
            if backend_key.is_none() || !name.eq_ignore_ascii_case("authorization") {
                builder = builder.header(name, value);
            }
        }
        if let Some(key) = backend_key {
            builder = builder.header("Authorization", format!("Bearer {}", key.expose()));
        }
        // A request the router cannot even build is the client's fault.
        let request = builder.body(self.body).map_err(|e| SendFailure {
            err: RouterError::BadRequest(format!("cannot forward this request: {e}")),
            before_send: false,
            backend_fault: false,
        })?;
        let timeout = self.config.settings.request_timeout;
        let configure = |builder: ConfigBuilder<HttpCrateScope<_>>| {
            builder
                .timeout_connect(Some(CONNECT_TIMEOUT.min(timeout)))
                .timeout_recv_response(Some(timeout))
                // The longest gap between two reads of the body: a stream that keeps
                // producing tokens is never cut, one that stalls is.
                .timeout_per_read(Some(timeout))
        };
        // A request whose client left is not sent again (its backend connection was stopped).
        let may_retry = || !self.ticket.client_left();
        slot.agent()
            .send(request, configure, may_retry)
            .map_err(|e| SendFailure::of(slot.backend_url(), e))
    }

    /// Passive health: counts a failed request against the slot's backend.
    fn record_failure(&self, slot: &Slot, why: &str) {
        let settings = &self.config.settings;
        let active = settings.enable_active_health_check;
        let marked_down = self.shared.table.request_failed(
            slot.backend_id(),
            why,
            settings.failure_threshold,
            settings.auto_recovery_threshold,
            active,
            Instant::now(),
        );
        if marked_down {
            let back = if active {
                format!(
                    "back after {} good health checks in a row",
                    settings.health_check_recovery_successes
                )
            } else {
                format!("probed again in {:?}", settings.auto_recovery_threshold)
            };
            log::warn!(
                "backend {} marked down after {} failed requests in a row (last: {why}); {back}",
                slot.backend_url(),
                settings.failure_threshold,
            );
        }
    }
}

/// Replies that say the backend itself is failing, as opposed to refusing a bad
/// request (4xx) or failing one request (500).
fn is_backend_failure(status: u16) -> bool {
    matches!(status, 502..=504)
}

/// A send that got no reply head.
struct SendFailure {
    err: RouterError,
    /// The request certainly never reached the backend, so sending it elsewhere
    /// cannot run it twice.
    before_send: bool,
    /// It counts against the backend's health (passive health).
    backend_fault: bool,
}

impl SendFailure {
    fn of(backend: &str, err: ureq::Error) -> SendFailure {
        use std::io::ErrorKind;
        use ureq::Timeout;
        let before_send = match &err {
            ureq::Error::Timeout(Timeout::Connect | Timeout::Resolve)
            | ureq::Error::HostNotFound
            | ureq::Error::ConnectionFailed => true,
            ureq::Error::Io(e) => e.kind() == ErrorKind::ConnectionRefused,
            _ => false,
        };
        SendFailure {
            err: backend_error(backend, err),
            before_send,
            backend_fault: true,
        }
    }
}

/// Answers with one of the router's own errors.
fn reject(request: &mut Request, err: &RouterError, access: &mut Access) {
    access.status = err.status();
    access.outcome = err.code();
    // A request a backend already had (the client left while it was generating) is
    // not an answer of the router's own.
    if err.is_rejection() && access.backend.is_none() {
        access.rejected = Some(err.code());
    }
    let id = [(
        access::REQUEST_ID_HEADER.to_owned(),
        access.request_id.clone(),
    )];
    if let RouterError::QueueTimeout { waited } = err {
        access.queue_wait = *waited;
    }
    if let RouterError::BadGateway { backend, .. } | RouterError::GatewayTimeout { backend } = err {
        access.backend = Some(backend.clone());
    }
    match reply::send_error(request, err, &id) {
        Ok(bytes) => {
            access.first_byte = Some(Instant::now());
            access.bytes_out = bytes;
        }
        Err(e) => log::debug!("could not send the error reply: {e}"),
    }
}

/// The error a failed send becomes. Its reason goes to the client, so the backend's
/// URL and address are taken out of whatever ureq said; they stay in `backend`, for
/// the logs.
fn backend_error(backend: &str, err: ureq::Error) -> RouterError {
    use ureq::Timeout;
    let reason = match err {
        ureq::Error::Timeout(Timeout::Connect | Timeout::Resolve) => "connect timed out".to_owned(),
        ureq::Error::Timeout(_) => {
            return RouterError::GatewayTimeout {
                backend: backend.to_owned(),
            }
        }
        ureq::Error::HostNotFound => "host not found".to_owned(),
        ureq::Error::Io(e) => e.to_string(),
        ureq::Error::Protocol(e) => format!("invalid HTTP reply: {e}"),
        other => other.to_string(),
    };
    let authority = backend.split_once("://").map_or(backend, |(_, rest)| rest);
    let reason = reason
        .replace(backend, "the backend")
        .replace(authority.trim_end_matches('/'), "the backend");
    RouterError::BadGateway {
        backend: backend.to_owned(),
        reason,
    }
}

/// Relays the backend's response: its status and headers as they are, then the body,
/// each backend read flushed to the client as one chunk.
fn relay_response(
    request: &mut Request,
    response: http::Response<ureq::Body>,
    access: &mut Access,
) -> End {
    let status = response.status().as_u16();
    if (100..200).contains(&status) {
        // An interim reply the router did not ask for (a 101 to an upgrade it never
        // forwards): relayed as a final reply it would leave the client waiting.
        let reason = format!("the backend answered {status}, an interim reply, as its final one");
        let err = RouterError::BadGateway {
            backend: access.backend.clone().unwrap_or_default(),
            reason: reason.clone(),
        };
        reject(request, &err, access);
        return End::BackendBroke(reason);
    }
    access.status = status;
    let backend_headers: Vec<(String, String)> = response
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let mut out_headers = headers::downstream_headers(&backend_headers);
    out_headers.retain(|(name, _)| !name.eq_ignore_ascii_case(access::REQUEST_ID_HEADER));
    out_headers.push((
        access::REQUEST_ID_HEADER.to_owned(),
        access.request_id.clone(),
    ));
    access.stream = headers::find(&out_headers, "content-type")
        .is_some_and(|ct| ct.starts_with("text/event-stream"));
    if access.stream && headers::find(&out_headers, "x-accel-buffering").is_none() {
        // Tells an nginx in front of the router not to buffer the stream either.
        out_headers.push(("X-Accel-Buffering".to_owned(), "no".to_owned()));
    }
    let mut reader = response.into_body().into_reader();

    let no_body = request.head.method == "HEAD" || status == 204 || status == 304;
    let declared: Option<u64> =
        headers::find(&backend_headers, "content-length").and_then(|v| v.trim().parse().ok());
    let framing = if no_body {
        Framing::None
    } else {
        Framing::for_client(request.head.version, declared)
    };
    let mut received = 0u64;
    let call = Arc::clone(request.ticket().backend_call());
    let mut writer = BodyWriter::start(request, status, &out_headers, framing);
    // A reply of unknown length is a stream, or may be: its head goes out now, as the
    // backend sent it, not with the first token.
    if declared.is_none() && !no_body && writer.flush_head().is_err() {
        return End::ClientGone;
    }
    let mut buf = vec![0u8; READ_BUF];
    let mut events = access.stream.then(ErrorEvents::default);
    let end = loop {
        let n = if no_body {
            Ok(0)
        } else {
            reader.read(&mut buf)
        };
        match n {
            Ok(0) => {
                call.forget();
                break if writer.finish_body().is_err() {
                    End::ClientGone
                } else if events.is_some_and(|e| e.seen) {
                    End::ErrorEvent
                } else {
                    End::Complete
                };
            }
            // A failed write means the client left. Returning drops `reader` half-read,
            // which closes the backend connection: vLLM sees the disconnect and stops
            // generating.
            Ok(n) => {
                received += n as u64;
                if let Some(events) = &mut events {
                    events.scan(&buf[..n]);
                }
                if declared == Some(received) {
                    // The whole body is here: it goes out with the end of the reply in
                    // one write at the next read, which returns 0 at once.
                    writer.hold(&buf[..n]);
                } else if writer.send(&buf[..n]).is_err() {
                    break End::ClientGone;
                }
            }
            Err(e) => {
                writer.abort();
                break End::BackendBroke(e.to_string());
            }
        }
    };
    access.bytes_out = writer.bytes_out();
    access.first_byte = writer.first_byte();
    end
}

/// Watches a relayed SSE stream for an error event: a `data:` line whose JSON is an
/// error (`{"error": ...}`, or vLLM's older `{"object": "error", ...}`). Only the start
/// of each line is looked at, and a token's text cannot start a line (it is inside a
/// JSON string, where a newline is escaped), so a reply that merely mentions an error
/// does not count.
#[derive(Default)]
struct ErrorEvents {
    /// The start of a line the last read cut off, when it was too short to tell.
    carry: Vec<u8>,
    seen: bool,
}

impl ErrorEvents {
    /// Enough of a line to tell: `data: {"object": "error"` with a space to spare.
    const TELL: usize = 28;

    fn scan(&mut self, bytes: &[u8]) {
        if self.seen {
            return;
        }
        let mut lines = bytes.split(|&b| b == b'\n').peekable();
        while let Some(piece) = lines.next() {
            let last = lines.peek().is_none();
            let line: std::borrow::Cow<[u8]> = if self.carry.is_empty() {
                piece.into()
            } else {
                let mut joined = std::mem::take(&mut self.carry);
                joined.extend_from_slice(piece);
                joined.into()
            };
            if last && line.len() < Self::TELL {
                self.carry = line.into_owned();
                return;
            }
            if is_error_event(&line) {
                self.seen = true;
                return;
            }
        }
    }
}

fn is_error_event(line: &[u8]) -> bool {
    let Some(object) = line
        .strip_prefix(b"data:")
        .and_then(|d| d.trim_ascii_start().strip_prefix(b"{"))
    else {
        return false;
    };
    let object = object.trim_ascii_start();
    if object.starts_with(br#""error""#) {
        return true;
    }
    object
        .strip_prefix(br#""object""#)
        .and_then(|rest| rest.trim_ascii_start().strip_prefix(b":"))
        .is_some_and(|value| value.trim_ascii_start().starts_with(br#""error""#))
}
