//! What `GET /api/v1/vm/diagnostics` returns: a stall report, i.e. what each vCPU is doing
//! (registers, multiprocessing state, pending events, recent exits), each virtqueue's indexes
//! and last notification and interrupt, the serial port's interrupt registers and the
//! in-kernel interrupt controllers. Read by `ferro vm diagnose`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::state::VmState;

/// The whole report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmDiagnostics {
    pub state: VmState,
    /// How long the VMM waited for each vCPU thread to read its own registers.
    pub vcpu_answer_timeout_ms: u64,
    /// The span `recent_exits` covers: the current second and the whole seconds before it.
    pub exit_window_seconds: u64,
    pub vcpus: Vec<VcpuDiagnostics>,
    /// Every queue of every virtio device.
    pub virtio_queues: Vec<VirtioQueueDiagnostics>,
    /// COM1, unless its lock was held (e.g. by a vCPU thread blocked writing guest output).
    pub serial: Option<SerialDiagnostics>,
    /// KVM's PICs and IOAPIC, unless KVM refused to report them.
    pub irqchip: Option<IrqchipDiagnostics>,
    /// Why a part of the report is missing, and what the report shows to be wrong (a vCPU
    /// whose page tables lie outside guest RAM).
    #[serde(default)]
    pub notes: Vec<String>,
}

/// One vCPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VcpuDiagnostics {
    pub id: u32,
    /// Milliseconds since the vCPU last exited to the VMM; none if it has not exited since
    /// this boot began.
    pub ms_since_last_exit: Option<u64>,
    /// Exits to the VMM by reason within the last `exit_window_seconds`. Asking for this
    /// report adds an `interrupted` exit per vCPU, usually one (the kick that makes it answer).
    pub recent_exits: BTreeMap<String, u64>,
    /// Read by the vCPU's own thread; none if it did not answer in time.
    pub registers: Option<VcpuRegisters>,
    /// Why `registers` is missing.
    pub unavailable: Option<String>,
}

/// Registers and KVM state of one vCPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VcpuRegisters {
    pub rip: u64,
    pub rsp: u64,
    pub rflags: u64,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    /// The CS selector.
    pub cs: u16,
    /// Current privilege level (CS's DPL).
    pub cpl: u8,
    pub mp_state: MpState,
    pub events: VcpuEvents,
}

impl VcpuRegisters {
    /// RFLAGS.IF: maskable interrupts are accepted.
    pub fn interrupts_enabled(&self) -> bool {
        self.rflags & (1 << 9) != 0
    }

    /// The guest-physical address of the top page table while paging is on (CR0.PG): CR3
    /// without its flag or PCID bits.
    pub fn page_table_root(&self) -> Option<u64> {
        (self.cr0 & (1 << 31) != 0).then_some(self.cr3 & 0x000f_ffff_ffff_f000)
    }
}

/// KVM's multiprocessing state of a vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MpState {
    Runnable,
    /// An application processor waiting for INIT/SIPI.
    Uninitialized,
    InitReceived,
    /// In `hlt`, waiting for an interrupt.
    Halted,
    SipiReceived,
    Stopped,
    CheckStop,
    Operating,
    Load,
    ApResetHold,
    Suspended,
    Unknown,
}

impl MpState {
    pub fn as_str(self) -> &'static str {
        match self {
            MpState::Runnable => "runnable",
            MpState::Uninitialized => "uninitialized",
            MpState::InitReceived => "init_received",
            MpState::Halted => "halted",
            MpState::SipiReceived => "sipi_received",
            MpState::Stopped => "stopped",
            MpState::CheckStop => "check_stop",
            MpState::Operating => "operating",
            MpState::Load => "load",
            MpState::ApResetHold => "ap_reset_hold",
            MpState::Suspended => "suspended",
            MpState::Unknown => "unknown",
        }
    }
}

/// Events KVM holds for a vCPU (KVM_GET_VCPU_EVENTS).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VcpuEvents {
    pub exception: Option<PendingException>,
    /// An external interrupt being injected.
    pub interrupt: Option<InjectedInterrupt>,
    /// The instruction after `sti` or `mov ss`: interrupts are blocked for one instruction.
    pub interrupt_shadow: bool,
    pub nmi_injected: bool,
    pub nmi_pending: bool,
    /// NMIs are blocked (an NMI handler has not returned yet).
    pub nmi_masked: bool,
}

/// An exception KVM is delivering or will deliver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PendingException {
    pub vector: u8,
    pub error_code: Option<u32>,
    pub injected: bool,
    pub pending: bool,
}

/// An interrupt KVM is injecting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InjectedInterrupt {
    pub vector: u8,
    /// A software interrupt (`int n`).
    pub soft: bool,
}

/// One virtqueue: the device's side (positions, chains held, notifications seen, interrupts
/// sent) and the driver's (the indexes in guest memory).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtioQueueDiagnostics {
    /// `block0`, `net0`, `rng0`, `console0`.
    pub device: String,
    pub queue: u16,
    /// The driver has started the queue (and not reset the device since).
    pub active: bool,
    pub size: u16,
    /// The available-ring index the device will take next (all before it were seen).
    pub next_avail: u16,
    /// The used-ring index the device will fill next.
    pub next_used: u16,
    /// Chains the device took and has not returned.
    pub in_flight: u64,
    /// The available ring's idx in guest memory: what the driver has published.
    pub driver_avail_idx: Option<u16>,
    /// The used ring's idx in guest memory.
    pub used_idx: Option<u16>,
    /// Notifications the device's worker has seen since the VMM started this boot.
    pub notifications: u64,
    /// Interrupts the device sent for this queue.
    pub interrupts: u64,
    pub ms_since_notification: Option<u64>,
    pub ms_since_interrupt: Option<u64>,
}

/// The 16550A UART's registers that decide its interrupts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialDiagnostics {
    /// Interrupt enable register (bit 1: THR empty).
    pub ier: u8,
    /// Interrupt identification register (0x01: none pending; 0x02: THR empty).
    pub iir: u8,
    /// Line status register (bit 5: THR empty; bit 0: data ready).
    pub lsr: u8,
    pub lcr: u8,
    pub mcr: u8,
    /// A THR-empty interrupt is latched for the guest to read from IIR.
    pub thre_interrupt_pending: bool,
    /// Bytes waiting in the receive FIFO.
    pub input_bytes: u64,
}

/// KVM's in-kernel interrupt controllers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IrqchipDiagnostics {
    /// The primary (IRQ 0-7) and secondary (IRQ 8-15) 8259.
    pub pics: Vec<PicDiagnostics>,
    pub ioapic: IoapicDiagnostics,
}

/// One 8259 PIC: bit n is its input n.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PicDiagnostics {
    /// `primary` or `secondary`.
    pub name: String,
    /// Requested (interrupt request register).
    pub irr: u8,
    /// Masked (interrupt mask register).
    pub imr: u8,
    /// Being serviced (in-service register).
    pub isr: u8,
    /// Level-triggered inputs (ELCR).
    pub elcr: u8,
    /// Vector of input 0.
    pub irq_base: u8,
}

/// The IOAPIC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IoapicDiagnostics {
    pub id: u32,
    /// Pins whose line is asserted (bit per pin).
    pub irr: u32,
    pub pins: Vec<IoapicPin>,
}

/// One IOAPIC redirection entry, decoded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IoapicPin {
    pub pin: u8,
    pub vector: u8,
    /// 0 fixed, 1 lowest priority, 2 SMI, 4 NMI, 5 INIT, 7 ExtINT.
    pub delivery_mode: u8,
    pub logical_destination: bool,
    /// Delivery status: sent, not yet accepted by a local APIC.
    pub delivery_pending: bool,
    pub active_low: bool,
    /// Level-triggered and delivered, waiting for the guest's EOI.
    pub remote_irr: bool,
    pub level_triggered: bool,
    pub masked: bool,
    pub destination: u8,
}

impl IoapicPin {
    /// Decodes redirection entry `bits` of pin `pin` (layout of the IOAPIC datasheet).
    pub fn decode(pin: u8, bits: u64) -> Self {
        let bit = |n: u32| bits & (1 << n) != 0;
        IoapicPin {
            pin,
            vector: bits as u8,
            delivery_mode: ((bits >> 8) & 0b111) as u8,
            logical_destination: bit(11),
            delivery_pending: bit(12),
            active_low: bit(13),
            remote_irr: bit(14),
            level_triggered: bit(15),
            masked: bit(16),
            destination: (bits >> 56) as u8,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioapic_entries_decode_bit_by_bit() {
        // Vector 0x24, lowest priority, logical, active low, remote IRR, level, masked,
        // destination 0x03.
        let bits = 0x0300_0000_0001_e924u64;
        let pin = IoapicPin::decode(4, bits);
        assert_eq!(
            pin,
            IoapicPin {
                pin: 4,
                vector: 0x24,
                delivery_mode: 1,
                logical_destination: true,
                delivery_pending: false,
                active_low: true,
                remote_irr: true,
                level_triggered: true,
                masked: true,
                destination: 3,
            }
        );
        assert!(!IoapicPin::decode(0, 0x30).masked);
    }

    #[test]
    fn mp_state_names_match_their_json() {
        for state in [MpState::Halted, MpState::ApResetHold, MpState::Unknown] {
            let json = serde_json::to_string(&state).unwrap();
            assert_eq!(json, format!("\"{}\"", state.as_str()));
        }
    }
}
