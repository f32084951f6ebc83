//! `request::message_end` on arbitrary bytes: where the first request ends, that more
//! bytes are needed, or why it is refused. This is the verdict a connection acts on, and
//! a socket hands it the same bytes in pieces of any size, so the verdict must not depend
//! on where the reads broke: a front proxy that reads the stream in other pieces must find
//! the same end, or a second request can hide in the first one's body (smuggling). So
//! beyond "no panic" it checks that a prefix of the input never gets a verdict the whole
//! input contradicts, that a refusal is never undone by more bytes, and that a head that
//! parses holds nothing a backend or a log line could read its own way (control bytes).

#![no_main]

use libfuzzer_sys::fuzz_target;
use vllm_router::client::head::{self, Framing, Head, HeadError};
use vllm_router::client::request::{message_end, MessageError};

/// `max_header_bytes`' default: the cap the router runs with unless configured.
const MAX_HEADER_BYTES: usize = 64 * 1024;

fuzz_target!(|buf: &[u8]| {
    let whole = message_end(buf, MAX_HEADER_BYTES);

    // The input stays plain bytes (seeds and crash artifacts read as HTTP), so the cut
    // comes from a hash of it: any change the fuzzer makes moves the cut too.
    let cut = (hash(buf) % (buf.len() as u64 + 1)) as usize;
    let mut cuts = vec![cut];

    if let Ok(Some((head, n))) = &whole {
        let n = *n;
        assert!(
            n <= buf.len(),
            "the request ends at {n}, past the buffer's {}",
            buf.len()
        );
        let head_end = match head::find_end(buf) {
            Ok(Some(end)) => end,
            other => panic!("a request was framed but its head has no end: {other:?}"),
        };
        // What follows the head is the body the framing declares, and nothing else: the
        // next request starts at `n`.
        match head.framing {
            Framing::None => assert_eq!(n, head_end, "a request without a body"),
            Framing::Length(len) => {
                assert_eq!(n as u64, head_end as u64 + len, "Content-Length {len}")
            }
            // "0\r\n\r\n" is the shortest chunked body.
            Framing::Chunked => assert!(
                n >= head_end + 5,
                "a chunked body of {} bytes",
                n - head_end
            ),
        }
        check_head(head);

        // The reads that matter most: the request's last byte missing, or just arrived;
        // the head's likewise.
        cuts.extend([n.saturating_sub(1), n, head_end - 1, head_end]);

        // A head over the cap is refused, not waited for.
        assert!(
            matches!(
                message_end(buf, head_end - 1),
                Err(MessageError::Head(HeadError::TooLarge))
            ),
            "a head of {head_end} bytes passed a cap of {}",
            head_end - 1
        );
    }

    for k in cuts {
        check_prefix(buf, &whole, k);
    }
});

/// What the verdict on `buf[..k]` may be, given the verdict on all of `buf`.
fn check_prefix(buf: &[u8], whole: &Result<Option<(Head, usize)>, MessageError>, k: usize) {
    let part = message_end(&buf[..k], MAX_HEADER_BYTES);
    match (whole, &part) {
        // A request that is all there is framed the same however much follows it; one cut
        // short waits for more, and is not refused for what has not arrived yet.
        (Ok(Some((head, n))), Ok(Some((part_head, part_n)))) => {
            assert!(
                k >= *n,
                "the prefix of {k} bytes was framed as a request of {part_n}, the whole as {n}"
            );
            assert_eq!(
                part_n, n,
                "the prefix of {k} bytes ends the request elsewhere"
            );
            assert_eq!(
                format!("{part_head:?}"),
                format!("{head:?}"),
                "the prefix of {k} bytes parses another head"
            );
        }
        (Ok(Some((_, n))), Ok(None)) => {
            assert!(
                k < *n,
                "the whole request of {n} bytes is in the prefix of {k}, yet it waits for more"
            )
        }
        (Ok(Some((_, n))), Err(e)) => {
            panic!("the prefix of {k} bytes is refused ({e}), the whole is a request of {n}")
        }
        // A prefix cannot know more than the whole: where the whole still waits for bytes,
        // so does every prefix of it, neither refused nor complete.
        (Ok(None), Ok(None)) => {}
        (Ok(None), _) => panic!("the whole needs more bytes, the prefix of {k} got {part:?}"),
        // A refusal is never undone by more bytes: a request the prefix framed would be
        // framed the same in the whole.
        (Err(_), Ok(Some((_, n)))) => {
            panic!("the prefix of {k} bytes is a request of {n}, the whole is refused")
        }
        (Err(_), Ok(None)) => {}
        // Below the cap, the refusal is decided by the bytes that caused it, and so is its
        // status: the client gets the same reply however its bytes were split.
        (Err(e), Err(part_e)) => {
            if buf.len() <= MAX_HEADER_BYTES {
                assert_eq!(
                    part_e, e,
                    "the prefix of {k} bytes is refused for another reason"
                );
            }
        }
    }
}

/// A parsed head holds only what the router can forward and log as it is.
fn check_head(head: &Head) {
    assert!(is_token(&head.method), "method {:?}", head.method);
    // CONNECT's target is an authority (and answered 501); every other is an
    // origin-form path of visible ASCII.
    let target = head.target.as_bytes();
    assert!(!target.is_empty(), "an empty target");
    assert!(
        !target.iter().any(|&b| b <= b' ' || b == 0x7F),
        "target {:?} holds whitespace or a control byte",
        head.target
    );
    if head.method != "CONNECT" {
        assert!(
            target[0] == b'/' && target.iter().all(u8::is_ascii_graphic),
            "target {:?}",
            head.target
        );
    }
    for (name, value) in &head.headers {
        assert!(is_token(name), "header name {name:?}");
        assert!(
            value
                .bytes()
                .all(|b| b == b'\t' || (0x20..0x7F).contains(&b)),
            "header {name} holds a control byte or non-ASCII: {value:?}"
        );
    }
}

/// A `token` of RFC 9110 section 5.6.2: what a method and a field name are.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// FNV-1a.
fn hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
