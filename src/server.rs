//! The listening socket, the accept loop, one thread per client connection reading
//! its request heads (`client::connection`), and the fixed pool of worker threads that
//! serve the requests.
//!
//! A connection thread owns its connection between requests: it reads a head, lends
//! the connection to a worker with the request, watches for the client leaving
//! (`client::watch`) while the worker has it, and takes it back at the request's end,
//! to read the next head or to close it. So one request at a time per connection is
//! with the workers: a client pipelining requests cannot take more than one worker.
//!
//! Each worker takes a request from the hand-off queue (`Handoff`) and carries it
//! from admission to the last byte of its reply. A stream holds its worker for its
//! whole life, and so does a request waiting in the admission queue, so the pool must
//! be larger than every slot plus the whole queue; otherwise requests would wait in
//! the hand-off where neither `queue_timeout` nor `max_queue_size` can see them
//! (`worker_count`).

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::client::connection::{is_timeout, Connection, HeadRead};
use crate::client::head::Upgrade;
use crate::client::registry::{Conn, Refusal, Returned};
use crate::client::reply;
use crate::client::request::Request;
use crate::config::Config;
use crate::endpoints;
use crate::error::RouterError;
use crate::relay;
use crate::shared::Shared;
use crate::tls;

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
    /// Lets the pool grow to `n` workers.
    pub fn grow_to(&self, n: usize) {
        self.size.fetch_max(n, Ordering::SeqCst);
    }

    /// Hands a request to the workers, starting one if none will be free for it.
    fn submit(self: &Arc<Self>, incoming: Incoming) {
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
struct Incoming {
    request: Request,
}

/// What the accept loop and every connection thread share.
struct Front {
    shared: Arc<Shared>,
    pool: Arc<Pool>,
    tls: Option<tls::Identity>,
}

/// The accept loop. Running out of file descriptors or threads sheds the connections
/// that cannot be served, and the loop goes on.
fn accept_loop(listener: &TcpListener, front: &Arc<Front>) {
    let shared = &front.shared;
    let mut trouble = Trouble::default();
    loop {
        let (tcp, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionAborted | io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => {
                // EMFILE and friends: the connection waits in the backlog until a
                // descriptor is free.
                if e.raw_os_error() == Some(libc::EMFILE) || e.raw_os_error() == Some(libc::ENFILE)
                {
                    shared.metrics.observe_connection_closed("no_fd");
                }
                trouble.report(&format!("cannot accept connections: {e}"));
                thread::sleep(ACCEPT_PAUSE);
                continue;
            }
        };
        let settings = &shared.config().settings;
        let (cap, per_ip) = (
            settings.max_client_connections,
            settings.max_connections_per_ip,
        );
        let conn = match shared.clients.admit(peer, cap, per_ip) {
            Ok(conn) => conn,
            Err(refusal) => {
                trouble.report(&match refusal {
                    Refusal::OverCap => format!(
                        "{cap} client connections are open (max_client_connections): new ones are closed at once"
                    ),
                    Refusal::PerIp => format!(
                        "{per_ip} client connections are open from {} (max_connections_per_ip): new ones from it are closed at once",
                        peer.ip()
                    ),
                    Refusal::NoFd => "no file descriptor is left for a client connection's wake-up (eventfd): new connections are closed at once; raise the open files limit (ulimit -n, LimitNOFILE)".to_owned(),
                });
                shared.metrics.observe_connection_closed(refusal.label());
                continue;
            }
        };
        let front = Arc::clone(front);
        let spawned = thread::Builder::new()
            .name("conn".to_owned())
            .stack_size(CONNECTION_STACK)
            .spawn(move || serve_connection(tcp, peer, &conn, &front));
        if let Err(e) = spawned {
            trouble.report(&format!(
                "cannot start a connection thread ({e}): new connections are closed at once"
            ));
            shared.metrics.observe_connection_closed("no_thread");
        }
    }
}

/// How long the accept loop waits after an accept error before trying again.
const ACCEPT_PAUSE: Duration = Duration::from_millis(50);

/// A connection thread reads and parses heads, and nothing more.
const CONNECTION_STACK: usize = 256 * 1024;

const ACCEPT_THREAD: &str = "accept";

/// A problem of the accept loop or of starting workers, logged at most every `TROUBLE_EVERY`: under a flood
/// of connections the same line would otherwise be written thousands of times.
#[derive(Default)]
struct Trouble {
    last: Option<Instant>,
    unreported: u64,
}

const TROUBLE_EVERY: Duration = Duration::from_secs(10);

impl Trouble {
    fn report(&mut self, what: &str) {
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

/// The life of one client connection, from accept to close: the TLS handshake if
/// any, then each request head read and lent with the connection to a worker, until
/// the client closes, a timeout passes, or a request leaves the connection unusable.
fn serve_connection(tcp: TcpStream, peer: SocketAddr, conn: &Arc<Conn>, front: &Front) {
    let shared = &front.shared;
    let config = shared.config();
    let settings = &config.settings;
    #[cfg_attr(not(feature = "tls"), allow(unused_variables))]
    let handshake_deadline = Instant::now() + settings.client_idle_timeout;
    let write_timeout = settings.client_write_timeout;
    let opened = match &front.tls {
        None => Connection::plain(tcp, peer, write_timeout),
        #[cfg(feature = "tls")]
        Some(identity) => Connection::tls(
            tcp,
            peer,
            Arc::clone(identity),
            handshake_deadline,
            write_timeout,
        ),
        #[cfg(not(feature = "tls"))]
        Some(never) => match *never {},
    };
    drop(config);
    let mut connection = match opened {
        Ok(connection) => connection,
        Err(e) => {
            if is_timeout(&e) {
                shared.metrics.observe_connection_closed("idle");
            }
            log::debug!("connection from {peer} closed before its first request: {e}");
            return;
        }
    };
    // Idle from the end of the last request (or from the connection's start).
    let mut idle_since = Instant::now();
    loop {
        let config = shared.config();
        let settings = &config.settings;
        let idle_timeout = settings.client_idle_timeout;
        let deadline = idle_since + idle_timeout;
        let head = match connection.read_head(settings.max_header_bytes, deadline) {
            Ok(head) => head,
            Err(HeadRead::Closed) => return,
            Err(HeadRead::TimedOut) => {
                shared.metrics.observe_connection_closed("idle");
                return;
            }
            // A client closing mid-head, or a reset.
            Err(HeadRead::Broken(e)) => {
                log::trace!("connection from {peer} broke mid-head: {e}");
                return;
            }
            Err(HeadRead::Invalid(e)) => {
                let err = RouterError::of_head(e, settings.max_header_bytes);
                return refuse_head(connection, &err, shared);
            }
        };
        if head.upgrade == Upgrade::WebSocket {
            return refuse_head(connection, &RouterError::UpgradeRefused, shared);
        }
        drop(config);
        let fd = connection.fd();
        front.pool.submit(Incoming {
            request: Request::new(head, connection, conn.ticket()),
        });
        let (
            Returned {
                connection: mut returned,
                reusable,
            },
            returned_at,
        ) = conn.take_back(fd, idle_timeout);
        idle_since = returned_at;
        if let Some(reason) = returned.timed_out.take() {
            shared.metrics.observe_connection_closed(reason);
        }
        if !reusable {
            returned.close();
            return;
        }
        connection = returned;
    }
}

/// Answers a head the router will not serve, then closes: whatever follows it on the
/// connection cannot be trusted to start a request.
fn refuse_head(mut connection: Connection, err: &RouterError, shared: &Shared) {
    shared.metrics.observe_rejection(err.code());
    log::debug!(
        "refused a request head from {}: {} {err}",
        connection.peer(),
        err.status()
    );
    if reply::send_head_error(&mut connection, err).is_ok() {
        connection.close();
    }
}

/// Binds `host:port` and starts a pool of `workers` threads; serves HTTPS with
/// `identity`.
pub fn start(
    shared: Arc<Shared>,
    host: &str,
    port: u16,
    identity: Option<tls::Identity>,
    workers: usize,
) -> Result<(SocketAddr, Arc<Pool>), String> {
    let listener = TcpListener::bind((host, port))
        .map_err(|e| format!("cannot listen on {host}:{port}: {e}"))?;
    set_nodelay(&listener)
        .map_err(|e| format!("cannot set TCP_NODELAY on the listening socket: {e}"))?;
    set_backlog(&listener)
        .map_err(|e| format!("cannot set the listening socket's backlog: {e}"))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("cannot read the listening address: {e}"))?;
    let pool = Arc::new(Pool {
        handoff: Handoff::new(),
        shared: Arc::clone(&shared),
        size: AtomicUsize::new(workers),
        started: Mutex::new(0),
        trouble: Mutex::new(Trouble::default()),
    });
    // The first few in advance, so the first requests and probes wait for no thread
    // to start, and a process that cannot start threads fails here, loudly.
    for _ in 0..workers.min(RESERVE_WORKERS) {
        pool.start_worker()?;
    }
    let front = Arc::new(Front {
        shared,
        pool: Arc::clone(&pool),
        tls: identity,
    });
    thread::Builder::new()
        .name(ACCEPT_THREAD.to_owned())
        .spawn(move || accept_loop(&listener, &front))
        .map_err(|e| format!("cannot start the accept thread: {e}"))?;
    Ok((addr, pool))
}

/// std listens with a backlog of 128: a burst of a thousand clients connecting at
/// once overflows it, and every dropped SYN costs its client a one-second
/// retransmission. Listening again on the same socket raises the backlog (the kernel
/// caps it at `net.core.somaxconn`).
fn set_backlog(listener: &TcpListener) -> io::Result<()> {
    // SAFETY: the fd is a valid, bound, listening TCP socket for the duration of the call.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::listen(listener.as_raw_fd(), LISTEN_BACKLOG) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

const LISTEN_BACKLOG: libc::c_int = 4096;

/// Accepted sockets inherit TCP_NODELAY from the listener on Linux, which saves a
/// system call per connection; without it every reply written in two pieces waits
/// ~40 ms for a delayed ACK.
fn set_nodelay(listener: &TcpListener) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: the fd is a valid, open TCP socket for the duration of the call, and the
    // option value points at a live c_int of the size passed.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
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
