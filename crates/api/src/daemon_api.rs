//! The daemon's REST API (`ferro daemon`, `docs/api/daemon.openapi.json`): VM definitions as
//! stored and sent, and the bodies of its responses. The CLI speaks it.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::net::NetConfig;
use crate::size::ByteSize;
use crate::vm_config::{ConsoleKind, DiskConfig, VmConfig};
use crate::vmm_api::VmCounters;

/// Paths of the daemon API.
pub mod paths {
    pub const VMS: &str = "/api/v1/vms";
    pub const HOST: &str = "/api/v1/host";
    pub const EVENTS: &str = "/api/v1/events";

    /// `/api/v1/vms/NAME`.
    pub fn vm(name: &str) -> String {
        format!("{VMS}/{name}")
    }

    /// `/api/v1/vms/NAME/ACTION` (start, shutdown, destroy, reboot, suspend, resume,
    /// autostart, stats, console).
    pub fn vm_action(name: &str, action: &str) -> String {
        format!("{VMS}/{name}/{action}")
    }
}

/// Longest VM name.
pub const MAX_NAME_LEN: usize = 64;

/// Why a VM name is refused, if it is.
pub fn check_name(name: &str) -> Result<(), String> {
    let valid_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!("a VM name has 1 to {MAX_NAME_LEN} characters"));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) || !name.chars().all(valid_char) {
        return Err(format!(
            "invalid VM name {name:?}: use letters, digits, '-', '_' and '.', starting with a letter or digit"
        ));
    }
    Ok(())
}

fn default_cpus() -> u32 {
    1
}

fn default_memory() -> ByteSize {
    ByteSize::mib(512)
}

fn default_cmdline() -> String {
    crate::vm_config::DEFAULT_CMDLINE.to_string()
}

/// A persistent VM definition: the file `<state-dir>/vms/NAME.toml`, and the body of
/// `POST /api/v1/vms`. Unknown fields are refused by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmDefinition {
    pub name: String,
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    #[serde(default = "default_memory")]
    pub memory: ByteSize,
    pub kernel: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    #[serde(default)]
    pub nets: Vec<NetConfig>,
    #[serde(default)]
    pub rng: bool,
    #[serde(default)]
    pub console: ConsoleKind,
    /// Start the VM when the daemon starts.
    #[serde(default)]
    pub autostart: bool,
}

impl VmDefinition {
    /// The VMM configuration this definition runs as.
    pub fn vm_config(&self) -> VmConfig {
        VmConfig {
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            cmdline: self.cmdline.clone(),
            cpus: self.cpus,
            memory: self.memory,
            no_reboot: false,
            rng: self.rng,
            disks: self.disks.clone(),
            console: self.console,
            nets: self.nets.clone(),
        }
    }

    /// Checks everything that does not depend on the host's files.
    pub fn validate(&self) -> Result<(), String> {
        check_name(&self.name)?;
        self.vm_config().validate().map_err(|e| e.to_string())?;
        let mut paths = vec![("kernel", &self.kernel)];
        if let Some(initrd) = &self.initrd {
            paths.push(("initrd", initrd));
        }
        for disk in &self.disks {
            paths.push(("disk", &disk.path));
        }
        for (what, path) in paths {
            if !path.is_absolute() {
                return Err(format!(
                    "the {what} path {} must be absolute",
                    path.display()
                ));
            }
        }
        Ok(())
    }
}

/// A VM's state as the daemon sees it (like `virsh domstate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DomainState {
    /// Defined, not running.
    Shutoff,
    /// Its VMM is starting.
    Starting,
    Running,
    Paused,
    /// A graceful shutdown was requested and the guest is still running.
    ShuttingDown,
    /// Its VMM died unexpectedly (see `reason`).
    Crashed,
}

impl std::fmt::Display for DomainState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            DomainState::Shutoff => "shut off",
            DomainState::Starting => "starting",
            DomainState::Running => "running",
            DomainState::Paused => "paused",
            DomainState::ShuttingDown => "shutting down",
            DomainState::Crashed => "crashed",
        };
        f.write_str(name)
    }
}

/// One line of `GET /api/v1/vms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSummary {
    pub name: String,
    pub state: DomainState,
    pub autostart: bool,
    pub cpus: u32,
    pub memory: ByteSize,
}

/// `GET /api/v1/vms/NAME`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmDetails {
    pub definition: VmDefinition,
    pub state: DomainState,
    /// The VMM's process id while it runs.
    pub pid: Option<u32>,
    /// Why the VM crashed, or how it last stopped.
    pub reason: Option<String>,
    /// The guest's console output, appended across runs.
    pub console_log: PathBuf,
    /// The live console's socket while the VM runs.
    pub console_socket: Option<PathBuf>,
}

/// `PUT /api/v1/vms/NAME/autostart`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutostartRequest {
    pub enabled: bool,
}

/// `POST /api/v1/vms/NAME/shutdown` (body optional).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ShutdownRequest {
    /// Seconds to wait for the guest to power off (default 60).
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

/// `GET /api/v1/vms/NAME/stats` (like `virsh domstats`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmStats {
    pub name: String,
    pub state: DomainState,
    /// CPU time of the whole VMM process, in nanoseconds.
    pub cpu_time_ns: u64,
    /// CPU time of each vCPU thread, in nanoseconds, by vCPU index.
    pub vcpu_time_ns: Vec<u64>,
    /// Guest memory (configured).
    pub memory_bytes: u64,
    /// Resident memory of the VMM process (guest pages it touched included).
    pub rss_bytes: u64,
    /// The VMM's exit and device counters.
    pub counters: VmCounters,
}

/// `GET /api/v1/host`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostInfo {
    pub hostname: String,
    pub cpus: u32,
    pub memory_bytes: u64,
    pub kvm: bool,
    /// vmx or svm in /proc/cpuinfo.
    pub hardware_virtualization: bool,
    /// vCPUs KVM allows per VM (0 without KVM).
    pub max_vcpus: u32,
    pub running_vms: u32,
    pub defined_vms: u32,
    pub version: String,
}

/// What happened to a VM: one line of `GET /api/v1/events` (newline-delimited JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    /// Seconds since the Unix epoch.
    pub time: u64,
    pub vm: String,
    /// `defined`, `undefined`, `started`, `stopped`, `crashed`, `paused`, `resumed`,
    /// `shutdown-requested`, `rebooted`.
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["web1", "a", "db-2.prod_x"] {
            check_name(good).unwrap();
        }
        for bad in ["", "-x", ".hidden", "a/b", "a b", "ü", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn definitions_refuse_unknown_fields_and_relative_paths() {
        let json = r#"{"name": "a", "kernel": "/k", "cpu": 2}"#;
        let err = serde_json::from_str::<VmDefinition>(json).unwrap_err();
        assert!(err.to_string().contains("unknown field `cpu`"), "{err}");
        let def: VmDefinition = serde_json::from_str(r#"{"name": "a", "kernel": "k"}"#).unwrap();
        assert!(def.validate().unwrap_err().contains("absolute"));
        let def: VmDefinition =
            serde_json::from_str(r#"{"name": "a", "kernel": "/k", "cpus": 0}"#).unwrap();
        assert!(def.validate().is_err());
    }
}
