//! The wait queue for a backend slot: what a request asks of a backend (`Want`), the
//! limits of its wait (`Limits`), why it may be refused (`Rejection`), and the
//! first-come-first-served line of requests waiting for a slot.
//!
//! The line lives inside the slot table (`backend::registry::Table`), under the
//! table's one `parking_lot::Mutex`, so "is a slot free" and "who is first in line"
//! are always decided at the same instant. Every waiter sleeps on its own `Condvar`,
//! bound to that same mutex: a released slot wakes exactly the waiter it is handed to,
//! never a herd of a thousand. This module owns the line's order and the waiting; the
//! table decides which backend a waiter gets (`request::pick`) and counts the slot.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, MutexGuard};

use crate::backend::registry::BackendId;
use crate::request::route::Route;

/// How often a waiting request asks whether it is still wanted (`Table::acquire_while`):
/// the connection thread marks a client that left at once, so this bounds how long its
/// place in line outlives it, and a thousand waiters wake four thousand times a second
/// at most.
const WANTED_EVERY: Duration = Duration::from_millis(250);

/// What a request asks of a backend.
#[derive(Debug, Clone, Default)]
pub struct Want {
    /// The `model` its body names, if any.
    pub model: Option<String>,
    /// Backends already tried for this request (retries go elsewhere).
    pub exclude: Vec<BackendId>,
    /// With `routing = "cache_aware"`: what each backend holds of the request.
    pub route: Option<Arc<Route>>,
}

/// The limits that apply to one admission; read from the config snapshot of the
/// request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_queue_size: usize,
    pub queue_timeout: Duration,
}

/// Why a request could not be admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// No healthy backend exists that could serve the request, so waiting would not help.
    NoBackend,
    /// No backend, healthy or not, lists the requested model, and every backend's
    /// models are known.
    UnknownModel(String),
    /// No backend whose models are known lists the requested model, and `unknown`
    /// backends whose models are not known yet cannot take it (down): the model may
    /// be theirs.
    ModelUnavailable { model: String, unknown: usize },
    /// Every slot is taken and `max_queue_size` requests already wait.
    QueueFull { queue_len: usize },
    /// Waited `queue_timeout` without a slot coming free.
    QueueTimeout { waited: Duration },
    /// The router is shutting down.
    Closed,
    /// The client left while the request waited.
    Abandoned,
}

/// The line of requests waiting for a slot, first come first served.
#[derive(Default)]
pub(crate) struct Queue {
    waiters: VecDeque<Waiter>,
    next_ticket: u64,
}

struct Waiter {
    ticket: u64,
    want: Want,
    wake: Arc<Wake>,
}

/// A waiter's own condition variable and the backend it was handed (0: none yet).
/// Only read and written with the table mutex held; atomic only to be `Sync`.
struct Wake {
    cv: Condvar,
    granted: AtomicU64,
}

/// A request's place in line.
pub(crate) struct Place {
    ticket: u64,
    wake: Arc<Wake>,
}

/// How a wait in line ended, short of the table's own reasons.
pub(crate) enum Waited {
    /// The table handed this backend's slot to the waiter (and already counted it).
    Granted(BackendId),
    Closed,
    Abandoned,
    TimedOut,
}

/// What `Queue::hand_out` is told about one waiter.
pub(crate) enum Grant {
    /// The slot on this backend is the waiter's (counted by the table).
    To(BackendId),
    /// Nothing this waiter can use is free; later ones may want other backends.
    Skip,
    /// No slot is free at all: nobody further back can be served either.
    Stop,
}

impl Queue {
    pub(crate) fn len(&self) -> usize {
        self.waiters.len()
    }

    /// Joins the end of the line.
    pub(crate) fn join(&mut self, want: Want) -> Place {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let wake = Arc::new(Wake {
            cv: Condvar::new(),
            granted: AtomicU64::new(0),
        });
        self.waiters.push_back(Waiter {
            ticket,
            want,
            wake: Arc::clone(&wake),
        });
        Place { ticket, wake }
    }

    /// Leaves the line without a slot.
    pub(crate) fn leave(&mut self, place: &Place) {
        self.waiters.retain(|w| w.ticket != place.ticket);
    }

    /// Wakes every waiter, so each sees the table closed.
    pub(crate) fn wake_all(&self) {
        for waiter in &self.waiters {
            waiter.wake.cv.notify_one();
        }
    }

    /// Offers free slots to waiters in line order: `grant` says, for each waiter's
    /// `Want`, which backend's slot it gets. A waiter granted a slot leaves the line
    /// and is woken. A waiter whose backends are all full does not hold up a later
    /// one that wants another model.
    pub(crate) fn hand_out(&mut self, mut grant: impl FnMut(&Want) -> Grant) {
        let mut i = 0;
        while i < self.waiters.len() {
            match grant(&self.waiters[i].want) {
                Grant::Stop => return,
                Grant::Skip => i += 1,
                Grant::To(id) => {
                    if let Some(waiter) = self.waiters.remove(i) {
                        waiter.wake.granted.store(id, Ordering::Relaxed);
                        waiter.wake.cv.notify_one();
                    }
                }
            }
        }
    }
}

/// Sleeps in line with the table's lock released until the place is granted a slot,
/// the table closes, `deadline` passes or `wanted` says the request is no longer
/// wanted (asked every `WANTED_EVERY`). The caller leaves the line on anything but a
/// grant.
pub(crate) fn wait<T>(
    guard: &mut MutexGuard<'_, T>,
    place: &Place,
    deadline: Instant,
    wanted: impl Fn() -> bool,
    closed: impl Fn(&T) -> bool,
) -> Waited {
    loop {
        let until = deadline.min(Instant::now() + WANTED_EVERY);
        let timed_out = place.wake.cv.wait_until(guard, until).timed_out() && until == deadline;
        let granted = place.wake.granted.load(Ordering::Relaxed);
        if granted != 0 {
            return Waited::Granted(granted);
        }
        let abandoned = !wanted();
        if closed(guard) {
            return Waited::Closed;
        }
        if abandoned {
            return Waited::Abandoned;
        }
        if timed_out {
            return Waited::TimedOut;
        }
        // A spurious wake-up, or time to ask `wanted`: keep waiting for the same
        // deadline.
    }
}
