use std::io::{BufRead, BufReader, Read};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::support::{servers_toml, test_dir, wait_until, ROUTER};

/// Generous bound for a process that should exit (or start listening) at once.
const PROMPTLY: Duration = Duration::from_secs(30);

/// A child process killed and reaped on drop, so a failed assertion never leaks it.
use crate::support::Proc as Running;

/// What a finished process printed, and how it exited.
struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// `vllm-router ARGS` in `dir`, with an empty environment and piped output.
fn router(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(ROUTER);
    cmd.current_dir(dir)
        .env_clear()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

fn spawn(mut cmd: Command) -> Running {
    Running(cmd.spawn().expect("start vllm-router"))
}

/// Runs `cmd` until it exits, polling with a deadline; a process that does not exit
/// in time is killed and the test fails.
fn finish(cmd: Command) -> Outcome {
    let mut child = spawn(cmd);
    wait_until(PROMPTLY, "vllm-router to exit", || {
        child.0.try_wait().expect("try_wait").is_some()
    });
    let code = child.0.wait().expect("wait").code();
    let stdout = read_all(child.0.stdout.take());
    let stderr = read_all(child.0.stderr.take());
    Outcome {
        code,
        stdout,
        stderr,
    }
}

fn read_all(pipe: Option<impl Read>) -> String {
    let mut s = String::new();
    pipe.expect("piped").read_to_string(&mut s).expect("read");
    s
}

/// Starts `cmd` and returns it with the first line it prints on stdout (the listening
/// line), read with a deadline; fails with its stderr if no line comes.
fn first_line(cmd: Command) -> (Running, String) {
    let mut child = spawn(cmd);
    let stdout = child.0.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let _ = tx.send(lines.next().and_then(Result::ok));
        for _ in lines {} // keep the pipe drained
    });
    match rx.recv_timeout(PROMPTLY) {
        Ok(Some(line)) => (child, line),
        other => {
            let _ = child.0.kill();
            let mut stderr = String::new();
            let _ = child
                .0
                .stderr
                .take()
                .map(|mut e| e.read_to_string(&mut stderr));
            panic!("vllm-router printed no first line ({other:?}); stderr:\n{stderr}");
        }
    }
}

/// `n` distinct ports free on 127.0.0.1 a moment ago.
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<_> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a free port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

/// A valid config naming one (never contacted) backend, plus `[config]` lines.
fn valid_config(config_lines: &str) -> String {
    servers_toml(&[("http://127.0.0.1:9", 1)], config_lines)
}

const BASIC: &str = include_str!("fixtures/guide-basic.toml");

const PRODUCTION: &str = include_str!("fixtures/guide-production.toml");

/// The guide's Docker development file.
const DOCKER_DEV: &str = include_str!("fixtures/guide-docker-dev.toml");

/// What stderr must be for a bad file.
enum Want {
    /// Exactly this one line.
    Line(&'static str),
    /// One line starting with this.
    Prefix(&'static str),
}

/// A bad config file: the guide's basic file with one text replaced (`None`: no file at
/// all), and the error it must give.
struct BadFile {
    name: &'static str,
    edit: Option<(&'static str, &'static str)>,
    want: Want,
}

const BAD_FILES: &[BadFile] = &[
    BadFile {
        name: "typo.toml",
        edit: Some(("health_check_interval = 10", "health_check_intervall = 10")),
        want: Want::Line("typo.toml:10:1: unknown key `health_check_intervall` in [config]; did you mean `health_check_interval`?"),
    },
    BadFile {
        name: "string.toml",
        edit: Some(("health_check_interval = 10", "health_check_interval = \"10\"")),
        want: Want::Line("string.toml:10:25: health_check_interval must be a number of seconds, found string \"10\""),
    },
    BadFile {
        name: "negative.toml",
        edit: Some(("health_check_interval = 10", "health_check_interval = -10")),
        want: Want::Line("negative.toml:10:25: health_check_interval must be more than 0 seconds, found -10"),
    },
    BadFile {
        name: "ftp.toml",
        edit: Some(("http://localhost:8082", "ftp://localhost:8082")),
        want: Want::Line("ftp.toml:5:13: url \"ftp://localhost:8082\" must start with http:// or https://"),
    },
    BadFile {
        name: "zero.toml",
        edit: Some(("8082\", max_concurrent_requests = 2", "8082\", max_concurrent_requests = 0")),
        want: Want::Line("zero.toml:5:64: max_concurrent_requests must be at least 1, found 0"),
    },
    BadFile {
        name: "duplicate.toml",
        edit: Some(("localhost:8082", "localhost:8081")),
        want: Want::Line("duplicate.toml:5:13: duplicate server `http://localhost:8081` (already listed on line 4); remove one of the two entries"),
    },
    BadFile {
        name: "same-server-written-differently.toml",
        edit: Some(("http://localhost:8082", "HTTP://LocalHost:8081/")),
        want: Want::Line("same-server-written-differently.toml:5:13: duplicate server `http://localhost:8081` (already listed on line 4); remove one of the two entries"),
    },
    BadFile {
        name: "syntax.toml",
        edit: Some(("[config]", "[config")),
        want: Want::Prefix("syntax.toml:8:8: TOML syntax error: "),
    },
    BadFile {
        name: "no-servers.toml",
        edit: Some((BASIC, "")),
        want: Want::Line("no-servers.toml: no servers configured: add at least one { url, max_concurrent_requests } entry to [servers] servers"),
    },
    BadFile {
        name: "missing.toml",
        edit: None,
        want: Want::Prefix("missing.toml: cannot read config file: No such file or directory"),
    },
];

/// Writes each bad file into a fresh directory, returning it.
fn write_bad_files() -> std::path::PathBuf {
    let dir = test_dir("bad-files");
    for case in BAD_FILES {
        if let Some((from, to)) = case.edit {
            assert!(BASIC.contains(from), "{}: edit does not apply", case.name);
            std::fs::write(dir.join(case.name), BASIC.replacen(from, to, 1)).expect("write");
        }
    }
    dir
}

/// Panics unless `line` is what `case` wants.
fn assert_error_line(case: &BadFile, line: &str) {
    match case.want {
        Want::Line(want) => assert_eq!(line, want, "{}", case.name),
        Want::Prefix(want) => assert!(line.starts_with(want), "{}: {line:?}", case.name),
    }
}

#[test]
fn version_prints_the_cargo_version() {
    let out = finish(router(&test_dir("version"), &["--version"]));
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    let expected = format!("vllm-router {}\n", env!("CARGO_PKG_VERSION"));
    assert_eq!(out.stdout, expected);
    assert_eq!(out.stderr, "");
}

#[test]
fn check_config_accepts_the_guide_files() {
    let guides = [
        (
            "basic.toml",
            BASIC,
            &["http://localhost:8081", "http://localhost:8082"][..],
        ),
        (
            "production.toml",
            PRODUCTION,
            &[
                "http://gpu-server-1:8081",
                "http://gpu-server-2:8081",
                "http://gpu-server-3:8081",
                "http://gpu-server-4:8081",
                "http://backup-server-1:8081",
            ],
        ),
        (
            "docker-dev.toml",
            DOCKER_DEV,
            &[
                "http://host.docker.internal:8081",
                "http://host.docker.internal:8082",
            ],
        ),
    ];
    let dir = test_dir("guide-files");
    for (name, text, urls) in guides {
        std::fs::write(dir.join(name), text).expect("write config");
        let out = finish(router(&dir, &["check-config", "--config", name]));
        assert_eq!(out.code, Some(0), "{name}: stderr {}", out.stderr);
        assert_eq!(out.stderr, "", "{name}");
        let lines: Vec<&str> = out.stdout.lines().collect();
        assert_eq!(lines.first(), Some(&&*format!("config file: {name}")));
        assert_eq!(lines.last(), Some(&"config OK"), "{name}:\n{}", out.stdout);
        for url in urls {
            assert!(
                lines
                    .iter()
                    .any(|l| l.trim_start().starts_with(&format!("{url} "))),
                "{name}: no {url} in\n{}",
                out.stdout
            );
        }
    }
}

#[test]
fn check_config_finds_the_file_from_flag_then_config_path_then_cwd() {
    let dir = test_dir("config-path");
    let files = [
        ("servers.toml", "http://cwd-default:8000"),
        ("from-env.toml", "http://from-env:8000"),
        ("from-flag.toml", "http://from-flag:8000"),
    ];
    for (name, url) in files {
        std::fs::write(dir.join(name), servers_toml(&[(url, 1)], "")).expect("write");
    }
    let used = |args: &[&str], envs: &[(&str, &str)]| {
        let mut cmd = router(&dir, args);
        cmd.envs(envs.iter().copied());
        let out = finish(cmd);
        assert_eq!(out.code, Some(0), "{args:?} {envs:?}: {}", out.stderr);
        assert!(out.stdout.ends_with("config OK\n"), "{}", out.stdout);
        out.stdout.lines().next().unwrap_or_default().to_owned()
    };
    let env = [("CONFIG_PATH", "from-env.toml")];
    assert_eq!(used(&["check-config"], &[]), "config file: ./servers.toml");
    assert_eq!(used(&["check-config"], &env), "config file: from-env.toml");
    let flag = ["check-config", "--config", "from-flag.toml"];
    assert_eq!(used(&flag, &env), "config file: from-flag.toml");
    assert_eq!(used(&flag, &[]), "config file: from-flag.toml");
    // An empty variable counts as unset.
    let empty = [("CONFIG_PATH", "")];
    assert_eq!(
        used(&["check-config"], &empty),
        "config file: ./servers.toml"
    );

    // The path that was used is the one the error names.
    let empty_dir = test_dir("config-path-none");
    let out = finish(router(&empty_dir, &["check-config"]));
    assert_eq!(out.code, Some(2));
    assert!(
        out.stderr
            .starts_with("./servers.toml: cannot read config file: "),
        "{}",
        out.stderr
    );
    let mut cmd = router(&empty_dir, &["check-config"]);
    cmd.env("CONFIG_PATH", "nowhere.toml");
    let out = finish(cmd);
    assert_eq!(out.code, Some(2));
    assert!(
        out.stderr
            .starts_with("nowhere.toml: cannot read config file: "),
        "{}",
        out.stderr
    );
}

#[test]
fn check_config_reports_each_bad_file_on_one_located_line() {
    let dir = write_bad_files();
    for case in BAD_FILES {
        let out = finish(router(&dir, &["check-config", "--config", case.name]));
        assert_eq!(out.code, Some(2), "{}: stdout {}", case.name, out.stdout);
        assert_eq!(out.stdout, "", "{}", case.name);
        let lines: Vec<&str> = out.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{}: {:?}", case.name, out.stderr);
        assert_error_line(case, lines[0]);
    }
}

#[test]
fn run_refuses_to_start_on_a_bad_file() {
    let dir = write_bad_files();
    for case in BAD_FILES {
        let args = [
            "run",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--config",
            case.name,
        ];
        let out = finish(router(&dir, &args));
        assert_eq!(out.code, Some(2), "{}: stderr {}", case.name, out.stderr);
        assert!(
            !out.stdout.contains("listening"),
            "{}: {}",
            case.name,
            out.stdout
        );
        let first = out.stderr.lines().next().unwrap_or_default();
        assert_error_line(case, first);
    }
}

#[test]
fn run_port_comes_from_flag_then_env_then_file() {
    let ports = free_ports(3);
    let (file_port, env_port, flag_port) = (ports[0], ports[1], ports[2]);
    let dir = test_dir("port-precedence");
    let config = valid_config(&format!("host = \"127.0.0.1\"\nport = {file_port}"));
    std::fs::write(dir.join("servers.toml"), config).expect("write config");
    let listens_on = |args: &[&str], envs: &[(&str, &str)], port: u16| {
        let mut cmd = router(&dir, args);
        cmd.envs(envs.iter().copied());
        let (_child, line) = first_line(cmd);
        assert_eq!(
            line,
            format!("vllm-router listening on http://127.0.0.1:{port}"),
            "{args:?} {envs:?}"
        );
        TcpStream::connect(("127.0.0.1", port)).expect("the router accepts connections");
    };
    let port_env = env_port.to_string();
    let env = [("PORT", port_env.as_str())];
    listens_on(&["run"], &env, env_port);
    listens_on(&["run"], &[], file_port);
    let flag = flag_port.to_string();
    listens_on(&["run", "--port", &flag], &env, flag_port);
}

#[test]
fn run_rejects_bad_environment_values() {
    let dir = test_dir("bad-env");
    std::fs::write(dir.join("servers.toml"), valid_config("")).expect("write config");
    let cases = [
        (
            ("PORT", "abc"),
            "vllm-router: PORT=\"abc\" is not a port number (0 to 65535)",
        ),
        (
            ("LOG_LEVEL", "loud"),
            "vllm-router: LOG_LEVEL=\"loud\" is not one of error, warn, info, debug, trace",
        ),
    ];
    for ((key, value), expected) in cases {
        let mut cmd = router(&dir, &["run"]);
        // Should the bad value be ignored, the router listens on loopback only.
        cmd.envs([("HOST", "127.0.0.1"), ("PORT", "0")])
            .env(key, value);
        let out = finish(cmd);
        assert_eq!(out.code, Some(2), "{key}={value}: stdout {}", out.stdout);
        assert_eq!(out.stderr, format!("{expected}\n"), "{key}={value}");
        assert_eq!(out.stdout, "", "{key}={value}");
    }
}

#[test]
fn run_is_the_default_subcommand() {
    let dir = test_dir("no-subcommand");
    std::fs::write(dir.join("given.toml"), valid_config("")).expect("write config");
    let args = [
        "--config",
        "given.toml",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
    ];
    let (_child, line) = first_line(router(&dir, &args));
    let port = line
        .strip_prefix("vllm-router listening on http://127.0.0.1:")
        .and_then(|p| p.parse::<u16>().ok())
        .unwrap_or_else(|| panic!("not a listening line: {line:?}"));
    assert_ne!(port, 0);

    // No arguments at all: ./servers.toml, HOST and PORT from the environment.
    std::fs::write(dir.join("servers.toml"), valid_config("")).expect("write config");
    let mut cmd = router(&dir, &[]);
    cmd.envs([("HOST", "127.0.0.1"), ("PORT", "0")]);
    let (_child, line) = first_line(cmd);
    assert!(
        line.starts_with("vllm-router listening on http://127.0.0.1:"),
        "{line:?}"
    );
}

/// Log lines go to the console with `--console` or LOG_TO_CONSOLE=true, and not with
/// LOG_TO_CONSOLE=false; the log file gets them in every case.
#[test]
fn console_logging_follows_the_flag_and_log_to_console() {
    let dir = test_dir("console");
    std::fs::write(dir.join("servers.toml"), valid_config("")).expect("write config");
    let cases: [(&str, &[&str], Option<&str>, bool); 3] = [
        ("flag", &["--console"], None, true),
        ("env-true", &[], Some("true"), true),
        ("env-false", &[], Some("false"), false),
    ];
    for (name, flags, env, expect_console) in cases {
        let log_dir = dir.join(format!("logs-{name}"));
        let mut args = vec!["run", "--host", "127.0.0.1", "--port", "0"];
        args.extend_from_slice(flags);
        let mut cmd = router(&dir, &args);
        cmd.env("LOG_DIR", &log_dir);
        if let Some(value) = env {
            cmd.env("LOG_TO_CONSOLE", value);
        }
        let (mut child, _) = first_line(cmd);
        let log_file = log_dir.join("vllm-router.log");
        wait_until(PROMPTLY, "the start-up line in the log file", || {
            std::fs::read_to_string(&log_file).is_ok_and(|log| log.contains("listening on"))
        });
        let _ = child.0.kill();
        let _ = child.0.wait();
        let stderr = read_all(child.0.stderr.take());
        assert_eq!(
            stderr.contains("listening on"),
            expect_console,
            "{name}: console output was {stderr:?}"
        );
    }
}
