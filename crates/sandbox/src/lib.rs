//! Confinement of the VMM's threads with seccomp: each thread kind ([`ThreadKind`]) has its own
//! list of allowed system calls (some only with given arguments, e.g. the ioctl numbers a vCPU
//! needs), installed on that thread before it handles anything the guest wrote.
//!
//! The process chooses once, before its first filter, what a call outside the list does
//! ([`SeccompMode`]): `kill` reports the call and the thread kind, then the process dies of
//! SIGSYS (`violation`); `log` lets it through and the kernel logs it (audit type 1326);
//! `off` installs nothing. Threads started after setup go through the spawner (`spawner`),
//! whose filter is the union of the others', because a thread inherits its creator's filter.
//!
//! Threads: the spawner thread; everything else runs on its caller's thread.

mod allowed;
mod ioctls;
mod kinds;
mod limits;
mod spawner;
mod syscall_names;
mod violation;

use std::sync::OnceLock;

use seccompiler::{BpfProgram, SeccompAction};

pub use allowed::Allowed;
pub use kinds::ThreadKind;
pub use limits::ProcessLimits;
pub use spawner::{spawn, start_spawner};
pub use violation::report_to;

/// What a system call outside a thread's list does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeccompMode {
    /// Report it and kill the VMM with SIGSYS.
    #[default]
    Kill,
    /// Allow it and have the kernel log it (for finding what a list lacks).
    Log,
    /// No filters.
    Off,
}

/// Errors building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bad seccomp rule")]
    Rule(#[source] seccompiler::BackendError),
    #[error("cannot compile the seccomp filter")]
    Compile(#[source] seccompiler::BackendError),
    #[error("cannot install the seccomp filter of the {kind} thread")]
    Install {
        kind: &'static str,
        #[source]
        source: seccompiler::Error,
    },
    #[error("cannot install the SIGSYS handler that reports seccomp violations")]
    Handler(#[source] std::io::Error),
    #[error("the seccomp mode was already chosen ({0:?})")]
    ModeChosen(SeccompMode),
}

static MODE: OnceLock<SeccompMode> = OnceLock::new();

/// Chooses the process's mode, once, before any thread is confined; under `kill`, installs the
/// handler that reports violations. Without this call, confining does nothing (`off`).
pub fn set_mode(mode: SeccompMode) -> Result<(), Error> {
    if let Some(&chosen) = MODE.get() {
        return if chosen == mode {
            Ok(())
        } else {
            Err(Error::ModeChosen(chosen))
        };
    }
    if mode == SeccompMode::Kill {
        violation::install_handler().map_err(Error::Handler)?;
    }
    let _ = MODE.set(mode);
    Ok(())
}

/// The process's mode (`off` until [`set_mode`]).
pub fn mode() -> SeccompMode {
    MODE.get().copied().unwrap_or(SeccompMode::Off)
}

/// The filter of `kind` in this process, under `mode` (empty for `off`).
pub fn filter(kind: ThreadKind, mode: SeccompMode) -> Result<BpfProgram, Error> {
    let otherwise = match mode {
        SeccompMode::Kill => SeccompAction::Trap,
        SeccompMode::Log => SeccompAction::Log,
        SeccompMode::Off => return Ok(BpfProgram::new()),
    };
    kind.allowed(std::process::id())?.program(otherwise)
}

/// Each kind's filter under the process's mode, compiled the first time a thread of that kind
/// is confined (the mode never changes once set): the I/O pool starts threads again and again.
static COMPILED: [OnceLock<BpfProgram>; ThreadKind::ALL.len()] =
    [const { OnceLock::new() }; ThreadKind::ALL.len()];

fn compiled(kind: ThreadKind, mode: SeccompMode) -> Result<&'static BpfProgram, Error> {
    let slot = &COMPILED[kind as usize];
    if let Some(program) = slot.get() {
        return Ok(program);
    }
    let program = filter(kind, mode)?;
    Ok(slot.get_or_init(|| program))
}

/// Confines the calling thread as `kind` under the process's mode; it stays so until it ends,
/// and threads it creates inherit the filter. Also sets `no_new_privs`, which seccomp needs.
pub fn confine_current_thread(kind: ThreadKind) -> Result<(), Error> {
    let mode = mode();
    if mode == SeccompMode::Off {
        return Ok(());
    }
    let install = |program: &BpfProgram| {
        seccompiler::apply_filter(program).map_err(|source| Error::Install {
            kind: kind.name(),
            source,
        })
    };
    if kind == ThreadKind::Spawner {
        install(&clone3_unsupported()?)?;
    }
    install(compiled(kind, mode)?)?;
    violation::set_current_kind(kind);
    Ok(())
}

/// Test aid (`ferro run --fault forbidden-syscall`): makes a system call no thread kind
/// allows, `socket`, and closes what it made if it was let through.
pub fn make_forbidden_call() {
    // SAFETY: socket takes no pointers; a descriptor it returns is ours and closed at once.
    unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
        if fd >= 0 {
            libc::close(fd);
        }
    }
}

/// A filter that answers `clone3` with ENOSYS and allows the rest, so the C library falls back
/// to `clone`, whose flags the spawner's filter can check (ERRNO outranks the other filter's
/// ALLOW).
fn clone3_unsupported() -> Result<BpfProgram, Error> {
    let mut rules = std::collections::BTreeMap::new();
    rules.insert(libc::SYS_clone3, Vec::new());
    seccompiler::SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        seccompiler::TargetArch::x86_64,
    )
    .map_err(Error::Rule)?
    .try_into()
    .map_err(Error::Compile)
}

#[cfg(test)]
mod tests;
