//! Configuration through ECAM (memory-mapped, 4 KiB per function), as announced in the MCFG.

use std::sync::{Arc, Mutex};

use devices::bus::{lock, BusDevice};

use crate::root::PciRoot;

/// Bytes of ECAM per bus.
pub const BUS_SIZE: u64 = 1 << 20;

/// The ECAM window of bus 0.
pub struct PciEcam {
    root: Arc<Mutex<PciRoot>>,
}

impl std::fmt::Debug for PciEcam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciEcam").finish_non_exhaustive()
    }
}

impl PciEcam {
    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        PciEcam { root }
    }
}

fn decode(offset: u64) -> (u8, u8, u8, usize) {
    (
        (offset >> 20) as u8,
        ((offset >> 15) & 0x1f) as u8,
        ((offset >> 12) & 0x7) as u8,
        (offset & 0xfff) as usize,
    )
}

impl BusDevice for PciEcam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let (bus, dev, func, reg) = decode(offset);
        lock(&self.root).config_read(bus, dev, func, reg, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (bus, dev, func, reg) = decode(offset);
        lock(&self.root).config_write(bus, dev, func, reg, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host_bridge::HostBridge;
    use devices::bus::Bus;

    #[test]
    fn decodes_device_function_and_register() {
        assert_eq!(decode(0x0001_8004), (0, 3, 0, 4));
        assert_eq!(decode(0x0000_2ffc), (0, 0, 2, 0xffc));
        let mut root = PciRoot::new(Arc::new(Bus::new()));
        root.add_device(Arc::new(Mutex::new(HostBridge::new())))
            .unwrap();
        let mut ecam = PciEcam::new(Arc::new(Mutex::new(root)));
        let mut class = [0u8; 4];
        ecam.read(8, &mut class);
        assert_eq!(u32::from_le_bytes(class) >> 8, 0x06_0000);
        let mut absent = [0u8; 4];
        ecam.read(0x8000, &mut absent);
        assert_eq!(absent, [0xff; 4]);
    }
}
