//! What runs the process around the request path: the configuration and the command
//! line, the reload thread, signals and the graceful shutdown, the Prometheus metrics,
//! where log lines go, and `top`, the live terminal view of a running router.

pub mod cli;
pub mod config;
pub mod generation_metrics;
pub mod histogram;
pub mod logging;
pub mod metrics;
pub mod reload;
pub mod signals;
pub mod top;
