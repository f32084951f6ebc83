//! A histogram over fixed bounds, in the Prometheus shape: every metric of the router
//! that is a distribution (`control::metrics`, `control::generation_metrics`) and the
//! token gaps of one reply (`request::generation`) count with it.

use std::time::Duration;

use crate::control::metrics::sample;

/// A histogram over fixed bounds, counted per bucket (made cumulative when written
/// out), so that an observation costs one search.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    bounds: &'static [f64],
    /// One count per bound, then the observations above the last.
    counts: Vec<u64>,
    sum: f64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
        }
    }

    pub fn observe(&mut self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self.bounds.partition_point(|b| *b < secs);
        self.counts[i] += 1;
        self.sum += secs;
    }

    /// Adds another histogram's counts over the same bounds.
    pub fn merge(&mut self, other: &Histogram) {
        debug_assert_eq!(self.bounds, other.bounds);
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.sum += other.sum;
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    pub fn sum(&self) -> f64 {
        self.sum
    }

    /// Writes the histogram's series (cumulative buckets, `+Inf`, sum, count) under
    /// `name` with `labels`.
    pub(crate) fn write(&self, out: &mut String, name: &str, labels: &[(&str, &str)]) {
        let bucket = format!("{name}_bucket");
        let mut cumulative = 0;
        for (i, count) in self.counts.iter().enumerate() {
            cumulative += count;
            let le = self.bounds.get(i).map_or("+Inf".to_owned(), f64::to_string);
            let mut with_le = labels.to_vec();
            with_le.push(("le", &le));
            sample(out, &bucket, &with_le, cumulative as f64);
        }
        sample(out, &format!("{name}_sum"), labels, self.sum);
        sample(out, &format!("{name}_count"), labels, cumulative as f64);
    }
}
