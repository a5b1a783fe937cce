//! One virtual CPU: its state and `KVM_RUN`.
//!
//! A [`Vcpu`] lives on the thread that runs it. `KVM_RUN` returns a borrowed [`VcpuExit`]
//! that the caller completes (e.g. fills the data of a port read) before running again.

use std::fmt::Write as _;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_fpu, kvm_lapic_state, kvm_regs, kvm_sregs, kvm_vcpu_events, CpuId, Msrs,
    KVM_MP_STATE_AP_RESET_HOLD, KVM_MP_STATE_CHECK_STOP, KVM_MP_STATE_HALTED,
    KVM_MP_STATE_INIT_RECEIVED, KVM_MP_STATE_LOAD, KVM_MP_STATE_OPERATING, KVM_MP_STATE_RUNNABLE,
    KVM_MP_STATE_SIPI_RECEIVED, KVM_MP_STATE_STOPPED, KVM_MP_STATE_SUSPENDED,
    KVM_MP_STATE_UNINITIALIZED, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit as KvmExit, VcpuFd};

use crate::error::{ioctl_err, Error, Result};
use crate::MsrEntry;

/// Why `KVM_RUN` returned.
#[derive(Debug)]
pub enum VcpuExit<'a> {
    /// `in` from an I/O port; fill `data` before the next run.
    IoIn { port: u16, data: &'a mut [u8] },
    /// `out` to an I/O port.
    IoOut { port: u16, data: &'a [u8] },
    /// Read from an unmapped physical address; fill `data` before the next run.
    MmioRead { addr: u64, data: &'a mut [u8] },
    /// Write to an unmapped physical address.
    MmioWrite { addr: u64, data: &'a [u8] },
    /// `hlt` with no in-kernel irqchip to wait for interrupts.
    Hlt,
    /// The guest triple faulted (KVM_EXIT_SHUTDOWN).
    Shutdown,
    /// A signal interrupted `KVM_RUN` (or immediate exit was requested).
    Interrupted,
    /// The hardware refused to enter the guest.
    FailEntry { reason: u64 },
    /// KVM could not emulate something (KVM_EXIT_INTERNAL_ERROR); see
    /// [`Vcpu::internal_error_suberror`].
    InternalError,
    /// The guest asked for a system event (reset, shutdown, crash).
    SystemEvent(SystemEvent),
    /// Any other exit; Ferro treats it as fatal.
    Unexpected(String),
}

/// System events a guest may raise through KVM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SystemEvent {
    Shutdown,
    Reset,
    Crash,
    Other(u32),
}

/// A vCPU's multiprocessing state (KVM_GET_MP_STATE): whether it runs, waits in `hlt`, or
/// waits for the INIT/SIPI that starts an application processor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MpState {
    Runnable,
    Uninitialized,
    InitReceived,
    Halted,
    SipiReceived,
    Stopped,
    CheckStop,
    Operating,
    Load,
    ApResetHold,
    Suspended,
    Other(u32),
}

impl MpState {
    fn from_kvm(value: u32) -> Self {
        match value {
            KVM_MP_STATE_RUNNABLE => MpState::Runnable,
            KVM_MP_STATE_UNINITIALIZED => MpState::Uninitialized,
            KVM_MP_STATE_INIT_RECEIVED => MpState::InitReceived,
            KVM_MP_STATE_HALTED => MpState::Halted,
            KVM_MP_STATE_SIPI_RECEIVED => MpState::SipiReceived,
            KVM_MP_STATE_STOPPED => MpState::Stopped,
            KVM_MP_STATE_CHECK_STOP => MpState::CheckStop,
            KVM_MP_STATE_OPERATING => MpState::Operating,
            KVM_MP_STATE_LOAD => MpState::Load,
            KVM_MP_STATE_AP_RESET_HOLD => MpState::ApResetHold,
            KVM_MP_STATE_SUSPENDED => MpState::Suspended,
            other => MpState::Other(other),
        }
    }
}

/// A KVM virtual CPU.
#[derive(Debug)]
pub struct Vcpu {
    fd: VcpuFd,
    id: u32,
}

impl Vcpu {
    pub(crate) fn new(fd: VcpuFd, id: u32) -> Self {
        Vcpu { fd, id }
    }

    /// The vCPU's index (and initial APIC ID).
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Sets the CPUID the guest sees.
    pub fn set_cpuid(&self, entries: &[kvm_cpuid_entry2]) -> Result<()> {
        let cpuid = CpuId::from_entries(entries)
            .map_err(|e| Error::Invalid(format!("too many CPUID entries: {e:?}")))?;
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(ioctl_err("KVM_SET_CPUID2"))
    }

    /// Writes `entries` to the vCPU's MSRs. Returns the indices KVM refused, so the caller
    /// can decide whether they matter.
    pub fn set_msrs(&self, entries: &[MsrEntry]) -> Result<Vec<u32>> {
        let mut refused = Vec::new();
        let mut rest = entries;
        while !rest.is_empty() {
            let msrs = Msrs::from_entries(rest)
                .map_err(|e| Error::Invalid(format!("too many MSRs: {e:?}")))?;
            let written = self.fd.set_msrs(&msrs).map_err(ioctl_err("KVM_SET_MSRS"))?;
            if written >= rest.len() {
                break;
            }
            // KVM stops at the first MSR it refuses; note it and carry on after it.
            refused.push(rest[written].index);
            rest = &rest[written + 1..];
        }
        Ok(refused)
    }

    pub fn get_regs(&self) -> Result<kvm_regs> {
        self.fd.get_regs().map_err(ioctl_err("KVM_GET_REGS"))
    }

    pub fn set_regs(&self, regs: &kvm_regs) -> Result<()> {
        self.fd.set_regs(regs).map_err(ioctl_err("KVM_SET_REGS"))
    }

    pub fn get_sregs(&self) -> Result<kvm_sregs> {
        self.fd.get_sregs().map_err(ioctl_err("KVM_GET_SREGS"))
    }

    pub fn set_sregs(&self, sregs: &kvm_sregs) -> Result<()> {
        self.fd.set_sregs(sregs).map_err(ioctl_err("KVM_SET_SREGS"))
    }

    pub fn set_fpu(&self, fpu: &kvm_fpu) -> Result<()> {
        self.fd.set_fpu(fpu).map_err(ioctl_err("KVM_SET_FPU"))
    }

    pub fn get_lapic(&self) -> Result<kvm_lapic_state> {
        self.fd.get_lapic().map_err(ioctl_err("KVM_GET_LAPIC"))
    }

    pub fn set_lapic(&self, lapic: &kvm_lapic_state) -> Result<()> {
        self.fd.set_lapic(lapic).map_err(ioctl_err("KVM_SET_LAPIC"))
    }

    /// The vCPU's multiprocessing state.
    pub fn mp_state(&self) -> Result<MpState> {
        let state = self
            .fd
            .get_mp_state()
            .map_err(ioctl_err("KVM_GET_MP_STATE"))?;
        Ok(MpState::from_kvm(state.mp_state))
    }

    /// Pending and injected exceptions, interrupts and NMIs, and the interrupt shadow.
    pub fn events(&self) -> Result<kvm_vcpu_events> {
        self.fd
            .get_vcpu_events()
            .map_err(ioctl_err("KVM_GET_VCPU_EVENTS"))
    }

    /// Runs the vCPU until the next exit that needs the VMM.
    pub fn run(&mut self) -> Result<VcpuExit<'_>> {
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                return Ok(VcpuExit::Interrupted)
            }
            Err(e) => return Err(ioctl_err("KVM_RUN")(e)),
        };
        Ok(match exit {
            KvmExit::IoIn(port, data) => VcpuExit::IoIn { port, data },
            KvmExit::IoOut(port, data) => VcpuExit::IoOut { port, data },
            KvmExit::MmioRead(addr, data) => VcpuExit::MmioRead { addr, data },
            KvmExit::MmioWrite(addr, data) => VcpuExit::MmioWrite { addr, data },
            KvmExit::Hlt => VcpuExit::Hlt,
            KvmExit::Shutdown => VcpuExit::Shutdown,
            KvmExit::Intr => VcpuExit::Interrupted,
            KvmExit::FailEntry(reason, _cpu) => VcpuExit::FailEntry { reason },
            KvmExit::InternalError => VcpuExit::InternalError,
            KvmExit::SystemEvent(kind, _data) => VcpuExit::SystemEvent(match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => SystemEvent::Shutdown,
                KVM_SYSTEM_EVENT_RESET => SystemEvent::Reset,
                KVM_SYSTEM_EVENT_CRASH => SystemEvent::Crash,
                other => SystemEvent::Other(other),
            }),
            other => VcpuExit::Unexpected(format!("{other:?}")),
        })
    }

    /// The suberror of the last [`VcpuExit::InternalError`] (1 = emulation failure).
    pub fn internal_error_suberror(&mut self) -> u32 {
        let run = self.fd.get_kvm_run();
        // SAFETY: called right after KVM_RUN reported KVM_EXIT_INTERNAL_ERROR, for which the
        // kernel fills the `internal` member of the exit union; every bit pattern is a valid u32.
        unsafe { run.__bindgen_anon_1.internal.suberror }
    }

    /// Human-readable dump of the general, segment and control registers, for crash reports.
    /// Whether the vCPU holds the architectural INIT/reset state (CS:IP f000:fff0, CS base
    /// ffff0000, paging and protection off). After KVM_EXIT_SHUTDOWN on AMD (SVM) KVM has
    /// already re-initialized the vCPU, so its registers no longer show the fault.
    pub fn in_reset_state(&self) -> bool {
        let (Ok(regs), Ok(sregs)) = (self.get_regs(), self.get_sregs()) else {
            return false;
        };
        regs.rip == 0xfff0
            && sregs.cs.selector == 0xf000
            && sregs.cs.base == 0xffff_0000
            && sregs.cr0 & 1 == 0
    }

    pub fn dump_registers(&self) -> String {
        let mut out = String::new();
        match self.get_regs() {
            Ok(r) => {
                let _ = writeln!(
                    out,
                    "rax={:016x} rbx={:016x} rcx={:016x} rdx={:016x}\n\
                     rsi={:016x} rdi={:016x} rbp={:016x} rsp={:016x}\n\
                     r8 ={:016x} r9 ={:016x} r10={:016x} r11={:016x}\n\
                     r12={:016x} r13={:016x} r14={:016x} r15={:016x}\n\
                     rip={:016x} rflags={:016x}",
                    r.rax,
                    r.rbx,
                    r.rcx,
                    r.rdx,
                    r.rsi,
                    r.rdi,
                    r.rbp,
                    r.rsp,
                    r.r8,
                    r.r9,
                    r.r10,
                    r.r11,
                    r.r12,
                    r.r13,
                    r.r14,
                    r.r15,
                    r.rip,
                    r.rflags
                );
            }
            Err(e) => {
                let _ = writeln!(out, "general registers unavailable: {e}");
            }
        }
        match self.get_sregs() {
            Ok(s) => {
                for (name, seg) in [
                    ("cs", s.cs),
                    ("ds", s.ds),
                    ("es", s.es),
                    ("ss", s.ss),
                    ("fs", s.fs),
                    ("gs", s.gs),
                    ("tr", s.tr),
                ] {
                    let _ = writeln!(
                        out,
                        "{name}={:04x} base={:016x} limit={:08x} type={:x} dpl={} l={} db={}",
                        seg.selector, seg.base, seg.limit, seg.type_, seg.dpl, seg.l, seg.db
                    );
                }
                let _ = write!(
                    out,
                    "cr0={:016x} cr2={:016x} cr3={:016x} cr4={:016x} efer={:016x}\n\
                     gdt={:016x}/{:x} idt={:016x}/{:x}",
                    s.cr0,
                    s.cr2,
                    s.cr3,
                    s.cr4,
                    s.efer,
                    s.gdt.base,
                    s.gdt.limit,
                    s.idt.base,
                    s.idt.limit
                );
            }
            Err(e) => {
                let _ = write!(out, "special registers unavailable: {e}");
            }
        }
        out
    }
}
