//! Dispatch of guest accesses (port I/O or MMIO) to the device owning the address.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

/// A device reachable on a bus. `offset` is relative to the start of the device's range.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device made of byte-wide registers, as the legacy PC devices are. A wider access reads
/// the addressed register into the first byte (the rest reads as zero) and writes only the
/// first byte; an empty access does nothing.
pub trait ByteRegisters: Send {
    fn read_byte(&mut self, offset: u64) -> u8;
    fn write_byte(&mut self, offset: u64, value: u8);
}

impl<T: ByteRegisters> BusDevice for T {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = self.read_byte(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&value) = data.first() {
            self.write_byte(offset, value);
        }
    }
}

/// Errors when building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("device range {base:#x}+{len:#x} overlaps another device")]
    Overlap { base: u64, len: u64 },
    #[error("device range {base:#x}+{len:#x} is empty or wraps around")]
    BadRange { base: u64, len: u64 },
}

#[derive(Clone)]
struct Entry {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// A set of non-overlapping device ranges. Built once, then shared read-only by vCPU threads.
#[derive(Clone, Default)]
pub struct Bus {
    entries: BTreeMap<u64, Entry>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges: Vec<_> = self.entries.iter().map(|(b, e)| (*b, e.len)).collect();
        f.debug_struct("Bus").field("ranges", &ranges).finish()
    }
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `[base, base + len)`.
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        let end = match base.checked_add(len) {
            Some(end) if len > 0 => end,
            _ => return Err(BusError::BadRange { base, len }),
        };
        let overlaps_previous = self
            .entries
            .range(..=base)
            .next_back()
            .is_some_and(|(b, e)| b + e.len > base);
        let overlaps_next = self.entries.range(base..end).next().is_some();
        if overlaps_previous || overlaps_next {
            return Err(BusError::Overlap { base, len });
        }
        self.entries.insert(base, Entry { len, device });
        Ok(())
    }

    fn resolve(&self, addr: u64) -> Option<(u64, &Entry)> {
        let (base, entry) = self.entries.range(..=addr).next_back()?;
        (addr - base < entry.len).then_some((addr - base, entry))
    }

    /// Reads from the device at `addr`; false when no device is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((offset, entry)) => {
                lock(&entry.device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Writes to the device at `addr`; false when no device is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((offset, entry)) => {
                lock(&entry.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device. A poisoned lock means another thread panicked while holding it; since the
/// process aborts on panic in release builds, carrying on with the inner state is fine.
pub fn lock<T: ?Sized>(device: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    device.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_with_offsets() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(dev.clone(), 0x3f8, 8).unwrap();
        let mut data = [0u8; 1];
        assert!(bus.read(0x3fa, &mut data));
        assert_eq!(data, [2]);
        assert!(bus.write(0x3ff, &[9]));
        assert!(!bus.write(0x400, &[9]));
        assert!(!bus.read(0x3f7, &mut data));
        assert_eq!(lock(&dev).writes, vec![(7, vec![9])]);
    }

    #[test]
    fn refuses_overlaps_and_empty_ranges() {
        let mut bus = Bus::new();
        let dev = || Arc::new(Mutex::new(Recorder::default()));
        bus.insert(dev(), 0x60, 5).unwrap();
        assert!(matches!(
            bus.insert(dev(), 0x64, 1),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(dev(), 0x5f, 2),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(dev(), 0x50, 0),
            Err(BusError::BadRange { .. })
        ));
        assert!(matches!(
            bus.insert(dev(), u64::MAX, 2),
            Err(BusError::BadRange { .. })
        ));
        bus.insert(dev(), 0x65, 1).unwrap();
        bus.insert(dev(), 0x5f, 1).unwrap();
    }
}
