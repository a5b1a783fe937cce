//! The daemon's REST API (`ferro daemon`, `docs/api/daemon.openapi.json`): VM definitions as
//! stored and sent, and the bodies of its responses. The CLI speaks it.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::net::stable_hash;
use crate::size::ByteSize;
use crate::vmm_api::VmCounters;

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

/// The TAP device of NIC `index` of the VM with id `id` on a virtual network: `fvIDnINDEX`.
/// Ids are unique among defined VMs, so no two VMs ever share a name; at most 15 bytes (an
/// id has at most 10 digits, an index below [`MAX_NICS`] at most 2).
pub fn network_tap_name(id: u32, index: usize) -> String {
    format!("fv{id}n{index}")
}

/// The TAP name daemons before VM ids gave NIC `index` of VM `vm` (a 32-bit hash of the name,
/// which another name can be made to share): only to find the TAP devices of VMs such a
/// daemon started, which keep running across the upgrade.
pub fn legacy_network_tap_name(vm: &str, index: usize) -> String {
    format!("fv{:08x}n{index}", stable_hash(vm) as u32)
}

/// Refuses a NIC's `tap =` that has the shape of the daemon's own network TAP names (checked
/// by the daemon at define and start, not when a stored definition is read).
pub fn check_own_tap_name(tap: &str) -> Result<(), String> {
    if is_network_tap_name(tap) {
        return Err(format!(
            "the TAP name {tap:?} is reserved: names like fvNnI are the TAP devices the daemon \
             makes for NICs on networks; pick another name"
        ));
    }
    Ok(())
}

/// The VM id in a TAP name of [`network_tap_name`]'s shape.
pub fn network_tap_id(name: &str) -> Option<u32> {
    let (id, index) = name.strip_prefix("fv")?.split_once('n')?;
    let digits = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_digit());
    if !digits(id) || !digits(index) {
        return None;
    }
    id.parse().ok()
}

/// Whether `name` has the shape of a TAP device the daemon makes for a NIC on a network
/// (`fv`, hex digits, `n`, digits; today's and older names): such names are the daemon's only.
pub fn is_network_tap_name(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("fv") else {
        return false;
    };
    let Some((id, index)) = rest.split_once('n') else {
        return false;
    };
    !id.is_empty()
        && id.chars().all(|c| c.is_ascii_hexdigit())
        && !index.is_empty()
        && index.chars().all(|c| c.is_ascii_digit())
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

    /// Names a 32-bit hash gave could be made to collide (a birthday search finds a pair
    /// in well under a second); names from ids cannot, and stay interface names.
    #[test]
    fn network_tap_names_are_unique_by_construction() {
        let mut seen = std::collections::HashMap::new();
        let collision = (0u32..1_000_000).find_map(|i| {
            let name = format!("vm{i}");
            let tap = legacy_network_tap_name(&name, 0);
            seen.insert(tap, name.clone()).map(|other| (other, name))
        });
        let (a, b) = collision.expect("a 32-bit hash collides within a million names");
        assert_eq!(
            legacy_network_tap_name(&a, 0),
            legacy_network_tap_name(&b, 0)
        );
        let mut names = std::collections::HashSet::new();
        for id in [1, 2, 10, 12, 123, u32::MAX] {
            for index in [0, 1, 2, 11, MAX_NICS - 1] {
                let tap = network_tap_name(id, index);
                assert!(crate::net::valid_interface_name(&tap), "{tap}");
                assert!(is_network_tap_name(&tap), "{tap}");
                assert!(names.insert(tap.clone()), "{tap} twice");
            }
        }
        assert_eq!(network_tap_name(7, 0), "fv7n0");
    }

    /// A NIC's own TAP may not look like the daemon's network TAPs (today's or older ones).
    #[test]
    fn network_tap_shapes_are_reserved() {
        for reserved in ["fv1n0", "fv4294967295n31", "fvdeadbeefn0", "fv0n12"] {
            assert!(check_own_tap_name(reserved).is_err(), "{reserved}");
        }
        for free in [
            "tap0",
            "fv",
            "fvn0",
            "fv1n",
            "fv1x0",
            "fvgn0",
            "fv1n0x",
            "web-fv1n0",
        ] {
            check_own_tap_name(free).unwrap();
        }
    }

    #[test]
    fn tap_names_give_their_vm_id() {
        assert_eq!(network_tap_id(&network_tap_name(42, 3)), Some(42));
        for name in [
            "fvtest0",
            "fv7n",
            "fvn0",
            "fv1an0",
            "tap0",
            "fv99999999999n0",
        ] {
            assert_eq!(network_tap_id(name), None, "{name}");
        }
    }
}
