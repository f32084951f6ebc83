//! Which headers cross the proxy, in each direction.
//!
//! Hop-by-hop headers (RFC 9110 section 7.6.1) describe one connection, not the
//! message, so they are never forwarded; neither is any header the client names in
//! `Connection`. Framing headers (`Content-Length`, `Transfer-Encoding`) are set by the
//! side that writes the bytes: ureq towards the backend, `client::reply` towards the client.

use std::net::IpAddr;

use crate::client::head::connection_tokens;

/// Methods the router relays; anything else is answered 501.
const RELAYED_METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"];

/// Whether the router relays `method`.
pub fn relayed_method(method: &str) -> bool {
    RELAYED_METHODS.contains(&method)
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
/// backend URL and the framing from the body it sends; the router has already answered
/// `Expect: 100-continue`; it writes `X-Forwarded-Proto` from its own listener.
const SET_BY_ROUTER_UPSTREAM: &[&str] = &["host", "content-length", "expect", "x-forwarded-proto"];

fn is_hop_by_hop(name: &str, listed: &[String]) -> bool {
    HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
        || listed.iter().any(|t| name.eq_ignore_ascii_case(t))
}

/// The client's headers that go on to the backend, with the client's address
/// appended to `X-Forwarded-For` (one list, as nginx's `$proxy_add_x_forwarded_for`)
/// and `X-Forwarded-Proto` saying how the client reached the router.
pub fn upstream_headers(
    client: &[(String, String)],
    peer: IpAddr,
    secure: bool,
) -> Vec<(String, String)> {
    let listed = connection_tokens(client);
    let mut forwarded_for: Vec<&str> = Vec::new();
    let mut out: Vec<(String, String)> = Vec::with_capacity(client.len() + 2);
    for (name, value) in client {
        if is_hop_by_hop(name, &listed)
            || SET_BY_ROUTER_UPSTREAM
                .iter()
                .any(|h| name.eq_ignore_ascii_case(h))
        {
            continue;
        }
        if name.eq_ignore_ascii_case("x-forwarded-for") {
            forwarded_for.push(value);
            continue;
        }
        out.push((name.clone(), value.clone()));
    }
    let peer = match peer {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(peer, IpAddr::V4),
        v4 => v4,
    };
    let peer = peer.to_string();
    forwarded_for.push(&peer);
    out.push(("X-Forwarded-For".to_owned(), forwarded_for.join(", ")));
    let proto = if secure { "https" } else { "http" };
    out.push(("X-Forwarded-Proto".to_owned(), proto.to_owned()));
    out
}

/// The backend's headers that go on to the client, without framing (`client::reply` writes its
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

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn forwarded_headers_extend_what_the_client_sent() {
        let client = pairs(&[
            ("X-Forwarded-For", "1.1.1.1"),
            ("X-Forwarded-For", "2.2.2.2, 3.3.3.3"),
            ("X-Forwarded-Proto", "https"),
        ]);
        let peer: IpAddr = "127.0.0.1".parse().expect("ip");
        assert_eq!(
            upstream_headers(&client, peer, false),
            pairs(&[
                ("X-Forwarded-For", "1.1.1.1, 2.2.2.2, 3.3.3.3, 127.0.0.1"),
                ("X-Forwarded-Proto", "http"),
            ])
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
        let peer: IpAddr = "::ffff:10.1.2.3".parse().expect("ip");
        assert_eq!(
            upstream_headers(&client, peer, false),
            pairs(&[
                ("Authorization", "Bearer k"),
                ("X-Custom", "a"),
                ("X-Custom", "b"),
                ("X-Forwarded-For", "10.1.2.3"),
                ("X-Forwarded-Proto", "http"),
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
}
