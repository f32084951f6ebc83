//! The listening socket, the accept loop, one thread per client connection reading
//! request heads (with tiny_http's parser), and the fixed pool of worker threads that
//! serve the requests.
//!
//! Each worker takes a request from the hand-off queue (`Handoff`) and carries it
//! from admission to the last byte of its reply. A stream holds its worker for its
//! whole life, and so does a request waiting in the admission queue, so the pool must
//! be larger than every slot plus the whole queue; otherwise requests would wait in
//! the hand-off where neither `queue_timeout` nor `max_queue_size` can see them
//! (`worker_count`).

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::clients::{self, Conn, Ticket};
use crate::config::Config;
use crate::endpoints;
use crate::relay;
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
struct Handoff {
    queue: Mutex<Queue>,
    ready: Condvar,
}

struct Queue {
    requests: VecDeque<Incoming>,
    /// Workers asleep on `ready`, or woken and not yet back on the lock.
    idle: usize,
}

impl Handoff {
    fn new() -> Handoff {
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
    fn push(&self, incoming: Incoming) -> bool {
        let mut queue = self.queue.lock();
        queue.requests.push_back(incoming);
        let short = queue.idle < queue.requests.len();
        drop(queue);
        self.ready.notify_one();
        short
    }

    /// The next request, waiting as long as it takes.
    fn pop(&self) -> Incoming {
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
    request: tiny_http::Request,
    ticket: Ticket,
}

/// The accept loop. It is the router's own, built on tiny_http's pieces (its
/// `accept_connection` parses nothing; the connection's requests are then read by a
/// thread of ours), because tiny_http's loop ends for good on any accept error but
/// `ECONNABORTED` and cannot refuse connections over a cap. Here running out of file
/// descriptors or threads sheds the connections that cannot be served and the loop
/// goes on.
fn accept_loop(
    listener: &tiny_http::Listener,
    tls: &tiny_http::SslContextWrap,
    shared: &Arc<Shared>,
    pool: &Arc<Pool>,
) {
    let mut trouble = Trouble::default();
    loop {
        // tiny_http panics when it cannot duplicate the socket it just accepted (out
        // of file descriptors); the socket is closed during the unwinding.
        let accepted = panic::catch_unwind(AssertUnwindSafe(|| {
            tiny_http::Server::accept_connection(listener, tls)
        }));
        let connection = match accepted {
            Ok(Ok(Some(connection))) => connection,
            // A TLS handshake that failed: tiny_http has closed the socket.
            Ok(Ok(None)) => continue,
            Ok(Err(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionAborted | io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Ok(Err(e)) => {
                // EMFILE and friends: the connection waits in the backlog until a
                // descriptor is free.
                trouble.report(&format!("cannot accept connections: {e}"));
                thread::sleep(ACCEPT_PAUSE);
                continue;
            }
            Err(_) => {
                trouble
                    .report("out of file descriptors: a connection was closed as it was accepted");
                shared.metrics.observe_connection_closed("no_fd");
                thread::sleep(ACCEPT_PAUSE);
                continue;
            }
        };
        let cap = shared.config().settings.max_client_connections;
        let Some(conn) = shared.clients.admit(cap) else {
            trouble.report(&format!(
                "{cap} client connections are open (max_client_connections): new ones are closed at once"
            ));
            shared.metrics.observe_connection_closed("over_cap");
            continue;
        };
        let secure = connection.secure();
        let pool = Arc::clone(pool);
        let spawned = thread::Builder::new()
            .name("conn".to_owned())
            .stack_size(CONNECTION_STACK)
            .spawn(move || read_requests(connection, secure, &conn, &pool));
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

/// A connection thread reads heads and parses them (tiny_http), and nothing more.
const CONNECTION_STACK: usize = 256 * 1024;

/// Name of the accept threads; the panic hook leaves their panics to `accept_loop`.
pub const ACCEPT_THREAD: &str = "accept";

/// tiny_http makes the TLS handshake inside `accept_connection`: a client that stalls
/// its handshake holds an accept thread until the janitor closes it
/// (`client_idle_timeout`), so an HTTPS router accepts on several.
const TLS_ACCEPT_THREADS: usize = 8;

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

/// The life of one connection's reading side: each request head tiny_http parses
/// goes to the workers with a ticket on the connection. tiny_http answers a malformed
/// head with 400 itself and then ends the connection.
///
/// A connection has one request at a time with the workers: a client pipelining
/// requests would otherwise hold a worker for each (all but the first waiting to write
/// their reply after the one before). Over plain HTTP the next head is read while the
/// previous request runs and held until it ends, which costs nothing to a client that
/// waits for each reply; over TLS the reading and writing sides share one session, and
/// a read blocked on the next head would keep the reply from being written, so the
/// reply comes first (tiny_http's own loop does the same).
fn read_requests<E: std::fmt::Display>(
    mut connection: impl Iterator<Item = Result<tiny_http::Request, E>>,
    secure: bool,
    conn: &Arc<Conn>,
    pool: &Arc<Pool>,
) {
    // Whether a request of this connection is with the workers.
    let mut running = false;
    // Waits for that request to end: its ticket always signals, however it ends.
    let previous_ends = |running: &mut bool| {
        if std::mem::take(running) {
            conn.wait_request_end();
        }
    };
    loop {
        if secure {
            previous_ends(&mut running);
        }
        let request = match connection.next() {
            None => return,
            Some(Ok(request)) => request,
            // A client closing an idle keep-alive connection arrives here too, so
            // this is trace, not debug.
            Some(Err(e)) => {
                log::trace!("unreadable request: {e}");
                continue;
            }
        };
        previous_ends(&mut running);
        let ticket = conn.ticket(request.remote_addr().copied());
        pool.submit(Incoming { request, ticket });
        running = true;
    }
}

/// Binds `host:port` and starts a pool of `workers` threads; serves HTTPS with
/// `identity`.
pub fn start(
    shared: Arc<Shared>,
    host: &str,
    port: u16,
    identity: Option<tiny_http::SslConfig>,
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
    let accept_threads = if identity.is_some() {
        TLS_ACCEPT_THREADS
    } else {
        1
    };
    let tls = tiny_http::SslContextWrap::build_ssl_capabilities(identity)
        .map_err(|e| format!("cannot set up TLS: {e}"))?;
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
    let front = Arc::new((tiny_http::Listener::from(listener), tls));
    for _ in 0..accept_threads {
        let (front, shared, pool) = (Arc::clone(&front), Arc::clone(&shared), Arc::clone(&pool));
        thread::Builder::new()
            .name(ACCEPT_THREAD.to_owned())
            .spawn(move || accept_loop(&front.0, &front.1, &shared, &pool))
            .map_err(|e| format!("cannot start an accept thread: {e}"))?;
    }
    clients::spawn_janitor(shared, addr.port())
        .map_err(|e| format!("cannot start the connection janitor: {e}"))?;
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

/// Accepted sockets inherit TCP_NODELAY from the listener on Linux, and tiny_http
/// gives no access to the accepted sockets; without it every reply written in two
/// pieces waits ~40 ms for a delayed ACK.
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
        let Incoming { request, ticket } = pool.handoff.pop();
        serve(request, &ticket, &pool.shared);
    }
}

/// One request, with a panic contained to it: tiny_http answers a request dropped
/// during unwinding with 500, the `Slot` guard gives its slot back, and this worker
/// goes on with the next request.
fn serve(request: tiny_http::Request, ticket: &Ticket, shared: &Arc<Shared>) {
    contain_panic(request, |request| {
        if let Some(request) = endpoints::try_handle(request, ticket, shared) {
            relay::handle(request, ticket, shared);
        }
    });
}

/// Runs `handle` on `request`, stopping a panic at this boundary. Returns whether it
/// panicked.
fn contain_panic(request: tiny_http::Request, handle: impl FnOnce(tiny_http::Request)) -> bool {
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
    use crate::clients::Clients;

    #[test]
    fn the_handoff_says_when_a_request_has_no_worker_left() {
        let clients = Clients::new();
        let conn = clients.admit(8).expect("admitted");
        let incoming = || Incoming {
            request: tiny_http::TestRequest::new().into(),
            ticket: conn.ticket(None),
        };
        let handoff = Arc::new(Handoff::new());
        assert!(handoff.push(incoming()), "no worker waits");
        let worker = {
            let handoff = Arc::clone(&handoff);
            thread::spawn(move || {
                drop(handoff.pop());
                drop(handoff.pop());
            })
        };
        // The worker takes the first request, then sleeps for the next.
        while handoff.queue.lock().idle == 0 {
            thread::yield_now();
        }
        assert!(!handoff.push(incoming()), "the sleeping worker takes it");
        worker.join().expect("worker");
        assert_eq!(handoff.queue.lock().idle, 0);
    }

    #[test]
    fn a_panicking_handler_is_contained_to_its_request() {
        let quiet = panic::take_hook();
        panic::set_hook(Box::new(|_| {}));
        let panicked = contain_panic(tiny_http::TestRequest::new().into(), |_request| {
            panic!("boom")
        });
        let next = contain_panic(tiny_http::TestRequest::new().into(), drop);
        panic::set_hook(quiet);
        assert!(panicked);
        assert!(!next, "the next request is served normally");
    }
}
