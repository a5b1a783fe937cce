//! A pool's volumes: listing and describing them (a volume whose format was never confirmed
//! shows as `unknown`), creating, resizing and deleting them, their formats, what a VM may
//! open, and the check that a backing chain stays in the pool.
//!
//! Threading: called from the API's blocking tasks; the pool table's lock is held only to
//! find a pool's directory.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use api::pool_api::{VolumeCreate, VolumeInfo};
use block::manage::{self, NewImage};
use block::Format;

use super::volume_format::{self, FormatError};
use super::write_back;
use super::{fs_space, Pools, CLUSTER_SIZE};
use crate::failure::{chain, Failure};

pub(super) fn volume_not_found(pool: &str, name: &str) -> Failure {
    Failure::not_found(format!("no volume named {name:?} in pool {pool}"))
}

pub(super) fn check_volume_name(name: &str) -> Result<(), Failure> {
    api::daemon_api::check_name(name)
        .map_err(|e| Failure::invalid(e.replace("VM name", "volume name")))
}

pub(super) fn parse_format(format: Option<&str>) -> Result<Format, Failure> {
    match format.unwrap_or("qcow2") {
        "qcow2" => Ok(Format::Qcow2),
        "raw" => Ok(Format::Raw),
        other => Err(Failure::invalid(format!(
            "unknown volume format {other:?} (qcow2 or raw)"
        ))),
    }
}

impl Pools {
    // ----- volumes -----

    /// Names of the volumes of an active pool (regular files with valid volume names).
    pub(super) fn volume_names(&self, pool: &str) -> Result<(PathBuf, Vec<String>), Failure> {
        let dir = self.active_dir(pool)?;
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .map_err(|e| Failure::internal(format!("cannot list {}: {e}", dir.display())))?
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| check_volume_name(n).is_ok())
            .collect();
        names.sort();
        Ok((dir, names))
    }

    /// Every volume of an active pool; one that cannot be described is listed with what its
    /// file shows (and the reason logged), not left out.
    pub fn volumes(&self, pool: &str) -> Result<Vec<VolumeInfo>, Failure> {
        let (dir, names) = self.volume_names(pool)?;
        Ok(names
            .iter()
            .map(|name| {
                volume_info(pool, &dir, name).unwrap_or_else(|e| {
                    tracing::warn!("volume {name} of pool {pool}: {}", e.message);
                    undescribed_volume(pool, &dir, name, "unknown")
                })
            })
            .collect())
    }

    pub fn volume(&self, pool: &str, name: &str) -> Result<VolumeInfo, Failure> {
        check_volume_name(name)?;
        let dir = self.active_dir(pool)?;
        // A regular file, not a symlink that could lead out of the pool.
        let is_file =
            std::fs::symlink_metadata(dir.join(name)).is_ok_and(|m| m.file_type().is_file());
        if !is_file {
            return Err(volume_not_found(pool, name));
        }
        volume_info(pool, &dir, name)
    }

    /// Where volume `name` of `pool` is or would be (no checks beyond the names).
    pub fn volume_location(&self, pool: &str, name: &str) -> Option<PathBuf> {
        check_volume_name(name).ok()?;
        self.lock()
            .get(pool)
            .ok()
            .map(|e| e.definition.path.join(name))
    }

    /// Volume `name` of `pool`, refused if it may miss data (see `write_back`) or if its
    /// backing chain leaves the pool.
    pub(super) fn usable_volume(&self, pool: &str, name: &str) -> Result<VolumeInfo, Failure> {
        let volume = self.volume(pool, name)?;
        if volume.incomplete {
            return Err(Failure::conflict(format!(
                "volume {name} may miss data (the host went down before its clone was on \
                 storage); delete it and clone it again"
            )));
        }
        let format = volume_format::format_of(&volume.path).map_err(format_error)?;
        let dir = self.active_dir(pool)?;
        check_chain(pool, &dir, &volume.path, format, name).map_err(Failure::conflict)?;
        Ok(volume)
    }

    /// Records `format` as volume `name`'s, an administrator's word for a volume whose format
    /// was never recorded (or was recorded wrongly); `in_use` names a VM running or starting
    /// with it, which refuses the change.
    pub fn set_format(
        &self,
        pool: &str,
        name: &str,
        format: &str,
        in_use: impl Fn(&Path) -> Option<String>,
    ) -> Result<VolumeInfo, Failure> {
        let format = parse_format(Some(format))?;
        let _claim = self.claim(pool, name)?;
        let path = self.volume(pool, name)?.path;
        if let Some(vm) = in_use(&path) {
            return Err(Failure::conflict(format!(
                "VM {vm} is running with volume {name}; shut it down first"
            )));
        }
        volume_format::confirm(&path, format).map_err(|e| Failure::internal(chain(&e)))?;
        tracing::info!(
            "volume {name} of pool {pool} confirmed as {}",
            format.name()
        );
        self.volume(pool, name)
    }

    /// Records the format a VM definition gives a volume that has no record yet (at daemon
    /// start, before anything probes it): the definition's author said what it is.
    pub fn seed_format(&self, pool: &str, name: &str, format: &str) {
        let (Ok(format), Some(path)) =
            (parse_format(Some(format)), self.volume_location(pool, name))
        else {
            return;
        };
        if !std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_file()) {
            return;
        }
        match volume_format::seed(&path, format) {
            Ok(true) => tracing::info!(
                "volume {name} of pool {pool}: recorded as {} from a VM definition",
                format.name()
            ),
            Ok(false) => {}
            Err(e) => tracing::warn!("volume {name} of pool {pool}: {}", chain(&e)),
        }
    }

    /// The path and recorded format of volume `name` of `pool`, for a VM's disk.
    pub fn volume_for_vm(
        &self,
        pool: &str,
        name: &str,
    ) -> Result<api::daemon_api::ResolvedVolume, Failure> {
        let volume = self.usable_volume(pool, name)?;
        Ok(api::daemon_api::ResolvedVolume {
            path: volume.path,
            format: volume.format,
        })
    }

    pub fn create_volume(&self, pool: &str, request: &VolumeCreate) -> Result<VolumeInfo, Failure> {
        check_volume_name(&request.name)?;
        let dir = self.active_dir(pool)?;
        let format = parse_format(request.format.as_deref())?;
        let _claim = self.claim(pool, &request.name)?;
        let path = dir.join(&request.name);
        if path.exists() {
            return Err(Failure::conflict(format!(
                "a volume named {} already exists in pool {pool}",
                request.name
            )));
        }
        let backing = match &request.backing {
            Some(base) => {
                if format != Format::Qcow2 {
                    return Err(Failure::invalid(
                        "only qcow2 volumes can have a backing volume",
                    ));
                }
                Some(self.usable_volume(pool, base)?)
            }
            None => None,
        };
        let size = match (request.size, &backing) {
            (Some(size), _) => size.0,
            (None, Some(base)) => base.capacity_bytes,
            (None, None) => return Err(Failure::invalid("a new volume needs a size")),
        };
        self.check_space(&dir, pool, size)?;
        let new = NewImage {
            format,
            size: Some(size),
            cluster_size: CLUSTER_SIZE,
            // Same directory: the plain name keeps the pair movable.
            backing: backing.as_ref().map(|b| b.name.clone()),
            backing_format: backing
                .as_ref()
                .map(|b| b.format.parse())
                .transpose()
                .map_err(Failure::internal)?,
        };
        manage::create(&path, &new).map_err(|e| Failure::invalid(chain(&e)))?;
        if let Err(e) = volume_format::record(&path, &path, format) {
            let _ = std::fs::remove_file(&path);
            return Err(Failure::internal(chain(&e)));
        }
        self.volume(pool, &request.name)
    }

    /// Refuses a volume larger than the pool's free space.
    pub(super) fn check_space(&self, dir: &Path, pool: &str, size: u64) -> Result<(), Failure> {
        if let Some((_, available)) = fs_space(dir) {
            if size > available {
                return Err(Failure::conflict(format!(
                    "pool {pool} has {} free; the volume needs {}",
                    api::ByteSize(available),
                    api::ByteSize(size)
                )));
            }
        }
        Ok(())
    }

    /// Deletes a volume unless another volume is an overlay of it or `in_use` says a VM uses it.
    pub fn delete_volume(
        &self,
        pool: &str,
        name: &str,
        in_use: impl Fn(&Path) -> Option<String>,
    ) -> Result<(), Failure> {
        let volume = self.volume(pool, name)?;
        if let Some(overlay) = self
            .volumes(pool)?
            .iter()
            .find(|v| v.backing.as_deref() == Some(name))
        {
            return Err(Failure::conflict(format!(
                "volume {name} is the backing of {}; delete that first",
                overlay.name
            )));
        }
        if let Some(vm) = in_use(&volume.path) {
            return Err(Failure::conflict(format!(
                "volume {name} is a disk of VM {vm}"
            )));
        }
        let _claim = self.claim(pool, name)?;
        let inode = volume_format::inode_of(&volume.path);
        std::fs::remove_file(&volume.path).map_err(|e| {
            Failure::internal(format!("cannot delete {}: {e}", volume.path.display()))
        })?;
        write_back::forget(&volume.path);
        if let Ok(inode) = inode {
            volume_format::forget(&volume.path, inode);
        }
        Ok(())
    }

    pub fn resize_volume(&self, pool: &str, name: &str, size: u64) -> Result<VolumeInfo, Failure> {
        let volume = self.volume(pool, name)?;
        if size > volume.capacity_bytes {
            let dir = self.active_dir(pool)?;
            self.check_space(&dir, pool, size - volume.capacity_bytes)?;
        }
        let format = parse_format(Some(&volume.format))?;
        manage::resize(&volume.path, Some(format), size)
            .map_err(|e| Failure::conflict(chain(&e)))?;
        self.volume(pool, name)
    }
}

/// Describes volume `name` in `dir`; a volume whose format was never confirmed shows as
/// `unknown`.
pub(super) fn volume_info(pool: &str, dir: &Path, name: &str) -> Result<VolumeInfo, Failure> {
    let path = dir.join(name);
    let format = match volume_format::format_of(&path) {
        Ok(format) => format,
        Err(volume_format::FormatError::Unconfirmed { .. }) => {
            return Ok(undescribed_volume(pool, dir, name, "unknown"))
        }
        Err(e) => return Err(format_error(e)),
    };
    let info = manage::info(&path, Some(format)).map_err(|e| Failure::conflict(chain(&e)))?;
    let incomplete = write_back::is_incomplete(&path);
    Ok(VolumeInfo {
        name: name.to_string(),
        pool: pool.to_string(),
        path,
        format: info.format.name().to_string(),
        capacity_bytes: info.virtual_size,
        allocation_bytes: info.actual_size,
        backing: info.backing_file,
        incomplete,
    })
}

/// What the file of volume `name` shows without reading it as an image.
pub(super) fn undescribed_volume(pool: &str, dir: &Path, name: &str, format: &str) -> VolumeInfo {
    use std::os::unix::fs::MetadataExt;
    let path = dir.join(name);
    let metadata = std::fs::metadata(&path).ok();
    VolumeInfo {
        name: name.to_string(),
        pool: pool.to_string(),
        format: format.to_string(),
        capacity_bytes: metadata.as_ref().map_or(0, |m| m.len()),
        allocation_bytes: metadata.as_ref().map_or(0, |m| m.blocks() * 512),
        backing: None,
        incomplete: write_back::is_incomplete(&path),
        path,
    }
}

pub(super) fn format_error(e: FormatError) -> Failure {
    match e {
        FormatError::Unconfirmed { .. } | FormatError::Damaged { .. } => {
            Failure::conflict(chain(&e))
        }
        FormatError::Read { .. } | FormatError::Write { .. } => Failure::internal(chain(&e)),
    }
}

/// Checks that the backing chain of the image at `path` (of `format`; `label` names it in
/// messages) stays in the pool directory `dir`: every backing file is named as a volume of
/// the pool (no directory, no `..`, no absolute path), is a regular file (not a symbolic link
/// or device), appears once, and is named with the format recorded for that volume. The
/// message says what is wrong.
pub(super) fn check_chain(
    pool: &str,
    dir: &Path,
    path: &Path,
    format: Format,
    label: &str,
) -> Result<(), String> {
    let (mut path, mut format, mut label) = (path.to_path_buf(), format, label.to_string());
    let mut seen = BTreeSet::new();
    loop {
        let info = manage::info(&path, Some(format)).map_err(|e| chain(&e))?;
        let Some(backing) = info.backing_file else {
            return Ok(());
        };
        let refused = |why: &str| format!("{label}'s backing file {backing:?} {why}");
        let backing_path = dir.join(&backing);
        let is_volume = check_volume_name(&backing).is_ok()
            && std::fs::symlink_metadata(&backing_path).is_ok_and(|m| m.file_type().is_file());
        if !is_volume {
            return Err(refused(&format!(
                "is not a volume of pool {pool} (a backing file must be a volume of the same \
                 pool, named without a directory)"
            )));
        }
        if !seen.insert(backing.clone()) || seen.len() > block::MAX_CHAIN_DEPTH {
            return Err(refused(
                "makes the backing chain loop (or deeper than 64 volumes)",
            ));
        }
        let declared = info.backing_format.ok_or_else(|| {
            refused(
                "is named without its format: record it in the image with `qemu-img rebase -u \
                 -b BACKING -F raw|qcow2 FILE` on your copy before uploading",
            )
        })?;
        let recorded = volume_format::format_of(&backing_path).map_err(|e| chain(&e))?;
        if declared != recorded.name() {
            return Err(refused(&format!(
                "is named as {declared}, but volume {backing} is {}",
                recorded.name()
            )));
        }
        (path, format, label) = (backing_path, recorded, format!("volume {backing}"));
    }
}
