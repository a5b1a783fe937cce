//! Signals: per-thread masks (a thread spawned with signals blocked, or the caller blocking
//! them for good), a signalfd that reads blocked signals as events, and sending a signal.
//! Masks are per thread; a [`SignalFd`] may be read from any thread.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use vmm_sys_util::signal::create_sigset;

/// A signal call that failed.
#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    #[error("invalid signal set {0:?}")]
    Set(Vec<i32>, #[source] io::Error),
    #[error("cannot change the thread's signal mask")]
    Mask(#[source] io::Error),
    #[error("cannot create a signalfd")]
    Fd(#[source] io::Error),
    #[error("cannot read the signalfd")]
    Read(#[source] io::Error),
    #[error("cannot send signal {signal} to process {pid}")]
    Kill {
        pid: u32,
        signal: i32,
        #[source]
        source: io::Error,
    },
}

fn sigset(signals: &[i32]) -> Result<libc::sigset_t, SignalError> {
    create_sigset(signals)
        .map_err(|e| SignalError::Set(signals.to_vec(), io::Error::from_raw_os_error(e.errno())))
}

/// pthread_sigmask(`how`, `set`), returning the mask before.
fn change_mask(how: libc::c_int, set: &libc::sigset_t) -> Result<libc::sigset_t, SignalError> {
    // SAFETY: sigset_t is plain data; pthread_sigmask fills it below before it is read.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` and `old` are valid sigsets living across the call.
    let ret = unsafe { libc::pthread_sigmask(how, set, &mut old) };
    if ret != 0 {
        return Err(SignalError::Mask(io::Error::from_raw_os_error(ret)));
    }
    Ok(old)
}

/// Spawns a thread that starts with `signals` blocked, whatever happens to the caller's mask
/// later: they are blocked around the spawn, and the caller's mask is put back after.
pub fn spawn_with_blocked<F, T>(
    signals: &[i32],
    builder: std::thread::Builder,
    f: F,
) -> Result<io::Result<std::thread::JoinHandle<T>>, SignalError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let old = change_mask(libc::SIG_BLOCK, &sigset(signals)?)?;
    let spawned = builder.spawn(f);
    change_mask(libc::SIG_SETMASK, &old)?;
    Ok(spawned)
}

/// Blocked signals, read as events from a file descriptor.
#[derive(Debug)]
pub struct SignalFd {
    fd: OwnedFd,
}

impl SignalFd {
    /// Blocks `signals` in the calling thread (threads it spawns later inherit the mask) and
    /// returns a non-blocking signalfd that receives them instead.
    pub fn block(signals: &[i32]) -> Result<Self, SignalError> {
        let set = sigset(signals)?;
        change_mask(libc::SIG_BLOCK, &set)?;
        // SAFETY: -1 asks for a new signalfd; `set` is a valid sigset; the result is checked.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(SignalError::Fd(io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by signalfd and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(SignalFd { fd })
    }

    /// The next pending signal's number, if any.
    pub fn read(&self) -> Result<Option<i32>, SignalError> {
        let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
        match rustix::io::read(&self.fd, &mut info) {
            // ssi_signo, a u32, opens the record.
            Ok(n) if n == info.len() => {
                Ok(Some(
                    u32::from_ne_bytes([info[0], info[1], info[2], info[3]]) as i32,
                ))
            }
            Ok(_) => Ok(None),
            Err(rustix::io::Errno::AGAIN) => Ok(None),
            Err(e) => Err(SignalError::Read(e.into())),
        }
    }
}

impl AsFd for SignalFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for SignalFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Sends `signal` to process `pid`.
pub fn kill(pid: u32, signal: i32) -> Result<(), SignalError> {
    let err = |source| SignalError::Kill {
        pid,
        signal,
        source,
    };
    let raw = libc::pid_t::try_from(pid)
        .ok()
        .filter(|&p| p > 0)
        .ok_or_else(|| err(io::Error::from_raw_os_error(libc::ESRCH)))?;
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    if unsafe { libc::kill(raw, signal) } < 0 {
        return Err(err(io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blocked_signal_is_read_from_the_fd() {
        // On a thread of its own: the mask stays with it.
        std::thread::spawn(|| {
            let fd = SignalFd::block(&[libc::SIGUSR1]).unwrap();
            assert_eq!(fd.read().unwrap(), None);
            // SAFETY: a directed signal to this thread, which has SIGUSR1 blocked.
            assert_eq!(unsafe { libc::raise(libc::SIGUSR1) }, 0);
            assert_eq!(fd.read().unwrap(), Some(libc::SIGUSR1));
            assert_eq!(fd.read().unwrap(), None);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_thread_spawned_with_blocked_signals_has_them_blocked() {
        let blocked = spawn_with_blocked(&[libc::SIGUSR2], std::thread::Builder::new(), || {
            vmm_sys_util::signal::get_blocked_signals().unwrap()
        })
        .unwrap()
        .unwrap()
        .join()
        .unwrap();
        assert!(blocked.contains(&libc::SIGUSR2), "{blocked:?}");
        let here = vmm_sys_util::signal::get_blocked_signals().unwrap();
        assert!(
            !here.contains(&libc::SIGUSR2),
            "the caller's mask is back: {here:?}"
        );
    }

    #[test]
    fn kill_reaches_a_child_and_names_a_missing_one() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        kill(child.id(), libc::SIGKILL).unwrap();
        assert!(!child.wait().unwrap().success());
        let err = kill(0, libc::SIGTERM).unwrap_err();
        assert!(err.to_string().contains("process 0"), "{err}");
    }
}
