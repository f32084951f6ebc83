//! The listening socket, tiny_http, and the fixed pool of worker threads that take
//! requests from it.
//!
//! tiny_http reads request heads on its own per-connection threads and queues them;
//! each worker here loops on `recv()` and carries one request from admission to the
//! last byte of its reply. A stream holds its worker for its whole life, and so does a
//! request waiting in the admission queue, so the pool must be larger than every slot
//! plus the whole queue; otherwise requests would wait in tiny_http's queue where
//! neither `queue_timeout` nor `max_queue_size` can see them (`worker_count`).
//!
//! tiny_http's accept loop can die (see `Http`); a watchdog notices connections that
//! wait unaccepted and starts a new one on the same socket.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};

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

/// The worker pool. It only grows: a reload that raises the capacity or the queue
/// adds workers; threads are never taken away from requests that may be running.
pub struct Pool {
    http: Http,
    shared: Arc<Shared>,
    size: Mutex<usize>,
    /// Requests taken from tiny_http so far: the watchdog's sign of progress.
    received: AtomicU64,
}

impl Pool {
    /// Starts workers until the pool has `n`.
    pub fn grow_to(self: &Arc<Self>, n: usize) -> Result<(), String> {
        let mut size = self.size.lock();
        while *size < n {
            let i = *size;
            let pool = Arc::clone(self);
            thread::Builder::new()
                .name(format!("worker-{i}"))
                .stack_size(WORKER_STACK)
                .spawn(move || worker(&pool))
                .map_err(|e| format!("cannot start worker thread {i} of {n}: {e}"))?;
            *size += 1;
        }
        Ok(())
    }
}

/// The tiny_http servers on the listening socket. tiny_http ends its accept loop for
/// good on any accept error but `ECONNABORTED` (running out of file descriptors, for
/// one). When that happens a new server is started on a duplicate of the same socket
/// (`restart`), and the old one is kept as `retired` for a while: the connections it
/// accepted still send their requests through it.
struct Http {
    addr: SocketAddr,
    /// A duplicate of the listening socket, kept to start new servers from.
    spare: TcpListener,
    /// The TLS identity, when the router serves HTTPS.
    identity: Option<tiny_http::SslConfig>,
    current: RwLock<Arc<tiny_http::Server>>,
    retired: Mutex<Vec<(Arc<tiny_http::Server>, Instant)>>,
    /// Whether `retired` is not empty, read by idle workers without the lock.
    has_retired: AtomicBool,
    restarting: AtomicBool,
}

impl Http {
    fn new(
        listener: TcpListener,
        addr: SocketAddr,
        identity: Option<tiny_http::SslConfig>,
    ) -> Result<Http, String> {
        let spare = listener
            .try_clone()
            .map_err(|e| format!("cannot duplicate the listening socket: {e}"))?;
        let server = new_server(listener, addr, identity.clone())?;
        Ok(Http {
            addr,
            spare,
            identity,
            current: RwLock::new(Arc::new(server)),
            retired: Mutex::new(Vec::new()),
            has_retired: AtomicBool::new(false),
            restarting: AtomicBool::new(false),
        })
    }

    fn current(&self) -> Arc<tiny_http::Server> {
        Arc::clone(&self.current.read())
    }

    /// Takes one waiting request from a retired server, if any has one; forgets
    /// retired servers after `RETIRED_FOR`.
    fn retired_request(&self) -> Option<tiny_http::Request> {
        let mut retired = self.retired.lock();
        retired.retain(|(_, since)| since.elapsed() < RETIRED_FOR);
        self.has_retired
            .store(!retired.is_empty(), Ordering::Relaxed);
        retired
            .iter()
            .find_map(|(server, _)| server.try_recv().ok().flatten())
    }

    /// How long an idle worker waits on the current server: briefly while retired
    /// servers may still have requests, so theirs wait little.
    fn idle_poll(&self) -> Duration {
        if self.has_retired.load(Ordering::Relaxed) {
            RETIRED_POLL
        } else {
            IDLE_POLL
        }
    }

    /// The accept loop of `dead` has ended: start a new server, once, retrying while
    /// the process cannot get a file descriptor for it.
    fn restart(pool: &Arc<Pool>, dead: &Arc<tiny_http::Server>, why: &io::Error) {
        let http = &pool.http;
        if !Arc::ptr_eq(dead, &http.current()) || http.restarting.swap(true, Ordering::SeqCst) {
            return;
        }
        log::error!("the accept loop stopped ({why}); starting it again");
        let owned = Arc::clone(pool);
        let spawned = thread::Builder::new()
            .name("accept-restart".to_owned())
            .spawn(move || {
                let http = &owned.http;
                let mut pause = Duration::from_millis(50);
                loop {
                    let started = http
                        .spare
                        .try_clone()
                        .map_err(|e| e.to_string())
                        .and_then(|l| new_server(l, http.addr, http.identity.clone()));
                    match started {
                        Ok(server) => {
                            let old =
                                std::mem::replace(&mut *http.current.write(), Arc::new(server));
                            http.retired.lock().push((old, Instant::now()));
                            http.has_retired.store(true, Ordering::Relaxed);
                            http.restarting.store(false, Ordering::SeqCst);
                            log::warn!("accepting connections again on {}", http.addr);
                            return;
                        }
                        Err(e) => {
                            log::debug!("cannot restart the accept loop yet: {e}");
                            thread::sleep(pause);
                            pause = (pause * 2).min(Duration::from_secs(1));
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            pool.http.restarting.store(false, Ordering::SeqCst);
            log::error!("cannot start the accept-restart thread: {e}");
        }
    }
}

/// Watches the listening socket: connections waiting in its accept queue through
/// `STUCK_POLLS` polls in a row while no request at all reaches the workers mean no
/// accept loop is taking them (tiny_http's accept thread also dies by panicking when
/// it cannot duplicate an accepted socket for lack of file descriptors, without a word
/// to the workers). Under a high connection rate the queue is seldom empty, but
/// requests keep arriving, so load alone does not look stuck.
///
/// It also rescues stranded connections (see `unread_connections`).
fn watch_accept_queue(pool: &Arc<Pool>) {
    let mut stuck = 0;
    let mut seen = pool.received.load(Ordering::Relaxed);
    let mut unread_before = Vec::new();
    loop {
        thread::sleep(WATCH_EVERY);
        let unread = unread_connections(pool.http.addr.port());
        let stranded = unread
            .iter()
            .filter(|peer| unread_before.contains(*peer))
            .count();
        if stranded > 0 {
            log::debug!("{stranded} connections wait unread; freeing connection threads for them");
            nudge(pool.http.addr, stranded);
        }
        unread_before = unread;
        let received = pool.received.load(Ordering::Relaxed);
        let progress = std::mem::replace(&mut seen, received) != received;
        stuck = match accept_queue_len(&pool.http.spare) {
            Ok(0) => 0,
            Ok(_) if progress => 0,
            Ok(_) => stuck + 1,
            Err(e) => {
                log::debug!("cannot read the accept queue: {e}");
                0
            }
        };
        if stuck >= STUCK_POLLS {
            stuck = 0;
            let dead = pool.http.current();
            let why = io::Error::other("connections are waiting and none is accepted");
            Http::restart(pool, &dead, &why);
        }
    }
}

const WATCH_EVERY: Duration = Duration::from_millis(500);

/// The peers of established connections to `port` with request bytes nobody has read.
///
/// tiny_http's connection-thread pool queues a new connection when it counts an idle
/// thread that is in fact already taken by an earlier connection of the same burst; a
/// keep-alive connection holds its thread for its whole life, so the queued one would
/// wait until some other connection closes, its request unread. Such connections show
/// in the kernel's table with a non-empty receive queue.
fn unread_connections(port: u16) -> Vec<String> {
    let mut peers = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(remote), Some(state), Some(queues)) =
                (fields.get(1), fields.get(2), fields.get(3), fields.get(4))
            else {
                continue;
            };
            let local_port = local
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            let unread = queues
                .split(':')
                .nth(1)
                .and_then(|q| u64::from_str_radix(q, 16).ok());
            // 01: ESTABLISHED.
            if *state == "01" && local_port == Some(port) && unread.is_some_and(|n| n > 0) {
                peers.push((*remote).to_owned());
            }
        }
    }
    peers
}

/// Opens and closes `n` connections to the router itself. Each one gets a connection
/// thread (a new one when none is idle), which finds it closed at once and moves on to
/// the oldest queued connection: a stranded one.
fn nudge(addr: SocketAddr, n: usize) {
    let target = match addr {
        SocketAddr::V4(a) if a.ip().is_unspecified() => {
            SocketAddr::from(([127, 0, 0, 1], a.port()))
        }
        SocketAddr::V6(a) if a.ip().is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, a.port()))
        }
        other => other,
    };
    for _ in 0..n {
        if let Err(e) = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(1)) {
            log::debug!("cannot nudge the connection pool: {e}");
            return;
        }
    }
}
const STUCK_POLLS: u32 = 4;

/// The number of connections waiting in the listening socket's accept queue (Linux
/// reports it as `tcpi_unacked` of a listening socket).
fn accept_queue_len(listener: &TcpListener) -> io::Result<u32> {
    // SAFETY: `tcp_info` is plain old data, so all zeroes is a valid value.
    #[allow(unsafe_code)]
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the fd is an open socket for the duration of the call; `info` and `len`
    // are live and `len` holds the size of `info`.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::getsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(info.tcpi_unacked)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// How long a retired server's connections are still served.
const RETIRED_FOR: Duration = Duration::from_secs(600);

/// How long an idle worker waits on the current server before looking at retired
/// ones and at a possibly restarted current one.
const IDLE_POLL: Duration = Duration::from_secs(1);
/// The same while retired servers exist.
const RETIRED_POLL: Duration = Duration::from_millis(50);

fn new_server(
    listener: TcpListener,
    addr: SocketAddr,
    identity: Option<tiny_http::SslConfig>,
) -> Result<tiny_http::Server, String> {
    // No idle connection threads kept in advance: each restart would leave them behind.
    let mut config = tiny_http::ServerConfig::new_http(addr)
        .map_err(|e| format!("bad listen address {addr}: {e}"))?
        .set_min_threads(0);
    config.ssl = identity;
    tiny_http::Server::from_listener(listener, addr.into(), config)
        .map_err(|e| format!("cannot start the HTTP server on {addr}: {e}"))
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
    let pool = Arc::new(Pool {
        http: Http::new(listener, addr, identity)?,
        shared,
        size: Mutex::new(0),
        received: AtomicU64::new(0),
    });
    pool.grow_to(workers)?;
    let watched = Arc::clone(&pool);
    thread::Builder::new()
        .name("accept-watchdog".to_owned())
        .spawn(move || watch_accept_queue(&watched))
        .map_err(|e| format!("cannot start the accept watchdog: {e}"))?;
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
        let server = pool.http.current();
        match server.recv_timeout(pool.http.idle_poll()) {
            Ok(Ok(Some(request))) => {
                pool.received.fetch_add(1, Ordering::Relaxed);
                serve(request, &pool.shared);
                // A busy pool never idles: look at the retired servers between
                // requests too, so their connections are not starved.
                if pool.http.has_retired.load(Ordering::Relaxed) {
                    serve_retired(pool);
                }
            }
            Ok(Ok(None)) => serve_retired(pool),
            // tiny_http has already answered a malformed request with 400. Its error
            // type is private, and a client closing an idle keep-alive connection
            // arrives here too, so this is trace, not debug.
            Ok(Err(e)) => log::trace!("unreadable request: {e}"),
            Err(e) => Http::restart(pool, &server, &e),
        }
    }
}

fn serve_retired(pool: &Arc<Pool>) {
    if let Some(request) = pool.http.retired_request() {
        pool.received.fetch_add(1, Ordering::Relaxed);
        serve(request, &pool.shared);
    }
}

/// One request, with a panic contained to it: tiny_http answers a request dropped
/// during unwinding with 500, the `Slot` guard gives its slot back, and this worker
/// goes on with the next request.
fn serve(request: tiny_http::Request, shared: &Arc<Shared>) {
    contain_panic(request, |request| {
        if let Some(request) = endpoints::try_handle(request, shared) {
            relay::handle(request, shared);
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
