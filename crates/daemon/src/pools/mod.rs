//! Storage pools (directories) and their volumes (disk images). Volume names are checked like
//! VM names, so a volume's path is always `<pool dir>/<name>`: nothing a user sends can point
//! outside the pool. Image work (create, inspect, resize, copy) is the `block` crate's.
//!
//! Threading: called from the API's blocking tasks; one mutex over the pool table, held for
//! table changes only (image work runs outside it).

pub mod partial;
pub mod sparse_copy;
pub mod volume_format;
pub mod write_back;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use api::pool_api::{
    PoolDefinition, PoolInfo, PoolState, VolumeClone, VolumeCreate, VolumeInfo, VolumeSnapshot,
};
use block::manage::{self, NewImage};
use block::Format;

use crate::failure::{chain, Failure};
use crate::fs::DirError;
use crate::registry::Registry;
use volume_format::FormatError;
use write_back::WriteBack;

/// qcow2 cluster size of new volumes (QEMU's default).
const CLUSTER_SIZE: u64 = 64 << 10;
/// Unit of a full copy.
const COPY_CHUNK: usize = 1 << 20;
/// Bytes a full copy through an image format writes between starts of their write-out, once
/// it has written more than `sparse_copy::WINDOW`.
const WRITE_OUT_EVERY: usize = 8 << 20;

type Table = Registry<PoolDefinition, ()>;

/// The daemon's pools.
#[derive(Debug)]
pub struct Pools {
    pools: Mutex<Table>,
    /// Full clones on their way to stable storage.
    write_back: WriteBack,
    /// Volumes (pool, name) whose file or format record an operation is changing: one at a
    /// time, so two uploads, an upload and a delete, or a clone and a create never interleave
    /// their files and records.
    claimed: Mutex<BTreeSet<(String, String)>>,
}

/// A claim on a volume name (see [`Pools::claimed`]), released when dropped.
#[derive(Debug)]
struct VolumeClaim<'a> {
    pools: &'a Pools,
    key: (String, String),
}

impl Drop for VolumeClaim<'_> {
    fn drop(&mut self) {
        self.pools
            .claimed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.key);
    }
}

fn volume_not_found(pool: &str, name: &str) -> Failure {
    Failure::not_found(format!("no volume named {name:?} in pool {pool}"))
}

fn check_volume_name(name: &str) -> Result<(), Failure> {
    api::daemon_api::check_name(name)
        .map_err(|e| Failure::invalid(e.replace("VM name", "volume name")))
}

fn parse_format(format: Option<&str>) -> Result<Format, Failure> {
    match format.unwrap_or("qcow2") {
        "qcow2" => Ok(Format::Qcow2),
        "raw" => Ok(Format::Raw),
        other => Err(Failure::invalid(format!(
            "unknown volume format {other:?} (qcow2 or raw)"
        ))),
    }
}

/// Capacity and free bytes of the file system holding `path`.
fn fs_space(path: &Path) -> Option<(u64, u64)> {
    host_sys::file::fs_space(path).ok()
}

impl Pools {
    /// Loads the pool definitions under `dir` (`<state-dir>/pools`); pools marked autostart
    /// are started.
    pub fn open(dir: PathBuf) -> Result<Self, DirError> {
        let mut pools = Table::open(dir)?;
        for entry in pools.entries_mut().values_mut() {
            let path = &entry.definition.path;
            entry.active = entry.definition.autostart && path.is_dir();
            if entry.active {
                tidy_up(path);
                // No operation of this daemon can be under way yet.
                volume_format::tidy(path);
            }
        }
        Ok(Pools {
            pools: Mutex::new(pools),
            write_back: WriteBack::default(),
            claimed: Mutex::new(BTreeSet::new()),
        })
    }

    /// Claims volume `name` of `pool` for an operation that changes its file or record; a
    /// volume claimed already is busy (409).
    fn claim(&self, pool: &str, name: &str) -> Result<VolumeClaim<'_>, Failure> {
        let key = (pool.to_string(), name.to_string());
        let mut claimed = self.claimed.lock().unwrap_or_else(PoisonError::into_inner);
        if !claimed.insert(key.clone()) {
            return Err(Failure::conflict(format!(
                "volume {name} of pool {pool} is busy with another operation; try again when it \
                 is done"
            )));
        }
        Ok(VolumeClaim { pools: self, key })
    }

    /// Whether an operation is under way on a volume of `pool`.
    fn pool_busy(&self, pool: &str) -> bool {
        self.claimed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .any(|(p, _)| p == pool)
    }

    /// Waits until every full clone made so far is on stable storage (before the daemon exits).
    pub fn finish_write_back(&self) {
        self.write_back.finish();
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.pools.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The directory of an active pool.
    fn active_dir(&self, pool: &str) -> Result<PathBuf, Failure> {
        let pools = self.lock();
        let entry = pools.get(pool)?;
        if !entry.active {
            return Err(Failure::conflict(format!(
                "pool {pool} is not active; start it first"
            )));
        }
        Ok(entry.definition.path.clone())
    }

    // ----- pools -----

    pub fn define(&self, definition: PoolDefinition) -> Result<PoolInfo, Failure> {
        definition.validate().map_err(Failure::invalid)?;
        let (name, path) = (definition.name.clone(), definition.path.clone());
        self.lock().define(definition, |pools| {
            let same_dir = pools.entries().values().find(|p| p.definition.path == path);
            same_dir.map_or(Ok(()), |other| {
                Err(Failure::conflict(format!(
                    "pool {} already uses {}",
                    other.definition.name,
                    path.display()
                )))
            })
        })?;
        self.info(&name)
    }

    pub fn undefine(&self, name: &str) -> Result<(), Failure> {
        self.lock().undefine(name).map(drop)
    }

    /// Activates a pool: its directory is created if missing.
    pub fn start(&self, name: &str) -> Result<PoolInfo, Failure> {
        let path = self.lock().inactive(name)?.definition.path.clone();
        std::fs::create_dir_all(&path)
            .map_err(|e| Failure::conflict(format!("cannot use {}: {e}", path.display())))?;
        tidy_up(&path);
        if !self.pool_busy(name) {
            volume_format::tidy(&path);
        }
        if let Ok(entry) = self.lock().get_mut(name) {
            entry.active = true;
        }
        self.info(name)
    }

    pub fn stop(&self, name: &str) -> Result<PoolInfo, Failure> {
        if self.pool_busy(name) {
            return Err(Failure::conflict(format!(
                "pool {name} has a volume operation under way; stop it when that is done"
            )));
        }
        self.lock().active(name)?.active = false;
        self.info(name)
    }

    pub fn set_autostart(&self, name: &str, enabled: bool) -> Result<PoolInfo, Failure> {
        self.lock().set_autostart(name, enabled)?;
        self.info(name)
    }

    pub fn names(&self) -> Vec<String> {
        self.lock().entries().keys().cloned().collect()
    }

    pub fn info(&self, name: &str) -> Result<PoolInfo, Failure> {
        let (definition, active) = {
            let pools = self.lock();
            let entry = pools.get(name)?;
            (entry.definition.clone(), entry.active)
        };
        let (capacity, available) = if active {
            fs_space(&definition.path).unwrap_or((0, 0))
        } else {
            (0, 0)
        };
        // Sizes from the file system only: no image is opened to describe the pool.
        let (dir, names) = if active {
            self.volume_names(name)?
        } else {
            (PathBuf::new(), Vec::new())
        };
        let allocation: u64 = names
            .iter()
            .filter_map(|n| std::fs::symlink_metadata(dir.join(n)).ok())
            .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
            .sum();
        Ok(PoolInfo {
            definition,
            state: if active {
                PoolState::Active
            } else {
                PoolState::Inactive
            },
            capacity_bytes: capacity,
            allocation_bytes: allocation,
            available_bytes: available,
            volumes: names.len() as u32,
        })
    }

    // ----- volumes -----

    /// Names of the volumes of an active pool (regular files with valid volume names).
    fn volume_names(&self, pool: &str) -> Result<(PathBuf, Vec<String>), Failure> {
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
    fn usable_volume(&self, pool: &str, name: &str) -> Result<VolumeInfo, Failure> {
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
    fn check_space(&self, dir: &Path, pool: &str, size: u64) -> Result<(), Failure> {
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

/// Uploads: the client's bytes land in a hidden file next to the volume and replace it only
/// once they are known to be a usable image whose backing (if any) stays in the pool.
impl Pools {
    /// Where an upload to volume `name` is written first, after checking that `len` bytes fit.
    pub fn upload_target(&self, pool: &str, name: &str, len: u64) -> Result<PathBuf, Failure> {
        let volume = self.volume(pool, name)?;
        let dir = self.active_dir(pool)?;
        let grows = len.saturating_sub(volume.allocation_bytes);
        self.check_space(&dir, pool, grows)?;
        Ok(partial::path(&dir, name, "upload"))
    }

    /// Checks the uploaded file and puts it in place of the volume. Its format is `format`,
    /// or, when the uploader did not say, what its first bytes say, if that cannot reach other
    /// files (raw, or qcow2 without a backing file): a downloaded disk that a guest wrote must
    /// come back with its format said. Refused while `in_use` names a VM running or starting
    /// with the volume, or while another volume is an overlay of it.
    pub fn finish_upload(
        &self,
        pool: &str,
        name: &str,
        upload: &Path,
        format: Option<Format>,
        in_use: impl Fn(&Path) -> Option<String>,
    ) -> Result<VolumeInfo, Failure> {
        let checked = (|| {
            let claim = self.claim(pool, name)?;
            let format = match format {
                Some(format) => format,
                None => upload_format(upload)?,
            };
            let unusable =
                |e: String| Failure::invalid(format!("the upload is not a usable image: {e}"));
            let info = manage::info(upload, Some(format)).map_err(|e| unusable(chain(&e)))?;
            if let Some(backing) = &info.backing_file {
                if backing == name {
                    return Err(Failure::invalid(format!(
                        "the uploaded image names volume {name} itself as its backing file"
                    )));
                }
                let dir = self.active_dir(pool)?;
                check_chain(pool, &dir, upload, format, "the uploaded image")
                    .map_err(|e| Failure::invalid(format!("the uploaded image is refused: {e}")))?;
                self.usable_volume(pool, backing)?;
            }
            let target = self.volume(pool, name)?.path;
            self.check_replaceable(pool, name, &target, &in_use)?;
            // Recorded before the upload takes the name, by its own inode.
            volume_format::record(&target, upload, format)
                .map_err(|e| Failure::internal(chain(&e)))?;
            let inode = volume_format::inode_of(upload).map_err(|e| Failure::internal(chain(&e)));
            if let Err(e) = partial::publish_over(upload, &target) {
                volume_format::unrecord(&target, upload);
                return Err(Failure::internal(format!(
                    "cannot replace {}: {e}",
                    target.display()
                )));
            }
            // The volume is a new file now; a record of the old one could match a reused inode.
            write_back::forget(&target);
            volume_format::drop_others(&target, inode?);
            drop(claim);
            Ok(())
        })();
        if checked.is_err() {
            let _ = std::fs::remove_file(upload);
        }
        checked?;
        self.volume(pool, name)
    }

    /// Refuses to replace volume `name` (at `path`) while a VM runs with it or another volume
    /// is an overlay of it (whose contents would change under it).
    fn check_replaceable(
        &self,
        pool: &str,
        name: &str,
        path: &Path,
        in_use: &impl Fn(&Path) -> Option<String>,
    ) -> Result<(), Failure> {
        if let Some(vm) = in_use(path) {
            return Err(Failure::conflict(format!(
                "VM {vm} is running with volume {name}; shut it down first"
            )));
        }
        if let Some(overlay) = self
            .volumes(pool)?
            .iter()
            .find(|v| v.backing.as_deref() == Some(name))
        {
            return Err(Failure::conflict(format!(
                "volume {name} is the backing of {}, whose contents it would change; delete \
                 that first",
                overlay.name
            )));
        }
        Ok(())
    }
}

/// The format of an upload whose uploader did not give one: what its first bytes say, if
/// that cannot reach other files.
fn upload_format(upload: &Path) -> Result<Format, Failure> {
    let file = std::fs::File::open(upload)
        .map_err(|e| Failure::internal(format!("cannot read the upload: {e}")))?;
    volume_format::trusted_probe(&file).map_err(|looks| {
        Failure::invalid(format!(
            "the upload {looks}: say its format with --format (format=raw|qcow2), since a disk a \
             guest has written can look like anything"
        ))
    })
}

/// Snapshot operations on a volume; the caller has checked that no running VM uses it.
impl Pools {
    pub fn snapshots(
        &self,
        pool: &str,
        volume: &str,
        op: &manage::SnapshotOp,
    ) -> Result<Vec<VolumeSnapshot>, Failure> {
        if let manage::SnapshotOp::Create(name) = op {
            if name.is_empty() || name.len() > 128 || name.chars().any(|c| c.is_control()) {
                return Err(Failure::invalid(
                    "a snapshot name has 1 to 128 printable characters",
                ));
            }
        }
        let info = self.volume(pool, volume)?;
        if info.format != "qcow2" {
            return Err(Failure::invalid(format!(
                "volume {volume} is raw; internal snapshots need qcow2"
            )));
        }
        let snapshots =
            manage::snapshot(&info.path, Some(Format::Qcow2), op).map_err(|e| match &e {
                manage::ManageError::Usage(_) => Failure::invalid(chain(&e)),
                _ if chain(&e).contains("no snapshot") => Failure::not_found(chain(&e)),
                _ => Failure::conflict(chain(&e)),
            })?;
        Ok(snapshots
            .into_iter()
            .map(|s| VolumeSnapshot {
                id: s.id,
                name: s.name,
                date: u64::from(s.date_sec),
                size_bytes: s.disk_size.unwrap_or(0),
            })
            .collect())
    }
}

/// Describes volume `name` in `dir`; a volume whose format was never confirmed shows as
/// `unknown`.
fn volume_info(pool: &str, dir: &Path, name: &str) -> Result<VolumeInfo, Failure> {
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
fn undescribed_volume(pool: &str, dir: &Path, name: &str, format: &str) -> VolumeInfo {
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

/// What an activated pool's directory needs after a daemon that died: its half-made volumes
/// removed and its clones' write-back finished or reported.
fn tidy_up(dir: &Path) {
    partial::remove_stale(dir);
    write_back::recover(dir);
    volume_format::tidy(dir);
}

fn format_error(e: FormatError) -> Failure {
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
fn check_chain(
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
    fn format(self) -> Format {
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
mod tests {
    use super::*;
    use crate::failure::Kind;

    fn setup() -> (tempfile::TempDir, Pools) {
        let dir = tempfile::tempdir().unwrap();
        let pools = Pools::open(dir.path().join("pools")).unwrap();
        let definition = PoolDefinition {
            name: "p".into(),
            path: dir.path().join("images"),
            autostart: false,
        };
        pools.define(definition).unwrap();
        pools.start("p").unwrap();
        (dir, pools)
    }

    fn create(
        pools: &Pools,
        name: &str,
        size: Option<&str>,
        format: &str,
        backing: Option<&str>,
    ) -> Result<VolumeInfo, Failure> {
        pools.create_volume(
            "p",
            &VolumeCreate {
                name: name.into(),
                size: size.map(|s| s.parse().unwrap()),
                format: Some(format.into()),
                backing: backing.map(String::from),
            },
        )
    }

    /// Opens a volume's image as a VM would: with its recorded format.
    fn open_volume(path: &Path, read_only: bool) -> Box<dyn block::DiskImage> {
        let format = volume_format::format_of(path).unwrap();
        block::open(path, read_only, Some(format)).unwrap()
    }

    fn write(path: &Path, offset: u64, data: &[u8]) {
        let mut image = open_volume(path, false);
        let mut copy = data.to_vec();
        image
            .write_at(offset, &[vm_memory::VolatileSlice::from(&mut copy[..])])
            .unwrap();
        image.flush().unwrap();
    }

    fn read(path: &Path, offset: u64, len: usize) -> Vec<u8> {
        let mut image = open_volume(path, true);
        let mut buf = vec![0u8; len];
        image
            .read_at(offset, &[vm_memory::VolatileSlice::from(&mut buf[..])])
            .unwrap();
        buf
    }

    /// A qcow2 image (1 MiB) naming `backing` (of `format`, or none) as its backing file: the
    /// bytes a hostile guest or uploader would write.
    fn qcow2_naming(path: &Path, backing: &str, format: Option<&str>) {
        let file = std::fs::File::create_new(path).unwrap();
        let options = block::qcow2::CreateOptions {
            size: 1 << 20,
            cluster_bits: 16,
            backing: Some((backing.to_string(), format.map(String::from))),
        };
        block::qcow2::create(&file, &options).unwrap();
    }

    /// Uploads the file at `from` as volume `name` (which exists) of pool `p`.
    fn upload(
        pools: &Pools,
        name: &str,
        from: &Path,
        format: Option<Format>,
    ) -> Result<VolumeInfo, Failure> {
        let len = std::fs::metadata(from).unwrap().len();
        let target = pools.upload_target("p", name, len).unwrap();
        std::fs::copy(from, &target).unwrap();
        pools.finish_upload("p", name, &target, format, |_| None)
    }

    #[test]
    fn a_guest_cannot_make_its_raw_volume_a_window_on_host_files() {
        let (dir, pools) = setup();
        let volume = create(&pools, "v.raw", Some("1M"), "raw", None).unwrap();
        let evil = dir.path().join("evil.qcow2");
        qcow2_naming(&evil, "/etc/passwd", Some("raw"));
        // The guest writes that header over the start of its raw disk.
        let header = std::fs::read(&evil).unwrap();
        let disk = std::fs::OpenOptions::new()
            .write(true)
            .open(&volume.path)
            .unwrap();
        std::os::unix::fs::FileExt::write_all_at(&disk, &header, 0).unwrap();
        // Every later use takes the volume as the raw disk it was made as.
        let info = pools.volume("p", "v.raw").unwrap();
        assert_eq!((info.format.as_str(), info.backing), ("raw", None));
        assert_eq!(pools.volume_for_vm("p", "v.raw").unwrap().format, "raw");
        let full = VolumeClone {
            name: "copy.raw".into(),
            linked: false,
        };
        let copy = pools.clone_volume("p", "v.raw", &full).unwrap();
        assert_eq!(copy.format, "raw");
        assert_eq!(
            read(&copy.path, 0, 4),
            b"QFI\xfb",
            "the guest's bytes, as data"
        );
        pools.resize_volume("p", "v.raw", 2 << 20).unwrap();
        assert_eq!(std::fs::metadata(&volume.path).unwrap().len(), 2 << 20);
        // Even after a daemon restart.
        let again = Pools::open(dir.path().join("pools")).unwrap();
        again.start("p").unwrap();
        assert_eq!(again.volume("p", "v.raw").unwrap().format, "raw");
    }

    #[test]
    fn an_upload_is_recorded_as_the_uploader_said_or_as_it_came() {
        let (dir, pools) = setup();
        create(&pools, "v", Some("1M"), "raw", None).unwrap();
        let qcow2 = dir.path().join("plain.qcow2");
        let file = std::fs::File::create_new(&qcow2).unwrap();
        let options = block::qcow2::CreateOptions {
            size: 1 << 20,
            cluster_bits: 16,
            backing: None,
        };
        block::qcow2::create(&file, &options).unwrap();
        // Said raw: raw, whatever it looks like.
        assert_eq!(
            upload(&pools, "v", &qcow2, Some(Format::Raw))
                .unwrap()
                .format,
            "raw"
        );
        // Not said: probed now, before any guest saw it, and kept.
        assert_eq!(upload(&pools, "v", &qcow2, None).unwrap().format, "qcow2");
        // Said qcow2, but it is not: refused, and the volume is left as it was.
        let junk = dir.path().join("junk");
        std::fs::write(&junk, vec![1u8; 4096]).unwrap();
        let err = upload(&pools, "v", &junk, Some(Format::Qcow2)).unwrap_err();
        assert_eq!(err.kind, Kind::Invalid, "{}", err.message);
        assert_eq!(pools.volume("p", "v").unwrap().format, "qcow2");
    }

    #[test]
    fn an_uploaded_overlay_keeps_its_backing_in_the_pool() {
        let (dir, pools) = setup();
        create(&pools, "base.raw", Some("1M"), "raw", None).unwrap();
        create(&pools, "top", Some("1M"), "raw", None).unwrap();
        let images = dir.path().join("images");
        let secret = dir.path().join("secret");
        std::fs::write(&secret, vec![9u8; 1 << 20]).unwrap();
        std::os::unix::fs::symlink(&secret, images.join("link")).unwrap();
        let refused = [
            (
                secret.to_str().unwrap(),
                Some("raw"),
                "not a volume of pool p",
            ),
            ("../secret", Some("raw"), "not a volume of pool p"),
            ("link", Some("raw"), "not a volume of pool p"),
            ("/dev/zero", Some("raw"), "not a volume of pool p"),
            (
                "base.raw",
                Some("qcow2"),
                "named as qcow2, but volume base.raw is raw",
            ),
            ("base.raw", None, "without its format"),
            ("top", Some("raw"), "itself"),
        ];
        for (i, (backing, format, why)) in refused.into_iter().enumerate() {
            let overlay = dir.path().join(format!("overlay{i}.qcow2"));
            qcow2_naming(&overlay, backing, format);
            let err = upload(&pools, "top", &overlay, Some(Format::Qcow2)).unwrap_err();
            assert_eq!(err.kind, Kind::Invalid, "{backing}: {}", err.message);
            assert!(err.message.contains(why), "{backing}: {}", err.message);
            assert_eq!(pools.volume("p", "top").unwrap().format, "raw");
        }
        // A backing file named as the volume of the pool it is, with its format: fine, once
        // the uploader says it is qcow2 (a guest's raw disk, downloaded, can look like this).
        let overlay = dir.path().join("good.qcow2");
        qcow2_naming(&overlay, "base.raw", Some("raw"));
        let err = upload(&pools, "top", &overlay, None).unwrap_err();
        assert!(
            err.message.contains("say its format with --format"),
            "{}",
            err.message
        );
        let top = upload(&pools, "top", &overlay, Some(Format::Qcow2)).unwrap();
        assert_eq!(
            (top.format.as_str(), top.backing.as_deref()),
            ("qcow2", Some("base.raw"))
        );
        assert!(pools.volume_for_vm("p", "top").is_ok());
    }

    #[test]
    fn a_volume_in_use_or_busy_is_not_replaced() {
        let (dir, pools) = setup();
        create(&pools, "base.raw", Some("1M"), "raw", None).unwrap();
        create(&pools, "top.qcow2", None, "qcow2", Some("base.raw")).unwrap();
        let new = dir.path().join("new.raw");
        std::fs::write(&new, vec![5u8; 1 << 20]).unwrap();
        // The backing of an overlay: replacing it would change the overlay's contents.
        let err = upload(&pools, "base.raw", &new, Some(Format::Raw)).unwrap_err();
        assert!(
            err.message.contains("is the backing of top.qcow2"),
            "{}",
            err.message
        );
        // A disk of a VM that runs.
        let len = 1 << 20;
        let target = pools.upload_target("p", "top.qcow2", len).unwrap();
        std::fs::copy(&new, &target).unwrap();
        let err = pools
            .finish_upload("p", "top.qcow2", &target, Some(Format::Raw), |_| {
                Some("web".into())
            })
            .unwrap_err();
        assert!(err.message.contains("VM web is running"), "{}", err.message);
        assert!(!target.exists(), "the refused upload is removed");
        // Another operation on the same volume under way.
        let claim = pools.claim("p", "top.qcow2").unwrap();
        let err = upload(&pools, "top.qcow2", &new, Some(Format::Raw)).unwrap_err();
        assert_eq!(err.kind, Kind::Conflict);
        assert!(err.message.contains("busy"), "{}", err.message);
        let err = pools.stop("p").unwrap_err();
        assert!(err.message.contains("under way"), "{}", err.message);
        drop(claim);
        assert_eq!(
            upload(&pools, "top.qcow2", &new, Some(Format::Raw))
                .unwrap()
                .format,
            "raw"
        );
    }

    #[test]
    fn a_clone_reads_the_format_of_the_file_it_copies() {
        let (dir, pools) = setup();
        let source = create(&pools, "src", Some("1M"), "raw", None).unwrap();
        // Replaced behind the daemon's back by a qcow2 naming another volume: the record of
        // the old file does not apply to it, and the new one is not trusted.
        create(&pools, "other", Some("1M"), "raw", None).unwrap();
        let evil = dir.path().join("evil");
        qcow2_naming(&evil, "other", Some("raw"));
        std::fs::rename(&evil, &source.path).unwrap();
        let full = VolumeClone {
            name: "copy".into(),
            linked: false,
        };
        let err = pools.clone_volume("p", "src", &full).unwrap_err();
        assert!(
            err.message.contains("no recorded format"),
            "{}",
            err.message
        );
    }

    #[test]
    fn a_volume_whose_chain_leaves_the_pool_is_refused_to_vms_and_clones() {
        let (dir, pools) = setup();
        let images = dir.path().join("images");
        std::fs::write(dir.path().join("secret"), vec![9u8; 1 << 20]).unwrap();
        // Put in the pool directory by hand (or by an older Ferro).
        qcow2_naming(&images.join("old.qcow2"), "../secret", Some("raw"));
        // Never recorded, and a guest could have written that header: not trusted.
        let err = pools.volume_for_vm("p", "old.qcow2").unwrap_err();
        assert!(
            err.message.contains("no recorded format"),
            "{}",
            err.message
        );
        assert_eq!(pools.volume("p", "old.qcow2").unwrap().format, "unknown");
        assert!(pools
            .volumes("p")
            .unwrap()
            .iter()
            .any(|v| v.name == "old.qcow2"));
        // Confirmed by an administrator, its chain still has to stay in the pool.
        pools
            .set_format("p", "old.qcow2", "qcow2", |_| None)
            .unwrap();
        let err = pools.volume_for_vm("p", "old.qcow2").unwrap_err();
        assert!(
            err.message.contains("not a volume of pool p"),
            "{}",
            err.message
        );
        let full = VolumeClone {
            name: "copy".into(),
            linked: false,
        };
        assert!(pools.clone_volume("p", "old.qcow2", &full).is_err());
        let linked = VolumeClone {
            name: "linked".into(),
            linked: true,
        };
        assert!(pools.clone_volume("p", "old.qcow2", &linked).is_err());
        assert!(!images.join("copy").exists() && !images.join("linked").exists());
    }

    #[test]
    fn pools_report_space_and_refuse_bad_changes() {
        let (dir, pools) = setup();
        let info = pools.info("p").unwrap();
        assert_eq!(info.state, PoolState::Active);
        assert!(info.capacity_bytes > 0 && info.available_bytes > 0);
        let same_dir = PoolDefinition {
            name: "q".into(),
            path: dir.path().join("images"),
            autostart: false,
        };
        assert_eq!(pools.define(same_dir).unwrap_err().kind, Kind::Conflict);
        assert_eq!(pools.undefine("p").unwrap_err().kind, Kind::Conflict);
        pools.set_autostart("p", true).unwrap();
        // A new daemon finds the pool, started because of autostart.
        let again = Pools::open(dir.path().join("pools")).unwrap();
        assert_eq!(again.info("p").unwrap().state, PoolState::Active);
        pools.stop("p").unwrap();
        assert_eq!(pools.volumes("p").unwrap_err().kind, Kind::Conflict);
        pools.undefine("p").unwrap();
        assert_eq!(pools.info("p").unwrap_err().kind, Kind::NotFound);
    }

    #[test]
    fn volumes_are_created_listed_resized_and_deleted() {
        let (_dir, pools) = setup();
        let disk = create(&pools, "disk.qcow2", Some("64M"), "qcow2", None).unwrap();
        assert_eq!(
            (disk.format.as_str(), disk.capacity_bytes),
            ("qcow2", 64 << 20)
        );
        let raw = create(&pools, "data.raw", Some("16M"), "raw", None).unwrap();
        assert_eq!(raw.format, "raw");
        assert!(raw.allocation_bytes < 16 << 20, "raw volumes are sparse");
        let names: Vec<String> = pools
            .volumes("p")
            .unwrap()
            .into_iter()
            .map(|v| v.name)
            .collect();
        assert_eq!(names, ["data.raw", "disk.qcow2"]);
        assert_eq!(
            create(&pools, "disk.qcow2", Some("1M"), "qcow2", None)
                .unwrap_err()
                .kind,
            Kind::Conflict
        );
        assert_eq!(
            pools
                .resize_volume("p", "disk.qcow2", 128 << 20)
                .unwrap()
                .capacity_bytes,
            128 << 20
        );
        assert!(
            pools.resize_volume("p", "disk.qcow2", 1 << 20).is_err(),
            "shrinking"
        );
        let in_use = |path: &Path| path.ends_with("data.raw").then(|| "web1".to_string());
        let refused = pools.delete_volume("p", "data.raw", in_use).unwrap_err();
        assert!(refused.message.contains("disk of VM web1"), "{refused:?}");
        pools.delete_volume("p", "disk.qcow2", |_| None).unwrap();
        assert_eq!(
            pools.volume("p", "disk.qcow2").unwrap_err().kind,
            Kind::NotFound
        );
        assert_eq!(pools.info("p").unwrap().volumes, 1);
    }

    #[test]
    fn names_never_leave_the_pool_and_space_is_checked() {
        let (_dir, pools) = setup();
        std::os::unix::fs::symlink("/etc/hostname", _dir.path().join("images/link")).unwrap();
        assert_eq!(pools.volume("p", "link").unwrap_err().kind, Kind::NotFound);
        for bad in ["../escape", "a/b", ".hidden", "", "/etc/passwd"] {
            let err = create(&pools, bad, Some("1M"), "qcow2", None).unwrap_err();
            assert_eq!(err.kind, Kind::Invalid, "{bad:?}");
            assert!(pools.volume("p", bad).is_err());
        }
        let err = create(&pools, "huge", Some("1000T"), "qcow2", None).unwrap_err();
        assert_eq!(err.kind, Kind::Conflict);
        assert!(err.message.contains("free"), "{err:?}");
        assert_eq!(
            create(&pools, "x", Some("1M"), "vmdk", None)
                .unwrap_err()
                .kind,
            Kind::Invalid
        );
    }

    #[test]
    fn linked_clones_share_a_base_full_clones_stand_alone() {
        let (_dir, pools) = setup();
        let base = create(&pools, "base.raw", Some("8M"), "raw", None).unwrap();
        write(&base.path, 4096, b"base data");
        let a = pools
            .clone_volume(
                "p",
                "base.raw",
                &VolumeClone {
                    name: "a.qcow2".into(),
                    linked: true,
                },
            )
            .unwrap();
        let b = pools
            .clone_volume(
                "p",
                "base.raw",
                &VolumeClone {
                    name: "b.qcow2".into(),
                    linked: true,
                },
            )
            .unwrap();
        assert_eq!(a.backing.as_deref(), Some("base.raw"));
        assert_eq!(a.capacity_bytes, 8 << 20);
        write(&a.path, 4096, b"only in a");
        assert_eq!(read(&a.path, 4096, 9), b"only in a");
        assert_eq!(read(&b.path, 4096, 9), b"base data");
        assert_eq!(read(&base.path, 4096, 9), b"base data");
        let refused = pools.delete_volume("p", "base.raw", |_| None).unwrap_err();
        assert!(
            refused.message.contains("backing of a.qcow2"),
            "{refused:?}"
        );

        assert_eq!(
            lock_source(&a).unwrap().plan,
            CopyPlan::Image {
                format: Format::Qcow2,
                size: 8 << 20
            },
            "an overlay is flattened"
        );
        let full = pools
            .clone_volume(
                "p",
                "a.qcow2",
                &VolumeClone {
                    name: "full.qcow2".into(),
                    linked: false,
                },
            )
            .unwrap();
        assert_eq!(full.backing, None);
        assert_eq!(read(&full.path, 4096, 9), b"only in a");
        assert!(
            full.allocation_bytes < 2 << 20,
            "zero chunks stay unallocated"
        );
        pools.delete_volume("p", "a.qcow2", |_| None).unwrap();
        assert_eq!(
            read(&full.path, 4096, 9),
            b"only in a",
            "the copy needs nothing of its source"
        );
    }

    #[test]
    fn snapshots_revert_a_volume() {
        let (_dir, pools) = setup();
        let disk = create(&pools, "d.qcow2", Some("4M"), "qcow2", None).unwrap();
        write(&disk.path, 0, b"before");
        let create_op = manage::SnapshotOp::Create("s1".into());
        let taken = pools.snapshots("p", "d.qcow2", &create_op).unwrap();
        assert_eq!(taken.len(), 1);
        assert_eq!(
            (taken[0].name.as_str(), taken[0].size_bytes),
            ("s1", 4 << 20)
        );
        write(&disk.path, 0, b"after!");
        let revert = manage::SnapshotOp::Apply("s1".into());
        pools.snapshots("p", "d.qcow2", &revert).unwrap();
        assert_eq!(read(&disk.path, 0, 6), b"before");
        let missing = pools.snapshots("p", "d.qcow2", &manage::SnapshotOp::Apply("x".into()));
        assert_eq!(missing.unwrap_err().kind, Kind::NotFound);
        let bad = pools.snapshots("p", "d.qcow2", &manage::SnapshotOp::Create(String::new()));
        assert_eq!(bad.unwrap_err().kind, Kind::Invalid);
        let delete = manage::SnapshotOp::Delete("s1".into());
        assert!(pools.snapshots("p", "d.qcow2", &delete).unwrap().is_empty());
    }

    #[test]
    fn a_standalone_qcow2_volume_is_copied_as_it_is_snapshots_and_all() {
        let (_dir, pools) = setup();
        let disk = create(&pools, "d.qcow2", Some("4M"), "qcow2", None).unwrap();
        write(&disk.path, 0, b"before");
        let taken = manage::SnapshotOp::Create("s1".into());
        pools.snapshots("p", "d.qcow2", &taken).unwrap();
        write(&disk.path, 0, b"after!");
        let len = std::fs::metadata(&disk.path).unwrap().len();
        assert_eq!(
            lock_source(&disk).unwrap().plan,
            CopyPlan::File {
                format: Format::Qcow2,
                len
            }
        );
        let full = VolumeClone {
            name: "c.qcow2".into(),
            linked: false,
        };
        let copy = pools.clone_volume("p", "d.qcow2", &full).unwrap();
        assert_eq!(
            (copy.format.as_str(), copy.capacity_bytes),
            ("qcow2", 4 << 20)
        );
        assert_eq!(read(&copy.path, 0, 6), b"after!");
        let revert = manage::SnapshotOp::Apply("s1".into());
        pools.snapshots("p", "c.qcow2", &revert).unwrap();
        assert_eq!(read(&copy.path, 0, 6), b"before");
        assert_eq!(read(&disk.path, 0, 6), b"after!", "the source is its own");

        // Dirty (refcounts not written back): copied through the format, so the copy is
        // clean and usable.
        let dirty = pools.volume("p", "d.qcow2").unwrap();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&dirty.path)
            .unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, &1u64.to_be_bytes(), 72).unwrap();
        assert!(matches!(
            lock_source(&dirty).unwrap().plan,
            CopyPlan::Image { .. }
        ));
        let full = VolumeClone {
            name: "clean.qcow2".into(),
            linked: false,
        };
        let clean = pools.clone_volume("p", "d.qcow2", &full).unwrap();
        assert_eq!(read(&clean.path, 0, 6), b"after!");
        assert!(
            block::open(&clean.path, false, Some(Format::Qcow2)).is_ok(),
            "opens for writing"
        );
    }

    #[test]
    fn a_qcow2_file_of_any_length_is_copied() {
        // qemu-img does not pad its files to 512 bytes, as Ferro's own images are.
        let (_dir, pools) = setup();
        let raw = create(&pools, "r.raw", Some("1M"), "raw", None).unwrap();
        let made = raw.path.with_file_name("q.qcow2");
        let status = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&made)
            .arg("1G")
            .status()
            .unwrap();
        assert!(status.success());
        let len = std::fs::metadata(&made).unwrap().len();
        assert_ne!(len % 512, 0, "the case this test is for");
        let full = VolumeClone {
            name: "copy.qcow2".into(),
            linked: false,
        };
        let copy = pools.clone_volume("p", "q.qcow2", &full).unwrap();
        assert_eq!(copy.capacity_bytes, 1 << 30);
        assert_eq!(std::fs::metadata(&copy.path).unwrap().len(), len);
    }

    #[test]
    fn an_upload_replaces_an_incomplete_volume_and_its_record() {
        let (_dir, pools) = setup();
        let volume = create(&pools, "v.raw", Some("1M"), "raw", None).unwrap();
        let inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&volume.path).unwrap());
        let record = volume.path.with_file_name(".v.raw.incomplete");
        std::fs::write(&record, format!("{inode}\n")).unwrap();
        assert!(pools.volume("p", "v.raw").unwrap().incomplete);
        let upload = pools.upload_target("p", "v.raw", 1 << 20).unwrap();
        std::fs::write(&upload, vec![3u8; 1 << 20]).unwrap();
        let replaced = pools
            .finish_upload("p", "v.raw", &upload, None, |_| None)
            .unwrap();
        assert!(!replaced.incomplete);
        assert!(
            !record.exists(),
            "a reused inode cannot bring the mark back"
        );
    }

    #[test]
    fn a_full_copy_of_a_raw_volume_keeps_data_and_holes() {
        let (_dir, pools) = setup();
        let base = create(&pools, "base.raw", Some("8M"), "raw", None).unwrap();
        write(&base.path, 4096, b"first");
        write(&base.path, 6 << 20, b"second");
        let clone = VolumeClone {
            name: "copy.raw".into(),
            linked: false,
        };
        let copy = pools.clone_volume("p", "base.raw", &clone).unwrap();
        assert_eq!(
            (copy.format.as_str(), copy.capacity_bytes),
            ("raw", 8 << 20)
        );
        assert_eq!(read(&copy.path, 4096, 5), b"first");
        assert_eq!(read(&copy.path, 6 << 20, 6), b"second");
        assert_eq!(read(&copy.path, 1 << 20, 4), [0; 4]);
        assert!(
            copy.allocation_bytes < 1 << 20,
            "holes stay holes: {copy:?}"
        );
    }
    /// Hidden files but the volumes' format records.
    fn hidden_files(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.starts_with('.') && !n.ends_with(".format"))
            .collect()
    }

    #[test]
    fn zero_detection_sees_any_byte_anywhere() {
        let mut bytes = vec![0u8; 3 * 4096 + 100];
        assert!(is_all_zero(&bytes) && is_all_zero(&[]));
        for at in [0, 4095, 4096, bytes.len() - 1] {
            bytes[at] = 1;
            assert!(!is_all_zero(&bytes), "byte {at}");
            bytes[at] = 0;
        }
    }

    #[test]
    fn a_full_clone_appears_whole_or_not_at_all() {
        let (_dir, pools) = setup();
        let base = create(&pools, "base.raw", Some("24M"), "raw", None).unwrap();
        write(&base.path, 0, &[7u8; 20 << 20]);
        let dir = base.path.parent().unwrap().to_path_buf();
        let target = dir.join("copy.raw");
        let clone = VolumeClone {
            name: "copy.raw".into(),
            linked: false,
        };
        let mut calls = 0;
        pools
            .clone_volume_with_progress("p", "base.raw", &clone, &mut |_, _| {
                calls += 1;
                assert!(!target.exists(), "visible before the copy is done");
                let mut hidden = hidden_files(&dir);
                hidden.sort();
                assert_eq!(hidden.len(), 2, "a hidden copy and its record: {hidden:?}");
                assert!(hidden[0].ends_with(".part") && hidden[1].ends_with(".unsynced"));
            })
            .unwrap();
        assert!(calls > 1);
        pools.finish_write_back();
        assert!(hidden_files(&dir).is_empty());
        assert_eq!(read(&target, (20 << 20) - 1, 1), [7]);

        // A source a VM writes cannot be copied: nothing is left behind.
        let writer = open_volume(&base.path, false);
        let clone = VolumeClone {
            name: "second.raw".into(),
            linked: false,
        };
        let err = pools.clone_volume("p", "base.raw", &clone).unwrap_err();
        assert_eq!(err.kind, Kind::Conflict, "{err:?}");
        drop(writer);
        assert!(!dir.join("second.raw").exists());
        assert!(hidden_files(&dir).is_empty());
    }

    #[test]
    fn a_volume_whose_clone_a_host_crash_cut_short_is_reported_and_refused() {
        let (_dir, pools) = setup();
        let volume = create(&pools, "v.raw", Some("1M"), "raw", None).unwrap();
        let dir = volume.path.parent().unwrap().to_path_buf();
        // What a daemon of another boot left: its clone's record, never retired.
        let inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&volume.path).unwrap());
        std::fs::write(
            dir.join(".v.raw.wb-4194305-0.unsynced"),
            format!("an-earlier-boot {inode}\n"),
        )
        .unwrap();
        assert!(
            !pools.volume("p", "v.raw").unwrap().incomplete,
            "not yet recovered"
        );
        pools.stop("p").unwrap();
        pools.start("p").unwrap();

        let listed = pools.volumes("p").unwrap();
        assert!(listed[0].incomplete, "{listed:?}");
        let err = pools.volume_for_vm("p", "v.raw").unwrap_err();
        assert_eq!(err.kind, Kind::Conflict);
        assert!(err.message.contains("may miss data"), "{}", err.message);
        let full = VolumeClone {
            name: "copy.raw".into(),
            linked: false,
        };
        assert!(pools.clone_volume("p", "v.raw", &full).is_err());
        assert!(create(&pools, "over", None, "qcow2", Some("v.raw")).is_err());

        pools.delete_volume("p", "v.raw", |_| None).unwrap();
        assert!(
            hidden_files(&dir).is_empty(),
            "the record goes with the volume"
        );
        let again = create(&pools, "v.raw", Some("1M"), "raw", None).unwrap();
        assert!(!again.incomplete);
    }

    #[test]
    fn starting_a_pool_removes_what_a_dead_daemon_left_half_done() {
        let (dir_guard, pools) = setup();
        let volume = create(&pools, "v.raw", Some("1M"), "raw", None).unwrap();
        let dir = volume.path.parent().unwrap().to_path_buf();
        let leftover = dir.join(".w.raw.clone-4194305-3.part");
        std::fs::write(&leftover, b"half").unwrap();
        assert_eq!(pools.volumes("p").unwrap().len(), 1, "never listed");
        pools.stop("p").unwrap();
        pools.start("p").unwrap();
        assert!(!leftover.exists());
        assert!(volume.path.exists());

        // A daemon restart activates autostart pools: the same cleanup.
        pools.set_autostart("p", true).unwrap();
        std::fs::write(&leftover, b"half").unwrap();
        let reopened = Pools::open(dir_guard.path().join("pools")).unwrap();
        assert_eq!(reopened.volumes("p").unwrap().len(), 1);
        assert!(!leftover.exists());
    }
}
