//! Signals: termination requests (SIGINT, SIGTERM, SIGHUP) become readable events on a signalfd
//! for the control loop; a real-time signal kicks vCPU threads out of `KVM_RUN`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

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

fn termination_sigset() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned by this frame.
    unsafe { libc::sigemptyset(&mut set) };
    for sig in TERMINATION_SIGNALS {
        // SAFETY: as above; `sig` is a valid signal number.
        unsafe { libc::sigaddset(&mut set, sig) };
    }
    set
}

/// Spawns a thread that never receives termination signals, whatever the caller's mask: the
/// signals are blocked around the spawn so the child starts with them blocked.
pub fn spawn_without_termination_signals<F>(
    builder: std::thread::Builder,
    f: F,
) -> io::Result<std::thread::JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
{
    let set = termination_sigset();
    // SAFETY: plain data, filled by pthread_sigmask below.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` and `old` are valid sigsets.
    let ret = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old) };
    if ret != 0 {
        return Err(io::Error::from_raw_os_error(ret));
    }
    let spawned = builder.spawn(f);
    // SAFETY: `old` is the mask read above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    spawned
}

/// Termination signals, readable from a file descriptor.
#[derive(Debug)]
pub struct TerminationSignals {
    fd: OwnedFd,
}

impl TerminationSignals {
    /// Blocks the termination signals in the calling thread (threads it spawns later inherit
    /// the mask) and returns a signalfd that receives them instead.
    pub fn block() -> io::Result<Self> {
        let set = termination_sigset();
        // SAFETY: `set` is a valid sigset; a null old-set pointer is allowed.
        let ret = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if ret != 0 {
            return Err(io::Error::from_raw_os_error(ret));
        }
        // SAFETY: -1 asks for a new signalfd; `set` is valid; the result is checked below.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by signalfd and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(TerminationSignals { fd })
    }

    /// The next pending termination signal, if any.
    pub fn read(&self) -> io::Result<Option<libc::c_int>> {
        // SAFETY: signalfd_siginfo is plain data.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reads at most `size` bytes into `info`, which is exactly that large.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                size,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            return match err.kind() {
                io::ErrorKind::WouldBlock => Ok(None),
                _ => Err(err),
            };
        }
        Ok((n as usize == size).then_some(info.ssi_signo as libc::c_int))
    }
}

impl AsRawFd for TerminationSignals {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
