//! Terminal raw mode for the VMM's console: a guard that restores the terminal when dropped,
//! and from a panic hook. One terminal per process (the hook keeps the first one set).

use std::io;
use std::os::fd::BorrowedFd;
use std::sync::OnceLock;

use rustix::termios::{self, OptionalActions, OutputModes, Termios};

/// A terminal that could not be switched.
#[derive(Debug, thiserror::Error)]
pub enum TerminalError {
    #[error("cannot read the terminal's settings")]
    Get(#[source] io::Error),
    #[error("cannot put the terminal in raw mode")]
    Set(#[source] io::Error),
}

static ORIGINAL: OnceLock<(BorrowedFd<'static>, Termios)> = OnceLock::new();

/// Raw mode on a terminal for as long as the value lives (and across panics).
#[derive(Debug)]
pub struct RawMode {
    fd: BorrowedFd<'static>,
    original: Termios,
}

impl RawMode {
    /// Puts the terminal `fd` in raw mode until the value is dropped. Output post-processing
    /// stays on, so the VMM's own messages keep their line breaks.
    pub fn enable(fd: BorrowedFd<'static>) -> Result<Self, TerminalError> {
        let original = termios::tcgetattr(fd).map_err(|e| TerminalError::Get(e.into()))?;
        let mut raw = original.clone();
        raw.make_raw();
        raw.output_modes |= OutputModes::OPOST | OutputModes::ONLCR;
        termios::tcsetattr(fd, OptionalActions::Now, &raw)
            .map_err(|e| TerminalError::Set(e.into()))?;
        if ORIGINAL.set((fd, original.clone())).is_ok() {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                if let Some((fd, termios)) = ORIGINAL.get() {
                    let _ = termios::tcsetattr(fd, OptionalActions::Now, termios);
                }
                previous(info);
            }));
        }
        Ok(RawMode { fd, original })
    }
}

impl RawMode {
    /// Puts this process's standard input in raw mode (see [`RawMode::enable`]).
    pub fn stdin() -> Result<Self, TerminalError> {
        Self::enable(rustix::stdio::stdin())
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // Nothing to do about a failure on the way out: the terminal may be gone already.
        let _ = termios::tcsetattr(self.fd, OptionalActions::Now, &self.original);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn a_non_terminal_is_refused() {
        let file = std::fs::File::open("/dev/null").unwrap();
        let file: &'static std::fs::File = Box::leak(Box::new(file));
        let err = RawMode::enable(file.as_fd()).unwrap_err();
        assert!(matches!(err, TerminalError::Get(_)), "{err}");
    }

    #[test]
    fn raw_mode_is_set_and_restored_on_a_pseudo_terminal() {
        use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
        use rustix::termios::LocalModes;
        let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).unwrap();
        grantpt(&master).unwrap();
        unlockpt(&master).unwrap();
        let name = ptsname(&master, Vec::new()).unwrap();
        let path = std::path::PathBuf::from(std::ffi::OsStr::from_bytes(name.as_bytes()));
        let pts: &'static std::fs::File = Box::leak(Box::new(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .unwrap(),
        ));
        let canonical = |fd| {
            termios::tcgetattr(fd)
                .unwrap()
                .local_modes
                .contains(LocalModes::ICANON)
        };
        assert!(canonical(pts.as_fd()));
        let raw = RawMode::enable(pts.as_fd()).unwrap();
        assert!(!canonical(pts.as_fd()));
        let output = termios::tcgetattr(pts.as_fd()).unwrap().output_modes;
        assert!(output.contains(OutputModes::OPOST | OutputModes::ONLCR));
        drop(raw);
        assert!(canonical(pts.as_fd()));
    }
}
