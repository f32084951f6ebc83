//! Which backend a request gets: the least-loaded one with room, by load over
//! capacity, ties taken in turn. A pure function of the candidates, so it is tested
//! without a table, threads or a clock; the table (`backend::registry`) says which
//! backends have room for a request and how loaded each is, at the `now` it picks.

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
}
