//! The Responses API's stored responses, kept in this server's memory as vLLM keeps
//! them: `POST /v1/responses` creates one (JSON, or a stream of events opening with
//! `response.created`), `GET /v1/responses/{id}` reads it, `DELETE` removes it, `POST
//! /v1/responses/{id}/cancel` cancels it, and a create with `previous_response_id`
//! continues one this server has (404 otherwise, as vLLM answers). A stream's events come
//! `--delay-ms` apart.

use crate::*;

fn not_found(id: &str) -> Resp {
    Resp::error(
        404,
        "invalid_request_error",
        &format!("Response with id '{id}' not found."),
    )
}

pub(crate) fn create(c: &mut Conn, req: &Request) -> io::Result<()> {
    let st = c.st;
    let _guard = InFlight::start(st);
    st.record(req);
    let Ok(body @ Value::Object(_)) = serde_json::from_slice::<Value>(&req.body) else {
        return c.send(&Resp::invalid("request body must be a JSON object"));
    };
    let previous = body.get("previous_response_id").and_then(Value::as_str);
    if let Some(prev) = previous {
        if !st.responses().contains_key(prev) {
            return c.send(&not_found(prev));
        }
    }
    let seq = st.seq.fetch_add(1, SeqCst);
    let id = format!(
        "resp_{}_{seq}",
        st.id.replace(|ch: char| !ch.is_ascii_alphanumeric(), "")
    );
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or(st.default_model());
    let text = format!("reply {seq} from {}", st.id);
    let message = json!({
        "id": format!("msg_{seq}"), "type": "message", "role": "assistant", "status": "completed",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    });
    let response = |status: &str, output: Value| {
        json!({
            "id": id, "object": "response", "created_at": now().as_secs(), "model": model,
            "status": status, "output": output, "backend": st.id,
            "previous_response_id": previous, "parallel_tool_calls": true, "tool_choice": "auto",
            "tools": [], "usage": {"input_tokens": 3, "output_tokens": 4, "total_tokens": 7,
            "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}},
        })
    };
    let done = response("completed", json!([message]));
    if body.get("store").and_then(Value::as_bool).unwrap_or(true) {
        st.responses().insert(id.clone(), done.clone());
    }
    if !body.get("stream").and_then(Value::as_bool).unwrap_or(false) {
        return c.send(&Resp::json(200, &done));
    }
    let head = c.sse_head();
    c.out.write_all(&head)?;
    let events = [
        json!({"type": "response.created", "sequence_number": 0, "response": response("in_progress", json!([]))}),
        json!({"type": "response.output_text.delta", "sequence_number": 1, "item_id": format!("msg_{seq}"),
               "output_index": 0, "content_index": 0, "delta": text, "logprobs": []}),
        json!({"type": "response.completed", "sequence_number": 2, "response": done}),
    ];
    for (i, ev) in events.into_iter().enumerate() {
        if i > 0 {
            // Generating takes time: `--delay-ms` between the events.
            thread::sleep(Duration::from_millis(st.cfg.delay_ms));
        }
        let kind = ev["type"].as_str().unwrap_or_default().to_owned();
        c.out
            .write_all(&sse_chunk(&format!("event: {kind}\ndata: {ev}\n\n")))?;
    }
    c.out.write_all(b"0\r\n\r\n")
}

/// `GET`, `DELETE /v1/responses/{id}` and `POST /v1/responses/{id}/cancel`.
pub(crate) fn stored(st: &State, method: &str, path: &str) -> Resp {
    let rest = path.trim_start_matches("/v1/responses/");
    let (id, tail) = rest.split_once('/').unwrap_or((rest, ""));
    let mut responses = st.responses();
    match (method, tail) {
        ("GET" | "HEAD", "") => match responses.get(id) {
            Some(r) => Resp::json(200, r),
            None => not_found(id),
        },
        ("DELETE", "") => match responses.remove(id) {
            Some(_) => Resp::json(
                200,
                &json!({"id": id, "object": "response", "deleted": true}),
            ),
            None => not_found(id),
        },
        ("POST", "cancel") => match responses.get_mut(id) {
            Some(r) => {
                r["status"] = json!("cancelled");
                Resp::json(200, r)
            }
            None => not_found(id),
        },
        _ => Resp::error(404, "not_found_error", &format!("no route for {path}")),
    }
}
