//! Who may use the router: client API keys, compared in constant time, and the
//! `Secret` type that keeps every key out of logs, errors and status output.
//!
//! Keys come from three places, all accepted at once: `api_keys` in `[config]`,
//! `api_keys_file` (one key per line, re-read with every reload), and the `API_KEY`
//! environment variable (read once at start, as a Kubernetes Secret passes it). When
//! any key is set, every proxied request and `GET /v1/models` must carry
//! `Authorization: Bearer <key>`; `/livez`, `/readyz` and `/health` stay open for
//! probes, and `/metrics` and `/load-stats` are open unless
//! `protect_status_endpoints = true`.

use std::fmt;

/// A key or other credential. It has no `Display`, and its `Debug` hides the value,
/// so it cannot end up in a log line or an error message by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The value itself, for the one place that must send or compare it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Whether `key` is acceptable as an API key: visible ASCII without spaces, so it can
/// travel in a header, and not empty.
pub fn valid_key(key: &str) -> bool {
    !key.is_empty() && key.bytes().all(|b| b.is_ascii_graphic())
}

/// The keys of an `api_keys_file`: one per line; blank lines and `#` comments skipped.
/// Returns the 1-based number of the first line that is not a valid key, if any.
pub fn parse_key_file(text: &str) -> Result<Vec<Secret>, usize> {
    let mut keys = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if !valid_key(line) {
            return Err(i + 1);
        }
        keys.push(Secret::new(line));
    }
    Ok(keys)
}

/// Whether an `Authorization` header value carries one of `keys`. Every key is
/// compared in full, in time that depends only on the lengths, so neither which key
/// nor how much of it matched can be learned from the answer's timing.
/// What the key check says of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// No key is configured: everyone may pass, and the client's `Authorization`
    /// header is its own business.
    Open,
    /// A configured key was presented.
    Granted,
    /// Keys are configured and none was presented.
    Refused,
}

/// The key check, the one place that decides it for proxied requests and the
/// router's own endpoints alike.
pub fn check<'a>(header: Option<&str>, keys: impl Iterator<Item = &'a Secret> + Clone) -> Verdict {
    if keys.clone().next().is_none() {
        Verdict::Open
    } else if authorized(header, keys) {
        Verdict::Granted
    } else {
        Verdict::Refused
    }
}

pub fn authorized<'a>(header: Option<&str>, keys: impl Iterator<Item = &'a Secret>) -> bool {
    let presented = header
        .and_then(|h| h.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map_or("", |(_, token)| token.trim());
    let mut ok = false;
    for key in keys {
        ok |= constant_time_eq(presented.as_bytes(), key.expose().as_bytes());
    }
    !presented.is_empty() && ok
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_keys_are_checked() {
        let keys = [Secret::new("sk-one"), Secret::new("sk-two")];
        let check = |h: Option<&str>| authorized(h, keys.iter());
        assert!(check(Some("Bearer sk-one")));
        assert!(check(Some("bearer  sk-two ")));
        assert!(!check(Some("Bearer sk-on")));
        assert!(!check(Some("Bearer sk-one1")));
        assert!(!check(Some("Basic sk-one")));
        assert!(!check(Some("Bearer ")));
        assert!(!check(Some("sk-one")));
        assert!(!check(None));
        assert!(!authorized(Some("Bearer "), [Secret::new("")].iter()));
    }

    #[test]
    fn the_check_is_open_without_keys() {
        let keys = [Secret::new("sk-one")];
        assert_eq!(check(None, [].iter()), Verdict::Open);
        assert_eq!(check(Some("Bearer x"), [].iter()), Verdict::Open);
        assert_eq!(check(Some("Bearer sk-one"), keys.iter()), Verdict::Granted);
        assert_eq!(check(Some("Bearer sk-two"), keys.iter()), Verdict::Refused);
        assert_eq!(check(None, keys.iter()), Verdict::Refused);
    }

    #[test]
    fn key_files_skip_blanks_and_comments() {
        let keys = parse_key_file("# team a\nsk-a\n\n  sk-b  \n").expect("valid");
        assert_eq!(keys, [Secret::new("sk-a"), Secret::new("sk-b")]);
        assert_eq!(parse_key_file("sk-a\nhas space\n"), Err(2));
    }

    #[test]
    fn secrets_never_print() {
        assert_eq!(format!("{:?}", Secret::new("sk-live")), "Secret(***)");
    }
}
