//! The Ferro VMM: assembles a PC from a [`api::VmConfig`], runs it on KVM and reports how it
//! ended.
//!
//! Threads: the caller's thread runs the control loop ([`run`], `control`): it waits on the
//! guest's power events, failing vCPUs, console input, termination signals and control-API
//! requests, and owns the VM's state machine ([`VmState`]). Each vCPU runs `KVM_RUN` on its own
//! thread and calls the devices directly on port I/O and MMIO exits. A console thread reads
//! standard input; the API server (`api_server`) has an acceptor thread and one thread per
//! connection. A guest reset tears the whole machine down and builds it again from the same
//! configuration, as a cold boot would; counters and the API socket live across resets.

mod api_server;
mod console;
mod console_hub;
mod control;
mod diagnostics;
mod error;
mod exit_window;
mod faults;
mod interrupts;
mod machine;
mod memory;
mod pci_devices;
mod run;
mod signals;
mod stats;
mod vcpu;
mod vcpu_probe;

pub use api::{InvalidTransition, VmState};
pub use api_server::ApiSocketError;
pub use console::{Console, RawMode, ESCAPE_HELP};
pub use console_hub::{ConsoleHub, ConsoleHubConfig};
pub use error::{Error, ExitCode};
pub use faults::Faults;
pub use run::{run, Outcome};
