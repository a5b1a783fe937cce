//! Errors of the VMM and the process exit codes they map to.

use std::path::PathBuf;

/// Exit codes of `ferro run` (documented in its `--help`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitCode {
    /// The guest powered off (or reset with `--no-reboot`), or the user quit from the console.
    Success = 0,
    /// A failure of the VMM itself or of the host while the VM was set up or running.
    VmmError = 1,
    /// The command line or configuration is invalid.
    Usage = 2,
    /// The kernel, initramfs or a disk image is missing, unreadable or unusable.
    BootImage = 3,
    /// `/dev/kvm` is missing, not accessible, or lacks a capability Ferro needs.
    KvmUnavailable = 4,
    /// The guest triple-faulted.
    GuestTripleFault = 5,
    /// KVM could not run the guest (internal error, entry failure, unexpected exit).
    GuestKvmError = 6,
}

/// Everything that can stop a VM other than the guest itself.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] api::ConfigError),
    #[error("{requested} vCPUs requested; this host's KVM supports at most {max}")]
    TooManyCpusForHost { requested: u32, max: usize },
    #[error("{requested} of memory requested; the host has only {host}")]
    MemoryTooLarge {
        requested: api::ByteSize,
        host: api::ByteSize,
    },
    #[error("{size} of memory cannot be laid out in the guest's address space")]
    MemoryLayout {
        size: api::ByteSize,
        #[source]
        source: arch::layout::LayoutError,
    },
    #[error("cannot open the kernel {}", path.display())]
    OpenKernel {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the initramfs {}", path.display())]
    OpenInitrd {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot boot {}", path.display())]
    Boot {
        path: PathBuf,
        #[source]
        source: arch::boot::BootError,
    },
    #[error("cannot use disk {}", path.display())]
    Disk {
        path: PathBuf,
        #[source]
        source: block::OpenError,
    },
    #[error("cannot set up network interface {tap}")]
    Net {
        tap: String,
        #[source]
        source: virtio::net::tap::TapError,
    },
    #[error("cannot make the network device on {tap}")]
    NetDevice {
        tap: String,
        #[source]
        source: virtio::net::NetError,
    },
    #[error("KVM is not usable")]
    Kvm(#[source] hypervisor::Error),
    #[error("cannot serve the control API")]
    ApiSocket(#[from] crate::api_server::ApiSocketError),
    #[error("cannot set up the VM")]
    Hypervisor(#[from] hypervisor::Error),
    #[error("cannot allocate {size} of guest memory")]
    GuestMemory {
        size: api::ByteSize,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("cannot write the ACPI tables")]
    Acpi(#[from] arch::acpi::AcpiError),
    #[error("cannot set up the devices")]
    Devices(#[source] std::io::Error),
    #[error("cannot place a device on its bus")]
    Bus(#[from] devices::bus::BusError),
    #[error("cannot start vCPU thread {id}")]
    SpawnVcpu {
        id: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("the console failed")]
    Console(#[source] std::io::Error),
    #[error("the VMM's control loop failed")]
    ControlLoop(#[source] std::io::Error),
    #[error("cannot set the VMM's resource limits")]
    Limits(#[source] std::io::Error),
    #[error("cannot confine the VMM's threads (see --seccomp)")]
    Confine(#[source] sandbox::Error),
    #[error("vCPU {id}: the guest triple-faulted (KVM_EXIT_SHUTDOWN)")]
    TripleFault { id: u32, registers: String },
    #[error("vCPU {id}: KVM internal error (KVM_EXIT_INTERNAL_ERROR, suberror {suberror})")]
    InternalError {
        id: u32,
        suberror: u32,
        registers: String,
    },
    #[error("vCPU {id}: KVM could not enter the guest (KVM_EXIT_FAIL_ENTRY, reason {reason:#x})")]
    FailEntry {
        id: u32,
        reason: u64,
        registers: String,
    },
    #[error("vCPU {id}: unexpected exit {exit}")]
    UnexpectedExit {
        id: u32,
        exit: String,
        registers: String,
    },
    #[error("vCPU {id}: the guest reported a crash (KVM_SYSTEM_EVENT_CRASH)")]
    GuestCrashEvent { id: u32, registers: String },
    #[error("vCPU {id} stopped")]
    VcpuRun {
        id: u32,
        #[source]
        source: hypervisor::Error,
    },
}

impl Error {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> ExitCode {
        use arch::boot::BootError;
        match self {
            Error::Config(_)
            | Error::TooManyCpusForHost { .. }
            | Error::MemoryTooLarge { .. }
            | Error::MemoryLayout { .. } => ExitCode::Usage,
            Error::Boot {
                source: BootError::CmdlineTooLong { .. } | BootError::CmdlineNul,
                ..
            } => ExitCode::Usage,
            Error::OpenKernel { .. }
            | Error::OpenInitrd { .. }
            | Error::Boot { .. }
            | Error::Disk { .. } => ExitCode::BootImage,
            Error::Kvm(_) => ExitCode::KvmUnavailable,
            Error::TripleFault { .. } => ExitCode::GuestTripleFault,
            Error::InternalError { .. }
            | Error::FailEntry { .. }
            | Error::UnexpectedExit { .. }
            | Error::GuestCrashEvent { .. } => ExitCode::GuestKvmError,
            _ => ExitCode::VmmError,
        }
    }

    /// The register dump of the vCPU that stopped the guest, if this is a guest failure.
    pub fn guest_registers(&self) -> Option<&str> {
        match self {
            Error::TripleFault { registers, .. }
            | Error::InternalError { registers, .. }
            | Error::FailEntry { registers, .. }
            | Error::UnexpectedExit { registers, .. }
            | Error::GuestCrashEvent { registers, .. } => Some(registers),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_by_category() {
        assert_eq!(
            Error::Config(api::ConfigError::NoCpus).exit_code(),
            ExitCode::Usage
        );
        let open = Error::OpenKernel {
            path: "/x".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOENT),
        };
        assert_eq!(open.exit_code(), ExitCode::BootImage);
        let not_kernel = Error::Boot {
            path: "/x".into(),
            source: arch::boot::BootError::NotAKernel,
        };
        assert_eq!(not_kernel.exit_code(), ExitCode::BootImage);
        let cmdline = Error::Boot {
            path: "/x".into(),
            source: arch::boot::BootError::CmdlineTooLong {
                len: 5000,
                max: 2047,
            },
        };
        assert_eq!(cmdline.exit_code(), ExitCode::Usage);
        let size = arch::layout::MAX_RAM_SIZE + 4096;
        let huge = Error::MemoryLayout {
            size: api::ByteSize(size),
            source: arch::layout::MemoryLayout::new(size).unwrap_err(),
        };
        assert_eq!(huge.exit_code(), ExitCode::Usage);
        let kvm = Error::Kvm(hypervisor::Error::MissingCapability("x"));
        assert_eq!(kvm.exit_code(), ExitCode::KvmUnavailable);
        let crash = Error::TripleFault {
            id: 0,
            registers: "rip=0".into(),
        };
        assert_eq!(crash.exit_code(), ExitCode::GuestTripleFault);
        assert_eq!(crash.guest_registers(), Some("rip=0"));
        let internal = Error::InternalError {
            id: 1,
            suberror: 1,
            registers: String::new(),
        };
        assert_eq!(internal.exit_code(), ExitCode::GuestKvmError);
    }
}
