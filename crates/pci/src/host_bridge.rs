//! The host bridge at 00:00.0.

use crate::config::{PciConfiguration, PciIdentity};
use crate::device::PciDevice;

/// A host bridge: identity only, no BARs.
#[derive(Debug)]
pub struct HostBridge {
    config: PciConfiguration,
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl HostBridge {
    pub fn new() -> Self {
        HostBridge {
            // Red Hat's ID for a generic PCIe host bridge, which guests treat without quirks.
            config: PciConfiguration::new(PciIdentity {
                vendor: 0x1b36,
                device: 0x0008,
                revision: 0,
                class: (0x06, 0x00, 0x00),
                subsystem_vendor: 0x1b36,
                subsystem: 0x0008,
            }),
        }
    }
}

impl PciDevice for HostBridge {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }

    fn read_bar(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write_bar(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}
