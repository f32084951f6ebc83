//! The inference endpoints: completions and chat completions as JSON or SSE, the
//! `x-mock-*` hooks, delays, and noticing a client that left mid-generation.

use crate::*;

/// Test hooks carried in `x-mock-*` request headers.
pub(crate) struct Hooks {
    pub(crate) tokens: Option<u64>,
    pub(crate) delay_ms: u64,
    pub(crate) first_byte_ms: u64,
    /// Delay from the head to the first token of a stream, instead of `delay_ms`.
    pub(crate) first_token_ms: Option<u64>,
    /// Open a chat stream with a role-only chunk, as vLLM does.
    pub(crate) role_chunk: bool,
    pub(crate) status: Option<u16>,
}

pub(crate) fn hooks(head: &Head, st: &State) -> Result<Hooks, String> {
    let num = |name: &str| match head.header(name).map(|v| (v, v.trim().parse::<u64>())) {
        None => Ok(None),
        Some((_, Ok(n))) => Ok(Some(n.min(MAX_DELAY_MS))),
        Some((v, Err(_))) => Err(format!("invalid {name}: {v:?}")),
    };
    let status = match head.header("x-mock-status") {
        None => None,
        Some(v) => Some(parse_status(v).ok_or(format!("invalid x-mock-status {v:?}"))?),
    };
    Ok(Hooks {
        tokens: num("x-mock-tokens")?.map(|n| n.min(MAX_TOKENS)),
        delay_ms: num("x-mock-delay-ms")?.unwrap_or(st.cfg.delay_ms),
        first_byte_ms: num("x-mock-first-byte-delay-ms")?.unwrap_or(0),
        first_token_ms: num("x-mock-first-token-ms")?.or(st.cfg.first_token_ms),
        role_chunk: head
            .header("x-mock-role-chunk")
            .is_some_and(|v| v.trim() == "1"),
        status,
    })
}

/// One generation: what both the JSON and the SSE replies are built from.
pub(crate) struct Gen {
    pub(crate) chat: bool,
    pub(crate) rid: String,
    pub(crate) model: String,
    pub(crate) created: u64,
    pub(crate) n: u64,
    pub(crate) delay: Duration,
    /// The prefill of the prompt's uncached part, before the first token.
    pub(crate) prefill: Duration,
    pub(crate) first_delay: Duration,
    pub(crate) role_chunk: bool,
    /// `length` when `max_tokens` ended the generation, else `stop`.
    pub(crate) finish: &'static str,
    /// Prompt tokens, when the stream ends with a usage event (`stream_options.include_usage`).
    pub(crate) usage: Option<u64>,
}

impl Gen {
    /// `object` and `choices[0]` shaped as vLLM shapes them for this endpoint.
    /// `last` is the stream's last token, which carries the finish reason (a JSON reply
    /// always does).
    pub(crate) fn choice(&self, text: String, stream: bool, last: bool) -> (&'static str, Value) {
        let finish = if stream && !last {
            Value::Null
        } else {
            json!(self.finish)
        };
        let (object, mut choice) = match (self.chat, stream) {
            (true, false) => (
                "chat.completion",
                json!({"message": {"role": "assistant", "content": text}}),
            ),
            (true, true) => ("chat.completion.chunk", json!({"delta": {"content": text}})),
            (false, _) => ("text_completion", json!({"text": text, "logprobs": null})),
        };
        choice["index"] = json!(0);
        choice["finish_reason"] = finish;
        (object, choice)
    }
}

/// Drops the in-flight guard before the last write, so a client that has read
/// the whole reply never finds its request still counted in `/mock/stats`.
/// Waits `total`, looking every 20 ms whether the client has closed the connection;
/// false if it has.
pub(crate) fn generate_while_connected(stream: &TcpStream, total: Duration) -> bool {
    let deadline = std::time::Instant::now() + total;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return true;
        }
        thread::sleep(left.min(Duration::from_millis(20)));
        if stream.set_nonblocking(true).is_err() {
            return true;
        }
        // End of stream (0) is a client gone; bytes or "would block" are one still there.
        let closed = matches!(stream.peek(&mut [0u8; 1]), Ok(0));
        let _ = stream.set_nonblocking(false);
        if closed {
            return false;
        }
    }
}

pub(crate) fn finish(c: &mut Conn, guard: InFlight, r: &Resp) -> io::Result<()> {
    drop(guard);
    c.send(r)
}

pub(crate) fn inference(c: &mut Conn, req: &Request, path: &str) -> io::Result<()> {
    let st = c.st;
    let guard = InFlight::start(st);
    st.record(req);
    let mode = st.mode();
    if mode == HANG {
        return hang(c);
    }
    let h = match hooks(&req.head, st) {
        Ok(h) => h,
        Err(msg) => return finish(c, guard, &Resp::invalid(&msg)),
    };
    thread::sleep(Duration::from_millis(h.first_byte_ms));
    if mode == FAIL {
        return finish(c, guard, &fail_resp(st));
    }
    if let Some(s) = h.status {
        let msg = format!("mock forced status {s}");
        return finish(c, guard, &Resp::error(s, "mock_error", &msg));
    }
    let seq = st.seq.fetch_add(1, SeqCst);
    let chat = match path {
        "/v1/chat/completions" => true,
        "/v1/completions" => false,
        _ => return finish(c, guard, &echo(st, req, seq)),
    };
    let Ok(body @ Value::Object(_)) = serde_json::from_slice::<Value>(&req.body) else {
        return finish(
            c,
            guard,
            &Resp::invalid("request body must be a JSON object"),
        );
    };
    let max_tokens = body
        .get("max_tokens")
        .or_else(|| body.get("max_completion_tokens"));
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or(st.default_model());
    let kind = if chat { "chatcmpl" } else { "cmpl" };
    let by_max_tokens = h.tokens.is_none() && max_tokens.and_then(Value::as_u64).is_some();
    let include_usage = body
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let g = Gen {
        chat,
        rid: format!("{kind}-{}-{seq}", st.id),
        model: model.to_string(),
        created: now().as_secs(),
        n: h.tokens
            .or(max_tokens.and_then(Value::as_u64))
            .unwrap_or(st.cfg.tokens)
            .min(MAX_TOKENS),
        delay: Duration::from_millis(h.delay_ms),
        prefill: st.prefix.prefill(chat, &body),
        first_delay: Duration::from_millis(h.first_token_ms.unwrap_or(h.delay_ms)),
        role_chunk: h.role_chunk && chat,
        finish: if by_max_tokens { "length" } else { "stop" },
        usage: include_usage.then_some(req.body.len() as u64 / 4),
    };
    if body.get("stream").and_then(Value::as_bool).unwrap_or(false) {
        return stream(c, guard, &g);
    }
    // Like vLLM, a non-streamed generation stops when its client goes away.
    if !generate_while_connected(&c.out, g.prefill + g.delay.saturating_mul(g.n as u32)) {
        st.aborted.fetch_add(1, SeqCst);
        return Err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "client left",
        ));
    }
    finish(c, guard, &completion(st, &g, req.body.len() as u64 / 4))
}

pub(crate) fn echo(st: &State, req: &Request, seq: u64) -> Resp {
    let text = || Value::String(String::from_utf8_lossy(&req.body).into_owned());
    let request: Value = serde_json::from_slice(&req.body).unwrap_or_else(|_| text());
    let model = request
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or(st.default_model());
    let v = json!({
        "id": format!("echo-{}-{seq}", st.id),
        "object": "mock.echo",
        "backend": st.id,
        "path": req.head.target,
        "model": model,
        "request": request,
    });
    Resp::json(200, &v)
}

/// `prompt` is a rough token estimate (body bytes / 4), enough for a plausible `usage`.
pub(crate) fn completion(st: &State, g: &Gen, prompt: u64) -> Resp {
    let text = (0..g.n)
        .map(|i| format!("tok{i}"))
        .collect::<Vec<_>>()
        .join(" ");
    let (object, choice) = g.choice(text, false, true);
    let v = json!({
        "id": g.rid,
        "object": object,
        "created": g.created,
        "model": g.model,
        "backend": st.id,
        "choices": [choice],
        "usage": {"prompt_tokens": prompt, "completion_tokens": g.n, "total_tokens": prompt + g.n},
    });
    Resp::json(200, &v)
}

pub(crate) fn sse_chunk(data: &str) -> Vec<u8> {
    format!("{:x}\r\n{data}\r\n", data.len()).into_bytes()
}

pub(crate) fn stream(c: &mut Conn, guard: InFlight, g: &Gen) -> io::Result<()> {
    let st = c.st;
    let aborted = |e: io::Error| {
        st.aborted.fetch_add(1, SeqCst);
        e
    };
    let head = c.sse_head();
    c.out.write_all(&head).map_err(aborted)?;
    thread::sleep(g.prefill);
    let event = |choices: Value| {
        json!({
            "id": g.rid,
            "object": "chat.completion.chunk",
            "created": g.created,
            "model": g.model,
            "backend": st.id,
            "sent_us": now().as_micros() as u64,
            "choices": choices,
        })
    };
    if g.role_chunk {
        let role = json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]);
        c.out
            .write_all(&sse_chunk(&format!("data: {}\n\n", event(role))))
            .map_err(aborted)?;
    }
    for i in 0..g.n {
        // Delay before each token: the head goes out at once, token 0 after the first
        // delay, token i at about first + i * delay.
        thread::sleep(if i == 0 { g.first_delay } else { g.delay });
        let (object, choice) = g.choice(format!("tok{i} "), true, i + 1 == g.n);
        let ev = json!({
            "id": g.rid,
            "object": object,
            "created": g.created,
            "model": g.model,
            "backend": st.id,
            "index": i,
            "sent_us": now().as_micros() as u64,
            "choices": [choice],
        });
        // One write per event; with nodelay each event is its own chunk and packet.
        c.out
            .write_all(&sse_chunk(&format!("data: {ev}\n\n")))
            .map_err(aborted)?;
    }
    if let Some(prompt) = g.usage {
        let mut usage = event(json!([]));
        usage["object"] = json!(if g.chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        });
        usage["usage"] = json!({"prompt_tokens": prompt, "completion_tokens": g.n, "total_tokens": prompt + g.n});
        c.out
            .write_all(&sse_chunk(&format!("data: {usage}\n\n")))
            .map_err(aborted)?;
    }
    drop(guard);
    let mut tail = sse_chunk("data: [DONE]\n\n");
    tail.extend_from_slice(b"0\r\n\r\n");
    c.out.write_all(&tail).map_err(aborted)
}
