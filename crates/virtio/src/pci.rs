//! The modern virtio-pci transport (virtio 1.x, section 4.1).
//!
//! BAR 0 (64-bit memory, 32 KiB) holds the common configuration, the ISR, the device
//! configuration, the notification area, the MSI-X table and the PBA; vendor capabilities in
//! configuration space point at each, plus the PCI-configuration access capability.
//!
//! Queue notifications are ioeventfds on the notification area, so a driver's kick wakes the
//! device's worker without leaving the kernel. The device status follows the state machine of
//! the specification: bits only accumulate until the driver resets the device by writing 0;
//! FEATURES_OK sticks only if the driver chose a subset of the offered features including
//! VERSION_1; DRIVER_OK starts the device.

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use pci::config::{PciIdentity, BAR0};
use pci::msix::{self, MsiInterrupts, MsixConfig};
use pci::{BarKind, PciConfiguration, PciDevice};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use crate::device::{Activation, ActiveQueue, VirtioDevice, VirtioInterrupt};
use crate::queue_watch::QueueWatch;
use crate::{device_type, features, GuestMemory};

/// Registers and removes ioeventfds (the VMM's view of KVM_IOEVENTFD).
pub trait IoEvents: Send + Sync {
    fn register(&self, event: &EventFd, addr: u64) -> std::io::Result<()>;
    fn unregister(&self, event: &EventFd, addr: u64) -> std::io::Result<()>;
}

const VIRTIO_PCI_VENDOR: u16 = 0x1af4;
const VIRTIO_PCI_DEVICE_BASE: u16 = 0x1040;
const VIRTIO_PCI_SUBSYSTEM: u16 = 0x1100;
const VENDOR_CAPABILITY: u8 = 0x09;

const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const CAP_PCI_CFG: u8 = 5;

/// BAR 0 layout.
const BAR_INDEX: usize = 0;
const BAR_SIZE: u64 = 0x8000;
const COMMON_OFFSET: u64 = 0x0000;
const COMMON_SIZE: u64 = 0x38;
const ISR_OFFSET: u64 = 0x1000;
const DEVICE_OFFSET: u64 = 0x2000;
const DEVICE_SIZE: u64 = 0x1000;
const NOTIFY_OFFSET: u64 = 0x3000;
const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE_OFFSET: u64 = 0x4000;
const MSIX_PBA_OFFSET: u64 = 0x5000;

/// Device status bits.
pub mod status {
    pub const ACKNOWLEDGE: u8 = 1;
    pub const DRIVER: u8 = 2;
    pub const DRIVER_OK: u8 = 4;
    pub const FEATURES_OK: u8 = 8;
    pub const DEVICE_NEEDS_RESET: u8 = 0x40;
    pub const FAILED: u8 = 0x80;
}

/// "No MSI-X vector" in the vector registers.
pub const NO_VECTOR: u16 = 0xffff;
const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;

/// Driver-visible state of one queue.
#[derive(Debug, Clone, Copy)]
struct QueueConfig {
    max_size: u16,
    size: u16,
    vector: u16,
    enabled: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

impl QueueConfig {
    fn new(max_size: u16) -> Self {
        QueueConfig {
            max_size,
            size: max_size,
            vector: NO_VECTOR,
            enabled: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }
}

/// Fields of the common configuration structure: (offset, size).
mod common {
    pub const DEVICE_FEATURE_SELECT: (u64, usize) = (0x00, 4);
    pub const DEVICE_FEATURE: (u64, usize) = (0x04, 4);
    pub const DRIVER_FEATURE_SELECT: (u64, usize) = (0x08, 4);
    pub const DRIVER_FEATURE: (u64, usize) = (0x0c, 4);
    pub const CONFIG_MSIX_VECTOR: (u64, usize) = (0x10, 2);
    pub const NUM_QUEUES: (u64, usize) = (0x12, 2);
    pub const DEVICE_STATUS: (u64, usize) = (0x14, 1);
    pub const CONFIG_GENERATION: (u64, usize) = (0x15, 1);
    pub const QUEUE_SELECT: (u64, usize) = (0x16, 2);
    pub const QUEUE_SIZE: (u64, usize) = (0x18, 2);
    pub const QUEUE_MSIX_VECTOR: (u64, usize) = (0x1a, 2);
    pub const QUEUE_ENABLE: (u64, usize) = (0x1c, 2);
    pub const QUEUE_NOTIFY_OFF: (u64, usize) = (0x1e, 2);
    pub const QUEUE_DESC_LO: (u64, usize) = (0x20, 4);
    pub const QUEUE_DESC_HI: (u64, usize) = (0x24, 4);
    pub const QUEUE_DRIVER_LO: (u64, usize) = (0x28, 4);
    pub const QUEUE_DRIVER_HI: (u64, usize) = (0x2c, 4);
    pub const QUEUE_DEVICE_LO: (u64, usize) = (0x30, 4);
    pub const QUEUE_DEVICE_HI: (u64, usize) = (0x34, 4);
    pub const ALL: [(u64, usize); 19] = [
        DEVICE_FEATURE_SELECT,
        DEVICE_FEATURE,
        DRIVER_FEATURE_SELECT,
        DRIVER_FEATURE,
        CONFIG_MSIX_VECTOR,
        NUM_QUEUES,
        DEVICE_STATUS,
        CONFIG_GENERATION,
        QUEUE_SELECT,
        QUEUE_SIZE,
        QUEUE_MSIX_VECTOR,
        QUEUE_ENABLE,
        QUEUE_NOTIFY_OFF,
        QUEUE_DESC_LO,
        QUEUE_DESC_HI,
        QUEUE_DRIVER_LO,
        QUEUE_DRIVER_HI,
        QUEUE_DEVICE_LO,
        QUEUE_DEVICE_HI,
    ];
}

/// Interrupt state shared by the transport and the device's worker.
struct PciInterrupt {
    msix: Arc<Mutex<MsixConfig>>,
    isr: Arc<AtomicU8>,
    config_vector: Arc<AtomicU16>,
    queue_vectors: Vec<u16>,
    needs_reset: Arc<AtomicBool>,
}

impl PciInterrupt {
    fn raise(&self, vector: u16, isr: u8) {
        self.isr.fetch_or(isr, Ordering::SeqCst);
        if vector != NO_VECTOR {
            lock(&self.msix).trigger(vector);
        }
    }
}

impl VirtioInterrupt for PciInterrupt {
    fn notify_queue(&self, index: u16) {
        let vector = self
            .queue_vectors
            .get(usize::from(index))
            .copied()
            .unwrap_or(NO_VECTOR);
        self.raise(vector, ISR_QUEUE);
    }

    fn notify_config(&self) {
        self.raise(self.config_vector.load(Ordering::SeqCst), ISR_CONFIG);
    }

    fn needs_reset(&self) {
        if !self.needs_reset.swap(true, Ordering::SeqCst) {
            guest_log::guest_warn!("virtio device needs a reset");
            self.notify_config();
        }
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A virtio device on the PCI bus.
pub struct VirtioPciDevice {
    config: PciConfiguration,
    device: Box<dyn VirtioDevice>,
    memory: Arc<GuestMemory>,
    io_events: Arc<dyn IoEvents>,
    msix: Arc<Mutex<MsixConfig>>,
    msix_cap: usize,
    pci_cfg_cap: usize,
    isr: Arc<AtomicU8>,
    config_vector: Arc<AtomicU16>,
    needs_reset: Arc<AtomicBool>,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    config_generation: u8,
    queue_select: u16,
    queues: Vec<QueueConfig>,
    notify: Vec<EventFd>,
    /// One per queue, for the stall report; the same across resets.
    watches: Vec<Arc<QueueWatch>>,
    bar_address: Option<u64>,
    active: bool,
}

impl std::fmt::Debug for VirtioPciDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioPciDevice")
            .field("type", &self.device.device_type())
            .field("status", &self.status)
            .field("active", &self.active)
            .finish_non_exhaustive()
    }
}

/// Errors when creating the transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot set up MSI-X")]
    Msix(#[source] std::io::Error),
    #[error("cannot create a queue notification eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("invalid PCI configuration")]
    Config(#[from] pci::config::ConfigError),
}

fn class_of(device_type: u32) -> (u8, u8, u8) {
    match device_type {
        device_type::NET => (0x02, 0x00, 0x00),
        device_type::BLOCK => (0x01, 0x00, 0x00),
        device_type::CONSOLE => (0x07, 0x80, 0x00),
        _ => (0x00, 0xff, 0x00),
    }
}

impl VirtioPciDevice {
    /// Wraps `device`, with BAR 0 at guest address `bar_address` (64-bit window).
    pub fn new(
        device: Box<dyn VirtioDevice>,
        memory: Arc<GuestMemory>,
        interrupts: Arc<dyn MsiInterrupts>,
        io_events: Arc<dyn IoEvents>,
        bar_address: u64,
    ) -> Result<Self, TransportError> {
        let device_type = device.device_type();
        let queues: Vec<QueueConfig> = device
            .queue_max_sizes()
            .iter()
            .map(|&max| QueueConfig::new(max))
            .collect();
        let mut config = PciConfiguration::new(PciIdentity {
            vendor: VIRTIO_PCI_VENDOR,
            device: VIRTIO_PCI_DEVICE_BASE + device_type as u16,
            revision: 1,
            class: class_of(device_type),
            subsystem_vendor: VIRTIO_PCI_VENDOR,
            subsystem: VIRTIO_PCI_SUBSYSTEM,
        });
        config.add_bar(
            BAR_INDEX,
            BAR_SIZE,
            BarKind::Mem64 {
                prefetchable: false,
            },
            bar_address,
        )?;
        // One vector per queue plus one for configuration changes.
        let vectors = (queues.len() + 1).min(usize::from(msix::MAX_VECTORS)) as u16;
        let msix = MsixConfig::new(vectors, interrupts).map_err(TransportError::Msix)?;
        let cap = |cfg_type: u8, offset: u64, length: u64, extra: &[u8]| {
            let mut body = vec![(16 + extra.len()) as u8, cfg_type, BAR_INDEX as u8, 0, 0, 0];
            body.extend_from_slice(&(offset as u32).to_le_bytes());
            body.extend_from_slice(&(length as u32).to_le_bytes());
            body.extend_from_slice(extra);
            body
        };
        config.add_capability(
            VENDOR_CAPABILITY,
            &cap(CAP_COMMON, COMMON_OFFSET, COMMON_SIZE, &[]),
            &[],
        )?;
        config.add_capability(VENDOR_CAPABILITY, &cap(CAP_ISR, ISR_OFFSET, 1, &[]), &[])?;
        config.add_capability(
            VENDOR_CAPABILITY,
            &cap(CAP_DEVICE, DEVICE_OFFSET, DEVICE_SIZE, &[]),
            &[],
        )?;
        let notify_len = (queues.len() as u64 * u64::from(NOTIFY_MULTIPLIER)).max(4);
        config.add_capability(
            VENDOR_CAPABILITY,
            &cap(
                CAP_NOTIFY,
                NOTIFY_OFFSET,
                notify_len,
                &NOTIFY_MULTIPLIER.to_le_bytes(),
            ),
            &[],
        )?;
        // bar (byte 2 of the body), offset, length and data are the driver's to write.
        let pci_cfg_body = cap(CAP_PCI_CFG, 0, 0, &[0; 4]);
        let mut pci_cfg_mask = vec![0u8; pci_cfg_body.len()];
        pci_cfg_mask[2] = 0xff;
        pci_cfg_mask[6..].fill(0xff);
        let pci_cfg_cap = config.add_capability(VENDOR_CAPABILITY, &pci_cfg_body, &pci_cfg_mask)?;
        let (msix_body, msix_mask) = msix.capability(
            BAR_INDEX as u8,
            MSIX_TABLE_OFFSET as u32,
            MSIX_PBA_OFFSET as u32,
        );
        let msix_cap = config.add_capability(msix::CAPABILITY_ID, &msix_body, &msix_mask)?;
        let notify = (0..queues.len())
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(TransportError::EventFd)?;
        Ok(VirtioPciDevice {
            config,
            device,
            memory,
            io_events,
            msix: Arc::new(Mutex::new(msix)),
            msix_cap,
            pci_cfg_cap,
            isr: Arc::new(AtomicU8::new(0)),
            config_vector: Arc::new(AtomicU16::new(NO_VECTOR)),
            needs_reset: Arc::new(AtomicBool::new(false)),
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            queue_select: 0,
            queues,
            watches: (0..notify.len()).map(|_| QueueWatch::detached()).collect(),
            notify,
            bar_address: None,
            active: false,
        })
    }

    fn offered_features(&self) -> u64 {
        self.device.features() | features::TRANSPORT
    }

    fn device_status(&self) -> u8 {
        let mut status = self.status;
        if self.needs_reset.load(Ordering::SeqCst) {
            status |= status::DEVICE_NEEDS_RESET;
        }
        status
    }

    fn selected_queue(&mut self) -> Option<&mut QueueConfig> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    fn common_field(&self, field: (u64, usize)) -> u64 {
        let queue = self.queues.get(usize::from(self.queue_select)).copied();
        let q = |f: fn(&QueueConfig) -> u64| queue.as_ref().map_or(0, f);
        match field {
            common::DEVICE_FEATURE_SELECT => u64::from(self.device_feature_select),
            common::DEVICE_FEATURE => match self.device_feature_select {
                0 => self.offered_features() & 0xffff_ffff,
                1 => self.offered_features() >> 32,
                _ => 0,
            },
            common::DRIVER_FEATURE_SELECT => u64::from(self.driver_feature_select),
            common::DRIVER_FEATURE => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            common::CONFIG_MSIX_VECTOR => u64::from(self.config_vector.load(Ordering::SeqCst)),
            common::NUM_QUEUES => self.queues.len() as u64,
            common::DEVICE_STATUS => u64::from(self.device_status()),
            common::CONFIG_GENERATION => u64::from(self.config_generation),
            common::QUEUE_SELECT => u64::from(self.queue_select),
            common::QUEUE_SIZE => q(|q| u64::from(q.size)),
            common::QUEUE_MSIX_VECTOR => {
                queue.map_or(u64::from(NO_VECTOR), |q| u64::from(q.vector))
            }
            common::QUEUE_ENABLE => q(|q| u64::from(q.enabled)),
            common::QUEUE_NOTIFY_OFF => u64::from(self.queue_select),
            common::QUEUE_DESC_LO => q(|q| q.desc & 0xffff_ffff),
            common::QUEUE_DESC_HI => q(|q| q.desc >> 32),
            common::QUEUE_DRIVER_LO => q(|q| q.driver & 0xffff_ffff),
            common::QUEUE_DRIVER_HI => q(|q| q.driver >> 32),
            common::QUEUE_DEVICE_LO => q(|q| q.device & 0xffff_ffff),
            common::QUEUE_DEVICE_HI => q(|q| q.device >> 32),
            _ => 0,
        }
    }

    fn read_common(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        for field in common::ALL {
            let value = self.common_field(field).to_le_bytes();
            copy_overlap(field, &value, offset, data, |dst, src| *dst = *src);
        }
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        for field in common::ALL {
            let (start, size) = field;
            let end = start + size as u64;
            if offset >= end || offset + data.len() as u64 <= start {
                continue;
            }
            // Merge the written bytes into the field's current value.
            let mut value = self.common_field(field).to_le_bytes();
            for (i, byte) in data.iter().enumerate() {
                let at = offset + i as u64;
                if (start..end).contains(&at) {
                    value[(at - start) as usize] = *byte;
                }
            }
            self.set_common_field(field, u64::from_le_bytes(value));
        }
    }

    fn set_common_field(&mut self, field: (u64, usize), value: u64) {
        let configurable = self.status & status::DRIVER_OK == 0;
        let vectors = lock(&self.msix).vector_count();
        let valid_vector = |v: u64| {
            if v < u64::from(vectors) {
                v as u16
            } else {
                NO_VECTOR
            }
        };
        match field {
            common::DEVICE_FEATURE_SELECT => self.device_feature_select = value as u32,
            common::DRIVER_FEATURE_SELECT => self.driver_feature_select = value as u32,
            common::DRIVER_FEATURE if self.status & status::FEATURES_OK == 0 => {
                let value = value & 0xffff_ffff;
                match self.driver_feature_select {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | value,
                    1 => {
                        self.driver_features = (self.driver_features & 0xffff_ffff) | (value << 32)
                    }
                    _ => {}
                }
            }
            common::CONFIG_MSIX_VECTOR => {
                self.config_vector
                    .store(valid_vector(value), Ordering::SeqCst);
            }
            common::DEVICE_STATUS => self.set_status(value as u8),
            common::QUEUE_SELECT => self.queue_select = value as u16,
            common::QUEUE_SIZE if configurable => {
                if let Some(q) = self.selected_queue() {
                    q.size = value as u16;
                }
            }
            common::QUEUE_MSIX_VECTOR => {
                let vector = valid_vector(value);
                if let Some(q) = self.selected_queue() {
                    q.vector = vector;
                }
            }
            common::QUEUE_ENABLE if configurable => {
                if let Some(q) = self.selected_queue() {
                    q.enabled = value == 1;
                }
            }
            common::QUEUE_DESC_LO | common::QUEUE_DESC_HI if configurable => {
                let hi = field == common::QUEUE_DESC_HI;
                if let Some(q) = self.selected_queue() {
                    q.desc = set_half(q.desc, value, hi);
                }
            }
            common::QUEUE_DRIVER_LO | common::QUEUE_DRIVER_HI if configurable => {
                let hi = field == common::QUEUE_DRIVER_HI;
                if let Some(q) = self.selected_queue() {
                    q.driver = set_half(q.driver, value, hi);
                }
            }
            common::QUEUE_DEVICE_LO | common::QUEUE_DEVICE_HI if configurable => {
                let hi = field == common::QUEUE_DEVICE_HI;
                if let Some(q) = self.selected_queue() {
                    q.device = set_half(q.device, value, hi);
                }
            }
            _ => {} // read-only, or not writable in this state
        }
    }

    fn set_status(&mut self, new: u8) {
        if new == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        if new & old != old {
            guest_log::guest_warn!(
                "virtio driver tried to clear status bits ({old:#x} -> {new:#x}); ignored"
            );
            return;
        }
        let mut new = new & !status::DEVICE_NEEDS_RESET;
        let added = new & !old;
        if added & status::FEATURES_OK != 0 && !self.features_acceptable() {
            new &= !status::FEATURES_OK;
        }
        self.status = new;
        if added & status::DRIVER_OK != 0 && new & status::FEATURES_OK != 0 && !self.active {
            self.activate();
        }
        if added & status::FAILED != 0 && self.active {
            self.device.reset();
            self.active = false;
        }
    }

    fn features_acceptable(&self) -> bool {
        let offered = self.offered_features();
        let ok =
            self.driver_features & !offered == 0 && self.driver_features & features::VERSION_1 != 0;
        if !ok {
            guest_log::guest_warn!(
                "virtio driver chose features {:#x} outside the offer {offered:#x} or without VERSION_1",
                self.driver_features
            );
        }
        ok
    }

    /// Each queue's watch, in queue order, for the stall report.
    pub fn queue_watches(&self) -> Vec<Arc<QueueWatch>> {
        self.watches.clone()
    }

    fn build_queue(&self, config: &QueueConfig) -> Result<Queue, String> {
        let mut queue = Queue::new(config.max_size).map_err(|e| e.to_string())?;
        queue.set_size(config.size);
        queue.set_desc_table_address(Some(config.desc as u32), Some((config.desc >> 32) as u32));
        queue.set_avail_ring_address(
            Some(config.driver as u32),
            Some((config.driver >> 32) as u32),
        );
        queue.set_used_ring_address(
            Some(config.device as u32),
            Some((config.device >> 32) as u32),
        );
        queue.set_event_idx(self.driver_features & features::RING_EVENT_IDX != 0);
        queue.set_ready(true);
        if queue.size() != config.size || !queue.is_valid(&*self.memory) {
            return Err(format!(
                "invalid queue: size {} (max {}), rings at {:#x}/{:#x}/{:#x}",
                config.size, config.max_size, config.desc, config.driver, config.device
            ));
        }
        Ok(queue)
    }

    fn activate(&mut self) {
        let mut queues = Vec::new();
        for (index, config) in self.queues.iter().enumerate() {
            if !config.enabled {
                continue;
            }
            let queue = match self.build_queue(config) {
                Ok(queue) => queue,
                Err(e) => {
                    guest_log::guest_warn!("virtio queue {index}: {e}");
                    return self.fail_activation();
                }
            };
            let notify = match self.notify[index].try_clone() {
                Ok(notify) => notify,
                Err(e) => {
                    guest_log::guest_error!("cannot clone a notification eventfd: {e}");
                    return self.fail_activation();
                }
            };
            let watch = self.watches[index].clone();
            watch.activate(
                config.size,
                self.memory.clone(),
                GuestAddress(config.driver),
                GuestAddress(config.device),
            );
            queues.push(ActiveQueue {
                index: index as u16,
                queue,
                notify,
                watch,
            });
        }
        let interrupt = Arc::new(PciInterrupt {
            msix: self.msix.clone(),
            isr: self.isr.clone(),
            config_vector: self.config_vector.clone(),
            queue_vectors: self.queues.iter().map(|q| q.vector).collect(),
            needs_reset: self.needs_reset.clone(),
        });
        let activation = Activation {
            memory: self.memory.clone(),
            features: self.driver_features,
            queues,
            interrupt,
        };
        match self.device.activate(activation) {
            Ok(()) => self.active = true,
            Err(e) => {
                guest_log::guest_warn!("virtio device could not start: {e}");
                self.watches.iter().for_each(|w| w.deactivate());
                self.fail_activation();
            }
        }
    }

    fn fail_activation(&mut self) {
        self.needs_reset.store(true, Ordering::SeqCst);
        self.isr.fetch_or(ISR_CONFIG, Ordering::SeqCst);
        let vector = self.config_vector.load(Ordering::SeqCst);
        if vector != NO_VECTOR {
            lock(&self.msix).trigger(vector);
        }
    }

    fn reset(&mut self) {
        if self.active {
            self.device.reset();
            self.active = false;
        }
        self.status = 0;
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.queue_select = 0;
        self.config_vector.store(NO_VECTOR, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
        self.isr.store(0, Ordering::SeqCst);
        for queue in &mut self.queues {
            *queue = QueueConfig::new(queue.max_size);
        }
        for notify in &self.notify {
            let _ = notify.read();
        }
        self.watches.iter().for_each(|w| w.deactivate());
        self.config_generation = self.config_generation.wrapping_add(1);
    }

    fn read_bar0(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            o if o < COMMON_OFFSET + COMMON_SIZE => self.read_common(o - COMMON_OFFSET, data),
            o if (ISR_OFFSET..ISR_OFFSET + 4).contains(&o) => {
                data.fill(0);
                if o == ISR_OFFSET {
                    if let Some(first) = data.first_mut() {
                        *first = self.isr.swap(0, Ordering::SeqCst);
                    }
                }
            }
            o if (DEVICE_OFFSET..DEVICE_OFFSET + DEVICE_SIZE).contains(&o) => {
                self.device.read_config(o - DEVICE_OFFSET, data);
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                lock(&self.msix).read_table(o - MSIX_TABLE_OFFSET, data);
            }
            o if (MSIX_PBA_OFFSET..BAR_SIZE).contains(&o) => {
                lock(&self.msix).read_pba(o - MSIX_PBA_OFFSET, data);
            }
            _ => data.fill(0),
        }
    }

    fn write_bar0(&mut self, offset: u64, data: &[u8]) {
        match offset {
            o if o < COMMON_OFFSET + COMMON_SIZE => self.write_common(o - COMMON_OFFSET, data),
            o if (DEVICE_OFFSET..DEVICE_OFFSET + DEVICE_SIZE).contains(&o) => {
                self.device.write_config(o - DEVICE_OFFSET, data);
            }
            o if (NOTIFY_OFFSET..MSIX_TABLE_OFFSET).contains(&o) => {
                // Reached only when the ioeventfd is not (yet) in place.
                let index = ((o - NOTIFY_OFFSET) / u64::from(NOTIFY_MULTIPLIER)) as usize;
                if let Some(notify) = self.notify.get(index) {
                    let _ = notify.write(1);
                }
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                lock(&self.msix).write_table(o - MSIX_TABLE_OFFSET, data);
            }
            _ => {} // ISR and PBA are read-only
        }
    }

    /// The PCI-configuration access capability: a window into the BARs through config space.
    fn pci_cfg_window(&self) -> (u8, u64, usize) {
        let base = self.pci_cfg_cap;
        let mut bar = [0u8];
        self.config.read(base + 4, &mut bar);
        let offset = self.config.read_u32(base + 8);
        let length = self.config.read_u32(base + 12);
        (bar[0], u64::from(offset), length as usize)
    }

    fn pci_cfg_data_offset(&self) -> usize {
        self.pci_cfg_cap + 16
    }

    fn is_pci_cfg_data(&self, offset: usize, len: usize) -> bool {
        let data = self.pci_cfg_data_offset();
        offset >= data && offset + len <= data + 4
    }
}

fn set_half(current: u64, value: u64, high: bool) -> u64 {
    if high {
        (current & 0xffff_ffff) | (value << 32)
    } else {
        (current & !0xffff_ffff) | (value & 0xffff_ffff)
    }
}

/// Copies the part of field `(start, size)` with little-endian `value` that the access
/// `[offset, offset + data.len())` covers.
fn copy_overlap(
    (start, size): (u64, usize),
    value: &[u8; 8],
    offset: u64,
    data: &mut [u8],
    mut copy: impl FnMut(&mut u8, &u8),
) {
    for (i, byte) in data.iter_mut().enumerate() {
        let at = offset + i as u64;
        if at >= start && at < start + size as u64 {
            copy(byte, &value[(at - start) as usize]);
        }
    }
}

impl PciDevice for VirtioPciDevice {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }

    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        if self.is_pci_cfg_data(offset, data.len()) {
            let (bar, bar_offset, length) = self.pci_cfg_window();
            data.fill(0);
            if usize::from(bar) == BAR_INDEX && matches!(length, 1 | 2 | 4) && length <= data.len()
            {
                self.read_bar0(bar_offset, &mut data[..length]);
            }
            return;
        }
        self.config.read(offset, data);
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        if self.is_pci_cfg_data(offset, data.len()) {
            let (bar, bar_offset, length) = self.pci_cfg_window();
            if usize::from(bar) == BAR_INDEX && matches!(length, 1 | 2 | 4) && length <= data.len()
            {
                self.write_bar0(bar_offset, &data[..length]);
            }
            return;
        }
        self.config.write(offset, data);
        let control = self.msix_cap + 2;
        if offset < control + 2 && offset + data.len() > control {
            let value = self.config.read_u16(control);
            lock(&self.msix).set_control(value);
        }
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if bar == BAR_INDEX {
            self.read_bar0(offset, data);
        } else {
            data.fill(0xff);
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar == BAR_INDEX {
            self.write_bar0(offset, data);
        }
    }

    fn bar_moved(&mut self, bar: usize, old: Option<u64>, new: Option<u64>) {
        if bar != BAR_INDEX {
            return;
        }
        let notify_addr = |base: u64, index: usize| {
            base + NOTIFY_OFFSET + index as u64 * u64::from(NOTIFY_MULTIPLIER)
        };
        for (index, event) in self.notify.iter().enumerate() {
            if let Some(base) = old {
                if let Err(e) = self.io_events.unregister(event, notify_addr(base, index)) {
                    guest_log::guest_warn!("cannot remove the ioeventfd of queue {index}: {e}");
                }
            }
            if let Some(base) = new {
                if let Err(e) = self.io_events.register(event, notify_addr(base, index)) {
                    // Notifications still arrive through write_bar, just slower.
                    guest_log::guest_warn!("cannot add the ioeventfd of queue {index}: {e}");
                }
            }
        }
        self.bar_address = new;
    }
}

impl Drop for VirtioPciDevice {
    fn drop(&mut self) {
        if self.active {
            self.device.reset();
        }
        if let Some(base) = self.bar_address.take() {
            self.bar_moved(BAR_INDEX, Some(base), None);
        }
    }
}

/// Offset of BAR 0 in configuration space (for tests and tools).
pub const BAR0_OFFSET: usize = BAR0;

#[cfg(test)]
mod tests {
    use super::*;
    use pci::msix::MsiMessage;
    use std::sync::Mutex as StdMutex;
    use vm_memory::GuestAddress;

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

    #[derive(Default)]
    struct Registered(StdMutex<Vec<u64>>);

    impl IoEvents for Registered {
        fn register(&self, _event: &EventFd, addr: u64) -> std::io::Result<()> {
            self.0.lock().unwrap().push(addr);
            Ok(())
        }
        fn unregister(&self, _event: &EventFd, addr: u64) -> std::io::Result<()> {
            self.0.lock().unwrap().retain(|&a| a != addr);
            Ok(())
        }
    }

    /// Records what the transport asks of it.
    #[derive(Default)]
    struct Log {
        activations: Vec<(u64, Vec<u16>)>,
        resets: usize,
    }

    struct FakeDevice(Arc<StdMutex<Log>>);

    impl VirtioDevice for FakeDevice {
        fn device_type(&self) -> u32 {
            device_type::RNG
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[64, 64]
        }
        fn features(&self) -> u64 {
            1 << 3
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            crate::device::read_config_bytes(&[0xaa, 0xbb, 0xcc, 0xdd], offset, data);
        }
        fn activate(&mut self, activation: Activation) -> Result<(), crate::device::ActivateError> {
            let queues = activation.queues.iter().map(|q| q.index).collect();
            self.0
                .lock()
                .unwrap()
                .activations
                .push((activation.features, queues));
            Ok(())
        }
        fn reset(&mut self) {
            self.0.lock().unwrap().resets += 1;
        }
    }

    const BAR: u64 = 0x1_0000_0000;

    fn transport() -> (VirtioPciDevice, Arc<StdMutex<Log>>, Arc<Registered>) {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let log = Arc::new(StdMutex::new(Log::default()));
        let events = Arc::new(Registered::default());
        let device = VirtioPciDevice::new(
            Box::new(FakeDevice(log.clone())),
            Arc::new(mem),
            Arc::new(NoInterrupts),
            events.clone(),
            BAR,
        )
        .unwrap();
        (device, log, events)
    }

    fn write(t: &mut VirtioPciDevice, field: (u64, usize), value: u64) {
        t.write_bar(0, field.0, &value.to_le_bytes()[..field.1]);
    }

    fn read(t: &mut VirtioPciDevice, field: (u64, usize)) -> u64 {
        let mut b = [0u8; 8];
        t.read_bar(0, field.0, &mut b[..field.1]);
        u64::from_le_bytes(b)
    }

    fn negotiate(t: &mut VirtioPciDevice, features: u64) -> u8 {
        write(
            t,
            common::DEVICE_STATUS,
            u64::from(status::ACKNOWLEDGE | status::DRIVER),
        );
        write(t, common::DRIVER_FEATURE_SELECT, 0);
        write(t, common::DRIVER_FEATURE, features & 0xffff_ffff);
        write(t, common::DRIVER_FEATURE_SELECT, 1);
        write(t, common::DRIVER_FEATURE, features >> 32);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        write(t, common::DEVICE_STATUS, u64::from(s));
        read(t, common::DEVICE_STATUS) as u8
    }

    fn setup_queue(t: &mut VirtioPciDevice, index: u64, base: u64) {
        write(t, common::QUEUE_SELECT, index);
        write(t, common::QUEUE_SIZE, 64);
        write(t, common::QUEUE_DESC_LO, base);
        write(t, common::QUEUE_DRIVER_LO, base + 0x400);
        write(t, common::QUEUE_DEVICE_LO, base + 0x800);
        write(t, common::QUEUE_MSIX_VECTOR, index);
        write(t, common::QUEUE_ENABLE, 1);
    }

    #[test]
    fn features_are_offered_in_two_halves() {
        let (mut t, _, _) = transport();
        write(&mut t, common::DEVICE_FEATURE_SELECT, 0);
        let low = read(&mut t, common::DEVICE_FEATURE);
        write(&mut t, common::DEVICE_FEATURE_SELECT, 1);
        let high = read(&mut t, common::DEVICE_FEATURE);
        let offered = low | (high << 32);
        assert_eq!(offered, (1 << 3) | features::TRANSPORT);
        write(&mut t, common::DEVICE_FEATURE_SELECT, 7);
        assert_eq!(read(&mut t, common::DEVICE_FEATURE), 0);
        assert_eq!(read(&mut t, common::NUM_QUEUES), 2);
    }

    #[test]
    fn features_ok_needs_version_1_and_a_subset_of_the_offer() {
        let (mut t, _, _) = transport();
        assert_eq!(
            negotiate(&mut t, 1 << 3) & status::FEATURES_OK,
            0,
            "no VERSION_1"
        );
        let (mut t, _, _) = transport();
        let unknown = features::VERSION_1 | (1 << 40);
        assert_eq!(
            negotiate(&mut t, unknown) & status::FEATURES_OK,
            0,
            "not offered"
        );
        let (mut t, _, _) = transport();
        let good = features::VERSION_1 | features::RING_EVENT_IDX | (1 << 3);
        assert_ne!(negotiate(&mut t, good) & status::FEATURES_OK, 0);
        // Features are frozen once FEATURES_OK is set.
        write(&mut t, common::DRIVER_FEATURE_SELECT, 0);
        write(&mut t, common::DRIVER_FEATURE, 0);
        assert_eq!(t.driver_features, good);
    }

    #[test]
    fn status_bits_only_accumulate() {
        let (mut t, _, _) = transport();
        write(
            &mut t,
            common::DEVICE_STATUS,
            u64::from(status::ACKNOWLEDGE | status::DRIVER),
        );
        write(
            &mut t,
            common::DEVICE_STATUS,
            u64::from(status::ACKNOWLEDGE),
        );
        assert_eq!(
            read(&mut t, common::DEVICE_STATUS) as u8,
            status::ACKNOWLEDGE | status::DRIVER
        );
    }

    #[test]
    fn driver_ok_starts_the_device_with_its_enabled_queues() {
        let (mut t, log, events) = transport();
        // Decoding on at the BAR: the notification ioeventfds are registered.
        t.bar_moved(0, None, Some(BAR));
        assert_eq!(
            *events.0.lock().unwrap(),
            vec![BAR + NOTIFY_OFFSET, BAR + NOTIFY_OFFSET + 4]
        );
        let features = features::VERSION_1 | features::RING_EVENT_IDX;
        negotiate(&mut t, features);
        setup_queue(&mut t, 1, 0x10000);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        write(&mut t, common::DEVICE_STATUS, u64::from(s));
        assert_eq!(log.lock().unwrap().activations, vec![(features, vec![1])]);
        // Queue configuration is frozen while the device runs.
        write(&mut t, common::QUEUE_SELECT, 1);
        write(&mut t, common::QUEUE_SIZE, 16);
        assert_eq!(read(&mut t, common::QUEUE_SIZE), 64);
        assert_eq!(read(&mut t, common::QUEUE_MSIX_VECTOR), 1);
    }

    #[test]
    fn a_queue_outside_memory_makes_the_device_need_a_reset() {
        let (mut t, log, _) = transport();
        negotiate(&mut t, features::VERSION_1);
        setup_queue(&mut t, 0, 0x7000_0000);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        write(&mut t, common::DEVICE_STATUS, u64::from(s));
        assert!(log.lock().unwrap().activations.is_empty());
        let status_now = read(&mut t, common::DEVICE_STATUS) as u8;
        assert_ne!(status_now & status::DEVICE_NEEDS_RESET, 0);
        let mut isr = [0u8];
        t.read_bar(0, ISR_OFFSET, &mut isr);
        assert_eq!(isr[0] & ISR_CONFIG, ISR_CONFIG);
        t.read_bar(0, ISR_OFFSET, &mut isr);
        assert_eq!(isr[0], 0, "reading the ISR clears it");
    }

    #[test]
    fn a_queue_size_that_is_not_a_power_of_two_is_refused() {
        let (mut t, log, _) = transport();
        negotiate(&mut t, features::VERSION_1);
        setup_queue(&mut t, 0, 0x10000);
        write(&mut t, common::QUEUE_SIZE, 48);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        write(&mut t, common::DEVICE_STATUS, u64::from(s));
        assert!(log.lock().unwrap().activations.is_empty());
        assert_ne!(
            read(&mut t, common::DEVICE_STATUS) as u8 & status::DEVICE_NEEDS_RESET,
            0
        );
    }

    #[test]
    fn writing_zero_resets_the_device() {
        let (mut t, log, _) = transport();
        negotiate(&mut t, features::VERSION_1);
        setup_queue(&mut t, 0, 0x10000);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        write(&mut t, common::DEVICE_STATUS, u64::from(s));
        let watches = t.queue_watches();
        assert!(watches[0].snapshot("test0", 0).active);
        assert!(
            !watches[1].snapshot("test0", 1).active,
            "queue 1 not enabled"
        );
        let generation = read(&mut t, common::CONFIG_GENERATION);
        write(&mut t, common::DEVICE_STATUS, 0);
        assert_eq!(log.lock().unwrap().resets, 1);
        assert!(
            !watches[0].snapshot("test0", 0).active,
            "reset ends the queue"
        );
        assert_eq!(read(&mut t, common::DEVICE_STATUS), 0);
        write(&mut t, common::QUEUE_SELECT, 0);
        assert_eq!(read(&mut t, common::QUEUE_ENABLE), 0);
        assert_eq!(read(&mut t, common::QUEUE_DESC_LO), 0);
        assert_eq!(
            read(&mut t, common::QUEUE_MSIX_VECTOR),
            u64::from(NO_VECTOR)
        );
        assert_ne!(read(&mut t, common::CONFIG_GENERATION), generation);
        write(&mut t, common::DRIVER_FEATURE_SELECT, 1);
        assert_eq!(read(&mut t, common::DRIVER_FEATURE), 0);
    }

    #[test]
    fn vectors_beyond_the_table_read_as_no_vector() {
        let (mut t, _, _) = transport();
        write(&mut t, common::CONFIG_MSIX_VECTOR, 2);
        assert_eq!(read(&mut t, common::CONFIG_MSIX_VECTOR), 2);
        write(&mut t, common::CONFIG_MSIX_VECTOR, 3);
        assert_eq!(
            read(&mut t, common::CONFIG_MSIX_VECTOR),
            u64::from(NO_VECTOR)
        );
        write(&mut t, common::QUEUE_SELECT, 9);
        assert_eq!(read(&mut t, common::QUEUE_SIZE), 0, "no such queue");
        write(&mut t, common::QUEUE_SIZE, 16);
    }

    #[test]
    fn device_config_and_the_pci_config_window() {
        let (mut t, _, _) = transport();
        let mut cfg = [0u8; 4];
        t.read_bar(0, DEVICE_OFFSET, &mut cfg);
        assert_eq!(cfg, [0xaa, 0xbb, 0xcc, 0xdd]);
        // Point the window at NUM_QUEUES (2 bytes) and read it through configuration space.
        let cap = t.pci_cfg_cap;
        t.write_config(cap + 4, &[0]);
        t.write_config(cap + 8, &(common::NUM_QUEUES.0 as u32).to_le_bytes());
        t.write_config(cap + 12, &2u32.to_le_bytes());
        let mut data = [0u8; 4];
        t.read_config(cap + 16, &mut data);
        assert_eq!(u16::from_le_bytes([data[0], data[1]]), 2);
        // A window with a bad length reads zero.
        t.write_config(cap + 12, &3u32.to_le_bytes());
        t.read_config(cap + 16, &mut data);
        assert_eq!(data, [0; 4]);
    }

    #[test]
    fn identity_and_capabilities() {
        let (t, _, _) = transport();
        assert_eq!(t.config.read_u32(0), 0x1044_1af4);
        let mut offset = usize::from(t.config.read_u16(0x34) as u8);
        let mut kinds = Vec::new();
        while offset != 0 {
            let mut id = [0u8; 4];
            t.config.read(offset, &mut id[..1]);
            let mut next = [0u8];
            t.config.read(offset + 1, &mut next);
            let mut kind = [0u8];
            t.config.read(offset + 3, &mut kind);
            kinds.push((
                id[0],
                if id[0] == VENDOR_CAPABILITY {
                    kind[0]
                } else {
                    0
                },
            ));
            offset = usize::from(next[0]);
        }
        assert_eq!(
            kinds,
            vec![
                (9, CAP_COMMON),
                (9, CAP_ISR),
                (9, CAP_DEVICE),
                (9, CAP_NOTIFY),
                (9, CAP_PCI_CFG),
                (0x11, 0)
            ]
        );
    }
}
