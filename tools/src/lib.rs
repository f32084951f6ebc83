//! The harness the root package's integration tests share with `soak` and `bench`:
//! everything that drives a real `vllm-router` binary from outside, over sockets and
//! `/proc`. It does not link the router: what it checks is what a client sees.

pub mod hostile;
pub mod http;
pub mod prefix;
pub mod process;
pub mod procfs;
