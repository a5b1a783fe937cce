//! The PCI side of the machine: root bus, host bridge, the two configuration mechanisms, BAR
//! placement and the virtio devices the configuration asks for.

use std::sync::{Arc, Mutex};

use arch::layout::{self, ports};
use devices::bus::Bus;
use devices::PowerEvents;
use pci::config_io::PciConfigIo;
use pci::ecam::PciEcam;
use pci::host_bridge::HostBridge;
use pci::PciRoot;
use virtio::queue_watch::QueueWatch;
use vm_allocator::{AddressAllocator, AllocPolicy};

use crate::error::Error;
use crate::interrupts::{InterruptRouter, KvmIoEvents};

/// Size of the BAR every virtio-pci device has.
const VIRTIO_BAR_SIZE: u64 = 0x8000;

/// Builds the bus, attaches the configuration mechanisms to the port and MMIO buses, and
/// returns the root to add devices to.
pub(crate) struct PciBuilder {
    root: Arc<Mutex<PciRoot>>,
    mmio64: AddressAllocator,
}

fn alloc_err(e: vm_allocator::Error) -> Error {
    Error::Devices(std::io::Error::other(format!("no room for a PCI BAR: {e}")))
}

impl PciBuilder {
    pub fn new(
        pio: &Bus,
        mmio: &Arc<Bus>,
        power: &PowerEvents,
        memory: &layout::MemoryLayout,
    ) -> Result<Self, Error> {
        let root = Arc::new(Mutex::new(PciRoot::new(mmio.clone())));
        devices::bus::lock(&root)
            .add_device(Arc::new(Mutex::new(HostBridge::new())))
            .map_err(|e| Error::Devices(std::io::Error::other(e)))?;
        let power = power.try_clone().map_err(Error::Devices)?;
        pio.insert(
            Arc::new(Mutex::new(PciConfigIo::new(root.clone(), power))),
            ports::PCI_CONFIG.into(),
            ports::PCI_CONFIG_SIZE.into(),
        )?;
        mmio.insert(
            Arc::new(Mutex::new(PciEcam::new(root.clone()))),
            layout::PCI_ECAM_START,
            layout::PCI_ECAM_SIZE,
        )?;
        let mmio64 = AddressAllocator::new(memory.pci_mmio64_start(), layout::PCI_MMIO64_SIZE)
            .map_err(alloc_err)?;
        Ok(PciBuilder { root, mmio64 })
    }

    /// Adds a virtio device behind a virtio-pci transport; returns its queues' watches (for
    /// the stall report).
    pub fn add_virtio(
        &mut self,
        device: Box<dyn virtio::device::VirtioDevice>,
        memory: &Arc<arch::GuestMemoryMmap>,
        interrupts: &Arc<InterruptRouter>,
        vm: &Arc<hypervisor::Vm>,
    ) -> Result<Vec<Arc<QueueWatch>>, Error> {
        let bar = self
            .mmio64
            .allocate(VIRTIO_BAR_SIZE, VIRTIO_BAR_SIZE, AllocPolicy::FirstMatch)
            .map_err(alloc_err)?;
        let transport = virtio::pci::VirtioPciDevice::new(
            device,
            memory.clone(),
            interrupts.clone(),
            Arc::new(KvmIoEvents(vm.clone())),
            bar.start(),
        )
        .map_err(|e| Error::Devices(std::io::Error::other(e)))?;
        let watches = transport.queue_watches();
        devices::bus::lock(&self.root)
            .add_device(Arc::new(Mutex::new(transport)))
            .map_err(|e| Error::Devices(std::io::Error::other(e)))?;
        Ok(watches)
    }
}
