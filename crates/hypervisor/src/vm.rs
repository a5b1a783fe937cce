//! One guest: its memory slots, in-kernel interrupt controllers and timers, and irqfds.

use std::sync::Arc;

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_irqchip,
    kvm_irq_routing_msi, kvm_irqchip, kvm_pic_state, kvm_pit_config, kvm_userspace_memory_region,
    KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::error::{ioctl_err, Error, Result};
use crate::vcpu::Vcpu;

/// Guest-physical address of the three pages KVM needs for the real-mode TSS on Intel;
/// just below the BIOS area at the top of the 32-bit space, as QEMU places it.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// Guest-physical page KVM uses for its real-mode identity map on Intel.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// Where a GSI (global system interrupt number) leads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrqRoute {
    /// To pin `pin` of the in-kernel IOAPIC.
    Ioapic { gsi: u32, pin: u32 },
    /// To an MSI message (address and data as the device's MSI-X table entry holds them).
    Msi { gsi: u32, address: u64, data: u32 },
}

impl IrqRoute {
    pub fn gsi(&self) -> u32 {
        match *self {
            IrqRoute::Ioapic { gsi, .. } | IrqRoute::Msi { gsi, .. } => gsi,
        }
    }

    fn to_kvm(self) -> kvm_irq_routing_entry {
        match self {
            IrqRoute::Ioapic { gsi, pin } => kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_IRQCHIP,
                u: kvm_irq_routing_entry__bindgen_ty_1 {
                    irqchip: kvm_irq_routing_irqchip {
                        irqchip: KVM_IRQCHIP_IOAPIC,
                        pin,
                    },
                },
                ..Default::default()
            },
            IrqRoute::Msi { gsi, address, data } => kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                u: kvm_irq_routing_entry__bindgen_ty_1 {
                    msi: kvm_irq_routing_msi {
                        address_lo: address as u32,
                        address_hi: (address >> 32) as u32,
                        data,
                        ..Default::default()
                    },
                },
                ..Default::default()
            },
        }
    }
}

/// One of the two cascaded in-kernel 8259 PICs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pic {
    /// IRQs 0-7.
    Primary,
    /// IRQs 8-15, cascaded on the primary's IRQ 2.
    Secondary,
}

/// The in-kernel IOAPIC's registers (KVM_GET_IRQCHIP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoapicState {
    pub id: u32,
    /// Pins whose level is asserted (bit per pin).
    pub irr: u32,
    /// The 24 redirection table entries as the guest programmed them, bits as in the IOAPIC
    /// datasheet (vector 0-7, delivery mode 8-10, ... mask 16, destination 56-63).
    pub redirection: Vec<u64>,
}

/// A KVM virtual machine.
#[derive(Debug)]
pub struct Vm {
    fd: VmFd,
    max_vcpus: usize,
    /// Keeps the mappings registered with KVM alive as long as the VM exists.
    memory: Option<Arc<GuestMemoryMmap>>,
}

impl Vm {
    pub(crate) fn new(fd: VmFd, max_vcpus: usize) -> Self {
        Vm {
            fd,
            max_vcpus,
            memory: None,
        }
    }

    /// Sets the x86 system addresses KVM needs and creates the in-kernel PIC, IOAPIC, local
    /// APICs (per vCPU, later) and PIT. Must be called before any vCPU is created.
    pub fn create_platform_devices(&self) -> Result<()> {
        self.fd
            .set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(ioctl_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        let tss = usize::try_from(KVM_TSS_ADDRESS)
            .map_err(|_| Error::Invalid("TSS address does not fit usize".into()))?;
        self.fd
            .set_tss_address(tss)
            .map_err(ioctl_err("KVM_SET_TSS_ADDR"))?;
        self.fd
            .create_irq_chip()
            .map_err(ioctl_err("KVM_CREATE_IRQCHIP"))?;
        // The PC speaker port (0x61) is served by KVM without producing sound.
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd
            .create_pit2(pit)
            .map_err(ioctl_err("KVM_CREATE_PIT2"))
    }

    /// Registers every region of `memory` as a KVM memory slot (slot numbers in region order).
    pub fn register_memory(&mut self, memory: Arc<GuestMemoryMmap>) -> Result<()> {
        for (slot, region) in memory.iter().enumerate() {
            let host_addr = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| {
                    Error::Invalid(format!("guest memory region has no host mapping: {e}"))
                })?;
            let slot = u32::try_from(slot)
                .map_err(|_| Error::Invalid("too many guest memory regions".into()))?;
            let mem_region = kvm_userspace_memory_region {
                slot,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host_addr as u64,
                flags: 0,
            };
            // SAFETY: the host range belongs to a live mmap owned by `memory`, and `self.memory`
            // keeps that mapping alive for as long as this VM (and its memory slots) exists.
            unsafe { self.fd.set_user_memory_region(mem_region) }
                .map_err(ioctl_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        self.memory = Some(memory);
        Ok(())
    }

    /// Replaces KVM's whole interrupt routing table with `routes`. GSIs not listed are not
    /// routed anywhere.
    pub fn set_gsi_routing(&self, routes: &[IrqRoute]) -> Result<()> {
        let entries: Vec<kvm_irq_routing_entry> =
            routes.iter().copied().map(IrqRoute::to_kvm).collect();
        let routing = KvmIrqRouting::from_entries(&entries)
            .map_err(|e| Error::Invalid(format!("too many interrupt routes: {e:?}")))?;
        self.fd
            .set_gsi_routing(&routing)
            .map_err(ioctl_err("KVM_SET_GSI_ROUTING"))
    }

    /// Makes a write to `event` raise guest interrupt line `gsi`.
    pub fn register_irqfd(&self, event: &EventFd, gsi: u32) -> Result<()> {
        self.fd
            .register_irqfd(event, gsi)
            .map_err(ioctl_err("KVM_IRQFD"))
    }

    /// Stops `event` from raising `gsi`.
    pub fn unregister_irqfd(&self, event: &EventFd, gsi: u32) -> Result<()> {
        self.fd
            .unregister_irqfd(event, gsi)
            .map_err(ioctl_err("KVM_IRQFD (deassign)"))
    }

    /// Makes a guest write of any width to MMIO address `addr` signal `event` inside KVM,
    /// without an exit to userspace.
    pub fn register_mmio_ioevent(&self, event: &EventFd, addr: u64) -> Result<()> {
        self.fd
            .register_ioevent(event, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(ioctl_err("KVM_IOEVENTFD"))
    }

    /// Undoes [`Vm::register_mmio_ioevent`].
    pub fn unregister_mmio_ioevent(&self, event: &EventFd, addr: u64) -> Result<()> {
        self.fd
            .unregister_ioevent(event, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(ioctl_err("KVM_IOEVENTFD (deassign)"))
    }

    /// The guest's kvm-clock, in nanoseconds (saved when the VM pauses).
    pub fn clock(&self) -> Result<u64> {
        Ok(self
            .fd
            .get_clock()
            .map_err(ioctl_err("KVM_GET_CLOCK"))?
            .clock)
    }

    /// Sets the guest's kvm-clock, so that a paused VM resumes where its time stopped.
    pub fn set_clock(&self, nanoseconds: u64) -> Result<()> {
        let data = kvm_bindings::kvm_clock_data {
            clock: nanoseconds,
            ..Default::default()
        };
        self.fd.set_clock(&data).map_err(ioctl_err("KVM_SET_CLOCK"))
    }

    /// The registers of one in-kernel PIC.
    pub fn pic(&self, which: Pic) -> Result<kvm_pic_state> {
        let chip = match which {
            Pic::Primary => KVM_IRQCHIP_PIC_MASTER,
            Pic::Secondary => KVM_IRQCHIP_PIC_SLAVE,
        };
        let state = self.irqchip(chip)?;
        // SAFETY: KVM filled the `pic` member for a PIC chip id; it is plain bytes.
        Ok(unsafe { state.chip.pic })
    }

    /// The in-kernel IOAPIC's registers.
    pub fn ioapic(&self) -> Result<IoapicState> {
        let state = self.irqchip(KVM_IRQCHIP_IOAPIC)?;
        // SAFETY: KVM filled the `ioapic` member for the IOAPIC chip id; it is plain integers.
        let ioapic = unsafe { state.chip.ioapic };
        Ok(IoapicState {
            id: ioapic.id,
            irr: ioapic.irr,
            redirection: ioapic
                .redirtbl
                .iter()
                // SAFETY: both union members cover the same 8 bytes; every bit pattern is a u64.
                .map(|entry| unsafe { entry.bits })
                .collect(),
        })
    }

    fn irqchip(&self, chip_id: u32) -> Result<kvm_irqchip> {
        let mut state = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        self.fd
            .get_irqchip(&mut state)
            .map_err(ioctl_err("KVM_GET_IRQCHIP"))?;
        Ok(state)
    }

    /// Creates vCPU number `id` (its initial APIC ID is `id` as well).
    pub fn create_vcpu(&self, id: u32) -> Result<Vcpu> {
        if id as usize >= self.max_vcpus {
            return Err(Error::Invalid(format!(
                "vCPU {id} exceeds the host's limit of {} vCPUs",
                self.max_vcpus
            )));
        }
        let fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(ioctl_err("KVM_CREATE_VCPU"))?;
        Ok(Vcpu::new(fd, id))
    }
}
