//! The processes of a run: mocks, routers and nginx in a scratch directory, each
//! stopped when its handle drops.

use crate::*;

/// Paths of one run: the binaries and a scratch directory removed at the end.
pub(crate) struct Env {
    pub(crate) bin_dir: PathBuf,
    pub(crate) work: PathBuf,
}

impl Env {
    pub(crate) fn new() -> Result<Env, String> {
        let exe = std::env::current_exe().map_err(|e| format!("cannot find myself: {e}"))?;
        let bin_dir = exe.parent().ok_or("no binary directory")?.to_owned();
        for bin in ["vllm-router", "mock-vllm"] {
            if !bin_dir.join(bin).is_file() {
                return Err(format!(
                    "{} is missing: build with `cargo build --release` (or run `make bench`)",
                    bin_dir.join(bin).display()
                ));
            }
        }
        let work = std::env::temp_dir().join(format!("vllm-router-bench-{}", std::process::id()));
        fs::create_dir_all(&work).map_err(|e| format!("cannot create {}: {e}", work.display()))?;
        Ok(Env { bin_dir, work })
    }

    pub(crate) fn mock(&self, name: &str) -> Result<Mock, String> {
        self.mock_with(name, &[])
    }

    /// A mock with extra arguments.
    pub(crate) fn mock_with(&self, name: &str, args: &[&str]) -> Result<Mock, String> {
        let mut cmd = Command::new(self.bin_dir.join("mock-vllm"));
        cmd.args(["--host", "127.0.0.1", "--port", "0", "--id", name])
            .args(args);
        let (proc, addr) = Proc::spawn_listening(cmd, name, &self.work)?;
        Ok(Mock { proc, addr })
    }

    pub(crate) fn router(&self, name: &str, toml: &str, log_level: &str) -> Result<Router, String> {
        let config = self.work.join(format!("{name}.toml"));
        fs::write(&config, toml).map_err(|e| format!("cannot write {}: {e}", config.display()))?;
        let mut cmd = Command::new(self.bin_dir.join("vllm-router"));
        cmd.arg("run")
            .arg("--config")
            .arg(&config)
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--log-level",
                log_level,
            ])
            .arg("--log-dir")
            .arg(self.work.join(format!("{name}-logs")));
        let (proc, addr) = Proc::spawn_listening(cmd, name, &self.work)?;
        Ok(Router { proc, addr })
    }

    /// nginx in front of `upstream`, or `None` (said on stdout) when it is not installed.
    pub(crate) fn nginx(&self, upstream: SocketAddr) -> Result<Option<Nginx>, String> {
        let Some(bin) = find_in_path("nginx") else {
            println!("nginx not installed: skipping");
            return Ok(None);
        };
        let dir = self.work.join("nginx");
        fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let port = free_port()?;
        let conf = NGINX_TEMPLATE
            .replace("{{DIR}}", &dir.to_string_lossy())
            .replace("{{LISTEN}}", &format!("127.0.0.1:{port}"))
            .replace("{{UPSTREAM}}", &upstream.to_string());
        let conf_path = dir.join("nginx.conf");
        fs::write(&conf_path, conf).map_err(|e| format!("cannot write nginx.conf: {e}"))?;
        let mut cmd = Command::new(bin);
        cmd.arg("-c")
            .arg(&conf_path)
            .arg("-p")
            .arg(&dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .args(["-g", "daemon off;"])
            .stdout(Stdio::null());
        let proc = Proc::spawn(cmd, "nginx", &self.work)?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        wait_until(Duration::from_secs(10), "nginx to answer /health", || {
            http_get(addr, "/health").is_ok_and(|(s, _)| s == 200)
        })?;
        println!(
            "nginx {} in front of the mock, config {}",
            nginx_version(),
            conf_path.display()
        );
        Ok(Some(Nginx { proc, addr }))
    }

    pub(crate) fn write_json(&self, report: &Report) -> Result<PathBuf, String> {
        let dir = self
            .bin_dir
            .parent()
            .ok_or("no target directory")?
            .join("bench");
        fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let path = dir.join("latest.json");
        let json = serde_json::to_string_pretty(report).map_err(|e| e.to_string())?;
        fs::write(&path, json + "\n")
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        Ok(path)
    }
}

impl Drop for Env {
    /// Removes the scratch directory (configs, logs), unless `BENCH_KEEP` is set.
    fn drop(&mut self) {
        if std::env::var_os("BENCH_KEEP").is_some() {
            println!("scratch directory kept: {}", self.work.display());
        } else {
            let _ = fs::remove_dir_all(&self.work);
        }
    }
}

/// A child process, stopped (SIGTERM, then SIGKILL) when dropped.
pub(crate) struct Proc {
    pub(crate) name: String,
    pub(crate) proc: process::Proc,
}

impl Proc {
    /// Starts `cmd` with its stderr in `<work>/<name>.stderr`.
    pub(crate) fn spawn(mut cmd: Command, name: &str, work: &Path) -> Result<Proc, String> {
        Proc::log_stderr(&mut cmd, name, work)?;
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        Ok(Proc {
            name: name.to_owned(),
            proc: process::Proc(child),
        })
    }

    pub(crate) fn log_stderr(cmd: &mut Command, name: &str, work: &Path) -> Result<(), String> {
        let log = work.join(format!("{name}.stderr"));
        let stderr =
            fs::File::create(&log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        cmd.stdin(Stdio::null()).stderr(stderr);
        Ok(())
    }

    /// Starts `cmd` and reads the `listening on ADDR` line it prints first.
    pub(crate) fn spawn_listening(
        mut cmd: Command,
        name: &str,
        work: &Path,
    ) -> Result<(Proc, SocketAddr), String> {
        Proc::log_stderr(&mut cmd, name, work)?;
        match process::spawn_listening(cmd, name) {
            Ok((proc, addr)) => Ok((
                Proc {
                    name: name.to_owned(),
                    proc,
                },
                addr,
            )),
            Err(e) => {
                let log = work.join(format!("{name}.stderr"));
                let why = fs::read_to_string(&log).unwrap_or_default();
                Err(format!("{e}: {}", why.trim()))
            }
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.proc.pid()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SIGTERM lets nginx's master stop its workers; SIGKILL would orphan them.
        if !self.proc.terminate(Duration::from_secs(5)) {
            eprintln!("bench: {} did not stop on SIGTERM; killing it", self.name);
        }
    }
}

pub(crate) struct Mock {
    pub(crate) proc: Proc,
    pub(crate) addr: SocketAddr,
}

pub(crate) struct Router {
    pub(crate) proc: Proc,
    pub(crate) addr: SocketAddr,
}

impl Router {
    pub(crate) fn wait_ready(&self, timeout: Duration) -> Result<(), String> {
        wait_until(timeout, "the router's /readyz", || {
            http_get(self.addr, "/readyz").is_ok_and(|(s, _)| s == 200)
        })
    }

    pub(crate) fn wait_healthy(&self, n: usize, timeout: Duration) -> Result<(), String> {
        wait_until(timeout, &format!("{n} healthy backends"), || {
            get_json(self.addr, "/health")
                .ok()
                .and_then(|h| h["healthy_servers"].as_u64())
                == Some(n as u64)
        })
    }
}

pub(crate) struct Nginx {
    pub(crate) proc: Proc,
    pub(crate) addr: SocketAddr,
}

impl Nginx {
    /// The worker processes, where nginx does its work.
    pub(crate) fn worker_pids(&self) -> Vec<u32> {
        let master = self.proc.pid();
        procfs::children(master)
    }
}

/// A `servers.toml` for these backends.
pub(crate) fn servers_toml(backends: &[SocketAddr], cap: usize, queue: usize) -> String {
    let servers: Vec<String> = backends
        .iter()
        .map(|a| format!("    {{ url = \"http://{a}\", max_concurrent_requests = {cap} }},"))
        .collect();
    format!(
        "[servers]\nservers = [\n{}\n]\n\n[config]\nmax_queue_size = {queue}\nqueue_timeout = 60\nrequest_timeout = 60\n",
        servers.join("\n")
    )
}

/// Polls every millisecond, not the harness's 10: the start-up figures are read
/// through it.
pub(crate) fn wait_until(
    timeout: Duration,
    what: &str,
    mut ok: impl FnMut() -> bool,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    while !ok() {
        if Instant::now() > deadline {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

pub(crate) fn free_port() -> Result<u16, String> {
    process::free_port().map_err(|e| format!("cannot find a free port: {e}"))
}

pub(crate) fn find_in_path(bin: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = ["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from);
    std::env::split_paths(&path)
        .chain(extra)
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

pub(crate) fn nginx_version() -> String {
    let out = Command::new(find_in_path("nginx").unwrap_or_default())
        .arg("-v")
        .output();
    out.map(|o| String::from_utf8_lossy(&o.stderr).trim().to_owned())
        .unwrap_or_default()
}

pub(crate) fn command_output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned())
}

pub(crate) fn file_size(path: &Path) -> u64 {
    fs::metadata(path).map_or(0, |m| m.len())
}
