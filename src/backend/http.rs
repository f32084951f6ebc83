//! The HTTP client towards the backends: one ureq `Agent` per backend, every one built
//! from the same configuration (`AgentConfig`), which is read from the settings once at
//! start.
//!
//! One agent per backend, because ureq's connection pool purges its idle connections
//! on every checkout and return in time proportional to idle connections times distinct
//! hosts: one agent shared by all backends made every request dearer as backends were
//! added (3.9 times at 64 backends, issue #7). An agent that only ever sees one host
//! pays for its own idle connections only, and its per-host idle limit is simply its
//! limit.
//!
//! Owner: each backend's entry in the slot table (`backend::registry`). The entry's agent is
//! made with the entry (at start, or when a reload adds the server) and a server that
//! stays across a reload keeps its entry, so its idle connections survive the reload.
//! A `Slot` holds a clone for its request and a health probe one for its round, so the
//! agent of a removed backend, and with it its idle connections, goes when the last of
//! those ends. Clones are cheap: an agent is a handful of `Arc`s.
//!
//! Each agent's connections come from ureq's own connectors, wrapped (`Tracking`) so
//! that the request using a connection can have it stopped from another thread
//! (`Call`): the connection thread does that when the client leaves (`client::handoff`).
//!
//! The wrapper also tells whether a request went out on a connection reused from the
//! pool, and whether any byte of a reply came back on it (`Attempt`): a backend may
//! close an idle keep-alive connection (uvicorn, which serves vLLM, does after 5 s)
//! just as the router sends on it, and such a request is sent again, once, at once, on
//! a fresh connection (`BackendAgent::send`), rather than failing with a 502 nobody
//! caused. A pooled connection that holds unread bytes or that the backend closed is
//! never handed out: ureq probes it at checkout and at return.

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use ureq::config::{AutoHeaderValue, Config, ConfigBuilder};
use ureq::http;
use ureq::typestate::HttpCrateScope;
use ureq::unversioned::resolver::DefaultResolver;
use ureq::unversioned::transport::{
    Buffers, ConnectionDetails, Connector, DefaultConnector, NextTimeout, ShutdownHandle, Transport,
};
use ureq::AsSendBody;

use crate::control::config::Settings;

/// The buffer ureq reads a backend's reply into, one per connection, allocated in full
/// at the connection's first use and kept while it waits in the pool. ureq's default
/// is 128 KiB for this and as much for the output buffer: 256 KiB per connection, most
/// of the router's memory at 1000 streams (364 MiB, issue #7). The relay reads 4 KiB
/// at a time (`relay::READ_BUF`); what sets this size is the response head, which must
/// fit whole: ureq does not grow the buffer, and a head it cannot finish is an error.
/// vLLM's heads are a few hundred bytes, and 8 KiB is where nginx's largest default
/// `proxy_buffer_size` stops too ("upstream sent too big header"). A backend that sends
/// a larger one, up to an endless header (tests/garbage.rs), has this much of it read,
/// and the client gets a 502; it counts as a failure of that backend.
const INPUT_BUFFER: usize = 8 * 1024;

/// One byte under the input buffer, so that a head that fills the buffer is reported as
/// too large ("response header is too big") rather than as a backend that stopped
/// sending, which is what ureq says when it finds no room left to read into.
const MAX_RESPONSE_HEAD: usize = INPUT_BUFFER - 1;

/// The buffer ureq writes the request through, one per connection, also allocated in
/// full at first use. ureq writes the head as many whole lines per write as fit, so
/// the buffer must hold the longest single line, not the whole head; the body goes out
/// in pieces of this size. 4 KiB is many times any ordinary head line. A request with
/// a longer one (the router lets through one header of up to `MAX_HEADER_BYTES` or a
/// target of up to `MAX_TARGET_BYTES`, see `request::headers`) gets a buffer of its own size for
/// that request: see `BackendAgent::configure_request`.
const OUTPUT_BUFFER: usize = 4 * 1024;

/// Idle connections kept per backend, so that a busy backend is not re-dialled for
/// every request; the same as the per-host limit of the single agent before. Pooled
/// connections only exist after that many requests ran at once, and ureq closes those
/// idle longer than its `max_idle_age`.
const MAX_IDLE_PER_BACKEND: usize = 256;

/// What every backend's agent is built from. Read from the settings at start only:
/// a reload that changes TLS files asks for a restart (`control::reload`), so agents made for
/// servers added later are configured like the first ones.
#[derive(Clone)]
pub struct AgentConfig(Config);

impl AgentConfig {
    /// The agent must add nothing of its own to what it relays: no redirects followed,
    /// no status turned into an error, no User-Agent, Accept or Accept-Encoding of its
    /// own, and no decompression (the gzip feature is off in Cargo.toml), so bodies reach
    /// the client as the backend sent them.
    pub fn from_settings(settings: &Settings) -> Result<AgentConfig, String> {
        let builder = ureq::Agent::config_builder();
        #[cfg(feature = "tls")]
        let builder = builder.tls_config(crate::tls::client_config(settings)?);
        #[cfg(not(feature = "tls"))]
        let _ = settings;
        Ok(AgentConfig(
            builder
                .http_status_as_error(false)
                .max_redirects(0)
                .max_redirects_will_error(false)
                .user_agent(AutoHeaderValue::None)
                .accept(AutoHeaderValue::None)
                .accept_encoding(AutoHeaderValue::None)
                .allow_non_standard_methods(true)
                .no_delay(true)
                .input_buffer_size(INPUT_BUFFER)
                .max_response_header_size(MAX_RESPONSE_HEAD)
                .output_buffer_size(OUTPUT_BUFFER)
                .max_idle_connections(MAX_IDLE_PER_BACKEND)
                .max_idle_connections_per_host(MAX_IDLE_PER_BACKEND)
                .build(),
        ))
    }

    /// A new agent, with a connection pool of its own, for one backend. Its
    /// connections tell the request using them how to stop them (`Call`).
    pub fn new_agent(&self) -> BackendAgent {
        BackendAgent(ureq::Agent::with_parts(
            self.0.clone(),
            Tracking(DefaultConnector::new()),
            DefaultResolver::default(),
        ))
    }
}

/// The HTTP client of one backend.
#[derive(Clone)]
pub struct BackendAgent(ureq::Agent);

impl BackendAgent {
    /// `ureq::Agent::configure_request`, with an output buffer large enough for the
    /// longest line of this request's head when the pooled connections' is not: ureq
    /// fails a head line it cannot fit ("output too small"), which would answer a valid
    /// request 502 and count it against a healthy backend. Such a request takes a
    /// connection of its own, outside the pool, since ureq pools only connections whose
    /// buffers match the agent's.
    pub fn configure_request<S: AsSendBody>(
        &self,
        request: http::Request<S>,
    ) -> ConfigBuilder<HttpCrateScope<S>> {
        let longest = longest_head_line(&request);
        let builder = self.0.configure_request(request);
        if longest > OUTPUT_BUFFER {
            builder.output_buffer_size(longest)
        } else {
            builder
        }
    }

    /// Sends a request whose body is a stream (`request::upload`) on a connection of
    /// its own, never a pooled one: such a body cannot be sent a second time, so it
    /// must not meet an idle connection the backend is closing just then.
    pub fn send_fresh<S: AsSendBody>(
        &self,
        request: http::Request<S>,
        configure: impl FnOnce(ConfigBuilder<HttpCrateScope<S>>) -> ConfigBuilder<HttpCrateScope<S>>,
    ) -> Result<http::Response<ureq::Body>, ureq::Error> {
        // One byte more of output buffer than the pool's connections have: ureq neither
        // takes a pooled connection for it nor returns this one to the pool.
        let fresh = self
            .configure_request(request)
            .output_buffer_size(OUTPUT_BUFFER + 1);
        let request = configure(fresh).build();
        Attempt::run(|| self.0.run(request)).0
    }

    /// Sends `request`, configured by `configure`, and waits for its reply head. A
    /// request that failed on a connection reused from the pool before any byte of a
    /// reply came back is sent again, as a copy, once, at once, on a fresh
    /// connection, while `may_retry` agrees: the backend closed that idle connection as
    /// it was used (or answered the previous request early and closed, with its body
    /// unread), so the request never ran there. nginx resends only idempotent requests
    /// then (unless told `non_idempotent`); here no byte of the reply was seen, so a
    /// POST is resent as well.
    pub fn send<S: AsSendBody + Clone>(
        &self,
        request: http::Request<S>,
        configure: impl Fn(ConfigBuilder<HttpCrateScope<S>>) -> ConfigBuilder<HttpCrateScope<S>>,
        may_retry: impl Fn() -> bool,
    ) -> Result<http::Response<ureq::Body>, ureq::Error> {
        let again = copy_of(&request);
        let request = configure(self.configure_request(request)).build();
        let (result, attempt) = Attempt::run(|| self.0.run(request));
        let stale = attempt.reused && !attempt.replied;
        match result {
            Err(ureq::Error::Io(e)) if stale && may_retry() => {
                log::debug!("a pooled backend connection failed before any reply ({e}); sending again on a fresh one");
                // One byte more of output buffer than the pool's connections have: ureq
                // neither takes a connection from the pool for such a request nor
                // returns its own to it, so this one is new and goes with the request.
                let fresh = self
                    .configure_request(again)
                    .output_buffer_size(OUTPUT_BUFFER + 1);
                let request = configure(fresh).build();
                Attempt::run(|| self.0.run(request)).0
            }
            other => other,
        }
    }
}

/// A copy of `request` (ureq takes a request by value): its method, target, version,
/// headers and body.
fn copy_of<S: Clone>(request: &http::Request<S>) -> http::Request<S> {
    let mut copy = http::Request::new(request.body().clone());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    copy
}

/// What one request (one `Agent::run`, and the reading of its body) saw of the backend
/// connection it used: written by `Tracked` on the thread that runs the request.
#[derive(Clone, Copy, Default)]
struct Attempt {
    /// Unique per attempt; 0 outside `Attempt::run`.
    id: u64,
    /// The connection had served an earlier attempt: it came from the pool.
    reused: bool,
    /// Some byte of a reply arrived on it.
    replied: bool,
}

impl Attempt {
    /// Runs `f`, one request's `Agent::run`, as a new attempt on this thread; returns
    /// its result and what it saw. The attempt stays current afterwards, while the
    /// caller reads the body, until the thread's next attempt.
    fn run<R>(f: impl FnOnce() -> R) -> (R, Attempt) {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        ATTEMPT.with(|a| {
            a.set(Attempt {
                id,
                ..Attempt::default()
            })
        });
        let result = f();
        (result, ATTEMPT.with(Cell::get))
    }
}

/// At least the length of the longest line ureq writes for `request`'s head: the
/// request line, a header line with its CRLF (and the blank line, after the last), or
/// the `Host` line ureq adds from the URI.
fn longest_head_line<S>(request: &http::Request<S>) -> usize {
    const CRLF: usize = 2;
    let uri = request.uri();
    // "METHOD /path?query HTTP/1.1": a '/' may be added before a bare query.
    let target = uri.path_and_query().map_or(1, |pq| pq.as_str().len() + 1);
    let request_line = request.method().as_str().len() + 1 + target + " HTTP/1.1".len() + CRLF;
    let host_line = "Host: ".len() + uri.authority().map_or(0, |a| a.as_str().len()) + 2 * CRLF;
    let header_line = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + ": ".len() + value.len() + 2 * CRLF)
        .max()
        .unwrap_or(0);
    request_line.max(host_line).max(header_line)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend connection that counts its shutdowns.
    #[derive(Default)]
    struct Counted(std::sync::atomic::AtomicUsize);

    impl ShutdownHandle for Counted {
        fn shutdown(&self) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn shutdowns(c: &Counted) -> usize {
        c.0.load(std::sync::atomic::Ordering::SeqCst)
    }

    #[test]
    fn a_client_that_leaves_before_the_first_backend_write_still_stops_the_connection() {
        let connection: Arc<Counted> = Arc::default();
        let weak: Weak<dyn ShutdownHandle> = Arc::downgrade(&connection) as _;
        let call = Call::default();
        call.shut_down();
        assert_eq!(shutdowns(&connection), 0, "no connection yet");
        call.in_use(&weak);
        assert_eq!(shutdowns(&connection), 1, "stopped as it is taken");

        // The next request of a client connection starts afresh.
        call.reset();
        call.in_use(&weak);
        assert_eq!(shutdowns(&connection), 1);
        call.shut_down();
        assert_eq!(shutdowns(&connection), 2, "stopped while in use");
    }

    #[test]
    fn a_forgotten_connection_is_not_stopped() {
        let connection: Arc<Counted> = Arc::default();
        let weak: Weak<dyn ShutdownHandle> = Arc::downgrade(&connection) as _;
        let call = Call::default();
        call.in_use(&weak);
        call.forget();
        call.shut_down();
        assert_eq!(
            shutdowns(&connection),
            0,
            "back in the pool, serving another request"
        );
    }

    #[test]
    fn the_longest_head_line_is_bounded_from_above() {
        let request = |target: &str, value: &str| {
            http::Request::post(format!("http://gpu-1:8000{target}"))
                .header("X-Note", value)
                .body(())
                .expect("request")
        };
        let line = |target: &str, value: &str| longest_head_line(&request(target, value));
        // "X-Note: " + value + CRLF + the blank line's CRLF.
        assert_eq!(line("/v1/models", &"v".repeat(60_000)), 8 + 60_000 + 4);
        // "POST " + "/" + target + " HTTP/1.1" + CRLF, one byte to spare.
        let target = format!("/v1/models?q={}", "a".repeat(20_000));
        assert_eq!(line(&target, "x"), 5 + 1 + target.len() + 9 + 2);
        assert!(line("/v1/chat/completions", "x") < OUTPUT_BUFFER);
    }
}

/// The backend connection a request is using, stoppable from another thread: a client
/// that leaves while its request waits for the backend (a long non-streamed generation)
/// would otherwise hold the backend, and its GPU, until the reply is written. Shutting
/// the connection down wakes the worker blocked on it with an error, and vLLM aborts a
/// request whose connection closes.
///
/// Written by the worker's own reads and writes (through `Tracked`, while the worker
/// runs inside `Call::during`); shut down by the connection thread when the client leaves (`client::handoff`).
#[derive(Default)]
pub struct Call(Mutex<CallState>);

#[derive(Default)]
struct CallState {
    /// The connection in use, once the request has written or read through one.
    handle: Option<Weak<dyn ShutdownHandle>>,
    /// Shut down before a connection was in use (the client left between admission
    /// and the first write to the backend): the connection is stopped as it is taken.
    stopped: bool,
}

impl Call {
    /// Runs `f`, a request's work with its backend on this thread, recording the
    /// connection it uses; forgets the connection afterwards, before it can serve
    /// another request from the pool.
    pub fn during<R>(self: &Arc<Self>, f: impl FnOnce() -> R) -> R {
        CURRENT.with(|current| *current.borrow_mut() = Some(Arc::clone(self)));
        let result = f();
        CURRENT.with(|current| *current.borrow_mut() = None);
        self.0.lock().handle = None;
        result
    }

    /// Makes the call usable again for the next request of the same client connection.
    pub fn reset(&self) {
        *self.0.lock() = CallState::default();
    }

    /// Forgets the connection once the whole reply has been read from it: ureq has
    /// put it back in its pool for another request, and a client closing its
    /// connection after reading its reply must not stop it there.
    pub fn forget(&self) {
        self.0.lock().handle = None;
    }

    /// Stops the backend connection in use, if any.
    pub fn shut_down(&self) {
        let handle = {
            let mut state = self.0.lock();
            state.stopped = true;
            state.handle.as_ref().and_then(Weak::upgrade)
        };
        if let Some(handle) = handle {
            handle.shutdown();
        }
    }

    /// Records the connection the request uses now; stops it at once if the call was
    /// shut down before any connection was in use.
    fn in_use(&self, handle: &Weak<dyn ShutdownHandle>) {
        let stop = {
            let mut state = self.0.lock();
            state.handle = Some(handle.clone());
            state.stopped
        };
        if stop {
            if let Some(handle) = handle.upgrade() {
                handle.shutdown();
            }
        }
    }
}

thread_local! {
    /// The backend call of the request this worker thread is serving.
    static CURRENT: RefCell<Option<Arc<Call>>> = const { RefCell::new(None) };
    /// The attempt this thread is running or last ran (`BackendAgent::send`).
    static ATTEMPT: Cell<Attempt> = const { Cell::new(Attempt { id: 0, reused: false, replied: false }) };
}

/// ureq's own connectors (TCP, then TLS), with each connection wrapped in `Tracked`.
/// The TCP connector hands a shutdown handle to the agent as it opens a socket; this
/// connector keeps a copy of it for the connection.
#[derive(Debug)]
struct Tracking(DefaultConnector);

impl Connector for Tracking {
    type Out = Tracked;

    fn connect(
        &self,
        details: &ConnectionDetails,
        chained: Option<()>,
    ) -> Result<Option<Tracked>, ureq::Error> {
        let handle: Arc<Mutex<Option<Weak<dyn ShutdownHandle>>>> = Arc::default();
        let register = Arc::clone(&details.register_shutdown);
        let kept = Arc::clone(&handle);
        let inner = ConnectionDetails {
            uri: details.uri,
            addrs: details.addrs.clone(),
            config: details.config,
            request_level: details.request_level,
            resolver: details.resolver,
            now: details.now,
            timeout: details.timeout,
            current_time: Arc::clone(&details.current_time),
            run_connector: Arc::clone(&details.run_connector),
            register_shutdown: Arc::new(move |weak: Weak<dyn ShutdownHandle>| {
                *kept.lock() = Some(weak.clone());
                register(weak)
            }),
        };
        let transport = self.0.connect(&inner, chained)?;
        let handle = handle.lock().take();
        Ok(transport.map(|inner| Tracked {
            inner,
            handle,
            last_attempt: 0,
        }))
    }
}

/// A backend connection that records itself as the one in use by the request whose
/// thread reads or writes it.
#[derive(Debug)]
struct Tracked {
    inner: Box<dyn Transport>,
    handle: Option<Weak<dyn ShutdownHandle>>,
    /// The attempt that used it last (0: none yet, a new connection).
    last_attempt: u64,
}

impl Tracked {
    fn in_use(&mut self) {
        ATTEMPT.with(|a| {
            let mut attempt = a.get();
            if attempt.id != 0 && attempt.id != self.last_attempt {
                attempt.reused = self.last_attempt != 0;
                self.last_attempt = attempt.id;
                a.set(attempt);
            }
        });
        let Some(handle) = &self.handle else {
            return;
        };
        CURRENT.with(|current| {
            if let Some(call) = current.borrow().as_ref() {
                call.in_use(handle);
            }
        });
    }

    /// Marks the current attempt as answered once reply bytes are in the buffer.
    fn note_reply(&mut self) {
        if self.inner.buffers().input().is_empty() {
            return;
        }
        ATTEMPT.with(|a| {
            let mut attempt = a.get();
            if attempt.id != 0 && attempt.id == self.last_attempt && !attempt.replied {
                attempt.replied = true;
                a.set(attempt);
            }
        });
    }
}

impl Transport for Tracked {
    fn buffers(&mut self) -> &mut dyn Buffers {
        self.inner.buffers()
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), ureq::Error> {
        self.in_use();
        self.inner.transmit_output(amount, timeout)
    }

    fn maybe_await_input(&mut self, timeout: NextTimeout) -> Result<bool, ureq::Error> {
        self.in_use();
        let result = self.inner.maybe_await_input(timeout);
        self.note_reply();
        result
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, ureq::Error> {
        self.in_use();
        let result = self.inner.await_input(timeout);
        self.note_reply();
        result
    }

    fn is_open(&mut self) -> bool {
        self.inner.is_open()
    }

    fn is_tls(&self) -> bool {
        self.inner.is_tls()
    }
}
