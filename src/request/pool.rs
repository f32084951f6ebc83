//! The worker pool: a fixed number of threads that serve the requests the connection
//! threads (`client::thread`) have read, and the panic boundary each request runs in.
//!
//! Each worker takes a request from the hand-off queue (`Handoff`) and carries it
//! from admission to the last byte of its reply. A stream holds its worker for its
//! whole life, and so does a request waiting in the admission queue, so the pool must
//! be larger than every slot plus the whole queue; otherwise requests would wait in
//! the hand-off where neither `queue_timeout` nor `max_queue_size` can see them
//! (`worker_count`).

use std::collections::VecDeque;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;

use parking_lot::{Condvar, Mutex};

use crate::client::request::Request;
use crate::control::config::Config;
use crate::control::logging::Trouble;
use crate::request::{endpoints, relay};
use crate::shared::Shared;

/// Threads kept beyond slots + queue, so `/health`, `/readyz` and the quick 503s for a
/// full queue are answered while every slot and queue place is taken.
const RESERVE_WORKERS: usize = 16;

/// The automatic pool never grows beyond this; set `worker_threads` to go further.
const MAX_AUTO_WORKERS: usize = 4096;

/// Workers spend their time in blocking reads and writes; a small stack keeps a large
/// pool cheap.
const WORKER_STACK: usize = 512 * 1024;

/// The worker pool size: `worker_threads` when set, else every slot plus every queue
/// place plus a reserve.
pub fn worker_count(config: &Config) -> usize {
    if config.settings.worker_threads > 0 {
        return config.settings.worker_threads;
    }
    let slots: usize = config
        .servers
        .iter()
        .map(|s| s.max_concurrent_requests as usize)
        .sum();
    (slots + config.settings.max_queue_size + RESERVE_WORKERS).min(MAX_AUTO_WORKERS)
}

/// The worker pool. Its size is fixed by the config (`worker_count`); threads are
/// started when requests first need them, so an idle router with a large pool costs
/// no more memory than a small one, and never stopped. A reload that raises the
/// capacity or the queue raises the size; it never lowers it, as threads are never
/// taken away from requests that may be running.
pub struct Pool {
    handoff: Handoff,
    shared: Arc<Shared>,
    /// How many workers may run.
    size: AtomicUsize,
    /// How many have been started.
    started: Mutex<usize>,
    trouble: Mutex<Trouble>,
}

impl Pool {
    /// A pool of `workers` threads, the first few started at once: the first requests
    /// and probes then wait for no thread to start, and a process that cannot start
    /// threads fails here, loudly.
    pub fn start(shared: Arc<Shared>, workers: usize) -> Result<Arc<Pool>, String> {
        let pool = Arc::new(Pool {
            handoff: Handoff::new(),
            shared,
            size: AtomicUsize::new(workers),
            started: Mutex::new(0),
            trouble: Mutex::new(Trouble::default()),
        });
        for _ in 0..workers.min(RESERVE_WORKERS) {
            pool.start_worker()?;
        }
        Ok(pool)
    }

    /// Lets the pool grow to `n` workers.
    pub fn grow_to(&self, n: usize) {
        self.size.fetch_max(n, Ordering::SeqCst);
    }

    /// Hands a request to the workers, starting one if none will be free for it.
    pub(crate) fn submit(self: &Arc<Self>, incoming: Incoming) {
        if self.handoff.push(incoming) {
            if let Err(e) = self.start_worker() {
                self.trouble.lock().report(&e);
            }
        }
    }

    /// Starts one more worker if the size allows.
    fn start_worker(self: &Arc<Self>) -> Result<(), String> {
        let mut started = self.started.lock();
        let size = self.size.load(Ordering::SeqCst);
        if *started >= size {
            return Ok(());
        }
        let i = *started;
        let pool = Arc::clone(self);
        thread::Builder::new()
            .name(format!("worker-{i}"))
            .stack_size(WORKER_STACK)
            .spawn(move || worker(&pool))
            .map_err(|e| format!("cannot start worker thread {i} of {size}: {e}"))?;
        *started += 1;
        Ok(())
    }
}

/// The requests on their way from the connection threads to the workers: a queue
/// under a mutex, with a condvar the idle workers sleep on. Counting the sleepers under
/// the same lock as the queue says exactly when a request has no worker left for it,
/// which is when the pool grows (`Pool::submit`).
struct Handoff<T = Incoming> {
    queue: Mutex<Queue<T>>,
    ready: Condvar,
}

struct Queue<T> {
    requests: VecDeque<T>,
    /// Workers asleep on `ready`, or woken and not yet back on the lock.
    idle: usize,
}

impl<T> Handoff<T> {
    fn new() -> Handoff<T> {
        Handoff {
            queue: Mutex::new(Queue {
                requests: VecDeque::new(),
                idle: 0,
            }),
            ready: Condvar::new(),
        }
    }

    /// Queues a request and wakes a worker. True when no worker is left for it: every
    /// idle one is spoken for by a request queued before.
    fn push(&self, incoming: T) -> bool {
        let mut queue = self.queue.lock();
        queue.requests.push_back(incoming);
        let short = queue.idle < queue.requests.len();
        drop(queue);
        self.ready.notify_one();
        short
    }

    /// The next request, waiting as long as it takes.
    fn pop(&self) -> T {
        let mut queue = self.queue.lock();
        loop {
            if let Some(incoming) = queue.requests.pop_front() {
                return incoming;
            }
            queue.idle += 1;
            self.ready.wait(&mut queue);
            queue.idle -= 1;
        }
    }
}

/// A request whose head a connection thread has read, on its way to a worker.
pub(crate) struct Incoming {
    pub(crate) request: Request,
}
fn worker(pool: &Arc<Pool>) {
    loop {
        let Incoming { request } = pool.handoff.pop();
        serve(request, &pool.shared);
    }
}

/// One request, with a panic contained to it: the request dropped during unwinding
/// answers 500 if nothing was written and gives its connection back to be closed, the
/// `Slot` guard gives its slot back, and this worker goes on with the next request.
fn serve(request: Request, shared: &Arc<Shared>) {
    contain_panic(request, |request| {
        if let Some(request) = endpoints::try_handle(request, shared) {
            relay::handle(request, shared);
        }
    });
}

/// Runs `handle` on `request`, stopping a panic at this boundary. Returns whether it
/// panicked.
fn contain_panic<R>(request: R, handle: impl FnOnce(R)) -> bool {
    let result = panic::catch_unwind(AssertUnwindSafe(|| handle(request)));
    if let Err(panic) = &result {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_owned());
        log::error!(
            "a request handler panicked ({what}); the request got 500 and the router goes on"
        );
    }
    result.is_err()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_handoff_says_when_a_request_has_no_worker_left() {
        let handoff = Arc::new(Handoff::<u32>::new());
        assert!(handoff.push(1), "no worker waits");
        let worker = {
            let handoff = Arc::clone(&handoff);
            thread::spawn(move || {
                handoff.pop();
                handoff.pop();
            })
        };
        // The worker takes the first request, then sleeps for the next.
        while handoff.queue.lock().idle == 0 {
            thread::yield_now();
        }
        assert!(!handoff.push(2), "the sleeping worker takes it");
        worker.join().expect("worker");
        assert_eq!(handoff.queue.lock().idle, 0);
    }

    #[test]
    fn a_panicking_handler_is_contained_to_its_request() {
        let quiet = panic::take_hook();
        panic::set_hook(Box::new(|_| {}));
        let panicked = contain_panic((), |_request| panic!("boom"));
        let next = contain_panic((), drop);
        panic::set_hook(quiet);
        assert!(panicked);
        assert!(!next, "the next request is served normally");
    }
}
