//! Per-device statistics: a fixed set of named counters, bumped by the device's worker thread
//! and read at any time by the VMM's API (relaxed atomics: each value is exact, a snapshot of
//! several is not a single instant).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Named counters of one device. The VMM creates them once per device and hands them to every
/// incarnation of the device, so a guest reset does not clear them.
#[derive(Debug)]
pub struct Counters {
    kind: &'static str,
    names: &'static [&'static str],
    values: Box<[AtomicU64]>,
}

impl Counters {
    pub fn new(kind: &'static str, names: &'static [&'static str]) -> Arc<Self> {
        Arc::new(Counters {
            kind,
            names,
            values: names.iter().map(|_| AtomicU64::new(0)).collect(),
        })
    }

    /// The device kind (`block`, `net`, ...).
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// Adds `n` to counter `index` (one of the device's `counter` constants).
    pub fn add(&self, index: usize, n: u64) {
        if let Some(value) = self.values.get(index) {
            value.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub fn get(&self, index: usize) -> u64 {
        self.values
            .get(index)
            .map_or(0, |v| v.load(Ordering::Relaxed))
    }

    /// Every counter with its name.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        self.names
            .iter()
            .zip(self.values.iter())
            .map(|(name, value)| (*name, value.load(Ordering::Relaxed)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_add_up_and_ignore_unknown_indexes() {
        let c = Counters::new("test", &["a", "b"]);
        c.add(0, 2);
        c.add(1, 5);
        c.add(0, 1);
        c.add(7, 1);
        assert_eq!(c.snapshot(), vec![("a", 3), ("b", 5)]);
        assert_eq!(c.get(7), 0);
    }
}
