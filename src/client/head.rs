//! Parsing one request head, strictly (RFC 9112), from bytes the connection has read.
//!
//! `httparse` splits the head into method, target, version and fields without
//! allocating; it is lenient in places a proxy must not be (it takes a bare LF as a
//! line end, and obs-text in values), so `find_end` checks every line ending first and
//! `parse` checks every field value and the framing itself. A head that two parsers
//! could read differently is refused: that is where request smuggling starts.
//!
//! Nothing here reads from a socket: `find_end` says how much of a buffer is the head
//! (or that more is needed), and the connection decides how much it is willing to read
//! (`max_header_bytes`).

use std::fmt;

/// The most fields a request head may carry (vLLM clients send about a dozen).
pub const MAX_FIELDS: usize = 100;

/// The longest request target (path and query).
pub const MAX_TARGET_BYTES: usize = 16 * 1024;

/// The protocol version of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

/// How the request's body is delimited (RFC 9112 section 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    None,
    /// `Content-Length: n`.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// An `Upgrade` the client asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upgrade {
    None,
    /// `Upgrade: websocket`, which the router refuses (it cannot proxy WebSockets yet).
    WebSocket,
    /// Anything else (`h2c`, ...): ignored, the request is served as HTTP/1.1.
    Other,
}

/// A parsed and checked request head.
#[derive(Debug, Clone)]
pub struct Head {
    pub method: String,
    /// The request target as sent: origin form (`/path?query`).
    pub target: String,
    pub version: Version,
    /// Every field in order, names as sent.
    pub headers: Vec<(String, String)>,
    pub framing: Framing,
    /// The client lets the connection stay open after this request.
    pub keep_alive: bool,
    /// `Expect: 100-continue`: the client waits for a 100 before sending its body.
    pub expect_continue: bool,
    pub upgrade: Upgrade,
}

impl Head {
    /// The first value of the field `name`, compared without case.
    pub fn header(&self, name: &str) -> Option<&str> {
        find(&self.headers, name)
    }

    /// The target's path, without the query.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }

    /// Whether a body follows the head.
    pub fn has_body(&self) -> bool {
        self.framing != Framing::None
    }
}

/// The value of the first field called `name`, compared without case.
pub fn find<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Why a head was refused. Each maps to one status, and every one closes the
/// connection: what follows a head the router could not read cannot be trusted as the
/// start of another request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadError {
    /// 400, with what is wrong.
    Malformed(String),
    /// 431: the head is over `max_header_bytes` or `MAX_FIELDS`.
    TooLarge,
    /// 414: the target is over `MAX_TARGET_BYTES`.
    TargetTooLong,
    /// 505: a version other than HTTP/1.0 and HTTP/1.1.
    Version(String),
    /// 417: an `Expect` other than `100-continue`.
    Expectation(String),
}

impl fmt::Display for HeadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeadError::Malformed(why) => f.write_str(why),
            HeadError::TooLarge => f.write_str("the request head is too large"),
            HeadError::TargetTooLong => f.write_str("the request target is too long"),
            HeadError::Version(v) => write!(f, "{v} is not supported; use HTTP/1.1"),
            HeadError::Expectation(v) => write!(f, "Expect: {v} is not supported"),
        }
    }
}

fn malformed(why: impl Into<String>) -> HeadError {
    HeadError::Malformed(why.into())
}

/// Where the head in `buf` ends: `Ok(Some(n))` when `buf[..n]` is the whole head,
/// its final empty line included; `Ok(None)` when more bytes are needed. Empty lines
/// before the request line (RFC 9112 section 2.2) are part of the head. Every line must
/// end in CRLF: a bare LF or a CR not followed by LF is refused, since parsers disagree
/// on them.
pub fn find_end(buf: &[u8]) -> Result<Option<usize>, HeadError> {
    Scanner::default().scan(buf)
}

/// `find_end` over a buffer that grows between calls: each call looks only at the
/// bytes after the last one's, so a head sent a byte at a time costs linear time.
#[derive(Debug, Default, Clone)]
pub struct Scanner {
    pos: usize,
    line_start: usize,
    seen_line: bool,
}

impl Scanner {
    /// As `find_end`, for `buf` holding at least the bytes of every earlier call.
    pub fn scan(&mut self, buf: &[u8]) -> Result<Option<usize>, HeadError> {
        while self.pos < buf.len() {
            match buf[self.pos] {
                b'\n' => return Err(malformed("a line of the request head ends in a bare LF")),
                b'\r' => {
                    let Some(&next) = buf.get(self.pos + 1) else {
                        return Ok(None);
                    };
                    if next != b'\n' {
                        return Err(malformed("a bare CR in the request head"));
                    }
                    let empty = self.pos == self.line_start;
                    self.pos += 2;
                    self.line_start = self.pos;
                    if empty && self.seen_line {
                        return Ok(Some(self.pos));
                    }
                    self.seen_line |= !empty;
                    continue;
                }
                _ => {}
            }
            self.pos += 1;
        }
        Ok(None)
    }
}

/// The next head in `buf` as the connection reads it (`Connection::read_head`, less the
/// socket): `Ok(Some((head, n)))` when `buf[..n]` is a whole head that parses,
/// `Ok(None)` while more bytes are needed and allowed. A head over `max_bytes` is
/// refused, even before its end arrives, so a client cannot make the router hold more.
/// `scanner` carries the scan across calls on a growing `buf`.
pub fn next_head(
    scanner: &mut Scanner,
    buf: &[u8],
    max_bytes: usize,
) -> Result<Option<(Head, usize)>, HeadError> {
    match scanner.scan(buf)? {
        Some(end) if end > max_bytes => Err(HeadError::TooLarge),
        Some(end) => parse(&buf[..end]).map(|head| Some((head, end))),
        None if buf.len() > max_bytes => Err(if request_line_too_long(buf) {
            HeadError::TargetTooLong
        } else {
            HeadError::TooLarge
        }),
        None => Ok(None),
    }
}

/// Whether a head that is still incomplete after `buf` is refused as a target too
/// long (414) rather than a head too large (431): its request line alone is past the
/// target cap.
pub fn request_line_too_long(buf: &[u8]) -> bool {
    let start = buf
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(0);
    let line = &buf[start..];
    match line.iter().position(|&b| b == b'\r') {
        Some(end) => end > MAX_TARGET_BYTES + REQUEST_LINE_SLACK,
        None => line.len() > MAX_TARGET_BYTES + REQUEST_LINE_SLACK,
    }
}

/// Room for the method, the version and the two spaces around a target of the cap.
const REQUEST_LINE_SLACK: usize = 32;

/// Parses a whole head, as `find_end` delimited it.
pub fn parse(head: &[u8]) -> Result<Head, HeadError> {
    let start = head
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(head.len());
    let head = &head[start..];
    let line_end = head
        .windows(2)
        .position(|w| w == b"\r\n")
        .ok_or_else(|| malformed("the request head has no request line"))?;
    let version = request_line_version(&head[..line_end])?;
    let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let mut request = httparse::Request::new(&mut fields);
    match request.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(malformed("the request head is incomplete")),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(e) => return Err(malformed(format!("invalid request head: {e}"))),
    }
    let method = request.method.unwrap_or_default().to_owned();
    let target = request.path.unwrap_or_default();
    if target.len() > MAX_TARGET_BYTES {
        return Err(HeadError::TargetTooLong);
    }
    // CONNECT's target is an authority; the router answers it 501 (`request::relay`).
    if method != "CONNECT" {
        check_target(target)?;
    }
    let mut headers = Vec::with_capacity(request.headers.len());
    for field in request.headers.iter() {
        headers.push((field.name.to_owned(), field_value(field.name, field.value)?));
    }
    refuse_tabs_in_framing(head)?;
    let framing = framing(&headers)?;
    let hosts = headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("host"))
        .count();
    if hosts > 1 || (hosts == 0 && version == Version::Http11) {
        return Err(malformed(format!(
            "an HTTP/1.1 request needs exactly one Host header, found {hosts}"
        )));
    }
    let tokens = connection_tokens(&headers);
    let keep_alive = match version {
        Version::Http11 => !tokens.iter().any(|t| t == "close"),
        Version::Http10 => tokens.iter().any(|t| t == "keep-alive"),
    };
    let expect_continue = match find(&headers, "expect") {
        None => false,
        Some(v) if v.eq_ignore_ascii_case("100-continue") => true,
        Some(v) => return Err(HeadError::Expectation(v.to_owned())),
    };
    let upgrade = match find(&headers, "upgrade") {
        None => Upgrade::None,
        Some(v)
            if v.split(',')
                .any(|p| p.trim().eq_ignore_ascii_case("websocket")) =>
        {
            Upgrade::WebSocket
        }
        Some(_) => Upgrade::Other,
    };
    Ok(Head {
        method,
        target: target.to_owned(),
        version,
        headers,
        framing,
        keep_alive,
        expect_continue,
        upgrade,
    })
}

/// Checks the request line's shape (`method SP target SP HTTP/x.y`, single spaces,
/// nothing after the version) and returns its version; httparse alone says "invalid
/// version" both for `HTTP/2.0`, which deserves a 505, and for garbage.
fn request_line_version(line: &[u8]) -> Result<Version, HeadError> {
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed(
            "the request line must be: method, one space, target, one space, HTTP version",
        ));
    };
    if method.is_empty() || target.is_empty() {
        return Err(malformed("the request line has an empty method or target"));
    }
    match version {
        b"HTTP/1.1" => Ok(Version::Http11),
        b"HTTP/1.0" => Ok(Version::Http10),
        [b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
            if major.is_ascii_digit() && minor.is_ascii_digit() =>
        {
            Err(HeadError::Version(
                String::from_utf8_lossy(version).into_owned(),
            ))
        }
        _ => Err(malformed(format!(
            "invalid HTTP version {:?} in the request line",
            String::from_utf8_lossy(version)
        ))),
    }
}

/// Refuses a target that a backend could resolve to another path than the router
/// sees: the router routes, checks and logs by the path as written, so every spelling
/// that normalises to something else (dot segments, `//`, an encoded `/` or `.`, an
/// encoded unreserved character such as `%76` for `v`) is refused, as is a fragment,
/// which a client never sends.
pub fn check_target(target: &str) -> Result<(), HeadError> {
    if !target.starts_with('/') {
        return Err(malformed(format!(
            "the request target {target:?} must be a path starting with /"
        )));
    }
    // httparse lets UTF-8 through; a URI holds ASCII only (RFC 3986), and backends
    // decode raw bytes over 0x7F each their own way.
    if let Some(b) = target.bytes().find(|b| !b.is_ascii_graphic()) {
        return Err(malformed(format!(
            "the request target holds the byte 0x{b:02x}; percent-encode it"
        )));
    }
    if target.contains('#') {
        return Err(malformed("the request target holds a fragment (#)"));
    }
    let path = target.split('?').next().unwrap_or("");
    if path.contains("//") {
        return Err(malformed("the request path holds an empty segment (//)"));
    }
    if path
        .split('/')
        .any(|segment| segment == "." || segment == "..")
    {
        return Err(malformed("the request path holds a dot segment (. or ..)"));
    }
    let bytes = path.as_bytes();
    let mut i = 0;
    while let Some(offset) = bytes[i..].iter().position(|&b| b == b'%') {
        let at = i + offset;
        let decoded = bytes
            .get(at + 1..at + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .ok_or_else(|| malformed("the request path holds an invalid percent-encoding"))?;
        if decoded == b'/' || decoded.is_ascii_alphanumeric() || b"-._~".contains(&decoded) {
            return Err(malformed(format!(
                "the request path encodes {:?} as %{:02X}; send it as is",
                decoded as char, decoded
            )));
        }
        i = at + 3;
    }
    Ok(())
}

/// A field value as text: visible ASCII, spaces and tabs only. httparse also lets
/// obs-text (bytes over 0x7F) and DEL through, which backends and logs would each read
/// their own way.
fn field_value(name: &str, value: &[u8]) -> Result<String, HeadError> {
    if let Some(&b) = value
        .iter()
        .find(|&&b| !(b == b'\t' || (0x20..0x7F).contains(&b)))
    {
        return Err(malformed(format!(
            "header {name} holds the byte 0x{b:02x}; only visible ASCII, space and tab are allowed"
        )));
    }
    // httparse has already trimmed the value's surrounding whitespace.
    Ok(String::from_utf8_lossy(value).into_owned())
}

/// The body framing the fields declare, refusing anything two parsers could read
/// differently: a Content-Length that is not plain decimal, two of them (even equal),
/// a Transfer-Encoding other than exactly `chunked`, two of them, or both headers.
fn framing(headers: &[(String, String)]) -> Result<Framing, HeadError> {
    let named = |name: &str| -> Vec<&str> {
        headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    };
    let lengths = named("content-length");
    let encodings = named("transfer-encoding");
    match (lengths.as_slice(), encodings.as_slice()) {
        ([], []) => Ok(Framing::None),
        ([length], []) => content_length(length).map(Framing::Length),
        ([], [encoding]) if encoding.eq_ignore_ascii_case("chunked") => Ok(Framing::Chunked),
        ([], [encoding]) => Err(malformed(format!(
            "Transfer-Encoding {encoding:?} is not supported: only chunked is"
        ))),
        (_, []) => Err(malformed("several Content-Length headers")),
        ([], _) => Err(malformed("several Transfer-Encoding headers")),
        (_, _) => Err(malformed(
            "both Content-Length and Transfer-Encoding: the body length is ambiguous",
        )),
    }
}

/// Refuses a tab anywhere in a Content-Length or Transfer-Encoding line. httparse
/// trims one after the value as whitespace, where llhttp (strict) refuses it: a framing
/// field is read in its one plain form, with spaces, or not at all. `head` is the
/// whole head, every line ending in CRLF (`find_end`).
fn refuse_tabs_in_framing(head: &[u8]) -> Result<(), HeadError> {
    for line in head.split(|&b| b == b'\n').skip(1) {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let name = &line[..colon];
        for framing in ["Content-Length", "Transfer-Encoding"] {
            if name.eq_ignore_ascii_case(framing.as_bytes()) && line[colon..].contains(&b'\t') {
                return Err(malformed(format!(
                    "a tab in the {framing} field: only spaces may surround its value"
                )));
            }
        }
    }
    Ok(())
}

/// A Content-Length value: 1 to 19 decimal digits and nothing else.
fn content_length(value: &str) -> Result<u64, HeadError> {
    if value.is_empty() || value.len() > 19 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(malformed(format!("invalid Content-Length {value:?}")));
    }
    value
        .parse()
        .map_err(|_| malformed(format!("invalid Content-Length {value:?}")))
}

/// The lowercase tokens of every `Connection` field.
pub fn connection_tokens(headers: &[(String, String)]) -> Vec<String> {
    headers
        .iter()
        .filter(|(name, _)| name.eq_ignore_ascii_case("connection"))
        .flat_map(|(_, value)| value.split(','))
        .map(|token| token.trim().to_ascii_lowercase())
        .filter(|token| !token.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Result<Head, HeadError> {
        let bytes = text.as_bytes();
        let end = find_end(bytes)?.expect("a whole head");
        assert_eq!(end, bytes.len(), "the head ends where the text does");
        parse(&bytes[..end])
    }

    fn refused(text: &str) -> HeadError {
        match find_end(text.as_bytes()) {
            Err(e) => e,
            Ok(Some(end)) => parse(&text.as_bytes()[..end]).expect_err(text),
            Ok(None) => panic!("incomplete: {text:?}"),
        }
    }

    #[test]
    fn a_plain_request_parses() {
        let h =
            head("POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\n\r\n")
                .expect("valid");
        assert_eq!(h.method, "POST");
        assert_eq!(h.target, "/v1/chat/completions?x=1");
        assert_eq!(h.path(), "/v1/chat/completions");
        assert_eq!(h.version, Version::Http11);
        assert_eq!(h.framing, Framing::Length(12));
        assert!(h.keep_alive);
        assert_eq!(h.header("content-length"), Some("12"));
    }

    #[test]
    fn the_end_of_a_head_is_found_across_reads() {
        let text = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /next";
        for cut in 0..27 {
            assert_eq!(find_end(&text[..cut]), Ok(None), "cut at {cut}");
        }
        assert_eq!(find_end(text), Ok(Some(27)));
        assert_eq!(
            find_end(b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n"),
            Ok(Some(31))
        );
    }

    #[test]
    fn line_endings_other_than_crlf_are_refused() {
        assert!(matches!(
            refused("GET / HTTP/1.1\nHost: a\r\n\r\n"),
            HeadError::Malformed(_)
        ));
        assert!(matches!(
            refused("GET / HTTP/1.1\r\nHost: a\n\n"),
            HeadError::Malformed(_)
        ));
        assert!(matches!(
            refused("GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n"),
            HeadError::Malformed(_)
        ));
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        for bad in [
            "Content-Length: 102, 102",
            "Content-Length: 0x65",
            "Content-Length: +5",
            "Content-Length: -1",
            "Content-Length: 99999999999999999999",
            "Content-Length: 5\r\nContent-Length: 5",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
            "Transfer-Encoding: gzip, chunked",
            "Transfer-Encoding: chunked, identity",
            "Transfer-Encoding: \x0bchunked",
            "Content-Length: 5\r\nTransfer-Encoding: chunked",
            "Content-Length: 5\t",
            "Content-Length:\t5",
            "Transfer-Encoding: chunked\t",
        ] {
            let text = format!("POST / HTTP/1.1\r\nHost: a\r\n{bad}\r\n\r\n");
            assert!(matches!(refused(&text), HeadError::Malformed(_)), "{bad:?}");
        }
        let chunked = head("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n");
        assert_eq!(chunked.expect("valid").framing, Framing::Chunked);
        let spaced = head("POST / HTTP/1.1\r\nHost: a\r\nContent-Length:  5 \r\n\r\n");
        assert_eq!(spaced.expect("valid").framing, Framing::Length(5));
    }

    #[test]
    fn lenient_field_syntax_is_refused() {
        for bad in [
            "X-A: 1\r\n folded",
            "X-A : 1",
            " X-A: 1",
            "X-A: caf\u{e9}",
            "X-A: a\x7fb",
            "X-A: a\x01b",
            "X A: 1",
            ": no name",
        ] {
            let text = format!("GET / HTTP/1.1\r\nHost: a\r\n{bad}\r\n\r\n");
            assert!(matches!(refused(&text), HeadError::Malformed(_)), "{bad:?}");
        }
        let tab = head("GET / HTTP/1.1\r\nHost: a\r\nX-A: a\tb\r\n\r\n").expect("tab is allowed");
        assert_eq!(tab.header("x-a"), Some("a\tb"));
    }

    #[test]
    fn the_request_line_is_exact() {
        assert!(matches!(
            refused("GET / HTTP/1.1 extra\r\nHost: a\r\n\r\n"),
            HeadError::Malformed(_)
        ));
        assert!(matches!(
            refused("GET  / HTTP/1.1\r\nHost: a\r\n\r\n"),
            HeadError::Malformed(_)
        ));
        assert!(matches!(
            refused("GET / http/1.1\r\nHost: a\r\n\r\n"),
            HeadError::Malformed(_)
        ));
        assert_eq!(
            refused("GET / HTTP/2.0\r\nHost: a\r\n\r\n"),
            HeadError::Version("HTTP/2.0".into())
        );
        assert!(matches!(
            refused("GET / HTTP/1.2\r\nHost: a\r\n\r\n"),
            HeadError::Version(_)
        ));
    }

    #[test]
    fn host_is_required_once_in_http11() {
        assert!(matches!(
            refused("GET / HTTP/1.1\r\n\r\n"),
            HeadError::Malformed(_)
        ));
        assert!(matches!(
            refused("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
            HeadError::Malformed(_)
        ));
        let old = head("GET / HTTP/1.0\r\n\r\n").expect("HTTP/1.0 may omit Host");
        assert!(!old.keep_alive);
        let kept = head("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").expect("valid");
        assert!(kept.keep_alive);
    }

    #[test]
    fn connection_expect_and_upgrade_are_read() {
        let h = head("POST / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, close\r\nExpect: 100-Continue\r\nUpgrade: h2c\r\n\r\n")
            .expect("valid");
        assert!(!h.keep_alive);
        assert!(h.expect_continue);
        assert_eq!(h.upgrade, Upgrade::Other);
        let ws = head("GET / HTTP/1.1\r\nHost: a\r\nUpgrade: WebSocket\r\n\r\n").expect("valid");
        assert_eq!(ws.upgrade, Upgrade::WebSocket);
        assert!(matches!(
            refused("GET / HTTP/1.1\r\nHost: a\r\nExpect: 200-ok\r\n\r\n"),
            HeadError::Expectation(_)
        ));
    }

    #[test]
    fn targets_that_normalise_elsewhere_are_refused() {
        for bad in [
            "/tenant-a/../tenant-b/v1/x",
            "/v1/./models",
            "/v1/..",
            "//v1/models",
            "/v1//models",
            "/%761/chat/completions",
            "/v1/chat%2Fcompletions",
            "/v1/chat%2fcompletions",
            "/v1/%2E%2E/x",
            "/v1/models#frag",
            "/v1/%zz",
            "/v1/%4",
            "*",
            "http://example.com/v1/models",
            "/v1/caf\u{e9}",
        ] {
            assert!(check_target(bad).is_err(), "{bad}");
        }
        for good in [
            "/",
            "/v1/models?x=a/../b",
            "/v1/files/a%20b",
            "/v1/%2Bplus",
            "/v1/a.b/c..d",
        ] {
            assert!(check_target(good).is_ok(), "{good}");
        }
    }

    #[test]
    fn too_many_fields_or_too_long_a_target_are_caught() {
        let many: String = (0..=MAX_FIELDS).map(|i| format!("X-{i}: 1\r\n")).collect();
        assert_eq!(
            refused(&format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n")),
            HeadError::TooLarge
        );
        let long = "a".repeat(MAX_TARGET_BYTES);
        assert_eq!(
            refused(&format!("GET /{long} HTTP/1.1\r\nHost: a\r\n\r\n")),
            HeadError::TargetTooLong
        );
        assert!(request_line_too_long(
            format!("GET /{long}{long}").as_bytes()
        ));
        assert!(!request_line_too_long(b"GET / HTTP/1.1\r\nX: aaaaaaaa"));
    }
}
