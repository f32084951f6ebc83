//! The client side: a connection from accept to close, on sockets the router owns.
//!
//! - `connection`: the socket (plain or TLS), its capped read buffer, the client
//!   timeouts, and the graceful close.
//! - `head`: parsing a request head, strictly; `chunked`: decoding a chunked body.
//! - `request`: a request as a worker holds it, reading its body, and whether its
//!   connection can carry another.
//! - `reply`: writing replies, the only code that knows response framing.
//! - `body_stream`: a request body read as it is sent on (multipart uploads).
//! - `budget`: the memory all request bodies held at once may take.
//! - `registry`: the open connections (caps in all and per address) and what a
//!   connection's threads share; `handoff`: taking a connection back from its worker,
//!   and noticing meanwhile a client that leaves.
//!
//! - `listener`: the listening socket and the accept loop, with the connection caps;
//!   `thread`: a connection's own thread, reading heads and lending the connection to
//!   a worker (`request::pool`) for each request.

pub mod body_stream;
pub mod budget;
pub mod chunked;
pub mod connection;
pub mod handoff;
pub mod head;
pub mod listener;
pub mod registry;
pub mod reply;
pub mod request;
pub mod thread;
