//! Signals: termination requests (SIGINT, SIGTERM, SIGHUP) become readable events on a signalfd
//! for the control loop; a real-time signal kicks vCPU threads out of `KVM_RUN`.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use host_sys::signal::SignalFd;

use sandbox::ThreadKind;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

/// Signals that ask the VMM to stop the VM and exit.
const TERMINATION_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// The signal that interrupts `KVM_RUN` on a vCPU thread.
pub fn vcpu_kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn ignore_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) handler for the kick signal. Its only effect is to make `KVM_RUN`
/// return with EINTR on the thread that receives it.
pub fn install_vcpu_kick_handler() -> io::Result<()> {
    register_signal_handler(vcpu_kick_signal(), ignore_kick)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))
}

/// Starts the thread that starts all others (see [`sandbox::start_spawner`]), if not yet
/// started; the main thread must do so before it is confined.
pub fn start_spawner() -> io::Result<()> {
    sandbox::start_spawner(&TERMINATION_SIGNALS)
}

/// Starts a thread of `kind` named `name`, confined before it runs, through the spawner
/// (started here the first time), which never receives termination signals and so neither do
/// its children: the main thread alone handles them.
pub fn spawn_thread<F>(
    kind: ThreadKind,
    name: &str,
    f: F,
) -> io::Result<std::thread::JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
{
    start_spawner()?;
    sandbox::spawn(kind, name, f)
}

/// Termination signals, readable from a file descriptor.
#[derive(Debug)]
pub struct TerminationSignals {
    fd: SignalFd,
}

impl TerminationSignals {
    /// Blocks the termination signals in the calling thread (threads it spawns later inherit
    /// the mask) and returns a signalfd that receives them instead.
    pub fn block() -> io::Result<Self> {
        let fd = SignalFd::block(&TERMINATION_SIGNALS).map_err(io::Error::other)?;
        Ok(TerminationSignals { fd })
    }

    /// The next pending termination signal, if any.
    pub fn read(&self) -> io::Result<Option<libc::c_int>> {
        self.fd.read().map_err(io::Error::other)
    }
}

impl AsRawFd for TerminationSignals {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
