//! The VM's interrupt routing: KVM's GSI routing table holds the IOAPIC pins and every MSI-X
//! vector's current message; devices raise their GSIs through irqfds.
//!
//! Shared by the main thread (setup) and vCPU threads (guests program MSI-X tables), so the
//! table is behind a mutex and every change is pushed to KVM whole.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex, PoisonError};

use hypervisor::{IrqRoute, Vm};
use pci::msix::{MsiInterrupts, MsiMessage};
use vmm_sys_util::eventfd::EventFd;

/// KVM's limit on routing entries (KVM_MAX_IRQ_ROUTES).
const MAX_GSI: u32 = 4096;

struct Table {
    routes: BTreeMap<u32, IrqRoute>,
    next_gsi: u32,
    free: Vec<u32>,
}

/// The interrupt routing of one VM.
pub struct InterruptRouter {
    vm: Arc<Vm>,
    table: Mutex<Table>,
}

impl std::fmt::Debug for InterruptRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InterruptRouter").finish_non_exhaustive()
    }
}

impl InterruptRouter {
    /// Routes the IOAPIC pins and leaves GSIs from [`arch::layout::irqs::MSI_GSI_BASE`] on for
    /// MSI-X.
    pub fn new(vm: Arc<Vm>) -> Result<Self, hypervisor::Error> {
        let routes = arch::layout::irqs::ioapic_routes()
            .into_iter()
            .map(|(gsi, pin)| (gsi, IrqRoute::Ioapic { gsi, pin }))
            .collect();
        let router = InterruptRouter {
            vm,
            table: Mutex::new(Table {
                routes,
                next_gsi: arch::layout::irqs::MSI_GSI_BASE,
                free: Vec::new(),
            }),
        };
        router.commit(&router.lock())?;
        Ok(router)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn commit(&self, table: &Table) -> Result<(), hypervisor::Error> {
        let routes: Vec<IrqRoute> = table.routes.values().copied().collect();
        self.vm.set_gsi_routing(&routes)
    }
}

fn io_error(e: hypervisor::Error) -> io::Error {
    io::Error::other(e)
}

impl MsiInterrupts for InterruptRouter {
    fn allocate(&self) -> io::Result<(u32, EventFd)> {
        let mut table = self.lock();
        let gsi = match table.free.pop() {
            Some(gsi) => gsi,
            None if table.next_gsi < MAX_GSI => {
                table.next_gsi += 1;
                table.next_gsi - 1
            }
            None => return Err(io::Error::other("no interrupt lines left")),
        };
        let event = EventFd::new(libc::EFD_NONBLOCK)?;
        self.vm.register_irqfd(&event, gsi).map_err(io_error)?;
        Ok((gsi, event))
    }

    fn route(&self, gsi: u32, message: Option<MsiMessage>) -> io::Result<()> {
        let mut table = self.lock();
        match message {
            Some(MsiMessage { address, data }) => {
                table
                    .routes
                    .insert(gsi, IrqRoute::Msi { gsi, address, data });
            }
            None => {
                table.routes.remove(&gsi);
            }
        }
        self.commit(&table).map_err(io_error)
    }

    fn release(&self, gsi: u32, event: &EventFd) {
        if let Err(e) = self.vm.unregister_irqfd(event, gsi) {
            guest_log::guest_warn!("cannot remove the irqfd of GSI {gsi}: {e}");
        }
        let mut table = self.lock();
        if table.routes.remove(&gsi).is_some() {
            let _ = self.commit(&table);
        }
        table.free.push(gsi);
    }
}

/// Queue notifications through KVM ioeventfds.
#[derive(Debug)]
pub struct KvmIoEvents(pub Arc<Vm>);

impl virtio::pci::IoEvents for KvmIoEvents {
    fn register(&self, event: &EventFd, addr: u64) -> io::Result<()> {
        self.0.register_mmio_ioevent(event, addr).map_err(io_error)
    }

    fn unregister(&self, event: &EventFd, addr: u64) -> io::Result<()> {
        self.0
            .unregister_mmio_ioevent(event, addr)
            .map_err(io_error)
    }
}
