//! The checks at the end: the router and the mocks settled back to idle, the
//! router's own closed-connection counts, and the access log of the slow requests.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use vllm_router_tools::http;
use vllm_router_tools::procfs::{self, Status};

use crate::hostile::TAG;
use crate::normal::{IDLE_CLOSE_KIND, IDLE_RACE_KIND};
use crate::slow::{
    CUT_BODY, CUT_BODY_ID, IDLE_CONNECTION, SLOWLORIS, SLOWLORIS_ID, SLOW_BODY, SLOW_BODY_ID,
    STALLED_ID, STALLED_READER,
};
use crate::stats::Kind;

/// Waits up to 15 s for the router's in-flight counts and queue to be 0; returns the
/// last reading.
pub fn settle_in_flight(addr: SocketAddr) -> (Vec<u64>, Option<u64>) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let reading = http::get_json(addr, "/load-stats").ok().map(|doc| {
            let counts: Vec<u64> = doc["servers"]
                .as_array()
                .map(|s| s.iter().filter_map(|s| s["in_flight"].as_u64()).collect())
                .unwrap_or_default();
            (counts, doc["summary"]["queue_length"].as_u64())
        });
        let (counts, queue) = reading.unwrap_or_default();
        let zero = counts.len() == 2 && counts.iter().all(|&n| n == 0) && queue == Some(0);
        if zero || Instant::now() > deadline {
            return (counts, queue);
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// A mock's own in-flight count, once 0 or after 15 s.
pub fn settle_mock(addr: SocketAddr) -> Option<u64> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let n = http::get_json(addr, "/mock/stats")
            .ok()
            .and_then(|s| s["in_flight"].as_u64());
        if n == Some(0) || Instant::now() > deadline {
            return n;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Settles for 2 s, then waits up to 15 s more for the thread count to come back to
/// `start` (connection threads end with their connections; workers stay); returns the
/// last reading.
pub fn settle_threads(pid: u32, start: u64) -> Result<Status, String> {
    thread::sleep(Duration::from_secs(2));
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now = procfs::status(pid)?;
        if now.threads <= start + 4 || Instant::now() > deadline {
            return Ok(now);
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// `vllm_router_client_connections_closed_total` by reason, and the
/// `vllm_router_client_connections` gauge.
pub struct Closed {
    pub by_reason: BTreeMap<String, u64>,
    pub open: Option<u64>,
}

pub fn client_connections(addr: SocketAddr) -> Result<Closed, String> {
    let reply = http::get(addr, "/metrics")?;
    if reply.status != 200 {
        return Err(format!("/metrics: status {}", reply.status));
    }
    let mut closed = Closed {
        by_reason: BTreeMap::new(),
        open: None,
    };
    for line in String::from_utf8_lossy(&reply.body).lines() {
        let number = |v: &str| v.trim().parse::<f64>().ok().map(|v| v as u64);
        if let Some(rest) =
            line.strip_prefix("vllm_router_client_connections_closed_total{reason=\"")
        {
            if let Some((reason, n)) = rest.split_once("\"}") {
                let n = number(n).ok_or_else(|| format!("bad sample {line:?}"))?;
                closed.by_reason.insert(reason.to_owned(), n);
            }
        } else if let Some(n) = line.strip_prefix("vllm_router_client_connections ") {
            closed.open = number(n);
        }
    }
    if closed.by_reason.is_empty() {
        return Err("no vllm_router_client_connections_closed_total in /metrics".into());
    }
    Ok(closed)
}

/// The router's closed-connection counts against the slow clients that saw their
/// close: each reason counts at least those, and nothing was shed.
pub fn check_closed(closed: &Closed, table: &BTreeMap<String, Kind>) -> Vec<String> {
    let passed = |name: &str| table.get(name).map_or(0, |k| k.sent - k.errors);
    let count = |reason: &str| closed.by_reason.get(reason).copied().unwrap_or(0);
    let mut failures = Vec::new();
    let seen = [
        (
            "idle",
            passed(SLOWLORIS)
                + passed(IDLE_CONNECTION)
                + passed(IDLE_CLOSE_KIND)
                + passed(IDLE_RACE_KIND),
        ),
        ("slow_body", passed(SLOW_BODY)),
        ("stalled_write", passed(STALLED_READER)),
    ];
    for (reason, clients) in seen {
        if count(reason) == 0 {
            failures.push(format!("no client connection closed for {reason}"));
        } else if count(reason) < clients {
            failures.push(format!(
                "{} connections closed for {reason}, but {clients} slow clients saw one",
                count(reason)
            ));
        }
    }
    for reason in ["over_cap", "no_thread", "no_fd"] {
        if count(reason) > 0 {
            failures.push(format!(
                "{} connections shed ({reason}), with nothing here near a limit",
                count(reason)
            ));
        }
    }
    // The /metrics request itself is the one open connection left.
    if closed.open.is_none_or(|n| n > 2) {
        failures.push(format!(
            "{:?} client connections open at the end",
            closed.open
        ));
    }
    failures
}

/// What the access log says of the slow requests.
pub struct SlowAccess {
    pub summary: String,
    pub failures: Vec<String>,
}

/// Checks the access entries of the slow requests: no slowloris head became a
/// request, slow and cut bodies never reached a backend (408 and 400), and every
/// stalled stream ended short of complete. Each slow request that sent a whole head
/// has one entry.
pub fn slow_access(structured_log: &str, table: &BTreeMap<String, Kind>) -> SlowAccess {
    let entries: Vec<Value> = structured_log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["target"] == "access")
        .collect();
    let with_id = |prefix: &str| -> Vec<&Value> {
        entries
            .iter()
            .filter(|e| {
                e["request_id"]
                    .as_str()
                    .is_some_and(|id| id.starts_with(prefix))
            })
            .collect()
    };
    let tally = |of: &[&Value], field: &str| -> String {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for e in of {
            let v = match &e[field] {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            *counts.entry(v).or_default() += 1;
        }
        let parts: Vec<String> = counts.iter().map(|(v, n)| format!("{v} x{n}")).collect();
        parts.join(", ")
    };
    let mut failures = Vec::new();
    let slowloris = with_id(SLOWLORIS_ID);
    if !slowloris.is_empty() {
        failures.push(format!(
            "{} slowloris heads became requests in the access log",
            slowloris.len()
        ));
    }
    let mut parts = vec![format!("slowloris {} (none wanted)", slowloris.len())];
    // (kind, id prefix, the status wanted, whether it reaches a backend)
    let checks = [
        (SLOW_BODY, SLOW_BODY_ID, Some(408), false),
        (CUT_BODY, CUT_BODY_ID, Some(400), false),
        (STALLED_READER, STALLED_ID, None, true),
    ];
    for (kind, prefix, status, forwarded) in checks {
        let found = with_id(prefix);
        let (sent, passed) = table
            .get(kind)
            .map_or((0, 0), |k| (k.sent, k.sent - k.errors));
        if found.len() < passed as usize || found.len() > sent as usize {
            failures.push(format!(
                "{} access entries for \"{kind}\", {sent} sent and {passed} as expected",
                found.len()
            ));
        }
        for e in &found {
            let backend = e["backend"].as_str().unwrap_or("-");
            let wrong = if forwarded {
                backend == "-" || e["outcome"] == "complete"
            } else {
                backend != "-" || status.is_some_and(|s| e["status"] != s)
            };
            if wrong {
                failures.push(format!("\"{kind}\": access entry {e}"));
            }
        }
        parts.push(format!(
            "{prefix}* {} (status {}; backend {}; outcome {})",
            found.len(),
            tally(&found, "status"),
            if forwarded { "a mock" } else { "none" },
            tally(&found, "outcome")
        ));
    }
    failures.truncate(10);
    SlowAccess {
        summary: parts.join("; "),
        failures,
    }
}

/// What the mocks say of the load they got.
pub struct MockCheck {
    pub summary: String,
    pub failures: Vec<String>,
}

/// Each mock's own counts since the reset before the load: its peak in flight within
/// `slots` (the router's `max_concurrent_requests` for it), and no request tagged
/// as hostile (`hostile::TAG`), which the router must have refused, seen at all.
pub fn check_mocks(mocks: &[SocketAddr], slots: u64) -> MockCheck {
    let mut peaks = Vec::new();
    let mut hostile = Vec::new();
    let mut failures = Vec::new();
    for &mock in mocks {
        match http::get_json(mock, "/mock/stats") {
            Ok(stats) => {
                let peak = stats["peak_in_flight"].as_u64();
                let tagged = stats["tags"][TAG].as_u64().unwrap_or(0);
                match peak {
                    Some(p) if p <= slots => {}
                    Some(p) => failures.push(format!(
                        "mock {mock} had {p} requests in flight at once, over its {slots} slots"
                    )),
                    None => failures.push(format!("mock {mock}: no peak_in_flight in {stats}")),
                }
                if !stats["tags"].is_object() {
                    failures.push(format!("mock {mock}: no tags in {stats}"));
                }
                if tagged > 0 {
                    failures.push(format!(
                        "{tagged} hostile requests the router must refuse reached mock {mock}"
                    ));
                }
                peaks.push(peak.map_or("?".into(), |p| p.to_string()));
                hostile.push(tagged.to_string());
            }
            Err(e) => {
                failures.push(format!("mock {mock}: cannot read /mock/stats: {e}"));
                peaks.push("?".into());
                hostile.push("?".into());
            }
        }
    }
    MockCheck {
        summary: format!(
            "mocks' peak in flight: {} (bound {slots} each); hostile requests that reached \
             a mock: {} (none wanted)",
            peaks.join(", "),
            hostile.join(", ")
        ),
        failures,
    }
}
