//! Stored responses: vLLM keeps each response of its Responses API in the memory of the
//! server that made it, so `GET`/`DELETE /v1/responses/{id}`, `POST
//! /v1/responses/{id}/cancel` and a create continuing one (`previous_response_id`)
//! must reach that server. The router remembers which backend made each id it saw
//! go by (`Responses`), from a created reply (the JSON's top-level `id`) or a stream
//! (its `response.created` event), scanning the bytes as they are relayed
//! (`IdScanner`), without holding the reply.
//!
//! The map is bounded: at most `stored_responses_max` ids, each for
//! `stored_responses_ttl`, the oldest forgotten first. It is keyed by backend id, so
//! it survives a reload for the backends that stay (a removed backend's ids are
//! dropped when they are next looked up). An id the router does not know (made before
//! a restart, forgotten, or made by another replica) is asked of the healthy
//! backends in turn (`request::relay`), and 404 only when none knows it.
//!
//! Written by workers: `learn` after a create, `forget` after a delete; read by workers.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::backend::registry::BackendId;

/// Which backend made which response id.
#[derive(Default)]
pub struct Responses {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    by_id: HashMap<String, (BackendId, Instant)>,
    /// Ids in the order they were learnt, for forgetting the oldest; an id learnt again
    /// has a stale entry here, skipped when it comes up.
    order: VecDeque<(String, Instant)>,
}

/// Ids longer than this are not remembered (vLLM's are about 40 bytes).
const MAX_ID_BYTES: usize = 256;

impl Responses {
    /// Remembers that `backend` made response `id`, within `max` ids and `ttl`.
    pub fn learn(&self, id: &str, backend: BackendId, max: usize, ttl: Duration) {
        if max == 0 || id.is_empty() || id.len() > MAX_ID_BYTES {
            return;
        }
        let now = Instant::now();
        let mut inner = self.inner.lock();
        let keep = if inner.by_id.contains_key(id) {
            max
        } else {
            max - 1
        };
        inner.expire(now, ttl, keep);
        inner.by_id.insert(id.to_owned(), (backend, now));
        inner.order.push_back((id.to_owned(), now));
        if inner.order.len() > 2 * max + 16 {
            // Ids learnt again, or forgotten, left entries behind a current one.
            let Inner { by_id, order } = &mut *inner;
            order.retain(|(id, at)| by_id.get(id).is_some_and(|(_, t)| t == at));
        }
    }

    /// The backend that made `id`, if it is remembered and younger than `ttl`.
    pub fn backend_of(&self, id: &str, ttl: Duration) -> Option<BackendId> {
        let mut inner = self.inner.lock();
        let (backend, at) = *inner.by_id.get(id)?;
        if at.elapsed() > ttl {
            inner.by_id.remove(id);
            return None;
        }
        Some(backend)
    }

    /// Forgets `id` (deleted, or its backend is gone).
    pub fn forget(&self, id: &str) {
        self.inner.lock().by_id.remove(id);
    }

    /// How many ids are remembered.
    pub fn len(&self) -> usize {
        self.inner.lock().by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Inner {
    /// Drops ids older than `ttl`, then the oldest until at most `keep` remain.
    fn expire(&mut self, now: Instant, ttl: Duration, keep: usize) {
        while let Some((id, at)) = self.order.front() {
            let current = self.by_id.get(id).is_some_and(|(_, t)| t == at);
            if !current {
                self.order.pop_front();
                continue;
            }
            if now.duration_since(*at) <= ttl && self.by_id.len() <= keep {
                break;
            }
            self.by_id.remove(id);
            self.order.pop_front();
        }
    }
}

/// What a request has to do with a stored response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Use {
    /// It creates one (`POST /v1/responses`): its reply's id is learnt.
    Create,
    /// It reads, deletes, cancels or continues response `id`: it goes where `id` lives.
    Of { id: String, delete: bool },
}

/// What `method` on `path` (with `previous_response_id`, from a create's body) does
/// with a stored response, if anything.
pub fn use_of(method: &str, path: &str, previous: Option<String>) -> Option<Use> {
    let path = path.strip_suffix('/').unwrap_or(path);
    if path == "/v1/responses" {
        return match (method, previous) {
            ("POST", Some(id)) => Some(Use::Of { id, delete: false }),
            ("POST", None) => Some(Use::Create),
            _ => None,
        };
    }
    let rest = path.strip_prefix("/v1/responses/")?;
    let (id, tail) = rest.split_once('/').unwrap_or((rest, ""));
    if id.is_empty() {
        return None;
    }
    let known = matches!(
        (method, tail),
        ("GET" | "HEAD" | "DELETE", "") | ("POST", "cancel") | ("GET" | "HEAD", "input_items")
    );
    known.then(|| Use::Of {
        id: id.to_owned(),
        delete: method == "DELETE",
    })
}

/// The `previous_response_id` a create's JSON body names, if any.
pub fn previous_id(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Probe {
        previous_response_id: Option<String>,
    }
    serde_json::from_slice::<Probe>(body)
        .ok()?
        .previous_response_id
        .filter(|id| !id.is_empty())
}

/// Finds a created response's id in its reply as the bytes go by: the top-level
/// `"id"` of a JSON reply, or `response.id` of a stream's `response.created` event.
/// Holds at most one SSE line (`MAX_LINE`) or a few bytes of a JSON token.
pub struct IdScanner {
    kind: Kind,
    found: Option<String>,
}

enum Kind {
    Json(JsonTop),
    Sse { line: Vec<u8>, overflow: bool },
}

/// The longest SSE line looked at; a `response.created` event carries the request's
/// settings (instructions, tools), rarely more than a few KiB.
const MAX_LINE: usize = 1024 * 1024;

impl IdScanner {
    pub fn new(stream: bool) -> IdScanner {
        let kind = if stream {
            Kind::Sse {
                line: Vec::new(),
                overflow: false,
            }
        } else {
            Kind::Json(JsonTop::default())
        };
        IdScanner { kind, found: None }
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        if self.found.is_some() {
            return;
        }
        match &mut self.kind {
            Kind::Json(top) => self.found = top.feed(bytes),
            Kind::Sse { line, overflow } => {
                for piece in bytes.split_inclusive(|&b| b == b'\n') {
                    let ends = piece.ends_with(b"\n");
                    if !*overflow {
                        if line.len() + piece.len() > MAX_LINE {
                            *overflow = true;
                            line.clear();
                        } else {
                            line.extend_from_slice(piece);
                        }
                    }
                    if ends {
                        if !*overflow {
                            if let Some(id) = created_event_id(line) {
                                self.found = Some(id);
                                return;
                            }
                        }
                        line.clear();
                        *overflow = false;
                    }
                }
            }
        }
    }

    pub fn id(&self) -> Option<&str> {
        self.found.as_deref()
    }
}

/// `response.id` of a `data:` line carrying a `response.created` event.
fn created_event_id(line: &[u8]) -> Option<String> {
    let data = line.strip_prefix(b"data:")?.trim_ascii();
    #[derive(serde::Deserialize)]
    struct Event {
        #[serde(rename = "type")]
        kind: Option<String>,
        response: Option<Created>,
    }
    #[derive(serde::Deserialize)]
    struct Created {
        id: Option<String>,
    }
    let event: Event = serde_json::from_slice(data).ok()?;
    if event.kind.as_deref() != Some("response.created") {
        return None;
    }
    event.response?.id
}

/// A minimal streaming JSON reader that finds the string value of the key `"id"` at
/// the top level of an object. It follows nesting and strings only; anything it cannot
/// follow simply finds nothing.
#[derive(Default)]
struct JsonTop {
    depth: u32,
    in_string: bool,
    escaped: bool,
    /// The current string's bytes, while it may be the key or the value wanted (kept
    /// only at depth 1, and only up to `MAX_ID_BYTES`).
    text: Vec<u8>,
    long: bool,
    /// The last top-level string read was the key `id`, and `:` may follow.
    after_key: bool,
    /// `"id":` was read at the top level: the next string is its value.
    want_value: bool,
}

impl JsonTop {
    fn feed(&mut self, bytes: &[u8]) -> Option<String> {
        for &b in bytes {
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                    self.push(b);
                } else if b == b'\\' {
                    self.escaped = true;
                    self.long = true; // an escaped id is not one vLLM makes
                } else if b == b'"' {
                    self.in_string = false;
                    if self.depth == 1 {
                        if self.want_value {
                            self.want_value = false;
                            if !self.long {
                                return String::from_utf8(std::mem::take(&mut self.text)).ok();
                            }
                        } else {
                            self.after_key = !self.long && self.text == b"id";
                        }
                    }
                } else {
                    self.push(b);
                }
                continue;
            }
            match b {
                b'"' => {
                    self.in_string = true;
                    self.text.clear();
                    self.long = false;
                }
                b'{' | b'[' => {
                    self.depth += 1;
                    self.after_key = false;
                    self.want_value = false;
                }
                b'}' | b']' => {
                    self.depth = self.depth.saturating_sub(1);
                    self.after_key = false;
                }
                b':' if self.depth == 1 && self.after_key => {
                    self.after_key = false;
                    self.want_value = true;
                }
                b if b.is_ascii_whitespace() => {}
                _ => {
                    // A value that is not a string (`"id": 5`), or a comma.
                    self.after_key = false;
                    if self.depth == 1 {
                        self.want_value = false;
                    }
                }
            }
        }
        None
    }

    fn push(&mut self, b: u8) {
        if self.depth == 1 && !self.long {
            if self.text.len() >= MAX_ID_BYTES {
                self.long = true;
                self.text.clear();
            } else {
                self.text.push(b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(stream: bool, pieces: &[&str]) -> Option<String> {
        let mut s = IdScanner::new(stream);
        for p in pieces {
            s.feed(p.as_bytes());
        }
        s.id().map(str::to_owned)
    }

    #[test]
    fn a_json_reply_gives_its_top_level_id_across_reads() {
        let body = r#"{"object":"response","output":[{"id":"msg_1","content":[{"text":"\"id\": \"no\""}]}],"id":"resp_abc","x":{"id":"deep"}}"#;
        assert_eq!(scan(false, &[body]).as_deref(), Some("resp_abc"));
        let pieces: Vec<String> = body.chars().map(String::from).collect();
        let refs: Vec<&str> = pieces.iter().map(String::as_str).collect();
        assert_eq!(scan(false, &refs).as_deref(), Some("resp_abc"));
        assert_eq!(scan(false, &[r#"{"id": 5, "name": "resp_x"}"#]), None);
        assert_eq!(scan(false, &[r#"{"ids": "a", "b": "id", "c": "d"}"#]), None);
        assert_eq!(
            scan(false, &[r#"{ "id" : "resp_1" }"#]).as_deref(),
            Some("resp_1")
        );
    }

    #[test]
    fn a_stream_gives_the_id_of_its_created_event() {
        let stream = [
            "event: response.created\n",
            "data: {\"type\":\"response.created\",\"sequence_number\":0,\"resp",
            "onse\":{\"id\":\"resp_s1\",\"status\":\"in_progress\"}}\n\n",
            "data: {\"type\":\"response.created\",\"response\":{\"id\":\"later\"}}\n",
        ];
        assert_eq!(scan(true, &stream).as_deref(), Some("resp_s1"));
        let other = "data: {\"type\":\"response.output_text.delta\",\"response\":{\"id\":\"x\"}}\n";
        assert_eq!(scan(true, &[other]), None);
    }

    #[test]
    fn stored_routes_are_recognised() {
        let of = |id: &str, delete| {
            Some(Use::Of {
                id: id.into(),
                delete,
            })
        };
        assert_eq!(
            use_of("GET", "/v1/responses/resp_1", None),
            of("resp_1", false)
        );
        assert_eq!(
            use_of("DELETE", "/v1/responses/resp_1", None),
            of("resp_1", true)
        );
        assert_eq!(
            use_of("POST", "/v1/responses/resp_1/cancel", None),
            of("resp_1", false)
        );
        assert_eq!(use_of("POST", "/v1/responses", None), Some(Use::Create));
        assert_eq!(
            use_of("POST", "/v1/responses", Some("r".into())),
            of("r", false)
        );
        assert_eq!(use_of("POST", "/v1/responses/resp_1", None), None);
        assert_eq!(use_of("GET", "/v1/responses", None), None);
        assert_eq!(use_of("GET", "/v1/responses/", None), None);
        assert_eq!(
            previous_id(br#"{"previous_response_id":"resp_9"}"#).as_deref(),
            Some("resp_9")
        );
        assert_eq!(previous_id(br#"{"previous_response_id":null}"#), None);
    }

    #[test]
    fn the_map_is_bounded_in_size_and_age() {
        let map = Responses::default();
        let hour = Duration::from_secs(3600);
        for i in 0..5 {
            map.learn(&format!("r{i}"), i, 3, hour);
        }
        assert_eq!(map.len(), 3);
        assert_eq!(map.backend_of("r0", hour), None, "the oldest went first");
        assert_eq!(map.backend_of("r4", hour), Some(4));
        map.learn("r4", 7, 3, hour);
        assert_eq!(map.backend_of("r4", hour), Some(7), "learnt again");
        assert_eq!(map.len(), 3);
        assert_eq!(map.backend_of("r3", Duration::ZERO), None, "expired");
        map.forget("r4");
        assert_eq!(map.backend_of("r4", hour), None);
        map.learn("x", 1, 0, hour);
        assert_eq!(map.backend_of("x", hour), None, "max 0 keeps nothing");
    }
}
