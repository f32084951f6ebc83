//! A request on its way to the backends: `Exchange::forward` takes a slot (or waits in
//! line), sends the request with the slot's agent, and sends it again elsewhere while
//! that is safe; passive health (`record_failure`) counts the backend's failures. It
//! ends with a backend's reply head, or with the `RouterError` the client gets.
//!
//! A request is never sent twice once it may have started generating: only connect
//! failures, a pooled connection that failed before any reply byte (`BackendAgent::send`)
//! and 429/502/503/504 replies are retried.

use std::time::{Duration, Instant};

use ureq::config::ConfigBuilder;
use ureq::http;
use ureq::typestate::HttpCrateScope;

use crate::backend::registry::Slot;
use crate::client::registry::Ticket;
use crate::control::config::Config;
use crate::request::access::Access;
use crate::request::error::RouterError;
use crate::request::queue::{Limits, Want};
use crate::request::route;
use crate::shared::Shared;

/// Connecting to a backend on the same network takes milliseconds; a backend that
/// does not accept within this is treated as down rather than waited for.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// One request as it is sent, possibly several times, to backends.
pub(crate) struct Exchange<'a> {
    pub(crate) shared: &'a Shared,
    pub(crate) config: &'a Config,
    pub(crate) ticket: Ticket,
    pub(crate) method: &'a str,
    pub(crate) target: &'a str,
    pub(crate) headers: &'a [(String, String)],
    pub(crate) body: &'a [u8],
}

impl Exchange<'_> {
    /// Admits the request and sends it, retrying on another backend while it is safe:
    /// nothing has reached the client yet, and the backend either refused the
    /// connection or answered 502/503/504/429. A request that may already be generating
    /// (a timeout after it was sent) is never sent again. Returns the slot, the reply
    /// to relay; counts retries in `access.retries`, and names the backend in
    /// `access.backend` when the client left while a backend had the request.
    pub(crate) fn forward(
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
    pub(crate) fn admit(&self, want: Want) -> Result<Slot, RouterError> {
        let route = want.route.clone();
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
        if let Some(route) = &route {
            route::remember(self.shared, route, &slot);
        }
        Ok(slot)
    }

    /// The request's head towards the slot's backend: method, URL, the relayed
    /// headers, and the backend's own key in place of the client's when it has one.
    fn head_for(&self, slot: &Slot) -> http::request::Builder {
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
        builder
    }

    /// Sends the request to the slot's backend and waits for its response head.
    fn send(&self, slot: &Slot) -> Result<http::Response<ureq::Body>, SendFailure> {
        let builder = self.head_for(slot);
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

    /// Sends the request with `body`, a stream read as it goes (`request::upload`),
    /// instead of `self.body`, and waits for the reply head. Never resent by itself:
    /// it goes on a fresh connection (`BackendAgent::send_fresh`).
    pub(crate) fn send_streamed(
        &self,
        slot: &Slot,
        body: &mut dyn std::io::Read,
        length: Option<u64>,
    ) -> Result<http::Response<ureq::Body>, SendFailure> {
        let mut builder = self.head_for(slot);
        if let Some(n) = length {
            builder = builder.header("Content-Length", n);
        }
        let request = builder
            .body(ureq::SendBody::from_reader(body))
            .map_err(|e| SendFailure {
                err: RouterError::BadRequest(format!("cannot forward this request: {e}")),
                before_send: false,
                backend_fault: false,
            })?;
        let timeout = self.config.settings.request_timeout;
        slot.agent()
            .send_fresh(request, |builder| {
                builder
                    .timeout_connect(Some(CONNECT_TIMEOUT.min(timeout)))
                    .timeout_send_body(Some(self.config.settings.client_body_timeout + timeout))
                    .timeout_recv_response(Some(timeout))
                    .timeout_per_read(Some(timeout))
            })
            .map_err(|e| SendFailure::of(slot.backend_url(), e))
    }

    /// Passive health: counts a failed request against the slot's backend.
    pub(crate) fn record_failure(&self, slot: &Slot, why: &str) {
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
pub(crate) fn is_backend_failure(status: u16) -> bool {
    matches!(status, 502..=504)
}

/// A send that got no reply head.
pub(crate) struct SendFailure {
    pub(crate) err: RouterError,
    /// The request certainly never reached the backend, so sending it elsewhere
    /// cannot run it twice.
    pub(crate) before_send: bool,
    /// It counts against the backend's health (passive health).
    pub(crate) backend_fault: bool,
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
