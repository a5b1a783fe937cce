//! The daemon's REST API (`ferro daemon`, `docs/api/daemon.openapi.json`): VM definitions as
//! stored and sent, and the bodies of its responses. The CLI speaks it.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::size::ByteSize;
use crate::vmm_api::VmCounters;

pub use crate::names::{check_name, MAX_NAME_LEN};
pub use crate::tap_names::{
    check_own_tap_name, is_network_tap_name, legacy_network_tap_name, network_tap_id,
    network_tap_name,
};
pub use crate::vm_config::MAX_NICS;
pub use crate::vm_definition::{ResolvedVolume, VmDefinition};

/// Where the daemon listens unless told otherwise (`ferro daemon --socket`, and the clients'
/// `-c`/`--socket` or `FERRO_SOCKET`).
pub const DEFAULT_SOCKET: &str = "/run/ferro/ferro.sock";

/// Paths of the daemon API.
pub mod paths {
    pub const VMS: &str = "/api/v1/vms";
    pub const HOST: &str = "/api/v1/host";
    pub const EVENTS: &str = "/api/v1/events";

    /// `/api/v1/vms/NAME`.
    pub fn vm(name: &str) -> String {
        format!("{VMS}/{name}")
    }

    /// `/api/v1/vms/NAME/ACTION` (start, shutdown, destroy, reboot, reset, suspend, resume,
    /// autostart, stats).
    pub fn vm_action(name: &str, action: &str) -> String {
        format!("{VMS}/{name}/{action}")
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
    /// The name the JSON has, so text and `--json` spell a state the same way.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            DomainState::Shutoff => "shutoff",
            DomainState::Starting => "starting",
            DomainState::Running => "running",
            DomainState::Paused => "paused",
            DomainState::ShuttingDown => "shutting-down",
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
    /// What works differently from what the definition asks, and why (e.g. a VM on a network
    /// whose name cannot be a DNS name).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// The definition the next start uses, when the VM was defined again while it ran (it
    /// runs on with `definition`); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_definition: Option<VmDefinition>,
}

impl VmDetails {
    /// The definition a new start would use: the pending one if there is one.
    pub fn next_definition(&self) -> &VmDefinition {
        self.pending_definition.as_ref().unwrap_or(&self.definition)
    }
}

/// `PUT /api/v1/vms/NAME/autostart`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutostartRequest {
    pub enabled: bool,
}

/// `POST /api/v1/vms/NAME/shutdown` and `.../reboot` (body optional).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ShutdownRequest {
    /// Seconds to wait for the guest to power off (a reboot: and to run again); default 60.
    /// 0 presses the power button and answers at once.
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
    /// `defined` (detail `updated` when an existing VM's definition changed), `undefined`,
    /// `started`, `stopped`, `crashed`, `paused`, `resumed`, `shutdown-requested`,
    /// `reboot-requested`, `reset`.
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}
