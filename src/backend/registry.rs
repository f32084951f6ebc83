//! The backend registry: the slot table that decides which backend a request may use.
//! Each backend has an entry (`backend::entry`): capacity, in-flight count, health
//! flags, passive failure counters, models, reported load and its agent; the table
//! holds them with the line of requests waiting for a slot (`request::queue`), and
//! merges a reloaded server list into them (`apply_servers`).
//!
//! One `parking_lot::Mutex` guards the entries and the line together, so "is a slot
//! free" and "who is first in line" are always decided at the same instant; every
//! waiter sleeps on its own `Condvar` bound to that mutex (see `request::queue`).
//! Which backend a request gets is `request::pick`'s rule, fed by the entries.
//!
//! Invariant: after every change of the table (a release, a backend marked up, a
//! capacity raised, a reload), `dispatch` runs, so no waiter is left in the queue while a
//! slot it could use is free. That is why a new request may take a free slot directly:
//! nobody in the queue can use it.
//!
//! Each backend's routable state lives here, because admission reads it under the
//! same lock: `healthy` and its `reason` (written by the health thread and by passive
//! health in `request::exchange` and `request::relay`, only through `record_check`, `request_failed` and
//! `request_succeeded`) and the model list (written by the health thread). A request
//! names what it wants (`Want`: a model, and backends already tried) and only matching
//! healthy backends are considered, in the queue as well.
//!
//! Each entry also owns its backend's HTTP client (`backend::http::BackendAgent`, see
//! `backend::http` for why there is one per backend): made with the entry, kept by a server
//! that stays across a reload, handed to each `Slot` (and to health probes,
//! `probe_of`) as a clone, and dropped with the entry and the last of those clones.
//!
//! How busy a backend is (`Entry::load`) is the larger of this router's in-flight count
//! and the load the backend itself reported in its `/metrics` (which includes other
//! router replicas), corrected for what this router admitted since that report. The
//! cap `max_concurrent_requests` applies to that number.
//!
//! In-flight counts change only through `Entry::admit` and `Entry::give_back`
//! (`backend::entry`, where the count is private), called here by `Table::acquire`,
//! `dispatch` and `Table::release` (called by `Slot::drop`). A `Slot` is released
//! exactly once, on every path a request can take: success, error, client gone, or a
//! panic unwinding through the handler.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, MutexGuard};

use crate::backend::affinity::{blocks_for, PrefixIndex};
use crate::backend::entry::{model_id, Entry, ReportedLoad};
pub use crate::backend::entry::{BackendView, CheckStats, Reported};
use crate::backend::http::{AgentConfig, BackendAgent};
pub use crate::backend::slot::Slot;
use crate::control::config::ServerConfig;
use crate::request::auth::Secret;
use crate::request::pick;
use crate::request::queue::{self, Grant, Limits, Queue, Rejection, Waited, Want};

/// The reason shown for a backend that has not had its first health check.
pub const NOT_CHECKED: &str = "not checked yet";

/// Identifies one backend for the life of the process. A server removed from the
/// config and added again gets a new id, so a slot taken before the removal can never
/// be released against the new entry.
pub type BackendId = u64;

/// The shared slot table. Cloned as `Arc<Table>` into every thread.
pub struct Table {
    inner: Mutex<Inner>,
    /// What the agent of each backend added by a reload is built from.
    agents: AgentConfig,
}

struct Inner {
    entries: Vec<Entry>,
    queue: Queue,
    /// Where the search for the least-loaded backend starts; moves on every pick so
    /// equally loaded backends take turns.
    rotation: usize,
    next_id: BackendId,
    closed: bool,
}

/// What `Table::apply_servers` changed, for the reload log line.
#[derive(Debug, Default, PartialEq)]
pub struct ServerChanges {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// (url, old capacity, new capacity)
    pub resized: Vec<(String, u32, u32)>,
}

impl ServerChanges {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.resized.is_empty()
    }
}

/// A point-in-time copy of the whole table.
#[derive(Debug, Clone)]
pub struct TableView {
    pub backends: Vec<BackendView>,
    pub queue_len: usize,
}

impl Table {
    /// Builds the table from the configured servers. With active health checks on,
    /// a backend takes traffic only after its first good check; otherwise it is
    /// trusted until passive health says otherwise. Each backend gets an agent made
    /// from `agents`, and a prefix index of `prefix_tokens` tokens.
    pub fn new(
        servers: &[ServerConfig],
        trusted: bool,
        agents: AgentConfig,
        prefix_tokens: u64,
    ) -> Arc<Table> {
        let mut inner = Inner {
            entries: Vec::with_capacity(servers.len()),
            queue: Queue::default(),
            rotation: 0,
            next_id: 1,
            closed: false,
        };
        for server in servers {
            inner.add_entry(server, trusted, agents.new_agent(), prefix_tokens);
        }
        Arc::new(Table {
            inner: Mutex::new(inner),
            agents,
        })
    }

    /// Applies a reloaded server list in one step. A server whose URL is unchanged
    /// keeps all its state (in-flight count, health, models, counters, its agent and
    /// the agent's idle connections) and takes a new capacity at once; a new server
    /// joins like one at start-up (`trusted` as in `new`); a removed server takes no
    /// new requests, its in-flight requests finish, and its entry is forgotten with its
    /// last slot. A changed `prefix_tokens` gives every backend a new, empty index.
    pub fn apply_servers(
        &self,
        servers: &[ServerConfig],
        trusted: bool,
        prefix_tokens: u64,
    ) -> ServerChanges {
        let mut inner = self.inner.lock();
        let mut changes = ServerChanges::default();
        for e in inner.entries.iter_mut().filter(|e| !e.removed) {
            if !servers.iter().any(|s| *s.url == *e.url) {
                e.removed = true;
                changes.removed.push(e.url.to_string());
            }
        }
        let (gone, kept): (Vec<Entry>, Vec<Entry>) = std::mem::take(&mut inner.entries)
            .into_iter()
            .partition(|e| e.removed && e.in_flight() == 0);
        inner.entries = kept;
        for server in servers {
            match inner
                .entries
                .iter_mut()
                .find(|e| !e.removed && *e.url == *server.url)
            {
                Some(e) => {
                    // A changed key applies from the next slot taken.
                    e.api_key.clone_from(&server.api_key);
                    if e.prefix.capacity() != blocks_for(prefix_tokens) {
                        e.prefix = Arc::new(PrefixIndex::with_tokens(prefix_tokens));
                    }
                    if e.max_concurrent != server.max_concurrent_requests {
                        changes.resized.push((
                            server.url.clone(),
                            e.max_concurrent,
                            server.max_concurrent_requests,
                        ));
                        e.max_concurrent = server.max_concurrent_requests;
                    }
                }
                None => {
                    inner.add_entry(server, trusted, self.agents.new_agent(), prefix_tokens);
                    changes.added.push(server.url.clone());
                }
            }
        }
        // Keep the config file's order for the status endpoints; draining entries last.
        let position = |e: &Entry| {
            servers
                .iter()
                .position(|s| *s.url == *e.url)
                .filter(|_| !e.removed)
        };
        inner
            .entries
            .sort_by_key(|e| position(e).unwrap_or(usize::MAX));
        inner.dispatch(Instant::now());
        // The last owner of an idle backend's agent closes its pooled connections:
        // outside the lock.
        drop(inner);
        drop(gone);
        changes
    }

    /// Takes a slot on the least-loaded healthy backend that serves `want`, waiting in
    /// line up to `limits.queue_timeout` when every such slot is taken.
    pub fn acquire(self: &Arc<Self>, want: Want, limits: Limits) -> Result<Slot, Rejection> {
        self.acquire_while(want, limits, || true)
    }

    /// `acquire`, giving up the place in line as soon as `wanted` says the request is
    /// no longer wanted (its client left): asked every `WANTED_EVERY` while waiting.
    pub fn acquire_while(
        self: &Arc<Self>,
        want: Want,
        limits: Limits,
        wanted: impl Fn() -> bool,
    ) -> Result<Slot, Rejection> {
        let start = Instant::now();
        let mut inner = self.inner.lock();
        if inner.closed {
            return Err(Rejection::Closed);
        }
        if !inner.entries.iter().any(|e| e.usable(&want)) {
            return Err(inner.why_unusable(&want));
        }
        if let Some(idx) = inner.pick(&want, start) {
            return Ok(self.take(&mut inner, idx, &want));
        }
        if inner.queue.len() >= limits.max_queue_size || limits.queue_timeout.is_zero() {
            return Err(Rejection::QueueFull {
                queue_len: inner.queue.len(),
            });
        }
        let place = inner.queue.join(want);
        let deadline = start + limits.queue_timeout;
        let rejection = match queue::wait(&mut inner, &place, deadline, wanted, |i| i.closed) {
            Waited::Granted(granted) => {
                // `dispatch` already counted the slot and removed us from the queue.
                // A granted slot keeps its entry alive (in_flight > 0), so this is
                // always found.
                if let Some(entry) = inner.entry(granted) {
                    return Ok(Slot::on(self, entry, start.elapsed()));
                }
                Rejection::NoBackend
            }
            Waited::Closed => Rejection::Closed,
            Waited::Abandoned => Rejection::Abandoned,
            Waited::TimedOut => Rejection::QueueTimeout {
                waited: start.elapsed(),
            },
        };
        inner.queue.leave(&place);
        Err(rejection)
    }

    /// Gives a slot back and hands it to the first waiter that can use it.
    pub(super) fn release(&self, id: BackendId) {
        let mut inner = self.inner.lock();
        if let Some(pos) = inner.entries.iter().position(|e| e.id == id) {
            let entry = &mut inner.entries[pos];
            entry.give_back();
            if entry.removed && entry.in_flight() == 0 {
                inner.entries.remove(pos);
            }
        }
        inner.dispatch(Instant::now());
    }

    /// Refuses every new and queued request from now on (shutdown).
    pub fn close(&self) {
        let mut inner = self.inner.lock();
        inner.closed = true;
        inner.queue.wake_all();
    }

    pub fn view(&self) -> TableView {
        let inner = self.inner.lock();
        let now = Instant::now();
        TableView {
            backends: inner
                .entries
                .iter()
                .filter(|e| !e.removed)
                .map(|e| e.view(now))
                .collect(),
            queue_len: inner.queue.len(),
        }
    }

    /// A copy of one backend's entry (while it is not removed).
    pub fn backend(&self, id: BackendId) -> Option<BackendView> {
        self.inner.lock().live(id).map(|e| e.view(Instant::now()))
    }

    /// Whether any backend could take a request now or later (used by /readyz).
    pub fn has_usable_backend(&self) -> bool {
        let inner = self.inner.lock();
        !inner.closed && inner.entries.iter().any(|e| e.usable(&Want::default()))
    }

    /// The HTTP client and the `api_key` of one backend (while it is not removed), for
    /// health probes: the same key its requests take with their slots.
    pub fn probe_of(&self, id: BackendId) -> Option<(BackendAgent, Option<Secret>)> {
        self.inner
            .lock()
            .live(id)
            .map(|e| (e.agent.clone(), e.api_key.clone()))
    }

    /// Each backend's prefix index (while it is not removed), for `request::route`.
    pub fn prefix_indexes(&self) -> Vec<(BackendId, Arc<PrefixIndex>)> {
        let inner = self.inner.lock();
        inner
            .entries
            .iter()
            .filter(|e| !e.removed)
            .map(|e| (e.id, Arc::clone(&e.prefix)))
            .collect()
    }

    /// This router's requests in flight on one backend.
    pub fn in_flight_of(&self, id: BackendId) -> u32 {
        self.inner.lock().entry(id).map_or(0, Entry::in_flight)
    }

    /// Requests holding a slot right now, on every backend (shutdown waits for 0).
    pub fn total_in_flight(&self) -> u32 {
        self.inner.lock().entries.iter().map(Entry::in_flight).sum()
    }

    /// Whether some healthy backend could serve `want` (room or not).
    pub fn can_serve(&self, want: &Want) -> bool {
        self.inner.lock().entries.iter().any(|e| e.usable(want))
    }

    /// Whether some backend, healthy or not, lists `model`.
    pub fn is_known_model(&self, model: &str) -> bool {
        let inner = self.inner.lock();
        inner
            .entries
            .iter()
            .any(|e| e.models.is_some() && e.may_serve(model))
    }

    /// The model objects of every healthy backend, each id once, in backend order.
    pub fn models(&self) -> Vec<serde_json::Value> {
        let inner = self.inner.lock();
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for e in inner.entries.iter().filter(|e| e.healthy && !e.removed) {
            for m in e.models.iter().flat_map(|m| m.iter()) {
                if let Some(id) = model_id(m) {
                    if seen.insert(id.to_owned()) {
                        out.push(m.clone());
                    }
                }
            }
        }
        out
    }

    /// Records a health check's figures and, with `change`, marks the backend healthy
    /// or not (health thread). Returns whether its health changed.
    pub fn record_check(
        &self,
        id: BackendId,
        stats: CheckStats,
        change: Option<(bool, Option<String>)>,
    ) -> bool {
        let mut inner = self.inner.lock();
        let Some(e) = inner.entry_mut(id) else {
            return false;
        };
        e.checks = stats;
        let Some((healthy, reason)) = change else {
            return false;
        };
        let changed = e.healthy != healthy;
        e.healthy = healthy;
        e.reason = if healthy { None } else { reason };
        if healthy {
            e.request_failures = 0;
            e.down_by_requests_until = None;
        }
        if changed && healthy {
            inner.dispatch(Instant::now());
        }
        changed
    }

    /// Records the model objects a backend's `/v1/models` listed.
    pub fn set_models(&self, id: BackendId, models: Vec<serde_json::Value>) {
        let mut inner = self.inner.lock();
        if let Some(e) = inner.entry_mut(id) {
            e.model_ids = models
                .iter()
                .filter_map(model_id)
                .map(str::to_owned)
                .collect();
            e.models = Some(Arc::new(models));
        }
        inner.dispatch(Instant::now());
    }

    /// Records the load a backend reported (health thread); `None` when its metrics
    /// could not be read, so the router's own count decides. `own_at_scrape` is this
    /// router's in-flight count when the scrape was sent; the report is trusted for
    /// `fresh_for`.
    pub fn set_reported(
        &self,
        id: BackendId,
        report: Option<Reported>,
        own_at_scrape: u32,
        fresh_for: Duration,
    ) {
        let mut inner = self.inner.lock();
        let Some(e) = inner.entry_mut(id) else { return };
        e.reported = report.map(|report| ReportedLoad {
            report,
            own_at_scrape,
            fresh_until: Instant::now() + fresh_for,
        });
        inner.dispatch(Instant::now());
    }

    /// Passive health: a request to this backend failed. After `threshold` failures in
    /// a row it is marked down at once; `recovery_after` is when a probe may bring it
    /// back when active checks are off (with them on, they decide). With `keep_last`
    /// (active checks on), the last healthy backend is not marked down by request
    /// failures alone: its active checks still pass, so it is most likely back (a
    /// blip), and taking it out would refuse every request for nothing; the checks
    /// take it out if it really is gone. Returns true when this failure marked it down
    /// (at `now`, from which `recovery_after` counts).
    pub fn request_failed(
        &self,
        id: BackendId,
        why: &str,
        threshold: u32,
        recovery_after: Duration,
        keep_last: bool,
        now: Instant,
    ) -> bool {
        let mut inner = self.inner.lock();
        let others_healthy = inner
            .entries
            .iter()
            .any(|e| e.id != id && e.healthy && !e.removed);
        let Some(e) = inner.entry_mut(id) else {
            return false;
        };
        e.request_failures = e.request_failures.saturating_add(1);
        if keep_last && !others_healthy {
            return false;
        }
        if e.healthy && e.request_failures >= threshold {
            e.healthy = false;
            e.reason = Some(format!(
                "{} consecutive request failures, last: {why}",
                e.request_failures
            ));
            e.down_by_requests_until = Some(now + recovery_after);
            return true;
        }
        false
    }

    /// Passive health: a request to this backend succeeded.
    pub fn request_succeeded(&self, id: BackendId) {
        if let Some(e) = self.inner.lock().entry_mut(id) {
            e.request_failures = 0;
        }
    }

    fn take(self: &Arc<Self>, inner: &mut MutexGuard<'_, Inner>, idx: usize, want: &Want) -> Slot {
        let entry = &mut inner.entries[idx];
        entry.admit(want);
        Slot::on(self, entry, Duration::ZERO)
    }
}

impl Inner {
    /// Why no backend can take `want`, when none can: a model that no backend whose
    /// models are known lists is named as the cause, so a client with a typo in it is
    /// not told to retry forever.
    fn why_unusable(&self, want: &Want) -> Rejection {
        let Some(model) = &want.model else {
            return Rejection::NoBackend;
        };
        let live = || self.entries.iter().filter(|e| !e.removed);
        if live().any(|e| e.models.is_some() && e.may_serve(model)) {
            return Rejection::NoBackend;
        }
        match live().filter(|e| e.models.is_none()).count() {
            0 => Rejection::UnknownModel(model.clone()),
            unknown => Rejection::ModelUnavailable {
                model: model.clone(),
                unknown,
            },
        }
    }

    /// The backend with room for `want` at `now` (`request::pick`): cache-aware when the
    /// request has a route, else the least loaded, with the rotation moved on every pick
    /// so equally loaded backends take turns.
    fn pick(&mut self, want: &Want, now: Instant) -> Option<usize> {
        let entries = &self.entries;
        // A request with neither a prompt nor a session has nothing to be cache-aware
        // about: it is spread as under least_loaded.
        if let Some(route) = want.route.as_ref().filter(|r| r.rendezvous.is_some()) {
            let blocks = u32::try_from(route.blocks.len()).unwrap_or(u32::MAX);
            return pick::cache_aware(entries.len(), blocks, route.is_new_session(), |idx| {
                entries[idx].scored(want, now)
            });
        }
        let best = pick::least_loaded(entries.len(), self.rotation, |idx| {
            entries[idx].candidate(want, now)
        });
        if best.is_some() {
            self.rotation = self.rotation.wrapping_add(1);
        }
        best
    }

    /// Hands free slots to waiters in queue order; see the module invariant.
    fn dispatch(&mut self, now: Instant) {
        let mut queue = std::mem::take(&mut self.queue);
        queue.hand_out(|want| {
            if !self
                .entries
                .iter()
                .any(|e| e.has_room(&Want::default(), now))
            {
                return Grant::Stop;
            }
            let Some(idx) = self.pick(want, now) else {
                return Grant::Skip;
            };
            let entry = &mut self.entries[idx];
            entry.admit(want);
            Grant::To(entry.id)
        });
        self.queue = queue;
    }

    fn add_entry(
        &mut self,
        server: &ServerConfig,
        trusted: bool,
        agent: BackendAgent,
        prefix_tokens: u64,
    ) {
        let id = self.next_id;
        self.next_id += 1;
        let prefix = Arc::new(PrefixIndex::with_tokens(prefix_tokens));
        self.entries
            .push(Entry::new(id, server, trusted, agent, prefix));
    }

    fn entry_mut(&mut self, id: BackendId) -> Option<&mut Entry> {
        self.entries.iter_mut().find(|e| e.id == id)
    }

    /// Backend `id`'s entry, removed by a reload or not (its slots still count).
    fn entry(&self, id: BackendId) -> Option<&Entry> {
        self.entries.iter().find(|e| e.id == id)
    }

    /// Backend `id`'s entry while it is in the config.
    fn live(&self, id: BackendId) -> Option<&Entry> {
        self.entry(id).filter(|e| !e.removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::thread;

    fn table(caps: &[u32]) -> Arc<Table> {
        let servers: Vec<ServerConfig> = caps
            .iter()
            .enumerate()
            .map(|(i, &c)| ServerConfig {
                url: format!("http://b{i}"),
                max_concurrent_requests: c,
                api_key: None,
            })
            .collect();
        let agents = AgentConfig::from_settings(&crate::control::config::Settings::default())
            .expect("agent config");
        Table::new(&servers, true, agents, 1 << 20)
    }

    fn limits(queue: usize, ms: u64) -> Limits {
        Limits {
            max_queue_size: queue,
            queue_timeout: Duration::from_millis(ms),
        }
    }

    fn in_flight(t: &Table) -> Vec<u32> {
        t.view().backends.iter().map(|b| b.in_flight).collect()
    }

    #[test]
    fn least_loaded_with_ties_rotated() {
        let t = table(&[2, 2, 4]);
        let picks: Vec<String> = (0..4)
            .map(|_| {
                let s = t.acquire(Want::default(), limits(0, 0)).expect("slot");
                let url = s.backend_url().to_string();
                std::mem::forget(s);
                url
            })
            .collect();
        // 0/2, 0/2, 0/4 all equal: rotation decides; then the 4-slot server is least loaded.
        assert_eq!(picks, ["http://b0", "http://b1", "http://b2", "http://b2"]);
        assert_eq!(in_flight(&t), [1, 1, 2]);
    }

    #[test]
    fn sequential_requests_share_evenly() {
        let t = table(&[1, 1, 1]);
        let mut counts = [0; 3];
        for _ in 0..30 {
            let s = t.acquire(Want::default(), limits(0, 0)).expect("slot");
            let i = (s.backend_url().as_bytes()[8] - b'0') as usize;
            counts[i] += 1;
        }
        assert_eq!(counts, [10, 10, 10]);
    }

    #[test]
    fn cap_is_never_exceeded_and_queue_full_rejects() {
        let t = table(&[1]);
        let held = t.acquire(Want::default(), limits(0, 0)).expect("slot");
        assert_eq!(
            t.acquire(Want::default(), limits(0, 1000)).unwrap_err(),
            Rejection::QueueFull { queue_len: 0 }
        );
        drop(held);
        assert_eq!(in_flight(&t), [0]);
    }

    #[test]
    fn queue_times_out_and_leaves_the_line() {
        let t = table(&[1]);
        let _held = t.acquire(Want::default(), limits(0, 0)).expect("slot");
        let err = t.acquire(Want::default(), limits(4, 50)).unwrap_err();
        assert!(
            matches!(err, Rejection::QueueTimeout { waited } if waited >= Duration::from_millis(50))
        );
        assert_eq!(t.view().queue_len, 0);
    }

    #[test]
    fn a_waiter_no_longer_wanted_leaves_the_line() {
        let t = table(&[1]);
        let _held = t.acquire(Want::default(), limits(0, 0)).expect("slot");
        let left = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let waiter = {
            let (t, left) = (Arc::clone(&t), Arc::clone(&left));
            thread::spawn(move || {
                t.acquire_while(Want::default(), limits(4, 60_000), || {
                    !left.load(Ordering::SeqCst)
                })
            })
        };
        while t.view().queue_len == 0 {
            thread::yield_now();
        }
        let asked = Instant::now();
        left.store(true, Ordering::SeqCst);
        let result = waiter.join().expect("waiter");
        assert!(matches!(result, Err(Rejection::Abandoned)));
        assert!(
            asked.elapsed() < Duration::from_secs(5),
            "noticed at the next look"
        );
        assert_eq!(t.view().queue_len, 0);
    }

    #[test]
    fn waiters_are_served_first_come_first_served() {
        let t = table(&[1]);
        let held = t.acquire(Want::default(), limits(0, 0)).expect("slot");
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut handles = Vec::new();
        for i in 0..5 {
            let (t2, order) = (Arc::clone(&t), Arc::clone(&order));
            handles.push(thread::spawn(move || {
                let slot = t2
                    .acquire(Want::default(), limits(10, 10_000))
                    .expect("slot");
                order.lock().push(i);
                drop(slot);
            }));
            // Each waiter must be in line before the next one starts.
            while t.view().queue_len < i + 1 {
                thread::yield_now();
            }
        }
        drop(held);
        for h in handles {
            h.join().expect("waiter thread");
        }
        assert_eq!(*order.lock(), [0, 1, 2, 3, 4]);
        assert_eq!(in_flight(&t), [0]);
    }

    #[test]
    fn close_wakes_waiters_and_refuses_new_requests() {
        let t = table(&[1]);
        let _held = t.acquire(Want::default(), limits(0, 0)).expect("slot");
        let t2 = Arc::clone(&t);
        let waiter = thread::spawn(move || t2.acquire(Want::default(), limits(4, 60_000)));
        while t.view().queue_len == 0 {
            thread::yield_now();
        }
        t.close();
        assert_eq!(waiter.join().expect("join").unwrap_err(), Rejection::Closed);
        assert_eq!(
            t.acquire(Want::default(), limits(4, 10)).unwrap_err(),
            Rejection::Closed
        );
    }

    #[test]
    fn a_reload_keeps_unchanged_servers_and_drains_removed_ones() {
        let t = table(&[1, 2]);
        let held = t.acquire(Want::default(), limits(0, 0)).expect("slot");
        let held_url = held.backend_url().to_string();
        let kept = if held_url == "http://b0" {
            "http://b1"
        } else {
            "http://b0"
        };
        let servers = [
            ServerConfig {
                url: kept.into(),
                max_concurrent_requests: 5,
                api_key: None,
            },
            ServerConfig {
                url: "http://new".into(),
                max_concurrent_requests: 1,
                api_key: None,
            },
        ];
        let changes = t.apply_servers(&servers, true, 1 << 20);
        assert_eq!(changes.added, ["http://new"]);
        assert_eq!(changes.removed, std::slice::from_ref(&held_url));
        // The removed server is hidden but its slot is still counted until released.
        let urls: Vec<String> = t.view().backends.iter().map(|b| b.url.clone()).collect();
        assert_eq!(urls, [kept, "http://new"]);
        assert_eq!(t.total_in_flight(), 1);
        drop(held);
        assert_eq!(t.total_in_flight(), 0);
        // Added back later, it starts afresh under a new id.
        let before: Vec<BackendId> = t.view().backends.iter().map(|b| b.id).collect();
        t.apply_servers(
            &[ServerConfig {
                url: held_url.clone(),
                max_concurrent_requests: 1,
                api_key: None,
            }],
            true,
            1 << 20,
        );
        let again = t
            .view()
            .backends
            .into_iter()
            .find(|b| b.url == held_url)
            .expect("re-added");
        assert!(!before.contains(&again.id));
        assert_eq!((again.in_flight, again.admitted_total), (0, 0));
    }

    #[test]
    fn a_panic_while_holding_a_slot_gives_it_back() {
        let t = table(&[1]);
        let quiet = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _slot = t.acquire(Want::default(), limits(0, 0)).expect("slot");
            panic!("handler bug");
        }));
        std::panic::set_hook(quiet);
        assert!(result.is_err());
        assert_eq!(in_flight(&t), [0]);
        assert!(t.acquire(Want::default(), limits(0, 0)).is_ok());
    }

    #[test]
    fn counts_return_to_zero_under_contention() {
        let t = table(&[3, 2]);
        let peak = Arc::new(AtomicU64::new(0));
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let (t, peak) = (Arc::clone(&t), Arc::clone(&peak));
                thread::spawn(move || {
                    for _ in 0..200 {
                        let slot = t
                            .acquire(Want::default(), limits(100, 10_000))
                            .expect("slot");
                        let v = t.view();
                        for b in &v.backends {
                            assert!(b.in_flight <= b.max_concurrent, "{b:?}");
                        }
                        let total: u32 = v.backends.iter().map(|b| b.in_flight).sum();
                        peak.fetch_max(u64::from(total), Ordering::Relaxed);
                        drop(slot);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("worker");
        }
        assert_eq!(in_flight(&t), [0, 0]);
        assert!(peak.load(Ordering::Relaxed) <= 5);
    }
}
