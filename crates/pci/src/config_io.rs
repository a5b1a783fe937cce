//! Configuration mechanism #1: the address register at 0xCF8 and the data window at 0xCFC,
//! plus the reset control register at 0xCF9 that PC chipsets have there.

use std::sync::{Arc, Mutex};

use devices::bus::{lock, BusDevice};
use devices::PowerEvents;

use crate::root::PciRoot;

const ADDRESS: u64 = 0;
const RESET_CONTROL: u64 = 1;
const DATA: u64 = 4;
const ENABLE: u32 = 1 << 31;
const RESET_CPU: u8 = 1 << 2;

/// The device at ports 0xCF8..0xCFF.
pub struct PciConfigIo {
    root: Arc<Mutex<PciRoot>>,
    address: u32,
    power: PowerEvents,
}

impl std::fmt::Debug for PciConfigIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciConfigIo")
            .field("address", &self.address)
            .finish()
    }
}

impl PciConfigIo {
    pub fn new(root: Arc<Mutex<PciRoot>>, power: PowerEvents) -> Self {
        PciConfigIo {
            root,
            address: 0,
            power,
        }
    }

    /// (bus, device, function, register offset) the address register selects, if enabled.
    fn target(&self, data_offset: u64) -> Option<(u8, u8, u8, usize)> {
        if self.address & ENABLE == 0 {
            return None;
        }
        let a = self.address;
        let register = (a & 0xfc) as usize + data_offset as usize;
        Some((
            (a >> 16) as u8,
            ((a >> 11) & 0x1f) as u8,
            ((a >> 8) & 0x7) as u8,
            register,
        ))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (offset, data.len()) {
            (ADDRESS, 4) => data.copy_from_slice(&self.address.to_le_bytes()),
            (DATA..=7, _) => match self.target(offset - DATA) {
                Some((bus, dev, func, reg)) => {
                    lock(&self.root).config_read(bus, dev, func, reg, data)
                }
                None => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (ADDRESS, [a, b, c, d]) => self.address = u32::from_le_bytes([*a, *b, *c, *d]),
            (RESET_CONTROL, [value]) if value & RESET_CPU != 0 => self.power.request_reset(),
            (DATA..=7, _) => {
                if let Some((bus, dev, func, reg)) = self.target(offset - DATA) {
                    lock(&self.root).config_write(bus, dev, func, reg, data);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host_bridge::HostBridge;
    use devices::bus::Bus;

    fn io() -> (PciConfigIo, PowerEvents) {
        let mut root = PciRoot::new(Arc::new(Bus::new()));
        root.add_device(Arc::new(Mutex::new(HostBridge::new())))
            .unwrap();
        let power = PowerEvents::new().unwrap();
        (
            PciConfigIo::new(Arc::new(Mutex::new(root)), power.try_clone().unwrap()),
            power,
        )
    }

    fn select(io: &mut PciConfigIo, dev: u32, reg: u32) {
        io.write(ADDRESS, &(ENABLE | (dev << 11) | reg).to_le_bytes());
    }

    #[test]
    fn reads_the_host_bridge_ids() {
        let (mut io, _power) = io();
        select(&mut io, 0, 0);
        let mut id = [0u8; 4];
        io.read(DATA, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0x0008_1b36);
        let mut device_id = [0u8; 2];
        io.read(DATA + 2, &mut device_id);
        assert_eq!(u16::from_le_bytes(device_id), 0x0008);
        let mut address = [0u8; 4];
        io.read(ADDRESS, &mut address);
        assert_eq!(u32::from_le_bytes(address), ENABLE);
    }

    #[test]
    fn empty_slots_and_disabled_address_read_all_ones() {
        let (mut io, _power) = io();
        select(&mut io, 3, 0);
        let mut id = [0u8; 4];
        io.read(DATA, &mut id);
        assert_eq!(id, [0xff; 4]);
        io.write(ADDRESS, &0u32.to_le_bytes());
        io.read(DATA, &mut id);
        assert_eq!(id, [0xff; 4]);
    }

    #[test]
    fn reset_control_register_resets() {
        let (mut io, power) = io();
        io.write(RESET_CONTROL, &[0x02]);
        assert!(power.reset.read().is_err());
        io.write(RESET_CONTROL, &[0x06]);
        assert_eq!(power.reset.read().unwrap(), 1);
    }
}
