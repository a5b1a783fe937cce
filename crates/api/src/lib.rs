//! Types shared by the VMM, the daemon and the CLI: what a VM is made of, its lifecycle, the
//! bodies of the control APIs, definition files, and how sizes are written. Plain data with
//! serde; no I/O, no threads.

// No unsafe code here: host calls belong in host-sys, KVM calls in hypervisor.
#![forbid(unsafe_code)]

pub mod daemon_api;
pub mod definition_file;
pub mod diagnostics;
pub mod diagnostics_text;
pub mod disk;
pub mod image;
pub mod names;
pub mod net;
pub mod net_api;
pub mod options;
pub mod pool_api;
pub mod rng;
pub mod size;
pub mod state;
pub mod tap_names;
pub mod vm_config;
pub mod vm_definition;
pub mod vmm_api;

pub use disk::{DiskConfig, DiskSource};
pub use net::{MacAddress, NetConfig, NicAttachment};
pub use rng::RngOptions;
pub use size::{ByteSize, ParseSizeError};
pub use state::{InvalidTransition, VmState};
pub use vm_config::{
    ConfigError, ConsoleKind, RunnableConfig, VmConfig, DEFAULT_CMDLINE, DEFAULT_CPUS,
    DEFAULT_MEMORY,
};

/// An error and its sources on one line (`outer: inner: root cause`), for the one-line
/// messages every Ferro command and API prints.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
