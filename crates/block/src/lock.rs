//! Image locks: open file description locks (F_OFD_SETLK), which belong to the open file and
//! are released when it is closed, as QEMU uses them.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// Locks all of `file`: exclusively for writers, shared for readers. Returns false when another
/// open file holds a conflicting lock.
pub fn lock(file: &File, exclusive: bool) -> io::Result<bool> {
    let flock = libc::flock {
        l_type: if exclusive {
            libc::F_WRLCK
        } else {
            libc::F_RDLCK
        } as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0, // the whole file, however large it grows
        l_pid: 0,
    };
    // SAFETY: F_OFD_SETLK reads a valid, initialised flock; the fd is open for the call.
    let ret = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &flock) };
    if ret == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => Ok(false),
        _ => Err(err),
    }
}
