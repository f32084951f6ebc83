//! The minimal HTTP/1.1 response parser of the load generator (Content-Length and
//! chunked, incremental), the SSE stamps it reads, and the blocking control requests.

use crate::*;

/// One step of reading a response stream.
#[derive(Debug, PartialEq)]
pub(crate) enum Step<'a> {
    /// More bytes are needed.
    NeedMore,
    /// A response head; `event_stream` when it is `text/event-stream`.
    Head { event_stream: bool },
    /// A piece of body.
    Data(&'a [u8]),
    /// The response is complete; the next one may follow.
    Done(u16),
}

#[derive(Debug, Clone, Copy, Default)]
pub(crate) enum State {
    #[default]
    Head,
    Length {
        status: u16,
        left: usize,
    },
    ChunkSize {
        status: u16,
    },
    ChunkData {
        status: u16,
        left: usize,
    },
    ChunkEnd {
        status: u16,
    },
    Trailer {
        status: u16,
    },
}

/// An incremental HTTP/1.1 response reader for keep-alive connections: Content-Length
/// and chunked bodies, which is what the mock, the router and nginx send.
#[derive(Default)]
pub(crate) struct Parser {
    pub(crate) buf: Vec<u8>,
    pub(crate) pos: usize,
    pub(crate) state: State,
}

pub(crate) const MAX_HEAD: usize = 64 * 1024;

impl Parser {
    pub(crate) fn extend(&mut self, data: &[u8]) {
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos > MAX_HEAD {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(data);
    }

    pub(crate) fn next(&mut self) -> Result<Step<'_>, String> {
        loop {
            match self.state {
                State::Head => {
                    let Some((state, event_stream)) = self.head()? else {
                        return Ok(Step::NeedMore);
                    };
                    self.state = state;
                    return Ok(Step::Head { event_stream });
                }
                State::Length { status, left: 0 } => return Ok(self.done(status)),
                State::Length { status, left } => {
                    return Ok(self.data(left, |left| State::Length { status, left }))
                }
                State::ChunkSize { status } => {
                    let Some((a, b)) = self.line() else {
                        return Ok(Step::NeedMore);
                    };
                    self.state = chunk_state(status, &self.buf[a..b])?;
                }
                State::ChunkData { status, left: 0 } => self.state = State::ChunkEnd { status },
                State::ChunkData { status, left } => {
                    return Ok(self.data(left, |left| State::ChunkData { status, left }))
                }
                State::ChunkEnd { status } => match self.line() {
                    None => return Ok(Step::NeedMore),
                    Some((a, b)) if a == b => self.state = State::ChunkSize { status },
                    Some(_) => return Err("chunk data not followed by CRLF".to_owned()),
                },
                State::Trailer { status } => match self.line() {
                    None => return Ok(Step::NeedMore),
                    Some((a, b)) if a == b => return Ok(self.done(status)),
                    Some(_) => {}
                },
            }
        }
    }

    pub(crate) fn done(&mut self, status: u16) -> Step<'static> {
        self.state = State::Head;
        Step::Done(status)
    }

    /// Parses a complete head, if there is one: the body's state and whether it is an
    /// event stream.
    pub(crate) fn head(&mut self) -> Result<Option<(State, bool)>, String> {
        let avail = &self.buf[self.pos..];
        let Some(end) = find(avail, b"\r\n\r\n") else {
            if avail.len() > MAX_HEAD {
                return Err("response head too large".to_owned());
            }
            return Ok(None);
        };
        let parsed = parse_head(&avail[..end])?;
        self.pos += end + 4;
        Ok(Some(parsed))
    }

    /// Up to `left` body bytes from what is buffered.
    pub(crate) fn data(&mut self, left: usize, next: impl Fn(usize) -> State) -> Step<'_> {
        let n = left.min(self.buf.len() - self.pos);
        if n == 0 {
            return Step::NeedMore;
        }
        let start = self.pos;
        self.pos += n;
        self.state = next(left - n);
        Step::Data(&self.buf[start..start + n])
    }

    /// The buffer range of the next CRLF-terminated line, without its CRLF.
    pub(crate) fn line(&mut self) -> Option<(usize, usize)> {
        let end = self.pos + find(&self.buf[self.pos..], b"\r\n")?;
        let start = self.pos;
        self.pos = end + 2;
        Some((start, end))
    }
}

pub(crate) fn chunk_state(status: u16, line: &[u8]) -> Result<State, String> {
    let hex = line.split(|&b| b == b';').next().unwrap_or_default();
    let text = std::str::from_utf8(hex).map_err(|_| "bad chunk size".to_owned())?;
    let size = usize::from_str_radix(text.trim(), 16)
        .map_err(|_| format!("bad chunk size {:?}", String::from_utf8_lossy(line)))?;
    Ok(match size {
        0 => State::Trailer { status },
        left => State::ChunkData { status, left },
    })
}

/// The body framing (with the status) of a response head without its final CRLFCRLF,
/// and whether the body is an event stream.
pub(crate) fn parse_head(head: &[u8]) -> Result<(State, bool), String> {
    let text = std::str::from_utf8(head).map_err(|_| "response head is not UTF-8".to_owned())?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let (mut length, mut chunked, mut events) = (None, false, false);
    for (name, value) in lines.filter_map(|l| l.split_once(':')) {
        let value = value.trim().to_ascii_lowercase();
        if name.eq_ignore_ascii_case("content-length") {
            length = value.parse::<usize>().ok();
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.contains("chunked");
        } else if name.eq_ignore_ascii_case("content-type") {
            events = value.starts_with("text/event-stream");
        }
    }
    let state = match (chunked, length) {
        (true, _) => State::ChunkSize { status },
        (false, Some(left)) => State::Length { status, left },
        _ if status == 204 || status == 304 || status < 200 => State::Length { status, left: 0 },
        _ => {
            return Err(format!(
                "response {status} has neither length nor chunked framing"
            ))
        }
    };
    Ok((state, events))
}

pub(crate) fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Splits an SSE body into events and reads each event's `"sent_us"` stamp.
#[derive(Default)]
pub(crate) struct Sse {
    pub(crate) pending: Vec<u8>,
}

impl Sse {
    /// Takes a piece of body; returns the stamps of the events it completed.
    pub(crate) fn feed(&mut self, data: &[u8]) -> Vec<u64> {
        self.pending.extend_from_slice(data);
        let (mut start, mut stamps) = (0, Vec::new());
        while let Some(end) = find(&self.pending[start..], b"\n\n") {
            stamps.extend(sent_us(&self.pending[start..start + end]));
            start += end + 2;
        }
        self.pending.drain(..start);
        stamps
    }
}

pub(crate) fn sent_us(event: &[u8]) -> Option<u64> {
    const KEY: &[u8] = b"\"sent_us\":";
    let at = find(event, KEY)? + KEY.len();
    let digits = &event[at..];
    let len = digits.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&digits[..len]).ok()?.parse().ok()
}

/// A blocking GET on a new connection: status and body.
pub(crate) fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, Vec<u8>), String> {
    let resp = http::fetch(addr, "GET", path, &[], b"", Duration::from_secs(10))
        .map_err(|e| format!("GET {path} on {addr}: {e}"))?;
    Ok((resp.status, resp.body))
}

pub(crate) fn get_json(addr: SocketAddr, path: &str) -> Result<serde_json::Value, String> {
    let (_, body) = http_get(addr, path)?;
    serde_json::from_slice(&body).map_err(|e| format!("GET {path}: not JSON: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steps(raw: &[&[u8]]) -> Vec<String> {
        let mut p = Parser::default();
        let mut out = Vec::new();
        for piece in raw {
            p.extend(piece);
            loop {
                match p.next().expect("valid") {
                    Step::NeedMore => break,
                    Step::Head { event_stream } => out.push(format!("[{event_stream}]")),
                    Step::Data(d) => out.push(String::from_utf8_lossy(d).into_owned()),
                    Step::Done(s) => out.push(format!("<{s}>")),
                }
            }
        }
        out
    }

    #[test]
    fn reads_length_and_chunked_replies_back_to_back() {
        // Split at awkward places; the 503 is an event stream.
        let raw: &[&[u8]] = &[
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel",
            b"loHTTP/1.1 503 X\r\ntransfer-encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n3\r\nab",
            b"c\r\n1;x=y\r\nd\r\n0\r\nT: 1\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\n\r\n",
        ];
        assert_eq!(
            steps(raw),
            [
                "[false]", "hel", "lo", "<200>", "[true]", "ab", "c", "d", "<503>", "[false]",
                "<204>"
            ]
        );
    }

    #[test]
    fn rejects_broken_framing() {
        // What the router writes when the backend breaks mid-reply.
        let mut p = Parser::default();
        p.extend(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nROUTER-ABORTED\r\n\r\n");
        assert_eq!(
            p.next(),
            Ok(Step::Head {
                event_stream: false
            })
        );
        assert!(p.next().is_err());
        let mut p = Parser::default();
        p.extend(b"HTTP/1.1 200 OK\r\n\r\n");
        assert!(p.next().is_err());
    }

    #[test]
    fn finds_sent_stamps_across_pieces() {
        let mut sse = Sse::default();
        assert!(sse.feed(b"data: {\"index\":0,\"sent_us\":12").is_empty());
        assert_eq!(sse.feed(b"34,\"x\":1}\n\ndata: [DONE]\n\n"), [1234]);
        assert!(sse.pending.is_empty());
    }
}
