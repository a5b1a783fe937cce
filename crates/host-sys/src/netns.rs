//! Network namespaces: moving the calling thread (only it) into a new one or an existing one,
//! and a test harness that runs code in a throwaway namespace (tests only: built for this
//! crate's and, with the `test-util` feature, for other crates' tests).

use std::io;
use std::os::fd::AsFd;

use rustix::thread::{LinkNameSpaceType, UnshareFlags};

/// A namespace the thread could not move into.
#[derive(Debug, thiserror::Error)]
pub enum NamespaceError {
    #[error("cannot create a network namespace")]
    Unshare(#[source] io::Error),
    #[error("cannot enter the network namespace")]
    Enter(#[source] io::Error),
}

impl NamespaceError {
    /// Whether the failure was a lack of privilege (not root, or namespaces not allowed here).
    pub fn not_permitted(&self) -> bool {
        let (NamespaceError::Unshare(source) | NamespaceError::Enter(source)) = self;
        source.raw_os_error() == Some(libc::EPERM)
    }
}

/// Moves the calling thread alone into a new network namespace (unshare CLONE_NEWNET).
pub fn unshare_net() -> Result<(), NamespaceError> {
    // SAFETY: rustix marks unshare unsafe for CLONE_FILES, which splits the fd table under
    // other threads; CLONE_NEWNET only changes which network stack this thread sees.
    unsafe { rustix::thread::unshare_unsafe(UnshareFlags::NEWNET) }
        .map_err(|e| NamespaceError::Unshare(e.into()))
}

/// Moves the calling thread into the network namespace `namespace` (an open
/// `/proc/PID/ns/net`).
pub fn enter_net(namespace: impl AsFd) -> Result<(), NamespaceError> {
    rustix::thread::move_into_link_name_space(namespace.as_fd(), Some(LinkNameSpaceType::Network))
        .map_err(|e| NamespaceError::Enter(e.into()))
}

/// Runs `body` on a thread of its own in a new network namespace, so the interfaces it makes
/// vanish with it and the host's stay untouched; for tests. Skipped, with a message, where
/// that is not allowed (not root) or there is no /dev/net/tun; panics on any other failure.
#[cfg(any(test, feature = "test-util"))]
pub fn in_new_netns(body: impl FnOnce() + Send + 'static) {
    let thread = std::thread::spawn(move || {
        if let Err(e) = unshare_net() {
            if e.not_permitted() {
                eprintln!(
                    "skipped: {e} ({})",
                    io::Error::from_raw_os_error(libc::EPERM)
                );
                return;
            }
            panic!("{e}: {:?}", std::error::Error::source(&e));
        }
        if !std::path::Path::new("/dev/net/tun").exists() {
            eprintln!("skipped: no /dev/net/tun here");
            return;
        }
        body();
    });
    if let Err(panic) = thread.join() {
        std::panic::resume_unwind(panic);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_namespace_has_only_loopback_and_the_old_one_can_be_entered_again() {
        use std::os::unix::fs::MetadataExt;
        let here = || std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino();
        let host = std::fs::File::open("/proc/thread-self/ns/net").unwrap();
        let host_ino = here();
        in_new_netns(move || {
            assert_ne!(here(), host_ino);
            let dev = std::fs::read_to_string("/proc/thread-self/net/dev").unwrap();
            assert_eq!(dev.lines().skip(2).count(), 1, "only lo: {dev}");
            enter_net(&host).unwrap();
            assert_eq!(here(), host_ino);
        });
    }
}
