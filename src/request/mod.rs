//! The request path: from a parsed head to the last byte of its reply, on a worker.
//!
//! - `pool`: the worker threads, and the panic boundary each request runs in.
//! - `endpoints`: the router's own paths, answered without a backend; `relay`:
//!   everything else, proxied, one function per phase.
//! - `headers`: which headers cross the proxy in each direction; `auth`: client API
//!   keys; `access`: the request id and the access-log entry; `trace`: the W3C trace
//!   context passed on or started; `generation`: what a reply says about its
//!   generation (token timing, usage, finish reasons, error events), read as it passes.
//! - `error`: `RouterError`, every error the router answers a request with. It lives
//!   here rather than at the top because a request is what gets an error reply: the
//!   client layer's refusals of a bad head are requests that did not make it this far.

pub mod access;
pub mod auth;
pub mod endpoints;
pub mod error;
pub mod exchange;
pub mod generation;
pub mod headers;
pub mod pick;
pub mod pool;
pub mod prefix;
pub mod query;
pub mod queue;
pub mod relay;
pub mod route;
pub mod stored;
pub mod trace;
pub mod tunnel;
pub mod upload;
pub mod websocket;
