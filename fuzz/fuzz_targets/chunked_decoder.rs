//! `chunked::Decoder` on arbitrary bytes, fed in pieces. The decoder gets whatever each
//! read from the socket returned, so a body must decode the same however it is split:
//! the same data, the same error, and the same end, since the bytes after the end are the
//! next request's and a decoder that ends elsewhere on another split lets a request hide
//! in a body. The decoded body is never longer than the bytes it came from: the router
//! counts a chunked body against `max_body_bytes` and the body budget as it decodes, and
//! a client must not make it hold more than it sent.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vllm_router::client::chunked::{ChunkError, Decoder};

/// What a run of the decoder came to.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    /// Bytes used in all, or the error that stopped it.
    used: Result<usize, ChunkError>,
    done: bool,
    body: Vec<u8>,
}

fuzz_target!(|data: &[u8]| {
    let mut decoder = Decoder::default();
    let mut body = Vec::new();
    let whole = Outcome {
        used: decoder.feed(data, &mut body),
        done: decoder.is_done(),
        body,
    };

    assert!(
        whole.body.len() <= data.len(),
        "a body of {} bytes from {}",
        whole.body.len(),
        data.len()
    );
    if let Ok(used) = whole.used {
        assert!(used <= data.len());
        assert!(
            whole.body.len() <= used,
            "a body of {} bytes from {used} used",
            whole.body.len()
        );
        // The contract `read_body` relies on: stopping short means the body ended there,
        // and the rest stays with the connection.
        if !whole.done {
            assert_eq!(
                used,
                data.len(),
                "stopped at {used} of {} before the end",
                data.len()
            );
        } else {
            // "0\r\n\r\n" at least frames whatever data there was.
            assert!(
                whole.body.len() + 5 <= used,
                "a body of {} bytes in {used}",
                whole.body.len()
            );
            // Where the body ends does not depend on what follows it.
            let alone = run(&data[..used], [used].into_iter());
            assert_eq!(alone, whole, "the body's own {used} bytes decode otherwise");
        }
    }

    // The input stays plain bytes (seeds and crash artifacts read as a chunked body), so
    // the splits come from a hash of it: any change the fuzzer makes moves them too.
    let seed = hash(data);
    let cut = (seed % (data.len() as u64 + 1)) as usize;
    let halves = run(data, [cut, data.len() - cut].into_iter());
    assert_eq!(halves, whole, "split at {cut}");

    // Many small reads, empty ones among them: each piece ends in a state the next
    // must pick up.
    let mut rng = seed | 1;
    let sizes = std::iter::from_fn(|| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        Some((rng % (1 << (rng >> 61))) as usize)
    });
    let pieces = run(data, sizes);
    assert_eq!(pieces, whole, "fed in small pieces");
});

/// Feeds `data` in pieces of `sizes` (the last one cut to what is left), as
/// `read_body` does: until the body is done, an error, or the data runs out.
fn run(data: &[u8], sizes: impl Iterator<Item = usize>) -> Outcome {
    let mut decoder = Decoder::default();
    let mut body = Vec::new();
    let mut used = 0;
    let mut at = 0;
    for size in sizes {
        let piece = &data[at..(at + size).min(data.len())];
        at += piece.len();
        match decoder.feed(piece, &mut body) {
            Ok(n) => {
                assert!(n <= piece.len());
                assert!(
                    n == piece.len() || decoder.is_done(),
                    "used {n} of a {}-byte piece before the end",
                    piece.len()
                );
                used += n;
            }
            Err(e) => {
                return Outcome {
                    used: Err(e),
                    done: decoder.is_done(),
                    body,
                }
            }
        }
        if decoder.is_done() {
            // A done decoder takes nothing more: what follows is the next request's.
            let held = body.len();
            assert_eq!(
                decoder.feed(&data[used..], &mut body),
                Ok(0),
                "took bytes after the end"
            );
            assert_eq!(body.len(), held);
            break;
        }
        if at == data.len() {
            break;
        }
    }
    Outcome {
        used: Ok(used),
        done: decoder.is_done(),
        body,
    }
}

/// FNV-1a.
fn hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
