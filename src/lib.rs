//! vllm-router: a synchronous thread-pool proxy in front of vLLM OpenAI-compatible
//! servers. ARCHITECTURE.md is the map; each module's doc says what it owns.
//!
//! The folders are the layers, in the order a request meets them: `client` (a
//! connection from accept to close), `request` (the request path, from the head to
//! the last byte of the reply), `backend` (the backends: their registry and slots,
//! their health, the HTTP client towards them) and `control` (what runs the process:
//! the configuration and the command line, reload, signals, metrics, logging).
//! `shared` and `tls` stay at the top because every layer uses them: `Shared` is the
//! state all threads hold, and `tls` serves both the listener (`client`) and the
//! agents towards https:// backends (`backend`).
#![deny(unsafe_code)] // the exceptions (client::budget, client::handoff, client::listener, request::tunnel) say why where they allow it

pub mod backend;
pub mod client;
pub mod control;
pub mod request;
pub mod shared;
pub mod tls;
