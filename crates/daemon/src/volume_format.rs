//! The format of each pool volume, decided once by whoever brought the volume in, and never
//! again by its contents.
//!
//! A raw volume holds whatever its guest wrote, including, if the guest likes, a qcow2 header
//! naming a host file as backing file: guessing the format again at each use would hand the
//! guest that file. So the daemon records a volume's format when it creates, clones or
//! receives it, in `.NAME.INODE.format` beside the volume (INODE: the volume file's inode, so a
//! record describes one file, and a clone can record its copy's format before the copy takes
//! the volume's name without touching the record of a volume that got the name meanwhile),
//! and every later use reads the record.
//!
//! A volume without a record for its file (made before Ferro kept them, put in the pool
//! directory by hand, or replaced behind the daemon's back) is probed once, when the daemon
//! first needs its format, and the result is recorded and logged. Records are written after
//! the volume's file for uploads (a crash in between leaves the new file, which no guest has
//! touched yet, to be probed) and before it appears for clones (a clone's bytes are its
//! source's, which a guest may have written).
//!
//! Threading: plain file operations, from the API's blocking tasks.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use block::Format;
use serde::Deserialize;

use crate::store::atomic_write;

/// Suffix of a volume's records: `.NAME.INODE.format`.
const SUFFIX: &str = ".format";

/// Why a volume's format is not known.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot tell the format of {}", path.display())]
    Unrecognized {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot record the format of {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: crate::store::StoreError,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    format: String,
}

/// Where the record of `volume`'s file with inode `inode` lives.
fn record_path(volume: &Path, inode: u64) -> PathBuf {
    let name = volume.file_name().unwrap_or_default().to_string_lossy();
    volume.with_file_name(format!(".{name}.{inode}{SUFFIX}"))
}

/// Records that the file at `file` (the volume `volume` now, or the copy that will become it)
/// is of `format`.
pub fn record(volume: &Path, file: &Path, format: Format) -> Result<(), FormatError> {
    write(volume, inode_of(file)?, format)
}

/// Like [`record`], and drops the records of the files `volume` was before (an upload).
pub fn record_replacement(volume: &Path, format: Format) -> Result<(), FormatError> {
    let inode = inode_of(volume)?;
    write(volume, inode, format)?;
    remove_records(volume, Some(inode));
    Ok(())
}

fn inode_of(file: &Path) -> Result<u64, FormatError> {
    Ok(std::fs::metadata(file)
        .map_err(|source| FormatError::Read {
            path: file.to_path_buf(),
            source,
        })?
        .ino())
}

fn write(volume: &Path, inode: u64, format: Format) -> Result<(), FormatError> {
    let path = record_path(volume, inode);
    let text = format!("format = \"{}\"\n", format.name());
    atomic_write(&path, text.as_bytes()).map_err(|source| FormatError::Write { path, source })
}

/// The recorded format of `volume`'s file with inode `inode`, if any.
fn read(volume: &Path, inode: u64) -> Option<Format> {
    let text = std::fs::read_to_string(record_path(volume, inode)).ok()?;
    let record: Record = toml::from_str(&text).ok()?;
    record.format.parse().ok()
}

/// The format of `volume`: its record, or (once) what its first bytes say, recorded.
pub fn format_of(volume: &Path) -> Result<Format, FormatError> {
    let read_err = |source| FormatError::Read {
        path: volume.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(volume).map_err(read_err)?;
    let inode = file.metadata().map_err(read_err)?.ino();
    if let Some(format) = read(volume, inode) {
        return Ok(format);
    }
    let format = block::open::detect(&file).map_err(|source| FormatError::Unrecognized {
        path: volume.to_path_buf(),
        source,
    })?;
    write(volume, inode, format)?;
    tracing::warn!(
        "volume {} had no recorded format; probed once as {} and recorded (a volume added by \
         hand should come in through `ferro vol upload --format`)",
        volume.display(),
        format.name()
    );
    Ok(format)
}

/// Removes the records of a deleted volume.
pub fn forget(volume: &Path) {
    remove_records(volume, None);
}

/// Removes the record [`record`] made for `file` (a clone's copy that did not become the
/// volume); call before removing `file`.
pub fn unrecord(volume: &Path, file: &Path) {
    if let Ok(inode) = inode_of(file) {
        let _ = std::fs::remove_file(record_path(volume, inode));
    }
}

/// Removes the records in `dir` of files that are gone or were replaced (when a pool
/// activates: no clone is under way then).
pub fn tidy(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some((name, inode)) = file_name.to_str().and_then(parse_record_name) else {
            continue;
        };
        let current = std::fs::symlink_metadata(dir.join(name)).map(|m| m.ino());
        if current.map_or(true, |current| current != inode) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// The volume name and inode of a record's file name.
fn parse_record_name(file_name: &str) -> Option<(&str, u64)> {
    let (name, inode) = file_name
        .strip_prefix('.')?
        .strip_suffix(SUFFIX)?
        .rsplit_once('.')?;
    Some((name, inode.parse().ok()?))
}

/// Removes `volume`'s records, except the one of inode `keep`.
fn remove_records(volume: &Path, keep: Option<u64>) {
    let (Some(dir), Some(name)) = (volume.parent(), volume.file_name().and_then(|n| n.to_str()))
    else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let inode = file_name
            .to_str()
            .and_then(parse_record_name)
            .filter(|(n, _)| *n == name)
            .map(|(_, inode)| inode);
        if inode.is_some_and(|inode| Some(inode) != keep) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QCOW2_HEADER_NAMING_SHADOW: &[u8] = b"QFI\xfb\0\0\0\x03";

    #[test]
    fn a_recorded_format_outlives_what_a_guest_writes() {
        let dir = tempfile::tempdir().unwrap();
        let volume = dir.path().join("disk.raw");
        std::fs::write(&volume, vec![0u8; 4096]).unwrap();
        record(&volume, &volume, Format::Raw).unwrap();
        // The guest writes a qcow2 header into its raw disk.
        let mut bytes = std::fs::read(&volume).unwrap();
        bytes[..8].copy_from_slice(QCOW2_HEADER_NAMING_SHADOW);
        std::fs::write(&volume, bytes).unwrap();
        assert_eq!(format_of(&volume).unwrap(), Format::Raw);
        let recorded = record_path(&volume, inode_of(&volume).unwrap());
        assert!(recorded.exists());
        forget(&volume);
        assert!(!recorded.exists());
    }

    #[test]
    fn a_volume_without_a_record_is_probed_once() {
        let dir = tempfile::tempdir().unwrap();
        let volume = dir.path().join("old.qcow2");
        std::fs::write(&volume, QCOW2_HEADER_NAMING_SHADOW).unwrap();
        assert_eq!(format_of(&volume).unwrap(), Format::Qcow2);
        assert!(record_path(&volume, inode_of(&volume).unwrap()).exists());
        // Later contents change nothing: the record stands.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&volume)
            .and_then(|f| std::os::unix::fs::FileExt::write_at(&f, b"\0\0\0\0", 0))
            .unwrap();
        assert_eq!(format_of(&volume).unwrap(), Format::Qcow2);
    }

    #[test]
    fn a_record_of_another_file_does_not_apply() {
        let dir = tempfile::tempdir().unwrap();
        let volume = dir.path().join("v");
        let copy = dir.path().join(".v.part");
        std::fs::write(&copy, vec![0u8; 512]).unwrap();
        // A clone records its copy's format before the copy takes the volume's name.
        record(&volume, &copy, Format::Raw).unwrap();
        std::fs::rename(&copy, &volume).unwrap();
        assert_eq!(format_of(&volume).unwrap(), Format::Raw);
        // A file put in its place by other means (made while the old one exists, so its inode
        // differs) is probed afresh.
        let other = dir.path().join("other");
        std::fs::write(&other, QCOW2_HEADER_NAMING_SHADOW).unwrap();
        std::fs::rename(&other, &volume).unwrap();
        assert_eq!(format_of(&volume).unwrap(), Format::Qcow2);
        // An upload's record replaces all others.
        record_replacement(&volume, Format::Raw).unwrap();
        assert_eq!(format_of(&volume).unwrap(), Format::Raw);
        let records = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(SUFFIX)
            })
            .count();
        assert_eq!(records, 1);
    }

    #[test]
    fn tidying_drops_records_of_files_gone_or_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let (kept, gone) = (dir.path().join("a.b"), dir.path().join("gone"));
        std::fs::write(&kept, b"").unwrap();
        std::fs::write(&gone, b"").unwrap();
        record(&kept, &kept, Format::Raw).unwrap();
        record(&gone, &gone, Format::Qcow2).unwrap();
        std::fs::remove_file(&gone).unwrap();
        tidy(dir.path());
        let mut left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        let kept_record = format!(".a.b.{}.format", inode_of(&kept).unwrap());
        assert_eq!(left, [kept_record, "a.b".to_string()]);
        assert_eq!(parse_record_name(".a.b.12.format"), Some(("a.b", 12)));
        assert_eq!(parse_record_name(".a.b.x.format"), None);
    }

    #[test]
    fn a_clone_recording_its_copy_leaves_the_current_volume_alone() {
        let dir = tempfile::tempdir().unwrap();
        let volume = dir.path().join("v");
        std::fs::write(&volume, vec![0u8; 512]).unwrap();
        record(&volume, &volume, Format::Raw).unwrap();
        let copy = dir.path().join(".v.part");
        std::fs::write(&copy, QCOW2_HEADER_NAMING_SHADOW).unwrap();
        record(&volume, &copy, Format::Qcow2).unwrap();
        // The copy never took the name (it was taken meanwhile): the volume is still raw.
        assert_eq!(format_of(&volume).unwrap(), Format::Raw);
        unrecord(&volume, &copy);
        std::fs::remove_file(&copy).unwrap();
        tidy(dir.path());
        assert_eq!(format_of(&volume).unwrap(), Format::Raw);
    }

    #[test]
    fn images_of_formats_ferro_does_not_open_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let volume = dir.path().join("x.vmdk");
        std::fs::write(&volume, b"KDMV\x01\0\0\0").unwrap();
        let err = format_of(&volume).unwrap_err();
        assert!(matches!(err, FormatError::Unrecognized { .. }), "{err}");
        assert!(!record_path(&volume, inode_of(&volume).unwrap()).exists());
    }
}
