//! Counting: requests sent and failed per kind, the first errors of each, and their
//! times, from every client thread.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

/// Requests sent and failed, per kind.
#[derive(Default)]
pub struct Stats {
    kinds: Mutex<BTreeMap<String, Kind>>,
}

#[derive(Default, Clone)]
pub struct Kind {
    pub expect: String,
    pub sent: u64,
    pub errors: u64,
    /// The first few errors, for the report.
    pub samples: Vec<String>,
    /// How long each request took, for the normal kinds; until the close or the
    /// answer, for the slow ones.
    pub latencies: Vec<Duration>,
    /// What `latencies` measure, in the report; "latency" when empty.
    pub timing: &'static str,
}

impl Stats {
    pub fn declare(&self, name: &str, expect: &str) {
        let mut kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        kinds.entry(name.to_owned()).or_default().expect = expect.to_owned();
    }

    /// Declares a kind whose times are not request latencies.
    pub fn declare_timed(&self, name: &str, expect: &str, timing: &'static str) {
        self.declare(name, expect);
        let mut kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        kinds.entry(name.to_owned()).or_default().timing = timing;
    }

    pub fn record(&self, name: &str, error: Option<String>, took: Option<Duration>) {
        let mut kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        let kind = kinds.entry(name.to_owned()).or_default();
        kind.sent += 1;
        kind.latencies.extend(took);
        if let Some(e) = error {
            kind.errors += 1;
            if kind.samples.len() < 5 {
                kind.samples.push(e);
            }
        }
    }

    /// Requests sent and errors, over every kind.
    pub fn totals(&self) -> (u64, u64) {
        let kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        kinds
            .values()
            .fold((0, 0), |(s, e), k| (s + k.sent, e + k.errors))
    }

    pub fn table(&self) -> BTreeMap<String, Kind> {
        self.kinds.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}
