//! The server: one thread per connection, keep-alive, the routes, the admin
//! endpoints and the health, model and metrics documents.

use crate::*;

pub(crate) fn serve_conn(st: &State, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let reader = BufReader::with_capacity(16 * 1024, read_half);
    let mut c = Conn {
        st,
        reader,
        out: stream,
        close: false,
        head_only: false,
    };
    loop {
        match read_request(&mut c) {
            Ok(Some(req)) => {
                c.close = !req.head.keep_alive();
                c.head_only = req.head.method == "HEAD";
                if route(&mut c, &req).is_err() || c.close {
                    return;
                }
            }
            Ok(None) | Err(ReadErr::Io) => return,
            Err(ReadErr::Bad(status, msg)) => {
                (c.close, c.head_only) = (true, false);
                if c.send(&Resp::error(status, "invalid_request_error", msg))
                    .is_ok()
                {
                    c.linger();
                }
                return;
            }
        }
    }
}

pub(crate) fn read_request(c: &mut Conn) -> Result<Option<Request>, ReadErr> {
    let Some(head) = read_head(&mut c.reader)? else {
        return Ok(None);
    };
    let path = head.target.split('?').next().unwrap_or_default();
    if head.method == "GET" && path == "/v1/realtime" && head.has_token("upgrade", "websocket") {
        return Ok(Some(Request {
            head,
            body: Vec::new(),
            streamed: Some(Framing::None),
        }));
    }
    let upload = head.method == "POST" && audio::is_upload_path(path);
    let framing = if upload {
        body_framing_within(&head, audio::MAX_UPLOAD)?
    } else {
        body_framing(&head)?
    };
    // curl and others wait up to a second for this before sending a large body.
    if framing != Framing::None && !head.http10 && head.has_token("expect", "100-continue") {
        c.out.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
    }
    if upload {
        return Ok(Some(Request {
            head,
            body: Vec::new(),
            streamed: Some(framing),
        }));
    }
    let body = read_body(&mut c.reader, &framing)?;
    Ok(Some(Request {
        head,
        body,
        streamed: None,
    }))
}

pub(crate) fn route(c: &mut Conn, req: &Request) -> io::Result<()> {
    let st = c.st;
    let method = req.head.method.as_str();
    let (get, post) = (method == "GET" || method == "HEAD", method == "POST");
    let path = req.head.target.split('?').next().unwrap_or_default();
    st.count_tags(&req.head);
    let resp = match path {
        "/mock/stats" if get => Resp::json(200, &st.stats()),
        "/mock/last" if get => match st.last().as_ref() {
            Some(v) => Resp::json(200, v),
            None => Resp::error(404, "not_found_error", "no inference request recorded"),
        },
        "/mock/reset" if post => {
            st.reset();
            Resp::json(200, &json!({"status": "ok"}))
        }
        "/mock/mode" if post => set_mode(st, &req.body),
        "/health" if get => match st.mode() {
            FAIL => fail_resp(st),
            HANG => return hang(c),
            _ => Resp::json(200, &json!({"status": "ok"})),
        },
        "/v1/models" if get => models(st),
        "/v1/realtime" if req.streamed.is_some() => return realtime::serve(c, req),
        p if audio::is_upload_path(p) && req.streamed.is_some() => return audio::serve(c, req),
        "/v1/load_lora_adapter" if post => lora::load(st, &req.body),
        "/v1/unload_lora_adapter" if post => lora::unload(st, &req.body),
        "/v1/responses" if post => return responses::create(c, req),
        p if p.starts_with("/v1/responses/") => responses::stored(st, method, p),
        "/metrics" if get => metrics(st),
        "/mock/stats" | "/mock/last" | "/health" | "/v1/models" | "/metrics" => {
            Resp::not_allowed("GET, HEAD")
        }
        "/mock/reset" | "/mock/mode" => Resp::not_allowed("POST"),
        p if p.starts_with("/v1/") || p == "/tokenize" || p == "/detokenize" => match post {
            true => return inference(c, req, p),
            false => Resp::not_allowed("POST"),
        },
        _ => Resp::error(404, "not_found_error", &format!("no route for {path}")),
    };
    c.send(&resp)
}

pub(crate) fn set_mode(st: &State, body: &[u8]) -> Resp {
    let v: Value = serde_json::from_slice(body).unwrap_or_default();
    match v.get("mode").and_then(Value::as_str).and_then(mode_of) {
        Some(m) => {
            st.mode.store(m, SeqCst);
            Resp::json(200, &json!({"mode": MODES[m as usize]}))
        }
        None => Resp::invalid(r#"body must be {"mode":"ok"|"fail"|"hang"}"#),
    }
}

pub(crate) fn fail_resp(st: &State) -> Resp {
    let msg = format!("mock backend {} is in fail mode", st.id);
    Resp::error(st.cfg.fail_status, "mock_error", &msg)
}

/// Holds the connection open without answering until the peer gives up, which
/// is what a wedged vLLM looks like to the router.
pub(crate) fn hang(c: &mut Conn) -> io::Result<()> {
    let mut sink = [0u8; 4096];
    loop {
        match c.reader.read(&mut sink) {
            Ok(0) => return Err(io::ErrorKind::ConnectionAborted.into()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

pub(crate) fn models(st: &State) -> Resp {
    st.model_reads.fetch_add(1, SeqCst);
    let created = now().as_secs();
    let model =
        |m| json!({"id": m, "object": "model", "created": created, "owned_by": "mock-vllm"});
    let mut data: Vec<Value> = st.cfg.models.iter().map(model).collect();
    // Adapters as vLLM lists them: their own id, the base model as `parent`.
    data.extend(st.adapters().iter().map(|(name, path)| {
        json!({"id": name, "object": "model", "created": created, "owned_by": "vllm",
               "root": path, "parent": st.default_model()})
    }));
    Resp::json(200, &json!({"object": "list", "data": data}))
}

pub(crate) const GAUGES: [(&str, &str); 3] = [
    ("num_requests_running", "Requests running on the engine."),
    ("num_requests_waiting", "Requests waiting to be scheduled."),
    (
        "kv_cache_usage_perc",
        "KV-cache usage, 1 means 100 percent.",
    ),
];

pub(crate) fn metrics(st: &State) -> Resp {
    let running = st.in_flight.load(SeqCst);
    let kv = format!("{:.4}", (running as f64 / 100.0).min(1.0));
    let values = [running.to_string(), "0".to_string(), kv];
    let mut text = String::new();
    for ((name, help), value) in GAUGES.iter().zip(values) {
        text += &format!("# HELP vllm:{name} {help}\n# TYPE vllm:{name} gauge\n");
        for m in &st.cfg.models {
            text += &format!("vllm:{name}{{model_name=\"{}\"}} {value}\n", label(m));
        }
    }
    let (queries, hits) = st.prefix.counters();
    let counters = [
        (
            "prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            queries,
        ),
        (
            "prefix_cache_hits",
            "Prompt tokens found in the prefix cache.",
            hits,
        ),
    ];
    for (name, help, value) in counters {
        text += &format!("# HELP vllm:{name} {help}\n# TYPE vllm:{name} counter\n");
        for m in &st.cfg.models {
            // Counted once for the process: the first model carries it.
            let n = if *m == st.cfg.models[0] { value } else { 0 };
            text += &format!("vllm:{name}_total{{model_name=\"{}\"}} {n}\n", label(m));
        }
    }
    let mut r = Resp::json(200, &Value::Null);
    (r.ctype, r.body) = (
        "text/plain; version=0.0.4; charset=utf-8",
        text.into_bytes(),
    );
    r
}

/// A model name as a Prometheus label value.
fn label(m: &str) -> String {
    m.replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', r"\n")
}
