//! The daemon's state directory: VM definitions (`vms/NAME.toml`), console logs
//! (`logs/NAME.console.log`) and one runtime directory per running VM (`run/NAME/`: the VMM's
//! API and console sockets, its stderr, its process record and exit report).
//!
//! Definitions are replaced atomically ([`crate::fs`]), so a crash or a full disk leaves the
//! previous version, never half a file.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use api::daemon_api::VmDefinition;

/// Failures of the state directory.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot use the state directory {}", path.display())]
    Dir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
}

/// The layout of the state directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// Creates the directories that are missing.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        let store = Store {
            root: root.to_path_buf(),
        };
        // Console logs and runtime sockets are the daemon's user's alone.
        for (dir, mode) in [
            (store.vms_dir(), 0o755),
            (store.logs_dir(), 0o700),
            (store.run_root(), 0o700),
        ] {
            fs::create_dir_all(&dir)
                .and_then(|()| fs::set_permissions(&dir, fs::Permissions::from_mode(mode)))
                .map_err(|source| StoreError::Dir { path: dir, source })?;
        }
        Ok(store)
    }

    fn vms_dir(&self) -> PathBuf {
        self.root.join("vms")
    }

    fn logs_dir(&self) -> PathBuf {
        self.root.join("logs")
    }

    fn run_root(&self) -> PathBuf {
        self.root.join("run")
    }

    pub fn definition_path(&self, name: &str) -> PathBuf {
        self.vms_dir().join(format!("{name}.toml"))
    }

    pub fn console_log(&self, name: &str) -> PathBuf {
        self.logs_dir().join(format!("{name}.console.log"))
    }

    /// The runtime directory of VM `name`.
    pub fn run_dir(&self, name: &str) -> PathBuf {
        self.run_root().join(name)
    }

    /// Names of the VMs with a runtime directory.
    pub fn run_dirs(&self) -> Vec<String> {
        list_names(&self.run_root(), None)
    }

    /// Every definition on disk, with the files that could not be read.
    pub fn load_definitions(&self) -> (Vec<VmDefinition>, Vec<StoreError>) {
        let mut definitions = Vec::new();
        let mut errors = Vec::new();
        for name in list_names(&self.vms_dir(), Some(".toml")) {
            match self.load_definition(&name) {
                Ok(definition) => definitions.push(definition),
                Err(e) => errors.push(e),
            }
        }
        (definitions, errors)
    }

    fn load_definition(&self, name: &str) -> Result<VmDefinition, StoreError> {
        let path = self.definition_path(name);
        let text = fs::read_to_string(&path).map_err(|source| StoreError::Read {
            path: path.clone(),
            source,
        })?;
        let invalid = |message| StoreError::Invalid {
            path: path.clone(),
            message,
        };
        let mut definition: VmDefinition =
            toml::from_str(&text).map_err(|e| invalid(e.message().to_string()))?;
        let migrated = record_disk_formats(&mut definition);
        definition.validate_stored().map_err(invalid)?;
        if definition.name != name {
            return Err(invalid(format!("names the VM {:?}", definition.name)));
        }
        if migrated {
            self.save_definition(&definition)?;
        }
        Ok(definition)
    }

    pub fn save_definition(&self, definition: &VmDefinition) -> Result<(), StoreError> {
        let path = self.definition_path(&definition.name);
        let text = toml::to_string_pretty(definition).map_err(|e| StoreError::Invalid {
            path: path.clone(),
            message: e.to_string(),
        })?;
        crate::fs::write_atomic(&path, text.as_bytes()).map_err(|e| StoreError::Write {
            path: e.path,
            source: e.source,
        })
    }

    pub fn remove_definition(&self, name: &str) -> Result<(), StoreError> {
        let path = self.definition_path(name);
        fs::remove_file(&path).map_err(|source| StoreError::Write { path, source })
    }
}

/// Gives the `path` disks of a definition written before formats were required the format
/// their images have now, where a guest's writes could not have made it (raw, or qcow2 with
/// no backing file), recorded in the definition and kept from then on; returns whether any
/// disk changed. A disk that looks like anything else (a qcow2 image naming a backing file,
/// which its guest may have written) keeps no format, and its VM cannot start until its
/// definition gives one.
fn record_disk_formats(definition: &mut VmDefinition) -> bool {
    let mut changed = false;
    for disk in &mut definition.config.disks {
        let Some(path) = disk.path().filter(|_| disk.format.is_none()) else {
            continue;
        };
        let probed = fs::File::open(path)
            .map_err(|e| format!("cannot be read ({e})"))
            .and_then(|file| crate::pools::volume_format::trusted_probe(&file));
        match probed {
            Ok(format) => {
                tracing::warn!(
                    "VM {}: disk {} had no format; probed once as {} and recorded in its \
                     definition",
                    definition.name,
                    path.display(),
                    format.name()
                );
                disk.format = Some(format.name().to_string());
                changed = true;
            }
            Err(looks) => tracing::error!(
                "VM {}: disk {} has no format and {looks}: it cannot start until its \
                 definition says format = \"raw\" or \"qcow2\"",
                definition.name,
                path.display()
            ),
        }
    }
    changed
}

fn list_names(dir: &Path, suffix: Option<&str>) -> Vec<String> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter_map(|name| match suffix {
            Some(suffix) => name.strip_suffix(suffix).map(str::to_string),
            None => Some(name),
        })
        .filter(|name| api::daemon_api::check_name(name).is_ok())
        .collect();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::definition_file::parse_vm as parse_definition;

    fn definition(name: &str) -> VmDefinition {
        parse_definition(&format!("name = \"{name}\"\nkernel = \"/boot/vmlinuz\"\n")).unwrap()
    }

    #[test]
    fn definitions_round_trip_through_toml_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut def = definition("web1");
        let disk: api::DiskConfig = "path=/var/lib/ferro/web1.qcow2,format=qcow2"
            .parse()
            .unwrap();
        def.config.disks.push(disk);
        def.autostart = true;
        store.save_definition(&def).unwrap();
        store.save_definition(&definition("db")).unwrap();
        let (loaded, errors) = store.load_definitions();
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(loaded.len(), 2);
        assert_eq!(loaded[1], def);
        store.remove_definition("db").unwrap();
        assert_eq!(store.load_definitions().0.len(), 1);
    }

    /// A 1 MiB qcow2 image at `path`, naming `backing` (raw) if given.
    fn qcow2(path: &Path, backing: Option<&str>) {
        let file = fs::File::create(path).unwrap();
        let options = block::qcow2::CreateOptions {
            size: 1 << 20,
            cluster_bits: 16,
            backing: backing.map(|b| (b.to_string(), Some("raw".to_string()))),
        };
        block::qcow2::create(&file, &options).unwrap();
    }

    #[test]
    fn an_old_definition_gets_its_disk_formats_once_where_no_guest_could_fake_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let raw = dir.path().join("a.raw");
        let alone = dir.path().join("b.qcow2");
        let overlay = dir.path().join("c.qcow2");
        let missing = dir.path().join("d.img");
        fs::write(&raw, vec![0u8; 4096]).unwrap();
        qcow2(&alone, None);
        qcow2(&overlay, Some("a.raw"));
        let mut text = "name = \"old\"\nkernel = \"/k\"\n".to_string();
        for disk in [&raw, &alone, &overlay, &missing] {
            text += &format!("[[disks]]\npath = {disk:?}\n");
        }
        fs::write(store.definition_path("old"), text).unwrap();
        let (loaded, errors) = store.load_definitions();
        assert!(errors.is_empty(), "{errors:?}");
        let formats: Vec<_> = loaded[0]
            .config
            .disks
            .iter()
            .map(|d| d.format.clone())
            .collect();
        // An overlay (maybe a guest's header in a raw disk) and an unreadable disk stay
        // without: the VM is kept, and cannot start until its definition says.
        assert_eq!(
            formats,
            [Some("raw".into()), Some("qcow2".into()), None, None]
        );
        let unset: Vec<_> = loaded[0].disks_without_format().collect();
        assert_eq!(unset, [overlay.as_path(), missing.as_path()]);
        // Recorded in the file: what the guest writes later changes nothing.
        qcow2(&raw, Some("b.qcow2"));
        let (loaded, _) = store.load_definitions();
        assert_eq!(loaded[0].config.disks[0].format.as_deref(), Some("raw"));
        let saved = fs::read_to_string(store.definition_path("old")).unwrap();
        assert!(saved.contains(r#"format = "raw""#), "{saved}");
    }

    #[test]
    fn bad_files_are_reported_not_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        fs::write(
            store.definition_path("bad"),
            "name = \"bad\"\nkernal = \"/k\"\n",
        )
        .unwrap();
        fs::write(
            store.definition_path("other"),
            "name = \"x\"\nkernel = \"/k\"\n",
        )
        .unwrap();
        let (loaded, errors) = store.load_definitions();
        assert!(loaded.is_empty());
        let messages: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        assert!(
            messages[0].contains("unknown field `kernal`"),
            "{messages:?}"
        );
        assert!(messages[1].contains("names the VM \"x\""), "{messages:?}");
    }
}
