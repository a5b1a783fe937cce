//! The root bus: configuration access by (device, function, register), and BAR mappings on the
//! MMIO bus kept in step with what the guest programs.
//!
//! A BAR is mapped while the function's memory decoding is on and unmapped while it is off, so
//! the transient values written while sizing or moving BARs (Linux turns decoding off for that)
//! never reach the bus.

use std::sync::{Arc, Mutex};

use devices::bus::{lock, Bus, BusDevice};

use crate::config::NUM_BARS;
use crate::device::PciDevice;

/// Devices on the root bus.
pub const MAX_DEVICES: usize = 32;

/// Routes MMIO accesses in a BAR to its device.
struct BarWindow {
    device: Arc<Mutex<dyn PciDevice>>,
    bar: usize,
}

impl BusDevice for BarWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.device).read_bar(self.bar, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        lock(&self.device).write_bar(self.bar, offset, data);
    }
}

struct Slot {
    device: Arc<Mutex<dyn PciDevice>>,
    /// Where each BAR is mapped on the MMIO bus now.
    mapped: [Option<(u64, u64)>; NUM_BARS],
}

/// The PCI root bus (bus 0, function 0 of each device).
pub struct PciRoot {
    slots: Vec<Option<Slot>>,
    mmio: Arc<Bus>,
}

impl std::fmt::Debug for PciRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let used: Vec<usize> = (0..MAX_DEVICES)
            .filter(|&i| self.slots[i].is_some())
            .collect();
        f.debug_struct("PciRoot").field("slots", &used).finish()
    }
}

/// Errors when placing devices.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RootError {
    #[error("the PCI bus is full ({MAX_DEVICES} devices)")]
    Full,
}

impl PciRoot {
    /// An empty bus whose BARs appear on `mmio`.
    pub fn new(mmio: Arc<Bus>) -> Self {
        PciRoot {
            slots: (0..MAX_DEVICES).map(|_| None).collect(),
            mmio,
        }
    }

    /// Plugs `device` into the first free slot and maps its BARs if it decodes memory.
    pub fn add_device(&mut self, device: Arc<Mutex<dyn PciDevice>>) -> Result<u8, RootError> {
        let index = self
            .slots
            .iter()
            .position(Option::is_none)
            .ok_or(RootError::Full)?;
        self.slots[index] = Some(Slot {
            device,
            mapped: [None; NUM_BARS],
        });
        self.sync_bars(index);
        Ok(index as u8)
    }

    fn slot(&mut self, device: u8, function: u8) -> Option<&mut Slot> {
        if function != 0 {
            return None;
        }
        self.slots.get_mut(usize::from(device))?.as_mut()
    }

    /// A configuration read; absent functions read as all ones.
    pub fn config_read(
        &mut self,
        bus: u8,
        device: u8,
        function: u8,
        offset: usize,
        data: &mut [u8],
    ) {
        match self.slot(device, function) {
            Some(slot) if bus == 0 => lock(&slot.device).read_config(offset, data),
            _ => data.fill(0xff),
        }
    }

    /// A configuration write; afterwards the BAR mappings follow the function's registers.
    pub fn config_write(&mut self, bus: u8, device: u8, function: u8, offset: usize, data: &[u8]) {
        if bus != 0 {
            return;
        }
        let Some(slot) = self.slot(device, function) else {
            return;
        };
        lock(&slot.device).write_config(offset, data);
        self.sync_bars(usize::from(device));
    }

    fn sync_bars(&mut self, index: usize) {
        let Some(slot) = self.slots[index].as_mut() else {
            return;
        };
        let wanted: Vec<(usize, Option<(u64, u64)>)> = {
            let device = lock(&slot.device);
            let config = device.config();
            (0..NUM_BARS)
                .map(|bar| {
                    let mapping = match (config.bar_address(bar), config.bar_size(bar)) {
                        (Some(addr), Some(size)) if config.memory_decoding() && addr != 0 => {
                            Some((addr, size))
                        }
                        _ => None,
                    };
                    (bar, mapping)
                })
                .collect()
        };
        for (bar, mapping) in wanted {
            let old = slot.mapped[bar];
            if old == mapping {
                continue;
            }
            if let Some((addr, _)) = old {
                self.mmio.remove(addr);
            }
            let mut placed = mapping;
            if let Some((addr, size)) = mapping {
                let window = Arc::new(Mutex::new(BarWindow {
                    device: slot.device.clone(),
                    bar,
                }));
                if let Err(e) = self.mmio.insert(window, addr, size) {
                    guest_log::guest_warn!(
                        "device {index} BAR {bar} cannot decode at {addr:#x}: {e}"
                    );
                    placed = None;
                }
            }
            slot.mapped[bar] = placed;
            lock(&slot.device).bar_moved(bar, old.map(|m| m.0), placed.map(|m| m.0));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BarKind, PciConfiguration, PciIdentity, BAR0, COMMAND, COMMAND_MEMORY};

    struct Dummy {
        config: PciConfiguration,
        moves: Vec<(usize, Option<u64>, Option<u64>)>,
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl PciDevice for Dummy {
        fn config(&self) -> &PciConfiguration {
            &self.config
        }
        fn config_mut(&mut self) -> &mut PciConfiguration {
            &mut self.config
        }
        fn read_bar(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write_bar(&mut self, _bar: usize, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
        fn bar_moved(&mut self, bar: usize, old: Option<u64>, new: Option<u64>) {
            self.moves.push((bar, old, new));
        }
    }

    fn setup() -> (PciRoot, Arc<Bus>, Arc<Mutex<Dummy>>) {
        let mut config = PciConfiguration::new(PciIdentity {
            vendor: 0x1af4,
            device: 0x1044,
            revision: 1,
            class: (0, 0xff, 0),
            subsystem_vendor: 0,
            subsystem: 0,
        });
        config
            .add_bar(
                0,
                0x1000,
                BarKind::Mem64 {
                    prefetchable: false,
                },
                0x1_0000_0000,
            )
            .unwrap();
        let dummy = Arc::new(Mutex::new(Dummy {
            config,
            moves: vec![],
            writes: vec![],
        }));
        let mmio = Arc::new(Bus::new());
        let mut root = PciRoot::new(mmio.clone());
        assert_eq!(root.add_device(dummy.clone()).unwrap(), 0);
        (root, mmio, dummy)
    }

    fn write32(root: &mut PciRoot, offset: usize, value: u32) {
        root.config_write(0, 0, 0, offset, &value.to_le_bytes());
    }

    #[test]
    fn absent_functions_read_all_ones() {
        let (mut root, _mmio, _d) = setup();
        let mut data = [0u8; 4];
        root.config_read(0, 5, 0, 0, &mut data);
        assert_eq!(data, [0xff; 4]);
        root.config_read(0, 0, 1, 0, &mut data);
        assert_eq!(data, [0xff; 4]);
        root.config_read(1, 0, 0, 0, &mut data);
        assert_eq!(data, [0xff; 4]);
        root.config_read(0, 0, 0, 0, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0x1044_1af4);
        root.config_read(0, 200, 0, 0, &mut data);
    }

    #[test]
    fn bars_decode_only_with_memory_enabled() {
        let (mut root, mmio, dummy) = setup();
        assert!(!mmio.write(0x1_0000_0010, &[1]));
        write32(&mut root, COMMAND, u32::from(COMMAND_MEMORY));
        assert!(mmio.write(0x1_0000_0010, &[1]));
        assert_eq!(lock(&dummy).writes, vec![(0x10, vec![1])]);
        assert_eq!(lock(&dummy).moves, vec![(0, None, Some(0x1_0000_0000))]);
    }

    #[test]
    fn moving_a_bar_moves_the_window() {
        let (mut root, mmio, dummy) = setup();
        // Linux's sequence: decoding off, size, program, decoding on.
        write32(&mut root, BAR0, 0xffff_ffff);
        write32(&mut root, BAR0 + 4, 0xffff_ffff);
        write32(&mut root, BAR0, 0xd000_0000);
        write32(&mut root, BAR0 + 4, 0);
        write32(&mut root, COMMAND, u32::from(COMMAND_MEMORY));
        assert!(mmio.write(0xd000_0004, &[2]));
        assert!(!mmio.write(0x1_0000_0004, &[2]));
        assert_eq!(lock(&dummy).moves, vec![(0, None, Some(0xd000_0000))]);
        // Moving while decoding stays on remaps at once.
        write32(&mut root, BAR0, 0xd100_0000);
        assert!(mmio.write(0xd100_0004, &[3]));
        assert!(!mmio.write(0xd000_0004, &[3]));
        write32(&mut root, COMMAND, 0);
        assert!(!mmio.write(0xd100_0004, &[4]));
        assert_eq!(
            lock(&dummy).moves.last().copied(),
            Some((0, Some(0xd100_0000), None))
        );
    }
}
