//! The reload thread: applies edits of `servers.toml` while the router serves.
//!
//! Every `config_reload_interval`, and at once on SIGHUP, it reads the file by path
//! and compares its bytes with the last version it saw, so an edit is noticed whatever
//! its mtime and however it was saved (an editor's write-and-rename included). A valid
//! new file is applied in one step: the config snapshot is swapped (`Shared::replace_config`)
//! and the server list merged into the slot table (`Table::apply_servers`). An invalid
//! one changes nothing: the router keeps serving with the old config and logs the
//! error with file, line and column, once per distinct bad version.
//!
//! The `api_keys_file` the config names is reloaded with it: a change of its keys
//! counts as a change of the config.
//!
//! It is the only writer of the config after start-up.

use std::path::PathBuf;
use std::sync::Arc;
use std::thread;

use crossbeam_channel::{Receiver, RecvTimeoutError};

use crate::control::config::{self, Config};
use crate::request::pool::{self, Pool};
use crate::shared::Shared;

/// Starts the reload thread; each message on `now` (SIGHUP) triggers a check at once.
/// `running` is the bytes the running config was parsed from, so an edit saved while
/// the router was starting is still seen as a change.
pub fn spawn(
    shared: Arc<Shared>,
    pool: Arc<Pool>,
    path: PathBuf,
    running: Vec<u8>,
    now: Receiver<()>,
) -> std::io::Result<thread::JoinHandle<()>> {
    thread::Builder::new()
        .name("reload".to_owned())
        .spawn(move || {
            let mut reloader = Reloader {
                last_seen: Some(running),
                last_bad_key_file: None,
                shared,
                pool,
                path,
            };
            loop {
                let interval = reloader.shared.config().settings.config_reload_interval;
                let forced = match now.recv_timeout(interval) {
                    Ok(()) => true,
                    Err(RecvTimeoutError::Timeout) => false,
                    Err(RecvTimeoutError::Disconnected) => return,
                };
                reloader.check(forced);
            }
        })
}

struct Reloader {
    shared: Arc<Shared>,
    pool: Arc<Pool>,
    path: PathBuf,
    /// The bytes of the last version read, applied or refused.
    last_seen: Option<Vec<u8>>,
    /// The last unreadable or invalid `api_keys_file` text seen.
    last_bad_key_file: Option<String>,
}

impl Reloader {
    fn check(&mut self, forced: bool) {
        let bytes = match config::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) => {
                if self.last_seen.take().is_some() || forced {
                    log::error!("config reload failed, keeping the running config: {e}");
                }
                return;
            }
        };
        if self.last_seen.as_deref() == Some(&bytes[..]) && !self.key_file_changed() {
            if forced {
                log::info!("config reload: {} is unchanged", self.path.display());
            }
            return;
        }
        self.last_seen = Some(bytes.clone());
        match config::from_bytes(&bytes, &self.path) {
            Ok(new) => {
                self.shared.metrics.observe_reload(true);
                self.apply(new);
            }
            Err(e) => {
                self.shared.metrics.observe_reload(false);
                log::error!("config reload failed, keeping the running config: {e}");
            }
        }
    }

    /// Whether the running config's `api_keys_file` now holds other keys (it is
    /// reloaded with the config). A broken key file counts as changed once per
    /// version, so its error is logged once.
    fn key_file_changed(&mut self) -> bool {
        let config = self.shared.config();
        let Some(file) = &config.settings.api_keys_file else {
            return false;
        };
        let base = self.path.parent().unwrap_or(std::path::Path::new("."));
        let text = std::fs::read_to_string(base.join(file)).unwrap_or_default();
        match crate::request::auth::parse_key_file(&text) {
            Ok(keys) if !keys.is_empty() => keys != config.settings.file_api_keys,
            _ => self.last_bad_key_file.replace(text.clone()) != Some(text),
        }
    }

    fn apply(&self, new: Config) {
        let old = self.shared.config();
        let trusted = !new.settings.enable_active_health_check;
        let changes = self.shared.table.apply_servers(
            &new.servers,
            trusted,
            new.settings.prefix_index_tokens,
        );
        let settings = old.settings.changed_keys(&new.settings);
        let (a, b) = (&old.settings, &new.settings);
        if a.host != b.host || a.port != b.port {
            log::warn!("config reload: host or port changed in the file; restart the router to listen there");
        }
        if (&a.tls_cert_file, &a.tls_key_file, &a.tls_ca_file)
            != (&b.tls_cert_file, &b.tls_key_file, &b.tls_ca_file)
        {
            log::warn!(
                "config reload: TLS files changed in the file; restart the router to use them"
            );
        }
        let workers = pool::worker_count(&new);
        self.shared.replace_config(new);
        self.pool.grow_to(workers);
        if changes.is_empty() && settings.is_empty() {
            log::info!(
                "config reloaded from {}: nothing changed",
                self.path.display()
            );
            return;
        }
        let mut what = Vec::new();
        what.extend(changes.added.iter().map(|u| format!("added {u}")));
        what.extend(
            changes
                .removed
                .iter()
                .map(|u| format!("removed {u} (in-flight requests finish)")),
        );
        what.extend(
            changes
                .resized
                .iter()
                .map(|(u, a, b)| format!("{u} capacity {a} -> {b}")),
        );
        if !settings.is_empty() {
            what.push(format!("changed {}", settings.join(", ")));
        }
        log::info!(
            "config reloaded from {}: {}",
            self.path.display(),
            what.join("; ")
        );
    }
}
