//! LoRA adapters loaded and unloaded at runtime, as vLLM does with
//! `VLLM_ALLOW_RUNTIME_LORA_UPDATING`: `POST /v1/load_lora_adapter` with
//! `{"lora_name", "lora_path"}` and `POST /v1/unload_lora_adapter` with
//! `{"lora_name"}`. A loaded adapter is listed in `/v1/models` with the base model as
//! its `parent` (`server::models`).

use crate::*;

fn name_of(body: &[u8], field: &str) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    v.get(field)?
        .as_str()
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

fn text(status: u16, msg: &str) -> Resp {
    let mut r = Resp::json(status, &Value::Null);
    (r.ctype, r.body) = ("text/plain; charset=utf-8", msg.as_bytes().to_vec());
    r
}

pub(crate) fn load(st: &State, body: &[u8]) -> Resp {
    let (Some(name), Some(path)) = (name_of(body, "lora_name"), name_of(body, "lora_path")) else {
        return Resp::invalid("both 'lora_name' and 'lora_path' must be provided");
    };
    let mut adapters = st.adapters();
    if adapters.contains_key(&name) || st.cfg.models.contains(&name) {
        let msg = format!("The lora adapter '{name}' has already been loaded.");
        return Resp::error(400, "InvalidUserInput", &msg);
    }
    adapters.insert(name.clone(), path);
    text(
        200,
        &format!("Success: LoRA adapter '{name}' added successfully."),
    )
}

pub(crate) fn unload(st: &State, body: &[u8]) -> Resp {
    let Some(name) = name_of(body, "lora_name") else {
        return Resp::invalid("'lora_name' needs to be provided to unload a LoRA adapter");
    };
    if st.adapters().remove(&name).is_none() {
        let msg = format!("The lora adapter '{name}' cannot be found.");
        return Resp::error(404, "NotFoundError", &msg);
    }
    text(
        200,
        &format!("Success: LoRA adapter '{name}' removed successfully."),
    )
}
