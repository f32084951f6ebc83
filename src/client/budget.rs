//! The memory budget for request bodies: every body the router holds at once (read
//! whole, so it is forwarded byte for byte and can be sent again on a retry) is
//! counted here, against `max_buffered_body_bytes`.
//!
//! Without it the bound was `max_body_bytes` times the worker pool: a dozen clients
//! sending 31 MiB each, no key needed, took the router to 400 MB. A body that finds no
//! room waits a little for bodies ahead of it to be sent and dropped, and is then
//! refused with 503 and `Retry-After`: never read in part and forwarded.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// How long a body waits for room before it is refused.
pub const WAIT_FOR_ROOM: Duration = Duration::from_secs(2);

/// Makes the allocator give a body's memory back to the system when the body is
/// dropped, so the process's resident size follows the budget. glibc serves blocks of
/// 128 KiB and more with their own mmap, but after freeing one it raises that threshold
/// to the block's size (up to 32 MiB): later bodies then come from the per-thread heaps,
/// which keep what is freed, and 12 bodies of 31 MiB under a 128 MiB budget left 187 MiB
/// resident. A fixed threshold turns that adjustment off. musl (the static build) maps
/// large blocks itself and needs nothing.
pub fn return_freed_bodies_to_the_system() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: mallopt only sets an allocator parameter, under glibc's own arena lock;
    // no memory is touched.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// Bytes of request bodies held now, against a limit.
pub struct Budget {
    used: Mutex<u64>,
    freed: Condvar,
}

impl Budget {
    pub fn new() -> Arc<Budget> {
        Arc::new(Budget {
            used: Mutex::new(0),
            freed: Condvar::new(),
        })
    }

    /// Bytes held now.
    pub fn used(&self) -> u64 {
        *self.used.lock()
    }

    /// Takes `n` more bytes for `share`, waiting until `deadline` for room under
    /// `limit`. False when there was none: `share` is unchanged.
    pub fn grow(
        self: &Arc<Self>,
        share: &mut Share,
        n: u64,
        limit: u64,
        deadline: Instant,
    ) -> bool {
        let mut used = self.used.lock();
        // A body larger than the whole budget could never fit: waiting is pointless.
        if share.bytes + n > limit {
            return false;
        }
        while *used + n > limit {
            if self.freed.wait_until(&mut used, deadline).timed_out() {
                return false;
            }
        }
        *used += n;
        share.bytes += n;
        true
    }

    /// A body's share, empty until it grows.
    pub fn share(self: &Arc<Self>) -> Share {
        Share {
            budget: Arc::clone(self),
            bytes: 0,
        }
    }
}

/// The bytes one body holds of the budget, given back when it drops.
pub struct Share {
    budget: Arc<Budget>,
    bytes: u64,
}

impl Share {
    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        if self.bytes > 0 {
            *self.budget.used.lock() -= self.bytes;
            self.budget.freed.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    #[test]
    fn a_body_waits_for_room_and_gets_it_when_another_drops() {
        let budget = Budget::new();
        let mut first = budget.share();
        assert!(budget.grow(&mut first, 80, 100, Instant::now()));
        let mut second = budget.share();
        assert!(!budget.grow(
            &mut second,
            30,
            100,
            Instant::now() + Duration::from_millis(20)
        ));
        assert_eq!(budget.used(), 80);
        let waiter = {
            let budget = Arc::clone(&budget);
            thread::spawn(move || {
                let mut share = budget.share();
                budget.grow(
                    &mut share,
                    30,
                    100,
                    Instant::now() + Duration::from_secs(30),
                )
            })
        };
        drop(first);
        assert!(waiter.join().expect("waiter"), "room was freed");
        assert_eq!(budget.used(), 0, "every share given back");
    }

    #[test]
    fn a_body_larger_than_the_budget_is_refused_at_once() {
        let budget = Budget::new();
        let mut share = budget.share();
        let start = Instant::now();
        assert!(!budget.grow(&mut share, 101, 100, start + Duration::from_secs(30)));
        assert!(start.elapsed() < Duration::from_secs(5));
    }
}
