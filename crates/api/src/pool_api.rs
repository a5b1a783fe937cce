//! Storage pools and volumes in the daemon's API (`/api/v1/pools`): directory pools holding
//! disk images (volumes), created and cloned by the daemon.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::size::ByteSize;

/// Paths of the pool API.
pub mod paths {
    pub const POOLS: &str = "/api/v1/pools";

    /// `/api/v1/pools/NAME`.
    pub fn pool(name: &str) -> String {
        format!("{POOLS}/{name}")
    }

    /// `/api/v1/pools/NAME/ACTION` (start, stop, autostart).
    pub fn pool_action(name: &str, action: &str) -> String {
        format!("{POOLS}/{name}/{action}")
    }

    /// `/api/v1/pools/POOL/volumes`.
    pub fn volumes(pool: &str) -> String {
        format!("{POOLS}/{pool}/volumes")
    }

    /// `/api/v1/pools/POOL/volumes/VOLUME`.
    pub fn volume(pool: &str, volume: &str) -> String {
        format!("{POOLS}/{pool}/volumes/{volume}")
    }

    /// `/api/v1/pools/POOL/volumes/VOLUME/snapshots`.
    pub fn snapshots(pool: &str, volume: &str) -> String {
        format!("{POOLS}/{pool}/volumes/{volume}/snapshots")
    }

    /// `/api/v1/pools/POOL/volumes/VOLUME/snapshots/NAME` (DELETE), `.../NAME/revert` (POST).
    pub fn snapshot(pool: &str, volume: &str, name: &str) -> String {
        format!("{POOLS}/{pool}/volumes/{volume}/snapshots/{name}")
    }

    /// `/api/v1/pools/POOL/volumes/VOLUME/ACTION` (resize, clone).
    pub fn volume_action(pool: &str, volume: &str, action: &str) -> String {
        format!("{POOLS}/{pool}/volumes/{volume}/{action}")
    }
}

/// A directory pool: `<state-dir>/pools/NAME.toml`, and the body of `POST /api/v1/pools`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolDefinition {
    pub name: String,
    /// The directory holding the volumes (absolute).
    pub path: PathBuf,
    /// Start the pool when the daemon starts.
    #[serde(default)]
    pub autostart: bool,
}

impl PoolDefinition {
    pub fn validate(&self) -> Result<(), String> {
        crate::names::check_name(&self.name).map_err(|e| e.replace("VM name", "pool name"))?;
        if !self.path.is_absolute() {
            return Err(format!(
                "the pool path {} must be absolute",
                self.path.display()
            ));
        }
        Ok(())
    }
}

/// Whether a pool can be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolState {
    Active,
    Inactive,
}

/// `GET /api/v1/pools/NAME` and the lines of `GET /api/v1/pools`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolInfo {
    pub definition: PoolDefinition,
    pub state: PoolState,
    /// Size of the file system holding the pool (0 while inactive).
    pub capacity_bytes: u64,
    /// Bytes the pool's volumes occupy.
    pub allocation_bytes: u64,
    /// Free bytes on the file system (0 while inactive).
    pub available_bytes: u64,
    pub volumes: u32,
}

/// `PUT /api/v1/pools/NAME/autostart` uses [`crate::daemon_api::AutostartRequest`].
/// `POST /api/v1/pools/POOL/volumes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeCreate {
    pub name: String,
    /// Virtual size (a bare number is bytes); taken from the backing volume when absent.
    #[serde(
        default,
        deserialize_with = "crate::size::disk_size::option::deserialize"
    )]
    pub size: Option<ByteSize>,
    /// `qcow2` (default, thin) or `raw` (sparse).
    #[serde(default)]
    pub format: Option<String>,
    /// A volume of the same pool to use as backing (qcow2 only): a linked clone.
    #[serde(default)]
    pub backing: Option<String>,
}

/// `POST /api/v1/pools/POOL/volumes/VOLUME/clone`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeClone {
    /// The new volume.
    pub name: String,
    /// A qcow2 overlay on the source instead of a full copy.
    #[serde(default)]
    pub linked: bool,
}

/// The header of a volume download that carries the volume's recorded format.
pub const FORMAT_HEADER: &str = "ferro-volume-format";

/// `PUT /api/v1/pools/POOL/volumes/VOLUME/format`: an administrator's word on a volume's
/// format (for a volume whose format was never recorded, or was recorded wrongly).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeFormat {
    /// `raw` or `qcow2`.
    pub format: String,
}

/// `POST /api/v1/pools/POOL/volumes/VOLUME/resize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeResize {
    /// The new virtual size (a bare number is bytes).
    #[serde(deserialize_with = "crate::size::disk_size::deserialize")]
    pub size: ByteSize,
}

/// A volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeInfo {
    pub name: String,
    pub pool: String,
    pub path: PathBuf,
    pub format: String,
    pub capacity_bytes: u64,
    pub allocation_bytes: u64,
    /// The volume it is an overlay of, if any.
    pub backing: Option<String>,
    /// The host went down before this volume's clone was on storage, so it may miss data; VMs
    /// and clones refuse it until it is deleted or replaced by an upload.
    #[serde(default)]
    pub incomplete: bool,
}

/// `POST /api/v1/pools/POOL/volumes/VOLUME/snapshots`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreate {
    pub name: String,
}

/// An internal snapshot of a qcow2 volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeSnapshot {
    pub id: String,
    pub name: String,
    /// Seconds since the Unix epoch.
    pub date: u64,
    /// Virtual size when it was taken (0 when the image does not record it).
    pub size_bytes: u64,
}

/// One line of a full clone's progress stream
/// (`POST .../clone?progress=ndjson`, newline-delimited JSON): progress lines, then one line
/// with the new volume or the error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum CloneEvent {
    Progress { bytes: u64, total: u64 },
    Done { done: VolumeInfo },
    Failed { error: String, status: u16 },
}
