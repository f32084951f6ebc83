//! Live operations against the real processes: hot reload of `servers.toml` (on its
//! interval, after an editor's rename, on SIGHUP), graceful shutdown on SIGTERM/SIGINT,
//! `--pid-file`, log reopening on SIGUSR1, the access log and the request id.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{
    chat_for, free_port, parse_json_lines, post, request, servers_toml, test_dir, try_post,
    wait_until, Conn, Load, Mock, Router, CHAT, CHAT_BODY, SOON,
};

/// Frequent reloads and health checks, so a reload shows within a fraction of a second.
const FAST: &str = "config_reload_interval = 0.2\nhealth_check_interval = 0.2";

const HUMAN_LOG: &str = "vllm-router.log";
const JSON_LOG: &str = "vllm-router-structured.log";

/// `/health`'s entry for the backend at `url`, if listed.
fn entry(router: &Router, url: &str) -> Option<Value> {
    router.health()["servers"]
        .as_array()
        .expect("servers")
        .iter()
        .find(|s| s["url"] == url)
        .cloned()
}

/// The URLs `/health` lists, in its order.
fn listed(router: &Router) -> Vec<String> {
    router.health()["servers"]
        .as_array()
        .expect("servers")
        .iter()
        .map(|s| s["url"].as_str().expect("url").to_owned())
        .collect()
}

/// (url, max_concurrent_requests, healthy) per backend: what a reload may change.
fn shape(router: &Router) -> Vec<(String, u64, bool)> {
    router.health()["servers"]
        .as_array()
        .expect("servers")
        .iter()
        .map(|s| {
            (
                s["url"].as_str().expect("url").to_owned(),
                s["max_concurrent_requests"].as_u64().expect("max"),
                s["healthy"].as_bool().expect("healthy"),
            )
        })
        .collect()
}

fn queue_length(router: &Router) -> u64 {
    router.get_json("/load-stats")["summary"]["queue_length"]
        .as_u64()
        .expect("queue_length")
}

/// Every in-flight count in `/load-stats` is 0, the summary's too.
fn all_idle(router: &Router) -> bool {
    let stats = router.get_json("/load-stats");
    stats["summary"]["total_in_flight"] == 0
        && stats["servers"]
            .as_array()
            .expect("servers")
            .iter()
            .all(|s| s["in_flight"] == 0)
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.lines().filter(|l| l.contains(needle)).count()
}

/// The structured log's entries at `level` whose message contains `needle`.
fn messages(router: &Router, level: &str, needle: &str) -> Vec<String> {
    router
        .structured_log()
        .iter()
        .filter(|e| e["level"] == level)
        .filter_map(|e| e["message"].as_str())
        .filter(|m| m.contains(needle))
        .map(str::to_owned)
        .collect()
}

/// `wait_until` for a reload's effects, with SOON as the bound; on timeout the panic
/// shows `/health` and the end of the router's log.
fn wait_reload(router: &Router, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + SOON;
    while !cond() {
        if Instant::now() >= deadline {
            let log = router.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(60)..].join("\n");
            panic!(
                "timed out after {SOON:?} waiting for: {what}\n/health: {}\nlog tail:\n{tail}",
                router.health()
            );
        }
        thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------- streams

/// A streamed chat completion through the router, read event by event.
struct Sse {
    conn: Conn,
    buf: Vec<u8>,
}

/// How a stream ended: the events read, and the error if it did not end properly.
struct StreamEnd {
    events: Vec<String>,
    error: Option<String>,
}

impl Sse {
    /// Opens a stream of `tokens` events `delay_ms` apart for `model`, and reads its head.
    fn open(addr: SocketAddr, model: &str, tokens: u32, delay_ms: u32, id: &str) -> Sse {
        let (tokens, delay) = (tokens.to_string(), delay_ms.to_string());
        let body = format!(
            r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}],"stream":true}}"#
        );
        let mut conn = Conn::open(addr);
        conn.send(
            "POST",
            CHAT,
            &[
                ("Content-Type", "application/json"),
                ("x-mock-tokens", &tokens),
                ("x-mock-delay-ms", &delay),
                ("X-Request-Id", id),
            ],
            body.as_bytes(),
            true,
        );
        let (status, headers) = conn.read_head().expect("stream head");
        assert_eq!(status, 200, "stream {id}: {headers:?}");
        assert!(
            headers
                .iter()
                .any(|(n, v)| n.eq_ignore_ascii_case("content-type")
                    && v.starts_with("text/event-stream")),
            "stream {id}: {headers:?}"
        );
        Sse {
            conn,
            buf: Vec::new(),
        }
    }

    /// The complete events received so far.
    fn events(&self) -> Vec<String> {
        let text = String::from_utf8_lossy(&self.buf);
        let mut events: Vec<String> = text.split("\n\n").map(str::to_owned).collect();
        events.pop(); // what follows the last blank line: empty, or an event in progress
        events
    }

    /// Reads until `n` events have arrived; panics if the stream ends first.
    fn read_events(&mut self, n: usize) {
        while self.events().len() < n {
            match self.conn.read_chunk() {
                Ok(Some(chunk)) => self.buf.extend_from_slice(&chunk),
                Ok(None) => panic!("stream ended after {:?}", self.events()),
                Err(e) => panic!("stream broke ({e}) after {:?}", self.events()),
            }
        }
    }

    /// The JSON of event `i`.
    fn event(&self, i: usize) -> Value {
        let events = self.events();
        let data = events[i].strip_prefix("data: ").expect("data: event");
        serde_json::from_str(data).expect("event JSON")
    }

    /// Reads to the end of the reply.
    fn finish(mut self) -> StreamEnd {
        let error = loop {
            match self.conn.read_chunk() {
                Ok(Some(chunk)) => self.buf.extend_from_slice(&chunk),
                Ok(None) => break None,
                Err(e) => break Some(e),
            }
        };
        StreamEnd {
            events: self.events(),
            error,
        }
    }

    /// Reads the rest of the stream on another thread.
    fn finish_in_background(self) -> JoinHandle<StreamEnd> {
        thread::spawn(move || self.finish())
    }
}

/// Panics unless the stream ended properly with tokens 0..n in order, then `[DONE]`.
fn assert_complete(end: &StreamEnd, n: usize, what: &str) {
    assert!(
        end.error.is_none(),
        "{what} broke ({:?}) after {} events: {:?}",
        end.error,
        end.events.len(),
        end.events.last()
    );
    assert_eq!(
        end.events.len(),
        n + 1,
        "{what}: {n} tokens and [DONE] expected, got {:?}",
        end.events
    );
    for (i, event) in end.events[..n].iter().enumerate() {
        let data: Value = event
            .strip_prefix("data: ")
            .and_then(|d| serde_json::from_str(d).ok())
            .unwrap_or_else(|| panic!("{what}: event {i} is {event:?}"));
        assert_eq!(data["index"], i, "{what}: events out of order: {event}");
    }
    assert_eq!(end.events[n], "data: [DONE]", "{what}");
}

// ---------------------------------------------------------------- load

// ---------------------------------------------------------------- reload

#[test]
fn a_reload_under_load_adds_removes_and_resizes_without_a_failed_request() {
    let a = Mock::start(&["--id", "a"]);
    let b = Mock::start(&["--id", "b", "--model", "model-b"]);
    let c = Mock::start(&["--id", "c"]);
    let router = Router::start(&servers_toml(&[(&a.url, 2), (&b.url, 2)], FAST));
    wait_until(SOON, "B's model is known", || {
        router.model_ids().contains(&"model-b".to_owned())
    });
    let load = Load::start(router.addr, 2);
    wait_until(SOON, "A and B both serve the load", || {
        a.stat("total") > 0 && b.stat("total") > 0
    });

    // A long stream that only B can serve, in flight across the reload.
    let mut stream = Sse::open(router.addr, "model-b", 30, 50, "long-on-b");
    stream.read_events(1);
    assert_eq!(stream.event(0)["backend"], "b", "the stream runs on B");
    let stream = stream.finish_in_background();

    let a_admitted = entry(&router, &a.url).expect("A")["requests_total"]
        .as_u64()
        .expect("requests_total");
    let edited = Instant::now();
    router.write_config(&servers_toml(&[(&a.url, 3), (&c.url, 2)], FAST));
    wait_reload(&router, "/health lists A and C, not B", || {
        listed(&router) == [a.url.clone(), c.url.clone()]
    });
    let listed_after = edited.elapsed();
    wait_reload(&router, "C serves requests", || c.stat("total") > 0);
    let serving_after = edited.elapsed();
    eprintln!(
        "reload ({FAST:?}): listed after {listed_after:?}, C took traffic {serving_after:?} \
         after the file was written"
    );

    // Between two rounds of the load, nothing is on its way to B but the stream.
    let b_total = {
        let _quiet = load.pause();
        b.stat("total")
    };
    let served = load.served();
    wait_until(Duration::from_secs(10), "40 more requests", || {
        load.served() >= served + 40
    });
    assert_eq!(
        b.stat("total"),
        b_total,
        "the removed backend still gets requests"
    );

    let a_after = entry(&router, &a.url).expect("A listed");
    assert_eq!(a_after["max_concurrent_requests"], 3, "{a_after}");
    assert_eq!(a_after["healthy"], true, "{a_after}");
    assert!(
        a_after["requests_total"].as_u64().expect("requests_total") > a_admitted,
        "A kept its counters across the reload: {a_after}, before {a_admitted}"
    );
    let c_after = entry(&router, &c.url).expect("C listed");
    assert_eq!(c_after["healthy"], true, "{c_after}");
    assert_eq!(c_after["max_concurrent_requests"], 2, "{c_after}");

    assert_complete(
        &stream.join().expect("stream reader"),
        30,
        "the stream on B",
    );
    let failures = load.stop();
    assert!(failures.is_empty(), "requests failed: {failures:?}");
    assert!(a.stat("peak_in_flight") <= 3, "A: {}", a.stats());
    wait_until(SOON, "nothing in flight", || all_idle(&router));
    assert_eq!(b.stat("in_flight"), 0);

    let log = router.log();
    let reloads: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("config reloaded"))
        .collect();
    assert_eq!(reloads.len(), 1, "one reload, logged once: {reloads:?}");
    for part in [
        format!("added {}", c.url),
        format!("removed {}", b.url),
        format!("{} capacity 2 -> 3", a.url),
    ] {
        assert!(
            reloads[0].contains(&part),
            "{part:?} not in {:?}",
            reloads[0]
        );
    }
    for url in [&a.url, &c.url] {
        assert_eq!(
            count(&log, &format!("backend {url} is up")),
            1,
            "{url}'s health transition logged once:\n{log}"
        );
    }
}

#[test]
fn an_invalid_file_changes_nothing_and_its_error_is_logged_with_line_and_column() {
    let a = Mock::start(&[]);
    let b = Mock::start(&[]);
    let settings = "config_reload_interval = 0.2";
    let router = Router::start(&servers_toml(&[(&a.url, 2)], settings));
    let before = shape(&router);

    // A value out of range: line 3 is the server; the column is that of the `0`.
    let zero = servers_toml(&[(&a.url, 0), (&b.url, 1)], settings);
    let line3 = zero.lines().nth(2).expect("line 3");
    let col = line3.find("= 0").expect("= 0") + 3;
    let expected = format!("servers.toml:3:{col}: max_concurrent_requests must be at least 1");
    router.write_config(&zero);
    wait_reload(&router, &format!("{expected:?} in the log"), || {
        router.log().contains(&expected)
    });
    for _ in 0..10 {
        let resp = post(router.addr, &[], CHAT_BODY);
        assert_eq!(resp.status, 200, "{}", resp.text());
    }
    // Several intervals pass: the same bad file is not applied, nor logged again.
    thread::sleep(Duration::from_millis(600));
    assert_eq!(
        shape(&router),
        before,
        "an invalid file changed the servers"
    );
    assert_eq!(b.stat("total"), 0);
    assert_eq!(
        count(&router.log(), &expected),
        1,
        "one error per bad version:\n{}",
        router.log()
    );
    let line = router
        .log()
        .lines()
        .find(|l| l.contains(&expected))
        .map(str::to_owned)
        .expect("error line");
    assert!(line.contains("[ERROR]"), "{line}");

    // A syntax error: `[config` unclosed on line 6.
    let broken = servers_toml(&[(&a.url, 4)], settings).replace("[config]", "[config");
    router.write_config(&broken);
    wait_reload(&router, "the syntax error in the log", || {
        router.log().contains("servers.toml:6:8:")
    });
    assert_eq!(shape(&router), before, "a broken file changed the servers");
    assert_eq!(post(router.addr, &[], CHAT_BODY).status, 200);

    // A valid file is applied again.
    router.write_config(&servers_toml(&[(&a.url, 5), (&b.url, 1)], settings));
    wait_reload(&router, "the valid file applied", || {
        shape(&router) == [(a.url.clone(), 5, true), (b.url.clone(), 1, true)]
    });
}

#[test]
fn sighup_reloads_at_once() {
    let a = Mock::start(&[]);
    let b = Mock::start(&[]);
    let settings = "config_reload_interval = 3600\nhealth_check_interval = 0.2";
    let router = Router::start(&servers_toml(&[(&a.url, 2)], settings));
    router.write_config(&servers_toml(&[(&a.url, 4), (&b.url, 1)], settings));
    assert_eq!(
        shape(&router),
        [(a.url.clone(), 2, true)],
        "no reload before the signal"
    );
    let sent = Instant::now();
    router.signal(libc::SIGHUP);
    wait_reload(&router, "the edit applied after SIGHUP", || {
        shape(&router) == [(a.url.clone(), 4, true), (b.url.clone(), 1, true)]
    });
    eprintln!("SIGHUP to new server healthy: {:?}", sent.elapsed());

    // A SIGHUP with nothing changed is harmless.
    router.signal(libc::SIGHUP);
    wait_reload(&router, "the unchanged file noticed", || {
        router.log().contains("unchanged")
    });
    assert_eq!(post(router.addr, &[], CHAT_BODY).status, 200);
    assert_eq!(count(&router.log(), "config reloaded"), 1);
}

#[test]
fn an_editor_rename_over_the_file_is_seen() {
    let a = Mock::start(&[]);
    let c = Mock::start(&[]);
    let router = Router::start(&servers_toml(&[(&a.url, 2)], FAST));
    let renamed = Instant::now();
    router.replace_config(&servers_toml(&[(&a.url, 2), (&c.url, 2)], FAST));
    wait_reload(&router, "C added and healthy", || {
        entry(&router, &c.url).is_some_and(|c| c["healthy"] == true)
    });
    eprintln!("rename to new server healthy: {:?}", renamed.elapsed());
    // A second rename: the file is followed by its path, not its first inode.
    router.replace_config(&servers_toml(&[(&c.url, 3)], FAST));
    wait_reload(&router, "A removed, C resized", || {
        shape(&router) == [(c.url.clone(), 3, true)]
    });
    assert_eq!(post(router.addr, &[], CHAT_BODY).status, 200);
    assert_eq!(count(&router.log(), "config reloaded"), 2);
}

#[test]
fn an_edit_made_while_the_router_starts_is_applied() {
    let a = Mock::start(&[]);
    let c = Mock::start(&[]);
    // A large queue makes a large worker pool, so start-up takes a moment after the
    // config was read.
    let settings = format!("{FAST}\nmax_queue_size = 4000");
    let edited = servers_toml(&[(&a.url, 2), (&c.url, 2)], &settings);
    let router = Router::start_racing(&servers_toml(&[(&a.url, 2)], &settings), &[], move |dir| {
        // The log file is created once the config has been read.
        let log = dir.join("logs").join(HUMAN_LOG);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !log.exists() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(1));
        }
        std::fs::write(dir.join("servers.toml"), edited).expect("edit config");
    })
    .expect("router starts");
    wait_reload(&router, "the edit made during start-up applied", || {
        entry(&router, &c.url).is_some_and(|c| c["healthy"] == true)
    });
}

#[test]
fn config_values_apply_without_restart_and_a_new_port_asks_for_one() {
    let mock = Mock::start(&[]);
    let reload = "config_reload_interval = 0.2";
    let router = Arc::new(Router::start(&servers_toml(
        &[(&mock.url, 1)],
        &format!("{reload}\nqueue_timeout = 30\nmax_queue_size = 7"),
    )));
    assert_eq!(
        router.get_json("/load-stats")["summary"]["max_queue_size"],
        7
    );
    let port = free_port();
    router.write_config(&servers_toml(
        &[(&mock.url, 1)],
        &format!("{reload}\nqueue_timeout = 0.3\nmax_queue_size = 3\nport = {port}"),
    ));
    wait_reload(&router, "max_queue_size 3 in /load-stats", || {
        router.get_json("/load-stats")["summary"]["max_queue_size"] == 3
    });
    wait_reload(&router, "a warning that the port needs a restart", || {
        !messages(&router, "WARN", "restart").is_empty()
    });
    let warning = messages(&router, "WARN", "restart").join("\n");
    assert!(warning.contains("port"), "{warning}");
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the router moved to port {port} without a restart"
    );

    // The new queue_timeout applies to the next request.
    let holder = {
        let router = Arc::clone(&router);
        thread::spawn(move || {
            post(
                router.addr,
                &[("x-mock-tokens", "4"), ("x-mock-delay-ms", "375")],
                CHAT_BODY,
            )
            .status
        })
    };
    wait_until(SOON, "the only slot taken", || router.in_flight() == [1]);
    let started = Instant::now();
    let resp = post(router.addr, &[], CHAT_BODY);
    let waited = started.elapsed();
    assert_eq!(resp.status, 503, "{}", resp.text());
    assert_eq!(resp.json()["error"]["code"], "queue_timeout");
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_millis(1400),
        "answered after {waited:?}, not at the reloaded queue_timeout of 0.3 s"
    );
    assert_eq!(holder.join().expect("holder"), 200);
}

#[test]
fn a_server_removed_and_added_back_starts_afresh_and_nothing_leaks() {
    let a = Mock::start(&["--id", "a"]);
    let b = Mock::start(&["--id", "b", "--model", "model-b"]);
    let both = servers_toml(&[(&a.url, 2), (&b.url, 2)], FAST);
    let mut router = Router::start(&both);
    wait_until(SOON, "B's model is known", || {
        router.model_ids().contains(&"model-b".to_owned())
    });
    let mut stream = Sse::open(router.addr, "model-b", 30, 100, "old-b");
    stream.read_events(1);
    assert_eq!(stream.event(0)["backend"], "b");
    assert_eq!(entry(&router, &b.url).expect("B")["in_flight"], 1);

    router.write_config(&servers_toml(&[(&a.url, 2)], FAST));
    wait_reload(&router, "B removed", || listed(&router) == [a.url.clone()]);
    router.write_config(&both);
    wait_reload(&router, "B back and healthy", || {
        entry(&router, &b.url).is_some_and(|b| b["healthy"] == true)
    });
    let again = entry(&router, &b.url).expect("B");
    assert_eq!(
        again["in_flight"], 0,
        "the new entry has fresh counts: {again}"
    );
    assert_eq!(again["requests_total"], 0, "{again}");
    assert_eq!(
        b.stat("in_flight"),
        1,
        "premise: the old stream is still running"
    );

    // A request on the new entry, still running when the old stream ends.
    let slow = {
        let addr = router.addr;
        thread::spawn(move || {
            post(
                addr,
                &[("x-mock-tokens", "24"), ("x-mock-delay-ms", "250")],
                &chat_for("model-b"),
            )
            .status
        })
    };
    wait_until(SOON, "the new request runs on B", || {
        b.stat("in_flight") == 2 && entry(&router, &b.url).is_some_and(|b| b["in_flight"] == 1)
    });
    assert_complete(&stream.finish(), 30, "the stream on the removed B");
    // Its entry is written once its slot is back.
    router.wait_access_entry("old-b");
    assert_eq!(
        b.stat("in_flight"),
        1,
        "premise: the new request is still running"
    );
    let b_now = entry(&router, &b.url).expect("B");
    assert_eq!(
        b_now["in_flight"], 1,
        "the old stream's end was counted against the new entry: {b_now}"
    );
    assert_eq!(slow.join().expect("slow request"), 200);
    wait_until(SOON, "nothing in flight", || all_idle(&router));

    // Shutdown waits for every slot, the hidden old entry's included: it exits at once
    // only if nothing leaked.
    router.signal(libc::SIGTERM);
    let status = router
        .wait_exit(SOON)
        .expect("the router exits at once: a slot leaked?");
    assert!(status.success(), "{status:?}");
}

// ---------------------------------------------------------------- shutdown

#[test]
fn sigterm_drains_streams_then_exits_zero_and_removes_the_pid_file() {
    let mock = Mock::start(&[]);
    let pid_file = test_dir("pid").join("router.pid");
    let pid_arg = pid_file.to_str().expect("utf-8 path");
    let mut router = Router::start_with(
        &servers_toml(&[(&mock.url, 4)], ""),
        &["--pid-file", pid_arg],
        &[],
    )
    .expect("router starts");
    router.wait_healthy_servers(1);
    let written = std::fs::read_to_string(&pid_file).expect("pid file");
    assert_eq!(written.trim(), router.pid().to_string());

    let streams: Vec<_> = (0..3)
        .map(|i| {
            let mut s = Sse::open(router.addr, "mock-model", 30, 100, &format!("drain-{i}"));
            s.read_events(1);
            s.finish_in_background()
        })
        .collect();
    assert_eq!(mock.stat("in_flight"), 3);

    let sent = Instant::now();
    router.signal(libc::SIGTERM);
    wait_until(SOON, "/readyz turns 503", || {
        router.get("/readyz").status == 503
    });
    let unready_after = sent.elapsed();
    assert!(
        unready_after < Duration::from_secs(1),
        "/readyz still 200 {unready_after:?} after SIGTERM"
    );
    // The three streams hold the drain open for about three seconds more, so this is
    // inside it: the listener still takes connections (docs/operations.md, "Graceful shutdown":
    // new requests are answered 503), and a refused or broken one fails the test.
    assert!(
        mock.stat("in_flight") == 3,
        "the streams still hold the drain open"
    );
    let resp = try_post(router.addr, &[], CHAT_BODY)
        .unwrap_or_else(|e| panic!("a new request while draining gets no 503: {e}"));
    assert_eq!(resp.status, 503, "{}", resp.text());
    assert_eq!(resp.json()["error"]["code"], "shutting_down");
    assert!(resp.header("retry-after").is_some(), "{:?}", resp.headers);
    for (i, s) in streams.into_iter().enumerate() {
        assert_complete(&s.join().expect("reader"), 30, &format!("stream {i}"));
    }
    let status = router
        .wait_exit(Duration::from_secs(10))
        .expect("the router exits once the streams are done");
    assert!(status.success(), "{status:?}");
    assert!(!pid_file.exists(), "the pid file is left behind");
    assert_eq!(mock.stat("total"), 3, "nothing new reached the backend");

    let phases = messages(&router, "INFO", "shutdown");
    assert!(phases.len() >= 2, "shutdown phases: {phases:?}");
    let unique: std::collections::HashSet<&String> = phases.iter().collect();
    assert_eq!(
        unique.len(),
        phases.len(),
        "a shutdown phase logged twice: {phases:?}"
    );
    for i in 0..3 {
        let e = router
            .access_entry(&format!("drain-{i}"))
            .unwrap_or_else(|| panic!("no access entry for stream {i} after exit"));
        assert_eq!(e["status"], 200, "{e}");
        assert_eq!(e["stream"], true, "{e}");
        assert_eq!(e["outcome"], "complete", "{e}");
    }
}

#[test]
fn sigterm_answers_queued_requests_503_with_retry_after() {
    let mock = Mock::start(&[]);
    let mut router = Router::start(&servers_toml(&[(&mock.url, 1)], "queue_timeout = 30"));
    let mut stream = Sse::open(router.addr, "mock-model", 15, 100, "holder");
    stream.read_events(1);
    let stream = stream.finish_in_background();
    let queued = {
        let addr = router.addr;
        thread::spawn(move || try_post(addr, &[("X-Request-Id", "queued-1")], CHAT_BODY))
    };
    wait_until(SOON, "one request queued", || queue_length(&router) == 1);

    let sent = Instant::now();
    router.signal(libc::SIGTERM);
    let resp = queued
        .join()
        .expect("queued client")
        .expect("the queued request gets a reply");
    let answered_after = sent.elapsed();
    assert_eq!(resp.status, 503, "{}", resp.text());
    assert_eq!(resp.header("retry-after"), Some("1"), "{:?}", resp.headers);
    assert_eq!(resp.json()["error"]["code"], "shutting_down");
    assert_eq!(resp.header("x-request-id"), Some("queued-1"));
    assert!(
        answered_after < Duration::from_secs(1),
        "the queued request waited {answered_after:?} after SIGTERM"
    );
    assert_complete(&stream.join().expect("reader"), 15, "the stream");
    let status = router
        .wait_exit(Duration::from_secs(10))
        .expect("the router exits");
    assert!(status.success(), "{status:?}");
    assert_eq!(
        mock.stat("total"),
        1,
        "the queued request reached the backend"
    );
    let e = router.access_entry("queued-1").expect("access entry");
    assert_eq!(e["status"], 503, "{e}");
}

#[test]
fn shutdown_timeout_cuts_off_a_long_stream() {
    let mock = Mock::start(&[]);
    let mut router = Router::start(&servers_toml(&[(&mock.url, 2)], "shutdown_timeout = 1"));
    let mut stream = Sse::open(router.addr, "mock-model", 100, 100, "endless");
    stream.read_events(1);
    let stream = stream.finish_in_background();
    let sent = Instant::now();
    router.signal(libc::SIGTERM);
    let status = router
        .wait_exit(Duration::from_secs(6))
        .expect("the router exits after shutdown_timeout");
    let exited_after = sent.elapsed();
    eprintln!("exit {status:?} {exited_after:?} after SIGTERM with shutdown_timeout = 1");
    assert!(status.code().is_some(), "killed by a signal: {status:?}");
    assert!(
        exited_after >= Duration::from_millis(900),
        "exited after {exited_after:?}, before shutdown_timeout"
    );
    assert!(
        exited_after < Duration::from_secs(4),
        "exited only after {exited_after:?}"
    );
    let end = stream.join().expect("reader");
    assert!(
        end.error.is_some() || end.events.len() < 101,
        "the stream was not cut off"
    );
    assert!(
        !messages(&router, "WARN", "shutdown_timeout").is_empty(),
        "{}",
        router.log()
    );
}

#[test]
fn a_second_signal_ends_draining_at_once() {
    let mock = Mock::start(&[]);
    let mut router = Router::start(&servers_toml(&[(&mock.url, 2)], "shutdown_timeout = 30"));
    let mut stream = Sse::open(router.addr, "mock-model", 100, 100, "endless");
    stream.read_events(1);
    let stream = stream.finish_in_background();
    router.signal(libc::SIGINT);
    wait_until(SOON, "draining", || router.get("/readyz").status == 503);
    let sent = Instant::now();
    router.signal(libc::SIGTERM);
    let status = router
        .wait_exit(Duration::from_secs(3))
        .expect("the router exits on the second signal");
    eprintln!(
        "exit {status:?} {:?} after the second signal",
        sent.elapsed()
    );
    assert!(status.code().is_some(), "killed by a signal: {status:?}");
    let end = stream.join().expect("reader");
    assert!(end.error.is_some() || end.events.len() < 101);
    assert!(
        !messages(&router, "WARN", "second signal").is_empty(),
        "{}",
        router.log()
    );
}

#[test]
fn a_request_refused_after_waiting_in_line_logs_its_wait_and_its_bytes() {
    let mock = Mock::start(&[]);
    let router = Arc::new(Router::start(&servers_toml(
        &[(&mock.url, 1)],
        "queue_timeout = 0.3",
    )));
    let holder = {
        let router = Arc::clone(&router);
        thread::spawn(move || {
            post(
                router.addr,
                &[("x-mock-tokens", "4"), ("x-mock-delay-ms", "300")],
                CHAT_BODY,
            )
            .status
        })
    };
    wait_until(SOON, "the only slot taken", || router.in_flight() == [1]);
    let resp = post(
        router.addr,
        &[("X-Request-Id", "waited-in-line")],
        CHAT_BODY,
    );
    assert_eq!(resp.status, 503, "{}", resp.text());
    assert_eq!(resp.json()["error"]["code"], "queue_timeout");
    let e = router.wait_access_entry("waited-in-line");
    assert_eq!(e["status"], 503, "{e}");
    assert_eq!(e["outcome"], "queue_timeout", "{e}");
    assert!(
        e["queue_wait_ms"].as_f64().expect("queue_wait_ms") >= 290.0,
        "the request waited 0.3 s in the queue, its entry says {e}"
    );
    assert_eq!(
        e["bytes_out"],
        resp.body.len(),
        "the error body went out, its entry says {e}"
    );
    assert_eq!(holder.join().expect("holder"), 200);
}

// ---------------------------------------------------------------- logs

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn sigusr1_reopens_both_log_files_after_a_rename_and_loses_nothing() {
    let mock = Mock::start(&[]);
    let router = Router::start(&servers_toml(&[(&mock.url, 2)], ""));
    let dir = router.log_dir();
    let send = |id: &str| {
        let resp = post(router.addr, &[("X-Request-Id", id)], CHAT_BODY);
        assert_eq!(resp.status, 200);
    };
    send("before-rotate");
    router.wait_access_entry("before-rotate");

    for name in [HUMAN_LOG, JSON_LOG] {
        std::fs::rename(dir.join(name), dir.join(format!("{name}.1"))).expect("rename");
    }
    // Renamed but not reopened yet: lines go on to the renamed files, none is lost.
    send("after-rename");
    wait_until(SOON, "after-rename in the renamed file", || {
        parse_json_lines(&dir.join(format!("{JSON_LOG}.1")))
            .iter()
            .any(|e| e["request_id"] == "after-rename")
    });

    router.signal(libc::SIGUSR1);
    wait_until(SOON, "new log files, with the reopen line", || {
        read(&dir.join(HUMAN_LOG)).contains("reopened")
            && read(&dir.join(JSON_LOG)).contains("reopened")
    });
    send("after-reopen");
    let entry = router.wait_access_entry("after-reopen");
    assert_eq!(entry["status"], 200);
    wait_until(SOON, "after-reopen in the new human log", || {
        read(&dir.join(HUMAN_LOG)).contains("after-reopen")
    });

    let (old_human, old_json) = (
        read(&dir.join(format!("{HUMAN_LOG}.1"))),
        read(&dir.join(format!("{JSON_LOG}.1"))),
    );
    let (new_human, new_json) = (read(&dir.join(HUMAN_LOG)), read(&dir.join(JSON_LOG)));
    for id in ["before-rotate", "after-rename"] {
        assert!(old_human.contains(id), "{id} not in the old human log");
        assert!(old_json.contains(id), "{id} not in the old JSON log");
        assert!(!new_human.contains(id), "{id} in the new human log");
        assert!(!new_json.contains(id), "{id} in the new JSON log");
    }
    assert!(!old_human.contains("after-reopen"));
    assert!(!old_json.contains("after-reopen"));
    for (name, text) in [("old", &old_json), ("new", &new_json)] {
        for line in text.lines() {
            assert!(
                serde_json::from_str::<Value>(line).is_ok_and(|v| v.is_object()),
                "{name} JSON log has a broken line: {line:?}"
            );
        }
    }
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction]Z`, with fields in range.
fn is_rfc3339_utc(s: &str) -> bool {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        let part = s.get(r)?;
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    let (Some(year), Some(month), Some(day), Some(h), Some(m), Some(sec)) = (
        num(0..4),
        num(5..7),
        num(8..10),
        num(11..13),
        num(14..16),
        num(17..19),
    ) else {
        return false;
    };
    let separators = b.len() >= 20
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':';
    let rest = &s[19..];
    let fraction_ok = match rest.strip_suffix('Z') {
        Some("") => true,
        Some(f) => f.len() > 1 && f.starts_with('.') && f[1..].bytes().all(|c| c.is_ascii_digit()),
        None => false,
    };
    separators
        && fraction_ok
        && year >= 2020
        && (1..=12).contains(&month)
        && (1..=31).contains(&day)
        && h < 24
        && m < 60
        && sec <= 60
}

#[test]
fn the_structured_log_is_json_lines_with_complete_access_entries() {
    let mock = Mock::start(&["--id", "json"]);
    let router = Router::start(&servers_toml(&[(&mock.url, 2)], ""));
    let plain = request(
        router.addr,
        "POST",
        &format!("{CHAT}?api-version=2024&x=1"),
        &[
            ("Content-Type", "application/json"),
            ("X-Request-Id", "json-plain"),
        ],
        chat_for("mock-model").as_bytes(),
    );
    assert_eq!(plain.status, 200);
    let streamed = request(
        router.addr,
        "POST",
        CHAT,
        &[
            ("Content-Type", "application/json"),
            ("X-Request-Id", "json-stream"),
            ("x-mock-tokens", "5"),
            ("x-mock-delay-ms", "20"),
        ],
        br#"{"model":"mock-model","messages":[{"role":"user","content":"hi"}],"stream":true}"#,
    );
    assert_eq!(streamed.status, 200);
    let e = router.wait_access_entry("json-plain");
    let s = router.wait_access_entry("json-stream");

    let text = read(&router.log_dir().join(JSON_LOG));
    assert!(text.ends_with('\n'));
    for line in text.lines() {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|err| panic!("not JSON ({err}): {line:?}"));
        assert!(v.is_object(), "{line}");
        let time = v["time"].as_str().unwrap_or_else(|| panic!("time: {line}"));
        assert!(is_rfc3339_utc(time), "time {time:?} is not RFC 3339 UTC");
        assert!(
            ["ERROR", "WARN", "INFO", "DEBUG", "TRACE"]
                .contains(&v["level"].as_str().unwrap_or_default()),
            "level: {line}"
        );
        assert!(v["message"].is_string(), "message: {line}");
        assert!(v["target"].is_string(), "target: {line}");
    }

    assert_eq!(e["target"], "access", "{e}");
    assert_eq!(e["level"], "INFO", "{e}");
    assert_eq!(e["method"], "POST", "{e}");
    assert_eq!(e["path"], CHAT, "the query string stays out: {e}");
    assert_eq!(e["model"], "mock-model", "{e}");
    assert_eq!(e["backend"], mock.url.as_str(), "{e}");
    assert_eq!(e["status"], 200, "{e}");
    assert_eq!(e["retries"], 0, "{e}");
    assert_eq!(e["stream"], false, "{e}");
    assert_eq!(e["bytes_out"], plain.body.len(), "{e}");
    assert_eq!(s["stream"], true, "{s}");
    assert_eq!(s["bytes_out"], streamed.body.len(), "{s}");
    for x in [&e, &s] {
        let ms = |key: &str| {
            x[key]
                .as_f64()
                .unwrap_or_else(|| panic!("{key} is not a number: {x}"))
        };
        assert!(ms("queue_wait_ms") >= 0.0, "{x}");
        assert!(ms("ttfb_ms") >= 0.0, "{x}");
        assert!(ms("duration_ms") >= ms("ttfb_ms"), "{x}");
    }
    assert!(
        s["duration_ms"].as_f64().expect("duration") >= 90.0,
        "5 tokens 20 ms apart took {s}"
    );
    let human = router.log();
    let line = human
        .lines()
        .find(|l| l.contains("json-plain"))
        .expect("the access entry in the human log");
    assert!(line.contains("[INFO]") && line.contains(CHAT), "{line}");
    assert!(!line.contains("api-version"), "{line}");
}

/// A request id, extra headers, a body and the status expected.
type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, String, u16);

#[test]
fn no_secret_reaches_any_log_file() {
    let a = Mock::start(&[]);
    let b = Mock::start(&[]);
    let router = Router::start(&servers_toml(
        &[(&a.url, 2), (&b.url, 2)],
        "max_retries = 1\nretry_delay = 0\nfailure_threshold = 100",
    ));
    let path = format!("{CHAT}?api_key=QSECRET");
    let prompt = r#""messages":[{"role":"user","content":"TOP-SECRET-PROMPT"}]"#;
    let secret_headers = [
        ("Content-Type", "application/json"),
        ("Authorization", "Bearer sk-SECRET-123"),
        ("X-Api-Key", "sk-SECRET-123"),
    ];
    // (request id, extra headers, body, expected status)
    let cases: [Case; 5] = [
        (
            "plain",
            vec![],
            format!(r#"{{"model":"mock-model",{prompt}}}"#),
            200,
        ),
        (
            "stream",
            vec![("x-mock-tokens", "3")],
            format!(r#"{{"model":"mock-model",{prompt},"stream":true}}"#),
            200,
        ),
        (
            "bad-model",
            vec![],
            format!(r#"{{"model":{{"p":"TOP-SECRET-PROMPT"}},{prompt}}}"#),
            400,
        ),
        (
            "backend-error",
            vec![("x-mock-status", "500")],
            format!(r#"{{"model":"mock-model",{prompt}}}"#),
            500,
        ),
        (
            "retried",
            vec![("x-mock-status", "503")],
            format!(r#"{{"model":"mock-model",{prompt}}}"#),
            503,
        ),
    ];
    for (id, extra, body, expected) in &cases {
        let mut headers = secret_headers.to_vec();
        headers.push(("X-Request-Id", id));
        headers.extend_from_slice(extra);
        let resp = request(router.addr, "POST", &path, &headers, body.as_bytes());
        assert_eq!(resp.status, *expected, "{id}: {}", resp.text());
    }
    for (id, ..) in &cases {
        router.wait_access_entry(id);
    }
    assert_eq!(
        router.access_entry("retried").expect("entry")["retries"],
        1,
        "premise: the 503 was retried on the other backend"
    );
    let files: Vec<_> = std::fs::read_dir(router.log_dir())
        .expect("log dir")
        .map(|f| f.expect("entry").path())
        .collect();
    assert!(files.len() >= 2, "{files:?}");
    for file in files {
        let text = String::from_utf8_lossy(&std::fs::read(&file).expect("read")).into_owned();
        for secret in ["sk-SECRET-123", "QSECRET", "TOP-SECRET-PROMPT"] {
            let leaks: Vec<&str> = text.lines().filter(|l| l.contains(secret)).collect();
            assert!(
                leaks.is_empty(),
                "{secret} in {}:\n{}",
                file.display(),
                leaks.join("\n")
            );
        }
    }
}

#[test]
fn the_request_id_is_returned_and_forwarded() {
    let mock = Mock::start(&[]);
    let router = Router::start(&servers_toml(&[(&mock.url, 2)], ""));

    let resp = post(router.addr, &[("X-Request-Id", "test-id-42")], CHAT_BODY);
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("x-request-id"), Some("test-id-42"));
    assert_eq!(mock.headers_seen("x-request-id"), ["test-id-42"]);

    let mut generated = Vec::new();
    for client_id in [None, None, Some("not plain: spaces")] {
        let headers: Vec<(&str, &str)> = client_id
            .map(|id| ("X-Request-Id", id))
            .into_iter()
            .collect();
        let resp = post(router.addr, &headers, CHAT_BODY);
        assert_eq!(resp.status, 200);
        let id = resp
            .header("x-request-id")
            .expect("a generated request id")
            .to_owned();
        assert!(
            !id.is_empty()
                && id.len() <= 128
                && id
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"-_.:".contains(&c)),
            "generated id {id:?}"
        );
        assert_eq!(mock.headers_seen("x-request-id"), [id.as_str()]);
        router.wait_access_entry(&id);
        generated.push(id);
    }
    assert!(
        generated[0] != generated[1] && generated[1] != generated[2],
        "{generated:?}"
    );

    // An error the router answers itself carries the id too.
    let resp = post(
        router.addr,
        &[("X-Request-Id", "test-id-43")],
        &chat_for("no-such-model"),
    );
    assert_eq!(resp.status, 404, "{}", resp.text());
    assert_eq!(resp.header("x-request-id"), Some("test-id-43"));
    assert_eq!(router.wait_access_entry("test-id-43")["status"], 404);
}
