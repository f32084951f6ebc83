//! The command line: subcommands and flags (argh), and how a setting is resolved from
//! its four sources. A flag beats an environment variable, which beats the config
//! file, which beats the default. The defaults are not kept here: they are the ones
//! beside `impl Default for Settings` (`Settings::DEFAULT_HOST` and the rest).

use std::path::PathBuf;

use argh::FromArgs;
use log::LevelFilter;

use crate::control::config::{self, Settings};

#[derive(FromArgs, Debug)]
/// A router in front of vLLM OpenAI-compatible servers. Without a subcommand, `run`.
pub struct Cli {
    /// print the version and exit
    #[argh(switch)]
    pub version: bool,
    #[argh(subcommand)]
    pub command: Option<Command>,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
pub enum Command {
    Run(RunArgs),
    CheckConfig(CheckConfigArgs),
    Healthcheck(HealthcheckArgs),
    Top(TopArgs),
}

#[derive(FromArgs, Debug, Default)]
/// Start the router.
#[argh(subcommand, name = "run")]
pub struct RunArgs {
    /// config file (env CONFIG_PATH, default ./servers.toml)
    #[argh(option)]
    pub config: Option<PathBuf>,
    /// address to listen on (env HOST, default 0.0.0.0)
    #[argh(option)]
    pub host: Option<String>,
    /// port to listen on, 0 for any free port (env PORT, default 8888)
    #[argh(option)]
    pub port: Option<u16>,
    /// also write logs to the console (env LOG_TO_CONSOLE)
    #[argh(switch)]
    pub console: bool,
    /// log level: error, warn, info, debug or trace (env LOG_LEVEL, default info)
    #[argh(option)]
    pub log_level: Option<String>,
    /// directory for log files (env LOG_DIR, default ./logs)
    #[argh(option)]
    pub log_dir: Option<PathBuf>,
    /// write the process id to this file, and remove it on exit
    #[argh(option)]
    pub pid_file: Option<PathBuf>,
}

#[derive(FromArgs, Debug)]
/// Check a config file and print a summary; exit non-zero when it is not valid.
#[argh(subcommand, name = "check-config")]
pub struct CheckConfigArgs {
    /// config file (env CONFIG_PATH, default ./servers.toml)
    #[argh(option)]
    pub config: Option<PathBuf>,
}

#[derive(FromArgs, Debug, Default)]
/// Probe a running router's /livez on loopback: exit 0 on 200, 1 otherwise. For container
/// health checks (no shell or curl needed).
#[argh(subcommand, name = "healthcheck")]
pub struct HealthcheckArgs {
    /// full URL to probe (default http://127.0.0.1:PORT/livez)
    #[argh(option)]
    pub url: Option<String>,
    /// port of the router on 127.0.0.1 (env PORT, default 8888)
    #[argh(option)]
    pub port: Option<u16>,
    /// seconds to wait for the answer (default 3)
    #[argh(option, default = "3.0")]
    pub timeout: f64,
}

#[derive(FromArgs, Debug, Default)]
/// A live view of a running router in the terminal: backends, load, TTFT, tokens,
/// the queue and rejections, refreshed every second. q quits.
#[argh(subcommand, name = "top")]
pub struct TopArgs {
    /// the router's URL (default http://127.0.0.1:PORT, PORT from the env or 8888)
    #[argh(option)]
    pub url: Option<String>,
    /// API key for protected status endpoints (env API_KEY, which keeps it out of ps)
    #[argh(option)]
    pub api_key: Option<String>,
}

/// The router `top` watches: `--url`, else 127.0.0.1 at PORT, else 8888 (PORT=0, any
/// free port, cannot be watched and falls back to 8888).
pub fn top_url(args: &TopArgs, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    if let Some(url) = &args.url {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(format!("--url {url:?} must start with http:// or https://"));
        }
        return Ok(url.clone());
    }
    let port = match env("PORT") {
        Some(p) => p
            .trim()
            .parse::<u16>()
            .map_err(|_| format!("PORT={p:?} is not a port number (0 to 65535)"))?,
        None => Settings::DEFAULT_PORT,
    };
    let port = if port == 0 {
        Settings::DEFAULT_PORT
    } else {
        port
    };
    Ok(format!("http://127.0.0.1:{port}"))
}

/// The URL `healthcheck` probes: `--url`, else `/livez` on 127.0.0.1 at `--port`, else
/// PORT, else 8888. PORT=0 (any free port) cannot be probed and falls back to 8888.
pub fn healthcheck_url(
    args: &HealthcheckArgs,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, String> {
    if let Some(url) = &args.url {
        return Ok(url.clone());
    }
    let port = match (args.port, env("PORT")) {
        (Some(p), _) => p,
        (None, Some(p)) => p
            .trim()
            .parse()
            .map_err(|_| format!("PORT={p:?} is not a port number (0 to 65535)"))?,
        (None, None) => Settings::DEFAULT_PORT,
    };
    let port = if port == 0 {
        Settings::DEFAULT_PORT
    } else {
        port
    };
    Ok(format!("http://127.0.0.1:{port}/livez"))
}

/// Puts `run` in front of arguments that name no subcommand, so that
/// `vllm-router --port 9000` means `vllm-router run --port 9000`.
pub fn with_default_subcommand(args: &[String]) -> Vec<String> {
    let needs_run = match args.first().map(String::as_str) {
        None => true,
        Some(
            "run" | "check-config" | "healthcheck" | "top" | "help" | "--help" | "-h" | "--version",
        ) => false,
        Some(_) => true,
    };
    let mut out = Vec::with_capacity(args.len() + 1);
    if needs_run {
        out.push("run".to_owned());
    }
    out.extend_from_slice(args);
    out
}

/// The config file path: flag, then CONFIG_PATH, then ./servers.toml.
pub fn config_path(flag: Option<PathBuf>, env: &dyn Fn(&str) -> Option<String>) -> PathBuf {
    flag.or_else(|| env("CONFIG_PATH").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(Settings::DEFAULT_CONFIG_PATH))
}

/// Everything `run` needs besides the config file, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSettings {
    pub host: String,
    pub port: u16,
    pub console: bool,
    pub log_level: LevelFilter,
    pub log_dir: PathBuf,
}

/// Resolves host, port and logging from flag, environment, file and default.
pub fn resolve(
    args: &RunArgs,
    env: &dyn Fn(&str) -> Option<String>,
    file: &Settings,
) -> Result<RunSettings, String> {
    let host = args
        .host
        .clone()
        .or_else(|| env("HOST"))
        .or_else(|| file.host.clone())
        .unwrap_or_else(|| Settings::DEFAULT_HOST.to_owned());
    if !config::valid_host(&host) {
        return Err(format!("host {host:?} is not an IP address or hostname"));
    }
    let port = match (args.port, env("PORT")) {
        (Some(p), _) => p,
        (None, Some(p)) => p
            .trim()
            .parse()
            .map_err(|_| format!("PORT={p:?} is not a port number (0 to 65535)"))?,
        (None, None) => file.port.unwrap_or(Settings::DEFAULT_PORT),
    };
    let console = args.console
        || match env("LOG_TO_CONSOLE") {
            None => false,
            Some(v) => parse_bool(&v)
                .ok_or_else(|| format!("LOG_TO_CONSOLE={v:?} is not true or false"))?,
        };
    let log_level = match (&args.log_level, env("LOG_LEVEL")) {
        (Some(l), _) => config::parse_log_level(l).ok_or_else(|| {
            format!("--log-level {l:?} is not one of error, warn, info, debug, trace")
        })?,
        (None, Some(l)) => config::parse_log_level(&l).ok_or_else(|| {
            format!("LOG_LEVEL={l:?} is not one of error, warn, info, debug, trace")
        })?,
        (None, None) => file.log_level.unwrap_or(Settings::DEFAULT_LOG_LEVEL),
    };
    let log_dir = args
        .log_dir
        .clone()
        .or_else(|| env("LOG_DIR").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(Settings::DEFAULT_LOG_DIR));
    Ok(RunSettings {
        host,
        port,
        console,
        log_level,
        log_dir,
    })
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" | "" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn a_flag_beats_env_beats_file_beats_default() {
        let file = Settings {
            host: Some("10.0.0.1".into()),
            port: Some(7000),
            ..Settings::default()
        };
        let none = RunArgs::default();
        let flags = RunArgs {
            host: Some("127.0.0.1".into()),
            port: Some(9000),
            ..RunArgs::default()
        };
        let env = env_of(&[("HOST", "::1"), ("PORT", "8000")]);
        let r = resolve(&flags, &env, &file).expect("valid");
        assert_eq!((r.host.as_str(), r.port), ("127.0.0.1", 9000));
        let r = resolve(&none, &env, &file).expect("valid");
        assert_eq!((r.host.as_str(), r.port), ("::1", 8000));
        let r = resolve(&none, &env_of(&[]), &file).expect("valid");
        assert_eq!((r.host.as_str(), r.port), ("10.0.0.1", 7000));
        let r = resolve(&none, &env_of(&[]), &Settings::default()).expect("valid");
        let defaults = (Settings::DEFAULT_HOST, Settings::DEFAULT_PORT);
        assert_eq!((r.host.as_str(), r.port), defaults);
        assert_eq!(r.log_level, LevelFilter::Info);
        assert!(!r.console);
    }

    #[test]
    fn bad_environment_values_are_errors() {
        let none = RunArgs::default();
        let file = Settings::default();
        assert!(resolve(&none, &env_of(&[("PORT", "http")]), &file).is_err());
        assert!(resolve(&none, &env_of(&[("LOG_LEVEL", "loud")]), &file).is_err());
        assert!(resolve(&none, &env_of(&[("LOG_TO_CONSOLE", "maybe")]), &file).is_err());
        assert!(resolve(&none, &env_of(&[("HOST", "bad host")]), &file).is_err());
        let r = resolve(
            &none,
            &env_of(&[("LOG_LEVEL", "debug"), ("LOG_TO_CONSOLE", "TRUE")]),
            &file,
        )
        .expect("ok");
        assert_eq!((r.log_level, r.console), (LevelFilter::Debug, true));
    }

    #[test]
    fn run_is_the_default_subcommand() {
        let args = |a: &[&str]| {
            with_default_subcommand(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        };
        assert_eq!(args(&[]), ["run"]);
        assert_eq!(args(&["--port", "1"]), ["run", "--port", "1"]);
        assert_eq!(args(&["check-config"]), ["check-config"]);
        assert_eq!(args(&["--version"]), ["--version"]);
        assert_eq!(args(&["healthcheck"]), ["healthcheck"]);
    }

    #[test]
    fn healthcheck_probes_livez_on_loopback() {
        let none = HealthcheckArgs {
            timeout: 3.0,
            ..HealthcheckArgs::default()
        };
        let url = |a: &HealthcheckArgs, e| healthcheck_url(a, &e).expect("valid");
        assert_eq!(url(&none, env_of(&[])), "http://127.0.0.1:8888/livez");
        assert_eq!(
            url(&none, env_of(&[("PORT", "9000")])),
            "http://127.0.0.1:9000/livez"
        );
        assert_eq!(
            url(&none, env_of(&[("PORT", "0")])),
            "http://127.0.0.1:8888/livez"
        );
        let port = HealthcheckArgs {
            port: Some(7000),
            ..HealthcheckArgs::default()
        };
        assert_eq!(
            url(&port, env_of(&[("PORT", "9000")])),
            "http://127.0.0.1:7000/livez"
        );
        let full = HealthcheckArgs {
            url: Some("http://[::1]:8888/readyz".into()),
            ..HealthcheckArgs::default()
        };
        assert_eq!(url(&full, env_of(&[])), "http://[::1]:8888/readyz");
        assert!(healthcheck_url(&none, &env_of(&[("PORT", "x")])).is_err());
    }

    #[test]
    fn top_watches_loopback_at_port_unless_told_a_url() {
        let none = TopArgs::default();
        let url = |a: &TopArgs, e| top_url(a, &e).expect("valid");
        assert_eq!(url(&none, env_of(&[])), "http://127.0.0.1:8888");
        assert_eq!(
            url(&none, env_of(&[("PORT", "9000")])),
            "http://127.0.0.1:9000"
        );
        assert_eq!(
            url(&none, env_of(&[("PORT", "0")])),
            "http://127.0.0.1:8888"
        );
        let given = TopArgs {
            url: Some("http://10.0.0.5:8888/".into()),
            ..TopArgs::default()
        };
        assert_eq!(url(&given, env_of(&[])), "http://10.0.0.5:8888/");
        let bad = TopArgs {
            url: Some("10.0.0.5:8888".into()),
            ..TopArgs::default()
        };
        assert!(top_url(&bad, &env_of(&[])).is_err());
        assert!(top_url(&none, &env_of(&[("PORT", "x")])).is_err());
        assert_eq!(with_default_subcommand(&["top".into()]), ["top"]);
    }

    #[test]
    fn config_path_comes_from_flag_then_env_then_default() {
        let env = env_of(&[("CONFIG_PATH", "/etc/vllm-router/servers.toml")]);
        assert_eq!(
            config_path(Some("x.toml".into()), &env),
            PathBuf::from("x.toml")
        );
        assert_eq!(
            config_path(None, &env),
            PathBuf::from("/etc/vllm-router/servers.toml")
        );
        assert_eq!(
            config_path(None, &env_of(&[])),
            PathBuf::from(Settings::DEFAULT_CONFIG_PATH)
        );
    }

    /// argh's help text cannot be computed, so it repeats the defaults: this keeps it
    /// saying the ones in force.
    #[test]
    fn help_states_the_defaults_in_force() {
        // argh wraps long lines: compare with runs of whitespace as one space.
        let help = |sub: &str| match Cli::from_args(&["vllm-router"], &[sub, "--help"]) {
            Err(early) => early
                .output
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" "),
            Ok(_) => panic!("--help parsed as a run"),
        };
        let run = help("run");
        let level = Settings::DEFAULT_LOG_LEVEL.as_str().to_lowercase();
        for stated in [
            format!("env CONFIG_PATH, default {}", Settings::DEFAULT_CONFIG_PATH),
            format!("env HOST, default {}", Settings::DEFAULT_HOST),
            format!("env PORT, default {}", Settings::DEFAULT_PORT),
            format!("env LOG_LEVEL, default {level}"),
            format!("env LOG_DIR, default {}", Settings::DEFAULT_LOG_DIR),
        ] {
            assert!(run.contains(&stated), "no {stated:?} in\n{run}");
        }
        let check = help("check-config");
        let stated = format!("default {}", Settings::DEFAULT_CONFIG_PATH);
        assert!(check.contains(&stated), "no {stated:?} in\n{check}");
        let probe = help("healthcheck");
        let stated = format!("env PORT, default {}", Settings::DEFAULT_PORT);
        assert!(probe.contains(&stated), "no {stated:?} in\n{probe}");
    }
}
