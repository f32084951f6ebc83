//! The request path of a proxied request, one function per phase, called top-down
//! from `handle`:
//!
//! `check_head` (method, target, header caps) → the API-key check → `read_body`
//! (framing checks, size limit) → `requested_model` → `Exchange::forward` (`admit` a
//! slot or wait in line, `send` with ureq, retry elsewhere while it is safe) →
//! `relay_response` (head, then one chunk per backend read, flushed) → the `Slot`
//! drops and the backend's slot is free again; `Access::finish` logs the request once.
//!
//! Nothing reaches the client before the backend's response head, so until then any
//! failure can still be answered with a clean error.

use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tiny_http::Request;
use ureq::config::ConfigBuilder;
use ureq::http;
use ureq::typestate::HttpCrateScope;

use crate::access::{self, Access};
use crate::admission::{Limits, Slot, Want};
use crate::auth;
use crate::clients::Ticket;
use crate::config::Config;
use crate::error::RouterError;
use crate::headers;
use crate::shared::Shared;
use crate::wire::{self, BodyWriter, ClientConn, Framing};

/// Connecting to a backend on the same network takes milliseconds; a backend that
/// does not accept within this is treated as down rather than waited for.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The size of one read from the backend, and so the largest chunk sent to the client.
/// An SSE event is far smaller; a large JSON reply takes more reads. Each stream holds
/// one for its whole life, so the size counts at 1000 streams (4 MiB at 4 KiB).
const READ_BUF: usize = 4 * 1024;

/// The largest reply read whole for an HTTP/1.0 client, which gets a Content-Length.
const MAX_BUFFERED: u64 = 64 * 1024 * 1024;

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

/// Handles one proxied request to its end, and writes its access-log entry.
pub fn handle(request: Request, ticket: &Ticket, shared: &Arc<Shared>) {
    let client_id = request
        .headers()
        .get(access::REQUEST_ID_HEADER)
        .map(|v| v.as_str().to_owned());
    let mut access = Access::start(
        request.method().as_str(),
        request.url(),
        client_id.as_deref(),
    );
    // The backend connection the request uses is recorded, so that the janitor can stop
    // it when the client leaves (`Ticket::client_left`).
    ticket
        .backend_call()
        .during(|| proxy(request, ticket, shared, &mut access));
    let known_model = access
        .model
        .as_deref()
        .is_some_and(|m| shared.table.is_known_model(m));
    shared.metrics.observe_request(&access, known_model);
    access.finish();
}

fn proxy(mut request: Request, ticket: &Ticket, shared: &Arc<Shared>, access: &mut Access) {
    let config = shared.config();
    let client_headers = headers::client_headers(request.headers());
    if let Err(err) = check_head(&request, &client_headers) {
        return reject(request, ticket, &err, access, true);
    }
    let auth_on = shared.client_keys(&config).next().is_some();
    let presented = request.headers().get("Authorization").map(|v| v.as_str());
    if auth_on && !auth::authorized(presented, shared.client_keys(&config)) {
        return reject(request, ticket, &RouterError::Unauthorized, access, true);
    }
    let target = request.url().to_owned();
    let reading = ticket.reading_body();
    let body = read_body(
        &mut request,
        &client_headers,
        config.settings.max_body_bytes,
    );
    drop(reading);
    let body = match body {
        Ok(body) => body,
        // The janitor closed the connection under the read: the reply cannot reach
        // the client, but the access log shows why.
        Err(_) if ticket.timed_out() => {
            let limit = config.settings.client_body_timeout;
            return reject(
                request,
                ticket,
                &RouterError::BodyTimeout { limit },
                access,
                false,
            );
        }
        Err(err) => return reject(request, ticket, &err, access, true),
    };
    access.model = match requested_model(&access.method, &target, &body) {
        Ok(model) => model,
        Err(err) => return reject(request, ticket, &err, access, false),
    };
    let mut upstream = headers::upstream_headers(&client_headers);
    if auth_on {
        // The client's key is for the router; it never reaches a backend.
        upstream.retain(|(name, _)| !name.eq_ignore_ascii_case("authorization"));
    }
    upstream.retain(|(name, _)| !name.eq_ignore_ascii_case(access::REQUEST_ID_HEADER));
    upstream.push((
        access::REQUEST_ID_HEADER.to_owned(),
        access.request_id.clone(),
    ));
    let method = access.method.clone();
    let exchange = Exchange {
        shared,
        config: &config,
        ticket,
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
        Err(err) => {
            let reached_backend = access.backend.is_some();
            reject(request, ticket, &err, access, false);
            if reached_backend {
                // A backend had the request: not an answer of the router's own.
                access.rejected = None;
            }
            return;
        }
    };
    access.backend = Some(slot.backend_url().to_owned());
    access.queue_wait = slot.queued_for;
    let end = relay_response(request, ticket, response, access);
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
        // The janitor stopped the backend connection: not the backend's fault.
        End::BackendBroke(_) if ticket.client_left() => "client_gone",
        End::BackendBroke(why) => {
            exchange.record_failure(&slot, why);
            "backend_broke"
        }
    };
}

/// The method, target length and header caps, checked before anything else.
fn check_head(request: &Request, client_headers: &[(String, String)]) -> Result<(), RouterError> {
    let method = request.method().as_str();
    if !headers::relayed_method(method) {
        return Err(RouterError::MethodNotImplemented(method.to_owned()));
    }
    let target = request.url();
    if target.len() > headers::MAX_TARGET_BYTES {
        return Err(RouterError::UriTooLong);
    }
    if !target.starts_with('/') {
        return Err(RouterError::BadRequest(format!(
            "request target {target:?} must be a path starting with /"
        )));
    }
    if !headers::head_within_caps(client_headers) {
        return Err(RouterError::HeadersTooLarge);
    }
    Ok(())
}

/// Routes whose POST body is a JSON object that may name the `model`.
const MODEL_ROUTES: &[&str] = &[
    "/v1/chat/completions",
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
    let needs_json = method == "POST" && MODEL_ROUTES.contains(&path);
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
    ticket: &'a Ticket,
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
                // The janitor stopped the backend connection because the client left:
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
        let ticket = self.ticket;
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
        // A request whose client left is not sent again (the janitor stopped it).
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

/// Answers with one of the router's own errors. `unread_body`: the request was
/// refused before its body was read (see `wire::send_full`).
fn reject(
    request: Request,
    ticket: &Ticket,
    err: &RouterError,
    access: &mut Access,
    unread_body: bool,
) {
    access.status = err.status();
    access.outcome = err.code();
    if err.is_rejection() {
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
    let unread_body = unread_body && wire::declares_body(&request);
    match wire::send_error(request, ticket, err, &id, unread_body) {
        Ok(bytes) => {
            access.first_byte = Some(Instant::now());
            access.bytes_out = bytes;
        }
        Err(e) => log::debug!("could not send the error reply: {e}"),
    }
}

/// Reads the whole request body, refusing framing that the router and the backend
/// could read differently and bodies over `max_body_bytes`. The body is held in memory
/// so it is forwarded byte for byte with an exact Content-Length.
fn read_body(
    request: &mut Request,
    client_headers: &[(String, String)],
    limit: u64,
) -> Result<Vec<u8>, RouterError> {
    let declared = headers::declared_length(client_headers).map_err(RouterError::BadRequest)?;
    if declared.is_some_and(|len| len > limit) {
        // Refused before reading: nothing of a huge body is buffered.
        return Err(RouterError::BodyTooLarge { limit });
    }
    let mut body = Vec::with_capacity(declared.unwrap_or(0).min(64 * 1024) as usize);
    let read = request
        .as_reader()
        .take(limit.saturating_add(1))
        .read_to_end(&mut body)
        .map_err(|e| RouterError::BadRequest(format!("could not read the request body: {e}")))?;
    if read as u64 > limit {
        return Err(RouterError::BodyTooLarge { limit });
    }
    // tiny_http ends a Content-Length body early, without an error, when the client
    // closes: forwarding it would send the backend a cut prompt.
    if let Some(declared) = declared.filter(|&n| n != read as u64) {
        return Err(RouterError::BadRequest(format!(
            "the request body ended after {read} of its {declared} bytes"
        )));
    }
    Ok(body)
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
    request: Request,
    ticket: &Ticket,
    response: http::Response<ureq::Body>,
    access: &mut Access,
) -> End {
    let conn = ClientConn::of(&request);
    let status = response.status().as_u16();
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

    let no_body =
        conn.head_request || status == 204 || status == 304 || (100..200).contains(&status);
    let framing = if no_body {
        Some(Framing::None)
    } else {
        conn.streaming_framing()
    };
    let Some(framing) = framing else {
        return relay_buffered(request, ticket, status, &out_headers, &mut reader, access);
    };
    let declared: Option<u64> =
        headers::find(&backend_headers, "content-length").and_then(|v| v.trim().parse().ok());
    let mut received = 0u64;
    let mut writer = BodyWriter::start(request, ticket, conn, status, &out_headers, framing);
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
                break if writer.finish_body().is_err() {
                    End::ClientGone
                } else if events.is_some_and(|e| e.seen) {
                    End::ErrorEvent
                } else {
                    End::Complete
                }
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

/// HTTP/1.0 clients get their reply read whole first (up to `MAX_BUFFERED`) and sent
/// with a Content-Length, so a backend that breaks off becomes a 502, never a reply
/// that looks complete. Everyone else gets the body as it arrives.
fn relay_buffered(
    request: Request,
    ticket: &Ticket,
    status: u16,
    headers: &[(String, String)],
    reader: &mut impl Read,
    access: &mut Access,
) -> End {
    let mut body = Vec::new();
    let failure = match reader.take(MAX_BUFFERED + 1).read_to_end(&mut body) {
        Ok(n) if n as u64 > MAX_BUFFERED => Some(format!(
            "reply larger than {MAX_BUFFERED} bytes for an HTTP/1.0 client"
        )),
        Ok(_) => None,
        Err(e) => Some(format!("reply broke off: {e}")),
    };
    if let Some(reason) = failure {
        let err = RouterError::BadGateway {
            backend: access.backend.clone().unwrap_or_default(),
            reason: reason.clone(),
        };
        reject(request, ticket, &err, access, false);
        return End::BackendBroke(reason);
    }
    if wire::send_full(request, ticket, status, headers, &body, false).is_err() {
        return End::ClientGone;
    }
    access.first_byte = Some(Instant::now());
    access.bytes_out = body.len() as u64;
    End::Complete
}
