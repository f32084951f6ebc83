//! The router's own endpoints, answered without touching a backend: `/health`,
//! `/livez`, `/readyz`, `/load-stats`, `/metrics` and `GET /v1/models`. Everything
//! else is proxied.
//!
//! They read a snapshot of the slot table (`Table::view`), so they never wait behind a
//! backend and stay fast when every backend is busy or hung.

use std::sync::Arc;

use serde_json::json;

use crate::backend::registry::{BackendView, TableView};
use crate::client::reply;
use crate::client::request::Request;
use crate::request::auth;
use crate::request::error::RouterError;
use crate::request::pick::Reason;
use crate::shared::Shared;

/// Answers the request if it is for one of the router's own paths; otherwise gives
/// it back to be proxied. A body sent to one of them is never read: the reply closes
/// the connection (`Request::must_close`).
pub fn try_handle(mut request: Request, shared: &Arc<Shared>) -> Option<Request> {
    let path = request.head.path().to_owned();
    let answer: fn(&Shared) -> Answer = match path.as_str() {
        "/health" => |s| Answer::json(health(s)),
        "/livez" => |_| Answer::json((200, json!({ "status": "alive" }))),
        "/readyz" => |s| Answer::json(readyz(s)),
        "/load-stats" => |s| Answer::json(load_stats(s)),
        "/v1/models" => |s| Answer::json(models(s)),
        "/metrics" => metrics,
        _ => return Some(request),
    };
    let config = shared.config();
    let needs_key = match path.as_str() {
        "/v1/models" => true,
        "/metrics" | "/load-stats" => config.settings.protect_status_endpoints,
        _ => false,
    };
    let refused = needs_key
        && auth::check(
            request.head.header("authorization"),
            shared.client_keys(&config),
        ) == auth::Verdict::Refused;
    let result = if refused {
        shared
            .metrics
            .observe_rejection(RouterError::Unauthorized.code());
        reply::send_error(&mut request, &RouterError::Unauthorized, &[]).map(|_| ())
    } else if matches!(request.head.method.as_str(), "GET" | "HEAD") {
        let Answer {
            status,
            content_type,
            body,
        } = answer(shared);
        let headers = [("Content-Type".to_owned(), content_type.to_owned())];
        reply::send_full(&mut request, status, &headers, &body)
    } else {
        let err = RouterError::MethodNotAllowed { allow: "GET, HEAD" };
        reply::send_error(&mut request, &err, &[]).map(|_| ())
    };
    if let Err(e) = result {
        log::debug!("could not answer {path}: {e}");
    }
    None
}

/// A reply of one of the router's own endpoints.
struct Answer {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
}

impl Answer {
    fn json((status, doc): (u16, serde_json::Value)) -> Answer {
        Answer {
            status,
            content_type: "application/json",
            body: doc.to_string().into_bytes(),
        }
    }
}

/// The Prometheus exposition.
fn metrics(shared: &Shared) -> Answer {
    let max_queue_size = shared.config().settings.max_queue_size;
    Answer {
        status: 200,
        content_type: "text/plain; version=0.0.4; charset=utf-8",
        body: shared
            .metrics
            .render(&shared.table.view(), max_queue_size, shared.clients.open())
            .into_bytes(),
    }
}

/// Slots admission would still hand out on a backend: its cap less the load admission
/// counts (`BackendView::load`, which includes what the backend reports of other
/// routers), not less this router's in-flight count alone.
fn available(b: &BackendView) -> u32 {
    b.max_concurrent.saturating_sub(b.load)
}

fn server_json(b: &BackendView) -> serde_json::Value {
    let available = available(b);
    let unix = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .ok()
            .map(|d| d.as_secs_f64())
    };
    json!({
        "url": b.url,
        "healthy": b.healthy,
        "reason": b.reason,
        "in_flight": b.in_flight,
        "max_concurrent_requests": b.max_concurrent,
        "available": available,
        "utilization_percent": percent(b.in_flight, b.max_concurrent),
        "requests_total": b.admitted_total,
        "consecutive_failures": b.checks.consecutive_failures,
        "request_failures": b.request_failures,
        "success_rate": b.checks.success_rate,
        "last_check_unix": b.checks.last_check.and_then(unix),
        "last_check_latency_ms": b.checks.last_latency.map(|d| d.as_secs_f64() * 1000.0),
        "models": b.models,
        "load": b.load,
        "backend_running": b.reported.as_ref().map(|r| r.running),
        "backend_waiting": b.reported.as_ref().map(|r| r.waiting),
        "backend_kv_cache_usage": b.reported.as_ref().and_then(|r| r.kv_cache_usage),
        "backend_metrics_at_unix": b.reported.as_ref().and_then(|r| unix(r.scraped_at)),
        "prefix_blocks": b.prefix_blocks,
        "prefix_capacity_blocks": b.prefix_capacity,
        "prefix_index_max_bytes": b.prefix_bound_bytes,
        "routed": Reason::ALL
            .iter()
            .zip(b.routed)
            .map(|(reason, n)| (reason.as_str().to_owned(), json!(n)))
            .collect::<serde_json::Map<_, _>>(),
    })
}

/// The models of every healthy backend, each once, as an OpenAI list: answered from
/// what the health thread learned, without a round of backend calls per request.
fn models(shared: &Shared) -> (u16, serde_json::Value) {
    (
        200,
        json!({ "object": "list", "data": shared.table.models() }),
    )
}

fn percent(part: u32, whole: u32) -> f64 {
    if whole == 0 {
        return 0.0;
    }
    (f64::from(part) * 1000.0 / f64::from(whole)).round() / 10.0
}

/// 200 while at least one backend is healthy, else 503.
fn health(shared: &Shared) -> (u16, serde_json::Value) {
    let view = shared.table.view();
    let healthy = view.backends.iter().filter(|b| b.healthy).count();
    let total = view.backends.len();
    let status = if healthy == 0 {
        "unhealthy"
    } else if healthy < total {
        "degraded"
    } else {
        "healthy"
    };
    let doc = json!({
        "status": status,
        "healthy_servers": healthy,
        "total_servers": total,
        "uptime_seconds": shared.started.elapsed().as_secs(),
        "version": env!("CARGO_PKG_VERSION"),
        "servers": view.backends.iter().map(server_json).collect::<Vec<_>>(),
    });
    (if healthy > 0 { 200 } else { 503 }, doc)
}

/// 200 when the router can route a request now; 503 while draining or with no usable
/// backend, so a load balancer sends traffic elsewhere without restarting us.
fn readyz(shared: &Shared) -> (u16, serde_json::Value) {
    if shared.is_draining() {
        (503, json!({ "status": "draining" }))
    } else if shared.table.has_usable_backend() {
        (200, json!({ "status": "ready" }))
    } else {
        (503, json!({ "status": "no_healthy_backend" }))
    }
}

fn load_stats(shared: &Shared) -> (u16, serde_json::Value) {
    let TableView {
        backends,
        queue_len,
    } = shared.table.view();
    let config = shared.config();
    let in_flight: u32 = backends.iter().map(|b| b.in_flight).sum();
    let capacity: u32 = backends.iter().map(|b| b.max_concurrent).sum();
    let available: u32 = backends.iter().filter(|b| b.healthy).map(available).sum();
    let doc = json!({
        "servers": backends.iter().map(server_json).collect::<Vec<_>>(),
        "summary": {
            "total_servers": backends.len(),
            "healthy_servers": backends.iter().filter(|b| b.healthy).count(),
            "total_in_flight": in_flight,
            "total_capacity": capacity,
            "available": available,
            "utilization_percent": percent(in_flight, capacity),
            "queue_length": queue_len,
            "max_queue_size": config.settings.max_queue_size,
            "routing": config.settings.routing.name(),
            "sessions": shared.sessions.len(),
        },
    });
    (200, doc)
}
