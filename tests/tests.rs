//! The integration suite: one binary, every test against the real `vllm-router` and
//! `mock-vllm` processes on 127.0.0.1.

mod support;

/// Admission: the per-backend cap, even spread, the FIFO queue and its limits.
mod admission;
/// Backends that misbehave as real ones do: idle closes, early replies, stray bytes,
/// slowness, blips (issue 13).
mod backend;
/// The command line and the config file: check-config, errors, precedence.
mod cli;
/// The parsing front against llhttp (Node's HTTP parser), request by request.
mod differential;
/// The front door: smuggling, lenient forms, caps and timeouts on the router's own
/// HTTP/1.1 server, each refusal one reply and the end of the connection.
mod front_door;
/// Backends that send garbage: clean errors, counted as failures.
mod garbage;
/// Authentication, limits and hostile input.
mod hardening;
/// Health checks, passive health, retries and model-aware routing.
mod health;
/// Metrics and backend-reported load across router replicas.
mod metrics;
/// Live operations: hot reload, signals, graceful shutdown, logs.
mod operations;
/// What operators see: request-level metrics from the SSE events, traces, `top`.
mod operators;
/// Property tests of the parsing front (config, framing, model lookup, key check).
mod properties;
/// Relaying: method, path, query, headers, bodies and backend errors, unchanged.
mod proxy;
/// The routes that are not JSON in, JSON out: WebSocket realtime, multipart uploads,
/// stored responses, LoRA adapters, `?model=` (issue 16).
mod routes;
/// Cache-aware routing: prefixes, sessions, load, replicas (issue 15).
mod routing;
/// Streaming: events arrive one by one; disconnects reach the backend and free slots.
mod streaming;
/// HTTPS towards clients and backends (built with `--features tls`).
#[cfg(feature = "tls")]
mod tls;
