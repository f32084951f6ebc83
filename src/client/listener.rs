//! The listening socket and the accept loop: the connection caps (`Clients::admit`),
//! and shedding, rather than failing, when threads or file descriptors run out. Each
//! accepted connection gets its own thread (`client::thread`); the requests those
//! threads read go to the worker pool (`request::pool`).

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use crate::client::registry::Refusal;
use crate::client::thread;
use crate::control::logging::Trouble;
use crate::request::pool::Pool;
use crate::shared::Shared;
use crate::tls;

/// What the accept loop and every connection thread share.
pub(crate) struct Front {
    pub(crate) shared: Arc<Shared>,
    pub(crate) pool: Arc<Pool>,
    pub(crate) tls: Option<tls::Identity>,
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
                std::thread::sleep(ACCEPT_PAUSE);
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
        let spawned = thread::spawn(tcp, peer, conn, Arc::clone(front));
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

const ACCEPT_THREAD: &str = "accept";

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
    let pool = Pool::start(Arc::clone(&shared), workers)?;
    let front = Arc::new(Front {
        shared,
        pool: Arc::clone(&pool),
        tls: identity,
    });
    std::thread::Builder::new()
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
