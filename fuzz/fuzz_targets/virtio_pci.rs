//! The guest drives the virtio-pci transport with arbitrary configuration-space and BAR
//! accesses (status transitions, feature negotiation, queue setup with any addresses, MSI-X
//! programming, the PCI-config window): nothing may panic or hang.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use pci::msix::{MsiInterrupts, MsiMessage};
use pci::PciDevice;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

struct NoInterrupts;

impl MsiInterrupts for NoInterrupts {
    fn allocate(&self) -> std::io::Result<(u32, EventFd)> {
        Ok((24, EventFd::new(libc::EFD_NONBLOCK)?))
    }
    fn route(&self, _gsi: u32, _message: Option<MsiMessage>) -> std::io::Result<()> {
        Ok(())
    }
    fn release(&self, _gsi: u32, _event: &EventFd) {}
}

struct NoIoEvents;

impl virtio::pci::IoEvents for NoIoEvents {
    fn register(&self, _event: &EventFd, _addr: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn unregister(&self, _event: &EventFd, _addr: u64) -> std::io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(mem) = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)])
    else {
        return;
    };
    let Ok(mut device) = virtio::pci::VirtioPciDevice::new(
        Box::new(virtio::rng::Rng::new(
            virtio::rng::new_counters(),
            virtio::rng::EntropyLimit::per_second(1 << 20, std::time::Duration::from_millis(100)),
        )),
        Arc::new(mem),
        Arc::new(NoInterrupts),
        Arc::new(NoIoEvents),
        0x1_0000_0000,
    ) else {
        return;
    };
    // Each access: [kind, offset low, offset high, width, value x 4].
    for access in data.chunks_exact(8) {
        let offset = u16::from_le_bytes([access[1], access[2]]);
        let width = 1usize << (access[3] & 0x3);
        let mut buf = [access[4], access[5], access[6], access[7], 0, 0, 0, 0];
        match access[0] % 4 {
            0 => device.read_config(usize::from(offset) % 4096, &mut buf[..width]),
            1 => device.write_config(usize::from(offset) % 4096, &buf[..width]),
            2 => device.read_bar(0, u64::from(offset) % 0x8000, &mut buf[..width]),
            _ => device.write_bar(0, u64::from(offset) % 0x8000, &buf[..width]),
        }
    }
});
