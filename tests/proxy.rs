use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::support::{request, servers_toml, Conn, Mock, Router};

const CHAT: &str = "/v1/chat/completions";

fn header<'a>(pairs: &'a serde_json::Value, name: &str) -> Vec<&'a str> {
    pairs
        .as_array()
        .expect("header list")
        .iter()
        .filter(|p| p[0].as_str().is_some_and(|n| n.eq_ignore_ascii_case(name)))
        .filter_map(|p| p[1].as_str())
        .collect()
}

#[test]
fn method_path_query_headers_and_body_arrive_unchanged() {
    let mock = Mock::start(&[]);
    let router = Router::start(&servers_toml(&[(&mock.url, 2)], ""));
    let body = r#"{"model":"mock-model","prompt":"caf\u00e9 \"quoted\"",   "max_tokens":3}"#;
    let resp = request(
        router.addr,
        "POST",
        "/v1/completions?api-version=2024-01-01&x=a%20b&flag",
        &[
            ("Content-Type", "application/json"),
            ("Authorization", "Bearer client-key"),
            ("X-Custom", "one"),
            ("X-Custom", "two"),
            ("Connection", "close, X-Hop-Only"),
            ("X-Hop-Only", "secret"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Authorization", "Basic abc"),
        ],
        body.as_bytes(),
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
    let last = mock.last();
    assert_eq!(last["method"], "POST");
    assert_eq!(
        last["path"],
        "/v1/completions?api-version=2024-01-01&x=a%20b&flag"
    );
    assert_eq!(last["body"], body, "the body is forwarded byte for byte");
    let headers = &last["headers"];
    assert_eq!(header(headers, "x-custom"), ["one", "two"]);
    assert_eq!(header(headers, "authorization"), ["Bearer client-key"]);
    assert_eq!(header(headers, "content-type"), ["application/json"]);
    assert_eq!(
        header(headers, "content-length"),
        [body.len().to_string().as_str()]
    );
    for hop in [
        "x-hop-only",
        "keep-alive",
        "proxy-authorization",
        "connection",
        "transfer-encoding",
    ] {
        assert!(
            header(headers, hop).is_empty(),
            "hop-by-hop header {hop} was forwarded: {headers}"
        );
    }
    assert!(
        header(headers, "user-agent").is_empty(),
        "the router adds no User-Agent of its own"
    );
}

#[test]
fn backend_headers_reach_the_client() {
    let mock = Mock::start(&["--id", "backend-one"]);
    let router = Router::start(&servers_toml(&[(&mock.url, 2)], ""));
    let resp = router.post(CHAT, r#"{"model":"mock-model","max_tokens":2}"#);
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("x-mock-backend"), Some("backend-one"));
    assert_eq!(resp.header("content-type"), Some("application/json"));
    assert_eq!(resp.json()["backend"], "backend-one");
}

#[test]
fn backend_errors_pass_through_untouched() {
    let mock = Mock::start(&[]);
    let router = Router::start(&servers_toml(&[(&mock.url, 2)], ""));
    for status in ["400", "404", "418", "422", "500", "503"] {
        let headers = [
            ("Content-Type", "application/json"),
            ("x-mock-status", status),
        ];
        let body = br#"{"model":"mock-model"}"#;
        let direct = request(mock.addr, "POST", CHAT, &headers, body);
        let routed = request(router.addr, "POST", CHAT, &headers, body);
        assert_eq!(routed.status.to_string(), status);
        assert_eq!(routed.status, direct.status);
        assert_eq!(routed.body, direct.body, "status {status}: body changed");
        assert_eq!(routed.header("content-type"), direct.header("content-type"));
    }
    // The slot is given back just after the last byte is written.
    crate::support::wait_until(
        std::time::Duration::from_secs(5),
        "in-flight back to zero",
        || router.in_flight() == [0],
    );
}

#[test]
fn root_paths_and_get_requests_are_proxied() {
    let mock = Mock::start(&["--model", "m1"]);
    let router = Router::start(&servers_toml(&[(&mock.url, 2)], ""));
    let resp = router.post("/tokenize", r#"{"model":"m1","prompt":"hello"}"#);
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(mock.last()["path"], "/tokenize");
    let models = router.get("/v1/models");
    assert_eq!(models.status, 200);
    assert_eq!(models.json()["data"][0]["id"], "m1");
    let missing = router.get("/no/such/path");
    assert_eq!(missing.status, 404, "the backend's 404 is relayed");
}

#[test]
fn router_endpoints_report_servers_and_load() {
    let a = Mock::start(&[]);
    let b = Mock::start(&[]);
    let router = Router::start(&servers_toml(&[(&a.url, 2), (&b.url, 6)], ""));
    let health = router.get("/health");
    assert_eq!(health.status, 200);
    let h = health.json();
    assert_eq!(h["status"], "healthy");
    assert_eq!(h["healthy_servers"], 2);
    assert_eq!(h["total_servers"], 2);
    let servers = h["servers"].as_array().expect("servers");
    assert_eq!(servers[0]["url"], a.url.as_str());
    assert_eq!(servers[1]["max_concurrent_requests"], 6);
    for s in servers {
        for key in ["url", "healthy", "in_flight", "max_concurrent_requests"] {
            assert!(!s[key].is_null(), "/health server entry lacks {key}: {s}");
        }
    }
    assert_eq!(router.get("/livez").status, 200);
    assert_eq!(router.get("/readyz").status, 200);
    let stats = router.get_json("/load-stats");
    let s0 = &stats["servers"][0];
    for key in [
        "in_flight",
        "max_concurrent_requests",
        "available",
        "utilization_percent",
        "healthy",
    ] {
        assert!(
            !s0[key].is_null(),
            "/load-stats server entry lacks {key}: {s0}"
        );
    }
    assert_eq!(s0["available"], 2);
    let summary = &stats["summary"];
    assert_eq!(summary["total_capacity"], 8);
    assert_eq!(summary["total_in_flight"], 0);
    assert_eq!(summary["queue_length"], 0);
    let post = router.post("/health", "{}");
    assert_eq!(post.status, 405);
    assert_eq!(
        a.stat("total") + b.stat("total"),
        0,
        "router endpoints never reach a backend"
    );
}

#[test]
fn a_body_over_max_body_bytes_is_refused_before_the_backend() {
    let mock = Mock::start(&[]);
    let router = Router::start(&servers_toml(&[(&mock.url, 2)], "max_body_bytes = 100"));
    let big = format!(r#"{{"model":"mock-model","prompt":"{}"}}"#, "x".repeat(200));
    let resp = router.post(CHAT, &big);
    assert_eq!(resp.status, 413);
    assert_eq!(resp.json()["error"]["code"], "request_too_large");
    // Chunked: the size is only found while reading.
    let mut conn = Conn::open(router.addr);
    let mut raw =
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    raw.extend_from_slice(format!("{:x}\r\n{big}\r\n0\r\n\r\n", big.len()).as_bytes());
    conn.send_raw(&raw);
    assert_eq!(conn.read_response(false).expect("reply").status, 413);
    // A declared size far beyond memory is refused from the head alone.
    let mut conn = Conn::open(router.addr);
    conn.send_raw(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999\r\n\r\n{}",
    );
    let (status, _) = conn.read_head().expect("reply");
    assert_eq!(status, 413);
    drop(conn);
    assert_eq!(mock.stat("total"), 0);
    assert_eq!(
        router.post(CHAT, r#"{"model":"mock-model"}"#).status,
        200,
        "still serving"
    );
}

#[test]
fn conflicting_framing_headers_are_refused() {
    let mock = Mock::start(&[]);
    let router = Router::start(&servers_toml(&[(&mock.url, 2)], ""));
    let cases: [&[u8]; 3] = [
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n{}",
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    ];
    for raw in cases {
        let mut conn = Conn::open(router.addr);
        conn.send_raw(raw);
        let status = conn.read_head().map(|(s, _)| s).unwrap_or(0);
        assert_eq!(status, 400, "{}", String::from_utf8_lossy(raw));
    }
    assert_eq!(mock.stat("total"), 0);
}

#[test]
fn http10_clients_get_a_body_they_can_delimit() {
    let mock = Mock::start(&[]);
    let router = Router::start(&servers_toml(&[(&mock.url, 2)], ""));
    let body = r#"{"model":"mock-model","stream":true,"max_tokens":3}"#;
    for keep_alive in [false, true] {
        let mut s = TcpStream::connect(router.addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let ka = if keep_alive {
            "Connection: keep-alive\r\n"
        } else {
            ""
        };
        let raw = format!(
            "POST {CHAT} HTTP/1.0\r\nContent-Type: application/json\r\n{ka}Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(raw.as_bytes()).expect("send");
        let mut conn = Conn {
            reader: std::io::BufReader::new(s.try_clone().expect("clone")),
            stream: s,
        };
        let resp = conn.read_response(false).expect("reply");
        assert_eq!(resp.status, 200);
        assert!(
            resp.header("transfer-encoding").is_none(),
            "no chunked bodies for HTTP/1.0"
        );
        assert!(resp.text().contains("[DONE]"), "{}", resp.text());
        // A stream has no length: it is ended by closing, which the reply says, even
        // to a client that asked to keep the connection.
        assert_eq!(resp.header("connection"), Some("close"));
        let mut rest = Vec::new();
        let _ = conn.stream.read_to_end(&mut rest);
        assert!(rest.is_empty());
    }
}
