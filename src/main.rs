//! The `vllm-router` binary: parses the command line, runs one mode, and turns its
//! result into an exit code (0 ok, 1 runtime failure, 2 bad usage or bad config).

use std::process::ExitCode;

use argh::FromArgs;

use vllm_router::cli::{self, CheckConfigArgs, Cli, Command, RunArgs};
use vllm_router::{config, health, logging, server, shared::Shared};

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
        Some(Command::Run(args)) => run(args, &env),
        None => run(RunArgs::default(), &env),
    }
}

/// `check-config`: a summary and 0 for a valid file, one error line and 2 otherwise.
fn check_config(args: CheckConfigArgs, env: &dyn Fn(&str) -> Option<String>) -> ExitCode {
    let path = cli::config_path(args.config, env);
    match config::load(&path) {
        Ok(config) => {
            println!("{}", config.summary());
            println!("worker threads: {}", server::worker_count(&config));
            println!("config OK");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
    }
}

/// `run`: loads the config (refusing to start on a bad one), then serves until killed.
fn run(args: RunArgs, env: &dyn Fn(&str) -> Option<String>) -> ExitCode {
    let path = cli::config_path(args.config.clone(), env);
    let config = match config::load(&path) {
        Ok(config) => config,
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
    if let Err(e) = logging::init(settings.log_level, settings.console, &settings.log_dir) {
        eprintln!("vllm-router: {e}");
        return ExitCode::from(1);
    }
    let workers = server::worker_count(&config);
    let n_servers = config.servers.len();
    let shared = Shared::new(config);
    if let Err(e) = health::spawn(std::sync::Arc::clone(&shared)) {
        eprintln!("vllm-router: cannot start the health thread: {e}");
        return ExitCode::from(1);
    }
    let running = match server::start(shared, &settings.host, settings.port, workers) {
        Ok(running) => running,
        Err(e) => {
            log::error!("{e}");
            eprintln!("vllm-router: {e}");
            return ExitCode::from(1);
        }
    };
    // Scripts and tests read the bound address (with --port 0) from this line.
    println!("vllm-router listening on http://{}", running.addr);
    log::info!(
        "vllm-router {} listening on {} with {workers} workers, {n_servers} backends, config {}",
        env!("CARGO_PKG_VERSION"),
        running.addr,
        path.display()
    );
    for worker in running.workers {
        let _ = worker.join();
    }
    log::error!("every worker stopped; exiting");
    ExitCode::from(1)
}
