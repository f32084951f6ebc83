//! Reading requests off the wire: the request head, the body framing (length or
//! chunked) and the caps, strict enough that the router's framing bugs show here.

use crate::*;

#[derive(Debug)]
pub(crate) struct Head {
    pub(crate) method: String,
    pub(crate) target: String,
    pub(crate) http10: bool,
    pub(crate) headers: Vec<(String, String)>,
}

impl Head {
    pub(crate) fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        let named = self
            .headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name));
        named.map(|(_, v)| v.as_str())
    }

    pub(crate) fn header<'a>(&'a self, name: &'a str) -> Option<&'a str> {
        self.all(name).next()
    }

    pub(crate) fn has_token(&self, name: &str, token: &str) -> bool {
        let mut tokens = self.all(name).flat_map(|v| v.split(','));
        tokens.any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    pub(crate) fn keep_alive(&self) -> bool {
        !self.http10 && !self.has_token("connection", "close")
    }
}

pub(crate) struct Request {
    pub(crate) head: Head,
    pub(crate) body: Vec<u8>,
    /// The body left on the connection for the route to read as it streams (an
    /// upload), or the connection taken over (a WebSocket): `body` is empty then.
    pub(crate) streamed: Option<Framing>,
}

/// A chunked body read as it comes, for uploads the mock does not hold whole.
pub(crate) struct ChunkedReader<'a, R: BufRead> {
    pub(crate) inner: &'a mut R,
    left: usize,
    done: bool,
}

impl<'a, R: BufRead> ChunkedReader<'a, R> {
    pub(crate) fn new(inner: &'a mut R) -> Self {
        ChunkedReader {
            inner,
            left: 0,
            done: false,
        }
    }
}

impl<R: BufRead> Read for ChunkedReader<'_, R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let invalid = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_owned());
        if self.done || out.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            let mut line = Vec::new();
            let n = read_line(
                self.inner,
                &mut line,
                &mut 4096,
                bad("chunk size line too long"),
            )
            .map_err(|_| invalid("bad chunk size line"))?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.left = parse_chunk_size(trim_eol(&line)).map_err(|_| invalid("bad chunk size"))?;
            if self.left == 0 {
                // The trailer section, up to its empty line.
                loop {
                    line.clear();
                    let n = read_line(self.inner, &mut line, &mut 4096, bad("trailer too long"))
                        .map_err(|_| invalid("bad trailer"))?;
                    if n == 0 || trim_eol(&line).is_empty() {
                        break;
                    }
                }
                self.done = true;
                return Ok(0);
            }
        }
        let want = out.len().min(self.left);
        let n = self.inner.read(&mut out[..want])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.left -= n;
        if self.left == 0 {
            let mut crlf = Vec::new();
            read_line(self.inner, &mut crlf, &mut 2, bad("missing CRLF"))
                .map_err(|_| invalid("missing CRLF after chunk"))?;
        }
        Ok(n)
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum ReadErr {
    /// The peer went away or the socket failed: nothing sensible to reply.
    Io,
    /// Malformed or unacceptable request: reply with this status, then close.
    Bad(u16, &'static str),
}

impl From<io::Error> for ReadErr {
    fn from(_: io::Error) -> Self {
        ReadErr::Io
    }
}

#[derive(Debug, PartialEq)]
pub(crate) enum Framing {
    None,
    Length(usize),
    Chunked,
}

pub(crate) fn bad(msg: &'static str) -> ReadErr {
    ReadErr::Bad(400, msg)
}

pub(crate) fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

pub(crate) fn trim_eol(l: &[u8]) -> &[u8] {
    let l = l.strip_suffix(b"\n").unwrap_or(l);
    l.strip_suffix(b"\r").unwrap_or(l)
}

pub(crate) fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// Reads one LF-terminated line, charging it to `budget`; a line that would
/// exceed the budget yields `too_long`. Returns 0 at a clean EOF.
pub(crate) fn read_line(
    r: &mut impl BufRead,
    buf: &mut Vec<u8>,
    budget: &mut usize,
    too_long: ReadErr,
) -> Result<usize, ReadErr> {
    if *budget == 0 {
        return Err(too_long);
    }
    let n = Read::take(&mut *r, *budget as u64).read_until(b'\n', buf)?;
    if n > 0 && buf.last() != Some(&b'\n') {
        return Err(if n >= *budget { too_long } else { ReadErr::Io });
    }
    *budget -= n;
    Ok(n)
}

/// `Ok(None)` when the peer closed cleanly between requests.
pub(crate) fn read_head(r: &mut impl BufRead) -> Result<Option<Head>, ReadErr> {
    let too_long = ReadErr::Bad(431, "request head too large");
    let (mut budget, mut line) = (MAX_HEAD, Vec::new());
    // RFC 9112 2.2: skip empty lines before the request line (stray CRLF after a body).
    while trim_eol(&line).is_empty() {
        line.clear();
        if read_line(r, &mut line, &mut budget, too_long)? == 0 {
            return Ok(None);
        }
    }
    let (method, target, http10) = parse_request_line(trim_eol(&line))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        if read_line(r, &mut line, &mut budget, too_long)? == 0 {
            return Err(ReadErr::Io);
        }
        match trim_eol(&line) {
            [] => {
                return Ok(Some(Head {
                    method,
                    target,
                    http10,
                    headers,
                }))
            }
            _ if headers.len() == MAX_HEADERS => return Err(too_long),
            l => headers.push(parse_header(l)?),
        }
    }
}

pub(crate) fn parse_request_line(l: &[u8]) -> Result<(String, String, bool), ReadErr> {
    let s = std::str::from_utf8(l).map_err(|_| bad("request line is not UTF-8"))?;
    let parts: Vec<&str> = s.split(' ').collect();
    let [method, target, version] = parts[..] else {
        return Err(bad("malformed request line"));
    };
    if method.is_empty() || !method.bytes().all(is_tchar) {
        return Err(bad("malformed method"));
    }
    if target.is_empty() || target.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(bad("malformed request target"));
    }
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        v if v.starts_with("HTTP/") => return Err(ReadErr::Bad(505, "only HTTP/1.x is supported")),
        _ => return Err(bad("malformed HTTP version")),
    };
    Ok((method.into(), origin_form(target).into(), http10))
}

/// Servers must accept absolute-form targets (RFC 9112 3.2.2); routing needs only the path.
pub(crate) fn origin_form(target: &str) -> &str {
    let rest = target
        .strip_prefix("http://")
        .or_else(|| target.strip_prefix("https://"));
    match rest.map(|r| (r, r.find(['/', '?']))) {
        None => target,
        Some((r, Some(i))) if r[i..].starts_with('/') => &r[i..],
        Some(_) => "/",
    }
}

pub(crate) fn parse_header(l: &[u8]) -> Result<(String, String), ReadErr> {
    if matches!(l.first(), Some(b' ' | b'\t')) {
        return Err(bad("obsolete header line folding"));
    }
    let colon = l
        .iter()
        .position(|&b| b == b':')
        .ok_or(bad("header line without colon"))?;
    let (name, value) = (&l[..colon], trim_ows(&l[colon + 1..]));
    if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
        return Err(bad("malformed header name"));
    }
    if value.iter().any(|&b| b == 0 || b == b'\r') {
        return Err(bad("malformed header value"));
    }
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    Ok((text(name), text(value)))
}

pub(crate) fn body_framing(head: &Head) -> Result<Framing, ReadErr> {
    body_framing_within(head, MAX_BODY as u64)
}

/// `body_framing` with a cap of `max` bytes: uploads, read as they stream
/// (`audio`), may be larger than the bodies the mock holds.
pub(crate) fn body_framing_within(head: &Head, max: u64) -> Result<Framing, ReadErr> {
    let too_large = ReadErr::Bad(413, "request body too large");
    let mut length: Option<u64> = None;
    for part in head
        .all("content-length")
        .flat_map(|v| v.split(','))
        .map(str::trim)
    {
        if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad("malformed Content-Length"));
        }
        let n = part.parse::<u64>().map_err(|_| too_large)?;
        if length.is_some_and(|l| l != n) {
            return Err(bad("conflicting Content-Length values"));
        }
        length = Some(n);
    }
    if head.header("transfer-encoding").is_some() {
        // Both framings at once is the classic request-smuggling shape: refuse it.
        if length.is_some() || head.http10 {
            return Err(bad("Transfer-Encoding not allowed here"));
        }
        let codings: Vec<&str> = head
            .all("transfer-encoding")
            .flat_map(|v| v.split(','))
            .collect();
        return match codings[..] {
            [c] if c.trim().eq_ignore_ascii_case("chunked") => Ok(Framing::Chunked),
            _ => Err(ReadErr::Bad(
                501,
                "only Transfer-Encoding: chunked is supported",
            )),
        };
    }
    match length {
        None | Some(0) => Ok(Framing::None),
        Some(n) if n > max => Err(too_large),
        Some(n) => Ok(Framing::Length(n as usize)),
    }
}

/// Appends exactly `n` bytes to `buf`, growing with the data actually received
/// rather than trusting a declared size up front.
pub(crate) fn read_exact_into(
    r: &mut impl BufRead,
    n: usize,
    buf: &mut Vec<u8>,
) -> Result<(), ReadErr> {
    let got = Read::take(&mut *r, n as u64).read_to_end(buf)?;
    if got == n {
        Ok(())
    } else {
        Err(ReadErr::Io)
    }
}

pub(crate) fn read_body(r: &mut impl BufRead, framing: &Framing) -> Result<Vec<u8>, ReadErr> {
    let mut body = Vec::new();
    match *framing {
        Framing::None => {}
        Framing::Length(n) => read_exact_into(r, n, &mut body)?,
        Framing::Chunked => body = read_chunked(r, MAX_BODY)?,
    }
    Ok(body)
}

pub(crate) fn read_chunked(r: &mut impl BufRead, limit: usize) -> Result<Vec<u8>, ReadErr> {
    let (mut body, mut line) = (Vec::new(), Vec::new());
    loop {
        line.clear();
        if read_line(r, &mut line, &mut 4096, bad("chunk size line too long"))? == 0 {
            return Err(ReadErr::Io);
        }
        let size = parse_chunk_size(trim_eol(&line))?;
        if size == 0 {
            break;
        }
        if size > limit - body.len() {
            return Err(ReadErr::Bad(413, "request body too large"));
        }
        read_exact_into(r, size, &mut body)?;
        line.clear();
        let no_crlf = bad("missing CRLF after chunk data");
        match read_line(r, &mut line, &mut 2, no_crlf)? {
            0 => return Err(ReadErr::Io),
            _ if !trim_eol(&line).is_empty() => return Err(no_crlf),
            _ => {}
        }
    }
    // Trailer fields carry nothing we use; read them so the next request starts cleanly.
    let mut budget = MAX_HEAD;
    loop {
        line.clear();
        match read_line(
            r,
            &mut line,
            &mut budget,
            ReadErr::Bad(431, "trailers too large"),
        )? {
            0 => return Err(ReadErr::Io),
            _ if trim_eol(&line).is_empty() => return Ok(body),
            _ => {}
        }
    }
}

pub(crate) fn parse_chunk_size(l: &[u8]) -> Result<usize, ReadErr> {
    let hex = trim_ows(l.split(|&b| b == b';').next().unwrap_or_default());
    // At most 15 hex digits: the value always fits a u64 and the check below rejects it.
    if hex.is_empty() || hex.len() > 15 || !hex.iter().all(u8::is_ascii_hexdigit) {
        return Err(bad("malformed chunk size"));
    }
    let s = std::str::from_utf8(hex).map_err(|_| bad("malformed chunk size"))?;
    usize::from_str_radix(s, 16).map_err(|_| ReadErr::Bad(413, "chunk too large"))
}
