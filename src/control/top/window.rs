//! The last minute of readings, and what `top` derives from them: rates, the growth
//! of counters, and quantiles from the growth of histogram buckets, as Prometheus'
//! `rate` and `histogram_quantile` over `[1m]` would.

use std::collections::VecDeque;
use std::time::Duration;

use crate::control::top::exposition::{self, Sample};
use crate::control::top::fetch::Reading;

/// How far back rates and quantiles look.
pub const SPAN: Duration = Duration::from_secs(60);

#[derive(Default)]
pub struct Window {
    readings: VecDeque<Reading>,
}

impl Window {
    /// Adds a reading; drops those older than the span (keeping one at its start),
    /// and all of them when the router restarted (its counters began again).
    pub fn push(&mut self, reading: Reading) {
        if self
            .latest()
            .is_some_and(|l| l.health.uptime_seconds > reading.health.uptime_seconds)
        {
            self.readings.clear();
        }
        while self.readings.len() > 1 && reading.at.duration_since(self.readings[1].at) >= SPAN {
            self.readings.pop_front();
        }
        self.readings.push_back(reading);
    }

    pub fn latest(&self) -> Option<&Reading> {
        self.readings.back()
    }

    /// The first and last readings, when they are far enough apart to measure by.
    fn ends(&self) -> Option<(&Reading, &Reading, f64)> {
        let (first, last) = (self.readings.front()?, self.readings.back()?);
        let secs = last.at.duration_since(first.at).as_secs_f64();
        (secs >= 0.5).then_some((first, last, secs))
    }

    /// How long the window covers so far.
    pub fn span(&self) -> Option<Duration> {
        self.ends().map(|(_, _, s)| Duration::from_secs_f64(s))
    }

    /// A counter's growth over the window, summed over the series matching `filter`.
    pub fn increase(&self, name: &str, filter: &[(&str, &str)]) -> Option<f64> {
        let (first, last, _) = self.ends()?;
        let grew = exposition::sum(&last.metrics, name, filter)
            - exposition::sum(&first.metrics, name, filter);
        Some(grew.max(0.0))
    }

    /// A counter's rate per second over the window.
    pub fn rate(&self, name: &str, filter: &[(&str, &str)]) -> Option<f64> {
        let (_, _, secs) = self.ends()?;
        Some(self.increase(name, filter)? / secs)
    }

    /// The `q` quantile of a histogram's observations made during the window.
    pub fn quantile(&self, q: f64, histogram: &str, filter: &[(&str, &str)]) -> Option<f64> {
        let (first, last, _) = self.ends()?;
        let after = exposition::buckets(&last.metrics, histogram, filter);
        let before = exposition::buckets(&first.metrics, histogram, filter);
        exposition::quantile(q, &exposition::growth(&after, &before))
    }

    /// The growth of a counter over the window for each value of `label`, largest first.
    pub fn increase_by(&self, name: &str, label: &str) -> Vec<(String, f64)> {
        let Some(last) = self.latest() else {
            return Vec::new();
        };
        let mut values: Vec<&str> = last
            .metrics
            .iter()
            .filter(|s| s.name == name)
            .filter_map(|s| s.label(label))
            .collect();
        values.sort_unstable();
        values.dedup();
        let mut out: Vec<(String, f64)> = values
            .into_iter()
            .filter_map(|v| Some((v.to_owned(), self.increase(name, &[(label, v)])?)))
            .collect();
        out.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        out
    }

    /// A gauge's latest value, summed over the series matching `filter`.
    pub fn gauge(&self, name: &str, filter: &[(&str, &str)]) -> Option<f64> {
        let last = self.latest()?;
        let samples: Vec<&Sample> = last.metrics.iter().filter(|s| s.name == name).collect();
        (!samples.is_empty()).then(|| exposition::sum(&last.metrics, name, filter))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::top::fetch::Health;
    use std::time::Instant;

    fn reading(at: Instant, uptime: u64, text: &str) -> Reading {
        Reading {
            at,
            health: Health {
                uptime_seconds: uptime,
                ..Health::default()
            },
            metrics: exposition::parse(text),
        }
    }

    #[test]
    fn rates_span_the_last_minute_and_a_restart_starts_over() {
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let mut w = Window::default();
        w.push(reading(s(0), 10, "c{r=\"a\"} 0\nc{r=\"b\"} 5"));
        assert_eq!(w.rate("c", &[]), None, "one reading measures nothing");
        w.push(reading(s(10), 20, "c{r=\"a\"} 20\nc{r=\"b\"} 5"));
        assert_eq!(w.rate("c", &[]), Some(2.0));
        assert_eq!(
            w.increase_by("c", "r"),
            [("a".to_owned(), 20.0), ("b".to_owned(), 0.0)]
        );
        for n in 2..=8 {
            w.push(reading(
                s(n * 10),
                10 + n * 10,
                &format!("c{{r=\"a\"}} {}", n * 20),
            ));
        }
        assert_eq!(w.span(), Some(Duration::from_secs(60)));
        assert_eq!(w.rate("c", &[("r", "a")]), Some(2.0));
        w.push(reading(s(90), 1, "c{r=\"a\"} 1"));
        assert_eq!(w.rate("c", &[]), None);
        assert_eq!(w.gauge("c", &[]), Some(1.0));
    }
}
