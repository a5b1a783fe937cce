//! A VM's virtio-blk disk as every side writes it: an image file (`path`), or a volume of one
//! of the daemon's storage pools (`volume`), which only the daemon resolves to a file. The
//! serde shape is flat (`path = ...` or `volume = ...` beside the other keys), as definition
//! files have always been written. Plain data; no I/O.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::options::{escape, OptionError, Options};

/// Most request queues of one disk (virtio-blk offers no more).
pub const MAX_DISK_QUEUES: u16 = 64;

/// Longest disk serial (virtio-blk GET_ID).
pub const MAX_SERIAL_LEN: usize = 20;

/// Where a disk's image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskSource {
    /// An image file or block device.
    Path(PathBuf),
    /// `POOL/VOLUME`: a volume of one of the daemon's pools, resolved when the VM starts.
    Volume(String),
}

/// A virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "DiskRepr", into = "DiskRepr")]
pub struct DiskConfig {
    pub source: DiskSource,
    /// The guest may not write.
    pub readonly: bool,
    /// Serial number the guest reads (at most [`MAX_SERIAL_LEN`] bytes).
    pub serial: Option<String>,
    /// `raw` or `qcow2`. When absent, `ferro run` probes the image's first bytes (and a raw
    /// image then refuses guest writes that would make it look like another format); a
    /// volume takes the format the daemon recorded for it.
    pub format: Option<String>,
    /// A directory the image's backing files may come from besides the image's own
    /// directory (a `path` disk only).
    pub backing_dir: Option<PathBuf>,
    /// Request queues (1 to [`MAX_DISK_QUEUES`]); one per vCPU when absent, as QEMU does.
    pub num_queues: Option<u16>,
}

/// [`DiskConfig`] as written: `path` and `volume` side by side, exactly one of them set.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DiskRepr {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    path: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    volume: Option<String>,
    #[serde(default)]
    readonly: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    serial: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    format: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    backing_dir: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    num_queues: Option<u16>,
}

impl TryFrom<DiskRepr> for DiskConfig {
    type Error = String;

    fn try_from(repr: DiskRepr) -> Result<Self, String> {
        let source = match (repr.path, repr.volume) {
            (Some(path), None) => DiskSource::Path(path),
            (None, Some(volume)) => DiskSource::Volume(volume),
            (Some(_), Some(_)) => {
                return Err("a disk has a path or a volume, not both: remove one".into())
            }
            (None, None) => {
                return Err("a disk needs a path (an image file) or a volume (POOL/VOLUME)".into())
            }
        };
        Ok(DiskConfig {
            source,
            readonly: repr.readonly,
            serial: repr.serial,
            format: repr.format,
            backing_dir: repr.backing_dir,
            num_queues: repr.num_queues,
        })
    }
}

impl From<DiskConfig> for DiskRepr {
    fn from(disk: DiskConfig) -> Self {
        let (path, volume) = match disk.source {
            DiskSource::Path(path) => (Some(path), None),
            DiskSource::Volume(volume) => (None, Some(volume)),
        };
        DiskRepr {
            path,
            volume,
            readonly: disk.readonly,
            serial: disk.serial,
            format: disk.format,
            backing_dir: disk.backing_dir,
            num_queues: disk.num_queues,
        }
    }
}

impl std::fmt::Display for DiskSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DiskSource::Path(path) => write!(f, "{}", path.display()),
            DiskSource::Volume(volume) => write!(f, "volume {volume}"),
        }
    }
}

impl DiskConfig {
    /// A read-write disk on the image at `path`, everything else unset.
    pub fn from_path(path: impl Into<PathBuf>) -> Self {
        DiskConfig {
            source: DiskSource::Path(path.into()),
            readonly: false,
            serial: None,
            format: None,
            backing_dir: None,
            num_queues: None,
        }
    }

    /// The image file, if the disk names one (not a volume).
    pub fn path(&self) -> Option<&Path> {
        match &self.source {
            DiskSource::Path(path) => Some(path),
            DiskSource::Volume(_) => None,
        }
    }

    /// The pool and volume this disk names, if it names one.
    pub fn volume_ref(&self) -> Option<(&str, &str)> {
        match &self.source {
            DiskSource::Volume(volume) => volume.split_once('/'),
            DiskSource::Path(_) => None,
        }
    }

    /// The `--disk` option string that parses back into this disk.
    pub fn to_option_string(&self) -> String {
        let mut text = match &self.source {
            DiskSource::Path(path) => format!("path={}", escape(&path.to_string_lossy())),
            DiskSource::Volume(volume) => format!("volume={}", escape(volume)),
        };
        if self.readonly {
            text.push_str(",readonly=on");
        }
        if let Some(serial) = &self.serial {
            text.push_str(&format!(",serial={}", escape(serial)));
        }
        if let Some(format) = &self.format {
            text.push_str(&format!(",format={}", escape(format)));
        }
        if let Some(dir) = &self.backing_dir {
            text.push_str(&format!(",backing_dir={}", escape(&dir.to_string_lossy())));
        }
        if let Some(queues) = self.num_queues {
            text.push_str(&format!(",num_queues={queues}"));
        }
        text
    }

    /// The disk's own rules (part of [`crate::VmConfig::validate`], the one check).
    pub(crate) fn check(&self) -> Result<(), OptionError> {
        let invalid = |key: &str, message: String| OptionError::Invalid {
            key: key.into(),
            message,
        };
        if let Some(serial) = self.serial.as_ref().filter(|s| s.len() > MAX_SERIAL_LEN) {
            let message = format!("{serial:?} is longer than {MAX_SERIAL_LEN} bytes");
            return Err(invalid("serial", message));
        }
        if let Some(format) = self
            .format
            .as_ref()
            .filter(|f| *f != "raw" && *f != "qcow2")
        {
            return Err(invalid("format", format!("{format:?} is not raw or qcow2")));
        }
        if let Some(queues) = self.num_queues {
            if !(1..=MAX_DISK_QUEUES).contains(&queues) {
                let message = format!("{queues} is not between 1 and {MAX_DISK_QUEUES}");
                return Err(invalid("num_queues", message));
            }
        }
        if let DiskSource::Volume(volume) = &self.source {
            if self.backing_dir.is_some() {
                let message = "a volume disk takes none: a volume's backing files are volumes \
                               of its pool"
                    .to_string();
                return Err(invalid("backing_dir", message));
            }
            let valid = |name: &str| crate::names::check_name(name).is_ok();
            if !matches!(volume.split_once('/'), Some((pool, name)) if valid(pool) && valid(name)) {
                return Err(invalid("volume", format!("{volume:?}: write POOL/VOLUME")));
            }
        }
        Ok(())
    }
}

impl std::str::FromStr for DiskConfig {
    type Err = OptionError;

    /// `path=FILE|volume=POOL/VOLUME[,readonly=on][,serial=ID][,format=raw|qcow2]
    /// [,backing_dir=DIR][,num_queues=N]`; checked with the rest of the VM by
    /// [`crate::VmConfig::validate`].
    fn from_str(s: &str) -> Result<Self, OptionError> {
        const KEYS: &[&str] = &[
            "path",
            "volume",
            "readonly",
            "serial",
            "format",
            "backing_dir",
            "num_queues",
        ];
        let mut o = Options::parse(s, KEYS)?;
        let num_queues = match o.take("num_queues") {
            None => None,
            Some(text) => Some(text.parse().map_err(|_| OptionError::Invalid {
                key: "num_queues".into(),
                message: format!("{text:?} is not a number of queues"),
            })?),
        };
        let source = match (o.take("path"), o.take("volume")) {
            (Some(path), None) => DiskSource::Path(PathBuf::from(path)),
            (None, Some(volume)) => DiskSource::Volume(volume),
            (Some(_), Some(_)) => {
                return Err(OptionError::Invalid {
                    key: "volume".into(),
                    message: "a disk has a path or a volume, not both".into(),
                })
            }
            (None, None) => return Err(OptionError::Missing("path")),
        };
        Ok(DiskConfig {
            source,
            readonly: o.flag("readonly", false)?,
            serial: o.take("serial"),
            format: o.take("format"),
            backing_dir: o.take("backing_dir").map(PathBuf::from),
            num_queues,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_options_parse_and_are_checked_apart() {
        let d: DiskConfig = "path=/img/a.raw,readonly=on,serial=abc".parse().unwrap();
        assert_eq!(d.path(), Some(Path::new("/img/a.raw")));
        assert!(d.readonly);
        assert_eq!(d.serial.as_deref(), Some("abc"));
        assert!(
            "readonly=on".parse::<DiskConfig>().is_err(),
            "a source is required"
        );
        assert!("path=a,volume=p/v".parse::<DiskConfig>().is_err());
        assert!("path=a,cache=none".parse::<DiskConfig>().is_err());
        // Values are the one validation's business, not the parser's.
        for bad in [
            "path=a,serial=123456789012345678901",
            "path=a,format=vmdk",
            "path=a,num_queues=0",
            "path=a,num_queues=65",
            "volume=nopool",
            "volume=p/v,backing_dir=/b",
        ] {
            let disk: DiskConfig = bad.parse().unwrap();
            assert!(disk.check().is_err(), "{bad}");
        }
        let v: DiskConfig = "volume=p/v.qcow2,num_queues=4".parse().unwrap();
        assert_eq!(v.volume_ref(), Some(("p", "v.qcow2")));
        assert_eq!(v.path(), None);
        v.check().unwrap();
    }

    #[test]
    fn option_strings_round_trip() {
        for text in [
            "path=/a,,b.img,readonly=on,serial=x,,y,format=raw",
            "path=/a.raw,num_queues=4",
            "volume=p/v,format=qcow2",
            "path=/b.qcow2,backing_dir=/bases",
        ] {
            let disk: DiskConfig = text.parse().unwrap();
            assert_eq!(disk.to_option_string(), text);
        }
        assert_eq!(
            "path=/a,,b".parse::<DiskConfig>().unwrap().path(),
            Some(Path::new("/a,b"))
        );
    }

    /// The JSON and TOML shape is the flat one definitions have always had.
    #[test]
    fn serde_shape_is_flat_with_exactly_one_source() {
        let json = r#"{"path":"/d","readonly":true,"format":"raw"}"#;
        let disk: DiskConfig = serde_json::from_str(json).unwrap();
        assert_eq!(disk.source, DiskSource::Path("/d".into()));
        assert_eq!(serde_json::to_string(&disk).unwrap(), json);
        let volume: DiskConfig = serde_json::from_str(r#"{"volume":"p/v"}"#).unwrap();
        assert_eq!(volume.source, DiskSource::Volume("p/v".into()));
        // `serial: null` is what the VMM wrote before sources were an enum.
        let old: DiskConfig =
            serde_json::from_str(r#"{"path":"/d","readonly":false,"serial":null,"format":null}"#)
                .unwrap();
        assert_eq!(old, DiskConfig::from_path("/d"));
        for (bad, says) in [
            (r#"{"readonly":true}"#, "needs a path"),
            (r#"{"path":"/d","volume":"p/v"}"#, "not both"),
            (r#"{"path":"/d","cache":"none"}"#, "unknown field `cache`"),
        ] {
            let err = serde_json::from_str::<DiskConfig>(bad)
                .unwrap_err()
                .to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }
}
