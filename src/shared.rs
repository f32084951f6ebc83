//! The state every thread shares, built once by `main` and cloned (as `Arc<Shared>`)
//! into every worker. Each piece has one writer:
//!
//! | piece      | written by                                  | read by                    |
//! |------------|---------------------------------------------|----------------------------|
//! | `config`   | `main` at start, then the reload thread     | every request, at its start |
//! | `table`    | `admission` only (acquire, release, close)  | status endpoints (views)   |
//! | `agent`    | nobody (ureq's pool is internally locked)   | `relay`                    |
//! | `metrics`  | workers, health and reload threads (counts) | `/metrics`                 |
//! | `draining` | the signal handler, once                    | `/readyz`, workers         |
//! | `clients`  | accept and connection threads, workers (see `clients`) | the janitor, `/metrics` |

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::RwLock;

use crate::admission::Table;
use crate::auth::Secret;
use crate::clients::Clients;
use crate::config::Config;
use crate::metrics::Metrics;

pub struct Shared {
    config: RwLock<Arc<Config>>,
    env_api_key: Option<Secret>,
    pub table: Arc<Table>,
    pub agent: ureq::Agent,
    pub metrics: Metrics,
    pub clients: Arc<Clients>,
    pub started: Instant,
    draining: AtomicBool,
}

impl Shared {
    /// `env_api_key` is the `API_KEY` environment variable, read once at start.
    pub fn new(config: Config, env_api_key: Option<Secret>) -> Result<Arc<Shared>, String> {
        let table = Table::new(&config.servers, !config.settings.enable_active_health_check);
        let agent = backend_agent(&config.settings)?;
        Ok(Arc::new(Shared {
            env_api_key,
            config: RwLock::new(Arc::new(config)),
            table,
            agent,
            metrics: Metrics::default(),
            clients: Clients::new(),
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

/// The HTTP client towards the backends. It must add nothing of its own to what it
/// relays: no redirects followed, no status turned into an error, no User-Agent,
/// Accept or Accept-Encoding of its own, and no decompression (the gzip feature is off
/// in Cargo.toml) so bodies reach the client as the backend sent them.
fn backend_agent(settings: &crate::config::Settings) -> Result<ureq::Agent, String> {
    use ureq::config::AutoHeaderValue;
    let builder = ureq::Agent::config_builder();
    #[cfg(feature = "tls")]
    let builder = builder.tls_config(crate::tls::client_config(settings)?);
    #[cfg(not(feature = "tls"))]
    let _ = settings;
    Ok(builder
        .http_status_as_error(false)
        .max_redirects(0)
        .max_redirects_will_error(false)
        .user_agent(AutoHeaderValue::None)
        .accept(AutoHeaderValue::None)
        .accept_encoding(AutoHeaderValue::None)
        .allow_non_standard_methods(true)
        .no_delay(true)
        // Enough idle connections that a busy backend is not re-dialled per request.
        .max_idle_connections(1024)
        .max_idle_connections_per_host(256)
        .build()
        .new_agent())
}
