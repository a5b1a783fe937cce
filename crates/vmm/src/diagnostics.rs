//! The stall report (`GET /api/v1/vm/diagnostics`): what each vCPU is doing, each virtqueue's
//! indexes and last notification and interrupt, COM1's interrupt registers, and KVM's PICs
//! and IOAPIC, gathered on the control loop.
//!
//! Threading: runs on the control loop. vCPU registers come from the vCPU threads through
//! `vcpu_probe` (bounded by [`VCPU_ANSWER_TIMEOUT`]); COM1 is read only if its lock is free
//! within [`SERIAL_LOCK_TIMEOUT`], since a vCPU thread blocked writing guest output holds it;
//! the irqchip is read through the VM's file descriptor, which any thread may use.

use std::sync::{Arc, Mutex, TryLockError};
use std::time::{Duration, Instant};

use api::diagnostics::{
    IoapicDiagnostics, IoapicPin, IrqchipDiagnostics, PicDiagnostics, SerialDiagnostics,
    VcpuDiagnostics, VmDiagnostics,
};
use devices::serial::Serial;
use hypervisor::{Pic, Vm};
use virtio::queue_watch::QueueWatch;

use crate::exit_window::WINDOW_SECONDS;
use crate::vcpu_probe::{self, VcpuProbe};

/// How long the report waits for the vCPU threads to read their registers.
pub(crate) const VCPU_ANSWER_TIMEOUT: Duration = Duration::from_millis(500);
/// How long the report waits for COM1's lock.
const SERIAL_LOCK_TIMEOUT: Duration = Duration::from_millis(100);

/// What the report reads from one boot.
pub(crate) struct Sources<'a> {
    pub state: api::VmState,
    pub vm: &'a Vm,
    pub serial: &'a Mutex<Serial>,
    pub virtio_queues: &'a [(String, Vec<Arc<QueueWatch>>)],
    pub probes: &'a [Arc<VcpuProbe>],
    /// Makes vCPU thread `i` look at its probe; false if the thread has ended.
    pub kick: &'a dyn Fn(usize) -> bool,
    /// Guest RAM, as (start, size) ranges.
    pub ram: &'a [(u64, u64)],
}

/// Gathers the report.
pub(crate) fn report(sources: &Sources<'_>) -> VmDiagnostics {
    let answers = vcpu_probe::ask_all(sources.probes, sources.kick, VCPU_ANSWER_TIMEOUT);
    let vcpus = sources
        .probes
        .iter()
        .zip(answers)
        .enumerate()
        .map(|(id, (probe, answer))| {
            let (ms_since_last_exit, recent) = probe.exits.read();
            let (registers, unavailable) = match answer {
                Ok(registers) => (Some(registers), None),
                Err(why) => (None, Some(why)),
            };
            VcpuDiagnostics {
                id: id as u32,
                ms_since_last_exit,
                recent_exits: recent
                    .into_iter()
                    .map(|(name, count)| (name.to_string(), count))
                    .collect(),
                registers,
                unavailable,
            }
        })
        .collect::<Vec<_>>();
    let mut notes = foreign_state_notes(&vcpus, sources.ram);
    let serial = serial(sources.serial).map_err(|why| notes.push(why)).ok();
    let irqchip = irqchip(sources.vm)
        .map_err(|e| notes.push(format!("irqchip: {}", api::error_chain(&e))))
        .ok();
    VmDiagnostics {
        state: sources.state,
        vcpu_answer_timeout_ms: VCPU_ANSWER_TIMEOUT.as_millis() as u64,
        exit_window_seconds: WINDOW_SECONDS,
        vcpus,
        virtio_queues: sources
            .virtio_queues
            .iter()
            .flat_map(|(device, watches)| {
                (0u16..)
                    .zip(watches)
                    .map(move |(index, watch)| watch.snapshot(device, index))
            })
            .collect(),
        serial,
        irqchip,
        notes,
    }
}

/// A note for each vCPU whose page tables would lie outside guest RAM. No guest can put them
/// there, so that vCPU holds state that is not its guest's own: seen under nested
/// virtualization, when the hypervisor below swapped its own registers into the guest's (a
/// RIP in the host kernel's module space, its CR3 beyond guest RAM), a stall that is not the
/// guest's nor this VMM's doing.
fn foreign_state_notes(vcpus: &[VcpuDiagnostics], ram: &[(u64, u64)]) -> Vec<String> {
    let in_ram = |address: u64| {
        ram.iter()
            .any(|&(start, size)| address >= start && address - start < size)
    };
    vcpus
        .iter()
        .filter_map(|vcpu| {
            let registers = vcpu.registers.as_ref()?;
            let root = registers.page_table_root()?;
            (!in_ram(root)).then(|| {
                format!(
                    "vCPU {}: its page tables (CR3 {:#x}) are outside guest RAM, so its \
                     registers are not the guest's own; under nested virtualization, the \
                     hypervisor below has mixed its state into this vCPU",
                    vcpu.id, registers.cr3
                )
            })
        })
        .collect()
}

fn serial(serial: &Mutex<Serial>) -> Result<SerialDiagnostics, String> {
    let deadline = Instant::now() + SERIAL_LOCK_TIMEOUT;
    let registers = loop {
        match serial.try_lock() {
            Ok(uart) => break uart.registers(),
            Err(TryLockError::Poisoned(poisoned)) => break poisoned.into_inner().registers(),
            Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(TryLockError::WouldBlock) => {
                return Err(format!(
                    "serial: COM1 stayed locked for {} ms (a vCPU thread blocked writing guest output?)",
                    SERIAL_LOCK_TIMEOUT.as_millis()
                ))
            }
        }
    };
    Ok(SerialDiagnostics {
        ier: registers.ier,
        iir: registers.iir,
        lsr: registers.lsr,
        lcr: registers.lcr,
        mcr: registers.mcr,
        thre_interrupt_pending: registers.thre_interrupt_pending(),
        input_bytes: registers.input_bytes as u64,
    })
}

fn irqchip(vm: &Vm) -> Result<IrqchipDiagnostics, hypervisor::Error> {
    let mut pics = Vec::new();
    for (name, which) in [("primary", Pic::Primary), ("secondary", Pic::Secondary)] {
        let pic = vm.pic(which)?;
        pics.push(PicDiagnostics {
            name: name.into(),
            irr: pic.irr,
            imr: pic.imr,
            isr: pic.isr,
            elcr: pic.elcr,
            irq_base: pic.irq_base,
        });
    }
    let ioapic = vm.ioapic()?;
    Ok(IrqchipDiagnostics {
        pics,
        ioapic: IoapicDiagnostics {
            id: ioapic.id,
            irr: ioapic.irr,
            pins: (0u8..)
                .zip(&ioapic.redirection)
                .map(|(pin, &bits)| IoapicPin::decode(pin, bits))
                .collect(),
        },
    })
}

#[cfg(test)]
mod tests {
    use api::diagnostics::{MpState, VcpuEvents, VcpuRegisters};

    use super::*;

    fn vcpu(id: u32, cr0: u64, cr3: u64) -> VcpuDiagnostics {
        VcpuDiagnostics {
            id,
            ms_since_last_exit: None,
            recent_exits: Default::default(),
            registers: Some(VcpuRegisters {
                rip: 0xffff_ffff_c032_ddcc,
                rsp: 0,
                rflags: 0x2,
                cr0,
                cr2: 0,
                cr3,
                cr4: 0,
                efer: 0,
                cs: 0x10,
                cpl: 0,
                mp_state: MpState::Runnable,
                events: VcpuEvents {
                    exception: None,
                    interrupt: None,
                    interrupt_shadow: false,
                    nmi_injected: false,
                    nmi_pending: false,
                    nmi_masked: false,
                },
            }),
            unavailable: None,
        }
    }

    #[test]
    fn page_tables_outside_guest_ram_are_named() {
        const PAGING: u64 = 0x8005_0033;
        let ram = [(0, 512 << 20)];
        let vcpus = [
            vcpu(0, PAGING, 0x1_08e7_4000),
            vcpu(1, PAGING, 0x1ff4_c000 | 0x18),
            vcpu(2, 0x10, 0x1_08e7_4000),
        ];
        let notes = foreign_state_notes(&vcpus, &ram);
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].starts_with("vCPU 0: its page tables (CR3 0x108e74000)"));
        let above_4g = [(0, 3 << 30), (1 << 32, 1 << 30)];
        assert!(foreign_state_notes(&vcpus[..1], &above_4g).is_empty());
    }
}
