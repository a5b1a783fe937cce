//! Recent exits of one vCPU: when it last exited to the VMM, and how many exits of each reason
//! it made in the last few seconds, for the stall report.
//!
//! Threading: only the vCPU's own thread records (one writer); any thread reads. A ring of
//! one-second buckets of relaxed atomics, so recording costs a clock read and a few atomic
//! operations next to an exit that costs microseconds. A reader can catch a bucket while the
//! writer recycles it and see part of a second's counts: the numbers are a diagnostic, not an
//! account.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Buckets in the ring: the current second and the whole seconds before it.
pub(crate) const WINDOW_SECONDS: u64 = 5;

const NANOS_PER_SECOND: u64 = 1_000_000_000;
/// `last_exit` before the first exit.
const NEVER: u64 = u64::MAX;

#[derive(Debug)]
struct Bucket {
    /// The second (since `origin`) plus one the counts belong to; 0 for an unused bucket.
    second: AtomicU64,
    counts: Box<[AtomicU64]>,
}

/// Exit counts by reason over the last [`WINDOW_SECONDS`].
#[derive(Debug)]
pub(crate) struct ExitWindow {
    names: &'static [&'static str],
    origin: Instant,
    /// Nanoseconds since `origin` of the last exit.
    last_exit: AtomicU64,
    buckets: Box<[Bucket]>,
}

impl ExitWindow {
    /// A window counting exits of the reasons `names` (indexes into it).
    pub fn new(names: &'static [&'static str]) -> Self {
        let bucket = || Bucket {
            second: AtomicU64::new(0),
            counts: names.iter().map(|_| AtomicU64::new(0)).collect(),
        };
        ExitWindow {
            names,
            origin: Instant::now(),
            last_exit: AtomicU64::new(NEVER),
            buckets: (0..WINDOW_SECONDS).map(|_| bucket()).collect(),
        }
    }

    /// Records an exit of reason `index`, now. Called by the vCPU thread only.
    pub fn record(&self, index: usize) {
        self.record_at(self.now(), index);
    }

    /// Milliseconds since the last exit, and the counts by reason of the window ending now.
    pub fn read(&self) -> (Option<u64>, Vec<(&'static str, u64)>) {
        self.read_at(self.now())
    }

    fn now(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(NEVER - 1)
    }

    fn record_at(&self, nanos: u64, index: usize) {
        self.last_exit.store(nanos, Ordering::Relaxed);
        let tag = nanos / NANOS_PER_SECOND + 1;
        let bucket = &self.buckets[(tag % WINDOW_SECONDS) as usize];
        if bucket.second.load(Ordering::Relaxed) != tag {
            for count in &bucket.counts {
                count.store(0, Ordering::Relaxed);
            }
            bucket.second.store(tag, Ordering::Release);
        }
        if let Some(count) = bucket.counts.get(index) {
            count.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn read_at(&self, nanos: u64) -> (Option<u64>, Vec<(&'static str, u64)>) {
        let last = self.last_exit.load(Ordering::Relaxed);
        let since = (last != NEVER).then(|| nanos.saturating_sub(last) / 1_000_000);
        let now_tag = nanos / NANOS_PER_SECOND + 1;
        let mut totals = vec![0u64; self.names.len()];
        for bucket in &self.buckets {
            let tag = bucket.second.load(Ordering::Acquire);
            if tag == 0 || tag > now_tag || now_tag - tag >= WINDOW_SECONDS {
                continue;
            }
            for (total, count) in totals.iter_mut().zip(&bucket.counts) {
                *total += count.load(Ordering::Relaxed);
            }
        }
        (since, self.names.iter().copied().zip(totals).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAMES: &[&str] = &["io_in", "io_out"];
    const S: u64 = NANOS_PER_SECOND;

    #[test]
    fn nothing_recorded_reads_as_never_and_zero() {
        let window = ExitWindow::new(NAMES);
        assert_eq!(
            window.read_at(3 * S),
            (None, vec![("io_in", 0), ("io_out", 0)])
        );
    }

    #[test]
    fn counts_cover_the_window_and_forget_older_seconds() {
        let window = ExitWindow::new(NAMES);
        window.record_at(S / 2, 0); // second 0
        window.record_at(S + 1, 1); // second 1
        window.record_at(S + 2, 1);
        window.record_at(4 * S, 0); // second 4
        let (since, counts) = window.read_at(4 * S + 250_000_000);
        assert_eq!(since, Some(250));
        assert_eq!(counts, vec![("io_in", 2), ("io_out", 2)]);
        // At second 5, second 0 has left the window; at second 6, second 1 has too.
        assert_eq!(window.read_at(5 * S).1, vec![("io_in", 1), ("io_out", 2)]);
        assert_eq!(window.read_at(6 * S).1, vec![("io_in", 1), ("io_out", 0)]);
        assert_eq!(window.read_at(9 * S).1, vec![("io_in", 0), ("io_out", 0)]);
        assert_eq!(window.read_at(9 * S).0, Some(5000));
    }

    #[test]
    fn a_recycled_bucket_starts_from_zero() {
        let window = ExitWindow::new(NAMES);
        for _ in 0..10 {
            window.record_at(S, 1);
        }
        // Second 6 reuses second 1's bucket.
        window.record_at(6 * S, 1);
        assert_eq!(window.read_at(6 * S).1, vec![("io_in", 0), ("io_out", 1)]);
    }

    #[test]
    fn an_unknown_reason_only_updates_the_last_exit() {
        let window = ExitWindow::new(NAMES);
        window.record_at(S, 9);
        assert_eq!(
            window.read_at(2 * S),
            (Some(1000), vec![("io_in", 0), ("io_out", 0)])
        );
    }
}
