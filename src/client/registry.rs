//! Every open client connection: how many there are (in all and per client address),
//! and what a connection's threads share while one of its requests runs.
//!
//! Who writes what:
//! - the accept thread: `admit` (one more connection, per address too);
//! - the connection thread: `Conn::ticket` when it lends the connection to a worker,
//!   `take_back` to take it back (`client::handoff`), and `client_left` when the
//!   client closes its side meanwhile, which stops the request's backend connection;
//! - the worker: through its `Request`, `hand_back` once, however the request ends.
//!
//! A `Conn` drops with its connection thread, which gives its places back.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::backend::http::Call;
use crate::client::connection::Connection;
use crate::client::handoff::Handoff;

/// Every client connection the router holds.
pub struct Clients {
    open: AtomicUsize,
    /// Open connections by client address, kept only with `max_connections_per_ip`.
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// Why a new connection is closed as soon as it is accepted: the label of
/// `vllm_router_client_connections_closed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `max_client_connections` are open.
    OverCap,
    /// `max_connections_per_ip` are open from its address.
    PerIp,
    /// No file descriptor was left for the connection's eventfd.
    NoFd,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::OverCap => "over_cap",
            Refusal::PerIp => "per_ip",
            Refusal::NoFd => "no_fd",
        }
    }
}

impl Clients {
    pub fn new() -> Arc<Clients> {
        Arc::new(Clients {
            open: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
        })
    }

    /// Client connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Counts in a connection just accepted from `peer`, unless `cap` are open, or
    /// `per_ip_cap` (when not zero) from its address.
    pub fn admit(
        self: &Arc<Self>,
        peer: SocketAddr,
        cap: usize,
        per_ip_cap: usize,
    ) -> Result<Arc<Conn>, Refusal> {
        self.open
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < cap).then_some(n + 1)
            })
            .map_err(|_| Refusal::OverCap)?;
        let Ok(handoff) = Handoff::new() else {
            self.open.fetch_sub(1, Ordering::SeqCst);
            return Err(Refusal::NoFd);
        };
        let ip = canonical(peer.ip());
        let counted_ip = if per_ip_cap > 0 {
            let mut per_ip = self.per_ip.lock();
            let n = per_ip.entry(ip).or_insert(0);
            if *n >= per_ip_cap {
                drop(per_ip);
                self.open.fetch_sub(1, Ordering::SeqCst);
                return Err(Refusal::PerIp);
            }
            *n += 1;
            Some(ip)
        } else {
            None
        };
        Ok(Arc::new(Conn {
            clients: Arc::clone(self),
            counted_ip,
            peer,
            client_left: AtomicBool::new(false),
            backend_call: Arc::default(),
            handoff,
        }))
    }
}

/// An IPv4 client seen through an IPv6 socket is the same client.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// A connection given back by the worker that served one of its requests.
pub struct Returned {
    pub connection: Connection,
    /// Whether the connection may carry another request: the request's body was read
    /// whole under valid framing and its reply was complete and delimited.
    pub reusable: bool,
}

/// What the threads serving one client connection share.
pub struct Conn {
    clients: Arc<Clients>,
    counted_ip: Option<IpAddr>,
    peer: SocketAddr,
    /// The client closed its side while the current request ran.
    client_left: AtomicBool,
    /// The backend connection the current request uses, stopped when the client leaves.
    backend_call: Arc<Call>,
    handoff: Handoff,
}

impl Conn {
    /// Starts a request of this connection (connection thread).
    pub fn ticket(self: &Arc<Self>) -> Ticket {
        self.client_left.store(false, Ordering::SeqCst);
        self.backend_call.reset();
        Ticket {
            conn: Arc::clone(self),
        }
    }

    /// Waits for the worker to give the connection back, marking the request when the
    /// client leaves meanwhile (connection thread); says when it came back.
    pub fn take_back(&self, socket: RawFd, check_every: Duration) -> (Returned, Instant) {
        self.handoff
            .take_back(socket, check_every, || self.mark_client_left())
    }

    /// The client has gone: nobody will read the reply.
    fn mark_client_left(&self) {
        if !self.client_left.swap(true, Ordering::SeqCst) {
            self.backend_call.shut_down();
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(ip) = self.counted_ip {
            let mut per_ip = self.clients.per_ip.lock();
            if let Some(n) = per_ip.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    per_ip.remove(&ip);
                }
            }
        }
        self.clients.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A request's hold on its connection, kept by the worker serving it.
#[derive(Clone)]
pub struct Ticket {
    conn: Arc<Conn>,
}

impl Ticket {
    /// Whether the client has closed its side of the connection: a request not yet
    /// sent to a backend should not be, and one at a backend has had its backend
    /// connection stopped.
    pub fn client_left(&self) -> bool {
        self.conn.client_left.load(Ordering::SeqCst)
    }

    /// Where the request records the backend connection it uses.
    pub fn backend_call(&self) -> &Arc<Call> {
        &self.conn.backend_call
    }

    pub fn peer(&self) -> SocketAddr {
        self.conn.peer
    }

    /// Gives the connection back to its thread (the request's end).
    pub fn hand_back(&self, returned: Returned) {
        self.conn.handoff.hand_back(returned);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("address")
    }

    #[test]
    fn the_caps_count_connections_in_all_and_per_address() {
        let clients = Clients::new();
        let a = clients.admit(addr("10.0.0.1:1"), 3, 2).expect("first");
        let b = clients
            .admit(addr("[::ffff:10.0.0.1]:2"), 3, 2)
            .expect("second");
        assert_eq!(
            clients.admit(addr("10.0.0.1:3"), 3, 2).err(),
            Some(Refusal::PerIp),
            "the mapped IPv6 address is the same client"
        );
        let c = clients
            .admit(addr("10.0.0.2:1"), 3, 2)
            .expect("another address");
        assert_eq!(
            clients.admit(addr("10.0.0.3:1"), 3, 2).err(),
            Some(Refusal::OverCap)
        );
        assert_eq!(clients.open(), 3);
        drop(a);
        let d = clients
            .admit(addr("10.0.0.1:4"), 3, 2)
            .expect("a place was freed");
        drop((b, c, d));
        assert_eq!(clients.open(), 0);
        assert!(clients.per_ip.lock().is_empty());
    }

    #[test]
    fn every_refusal_has_a_close_reason_in_the_metrics() {
        for refusal in [Refusal::OverCap, Refusal::PerIp, Refusal::NoFd] {
            assert!(
                crate::control::metrics::CONNECTION_CLOSE_REASONS.contains(&refusal.label()),
                "{refusal:?}"
            );
        }
    }
}
