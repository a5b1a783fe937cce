//! Full clones return once their data is copied, as `cp` and `qemu-img convert` do; this
//! module then puts each on stable storage in the background and makes sure that a host crash
//! in between is noticed, instead of leaving a volume with silently missing data.
//!
//! Before a copy starts, a durable marker `.NAME.wb-INSTANCE-SEQ.unsynced` (INSTANCE: the
//! daemon process's, see `partial`) in the pool's directory
//! records the host's boot id and the inode of the file being written. It is removed once the
//! data and the volume's name are on storage. A marker that no clone of this process owns
//! (another daemon process left it):
//! - same boot: the host kept its page cache, so the data is whole; it is synced now and the
//!   marker removed;
//! - another boot: the host went down before the data was on storage, so some may be lost. The
//!   marker becomes `.NAME.incomplete`; the volume is reported incomplete and refused to VMs
//!   and as a clone source until it is deleted (or replaced by an upload);
//! - no volume NAME with that inode: the copy never became a volume, or is gone; removed.
//!
//! A failed write-out (an I/O error from fdatasync) marks the volume incomplete at once.
//!
//! Threading: [`begin`] and [`recover`] run on the caller's thread; each settling runs on a
//! thread of its own, joined by [`WriteBack::finish`] before the daemon exits.

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::thread::JoinHandle;

use crate::fs;
use crate::pools::partial;

const UNSYNCED: &str = ".unsynced";
const INCOMPLETE: &str = ".incomplete";

/// Tells apart the markers of concurrent clones to the same name.
static SEQUENCE: AtomicU64 = AtomicU64::new(0);
/// The file names of the markers this process's clones own, which recovery leaves alone (by
/// name: a pool's directory may be reached by more than one path).
static LIVE: Mutex<BTreeSet<std::ffi::OsString>> = Mutex::new(BTreeSet::new());

fn live() -> std::sync::MutexGuard<'static, BTreeSet<std::ffi::OsString>> {
    LIVE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The record of one copy not yet on storage.
#[derive(Debug)]
pub struct Marker {
    path: PathBuf,
    /// The volume's path once published (the copy is written under a hidden name first).
    volume: PathBuf,
}

/// Writes a durable marker for the file `copy`, which becomes volume `name` of pool `dir`.
pub fn begin(dir: &Path, name: &str, copy: &Path) -> io::Result<Marker> {
    let inode = std::fs::metadata(copy)?.ino();
    let sequence = SEQUENCE.fetch_add(1, Ordering::Relaxed);
    let file_name = format!(".{name}.wb-{}-{sequence}{UNSYNCED}", partial::instance());
    live().insert(file_name.clone().into());
    let marker = Marker {
        path: dir.join(file_name),
        volume: dir.join(name),
    };
    let written = fs::create_durably(&marker.path, format!("{} {inode}\n", boot_id()).as_bytes());
    match written {
        Ok(()) => Ok(marker),
        Err(e) => {
            marker.abandon();
            Err(e)
        }
    }
}

impl Drop for Marker {
    fn drop(&mut self) {
        if let Some(name) = self.path.file_name() {
            live().remove(name);
        }
    }
}

impl Marker {
    /// Drops the record of a copy that did not become a volume.
    pub fn abandon(self) {
        let _ = std::fs::remove_file(&self.path);
    }

    /// Puts the volume's data on storage, then removes the marker; one directory sync makes
    /// the volume's name and the marker's removal durable. Should a file system make the
    /// removal durable without the rename that came first, a crash loses the clone (its hidden
    /// copy is removed as a leftover), but never leaves a volume that silently misses data.
    fn settle(self) {
        let volume = match File::open(&self.volume) {
            Ok(volume) => volume,
            // Deleted meanwhile: nothing is left to protect.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return self.abandon(),
            Err(e) => {
                // The data may well be fine: the next daemon's recovery tries again.
                tracing::warn!("cannot settle {}: {e}", self.volume.display());
                return;
            }
        };
        match volume.sync_data() {
            Ok(()) => {
                let removed =
                    std::fs::remove_file(&self.path).and_then(|()| fs::sync_parent(&self.path));
                if let Err(e) = removed {
                    // The next daemon's recovery syncs again (same boot) or reports the
                    // volume (another boot): never a silent loss.
                    tracing::warn!("cannot retire {}: {e}", self.path.display());
                }
            }
            Err(e) => {
                tracing::error!(
                    "volume {} did not reach storage ({e}); it is marked incomplete",
                    self.volume.display()
                );
                mark_incomplete(&self.path, &self.volume);
            }
        }
    }
}

/// The settling threads under way.
#[derive(Debug, Default)]
pub struct WriteBack {
    running: Mutex<Vec<JoinHandle<()>>>,
}

impl WriteBack {
    /// Settles `marker`'s volume in the background.
    pub fn settle(&self, marker: Marker) {
        let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        running.retain(|handle| !handle.is_finished());
        let volume = marker.volume.clone();
        let spawned = std::thread::Builder::new()
            .name("write-back".into())
            .spawn(move || marker.settle());
        match spawned {
            Ok(handle) => running.push(handle),
            // The marker stays: the next daemon's recovery settles the volume.
            Err(e) => tracing::error!("cannot settle {}: {e}", volume.display()),
        }
    }

    /// Waits until every volume handed to [`WriteBack::settle`] is settled.
    pub fn finish(&self) {
        let handles =
            std::mem::take(&mut *self.running.lock().unwrap_or_else(PoisonError::into_inner));
        for handle in handles {
            let _ = handle.join();
        }
    }
}

/// Deals with the markers other daemon processes left in `dir` (see the module docs).
pub fn recover(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(name) = file_name.to_str().and_then(parse_marker_name) else {
            continue;
        };
        if !live().contains(&file_name) {
            recover_one(&entry.path(), &dir.join(name));
        }
    }
}

fn recover_one(marker: &Path, volume: &Path) {
    let (boot, inode) = read_marker(marker);
    let is_that_copy = std::fs::symlink_metadata(volume)
        .is_ok_and(|m| m.file_type().is_file() && inode == Some(m.ino()));
    if !is_that_copy {
        let _ = std::fs::remove_file(marker);
    } else if boot == boot_id() && !boot.is_empty() {
        tracing::info!(
            "putting {} on storage (its clone was cut short)",
            volume.display()
        );
        Marker {
            path: marker.to_path_buf(),
            volume: volume.to_path_buf(),
        }
        .settle();
    } else {
        tracing::error!(
            "volume {} may have lost data: the host went down before its clone was on storage",
            volume.display()
        );
        mark_incomplete(marker, volume);
    }
}

/// A marker's boot id (empty when it could not be read: taken as another boot) and inode.
fn read_marker(marker: &Path) -> (String, Option<u64>) {
    let recorded = std::fs::read_to_string(marker).unwrap_or_default();
    match recorded.trim_end().rsplit_once(' ') {
        Some((boot, inode)) => (boot.trim().to_string(), inode.parse().ok()),
        None => (String::new(), None),
    }
}

/// Turns `marker` into the lasting `.NAME.incomplete` record of `volume`, if `volume` is
/// still the file it names (else the marker just goes).
fn mark_incomplete(marker: &Path, volume: &Path) {
    let (_, inode) = read_marker(marker);
    let still_there = std::fs::metadata(volume).is_ok_and(|m| inode == Some(m.ino()));
    let Some(record) = incomplete_path(volume).filter(|_| still_there) else {
        let _ = std::fs::remove_file(marker);
        return;
    };
    let Some(inode) = inode else {
        return;
    };
    let written = fs::write_atomic(&record, format!("{inode}\n").as_bytes())
        .map_err(|e| e.source)
        .and_then(|()| std::fs::remove_file(marker))
        .and_then(|()| fs::sync_parent(volume));
    if let Err(e) = written {
        tracing::error!("cannot record {} as incomplete: {e}", volume.display());
    }
}

/// Whether `volume` (an existing file) is the one its `.NAME.incomplete` record names.
pub fn is_incomplete(volume: &Path) -> bool {
    let Some(record) = incomplete_path(volume) else {
        return false;
    };
    let Ok(recorded) = std::fs::read_to_string(record) else {
        return false;
    };
    std::fs::metadata(volume).is_ok_and(|m| recorded.trim().parse() == Ok(m.ino()))
}

/// Removes `volume`'s incomplete record, once the volume is deleted.
pub fn forget(volume: &Path) {
    if let Some(record) = incomplete_path(volume) {
        let _ = std::fs::remove_file(record);
    }
}

fn incomplete_path(volume: &Path) -> Option<PathBuf> {
    let name = volume.file_name()?.to_str()?;
    Some(volume.with_file_name(format!(".{name}{INCOMPLETE}")))
}

/// The volume name in a marker's file name `.NAME.wb-INSTANCE-SEQ.unsynced` (INSTANCE:
/// `PIDxRANDOM`, or a bare pid).
fn parse_marker_name(file_name: &str) -> Option<&str> {
    let stem = file_name.strip_prefix('.')?.strip_suffix(UNSYNCED)?;
    let (name, tag) = stem.rsplit_once(".wb-")?;
    let (instance, sequence) = tag.rsplit_once('-')?;
    sequence.parse::<u64>().ok()?;
    let pid = instance.split_once('x').map_or(instance, |(pid, _)| pid);
    pid.parse::<u32>().ok()?;
    Some(name)
}

/// This boot of the host, as the kernel names it.
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|id| id.trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marker_files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        names.sort();
        names
    }

    /// A marker as a daemon of pid 1 in boot `boot` would have left for `name`'s file.
    fn foreign_marker(dir: &Path, name: &str, boot: &str) -> PathBuf {
        let inode = std::fs::metadata(dir.join(name)).unwrap().ino();
        let path = dir.join(format!(".{name}.wb-1-7{UNSYNCED}"));
        std::fs::write(&path, format!("{boot} {inode}\n")).unwrap();
        path
    }

    /// Puts a new file (so another inode) in place of `name`.
    fn replace(dir: &Path, name: &str) {
        let new = dir.join("new");
        std::fs::write(&new, b"another file").unwrap();
        std::fs::rename(new, dir.join(name)).unwrap();
    }

    #[test]
    fn marker_names_parse_back() {
        assert_eq!(parse_marker_name(".a.b.wb-12-3.unsynced"), Some("a.b"));
        assert_eq!(parse_marker_name(".a.wb-12-x.unsynced"), None);
        assert_eq!(parse_marker_name(".a.wb-12x00ff-4.unsynced"), Some("a"));
        assert_eq!(parse_marker_name(".a.clone-12-3.part"), None);
        assert_eq!(parse_marker_name("a.wb-12-3.unsynced"), None);
    }

    #[test]
    fn a_settled_clone_leaves_no_record() {
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join(".v.part");
        std::fs::write(&copy, b"data").unwrap();
        let marker = begin(dir.path(), "v", &copy).unwrap();
        assert_eq!(marker_files(dir.path()).len(), 2);
        std::fs::rename(&copy, dir.path().join("v")).unwrap();
        let write_back = WriteBack::default();
        write_back.settle(marker);
        write_back.finish();
        assert!(marker_files(dir.path()).is_empty());
        assert!(!is_incomplete(&dir.path().join("v")));
    }

    #[test]
    fn a_marker_from_this_boot_is_settled_and_one_from_another_marks_the_volume() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["same", "other"] {
            std::fs::write(dir.path().join(name), b"data").unwrap();
        }
        foreign_marker(dir.path(), "same", &boot_id());
        foreign_marker(dir.path(), "other", "an-earlier-boot");
        recover(dir.path());
        assert_eq!(marker_files(dir.path()), [".other.incomplete"]);
        assert!(!is_incomplete(&dir.path().join("same")));
        assert!(is_incomplete(&dir.path().join("other")));
        // A later recovery keeps the record.
        recover(dir.path());
        assert!(is_incomplete(&dir.path().join("other")));
        // A new file under the name (deleted and made again by hand) is not that volume.
        replace(dir.path(), "other");
        assert!(!is_incomplete(&dir.path().join("other")));
        forget(&dir.path().join("other"));
        assert!(marker_files(dir.path()).is_empty());
    }

    #[test]
    fn a_marker_without_a_boot_id_counts_as_another_boot() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("v"), b"data").unwrap();
        foreign_marker(dir.path(), "v", "");
        recover(dir.path());
        assert!(is_incomplete(&dir.path().join("v")));
    }

    #[test]
    fn a_volume_replaced_before_it_is_marked_is_not_marked() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("v"), b"data").unwrap();
        let marker = foreign_marker(dir.path(), "v", "an-earlier-boot");
        replace(dir.path(), "v");
        mark_incomplete(&marker, &dir.path().join("v"));
        assert!(marker_files(dir.path()).is_empty());
        assert!(!is_incomplete(&dir.path().join("v")));
    }

    #[test]
    fn markers_of_copies_that_never_became_volumes_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("v"), b"data").unwrap();
        let marker = foreign_marker(dir.path(), "v", "an-earlier-boot");
        replace(dir.path(), "v");
        std::fs::write(dir.path().join(".gone.wb-1-1.unsynced"), "x 1\n").unwrap();
        recover(dir.path());
        assert!(!marker.exists());
        assert!(marker_files(dir.path()).is_empty());
        assert!(!is_incomplete(&dir.path().join("v")));
    }

    #[test]
    fn a_marker_with_this_pid_but_no_clone_behind_it_is_recovered() {
        // A daemon restarted in a container often gets the pid its predecessor had.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("v"), b"data").unwrap();
        let inode = std::fs::metadata(dir.path().join("v")).unwrap().ino();
        let pid = std::process::id();
        let marker = dir.path().join(format!(".v.wb-{pid}-999999{UNSYNCED}"));
        std::fs::write(&marker, format!("an-earlier-boot {inode}\n")).unwrap();
        recover(dir.path());
        assert!(is_incomplete(&dir.path().join("v")));
    }

    #[test]
    fn this_processs_markers_are_left_to_their_clones() {
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join(".v.part");
        std::fs::write(&copy, b"data").unwrap();
        let marker = begin(dir.path(), "v", &copy).unwrap();
        recover(dir.path());
        assert!(marker.path.exists());
        marker.abandon();
        std::fs::remove_file(&copy).unwrap();
        assert!(marker_files(dir.path()).is_empty());
    }
}
