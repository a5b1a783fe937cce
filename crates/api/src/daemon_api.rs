//! The daemon's REST API (`ferro daemon`, `docs/api/daemon.openapi.json`): VM definitions as
//! stored and sent, and the bodies of its responses. The CLI speaks it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::net::{stable_hash, valid_interface_name, MacAddress, NetConfig};
use crate::net_api::dns_host_name;
use crate::size::ByteSize;
use crate::vm_config::{
    default_cmdline, default_cpus, default_memory, ConsoleKind, DiskConfig, VmConfig,
};
use crate::vmm_api::VmCounters;

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

/// Most NICs of a VM definition (the PCI bus has 32 slots); keeps TAP names short.
pub const MAX_NICS: usize = 32;

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

/// A persistent VM definition: the file `<state-dir>/vms/NAME.toml`, and the body of
/// `POST /api/v1/vms`. Unknown fields are refused by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmDefinition {
    pub name: String,
    /// The daemon's number for this VM: unique among the defined VMs, given when the VM is
    /// defined (or, for a definition older than ids, when the daemon loads it) and kept; it
    /// names the VM's TAP devices on networks. Read-only: a value in a request is replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u32>,
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
    pub disks: Vec<DefinitionDisk>,
    #[serde(default)]
    pub nets: Vec<DefinitionNic>,
    #[serde(default)]
    pub rng: bool,
    /// virtio-rng's rate limit: bytes per second (default 256 KiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rng_bytes_per_sec: Option<u64>,
    /// virtio-rng's rate limit: the period its budget is handed out in, ms (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rng_period_ms: Option<u32>,
    #[serde(default)]
    pub console: ConsoleKind,
    /// Start the VM when the daemon starts.
    #[serde(default)]
    pub autostart: bool,
}

/// A NIC of a VM definition: on a TAP device of the host, or on one of the daemon's virtual
/// networks (which creates its TAP device, [`network_tap_name`], while the VM runs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefinitionNic {
    /// TAP device name (created by the VMM if it does not exist).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    /// Virtual network name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Guest MAC address; the daemon picks a random one at definition time when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddress>,
    /// Receive/transmit queue pairs; one per vCPU when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_pairs: Option<u16>,
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

impl DefinitionNic {
    fn validate(&self) -> Result<(), String> {
        if let Some(pairs) = self.queue_pairs {
            crate::net::check_queue_pairs(pairs)
                .map_err(|e| format!("a NIC's queue_pairs: {e}"))?;
        }
        match (&self.tap, &self.network) {
            (Some(tap), None) if valid_interface_name(tap) => Ok(()),
            (Some(tap), None) => Err(format!(
                "{tap:?} is not a valid interface name (1 to 15 characters, no '/', ':' or spaces)"
            )),
            (None, Some(network)) => {
                check_name(network).map_err(|e| e.replace("VM name", "network name"))
            }
            _ => Err("a NIC has either a tap or a network".into()),
        }
    }

    /// The VMM's NIC; `index` is its place in the definition of the VM with id `id`.
    pub fn vmm_config(&self, id: u32, index: usize) -> NetConfig {
        NetConfig {
            tap: match &self.tap {
                Some(tap) => tap.clone(),
                None => network_tap_name(id, index),
            },
            mac: self.mac,
            queue_pairs: self.queue_pairs,
        }
    }

    /// `tap=NAME` or `network=NAME`, then `,mac=MAC` and `,queue_pairs=N` when set.
    pub fn to_option_string(&self) -> String {
        let mut text = match (&self.tap, &self.network) {
            (Some(tap), _) => format!("tap={tap}"),
            (None, Some(network)) => format!("network={network}"),
            (None, None) => String::new(),
        };
        if let Some(mac) = self.mac {
            text += &format!(",mac={mac}");
        }
        if let Some(pairs) = self.queue_pairs {
            text += &format!(",queue_pairs={pairs}");
        }
        text
    }
}

impl From<NetConfig> for DefinitionNic {
    fn from(net: NetConfig) -> Self {
        DefinitionNic {
            tap: Some(net.tap),
            network: None,
            mac: net.mac,
            queue_pairs: net.queue_pairs,
        }
    }
}

/// A disk of a VM definition: an image file, or a volume of a storage pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefinitionDisk {
    /// Image file (absolute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// `POOL/VOLUME`, resolved by the daemon when the VM starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    #[serde(default)]
    pub readonly: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// `raw` or `qcow2`: required for a `path` disk (Ferro never guesses the format of a disk
    /// a guest writes); for a `volume` disk, the format the daemon recorded for the volume
    /// when absent, and checked against it when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// For a `path` disk: a directory (absolute) its backing files may come from besides the
    /// image's own directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_dir: Option<PathBuf>,
    /// Request queues; one per vCPU when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_queues: Option<u16>,
}

impl DefinitionDisk {
    /// The pool and volume this disk names, if it names one.
    pub fn volume_ref(&self) -> Option<(&str, &str)> {
        self.volume.as_deref().and_then(|v| v.split_once('/'))
    }

    /// `require_format`: a `path` disk needs a format (a new definition); a stored one from
    /// before formats were required may lack it (its VM then cannot start).
    fn validate(&self, require_format: bool) -> Result<(), String> {
        if let Some(queues) = self.num_queues {
            if !(1..=crate::vm_config::MAX_DISK_QUEUES).contains(&queues) {
                return Err(format!(
                    "a disk's num_queues is 1 to {}, not {queues}",
                    crate::vm_config::MAX_DISK_QUEUES
                ));
            }
        }
        if let Some(format) = &self.format {
            if format != "raw" && format != "qcow2" {
                return Err(format!("a disk's format is raw or qcow2, not {format:?}"));
            }
        }
        match (&self.path, &self.volume) {
            (Some(path), None) if !path.is_absolute() => {
                Err(format!("the disk path {} must be absolute", path.display()))
            }
            (Some(path), None) if require_format && self.format.is_none() => Err(format!(
                "the disk {} needs a format (format = \"raw\" or \"qcow2\"): Ferro does not \
                 guess it, since a guest can make a raw disk look like any format",
                path.display()
            )),
            (Some(_), None) => match &self.backing_dir {
                Some(dir) if !dir.is_absolute() => Err(format!(
                    "the disk's backing_dir {} must be absolute",
                    dir.display()
                )),
                _ => Ok(()),
            },
            (None, Some(_)) if self.backing_dir.is_some() => Err(
                "a volume disk takes no backing_dir: a volume's backing files are volumes of \
                 its pool"
                    .into(),
            ),
            (None, Some(volume)) => match volume.split_once('/') {
                Some((pool, name)) if check_name(pool).is_ok() && check_name(name).is_ok() => {
                    Ok(())
                }
                _ => Err(format!("invalid disk volume {volume:?}: write POOL/VOLUME")),
            },
            _ => Err("a disk has either a path or a volume".into()),
        }
    }

    /// The VMM's disk, with its image at `path` in `format`.
    fn vmm_disk(&self, path: PathBuf, format: Option<String>) -> DiskConfig {
        DiskConfig {
            path,
            readonly: self.readonly,
            serial: self.serial.clone(),
            format,
            backing_dir: self.backing_dir.clone(),
            num_queues: self.num_queues,
        }
    }
}

/// A pool volume as a VM's disk uses it: its file, and the format the daemon recorded for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedVolume {
    pub path: PathBuf,
    pub format: String,
}

impl From<DiskConfig> for DefinitionDisk {
    fn from(disk: DiskConfig) -> Self {
        DefinitionDisk {
            path: Some(disk.path),
            volume: None,
            readonly: disk.readonly,
            serial: disk.serial,
            format: disk.format,
            backing_dir: disk.backing_dir,
            num_queues: disk.num_queues,
        }
    }
}

impl VmDefinition {
    /// The VMM configuration this definition runs as; `resolve` turns a pool and volume name
    /// into the volume's path and recorded format. A volume disk whose definition gives
    /// another format than the recorded one is refused.
    pub fn vm_config(
        &self,
        resolve: impl Fn(&str, &str) -> Result<ResolvedVolume, String>,
    ) -> Result<VmConfig, String> {
        let mut disks = Vec::with_capacity(self.disks.len());
        for disk in &self.disks {
            let vmm_disk = match (&disk.path, disk.volume_ref()) {
                (Some(path), _) => disk.vmm_disk(path.clone(), disk.format.clone()),
                (None, Some((pool, volume))) => {
                    let resolved = resolve(pool, volume)?;
                    if let Some(format) = disk.format.as_ref().filter(|f| **f != resolved.format) {
                        return Err(format!(
                            "disk volume {pool}/{volume} is {}, but the definition says \
                             format = {format:?}",
                            resolved.format
                        ));
                    }
                    disk.vmm_disk(resolved.path, Some(resolved.format))
                }
                (None, None) => return Err("a disk has neither a path nor a volume".into()),
            };
            disks.push(vmm_disk);
        }
        let on_network = self.nets.iter().any(|nic| nic.network.is_some());
        let id = match self.id {
            Some(id) => id,
            None if on_network => {
                return Err(format!(
                    "VM {} has no id yet: its NICs on networks have no TAP name",
                    self.name
                ))
            }
            None => 0,
        };
        Ok(VmConfig {
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            cmdline: self.cmdline.clone(),
            cpus: self.cpus,
            memory: self.memory,
            no_reboot: false,
            rng: self.rng,
            rng_bytes_per_sec: self.rng_bytes_per_sec,
            rng_period_ms: self.rng_period_ms,
            disks,
            console: self.console,
            nets: self
                .nets
                .iter()
                .enumerate()
                .map(|(i, nic)| nic.vmm_config(id, i))
                .collect(),
        })
    }

    /// The VM's name as a DNS name on its networks, if it can be one (see
    /// [`dns_host_name`]); VMs defined before names were checked may have names that cannot.
    pub fn dns_name(&self) -> Option<&str> {
        dns_host_name(&self.name).then_some(self.name.as_str())
    }

    /// Checks everything that does not depend on the host's files.
    pub fn validate(&self) -> Result<(), String> {
        self.validate_with(true)
    }

    /// Like [`VmDefinition::validate`], for a definition the daemon stored before disk
    /// formats were required: a `path` disk may lack its format (the VM cannot start until it
    /// has one).
    pub fn validate_stored(&self) -> Result<(), String> {
        self.validate_with(false)
    }

    /// The `path` disks without a format: such a VM cannot start (a definition stored before
    /// formats were required, whose disk could not be probed safely).
    pub fn disks_without_format(&self) -> impl Iterator<Item = &Path> {
        self.disks
            .iter()
            .filter(|d| d.format.is_none())
            .filter_map(|d| d.path.as_deref())
    }

    fn validate_with(&self, require_format: bool) -> Result<(), String> {
        check_name(&self.name)?;
        for disk in &self.disks {
            disk.validate(require_format)?;
        }
        if self.nets.len() > MAX_NICS {
            return Err(format!("a VM has at most {MAX_NICS} NICs"));
        }
        for nic in &self.nets {
            nic.validate()?;
        }
        // Volumes resolve to placeholders and a missing id to 0 here: only their shape matters.
        let placeholder = |pool: &str, volume: &str| {
            let format = self
                .disks
                .iter()
                .find(|d| d.volume_ref() == Some((pool, volume)))
                .and_then(|d| d.format.clone());
            Ok(ResolvedVolume {
                path: PathBuf::from("/volume"),
                format: format.unwrap_or_else(|| "raw".into()),
            })
        };
        let mut shaped = self.clone();
        shaped.id.get_or_insert(0);
        shaped
            .vm_config(placeholder)?
            .validate()
            .map_err(|e| e.to_string())?;
        let mut paths = vec![("kernel", &self.kernel)];
        if let Some(initrd) = &self.initrd {
            paths.push(("initrd", initrd));
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

    /// A definition that names only the kernel runs the VM `ferro run --kernel` would.
    #[test]
    fn a_bare_definition_has_the_vmm_defaults() {
        let def: VmDefinition = serde_json::from_str(r#"{"name": "web", "kernel": "/k"}"#).unwrap();
        let vmm = VmConfig::new("/k");
        assert_eq!(
            (def.cpus, def.memory, &def.cmdline, def.console),
            (vmm.cpus, vmm.memory, &vmm.cmdline, vmm.console)
        );
        assert_eq!(
            (def.cpus, def.memory),
            (crate::DEFAULT_CPUS, crate::DEFAULT_MEMORY)
        );
    }

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
                assert!(valid_interface_name(&tap), "{tap}");
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
        let def: VmDefinition = serde_json::from_str(
            r#"{"name": "a", "kernel": "/k", "nets": [{"network": "lab"}, {"tap": "t0"}]}"#,
        )
        .unwrap();
        // Without an id, a NIC on a network has no TAP name yet; with one it has.
        def.validate().unwrap();
        let resolve = |_: &str, _: &str| {
            Ok(ResolvedVolume {
                path: "/v".into(),
                format: "raw".into(),
            })
        };
        assert!(def.vm_config(resolve).is_err());
        let def = VmDefinition { id: Some(5), ..def };
        let config = def.vm_config(resolve).unwrap();
        assert_eq!(config.nets[0].tap, "fv5n0");
        assert_eq!(config.nets[1].tap, "t0");
        let many = format!(
            r#"{{"name": "a", "kernel": "/k", "nets": [{}]}}"#,
            vec![r#"{"network": "lab"}"#; MAX_NICS + 1].join(",")
        );
        let def: VmDefinition = serde_json::from_str(&many).unwrap();
        assert!(def.validate().unwrap_err().contains("at most 32 NICs"));
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

    #[test]
    fn dns_names_are_labels_not_all_digits() {
        for (name, dns) in [
            ("web1", true),
            ("ignore", true),
            ("5m", true),
            ("123", false),
            ("db_1", false),
            ("a.b", false),
            ("x-", false),
            (&"a".repeat(64), false),
        ] {
            let def = VmDefinition {
                name: name.to_string(),
                ..serde_json::from_str(r#"{"name": "a", "kernel": "/k"}"#).unwrap()
            };
            assert_eq!(def.dns_name().is_some(), dns, "{name}");
        }
    }

    #[test]
    fn disks_name_a_path_or_a_volume() {
        let def: VmDefinition = serde_json::from_str(
            r#"{"name": "a", "kernel": "/k", "disks": [{"volume": "p/v.qcow2"}, {"path": "/d", "format": "raw", "num_queues": 3, "backing_dir": "/bases"}]}"#,
        )
        .unwrap();
        def.validate().unwrap();
        let resolve = |pool: &str, v: &str| {
            Ok(ResolvedVolume {
                path: format!("/pools/{pool}/{v}").into(),
                format: "qcow2".into(),
            })
        };
        let config = def.vm_config(resolve).unwrap();
        assert_eq!(config.disks[0].path.to_str(), Some("/pools/p/v.qcow2"));
        assert_eq!(config.disks[0].format.as_deref(), Some("qcow2"));
        assert_eq!(config.disks[0].num_queues, None);
        assert_eq!(config.disks[1].path.to_str(), Some("/d"));
        assert_eq!(config.disks[1].format.as_deref(), Some("raw"));
        assert_eq!(config.disks[1].num_queues, Some(3));
        assert_eq!(
            config.disks[1].backing_dir.as_deref(),
            Some(Path::new("/bases"))
        );
        for bad in [
            r#"[{"volume": "no-slash"}]"#,
            r#"[{"volume": "p/../x"}]"#,
            r#"[{"path": "/d", "volume": "p/v"}]"#,
            r#"[{"readonly": true}]"#,
            r#"[{"path": "rel", "format": "raw"}]"#,
            r#"[{"path": "/d", "format": "raw", "num_queues": 0}]"#,
            r#"[{"path": "/d", "format": "raw", "num_queues": 65}]"#,
            r#"[{"path": "/d", "format": "vmdk"}]"#,
            r#"[{"path": "/d", "format": "raw", "backing_dir": "rel"}]"#,
            r#"[{"volume": "p/v", "backing_dir": "/bases"}]"#,
        ] {
            let json = format!(r#"{{"name": "a", "kernel": "/k", "disks": {bad}}}"#);
            let def: VmDefinition = serde_json::from_str(&json).unwrap();
            assert!(def.validate().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_disk_format_is_never_left_to_a_guess() {
        let def: VmDefinition =
            serde_json::from_str(r#"{"name": "a", "kernel": "/k", "disks": [{"path": "/d"}]}"#)
                .unwrap();
        let err = def.validate().unwrap_err();
        assert!(err.contains("needs a format"), "{err}");
        // A volume's recorded format wins; a definition that contradicts it is refused.
        let def: VmDefinition = serde_json::from_str(
            r#"{"name": "a", "kernel": "/k", "disks": [{"volume": "p/v", "format": "qcow2"}]}"#,
        )
        .unwrap();
        def.validate().unwrap();
        let recorded_raw = |_: &str, _: &str| {
            Ok(ResolvedVolume {
                path: "/pools/p/v".into(),
                format: "raw".into(),
            })
        };
        let err = def.vm_config(recorded_raw).unwrap_err();
        assert!(err.contains("is raw, but the definition says"), "{err}");
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
