//! The routes that are not a JSON request and a JSON reply (issue 16), through the
//! real router with real clients: the `websockets` Python package for vLLM's realtime
//! WebSocket, the openai Python SDK for audio uploads and stored responses, curl for
//! multipart uploads; LoRA adapters that appear on a backend at runtime; and
//! `?model=` routing on every path.
//!
//! The Python packages and curl are required (`make test` installs `openai` and
//! `websockets` with pip when they are missing): without them these tests fail,
//! saying what to install, rather than skip.
//!
//! The figures the issue asks for (a 64 MiB upload's peak RSS, WebSocket round trips
//! direct and through the router, the time from an adapter appearing on a backend to
//! the first request routed to it) are printed by the tests that measure them
//! (`--nocapture`); they assert only generous bounds.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::*;

/// Runs `script` with `python3`, `args` as `sys.argv[1:]`; returns what it printed
/// (one JSON document). Fails, naming the fix, when Python or a package is missing.
fn python(script: &str, args: &[&str]) -> Value {
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run python3 ({e}): these tests need Python 3 with `pip install openai websockets` (`make test` installs them)"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("ModuleNotFoundError") {
        panic!("a Python package is missing: `pip install openai websockets` (`make test` installs them)\n{stderr}");
    }
    assert!(out.status.success(), "the Python client failed:\n{stderr}");
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("the script printed {text:?}: {e}\n{stderr}"))
}

fn curl(args: &[&str]) -> (u16, Value) {
    let out = Command::new("curl")
        .args(["-sS", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run curl ({e}): these tests need it (Debian package curl)")
        });
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    let status = code.trim().parse().unwrap_or(0);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// Two mocks (`--id gpu-a`, `gpu-b`), each serving its own model as well as the shared one.
fn two_mocks(extra: &[&str]) -> (Mock, Mock) {
    let a = [
        &["--id", "gpu-a", "--model", "shared", "--model", "model-a"][..],
        extra,
    ]
    .concat();
    let b = [
        &["--id", "gpu-b", "--model", "shared", "--model", "model-b"][..],
        extra,
    ]
    .concat();
    (Mock::start(&a), Mock::start(&b))
}

fn router_for(mocks: &[&Mock], config: &str) -> Router {
    let servers: Vec<(&str, u32)> = mocks.iter().map(|m| (m.url.as_str(), 8)).collect();
    Router::start(&servers_toml(&servers, config))
}

const WS_SESSION: &str = r#"
import json, sys, time, urllib.request
from websockets.sync.client import connect
from websockets.exceptions import InvalidStatus
uri, mode, key = sys.argv[1], sys.argv[2], sys.argv[3]
headers, protocols = {}, ["realtime"]
if mode == "header":
    headers["Authorization"] = "Bearer " + key
elif mode == "protocol":
    protocols.append("openai-insecure-api-key." + key)
out = {}
try:
    with connect(uri, additional_headers=headers, subprotocols=protocols, open_timeout=10) as ws:
        out["subprotocol"] = ws.subprotocol
        out["hello"] = json.loads(ws.recv(timeout=10))
        ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": "AAAA"}))
        out["text_echo"] = json.loads(ws.recv(timeout=10))
        blob = bytes(range(256)) * 300
        ws.send(blob)
        out["binary_echo_ok"] = ws.recv(timeout=10) == blob
        stats = sys.argv[4] if len(sys.argv) > 4 else None
        if stats:
            out["load_stats"] = json.loads(urllib.request.urlopen(stats + "/load-stats").read())
            out["metrics"] = urllib.request.urlopen(stats + "/metrics").read().decode()
    out["close_code"] = ws.close_code
except InvalidStatus as e:
    out["refused"] = e.response.status_code
print(json.dumps(out))
"#;

#[test]
fn a_realtime_websocket_is_tunnelled_to_the_backend_of_its_model() {
    let (a, b) = two_mocks(&[]);
    let router = router_for(&[&a, &b], r#"api_keys = ["sk-router"]"#);
    let base = format!("http://{}", router.addr);
    let uri = format!("ws://{}/v1/realtime?model=model-b", router.addr);

    // A browser's way: the key as a protocol, which never reaches the backend.
    let out = python(WS_SESSION, &[&uri, "protocol", "sk-router", &base]);
    assert_eq!(out["hello"]["backend"], "gpu-b", "{out}");
    assert_eq!(out["hello"]["model"], "model-b");
    assert_eq!(
        out["hello"]["protocols"],
        serde_json::json!(["realtime"]),
        "the key protocol is taken out"
    );
    assert_eq!(
        out["hello"]["authorization"],
        Value::Null,
        "the client's key stays with the router"
    );
    assert!(
        out["hello"]["request_id"].is_string(),
        "the request id goes to the backend"
    );
    assert_eq!(out["subprotocol"], "realtime");
    assert_eq!(out["text_echo"]["type"], "input_audio_buffer.append");
    assert_eq!(out["binary_echo_ok"], true);
    assert_eq!(out["close_code"], 1000);
    // While open, the socket held one slot of gpu-b, in /load-stats and /metrics.
    let servers = out["load_stats"]["servers"].as_array().expect("servers");
    let in_flight: Vec<u64> = servers
        .iter()
        .map(|s| s["in_flight"].as_u64().expect("n"))
        .collect();
    assert_eq!(in_flight, [0, 1], "{}", out["load_stats"]);
    let metrics = out["metrics"].as_str().expect("metrics");
    let gauge = metrics
        .lines()
        .find(|l| l.starts_with("vllm_router_backend_in_flight") && l.contains(&b.url))
        .unwrap_or_else(|| panic!("no in-flight gauge for {} in\n{metrics}", b.url));
    assert!(gauge.ends_with(" 1"), "{gauge}");
    wait_until(Duration::from_secs(5), "the slot freed", || {
        router.in_flight() == [0, 0]
    });

    // The Authorization header works as for any route; a wrong key is refused 401
    // before anything reaches a backend.
    let out = python(WS_SESSION, &[&uri, "header", "sk-router"]);
    assert_eq!(out["hello"]["backend"], "gpu-b", "{out}");
    let sessions = b.stat("sessions");
    let out = python(WS_SESSION, &[&uri, "protocol", "wrong"]);
    assert_eq!(out["refused"], 401, "{out}");
    let out = python(WS_SESSION, &[&uri, "none", ""]);
    assert_eq!(out["refused"], 401, "{out}");
    assert_eq!(
        b.stat("sessions") + a.stat("sessions"),
        sessions,
        "refused upgrades never reached a backend"
    );

    // Without a model: any backend. An unknown model: 404.
    let any = format!("ws://{}/v1/realtime", router.addr);
    let out = python(WS_SESSION, &[&any, "header", "sk-router"]);
    assert!(
        out["hello"]["backend"]
            .as_str()
            .is_some_and(|b| b.starts_with("gpu-")),
        "{out}"
    );
    let unknown = format!("ws://{}/v1/realtime?model=nope", router.addr);
    let out = python(WS_SESSION, &[&unknown, "header", "sk-router"]);
    assert_eq!(out["refused"], 404, "{out}");
}

#[test]
fn a_websocket_upgrade_elsewhere_is_refused_and_h2c_is_ignored() {
    let mock = Mock::start(&[]);
    let router = router_for(&[&mock], "");
    let upgrade = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nx-mock-tag: ws\r\n";
    for path in ["/v1/chat/completions", "/v1/realtimex", "/health"] {
        let mut conn = Conn::open(router.addr);
        conn.send_raw(format!("GET {path} HTTP/1.1\r\nHost: r\r\n{upgrade}\r\n").as_bytes());
        let resp = conn.read_response(false).expect("a reply");
        assert_eq!(resp.status, 400, "{path}: {}", resp.text());
        assert!(
            resp.text().contains("/v1/realtime"),
            "says where: {}",
            resp.text()
        );
        // The connection is closed after the refusal: nothing more is read from it.
        conn.send_raw(b"GET /health HTTP/1.1\r\nHost: r\r\n\r\n");
        assert!(
            conn.read_response(false).is_err(),
            "{path}: closed after the refusal"
        );
    }
    // A POST to the realtime path with an upgrade is refused too.
    let mut conn = Conn::open(router.addr);
    conn.send_raw(
        format!("POST /v1/realtime HTTP/1.1\r\nHost: r\r\nContent-Length: 0\r\n{upgrade}\r\n")
            .as_bytes(),
    );
    assert_eq!(conn.read_response(false).expect("a reply").status, 400);
    assert!(
        mock.stats()["tags"].get("ws").is_none(),
        "nothing reached the backend"
    );

    // h2c: ignored, served as HTTP/1.1, and the next request on the connection too.
    let mut conn = Conn::open(router.addr);
    let body = chat_for("mock-model");
    let h2c = "Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nContent-Type: application/json\r\n";
    for _ in 0..2 {
        conn.send_raw(format!("POST /v1/chat/completions HTTP/1.1\r\nHost: r\r\n{h2c}Content-Length: {}\r\n\r\n{body}", body.len()).as_bytes());
        let resp = conn.read_response(false).expect("a reply");
        assert_eq!(resp.status, 200, "{}", resp.text());
        assert!(
            mock.headers_seen("upgrade").is_empty(),
            "Upgrade is hop-by-hop"
        );
        assert!(
            mock.headers_seen("http2-settings").is_empty(),
            "named in Connection"
        );
    }
}

const WS_WAIT_CLOSE: &str = r#"
import json, sys, time
from websockets.sync.client import connect
with connect(sys.argv[1], open_timeout=10) as ws:
    ws.recv(timeout=10)
    print("open", flush=True)
    start = time.monotonic()
    try:
        while True:
            ws.recv(timeout=30)
    except Exception:
        pass
    out = {"code": ws.close_code, "reason": ws.close_reason, "after_s": time.monotonic() - start}
print(json.dumps(out), flush=True)
"#;

/// Starts `WS_WAIT_CLOSE` against `uri`; returns it once the socket is open.
fn open_and_wait_for_close(
    uri: &str,
) -> (std::process::Child, BufReader<std::process::ChildStdout>) {
    let mut child = Command::new("python3")
        .args(["-c", WS_WAIT_CLOSE, uri])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs (pip install websockets)");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("a line");
    assert_eq!(line.trim(), "open", "the socket opened");
    (child, out)
}

fn close_seen(
    mut child: std::process::Child,
    mut out: BufReader<std::process::ChildStdout>,
) -> Value {
    let mut line = String::new();
    out.read_line(&mut line).expect("a line");
    let _ = child.wait();
    serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("{line:?}: {e}"))
}

#[test]
fn a_websocket_gets_a_1001_close_on_shutdown_and_after_its_idle_timeout() {
    let mock = Mock::start(&[]);
    let mut router = router_for(
        &[&mock],
        "shutdown_timeout = 10\nwebsocket_idle_timeout = 1",
    );
    let uri = format!("ws://{}/v1/realtime", router.addr);

    let (child, out) = open_and_wait_for_close(&uri);
    let idle = close_seen(child, out);
    assert_eq!(idle["code"], 1001, "{idle}");
    assert_eq!(idle["reason"], "idle_timeout", "{idle}");
    assert!(
        idle["after_s"]
            .as_f64()
            .is_some_and(|s| (0.5..5.0).contains(&s)),
        "{idle}"
    );
    wait_until(Duration::from_secs(5), "the slot freed", || {
        router.in_flight() == [0]
    });

    let (child, out) = open_and_wait_for_close(&uri);
    assert_eq!(router.in_flight(), [1]);
    let asked = Instant::now();
    router.signal(libc::SIGTERM);
    let shut = close_seen(child, out);
    assert_eq!(shut["code"], 1001, "{shut}");
    assert_eq!(shut["reason"], "shutdown", "{shut}");
    let status = router
        .wait_exit(Duration::from_secs(10))
        .expect("the router exits");
    assert!(status.success(), "{status:?}");
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "well within shutdown_timeout: {:?}",
        asked.elapsed()
    );
}

const WS_BUSY_UNTIL_CLOSED: &str = r#"
import json, sys, time
from websockets.sync.client import connect
from websockets.exceptions import ConnectionClosed
with connect(sys.argv[1], open_timeout=10) as ws:
    ws.recv(timeout=10)
    start, sent = time.monotonic(), 0
    try:
        while time.monotonic() - start < 10:
            ws.send("busy"); sent += 1
            ws.recv(timeout=5)
            time.sleep(0.1)
    except ConnectionClosed:
        pass
    out = {"code": ws.close_code, "reason": ws.close_reason, "after_s": time.monotonic() - start, "sent": sent}
print(json.dumps(out))
"#;

#[test]
fn a_busy_websocket_is_closed_after_its_max_lifetime() {
    let mock = Mock::start(&[]);
    let router = router_for(
        &[&mock],
        "websocket_idle_timeout = 60\nwebsocket_max_lifetime = 1.5",
    );
    let out = python(
        WS_BUSY_UNTIL_CLOSED,
        &[&format!("ws://{}/v1/realtime", router.addr)],
    );
    assert_eq!(out["code"], 1001, "{out}");
    assert_eq!(out["reason"], "max_lifetime", "{out}");
    let after = out["after_s"].as_f64().expect("after_s");
    assert!((1.0..6.0).contains(&after), "closed after {after}s: {out}");
    assert!(
        out["sent"].as_u64().expect("sent") >= 5,
        "it was busy: {out}"
    );
    wait_until(Duration::from_secs(5), "the slot freed", || {
        router.in_flight() == [0]
    });
}

const WS_RTT: &str = r#"
import json, sys, time
from websockets.sync.client import connect
with connect(sys.argv[1], open_timeout=10, compression=None) as ws:
    ws.recv(timeout=10)
    msg = json.dumps({"type": "response.create", "pad": "x" * 200})
    for _ in range(50):
        ws.send(msg); ws.recv(timeout=10)
    times = []
    for _ in range(1000):
        t = time.perf_counter(); ws.send(msg); ws.recv(timeout=10)
        times.append(time.perf_counter() - t)
times.sort()
print(json.dumps({"p50_us": times[len(times) // 2] * 1e6, "p99_us": times[int(len(times) * 0.99)] * 1e6}))
"#;

/// Figures for the closing note: round trips of a 200-byte text message, direct to
/// the mock and through the router. Asserted only against a generous bound.
#[test]
fn websocket_round_trips_direct_and_through_the_router() {
    let mock = Mock::start(&[]);
    let router = router_for(&[&mock], "");
    let direct = python(WS_RTT, &[&format!("ws://{}/v1/realtime", mock.addr)]);
    let routed = python(WS_RTT, &[&format!("ws://{}/v1/realtime", router.addr)]);
    eprintln!(
        "FIGURE websocket round trip (200 B text, 1000 round trips): direct p50 {:.0} us p99 {:.0} us; through the router p50 {:.0} us p99 {:.0} us",
        direct["p50_us"].as_f64().unwrap_or(0.0),
        direct["p99_us"].as_f64().unwrap_or(0.0),
        routed["p50_us"].as_f64().unwrap_or(0.0),
        routed["p99_us"].as_f64().unwrap_or(0.0),
    );
    let p50 = routed["p50_us"].as_f64().expect("p50");
    assert!(
        p50 < 20_000.0,
        "a round trip through the router took {p50} us at the median"
    );
}

/// FNV-1a of `data`, as the mock reports an upload's file.
fn fnv(data: &[u8]) -> String {
    let h = data.iter().fold(0xcbf29ce484222325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    });
    format!("{h:016x}")
}

fn audio_file(dir: &std::path::Path, name: &str, len: usize) -> (String, String) {
    let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
    let path = dir.join(name);
    std::fs::write(&path, &data).expect("write the upload");
    (path.display().to_string(), fnv(&data))
}

#[test]
fn a_64_mib_upload_streams_through_in_little_memory_routed_by_its_model_field() {
    let (a, b) = two_mocks(&[]);
    let router = router_for(&[&a, &b], "max_body_bytes = 134217728");
    let dir = test_dir("upload");
    let (file, hash) = audio_file(&dir, "big.wav", 64 << 20);
    let url = format!("http://{}/v1/audio/transcriptions", router.addr);
    let before = proc_status(router.pid(), "VmRSS");
    let (status, body) = curl(&[
        "-F",
        "model=model-b",
        "-F",
        "language=en",
        "-F",
        &format!("file=@{file};type=audio/wav"),
        &url,
    ]);
    let peak = proc_status(router.pid(), "VmHWM");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["backend"], "gpu-b",
        "routed by the model field before the file: {body}"
    );
    assert_eq!(body["file_bytes"], 64 << 20);
    assert_eq!(body["file_fnv"], hash, "every byte arrived unchanged");
    assert_eq!(body["fields"]["language"], "en");
    eprintln!(
        "FIGURE 64 MiB multipart upload: router VmRSS before {} KiB, VmHWM after {} KiB (peak - before = {} KiB)",
        before,
        peak,
        peak.saturating_sub(before)
    );
    assert!(
        peak.saturating_sub(before) < 16 * 1024,
        "the upload cost the router {} KiB",
        peak - before
    );

    // Chunked (no length declared) streams too.
    let (status, body) = curl(&[
        "-H",
        "Transfer-Encoding: chunked",
        "-F",
        "model=model-a",
        "-F",
        &format!("file=@{file}"),
        &url,
    ]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["backend"].clone(), body["file_fnv"].clone()),
        ("gpu-a".into(), hash.into())
    );
    let peak = proc_status(router.pid(), "VmHWM");
    assert!(
        peak.saturating_sub(before) < 16 * 1024,
        "the chunked upload cost {} KiB",
        peak - before
    );
}

#[test]
fn an_upload_over_max_body_bytes_is_refused_413_and_nothing_half_sent_is_trusted() {
    let mock = Mock::start(&[]);
    let router = router_for(&[&mock], "max_body_bytes = 1048576");
    let dir = test_dir("upload-413");
    let (file, _) = audio_file(&dir, "two.wav", 2 << 20);
    let url = format!("http://{}/v1/audio/transcriptions", router.addr);
    let (status, body) = curl(&[
        "-H",
        "x-mock-tag: big",
        "-F",
        "model=mock-model",
        "-F",
        &format!("file=@{file}"),
        &url,
    ]);
    assert_eq!(status, 413, "{body}");
    assert!(
        mock.stats()["tags"].get("big").is_none(),
        "a declared length over the cap never reaches the backend"
    );
    let (status, body) = curl(&[
        "-H",
        "Transfer-Encoding: chunked",
        "-F",
        "model=mock-model",
        "-F",
        &format!("file=@{file}"),
        &url,
    ]);
    assert_eq!(status, 413, "{body}");
    // Within the cap, on a connection of its own, all is well.
    let (small, hash) = audio_file(&dir, "small.wav", 1000);
    let (status, body) = curl(&[
        "-F",
        "model=mock-model",
        "-F",
        &format!("file=@{small}"),
        &url,
    ]);
    assert_eq!(
        (status, body["file_fnv"].clone()),
        (200, hash.into()),
        "{body}"
    );
    wait_until(Duration::from_secs(5), "no slot held", || {
        router.in_flight() == [0]
    });
}

const SDK_AUDIO: &str = r#"
import json, sys, time
from openai import OpenAI
client = OpenAI(base_url=sys.argv[1], api_key="none", max_retries=0)
out = {}
with open(sys.argv[2], "rb") as f:
    t = client.audio.transcriptions.create(model="model-b", file=f, language="en")
    out["json"] = t.to_dict()
with open(sys.argv[2], "rb") as f:
    events, start = [], time.monotonic()
    for ev in client.audio.transcriptions.create(model="model-a", file=f, stream=True):
        events.append({"type": ev.type, "at": time.monotonic() - start, "delta": getattr(ev, "delta", None), "text": getattr(ev, "text", None)})
    out["stream"] = events
with open(sys.argv[2], "rb") as f:
    t = client.audio.translations.create(model="model-b", file=f)
    out["translation"] = t.to_dict()
print(json.dumps(out))
"#;

#[test]
fn the_openai_sdk_transcribes_and_streams_transcriptions_through_the_router() {
    let (a, b) = two_mocks(&["--delay-ms", "150"]);
    let router = router_for(&[&a, &b], "");
    let dir = test_dir("sdk-audio");
    let (file, hash) = audio_file(&dir, "speech.wav", 300_000);
    let out = python(SDK_AUDIO, &[&format!("http://{}/v1", router.addr), &file]);
    assert_eq!(out["json"]["backend"], "gpu-b", "{out}");
    assert_eq!(out["json"]["file_fnv"], hash.as_str());
    assert_eq!(out["translation"]["backend"], "gpu-b");
    let events = out["stream"].as_array().expect("events");
    assert!(events.len() >= 3, "{out}");
    assert_eq!(events.last().expect("last")["type"], "transcript.text.done");
    assert_eq!(events.last().expect("last")["text"], "heard 300000 bytes");
    // Relayed event by event: they arrive spread over the mock's delays, not at once.
    let first = events[0]["at"].as_f64().expect("at");
    let last = events[events.len() - 2]["at"].as_f64().expect("at");
    assert!(
        last - first > 0.2,
        "the deltas came {:.3}s apart: held back?\n{out}",
        last - first
    );
}

#[test]
fn a_model_field_after_the_file_is_not_used_for_routing_but_the_query_is() {
    let (a, b) = two_mocks(&[]);
    let router = router_for(&[&a, &b], "");
    let dir = test_dir("upload-order");
    let (file, hash) = audio_file(&dir, "late.wav", 100_000);
    let url = format!("http://{}/v1/audio/transcriptions", router.addr);
    // The file first, then the model: not read for routing; both backends take turns.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..6 {
        let (status, body) = curl(&["-F", &format!("file=@{file}"), "-F", "model=model-b", &url]);
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["file_fnv"], hash.as_str());
        seen.insert(body["backend"].as_str().expect("backend").to_owned());
    }
    assert_eq!(seen.len(), 2, "routed without the model: {seen:?}");
    // With `?model=` it is routed.
    for _ in 0..3 {
        let (status, body) = curl(&[
            "-F",
            &format!("file=@{file}"),
            "-F",
            "model=model-b",
            &format!("{url}?model=model-b"),
        ]);
        assert_eq!(
            (status, body["backend"].clone()),
            (200, "gpu-b".into()),
            "{body}"
        );
    }
    // A field before the file that is not the model does not stop the look-ahead.
    let (status, body) = curl(&[
        "-F",
        "prompt=hello there",
        "-F",
        "model=model-a",
        "-F",
        &format!("file=@{file}"),
        &url,
    ]);
    assert_eq!(
        (status, body["backend"].clone()),
        (200, "gpu-a".into()),
        "{body}"
    );
}

#[test]
fn the_query_model_routes_every_path_and_a_body_model_wins() {
    let (a, b) = two_mocks(&[]);
    let router = router_for(&[&a, &b], "");
    for _ in 0..4 {
        let resp = request(router.addr, "GET", "/v1/some/route?model=model-b", &[], b"");
        assert_eq!(
            resp.header("x-mock-backend"),
            Some("gpu-b"),
            "{}",
            resp.text()
        );
        let resp = request(
            router.addr,
            "POST",
            "/pooling?x=1&model=model-a",
            &[("Content-Type", "application/json")],
            br#"{"input":"hi"}"#,
        );
        assert_eq!(
            resp.header("x-mock-backend"),
            Some("gpu-a"),
            "{}",
            resp.text()
        );
        let resp = request(
            router.addr,
            "POST",
            "/v1/completions?model=model-a",
            &[("Content-Type", "application/json")],
            br#"{"model":"model-b","prompt":"x","max_tokens":1}"#,
        );
        assert_eq!(
            resp.header("x-mock-backend"),
            Some("gpu-b"),
            "the body's model wins"
        );
    }
    let resp = request(router.addr, "GET", "/v1/some/route?model=nope", &[], b"");
    assert_eq!(resp.status, 404, "{}", resp.text());
}

const SDK_RESPONSES: &str = r#"
import json, sys
from openai import OpenAI, NotFoundError
client = OpenAI(base_url=sys.argv[1], api_key="none", max_retries=0)
tag = {"x-mock-tag": "stored"}
out = {}
r = client.responses.create(model="shared", input="hi")
out["created"] = r.to_dict()
out["gets"] = [client.responses.retrieve(r.id, extra_headers=tag).to_dict()["backend"] for _ in range(4)]
follow = client.responses.create(model="shared", input="more", previous_response_id=r.id, extra_headers=tag)
out["follow"] = follow.to_dict()
created_id = None
for ev in client.responses.create(model="shared", input="stream me", stream=True):
    if ev.type == "response.created":
        created_id = ev.response.id
out["streamed_id"] = created_id
out["streamed_gets"] = [client.responses.retrieve(created_id, extra_headers=tag).to_dict()["backend"] for _ in range(3)]
out["cancelled"] = client.responses.cancel(follow.id, extra_headers=tag).to_dict()["status"]
client.responses.delete(r.id, extra_headers=tag)
try:
    client.responses.retrieve(r.id)
    out["after_delete"] = 200
except NotFoundError:
    out["after_delete"] = 404
try:
    client.responses.retrieve("resp_nobody_has_this")
    out["unknown"] = 200
except NotFoundError:
    out["unknown"] = 404
print(json.dumps(out))
"#;

#[test]
fn stored_responses_go_to_the_backend_that_made_them() {
    let (a, b) = two_mocks(&[]);
    let router = router_for(&[&a, &b], "");
    let out = python(SDK_RESPONSES, &[&format!("http://{}/v1", router.addr)]);
    let owner = out["created"]["backend"]
        .as_str()
        .expect("backend")
        .to_owned();
    assert!(
        out["gets"]
            .as_array()
            .expect("gets")
            .iter()
            .all(|g| g == owner.as_str()),
        "{out}"
    );
    assert_eq!(
        out["follow"]["backend"],
        owner.as_str(),
        "previous_response_id goes to its backend"
    );
    assert_eq!(out["follow"]["previous_response_id"], out["created"]["id"]);
    let streamed_id = out["streamed_id"].as_str().expect("a streamed id");
    let streamed_owner = out["streamed_gets"][0].as_str().expect("backend");
    assert!(
        streamed_id.contains(&streamed_owner.replace('-', "")),
        "{streamed_id} is {streamed_owner}'s"
    );
    assert!(
        out["streamed_gets"]
            .as_array()
            .expect("gets")
            .iter()
            .all(|g| g == streamed_owner),
        "{out}"
    );
    assert_eq!(out["cancelled"], "cancelled");
    assert_eq!(out["after_delete"], 404);
    assert_eq!(out["unknown"], 404, "asked of every backend, then 404");
    // Known ids went straight to their backend: the other saw only the unknown one
    // (and the deleted id, which the router no longer knew).
    let tagged = |m: &Mock| m.stats()["tags"]["stored"].as_u64().unwrap_or(0);
    let (owner_mock, other) = if owner == "gpu-a" { (&a, &b) } else { (&b, &a) };
    assert!(tagged(owner_mock) >= 7, "{}", owner_mock.stats());
    if streamed_owner == owner {
        assert_eq!(tagged(other), 0, "{}", other.stats());
    }
}

#[test]
fn a_streamed_response_can_be_cancelled_while_it_streams() {
    let (a, b) = two_mocks(&["--delay-ms", "1500"]);
    let router = router_for(&[&a, &b], "");
    let mut stream = Conn::open(router.addr);
    let body = r#"{"model":"shared","input":"long","stream":true}"#;
    stream.send(
        "POST",
        "/v1/responses",
        &[("Content-Type", "application/json")],
        body.as_bytes(),
        false,
    );
    let (status, _) = stream.read_head().expect("the stream's head");
    assert_eq!(status, 200);
    let created = stream
        .read_chunk()
        .expect("a chunk")
        .expect("the created event");
    let text = String::from_utf8_lossy(&created).into_owned();
    let data = text
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .unwrap_or_else(|| panic!("no data line in {text:?}"));
    let event: Value = serde_json::from_str(data).expect("JSON event");
    let id = event["response"]["id"].as_str().expect("id").to_owned();
    let owner = event["response"]["backend"]
        .as_str()
        .expect("backend")
        .to_owned();
    // The stream is still running (its next event is 1.5 s away): the cancel finds it.
    let cancel = request(
        router.addr,
        "POST",
        &format!("/v1/responses/{id}/cancel"),
        &[("x-mock-tag", "cancel")],
        b"",
    );
    assert_eq!(cancel.status, 200, "{}", cancel.text());
    assert_eq!(cancel.json()["backend"], owner.as_str());
    let other = if owner == "gpu-a" { &b } else { &a };
    assert!(
        other.stats()["tags"].get("cancel").is_none(),
        "went straight to {owner}: {}",
        other.stats()
    );
}

#[test]
fn an_unknown_response_id_is_asked_of_the_backends_in_turn_and_the_map_survives_a_reload() {
    let (a, b) = two_mocks(&[]);
    let router = router_for(&[&a, &b], "");
    // Made on gpu-b directly: the router has never seen it.
    let made = request(
        b.addr,
        "POST",
        "/v1/responses",
        &[("Content-Type", "application/json")],
        br#"{"model":"shared","input":"x"}"#,
    );
    let id = made.json()["id"].as_str().expect("id").to_owned();
    for _ in 0..3 {
        let resp = request(router.addr, "GET", &format!("/v1/responses/{id}"), &[], b"");
        assert_eq!(
            (resp.status, resp.json()["backend"].clone()),
            (200, "gpu-b".into()),
            "{}",
            resp.text()
        );
    }
    // Learnt on the way: after a reload that adds a backend, it still goes to gpu-b alone.
    let c = Mock::start(&["--id", "gpu-c", "--model", "shared"]);
    let servers = [
        (a.url.as_str(), 8),
        (b.url.as_str(), 8),
        (c.url.as_str(), 8),
    ];
    router.replace_config(&servers_toml(&servers, ""));
    router.signal(libc::SIGHUP);
    router.wait_healthy_servers(3);
    for _ in 0..4 {
        let resp = request(
            router.addr,
            "GET",
            &format!("/v1/responses/{id}"),
            &[("x-mock-tag", "after")],
            b"",
        );
        assert_eq!(
            (resp.status, resp.json()["backend"].clone()),
            (200, "gpu-b".into())
        );
        let resp = request(
            router.addr,
            "POST",
            &format!("/v1/responses/{id}/cancel"),
            &[("x-mock-tag", "after")],
            b"",
        );
        assert_eq!(resp.status, 200, "{}", resp.text());
    }
    for m in [&a, &c] {
        assert!(m.stats()["tags"].get("after").is_none(), "{}", m.stats());
    }
}

#[test]
fn a_lora_adapter_loaded_at_runtime_is_routable_within_a_second() {
    let (a, b) = two_mocks(&[]);
    // Health checks far apart: only the on-demand refresh can learn the adapter.
    let router = router_for(&[&a, &b], "health_check_interval = 300");
    let chat = chat_for("sql-lora");
    let resp = router.post("/v1/chat/completions", &chat);
    assert_eq!(resp.status, 404, "not loaded yet: {}", resp.text());
    let load = request(
        b.addr,
        "POST",
        "/v1/load_lora_adapter",
        &[("Content-Type", "application/json")],
        br#"{"lora_name":"sql-lora","lora_path":"/adapters/sql"}"#,
    );
    assert_eq!(load.status, 200, "{}", load.text());
    let loaded = Instant::now();
    let resp = router.post("/v1/chat/completions", &chat);
    let took = loaded.elapsed();
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.header("x-mock-backend"), Some("gpu-b"));
    eprintln!(
        "FIGURE adapter loaded on a backend to first request routed to it: {:.0} ms",
        took.as_secs_f64() * 1000.0
    );
    assert!(took < Duration::from_millis(1500), "took {took:?}");
    for _ in 0..4 {
        let resp = router.post("/v1/chat/completions", &chat);
        assert_eq!(
            resp.header("x-mock-backend"),
            Some("gpu-b"),
            "only gpu-b has it"
        );
    }
    let models = router.get_json("/v1/models");
    let adapter = models["data"]
        .as_array()
        .expect("data")
        .iter()
        .find(|m| m["id"] == "sql-lora")
        .unwrap_or_else(|| panic!("the adapter is listed: {models}"))
        .clone();
    assert_eq!(
        adapter["parent"], "shared",
        "with its base model: {adapter}"
    );
    assert_eq!(adapter["root"], "/adapters/sql");
    // An unknown model is still refused, after a bounded wait.
    let asked = Instant::now();
    let resp = router.post("/v1/chat/completions", &chat_for("no-such-lora"));
    assert_eq!(resp.status, 404, "{}", resp.text());
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "{:?}",
        asked.elapsed()
    );
    // Each backend's list is read at most twice a second, however many ask.
    let reads = |m: &Mock| m.stat("model_reads");
    let (ra, rb) = (reads(&a), reads(&b));
    let before = Instant::now();
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let addr = router.addr;
            std::thread::spawn(move || {
                post(
                    addr,
                    &[("Content-Type", "application/json")],
                    &chat_for("still-unknown"),
                )
                .status
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().expect("thread"), 404);
    }
    let secs = before.elapsed().as_secs_f64();
    for (m, r0) in [(&a, ra), (&b, rb)] {
        let n = reads(m) - r0;
        assert!(
            (n as f64) <= 2.0 * secs + 2.0,
            "{n} reads of /v1/models in {secs:.2}s"
        );
    }
}
