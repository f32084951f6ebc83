use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::support::{servers_toml, wait_until, Conn, Mock, Router};

const CHAT: &str = "/v1/chat/completions";

fn chat(tokens: u32, delay_ms: u32) -> String {
    format!(
        r#"{{"model":"mock-model","messages":[{{"role":"user","content":"hi"}}],"max_tokens":{tokens},"x":{delay_ms}}}"#
    )
}

/// Sends a request that holds its slot for about `ms` milliseconds.
fn slow_request(router: &Router, ms: u32) -> crate::support::Resp {
    let delay = (ms / 4).to_string();
    crate::support::request(
        router.addr,
        "POST",
        CHAT,
        &[
            ("Content-Type", "application/json"),
            ("x-mock-delay-ms", &delay),
            ("x-mock-tokens", "4"),
        ],
        chat(4, 0).as_bytes(),
    )
}

/// Sends `slow_request` on another thread; the handle yields its status.
fn in_background(router: &Arc<Router>, ms: u32) -> thread::JoinHandle<u16> {
    let router = Arc::clone(router);
    thread::spawn(move || slow_request(&router, ms).status)
}

/// Takes the single slot of a one-backend, one-slot router for about `ms` milliseconds.
fn hold_the_only_slot(router: &Arc<Router>, ms: u32) -> thread::JoinHandle<u16> {
    let holder = in_background(router, ms);
    wait_until(Duration::from_secs(5), "the slot is taken", || {
        router.in_flight() == [1]
    });
    holder
}

#[test]
fn the_cap_is_never_exceeded_under_concurrency() {
    let a = Mock::start(&[]);
    let b = Mock::start(&[]);
    let router = Router::start(&servers_toml(
        &[(&a.url, 2), (&b.url, 3)],
        "queue_timeout = 60",
    ));
    let router = Arc::new(router);
    let handles: Vec<_> = (0..25).map(|_| in_background(&router, 120)).collect();
    for h in handles {
        assert_eq!(h.join().expect("client thread"), 200);
    }
    // The mocks count concurrency themselves: the router's own numbers are not trusted.
    assert!(a.stat("peak_in_flight") <= 2, "a: {}", a.stats());
    assert!(b.stat("peak_in_flight") <= 3, "b: {}", b.stats());
    assert_eq!(
        a.stat("peak_in_flight") + b.stat("peak_in_flight"),
        5,
        "both backends filled"
    );
    assert_eq!(a.stat("total") + b.stat("total"), 25);
    wait_until(Duration::from_secs(5), "in-flight back to zero", || {
        router.in_flight() == [0, 0]
    });
}

#[test]
fn equal_backends_share_requests_evenly() {
    let mocks: Vec<Mock> = (0..3).map(|_| Mock::start(&[])).collect();
    let backends: Vec<(&str, u32)> = mocks.iter().map(|m| (m.url.as_str(), 4)).collect();
    let router = Router::start(&servers_toml(&backends, ""));
    for _ in 0..30 {
        assert_eq!(router.post(CHAT, &chat(2, 0)).status, 200);
    }
    let totals: Vec<u64> = mocks.iter().map(|m| m.stat("total")).collect();
    assert_eq!(totals, [10, 10, 10]);
}

#[test]
fn waiting_requests_are_served_first_come_first_served() {
    let mock = Mock::start(&[]);
    let router = Arc::new(Router::start(&servers_toml(
        &[(&mock.url, 1)],
        "queue_timeout = 60",
    )));
    let holder = hold_the_only_slot(&router, 400);
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut waiters = Vec::new();
    for i in 0..4 {
        let (r, order) = (Arc::clone(&router), Arc::clone(&order));
        waiters.push(thread::spawn(move || {
            let resp = slow_request(&r, 40);
            order.lock().expect("order").push(i);
            resp.status
        }));
        // The next one queues only after this one is in line.
        wait_until(Duration::from_secs(5), "waiter in line", || {
            router.get_json("/load-stats")["summary"]["queue_length"] == i + 1
        });
    }
    assert_eq!(holder.join().expect("holder"), 200);
    for w in waiters {
        assert_eq!(w.join().expect("waiter"), 200);
    }
    assert_eq!(*order.lock().expect("order"), [0, 1, 2, 3]);
    assert_eq!(mock.stat("peak_in_flight"), 1);
}

#[test]
fn a_request_that_waits_too_long_gets_503_with_retry_after() {
    let mock = Mock::start(&[]);
    let router = Arc::new(Router::start(&servers_toml(
        &[(&mock.url, 1)],
        "queue_timeout = 0.3",
    )));
    let holder = hold_the_only_slot(&router, 1500);
    let started = Instant::now();
    let resp = router.post(CHAT, &chat(1, 0));
    let waited = started.elapsed();
    assert_eq!(resp.status, 503, "{}", resp.text());
    assert!(
        waited >= Duration::from_millis(300),
        "answered after {waited:?}, before queue_timeout"
    );
    assert!(
        waited < Duration::from_millis(1400),
        "answered after {waited:?}, not at queue_timeout"
    );
    assert_eq!(resp.header("retry-after"), Some("1"));
    assert_eq!(resp.header("content-type"), Some("application/json"));
    let body = resp.json();
    assert_eq!(body["error"]["code"], "queue_timeout");
    assert_eq!(body["error"]["type"], "server_overloaded");
    assert!(body["error"]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
    assert_eq!(holder.join().expect("holder"), 200);
    assert_eq!(
        mock.stat("total"),
        1,
        "the timed-out request never reached the backend"
    );
}

/// A client that closes its connection while its request waits in line: the request
/// leaves the line and never reaches a backend, so no GPU generates a reply nobody
/// reads. It shows in the access log as 499.
#[test]
fn a_request_whose_client_left_leaves_the_line_and_is_never_sent() {
    let mock = Mock::start(&[]);
    let router = Arc::new(Router::start(&servers_toml(
        &[(&mock.url, 1)],
        "queue_timeout = 60",
    )));
    let holder = hold_the_only_slot(&router, 3000);
    let mut leaving = Conn::open(router.addr);
    let body = chat(1, 0);
    leaving.send(
        "POST",
        CHAT,
        &[
            ("Content-Type", "application/json"),
            ("X-Request-Id", "left-in-line"),
        ],
        body.as_bytes(),
        false,
    );
    wait_until(Duration::from_secs(5), "the request queued", || {
        router.get_json("/load-stats")["summary"]["queue_length"] == 1
    });
    drop(leaving);
    wait_until(Duration::from_secs(5), "the request left the line", || {
        router.get_json("/load-stats")["summary"]["queue_length"] == 0
    });
    assert_eq!(router.in_flight(), [1], "the holder still runs");
    let mut entry = None;
    wait_until(Duration::from_secs(5), "its access entry", || {
        entry = router.access_entry("left-in-line");
        entry.is_some()
    });
    let entry = entry.expect("entry");
    assert_eq!(entry["status"], 499, "{entry}");
    assert_eq!(entry["outcome"], "client_closed_request", "{entry}");
    assert_eq!(holder.join().expect("holder"), 200);
    assert_eq!(mock.stat("total"), 1, "only the holder reached the backend");
}

#[test]
fn a_full_queue_answers_503_at_once() {
    let mock = Mock::start(&[]);
    let router = Arc::new(Router::start(&servers_toml(
        &[(&mock.url, 1)],
        "queue_timeout = 30\nmax_queue_size = 1",
    )));
    let holder = hold_the_only_slot(&router, 1000);
    let queued = in_background(&router, 40);
    wait_until(Duration::from_secs(5), "one request queued", || {
        router.get_json("/load-stats")["summary"]["queue_length"] == 1
    });
    let started = Instant::now();
    let resp = router.post(CHAT, &chat(1, 0));
    assert_eq!(resp.status, 503);
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "a full queue must not make anyone wait"
    );
    assert_eq!(resp.json()["error"]["code"], "queue_full");
    assert_eq!(resp.header("retry-after"), Some("1"));
    assert_eq!(holder.join().expect("holder"), 200);
    assert_eq!(queued.join().expect("queued"), 200);
}

#[test]
fn an_unreachable_backend_gives_502_with_an_openai_error() {
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    // Active checks off: the backend is trusted until a request fails.
    let toml = servers_toml(
        &[(&format!("http://127.0.0.1:{port}"), 2)],
        "enable_active_health_check = false",
    );
    let router = Router::start_with(&toml, &[], &[]).expect("router starts");
    let resp = router.post(CHAT, &chat(1, 0));
    assert_eq!(resp.status, 502, "{}", resp.text());
    assert_eq!(resp.json()["error"]["code"], "backend_unavailable");
    // The slot is given back just after the last byte is written.
    crate::support::wait_until(
        std::time::Duration::from_secs(5),
        "in-flight back to zero",
        || router.in_flight() == [0],
    );
}

#[test]
fn keep_alive_replies_are_not_held_by_nagle() {
    let mock = Mock::start(&[]);
    let router = Router::start(&servers_toml(&[(&mock.url, 4)], ""));
    let mut conn = Conn::open(router.addr);
    let body = chat(2, 0);
    // Warm up the backend connection pool, then time sequential requests on one
    // client connection. A Nagle/delayed-ACK stall costs ~40 ms per reply.
    conn.send(
        "POST",
        CHAT,
        &[("Content-Type", "application/json")],
        body.as_bytes(),
        false,
    );
    assert_eq!(conn.read_response(false).expect("reply").status, 200);
    // The baseline: the same request straight to the backend, which writes each reply
    // at once with nodelay set. Router and backend requests alternate, so a busy
    // machine slows both alike; a Nagle/delayed-ACK stall adds ~40 ms to nearly every
    // proxied reply, which the medians show whatever the load.
    let mut direct = Conn::open(mock.addr);
    let time_one = |conn: &mut Conn| {
        let started = Instant::now();
        conn.send(
            "POST",
            CHAT,
            &[("Content-Type", "application/json")],
            body.as_bytes(),
            false,
        );
        assert_eq!(conn.read_response(false).expect("reply").status, 200);
        started.elapsed()
    };
    time_one(&mut direct);
    let (mut proxied, mut straight) = (Vec::new(), Vec::new());
    for _ in 0..21 {
        proxied.push(time_one(&mut conn));
        straight.push(time_one(&mut direct));
    }
    proxied.sort_unstable();
    straight.sort_unstable();
    let (proxied, straight) = (proxied[10], straight[10]);
    assert!(
        proxied < straight * 3 + Duration::from_millis(20),
        "median reply time {proxied:?} through the router on a keep-alive connection, \
         {straight:?} straight from the backend"
    );
}

/// The worker pool's threads start as requests need them, up to its size: an idle
/// router with room for many requests holds few threads, and a burst still runs all
/// at once.
#[test]
fn workers_start_as_requests_need_them() {
    let mock = Mock::start(&[]);
    let router = Arc::new(Router::start(&servers_toml(
        &[(&mock.url, 64)],
        "worker_threads = 200",
    )));
    let threads = || crate::support::proc_status(router.pid(), "Threads");
    let idle = threads();
    assert!(
        idle < 60,
        "{idle} threads in an idle router with a pool of 200"
    );
    let handles: Vec<_> = (0..40).map(|_| in_background(&router, 1500)).collect();
    wait_until(Duration::from_secs(10), "all 40 run at once", || {
        mock.stat("in_flight") == 40
    });
    for h in handles {
        assert_eq!(h.join().expect("client thread"), 200);
    }
    assert!(
        threads() < 200 + idle,
        "never more workers than the pool's size"
    );
}
