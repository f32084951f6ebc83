//! The state every thread shares, built once by `main` and cloned (as `Arc<Shared>`)
//! into every worker. Each piece has one writer:
//!
//! | piece      | written by                                        | read by                          |
//! |------------|---------------------------------------------------|----------------------------------|
//! | `config`   | `main` at start, then the reload thread           | every request, at its start      |
//! | `table`    | `backend::registry` only (acquire, release, close) | status endpoints (views)        |
//! | agents     | `backend::registry`, one in each backend's entry  | `request::exchange`, health probes |
//! | `metrics`  | workers, health and reload threads (counts)       | `/metrics`                       |
//! | `draining` | the signal handler, once                          | `/readyz`, workers               |
//! | `clients`  | accept and connection threads, workers (see `client::registry`) | `/metrics`         |
//! | `budget`   | workers, as they read and drop request bodies     | workers                          |
//! | `sessions` | workers, after admission (`request::route`)       | workers, before admission        |
//! | `responses`| workers, after a create or a delete (`request::stored`) | workers                    |
//! | `refresher`| workers, refreshing model lists on demand (`backend::refresh`) | workers             |
//!
//! The agents, ureq's HTTP clients (`backend::http`), live in the `table`: each backend's is
//! made with its entry (at start, or when a reload adds the server) and goes with it.
//! A request takes a clone with its slot (`Slot::agent`), a health probe one for its
//! round (`Table::probe_of`), so a backend removed by a reload keeps its agent until
//! the last of them ends. They need no lock of the router's: ureq's pool has its own.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::RwLock;

use crate::backend::affinity::Sessions;
use crate::backend::http::AgentConfig;
use crate::backend::refresh::Refresher;
use crate::backend::registry::Table;
use crate::client::budget::Budget;
use crate::client::registry::Clients;
use crate::control::config::Config;
use crate::control::metrics::Metrics;
use crate::request::auth::Secret;
use crate::request::stored::Responses;

pub struct Shared {
    config: RwLock<Arc<Config>>,
    env_api_key: Option<Secret>,
    pub table: Arc<Table>,
    pub metrics: Metrics,
    pub clients: Arc<Clients>,
    /// The request bodies held in memory (`max_buffered_body_bytes`).
    pub budget: Arc<Budget>,
    /// Where each session went (`routing = "cache_aware"`).
    pub sessions: Sessions,
    /// Which backend made each stored response.
    pub responses: Responses,
    /// The times of the on-demand model refreshes.
    pub refresher: Refresher,
    pub started: Instant,
    draining: AtomicBool,
}

impl Shared {
    /// `env_api_key` is the `API_KEY` environment variable, read once at start.
    pub fn new(config: Config, env_api_key: Option<Secret>) -> Result<Arc<Shared>, String> {
        let agents = AgentConfig::from_settings(&config.settings)?;
        let trusted = !config.settings.enable_active_health_check;
        let table = Table::new(
            &config.servers,
            trusted,
            agents,
            config.settings.prefix_index_tokens,
        );
        Ok(Arc::new(Shared {
            env_api_key,
            config: RwLock::new(Arc::new(config)),
            table,
            metrics: Metrics::default(),
            clients: Clients::new(),
            budget: Budget::new(),
            sessions: Sessions::default(),
            responses: Responses::default(),
            refresher: Refresher::default(),
            started: Instant::now(),
            draining: AtomicBool::new(false),
        }))
    }

    /// The current config. A request takes this snapshot once and keeps it to the end,
    /// so a reload never changes the rules halfway through a request.
    pub fn config(&self) -> Arc<Config> {
        Arc::clone(&self.config.read())
    }

    /// Every client API key in force with `config`: from the file, the key file and
    /// the environment. Empty when the router is open to all.
    pub fn client_keys<'a>(
        &'a self,
        config: &'a Config,
    ) -> impl Iterator<Item = &'a Secret> + Clone {
        let s = &config.settings;
        s.api_keys
            .iter()
            .chain(&s.file_api_keys)
            .chain(&self.env_api_key)
    }

    /// Swaps in a reloaded config (reload thread). Requests already running keep
    /// the snapshot they took.
    pub fn replace_config(&self, config: Config) {
        *self.config.write() = Arc::new(config);
    }

    /// Stops admitting requests: `/readyz` turns 503 and queued requests are refused.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.table.close();
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}
