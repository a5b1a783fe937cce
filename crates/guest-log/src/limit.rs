//! The per-call-site budget behind the `guest_*!` macros: at most [`LINES_PER_WINDOW`] lines in
//! each [`WINDOW_MS`] window, and a count of the lines left out.
//!
//! Threading: any thread, lock-free. The window number and the lines logged in it share one
//! atomic word, so a burst from many vCPU threads cannot slip extra lines past the budget.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// Lines one call site may log per window.
pub const LINES_PER_WINDOW: u32 = 10;
/// The window's length. Ten lines per five seconds, as Firecracker's rate-limited logger
/// allows: a burst is seen whole, a flood costs two lines a second.
pub const WINDOW_MS: u64 = 5_000;

/// What a call site may do with one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Log it; `dropped` lines of this call site were left out since the last one logged.
    Log { dropped: u64 },
    /// Leave it out (counted).
    Drop,
}

/// One call site's budget; a `static` per macro invocation.
#[derive(Debug)]
pub struct CallSiteLimit {
    /// Window number in the high 32 bits, lines logged in it in the low 32.
    state: AtomicU64,
    /// Lines left out since the last line logged.
    dropped: AtomicU64,
}

impl Default for CallSiteLimit {
    fn default() -> Self {
        Self::new()
    }
}

impl CallSiteLimit {
    pub const fn new() -> Self {
        CallSiteLimit {
            state: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// Whether a line may be logged at `now_ms` (milliseconds of [`now_ms`]'s clock).
    pub fn admit(&self, now_ms: u64) -> Admit {
        let window = u32::try_from(now_ms / WINDOW_MS).unwrap_or(u32::MAX);
        let mut current = self.state.load(Ordering::Relaxed);
        loop {
            let (seen, lines) = ((current >> 32) as u32, current as u32);
            // A thread that read the clock a little earlier counts against the newer window
            // rather than opening its old one again.
            let next = if window > seen {
                pack(window, 1)
            } else if lines < LINES_PER_WINDOW {
                pack(seen, lines + 1)
            } else {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return Admit::Drop;
            };
            match self.state.compare_exchange_weak(
                current,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    let dropped = self.dropped.swap(0, Ordering::Relaxed);
                    return Admit::Log { dropped };
                }
                Err(actual) => current = actual,
            }
        }
    }
}

fn pack(window: u32, lines: u32) -> u64 {
    (u64::from(window) << 32) | u64::from(lines)
}

/// Milliseconds on a monotonic clock that starts at the first call in this process.
pub fn now_ms() -> u64 {
    #[cfg(test)]
    if let Some(now) = fake_clock::now() {
        return now;
    }
    static START: OnceLock<Instant> = OnceLock::new();
    let elapsed = START.get_or_init(Instant::now).elapsed();
    u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
}

/// A clock the tests of this crate set per thread, so windows pass without waiting.
#[cfg(test)]
pub(crate) mod fake_clock {
    use std::cell::Cell;

    thread_local! {
        static NOW: Cell<Option<u64>> = const { Cell::new(None) };
    }

    pub fn now() -> Option<u64> {
        NOW.with(Cell::get)
    }

    pub fn set(ms: u64) {
        NOW.with(|now| now.set(Some(ms)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_gets_the_window_budget_and_the_next_window_reports_the_rest() {
        let limit = CallSiteLimit::new();
        let logged = (0..1000)
            .filter(|_| matches!(limit.admit(1_000), Admit::Log { .. }))
            .count();
        assert_eq!(logged, LINES_PER_WINDOW as usize);
        // Still the same window: nothing more.
        assert_eq!(limit.admit(WINDOW_MS - 1), Admit::Drop);
        // The next window: lines flow again, the first one says what was left out.
        assert_eq!(limit.admit(WINDOW_MS), Admit::Log { dropped: 991 });
        assert_eq!(limit.admit(WINDOW_MS + 1), Admit::Log { dropped: 0 });
    }

    #[test]
    fn an_older_clock_reading_counts_against_the_newer_window() {
        let limit = CallSiteLimit::new();
        for _ in 0..LINES_PER_WINDOW {
            assert!(matches!(limit.admit(3 * WINDOW_MS), Admit::Log { .. }));
        }
        assert_eq!(limit.admit(2 * WINDOW_MS), Admit::Drop);
    }

    #[test]
    fn many_threads_share_one_budget() {
        let limit = CallSiteLimit::new();
        let logged = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..10_000 {
                        if matches!(limit.admit(7), Admit::Log { .. }) {
                            logged.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(logged.into_inner(), LINES_PER_WINDOW as usize);
        assert_eq!(
            limit.admit(WINDOW_MS),
            Admit::Log {
                dropped: 40_000 - u64::from(LINES_PER_WINDOW)
            }
        );
    }
}
