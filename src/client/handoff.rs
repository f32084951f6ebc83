//! Taking a connection back from the worker that served one of its requests, and
//! noticing meanwhile a client that leaves, from the client's own socket.
//!
//! While a worker has the request, the connection thread waits in `poll` on the
//! socket, for one of:
//! - the client's next request (`POLLIN`): the way a keep-alive connection usually
//!   goes on, by which time the worker has handed the connection back;
//! - the client leaving (`POLLRDHUP`, the client's FIN, or a hang-up): the request is
//!   marked (`Conn::mark_client_left`), so it leaves the queue or its backend
//!   connection is shut down, which vLLM sees and stops generating, as nginx does with
//!   `proxy_ignore_client_abort off`. A client that closes its side after sending a
//!   request counts as gone, as with nginx;
//! - the connection's eventfd, which the worker writes only when the socket would not
//!   tell: a connection to be closed, a TLS one (rustls may hold bytes already read),
//!   one whose next request is already in its buffer, or a thread that is already
//!   past the socket (the client pipelined, or left).
//!
//! Waking the thread on every hand-back instead, to sleep again in `recv` until the
//! next request came, cost a context switch per request: 4.2 per request against
//! tiny_http's 3.3, and about 15% more CPU per request at 16 connections. No thread
//! scans sockets, and nothing here needs `/proc`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::thread;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::client::registry::Returned;

/// Where a connection is while one of its requests runs, and how to wake its thread.
pub struct Handoff {
    state: Mutex<State>,
    wake: OwnedFd,
}

#[derive(Default)]
struct State {
    /// The connection, once the worker is done with it, and when it came back.
    returned: Option<(Returned, Instant)>,
    /// The connection thread waits for the eventfd only, not for the socket.
    past_socket: bool,
}

impl Handoff {
    /// A handoff with its own eventfd (one more descriptor per client connection).
    pub fn new() -> io::Result<Handoff> {
        // SAFETY: eventfd takes no pointers; the result is checked before use.
        #[allow(unsafe_code)]
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        #[allow(unsafe_code)]
        let wake = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Handoff {
            state: Mutex::new(State::default()),
            wake,
        })
    }

    /// Gives the connection back to its thread (worker, once per request).
    pub fn hand_back(&self, returned: Returned) {
        let socket_tells = returned.reusable
            && !returned.connection.is_secure()
            && returned.connection.buffered().is_empty();
        let mut state = self.state.lock();
        let wake = !socket_tells || state.past_socket;
        state.returned = Some((returned, Instant::now()));
        drop(state);
        if wake {
            self.signal();
        }
    }

    fn signal(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: `one` is 8 live bytes, the size an eventfd write takes.
        #[allow(unsafe_code)]
        let n = unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        if n < 0 {
            // Only a counter at its maximum fails, which a reader resets: the thread
            // is woken either way.
            log::debug!(
                "cannot signal a connection thread: {}",
                io::Error::last_os_error()
            );
        }
    }

    /// Resets the eventfd after it woke the thread.
    fn clear(&self) {
        let mut count = [0u8; 8];
        // SAFETY: `count` is 8 live bytes; the eventfd is non-blocking.
        #[allow(unsafe_code)]
        unsafe {
            libc::read(
                self.wake.as_raw_fd(),
                count.as_mut_ptr().cast(),
                count.len(),
            );
        }
    }

    /// Waits until the worker hands the connection back (connection thread), and says
    /// when it did. `socket` is the client's; `client_left` runs at most once, when
    /// the client closes its side before that. Wakes every `check_every` to look
    /// again, so a missed signal can only delay, never strand, the thread.
    pub fn take_back(
        &self,
        socket: RawFd,
        check_every: Duration,
        client_left: impl FnOnce(),
    ) -> (Returned, Instant) {
        let mut client_left = Some(client_left);
        // What the thread still waits for on the socket.
        let mut watch = libc::POLLIN | libc::POLLRDHUP;
        loop {
            {
                let mut state = self.state.lock();
                if let Some(returned) = state.returned.take() {
                    state.past_socket = false;
                    return returned;
                }
                state.past_socket = watch & libc::POLLIN == 0;
            }
            let mut fds = [
                libc::pollfd {
                    fd: if watch == 0 { -1 } else { socket },
                    events: watch,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.wake.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            let timeout = check_every.as_millis().clamp(1, i32::MAX as u128) as i32;
            // SAFETY: `fds` is a live array of the length passed.
            #[allow(unsafe_code)]
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    log::debug!("cannot wait on a client socket: {e}");
                    thread::sleep(Duration::from_millis(10));
                }
                continue;
            }
            if fds[1].revents != 0 {
                self.clear();
            }
            let seen = fds[0].revents;
            if seen == 0 || self.state.lock().returned.is_some() {
                continue;
            }
            if seen & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
                if let Some(left) = client_left.take() {
                    left();
                }
                watch = 0;
            } else {
                // The next request came before this one ended (pipelining): it waits
                // in the socket; only a leave is watched for now.
                watch = libc::POLLRDHUP;
            }
        }
    }
}
