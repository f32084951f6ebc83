//! Test support: start the real `vllm-router` and `mock-vllm` binaries on 127.0.0.1
//! with ephemeral ports, talk to them over real sockets, and poll for conditions
//! instead of sleeping. Every child process is killed when its handle drops.
//!
//! A thin layer over the harness library (`vllm_router_tools`, in `tools/`) that the
//! soak and the benchmark share: here its fallible calls become panics that say what
//! a test expected.

#![allow(dead_code)] // each test module uses a different part of this

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockWriteGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use vllm_router_tools::{http, process, procfs};

pub use vllm_router_tools::http::{Conn, Resp};
pub use vllm_router_tools::process::Proc;

pub const ROUTER: &str = env!("CARGO_BIN_EXE_vllm-router");

/// `mock-vllm`, which the `tools/` member builds into the same target directory as
/// the router (`cargo test` with no arguments builds both).
pub fn mock_bin() -> &'static Path {
    static MOCK: OnceLock<PathBuf> = OnceLock::new();
    MOCK.get_or_init(|| {
        let router = Path::new(ROUTER);
        let mock = router.with_file_name("mock-vllm");
        assert!(
            mock.is_file(),
            "{} is missing: the integration tests run the mock backend of the `tools/` \
             member; build it first with \
             `cargo build -p vllm-router-tools --features bins --bin mock-vllm` \
             (or run `cargo test` with no -p, or `cargo test --workspace`)",
            mock.display()
        );
        mock
    })
}

/// A fresh directory per test under the system temp dir.
pub fn test_dir(name: &str) -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!(
        "vllm-router-test-{}-{n}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create test dir");
    dir
}

/// Polls `cond` until it holds or `timeout` passes; panics with `what` on timeout.
pub fn wait_until(timeout: Duration, what: &str, cond: impl FnMut() -> bool) {
    if let Err(e) = process::wait_until(timeout, what, cond) {
        panic!("{e}");
    }
}

/// A running mock vLLM backend.
pub struct Mock {
    _proc: Proc,
    pub addr: SocketAddr,
    pub url: String,
}

impl Mock {
    pub fn start(args: &[&str]) -> Mock {
        let mut cmd = Command::new(mock_bin());
        cmd.args(["--host", "127.0.0.1", "--port", "0"])
            .args(args)
            .stderr(Stdio::null());
        let (proc, addr) = process::spawn_listening(cmd, "mock-vllm").expect("mock starts");
        Mock {
            _proc: proc,
            addr,
            url: format!("http://{addr}"),
        }
    }

    pub fn stats(&self) -> serde_json::Value {
        get_json(self.addr, "/mock/stats")
    }

    pub fn stat(&self, key: &str) -> u64 {
        self.stats()[key]
            .as_u64()
            .unwrap_or_else(|| panic!("mock stat {key} missing"))
    }

    /// The last inference request the mock received, as it saw it.
    pub fn last(&self) -> serde_json::Value {
        get_json(self.addr, "/mock/last")
    }

    /// The values of the headers called `name` that the mock's last request carried.
    pub fn headers_seen(&self, name: &str) -> Vec<String> {
        self.last()["headers"]
            .as_array()
            .expect("headers")
            .iter()
            .filter(|h| h[0].as_str().is_some_and(|n| n.eq_ignore_ascii_case(name)))
            .map(|h| h[1].as_str().expect("value").to_owned())
            .collect()
    }

    pub fn set_mode(&self, mode: &str) {
        let resp = request(
            self.addr,
            "POST",
            "/mock/mode",
            &[],
            format!(r#"{{"mode":"{mode}"}}"#).as_bytes(),
        );
        assert_eq!(resp.status, 200, "set mode {mode}: {}", resp.text());
    }
}

/// A resource limit the router is started under.
#[derive(Clone, Copy)]
enum Limit {
    Files(u64),
    ThreadsAsNobody(u64),
}

const NOBODY: u32 = 65534;

/// A number from `/proc/PID/status`: `Threads`, `VmRSS` or `VmHWM` (in KiB).
pub fn proc_status(pid: u32, field: &str) -> u64 {
    procfs::field(pid, field).unwrap_or_else(|e| panic!("{e}"))
}

/// The resident set of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    proc_status(pid, "VmRSS")
}

/// A backend written for one test, on 127.0.0.1: every connection it accepts goes to
/// `serve` on a thread of its own. It stops accepting when dropped.
pub struct FakeBackend {
    pub addr: SocketAddr,
    pub url: String,
    stop: Arc<AtomicBool>,
}

impl FakeBackend {
    pub fn start(serve: impl Fn(TcpStream) + Send + Sync + 'static) -> FakeBackend {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stop = Arc::new(AtomicBool::new(false));
        let serve = Arc::new(serve);
        {
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(stream) = stream else { continue };
                    let serve = Arc::clone(&serve);
                    thread::spawn(move || serve(stream));
                }
            });
        }
        FakeBackend {
            addr,
            url: format!("http://{addr}"),
            stop,
        }
    }
}

impl Drop for FakeBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

/// A running router, with its config file and logs in its own directory.
pub struct Router {
    proc: Proc,
    pub addr: SocketAddr,
    pub dir: PathBuf,
}

impl Router {
    /// Starts the router on `toml`; panics with its stderr if it does not start.
    /// Starts the router on `toml` and waits until every backend has passed its first
    /// health check; panics with its log if it does not start.
    pub fn start(toml: &str) -> Router {
        let router = Router::start_with(toml, &[], &[])
            .unwrap_or_else(|e| panic!("router did not start: {e}"));
        router.wait_all_healthy();
        router
    }

    pub fn start_with(toml: &str, args: &[&str], envs: &[(&str, &str)]) -> Result<Router, String> {
        Router::launch(toml, args, envs, None, |_| {})
    }

    /// Writes the config into a fresh directory and starts the router on it, running
    /// `during_startup` on another thread as soon as the process is spawned.
    /// Starts the router with at most `nofile` open file descriptors.
    pub fn start_with_fd_limit(toml: &str, nofile: u64) -> Result<Router, String> {
        Router::launch(toml, &[], &[], Some(Limit::Files(nofile)), |_| {})
    }

    /// Starts the router as user `nobody` allowed at most `nproc` threads (that
    /// user's whole count; root is exempt from the limit, hence the other user).
    /// `nobody` cannot reach the build directory, so the binary runs from a copy.
    pub fn start_with_thread_limit(toml: &str, nproc: u64) -> Result<Router, String> {
        Router::launch(toml, &[], &[], Some(Limit::ThreadsAsNobody(nproc)), |_| {})
    }

    fn launch(
        toml: &str,
        args: &[&str],
        envs: &[(&str, &str)],
        limit: Option<Limit>,
        during_startup: impl FnOnce(PathBuf) + Send + 'static,
    ) -> Result<Router, String> {
        let dir = test_dir("router");
        Router::launch_in(dir.clone(), &dir, toml, args, envs, limit, during_startup)
    }

    /// `launch` with the config in `dir` and the process running in `cwd`.
    fn launch_in(
        dir: PathBuf,
        cwd: &Path,
        toml: &str,
        args: &[&str],
        envs: &[(&str, &str)],
        limit: Option<Limit>,
        during_startup: impl FnOnce(PathBuf) + Send + 'static,
    ) -> Result<Router, String> {
        let config = dir.join("servers.toml");
        std::fs::write(&config, toml).expect("write config");
        let mut cmd = match limit {
            Some(Limit::ThreadsAsNobody(_)) => {
                use std::os::unix::fs::PermissionsExt;
                let copy = dir.join("vllm-router");
                std::fs::copy(ROUTER, &copy).expect("copy the router binary");
                let open = std::fs::Permissions::from_mode(0o777);
                std::fs::set_permissions(&dir, open).expect("open the test dir to nobody");
                std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644))
                    .expect("config readable");
                Command::new(copy)
            }
            _ => Command::new(ROUTER),
        };
        cmd.current_dir(cwd)
            .env_clear()
            .env("LOG_DIR", dir.join("logs"))
            .envs(envs.iter().copied())
            .args([
                "run",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--log-level",
                "debug",
            ])
            .arg("--config")
            .arg(&config)
            .args(args)
            .stderr(Stdio::null());
        if let Some(limit) = limit {
            use std::os::unix::process::CommandExt;
            let (resource, n) = match limit {
                Limit::Files(n) => (libc::RLIMIT_NOFILE, n),
                Limit::ThreadsAsNobody(n) => {
                    cmd.uid(NOBODY).gid(NOBODY);
                    (libc::RLIMIT_NPROC, n)
                }
            };
            let limit = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            // SAFETY: between fork and exec the closure only calls setrlimit, which is
            // async-signal-safe, on a value it owns.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(resource, &limit) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let racer = {
            let dir = dir.clone();
            std::thread::spawn(move || during_startup(dir))
        };
        let started = process::spawn_listening(cmd, "vllm-router");
        racer
            .join()
            .map_err(|_| "the start-up hook panicked".to_owned())?;
        match started {
            Ok((proc, addr)) => Ok(Router { proc, addr, dir }),
            Err(e) => Err(format!("{e}\n--- log ---\n{}", read_log(&dir))),
        }
    }

    pub fn log(&self) -> String {
        read_log(&self.dir)
    }

    pub fn get(&self, path: &str) -> Resp {
        request(self.addr, "GET", path, &[], b"")
    }

    pub fn get_json(&self, path: &str) -> serde_json::Value {
        get_json(self.addr, path)
    }

    pub fn post(&self, path: &str, body: &str) -> Resp {
        request(
            self.addr,
            "POST",
            path,
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )
    }

    /// The router's in-flight count per backend, from /load-stats.
    pub fn in_flight(&self) -> Vec<u64> {
        self.per_server("in_flight")
    }

    /// One whole-number figure of each backend in /load-stats (`in_flight`,
    /// `prefix_blocks`...), in the config's order.
    pub fn per_server(&self, key: &str) -> Vec<u64> {
        self.get_json("/load-stats")["servers"]
            .as_array()
            .expect("servers")
            .iter()
            .map(|s| s[key].as_u64().unwrap_or_else(|| panic!("{key} in {s}")))
            .collect()
    }

    /// Panics unless the process is still running.
    pub fn assert_alive(&mut self) {
        assert!(
            matches!(self.proc.0.try_wait(), Ok(None)),
            "router exited; log:\n{}",
            self.log()
        );
    }
}

fn read_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("logs").join("vllm-router.log")).unwrap_or_default()
}

/// A servers.toml for these backends (url, max_concurrent_requests) and extra [config]
/// lines.
pub fn servers_toml(backends: &[(&str, u32)], config: &str) -> String {
    let mut s = String::from("[servers]\nservers = [\n");
    for (url, max) in backends {
        let _ = writeln!(
            s,
            "  {{ url = \"{url}\", max_concurrent_requests = {max} }},"
        );
    }
    s.push_str("]\n\n[config]\n");
    s.push_str(config);
    s.push('\n');
    s
}

/// One request on a new connection (`Connection: close`).
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Resp {
    let mut conn = Conn::open(addr);
    conn.send(method, path, headers, body, true);
    conn.read_response(method == "HEAD").expect("a response")
}

pub fn get_json(addr: SocketAddr, path: &str) -> serde_json::Value {
    let resp = request(addr, "GET", path, &[], b"");
    resp.json()
}

/// A port on 127.0.0.1 that was free a moment ago: nothing listens there (yet).
pub fn free_port() -> u16 {
    process::free_port().expect("free port")
}

impl Router {
    /// Waits until `/readyz` answers 200: at least one backend is routable.
    pub fn wait_ready(&self) {
        if let Err(e) = process::wait_ready(self.addr, Duration::from_secs(10)) {
            panic!("{e}");
        }
    }

    /// Waits until `/health` counts `n` healthy servers.
    pub fn wait_healthy_servers(&self, n: u64) {
        wait_until(
            Duration::from_secs(10),
            &format!("{n} healthy servers in /health"),
            || self.health()["healthy_servers"] == n,
        );
    }

    /// The `/health` document (its status may be 200 or 503).
    pub fn health(&self) -> serde_json::Value {
        self.get_json("/health")
    }

    /// Server entry `i` of `/health`.
    pub fn server(&self, i: usize) -> serde_json::Value {
        self.health()["servers"][i].clone()
    }

    /// Whether server entry `i` of `/health` says `healthy: true`.
    pub fn is_healthy(&self, i: usize) -> bool {
        self.server(i)["healthy"]
            .as_bool()
            .unwrap_or_else(|| panic!("server {i} has no boolean 'healthy'"))
    }

    /// The model ids `GET /v1/models` lists, sorted.
    pub fn model_ids(&self) -> Vec<String> {
        let resp = self.get("/v1/models");
        assert_eq!(resp.status, 200, "/v1/models: {}", resp.text());
        let doc = resp.json();
        assert_eq!(doc["object"], "list", "{doc}");
        let mut ids: Vec<String> = doc["data"]
            .as_array()
            .unwrap_or_else(|| panic!("/v1/models has no data array: {doc}"))
            .iter()
            .map(|m| {
                assert_eq!(m["object"], "model", "{m}");
                m["id"].as_str().expect("model id").to_owned()
            })
            .collect();
        ids.sort();
        ids
    }
}

// ---------------------------------------------------------------- operations

impl Router {
    /// The router's process id.
    pub fn pid(&self) -> u32 {
        self.proc.0.id()
    }

    /// Sends `sig` (`libc::SIGTERM`, ...) to the router process.
    pub fn signal(&self, sig: libc::c_int) {
        let pid = libc::pid_t::try_from(self.pid()).expect("pid fits pid_t");
        // SAFETY: kill(2) with a pid this test started and still holds (not yet
        // reaped, so the pid cannot have been reused) and a valid signal number.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(
            rc,
            0,
            "kill({pid}, {sig}): {}",
            std::io::Error::last_os_error()
        );
    }

    /// Waits up to `timeout` for the router to exit; `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.proc.0.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The config file the router was started with (and re-reads).
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("servers.toml")
    }

    /// Overwrites the config file in place, as `echo ... > servers.toml` would.
    pub fn write_config(&self, toml: &str) {
        std::fs::write(self.config_path(), toml).expect("write config");
    }

    /// Replaces the config file as an editor does: a temp file in the same directory,
    /// renamed over it.
    pub fn replace_config(&self, toml: &str) {
        let tmp = self.dir.join(".servers.toml.tmp");
        std::fs::write(&tmp, toml).expect("write temp config");
        std::fs::rename(&tmp, self.config_path()).expect("rename over config");
    }

    /// The router's `LOG_DIR`.
    pub fn log_dir(&self) -> PathBuf {
        self.dir.join("logs")
    }

    /// The lines of `vllm-router-structured.log` that parse as JSON (a line being
    /// written may be cut short; it is skipped).
    pub fn structured_log(&self) -> Vec<serde_json::Value> {
        parse_json_lines(&self.log_dir().join("vllm-router-structured.log"))
    }

    /// The access-log entry (structured log, target `access`) with this request id.
    pub fn access_entry(&self, request_id: &str) -> Option<serde_json::Value> {
        self.structured_log()
            .into_iter()
            .find(|e| e["target"] == "access" && e["request_id"] == request_id)
    }

    /// The access-log entry with this request id, once it is written (within `SOON`).
    pub fn wait_access_entry(&self, request_id: &str) -> serde_json::Value {
        let mut found = None;
        wait_until(SOON, &format!("access entry for {request_id}"), || {
            found = self.access_entry(request_id);
            found.is_some()
        });
        found.expect("found")
    }
}

/// The lines of a JSON-lines file that parse, in order; none if it does not exist.
pub fn parse_json_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

impl Router {
    /// Like `start_with`, but `during_startup` runs on another thread with the router's
    /// directory as soon as the process is spawned, racing its start-up (it may wait
    /// for files the router creates, and edit its config).
    pub fn start_racing(
        toml: &str,
        args: &[&str],
        during_startup: impl FnOnce(PathBuf) + Send + 'static,
    ) -> Result<Router, String> {
        Router::launch(toml, args, &[], None, during_startup)
    }
}

// ---------------------------------------------------------------- chat load

pub const CHAT: &str = "/v1/chat/completions";
pub const CHAT_BODY: &str = r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":2}"#;

/// A small chat request body for `model`.
pub fn chat_for(model: &str) -> String {
    format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}],"max_tokens":2}}"#)
}

/// A JSON POST to the chat endpoint with extra headers.
pub fn post(addr: SocketAddr, headers: &[(&str, &str)], body: &str) -> Resp {
    let mut all = vec![("Content-Type", "application/json")];
    all.extend_from_slice(headers);
    request(addr, "POST", CHAT, &all, body.as_bytes())
}

/// Like `post`, but a refused connection or a broken reply is an `Err`, not a panic:
/// a router that is shutting down may do either.
pub fn try_post(addr: SocketAddr, headers: &[(&str, &str)], body: &str) -> Result<Resp, String> {
    let mut all = vec![("Content-Type", "application/json")];
    all.extend_from_slice(headers);
    try_request(addr, "POST", CHAT, &all, body)
}

/// A GET that gives `None` instead of panicking when the router does not answer in
/// 2 s (or refuses the connection).
pub fn try_get(addr: SocketAddr, path: &str) -> Option<Resp> {
    try_request_within(addr, "GET", path, &[], "", Duration::from_secs(2)).ok()
}

fn try_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<Resp, String> {
    try_request_within(addr, method, path, headers, body, Duration::from_secs(30))
}

fn try_request_within(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
    timeout: Duration,
) -> Result<Resp, String> {
    http::fetch(addr, method, path, headers, body.as_bytes(), timeout)
}

/// A steady load of sequential requests on a few client threads, counting anything
/// but a 200 as a failure. `pause` waits for the requests in flight and holds every
/// client until the guard drops.
pub struct Load {
    gate: Arc<RwLock<()>>,
    stop: Arc<AtomicBool>,
    served: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    pub fn start(addr: SocketAddr, clients: usize) -> Load {
        let gate = Arc::new(RwLock::new(()));
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..clients)
            .map(|_| {
                let (gate, stop) = (Arc::clone(&gate), Arc::clone(&stop));
                let (served, failures) = (Arc::clone(&served), Arc::clone(&failures));
                thread::spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        {
                            let _in_flight = gate.read().expect("gate");
                            match try_post(addr, &[], CHAT_BODY) {
                                Ok(resp) if resp.status == 200 => {}
                                Ok(resp) => failures.lock().expect("failures").push(format!(
                                    "{} {}",
                                    resp.status,
                                    resp.text()
                                )),
                                Err(e) => failures.lock().expect("failures").push(e),
                            }
                            served.fetch_add(1, Ordering::SeqCst);
                        }
                        thread::sleep(Duration::from_millis(2));
                    }
                })
            })
            .collect();
        Load {
            gate,
            stop,
            served,
            failures,
            threads,
        }
    }

    pub fn pause(&self) -> RwLockWriteGuard<'_, ()> {
        self.gate.write().expect("gate")
    }

    pub fn served(&self) -> usize {
        self.served.load(Ordering::SeqCst)
    }

    /// Stops the clients and returns every failure they saw.
    pub fn stop(mut self) -> Vec<String> {
        self.stop.store(true, Ordering::SeqCst);
        let mut failures = Vec::new();
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                failures.push("a client thread panicked".into());
            }
        }
        failures.extend(self.failures.lock().expect("failures").drain(..));
        failures
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------- hardening

impl Router {
    /// Like `start_with`, but in `dir` (from `test_dir`), which may already hold files
    /// the config names by a relative path, such as an `api_keys_file`. The config is
    /// written to `dir/servers.toml`; the process runs in the empty `dir/cwd`, so a
    /// relative path that works is relative to the config file, not to the working
    /// directory.
    pub fn start_in(
        dir: PathBuf,
        toml: &str,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> Result<Router, String> {
        let cwd = dir.join("cwd");
        std::fs::create_dir_all(&cwd).expect("create working dir");
        Router::launch_in(dir, &cwd, toml, args, envs, None, |_| {})
    }

    /// Waits until `/health` counts every server healthy (it is open even when the
    /// router requires an API key).
    pub fn wait_all_healthy(&self) {
        wait_until(Duration::from_secs(10), "every backend healthy", || {
            all_healthy(&self.get_json("/health"))
        });
    }
}

/// Whether a `/health` document counts every server healthy. Both counts must be
/// there: two missing fields are equal too.
fn all_healthy(health: &serde_json::Value) -> bool {
    let count = |field: &str| {
        health[field]
            .as_u64()
            .unwrap_or_else(|| panic!("/health has no number {field}: {health}"))
    };
    count("healthy_servers") == count("total_servers")
}

/// The bound for anything that should happen at once.
pub const SOON: Duration = Duration::from_secs(5);

/// Opens a connection and has `/livez` answered on it, retrying while the router
/// still counts connections that just closed.
pub fn admitted(addr: SocketAddr) -> Conn {
    let mut admitted = None;
    wait_until(SOON, "a connection admitted", || {
        let mut conn = Conn::open(addr);
        conn.stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        conn.send("GET", "/livez", &[], b"", false);
        if conn.read_response(false).is_ok_and(|r| r.status == 200) {
            admitted = Some(conn);
        }
        admitted.is_some()
    });
    admitted.expect("admitted")
}
