//! Which headers cross the proxy, in each direction, and reading the client's headers
//! out of tiny_http.
//!
//! Hop-by-hop headers (RFC 9110 section 7.6.1) describe one connection, not the
//! message, so they are never forwarded; neither is any header the client names in
//! `Connection`. Framing headers (`Content-Length`, `Transfer-Encoding`) are set by the
//! side that writes the bytes: ureq towards the backend, `wire` towards the client.

use tiny_http::{Header, Headers};

/// The most headers a request may carry (nginx-like; vLLM clients send about a dozen).
pub const MAX_HEADERS: usize = 100;
/// The most bytes all header names and values of a request may take together.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// The longest request target (path and query).
pub const MAX_TARGET_BYTES: usize = 16 * 1024;

/// Methods the router relays; anything else is answered 501.
const RELAYED_METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"];

/// Whether the router relays `method`.
pub fn relayed_method(method: &str) -> bool {
    RELAYED_METHODS.contains(&method)
}

/// Whether a request head is within `MAX_HEADERS` and `MAX_HEADER_BYTES`.
pub fn head_within_caps(client: &[(String, String)]) -> bool {
    let bytes: usize = client.iter().map(|(n, v)| n.len() + v.len() + 4).sum();
    client.len() <= MAX_HEADERS && bytes <= MAX_HEADER_BYTES
}

/// Headers that belong to one connection and are never forwarded.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Headers the router sets itself towards the backend: ureq writes `Host` from the
/// backend URL and the framing from the body it sends; tiny_http already answered
/// `Expect: 100-continue`.
const SET_BY_ROUTER_UPSTREAM: &[&str] = &["host", "content-length", "expect"];

/// The client's headers as (name, value) pairs, in the order received.
pub fn client_headers(headers: &Headers) -> Vec<(String, String)> {
    header_list(headers)
        .iter()
        .map(|h| {
            (
                h.field.as_str().as_str().to_owned(),
                h.value.as_str().to_owned(),
            )
        })
        .collect()
}

/// tiny_http_fork 0.12.17 offers no way to list a request's headers (only `get` by
/// name), and a proxy must forward all of them.
fn header_list(headers: &Headers) -> &[Header] {
    // SAFETY: `Headers` is declared `#[repr(transparent)] pub struct Headers(Vec<Header>)`
    // in tiny_http_fork 0.12.17, which Cargo.toml pins exactly (`=0.12.17`), so a
    // `&Headers` has the layout of a `&Vec<Header>`. `header_list_sees_every_header`
    // below checks this against the pinned crate.
    #[allow(unsafe_code)]
    let list = unsafe { &*(headers as *const Headers).cast::<Vec<Header>>() };
    list
}

/// The lowercase header names listed in `Connection` values: these are hop-by-hop too.
fn connection_tokens(headers: &[(String, String)]) -> Vec<String> {
    headers
        .iter()
        .filter(|(name, _)| name.eq_ignore_ascii_case("connection"))
        .flat_map(|(_, value)| value.split(','))
        .map(|token| token.trim().to_ascii_lowercase())
        .filter(|token| !token.is_empty())
        .collect()
}

fn is_hop_by_hop(name: &str, listed: &[String]) -> bool {
    HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
        || listed.iter().any(|t| name.eq_ignore_ascii_case(t))
}

/// The client's headers that go on to the backend.
pub fn upstream_headers(client: &[(String, String)]) -> Vec<(String, String)> {
    let listed = connection_tokens(client);
    client
        .iter()
        .filter(|(name, _)| {
            !is_hop_by_hop(name, &listed)
                && !SET_BY_ROUTER_UPSTREAM
                    .iter()
                    .any(|h| name.eq_ignore_ascii_case(h))
        })
        .cloned()
        .collect()
}

/// The backend's headers that go on to the client, without framing (`wire` writes its
/// own `Content-Length` or `Transfer-Encoding`).
pub fn downstream_headers(backend: &[(String, String)]) -> Vec<(String, String)> {
    let listed = connection_tokens(backend);
    backend
        .iter()
        .filter(|(name, _)| {
            !is_hop_by_hop(name, &listed) && !name.eq_ignore_ascii_case("content-length")
        })
        .cloned()
        .collect()
}

/// The value of the first header called `name`, compared without case.
pub fn find<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Checks the request's framing headers before the body is read, so that a body the
/// router and the backend could read differently never gets through (request
/// smuggling). Returns the declared length, if any.
pub fn declared_length(client: &[(String, String)]) -> Result<Option<u64>, String> {
    let mut length: Option<u64> = None;
    for (_, value) in client
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("content-length"))
    {
        // A list ("5, 5") or anything but digits is refused, as nginx does.
        if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("invalid Content-Length {value:?}"));
        }
        let parsed: u64 = value
            .parse()
            .map_err(|_| format!("Content-Length {value:?} is too large"))?;
        match length {
            Some(seen) if seen != parsed => {
                return Err("several different Content-Length headers".into())
            }
            _ => length = Some(parsed),
        }
    }
    let encodings: Vec<&str> = client
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("transfer-encoding"))
        .map(|(_, v)| v.trim())
        .collect();
    if !encodings.is_empty() {
        if length.is_some() {
            return Err("both Content-Length and Transfer-Encoding".into());
        }
        if encodings.len() != 1 || !encodings[0].eq_ignore_ascii_case("chunked") {
            return Err(format!(
                "unsupported Transfer-Encoding {:?}; only chunked is accepted",
                encodings.join(", ")
            ));
        }
    }
    Ok(length)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn header_list_sees_every_header() {
        let mut headers = Headers::new();
        headers.insert_kv("X-One", "1").expect("header");
        headers.insert_kv("x-two", "two words").expect("header");
        headers.insert_kv("X-One", "again").expect("header");
        assert_eq!(
            client_headers(&headers),
            pairs(&[("X-One", "1"), ("x-two", "two words"), ("X-One", "again")])
        );
    }

    #[test]
    fn hop_by_hop_and_connection_listed_headers_stay_behind() {
        let client = pairs(&[
            ("Host", "router:8888"),
            ("Connection", "keep-alive, X-Secret-Hop"),
            ("X-Secret-Hop", "1"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("Content-Length", "5"),
            ("Authorization", "Bearer k"),
            ("X-Custom", "a"),
            ("X-Custom", "b"),
        ]);
        assert_eq!(
            upstream_headers(&client),
            pairs(&[
                ("Authorization", "Bearer k"),
                ("X-Custom", "a"),
                ("X-Custom", "b")
            ])
        );
        let backend = pairs(&[
            ("content-type", "text/event-stream"),
            ("transfer-encoding", "chunked"),
            ("content-length", "10"),
            ("x-request-id", "r1"),
        ]);
        assert_eq!(
            downstream_headers(&backend),
            pairs(&[
                ("content-type", "text/event-stream"),
                ("x-request-id", "r1")
            ])
        );
    }

    #[test]
    fn framing_headers_are_checked() {
        let check = |list: &[(&str, &str)]| declared_length(&pairs(list));
        assert_eq!(check(&[]), Ok(None));
        assert_eq!(check(&[("Content-Length", "12")]), Ok(Some(12)));
        assert_eq!(
            check(&[("Content-Length", "12"), ("content-length", "12")]),
            Ok(Some(12))
        );
        assert_eq!(check(&[("Transfer-Encoding", "chunked")]), Ok(None));
        assert!(check(&[("Content-Length", "12"), ("Content-Length", "13")]).is_err());
        assert!(check(&[("Content-Length", "-1")]).is_err());
        assert!(check(&[("Content-Length", "1, 1")]).is_err());
        assert!(check(&[("Content-Length", "abc")]).is_err());
        assert!(check(&[("Content-Length", "999999999999999999999999")]).is_err());
        assert!(check(&[("Content-Length", "3"), ("Transfer-Encoding", "chunked")]).is_err());
        assert!(check(&[("Transfer-Encoding", "gzip, chunked")]).is_err());
        assert_eq!(
            check(&[("Content-Length", "99999999999999")]),
            Ok(Some(99_999_999_999_999))
        );
    }
}
