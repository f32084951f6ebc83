//! Where log lines go: the console (stderr) when asked for, `vllm-router.log` (human
//! lines) and `vllm-router-structured.log` (one JSON object per line, for `jq`) in the
//! log directory.
//!
//! What each level holds:
//! - error: the router cannot serve (listener gone, handler panic).
//! - warn: configuration or backend trouble an operator should look at.
//! - info: start-up, shutdown, and other events that happen once.
//! - debug: one line per request and per phase outcome.
//! - trace: wire-level detail.
//! - target `access`, info: one line per proxied request, its facts as kv fields.
//!
//! Only targets under `vllm_router` and `access` are written (ureq's per-request debug
//! lines stay out). kv fields (`log::info!(target: "access", status = 200u16; "...")`)
//! become top-level JSON fields (bools and numbers typed, the rest strings; a key named
//! time, level, message or target becomes `field_<key>`) and ` key=value` on human lines.
//!
//! Never pass an Authorization header, an API key or prompt text to the logger, as
//! message or kv field: nothing here can tell a secret from a model name, so keeping
//! them out is every caller's job, at every level.
//!
//! Rotation: logrotate renames the files and sends SIGUSR1, whose handler calls
//! [`LogHandle::reopen`]. Each line reaches its file in one `write` under the file's
//! mutex, so lines from many threads never interleave nor straddle two files.

use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::kv::{Error as KvError, Key, Value, VisitSource};
use log::{LevelFilter, Log, Metadata, Record};
use parking_lot::Mutex;
use simplelog::{ConfigBuilder, WriteLogger};

/// The human-readable log file inside the log directory.
pub const LOG_FILE: &str = "vllm-router.log";
/// The JSON-lines log file inside the log directory.
pub const STRUCTURED_LOG_FILE: &str = "vllm-router-structured.log";
/// The target of the one-line-per-proxied-request log.
pub const ACCESS_TARGET: &str = "access";

/// Kept by whoever handles SIGUSR1; cheap to clone.
#[derive(Clone)]
pub struct LogHandle {
    files: [ReopenableFile; 2],
}

impl LogHandle {
    /// Reopens both log files by path, after logrotate renamed them. A file that cannot
    /// be reopened keeps receiving lines at its old (renamed) place.
    pub fn reopen(&self) -> Result<(), String> {
        let errors: Vec<String> = self.files.iter().filter_map(|f| f.reopen().err()).collect();
        errors
            .is_empty()
            .then_some(())
            .ok_or_else(|| errors.join("; "))
    }

    /// Lines that could not be written to a log file (disk full, ...), since start.
    pub fn write_errors(&self) -> u64 {
        let counts = self.files.iter().map(|f| f.errors.load(Ordering::Relaxed));
        counts.sum()
    }
}

/// Installs the global logger. Called once, by `main`, before any thread starts.
pub fn init(level: LevelFilter, console: bool, dir: &Path) -> Result<LogHandle, String> {
    let (logger, handle) = build(level, console, dir)?;
    log::set_boxed_logger(Box::new(logger))
        .map_err(|e| format!("cannot install the logger: {e}"))?;
    log::set_max_level(level);
    Ok(handle)
}

fn build(level: LevelFilter, console: bool, dir: &Path) -> Result<(Fanout, LogHandle), String> {
    fs::create_dir_all(dir)
        .map_err(|e| format!("cannot create log directory {}: {e}", dir.display()))?;
    let human = ReopenableFile::open(dir.join(LOG_FILE))?;
    let structured = ReopenableFile::open(dir.join(STRUCTURED_LOG_FILE))?;
    let config = ConfigBuilder::new()
        .set_time_format_rfc3339()
        .set_thread_level(LevelFilter::Off)
        .set_target_level(LevelFilter::Off)
        .build();
    let mut humans: Vec<Box<dyn Log>> = Vec::new();
    if console {
        // Buffered so a line leaves in one write at flush, like the file's.
        let stderr = BufWriter::new(io::stderr());
        humans.push(WriteLogger::new(level, config.clone(), stderr));
    }
    let writer = LineWriter(human.clone(), Vec::new());
    humans.push(WriteLogger::new(level, config, writer));
    let handle = LogHandle {
        files: [human, structured.clone()],
    };
    let fanout = Fanout {
        level,
        humans,
        structured,
    };
    Ok((fanout, handle))
}

/// The installed logger: filters once, then feeds the simplelog loggers (human lines)
/// and writes the JSON line itself.
struct Fanout {
    level: LevelFilter,
    humans: Vec<Box<dyn Log>>,
    structured: ReopenableFile,
}

impl Log for Fanout {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        let target = metadata.target();
        metadata.level() <= self.level
            && (target.starts_with("vllm_router") || target == ACCESS_TARGET)
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let kvs = key_values(record);
        // Rendered once, before any lock is taken: a caller's Display that panics cannot
        // poison simplelog's mutex. simplelog prints only the message, so kv rides in it.
        let message = record.args().to_string();
        let human = format!("{message}{}", human_suffix(&kvs));
        self.log_human(&record.to_builder().args(format_args!("{human}")).build());
        let line = json_line(record, &message, &kvs, SystemTime::now());
        self.structured.write_line(&line);
    }

    fn flush(&self) {
        self.humans.iter().for_each(|h| h.flush());
    }
}

impl Fanout {
    fn log_human(&self, record: &Record<'_>) {
        for human in &self.humans {
            human.log(record);
            // simplelog writes a line in many small writes; flush sends it out whole.
            human.flush();
        }
    }
}

/// A log file that can be reopened by path while other threads write to it.
#[derive(Clone)]
struct ReopenableFile {
    path: Arc<PathBuf>,
    file: Arc<Mutex<File>>,
    errors: Arc<AtomicU64>,
}

impl ReopenableFile {
    fn open(path: PathBuf) -> Result<Self, String> {
        let file = Arc::new(Mutex::new(open_append(&path)?));
        Ok(Self {
            path: Arc::new(path),
            file,
            errors: Arc::default(),
        })
    }

    fn reopen(&self) -> Result<(), String> {
        let new = open_append(&self.path)?;
        // Swapped under the mutex every write takes, so a line goes wholly to one file;
        // the old file is closed after the lock is released.
        let old = std::mem::replace(&mut *self.file.lock(), new);
        drop(old);
        Ok(())
    }

    /// Writes one whole line; a failure is counted, never raised: logging must not stop
    /// the router.
    fn write_line(&self, line: &[u8]) {
        if self.file.lock().write_all(line).is_err() {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn open_append(path: &Path) -> Result<File, String> {
    let mut options = OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o644);
    let opened = options.open(path);
    opened.map_err(|e| format!("cannot open log file {}: {e}", path.display()))
}

/// simplelog's writer: collects the pieces of a line and hands them to the file in one
/// write at `flush` (WriteLogger's own mutex keeps one record's pieces together).
struct LineWriter(ReopenableFile, Vec<u8>);

impl Write for LineWriter {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.1.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.1.is_empty() {
            self.0.write_line(&self.1);
            self.1.clear();
        }
        Ok(())
    }
}

type Fields = Vec<(String, serde_json::Value)>;

/// The record's kv pairs, typed for JSON: bools and numbers as such, the rest as text.
fn key_values(record: &Record<'_>) -> Fields {
    struct Collect(Fields);
    impl<'kvs> VisitSource<'kvs> for Collect {
        fn visit_pair(&mut self, key: Key<'kvs>, value: Value<'kvs>) -> Result<(), KvError> {
            let json = if let Some(b) = value.to_bool() {
                b.into()
            } else if let Some(n) = value.to_u64() {
                n.into()
            } else if let Some(n) = value.to_i64() {
                n.into()
            } else if let Some(n) = value.to_f64().and_then(serde_json::Number::from_f64) {
                n.into()
            } else {
                value.to_string().into()
            };
            self.0.push((key.as_str().to_string(), json));
            Ok(())
        }
    }
    let mut collect = Collect(Vec::new());
    let _ = record.key_values().visit(&mut collect);
    collect.0
}

/// ` key=value` per pair; values with spaces, quotes or `=` are quoted so the line
/// stays splittable, and so are values with control characters, which quoting
/// escapes (`\u{1b}`): a field may come from a client (the `model` of a request
/// body), and a raw ESC would reach the terminal of whoever reads the log.
fn human_suffix(kvs: &Fields) -> String {
    let mut out = String::new();
    for (key, value) in kvs {
        let text = match value {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let quote = text.is_empty()
            || text.contains(|c: char| c.is_whitespace() || c.is_control() || "\"=".contains(c));
        let _ = match quote {
            true => write!(out, " {key}={text:?}"),
            false => write!(out, " {key}={text}"),
        };
    }
    out
}

/// One JSON object and its newline: time, level, message, target, then the kv fields
/// (a key that would shadow one of the first four gets a `field_` prefix).
fn json_line(record: &Record<'_>, message: &str, kvs: &Fields, now: SystemTime) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.push(b'{');
    push_field(&mut out, "time", &rfc3339_micros(now).into());
    push_field(&mut out, "level", &record.level().as_str().into());
    push_field(&mut out, "message", &message.into());
    push_field(&mut out, "target", &record.target().into());
    for (key, value) in kvs {
        match ["time", "level", "message", "target"].contains(&key.as_str()) {
            true => push_field(&mut out, &format!("field_{key}"), value),
            false => push_field(&mut out, key, value),
        }
    }
    out.extend_from_slice(b"}\n");
    out
}

fn push_field(out: &mut Vec<u8>, key: &str, value: &serde_json::Value) {
    if out.len() > 1 {
        out.push(b',');
    }
    // Serialising a str or a Value into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, key);
    out.push(b':');
    let _ = serde_json::to_writer(&mut *out, value);
}

/// `2026-11-27T01:02:03.123456Z`; instants before 1970 (a broken clock) print as the epoch.
fn rfc3339_micros(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let (secs, micros) = (since.as_secs(), since.subsec_micros());
    let (year, month, day) = civil_from_days(secs / 86_400);
    let (h, m, s) = (secs % 86_400 / 3600, secs % 3600 / 60, secs % 60);
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{micros:06}Z")
}

/// Days since 1970-01-01 to (year, month, day): Howard Hinnant's `civil_from_days`, on
/// unsigned numbers since the input is never before the epoch.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468; // days since 0000-03-01
    let era = z / 146_097;
    let doe = z % 146_097; // day of the 400-year era
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // day of the March-based year
    let mp = (5 * doy + 2) / 153; // March = 0
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + u64::from(month <= 2), month, day)
}

/// A problem of the accept loop or of starting workers, logged at most every `TROUBLE_EVERY`: under a flood
/// of connections the same line would otherwise be written thousands of times.
#[derive(Default)]
pub struct Trouble {
    last: Option<Instant>,
    unreported: u64,
}

const TROUBLE_EVERY: Duration = Duration::from_secs(10);

impl Trouble {
    pub fn report(&mut self, what: &str) {
        if self.last.is_some_and(|t| t.elapsed() < TROUBLE_EVERY) {
            self.unreported += 1;
            return;
        }
        let more = std::mem::take(&mut self.unreported);
        if more > 0 {
            log::warn!("{what} ({more} more problems since the last report)");
        } else {
            log::warn!("{what}");
        }
        self.last = Some(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use log::kv::Source;
    use std::fmt;
    use std::time::Duration;

    fn at(secs: u64, micros: u32) -> String {
        rfc3339_micros(UNIX_EPOCH + Duration::new(secs, micros * 1000 + 999))
    }

    #[test]
    fn rfc3339_known_instants() {
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(at(951_868_799, 1), "2000-02-29T23:59:59.000001Z");
        assert_eq!(at(1_709_210_096, 789_012), "2024-02-29T12:34:56.789012Z");
        assert_eq!(at(946_684_799, 0), "1999-12-31T23:59:59.000000Z");
        assert_eq!(at(1_795_741_323, 123_456), "2026-11-27T01:02:03.123456Z");
        assert_eq!(
            rfc3339_micros(UNIX_EPOCH - Duration::from_secs(5)),
            at(0, 0)
        );
    }

    fn record<'a>(args: fmt::Arguments<'a>, target: &'a str, kvs: &'a dyn Source) -> Record<'a> {
        let level = log::Level::Info;
        Record::builder()
            .args(args)
            .level(level)
            .target(target)
            .key_values(kvs)
            .build()
    }

    #[test]
    fn json_line_has_the_fields_and_typed_kv() {
        let kvs: [(&str, Value); 6] = [
            ("request_id", Value::from("abc")),
            ("status", Value::from(200u16)),
            ("retried", Value::from(false)),
            ("delta", Value::from(-3i64)),
            ("time", Value::from(1.5f64)),
            ("model", Value::from("a \"b\"")),
        ];
        let record = &record(format_args!("GET / 200\n\"x\""), "access", &kvs);
        let fields = key_values(record);
        let now = UNIX_EPOCH + Duration::from_micros(1_795_741_323_123_456);
        let line = json_line(record, &record.args().to_string(), &fields, now);
        assert_eq!(line.iter().position(|&b| b == b'\n'), Some(line.len() - 1));
        let json: serde_json::Value = serde_json::from_slice(&line).expect("valid JSON");
        let expected = serde_json::json!({
            "time": "2026-11-27T01:02:03.123456Z", "level": "INFO", "message": "GET / 200\n\"x\"",
            "target": "access", "request_id": "abc", "status": 200, "retried": false,
            "delta": -3, "field_time": 1.5, "model": "a \"b\"",
        });
        assert_eq!(json, expected);
        let suffix =
            r#" request_id=abc status=200 retried=false delta=-3 time=1.5 model="a \"b\"""#;
        assert_eq!(human_suffix(&fields), suffix);
    }

    #[test]
    fn control_characters_in_a_field_are_escaped_on_human_lines() {
        let fields: Fields = [
            ("model", "a\u{1b}[31mb"),
            ("path", "/x\u{9b}y"),
            ("agent", "line\nbreak"),
            ("plain", "mock-model"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
        .collect();
        let suffix = human_suffix(&fields);
        assert_eq!(
            suffix,
            r#" model="a\u{1b}[31mb" path="/x\u{9b}y" agent="line\nbreak" plain=mock-model"#
        );
        assert!(!suffix.contains(char::is_control), "{suffix:?}");
    }

    #[test]
    fn reopen_moves_new_lines_to_the_new_files() {
        let dir = std::env::temp_dir().join(format!("vllm-router-log-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let (logger, handle) = build(LevelFilter::Info, false, &dir).expect("build");
        let kvs = [("n", Value::from(7u8))];
        let log =
            |message: &str, target| logger.log(&record(format_args!("{message}"), target, &kvs));
        log("first", "vllm_router::server");
        log("ureq chatter", "ureq::unit");
        log("lookalike", "accessor");
        for name in [LOG_FILE, STRUCTURED_LOG_FILE] {
            fs::rename(dir.join(name), dir.join(format!("{name}.1"))).expect("rename");
        }
        log("second", ACCESS_TARGET); // still the renamed files: not reopened yet
        handle.reopen().expect("reopen");
        log("third", "vllm_router::server");
        let read = |name: &str| fs::read_to_string(dir.join(name)).expect("read");
        let old = read(&format!("{LOG_FILE}.1"));
        let old: Vec<&str> = old.lines().collect();
        assert!(
            old.len() == 2 && old[0].ends_with("[INFO] first n=7"),
            "{old:?}"
        );
        assert!(old[1].ends_with("[INFO] second n=7"), "{old:?}");
        let new = read(LOG_FILE);
        assert!(
            new.ends_with("[INFO] third n=7\n") && new.lines().count() == 1,
            "{new}"
        );
        let messages = |name: &str| -> Vec<serde_json::Value> {
            let parse = |l| serde_json::from_str::<serde_json::Value>(l).expect("JSON line");
            read(name)
                .lines()
                .map(|l| parse(l)["message"].clone())
                .collect()
        };
        assert_eq!(
            messages(&format!("{STRUCTURED_LOG_FILE}.1")),
            ["first", "second"]
        );
        assert_eq!(messages(STRUCTURED_LOG_FILE), ["third"]);
        assert_eq!(handle.write_errors(), 0);
        let _ = fs::remove_dir_all(&dir);
    }
}
