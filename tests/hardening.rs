//! Hardening, against the real processes on 127.0.0.1: client API keys from each
//! source, the per-backend key, keys kept out of every output, the key file reloaded
//! with the config, and the caps and refusals for hostile request heads and bodies,
//! sent on raw sockets.

use std::cell::RefCell;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{
    admitted, chat_for, free_port, request, test_dir, wait_until, Conn, FakeBackend, Mock, Proc,
    Resp, Router, CHAT, CHAT_BODY, ROUTER, SOON,
};
use vllm_router_tools::hostile::{self, pad_headers};

/// A servers.toml: each backend as (url, extra fields of its entry, e.g.
/// `, api_key = "x"`), then the `[config]` lines.
fn toml(backends: &[(&str, &str)], config: &str) -> String {
    let mut s = String::from("[servers]\nservers = [\n");
    for (url, extra) in backends {
        s.push_str(&format!(
            "  {{ url = \"{url}\", max_concurrent_requests = 4{extra} }},\n"
        ));
    }
    s.push_str("]\n\n[config]\n");
    s.push_str(config);
    s.push('\n');
    s
}

/// Starts a router in `dir` (which may hold a key file) with `envs`, and waits until
/// every backend is healthy.
fn start(dir: PathBuf, toml: &str, envs: &[(&str, &str)]) -> Router {
    let router = Router::start_in(dir, toml, &[], envs)
        .unwrap_or_else(|e| panic!("router did not start: {e}"));
    router.wait_all_healthy();
    router
}

/// One request on a new connection, with `Authorization: <auth>` when given.
fn call(router: &Router, method: &str, path: &str, auth: Option<&str>, body: &str) -> Resp {
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(auth) = auth {
        headers.push(("Authorization", auth));
    }
    request(router.addr, method, path, &headers, body.as_bytes())
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

/// A 401 with the OpenAI error body and a `WWW-Authenticate: Bearer ...` challenge.
fn assert_unauthorized(resp: &Resp, what: &str) {
    assert_eq!(resp.status, 401, "{what}: {}", resp.text());
    let body = resp.json();
    assert_eq!(body["error"]["code"], "invalid_api_key", "{what}: {body}");
    assert_eq!(
        body["error"]["type"], "invalid_request_error",
        "{what}: {body}"
    );
    assert!(body["error"]["message"].is_string(), "{what}: {body}");
    let challenge = resp.header("www-authenticate").unwrap_or_default();
    assert!(
        challenge.starts_with("Bearer"),
        "{what}: WWW-Authenticate is {challenge:?}"
    );
}

/// Checks that `key` opens the router and nothing else does: proxied requests and
/// `GET /v1/models` need it, the probes and (by default) the status endpoints do not,
/// and no refused request reaches the backend.
fn check_key_required(router: &Router, mock: &Mock, key: &str) {
    let before = mock.stat("total");
    let good = bearer(key);
    let (longer, basic) = (format!("Bearer {key}x"), format!("Basic {key}"));
    let refused = [
        ("no Authorization", None),
        ("a wrong key", Some("Bearer wrong-key")),
        ("the key with one byte more", Some(longer.as_str())),
        ("the key as Basic", Some(basic.as_str())),
        ("the bare key", Some(key)),
    ];
    for (what, auth) in refused {
        let resp = call(router, "POST", CHAT, auth, CHAT_BODY);
        assert_unauthorized(&resp, &format!("chat with {what}"));
        let resp = call(router, "GET", "/v1/models", auth, "");
        assert_unauthorized(&resp, &format!("/v1/models with {what}"));
    }
    // With a query string, and the paths under it (which are proxied), too.
    for path in ["/v1/models?limit=1", "/v1/models/", "/v1/models/mock-model"] {
        assert_unauthorized(&call(router, "GET", path, None, ""), path);
    }
    assert_eq!(
        mock.stat("total"),
        before,
        "a request without the key reached the backend"
    );

    let resp = call(router, "POST", CHAT, Some(&good), CHAT_BODY);
    assert_eq!(resp.status, 200, "chat with the key: {}", resp.text());
    assert_eq!(mock.stat("total"), before + 1);
    let resp = call(router, "GET", "/v1/models", Some(&good), "");
    assert_eq!(resp.status, 200, "/v1/models with the key: {}", resp.text());
    assert_eq!(
        resp.json()["data"][0]["id"],
        "mock-model",
        "{}",
        resp.text()
    );

    for path in ["/livez", "/readyz", "/health", "/metrics", "/load-stats"] {
        let resp = call(router, "GET", path, None, "");
        assert_eq!(resp.status, 200, "{path} without a key: {}", resp.text());
    }
}

#[test]
fn a_key_in_the_config_file_is_required() {
    let mock = Mock::start(&[]);
    let config = toml(&[(&mock.url, "")], r#"api_keys = ["k1"]"#);
    let router = start(test_dir("keys-config"), &config, &[]);
    check_key_required(&router, &mock, "k1");
}

#[test]
fn keys_from_api_keys_file_are_required() {
    let mock = Mock::start(&[]);
    let dir = test_dir("keys-file");
    std::fs::create_dir_all(dir.join("secrets")).expect("mkdir");
    let keys = "# team a\n\n   kf-one   \n#kf-commented\n\nkf-two\n";
    std::fs::write(dir.join("secrets/client.keys"), keys).expect("write key file");
    // Relative to the config file; the router runs in another directory.
    let config = toml(
        &[(&mock.url, "")],
        r#"api_keys_file = "secrets/client.keys""#,
    );
    let router = start(dir, &config, &[]);
    check_key_required(&router, &mock, "kf-one");
    let resp = call(&router, "POST", CHAT, Some("Bearer kf-two"), CHAT_BODY);
    assert_eq!(
        resp.status,
        200,
        "the second key of the file: {}",
        resp.text()
    );
    for key in ["kf-commented", "#kf-commented", "#", "team"] {
        let resp = call(&router, "POST", CHAT, Some(&bearer(key)), CHAT_BODY);
        assert_unauthorized(&resp, &format!("{key:?} from a comment line"));
    }
}

#[test]
fn a_key_from_the_api_key_environment_variable_is_required() {
    let mock = Mock::start(&[]);
    let config = toml(&[(&mock.url, "")], "");
    let router = start(test_dir("keys-env"), &config, &[("API_KEY", "env-key-1")]);
    check_key_required(&router, &mock, "env-key-1");
}

#[test]
fn keys_from_all_three_sources_are_accepted_together() {
    let mock = Mock::start(&[]);
    let dir = test_dir("keys-all");
    std::fs::write(dir.join("keys.txt"), "from-file\n").expect("write key file");
    let config = toml(
        &[(&mock.url, "")],
        "api_keys = [\"from-config-1\", \"from-config-2\"]\napi_keys_file = \"keys.txt\"",
    );
    let router = start(dir, &config, &[("API_KEY", "from-env")]);
    for key in ["from-config-1", "from-config-2", "from-file", "from-env"] {
        let resp = call(&router, "POST", CHAT, Some(&bearer(key)), CHAT_BODY);
        assert_eq!(resp.status, 200, "{key}: {}", resp.text());
    }
    assert_unauthorized(&call(&router, "POST", CHAT, None, CHAT_BODY), "no key");
}

#[test]
fn protect_status_endpoints_puts_metrics_and_load_stats_behind_the_key() {
    let mock = Mock::start(&[]);
    let config = toml(
        &[(&mock.url, "")],
        "api_keys = [\"k1\"]\nprotect_status_endpoints = true",
    );
    let router = start(test_dir("protect-status"), &config, &[]);
    for path in ["/metrics", "/load-stats"] {
        assert_unauthorized(&call(&router, "GET", path, None, ""), path);
        let wrong = call(&router, "GET", path, Some("Bearer k2"), "");
        assert_unauthorized(&wrong, &format!("{path} with a wrong key"));
        let resp = call(&router, "GET", path, Some("Bearer k1"), "");
        assert_eq!(resp.status, 200, "{path} with the key: {}", resp.text());
    }
    for path in ["/livez", "/readyz", "/health"] {
        let resp = call(&router, "GET", path, None, "");
        assert_eq!(resp.status, 200, "{path} stays open: {}", resp.text());
    }
}

// ---------------------------------------------------------------- backend keys

/// Waits until `/health` lists `model` for some backend: its `/v1/models` was read.
fn wait_model_listed(router: &Router, model: &str) {
    wait_until(SOON, &format!("{model} listed in /health"), || {
        router.health()["servers"]
            .as_array()
            .expect("servers")
            .iter()
            .any(|s| {
                s["models"]
                    .as_array()
                    .is_some_and(|m| m.contains(&json!(model)))
            })
    });
}

#[test]
fn the_client_key_never_reaches_a_backend() {
    let plain = Mock::start(&["--model", "plain-model"]);
    let keyed = Mock::start(&["--model", "keyed-model"]);
    let config = toml(
        &[
            (&plain.url, ""),
            (&keyed.url, r#", api_key = "backend-secret""#),
        ],
        r#"api_keys = ["client-key"]"#,
    );
    let router = start(test_dir("client-key-stays"), &config, &[]);
    wait_model_listed(&router, "plain-model");
    wait_model_listed(&router, "keyed-model");
    let auth = bearer("client-key");
    for (mock, model, expected) in [
        (&plain, "plain-model", vec![]),
        (
            &keyed,
            "keyed-model",
            vec!["Bearer backend-secret".to_owned()],
        ),
    ] {
        let resp = call(&router, "POST", CHAT, Some(&auth), &chat_for(model));
        assert_eq!(resp.status, 200, "{model}: {}", resp.text());
        assert_eq!(
            mock.headers_seen("authorization"),
            expected,
            "Authorization as {model}'s backend saw it"
        );
        // Also on a route the router does not parse.
        let resp = call(&router, "POST", "/v1/other", Some(&auth), "x");
        assert_eq!(resp.status, 200, "/v1/other: {}", resp.text());
    }
    for mock in [&plain, &keyed] {
        let last = mock.last().to_string();
        assert!(
            !last.contains("client-key"),
            "the client's key reached {}: {last}",
            mock.url
        );
    }
}

#[test]
fn a_backend_key_replaces_whatever_the_client_sent() {
    let plain = Mock::start(&["--model", "plain-model"]);
    let keyed = Mock::start(&["--model", "keyed-model"]);
    let config = toml(
        &[
            (&plain.url, ""),
            (&keyed.url, r#", api_key = "backend-secret""#),
        ],
        "",
    );
    let router = start(test_dir("backend-key"), &config, &[]);
    wait_model_listed(&router, "plain-model");
    wait_model_listed(&router, "keyed-model");
    let send = |model: &str, auth: &[(&str, &str)]| {
        let mut headers = vec![("Content-Type", "application/json")];
        headers.extend_from_slice(auth);
        let resp = request(
            router.addr,
            "POST",
            CHAT,
            &headers,
            chat_for(model).as_bytes(),
        );
        assert_eq!(resp.status, 200, "{model} with {auth:?}: {}", resp.text());
    };
    let cases: [&[(&str, &str)]; 3] = [
        &[],
        &[("Authorization", "Bearer client-own-key")],
        &[
            ("authorization", "Bearer client-own-key"),
            ("AUTHORIZATION", "Basic Y2xpZW50OnNlY3JldA=="),
        ],
    ];
    for auth in cases {
        send("keyed-model", auth);
        assert_eq!(
            keyed.headers_seen("authorization"),
            ["Bearer backend-secret"],
            "the keyed backend's Authorization when the client sent {auth:?}"
        );
    }
    // Without keys on either side the client's own header goes through.
    send("plain-model", &[("Authorization", "Bearer client-own-key")]);
    assert_eq!(
        plain.headers_seen("authorization"),
        ["Bearer client-own-key"]
    );
}

/// One request a `KeyedBackend` got: "METHOD path" and its Authorization values.
type Seen = (String, Vec<String>);

/// A backend that, like vLLM started with `--api-key`, answers `/v1/*` only when the
/// request carries its key (`/health` stays open), and records the Authorization
/// values of every request it gets. A broken one passes its probes but drops every
/// POST without a reply.
struct KeyedBackend {
    backend: FakeBackend,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl KeyedBackend {
    fn start(key: &str, model: &str) -> KeyedBackend {
        KeyedBackend::launch(key, model, false)
    }

    fn start_broken(key: &str, model: &str) -> KeyedBackend {
        KeyedBackend::launch(key, model, true)
    }

    fn launch(key: &str, model: &str, broken: bool) -> KeyedBackend {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let backend = {
            let (seen, key, model) = (Arc::clone(&seen), key.to_owned(), model.to_owned());
            FakeBackend::start(move |stream| {
                let _ = serve_keyed(stream, &key, &model, broken, &seen);
            })
        };
        KeyedBackend { backend, seen }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }
}

/// One request on `stream`, answered with `Connection: close`.
fn serve_keyed(
    stream: TcpStream,
    key: &str,
    model: &str,
    broken: bool,
    seen: &Mutex<Vec<Seen>>,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split(' ');
    let method = parts.next().unwrap_or_default().to_owned();
    let path = parts.next().unwrap_or_default().to_owned();
    let (mut auth, mut length) = (Vec::new(), 0usize);
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((name, value)) = l.split_once(':') {
            if name.eq_ignore_ascii_case("authorization") {
                auth.push(value.trim().to_owned());
            } else if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0; length.min(1 << 20)];
    reader.read_exact(&mut body)?;
    let authorized = auth == [bearer(key)];
    seen.lock()
        .expect("seen")
        .push((format!("{method} {path}"), auth));
    if broken && method == "POST" {
        return Ok(());
    }
    let (status, doc) = match path.as_str() {
        "/health" => (200, json!({})),
        p if p.starts_with("/v1/") && !authorized => (401, json!({"error": "Unauthorized"})),
        "/v1/models" => (
            200,
            json!({"object": "list", "data": [{"id": model, "object": "model"}]}),
        ),
        "/v1/chat/completions" => (
            200,
            json!({"id": "chatcmpl-keyed", "object": "chat.completion", "model": model,
                   "choices": [{"index": 0, "finish_reason": "stop",
                                "message": {"role": "assistant", "content": "ok"}}]}),
        ),
        _ => (404, json!({"error": "not found"})),
    };
    let body = doc.to_string();
    let reply = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    (&stream).write_all(reply.as_bytes())
}

#[test]
fn a_backend_that_requires_its_key_is_probed_and_served_with_it() {
    let backend = KeyedBackend::start("backend-secret", "strict-model");
    let config = toml(
        &[(&backend.backend.url, r#", api_key = "backend-secret""#)],
        "health_check_interval = 0.2\nbackend_metrics_interval = 0",
    );
    let router = start(test_dir("strict-backend"), &config, &[]);
    // The health thread's /v1/models fetch carried the key, or no model would show.
    wait_model_listed(&router, "strict-model");
    let ids: Vec<Value> = router.get_json("/v1/models")["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|m| m["id"].clone())
        .collect();
    assert_eq!(ids, [json!("strict-model")]);
    let resp = call(
        &router,
        "POST",
        CHAT,
        Some("Bearer client-own-key"),
        &chat_for("strict-model"),
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["model"], "strict-model");
    let seen = backend.seen();
    let v1: Vec<_> = seen.iter().filter(|(r, _)| r.contains(" /v1/")).collect();
    assert!(
        v1.iter().any(|(r, _)| r == "GET /v1/models")
            && v1.iter().any(|(r, _)| r == "POST /v1/chat/completions"),
        "{seen:?}"
    );
    for (what, auth) in &v1 {
        assert_eq!(auth, &["Bearer backend-secret"], "{what}");
    }
}

// ---------------------------------------------------------------- no leaks

const CONF_KEY: &str = "sk-conf-4f1d2c8e";
const FILE_KEY: &str = "sk-file-9a8b7c6d";
const ENV_KEY: &str = "sk-env-5e6f7a8b";
const BACKEND_KEY: &str = "sk-backend-1b2c3d4e";
const DEAD_BACKEND_KEY: &str = "sk-dead-backend-7c7c7c";
const BROKEN_BACKEND_KEY: &str = "sk-broken-backend-3d3d3d";
const WRONG_KEY: &str = "sk-wrong-0e0e0e0e";

/// Every secret a leak test plants: the router's, the backends', and one a client
/// presented that the router refused.
const SECRETS: [&str; 7] = [
    CONF_KEY,
    FILE_KEY,
    ENV_KEY,
    BACKEND_KEY,
    DEAD_BACKEND_KEY,
    BROKEN_BACKEND_KEY,
    WRONG_KEY,
];

/// Panics if `text` holds any of `secrets`.
fn assert_no_secret(text: &str, secrets: &[&str], what: &str) {
    for secret in secrets {
        assert!(
            !text.contains(secret),
            "{what} contains the key {secret}:\n{text}"
        );
    }
}

/// A response as text: status line, headers and body.
fn dump(resp: &Resp) -> String {
    let headers: Vec<String> = resp
        .headers
        .iter()
        .map(|(n, v)| format!("{n}: {v}"))
        .collect();
    format!("{}\n{}\n\n{}", resp.status, headers.join("\n"), resp.text())
}

#[test]
fn keys_never_appear_in_logs_errors_or_status_output() {
    let mock = Mock::start(&["--model", "m"]);
    let dead = format!("http://127.0.0.1:{}", free_port());
    let broken = KeyedBackend::start_broken(BROKEN_BACKEND_KEY, "broken-model");
    let dir = test_dir("no-leaks");
    std::fs::write(dir.join("keys.txt"), format!("{FILE_KEY}\n")).expect("key file");
    let config = toml(
        &[
            (&mock.url, &format!(", api_key = \"{BACKEND_KEY}\"")),
            (&dead, &format!(", api_key = \"{DEAD_BACKEND_KEY}\"")),
            (
                &broken.backend.url,
                &format!(", api_key = \"{BROKEN_BACKEND_KEY}\""),
            ),
        ],
        &format!(
            "api_keys = [\"{CONF_KEY}\"]\napi_keys_file = \"keys.txt\"\n\
             config_reload_interval = 0.2\nhealth_check_interval = 0.2\nmax_retries = 0"
        ),
    );
    let router = Router::start_in(dir, &config, &[], &[("API_KEY", ENV_KEY)])
        .unwrap_or_else(|e| panic!("router did not start: {e}"));
    router.wait_healthy_servers(2);
    wait_model_listed(&router, "m");
    wait_model_listed(&router, "broken-model");

    let outputs = RefCell::new(Vec::new());
    let send = |method: &str, path: &str, auth: Option<&str>, body: &str| {
        let resp = call(&router, method, path, auth, body);
        outputs
            .borrow_mut()
            .push(format!("{method} {path} -> {}", dump(&resp)));
        resp
    };
    assert_eq!(send("POST", CHAT, None, CHAT_BODY).status, 401);
    let wrong = bearer(WRONG_KEY);
    assert_eq!(send("POST", CHAT, Some(&wrong), CHAT_BODY).status, 401);
    assert_eq!(send("GET", "/v1/models", Some(&wrong), "").status, 401);
    for key in [CONF_KEY, FILE_KEY, ENV_KEY] {
        let auth = bearer(key);
        assert_eq!(send("POST", CHAT, Some(&auth), &chat_for("m")).status, 200);
        assert_eq!(send("GET", "/v1/models", Some(&auth), "").status, 200);
    }
    let auth = bearer(CONF_KEY);
    assert_eq!(send("POST", CHAT, Some(&auth), "not json").status, 400);
    assert_eq!(
        send("POST", CHAT, Some(&auth), r#"{"model": 5}"#).status,
        400
    );
    // No backend serves it: 404, or 503 while the dead backend's models are unknown.
    let status = send("POST", CHAT, Some(&auth), &chat_for("nope")).status;
    assert!(matches!(status, 404 | 503), "an unknown model: {status}");
    // A backend error relayed as it is, and one the router makes (the broken backend).
    let forced = [("Authorization", auth.as_str()), ("x-mock-status", "500")];
    let resp = request(router.addr, "POST", CHAT, &forced, chat_for("m").as_bytes());
    assert_eq!(resp.status, 500, "{}", resp.text());
    outputs.borrow_mut().push(dump(&resp));
    let resp = send("POST", CHAT, Some(&auth), &chat_for("broken-model"));
    assert_eq!(resp.status, 502, "{}", resp.text());
    assert!(
        broken.seen().iter().any(|(r, _)| r.starts_with("POST")),
        "the broken backend was never tried"
    );
    for path in ["/health", "/load-stats", "/metrics", "/readyz", "/livez"] {
        send("GET", path, None, "");
    }
    // A reloaded file with a key of the wrong type is refused and logged.
    let bad = config.replace(
        &format!("api_keys = [\"{CONF_KEY}\"]"),
        &format!("api_keys = \"{CONF_KEY}\""),
    );
    let failures = || {
        router
            .log()
            .lines()
            .filter(|l| l.contains("config reload failed"))
            .count()
    };
    router.write_config(&bad);
    wait_until(SOON, "the bad reload to be logged", || failures() >= 1);
    let resp = send("POST", CHAT, Some(&auth), &chat_for("m"));
    assert_eq!(
        resp.status,
        200,
        "the running config stays: {}",
        resp.text()
    );
    let id = resp.header("x-request-id").expect("request id").to_owned();
    wait_until(SOON, "the last access entry", || {
        router.access_entry(&id).is_some()
    });

    for output in outputs.borrow().iter() {
        assert_no_secret(output, &SECRETS, "a response");
    }
    let mut files = 0;
    for entry in std::fs::read_dir(router.log_dir()).expect("log dir") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("read log");
        assert!(!text.is_empty(), "{} is empty", path.display());
        assert_no_secret(&text, &SECRETS, &path.display().to_string());
        files += 1;
    }
    assert!(files >= 2, "expected the human and the structured log");
}

/// `vllm-router check-config --config <path>`: exit code and everything it printed.
fn check_config(path: &Path) -> (Option<i32>, String) {
    let mut child = Proc(
        Command::new(ROUTER)
            .args(["check-config", "--config"])
            .arg(path)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start check-config"),
    );
    wait_until(Duration::from_secs(30), "check-config to exit", || {
        child.0.try_wait().expect("try_wait").is_some()
    });
    let code = child.0.wait().expect("wait").code();
    let mut out = String::new();
    child
        .0
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out)
        .expect("read stdout");
    child
        .0
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut out)
        .expect("read stderr");
    (code, out)
}

#[test]
fn check_config_never_prints_a_key() {
    let dir = test_dir("check-config-keys");
    std::fs::write(dir.join("keys.txt"), format!("# ops\n{FILE_KEY}\n")).expect("key file");
    let good = toml(
        &[(
            "http://127.0.0.1:9",
            &format!(", api_key = \"{BACKEND_KEY}\""),
        )],
        &format!("api_keys = [\"{CONF_KEY}\", \"{ENV_KEY}\"]\napi_keys_file = \"keys.txt\""),
    );
    let path = dir.join("good.toml");
    std::fs::write(&path, &good).expect("write");
    let (code, out) = check_config(&path);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("config OK"), "{out}");
    assert_no_secret(&out, &SECRETS, "check-config output");

    let server = "[servers]\nservers = [\n  { url = \"http://127.0.0.1:9\", max_concurrent_requests = 1 },\n]\n";
    let entry = |extra: &str| {
        format!(
            "[servers]\nservers = [\n  {{ url = \"http://127.0.0.1:9\", max_concurrent_requests = 1, {extra} }},\n]\n"
        )
    };
    std::fs::write(dir.join("bad-line.keys"), "ok-key\nsk-has a-space-secret\n").expect("write");
    let bad = [
        (
            format!("{server}[config]\napi_keys = \"single-string-key\"\n"),
            "single-string-key",
        ),
        (
            format!("{server}[config]\napi_keys = [\"sk-with space-secret\"]\n"),
            "sk-with space-secret",
        ),
        (
            format!("{server}[config]\napi_keys = [\"sk-good-one-secret\", 5]\n"),
            "sk-good-one-secret",
        ),
        (
            format!("{server}[config]\napi_keys = [\"sk-unterminated-secret\n"),
            "sk-unterminated-secret",
        ),
        (
            format!("{server}[config]\napi_keys = [\"sk-dup-secret\"]\napi_keys = [\"sk-dup-secret-2\"]\n"),
            "sk-dup-secret",
        ),
        (
            format!("{server}[config]\napi_keys_file = \"bad-line.keys\"\n"),
            "a-space-secret",
        ),
        (entry("api_key = \"sk-backend with space\""), "sk-backend with space"),
        (entry("api_key = [\"sk-backend-in-array\"]"), "sk-backend-in-array"),
        (
            entry("api_key = \"sk-backend-ok-secret\", apikey = \"x\""),
            "sk-backend-ok-secret",
        ),
        (
            entry("api_key = { value = \"sk-backend-in-table\" }"),
            "sk-backend-in-table",
        ),
    ];
    for (i, (text, secret)) in bad.iter().enumerate() {
        let path = dir.join(format!("bad-{i}.toml"));
        std::fs::write(&path, text).expect("write");
        let (code, out) = check_config(&path);
        assert_eq!(code, Some(2), "{text}\n=> {out}");
        assert_eq!(
            out.trim().lines().count(),
            1,
            "one error line for\n{text}\n=> {out}"
        );
        assert_no_secret(&out, &[secret], &format!("the error for\n{text}\n"));
    }
}

// ---------------------------------------------------------------- key file reload

/// Writes `text` to `path` as a deploy tool does: a temp file renamed over it.
fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write temp");
    std::fs::rename(&tmp, path).expect("rename");
}

/// A router in front of a mock whose only client key, `key-a`, is in `keys.txt`
/// (`api_keys_file`), with the config checked every 0.2 s; returns the key file's path.
fn key_file_router(name: &str) -> (Mock, Router, PathBuf) {
    let mock = Mock::start(&[]);
    let dir = test_dir(name);
    let keys = dir.join("keys.txt");
    std::fs::write(&keys, "key-a\n").expect("key file");
    let config = toml(
        &[(&mock.url, "")],
        "api_keys_file = \"keys.txt\"\nconfig_reload_interval = 0.2",
    );
    let router = start(dir, &config, &[]);
    (mock, router, keys)
}

fn status_with(router: &Router, auth: Option<&str>) -> u16 {
    call(router, "POST", CHAT, auth, CHAT_BODY).status
}

#[test]
fn the_key_file_is_reloaded_with_the_config() {
    let (_mock, router, keys) = key_file_router("key-file-reload");
    let (a, b) = (bearer("key-a"), bearer("key-b"));
    assert_eq!(status_with(&router, Some(&a)), 200);
    assert_eq!(status_with(&router, Some(&b)), 401);
    let servers_toml = std::fs::read(router.config_path()).expect("read config");

    replace_file(&keys, "# rotated\nkey-b\n");
    let deadline = Instant::now() + SOON;
    loop {
        assert_eq!(status_with(&router, None), 401, "no key while rotating");
        let (sa, sb) = (
            status_with(&router, Some(&a)),
            status_with(&router, Some(&b)),
        );
        if (sa, sb) == (401, 200) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after {SOON:?} key-a gets {sa} and key-b {sb}; log:\n{}",
            router.log()
        );
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        std::fs::read(router.config_path()).expect("read config"),
        servers_toml,
        "servers.toml untouched"
    );
}

#[test]
fn emptying_the_key_file_does_not_open_the_router() {
    let (mock, router, keys) = key_file_router("key-file-emptied");
    assert_eq!(status_with(&router, None), 401);
    let reloads = || {
        router
            .log()
            .lines()
            .filter(|l| l.contains("config reload"))
            .count()
    };
    let before = reloads();
    // Every key revoked; `echo key-b > keys.txt` also leaves the file empty for a moment.
    replace_file(&keys, "# all keys revoked\n");
    wait_until(
        SOON,
        "the reload thread to act on the emptied key file",
        || reloads() > before,
    );
    let total = mock.stat("total");
    assert_eq!(
        status_with(&router, None),
        401,
        "a request without a key after api_keys_file was emptied; log:\n{}",
        router.log()
    );
    assert_eq!(mock.stat("total"), total, "it reached the backend");
}

// ---------------------------------------------------------------- limits

/// A valid chat request with `extra` header lines (each ending in CRLF) and `target`.
fn chat_head(target: &str, extra: &str) -> Vec<u8> {
    format!(
        "POST {target} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n{extra}\r\n{CHAT_BODY}",
        CHAT_BODY.len()
    )
    .into_bytes()
}

/// Sends `raw` on a new connection and reads the reply.
fn send_raw(addr: SocketAddr, raw: &[u8]) -> Result<Resp, String> {
    let mut conn = Conn::open(addr);
    conn.stream
        .set_read_timeout(Some(SOON))
        .expect("read timeout");
    conn.send_raw(raw);
    conn.read_response(false)
}

#[test]
fn hostile_heads_and_bodies_get_clear_errors_and_never_reach_the_backend() {
    let mock = Mock::start(&[]);
    let max_body = 64 * 1024;
    let router = start(
        test_dir("limits"),
        &toml(&[(&mock.url, "")], &format!("max_body_bytes = {max_body}")),
        &[],
    );
    let kib14 = "v".repeat(14 * 1024);
    // The catalogue the soak runs, once each: the status and error code, nothing at
    // the backend, and the next request served.
    let refused = hostile::catalogue(&hostile::Target {
        key: None,
        max_body,
        marker: "",
    });
    let refused: Vec<_> = refused
        .into_iter()
        .filter_map(|h| match h.expect {
            hostile::Expect::Status(status, code) => Some((h.name, h.request, status, code)),
            _ => None,
        })
        .collect();
    assert!(refused.len() >= 20, "the catalogue lost its refusals");
    for (what, raw, status, code) in refused {
        let before = mock.stat("total");
        let resp = send_raw(router.addr, &raw).unwrap_or_else(|e| panic!("{what}: no reply: {e}"));
        assert_eq!(resp.status, status, "{what}: {}", resp.text());
        if let Some(code) = code {
            assert_eq!(resp.json()["error"]["code"], code, "{what}");
        }
        assert_eq!(mock.stat("total"), before, "{what} reached the backend");
        let normal = call(&router, "POST", CHAT, None, CHAT_BODY);
        assert_eq!(normal.status, 200, "after {what}: {}", normal.text());
        assert_eq!(mock.stat("total"), before + 1, "after {what}");
    }

    // Up to the caps is fine: 100 headers in all, and 42 KiB of them.
    for (what, extra) in [
        ("100 headers", pad_headers(96, "v")),
        ("42 KiB of headers", pad_headers(3, &kib14)),
    ] {
        let resp = send_raw(router.addr, &chat_head(CHAT, &extra)).expect("reply");
        assert_eq!(resp.status, 200, "{what}: {}", resp.text());
    }
    // ureq writes a request head through a 4 KiB buffer (`backend::http`), whole lines at a
    // time: a head near the cap goes out in pieces, and a single line longer than the
    // buffer, a header or the request line, needs a buffer of its own for that request.
    // Each of these must reach the backend whole, and the backend stay healthy.
    let kib15 = "v".repeat(15 * 1024);
    let kib60 = "w".repeat(60 * 1024);
    let target_16k = format!("{CHAT}?pad={}", "a".repeat(16 * 1024 - CHAT.len() - 5));
    for (what, target, pad) in [
        ("60 KiB of headers", CHAT, Some((4, &kib15))),
        ("one header of 60 KiB", CHAT, Some((1, &kib60))),
        ("a 16 KiB target", target_16k.as_str(), None),
    ] {
        let extra = pad.map_or(String::new(), |(n, value)| pad_headers(n, value));
        // Twice: the pooled connections still serve after a request that had its own.
        for round in 1..=2 {
            let resp = send_raw(router.addr, &chat_head(target, &extra)).expect("reply");
            assert_eq!(resp.status, 200, "{what}, {round}: {}", resp.text());
            if let Some((_, value)) = pad {
                assert_eq!(mock.headers_seen("X-Pad-0"), [value.as_str()], "{what}");
            }
            assert_eq!(mock.last()["path"], json!(target), "{what}");
        }
    }
    assert_eq!(router.server(0)["request_failures"], 0);
    assert_eq!(router.server(0)["healthy"], true);

    // A route the router does not parse takes any body.
    let raw = b"POST /v1/some/other/route HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\nConnection: close\r\n\r\nnot json";
    let resp = send_raw(router.addr, raw).expect("reply");
    assert_eq!(resp.status, 200, "{}", resp.text());
    let last = mock.last();
    assert_eq!(
        (&last["path"], &last["body"]),
        (&json!("/v1/some/other/route"), &json!("not json"))
    );
}

#[test]
fn a_huge_declared_body_is_refused_at_once() {
    let mock = Mock::start(&[]);
    let mut router = start(test_dir("huge-length"), &toml(&[(&mock.url, "")], ""), &[]);
    let rss_before = crate::support::rss_kib(router.pid());
    let mut held = Vec::new();
    for target in [CHAT, "/v1/some/other/route"] {
        let mut conn = Conn::open(router.addr);
        conn.stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("read timeout");
        let started = Instant::now();
        conn.send_raw(
            format!(
                "POST {target} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                 Content-Length: 99999999999999\r\n\r\n{{\"model\":"
            )
            .as_bytes(),
        );
        let resp = conn
            .read_response(false)
            .unwrap_or_else(|e| panic!("{target}: no reply within 2 s: {e}"));
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(resp.status, 413, "{target}: {}", resp.text());
        assert_eq!(resp.json()["error"]["code"], "request_too_large");
        // The client keeps the connection open, as if it were still sending.
        held.push(conn);
    }
    let resp = call(&router, "POST", CHAT, None, CHAT_BODY);
    assert_eq!(resp.status, 200, "still serving: {}", resp.text());
    assert_eq!(
        mock.stat("total"),
        1,
        "only the normal request reached the backend"
    );
    let grown = crate::support::rss_kib(router.pid()).saturating_sub(rss_before);
    assert!(grown < 32 * 1024, "the router grew by {grown} KiB");
    router.assert_alive();
    drop(held);
}

#[test]
fn a_refused_request_whose_body_never_comes_does_not_hold_a_worker() {
    let mock = Mock::start(&[]);
    // Two workers, so two stuck requests would stop the router.
    let config = toml(
        &[(&mock.url, "")],
        "api_keys = [\"k1\"]\nworker_threads = 2",
    );
    let router = start(test_dir("unread-body"), &config, &[]);
    let heads = [
        // Refused for its size, before the body is read.
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k1\r\n\
         Content-Length: 99999999999999\r\n\r\n{",
        // Refused for its missing key, before the body is read.
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{",
    ];
    let mut held = Vec::new();
    for head in heads {
        let mut conn = Conn::open(router.addr);
        conn.stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("read timeout");
        conn.send_raw(head.as_bytes());
        let (status, _) = conn
            .read_head()
            .unwrap_or_else(|e| panic!("no reply within 2 s to\n{head}\n: {e}"));
        assert!(matches!(status, 401 | 413), "{status} for\n{head}");
        // The client neither sends the body nor closes.
        held.push(conn);
    }
    for (method, path, auth, body) in [
        ("GET", "/livez", None, ""),
        ("POST", CHAT, Some("Bearer k1"), CHAT_BODY),
    ] {
        let mut conn = Conn::open(router.addr);
        conn.stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("read timeout");
        let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        conn.send(method, path, &headers, body.as_bytes(), true);
        let resp = conn.read_response(false).unwrap_or_else(|e| {
            panic!(
                "{method} {path}: no reply within 2 s while {} refused requests wait for their bodies: {e}",
                held.len()
            )
        });
        assert_eq!(resp.status, 200, "{method} {path}: {}", resp.text());
    }
    drop(held);
}

#[test]
fn an_invalid_api_key_variable_stops_the_router_without_showing_the_key() {
    let mock = Mock::start(&[]);
    let config = toml(&[(&mock.url, "")], "");
    let secret = "sk-env-with a-space-secret";
    let err = match Router::start_in(
        test_dir("bad-env-key"),
        &config,
        &[],
        &[("API_KEY", secret)],
    ) {
        Ok(_) => panic!("the router started with API_KEY {secret:?}"),
        Err(e) => e,
    };
    // The error carries the router's log.
    assert!(err.contains("API_KEY"), "{err}");
    assert_no_secret(&err, &[secret, "a-space-secret"], "the start-up error");
}

/// tiny_http's accept thread dies when the process runs out of file descriptors (it
/// panics duplicating an accepted socket). The router must shed the excess and take
/// connections again once the pressure ends.
#[test]
fn running_out_of_file_descriptors_sheds_load_and_recovers() {
    let mock = Mock::start(&[]);
    let router =
        Router::start_with_fd_limit(&crate::support::servers_toml(&[(&mock.url, 2)], ""), 64)
            .expect("router starts");
    router.wait_all_healthy();
    // Far more connections than descriptors: the router cannot accept them all.
    let held: Vec<std::net::TcpStream> = (0..120)
        .filter_map(|_| std::net::TcpStream::connect(router.addr).ok())
        .collect();
    assert!(held.len() > 64, "only {} connections opened", held.len());
    drop(held);
    wait_until(Duration::from_secs(20), "the router answers again", || {
        crate::support::try_get(router.addr, "/livez").is_some_and(|r| r.status == 200)
    });
    let resp = crate::support::post(router.addr, &[], crate::support::CHAT_BODY);
    assert_eq!(resp.status, 200, "{}", resp.text());
}

/// tiny_http's connection-thread pool queues a connection that arrives while its last
/// idle thread is still waking up; a keep-alive connection then occupies every thread
/// for its whole life, and the queued one would wait for another to close. The router
/// must answer every connection of a burst.
#[test]
fn every_connection_of_a_keep_alive_burst_is_answered() {
    let mock = Mock::start(&[]);
    let router = Router::start(&crate::support::servers_toml(
        &[(&mock.url, 64)],
        "max_queue_size = 512",
    ));
    let mut conns: Vec<crate::support::Conn> = (0..300)
        .map(|_| crate::support::Conn::open(router.addr))
        .collect();
    for conn in &mut conns {
        conn.send("GET", "/livez", &[], b"", false);
    }
    let started = Instant::now();
    for (i, conn) in conns.iter_mut().enumerate() {
        conn.stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let (status, _) = conn
            .read_head()
            .unwrap_or_else(|e| panic!("connection {i} got no answer: {e}"));
        assert_eq!(status, 200);
    }
    eprintln!(
        "300 keep-alive connections answered in {:?}",
        started.elapsed()
    );
}

// ---- Client connections: timeouts, the cap, running out of threads ----

/// Reads from `stream` until the router closes it (EOF or reset); returns how long
/// that took. Panics if it stays open for `within`.
fn closed_within(stream: &mut TcpStream, within: Duration) -> Duration {
    let started = Instant::now();
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let mut buf = [0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return started.elapsed(),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return started.elapsed(),
        }
        assert!(
            started.elapsed() < within,
            "the connection was still open after {within:?}"
        );
    }
}

/// One sample of the router's `/metrics`, read over `conn` (kept alive).
fn metric(conn: &mut Conn, series: &str) -> f64 {
    conn.send("GET", "/metrics", &[], b"", false);
    let resp = conn.read_response(false).expect("metrics");
    resp.text()
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in /metrics"))
}

#[test]
fn idle_connections_and_slow_heads_are_closed_after_client_idle_timeout() {
    let mock = Mock::start(&[]);
    let router = Router::start(&crate::support::servers_toml(
        &[(&mock.url, 2)],
        "client_idle_timeout = 1",
    ));
    // A keep-alive connection after its reply.
    let mut kept = Conn::open(router.addr);
    kept.send("GET", "/livez", &[], b"", false);
    assert_eq!(kept.read_response(false).expect("reply").status, 200);
    let kept_since = Instant::now();
    // A connection that never sends anything.
    let silent = TcpStream::connect(router.addr).expect("connect");
    let silent_since = Instant::now();
    // A head sent a byte every 100 ms: it never completes within the timeout.
    let slow = TcpStream::connect(router.addr).expect("connect");
    let slow_since = Instant::now();
    let mut trickle = slow.try_clone().expect("clone");
    let trickler = thread::spawn(move || {
        let _ = trickle.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ");
        while trickle.write_all(b"a").is_ok() {
            thread::sleep(Duration::from_millis(100));
        }
    });
    // Each one is watched from now on, while the busy connection below keeps sending,
    // so the time of its close is known, not only that it came within 10 s.
    let watchers: Vec<_> = [
        ("kept", kept.stream.try_clone().expect("clone"), kept_since),
        ("silent", silent, silent_since),
        ("slow", slow, slow_since),
    ]
    .into_iter()
    .map(|(what, mut stream, since)| {
        let watcher = thread::spawn(move || {
            closed_within(&mut stream, Duration::from_secs(10));
            Instant::now()
        });
        (what, since, watcher)
    })
    .collect();
    // A connection that sends a request every 400 ms is never idle for a second.
    let mut busy = Conn::open(router.addr);
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        busy.send("GET", "/livez", &[], b"", false);
        let resp = busy
            .read_response(false)
            .expect("a busy connection stays open");
        assert_eq!(resp.status, 200);
        thread::sleep(Duration::from_millis(400));
    }
    for (what, since, watcher) in watchers {
        // From the connection's last byte (its reply, its connect) to its close.
        let waited = watcher.join().expect("watcher").duration_since(since);
        assert!(
            waited >= Duration::from_millis(900),
            "{what} closed {waited:?} after it went idle, before client_idle_timeout = 1"
        );
    }
    trickler.join().expect("trickler");
    assert_eq!(
        mock.stat("total"),
        0,
        "the slow head never reached the backend"
    );
    assert!(
        metric(
            &mut busy,
            "vllm_router_client_connections_closed_total{reason=\"idle\"}"
        ) >= 3.0
    );
}

/// Bodies over 1 KiB are read by the worker, under `client_body_timeout` (tiny_http
/// reads smaller ones with the head, under `client_idle_timeout`).
#[test]
fn a_body_slower_than_client_body_timeout_is_cut_and_never_forwarded() {
    let mock = Mock::start(&[]);
    let router = Router::start(&crate::support::servers_toml(
        &[(&mock.url, 2)],
        "client_body_timeout = 1",
    ));
    let mut conn = Conn::open(router.addr);
    conn.send_raw(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Request-Id: slow-body\r\n\
          Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n{\"model\":",
    );
    let took = closed_within(&mut conn.stream, Duration::from_secs(10));
    assert!(took >= Duration::from_millis(900), "closed after {took:?}");
    let mut entry = None;
    wait_until(SOON, "the access entry", || {
        entry = router.access_entry("slow-body");
        entry.is_some()
    });
    let entry = entry.expect("entry");
    assert_eq!(entry["status"], 408, "{entry}");
    assert_eq!(
        mock.stat("total"),
        0,
        "the cut body never reached the backend"
    );
    let mut probe = Conn::open(router.addr);
    assert_eq!(
        metric(
            &mut probe,
            "vllm_router_client_connections_closed_total{reason=\"slow_body\"}"
        ),
        1.0
    );
}

#[test]
fn a_body_cut_by_the_client_is_never_forwarded() {
    let mock = Mock::start(&[]);
    let router = Router::start(&crate::support::servers_toml(&[(&mock.url, 2)], ""));
    let mut conn = Conn::open(router.addr);
    conn.send_raw(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Request-Id: cut-body\r\n\
          Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n{\"model\":\"mock-model\"}",
    );
    conn.stream
        .shutdown(std::net::Shutdown::Write)
        .expect("half-close");
    let resp = conn.read_response(false).expect("a reply");
    assert_eq!(resp.status, 400, "{}", resp.text());
    assert!(
        resp.text().contains("ended after 22 of its 5000 bytes"),
        "{}",
        resp.text()
    );
    assert_eq!(
        mock.stat("total"),
        0,
        "the cut body never reached the backend"
    );
}

#[test]
fn a_client_that_stops_reading_is_dropped_and_its_backend_request_ends() {
    let mock = Mock::start(&["--tokens", "100000"]);
    let router = Router::start(&crate::support::servers_toml(
        &[(&mock.url, 1)],
        "client_write_timeout = 1",
    ));
    let mut conn = Conn::open(router.addr);
    let body =
        br#"{"model":"mock-model","messages":[{"role":"user","content":"hi"}],"stream":true}"#;
    conn.send(
        "POST",
        CHAT,
        &[("Content-Type", "application/json")],
        body,
        false,
    );
    let (status, _) = conn.read_head().expect("head");
    assert_eq!(status, 200);
    // The client reads nothing more: the socket buffers fill and the router's write
    // blocks until the janitor closes the connection.
    wait_until(Duration::from_secs(20), "the slot is free again", || {
        router.in_flight() == [0]
    });
    wait_until(SOON, "the backend request ended", || {
        mock.stat("in_flight") == 0
    });
    assert!(mock.stat("aborted") >= 1, "{}", mock.stats());
    let mut probe = Conn::open(router.addr);
    assert_eq!(
        metric(
            &mut probe,
            "vllm_router_client_connections_closed_total{reason=\"stalled_write\"}"
        ),
        1.0
    );
    // The slot serves the next request.
    assert_eq!(
        crate::support::post(router.addr, &[], CHAT_BODY).status,
        200
    );
}

#[test]
fn connections_over_max_client_connections_are_refused_at_once() {
    let mock = Mock::start(&[]);
    let router = Router::start(&crate::support::servers_toml(
        &[(&mock.url, 2)],
        "max_client_connections = 3",
    ));
    let mut held: Vec<Conn> = (0..3).map(|_| admitted(router.addr)).collect();
    for _ in 0..5 {
        let mut over = TcpStream::connect(router.addr).expect("the kernel accepts");
        let _ = over.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n");
        let took = closed_within(&mut over, Duration::from_secs(2));
        assert!(took < Duration::from_secs(1), "refused after {took:?}");
    }
    // The connections within the cap are served as before.
    let conn = &mut held[0];
    conn.send(
        "POST",
        CHAT,
        &[("Content-Type", "application/json")],
        CHAT_BODY.as_bytes(),
        false,
    );
    assert_eq!(conn.read_response(false).expect("reply").status, 200);
    assert!(
        metric(
            conn,
            "vllm_router_client_connections_closed_total{reason=\"over_cap\"}"
        ) >= 5.0
    );
    assert_eq!(metric(conn, "vllm_router_client_connections"), 3.0);
    // One leaves, and a new one gets its place.
    held.pop();
    let mut next = admitted(router.addr);
    next.send(
        "POST",
        CHAT,
        &[("Content-Type", "application/json")],
        CHAT_BODY.as_bytes(),
        false,
    );
    assert_eq!(next.read_response(false).expect("reply").status, 200);
}

#[test]
fn running_out_of_threads_sheds_new_connections_and_recovers() {
    // RLIMIT_NPROC binds only a user other than root, and switching to one needs root.
    // CI runs as root, so there a run that is not root is a broken setup, not a skip.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the tests as root: this test starts the router as `nobody` under RLIMIT_NPROC"
        );
        eprintln!(
            "skipped (not root): RLIMIT_NPROC binds only a user other than root, \
             and starting the router as one needs root"
        );
        return;
    }
    const NPROC: u64 = 48;
    let mock = Mock::start(&[]);
    let router = Router::start_with_thread_limit(
        &crate::support::servers_toml(&[(&mock.url, 2)], "worker_threads = 4"),
        NPROC,
    )
    .expect("router starts");
    router.wait_all_healthy();
    // The first connection gets a thread; then far more than the limit allows.
    let mut first = admitted(router.addr);
    let held: Vec<TcpStream> = (0..2 * NPROC)
        .filter_map(|_| TcpStream::connect(router.addr).ok())
        .collect();
    wait_until(SOON, "connections refused for lack of threads", || {
        metric(
            &mut first,
            "vllm_router_client_connections_closed_total{reason=\"no_thread\"}",
        ) > 0.0
    });
    // A connection that has its thread is served as before.
    first.send(
        "POST",
        CHAT,
        &[("Content-Type", "application/json")],
        CHAT_BODY.as_bytes(),
        false,
    );
    assert_eq!(first.read_response(false).expect("reply").status, 200);
    drop(held);
    drop(first);
    // Threads come back as the connections close.
    wait_until(
        Duration::from_secs(20),
        "new connections are served again",
        || crate::support::try_post(router.addr, &[], CHAT_BODY).is_ok_and(|r| r.status == 200),
    );
    assert!(
        router.log().contains("cannot start a connection thread"),
        "the shedding is logged"
    );
}

/// The router's own replies are timed too: a client that pipelines requests for
/// `/metrics` and reads nothing holds no worker beyond `client_write_timeout`.
#[test]
fn a_client_that_reads_none_of_the_routers_own_replies_is_dropped() {
    let mock = Mock::start(&[]);
    let router = Router::start(&crate::support::servers_toml(
        &[(&mock.url, 2)],
        "client_write_timeout = 1",
    ));
    let mut greedy = TcpStream::connect(router.addr).expect("connect");
    let requests = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".repeat(3000);
    let mut writer = greedy.try_clone().expect("clone");
    // The router stops reading once its replies back up, so this write may block
    // until the connection is closed.
    let sender = thread::spawn(move || {
        let _ = writer.write_all(requests.as_bytes());
    });
    let mut probe = admitted(router.addr);
    wait_until(
        Duration::from_secs(15),
        "the stalled connection closed",
        || {
            metric(
                &mut probe,
                "vllm_router_client_connections_closed_total{reason=\"stalled_write\"}",
            ) >= 1.0
        },
    );
    closed_within(&mut greedy, Duration::from_secs(30));
    sender.join().expect("sender");
}

/// A client pipelining requests has one of them with the workers at a time, so it
/// cannot take the whole pool from the others.
#[test]
fn a_pipelining_client_holds_one_worker_at_a_time() {
    let mock = Mock::start(&[]);
    let router = Router::start(&crate::support::servers_toml(
        &[(&mock.url, 16)],
        "worker_threads = 4",
    ));
    let slow =
        br#"{"model":"mock-model","messages":[{"role":"user","content":"hi"}],"max_tokens":2}"#;
    let mut one = Vec::new();
    let _ = write!(
        one,
        "POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         x-mock-delay-ms: 100\r\nContent-Length: {}\r\n\r\n",
        slow.len()
    );
    one.extend_from_slice(slow);
    let mut pipeliner = Conn::open(router.addr);
    pipeliner.send_raw(&one.repeat(20));
    thread::sleep(Duration::from_millis(100));
    // With the pipeline's 20 requests spread over the pool, this one would wait for
    // seconds.
    let started = Instant::now();
    let resp = crate::support::post(router.addr, &[], CHAT_BODY);
    assert_eq!(resp.status, 200, "{}", resp.text());
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_millis(1500),
        "another client waited {waited:?}"
    );
    assert!(
        mock.stats()["peak_in_flight"].as_u64() <= Some(2),
        "{}",
        mock.stats()
    );
    for i in 0..20 {
        let reply = pipeliner
            .read_response(false)
            .unwrap_or_else(|e| panic!("pipelined reply {i}: {e}"));
        assert_eq!(reply.status, 200, "pipelined reply {i}");
    }
}
