//! Uploads into a volume: the client's bytes land in a hidden file next to the volume and
//! replace it only once they are known to be a usable image whose backing (if any) stays in
//! the pool.
//!
//! Threading: called from the API's blocking tasks, one upload per volume at a time (its
//! claim).

use std::path::{Path, PathBuf};

use api::pool_api::VolumeInfo;
use block::manage;
use block::Format;

use super::volume_format;
use super::volumes::check_chain;
use super::Pools;
use super::{partial, write_back};
use crate::failure::{chain, Failure};

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
    pub(super) fn check_replaceable(
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
pub(super) fn upload_format(upload: &Path) -> Result<Format, Failure> {
    let file = std::fs::File::open(upload)
        .map_err(|e| Failure::internal(format!("cannot read the upload: {e}")))?;
    volume_format::trusted_probe(&file).map_err(|looks| {
        Failure::invalid(format!(
            "the upload {looks}: say its format with --format (format=raw|qcow2), since a disk a \
             guest has written can look like anything"
        ))
    })
}
