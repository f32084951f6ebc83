//! The hostile clients: every input of the harness's catalogue, over and over, each
//! checked for the answer it must get. The ones the router must refuse carry a tag
//! the mocks count, so that the end can check that none of them reached a backend.

use std::net::SocketAddr;
use std::time::Instant;

use vllm_router_tools::hostile::{catalogue, Expect, Hostile, Target};
use vllm_router_tools::http::Conn;

use crate::stats::Stats;
use crate::{HOSTILE_CLIENTS, IO_TIMEOUT, KEY, MAX_BODY};

/// The `x-mock-tag` of the requests the router must refuse (`/mock/stats`, `tags`).
pub const TAG: &str = "soak-hostile";

fn run_hostile(addr: SocketAddr, h: &Hostile) -> Result<(), String> {
    let mut conn = Conn::connect(addr, IO_TIMEOUT).map_err(|e| format!("connect: {e}"))?;
    conn.try_send_raw(&h.request)?;
    match h.expect {
        Expect::Nothing => Ok(()),
        Expect::StreamStarts => {
            let (status, _) = conn.read_head()?;
            if status != 200 {
                return Err(format!("status {status}"));
            }
            match conn.read_chunk()? {
                Some(first) if first.starts_with(b"data: ") => Ok(()),
                other => Err(format!("no first event: {other:?}")),
            }
        }
        Expect::Status(status, code) => {
            let reply = conn.read_response(false)?;
            if reply.status != status {
                return Err(format!("status {}: {}", reply.status, reply.snippet()));
            }
            if let Some(code) = code {
                let doc = reply.try_json()?;
                if doc["error"]["code"] != code || !doc["error"]["message"].is_string() {
                    return Err(format!("error body {doc}, code {code} wanted"));
                }
            }
            if status == 401
                && !reply
                    .header("www-authenticate")
                    .is_some_and(|c| c.starts_with("Bearer"))
            {
                return Err("401 without WWW-Authenticate: Bearer".into());
            }
            Ok(())
        }
    }
}

/// Cycles through every hostile input, each client from its own place in the list.
pub fn hostile_client(addr: SocketAddr, t: usize, deadline: Instant, stats: &Stats) {
    let marker = format!("x-mock-tag: {TAG}\r\n");
    let all = catalogue(&Target {
        key: Some(KEY),
        max_body: MAX_BODY,
        marker: &marker,
    });
    for h in &all {
        stats.declare(h.name, &h.expect.describe());
    }
    let mut i = t * all.len() / HOSTILE_CLIENTS;
    while Instant::now() < deadline {
        let h = &all[i % all.len()];
        i += 1;
        stats.record(h.name, run_hostile(addr, h).err(), None);
    }
}
