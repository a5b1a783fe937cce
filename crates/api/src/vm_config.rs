//! The configuration of one VM as the VMM runs it.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::options::{OptionError, Options};
use crate::rng::RngOptions;
use crate::size::ByteSize;

/// Kernel command line used when none is given: the serial console on COM1.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0";
/// Most vCPUs a VM may have.
pub const MAX_CPUS: u32 = 64;
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

/// A virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Image file (or block device).
    pub path: PathBuf,
    /// The guest may not write.
    #[serde(default)]
    pub readonly: bool,
    /// Serial number the guest reads (at most 20 bytes).
    #[serde(default)]
    pub serial: Option<String>,
    /// `raw` or `qcow2`. When absent, probed from the image's first bytes, and a raw image
    /// then refuses guest writes that would make it look like another format.
    #[serde(default)]
    pub format: Option<String>,
    /// A directory the image's backing files may come from besides the image's own
    /// directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_dir: Option<PathBuf>,
    /// Request queues (1 to [`MAX_DISK_QUEUES`]); one per vCPU when absent, as QEMU does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_queues: Option<u16>,
}

/// Most request queues of one disk (virtio-blk offers no more).
pub const MAX_DISK_QUEUES: u16 = 64;

impl DiskConfig {
    /// The `--disk` option string that parses back into this disk.
    pub fn to_option_string(&self) -> String {
        let mut text = format!(
            "path={}",
            crate::options::escape(&self.path.to_string_lossy())
        );
        if self.readonly {
            text.push_str(",readonly=on");
        }
        if let Some(serial) = &self.serial {
            text.push_str(&format!(",serial={}", crate::options::escape(serial)));
        }
        if let Some(format) = &self.format {
            text.push_str(&format!(",format={}", crate::options::escape(format)));
        }
        if let Some(dir) = &self.backing_dir {
            text.push_str(&format!(
                ",backing_dir={}",
                crate::options::escape(&dir.to_string_lossy())
            ));
        }
        if let Some(queues) = self.num_queues {
            text.push_str(&format!(",num_queues={queues}"));
        }
        text
    }
}

/// Longest disk serial (virtio-blk GET_ID).
pub const MAX_SERIAL_LEN: usize = 20;

impl std::str::FromStr for DiskConfig {
    type Err = OptionError;

    /// `path=FILE[,readonly=on][,serial=ID][,format=raw|qcow2][,backing_dir=DIR][,num_queues=N]`
    fn from_str(s: &str) -> Result<Self, OptionError> {
        let mut o = Options::parse(
            s,
            &[
                "path",
                "readonly",
                "serial",
                "format",
                "backing_dir",
                "num_queues",
            ],
        )?;
        let num_queues = match o.take("num_queues") {
            None => None,
            Some(text) => Some(text.parse().map_err(|_| OptionError::Invalid {
                key: "num_queues".into(),
                message: format!("{text:?} is not a number of queues"),
            })?),
        };
        let disk = DiskConfig {
            path: PathBuf::from(o.required("path")?),
            readonly: o.flag("readonly", false)?,
            serial: o.take("serial"),
            format: o.take("format"),
            backing_dir: o.take("backing_dir").map(PathBuf::from),
            num_queues,
        };
        disk.validate()?;
        Ok(disk)
    }
}

impl DiskConfig {
    pub fn validate(&self) -> Result<(), OptionError> {
        if let Some(serial) = &self.serial {
            if serial.len() > MAX_SERIAL_LEN {
                return Err(OptionError::Invalid {
                    key: "serial".into(),
                    message: format!("{serial:?} is longer than {MAX_SERIAL_LEN} bytes"),
                });
            }
        }
        if let Some(format) = &self.format {
            if format != "raw" && format != "qcow2" {
                return Err(OptionError::Invalid {
                    key: "format".into(),
                    message: format!("{format:?} is not raw or qcow2"),
                });
            }
        }
        if let Some(queues) = self.num_queues {
            if !(1..=MAX_DISK_QUEUES).contains(&queues) {
                return Err(OptionError::Invalid {
                    key: "num_queues".into(),
                    message: format!("{queues} is not between 1 and {MAX_DISK_QUEUES}"),
                });
            }
        }
        Ok(())
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
    pub nets: Vec<crate::net::NetConfig>,
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
    #[error("network interface {tap}: {source}")]
    Net {
        tap: String,
        #[source]
        source: OptionError,
    },
    #[error("TAP device {0} is used by two interfaces")]
    DuplicateTap(String),
    #[error("virtio-rng: {0}")]
    Rng(#[source] OptionError),
    #[error("rng_bytes_per_sec and rng_period_ms limit virtio-rng: they need rng")]
    RngLimitWithoutRng,
    #[error("disk {path}: {source}")]
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

    /// Checks what can be checked without the host.
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
        let mut taps = std::collections::BTreeSet::new();
        for net in &self.nets {
            net.validate().map_err(|source| ConfigError::Net {
                tap: net.tap.clone(),
                source,
            })?;
            if !taps.insert(net.tap.as_str()) {
                return Err(ConfigError::DuplicateTap(net.tap.clone()));
            }
        }
        for disk in &self.disks {
            disk.validate().map_err(|source| ConfigError::Disk {
                path: disk.path.display().to_string(),
                source,
            })?;
        }
        Ok(())
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
        let err = c.validate().unwrap_err().to_string();
        assert!(err.starts_with("virtio-rng: option bytes_per_sec"), "{err}");
        // Old configurations (no limit fields) still read, and get the default limit.
        let old: VmConfig = serde_json::from_str(r#"{"kernel": "/k", "rng": true}"#).unwrap();
        assert_eq!(old.rng_options(), RngOptions::default());
        let text = serde_json::to_string(&old).unwrap();
        assert!(!text.contains("rng_bytes_per_sec"), "{text}");
    }

    #[test]
    fn disk_options() {
        let d: DiskConfig = "path=/img/a.raw,readonly=on,serial=abc".parse().unwrap();
        assert_eq!(d.path, PathBuf::from("/img/a.raw"));
        assert!(d.readonly);
        assert_eq!(d.serial.as_deref(), Some("abc"));
        assert!(
            "readonly=on".parse::<DiskConfig>().is_err(),
            "path is required"
        );
        assert!("path=a,serial=123456789012345678901"
            .parse::<DiskConfig>()
            .is_err());
        assert!("path=a,format=vmdk".parse::<DiskConfig>().is_err());
        assert!("path=a,cache=none".parse::<DiskConfig>().is_err());
    }

    #[test]
    fn disk_queues_are_checked_and_survive_the_option_string() {
        let d: DiskConfig = "path=/a.raw,num_queues=4".parse().unwrap();
        assert_eq!(d.num_queues, Some(4));
        assert_eq!(d.to_option_string(), "path=/a.raw,num_queues=4");
        let default: DiskConfig = "path=/a.raw".parse().unwrap();
        assert_eq!(default.num_queues, None);
        for bad in ["0", "65", "four", "-1"] {
            let err = format!("path=/a.raw,num_queues={bad}")
                .parse::<DiskConfig>()
                .unwrap_err();
            assert!(err.to_string().contains("num_queues"), "{bad}: {err}");
        }
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
