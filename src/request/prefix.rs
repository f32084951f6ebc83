//! A request's prompt prefix as the cache-aware pick sees it: the conversation as the
//! backend will see it, cut into fixed-size blocks, each named by a hash chained over
//! every block before it. Two requests share their first `k` block hashes exactly when
//! (hashes aside) their prompts share the first `k` blocks, which is what vLLM's prefix
//! cache can reuse. No tokenizer: a block of `BLOCK_BYTES` bytes stands for about 32
//! tokens of text.
//!
//! The prompt is written into the blocks in a canonical form, so that neither JSON key
//! order nor spacing changes it, and only the parts that make up the prompt count (the
//! model, tools and messages; never temperature, max_tokens, stream and the like, which
//! change between turns):
//! - `/v1/chat/completions`: the tool definitions, then every message in order (role,
//!   text content or its parts in order, tool calls);
//! - `/v1/completions`: the prompt (text or token ids; of a list of prompts, the first);
//! - `/v1/responses`: the instructions, then the input (text or items in order);
//! - `/v1/messages`: the system prompt, the tools, then every message.
//!
//! Pure: bytes in, hashes out, so it is tested without a router.

use serde::Deserialize;
use serde_json::Value;
use std::borrow::Cow;
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// The size of one block of the canonical prompt: about 32 tokens of English text, or
/// 32 token ids. A partial last block is not counted: vLLM caches whole blocks only.
pub const BLOCK_BYTES: usize = 128;

/// A prompt route's body, read once: its `model` as written (the caller checks it is a
/// string) and its prompt's chained block hashes.
#[derive(Debug, Default)]
pub struct Parsed {
    pub model: Option<Value>,
    pub blocks: Vec<u64>,
}

/// Whether requests to `route` (a path without its query) have a prompt to route by.
pub fn has_prompt(route: &str) -> bool {
    PROMPT_ROUTES.contains(&route)
}

const PROMPT_ROUTES: [&str; 4] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/messages",
];

/// Reads the body of a request to a prompt route (`has_prompt`); an error when it is
/// not a JSON object of that route's shape.
pub fn parse(route: &str, body: &[u8]) -> serde_json::Result<Parsed> {
    match route {
        "/v1/chat/completions" => parse_chat(body),
        "/v1/completions" => parse_completion(body),
        "/v1/responses" => parse_responses(body),
        "/v1/messages" => parse_messages(body),
        _ => Ok(Parsed::default()),
    }
}

/// Field separators of the canonical form: a part can never run into the next and
/// make a different prompt hash the same.
const TOOLS: u8 = 1;
const MESSAGE: u8 = 2;
const PART: u8 = 3;
const END: u8 = 4;

/// Cuts what is written into blocks and chains their hashes.
struct Blocks {
    buf: [u8; BLOCK_BYTES],
    len: usize,
    last: u64,
    hashes: Vec<u64>,
}

impl Blocks {
    fn new(model: Option<&Value>) -> Blocks {
        let model = model.and_then(Value::as_str).unwrap_or("");
        Blocks {
            buf: [0; BLOCK_BYTES],
            len: 0,
            // The same prompt for two models is two caches.
            last: xxh3_64_with_seed(model.as_bytes(), 0),
            hashes: Vec::new(),
        }
    }

    fn done(self, model: Option<Value>) -> Parsed {
        Parsed {
            model,
            blocks: self.hashes,
        }
    }

    fn write(&mut self, mut bytes: &[u8]) {
        if self.len > 0 {
            let n = (BLOCK_BYTES - self.len).min(bytes.len());
            self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
            self.len += n;
            bytes = &bytes[n..];
            if self.len < BLOCK_BYTES {
                return;
            }
            let block = self.buf;
            self.push(&block);
            self.len = 0;
        }
        let mut whole = bytes.chunks_exact(BLOCK_BYTES);
        for block in whole.by_ref() {
            self.push(block);
        }
        let rest = whole.remainder();
        self.buf[..rest.len()].copy_from_slice(rest);
        self.len = rest.len();
    }

    fn push(&mut self, block: &[u8]) {
        self.last = xxh3_64_with_seed(block, self.last);
        self.hashes.push(self.last);
    }

    fn tag(&mut self, tag: u8) {
        self.write(&[tag]);
    }

    /// One message: its role, then what `content` writes.
    fn message(&mut self, role: &[u8], content: impl FnOnce(&mut Blocks)) {
        self.tag(MESSAGE);
        self.write(role);
        self.tag(PART);
        content(self);
        self.tag(END);
    }

    /// Any JSON value in canonical form: serde_json's map keeps keys sorted, and
    /// writes no spaces.
    fn json(&mut self, value: &Value) {
        match value {
            // A text stays as it is, not quoted and escaped.
            Value::String(s) => self.write(s.as_bytes()),
            other => {
                // Writing to `Blocks` cannot fail.
                let _ = serde_json::to_writer(&mut *self, other);
            }
        }
    }
}

impl std::io::Write for Blocks {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        Blocks::write(self, bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A message's content: a text, or parts (text parts count by their text, others as
/// canonical JSON: an image changes the prompt too).
enum Content<'a> {
    Text(Cow<'a, [u8]>),
    Parts(Vec<Value>),
}

/// By hand, as bytes: serde_json then hands a text over as it is in the body, without
/// checking its UTF-8, which took three quarters of the parse of a long conversation
/// (a `str` costs 18 us for 128 KiB, bytes 4 us). A content of another type fails the
/// parse, and the request is routed without a prefix.
impl<'de: 'a, 'a> Deserialize<'de> for Content<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Content<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a text or a list of parts")
            }
            fn visit_borrowed_bytes<E>(self, v: &'de [u8]) -> Result<Self::Value, E> {
                Ok(Content::Text(Cow::Borrowed(v)))
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Self::Value, E> {
                Ok(Content::Text(Cow::Owned(v.to_vec())))
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Content::Text(Cow::Borrowed(v.as_bytes())))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Content::Text(Cow::Owned(v.as_bytes().to_vec())))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                seq: A,
            ) -> Result<Self::Value, A::Error> {
                let seq = serde::de::value::SeqAccessDeserializer::new(seq);
                Ok(Content::Parts(Vec::<Value>::deserialize(seq)?))
            }
        }
        d.deserialize_bytes(Visit)
    }
}

impl Content<'_> {
    fn write(&self, out: &mut Blocks) {
        match self {
            Content::Text(text) => out.write(text),
            Content::Parts(parts) => {
                for part in parts {
                    out.tag(PART);
                    match part.get("text").filter(|_| part.get("type").is_some()) {
                        Some(text) => out.json(text),
                        None => out.json(part),
                    }
                }
            }
        }
    }
}

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow, default)]
    role: Cow<'a, [u8]>,
    #[serde(borrow, default)]
    content: Option<Content<'a>>,
    #[serde(default)]
    tool_calls: Option<Value>,
}

impl Message<'_> {
    fn write(&self, out: &mut Blocks) {
        out.message(&self.role, |out| {
            if let Some(content) = &self.content {
                content.write(out);
            }
            if let Some(calls) = &self.tool_calls {
                out.tag(PART);
                out.json(calls);
            }
        });
    }
}

fn write_tools(out: &mut Blocks, tools: Option<&Value>) {
    if let Some(tools) = tools.filter(|t| !t.is_null()) {
        out.tag(TOOLS);
        out.json(tools);
        out.tag(END);
    }
}

fn parse_chat(body: &[u8]) -> serde_json::Result<Parsed> {
    #[derive(Deserialize)]
    struct Chat<'a> {
        #[serde(default)]
        model: Option<Value>,
        #[serde(default)]
        tools: Option<Value>,
        #[serde(borrow, default)]
        messages: Vec<Message<'a>>,
    }
    let chat: Chat = serde_json::from_slice(body)?;
    let mut out = Blocks::new(chat.model.as_ref());
    write_tools(&mut out, chat.tools.as_ref());
    for message in &chat.messages {
        message.write(&mut out);
    }
    Ok(out.done(chat.model))
}

fn parse_completion(body: &[u8]) -> serde_json::Result<Parsed> {
    #[derive(Deserialize)]
    struct Completion {
        #[serde(default)]
        model: Option<Value>,
        #[serde(default)]
        prompt: Value,
    }
    let Completion { model, prompt } = serde_json::from_slice(body)?;
    let mut out = Blocks::new(model.as_ref());
    // A list of prompts is routed by its first.
    let first = match &prompt {
        Value::Array(items) if items.first().is_some_and(|p| !p.is_number()) => &items[0],
        other => other,
    };
    match first {
        Value::String(text) => out.write(text.as_bytes()),
        // Token ids: four bytes each, so a block holds 32 of them.
        Value::Array(ids) => {
            for id in ids {
                let id = id.as_u64().unwrap_or(u64::MAX) as u32;
                out.write(&id.to_le_bytes());
            }
        }
        _ => {}
    }
    Ok(out.done(model))
}

fn parse_responses(body: &[u8]) -> serde_json::Result<Parsed> {
    #[derive(Deserialize)]
    struct Responses<'a> {
        #[serde(default)]
        model: Option<Value>,
        #[serde(borrow, default)]
        instructions: Option<Content<'a>>,
        #[serde(default)]
        tools: Option<Value>,
        #[serde(default)]
        input: Value,
    }
    let request: Responses = serde_json::from_slice(body)?;
    let mut blocks = Blocks::new(request.model.as_ref());
    let out = &mut blocks;
    write_tools(out, request.tools.as_ref());
    if let Some(instructions) = &request.instructions {
        out.message(b"system", |out| instructions.write(out));
    }
    match &request.input {
        Value::String(text) => {
            out.message(b"user", |out| out.write(text.as_bytes()));
        }
        Value::Array(items) => {
            for item in items {
                match Message::deserialize(item) {
                    Ok(message) if item.get("role").is_some() => message.write(out),
                    _ => {
                        out.tag(MESSAGE);
                        out.json(item);
                        out.tag(END);
                    }
                }
            }
        }
        _ => {}
    }
    Ok(blocks.done(request.model))
}

fn parse_messages(body: &[u8]) -> serde_json::Result<Parsed> {
    #[derive(Deserialize)]
    struct Messages<'a> {
        #[serde(default)]
        model: Option<Value>,
        #[serde(default)]
        system: Option<Value>,
        #[serde(default)]
        tools: Option<Value>,
        #[serde(borrow, default)]
        messages: Vec<Message<'a>>,
    }
    let request: Messages = serde_json::from_slice(body)?;
    let mut blocks = Blocks::new(request.model.as_ref());
    let out = &mut blocks;
    if let Some(system) = &request.system {
        out.message(b"system", |out| out.json(system));
    }
    write_tools(out, request.tools.as_ref());
    for message in &request.messages {
        message.write(out);
    }
    Ok(blocks.done(request.model))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The chained block hashes of the prompt of a request to `route`, or none when the
    /// route has no prompt or the body is not one.
    fn blocks(route: &str, body: &[u8]) -> Vec<u64> {
        parse(route, body).map(|p| p.blocks).unwrap_or_default()
    }

    fn chat(mut body: Value) -> Vec<u64> {
        body["model"] = json!("m");
        blocks("/v1/chat/completions", body.to_string().as_bytes())
    }

    fn text(n: usize, seed: &str) -> String {
        seed.repeat(n.div_ceil(seed.len()))[..n].to_owned()
    }

    #[test]
    fn a_prompt_is_cut_into_whole_blocks() {
        let long = text(10 * BLOCK_BYTES, "abcdefg ");
        let b = chat(json!({"messages": [{"role": "user", "content": long}]}));
        // Role, tags and text: 10 blocks and some bytes; the partial block is not counted.
        assert_eq!(b.len(), 10);
        assert!(chat(json!({"messages": [{"role": "user", "content": "hi"}]})).is_empty());
    }

    #[test]
    fn key_order_spacing_and_sampling_parameters_do_not_count() {
        let long = text(4 * BLOCK_BYTES, "the quick brown fox ");
        let a = format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"{long}"}}],"temperature":0.2,"stream":true}}"#
        );
        let b = format!(
            r#"{{ "max_tokens": 9, "n": 2, "model": "m", "messages" : [ {{ "content" : "{long}", "role" : "user" }} ], "top_p": 0.9 }}"#
        );
        let ha = blocks("/v1/chat/completions", a.as_bytes());
        assert_eq!(ha.len(), 4);
        assert_eq!(ha, blocks("/v1/chat/completions", b.as_bytes()));
        let tools_a = json!([{"type": "function", "function": {"name": "f", "parameters": {"a": 1, "b": 2}}}]);
        let tools_b: Value = serde_json::from_str(
            r#"[{"function": {"parameters": {"b": 2, "a": 1}, "name": "f"}, "type": "function"}]"#,
        )
        .expect("json");
        let with = |tools: &Value| {
            chat(json!({"tools": tools, "messages": [{"role": "user", "content": long}]}))
        };
        assert_eq!(with(&tools_a), with(&tools_b));
        assert_ne!(with(&tools_a), ha, "tools are part of the prompt");
    }

    #[test]
    fn a_later_turn_extends_the_earlier_one() {
        let system = text(6 * BLOCK_BYTES, "you are a careful assistant. ");
        let turn1 = json!({"messages": [{"role": "system", "content": system}, {"role": "user", "content": "hello there"}]});
        let turn2 = json!({"messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": "hello there"},
            {"role": "assistant", "content": text(3 * BLOCK_BYTES, "an answer ")},
            {"role": "user", "content": "and then?"},
        ]});
        let (a, b) = (chat(turn1), chat(turn2));
        assert!(b.len() > a.len());
        assert_eq!(a[..], b[..a.len()]);
        // Another conversation on the same system prompt shares its blocks, not the rest.
        let other = chat(
            json!({"messages": [{"role": "system", "content": system}, {"role": "user", "content": text(3 * BLOCK_BYTES, "something else ")}]}),
        );
        let shared = other.iter().zip(&b).take_while(|(x, y)| x == y).count();
        assert_eq!(shared, 6);
    }

    #[test]
    fn every_message_counts_not_only_the_system_prompt() {
        let system = text(2 * BLOCK_BYTES, "sys ");
        let user = |u: &str| {
            chat(
                json!({"messages": [{"role": "system", "content": system}, {"role": "user", "content": text(2 * BLOCK_BYTES, u)}]}),
            )
        };
        assert_ne!(user("one "), user("two "));
        assert_eq!(user("one ")[..2], user("two ")[..2]);
    }

    #[test]
    fn text_parts_count_as_their_text_and_the_model_separates_caches() {
        let long = text(3 * BLOCK_BYTES, "part ");
        let parts = chat(
            json!({"messages": [{"role": "user", "content": [{"type": "text", "text": long}]}]}),
        );
        let image = chat(
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": text(3 * BLOCK_BYTES, "data:")}}]}]}),
        );
        assert_eq!(parts.len(), 3);
        assert_ne!(parts, image);
        let for_model = |m: &str| {
            let body = json!({"model": m, "messages": [{"role": "user", "content": long}]});
            blocks("/v1/chat/completions", body.to_string().as_bytes())
        };
        assert_ne!(for_model("a"), for_model("b"));
    }

    #[test]
    fn completions_responses_and_messages_have_prompts() {
        let long = text(3 * BLOCK_BYTES, "prompt ");
        let c = |v: Value| blocks("/v1/completions", v.to_string().as_bytes());
        assert_eq!(c(json!({"prompt": long})).len(), 3);
        assert_eq!(
            c(json!({"prompt": [long, "other"]})),
            c(json!({"prompt": long}))
        );
        let ids: Vec<u32> = (0..100).collect();
        assert_eq!(c(json!({"prompt": ids})).len(), 100 * 4 / BLOCK_BYTES);
        assert_eq!(c(json!({"prompt": [ids]})), c(json!({"prompt": ids})));
        let r = |v: Value| blocks("/v1/responses", v.to_string().as_bytes());
        let a = r(json!({"instructions": long, "input": "hi"}));
        assert_eq!(a.len(), 3);
        assert_eq!(
            a,
            r(json!({"input": "hi", "instructions": long, "temperature": 1}))
        );
        assert_ne!(
            a,
            r(json!({"instructions": text(3 * BLOCK_BYTES, "other "), "input": "hi"}))
        );
        let m = |v: Value| blocks("/v1/messages", v.to_string().as_bytes());
        assert_eq!(m(json!({"system": long, "messages": []})).len(), 3);
    }

    #[test]
    fn other_routes_and_broken_bodies_have_no_prefix() {
        let long = text(3 * BLOCK_BYTES, "x");
        let body = json!({"input": long}).to_string();
        assert!(blocks("/v1/embeddings", body.as_bytes()).is_empty());
        assert!(blocks("/v1/chat/completions", b"{not json").is_empty());
        assert!(blocks("/v1/chat/completions", b"[1,2]").is_empty());
    }
}
