//! The request path of a proxied request, one function per phase, called top-down
//! from `handle`:
//!
//! The head is already parsed and checked (`client::head`). The API-key check
//! (`auth::check`) → `Request::read_body` (size limit, body budget) →
//! `requested` (the model, and for cache-aware routing the prompt's blocks, which
//! `route::plan` turns into the request's `Route`) → `Exchange::forward`
//! (`request::exchange`: admit a slot or wait
//! in line, send with ureq, retry elsewhere while it is safe) → `relay_response`
//! (head, then one chunk per backend read, flushed) → the `Slot` drops and the
//! backend's slot is free again; `finish` counts the request and logs it, once.
//!
//! An error the router answers itself goes through `reject`, which notes it in the
//! request's `Access` and sends `RouterError::reply`; the request id is put on every
//! header list, to the backend and to the client, by `Access::tag`.
//!
//! Nothing reaches the client before the backend's response head, so until then any
//! failure can still be answered with a clean error.

use std::io::Read;
use std::sync::Arc;
use std::time::Instant;

use ureq::http;

use crate::backend::registry::Slot;
use crate::client::head::Upgrade;
use crate::client::reply::{self, BodyWriter, Framing};
use crate::client::request::{BodyLimits, Request};
use crate::control::config::Config;
use crate::control::config::Routing;
use crate::request::access::{self, Access};
use crate::request::auth::{self, Verdict};
use crate::request::error::RouterError;
use crate::request::exchange::{is_backend_failure, Exchange};
use crate::request::generation::Observer;
use crate::request::headers;
use crate::request::prefix;
use crate::request::queue::Want;
use crate::request::route;
use crate::request::trace::Trace;
use crate::request::{query, stored, tunnel, upload, websocket};
use crate::shared::Shared;

/// The size of one read from the backend, and so the largest chunk sent to the client.
/// An SSE event is far smaller; a large JSON reply takes more reads. Each stream holds
/// one for its whole life, so the size counts at 1000 streams (4 MiB at 4 KiB).
const READ_BUF: usize = 4 * 1024;

/// What sees a relayed reply's body bytes as they go (`deliver`).
pub(crate) type Tap<'a> = &'a mut dyn FnMut(&[u8]);

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
    access.trace = Some(Trace::of_request(&request.head.headers));
    // The backend connection the request uses is recorded, so that the connection
    // thread can stop it when the client leaves (`client::handoff`).
    let call = Arc::clone(request.ticket().backend_call());
    call.during(|| proxy(&mut request, shared, &mut access));
    finish(access, shared);
    drop(request);
}

/// The one end of every proxied request, however it ended: its metrics, then its
/// access entry. Taking the `Access` by value makes it run once.
fn finish(access: Access, shared: &Shared) {
    let known_model = access
        .model
        .as_deref()
        .is_some_and(|m| shared.table.is_known_model(m));
    shared.metrics.observe_request(&access, known_model);
    access.finish();
}

fn proxy(request: &mut Request, shared: &Arc<Shared>, access: &mut Access) {
    let config = shared.config();
    let settings = &config.settings;
    let method = request.head.method.clone();
    if !headers::relayed_method(&method) {
        return reject(request, &RouterError::MethodNotImplemented(method), access);
    }
    let websocket = request.head.upgrade == Upgrade::WebSocket;
    // A browser's WebSocket cannot set `Authorization`: its key comes as a protocol.
    let protocols = request.head.header("sec-websocket-protocol").unwrap_or("");
    let (protocol_key, other_protocols) = websocket::split_key_protocol(protocols);
    let bearer = protocol_key.map(|key| format!("Bearer {key}"));
    let verdict = auth::check(
        request
            .head
            .header("authorization")
            .or(bearer.as_deref().filter(|_| websocket)),
        shared.client_keys(&config),
    );
    if verdict == Verdict::Refused {
        return reject(request, &RouterError::Unauthorized, access);
    }
    let mut upstream = headers::upstream_headers(
        &request.head.headers,
        request.peer().ip(),
        request.is_secure(),
    );
    if verdict == Verdict::Granted {
        // The client's key is for the router; it never reaches a backend.
        upstream.retain(|(name, _)| !name.eq_ignore_ascii_case("authorization"));
        if websocket && protocol_key.is_some() {
            upstream.retain(|(name, _)| !name.eq_ignore_ascii_case("sec-websocket-protocol"));
            if !other_protocols.is_empty() {
                upstream.push((
                    "Sec-WebSocket-Protocol".to_owned(),
                    other_protocols.join(", "),
                ));
            }
        }
    }
    access.tag(&mut upstream);
    if let Some(trace) = &access.trace {
        trace.apply(&mut upstream);
    }
    let target = request.head.target.clone();
    if websocket {
        if request.head.has_body() {
            let err = RouterError::BadRequest("a WebSocket upgrade has no body".to_owned());
            return reject(request, &err, access);
        }
        access.model = query::param(&target, "model");
        if let Err(err) = open_tunnel(request, shared, &config, &upstream, access) {
            reject(request, &err, access);
        }
        return;
    }
    if let Some(boundary) = upload::boundary(&request.head) {
        if let Err(err) = upload::serve(request, shared, &config, &upstream, &boundary, access) {
            reject(request, &err, access);
        }
        return;
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
    let cache_aware = settings.routing == Routing::CacheAware;
    let blocks = match requested(&method, &target, &body, cache_aware) {
        Ok((model, blocks)) => {
            access.model = model.or_else(|| query::param(&target, "model"));
            blocks
        }
        Err(err) => return reject(request, &err, access),
    };
    let path = request.head.path().to_owned();
    // Only a create can continue a stored response; other bodies are not parsed again.
    let creates = method == "POST" && path.trim_end_matches('/') == "/v1/responses";
    let previous = creates.then(|| stored::previous_id(&body)).flatten();
    let stored_use = stored::use_of(&method, &path, previous);
    learn_model(shared, &config, access.model.as_deref());
    let exchange = Exchange {
        shared,
        config: &config,
        ticket: request.ticket().clone(),
        method: &method,
        target: &target,
        headers: &upstream,
        body: &body,
    };
    let route = cache_aware.then(|| {
        let session = request.head.header(&settings.session_header);
        route::plan(shared, blocks, session)
    });
    let want = Want {
        model: access.model.clone(),
        exclude: Vec::new(),
        route: route.clone(),
    };
    let forwarded = match &stored_use {
        Some(stored::Use::Of { id, .. }) => forward_stored(&exchange, id, want, access),
        _ => exchange.forward(want, access),
    };
    let (slot, response) = match forwarded {
        Ok(sent) => sent,
        Err(err) => return reject(request, &err, access),
    };
    access.route = route.as_ref().map(|r| r.routed(slot.backend_id()));
    let ok = response.status().is_success();
    // A created response's id is learnt as soon as it goes by, so a cancel sent while
    // its stream still runs finds it.
    let mut ids = (ok && creates).then(|| {
        let stream = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("text/event-stream"));
        stored::IdScanner::new(stream)
    });
    let owner = slot.backend_id();
    let mut learnt = false;
    let mut learn = |bytes: &[u8]| {
        let Some(scanner) = ids.as_mut().filter(|_| !learnt) else {
            return;
        };
        scanner.feed(bytes);
        if let Some(id) = scanner.id() {
            learnt = true;
            let (max, ttl) = (settings.stored_responses_max, settings.stored_responses_ttl);
            shared.responses.learn(id, owner, max, ttl);
        }
    };
    deliver(
        request,
        &exchange,
        &slot,
        response,
        access,
        Some(&mut learn),
    );
    if let (true, Some(stored::Use::Of { id, delete: true })) = (ok, &stored_use) {
        shared.responses.forget(id);
    }
}

/// Relays a backend's reply to the client and settles the request's outcome: passive
/// health, and the access entry's `outcome`. `tap` sees the reply's bytes as they go
/// (to learn a created response's id).
pub(crate) fn deliver(
    request: &mut Request,
    exchange: &Exchange,
    slot: &Slot,
    response: http::Response<ureq::Body>,
    access: &mut Access,
    tap: Option<Tap>,
) {
    let shared = exchange.shared;
    access.backend = Some(slot.backend_url().to_owned());
    access.queue_wait = slot.queued_for;
    let end = relay_response(request, response, access, tap);
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
            exchange.record_failure(slot, why);
            "backend_broke"
        }
    };
}

/// A request for a model no backend lists has the model lists read again first
/// (`backend::refresh`), for up to `model_refresh_wait`: a LoRA adapter loaded a
/// moment ago is then routed, not refused.
pub(crate) fn learn_model(shared: &Shared, config: &Config, model: Option<&str>) {
    let Some(model) = model else { return };
    let settings = &config.settings;
    if settings.model_refresh_wait.is_zero() || shared.table.is_known_model(model) {
        return;
    }
    shared.refresher.learn(
        &shared.table,
        model,
        settings.model_refresh_wait,
        settings.health_check_timeout,
    );
}

/// Sends a request about stored response `id` where it lives: to the backend that made
/// it, if the router knows it; otherwise to each healthy backend in turn until one
/// answers other than 404 (the last 404 is the answer when none knows it).
fn forward_stored(
    exchange: &Exchange,
    id: &str,
    mut want: Want,
    access: &mut Access,
) -> Result<(Slot, http::Response<ureq::Body>), RouterError> {
    let shared = exchange.shared;
    let ttl = exchange.config.settings.stored_responses_ttl;
    if let Some(owner) = shared.responses.backend_of(id, ttl) {
        let others: Vec<_> = shared.table.view().backends.iter().map(|b| b.id).collect();
        if others.contains(&owner) {
            want.exclude = others.into_iter().filter(|b| *b != owner).collect();
            return exchange.forward(want, access);
        }
        // Its backend left the config: whoever has it now must be asked.
        shared.responses.forget(id);
    }
    loop {
        let (slot, response) = exchange.forward(want.clone(), access)?;
        want.exclude.push(slot.backend_id());
        if response.status().as_u16() != 404 || !shared.table.can_serve(&want) {
            if response.status().is_success() {
                let max = exchange.config.settings.stored_responses_max;
                shared.responses.learn(id, slot.backend_id(), max, ttl);
            }
            return Ok((slot, response));
        }
        log::debug!(
            "response {id:?} is not on {}; asking the next backend",
            slot.backend_url()
        );
    }
}

/// Admits a WebSocket upgrade like any request, then runs its tunnel.
fn open_tunnel(
    request: &mut Request,
    shared: &Arc<Shared>,
    config: &Config,
    upstream: &[(String, String)],
    access: &mut Access,
) -> Result<(), RouterError> {
    learn_model(shared, config, access.model.as_deref());
    let method = request.head.method.clone();
    let target = request.head.target.clone();
    let exchange = Exchange {
        shared,
        config,
        ticket: request.ticket().clone(),
        method: &method,
        target: &target,
        headers: upstream,
        body: &[],
    };
    let slot = exchange.admit(Want {
        model: access.model.clone(),
        exclude: Vec::new(),
        route: None,
    })?;
    access.backend = Some(slot.backend_url().to_owned());
    access.queue_wait = slot.queued_for;
    tunnel::serve(request, config, shared, &slot, upstream, access)
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
    requested(method, target, body, false).map(|(model, _)| model)
}

/// `requested_model`, and with `prompt` the prompt's block hashes (`request::prefix`),
/// read in the same parse: a long conversation is read once. The verdict on the body is
/// the same either way: a body whose prompt cannot be read is read again for its model
/// alone.
pub fn requested(
    method: &str,
    target: &str,
    body: &[u8],
    prompt: bool,
) -> Result<(Option<String>, Vec<u64>), RouterError> {
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
            Ok((None, Vec::new()))
        };
    }
    let parsed = match prompt && method == "POST" && prefix::has_prompt(route) {
        true => prefix::parse(route, body).ok(),
        false => None,
    };
    let (model, blocks) = match parsed {
        Some(p) => (Ok(p.model), p.blocks),
        None => (
            serde_json::from_slice::<Probe>(body).map(|p| p.model),
            Vec::new(),
        ),
    };
    match model {
        Ok(Some(serde_json::Value::String(model))) => Ok((Some(model), blocks)),
        Err(e) if needs_json => Err(RouterError::BadRequest(format!(
            "the body is not valid JSON: {e}"
        ))),
        Ok(Some(serde_json::Value::Null) | None) | Err(_) => Ok((None, blocks)),
        Ok(Some(other)) => Err(RouterError::BadRequest(format!(
            "\"model\" must be a string, found {other}"
        ))),
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
    let mut id = Vec::new();
    access.tag(&mut id);
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

/// Relays the backend's response: its status and headers as they are, then the body,
/// each backend read flushed to the client as one chunk.
fn relay_response(
    request: &mut Request,
    response: http::Response<ureq::Body>,
    access: &mut Access,
    mut tap: Option<Tap>,
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
    access.tag(&mut out_headers);
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
    let json = status == 200
        && headers::find(&out_headers, "content-type")
            .is_some_and(|ct| ct.starts_with("application/json"));
    let mut observer = Observer::new(access.started(), access.stream, json);
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
                } else if observer.error_event() {
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
                observer.observe(&buf[..n], Instant::now());
                if let Some(tap) = tap.as_deref_mut() {
                    tap(&buf[..n]);
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
    access.generation = Some(observer.finish());
    end
}
