//! Offline image management, as `ferro img` (and later the daemon's storage pools) use it:
//! creating images, describing them, growing them, internal snapshots, and checking (and
//! repairing) qcow2 metadata.
//!
//! Everything that changes an image takes its exclusive lock first, so an image in use by a
//! VM is never modified underneath it. [`info`] takes no lock: it only reads the header and
//! tables, like `qemu-img info -U`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::open::{backing_path, given_or_probed, open_locked};
use crate::qcow2::{self, header::incompatible, CreateOptions, Qcow2Image, Snapshot};
use crate::{open, DiskImage, Format, OpenError};

/// Why an image operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ManageError {
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("{} already exists", path.display())]
    Exists { path: PathBuf },
    #[error("cannot create {}", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: {what}", path.display())]
    Image {
        path: PathBuf,
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("unusable backing file {}", path.display())]
    Backing {
        path: PathBuf,
        #[source]
        source: OpenError,
    },
    #[error("{0}")]
    Usage(String),
}

/// What to create.
#[derive(Debug, Clone)]
pub struct NewImage {
    pub format: Format,
    /// Virtual size; taken from the backing image when absent.
    pub size: Option<u64>,
    /// qcow2 cluster size in bytes (a power of two, 4 KiB to 2 MiB).
    pub cluster_size: u64,
    /// Backing file name as it will be stored (relative names are relative to the new image).
    pub backing: Option<String>,
    /// Format of the backing file; needed with a backing file (never probed).
    pub backing_format: Option<Format>,
}

/// Creates a new image file (never overwriting one).
pub fn create(path: &Path, new: &NewImage) -> Result<(), ManageError> {
    let usage = |m: &str| ManageError::Usage(m.to_string());
    if new.format == Format::Raw && new.backing.is_some() {
        return Err(usage("raw images cannot have a backing file"));
    }
    if !new.cluster_size.is_power_of_two() || !(4096..=2 << 20).contains(&new.cluster_size) {
        return Err(usage(
            "the cluster size must be a power of two from 4K to 2M",
        ));
    }
    let (size, backing_format) = match &new.backing {
        Some(name) => {
            // The backing image must open (and tell its size and format) now, not at boot.
            let backing = backing_path(path, name);
            let backing_err = |source| ManageError::Backing {
                path: backing.clone(),
                source,
            };
            let format = new.backing_format.ok_or_else(|| {
                usage(
                    "give the backing file's format (raw or qcow2): Ferro never guesses it from \
                     the backing file's contents",
                )
            })?;
            let image = open(&backing, true, Some(format)).map_err(backing_err)?;
            (new.size.unwrap_or(image.size()), Some(format))
        }
        None => (
            new.size
                .ok_or_else(|| usage("the size is needed (or a backing file to take it from)"))?,
            None,
        ),
    };
    if size % 512 != 0 {
        return Err(usage("the size must be a multiple of 512 bytes"));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| match source.kind() {
            io::ErrorKind::AlreadyExists => ManageError::Exists {
                path: path.to_path_buf(),
            },
            _ => ManageError::Create {
                path: path.to_path_buf(),
                source,
            },
        })?;
    let result = match new.format {
        Format::Raw => file.set_len(size),
        Format::Qcow2 => {
            let options = CreateOptions {
                size,
                cluster_bits: new.cluster_size.trailing_zeros(),
                backing: new
                    .backing
                    .clone()
                    .map(|name| (name, backing_format.map(|f| f.name().to_string()))),
            };
            qcow2::create(&file, &options)
        }
    };
    result.map_err(|source| {
        // Leave nothing half-made behind.
        let _ = std::fs::remove_file(path);
        ManageError::Create {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// qcow2 specifics for [`ImageInfo`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Info {
    pub version: u32,
    pub cluster_size: u64,
    pub refcount_bits: u32,
    pub lazy_refcounts: bool,
    pub dirty: bool,
    pub corrupt: bool,
    pub snapshots: Vec<Snapshot>,
}

/// What `ferro img info` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    pub path: PathBuf,
    pub format: Format,
    pub virtual_size: u64,
    /// Bytes the file occupies on the host (sparse files and thin images use less).
    pub actual_size: u64,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    /// Where the backing file is, resolved relative to the image.
    pub full_backing_path: Option<PathBuf>,
    pub qcow2: Option<Qcow2Info>,
}

/// Describes the image at `path` without locking it.
pub fn info(path: &Path, format: Option<Format>) -> Result<ImageInfo, ManageError> {
    let open_err = |source| OpenError::Open {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(open_err)?;
    let metadata = file.metadata().map_err(open_err)?;
    let format = given_or_probed(path, &file, format)?;
    let mut info = ImageInfo {
        path: path.to_path_buf(),
        format,
        virtual_size: metadata.len(),
        actual_size: metadata.blocks() * 512,
        backing_file: None,
        backing_format: None,
        full_backing_path: None,
        qcow2: None,
    };
    if format == Format::Raw {
        if metadata.file_type().is_file() {
            return Ok(info);
        }
        // A block device: its size comes from the device.
        info.virtual_size = crate::raw::RawImage::new(file).map_err(open_err)?.size();
        return Ok(info);
    }
    let invalid = |source| OpenError::Invalid {
        path: path.to_path_buf(),
        format,
        source,
    };
    let image = Qcow2Image::open(file, false, None).map_err(invalid)?;
    let header = image.header().clone();
    info.virtual_size = header.size;
    info.full_backing_path = header
        .backing_file
        .as_deref()
        .map(|name| backing_path(path, name));
    info.backing_file = header.backing_file.clone();
    info.backing_format = header.backing_format.clone();
    info.qcow2 = Some(Qcow2Info {
        version: header.version,
        cluster_size: header.cluster_size(),
        refcount_bits: header.refcount_bits(),
        lazy_refcounts: header.compatible_features & qcow2::header::compatible::LAZY_REFCOUNTS != 0,
        dirty: header.incompatible_features & incompatible::DIRTY != 0,
        corrupt: header.incompatible_features & incompatible::CORRUPT != 0,
        snapshots: image.snapshots().map_err(invalid)?,
    });
    Ok(info)
}

/// Grows the image at `path` (of `format`, probed when `None`) to `size` bytes.
pub fn resize(path: &Path, format: Option<Format>, size: u64) -> Result<(), ManageError> {
    let image_err = |what: &str| {
        let what = what.to_string();
        move |source| ManageError::Image {
            path: path.to_path_buf(),
            what,
            source,
        }
    };
    if !size.is_multiple_of(512) {
        return Err(ManageError::Usage(
            "the size must be a multiple of 512 bytes".into(),
        ));
    }
    let current = virtual_size(path, format)?;
    if size < current {
        return Err(ManageError::Usage(format!(
            "shrinking would lose data ({} is {current} bytes); only growing is supported",
            path.display()
        )));
    }
    let file = open_locked(path, false)?;
    let format = given_or_probed(path, &file, format)?;
    match format {
        Format::Raw => file.set_len(size).map_err(image_err("cannot resize it")),
        Format::Qcow2 => {
            let mut image = open_qcow2(path, file)?;
            image.resize(size).map_err(image_err("cannot resize it"))
        }
    }
}

/// Current virtual size of the image at `path` (of `format`, probed when `None`).
pub fn virtual_size(path: &Path, format: Option<Format>) -> Result<u64, ManageError> {
    Ok(info(path, format)?.virtual_size)
}

fn open_qcow2(path: &Path, file: File) -> Result<Qcow2Image, ManageError> {
    Qcow2Image::open(file, true, None).map_err(|source| {
        OpenError::Invalid {
            path: path.to_path_buf(),
            format: Format::Qcow2,
            source,
        }
        .into()
    })
}

/// A snapshot operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotOp {
    List,
    Create(String),
    Apply(String),
    Delete(String),
}

/// Runs a snapshot operation on the qcow2 image at `path` (of `format`, probed when `None`;
/// which must not be in use); returns the snapshots afterwards.
pub fn snapshot(
    path: &Path,
    format: Option<Format>,
    op: &SnapshotOp,
) -> Result<Vec<Snapshot>, ManageError> {
    let read_only = *op == SnapshotOp::List;
    let file = open_locked(path, read_only)?;
    let format = given_or_probed(path, &file, format)?;
    if format != Format::Qcow2 {
        return Err(ManageError::Usage(format!(
            "{} is a raw image; internal snapshots need qcow2",
            path.display()
        )));
    }
    let mut image = if read_only {
        Qcow2Image::open(file, false, None).map_err(|source| {
            ManageError::from(OpenError::Invalid {
                path: path.to_path_buf(),
                format,
                source,
            })
        })?
    } else {
        open_qcow2(path, file)?
    };
    let failed = |what: String| {
        move |source| ManageError::Image {
            path: path.to_path_buf(),
            what,
            source,
        }
    };
    match op {
        SnapshotOp::List => {}
        SnapshotOp::Create(name) => {
            image
                .create_snapshot(name)
                .map_err(failed(format!("cannot create snapshot {name:?}")))?;
        }
        SnapshotOp::Apply(name) => {
            image
                .apply_snapshot(name)
                .map_err(failed(format!("cannot apply snapshot {name:?}")))?;
        }
        SnapshotOp::Delete(name) => {
            image
                .delete_snapshot(name)
                .map_err(failed(format!("cannot delete snapshot {name:?}")))?;
        }
    }
    image
        .snapshots()
        .map_err(failed("cannot read its snapshots".into()))
}

/// What [`check`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckOutcome {
    /// A raw image: no metadata, nothing to check.
    Raw,
    Qcow2(qcow2::CheckReport),
}

/// Checks the image at `path` for corruptions and leaked clusters, as `qemu-img check` does;
/// with `repair`, also rebuilds its refcounts and COPIED flags (as `qemu-img check -r all`),
/// which needs the image not to be in use. `format` is detected when absent.
pub fn check(
    path: &Path,
    format: Option<Format>,
    repair: bool,
) -> Result<CheckOutcome, ManageError> {
    let file = open_locked(path, !repair)?;
    let format = given_or_probed(path, &file, format)?;
    if format == Format::Raw {
        return Ok(CheckOutcome::Raw);
    }
    qcow2::check(&file, repair)
        .map(CheckOutcome::Qcow2)
        .map_err(|source| ManageError::Image {
            path: path.to_path_buf(),
            what: if repair {
                "cannot repair it"
            } else {
                "cannot check it"
            }
            .to_string(),
            source,
        })
}
