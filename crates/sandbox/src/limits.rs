//! Process resource limits of a VMM, set once its files are open: no core dumps (a VMM's core
//! holds the guest's memory) unless asked, a bound on open files, and a bound on how large a
//! file it writes may grow, with SIGXFSZ ignored so that a write past it fails (EFBIG, an I/O
//! error for the guest) instead of killing the VMM.
//!
//! Threading: call from the main thread before the other threads start; limits are the
//! process's.

use rustix::process::{setrlimit, Resource, Rlimit};

/// The limits to set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessLimits {
    /// Largest core dump in bytes (0: none).
    pub core_bytes: u64,
    /// Most descriptors open at once.
    pub open_files: u64,
    /// Largest size a file the process writes may reach, in bytes.
    pub file_bytes: u64,
}

/// Descriptors a VMM needs besides its devices' (its log, sockets, API connections, KVM).
const BASE_FILES: u64 = 1024;
/// Descriptors one device may hold at most: 64 queues (or queue pairs), each with TAP, queue
/// notification and interrupt descriptors, plus its image chain or control queue.
const FILES_PER_DEVICE: u64 = 64 * 8 + 64;
/// Room for files other than disk images (logs, rotated at a few MiB; the exit report).
const OTHER_FILE_BYTES: u64 = 1 << 30;

impl ProcessLimits {
    /// Limits for a VMM with `devices` virtio devices whose disk images are, each, `(bytes in
    /// the file now, virtual size)`. An image grows by at most its virtual size over a VMM's
    /// life (each cluster is copied away from a snapshot at most once, plus metadata); twice
    /// that is the margin.
    pub fn for_vmm(devices: u64, images: &[(u64, u64)], core_dumps: bool) -> Self {
        let largest = images
            .iter()
            .map(|&(now, size)| now.saturating_add(size.saturating_mul(2)))
            .max()
            .unwrap_or(0);
        ProcessLimits {
            core_bytes: if core_dumps { u64::MAX } else { 0 },
            open_files: BASE_FILES.saturating_add(devices.saturating_mul(FILES_PER_DEVICE)),
            file_bytes: largest.saturating_add(OTHER_FILE_BYTES),
        }
    }

    /// Sets them (soft and hard) for this process.
    pub fn apply(&self) -> std::io::Result<()> {
        let both = |value: u64| Rlimit {
            current: (value != u64::MAX).then_some(value),
            maximum: (value != u64::MAX).then_some(value),
        };
        setrlimit(Resource::Core, both(self.core_bytes))?;
        setrlimit(Resource::Nofile, both(self.open_files))?;
        setrlimit(Resource::Fsize, both(self.file_bytes))?;
        ignore_file_size_signal()
    }
}

fn ignore_file_size_signal() -> std::io::Result<()> {
    // SAFETY: setting SIGXFSZ's action to SIG_IGN installs no handler and touches no memory
    // of ours.
    let previous = unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    if previous == libc::SIG_ERR {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_grow_with_devices_and_images_and_cores_are_off_unless_asked() {
        let none = ProcessLimits::for_vmm(0, &[], false);
        assert_eq!(none.core_bytes, 0);
        assert_eq!(none.open_files, 1024);
        assert_eq!(none.file_bytes, 1 << 30);
        let two = ProcessLimits::for_vmm(2, &[(1 << 20, 10 << 30), (5 << 30, 1 << 30)], true);
        assert_eq!(two.core_bytes, u64::MAX);
        assert_eq!(two.open_files, 1024 + 2 * 576);
        assert_eq!(two.file_bytes, (1 << 20) + (20 << 30) + (1 << 30));
    }

    #[test]
    fn huge_images_do_not_overflow() {
        let limits = ProcessLimits::for_vmm(u64::MAX, &[(u64::MAX, u64::MAX)], false);
        assert_eq!(limits.file_bytes, u64::MAX);
        assert_eq!(limits.open_files, u64::MAX);
    }
}
