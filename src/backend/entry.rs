//! One backend's entry in the slot table (`backend::registry`), and the rules that
//! read it: whether it may serve a request, how busy it counts as (its own in-flight
//! count against the load it reported), and its copy for the status endpoints.
//!
//! The in-flight count is private to this module: it changes only through
//! `Entry::admit` and `Entry::give_back`, which the table calls when it hands out a
//! slot (`acquire`, `dispatch`) and takes one back (`release`).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::affinity::PrefixIndex;
use crate::backend::http::BackendAgent;
use crate::backend::registry::{BackendId, NOT_CHECKED};
use crate::control::config::ServerConfig;
use crate::request::auth::Secret;
use crate::request::pick::{Candidate, Reason, Scored};
use crate::request::queue::Want;

/// One backend's entry in the slot table.
pub(super) struct Entry {
    pub(super) id: BackendId,
    pub(super) url: Arc<str>,
    pub(super) agent: BackendAgent,
    /// The server's `api_key`, as the latest config says: a request takes it with its
    /// slot, so it always matches the backend it is sent to.
    pub(super) api_key: Option<Secret>,
    pub(super) max_concurrent: u32,
    in_flight: u32,
    pub(super) healthy: bool,
    /// Why the backend is not healthy; `None` while healthy.
    pub(super) reason: Option<String>,
    /// Consecutive failed requests (passive health).
    pub(super) request_failures: u32,
    /// Set when request failures marked it down: no check may bring it back before.
    pub(super) down_by_requests_until: Option<Instant>,
    /// Model objects from its `/v1/models`; `None` until first learned (serves any model).
    pub(super) models: Option<Arc<Vec<serde_json::Value>>>,
    /// The ids of `models`, looked up for every request (the pick scans every backend).
    pub(super) model_ids: HashSet<String>,
    pub(super) checks: CheckStats,
    /// The backend's own count of its requests, from its `/metrics` (health thread).
    pub(super) reported: Option<ReportedLoad>,
    /// Removed by a reload: takes no new requests, forgotten once its last slot is back.
    pub(super) removed: bool,
    admitted_total: u64,
    /// The prompts it was sent lately (`backend::affinity`), shared with the slots.
    pub(super) prefix: Arc<PrefixIndex>,
    /// Requests admitted here under cache-aware routing, by `Reason` (in `Reason::ALL` order).
    routed: [u64; 3],
}

/// The health thread's latest figures for one backend, for the status endpoints.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CheckStats {
    pub consecutive_failures: u32,
    /// Share of good checks in the sliding window; `None` before the first check.
    pub success_rate: Option<f64>,
    pub last_check: Option<std::time::SystemTime>,
    pub last_latency: Option<Duration>,
}

/// A backend's load as its own `/metrics` reported it.
#[derive(Debug, Clone, PartialEq)]
pub struct Reported {
    /// `vllm:num_requests_running`, summed over its label sets.
    pub running: f64,
    /// `vllm:num_requests_waiting`, summed over its label sets.
    pub waiting: f64,
    /// `vllm:kv_cache_usage_perc` (or the older `vllm:gpu_cache_usage_perc`), 0 to 1.
    pub kv_cache_usage: Option<f64>,
    pub scraped_at: std::time::SystemTime,
}

#[derive(Debug, Clone)]
pub(super) struct ReportedLoad {
    pub(super) report: Reported,
    /// This router's in-flight count when the scrape was sent: requests admitted or
    /// finished since then correct the report.
    pub(super) own_at_scrape: u32,
    /// Past this the report is too old to trust, and the router's own count decides.
    pub(super) fresh_until: Instant,
}

/// A point-in-time copy of one backend's entry, for the status endpoints.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendView {
    pub id: BackendId,
    pub url: String,
    pub max_concurrent: u32,
    pub in_flight: u32,
    pub healthy: bool,
    pub reason: Option<String>,
    pub request_failures: u32,
    pub down_by_requests_until: Option<Instant>,
    pub models: Vec<String>,
    pub checks: CheckStats,
    pub reported: Option<Reported>,
    /// The load admission counts: see `Entry::load`.
    pub load: u32,
    pub admitted_total: u64,
    /// Prompt blocks its prefix index holds, and at most.
    pub prefix_blocks: usize,
    pub prefix_capacity: usize,
    /// The most memory its prefix index can take, in bytes.
    pub prefix_bound_bytes: usize,
    /// Requests admitted under cache-aware routing, by reason (`Reason::ALL` order).
    pub routed: [u64; 3],
}

impl Entry {
    /// A backend as it joins: trusted (healthy) at once, or waiting for its first check.
    pub(super) fn new(
        id: BackendId,
        server: &ServerConfig,
        trusted: bool,
        agent: BackendAgent,
        prefix: Arc<PrefixIndex>,
    ) -> Entry {
        Entry {
            id,
            url: Arc::from(server.url.as_str()),
            agent,
            api_key: server.api_key.clone(),
            max_concurrent: server.max_concurrent_requests,
            in_flight: 0,
            healthy: trusted,
            reason: (!trusted).then(|| NOT_CHECKED.to_owned()),
            request_failures: 0,
            down_by_requests_until: None,
            models: None,
            model_ids: HashSet::new(),
            checks: CheckStats::default(),
            reported: None,
            removed: false,
            admitted_total: 0,
            prefix,
            routed: [0; 3],
        }
    }

    /// Counts a slot taken on this backend. With `give_back`, the only code that
    /// changes an in-flight count (the table's `take`, `dispatch` and `release` call
    /// them), hence the private field.
    pub(super) fn admit(&mut self, want: &Want) {
        self.in_flight += 1;
        self.admitted_total += 1;
        if let Some(route) = &want.route {
            let reason = route.reason(self.id);
            let i = Reason::ALL.iter().position(|r| *r == reason).unwrap_or(0);
            self.routed[i] += 1;
        }
    }

    /// Counts a slot given back.
    pub(super) fn give_back(&mut self) {
        debug_assert!(self.in_flight > 0, "slot released twice for {}", self.url);
        self.in_flight = self.in_flight.saturating_sub(1);
    }

    /// This router's requests in flight on the backend.
    pub(super) fn in_flight(&self) -> u32 {
        self.in_flight
    }

    /// How the pick sees this backend for `want` at `now`: `None` without room.
    pub(super) fn candidate(&self, want: &Want, now: Instant) -> Option<Candidate> {
        self.has_room(want, now).then(|| Candidate {
            load: self.load(now),
            max_concurrent: self.max_concurrent,
        })
    }

    /// How the cache-aware pick sees this backend for `want` at `now`: `None` without room.
    pub(super) fn scored(&self, want: &Want, now: Instant) -> Option<Scored> {
        let route = want.route.as_deref()?;
        self.candidate(want, now).map(|c| Scored {
            load: c.load,
            max_concurrent: c.max_concurrent,
            matched: route.matched_on(self.id),
            sticky: route.is_sticky(self.id),
            rank: route.rank(&self.url),
        })
    }

    pub(super) fn view(&self, now: Instant) -> BackendView {
        BackendView {
            id: self.id,
            url: self.url.to_string(),
            max_concurrent: self.max_concurrent,
            in_flight: self.in_flight,
            healthy: self.healthy,
            reason: self.reason.clone(),
            request_failures: self.request_failures,
            down_by_requests_until: self.down_by_requests_until,
            models: self.model_ids(),
            checks: self.checks.clone(),
            reported: self.reported.as_ref().map(|r| r.report.clone()),
            load: self.load(now),
            admitted_total: self.admitted_total,
            prefix_blocks: self.prefix.len(),
            prefix_capacity: self.prefix.capacity(),
            prefix_bound_bytes: self.prefix.bound_bytes(),
            routed: self.routed,
        }
    }

    /// Whether this backend could serve `want` at all (room or not).
    pub(super) fn usable(&self, want: &Want) -> bool {
        self.healthy
            && !self.removed
            && !want.exclude.contains(&self.id)
            && want.model.as_deref().is_none_or(|m| self.may_serve(m))
    }

    pub(super) fn has_room(&self, want: &Want, now: Instant) -> bool {
        self.usable(want) && self.load(now) < self.max_concurrent
    }

    /// How busy the backend counts as: the larger of this router's in-flight count
    /// and what the backend itself last reported (running + waiting, over every router
    /// that uses it), corrected by the change in this router's own count since that
    /// scrape. A report older than its freshness bound is ignored.
    pub(super) fn load(&self, now: Instant) -> u32 {
        let Some(r) = self.reported.as_ref().filter(|r| now < r.fresh_until) else {
            return self.in_flight;
        };
        let reported = (r.report.running + r.report.waiting)
            .max(0.0)
            .ceil()
            .min(f64::from(u32::MAX)) as i64;
        let corrected = reported + i64::from(self.in_flight) - i64::from(r.own_at_scrape);
        self.in_flight
            .max(corrected.clamp(0, i64::from(u32::MAX)) as u32)
    }

    /// A backend whose models are not known yet may serve any model.
    pub(super) fn may_serve(&self, model: &str) -> bool {
        self.models.is_none() || self.model_ids.contains(model)
    }

    fn model_ids(&self) -> Vec<String> {
        self.models
            .iter()
            .flat_map(|m| m.iter())
            .filter_map(model_id)
            .map(str::to_owned)
            .collect()
    }
}

/// The `id` of a model object from `/v1/models`.
pub(super) fn model_id(model: &serde_json::Value) -> Option<&str> {
    model.get("id").and_then(|id| id.as_str())
}
