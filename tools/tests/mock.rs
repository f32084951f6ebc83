//! The mock and the harness together: `mock-vllm` started by the process launcher,
//! driven by the HTTP client. Being an integration test of this package, it also
//! makes `cargo test` build the tools' binaries, which the root package's tests run.

use std::process::{Command, Stdio};
use std::time::Duration;

use vllm_router_tools::http::{self, Conn};
use vllm_router_tools::process::{self, Proc};

const MOCK: &str = env!("CARGO_BIN_EXE_mock-vllm");

fn start_mock() -> (Proc, std::net::SocketAddr) {
    let mut cmd = Command::new(MOCK);
    cmd.args(["--host", "127.0.0.1", "--port", "0", "--id", "harness"])
        .stderr(Stdio::null());
    process::spawn_listening(cmd, "mock-vllm").expect("mock starts")
}

#[test]
fn the_mock_answers_the_harness_and_counts_tagged_requests() {
    let (_mock, addr) = start_mock();
    let stats = http::get_json(addr, "/mock/stats").expect("stats");
    assert_eq!(stats["id"], "harness");
    assert_eq!(stats["in_flight"], 0);

    let body =
        br#"{"model":"mock-model","messages":[{"role":"user","content":"hi"}],"max_tokens":3}"#;
    let mut conn = Conn::connect(addr, Duration::from_secs(10)).expect("connect");
    for _ in 0..2 {
        conn.send(
            "POST",
            "/v1/chat/completions",
            &[("Content-Type", "application/json"), ("X-Mock-Tag", "t1")],
            body,
            false,
        );
        let resp = conn.read_response(false).expect("a reply");
        assert_eq!(resp.status, 200, "{}", resp.text());
        assert!(resp.json()["choices"][0]["message"]["content"].is_string());
    }
    let stats = http::get_json(addr, "/mock/stats").expect("stats");
    assert_eq!(stats["tags"]["t1"], 2, "{stats}");
    assert_eq!(stats["total"], 2, "{stats}");
    assert_eq!(stats["peak_in_flight"], 1, "{stats}");

    let reset = http::fetch(
        addr,
        "POST",
        "/mock/reset",
        &[],
        b"",
        Duration::from_secs(10),
    )
    .expect("reset");
    assert_eq!(reset.status, 200);
    let stats = http::get_json(addr, "/mock/stats").expect("stats");
    assert_eq!(stats["tags"], serde_json::json!({}), "{stats}");
}

#[test]
fn a_stream_arrives_in_chunks_and_a_closed_connection_is_unanswered() {
    let (mut mock, addr) = start_mock();
    let body = br#"{"model":"mock-model","prompt":"x","max_tokens":4,"stream":true}"#;
    let resp = http::fetch(
        addr,
        "POST",
        "/v1/completions",
        &[
            ("Content-Type", "application/json"),
            ("x-mock-delay-ms", "0"),
        ],
        body,
        Duration::from_secs(10),
    )
    .expect("a stream");
    assert_eq!(resp.status, 200);
    assert!(resp.chunks.len() >= 4, "{} chunks", resp.chunks.len());
    assert!(resp.text().ends_with("data: [DONE]\n\n"), "{}", resp.text());

    assert!(
        mock.terminate(Duration::from_secs(5)),
        "the mock stops on SIGTERM"
    );
    let err = http::get(addr, "/mock/stats").expect_err("nobody listens");
    assert!(err.starts_with("connect"), "{err}");
}

#[test]
fn the_prefix_cache_counts_in_vllms_counters_and_prefills_only_what_it_misses() {
    let mut cmd = Command::new(MOCK);
    cmd.args(["--host", "127.0.0.1", "--port", "0"])
        .args([
            "--prefix-cache-tokens",
            "100000",
            "--prefill-us-per-token",
            "500",
        ])
        .stderr(Stdio::null());
    let (_mock, addr) = process::spawn_listening(cmd, "mock-vllm").expect("mock starts");
    // About 1000 tokens (four bytes each) of one system prompt.
    let system = "a system prompt that stays the same. ".repeat(108);
    let body = |question: &str| {
        serde_json::json!({"model": "mock-model", "max_tokens": 1, "messages": [
            {"role": "system", "content": system}, {"role": "user", "content": question}]})
        .to_string()
    };
    let timed = |b: String| {
        let started = std::time::Instant::now();
        let resp = http::fetch(
            addr,
            "POST",
            "/v1/chat/completions",
            &[],
            b.as_bytes(),
            Duration::from_secs(30),
        )
        .expect("a reply");
        assert_eq!(resp.status, 200, "{}", resp.text());
        started.elapsed()
    };
    let cold = timed(body("first question"));
    let warm = timed(body("second question"));
    // The whole prompt's prefill, then only the part after the system prompt.
    assert!(cold >= Duration::from_millis(500), "{cold:?}");
    assert!(warm < cold / 2, "{warm:?} against {cold:?}");
    let text = http::get(addr, "/metrics").expect("metrics").text();
    let counter = |name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(&format!("{name}{{")))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("{name} in\n{text}"))
    };
    assert!(
        text.contains("# TYPE vllm:prefix_cache_queries counter"),
        "{text}"
    );
    let (queries, hits) = (
        counter("vllm:prefix_cache_queries_total"),
        counter("vllm:prefix_cache_hits_total"),
    );
    assert!(queries >= 2000.0, "{text}");
    // The second request found the system prompt, in whole blocks of 16 tokens.
    assert!(hits >= 950.0 && hits < queries / 2.0, "{text}");
    assert_eq!(hits % 16.0, 0.0);
}
