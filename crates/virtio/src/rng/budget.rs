//! How much entropy the guest may take: a budget of bytes per period, filled again when the
//! period is over (QEMU's virtio-rng `max-bytes` per `period`). Each request costs at least
//! [`MIN_REQUEST_COST`], so a flood of tiny or empty requests is limited too.
//!
//! Threading: owned by the device's worker; the caller passes the time, so tests use any clock.

use std::time::{Duration, Instant};

/// What one request costs at least, in bytes of budget: the work of a request (a chain
/// walked, a system call, a used-ring entry) is worth about that much randomness.
pub const MIN_REQUEST_COST: u64 = 64;

/// At most `bytes` per `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntropyLimit {
    pub bytes: u64,
    pub period: Duration,
}

impl EntropyLimit {
    /// `bytes_per_sec`, handed out every `period`; at least one byte per period.
    pub fn per_second(bytes_per_sec: u64, period: Duration) -> Self {
        let bytes = u128::from(bytes_per_sec) * period.as_millis() / 1000;
        EntropyLimit {
            bytes: u64::try_from(bytes).unwrap_or(u64::MAX).max(1),
            period,
        }
    }
}

/// The budget left in the current period.
#[derive(Debug)]
pub struct Budget {
    limit: EntropyLimit,
    left: u64,
    /// When the budget is full again.
    refill_at: Instant,
}

impl Budget {
    /// A full budget whose first period starts at `now`.
    pub fn new(limit: EntropyLimit, now: Instant) -> Self {
        Budget {
            limit,
            left: limit.bytes,
            refill_at: now + limit.period,
        }
    }

    pub fn limit(&self) -> EntropyLimit {
        self.limit
    }

    /// Bytes that may be handed out at `now` (the budget is filled again if its period is
    /// over); zero means wait [`Budget::wait`].
    pub fn available(&mut self, now: Instant) -> u64 {
        if now >= self.refill_at {
            self.left = self.limit.bytes;
            self.refill_at = now + self.limit.period;
        }
        self.left
    }

    /// Charges a request that received `written` bytes.
    pub fn charge(&mut self, written: u64) {
        self.left = self.left.saturating_sub(written.max(MIN_REQUEST_COST));
    }

    /// How long from `now` until the budget is filled again.
    pub fn wait(&self, now: Instant) -> Duration {
        self.refill_at.saturating_duration_since(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_runs_out_and_fills_again_after_its_period() {
        let start = Instant::now();
        let limit = EntropyLimit::per_second(1000, Duration::from_millis(100));
        assert_eq!(limit.bytes, 100);
        let mut budget = Budget::new(limit, start);
        assert_eq!(budget.available(start), 100);
        budget.charge(80);
        assert_eq!(budget.available(start), 20);
        // A request for a few bytes costs the minimum.
        budget.charge(1);
        assert_eq!(budget.available(start + Duration::from_millis(99)), 0);
        assert_eq!(
            budget.wait(start + Duration::from_millis(99)),
            Duration::from_millis(1)
        );
        assert_eq!(budget.available(start + Duration::from_millis(100)), 100);
    }

    #[test]
    fn tiny_rates_still_give_a_byte_per_period_and_huge_ones_do_not_overflow() {
        assert_eq!(
            EntropyLimit::per_second(1, Duration::from_millis(10)).bytes,
            1
        );
        let huge = EntropyLimit::per_second(u64::MAX, Duration::from_secs(60));
        assert_eq!(huge.bytes, u64::MAX);
    }
}
