//! The listening socket, tiny_http, and the fixed pool of worker threads that take
//! requests from it.
//!
//! tiny_http reads request heads on its own per-connection threads and queues them;
//! each worker here loops on `recv()` and carries one request from admission to the
//! last byte of its reply. A stream holds its worker for its whole life, and so does a
//! request waiting in the admission queue, so the pool must be larger than every slot
//! plus the whole queue; otherwise requests would wait in tiny_http's queue where
//! neither `queue_timeout` nor `max_queue_size` can see them (`worker_count`).

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::thread;

use parking_lot::Mutex;

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
    server: Arc<tiny_http::Server>,
    shared: Arc<Shared>,
    size: Mutex<usize>,
}

impl Pool {
    /// Starts workers until the pool has `n`.
    pub fn grow_to(&self, n: usize) -> Result<(), String> {
        let mut size = self.size.lock();
        while *size < n {
            let i = *size;
            let (server, shared) = (Arc::clone(&self.server), Arc::clone(&self.shared));
            thread::Builder::new()
                .name(format!("worker-{i}"))
                .stack_size(WORKER_STACK)
                .spawn(move || worker(&server, &shared))
                .map_err(|e| format!("cannot start worker thread {i} of {n}: {e}"))?;
            *size += 1;
        }
        Ok(())
    }

    pub fn size(&self) -> usize {
        *self.size.lock()
    }
}

/// Binds `host:port` and starts a pool of `workers` threads.
pub fn start(
    shared: Arc<Shared>,
    host: &str,
    port: u16,
    workers: usize,
) -> Result<(SocketAddr, Arc<Pool>), String> {
    let listener = TcpListener::bind((host, port))
        .map_err(|e| format!("cannot listen on {host}:{port}: {e}"))?;
    set_nodelay(&listener)
        .map_err(|e| format!("cannot set TCP_NODELAY on the listening socket: {e}"))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("cannot read the listening address: {e}"))?;
    let config = tiny_http::ServerConfig::new_http(addr)
        .map_err(|e| format!("bad listen address {addr}: {e}"))?;
    let server = tiny_http::Server::from_listener(listener, addr.into(), config)
        .map_err(|e| format!("cannot start the HTTP server on {addr}: {e}"))?;
    let pool = Arc::new(Pool {
        server: Arc::new(server),
        shared,
        size: Mutex::new(0),
    });
    pool.grow_to(workers)?;
    Ok((addr, pool))
}

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

fn worker(server: &tiny_http::Server, shared: &Arc<Shared>) {
    loop {
        match server.recv() {
            Ok(Ok(request)) => serve(request, shared),
            // tiny_http has already answered a malformed request with 400. Its error
            // type is private, and a client closing an idle keep-alive connection
            // arrives here too, so this is trace, not debug.
            Ok(Err(e)) => log::trace!("unreadable request: {e}"),
            Err(e) => {
                log::error!("the HTTP server stopped accepting connections: {e}");
                return;
            }
        }
    }
}

/// One request, with a panic contained to it: tiny_http answers a request dropped
/// during unwinding with 500, the `Slot` guard gives its slot back, and this worker
/// goes on with the next request.
fn serve(request: tiny_http::Request, shared: &Arc<Shared>) {
    let result = panic::catch_unwind(AssertUnwindSafe(|| {
        if let Some(request) = endpoints::try_handle(request, shared) {
            relay::handle(request, shared);
        }
    }));
    if let Err(panic) = result {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_owned());
        log::error!(
            "a request handler panicked ({what}); the request got 500 and the router goes on"
        );
    }
}
