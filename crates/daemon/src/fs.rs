//! Durable file changes, the one place the daemon writes a file it relies on: a whole file
//! replaced atomically (written to `NAME.tmp` beside it, synced, renamed into place, the
//! directory synced), so a crash or a full disk leaves the previous version, never half a
//! file; a new file made durably; and the directory syncs that make a rename or removal
//! survive a crash. A temporary file is always created afresh (exclusively, after removing
//! what a crash left there), so nothing planted at its name, such as a symbolic link in a
//! pool directory, is ever followed.
//!
//! Threading: plain blocking calls, safe from any thread; writers of one file take turns
//! (they share its temporary name), writers of different files do not wait for each other.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, PoisonError};

/// A file that could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot write {}", path.display())]
pub struct WriteError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// A state directory that cannot be made or used.
#[derive(Debug, thiserror::Error)]
#[error("cannot use the state directory {}", path.display())]
pub struct DirError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// Makes `dir` (and its parents) unless it exists.
pub fn create_dir(dir: &Path) -> Result<(), DirError> {
    fs::create_dir_all(dir).map_err(|source| DirError {
        path: dir.to_path_buf(),
        source,
    })
}

/// What a file is made with unless it says otherwise: std's default, less the umask.
const DEFAULT_MODE: u32 = 0o666;

/// Replaces `path` with `bytes` so that readers see the old or the new file, never a mix,
/// and the new one survives a crash once this returns.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), WriteError> {
    write_atomic_with_mode(path, bytes, DEFAULT_MODE)
}

/// [`write_atomic`] with permission bits `mode` (less the umask), whatever the old file had.
/// The new file has them from its creation, so a private one is never readable by others,
/// not even half written.
pub fn write_atomic_with_mode(path: &Path, bytes: &[u8], mode: u32) -> Result<(), WriteError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let _turn = Turn::take(&tmp);
    let result = remove_leftover(&tmp)
        .and_then(|()| write_new(&tmp, bytes, mode))
        .and_then(|()| {
            fs::rename(&tmp, path)?;
            sync_parent(path)
        });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(|source| WriteError {
        path: path.to_path_buf(),
        source,
    })
}

/// Removes what a crash (or anyone) left at a temporary file's name: a file or a link, never
/// followed. A directory there makes the write fail.
fn remove_leftover(tmp: &Path) -> io::Result<()> {
    match fs::remove_file(tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The temporary files being written by this process: one writer each.
static WRITING: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());
static WRITTEN: Condvar = Condvar::new();

/// A writer's turn at a temporary file, until dropped.
struct Turn<'a>(&'a Path);

impl<'a> Turn<'a> {
    fn take(tmp: &'a Path) -> Self {
        let mut writing = WRITING.lock().unwrap_or_else(PoisonError::into_inner);
        while writing.contains(tmp) {
            writing = WRITTEN
                .wait(writing)
                .unwrap_or_else(PoisonError::into_inner);
        }
        writing.insert(tmp.to_path_buf());
        Turn(tmp)
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut writing = WRITING.lock().unwrap_or_else(PoisonError::into_inner);
        writing.remove(self.0);
        WRITTEN.notify_all();
    }
}

/// Creates `path`, which must not exist (AlreadyExists if it does), holding `bytes`, and
/// makes it durable: the file and then its directory synced.
pub fn create_durably(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_new(path, bytes, DEFAULT_MODE)?;
    sync_parent(path)
}

/// Syncs the directory that holds `path`, so a rename, creation or removal there survives a
/// crash.
pub fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => sync_dir(dir),
        _ => sync_dir(Path::new(".")),
    }
}

/// Syncs the directory `dir` itself (its entries, not the files in it).
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_write_replaces_the_whole_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.toml");
        write_atomic(&path, b"a long first version\n").unwrap();
        write_atomic(&path, b"short\n").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"short\n");
        assert_eq!(names(dir.path()), ["a.toml"]);
    }

    #[test]
    fn a_failed_write_keeps_the_old_file_and_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.toml");
        write_atomic(&path, b"old\n").unwrap();
        // A directory where the file should go: the rename fails.
        let blocked = dir.path().join("sub");
        fs::create_dir(&blocked).unwrap();
        fs::write(blocked.join("x"), b"").unwrap();
        let err = write_atomic(&blocked, b"new\n").unwrap_err();
        assert_eq!(err.path, blocked);
        assert_eq!(
            err.to_string(),
            format!("cannot write {}", blocked.display())
        );
        assert_eq!(fs::read(&path).unwrap(), b"old\n");
        assert_eq!(names(dir.path()), ["a.toml", "sub"]);
    }

    #[test]
    fn a_link_left_at_the_temporary_name_is_removed_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        fs::write(&outside, b"keep\n").unwrap();
        let path = dir.path().join("a.toml");
        std::os::unix::fs::symlink(&outside, dir.path().join("a.toml.tmp")).unwrap();
        write_atomic(&path, b"new\n").unwrap();
        assert_eq!(fs::read(&outside).unwrap(), b"keep\n");
        assert_eq!(fs::read(&path).unwrap(), b"new\n");
        assert_eq!(names(dir.path()), ["a.toml", "outside"]);
    }

    #[test]
    fn writers_of_one_file_take_turns_and_one_whole_version_wins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("record.json");
        let versions: Vec<Vec<u8>> = (0..8u8)
            .map(|i| vec![b'a' + i; 4096 * (1 + i as usize)])
            .collect();
        std::thread::scope(|s| {
            for version in &versions {
                let path = &path;
                s.spawn(move || {
                    for _ in 0..20 {
                        write_atomic(path, version).unwrap();
                    }
                });
            }
        });
        assert!(versions.contains(&fs::read(&path).unwrap()));
        assert_eq!(names(dir.path()), ["record.json"]);
    }

    #[test]
    fn a_private_write_replaces_a_looser_file_and_leaves_the_old_one_whole() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.json");
        fs::write(&path, b"old, readable by all\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        // A reader holding the old file (a link to it here) keeps it whole: the new one is
        // renamed over the name, not written into the old file.
        let held = dir.path().join("held");
        fs::hard_link(&path, &held).unwrap();
        write_atomic_with_mode(&path, b"secret\n", 0o600).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(fs::read(&path).unwrap(), b"secret\n");
        assert_eq!(fs::read(&held).unwrap(), b"old, readable by all\n");
        assert_eq!(mode(&held), 0o644);
        assert_eq!(names(dir.path()), ["held", "vm.json"]);
        // A new file is private from its creation (no umask makes 0600 wider).
        let new = dir.path().join("new.json");
        write_atomic_with_mode(&new, b"{}\n", 0o600).unwrap();
        assert_eq!(mode(&new), 0o600);
    }

    #[test]
    fn create_durably_never_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("marker");
        create_durably(&path, b"one\n").unwrap();
        let err = create_durably(&path, b"two\n").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&path).unwrap(), b"one\n");
    }
}
