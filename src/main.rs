//! The `vllm-router` binary: parses the command line, runs one mode, and turns its
//! result into an exit code (0 ok, 1 runtime failure, 2 bad usage or bad config).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use argh::FromArgs;

use vllm_router::backend::health;
use vllm_router::client::listener;
use vllm_router::control::cli::{
    self, CheckConfigArgs, Cli, Command, HealthcheckArgs, RunArgs, TopArgs,
};
use vllm_router::control::config;
use vllm_router::control::{logging, reload, signals};
use vllm_router::request::auth::{self, Secret};
use vllm_router::request::pool;
use vllm_router::{shared::Shared, tls};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let name = args.first().map(String::as_str).unwrap_or("vllm-router");
    let rest = cli::with_default_subcommand(&args[1.min(args.len())..]);
    let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
    let parsed = match Cli::from_args(&[name], &rest) {
        Ok(parsed) => parsed,
        Err(early) => {
            // `--help` is an early exit with status Ok; a usage error is not.
            return if early.status.is_ok() {
                println!("{}", early.output);
                ExitCode::SUCCESS
            } else {
                eprintln!("{}", early.output.trim_end());
                ExitCode::from(2)
            };
        }
    };
    if parsed.version {
        println!("vllm-router {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let env = |key: &str| std::env::var(key).ok().filter(|v| !v.is_empty());
    match parsed.command {
        Some(Command::CheckConfig(args)) => check_config(args, &env),
        Some(Command::Healthcheck(args)) => healthcheck(args, &env),
        Some(Command::Run(args)) => run(args, &env),
        Some(Command::Top(args)) => top(args, &env),
        None => run(RunArgs::default(), &env),
    }
}

/// `check-config`: a summary and 0 for a valid file, one error line and 2 otherwise.
fn check_config(args: CheckConfigArgs, env: &dyn Fn(&str) -> Option<String>) -> ExitCode {
    let path = cli::config_path(args.config, env);
    match config::load(&path) {
        Ok(config) => {
            println!("{}", config.summary());
            println!("worker threads: {}", pool::worker_count(&config));
            println!("config OK");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
    }
}

/// `healthcheck`: GET /livez of a router on loopback (or `--url`); 0 on 200, 1 on
/// anything else or no answer within `--timeout`. Used by the Docker HEALTHCHECK, where
/// the image has no shell and no curl.
fn healthcheck(args: HealthcheckArgs, env: &dyn Fn(&str) -> Option<String>) -> ExitCode {
    let url = match cli::healthcheck_url(&args, env) {
        Ok(url) => url,
        Err(e) => {
            eprintln!("vllm-router healthcheck: {e}");
            return ExitCode::from(2);
        }
    };
    if !(args.timeout.is_finite() && args.timeout > 0.0) {
        eprintln!("vllm-router healthcheck: --timeout must be a positive number of seconds");
        return ExitCode::from(2);
    }
    let timeout = std::time::Duration::from_secs_f64(args.timeout.min(3600.0));
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .timeout_global(Some(timeout))
        .build()
        .new_agent();
    match agent.get(&url).call() {
        Ok(response) if response.status() == 200 => ExitCode::SUCCESS,
        Ok(response) => {
            eprintln!("vllm-router healthcheck: {url}: {}", response.status());
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("vllm-router healthcheck: {url}: {e}");
            ExitCode::from(1)
        }
    }
}

/// `top`: the live view of a router, until q.
fn top(args: TopArgs, env: &dyn Fn(&str) -> Option<String>) -> ExitCode {
    let url = match cli::top_url(&args, env) {
        Ok(url) => url,
        Err(e) => {
            eprintln!("vllm-router top: {e}");
            return ExitCode::from(2);
        }
    };
    let key = args.api_key.or_else(|| env("API_KEY")).map(Secret::new);
    vllm_router::control::top::run(&url, key)
}

/// `run`: loads the config (refusing to start on a bad one), serves, and shuts down
/// gracefully on SIGTERM or SIGINT.
fn run(args: RunArgs, env: &dyn Fn(&str) -> Option<String>) -> ExitCode {
    let path = cli::config_path(args.config.clone(), env);
    let loaded =
        config::read(&path).and_then(|bytes| config::from_bytes(&bytes, &path).map(|c| (c, bytes)));
    let (config, source) = match loaded {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("{e}");
            eprintln!("vllm-router: refusing to start with an invalid config");
            return ExitCode::from(2);
        }
    };
    let settings = match cli::resolve(&args, env, &config.settings) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("vllm-router: {e}");
            return ExitCode::from(2);
        }
    };
    let logs = match logging::init(settings.log_level, settings.console, &settings.log_dir) {
        Ok(logs) => logs,
        Err(e) => {
            eprintln!("vllm-router: {e}");
            return ExitCode::from(1);
        }
    };
    // A panic on any thread (a request handler, say) is an error line in the log, not a backtrace on stderr;
    // the code around it decides what happens next.
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        log::error!(
            "panic on thread {}: {info}",
            thread.name().unwrap_or("unnamed")
        );
    }));
    vllm_router::client::budget::return_freed_bodies_to_the_system();
    match serve(
        config,
        source,
        &path,
        &settings,
        args.pid_file.as_deref(),
        logs,
    ) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            eprintln!("vllm-router: {e}");
            ExitCode::from(1)
        }
    }
}

fn serve(
    config: config::Config,
    source: Vec<u8>,
    path: &Path,
    settings: &cli::RunSettings,
    pid_file: Option<&Path>,
    logs: logging::LogHandle,
) -> Result<(), String> {
    let workers = pool::worker_count(&config);
    let n_servers = config.servers.len();
    let env_api_key = std::env::var("API_KEY")
        .ok()
        .filter(|k| !k.is_empty())
        .map(Secret::new);
    if env_api_key
        .as_ref()
        .is_some_and(|k| !auth::valid_key(k.expose()))
    {
        return Err("API_KEY must be a key without spaces or control characters".to_owned());
    }
    let identity = tls::server_identity(&config.settings)?;
    let shared = Shared::new(config, env_api_key)?;
    // Signals first, so a SIGTERM during start-up is not lost.
    let signals = signals::listen()?;
    health::spawn(Arc::clone(&shared))
        .map_err(|e| format!("cannot start the health thread: {e}"))?;
    let (addr, pool) = listener::start(
        Arc::clone(&shared),
        &settings.host,
        settings.port,
        identity,
        workers,
    )?;
    let _pid_file = pid_file.map(PidFile::create).transpose()?;
    reload::spawn(
        Arc::clone(&shared),
        pool,
        path.to_owned(),
        source,
        signals.reload.clone(),
    )
    .map_err(|e| format!("cannot start the reload thread: {e}"))?;
    // Scripts and tests read the bound address (with --port 0) from this line.
    let scheme = if shared.config().settings.tls_cert_file.is_some() {
        "https"
    } else {
        "http"
    };
    println!("vllm-router listening on {scheme}://{addr}");
    log::info!(
        "vllm-router {} listening on {addr} with {workers} workers, {n_servers} backends, config {}",
        env!("CARGO_PKG_VERSION"),
        path.display()
    );
    signals.serve_until_shutdown(&shared, &logs);
    Ok(())
}

/// `--pid-file`: written once the router listens, removed when it exits normally.
struct PidFile(PathBuf);

impl PidFile {
    fn create(path: &Path) -> Result<PidFile, String> {
        std::fs::write(path, format!("{}\n", std::process::id()))
            .map_err(|e| format!("cannot write pid file {}: {e}", path.display()))?;
        Ok(PidFile(path.to_owned()))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
