//! `/v1/audio/transcriptions` and `/v1/audio/translations`: a multipart form read as
//! it streams (never held whole, so a 64 MiB upload costs the mock little too), its
//! parts checked as vLLM checks them (a `file` and a `model`), and a reply that says
//! what arrived: the fields, the file's size and FNV-1a hash, so a test can tell the
//! router passed every byte unchanged. With the form field `stream=true` the reply is
//! a stream of `transcript.text.delta` events and a `transcript.text.done`, one
//! `--delay-ms` apart, as OpenAI's SDK reads them.

use crate::*;

/// The largest upload read (the router's `max_body_bytes` is what the tests probe).
pub(crate) const MAX_UPLOAD: u64 = 1 << 30;

pub(crate) fn is_upload_path(path: &str) -> bool {
    matches!(path, "/v1/audio/transcriptions" | "/v1/audio/translations")
}

/// What a form held.
#[derive(Default)]
struct Form {
    /// Field names in the order the parts came.
    order: Vec<String>,
    fields: BTreeMap<String, String>,
    file_name: Option<String>,
    file_bytes: u64,
    file_fnv: u64,
}

pub(crate) fn serve(c: &mut Conn, req: &Request) -> io::Result<()> {
    let st = c.st;
    let guard = InFlight::start(st);
    st.count_tags(&req.head);
    let boundary = req
        .head
        .header("content-type")
        .and_then(|ct| {
            ct.split(';')
                .find_map(|p| p.trim().strip_prefix("boundary="))
        })
        .map(|b| b.trim_matches('"').to_owned());
    let Some(boundary) = boundary else {
        c.close = true;
        return finish(
            c,
            guard,
            &Resp::invalid("expected a multipart/form-data body"),
        );
    };
    let parsed = match req.streamed {
        Some(Framing::Length(n)) => parse(&mut Read::take(&mut c.reader, n as u64), &boundary),
        Some(Framing::Chunked) => parse(&mut ChunkedReader::new(&mut c.reader), &boundary),
        _ => Err("the form has no body".to_owned()),
    };
    let form = match parsed {
        Ok(form) => form,
        Err(msg) => {
            c.close = true;
            return finish(c, guard, &Resp::invalid(&msg));
        }
    };
    *st.last() = Some(json!({
        "method": req.head.method, "path": req.head.target,
        "headers": req.head.headers.iter().map(|(n, v)| [n, v]).collect::<Vec<_>>(),
        "order": form.order, "fields": form.fields,
        "file_name": form.file_name, "file_bytes": form.file_bytes,
        "file_fnv": format!("{:016x}", form.file_fnv),
    }));
    let Some(model) = form.fields.get("model") else {
        return finish(
            c,
            guard,
            &Resp::error(400, "invalid_request_error", "field required: model"),
        );
    };
    if form.file_name.is_none() {
        return finish(
            c,
            guard,
            &Resp::error(400, "invalid_request_error", "field required: file"),
        );
    }
    let text = format!("heard {} bytes", form.file_bytes);
    let summary = json!({
        "text": text, "backend": st.id, "model": model, "file_bytes": form.file_bytes,
        "file_fnv": format!("{:016x}", form.file_fnv), "fields": form.fields,
        "usage": {"type": "duration", "seconds": 1},
    });
    if form.fields.get("stream").map(String::as_str) != Some("true") {
        return finish(c, guard, &Resp::json(200, &summary));
    }
    let head = c.sse_head();
    c.out.write_all(&head)?;
    let words: Vec<&str> = text.split(' ').collect();
    for (i, word) in words.iter().enumerate() {
        thread::sleep(Duration::from_millis(st.cfg.delay_ms));
        let delta = if i == 0 {
            word.to_string()
        } else {
            format!(" {word}")
        };
        let ev = json!({"type": "transcript.text.delta", "delta": delta, "sent_us": now().as_micros() as u64});
        c.out.write_all(&sse_chunk(&format!("data: {ev}\n\n")))?;
    }
    let done = json!({"type": "transcript.text.done", "text": text, "backend": st.id,
                      "file_bytes": form.file_bytes, "file_fnv": format!("{:016x}", form.file_fnv)});
    drop(guard);
    let mut tail = sse_chunk(&format!("data: {done}\n\n"));
    tail.extend_from_slice(&sse_chunk("data: [DONE]\n\n"));
    tail.extend_from_slice(b"0\r\n\r\n");
    c.out.write_all(&tail)
}

/// Reads a whole multipart body from `r`, holding at most one read and a field's value.
fn parse(r: &mut impl Read, boundary: &str) -> Result<Form, String> {
    const FNV_OFFSET: u64 = 0xcbf29ce484222325;
    let delimiter = format!("\r\n--{boundary}").into_bytes();
    let mut form = Form {
        file_fnv: FNV_OFFSET,
        ..Form::default()
    };
    // The body starts with the delimiter minus its CRLF.
    let mut buf: Vec<u8> = b"\r\n".to_vec();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut ended = false;
    enum At {
        Preamble,
        AfterDelimiter,
        Headers,
        Content {
            name: String,
            file: bool,
            value: Vec<u8>,
        },
    }
    let mut at = At::Preamble;
    let find = |h: &[u8], n: &[u8]| h.windows(n.len()).position(|w| w == n);
    loop {
        let progressed = match &mut at {
            At::Preamble => match find(&buf, &delimiter) {
                Some(i) => {
                    buf.drain(..i + delimiter.len());
                    at = At::AfterDelimiter;
                    true
                }
                None => false,
            },
            At::AfterDelimiter if buf.len() >= 2 => {
                if buf.starts_with(b"--") {
                    return Ok(form);
                }
                if !buf.starts_with(b"\r\n") {
                    return Err("malformed multipart delimiter line".into());
                }
                buf.drain(..2);
                at = At::Headers;
                true
            }
            At::AfterDelimiter => false,
            At::Headers => match find(&buf, b"\r\n\r\n") {
                Some(i) => {
                    let head = String::from_utf8_lossy(&buf[..i]).into_owned();
                    buf.drain(..i + 4);
                    let mut name = String::new();
                    let mut file = false;
                    for line in head.split("\r\n") {
                        let lower = line.to_ascii_lowercase();
                        if lower.starts_with("content-disposition:") {
                            for param in line.split(';').skip(1) {
                                if let Some((k, v)) = param.split_once('=') {
                                    let v = v.trim().trim_matches('"').to_owned();
                                    match k.trim() {
                                        "name" => name = v,
                                        "filename" => {
                                            file = true;
                                            form.file_name = Some(v);
                                        }
                                        _ => {}
                                    }
                                }
                            }
                        }
                    }
                    form.order.push(name.clone());
                    at = At::Content {
                        name,
                        file,
                        value: Vec::new(),
                    };
                    true
                }
                None if buf.len() > 16 * 1024 => return Err("part headers too large".into()),
                None => false,
            },
            At::Content { name, file, value } => {
                let (take, found) = match find(&buf, &delimiter) {
                    Some(i) => (i, true),
                    None => (buf.len().saturating_sub(delimiter.len() - 1), false),
                };
                let content = &buf[..take];
                if *file {
                    form.file_bytes += content.len() as u64;
                    for &b in content {
                        form.file_fnv = (form.file_fnv ^ u64::from(b)).wrapping_mul(0x100000001b3);
                    }
                } else if value.len() + content.len() <= 64 * 1024 {
                    value.extend_from_slice(content);
                }
                if found {
                    buf.drain(..take + delimiter.len());
                    if !*file {
                        let v = String::from_utf8_lossy(value).into_owned();
                        form.fields.insert(std::mem::take(name), v);
                    }
                    at = At::AfterDelimiter;
                } else {
                    buf.drain(..take);
                }
                found
            }
        };
        if progressed {
            continue;
        }
        if ended {
            return Err("the form ended before its closing delimiter".into());
        }
        let n = r
            .read(&mut chunk)
            .map_err(|e| format!("cannot read the form: {e}"))?;
        if n == 0 {
            ended = true;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}
