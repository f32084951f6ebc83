//! Property tests of the parsing front: a chunked body decodes to what was encoded and
//! ends where it should however the bytes arrive; a valid head parses to its fields and
//! one control byte refuses it; header forwarding keeps what it should; whatever bytes
//! arrive, the config parser, the model lookup and the key check return a value (never
//! panic), and config errors stay one located line. Each property runs 1000 random cases in
//! `make test`; a failure prints the shrunk input to add as a regular test.

use std::path::Path;

use proptest::prelude::*;
use vllm_router::client::{chunked, head};
use vllm_router::config;
use vllm_router::request::{auth, headers, relay};

const GUIDE: &str = include_str!("fixtures/guide-production.toml");

/// An edit of a config text: (position, what to do, a character).
fn edits() -> impl Strategy<Value = Vec<(usize, u8, char)>> {
    prop::collection::vec((0usize..2000, 0u8..3, any::<char>()), 1..8)
}

fn apply(text: &str, edits: &[(usize, u8, char)]) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    for &(at, op, c) in edits {
        let at = at % (chars.len() + 1);
        match op {
            0 => chars.insert(at, c),
            1 if at < chars.len() => {
                chars.remove(at);
            }
            _ if at < chars.len() => chars[at] = c,
            _ => chars.push(c),
        }
    }
    chars.into_iter().collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn the_config_parser_takes_any_text(text in "\\PC{0,300}") {
        let _ = config::parse(&text, Path::new("fuzz.toml"));
    }

    #[test]
    fn a_damaged_config_gives_one_located_line(edits in edits()) {
        let text = apply(GUIDE, &edits);
        if let Err(e) = config::parse(&text, Path::new("fuzz.toml")) {
            let line = e.to_string();
            prop_assert!(line.starts_with("fuzz.toml"), "{line}");
            prop_assert!(!line.contains('\n'), "{line}");
        }
    }

    #[test]
    fn a_chunked_body_decodes_to_what_was_encoded_however_it_is_split(
        body in prop::collection::vec(any::<u8>(), 0..600),
        sizes in prop::collection::vec(1usize..80, 1..20),
        extensions in prop::collection::vec(prop::option::of("[a-z]{1,6}(=[a-z0-9]{1,6})?"), 1..20),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
        upper in any::<bool>(),
    ) {
        let mut wire = Vec::new();
        let mut rest = body.as_slice();
        let mut i = 0;
        while !rest.is_empty() {
            let n = sizes[i % sizes.len()].min(rest.len());
            let size = if upper { format!("{n:X}") } else { format!("{n:x}") };
            wire.extend_from_slice(size.as_bytes());
            if let Some(ext) = &extensions[i % extensions.len()] {
                wire.extend_from_slice(format!(";{ext}").as_bytes());
            }
            wire.extend_from_slice(b"\r\n");
            wire.extend_from_slice(&rest[..n]);
            wire.extend_from_slice(b"\r\n");
            rest = &rest[n..];
            i += 1;
        }
        wire.extend_from_slice(b"0\r\nX-Trailer: t\r\n\r\n");
        let end = wire.len();
        wire.extend_from_slice(b"GET /next HTTP/1.1\r\n");
        let mut points: Vec<usize> = cuts.iter().map(|c| c.index(wire.len() + 1)).collect();
        points.push(wire.len());
        points.sort_unstable();
        let mut decoder = chunked::Decoder::default();
        let mut out = Vec::new();
        let mut used = 0;
        let mut from = 0;
        for to in points {
            if to < from { continue; }
            let piece = &wire[from..to];
            let n = decoder.feed(piece, &mut out).expect("a valid body decodes");
            used += n;
            if decoder.is_done() { break; }
            prop_assert_eq!(n, piece.len(), "an unfinished body takes every byte");
            from = to;
        }
        prop_assert!(decoder.is_done());
        prop_assert_eq!(used, end, "the body ends before the next request");
        prop_assert_eq!(out, body);
    }

    #[test]
    fn a_valid_head_parses_to_its_fields_and_a_control_byte_refuses_it(
        fields in prop::collection::vec(("[A-Za-z][A-Za-z0-9-]{0,12}", "[!-~]([ -~]{0,20}[!-~])?"), 0..12),
        bad in 0u8..0x20,
        at in any::<prop::sample::Index>(),
    ) {
        let fields: Vec<(String, String)> = fields
            .into_iter()
            .filter(|(n, _)| !["host", "content-length", "transfer-encoding", "expect", "upgrade", "connection"]
                .contains(&n.to_ascii_lowercase().as_str()))
            .collect();
        let mut text = String::from("POST /v1/x?y=1 HTTP/1.1\r\nHost: r\r\n");
        for (name, value) in &fields {
            text.push_str(&format!("{name}: {value}\r\n"));
        }
        text.push_str("\r\n");
        let end = head::find_end(text.as_bytes()).expect("valid").expect("whole");
        prop_assert_eq!(end, text.len());
        let parsed = head::parse(text.as_bytes()).expect("a valid head parses");
        prop_assert_eq!(&parsed.headers[1..], fields.as_slice());
        prop_assert_eq!(parsed.framing, head::Framing::None);
        // The same head with one control byte (other than tab) somewhere in a field.
        if bad != b'\t' && !fields.is_empty() {
            let field_start = "POST /v1/x?y=1 HTTP/1.1\r\nHost: r\r\n".len();
            let field_len = text.len() - 2 - field_start;
            let pos = field_start + at.index(field_len);
            let mut bytes = text.into_bytes();
            if bytes[pos] != b'\r' && bytes[pos] != b'\n' {
                bytes[pos] = bad;
                let verdict = head::find_end(&bytes).and_then(|end| match end {
                    Some(end) => head::parse(&bytes[..end]).map(|_| ()),
                    None => Ok(()),
                });
                prop_assert!(verdict.is_err(), "accepted a control byte 0x{:02x}", bad);
            }
        }
    }

    #[test]
    fn the_head_scanner_finds_the_same_end_however_the_bytes_arrive(
        text in "(GET|POST) /[a-z]{0,8} HTTP/1\\.1\r\n([A-Za-z]{1,6}: [ -~]{0,12}\r\n){0,6}\r\n[ -~]{0,10}",
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
    ) {
        let bytes = text.as_bytes();
        let whole = head::find_end(bytes);
        let mut points: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
        points.push(bytes.len());
        points.sort_unstable();
        let mut scanner = head::Scanner::default();
        let mut found = Ok(None);
        for to in points {
            found = scanner.scan(&bytes[..to]);
            if !matches!(found, Ok(None)) { break; }
        }
        prop_assert_eq!(found, whole);
    }

    #[test]
    fn forwarding_keeps_every_end_to_end_header(
        list in prop::collection::vec(("[Cc]ontent-[Ll]ength|[Tt]ransfer-[Ee]ncoding|[Cc]onnection|[Xx]-[a-z]{1,5}", "[ -~]{0,24}"), 0..6)
    ) {
        let peer: std::net::IpAddr = "127.0.0.1".parse().expect("ip");
        let up = headers::upstream_headers(&list, peer, false);
        for (name, value) in &list {
            let lower = name.to_ascii_lowercase();
            let listed = list.iter().any(|(n, v)| n.eq_ignore_ascii_case("connection")
                && v.split(',').any(|t| t.trim().eq_ignore_ascii_case(name)));
            let kept = up.iter().any(|(n, v)| n == name && v == value);
            if lower.starts_with("x-") && !listed {
                prop_assert!(kept, "{} dropped", name);
            } else if !lower.starts_with("x-") {
                prop_assert!(!kept, "{} forwarded", name);
            }
        }
        prop_assert_eq!(up.last().map(|(n, v)| (n.as_str(), v.as_str())), Some(("X-Forwarded-Proto", "http")));
    }

    #[test]
    fn the_model_lookup_takes_any_body(body in prop::collection::vec(any::<u8>(), 0..256), json in any::<bool>()) {
        let body = if json { [b"{\"model\":".as_slice(), &body, b"}"].concat() } else { body };
        for target in ["/v1/chat/completions", "/v1/other?x=1"] {
            let _ = relay::requested_model("POST", target, &body);
        }
    }

    #[test]
    fn the_key_check_takes_any_header(header in prop::option::of("\\PC{0,64}")) {
        let keys = [auth::Secret::new("sk-1")];
        let ok = auth::authorized(header.as_deref(), keys.iter());
        let expected = header.as_deref().is_some_and(|h| {
            let h = h.trim();
            h.get(..7).is_some_and(|scheme| scheme.eq_ignore_ascii_case("bearer "))
                && h.get(7..).is_some_and(|token| token.trim() == "sk-1")
        });
        prop_assert_eq!(ok, expected);
    }
}
