//! W3C Trace Context (`traceparent`, `tracestate`) across the router, so that a
//! client's trace and vLLM's OpenTelemetry spans connect.
//!
//! The router does not take part in the trace: a valid `traceparent` from the client
//! goes to the backend unchanged, with its `tracestate` (both cross as ordinary
//! headers, `request::headers`). When there is none, or it cannot be parsed (which the
//! specification says to treat as none, `tracestate` included), the router starts a
//! trace for the request: version 00, random trace and span ids, sampled. Either way
//! the trace id goes in the access-log entry, beside the request id.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// The trace a request belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    /// 32 lowercase hex digits.
    pub trace_id: String,
    /// The `traceparent` the router made, when the client sent none it could use;
    /// `None` when the client's goes on unchanged.
    started: Option<String>,
}

impl Trace {
    /// The client's trace, from the request's headers, or a new one.
    pub fn of_request(headers: &[(String, String)]) -> Trace {
        let mut parents = headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(TRACEPARENT));
        // Two `traceparent` fields cannot be told apart: neither is used.
        let client = match (parents.next(), parents.next()) {
            (Some((_, value)), None) => parse_trace_id(value),
            _ => None,
        };
        match client {
            Some(trace_id) => Trace {
                trace_id: trace_id.to_owned(),
                started: None,
            },
            None => {
                let [a, b, c] = random_u64s();
                let trace_id = format!("{a:016x}{b:016x}");
                let started = format!("00-{trace_id}-{c:016x}-01");
                Trace {
                    trace_id,
                    started: Some(started),
                }
            }
        }
    }

    /// Puts the trace on the headers towards the backend: the client's stay as they
    /// are; a trace the router started replaces whatever unusable fields came.
    pub fn apply(&self, headers: &mut Vec<(String, String)>) {
        if let Some(parent) = &self.started {
            headers.retain(|(n, _)| {
                !n.eq_ignore_ascii_case(TRACEPARENT) && !n.eq_ignore_ascii_case(TRACESTATE)
            });
            headers.push((TRACEPARENT.to_owned(), parent.clone()));
        }
    }
}

/// The trace id of a valid `traceparent`: `version-traceid-parentid-flags` in lowercase
/// hex, version not `ff`, ids not all zeros. Version 00 is exactly that; a later
/// version may append fields after a `-`, and is read as 00 (as the specification
/// asks).
fn parse_trace_id(value: &str) -> Option<&str> {
    let v = value.trim_matches([' ', '\t']);
    let hex = |s: &str| s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let zeros = |s: &str| s.bytes().all(|b| b == b'0');
    // Only ASCII can be valid, and slicing by byte is then safe.
    if v.len() < 55 || !v.is_ascii() {
        return None;
    }
    let (head, rest) = v.split_at(55);
    let version = &head[..2];
    if !hex(version) || version == "ff" || (version == "00" && !rest.is_empty()) {
        return None;
    }
    if !rest.is_empty() && !rest.starts_with('-') {
        return None;
    }
    let dashes = [2, 35, 52].iter().all(|&i| head.as_bytes()[i] == b'-');
    let (trace_id, parent_id, flags) = (&head[3..35], &head[36..52], &head[53..55]);
    (dashes
        && hex(trace_id)
        && hex(parent_id)
        && hex(flags)
        && !zeros(trace_id)
        && !zeros(parent_id))
    .then_some(trace_id)
}

/// Three random numbers from the kernel; should it refuse, numbers that still differ
/// between requests and processes.
fn random_u64s() -> [u64; 3] {
    let mut buf = [0u8; 24];
    if !fill_random(&mut buf) {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let seed = now ^ (u64::from(std::process::id()) << 32) ^ n.rotate_left(17);
        let mix = |x: u64| {
            // splitmix64
            let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        return [mix(seed), mix(seed ^ 1), mix(seed ^ 2)].map(|x| x | 1);
    }
    let word = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&buf[i * 8..i * 8 + 8]);
        // An id of all zeros is invalid; one set bit costs nothing.
        u64::from_ne_bytes(w) | 1
    };
    [word(0), word(1), word(2)]
}

/// The getrandom(2) system call itself, not libc's wrapper: the musl of the static build
/// resolved `libc::getrandom` to a null symbol, and the first traced request crashed it.
#[allow(unsafe_code)] // getrandom(2): the kernel's random bytes, without a crate for it
fn fill_random(buf: &mut [u8]) -> bool {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: the pointer and length describe `rest`, which stays borrowed for the
        // call; flags 0 blocks only until the pool is first initialised at boot.
        let n = unsafe {
            libc::syscall(
                libc::SYS_getrandom,
                rest.as_mut_ptr().cast::<libc::c_void>(),
                rest.len(),
                0,
            )
        };
        if n <= 0 {
            if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        filled += n as usize;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_and_its_tracestate_go_on_unchanged() {
        let h = headers(&[("TraceParent", VALID), ("tracestate", "a=1,b=2")]);
        let trace = Trace::of_request(&h);
        assert_eq!(trace.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        let mut up = h.clone();
        trace.apply(&mut up);
        assert_eq!(up, h);
    }

    #[test]
    fn without_a_usable_traceparent_the_router_starts_a_sampled_one() {
        let bad = [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473é-00f067aa0ba902b7-0",
        ];
        for value in bad {
            let h = headers(&[("traceparent", value), ("tracestate", "a=1")]);
            let trace = Trace::of_request(&h);
            let mut up = h.clone();
            trace.apply(&mut up);
            assert_eq!(up.len(), 1, "{value:?}: {up:?}");
            let (name, parent) = &up[0];
            assert_eq!(name, TRACEPARENT);
            assert_eq!(
                parse_trace_id(parent),
                Some(trace.trace_id.as_str()),
                "{parent}"
            );
            assert!(
                parent.starts_with("00-") && parent.ends_with("-01"),
                "{parent}"
            );
        }
        let twice = headers(&[("traceparent", VALID), ("traceparent", VALID)]);
        assert_ne!(
            Trace::of_request(&twice).trace_id,
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
    }

    #[test]
    fn a_later_version_with_more_fields_is_read_and_new_ids_differ() {
        let v = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes";
        assert_eq!(parse_trace_id(v), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        let a = Trace::of_request(&[]);
        let b = Trace::of_request(&[]);
        assert_ne!(a.trace_id, b.trace_id);
        assert_eq!(a.trace_id.len(), 32);
    }
}
