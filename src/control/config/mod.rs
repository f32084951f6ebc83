//! `servers.toml`, the router's one configuration file: what a loaded config is, and where
//! each part of reading one lives.
//!
//! The format is the one users of the original Python router already have: a `[servers]` table
//! holding `servers = [ { url, max_concurrent_requests }, ... ]`, and an optional `[config]`
//! table of tuning keys. Nothing unknown or out of range is accepted: a typo in a reloaded
//! file must keep the running config in place, not quietly change behaviour. Every problem
//! becomes one `path:line:col: message` line pointing at the offending key or value.
//!
//! - `keys`: every `[config]` key: `Settings`, all defaults (`impl Default for Settings`),
//!   the `KEYS` table, and how `check-config` shows them.
//! - `parse`: text to `Config`, walking toml's spanned tree by hand; pure, it reads no file.
//! - `checks`: the rule for each kind of value, and the rules between keys.
//! - `url`: what a backend URL may be, and its one normal form.
//! - `suggest`: "did you mean" for unknown keys.
//! - `error`: `ConfigError`, and turning byte offsets and user text into a safe message.
//! - `load`: the only file reading: `servers.toml`, then the `api_keys_file` it names.

mod checks;
mod error;
mod keys;
mod load;
mod parse;
mod suggest;
mod url;

use std::path::PathBuf;

use crate::request::auth::Secret;

pub use checks::{parse_log_level, valid_host};
pub use error::ConfigError;
pub use keys::{known_keys, Routing, Settings};
pub use load::{from_bytes, load, read};
pub use parse::parse;

/// A loaded and validated configuration file.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from.
    pub path: PathBuf,
    /// Backends in file order; never empty, URLs normalised and unique.
    pub servers: Vec<ServerConfig>,
    pub settings: Settings,
}

/// One vLLM backend.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    /// `http(s)://host[:port][/prefix]` with lower-case scheme and host and no trailing `/`.
    pub url: String,
    /// Requests sent to this server at once (1..=100000).
    pub max_concurrent_requests: u32,
    /// The key of a vLLM started with `--api-key`: sent to this server instead of the
    /// client's.
    pub api_key: Option<Secret>,
}
