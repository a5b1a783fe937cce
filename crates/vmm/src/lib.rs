//! The Ferro VMM: assembles a PC from a [`api::VmConfig`], runs it on KVM and reports how it
//! ended.
//!
//! Threads: the caller's thread runs the control loop ([`run`]): it waits on the guest's power
//! events, failing vCPUs, console input and termination signals. Each vCPU runs `KVM_RUN` on
//! its own thread and calls the devices directly on port I/O and MMIO exits. A console thread
//! reads standard input. A guest reset tears the whole machine down and builds it again from
//! the same configuration, as a cold boot would.

mod console;
mod error;
mod interrupts;
mod machine;
mod memory;
mod pci_devices;
mod run;
mod signals;
mod state;
mod vcpu;

pub use console::{Console, ESCAPE_HELP};
pub use error::{Error, ExitCode};
pub use run::{run, Outcome};
pub use state::{InvalidTransition, VmState};
