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
        .collect();
    let mut notes = Vec::new();
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
