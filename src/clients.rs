//! Client connections: how many are open, what each one is doing, and the janitor
//! thread that closes those breaking a client timeout.
//!
//! tiny_http reads and writes the client sockets and never hands them out, and a
//! socket-level read timeout (`SO_RCVTIMEO`) would also fire on the read tiny_http
//! keeps waiting on during a long stream (it would then send a stray 400 after the
//! stream). So the timeouts are kept here, by the clock: every connection has a `Conn`
//! whose stamps the threads serving it update, and the janitor compares them with the
//! limits a few times a second. To close a connection it looks the socket up in the
//! kernel's table (`/proc/net/tcp`: peer address and inode) and among this process's
//! file descriptors (`/proc/self/fd`), and shuts it down: every thread blocked on that
//! socket wakes with an error, which each already handles as a client that went away.
//!
//! Who writes what:
//! - the accept thread: `open` (one more per connection it admits, see `admit`);
//! - a connection thread: its `Conn` (the peer, and one more `active` per request read);
//! - the worker serving a request: through its `Ticket`, the body and write stamps, and
//!   at the end `idle_since` and one `active` less;
//! - the janitor: `client_left` (when the kernel shows the client's FIN while a
//!   request runs), and otherwise it only shuts sockets down: the client's, or the
//!   backend connection of a request whose client left (`upstream::Call`).

use std::collections::{HashMap, HashSet};
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::thread;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::config::Settings;
use crate::shared::Shared;
use crate::upstream::Call;

/// Every client connection the router holds.
pub struct Clients {
    epoch: Instant,
    open: AtomicUsize,
    /// Connections that have sent a request, by peer: how the janitor finds the `Conn`
    /// of a socket it sees in the kernel's table.
    by_peer: Mutex<HashMap<SocketAddr, Weak<Conn>>>,
}

impl Clients {
    pub fn new() -> Arc<Clients> {
        Arc::new(Clients {
            epoch: Instant::now(),
            open: AtomicUsize::new(0),
            by_peer: Mutex::new(HashMap::new()),
        })
    }

    /// Client connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Counts in a connection just accepted; `None` when `cap` are already open.
    pub fn admit(self: &Arc<Self>, cap: usize) -> Option<Arc<Conn>> {
        self.open
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < cap).then_some(n + 1)
            })
            .ok()?;
        Some(Arc::new(Conn {
            clients: Arc::clone(self),
            peer: OnceLock::new(),
            active: AtomicU32::new(0),
            idle_since: AtomicU64::new(self.now()),
            body_since: AtomicU64::new(NOT),
            write_since: AtomicU64::new(NOT),
            closed_by_timeout: AtomicBool::new(false),
            client_left: AtomicBool::new(false),
            backend_call: Arc::default(),
            ended: Mutex::new(false),
            ended_cv: Condvar::new(),
        }))
    }

    /// Milliseconds since the router started, plus one: zero (`NOT`) means "not
    /// doing it" in the stamps.
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    fn lookup(&self, peer: &SocketAddr) -> Option<Arc<Conn>> {
        self.by_peer.lock().get(peer).and_then(Weak::upgrade)
    }
}

/// A stamp that is not set.
const NOT: u64 = 0;

/// One client connection. It lives as long as its connection thread or any request
/// read from it, which is as long as tiny_http keeps the socket open.
pub struct Conn {
    clients: Arc<Clients>,
    peer: OnceLock<SocketAddr>,
    /// Requests read from the connection and not finished.
    active: AtomicU32,
    /// When the last request finished (or the connection opened).
    idle_since: AtomicU64,
    /// When the body being read started; `NOT` when none is.
    body_since: AtomicU64,
    /// When the write in progress started; `NOT` when none is.
    write_since: AtomicU64,
    closed_by_timeout: AtomicBool,
    /// The client closed its side while a request was running (the janitor saw the
    /// socket in CLOSE_WAIT).
    client_left: AtomicBool,
    /// The backend connection its request is using, stopped when the client leaves.
    backend_call: Arc<Call>,
    /// Set by a ticket when its request ends, taken by the connection thread
    /// (`wait_request_end`).
    ended: Mutex<bool>,
    ended_cv: Condvar,
}

impl Conn {
    /// Counts a request read from this connection (connection thread).
    pub fn ticket(self: &Arc<Self>, peer: Option<SocketAddr>) -> Ticket {
        if let Some(peer) = peer {
            if self.peer.set(canonical(peer)).is_ok() {
                self.clients
                    .by_peer
                    .lock()
                    .insert(canonical(peer), Arc::downgrade(self));
            }
        }
        self.active.fetch_add(1, Ordering::SeqCst);
        Ticket {
            conn: Arc::clone(self),
        }
    }

    /// Waits until the request of the last ticket ends (connection thread; one
    /// request at a time, see `server::read_requests`).
    pub fn wait_request_end(&self) {
        let mut ended = self.ended.lock();
        while !*ended {
            self.ended_cv.wait(&mut ended);
        }
        *ended = false;
    }

    fn state(&self) -> State {
        State {
            active: self.active.load(Ordering::SeqCst),
            idle_since: self.idle_since.load(Ordering::SeqCst),
            body_since: self.body_since.load(Ordering::SeqCst),
            write_since: self.write_since.load(Ordering::SeqCst),
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(peer) = self.peer.get() {
            let mut by_peer = self.clients.by_peer.lock();
            // The same peer address may already belong to a newer connection.
            if by_peer.get(peer).is_some_and(|w| w.strong_count() == 0) {
                by_peer.remove(peer);
            }
        }
        self.clients.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One request's hold on its connection, kept by the worker serving it.
pub struct Ticket {
    conn: Arc<Conn>,
}

impl Ticket {
    /// Marks the request body as being read until the returned guard drops.
    pub fn reading_body(&self) -> Stamp {
        Stamp::set(&self.conn, |c| &c.body_since)
    }

    /// Marks a write to the client as in progress until the returned guard drops.
    pub fn writing(&self) -> Stamp {
        Stamp::set(&self.conn, |c| &c.write_since)
    }

    /// Wraps the writer of the reply so each write is timed.
    pub fn watch<W: Write>(&self, inner: W) -> Watched<W> {
        Watched {
            inner,
            conn: Arc::clone(&self.conn),
        }
    }

    /// Whether the janitor closed this connection for a timeout.
    pub fn timed_out(&self) -> bool {
        self.conn.closed_by_timeout.load(Ordering::SeqCst)
    }

    /// Whether the client has closed its side of the connection: nobody will read
    /// the reply, so a request not yet sent to a backend should not be, and one at a
    /// backend has had its backend connection stopped.
    pub fn client_left(&self) -> bool {
        self.conn.client_left.load(Ordering::SeqCst)
    }

    /// Where the request records the backend connection it uses.
    pub fn backend_call(&self) -> &Arc<Call> {
        &self.conn.backend_call
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // The idle clock is set before `active` drops, so the janitor never sees an
        // idle connection with the previous request's time.
        let now = self.conn.clients.now();
        self.conn.idle_since.store(now, Ordering::SeqCst);
        self.conn.active.fetch_sub(1, Ordering::SeqCst);
        *self.conn.ended.lock() = true;
        self.conn.ended_cv.notify_one();
    }
}

/// A phase of a request, stamped with its start until dropped.
pub struct Stamp {
    conn: Arc<Conn>,
    field: fn(&Conn) -> &AtomicU64,
}

impl Stamp {
    fn set(conn: &Arc<Conn>, field: fn(&Conn) -> &AtomicU64) -> Stamp {
        field(conn).store(conn.clients.now(), Ordering::SeqCst);
        Stamp {
            conn: Arc::clone(conn),
            field,
        }
    }
}

impl Drop for Stamp {
    fn drop(&mut self) {
        (self.field)(&self.conn).store(NOT, Ordering::SeqCst);
    }
}

/// A writer to the client whose every write is stamped, so a write that blocks (the
/// client stopped reading) is seen by the janitor.
pub struct Watched<W> {
    inner: W,
    conn: Arc<Conn>,
}

/// A blocking socket write returns only when all of it is in the kernel's buffer, so
/// a large write is cut into pieces: each finished piece is progress.
const WRITE_PIECE: usize = 64 * 1024;

impl<W: Write> Write for Watched<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let _writing = Stamp::set(&self.conn, |c| &c.write_since);
        self.inner.write(&buf[..buf.len().min(WRITE_PIECE)])
    }

    fn flush(&mut self) -> io::Result<()> {
        let _writing = Stamp::set(&self.conn, |c| &c.write_since);
        self.inner.flush()
    }
}

/// The client timeouts in force, in the stamps' milliseconds.
#[derive(Debug, Clone, Copy)]
struct Limits {
    idle: u64,
    body: u64,
    write: u64,
}

impl Limits {
    fn of(s: &Settings) -> Limits {
        let ms = |d: Duration| d.as_millis().min(u128::from(u64::MAX)) as u64;
        Limits {
            idle: ms(s.client_idle_timeout),
            body: ms(s.client_body_timeout),
            write: ms(s.client_write_timeout),
        }
    }

    /// How often the janitor looks: a quarter of the shortest timeout, but never more
    /// often than every 100 ms nor less than every second. A connection is closed
    /// within a tick after its timeout, or two for one that has not sent a request
    /// yet (its clock starts when the janitor first sees it).
    fn tick(&self) -> Duration {
        let shortest = self.idle.min(self.body).min(self.write);
        Duration::from_millis((shortest / 4).clamp(100, 1000))
    }
}

/// A connection's stamps at one instant.
#[derive(Debug, Clone, Copy)]
struct State {
    active: u32,
    idle_since: u64,
    body_since: u64,
    write_since: u64,
}

/// Why the janitor closes a connection: the label of
/// `vllm_router_client_connections_closed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// No whole request head within `client_idle_timeout`.
    Idle,
    /// A body slower than `client_body_timeout`.
    SlowBody,
    /// A write blocked for `client_write_timeout`.
    StalledWrite,
}

impl Reason {
    pub fn label(self) -> &'static str {
        match self {
            Reason::Idle => "idle",
            Reason::SlowBody => "slow_body",
            Reason::StalledWrite => "stalled_write",
        }
    }
}

/// Whether a connection breaks a limit at `now`. `state` is `None` for a connection
/// that has not sent a whole request head yet; `seen` is when the janitor first saw it.
fn verdict(state: Option<State>, seen: u64, now: u64, limits: &Limits) -> Option<Reason> {
    let over = |since: u64, limit: u64| since != NOT && now.saturating_sub(since) > limit;
    let Some(s) = state else {
        return over(seen, limits.idle).then_some(Reason::Idle);
    };
    if over(s.write_since, limits.write) {
        Some(Reason::StalledWrite)
    } else if over(s.body_since, limits.body) {
        Some(Reason::SlowBody)
    } else if s.active == 0 && over(s.idle_since, limits.idle) {
        Some(Reason::Idle)
    } else {
        None
    }
}

/// Starts the janitor for connections to `port`.
pub fn spawn_janitor(shared: Arc<Shared>, port: u16) -> io::Result<()> {
    if let Err(e) = std::fs::metadata("/proc/net/tcp") {
        log::warn!(
            "cannot read /proc/net/tcp ({e}): client timeouts are not enforced; mount /proc"
        );
    }
    thread::Builder::new()
        .name("janitor".to_owned())
        .spawn(move || janitor(&shared, port))
        .map(|_| ())
}

fn janitor(shared: &Shared, port: u16) {
    let clients = &shared.clients;
    // When each socket (by inode) was first seen: the age of connections that have
    // not sent a request yet.
    let mut first_seen: HashMap<u64, u64> = HashMap::new();
    loop {
        let limits = Limits::of(&shared.config().settings);
        thread::sleep(limits.tick());
        let now = clients.now();
        let sockets = client_sockets(port);
        let mut doomed = Vec::new();
        for socket in &sockets {
            let seen = *first_seen.entry(socket.inode).or_insert(now);
            let conn = clients.lookup(&socket.peer);
            // A request still running on a connection its client has closed: nobody
            // will read the reply (see `Ticket::client_left`).
            if let Some(conn) = conn.as_ref() {
                if socket.client_closed
                    && conn.active.load(Ordering::SeqCst) > 0
                    && !conn.client_left.swap(true, Ordering::SeqCst)
                {
                    conn.backend_call.shut_down();
                }
            }
            if let Some(reason) = verdict(conn.as_ref().map(|c| c.state()), seen, now, &limits) {
                if let Some(conn) = &conn {
                    conn.closed_by_timeout.store(true, Ordering::SeqCst);
                }
                doomed.push((socket.inode, reason));
            }
        }
        let present: HashSet<u64> = sockets.iter().map(|s| s.inode).collect();
        first_seen.retain(|inode, _| present.contains(inode));
        if doomed.is_empty() {
            continue;
        }
        let closed = shut_down(doomed);
        for reason in &closed {
            shared.metrics.observe_connection_closed(reason.label());
        }
        let slow = closed.iter().filter(|r| **r != Reason::Idle).count();
        if slow > 0 {
            log::warn!(
                "closed {slow} client connections that broke client_body_timeout or client_write_timeout"
            );
        }
        log::debug!("closed {} client connections for timeouts", closed.len());
    }
}

/// An established client connection as the kernel lists it.
struct Socket {
    inode: u64,
    peer: SocketAddr,
    /// The client has sent its FIN (CLOSE_WAIT).
    client_closed: bool,
}

/// The established (or half-closed by the client) connections to `port`.
fn client_sockets(port: u16) -> Vec<Socket> {
    let mut sockets = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        sockets.extend(text.lines().skip(1).filter_map(|l| parse_socket(l, port)));
    }
    sockets
}

/// One line of `/proc/net/tcp{,6}`, if it is a connection to `port` with a socket
/// still open (01: ESTABLISHED, 08: CLOSE_WAIT). Connections not accepted yet have no
/// socket (inode 0): nothing to close, and they are not the router's yet.
fn parse_socket(line: &str, port: u16) -> Option<Socket> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let (local, remote, state, inode) = (
        fields.get(1)?,
        fields.get(2)?,
        fields.get(3)?,
        fields.get(9)?,
    );
    if !matches!(*state, "01" | "08") || parse_addr(local)?.port() != port {
        return None;
    }
    let inode = inode.parse().ok().filter(|&i| i != 0)?;
    Some(Socket {
        inode,
        peer: canonical(parse_addr(remote)?),
        client_closed: *state == "08",
    })
}

/// `0100007F:1F90` or the IPv6 form: the address as the kernel prints it, each
/// 32-bit word in host byte order.
fn parse_addr(text: &str) -> Option<SocketAddr> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        let w = u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16).ok()?;
        Some(w.to_ne_bytes())
    };
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// The same client seen through an IPv6 socket (`::ffff:a.b.c.d`) and an IPv4 one
/// compare equal.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Shuts down the sockets with the given inodes; returns the reasons of those found.
fn shut_down(mut doomed: Vec<(u64, Reason)>) -> Vec<Reason> {
    let mut closed = Vec::new();
    let Ok(fds) = std::fs::read_dir("/proc/self/fd") else {
        return closed;
    };
    for entry in fds.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(link) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let Some(inode) = link
            .to_str()
            .and_then(|l| l.strip_prefix("socket:["))
            .and_then(|l| l.strip_suffix(']'))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        // tiny_http holds each socket twice (a reading and a writing descriptor).
        let Some(at) = doomed.iter().position(|(i, _)| *i == inode) else {
            continue;
        };
        if shut_down_fd(fd, inode) {
            closed.push(doomed.swap_remove(at).1);
        }
    }
    closed
}

/// Shuts the socket behind `fd` down if it still is the one with `inode`. The fd may
/// have been closed and reused since it was listed, so the check is made on a
/// duplicate, which keeps the socket from changing under us.
fn shut_down_fd(fd: i32, inode: u64) -> bool {
    // SAFETY: fcntl on any integer is memory-safe; it fails with EBADF if `fd` is not
    // open. The result, when not negative, is a new descriptor this function owns.
    #[allow(unsafe_code)]
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        return false;
    }
    // SAFETY: `dup` is a fresh descriptor owned by nobody else.
    #[allow(unsafe_code)]
    let dup = unsafe { OwnedFd::from_raw_fd(dup) };
    let file = std::fs::File::from(dup);
    let same = file
        .metadata()
        .is_ok_and(|m| std::os::unix::fs::MetadataExt::ino(&m) == inode);
    if !same {
        return false;
    }
    // SAFETY: the descriptor is open (owned by `file`) for the duration of the call.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::shutdown(file.as_raw_fd(), libc::SHUT_RDWR) };
    rc == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        idle: 1000,
        body: 2000,
        write: 3000,
    };

    fn state(active: u32, idle_since: u64, body_since: u64, write_since: u64) -> State {
        State {
            active,
            idle_since,
            body_since,
            write_since,
        }
    }

    #[test]
    fn a_connection_without_a_request_is_closed_after_the_idle_timeout() {
        assert_eq!(verdict(None, 10, 1010, &LIMITS), None);
        assert_eq!(verdict(None, 10, 1011, &LIMITS), Some(Reason::Idle));
    }

    #[test]
    fn an_idle_keep_alive_connection_is_closed_but_a_busy_one_is_not() {
        assert_eq!(
            verdict(Some(state(0, 5, NOT, NOT)), 1, 1006, &LIMITS),
            Some(Reason::Idle)
        );
        // A long stream or a long queue wait: the client owes nothing.
        assert_eq!(
            verdict(Some(state(1, 5, NOT, NOT)), 1, 100_000, &LIMITS),
            None
        );
    }

    #[test]
    fn slow_bodies_and_blocked_writes_are_timed_from_their_start() {
        assert_eq!(verdict(Some(state(1, 1, 100, NOT)), 1, 2100, &LIMITS), None);
        assert_eq!(
            verdict(Some(state(1, 1, 100, NOT)), 1, 2101, &LIMITS),
            Some(Reason::SlowBody)
        );
        assert_eq!(verdict(Some(state(1, 1, NOT, 100)), 1, 3100, &LIMITS), None);
        assert_eq!(
            verdict(Some(state(1, 1, NOT, 100)), 1, 3101, &LIMITS),
            Some(Reason::StalledWrite)
        );
    }

    #[test]
    fn the_janitor_looks_often_enough_for_the_shortest_timeout() {
        assert_eq!(LIMITS.tick(), Duration::from_millis(250));
        let long = Limits {
            idle: 60_000,
            body: 60_000,
            write: 60_000,
        };
        assert_eq!(long.tick(), Duration::from_secs(1));
        let short = Limits {
            idle: 100,
            body: 100,
            write: 100,
        };
        assert_eq!(short.tick(), Duration::from_millis(100));
    }

    #[test]
    fn kernel_addresses_parse_in_both_families() {
        assert_eq!(
            parse_addr("0100007F:1F90"),
            Some("127.0.0.1:8080".parse().expect("addr"))
        );
        assert_eq!(
            parse_addr("00000000000000000000000001000000:0050"),
            Some("[::1]:80".parse().expect("addr"))
        );
        let mapped = parse_addr("0000000000000000FFFF00000100007F:1F90").map(canonical);
        assert_eq!(mapped, Some("127.0.0.1:8080".parse().expect("addr")));
        assert_eq!(parse_addr("garbage"), None);
    }

    #[test]
    fn only_open_connections_to_the_port_are_listed() {
        let line = "   3: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 20 4 30 10 -1";
        let socket = parse_socket(line, 8080).expect("listed");
        assert_eq!((socket.inode, socket.peer.port()), (4242, 50000));
        assert!(!socket.client_closed);
        let half_closed = line.replace(" 01 ", " 08 ");
        assert!(parse_socket(&half_closed, 8080).is_some_and(|s| s.client_closed));
        assert!(parse_socket(line, 8081).is_none());
        let listening = line.replace(" 01 ", " 0A ");
        assert!(parse_socket(&listening, 8080).is_none());
        let unaccepted = line.replace(" 4242 ", " 0 ");
        assert!(parse_socket(&unaccepted, 8080).is_none());
    }

    #[test]
    fn the_open_count_stops_at_the_cap_and_falls_when_connections_end() {
        let clients = Clients::new();
        let a = clients.admit(2).expect("first");
        let b = clients.admit(2).expect("second");
        assert!(clients.admit(2).is_none());
        drop(a);
        let ticket = b.ticket(Some("127.0.0.1:5000".parse().expect("addr")));
        drop(b);
        assert_eq!(clients.open(), 1, "the ticket keeps its connection counted");
        drop(ticket);
        assert_eq!(clients.open(), 0);
        assert!(clients.by_peer.lock().is_empty());
    }

    #[test]
    fn every_reason_is_a_label_the_metrics_write() {
        for reason in [Reason::Idle, Reason::SlowBody, Reason::StalledWrite] {
            assert!(crate::metrics::CONNECTION_CLOSE_REASONS.contains(&reason.label()));
        }
    }

    #[test]
    fn the_connection_thread_wakes_when_its_request_ends() {
        let clients = Clients::new();
        let conn = clients.admit(1).expect("admitted");
        let ticket = conn.ticket(None);
        // Whichever comes first, the end or the wait, the wait returns.
        let worker = thread::spawn(move || drop(ticket));
        conn.wait_request_end();
        worker.join().expect("worker");
        // A request that ended before the wait does not make it block.
        drop(conn.ticket(None));
        conn.wait_request_end();
    }
}
