//! A slot taken on one backend (`Table::acquire`): what the request carries with it (the
//! backend's URL, agent, key and prefix index), and the guard that gives the slot back when
//! it drops, exactly once, on every path a request can take, a panic included.

use std::sync::Arc;
use std::time::Duration;

use crate::backend::affinity::PrefixIndex;
use crate::backend::entry::Entry;
use crate::backend::http::BackendAgent;
use crate::backend::registry::{BackendId, Table};
use crate::request::auth::Secret;

/// A taken slot on one backend. Dropping it gives the slot back.
pub struct Slot {
    table: Arc<Table>,
    id: BackendId,
    url: Arc<str>,
    /// Kept by the slot so that a backend removed by a reload meanwhile keeps its
    /// client until the request ends.
    agent: BackendAgent,
    /// The backend's `api_key` when the slot was taken. It travels with the slot, not
    /// with the config snapshot the request took on arrival: a request queued before a
    /// reload may be admitted to a server that reload added.
    api_key: Option<Secret>,
    /// The backend's prefix index, where the request's prompt is recorded.
    prefix: Arc<PrefixIndex>,
    /// How long the request waited in the queue for this slot.
    pub queued_for: Duration,
}

impl Slot {
    pub fn backend_url(&self) -> &str {
        &self.url
    }

    /// The HTTP client of the slot's backend.
    pub fn agent(&self) -> &BackendAgent {
        &self.agent
    }

    /// The key to send to the slot's backend instead of the client's, if it has one.
    pub fn api_key(&self) -> Option<&Secret> {
        self.api_key.as_ref()
    }

    /// The prefix index of the slot's backend.
    pub fn prefix_index(&self) -> &PrefixIndex {
        &self.prefix
    }

    pub fn backend_id(&self) -> BackendId {
        self.id
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.table.release(self.id);
    }
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot").field("backend", &self.url).finish()
    }
}

impl Slot {
    /// A slot on `entry`, already counted by `Entry::admit`.
    pub(super) fn on(table: &Arc<Table>, entry: &Entry, queued_for: Duration) -> Slot {
        Slot {
            table: Arc::clone(table),
            id: entry.id,
            url: Arc::clone(&entry.url),
            agent: entry.agent.clone(),
            api_key: entry.api_key.clone(),
            prefix: Arc::clone(&entry.prefix),
            queued_for,
        }
    }
}
