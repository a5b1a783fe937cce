//! Clones: a linked clone (a qcow2 overlay on the source) or a full, standalone copy, made
//! in a hidden file and put in place only when whole (see [`super::partial`]), answered once
//! copied and synced by [`super::write_back`]. A raw or standalone qcow2 source is copied as
//! a file ([`super::sparse_copy`]); anything else through its image format.
//!
//! Threading: one clone runs on the calling blocking task (the file copy on up to 4 threads
//! of its own); its source is open under a shared lock for the whole copy.

use std::path::Path;

use api::pool_api::{VolumeClone, VolumeCreate, VolumeInfo};
use block::manage::{self, NewImage};
use block::Format;

use super::volume_format;
use super::volumes::{check_volume_name, format_error};
use super::{partial, sparse_copy, write_back};
use super::{Pools, CLUSTER_SIZE, COPY_CHUNK, WRITE_OUT_EVERY};
use crate::failure::{chain, Failure};

impl Pools {
    /// A linked clone (qcow2 overlay) or a full, standalone copy of `source`.
    pub fn clone_volume(
        &self,
        pool: &str,
        source: &str,
        request: &VolumeClone,
    ) -> Result<VolumeInfo, Failure> {
        self.clone_volume_with_progress(pool, source, request, &mut |_, _| {})
    }

    /// Like [`Pools::clone_volume`]; a full copy tells `progress` (bytes done, total) as it
    /// goes.
    pub fn clone_volume_with_progress(
        &self,
        pool: &str,
        source: &str,
        request: &VolumeClone,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<VolumeInfo, Failure> {
        let source = self.usable_volume(pool, source)?;
        if request.linked {
            return self.create_volume(
                pool,
                &VolumeCreate {
                    name: request.name.clone(),
                    size: None,
                    format: Some("qcow2".into()),
                    backing: Some(source.name.clone()),
                },
            );
        }
        check_volume_name(&request.name)?;
        let dir = self.active_dir(pool)?;
        let _claim = self.claim(pool, &request.name)?;
        let target = dir.join(&request.name);
        if target.exists() {
            return Err(Failure::conflict(format!(
                "a volume named {} already exists in pool {pool}",
                request.name
            )));
        }
        self.check_space(&dir, pool, source.allocation_bytes)?;
        // The copy becomes the volume only when complete (see `partial`), and reaches
        // storage in the background (see `write_back`).
        let copy = partial::path(&dir, &request.name, "clone");
        let mut marker = None;
        let locked = lock_source(&source)?;
        let copy_format = locked.plan.format();
        let result = create_like(locked.plan, &copy)
            .and_then(|()| {
                let begun = write_back::begin(&dir, &request.name, &copy);
                marker = Some(begun.map_err(|e| {
                    Failure::internal(format!("cannot record the clone in {}: {e}", dir.display()))
                })?);
                full_copy(locked, &copy, progress)
            })
            .and_then(|()| {
                // Before the copy has the volume's name, so it is never probed.
                volume_format::record(&target, &copy, copy_format)
                    .map_err(|e| Failure::internal(chain(&e)))
            })
            .and_then(|()| {
                partial::publish_new(&copy, &target).map_err(|e| match e.kind() {
                    std::io::ErrorKind::AlreadyExists => Failure::conflict(format!(
                        "a volume named {} was created in pool {pool} during the copy",
                        request.name
                    )),
                    _ => Failure::internal(format!("cannot create {}: {e}", target.display())),
                })
            });
        match (result, marker) {
            (Ok(()), Some(marker)) => self.write_back.settle(marker),
            (result, marker) => {
                volume_format::unrecord(&target, &copy);
                let _ = std::fs::remove_file(&copy);
                if let Some(marker) = marker {
                    marker.abandon();
                }
                result?;
            }
        }
        self.volume(pool, &request.name)
    }
}

/// How a full clone copies its source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CopyPlan {
    /// The file as it is, data segments only: a raw volume, or a qcow2 one that stands alone
    /// (no backing file, and neither dirty nor corrupt, which the copy should not inherit).
    /// Its internal snapshots come along.
    File { format: Format, len: u64 },
    /// Through the image format: what the source reads as, its backing chain flattened in.
    Image { format: Format, size: u64 },
}

impl CopyPlan {
    /// The format the copy will be.
    pub(super) fn format(self) -> Format {
        match self {
            CopyPlan::File { format, .. } | CopyPlan::Image { format, .. } => format,
        }
    }
}

/// A clone's source, open and under its shared lock for the whole copy: a VM writing it makes
/// the clone fail clearly, and nothing resizes it or takes a snapshot meanwhile.
struct LockedSource {
    image: Box<dyn block::DiskImage>,
    /// The same file (checked), for the file copy.
    file: std::fs::File,
    plan: CopyPlan,
}

fn lock_source(source: &VolumeInfo) -> Result<LockedSource, Failure> {
    use std::os::unix::fs::MetadataExt;
    let io = |e: std::io::Error| {
        Failure::internal(format!("cannot read {}: {e}", source.path.display()))
    };
    let file = std::fs::File::open(&source.path).map_err(io)?;
    // The record of the file opened, not of whatever had the name when it was described.
    let format = volume_format::format_of_open(&source.path, &file).map_err(format_error)?;
    let image =
        block::open(&source.path, true, Some(format)).map_err(|e| Failure::conflict(chain(&e)))?;
    // An upload may have put another file in the volume's place between the two opens.
    let opened = file.metadata().map_err(io)?;
    if std::fs::metadata(&source.path).map_err(io)?.ino() != opened.ino() {
        return Err(Failure::conflict(format!(
            "volume {} was replaced during the clone; clone it again",
            source.name
        )));
    }
    let stands_alone = match format {
        Format::Raw => true,
        Format::Qcow2 => {
            let header = block::qcow2::read_header(&file).map_err(io)?;
            let unfit = block::qcow2::header::incompatible::DIRTY
                | block::qcow2::header::incompatible::CORRUPT;
            header.backing_file.is_none() && header.incompatible_features & unfit == 0
        }
    };
    let plan = match stands_alone {
        true => CopyPlan::File {
            format,
            len: opened.len(),
        },
        false => CopyPlan::Image {
            format,
            size: image.size(),
        },
    };
    Ok(LockedSource { image, file, plan })
}

/// Creates `target` for the copy: an empty file of the source file's length, or an empty
/// image of its format and size without a backing file.
fn create_like(plan: CopyPlan, target: &Path) -> Result<(), Failure> {
    let (format, size) = match plan {
        CopyPlan::File { len, .. } => {
            // Any length: qemu-img does not pad its qcow2 files to 512 bytes.
            let created = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(target)
                .and_then(|file| file.set_len(len));
            return created.map_err(|e| {
                Failure::internal(format!("cannot create {}: {e}", target.display()))
            });
        }
        CopyPlan::Image { format, size } => (format, size),
    };
    let new = NewImage {
        format,
        size: Some(size),
        cluster_size: CLUSTER_SIZE,
        backing: None,
        backing_format: None,
    };
    manage::create(target, &new).map_err(|e| Failure::internal(chain(&e)))
}

/// Copies `source` into `target`, made by [`create_like`]; holes and (through the format)
/// all-zero chunks stay unallocated (thin).
fn full_copy(
    source: LockedSource,
    target: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), Failure> {
    let io = |e: std::io::Error| Failure::internal(format!("copy failed: {e}"));
    let LockedSource {
        image: mut from,
        file,
        plan,
    } = source;
    let (format, size) = match plan {
        CopyPlan::File { len, .. } => {
            return sparse_copy::copy_raw(file, target, len, progress).map_err(io);
        }
        CopyPlan::Image { format, size } => (format, size),
    };
    let mut to =
        block::open(target, false, Some(format)).map_err(|e| Failure::internal(chain(&e)))?;
    // No one sees the copy before it is whole, and `write_back` syncs it afterwards.
    to.skip_barriers();
    // Its own descriptor of the new image, to start the write-out of a large copy as it goes.
    let target_file = std::fs::File::open(target).map_err(io)?;
    let mut buf = vec![0u8; COPY_CHUNK];
    let (mut offset, mut written, mut unstarted) = (0, 0, 0);
    while offset < size {
        let len = (size - offset).min(COPY_CHUNK as u64) as usize;
        let chunk = &mut buf[..len];
        from.read_at(offset, &[vm_memory::VolatileSlice::from(&mut *chunk)])
            .map_err(io)?;
        if !is_all_zero(chunk) {
            to.write_at(offset, &[vm_memory::VolatileSlice::from(&mut *chunk)])
                .map_err(io)?;
            written += len as u64;
            unstarted += len;
            if written > sparse_copy::WINDOW && unstarted >= WRITE_OUT_EVERY {
                sparse_copy::start_write_out_all(&target_file);
                unstarted = 0;
            }
        }
        offset += len as u64;
        progress(offset, size);
    }
    to.flush().map_err(io)
}

/// Whether `bytes` are all zero; 4 KiB at a time, each folded without an early exit so the
/// compiler vectorizes it (a byte-by-byte search took longer than the copy itself).
fn is_all_zero(bytes: &[u8]) -> bool {
    bytes
        .chunks(4096)
        .all(|block| block.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

#[cfg(test)]
mod tests;
