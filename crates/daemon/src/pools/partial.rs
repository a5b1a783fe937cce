//! Volumes in the making (full clones, uploads): written to a hidden file in the pool's
//! directory and put in place by a rename only once complete (an upload: and on stable
//! storage; a clone's durability is `write_back`'s), so a daemon killed halfway never leaves
//! a half-copied volume under a user's name. The hidden name carries the daemon process's
//! instance (its pid and a random number: a daemon restarted in a container often gets its
//! predecessor's pid); files of another instance are leftovers of a daemon that died,
//! removed when the pool is next activated.
//!
//! Volume names start with a letter or digit, so these files are never listed as volumes.
//!
//! Threading: plain file system calls on the caller's (blocking) thread.

use std::io;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

const SUFFIX: &str = ".part";

/// Tells apart the partial files of concurrent operations on the same volume name.
static SEQUENCE: AtomicU64 = AtomicU64::new(0);

/// This process among all daemons that ever used the pool: `PIDxRANDOM`.
pub fn instance() -> &'static str {
    static INSTANCE: OnceLock<String> = OnceLock::new();
    INSTANCE.get_or_init(|| {
        let mut random = [0u8; 8];
        let from_kernel = std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut random))
            .is_ok();
        if !from_kernel {
            // Distinct enough: another process started at another moment.
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            random = (now.as_nanos() as u64).to_le_bytes();
        }
        format!("{}x{:016x}", std::process::id(), u64::from_le_bytes(random))
    })
}

/// A fresh hidden path in `dir` for `purpose` (e.g. "clone") of volume `name`.
pub fn path(dir: &Path, name: &str, purpose: &str) -> PathBuf {
    let sequence = SEQUENCE.fetch_add(1, Ordering::Relaxed);
    dir.join(format!(
        ".{name}.{purpose}-{}-{sequence}{SUFFIX}",
        instance()
    ))
}

/// The instance a partial file name carries, or None when `file_name` is not one.
fn owner(file_name: &str) -> Option<&str> {
    let stem = file_name.strip_prefix('.')?.strip_suffix(SUFFIX)?;
    let (rest, sequence) = stem.rsplit_once('-')?;
    sequence.parse::<u64>().ok()?;
    let (_, instance) = rest.rsplit_once('-')?;
    let pid = instance.split_once('x').map_or(instance, |(pid, _)| pid);
    pid.parse::<u32>().ok().map(|_| instance)
}

/// Removes the partial files in `dir` left by other (dead) daemon processes; returns how many.
/// Those of this process belong to operations still running and stay.
pub fn remove_stale(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(owner) = name.to_str().and_then(owner) else {
            continue;
        };
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        if owner != instance() && is_file && std::fs::remove_file(entry.path()).is_ok() {
            tracing::info!(
                "removed {}, left by an interrupted operation",
                entry.path().display()
            );
            removed += 1;
        }
    }
    removed
}

/// Puts the complete file `partial` in place as `target`, which must not exist (an existing
/// file gives AlreadyExists and is left alone). The new name is not yet durable: the caller's
/// `write_back` marker settles it.
pub fn publish_new(partial: &Path, target: &Path) -> io::Result<()> {
    rename_no_replace(partial, target)
}

/// Puts the complete file `partial` in place of `target` and makes the change durable.
pub fn publish_over(partial: &Path, target: &Path) -> io::Result<()> {
    std::fs::rename(partial, target)?;
    crate::fs::sync_parent(target)
}

fn rename_no_replace(from: &Path, to: &Path) -> io::Result<()> {
    host_sys::file::rename_no_replace(from, to)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_hidden_unique_and_carry_the_instance() {
        let dir = Path::new("/pool");
        let (a, b) = (path(dir, "v.raw", "clone"), path(dir, "v.raw", "clone"));
        assert_ne!(a, b);
        let name = a.file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with(".v.raw.clone-"), "{name}");
        assert_eq!(owner(name), Some(instance()));
        let pid = std::process::id().to_string();
        assert!(instance().starts_with(&format!("{pid}x")));
        assert_eq!(owner("disk.raw"), None);
        assert_eq!(owner(".disk.raw.upload"), None);
        assert_eq!(owner(".x.clone-abc-1.part"), None);
        assert_eq!(
            owner(".x.clone-12-1.part"),
            Some("12"),
            "names before the instance"
        );
    }

    #[test]
    fn only_other_processes_leftovers_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let ours = path(dir.path(), "a.raw", "clone");
        let stale = dir.path().join(".a.raw.clone-4194305-0.part");
        // What a predecessor with this very pid left.
        let same_pid = dir.path().join(format!(
            ".a.raw.clone-{}x0123456789abcdef-0.part",
            std::process::id()
        ));
        let volume = dir.path().join("a.raw");
        let other_hidden = dir.path().join(".keep");
        for file in [&ours, &stale, &same_pid, &volume, &other_hidden] {
            std::fs::write(file, b"x").unwrap();
        }
        assert_eq!(remove_stale(dir.path()), 2);
        assert!(!stale.exists() && !same_pid.exists());
        assert!(ours.exists() && volume.exists() && other_hidden.exists());
        assert_eq!(remove_stale(Path::new("/nonexistent/pool")), 0);
    }

    #[test]
    fn publish_new_never_replaces_a_volume() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("v.raw");
        let first = path(dir.path(), "v.raw", "clone");
        std::fs::write(&first, b"first").unwrap();
        publish_new(&first, &target).unwrap();
        assert!(!first.exists());

        let second = path(dir.path(), "v.raw", "clone");
        std::fs::write(&second, b"second").unwrap();
        let err = publish_new(&second, &target).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&target).unwrap(), b"first");
        assert!(second.exists(), "the caller removes its own partial file");

        publish_over(&second, &target).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"second");
    }
}
