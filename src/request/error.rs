//! The errors the router itself answers with, and the one place that knows their wire
//! shape (`RouterError::reply`): an OpenAI-style body `{"error": {"message", "type",
//! "param", "code"}}`, the status that goes with it, and the headers it needs
//! (`Retry-After`, `Allow`, `WWW-Authenticate`). `client::reply` adds the framing.
//!
//! It lives in `request` because what gets an error reply is a request: the client
//! layer's refusals of a head it cannot read (`RouterError::of_head`) are requests
//! that did not get this far, and admission's refusals (`Rejection`) become errors
//! here. Every layer names it as `request::error`.
//!
//! Errors are classified by side, as a proxy should: the client's mistakes are 4xx,
//! lack of capacity is 503 with `Retry-After`, a backend that failed is 502 or 504, and
//! the router's own faults are 500. A backend's own error replies are not `RouterError`s:
//! they are relayed untouched.

use std::fmt;
use std::time::Duration;

use crate::client::head::HeadError;
use crate::request::queue::Rejection;

/// One of the router's own error replies, as `RouterError::reply` makes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

/// An error the router answers itself, before or instead of a backend reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouterError {
    /// Every slot is taken and the queue is full.
    QueueFull { queue_len: usize },
    /// The request waited `queue_timeout` for a slot.
    QueueTimeout { waited: Duration },
    /// No healthy backend exists that serves the request.
    NoBackend,
    /// No backend serves the model the request names.
    UnknownModel(String),
    /// No backend whose models are known serves the model, and `unknown` backends
    /// whose models are not known yet are down.
    ModelUnavailable { model: String, unknown: usize },
    /// The router is shutting down and takes no new requests.
    ShuttingDown,
    /// The request body is larger than `max_body_bytes`.
    BodyTooLarge { limit: u64 },
    /// The request is malformed in a way the router must not forward.
    BadRequest(String),
    /// The client closed its connection before the request reached a backend.
    ClientClosed,
    /// The request body did not arrive within `client_body_timeout`.
    BodyTimeout { limit: Duration },
    /// No valid client API key.
    Unauthorized,
    /// The request head is over the router's caps (`max_header_bytes` or the field count).
    HeadersTooLarge { limit: usize },
    /// Request bodies held at once are at `max_buffered_body_bytes`.
    BodyBudget,
    /// An HTTP version other than 1.0 and 1.1.
    VersionNotSupported(String),
    /// An `Expect` other than `100-continue`.
    ExpectationFailed(String),
    /// A WebSocket upgrade on a path other than `/v1/realtime`.
    UpgradeRefused,
    /// The request target is over the router's cap.
    UriTooLong,
    /// A method the router does not relay (CONNECT, TRACE, extension methods).
    MethodNotImplemented(String),
    /// The request's method is one the router does not serve on this path.
    MethodNotAllowed { allow: &'static str },
    /// The backend could not be reached or broke the exchange before its reply head.
    BadGateway { backend: String, reason: String },
    /// The backend did not answer within `request_timeout`.
    GatewayTimeout { backend: String },
    /// A fault inside the router (a caught panic).
    Internal,
}

impl RouterError {
    pub fn status(&self) -> u16 {
        match self {
            RouterError::QueueFull { .. }
            | RouterError::QueueTimeout { .. }
            | RouterError::NoBackend
            | RouterError::ModelUnavailable { .. }
            | RouterError::ShuttingDown
            | RouterError::BodyBudget => 503,
            RouterError::VersionNotSupported(_) => 505,
            RouterError::ExpectationFailed(_) => 417,
            RouterError::UpgradeRefused => 400,
            RouterError::BodyTooLarge { .. } => 413,
            RouterError::UnknownModel(_) => 404,
            RouterError::BadRequest(_) => 400,
            // nginx's code for it: no client will read this reply, but the access log
            // and the metrics tell it from the router's own errors.
            RouterError::ClientClosed => 499,
            RouterError::BodyTimeout { .. } => 408,
            RouterError::Unauthorized => 401,
            RouterError::HeadersTooLarge { .. } => 431,
            RouterError::UriTooLong => 414,
            RouterError::MethodNotImplemented(_) => 501,
            RouterError::MethodNotAllowed { .. } => 405,
            RouterError::BadGateway { .. } => 502,
            RouterError::GatewayTimeout { .. } => 504,
            RouterError::Internal => 500,
        }
    }

    /// The OpenAI error `type`.
    fn kind(&self) -> &'static str {
        match self {
            RouterError::QueueFull { .. }
            | RouterError::QueueTimeout { .. }
            | RouterError::NoBackend
            | RouterError::ModelUnavailable { .. }
            | RouterError::ShuttingDown
            | RouterError::BodyBudget => "server_overloaded",
            RouterError::BodyTooLarge { .. }
            | RouterError::Unauthorized
            | RouterError::VersionNotSupported(_)
            | RouterError::ExpectationFailed(_)
            | RouterError::UpgradeRefused
            | RouterError::HeadersTooLarge { .. }
            | RouterError::UriTooLong
            | RouterError::MethodNotImplemented(_)
            | RouterError::UnknownModel(_)
            | RouterError::BadRequest(_)
            | RouterError::ClientClosed
            | RouterError::BodyTimeout { .. }
            | RouterError::MethodNotAllowed { .. } => "invalid_request_error",
            RouterError::BadGateway { .. } | RouterError::GatewayTimeout { .. } => "upstream_error",
            RouterError::Internal => "internal_error",
        }
    }

    /// A stable machine-readable `code`, for clients and dashboards.
    pub fn code(&self) -> &'static str {
        match self {
            RouterError::QueueFull { .. } => "queue_full",
            RouterError::QueueTimeout { .. } => "queue_timeout",
            RouterError::NoBackend => "no_healthy_backend",
            RouterError::UnknownModel(_) => "model_not_found",
            RouterError::ModelUnavailable { .. } => "model_not_available",
            RouterError::ShuttingDown => "shutting_down",
            RouterError::BodyTooLarge { .. } => "request_too_large",
            RouterError::BadRequest(_) => "bad_request",
            RouterError::ClientClosed => "client_closed_request",
            RouterError::BodyTimeout { .. } => "request_timeout",
            RouterError::Unauthorized => "invalid_api_key",
            RouterError::HeadersTooLarge { .. } => "headers_too_large",
            RouterError::BodyBudget => "body_memory_full",
            RouterError::VersionNotSupported(_) => "http_version_not_supported",
            RouterError::ExpectationFailed(_) => "expectation_failed",
            RouterError::UpgradeRefused => "upgrade_not_supported",
            RouterError::UriTooLong => "uri_too_long",
            RouterError::MethodNotImplemented(_) => "method_not_implemented",
            RouterError::MethodNotAllowed { .. } => "method_not_allowed",
            RouterError::BadGateway { .. } => "backend_unavailable",
            RouterError::GatewayTimeout { .. } => "backend_timeout",
            RouterError::Internal => "internal_error",
        }
    }

    /// Whether the router answered without involving a backend (as opposed to a
    /// backend that failed).
    pub fn is_rejection(&self) -> bool {
        !matches!(
            self,
            RouterError::BadGateway { .. }
                | RouterError::GatewayTimeout { .. }
                | RouterError::Internal
        )
    }

    /// Seconds a client should wait before trying again, for the capacity errors.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            RouterError::QueueFull { .. }
            | RouterError::QueueTimeout { .. }
            | RouterError::NoBackend
            | RouterError::ModelUnavailable { .. }
            | RouterError::ShuttingDown
            | RouterError::BodyBudget => Some(1),
            _ => None,
        }
    }

    /// The whole reply to this error but its framing: status, headers (`extra`, the
    /// request id, after `Content-Type`) and body. `Connection` and the length are the
    /// connection's business (`client::reply`): whether it closes depends on what was
    /// read of the request, not on the error.
    pub fn reply(&self, extra: &[(String, String)]) -> ErrorReply {
        let mut headers = vec![("Content-Type".to_owned(), "application/json".to_owned())];
        headers.extend_from_slice(extra);
        if let Some(secs) = self.retry_after() {
            headers.push(("Retry-After".to_owned(), secs.to_string()));
        }
        if let RouterError::MethodNotAllowed { allow } = self {
            headers.push(("Allow".to_owned(), (*allow).to_owned()));
        }
        if let RouterError::Unauthorized = self {
            headers.push((
                "WWW-Authenticate".to_owned(),
                "Bearer realm=\"vllm-router\"".to_owned(),
            ));
        }
        ErrorReply {
            status: self.status(),
            headers,
            body: self.body(),
        }
    }

    /// The OpenAI-style JSON body.
    pub fn body(&self) -> String {
        serde_json::json!({
            "error": {
                "message": self.to_string(),
                "type": self.kind(),
                "param": null,
                "code": self.code(),
            }
        })
        .to_string()
    }
}

impl fmt::Display for RouterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RouterError::QueueFull { queue_len } => write!(
                f,
                "all backends are at capacity and {queue_len} requests are already queued; retry later"
            ),
            RouterError::QueueTimeout { waited } => write!(
                f,
                "all backends stayed at capacity for {:.1}s; retry later",
                waited.as_secs_f64()
            ),
            RouterError::NoBackend => write!(f, "no healthy backend is available; retry later"),
            RouterError::UnknownModel(model) => write!(
                f,
                "the model {model:?} is not served by any backend; GET /v1/models lists the models available"
            ),
            RouterError::ModelUnavailable { model, unknown } => write!(
                f,
                "the model {model:?} is not served by any backend whose models are known; \
                 {unknown} {} down with {} models unknown, so it may be served again once {} back",
                if *unknown == 1 { "backend is" } else { "backends are" },
                if *unknown == 1 { "its" } else { "their" },
                if *unknown == 1 { "it is" } else { "they are" },
            ),
            RouterError::ShuttingDown => write!(f, "the router is shutting down; retry on another instance"),
            RouterError::BodyTooLarge { limit } => {
                write!(f, "request body is larger than the limit of {limit} bytes")
            }
            RouterError::BadRequest(why) => write!(f, "bad request: {why}"),
            RouterError::ClientClosed => write!(
                f,
                "the client closed its connection before the request reached a backend"
            ),
            RouterError::BodyTimeout { limit } => write!(
                f,
                "the request body did not arrive within client_body_timeout ({}s)",
                limit.as_secs_f64()
            ),
            RouterError::Unauthorized => write!(
                f,
                "missing or invalid API key; send it as Authorization: Bearer <key>"
            ),
            RouterError::HeadersTooLarge { limit } => write!(
                f,
                "the request head is too large (at most {} header fields and {limit} bytes, max_header_bytes)",
                crate::client::head::MAX_FIELDS,
            ),
            RouterError::UriTooLong => write!(
                f,
                "request target is longer than {} bytes",
                crate::client::head::MAX_TARGET_BYTES
            ),
            RouterError::BodyBudget => write!(
                f,
                "the router holds as many request bodies as its memory budget allows (max_buffered_body_bytes); retry shortly"
            ),
            RouterError::VersionNotSupported(version) => {
                write!(f, "{version} is not supported; send HTTP/1.1")
            }
            RouterError::ExpectationFailed(value) => {
                write!(f, "Expect: {value} is not supported; only 100-continue is")
            }
            RouterError::UpgradeRefused => write!(
                f,
                "WebSocket upgrades are proxied on GET /v1/realtime only; send plain HTTP requests elsewhere"
            ),
            RouterError::MethodNotImplemented(method) => {
                write!(f, "method {method:?} is not supported by the router")
            }
            RouterError::MethodNotAllowed { allow } => {
                write!(f, "method not allowed here; allowed: {allow}")
            }
            // The backend stays out of the text, which clients get: its address is
            // internal, and the access log and /health name it.
            RouterError::BadGateway { reason, .. } => write!(f, "the backend failed: {reason}"),
            RouterError::GatewayTimeout { .. } => {
                write!(f, "the backend did not answer within request_timeout")
            }
            RouterError::Internal => write!(f, "internal router error; the request was not completed"),
        }
    }
}

impl std::error::Error for RouterError {}

impl RouterError {
    /// The reply to a head the router refused while reading it.
    pub fn of_head(err: HeadError, max_header_bytes: usize) -> RouterError {
        match err {
            HeadError::Malformed(why) => RouterError::BadRequest(why),
            HeadError::TooLarge => RouterError::HeadersTooLarge {
                limit: max_header_bytes,
            },
            HeadError::TargetTooLong => RouterError::UriTooLong,
            HeadError::Version(version) => RouterError::VersionNotSupported(version),
            HeadError::Expectation(value) => RouterError::ExpectationFailed(value),
        }
    }
}

impl From<Rejection> for RouterError {
    fn from(r: Rejection) -> Self {
        match r {
            Rejection::NoBackend => RouterError::NoBackend,
            Rejection::UnknownModel(model) => RouterError::UnknownModel(model),
            Rejection::ModelUnavailable { model, unknown } => {
                RouterError::ModelUnavailable { model, unknown }
            }
            Rejection::QueueFull { queue_len } => RouterError::QueueFull { queue_len },
            Rejection::QueueTimeout { waited } => RouterError::QueueTimeout { waited },
            Rejection::Closed => RouterError::ShuttingDown,
            Rejection::Abandoned => RouterError::ClientClosed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(err: RouterError, status: u16, code: &str, retry_after: Option<u64>) {
        assert_eq!(err.status(), status, "{err:?}");
        assert_eq!(err.retry_after(), retry_after, "{err:?}");
        let body: serde_json::Value = serde_json::from_str(&err.body()).expect("json body");
        assert_eq!(body["error"]["code"], code);
        assert_eq!(body["error"]["message"], err.to_string());
        assert!(body["error"]["type"].is_string());
    }

    #[test]
    fn an_error_reply_carries_its_own_headers_after_the_extra_ones() {
        let id = [("X-Request-Id".to_owned(), "r".to_owned())];
        let names = |err: RouterError| {
            let reply = err.reply(&id);
            assert_eq!(reply.status, err.status());
            assert_eq!(reply.body, err.body());
            reply
                .headers
                .into_iter()
                .map(|(n, _)| n)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(RouterError::NoBackend),
            ["Content-Type", "X-Request-Id", "Retry-After"]
        );
        assert_eq!(
            names(RouterError::Unauthorized),
            ["Content-Type", "X-Request-Id", "WWW-Authenticate"]
        );
        assert_eq!(
            names(RouterError::MethodNotAllowed { allow: "GET, HEAD" }),
            ["Content-Type", "X-Request-Id", "Allow"]
        );
    }

    #[test]
    fn status_and_body_are_decided_together() {
        check(
            RouterError::QueueFull { queue_len: 3 },
            503,
            "queue_full",
            Some(1),
        );
        check(
            RouterError::QueueTimeout {
                waited: Duration::from_secs(2),
            },
            503,
            "queue_timeout",
            Some(1),
        );
        check(RouterError::NoBackend, 503, "no_healthy_backend", Some(1));
        check(
            RouterError::UnknownModel("m".into()),
            404,
            "model_not_found",
            None,
        );
        check(
            RouterError::ModelUnavailable {
                model: "m".into(),
                unknown: 2,
            },
            503,
            "model_not_available",
            Some(1),
        );
        check(RouterError::ShuttingDown, 503, "shutting_down", Some(1));
        check(
            RouterError::BodyTooLarge { limit: 10 },
            413,
            "request_too_large",
            None,
        );
        check(
            RouterError::BadRequest("x".into()),
            400,
            "bad_request",
            None,
        );
        check(
            RouterError::BadGateway {
                backend: "http://b".into(),
                reason: "refused".into(),
            },
            502,
            "backend_unavailable",
            None,
        );
        check(
            RouterError::GatewayTimeout {
                backend: "http://b".into(),
            },
            504,
            "backend_timeout",
            None,
        );
        check(RouterError::Internal, 500, "internal_error", None);
        for err in [
            RouterError::BadGateway {
                backend: "http://10.0.0.7:8000".into(),
                reason: "refused".into(),
            },
            RouterError::GatewayTimeout {
                backend: "http://10.0.0.7:8000".into(),
            },
        ] {
            assert!(!err.body().contains("10.0.0.7"), "{}", err.body());
        }
        check(RouterError::Unauthorized, 401, "invalid_api_key", None);
        check(
            RouterError::HeadersTooLarge { limit: 65536 },
            431,
            "headers_too_large",
            None,
        );
        check(RouterError::BodyBudget, 503, "body_memory_full", Some(1));
        check(
            RouterError::VersionNotSupported("HTTP/2.0".into()),
            505,
            "http_version_not_supported",
            None,
        );
        check(
            RouterError::ExpectationFailed("x".into()),
            417,
            "expectation_failed",
            None,
        );
        check(
            RouterError::UpgradeRefused,
            400,
            "upgrade_not_supported",
            None,
        );
        check(RouterError::UriTooLong, 414, "uri_too_long", None);
        check(
            RouterError::MethodNotImplemented("TRACE".into()),
            501,
            "method_not_implemented",
            None,
        );
    }
}
