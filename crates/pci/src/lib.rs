//! PCI: one root bus with a host bridge, configuration space through port I/O (0xCF8/0xCFC) and
//! ECAM, BARs that the guest may move, and MSI-X.
//!
//! - [`config::PciConfiguration`]: a function's 4 KiB configuration space with write masks,
//!   BARs and a capability list;
//! - [`device::PciDevice`]: what a function implements (config hooks, BAR accesses);
//! - [`root::PciRoot`]: the bus: config access dispatch, and BAR mappings kept in sync with
//!   the guest's programming on the MMIO bus;
//! - [`config_io::PciConfigIo`] and [`ecam::PciEcam`]: the two config access mechanisms;
//! - [`msix::MsixConfig`]: MSI-X table and PBA, routed through an [`msix::MsiInterrupts`].
//!
//! Threading: everything is called from vCPU threads under the device's mutex; MSI-X vectors
//! are also triggered from device worker threads.

// No unsafe code here: host calls belong in host-sys, KVM calls in hypervisor.
#![forbid(unsafe_code)]

pub mod config;
pub mod config_io;
pub mod device;
pub mod ecam;
pub mod host_bridge;
pub mod msix;
pub mod root;

pub use config::{BarKind, PciConfiguration};
pub use device::PciDevice;
pub use root::PciRoot;

/// Address of a function on the root bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciAddress {
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}
