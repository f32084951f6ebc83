//! Process signals, and the graceful shutdown they start.
//!
//! - SIGTERM, SIGINT: stop admitting (`/readyz` turns 503, queued requests get 503 with
//!   Retry-After, new ones too), let in-flight requests and streams finish, then exit.
//!   A second signal, or `shutdown_timeout`, ends what is left.
//! - SIGHUP: check the config file now (the reload thread).
//! - SIGUSR1: reopen the log files (logrotate's postrotate).
//!
//! A signal thread turns each signal into a channel message; the main thread waits on
//! them, so no work is done inside a signal handler.

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};

use crate::control::logging::LogHandle;
use crate::shared::Shared;

/// How often a draining router looks at its in-flight count.
const DRAIN_POLL: Duration = Duration::from_millis(20);

pub struct Signals {
    /// SIGHUP: a message per signal, for the reload thread.
    pub reload: Receiver<()>,
    stop: Receiver<()>,
    reopen: Receiver<()>,
}

/// Starts listening for the router's signals.
pub fn listen() -> Result<Signals, String> {
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP, SIGUSR1])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let (reload_tx, reload) = crossbeam_channel::unbounded();
    let (stop_tx, stop) = crossbeam_channel::unbounded();
    let (reopen_tx, reopen) = crossbeam_channel::unbounded();
    thread::Builder::new()
        .name("signals".to_owned())
        .spawn(move || {
            for signal in signals.forever() {
                let _ = match signal {
                    SIGHUP => reload_tx.send(()),
                    SIGUSR1 => reopen_tx.send(()),
                    _ => stop_tx.send(()),
                };
            }
        })
        .map_err(|e| format!("cannot start the signal thread: {e}"))?;
    Ok(Signals {
        reload,
        stop,
        reopen,
    })
}

impl Signals {
    /// Blocks while the router serves; returns once it has shut down gracefully (or
    /// was told to stop waiting).
    pub fn serve_until_shutdown(&self, shared: &Arc<Shared>, logs: &LogHandle) {
        loop {
            select! {
                recv(self.stop) -> _ => break,
                recv(self.reopen) -> _ => reopen(logs),
            }
        }
        let timeout = shared.config().settings.shutdown_timeout;
        let deadline = Instant::now() + timeout;
        log::info!(
            "shutdown: refusing new requests; waiting up to {:?} for {} in flight",
            timeout,
            shared.table.total_in_flight()
        );
        shared.start_draining();
        loop {
            let in_flight = shared.table.total_in_flight();
            if in_flight == 0 {
                log::info!("shutdown: every request finished; exiting");
                return;
            }
            if Instant::now() >= deadline {
                log::warn!(
                    "shutdown: shutdown_timeout reached; exiting with {in_flight} requests cut off"
                );
                return;
            }
            select! {
                recv(self.stop) -> _ => {
                    log::warn!("shutdown: second signal; exiting with {in_flight} requests cut off");
                    return;
                }
                recv(self.reopen) -> _ => reopen(logs),
                default(DRAIN_POLL) => {}
            }
        }
    }
}

fn reopen(logs: &LogHandle) {
    match logs.reopen() {
        Ok(()) => log::info!("log files reopened"),
        Err(e) => log::error!("cannot reopen the log files: {e}"),
    }
}
