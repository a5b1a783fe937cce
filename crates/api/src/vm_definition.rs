//! A daemon VM definition: a [`VmConfig`] (whose disks may be pool volumes and whose NICs may
//! be on virtual networks) plus what only the daemon keeps (name, id, autostart). It is the
//! file `<state-dir>/vms/NAME.toml`, what `ferro vm define` reads and `vm dump` writes, and
//! the body of `POST /api/v1/vms`: the same flat shape in all of them, unchanged since before
//! definitions embedded the VM's config. Plain data; no I/O.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::disk::{DiskConfig, DiskSource};
use crate::names::check_name;
use crate::net::{NetConfig, NicAttachment};
use crate::net_api::dns_host_name;
use crate::size::ByteSize;
use crate::tap_names::network_tap_name;
use crate::vm_config::{default_cmdline, default_cpus, default_memory, ConsoleKind, VmConfig};

/// A persistent VM definition. Unknown fields are refused by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "DefinitionRepr", into = "DefinitionRepr")]
pub struct VmDefinition {
    pub name: String,
    /// The daemon's number for this VM: unique among the defined VMs, given when the VM is
    /// defined (or, for a definition older than ids, when the daemon loads it) and kept; it
    /// names the VM's TAP devices on networks. Read-only: a value in a request is replaced.
    pub id: Option<u32>,
    /// Start the VM when the daemon starts.
    pub autostart: bool,
    /// The VM itself. `no_reboot` is not part of a definition: the daemon's VMs reboot in
    /// place, and it is always false here.
    pub config: VmConfig,
}

/// [`VmDefinition`] as written: the config's fields beside the daemon's, in the order files
/// have always had.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DefinitionRepr {
    name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<u32>,
    #[serde(default = "default_cpus")]
    cpus: u32,
    #[serde(default = "default_memory")]
    memory: ByteSize,
    kernel: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    initrd: Option<PathBuf>,
    #[serde(default = "default_cmdline")]
    cmdline: String,
    #[serde(default)]
    disks: Vec<DiskConfig>,
    #[serde(default)]
    nets: Vec<NetConfig>,
    #[serde(default)]
    rng: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rng_bytes_per_sec: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rng_period_ms: Option<u32>,
    #[serde(default)]
    console: ConsoleKind,
    #[serde(default)]
    autostart: bool,
}

impl From<DefinitionRepr> for VmDefinition {
    fn from(r: DefinitionRepr) -> Self {
        VmDefinition {
            name: r.name,
            id: r.id,
            autostart: r.autostart,
            config: VmConfig {
                kernel: r.kernel,
                initrd: r.initrd,
                cmdline: r.cmdline,
                cpus: r.cpus,
                memory: r.memory,
                no_reboot: false,
                rng: r.rng,
                rng_bytes_per_sec: r.rng_bytes_per_sec,
                rng_period_ms: r.rng_period_ms,
                disks: r.disks,
                console: r.console,
                nets: r.nets,
            },
        }
    }
}

impl From<VmDefinition> for DefinitionRepr {
    fn from(d: VmDefinition) -> Self {
        let c = d.config;
        DefinitionRepr {
            name: d.name,
            id: d.id,
            cpus: c.cpus,
            memory: c.memory,
            kernel: c.kernel,
            initrd: c.initrd,
            cmdline: c.cmdline,
            disks: c.disks,
            nets: c.nets,
            rng: c.rng,
            rng_bytes_per_sec: c.rng_bytes_per_sec,
            rng_period_ms: c.rng_period_ms,
            console: c.console,
            autostart: d.autostart,
        }
    }
}

/// A pool volume as a VM's disk uses it: its file, and the format the daemon recorded for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedVolume {
    pub path: PathBuf,
    pub format: String,
}

impl VmDefinition {
    /// The definition of VM `name` running `config`, without an id (the daemon gives it).
    pub fn new(name: impl Into<String>, config: VmConfig) -> Self {
        VmDefinition {
            name: name.into(),
            id: None,
            autostart: false,
            config,
        }
    }

    /// The configuration the VMM runs: each volume resolved by `resolve` (a pool and volume
    /// name to the volume's file and recorded format) and each NIC on a network given its
    /// TAP device. A volume disk whose definition gives another format than the recorded one
    /// is refused.
    pub fn resolved_config(
        &self,
        resolve: impl Fn(&str, &str) -> Result<ResolvedVolume, String>,
    ) -> Result<VmConfig, String> {
        let mut config = self.config.clone();
        config.no_reboot = false;
        for disk in &mut config.disks {
            let Some((pool, volume)) = disk.volume_ref() else {
                continue;
            };
            let resolved = resolve(pool, volume)?;
            if let Some(format) = disk.format.as_ref().filter(|f| **f != resolved.format) {
                return Err(format!(
                    "disk volume {pool}/{volume} is {}, but the definition says format = \
                     {format:?}: remove the format or make it {0:?}",
                    resolved.format
                ));
            }
            disk.format = Some(resolved.format);
            disk.source = DiskSource::Path(resolved.path);
        }
        for (index, nic) in config.nets.iter_mut().enumerate() {
            if let NicAttachment::Network(_) = nic.attachment {
                let id = self.id.ok_or_else(|| {
                    format!(
                        "VM {} has no id yet: its NICs on networks have no TAP name",
                        self.name
                    )
                })?;
                nic.attachment = NicAttachment::Tap(network_tap_name(id, index));
            }
        }
        Ok(config)
    }

    /// The VM's name as a DNS name on its networks, if it can be one (see
    /// [`dns_host_name`]); VMs defined before names were checked may have names that cannot.
    pub fn dns_name(&self) -> Option<&str> {
        dns_host_name(&self.name).then_some(self.name.as_str())
    }

    /// Checks everything that does not depend on the host's files: the name, the VM's
    /// config ([`VmConfig::validate`], the one check of a VM) and what a daemon adds.
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
        self.config
            .disks
            .iter()
            .filter(|d| d.format.is_none())
            .filter_map(|d| d.path())
    }

    /// What a daemon adds to [`VmConfig::validate`]: it runs VMs from its own directory, so
    /// paths are absolute, and it never lets a guest's bytes decide a disk's format.
    fn validate_with(&self, require_format: bool) -> Result<(), String> {
        check_name(&self.name)?;
        let config = &self.config;
        config.validate().map_err(|e| crate::error_chain(&e))?;
        let mut paths = vec![("kernel", config.kernel.as_path())];
        paths.extend(config.initrd.as_deref().map(|initrd| ("initrd", initrd)));
        for disk in &config.disks {
            paths.extend(disk.path().map(|path| ("disk", path)));
            paths.extend(disk.backing_dir.as_deref().map(|dir| ("backing_dir", dir)));
        }
        if let Some((what, path)) = paths.iter().find(|(_, path)| !path.is_absolute()) {
            return Err(format!(
                "the {what} path {} must be absolute",
                path.display()
            ));
        }
        match self.disks_without_format().next() {
            Some(path) if require_format => Err(format!(
                "the disk {} needs a format (format = \"raw\" or \"qcow2\"): Ferro does not \
                 guess it, since a guest can make a raw disk look like any format",
                path.display()
            )),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests;
