//! Learning a model on demand: a request for a model no backend lists (a LoRA adapter
//! loaded at runtime with `/v1/load_lora_adapter`, say) has the healthy backends'
//! `/v1/models` read again, and waits for that (up to `model_refresh_wait`) before it
//! is refused, instead of getting 404 until the health thread's next round.
//!
//! Each backend's list is read at most once every `MIN_GAP`, however many requests
//! ask: a request that finds a refresh running waits for it, one that finds a refresh
//! done before it asked waits for the next allowed one. So a flood of unknown models
//! costs each backend two `GET /v1/models` a second, never more.
//!
//! The refresh runs on the asking worker's thread; the lists go into the slot table
//! through `Table::set_models`, as the health thread's do. This module owns only the
//! per-backend times of the last refresh, under its own mutex.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::backend::probe::Target;
use crate::backend::registry::{BackendId, Table};

/// The shortest time between two refreshes of one backend's models.
pub const MIN_GAP: Duration = Duration::from_millis(500);

/// When each backend's models were last read on demand, and which are being read now.
#[derive(Default)]
pub struct Refresher {
    state: Mutex<HashMap<BackendId, Track>>,
    /// Woken when a refresh ends.
    done: Condvar,
}

#[derive(Default, Clone, Copy)]
struct Track {
    /// When the last refresh started.
    last: Option<Instant>,
    running: bool,
}

/// What a request does next about one backend.
enum Step {
    /// Refreshed since the request asked: nothing more to do.
    Done,
    /// Refresh it now, on this thread.
    Run,
    /// Wait: a refresh is running, or the next is allowed only at this instant.
    Wait(Option<Instant>),
}

impl Refresher {
    /// Reads the healthy backends' models again until `model` is known or each has
    /// been read once since this call began, within `wait`. Returns whether `model` is
    /// known now.
    pub fn learn(
        &self,
        table: &Table,
        model: &str,
        wait: Duration,
        probe_timeout: Duration,
    ) -> bool {
        let asked = Instant::now();
        let deadline = asked + wait;
        loop {
            if table.is_known_model(model) {
                return true;
            }
            let backends: Vec<(BackendId, String)> = table
                .view()
                .backends
                .into_iter()
                .filter(|b| b.healthy)
                .map(|b| (b.id, b.url))
                .collect();
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            let mut state = self.state.lock();
            let mut wake_at: Option<Instant> = None;
            let mut waiting = false;
            let mut run = None;
            for (id, url) in &backends {
                let track = state.entry(*id).or_default();
                match step(*track, asked, now) {
                    Step::Done => {}
                    Step::Run => {
                        track.running = true;
                        track.last = Some(now);
                        run = Some((*id, url.clone()));
                        break;
                    }
                    Step::Wait(at) => {
                        waiting = true;
                        if let Some(at) = at {
                            wake_at = Some(wake_at.map_or(at, |w| w.min(at)));
                        }
                    }
                }
            }
            if let Some((id, url)) = run {
                drop(state);
                let timeout = probe_timeout.min(deadline.saturating_duration_since(now));
                let read = read_models(table, id, &url, timeout);
                let mut state = self.state.lock();
                if let Some(track) = state.get_mut(&id) {
                    track.running = false;
                }
                // Backends gone from the table take their times with them.
                let live: Vec<BackendId> = backends.iter().map(|(id, _)| *id).collect();
                state.retain(|id, _| live.contains(id));
                drop(state);
                self.done.notify_all();
                if let Err(why) = read {
                    log::debug!("refreshing the models of {url} for {model:?} failed: {why}");
                }
                continue;
            }
            if !waiting {
                return table.is_known_model(model);
            }
            let until = wake_at.map_or(deadline, |at| at.min(deadline));
            self.done.wait_until(&mut state, until);
        }
    }
}

/// What a request that asked at `asked` does about a backend with `track`, at `now`.
fn step(track: Track, asked: Instant, now: Instant) -> Step {
    if track.last.is_some_and(|last| last >= asked) && !track.running {
        return Step::Done;
    }
    if track.running {
        return Step::Wait(None);
    }
    match track.last.map(|last| last + MIN_GAP) {
        Some(next) if next > now => Step::Wait(Some(next)),
        _ => Step::Run,
    }
}

/// One `GET /v1/models` against backend `id`, its list put into the table.
fn read_models(table: &Table, id: BackendId, url: &str, timeout: Duration) -> Result<(), String> {
    let (agent, key) = table.probe_of(id).ok_or("the backend was removed")?;
    let target = Target {
        agent: &agent,
        url,
        timeout,
        key,
    };
    let models = target.fetch_models().ok_or("no model list")?;
    table.set_models(id, models);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backend_is_read_at_most_once_per_gap() {
        let t0 = Instant::now();
        let asked = t0 + Duration::from_millis(100);
        let fresh = Track::default();
        assert!(matches!(step(fresh, asked, asked), Step::Run));
        let running = Track {
            last: Some(t0),
            running: true,
        };
        assert!(matches!(step(running, asked, asked), Step::Wait(None)));
        // Read before the request asked, 100 ms ago: the next read is due at t0 + gap.
        let before = Track {
            last: Some(t0),
            running: false,
        };
        match step(before, asked, asked) {
            Step::Wait(Some(at)) => assert_eq!(at, t0 + MIN_GAP),
            _ => panic!("must wait for the gap"),
        }
        assert!(matches!(step(before, asked, t0 + MIN_GAP), Step::Run));
        // Read since the request asked: done.
        let since = Track {
            last: Some(asked),
            running: false,
        };
        assert!(matches!(step(since, asked, asked), Step::Done));
    }
}
