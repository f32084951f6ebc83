//! The backends: what the router knows about each and how it talks to them.
//!
//! - `registry`: the slot table, every backend's entry (capacity, in-flight count,
//!   health flags, models, reported load, agent), and the wait queue for a slot.
//! - `health`: the health thread, active checks and the rules that turn a backend
//!   down and up.
//! - `http`: the HTTP client towards the backends, one ureq agent per backend.
//! - `slot`: a slot taken on one backend, given back when it drops.
//! - `affinity` (over `lru`): what cache-aware routing remembers of where prompts and
//!   sessions went.
//! - `socket`: a backend connection the router dials itself (WebSocket tunnels).
//! - `refresh`: reading the models lists again when a request names an unknown model.

pub mod affinity;
pub mod entry;
pub mod health;
pub mod http;
pub mod lru;
pub mod probe;
pub mod refresh;
pub mod registry;
pub mod slot;
pub mod socket;
