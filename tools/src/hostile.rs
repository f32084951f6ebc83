//! The one catalogue of hostile inputs: requests the router must refuse (with the
//! status and error code each must get) or clients that leave early, as raw bytes.
//! The soak cycles through it under load; a test can go through it once.

use std::fmt::Write as _;

use crate::http::raw;

pub const CHAT: &str = "/v1/chat/completions";

/// A small valid chat body.
pub const SMALL_CHAT: &str =
    r#"{"model":"mock-model","messages":[{"role":"user","content":"hi"}],"max_tokens":2}"#;

/// What a hostile request must get.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// This status, and this error `code` in an OpenAI-style body when given. It never
    /// reaches a backend.
    Status(u16, Option<&'static str>),
    /// A stream that starts (200 and a first event); the client then leaves.
    StreamStarts,
    /// Nothing: the client leaves before any reply.
    Nothing,
}

impl Expect {
    /// The expected answer, for a report.
    pub fn describe(&self) -> String {
        match self {
            Expect::Status(status, _) => status.to_string(),
            Expect::StreamStarts => "200, then leave".into(),
            Expect::Nothing => "no reply".into(),
        }
    }
}

/// One hostile input.
pub struct Hostile {
    pub name: &'static str,
    pub expect: Expect,
    /// The bytes to send; for `Nothing`, the client closes right after.
    pub request: Vec<u8>,
}

/// The router the catalogue is aimed at.
pub struct Target<'a> {
    /// The client API key it requires, if any: sent with every request but the ones
    /// about keys, so that only the hostile part is refused.
    pub key: Option<&'a str>,
    /// Its `max_body_bytes`.
    pub max_body: usize,
    /// A header line (ending in CRLF) added to every request that must be refused,
    /// to tell it from any other at a backend; empty for none.
    pub marker: &'a str,
}

impl Target<'_> {
    fn auth(&self) -> String {
        self.key
            .map(|k| format!("Authorization: Bearer {k}\r\n"))
            .unwrap_or_default()
    }

    /// The key, the marker and `Connection: close`, before `extra`.
    fn refused(&self, extra: &str) -> String {
        format!("{}{}Connection: close\r\n{extra}", self.auth(), self.marker)
    }

    /// A chat POST to be refused, with the given extra header lines.
    fn chat(&self, extra: &str, body: &[u8]) -> Vec<u8> {
        raw("POST", CHAT, &self.refused(extra), body)
    }

    /// A chat POST of a JSON `body` with its length, to be refused.
    fn json(&self, body: &str) -> Vec<u8> {
        self.chat(&json_headers(body.len()), body.as_bytes())
    }

    /// A POST to a route that takes any body, so that only the framing stands between
    /// the request and the backend.
    fn framed(&self, extra: &str, body: &[u8]) -> Vec<u8> {
        raw("POST", "/v1/other", &self.refused(extra), body)
    }
}

fn json_headers(len: usize) -> String {
    format!("Content-Type: application/json\r\nContent-Length: {len}\r\n")
}

/// The `n` header lines `X-Pad-i: <value>`.
pub fn pad_headers(n: usize, value: &str) -> String {
    (0..n).map(|i| format!("X-Pad-{i}: {value}\r\n")).collect()
}

/// `body` in chunks of `chunk` bytes, then the terminating chunk.
pub fn chunked(body: &[u8], chunk: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for piece in body.chunks(chunk.max(1)) {
        out.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        out.extend_from_slice(piece);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// A JSON POST to `target` with its length, the key when given, and
/// `Connection: close` when asked.
pub fn json_post(target: &str, body: &str, key: Option<&str>, close: bool) -> Vec<u8> {
    let mut extra = json_headers(body.len());
    if let Some(key) = key {
        let _ = write!(extra, "Authorization: Bearer {key}\r\n");
    }
    if close {
        extra.push_str("Connection: close\r\n");
    }
    raw("POST", target, &extra, body.as_bytes())
}

/// Every hostile input the router refuses (docs/security.md), aimed at `t`. With no
/// key in `t`, the two key cases are left out.
pub fn catalogue(t: &Target) -> Vec<Hostile> {
    use Expect::{Nothing, Status, StreamStarts};
    let small = SMALL_CHAT.as_bytes();
    let small_json = json_headers(SMALL_CHAT.len());
    let too_large = Status(413, Some("request_too_large"));
    let bad = Status(400, Some("bad_request"));
    let not_implemented = Status(501, Some("method_not_implemented"));
    // One field over the cap of 100: Host, Connection, Content-Type, Content-Length, the
    // key and the marker are fields too.
    let fields = 4 + usize::from(t.key.is_some()) + t.marker.matches("\r\n").count();
    let case = |name, expect, request| Hostile {
        name,
        expect,
        request,
    };
    let mut all = vec![
        case("body over max_body_bytes", too_large, {
            let body = vec![b' '; t.max_body + 1];
            t.chat(&json_headers(body.len()), &body)
        }),
        case(
            "chunked body over max_body_bytes",
            too_large,
            t.chat(
                "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n",
                &chunked(&vec![b' '; t.max_body + 16 * 1024], 16 * 1024),
            ),
        ),
        case(
            "Content-Length: 99999999999999",
            too_large,
            t.chat(
                "Content-Type: application/json\r\nContent-Length: 99999999999999\r\n",
                b"{\"model\":",
            ),
        ),
        case(
            "Content-Length: abc",
            bad,
            t.framed("Content-Length: abc\r\n", b""),
        ),
        case(
            "Content-Length: -1",
            bad,
            t.framed("Content-Length: -1\r\n", b""),
        ),
        case(
            "two Content-Lengths",
            bad,
            t.framed("Content-Length: 2\r\nContent-Length: 3\r\n", b"{} "),
        ),
        case(
            "Content-Length + Transfer-Encoding",
            Status(400, None),
            t.framed(
                "Content-Length: 12\r\nTransfer-Encoding: chunked\r\n",
                b"2\r\n{}\r\n0\r\n\r\n",
            ),
        ),
        case(
            "Transfer-Encoding: gzip, chunked",
            bad,
            t.framed(
                "Transfer-Encoding: gzip, chunked\r\n",
                b"2\r\n{}\r\n0\r\n\r\n",
            ),
        ),
        case(
            "101 header fields",
            Status(431, Some("headers_too_large")),
            t.chat(
                &format!("{small_json}{}", pad_headers(101 - fields, "v")),
                small,
            ),
        ),
        case(
            "70 KiB of headers",
            Status(431, Some("headers_too_large")),
            t.chat(
                &format!("{small_json}{}", pad_headers(5, &"v".repeat(14 * 1024))),
                small,
            ),
        ),
        case("20 KiB target", Status(414, Some("uri_too_long")), {
            let target = format!("{CHAT}?pad={}", "a".repeat(20 * 1024));
            raw("POST", &target, &t.refused(&small_json), small)
        }),
        case(
            "TRACE",
            not_implemented,
            raw("TRACE", CHAT, &t.refused(""), b""),
        ),
        case(
            "CONNECT",
            not_implemented,
            raw("CONNECT", "127.0.0.1:443", &t.refused(""), b""),
        ),
        case(
            "BREW",
            not_implemented,
            raw("BREW", CHAT, &t.refused(""), b""),
        ),
        case("body not JSON", bad, t.json("not json")),
        case("empty JSON body", bad, t.json("")),
        case("JSON array body", bad, t.json("[1,2]")),
        case("{\"model\":5}", bad, t.json(r#"{"model":5}"#)),
        case(
            "non-ASCII header value",
            Status(400, None),
            t.chat(&format!("X-Note: caf\u{e9}\r\n{small_json}"), small),
        ),
        case(
            "bare CR in a header",
            Status(400, None),
            t.chat(&format!("X-Note: a\rb\r\n{small_json}"), small),
        ),
    ];
    if t.key.is_some() {
        let key_refused = Status(401, Some("invalid_api_key"));
        let with_key = |key: Option<&str>| {
            let mut extra = format!("{}Connection: close\r\n{small_json}", t.marker);
            if let Some(key) = key {
                let _ = write!(extra, "Authorization: Bearer {key}\r\n");
            }
            raw("POST", CHAT, &extra, small)
        };
        all.push(case("no API key", key_refused, with_key(None)));
        all.push(case(
            "wrong API key",
            key_refused,
            with_key(Some("soak-wrong-key")),
        ));
    }
    let stream = |tokens: u32| {
        let body = format!(
            r#"{{"model":"mock-model","messages":[{{"role":"user","content":"hi"}}],"max_tokens":{tokens},"stream":true}}"#
        );
        json_post(CHAT, &body, t.key, true)
    };
    all.push(case("leaves mid-stream", StreamStarts, stream(2000)));
    all.push(case("leaves before the reply", Nothing, stream(50)));
    all.push(case(
        "half a head, then close",
        Nothing,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty".to_vec(),
    ));
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refused_case_carries_the_marker_and_the_others_do_not() {
        let t = Target {
            key: Some("k"),
            max_body: 1024,
            marker: "X-Marker: 1\r\n",
        };
        let all = catalogue(&t);
        assert_eq!(all.len(), 25);
        for h in &all {
            let marked = String::from_utf8_lossy(&h.request).contains("X-Marker: 1\r\n");
            let refused = matches!(h.expect, Expect::Status(..));
            assert_eq!(marked, refused, "{}", h.name);
        }
        let keyless = catalogue(&Target {
            key: None,
            max_body: 1024,
            marker: "",
        });
        assert_eq!(keyless.len(), 23);
    }
}
