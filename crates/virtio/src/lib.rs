//! Paravirtual devices (virtio 1.x) and their PCI transport.
//!
//! - [`device`]: what a device implements ([`device::VirtioDevice`]) and what it is given when
//!   the driver starts it ([`device::Activation`]);
//! - [`pci`]: the modern virtio-pci transport: common, notify, ISR, device and PCI-config
//!   capabilities in BAR 0, MSI-X, ioeventfd queue notifications, the device status state
//!   machine and feature negotiation;
//! - devices: [`rng`], [`block`], [`console`], [`net`], each with its [`counters`];
//! - [`queue`] serves a virtqueue for a device, [`queue_watch`] shows it in the stall report.
//!
//! Threading: the transport runs on vCPU threads (guest register accesses). Each active device
//! runs its queues on its own worker thread ([`worker`]), woken by ioeventfds, and interrupts
//! the guest through MSI-X irqfds; no device work happens on a vCPU thread.

pub mod block;
pub mod console;
pub mod counters;
pub mod device;
pub mod io_pool;
pub mod net;
pub mod pci;
pub mod queue;
pub mod queue_watch;
pub mod rng;
pub mod worker;

/// Guest memory as the devices see it.
pub type GuestMemory = vm_memory::GuestMemoryMmap<()>;

/// Feature bits shared by every device type (virtio 1.x, section 6).
pub mod features {
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    pub const VERSION_1: u64 = 1 << 32;
    pub const ACCESS_PLATFORM: u64 = 1 << 33;
    /// What the transport offers for every device.
    pub const TRANSPORT: u64 = RING_INDIRECT_DESC | RING_EVENT_IDX | VERSION_1;
}

/// Device type numbers (virtio 1.x, section 5).
pub mod device_type {
    pub const NET: u32 = 1;
    pub const BLOCK: u32 = 2;
    pub const CONSOLE: u32 = 3;
    pub const RNG: u32 = 4;
}
