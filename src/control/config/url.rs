//! The URL rules: what a backend URL may be (`http(s)://host[:port][/prefix]`, nothing
//! else), and its one normal form, so that the same server written two ways is caught as a
//! duplicate and every metric and log line names it the same way.

use std::net::Ipv6Addr;

use super::checks::valid_host;
use super::error::{quote, shown};

/// Checks a backend URL and returns it with lower-case scheme and host and no trailing `/`,
/// so that the same server written two ways is caught as a duplicate.
pub(super) fn normalise_url(url: &str) -> Result<String, String> {
    let bad = |why: String| Err(format!("url {} {why}", quote(url)));
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return bad("must not contain spaces or control characters".into());
    }
    let Some((scheme, rest)) = url.split_once("://") else {
        return bad(format!(
            "must start with http:// or https://; write \"http://{}\"",
            shown(url)
        ));
    };
    let scheme = scheme.to_ascii_lowercase();
    if scheme != "http" && scheme != "https" {
        return bad("must start with http:// or https://".into());
    }
    if rest.contains(['?', '#']) {
        return bad("must not have a query (?) or fragment (#)".into());
    }
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let (host, port) = match authority.rfind(':') {
        Some(i) if !authority[i..].contains(']') => (&authority[..i], Some(&authority[i + 1..])),
        _ => (authority, None),
    };
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<Ipv6Addr>().is_ok(),
        None => !host.contains(':') && valid_host(host),
    };
    if host.is_empty() {
        return bad("has no host; write http://host:port".into());
    } else if !host_ok {
        return bad(format!(
            "has an invalid host `{}`; use a hostname or IP address",
            shown(host)
        ));
    }
    let port = match port.map(|p| (p, p.parse::<u16>())) {
        None => String::new(),
        Some((p, Ok(n))) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => format!(":{n}"),
        Some(_) => return bad("must have a port from 1 to 65535".into()),
    };
    let path = path.trim_end_matches('/');
    Ok(format!(
        "{scheme}://{}{port}{path}",
        host.to_ascii_lowercase()
    ))
}
