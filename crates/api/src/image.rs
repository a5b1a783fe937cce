//! Disk image descriptions as `ferro img info --json` prints them (and the daemon will serve
//! them). Keys follow `qemu-img info --output=json`, so scripts written for it keep working.

use serde::{Deserialize, Serialize};

/// One image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfo {
    pub filename: String,
    pub format: String,
    pub virtual_size: u64,
    pub actual_size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub full_backing_filename: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename_format: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dirty_flag: Option<bool>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub snapshots: Vec<SnapshotInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format_specific: Option<FormatSpecific>,
}

/// One internal snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotInfo {
    pub id: String,
    pub name: String,
    pub vm_state_size: u64,
    pub date_sec: u64,
    pub date_nsec: u32,
    pub vm_clock_sec: u64,
    pub vm_clock_nsec: u32,
}

/// Format-specific details, tagged like qemu-img's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data", rename_all = "kebab-case")]
pub enum FormatSpecific {
    Qcow2(Qcow2Details),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Qcow2Details {
    /// "0.10" (version 2) or "1.1" (version 3).
    pub compat: String,
    pub lazy_refcounts: bool,
    pub refcount_bits: u32,
    pub corrupt: bool,
}
