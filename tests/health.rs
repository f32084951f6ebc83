use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::support::{
    chat_for, free_port, post, servers_toml, wait_until, Conn, Load, Mock, Router, CHAT, CHAT_BODY,
};

/// No `model`: these requests may go to any backend, whatever models it serves.
const STREAM_BODY: &str = r#"{"messages":[{"role":"user","content":"hi"}],"stream":true}"#;

/// Starts the router without waiting for any health check: each test waits for what
/// it needs itself.
fn start_router(toml: &str) -> Router {
    Router::start_with(toml, &[], &[]).unwrap_or_else(|e| panic!("router did not start: {e}"))
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

/// The router's count of requests admitted to backend `i`.
fn requests_total(router: &Router, i: usize) -> u64 {
    let s = router.server(i);
    s["requests_total"]
        .as_u64()
        .unwrap_or_else(|| panic!("server {i} has no requests_total: {s}"))
}

/// Waits for the next finished health check of backend `i` (one whose
/// `last_check_unix` differs from `prev`) and returns its server entry. A check's
/// figures and its health verdict are written together, so the entry read is the
/// outcome of that check.
fn next_check(router: &Router, i: usize, prev: Option<f64>) -> Value {
    let mut entry = Value::Null;
    wait_until(Duration::from_secs(5), "the next health check", || {
        entry = router.server(i);
        let at = entry["last_check_unix"].as_f64();
        at.is_some() && at != prev
    });
    entry
}

#[test]
fn a_killed_backend_is_routed_around_and_returns_on_the_same_port() {
    let a = Mock::start(&["--id", "first"]);
    let b = Mock::start(&["--id", "second"]);
    let port = a.addr.port();
    let router = start_router(&servers_toml(
        &[(&a.url, 4), (&b.url, 4)],
        "health_check_interval = 0.2\nhealth_check_timeout = 1\nfailure_threshold = 1\n\
         auto_recovery_threshold = 1\nmax_retries = 2\nretry_delay = 0.05",
    ));
    router.wait_healthy_servers(2);
    let load = Load::start(router.addr, 2);
    wait_until(
        Duration::from_secs(10),
        "both backends serve the load",
        || a.stat("total") > 0 && b.stat("total") > 0,
    );

    // Kill it between two requests: a request cut mid-way may rightly fail.
    let (admitted_before_kill, killed_at) = {
        let _quiet = load.pause();
        let admitted = requests_total(&router, 0);
        drop(a);
        (admitted, Instant::now())
    };
    wait_until(
        Duration::from_secs(5),
        "the killed backend is marked down",
        || !router.is_healthy(0),
    );
    let kill_to_down = killed_at.elapsed();
    let admitted_at_down = requests_total(&router, 0);
    assert!(
        admitted_at_down - admitted_before_kill <= 2,
        "the dead backend took {} requests before it was marked down (2 clients, \
         failure_threshold 1)",
        admitted_at_down - admitted_before_kill
    );
    let served = load.served();
    wait_until(Duration::from_secs(10), "20 more requests", || {
        load.served() >= served + 20
    });
    assert_eq!(
        requests_total(&router, 0),
        admitted_at_down,
        "a backend marked down still gets requests: {}",
        router.server(0)
    );

    let restarted_at = Instant::now();
    let port_arg = port.to_string();
    let a = Mock::start(&["--id", "first-again", "--port", &port_arg]);
    assert_eq!(a.addr.port(), port, "restarted on the same port");
    wait_until(
        Duration::from_secs(15),
        "the restarted backend serves a request",
        || a.stat("total") > 0,
    );
    let restart_to_served = restarted_at.elapsed();
    assert!(router.is_healthy(0), "{}", router.server(0));
    let total = load.served();
    let failures = load.stop();
    assert!(
        failures.is_empty(),
        "{} of {total} requests failed: {failures:?}",
        failures.len()
    );
    assert!(b.stat("total") > 0);
    eprintln!(
        "kill -> marked down: {kill_to_down:?}; restart -> first request served by it: \
         {restart_to_served:?} ({total} requests, none failed)"
    );
}

#[test]
fn a_hung_backend_does_not_delay_the_checks_of_another() {
    let hung = Mock::start(&["--id", "hung"]);
    let good = Mock::start(&["--id", "good"]);
    let router = start_router(&servers_toml(
        &[(&hung.url, 2), (&good.url, 2)],
        "health_check_interval = 0.2\nhealth_check_timeout = 2\n\
         health_check_consecutive_failures = 1",
    ));
    router.wait_healthy_servers(2);
    // From now on it accepts connections and never answers /health.
    hung.set_mode("hang");
    let started = Instant::now();
    let (mut last_at, mut last_change) = (None, Instant::now());
    let (mut max_gap, mut advances) = (Duration::ZERO, 0);
    let mut hung_down = None;
    // Watch for 5 s, more than two whole check timeouts of the hung backend.
    while started.elapsed() < Duration::from_secs(5) || hung_down.is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the hung backend was never marked unhealthy: {}",
            router.server(0)
        );
        let health = router.health();
        let (h, g) = (&health["servers"][0], &health["servers"][1]);
        assert_eq!(g["healthy"], true, "the good backend stays healthy: {g}");
        assert!(g["reason"].is_null(), "{g}");
        let at = g["last_check_unix"]
            .as_f64()
            .unwrap_or_else(|| panic!("no last_check_unix: {g}"));
        assert!(
            (unix_now() - at).abs() < 5.0,
            "last_check_unix {at} is not the time of a recent check (now {})",
            unix_now()
        );
        if last_at != Some(at) {
            if last_at.is_some() {
                advances += 1;
                max_gap = max_gap.max(last_change.elapsed());
            }
            (last_at, last_change) = (Some(at), Instant::now());
        }
        if hung_down.is_none() && h["healthy"] == false {
            hung_down = Some(started.elapsed());
            assert!(
                h["reason"].as_str().is_some_and(|r| !r.is_empty()),
                "an unhealthy backend says why: {h}"
            );
        }
        thread::sleep(Duration::from_millis(10));
    }
    max_gap = max_gap.max(last_change.elapsed());
    assert!(
        max_gap < Duration::from_secs(1),
        "the good backend went {max_gap:?} without a check while the other hung"
    );
    assert!(advances >= 5, "only {advances} checks of the good backend");
    let h = router.server(0);
    assert!(
        h["consecutive_failures"].as_u64().is_some_and(|n| n >= 1),
        "{h}"
    );
    eprintln!(
        "hung backend marked down after {:?}; good backend: {advances} checks, longest gap \
         {max_gap:?}",
        hung_down.expect("marked down")
    );
}

#[test]
fn a_flapping_backend_needs_several_good_checks_to_return() {
    let mock = Mock::start(&[]);
    let router = start_router(&servers_toml(
        &[(&mock.url, 2)],
        "health_check_interval = 0.5\nhealth_check_timeout = 1\n\
         health_check_consecutive_failures = 2\nhealth_check_recovery_successes = 3",
    ));

    // The start-up check decides at once: the recovery rule does not apply to it.
    let s = next_check(&router, 0, None);
    assert_eq!(
        s["healthy"], true,
        "healthy after its first good check: {s}"
    );
    assert!(s["reason"].is_null(), "{s}");
    assert_eq!(s["url"], mock.url.as_str(), "{s}");
    assert_eq!(s["max_concurrent_requests"], 2, "{s}");
    assert_eq!(s["in_flight"], 0, "{s}");
    assert_eq!(s["consecutive_failures"], 0, "{s}");
    assert_eq!(s["request_failures"], 0, "{s}");
    assert_eq!(s["success_rate"].as_f64(), Some(1.0), "{s}");
    assert!(
        s["last_check_latency_ms"]
            .as_f64()
            .is_some_and(|ms| (0.0..1000.0).contains(&ms)),
        "{s}"
    );
    assert_eq!(s["models"], serde_json::json!(["mock-model"]), "{s}");

    mock.set_mode("fail");
    let mut prev = s["last_check_unix"].as_f64();
    let mut down = false;
    for _ in 0..20 {
        let s = next_check(&router, 0, prev);
        prev = s["last_check_unix"].as_f64();
        match s["consecutive_failures"].as_u64() {
            Some(0) => {} // a check that was already under way
            Some(1) => assert_eq!(
                s["healthy"], true,
                "one failed check is not enough (consecutive_failures = 2): {s}"
            ),
            Some(_) => {
                assert_eq!(s["healthy"], false, "two failed checks in a row: {s}");
                assert!(s["reason"].as_str().is_some_and(|r| !r.is_empty()), "{s}");
                down = true;
                break;
            }
            None => panic!("no consecutive_failures: {s}"),
        }
    }
    assert!(down, "never marked down: {}", router.server(0));

    mock.set_mode("ok");
    let mut good_checks = 0;
    for _ in 0..20 {
        let s = next_check(&router, 0, prev);
        prev = s["last_check_unix"].as_f64();
        if s["consecutive_failures"] != 0 {
            good_checks = 0; // a failing check that was already under way
            continue;
        }
        good_checks += 1;
        if good_checks < 3 {
            assert_eq!(
                s["healthy"], false,
                "back after only {good_checks} good check(s) (recovery_successes = 3): {s}"
            );
        } else {
            assert_eq!(s["healthy"], true, "still down after 3 good checks: {s}");
            assert!(s["reason"].is_null(), "{s}");
            return;
        }
    }
    panic!("never healthy again: {}", router.server(0));
}

#[test]
fn client_errors_never_mark_a_backend_down_but_a_503_does() {
    let mock = Mock::start(&[]);
    let router = start_router(&servers_toml(
        &[(&mock.url, 2)],
        "enable_active_health_check = false\nfailure_threshold = 1\nmax_retries = 2\n\
         retry_delay = 0",
    ));
    // Without active checks a backend is trusted from the start and never checked.
    let s = router.server(0);
    assert_eq!(s["healthy"], true, "{s}");
    assert!(s["reason"].is_null(), "{s}");
    assert_eq!(s["request_failures"], 0, "{s}");
    assert_eq!(s["consecutive_failures"], 0, "{s}");
    for key in ["success_rate", "last_check_unix", "last_check_latency_ms"] {
        assert!(s[key].is_null(), "{key} before any check: {s}");
    }
    let statuses = [400, 404, 422].iter().cycle().take(10);
    // 429 and 500 are not backend failures either.
    for status in statuses.chain(&[429, 500]) {
        let forced = status.to_string();
        let resp = post(router.addr, &[("x-mock-status", &forced)], CHAT_BODY);
        assert_eq!(resp.status, *status, "{}", resp.text());
        let s = router.server(0);
        assert_eq!(s["healthy"], true, "after a {status}: {s}");
        assert_eq!(s["request_failures"], 0, "after a {status}: {s}");
    }
    let resp = post(router.addr, &[("x-mock-status", "503")], CHAT_BODY);
    assert_eq!(resp.status, 503, "{}", resp.text());
    assert_eq!(resp.json()["error"]["type"], "mock_error");
    let s = router.server(0);
    assert_eq!(s["healthy"], false, "a 503 reply is a failure: {s}");
    assert!(s["reason"].as_str().is_some_and(|r| !r.is_empty()), "{s}");
    assert_eq!(s["request_failures"], 1, "{s}");
    assert_eq!(
        mock.stat("total"),
        13,
        "each request reached the backend exactly once"
    );
}

#[test]
fn a_timed_out_request_is_answered_504_and_never_sent_twice() {
    let a = Mock::start(&[]);
    let b = Mock::start(&[]);
    let router = start_router(&servers_toml(
        &[(&a.url, 2), (&b.url, 2)],
        "enable_active_health_check = false\nrequest_timeout = 1\nmax_retries = 3\n\
         retry_delay = 0",
    ));
    let started = Instant::now();
    let resp = post(
        router.addr,
        &[("x-mock-first-byte-delay-ms", "3000")],
        CHAT_BODY,
    );
    let took = started.elapsed();
    assert_eq!(resp.status, 504, "{}", resp.text());
    assert_eq!(resp.json()["error"]["code"], "backend_timeout");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2900),
        "answered after {took:?}, request_timeout is 1 s"
    );
    let sent = || a.stat("total") + b.stat("total");
    assert_eq!(sent(), 1, "the prompt was sent more than once");
    wait_until(
        Duration::from_secs(10),
        "the backend finishes the slow request",
        || a.stat("in_flight") + b.stat("in_flight") == 0,
    );
    assert_eq!(sent(), 1, "the prompt was sent more than once");
}

#[test]
fn a_503_is_retried_on_another_backend_never_on_the_same_one() {
    let a = Mock::start(&["--id", "alpha", "--mode", "fail"]);
    let b = Mock::start(&["--id", "bravo"]);
    let router = start_router(&servers_toml(
        &[(&a.url, 2), (&b.url, 2)],
        "enable_active_health_check = false\nfailure_threshold = 10\nmax_retries = 1\n\
         retry_delay = 0.05",
    ));
    // One long request keeps bravo busy (its try on alpha fails over to bravo), so
    // alpha, idle, is the less loaded backend: the natural pick for the first try and,
    // unless the router remembers it was tried, for the retry too.
    let addr = router.addr;
    let holder = thread::spawn(move || {
        let hold = [("x-mock-tokens", "1"), ("x-mock-delay-ms", "3000")];
        post(addr, &hold, CHAT_BODY)
    });
    wait_until(
        Duration::from_secs(5),
        "a long request runs on bravo",
        || b.stat("in_flight") == 1,
    );
    let mut alpha_tried = false;
    for _ in 0..10 {
        let (ta, tb) = (a.stat("total"), b.stat("total"));
        let resp = post(router.addr, &[], CHAT_BODY);
        assert_eq!(resp.status, 200, "{}", resp.text());
        assert_eq!(resp.header("x-mock-backend"), Some("bravo"));
        assert_eq!(resp.json()["backend"], "bravo");
        let (da, db) = (a.stat("total") - ta, b.stat("total") - tb);
        assert_eq!(db, 1, "bravo served it once");
        assert!(da <= 1, "alpha was tried {da} times for one request");
        if da == 1 {
            alpha_tried = true;
            break;
        }
    }
    assert!(
        alpha_tried,
        "no request tried alpha: the retry was never needed"
    );

    // Every backend answers 503: the client gets the last one's reply. The first try
    // takes 400 ms, so which backend went first can be seen from outside.
    b.set_mode("fail");
    let (ta, tb) = (a.stat("total"), b.stat("total"));
    let client =
        thread::spawn(move || post(addr, &[("x-mock-first-byte-delay-ms", "400")], CHAT_BODY));
    let mut first = "";
    wait_until(
        Duration::from_secs(10),
        "the first try reaches a backend",
        || {
            let (da, db) = (a.stat("total") - ta, b.stat("total") - tb);
            assert!(da + db <= 1, "both backends tried at once");
            first = match (da, db) {
                (1, _) => "alpha",
                (_, 1) => "bravo",
                _ => "",
            };
            !first.is_empty()
        },
    );
    let last = if first == "alpha" { "bravo" } else { "alpha" };
    let resp = client.join().expect("client thread");
    assert_eq!(resp.status, 503, "{}", resp.text());
    let body = resp.json();
    assert_eq!(body["error"]["type"], "mock_error", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains(last)),
        "not the reply of {last}, the backend tried last: {body}"
    );
    assert_eq!(
        (a.stat("total") - ta, b.stat("total") - tb),
        (1, 1),
        "each backend tried once"
    );
    let held = holder.join().expect("holder thread");
    assert_eq!(held.status, 200, "{}", held.text());
    assert_eq!(held.header("x-mock-backend"), Some("bravo"));
}

#[test]
fn a_backend_marked_down_by_failed_requests_returns_without_active_checks() {
    let mock = Mock::start(&["--mode", "fail"]);
    let router = start_router(&servers_toml(
        &[(&mock.url, 2)],
        "enable_active_health_check = false\nfailure_threshold = 2\n\
         auto_recovery_threshold = 1",
    ));
    assert_eq!(post(router.addr, &[], CHAT_BODY).status, 503);
    let s = router.server(0);
    assert_eq!(s["healthy"], true, "one failure of two: {s}");
    assert_eq!(s["request_failures"], 1, "{s}");
    assert_eq!(post(router.addr, &[], CHAT_BODY).status, 503);
    let s = router.server(0);
    let marked_down = Instant::now();
    assert_eq!(s["healthy"], false, "two failed requests in a row: {s}");
    assert_eq!(s["request_failures"], 2, "{s}");
    assert!(
        s["reason"]
            .as_str()
            .is_some_and(|r| r.to_lowercase().contains("request")),
        "the reason names the failed requests: {s}"
    );
    // While down it gets no traffic: the router answers by itself.
    assert_eq!(post(router.addr, &[], CHAT_BODY).status, 503);
    assert_eq!(mock.stat("total"), 2, "a backend marked down got a request");

    mock.set_mode("ok");
    wait_until(
        Duration::from_secs(6),
        "the backend is probed and healthy again",
        || router.is_healthy(0),
    );
    let took = marked_down.elapsed();
    assert!(
        took >= Duration::from_millis(800),
        "back after {took:?}, before auto_recovery_threshold (1 s)"
    );
    let resp = post(router.addr, &[], CHAT_BODY);
    assert_eq!(resp.status, 200, "{}", resp.text());
    eprintln!("marked down by requests -> healthy again: {took:?}");
}

#[test]
fn requests_go_only_to_backends_serving_their_model() {
    let a = Mock::start(&["--id", "A", "--model", "a"]);
    let b = Mock::start(&["--id", "B", "--model", "b"]);
    let router = start_router(&servers_toml(
        &[(&a.url, 2), (&b.url, 2)],
        "health_check_interval = 0.2\nhealth_check_timeout = 1\nqueue_timeout = 1",
    ));
    router.wait_healthy_servers(2);
    wait_until(Duration::from_secs(10), "/v1/models lists a and b", || {
        router.model_ids() == ["a", "b"]
    });
    assert_eq!(router.server(0)["models"], serde_json::json!(["a"]));
    assert_eq!(router.server(1)["models"], serde_json::json!(["b"]));
    // Four in a row for each: taking turns alone would send every other one elsewhere.
    for (model, id) in [("a", "A"), ("b", "B")] {
        for _ in 0..4 {
            let resp = post(router.addr, &[], &chat_for(model));
            assert_eq!(resp.status, 200, "{}", resp.text());
            assert_eq!(resp.header("x-mock-backend"), Some(id), "model {model}");
        }
    }
    assert_eq!((a.stat("total"), b.stat("total")), (4, 4));

    let resp = post(router.addr, &[], &chat_for("nope"));
    assert_eq!(resp.status, 404, "{}", resp.text());
    let body = resp.json();
    assert_eq!(body["error"]["code"], "model_not_found", "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("nope")),
        "{body}"
    );
    assert_eq!((a.stat("total"), b.stat("total")), (4, 4));

    drop(b);
    wait_until(Duration::from_secs(10), "B is marked down", || {
        !router.is_healthy(1)
    });
    let resp = post(router.addr, &[], &chat_for("b"));
    assert_eq!(resp.status, 503, "{}", resp.text());
    assert!(resp.json()["error"].is_object(), "{}", resp.text());
    assert_eq!(router.model_ids(), ["a"]);
    let resp = post(router.addr, &[], &chat_for("a"));
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.header("x-mock-backend"), Some("A"));
}

#[test]
fn models_of_a_backend_that_comes_up_later_are_listed() {
    let a = Mock::start(&["--id", "A", "--model", "a"]);
    let port = free_port();
    let late = format!("http://127.0.0.1:{port}");
    let router = start_router(&servers_toml(
        &[(&a.url, 2), (&late, 2)],
        "health_check_interval = 0.2\nhealth_check_timeout = 1",
    ));
    router.wait_ready();
    wait_until(Duration::from_secs(10), "/v1/models lists a", || {
        router.model_ids() == ["a"]
    });
    assert!(!router.is_healthy(1), "{}", router.server(1));

    let port_arg = port.to_string();
    let b = Mock::start(&[
        "--id", "B", "--model", "a", "--model", "c", "--port", &port_arg,
    ]);
    wait_until(Duration::from_secs(10), "/v1/models lists a and c", || {
        router.model_ids() == ["a", "c"]
    });
    let resp = post(router.addr, &[], &chat_for("c"));
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.header("x-mock-backend"), Some("B"));
    assert_eq!(b.stat("total"), 1);
}

#[test]
fn a_stream_longer_than_request_timeout_is_not_cut() {
    let mock = Mock::start(&[]);
    let router = start_router(&servers_toml(
        &[(&mock.url, 2)],
        "enable_active_health_check = false\nrequest_timeout = 1",
    ));
    let started = Instant::now();
    let mut conn = Conn::open(router.addr);
    conn.send(
        "POST",
        CHAT,
        &[
            ("Content-Type", "application/json"),
            ("x-mock-tokens", "30"),
            ("x-mock-delay-ms", "100"),
        ],
        STREAM_BODY.as_bytes(),
        true,
    );
    let (status, _) = conn.read_head().expect("stream head");
    assert_eq!(status, 200);
    let mut body = String::new();
    loop {
        match conn.read_chunk() {
            Ok(Some(chunk)) => body.push_str(&String::from_utf8_lossy(&chunk)),
            Ok(None) => break,
            Err(e) => panic!("stream cut after {:?}: {e}\n{body}", started.elapsed()),
        }
    }
    let took = started.elapsed();
    let events: Vec<&str> = body
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .collect();
    assert_eq!(events.len(), 31, "30 tokens and [DONE]: {body}");
    assert_eq!(events[30], "[DONE]");
    for (i, e) in events[..30].iter().enumerate() {
        let ev: Value = serde_json::from_str(e).expect("event JSON");
        assert_eq!(ev["index"], i, "{e}");
    }
    assert!(
        took >= Duration::from_millis(2900),
        "the stream took only {took:?}"
    );
}
