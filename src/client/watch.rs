//! Noticing a client that leaves while its request waits in line or at its backend,
//! from the client's own socket: one thread waits in `epoll` for `EPOLLRDHUP` (the
//! client's FIN) or a hang-up on the sockets of the connections whose request is with
//! a worker. Nothing is written to the client while it waits, so without this a client
//! that gave up would only be noticed at the first token, and the backend would keep
//! generating for nobody.
//!
//! When one fires the request is marked (`Conn::mark_client_left`): it leaves the
//! queue, or its backend connection is shut down, which vLLM sees and stops
//! generating (as nginx does with `proxy_ignore_client_abort off`). A client that
//! closes its side after sending a request counts as gone, as with nginx.
//!
//! Only sockets with a request running are registered, each under a token of its
//! own; unregistering takes the token out under the same lock the watcher marks
//! under, so a late event never reaches the connection's next request.

use std::collections::HashMap;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::thread;

use parking_lot::Mutex;

use crate::client::registry::Conn;

/// The watcher of connections whose request runs.
pub struct Watcher {
    epoll: RawFd,
    next_token: AtomicU64,
    watched: Mutex<HashMap<u64, Weak<Conn>>>,
}

/// A socket being watched until this drops.
pub struct Watching<'a> {
    watcher: &'a Watcher,
    fd: RawFd,
    token: u64,
}

impl Watcher {
    /// Starts the watcher thread.
    pub fn start() -> io::Result<Arc<Watcher>> {
        // SAFETY: epoll_create1 takes no pointers; the result is checked.
        #[allow(unsafe_code)]
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epoll < 0 {
            return Err(io::Error::last_os_error());
        }
        let watcher = Arc::new(Watcher {
            epoll,
            next_token: AtomicU64::new(1),
            watched: Mutex::new(HashMap::new()),
        });
        let running = Arc::clone(&watcher);
        thread::Builder::new()
            .name("watcher".to_owned())
            .stack_size(64 * 1024)
            .spawn(move || running.run())?;
        Ok(watcher)
    }

    /// Watches `fd`, the socket of `conn`, until the guard drops. A socket that cannot
    /// be registered is simply not watched: its request runs as it would anyway.
    pub fn watch<'a>(&'a self, fd: RawFd, conn: &Arc<Conn>) -> Watching<'a> {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        self.watched.lock().insert(token, Arc::downgrade(conn));
        let mut event = libc::epoll_event {
            events: (libc::EPOLLRDHUP | libc::EPOLLONESHOT) as u32,
            u64: token,
        };
        // SAFETY: `event` is a live epoll_event for the duration of the call; `fd` is
        // an open socket the caller keeps open until the guard drops.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::epoll_ctl(self.epoll, libc::EPOLL_CTL_ADD, fd, &mut event) };
        if rc != 0 {
            log::debug!(
                "cannot watch a client socket: {}",
                io::Error::last_os_error()
            );
        }
        Watching {
            watcher: self,
            fd,
            token,
        }
    }

    fn run(&self) {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 64];
        loop {
            // SAFETY: `events` is a live buffer of the length passed.
            #[allow(unsafe_code)]
            let n = unsafe {
                libc::epoll_wait(self.epoll, events.as_mut_ptr(), events.len() as i32, -1)
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    log::error!("the client watcher stopped: {e}; clients that leave are noticed only when written to");
                    return;
                }
                continue;
            }
            let watched = self.watched.lock();
            for event in &events[..n as usize] {
                let token = event.u64;
                if let Some(conn) = watched.get(&token).and_then(Weak::upgrade) {
                    conn.mark_client_left();
                }
            }
        }
    }
}

impl Drop for Watching<'_> {
    fn drop(&mut self) {
        self.watcher.watched.lock().remove(&self.token);
        // SAFETY: the caller kept `fd` open; a null event is allowed for EPOLL_CTL_DEL.
        #[allow(unsafe_code)]
        unsafe {
            libc::epoll_ctl(
                self.watcher.epoll,
                libc::EPOLL_CTL_DEL,
                self.fd,
                std::ptr::null_mut(),
            );
        }
    }
}
