//! What a relayed reply says about its generation, read as it passes: for a stream,
//! when each SSE event carrying generated content arrived (time to first token, the
//! gaps between tokens), its finish reasons, its final `usage`, and whether it carried
//! an in-band error event; for a JSON reply, its `usage` and finish reasons, read from
//! its end.
//!
//! The observer only reads: the bytes go to the client as they came, whatever it makes
//! of them. It holds at most one unfinished line of a stream (`MAX_LINE`) or the last
//! `TAIL` bytes of a JSON reply, so a reply's size never becomes the router's memory.
//!
//! A token is an event whose delta has text (`content`, `reasoning_content`,
//! `reasoning`, or `text` for completions) or tool calls: vLLM opens a chat stream with
//! a chunk that carries only the role (and an empty content), which is not one.

use std::fmt;
use std::time::{Duration, Instant};

use serde::de::{self, IgnoredAny, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};

use crate::control::generation_metrics::TOKEN_GAP_BUCKETS;
use crate::control::histogram::Histogram;

/// The longest SSE line looked at; a longer one (an event with huge logprobs) is
/// relayed but not read.
const MAX_LINE: usize = 256 * 1024;
/// How much of the end of a JSON reply is kept to find its `usage`: vLLM writes
/// `usage` last, after the choices and their finish reasons.
const TAIL: usize = 4 * 1024;

/// Finish reasons that become label values; any other is counted as `other`.
pub const FINISH_REASONS: [&str; 7] = [
    "stop",
    "length",
    "tool_calls",
    "content_filter",
    "abort",
    "error",
    "other",
];

/// Token counts from the backend's `usage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
}

/// What was learned about one reply's generation, once it ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// The reply was an SSE stream.
    pub stream: bool,
    /// When the request arrived at the router.
    pub arrival: Instant,
    /// When the first event with generated content arrived.
    pub first_token: Option<Instant>,
    /// When the last one did.
    pub last_token: Option<Instant>,
    /// The gaps between consecutive content events, bucketed as they come: a long
    /// generation's gaps take no more memory than a short one's.
    pub gaps: Histogram,
    /// Content events seen: the completion tokens when no `usage` says otherwise.
    pub content_events: u64,
    /// The last `usage` the reply carried (the final usage event of a stream whose
    /// client asked for it, or a JSON reply's).
    pub usage: Option<Usage>,
    /// Each choice's finish reason, as a label value of `FINISH_REASONS`.
    pub finish_reasons: Vec<&'static str>,
    /// The stream carried an error event (vLLM ends a stream that fails mid-way with
    /// one, under a 200).
    pub error_event: bool,
}

impl Summary {
    /// Time to first token: from the request's arrival to the first content event.
    pub fn ttft(&self) -> Option<Duration> {
        self.first_token.map(|t| t.duration_since(self.arrival))
    }

    /// Completion tokens: `usage`'s, else counted from the events (`estimated`).
    pub fn completion_tokens(&self) -> Option<(u64, &'static str)> {
        match self.usage {
            Some(u) => Some((u.completion_tokens, "usage")),
            None if self.stream && self.content_events > 0 => {
                Some((self.content_events, "estimated"))
            }
            None => None,
        }
    }

    /// Time per output token: from the first content event to the last, over the
    /// tokens after the first. None under two tokens.
    pub fn time_per_output_token(&self) -> Option<Duration> {
        let (tokens, _) = self.completion_tokens()?;
        let (first, last) = (self.first_token?, self.last_token?);
        (tokens >= 2)
            .then(|| last.duration_since(first) / (tokens - 1).min(u64::from(u32::MAX)) as u32)
    }
}

/// Watches one reply's body go by.
pub struct Observer {
    summary: Summary,
    /// The start of a line the last read cut off (streams), or the reply's last bytes
    /// (JSON).
    carry: Vec<u8>,
    /// The line in `carry` outgrew `MAX_LINE` and is skipped to its end.
    skipping: bool,
    json: bool,
}

impl Observer {
    /// An observer for a reply: `stream` for `text/event-stream`, `json` for an
    /// `application/json` reply whose usage is worth reading; otherwise it does
    /// nothing.
    pub fn new(arrival: Instant, stream: bool, json: bool) -> Observer {
        Observer {
            summary: Summary {
                stream,
                arrival,
                first_token: None,
                last_token: None,
                gaps: Histogram::new(&TOKEN_GAP_BUCKETS),
                content_events: 0,
                usage: None,
                finish_reasons: Vec::new(),
                error_event: false,
            },
            carry: Vec::new(),
            skipping: false,
            json: json && !stream,
        }
    }

    /// Whether an error event has gone by.
    pub fn error_event(&self) -> bool {
        self.summary.error_event
    }

    /// Looks at one read of the body, which arrived at `now`.
    pub fn observe(&mut self, bytes: &[u8], now: Instant) {
        if self.summary.stream {
            self.scan_lines(bytes, now);
        } else if self.json {
            let keep = bytes.len().min(TAIL);
            let drop = (self.carry.len() + keep).saturating_sub(TAIL);
            self.carry.drain(..drop);
            self.carry.extend_from_slice(&bytes[bytes.len() - keep..]);
        }
    }

    /// What the reply said, once its body ended (whole or not).
    pub fn finish(mut self) -> Summary {
        if self.json {
            self.read_json_tail();
        }
        self.summary
    }

    fn scan_lines(&mut self, bytes: &[u8], now: Instant) {
        let mut rest = bytes;
        while let Some(end) = rest.iter().position(|&b| b == b'\n') {
            let (piece, after) = (&rest[..end], &rest[end + 1..]);
            rest = after;
            if self.skipping {
                self.skipping = false;
                self.carry.clear();
                continue;
            }
            if self.carry.is_empty() {
                self.line(piece, now);
            } else {
                let mut line = std::mem::take(&mut self.carry);
                line.extend_from_slice(piece);
                self.line(&line, now);
                line.clear();
                self.carry = line;
            }
        }
        if self.skipping {
            return;
        }
        if self.carry.len() + rest.len() > MAX_LINE {
            self.carry.clear();
            self.skipping = true;
        } else {
            self.carry.extend_from_slice(rest);
        }
    }

    /// One whole SSE line, without its `\n`.
    fn line(&mut self, line: &[u8], now: Instant) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        let data = data.trim_ascii();
        if !data.starts_with(b"{") {
            return; // `[DONE]`, or not JSON
        }
        let Ok(event) = serde_json::from_slice::<Event>(data) else {
            return;
        };
        if event.error.is_some() || event.object.is_some_and(|o| o.0) {
            self.summary.error_event = true;
        }
        if event.usage.is_some() {
            self.summary.usage = event.usage;
        }
        let choices = event.choices.unwrap_or_default();
        self.summary.finish_reasons.extend(choices.finish);
        if choices.content {
            let s = &mut self.summary;
            if let Some(last) = s.last_token {
                s.gaps.observe(now.duration_since(last));
            }
            s.first_token.get_or_insert(now);
            s.last_token = Some(now);
            s.content_events += 1;
        }
    }

    /// A JSON reply's `usage` and finish reasons, from its last bytes: the keys are
    /// found as `"usage":` and `"finish_reason":`, which cannot occur inside a JSON
    /// string (a quote there is escaped), and their values parsed from there.
    fn read_json_tail(&mut self) {
        let tail = std::mem::take(&mut self.carry);
        if let Some(at) = find_last(&tail, b"\"usage\"") {
            self.summary.usage = value_after(&tail[at + 7..]);
        }
        let mut from = 0;
        while let Some(at) = find_first(&tail[from..], b"\"finish_reason\"") {
            let key_end = from + at + 15;
            if let Some(Some(Reason(reason))) = value_after::<Option<Reason>>(&tail[key_end..]) {
                self.summary.finish_reasons.push(reason);
            }
            from = key_end;
        }
    }
}

/// The JSON value after a key's closing quote: `: value`, followed by anything.
fn value_after<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Option<T> {
    let rest = bytes.trim_ascii_start().strip_prefix(b":")?;
    serde_json::Deserializer::from_slice(rest)
        .into_iter::<T>()
        .next()?
        .ok()
}

fn find_first(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn find_last(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).rposition(|w| w == needle)
}

fn finish_label(reason: &str) -> &'static str {
    FINISH_REASONS
        .iter()
        .find(|r| **r == reason)
        .copied()
        .unwrap_or("other")
}

/// The parts of an OpenAI stream event the observer reads; everything else is skipped
/// unparsed, and what is read is not kept: no event allocates (but a `usage`).
#[derive(Deserialize)]
struct Event {
    choices: Option<Choices>,
    usage: Option<Usage>,
    error: Option<IgnoredAny>,
    object: Option<IsError>,
}

/// An event's choices, read one by one: whether any carries content, and their finish
/// reasons (a `Vec` that allocates only when one comes, at a stream's end).
#[derive(Default)]
struct Choices {
    content: bool,
    finish: Vec<&'static str>,
}

#[derive(Deserialize)]
struct Choice {
    delta: Option<Delta>,
    /// Completions stream `text`, not a delta.
    text: Option<Text>,
    finish_reason: Option<Reason>,
}

#[derive(Deserialize)]
struct Delta {
    content: Option<Text>,
    reasoning_content: Option<Text>,
    reasoning: Option<Text>,
    tool_calls: Option<Count>,
}

impl Choice {
    fn has_content(&self) -> bool {
        let text = |t: &Option<Text>| t.as_ref().is_some_and(|t| t.0);
        text(&self.text)
            || self.delta.as_ref().is_some_and(|d| {
                text(&d.content)
                    || text(&d.reasoning_content)
                    || text(&d.reasoning)
                    || d.tool_calls.as_ref().is_some_and(|c| c.0 > 0)
            })
    }
}

/// A string, as whether it is empty.
struct Text(bool);
/// A finish reason, as its label value.
struct Reason(&'static str);
/// An `object`, as whether it is `"error"`.
struct IsError(bool);
/// A list, as how many elements it has.
struct Count(usize);

/// Reads a string through `f` without keeping it (an escaped one is unescaped into the
/// parser's scratch buffer).
fn read_str<'de, D: Deserializer<'de>, T>(d: D, f: fn(&str) -> T) -> Result<T, D::Error> {
    struct Read<T>(fn(&str) -> T);
    impl<T> Visitor<'_> for Read<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<T, E> {
            Ok((self.0)(s))
        }
    }
    d.deserialize_str(Read(f))
}

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        read_str(d, |s| Text(!s.is_empty()))
    }
}

impl<'de> Deserialize<'de> for Reason {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        read_str(d, |s| Reason(finish_label(s)))
    }
}

impl<'de> Deserialize<'de> for IsError {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        read_str(d, |s| IsError(s == "error"))
    }
}

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Elements;
        impl<'de> Visitor<'de> for Elements {
            type Value = Count;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Count, A::Error> {
                let mut n = 0;
                while seq.next_element::<IgnoredAny>()?.is_some() {
                    n += 1;
                }
                Ok(Count(n))
            }
        }
        d.deserialize_seq(Elements)
    }
}

impl<'de> Deserialize<'de> for Choices {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Each;
        impl<'de> Visitor<'de> for Each {
            type Value = Choices;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of choices")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Choices, A::Error> {
                let mut out = Choices::default();
                while let Some(choice) = seq.next_element::<Choice>()? {
                    out.content |= choice.has_content();
                    if let Some(Reason(reason)) = choice.finish_reason {
                        out.finish.push(reason);
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_seq(Each)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(start: Instant, ms: u64) -> Instant {
        start + Duration::from_millis(ms)
    }

    const ROLE: &str = r#"data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#;

    fn token(text: &str, finish: Option<&str>) -> String {
        let finish = finish.map_or("null".to_owned(), |f| format!("\"{f}\""));
        format!(
            r#"data: {{"object":"chat.completion.chunk","choices":[{{"index":0,"delta":{{"content":"{text}"}},"finish_reason":{finish}}}]}}"#
        )
    }

    #[test]
    fn the_role_chunk_is_not_a_token_and_gaps_are_between_content_events() {
        let t0 = Instant::now();
        let mut o = Observer::new(t0, true, false);
        o.observe(format!("{ROLE}\n\n").as_bytes(), at(t0, 10));
        o.observe(format!("{}\n\n", token("a", None)).as_bytes(), at(t0, 300));
        // One event cut across two reads, and the last token with its finish reason.
        let b = format!("{}\n\n", token("b", None));
        let (x, y) = b.split_at(20);
        o.observe(x.as_bytes(), at(t0, 340));
        o.observe(y.as_bytes(), at(t0, 350));
        o.observe(
            format!("{}\n\ndata: [DONE]\n\n", token("c", Some("length"))).as_bytes(),
            at(t0, 400),
        );
        let s = o.finish();
        assert_eq!(s.ttft(), Some(Duration::from_millis(300)));
        assert_eq!(s.last_token, Some(at(t0, 400)));
        assert_eq!(s.gaps.count(), 2);
        assert!((s.gaps.sum() - 0.1).abs() < 1e-9, "{}", s.gaps.sum());
        assert_eq!(s.completion_tokens(), Some((3, "estimated")));
        assert_eq!(s.time_per_output_token(), Some(Duration::from_millis(50)));
        assert_eq!(s.finish_reasons, ["length"]);
        assert!(!s.error_event);
    }

    #[test]
    fn usage_from_the_final_event_wins_over_the_count() {
        let t0 = Instant::now();
        let mut o = Observer::new(Instant::now(), true, false);
        let body = format!(
            "{}\r\n\r\n{}\r\n\r\ndata: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":7,\"completion_tokens\":5,\"total_tokens\":12}}}}\r\n\r\ndata: [DONE]\r\n\r\n",
            token("a", None),
            token("b", Some("weird"))
        );
        o.observe(body.as_bytes(), t0);
        let s = o.finish();
        assert_eq!(
            s.usage,
            Some(Usage {
                prompt_tokens: 7,
                completion_tokens: 5
            })
        );
        assert_eq!(s.completion_tokens(), Some((5, "usage")));
        assert_eq!(s.finish_reasons, ["other"]);
    }

    #[test]
    fn error_events_are_seen_but_a_token_mentioning_one_is_not() {
        let mut o = Observer::new(Instant::now(), true, false);
        o.observe(
            format!("{}\n\n", token("data: {\\\"error\\\": 1}", None)).as_bytes(),
            Instant::now(),
        );
        assert!(!o.error_event());
        o.observe(
            b"data: {\"object\": \"error\", \"message\": \"x\"}\n\n",
            Instant::now(),
        );
        assert!(o.error_event());
        let mut o = Observer::new(Instant::now(), true, false);
        o.observe(
            b"data: {\"error\": {\"message\": \"engine died\"}}\n\n",
            Instant::now(),
        );
        assert!(o.error_event());
    }

    #[test]
    fn tool_calls_reasoning_and_escaped_text_are_tokens_an_empty_delta_is_not() {
        let mut o = Observer::new(Instant::now(), true, false);
        for (event, token) in [
            (
                r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{"}}]}}]}"#,
                true,
            ),
            (
                r#"{"choices":[{"delta":{"reasoning_content":"hm"}}]}"#,
                true,
            ),
            (r#"{"choices":[{"delta":{"content":"\n\u00e9"}}]}"#, true),
            (r#"{"choices":[{"delta":{"tool_calls":[]}}]}"#, false),
            (r#"{"choices":[{"delta":{}}],"usage":null}"#, false),
            (r#"{"choices":null}"#, false),
        ] {
            let before = o.summary.content_events;
            o.observe(format!("data: {event}\n\n").as_bytes(), Instant::now());
            assert_eq!(
                o.summary.content_events - before,
                u64::from(token),
                "{event}"
            );
        }
    }

    #[test]
    fn a_huge_line_is_skipped_and_memory_stays_bounded() {
        let mut o = Observer::new(Instant::now(), true, false);
        o.observe(b"data: {\"choices\":[{\"text\":\"", Instant::now());
        for _ in 0..100 {
            o.observe(&[b'x'; 64 * 1024], Instant::now());
            assert!(o.carry.len() <= MAX_LINE);
        }
        o.observe(b"\"}]}\n\n", Instant::now());
        o.observe(
            format!("{}\n\n", token("a", None)).as_bytes(),
            Instant::now(),
        );
        assert_eq!(o.finish().content_events, 1);
    }

    #[test]
    fn completions_text_counts_and_json_replies_give_usage_from_their_end() {
        let mut o = Observer::new(Instant::now(), true, false);
        o.observe(
            b"data: {\"choices\":[{\"text\":\"hi\",\"finish_reason\":null}]}\n\n",
            Instant::now(),
        );
        assert_eq!(o.finish().content_events, 1);

        let text = "y".repeat(10_000);
        let body = format!(
            r#"{{"id":"x","choices":[{{"index":0,"message":{{"content":"{text} \"usage\": 1"}},"finish_reason":"stop"}},{{"index":1,"finish_reason":"length"}}],"usage":{{"prompt_tokens":3,"total_tokens":13,"completion_tokens":10}}}}"#
        );
        let mut o = Observer::new(Instant::now(), false, true);
        for piece in body.as_bytes().chunks(1000) {
            o.observe(piece, Instant::now());
            assert!(o.carry.len() <= TAIL);
        }
        let s = o.finish();
        assert_eq!(
            s.usage,
            Some(Usage {
                prompt_tokens: 3,
                completion_tokens: 10
            })
        );
        assert_eq!(s.finish_reasons, ["stop", "length"]);
        assert_eq!(s.completion_tokens(), Some((10, "usage")));
        assert_eq!(s.first_token, None);
    }
}
