//! vCPU setup (CPUID, MSRs, FPU, LAPIC, entry registers) and the thread that runs a vCPU.
//!
//! A vCPU thread loops on `KVM_RUN`, dispatches port I/O and MMIO exits to the buses, and stops
//! when the shared stop flag is set (the control loop kicks it out of `KVM_RUN` with a signal).
//! A guest failure is reported once through a channel plus an eventfd, register dump included.
//! Between two `KVM_RUN`s, and while parked at the pause gate, the thread records its exits and
//! answers the stall report's requests for its registers (`vcpu_probe`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arch::boot::EntryPoint;
use arch::cpuid::CpuidConfig;
use devices::bus::Bus;
use devices::PowerEvents;
use hypervisor::{CpuidEntry, SystemEvent, Vcpu, VcpuExit};
use virtio::counters::Counters;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use crate::error::Error;
use crate::signals;
use crate::vcpu_probe::{self, VcpuProbe};
use sandbox::ThreadKind;

/// What the host's KVM offers every vCPU; probed once per VMM process.
#[derive(Debug, Clone)]
pub(crate) struct HostCpu {
    supported_cpuid: Vec<CpuidEntry>,
    tsc_deadline: bool,
}

impl HostCpu {
    pub fn probe(hv: &hypervisor::Hypervisor) -> Result<Self, Error> {
        let supported_cpuid = hv.supported_cpuid()?;
        if tracing::enabled!(tracing::Level::DEBUG) {
            for e in &supported_cpuid {
                tracing::debug!(
                    "KVM CPUID {:08x}.{:x}: {:08x} {:08x} {:08x} {:08x}",
                    e.function,
                    e.index,
                    e.eax,
                    e.ebx,
                    e.ecx,
                    e.edx
                );
            }
        }
        Ok(HostCpu {
            supported_cpuid,
            tsc_deadline: hv.has_tsc_deadline_timer(),
        })
    }
}

/// Puts `vcpu` in its power-on state for a VM of `cpus` vCPUs. `entry` is given for the boot
/// vCPU only; the others wait for the guest's INIT/SIPI.
pub(crate) fn configure(
    vcpu: &Vcpu,
    host: &HostCpu,
    cpus: u32,
    entry: Option<&EntryPoint>,
) -> Result<(), Error> {
    let config = CpuidConfig {
        cpus,
        tsc_deadline: host.tsc_deadline,
    };
    vcpu.set_cpuid(&arch::cpuid::guest_cpuid(
        &host.supported_cpuid,
        vcpu.id(),
        &config,
    ))?;
    let refused = vcpu.set_msrs(&arch::regs::boot_msrs())?;
    if !refused.is_empty() {
        guest_log::guest_debug!("vCPU {}: KVM refused MSRs {refused:x?}", vcpu.id());
    }
    vcpu.set_fpu(&arch::regs::boot_fpu())?;
    let mut lapic = vcpu.get_lapic()?;
    arch::regs::configure_lapic_lint(&mut lapic);
    vcpu.set_lapic(&lapic)?;
    if let Some(entry) = entry {
        vcpu.set_regs(&arch::regs::boot_regs(entry))?;
        let sregs = arch::regs::boot_sregs(
            vcpu.get_sregs()?,
            entry.segment_mode(),
            arch::layout::PML4_START.0,
        );
        vcpu.set_sregs(&sregs)?;
    }
    Ok(())
}

/// Exit counters of a vCPU (indexes into [`EXIT_NAMES`]).
mod exit {
    pub const IO_IN: usize = 0;
    pub const IO_OUT: usize = 1;
    pub const MMIO_READ: usize = 2;
    pub const MMIO_WRITE: usize = 3;
    pub const INTERRUPTED: usize = 4;
    pub const SYSTEM_EVENT: usize = 5;
    pub const FAILURE: usize = 6;
}

const EXIT_NAMES: &[&str] = &[
    "io_in",
    "io_out",
    "mmio_read",
    "mmio_write",
    "interrupted",
    "system_event",
    "failure",
];

/// Fresh exit counters for one vCPU.
pub(crate) fn new_exit_counters() -> Arc<Counters> {
    Counters::new("vcpu", EXIT_NAMES)
}

/// A fresh probe (recent exits, register requests) for one vCPU of one boot.
pub(crate) fn new_probe() -> Arc<VcpuProbe> {
    Arc::new(VcpuProbe::new(EXIT_NAMES))
}

/// Parks vCPU threads between two `KVM_RUN`s while the VM is paused.
#[derive(Debug, Default)]
pub(crate) struct VcpuGate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct GateState {
    paused: bool,
    /// Threads waiting at the gate.
    parked: usize,
    /// Stopping: nobody waits any more.
    released: bool,
}

/// How long pausing may take before it is given up (a vCPU stuck in the kernel).
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

impl VcpuGate {
    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Called by a vCPU thread before each `KVM_RUN`: waits while the VM is paused, calling
    /// `on_wake` (without the gate's lock) each time it is woken, e.g. by [`VcpuGate::poke`].
    fn pass(&self, mut on_wake: impl FnMut()) {
        let mut state = self.lock();
        if !state.paused || state.released {
            return;
        }
        state.parked += 1;
        self.changed.notify_all();
        while state.paused && !state.released {
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
            drop(state);
            on_wake();
            state = self.lock();
        }
        state.parked -= 1;
    }

    /// Wakes parked threads without letting them go (they look at their probes). A poke can
    /// be missed by a thread that is just parking, so a caller waiting for an effect repeats it.
    pub fn poke(&self) {
        let _state = self.lock();
        self.changed.notify_all();
    }

    /// Stops every running vCPU thread at the gate; returns once all are parked, or false
    /// (and lets them run again) if they did not park within [`PAUSE_TIMEOUT`].
    pub fn pause(&self, handles: &[JoinHandle<()>]) -> bool {
        self.lock().paused = true;
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        loop {
            let running: Vec<_> = handles.iter().filter(|h| !h.is_finished()).collect();
            if self.lock().parked >= running.len() {
                return true;
            }
            if Instant::now() > deadline {
                self.resume();
                return false;
            }
            // A kick can land just before a thread enters KVM_RUN: kick until it parks.
            for handle in running {
                let _ = handle.kill(signals::vcpu_kick_signal());
            }
            let state = self.lock();
            let _ = self
                .changed
                .wait_timeout(state, Duration::from_millis(1))
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Lets parked vCPU threads run again.
    pub fn resume(&self) {
        self.lock().paused = false;
        self.changed.notify_all();
    }

    /// Opens the gate for good (the VM is stopping).
    fn release(&self) {
        self.lock().released = true;
        self.changed.notify_all();
    }
}

/// Everything a vCPU thread needs.
pub(crate) struct VcpuRunner {
    pub vcpu: Vcpu,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub power: PowerEvents,
    pub stop: Arc<AtomicBool>,
    pub gate: Arc<VcpuGate>,
    pub exits: Arc<Counters>,
    pub probe: Arc<VcpuProbe>,
    pub failures: Sender<Error>,
    pub failure_event: EventFd,
    /// `Faults::forbidden_syscall`, until it has happened.
    pub forbidden_syscall: bool,
}

/// What to do after an exit.
enum Next {
    Continue,
    Fail(Error),
}

impl VcpuRunner {
    pub fn spawn(self) -> Result<JoinHandle<()>, Error> {
        let id = self.vcpu.id();
        crate::signals::spawn_thread(ThreadKind::Vcpu, &format!("vcpu{id}"), move || self.run())
            .map_err(|source| Error::SpawnVcpu { id, source })
    }

    fn run(mut self) {
        while !self.stop.load(Ordering::Acquire) {
            self.answer_probe();
            let (gate, probe, vcpu) = (&self.gate, &self.probe, &self.vcpu);
            gate.pass(|| probe.answer_if_asked(|| vcpu_probe::read_registers(vcpu)));
            if self.stop.load(Ordering::Acquire) {
                break;
            }
            if let Next::Fail(error) = self.run_once() {
                self.exits.add(exit::FAILURE, 1);
                self.probe.exits.record(exit::FAILURE);
                guest_log::guest_debug!("vCPU {} stops: {error}", self.vcpu.id());
                let _ = self.failures.send(error);
                let _ = self.failure_event.write(1);
                return;
            }
        }
    }

    fn answer_probe(&self) {
        self.probe
            .answer_if_asked(|| vcpu_probe::read_registers(&self.vcpu));
    }

    fn run_once(&mut self) -> Next {
        let id = self.vcpu.id();
        let exit = match self.vcpu.run() {
            Ok(exit) => exit,
            Err(source) => return Next::Fail(Error::VcpuRun { id, source }),
        };
        let counted = match &exit {
            VcpuExit::IoIn { .. } => Some(exit::IO_IN),
            VcpuExit::IoOut { .. } => Some(exit::IO_OUT),
            VcpuExit::MmioRead { .. } => Some(exit::MMIO_READ),
            VcpuExit::MmioWrite { .. } => Some(exit::MMIO_WRITE),
            VcpuExit::Interrupted => Some(exit::INTERRUPTED),
            VcpuExit::SystemEvent(_) => Some(exit::SYSTEM_EVENT),
            _ => None,
        };
        if let Some(index) = counted {
            self.exits.add(index, 1);
            self.probe.exits.record(index);
        }
        let failure = match exit {
            VcpuExit::IoIn { port, data } => {
                if !self.pio.read(u64::from(port), data) {
                    guest_log::guest_trace!("unhandled port read {port:#x}");
                    data.fill(0xff);
                }
                return Next::Continue;
            }
            VcpuExit::IoOut { port, data } => {
                if std::mem::take(&mut self.forbidden_syscall) {
                    sandbox::make_forbidden_call();
                }
                if !self.pio.write(u64::from(port), data) {
                    guest_log::guest_trace!("unhandled port write {port:#x}");
                }
                return Next::Continue;
            }
            VcpuExit::MmioRead { addr, data } => {
                if !self.mmio.read(addr, data) {
                    guest_log::guest_trace!("unhandled MMIO read {addr:#x}");
                    data.fill(0xff);
                }
                return Next::Continue;
            }
            VcpuExit::MmioWrite { addr, data } => {
                if !self.mmio.write(addr, data) {
                    guest_log::guest_trace!("unhandled MMIO write {addr:#x}");
                }
                return Next::Continue;
            }
            VcpuExit::Interrupted => return Next::Continue,
            VcpuExit::SystemEvent(SystemEvent::Shutdown) => {
                self.power.request_shutdown();
                return Next::Continue;
            }
            VcpuExit::SystemEvent(SystemEvent::Reset) => {
                self.power.request_reset();
                return Next::Continue;
            }
            VcpuExit::Shutdown => GuestFailure::TripleFault,
            VcpuExit::InternalError => GuestFailure::Internal,
            VcpuExit::FailEntry { reason } => GuestFailure::FailEntry(reason),
            VcpuExit::SystemEvent(SystemEvent::Crash) => GuestFailure::CrashEvent,
            VcpuExit::SystemEvent(SystemEvent::Other(kind)) => {
                GuestFailure::Unexpected(format!("system event {kind}"))
            }
            VcpuExit::Hlt => GuestFailure::Unexpected("HLT".into()),
            VcpuExit::Unexpected(what) => GuestFailure::Unexpected(what),
        };
        Next::Fail(self.describe(failure))
    }

    fn describe(&mut self, failure: GuestFailure) -> Error {
        let id = self.vcpu.id();
        let registers = self.vcpu.dump_registers();
        match failure {
            GuestFailure::TripleFault if self.vcpu.in_reset_state() => Error::TripleFault {
                id,
                registers: format!("{REINITIALIZED}\n{registers}"),
            },
            GuestFailure::TripleFault => Error::TripleFault { id, registers },
            GuestFailure::Internal => Error::InternalError {
                id,
                suberror: self.vcpu.internal_error_suberror(),
                registers,
            },
            GuestFailure::FailEntry(reason) => Error::FailEntry {
                id,
                reason,
                registers,
            },
            GuestFailure::CrashEvent => Error::GuestCrashEvent { id, registers },
            GuestFailure::Unexpected(exit) => Error::UnexpectedExit {
                id,
                exit,
                registers,
            },
        }
    }
}

/// Said before the registers of a triple fault when they are the INIT state: what KVM on AMD
/// leaves, so nobody reads them as a vCPU that never started.
const REINITIALIZED: &str = "(KVM re-initialized this vCPU on the shutdown, as it does on AMD \
     hosts: the registers below are its INIT state, not the state at the fault)";

enum GuestFailure {
    TripleFault,
    Internal,
    FailEntry(u64),
    CrashEvent,
    Unexpected(String),
}

/// How long stopping vCPU threads may take before the VMM gives up waiting for them.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Stops every vCPU thread: sets the stop flag, opens the pause gate and kicks each thread
/// until it has left `KVM_RUN` (a single kick could arrive just before a thread enters it).
pub(crate) fn stop_all(stop: &AtomicBool, gate: &VcpuGate, handles: Vec<JoinHandle<()>>) {
    stop.store(true, Ordering::Release);
    gate.release();
    let deadline = Instant::now() + STOP_TIMEOUT;
    loop {
        let running: Vec<_> = handles.iter().filter(|h| !h.is_finished()).collect();
        if running.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            tracing::error!(
                "{} vCPU thread(s) did not stop; leaving them behind",
                running.len()
            );
            return;
        }
        for handle in running {
            let _ = handle.kill(signals::vcpu_kick_signal());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    for handle in handles {
        let _ = handle.join();
    }
}
