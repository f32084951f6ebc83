//! What operators see (issue 17): request-level metrics read from the SSE events
//! (time to first token, gaps between tokens, time per output token, end-to-end
//! latency, tokens and finish reasons), W3C trace context across the router, and
//! `vllm-router top` rendered against a live router, in the terminal UI crate's test
//! backend and under a real pseudo-terminal (tmux).
//!
//! The streams come from `mock-vllm` with known timings: a role-only first chunk as
//! vLLM sends it, then the first token `x-mock-first-token-ms` after the head, then
//! one every `x-mock-delay-ms`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use ratatui::backend::TestBackend;
use ratatui::Terminal;
use serde_json::Value;
use vllm_router::control::top::{Status, Top};
use vllm_router::request::auth::Secret;

use crate::support::{
    free_port, request, servers_toml, test_dir, wait_until, Conn, Mock, Resp, Router,
};

const CHAT: &str = "/v1/chat/completions";
const SOON: Duration = Duration::from_secs(10);

/// A POST to the chat endpoint with extra headers.
fn chat(addr: SocketAddr, headers: &[(&str, &str)], body: &str) -> Resp {
    let mut all = vec![("Content-Type", "application/json")];
    all.extend_from_slice(headers);
    request(addr, "POST", CHAT, &all, body.as_bytes())
}

/// The samples of a `/metrics` page, each as its name and sorted labels.
fn samples(text: &str) -> BTreeMap<(String, BTreeMap<String, String>), f64> {
    let mut out = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').expect("a sample line");
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, rest.strip_suffix('}').expect("labels end")),
            None => (series, ""),
        };
        let labels = labels
            .split("\",")
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (k, v) = l.split_once("=\"").expect("label=\"value\"");
                (k.to_owned(), v.trim_end_matches('"').to_owned())
            })
            .collect();
        out.insert((name.to_owned(), labels), value.parse().expect("a number"));
    }
    out
}

/// One sample's value, by name and its whole label set.
fn value(router: &Router, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let text = router.get("/metrics").text();
    let key = (
        name.to_owned(),
        labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    );
    samples(&text).get(&key).copied()
}

/// A histogram's count and sum for one model and backend.
fn histogram(router: &Router, name: &str, model: &str, backend: &str) -> (f64, f64) {
    let labels = [("backend", backend), ("model", model)];
    let count = value(router, &format!("{name}_count"), &labels).unwrap_or(0.0);
    let sum = value(router, &format!("{name}_sum"), &labels).unwrap_or(0.0);
    (count, sum)
}

fn bucket(router: &Router, name: &str, backend: &str, le: &str) -> f64 {
    let labels = [("backend", backend), ("le", le), ("model", "mock-model")];
    value(router, &format!("{name}_bucket"), &labels).unwrap_or(0.0)
}

const STREAM: &str = r#"{"model":"mock-model","stream":true,"max_tokens":5,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}"#;

/// A TTFT of 300 ms shows as 300 ms, not as the time to the head (which comes at
/// once), and not as the time to vLLM's role-only first chunk; the gaps, the time per
/// output token and the tokens follow the events.
#[test]
fn stream_metrics_follow_the_content_events_not_the_head() {
    let mock = Mock::start(&[]);
    let router = Router::start(&servers_toml(&[(&mock.url, 4)], ""));
    let started = Instant::now();
    let resp = chat(
        router.addr,
        &[
            ("x-mock-role-chunk", "1"),
            ("x-mock-first-token-ms", "300"),
            ("x-mock-delay-ms", "50"),
            ("X-Request-Id", "timed"),
        ],
        STREAM,
    );
    let took = started.elapsed().as_secs_f64();
    assert_eq!(resp.status, 200);
    let events = resp.text().matches("data: ").count();
    assert_eq!(events, 8, "role, 5 tokens, usage, [DONE]: {}", resp.text());
    let url = mock.url.as_str();
    let ttft = "vllm_router_time_to_first_token_seconds";
    wait_until(SOON, "the stream counted", || {
        histogram(&router, ttft, "mock-model", url).0 == 1.0
    });
    let (_, ttft_sum) = histogram(&router, ttft, "mock-model", url);
    assert!((0.3..0.6).contains(&ttft_sum), "TTFT {ttft_sum} s");
    assert_eq!(bucket(&router, ttft, url, "0.25"), 0.0);
    assert_eq!(bucket(&router, ttft, url, "0.75"), 1.0);
    // The head came at once: the time to first byte is not the time to first token.
    let ttfb = value(
        &router,
        "vllm_router_time_to_first_byte_seconds_sum",
        &[("backend", url)],
    )
    .expect("ttfb");
    assert!(ttfb < 0.2, "the head took {ttfb} s");

    let (gaps, gap_sum) = histogram(
        &router,
        "vllm_router_inter_token_latency_seconds",
        "mock-model",
        url,
    );
    assert_eq!(gaps, 4.0, "one gap between each of 5 tokens");
    // The first token's read may come a little late, which shortens the sum.
    assert!(
        (0.15..0.45).contains(&gap_sum),
        "4 gaps of 50 ms: {gap_sum}"
    );
    let (tpots, tpot) = histogram(
        &router,
        "vllm_router_time_per_output_token_seconds",
        "mock-model",
        url,
    );
    assert_eq!(tpots, 1.0);
    assert!((0.035..0.11).contains(&tpot), "TPOT {tpot}");
    let (e2es, e2e) = histogram(
        &router,
        "vllm_router_e2e_request_latency_seconds",
        "mock-model",
        url,
    );
    assert_eq!(e2es, 1.0);
    assert!(
        e2e >= 0.5 && e2e < took + 0.1,
        "e2e {e2e}, the client saw {took}"
    );

    let usage: Value = resp
        .text()
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find(|v| v["usage"].is_object())
        .expect("a usage event")["usage"]
        .clone();
    let tokens = |name: &str, source: &str| {
        value(
            &router,
            name,
            &[
                ("backend", url),
                ("model", "mock-model"),
                ("source", source),
            ],
        )
    };
    assert_eq!(
        tokens("vllm_router_prompt_tokens_total", "usage"),
        usage["prompt_tokens"].as_f64()
    );
    assert_eq!(
        tokens("vllm_router_completion_tokens_total", "usage"),
        Some(5.0)
    );
    assert_eq!(
        tokens("vllm_router_completion_tokens_total", "estimated"),
        None
    );
    let finish = |reason: &str| {
        value(
            &router,
            "vllm_router_requests_by_finish_reason_total",
            &[
                ("backend", url),
                ("finish_reason", reason),
                ("model", "mock-model"),
            ],
        )
    };
    assert_eq!(finish("length"), Some(1.0), "max_tokens ended it");

    // The access entry carries the same figures.
    let entry = router.wait_access_entry("timed");
    let ttft_ms = entry["ttft_ms"].as_f64().expect("ttft_ms");
    assert!((300.0..600.0).contains(&ttft_ms), "{entry}");
    assert!(
        entry["ttfb_ms"].as_f64().expect("ttfb_ms") < 200.0,
        "{entry}"
    );
    assert_eq!(entry["completion_tokens"], 5, "{entry}");
    assert_eq!(entry["prompt_tokens"], usage["prompt_tokens"], "{entry}");
}

/// Without `include_usage` the completion tokens are counted from the events and
/// labelled estimated; no prompt tokens are invented. A JSON reply's usage and finish
/// reason are read from its body, and it has no TTFT.
#[test]
fn tokens_without_usage_are_estimated_and_json_replies_give_theirs() {
    let mock = Mock::start(&[]);
    let router = Router::start(&servers_toml(&[(&mock.url, 4)], ""));
    let url = mock.url.as_str();
    for _ in 0..2 {
        let resp = chat(
            router.addr,
            &[("x-mock-tokens", "3"), ("x-mock-role-chunk", "1")],
            r#"{"model":"mock-model","stream":true,"messages":[]}"#,
        );
        assert_eq!(resp.status, 200);
    }
    let completion = |source: &str| {
        value(
            &router,
            "vllm_router_completion_tokens_total",
            &[
                ("backend", url),
                ("model", "mock-model"),
                ("source", source),
            ],
        )
    };
    wait_until(SOON, "two streams counted", || {
        completion("estimated") == Some(6.0)
    });
    assert_eq!(completion("usage"), None);
    let prompt = value(
        &router,
        "vllm_router_prompt_tokens_total",
        &[
            ("backend", url),
            ("model", "mock-model"),
            ("source", "usage"),
        ],
    );
    assert_eq!(prompt, None);

    let resp = chat(
        router.addr,
        &[],
        r#"{"model":"mock-model","max_tokens":4,"messages":[]}"#,
    );
    assert_eq!(resp.status, 200);
    let usage = resp.json()["usage"].clone();
    wait_until(SOON, "the JSON reply counted", || {
        completion("usage") == Some(4.0)
    });
    let prompt = value(
        &router,
        "vllm_router_prompt_tokens_total",
        &[
            ("backend", url),
            ("model", "mock-model"),
            ("source", "usage"),
        ],
    );
    assert_eq!(prompt, usage["prompt_tokens"].as_f64());
    let finish = |reason: &str| {
        value(
            &router,
            "vllm_router_requests_by_finish_reason_total",
            &[
                ("backend", url),
                ("finish_reason", reason),
                ("model", "mock-model"),
            ],
        )
    };
    assert_eq!(finish("stop"), Some(2.0), "the streams");
    assert_eq!(finish("length"), Some(1.0), "the JSON reply");
    let ttft = histogram(
        &router,
        "vllm_router_time_to_first_token_seconds",
        "mock-model",
        url,
    );
    assert_eq!(ttft.0, 2.0, "streams only");
    let e2e = histogram(
        &router,
        "vllm_router_e2e_request_latency_seconds",
        "mock-model",
        url,
    );
    assert_eq!(e2e.0, 3.0, "every answered request");
}

const VALID: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

/// A client's `traceparent` and `tracestate` reach the backend unchanged; without
/// one, the backend gets a new sampled version-00 one whose trace id is the access
/// entry's; `X-Request-Id` is still echoed; an unusable one is replaced.
#[test]
fn traces_connect_through_the_router() {
    let mock = Mock::start(&[]);
    let router = Router::start(&servers_toml(&[(&mock.url, 4)], ""));
    let body = r#"{"model":"mock-model","max_tokens":1,"messages":[]}"#;

    let mut conn = Conn::open(router.addr);
    let headers = [
        ("Content-Type", "application/json"),
        ("traceparent", VALID),
        ("tracestate", "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"),
        ("X-Request-Id", "traced-1"),
    ];
    conn.send("POST", CHAT, &headers, body.as_bytes(), false);
    let resp = conn.read_response(false).expect("a reply");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("x-request-id"), Some("traced-1"));
    assert_eq!(mock.headers_seen("traceparent"), [VALID]);
    assert_eq!(
        mock.headers_seen("tracestate"),
        ["congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"]
    );

    // The next request on the same connection has none: it gets a trace of its own.
    let headers = [
        ("Content-Type", "application/json"),
        ("X-Request-Id", "traced-2"),
    ];
    conn.send("POST", CHAT, &headers, body.as_bytes(), true);
    let resp = conn.read_response(false).expect("a second reply");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("x-request-id"), Some("traced-2"));
    let started = mock.headers_seen("traceparent");
    assert_eq!(started.len(), 1, "{started:?}");
    let parts: Vec<&str> = started[0].split('-').collect();
    assert_eq!(parts.len(), 4, "{started:?}");
    assert_eq!((parts[0], parts[3]), ("00", "01"), "version 00, sampled");
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    assert!(hex(parts[1], 32) && hex(parts[2], 16), "{started:?}");
    assert!(mock.headers_seen("tracestate").is_empty());

    // An unusable traceparent is replaced, and its tracestate goes with it.
    let headers = [
        ("Content-Type", "application/json"),
        ("traceparent", "00-not-a-trace-01"),
        ("tracestate", "a=1"),
        ("X-Request-Id", "traced-3"),
    ];
    let resp = request(router.addr, "POST", CHAT, &headers, body.as_bytes());
    assert_eq!(resp.status, 200);
    let replaced = mock.headers_seen("traceparent");
    assert_eq!(replaced.len(), 1);
    assert_ne!(replaced[0], "00-not-a-trace-01");
    assert_ne!(replaced[0], started[0], "a new trace per request");
    assert!(mock.headers_seen("tracestate").is_empty());

    let entry = |id: &str| {
        let mut found = None;
        wait_until(SOON, &format!("access entry {id}"), || {
            found = router.access_entry(id);
            found.is_some()
        });
        found.expect("entry")
    };
    assert_eq!(
        entry("traced-1")["trace_id"],
        "0af7651916cd43dd8448eb211c80319c"
    );
    assert_eq!(entry("traced-2")["trace_id"], parts[1]);
    assert_eq!(
        entry("traced-3")["trace_id"],
        replaced[0].split('-').nth(1).expect("trace id")
    );
    // A request the router refuses itself still logs a trace id.
    let refused = request(
        router.addr,
        "POST",
        CHAT,
        &[("traceparent", VALID), ("X-Request-Id", "traced-4")],
        b"not json",
    );
    assert_eq!(refused.status, 400);
    assert_eq!(
        entry("traced-4")["trace_id"],
        "0af7651916cd43dd8448eb211c80319c"
    );
}

// ---------------------------------------------------------------- top

/// The screen as text, one line per row.
fn screen(top: &Top, width: u16, height: u16) -> String {
    let mut terminal = Terminal::new(TestBackend::new(width, height)).expect("a test terminal");
    terminal.draw(|frame| top.draw(frame)).expect("draws");
    let buffer = terminal.backend().buffer();
    (0..height)
        .map(|y| {
            (0..width)
                .map(|x| buffer[(x, y)].symbol())
                .collect::<String>()
                .trim_end()
                .to_owned()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Streams with a TTFT of 300 ms through the router, one at a time.
fn timed_streams(router: &Router, n: usize) {
    for _ in 0..n {
        let resp = chat(
            router.addr,
            &[
                ("x-mock-role-chunk", "1"),
                ("x-mock-first-token-ms", "300"),
                ("x-mock-delay-ms", "10"),
            ],
            STREAM,
        );
        assert_eq!(resp.status, 200);
    }
}

/// Two readings of a live router with a healthy and a dead backend, rendered at
/// 80x24 and at 160x40: each backend with its state (and why the dead one is down),
/// its in-flight bar, the TTFT and rates of the last minute, and the status line.
#[test]
fn top_shows_a_live_router_in_an_80_by_24_terminal_and_uses_a_larger_one() {
    let mock = Mock::start(&[]);
    let dead = format!("http://127.0.0.1:{}", free_port());
    let router = Router::start_with(
        &servers_toml(&[(&mock.url, 4), (&dead, 2)], "max_queue_size = 9"),
        &[],
        &[],
    )
    .expect("router starts");
    router.wait_ready();
    let url = format!("http://{}", router.addr);
    let mut top = Top::new(&url, None);
    top.refresh();
    timed_streams(&router, 3);
    // A reading measures rates against one at least half a second older.
    std::thread::sleep(Duration::from_millis(600));
    wait_until(SOON, "the dead backend checked", || {
        router.health()["servers"][1]["reason"].is_string()
    });
    top.refresh();
    assert_eq!(top.status, Status::Up);

    let text = screen(&top, 80, 24);
    eprintln!("{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 24);
    assert!(lines[0].contains(&url), "{text}");
    assert!(text.contains("1/2 backends healthy"), "{text}");
    assert!(text.contains("queue 0/9"), "{text}");
    let live = mock.url.strip_prefix("http://").expect("http");
    let row = lines
        .iter()
        .find(|l| l.contains(live) && l.contains(" up "))
        .unwrap_or_else(|| panic!("a row for {live}:\n{text}"));
    assert!(
        row.contains("░░░░░░░░ 0/4"),
        "an empty in-flight bar: {row}"
    );
    // 300 ms lies in vLLM's 250-500 ms TTFT bucket: the quantiles read inside it.
    let ttft = row
        .split_whitespace()
        .find(|c| c.contains("ms/"))
        .unwrap_or_else(|| panic!("TTFT p50/p99 in {row}"));
    let (p50, p99) = ttft.split_once('/').expect("p50/p99");
    for q in [p50, p99] {
        let ms: f64 = q.trim_end_matches("ms").parse().expect("milliseconds");
        assert!((250.0..=500.0).contains(&ms), "{q} in {row}");
    }
    let down = dead.strip_prefix("http://").expect("http");
    assert!(
        lines
            .iter()
            .any(|l| l.contains(down) && l.contains(" down ")),
        "{text}"
    );
    let reason = router.health()["servers"][1]["reason"]
        .as_str()
        .expect("reason")
        .to_owned();
    let shown = &reason[..reason.len().min(20)];
    assert!(
        lines
            .iter()
            .any(|l| l.contains("down") && l.contains(down) && l.contains(shown)),
        "why {down} is down ({reason}):\n{text}"
    );
    assert!(text.contains("Rejected"), "{text}");
    assert!(lines[23].contains("q quit"), "{text}");
    for line in &lines {
        assert!(line.chars().count() <= 80, "{line}");
    }

    // A larger terminal gives the backend column the room: whole URLs, more rows.
    let wide = screen(&top, 160, 40);
    assert_eq!(wide.lines().count(), 40);
    assert!(
        wide.lines()
            .any(|l| l.contains(live) && l.chars().count() > 100),
        "{wide}"
    );
}

/// Protected status endpoints: without the key `top` says what to do; with it, it
/// reads. An unreachable router is said so, and tried again.
#[test]
fn top_takes_an_api_key_and_says_when_the_router_is_unreachable() {
    let mock = Mock::start(&[]);
    let router = Router::start(&servers_toml(
        &[(&mock.url, 2)],
        "api_keys = [\"top-key\"]\nprotect_status_endpoints = true",
    ));
    let url = format!("http://{}", router.addr);
    let mut top = Top::new(&url, None);
    top.refresh();
    match &top.status {
        Status::Down { error, .. } => assert!(error.contains("--api-key"), "{error}"),
        other => panic!("{other:?}"),
    }
    let mut top = Top::new(&url, Some(Secret::new("top-key")));
    top.refresh();
    assert_eq!(top.status, Status::Up);

    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let mut top = Top::new(&nowhere, None);
    top.refresh();
    top.refresh();
    assert!(
        matches!(top.status, Status::Down { attempts: 2, .. }),
        "{:?}",
        top.status
    );
    let text = screen(&top, 80, 24);
    assert!(
        text.lines()
            .last()
            .is_some_and(|l| l.contains("unreachable")),
        "{text}"
    );
}

/// A terminal tool the test needs: under CI a missing one fails the test (`make test`
/// installs it); elsewhere the test says so and is skipped.
fn have_tool(name: &str, package: &str) -> bool {
    let found = Command::new(name)
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found || std::env::var_os("CI").is_none(),
        "{name} is missing: install the Debian package {package} (`make test` does)"
    );
    if !found {
        eprintln!("skipped: {name} is missing (Debian package {package})");
    }
    found
}

/// A tmux session on its own server socket, killed when dropped.
struct Tmux {
    socket: PathBuf,
}

impl Tmux {
    /// Runs `command` in a detached 80x24 session.
    fn start(dir: &std::path::Path, command: &str) -> Tmux {
        let tmux = Tmux {
            socket: dir.join("tmux.sock"),
        };
        let ok = tmux
            .cmd(&[
                "new-session",
                "-d",
                "-s",
                "top",
                "-x",
                "80",
                "-y",
                "24",
                command,
            ])
            .status()
            .expect("tmux runs");
        assert!(ok.success(), "tmux new-session");
        tmux
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("tmux");
        cmd.arg("-S").arg(&self.socket).args(args);
        cmd.env_remove("TMUX");
        cmd
    }

    fn capture(&self) -> String {
        let out = self
            .cmd(&["capture-pane", "-p", "-t", "top"])
            .output()
            .expect("capture-pane");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn keys(&self, keys: &str) {
        let ok = self
            .cmd(&["send-keys", "-t", "top", keys])
            .status()
            .expect("send-keys");
        assert!(ok.success());
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd(&["kill-server"]).status();
    }
}

/// The real binary under a real pseudo-terminal (tmux, 80x24): it shows the router,
/// stays up and says so (trying again) while the router is gone, and
/// quits on q with status 0.
#[test]
fn top_runs_in_a_real_terminal_survives_the_router_going_away_and_quits_on_q() {
    if !have_tool("tmux", "tmux") {
        return;
    }
    let mock = Mock::start(&[]);
    let router = Router::start(&servers_toml(&[(&mock.url, 3)], ""));
    let port = router.addr.port();
    let dir = test_dir("top-tty");
    let status = dir.join("status");
    let command = format!(
        "env -u API_KEY TERM=xterm-256color {} top --url http://127.0.0.1:{port}; echo $? > {}; sleep 60",
        crate::support::ROUTER,
        status.display()
    );
    let tmux = Tmux::start(&dir, &command);
    let live = mock.url.strip_prefix("http://").expect("http").to_owned();
    let mut screen = String::new();
    wait_until(SOON, "top shows the backend", || {
        screen = tmux.capture();
        screen.contains(&live) && screen.contains("1/1 backends healthy")
    });
    assert!(screen.lines().all(|l| l.chars().count() <= 80), "{screen}");

    drop(router);
    wait_until(
        SOON,
        "top says the router is unreachable, and keeps trying",
        || {
            screen = tmux.capture();
            screen.contains("unreachable") && screen.contains("try 2")
        },
    );
    assert!(!status.exists(), "top exited when the router went away");

    tmux.keys("q");
    wait_until(SOON, "top exits", || status.exists());
    let code = std::fs::read_to_string(&status).expect("status");
    assert_eq!(code.trim(), "0", "exit status of top");
}
