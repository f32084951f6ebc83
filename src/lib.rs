//! vllm-router: a synchronous thread-pool proxy in front of vLLM OpenAI-compatible
//! servers. ARCHITECTURE.md is the map; each module's doc says what it owns.
#![deny(unsafe_code)] // the exceptions (client::watch, client::budget, server) say why where they allow it

pub mod access;
pub mod admission;
pub mod auth;
pub mod cli;
pub mod client;
pub mod config;
pub mod endpoints;
pub mod error;
pub mod headers;
pub mod health;
pub mod logging;
pub mod metrics;
pub mod relay;
pub mod reload;
pub mod server;
pub mod shared;
pub mod signals;
pub mod tls;
pub mod upstream;
