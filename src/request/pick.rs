//! Which backend a request gets, among those with room: a pure function of the
//! candidates, so it is tested without a table, threads or a clock; the table
//! (`backend::registry`) says which backends have room for a request, how loaded each
//! is at the `now` it picks and, for cache-aware routing, what each holds of the
//! request's prompt (`request::route`).
//!
//! - `least_loaded`: by load over capacity, ties taken in turn.
//! - `cache_aware`: a session stays on its backend while that one is within
//!   `SESSION_MARGIN` of the least loaded; otherwise the score `matched share -
//!   LOAD_WEIGHT x load share` decides, so a hot prefix spreads once its backend is
//!   busy and a miss goes to the least loaded. Scores within `TIE_BAND` of the best are
//!   equally good, and the request's rendezvous rank (a hash of its session or prefix
//!   with the backend's URL) chooses among them: router replicas that do not talk to
//!   each other send a new conversation to the same backend. A session this router has
//!   not seen, whose prompt no backend holds, goes to its highest-ranked backend within
//!   `SESSION_MARGIN` of the least loaded: the home another replica gave it, most likely.

/// A backend with room for the request, as the pick sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Candidate {
    /// How busy the backend counts as (`Entry::load`).
    pub load: u32,
    pub max_concurrent: u32,
}

/// The least-loaded of `n` backends (by load / max_concurrent); among equals the first
/// one at or after `rotation`. `candidate(i)` is backend `i` if it has room for the
/// request, `None` if not.
pub(crate) fn least_loaded(
    n: usize,
    rotation: usize,
    candidate: impl Fn(usize) -> Option<Candidate>,
) -> Option<usize> {
    if n == 0 {
        return None;
    }
    let start = rotation % n;
    let mut best: Option<(usize, Candidate)> = None;
    for k in 0..n {
        let idx = (start + k) % n;
        let Some(c) = candidate(idx) else {
            continue;
        };
        let better = match best {
            None => true,
            // load / max < best load / best max, without division.
            Some((_, b)) => {
                u64::from(c.load) * u64::from(b.max_concurrent)
                    < u64::from(b.load) * u64::from(c.max_concurrent)
            }
        };
        if better {
            best = Some((idx, c));
        }
    }
    best.map(|(idx, _)| idx)
}

/// How far above the least loaded backend (as a share of capacity) a session's
/// backend may be and still keep the session.
pub const SESSION_MARGIN: f64 = 0.25;
/// What a share of load costs against a share of the prompt held: a backend that holds
/// the whole prompt loses a request to an idle one once it is half full.
pub const LOAD_WEIGHT: f64 = 2.0;
/// Scores closer than this are equally good: for a miss, backends within an eighth of
/// capacity of the least loaded. Wide enough that replicas, whose views of load differ
/// by what each has in flight, still rank the same backends first.
pub const TIE_BAND: f64 = 0.25;

/// A backend with room, as the cache-aware pick sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Scored {
    pub load: u32,
    pub max_concurrent: u32,
    /// The request's leading prompt blocks this backend holds.
    pub matched: u32,
    /// The backend the request's session was last sent to.
    pub sticky: bool,
    /// The rendezvous rank of this backend for the request (higher wins a tie).
    pub rank: u64,
}

/// Why a backend was chosen: the label of the routing-decision counters and the
/// access log's `route`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Least loaded (or a tie): nothing of the request was on any backend chosen.
    Load,
    /// It held the start of the prompt.
    Prefix,
    /// The request's session was there.
    Session,
}

impl Reason {
    pub const ALL: [Reason; 3] = [Reason::Prefix, Reason::Session, Reason::Load];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Load => "load",
            Reason::Prefix => "prefix",
            Reason::Session => "session",
        }
    }
}

/// The cache-aware pick among `n` backends for a prompt of `blocks` blocks (see the
/// module comment). `candidate(i)` is backend `i` if it has room, `None` if not.
pub(crate) fn cache_aware(
    n: usize,
    blocks: u32,
    new_session: bool,
    candidate: impl Fn(usize) -> Option<Scored>,
) -> Option<usize> {
    let share = |c: &Scored| f64::from(c.load) / f64::from(c.max_concurrent.max(1));
    let score = |c: &Scored| {
        let held = if blocks == 0 {
            0.0
        } else {
            f64::from(c.matched.min(blocks)) / f64::from(blocks)
        };
        held - LOAD_WEIGHT * share(c)
    };
    let candidates: Vec<(usize, Scored)> = (0..n)
        .filter_map(|i| candidate(i).map(|c| (i, c)))
        .collect();
    let least = candidates
        .iter()
        .map(|(_, c)| share(c))
        .fold(f64::INFINITY, f64::min);
    if let Some((i, _)) = candidates
        .iter()
        .find(|(_, c)| c.sticky && share(c) <= least + SESSION_MARGIN)
    {
        return Some(*i);
    }
    let highest_rank = |within: &dyn Fn(&Scored) -> bool| {
        candidates
            .iter()
            .filter(|(_, c)| within(c))
            .max_by_key(|(_, c)| c.rank)
            .map(|(i, _)| *i)
    };
    if new_session && candidates.iter().all(|(_, c)| c.matched == 0) {
        return highest_rank(&|c| share(c) <= least + SESSION_MARGIN);
    }
    let best = candidates
        .iter()
        .map(|(_, c)| score(c))
        .fold(f64::NEG_INFINITY, f64::max);
    highest_rank(&|c| score(c) >= best - TIE_BAND)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pick(backends: &[Option<(u32, u32)>], rotation: usize) -> Option<usize> {
        least_loaded(backends.len(), rotation, |i| {
            backends[i].map(|(load, max_concurrent)| Candidate {
                load,
                max_concurrent,
            })
        })
    }

    #[test]
    fn the_least_loaded_share_wins() {
        // 3/4 is busier than 1/2 is busier than 2/8.
        assert_eq!(
            pick(&[Some((3, 4)), Some((1, 2)), Some((2, 8))], 0),
            Some(2)
        );
    }

    #[test]
    fn ties_go_to_the_first_at_or_after_the_rotation() {
        let even = [Some((1, 4)), Some((1, 4)), Some((1, 4))];
        assert_eq!(pick(&even, 0), Some(0));
        assert_eq!(pick(&even, 1), Some(1));
        assert_eq!(pick(&even, 5), Some(2));
    }

    #[test]
    fn backends_without_room_are_never_picked() {
        assert_eq!(pick(&[None, Some((3, 4)), None], 2), Some(1));
        assert_eq!(pick(&[None, None], 0), None);
        assert_eq!(pick(&[], 0), None);
    }

    fn scored(load: u32, matched: u32) -> Option<Scored> {
        Some(Scored {
            load,
            max_concurrent: 8,
            matched,
            sticky: false,
            rank: 0,
        })
    }

    fn pick_cached(backends: &[Option<Scored>], blocks: u32) -> Option<usize> {
        cache_aware(backends.len(), blocks, false, |i| backends[i])
    }

    #[test]
    fn a_held_prefix_wins_while_its_backend_is_not_busy() {
        // The whole prompt on backend 1, at 2 of 8: 1 - 0.5 beats 0 - 0.
        assert_eq!(
            pick_cached(&[scored(0, 0), scored(2, 10), scored(0, 0)], 10),
            Some(1)
        );
        // At 5 of 8 it costs more than a prefill on an idle backend.
        let busy = pick_cached(&[scored(0, 0), scored(5, 10), scored(0, 0)], 10);
        assert_ne!(busy, Some(1));
        // The longer match wins between two equally loaded backends.
        assert_eq!(pick_cached(&[scored(1, 3), scored(1, 9)], 10), Some(1));
    }

    #[test]
    fn a_miss_goes_to_the_least_loaded() {
        assert_eq!(
            pick_cached(&[scored(3, 0), scored(1, 0), scored(4, 0)], 10),
            Some(1)
        );
        assert_eq!(pick_cached(&[scored(3, 0), None, scored(2, 0)], 0), Some(2));
        assert_eq!(pick_cached(&[None, None], 4), None);
    }

    #[test]
    fn equally_good_backends_are_chosen_by_rank() {
        let ranked = |rank: u64| {
            Some(Scored {
                rank,
                ..scored(0, 0).expect("some")
            })
        };
        assert_eq!(pick_cached(&[ranked(5), ranked(9), ranked(7)], 4), Some(1));
        assert_eq!(pick_cached(&[ranked(5), ranked(2), ranked(7)], 4), Some(2));
        // One in flight of eight is within the band; two are not.
        let busier = |load: u32, rank: u64| {
            Some(Scored {
                rank,
                ..scored(load, 0).expect("some")
            })
        };
        assert_eq!(pick_cached(&[busier(0, 1), busier(1, 9)], 4), Some(1));
        assert_eq!(pick_cached(&[busier(0, 1), busier(2, 9)], 4), Some(0));
    }

    #[test]
    fn a_session_stays_within_the_margin_then_moves() {
        let sticky = |load: u32| {
            Some(Scored {
                sticky: true,
                ..scored(load, 0).expect("some")
            })
        };
        // 2 of 8 above the least loaded (a quarter): it stays, over a full prefix match.
        assert_eq!(pick_cached(&[scored(0, 10), sticky(2)], 10), Some(1));
        // 3 of 8 above: it moves.
        assert_eq!(pick_cached(&[scored(0, 10), sticky(3)], 10), Some(0));
    }

    #[test]
    fn a_new_session_goes_to_its_highest_ranked_backend_within_the_margin() {
        let ranked = |load: u32, rank: u64| {
            Some(Scored {
                rank,
                ..scored(load, 0).expect("some")
            })
        };
        let backends = [ranked(0, 1), ranked(2, 9), ranked(3, 20)];
        // 2 of 8 above the least loaded is within the margin, 3 is not.
        assert_eq!(cache_aware(3, 0, true, |i| backends[i]), Some(1));
        // Without a session only equal scores tie: the least loaded.
        assert_eq!(cache_aware(3, 0, false, |i| backends[i]), Some(0));
        // A prompt held somewhere counts more than the session's home.
        let held = [ranked(0, 1), ranked(0, 9), scored(0, 5)];
        assert_eq!(cache_aware(3, 10, true, |i| held[i]), Some(2));
    }
}
