//! Internal snapshots of a qcow2 volume: list, create, revert, delete (the `block` crate's
//! work; the caller has checked that no running VM uses the volume).
//!
//! Threading: called from the API's blocking tasks.

use api::pool_api::VolumeSnapshot;
use block::manage;
use block::Format;

use super::Pools;
use crate::failure::{chain, Failure};

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
