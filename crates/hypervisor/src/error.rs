//! Errors of the hypervisor layer.

/// Everything that can go wrong while talking to KVM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `/dev/kvm` could not be opened (missing module, no permission).
    #[error("cannot open {path}")]
    Open {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The kernel speaks a KVM API this crate does not know.
    #[error("KVM API version {0} is not supported (Ferro needs version 12)")]
    ApiVersion(i32),
    /// A capability Ferro relies on is missing from the host's KVM.
    #[error("the host's KVM lacks the {0} capability")]
    MissingCapability(&'static str),
    /// An ioctl failed; `op` names it.
    #[error("KVM {op} failed")]
    Ioctl {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The caller asked for something KVM cannot do (bad slot, too many vCPUs...).
    #[error("{0}")]
    Invalid(String),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Wraps a failed ioctl into [`Error::Ioctl`].
pub(crate) fn ioctl_err(op: &'static str) -> impl FnOnce(vmm_sys_util::errno::Error) -> Error {
    move |e| Error::Ioctl {
        op,
        source: std::io::Error::from_raw_os_error(e.errno()),
    }
}
