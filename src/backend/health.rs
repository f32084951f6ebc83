//! The health thread: decides which backends are healthy and learns what models they
//! serve.
//!
//! It owns each backend's check history (`Track`) and is the only writer of active
//! health in the slot table (`Table::record_check`, `set_models`);
//! passive health (request failures) is written by the request path
//! (`request::exchange`, `request::relay`). The probes themselves (`backend::probe`) run
//! on short-lived threads, at most one per backend at a time, and report back over a
//! channel, so a hung backend never delays the checks of the others.
//!
//! Rules, over a sliding window of the last `WINDOW` checks of a backend:
//! - it turns unhealthy after `health_check_consecutive_failures` failed checks in a
//!   row, or, once the window holds `MIN_SAMPLES` checks, when the share of good checks
//!   is below `health_check_min_success_rate` or their mean time is above
//!   `health_check_max_response_time`;
//! - a good check is a 2xx within `health_check_max_response_time`: a slow answer is
//!   not good enough to bring a backend back, or a backend taken down for slowness
//!   would come back at its next answer and flap;
//! - it turns healthy again after `health_check_recovery_successes` good checks in a
//!   row; its window then holds those checks only, so old failures do not knock it
//!   down again, and the rate and mean rules pass on it by construction;
//! - a backend that has never been healthy (just started or added) takes traffic after
//!   its first good check, made at once rather than at the next interval;
//! - a backend marked down by request failures (passive health) comes back by the
//!   same rule, counting the good checks since it was marked down; with active checks
//!   off it is probed `auto_recovery_threshold` after that, and one good probe brings
//!   it back.
//!
//! The rules are pure functions of a backend's `Track`, its standing in the table and
//! the time (`step`), so they are tested without threads or sockets.
//!
//! Models come from each backend's `/v1/models`: at its first check, when it recovers,
//! and every `MODELS_REFRESH`. A failed fetch keeps the last good list.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::backend::probe::Target;
use crate::backend::registry::{BackendId, BackendView, CheckStats, Reported, NOT_CHECKED};
use crate::control::config::Settings;
use crate::shared::Shared;

/// Checks remembered per backend.
const WINDOW: usize = 10;
/// Checks needed before the success-rate and mean-time rules apply, so that one bad
/// check after a start or a recovery cannot mark a backend down by itself.
const MIN_SAMPLES: usize = 5;
/// How often the model list of a healthy backend is fetched again.
const MODELS_REFRESH: Duration = Duration::from_secs(60);
/// How often the thread looks for probes that are due.
const IDLE_TICK: Duration = Duration::from_millis(250);

/// Starts the health thread.
pub fn spawn(shared: Arc<Shared>) -> std::io::Result<thread::JoinHandle<()>> {
    thread::Builder::new()
        .name("health".to_owned())
        .spawn(move || run(&shared))
}

/// What the health thread remembers of one backend.
#[derive(Default)]
struct Track {
    window: VecDeque<Sample>,
    /// Good checks (2xx and fast enough) in a row.
    consecutive_good: u32,
    consecutive_failed: u32,
    /// The passive mark-down (its `down_by_requests_until`) the good checks in a row
    /// are counted since.
    passive_mark: Option<Instant>,
    ever_healthy: bool,
    /// A probe for this backend is running.
    probing: bool,
    last_probe: Option<Instant>,
    models_fetched: Option<Instant>,
    last_scrape: Option<Instant>,
}

#[derive(Clone, Copy)]
struct Sample {
    ok: bool,
    latency: Duration,
}

/// What a probe thread reports.
struct Report {
    id: BackendId,
    /// `None` when only the models were fetched.
    check: Option<Result<Duration, String>>,
    models: Option<Vec<serde_json::Value>>,
    /// `Some` when `/metrics` was read: the parsed load (`None` when unreadable) and
    /// this router's in-flight count when the scrape was sent.
    load: Option<(Option<Reported>, u32)>,
}

fn run(shared: &Arc<Shared>) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let mut tracks: HashMap<BackendId, Track> = HashMap::new();
    loop {
        let config = shared.config();
        let settings = &config.settings;
        let view = shared.table.view();
        tracks.retain(|id, _| view.backends.iter().any(|b| b.id == *id));
        for backend in &view.backends {
            let track = tracks.entry(backend.id).or_default();
            start_probe_if_due(shared, backend, track, settings, &tx, Instant::now());
        }
        let mut tick = settings.health_check_interval.min(IDLE_TICK);
        if !settings.backend_metrics_interval.is_zero() {
            tick = tick.min(settings.backend_metrics_interval);
        }
        collect_reports(shared, &rx, &mut tracks, settings, Instant::now() + tick);
    }
}

/// Which parts of a probe round are due for a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Due {
    check: bool,
    models: bool,
    scrape: bool,
}

/// Starts a probe thread for `backend` when one is due at `now` and none is running.
fn start_probe_if_due(
    shared: &Arc<Shared>,
    b: &BackendView,
    track: &mut Track,
    s: &Settings,
    tx: &Sender<Report>,
    now: Instant,
) {
    if track.probing {
        return;
    }
    let Due {
        check: check_due,
        models: models_due,
        scrape: scrape_due,
    } = due(track, b, s, now);
    if !check_due && !models_due && !scrape_due {
        return;
    }
    // Gone only if a reload removed the backend since the view was taken. The key is
    // the entry's, the one its requests carry too.
    let Some((agent, key)) = shared.table.probe_of(b.id) else {
        return;
    };
    track.probing = true;
    if check_due {
        track.last_probe = Some(now);
    }
    if scrape_due {
        track.last_scrape = Some(now);
    }
    let (shared, tx, id, url, healthy) = (
        Arc::clone(shared),
        tx.clone(),
        b.id,
        b.url.clone(),
        b.healthy,
    );
    let timeout = s.health_check_timeout;
    let spawned = thread::Builder::new()
        .name("health-probe".to_owned())
        .spawn(move || {
            let target = Target {
                agent: &agent,
                url: &url,
                timeout,
                key,
            };
            let check = check_due.then(|| target.check_health());
            let up = check.as_ref().map_or(healthy, |c| c.is_ok());
            let models = (up && models_due).then(|| target.fetch_models());
            // This router's count is read right before the scrape: requests that
            // finish while the check and the model fetch run must not be taken off
            // the report a second time.
            let load = (up && scrape_due).then(|| {
                let own = shared.table.in_flight_of(id);
                (target.scrape_load(), own)
            });
            let _ = tx.send(Report {
                id,
                check,
                models: models.flatten(),
                load,
            });
        });
    if let Err(e) = spawned {
        track.probing = false;
        log::warn!("cannot start a health probe for {}: {e}", b.url);
    }
}

/// What a probe round for `b` should do at `now`: a health check (active checks, or a
/// backend marked down by requests whose recovery time has come with them off), its
/// models, its load.
fn due(track: &Track, b: &BackendView, s: &Settings, now: Instant) -> Due {
    let check_due = if let Some(until) = b
        .down_by_requests_until
        .filter(|_| !s.enable_active_health_check)
    {
        now >= until
            && track
                .last_probe
                .is_none_or(|t| now >= t + s.health_check_interval.min(IDLE_TICK * 4))
    } else {
        s.enable_active_health_check
            && track
                .last_probe
                .is_none_or(|t| now >= t + s.health_check_interval)
    };
    // Models are read for a backend that is up or about to be checked: at its first
    // check, after it recovers (`models_fetched` reset), and when the list is stale.
    let models_wanted = track
        .models_fetched
        .is_none_or(|t| now >= t + MODELS_REFRESH);
    let models_due = models_wanted && (b.healthy || check_due);
    let scrape_every = s.backend_metrics_interval;
    let scrape_due = b.healthy
        && !scrape_every.is_zero()
        && track.last_scrape.is_none_or(|t| now >= t + scrape_every);
    Due {
        check: check_due,
        models: models_due,
        scrape: scrape_due,
    }
}

/// Applies probe reports until `deadline`.
fn collect_reports(
    shared: &Shared,
    rx: &Receiver<Report>,
    tracks: &mut HashMap<BackendId, Track>,
    s: &Settings,
    deadline: Instant,
) {
    loop {
        let report = match rx.recv_deadline(deadline) {
            Ok(report) => report,
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return,
        };
        let Some(track) = tracks.get_mut(&report.id) else {
            continue;
        };
        track.probing = false;
        if let Some(models) = report.models {
            track.models_fetched = Some(Instant::now());
            shared.table.set_models(report.id, models);
        }
        if let Some((load, own_at_scrape)) = report.load {
            // Trusted for a few scrape intervals: a backend whose metrics stop
            // answering soon falls back to the router's own count.
            let fresh_for = s.backend_metrics_interval * 3 + s.health_check_timeout;
            shared
                .table
                .set_reported(report.id, load, own_at_scrape, fresh_for);
        }
        if let Some(check) = report.check {
            apply_check(shared, report.id, track, check, s);
        }
    }
}

/// Records one health check and moves the backend between healthy and unhealthy.
fn apply_check(
    shared: &Shared,
    id: BackendId,
    track: &mut Track,
    check: Result<Duration, String>,
    s: &Settings,
) {
    let Some(backend) = shared.table.backend(id) else {
        return;
    };
    let standing = Standing {
        healthy: backend.healthy,
        down_by_requests_until: backend.down_by_requests_until,
    };
    let (sample, change) = step(track, standing, &check, s, Instant::now());
    shared
        .metrics
        .observe_health_check(&backend.url, sample.ok, sample.latency);
    let ok_count = track.window.iter().filter(|s| s.ok).count();
    let stats = CheckStats {
        consecutive_failures: track.consecutive_failed,
        success_rate: Some(ok_count as f64 / track.window.len() as f64),
        last_check: Some(SystemTime::now()),
        last_latency: Some(sample.latency),
    };
    // Figures and health change in one step, so a reader never sees one without
    // the other.
    let changed = shared.table.record_check(id, stats, change.clone());
    match change {
        Some((true, _)) if changed => log::info!("backend {} is up", backend.url),
        Some((false, Some(reason))) if changed => {
            log::warn!("backend {} is down: {reason}", backend.url)
        }
        // Once, for a backend that has not come up since it was added.
        Some((false, Some(reason))) if backend.reason.as_deref() == Some(NOT_CHECKED) => {
            log::warn!("backend {} is not up yet: {reason}", backend.url)
        }
        _ => {}
    }
}

/// What the table says of a backend when its check comes in.
#[derive(Clone, Copy)]
struct Standing {
    healthy: bool,
    down_by_requests_until: Option<Instant>,
}

/// Records one check in `track` and returns its sample and the health change it
/// brings, as (healthy, reason); `None` for no change.
fn step(
    track: &mut Track,
    standing: Standing,
    check: &Result<Duration, String>,
    s: &Settings,
    now: Instant,
) -> (Sample, Option<(bool, Option<String>)>) {
    let sample = match check {
        Ok(latency) => Sample {
            ok: true,
            latency: *latency,
        },
        Err(_) => Sample {
            ok: false,
            latency: s.health_check_timeout,
        },
    };
    if track.window.len() == WINDOW {
        track.window.pop_front();
    }
    track.window.push_back(sample);
    let good = sample.ok && sample.latency <= s.health_check_max_response_time;
    track.consecutive_good = if good { track.consecutive_good + 1 } else { 0 };
    track.consecutive_failed = if sample.ok {
        0
    } else {
        track.consecutive_failed + 1
    };
    if let Some(until) = standing.down_by_requests_until {
        if track.passive_mark != Some(until) {
            // Marked down by requests since the last check: only checks from now on
            // show that whatever failed them is gone.
            track.passive_mark = Some(until);
            track.consecutive_good = u32::from(good);
        }
    }
    (sample, decide(standing, track, check, s, now))
}

/// The health change one check brings, as (healthy, reason); `None` for no change.
fn decide(
    standing: Standing,
    track: &mut Track,
    check: &Result<Duration, String>,
    s: &Settings,
    now: Instant,
) -> Option<(bool, Option<String>)> {
    if standing.healthy {
        return verdict(track, check, s).map(|reason| (false, Some(reason)));
    }
    let good = track.consecutive_good > 0;
    let recovered = match standing.down_by_requests_until {
        // Without active checks this is the probe after the hold-off, made only once
        // it is over: one good answer brings it back.
        Some(until) if !s.enable_active_health_check => {
            if now < until {
                return None;
            }
            good
        }
        _ if !track.ever_healthy => good,
        _ => {
            let needed = s.health_check_recovery_successes.max(1);
            track.consecutive_good >= needed && {
                let streak = (needed as usize).min(WINDOW);
                let tail: Vec<Sample> = track.window.iter().rev().take(streak).copied().collect();
                window_verdict(&tail, s).is_none()
            }
        }
    };
    if recovered {
        // The window keeps the good checks that brought it back, and nothing older.
        let streak = (track.consecutive_good as usize).clamp(1, WINDOW);
        let drop = track.window.len().saturating_sub(streak);
        track.window.drain(..drop);
        track.ever_healthy = true;
        track.passive_mark = None;
        // Learn its models again: it may have come back with others.
        track.models_fetched = None;
        return Some((true, None));
    }
    let reason = match check {
        Err(e) => format!("health check failed: {e}"),
        Ok(latency) if !good => format!(
            "health check took {:.3}s, above health_check_max_response_time {:.3}s",
            latency.as_secs_f64(),
            s.health_check_max_response_time.as_secs_f64()
        ),
        Ok(_) => format!(
            "recovering: {} of {} good checks in a row",
            track.consecutive_good, s.health_check_recovery_successes
        ),
    };
    // A backend marked down by requests keeps that reason until it is back.
    if standing.down_by_requests_until.is_some() && s.enable_active_health_check {
        return None;
    }
    Some((false, Some(reason)))
}

/// Why a healthy backend should be marked down, if it should.
fn verdict(track: &Track, last: &Result<Duration, String>, s: &Settings) -> Option<String> {
    if track.consecutive_failed >= s.health_check_consecutive_failures {
        let last = last.as_ref().err().map_or("", String::as_str);
        return Some(format!(
            "{} health checks failed in a row (last: {last})",
            track.consecutive_failed
        ));
    }
    let window: Vec<Sample> = track.window.iter().copied().collect();
    if window.len() < MIN_SAMPLES {
        return None;
    }
    window_verdict(&window, s)
}

/// The success-rate and mean-time rules over `window`.
fn window_verdict(window: &[Sample], s: &Settings) -> Option<String> {
    let n = window.len();
    if n == 0 {
        return None;
    }
    let ok = window.iter().filter(|s| s.ok).count();
    let rate = ok as f64 / n as f64;
    if rate < s.health_check_min_success_rate {
        return Some(format!(
            "{ok} of the last {n} health checks succeeded, below the minimum rate {}",
            s.health_check_min_success_rate
        ));
    }
    let mean = window.iter().map(|s| s.latency).sum::<Duration>() / n as u32;
    if mean > s.health_check_max_response_time {
        return Some(format!(
            "health checks took {:.3}s on average, above {:.3}s",
            mean.as_secs_f64(),
            s.health_check_max_response_time.as_secs_f64()
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn track(samples: &[(bool, u64)], consecutive_failed: u32) -> Track {
        Track {
            window: samples
                .iter()
                .map(|&(ok, ms)| Sample {
                    ok,
                    latency: Duration::from_millis(ms),
                })
                .collect(),
            consecutive_failed,
            ..Track::default()
        }
    }

    fn check(samples: &[(bool, u64)], consecutive_failed: u32) -> Option<String> {
        let s = Settings {
            health_check_consecutive_failures: 3,
            health_check_min_success_rate: 0.8,
            health_check_max_response_time: Duration::from_millis(500),
            ..Settings::default()
        };
        verdict(
            &track(samples, consecutive_failed),
            &Err("refused".into()),
            &s,
        )
    }

    #[test]
    fn verdicts() {
        assert_eq!(check(&[(true, 10)], 0), None);
        // One failure alone never marks a backend down.
        assert_eq!(check(&[(false, 10)], 1), None);
        assert!(check(&[(false, 10); 3], 3)
            .is_some_and(|r| r.contains("3 health checks failed in a row")));
        // The rate rule waits for MIN_SAMPLES checks.
        assert_eq!(
            check(&[(true, 10), (false, 10), (true, 10), (false, 10)], 1),
            None
        );
        let mixed = [(true, 10), (false, 10), (true, 10), (false, 10), (true, 10)];
        assert!(check(&mixed, 0).is_some_and(|r| r.contains("3 of the last 5")));
        let slow = [(true, 900); 5];
        assert!(check(&slow, 0).is_some_and(|r| r.contains("on average")));
        assert_eq!(check(&[(true, 100); 10], 0), None);
    }

    /// The settings of issue 13's slow-backend case.
    fn spec() -> Settings {
        Settings {
            health_check_interval: Duration::from_secs(1),
            health_check_timeout: Duration::from_secs(1),
            health_check_max_response_time: Duration::from_millis(400),
            health_check_consecutive_failures: 3,
            health_check_min_success_rate: 0.8,
            health_check_recovery_successes: 2,
            ..Settings::default()
        }
    }

    /// Runs checks of the given latencies (`None`: a failed check) through `step`, one
    /// a second, applying each change as the table would; returns the health after
    /// each check.
    fn run(
        track: &mut Track,
        standing: &mut Standing,
        checks: &[Option<u64>],
        s: &Settings,
        now: &mut Instant,
    ) -> Vec<bool> {
        checks
            .iter()
            .map(|c| {
                let check = c
                    .map(Duration::from_millis)
                    .ok_or_else(|| "refused".to_owned());
                *now += Duration::from_secs(1);
                if let (_, Some((healthy, _))) = step(track, *standing, &check, s, *now) {
                    standing.healthy = healthy;
                    if healthy {
                        standing.down_by_requests_until = None;
                    }
                }
                standing.healthy
            })
            .collect()
    }

    #[test]
    fn a_slow_backend_goes_down_once_and_stays_down_while_slow() {
        let s = spec();
        let (mut track, mut now) = (Track::default(), Instant::now());
        let mut standing = Standing {
            healthy: false,
            down_by_requests_until: None,
        };
        let fast = run(&mut track, &mut standing, &[Some(5); 10], &s, &mut now);
        assert!(fast.iter().all(|&h| h), "{fast:?}");
        let slow = run(&mut track, &mut standing, &[Some(700); 30], &s, &mut now);
        let down_at = slow.iter().position(|&h| !h).expect("marked down");
        assert!(down_at < WINDOW, "down within the window: {slow:?}");
        assert!(slow[down_at..].iter().all(|&h| !h), "stays down: {slow:?}");
        let fast = run(&mut track, &mut standing, &[Some(5); 10], &s, &mut now);
        let up_at = fast.iter().position(|&h| h).expect("back");
        assert!(up_at < 10, "{fast:?}");
        assert!(fast[up_at..].iter().all(|&h| h), "{fast:?}");
    }

    #[test]
    fn a_backend_that_starts_slow_comes_up_once_fast() {
        let s = spec();
        let (mut track, mut now) = (Track::default(), Instant::now());
        let mut standing = Standing {
            healthy: false,
            down_by_requests_until: None,
        };
        let slow = run(&mut track, &mut standing, &[Some(700); 5], &s, &mut now);
        assert!(slow.iter().all(|&h| !h), "{slow:?}");
        // Its first good check: it has never been healthy.
        assert_eq!(
            run(&mut track, &mut standing, &[Some(5)], &s, &mut now),
            [true]
        );
    }

    #[test]
    fn good_checks_end_a_passive_mark_down_with_active_checks_on() {
        let s = Settings {
            auto_recovery_threshold: Duration::from_secs(60),
            ..spec()
        };
        let (mut track, mut now) = (Track::default(), Instant::now());
        let mut standing = Standing {
            healthy: false,
            down_by_requests_until: None,
        };
        run(&mut track, &mut standing, &[Some(5); 3], &s, &mut now);
        // Request failures mark it down, for a minute without active checks.
        standing.healthy = false;
        standing.down_by_requests_until = Some(now + s.auto_recovery_threshold);
        let after = run(&mut track, &mut standing, &[Some(5); 2], &s, &mut now);
        assert_eq!(
            after,
            [false, true],
            "the good checks before it do not count"
        );

        let off = Settings {
            enable_active_health_check: false,
            ..s
        };
        standing.healthy = false;
        standing.down_by_requests_until = Some(now + Duration::from_secs(3));
        let probes = run(&mut track, &mut standing, &[Some(5); 4], &off, &mut now);
        assert_eq!(
            probes,
            [false, false, true, true],
            "the hold-off, then one probe"
        );
    }

    #[test]
    fn a_backend_down_by_requests_is_probed_once_its_hold_off_is_over() {
        let s = Settings {
            enable_active_health_check: false,
            ..Settings::default()
        };
        let now = Instant::now();
        let b = BackendView {
            id: 1,
            url: "http://b".to_owned(),
            max_concurrent: 4,
            in_flight: 0,
            healthy: false,
            reason: Some("3 consecutive request failures".to_owned()),
            request_failures: 3,
            down_by_requests_until: Some(now + Duration::from_secs(10)),
            models: Vec::new(),
            checks: CheckStats::default(),
            reported: None,
            load: 0,
            admitted_total: 0,
            prefix_blocks: 0,
            prefix_capacity: 0,
            prefix_bound_bytes: 0,
            routed: [0; 3],
        };
        let mut track = Track::default();
        assert!(!due(&track, &b, &s, now).check, "held off");
        let later = now + Duration::from_secs(10);
        assert!(due(&track, &b, &s, later).check, "the hold-off is over");
        track.last_probe = Some(later);
        assert!(
            !due(&track, &b, &s, later + Duration::from_millis(10)).check,
            "one probe at a time apart"
        );
        let healthy = BackendView {
            healthy: true,
            down_by_requests_until: None,
            ..b
        };
        assert_eq!(
            due(&Track::default(), &healthy, &s, now),
            Due {
                check: false,
                models: true,
                scrape: !s.backend_metrics_interval.is_zero(),
            },
            "active checks off: a healthy backend only has its models read"
        );
    }
}
