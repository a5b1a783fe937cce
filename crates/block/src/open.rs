//! Opening an image file: locking, format detection and the backing chain.
//!
//! A writable image is locked exclusively, a read-only one (and every backing file) shared, so
//! two VMs never write one image and nobody writes a base others read. Backing file names are
//! resolved relative to the directory of the image that names them, as QEMU does.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::qcow2::{self, Qcow2Image};
use crate::{lock, raw, DiskImage};

/// The deepest backing chain accepted (QEMU's limit is of the same order).
pub const MAX_CHAIN_DEPTH: usize = 64;

const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// Image formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

impl std::str::FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            other => Err(format!("unknown image format {other:?} (raw or qcow2)")),
        }
    }
}

/// Why an image could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot open {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is in use by another process (it is locked)", path.display())]
    Locked { path: PathBuf },
    #[error("{} is not a regular file or block device", path.display())]
    NotADisk { path: PathBuf },
    #[error("{} is not a valid {} image", path.display(), format.name())]
    Invalid {
        path: PathBuf,
        format: Format,
        #[source]
        source: io::Error,
    },
    #[error("{} names an unknown backing format {name:?}", path.display())]
    BackingFormat { path: PathBuf, name: String },
    #[error("the backing chain of {} loops back to {}", path.display(), backing.display())]
    BackingLoop { path: PathBuf, backing: PathBuf },
    #[error("the backing chain of {} is deeper than {MAX_CHAIN_DEPTH} images", path.display())]
    ChainTooDeep { path: PathBuf },
}

/// Opens the image at `path` (format detected from its first bytes unless `format` is given)
/// with its whole backing chain.
pub fn open(
    path: &Path,
    read_only: bool,
    format: Option<Format>,
) -> Result<Box<dyn DiskImage>, OpenError> {
    open_in_chain(path, read_only, format, &mut HashSet::new())
}

/// Opens one image of a chain; `seen` holds the images above it (to detect loops).
fn open_in_chain(
    path: &Path,
    read_only: bool,
    format: Option<Format>,
    seen: &mut HashSet<PathBuf>,
) -> Result<Box<dyn DiskImage>, OpenError> {
    let open_err = |source| OpenError::Open {
        path: path.to_path_buf(),
        source,
    };
    let file = open_locked(path, read_only)?;
    let format = match format {
        Some(format) => format,
        None => detect(&file).map_err(open_err)?,
    };
    let invalid = |source| OpenError::Invalid {
        path: path.to_path_buf(),
        format,
        source,
    };
    match format {
        Format::Raw => Ok(Box::new(raw::RawImage::new(file).map_err(open_err)?)),
        Format::Qcow2 => {
            let header = qcow2::read_header(&file).map_err(invalid)?;
            let backing = match &header.backing_file {
                None => None,
                Some(name) => {
                    let canonical = path.canonicalize().map_err(open_err)?;
                    if !seen.insert(canonical) {
                        return Err(OpenError::BackingLoop {
                            path: path.to_path_buf(),
                            backing: path.to_path_buf(),
                        });
                    }
                    if seen.len() > MAX_CHAIN_DEPTH {
                        return Err(OpenError::ChainTooDeep {
                            path: path.to_path_buf(),
                        });
                    }
                    let backing_path = backing_path(path, name);
                    let backing_format = match header.backing_format.as_deref() {
                        None => None,
                        Some(name) => Some(name.parse().map_err(|_| OpenError::BackingFormat {
                            path: path.to_path_buf(),
                            name: name.to_string(),
                        })?),
                    };
                    if backing_path.canonicalize().is_ok_and(|b| seen.contains(&b)) {
                        return Err(OpenError::BackingLoop {
                            path: path.to_path_buf(),
                            backing: backing_path,
                        });
                    }
                    Some(open_in_chain(&backing_path, true, backing_format, seen)?)
                }
            };
            Ok(Box::new(
                Qcow2Image::open(file, !read_only, backing).map_err(invalid)?,
            ))
        }
    }
}

/// Where a backing file named `name` in the image at `image` is.
pub fn backing_path(image: &Path, name: &str) -> PathBuf {
    let name = Path::new(name);
    if name.is_absolute() {
        return name.to_path_buf();
    }
    image
        .parent()
        .map_or_else(|| name.to_path_buf(), |dir| dir.join(name))
}

/// Opens and locks `path`: exclusively to write, shared to read.
pub(crate) fn open_locked(path: &Path, read_only: bool) -> Result<File, OpenError> {
    let open_err = |source| OpenError::Open {
        path: path.to_path_buf(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(open_err)?;
    let kind = file.metadata().map_err(open_err)?.file_type();
    if !(kind.is_file() || kind.is_block_device()) {
        return Err(OpenError::NotADisk {
            path: path.to_path_buf(),
        });
    }
    match lock::lock(&file, !read_only) {
        Ok(true) => Ok(file),
        Ok(false) => Err(OpenError::Locked {
            path: path.to_path_buf(),
        }),
        Err(e) => Err(open_err(e)),
    }
}

/// The format of an image file, from its first bytes.
pub fn detect(file: &File) -> io::Result<Format> {
    use std::os::unix::fs::FileExt;
    let mut magic = [0u8; 4];
    let n = file.read_at(&mut magic, 0)?;
    Ok(if n == 4 && magic == QCOW2_MAGIC {
        Format::Qcow2
    } else {
        Format::Raw
    })
}
