//! Multipart uploads (`multipart/form-data`: `/v1/audio/transcriptions`,
//! `/v1/audio/translations`), streamed to the backend as they arrive instead of read
//! whole first: a 64 MiB audio file costs the router a few reads' worth of memory.
//! `max_body_bytes` still caps the size (413, before reading when the length is
//! declared).
//!
//! The request is routed by its `model` form field when that part comes before the
//! file: the start of the body is read (at most `LOOKAHEAD`) up to the first part
//! that carries a file, and the `model` part's value is taken from there; those bytes
//! go to the backend first, then the rest as it comes. A `model` after the file is not
//! used for routing (reading on to it would mean holding the file); the `model`
//! query parameter then routes, as on every path, or else any backend serves it.
//!
//! Once body bytes past the look-ahead have gone to a backend the request cannot be
//! sent elsewhere; before that (a backend that refuses connections) it can, as any
//! request. The reply (a JSON transcription, or a stream of events) is relayed as any
//! (`relay::deliver`).

use std::io::Read;

use crate::client::body_stream::BodyStream;
use crate::client::head::Head;
use crate::client::request::{BodyLimits, Request};
use crate::control::config::Config;
use crate::request::access::Access;
use crate::request::error::RouterError;
use crate::request::exchange::Exchange;
use crate::request::queue::Want;
use crate::request::{query, relay};
use crate::shared::Shared;

/// How much of a multipart body is read before it is sent, looking for the `model`.
pub const LOOKAHEAD: usize = 64 * 1024;

/// The boundary of a `multipart/form-data` POST, which is streamed.
pub fn boundary(head: &Head) -> Option<String> {
    if head.method != "POST" || !head.has_body() {
        return None;
    }
    let content_type = head.header("content-type")?;
    let mut params = content_type.split(';');
    let media = params.next()?.trim();
    if !media.eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    params
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("boundary"))
        .map(|(_, v)| v.trim().trim_matches('"').to_owned())
        .filter(|b| !b.is_empty() && b.len() <= 70)
}

/// What the start of a multipart body says about routing.
#[derive(Debug, PartialEq, Eq)]
enum Scan {
    /// More bytes are needed to tell.
    More,
    /// Decided: the `model` field's value, if it came before any file.
    Model(Option<String>),
}

/// Looks for the `model` field in `buf`, the start of a multipart body.
fn scan(boundary: &str, buf: &[u8]) -> Scan {
    let delimiter = format!("--{boundary}");
    let delimiter = delimiter.as_bytes();
    let Some(first) = find(buf, delimiter) else {
        return Scan::More;
    };
    let mut at = first + delimiter.len();
    loop {
        let rest = &buf[at..];
        if rest.len() < 2 {
            return Scan::More;
        }
        if rest.starts_with(b"--") {
            return Scan::Model(None); // the end, without a model
        }
        let Some(head_end) = find(rest, b"\r\n\r\n") else {
            return Scan::More;
        };
        let part_head = String::from_utf8_lossy(&rest[..head_end]);
        let (name, is_file) = disposition(&part_head);
        if is_file {
            return Scan::Model(None);
        }
        let content = &rest[head_end + 4..];
        let mut end_marker = b"\r\n".to_vec();
        end_marker.extend_from_slice(delimiter);
        let Some(end) = find(content, &end_marker) else {
            return Scan::More;
        };
        if name.as_deref() == Some("model") {
            let value = String::from_utf8_lossy(&content[..end]).trim().to_owned();
            return Scan::Model(Some(value).filter(|v| !v.is_empty()));
        }
        at += head_end + 4 + end + end_marker.len();
    }
}

/// A part's field name, and whether it is a file (it has a `filename`, or a
/// `Content-Type` of its own).
fn disposition(part_head: &str) -> (Option<String>, bool) {
    let mut name = None;
    let mut is_file = false;
    for line in part_head.split("\r\n") {
        let Some((field, value)) = line.split_once(':') else {
            continue;
        };
        let field = field.trim();
        if field.eq_ignore_ascii_case("content-type") {
            is_file = true;
        }
        if !field.eq_ignore_ascii_case("content-disposition") {
            continue;
        }
        for param in value.split(';').skip(1) {
            let Some((key, v)) = param.split_once('=') else {
                continue;
            };
            let v = v.trim().trim_matches('"').to_owned();
            match key.trim().to_ascii_lowercase().as_str() {
                "name" => name = Some(v),
                "filename" | "filename*" => is_file = true,
                _ => {}
            }
        }
    }
    (name, is_file)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Serves a multipart upload: the look-ahead, admission, the streamed send, the
/// reply. `headers` are the request's upstream headers.
pub(crate) fn serve(
    request: &mut Request,
    shared: &Shared,
    config: &Config,
    headers: &[(String, String)],
    boundary: &str,
    access: &mut Access,
) -> Result<(), RouterError> {
    let settings = &config.settings;
    let limits = BodyLimits {
        max_bytes: settings.max_body_bytes,
        budget: settings.max_buffered_body_bytes,
        timeout: settings.client_body_timeout,
    };
    let method = request.head.method.clone();
    let target = request.head.target.clone();
    let declared = match request.head.framing {
        crate::client::head::Framing::Length(n) => Some(n),
        _ => None,
    };
    let ticket = request.ticket().clone();
    let mut stream = BodyStream::start(request, limits)?;
    // The look-ahead: up to the first file part, at most `LOOKAHEAD`.
    let mut prefix = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; 4096];
    let form_model = loop {
        match scan(boundary, &prefix) {
            Scan::Model(model) => break model,
            Scan::More if prefix.len() >= LOOKAHEAD || stream.is_done() => break None,
            Scan::More => {}
        }
        let want = chunk.len().min(LOOKAHEAD - prefix.len());
        match stream.read(&mut chunk[..want]) {
            Ok(0) => break None,
            Ok(n) => prefix.extend_from_slice(&chunk[..n]),
            Err(_) => return Err(stream.failure.take().unwrap_or(RouterError::ClientClosed)),
        }
    };
    access.model = form_model.or_else(|| query::param(&target, "model"));
    relay::learn_model(shared, config, access.model.as_deref());
    let exchange = Exchange {
        shared,
        config,
        ticket,
        method: &method,
        target: &target,
        headers,
        body: &[],
    };
    let mut want = Want {
        model: access.model.clone(),
        exclude: Vec::new(),
        route: None,
    };
    let looked_ahead = prefix.len() as u64;
    let (slot, response) = loop {
        let slot = exchange.admit(want.clone())?;
        let mut body = std::io::Cursor::new(&prefix[..]).chain(&mut stream);
        let result = exchange.send_streamed(&slot, &mut body, declared);
        let body_failure = stream.failure.take();
        match result {
            Ok(response) => break (slot, response),
            Err(failure) => {
                if let Some(err) = body_failure {
                    // The client's body broke (too large, too slow, cut): its error.
                    return Err(err);
                }
                if exchange.ticket.client_left() {
                    access.backend = Some(slot.backend_url().to_owned());
                    return Err(RouterError::ClientClosed);
                }
                if failure.backend_fault {
                    log::info!("backend {} failed: {}", slot.backend_url(), failure.err);
                    exchange.record_failure(&slot, &failure.err.to_string());
                }
                want.exclude.push(slot.backend_id());
                let replayable = failure.before_send && stream.taken == looked_ahead;
                if !replayable
                    || access.retries >= settings.max_retries
                    || !shared.table.can_serve(&want)
                {
                    access.backend = Some(slot.backend_url().to_owned());
                    return Err(failure.err);
                }
                access.retries += 1;
                drop(slot);
                std::thread::sleep(settings.retry_delay);
            }
        }
    };
    drop(stream);
    relay::deliver(request, &exchange, &slot, response, access, None);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(parts: &[(&str, Option<&str>, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, filename, content) in parts {
            out.extend_from_slice(b"--XyZ\r\n");
            let file = filename.map_or(String::new(), |f| format!("; filename=\"{f}\""));
            out.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"{file}\r\n").as_bytes(),
            );
            if filename.is_some() {
                out.extend_from_slice(b"Content-Type: audio/wav\r\n");
            }
            out.extend_from_slice(format!("\r\n{content}\r\n").as_bytes());
        }
        out.extend_from_slice(b"--XyZ--\r\n");
        out
    }

    #[test]
    fn the_model_before_the_file_routes() {
        let b = body(&[
            ("language", None, "en"),
            ("model", None, "whisper-1"),
            ("file", Some("a.wav"), "RIFF"),
        ]);
        assert_eq!(scan("XyZ", &b), Scan::Model(Some("whisper-1".into())));
        // Any cut before the model's end needs more.
        let end = find(&b, b"whisper-1").expect("there") + "whisper-1\r\n--XyZ".len();
        for cut in 0..end - 1 {
            assert_eq!(scan("XyZ", &b[..cut]), Scan::More, "cut at {cut}");
        }
    }

    #[test]
    fn a_model_after_the_file_does_not() {
        let b = body(&[
            ("file", Some("a.wav"), "RIFF...."),
            ("model", None, "whisper-1"),
        ]);
        assert_eq!(scan("XyZ", &b), Scan::Model(None));
        let b = body(&[("prompt", None, "hello")]);
        assert_eq!(scan("XyZ", &b), Scan::Model(None), "no model at all");
    }

    #[test]
    fn the_boundary_comes_from_the_content_type() {
        let head = |ct: &str| {
            let raw = format!("POST /v1/audio/transcriptions HTTP/1.1\r\nHost: a\r\nContent-Type: {ct}\r\nContent-Length: 1\r\n\r\nx");
            crate::client::request::message_end(raw.as_bytes(), 65536)
                .expect("valid")
                .map(|(h, _)| h)
                .expect("whole")
        };
        assert_eq!(
            boundary(&head("multipart/form-data; boundary=abc")).as_deref(),
            Some("abc")
        );
        assert_eq!(
            boundary(&head("Multipart/Form-Data; charset=x; boundary=\"a b\"")).as_deref(),
            Some("a b")
        );
        assert_eq!(boundary(&head("application/json")), None);
        assert_eq!(boundary(&head("multipart/form-data")), None);
    }
}
