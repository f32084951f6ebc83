//! Where log lines go: the console (stderr) when asked for, and `vllm-router.log` in
//! the log directory.
//!
//! What each level holds:
//! - error: the router cannot serve (listener gone, handler panic).
//! - warn: configuration or backend trouble an operator should look at.
//! - info: start-up, shutdown, and other events that happen once.
//! - debug: one line per request and per phase outcome.
//! - trace: wire-level detail.
//!
//! No level ever holds an API key, an Authorization header or prompt text.

use std::fs::{self, OpenOptions};
use std::path::Path;

use log::LevelFilter;
use simplelog::{CombinedLogger, ConfigBuilder, SharedLogger, WriteLogger};

/// The human-readable log file inside the log directory.
pub const LOG_FILE: &str = "vllm-router.log";

/// Installs the global logger. Called once, by `main`, before any thread starts.
pub fn init(level: LevelFilter, console: bool, dir: &Path) -> Result<(), String> {
    let config = ConfigBuilder::new()
        .set_time_format_rfc3339()
        .set_thread_level(LevelFilter::Off)
        .set_target_level(LevelFilter::Off)
        // ureq logs every request head at debug; the router logs what matters itself.
        .add_filter_allow_str("vllm_router")
        .build();
    let mut loggers: Vec<Box<dyn SharedLogger>> = Vec::new();
    if console {
        loggers.push(WriteLogger::new(level, config.clone(), std::io::stderr()));
    }
    fs::create_dir_all(dir)
        .map_err(|e| format!("cannot create log directory {}: {e}", dir.display()))?;
    let path = dir.join(LOG_FILE);
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| format!("cannot open log file {}: {e}", path.display()))?;
    loggers.push(WriteLogger::new(level, config, file));
    CombinedLogger::init(loggers).map_err(|e| format!("cannot install the logger: {e}"))
}
