//! What a PCI function implements.

use crate::config::PciConfiguration;

/// A PCI function on the root bus.
pub trait PciDevice: Send {
    fn config(&self) -> &PciConfiguration;
    fn config_mut(&mut self) -> &mut PciConfiguration;

    /// A guest read of configuration space. Devices with capabilities whose contents change
    /// (e.g. MSI-X control) override this.
    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        self.config().read(offset, data);
    }

    /// A guest write to configuration space.
    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.config_mut().write(offset, data);
    }

    /// A guest access to BAR `bar` at `offset` from its start.
    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]);

    /// BAR `bar` now decodes at `new` (None: not decoded) instead of `old`. Devices with
    /// ioeventfds inside a BAR move them here.
    fn bar_moved(&mut self, _bar: usize, _old: Option<u64>, _new: Option<u64>) {}
}
