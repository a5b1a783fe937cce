//! Opening an image file: locking, its format, and the backing chain.
//!
//! A writable image is locked exclusively, a read-only one (and every backing file) shared, so
//! two VMs never write one image and nobody writes a base others read. Backing file names are
//! resolved relative to the directory of the image that names them, as QEMU does, but a chain
//! stays where its owner put it: a backing file's format comes from the header naming it,
//! never from the backing file's own bytes, and it must lie in the top image's directory (or
//! one the caller allows). An image's own format is probed only when the caller does not know
//! it (see [`crate::probe`]).
//!
//! Threading: called on the opening thread; the opened image follows [`DiskImage`]'s rules.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

pub use crate::probe::detect;
use crate::qcow2::{self, Qcow2Image};
use crate::{raw, DiskImage};

/// The deepest backing chain accepted (QEMU's limit is of the same order).
pub const MAX_CHAIN_DEPTH: usize = 64;

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
    #[error("cannot tell the format of {}", path.display())]
    Unrecognized {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} names an unknown backing format {name:?}", path.display())]
    BackingFormat { path: PathBuf, name: String },
    #[error(
        "{} names backing file {name:?} without its format, and Ferro never guesses a backing \
         file's format: record it with `qemu-img rebase -u -b {name} -F raw|qcow2 {}`",
        path.display(),
        path.display()
    )]
    BackingFormatMissing { path: PathBuf, name: String },
    #[error(
        "{} names backing file {}, outside {}: allow that directory with backing_dir=DIR",
        path.display(),
        backing.display(),
        dir.display()
    )]
    BackingOutside {
        path: PathBuf,
        backing: PathBuf,
        dir: PathBuf,
    },
    #[error(
        "{} names backing file {}, which is not a regular file (a device needs backing_dir=DIR)",
        path.display(),
        backing.display()
    )]
    BackingNotAFile { path: PathBuf, backing: PathBuf },
    #[error("the backing chain of {} loops back to {}", path.display(), backing.display())]
    BackingLoop { path: PathBuf, backing: PathBuf },
    #[error("the backing chain of {} is deeper than {MAX_CHAIN_DEPTH} images", path.display())]
    ChainTooDeep { path: PathBuf },
}

/// How to open an image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageOptions {
    /// Open for reading only (shared lock).
    pub read_only: bool,
    /// The image's format, as its owner gave it. `None` probes it from the first bytes: only
    /// for images nobody said the format of, since a guest decides a raw disk's first bytes.
    /// A raw image opened that way refuses guest writes that would make it probe as another
    /// format.
    pub format: Option<Format>,
    /// A directory backing files may come from besides the image's own directory (and the
    /// directories below it, which the image's own directory does not include); backing files
    /// there may also be block devices.
    pub backing_dir: Option<PathBuf>,
}

/// Opens the image at `path` (format probed from its first bytes unless `format` is given;
/// see [`ImageOptions::format`]) with its whole backing chain.
pub fn open(
    path: &Path,
    read_only: bool,
    format: Option<Format>,
) -> Result<Box<dyn DiskImage>, OpenError> {
    open_with(
        path,
        &ImageOptions {
            read_only,
            format,
            backing_dir: None,
        },
    )
}

/// Opens the image at `path` with its backing chain, as `options` say.
///
/// Every backing file must name its format in the header of the image above it (never
/// probed: a guest could have written the backing file's first bytes) and must resolve, after
/// symbolic links, to a regular file in the directory of `path` itself (not a directory below
/// it: an image in a home directory must not reach `.ssh/`), or to a file or block device
/// under [`ImageOptions::backing_dir`].
pub fn open_with(path: &Path, options: &ImageOptions) -> Result<Box<dyn DiskImage>, OpenError> {
    let canonical = |p: &Path| {
        p.canonicalize().map_err(|source| OpenError::Open {
            path: p.to_path_buf(),
            source,
        })
    };
    let image_dir = match canonical(path)?.parent() {
        Some(dir) => dir.to_path_buf(),
        None => PathBuf::from("/"),
    };
    let mut chain = Chain {
        seen: HashSet::new(),
        image_dir,
        backing_dir: options.backing_dir.as_deref().map(canonical).transpose()?,
    };
    open_in_chain(path, options.read_only, options.format, &mut chain)
}

/// Where the images of one chain may come from, and the images seen so far.
#[derive(Debug)]
struct Chain {
    /// The images above the one being opened (to detect loops).
    seen: HashSet<PathBuf>,
    /// The top image's directory, canonical: backing files may be files in it, not below it.
    image_dir: PathBuf,
    /// [`ImageOptions::backing_dir`], canonical.
    backing_dir: Option<PathBuf>,
}

impl Chain {
    /// The canonical path and format of backing file `name` of the image at `path`, if the
    /// chain may use it.
    fn backing(
        &self,
        path: &Path,
        name: &str,
        format: Option<&str>,
    ) -> Result<(PathBuf, Format), OpenError> {
        let format = match format {
            None => {
                return Err(OpenError::BackingFormatMissing {
                    path: path.to_path_buf(),
                    name: name.to_string(),
                })
            }
            Some(format) => format.parse().map_err(|_| OpenError::BackingFormat {
                path: path.to_path_buf(),
                name: format.to_string(),
            })?,
        };
        let named = backing_path(path, name);
        let resolved = named.canonicalize().map_err(|source| OpenError::Open {
            path: named.clone(),
            source,
        })?;
        let in_backing_dir = self
            .backing_dir
            .as_ref()
            .is_some_and(|dir| resolved.starts_with(dir));
        let in_image_dir = resolved.parent() == Some(self.image_dir.as_path());
        if !in_backing_dir && !in_image_dir {
            return Err(OpenError::BackingOutside {
                path: path.to_path_buf(),
                backing: resolved,
                dir: self.image_dir.clone(),
            });
        }
        let kind = std::fs::metadata(&resolved)
            .map_err(|source| OpenError::Open {
                path: resolved.clone(),
                source,
            })?
            .file_type();
        if !kind.is_file() && !in_backing_dir {
            return Err(OpenError::BackingNotAFile {
                path: path.to_path_buf(),
                backing: resolved,
            });
        }
        Ok((resolved, format))
    }
}

/// Opens one image of a chain.
fn open_in_chain(
    path: &Path,
    read_only: bool,
    format: Option<Format>,
    chain: &mut Chain,
) -> Result<Box<dyn DiskImage>, OpenError> {
    let open_err = |source| OpenError::Open {
        path: path.to_path_buf(),
        source,
    };
    let file = open_locked(path, read_only)?;
    let probed = format.is_none();
    let format = given_or_probed(path, &file, format)?;
    let invalid = |source| OpenError::Invalid {
        path: path.to_path_buf(),
        format,
        source,
    };
    match format {
        Format::Raw if probed => Ok(Box::new(raw::RawImage::probed(file).map_err(open_err)?)),
        Format::Raw => Ok(Box::new(raw::RawImage::new(file).map_err(open_err)?)),
        Format::Qcow2 => {
            let header = qcow2::read_header(&file).map_err(invalid)?;
            let backing = match &header.backing_file {
                None => None,
                Some(name) => {
                    let canonical = path.canonicalize().map_err(open_err)?;
                    if !chain.seen.insert(canonical) {
                        return Err(OpenError::BackingLoop {
                            path: path.to_path_buf(),
                            backing: path.to_path_buf(),
                        });
                    }
                    if chain.seen.len() > MAX_CHAIN_DEPTH {
                        return Err(OpenError::ChainTooDeep {
                            path: path.to_path_buf(),
                        });
                    }
                    let (backing_path, backing_format) =
                        chain.backing(path, name, header.backing_format.as_deref())?;
                    if chain.seen.contains(&backing_path) {
                        return Err(OpenError::BackingLoop {
                            path: path.to_path_buf(),
                            backing: backing_path,
                        });
                    }
                    Some(open_in_chain(
                        &backing_path,
                        true,
                        Some(backing_format),
                        chain,
                    )?)
                }
            };
            Ok(Box::new(
                Qcow2Image::open(file, !read_only, backing).map_err(invalid)?,
            ))
        }
    }
}

/// `format`, or when the caller does not know it, what the first bytes of `file` (the image
/// at `path`) say.
pub(crate) fn given_or_probed(
    path: &Path,
    file: &File,
    format: Option<Format>,
) -> Result<Format, OpenError> {
    match format {
        Some(format) => Ok(format),
        None => detect(file).map_err(|source| OpenError::Unrecognized {
            path: path.to_path_buf(),
            source,
        }),
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
    // Open file description locks, as QEMU takes them: they go with the file when it closes.
    match host_sys::file::lock(&file, !read_only) {
        Ok(true) => Ok(file),
        Ok(false) => Err(OpenError::Locked {
            path: path.to_path_buf(),
        }),
        Err(e) => Err(open_err(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qcow2::CreateOptions;
    use std::io::ErrorKind;
    use vm_memory::VolatileSlice;

    /// A 1 MiB qcow2 image at `path` naming `backing` (with `format`) as its backing file.
    fn overlay(path: &Path, backing: &str, format: Option<&str>) {
        let file = File::create_new(path).unwrap();
        let options = CreateOptions {
            size: 1 << 20,
            cluster_bits: 16,
            backing: Some((backing.to_string(), format.map(String::from))),
        };
        qcow2::create(&file, &options).unwrap();
    }

    fn write(image: &mut dyn DiskImage, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut data = data.to_vec();
        image.write_at(offset, &[VolatileSlice::from(&mut data[..])])
    }

    #[test]
    fn a_probed_raw_disk_cannot_be_disguised_by_its_guest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        let mut probed = open(&path, false, None).unwrap();
        let err = write(&mut *probed, 0, b"QFI\xfb\0\0\0\x03").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
        // Piece by piece is the same.
        write(&mut *probed, 0, b"QF").unwrap();
        let err = write(&mut *probed, 2, b"I\xfb").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
        // Through the concurrent path too, and for other formats' signatures.
        let concurrent = probed.concurrent_io().unwrap();
        let mut vmdk = b"KDMV".to_vec();
        let err = concurrent
            .write_at(0, &[VolatileSlice::from(&mut vmdk[..])])
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
        // An empty buffer in front changes nothing.
        let (mut empty, mut magic) = (Vec::new(), b"QFI\xfb".to_vec());
        let err = concurrent
            .write_at(
                0,
                &[
                    VolatileSlice::from(&mut empty[..]),
                    VolatileSlice::from(&mut magic[..]),
                ],
            )
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
        // Anything else goes through: other bytes of sector 0, and the rest of the disk.
        write(&mut *probed, 0, b"\xeb\x63\x90MSDOS").unwrap();
        write(&mut *probed, 512, b"QFI\xfb\0\0\0\x03").unwrap();
        probed.write_zeroes(0, 512, false).unwrap();
        drop((probed, concurrent));
        assert_eq!(std::fs::read(&path).unwrap()[..8], [0u8; 8]);
        // A disk whose owner said raw is the guest's to write, all of it.
        let mut raw = open(&path, false, Some(Format::Raw)).unwrap();
        write(&mut *raw, 0, b"QFI\xfb\0\0\0\x03").unwrap();
        drop(raw);
        // ...and is never read as qcow2 unless its owner says so.
        assert!(open(&path, true, Some(Format::Raw)).is_ok());
    }

    #[test]
    fn a_guest_changing_its_buffer_during_the_check_cannot_disguise_its_disk() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        let image = open(&path, false, None).unwrap();
        let io = image.concurrent_io().unwrap();
        let mem = Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4096)]).unwrap());
        // Another vCPU flips the buffer between the magic and zeroes as fast as it can.
        let stop = Arc::new(AtomicBool::new(false));
        let flipper = {
            let (mem, stop) = (mem.clone(), stop.clone());
            std::thread::spawn(move || {
                for n in 0u64.. {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let bytes: &[u8] = if n % 2 == 0 { b"QFI\xfb" } else { b"\0\0\0\0" };
                    mem.write_slice(bytes, GuestAddress(0)).unwrap();
                }
            })
        };
        let file = File::open(&path).unwrap();
        let mut landed = None;
        for attempt in 0..20_000 {
            let slice = mem.get_slice(GuestAddress(0), 512).unwrap();
            let _ = io.write_at(0, &[slice]);
            let mut first = [0u8; 4];
            std::os::unix::fs::FileExt::read_exact_at(&file, &mut first, 0).unwrap();
            if &first == b"QFI\xfb" {
                landed = Some(attempt);
                break;
            }
        }
        stop.store(true, Ordering::Relaxed);
        flipper.join().unwrap();
        assert_eq!(landed, None, "the magic reached sector 0");
    }

    #[test]
    fn formats_ferro_does_not_open_are_not_taken_for_raw() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.vmdk");
        std::fs::write(&path, b"KDMV\x01\0\0\0").unwrap();
        let err = open(&path, true, None).err().unwrap();
        assert!(matches!(err, OpenError::Unrecognized { .. }), "{err}");
        open(&path, true, Some(Format::Raw)).unwrap();
    }

    #[test]
    fn a_backing_file_stays_in_the_image_directory() {
        let dir = tempfile::tempdir().unwrap();
        let (images, outside) = (dir.path().join("images"), dir.path().join("outside"));
        std::fs::create_dir_all(images.join("bases")).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("secret"), vec![7u8; 1 << 20]).unwrap();
        std::fs::write(images.join("bases/base.raw"), vec![0u8; 1 << 20]).unwrap();
        std::os::unix::fs::symlink(outside.join("secret"), images.join("link")).unwrap();
        let secret = outside.join("secret");
        let cases = [
            ("../outside/secret", "outside"),
            (secret.to_str().unwrap(), "outside"),
            ("link", "outside"),
            ("/dev/zero", "outside"),
        ];
        for (i, (backing, why)) in cases.into_iter().enumerate() {
            let top = images.join(format!("top{i}.qcow2"));
            overlay(&top, backing, Some("raw"));
            let err = open(&top, false, None).err().unwrap();
            assert!(
                matches!(err, OpenError::BackingOutside { .. }),
                "{backing}: {err}"
            );
            assert!(err.to_string().contains(why), "{err}");
            // The user may allow the directory explicitly.
            let allowed_dir = match backing {
                "/dev/zero" => PathBuf::from("/dev"),
                _ => outside.clone(),
            };
            let allowed = ImageOptions {
                read_only: false,
                format: Some(Format::Qcow2),
                backing_dir: Some(allowed_dir),
            };
            match open_with(&top, &allowed) {
                // A character device is no disk, allowed or not.
                Err(OpenError::NotADisk { path }) => assert_eq!(path, Path::new("/dev/zero")),
                opened => drop(opened.unwrap()),
            }
        }
        // In the image's own directory, by relative or absolute name: fine.
        std::fs::write(images.join("base.raw"), vec![0u8; 1 << 20]).unwrap();
        overlay(&images.join("rel.qcow2"), "base.raw", Some("raw"));
        open(&images.join("rel.qcow2"), false, Some(Format::Qcow2)).unwrap();
        let absolute = images.join("base.raw");
        overlay(
            &images.join("abs.qcow2"),
            absolute.to_str().unwrap(),
            Some("raw"),
        );
        open(&images.join("abs.qcow2"), false, Some(Format::Qcow2)).unwrap();
        // Below it (an image in a home directory naming .ssh/id_rsa): only with backing_dir.
        overlay(&images.join("sub.qcow2"), "bases/base.raw", Some("raw"));
        let err = open(&images.join("sub.qcow2"), false, None).err().unwrap();
        assert!(matches!(err, OpenError::BackingOutside { .. }), "{err}");
        let allowed = ImageOptions {
            read_only: true,
            format: Some(Format::Qcow2),
            backing_dir: Some(images.join("bases")),
        };
        open_with(&images.join("sub.qcow2"), &allowed).unwrap();
        // A device in the directory is no backing file without backing_dir.
        let fifo = images.join("fifo");
        host_sys::file::make_fifo(&fifo, 0o600).unwrap();
        overlay(&images.join("fifo.qcow2"), "fifo", Some("raw"));
        let err = open(&images.join("fifo.qcow2"), false, None).err().unwrap();
        assert!(matches!(err, OpenError::BackingNotAFile { .. }), "{err}");
    }

    #[test]
    fn a_backing_file_format_is_never_probed() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.img");
        std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
        overlay(&dir.path().join("top.qcow2"), "base.img", None);
        let err = open(&dir.path().join("top.qcow2"), false, None)
            .err()
            .unwrap();
        assert!(
            matches!(err, OpenError::BackingFormatMissing { .. }),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("qemu-img rebase -u -b base.img -F"),
            "{err}"
        );
        // The header's word decides, whatever the backing file's bytes say: a raw base whose
        // guest wrote a qcow2 header is still read as raw data.
        overlay(&dir.path().join("named.qcow2"), "base.img", Some("raw"));
        let header = std::fs::read(dir.path().join("top.qcow2")).unwrap();
        std::fs::write(
            &base,
            [&header[..], &vec![0u8; (1 << 20) - header.len()]].concat(),
        )
        .unwrap();
        let mut image = open(&dir.path().join("named.qcow2"), true, None).unwrap();
        let mut first = [0u8; 4];
        image
            .read_at(0, &[VolatileSlice::from(&mut first[..])])
            .unwrap();
        assert_eq!(&first, b"QFI\xfb");
    }
}
