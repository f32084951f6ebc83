//! Cache-aware routing (issue 15): conversations stay where their prefix is cached, a
//! hot prefix spreads once its backend is busy, sessions stick, two replicas agree, and
//! all of it shows in `/load-stats`, `/metrics` and the access log. Hit rates are read
//! from the mocks' own prefix-cache counters, not from the router's view.

use std::collections::HashSet;

use serde_json::{json, Value};

use vllm_router_tools::prefix::{self, words};

use crate::support::*;

/// Mocks with a prefix cache of their own, and a prefill the tests can see.
fn cached_mocks(n: usize, extra: &[&str]) -> Vec<Mock> {
    let mut args = vec![
        "--prefix-cache-tokens",
        "100000",
        "--prefill-us-per-token",
        "10",
    ];
    args.extend_from_slice(extra);
    (0..n).map(|_| Mock::start(&args)).collect()
}

fn router_for(mocks: &[Mock], cap: u32, config: &str) -> Router {
    let backends: Vec<(&str, u32)> = mocks.iter().map(|m| (m.url.as_str(), cap)).collect();
    let config = format!("health_check_interval = 1\nbackend_metrics_interval = 0\n{config}");
    let router = Router::start(&servers_toml(&backends, &config));
    router.wait_all_healthy();
    router
}

fn fleet_hit_rate(mocks: &[Mock]) -> f64 {
    prefix::fleet_hit_rate(mocks.iter().map(|m| m.addr)).expect("the mocks' metrics")
}

/// Turn `turns` of a conversation: its first message, then question and answer pairs.
fn conversation(first: &str, turns: usize) -> Value {
    let mut messages = vec![json!({"role": "user", "content": first})];
    for t in 1..turns {
        messages.push(json!({"role": "assistant", "content": words(&format!("answer {t}"), 600)}));
        messages.push(json!({"role": "user", "content": format!("and question {t}?")}));
    }
    json!({"messages": messages, "max_tokens": 2})
}

/// Sends a chat body; returns the id of the mock that served it.
fn served_by(addr: std::net::SocketAddr, headers: &[(&str, &str)], body: &Value) -> String {
    let resp = post(addr, headers, &body.to_string());
    assert_eq!(resp.status, 200, "{}", resp.text());
    resp.json()["backend"]
        .as_str()
        .expect("backend id")
        .to_owned()
}

#[test]
fn each_turn_of_a_conversation_goes_where_its_prefix_is_cached() {
    let mocks = cached_mocks(3, &[]);
    let router = router_for(&mocks, 4, "routing = \"cache_aware\"");
    for c in 0..6 {
        let first = words(&format!("document {c}"), 3000);
        let home = served_by(router.addr, &[], &conversation(&first, 1));
        for turn in 2..=4 {
            assert_eq!(
                served_by(router.addr, &[], &conversation(&first, turn)),
                home,
                "conversation {c}, turn {turn}"
            );
        }
    }
    // Turns 2 to 4 find all but their last question and answer cached.
    let rate = fleet_hit_rate(&mocks);
    assert!(rate > 0.6, "fleet hit rate {rate:.2}");
}

#[test]
fn key_order_spacing_and_sampling_parameters_do_not_move_a_conversation() {
    let mocks = cached_mocks(3, &[]);
    let router = router_for(&mocks, 4, "");
    let first = words("a long question", 4000);
    let home = served_by(router.addr, &[], &conversation(&first, 1));
    // The same conversation, keys in another order, spaced, other sampling parameters.
    let reordered = format!(
        r#"{{ "temperature" : 0.9, "stream" : false, "top_p": 0.5, "n": 1, "max_tokens": 7,
            "messages" : [ {{ "content" : {first}, "role" : "user" }} ] }}"#,
        first = json!(first)
    );
    let resp = post(router.addr, &[("X-Request-Id", "reordered")], &reordered);
    assert_eq!(resp.status, 200);
    assert_eq!(resp.json()["backend"], home.as_str());
    let entry = router.wait_access_entry("reordered");
    assert_eq!(entry["route"], "prefix", "{entry}");
    let (matched, blocks) = (&entry["matched_blocks"], &entry["prompt_blocks"]);
    assert!(matched.as_i64() > Some(20) && matched == blocks, "{entry}");
}

#[test]
fn a_hot_prefix_spreads_over_every_backend_and_never_exceeds_the_cap() {
    let mocks = cached_mocks(3, &["--delay-ms", "20", "--tokens", "10"]);
    let router = router_for(&mocks, 2, "routing = \"cache_aware\"\nqueue_timeout = 30");
    let hot = conversation(&words("one system prompt for everyone", 4000), 1).to_string();
    let clients: Vec<_> = (0..24)
        .map(|_| {
            let (addr, body) = (router.addr, hot.clone());
            std::thread::spawn(move || post(addr, &[], &body).status)
        })
        .collect();
    for c in clients {
        assert_eq!(c.join().expect("client"), 200);
    }
    for m in &mocks {
        assert!(m.stat("total") > 0, "every backend used: {}", m.stats());
        assert!(m.stat("peak_in_flight") <= 2, "cap kept: {}", m.stats());
    }
}

#[test]
fn a_request_never_waits_for_its_cached_backend_while_another_has_room() {
    let mocks = cached_mocks(2, &[]);
    let router = router_for(&mocks, 1, "queue_timeout = 30");
    let prompt = conversation(&words("cached", 4000), 1);
    let home = served_by(router.addr, &[], &prompt);
    // The slot goes back just after the reply's last byte: the slow request must find
    // it free, or it would go elsewhere.
    wait_until(SOON, "the first request's slot back", || {
        router.in_flight().iter().sum::<u64>() == 0
    });
    // Its backend's only slot is taken by a slow request with the same prompt.
    let slow = {
        let (addr, body) = (router.addr, prompt.to_string());
        std::thread::spawn(move || post(addr, &[("x-mock-delay-ms", "300")], &body))
    };
    wait_until(SOON, "the slow request in flight", || {
        router.in_flight().iter().sum::<u64>() == 1
    });
    let resp = post(
        router.addr,
        &[("X-Request-Id", "not-waiting")],
        &prompt.to_string(),
    );
    assert_eq!(resp.status, 200);
    assert_ne!(
        resp.json()["backend"],
        home.as_str(),
        "the other backend had room"
    );
    assert_eq!(slow.join().expect("slow").json()["backend"], home.as_str());
    let entry = router.wait_access_entry("not-waiting");
    assert_eq!(entry["queue_wait_ms"], 0.0, "{entry}");
    assert_eq!(entry["route"], "load", "{entry}");
}

#[test]
fn a_session_sticks_to_its_backend_moves_when_it_is_busy_and_sticks_again() {
    let mocks = cached_mocks(2, &[]);
    let router = router_for(&mocks, 4, "session_header = \"X-Conversation\"");
    let session = [("X-Conversation", "chat-42")];
    let short = |n: usize| json!({"messages": [{"role": "user", "content": format!("q{n}")}], "max_tokens": 1});
    let home = served_by(router.addr, &session, &short(0));
    for n in 1..6 {
        assert_eq!(
            served_by(router.addr, &session, &short(n)),
            home,
            "request {n}"
        );
    }
    // A session wins over a prefix held elsewhere.
    let (elsewhere, other) = (0..32)
        .find_map(|k| {
            let prompt = conversation(&words(&format!("held elsewhere {k}"), 4000), 1);
            let backend = served_by(router.addr, &[], &prompt);
            (backend != home).then_some((prompt, backend))
        })
        .expect("some new prompt ranks the other backend first");
    assert_eq!(served_by(router.addr, &session, &elsewhere), home);
    wait_until(SOON, "every slot back", || {
        router.in_flight().iter().sum::<u64>() == 0
    });
    // Two slow requests of the session make its backend 2/4 busy against 0/4: a
    // quarter of capacity is the margin, so the third moves, and the session with it.
    let slow: Vec<_> = (0..2)
        .map(|n| {
            let addr = router.addr;
            let body = short(100 + n).to_string();
            let h = std::thread::spawn(move || {
                post(
                    addr,
                    &[("X-Conversation", "chat-42"), ("x-mock-delay-ms", "500")],
                    &body,
                )
            });
            wait_until(SOON, "the slow request in flight", || {
                router.in_flight().iter().sum::<u64>() == n as u64 + 1
            });
            h
        })
        .collect();
    assert_eq!(served_by(router.addr, &session, &short(7)), other, "moved");
    for h in slow {
        assert_eq!(h.join().expect("slow").json()["backend"], home.as_str());
    }
    for n in 8..11 {
        assert_eq!(
            served_by(router.addr, &session, &short(n)),
            other,
            "stays where it moved"
        );
    }
    let stats = router.get_json("/load-stats");
    let routed: u64 = stats["servers"]
        .as_array()
        .expect("servers")
        .iter()
        .map(|s| s["routed"]["session"].as_u64().unwrap_or(0))
        .sum();
    assert!(routed >= 9, "{stats}");
}

#[test]
fn two_replicas_send_a_new_conversation_or_session_to_the_same_backend() {
    let mocks = cached_mocks(3, &[]);
    let a = router_for(&mocks, 4, "");
    let b = router_for(&mocks, 4, "");
    let mut used = HashSet::new();
    for c in 0..12 {
        let first = words(&format!("conversation {c} starts here"), 2000);
        let home = served_by(a.addr, &[], &conversation(&first, 1));
        // Replica b never saw it: it ranks the backends the same way.
        assert_eq!(
            served_by(b.addr, &[], &conversation(&first, 2)),
            home,
            "conversation {c}"
        );
        used.insert(home);
        let id = format!("session-{c}");
        let session = [("X-Session-ID", id.as_str())];
        let q = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1});
        let home = served_by(b.addr, &session, &q);
        assert_eq!(served_by(a.addr, &session, &q), home, "session {c}");
    }
    assert!(used.len() > 1, "new conversations spread: {used:?}");
}

#[test]
fn routing_shows_in_load_stats_metrics_and_the_access_log() {
    let mocks = cached_mocks(2, &[]);
    let router = router_for(&mocks, 4, "");
    let first = words("visible", 3000);
    let resp = post(
        router.addr,
        &[("X-Request-Id", "turn-1")],
        &conversation(&first, 1).to_string(),
    );
    assert_eq!(resp.status, 200);
    let resp = post(
        router.addr,
        &[("X-Request-Id", "turn-2")],
        &conversation(&first, 2).to_string(),
    );
    assert_eq!(resp.status, 200);
    let stats = router.get_json("/load-stats");
    assert_eq!(stats["summary"]["routing"], "cache_aware");
    let servers = stats["servers"].as_array().expect("servers");
    let blocks: u64 = servers
        .iter()
        .map(|s| s["prefix_blocks"].as_u64().expect("blocks"))
        .sum();
    assert!(blocks > 20, "{stats}");
    let prefix: u64 = servers
        .iter()
        .map(|s| s["routed"]["prefix"].as_u64().expect("n"))
        .sum();
    let load: u64 = servers
        .iter()
        .map(|s| s["routed"]["load"].as_u64().expect("n"))
        .sum();
    assert_eq!((prefix, load), (1, 1), "{stats}");
    let metrics = router.get("/metrics").text();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("vllm_router_routing_decisions_total{")
                && l.contains("reason=\"prefix\"")
                && l.ends_with(" 1")),
        "{metrics}"
    );
    assert!(
        metrics.contains("vllm_router_backend_prefix_blocks{"),
        "{metrics}"
    );
    let entries = ["turn-1", "turn-2"].map(|id| router.wait_access_entry(id));
    assert_eq!(
        (&entries[0]["route"], &entries[1]["route"]),
        (&json!("load"), &json!("prefix"))
    );
    assert_eq!(entries[0]["matched_blocks"], 0);
    assert!(entries[1]["matched_blocks"].as_i64() >= entries[0]["prompt_blocks"].as_i64());
}

#[test]
fn least_loaded_routing_ignores_prefixes_and_sessions() {
    let mocks = cached_mocks(2, &[]);
    let router = router_for(&mocks, 4, "routing = \"least_loaded\"");
    let body = conversation(&words("same every time", 3000), 1);
    let session = [("X-Session-ID", "s")];
    let seen: HashSet<String> = (0..4)
        .map(|_| served_by(router.addr, &session, &body))
        .collect();
    assert_eq!(seen.len(), 2, "taken in turn");
    let stats = router.get_json("/load-stats");
    assert_eq!(stats["summary"]["routing"], "least_loaded");
    assert_eq!(stats["servers"][0]["prefix_blocks"], 0);
}

#[test]
fn a_reload_keeps_the_index_of_a_server_that_stays_and_a_new_size_empties_it() {
    let mocks = cached_mocks(2, &[]);
    let extra = Mock::start(&[]);
    let config = |servers: &[&Mock], tokens: u64| {
        let backends: Vec<(&str, u32)> = servers.iter().map(|m| (m.url.as_str(), 4)).collect();
        servers_toml(
            &backends,
            &format!("health_check_interval = 1\nbackend_metrics_interval = 0\nprefix_index_tokens = {tokens}"),
        )
    };
    let router = Router::start(&config(&[&mocks[0], &mocks[1]], 1 << 20));
    router.wait_all_healthy();
    let prompt = conversation(&words("kept across reloads", 3000), 1);
    served_by(router.addr, &[], &prompt);
    let blocks = |router: &Router| router.per_server("prefix_blocks");
    let before = blocks(&router);
    assert!(before.iter().sum::<u64>() > 20, "{before:?}");
    router.replace_config(&config(&[&mocks[0], &mocks[1], &extra], 1 << 20));
    router.signal(libc::SIGHUP);
    wait_until(SOON, "the third server", || blocks(&router).len() == 3);
    assert_eq!(
        blocks(&router)[..2],
        before[..],
        "kept for the servers that stayed"
    );
    router.replace_config(&config(&[&mocks[0], &mocks[1], &extra], 1 << 16));
    router.signal(libc::SIGHUP);
    wait_until(SOON, "emptied by the new size", || {
        blocks(&router).iter().all(|&b| b == 0)
    });
    let stats = router.get_json("/load-stats");
    assert_eq!(
        stats["servers"][0]["prefix_capacity_blocks"],
        (1u64 << 16) * 4 / 128
    );
}
