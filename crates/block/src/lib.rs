//! Disk images behind one interface: raw files now, qcow2 next.
//!
//! [`DiskImage`] is what a block device needs: size, vectored reads and writes straight from and
//! to guest memory ([`vm_memory::VolatileSlice`]s, no bounce buffers), flush to stable storage,
//! discard and write-zeroes. [`open`] opens a file, takes an exclusive lock on it (a shared one
//! for read-only use) so two VMs never write one image, and picks the format.
//!
//! Threading: an image is used by one thread at a time (the block device's worker).

mod iov;
mod lock;
pub mod mem;
pub mod raw;

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use vm_memory::VolatileSlice;

pub use iov::{slices_len, Slices};

/// Guest memory buffers of one request.
pub type Buffers<'a, 'b> = &'a [VolatileSlice<'b, ()>];

/// A disk image as block devices use it.
pub trait DiskImage: Send {
    /// Virtual size in bytes.
    fn size(&self) -> u64;
    /// Fills `buffers` with the bytes at `offset`.
    fn read_at(&mut self, offset: u64, buffers: Buffers<'_, '_>) -> io::Result<()>;
    /// Writes `buffers` at `offset`.
    fn write_at(&mut self, offset: u64, buffers: Buffers<'_, '_>) -> io::Result<()>;
    /// Makes everything written so far durable.
    fn flush(&mut self) -> io::Result<()>;
    /// Tells the image `len` bytes at `offset` are unused (reads may return anything; raw files
    /// read zeroes).
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()>;
    /// Makes `len` bytes at `offset` read as zeroes; `may_unmap` allows freeing the space.
    fn write_zeroes(&mut self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()>;
}

/// Image formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
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
    #[error("{} is a qcow2 image; qcow2 is not supported yet", path.display())]
    Qcow2Unsupported { path: PathBuf },
    #[error("{} is not a regular file or block device", path.display())]
    NotADisk { path: PathBuf },
}

const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// Opens the image at `path` (format detected from its first bytes unless `format` is given).
pub fn open(
    path: &Path,
    read_only: bool,
    format: Option<Format>,
) -> Result<Box<dyn DiskImage>, OpenError> {
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
    use std::os::unix::fs::FileTypeExt;
    if !(kind.is_file() || kind.is_block_device()) {
        return Err(OpenError::NotADisk {
            path: path.to_path_buf(),
        });
    }
    match lock::lock(&file, !read_only) {
        Ok(true) => {}
        Ok(false) => {
            return Err(OpenError::Locked {
                path: path.to_path_buf(),
            })
        }
        Err(e) => return Err(open_err(e)),
    }
    let format = match format {
        Some(format) => format,
        None => detect(&file).map_err(open_err)?,
    };
    match format {
        Format::Raw => Ok(Box::new(raw::RawImage::new(file).map_err(open_err)?)),
        Format::Qcow2 => Err(OpenError::Qcow2Unsupported {
            path: path.to_path_buf(),
        }),
    }
}

fn detect(file: &std::fs::File) -> io::Result<Format> {
    use std::os::unix::fs::FileExt;
    let mut magic = [0u8; 4];
    let n = file.read_at(&mut magic, 0)?;
    Ok(if n == 4 && magic == QCOW2_MAGIC {
        Format::Qcow2
    } else {
        Format::Raw
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qcow2_is_detected_and_refused_instead_of_read_raw() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.qcow2");
        std::fs::write(&path, b"QFI\xfb\0\0\0\x03").unwrap();
        assert!(matches!(
            open(&path, false, None),
            Err(OpenError::Qcow2Unsupported { .. })
        ));
        // Forcing raw is the user's explicit choice.
        assert!(open(&path, false, Some(Format::Raw)).is_ok());
    }

    #[test]
    fn a_second_writer_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let first = open(&path, false, None).unwrap();
        assert!(matches!(
            open(&path, false, None),
            Err(OpenError::Locked { .. })
        ));
        assert!(matches!(
            open(&path, true, None),
            Err(OpenError::Locked { .. })
        ));
        drop(first);
        let reader = open(&path, true, None).unwrap();
        let second_reader = open(&path, true, None).unwrap();
        assert!(matches!(
            open(&path, false, None),
            Err(OpenError::Locked { .. })
        ));
        drop((reader, second_reader));
    }

    #[test]
    fn directories_and_missing_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            open(dir.path(), true, None),
            Err(OpenError::NotADisk { .. })
        ));
        assert!(matches!(
            open(&dir.path().join("nope"), true, None),
            Err(OpenError::Open { .. })
        ));
        assert_eq!("qcow2".parse::<Format>(), Ok(Format::Qcow2));
        assert!("vmdk".parse::<Format>().is_err());
    }
}
