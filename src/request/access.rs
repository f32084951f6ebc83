//! The access log: one entry per proxied request, written once when the request ends
//! (whatever way it ends), and the request id that ties the entry to the client's and
//! the backend's view of the same request.
//!
//! Entries go to the `access` log target at info level, with every figure as a
//! structured field (see `control::logging`). They carry the path without its query string, and
//! never a header or a body: an API key or a prompt cannot reach the log through them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::request::generation::Summary;
use crate::request::trace::Trace;

/// The header that carries the request id, in both directions.
pub const REQUEST_ID_HEADER: &str = "X-Request-Id";

/// What is known about a request so far; logged once, by `finish`.
pub struct Access {
    pub request_id: String,
    pub method: String,
    /// The path, without the query string (which may hold credentials).
    pub path: String,
    pub model: Option<String>,
    pub backend: Option<String>,
    pub status: u16,
    pub retries: u32,
    pub queue_wait: Duration,
    /// When the first byte of the reply went to the client.
    pub first_byte: Option<Instant>,
    pub bytes_out: u64,
    pub stream: bool,
    /// `complete`, `client_gone`, `backend_broke`, or the router's error code.
    pub outcome: &'static str,
    /// Why the router answered without a backend, when it did (a metrics label).
    pub rejected: Option<&'static str>,
    /// How cache-aware routing chose the backend, when it did.
    pub route: Option<Routed>,
    /// The request's W3C trace (`request::trace`), once its head was read.
    pub trace: Option<Trace>,
    /// What the backend's reply said about its generation, once relayed.
    pub generation: Option<Summary>,
    started: Instant,
}

/// How cache-aware routing chose a request's backend.
#[derive(Debug, Clone, Copy)]
pub struct Routed {
    /// `prefix`, `session` or `load` (`request::pick::Reason`).
    pub reason: &'static str,
    /// The request's leading prompt blocks that backend held.
    pub matched_blocks: u32,
    /// The request's prompt blocks in all.
    pub prompt_blocks: usize,
}

impl Access {
    pub fn start(method: &str, target: &str, client_request_id: Option<&str>) -> Access {
        Access {
            request_id: client_request_id
                .filter(|id| valid_request_id(id))
                .map_or_else(new_request_id, str::to_owned),
            method: method.to_owned(),
            path: target.split('?').next().unwrap_or("").to_owned(),
            model: None,
            backend: None,
            status: 0,
            retries: 0,
            queue_wait: Duration::ZERO,
            first_byte: None,
            bytes_out: 0,
            stream: false,
            outcome: "complete",
            rejected: None,
            route: None,
            trace: None,
            generation: None,
            started: Instant::now(),
        }
    }

    /// When the request arrived.
    pub fn started(&self) -> Instant {
        self.started
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn time_to_first_byte(&self) -> Option<Duration> {
        self.first_byte.map(|t| t.duration_since(self.started))
    }

    /// Puts this request's id on a list of headers (towards the backend, or the
    /// client), replacing any the list had: the one place the header is set.
    pub fn tag(&self, headers: &mut Vec<(String, String)>) {
        headers.retain(|(name, _)| !name.eq_ignore_ascii_case(REQUEST_ID_HEADER));
        headers.push((REQUEST_ID_HEADER.to_owned(), self.request_id.clone()));
    }

    /// Writes the entry.
    pub fn finish(self) {
        let ms = |d: Duration| (d.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0;
        let duration = ms(self.started.elapsed());
        let ttfb = self.time_to_first_byte().map(ms);
        // The message is short: the human log appends every field as key=value, and
        // the structured log carries them as JSON fields.
        let model = self.model.as_deref().unwrap_or("-");
        let backend = self.backend.as_deref().unwrap_or("-");
        let route = self.route.map_or("-", |r| r.reason);
        let matched_blocks = self.route.map_or(-1, |r| i64::from(r.matched_blocks));
        let prompt_blocks = self.route.map_or(-1, |r| r.prompt_blocks as i64);
        let trace_id = self.trace.as_ref().map_or("-", |t| t.trace_id.as_str());
        let generation = self.generation.as_ref();
        let ttft = generation.and_then(Summary::ttft).map_or(-1.0, ms);
        let tokens = |n: Option<u64>| n.map_or(-1, |n| n as i64);
        let prompt_tokens = tokens(generation.and_then(|g| g.usage).map(|u| u.prompt_tokens));
        let completion_tokens = tokens(
            generation
                .and_then(Summary::completion_tokens)
                .map(|(n, _)| n),
        );
        log::info!(
            target: crate::control::logging::ACCESS_TARGET,
            request_id = self.request_id.as_str(),
            trace_id = trace_id,
            method = self.method.as_str(),
            path = self.path.as_str(),
            model = model,
            backend = backend,
            status = self.status,
            retries = self.retries,
            queue_wait_ms = ms(self.queue_wait),
            ttfb_ms = ttfb.unwrap_or(-1.0),
            ttft_ms = ttft,
            duration_ms = duration,
            prompt_tokens = prompt_tokens,
            completion_tokens = completion_tokens,
            bytes_out = self.bytes_out,
            stream = self.stream,
            outcome = self.outcome,
            route = route,
            matched_blocks = matched_blocks,
            prompt_blocks = prompt_blocks;
            "{} {} {}",
            self.method,
            self.path,
            self.status
        );
    }
}

/// A client's request id is reused when it is short and plain; anything else could
/// carry junk into logs and backend headers, so a new one is made instead.
fn valid_request_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

/// A new id, unique in this process and unlikely to repeat across restarts.
fn new_request_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    static PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let pid = *PID.get_or_init(std::process::id);
    format!("{epoch:x}-{pid:x}-{n:x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_id_replaces_any_other() {
        let access = Access::start("GET", "/x", Some("id-1"));
        let mut headers = vec![
            ("x-request-id".to_owned(), "forged".to_owned()),
            ("Accept".to_owned(), "*/*".to_owned()),
        ];
        access.tag(&mut headers);
        assert_eq!(
            headers,
            [
                ("Accept".to_owned(), "*/*".to_owned()),
                (REQUEST_ID_HEADER.to_owned(), "id-1".to_owned()),
            ]
        );
    }

    #[test]
    fn request_ids_are_reused_only_when_plain() {
        assert_eq!(
            Access::start("GET", "/x", Some("abc-123_x.y:z")).request_id,
            "abc-123_x.y:z"
        );
        for bad in ["", "has space", "new\nline", &"x".repeat(129)] {
            let id = Access::start("GET", "/x", Some(bad)).request_id;
            assert_ne!(id, bad);
            assert!(valid_request_id(&id), "{id}");
        }
        assert_ne!(new_request_id(), new_request_id());
    }

    #[test]
    fn the_query_string_stays_out_of_the_path() {
        assert_eq!(
            Access::start("POST", "/v1/x?api_key=secret", None).path,
            "/v1/x"
        );
    }
}
