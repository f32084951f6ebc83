//! The parsing front against llhttp, Node's HTTP/1.1 parser (strict, as Node's server
//! runs it): a table of ambiguous and hostile requests, each judged by the router's own
//! code (`request::message_end`, then the method and WebSocket refusals a worker makes
//! before any byte goes on) and by llhttp (`tests/fixtures/llhttp_verdict.js`). Two
//! parsers that read one request two ways are how smuggling starts, so each row must
//! agree: both refuse, or both wait for more bytes, or both accept with the message
//! ending at the same byte. A row may differ only where it says why, and then the
//! router is the one refusing.
//!
//! The table is printed (`cargo test differential -- --nocapture`). Node must be
//! installed (`make test` installs the Debian package `nodejs`): without it the test
//! fails rather than passing untested.

use std::io::Write;
use std::process::{Command, Stdio};

use vllm_router::client::head::Upgrade;
use vllm_router::client::request::{self, MessageError};
use vllm_router::control::config;
use vllm_router::request::headers;

const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/llhttp_verdict.js"
);

/// A second request after the first: where a parser thinks the first ends shows.
const NEXT: &str = "GET /next HTTP/1.1\r\nHost: r\r\n\r\n";

#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    /// The first request is the first `n` bytes.
    Complete(usize),
    /// Nothing wrong yet, but the request has not ended.
    Incomplete,
    Refused(String),
}

impl Verdict {
    fn show(&self) -> String {
        match self {
            Verdict::Complete(n) => format!("complete {n}"),
            Verdict::Incomplete => "incomplete".into(),
            Verdict::Refused(why) => format!("refused: {why}"),
        }
    }
}

struct Case {
    name: &'static str,
    bytes: Vec<u8>,
    /// Why the router refuses what llhttp takes, where it does on purpose.
    stricter: Option<&'static str>,
}

fn case(name: &'static str, bytes: impl AsRef<[u8]>) -> Case {
    Case {
        name,
        bytes: bytes.as_ref().to_vec(),
        stricter: None,
    }
}

fn stricter(name: &'static str, bytes: impl AsRef<[u8]>, why: &'static str) -> Case {
    Case {
        stricter: Some(why),
        ..case(name, bytes)
    }
}

/// A POST with `fields` (each ending in CRLF) after its Host, then `rest`.
fn post(fields: &str, rest: impl AsRef<[u8]>) -> Vec<u8> {
    let mut bytes =
        format!("POST /v1/completions HTTP/1.1\r\nHost: r\r\n{fields}\r\n").into_bytes();
    bytes.extend_from_slice(rest.as_ref());
    bytes
}

/// A chunked POST whose body is `body` as sent, then the next request.
fn chunked(body: impl AsRef<[u8]>) -> Vec<u8> {
    let mut rest = body.as_ref().to_vec();
    rest.extend_from_slice(NEXT.as_bytes());
    post("Transfer-Encoding: chunked\r\n", rest)
}

/// A GET with one extra field line `field` (no CRLF), then the next request.
fn get_with(field: impl AsRef<[u8]>) -> Vec<u8> {
    let mut bytes = b"GET /v1/models HTTP/1.1\r\nHost: r\r\n".to_vec();
    bytes.extend_from_slice(field.as_ref());
    bytes.extend_from_slice(b"\r\n\r\n");
    bytes.extend_from_slice(NEXT.as_bytes());
    bytes
}

fn cases() -> Vec<Case> {
    let next = |s: &str| format!("{s}{NEXT}");
    vec![
        // Valid requests, each followed by a second one.
        case("GET, no body", next("GET /v1/models HTTP/1.1\r\nHost: r\r\n\r\n")),
        case("POST, Content-Length 5", post("Content-Length: 5\r\n", next("hello"))),
        case("POST, Content-Length 0", post("Content-Length: 0\r\n", NEXT)),
        case("Content-Length without OWS", post("Content-Length:5\r\n", next("hello"))),
        case("Content-Length 05", post("Content-Length: 05\r\n", next("hello"))),
        case("chunked body", chunked("5\r\nhello\r\n0\r\n\r\n")),
        case("chunked, TE spelt Chunked", {
            post("Transfer-Encoding: Chunked\r\n", next("5\r\nhello\r\n0\r\n\r\n"))
        }),
        case("chunked, extension", chunked("5;name=v\r\nhello\r\n0\r\n\r\n")),
        case("chunked, quoted extension", chunked("5;n=\"a b\"\r\nhello\r\n0\r\n\r\n")),
        case("chunked, uppercase hex", chunked("A\r\n0123456789\r\n0\r\n\r\n")),
        case("chunked, 16 hex digits", chunked("0000000000000005\r\nhello\r\n0\r\n\r\n")),
        case("chunked, trailers", chunked("5\r\nhello\r\n0\r\nX-T: 1\r\nX-U: 2\r\n\r\n")),
        case("pipelined GET after GET", next(&next("GET / HTTP/1.1\r\nHost: r\r\n\r\n"))),
        case("empty line before request line", next("\r\nGET / HTTP/1.1\r\nHost: r\r\n\r\n")),
        case("tab in a field value", get_with("X-A: a\tb")),
        case("empty field value", get_with("X-A:")),
        case("Host without OWS", next("GET / HTTP/1.1\r\nHost:r\r\n\r\n")),
        case("two empty lines before request line", next("\r\n\r\nGET / HTTP/1.1\r\nHost: r\r\n\r\n")),
        case("HTTP/1.0, chunked", next("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")),
        case("HTTP/1.0, no Host", next("GET / HTTP/1.0\r\n\r\n")),
        case("HTTP/1.0, Content-Length", {
            next("POST / HTTP/1.0\r\nContent-Length: 2\r\n\r\nhi")
        }),
        // The request line.
        stricter(
            "HTTP/2.0 (505)",
            "GET / HTTP/2.0\r\nHost: r\r\n\r\n",
            "only HTTP/1.0 and 1.1 are served; llhttp parses 2.0 as a 1.x head",
        ),
        case("HTTP/1.2 (505)", "GET / HTTP/1.2\r\nHost: r\r\n\r\n"),
        stricter(
            "HTTP/0.9",
            "GET / HTTP/0.9\r\nHost: r\r\n\r\n",
            "only HTTP/1.0 and 1.1 are served; llhttp parses 0.9 as a 1.x head",
        ),
        stricter(
            "request line without a version",
            "GET /v1/models\r\nHost: r\r\n\r\n",
            "llhttp takes it as an HTTP/0.9 request that ends with its line; the router serves 1.0 and 1.1",
        ),
        case("lowercase http/1.1", "GET / http/1.1\r\nHost: r\r\n\r\n"),
        case("text after HTTP/1.1", "GET / HTTP/1.1 extra\r\nHost: r\r\n\r\n"),
        case("space after HTTP/1.1", "GET / HTTP/1.1 \r\nHost: r\r\n\r\n"),
        stricter(
            "two spaces after the method",
            "GET  / HTTP/1.1\r\nHost: r\r\n\r\n",
            "RFC 9112 3: single spaces; where a target starts is then never in question",
        ),
        case("tab after the method", "GET\t/ HTTP/1.1\r\nHost: r\r\n\r\n"),
        case("tab before the version", "GET /\tHTTP/1.1\r\nHost: r\r\n\r\n"),
        case("control byte in the target", "GET /a\x01b HTTP/1.1\r\nHost: r\r\n\r\n"),
        case("DEL in the target", "GET /a\x7fb HTTP/1.1\r\nHost: r\r\n\r\n"),
        case("byte 0x80 in the target", b"GET /a\x80b HTTP/1.1\r\nHost: r\r\n\r\n"),
        case("UTF-8 in the target", "GET /caf\u{e9} HTTP/1.1\r\nHost: r\r\n\r\n"),
        case("quote and braces in the target", next("GET /a\"{b}|c HTTP/1.1\r\nHost: r\r\n\r\n")),
        stricter(
            "fragment in the target",
            "GET /v1/models#x HTTP/1.1\r\nHost: r\r\n\r\n",
            "a client never sends a fragment; backends differ on whether it is part of the path",
        ),
        case("unknown method (501)", next("FOO / HTTP/1.1\r\nHost: r\r\n\r\n")),
        case("lowercase method (501)", next("get / HTTP/1.1\r\nHost: r\r\n\r\n")),
        // Line endings.
        case("bare LF line endings", "GET / HTTP/1.1\nHost: r\n\n"),
        case("bare LF after the request line", "GET / HTTP/1.1\nHost: r\r\n\r\n"),
        case("bare LF ends the head", "GET / HTTP/1.1\r\nHost: r\r\n\n"),
        stricter(
            "bare LF before the request line",
            "\nGET / HTTP/1.1\r\nHost: r\r\n\r\n",
            "every line ends in CRLF, the empty ones RFC 9112 2.2 allows first too",
        ),
        stricter(
            "bare CR before the request line",
            "\rGET / HTTP/1.1\r\nHost: r\r\n\r\n",
            "every line ends in CRLF, the empty ones RFC 9112 2.2 allows first too",
        ),
        case("bare CR in a field line", "GET / HTTP/1.1\r\nHost: r\rX: b\r\n\r\n"),
        // Field syntax.
        case("obs-fold", get_with("X-A: 1\r\n folded")),
        case("space before the colon", get_with("X-A : 1")),
        case("whitespace before the first field", "GET / HTTP/1.1\r\n X-A: 1\r\nHost: r\r\n\r\n"),
        case("space in a field name", get_with("X A: 1")),
        case("tab in a field name", get_with("X\tA: 1")),
        case("VT before a field value", get_with("X-A:\x0b1")),
        case("empty field name", get_with(": 1")),
        case("NUL in a field value", get_with("X-A: a\0b")),
        case("control byte 0x01 in a field value", get_with("X-A: a\x01b")),
        case("DEL in a field value", get_with("X-A: a\x7fb")),
        stricter(
            "obs-text (0xE9) in a field value",
            get_with(b"X-A: caf\xe9"),
            "bytes over 0x7F are read as Latin-1, UTF-8 or refused by different backends and logs",
        ),
        // Content-Length.
        case("Content-Length: 102, 102", post("Content-Length: 102, 102\r\n", "")),
        case("Content-Length: 0x65", post("Content-Length: 0x65\r\n", "")),
        case("Content-Length: +5", post("Content-Length: +5\r\n", "hello")),
        case("Content-Length: -1", post("Content-Length: -1\r\n", "")),
        case("Content-Length empty", post("Content-Length: \r\n", "")),
        case("Content-Length of 20 digits", post("Content-Length: 99999999999999999999\r\n", "")),
        case("two equal Content-Length", post("Content-Length: 5\r\nContent-Length: 5\r\n", "hello")),
        case("two different Content-Length", post("Content-Length: 5\r\nContent-Length: 6\r\n", "hello!")),
        case("Content-Length, trailing space", post("Content-Length: 5 \r\n", next("hello"))),
        case("Content-Length, trailing tab", post("Content-Length: 5\t\r\n", "hello")),
        stricter(
            "Content-Length, leading tab",
            post("Content-Length:\t5\r\n", next("hello")),
            "a framing field is taken with spaces only: llhttp refuses a tab after its value",
        ),
        case("Content-Length short of its body", post("Content-Length: 5\r\n", "hel")),
        // Transfer-Encoding.
        case("Content-Length and chunked", {
            post("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", "5\r\nhello\r\n0\r\n\r\n")
        }),
        stricter(
            "Transfer-Encoding: gzip, chunked",
            post("Transfer-Encoding: gzip, chunked\r\n", next("5\r\nhello\r\n0\r\n\r\n")),
            "the router decodes only chunked, and would forward a body it cannot read",
        ),
        case("Transfer-Encoding: chunked, gzip", {
            post("Transfer-Encoding: chunked, gzip\r\n", "5\r\nhello\r\n0\r\n\r\n")
        }),
        case("Transfer-Encoding: identity", post("Transfer-Encoding: identity\r\n", "hello")),
        case("Transfer-Encoding twice", {
            post(
                "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
                "5\r\nhello\r\n0\r\n\r\n",
            )
        }),
        case("Transfer-Encoding: chunked + VT", {
            post("Transfer-Encoding: chunked\x0b\r\n", "5\r\nhello\r\n0\r\n\r\n")
        }),
        case("Transfer-Encoding: FF + chunked", {
            post("Transfer-Encoding: \x0cchunked\r\n", "5\r\nhello\r\n0\r\n\r\n")
        }),
        case("Transfer-Encoding: chunked + tab", {
            post("Transfer-Encoding: chunked\t\r\n", "5\r\nhello\r\n0\r\n\r\n")
        }),
        stricter(
            "Transfer-Encoding: tab + chunked",
            post("Transfer-Encoding:\tchunked\r\n", next("5\r\nhello\r\n0\r\n\r\n")),
            "a framing field is taken with spaces only: llhttp refuses a tab after its value",
        ),
        // Chunk size lines.
        case("chunk size +5", chunked("+5\r\nhello\r\n0\r\n\r\n")),
        case("chunk size with a space before", chunked(" 5\r\nhello\r\n0\r\n\r\n")),
        case("chunk size with a space after", chunked("5 \r\nhello\r\n0\r\n\r\n")),
        case("chunk size, space, extension", chunked("5 ;a=b\r\nhello\r\n0\r\n\r\n")),
        case("chunk extension: only ;", chunked("5;\r\nhello\r\n0\r\n\r\n")),
        case("chunk extension: space after ;", chunked("5; a\r\nhello\r\n0\r\n\r\n")),
        case("chunk extension: space before =", chunked("5;a =b\r\nhello\r\n0\r\n\r\n")),
        case("chunk extension: space in a value", chunked("5;a=b c\r\nhello\r\n0\r\n\r\n")),
        case("chunk extension: two, and a bare name", chunked("5;a=b;c;d=\"e\\\"f\"\r\nhello\r\n0\r\n\r\n")),
        case("chunk extension: ; at the end", chunked("5;a=b;\r\nhello\r\n0\r\n\r\n")),
        case("chunk extension: unterminated quote", chunked("5;a=\"b\r\nhello\r\n0\r\n\r\n")),
        case("chunk extension: text after a quote", chunked("5;a=\"b\"c\r\nhello\r\n0\r\n\r\n")),
        case("chunk extension: @ in a value", chunked("5;a=@\r\nhello\r\n0\r\n\r\n")),
        case("chunk extension: tab in a quote", chunked("5;a=\"\t\"\r\nhello\r\n0\r\n\r\n")),
        case("chunk extension: DEL in a quote", chunked("5;a=\"\x7f\"\r\nhello\r\n0\r\n\r\n")),
        case("chunk extension: quoted control byte", chunked("5;a=\"\\\x01\"\r\nhello\r\n0\r\n\r\n")),
        stricter(
            "chunk extension: empty name",
            chunked("5;=b\r\nhello\r\n0\r\n\r\n"),
            "RFC 9112 7.1.1: a name is a token, never empty",
        ),
        stricter(
            "chunk extension: empty value",
            chunked("5;a=\r\nhello\r\n0\r\n\r\n"),
            "RFC 9112 7.1.1: a value is a token or a quoted string, never empty",
        ),
        stricter(
            "chunk extension: obs-text in a quote",
            chunked(b"5;a=\"\xe9\"\r\nhello\r\n0\r\n\r\n"),
            "bytes over 0x7F are refused everywhere in a head or body framing, as in field values",
        ),
        case("chunk size 0x5", chunked("0x5\r\nhello\r\n0\r\n\r\n")),
        case("empty chunk size line", chunked("\r\nhello\r\n0\r\n\r\n")),
        stricter(
            "chunk size of 17 hex digits",
            chunked("00000000000000005\r\nhello\r\n0\r\n\r\n"),
            "a size is at most 16 hex digits (a u64), leading zeros included, so no parser wraps it",
        ),
        stricter(
            "chunk size after 40 zeros",
            chunked(format!("{}5\r\nhello\r\n0\r\n\r\n", "0".repeat(40))),
            "a size is at most 16 hex digits (a u64), leading zeros included, so no parser wraps it",
        ),
        case("chunk size over 64 bits", chunked("10000000000000000\r\nhello\r\n0\r\n\r\n")),
        case("chunk size 2^64-1, data pending", chunked("ffffffffffffffff\r\nhello")),
        case("chunk extension with a bare LF", chunked("5;a\nb\r\nhello\r\n0\r\n\r\n")),
        case("chunk extension with a VT", chunked("5;a\x0bb\r\nhello\r\n0\r\n\r\n")),
        case("chunk size line ends in a bare LF", chunked("5\nhello\r\n0\r\n\r\n")),
        // Chunk data and the end of the body.
        case("chunk data longer than its size", chunked("5\r\nhello!\r\n0\r\n\r\n")),
        case("chunk data ends in a bare LF", chunked("5\r\nhello\n0\r\n\r\n")),
        case("last chunk without its CRLF", post("Transfer-Encoding: chunked\r\n", "5\r\nhello\r\n0\r\n")),
        case("last chunk, then a bare CR", post("Transfer-Encoding: chunked\r\n", "5\r\nhello\r\n0\r\n\r")),
        case("last chunk, then a bare LF", chunked("5\r\nhello\r\n0\r\n\n")),
        case("trailer without a colon", chunked("5\r\nhello\r\n0\r\nX-T 1\r\n\r\n")),
        case("empty trailer value", chunked("5\r\nhello\r\n0\r\nX-T:\r\n\r\n")),
        case("DEL in a trailer value", chunked("5\r\nhello\r\n0\r\nX-T: a\x7f\r\n\r\n")),
        stricter(
            "obs-text in a trailer value",
            chunked(b"5\r\nhello\r\n0\r\nX-T: caf\xe9\r\n\r\n"),
            "bytes over 0x7F are read as Latin-1, UTF-8 or refused by different backends and logs",
        ),
        case("folded trailer", chunked("5\r\nhello\r\n0\r\nX-T: 1\r\n folded\r\n\r\n")),
        // Semantic rules of the router's own, which llhttp leaves to its caller.
        stricter(
            "HTTP/1.1 without Host",
            "GET / HTTP/1.1\r\n\r\n",
            "RFC 9112 3.2: a server must refuse it; llhttp leaves Host to Node's http server",
        ),
        stricter(
            "two Host fields",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "RFC 9112 3.2: a server must refuse it; llhttp leaves Host to Node's http server",
        ),
        stricter(
            "absolute-form target",
            "GET http://r/v1/models HTTP/1.1\r\nHost: r\r\n\r\n",
            "the router routes by the path: origin form only, so Host and target never disagree",
        ),
        stricter(
            "dot segment in the path",
            "GET /v1/../admin HTTP/1.1\r\nHost: r\r\n\r\n",
            "the router routes by the path as written: one a backend would normalise elsewhere is refused",
        ),
        stricter(
            "Expect: 200-ok (417)",
            "POST / HTTP/1.1\r\nHost: r\r\nExpect: 200-ok\r\nContent-Length: 0\r\n\r\n",
            "RFC 9110 10.1.1: an expectation the router cannot meet is answered 417",
        ),
    ]
}

/// The router's verdict: the framing, then the refusals of anything it would not relay
/// that depend on the head alone (as the connection thread and `relay` make them
/// before a body byte is read).
fn router(bytes: &[u8]) -> Verdict {
    let max_header_bytes = config::Settings::default().max_header_bytes;
    match request::message_end(bytes, max_header_bytes) {
        Err(MessageError::Head(e)) => Verdict::Refused(format!("head: {e}")),
        Err(MessageError::Body(e)) => Verdict::Refused(e.to_string()),
        Ok(None) => Verdict::Incomplete,
        Ok(Some((head, _))) if !headers::relayed_method(&head.method) => {
            Verdict::Refused(format!("501: method {} is not relayed", head.method))
        }
        Ok(Some((head, _))) if head.upgrade == Upgrade::WebSocket => {
            Verdict::Refused("WebSocket upgrade".into())
        }
        Ok(Some((_, end))) => Verdict::Complete(end),
    }
}

/// llhttp's verdicts, one per request, from one run of the Node script.
fn llhttp<'a>(requests: impl IntoIterator<Item = &'a [u8]>) -> Vec<Verdict> {
    let mut child = Command::new("node")
        .arg(SCRIPT)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run node ({e}): this test needs Node (Debian package nodejs), \
                 which `make test` installs"
            )
        });
    let mut input = String::new();
    let mut count = 0;
    for request in requests {
        for b in request {
            input.push_str(&format!("{b:02x}"));
        }
        input.push('\n');
        count += 1;
    }
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write to node");
    let output = child.wait_with_output().expect("node runs");
    assert!(output.status.success(), "node failed: {}", output.status);
    let text = String::from_utf8(output.stdout).expect("node prints text");
    let verdicts: Vec<Verdict> = text
        .lines()
        .map(|line| {
            if let Some(n) = line.strip_prefix("complete ") {
                Verdict::Complete(n.parse().expect("an offset"))
            } else if line == "incomplete" {
                Verdict::Incomplete
            } else if let Some(why) = line.strip_prefix("refused ") {
                Verdict::Refused(why.to_owned())
            } else {
                panic!("node printed {line:?}")
            }
        })
        .collect();
    assert_eq!(verdicts.len(), count, "one verdict per request");
    verdicts
}

#[test]
fn the_router_and_llhttp_agree_on_where_requests_end() {
    let cases = cases();
    let theirs = llhttp(cases.iter().map(|c| c.bytes.as_slice()));
    let mut table = String::from("\n| request | router | llhttp | note |\n|---|---|---|---|\n");
    let mut failures = Vec::new();
    for (case, llhttp) in cases.iter().zip(&theirs) {
        let ours = router(&case.bytes);
        let agree = match (&ours, llhttp) {
            (Verdict::Refused(_), Verdict::Refused(_)) => true,
            (a, b) => a == b,
        };
        let note = match (case.stricter, agree) {
            (None, true) => "",
            (None, false) => {
                failures.push(format!("{}: they disagree", case.name));
                "DISAGREE"
            }
            (Some(why), false) if matches!(ours, Verdict::Refused(_)) => why,
            (Some(_), false) => {
                failures.push(format!(
                    "{}: the router takes what llhttp refuses",
                    case.name
                ));
                "ROUTER LESS STRICT"
            }
            (Some(_), true) => {
                failures.push(format!(
                    "{}: marked as differing, but they agree",
                    case.name
                ));
                "MARKED BUT AGREE"
            }
        };
        table.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            case.name,
            ours.show(),
            llhttp.show(),
            note
        ));
    }
    eprintln!("{table}");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Valid requests the mutations start from.
fn seeds() -> Vec<Vec<u8>> {
    vec![
        format!("GET /v1/models?x=1 HTTP/1.1\r\nHost: r\r\nX-A: b\r\n\r\n{NEXT}").into_bytes(),
        post("Content-Length: 5\r\n", format!("hello{NEXT}")),
        chunked("5;a=b\r\nhello\r\n0\r\nX-T: 1\r\n\r\n"),
        format!("POST / HTTP/1.0\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nhi{NEXT}")
            .into_bytes(),
    ]
}

/// xorshift64*: a fixed seed, so a failure shows the same case again.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n.max(1)
    }
}

/// One to three edits of `seed`: a byte inserted, replaced or deleted, or a few bytes
/// of the request copied elsewhere; the bytes are mostly the ones parsers treat
/// specially.
fn mutate(seed: &[u8], rng: &mut Rng) -> Vec<u8> {
    const SPECIAL: &[u8] = b" \t\r\n\x00\x01\x0b\x0c\x7f\x80\xe9\xff:;=\",/\\?#%+-0159aAfFgGxX";
    let mut bytes = seed.to_vec();
    for _ in 0..1 + rng.below(3) {
        let at = rng.below(bytes.len() + 1);
        let byte = if rng.below(5) < 4 {
            SPECIAL[rng.below(SPECIAL.len())]
        } else {
            rng.below(256) as u8
        };
        match rng.below(4) {
            0 => bytes.insert(at, byte),
            1 if at < bytes.len() => bytes[at] = byte,
            2 if at < bytes.len() => {
                bytes.remove(at);
            }
            _ => {
                let from = rng.below(bytes.len());
                let piece = bytes[from..(from + 1 + rng.below(6)).min(bytes.len())].to_vec();
                bytes.splice(at..at, piece);
            }
        }
    }
    bytes
}

/// Mutations of valid requests, judged by both: whenever the router takes a request,
/// llhttp takes it too and ends it at the same byte. (The router may still be waiting
/// where llhttp refused: it checks a head's fields once the head has ended.)
#[test]
fn mutated_requests_never_find_the_router_less_strict() {
    let seeds = seeds();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let requests: Vec<Vec<u8>> = (0..10_000)
        .map(|i| mutate(&seeds[i % seeds.len()], &mut rng))
        .collect();
    let theirs = llhttp(requests.iter().map(Vec::as_slice));
    let mut tally = [0usize; 3];
    let mut failures = Vec::new();
    for (request, llhttp) in requests.iter().zip(&theirs) {
        let ours = router(request);
        let fine = match (&ours, llhttp) {
            (Verdict::Complete(_), _) => {
                tally[0] += 1;
                &ours == llhttp
            }
            (Verdict::Incomplete, _) => {
                tally[1] += 1;
                !matches!(llhttp, Verdict::Complete(_))
            }
            (Verdict::Refused(_), _) => {
                tally[2] += 1;
                true
            }
        };
        if !fine {
            failures.push(format!(
                "{:?}: router {}, llhttp {}",
                String::from_utf8_lossy(request),
                ours.show(),
                llhttp.show()
            ));
        }
    }
    eprintln!(
        "{} mutated requests: the router took {}, waited on {}, refused {}",
        requests.len(),
        tally[0],
        tally[1],
        tally[2]
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
