//! HTTPS on both sides, with a certificate the test makes (openssl): the router serves
//! HTTPS with `tls_cert_file`/`tls_key_file`, and relays to an https:// backend that it
//! trusts through `tls_ca_file`. Built only with `--features tls` (`make test` runs it).

use std::path::{Path, PathBuf};
use std::process::Command;

use vllm_router::control::config::Settings;

use crate::support::{servers_toml, test_dir, Mock, Router, CHAT, CHAT_BODY};

/// A test CA and a certificate it signed for 127.0.0.1 and localhost:
/// (ca.pem, cert.pem, key.pem).
fn make_certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let path = |name: &str| dir.join(name);
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        &[
            "req",
            "-x509",
            "-days",
            "2",
            "-subj",
            "/CN=vllm-router test CA",
        ],
        &ec,
        &[("-keyout", path("ca.key")), ("-out", path("ca.pem"))],
    );
    openssl(
        &["req", "-subj", "/CN=localhost"],
        &ec,
        &[("-keyout", path("key.pem")), ("-out", path("leaf.csr"))],
    );
    std::fs::write(
        path("leaf.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n",
    )
    .expect("write extensions");
    openssl(
        &["x509", "-req", "-days", "2", "-CAcreateserial"],
        &[],
        &[
            ("-in", path("leaf.csr")),
            ("-CA", path("ca.pem")),
            ("-CAkey", path("ca.key")),
            ("-extfile", path("leaf.ext")),
            ("-out", path("cert.pem")),
        ],
    );
    (path("ca.pem"), path("cert.pem"), path("key.pem"))
}

fn openssl(args: &[&str], more: &[&str], files: &[(&str, PathBuf)]) {
    let mut cmd = Command::new("openssl");
    cmd.args(args)
        .args(more)
        .stderr(std::process::Stdio::null());
    for (flag, path) in files {
        cmd.arg(flag).arg(path);
    }
    let status = cmd
        .status()
        .expect("openssl is installed (Debian package openssl)");
    assert!(status.success(), "openssl {args:?} failed");
}

/// A client that trusts only `ca`.
fn client(ca: &Path) -> ureq::Agent {
    let settings = Settings {
        tls_ca_file: Some(ca.to_owned()),
        ..Settings::default()
    };
    let tls = vllm_router::tls::client_config(&settings).expect("client TLS config");
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .tls_config(tls)
        .build()
        .new_agent()
}

fn https_router(mock: &Mock, ca: &Path, cert: &Path, key: &Path) -> Router {
    https_router_with(mock, ca, cert, key, "")
}

fn https_router_with(mock: &Mock, ca: &Path, cert: &Path, key: &Path, extra: &str) -> Router {
    let config = format!(
        "tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n{extra}",
        cert.display(),
        key.display()
    );
    let router =
        Router::start_with(&servers_toml(&[(&mock.url, 4)], &config), &[], &[]).expect("starts");
    let agent = client(ca);
    let health = format!("https://127.0.0.1:{}/health", router.addr.port());
    crate::support::wait_until(
        std::time::Duration::from_secs(10),
        "the HTTPS router is ready",
        || match agent.get(&health).call() {
            Ok(r) => r.status().as_u16() == 200,
            Err(_) => false,
        },
    );
    router
}

#[test]
fn the_router_serves_https_with_the_configured_certificate() {
    let dir = test_dir("tls");
    let (ca, cert, key) = make_certificates(&dir);
    let mock = Mock::start(&[]);
    let router = https_router(&mock, &ca, &cert, &key);
    let agent = client(&ca);
    let url = format!("https://127.0.0.1:{}", router.addr.port());
    let mut live = agent
        .get(format!("{url}/livez"))
        .call()
        .expect("https /livez");
    assert_eq!(live.status().as_u16(), 200);
    assert!(live
        .body_mut()
        .read_to_string()
        .expect("body")
        .contains("alive"));
    let mut reply = agent
        .post(format!("{url}{CHAT}"))
        .header("Content-Type", "application/json")
        .send(CHAT_BODY)
        .expect("https chat");
    assert_eq!(reply.status().as_u16(), 200);
    assert!(reply
        .body_mut()
        .read_to_string()
        .expect("body")
        .contains("chat.completion"));
    // A client that does not trust the certificate is refused by its own TLS check.
    let public_roots = vllm_router::tls::client_config(&Settings::default()).expect("TLS config");
    let stranger = ureq::Agent::config_builder()
        .tls_config(public_roots)
        .build()
        .new_agent();
    assert!(stranger.get(format!("{url}/livez")).call().is_err());
}

#[test]
fn https_backends_are_reached_through_the_trusted_ca() {
    let dir = test_dir("tls-backend");
    let (ca, cert, key) = make_certificates(&dir);
    let mock = Mock::start(&[]);
    // The HTTPS "backend" is a second router in front of the mock.
    let inner = https_router(&mock, &ca, &cert, &key);
    let backend = format!("https://127.0.0.1:{}", inner.addr.port());
    let trusted = format!("tls_ca_file = \"{}\"", ca.display());
    let outer = Router::start(&servers_toml(&[(&backend, 4)], &trusted));
    let resp = outer.post(CHAT, CHAT_BODY);
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(mock.stat("total"), 1);
    let stream = outer.post(CHAT, r#"{"messages":[],"stream":true,"max_tokens":3}"#);
    assert!(stream.text().contains("[DONE]"), "{}", stream.text());

    // Without the CA the backend's certificate is not trusted: no traffic, and the
    // router says why it is unhealthy.
    let untrusted =
        Router::start_with(&servers_toml(&[(&backend, 4)], ""), &[], &[]).expect("starts");
    crate::support::wait_until(std::time::Duration::from_secs(10), "a failed check", || {
        untrusted.get_json("/health")["servers"][0]["reason"].is_string()
    });
    assert_eq!(untrusted.post(CHAT, CHAT_BODY).status, 503);
    assert_eq!(mock.stat("total"), 2);
}

/// tiny_http makes the TLS handshake on the thread that accepts: clients that open a
/// connection and never start their handshake must neither stop the router accepting
/// nor hold their thread beyond `client_idle_timeout`.
#[test]
fn stalled_handshakes_neither_stop_accepting_nor_stay_open() {
    use std::io::Read;
    let dir = test_dir("tls-stall");
    let (ca, cert, key) = make_certificates(&dir);
    let mock = Mock::start(&[]);
    let router = https_router_with(&mock, &ca, &cert, &key, "client_idle_timeout = 1");
    let mut stalled: Vec<std::net::TcpStream> = (0..3)
        .map(|_| std::net::TcpStream::connect(router.addr).expect("connect"))
        .collect();
    let agent = client(&ca);
    let url = format!("https://127.0.0.1:{}/livez", router.addr.port());
    let started = std::time::Instant::now();
    let live = agent.get(&url).call().expect("https /livez");
    assert_eq!(live.status().as_u16(), 200);
    assert!(started.elapsed() < std::time::Duration::from_millis(900));
    for conn in &mut stalled {
        conn.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .expect("timeout");
        let mut buf = [0u8; 64];
        // Closed by the router: end of stream or a reset, never the timeout.
        match conn.read(&mut buf) {
            Ok(n) => assert_eq!(n, 0),
            Err(e) => assert!(
                !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
                "a stalled handshake stayed open: {e}"
            ),
        }
    }
}

const WSS_SESSION: &str = r#"
import json, ssl, sys
from websockets.sync.client import connect
tls = {"ssl": ssl.create_default_context(cafile=sys.argv[2])} if sys.argv[1].startswith("wss:") else {}
with connect(sys.argv[1], open_timeout=10, **tls) as ws:
    hello = json.loads(ws.recv(timeout=10))
    # Many messages at once: several TLS records arrive in one read, which the tunnel
    # must relay without waiting for more bytes on the socket.
    sent = [json.dumps({"n": i, "pad": "x" * (i * 97 % 5000)}) for i in range(200)]
    for m in sent:
        ws.send(m)
    got = [ws.recv(timeout=10) for _ in sent]
print(json.dumps({"backend": hello["backend"], "echoed": got == sent}))
"#;

/// Runs `WSS_SESSION` against `uri`: the backend that answered, and whether every
/// message came back.
fn websocket_session(uri: &str, ca: &Path) -> serde_json::Value {
    let out = Command::new("python3")
        .args(["-c", WSS_SESSION, uri])
        .arg(ca)
        .output()
        .expect("python3 runs (pip install websockets; `make test` installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the script prints JSON")
}

#[test]
fn a_realtime_websocket_is_tunnelled_over_https_on_both_sides() {
    let dir = test_dir("tls-ws");
    let (ca, cert, key) = make_certificates(&dir);
    let mock = Mock::start(&["--id", "gpu-tls"]);
    let inner = https_router(&mock, &ca, &cert, &key);
    // HTTPS from the client.
    let result = websocket_session(
        &format!("wss://127.0.0.1:{}/v1/realtime", inner.addr.port()),
        &ca,
    );
    assert_eq!(result["backend"], "gpu-tls", "{result}");
    assert_eq!(result["echoed"], true, "{result}");
    // HTTPS to the backend: a plain router in front of the HTTPS one.
    let backend = format!("https://127.0.0.1:{}", inner.addr.port());
    let trusted = format!("tls_ca_file = \"{}\"", ca.display());
    let outer = Router::start(&servers_toml(&[(&backend, 4)], &trusted));
    let result = websocket_session(&format!("ws://{}/v1/realtime", outer.addr), &ca);
    assert_eq!(result["backend"], "gpu-tls", "{result}");
    assert_eq!(result["echoed"], true, "{result}");
}
