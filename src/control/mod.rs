//! What runs the process around the request path: the reload thread, signals and the
//! graceful shutdown, the Prometheus metrics, and where log lines go.

pub mod logging;
pub mod metrics;
pub mod reload;
pub mod signals;
