//! Storage pools (directories) and their volumes (disk images). Volume names are checked like
//! VM names, so a volume's path is always `<pool dir>/<name>`: nothing a user sends can point
//! outside the pool. Image work (create, inspect, resize, copy) is the `block` crate's.
//!
//! Here: the pool table (a [`Registry`]: define, start, stop, autostart, info) and the claims
//! that keep two operations off one volume. The volumes themselves are in [`volumes`], with
//! [`clone`], [`upload`] and [`snapshots`]; how their files are made safely in
//! [`partial`], [`write_back`], [`sparse_copy`] and [`volume_format`].
//!
//! Threading: called from the API's blocking tasks; one mutex over the pool table, held for
//! table changes only (image work runs outside it).

mod clone;
pub mod partial;
mod snapshots;
pub mod sparse_copy;
mod upload;
pub mod volume_format;
mod volumes;
pub mod write_back;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use api::pool_api::{PoolDefinition, PoolInfo, PoolState};

use crate::failure::Failure;
use crate::fs::DirError;
use crate::registry::Registry;
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

    /// Every defined pool's directory (VM files may lie there).
    pub fn paths(&self) -> Vec<PathBuf> {
        self.lock()
            .entries()
            .values()
            .map(|entry| entry.definition.path.clone())
            .collect()
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
}

/// What an activated pool's directory needs after a daemon that died: its half-made volumes
/// removed and its clones' write-back finished or reported.
fn tidy_up(dir: &Path) {
    partial::remove_stale(dir);
    write_back::recover(dir);
    volume_format::tidy(dir);
}

#[cfg(test)]
mod tests;
