//! Child processes: a pidfd to wait on, and reaping without blocking. Any thread.

use std::io;
use std::os::fd::OwnedFd;

use rustix::process::{Pid, PidfdFlags, WaitOptions};

/// A process call that failed.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("{0} is no process id")]
    BadPid(u32),
    #[error("cannot open a pidfd for process {pid}")]
    Pidfd {
        pid: u32,
        #[source]
        source: io::Error,
    },
}

fn pid(raw: u32) -> Result<Pid, ProcessError> {
    i32::try_from(raw)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or(ProcessError::BadPid(raw))
}

/// A pidfd for process `raw`: readable once the process has ended.
pub fn pidfd(raw: u32) -> Result<OwnedFd, ProcessError> {
    rustix::process::pidfd_open(pid(raw)?, PidfdFlags::empty()).map_err(|e| ProcessError::Pidfd {
        pid: raw,
        source: e.into(),
    })
}

/// How child `raw` ended, reaping it: its exit code, or 128 + the signal that killed it.
/// None while it runs, or when it is no child of this process.
pub fn reap(raw: u32) -> Option<i32> {
    let (_, status) =
        rustix::process::waitpid(Some(pid(raw).ok()?), WaitOptions::NOHANG).ok()??;
    status
        .exit_status()
        .or_else(|| status.terminating_signal().map(|signal| 128 + signal))
}

#[cfg(test)]
mod tests {
    use super::*;

    // The children are reaped by `reap`, which is what is under test.
    #[allow(clippy::zombie_processes)]
    #[test]
    fn a_child_is_reaped_with_its_exit_code_or_signal() {
        let child = std::process::Command::new("sh")
            .args(["-c", "exit 7"])
            .spawn()
            .unwrap();
        let fd = pidfd(child.id()).unwrap();
        let mut poll = [rustix::event::PollFd::new(
            &fd,
            rustix::event::PollFlags::IN,
        )];
        rustix::event::poll(&mut poll, None).unwrap();
        assert_eq!(reap(child.id()), Some(7));
        assert_eq!(reap(child.id()), None, "reaped once only");

        let child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        assert_eq!(reap(child.id()), None, "still running");
        crate::signal::kill(child.id(), libc::SIGKILL).unwrap();
        let fd = pidfd(child.id()).unwrap();
        let mut poll = [rustix::event::PollFd::new(
            &fd,
            rustix::event::PollFlags::IN,
        )];
        rustix::event::poll(&mut poll, None).unwrap();
        assert_eq!(reap(child.id()), Some(128 + libc::SIGKILL));
    }

    #[test]
    fn a_pid_out_of_range_is_refused() {
        assert!(matches!(pidfd(0), Err(ProcessError::BadPid(0))));
        assert!(matches!(pidfd(u32::MAX), Err(ProcessError::BadPid(_))));
        assert_eq!(reap(0), None);
    }
}
