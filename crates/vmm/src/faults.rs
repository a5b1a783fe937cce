//! Faults a VMM has on purpose when asked (`ferro run --fault`), so that the tools that find
//! faults (the stall report, the end-to-end tests' stall watchdog) can be shown to find them.
//! None is on unless asked for; nothing a guest does turns one on.
//!
//! Threading: plain values, read while the machine is built and by the vCPU threads.

/// The faults to have.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Faults {
    /// COM1 raises its interrupt but the line is never connected to the interrupt
    /// controller: the guest's interrupt-driven serial output stalls, as with a lost
    /// interrupt.
    pub mute_serial_irq: bool,
    /// At the guest's first port write, the vCPU thread makes a system call its seccomp
    /// filter does not allow (`socket`): the VMM must die of SIGSYS with a report naming it.
    pub forbidden_syscall: bool,
}
