//! What one VM is made of, as `ferro run --config` reads it, the VMM reports it and a daemon
//! definition embeds it; and its one validation ([`VmConfig::validate`]). Disks and NICs may
//! name daemon resources (volumes, networks) that only the daemon resolves: the VMM takes a
//! [`RunnableConfig`], which has none. Plain data; no I/O.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use crate::disk::{DiskConfig, DiskSource, MAX_DISK_QUEUES, MAX_SERIAL_LEN};
use crate::net::{NetConfig, NicAttachment};
use crate::options::OptionError;
use crate::rng::RngOptions;
use crate::size::ByteSize;

/// Kernel command line used when none is given: the serial console on COM1.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0";
/// Most vCPUs a VM may have.
pub const MAX_CPUS: u32 = 64;
/// Most NICs of a VM (the PCI bus has 32 slots); keeps the daemon's TAP names short.
pub const MAX_NICS: usize = 32;
/// Smallest guest memory.
pub const MIN_MEMORY: ByteSize = ByteSize(128 << 20);
/// vCPUs of a VM that does not say (`ferro run`, the VMM's config, a daemon definition).
pub const DEFAULT_CPUS: u32 = 1;
/// Guest memory of a VM that does not say (`ferro run`, the VMM's config, a daemon
/// definition).
pub const DEFAULT_MEMORY: ByteSize = ByteSize(512 << 20);

// serde's `default = "..."` takes a function; these are the only ones, for both the VMM's
// config and the daemon's definition, so each default stays a single constant.
pub(crate) fn default_cpus() -> u32 {
    DEFAULT_CPUS
}

pub(crate) fn default_memory() -> ByteSize {
    DEFAULT_MEMORY
}

pub(crate) fn default_cmdline() -> String {
    DEFAULT_CMDLINE.to_string()
}

/// Which guest device the VMM's terminal is connected to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConsoleKind {
    /// The COM1 UART (`ttyS0`).
    #[default]
    Serial,
    /// A virtio-console device (`hvc0`); the UART is then not connected.
    Hvc,
}

impl std::fmt::Display for ConsoleKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ConsoleKind::Serial => "serial",
            ConsoleKind::Hvc => "hvc",
        })
    }
}

impl std::str::FromStr for ConsoleKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "serial" => Ok(ConsoleKind::Serial),
            "hvc" => Ok(ConsoleKind::Hvc),
            other => Err(format!("unknown console {other:?} (serial or hvc)")),
        }
    }
}

/// What a VM is made of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Linux bzImage or ELF vmlinux (PVH).
    pub kernel: PathBuf,
    /// Initramfs, if any.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    /// Number of vCPUs (1 to 64).
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    /// Guest RAM.
    #[serde(default = "default_memory")]
    pub memory: ByteSize,
    /// Turn a guest reboot into an exit instead of restarting the guest.
    #[serde(default)]
    pub no_reboot: bool,
    /// A virtio-rng device fed from the host's getrandom.
    #[serde(default)]
    pub rng: bool,
    /// Most entropy the guest may take per second (virtio-rng); 256 KiB when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rng_bytes_per_sec: Option<u64>,
    /// How often that budget is handed out, in ms (1 to 60000); 100 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rng_period_ms: Option<u32>,
    /// virtio-blk disks, in PCI slot order.
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// The device the console is connected to.
    #[serde(default)]
    pub console: ConsoleKind,
    /// virtio-net interfaces.
    #[serde(default)]
    pub nets: Vec<NetConfig>,
}

/// A configuration that cannot describe a VM, whatever the host.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("a VM needs at least one vCPU")]
    NoCpus,
    #[error("{0} vCPUs requested; Ferro supports at most {MAX_CPUS}")]
    TooManyCpus(u32),
    #[error("{0} of memory is too small; a VM needs at least {MIN_MEMORY}")]
    MemoryTooSmall(ByteSize),
    #[error("memory size {0} is not a multiple of 4 KiB")]
    MemoryNotPageAligned(ByteSize),
    #[error("network interface {nic}")]
    Net {
        nic: String,
        #[source]
        source: OptionError,
    },
    #[error("TAP device {0} is used by two interfaces")]
    DuplicateTap(String),
    #[error("{0} NICs: a VM has at most {MAX_NICS}")]
    TooManyNics(usize),
    #[error(
        "{0} is resolved by the daemon: define the VM with `ferro vm define`, or give a \
         {1} to run it with `ferro run`"
    )]
    Unresolved(String, &'static str),
    #[error("virtio-rng")]
    Rng(#[source] OptionError),
    #[error("rng_bytes_per_sec and rng_period_ms limit virtio-rng: they need rng")]
    RngLimitWithoutRng,
    #[error("disk {path}")]
    Disk {
        path: String,
        #[source]
        source: OptionError,
    },
}

impl VmConfig {
    /// A configuration with defaults for everything but the kernel.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmConfig {
            kernel: kernel.into(),
            initrd: None,
            cmdline: default_cmdline(),
            cpus: default_cpus(),
            memory: default_memory(),
            no_reboot: false,
            rng: false,
            rng_bytes_per_sec: None,
            rng_period_ms: None,
            disks: Vec::new(),
            console: ConsoleKind::default(),
            nets: Vec::new(),
        }
    }

    /// virtio-rng's rate limit as given (absent values take their defaults).
    pub fn rng_options(&self) -> RngOptions {
        RngOptions {
            bytes_per_sec: self.rng_bytes_per_sec,
            period_ms: self.rng_period_ms,
        }
    }

    /// The one check of a VM's description: everything that can be checked without the
    /// host. Option strings, `ferro run`'s flags and config file, and daemon definitions
    /// (which add their own rules, [`crate::vm_definition::VmDefinition::validate`]) all come
    /// here; nothing else checks these values.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.cpus == 0 {
            return Err(ConfigError::NoCpus);
        }
        if self.cpus > MAX_CPUS {
            return Err(ConfigError::TooManyCpus(self.cpus));
        }
        if self.memory < MIN_MEMORY {
            return Err(ConfigError::MemoryTooSmall(self.memory));
        }
        if !self.memory.0.is_multiple_of(4096) {
            return Err(ConfigError::MemoryNotPageAligned(self.memory));
        }
        let rng = self.rng_options();
        if !self.rng && rng != RngOptions::default() {
            return Err(ConfigError::RngLimitWithoutRng);
        }
        rng.validate().map_err(ConfigError::Rng)?;
        if self.nets.len() > MAX_NICS {
            return Err(ConfigError::TooManyNics(self.nets.len()));
        }
        let mut taps = std::collections::BTreeSet::new();
        for net in &self.nets {
            net.check().map_err(|source| ConfigError::Net {
                nic: net.to_option_string(),
                source,
            })?;
            if let Some(tap) = net.tap().filter(|tap| !taps.insert(*tap)) {
                return Err(ConfigError::DuplicateTap(tap.to_string()));
            }
        }
        for disk in &self.disks {
            disk.check().map_err(|source| ConfigError::Disk {
                path: disk.source.to_string(),
                source,
            })?;
        }
        Ok(())
    }

    /// [`VmConfig::validate`], then refuses what only the daemon can resolve: what the VMM
    /// runs.
    pub fn into_runnable(self) -> Result<RunnableConfig, ConfigError> {
        self.validate()?;
        if let Some(disk) = self.disks.iter().find(|d| d.path().is_none()) {
            return Err(ConfigError::Unresolved(
                format!("disk {}", disk.source),
                "path",
            ));
        }
        if let Some(net) = self.nets.iter().find(|n| n.tap().is_none()) {
            return Err(ConfigError::Unresolved(
                format!("NIC {}", net.to_option_string()),
                "tap",
            ));
        }
        Ok(RunnableConfig(self))
    }
}

/// A [`VmConfig`] that passed [`VmConfig::validate`] and names only host files and TAP
/// devices: what the VMM runs. Made only by [`VmConfig::into_runnable`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct RunnableConfig(VmConfig);

impl std::ops::Deref for RunnableConfig {
    type Target = VmConfig;

    fn deref(&self) -> &VmConfig {
        &self.0
    }
}

impl RunnableConfig {
    /// The image file of each disk, in order.
    pub fn disk_paths(&self) -> impl Iterator<Item = (&DiskConfig, &std::path::Path)> {
        self.0
            .disks
            .iter()
            .filter_map(|disk| Some((disk, disk.path()?)))
    }

    /// The TAP device of each NIC, in order.
    pub fn nic_taps(&self) -> impl Iterator<Item = (&NetConfig, &str)> {
        self.0.nets.iter().filter_map(|net| match &net.attachment {
            NicAttachment::Tap(tap) => Some((net, tap.as_str())),
            NicAttachment::Network(_) => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c = VmConfig::new("/boot/vmlinuz");
        assert_eq!(
            (c.cpus, c.memory, c.cmdline.as_str()),
            (1, ByteSize(512 << 20), "console=ttyS0")
        );
        assert_eq!(c.validate(), Ok(()));
        let parsed: VmConfig = serde_json::from_str(r#"{"kernel": "/boot/vmlinuz"}"#).unwrap();
        assert_eq!(parsed, c, "serde's defaults are VmConfig::new's");
    }

    /// `ferro run --console` shows its default through Display and parses it back.
    #[test]
    fn console_kind_round_trips_through_text() {
        for kind in [ConsoleKind::Serial, ConsoleKind::Hvc] {
            assert_eq!(kind.to_string().parse::<ConsoleKind>(), Ok(kind));
        }
        assert_eq!(ConsoleKind::default().to_string(), "serial");
    }

    #[test]
    fn validation_errors() {
        let base = VmConfig::new("k");
        let with = |f: fn(&mut VmConfig)| {
            let mut c = base.clone();
            f(&mut c);
            c.validate()
        };
        assert_eq!(with(|c| c.cpus = 0), Err(ConfigError::NoCpus));
        assert_eq!(with(|c| c.cpus = 65), Err(ConfigError::TooManyCpus(65)));
        assert_eq!(with(|c| c.cpus = 64), Ok(()));
        assert_eq!(
            with(|c| c.memory = ByteSize(64 << 20)),
            Err(ConfigError::MemoryTooSmall(ByteSize(64 << 20)))
        );
        assert_eq!(
            with(|c| c.memory = ByteSize((128 << 20) + 1)),
            Err(ConfigError::MemoryNotPageAligned(ByteSize((128 << 20) + 1)))
        );
    }

    #[test]
    fn an_rng_limit_needs_the_rng_and_sane_values() {
        let mut c = VmConfig::new("k");
        c.rng_period_ms = Some(1000);
        assert_eq!(c.validate(), Err(ConfigError::RngLimitWithoutRng));
        c.rng = true;
        assert_eq!(c.validate(), Ok(()));
        c.rng_bytes_per_sec = Some(0);
        let err = crate::error_chain(&c.validate().unwrap_err());
        assert!(err.starts_with("virtio-rng: option bytes_per_sec"), "{err}");
        // Old configurations (no limit fields) still read, and get the default limit.
        let old: VmConfig = serde_json::from_str(r#"{"kernel": "/k", "rng": true}"#).unwrap();
        assert_eq!(old.rng_options(), RngOptions::default());
        let text = serde_json::to_string(&old).unwrap();
        assert!(!text.contains("rng_bytes_per_sec"), "{text}");
    }

    /// Disks and NICs are checked with the VM, whatever wrote them.
    #[test]
    fn devices_are_checked_with_the_vm() {
        let with = |disk: &str, nic: &str| {
            let mut c = VmConfig::new("/k");
            c.disks.push(disk.parse().unwrap());
            c.nets.push(nic.parse().unwrap());
            c.validate().map_err(|e| crate::error_chain(&e))
        };
        with("path=/d,format=raw", "tap=t0").unwrap();
        with("volume=p/v", "network=lab").unwrap();
        let err = with("path=/d,format=vmdk", "tap=t0").unwrap_err();
        assert_eq!(err, "disk /d: option format: \"vmdk\" is not raw or qcow2");
        let err = with("path=/d", "tap=t0,queue_pairs=0").unwrap_err();
        assert!(err.starts_with("network interface tap=t0"), "{err}");
        let mut c = VmConfig::new("/k");
        c.nets = vec![NetConfig::on_tap("t0"), NetConfig::on_tap("t0")];
        assert_eq!(c.validate(), Err(ConfigError::DuplicateTap("t0".into())));
        c.nets = vec![NetConfig::on_tap("t0"); MAX_NICS + 1];
        assert_eq!(c.validate(), Err(ConfigError::TooManyNics(MAX_NICS + 1)));
    }

    /// The VMM runs only what names host files and TAP devices.
    #[test]
    fn only_resolved_configs_are_runnable() {
        let mut c = VmConfig::new("/k");
        c.disks.push("path=/d".parse().unwrap());
        c.nets.push("tap=t0".parse().unwrap());
        let runnable = c.clone().into_runnable().unwrap();
        assert_eq!(runnable.disk_paths().count(), 1);
        assert_eq!(
            runnable.nic_taps().map(|(_, t)| t).collect::<Vec<_>>(),
            ["t0"]
        );
        let mut volume = c.clone();
        volume.disks.push("volume=p/v".parse().unwrap());
        let err = volume.into_runnable().unwrap_err().to_string();
        assert!(
            err.starts_with("disk volume p/v is resolved by the daemon: define the VM"),
            "{err}"
        );
        c.nets.push("network=lab".parse().unwrap());
        let err = c.into_runnable().unwrap_err().to_string();
        assert!(err.contains("or give a tap to run it"), "{err}");
        let mut bad = VmConfig::new("/k");
        bad.cpus = 0;
        assert_eq!(bad.into_runnable().unwrap_err(), ConfigError::NoCpus);
    }

    #[test]
    fn json_round_trip_and_unknown_fields() {
        let c = VmConfig {
            initrd: Some("/i".into()),
            cpus: 4,
            ..VmConfig::new("/k")
        };
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<VmConfig>(&json).unwrap(), c);
        let minimal: VmConfig = serde_json::from_str(r#"{"kernel": "/k"}"#).unwrap();
        assert_eq!(minimal, VmConfig::new("/k"));
        let err = serde_json::from_str::<VmConfig>(r#"{"kernel": "/k", "cpu": 2}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `cpu`"), "{err}");
    }
}
