//! Dispatch of guest accesses (port I/O or MMIO) to the device owning the address.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

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

/// A set of non-overlapping device ranges, shared by the vCPU threads. Ranges can be added and
/// removed while the guest runs (a guest may move a PCI BAR); a device is never called with the
/// map locked, so a device may itself change the map.
#[derive(Default)]
pub struct Bus {
    entries: RwLock<BTreeMap<u64, Entry>>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let entries = self.entries.read().unwrap_or_else(PoisonError::into_inner);
        let ranges: Vec<_> = entries.iter().map(|(b, e)| (*b, e.len)).collect();
        f.debug_struct("Bus").field("ranges", &ranges).finish()
    }
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `[base, base + len)`.
    pub fn insert(
        &self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        let end = match base.checked_add(len) {
            Some(end) if len > 0 => end,
            _ => return Err(BusError::BadRange { base, len }),
        };
        let mut entries = self.entries.write().unwrap_or_else(PoisonError::into_inner);
        let overlaps_previous = entries
            .range(..=base)
            .next_back()
            .is_some_and(|(b, e)| b + e.len > base);
        let overlaps_next = entries.range(base..end).next().is_some();
        if overlaps_previous || overlaps_next {
            return Err(BusError::Overlap { base, len });
        }
        entries.insert(base, Entry { len, device });
        Ok(())
    }

    /// Removes the range starting at `base`; returns whether there was one.
    pub fn remove(&self, base: u64) -> bool {
        self.entries
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&base)
            .is_some()
    }

    fn resolve(&self, addr: u64) -> Option<(u64, Arc<Mutex<dyn BusDevice>>)> {
        let entries = self.entries.read().unwrap_or_else(PoisonError::into_inner);
        let (base, entry) = entries.range(..=addr).next_back()?;
        (addr - base < entry.len).then(|| (addr - base, entry.device.clone()))
    }

    /// Reads from the device at `addr`; false when no device is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((offset, device)) => {
                lock(&device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Writes to the device at `addr`; false when no device is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((offset, device)) => {
                lock(&device).write(offset, data);
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
        let bus = Bus::new();
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
        let bus = Bus::new();
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

    #[test]
    fn removed_ranges_stop_answering_and_can_be_reused() {
        let bus = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(dev.clone(), 0x1000, 0x100).unwrap();
        assert!(bus.remove(0x1000));
        assert!(!bus.remove(0x1000));
        assert!(!bus.write(0x1000, &[1]));
        bus.insert(dev.clone(), 0x2000, 0x100).unwrap();
        assert!(bus.write(0x2010, &[1]));
        assert_eq!(lock(&dev).writes, vec![(0x10, vec![1])]);
    }

    /// A device that moves itself on the bus while it is being called.
    struct Mover {
        bus: Arc<Bus>,
        me: Option<Arc<Mutex<dyn BusDevice>>>,
    }

    impl BusDevice for Mover {
        fn read(&mut self, _offset: u64, _data: &mut [u8]) {}
        fn write(&mut self, _offset: u64, _data: &[u8]) {
            self.bus.remove(0x100);
            if let Some(me) = self.me.take() {
                self.bus.insert(me, 0x200, 0x10).unwrap();
            }
        }
    }

    #[test]
    fn a_device_can_change_the_bus_from_inside_a_call() {
        let bus = Arc::new(Bus::new());
        let mover = Arc::new(Mutex::new(Mover {
            bus: bus.clone(),
            me: None,
        }));
        lock(&mover).me = Some(mover.clone());
        bus.insert(mover, 0x100, 0x10).unwrap();
        assert!(bus.write(0x100, &[0]));
        assert!(!bus.write(0x100, &[0]));
        assert!(bus.write(0x205, &[0]));
    }
}
