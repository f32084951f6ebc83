//! Cache-aware routing on the request path: what a request carries into admission
//! (`Route`: its prompt blocks, what each backend holds of them, its session's backend,
//! its rendezvous key), and what is remembered once it is admitted (`remember`: its
//! blocks on the chosen backend's index, its session's new home).
//!
//! `plan` runs before admission, outside the table lock: it reads each backend's
//! `PrefixIndex` under that index's own lock. The pick (`request::pick::cache_aware`)
//! then reads only the `Route`. A queued request keeps the matches it arrived with:
//! the index is an approximation, and a few hundred milliseconds do not change it much.

use std::sync::Arc;

use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::backend::registry::{BackendId, Slot, Table};
use crate::request::access::Routed;
use crate::request::pick::Reason;
use crate::shared::Shared;

/// How many leading blocks name a conversation for the rendezvous tie-break: the
/// start of its prompt (about 128 tokens), the same from one turn to the next.
const RENDEZVOUS_BLOCKS: usize = 4;

/// What the cache-aware pick knows of one request.
#[derive(Debug, Default)]
pub struct Route {
    /// The prompt's chained block hashes (`request::prefix`).
    pub blocks: Vec<u64>,
    /// The leading blocks each backend holds (backends holding none are left out).
    pub matched: Vec<(BackendId, u32)>,
    /// The hash of the session id, and the backend the session was last sent to.
    pub session: Option<(u64, Option<BackendId>)>,
    /// What equally good backends are ranked by: the session, else the prompt's start.
    pub rendezvous: Option<u64>,
}

impl Route {
    /// The leading blocks backend `id` holds.
    pub fn matched_on(&self, id: BackendId) -> u32 {
        self.matched
            .iter()
            .find(|(b, _)| *b == id)
            .map_or(0, |(_, n)| *n)
    }

    /// A session this router has not seen (or has forgotten).
    pub fn is_new_session(&self) -> bool {
        matches!(self.session, Some((_, None)))
    }

    pub fn is_sticky(&self, id: BackendId) -> bool {
        matches!(self.session, Some((_, Some(b))) if b == id)
    }

    /// Backend `url`'s rendezvous rank for this request: the same in every replica,
    /// as it depends only on the request and the URL.
    pub fn rank(&self, url: &str) -> u64 {
        self.rendezvous
            .map_or(0, |key| xxh3_64_with_seed(url.as_bytes(), key))
    }

    /// How backend `id` was chosen, for the access log.
    pub fn routed(&self, id: BackendId) -> Routed {
        Routed {
            reason: self.reason(id).as_str(),
            matched_blocks: self.matched_on(id),
            prompt_blocks: self.blocks.len(),
        }
    }

    /// Why backend `id` stands chosen: its session, else its prefix, else load.
    pub fn reason(&self, id: BackendId) -> Reason {
        if self.is_sticky(id) {
            Reason::Session
        } else if self.matched_on(id) > 0 {
            Reason::Prefix
        } else {
            Reason::Load
        }
    }
}

/// The route of a request whose prompt has `blocks` (`request::prefix`), with `session`
/// the value of its session header.
pub fn plan(shared: &Shared, blocks: Vec<u64>, session: Option<&str>) -> Arc<Route> {
    let session = session
        .filter(|s| !s.is_empty())
        .map(|s| xxh3_64_with_seed(s.as_bytes(), 0))
        .map(|key| (key, shared.sessions.backend_of(key)));
    let rendezvous = session.map(|(key, _)| key).or_else(|| {
        blocks
            .get(blocks.len().min(RENDEZVOUS_BLOCKS).wrapping_sub(1))
            .copied()
    });
    let matched = if blocks.is_empty() {
        Vec::new()
    } else {
        matches(&shared.table, &blocks)
    };
    Arc::new(Route {
        blocks,
        matched,
        session,
        rendezvous,
    })
}

fn matches(table: &Table, blocks: &[u64]) -> Vec<(BackendId, u32)> {
    table
        .prefix_indexes()
        .into_iter()
        .map(|(id, index)| (id, index.matched(blocks)))
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// As soon as the request holds `slot`, before it is sent: its blocks go on that
/// backend's index and its session moves there, so the next request of the session or
/// the conversation, sent while this one is still generating, finds them.
pub fn remember(shared: &Shared, route: &Route, slot: &Slot) {
    slot.prefix_index().record(&route.blocks);
    if let Some((key, _)) = route.session {
        shared.sessions.set(key, slot.backend_id());
    }
}
