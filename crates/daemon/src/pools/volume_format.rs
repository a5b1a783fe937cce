//! The format of each pool volume, decided once by whoever brought the volume in, and never
//! again by its contents.
//!
//! A raw volume holds whatever its guest wrote, including, if the guest likes, a qcow2 header
//! naming a host file as backing file: guessing the format again at each use would hand the
//! guest that file. So the daemon records a volume's format when it creates, clones or
//! receives it, in `.NAME.INODE.format` beside the volume (INODE: the volume file's inode, so a
//! record describes one file, and a clone or an upload can record its file's format before the
//! file takes the volume's name), and every later use reads the record for the file it opened.
//! The pool serializes the operations that replace a volume's file (see `pools`).
//!
//! A volume without a record for its file (made before Ferro kept them, or put in the pool
//! directory by hand) is probed when the daemon first needs its format, and the result is
//! recorded only where a guest's writes could not have made it: raw, or a qcow2 image with no
//! backing file (which can only show its own file). Anything else (a qcow2 image naming a
//! backing file, an unreadable header, another format) stays unconfirmed, and the volume is
//! refused until an administrator confirms its format (`ferro vol set-format`) or a VM
//! definition names it with its format.
//!
//! Threading: plain file operations, from the API's blocking tasks.

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use block::Format;
use serde::Deserialize;

/// Suffix of a volume's records: `.NAME.INODE.format`.
const SUFFIX: &str = ".format";
/// Marks a record being written: `.NAME.INODE.format.tmp` (`.tmp-PID-N` before the daemon
/// wrote every file through `crate::fs`).
const TEMPORARY: &str = ".format.tmp";

/// Why a volume's format is not known.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{} has no recorded format and {looks}, which its guest may have written: confirm its \
         format with `ferro vol set-format` (or name it with its format in a VM definition)",
        path.display()
    )]
    Unconfirmed { path: PathBuf, looks: String },
    #[error("the format record {} is damaged ({message}): remove it and confirm the volume's \
             format with `ferro vol set-format`", path.display())]
    Damaged { path: PathBuf, message: String },
    #[error("cannot record the format of {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
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

/// Records that the file at `file` (the volume `volume` now, or the copy or upload that will
/// become it) is of `format`.
pub fn record(volume: &Path, file: &Path, format: Format) -> Result<(), FormatError> {
    write(volume, inode_of(file)?, format)
}

/// Records `format` for the file `volume` is now, and drops the records of the files it was
/// before (an administrator's word, or an upload that took the name).
pub fn confirm(volume: &Path, format: Format) -> Result<(), FormatError> {
    let inode = inode_of(volume)?;
    write(volume, inode, format)?;
    drop_others(volume, inode);
    Ok(())
}

/// Records `format` for `volume`'s file unless it has a record already (a VM definition that
/// names the volume with its format, read at daemon start). Returns whether it recorded.
pub fn seed(volume: &Path, format: Format) -> Result<bool, FormatError> {
    let inode = inode_of(volume)?;
    if read(volume, inode)?.is_some() {
        return Ok(false);
    }
    write(volume, inode, format)?;
    Ok(true)
}

pub fn inode_of(file: &Path) -> Result<u64, FormatError> {
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
    crate::fs::write_atomic(&path, text.as_bytes()).map_err(|e| FormatError::Write {
        path: e.path,
        source: e.source,
    })
}

/// The recorded format of `volume`'s file with inode `inode`; `None` if there is no record.
fn read(volume: &Path, inode: u64) -> Result<Option<Format>, FormatError> {
    let path = record_path(volume, inode);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(FormatError::Read { path, source }),
    };
    let damaged = |message: String| FormatError::Damaged {
        path: path.clone(),
        message,
    };
    let record: Record = toml::from_str(&text).map_err(|e| damaged(e.message().to_string()))?;
    record.format.parse().map(Some).map_err(damaged)
}

/// What the first bytes of `file` say, if a guest's writes could not have made it say
/// something harmful: raw, or qcow2 with no backing file. Otherwise what it looks like.
pub fn trusted_probe(file: &File) -> Result<Format, String> {
    match block::open::detect(file).map_err(|e| e.to_string())? {
        Format::Raw => Ok(Format::Raw),
        Format::Qcow2 => match block::qcow2::read_header(file) {
            Ok(header) => match header.backing_file {
                None => Ok(Format::Qcow2),
                Some(name) => Err(format!(
                    "looks like a qcow2 image naming backing file {name:?}"
                )),
            },
            Err(e) => Err(format!("looks like a damaged qcow2 image ({e})")),
        },
    }
}

/// The format of `volume` as it is now: see [`format_of_open`].
pub fn format_of(volume: &Path) -> Result<Format, FormatError> {
    let file = File::open(volume).map_err(|source| FormatError::Read {
        path: volume.to_path_buf(),
        source,
    })?;
    format_of_open(volume, &file)
}

/// The format of `file`, opened as `volume`: the record of that very file, or, for a file
/// without one, what [`trusted_probe`] trusts, recorded (once).
pub fn format_of_open(volume: &Path, file: &File) -> Result<Format, FormatError> {
    let inode = file
        .metadata()
        .map_err(|source| FormatError::Read {
            path: volume.to_path_buf(),
            source,
        })?
        .ino();
    if let Some(format) = read(volume, inode)? {
        return Ok(format);
    }
    let format = trusted_probe(file).map_err(|looks| FormatError::Unconfirmed {
        path: volume.to_path_buf(),
        looks,
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

/// Removes the record of the file with inode `inode`, which `volume` was (a deleted volume).
pub fn forget(volume: &Path, inode: u64) {
    let _ = std::fs::remove_file(record_path(volume, inode));
}

/// Removes the record [`record`] made for `file` (a clone's copy or an upload that did not
/// become the volume); call before removing `file`.
pub fn unrecord(volume: &Path, file: &Path) {
    if let Ok(inode) = inode_of(file) {
        forget(volume, inode);
    }
}

/// Removes the records in `dir` of files that are gone or were replaced, and records left half
/// written. Only when no operation can be under way in `dir`: at daemon start.
pub fn tidy(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(file_name) = file_name.to_str() else {
            continue;
        };
        let stale = match parse_record_name(file_name) {
            Some((name, inode)) => {
                std::fs::symlink_metadata(dir.join(name)).map_or(true, |m| m.ino() != inode)
            }
            None => file_name.starts_with('.') && file_name.contains(TEMPORARY),
        };
        if stale {
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
pub fn drop_others(volume: &Path, keep: u64) {
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
        if inode.is_some_and(|inode| inode != keep) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 1 MiB qcow2 image at `path`, naming `backing` (raw) as its backing file if given.
    fn qcow2(path: &Path, backing: Option<&str>) {
        let file = File::create(path).unwrap();
        let options = block::qcow2::CreateOptions {
            size: 1 << 20,
            cluster_bits: 16,
            backing: backing.map(|b| (b.to_string(), Some("raw".to_string()))),
        };
        block::qcow2::create(&file, &options).unwrap();
    }

    fn records(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with('.'))
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_recorded_format_outlives_what_a_guest_writes() {
        let dir = tempfile::tempdir().unwrap();
        let volume = dir.path().join("disk.raw");
        std::fs::write(&volume, vec![0u8; 1 << 20]).unwrap();
        record(&volume, &volume, Format::Raw).unwrap();
        // The guest writes a qcow2 header naming a host file into its raw disk.
        let evil = dir.path().join("evil");
        qcow2(&evil, Some("/etc/shadow"));
        let header = std::fs::read(&evil).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&volume)
            .and_then(|f| std::os::unix::fs::FileExt::write_all_at(&f, &header, 0))
            .unwrap();
        assert_eq!(format_of(&volume).unwrap(), Format::Raw);
        let inode = inode_of(&volume).unwrap();
        assert!(record_path(&volume, inode).exists());
        forget(&volume, inode);
        assert!(!record_path(&volume, inode).exists());
    }

    #[test]
    fn a_volume_without_a_record_is_probed_once_and_only_trusted_when_harmless() {
        let dir = tempfile::tempdir().unwrap();
        let (raw, alone, overlay) = (
            dir.path().join("raw"),
            dir.path().join("alone"),
            dir.path().join("overlay"),
        );
        std::fs::write(&raw, vec![0u8; 4096]).unwrap();
        qcow2(&alone, None);
        qcow2(&overlay, Some("raw"));
        assert_eq!(format_of(&raw).unwrap(), Format::Raw);
        assert_eq!(format_of(&alone).unwrap(), Format::Qcow2);
        // A qcow2 header naming a backing file may be a guest's work: not trusted.
        let err = format_of(&overlay).unwrap_err();
        assert!(matches!(err, FormatError::Unconfirmed { .. }), "{err}");
        assert!(
            err.to_string().contains("naming backing file \"raw\""),
            "{err}"
        );
        assert!(err.to_string().contains("ferro vol set-format"), "{err}");
        // Nor is another format, or a damaged header.
        let vmdk = dir.path().join("x.vmdk");
        std::fs::write(&vmdk, b"KDMV\x01\0\0\0").unwrap();
        assert!(matches!(
            format_of(&vmdk),
            Err(FormatError::Unconfirmed { .. })
        ));
        let broken = dir.path().join("broken");
        std::fs::write(&broken, b"QFI\xfb\0\0\0\x03").unwrap();
        assert!(matches!(
            format_of(&broken),
            Err(FormatError::Unconfirmed { .. })
        ));
        // Recorded once: later contents change nothing.
        qcow2(&raw, Some("alone"));
        assert_eq!(format_of(&raw).unwrap(), Format::Raw);
        // An administrator's word settles the others.
        confirm(&overlay, Format::Qcow2).unwrap();
        assert_eq!(format_of(&overlay).unwrap(), Format::Qcow2);
    }

    #[test]
    fn a_record_belongs_to_one_file() {
        let dir = tempfile::tempdir().unwrap();
        let volume = dir.path().join("v");
        let copy = dir.path().join(".v.part");
        std::fs::write(&copy, vec![0u8; 512]).unwrap();
        // A clone records its copy's format before the copy takes the volume's name.
        record(&volume, &copy, Format::Raw).unwrap();
        std::fs::rename(&copy, &volume).unwrap();
        assert_eq!(format_of(&volume).unwrap(), Format::Raw);
        // A file put in its place by other means (made while the old one exists, so its inode
        // differs) does not take the record.
        let other = dir.path().join("other");
        qcow2(&other, None);
        std::fs::rename(&other, &volume).unwrap();
        assert_eq!(format_of(&volume).unwrap(), Format::Qcow2);
        // Confirming keeps only the current file's record.
        confirm(&volume, Format::Raw).unwrap();
        assert_eq!(format_of(&volume).unwrap(), Format::Raw);
        assert_eq!(records(dir.path()).len(), 1, "{:?}", records(dir.path()));
    }

    #[test]
    fn a_damaged_record_is_an_error_not_a_new_probe() {
        let dir = tempfile::tempdir().unwrap();
        let volume = dir.path().join("v");
        std::fs::write(&volume, vec![0u8; 512]).unwrap();
        let path = record_path(&volume, inode_of(&volume).unwrap());
        std::fs::write(&path, "format = \"vmdk\"\n").unwrap();
        let err = format_of(&volume).unwrap_err();
        assert!(matches!(err, FormatError::Damaged { .. }), "{err}");
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "format = \"vmdk\"\n"
        );
    }

    #[test]
    fn seeding_never_overrides_a_record() {
        let dir = tempfile::tempdir().unwrap();
        let volume = dir.path().join("v");
        qcow2(&volume, Some("base"));
        assert!(seed(&volume, Format::Raw).unwrap());
        assert!(!seed(&volume, Format::Qcow2).unwrap());
        assert_eq!(format_of(&volume).unwrap(), Format::Raw);
    }

    #[test]
    fn tidying_drops_records_of_files_gone_or_replaced_and_half_written_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (kept, gone) = (dir.path().join("a.b"), dir.path().join("gone"));
        std::fs::write(&kept, b"").unwrap();
        std::fs::write(&gone, b"").unwrap();
        record(&kept, &kept, Format::Raw).unwrap();
        record(&gone, &gone, Format::Qcow2).unwrap();
        std::fs::write(dir.path().join(".a.b.7.format.tmp-1-2"), b"x").unwrap();
        std::fs::write(dir.path().join(".a.b.8.format.tmp"), b"x").unwrap();
        std::fs::remove_file(&gone).unwrap();
        tidy(dir.path());
        let kept_record = format!(".a.b.{}.format", inode_of(&kept).unwrap());
        assert_eq!(records(dir.path()), [kept_record]);
        assert_eq!(parse_record_name(".a.b.12.format"), Some(("a.b", 12)));
        assert_eq!(parse_record_name(".a.b.x.format"), None);
    }

    #[test]
    fn a_copy_recorded_under_a_name_leaves_the_current_volume_alone() {
        let dir = tempfile::tempdir().unwrap();
        let volume = dir.path().join("v");
        std::fs::write(&volume, vec![0u8; 512]).unwrap();
        record(&volume, &volume, Format::Raw).unwrap();
        let copy = dir.path().join(".v.part");
        qcow2(&copy, None);
        record(&volume, &copy, Format::Qcow2).unwrap();
        // The copy never took the name: the volume is still raw.
        assert_eq!(format_of(&volume).unwrap(), Format::Raw);
        unrecord(&volume, &copy);
        std::fs::remove_file(&copy).unwrap();
        assert_eq!(records(dir.path()).len(), 1);
    }
}
