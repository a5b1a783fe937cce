//! The per-VM control API that a `ferro run --api-socket PATH` process serves: its paths and
//! the JSON bodies of its responses. `docs/api/vmm.openapi.json` describes the same API.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::state::VmState;
use crate::vm_config::VmConfig;

/// Paths of the VMM API (all under `/api/v1`).
pub mod paths {
    /// GET: [`super::VmInfo`].
    pub const VM: &str = "/api/v1/vm";
    /// GET: [`super::VmCounters`].
    pub const COUNTERS: &str = "/api/v1/vm/counters";
    /// GET: [`crate::diagnostics::VmDiagnostics`], the stall report.
    pub const DIAGNOSTICS: &str = "/api/v1/vm/diagnostics";
    /// PUT: park the vCPUs (409 unless running).
    pub const PAUSE: &str = "/api/v1/vm/pause";
    /// PUT: let paused vCPUs run again (409 unless paused).
    pub const RESUME: &str = "/api/v1/vm/resume";
    /// PUT: press the ACPI power button; the guest decides what to do (409 unless running).
    pub const POWER_BUTTON: &str = "/api/v1/vm/power-button";
    /// PUT: hard reset, as the reset line would (the guest boots again; with `no_reboot`
    /// the VMM exits instead).
    pub const RESET: &str = "/api/v1/vm/reset";
    /// PUT: stop the VM at once and exit the VMM (like pulling the plug).
    pub const STOP: &str = "/api/v1/vm/stop";
}

/// What `GET /api/v1/vm` returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmInfo {
    pub state: VmState,
    pub config: VmConfig,
    /// vCPUs (as configured).
    pub vcpus: u32,
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// The VMM's process id.
    pub pid: u32,
    /// How many times the guest has been booted (1 + resets).
    pub boots: u64,
    /// Ferro's version.
    pub version: String,
}

/// What `GET /api/v1/vm/counters` returns. Counters count from the VMM's start: a guest reset
/// does not clear them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmCounters {
    pub vcpus: Vec<VcpuCounters>,
    pub devices: Vec<DeviceCounters>,
}

/// Exits of one vCPU, by reason (`io_in`, `io_out`, `mmio_read`, `mmio_write`,
/// `interrupted`, `system_event`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VcpuCounters {
    pub id: u32,
    pub exits: BTreeMap<String, u64>,
}

/// Counters of one device, e.g. `read_requests`, `read_bytes`, `errors` for a disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceCounters {
    /// Stable name within the VM: `block0`, `net0`, `rng0`, `console0`.
    pub id: String,
    /// Device kind: `block`, `net`, `rng`, `console`.
    pub kind: String,
    pub counters: BTreeMap<String, u64>,
}

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// What `ferro run --exit-report FILE` writes when the VMM exits: how the VM ended, for a
/// supervisor (the daemon) that may not be the VMM's parent and cannot read its exit status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExitReport {
    /// The process exit code.
    pub code: i32,
    /// `powered-off`, `rebooted`, `quit`, `stopped`, `signal`, or `error`.
    pub outcome: String,
    /// The error, for `error`.
    #[serde(default)]
    pub error: Option<String>,
}
